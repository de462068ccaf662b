//! What both backends offer a VMM: a slot layout changed by all-or-nothing batches and primitives.
//!
//! `kvm::SlotUpdater` applies them to a real VM on the stock kernel (a
//! primitive lowered to raw calls, vCPUs held out for the calls that open a hole);
//! `soft::SoftMemory` applies them with the proposed list algorithm and
//! native primitives. Code written against [`SlotBackend`] runs on either.

use crate::model::{Layout, Primitive, SlotCall};
use crate::planner::Plan;

/// A slot layout, changed atomically: readers (vCPUs) see the layout before a change or after it,
/// never one in between; a change that fails leaves the layout as it was.
pub trait SlotBackend {
    /// Why a change was not made.
    type Error: std::error::Error + Send + Sync + 'static;

    /// A short name for reports (`"kvm"`, `"soft"`).
    fn name(&self) -> &'static str;

    /// The layout now in effect.
    fn layout(&self) -> &Layout;

    /// Applies `calls` (raw slot calls, in order) as one atomic update.
    fn apply_batch(&mut self, calls: &[SlotCall]) -> Result<(), Self::Error>;

    /// Applies one primitive (grow, shrink, split, merge, move, flag toggles) as one update.
    fn apply_primitive(&mut self, primitive: &Primitive) -> Result<(), Self::Error>;

    /// Applies a planner's plan (its calls, in the planner's order) as one update.
    fn apply_plan(&mut self, plan: &Plan) -> Result<(), Self::Error> {
        let calls: Vec<SlotCall> = plan.calls.iter().map(|c| c.call).collect();
        self.apply_batch(&calls)
    }
}
