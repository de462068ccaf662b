//! A VM running the test guest on vCPU threads, and the atomic apply of a batch to it.

use std::collections::BTreeSet;
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::model::{Applied, BatchError, Change, Layout, Slot, SlotCall, SlotFlags, SlotId};

use super::dirty::DirtyLog;
use super::gate::{QuiesceTimes, VcpuGate};
use super::guest::{self, ctl};
use super::history::LayoutHistory;
use super::memory::{Backing, HostMemory};
use super::slots::{FaultInjector, SlotCallError, SlotTable};
use super::vcpu::{self, GuestStats, VcpuShared};
use super::vm::{KvmError, Vm};

/// How a batch is applied.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum Strategy {
    /// Only the calls from the first that opens a hole to the last that closes one (and dirty
    /// logging slots' last collection and removal) run with vCPUs held out; dirty bits are
    /// collected before the hold and again inside it.
    Atomic,
    /// QEMU 8.0: the net change as all DELETEs then all CREATEs; every vCPU held out for the whole
    /// batch when a deleted range overlaps an added one; dirty bits collected before each DELETE
    /// with vCPUs running ("best effort").
    Qemu,
    /// The calls in order, nobody held out, no dirty bits collected: the bug, on purpose.
    Naive,
}

impl Strategy {
    /// The name used on the command line and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Atomic => "atomic",
            Strategy::Qemu => "qemu",
            Strategy::Naive => "naive",
        }
    }
}

/// What one applied batch cost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    /// Slot ioctls made (rollback included).
    pub ioctls: u64,
    /// Of those, made with vCPUs held out.
    pub quiesced_ioctls: u64,
    /// Kick-to-parked and blackout of the quiesce, if there was one.
    pub quiesce: Option<QuiesceTimes>,
    /// Wall time of the whole apply.
    pub update: Duration,
    /// Whether a failure was rolled back.
    pub rolled_back: bool,
}

/// Why a batch was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The model refuses the batch: nothing was sent to the kernel.
    #[error("the batch is refused by the model")]
    Invalid(#[source] BatchError),
    /// A call failed in the kernel; everything done before it was undone.
    #[error("call {index} failed; the batch was rolled back")]
    RolledBack {
        /// Index of the failed call (in the batch as the strategy ordered it).
        index: usize,
        /// The failure.
        #[source]
        source: Box<SlotCallError>,
        /// What the attempt and the rollback cost.
        stats: Box<ApplyStats>,
    },
    /// Undoing a failed batch failed too: the layout is the model's, but not the old one.
    #[error("rolling back after call {index} failed")]
    RollbackFailed {
        /// Index of the call whose failure started the rollback.
        index: usize,
        /// The rollback failure.
        #[source]
        source: Box<SlotCallError>,
    },
}

/// Errors creating a [`TestVm`].
#[derive(Debug, thiserror::Error)]
pub enum TestVmError {
    /// `/dev/kvm` or the VM.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// Host memory.
    #[error("cannot map host memory")]
    Memory(#[source] vm_memory::mmap::MmapRegionError),
    /// A vCPU could not be created or set up.
    #[error("vCPU {index}")]
    Vcpu {
        /// Which vCPU.
        index: usize,
        /// The cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The guest could not be assembled.
    #[error("assembling the test guest: {0}")]
    Assemble(String),
    /// The private slot was refused.
    #[error("creating the private slot")]
    PrivateSlot(#[source] SlotCallError),
    /// A bad configuration.
    #[error("{0}")]
    Config(String),
}

/// What a [`TestVm`] is made of.
#[derive(Clone, Copy, Debug)]
pub struct TestVmConfig {
    /// Number of vCPUs.
    pub vcpus: usize,
    /// Bytes of the arena: the host memory workloads map.
    pub arena_size: u64,
    /// Base GPA of the guest's private slot ([`guest::PRIVATE_SIZE`] bytes, below 4 GiB, 2 MiB
    /// aligned); workloads must leave it alone.
    pub private_gpa: u64,
}

impl TestVmConfig {
    /// `vcpus` vCPUs, an arena of `arena_size` bytes, the private slot at GPA 0.
    pub fn new(vcpus: usize, arena_size: u64) -> Self {
        TestVmConfig {
            vcpus,
            arena_size,
            private_gpa: 0,
        }
    }
}

/// A VM running the embedded test guest, with its host memory, slots, gate and counters.
#[derive(Debug)]
pub struct TestVm {
    vm: Arc<Vm>,
    memory: HostMemory,
    slots: SlotTable,
    shared: Arc<VcpuShared>,
    vcpus: Vec<kvm_ioctls::VcpuFd>,
    threads: Vec<JoinHandle<()>>,
    dirty: DirtyLog,
    private: Arc<Backing>,
    arena: Arc<Backing>,
    device: GuestMemoryAtomic<GuestMemoryMmap>,
    published: Mutex<u64>,
    private_gpa: u64,
}

impl TestVm {
    /// Creates the VM, its memory, the private slot and the vCPUs (not yet running).
    pub fn new(config: TestVmConfig) -> Result<Self, TestVmError> {
        let base = config.private_gpa;
        if base % guest::PRIVATE_SIZE != 0 || base + guest::PRIVATE_SIZE > 1 << 32 {
            return Err(TestVmError::Config(format!(
                "the private slot at {base:#x} must be 2 MiB aligned and below 4 GiB"
            )));
        }
        if config.vcpus == 0 || config.vcpus > guest::MAX_VCPUS {
            return Err(TestVmError::Config(format!(
                "vCPUs must be 1 to {}, not {}",
                guest::MAX_VCPUS,
                config.vcpus
            )));
        }
        let vm = Arc::new(Vm::new()?);
        let mut memory = HostMemory::default();
        let private = memory
            .add(Backing::anonymous("private", guest::PRIVATE_SIZE).map_err(TestVmError::Memory)?);
        let arena = memory
            .add(Backing::anonymous("arena", config.arena_size).map_err(TestVmError::Memory)?);
        let code = guest::code(base).map_err(|e| TestVmError::Assemble(e.to_string()))?;
        private.write_bytes(private.host() + guest::CODE, &code);
        let gdt: Vec<u8> = guest::gdt().iter().flat_map(|d| d.to_le_bytes()).collect();
        private.write_bytes(private.host() + guest::GDT, &gdt);
        let mut slots = SlotTable::new(vm.clone());
        let private_slot = Slot {
            // The highest id, so that workloads and traces keep the low ones.
            id: SlotId::new(vm.limits().slots - 1),
            gpa: base,
            size: guest::PRIVATE_SIZE,
            host: private.host(),
            flags: SlotFlags::NONE,
        };
        slots
            .call(&memory, &private_slot.set_call())
            .map_err(TestVmError::PrivateSlot)?;
        let mut vcpus = Vec::new();
        for index in 0..config.vcpus {
            let vcpu = vm
                .fd()
                .create_vcpu(index as u64)
                .map_err(|source| TestVmError::Vcpu { index, source })?;
            vcpu::reset(&vcpu, index, base)
                .map_err(|source| TestVmError::Vcpu { index, source })?;
            vcpus.push(vcpu);
        }
        let shared = Arc::new(VcpuShared {
            gate: Arc::new(VcpuGate::new()),
            stop: Default::default(),
            history: LayoutHistory::new(slots.layout().clone()),
            counters: Default::default(),
            first_problem: Default::default(),
        });
        let device = GuestMemoryAtomic::new(GuestMemoryMmap::default());
        let vm = TestVm {
            vm,
            memory,
            slots,
            shared,
            vcpus,
            threads: Vec::new(),
            dirty: DirtyLog::default(),
            private,
            arena,
            device,
            published: Mutex::new(0),
            private_gpa: base,
        };
        vm.publish();
        Ok(vm)
    }

    /// Host address of the arena's first byte.
    pub fn arena_host(&self) -> u64 {
        self.arena.host()
    }

    /// The arena backing.
    pub fn arena(&self) -> &Backing {
        &self.arena
    }

    /// The layout (equal to the kernel's).
    pub fn layout(&self) -> &Layout {
        self.slots.layout()
    }

    /// The gate the vCPUs run through.
    pub fn gate(&self) -> &VcpuGate {
        &self.shared.gate
    }

    /// The device-side view of guest memory (address space 0), published with every batch.
    pub fn device_memory(&self) -> &GuestMemoryAtomic<GuestMemoryMmap> {
        &self.device
    }

    /// Sets (or clears) fault injection on slot calls.
    pub fn inject_faults(&mut self, injector: Option<FaultInjector>) {
        self.slots.inject(injector);
    }

    /// Slot ioctls made so far.
    pub fn ioctls(&self) -> u64 {
        self.slots.ioctls()
    }

    /// What the vCPUs counted so far.
    pub fn guest_stats(&self) -> GuestStats {
        self.shared.counters.snapshot()
    }

    /// The first spurious exit, internal error or data error, described.
    pub fn first_problem(&self) -> Option<String> {
        self.shared
            .first_problem
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Starts the vCPUs on `probes` (`(gpa, host)`: each page the guest reads and writes, and the
    /// arena host page behind it whenever it is mapped) and, if given, the `(gpa, host)` of a
    /// function to call each round from a re-slotted range.
    pub fn start(
        &mut self,
        probes: &[(u64, u64)],
        exec: Option<(u64, u64)>,
    ) -> Result<(), TestVmError> {
        if probes.len() > ctl::MAX_PROBES {
            return Err(TestVmError::Config(format!(
                "at most {} probes, not {}",
                ctl::MAX_PROBES,
                probes.len()
            )));
        }
        let arena = self.arena.clone();
        for &(gpa, host) in probes {
            if !arena.holds(host, guest::MAX_VCPUS as u64 * 4)
                || (host - arena.host()) / 4096 >= ctl::MAX_CELLS as u64
                || gpa > u64::from(u32::MAX)
            {
                return Err(TestVmError::Config(format!(
                    "probe {gpa:#x} -> {host:#x} is outside the arena"
                )));
            }
        }
        if let Some((_, host)) = exec {
            arena.write_bytes(host, &guest::exec_function());
        }
        for index in 0..self.vcpus.len() {
            let base = self.private.host() + guest::ctl_offset(index);
            for (i, &(gpa, host)) in probes.iter().enumerate() {
                let at = base + ctl::PROBES + i as u64 * 8;
                self.private.write_u32(at, gpa as u32);
                self.private
                    .write_u32(at + 4, ((host - arena.host()) / 4096) as u32);
            }
            self.private
                .write_u32(base + ctl::EXEC, exec.map_or(0, |e| e.0 as u32));
            self.private
                .write_u32(base + ctl::COUNT, probes.len() as u32);
        }
        for (index, vcpu) in self.vcpus.drain(..).enumerate() {
            let shared = self.shared.clone();
            let private = self.private.clone();
            let base = self.private_gpa;
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || vcpu::run(vcpu, index, base, shared, private))
                .map_err(|e| TestVmError::Config(format!("spawning vCPU thread: {e}")))?;
            self.threads.push(handle);
        }
        Ok(())
    }

    /// Reads (and clears) the dirty bits of every logging slot, and returns and clears every
    /// dirty host page collected since the last call, whatever slot it was in then.
    pub fn dirty_pages(&mut self) -> BTreeSet<u64> {
        let logging: Vec<Slot> = self
            .layout()
            .slots()
            .filter(|s| s.flags.log_dirty())
            .copied()
            .collect();
        for slot in &logging {
            // A slot the layout has logs dirty pages in the kernel too: this cannot fail.
            let _ = self.dirty.collect(&self.vm, slot);
        }
        self.dirty.take()
    }

    /// Runs `f` with every vCPU parked (for checks that must not race the guest).
    pub fn with_vcpus_parked<R>(&mut self, f: impl FnOnce(&mut Self) -> R) -> R {
        let gate = self.shared.gate.clone();
        let held = gate.quiesce();
        let result = f(self);
        drop(held);
        result
    }

    /// Builds the device-side view from the layout and swaps it in.
    fn publish(&self) {
        let mut regions = Vec::new();
        for slot in self.slots.layout().slots_by_gpa(0) {
            let prot = if slot.flags.readonly() {
                libc::PROT_READ
            } else {
                libc::PROT_READ | libc::PROT_WRITE
            };
            let backing = self
                .memory
                .owner(slot.host, slot.size)
                .expect("slots only map owned memory");
            // SAFETY: the range lies inside `backing`, which lives as long as this VM and so as
            // long as any view built here (views are dropped with `self.device`).
            let region = unsafe {
                MmapRegion::build_raw(
                    backing.ptr(slot.host),
                    slot.size as usize,
                    prot,
                    libc::MAP_SHARED,
                )
            };
            if let Some(region) = region
                .ok()
                .and_then(|r| GuestRegionMmap::new(r, GuestAddress(slot.gpa)))
            {
                regions.push(region);
            }
        }
        if let Ok(map) = GuestMemoryMmap::from_regions(regions) {
            if let Ok(guard) = self.device.lock() {
                guard.replace(map);
            }
            *self.published.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        }
    }

    /// Applies `calls` as one update with `strategy`. On failure everything is undone.
    pub fn apply(
        &mut self,
        calls: &[SlotCall],
        strategy: Strategy,
    ) -> Result<ApplyStats, ApplyError> {
        let start = Instant::now();
        let ioctls_before = self.slots.ioctls();
        let before = self.slots.layout().clone();
        let mut target = before.clone();
        target.apply_batch(calls).map_err(ApplyError::Invalid)?;
        let calls: Vec<SlotCall> = match strategy {
            Strategy::Qemu => qemu_batch(&before, &target),
            _ => calls.to_vec(),
        };
        let done = self
            .slots
            .layout_mut()
            .check_batch(&calls)
            .map_err(ApplyError::Invalid)?;
        let window = match strategy {
            Strategy::Atomic => {
                let holes = self
                    .slots
                    .layout_mut()
                    .holes(&calls)
                    .map_err(ApplyError::Invalid)?;
                let mut w = holes.quiesce_window();
                for (i, a) in done.iter().enumerate() {
                    if loses_dirty_bits(a) {
                        w = if w.is_empty() {
                            i..i + 1
                        } else {
                            w.start.min(i)..w.end.max(i + 1)
                        };
                    }
                }
                w
            }
            Strategy::Qemu if qemu_inhibits(&done) => 0..calls.len(),
            _ => 0..0,
        };
        // Atomic: a first collection with vCPUs running keeps the one inside the hold short.
        if strategy == Strategy::Atomic {
            for a in done.iter().filter(|a| loses_dirty_bits(a)) {
                let slot = a.before.expect("a change that loses bits has an old slot");
                let _ = self.dirty.collect(&self.vm, &slot);
            }
        }
        self.shared.history.begin(target);
        let result = self.run_calls(&calls, &done, window, strategy);
        self.shared.history.end(self.slots.layout());
        let (failure, quiesce, quiesced_ioctls) = result;
        let mut stats = ApplyStats {
            ioctls: self.slots.ioctls() - ioctls_before,
            quiesced_ioctls,
            quiesce,
            update: start.elapsed(),
            rolled_back: false,
        };
        match failure {
            None => Ok(stats),
            Some(Ok((index, source))) => {
                stats.rolled_back = true;
                Err(ApplyError::RolledBack {
                    index,
                    source: Box::new(source),
                    stats: Box::new(stats),
                })
            }
            Some(Err((index, source))) => Err(ApplyError::RollbackFailed {
                index,
                source: Box::new(source),
            }),
        }
    }

    /// Makes the calls, holding vCPUs out for `window`; on a failure undoes what was done.
    #[allow(clippy::type_complexity)]
    fn run_calls(
        &mut self,
        calls: &[SlotCall],
        preview: &[Applied],
        window: Range<usize>,
        strategy: Strategy,
    ) -> (
        Option<Result<(usize, SlotCallError), (usize, SlotCallError)>>,
        Option<QuiesceTimes>,
        u64,
    ) {
        let gate = self.shared.gate.clone();
        let mut held = None;
        let mut times = None;
        let mut quiesced_ioctls = 0;
        let mut done: Vec<Applied> = Vec::with_capacity(calls.len());
        for (i, call) in calls.iter().enumerate() {
            if i == window.start && !window.is_empty() {
                held = Some(gate.quiesce());
            }
            if strategy != Strategy::Naive && loses_dirty_bits(&preview[i]) {
                let slot = preview[i].before.expect("has an old slot");
                let _ = self.dirty.collect(&self.vm, &slot);
            }
            let ioctls = self.slots.ioctls();
            let result = self.slots.call(&self.memory, call);
            if held.is_some() {
                quiesced_ioctls += self.slots.ioctls() - ioctls;
            }
            match result {
                Ok(applied) => done.push(applied),
                Err(source) => {
                    // Undo with vCPUs held out, so the rollback opens no visible hole either.
                    let hold = held.take().unwrap_or_else(|| gate.quiesce());
                    for a in done.iter().rev() {
                        if a.after.is_some_and(|s| s.flags.log_dirty()) {
                            let _ = self.dirty.collect(&self.vm, &a.after.expect("checked"));
                        }
                        let undo = inverse(a);
                        let before = self.slots.ioctls();
                        if let Err(e) = self.slots.call_uninjected(&self.memory, &undo) {
                            self.publish();
                            hold.resume();
                            return (Some(Err((i, e))), None, quiesced_ioctls);
                        }
                        quiesced_ioctls += self.slots.ioctls() - before;
                    }
                    self.publish();
                    times = Some(hold.resume());
                    return (Some(Ok((i, source))), times, quiesced_ioctls);
                }
            }
            if held.is_some() && i + 1 == window.end {
                self.publish();
                times = held.take().map(|h| h.resume());
            }
        }
        if window.is_empty() {
            self.publish();
        }
        (None, times, quiesced_ioctls)
    }
}

/// Whether a change drops the slot's dirty bitmap (or might: a MOVE is treated alike).
fn loses_dirty_bits(a: &Applied) -> bool {
    let Some(old) = a.before else { return false };
    old.flags.log_dirty()
        && match a.change {
            Change::Delete | Change::Move => true,
            Change::FlagsOnly => !a.after.is_some_and(|s| s.flags.log_dirty()),
            _ => false,
        }
}

/// The call that undoes an accepted call.
fn inverse(a: &Applied) -> SlotCall {
    match (a.before, a.after) {
        (Some(old), _) => old.set_call(),
        (None, Some(new)) => new.delete_call(),
        (None, None) => unreachable!("an accepted call has a slot before or after"),
    }
}

/// QEMU's listener: every slot that changed is deleted, then every new one created; a slot whose
/// only change is dirty logging is re-issued in place.
pub fn qemu_batch(before: &Layout, after: &Layout) -> Vec<SlotCall> {
    let same_but_logging = |a: &Slot, b: &Slot| {
        a.gpa == b.gpa
            && a.size == b.size
            && a.host == b.host
            && a.flags.readonly() == b.flags.readonly()
    };
    let mut deletes = Vec::new();
    let mut flags = Vec::new();
    let mut creates = Vec::new();
    for old in before.slots() {
        match after.slot(old.id) {
            Some(new) if new == old => {}
            Some(new) if same_but_logging(old, new) => flags.push(new.set_call()),
            _ => deletes.push(old.delete_call()),
        }
    }
    for new in after.slots() {
        match before.slot(new.id) {
            Some(old) if old == new || same_but_logging(old, new) => {}
            _ => creates.push(new.set_call()),
        }
    }
    deletes.into_iter().chain(flags).chain(creates).collect()
}

/// QEMU 8.0 holds every vCPU out when a range the commit deletes overlaps one it adds.
fn qemu_inhibits(done: &[Applied]) -> bool {
    let removed: Vec<Slot> = done
        .iter()
        .filter(|a| a.change == Change::Delete)
        .filter_map(|a| a.before)
        .collect();
    done.iter()
        .filter(|a| a.change == Change::Create)
        .filter_map(|a| a.after)
        .any(|n| {
            removed.iter().any(|r| {
                r.id.address_space == n.id.address_space && r.gpa < n.end() && n.gpa < r.end()
            })
        })
}

impl Drop for TestVm {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if !self.threads.is_empty() {
            // Kick everyone out of KVM_RUN; they see `stop` and exit instead of parking.
            let held = self.shared.gate.quiesce();
            drop(held);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
