//! The planner: from a guest memory map to the smallest safe batch of slot calls.
//!
//! A VMM thinks in memory regions; KVM thinks in slots. Only the *mapping* (GPA to host address
//! and flags) must match the VMM's map: how it is cut into slots is the planner's choice.
//!
//! - [`MemoryMap`]: the target mapping, and its JSON form.
//! - [`plan`] / [`plan_with`]: a [`Plan`] of raw calls from a [`Layout`](crate::model::Layout) to a
//!   map, with the calls that must run quiesced marked.
//! - [`Listener`]: QEMU's `begin` / `region_add` / `region_del` / `commit` on top.

#[cfg(feature = "serde")]
mod json;
mod listener;
mod map;
mod plan;
mod policy;

pub use listener::{Listener, ListenerError, Section};
pub use map::{MapError, MemoryMap, Region};
pub use plan::{plan, plan_with, Plan, PlanError, PlannedCall};
pub use policy::CutPolicy;
