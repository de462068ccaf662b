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
//!
//! Each round also does what real guests do to devices, over a *device window* of two pages at
//! the private window's base that no slot ever maps: a `rep movsd` from it and into it and a
//! page-split dword read and write (all crossing its page boundary, so KVM splits them over
//! several MMIO exits), and a `rep insb` and `rep outsb` of 48 bytes across a RAM page boundary
//! (several PIO exits). The host answers every byte with [`device_byte`] of its address (or
//! stream position) and checks every byte written against [`device_write_byte`]; the guest checks
//! what it read the same way. An exit lost or completed with stale data is a data error on one
//! side or the other. vCPU 0 can also request a layout change each round ([`port::UPDATE`]).

use iced_x86::code_asm::*;
use iced_x86::IcedError;
use kvm_bindings::{kvm_segment, kvm_sregs};

/// Size of the private window (the device window, then the private slot).
pub const PRIVATE_SIZE: u64 = 2 << 20;
/// Offset of the device window: never mapped, answered by the host as MMIO.
pub const DEVICE: u64 = 0;
/// Size of the device window (two pages: accesses cross the boundary between them).
pub const DEVICE_SIZE: u64 = 0x2000;
/// Offset of the private slot (the rest of the window).
pub const SLOT: u64 = DEVICE + DEVICE_SIZE;
/// GDT offset.
pub const GDT: u64 = 0x2000;
/// Code offset.
pub const CODE: u64 = 0x3000;
/// Offset of the per-vCPU device buffers (two pages each).
pub const BUFFERS: u64 = 0x8_0000;
/// Size of one vCPU's device buffer.
pub const BUFFER_SIZE: u64 = 0x2000;
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
    /// What the guest is doing: 1 read, 2 write, 3 exec, 4 device accesses, 0 between.
    pub const PHASE: u64 = 0x18;
    /// Non-zero: make the device accesses each round.
    pub const DEVICE: u64 = 0x1c;
    /// GPA of this vCPU's device buffer.
    pub const BUF: u64 = 0x20;
    /// Non-zero: request a layout change ([`super::port::UPDATE`]) each round.
    pub const TRIGGER: u64 = 0x24;
    /// Probes: `[gpa: u32, cell: u32]` each.
    pub const PROBES: u64 = 0x40;
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
    /// A byte the guest read from the device was wrong (the dword written: its address or
    /// stream position).
    pub const DEVICE_ERROR: u16 = 0x13;
    /// The round's device accesses are done: the host checks it received every byte.
    pub const DEVICE_DONE: u16 = 0x14;
    /// `rep insb` source: byte `k` of a round's stream is [`super::device_byte`]`(PIO_IN + k)`.
    pub const STRING_IN: u16 = 0x15;
    /// `rep outsb` sink: byte `k` must be [`super::device_write_byte`]`(PIO_OUT + k)`.
    pub const STRING_OUT: u16 = 0x16;
    /// vCPU 0 asks for the next layout change.
    pub const UPDATE: u16 = 0x17;
}

/// Stream position base of [`port::STRING_IN`] bytes.
pub const PIO_IN: u32 = 0x100;
/// Stream position base of [`port::STRING_OUT`] bytes.
pub const PIO_OUT: u32 = 0x200;
/// Bytes of each string PIO per round.
pub const PIO_BYTES: u32 = 48;
/// Bytes the guest writes to the device window per round (a 16-byte `rep movsd`, a dword).
pub const MMIO_WRITE_BYTES: u32 = 20;

/// What the device answers for byte `x` (an MMIO address, or a PIO stream position): different
/// for neighbouring addresses, so stale data from another exit shows.
pub fn device_byte(x: u32) -> u8 {
    ((x ^ (x >> 8)) as u8) ^ 0xa5
}

/// What the guest writes to byte `x` of the device.
pub fn device_write_byte(x: u32) -> u8 {
    device_byte(x) ^ 0x3c
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

fn flat_segment(selector: u16, type_: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Puts `sregs` in flat 32-bit protected mode, no paging, with [`gdt`] at `gdt_base`: code
/// selector 0x08, data 0x10.
pub fn flat_protected_mode(sregs: &mut kvm_sregs, gdt_base: u64) {
    sregs.cs = flat_segment(0x08, 0xb);
    let data = flat_segment(0x10, 0x3);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt.base = gdt_base;
    sregs.gdt.limit = (std::mem::size_of::<[u64; 3]>() - 1) as u16;
    sregs.cr0 = 0x11; // PE | ET; no paging
    sregs.cr4 = 0;
    sregs.efer = 0;
}

/// Offset of vCPU `index`'s control block.
pub fn ctl_offset(index: usize) -> u64 {
    CTL + index as u64 * CTL_SIZE
}

/// Offset of vCPU `index`'s initial stack pointer (top of its control block).
pub fn stack_top(index: usize) -> u64 {
    ctl_offset(index) + CTL_SIZE
}

/// GPA of vCPU `index`'s device buffer, with the window at `base`.
pub fn buffer(base: u64, index: usize) -> u64 {
    base + BUFFERS + index as u64 * BUFFER_SIZE
}

/// Assembles the probe loop to run at `base + CODE`. Entry state: EBX = control block, EBP =
/// this vCPU's byte offset inside each probe page, ESP = stack.
pub fn code(base: u64) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(32)?;
    let mut verify = a.create_label();
    let mut fill = a.create_label();
    let mut after_device = a.create_label();
    let mut no_trigger = a.create_label();
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
    device_accesses(&mut a, base, &mut verify, &mut fill, &mut after_device)?;
    a.inc(c(ctl::ROUNDS))?;
    a.mov(c(ctl::PHASE), 0)?;
    a.out(port::ROUND as i32, al)?;
    a.cmp(c(ctl::TRIGGER), 0)?;
    a.je(no_trigger)?;
    a.out(port::UPDATE as i32, al)?;
    a.set_label(&mut no_trigger)?;
    a.jmp(top)?;
    subroutines(&mut a, &mut verify, &mut fill)?;
    a.assemble(base + CODE)
}

/// The round's device accesses (when [`ctl::DEVICE`] is set). Clobbers EAX, ECX, EDX, ESI, EDI.
fn device_accesses(
    a: &mut CodeAssembler,
    base: u64,
    verify: &mut CodeLabel,
    fill: &mut CodeLabel,
    after: &mut CodeLabel,
) -> Result<(), IcedError> {
    let c = |off: u64| dword_ptr(ebx + off as i32);
    let window = (base + DEVICE) as u32;
    // 16 bytes straddling the window's page boundary, and a dword straddling it.
    let span = window + 0xff8;
    let split = window + 0xffe;
    let buf_span = 0xff8;
    let buf_pio = 0x1000 - PIO_BYTES / 2;
    a.cmp(c(ctl::DEVICE), 0)?;
    a.je(*after)?;
    a.mov(c(ctl::PHASE), 4)?;
    a.cld()?;
    // String read from MMIO into RAM, then check.
    a.mov(esi, span)?;
    a.mov(edi, c(ctl::BUF))?;
    a.add(edi, buf_span)?;
    a.mov(ecx, 4)?;
    a.rep().movsd()?;
    a.mov(esi, c(ctl::BUF))?;
    a.add(esi, buf_span)?;
    a.mov(edi, span)?;
    a.mov(ecx, 16)?;
    a.call(*verify)?;
    // Split read.
    a.mov(eax, dword_ptr(split))?;
    a.mov(esi, c(ctl::BUF))?;
    a.mov(dword_ptr(esi), eax)?;
    a.mov(edi, split)?;
    a.mov(ecx, 4)?;
    a.call(*verify)?;
    // String write from RAM into MMIO.
    a.mov(edi, c(ctl::BUF))?;
    a.add(edi, buf_span)?;
    a.mov(edx, span)?;
    a.mov(ecx, 16)?;
    a.call(*fill)?;
    a.mov(esi, c(ctl::BUF))?;
    a.add(esi, buf_span)?;
    a.mov(edi, span)?;
    a.mov(ecx, 4)?;
    a.rep().movsd()?;
    // Split write.
    a.mov(edi, c(ctl::BUF))?;
    a.mov(edx, split)?;
    a.mov(ecx, 4)?;
    a.call(*fill)?;
    a.mov(esi, c(ctl::BUF))?;
    a.mov(eax, dword_ptr(esi))?;
    a.mov(dword_ptr(split), eax)?;
    // String PIO in, across a RAM page boundary, then check.
    a.mov(dx, port::STRING_IN as u32)?;
    a.mov(edi, c(ctl::BUF))?;
    a.add(edi, buf_pio)?;
    a.mov(ecx, PIO_BYTES)?;
    a.rep().insb()?;
    a.mov(esi, c(ctl::BUF))?;
    a.add(esi, buf_pio)?;
    a.mov(edi, PIO_IN)?;
    a.mov(ecx, PIO_BYTES)?;
    a.call(*verify)?;
    // String PIO out.
    a.mov(edi, c(ctl::BUF))?;
    a.add(edi, buf_pio)?;
    a.mov(edx, PIO_OUT)?;
    a.mov(ecx, PIO_BYTES)?;
    a.call(*fill)?;
    a.mov(dx, port::STRING_OUT as u32)?;
    a.mov(esi, c(ctl::BUF))?;
    a.add(esi, buf_pio)?;
    a.mov(ecx, PIO_BYTES)?;
    a.rep().outsb()?;
    a.out(port::DEVICE_DONE as i32, al)?;
    a.set_label(after)?;
    Ok(())
}

/// `verify` (ESI = bytes, EDI = first x, ECX = count: reports each byte other than
/// [`device_byte`] on [`port::DEVICE_ERROR`]) and `fill` (EDI = bytes, EDX = first x, ECX = count:
/// writes [`device_write_byte`]). Both clobber EAX, ECX and advance their pointers.
fn subroutines(
    a: &mut CodeAssembler,
    verify: &mut CodeLabel,
    fill: &mut CodeLabel,
) -> Result<(), IcedError> {
    let mut vok = a.create_label();
    a.set_label(verify)?;
    a.mov(eax, edi)?;
    a.shr(eax, 8)?;
    a.xor(eax, edi)?;
    a.xor(al, 0xa5)?;
    a.cmp(al, byte_ptr(esi))?;
    a.je(vok)?;
    a.mov(eax, edi)?;
    a.out(port::DEVICE_ERROR as i32, eax)?;
    a.set_label(&mut vok)?;
    a.inc(esi)?;
    a.inc(edi)?;
    a.dec(ecx)?;
    a.jnz(*verify)?;
    a.ret()?;
    a.set_label(fill)?;
    a.mov(eax, edx)?;
    a.shr(eax, 8)?;
    a.xor(eax, edx)?;
    a.xor(al, 0xa5 ^ 0x3c)?;
    a.mov(byte_ptr(edi), al)?;
    a.inc(edi)?;
    a.inc(edx)?;
    a.dec(ecx)?;
    a.jnz(*fill)?;
    a.ret()
}
