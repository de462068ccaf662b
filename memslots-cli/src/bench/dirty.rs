//! `dirty_harvest_ring_vs_bitmap_<size>_<pct>`: what one migration harvest costs with KVM's dirty
//! ring against its bitmap, on a guest of 1 GiB and 4 GiB that dirtied 1% or 50% of its pages.
//!
//! Two VMs, one per mode, each one vCPU running a 32-bit loop that writes one dword to every
//! n-th page of its slot. Each round: a pass, then the harvest, timed. The ring's cost includes
//! the reaps its vCPU needed when its ring filled during the pass (the price of the ring: the
//! bitmap has no such exits); both then hand out the same per-memory bitmaps. Measured in turns.

use std::error::Error;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};
use memslots::kvm::{Backing, DirtyRing, SlotUpdater, VcpuGate, Vm, EXIT_DIRTY_RING_FULL};
use memslots::model::{Slot, SlotFlags, SlotId, PAGE_SIZE};
use memslots_testkit::guest;

use super::harness::{interleave, median, Figure, Mode};

const GDT: u64 = 0x2000;
const CODE: u64 = 0x3000;
/// The first page written: past the GDT and code.
const FIRST: u64 = 0x1_0000;
/// `l: mov [esi], eax; add esi, edx; dec ecx; jnz l; out 0x10, al; jmp $`.
const LOOP: [u8; 11] = [
    0x89, 0x06, 0x01, 0xd6, 0x49, 0x75, 0xf9, 0xe6, 0x10, 0xeb, 0xfe,
];
const DONE_PORT: u16 = 0x10;
/// Ring per vCPU: the largest this kernel kind allows (1 MiB, 65,536 entries).
const RING_BYTES: u32 = 1 << 20;

/// One VM of the comparison.
struct Rig {
    updater: SlotUpdater,
    vcpu: VcpuFd,
    ring: Option<Arc<DirtyRing>>,
    pages: u64,
    stride: u64,
}

impl Rig {
    fn new(size: u64, stride: u64, ring: bool) -> Result<Self, Box<dyn Error>> {
        let vm = Arc::new(Vm::new()?);
        let gate = Arc::new(VcpuGate::with_signal(vmm_sys_util::signal::SIGRTMIN() + 5)?);
        let mut updater = SlotUpdater::new(vm.clone(), gate);
        let ring = if ring {
            let r = DirtyRing::enable(vm.clone(), RING_BYTES)?;
            updater.set_dirty_ring(r.clone());
            Some(r)
        } else {
            None
        };
        let mem = updater.add_backing(Backing::anonymous("guest", size)?)?;
        let gdt: Vec<u8> = guest::gdt().iter().flat_map(|d| d.to_le_bytes()).collect();
        mem.write_bytes(mem.host() + GDT, &gdt);
        mem.write_bytes(mem.host() + CODE, &LOOP);
        let slot = Slot {
            id: SlotId::new(0),
            gpa: 0,
            size,
            host: mem.host(),
            flags: SlotFlags::LOG_DIRTY_PAGES,
            guest_memfd: 0,
            guest_memfd_offset: 0,
        };
        updater.apply(&[slot.set_call()])?;
        let vcpu = vm.fd().create_vcpu(0)?;
        if let Some(r) = &ring {
            r.add_vcpu(0, &vcpu)?;
        }
        let mut sregs = vcpu.get_sregs()?;
        guest::flat_protected_mode(&mut sregs, GDT);
        vcpu.set_sregs(&sregs)?;
        Ok(Rig {
            updater,
            vcpu,
            ring,
            pages: (size - FIRST) / PAGE_SIZE / stride,
            stride,
        })
    }

    /// One pass over the pages; returns the time spent reaping a full ring on the way.
    fn pass(&mut self) -> Result<Duration, Box<dyn Error>> {
        let mut regs = self.vcpu.get_regs()?;
        regs.rip = CODE;
        regs.rflags = 2;
        regs.rsi = FIRST;
        regs.rcx = self.pages;
        regs.rdx = self.stride * PAGE_SIZE;
        regs.rax = regs.rax.wrapping_add(1);
        self.vcpu.set_regs(&regs)?;
        let mut reaping = Duration::ZERO;
        loop {
            match self.vcpu.run() {
                Ok(VcpuExit::IoOut(DONE_PORT, _)) => return Ok(reaping),
                Ok(VcpuExit::Unsupported(EXIT_DIRTY_RING_FULL)) => {
                    let ring = self.ring.as_ref().ok_or("a full ring in bitmap mode")?;
                    let t = Instant::now();
                    ring.reap()
                        .map_err(|e| format!("reaping a full ring: errno {e}"))?;
                    reaping += t.elapsed();
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Ok(exit) => return Err(format!("unexpected exit {exit:?}").into()),
                Err(e) => return Err(format!("KVM_RUN: {e}").into()),
            }
        }
    }

    /// A pass, then the harvest: the harvest's cost in ms (with the ring's reaps on the way).
    fn round(&mut self) -> Result<f64, Box<dyn Error>> {
        let reaping = self.pass()?;
        let t = Instant::now();
        let pages = self.updater.dirty_pages()?;
        let cost = reaping + t.elapsed();
        // Both modes must hand out what the guest wrote, or the figure compares nothing.
        if (pages.len() as u64) < self.pages {
            return Err(format!(
                "harvest of {} pages, {} written ({} mode)",
                pages.len(),
                self.pages,
                if self.ring.is_some() {
                    "ring"
                } else {
                    "bitmap"
                }
            )
            .into());
        }
        Ok(cost.as_secs_f64() * 1e3)
    }
}

/// The rows.
pub fn run(mode: Mode) -> Result<Vec<Figure>, Box<dyn Error>> {
    if Vm::new()?
        .fd()
        .check_extension_raw(kvm_bindings::KVM_CAP_DIRTY_LOG_RING.into())
        <= 0
    {
        eprintln!("dirty: this kernel has no dirty ring; the ring-vs-bitmap rows are left out");
        return Ok(Vec::new());
    }
    let sizes: &[(u64, &str)] = mode.pick(
        &[(64 << 20, "64mib")],
        &[(1 << 30, "1gib"), (4 << 30, "4gib")],
        &[(1 << 30, "1gib"), (4 << 30, "4gib")],
    );
    let rounds = mode.pick(1, 2, 3);
    let mut out = Vec::new();
    for &(size, size_name) in sizes {
        for (stride, pct) in [(100, "1pct"), (2, "50pct")] {
            let mut ring = Rig::new(size, stride, true)?;
            let mut bitmap = Rig::new(size, stride, false)?;
            // The first pass faults the pages in; not a harvest anyone would time.
            ring.round()?;
            bitmap.round()?;
            let mut failure = None;
            let (mut r, mut b) = interleave(
                rounds,
                || {
                    ring.round().unwrap_or_else(|e| {
                        failure.get_or_insert(e.to_string());
                        f64::NAN
                    })
                },
                || bitmap.round().unwrap_or(f64::NAN),
            );
            if let Some(e) = failure {
                return Err(e.into());
            }
            if b.iter().any(|x| x.is_nan()) {
                return Err("a bitmap-mode round failed".into());
            }
            out.push(Figure::new(
                format!("dirty_harvest_ring_vs_bitmap_{size_name}_{pct}"),
                "ms",
                median(&mut r),
                format!("dirty_harvest_bitmap_{size_name}_{pct}"),
                median(&mut b),
            ));
        }
    }
    Ok(out)
}
