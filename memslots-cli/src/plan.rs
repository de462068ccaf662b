//! `memslots plan`: plan a QEMU trace's commits (or one change between two maps) and compare with
//! what QEMU did.

use std::error::Error;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use memslots::model::{Layout, Limits};
use memslots::planner::{plan_with, CutPolicy, MemoryMap, Plan};
use memslots_testkit::replay::{
    qemu_equivalent, PlannedCommit, PlannedCommits, QemuFigures, ReplayError, Totals,
};
use memslots_testkit::svg::{render, Frame};
use memslots_testkit::trace::TraceReader;
use serde::Serialize;

use crate::output::json_line;

/// Arguments of `memslots plan`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A QEMU `kvm_set_user_memory` trace: plan each of its commits.
    #[arg(value_name = "TRACE", required_unless_present_all = ["from", "to"], conflicts_with_all = ["from", "to"])]
    trace: Option<PathBuf>,
    /// The map before (JSON; see docs/map-format.md), with --to.
    #[arg(long, value_name = "A.json", requires = "to")]
    from: Option<PathBuf>,
    /// The map after (JSON), with --from.
    #[arg(long, value_name = "B.json", requires = "from")]
    to: Option<PathBuf>,
    /// Cut new slots only where the mapping requires (no x86 legacy boundaries).
    #[arg(long)]
    minimal_cuts: bool,
    /// Write an SVG drawing of the map before and after each commit, calls marked.
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
    /// Print the plans as JSON on the last line of stdout.
    #[arg(long)]
    json: bool,
}

/// One op of the JSON output: one `KVM_SET_USER_MEMORY_REGION` call.
#[derive(Serialize)]
struct Op {
    slot: u32,
    flags: u32,
    gpa: u64,
    size: u64,
    ua: u64,
    quiesced: bool,
    /// The call drops a logging slot's dirty bitmap: harvest before it.
    drops_dirty_bitmap: bool,
}

#[derive(Serialize)]
struct Transaction {
    ops: Vec<Op>,
}

/// The JSON report; its fields are fixed by the issue.
#[derive(Serialize)]
struct Report {
    transactions: Vec<Transaction>,
    ioctls: usize,
    quiesced_ioctls: usize,
    zapped_bytes: u64,
    qemu_ioctls: usize,
    qemu_inhibited_ioctls: usize,
    qemu_zapped_bytes: u64,
}

impl Transaction {
    fn of(plan: &Plan) -> Self {
        Transaction {
            ops: plan
                .calls
                .iter()
                .map(|c| Op {
                    slot: c.call.slot,
                    flags: c.call.flags,
                    gpa: c.call.gpa,
                    size: c.call.size,
                    ua: c.call.host,
                    quiesced: c.quiesced,
                    drops_dirty_bitmap: c.drops_dirty_bitmap,
                })
                .collect(),
        }
    }
}

impl Report {
    fn new(transactions: Vec<Transaction>, totals: Totals) -> Self {
        Report {
            transactions,
            ioctls: totals.ioctls,
            quiesced_ioctls: totals.quiesced_ioctls,
            zapped_bytes: totals.zapped_bytes,
            qemu_ioctls: totals.qemu.ioctls,
            qemu_inhibited_ioctls: totals.qemu.inhibited_ioctls,
            qemu_zapped_bytes: totals.qemu.zapped_bytes,
        }
    }
}

/// Runs the subcommand.
pub fn run(args: Args) -> Result<ExitCode, Box<dyn Error>> {
    let policy = if args.minimal_cuts {
        CutPolicy::minimal()
    } else {
        CutPolicy::default()
    };
    match (&args.trace, &args.from, &args.to) {
        (Some(trace), _, _) => run_trace(trace, &policy, &args),
        (None, Some(from), Some(to)) => run_maps(from, to, &policy, &args),
        _ => Err("give a TRACE, or --from A.json --to B.json".into()),
    }
}

fn bytes(n: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    for (size, unit) in UNITS {
        if n >= size {
            return format!("{:.1} {unit}", n as f64 / size as f64);
        }
    }
    format!("{n} B")
}

fn header() {
    println!(
        "{:>6}  {:>11}  {:>5}  {:>8}  {:>10}  | {:>10}  {:>9}  {:>10}",
        "commit", "lines", "calls", "quiesced", "zapped", "qemu calls", "inhibited", "qemu zapped"
    );
}

fn row(name: &str, lines: &str, plan: (usize, usize, u64), qemu: QemuFigures) {
    println!(
        "{name:>6}  {lines:>11}  {:>5}  {:>8}  {:>10}  | {:>10}  {:>9}  {:>10}",
        plan.0,
        plan.1,
        bytes(plan.2),
        qemu.ioctls,
        qemu.inhibited_ioctls,
        bytes(qemu.zapped_bytes)
    );
}

/// One commit's row of the table: a few numbers, so a long trace's table costs no maps.
struct Row {
    first_line: usize,
    last_line: usize,
    plan: (usize, usize, u64),
    qemu: QemuFigures,
}

/// The frames `--svg` draws, kept only while they fit its bounds; past them only counted, for
/// the error.
#[derive(Default)]
struct SvgFrames {
    frames: Vec<(String, MemoryMap, MemoryMap, Plan)>,
    commits: usize,
    items: usize,
}

impl SvgFrames {
    /// Whether the frames so far passed a bound: then no more is drawn, or built.
    fn too_large(&self) -> bool {
        self.commits > SVG_MAX_FRAMES || self.items > SVG_MAX_ITEMS
    }

    /// Counts a commit past the bounds, without its maps.
    fn skip(&mut self) {
        self.commits += 1;
    }

    fn push(&mut self, before: &MemoryMap, after: &MemoryMap, commit: &PlannedCommit) {
        self.commits += 1;
        self.items += before.len() + after.len() + commit.plan.calls.len();
        if self.too_large() {
            // Too large to draw: keep counting commits, drop what was kept.
            self.frames = Vec::new();
            return;
        }
        let title = format!(
            "commit {}, trace lines {}-{}",
            self.commits, commit.commit.first_line, commit.commit.last_line
        );
        self.frames
            .push((title, before.clone(), after.clone(), commit.plan.clone()));
    }
}

/// Streams the trace's commits through the planner, each planned from the part of the map it
/// changed (no map per commit). What is kept grows only with the output: a row per commit (the
/// header, printed first, says how many commits there were and that every plan matched, so the
/// table waits for the end), the ops for `--json`, and `--svg`'s bounded frames.
fn run_trace(path: &Path, policy: &CutPolicy, args: &Args) -> Result<ExitCode, Box<dyn Error>> {
    let reader = TraceReader::open(path)?;
    let mut stream = PlannedCommits::new(reader, Limits::default(), policy);
    let mut rows: Vec<Row> = Vec::new();
    let mut transactions: Vec<Transaction> = Vec::new();
    let mut svg = args.svg.as_ref().map(|_| SvgFrames::default());
    // The map before the commit, kept only for the drawing.
    let mut before = MemoryMap::default();
    while let Some(planned) = stream.next() {
        let c = planned.map_err(|e| match e {
            // Already says FILE:LINE.
            ReplayError::Trace(e) => Box::<dyn Error>::from(e),
            e => format!("{}: {}", path.display(), crate::output::chain(&e)).into(),
        })?;
        rows.push(Row {
            first_line: c.commit.first_line,
            last_line: c.commit.last_line,
            plan: (
                c.plan.ioctls(),
                c.plan.quiesced_ioctls(),
                c.plan.zapped_bytes(),
            ),
            qemu: c.commit.qemu,
        });
        if args.json {
            transactions.push(Transaction::of(&c.plan));
        }
        if let Some(svg) = &mut svg {
            if svg.too_large() {
                svg.skip();
            } else {
                // The maps cost time in the layout's size per commit: only for a drawing that
                // can still be drawn.
                let after = stream.target();
                svg.push(&before, &after, &c);
                before = after;
            }
        }
    }
    let totals = stream.totals();
    println!(
        "trace {}: {} calls in {} commits; every plan maps exactly like QEMU's layout",
        path.display(),
        stream.calls_read(),
        rows.len()
    );
    header();
    for (i, r) in rows.iter().enumerate() {
        row(
            &(i + 1).to_string(),
            &format!("{}-{}", r.first_line, r.last_line),
            r.plan,
            r.qemu,
        );
    }
    row(
        "total",
        "",
        (totals.ioctls, totals.quiesced_ioctls, totals.zapped_bytes),
        totals.qemu,
    );
    if let (Some(svg), Some(file)) = (svg, &args.svg) {
        svg_fits(svg.commits, svg.items)?;
        let frames: Vec<Frame<'_>> = svg
            .frames
            .iter()
            .map(|(title, before, after, plan)| Frame {
                title,
                before,
                after,
                plan,
            })
            .collect();
        write_svg(file, &render(&frames))?;
    }
    if args.json {
        json_line(&Report::new(transactions, totals))?;
    }
    Ok(ExitCode::SUCCESS)
}

fn run_maps(
    from: &Path,
    to: &Path,
    policy: &CutPolicy,
    args: &Args,
) -> Result<ExitCode, Box<dyn Error>> {
    let a = MemoryMap::from_file(from)?;
    let b = MemoryMap::from_file(to)?;
    let limits = Limits::default();
    let mut layout = Layout::new(limits);
    let boot = plan_with(&layout, &a, policy)
        .map_err(|e| format!("{}: {}", from.display(), crate::output::chain(&e)))?;
    layout.apply_batch(&boot.slot_calls())?;
    let plan = plan_with(&layout, &b, policy)
        .map_err(|e| format!("{}: {}", to.display(), crate::output::chain(&e)))?;
    let qemu = qemu_equivalent(&a, &b);
    println!(
        "{} -> {}: {} slots before ({} regions), {} regions after",
        from.display(),
        to.display(),
        layout.len(),
        a.len(),
        b.len()
    );
    header();
    row(
        "1",
        "-",
        (plan.ioctls(), plan.quiesced_ioctls(), plan.zapped_bytes()),
        qemu,
    );
    println!("calls:");
    for c in &plan.calls {
        println!(
            "  {:<10} {}{}{}",
            c.change.to_string(),
            c.call,
            if c.quiesced { "  [quiesced]" } else { "" },
            if c.drops_dirty_bitmap {
                "  [drops dirty bitmap]"
            } else {
                ""
            }
        );
    }
    if let Some(svg) = &args.svg {
        let title = format!("{} -> {}", from.display(), to.display());
        write_svg(
            svg,
            &render(&[Frame {
                title: &title,
                before: &a,
                after: &b,
                plan: &plan,
            }]),
        )?;
    }
    if args.json {
        let totals = Totals {
            ioctls: plan.ioctls(),
            quiesced_ioctls: plan.quiesced_ioctls(),
            zapped_bytes: plan.zapped_bytes(),
            qemu,
        };
        json_line(&Report::new(vec![Transaction::of(&plan)], totals))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Most commits `--svg` draws: one frame each (a 1,000-commit trace drew 1 GB).
const SVG_MAX_FRAMES: usize = 200;
/// Most regions and calls `--svg` draws over all frames.
const SVG_MAX_ITEMS: usize = 100_000;

/// Refuses, with a clear error, an SVG of `frames` frames drawing `items` (regions before and
/// after, and calls, per frame) past the bounds, before anything is rendered.
///
/// Regions and calls are counted only until a bound is passed: past it, `items` is a floor.
fn svg_fits(frames: usize, items: usize) -> Result<(), Box<dyn Error>> {
    if frames > SVG_MAX_FRAMES || items > SVG_MAX_ITEMS {
        let items = if items > SVG_MAX_ITEMS {
            format!("over {SVG_MAX_ITEMS}")
        } else {
            format!("{items} or more")
        };
        return Err(format!(
            "--svg: the trace is too large to draw ({frames} commits, {items} regions and calls; \
             at most {SVG_MAX_FRAMES} commits and {SVG_MAX_ITEMS} regions and calls); \
             plan a shorter trace or two maps with --from/--to"
        )
        .into());
    }
    Ok(())
}

fn write_svg(path: &Path, svg: &str) -> Result<(), Box<dyn Error>> {
    std::fs::write(path, svg).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    println!("svg written to {}", path.display());
    Ok(())
}
