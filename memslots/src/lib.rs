//! memslots: change a running VM's KVM memory-slot layout atomically.
//!
//! - [`model`]: slots, layouts and KVM's exact rules; ordered all-or-nothing batches; primitives;
//!   hole analysis.
//! - [`trace`]: QEMU `kvm_set_user_memory` traces.
//! - [`kvm`]: the real `/dev/kvm` backend.
//! - [`soft`]: the userspace backend: the atomic list algorithm and native primitives, measured.
//! - [`conformance`]: the model held against the running kernel.
#![deny(missing_docs)]

pub mod conformance;
pub mod kvm;
pub mod model;
pub mod soft;
pub mod trace;
