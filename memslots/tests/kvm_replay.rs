//! Every committed QEMU trace replays on a running guest: clean with the planner's batches, and
//! ending each commit in the trace's mapping; QEMU's own calls, made naively, show the holes.

use std::path::PathBuf;

use memslots::kvm::Strategy;
use memslots::stress::{replay, ReplayConfig};
use memslots::trace::Trace;

fn kvm_or_skip() -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            eprintln!("SKIPPED: /dev/kvm cannot be opened ({e}); this KVM test did not run");
            false
        }
    }
}

fn traces() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/data/traces");
    let mut out: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("traces")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    out.sort();
    out
}

fn config(strategy: Strategy) -> ReplayConfig {
    ReplayConfig {
        strategy,
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
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/data/traces/pc-512m-std.log");
    let trace = Trace::from_file(&path).expect("trace");
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
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/data/traces/q35-2g-std.log");
    let trace = Trace::from_file(&path).expect("trace");
    let mut cfg = config(Strategy::Atomic);
    cfg.inject_faults = Some(0.1);
    cfg.loops = 4;
    let r = replay(&trace, "q35-2g-std", &cfg, |_, _| {}).expect("replay");
    assert!(r.rollbacks > 0);
    assert_eq!(r.layout_matches, Some(true));
    assert!(r.clean(), "{r:?}");
}
