//! Every commit of every committed QEMU trace run three ways on the soft backend: QEMU's calls one
//! by one, the commit as one batch through the atomic list algorithm, and native primitives.

use std::path::PathBuf;

use memslots::model::{Batch, Layout, Limits, PAGE_SIZE};
use memslots::soft::SoftMemory;
use memslots_testkit::soft::compare::CompareOptions;
use memslots_testkit::soft::{compare_commit, compare_trace, native_steps, NativeStep, WayReport};
use memslots_testkit::trace::Trace;

fn traces() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/data/traces");
    let mut out: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("traces directory")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    out.sort();
    assert!(!out.is_empty());
    out
}

fn add(total: &mut WayReport, w: &WayReport) {
    total.add(w);
}

#[test]
fn every_trace_commit_three_ways() {
    let options = CompareOptions {
        readers: 0,
        prefault_pages: 1 << 12,
    };
    for path in traces() {
        let trace = Trace::from_file(&path).unwrap();
        let mut layout = Layout::new(Limits::default());
        let (mut q, mut p, mut n) = Default::default();
        for range in trace.commits() {
            let calls: Vec<_> = trace.calls[range]
                .iter()
                .filter(|c| c.accepted())
                .map(|c| c.call)
                .collect();
            let planned = Batch::from(calls.clone());
            let cmp = compare_commit(&layout, &calls, &planned, &options).unwrap();
            assert!(cmp.planned_matches && cmp.native_matches, "{path:?}");
            // Without readers nothing can RETRY. One batch zaps what QEMU's calls zap, or less
            // (dirty logging switched on and off again inside a commit write-protects nothing).
            assert_eq!(
                (cmp.qemu.retries, cmp.planned.retries, cmp.native.retries),
                (0, 0, 0)
            );
            assert!(
                cmp.planned.zapped_pages <= cmp.qemu.zapped_pages,
                "{path:?}"
            );
            assert!(
                cmp.native.zapped_pages <= cmp.qemu.zapped_pages,
                "{path:?} {cmp:?}"
            );
            add(&mut q, &cmp.qemu);
            add(&mut p, &cmp.planned);
            add(&mut n, &cmp.native);
            layout.apply_batch(&calls).unwrap();
        }
        let summed = compare_trace(
            &trace,
            Limits::default(),
            |_, calls| Batch::from(calls.to_vec()),
            &options,
        )
        .unwrap();
        assert_eq!(
            (summed.qemu, summed.planned, summed.native),
            (q, p, n),
            "{path:?}"
        );
        assert!(summed.planned_matches && summed.native_matches);
        eprintln!(
            "{}: zapped qemu {} planned {} native {}; publishes {} {} {}",
            path.file_name().unwrap().to_string_lossy(),
            q.zapped_pages,
            p.zapped_pages,
            n.zapped_pages,
            q.publishes,
            p.publishes,
            n.publishes
        );
    }
}

#[test]
fn readers_retry_only_where_slots_are_invalid() {
    // A PAM-like commit: RAM [0, 1 MiB) cut around a 128 KiB overlay, run with two readers.
    let trace = Trace::from_file(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/data/traces/pc-512m-std.log"),
    )
    .unwrap();
    let options = CompareOptions {
        readers: 2,
        prefault_pages: 1 << 12,
    };
    let mut layout = Layout::new(Limits::default());
    let (mut q, mut p, mut n) = (
        WayReport::default(),
        WayReport::default(),
        WayReport::default(),
    );
    for range in trace.commits() {
        let calls: Vec<_> = trace.calls[range].iter().map(|c| c.call).collect();
        let cmp = compare_commit(&layout, &calls, &Batch::from(calls.clone()), &options).unwrap();
        assert!(cmp.planned_matches && cmp.native_matches);
        add(&mut q, &cmp.qemu);
        add(&mut p, &cmp.planned);
        add(&mut n, &cmp.native);
        // RETRY needs an invalid slot; the native way has none unless it fell back to a batch.
        if cmp
            .native_steps
            .iter()
            .all(|s| matches!(s, NativeStep::Primitive(_)))
        {
            assert_eq!(cmp.native.retries, 0);
        }
        if cmp.planned.invalidated == 0 {
            assert_eq!(cmp.planned.retries, 0);
        }
        layout.apply_batch(&calls).unwrap();
    }
    eprintln!(
        "pc-512m-std.log, 2 readers: retries qemu {} planned {} native {}; spurious MMIO {} {} {}; \
         zapped {} {} {}",
        q.retries,
        p.retries,
        n.retries,
        q.spurious_mmio,
        p.spurious_mmio,
        n.spurious_mmio,
        q.zapped_pages,
        p.zapped_pages,
        n.zapped_pages
    );
    // One batch through the list algorithm never opens a hole, nor do the native steps.
    assert_eq!((p.spurious_mmio, n.spurious_mmio), (0, 0));
}

#[test]
fn pam_split_lowers_to_split_and_shrink() {
    use memslots::model::{Slot, SlotFlags, SlotId};
    let host = 0x7f00_0000_0000;
    let ram = Slot {
        id: SlotId::new(0),
        gpa: 0,
        size: 256 * PAGE_SIZE,
        host,
        flags: SlotFlags::NONE,
        guest_memfd: 0,
        guest_memfd_offset: 0,
    };
    let mut before = Layout::new(Limits::default());
    before.apply(&ram.set_call()).unwrap();
    // After: [0, 160) RAM, [160, 192) MMIO (VGA window), [192, 256) read-only (shadowed BIOS).
    let low = Slot {
        size: 160 * PAGE_SIZE,
        ..ram
    };
    let rom = Slot {
        id: SlotId::new(1),
        gpa: 192 * PAGE_SIZE,
        size: 64 * PAGE_SIZE,
        host: host + 192 * PAGE_SIZE,
        flags: SlotFlags::READONLY,
        guest_memfd: 0,
        guest_memfd_offset: 0,
    };
    let qemu = [ram.delete_call(), low.set_call(), rom.set_call()];
    let mut after = before.clone();
    after.apply_batch(&qemu).unwrap();
    let steps = native_steps(&before, &after);
    assert!(
        steps.iter().all(|s| matches!(s, NativeStep::Primitive(_))),
        "{steps:?}"
    );
    let options = CompareOptions {
        readers: 0,
        prefault_pages: 1 << 12,
    };
    let cmp = compare_commit(&before, &qemu, &Batch::from(qemu.to_vec()), &options).unwrap();
    assert!(cmp.native_matches);
    // QEMU's calls zap all 256 pages; natively only the cut window and the write-protected ROM.
    assert_eq!(cmp.qemu.zapped_pages, 256);
    assert_eq!(cmp.native.zapped_pages, 32 + 64);
    assert_eq!(cmp.native.invalidated, 0);
    let mut m = SoftMemory::with_layout(before.clone());
    for s in &steps {
        if let NativeStep::Primitive(p) = s {
            m.apply_primitive(p).unwrap();
        }
    }
    assert_eq!(m.layout(), &after);
}

/// With the planner's batch (which keeps slot ids where the mapping stays), the native primitives
/// zap at most what that batch zaps, and the batch at most what QEMU's calls zap: the order the
/// proposal claims, on every committed trace.
#[test]
fn with_the_planner_primitives_zap_least() {
    use memslots::planner::{plan, MemoryMap};
    let options = CompareOptions {
        readers: 0,
        prefault_pages: 1 << 12,
    };
    for path in traces() {
        let trace = Trace::from_file(&path).unwrap();
        let summed = compare_trace(
            &trace,
            Limits::default(),
            |layout, calls| {
                let mut after = layout.clone();
                after.apply_batch(calls).unwrap();
                plan(layout, &MemoryMap::from_layout(&after))
                    .unwrap()
                    .batch()
            },
            &options,
        )
        .unwrap();
        assert!(summed.planned_matches && summed.native_matches, "{path:?}");
        let (q, p, n) = (
            summed.qemu.zapped_pages,
            summed.planned.zapped_pages,
            summed.native.zapped_pages,
        );
        assert!(
            n <= p && p <= q,
            "{path:?}: qemu {q} planned {p} native {n}"
        );
        eprintln!(
            "{}: zapped qemu {q} planned {p} native {n}",
            path.file_name().unwrap().to_string_lossy()
        );
    }
}
