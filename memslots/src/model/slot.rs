//! Slots, slot ids, flags and the raw slot call.

use std::fmt;

/// The page size KVM checks alignment against on x86-64.
pub const PAGE_SIZE: u64 = 4096;

/// A slot's identity: address space (bits 16-31 of KVM's `slot` field) and id (bits 0-15).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct SlotId {
    /// Address space (0 is normal memory, 1 is SMM on x86).
    pub address_space: u16,
    /// Slot number within the address space.
    pub id: u16,
}

impl SlotId {
    /// A slot id in address space 0.
    pub const fn new(id: u16) -> Self {
        SlotId {
            address_space: 0,
            id,
        }
    }

    /// A slot id in the given address space.
    pub const fn in_space(address_space: u16, id: u16) -> Self {
        SlotId { address_space, id }
    }

    /// Decodes KVM's `slot` field.
    pub const fn from_raw(raw: u32) -> Self {
        SlotId {
            address_space: (raw >> 16) as u16,
            id: raw as u16,
        }
    }

    /// Encodes KVM's `slot` field (`address_space << 16 | id`).
    pub const fn raw(self) -> u32 {
        (self.address_space as u32) << 16 | self.id as u32
    }
}

impl fmt::Display for SlotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.address_space, self.id)
    }
}

/// Slot flags, as in `kvm_userspace_memory_region::flags`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(transparent))]
pub struct SlotFlags(pub u32);

impl SlotFlags {
    /// No flag.
    pub const NONE: SlotFlags = SlotFlags(0);
    /// `KVM_MEM_LOG_DIRTY_PAGES`: keep a dirty bitmap for the slot.
    pub const LOG_DIRTY_PAGES: SlotFlags = SlotFlags(1);
    /// `KVM_MEM_READONLY`: guest writes exit as MMIO.
    pub const READONLY: SlotFlags = SlotFlags(2);
    /// `KVM_MEM_GUEST_MEMFD`: private memory from a guest_memfd (v2 ioctl only).
    pub const GUEST_MEMFD: SlotFlags = SlotFlags(4);

    /// The raw bits.
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// Whether every bit of `other` is set.
    pub const fn contains(self, other: SlotFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether the slot is read-only for the guest.
    pub const fn readonly(self) -> bool {
        self.contains(Self::READONLY)
    }

    /// Whether dirty logging is on.
    pub const fn log_dirty(self) -> bool {
        self.contains(Self::LOG_DIRTY_PAGES)
    }

    /// These flags with `other` set (`on`) or cleared.
    pub const fn with(self, other: SlotFlags, on: bool) -> SlotFlags {
        if on {
            SlotFlags(self.0 | other.0)
        } else {
            SlotFlags(self.0 & !other.0)
        }
    }
}

impl std::ops::BitOr for SlotFlags {
    type Output = SlotFlags;
    fn bitor(self, rhs: SlotFlags) -> SlotFlags {
        SlotFlags(self.0 | rhs.0)
    }
}

impl fmt::Debug for SlotFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names = Vec::new();
        if self.log_dirty() {
            names.push("LOG_DIRTY_PAGES");
        }
        if self.readonly() {
            names.push("READONLY");
        }
        if self.contains(Self::GUEST_MEMFD) {
            names.push("GUEST_MEMFD");
        }
        let rest = self.0 & !7;
        if rest != 0 || names.is_empty() {
            write!(f, "{:#x}", self.0)
        } else {
            write!(f, "{}", names.join("|"))
        }
    }
}

/// A memory slot as KVM holds it: a guest-physical range backed by host memory.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Slot {
    /// Address space and id.
    pub id: SlotId,
    /// First guest-physical address.
    pub gpa: u64,
    /// Size in bytes (a non-zero multiple of the page size).
    pub size: u64,
    /// Host (userspace) address of the first byte.
    pub host: u64,
    /// `LOG_DIRTY_PAGES` / `READONLY` / `GUEST_MEMFD`.
    pub flags: SlotFlags,
    /// The guest_memfd file descriptor a `GUEST_MEMFD` slot is bound to (0 otherwise).
    #[cfg_attr(feature = "serde", serde(default, skip_serializing_if = "is_zero_u32"))]
    pub guest_memfd: u32,
    /// Offset of the slot's first page in its guest_memfd (0 without `GUEST_MEMFD`).
    #[cfg_attr(feature = "serde", serde(default, skip_serializing_if = "is_zero_u64"))]
    pub guest_memfd_offset: u64,
}

impl Slot {
    /// One past the last guest-physical address.
    pub const fn end(&self) -> u64 {
        self.gpa + self.size
    }

    /// Whether `gpa` falls in the slot.
    pub const fn contains(&self, gpa: u64) -> bool {
        gpa >= self.gpa && gpa < self.end()
    }

    /// Host address of `gpa`, which must fall in the slot.
    pub const fn host_of(&self, gpa: u64) -> u64 {
        self.host + (gpa - self.gpa)
    }

    /// Number of pages.
    pub const fn pages(&self) -> u64 {
        self.size / PAGE_SIZE
    }

    /// Whether the slot is backed by a guest_memfd (`KVM_MEM_GUEST_MEMFD`).
    pub const fn is_guest_memfd(&self) -> bool {
        self.flags.contains(SlotFlags::GUEST_MEMFD)
    }

    /// The raw call that creates this slot (or changes an existing one to it).
    pub const fn set_call(&self) -> SlotCall {
        SlotCall {
            slot: self.id.raw(),
            flags: self.flags.0,
            gpa: self.gpa,
            size: self.size,
            host: self.host,
            guest_memfd: self.guest_memfd,
            guest_memfd_offset: self.guest_memfd_offset,
        }
    }

    /// The raw call that deletes this slot.
    pub const fn delete_call(&self) -> SlotCall {
        SlotCall {
            size: 0,
            ..self.set_call()
        }
    }
}

/// One raw slot call (`kvm_userspace_memory_region2`, of which `KVM_SET_USER_MEMORY_REGION`'s
/// `kvm_userspace_memory_region` is the first five fields): size 0 deletes.
///
/// Fields are raw so that invalid calls can be expressed, checked and sent to the kernel as-is.
/// The two guest_memfd fields only matter with `KVM_MEM_GUEST_MEMFD` in `flags` (the kernel
/// ignores them otherwise, and the v1 ioctl does not carry them: [`Ioctl`]); they are 0 when
/// unused, except where a trace recorded QEMU's `guest_memfd=-1` (kept as `u32::MAX`, the value
/// the kernel receives).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct SlotCall {
    /// `address_space << 16 | id`.
    pub slot: u32,
    /// Raw flags.
    pub flags: u32,
    /// `guest_phys_addr`.
    pub gpa: u64,
    /// `memory_size`; 0 deletes the slot.
    pub size: u64,
    /// `userspace_addr`.
    #[cfg_attr(feature = "serde", serde(rename = "ua"))]
    pub host: u64,
    /// `guest_memfd`: the file descriptor of a guest_memfd of this VM (v2 only).
    #[cfg_attr(feature = "serde", serde(default, skip_serializing_if = "is_zero_u32"))]
    pub guest_memfd: u32,
    /// `guest_memfd_offset`: where the slot's first page is in that file (v2 only).
    #[cfg_attr(feature = "serde", serde(default, skip_serializing_if = "is_zero_u64"))]
    pub guest_memfd_offset: u64,
}

/// The ioctl a call is made with.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum Ioctl {
    /// `KVM_SET_USER_MEMORY_REGION`: no guest_memfd fields; any flag but `LOG_DIRTY_PAGES` and
    /// `READONLY` is refused before anything else is looked at.
    V1,
    /// `KVM_SET_USER_MEMORY_REGION2` (`KVM_CAP_USER_MEMORY2`, Linux 6.8): the only way to
    /// create a `GUEST_MEMFD` slot.
    V2,
}

#[cfg(feature = "serde")]
fn is_zero_u32(v: &u32) -> bool {
    *v == 0
}

#[cfg(feature = "serde")]
fn is_zero_u64(v: &u64) -> bool {
    *v == 0
}

impl SlotCall {
    /// The slot id this call addresses.
    pub const fn id(&self) -> SlotId {
        SlotId::from_raw(self.slot)
    }

    /// The raw flags as [`SlotFlags`].
    pub const fn slot_flags(&self) -> SlotFlags {
        SlotFlags(self.flags)
    }

    /// Whether this is a delete (size 0).
    pub const fn is_delete(&self) -> bool {
        self.size == 0
    }

    /// Whether the call asks for a guest_memfd slot (`KVM_MEM_GUEST_MEMFD`).
    pub const fn is_guest_memfd(&self) -> bool {
        self.slot_flags().contains(SlotFlags::GUEST_MEMFD)
    }

    /// The call as the kernel sees it through `ioctl`: the v1 structure has no guest_memfd
    /// fields (the kernel reads them as 0).
    pub const fn as_sent(&self, ioctl: Ioctl) -> SlotCall {
        match ioctl {
            Ioctl::V1 => SlotCall {
                guest_memfd: 0,
                guest_memfd_offset: 0,
                ..*self
            },
            Ioctl::V2 => *self,
        }
    }

    /// The slot this call describes if it succeeds and is not a delete. The guest_memfd fields
    /// are kept only with `GUEST_MEMFD` (the kernel ignores them otherwise).
    pub const fn slot(&self) -> Slot {
        let memfd = self.is_guest_memfd();
        Slot {
            id: self.id(),
            gpa: self.gpa,
            size: self.size,
            host: self.host,
            flags: SlotFlags(self.flags),
            guest_memfd: if memfd { self.guest_memfd } else { 0 },
            guest_memfd_offset: if memfd { self.guest_memfd_offset } else { 0 },
        }
    }
}

impl fmt::Display for SlotCall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "slot {} flags={:#x} gpa={:#x} size={:#x} ua={:#x}",
            self.id(),
            self.flags,
            self.gpa,
            self.size,
            self.host
        )?;
        if self.is_guest_memfd() || self.guest_memfd != 0 || self.guest_memfd_offset != 0 {
            // As QEMU's trace prints it: the fd as a C int (-1 when unused).
            write!(
                f,
                " guest_memfd={} guest_memfd_offset={:#x}",
                self.guest_memfd as i32, self.guest_memfd_offset
            )?;
        }
        Ok(())
    }
}
