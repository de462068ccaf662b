//! `memslots stress --backend soft`: a workload's updates applied to [`SoftMemory`] while reader
//! threads, standing in for vCPUs, read the workload's pages through the SPTE cache and check
//! every answer against the layouts before and after the batch in flight.
//!
//! Strategies map onto the soft writer as follows:
//! - `atomic`: each update is one batch through the proposal's atomic list algorithm;
//! - `naive`: each call of the update is its own one-call batch, readers running throughout;
//! - `qemu`: the net change as QEMU 8.0 issues it (all DELETEs, then flag changes, then CREATEs),
//!   each call its own one-call batch; when a deleted range overlaps a created one every reader
//!   is held out (parked) for the whole update, as QEMU's `inhibit` does with vCPUs.

use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::conformance::SplitMix64;
use crate::stats::{Micros, Samples};
use crate::strategy::Strategy;
use crate::stress::{StressConfig, StressReport, ARENA_GPA};
use crate::workload::{Arena, Workload};
use memslots::model::{Layout, Limits, SlotCall};
use memslots::soft::spte::SpteCounters;
use memslots::soft::Access;
use memslots::soft::{SoftError, SoftMemory};

/// Host address the soft arena pretends to live at (the soft backend maps no memory).
pub const ARENA_HOST: u64 = 0x7f00_0000_0000;

/// Expected-host value of a GPA that no slot maps.
const UNMAPPED: u64 = u64::MAX;

/// Batches whose expectations readers may still be reading (a ring, indexed by batch number).
const RING: usize = 4;

/// Why a soft stress run could not run.
#[derive(Debug, thiserror::Error)]
pub enum SoftStressError {
    /// Neither a count nor a duration.
    #[error("a stress run needs --updates or --duration")]
    Unbounded,
    /// A workload update the model refuses: a bug in the workload.
    #[error("workload update refused")]
    Workload(#[source] memslots::model::PrimitiveError),
    /// The soft writer refused a batch the model accepted (a bug in the soft backend).
    #[error("the soft backend refused an update")]
    Soft(#[source] SoftError),
    /// Injected failures are only meaningful where a batch is all-or-nothing.
    #[error("--inject-faults on the soft backend needs --strategy atomic (one-call batches cannot roll back a half-applied update)")]
    InjectNeedsAtomic,
    /// No reader thread.
    #[error("a soft stress run needs at least one reader thread (--vcpus)")]
    NoReaders,
}

/// A soft stress run's summary and the SPTE model's counters.
#[derive(Clone, Debug)]
pub struct SoftStressReport {
    /// The issue-5 summary (`backend: "soft"`).
    pub report: StressReport,
    /// Faults, zapped SPTEs and RETRYs over the run.
    pub spte: SpteCounters,
    /// Answers not checked because more than one batch ran during the access.
    pub unchecked: u64,
}

/// State shared by the writer and the reader threads.
struct Shared {
    stop: AtomicBool,
    /// 2k: settled before batch k; 2k+1: batch k in flight.
    seq: AtomicU64,
    /// Readers must park (QEMU's inhibit).
    hold: AtomicBool,
    parked: AtomicUsize,
    /// Readers that have made their first access: the writer starts once all have, so that a
    /// short run on a loaded machine is not over before any reader ran.
    ready: AtomicUsize,
    /// Per ring entry, per probe: expected host before and after the batch.
    expect: Vec<Vec<(AtomicU64, AtomicU64)>>,
    accesses: AtomicU64,
    spurious: AtomicU64,
    data_errors: AtomicU64,
    unchecked: AtomicU64,
    first_problem: std::sync::Mutex<Option<String>>,
}

fn host_at(layout: &Layout, space: u16, gpa: u64) -> u64 {
    layout.find(space, gpa).map_or(UNMAPPED, |s| s.host_of(gpa))
}

pub use crate::qemu::inhibits_calls as qemu_inhibits;

/// One reader thread: reads probe pages round-robin until told to stop.
fn read_loop(
    mut reader: memslots::soft::Reader,
    shared: &Shared,
    probes: &[(u16, u64)],
    start: usize,
) {
    let n = probes.len();
    let mut i = start;
    let (mut accesses, mut spurious, mut data, mut unchecked) = (0u64, 0u64, 0u64, 0u64);
    while !shared.stop.load(Ordering::Relaxed) {
        if shared.hold.load(Ordering::Acquire) {
            shared.parked.fetch_add(1, Ordering::AcqRel);
            while shared.hold.load(Ordering::Acquire) && !shared.stop.load(Ordering::Relaxed) {
                std::hint::spin_loop();
                std::thread::yield_now();
            }
            shared.parked.fetch_sub(1, Ordering::AcqRel);
            continue;
        }
        let p = i % n;
        let (space, gpa) = probes[p];
        let s1 = shared.seq.load(Ordering::Acquire);
        let answer = reader.access_in(space, gpa, false);
        let k = s1 / 2;
        let (b, a) = &shared.expect[(k as usize) % RING][p];
        let (before, after) = (b.load(Ordering::Acquire), a.load(Ordering::Acquire));
        fence(Ordering::SeqCst);
        let s2 = shared.seq.load(Ordering::Acquire);
        accesses += 1;
        if accesses == 1 {
            shared.ready.fetch_add(1, Ordering::AcqRel);
        }
        if accesses % 4096 == 0 {
            // Readers outnumber cores on small machines; let the writer run (a vCPU thread is
            // preempted at ticks the same way).
            std::thread::yield_now();
        }
        if answer == Access::Retry {
            // A vCPU retries the same fault.
            continue;
        }
        i += 1;
        if s2 > 2 * k + 2 {
            // Batches k and k+1 both ran during the access: no single before/after to hold
            // the answer to.
            unchecked += 1;
            continue;
        }
        let problem = match answer {
            Access::Mmio if before != UNMAPPED && after != UNMAPPED => {
                spurious += 1;
                Some(format!(
                    "MMIO at GPA {gpa:#x} during batch {k}, RAM before and after"
                ))
            }
            Access::Ram { host, .. } if host != before && host != after => {
                data += 1;
                Some(format!(
                    "GPA {gpa:#x} read host {host:#x} during batch {k}; expected {before:#x} or {after:#x}"
                ))
            }
            _ => None,
        };
        if let Some(p) = problem {
            let mut first = shared
                .first_problem
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            first.get_or_insert(p);
        }
    }
    shared.accesses.fetch_add(accesses, Ordering::Relaxed);
    shared.spurious.fetch_add(spurious, Ordering::Relaxed);
    shared.data_errors.fetch_add(data, Ordering::Relaxed);
    shared.unchecked.fetch_add(unchecked, Ordering::Relaxed);
}

/// Runs a stress test on the soft backend: `config.vcpus` reader threads, the workload's updates
/// applied with `config.strategy` (see the module doc); `progress(done, total)` after every
/// update. `internal_errors` and `lost_dirty_pages` are always 0: the soft backend has no guest
/// to crash and no dirty log.
pub fn run(
    config: &StressConfig,
    mut progress: impl FnMut(u64, Option<u64>),
) -> Result<SoftStressReport, SoftStressError> {
    if config.updates.is_none() && config.duration.is_none() {
        return Err(SoftStressError::Unbounded);
    }
    if config.vcpus == 0 {
        return Err(SoftStressError::NoReaders);
    }
    if config.inject_faults.is_some() && config.strategy != Strategy::Atomic {
        return Err(SoftStressError::InjectNeedsAtomic);
    }
    let rss_kib_start = crate::stress::peak_rss_kib();
    let kind = config.workload;
    let arena = Arena {
        gpa: ARENA_GPA,
        host: ARENA_HOST,
        size: kind.arena_size(),
        address_space: 0,
        first_id: 1,
    };
    let mut workload = Workload::new(kind, arena, config.seed);
    let mut initial = Layout::new(Limits::default());
    let creates: Vec<SlotCall> = workload
        .initial_slots()
        .iter()
        .map(|s| s.set_call())
        .collect();
    initial
        .apply_batch(&creates)
        .map_err(|e| SoftStressError::Soft(SoftError::Refused(e)))?;
    let probes: Vec<(u16, u64)> = workload
        .probe_pages()
        .into_iter()
        .map(|(gpa, _)| (arena.address_space, gpa))
        .collect();
    let mut memory = SoftMemory::with_layout(initial);
    let shared = Shared {
        stop: AtomicBool::new(false),
        seq: AtomicU64::new(0),
        hold: AtomicBool::new(false),
        parked: AtomicUsize::new(0),
        ready: AtomicUsize::new(0),
        expect: (0..RING)
            .map(|_| {
                probes
                    .iter()
                    .map(|_| (AtomicU64::new(UNMAPPED), AtomicU64::new(UNMAPPED)))
                    .collect()
            })
            .collect(),
        accesses: AtomicU64::new(0),
        spurious: AtomicU64::new(0),
        data_errors: AtomicU64::new(0),
        unchecked: AtomicU64::new(0),
        first_problem: std::sync::Mutex::new(None),
    };
    let set_expect = |k: u64, before: &Layout, after: &Layout| {
        for (p, &(space, gpa)) in probes.iter().enumerate() {
            let (b, a) = &shared.expect[(k as usize) % RING][p];
            b.store(host_at(before, space, gpa), Ordering::Release);
            a.store(host_at(after, space, gpa), Ordering::Release);
        }
    };
    // Batch 0's "before" is the settled initial layout.
    set_expect(0, memory.layout(), memory.layout());
    let mut faults = config
        .inject_faults
        .map(|p| (p, SplitMix64::new(config.seed ^ 0xfa17)));
    let counters_start = memory.counters();

    let (mut updates, mut rollbacks, mut ioctls) = (0u64, 0u64, 0u64);
    let mut blackout = Samples::new();
    let mut update_us = Samples::new();
    let result: Result<(), SoftStressError> = std::thread::scope(|scope| {
        for r in 0..config.vcpus {
            let reader = memory.reader();
            let (shared, probes) = (&shared, &probes);
            let start = r * probes.len() / config.vcpus;
            scope.spawn(move || read_loop(reader, shared, probes, start));
        }
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        while shared.ready.load(Ordering::Acquire) < config.vcpus && Instant::now() < deadline {
            std::thread::yield_now();
        }
        let started = Instant::now();
        let mut k = 0u64;
        let outcome = loop {
            if config.updates.is_some_and(|n| updates >= n)
                || config.duration.is_some_and(|d| started.elapsed() >= d)
            {
                break Ok(());
            }
            let before = memory.layout().clone();
            let mut scratch = before.clone();
            let update = match workload.next(&mut scratch) {
                Ok(u) => u,
                Err(e) => break Err(SoftStressError::Workload(e)),
            };
            let calls: Vec<SlotCall> = match config.strategy {
                Strategy::Qemu => {
                    let mut after = before.clone();
                    if let Err(e) = after.apply_batch(update.batch.calls()) {
                        break Err(SoftStressError::Soft(SoftError::Refused(e)));
                    }
                    crate::qemu::batch(&before, &after)
                }
                _ => update.batch.calls().to_vec(),
            };
            let mut after = before.clone();
            if let Err(e) = after.apply_batch(&calls) {
                break Err(SoftStressError::Soft(SoftError::Refused(e)));
            }
            // An injected failure must leave the batch invisible: readers hold it to `before`.
            let fail_at = faults.as_mut().and_then(|(p, rng)| {
                let draw = rng.next_u64() as f64 / u64::MAX as f64;
                (draw < *p && !calls.is_empty()).then(|| rng.below(calls.len() as u64) as usize)
            });
            set_expect(k, &before, if fail_at.is_some() { &before } else { &after });
            shared.seq.store(2 * k + 1, Ordering::Release);

            let t0 = Instant::now();
            let applied = match config.strategy {
                Strategy::Atomic => {
                    memory.fail_call(fail_at);
                    ioctls += 1;
                    let r = memory.apply_batch(&calls).map(drop);
                    memory.fail_call(None);
                    r
                }
                Strategy::Naive => one_call_batches(&mut memory, &calls, &mut ioctls),
                Strategy::Qemu => {
                    if qemu_inhibits(&before, &calls) {
                        let held = Instant::now();
                        shared.hold.store(true, Ordering::Release);
                        while shared.parked.load(Ordering::Acquire) < config.vcpus {
                            std::thread::yield_now();
                        }
                        let r = one_call_batches(&mut memory, &calls, &mut ioctls);
                        shared.hold.store(false, Ordering::Release);
                        blackout.push(held.elapsed().as_secs_f64() * 1e6);
                        r
                    } else {
                        one_call_batches(&mut memory, &calls, &mut ioctls)
                    }
                }
            };
            let elapsed = t0.elapsed().as_secs_f64() * 1e6;
            match applied {
                Ok(()) => updates += 1,
                Err(SoftError::Injected { .. }) => rollbacks += 1,
                Err(e) => break Err(SoftStressError::Soft(e)),
            }
            if blackout.count() < updates + rollbacks {
                blackout.push(0.0);
            }
            update_us.push(elapsed);
            // Batch k+1's "before" is what is published now.
            set_expect(k + 1, memory.layout(), memory.layout());
            shared.seq.store(2 * k + 2, Ordering::Release);
            k += 1;
            progress(updates, config.updates);
            // Let the readers run over the settled layout before the next change.
            std::thread::sleep(Duration::from_micros(200));
        };
        shared.stop.store(true, Ordering::Relaxed);
        shared.hold.store(false, Ordering::Release);
        outcome
    });
    result?;
    let end = memory.counters();
    let spte = SpteCounters {
        faults: end.faults - counters_start.faults,
        zapped: end.zapped - counters_start.zapped,
        retries: end.retries - counters_start.retries,
    };
    let report = StressReport {
        backend: "soft",
        trigger: "host",
        strategy: config.strategy.name(),
        workload: kind.name().to_owned(),
        vcpus: config.vcpus,
        updates,
        ioctls,
        guest_accesses: shared.accesses.load(Ordering::Relaxed),
        spurious_exits: shared.spurious.load(Ordering::Relaxed),
        internal_errors: 0,
        data_errors: shared.data_errors.load(Ordering::Relaxed),
        lost_dirty_pages: 0,
        rollbacks,
        blackout_us: blackout.micros(true),
        update_us: update_us.micros(false),
        layout_matches: None,
        probed_bytes: None,
        hole_bytes: None,
        hole_bytes_probed: None,
        kick_to_parked_us: Micros::default(),
        rss_kib_start,
        rss_kib_end: crate::stress::peak_rss_kib(),
        first_problem: shared
            .first_problem
            .into_inner()
            .unwrap_or_else(|e| e.into_inner()),
    };
    Ok(SoftStressReport {
        report,
        spte,
        unchecked: shared.unchecked.load(Ordering::Relaxed),
    })
}

/// Each call as its own batch, in order (what a stock kernel offers), counted in `ioctls`.
pub(crate) fn one_call_batches(
    memory: &mut SoftMemory,
    calls: &[SlotCall],
    ioctls: &mut u64,
) -> Result<(), SoftError> {
    for call in calls {
        *ioctls += 1;
        memory.apply_batch(std::slice::from_ref(call))?;
    }
    Ok(())
}
