//! Traces streamed commit by commit: the windowed planning of `PlannedCommits` makes exactly the
//! whole-map planner's plans (committed traces, random traces at a small slot limit), the
//! generated traces are what they say, and a soft replay of a long, wide trace keeps no map per
//! commit.

use memslots::model::{Layout, Limits};
use memslots::planner::{plan_with, CutPolicy, Plan};
use memslots_testkit::conformance::{run_trace, SplitMix64};
use memslots_testkit::replay::{calls_of, qemu_commits, PlannedCommits};
use memslots_testkit::samples::SyntheticTrace;
use memslots_testkit::soft::replay::{replay as soft_replay, SoftReplayConfig};
use memslots_testkit::strategy::Strategy;
use memslots_testkit::stress::PeakRss;
use memslots_testkit::trace::Trace;

mod support;

/// Every commit planned from the whole map, as before streaming: the plans up to the first
/// error, and that error's text.
fn whole_map_plans(
    trace: &Trace,
    limits: Limits,
    policy: &CutPolicy,
) -> (Vec<Plan>, Option<String>) {
    let commits = match qemu_commits(trace, limits) {
        Ok(c) => c,
        Err(e) => return (Vec::new(), Some(e.to_string())),
    };
    let mut layout = Layout::new(limits);
    let mut plans = Vec::new();
    for c in commits {
        match plan_with(&layout, &c.target, policy) {
            Ok(p) => {
                layout.apply_batch(&p.slot_calls()).expect("a plan applies");
                plans.push(p);
            }
            Err(e) => return (plans, Some(e.to_string())),
        }
    }
    (plans, None)
}

/// The streamed plans, and the first error's cause (what `whole_map_plans` reports).
fn streamed_plans(
    trace: &Trace,
    limits: Limits,
    policy: &CutPolicy,
) -> (Vec<Plan>, Option<String>) {
    let mut plans = Vec::new();
    for c in PlannedCommits::new(calls_of(trace), limits, policy) {
        match c {
            Ok(c) => plans.push(c.plan),
            Err(e) => {
                let cause = std::error::Error::source(&e).map_or(e.to_string(), |s| s.to_string());
                return (plans, Some(cause));
            }
        }
    }
    (plans, None)
}

fn assert_same_plans(name: &str, trace: &Trace, limits: Limits, policy: &CutPolicy) {
    let (whole, whole_err) = whole_map_plans(trace, limits, policy);
    let (streamed, streamed_err) = streamed_plans(trace, limits, policy);
    for (i, (w, s)) in whole.iter().zip(&streamed).enumerate() {
        assert_eq!(w, s, "{name}: commit {i} planned differently");
    }
    assert_eq!(
        whole.len(),
        streamed.len(),
        "{name}: {whole_err:?} / {streamed_err:?}"
    );
    assert_eq!(whole_err, streamed_err, "{name}");
}

#[test]
fn windowed_plans_are_the_whole_map_plans_on_committed_traces() {
    let all: Vec<_> = support::traces()
        .into_iter()
        .chain(support::smm_traces())
        .chain(support::dirty_log_traces())
        .collect();
    assert!(!all.is_empty());
    for path in all {
        let trace = Trace::from_file(&path).unwrap();
        for policy in [CutPolicy::default(), CutPolicy::minimal()] {
            assert_same_plans(
                &path.display().to_string(),
                &trace,
                Limits::default(),
                &policy,
            );
        }
    }
}

/// A random QEMU-like trace over a small guest: each commit deletes a few slots, then creates a
/// few (at random places, continuing a neighbour's host memory so regions join, or re-using a
/// deleted slot's host memory elsewhere so the planner moves), and toggles dirty logging on some;
/// calls the model refuses are kept with its errno, as QEMU records them.
fn random_trace(seed: u64, commits: usize, limits: Limits) -> Trace {
    const HOST: u64 = 0x7f00_0000_0000;
    let mut rng = SplitMix64::new(seed);
    let mut qemu = Layout::new(limits);
    let mut text = String::new();
    let mut emit = |qemu: &mut Layout, line: String| {
        let call = Trace::parse(&format!("{line} ret=0")).unwrap().calls[0].call;
        let ret = match qemu.apply(&call) {
            Ok(_) => 0,
            Err(rule) => -rule.errno(),
        };
        text += &format!("{line} ret={ret}\n");
    };
    let line = |space: u16, id: u16, flags: u32, gpa: u64, size: u64, host: u64| {
        format!(
            "kvm_set_user_memory AddrSpace#{space} Slot#{id} flags={flags:#x} gpa={gpa:#x} \
             size={size:#x} ua={host:#x}"
        )
    };
    for _ in 0..commits {
        let slots: Vec<_> = qemu.slots().copied().collect();
        let mut freed_hosts = Vec::new();
        for _ in 0..rng.below(4) {
            if slots.is_empty() {
                break;
            }
            let s = slots[rng.below(slots.len() as u64) as usize];
            if qemu.slot(s.id).is_some() {
                freed_hosts.push((s.host, s.size, s.flags.0));
                emit(
                    &mut qemu,
                    line(s.id.address_space, s.id.id, 0, s.gpa, 0, s.host),
                );
            }
        }
        for _ in 0..1 + rng.below(4) {
            let space = u16::from(rng.below(8) == 0);
            let Some(id) = qemu.free_id(space, &[]) else {
                continue;
            };
            // Mostly small; some long enough to cross the PC boundaries and be cut at 2 MiB.
            let pages = if rng.below(4) == 0 {
                1 + rng.below(3072)
            } else {
                1 + rng.below(16)
            };
            let mut gpa = rng.below(8192) * 0x1000;
            let mut flags = [0, 0, 1, 2][rng.below(4) as usize];
            let host = match rng.below(3) {
                // Host memory is GPA-linear: neighbours continue each other.
                0 => HOST + gpa,
                1 if !freed_hosts.is_empty() => {
                    // A deleted slot's memory again, elsewhere: a move.
                    let (host, size, old_flags) =
                        freed_hosts[rng.below(freed_hosts.len() as u64) as usize];
                    flags = old_flags & 2;
                    if rng.below(2) == 0 {
                        flags |= 1;
                    }
                    emit(&mut qemu, line(space, id, flags, gpa, size, host));
                    continue;
                }
                _ => HOST + 0x1000_0000 + rng.below(4096) * 0x1000,
            };
            if rng.below(6) == 0 {
                // Continue an existing slot exactly.
                if let Some(s) = slots.get(rng.below(slots.len().max(1) as u64) as usize) {
                    gpa = s.end();
                    emit(
                        &mut qemu,
                        line(space, id, s.flags.0, gpa, pages * 0x1000, s.host + s.size),
                    );
                    continue;
                }
            }
            emit(&mut qemu, line(space, id, flags, gpa, pages * 0x1000, host));
        }
        // Dirty logging toggled in place (a flags-only call).
        if rng.below(3) == 0 {
            let slots: Vec<_> = qemu.slots().copied().collect();
            if let Some(s) = slots.get(rng.below(slots.len().max(1) as u64) as usize) {
                let flags = s.flags.0 ^ 1;
                emit(
                    &mut qemu,
                    line(s.id.address_space, s.id.id, flags, s.gpa, s.size, s.host),
                );
            }
        }
    }
    Trace::parse(&text).unwrap()
}

#[test]
fn windowed_plans_are_the_whole_map_plans_on_random_traces() {
    // A small slot limit and headroom, so commits reach the budget (whole-map fallback), re-use
    // deleted ids and run out of ids (the same error both ways).
    let limits = Limits {
        slots: 24,
        ..Limits::default()
    };
    let tight = CutPolicy {
        headroom: 4,
        ..CutPolicy::x86_pc()
    };
    let mut refused = 0;
    let mut errors = 0;
    for seed in 0..40 {
        let trace = random_trace(seed, 150, limits);
        refused += trace.calls.iter().filter(|c| !c.accepted()).count();
        for policy in [CutPolicy::default(), CutPolicy::minimal(), tight.clone()] {
            assert_same_plans(&format!("seed {seed}"), &trace, limits, &policy);
            errors += usize::from(whole_map_plans(&trace, limits, &policy).1.is_some());
        }
        // At the kernel's own limit nothing runs out.
        assert_same_plans(
            &format!("seed {seed}"),
            &trace,
            Limits::default(),
            &CutPolicy::default(),
        );
    }
    assert!(refused > 0, "no refused call exercised");
    assert!(errors > 0, "no commit ran out of slot ids");
}

#[test]
fn synthetic_traces_are_valid_and_as_long_as_they_say() {
    for (commits, slots) in [(1, 3), (400, 50), (1_001, 1_000)] {
        let spec = SyntheticTrace {
            commits,
            slots,
            seed: 7,
        };
        let text = spec.text();
        assert_eq!(text, spec.text(), "deterministic");
        let trace = Trace::parse(&text).unwrap();
        assert_eq!(trace.calls.len(), spec.calls());
        assert_eq!(trace.commits().len(), commits);
        let report = run_trace(&trace, Limits::default());
        assert_eq!((report.mismatches, report.rejected), (0, 0));
        let (plans, err) = streamed_plans(&trace, Limits::default(), &CutPolicy::default());
        assert_eq!((plans.len(), err), (commits, None));
    }
    assert_ne!(
        SyntheticTrace {
            commits: 50,
            slots: 9,
            seed: 1
        }
        .text(),
        SyntheticTrace {
            commits: 50,
            slots: 9,
            seed: 2
        }
        .text()
    );
}

/// The soft replay of a trace of 1,000 commits over 1,000 slots. When every commit's map was
/// rebuilt up front and kept for the whole replay (1,000 maps of 1,000 regions), the peak
/// resident memory grew by 33,548 KiB in this test; streamed, by about 2,000 KiB.
#[test]
fn soft_replay_of_a_long_wide_trace_keeps_no_map_per_commit() {
    let trace = Trace::parse(
        &SyntheticTrace {
            commits: 1_000,
            slots: 1_000,
            seed: 3,
        }
        .text(),
    )
    .unwrap();
    let config = SoftReplayConfig {
        strategy: Strategy::Atomic,
        // No reader threads and a few pages: the run is about the commits (the figure is
        // memory), and stays short in a debug build.
        readers: 0,
        prefault_pages: 16,
    };
    let rss = PeakRss::start();
    let report = soft_replay(&trace, "synthetic", &config, |_, _| {}).expect("replays");
    let growth = rss.growth_kib();
    eprintln!(
        "soft replay, 1,000 commits over 1,000 slots: peak RSS growth {growth} KiB (reset: {})",
        rss.was_reset()
    );
    assert_eq!(report.report.updates, 1_000);
    assert_eq!(report.report.layout_matches, Some(true));
    assert!(growth < 12 * 1024, "peak RSS grew {growth} KiB");
}

/// Probed bytes per commit of a soft replay, the first commit (which creates every slot) left
/// out: `commits` commits over `slots` slots, minus one commit over the same slots.
fn probed_bytes_per_later_commit(commits: usize, slots: u16) -> u64 {
    let config = SoftReplayConfig {
        strategy: Strategy::Naive,
        readers: 0,
        // No cap: every page of what a commit probes is probed.
        prefault_pages: 1 << 30,
    };
    let probed = |commits| {
        let spec = SyntheticTrace {
            commits,
            slots,
            seed: 5,
        };
        let trace = Trace::parse(&spec.text()).unwrap();
        let r = soft_replay(&trace, "synthetic", &config, |_, _| {}).expect("replays");
        assert_eq!(r.report.layout_matches, Some(true));
        r.report
            .probed_bytes
            .expect("soft replay reports probed_bytes")
    };
    (probed(commits) - probed(1)) / (commits as u64 - 1)
}

/// Each commit of a soft replay is run, probed and checked over its window (what it changed and
/// the slots and regions reaching into that), not over the layout: the per-commit work does not
/// grow with the slots. Probing every slot's pages each commit, as the replay did when each commit
/// ran on fresh memories built from the whole layout, probes 2 x 400 x 1 MiB per commit here.
#[test]
fn soft_replay_probes_each_commit_s_window_not_the_layout() {
    let narrow = probed_bytes_per_later_commit(61, 20);
    let wide = probed_bytes_per_later_commit(61, 400);
    eprintln!("probed per commit: {narrow} bytes over 20 slots, {wide} over 400");
    assert!(narrow > 0 && wide > 0, "no page probed");
    // A commit re-slots one 1 MiB slot in its 2 MiB cell; its window is that cell, grown only
    // where neighbouring slots continue each other.
    for per_commit in [narrow, wide] {
        assert!(
            per_commit <= 8 << 20,
            "{per_commit} bytes probed per commit"
        );
    }
}

/// The soft replay's readers probe inside every hole QEMU's calls open: on each committed trace
/// whose calls open one, some probed page is in it, and made naively the calls show spurious
/// MMIO there (the readers make a whole pass between two calls, so this does not depend on the
/// scheduling); the planned batches show none.
#[test]
fn soft_replay_naive_shows_the_holes_of_every_committed_trace() {
    let config = |strategy| SoftReplayConfig {
        strategy,
        readers: 1,
        prefault_pages: 1 << 10,
    };
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/traces");
    let mut with_holes = 0;
    for sub in ["", "smm", "dirty-log"] {
        for path in Trace::files_in(&dir.join(sub)).unwrap() {
            let trace = Trace::from_file(&path).unwrap();
            let r =
                soft_replay(&trace, "trace", &config(Strategy::Naive), |_, _| {}).expect("replays");
            let (probed, holes, in_holes) = (
                r.report.probed_bytes.unwrap(),
                r.report.hole_bytes.unwrap(),
                r.report.hole_bytes_probed.unwrap(),
            );
            eprintln!(
                "{}: probed {probed}, holes {holes}, in holes {in_holes}, naive spurious {}",
                path.display(),
                r.report.spurious_exits
            );
            assert!(in_holes <= probed.min(holes));
            if holes > 0 {
                with_holes += 1;
                assert!(in_holes > 0, "{}: no probe in a hole", path.display());
                assert!(
                    r.report.spurious_exits > 0,
                    "{}: naive showed no spurious MMIO",
                    path.display()
                );
            }
            let atomic = soft_replay(&trace, "trace", &config(Strategy::Atomic), |_, _| {})
                .expect("replays");
            assert_eq!(atomic.report.spurious_exits, 0, "{}", path.display());
            assert_eq!(atomic.spurious.planned, 0, "{}", path.display());
        }
    }
    assert!(with_holes >= 2, "only {with_holes} traces open a hole");
}
