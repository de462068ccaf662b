//! `memslots stress`: the main job. A workload's layout changes applied to a running test guest,
//! every detector counting.

use std::error::Error;
use std::process::ExitCode;
use std::time::Duration;

use clap::ValueEnum;
use memslots_testkit::strategy::Strategy;
use memslots_testkit::stress::{run, StressConfig, StressReport, Trigger};
use memslots_testkit::workload::WorkloadKind;

use crate::output::{json_line, Progress};

/// `--strategy`.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum StrategyArg {
    /// Hold vCPUs out only for the calls that open a hole; carry dirty bits exactly.
    Atomic,
    /// QEMU 8.0's rule.
    Qemu,
    /// Calls in order, nobody held out: shows the bug.
    Naive,
}

impl From<StrategyArg> for Strategy {
    fn from(s: StrategyArg) -> Self {
        match s {
            StrategyArg::Atomic => Strategy::Atomic,
            StrategyArg::Qemu => Strategy::Qemu,
            StrategyArg::Naive => Strategy::Naive,
        }
    }
}

/// `--workload`.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum WorkloadArg {
    /// A RAM region grows and shrinks.
    Resize,
    /// Firmware shadowing: ROM overlay split, flipped and merged; code runs from it.
    Pam,
    /// A BAR moving between two GPAs.
    Bar,
    /// Dirty logging toggled while regions are resized and split.
    Dirty,
    /// All of the above interleaved.
    Mixed,
}

impl From<WorkloadArg> for WorkloadKind {
    fn from(w: WorkloadArg) -> Self {
        match w {
            WorkloadArg::Resize => WorkloadKind::Resize,
            WorkloadArg::Pam => WorkloadKind::Pam,
            WorkloadArg::Bar => WorkloadKind::Bar,
            WorkloadArg::Dirty => WorkloadKind::Dirty,
            WorkloadArg::Mixed => WorkloadKind::Mixed,
        }
    }
}

/// `--dirty-log`.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum DirtyLogArg {
    /// KVM's per-slot bitmaps (`KVM_GET_DIRTY_LOG`).
    Bitmap,
    /// KVM's per-vCPU dirty rings (`KVM_CAP_DIRTY_LOG_RING`), 64 KiB each.
    Ring,
}

/// The ring size for `--dirty-log` (kvm backend only).
pub fn dirty_ring(backend: BackendArg, arg: DirtyLogArg) -> Result<Option<u32>, Box<dyn Error>> {
    match (arg, backend) {
        (DirtyLogArg::Bitmap, _) => Ok(None),
        (DirtyLogArg::Ring, BackendArg::Kvm) => {
            Ok(Some(memslots_testkit::stress::DIRTY_RING_BYTES))
        }
        (DirtyLogArg::Ring, BackendArg::Soft) => {
            Err("--dirty-log ring needs --backend kvm (the soft backend has no dirty log)".into())
        }
    }
}

/// `--trigger`.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum TriggerArg {
    /// The guest on vCPU 0 asks for each change with a port write; the vCPU thread handling it
    /// plans and applies the batch while the other vCPUs run.
    Guest,
    /// A separate updater thread applies each change.
    Host,
}

/// The trigger for `backend`: the soft backend has no guest to ask, so only `host` (its default).
pub fn trigger(backend: BackendArg, arg: Option<TriggerArg>) -> Result<Trigger, Box<dyn Error>> {
    match (backend, arg) {
        (BackendArg::Soft, Some(TriggerArg::Guest)) => {
            Err("--trigger guest needs --backend kvm (the soft backend has no guest)".into())
        }
        (BackendArg::Soft, _) | (_, Some(TriggerArg::Host)) => Ok(Trigger::Host),
        (BackendArg::Kvm, _) => Ok(Trigger::Guest),
    }
}

/// `--backend`.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum BackendArg {
    /// Real `/dev/kvm`.
    Kvm,
    /// The software implementation of the proposed kernel algorithm.
    Soft,
}

/// Arguments of `memslots stress`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Where the slots live.
    #[arg(long, value_enum, default_value_t = BackendArg::Kvm)]
    backend: BackendArg,
    /// How each batch is applied.
    #[arg(long, value_enum, default_value_t = StrategyArg::Atomic)]
    strategy: StrategyArg,
    /// Who starts each change: the guest on vCPU 0 (default with --backend kvm) or a host
    /// thread (the only choice with --backend soft).
    #[arg(long, value_enum)]
    trigger: Option<TriggerArg>,
    /// Which layout changes to cycle through.
    #[arg(long, value_enum, default_value_t = WorkloadArg::Mixed)]
    workload: WorkloadArg,
    /// vCPUs running the test guest.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=7))]
    vcpus: u16,
    /// Stop after this many batches.
    #[arg(long, conflicts_with = "duration")]
    updates: Option<u64>,
    /// Stop after this many seconds (default 10 when --updates is not given).
    #[arg(long)]
    duration: Option<f64>,
    /// Seed of the workload's choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Make each slot ioctl fail with this probability (ENOMEM, EFAULT or EEXIST); every failure
    /// must roll back cleanly.
    #[arg(long, value_name = "P")]
    inject_faults: Option<f64>,
    /// How dirty pages are kept: KVM's bitmaps or its dirty ring.
    #[arg(long, value_enum, default_value_t = DirtyLogArg::Bitmap)]
    dirty_log: DirtyLogArg,
    /// Print the summary as JSON on the last line of stdout.
    #[arg(long)]
    json: bool,
}

/// The longest `--duration`: a year.
const MAX_DURATION_SECS: f64 = 365.0 * 24.0 * 3600.0;

/// Runs the subcommand.
pub fn run_cli(args: Args) -> Result<ExitCode, Box<dyn Error>> {
    let inject_faults = probability(args.inject_faults)?;
    if let Some(d) = args.duration {
        // Bounded so that the deadline (now + duration) cannot overflow.
        if !(d > 0.0 && d <= MAX_DURATION_SECS) {
            return Err(format!(
                "--duration takes a positive number of seconds up to {MAX_DURATION_SECS} (a year), not {d}"
            )
            .into());
        }
    }
    let trigger = trigger(args.backend, args.trigger)?;
    let dirty_ring = dirty_ring(args.backend, args.dirty_log)?;
    if args.backend == BackendArg::Kvm {
        require_kvm()?;
    }
    let duration = match (args.updates, args.duration) {
        (None, None) => Some(Duration::from_secs(10)),
        (_, d) => d.map(Duration::from_secs_f64),
    };
    let config = StressConfig {
        strategy: args.strategy.into(),
        trigger,
        workload: args.workload.into(),
        vcpus: usize::from(args.vcpus),
        updates: args.updates,
        duration,
        seed: args.seed,
        inject_faults,
        dirty_ring,
    };
    let bar = Progress::new(
        config.updates,
        format!("{} / {}", config.workload, config.strategy.name()),
    );
    let on_progress = |done, _| bar.set(done, None);
    let (report, soft) = match args.backend {
        BackendArg::Kvm => (run(&config, on_progress)?, None),
        BackendArg::Soft => {
            let soft = memslots_testkit::soft::stress::run(&config, on_progress)?;
            (soft.report.clone(), Some(soft))
        }
    };
    bar.finish();
    print_summary(&report);
    if let Some(soft) = soft {
        println!("  {:<28} {}", "SPTE faults", soft.spte.faults);
        println!("  {:<28} {}", "SPTEs zapped", soft.spte.zapped);
        println!("  {:<28} {}", "RETRYs (invalid slot)", soft.spte.retries);
        println!("  {:<28} {}", "answers not checked", soft.unchecked);
    }
    if args.json {
        json_line(&report)?;
    }
    Ok(exit_status(&report, config.strategy))
}

/// 1 when `atomic` saw a problem or (replay) left the trace's mapping; 0 otherwise: `qemu` and
/// `naive` report what they saw.
pub fn exit_status(report: &StressReport, strategy: Strategy) -> ExitCode {
    let clean = report.clean() && report.layout_matches.unwrap_or(true);
    if strategy == Strategy::Atomic && !clean {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// Checks `--inject-faults`.
pub fn probability(p: Option<f64>) -> Result<Option<f64>, Box<dyn Error>> {
    match p {
        Some(p) if !(0.0..=1.0).contains(&p) => {
            Err(format!("--inject-faults takes a probability from 0 to 1, not {p}").into())
        }
        p => Ok(p),
    }
}

/// Fails at once, saying what is missing, when `/dev/kvm` cannot be used.
pub fn require_kvm() -> Result<(), Box<dyn Error>> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop)
        .map_err(|e| {
            format!(
                "cannot open /dev/kvm ({e}): --backend kvm needs the kvm module and read/write \
                 access to /dev/kvm; try --backend soft"
            )
            .into()
        })
}

/// The human summary table.
pub fn print_summary(r: &StressReport) {
    println!(
        "{} backend, {} strategy, {} trigger, workload {}, {} vCPUs",
        r.backend, r.strategy, r.trigger, r.workload, r.vcpus
    );
    let rows: [(&str, String); 13] = [
        ("updates (batches applied)", r.updates.to_string()),
        ("slot ioctls", r.ioctls.to_string()),
        ("guest accesses", r.guest_accesses.to_string()),
        ("spurious exits", r.spurious_exits.to_string()),
        ("internal errors", r.internal_errors.to_string()),
        ("data errors", r.data_errors.to_string()),
        ("lost dirty pages", r.lost_dirty_pages.to_string()),
        ("rollbacks", r.rollbacks.to_string()),
        (
            "blackout per batch (us)",
            format!(
                "p50 {:.1}  p99 {:.1}  max {:.1}",
                r.blackout_us.p50, r.blackout_us.p99, r.blackout_us.max
            ),
        ),
        (
            "blackout total (us)",
            format!("{:.0}", r.blackout_us.total.unwrap_or(0.0)),
        ),
        (
            "update time (us)",
            format!(
                "p50 {:.1}  p99 {:.1}  max {:.1}",
                r.update_us.p50, r.update_us.p99, r.update_us.max
            ),
        ),
        (
            "peak RSS start / end (KiB)",
            format!("{} / {}", r.rss_kib_start, r.rss_kib_end),
        ),
        (
            "verdict",
            if r.clean() {
                "clean".to_owned()
            } else {
                "PROBLEMS SEEN".to_owned()
            },
        ),
    ];
    for (k, v) in rows {
        println!("  {k:<28} {v}");
    }
    if let Some(p) = &r.first_problem {
        println!("  first problem: {p}");
    }
}
