//! The trace tools on traces far longer and wider than the committed ones, generated in code
//! ([`SyntheticTrace`]): `plan` of 50,000 commits over 2,000 slots, and `conformance --trace` of
//! 92,764 calls over 32,764 slots. Each row gives the time and the peak resident memory the run
//! added: both must grow linearly with the trace (a map kept per commit took 6 GB).

use std::error::Error;
use std::hint::black_box;
use std::time::Instant;

use memslots::model::{Layout, Limits};
use memslots::planner::CutPolicy;
use memslots_testkit::conformance::run_trace_calls;
use memslots_testkit::replay::PlannedCommits;
use memslots_testkit::samples::SyntheticTrace;
use memslots_testkit::stress::PeakRss;
use memslots_testkit::trace::{Commits, Trace, TraceReader};

use super::harness::{interleave, median, Figure, Mode};

/// Time in ms and peak RSS growth in KiB of `work`.
fn measured(
    work: impl FnOnce() -> Result<(), Box<dyn Error>>,
) -> Result<(f64, u64), Box<dyn Error>> {
    let rss = PeakRss::start();
    let t = Instant::now();
    work()?;
    Ok((t.elapsed().as_secs_f64() * 1e3, rss.growth_kib()))
}

/// `plan_trace_<N>_commits` (beside reading the trace and applying QEMU's calls, the floor of any
/// pass over it) and `conformance_trace_<M>_slots` (beside parsing the trace alone).
pub fn run(mode: Mode) -> Result<Vec<Figure>, Box<dyn Error>> {
    // Smoke runs (debug builds, for the output's shape) use small traces; the names say so.
    let plan_trace = SyntheticTrace {
        commits: mode.pick(500, 50_000, 50_000),
        slots: mode.pick(200, 2_000, 2_000),
        seed: 1,
    };
    let conformance_trace = SyntheticTrace {
        commits: mode.pick(1_001, 30_001, 30_001),
        slots: mode.pick(1_000, Limits::default().slots, Limits::default().slots),
        seed: 2,
    };
    let rounds = mode.pick(1, 1, 3);
    Ok(vec![
        plan(&plan_trace, rounds)?,
        conformance(&conformance_trace, rounds)?,
    ])
}

fn plan(spec: &SyntheticTrace, rounds: usize) -> Result<Figure, Box<dyn Error>> {
    let text = spec.text();
    let limits = Limits::default();
    let policy = CutPolicy::default();
    let mut failed: Option<Box<dyn Error>> = None;
    let mut growth = 0;
    let (mut p, mut q) = interleave(
        rounds,
        || {
            // What `memslots plan` does, reading from memory instead of a file.
            let run = measured(|| {
                let mut stream =
                    PlannedCommits::new(TraceReader::new(text.as_bytes(), None), limits, &policy);
                for c in &mut stream {
                    black_box(c?);
                }
                black_box(stream.totals());
                Ok(())
            });
            match run {
                Ok((ms, kib)) => {
                    growth = growth.max(kib);
                    ms
                }
                Err(e) => {
                    failed = Some(e);
                    f64::NAN
                }
            }
        },
        || {
            // The floor of any pass over the trace: parse it and apply QEMU's calls to the model.
            // (QEMU's own listener works from the sections that changed, as its calls do: a diff
            // of its whole layouts per commit, as `plan_trace_<name>` compares, is no baseline
            // for a streamed pass.)
            let run = measured(|| {
                let mut layout = Layout::new(limits);
                for commit in Commits::new(TraceReader::new(text.as_bytes(), None)) {
                    for tc in commit?.iter().filter(|tc| tc.accepted()) {
                        layout.apply(&tc.call)?;
                    }
                }
                black_box(layout);
                Ok(())
            });
            run.map_or(f64::NAN, |(ms, _)| ms)
        },
    );
    if let Some(e) = failed {
        return Err(format!("planning the generated trace: {e}").into());
    }
    Ok(Figure::new(
        format!("plan_trace_{}_commits", spec.commits),
        "ms",
        median(&mut p),
        format!("read_trace_{}_commits", spec.commits),
        median(&mut q),
    )
    .with_peak_rss_growth(growth))
}

fn conformance(spec: &SyntheticTrace, rounds: usize) -> Result<Figure, Box<dyn Error>> {
    let text = spec.text();
    let mut mismatches = 0;
    let mut growth = 0;
    let mut failed: Option<Box<dyn Error>> = None;
    let (mut c, mut b) = interleave(
        rounds,
        || {
            // What `memslots conformance --trace` does (streaming), reading from memory.
            let run = measured(|| {
                let calls = TraceReader::new(text.as_bytes(), None);
                let report = run_trace_calls(calls, Limits::default())?;
                mismatches += report.mismatches;
                black_box(report);
                Ok(())
            });
            match run {
                Ok((ms, kib)) => {
                    growth = growth.max(kib);
                    ms
                }
                Err(e) => {
                    failed = Some(e);
                    f64::NAN
                }
            }
        },
        || {
            let run = measured(|| {
                black_box(Trace::parse_bytes(text.as_bytes())?);
                Ok(())
            });
            run.map_or(f64::NAN, |(ms, _)| ms)
        },
    );
    if let Some(e) = failed {
        return Err(format!("reading the generated trace: {e}").into());
    }
    if mismatches > 0 {
        return Err(
            format!("the model disagrees with {mismatches} calls of the generated trace").into(),
        );
    }
    Ok(Figure::new(
        format!("conformance_trace_{}_slots", spec.slots),
        "ms",
        median(&mut c),
        format!("parse_trace_{}_slots", spec.slots),
        median(&mut b),
    )
    .with_peak_rss_growth(growth))
}
