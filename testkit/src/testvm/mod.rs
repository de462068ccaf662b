//! A VM running the embedded test guest on vCPU threads, over a [`SlotUpdater`].

use std::ops::Deref;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use memslots::model::{Layout, Slot, SlotCall, SlotFlags, SlotId};

use memslots::kvm::{
    ApplyError, ApplyStats, Backing, DirtyLogError, DirtyPages, DirtyRing, KickError, KvmError,
    MemoryError, SlotUpdater, VcpuGate, Vm,
};

use crate::faults::FaultInjector;
use crate::guest::{self, ctl};
use crate::strategy::{self, Strategy};

mod history;
mod vcpu;

use history::LayoutHistory;
use vcpu::VcpuShared;
pub use vcpu::{GuestCounters, GuestStats, Job};

/// Errors creating a [`TestVm`].
#[derive(Debug, thiserror::Error)]
pub enum TestVmError {
    /// `/dev/kvm` or the VM.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// Host memory.
    #[error("host memory for the test VM")]
    Memory(#[source] MemoryError),
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
    PrivateSlot(#[source] Box<ApplyError>),
    /// A bad configuration.
    #[error("{0}")]
    Config(String),
    /// The kick signal could not be set up.
    #[error("setting up the vCPU kick")]
    Kick(#[from] KickError),
    /// vCPU 0 did not ask for a guest-triggered change in time.
    #[error("vCPU 0 did not ask for the layout change within {0:?} (is the guest running?)")]
    NoRequest(Duration),
}

/// The signal the test kit's gates kick vCPUs with: not `SIGRTMIN`, which VMMs use for their own.
pub fn kick_signal() -> std::os::raw::c_int {
    libc::SIGRTMIN() + 1
}

/// How long a guest-triggered change may wait for vCPU 0 to ask for it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What a [`TestVm`] is made of.
#[derive(Clone, Copy, Debug)]
pub struct TestVmConfig {
    /// Number of vCPUs.
    pub vcpus: usize,
    /// Bytes of the arena: the host memory workloads map.
    pub arena_size: u64,
    /// Base GPA of the guest's private window ([`guest::PRIVATE_SIZE`] bytes, below 4 GiB, 2 MiB
    /// aligned: the device window, then the private slot); workloads must leave it alone.
    pub private_gpa: u64,
    /// Whether the guest makes its string and split device accesses each round.
    pub device: bool,
    /// The old gate's bug, on purpose: while a quiesce holds, each MMIO/PIO exit is completed by
    /// one `KVM_RUN` with `immediate_exit = 1` whose result is thrown away. Shows that the device
    /// checks see a lost exit.
    pub drop_exits_on_quiesce: bool,
    /// Keep dirty pages with KVM's dirty ring of this many bytes per vCPU instead of bitmaps.
    pub dirty_ring: Option<u32>,
}

impl TestVmConfig {
    /// `vcpus` vCPUs, an arena of `arena_size` bytes, the private slot at GPA 0.
    pub fn new(vcpus: usize, arena_size: u64) -> Self {
        TestVmConfig {
            vcpus,
            arena_size,
            private_gpa: 0,
            device: true,
            drop_exits_on_quiesce: false,
            dirty_ring: None,
        }
    }
}

/// One page the test guest probes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe {
    /// GPA of the page (below 4 GiB).
    pub gpa: u64,
    /// The arena page behind it whenever it is mapped: the guest reads, checks and writes it.
    /// `None`: a read-only probe, only read and its value recorded (see [`TestVm::probe_read`]).
    pub host: Option<u64>,
}

impl Probe {
    /// A probe the guest reads, checks against its last write, and writes.
    pub fn checked(gpa: u64, host: u64) -> Self {
        Probe {
            gpa,
            host: Some(host),
        }
    }

    /// A probe the guest only reads (and records what it read).
    pub fn read_only(gpa: u64) -> Self {
        Probe { gpa, host: None }
    }
}

/// A VM running the embedded test guest, with its host memory, slots, gate and counters.
#[derive(Debug)]
pub struct TestVm {
    updater: Arc<Mutex<SlotUpdater>>,
    shared: Arc<VcpuShared>,
    vcpus: Vec<kvm_ioctls::VcpuFd>,
    threads: Vec<JoinHandle<()>>,
    private: Arc<Backing>,
    arena: Arc<Backing>,
    private_gpa: u64,
    private_id: SlotId,
    device: bool,
}

/// The layout of a [`TestVm`], borrowed (the updater stays locked while this lives).
#[derive(Debug)]
pub struct LayoutRef<'a>(MutexGuard<'a, SlotUpdater>);

impl Deref for LayoutRef<'_> {
    type Target = Layout;

    fn deref(&self) -> &Layout {
        self.0.layout()
    }
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
        let gate = Arc::new(VcpuGate::with_signal(kick_signal())?);
        let mut updater = SlotUpdater::new(vm.clone(), gate.clone());
        let ring = match config.dirty_ring {
            Some(bytes) => {
                let ring = DirtyRing::enable(vm.clone(), bytes)
                    .map_err(|e| TestVmError::Config(e.to_string()))?;
                updater.set_dirty_ring(ring.clone());
                Some(ring)
            }
            None => None,
        };
        let private = updater
            .add_backing(
                Backing::anonymous("private", guest::PRIVATE_SIZE).map_err(TestVmError::Memory)?,
            )
            .map_err(TestVmError::Memory)?;
        let arena = updater
            .add_backing(
                Backing::anonymous("arena", config.arena_size).map_err(TestVmError::Memory)?,
            )
            .map_err(TestVmError::Memory)?;
        let code = guest::code(base).map_err(|e| TestVmError::Assemble(e.to_string()))?;
        private.write_bytes(private.host() + guest::CODE, &code);
        let gdt: Vec<u8> = guest::gdt().iter().flat_map(|d| d.to_le_bytes()).collect();
        private.write_bytes(private.host() + guest::GDT, &gdt);
        let private_slot = Slot {
            // The highest id, so that workloads and traces keep the low ones.
            id: SlotId::new(vm.limits().slots - 1),
            gpa: base + guest::SLOT,
            size: guest::PRIVATE_SIZE - guest::SLOT,
            host: private.host() + guest::SLOT,
            flags: SlotFlags::NONE,
            guest_memfd: 0,
            guest_memfd_offset: 0,
        };
        updater
            .apply(&[private_slot.set_call()])
            .map_err(|e| TestVmError::PrivateSlot(Box::new(e)))?;
        let mut vcpus = Vec::new();
        for index in 0..config.vcpus {
            let vcpu = vm
                .fd()
                .create_vcpu(index as u64)
                .map_err(|source| TestVmError::Vcpu { index, source })?;
            vcpu::reset(&vcpu, index, base)
                .map_err(|source| TestVmError::Vcpu { index, source })?;
            if let Some(ring) = &ring {
                ring.add_vcpu(index, &vcpu)
                    .map_err(|e| TestVmError::Config(e.to_string()))?;
            }
            vcpus.push(vcpu);
        }
        let history = Arc::new(LayoutHistory::new(updater.layout().clone()));
        updater.set_observer(history.clone());
        let updater = Arc::new(Mutex::new(updater));
        let shared = Arc::new(VcpuShared {
            gate,
            updater: updater.clone(),
            job: Mutex::new(None),
            stop: Default::default(),
            history,
            counters: Default::default(),
            first_problem: Default::default(),
            drop_exits_on_quiesce: config.drop_exits_on_quiesce,
            ring,
        });
        Ok(TestVm {
            updater,
            shared,
            vcpus,
            threads: Vec::new(),
            private,
            arena,
            private_gpa: base,
            private_id: private_slot.id,
            device: config.device,
        })
    }

    /// Host address of the arena's first byte.
    pub fn arena_host(&self) -> u64 {
        self.arena.host()
    }

    /// The arena backing.
    pub fn arena(&self) -> &Backing {
        &self.arena
    }

    /// The layout (equal to the kernel's); the updater stays locked while it is borrowed.
    pub fn layout(&self) -> LayoutRef<'_> {
        LayoutRef(self.updater())
    }

    /// The id of the guest's private slot (the highest), which workloads leave alone.
    pub fn private_slot_id(&self) -> SlotId {
        self.private_id
    }

    /// The gate the vCPUs run through.
    pub fn gate(&self) -> &Arc<VcpuGate> {
        &self.shared.gate
    }

    /// The device-side view of guest memory (address space 0), published with every batch.
    pub fn device_memory(&self) -> GuestMemoryAtomic<GuestMemoryMmap> {
        self.updater()
            .device_memory()
            .expect("a TestVm's updater makes its own view")
            .clone()
    }

    /// Sets (or clears) fault injection on slot calls.
    pub fn inject_faults(&mut self, injector: Option<FaultInjector>) {
        self.updater()
            .inject_faults(injector.map(|i| Box::new(i) as Box<dyn memslots::kvm::FaultHook>));
    }

    /// Slot ioctls made so far.
    pub fn ioctls(&self) -> u64 {
        self.updater().ioctls()
    }

    /// What the vCPUs counted so far.
    pub fn guest_stats(&self) -> GuestStats {
        self.shared.counters.snapshot()
    }

    /// What vCPU `vcpu`'s last read of probe `probe` (its index in the list given to
    /// [`TestVm::start_probes`]) returned: [`guest::MMIO_READ_VALUE`] when it exited as MMIO,
    /// 0 before the first read. The guest may be writing it: read it with the vCPUs parked, or
    /// after enough rounds that a read made after the event of interest has landed.
    pub fn probe_read(&self, vcpu: usize, probe: usize) -> u32 {
        assert!(vcpu < guest::MAX_VCPUS && probe < ctl::MAX_PROBES);
        self.private
            .read_u32(self.private.host() + guest::ctl_offset(vcpu) + ctl::READS + probe as u64 * 4)
    }

    /// Rounds vCPU `vcpu` has completed over its probe list.
    pub fn vcpu_rounds(&self, vcpu: usize) -> u64 {
        assert!(vcpu < guest::MAX_VCPUS);
        u64::from(
            self.private
                .read_u32(self.private.host() + guest::ctl_offset(vcpu) + ctl::ROUNDS),
        )
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
        let probes: Vec<Probe> = probes.iter().map(|&(g, h)| Probe::checked(g, h)).collect();
        self.start_probes(&probes, exec)
    }

    /// Like [`TestVm::start`], with read-only probes allowed.
    pub fn start_probes(
        &mut self,
        probes: &[Probe],
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
        for &Probe { gpa, host } in probes {
            let host_ok = host.is_none_or(|host| arena.holds(host, guest::MAX_VCPUS as u64 * 4));
            if !host_ok || gpa > u64::from(u32::MAX) - guest::MAX_VCPUS as u64 * 4 {
                return Err(TestVmError::Config(format!(
                    "probe {gpa:#x} -> {host:x?} is outside the arena"
                )));
            }
        }
        let cells = probe_cells(probes);
        if let Some((_, host)) = exec {
            arena.write_bytes(host, &guest::exec_function());
        }
        for index in 0..self.vcpus.len() {
            let base = self.private.host() + guest::ctl_offset(index);
            for (i, (&Probe { gpa, .. }, &cell)) in probes.iter().zip(&cells).enumerate() {
                let at = base + ctl::PROBES + i as u64 * 8;
                self.private.write_u32(at, gpa as u32);
                self.private.write_u32(at + 4, cell);
            }
            self.private
                .write_u32(base + ctl::EXEC, exec.map_or(0, |e| e.0 as u32));
            self.private
                .write_u32(base + ctl::DEVICE, u32::from(self.device));
            let buffer = guest::buffer(self.private_gpa, index);
            self.private.write_u32(base + ctl::BUF, buffer as u32);
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
    pub fn dirty_pages(&mut self) -> Result<DirtyPages, DirtyLogError> {
        self.updater().dirty_pages()
    }

    /// Runs `change` on vCPU 0's thread, as a VMM applies a change the guest asked for: the
    /// guest on vCPU 0 requests it with a port write, and the thread handling that exit runs
    /// `change` while the other vCPUs keep running. Waits for it and returns what it returned.
    pub fn apply_on_vcpu0<R: Send + 'static>(
        &self,
        change: impl FnOnce(&mut SlotUpdater) -> R + Send + 'static,
    ) -> Result<R, TestVmError> {
        if self.threads.is_empty() {
            return Err(TestVmError::Config(
                "a guest-triggered change needs the vCPUs started".into(),
            ));
        }
        let (tx, rx) = std::sync::mpsc::channel();
        *self.shared.job.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(Box::new(move |u: &mut SlotUpdater| {
                let _ = tx.send(change(u));
            }));
        let trigger = self.private.host() + guest::ctl_offset(0) + ctl::TRIGGER;
        self.private.write_u32(trigger, 1);
        let result = rx.recv_timeout(REQUEST_TIMEOUT);
        self.private.write_u32(trigger, 0);
        match result {
            Ok(r) => Ok(r),
            Err(_) => {
                // Take the job back, unless vCPU 0 took it in the meantime.
                let pending = self
                    .shared
                    .job
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take();
                if pending.is_some() {
                    return Err(TestVmError::NoRequest(REQUEST_TIMEOUT));
                }
                rx.recv()
                    .map_err(|_| TestVmError::NoRequest(REQUEST_TIMEOUT))
            }
        }
    }

    /// Runs `f` with every vCPU parked (for checks that must not race the guest).
    pub fn with_vcpus_parked<R>(&mut self, f: impl FnOnce(&mut Self) -> R) -> R {
        let gate = self.shared.gate.clone();
        let held = gate.quiesce();
        let result = f(self);
        drop(held);
        result
    }

    /// Applies `calls` as one update with `strategy`. On failure everything is undone.
    pub fn apply(
        &mut self,
        calls: &[SlotCall],
        strategy: Strategy,
    ) -> Result<ApplyStats, ApplyError> {
        strategy::apply(&mut self.updater(), calls, strategy)
    }

    /// The updater behind this VM, locked.
    pub fn updater(&self) -> MutexGuard<'_, SlotUpdater> {
        self.updater.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Each probe's cell: the index of its host page's expected values in the guest's table
/// ([`ctl::READ_ONLY`] for a read-only probe). Host pages are numbered in the order they first
/// appear, so probes of one host page (aliases, a BAR at two GPAs) share a cell, and any page of
/// the arena can be probed: the numbering does not depend on where the page lies in the arena.
fn probe_cells(probes: &[Probe]) -> Vec<u32> {
    let mut numbers: std::collections::HashMap<u64, u32> = std::collections::HashMap::new();
    probes
        .iter()
        .map(|p| {
            p.host.map_or(ctl::READ_ONLY, |h| {
                let next = numbers.len() as u32;
                *numbers.entry(h / 4096).or_insert(next)
            })
        })
        .collect()
}

// Every probe can have a cell of its own.
const _: () = assert!(ctl::MAX_PROBES <= ctl::MAX_CELLS);

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
