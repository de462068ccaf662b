//! `memslots boot`: Debian's SeaBIOS booted on the test kit's i440fx VMM, its PAM writes applied
//! by memslots on the vCPU thread that handled them; each boot until "No bootable device".

use std::error::Error;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::ValueEnum;
use memslots_testkit::boot::compare::{qemu_final_map, QemuBoot};
use memslots_testkit::boot::{self, BootConfig, BootReport, DEFAULT_BIOS};
use memslots_testkit::stats::{Micros, Samples};
use memslots_testkit::trace::Trace;
use serde::Serialize;

use crate::output::{json_line, Progress};
use crate::stress::StrategyArg;

/// The committed QEMU 7.2 trace of the same boot (`tests/data/traces/boot/`).
const QEMU_TRACE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/data/traces/boot/seabios-pc-smp4-m512.log"
);

/// `--hlt-exits`.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum OnOff {
    /// `hlt` exits to KVM, which blocks the vCPU thread until an interrupt.
    On,
    /// `KVM_CAP_X86_DISABLE_EXITS` (HLT): a halted vCPU stays in guest mode, like QEMU's
    /// `-overcommit cpu-pm=on`.
    Off,
}

/// Arguments of `memslots boot`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The BIOS image (Debian's `seabios` package installs the default).
    #[arg(long, default_value = DEFAULT_BIOS)]
    bios: PathBuf,
    /// vCPUs.
    #[arg(long, default_value_t = 4)]
    vcpus: usize,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 512)]
    memory: u64,
    /// Boots, each on a fresh VM.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    boots: u64,
    /// How the firmware's PAM changes are applied.
    #[arg(long, value_enum, default_value_t = StrategyArg::Atomic)]
    strategy: StrategyArg,
    /// Whether `hlt` exits (off: halted vCPUs stay in guest mode).
    #[arg(long, value_enum, default_value_t = OnOff::On)]
    hlt_exits: OnOff,
    /// Write the first boot's slot calls here, in QEMU 7.2's trace format.
    #[arg(long, value_name = "FILE")]
    trace_out: Option<PathBuf>,
    /// Write the first boot's SeaBIOS debug-port output (port 0x402) here.
    #[arg(long, value_name = "FILE")]
    debug_out: Option<PathBuf>,
    /// QEMU's trace of the same boot, whose final mapping each boot's is held against.
    #[arg(long, value_name = "FILE", default_value = QEMU_TRACE)]
    qemu_trace: PathBuf,
    /// Seconds a boot may take to reach "No bootable device".
    #[arg(long, value_name = "SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    time_limit: u64,
    /// Print the summary as JSON on the last line of stdout.
    #[arg(long)]
    json: bool,
}

/// `boot_ms`.
#[derive(Serialize, Debug)]
struct BootMs {
    p50: f64,
    max: f64,
}

/// The JSON line: totals over every boot, unless the name says otherwise.
#[derive(Serialize, Debug)]
struct Summary {
    bios: String,
    vcpus: usize,
    memory_mib: u64,
    strategy: &'static str,
    boots: u64,
    /// Boots that were ok.
    ok: u64,
    /// The fewest CPUs a boot found (0 when one found none).
    cpus_found_min: u32,
    pam_writes: u64,
    commits: u64,
    ioctls: u64,
    quiesced_ioctls: u64,
    /// Per commit, over every boot.
    blackout_us: Micros,
    internal_errors: u64,
    boot_ms: BootMs,
    /// Whether every boot's mapping after POST is QEMU's (named differences excluded); null when
    /// there is no QEMU trace of a boot with this RAM and BIOS size.
    final_map_matches_qemu: Option<bool>,
}

/// QEMU's boot from `path`; `None` (with a note) when the default trace is not there.
fn qemu_reference(path: &Path) -> Result<Option<QemuBoot>, Box<dyn Error>> {
    if path == Path::new(QEMU_TRACE) && !path.exists() {
        eprintln!(
            "note: {} is missing: final_map_matches_qemu is null",
            path.display()
        );
        return Ok(None);
    }
    let trace = Trace::from_file(path)?;
    Ok(Some(
        qemu_final_map(&trace).map_err(|e| format!("{}: {e}", path.display()))?,
    ))
}

fn print_boot(k: u64, boots: u64, vcpus: usize, r: &BootReport) {
    let blackouts: Vec<String> = r
        .commits
        .iter()
        .map(|c| format!("{:.0}", c.blackout.as_secs_f64() * 1e6))
        .collect();
    let parked: Vec<String> = r
        .commits
        .iter()
        .map(|c| format!("{:.0}", c.kick_to_parked.as_secs_f64() * 1e6))
        .collect();
    let threads: Vec<String> = r
        .commits
        .iter()
        .map(|c| format!("vCPU {} (tid {})", c.vcpu, c.tid))
        .collect();
    let quiesced: u64 = r.commits.iter().map(|c| c.quiesced_ioctls).sum();
    println!(
        "boot {k}/{boots}: {} | end of POST {} | CPUs found {} | PAM writes {} | commits {} | \
         slot ioctls {} ({} at reset) | quiesced {} | blackout per commit (us) [{}] | internal \
         errors {} | unexpected exits {} (spurious {}) | ROM writes {} | {} ms",
        if r.ok(vcpus) { "ok" } else { "FAILED" },
        if r.end_of_post { "yes" } else { "no" },
        r.cpus_found.map_or("none".into(), |n| n.to_string()),
        r.pam_writes,
        r.commits.len(),
        r.ioctls,
        r.init_ioctls,
        quiesced,
        blackouts.join(", "),
        r.internal_errors,
        r.unexpected_exits,
        r.spurious_exits,
        r.rom_writes,
        r.boot_time.as_millis(),
    );
    let cpu: Vec<String> = r
        .vcpu_cpu_time
        .iter()
        .map(|t| t.as_millis().to_string())
        .collect();
    println!(
        "  of the blackouts, kick to all parked (us): [{}]; vCPU threads' CPU time (ms): [{}]",
        parked.join(", "),
        cpu.join(", ")
    );
    println!(
        "  commits applied on: {}{}",
        if threads.is_empty() {
            "none".to_owned()
        } else {
            threads.join(", ")
        },
        if r.commits_on_vcpu_threads() {
            ""
        } else {
            "  (NOT all on vCPU threads)"
        }
    );
    for p in &r.problems {
        println!("  problem: {p}");
    }
}

/// Runs the subcommand.
pub fn run(args: Args) -> Result<ExitCode, Box<dyn Error>> {
    let cfg = BootConfig {
        bios: args.bios.clone(),
        vcpus: args.vcpus,
        memory_mib: args.memory,
        strategy: args.strategy.into(),
        hlt_exits: args.hlt_exits == OnOff::On,
        time_limit: Duration::from_secs(args.time_limit),
    };
    boot::check(&cfg)?;
    let image = boot::read_bios(&cfg.bios)?;
    let qemu = qemu_reference(&args.qemu_trace)?;
    let ram = cfg.memory_mib << 20;
    let bar = Progress::new(
        Some(args.boots),
        format!("SeaBIOS x{} / {}", cfg.vcpus, cfg.strategy.name()),
    );
    let mut blackout = Samples::new();
    let mut boot_ms = Vec::new();
    let mut summary = Summary {
        bios: cfg.bios.display().to_string(),
        vcpus: cfg.vcpus,
        memory_mib: cfg.memory_mib,
        strategy: cfg.strategy.name(),
        boots: args.boots,
        ok: 0,
        cpus_found_min: u32::MAX,
        pam_writes: 0,
        commits: 0,
        ioctls: 0,
        quiesced_ioctls: 0,
        blackout_us: Micros::default(),
        internal_errors: 0,
        boot_ms: BootMs { p50: 0.0, max: 0.0 },
        final_map_matches_qemu: qemu.as_ref().map(|_| true),
    };
    let mut named_shown = false;
    for k in 1..=args.boots {
        let r = boot::boot(&cfg, &image)?;
        bar.set(k, None);
        if k == 1 {
            if let Some(path) = &args.trace_out {
                std::fs::write(path, r.trace())
                    .map_err(|e| format!("writing {}: {e}", path.display()))?;
            }
            if let Some(path) = &args.debug_out {
                std::fs::write(path, &r.debug_log)
                    .map_err(|e| format!("writing {}: {e}", path.display()))?;
            }
        }
        print_boot(k, args.boots, cfg.vcpus, &r);
        summary.ok += u64::from(r.ok(cfg.vcpus));
        summary.cpus_found_min = summary.cpus_found_min.min(r.cpus_found.unwrap_or(0));
        summary.pam_writes += r.pam_writes;
        summary.commits += r.commits.len() as u64;
        summary.ioctls += r.ioctls;
        summary.internal_errors += r.internal_errors;
        for c in &r.commits {
            summary.quiesced_ioctls += c.quiesced_ioctls;
            blackout.push(c.blackout.as_secs_f64() * 1e6);
        }
        boot_ms.push(r.boot_time.as_secs_f64() * 1e3);
        if let Some(q) = &qemu {
            match r.compare_with(q, ram, image.len() as u64) {
                None => {
                    if summary.final_map_matches_qemu.take().is_some() {
                        eprintln!(
                            "note: {} is a boot with {} MiB of RAM and a {} KiB BIOS, not this \
                             one's: final_map_matches_qemu is null",
                            args.qemu_trace.display(),
                            q.ram >> 20,
                            q.bios >> 10
                        );
                    }
                }
                Some(c) => {
                    for d in &c.differences {
                        let named = d.kind == boot::compare::Kind::Mode1ReadOnly;
                        if !named || !named_shown {
                            println!("  final map vs QEMU: {d}");
                        }
                    }
                    named_shown |= c.named_bytes() > 0;
                    if let Some(m) = summary.final_map_matches_qemu.as_mut() {
                        *m &= c.matches();
                    }
                }
            }
        }
    }
    bar.finish();
    if summary.cpus_found_min == u32::MAX {
        summary.cpus_found_min = 0;
    }
    summary.blackout_us = blackout.micros(true);
    boot_ms.sort_by(f64::total_cmp);
    summary.boot_ms = BootMs {
        p50: boot_ms[(boot_ms.len() - 1) / 2],
        max: boot_ms[boot_ms.len() - 1],
    };
    println!(
        "{} of {} boots ok; {} vCPUs, {} MiB, strategy {}; final map {}",
        summary.ok,
        summary.boots,
        summary.vcpus,
        summary.memory_mib,
        summary.strategy,
        match summary.final_map_matches_qemu {
            Some(true) => "matches QEMU's",
            Some(false) => "DOES NOT match QEMU's",
            None => "not compared",
        }
    );
    if args.json {
        json_line(&summary)?;
    }
    Ok(if summary.ok == summary.boots {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
