//! KVM's rules for one slot call: what a call does, or why the kernel refuses it.

use std::fmt;

use super::slot::SlotId;

/// What an accepted slot call does, as KVM's `enum kvm_mr_change` (plus the no-op).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "SCREAMING_SNAKE_CASE"))]
pub enum Change {
    /// A new slot (`KVM_MR_CREATE`).
    Create,
    /// The slot is removed (`KVM_MR_DELETE`); all its mappings are zapped.
    Delete,
    /// The slot's base GPA changes (`KVM_MR_MOVE`); all its mappings are zapped.
    Move,
    /// Only `LOG_DIRTY_PAGES` changes (`KVM_MR_FLAGS_ONLY`); nothing is zapped.
    FlagsOnly,
    /// The call matches the slot exactly: success, nothing done.
    Unchanged,
}

impl Change {
    /// Whether KVM zaps every mapping of the old slot for this change.
    pub const fn zaps(self) -> bool {
        matches!(self, Change::Delete | Change::Move)
    }
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Change::Create => "CREATE",
            Change::Delete => "DELETE",
            Change::Move => "MOVE",
            Change::FlagsOnly => "FLAGS_ONLY",
            Change::Unchanged => "UNCHANGED",
        })
    }
}

/// A KVM rule that refuses a slot call; each carries the errno the kernel returns.
///
/// The guest_memfd rules follow Linux 6.18 (`kvm_set_memory_region`, `kvm_gmem_bind`). Binding
/// to a file the [`Layout`](super::Layout) has not been told about
/// ([`Layout::add_guest_memfd`](super::Layout::add_guest_memfd)) is the kernel's call alone: the
/// model cannot see file descriptors, so it accepts such a CREATE and the kernel may still refuse
/// it with `EBADF` (no such open fd) or `EINVAL` (not a guest_memfd of this VM, the range past the
/// file's end, or a range another slot is bound to).
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum Rule {
    /// A v2 call on a kernel without `KVM_SET_USER_MEMORY_REGION2` (unknown ioctl).
    #[error("this kernel has no KVM_SET_USER_MEMORY_REGION2")]
    V2Unsupported,
    /// `KVM_SET_USER_MEMORY_REGION` (v1) accepts only `LOG_DIRTY_PAGES` and `READONLY`; checked
    /// by the ioctl before anything else.
    #[error("flags {flags:#x} need KVM_SET_USER_MEMORY_REGION2")]
    FlagsNeedV2 {
        /// The raw flags.
        flags: u32,
    },
    /// The slot id is at or above `KVM_CAP_NR_MEMSLOTS` (checked first, by the ioctl itself).
    #[error("slot id {id} is not below the slot limit {limit}")]
    SlotIdOutOfRange {
        /// The id asked for.
        id: u16,
        /// `KVM_CAP_NR_MEMSLOTS`.
        limit: u16,
    },
    /// A flag the kernel does not know, or READONLY without `KVM_CAP_READONLY_MEM`.
    #[error("flags {flags:#x} are not accepted")]
    InvalidFlags {
        /// The raw flags.
        flags: u32,
    },
    /// `GUEST_MEMFD` on a VM that does not accept guest_memfd slots.
    #[error("flags {flags:#x}: this VM has no guest_memfd support")]
    GuestMemfdUnsupported {
        /// The raw flags.
        flags: u32,
    },
    /// `GUEST_MEMFD` with `LOG_DIRTY_PAGES` (no dirty logging of private memory) or with
    /// `READONLY` (writes to a read-only slot exit as MMIO, which private memory cannot).
    #[error("flags {flags:#x}: GUEST_MEMFD goes with neither LOG_DIRTY_PAGES nor READONLY")]
    GuestMemfdFlags {
        /// The raw flags.
        flags: u32,
    },
    /// `guest_memfd_offset` is not page aligned (checked with the other alignments).
    #[error("guest_memfd offset {offset:#x} is not page aligned")]
    GuestMemfdOffsetUnaligned {
        /// The offset asked for.
        offset: u64,
    },
    /// `guest_memfd_offset + memory_size` wraps around.
    #[error("guest_memfd range {offset:#x}+{size:#x} wraps")]
    GuestMemfdOffsetWraps {
        /// The offset asked for.
        offset: u64,
        /// The size asked for.
        size: u64,
    },
    /// `memory_size` is not a multiple of the page size.
    #[error("size {size:#x} is not page aligned")]
    UnalignedSize {
        /// The size asked for.
        size: u64,
    },
    /// `guest_phys_addr` is not page aligned.
    #[error("guest physical address {gpa:#x} is not page aligned")]
    UnalignedGpa {
        /// The GPA asked for.
        gpa: u64,
    },
    /// `userspace_addr` is not page aligned.
    #[error("host address {host:#x} is not page aligned")]
    UnalignedHost {
        /// The host address asked for.
        host: u64,
    },
    /// `[userspace_addr, userspace_addr + memory_size)` is not a valid user range.
    #[error("host range {host:#x}+{size:#x} is not a valid user range")]
    InvalidHostRange {
        /// The host address asked for.
        host: u64,
        /// The size asked for.
        size: u64,
    },
    /// The address space (bits 16-31 of `slot`) is not below `KVM_CAP_MULTI_ADDRESS_SPACE`.
    #[error("address space {address_space} is not below {limit}")]
    AddressSpaceOutOfRange {
        /// The address space asked for.
        address_space: u16,
        /// The number of address spaces.
        limit: u16,
    },
    /// `guest_phys_addr + memory_size` wraps around.
    #[error("guest range {gpa:#x}+{size:#x} wraps")]
    GpaWraps {
        /// The GPA asked for.
        gpa: u64,
        /// The size asked for.
        size: u64,
    },
    /// More than `KVM_MEM_MAX_NR_PAGES` (2^31 - 1) pages.
    #[error("{pages} pages is more than one slot may hold")]
    TooManyPages {
        /// Pages asked for.
        pages: u64,
    },
    /// `memory_size == 0` on a slot that does not exist.
    #[error("slot {id} does not exist, so it cannot be deleted")]
    DeleteMissing {
        /// The slot asked for.
        id: SlotId,
    },
    /// An existing slot cannot be resized or remapped to another host address.
    #[error("slot {id} exists: its size and host address cannot change")]
    Immutable {
        /// The slot asked for.
        id: SlotId,
    },
    /// An existing slot cannot toggle READONLY.
    #[error("slot {id} exists: READONLY cannot be toggled in place")]
    ReadonlyToggle {
        /// The slot asked for.
        id: SlotId,
    },
    /// A call with `GUEST_MEMFD` on a slot that exists: guest_memfd slots are never changed,
    /// only deleted (checked before the other rules for existing slots).
    #[error("slot {id} exists: a GUEST_MEMFD call can only create a slot")]
    GuestMemfdImmutable {
        /// The slot asked for.
        id: SlotId,
    },
    /// A call without `GUEST_MEMFD` on a guest_memfd slot (a MOVE, a flags change, or the same
    /// slot without the flag). Refused since Linux 6.19 (backported to 6.18.3 and 6.12.64);
    /// older kernels accepted it and kept the guest_memfd bound to the freed slot.
    #[error("slot {id} is backed by guest_memfd: GUEST_MEMFD cannot be dropped")]
    GuestMemfdToggle {
        /// The slot asked for.
        id: SlotId,
    },
    /// A CREATE whose `[guest_memfd_offset, + memory_size)` is not inside its guest_memfd
    /// (`kvm_gmem_bind`, after the overlap check; an offset of 2^63 or more is negative there).
    #[error("guest_memfd {fd} range {offset:#x}+{size:#x} is not inside its {file_size:#x} bytes")]
    GuestMemfdRange {
        /// The guest_memfd.
        fd: u32,
        /// The offset asked for.
        offset: u64,
        /// The size asked for.
        size: u64,
        /// The file's size.
        file_size: u64,
    },
    /// A CREATE whose guest_memfd range is already bound to another slot (`kvm_gmem_bind`).
    #[error("guest_memfd {fd}: the range is bound to slot {other}")]
    GuestMemfdBound {
        /// The guest_memfd.
        fd: u32,
        /// The slot bound there.
        other: SlotId,
    },
    /// A CREATE or MOVE whose last page is past the highest guest frame the host's MMU maps
    /// (x86's `kvm_arch_prepare_memory_region`, after the overlap check).
    #[error("last guest frame {last_gfn:#x} is past the maximum guest frame {max_gfn:#x}")]
    GfnTooHigh {
        /// The slot's last frame.
        last_gfn: u64,
        /// [`Limits::max_gfn`](super::Limits::max_gfn).
        max_gfn: u64,
    },
    /// A CREATE or MOVE would overlap another slot of the same address space.
    #[error("the range overlaps slot {other}")]
    Overlap {
        /// The slot already there.
        other: SlotId,
    },
}

impl Rule {
    /// The errno KVM returns for this rule.
    pub const fn errno(&self) -> i32 {
        match self {
            Rule::Overlap { .. } => libc::EEXIST,
            Rule::V2Unsupported => libc::ENOTTY,
            _ => libc::EINVAL,
        }
    }

    /// A short stable name for the rule (for reports and JSON).
    pub const fn name(&self) -> &'static str {
        match self {
            Rule::V2Unsupported => "v2_unsupported",
            Rule::FlagsNeedV2 { .. } => "flags_need_v2",
            Rule::SlotIdOutOfRange { .. } => "slot_id_out_of_range",
            Rule::InvalidFlags { .. } => "invalid_flags",
            Rule::GuestMemfdUnsupported { .. } => "guest_memfd_unsupported",
            Rule::GuestMemfdFlags { .. } => "guest_memfd_flags",
            Rule::GuestMemfdOffsetUnaligned { .. } => "guest_memfd_offset_unaligned",
            Rule::GuestMemfdOffsetWraps { .. } => "guest_memfd_offset_wraps",
            Rule::UnalignedSize { .. } => "unaligned_size",
            Rule::UnalignedGpa { .. } => "unaligned_gpa",
            Rule::UnalignedHost { .. } => "unaligned_host",
            Rule::InvalidHostRange { .. } => "invalid_host_range",
            Rule::AddressSpaceOutOfRange { .. } => "address_space_out_of_range",
            Rule::GpaWraps { .. } => "gpa_wraps",
            Rule::TooManyPages { .. } => "too_many_pages",
            Rule::DeleteMissing { .. } => "delete_missing",
            Rule::Immutable { .. } => "immutable",
            Rule::ReadonlyToggle { .. } => "readonly_toggle",
            Rule::GuestMemfdImmutable { .. } => "guest_memfd_immutable",
            Rule::GuestMemfdToggle { .. } => "guest_memfd_toggle",
            Rule::GuestMemfdRange { .. } => "guest_memfd_range",
            Rule::GuestMemfdBound { .. } => "guest_memfd_bound",
            Rule::Overlap { .. } => "overlap",
            Rule::GfnTooHigh { .. } => "gfn_too_high",
        }
    }
}
