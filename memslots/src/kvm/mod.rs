//! The real `/dev/kvm` backend.
//!
//! [`Vm`] owns the VM file descriptor and reads the kernel's [`Limits`](crate::model::Limits).

mod vm;

pub use vm::{KvmError, Vm};
