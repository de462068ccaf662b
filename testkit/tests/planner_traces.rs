//! Every committed QEMU trace replayed through the planner, against the floors.

use memslots::model::{Layout, Limits};
use memslots::planner::{CutPolicy, MemoryMap};
use memslots_testkit::replay::replay;
use memslots_testkit::trace::Trace;

mod support;
use support::{dirty_log_traces, smm_traces, traces};

#[test]
fn every_trace_meets_the_floors() {
    let mut failures = Vec::new();
    let all = traces();
    assert!(!all.is_empty(), "no traces");
    for path in all
        .into_iter()
        .chain(smm_traces())
        .chain(dirty_log_traces())
    {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let trace = Trace::from_file(&path).unwrap();
        let run = replay(&trace, Limits::default(), &CutPolicy::default())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        // Each plan, from the layout before it, is accepted call by call, leaves no hole outside
        // its quiesced calls, and ends in the trace's mapping.
        let mut layout = Layout::new(Limits::default());
        for c in &run.commits {
            let calls = c.plan.slot_calls();
            let holes = layout
                .holes(&calls)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let window = holes.quiesce_window();
            for (i, pc) in c.plan.calls.iter().enumerate() {
                assert_eq!(
                    pc.quiesced,
                    window.contains(&i),
                    "{name} line {}: call {i} quiesced flag vs window {window:?}",
                    c.commit.last_line
                );
            }
            for h in &holes.holes {
                assert!(window.contains(&h.opened_by) && window.contains(&h.closed_by));
            }
            let mut scratch = layout.clone();
            for pc in &c.plan.calls {
                let applied = scratch.apply(&pc.call).unwrap();
                assert_eq!(
                    pc.drops_dirty_bitmap,
                    applied.drops_dirty_bitmap(),
                    "{name}"
                );
            }
            layout
                .apply_batch(&calls)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(MemoryMap::from_layout(&layout), c.commit.target, "{name}");
        }
        let t = run.totals();
        eprintln!(
            "{name}: ioctls {} (qemu {}), quiesced {} (qemu inhibited {}), zapped {:#x} (qemu {:#x})",
            t.ioctls,
            t.qemu.ioctls,
            t.quiesced_ioctls,
            t.qemu.inhibited_ioctls,
            t.zapped_bytes,
            t.qemu.zapped_bytes
        );
        if 2 * t.quiesced_ioctls > t.qemu.inhibited_ioctls {
            failures.push(format!(
                "{name}: quiesced {} > half of {}",
                t.quiesced_ioctls, t.qemu.inhibited_ioctls
            ));
        }
        if 1000 * t.zapped_bytes > t.qemu.zapped_bytes {
            failures.push(format!(
                "{name}: zapped {:#x} > 0.1% of {:#x}",
                t.zapped_bytes, t.qemu.zapped_bytes
            ));
        }
        if 5 * t.ioctls > 6 * t.qemu.ioctls {
            failures.push(format!(
                "{name}: ioctls {} > 1.2 x {}",
                t.ioctls, t.qemu.ioctls
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn smm_traces_plan_both_address_spaces() {
    for path in smm_traces() {
        let trace = Trace::from_file(&path).unwrap();
        let run = replay(&trace, Limits::default(), &CutPolicy::default()).unwrap();
        assert!(
            run.layout.slots().any(|s| s.id.address_space == 1),
            "{}: no SMM slot planned",
            path.display()
        );
    }
}
