//! The real `/dev/kvm` backend.
//!
//! - [`Vm`]: the VM file descriptor and the kernel's [`Limits`](crate::model::Limits).
//! - [`SlotTable`]: the one place slot calls are made, keeping the model's layout equal to the
//!   kernel's; fault injection.
//! - [`VcpuGate`]: parks and resumes vCPUs (real-time signal + `immediate_exit`).
//! - [`SlotUpdater`]: the atomic apply of a batch (or a model primitive) to a running VM with the
//!   `atomic`, `qemu` and `naive` strategies; what a VMM embeds.
//! - [`TestVm`]: a VM running the embedded test guest on vCPU threads, over a `SlotUpdater`.

mod dirty;
mod gate;
pub mod guest;
mod history;
mod memory;
mod slots;
mod testvm;
mod updater;
mod vcpu;
mod vm;

pub use dirty::{DirtyLog, DirtyLogError};
pub use gate::{
    GateVcpu, Kick, KickError, KickTarget, QuiesceTimes, Quiesced, SignalKick, VcpuGate, VcpuTicket,
};
pub use memory::{Backing, HostMemory, MemoryError, HUGE_PAGE};
pub use slots::{FaultInjector, SlotCallError, SlotTable};
pub use testvm::{kick_signal, LayoutRef, Probe, TestVm, TestVmConfig, TestVmError};
pub use updater::{
    qemu_batch, ApplyError, ApplyPrimitiveError, ApplyStats, SlotUpdater, Strategy, UpdateObserver,
};
pub use vcpu::{GuestCounters, GuestStats, Job};
pub use vm::{KvmError, Vm};
