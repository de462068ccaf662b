//! Reader handles: what a vCPU or device thread uses to turn a GPA into host memory.

use std::sync::Arc;

use super::rcu::ReadHandle;
use super::set::{Slots, SoftSlot};
use super::spte::{Spte, SpteCache};
use crate::model::{SlotId, PAGE_SIZE};

/// What a GPA is, for one reader, at one instant.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Translation {
    /// Guest RAM.
    Ram {
        /// Host address of the GPA.
        host: u64,
        /// The slot that maps it.
        slot: SlotId,
        /// Generation of the slot set the answer came from.
        generation: u64,
        /// Whether guest writes exit as MMIO.
        readonly: bool,
    },
    /// No slot: an MMIO exit.
    Mmio,
    /// An invalid slot (a DELETE or MOVE in flight): try again.
    Retry,
}

/// What a guest access does through the SPTE cache.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Access {
    /// The access goes to host memory.
    Ram {
        /// Host address of the GPA.
        host: u64,
        /// Whether it took a fault (an SPTE miss) to get there.
        faulted: bool,
    },
    /// The access exits as MMIO (no slot, or a write to a read-only slot).
    Mmio,
    /// An invalid slot: the fault must be retried.
    Retry,
}

/// One vCPU's or device thread's view of a VM's slots; lock-free and allocation-free.
///
/// Not `Clone`: make one per thread with [`super::SoftMemory::reader`].
#[derive(Debug)]
pub struct Reader {
    slots: ReadHandle<Slots>,
    spte: Arc<SpteCache>,
    /// Last slot used and the generation it was found in (KVM's `last_used_slot`).
    last: Option<(u64, SoftSlot)>,
    cache_hits: u64,
}

impl Reader {
    pub(crate) fn new(slots: ReadHandle<Slots>, spte: Arc<SpteCache>) -> Self {
        Reader {
            slots,
            spte,
            last: None,
            cache_hits: 0,
        }
    }

    /// Translates a GPA of address space 0.
    pub fn translate(&mut self, gpa: u64) -> Translation {
        self.translate_in(0, gpa)
    }

    /// Translates a GPA of `address_space` against the active slot set.
    pub fn translate_in(&mut self, address_space: u16, gpa: u64) -> Translation {
        self.translate_then(address_space, gpa, |_, _| ())
    }

    /// Translates and, still inside the read-side critical section, hands a RAM answer to `then`.
    fn translate_then(
        &mut self,
        address_space: u16,
        gpa: u64,
        then: impl FnOnce(&SpteCache, &Translation),
    ) -> Translation {
        let Reader {
            slots: handle,
            spte,
            last,
            cache_hits: hits,
        } = self;
        let answer = handle.read(|slots| {
            let generation = slots.generation;
            let cached = match last {
                Some((g, s))
                    if *g == generation
                        && s.slot.id.address_space == address_space
                        && s.slot.contains(gpa) =>
                {
                    *hits += 1;
                    Some(*s)
                }
                _ => None,
            };
            let found = cached.or_else(|| slots.find(address_space, gpa).copied());
            let answer = match found {
                None => Translation::Mmio,
                Some(s) if s.invalid => Translation::Retry,
                Some(s) => {
                    *last = Some((generation, s));
                    Translation::Ram {
                        host: s.slot.host_of(gpa),
                        slot: s.slot.id,
                        generation,
                        readonly: s.slot.flags.readonly(),
                    }
                }
            };
            then(spte, &answer);
            answer
        });
        if answer == Translation::Retry {
            spte.count_retry();
        }
        answer
    }

    /// A guest access of address space 0, as a vCPU makes it: through the SPTE cache, faulting
    /// on a miss (installing the entry from the slot found).
    pub fn access(&mut self, gpa: u64, write: bool) -> Access {
        self.access_in(0, gpa, write)
    }

    /// A guest access of `address_space` through the SPTE cache.
    pub fn access_in(&mut self, address_space: u16, gpa: u64, write: bool) -> Access {
        let offset = gpa % PAGE_SIZE;
        if let Some(spte) = self.spte.get(address_space, gpa) {
            if spte.writable || !write {
                return Access::Ram {
                    host: spte.host_page + offset,
                    faulted: false,
                };
            }
        }
        self.spte.count_fault();
        let answer = self.translate_then(address_space, gpa, |spte, t| {
            if let Translation::Ram { host, readonly, .. } = *t {
                if !(write && readonly) {
                    // Installed inside the critical section: a zap after the next grace period
                    // is guaranteed to see it.
                    spte.install(
                        address_space,
                        gpa,
                        Spte {
                            host_page: host - offset,
                            writable: !readonly,
                        },
                    );
                }
            }
        });
        match answer {
            Translation::Ram { host, readonly, .. } if !(write && readonly) => Access::Ram {
                host,
                faulted: true,
            },
            Translation::Ram { .. } | Translation::Mmio => Access::Mmio,
            Translation::Retry => Access::Retry,
        }
    }

    /// How many translations the last-used-slot cache answered.
    pub fn cache_hits(&self) -> u64 {
        self.cache_hits
    }
}
