//! `memslots bench`: every figure beside a baseline measured in turns with it, in one process.

mod blackout;
mod boot;
mod dirty;
mod harness;
mod ioctl;
mod machine;
mod planner;
mod scale;
mod soft;

use std::error::Error;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use serde::Serialize;

use crate::output::json_line;
use harness::{Figure, Mode};
use machine::Machine;

/// Arguments of `memslots bench`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Fewer rounds: under a minute.
    #[arg(long)]
    quick: bool,
    /// A round or two of everything, for tests of the output's shape (the figures mean little;
    /// soft_setup_32764_vs_gm_atomic, seconds even optimized, is left out, and the scale rows
    /// run on small traces).
    #[arg(long, hide = true, conflicts_with = "quick")]
    smoke: bool,
    /// Print the results as JSON on the last line of stdout.
    #[arg(long)]
    json: bool,
    /// Directory of committed QEMU traces (`*.log`).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/data/traces"))]
    traces: PathBuf,
    /// Run only these sections (scale, ioctl, blackout, kick, soft, planner, traces, dirty,
    /// boot); default all.
    #[arg(long, value_delimiter = ',', value_parser = SECTIONS)]
    only: Vec<String>,
}

/// The sections `--only` may name; anything else is a usage error (exit 2), not a run of nothing.
const SECTIONS: [&str; 9] = [
    "scale", "ioctl", "blackout", "kick", "soft", "planner", "traces", "dirty", "boot",
];

/// The committed traces in `dir`, sorted.
fn trace_files(dir: &Path) -> Result<Vec<PathBuf>, Box<dyn Error>> {
    Ok(memslots_testkit::trace::Trace::files_in(dir)
        .map_err(|e| format!("reading {}: {e}", dir.display()))?)
}

/// A trace's name in figure names: the file stem, `-` as `_`.
fn trace_name(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().replace(['-', '.'], "_"))
        .unwrap_or_default()
}

#[derive(Serialize)]
struct Results {
    machine: Machine,
    results: Vec<Figure>,
}

/// Runs the subcommand.
pub fn run(args: Args) -> Result<ExitCode, Box<dyn Error>> {
    let machine = Machine::read();
    println!(
        "machine: {} | kernel {} | {} cores",
        machine.cpu, machine.kernel, machine.cores
    );
    let mut results = Vec::new();
    let q = if args.smoke {
        Mode::Smoke
    } else if args.quick {
        Mode::Quick
    } else {
        Mode::Full
    };
    type Section<'a> = (
        &'a str,
        Box<dyn FnOnce() -> Result<Vec<Figure>, Box<dyn Error>> + 'a>,
    );
    let mut sections: Vec<Section> = vec![
        // First: its memory figures are growths of this process's peak, clearest before the
        // other sections have grown the heap.
        ("scale", Box::new(|| scale::run(q))),
        ("ioctl", Box::new(|| ioctl::run(q))),
        ("blackout", Box::new(|| blackout::workloads(q))),
        ("kick", Box::new(|| blackout::kick_to_parked(q))),
        ("soft", Box::new(|| soft::run(q))),
        ("planner", Box::new(|| planner::run(q, &args.traces))),
        ("traces", Box::new(|| blackout::traces(q, &args.traces))),
        ("dirty", Box::new(|| dirty::run(q))),
        ("boot", Box::new(|| boot::run(q))),
    ];
    sections.retain(|(what, _)| args.only.is_empty() || args.only.iter().any(|o| o == what));
    for (what, section) in sections {
        let t = Instant::now();
        results.extend(section().map_err(|e| format!("{what}: {e}"))?);
        eprintln!("section {what}: {:.1} s", t.elapsed().as_secs_f64());
    }
    let w = results.iter().map(|f| f.name.len()).max().unwrap_or(6);
    let bw = results
        .iter()
        .map(|f| f.baseline_name.len())
        .max()
        .unwrap_or(8);
    // The memory column only when some row has it.
    let rss = results.iter().any(|f| f.peak_rss_growth_kib.is_some());
    println!(
        "{:<w$} {:>12} {:>6}  {:<bw$} {:>12} {:>8}{}",
        "figure",
        "median",
        "unit",
        "baseline",
        "median",
        "ratio",
        if rss { "  peak RSS growth" } else { "" }
    );
    for f in &results {
        let ratio = f
            .ratio
            .map_or_else(|| "-".to_owned(), |r| format!("{r:.2}"));
        let growth = match f.peak_rss_growth_kib {
            Some(kib) => format!("  {kib} KiB"),
            None if rss => "  -".to_owned(),
            None => String::new(),
        };
        println!(
            "{:<w$} {:>12.2} {:>6}  {:<bw$} {:>12.2} {:>8}{growth}",
            f.name, f.value, f.unit, f.baseline_name, f.baseline_value, ratio
        );
    }
    if args.json {
        json_line(&Results { machine, results })?;
    }
    Ok(ExitCode::SUCCESS)
}
