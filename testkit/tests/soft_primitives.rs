//! Native primitives on the soft backend, checked against the SPTE counters: grow, split and merge
//! zap nothing; shrink zaps only the cut range; read-only on write-protects the slot's writable
//! entries; read-only off zaps nothing. The same changes lowered to DELETE + CREATE zap the whole
//! slot, which is what the primitives save.

use memslots::model::{Layout, Limits, Primitive, Slot, SlotFlags, SlotId, PAGE_SIZE};
use memslots::soft::{Access, SoftError, SoftMemory, Translation};

const HOST: u64 = 0x7f00_0000_0000;
const PAGES: u64 = 64;

fn ram() -> Slot {
    Slot {
        id: SlotId::new(0),
        gpa: 0x10_0000,
        size: PAGES * PAGE_SIZE,
        host: HOST,
        flags: SlotFlags::NONE,
        guest_memfd: 0,
        guest_memfd_offset: 0,
    }
}

/// Soft memory with one 64-page slot, every page faulted in writable.
fn prefaulted() -> SoftMemory {
    let mut layout = Layout::new(Limits::default());
    layout.apply(&ram().set_call()).unwrap();
    let memory = SoftMemory::with_layout(layout);
    let mut reader = memory.reader();
    for p in 0..PAGES {
        let a = reader.access(ram().gpa + p * PAGE_SIZE, true);
        assert!(matches!(a, Access::Ram { faulted: true, .. }));
    }
    assert_eq!(memory.spte().len() as u64, PAGES);
    assert_eq!(memory.counters().zapped, 0);
    memory
}

/// Every prefaulted page still hits its SPTE (no fault) at the same host address.
fn all_pages_hit(memory: &SoftMemory, pages: std::ops::Range<u64>) {
    let mut reader = memory.reader();
    for p in pages {
        let gpa = ram().gpa + p * PAGE_SIZE + 8;
        assert_eq!(
            reader.access(gpa, false),
            Access::Ram {
                host: HOST + p * PAGE_SIZE + 8,
                faulted: false
            },
            "page {p}"
        );
    }
}

#[test]
fn grow_zaps_nothing() {
    let mut m = prefaulted();
    let out = m
        .apply_primitive(&Primitive::Grow {
            id: SlotId::new(0),
            size: 2 * PAGES * PAGE_SIZE,
        })
        .unwrap();
    assert_eq!((out.zapped, out.invalidated, out.publishes), (0, 0, 1));
    assert_eq!(m.counters().zapped, 0);
    all_pages_hit(&m, 0..PAGES);
    let mut r = m.reader();
    let grown = ram().gpa + (PAGES + 3) * PAGE_SIZE;
    assert!(
        matches!(r.translate(grown), Translation::Ram { host, .. } if host == HOST + (PAGES + 3) * PAGE_SIZE)
    );
}

#[test]
fn split_and_merge_zap_nothing() {
    let mut m = prefaulted();
    let at = ram().gpa + 24 * PAGE_SIZE;
    let out = m
        .apply_primitive(&Primitive::Split {
            id: SlotId::new(0),
            at,
            new_id: SlotId::new(5),
        })
        .unwrap();
    assert_eq!((out.zapped, out.invalidated), (0, 0));
    let mut r = m.reader();
    assert!(matches!(r.translate(at), Translation::Ram { slot, .. } if slot == SlotId::new(5)));
    all_pages_hit(&m, 0..PAGES);
    let out = m
        .apply_primitive(&Primitive::Merge {
            first: SlotId::new(0),
            second: SlotId::new(5),
        })
        .unwrap();
    assert_eq!((out.zapped, out.invalidated), (0, 0));
    assert_eq!(m.counters().zapped, 0);
    assert_eq!(m.layout().slot(SlotId::new(0)), Some(&ram()));
    all_pages_hit(&m, 0..PAGES);
}

#[test]
fn shrink_zaps_only_the_cut_range() {
    let mut m = prefaulted();
    let keep = 40;
    let out = m
        .apply_primitive(&Primitive::Shrink {
            id: SlotId::new(0),
            size: keep * PAGE_SIZE,
        })
        .unwrap();
    assert_eq!(out.zapped, PAGES - keep);
    assert_eq!(m.counters().zapped, PAGES - keep);
    all_pages_hit(&m, 0..keep);
    let mut r = m.reader();
    for p in keep..PAGES {
        assert_eq!(r.access(ram().gpa + p * PAGE_SIZE, false), Access::Mmio);
    }
}

#[test]
fn readonly_on_write_protects_and_off_zaps_nothing() {
    let mut m = prefaulted();
    let id = SlotId::new(0);
    let out = m
        .apply_primitive(&Primitive::SetReadonly { id, on: true })
        .unwrap();
    assert_eq!((out.zapped, out.invalidated), (PAGES, 0));
    // Reads still hit; writes exit as MMIO.
    all_pages_hit(&m, 0..PAGES);
    let mut r = m.reader();
    assert_eq!(r.access(ram().gpa, true), Access::Mmio);
    let out = m
        .apply_primitive(&Primitive::SetReadonly { id, on: false })
        .unwrap();
    assert_eq!(out.zapped, 0);
    assert_eq!(m.counters().zapped, PAGES);
    // The first write after faults the writable entry back in.
    assert!(matches!(
        r.access(ram().gpa, true),
        Access::Ram { faulted: true, .. }
    ));
    // Already off: nothing to do at all.
    let out = m
        .apply_primitive(&Primitive::SetReadonly { id, on: false })
        .unwrap();
    assert_eq!((out.zapped, out.publishes), (0, 0));
}

#[test]
fn move_zaps_the_old_range_without_invalid_slots() {
    let mut m = prefaulted();
    let out = m
        .apply_primitive(&Primitive::Move {
            id: SlotId::new(0),
            gpa: 0x80_0000,
        })
        .unwrap();
    assert_eq!((out.zapped, out.invalidated), (PAGES, 0));
    let mut r = m.reader();
    assert_eq!(r.translate(ram().gpa), Translation::Mmio);
    assert!(matches!(r.translate(0x80_0000), Translation::Ram { host, .. } if host == HOST));
}

#[test]
fn lowered_primitives_zap_the_whole_slot() {
    // What the stock kernel has to do instead: DELETE + CREATE through the list algorithm.
    for primitive in [
        Primitive::Grow {
            id: SlotId::new(0),
            size: 2 * PAGES * PAGE_SIZE,
        },
        Primitive::Split {
            id: SlotId::new(0),
            at: ram().gpa + 8 * PAGE_SIZE,
            new_id: SlotId::new(1),
        },
        Primitive::SetReadonly {
            id: SlotId::new(0),
            on: true,
        },
    ] {
        let mut m = prefaulted();
        let mut layout = m.layout().clone();
        let lowered = layout.lower(&primitive).unwrap();
        let out = m.apply_batch(lowered.batch.calls()).unwrap();
        assert_eq!((out.zapped, out.invalidated), (PAGES, 1), "{primitive:?}");
        assert_eq!(m.spte().len(), 0);
    }
}

#[test]
fn refused_primitive_changes_nothing() {
    let mut m = prefaulted();
    let generation = m.generation();
    let err = m
        .apply_primitive(&Primitive::Shrink {
            id: SlotId::new(0),
            size: 2 * PAGES * PAGE_SIZE,
        })
        .unwrap_err();
    assert!(matches!(err, SoftError::Primitive(_)));
    let err = m
        .apply_primitive(&Primitive::Grow {
            id: SlotId::new(3),
            size: PAGE_SIZE,
        })
        .unwrap_err();
    assert!(matches!(err, SoftError::Primitive(_)));
    assert_eq!(m.generation(), generation);
    assert_eq!(m.counters().zapped, 0);
    all_pages_hit(&m, 0..PAGES);
}
