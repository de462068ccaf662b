//! The QEMU-style listener API: a VMM adds and removes memory sections inside a transaction, and
//! each commit yields the plan that takes the slots to the new map.

use std::collections::BTreeMap;

use super::map::{MapError, MemoryMap, Region};
use super::plan::{plan_with, Plan, PlanError};
use super::policy::CutPolicy;
use crate::model::{Layout, Limits, SlotFlags};

/// A memory section as a VMM's listener sees it: one GPA range mapped to host memory.
pub type Section = Region;

/// Why a listener call is refused.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
pub enum ListenerError {
    /// `region_add` / `region_del` / `commit` outside `begin()` ... `commit()`.
    #[error("no transaction is open: call begin() first")]
    NotInTransaction,
    /// `begin()` while a transaction is open.
    #[error("a transaction is already open")]
    AlreadyInTransaction,
    /// The section is not a valid map region (alignment, size, flags).
    #[error("section {section}")]
    Invalid {
        /// The section.
        section: Section,
        /// Why.
        #[source]
        source: MapError,
    },
    /// The section overlaps one already added.
    #[error("section {section} overlaps {other}")]
    Overlap {
        /// The new section.
        section: Section,
        /// The section already there.
        other: Section,
    },
    /// `region_del` of a section that was not added (exactly).
    #[error("section {section} was never added")]
    NoSuchSection {
        /// The section.
        section: Section,
    },
    /// The commit's map cannot be planned; the transaction is rolled back.
    #[error("commit cannot be planned; the transaction is rolled back")]
    Plan(#[source] PlanError),
}

/// Drives the planner the way QEMU drives its KVM listener: `begin()`, any number of
/// `region_add` / `region_del`, then `commit()`, which returns the [`Plan`] to apply.
///
/// The listener assumes each returned plan is applied: its [`Listener::layout`] is the layout the
/// plan produces. A VMM whose apply failed (and rolled back) calls [`Listener::resync`].
///
/// ```
/// use memslots::model::{Limits, SlotFlags};
/// use memslots::planner::{Listener, Section};
///
/// let ram = Section { address_space: 0, gpa: 0, size: 0x4000_0000, host: 0x7f00_0000_0000,
///                     flags: SlotFlags::NONE };
/// let mut l = Listener::new(Limits::default());
/// l.begin().unwrap();
/// l.region_add(ram).unwrap();
/// let boot = l.commit().unwrap();
/// assert!(boot.quiesced_ioctls() == 0);
/// // The VGA window goes away: RAM around it is untouched, nothing waits for vCPUs.
/// l.begin().unwrap();
/// l.region_del(ram).unwrap();
/// l.region_add(Section { size: 0xa_0000, ..ram }).unwrap();
/// l.region_add(Section { gpa: 0xc_0000, size: ram.size - 0xc_0000, host: ram.host + 0xc_0000,
///                        ..ram }).unwrap();
/// let plan = l.commit().unwrap();
/// assert_eq!((plan.ioctls(), plan.quiesced_ioctls()), (1, 0));
/// ```
#[derive(Clone, Debug)]
pub struct Listener {
    layout: Layout,
    policy: CutPolicy,
    sections: BTreeMap<(u16, u64), Section>,
    before: Option<BTreeMap<(u16, u64), Section>>,
}

impl Listener {
    /// A listener for an empty VM with these limits, cutting slots with the default policy.
    pub fn new(limits: Limits) -> Self {
        Self::with_policy(limits, CutPolicy::default())
    }

    /// Cuts new slots with `policy` from the next commit on (say, with the backend's host edges
    /// once it registered memory: `policy.with_host_boundaries(updater.host_edges())`).
    pub fn set_policy(&mut self, policy: CutPolicy) {
        self.policy = policy;
    }

    /// The cut policy.
    pub fn policy(&self) -> &CutPolicy {
        &self.policy
    }

    /// A listener with a given cut policy.
    pub fn with_policy(limits: Limits, policy: CutPolicy) -> Self {
        Listener {
            layout: Layout::new(limits),
            policy,
            sections: BTreeMap::new(),
            before: None,
        }
    }

    /// The slots as they are once every returned plan has been applied.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The sections added and not removed, as a map.
    pub fn map(&self) -> MemoryMap {
        MemoryMap::new(self.sections.values().copied().collect())
            .expect("sections are checked when added")
    }

    /// Replaces the layout the next plan starts from (after a failed apply, say).
    pub fn resync(&mut self, layout: Layout) {
        self.layout = layout;
    }

    /// Opens a transaction.
    pub fn begin(&mut self) -> Result<(), ListenerError> {
        if self.before.is_some() {
            return Err(ListenerError::AlreadyInTransaction);
        }
        self.before = Some(self.sections.clone());
        Ok(())
    }

    /// Adds a section.
    pub fn region_add(&mut self, section: Section) -> Result<(), ListenerError> {
        if self.before.is_none() {
            return Err(ListenerError::NotInTransaction);
        }
        MemoryMap::new(vec![section])
            .map_err(|source| ListenerError::Invalid { section, source })?;
        let space = section.address_space;
        let below = self
            .sections
            .range((space, 0)..(space, section.end()))
            .next_back()
            .map(|(_, s)| *s);
        if let Some(other) = below.filter(|o| o.end() > section.gpa) {
            return Err(ListenerError::Overlap { section, other });
        }
        self.sections.insert((space, section.gpa), section);
        Ok(())
    }

    /// Removes a section added earlier (the same section, as QEMU passes it).
    pub fn region_del(&mut self, section: Section) -> Result<(), ListenerError> {
        if self.before.is_none() {
            return Err(ListenerError::NotInTransaction);
        }
        let key = (section.address_space, section.gpa);
        match self.sections.get(&key) {
            Some(s) if *s == section => {
                self.sections.remove(&key);
                Ok(())
            }
            _ => Err(ListenerError::NoSuchSection { section }),
        }
    }

    /// Turns dirty logging on or off for the section starting at `gpa` (QEMU's `log_start` /
    /// `log_stop`).
    pub fn set_dirty_logging(
        &mut self,
        address_space: u16,
        gpa: u64,
        on: bool,
    ) -> Result<(), ListenerError> {
        if self.before.is_none() {
            return Err(ListenerError::NotInTransaction);
        }
        match self.sections.get_mut(&(address_space, gpa)) {
            Some(s) => {
                s.flags = s.flags.with(SlotFlags::LOG_DIRTY_PAGES, on);
                Ok(())
            }
            None => Err(ListenerError::NoSuchSection {
                section: Section {
                    address_space,
                    gpa,
                    size: 0,
                    host: 0,
                    flags: SlotFlags::NONE,
                },
            }),
        }
    }

    /// Closes the transaction and plans it. On error the transaction is rolled back.
    pub fn commit(&mut self) -> Result<Plan, ListenerError> {
        let before = self.before.take().ok_or(ListenerError::NotInTransaction)?;
        let planned = plan_with(&self.layout, &self.map(), &self.policy).and_then(|plan| {
            self.layout
                .apply_batch(&plan.slot_calls())
                .map_err(PlanError::Refused)?;
            Ok(plan)
        });
        planned.map_err(|e| {
            self.sections = before;
            ListenerError::Plan(e)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sec(gpa: u64, size: u64, host: u64) -> Section {
        Section {
            address_space: 0,
            gpa,
            size,
            host,
            flags: SlotFlags::NONE,
        }
    }

    #[test]
    fn calls_outside_a_transaction_are_refused() {
        let mut l = Listener::new(Limits::default());
        assert_eq!(
            l.region_add(sec(0, 0x1000, 0x1000)),
            Err(ListenerError::NotInTransaction)
        );
        assert_eq!(l.commit(), Err(ListenerError::NotInTransaction));
        l.begin().unwrap();
        assert_eq!(l.begin(), Err(ListenerError::AlreadyInTransaction));
    }

    #[test]
    fn overlap_and_unknown_sections_are_refused() {
        let mut l = Listener::new(Limits::default());
        l.begin().unwrap();
        l.region_add(sec(0x10000, 0x10000, 0x100000)).unwrap();
        assert!(matches!(
            l.region_add(sec(0x8000, 0x9000, 0x200000)),
            Err(ListenerError::Overlap { .. })
        ));
        assert!(matches!(
            l.region_add(sec(0x1f000, 0x1000, 0x200000)),
            Err(ListenerError::Overlap { .. })
        ));
        l.region_add(sec(0x20000, 0x1000, 0x200000)).unwrap();
        assert!(matches!(
            l.region_del(sec(0x10000, 0x1000, 0x100000)),
            Err(ListenerError::NoSuchSection { .. })
        ));
        assert!(matches!(
            l.region_add(sec(0x30000, 0x800, 0x200000)),
            Err(ListenerError::Invalid { .. })
        ));
    }

    #[test]
    fn a_failed_commit_rolls_back() {
        let limits = Limits {
            address_spaces: 1,
            ..Limits::default()
        };
        let mut l = Listener::new(limits);
        l.begin().unwrap();
        l.region_add(sec(0, 0x1000, 0x1000)).unwrap();
        l.commit().unwrap();
        l.begin().unwrap();
        l.region_add(Section {
            address_space: 1,
            ..sec(0, 0x1000, 0x1000)
        })
        .unwrap();
        assert!(matches!(
            l.commit(),
            Err(ListenerError::Plan(PlanError::Unmappable { .. }))
        ));
        assert_eq!(l.map().len(), 1);
        assert_eq!(l.layout().len(), 1);
    }

    #[test]
    fn dirty_logging_is_a_flags_only_call() {
        let mut l = Listener::new(Limits::default());
        l.begin().unwrap();
        l.region_add(sec(0x100000, 0x1000_0000, 0x7f00_0000_0000))
            .unwrap();
        let boot = l.commit().unwrap();
        l.begin().unwrap();
        l.set_dirty_logging(0, 0x100000, true).unwrap();
        let plan = l.commit().unwrap();
        assert_eq!(plan.ioctls(), boot.ioctls());
        assert!(plan
            .calls
            .iter()
            .all(|c| c.change == crate::model::Change::FlagsOnly && !c.quiesced));
        assert_eq!(plan.zapped_bytes(), 0);
    }
}
