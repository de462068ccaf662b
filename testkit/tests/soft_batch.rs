//! The atomic list algorithm step by step, single-threaded: what each batch publishes, invalidates
//! and zaps; refused and failing batches leave everything as it was; both slot-set copies stay
//! equal to the model over a long random walk.

mod soft_support;

use memslots::model::{Layout, Limits, Slot, SlotFlags, SlotId, PAGE_SIZE};
use memslots::soft::{Access, SoftError, SoftMemory, Translation};
use soft_support::{refused, transition, Rng, State, WINDOW_PAGES};

fn slot(id: u16, page: u64, pages: u64, host: u64) -> Slot {
    Slot {
        id: SlotId::new(id),
        gpa: page * PAGE_SIZE,
        size: pages * PAGE_SIZE,
        host,
        flags: SlotFlags::NONE,
        guest_memfd: 0,
        guest_memfd_offset: 0,
    }
}

const A: u64 = 0x7f00_0000_0000;
const B: u64 = 0x7f10_0000_0000;

/// Two 16-page slots, every page faulted in writable.
fn two_slots() -> SoftMemory {
    let mut layout = Layout::new(Limits::default());
    layout.apply(&slot(0, 0, 16, A).set_call()).unwrap();
    layout.apply(&slot(1, 32, 16, B).set_call()).unwrap();
    let m = SoftMemory::with_layout(layout);
    let mut r = m.reader();
    for p in (0..16).chain(32..48) {
        assert!(matches!(r.access(p * PAGE_SIZE, true), Access::Ram { .. }));
    }
    m
}

/// Reader answers for every page of the window equal the model's.
fn matches_model(m: &SoftMemory) {
    let mut r = m.reader();
    for p in 0..WINDOW_PAGES {
        let gpa = p * PAGE_SIZE + 16;
        let want = m.layout().translate(0, gpa);
        let got = match r.translate(gpa) {
            Translation::Ram {
                host, generation, ..
            } => {
                assert_eq!(generation, m.generation());
                Some(host)
            }
            Translation::Mmio => None,
            Translation::Retry => panic!("RETRY at {gpa:#x} with no batch in flight"),
        };
        assert_eq!(got, want, "gpa {gpa:#x}");
        let via_spte = match r.access(gpa, false) {
            Access::Ram { host, .. } => Some(host),
            Access::Mmio => None,
            Access::Retry => panic!("RETRY"),
        };
        assert_eq!(via_spte, want, "gpa {gpa:#x} through the SPTEs");
    }
}

#[test]
fn resize_invalidates_zaps_and_publishes_twice() {
    let mut m = two_slots();
    let calls = [
        slot(0, 0, 16, A).delete_call(),
        slot(0, 0, 24, A).set_call(),
    ];
    let out = m.apply_batch(&calls).unwrap();
    assert_eq!((out.publishes, out.invalidated, out.zapped), (2, 1, 16));
    assert_eq!(m.generation(), 2);
    matches_model(&m);
}

#[test]
fn move_is_invalidated_and_zapped_create_and_flags_are_not() {
    let mut m = two_slots();
    let moved = slot(1, 64, 16, B);
    let out = m.apply_batch(&[moved.set_call()]).unwrap();
    assert_eq!((out.publishes, out.invalidated, out.zapped), (2, 1, 16));
    let created = slot(2, 128, 4, A + 0x10_0000);
    let logged = Slot {
        flags: SlotFlags::LOG_DIRTY_PAGES,
        ..slot(0, 0, 16, A)
    };
    let out = m
        .apply_batch(&[created.set_call(), logged.set_call()])
        .unwrap();
    // One publish, no invalid slot; switching dirty logging on write-protects the slot.
    assert_eq!((out.publishes, out.invalidated, out.zapped), (1, 0, 16));
    matches_model(&m);
}

#[test]
fn refused_batch_touches_nothing() {
    let mut m = two_slots();
    let before = (m.generation(), m.grace_periods(), m.spte().len());
    let calls = [
        slot(0, 0, 16, A).delete_call(),
        slot(1, 64, 16, B).set_call(),
        slot(5, 0, 64, A).set_call(), // valid: slots 0 and 1 have left [0, 64)
        slot(6, 70, 4, A).set_call(), // EEXIST: overlaps slot 1 at its new place
    ];
    let err = m.apply_batch(&calls).unwrap_err();
    assert!(
        matches!(err, SoftError::Refused(ref e) if e.index == 3),
        "{err}"
    );
    assert_eq!((m.generation(), m.grace_periods(), m.spte().len()), before);
    assert_eq!(m.counters().zapped, 0);
    matches_model(&m);
}

#[test]
fn failure_at_every_call_rolls_back() {
    let calls = [
        slot(0, 0, 16, A).delete_call(),
        slot(1, 64, 16, B).set_call(),
        slot(0, 0, 8, A).set_call(),
        slot(3, 8, 8, A + 8 * PAGE_SIZE).set_call(),
    ];
    for k in 0..calls.len() {
        let mut m = two_slots();
        let old = m.layout().clone();
        m.fail_call(Some(k));
        let err = m.apply_batch(&calls).unwrap_err();
        assert!(matches!(err, SoftError::Injected { index, .. } if index == k));
        assert_eq!(m.layout(), &old);
        // Invalidate, then restore: two publishes; the invalidated slots' SPTEs are gone.
        assert_eq!(m.generation(), 2);
        assert_eq!(m.spte().len(), 0);
        matches_model(&m);
        m.fail_call(None);
        m.apply_batch(&calls).unwrap();
        matches_model(&m);
    }
}

#[test]
fn random_walk_keeps_both_copies_equal_to_the_model() {
    let states = State::all();
    let mut rng = Rng::new(99);
    let mut at = 0usize;
    let mut m = SoftMemory::with_layout(states[at].layout());
    let mut generation = m.generation();
    for i in 0..300 {
        let to = rng.below(states.len() as u64) as usize;
        let (old, new) = (states[at].layout(), states[to].layout());
        match i % 5 {
            0 => {
                m.apply_batch(refused(&old, &new, &mut rng).calls())
                    .unwrap_err();
            }
            1 => {
                let batch = transition(&old, &new, &mut rng);
                m.fail_call(Some(rng.below(batch.len().max(1) as u64) as usize));
                let result = m.apply_batch(batch.calls());
                m.fail_call(None);
                assert!(batch.is_empty() || result.is_err());
            }
            _ => {
                m.apply_batch(transition(&old, &new, &mut rng).calls())
                    .unwrap();
                at = to;
            }
        }
        assert_eq!(m.layout(), &states[at].layout());
        assert!(m.generation() >= generation);
        generation = m.generation();
        matches_model(&m);
    }
}

#[test]
fn host_range_zap_reaches_every_alias() {
    let mut layout = Layout::new(Limits::default());
    layout.apply(&slot(0, 0, 16, A).set_call()).unwrap();
    // Slot 1 aliases the upper half of slot 0's host memory.
    layout
        .apply(&slot(1, 64, 8, A + 8 * PAGE_SIZE).set_call())
        .unwrap();
    let mut m = SoftMemory::with_layout(layout);
    let mut r = m.reader();
    for p in (0..16).chain(64..72) {
        assert!(matches!(r.access(p * PAGE_SIZE, true), Access::Ram { .. }));
    }
    // Host pages 10 and 11: GPA pages 10-11 of slot 0 and 66-67 of slot 1.
    let zapped = m.zap_host_range(A + 10 * PAGE_SIZE, A + 12 * PAGE_SIZE);
    assert_eq!(zapped, 4);
    for p in [10, 11, 66, 67] {
        assert!(matches!(
            r.access(p * PAGE_SIZE, false),
            Access::Ram { faulted: true, .. }
        ));
    }
    for p in [9, 12, 65, 68] {
        assert!(matches!(
            r.access(p * PAGE_SIZE, false),
            Access::Ram { faulted: false, .. }
        ));
    }
}

#[test]
fn last_used_slot_cache_answers_repeated_lookups() {
    let mut m = two_slots();
    let mut r = m.reader();
    for p in 0..16 {
        r.translate(p * PAGE_SIZE);
    }
    assert_eq!(r.cache_hits(), 15);
    // A publish changes the generation: the cached slot is not trusted any more.
    m.apply_batch(&[slot(2, 100, 1, B + 0x10_0000).set_call()])
        .unwrap();
    assert!(matches!(
        r.translate(0),
        Translation::Ram { generation: 1, .. }
    ));
    assert_eq!(r.cache_hits(), 15);
    r.translate(PAGE_SIZE);
    assert_eq!(r.cache_hits(), 16);
}

#[test]
fn writer_and_readers_move_between_threads() {
    fn send<T: Send>() {}
    send::<SoftMemory>();
    send::<memslots::soft::Reader>();
}
