//! A KVM VM: creation, the kernel's limits, and the raw slot call.

use kvm_bindings::{
    kvm_userspace_memory_region, KVM_CAP_MULTI_ADDRESS_SPACE, KVM_CAP_VM_GPA_BITS,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VmFd};

use crate::model::{Limits, SlotCall};

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

/// A VM on `/dev/kvm` and the limits its kernel reports.
#[derive(Debug)]
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    limits: Limits,
}

impl Vm {
    /// Opens `/dev/kvm` and creates a VM.
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

    /// Makes one raw `KVM_SET_USER_MEMORY_REGION` call; `Err` carries the kernel's errno.
    ///
    /// # Safety
    ///
    /// If the kernel accepts the call, `[call.host, call.host + call.size)` must stay mapped (or
    /// never be touched by a vCPU or the kernel) for as long as the slot exists: KVM maps guest
    /// memory from it without further checks.
    pub unsafe fn set_region(&self, call: &SlotCall) -> Result<(), i32> {
        let region = kvm_userspace_memory_region {
            slot: call.slot,
            flags: call.flags,
            guest_phys_addr: call.gpa,
            memory_size: call.size,
            userspace_addr: call.host,
        };
        // SAFETY: the caller guarantees the host range outlives the slot (see `# Safety`).
        unsafe { self.fd.set_user_memory_region(region) }.map_err(|e| e.errno())
    }

    /// Reads and clears the dirty bitmap of a slot; `Err` carries the kernel's errno
    /// (`ENOENT` when the slot does not exist or does not log dirty pages).
    pub fn dirty_log(&self, slot: u32, size: u64) -> Result<Vec<u64>, i32> {
        self.fd
            .get_dirty_log(slot, size as usize)
            .map_err(|e| e.errno())
    }
}

/// The limits `KVM_CHECK_EXTENSION` reports on `vm`, defaults elsewhere.
fn read_limits(kvm: &Kvm, vm: &VmFd) -> Limits {
    let defaults = Limits::default();
    let slots = vm.check_extension_int(Cap::NrMemslots);
    let spaces = vm.check_extension_raw(KVM_CAP_MULTI_ADDRESS_SPACE.into());
    Limits {
        slots: u16::try_from(slots).unwrap_or(defaults.slots),
        // 0 means the capability is absent: one address space.
        address_spaces: u16::try_from(spaces.max(1)).unwrap_or(1),
        readonly: vm.check_extension(Cap::ReadonlyMem),
        // This library drives the v1 ioctl, which never accepts GUEST_MEMFD.
        guest_memfd: false,
        max_gfn: max_gfn(kvm, vm).unwrap_or(defaults.max_gfn),
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
