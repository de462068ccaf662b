//! Fuzz harnesses: each takes arbitrary bytes and checks the library's promises on them, panicking on
//! a broken one. Shared by the cargo-fuzz targets and by `memslots/tests/fuzz_regressions.rs`, which
//! replays every saved input in `fuzz/regressions/<target>/`.

#![allow(dead_code)]

use memslots::model::{Layout, Limits, Mapping, Slot, SlotCall, SlotFlags, SlotId, PAGE_SIZE};
use memslots_testkit::conformance::run_trace;
use memslots_testkit::trace::{Trace, TraceError, EVENT};

/// The trace parser: never panics; what it accepts is consistent; what it refuses names a real line.
/// Raw bytes go in (not lossy text), so non-UTF-8 lines, `ret=-2147483648` and repeated fields
/// reach the parser as a file would give them.
pub fn trace(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let lines: Vec<&str> = text.lines().collect();
    match Trace::parse_bytes(data) {
        Ok(trace) => {
            let mut last = 0;
            for call in &trace.calls {
                assert!(
                    call.line > last && call.line <= lines.len(),
                    "line numbers rise"
                );
                assert!(lines[call.line - 1].contains(EVENT));
                last = call.line;
            }
            // Commits partition the calls, in order, with no empty commit.
            let commits = trace.commits();
            let mut at = 0;
            for c in &commits {
                assert_eq!(c.start, at);
                assert!(c.end > c.start);
                at = c.end;
            }
            assert_eq!(at, trace.calls.len());
            for call in &trace.calls {
                // `ret` is 0 or an errno KVM can return, so the verdict never overflows.
                assert!(call.result().err().is_none_or(|e| (1..=4095).contains(&e)));
            }
            let report = run_trace(&trace, Limits::default());
            assert!(report.calls as usize <= trace.calls.len());
            assert_eq!(report.accepted + report.rejected, report.calls);
        }
        Err(TraceError::Malformed { line, .. }) => {
            assert!(
                line >= 1 && line <= lines.len(),
                "line {line} of {}",
                lines.len()
            );
            assert!(lines[line - 1].contains(EVENT));
        }
        Err(TraceError::Io { .. }) => unreachable!("no file is read"),
    }
}

const P: u64 = PAGE_SIZE;
const GPA_PAGES: u64 = 64;
const HOST: u64 = 0x7f00_0000_0000;

/// A call decoded from 8 bytes against the current layout: mostly near-valid, sometimes not.
fn decode(c: &[u8], layout: &Layout) -> SlotCall {
    let space = u16::from(c[6] % 16 == 0);
    let id = SlotId::in_space(space, u16::from(c[0] % 8));
    let existing = layout.slot(id).copied();
    let raw = SlotCall {
        slot: id.raw(),
        flags: u32::from(c[5] % 8),
        gpa: u64::from(c[2]) % GPA_PAGES * P,
        size: (1 + u64::from(c[3] % 16)) * P,
        host: HOST + u64::from(c[4]) * P,
        guest_memfd: 0,
        guest_memfd_offset: 0,
    };
    match (c[1] % 8, existing) {
        (3, Some(s)) => s.delete_call(),
        (3, None) => SlotCall { size: 0, ..raw },
        (4, Some(s)) => Slot { gpa: raw.gpa, ..s }.set_call(),
        (5, Some(s)) => Slot {
            flags: SlotFlags(s.flags.bits() ^ 1),
            ..s
        }
        .set_call(),
        (6, _) => SlotCall {
            gpa: raw.gpa | (u64::from(c[7] & 3) * 0x400),
            size: raw.size | u64::from(c[7] >> 6),
            ..raw
        },
        (7, Some(s)) => s.set_call(),
        _ => raw,
    }
}

fn mapping(layout: &Layout, space: u16, page: u64) -> Option<Mapping> {
    layout.find(space, page * P).map(|s| Mapping {
        host: s.host_of(page * P),
        readonly: s.flags.readonly(),
    })
}

/// Batch validation and hole analysis: all or nothing, equal to one-by-one, holes as a page oracle
/// sees them.
pub fn batch(data: &[u8]) {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let chunks: Vec<&[u8]> = rest.chunks_exact(8).collect();
    let setup_len = usize::from(split) % (chunks.len() + 1);
    let mut layout = Layout::new(Limits::default());
    for c in &chunks[..setup_len] {
        let call = decode(c, &layout);
        let _ = layout.apply(&call);
    }
    let start = layout.clone();
    // The batch is decoded against the layout as each call would find it if all were accepted.
    let mut scratch = start.clone();
    let calls: Vec<SlotCall> = chunks[setup_len..]
        .iter()
        .map(|c| {
            let call = decode(c, &scratch);
            let _ = scratch.apply(&call);
            call
        })
        .collect();
    match layout.apply_batch(&calls) {
        Err(err) => {
            assert_eq!(layout, start, "a refused batch leaves the layout unchanged");
            let mut probe = start.clone();
            for call in &calls[..err.index] {
                probe
                    .apply(call)
                    .expect("calls before the refused one are accepted");
            }
            assert_eq!(probe.apply(&calls[err.index]).unwrap_err(), err.rule);
            let mut again = start.clone();
            assert_eq!(again.holes(&calls).unwrap_err(), err);
            assert_eq!(again, start);
        }
        Ok(done) => {
            let mut one_by_one = start.clone();
            for call in &calls {
                one_by_one.apply(call).expect("accepted one by one");
            }
            assert_eq!(layout, one_by_one);
            let end = layout.clone();
            layout.revert_all(&done);
            assert_eq!(layout, start);
            let report = layout.holes(&calls).expect("valid batch");
            assert_eq!(layout, start, "hole analysis changes nothing");
            let mut now = start.clone();
            for (i, call) in calls.iter().enumerate() {
                now.apply(call).expect("valid");
                for space in 0..2 {
                    for page in 0..GPA_PAGES + 16 {
                        let (o, n, c) = (
                            mapping(&start, space, page),
                            mapping(&end, space, page),
                            mapping(&now, space, page),
                        );
                        let bad = o.is_some() && n.is_some() && c != o && c != n;
                        let reported = report.holes.iter().any(|h| {
                            h.range.address_space == space
                                && (h.opened_by..h.closed_by).contains(&i)
                                && h.range.start <= page * P
                                && page * P < h.range.end
                        });
                        assert_eq!(bad, reported, "call {i} page {page} space {space}");
                    }
                }
            }
        }
    }
}

/// The map JSON reader: never panics; a map it accepts round-trips through `to_json`.
pub fn map_json(data: &[u8]) {
    use memslots::planner::MemoryMap;
    let text = String::from_utf8_lossy(data);
    if let Ok(map) = MemoryMap::from_json(&text, "fuzz.json") {
        let again = MemoryMap::from_json(&map.to_json(), "again.json").expect("own output reads");
        assert_eq!(again, map);
    }
}

/// A small map decoded from bytes: up to 6 regions in 64 pages, over two host runs.
fn decode_map(bytes: &[u8]) -> Option<memslots::planner::MemoryMap> {
    use memslots::planner::{MemoryMap, Region};
    let mut regions = Vec::new();
    let mut at = 0u64;
    for c in bytes.chunks_exact(4).take(6) {
        let gpa = at + u64::from(c[0] % 4) * P;
        let size = (1 + u64::from(c[1] % 12)) * P;
        let run = u64::from(c[2] % 2) * 0x1000_0000;
        let flags = SlotFlags(u32::from(c[3] % 4));
        regions.push(Region {
            address_space: u16::from(c[3] & 0x80 != 0),
            gpa,
            size,
            host: HOST + run + gpa + u64::from(c[2] >> 4) * P,
            flags,
        });
        at = gpa + size;
    }
    MemoryMap::new(regions).ok()
}

/// The planner: any map to any map gives a plan the model accepts, that ends in exactly the
/// target mapping, whose quiesced calls are exactly the model's hole window, and that reuses an
/// id it deletes only when no other id is free, after its DELETE. An odd first byte puts the slot
/// limit at the most slots either map needs, so plans at the limit are covered.
pub fn planner(data: &[u8]) {
    use memslots::planner::{plan, plan_with, CutPolicy, MemoryMap};
    let Some((&mode, data)) = data.split_first() else {
        return;
    };
    let half = data.len() / 2;
    let (Some(a), Some(b)) = (decode_map(&data[..half]), decode_map(&data[half..])) else {
        return;
    };
    let limits = if mode % 2 == 1 {
        // The regions of one space, joined, are the fewest slots a map can have; the minimal
        // policy cuts no more, so both maps fit and the change needs every id re-use allows.
        let most = [&a, &b]
            .iter()
            .flat_map(|m| [m.space(0).len(), m.space(1).len()])
            .max()
            .unwrap_or(1)
            .max(1);
        Limits {
            slots: most as u16,
            ..Limits::default()
        }
    } else {
        Limits::default()
    };
    let plan = |layout: &Layout, map: &MemoryMap| {
        if mode % 2 == 1 {
            plan_with(layout, map, &CutPolicy::minimal())
        } else {
            plan(layout, map)
        }
    };
    let mut layout = Layout::new(limits);
    let first = plan(&layout, &a).expect("a map fits");
    let calls: Vec<SlotCall> = first.calls.iter().map(|c| c.call).collect();
    layout
        .apply_batch(&calls)
        .expect("the model accepts the first plan");
    assert_eq!(MemoryMap::from_layout(&layout), a);
    let second = match plan(&layout, &b) {
        Ok(p) => p,
        // At the limit the planner keeps slots that still map identically and cuts only the
        // rest, which can need more ids than re-cutting everything would; such a refusal must at
        // least count right.
        Err(memslots::planner::PlanError::TooManySlots {
            needed,
            current,
            deleted,
            new,
            limit,
            ..
        }) if mode % 2 == 1 => {
            assert_eq!(needed, current - deleted + new);
            assert!(needed > usize::from(limit));
            return;
        }
        Err(e) => panic!("a map fits: {e}"),
    };
    let calls: Vec<SlotCall> = second.calls.iter().map(|c| c.call).collect();
    let holes = layout.holes(&calls).expect("the model accepts the plan");
    let window = holes.quiesce_window();
    for (i, c) in second.calls.iter().enumerate() {
        assert_eq!(c.quiesced, window.contains(&i), "call {i}: {c:?}");
    }
    let deleted: Vec<u32> = calls
        .iter()
        .filter(|c| c.is_delete())
        .map(|c| c.slot)
        .collect();
    let created: Vec<u32> = calls
        .iter()
        .filter(|c| {
            !c.is_delete()
                && layout
                    .slot(c.id())
                    .is_none_or(|_| deleted.contains(&c.slot))
        })
        .map(|c| c.slot)
        .collect();
    for (i, c) in calls.iter().enumerate() {
        if deleted.contains(&c.slot) && !c.is_delete() {
            // Re-used: only when every id of its space below the limit is taken, and after the
            // DELETE.
            let space = c.id().address_space;
            let free = (0..limits.slots)
                .filter(|&id| layout.slot(SlotId::in_space(space, id)).is_none())
                .filter(|&id| !created.contains(&SlotId::in_space(space, id).raw()))
                .count();
            assert_eq!(free, 0, "id {} reused with a free id left", c.slot);
            let del = calls.iter().position(|d| d.is_delete() && d.slot == c.slot);
            assert!(del.is_some_and(|d| d < i), "create before its delete");
        }
    }
    layout.apply_batch(&calls).expect("valid");
    assert_eq!(MemoryMap::from_layout(&layout), b);
}
