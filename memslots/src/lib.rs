//! memslots: change a running VM's KVM memory-slot layout atomically.
//!
//! What a VMM embeds, and nothing else (the test guest, stress and replay engines, conformance and
//! traces live in the unpublished `memslots-testkit` crate):
//!
//! - [`model`]: slots, layouts and KVM's exact rules; ordered all-or-nothing batches; primitives;
//!   hole analysis.
//! - [`planner`]: guest memory maps planned into safe slot batches; QEMU's listener on top.
//! - [`backend`]: the interface both backends offer ([`backend::SlotBackend`]).
//! - [`kvm`] (feature `kvm`): the real `/dev/kvm` backend: the vCPU gate and the atomic apply.
//! - [`soft`] (feature `soft`): the userspace backend: the atomic list algorithm and native
//!   primitives, measured.
#![deny(missing_docs)]

pub mod backend;
#[cfg(feature = "kvm")]
pub mod kvm;
pub mod model;
pub mod planner;
#[cfg(feature = "soft")]
pub mod soft;
