//! `memslots replay TRACE`: a QEMU trace's commits replayed on a running test guest.

use std::error::Error;
use std::path::PathBuf;
use std::process::ExitCode;

use memslots_testkit::replay::ReplayError;
use memslots_testkit::soft::compare::CompareOptions;
use memslots_testkit::soft::replay::{replay_calls, SoftReplayConfig, SoftReplayError};
use memslots_testkit::strategy::Strategy;
use memslots_testkit::stress::{replay, ReplayConfig, StressReport};
use memslots_testkit::trace::{Trace, TraceReader};

use crate::output::{json_line, Progress};
use crate::stress::{
    exit_status, print_summary, require_kvm, trigger, BackendArg, DirtyLogArg, StrategyArg,
    TriggerArg,
};

/// Arguments of `memslots replay`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A QEMU `kvm_set_user_memory` trace.
    trace: PathBuf,
    /// Where the slots live.
    #[arg(long, value_enum, default_value_t = BackendArg::Kvm)]
    backend: BackendArg,
    /// `atomic`: the planner's batch per commit; `qemu`, `naive`: QEMU's own calls.
    #[arg(long, value_enum, default_value_t = StrategyArg::Atomic)]
    strategy: StrategyArg,
    /// Who starts each commit: the guest on vCPU 0 (default with --backend kvm) or a host
    /// thread (the only choice with --backend soft).
    #[arg(long, value_enum)]
    trigger: Option<TriggerArg>,
    /// Times through the trace (forward, then back to the first layout); kvm backend only, the
    /// soft backend runs each commit once, three ways.
    #[arg(long, default_value_t = 20)]
    loops: u64,
    /// vCPUs running the test guest (soft backend: reader threads).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=7))]
    vcpus: u16,
    /// Seed of injected faults.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Make each slot ioctl fail with this probability; failed commits roll back and are retried.
    #[arg(long, value_name = "P")]
    inject_faults: Option<f64>,
    /// How dirty pages are kept: KVM's bitmaps or its dirty ring.
    #[arg(long, value_enum, default_value_t = DirtyLogArg::Bitmap)]
    dirty_log: DirtyLogArg,
    /// Print the summary as JSON on the last line of stdout.
    #[arg(long)]
    json: bool,
}

/// Runs the subcommand.
pub fn run_cli(args: Args) -> Result<ExitCode, Box<dyn Error>> {
    let name = args
        .trace
        .file_name()
        .map_or_else(|| "trace".into(), |n| n.to_string_lossy().into_owned());
    let trigger = trigger(args.backend, args.trigger)?;
    let dirty_ring = crate::stress::dirty_ring(args.backend, args.dirty_log)?;
    if args.backend == BackendArg::Soft {
        return run_soft(&args, &name);
    }
    require_kvm()?;
    let trace = Trace::from_file(&args.trace)?;
    let config = ReplayConfig {
        strategy: args.strategy.into(),
        trigger,
        vcpus: usize::from(args.vcpus),
        loops: args.loops,
        seed: args.seed,
        inject_faults: crate::stress::probability(args.inject_faults)?,
        dirty_ring,
    };
    let bar = Progress::new(None, format!("{name} / {}", config.strategy.name()));
    let report = replay(&trace, &name, &config, |done, total| bar.set(done, total))?;
    bar.finish();
    print_replay_summary(&report);
    if args.json {
        json_line(&report)?;
    }
    Ok(exit_status(&report, config.strategy))
}

/// The summary table and whether every commit ended in the trace's mapping.
fn print_replay_summary(report: &StressReport) {
    print_summary(report);
    println!(
        "  {:<28} {}",
        "layout matches the trace",
        report.layout_matches.unwrap_or(false)
    );
}

/// `--backend soft`: every commit three ways (QEMU's calls, planned batch, native primitives).
fn run_soft(args: &Args, name: &str) -> Result<ExitCode, Box<dyn Error>> {
    if args.inject_faults.is_some() {
        return Err("--inject-faults is not supported by replay --backend soft".into());
    }
    let strategy: Strategy = args.strategy.into();
    let config = SoftReplayConfig {
        strategy,
        readers: usize::from(args.vcpus),
        prefault_pages: CompareOptions::default().prefault_pages,
    };
    let bar = Progress::new(None, format!("{name} / soft"));
    // Streamed: the trace is read as it is replayed, commit by commit.
    let calls = TraceReader::open(&args.trace)?;
    let soft = replay_calls(calls, None, name, &config, |done, total| {
        bar.set(done, total)
    })
    .map_err(|e| match e {
        // Already says FILE:LINE.
        SoftReplayError::Trace(ReplayError::Trace(e)) => Box::<dyn Error>::from(e),
        e => format!("{}: {}", args.trace.display(), crate::output::chain(&e)).into(),
    })?;
    bar.finish();
    print_replay_summary(&soft.report);
    println!(
        "{} commits, {} reader threads, three ways:",
        soft.ways.commits, config.readers
    );
    println!(
        "  {:<22} {:>8} {:>12} {:>8} {:>14} {:>9} {:>12}",
        "way", "steps", "zapped pages", "retries", "spurious MMIO", "faults", "invalidated"
    );
    for (label, w) in [
        ("QEMU's calls", &soft.ways.qemu),
        ("planned batch", &soft.ways.planned),
        ("native primitives", &soft.ways.native),
    ] {
        println!(
            "  {:<22} {:>8} {:>12} {:>8} {:>14} {:>9} {:>12}",
            label, w.steps, w.zapped_pages, w.retries, w.spurious_mmio, w.faults, w.invalidated
        );
    }
    if args.json {
        json_line(&soft)?;
    }
    Ok(exit_status(&soft.report, strategy))
}
