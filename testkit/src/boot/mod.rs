//! `memslots boot`: real firmware drives the slot changes. A small i440fx VMM, built on the
//! library's embedding seams the way a VMM is built, boots Debian's SeaBIOS on N vCPUs; the
//! firmware's own PAM writes re-slot 0xc0000-0xfffff, each applied by memslots on the vCPU
//! thread that handled the write while the other vCPUs are in `KVM_RUN`.
//!
//! - [`pam`]: what the PAM and SMRAM registers map where.
//! - [`pci`]: config mechanism #1 and the i440fx host bridge.
//! - [`cmos`], [`fwcfg`]: the CMOS/RTC and fw_cfg SeaBIOS reads.
//! - `chipset`: PAM/SMRAM writes to listener commits applied with a strategy.
//! - `vmm`: the VM, its memory, view, vCPU threads and run loop.
//! - [`compare`]: the mapping after POST held against QEMU's trace of the same boot.

mod chipset;
pub mod cmos;
pub mod compare;
pub mod fwcfg;
pub mod pam;
pub mod pci;
mod vmm;

use std::path::PathBuf;
use std::time::Duration;

pub use chipset::CommitRecord;

use crate::strategy::Strategy;
use compare::{MapComparison, MapRun, QemuBoot};

/// Where Debian's `seabios` package puts the 128 KiB BIOS.
pub const DEFAULT_BIOS: &str = "/usr/share/seabios/bios.bin";
/// The most vCPUs: SeaBIOS counts CPUs in xAPIC mode below 256.
pub const MAX_VCPUS: usize = 255;
/// RAM bounds in MiB: SeaBIOS needs room above 1 MiB to relocate itself; the top stays below the
/// i440fx's PCI hole at 0xe0000000.
pub const MEMORY_MIB: std::ops::RangeInclusive<u64> = 16..=3584;

/// One boot's settings.
#[derive(Clone, Debug)]
pub struct BootConfig {
    /// The BIOS image.
    pub bios: PathBuf,
    /// vCPUs.
    pub vcpus: usize,
    /// RAM in MiB.
    pub memory_mib: u64,
    /// How PAM commits are applied.
    pub strategy: Strategy,
    /// Whether `hlt` exits to KVM (false: `KVM_CAP_X86_DISABLE_EXITS` with HLT, so a halted vCPU
    /// stays in guest mode).
    pub hlt_exits: bool,
    /// A boot that has not printed "No bootable device" by then fails.
    pub time_limit: Duration,
}

impl Default for BootConfig {
    fn default() -> Self {
        BootConfig {
            bios: PathBuf::from(DEFAULT_BIOS),
            vcpus: 4,
            memory_mib: 512,
            strategy: Strategy::Atomic,
            hlt_exits: true,
            time_limit: Duration::from_secs(60),
        }
    }
}

/// Why a boot could not be started (bad input or a host that cannot run it).
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The BIOS file does not exist.
    #[error("{}: no such BIOS image; install Debian's `seabios` package (apt-get install seabios) or pass --bios FILE", .0.display())]
    BiosMissing(PathBuf),
    /// The BIOS file cannot be read.
    #[error("cannot read BIOS image {}", .path.display())]
    BiosRead {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The BIOS file's size is not a BIOS image's.
    #[error("{}: {size} bytes is not a BIOS image (a multiple of 64 KiB, 128 KiB to 16 MiB)", .path.display())]
    BiosSize {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// `--vcpus` out of range.
    #[error("--vcpus must be 1 to {MAX_VCPUS}, not {0}")]
    Vcpus(usize),
    /// `--memory` out of range.
    #[error("--memory must be {lo} to {hi} MiB, not {0}", lo = MEMORY_MIB.start(), hi = MEMORY_MIB.end())]
    Memory(u64),
    /// `/dev/kvm` cannot be used.
    #[error("cannot open /dev/kvm or create a VM (this command needs KVM)")]
    Kvm(#[source] kvm_ioctls::Error),
    /// `--hlt-exits off` on a kernel that does not allow it.
    #[error("this kernel does not let HLT exits be disabled: KVM_CAP_X86_DISABLE_EXITS reports {0:#x} (HLT is {hlt:#x})", hlt = kvm_bindings::KVM_X86_DISABLE_EXITS_HLT)]
    HltExits(i32),
    /// Setting the VM up failed.
    #[error("setting up the VM: {0}")]
    Setup(String),
}

/// What one boot did.
#[derive(Clone, Debug)]
pub struct BootReport {
    /// The firmware's read-only PAM step (the last thing POST does) was applied: 0xf0000 left
    /// read-enabled, write-disabled.
    pub end_of_post: bool,
    /// "No bootable device" was printed.
    pub no_bootable_device: bool,
    /// N of "Found N cpu(s)".
    pub cpus_found: Option<u32>,
    /// Config writes that touched a PAM register.
    pub pam_writes: u64,
    /// Config writes that touched SMRAM.
    pub smram_writes: u64,
    /// The map changes applied, in order.
    pub commits: Vec<CommitRecord>,
    /// Slot ioctls of the whole boot, the reset map's included.
    pub ioctls: u64,
    /// Of those, the reset map's.
    pub init_ioctls: u64,
    /// `KVM_EXIT_INTERNAL_ERROR`s (the vCPU stops).
    pub internal_errors: u64,
    /// Exits a VMM has no business getting: spurious MMIO (a half-applied map), shutdown,
    /// failed entry, `KVM_RUN` errors, anything unhandled.
    pub unexpected_exits: u64,
    /// Of those, MMIO exits on memory every visible map had.
    pub spurious_exits: u64,
    /// Guest writes to read-only memory (dropped, as ROM does).
    pub rom_writes: u64,
    /// MMIO exits where nothing is mapped (reads return all ones).
    pub unassigned_mmio: u64,
    /// The time limit was hit.
    pub timed_out: bool,
    /// From starting the vCPUs to "No bootable device" (or to the end of the boot).
    pub boot_time: Duration,
    /// The OS thread id of each vCPU thread, by index.
    pub vcpu_tids: Vec<i32>,
    /// CPU time (user + system) each vCPU thread used, by index.
    pub vcpu_cpu_time: Vec<Duration>,
    /// The thread that set the VM up and waited for the boot.
    pub main_tid: i32,
    /// The mapping after the boot, address space 0.
    pub final_map: Vec<MapRun>,
    /// The PAM registers after the boot.
    pub final_pam: [u8; 7],
    /// Every slot call and what KVM returned (0 or `-errno`), in order.
    pub slot_calls: Vec<(memslots::model::SlotCall, i32)>,
    /// What went wrong, first few.
    pub problems: Vec<String>,
    /// SeaBIOS's debug-port output (the first 256 KiB).
    pub debug_log: String,
}

impl BootReport {
    /// Whether the boot went all the way, cleanly, finding every vCPU.
    pub fn ok(&self, vcpus: usize) -> bool {
        self.end_of_post
            && self.no_bootable_device
            && self.cpus_found == u32::try_from(vcpus).ok()
            && self.internal_errors == 0
            && self.unexpected_exits == 0
            && !self.timed_out
            && self.problems.is_empty()
    }

    /// Whether every commit was applied on a vCPU thread (not the main thread).
    pub fn commits_on_vcpu_threads(&self) -> bool {
        self.commits
            .iter()
            .all(|c| c.tid != self.main_tid && self.vcpu_tids.get(c.vcpu) == Some(&c.tid))
    }

    /// Holds the final map against QEMU's; `None` when RAM or BIOS sizes differ (not the same
    /// boot).
    pub fn compare_with(&self, qemu: &QemuBoot, ram: u64, bios: u64) -> Option<MapComparison> {
        if (qemu.ram, qemu.bios) != (ram, bios) {
            return None;
        }
        let pam = self.final_pam;
        let mode1 = |start: u64, end: u64| {
            (start..end)
                .step_by(0x1000)
                .all(|gpa| pam::piece_of(gpa).is_some_and(|i| pam::mode(&pam, i) == 1))
        };
        Some(compare::compare(&self.final_map, &qemu.runs, mode1))
    }

    /// The boot's slot calls in QEMU 7.2's trace format, one per line.
    pub fn trace(&self) -> String {
        let mut out = String::new();
        for (call, ret) in &self.slot_calls {
            out.push_str(&compare::trace_line(call, *ret));
            out.push('\n');
        }
        out
    }
}

/// Reads and checks the BIOS image.
pub fn read_bios(path: &std::path::Path) -> Result<Vec<u8>, BootError> {
    let image = std::fs::read(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            BootError::BiosMissing(path.to_owned())
        } else {
            BootError::BiosRead {
                path: path.to_owned(),
                source,
            }
        }
    })?;
    let size = image.len() as u64;
    if size % 0x1_0000 != 0 || !(0x2_0000..=16 << 20).contains(&size) {
        return Err(BootError::BiosSize {
            path: path.to_owned(),
            size,
        });
    }
    Ok(image)
}

/// Checks the settings that need no KVM.
pub fn check(cfg: &BootConfig) -> Result<(), BootError> {
    if !(1..=MAX_VCPUS).contains(&cfg.vcpus) {
        return Err(BootError::Vcpus(cfg.vcpus));
    }
    if !MEMORY_MIB.contains(&cfg.memory_mib) {
        return Err(BootError::Memory(cfg.memory_mib));
    }
    Ok(())
}

/// Boots `image` once with `cfg` on a fresh VM and reports what happened. An `Err` means the
/// boot could not be started; a boot that started and failed is an `Ok` report that is not ok.
pub fn boot(cfg: &BootConfig, image: &[u8]) -> Result<BootReport, BootError> {
    check(cfg)?;
    vmm::run(cfg, image)
}

/// This thread's OS id.
pub(crate) fn gettid() -> i32 {
    // SAFETY: gettid takes no argument and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

pub(crate) use crate::error_chain as chain;
