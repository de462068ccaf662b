//! The two backends behind one interface ([`SlotBackend`]): the same updates, primitives and
//! refusals, driven through generic code, leave the real VM's slots and the soft backend's slot
//! sets identical at every step.

mod support;

use std::sync::Arc;

use memslots::backend::SlotBackend;
use memslots::kvm::{Backing, SlotUpdater, VcpuGate, Vm};
use memslots::model::{Layout, Primitive, Slot, SlotFlags, SlotId, PAGE_SIZE};
use memslots::planner::{plan, MemoryMap, Region};
use memslots::soft::SoftMemory;
use memslots_testkit::workload::{Arena, Workload, WorkloadKind};

const ARENA_GPA: u64 = 0x1000_0000;

/// Applies `calls` and tells whether the backend took them.
fn batch<B: SlotBackend>(b: &mut B, calls: &[memslots::model::SlotCall]) -> bool {
    b.apply_batch(calls).is_ok()
}

fn primitive<B: SlotBackend>(b: &mut B, p: &Primitive) -> bool {
    b.apply_primitive(p).is_ok()
}

/// Both backends over the same host memory (the soft one never dereferences it).
fn backends() -> Option<(SlotUpdater, SoftMemory, Arc<Backing>)> {
    if !support::kvm_or_skip() {
        return None;
    }
    let vm = Arc::new(Vm::new().expect("a VM"));
    let limits = *vm.limits();
    let mut kvm = SlotUpdater::new(
        vm,
        Arc::new(
            VcpuGate::with_signal(memslots_testkit::testvm::kick_signal()).expect("kick signal"),
        ),
    );
    let backing = kvm
        .add_backing(
            Backing::anonymous("arena", WorkloadKind::Mixed.arena_size()).expect("arena memory"),
        )
        .expect("register");
    Some((kvm, SoftMemory::new(limits), backing))
}

#[test]
fn every_workload_update_leaves_both_backends_alike() {
    let Some((mut kvm, mut soft, backing)) = backends() else {
        return;
    };
    let arena = Arena {
        gpa: ARENA_GPA,
        host: backing.host(),
        size: WorkloadKind::Mixed.arena_size(),
        address_space: 0,
        first_id: 1,
    };
    let mut workload = Workload::new(WorkloadKind::Mixed, arena, 11);
    let initial: Vec<_> = workload
        .initial_slots()
        .iter()
        .map(|s| s.set_call())
        .collect();
    assert!(batch(&mut kvm, &initial) && batch(&mut soft, &initial));
    let mut names = std::collections::BTreeSet::new();
    for i in 0..400 {
        let mut scratch = kvm.layout().clone();
        let update = workload.next(&mut scratch).expect("a workload update");
        names.insert(update.name);
        let calls = update.batch.calls();
        assert!(
            batch(&mut kvm, calls),
            "kvm refused update {i} ({})",
            update.name
        );
        assert!(
            batch(&mut soft, calls),
            "soft refused update {i} ({})",
            update.name
        );
        assert_eq!(
            SlotBackend::layout(&kvm),
            SlotBackend::layout(&soft),
            "update {i} ({})",
            update.name
        );
    }
    assert!(names.len() >= 5, "the workload ran few kinds: {names:?}");
}

#[test]
fn primitives_plans_and_refusals_alike() {
    let Some((mut kvm, mut soft, backing)) = backends() else {
        return;
    };
    let host = backing.host();
    let ram = Slot {
        id: SlotId::new(1),
        gpa: ARENA_GPA,
        size: 64 * PAGE_SIZE,
        host,
        flags: SlotFlags::NONE,
        guest_memfd: 0,
        guest_memfd_offset: 0,
    };
    assert!(batch(&mut kvm, &[ram.set_call()]) && batch(&mut soft, &[ram.set_call()]));
    let (a, b) = (SlotId::new(1), SlotId::new(2));
    let steps = [
        Primitive::Grow {
            id: a,
            size: 128 * PAGE_SIZE,
        },
        Primitive::Split {
            id: a,
            at: ARENA_GPA + 96 * PAGE_SIZE,
            new_id: b,
        },
        Primitive::SetReadonly { id: b, on: true },
        Primitive::SetDirtyLogging { id: a, on: true },
        Primitive::Shrink {
            id: b,
            size: 16 * PAGE_SIZE,
        },
        Primitive::SetDirtyLogging { id: a, on: false },
        Primitive::SetReadonly { id: b, on: false },
        Primitive::Merge {
            first: a,
            second: b,
        },
        Primitive::Move {
            id: a,
            gpa: ARENA_GPA + 0x100_0000,
        },
    ];
    for p in &steps {
        assert!(primitive(&mut kvm, p), "kvm refused {p:?}");
        assert!(primitive(&mut soft, p), "soft refused {p:?}");
        assert_eq!(
            SlotBackend::layout(&kvm),
            SlotBackend::layout(&soft),
            "{p:?}"
        );
    }

    // Refusals: both say no and change nothing, whatever the position of the bad call.
    let before: Layout = SlotBackend::layout(&kvm).clone();
    let slot = *before.slot(a).expect("slot a");
    let over = Slot {
        id: SlotId::new(3),
        ..slot
    };
    let bad_batches = [
        vec![over.set_call()],
        vec![
            slot.delete_call(),
            over.set_call(),
            Slot {
                id: SlotId::new(4),
                ..slot
            }
            .set_call(),
        ],
    ];
    for calls in &bad_batches {
        assert!(!batch(&mut kvm, calls) && !batch(&mut soft, calls));
        assert_eq!(SlotBackend::layout(&kvm), &before);
        assert_eq!(SlotBackend::layout(&soft), &before);
    }
    let bad = Primitive::Split {
        id: a,
        at: slot.gpa,
        new_id: SlotId::new(3),
    };
    assert!(!primitive(&mut kvm, &bad) && !primitive(&mut soft, &bad));
    assert_eq!(SlotBackend::layout(&soft), &before);

    // A planner's plan, applied through the same interface.
    let target = MemoryMap::new(vec![
        Region {
            address_space: 0,
            gpa: ARENA_GPA,
            size: 32 * PAGE_SIZE,
            host,
            flags: SlotFlags::NONE,
        },
        Region {
            address_space: 0,
            gpa: ARENA_GPA + 64 * PAGE_SIZE,
            size: 16 * PAGE_SIZE,
            host: host + 64 * PAGE_SIZE,
            flags: SlotFlags::READONLY,
        },
    ])
    .expect("a valid map");
    let p = plan(&before, &target).expect("a plan");
    kvm.apply_plan(&p).expect("kvm applies the plan");
    soft.apply_plan(&p).expect("soft applies the plan");
    assert_eq!(SlotBackend::layout(&kvm), SlotBackend::layout(&soft));
    assert_eq!(MemoryMap::from_layout(SlotBackend::layout(&soft)), target);
}
