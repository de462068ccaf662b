//! Criterion benches of the planner: a 32,764-slot change planned, and every committed QEMU trace
//! replayed through it.

use std::hint::black_box;
use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion};
use memslots::model::{Layout, Limits};
use memslots::planner::{plan, plan_with, CutPolicy};
use memslots_testkit::replay::replay;
use memslots_testkit::samples;
use memslots_testkit::trace::Trace;

fn planner(c: &mut Criterion) {
    let n = u64::from(Limits::default().slots);
    let full = samples::planner_grid(n).expect("valid map");
    let empty = Layout::new(Limits::default());
    c.bench_function("plan_empty_to_32764", |b| {
        b.iter(|| black_box(plan_with(&empty, black_box(&full), &CutPolicy::x86_pc())))
    });
    let mut layout = empty.clone();
    let boot = plan_with(&layout, &full, &CutPolicy::x86_pc()).expect("plans");
    layout.apply_batch(&boot.slot_calls()).expect("valid");
    // A quarter deleted, a quarter to dirty logging, a quarter moved, a quarter kept.
    let target = samples::planner_change(n).expect("valid map");
    c.bench_function("plan_32764", |b| {
        b.iter(|| black_box(plan(&layout, black_box(&target)).expect("plans")))
    });

    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/traces");
    for path in Trace::files_in(&dir).unwrap_or_default() {
        let trace = Trace::from_file(&path).expect("committed traces parse");
        let name = path.file_stem().expect("a file").to_string_lossy();
        c.bench_function(&format!("plan_trace_{name}"), |b| {
            b.iter(|| {
                black_box(replay(&trace, Limits::default(), &CutPolicy::default()).expect("plans"))
            })
        });
    }
}

criterion_group!(benches, planner);
criterion_main!(benches);
