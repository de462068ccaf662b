//! A small VMM embedding memslots the way a real one would: its own `VmFd`, its own guest memory
//! (a memfd it mapped with vm-memory) and its own `GuestMemoryAtomic` with a dirty bitmap, its own
//! vCPU threads and run loop (entering `KVM_RUN` through memslots' gate), device emulation on the
//! vCPU threads, and a device thread reading and writing guest memory through the view.
//!
//! The guest (real mode) has a *bank register* at port 0x80: vCPU 0 writes it in a loop, and the
//! vCPU thread handling that exit switches which of two banks of memory is mapped at 0x80000,
//! through memslots' listener and updater, while the other vCPUs keep reading the window and
//! reporting what they read on port 0x81. Switching is DELETE + CREATE: done naively, a reader
//! would see the window vanish (an MMIO exit); memslots holds the readers out for exactly those
//! calls. The VMM checks every value and exit.
//!
//! Run it with `cargo run --release -p memslots --example vmm` (needs `/dev/kvm`; add `-- --naive`
//! to see what the checks catch without memslots' hold); `cargo test` runs it too
//! (`tests/example_vmm.rs`).

use std::error::Error;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use memslots::kvm::{Backing, DirtyBits, Hold, SlotUpdater, VcpuGate};
use memslots::model::SlotFlags;
use memslots::planner::{CutPolicy, Listener, Section};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap,
    MmapRegion,
};
use vmm_sys_util::signal::SIGRTMIN;

/// Guest RAM below the window, and the window's place and size.
const RAM: u64 = 0x8_0000;
const WINDOW: u64 = 0x8_0000;
const BANK: u64 = 0x1_0000;
/// What each bank holds at its first word (and a device writes to RAM page 7).
const SIGNATURE: [u16; 2] = [0xaaaa, 0xbbbb];
const DEVICE_PAGE: u64 = 0x7000;
const BANK_PORT: u16 = 0x80;
const REPORT_PORT: u16 = 0x81;

/// vCPU 0 at 0x1000: `mov al, 0; l: xor al, 1; out 0x80, al; jmp l`.
const SWITCHER: [u8; 8] = [0xb0, 0x00, 0x34, 0x01, 0xe6, 0x80, 0xeb, 0xfa];
/// Other vCPUs at 0x1100: `mov ax, 0x8000; mov ds, ax; l: mov ax, [0]; out 0x81, ax; jmp l`.
const READER: [u8; 12] = [
    0xb8, 0x00, 0x80, 0x8e, 0xd8, 0xa1, 0x00, 0x00, 0xe7, 0x81, 0xeb, 0xf9,
];

/// What the VMM saw.
#[derive(Debug, Default)]
pub struct Counts {
    /// Bank switches applied, each on the vCPU thread that handled the guest's write.
    pub switches: AtomicU64,
    /// Values the readers reported (every one must be a bank's signature).
    pub reads: AtomicU64,
    /// Reads of the window that were not a signature, or exits on it (the window vanished).
    pub errors: AtomicU64,
    /// `KVM_EXIT_INTERNAL_ERROR`: what an emulated access to a vanished slot can end in (the
    /// vCPU stops; also counted in `errors`).
    pub internal_errors: AtomicU64,
    /// Reads through the device view.
    pub device_reads: AtomicU64,
}

/// The VMM's memory map, as its chipset model would keep it.
struct Chipset {
    listener: Listener,
    updater: SlotUpdater,
    ram: u64,
    banks: u64,
    bank: usize,
    /// Apply without holding anyone out: the bug, to show the VMM's checks see it.
    naive: bool,
}

impl Chipset {
    fn section(&self, gpa: u64, size: u64, host: u64) -> Section {
        Section {
            address_space: 0,
            gpa,
            size,
            host,
            flags: SlotFlags::NONE,
        }
    }

    /// The guest selected `bank`: a memory-map change, planned and applied atomically.
    fn select(&mut self, bank: usize) -> Result<(), Box<dyn Error + Send + Sync>> {
        let old = self.section(WINDOW, BANK, self.banks + self.bank as u64 * BANK);
        let new = self.section(WINDOW, BANK, self.banks + bank as u64 * BANK);
        self.listener.begin()?;
        self.listener.region_del(old)?;
        self.listener.region_add(new)?;
        let plan = self.listener.commit()?;
        let calls: Vec<_> = plan.calls.iter().map(|c| c.call).collect();
        if self.naive {
            self.updater
                .apply_with(&calls, Hold::Calls(0..0), DirtyBits::Keep)?;
        } else {
            self.updater.apply(&calls)?;
        }
        self.bank = bank;
        Ok(())
    }
}

/// One vCPU thread: the VMM's own run loop, entering `KVM_RUN` through the gate, emulating the
/// two ports on this thread.
fn vcpu_thread(
    index: usize,
    mut vcpu: VcpuFd,
    gate: Arc<VcpuGate>,
    chipset: Arc<Mutex<Chipset>>,
    stop: Arc<AtomicBool>,
    counts: Arc<Counts>,
    switches: u64,
) -> JoinHandle<Result<(), String>> {
    std::thread::spawn(move || {
        let mut ticket = gate.register(index, &vcpu).map_err(|e| e.to_string())?;
        while !stop.load(Ordering::SeqCst) {
            match ticket.run(|| vcpu.run()) {
                Ok(VcpuExit::IoOut(BANK_PORT, data)) => {
                    let bank = usize::from(data[0] & 1);
                    // Applied here, on the vCPU thread, while the other vCPUs run.
                    let mut chipset = chipset.lock().map_err(|_| "chipset poisoned")?;
                    chipset.select(bank).map_err(|e| e.to_string())?;
                    if counts.switches.fetch_add(1, Ordering::SeqCst) + 1 >= switches {
                        stop.store(true, Ordering::SeqCst);
                    }
                }
                Ok(VcpuExit::IoOut(REPORT_PORT, data)) => {
                    let value = u16::from_le_bytes([data[0], data[1]]);
                    counts.reads.fetch_add(1, Ordering::Relaxed);
                    if !SIGNATURE.contains(&value) {
                        counts.errors.fetch_add(1, Ordering::SeqCst);
                    }
                }
                // A read of the window that found no memory: the layout was half-applied.
                Ok(VcpuExit::MmioRead(_, data)) => {
                    counts.errors.fetch_add(1, Ordering::SeqCst);
                    data.fill(0);
                }
                Ok(VcpuExit::InternalError) => {
                    counts.internal_errors.fetch_add(1, Ordering::SeqCst);
                    counts.errors.fetch_add(1, Ordering::SeqCst);
                    return Ok(());
                }
                Ok(exit) => return Err(format!("vCPU {index}: unexpected exit {exit:?}")),
                // Kicked by a quiesce: go round (the next entry waits it out).
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Err(e) => return Err(format!("vCPU {index}: KVM_RUN: {e}")),
            }
        }
        Ok(())
    })
}

/// Real mode at `rip`, flat segments.
fn reset(vcpu: &VcpuFd, rip: u64) -> Result<(), Box<dyn Error>> {
    let mut sregs = vcpu.get_sregs()?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs)?;
    let mut regs = vcpu.get_regs()?;
    regs.rip = rip;
    regs.rflags = 2;
    vcpu.set_regs(&regs)?;
    Ok(())
}

/// Runs the VMM with `vcpus` vCPUs until the guest made `switches` bank switches (applied with
/// nobody held out if `naive`); `Ok(None)` where `/dev/kvm` cannot be opened.
pub fn run(
    vcpus: usize,
    switches: u64,
    naive: bool,
) -> Result<Option<Arc<Counts>>, Box<dyn Error>> {
    let vm: Arc<VmFd> = match Kvm::new().and_then(|k| k.create_vm()) {
        Ok(vm) => Arc::new(vm),
        Err(e) => {
            eprintln!("SKIPPED: /dev/kvm cannot be opened ({e}): this VMM needs KVM");
            return Ok(None);
        }
    };
    // The VMM's memory: one memfd (so a vhost-user backend could map it too), RAM then two banks.
    let size = (RAM + 2 * BANK) as usize;
    let file = vmm_sys_util::tempfile::TempFile::new()?.into_file();
    file.set_len(size as u64)?;
    let region = Arc::new(MmapRegion::<()>::from_file(FileOffset::new(file, 0), size)?);
    // The VMM's device view, with a dirty bitmap for migration.
    let view: GuestMemoryAtomic<GuestMemoryMmap<AtomicBitmap>> =
        GuestMemoryAtomic::new(GuestMemoryMmap::default());
    // The VMM names its kick signal (its own handler, if any, is never replaced).
    let gate = Arc::new(VcpuGate::with_signal(SIGRTMIN() + 2)?);
    let mut updater = SlotUpdater::with_view(vm.clone(), gate.clone(), view.clone());
    let mem = updater.add_backing(Backing::from_mmap_region("guest", region)?)?;
    let host = mem.host();
    mem.write_bytes(host + 0x1000, &SWITCHER);
    mem.write_bytes(host + 0x1100, &READER);
    for (bank, sig) in SIGNATURE.iter().enumerate() {
        mem.write_bytes(host + RAM + bank as u64 * BANK, &sig.to_le_bytes());
    }

    // New slots are cut where one registered memory meets another (one memory here, so none):
    // a slot may not span two, though a map joins them where mmap placed them back to back.
    let policy = CutPolicy::default().with_host_boundaries(updater.host_edges());
    let mut listener = Listener::with_policy(*updater.layout().limits(), policy);
    listener.begin()?;
    let ram = Section {
        address_space: 0,
        gpa: 0,
        size: RAM,
        host,
        flags: SlotFlags::NONE,
    };
    listener.region_add(ram)?;
    listener.region_add(Section {
        gpa: WINDOW,
        size: BANK,
        host: host + RAM,
        ..ram
    })?;
    let boot: Vec<_> = listener.commit()?.calls.iter().map(|c| c.call).collect();
    updater.apply(&boot)?;
    let chipset = Arc::new(Mutex::new(Chipset {
        listener,
        updater,
        ram: host,
        banks: host + RAM,
        bank: 0,
        naive,
    }));

    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Counts::default());
    let mut threads = Vec::new();
    for index in 0..vcpus {
        let vcpu = vm.create_vcpu(index as u64)?;
        reset(&vcpu, if index == 0 { 0x1000 } else { 0x1100 })?;
        threads.push(vcpu_thread(
            index,
            vcpu,
            gate.clone(),
            chipset.clone(),
            stop.clone(),
            counts.clone(),
            switches,
        ));
    }
    // A device thread: reads the window and writes a RAM page through the view while the map
    // changes under it.
    let device = {
        let (view, stop, counts) = (view.clone(), stop.clone(), counts.clone());
        std::thread::spawn(move || {
            let mut n = 0u32;
            while !stop.load(Ordering::SeqCst) {
                let mem = view.memory();
                match mem.read_obj::<u16>(GuestAddress(WINDOW)) {
                    Ok(v) if SIGNATURE.contains(&v) => {}
                    _ => {
                        counts.errors.fetch_add(1, Ordering::SeqCst);
                    }
                }
                n = n.wrapping_add(1);
                if mem.write_obj(n, GuestAddress(DEVICE_PAGE)).is_err() {
                    counts.errors.fetch_add(1, Ordering::SeqCst);
                }
                counts.device_reads.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let mut failures = Vec::new();
    for t in threads {
        match t.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failures.push(e),
            Err(_) => failures.push("a vCPU thread panicked".into()),
        }
    }
    device.join().map_err(|_| "the device thread panicked")?;
    if !failures.is_empty() {
        return Err(failures.join("; ").into());
    }
    // Migration's harvest: the device's writes are there, by the VMM's own memory.
    let mut chipset = chipset.lock().map_err(|_| "chipset poisoned")?;
    let dirty = chipset.updater.dirty_pages()?;
    if !dirty.contains(chipset.ram + DEVICE_PAGE) {
        return Err("the device's writes are missing from the harvest".into());
    }
    println!(
        "{vcpus} vCPUs: {} bank switches applied on vCPU 0's thread, {} guest reads and {} device \
         reads of the window, {} errors ({} internal); {} dirty page(s) harvested",
        counts.switches.load(Ordering::SeqCst),
        counts.reads.load(Ordering::SeqCst),
        counts.device_reads.load(Ordering::SeqCst),
        counts.errors.load(Ordering::SeqCst),
        counts.internal_errors.load(Ordering::SeqCst),
        dirty.len()
    );
    Ok(Some(counts))
}

#[allow(dead_code)] // Not called when `tests/example_vmm.rs` includes this file.
fn main() -> Result<(), Box<dyn Error>> {
    let naive = std::env::args().any(|a| a == "--naive");
    if let Some(counts) = run(4, 2_000, naive)? {
        let errors = counts.errors.load(Ordering::SeqCst);
        if errors != 0 {
            return Err(
                format!("{errors} errors: the guest or a device saw a half-applied map").into(),
            );
        }
    }
    Ok(())
}
