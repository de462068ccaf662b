//! The soft backend at 32,764 slots beside two baselines measured in the same run: a
//! `RwLock<BTreeMap>` keyed by GPA (writer takes the lock for the whole batch), and vm-memory's
//! `GuestMemoryAtomic<GuestMemoryMmap>` whose region list is rebuilt and swapped in per change
//! (what a rust-vmm VMM does to change guest memory).
//!
//! Layout: slot i is 2 pages at GPA page 4i. A move batch is one MOVE of one slot (two pages up
//! and back); the mixed batch is DELETE + CREATE of 4 slots (shrunk to one page, then grown back).
//! Lookups cannot be timed one by one (a clock read costs about as much as a lookup), so
//! `translate` figures are the median over rounds of the mean time of `CHUNK` lookups at
//! pseudo-random slots.

use std::collections::BTreeMap;
use std::error::Error;
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use memslots::model::{Layout, Limits, Slot, SlotCall, PAGE_SIZE};
use memslots::soft::{SoftMemory, Translation};
use memslots_testkit::samples::{self, dense_slot as slot, SAMPLE_HOST};
use vm_memory::{
    GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
    GuestRegionMmap, MmapRegion,
};

use super::harness::{median, Figure, Mode};

const CHUNK: usize = 10_000;

fn slots() -> u16 {
    Limits::default().slots
}

fn full_layout() -> Layout {
    samples::dense_layout(Limits::default())
}

/// The moved slot's two places, alternately.
fn move_call(round: usize) -> SlotCall {
    let s = slot(1000);
    Slot {
        gpa: s.gpa + if round % 2 == 0 { 2 * PAGE_SIZE } else { 0 },
        ..s
    }
    .set_call()
}

/// DELETE + CREATE of 4 slots: shrunk to one page on even rounds, back to two on odd ones.
fn mixed_calls(round: usize) -> Vec<SlotCall> {
    (2000..2004)
        .flat_map(|i| {
            let full = slot(i);
            let (old, new) = if round % 2 == 0 {
                (
                    full,
                    Slot {
                        size: PAGE_SIZE,
                        ..full
                    },
                )
            } else {
                (
                    Slot {
                        size: PAGE_SIZE,
                        ..full
                    },
                    full,
                )
            };
            [old.delete_call(), new.set_call()]
        })
        .collect()
}

/// The baseline map: GPA -> slot, and slot -> GPA, under one lock.
#[derive(Default)]
struct LockedMap(RwLock<(BTreeMap<u64, Slot>, BTreeMap<u32, u64>)>);

impl LockedMap {
    fn full() -> Self {
        let m = LockedMap::default();
        for i in 0..slots() {
            m.apply(&[slot(i).set_call()]);
        }
        m
    }

    /// Applies a batch under one write lock.
    fn apply(&self, calls: &[SlotCall]) {
        let mut guard = self.0.write().unwrap_or_else(|p| p.into_inner());
        let (by_gpa, by_id) = &mut *guard;
        for c in calls {
            if let Some(gpa) = by_id.remove(&c.slot) {
                by_gpa.remove(&gpa);
            }
            if !c.is_delete() {
                by_gpa.insert(c.gpa, c.slot());
                by_id.insert(c.slot, c.gpa);
            }
        }
    }

    fn translate(&self, gpa: u64) -> Option<u64> {
        let guard = self.0.read().unwrap_or_else(|p| p.into_inner());
        guard
            .0
            .range(..=gpa)
            .next_back()
            .filter(|(_, s)| gpa < s.end())
            .map(|(_, s)| s.host + (gpa - s.gpa))
    }
}

/// The second baseline: vm-memory regions over real (untouched) anonymous memory, the whole
/// region list rebuilt and swapped in per change.
struct AtomicRegions {
    _pool: MmapRegion<()>,
    base: u64,
    regions: BTreeMap<u32, Arc<GuestRegionMmap>>,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
}

impl AtomicRegions {
    /// No region yet, over a pool with room for every slot.
    fn empty() -> Result<Self, Box<dyn Error>> {
        let pool = MmapRegion::<()>::new(usize::from(slots()) * 2 * PAGE_SIZE as usize)?;
        let base = pool.as_ptr() as u64;
        Ok(AtomicRegions {
            mem: GuestMemoryAtomic::new(GuestMemoryMmap::default()),
            _pool: pool,
            base,
            regions: BTreeMap::new(),
        })
    }

    /// Every slot, published once.
    fn full() -> Result<Self, Box<dyn Error>> {
        let mut me = Self::empty()?;
        for i in 0..slots() {
            let r = me.region(&slot(i))?;
            me.regions.insert(slot(i).set_call().slot, r);
        }
        me.publish()?;
        Ok(me)
    }

    fn region(&self, s: &Slot) -> Result<Arc<GuestRegionMmap>, Box<dyn Error>> {
        let host = self.base + (s.host - SAMPLE_HOST);
        // SAFETY: `host..host + size` lies inside `_pool`, which outlives every region built
        // here (they are dropped with `regions` and `mem`, fields of the same struct, and the
        // pool is never unmapped before the struct is dropped).
        let m = unsafe {
            MmapRegion::build_raw(
                host as *mut u8,
                s.size as usize,
                PROT_READ_WRITE,
                MAP_SHARED,
            )
        }?;
        Ok(Arc::new(
            GuestRegionMmap::new(m, GuestAddress(s.gpa)).ok_or("region overflows")?,
        ))
    }

    fn publish(&self) -> Result<(), Box<dyn Error>> {
        let mut list: Vec<Arc<GuestRegionMmap>> = self.regions.values().cloned().collect();
        list.sort_by_key(|r| vm_memory::GuestMemoryRegion::start_addr(r.as_ref()));
        let map = GuestMemoryMmap::from_arc_regions(list)?;
        let guard = self.mem.lock().map_err(|_| "poisoned")?;
        guard.replace(map);
        Ok(())
    }

    /// Applies a batch and rebuilds the region list once.
    fn apply(&mut self, calls: &[SlotCall]) -> Result<(), Box<dyn Error>> {
        for c in calls {
            if c.is_delete() {
                self.regions.remove(&c.slot);
            } else {
                let r = self.region(&c.slot())?;
                self.regions.insert(c.slot, r);
            }
        }
        self.publish()
    }
}

// Recorded by `build_raw`, which maps nothing itself (the pool is already mapped).
const PROT_READ_WRITE: i32 = 0x3;
const MAP_SHARED: i32 = 0x1;

/// A pseudo-random GPA inside one of the slots.
fn gpa_of(k: u64) -> u64 {
    let i = (k.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 33) % u64::from(slots());
    i * 4 * PAGE_SIZE + (k % 2) * PAGE_SIZE + 0x10
}

fn ns_per_lookup(mut f: impl FnMut(u64) -> bool, round: usize) -> f64 {
    let start = (round * CHUNK) as u64;
    let t = Instant::now();
    let mut hits = 0u64;
    for k in start..start + CHUNK as u64 {
        hits += u64::from(f(black_box(gpa_of(k))));
    }
    black_box(hits);
    t.elapsed().as_secs_f64() * 1e9 / CHUNK as f64
}

fn us(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e6
}

/// A writer thread applying move batches while `active`, counting them in `done`.
struct Writer {
    active: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    fn spawn(mut change: impl FnMut(usize) + Send + 'static) -> Self {
        let active = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let (a, s, d) = (active.clone(), stop.clone(), done.clone());
        let thread = std::thread::spawn(move || {
            let mut round = 0;
            while !s.load(Ordering::Relaxed) {
                if a.load(Ordering::Relaxed) {
                    change(round);
                    round += 1;
                    d.fetch_add(1, Ordering::Release);
                } else {
                    std::thread::sleep(Duration::from_micros(50));
                }
            }
        });
        Writer {
            active,
            stop,
            done,
            thread: Some(thread),
        }
    }

    /// Turns the writer on and waits for its first change.
    fn on(&self) {
        let before = self.done.load(Ordering::Acquire);
        self.active.store(true, Ordering::Relaxed);
        while self.done.load(Ordering::Acquire) == before {
            std::thread::yield_now();
        }
    }

    fn off(&self) {
        self.active.store(false, Ordering::Relaxed);
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Every soft figure with its baselines.
pub fn run(mode: Mode) -> Result<Vec<Figure>, Box<dyn Error>> {
    let mut out = Vec::new();
    let n = slots();

    // Setup: one call at a time, as a VMM (and KVM's memslot_perf_test) creates them. The
    // vm-memory list rebuilt per change is O(n) per call, O(n^2) in all: seconds, so it is
    // measured in fewer of the rounds, and not at all in `--smoke` (minutes in a debug build).
    let setup_rounds = mode.pick(1, 3, 9);
    let gm_rounds = mode.pick(0, 1, 3);
    let (mut soft_setup, mut map_setup, mut gm_setup) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..setup_rounds {
        if round < gm_rounds {
            let mut g = AtomicRegions::empty()?;
            let t = Instant::now();
            for i in 0..n {
                g.apply(&[slot(i).set_call()])?;
            }
            gm_setup.push(us(t));
        }
        let t = Instant::now();
        let mut m = SoftMemory::new(Limits::default());
        for i in 0..n {
            m.apply_batch(&[slot(i).set_call()])?;
        }
        soft_setup.push(us(t));
        drop(m);
        let t = Instant::now();
        black_box(LockedMap::full());
        map_setup.push(us(t));
    }
    out.push(Figure::new(
        format!("soft_setup_{n}"),
        "us",
        median(&mut soft_setup),
        format!("rwlock_btreemap_setup_{n}"),
        median(&mut map_setup),
    ));
    if !gm_setup.is_empty() {
        out.push(Figure::new(
            format!("soft_setup_{n}_vs_gm_atomic"),
            "us",
            median(&mut soft_setup),
            format!("gm_atomic_rebuild_setup_{n}"),
            median(&mut gm_setup),
        ));
    }

    // Batches.
    let rounds = mode.pick(4, 200, 2000);
    let mut soft = SoftMemory::with_layout(full_layout());
    let map = LockedMap::full();
    let mut gm = AtomicRegions::full()?;
    for (what, batch) in [
        (
            "move_batch",
            &(|r: usize| vec![move_call(r)]) as &dyn Fn(usize) -> Vec<SlotCall>,
        ),
        ("mixed_8_call_batch", &mixed_calls),
    ] {
        let (mut s, mut b, mut g) = (Vec::new(), Vec::new(), Vec::new());
        for r in 0..rounds {
            let calls = batch(r);
            let t = Instant::now();
            soft.apply_batch(&calls)?;
            s.push(us(t));
            let t = Instant::now();
            map.apply(&calls);
            b.push(us(t));
            let t = Instant::now();
            gm.apply(&calls)?;
            g.push(us(t));
        }
        let sm = median(&mut s);
        out.push(Figure::new(
            format!("soft_{what}_{n}"),
            "us",
            sm,
            format!("rwlock_btreemap_{what}_{n}"),
            median(&mut b),
        ));
        out.push(Figure::new(
            format!("soft_{what}_{n}_vs_gm_atomic"),
            "us",
            sm,
            format!("gm_atomic_rebuild_{what}_{n}"),
            median(&mut g),
        ));
    }

    // Translate, without then with a concurrent writer.
    let trounds = mode.pick(2, 40, 600);
    let mut reader = soft.reader();
    let map = Arc::new(map);
    let gmem = gm.mem.clone();
    let soft_look =
        |r: &mut memslots::soft::Reader, gpa| matches!(r.translate(gpa), Translation::Ram { .. });
    let map_look = |m: &LockedMap, gpa| m.translate(gpa).is_some();
    let gm_look = |g: &GuestMemoryAtomic<GuestMemoryMmap>, gpa| {
        g.memory().get_host_address(GuestAddress(gpa)).is_ok()
    };
    let (mut s, mut b, mut g) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..trounds {
        s.push(ns_per_lookup(|gpa| soft_look(&mut reader, gpa), r));
        b.push(ns_per_lookup(|gpa| map_look(&map, gpa), r));
        g.push(ns_per_lookup(|gpa| gm_look(&gmem, gpa), r));
    }
    let sm = median(&mut s);
    out.push(Figure::new(
        format!("soft_translate_p50_{n}"),
        "ns",
        sm,
        format!("rwlock_btreemap_translate_p50_{n}"),
        median(&mut b),
    ));
    out.push(Figure::new(
        format!("soft_translate_p50_{n}_vs_gm_atomic"),
        "ns",
        sm,
        format!("gm_atomic_translate_p50_{n}"),
        median(&mut g),
    ));

    let soft_writer = Writer::spawn(move |r| {
        let _ = soft.apply_batch(&[move_call(r + 1)]);
    });
    let map_w = map.clone();
    let map_writer = Writer::spawn(move |r| map_w.apply(&[move_call(r + 1)]));
    let gm_writer = Writer::spawn(move |r| {
        let _ = gm.apply(&[move_call(r + 1)]);
    });
    let (mut s, mut b, mut g) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..trounds {
        soft_writer.on();
        s.push(ns_per_lookup(|gpa| soft_look(&mut reader, gpa), r));
        soft_writer.off();
        map_writer.on();
        b.push(ns_per_lookup(|gpa| map_look(&map, gpa), r));
        map_writer.off();
        gm_writer.on();
        g.push(ns_per_lookup(|gpa| gm_look(&gmem, gpa), r));
        gm_writer.off();
    }
    let sm = median(&mut s);
    out.push(Figure::new(
        format!("soft_translate_p50_{n}_writer"),
        "ns",
        sm,
        format!("rwlock_btreemap_translate_p50_{n}_writer"),
        median(&mut b),
    ));
    out.push(Figure::new(
        format!("soft_translate_p50_{n}_writer_vs_gm_atomic"),
        "ns",
        sm,
        format!("gm_atomic_translate_p50_{n}_writer"),
        median(&mut g),
    ));
    Ok(out)
}
