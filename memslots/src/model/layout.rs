//! The slots of one VM, indexed by id and by guest-physical address, and KVM's rules applied to them.

use std::collections::BTreeMap;
use std::ops::Bound;

use super::limits::Limits;
use super::rules::{Change, Rule};
use super::slot::{Ioctl, Slot, SlotCall, SlotFlags, SlotId};

/// The flags `KVM_SET_USER_MEMORY_REGION` (v1) accepts at all.
const V1_FLAGS: u32 = SlotFlags::LOG_DIRTY_PAGES.bits() | SlotFlags::READONLY.bits();

/// What one accepted call did: the change, and the slot before and after (for undo and analysis).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Applied {
    /// The kind of change.
    pub change: Change,
    /// The slot before the call (`None` for a CREATE).
    pub before: Option<Slot>,
    /// The slot after the call (`None` for a DELETE).
    pub after: Option<Slot>,
}

impl Applied {
    /// Whether the call drops (or may drop) the slot's dirty bitmap, so bits a VMM has not
    /// harvested are lost: a DELETE of a logging slot, logging turned off, and a MOVE of a logging
    /// slot (KVM carries its bitmap over, but the bits then describe the new GPAs; treated alike,
    /// as the KVM backend's updater does).
    pub fn drops_dirty_bitmap(&self) -> bool {
        let Some(old) = self.before else { return false };
        old.flags.log_dirty()
            && match self.change {
                Change::Delete | Change::Move => true,
                Change::FlagsOnly => !self.after.is_some_and(|s| s.flags.log_dirty()),
                _ => false,
            }
    }
}

/// A guest-physical mapping of one range: the host address of its first byte and whether the guest
/// may write it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Mapping {
    /// Host address of the first byte of the range.
    pub host: u64,
    /// Whether guest writes exit as MMIO.
    pub readonly: bool,
}

/// One piece of a guest-physical range with one mapping (or none: MMIO).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Segment {
    /// First GPA.
    pub start: u64,
    /// One past the last GPA.
    pub end: u64,
    /// What the piece maps to, `None` where no slot covers it.
    pub mapping: Option<Mapping>,
}

/// The memory slots of one VM, all address spaces: KVM's view, kept call for call.
///
/// Every change goes through [`Layout::apply`], which enforces KVM's rules in KVM's order, so a
/// `Layout` can only hold what the kernel would accept.
///
/// ```
/// use memslots::model::{Change, Layout, Limits, Slot, SlotFlags, SlotId};
///
/// let mut layout = Layout::new(Limits::default());
/// let ram = Slot { id: SlotId::new(0), gpa: 0, size: 0x10_0000, host: 0x7f00_0000_0000,
///                  flags: SlotFlags::NONE, guest_memfd: 0, guest_memfd_offset: 0 };
/// assert_eq!(layout.apply(&ram.set_call()).unwrap().change, Change::Create);
/// assert_eq!(layout.translate(0, 0x1234), Some(0x7f00_0000_1234));
/// // KVM cannot resize a slot in place.
/// let bigger = Slot { size: 0x20_0000, ..ram };
/// assert_eq!(layout.apply(&bigger.set_call()).unwrap_err().errno(), libc::EINVAL);
/// ```
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Layout {
    limits: Limits,
    slots: BTreeMap<SlotId, Slot>,
    by_gpa: BTreeMap<(u16, u64), u16>,
    /// guest_memfds the model was told about: fd -> size in bytes.
    guest_memfds: BTreeMap<u32, u64>,
    /// Ranges of guest_memfds bound to slots: (fd, first byte) -> (one past the last, slot).
    bindings: BTreeMap<(u32, u64), (u64, SlotId)>,
}

impl Layout {
    /// An empty layout under `limits`.
    pub fn new(limits: Limits) -> Self {
        Layout {
            limits,
            slots: BTreeMap::new(),
            by_gpa: BTreeMap::new(),
            guest_memfds: BTreeMap::new(),
            bindings: BTreeMap::new(),
        }
    }

    /// Tells the model that `fd` is a guest_memfd of this VM (`KVM_CREATE_GUEST_MEMFD`) of
    /// `size` bytes, so that a CREATE binding to it is judged: its range must lie inside the file
    /// and must not be bound to another slot. Binding to an fd the model was not told about is
    /// left to the kernel (see [`Rule`]).
    pub fn add_guest_memfd(&mut self, fd: u32, size: u64) {
        self.guest_memfds.insert(fd, size);
    }

    /// Forgets a guest_memfd (its file was closed: the kernel drops its bindings, and the fd
    /// number may come back as another file). Slots bound to it stay until deleted.
    pub fn remove_guest_memfd(&mut self, fd: u32) {
        self.guest_memfds.remove(&fd);
        self.bindings.retain(|&(f, _), _| f != fd);
    }

    /// The size of a guest_memfd the model was told about.
    pub fn guest_memfd_size(&self, fd: u32) -> Option<u64> {
        self.guest_memfds.get(&fd).copied()
    }

    /// The limits this layout is checked against.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Number of slots, all address spaces.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether there is no slot.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The slot with this id.
    pub fn slot(&self, id: SlotId) -> Option<&Slot> {
        self.slots.get(&id)
    }

    /// All slots, in id order.
    pub fn slots(&self) -> impl Iterator<Item = &Slot> + '_ {
        self.slots.values()
    }

    /// The slots of one address space, in GPA order.
    pub fn slots_by_gpa(&self, address_space: u16) -> impl Iterator<Item = &Slot> + '_ {
        self.by_gpa
            .range((address_space, 0)..=(address_space, u64::MAX))
            .map(move |(_, &id)| &self.slots[&SlotId::in_space(address_space, id)])
    }

    /// The slot that holds `gpa` in `address_space`.
    pub fn find(&self, address_space: u16, gpa: u64) -> Option<&Slot> {
        let (_, &id) = self
            .by_gpa
            .range((address_space, 0)..=(address_space, gpa))
            .next_back()?;
        let slot = &self.slots[&SlotId::in_space(address_space, id)];
        slot.contains(gpa).then_some(slot)
    }

    /// The host address `gpa` maps to, or `None` (MMIO).
    pub fn translate(&self, address_space: u16, gpa: u64) -> Option<u64> {
        self.find(address_space, gpa).map(|s| s.host_of(gpa))
    }

    /// The slots of `address_space` that overlap `[start, end)`, in GPA order.
    pub fn overlapping(
        &self,
        address_space: u16,
        start: u64,
        end: u64,
    ) -> impl Iterator<Item = &Slot> + '_ {
        // The slot starting at or before `start` may reach into the range; all others start inside.
        let first = self
            .find(address_space, start)
            .map_or(start, |slot| slot.gpa);
        let range = (end > first).then(|| {
            self.by_gpa
                .range((address_space, first)..(address_space, end))
        });
        range
            .into_iter()
            .flatten()
            .map(move |(_, &id)| &self.slots[&SlotId::in_space(address_space, id)])
    }

    /// `[start, end)` of `address_space` cut into pieces of one mapping each (or none).
    pub fn segments(&self, address_space: u16, start: u64, end: u64) -> Vec<Segment> {
        let mut out = Vec::new();
        let mut at = start;
        for slot in self.overlapping(address_space, start, end) {
            let s = slot.gpa.max(start);
            let e = slot.end().min(end);
            if s > at {
                out.push(Segment {
                    start: at,
                    end: s,
                    mapping: None,
                });
            }
            out.push(Segment {
                start: s,
                end: e,
                mapping: Some(Mapping {
                    host: slot.host_of(s),
                    readonly: slot.flags.readonly(),
                }),
            });
            at = e;
        }
        if at < end {
            out.push(Segment {
                start: at,
                end,
                mapping: None,
            });
        }
        out
    }

    /// The lowest id of `address_space` that no slot uses and that is not in `reserved`.
    pub fn free_id(&self, address_space: u16, reserved: &[u16]) -> Option<u16> {
        let mut used = self
            .slots
            .range(SlotId::in_space(address_space, 0)..=SlotId::in_space(address_space, u16::MAX))
            .map(|(id, _)| id.id)
            .peekable();
        for candidate in 0..self.limits.slots {
            while used.next_if(|&u| u < candidate).is_some() {}
            if used.peek() == Some(&candidate) || reserved.contains(&candidate) {
                continue;
            }
            return Some(candidate);
        }
        None
    }

    /// Checks one call against KVM's rules without changing anything, as a backend sends it
    /// ([`Limits::ioctl`]: v2 where the kernel has it).
    ///
    /// Rules are checked in the kernel's order (`kvm_vm_ioctl`, `kvm_vm_ioctl_set_memory_region`,
    /// then `kvm_set_memory_region` and `kvm_gmem_bind`), so the first broken rule is the one
    /// named.
    pub fn check(&self, call: &SlotCall) -> Result<Change, Rule> {
        self.check_ioctl(call, self.limits.ioctl())
    }

    /// [`Layout::check`] for a call made with `ioctl`.
    pub fn check_ioctl(&self, call: &SlotCall, ioctl: Ioctl) -> Result<Change, Rule> {
        self.check_inner(&call.as_sent(ioctl), ioctl)
            .map(|(change, _)| change)
    }

    fn check_inner(&self, call: &SlotCall, ioctl: Ioctl) -> Result<(Change, Option<Slot>), Rule> {
        let l = &self.limits;
        match ioctl {
            Ioctl::V2 if !l.user_memory2 => return Err(Rule::V2Unsupported),
            // kvm_vm_ioctl refuses v1's other flags before the slot is even looked at.
            Ioctl::V1 if call.flags & !V1_FLAGS != 0 => {
                return Err(Rule::FlagsNeedV2 { flags: call.flags })
            }
            _ => {}
        }
        let id = call.id();
        if !l.id_in_range(id.id) {
            return Err(Rule::SlotIdOutOfRange {
                id: id.id,
                limit: l.slots,
            });
        }
        self.check_flags(call)?;
        let page = l.page_size;
        if call.size % page != 0 {
            return Err(Rule::UnalignedSize { size: call.size });
        }
        if call.gpa % page != 0 {
            return Err(Rule::UnalignedGpa { gpa: call.gpa });
        }
        if call.host % page != 0 {
            return Err(Rule::UnalignedHost { host: call.host });
        }
        match call.host.checked_add(call.size) {
            Some(end) if end <= l.user_addr_max => {}
            _ => {
                return Err(Rule::InvalidHostRange {
                    host: call.host,
                    size: call.size,
                })
            }
        }
        let memfd = call.is_guest_memfd();
        if memfd {
            let offset = call.guest_memfd_offset;
            if offset % page != 0 {
                return Err(Rule::GuestMemfdOffsetUnaligned { offset });
            }
            if offset.checked_add(call.size).is_none() {
                return Err(Rule::GuestMemfdOffsetWraps {
                    offset,
                    size: call.size,
                });
            }
        }
        if id.address_space >= l.address_spaces {
            return Err(Rule::AddressSpaceOutOfRange {
                address_space: id.address_space,
                limit: l.address_spaces,
            });
        }
        if call.gpa.checked_add(call.size).is_none() {
            return Err(Rule::GpaWraps {
                gpa: call.gpa,
                size: call.size,
            });
        }
        let pages = call.size / page;
        if pages > l.max_pages {
            return Err(Rule::TooManyPages { pages });
        }
        let old = self.slots.get(&id).copied();
        if call.size == 0 {
            return match old {
                Some(old) => Ok((Change::Delete, Some(old))),
                None => Err(Rule::DeleteMissing { id }),
            };
        }
        let change = match old {
            None => Change::Create,
            Some(old) => {
                // guest_memfd slots are immutable: only a DELETE may follow the CREATE.
                if memfd {
                    return Err(Rule::GuestMemfdImmutable { id });
                }
                if call.host != old.host || call.size != old.size {
                    return Err(Rule::Immutable { id });
                }
                let toggled = call.flags ^ old.flags.bits();
                if toggled & SlotFlags::READONLY.bits() != 0 {
                    return Err(Rule::ReadonlyToggle { id });
                }
                if toggled & SlotFlags::GUEST_MEMFD.bits() != 0 {
                    return Err(Rule::GuestMemfdToggle { id });
                }
                if call.gpa != old.gpa {
                    Change::Move
                } else if call.flags != old.flags.bits() {
                    Change::FlagsOnly
                } else {
                    Change::Unchanged
                }
            }
        };
        if matches!(change, Change::Create | Change::Move) {
            if let Some(other) = self.overlap(id, call.gpa, call.gpa + call.size) {
                return Err(Rule::Overlap { other });
            }
            if memfd {
                // kvm_gmem_bind, before the arch hook.
                self.check_binding(call)?;
            }
            // The arch hook runs after the overlap check, inside kvm_set_memslot.
            let last_gfn = (call.gpa + call.size - 1) / page;
            if last_gfn > l.max_gfn {
                return Err(Rule::GfnTooHigh {
                    last_gfn,
                    max_gfn: l.max_gfn,
                });
            }
        }
        Ok((change, old))
    }

    /// `check_memory_region_flags`: one mask in the kernel, named here by what is wrong.
    fn check_flags(&self, call: &SlotCall) -> Result<(), Rule> {
        let l = &self.limits;
        let flags = call.flags;
        let known = SlotFlags::LOG_DIRTY_PAGES.bits()
            | SlotFlags::READONLY.bits()
            | SlotFlags::GUEST_MEMFD.bits();
        if flags & !known != 0 {
            return Err(Rule::InvalidFlags { flags });
        }
        if call.is_guest_memfd() {
            if !l.guest_memfd {
                return Err(Rule::GuestMemfdUnsupported { flags });
            }
            // Dirty logging and read-only slots are not supported on private memory.
            if flags & !SlotFlags::GUEST_MEMFD.bits() != 0 {
                return Err(Rule::GuestMemfdFlags { flags });
            }
        }
        if call.slot_flags().readonly() && !l.readonly {
            return Err(Rule::InvalidFlags { flags });
        }
        Ok(())
    }

    /// `kvm_gmem_bind`'s range checks, for a guest_memfd the model knows.
    fn check_binding(&self, call: &SlotCall) -> Result<(), Rule> {
        let fd = call.guest_memfd;
        let Some(file_size) = self.guest_memfd_size(fd) else {
            return Ok(()); // the kernel's call: see `Rule`
        };
        let offset = call.guest_memfd_offset;
        // The kernel's offset is a signed loff_t: 2^63 and up are negative. (The wrap of
        // offset + size was refused before.)
        let end = offset + call.size;
        if offset > i64::MAX as u64 || end > file_size {
            return Err(Rule::GuestMemfdRange {
                fd,
                offset,
                size: call.size,
                file_size,
            });
        }
        let bound = self
            .bindings
            .range((fd, 0)..(fd, end))
            .next_back()
            .filter(|(_, &(e, _))| e > offset);
        match bound {
            Some((_, &(_, other))) => Err(Rule::GuestMemfdBound { fd, other }),
            None => Ok(()),
        }
    }

    /// The slot of `id`'s address space, other than `id`, that overlaps `[start, end)`.
    fn overlap(&self, id: SlotId, start: u64, end: u64) -> Option<SlotId> {
        let space = id.address_space;
        // Slots of one space never overlap each other, so at most the two nearest starts below
        // `end` can reach `start` once `id` itself is skipped.
        self.by_gpa
            .range((Bound::Included((space, 0)), Bound::Excluded((space, end))))
            .rev()
            .filter(|(_, &other)| other != id.id)
            .take(1)
            .map(|(_, &other)| SlotId::in_space(space, other))
            .find(|other| self.slots[other].end() > start)
    }

    /// Applies one call if KVM would accept it; on refusal nothing changes. The call is judged
    /// as a backend sends it ([`Limits::ioctl`]).
    pub fn apply(&mut self, call: &SlotCall) -> Result<Applied, Rule> {
        self.apply_ioctl(call, self.limits.ioctl())
    }

    /// [`Layout::apply`] for a call made with `ioctl`.
    pub fn apply_ioctl(&mut self, call: &SlotCall, ioctl: Ioctl) -> Result<Applied, Rule> {
        let call = call.as_sent(ioctl);
        let (change, before) = self.check_inner(&call, ioctl)?;
        let after = (!call.is_delete()).then(|| call.slot());
        let applied = Applied {
            change,
            before,
            after,
        };
        self.replace(before, after);
        Ok(applied)
    }

    /// Reverts a call that [`Layout::apply`] accepted; calls must be reverted newest first.
    pub fn revert(&mut self, applied: &Applied) {
        self.replace(applied.after, applied.before);
    }

    fn replace(&mut self, old: Option<Slot>, new: Option<Slot>) {
        if let Some(old) = old {
            self.slots.remove(&old.id);
            self.by_gpa.remove(&(old.id.address_space, old.gpa));
            if old.is_guest_memfd() {
                let key = (old.guest_memfd, old.guest_memfd_offset);
                // Only this slot's own binding (the file may have been forgotten since).
                if self.bindings.get(&key).is_some_and(|&(_, s)| s == old.id) {
                    self.bindings.remove(&key);
                }
            }
        }
        if let Some(new) = new {
            self.slots.insert(new.id, new);
            self.by_gpa
                .insert((new.id.address_space, new.gpa), new.id.id);
            if new.is_guest_memfd() {
                // An accepted CREATE's range does not wrap (refused before).
                let end = new.guest_memfd_offset.saturating_add(new.size);
                self.bindings
                    .insert((new.guest_memfd, new.guest_memfd_offset), (end, new.id));
            }
        }
    }
}
