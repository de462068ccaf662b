//! Ordered batches of slot calls, applied as one unit: all or nothing.

use super::layout::{Applied, Layout};
use super::rules::Rule;
use super::slot::SlotCall;

/// An ordered list of raw slot calls meant to take effect as one unit.
///
/// Each call is checked against the layout the calls before it produce, so `DELETE(x)` then
/// `CREATE(x, other size)` is a valid batch.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(transparent))]
pub struct Batch {
    calls: Vec<SlotCall>,
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Self {
        Batch::default()
    }

    /// Appends a call.
    pub fn push(&mut self, call: SlotCall) {
        self.calls.push(call);
    }

    /// The calls, in order.
    pub fn calls(&self) -> &[SlotCall] {
        &self.calls
    }

    /// Number of calls.
    pub fn len(&self) -> usize {
        self.calls.len()
    }

    /// Whether the batch has no call.
    pub fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }
}

impl From<Vec<SlotCall>> for Batch {
    fn from(calls: Vec<SlotCall>) -> Self {
        Batch { calls }
    }
}

impl FromIterator<SlotCall> for Batch {
    fn from_iter<I: IntoIterator<Item = SlotCall>>(iter: I) -> Self {
        Batch {
            calls: iter.into_iter().collect(),
        }
    }
}

/// A batch refused by the model: the first bad call, its position and the rule it breaks.
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
#[error("call {index} ({call}) is refused: {rule}")]
pub struct BatchError {
    /// Position of the refused call in the batch.
    pub index: usize,
    /// The refused call.
    pub call: SlotCall,
    /// The rule it breaks.
    #[source]
    pub rule: Rule,
}

impl BatchError {
    /// The errno KVM would return for the refused call.
    pub fn errno(&self) -> i32 {
        self.rule.errno()
    }
}

impl Layout {
    /// Applies every call of `calls` in order, or none of them.
    ///
    /// On the first refused call every earlier call is reverted (newest first), so the layout is
    /// left exactly as it was. Cost: O(k log n) for k calls on n slots; nothing is copied.
    pub fn apply_batch(&mut self, calls: &[SlotCall]) -> Result<Vec<Applied>, BatchError> {
        let mut done = Vec::with_capacity(calls.len());
        for (index, call) in calls.iter().enumerate() {
            match self.apply(call) {
                Ok(applied) => done.push(applied),
                Err(rule) => {
                    self.revert_all(&done);
                    return Err(BatchError {
                        index,
                        call: *call,
                        rule,
                    });
                }
            }
        }
        Ok(done)
    }

    /// Checks a whole batch and says what each call would do, leaving the layout unchanged.
    pub fn check_batch(&mut self, calls: &[SlotCall]) -> Result<Vec<Applied>, BatchError> {
        let done = self.apply_batch(calls)?;
        self.revert_all(&done);
        Ok(done)
    }

    /// Reverts accepted calls, newest first.
    pub fn revert_all(&mut self, done: &[Applied]) {
        for applied in done.iter().rev() {
            self.revert(applied);
        }
    }
}
