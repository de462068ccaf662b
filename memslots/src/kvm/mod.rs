//! The real `/dev/kvm` backend.
//!
//! - [`Vm`]: the VM file descriptor and the kernel's [`Limits`](crate::model::Limits).
//! - [`SlotTable`]: the one place slot calls are made, keeping the model's layout equal to the
//!   kernel's; fault injection.
//! - [`VcpuGate`]: parks and resumes vCPUs (real-time signal + `immediate_exit`).
//! - [`SlotUpdater`]: the atomic apply of a batch (or a model primitive) to a running VM; what a
//!   VMM embeds.

mod dirty;
mod gate;
mod memory;
mod ring;
mod slots;
mod updater;
mod view;
mod vm;

pub use dirty::{DirtyBitmap, DirtyLog, DirtyLogError, DirtyPages};
pub use gate::{
    GateVcpu, Kick, KickError, KickTarget, QuiesceTimes, Quiesced, SignalKick, VcpuGate, VcpuTicket,
};
pub use memory::{Backing, HostMemory, MemoryError, HUGE_PAGE};
pub use ring::{DirtyRing, RingError, EXIT_DIRTY_RING_FULL};
pub use slots::{FaultHook, SlotCallError, SlotTable};
pub use updater::{
    ApplyError, ApplyPrimitiveError, ApplyStats, DirtyBits, Hold, SlotUpdater, UpdateObserver,
};
pub use view::ViewBitmap;
pub use vm::{KvmError, SlotVm, Vm};
