//! `memslots replay TRACE --backend soft`: every commit of a QEMU trace run three ways on soft
//! memory: QEMU's calls as one-call batches, the planner's batch through the atomic list
//! algorithm, and native primitives; with reader threads standing in for vCPUs.
//!
//! Each way keeps its own soft memory through the whole trace, and everything done per commit is
//! confined to the commit's window (the ranges outside which neither QEMU's mapping nor the
//! planner's slots change, see `window.rs`): the readers and the prefault cover the window's
//! pages, the native steps are worked out from the window's slots, and the per-commit checks
//! compare the window's slots. So time grows with the trace (times the log of the layout), not
//! with commits times slots; the whole layouts are compared once, at the end. A commit planned
//! from the whole map (rare: a slot budget crossed) is handled the same way over the whole
//! layout.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use serde::Serialize;

use super::compare::{native_steps, Mark, NativeStep, TraceComparison, WayReport};
use super::stress::one_call_batches;
use crate::replay::{calls_of, PlannedCommits};
use crate::stats::{Micros, Samples};
use crate::strategy::Strategy;
use crate::stress::StressReport;
use crate::trace::{Trace, TraceCall, TraceError};
use crate::window::{join, within};
use memslots::model::{GpaRange, HoleReport, Layout, Limits, PAGE_SIZE};
use memslots::planner::{CutPolicy, MemoryMap};
use memslots::soft::{Access, SoftError, SoftMemory};

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
    /// The trace could not be read, or a commit not planned.
    #[error("rebuilding and planning the trace's commits")]
    Trace(#[from] crate::replay::ReplayError),
    /// The trace has no commit.
    #[error("the trace has no commit")]
    Empty,
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

/// Replays a parsed trace; see [`replay_calls`].
pub fn replay(
    trace: &Trace,
    name: &str,
    config: &SoftReplayConfig,
    progress: impl FnMut(u64, Option<u64>),
) -> Result<SoftReplayReport, SoftReplayError> {
    let total = trace.commits().len() as u64;
    replay_calls(calls_of(trace), Some(total), name, config, progress)
}

/// One way of applying the trace: its soft memory through the whole trace.
struct Way {
    memory: SoftMemory,
    report: WayReport,
}

impl Way {
    fn new(limits: Limits) -> Self {
        Way {
            memory: SoftMemory::new(limits),
            report: WayReport::default(),
        }
    }

    /// Runs `apply` with the cache holding exactly the probed pages and `readers` threads
    /// touching them meanwhile; adds what it cost to the way's sums.
    ///
    /// `apply` calls its second argument between two of its steps: it returns once every reader
    /// has made a whole pass over the probes on the layout that step left, as vCPUs run between
    /// two ioctls. So a probe in a hole a step leaves open is touched while it is open, whatever
    /// the scheduling; inside one step (a batch), readers race with the writer.
    fn run(
        &mut self,
        probes: &[Probe],
        readers: usize,
        apply: impl FnOnce(&mut SoftMemory, &dyn Fn()) -> Result<u64, SoftError>,
    ) -> Result<(), SoftError> {
        let memory = &mut self.memory;
        memory.drop_sptes();
        let mut prefault = memory.reader();
        for p in probes {
            prefault.access_in(p.address_space, p.gpa, true);
        }
        drop(prefault);
        let start = Mark::of(memory);
        let stop = AtomicBool::new(false);
        let spurious = AtomicU64::new(0);
        let readers = if probes.is_empty() { 0 } else { readers };
        // Steps the writer made, and per reader the last step it made a whole pass after.
        let step = AtomicU64::new(0);
        let acked: Vec<AtomicU64> = (0..readers).map(|_| AtomicU64::new(0)).collect();
        let settle = || {
            let now = step.fetch_add(1, Ordering::AcqRel) + 1;
            while acked.iter().any(|a| a.load(Ordering::Acquire) < now) {
                // Sleeping, not spinning: the readers need the cores (each yields after a pass,
                // so the writer gets one back soon after it wakes).
                std::thread::sleep(std::time::Duration::from_micros(20));
            }
        };
        let steps = std::thread::scope(|scope| {
            for (r, ack) in acked.iter().enumerate() {
                let mut reader = memory.reader();
                let (stop, spurious, step) = (&stop, &spurious, &step);
                scope.spawn(move || {
                    let mut seen = 0;
                    let n = probes.len();
                    let (mut i, mut in_pass) = (r * n / readers, 0);
                    let mut pass_after = step.load(Ordering::Acquire);
                    while !stop.load(Ordering::Relaxed) {
                        let p = &probes[i % n];
                        if p.ram_throughout
                            && reader.access_in(p.address_space, p.gpa, false) == Access::Mmio
                        {
                            seen += 1;
                        }
                        i += 1;
                        in_pass += 1;
                        if in_pass == n {
                            ack.store(pass_after, Ordering::Release);
                            in_pass = 0;
                            // A writer waiting for this pass gets a core now, not after the
                            // time slice (on a machine with fewer cores than threads).
                            std::thread::yield_now();
                        }
                        // A new step: the pass starts again, all of it on the new layout.
                        let now = step.load(Ordering::Acquire);
                        if now != pass_after {
                            pass_after = now;
                            in_pass = 0;
                        }
                    }
                    spurious.fetch_add(seen, Ordering::Relaxed);
                });
            }
            let steps = apply(memory, &settle);
            stop.store(true, Ordering::Relaxed);
            steps
        })?;
        self.report.add(&WayReport::since(
            start,
            memory,
            steps,
            spurious.load(Ordering::Relaxed),
        ));
        Ok(())
    }
}

/// A page the readers touch during a commit.
#[derive(Clone, Copy, Debug)]
struct Probe {
    address_space: u16,
    gpa: u64,
    /// RAM in QEMU's layout before and after the commit: MMIO there is a spurious exit.
    ram_throughout: bool,
    /// In a hole QEMU's calls open: where a spurious exit can be seen.
    in_hole: bool,
}

/// Whether `gpa` lies in one of `ranges` (sorted and disjoint, as [`join`] gives them).
fn in_ranges(ranges: &[GpaRange], address_space: u16, gpa: u64) -> bool {
    let i = ranges.partition_point(|r| (r.address_space, r.end) <= (address_space, gpa));
    ranges
        .get(i)
        .is_some_and(|r| r.address_space == address_space && r.start <= gpa)
}

/// For each of `calls` calls, whether after it a hole is open that holds a probe the readers
/// judge (RAM before and after): where the readers must make a pass before the next call.
fn probed_hole_open_after(holes: &HoleReport, probes: &[Probe], calls: usize) -> Vec<bool> {
    let judged: Vec<(u16, u64)> = probes
        .iter()
        .filter(|p| p.ram_throughout)
        .map(|p| (p.address_space, p.gpa))
        .collect();
    // Open holes per call, as a running sum of openings and closings.
    let mut delta = vec![0i64; calls + 1];
    for h in &holes.holes {
        let r = h.range;
        // Probes are in (address space, GPA) order: the first at or after the hole's start.
        let i = judged.partition_point(|&p| p < (r.address_space, r.start));
        let probed = judged
            .get(i)
            .is_some_and(|&(space, gpa)| space == r.address_space && gpa < r.end);
        if probed && h.opened_by < h.closed_by && h.closed_by <= calls {
            delta[h.opened_by] += 1;
            delta[h.closed_by] -= 1;
        }
    }
    let mut open = 0;
    delta[..calls]
        .iter()
        .map(|d| {
            open += d;
            open > 0
        })
        .collect()
}

/// At most `limit` pages of `ranges` (sorted and disjoint), spread evenly over them, in order.
fn probes(
    ranges: &[GpaRange],
    before: &Layout,
    after: &Layout,
    holes: &[GpaRange],
    limit: u64,
) -> Vec<Probe> {
    let pages: u64 = ranges
        .iter()
        .map(|r| (r.end - r.start).div_ceil(PAGE_SIZE))
        .sum();
    let stride = pages.div_ceil(limit.max(1)).max(1);
    let mut out = Vec::new();
    // Pages of the next range to pass over before its first probe.
    let mut skip = 0;
    for r in ranges {
        let n = (r.end - r.start).div_ceil(PAGE_SIZE);
        let mut k = skip;
        while k < n {
            let Some(gpa) = k
                .checked_mul(PAGE_SIZE)
                .and_then(|o| r.start.checked_add(o))
            else {
                break;
            };
            let space = r.address_space;
            out.push(Probe {
                address_space: space,
                gpa,
                ram_throughout: before.find(space, gpa).is_some()
                    && after.find(space, gpa).is_some(),
                in_hole: in_ranges(holes, space, gpa),
            });
            k += stride;
        }
        skip = k.saturating_sub(n);
    }
    out
}

/// Every slot's range in `layouts`, sorted, overlapping ones joined: the window of a commit
/// planned from the whole map.
fn all_ranges(layouts: &[&Layout]) -> Vec<GpaRange> {
    join(
        layouts
            .iter()
            .flat_map(|l| l.slots())
            .map(|s| GpaRange {
                address_space: s.id.address_space,
                start: s.gpa,
                end: s.end(),
            })
            .collect(),
    )
}

/// The slots of `layout` in `window`, or all of them without one.
fn part(layout: &Layout, window: Option<&[GpaRange]>) -> Layout {
    match window {
        Some(w) => within(layout, w),
        None => layout.clone(),
    }
}

/// Replays the trace `calls` yields (a file is read as it goes, see
/// [`TraceReader`](crate::trace::TraceReader)) three ways, commit by commit, starting from an
/// empty layout; each commit is planned from the planner's layout to QEMU's mapping after it, as
/// `memslots plan` plans it. `total` is the number of commits, if known, for `progress`.
///
/// `layout_matches` is whether, in every commit, the planned batch ends in QEMU's mapping and the
/// native steps in the planned batch's layout. `update_us` (and, for `qemu`, `blackout_us`) are
/// the strategy's way run once more on a soft memory of its own without readers, so that the
/// readers' threads do not inflate it.
pub fn replay_calls(
    calls: impl Iterator<Item = Result<TraceCall, TraceError>>,
    total: Option<u64>,
    name: &str,
    config: &SoftReplayConfig,
    mut progress: impl FnMut(u64, Option<u64>),
) -> Result<SoftReplayReport, SoftReplayError> {
    let rss_kib_start = crate::stress::peak_rss_kib();
    let limits = Limits::default();
    let mut stream = PlannedCommits::new(calls, limits, &CutPolicy::default());
    let (mut qemu, mut planned, mut native) =
        (Way::new(limits), Way::new(limits), Way::new(limits));
    // The strategy's way, timed alone.
    let mut timed = SoftMemory::new(limits);
    // QEMU's layout before the commit, for its holes.
    let mut qemu_before = Layout::new(limits);
    let (mut probed_bytes, mut hole_bytes, mut hole_bytes_probed) = (0u64, 0u64, 0u64);
    let mut sums = TraceComparison::new();
    let (mut spurious, mut ioctls) = (0u64, 0u64);
    let mut blackout = Samples::new();
    let mut update_us = Samples::new();
    let mut i = 0;
    while let Some(c) = stream.next() {
        let c = c?;
        let soft = |source| SoftReplayError::Soft { commit: i, source };
        let window = stream.window().map(<[GpaRange]>::to_vec);
        let ranges = window.clone().unwrap_or_else(|| {
            all_ranges(&[
                qemu.memory.layout(),
                stream.qemu_layout(),
                planned.memory.layout(),
                stream.layout(),
            ])
        });
        let accepted = &c.commit.accepted;
        let holes = qemu_before
            .holes(accepted)
            .map_err(|e| soft(SoftError::Refused(e)))?;
        let probes = probes(
            &ranges,
            &qemu_before,
            stream.qemu_layout(),
            &join(holes.holes.iter().map(|h| h.range).collect()),
            config.prefault_pages,
        );
        let hole_open = probed_hole_open_after(&holes, &probes, accepted.len());
        probed_bytes += probes.len() as u64 * PAGE_SIZE;
        hole_bytes += holes.bytes();
        hole_bytes_probed += probes.iter().filter(|p| p.in_hole).count() as u64 * PAGE_SIZE;
        let w = window.as_deref();
        // The planner's slots in the window once its batch ran: what the native steps must
        // reach, and what the ways are held against.
        let planned_after = part(stream.layout(), w);
        // The primitives lower the planner's change, not QEMU's: QEMU renumbers slots it
        // re-creates, and a primitive only applies to a slot that keeps its id.
        let steps = native_steps(&part(planned.memory.layout(), w), &planned_after);
        let batch = c.plan.batch();
        let seen_before = (qemu.report.spurious_mmio, planned.report.spurious_mmio);

        qemu.run(&probes, config.readers, |m, settle| {
            for (k, call) in accepted.iter().enumerate() {
                // Only where a probed hole is open: a commit of thousands of calls waits for
                // passes only between the calls a vCPU could fall into.
                if k > 0 && hole_open[k - 1] {
                    settle();
                }
                m.apply_batch(std::slice::from_ref(call))?;
            }
            Ok(accepted.len() as u64)
        })
        .map_err(soft)?;
        planned
            .run(&probes, config.readers, |m, _| {
                m.apply_batch(batch.calls())?;
                Ok(1)
            })
            .map_err(soft)?;
        native
            .run(&probes, config.readers, |m, settle| {
                for (k, step) in steps.iter().enumerate() {
                    if k > 0 {
                        settle();
                    }
                    match step {
                        NativeStep::Primitive(p) => m.apply_primitive(p)?,
                        NativeStep::Batch(b) => m.apply_batch(b.calls())?,
                    };
                }
                Ok(steps.len() as u64)
            })
            .map_err(soft)?;

        // The way of the summary, alone, timed.
        let inhibited = config.strategy == Strategy::Qemu && c.commit.qemu.inhibited_ioctls > 0;
        let t0 = Instant::now();
        match config.strategy {
            Strategy::Atomic => {
                timed.apply_batch(batch.calls()).map_err(soft)?;
                ioctls += 1;
            }
            Strategy::Qemu | Strategy::Naive => {
                one_call_batches(&mut timed, accepted, &mut ioctls).map_err(soft)?;
            }
        }
        let us = t0.elapsed().as_secs_f64() * 1e6;
        update_us.push(us);
        blackout.push(if inhibited { us } else { 0.0 });
        spurious += match config.strategy {
            Strategy::Atomic => planned.report.spurious_mmio - seen_before.1,
            // QEMU 8.0 holds vCPUs out of a commit whose deletes overlap its creates.
            _ if inhibited => 0,
            _ => qemu.report.spurious_mmio - seen_before.0,
        };

        qemu_before
            .apply_batch(accepted)
            .map_err(|e| soft(SoftError::Refused(e)))?;

        // Outside the window nothing changed: the window's slots say whether the ways agree
        // (the planned memory is held against the planner's layout once, at the end).
        sums.commits += 1;
        sums.planned_matches &= MemoryMap::from_layout(&planned_after)
            == MemoryMap::from_layout(&part(qemu.memory.layout(), w));
        sums.native_matches &= part(native.memory.layout(), w)
            .slots()
            .eq(planned_after.slots());
        i += 1;
        progress(i as u64, total);
    }
    if i == 0 {
        return Err(SoftReplayError::Empty);
    }
    // Once, over the whole layouts: every way where the trace and the planner left it.
    sums.planned_matches &= MemoryMap::from_layout(planned.memory.layout())
        == MemoryMap::from_layout(qemu.memory.layout())
        && qemu
            .memory
            .layout()
            .slots()
            .eq(stream.qemu_layout().slots())
        && planned.memory.layout().slots().eq(stream.layout().slots());
    sums.native_matches &= native
        .memory
        .layout()
        .slots()
        .eq(planned.memory.layout().slots());
    sums.qemu = qemu.report;
    sums.planned = planned.report;
    sums.native = native.report;
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
        layout_matches: Some(sums.planned_matches && sums.native_matches),
        probed_bytes: Some(probed_bytes),
        hole_bytes: Some(hole_bytes),
        hole_bytes_probed: Some(hole_bytes_probed),
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

fn per_way(t: &TraceComparison, f: impl Fn(&WayReport) -> u64) -> PerWay {
    PerWay {
        qemu: f(&t.qemu),
        planned: f(&t.planned),
        native: f(&t.native),
    }
}

#[cfg(test)]
mod tests {
    use super::{in_ranges, probed_hole_open_after, probes, Probe};
    use crate::conformance::SplitMix64;
    use crate::window::join;
    use memslots::model::{GpaRange, Hole, HoleReport, Layout, Limits, PAGE_SIZE};

    fn range(address_space: u16, start: u64, end: u64) -> GpaRange {
        GpaRange {
            address_space,
            start: start * PAGE_SIZE,
            end: end * PAGE_SIZE,
        }
    }

    #[test]
    fn probes_are_spread_evenly_in_order_and_capped() {
        let empty = Layout::new(Limits::default());
        let ranges = [range(0, 0, 10), range(0, 20, 23), range(1, 5, 100)];
        for limit in [1, 7, 50, 108, 1000] {
            let p = probes(&ranges, &empty, &empty, &[], limit);
            let got: Vec<(u16, u64)> = p.iter().map(|p| (p.address_space, p.gpa)).collect();
            // Every page of the ranges, in order, then every stride-th of them.
            let all: Vec<(u16, u64)> = ranges
                .iter()
                .flat_map(|r| {
                    (r.start / PAGE_SIZE..r.end / PAGE_SIZE)
                        .map(move |page| (r.address_space, page * PAGE_SIZE))
                })
                .collect();
            let stride = (all.len() as u64).div_ceil(limit) as usize;
            let want: Vec<(u16, u64)> = all.iter().copied().step_by(stride).collect();
            assert_eq!(got, want, "limit {limit}");
            assert!(got.len() as u64 <= limit);
        }
    }

    #[test]
    fn ranges_lookup_agrees_with_every_range() {
        let mut rng = SplitMix64::new(3);
        for _ in 0..500 {
            let raw: Vec<GpaRange> = (0..rng.below(6))
                .map(|_| {
                    let start = rng.below(40);
                    range(rng.below(2) as u16, start, start + 1 + rng.below(8))
                })
                .collect();
            let joined = join(raw.clone());
            for space in 0..2 {
                for page in 0..50 {
                    let gpa = page * PAGE_SIZE + rng.below(PAGE_SIZE);
                    let any = raw
                        .iter()
                        .any(|r| r.address_space == space && r.start <= gpa && gpa < r.end);
                    assert_eq!(in_ranges(&joined, space, gpa), any, "{raw:?} {gpa:#x}");
                }
            }
        }
    }

    #[test]
    fn readers_are_waited_for_only_while_a_probed_hole_is_open() {
        let probe = |page: u64, ram_throughout| Probe {
            address_space: 0,
            gpa: page * PAGE_SIZE,
            ram_throughout,
            in_hole: false,
        };
        let probes = [probe(2, true), probe(10, false), probe(20, true)];
        let hole = |start, end, opened_by, closed_by| Hole {
            range: range(0, start, end),
            opened_by,
            closed_by,
        };
        let holes = HoleReport {
            holes: vec![
                // Holds the probe at page 2: open after calls 1 and 2.
                hole(0, 4, 1, 3),
                // Holds only a probe not judged (MMIO before or after): no wait.
                hole(8, 12, 4, 6),
                // Holds no probe.
                hole(30, 40, 5, 7),
                // Holds the probe at page 20: open after call 6.
                hole(20, 21, 6, 7),
            ],
        };
        assert_eq!(
            probed_hole_open_after(&holes, &probes, 8),
            [false, true, true, false, false, false, true, false]
        );
    }
}
