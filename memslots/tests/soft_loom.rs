//! Exhaustive model check (loom) of the soft backend's publish / grace period / reclaim protocol.
//!
//! Run with `RUSTFLAGS="--cfg loom" cargo test -p memslots --test soft_loom --release`.
//! loom's `UnsafeCell` records every access to the two copies: if the writer could change or free
//! (reclaim) a copy while a reader is still inside it, loom reports the race in some interleaving.
#![cfg(loom)]

use loom::sync::atomic::{AtomicBool, Ordering};
use loom::sync::Arc;
use loom::thread;
use memslots::soft::rcu::Publisher;

/// loom's exhaustive search, bounded to `LOOM_MAX_PREEMPTIONS` preemptions (default 3, which
/// covers the known bugs of this kind of protocol and finishes in seconds).
fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(3);
    }
    builder.check(f);
}

/// The writer changes the inactive copy, publishes, then reclaims the old copy (replays the change
/// on it, dropping its old allocation). A concurrent reader sees the old or the new value, whole;
/// a read that starts after `publish` returned sees the new one.
#[test]
fn publish_grace_period_reclaim() {
    model(|| {
        let mut publisher = Publisher::new(vec![1u64, 1], vec![1u64, 1]);
        let mut reader = publisher.reader();
        let published = Arc::new(AtomicBool::new(false));
        let seen = published.clone();
        let t = thread::spawn(move || {
            for _ in 0..2 {
                let after = seen.load(Ordering::Acquire);
                let v = reader.read(|v| v.clone());
                assert!(v == [1, 1] || v == [2, 2], "torn or reclaimed: {v:?}");
                if after {
                    assert_eq!(v, [2, 2], "a read after publish returned saw the old copy");
                }
            }
        });
        publisher.with_inactive(|v| *v = vec![2, 2]);
        publisher.publish();
        published.store(true, Ordering::Release);
        // Reclaim: the old copy is ours again; replace (and so free) its contents.
        publisher.with_inactive(|v| *v = vec![2, 2]);
        t.join().unwrap();
    });
}

/// Two readers and two publishes in a row: the copy a reader may still be in is never the one
/// being written, across the swap back.
#[test]
fn two_readers_two_publishes() {
    model(|| {
        let mut publisher = Publisher::new(0u64, 0u64);
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let mut reader = publisher.reader();
                thread::spawn(move || {
                    let a = reader.read(|v| *v);
                    let b = reader.read(|v| *v);
                    assert!(a <= b, "went back in time: {a} then {b}");
                })
            })
            .collect();
        for value in 1..=2 {
            publisher.with_inactive(|v| *v = value);
            publisher.publish();
            publisher.with_inactive(|v| *v = value);
        }
        for t in threads {
            t.join().unwrap();
        }
    });
}

/// A reader handle dropped while the writer waits for a grace period does not block it, and one
/// registered during it is not waited for wrongly.
#[test]
fn readers_come_and_go() {
    model(|| {
        let mut publisher = Publisher::new(0u64, 0u64);
        let mut reader = publisher.reader();
        let t = thread::spawn(move || {
            let v = reader.read(|v| *v);
            assert!(v <= 1);
            drop(reader);
        });
        publisher.with_inactive(|v| *v = 1);
        publisher.publish();
        publisher.with_inactive(|v| *v = 1);
        let mut late = publisher.reader();
        assert_eq!(late.read(|v| *v), 1);
        t.join().unwrap();
        drop(late);
        assert_eq!(publisher.readers(), 0);
    });
}
