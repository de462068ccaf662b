//! Every committed QEMU trace replays on a running guest: clean with the planner's batches, and
//! ending each commit in the trace's mapping; QEMU's own calls, made naively, show the holes.

use memslots::kvm::Strategy;
use memslots::stress::{replay, ReplayConfig, Trigger};
use memslots::trace::Trace;

mod support;
use support::{kvm_or_skip, traces};

fn config(strategy: Strategy) -> ReplayConfig {
    ReplayConfig {
        strategy,
        trigger: Trigger::Guest,
        vcpus: 2,
        loops: 2,
        seed: 1,
        inject_faults: None,
    }
}

#[test]
fn every_trace_replays_clean_with_atomic() {
    if !kvm_or_skip() {
        return;
    }
    let all = traces();
    assert!(all.len() >= 8);
    for path in all {
        let trace = Trace::from_file(&path).expect("trace");
        let name = path.display().to_string();
        let r = replay(&trace, &name, &config(Strategy::Atomic), |_, _| {}).expect("replay");
        assert!(r.updates > 0 && r.guest_accesses > 0, "{name}: {r:?}");
        assert_eq!(r.layout_matches, Some(true), "{name}");
        assert!(r.clean(), "{name}: {r:?}");
    }
}

#[test]
fn qemus_calls_made_naively_show_holes() {
    if !kvm_or_skip() {
        return;
    }
    let trace = Trace::from_file(&support::trace("pc-512m-std.log")).expect("trace");
    let mut cfg = config(Strategy::Naive);
    cfg.loops = 10;
    let r = replay(&trace, "pc-512m-std", &cfg, |_, _| {}).expect("replay");
    assert_eq!(r.layout_matches, Some(true));
    assert!(r.spurious_exits > 0, "{r:?}");
}

#[test]
fn injected_faults_roll_back_and_the_replay_goes_on() {
    if !kvm_or_skip() {
        return;
    }
    let trace = Trace::from_file(&support::trace("q35-2g-std.log")).expect("trace");
    let mut cfg = config(Strategy::Atomic);
    cfg.inject_faults = Some(0.1);
    cfg.loops = 4;
    let r = replay(&trace, "q35-2g-std", &cfg, |_, _| {}).expect("replay");
    assert!(r.rollbacks > 0);
    assert_eq!(r.layout_matches, Some(true));
    assert!(r.clean(), "{r:?}");
}
