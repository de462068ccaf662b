//! What memslots is tested and measured with, apart from the library a VMM embeds (Cloud
//! Hypervisor's `test_infra` is the model). Not published.
//!
//! - [`guest`], [`testvm`]: the embedded 32-bit test guest and a VM running it on vCPU threads.
//! - [`strategy`], [`qemu`], [`faults`]: the atomic, QEMU and naive ways to apply a batch; fault
//!   injection.
//! - [`workload`], [`stress`]: the layout changes `memslots stress` and `replay` run.
//! - [`trace`], [`replay`]: QEMU `kvm_set_user_memory` traces, their commits planned and compared.
//! - [`soft`]: the soft backend's stress, compare and replay engines.
//! - [`conformance`]: the model held against the running kernel and against traces.
//! - [`samples`], [`stats`], [`svg`]: shared layouts, percentiles, drawings.
//! - [`boot`]: a small i440fx VMM booting SeaBIOS, its PAM writes applied by memslots.
#![deny(missing_docs)]

pub mod boot;
pub mod conformance;
pub mod faults;
pub mod guest;
pub mod qemu;
pub mod replay;
pub mod samples;
pub mod soft;
pub mod stats;
pub mod strategy;
pub mod stress;
pub mod svg;
pub mod testvm;
pub mod trace;
mod window;
pub mod workload;

/// An error and its causes, joined with ": " (each cause once, as the CLI prints them).
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}
