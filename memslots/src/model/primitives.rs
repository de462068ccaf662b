//! Slot primitives (grow, shrink, split, merge, move, read-only and dirty-logging toggles) and their
//! lowering to the raw calls the stock kernel accepts.

use super::batch::{Batch, BatchError};
use super::holes::HoleReport;
use super::layout::Layout;
use super::slot::{Slot, SlotFlags, SlotId};

/// A change to one or two slots, stated as what the slots should become.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub enum Primitive {
    /// Extend a slot at its end to `size` bytes (the host range grows with it).
    Grow {
        /// The slot.
        id: SlotId,
        /// New size, larger than the current one.
        size: u64,
    },
    /// Truncate a slot to its first `size` bytes.
    Shrink {
        /// The slot.
        id: SlotId,
        /// New size, smaller than the current one and not zero.
        size: u64,
    },
    /// Cut a slot in two at `at`; the upper part gets `new_id`.
    Split {
        /// The slot.
        id: SlotId,
        /// GPA where the upper part starts.
        at: u64,
        /// Id for the upper part (same address space).
        new_id: SlotId,
    },
    /// Join `second` onto the end of `first`; `second`'s id is freed.
    Merge {
        /// The lower slot; keeps its id.
        first: SlotId,
        /// The upper slot.
        second: SlotId,
    },
    /// Move a slot to a new base GPA (same size, same host memory).
    Move {
        /// The slot.
        id: SlotId,
        /// New base GPA.
        gpa: u64,
    },
    /// Turn `READONLY` on or off.
    SetReadonly {
        /// The slot.
        id: SlotId,
        /// The new state.
        on: bool,
    },
    /// Turn `LOG_DIRTY_PAGES` on or off.
    SetDirtyLogging {
        /// The slot.
        id: SlotId,
        /// The new state.
        on: bool,
    },
}

/// Why a primitive cannot be lowered.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
pub enum PrimitiveError {
    /// The slot does not exist.
    #[error("slot {0} does not exist")]
    NoSuchSlot(SlotId),
    /// A size or address is not a multiple of the page size.
    #[error("{what} {value:#x} is not page aligned")]
    Unaligned {
        /// Which value.
        what: &'static str,
        /// The value.
        value: u64,
    },
    /// Grow to a size not larger, or shrink to a size not smaller (or to zero).
    #[error("size {size:#x} does not {verb} slot {id} (now {current:#x})")]
    WrongSize {
        /// The slot.
        id: SlotId,
        /// Size asked for.
        size: u64,
        /// Current size.
        current: u64,
        /// "grow" or "shrink".
        verb: &'static str,
    },
    /// A split point outside the slot (or at its edge).
    #[error("split point {at:#x} is not strictly inside slot {id}")]
    SplitOutside {
        /// The slot.
        id: SlotId,
        /// The split point.
        at: u64,
    },
    /// The id for the new half is in use or in another address space.
    #[error("id {0} is not free in the slot's address space")]
    IdNotFree(SlotId),
    /// Merge of slots that are not adjacent in GPA and in host memory, in one address space.
    #[error("slots {first} and {second} are not adjacent in one address space and in host memory")]
    NotAdjacent {
        /// Lower slot.
        first: SlotId,
        /// Upper slot.
        second: SlotId,
    },
    /// Merge of slots with different flags.
    #[error("slots {first} and {second} have different flags")]
    FlagsDiffer {
        /// Lower slot.
        first: SlotId,
        /// Upper slot.
        second: SlotId,
    },
    /// The kernel has no read-only memory.
    #[error("this kernel does not support read-only slots")]
    ReadonlyUnsupported,
    /// The lowered calls are refused by KVM's rules (an overlap, a limit).
    #[error("the lowered calls are refused")]
    Refused(#[source] BatchError),
}

/// A primitive lowered to raw calls, with the holes those calls open.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Lowered {
    /// The calls, in the order they must be made.
    pub batch: Batch,
    /// Where the calls leave a mapped GPA unmapped in between; empty means no vCPU need stop.
    pub holes: HoleReport,
}

fn aligned(layout: &Layout, what: &'static str, value: u64) -> Result<(), PrimitiveError> {
    if value % layout.limits().page_size == 0 {
        Ok(())
    } else {
        Err(PrimitiveError::Unaligned { what, value })
    }
}

impl Layout {
    /// Lowers a primitive to the shortest sequence of calls the stock kernel accepts.
    ///
    /// KVM cannot resize a slot, toggle `READONLY` or join two slots in place, so those lower to a
    /// DELETE then CREATE(s), which opens a hole over the slot; a move and a dirty-logging toggle
    /// are one call each and open none. The layout is left unchanged.
    pub fn lower(&mut self, primitive: &Primitive) -> Result<Lowered, PrimitiveError> {
        let get =
            |l: &Layout, id: SlotId| l.slot(id).copied().ok_or(PrimitiveError::NoSuchSlot(id));
        let calls = match *primitive {
            Primitive::Grow { id, size } | Primitive::Shrink { id, size } => {
                let slot = get(self, id)?;
                aligned(self, "size", size)?;
                let grow = matches!(primitive, Primitive::Grow { .. });
                if (grow && size <= slot.size) || (!grow && (size >= slot.size || size == 0)) {
                    return Err(PrimitiveError::WrongSize {
                        id,
                        size,
                        current: slot.size,
                        verb: if grow { "grow" } else { "shrink" },
                    });
                }
                vec![slot.delete_call(), Slot { size, ..slot }.set_call()]
            }
            Primitive::Split { id, at, new_id } => {
                let slot = get(self, id)?;
                aligned(self, "split point", at)?;
                if at <= slot.gpa || at >= slot.end() {
                    return Err(PrimitiveError::SplitOutside { id, at });
                }
                if new_id.address_space != id.address_space || self.slot(new_id).is_some() {
                    return Err(PrimitiveError::IdNotFree(new_id));
                }
                let low = at - slot.gpa;
                let lower = Slot { size: low, ..slot };
                let upper = Slot {
                    id: new_id,
                    gpa: at,
                    size: slot.size - low,
                    host: slot.host + low,
                    flags: slot.flags,
                    guest_memfd: 0,
                    guest_memfd_offset: 0,
                };
                vec![slot.delete_call(), lower.set_call(), upper.set_call()]
            }
            Primitive::Merge { first, second } => {
                let a = get(self, first)?;
                let b = get(self, second)?;
                if a.id.address_space != b.id.address_space
                    || a.end() != b.gpa
                    || a.host + a.size != b.host
                {
                    return Err(PrimitiveError::NotAdjacent { first, second });
                }
                if a.flags != b.flags {
                    return Err(PrimitiveError::FlagsDiffer { first, second });
                }
                let merged = Slot {
                    size: a.size + b.size,
                    ..a
                };
                vec![b.delete_call(), a.delete_call(), merged.set_call()]
            }
            Primitive::Move { id, gpa } => {
                let slot = get(self, id)?;
                aligned(self, "gpa", gpa)?;
                vec![Slot { gpa, ..slot }.set_call()]
            }
            Primitive::SetReadonly { id, on } => {
                let slot = get(self, id)?;
                if !self.limits().readonly {
                    return Err(PrimitiveError::ReadonlyUnsupported);
                }
                if slot.flags.readonly() == on {
                    vec![]
                } else {
                    let flags = slot.flags.with(SlotFlags::READONLY, on);
                    vec![slot.delete_call(), Slot { flags, ..slot }.set_call()]
                }
            }
            Primitive::SetDirtyLogging { id, on } => {
                let slot = get(self, id)?;
                if slot.flags.log_dirty() == on {
                    vec![]
                } else {
                    let flags = slot.flags.with(SlotFlags::LOG_DIRTY_PAGES, on);
                    vec![Slot { flags, ..slot }.set_call()]
                }
            }
        };
        let holes = self.holes(&calls).map_err(PrimitiveError::Refused)?;
        Ok(Lowered {
            batch: Batch::from(calls),
            holes,
        })
    }
}
