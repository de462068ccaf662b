//! Dirty pages with KVM's dirty ring, exact across re-slotting: a logging slot deleted, moved,
//! re-flagged and its id re-used between two harvests while the guest writes every page, and the
//! stress run in ring mode. Each check is shown to fire: the same changes applied naively lose
//! pages.

use memslots::model::{Slot, SlotCall, SlotFlags, SlotId, PAGE_SIZE};
use memslots_testkit::strategy::Strategy;
use memslots_testkit::stress::{run, DirtyCheck, StressConfig, Trigger, DIRTY_RING_BYTES};
use memslots_testkit::testvm::{TestVm, TestVmConfig};
use memslots_testkit::workload::WorkloadKind;

const MIB: u64 = 1 << 20;
const GPA: u64 = 0x1000_0000;
/// Where slot A moves to.
const MOVED: u64 = GPA + 8 * MIB;
/// Where A's memory goes, under id 1, when the ids are swapped: no probe there, so the pages the
/// guest wrote before the swap are not written again after it, and only their ring entries
/// (pushed under id 0) can report them.
const PARKED: u64 = GPA + 16 * MIB;

/// A TestVm in ring mode, or `None` (said loudly) without `/dev/kvm` or a dirty ring.
fn ring_vm() -> Option<TestVm> {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        eprintln!("SKIPPED: /dev/kvm cannot be opened; this dirty-ring test did not run");
        return None;
    }
    match TestVm::new(TestVmConfig {
        dirty_ring: Some(DIRTY_RING_BYTES),
        ..TestVmConfig::new(2, 2 * MIB)
    }) {
        Ok(vm) => Some(vm),
        Err(e) if e.to_string().contains("dirty ring") => {
            eprintln!("SKIPPED: this kernel has no usable dirty ring ({e})");
            None
        }
        Err(e) => panic!("test VM: {e}"),
    }
}

/// Waits until every vCPU has gone over all its probes `more` more times: the guest has written
/// every probed page since the caller's last step, whatever the machine's load.
fn wait_for_writes(vm: &TestVm, more: u64) {
    let rounds = |vm: &TestVm| (0..2).map(|i| vm.vcpu_rounds(i)).min().unwrap_or(0);
    let target = rounds(vm) + more;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while rounds(vm) < target {
        assert!(
            std::time::Instant::now() < deadline,
            "the guest stopped making rounds: {:?}",
            vm.first_problem()
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

fn slot(id: u16, gpa: u64, host: u64, flags: SlotFlags) -> Slot {
    Slot {
        id: SlotId::new(id),
        gpa,
        size: MIB,
        host,
        flags,
        guest_memfd: 0,
        guest_memfd_offset: 0,
    }
}

/// Runs the changes with `strategy` while the guest writes every probed page, harvesting after
/// each; returns (lost, reported, untranslated ring entries).
fn changes_between_harvests(strategy: Strategy) -> Option<(u64, u64, u64)> {
    let mut vm = ring_vm()?;
    let h = vm.arena_host();
    let log = SlotFlags::LOG_DIRTY_PAGES;
    let a = slot(0, GPA, h, log);
    let b = slot(1, GPA + MIB, h + MIB, log);
    vm.apply(&[a.set_call(), b.set_call()], Strategy::Atomic)
        .expect("initial slots");
    // Every 8th page of both halves (A's from its first page, B's from its fourth: an entry
    // translated through the other slot marks a page nobody wrote), at its GPA and at A's moved
    // GPA: writes go on wherever the memory is mapped.
    let mut probes = Vec::new();
    for p in (0..MIB / PAGE_SIZE).step_by(8) {
        probes.push((GPA + p * PAGE_SIZE, h + p * PAGE_SIZE));
        let q = MIB / PAGE_SIZE + p + 3;
        probes.push((GPA + q * PAGE_SIZE, h + q * PAGE_SIZE));
    }
    for p in (0..MIB / PAGE_SIZE).step_by(8) {
        probes.push((MOVED + p * PAGE_SIZE, h + p * PAGE_SIZE));
    }
    vm.start(&probes, None).expect("start");
    let mut check = DirtyCheck::new(vec![(h, h + 2 * MIB)]);
    check.after_update(&vm.layout());
    check.harvest(&mut vm).expect("first harvest");
    let moved = Slot { gpa: MOVED, ..a };
    let b_quiet = Slot {
        flags: SlotFlags::NONE,
        ..b
    };
    // Ids swapped: id 0 maps B's memory, id 1 A's (parked).
    let a_as_1 = Slot {
        id: SlotId::new(1),
        gpa: PARKED,
        ..a
    };
    let b_as_0 = Slot {
        id: SlotId::new(0),
        ..b
    };
    // A's memory under a new id, parked: no range overlaps, so QEMU holds nobody out and reaps
    // with the vCPUs running before the delete.
    let a_as_2 = Slot {
        id: SlotId::new(2),
        gpa: PARKED,
        ..a
    };
    let steps: Vec<(&str, Vec<SlotCall>)> = vec![
        (
            "A's memory under id 2",
            vec![a.delete_call(), a_as_2.set_call()],
        ),
        (
            "A back under id 0",
            vec![a_as_2.delete_call(), a.set_call()],
        ),
        ("delete A", vec![a.delete_call()]),
        ("A again under the same id", vec![a.set_call()]),
        ("move A", vec![moved.set_call()]),
        ("move A back", vec![a.set_call()]),
        ("B's logging off", vec![b_quiet.set_call()]),
        ("B's logging on", vec![b.set_call()]),
        (
            "ids swapped",
            vec![
                a.delete_call(),
                b.delete_call(),
                b_as_0.set_call(),
                a_as_1.set_call(),
            ],
        ),
        (
            "ids swapped back",
            vec![
                b_as_0.delete_call(),
                a_as_1.delete_call(),
                a.set_call(),
                b.set_call(),
            ],
        ),
    ];
    for round in 0..3 {
        for (what, calls) in &steps {
            // Writes racing each change: every page written since the last harvest, then the
            // change, then more writes before the next harvest.
            wait_for_writes(&vm, 2);
            vm.apply(calls, strategy)
                .unwrap_or_else(|e| panic!("round {round}, {what}: {e}"));
            check.after_update(&vm.layout());
            wait_for_writes(&vm, 2);
            check.harvest(&mut vm).expect("harvest");
        }
    }
    let stats = vm.guest_stats();
    if strategy == Strategy::Atomic {
        assert_eq!(stats.spurious_exits, 0, "{:?}", vm.first_problem());
        assert_eq!(stats.internal_errors, 0, "{:?}", vm.first_problem());
        assert_eq!(stats.data_errors, 0, "{:?}", vm.first_problem());
    }
    let untranslated = vm.updater().dirty_ring().expect("ring mode").untranslated();
    Some((check.lost, check.reported, untranslated))
}

#[test]
fn every_change_between_two_harvests_keeps_every_page_in_ring_mode() {
    let Some((lost, reported, untranslated)) = changes_between_harvests(Strategy::Atomic) else {
        return;
    };
    assert!(reported > 0, "the guest's writes were harvested");
    assert_eq!(lost, 0, "{lost} dirty pages lost across the changes");
    assert_eq!(untranslated, 0, "ring entries met an id no slot had");
}

#[test]
fn qemus_reap_with_vcpus_running_is_measured() {
    // QEMU reaps before a delete without holding anyone out when no deleted range overlaps an
    // added one: a page written between that reap and the delete is in an entry of a slot id that
    // is gone. Whether a run catches such a write is timing; the figure is printed, not judged.
    let Some((lost, reported, untranslated)) = changes_between_harvests(Strategy::Qemu) else {
        return;
    };
    assert!(reported > 0);
    eprintln!("qemu in ring mode: {lost} pages lost, {untranslated} entries untranslated");
}

#[test]
fn naive_changes_lose_ring_entries() {
    // The detector fires in ring mode: without the reap before each change, entries of deleted
    // slots are dropped or marked through the slot that has their id now.
    for _ in 0..3 {
        let Some((lost, _, untranslated)) = changes_between_harvests(Strategy::Naive) else {
            return;
        };
        if lost > 0 {
            eprintln!("naive: {lost} pages lost, {untranslated} entries untranslated");
            return;
        }
    }
    panic!("three naive runs in ring mode lost no page: the detector is blind");
}

fn stress(
    strategy: Strategy,
    trigger: Trigger,
    seed: u64,
) -> Option<memslots_testkit::stress::StressReport> {
    ring_vm()?;
    let config = StressConfig {
        strategy,
        trigger,
        workload: WorkloadKind::Dirty,
        vcpus: 2,
        updates: Some(300),
        duration: None,
        seed,
        inject_faults: None,
        dirty_ring: Some(DIRTY_RING_BYTES),
    };
    Some(run(&config, |_, _| {}).expect("stress"))
}

#[test]
fn stress_in_ring_mode_is_clean_with_both_triggers() {
    for trigger in [Trigger::Guest, Trigger::Host] {
        let Some(r) = stress(Strategy::Atomic, trigger, 7) else {
            return;
        };
        assert_eq!(r.lost_dirty_pages, 0, "{trigger:?}: {r:?}");
        assert_eq!(
            r.spurious_exits + r.internal_errors + r.data_errors,
            0,
            "{r:?}"
        );
    }
}

#[test]
fn stress_in_ring_mode_naive_loses_pages() {
    for seed in 0..3 {
        let Some(r) = stress(Strategy::Naive, Trigger::Guest, seed) else {
            return;
        };
        if r.lost_dirty_pages > 0 {
            return;
        }
    }
    panic!("naive stress in ring mode lost no dirty page in three runs");
}
