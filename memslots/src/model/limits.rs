//! What the kernel allows: slot count, address spaces, read-only and guest_memfd support.

use super::slot::{Ioctl, PAGE_SIZE};

/// The kernel's limits for one VM.
///
/// [`Limits::default`] holds x86-64's values on a current kernel; a KVM backend replaces them with
/// what `KVM_CHECK_EXTENSION` reports for the VM at hand.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Limits {
    /// Usable slot ids per address space (`KVM_CAP_NR_MEMSLOTS`; 32764 on x86-64).
    pub slots: u16,
    /// Address spaces (`KVM_CAP_MULTI_ADDRESS_SPACE`; 2 on x86-64 with SMM, otherwise 1).
    pub address_spaces: u16,
    /// Whether `KVM_MEM_READONLY` is accepted (`KVM_CAP_READONLY_MEM`).
    pub readonly: bool,
    /// Whether `KVM_SET_USER_MEMORY_REGION2` exists (`KVM_CAP_USER_MEMORY2`, Linux 6.8). Calls
    /// are judged as the backend sends them: v2 when it exists, v1 otherwise ([`Limits::ioctl`]).
    #[cfg_attr(feature = "serde", serde(default = "Limits::default_user_memory2"))]
    pub user_memory2: bool,
    /// Whether the VM accepts `KVM_MEM_GUEST_MEMFD` slots (`KVM_CAP_GUEST_MEMFD` on the VM: a VM
    /// type with private memory before Linux 6.17, any VM type of a kernel built with
    /// `CONFIG_KVM_GUEST_MEMFD` since). Only the v2 ioctl carries the flag.
    pub guest_memfd: bool,
    /// The page size alignment is checked against.
    pub page_size: u64,
    /// The largest `userspace_addr + memory_size` the kernel's `access_ok` accepts.
    ///
    /// x86-64 with 4-level paging: `TASK_SIZE_MAX` = `0x7fff_ffff_f000` (measured with
    /// `memslots conformance`: an end one page higher is refused, this one is accepted).
    pub user_addr_max: u64,
    /// Most pages one slot may have (`KVM_MEM_MAX_NR_PAGES` = 2^31 - 1).
    pub max_pages: u64,
    /// The highest guest frame number a slot's last page may have (x86's `kvm_mmu_max_gfn()`):
    /// a CREATE or MOVE reaching past it is refused with `EINVAL`.
    ///
    /// x86-64 default: 52-bit guest physical addresses, `2^40 - 1` (what KVM uses without TDP;
    /// with TDP it is the host's MAXPHYADDR). Measured here: `gpa=0xffffffffff000 size=0x1000` is
    /// accepted, `size=0x2000` refused.
    #[cfg_attr(feature = "serde", serde(default = "Limits::default_max_gfn"))]
    pub max_gfn: u64,
}

impl Limits {
    /// `KVM_USER_MEM_SLOTS` on x86-64.
    pub const X86_64_SLOTS: u16 = 32764;

    /// `kvm_mmu_max_gfn()` for `bits` of guest physical address.
    pub const fn max_gfn_for_bits(bits: u32) -> u64 {
        (1u64 << (bits - PAGE_SIZE.trailing_zeros())) - 1
    }

    fn default_max_gfn() -> u64 {
        Self::max_gfn_for_bits(52)
    }

    #[cfg(feature = "serde")]
    fn default_user_memory2() -> bool {
        true
    }

    /// The ioctl a backend sends calls with: v2 where the kernel has it.
    pub const fn ioctl(&self) -> Ioctl {
        if self.user_memory2 {
            Ioctl::V2
        } else {
            Ioctl::V1
        }
    }

    /// A slot id's raw limit check, as the ioctl does it first.
    pub fn id_in_range(&self, id: u16) -> bool {
        id < self.slots
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            slots: Self::X86_64_SLOTS,
            address_spaces: 2,
            readonly: true,
            user_memory2: true,
            // QEMU binds guest_memfd only for confidential VMs; an ordinary VM's trace never
            // sets the flag, and before 6.17 the default VM type refused it.
            guest_memfd: false,
            page_size: PAGE_SIZE,
            user_addr_max: 0x7fff_ffff_f000,
            max_pages: (1 << 31) - 1,
            max_gfn: Self::default_max_gfn(),
        }
    }
}
