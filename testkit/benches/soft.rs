//! Criterion benches of the soft backend at 32,764 slots: `translate` (quiet), a one-MOVE batch and
//! a mixed 8-call batch through the atomic list algorithm.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use memslots::model::{Limits, Slot, SlotCall, PAGE_SIZE};
use memslots::soft::SoftMemory;
use memslots_testkit::samples::{self, dense_slot as slot};

fn full() -> SoftMemory {
    SoftMemory::with_layout(samples::dense_layout(Limits::default()))
}

fn soft(c: &mut Criterion) {
    let n = u64::from(Limits::default().slots);
    let mut m = full();
    let mut reader = m.reader();
    c.bench_function("soft_translate_32764", |b| {
        let mut k = 0u64;
        b.iter(|| {
            k = k.wrapping_add(0x9E37_79B9);
            let gpa = (k % n) * 4 * PAGE_SIZE + 0x10;
            black_box(reader.translate(black_box(gpa)))
        })
    });
    drop(reader);
    let moved = slot(1000);
    let there = Slot {
        gpa: moved.gpa + 2 * PAGE_SIZE,
        ..moved
    };
    let mut flip = false;
    c.bench_function("soft_move_batch_32764", |b| {
        b.iter(|| {
            flip = !flip;
            let to = if flip { there } else { moved };
            black_box(m.apply_batch(&[to.set_call()]).expect("valid"))
        })
    });
    let mut shrunk = false;
    c.bench_function("soft_mixed_8_call_batch_32764", |b| {
        b.iter(|| {
            let calls: Vec<SlotCall> = (2000..2004)
                .flat_map(|i| {
                    let big = slot(i);
                    let small = Slot {
                        size: PAGE_SIZE,
                        ..big
                    };
                    let (old, new) = if shrunk { (small, big) } else { (big, small) };
                    [old.delete_call(), new.set_call()]
                })
                .collect();
            shrunk = !shrunk;
            black_box(m.apply_batch(&calls).expect("valid"))
        })
    });
}

criterion_group!(benches, soft);
criterion_main!(benches);
