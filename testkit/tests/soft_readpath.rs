//! A quick measurement, not a test of speed (nothing is asserted about time): the read side of the
//! soft backend's own two-copy epoch scheme against `arc-swap`, with and without a writer
//! publishing at the same time, and what one publish costs the writer in each.
//!
//! Run once in release: `cargo test -p memslots --release --test soft_readpath -- --ignored
//! --nocapture`. The figures go into `src/soft/DESIGN-notes.md`.

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use memslots::model::{Slot, SlotFlags, SlotId, PAGE_SIZE};
use memslots::soft::rcu::Publisher;
use memslots::soft::set::{SetOp, Slots, SoftSlot};

/// 64 slots of 16 pages, QEMU-like counts.
fn slots() -> Slots {
    let mut s = Slots::new(2);
    for i in 0..64u16 {
        s.apply(&SetOp::Insert(SoftSlot::valid(Slot {
            id: SlotId::new(i),
            gpa: u64::from(i) * 32 * PAGE_SIZE,
            size: 16 * PAGE_SIZE,
            host: 0x7f00_0000_0000 + u64::from(i) * 16 * PAGE_SIZE,
            flags: SlotFlags::NONE,
            guest_memfd: 0,
            guest_memfd_offset: 0,
        })));
    }
    s
}

const READS: u64 = 2_000_000;

fn gpa(i: u64) -> u64 {
    (i.wrapping_mul(0x9E37_79B9) % (64 * 32)) * PAGE_SIZE
}

fn per_op(d: Duration, n: u64) -> f64 {
    d.as_nanos() as f64 / n as f64
}

#[test]
#[ignore]
fn compare_read_paths() {
    // Own scheme, no writer.
    let mut publisher = Publisher::new(slots(), slots());
    let mut reader = publisher.reader();
    let t = Instant::now();
    for i in 0..READS {
        black_box(reader.read(|s| s.find(0, gpa(i)).map(|s| s.slot.host)));
    }
    let own_quiet = per_op(t.elapsed(), READS);

    // arc-swap, no writer.
    let swap = Arc::new(ArcSwap::from_pointee(slots()));
    let t = Instant::now();
    for i in 0..READS {
        black_box(swap.load().find(0, gpa(i)).map(|s| s.slot.host));
    }
    let arc_quiet = per_op(t.elapsed(), READS);

    // Own scheme, a writer publishing all the time (one change replayed per publish).
    let stop = AtomicBool::new(false);
    let (own_busy, own_publish) = std::thread::scope(|scope| {
        let stop = &stop;
        let reads = scope.spawn(move || {
            let t = Instant::now();
            for i in 0..READS {
                black_box(reader.read(|s| s.find(0, gpa(i)).map(|s| s.slot.host)));
            }
            let d = per_op(t.elapsed(), READS);
            stop.store(true, Ordering::Relaxed);
            d
        });
        let extra = SoftSlot::valid(Slot {
            id: SlotId::new(100),
            gpa: 0x1_0000_0000,
            size: PAGE_SIZE,
            host: 0x7f10_0000_0000,
            flags: SlotFlags::NONE,
            guest_memfd: 0,
            guest_memfd_offset: 0,
        });
        let (mut n, t) = (0u64, Instant::now());
        let mut op = SetOp::Insert(extra);
        while !stop.load(Ordering::Relaxed) {
            publisher.with_inactive(|s| s.apply(&op));
            publisher.publish();
            publisher.with_inactive(|s| s.apply(&op));
            op = op.inverse();
            n += 1;
        }
        (reads.join().unwrap(), per_op(t.elapsed(), n.max(1)))
    });

    // arc-swap, a writer publishing all the time (a copy of the whole set per publish: arc-swap
    // gives no way to learn when the old copy is free to be changed in place).
    stop.store(false, Ordering::Relaxed);
    let (arc_busy, arc_publish) = std::thread::scope(|scope| {
        let stop = &stop;
        let swap2 = swap.clone();
        let reads = scope.spawn(move || {
            let t = Instant::now();
            for i in 0..READS {
                black_box(swap2.load().find(0, gpa(i)).map(|s| s.slot.host));
            }
            let d = per_op(t.elapsed(), READS);
            stop.store(true, Ordering::Relaxed);
            d
        });
        let (mut n, t) = (0u64, Instant::now());
        while !stop.load(Ordering::Relaxed) {
            let mut next = Slots::clone(&swap.load());
            next.generation += 1;
            swap.store(Arc::new(next));
            n += 1;
        }
        (reads.join().unwrap(), per_op(t.elapsed(), n.max(1)))
    });

    eprintln!(
        "read ns/op: own {own_quiet:.1} quiet, {own_busy:.1} with writer; \
         arc-swap {arc_quiet:.1} quiet, {arc_busy:.1} with writer"
    );
    eprintln!(
        "publish ns: own {own_publish:.0} (swap + grace period + replay of one op); \
         arc-swap {arc_publish:.0} (clone of 64 slots + store)"
    );
}
