//! memslots: change a running VM's KVM memory-slot layout atomically.
//!
//! - [`model`]: slots, layouts and KVM's exact rules; ordered all-or-nothing batches; primitives;
//!   hole analysis.
//! - [`planner`]: guest memory maps planned into safe slot batches; QEMU traces compared.
//! - [`kvm`]: the real `/dev/kvm` backend: vCPU gate, test guest, atomic apply.
//! - [`soft`]: the userspace backend: the atomic list algorithm and native primitives, measured.
//! - [`backend`]: the interface both backends offer ([`backend::SlotBackend`]).
//! - [`trace`]: QEMU `kvm_set_user_memory` traces.
//! - [`samples`]: layouts and maps at the slot limit shared by benches and tests.
//! - [`stats`]: constant-memory duration percentiles.
//! - [`workload`], [`stress`]: the layout changes `memslots stress` and `replay` run.
//! - [`conformance`]: the model held against the running kernel.
#![deny(missing_docs)]

pub mod backend;
pub mod conformance;
pub mod kvm;
pub mod model;
pub mod planner;
pub mod samples;
pub mod soft;
pub mod stats;
pub mod stress;
pub mod trace;
pub mod workload;
