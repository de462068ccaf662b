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
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum Rule {
    /// The slot id is at or above `KVM_CAP_NR_MEMSLOTS` (checked first, by the ioctl itself).
    #[error("slot id {id} is not below the slot limit {limit}")]
    SlotIdOutOfRange {
        /// The id asked for.
        id: u16,
        /// `KVM_CAP_NR_MEMSLOTS`.
        limit: u16,
    },
    /// A flag the kernel does not accept here (unknown bits, READONLY without support,
    /// GUEST_MEMFD on v1 or without support, or GUEST_MEMFD with LOG_DIRTY_PAGES/READONLY).
    #[error("flags {flags:#x} are not accepted")]
    InvalidFlags {
        /// The raw flags.
        flags: u32,
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
    /// A guest_memfd slot can only be deleted.
    #[error("slot {id} is backed by guest_memfd and can only be deleted")]
    GuestMemfdImmutable {
        /// The slot asked for.
        id: SlotId,
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
            _ => libc::EINVAL,
        }
    }

    /// A short stable name for the rule (for reports and JSON).
    pub const fn name(&self) -> &'static str {
        match self {
            Rule::SlotIdOutOfRange { .. } => "slot_id_out_of_range",
            Rule::InvalidFlags { .. } => "invalid_flags",
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
            Rule::Overlap { .. } => "overlap",
            Rule::GfnTooHigh { .. } => "gfn_too_high",
        }
    }
}
