//! Planner time beside QEMU's own computation of the same change: the listener's diff of the
//! layouts before and after (`memslots_testkit::qemu::batch`: every changed slot deleted, every new
//! one created). Both turn a change into a list of slot calls; the ratio is what planning (ids,
//! MOVE / FLAGS_ONLY detection, ordering, the quiesce window) costs over the plainest diff.

use std::error::Error;
use std::path::Path;
use std::time::{Duration, Instant};

use memslots::model::{Layout, Limits};
use memslots::planner::{plan, plan_with, CutPolicy, MemoryMap};
use memslots_testkit::qemu::batch as qemu_batch;
use memslots_testkit::replay::qemu_commits;
use memslots_testkit::samples;
use memslots_testkit::trace::Trace;

use super::harness::{interleave, median, Figure, Mode};

/// The change of `tests/planner_plan.rs` ([`memslots_testkit::samples::planner_change`]): of 32,764
/// slots a quarter deleted, a quarter switched to dirty logging, a quarter moved, a quarter kept.
fn change() -> Result<(Layout, MemoryMap, Layout), Box<dyn Error>> {
    let n = u64::from(Limits::default().slots);
    let mut layout = Layout::new(Limits::default());
    let boot = plan_with(&layout, &samples::planner_grid(n)?, &CutPolicy::x86_pc())?;
    layout.apply_batch(&boot.slot_calls())?;
    let target = samples::planner_change(n)?;
    let mut after = layout.clone();
    after.apply_batch(&plan(&layout, &target)?.slot_calls())?;
    Ok((layout, target, after))
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// `plan_32764` and one figure per committed trace.
pub fn run(mode: Mode, traces: &Path) -> Result<Vec<Figure>, Box<dyn Error>> {
    let n = Limits::default().slots;
    let mut out = Vec::new();
    let (before, target, after) = change()?;
    let rounds = mode.pick(1, 5, 25);
    let (mut p, mut q) = interleave(
        rounds,
        || {
            let t = Instant::now();
            let r = plan(&before, &target);
            let d = t.elapsed();
            assert!(r.is_ok(), "the change planned once already");
            us(d)
        },
        || {
            let t = Instant::now();
            std::hint::black_box(qemu_batch(&before, &after));
            us(t.elapsed())
        },
    );
    out.push(Figure::new(
        format!("plan_{n}"),
        "us",
        median(&mut p),
        format!("qemu_listener_diff_{n}"),
        median(&mut q),
    ));

    let rounds = mode.pick(1, 5, 31);
    let limits = Limits::default();
    let policy = CutPolicy::default();
    for path in super::trace_files(traces)? {
        let name = super::trace_name(&path);
        let trace = Trace::from_file(&path)?;
        let commits = qemu_commits(&trace, limits)?;
        let mut qemu_layouts = vec![Layout::new(limits)];
        for c in &commits {
            let mut l = qemu_layouts.last().expect("not empty").clone();
            for call in trace.accepted_calls(c.calls.clone()) {
                let _ = l.apply(&call);
            }
            qemu_layouts.push(l);
        }
        let mut failed = None;
        let (mut p, mut q) = interleave(
            rounds,
            || {
                let mut layout = Layout::new(limits);
                let mut total = Duration::ZERO;
                for c in &commits {
                    let t = Instant::now();
                    let planned = plan_with(&layout, &c.target, &policy);
                    total += t.elapsed();
                    match planned {
                        Ok(pl) => {
                            let _ = layout.apply_batch(&pl.slot_calls());
                        }
                        Err(e) => failed = Some(e.to_string()),
                    }
                }
                us(total)
            },
            || {
                let mut total = Duration::ZERO;
                for w in qemu_layouts.windows(2) {
                    let t = Instant::now();
                    std::hint::black_box(qemu_batch(&w[0], &w[1]));
                    total += t.elapsed();
                }
                us(total)
            },
        );
        if let Some(e) = failed {
            eprintln!("note: planning {name}: {e}");
            continue;
        }
        out.push(Figure::new(
            format!("plan_trace_{name}"),
            "us",
            median(&mut p),
            format!("qemu_listener_diff_trace_{name}"),
            median(&mut q),
        ));
    }
    Ok(out)
}
