//! The three ways `stress` and `replay` apply a batch to a real VM: memslots' atomic apply, QEMU
//! 8.0's listener, and the calls in order with nobody held out (the bug, on purpose, which is what
//! proves each detector fires). The product offers only the first; the other two are built here
//! on its mechanism ([`SlotUpdater::apply_with`]).

use memslots::kvm::{ApplyError, ApplyPrimitiveError, ApplyStats, DirtyBits, Hold, SlotUpdater};
use memslots::model::{Primitive, SlotCall};

use crate::qemu;

/// How a batch is applied.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum Strategy {
    /// [`SlotUpdater::apply`]: only the calls from the first that opens a hole to the last that
    /// closes one (and dirty logging slots' last collection and removal) run with vCPUs held out.
    Atomic,
    /// QEMU 8.0: the net change as all DELETEs then all CREATEs; every vCPU held out for the whole
    /// batch when a deleted range overlaps an added one; dirty bits collected before each DELETE
    /// with vCPUs running ("best effort").
    Qemu,
    /// The calls in order, nobody held out, no dirty bits collected: the bug, on purpose.
    Naive,
}

impl Strategy {
    /// The name used on the command line and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Atomic => "atomic",
            Strategy::Qemu => "qemu",
            Strategy::Naive => "naive",
        }
    }
}

/// Applies `calls` to `updater` with `strategy`.
pub fn apply(
    updater: &mut SlotUpdater,
    calls: &[SlotCall],
    strategy: Strategy,
) -> Result<ApplyStats, ApplyError> {
    match strategy {
        Strategy::Atomic => updater.apply(calls),
        Strategy::Qemu => {
            let before = updater.layout().clone();
            let mut target = before.clone();
            target.apply_batch(calls).map_err(ApplyError::Invalid)?;
            let batch = qemu::batch(&before, &target);
            let hold = if qemu::inhibits_calls(&before, &batch) {
                0..batch.len()
            } else {
                0..0
            };
            updater.apply_with(&batch, Hold::Calls(hold), DirtyBits::Keep)
        }
        Strategy::Naive => updater.apply_with(calls, Hold::Calls(0..0), DirtyBits::Drop),
    }
}

/// Lowers `primitive` to raw calls and applies them with `strategy`.
pub fn apply_primitive(
    updater: &mut SlotUpdater,
    primitive: &Primitive,
    strategy: Strategy,
) -> Result<ApplyStats, ApplyPrimitiveError> {
    let lowered = updater.layout().clone().lower(primitive)?;
    Ok(apply(updater, lowered.batch.calls(), strategy)?)
}
