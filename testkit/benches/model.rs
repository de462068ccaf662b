//! Criterion benches of the model at KVM's slot limit: a batch applied and reverted, hole analysis,
//! and a primitive's lowering.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use memslots::model::{Layout, Limits, Primitive, Slot, SlotCall, SlotFlags, SlotId, PAGE_SIZE};

const HOST: u64 = 0x7f00_0000_0000;

fn full_layout() -> (Layout, Vec<Slot>) {
    let limits = Limits::default();
    let mut layout = Layout::new(limits);
    let slots: Vec<Slot> = (0..limits.slots)
        .map(|id| Slot {
            id: SlotId::new(id),
            gpa: u64::from(id) * 4 * PAGE_SIZE,
            size: 2 * PAGE_SIZE,
            host: HOST + u64::from(id) * 2 * PAGE_SIZE,
            flags: SlotFlags::NONE,
            guest_memfd: 0,
            guest_memfd_offset: 0,
        })
        .collect();
    let calls: Vec<SlotCall> = slots.iter().map(Slot::set_call).collect();
    layout.apply_batch(&calls).expect("valid");
    (layout, slots)
}

fn model(c: &mut Criterion) {
    let (mut layout, slots) = full_layout();
    let mixed: Vec<SlotCall> = slots[100..104]
        .iter()
        .flat_map(|s| {
            [
                s.delete_call(),
                Slot {
                    size: PAGE_SIZE,
                    ..*s
                }
                .set_call(),
            ]
        })
        .collect();
    c.bench_function("model_check_8_call_batch_32764", |b| {
        b.iter(|| black_box(layout.check_batch(black_box(&mixed)).expect("valid")))
    });
    c.bench_function("model_holes_8_call_batch_32764", |b| {
        b.iter(|| black_box(layout.holes(black_box(&mixed)).expect("valid")))
    });
    let moves: Vec<SlotCall> = slots
        .iter()
        .map(|s| {
            Slot {
                gpa: s.gpa + 2 * PAGE_SIZE,
                ..*s
            }
            .set_call()
        })
        .collect();
    c.bench_function("model_check_32764_moves", |b| {
        b.iter(|| black_box(layout.check_batch(black_box(&moves)).expect("valid")))
    });
    let split = Primitive::Split {
        id: SlotId::new(5000),
        at: slots[5000].gpa + PAGE_SIZE,
        new_id: SlotId::in_space(0, Limits::default().slots - 1),
    };
    let mut layout_one_free = layout.clone();
    layout_one_free
        .apply(&slots[usize::from(Limits::default().slots - 1)].delete_call())
        .expect("valid");
    c.bench_function("model_lower_split_32764", |b| {
        b.iter(|| black_box(layout_one_free.lower(black_box(&split)).expect("valid")))
    });
    c.bench_function("model_translate_32764", |b| {
        let mut gpa = 0u64;
        b.iter(|| {
            gpa = (gpa + 0x9_1000) % (u64::from(Limits::default().slots) * 4 * PAGE_SIZE);
            black_box(layout.translate(0, black_box(gpa)))
        })
    });
}

criterion_group!(benches, model);
criterion_main!(benches);
