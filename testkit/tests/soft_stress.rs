//! `stress --backend soft` and `replay --backend soft` as library calls: reader threads standing
//! in for vCPUs check every answer against the layouts before and after the batch in flight.

use std::path::PathBuf;
use std::time::Duration;

use memslots_testkit::soft::replay::{replay, SoftReplayConfig};
use memslots_testkit::soft::stress::{run, SoftStressError, SoftStressReport};
use memslots_testkit::strategy::Strategy;
use memslots_testkit::stress::StressConfig;
use memslots_testkit::trace::Trace;
use memslots_testkit::workload::WorkloadKind;

fn config(strategy: Strategy, workload: WorkloadKind, updates: u64) -> StressConfig {
    StressConfig {
        trigger: memslots_testkit::stress::Trigger::Host,
        strategy,
        workload,
        vcpus: 2,
        updates: Some(updates),
        duration: None,
        seed: 7,
        inject_faults: None,
        dirty_ring: None,
    }
}

fn stress(config: &StressConfig) -> SoftStressReport {
    run(config, |_, _| {}).expect("soft stress run")
}

fn show(r: &SoftStressReport) {
    let s = &r.report;
    eprintln!(
        "{} {} {}: updates {} ioctls {} accesses {} spurious {} data {} rollbacks {} retries {} \
         zapped {} unchecked {} blackout total {:.0} us; first problem {:?}",
        s.strategy,
        s.workload,
        s.vcpus,
        s.updates,
        s.ioctls,
        s.guest_accesses,
        s.spurious_exits,
        s.data_errors,
        s.rollbacks,
        r.spte.retries,
        r.spte.zapped,
        r.unchecked,
        s.blackout_us.total.unwrap_or(0.0),
        s.first_problem
    );
}

#[test]
fn naive_shows_spurious_exits_on_resize_and_pam() {
    for workload in [WorkloadKind::Resize, WorkloadKind::Pam] {
        // Each one-call DELETE leaves a hole until the CREATE after it; readers land in it
        // unless the scheduler keeps them off the CPU for every window, so allow a few rounds.
        let mut seen = 0;
        for round in 0..5 {
            let mut c = config(Strategy::Naive, workload, 100);
            c.seed = round;
            let r = stress(&c);
            show(&r);
            assert_eq!(r.report.updates, 100);
            assert_eq!(r.report.data_errors, 0, "{:?}", r.report.first_problem);
            assert!(r.report.guest_accesses > 0);
            seen += r.report.spurious_exits;
            if seen > 0 {
                assert!(r.report.first_problem.is_some());
                break;
            }
        }
        assert!(seen > 0, "naive {workload}: no spurious exit in 5 rounds");
    }
}

#[test]
fn atomic_is_clean_on_every_workload() {
    let runs = WorkloadKind::ALL
        .into_iter()
        .map(|w| (w, 2))
        .chain([(WorkloadKind::Mixed, 4)]);
    for (workload, vcpus) in runs {
        {
            let mut c = config(Strategy::Atomic, workload, 60);
            c.vcpus = vcpus;
            let r = stress(&c);
            show(&r);
            assert_eq!(r.report.updates, 60);
            assert_eq!(r.report.ioctls, 60, "one list call per batch");
            assert!(r.report.guest_accesses > 0);
            assert_eq!(
                (r.report.spurious_exits, r.report.data_errors),
                (0, 0),
                "{workload}: {:?}",
                r.report.first_problem
            );
            assert!(r.report.clean());
            assert_eq!(r.report.blackout_us.total, Some(0.0), "nobody is held out");
        }
    }
}

#[test]
fn atomic_rolls_back_injected_failures_invisibly() {
    let mut c = config(Strategy::Atomic, WorkloadKind::Mixed, 60);
    c.inject_faults = Some(0.3);
    let r = stress(&c);
    show(&r);
    assert_eq!(r.report.updates, 60);
    assert!(r.report.rollbacks > 0);
    // Readers hold a failing batch to the layout before it: any new answer is a data error.
    assert!(r.report.clean(), "{:?}", r.report.first_problem);
}

#[test]
fn qemu_holds_readers_out_instead_of_showing_holes() {
    for workload in [WorkloadKind::Resize, WorkloadKind::Pam] {
        let r = stress(&config(Strategy::Qemu, workload, 100));
        show(&r);
        assert!(r.report.clean(), "{:?}", r.report.first_problem);
        // Resizes and PAM splits delete a range they re-create: QEMU parks everybody.
        assert!(r.report.blackout_us.total.unwrap_or(0.0) > 0.0);
    }
}

#[test]
fn bad_configurations_are_typed_errors() {
    let mut c = config(Strategy::Naive, WorkloadKind::Pam, 10);
    c.inject_faults = Some(0.5);
    assert!(matches!(
        run(&c, |_, _| {}),
        Err(SoftStressError::InjectNeedsAtomic)
    ));
    let mut c = config(Strategy::Atomic, WorkloadKind::Pam, 10);
    c.updates = None;
    assert!(matches!(
        run(&c, |_, _| {}),
        Err(SoftStressError::Unbounded)
    ));
    c.duration = Some(Duration::from_millis(50));
    c.vcpus = 0;
    assert!(matches!(
        run(&c, |_, _| {}),
        Err(SoftStressError::NoReaders)
    ));
}

#[test]
fn duration_bounds_a_run() {
    let mut c = config(Strategy::Atomic, WorkloadKind::Bar, 0);
    c.updates = None;
    c.duration = Some(Duration::from_millis(300));
    let r = stress(&c);
    assert!(r.report.updates > 0);
    assert!(r.report.clean());
}

fn trace(name: &str) -> Trace {
    Trace::from_file(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/data/traces")
            .join(name),
    )
    .expect("trace")
}

#[test]
fn replay_three_ways_per_strategy() {
    let t = trace("pc-512m-std.log");
    let commits = t.commits().len() as u64;
    for strategy in [Strategy::Atomic, Strategy::Qemu, Strategy::Naive] {
        let config = SoftReplayConfig {
            strategy,
            readers: 2,
            prefault_pages: 1 << 12,
        };
        let r = replay(&t, "pc-512m-std.log", &config, |_, _| {}).expect("replay");
        eprintln!(
            "{}: zapped {:?} retries {:?} spurious {:?} ioctls {}",
            strategy.name(),
            r.zapped_pages,
            r.retries,
            r.spurious,
            r.report.ioctls
        );
        assert_eq!(r.report.backend, "soft");
        assert_eq!(r.report.updates, commits);
        assert_eq!(r.report.layout_matches, Some(true));
        assert_eq!(r.zapped_pages.qemu, r.ways.qemu.zapped_pages);
        assert_eq!(r.zapped_pages.planned, r.ways.planned.zapped_pages);
        assert_eq!(r.retries.native, r.ways.native.retries);
        // The planned batch never opens a hole, whatever the readers do.
        assert_eq!(r.spurious.planned, 0);
        match strategy {
            Strategy::Atomic => {
                assert_eq!(r.report.ioctls, commits);
                assert_eq!(r.report.spurious_exits, 0);
            }
            _ => {
                assert!(r.report.ioctls > commits);
                assert!(r.report.spurious_exits <= r.spurious.qemu);
            }
        }
        let json = serde_json::to_value(&r).unwrap();
        for key in ["zapped_pages", "retries"] {
            for way in ["qemu", "planned", "native"] {
                assert!(json[key][way].is_u64(), "{key}.{way} in {json}");
            }
        }
        assert_eq!(json["backend"], "soft");
    }
}
