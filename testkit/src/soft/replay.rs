//! `memslots replay TRACE --backend soft`: every commit of a QEMU trace run three ways on soft
//! memory ([`compare_commit`]): QEMU's calls as one-call batches, the planner's batch through
//! the atomic list algorithm, and native primitives; with reader threads standing in for vCPUs.

use std::time::Instant;

use serde::Serialize;

use super::compare::{compare_commit, CompareOptions, TraceComparison};
use super::stress::{one_call_batches, qemu_inhibits};
use crate::replay::{calls_of, QemuCommits};
use crate::stats::{Micros, Samples};
use crate::strategy::Strategy;
use crate::stress::StressReport;
use crate::trace::Trace;
use memslots::model::{Layout, Limits};
use memslots::planner::plan;
use memslots::soft::{SoftError, SoftMemory};

/// One figure for each of the three ways.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, Serialize)]
pub struct PerWay {
    /// QEMU's calls, each as a one-call batch.
    pub qemu: u64,
    /// The planner's batch through the atomic list algorithm.
    pub planned: u64,
    /// Native primitives (batches where none applies).
    pub native: u64,
}

/// The issue-5 summary with issue 6's extra fields, as `replay --backend soft` prints it.
#[derive(Clone, Debug, Serialize)]
pub struct SoftReplayReport {
    /// The issue-5 object (`backend: "soft"`).
    #[serde(flatten)]
    pub report: StressReport,
    /// SPTEs zapped or write-protected, per way.
    pub zapped_pages: PerWay,
    /// Reader lookups that landed in an invalid slot, per way.
    pub retries: PerWay,
    /// Every figure of every way, summed over the commits (not in the JSON).
    #[serde(skip)]
    pub ways: TraceComparison,
    /// Spurious MMIO per way (the report's `spurious_exits` is one of these; not in the JSON).
    #[serde(skip)]
    pub spurious: PerWay,
}

/// How to replay on the soft backend.
#[derive(Clone, Copy, Debug)]
pub struct SoftReplayConfig {
    /// Which way the summary's figures come from: `atomic` the planned batch, `qemu` and `naive`
    /// QEMU's calls (for `qemu`, readers are held out of commits where QEMU 8.0 inhibits).
    pub strategy: Strategy,
    /// Reader threads while each way runs.
    pub readers: usize,
    /// Pages of the starting layout faulted in before each way (what can be zapped).
    pub prefault_pages: u64,
}

/// Why a trace could not be replayed on the soft backend.
#[derive(Debug, thiserror::Error)]
pub enum SoftReplayError {
    /// The trace's commits could not be rebuilt.
    #[error("rebuilding the trace's commits")]
    Trace(#[from] crate::replay::ReplayError),
    /// The trace has no commit.
    #[error("the trace has no commit")]
    Empty,
    /// The planner refused a commit.
    #[error("planning commit {commit}")]
    Plan {
        /// Commit index.
        commit: usize,
        /// The cause.
        #[source]
        source: memslots::planner::PlanError,
    },
    /// The soft backend refused a commit one of the ways.
    #[error("running commit {commit} on soft memory")]
    Soft {
        /// Commit index.
        commit: usize,
        /// The cause.
        #[source]
        source: SoftError,
    },
}

fn per_way(t: &TraceComparison, f: impl Fn(&super::WayReport) -> u64) -> PerWay {
    PerWay {
        qemu: f(&t.qemu),
        planned: f(&t.planned),
        native: f(&t.native),
    }
}

/// Replays `trace` three ways, commit by commit, starting from an empty layout; each commit's
/// planned batch is planned from QEMU's layout before it to QEMU's mapping after it.
///
/// `layout_matches` is whether, in every commit, both the planned batch and the native steps end
/// in the trace's mapping. `update_us` (and, for `qemu`, `blackout_us`) are the strategy's way
/// timed again on its own without readers, so that the readers' threads do not inflate it.
pub fn replay(
    trace: &Trace,
    name: &str,
    config: &SoftReplayConfig,
    mut progress: impl FnMut(u64, Option<u64>),
) -> Result<SoftReplayReport, SoftReplayError> {
    let rss_kib_start = crate::stress::peak_rss_kib();
    let limits = Limits::default();
    // Commits are rebuilt one at a time (each map dropped once its commit ran), so memory is a
    // few layouts however long the trace; only the count is taken up front, for the progress.
    let total = trace.commits().len() as u64;
    if total == 0 {
        return Err(SoftReplayError::Empty);
    }
    let options = CompareOptions {
        readers: config.readers,
        prefault_pages: config.prefault_pages,
    };
    let mut layout = Layout::new(limits);
    let mut sums = TraceComparison::new();
    let (mut spurious, mut ioctls) = (0u64, 0u64);
    let mut blackout = Samples::new();
    let mut update_us = Samples::new();
    for (i, c) in QemuCommits::new(calls_of(trace), limits).enumerate() {
        let c = c?;
        let soft = |source| SoftReplayError::Soft { commit: i, source };
        let calls = &c.accepted;
        let planned = plan(&layout, &c.target)
            .map_err(|source| SoftReplayError::Plan { commit: i, source })?
            .batch();
        let cmp = compare_commit(&layout, calls, &planned, &options).map_err(soft)?;
        sums.add(&cmp);

        // The strategy's way again, alone, timed.
        let mut memory = SoftMemory::with_layout(layout.clone());
        let t0 = Instant::now();
        let inhibited = config.strategy == Strategy::Qemu && qemu_inhibits(&layout, calls);
        match config.strategy {
            Strategy::Atomic => {
                memory.apply_batch(planned.calls()).map_err(soft)?;
                ioctls += 1;
                spurious += cmp.planned.spurious_mmio;
            }
            Strategy::Qemu | Strategy::Naive => {
                one_call_batches(&mut memory, calls, &mut ioctls).map_err(soft)?;
                // QEMU 8.0 holds vCPUs out of a commit whose deletes overlap its creates.
                if !inhibited {
                    spurious += cmp.qemu.spurious_mmio;
                }
            }
        }
        let us = t0.elapsed().as_secs_f64() * 1e6;
        update_us.push(us);
        blackout.push(if inhibited { us } else { 0.0 });
        layout
            .apply_batch(calls)
            .map_err(|e| soft(SoftError::Refused(e)))?;
        progress(i as u64 + 1, Some(total));
    }
    let report = StressReport {
        backend: "soft",
        trigger: "host",
        strategy: config.strategy.name(),
        workload: name.to_owned(),
        vcpus: config.readers,
        updates: sums.commits,
        ioctls,
        guest_accesses: 0,
        spurious_exits: spurious,
        internal_errors: 0,
        data_errors: 0,
        lost_dirty_pages: 0,
        rollbacks: 0,
        blackout_us: blackout.micros(true),
        update_us: update_us.micros(false),
        // QEMU's layout after each commit maps exactly the trace's target.
        layout_matches: Some(sums.planned_matches && sums.native_matches),
        probed_bytes: None,
        hole_bytes: None,
        hole_bytes_probed: None,
        kick_to_parked_us: Micros::default(),
        rss_kib_start,
        rss_kib_end: crate::stress::peak_rss_kib(),
        first_problem: None,
    };
    Ok(SoftReplayReport {
        report,
        zapped_pages: per_way(&sums, |w| w.zapped_pages),
        retries: per_way(&sums, |w| w.retries),
        spurious: per_way(&sums, |w| w.spurious_mmio),
        ways: sums,
    })
}
