//! The embedded test guest: 32-bit protected mode, flat segments, no paging, interrupts off.
//!
//! Its code, GDT, stacks and per-vCPU control blocks live in a private slot that no workload
//! touches; the constants below are offsets from that slot's base GPA, which the host chooses. Each vCPU loops over the probe pages the host lists in its control block: it reads its
//! own dword of the page and compares it with the last value it wrote there (kept per host page,
//! a *cell*, so a region that moves keeps its expected values), writes a new sequence number, and
//! at the end of a round calls a function in a re-slotted range (when the host names one) and
//! reports the round through port I/O. When an access exits as MMIO, the host sets `skipped` in
//! the control block before the vCPU resumes, so the guest neither checks the value read nor
//! records the value written. Every probe read is also stored in the control block
//! ([`ctl::READS`]), MMIO answer ([`MMIO_READ_VALUE`]) included, so the host can see what the
//! guest saw; a *read-only* probe ([`ctl::READ_ONLY`] in its cell) is only read and recorded,
//! never checked or written.

use iced_x86::code_asm::*;
use iced_x86::IcedError;

/// Size of the private slot.
pub const PRIVATE_SIZE: u64 = 2 << 20;
/// GDT offset.
pub const GDT: u64 = 0x500;
/// Code offset.
pub const CODE: u64 = 0x1000;
/// Offset of the first control block.
pub const CTL: u64 = 0x10_0000;
/// Bytes of one vCPU's control block (header, expected values, stack at its top).
pub const CTL_SIZE: u64 = 0x4_0000;
/// Most vCPUs the private slot has room for.
pub const MAX_VCPUS: usize = ((PRIVATE_SIZE - CTL) / CTL_SIZE) as usize;

/// Control block fields (byte offsets).
pub mod ctl {
    /// Number of probes.
    pub const COUNT: u64 = 0x00;
    /// The guest's write sequence number.
    pub const SEQ: u64 = 0x04;
    /// Set by the host when the last access exited as MMIO.
    pub const SKIPPED: u64 = 0x08;
    /// Index of the probe being accessed.
    pub const INDEX: u64 = 0x0c;
    /// GPA of the function to call each round (0: none).
    pub const EXEC: u64 = 0x10;
    /// Rounds completed.
    pub const ROUNDS: u64 = 0x14;
    /// What the guest is doing: 1 read, 2 write, 3 exec, 0 between.
    pub const PHASE: u64 = 0x18;
    /// Probes: `[gpa: u32, cell: u32]` each.
    pub const PROBES: u64 = 0x20;
    /// Set in a probe's cell: the probe is only read (and the value recorded), never checked or
    /// written.
    pub const READ_ONLY: u32 = 0x8000_0000;
    /// What each probe's last read returned (u32 per probe, by index).
    pub const READS: u64 = 0x2000;
    /// Expected value per cell (u32 each).
    pub const EXPECTED: u64 = 0x3000;
    /// Most probes a control block holds.
    pub const MAX_PROBES: usize = ((READS - PROBES) / 8) as usize;
    /// Most cells.
    pub const MAX_CELLS: usize = ((super::CTL_SIZE - 0x1000 - EXPECTED) / 4) as usize;
}

// Every probe has its slot in `READS`, and `READS` ends before `EXPECTED`.
const _: () = assert!(ctl::READS + ctl::MAX_PROBES as u64 * 4 <= ctl::EXPECTED);

/// Ports the guest reports on.
pub mod port {
    /// A round is done.
    pub const ROUND: u16 = 0x10;
    /// A probe read a value other than the last one this vCPU wrote there.
    pub const DATA_ERROR: u16 = 0x11;
    /// The function in the re-slotted range returned the wrong value.
    pub const EXEC_ERROR: u16 = 0x12;
}

/// What a guest read that exits as MMIO returns: the host answers every byte with `0xff`.
pub const MMIO_READ_VALUE: u32 = 0xffff_ffff;

/// What the function at [`ctl::EXEC`] returns.
pub const EXEC_MAGIC: u32 = 0x600d_c0de;

/// The function placed in a re-slotted range: `mov eax, EXEC_MAGIC; ret`.
pub fn exec_function() -> Vec<u8> {
    let mut out = vec![0xb8];
    out.extend_from_slice(&EXEC_MAGIC.to_le_bytes());
    out.push(0xc3);
    out
}

/// The GDT: null, flat 32-bit code (0x08), flat data (0x10).
pub fn gdt() -> [u64; 3] {
    [0, 0x00cf_9b00_0000_ffff, 0x00cf_9300_0000_ffff]
}

/// Offset of vCPU `index`'s control block.
pub fn ctl_offset(index: usize) -> u64 {
    CTL + index as u64 * CTL_SIZE
}

/// Offset of vCPU `index`'s initial stack pointer (top of its control block).
pub fn stack_top(index: usize) -> u64 {
    ctl_offset(index) + CTL_SIZE
}

/// Assembles the probe loop to run at `base + CODE`. Entry state: EBX = control block, EBP =
/// this vCPU's byte offset inside each probe page, ESP = stack.
pub fn code(base: u64) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(32)?;
    let mut top = a.create_label();
    let mut next = a.create_label();
    let mut write = a.create_label();
    let mut skip = a.create_label();
    let mut round_done = a.create_label();
    let mut report = a.create_label();
    let c = |off: u64| dword_ptr(ebx + off as i32);

    a.set_label(&mut top)?;
    a.xor(esi, esi)?;
    a.set_label(&mut next)?;
    a.cmp(esi, c(ctl::COUNT))?;
    a.jae(round_done)?;
    a.mov(edi, dword_ptr(ebx + esi * 8 + ctl::PROBES as i32))?;
    a.mov(edx, dword_ptr(ebx + esi * 8 + (ctl::PROBES + 4) as i32))?;
    a.mov(c(ctl::INDEX), esi)?;
    // Read and check.
    a.mov(c(ctl::PHASE), 1)?;
    a.mov(c(ctl::SKIPPED), 0)?;
    a.mov(eax, dword_ptr(edi + ebp))?;
    a.mov(dword_ptr(ebx + esi * 4 + ctl::READS as i32), eax)?;
    // A read-only probe stops here.
    a.test(edx, edx)?;
    a.js(skip)?;
    a.cmp(c(ctl::SKIPPED), 0)?;
    a.jne(write)?;
    a.cmp(eax, dword_ptr(ebx + edx * 4 + ctl::EXPECTED as i32))?;
    a.je(write)?;
    a.out(port::DATA_ERROR as i32, eax)?;
    // Write the next sequence number and remember it if it landed.
    a.set_label(&mut write)?;
    a.mov(c(ctl::PHASE), 2)?;
    a.inc(c(ctl::SEQ))?;
    a.mov(eax, c(ctl::SEQ))?;
    a.mov(c(ctl::SKIPPED), 0)?;
    a.mov(dword_ptr(edi + ebp), eax)?;
    a.cmp(c(ctl::SKIPPED), 0)?;
    a.jne(skip)?;
    a.mov(dword_ptr(ebx + edx * 4 + ctl::EXPECTED as i32), eax)?;
    a.set_label(&mut skip)?;
    a.inc(esi)?;
    a.jmp(next)?;
    // End of round: run code from the re-slotted range, then report.
    a.set_label(&mut round_done)?;
    a.mov(eax, c(ctl::EXEC))?;
    a.test(eax, eax)?;
    a.jz(report)?;
    a.mov(c(ctl::PHASE), 3)?;
    a.call(eax)?;
    a.cmp(eax, EXEC_MAGIC as i32)?;
    a.je(report)?;
    a.out(port::EXEC_ERROR as i32, eax)?;
    a.set_label(&mut report)?;
    a.inc(c(ctl::ROUNDS))?;
    a.mov(c(ctl::PHASE), 0)?;
    a.out(port::ROUND as i32, al)?;
    a.jmp(top)?;
    a.assemble(base + CODE)
}
