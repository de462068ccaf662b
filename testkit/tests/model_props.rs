//! Properties of the model: batches equal their calls one by one, refusals change nothing, and the
//! hole analysis agrees with a page-by-page oracle.

use std::collections::BTreeSet;

use memslots::model::{Layout, Limits, Mapping, Slot, SlotCall, SlotFlags, SlotId, PAGE_SIZE};
use proptest::prelude::*;

const P: u64 = PAGE_SIZE;
const PAGES: u64 = 48; // a small guest so slots collide often
const HOST: u64 = 0x7f00_0000_0000;

/// Raw material for one call; turned into a call against the current layout.
#[derive(Clone, Debug)]
struct RawCall {
    kind: u8,
    id: u16,
    gpa: u64,
    pages: u64,
    host: u64,
    flags: u32,
}

fn raw_call() -> impl Strategy<Value = RawCall> {
    (0u8..6, 0u16..6, 0..PAGES, 1u64..12, 0u64..64, 0u32..4).prop_map(
        |(kind, id, gpa, pages, host, flags)| RawCall {
            kind,
            id,
            gpa,
            pages,
            host,
            flags,
        },
    )
}

fn make(raw: &RawCall, layout: &Layout) -> SlotCall {
    let existing = layout.slot(SlotId::new(raw.id)).copied();
    match (raw.kind, existing) {
        (1, Some(s)) => s.delete_call(),
        (2, Some(s)) => Slot {
            gpa: raw.gpa * P,
            ..s
        }
        .set_call(),
        (3, Some(s)) => Slot {
            flags: SlotFlags(s.flags.bits() ^ 1),
            ..s
        }
        .set_call(),
        _ => SlotCall {
            slot: SlotId::new(raw.id).raw(),
            flags: raw.flags,
            gpa: raw.gpa * P,
            size: raw.pages * P,
            host: HOST + raw.host * P,
            guest_memfd: 0,
            guest_memfd_offset: 0,
        },
    }
}

/// A start layout and a batch of calls that the model accepts one after another.
fn valid_batch(setup: &[RawCall], raws: &[RawCall]) -> (Layout, Vec<SlotCall>) {
    let mut layout = Layout::new(Limits::default());
    for raw in setup {
        let call = make(raw, &layout);
        let _ = layout.apply(&call);
    }
    let start = layout.clone();
    let mut calls = Vec::new();
    for raw in raws {
        let call = make(raw, &layout);
        if layout.apply(&call).is_ok() {
            calls.push(call);
        }
    }
    (start, calls)
}

fn mapping(layout: &Layout, page: u64) -> Option<Mapping> {
    layout.find(0, page * P).map(|s| Mapping {
        host: s.host_of(page * P),
        readonly: s.flags.readonly(),
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn batch_equals_calls_one_by_one(setup in prop::collection::vec(raw_call(), 0..12),
                                     raws in prop::collection::vec(raw_call(), 0..16)) {
        let (start, calls) = valid_batch(&setup, &raws);
        let mut one_by_one = start.clone();
        for call in &calls {
            one_by_one.apply(call).unwrap();
        }
        let mut batched = start.clone();
        let done = batched.apply_batch(&calls).unwrap();
        prop_assert_eq!(done.len(), calls.len());
        prop_assert_eq!(&batched, &one_by_one);
        batched.revert_all(&done);
        prop_assert_eq!(&batched, &start);
    }

    #[test]
    fn refused_batch_changes_nothing(setup in prop::collection::vec(raw_call(), 0..12),
                                     raws in prop::collection::vec(raw_call(), 1..16)) {
        let mut layout = Layout::new(Limits::default());
        for raw in &setup {
            let call = make(raw, &layout);
            let _ = layout.apply(&call);
        }
        // Calls made against the start layout: some will be refused mid-batch.
        let calls: Vec<SlotCall> = raws.iter().map(|r| make(r, &layout)).collect();
        let start = layout.clone();
        match layout.apply_batch(&calls) {
            Ok(_) => {}
            Err(err) => {
                prop_assert_eq!(&layout, &start);
                // The named call is the first one refused when applied in order.
                let mut probe = start.clone();
                for call in &calls[..err.index] {
                    prop_assert!(probe.apply(call).is_ok());
                }
                prop_assert_eq!(probe.apply(&calls[err.index]).unwrap_err(), err.rule);
            }
        }
    }

    #[test]
    fn holes_match_a_page_oracle(setup in prop::collection::vec(raw_call(), 0..12),
                                 raws in prop::collection::vec(raw_call(), 0..14)) {
        let (start, calls) = valid_batch(&setup, &raws);
        let mut layout = start.clone();
        let report = layout.holes(&calls).unwrap();
        prop_assert_eq!(&layout, &start);

        // Oracle: after each call, every page mapped before and after the batch must map to its
        // old or its new place.
        let mut end = start.clone();
        end.apply_batch(&calls).unwrap();
        let mut bad: BTreeSet<(usize, u64)> = BTreeSet::new();
        let mut now = start.clone();
        for (i, call) in calls.iter().enumerate() {
            now.apply(call).unwrap();
            for page in 0..PAGES + 12 {
                let (o, n, c) = (mapping(&start, page), mapping(&end, page), mapping(&now, page));
                if o.is_some() && n.is_some() && c != o && c != n {
                    bad.insert((i, page));
                }
            }
        }
        let mut reported: BTreeSet<(usize, u64)> = BTreeSet::new();
        for hole in &report.holes {
            prop_assert!(hole.opened_by < hole.closed_by);
            for i in hole.opened_by..hole.closed_by {
                for page in hole.range.start / P..hole.range.end / P {
                    prop_assert!(reported.insert((i, page)), "holes overlap");
                }
            }
        }
        prop_assert_eq!(&reported, &bad);
        // The quiesce window spans exactly the steps with a bad page, through the closing call.
        let first = bad.iter().map(|b| b.0).min();
        let last = bad.iter().map(|b| b.0 + 2).max();
        let expect = match (first, last) { (Some(f), Some(l)) => f..l, _ => 0..0 };
        prop_assert_eq!(report.quiesce_window(), expect);
    }
}

#[test]
fn batch_of_the_whole_slot_limit() {
    // 32,764 creates then 32,764 deletes in one batch each: accepted, and applied without copying.
    let limits = Limits::default();
    let mut layout = Layout::new(limits);
    let slots: Vec<Slot> = (0..limits.slots)
        .map(|id| Slot {
            id: SlotId::new(id),
            gpa: u64::from(id) * 2 * P,
            size: P,
            host: HOST + u64::from(id) * P,
            flags: SlotFlags::NONE,
            guest_memfd: 0,
            guest_memfd_offset: 0,
        })
        .collect();
    let creates: Vec<SlotCall> = slots.iter().map(Slot::set_call).collect();
    layout.apply_batch(&creates).unwrap();
    assert_eq!(layout.len(), usize::from(limits.slots));
    assert_eq!(layout.free_id(0, &[]), None);
    let moves: Vec<SlotCall> = slots
        .iter()
        .map(|s| {
            Slot {
                gpa: s.gpa + P,
                ..*s
            }
            .set_call()
        })
        .collect();
    let report = layout.holes(&moves).unwrap();
    assert!(report.is_empty(), "moves are single atomic calls");
    let deletes: Vec<SlotCall> = slots.iter().map(Slot::delete_call).collect();
    layout.apply_batch(&deletes).unwrap();
    assert!(layout.is_empty());
}
