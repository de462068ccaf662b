//! vCPU threads running the test guest through the gate, and what they count.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::{VcpuExit, VcpuFd};

use super::gate::{GateVcpu, VcpuGate};
use super::guest::{self, ctl, port};
use super::history::LayoutHistory;
use super::memory::Backing;

/// What the vCPUs saw, summed over all of them.
#[derive(Debug, Default)]
pub struct GuestCounters {
    /// Probe reads and writes, and calls into re-slotted code.
    pub accesses: AtomicU64,
    /// Rounds over the probe list.
    pub rounds: AtomicU64,
    /// MMIO exits or failed fetches on a GPA that every layout the vCPU may have seen maps.
    pub spurious_exits: AtomicU64,
    /// `KVM_EXIT_INTERNAL_ERROR` (and any other exit the guest never causes on purpose).
    pub internal_errors: AtomicU64,
    /// Values read other than the last one written, and wrong results from re-slotted code.
    pub data_errors: AtomicU64,
    /// MMIO exits on addresses that were legitimately unmapped (or read-only, for a write).
    pub mmio_exits: AtomicU64,
}

/// A snapshot of [`GuestCounters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestStats {
    /// See [`GuestCounters::accesses`].
    pub accesses: u64,
    /// See [`GuestCounters::rounds`].
    pub rounds: u64,
    /// See [`GuestCounters::spurious_exits`].
    pub spurious_exits: u64,
    /// See [`GuestCounters::internal_errors`].
    pub internal_errors: u64,
    /// See [`GuestCounters::data_errors`].
    pub data_errors: u64,
    /// See [`GuestCounters::mmio_exits`].
    pub mmio_exits: u64,
}

impl GuestCounters {
    /// The counts now.
    pub fn snapshot(&self) -> GuestStats {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        GuestStats {
            accesses: l(&self.accesses),
            rounds: l(&self.rounds),
            spurious_exits: l(&self.spurious_exits),
            internal_errors: l(&self.internal_errors),
            data_errors: l(&self.data_errors),
            mmio_exits: l(&self.mmio_exits),
        }
    }
}

/// What the vCPU threads share with the VM.
#[derive(Debug)]
pub struct VcpuShared {
    /// The gate they run through.
    pub gate: Arc<VcpuGate>,
    /// Set to make the threads exit.
    pub stop: AtomicBool,
    /// Layouts, for judging exits.
    pub history: Arc<LayoutHistory>,
    /// Counters.
    pub counters: GuestCounters,
    /// The first spurious exit or error, described (for reports).
    pub first_problem: Mutex<Option<String>>,
}

impl VcpuShared {
    fn problem(&self, what: String) {
        let mut first = self.first_problem.lock().unwrap_or_else(|p| p.into_inner());
        if first.is_none() {
            *first = Some(what);
        }
    }
}

fn segment(selector: u16, type_: u8) -> kvm_segment {
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

/// Puts vCPU `index` at the start of the probe loop in flat 32-bit protected mode, with the
/// private slot at `base`.
pub fn reset(vcpu: &VcpuFd, index: usize, base: u64) -> Result<(), kvm_ioctls::Error> {
    let mut sregs: kvm_sregs = vcpu.get_sregs()?;
    sregs.cs = segment(0x08, 0xb);
    let data = segment(0x10, 0x3);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt.base = base + guest::GDT;
    sregs.gdt.limit = (std::mem::size_of::<[u64; 3]>() - 1) as u16;
    sregs.cr0 = 0x11; // PE | ET; no paging
    sregs.cr4 = 0;
    sregs.efer = 0;
    vcpu.set_sregs(&sregs)?;
    let regs = kvm_regs {
        rip: base + guest::CODE,
        rflags: 0x2,
        rsp: base + guest::stack_top(index),
        rbx: base + guest::ctl_offset(index),
        rbp: index as u64 * 4,
        ..Default::default()
    };
    vcpu.set_regs(&regs)
}

/// Runs vCPU `index` until `shared.stop`. `private` is the backing of the private slot, whose
/// base GPA is `base`.
pub fn run(vcpu: VcpuFd, index: usize, base: u64, shared: Arc<VcpuShared>, private: Arc<Backing>) {
    let mut vcpu = GateVcpu::join(shared.gate.clone(), vcpu);
    let ctl_host = |off: u64| private.host() + guest::ctl_offset(index) + off;
    let c = &shared.counters;
    while !shared.stop.load(Ordering::SeqCst) {
        let entered = shared.history.gen();
        let mut needs_reset = false;
        let exit = match vcpu.run() {
            Ok(Some(exit)) => exit,
            Ok(None) => continue,
            Err(e) => {
                c.internal_errors.fetch_add(1, Ordering::Relaxed);
                shared.problem(format!("vCPU {index}: KVM_RUN failed: {e}"));
                let _ = reset(vcpu.vcpu(), index, base);
                continue;
            }
        };
        let judge = |gpa: u64, write: bool| {
            let now = shared.history.gen();
            shared
                .history
                .always_mapped(entered, now, gpa, write)
                .unwrap_or(false)
        };
        match exit {
            VcpuExit::IoOut(p, _) if p == port::ROUND => {
                let count = u64::from(private.read_u32(ctl_host(ctl::COUNT)));
                let exec = u64::from(private.read_u32(ctl_host(ctl::EXEC)) != 0);
                c.accesses.fetch_add(2 * count + exec, Ordering::Relaxed);
                c.rounds.fetch_add(1, Ordering::Relaxed);
            }
            VcpuExit::IoOut(p, data) if p == port::DATA_ERROR || p == port::EXEC_ERROR => {
                c.data_errors.fetch_add(1, Ordering::Relaxed);
                let i = private.read_u32(ctl_host(ctl::INDEX));
                shared.problem(format!(
                    "vCPU {index}: data error on port {p:#x}, probe {i}, value {data:02x?}"
                ));
            }
            VcpuExit::MmioRead(gpa, data) => {
                data.fill(guest::MMIO_READ_VALUE as u8);
                private.write_u32(ctl_host(ctl::SKIPPED), 1);
                if judge(gpa, false) {
                    c.spurious_exits.fetch_add(1, Ordering::Relaxed);
                    shared.problem(format!("vCPU {index}: spurious MMIO read at {gpa:#x}"));
                } else {
                    c.mmio_exits.fetch_add(1, Ordering::Relaxed);
                }
            }
            VcpuExit::MmioWrite(gpa, _) => {
                private.write_u32(ctl_host(ctl::SKIPPED), 1);
                if judge(gpa, true) {
                    c.spurious_exits.fetch_add(1, Ordering::Relaxed);
                    shared.problem(format!("vCPU {index}: spurious MMIO write at {gpa:#x}"));
                } else {
                    c.mmio_exits.fetch_add(1, Ordering::Relaxed);
                }
            }
            other => {
                // An instruction fetch from a GPA with no slot ends here (emulation failure).
                let what = format!("{other:?}");
                c.internal_errors.fetch_add(1, Ordering::Relaxed);
                let phase = private.read_u32(ctl_host(ctl::PHASE));
                let exec = u64::from(private.read_u32(ctl_host(ctl::EXEC)));
                if phase == 3 && exec != 0 && judge(exec, false) {
                    c.spurious_exits.fetch_add(1, Ordering::Relaxed);
                }
                shared.problem(format!(
                    "vCPU {index}: {what} (phase {phase}, exec target {exec:#x})"
                ));
                needs_reset = true;
            }
        }
        if needs_reset {
            if let Err(e) = reset(vcpu.vcpu(), index, base) {
                shared.problem(format!("vCPU {index}: cannot reset after an error: {e}"));
                break;
            }
        }
    }
}
