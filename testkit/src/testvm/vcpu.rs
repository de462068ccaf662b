//! vCPU threads running the test guest through the gate, and what they count.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_regs, kvm_sregs};
use kvm_ioctls::{VcpuExit, VcpuFd};

use memslots::kvm::{Backing, DirtyRing, GateVcpu, SlotUpdater, VcpuGate};

use super::history::LayoutHistory;
use crate::guest::{self, ctl, port};

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

/// A layout change for vCPU 0's thread to make when the guest asks for one.
pub type Job = Box<dyn FnOnce(&mut SlotUpdater) + Send>;

/// What the vCPU threads share with the VM.
pub struct VcpuShared {
    /// The gate they run through.
    pub gate: Arc<VcpuGate>,
    /// The updater, for guest-requested changes.
    pub updater: Arc<Mutex<SlotUpdater>>,
    /// The next guest-requested change, made on vCPU 0's thread when it exits on
    /// [`port::UPDATE`].
    pub job: Mutex<Option<Job>>,
    /// Set to make the threads exit.
    pub stop: AtomicBool,
    /// Layouts, for judging exits.
    pub history: Arc<LayoutHistory>,
    /// Counters.
    pub counters: GuestCounters,
    /// The first spurious exit or error, described (for reports).
    pub first_problem: Mutex<Option<String>>,
    /// The bug the gate once had, on purpose: while a quiesce holds, complete each MMIO/PIO exit
    /// with one `KVM_RUN` (`immediate_exit = 1`) and throw away what that entry returns.
    pub drop_exits_on_quiesce: bool,
    /// The VM's dirty ring, reaped by a vCPU whose ring is full.
    pub ring: Option<Arc<DirtyRing>>,
}

impl std::fmt::Debug for VcpuShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuShared")
            .field("gate", &self.gate)
            .field("stop", &self.stop)
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl VcpuShared {
    fn problem(&self, what: String) {
        let mut first = self.first_problem.lock().unwrap_or_else(|p| p.into_inner());
        if first.is_none() {
            *first = Some(what);
        }
    }

    fn data_error(&self, what: String) {
        self.counters.data_errors.fetch_add(1, Ordering::Relaxed);
        self.problem(what);
    }
}

/// What the host expects of one vCPU's device accesses in the current round.
#[derive(Debug, Default)]
struct DeviceRound {
    pio_in: u32,
    pio_out: u32,
    mmio_written: u32,
}

/// Puts vCPU `index` at the start of the probe loop in flat 32-bit protected mode, with the
/// private slot at `base`.
pub fn reset(vcpu: &VcpuFd, index: usize, base: u64) -> Result<(), kvm_ioctls::Error> {
    let mut sregs: kvm_sregs = vcpu.get_sregs()?;
    guest::flat_protected_mode(&mut sregs, base + guest::GDT);
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

/// Runs vCPU `index` until `shared.stop`, with the private window at `base`; `private` backs it.
pub fn run(vcpu: VcpuFd, index: usize, base: u64, shared: Arc<VcpuShared>, private: Arc<Backing>) {
    let mut vcpu = match GateVcpu::new(&shared.gate, index, vcpu) {
        Ok(mut v) => {
            if let Some(ring) = &shared.ring {
                v.set_dirty_ring(ring.clone());
            }
            v
        }
        Err(e) => {
            shared
                .counters
                .internal_errors
                .fetch_add(1, Ordering::Relaxed);
            shared.problem(format!("vCPU {index}: cannot register with the gate: {e}"));
            return;
        }
    };
    let ctl_host = |off: u64| private.host() + guest::ctl_offset(index) + off;
    let device = base + guest::DEVICE..base + guest::DEVICE + guest::DEVICE_SIZE;
    let c = &shared.counters;
    let mut round = DeviceRound::default();
    while !shared.stop.load(Ordering::SeqCst) {
        let entered = shared.history.gen();
        let mut needs_reset = false;
        let mut completes = false;
        let exit = match vcpu.run() {
            Ok(Some(exit)) => exit,
            Ok(None) => continue,
            Err(e) => {
                c.internal_errors.fetch_add(1, Ordering::Relaxed);
                shared.problem(format!("vCPU {index}: KVM_RUN failed: {e}"));
                round = DeviceRound::default();
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
                let i = private.read_u32(ctl_host(ctl::INDEX));
                shared.data_error(format!(
                    "vCPU {index}: data error on port {p:#x}, probe {i}, value {data:02x?}"
                ));
            }
            VcpuExit::IoOut(p, data) if p == port::DEVICE_ERROR => {
                shared.data_error(format!(
                    "vCPU {index}: the guest read a wrong device byte at {:#x}",
                    u32::from_le_bytes(data.try_into().unwrap_or([0; 4]))
                ));
            }
            VcpuExit::IoOut(p, _) if p == port::DEVICE_DONE => {
                let want = (guest::PIO_BYTES, guest::PIO_BYTES, guest::MMIO_WRITE_BYTES);
                let got = (round.pio_in, round.pio_out, round.mmio_written);
                if got != want {
                    shared.data_error(format!(
                        "vCPU {index}: device bytes (in, out, MMIO written) {got:?}, not {want:?}"
                    ));
                }
                round = DeviceRound::default();
                // Two string and two split MMIO accesses, two string PIO accesses.
                c.accesses.fetch_add(6, Ordering::Relaxed);
            }
            VcpuExit::IoIn(p, data) if p == port::STRING_IN => {
                for (k, b) in data.iter_mut().enumerate() {
                    *b = guest::device_byte(guest::PIO_IN + round.pio_in + k as u32);
                }
                round.pio_in += data.len() as u32;
                completes = true;
            }
            VcpuExit::IoOut(p, data) if p == port::STRING_OUT => {
                let at = guest::PIO_OUT + round.pio_out;
                if let Some(k) = wrong_byte(data, at) {
                    shared.data_error(format!(
                        "vCPU {index}: rep outsb byte {k} of the round is {:#04x}",
                        data[(k - at) as usize]
                    ));
                }
                round.pio_out += data.len() as u32;
                completes = true;
            }
            VcpuExit::IoOut(p, _) if p == port::UPDATE => {
                let job = shared.job.lock().unwrap_or_else(|p| p.into_inner()).take();
                if let Some(job) = job {
                    let mut updater = shared.updater.lock().unwrap_or_else(|p| p.into_inner());
                    job(&mut updater);
                }
            }
            VcpuExit::MmioRead(gpa, data) if device.contains(&gpa) => {
                for (k, b) in data.iter_mut().enumerate() {
                    *b = guest::device_byte((gpa + k as u64) as u32);
                }
                completes = true;
            }
            VcpuExit::MmioWrite(gpa, data) if device.contains(&gpa) => {
                if let Some(x) = wrong_byte(data, gpa as u32) {
                    shared.data_error(format!(
                        "vCPU {index}: MMIO write of {:#04x} at {x:#x}",
                        data[(x - gpa as u32) as usize]
                    ));
                }
                round.mmio_written += data.len() as u32;
                completes = true;
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
                completes = true;
            }
            VcpuExit::MmioWrite(gpa, _) => {
                private.write_u32(ctl_host(ctl::SKIPPED), 1);
                if judge(gpa, true) {
                    c.spurious_exits.fetch_add(1, Ordering::Relaxed);
                    shared.problem(format!("vCPU {index}: spurious MMIO write at {gpa:#x}"));
                } else {
                    c.mmio_exits.fetch_add(1, Ordering::Relaxed);
                }
                completes = true;
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
        if completes && shared.drop_exits_on_quiesce && shared.gate.is_inhibited() {
            // The old gate's completing entry: whatever it returns is lost.
            let fd = vcpu.vcpu_mut();
            fd.set_kvm_immediate_exit(1);
            let _ = fd.run();
            fd.set_kvm_immediate_exit(0);
        }
        if needs_reset {
            round = DeviceRound::default();
            if let Err(e) = reset(vcpu.vcpu(), index, base) {
                shared.problem(format!("vCPU {index}: cannot reset after an error: {e}"));
                break;
            }
        }
    }
}

/// The first device position (from `at`) whose byte in `data` is not what the guest writes.
fn wrong_byte(data: &[u8], at: u32) -> Option<u32> {
    (0..data.len() as u32)
        .find(|&k| data[k as usize] != guest::device_write_byte(at + k))
        .map(|k| at + k)
}
