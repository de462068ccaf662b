//! `memslots replay TRACE`: a QEMU trace's commits replayed on a running test guest.

use std::error::Error;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use memslots::kvm::Strategy;
use memslots::stress::{replay, ReplayConfig};
use memslots::trace::Trace;

use crate::output::json_line;
use crate::stress::{print_summary, require_kvm, BackendArg, StrategyArg};

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
    /// Times through the trace (forward, then back to the first layout).
    #[arg(long, default_value_t = 20)]
    loops: u64,
    /// vCPUs running the test guest.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=7))]
    vcpus: u16,
    /// Seed of injected faults.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Make each slot ioctl fail with this probability; failed commits roll back and are retried.
    #[arg(long, value_name = "P")]
    inject_faults: Option<f64>,
    /// Print the summary as JSON on the last line of stdout.
    #[arg(long)]
    json: bool,
}

/// Runs the subcommand.
pub fn run_cli(args: Args) -> Result<ExitCode, Box<dyn Error>> {
    if args.backend == BackendArg::Soft {
        return Err("--backend soft is not wired to replay yet; use --backend kvm".into());
    }
    let trace = Trace::from_file(&args.trace)?;
    require_kvm()?;
    let name = args
        .trace
        .file_name()
        .map_or_else(|| "trace".into(), |n| n.to_string_lossy().into_owned());
    let config = ReplayConfig {
        strategy: args.strategy.into(),
        vcpus: usize::from(args.vcpus),
        loops: args.loops,
        seed: args.seed,
        inject_faults: crate::stress::probability(args.inject_faults)?,
    };
    let bar = std::io::stderr()
        .is_terminal()
        .then(indicatif::ProgressBar::no_length);
    let report = replay(&trace, &name, &config, |done, total| {
        if let Some(bar) = &bar {
            if let Some(t) = total {
                bar.set_length(t);
            }
            bar.set_position(done);
        }
    })?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    print_summary(&report);
    println!(
        "  {:<28} {}",
        "layout matches the trace",
        report.layout_matches.unwrap_or(false)
    );
    if args.json {
        json_line(&report)?;
    }
    let clean = report.clean() && report.layout_matches == Some(true);
    Ok(if config.strategy == Strategy::Atomic && !clean {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
