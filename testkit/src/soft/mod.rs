//! The soft backend measured: concurrent stress, one commit compared three ways (QEMU's calls, a
//! planned batch, native primitives), and trace replay.

pub mod compare;
pub mod replay;
pub mod stress;

pub use compare::{
    compare_commit, compare_trace, native_steps, CommitComparison, CompareOptions, NativeStep,
    TraceComparison, WayReport,
};
