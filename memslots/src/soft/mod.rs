//! The soft backend: a VM's memory slots in userspace, with the atomic list algorithm the kernel
//! never got and the finer primitives (grow, shrink, split, merge, read-only toggles), concurrent
//! lock-free readers standing in for vCPUs and device threads, and an SPTE cache standing in for
//! the MMU, so that what those would buy can be measured on real traces.
//!
//! - [`rcu`]: two copies and per-reader epochs: publish, grace period, reclaim.
//! - [`set`]: one copy of the slots (GPA order, id index, host-range index, generation).
//! - [`spte`]: the SPTE model and its counters.
//! - [`Reader`]: `translate(gpa)` for one thread; [`SoftMemory`]: the writer.

mod memory;
pub mod rcu;
mod reader;
pub mod set;
pub mod spte;
mod sync;

pub use memory::{Outcome, SoftError, SoftMemory};
pub use reader::{Access, Reader, Translation};
