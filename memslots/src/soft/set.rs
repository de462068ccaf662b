//! One copy of the soft backend's slots: per address space, slots in GPA order with an id index
//! and a host-range index, and the generation the copy was published with.

use std::collections::{BTreeMap, BTreeSet};

use crate::model::{Slot, SlotId};

/// A slot as the soft backend holds it: the model's slot, and whether it is an *invalid* stand-in
/// (readers that land in it must retry, never see MMIO).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct SoftSlot {
    /// The slot.
    pub slot: Slot,
    /// Whether the slot is being deleted or moved (readers get RETRY).
    pub invalid: bool,
}

impl SoftSlot {
    /// A valid slot.
    pub const fn valid(slot: Slot) -> Self {
        SoftSlot {
            slot,
            invalid: false,
        }
    }

    /// An invalid copy of `slot`.
    pub const fn invalid(slot: Slot) -> Self {
        SoftSlot {
            slot,
            invalid: true,
        }
    }
}

/// One change to a copy of the slots, replayed on the other copy after a publish.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum SetOp {
    /// Add this slot (its id is not in the set).
    Insert(SoftSlot),
    /// Remove this slot (it is in the set, exactly so).
    Remove(SoftSlot),
}

impl SetOp {
    /// The op that undoes this one.
    pub const fn inverse(self) -> SetOp {
        match self {
            SetOp::Insert(s) => SetOp::Remove(s),
            SetOp::Remove(s) => SetOp::Insert(s),
        }
    }
}

/// The slots of one address space.
#[derive(Clone, Default, PartialEq, Eq, Debug)]
pub struct SlotSet {
    by_gpa: BTreeMap<u64, SoftSlot>,
    by_id: BTreeMap<u16, u64>,
    by_host: BTreeSet<(u64, u16)>,
}

impl SlotSet {
    /// The slot that holds `gpa`.
    pub fn find(&self, gpa: u64) -> Option<&SoftSlot> {
        let (_, slot) = self.by_gpa.range(..=gpa).next_back()?;
        slot.slot.contains(gpa).then_some(slot)
    }

    /// The slot with this id.
    pub fn by_id(&self, id: u16) -> Option<&SoftSlot> {
        self.by_id.get(&id).map(|gpa| &self.by_gpa[gpa])
    }

    /// The slots in GPA order.
    pub fn iter(&self) -> impl Iterator<Item = &SoftSlot> + '_ {
        self.by_gpa.values()
    }

    /// The slots whose host range holds `host` (several slots may alias one host range).
    ///
    /// Walks the host index from the highest start at or below `host` downwards; cost grows with
    /// the slots starting below `host`, which is fine for the writer-side uses (there is no
    /// interval tree here, unlike KVM's).
    pub fn by_host(&self, host: u64) -> impl Iterator<Item = &SoftSlot> + '_ {
        self.by_host
            .range(..=(host, u16::MAX))
            .rev()
            .filter_map(move |&(_, id)| self.by_id(id))
            .filter(move |s| host - s.slot.host < s.slot.size)
    }

    /// The slots whose host range overlaps `[start, end)` (what an MMU notifier must zap when
    /// that host memory goes away).
    pub fn overlapping_host(&self, start: u64, end: u64) -> impl Iterator<Item = &SoftSlot> + '_ {
        self.by_host
            .range(..(end, 0))
            .filter_map(move |&(_, id)| self.by_id(id))
            .filter(move |s| s.slot.host + s.slot.size > start)
    }

    /// Number of slots.
    pub fn len(&self) -> usize {
        self.by_gpa.len()
    }

    /// Whether there is no slot.
    pub fn is_empty(&self) -> bool {
        self.by_gpa.is_empty()
    }

    /// Applies one op: O(log n).
    pub fn apply(&mut self, op: &SetOp) {
        match *op {
            SetOp::Insert(s) => {
                self.by_gpa.insert(s.slot.gpa, s);
                self.by_id.insert(s.slot.id.id, s.slot.gpa);
                self.by_host.insert((s.slot.host, s.slot.id.id));
            }
            SetOp::Remove(s) => {
                debug_assert_eq!(self.by_gpa.get(&s.slot.gpa), Some(&s));
                self.by_gpa.remove(&s.slot.gpa);
                self.by_id.remove(&s.slot.id.id);
                self.by_host.remove(&(s.slot.host, s.slot.id.id));
            }
        }
    }
}

/// One copy of all address spaces' slots.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Slots {
    /// Bumped on every publish; readers' caches are keyed by it.
    pub generation: u64,
    spaces: Vec<SlotSet>,
}

impl Slots {
    /// No slot in any of `address_spaces` spaces.
    pub fn new(address_spaces: u16) -> Self {
        Slots {
            generation: 0,
            spaces: vec![SlotSet::default(); usize::from(address_spaces)],
        }
    }

    /// One address space's slots (`None` beyond the VM's address spaces).
    pub fn space(&self, address_space: u16) -> Option<&SlotSet> {
        self.spaces.get(usize::from(address_space))
    }

    /// The slot holding `gpa` in `address_space`.
    pub fn find(&self, address_space: u16, gpa: u64) -> Option<&SoftSlot> {
        self.space(address_space)?.find(gpa)
    }

    /// The slot with this id.
    pub fn slot(&self, id: SlotId) -> Option<&SoftSlot> {
        self.space(id.address_space)?.by_id(id.id)
    }

    /// Applies one op to the slot's address space (which the model has checked exists).
    pub fn apply(&mut self, op: &SetOp) {
        let (SetOp::Insert(s) | SetOp::Remove(s)) = op;
        if let Some(space) = self.spaces.get_mut(usize::from(s.slot.id.address_space)) {
            space.apply(op);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::SlotFlags;

    fn slot(id: u16, gpa: u64, size: u64, host: u64) -> Slot {
        Slot {
            id: SlotId::new(id),
            gpa,
            size,
            host,
            flags: SlotFlags::NONE,
            guest_memfd: 0,
            guest_memfd_offset: 0,
        }
    }

    #[test]
    fn indices_follow_inserts_and_removes() {
        let mut set = Slots::new(2);
        let a = SoftSlot::valid(slot(1, 0x1000, 0x2000, 0x10_0000));
        let b = SoftSlot::invalid(slot(2, 0x8000, 0x1000, 0x10_1000));
        set.apply(&SetOp::Insert(a));
        set.apply(&SetOp::Insert(b));
        assert_eq!(set.find(0, 0x2fff), Some(&a));
        assert_eq!(set.find(0, 0x3000), None);
        assert_eq!(set.find(0, 0x8000), Some(&b));
        assert_eq!(set.find(1, 0x8000), None);
        assert_eq!(set.slot(SlotId::new(2)), Some(&b));
        // 0x10_1000 is in both host ranges (a alias).
        let mut ids: Vec<u16> = set.spaces[0]
            .by_host(0x10_1000)
            .map(|s| s.slot.id.id)
            .collect();
        ids.sort_unstable();
        assert_eq!(ids, vec![1, 2]);
        assert_eq!(set.spaces[0].by_host(0x10_2000).count(), 0);
        assert_eq!(
            set.spaces[0].overlapping_host(0x10_0000, 0x10_1000).count(),
            1
        );
        assert_eq!(
            set.spaces[0].overlapping_host(0x10_1fff, 0x20_0000).count(),
            2
        );
        assert_eq!(
            set.spaces[0].overlapping_host(0x10_2000, 0x20_0000).count(),
            0
        );
        set.apply(&SetOp::Insert(b).inverse());
        assert_eq!(set.find(0, 0x8000), None);
        assert_eq!(set.slot(SlotId::new(2)), None);
        assert_eq!(set.spaces[0].by_host(0x10_1000).count(), 1);
    }
}
