//! Blackout per batch on real KVM, and kick-to-all-parked latency.
//!
//! Blackout: three VMs run the same workload (same seed, so the same updates): `atomic` and `qemu`
//! each with 2 vCPUs running the test guest, and the *floor*, `atomic` on a VM whose vCPUs are
//! never started, so its quiesce kicks nobody and its blackout is the quiesce window's ioctls (and
//! the device-view publish) alone. Updates go to the three in turns. While one VM is measured the
//! other running VM's vCPUs are parked, so that on a 2-core machine the measured VM's vCPUs are not
//! competing with another guest's.
//!
//! Kick-to-parked: a VM with n running vCPUs is quiesced and resumed, in turns with the same
//! quiesce on a VM whose vCPUs were never started (the gate's own cost: lock, flag, no signal).

use std::error::Error;
use std::path::Path;
use std::time::Duration;

use memslots::kvm::{ApplyStats, Strategy};
use memslots::stress::{self, ReplayConfig, Step, WorkloadVm};
use memslots::workload::WorkloadKind;

use super::harness::{interleave, median, quantile, Figure};

/// Lets the guest run over the new layout before the next change (as `memslots stress` does).
const SETTLE: Duration = Duration::from_micros(200);

/// A VM set up for `kind` and its workload; vCPUs started if `run`.
struct Rig {
    vm: WorkloadVm,
}

impl Rig {
    fn new(kind: WorkloadKind, vcpus: usize, run: bool, seed: u64) -> Result<Self, Box<dyn Error>> {
        let mut vm = WorkloadVm::new(kind, vcpus, seed)?;
        if run {
            vm.start()?;
        }
        Ok(Rig { vm })
    }

    /// The workload's next update, applied with `strategy` as `memslots stress` applies it.
    fn step(&mut self, strategy: Strategy) -> Result<ApplyStats, Box<dyn Error>> {
        match self.vm.step(strategy)? {
            Step::Applied(stats) => Ok(stats),
            Step::RolledBack(_) => Err("a batch rolled back with no fault injected".into()),
        }
    }
}

fn blackout_us(s: &ApplyStats) -> Option<f64> {
    s.quiesce.map(|q| q.blackout.as_secs_f64() * 1e6)
}

/// The part of the blackout after every vCPU parked: the window's calls and the publish.
fn window_us(s: &ApplyStats) -> Option<f64> {
    s.quiesce
        .map(|q| q.blackout.saturating_sub(q.kick_to_parked).as_secs_f64() * 1e6)
}

/// The median blackout of the batches that held vCPUs out; 0 when none did.
fn held_median(xs: &mut [f64]) -> f64 {
    if xs.is_empty() {
        0.0
    } else {
        median(xs)
    }
}

/// One update on `me` with `other`'s vCPUs parked, then time for `me`'s guest to run.
fn measured(me: &mut Rig, other: &Rig, strategy: Strategy) -> Result<ApplyStats, Box<dyn Error>> {
    let parked = other.vm.vm().gate().quiesce();
    let s = me.step(strategy);
    drop(parked);
    std::thread::sleep(SETTLE);
    s
}

/// Blackout figures for the `pam`, `resize` and `bar` workloads.
pub fn workloads(quick: bool) -> Result<Vec<Figure>, Box<dyn Error>> {
    let updates = if quick { 60 } else { 1000 };
    let mut out = Vec::new();
    for kind in [WorkloadKind::Pam, WorkloadKind::Resize, WorkloadKind::Bar] {
        let seed = 7;
        let mut atomic = Rig::new(kind, 2, true, seed)?;
        let mut qemu = Rig::new(kind, 2, true, seed)?;
        let mut floor = Rig::new(kind, 2, false, seed)?;
        // Per batch, 0 for a batch that held nobody (the `blackout_us` of `memslots stress`).
        let (mut a, mut q, mut f) = (Vec::new(), Vec::new(), Vec::new());
        // Only the batches that held someone.
        let (mut ah, mut qh, mut fh) = (Vec::new(), Vec::new(), Vec::new());
        let (mut aw, mut qw) = (Vec::new(), Vec::new());
        let (mut ai, mut qi) = (Vec::new(), Vec::new());
        let (mut a_held, mut q_held) = (0u64, 0u64);
        for round in 0..updates {
            // Alternate who goes first, so neither strategy always follows the floor's step.
            let (sa, sq) = if round % 2 == 0 {
                let sa = measured(&mut atomic, &qemu, Strategy::Atomic)?;
                (sa, measured(&mut qemu, &atomic, Strategy::Qemu)?)
            } else {
                let sq = measured(&mut qemu, &atomic, Strategy::Qemu)?;
                (measured(&mut atomic, &qemu, Strategy::Atomic)?, sq)
            };
            let sf = {
                let p1 = atomic.vm.vm().gate().quiesce();
                let p2 = qemu.vm.vm().gate().quiesce();
                let s = floor.step(Strategy::Atomic)?;
                drop((p1, p2));
                s
            };
            std::thread::sleep(SETTLE);
            for (all, held, stats) in [
                (&mut a, &mut ah, &sa),
                (&mut q, &mut qh, &sq),
                (&mut f, &mut fh, &sf),
            ] {
                all.push(blackout_us(stats).unwrap_or(0.0));
                held.extend(blackout_us(stats));
            }
            ai.push(sa.quiesced_ioctls as f64);
            qi.push(sq.quiesced_ioctls as f64);
            aw.extend(window_us(&sa));
            qw.extend(window_us(&sq));
            a_held += u64::from(sa.quiesce.is_some());
            q_held += u64::from(sq.quiesce.is_some());
        }
        for (rig, what) in [(&atomic, "atomic"), (&qemu, "qemu")] {
            let g = rig.vm.vm().guest_stats();
            if g.spurious_exits + g.internal_errors + g.data_errors > 0 {
                eprintln!(
                    "note: {what} on {}: {} spurious exits, {} internal errors, {} data errors",
                    kind.name(),
                    g.spurious_exits,
                    g.internal_errors,
                    g.data_errors
                );
            }
        }
        let name = kind.name();
        let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len().max(1) as f64;
        let (a_mean, q_mean, f_mean) = (mean(&a), mean(&q), mean(&f));
        let am = held_median(&mut a);
        out.push(Figure::new(
            format!("blackout_atomic_vs_qemu_{name}"),
            "us",
            am,
            format!("blackout_qemu_{name}"),
            held_median(&mut q),
        ));
        out.push(Figure::new(
            format!("blackout_atomic_vs_floor_{name}"),
            "us",
            am,
            format!("blackout_floor_{name}"),
            held_median(&mut f),
        ));
        // The median hides the batches that held nobody: the mean per batch is the guest's total
        // freeze divided by the updates.
        out.push(Figure::new(
            format!("blackout_mean_atomic_vs_qemu_{name}"),
            "us",
            a_mean,
            format!("blackout_mean_qemu_{name}"),
            q_mean,
        ));
        out.push(Figure::new(
            format!("blackout_mean_atomic_vs_floor_{name}"),
            "us",
            a_mean,
            format!("blackout_mean_floor_{name}"),
            f_mean,
        ));
        let ahm = held_median(&mut ah);
        out.push(Figure::new(
            format!("blackout_held_atomic_vs_qemu_{name}"),
            "us",
            ahm,
            format!("blackout_held_qemu_{name}"),
            held_median(&mut qh),
        ));
        out.push(Figure::new(
            format!("blackout_held_atomic_vs_floor_{name}"),
            "us",
            ahm,
            format!("blackout_held_floor_{name}"),
            held_median(&mut fh),
        ));
        let awm = held_median(&mut aw);
        out.push(Figure::new(
            format!("blackout_after_parked_atomic_vs_qemu_{name}"),
            "us",
            awm,
            format!("blackout_after_parked_qemu_{name}"),
            held_median(&mut qw),
        ));
        // The window alone on the live VM against the same calls on the idle one: what a guest
        // that ran adds to the calls themselves.
        out.push(Figure::new(
            format!("blackout_after_parked_atomic_vs_floor_{name}"),
            "us",
            awm,
            format!("blackout_held_floor_{name}"),
            held_median(&mut fh),
        ));
        out.push(Figure::new(
            format!("quiesced_ioctls_atomic_vs_qemu_{name}"),
            "calls",
            median(&mut ai),
            format!("quiesced_ioctls_qemu_{name}"),
            median(&mut qi),
        ));
        out.push(Figure::new(
            format!("held_batches_atomic_vs_qemu_{name}"),
            "%",
            100.0 * a_held as f64 / updates as f64,
            format!("held_batches_qemu_{name}"),
            100.0 * q_held as f64 / updates as f64,
        ));
    }
    Ok(out)
}

/// Total blackout over one pass through each committed trace, `atomic` vs `qemu`, whole passes
/// in turns.
pub fn traces(quick: bool, dir: &Path) -> Result<Vec<Figure>, Box<dyn Error>> {
    let passes = if quick { 1 } else { 3 };
    let mut out = Vec::new();
    for path in super::trace_files(dir)? {
        let trace = memslots::trace::Trace::from_file(&path)?;
        let name = super::trace_name(&path);
        let config = |strategy| ReplayConfig {
            strategy,
            vcpus: 2,
            loops: 1,
            seed: 1,
            inject_faults: None,
        };
        let run = |strategy| -> f64 {
            match stress::replay(&trace, &name, &config(strategy), |_, _| {}) {
                Ok(r) => r.blackout_us.total.unwrap_or(0.0),
                Err(e) => {
                    eprintln!("note: replaying {name} ({strategy:?}): {e}");
                    f64::NAN
                }
            }
        };
        let (mut a, mut q) = interleave(passes, || run(Strategy::Atomic), || run(Strategy::Qemu));
        if a.iter().chain(&q).any(|x| x.is_nan()) {
            continue;
        }
        out.push(Figure::new(
            format!("blackout_total_atomic_vs_qemu_trace_{name}"),
            "us",
            median(&mut a),
            format!("blackout_total_qemu_trace_{name}"),
            median(&mut q),
        ));
    }
    Ok(out)
}

/// Kick-to-all-parked p50 and p99 with 1, 2 and 4 running vCPUs.
pub fn kick_to_parked(quick: bool) -> Result<Vec<Figure>, Box<dyn Error>> {
    let rounds = if quick { 300 } else { 3000 };
    let idle = Rig::new(WorkloadKind::Pam, 1, false, 1)?;
    let mut out = Vec::new();
    for n in [1usize, 2, 4] {
        let running = Rig::new(WorkloadKind::Pam, n, true, 1)?;
        let time = |rig: &Rig| {
            let t = rig.vm.vm().gate().quiesce().resume();
            std::thread::sleep(SETTLE);
            t.kick_to_parked.as_secs_f64() * 1e6
        };
        let (mut k, mut b) = interleave(rounds, || time(&running), || time(&idle));
        for (q, label) in [(0.5, "p50"), (0.99, "p99")] {
            out.push(Figure::new(
                format!("kick_park_{label}_{n}vcpu"),
                "us",
                quantile(&mut k, q),
                format!("quiesce_no_vcpu_{label}"),
                quantile(&mut b, q),
            ));
        }
    }
    Ok(out)
}
