//! Blackout per batch on real KVM, and kick-to-all-parked latency.
//!
//! Blackout: three VMs get the same updates (a workload with the same seed, or the same trace's
//! commits): `atomic` and `qemu` each with 2 vCPUs running the test guest, and the *floor*,
//! `atomic` on a VM whose vCPUs are never started, so its quiesce kicks nobody and its blackout is
//! the quiesce window's ioctls (and the device-view publish) alone. Updates go to the three in
//! turns. While one VM is measured the other running VM's vCPUs are parked, so that on a 2-core
//! machine the measured VM's vCPUs are not competing with another guest's.
//!
//! Kick-to-parked: a VM with n running vCPUs is quiesced and resumed, in turns with the same
//! quiesce on a VM whose vCPUs were never started (the gate's own cost: lock, flag, no signal).

use std::error::Error;
use std::path::Path;
use std::time::Duration;

use memslots::kvm::ApplyStats;
use memslots_testkit::strategy::Strategy;
use memslots_testkit::stress::{Step, TraceVm, Trigger, WorkloadVm};
use memslots_testkit::testvm::TestVm;
use memslots_testkit::workload::WorkloadKind;

use super::harness::{interleave, median, quantile, Figure, Mode};

/// Lets the guest run over the new layout before the next change (as `memslots stress` does).
const SETTLE: Duration = Duration::from_micros(200);

/// What a rig steps through.
/// Both boxed: a rig is made a few times, and each VM is a few hundred bytes of different size.
enum Driver {
    Workload(Box<WorkloadVm>),
    Trace(Box<TraceVm>),
}

/// A VM and the strategy its updates are applied with.
struct Rig {
    driver: Driver,
    strategy: Strategy,
    trigger: Trigger,
}

impl Rig {
    fn workload(
        kind: WorkloadKind,
        vcpus: usize,
        run: bool,
        seed: u64,
        strategy: Strategy,
    ) -> Result<Self, Box<dyn Error>> {
        let mut vm = WorkloadVm::new(kind, vcpus, seed)?;
        if run {
            vm.start()?;
        }
        Ok(Rig {
            driver: Driver::Workload(Box::new(vm)),
            strategy,
            trigger: Trigger::Host,
        })
    }

    /// A running VM whose guest on vCPU 0 asks for each change, applied on that vCPU's thread.
    fn guest(
        kind: WorkloadKind,
        vcpus: usize,
        seed: u64,
        strategy: Strategy,
    ) -> Result<Self, Box<dyn Error>> {
        let mut rig = Rig::workload(kind, vcpus, true, seed, strategy)?;
        rig.trigger = Trigger::Guest;
        Ok(rig)
    }

    fn trace(
        trace: &memslots_testkit::trace::Trace,
        run: bool,
        strategy: Strategy,
    ) -> Result<Self, Box<dyn Error>> {
        let mut vm = TraceVm::new(trace, 2, strategy)?;
        if run {
            vm.start()?;
        }
        Ok(Rig {
            driver: Driver::Trace(Box::new(vm)),
            strategy,
            trigger: Trigger::Host,
        })
    }

    fn vm(&self) -> &TestVm {
        match &self.driver {
            Driver::Workload(w) => w.vm(),
            Driver::Trace(t) => t.vm(),
        }
    }

    /// The next update, applied as `memslots stress` (or `replay`) applies it.
    fn step(&mut self) -> Result<ApplyStats, Box<dyn Error>> {
        let step = match &mut self.driver {
            Driver::Workload(w) => w.step(self.strategy, self.trigger)?,
            Driver::Trace(t) => t.step(self.trigger)?,
        };
        match step {
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

/// The median of the batches that held vCPUs out; 0 when none did.
fn held_median(xs: &mut [f64]) -> f64 {
    if xs.is_empty() {
        0.0
    } else {
        median(xs)
    }
}

/// One update on `me` with `other`'s vCPUs parked, then time for `me`'s guest to run.
fn measured(me: &mut Rig, other: &Rig) -> Result<ApplyStats, Box<dyn Error>> {
    let parked = other.vm().gate().quiesce();
    let s = me.step();
    drop(parked);
    std::thread::sleep(SETTLE);
    s
}

/// `updates` updates on each of the three rigs in turns, and the blackout figures named after
/// `name`.
fn per_batch(
    name: &str,
    updates: usize,
    mut atomic: Rig,
    mut qemu: Rig,
    mut floor: Rig,
) -> Result<Vec<Figure>, Box<dyn Error>> {
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
            let sa = measured(&mut atomic, &qemu)?;
            (sa, measured(&mut qemu, &atomic)?)
        } else {
            let sq = measured(&mut qemu, &atomic)?;
            (measured(&mut atomic, &qemu)?, sq)
        };
        let sf = {
            let p1 = atomic.vm().gate().quiesce();
            let p2 = qemu.vm().gate().quiesce();
            let s = floor.step()?;
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
        let g = rig.vm().guest_stats();
        if g.spurious_exits + g.internal_errors + g.data_errors > 0 {
            eprintln!(
                "note: {what} on {name}: {} spurious exits, {} internal errors, {} data errors",
                g.spurious_exits, g.internal_errors, g.data_errors
            );
        }
    }
    let mut out = Vec::new();
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
    let fhm = held_median(&mut fh);
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
        fhm,
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
        fhm,
    ));
    out.push(Figure::new(
        format!("quiesced_ioctls_atomic_vs_qemu_{name}"),
        "calls",
        mean(&ai),
        format!("quiesced_ioctls_qemu_{name}"),
        mean(&qi),
    ));
    out.push(Figure::new(
        format!("held_batches_atomic_vs_qemu_{name}"),
        "%",
        100.0 * a_held as f64 / updates.max(1) as f64,
        format!("held_batches_qemu_{name}"),
        100.0 * q_held as f64 / updates.max(1) as f64,
    ));
    Ok(out)
}

/// Blackout figures for the `pam`, `resize` and `bar` workloads: updates from a host thread,
/// then guest-triggered ones (applied on the thread of the vCPU that asked).
pub fn workloads(mode: Mode) -> Result<Vec<Figure>, Box<dyn Error>> {
    let updates = mode.pick(4, 60, 1000);
    let mut out = Vec::new();
    for kind in [WorkloadKind::Pam, WorkloadKind::Resize, WorkloadKind::Bar] {
        let seed = 7;
        out.extend(per_batch(
            kind.name(),
            updates,
            Rig::workload(kind, 2, true, seed, Strategy::Atomic)?,
            Rig::workload(kind, 2, true, seed, Strategy::Qemu)?,
            Rig::workload(kind, 2, false, seed, Strategy::Atomic)?,
        )?);
    }
    for kind in [WorkloadKind::Pam, WorkloadKind::Resize, WorkloadKind::Bar] {
        out.extend(guest_triggered(kind, updates)?);
    }
    Ok(out)
}

/// Guest-triggered blackout, median per batch: `atomic` against `qemu` with 2 vCPUs (in turns,
/// the other VM's vCPUs parked); and `atomic` with 1 vCPU, which kicks nobody (its only vCPU is
/// the one applying the change), against the floor (the same batches on a VM whose vCPUs never
/// started), over the batches that held anyone.
fn guest_triggered(kind: WorkloadKind, updates: usize) -> Result<Vec<Figure>, Box<dyn Error>> {
    let seed = 7;
    let mut atomic = Rig::guest(kind, 2, seed, Strategy::Atomic)?;
    let mut qemu = Rig::guest(kind, 2, seed, Strategy::Qemu)?;
    let (mut a, mut q) = (Vec::new(), Vec::new());
    for round in 0..updates {
        let (sa, sq) = if round % 2 == 0 {
            let sa = measured(&mut atomic, &qemu)?;
            (sa, measured(&mut qemu, &atomic)?)
        } else {
            let sq = measured(&mut qemu, &atomic)?;
            (measured(&mut atomic, &qemu)?, sq)
        };
        a.push(blackout_us(&sa).unwrap_or(0.0));
        q.push(blackout_us(&sq).unwrap_or(0.0));
    }
    drop((atomic, qemu));
    let mut one = Rig::guest(kind, 1, seed, Strategy::Atomic)?;
    let mut floor = Rig::workload(kind, 1, false, seed, Strategy::Atomic)?;
    let (mut o, mut f) = (Vec::new(), Vec::new());
    for round in 0..updates {
        // Alternate who goes first, as everywhere in this bench.
        let (so, sf) = if round % 2 == 0 {
            let so = settled(&mut one)?;
            (so, floor_step(&mut floor, &one)?)
        } else {
            let sf = floor_step(&mut floor, &one)?;
            (settled(&mut one)?, sf)
        };
        o.push(blackout_us(&so).unwrap_or(0.0));
        f.push(blackout_us(&sf).unwrap_or(0.0));
    }
    let name = kind.name();
    let held = |xs: &mut Vec<f64>| {
        xs.retain(|&x| x > 0.0);
        held_median(xs)
    };
    Ok(vec![
        Figure::new(
            format!("blackout_guest_atomic_vs_qemu_{name}"),
            "us",
            held_median(&mut a),
            format!("blackout_guest_qemu_{name}"),
            held_median(&mut q),
        ),
        Figure::new(
            format!("blackout_guest_1vcpu_atomic_vs_floor_{name}"),
            "us",
            held(&mut o),
            format!("blackout_held_floor_1vcpu_{name}"),
            held(&mut f),
        ),
    ])
}

/// One update, then time for the guest to run over the new layout.
fn settled(rig: &mut Rig) -> Result<ApplyStats, Box<dyn Error>> {
    let stats = rig.step()?;
    std::thread::sleep(SETTLE);
    Ok(stats)
}

/// One floor update with `running`'s vCPUs held out of the guest, as in [`per_batch`], so that
/// no other guest competes with the floor's calls.
fn floor_step(floor: &mut Rig, running: &Rig) -> Result<ApplyStats, Box<dyn Error>> {
    let parked = running.vm().gate().quiesce();
    let stats = floor.step();
    drop(parked);
    std::thread::sleep(SETTLE);
    stats
}

/// The same figures for each committed trace: its commits, forward and back to the first, on
/// the three VMs in turns (`atomic`: the planner's batch per commit; `qemu`: QEMU's own calls).
pub fn traces(mode: Mode, dir: &Path) -> Result<Vec<Figure>, Box<dyn Error>> {
    let passes = mode.pick(1, 3, 30);
    let mut out = Vec::new();
    for path in super::trace_files(dir)? {
        let trace = memslots_testkit::trace::Trace::from_file(&path)?;
        let name = format!("trace_{}", super::trace_name(&path));
        let rigs = (|| -> Result<_, Box<dyn Error>> {
            Ok((
                Rig::trace(&trace, true, Strategy::Atomic)?,
                Rig::trace(&trace, true, Strategy::Qemu)?,
                Rig::trace(&trace, false, Strategy::Atomic)?,
            ))
        })();
        let (atomic, qemu, floor) = match rigs {
            Ok(r) => r,
            Err(e) => {
                eprintln!("note: {name} left out: {e}");
                continue;
            }
        };
        let steps = match &atomic.driver {
            Driver::Trace(t) => t.steps_per_pass(),
            Driver::Workload(_) => unreachable!("a trace rig"),
        };
        out.extend(per_batch(&name, passes * steps, atomic, qemu, floor)?);
    }
    Ok(out)
}

/// Kick-to-all-parked p50 and p99 with 1, 2 and 4 running vCPUs.
pub fn kick_to_parked(mode: Mode) -> Result<Vec<Figure>, Box<dyn Error>> {
    let rounds = mode.pick(20, 300, 3000);
    let idle = Rig::workload(WorkloadKind::Pam, 1, false, 1, Strategy::Atomic)?;
    let mut out = Vec::new();
    for n in [1usize, 2, 4] {
        let running = Rig::workload(WorkloadKind::Pam, n, true, 1, Strategy::Atomic)?;
        let time = |rig: &Rig| {
            let t = rig.vm().gate().quiesce().resume();
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
