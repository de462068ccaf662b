//! The KVM backend on a real guest: every kind of re-slotting is clean with `atomic`, and every
//! detector is shown to fire (`naive` for spurious exits, internal errors and lost dirty pages;
//! host-side corruption for data errors). Fault injection at every call of a batch rolls back to
//! the exact old layout with the guest still clean.

use std::time::{Duration, Instant};

use memslots::kvm::ApplyError;
use memslots_testkit::faults::FaultInjector;
use memslots_testkit::strategy::Strategy;
use memslots_testkit::stress::{run, StressConfig, StressReport, Trigger, WorkloadVm};
use memslots_testkit::testvm::TestVm;
use memslots_testkit::workload::{Workload, WorkloadKind};

mod support;
use support::{assert_guest_clean, kvm_or_skip};

fn stress(workload: WorkloadKind, strategy: Strategy, updates: u64) -> StressReport {
    stress_with(workload, strategy, Trigger::Guest, updates)
}

fn stress_with(
    workload: WorkloadKind,
    strategy: Strategy,
    trigger: Trigger,
    updates: u64,
) -> StressReport {
    let report = run(
        &StressConfig {
            strategy,
            trigger,
            workload,
            vcpus: 2,
            updates: Some(updates),
            duration: None,
            seed: 42,
            inject_faults: None,
            dirty_ring: None,
        },
        |_, _| {},
    )
    .expect("stress run");
    eprintln!(
        "{workload} {} {}: updates {} ioctls {} accesses {} spurious {} internal {} data {} \
         lost-dirty {} blackout p50 {:.0} us p99 {:.0} us total {:.0} us",
        strategy.name(),
        trigger.name(),
        report.updates,
        report.ioctls,
        report.guest_accesses,
        report.spurious_exits,
        report.internal_errors,
        report.data_errors,
        report.lost_dirty_pages,
        report.blackout_us.p50,
        report.blackout_us.p99,
        report.blackout_us.total.unwrap_or(0.0)
    );
    assert_eq!(report.updates, updates);
    assert!(report.guest_accesses > 0, "the guest ran");
    report
}

/// Updates per kind in the default test run (CI-sized); `atomic_10000_of_each_kind` runs 10,000.
const UPDATES: u64 = 400;

fn atomic_is_clean(workload: WorkloadKind, updates: u64) {
    let r = stress(workload, Strategy::Atomic, updates);
    assert_eq!(r.spurious_exits, 0, "{:?}", r.first_problem);
    assert_eq!(r.internal_errors, 0, "{:?}", r.first_problem);
    assert_eq!(r.data_errors, 0, "{:?}", r.first_problem);
    assert_eq!(r.lost_dirty_pages, 0);
}

#[test]
fn atomic_resize_is_clean() {
    if kvm_or_skip() {
        atomic_is_clean(WorkloadKind::Resize, UPDATES);
    }
}

#[test]
fn atomic_pam_is_clean() {
    if kvm_or_skip() {
        atomic_is_clean(WorkloadKind::Pam, UPDATES);
    }
}

#[test]
fn atomic_bar_is_clean() {
    if kvm_or_skip() {
        atomic_is_clean(WorkloadKind::Bar, UPDATES);
    }
}

#[test]
fn atomic_dirty_is_clean() {
    if kvm_or_skip() {
        atomic_is_clean(WorkloadKind::Dirty, UPDATES);
    }
}

#[test]
#[ignore = "long: 10,000 batches of each kind (run with --ignored --release)"]
fn atomic_10000_of_each_kind() {
    if kvm_or_skip() {
        for kind in [
            WorkloadKind::Resize,
            WorkloadKind::Pam,
            WorkloadKind::Bar,
            WorkloadKind::Dirty,
        ] {
            atomic_is_clean(kind, 10_000);
        }
    }
}

#[test]
fn naive_shows_spurious_exits_and_fetch_crashes() {
    if !kvm_or_skip() {
        return;
    }
    let r = stress(WorkloadKind::Resize, Strategy::Naive, UPDATES);
    assert!(r.spurious_exits > 0, "the spurious-exit detector fires");
    let r = stress(WorkloadKind::Pam, Strategy::Naive, UPDATES);
    assert!(r.spurious_exits > 0);
    assert!(
        r.internal_errors > 0,
        "executing from a re-slotted range crashes"
    );
}

#[test]
fn host_trigger_every_strategy() {
    if !kvm_or_skip() {
        return;
    }
    let r = stress_with(
        WorkloadKind::Mixed,
        Strategy::Atomic,
        Trigger::Host,
        UPDATES,
    );
    assert!(r.clean(), "{:?}", r.first_problem);
    let r = stress_with(
        WorkloadKind::Mixed,
        Strategy::Qemu,
        Trigger::Host,
        UPDATES / 2,
    );
    assert!(r.clean(), "{:?}", r.first_problem);
    let r = stress_with(WorkloadKind::Pam, Strategy::Naive, Trigger::Host, UPDATES);
    assert!(
        r.spurious_exits + r.internal_errors > 0,
        "naive shows holes"
    );
}

#[test]
fn naive_loses_dirty_pages() {
    if !kvm_or_skip() {
        return;
    }
    let r = stress(WorkloadKind::Dirty, Strategy::Naive, UPDATES);
    assert!(r.lost_dirty_pages > 0, "the lost-dirty-page detector fires");
}

#[test]
fn qemu_strategy_never_shows_a_hole() {
    if !kvm_or_skip() {
        return;
    }
    for kind in [WorkloadKind::Resize, WorkloadKind::Pam, WorkloadKind::Bar] {
        let r = stress(kind, Strategy::Qemu, UPDATES / 2);
        assert_eq!(r.spurious_exits, 0, "{kind}: {:?}", r.first_problem);
        assert_eq!(r.internal_errors, 0, "{kind}: {:?}", r.first_problem);
        assert_eq!(r.data_errors, 0, "{kind}");
    }
}

/// A running test VM with a workload's initial slots.
fn running(kind: WorkloadKind) -> (TestVm, Workload) {
    let (mut vm, workload) = WorkloadVm::new(kind, 2, 9).expect("vm").into_parts();
    let probes: Vec<(u64, u64)> = workload.probe_pages().into_iter().step_by(4).collect();
    vm.start(&probes, None).expect("start");
    (vm, workload)
}

fn wait_for_rounds(vm: &TestVm, rounds: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while vm.guest_stats().rounds < rounds {
        assert!(Instant::now() < deadline, "the guest stopped making rounds");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn data_error_detector_fires_on_corrupted_memory() {
    if !kvm_or_skip() {
        return;
    }
    let (mut vm, _) = running(WorkloadKind::Resize);
    wait_for_rounds(&vm, 20);
    assert_eq!(vm.guest_stats().data_errors, 0);
    // Change what the guest last wrote, behind its back, as a wrong remap would.
    let host = vm.arena_host();
    vm.with_vcpus_parked(|vm| {
        for cpu in 0..2 {
            let at = host + cpu * 4;
            let v = vm.arena().read_u32(at);
            vm.arena().write_u32(at, v ^ 0x5a5a_5a5a);
        }
    });
    let rounds = vm.guest_stats().rounds;
    wait_for_rounds(&vm, rounds + 10);
    assert!(
        vm.guest_stats().data_errors > 0,
        "the data-error detector fires"
    );
}

#[test]
fn fault_at_every_call_rolls_back_exactly() {
    if !kvm_or_skip() {
        return;
    }
    let (mut vm, mut workload) = running(WorkloadKind::Mixed);
    wait_for_rounds(&vm, 5);
    let mut tested = 0;
    for _ in 0..24 {
        let mut scratch = vm.layout().clone();
        let update = workload.next(&mut scratch).expect("update");
        let calls = update.batch.calls().to_vec();
        for k in 0..calls.len() {
            for errno in [libc::ENOMEM, libc::EFAULT, libc::EEXIST] {
                let before = vm.layout().clone();
                vm.inject_faults(Some(FaultInjector::Nth { n: k as u64, errno }));
                match vm.apply(&calls, Strategy::Atomic) {
                    Err(ApplyError::RolledBack { index, stats, .. }) => {
                        assert_eq!(index, k);
                        assert!(stats.rolled_back);
                    }
                    other => panic!("{} call {k}: {other:?}", update.name),
                }
                assert_eq!(
                    *vm.layout(),
                    before,
                    "{} call {k}: layout restored",
                    update.name
                );
                tested += 1;
            }
        }
        // The kernel agrees with the restored layout: the same batch now goes through.
        vm.inject_faults(None);
        vm.apply(&calls, Strategy::Atomic)
            .unwrap_or_else(|e| panic!("{}: {e:?}", update.name));
    }
    assert!(tested > 50);
    let rounds = vm.guest_stats().rounds;
    wait_for_rounds(&vm, rounds + 10);
    assert_guest_clean(&vm);
}

#[test]
fn kick_race_every_quiesce_parks_everyone() {
    if !kvm_or_skip() {
        return;
    }
    let (mut vm, _) = running(WorkloadKind::Resize);
    wait_for_rounds(&vm, 5);
    // Quiesce over and over with no pause: a lost kick would hang here (the watchdog below
    // turns a hang into a failure), and a vCPU that kept running guest code would advance the
    // rounds the guest counts in its own memory.
    let guest_rounds = |vm: &TestVm| (0..2).map(|i| vm.vcpu_rounds(i)).sum::<u64>();
    let start = Instant::now();
    for i in 0..3000 {
        let advanced = vm.with_vcpus_parked(|vm| {
            let at_park = guest_rounds(vm);
            if i % 100 == 0 {
                std::thread::sleep(Duration::from_millis(2));
            }
            guest_rounds(vm) != at_park
        });
        assert!(!advanced, "a vCPU ran while parked (iteration {i})");
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "quiesces are hanging"
        );
    }
    let rounds = vm.guest_stats().rounds;
    wait_for_rounds(&vm, rounds + 5);
    assert_eq!(vm.guest_stats().spurious_exits, 0);
}
