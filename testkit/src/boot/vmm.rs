//! The VMM, built the way `memslots/examples/vmm.rs` is: its own `VmFd` (with the in-kernel
//! PIC, IOAPIC, LAPICs and PIT), its own memory (RAM, the BIOS image and `pc.rom`, vm-memory
//! regions registered as backings) and device view, its own vCPU threads and run loop entering
//! `KVM_RUN` through memslots' gate on a kick signal of its choosing. Port I/O is emulated on the
//! vCPU thread that exited: the debug port, CMOS, fw_cfg, port 0x92 and PCI config, whose PAM
//! writes are committed and applied right there.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_enable_cap, kvm_pit_config, CpuId, KVM_CAP_X86_DISABLE_EXITS, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY, KVM_X86_DISABLE_EXITS_HLT,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use memslots::kvm::{Backing, SlotUpdater, SlotVm, VcpuGate};
use memslots::model::{Limits, SlotCall};
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap, MmapRegion,
    VolatileMemory,
};

use super::chipset::{Access, Chipset, Memory};
use super::cmos::{self, Cmos};
use super::fwcfg::{self, FwCfg};
use super::pam::{self, ROM_SIZE};
use super::pci;
use super::{compare, gettid, BootConfig, BootError, BootReport};

/// The VMM's kick signal: its own choice, away from the test kit's `SIGRTMIN + 1` and the
/// `SIGRTMIN` Firecracker and Cloud Hypervisor use.
fn kick_signal() -> i32 {
    libc::SIGRTMIN() + 4
}

/// SeaBIOS's debug port: writes are its log, reads must return 0xe9 or it stops logging.
const DEBUG_PORT: u16 = 0x402;
/// System control port A: SeaBIOS sets its A20 bit on every switch to 32-bit mode.
const PORT_92: u16 = 0x92;
/// Where KVM keeps its real-mode TSS and identity map (SeaBIOS reserves 0xfffbc000-0xfffbffff).
const TSS: usize = 0xfffb_d000;
const IDENTITY_MAP: u64 = 0xfffb_c000;
/// How much of the debug log a report keeps.
const LOG_LIMIT: usize = 256 << 10;
/// How many problem descriptions a report keeps.
const PROBLEM_LIMIT: usize = 16;

/// Records every slot call the updater makes through the VMM's VM, as QEMU's trace event does.
#[derive(Debug)]
struct TracingVm {
    vm: Arc<VmFd>,
    calls: Mutex<Vec<(SlotCall, i32)>>,
}

impl SlotVm for TracingVm {
    fn limits(&self) -> Limits {
        SlotVm::limits(&*self.vm)
    }

    unsafe fn set_region(&self, call: &SlotCall) -> Result<(), i32> {
        // SAFETY: forwarded with the caller's guarantee.
        let result = unsafe { SlotVm::set_region(&*self.vm, call) };
        let ret = result.err().map_or(0, |e| -e);
        lock(&self.calls).push((*call, ret));
        result
    }

    fn dirty_log(&self, slot: u32, size: u64) -> Result<Vec<u64>, i32> {
        SlotVm::dirty_log(&*self.vm, slot, size)
    }
}

/// A lock that survives a panicked holder (the report says what went wrong anyway).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// SeaBIOS's log, and what the VMM reads in it.
#[derive(Debug, Default)]
struct DebugLog {
    text: String,
    line: Vec<u8>,
    cpus_found: Option<u32>,
    no_bootable_device: bool,
}

impl DebugLog {
    /// Takes one byte; true when it completed the line announcing the end of the boot.
    fn push(&mut self, byte: u8) -> bool {
        if self.text.len() < LOG_LIMIT {
            self.text.push(char::from(byte));
        }
        if byte != b'\n' {
            self.line.push(byte);
            return false;
        }
        let line = String::from_utf8_lossy(&self.line).into_owned();
        self.line.clear();
        if let Some(rest) = line.strip_prefix("Found ") {
            if let Some((n, _)) = rest.split_once(" cpu(s)") {
                self.cpus_found = n.trim().parse().ok();
            }
        }
        if line.starts_with("No bootable device") && !self.no_bootable_device {
            self.no_bootable_device = true;
            return true;
        }
        false
    }
}

/// What a vCPU thread tells the thread waiting for the boot.
enum Event {
    /// SeaBIOS printed "No bootable device": POST is over.
    Done,
    /// A vCPU thread ended (internal error, unexpected exit, a failed commit).
    Ended,
}

#[derive(Debug, Default)]
struct Counters {
    internal_errors: AtomicU64,
    unexpected_exits: AtomicU64,
    spurious_exits: AtomicU64,
    rom_writes: AtomicU64,
    unassigned_mmio: AtomicU64,
}

/// Everything the vCPU threads share.
#[derive(Debug)]
struct Machine {
    gate: Arc<VcpuGate>,
    chipset: Mutex<Chipset>,
    generation: Arc<AtomicUsize>,
    cmos: Mutex<Cmos>,
    fw_cfg: Mutex<FwCfg>,
    debug: Mutex<DebugLog>,
    port92: AtomicU8,
    stop: AtomicBool,
    counters: Counters,
    problems: Mutex<Vec<String>>,
    tids: Mutex<Vec<i32>>,
    /// CPU time each vCPU thread used (a halted vCPU that stays in guest mode keeps using it).
    cpu_time: Mutex<Vec<Duration>>,
    view: GuestMemoryAtomic<GuestMemoryMmap>,
}

impl Machine {
    fn problem(&self, what: String) {
        let mut p = lock(&self.problems);
        if p.len() < PROBLEM_LIMIT {
            p.push(what);
        }
    }

    fn io_in(&self, port: u16, data: &mut [u8]) {
        match port {
            DEBUG_PORT => data.fill(0xe9),
            pci::CONFIG_ADDRESS..=0xcff => lock(&self.chipset).io_read(port, data),
            cmos::INDEX | cmos::DATA => {
                let v = lock(&self.cmos).read(port);
                data.fill(v);
            }
            fwcfg::SELECTOR | fwcfg::DATA => lock(&self.fw_cfg).read(port, data),
            PORT_92 => data.fill(self.port92.load(Ordering::SeqCst)),
            // Nothing here: an open bus reads all ones (the i8042 then fails fast, no serial or
            // parallel port is found).
            _ => data.fill(0xff),
        }
    }

    /// Returns true when the boot is over (the end message was printed).
    fn io_out(&self, vcpu: usize, port: u16, data: &[u8]) -> bool {
        match port {
            DEBUG_PORT => {
                let mut log = lock(&self.debug);
                let mut done = false;
                for &b in data {
                    done |= log.push(b);
                }
                return done;
            }
            pci::CONFIG_ADDRESS..=0xcff => lock(&self.chipset).io_write(vcpu, port, data),
            cmos::INDEX | cmos::DATA => {
                let mut c = lock(&self.cmos);
                for &b in data {
                    c.write(port, b);
                }
            }
            fwcfg::SELECTOR | fwcfg::DATA => lock(&self.fw_cfg).write(port, data),
            // Fast A20 and reset: A20 is always on under KVM, and SeaBIOS never asks for a
            // reset through it during POST, so the value is only kept.
            PORT_92 => {
                let v = data.first().copied().unwrap_or(0);
                self.port92.store(v & !1, Ordering::SeqCst);
            }
            _ => {}
        }
        false
    }

    /// An MMIO exit by a vCPU that entered with map `seen` current.
    fn mmio(&self, vcpu: usize, seen: usize, gpa: u64, write: bool) {
        let access = lock(&self.chipset).judge(seen, gpa, write);
        let c = &self.counters;
        match access {
            Access::Spurious => {
                c.spurious_exits.fetch_add(1, Ordering::SeqCst);
                c.unexpected_exits.fetch_add(1, Ordering::SeqCst);
                self.problem(format!(
                    "vCPU {vcpu}: MMIO {} at {gpa:#x}, memory in every map it could see",
                    if write { "write" } else { "read" }
                ));
            }
            Access::RomWrite => {
                c.rom_writes.fetch_add(1, Ordering::Relaxed);
            }
            Access::Unassigned | Access::InFlight => {
                c.unassigned_mmio.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The bytes at `gpa` through the device view, for a report (read-only memory is not in it).
    fn peek(&self, gpa: u64) -> String {
        let mut bytes = [0u8; 8];
        match self.view.memory().read_slice(&mut bytes, GuestAddress(gpa)) {
            Ok(()) => format!("{bytes:02x?}"),
            Err(_) => "not in the device view (read-only or unmapped)".into(),
        }
    }
}

/// The vCPU's `KVM_GET_SUPPORTED_CPUID` with its APIC id filled in (leaf 1 EBX[31:24], the
/// x2APIC leaves) and the APIC bit set: without it SeaBIOS counts one CPU and sends no SIPI.
fn cpuid_for(supported: &CpuId, index: usize) -> Result<CpuId, BootError> {
    let mut entries = supported.as_slice().to_vec();
    let id = index as u32;
    for e in &mut entries {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x00ff_ffff) | id << 24;
                e.edx |= 1 << 9;
            }
            0xb | 0x1f => e.edx = id,
            0x8000_001e => e.eax = id,
            _ => {}
        }
    }
    CpuId::from_entries(&entries).map_err(|e| BootError::Setup(format!("CPUID: {e:?}")))
}

/// Reset state for the boot CPU: `f000:fff0` (0xfffffff0), and LINT0 as ExtINT so the PIC's
/// timer reaches it before SeaBIOS programs the LAPIC (what QEMU does at reset).
fn reset_bsp(vcpu: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
    let mut sregs = vcpu.get_sregs()?;
    sregs.cs.selector = 0xf000;
    sregs.cs.base = 0xffff_0000;
    vcpu.set_sregs(&sregs)?;
    let mut regs = vcpu.get_regs()?;
    regs.rip = 0xfff0;
    regs.rflags = 2;
    vcpu.set_regs(&regs)?;
    let mut lapic = vcpu.get_lapic()?;
    let mut put = |reg: usize, v: u32| {
        for (i, b) in v.to_le_bytes().into_iter().enumerate() {
            lapic.regs[reg + i] = b as i8;
        }
    };
    put(0x350, 0x700); // LVT LINT0: ExtINT
    put(0x360, 0x400); // LVT LINT1: NMI
    vcpu.set_lapic(&lapic)
}

/// One vCPU thread: the VMM's run loop, through the gate.
fn vcpu_thread(
    index: usize,
    mut vcpu: VcpuFd,
    m: Arc<Machine>,
    events: Sender<Event>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        lock(&m.tids)[index] = gettid();
        // Whatever way the loop ends, the thread's CPU time is recorded last.
        let _cpu = CpuTime(&m, index);
        let mut ticket = match m.gate.register(index, &vcpu) {
            Ok(t) => t,
            Err(e) => {
                m.problem(format!("vCPU {index}: registering with the gate: {e}"));
                let _ = events.send(Event::Ended);
                return;
            }
        };
        let ended = |m: &Machine, what: Option<String>| {
            if let Some(w) = what {
                m.problem(format!("vCPU {index}: {w}"));
            }
            let _ = events.send(Event::Ended);
        };
        while !m.stop.load(Ordering::SeqCst) {
            let seen = m.generation.load(Ordering::SeqCst);
            let mut internal_error = false;
            match ticket.run(|| vcpu.run()) {
                Ok(VcpuExit::IoIn(port, data)) => m.io_in(port, data),
                Ok(VcpuExit::IoOut(port, data)) => {
                    if m.io_out(index, port, data) {
                        let _ = events.send(Event::Done);
                    }
                    if let Some(f) = lock(&m.chipset).failure.clone() {
                        return ended(&m, Some(f));
                    }
                }
                Ok(VcpuExit::MmioRead(gpa, data)) => {
                    m.mmio(index, seen, gpa, false);
                    data.fill(0xff);
                }
                Ok(VcpuExit::MmioWrite(gpa, _)) => m.mmio(index, seen, gpa, true),
                Ok(VcpuExit::InternalError) => internal_error = true,
                Ok(exit) => {
                    m.counters.unexpected_exits.fetch_add(1, Ordering::SeqCst);
                    return ended(&m, Some(format!("unexpected exit {exit:?}")));
                }
                // Kicked: go round (the next entry waits while a quiesce holds).
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Err(e) => {
                    m.counters.unexpected_exits.fetch_add(1, Ordering::SeqCst);
                    return ended(&m, Some(format!("KVM_RUN: {e}")));
                }
            }
            if internal_error {
                m.counters.internal_errors.fetch_add(1, Ordering::SeqCst);
                let place = match (vcpu.get_regs(), vcpu.get_sregs()) {
                    (Ok(r), Ok(s)) => format!(
                        "at {:04x}:{:x} (linear {:#x}: {})",
                        s.cs.selector,
                        r.rip,
                        s.cs.base + r.rip,
                        m.peek(s.cs.base + r.rip)
                    ),
                    _ => "(registers unreadable)".into(),
                };
                return ended(&m, Some(format!("KVM_EXIT_INTERNAL_ERROR {place}")));
            }
        }
    })
}

/// Records its thread's CPU time when dropped.
struct CpuTime<'a>(&'a Machine, usize);

impl Drop for CpuTime<'_> {
    fn drop(&mut self) {
        lock(&self.0.cpu_time)[self.1] = thread_cpu_time();
    }
}

/// User plus system time of the calling thread.
fn thread_cpu_time() -> Duration {
    // SAFETY: a zeroed rusage is a valid out-parameter.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is valid and writable; RUSAGE_THREAD reports on this thread only.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// An unregistered page after each memory, for the trace's sake. mmap may place two memories back
/// to back (pc.rom right below the BIOS, which continues it at 0xe0000 at reset); the chipset's
/// planner cuts at the updater's host edges, so no slot spans two, but a trace names no memory
/// and its reader (`compare::qemu_final_map`) takes contiguous host memory for one: the gap keeps
/// the VMM's own trace readable as QEMU's are.
const GUARD: usize = 0x1000;

/// An anonymous vm-memory region of `size` bytes (and the guard page) holding `contents`.
fn region(size: usize, contents: &[u8]) -> Result<Arc<MmapRegion>, BootError> {
    let r = MmapRegion::new(size + GUARD)
        .map_err(|e| BootError::Setup(format!("mmap {size} bytes: {e}")))?;
    r.as_volatile_slice().copy_from(contents);
    Ok(Arc::new(r))
}

/// Boots once. See [`super::boot`].
pub(super) fn run(cfg: &BootConfig, image: &[u8]) -> Result<BootReport, BootError> {
    let setup = |what: &str| {
        let what = what.to_owned();
        move |e: kvm_ioctls::Error| BootError::Setup(format!("{what}: {e}"))
    };
    let kvm = Kvm::new().map_err(BootError::Kvm)?;
    let vm = Arc::new(kvm.create_vm().map_err(BootError::Kvm)?);
    if !cfg.hlt_exits {
        let allowed = vm.check_extension_raw(KVM_CAP_X86_DISABLE_EXITS.into());
        if allowed < 0 || allowed as u32 & KVM_X86_DISABLE_EXITS_HLT == 0 {
            return Err(BootError::HltExits(allowed));
        }
        let cap = kvm_enable_cap {
            cap: KVM_CAP_X86_DISABLE_EXITS,
            args: [u64::from(KVM_X86_DISABLE_EXITS_HLT), 0, 0, 0],
            ..Default::default()
        };
        vm.enable_cap(&cap)
            .map_err(setup("KVM_CAP_X86_DISABLE_EXITS"))?;
    }
    vm.set_tss_address(TSS).map_err(setup("KVM_SET_TSS_ADDR"))?;
    vm.set_identity_map_address(IDENTITY_MAP)
        .map_err(setup("KVM_SET_IDENTITY_MAP_ADDR"))?;
    vm.create_irq_chip().map_err(setup("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(setup("KVM_CREATE_PIT2"))?;

    // The VMM's memory: RAM, the BIOS image, and pc.rom (zeros: no option ROM).
    let ram_size = cfg.memory_mib << 20;
    let ram = region(ram_size as usize, &[])?;
    let bios = region(image.len(), image)?;
    let rom = region(ROM_SIZE as usize, &[])?;
    // Its device view (no dirty tracking: nothing migrates).
    let view: GuestMemoryAtomic<GuestMemoryMmap> =
        GuestMemoryAtomic::new(GuestMemoryMmap::default());
    let gate = Arc::new(
        VcpuGate::with_signal(kick_signal())
            .map_err(|e| BootError::Setup(format!("kick signal: {e}")))?,
    );
    let tracing = Arc::new(TracingVm {
        vm: vm.clone(),
        calls: Mutex::new(Vec::new()),
    });
    let mut updater = SlotUpdater::with_view(tracing.clone(), gate.clone(), view.clone());
    let mut register = |name: &str, r: Arc<MmapRegion>| {
        let (host, size) = (r.as_ptr() as u64, (r.size() - GUARD) as u64);
        // SAFETY: `r` maps `[host, host + size + GUARD)` read-write until it is dropped, nothing
        // else unmaps it, and it becomes the backing's owner.
        unsafe { Backing::from_raw(name, host, size, None, r) }
            .map_err(|e| e.to_string())
            .and_then(|b| updater.add_backing(b).map_err(|e| e.to_string()))
            .map_err(|e| BootError::Setup(format!("registering {name}: {e}")))
    };
    let memory = Memory {
        ram: register(pam::Source::Ram.name(), ram)?,
        bios: register(pam::Source::Bios.name(), bios)?,
        rom: register(pam::Source::Rom.name(), rom)?,
    };
    let generation = Arc::new(AtomicUsize::new(0));
    let chipset = Chipset::new(updater, cfg.strategy, memory, generation.clone())
        .map_err(BootError::Setup)?;

    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(setup("KVM_GET_SUPPORTED_CPUID"))?;
    let mut vcpus = Vec::with_capacity(cfg.vcpus);
    for index in 0..cfg.vcpus {
        let vcpu = vm
            .create_vcpu(index as u64)
            .map_err(setup(&format!("creating vCPU {index}")))?;
        vcpu.set_cpuid2(&cpuid_for(&supported, index)?)
            .map_err(setup("KVM_SET_CPUID2"))?;
        if index == 0 {
            reset_bsp(&vcpu).map_err(setup("resetting the boot CPU"))?;
        }
        vcpus.push(vcpu);
    }

    let m = Arc::new(Machine {
        gate: gate.clone(),
        chipset: Mutex::new(chipset),
        generation,
        cmos: Mutex::new(Cmos::new(ram_size, cfg.vcpus)),
        fw_cfg: Mutex::new(FwCfg::new(cfg.vcpus)),
        debug: Mutex::new(DebugLog::default()),
        port92: AtomicU8::new(0),
        stop: AtomicBool::new(false),
        counters: Counters::default(),
        problems: Mutex::new(Vec::new()),
        tids: Mutex::new(vec![0; cfg.vcpus]),
        cpu_time: Mutex::new(vec![Duration::ZERO; cfg.vcpus]),
        view,
    });
    let (tx, rx) = mpsc::channel();
    let start = Instant::now();
    let threads: Vec<JoinHandle<()>> = vcpus
        .into_iter()
        .enumerate()
        .map(|(i, vcpu)| vcpu_thread(i, vcpu, m.clone(), tx.clone()))
        .collect();
    drop(tx);

    // Wait for the end of POST, a vCPU that stopped, or the time limit.
    let deadline = start + cfg.time_limit;
    let event = rx.recv_timeout(deadline.saturating_duration_since(Instant::now()));
    let boot_time = start.elapsed();
    let timed_out = matches!(event, Err(RecvTimeoutError::Timeout));
    stop(&m, &gate, &threads);
    for (i, t) in threads.into_iter().enumerate() {
        if !t.is_finished() {
            // Joining would wait forever: the thread is left behind, holding its VM.
            m.problem(format!("vCPU {i}'s thread did not stop"));
        } else if t.join().is_err() {
            m.problem(format!("vCPU {i}'s thread panicked"));
        }
    }
    if timed_out {
        m.problem(format!(
            "no \"No bootable device\" within {:?}",
            cfg.time_limit
        ));
    }
    Ok(report(&m, &tracing, timed_out, boot_time))
}

/// Stops every vCPU thread: each kick takes the vCPUs out of `KVM_RUN`, and they see `stop`
/// before entering again (a thread that was just about to enter is caught by the next round).
fn stop(m: &Machine, gate: &VcpuGate, threads: &[JoinHandle<()>]) {
    m.stop.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(10);
    while threads.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
        gate.quiesce().resume();
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn report(m: &Machine, tracing: &TracingVm, timed_out: bool, boot_time: Duration) -> BootReport {
    let chipset = lock(&m.chipset);
    let debug = lock(&m.debug);
    let c = &m.counters;
    let layout = chipset.updater().layout();
    let final_pam = chipset.pam();
    let mut problems = lock(&m.problems).clone();
    if let Some(f) = &chipset.failure {
        if !problems.iter().any(|p| p.ends_with(f.as_str())) {
            problems.push(f.clone());
        }
    }
    BootReport {
        // make_bios_readonly ends POST; it leaves the BIOS segment read-only (mode 1).
        end_of_post: chipset
            .commits
            .last()
            .is_some_and(|c| pam::mode(&c.pam, 0) == 1),
        no_bootable_device: debug.no_bootable_device,
        cpus_found: debug.cpus_found,
        pam_writes: chipset.pam_writes,
        smram_writes: chipset.smram_writes,
        commits: chipset.commits.clone(),
        ioctls: chipset.updater().ioctls(),
        init_ioctls: chipset.init_ioctls,
        internal_errors: c.internal_errors.load(Ordering::SeqCst),
        unexpected_exits: c.unexpected_exits.load(Ordering::SeqCst),
        spurious_exits: c.spurious_exits.load(Ordering::SeqCst),
        rom_writes: c.rom_writes.load(Ordering::SeqCst),
        unassigned_mmio: c.unassigned_mmio.load(Ordering::SeqCst),
        timed_out,
        boot_time,
        vcpu_tids: lock(&m.tids).clone(),
        vcpu_cpu_time: lock(&m.cpu_time).clone(),
        main_tid: gettid(),
        final_map: compare::runs(layout.slots(), |h| chipset.memory().name_of(h)),
        final_pam,
        slot_calls: lock(&tracing.calls).clone(),
        problems,
        debug_log: debug.text.clone(),
    }
}
