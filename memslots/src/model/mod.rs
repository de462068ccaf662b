//! The memslot model: slots, layouts, KVM's rules call for call, ordered all-or-nothing batches,
//! primitives lowered to raw calls, and hole analysis.
//!
//! Nothing here touches the kernel; the KVM backend keeps a [`Layout`] equal to the kernel's, and
//! `memslots conformance` holds the model against the running kernel.

mod batch;
mod holes;
mod layout;
mod limits;
mod primitives;
mod rules;
mod slot;

pub use batch::{Batch, BatchError};
pub use holes::{GpaRange, Hole, HoleReport};
pub use layout::{Applied, Layout, Mapping, Segment};
pub use limits::Limits;
pub use primitives::{Lowered, Primitive, PrimitiveError};
pub use rules::{Change, Rule};
pub use slot::{Ioctl, Slot, SlotCall, SlotFlags, SlotId, PAGE_SIZE};

#[cfg(test)]
mod tests;
