//! The VM slot calls are made on: [`SlotVm`], what memslots needs of a hypervisor's VM, for a VMM
//! to implement over its own abstraction (as Cloud Hypervisor's `hypervisor::Vm` is); implemented
//! here for `kvm_ioctls::VmFd` (a VMM's own VM fd) and for [`Vm`] (one memslots creates).

use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::OnceLock;

use kvm_bindings::{
    kvm_create_guest_memfd, kvm_userspace_memory_region, kvm_userspace_memory_region2,
    KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_MULTI_ADDRESS_SPACE,
    KVM_CAP_VM_GPA_BITS, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VmFd};

use crate::model::{Ioctl, Limits, SlotCall};

/// Errors from `/dev/kvm`.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// `/dev/kvm` could not be opened (missing module, no permission).
    #[error("cannot open /dev/kvm (is the kvm module loaded and is /dev/kvm readable and writable by you?)")]
    Open(#[source] kvm_ioctls::Error),
    /// `KVM_CREATE_VM` failed.
    #[error("KVM_CREATE_VM failed")]
    CreateVm(#[source] kvm_ioctls::Error),
}

/// What memslots needs of a VM: the kernel's limits, the raw slot call and the dirty bitmap.
///
/// The VMM keeps its VM: it hands memslots something implementing this (its `VmFd`, an
/// `Arc<VmFd>`, or its own type) and goes on using the VM for everything else. It must not make
/// slot calls or read dirty bitmaps of its own behind memslots' back: the library's layout would
/// no longer be the kernel's, and the bits it read would be lost to the library's harvest.
pub trait SlotVm: Send + Sync + std::fmt::Debug {
    /// The limits the kernel reports for this VM (read once, when a slot table is made).
    fn limits(&self) -> Limits;

    /// Makes one raw slot call, with `KVM_SET_USER_MEMORY_REGION2` where the kernel has it
    /// (the ioctl [`Limits::ioctl`] names: the model judges calls as sent that way) and
    /// `KVM_SET_USER_MEMORY_REGION` otherwise; `Err` carries the kernel's errno. A
    /// `GUEST_MEMFD` call therefore reaches the kernel only through v2.
    ///
    /// # Safety
    ///
    /// If the kernel accepts the call, `[call.host, call.host + call.size)` must stay mapped (or
    /// never be touched by a vCPU or the kernel) for as long as the slot exists: KVM maps guest
    /// memory from it without further checks.
    unsafe fn set_region(&self, call: &SlotCall) -> Result<(), i32>;

    /// Reads and clears the dirty bitmap of a slot (`KVM_GET_DIRTY_LOG`), one bit per page of
    /// `size` bytes; `Err` carries the kernel's errno (`ENOENT` when the slot does not exist or
    /// does not log dirty pages).
    fn dirty_log(&self, slot: u32, size: u64) -> Result<Vec<u64>, i32>;

    /// The largest dirty ring per vCPU the kernel allows, in bytes (0: none).
    fn dirty_ring_max(&self) -> u32 {
        0
    }

    /// Puts the VM in dirty-ring mode with rings of `bytes` per vCPU (before any vCPU exists).
    fn enable_dirty_ring(&self, _bytes: u32) -> Result<(), i32> {
        Err(libc::ENOTTY)
    }

    /// `KVM_RESET_DIRTY_RINGS`: re-protects the pages of harvested ring entries and frees them.
    fn reset_dirty_rings(&self) -> Result<u32, i32> {
        Err(libc::ENOTTY)
    }
}

vmm_sys_util::ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, kvm_bindings::KVMIO, 0xc7);

/// The dirty-ring capability to enable: the acquire/release one where the kernel has it.
fn ring_cap(vm: &VmFd) -> Option<(u32, u32)> {
    [KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_DIRTY_LOG_RING]
        .into_iter()
        .map(|cap| (cap, vm.check_extension_raw(cap.into())))
        .find(|&(_, max)| max > 0)
        .map(|(cap, max)| (cap, u32::try_from(max).unwrap_or(u32::MAX)))
}

impl SlotVm for VmFd {
    fn limits(&self) -> Limits {
        // The CPUID read behind the GPA bound needs `/dev/kvm`; without it, x86-64's default.
        match Kvm::new() {
            Ok(kvm) => read_limits(&kvm, self),
            Err(_) => read_limits_without_kvm(self),
        }
    }

    unsafe fn set_region(&self, call: &SlotCall) -> Result<(), i32> {
        // The capability is the kernel's, not the VM's: asked once per process.
        static USER_MEMORY2: OnceLock<bool> = OnceLock::new();
        let v2 = *USER_MEMORY2.get_or_init(|| self.check_extension(Cap::UserMemory2));
        let ioctl = if v2 { Ioctl::V2 } else { Ioctl::V1 };
        // SAFETY: the caller guarantees the host range outlives the slot (see the trait).
        unsafe { set_region_with(self, call, ioctl) }
    }

    fn dirty_log(&self, slot: u32, size: u64) -> Result<Vec<u64>, i32> {
        self.get_dirty_log(slot, size as usize)
            .map_err(|e| e.errno())
    }

    fn dirty_ring_max(&self) -> u32 {
        ring_cap(self).map_or(0, |(_, max)| max)
    }

    fn enable_dirty_ring(&self, bytes: u32) -> Result<(), i32> {
        let (cap, _) = ring_cap(self).ok_or(libc::EINVAL)?;
        let enable = kvm_bindings::kvm_enable_cap {
            cap,
            args: [u64::from(bytes), 0, 0, 0],
            ..Default::default()
        };
        self.enable_cap(&enable).map_err(|e| e.errno())
    }

    fn reset_dirty_rings(&self) -> Result<u32, i32> {
        // SAFETY: KVM_RESET_DIRTY_RINGS takes no argument and only touches the VM's own rings.
        let ret = unsafe { vmm_sys_util::ioctl::ioctl(self, KVM_RESET_DIRTY_RINGS()) };
        if ret < 0 {
            Err(vmm_sys_util::errno::Error::last().errno())
        } else {
            Ok(ret as u32)
        }
    }
}

/// One slot call through the given ioctl.
///
/// # Safety
///
/// As [`SlotVm::set_region`].
unsafe fn set_region_with(vm: &VmFd, call: &SlotCall, ioctl: Ioctl) -> Result<(), i32> {
    let result = match ioctl {
        // SAFETY: the caller guarantees the host range outlives the slot (see the trait).
        Ioctl::V1 => unsafe { vm.set_user_memory_region(region_of(call)) },
        // SAFETY: as above; the guest_memfd (if any) is the kernel's to check.
        Ioctl::V2 => unsafe { vm.set_user_memory_region2(region2_of(call)) },
    };
    result.map_err(|e| e.errno())
}

impl<T: SlotVm + ?Sized> SlotVm for std::sync::Arc<T> {
    fn limits(&self) -> Limits {
        (**self).limits()
    }

    unsafe fn set_region(&self, call: &SlotCall) -> Result<(), i32> {
        // SAFETY: forwarded with the caller's guarantee.
        unsafe { (**self).set_region(call) }
    }

    fn dirty_log(&self, slot: u32, size: u64) -> Result<Vec<u64>, i32> {
        (**self).dirty_log(slot, size)
    }

    fn dirty_ring_max(&self) -> u32 {
        (**self).dirty_ring_max()
    }

    fn enable_dirty_ring(&self, bytes: u32) -> Result<(), i32> {
        (**self).enable_dirty_ring(bytes)
    }

    fn reset_dirty_rings(&self) -> Result<u32, i32> {
        (**self).reset_dirty_rings()
    }
}

/// A VM on `/dev/kvm` that memslots creates, and the limits its kernel reports.
#[derive(Debug)]
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    limits: Limits,
}

impl Vm {
    /// Opens `/dev/kvm` and creates a VM (the default VM type; on x86 guest_memfd slots need a
    /// kernel built with `CONFIG_KVM_GUEST_MEMFD`, 6.17 or later, or another VM type).
    pub fn new() -> Result<Self, KvmError> {
        let kvm = Kvm::new().map_err(KvmError::Open)?;
        let fd = kvm.create_vm().map_err(KvmError::CreateVm)?;
        let limits = read_limits(&kvm, &fd);
        Ok(Vm { kvm, fd, limits })
    }

    /// The limits the kernel reports for this VM.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The `/dev/kvm` handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The VM file descriptor.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Makes one raw slot call with the ioctl [`Limits::ioctl`] names (v2 where the kernel has
    /// it); `Err` carries the kernel's errno.
    ///
    /// # Safety
    ///
    /// As [`SlotVm::set_region`].
    pub unsafe fn set_region(&self, call: &SlotCall) -> Result<(), i32> {
        // SAFETY: the caller's guarantee, passed on.
        unsafe { self.set_region_ioctl(call, self.limits.ioctl()) }
    }

    /// Makes one raw slot call with the ioctl given (v2 on a kernel without it fails with
    /// `ENOTTY`, as the model says); `Err` carries the kernel's errno.
    ///
    /// # Safety
    ///
    /// As [`SlotVm::set_region`].
    pub unsafe fn set_region_ioctl(&self, call: &SlotCall, ioctl: Ioctl) -> Result<(), i32> {
        // SAFETY: the caller's guarantee, passed on.
        unsafe { set_region_with(&self.fd, call, ioctl) }
    }

    /// Creates a guest_memfd of `size` bytes for this VM (`KVM_CREATE_GUEST_MEMFD`, no flags);
    /// `Err` carries the kernel's errno. Slots bind to it with `GUEST_MEMFD`; tell a model about
    /// it with [`Layout::add_guest_memfd`](crate::model::Layout::add_guest_memfd).
    pub fn create_guest_memfd(&self, size: u64) -> Result<OwnedFd, i32> {
        let args = kvm_create_guest_memfd {
            size,
            flags: 0,
            reserved: [0; 6],
        };
        let fd = self.fd.create_guest_memfd(args).map_err(|e| e.errno())?;
        // SAFETY: the kernel just returned this fd, open and owned by nothing else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Reads and clears the dirty bitmap of a slot: [`SlotVm::dirty_log`].
    pub fn dirty_log(&self, slot: u32, size: u64) -> Result<Vec<u64>, i32> {
        SlotVm::dirty_log(&self.fd, slot, size)
    }
}

impl SlotVm for Vm {
    fn limits(&self) -> Limits {
        self.limits
    }

    unsafe fn set_region(&self, call: &SlotCall) -> Result<(), i32> {
        // SAFETY: the caller's guarantee, passed on.
        unsafe { Vm::set_region(self, call) }
    }

    fn dirty_log(&self, slot: u32, size: u64) -> Result<Vec<u64>, i32> {
        Vm::dirty_log(self, slot, size)
    }

    fn dirty_ring_max(&self) -> u32 {
        self.fd.dirty_ring_max()
    }

    fn enable_dirty_ring(&self, bytes: u32) -> Result<(), i32> {
        self.fd.enable_dirty_ring(bytes)
    }

    fn reset_dirty_rings(&self) -> Result<u32, i32> {
        self.fd.reset_dirty_rings()
    }
}

/// The raw region of a call.
fn region_of(call: &SlotCall) -> kvm_userspace_memory_region {
    kvm_userspace_memory_region {
        slot: call.slot,
        flags: call.flags,
        guest_phys_addr: call.gpa,
        memory_size: call.size,
        userspace_addr: call.host,
    }
}

/// The v2 region of a call.
fn region2_of(call: &SlotCall) -> kvm_userspace_memory_region2 {
    kvm_userspace_memory_region2 {
        slot: call.slot,
        flags: call.flags,
        guest_phys_addr: call.gpa,
        memory_size: call.size,
        userspace_addr: call.host,
        guest_memfd_offset: call.guest_memfd_offset,
        guest_memfd: call.guest_memfd,
        ..Default::default()
    }
}

/// [`read_limits`] where `/dev/kvm` cannot be opened again: the GPA bound stays x86-64's.
fn read_limits_without_kvm(vm: &VmFd) -> Limits {
    let defaults = Limits::default();
    Limits {
        max_gfn: defaults.max_gfn,
        ..limits_from_caps(vm)
    }
}

/// The limits `KVM_CHECK_EXTENSION` reports on `vm`, defaults elsewhere.
fn read_limits(kvm: &Kvm, vm: &VmFd) -> Limits {
    Limits {
        max_gfn: max_gfn(kvm, vm).unwrap_or(Limits::default().max_gfn),
        ..limits_from_caps(vm)
    }
}

/// The limits `KVM_CHECK_EXTENSION` on the VM reports (the GPA bound left at its default).
fn limits_from_caps(vm: &VmFd) -> Limits {
    let defaults = Limits::default();
    let slots = vm.check_extension_int(Cap::NrMemslots);
    let spaces = vm.check_extension_raw(KVM_CAP_MULTI_ADDRESS_SPACE.into());
    let user_memory2 = vm.check_extension(Cap::UserMemory2);
    Limits {
        slots: u16::try_from(slots).unwrap_or(defaults.slots),
        // 0 means the capability is absent: one address space.
        address_spaces: u16::try_from(spaces.max(1)).unwrap_or(1),
        readonly: vm.check_extension(Cap::ReadonlyMem),
        user_memory2,
        // Asked of the VM: before 6.17 it depends on the VM type (private memory). Only v2
        // carries the flag, so without v2 this VM never takes it.
        guest_memfd: user_memory2 && vm.check_extension(Cap::GuestMemfd),
        ..defaults
    }
}

/// `kvm_mmu_max_gfn()`, where it can be known: `KVM_CAP_VM_GPA_BITS` where the kernel reports it
/// (x86 reports 0); on x86 with TDP (EPT/NPT) the host's MAXPHYADDR, which
/// `KVM_GET_SUPPORTED_CPUID` leaf 0x80000008 passes through unchanged in that case. Without TDP
/// KVM's bound is 52 bits, the default.
fn max_gfn(kvm: &Kvm, vm: &VmFd) -> Option<u64> {
    let bits = vm.check_extension_raw(KVM_CAP_VM_GPA_BITS.into());
    if (13..=64).contains(&bits) {
        return Some(Limits::max_gfn_for_bits(bits as u32));
    }
    let tdp = [
        "/sys/module/kvm_intel/parameters/ept",
        "/sys/module/kvm_amd/parameters/npt",
    ]
    .iter()
    .any(|p| std::fs::read_to_string(p).is_ok_and(|v| matches!(v.trim(), "Y" | "1")));
    if !tdp {
        return None;
    }
    let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).ok()?;
    let leaf = cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == 0x8000_0008)?;
    let bits = leaf.eax & 0xff;
    (32..=52)
        .contains(&bits)
        .then(|| Limits::max_gfn_for_bits(bits))
}
