//! `memslots conformance`: the model against the live kernel, or against a QEMU trace.

use std::error::Error;
use std::path::PathBuf;
use std::process::ExitCode;

use memslots::model::Limits;
use memslots_testkit::conformance::{run_random, run_trace_calls, RandomRun, Report};
use memslots_testkit::trace::TraceReader;

use crate::output::json_line;

/// Arguments of `memslots conformance`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Number of random slot calls sent to a fresh VM and to the model.
    #[arg(long, default_value_t = 20_000, conflicts_with = "trace")]
    ops: u64,
    /// Seed of the random calls (default: from the clock; printed either way).
    #[arg(long, conflicts_with = "trace")]
    seed: Option<u64>,
    /// Predict the calls of a QEMU trace instead (no KVM needed).
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,
    /// With --trace: the kernel the trace is judged against, `host` (limits read from /dev/kvm:
    /// for calls recorded on this machine) or `x86-64` (x86-64's defaults: two address spaces,
    /// 32,764 slots, 52-bit guest frames).
    #[arg(long, value_enum, requires = "trace")]
    limits: Option<LimitsArg>,
    /// Print the report as JSON on the last line of stdout.
    #[arg(long)]
    json: bool,
}

/// `--limits`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum LimitsArg {
    /// Read from this machine's `/dev/kvm`.
    Host,
    /// x86-64's defaults.
    X86_64,
}

/// The limits a trace is judged against.
fn limits(arg: Option<LimitsArg>) -> Result<Limits, Box<dyn Error>> {
    match arg.unwrap_or(LimitsArg::X86_64) {
        LimitsArg::X86_64 => Ok(Limits::default()),
        LimitsArg::Host => memslots::kvm::Vm::new()
            .map(|vm| *vm.limits())
            .map_err(|e| {
                format!(
                    "{}; --limits host reads them from /dev/kvm (--limits x86-64 does not)",
                    crate::output::chain(&e)
                )
                .into()
            }),
    }
}

/// Runs the subcommand.
pub fn run(args: Args) -> Result<ExitCode, Box<dyn Error>> {
    let report = match &args.trace {
        Some(path) => {
            // Streamed: the trace is read as it is judged.
            let report = run_trace_calls(TraceReader::open(path)?, limits(args.limits)?)?;
            println!(
                "trace {}: {} calls, model predicted every result: {}",
                path.display(),
                report.calls,
                report.mismatches == 0
            );
            report
        }
        None => {
            let seed = args.seed.unwrap_or_else(clock_seed);
            println!("conformance: {} random calls, seed {seed}", args.ops);
            match run_random(RandomRun::new(args.ops, seed)) {
                Ok(report) => report,
                Err(err) => {
                    return Err(format!(
                        "{}; conformance needs /dev/kvm (the --trace form does not)",
                        crate::output::chain(&err)
                    )
                    .into())
                }
            }
        }
    };
    print_summary(&report);
    if args.json {
        json_line(&report)?;
    }
    Ok(if report.mismatches == 0 && !report.diverged {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn print_summary(r: &Report) {
    println!(
        "calls {}  accepted {}  rejected {}  mismatches {}",
        r.calls, r.accepted, r.rejected, r.mismatches
    );
    println!(
        "KVM_SET_USER_MEMORY_REGION2 calls {}  guest_memfd calls {} ({} slots created)",
        r.v2_calls, r.guest_memfd_calls, r.guest_memfd_slots
    );
    if let Some(why) = &r.guest_memfd_unavailable {
        println!("no guest_memfd slot was bound: {why}");
    }
    if r.at_max_gfn.0 > 0 {
        println!(
            "calls at the maximum guest frame: {} ({} accepted)",
            r.at_max_gfn.0, r.at_max_gfn.1
        );
    }
    if !r.refused_by_rule.is_empty() {
        let rules: Vec<String> = r
            .refused_by_rule
            .iter()
            .map(|(rule, n)| format!("{rule} {n}"))
            .collect();
        println!("refused by the model, per rule: {}", rules.join(", "));
    }
    if r.diverged {
        println!("stopped early: the kernel accepted a call the model refuses");
    }
    if let Some(m) = &r.first_mismatch {
        println!(
            "first mismatch at call {} ({}): {}",
            m.index, m.what, m.call
        );
        println!("  model:  {:?}", m.model);
        println!("  kernel: {:?}", m.kernel);
        if let Some(line) = m.line {
            println!("  trace line {line}");
        }
        for slot in &m.layout {
            println!(
                "  slot {} gpa={:#x} size={:#x} ua={:#x} flags={:?}",
                slot.id, slot.gpa, slot.size, slot.host, slot.flags
            );
        }
    }
}

fn clock_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}
