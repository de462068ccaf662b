//! One commit run three ways on fresh soft memory: QEMU's calls one by one, a planned batch
//! through the atomic list algorithm, and the same change lowered to native primitives where
//! there are some; each reports zapped SPTEs and RETRYs.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use serde::Serialize;

use memslots::model::{Batch, Layout, Primitive, Slot, SlotCall, SlotFlags, SlotId, PAGE_SIZE};
use memslots::planner::MemoryMap;
use memslots::soft::spte::SpteCounters;
use memslots::soft::Access;
use memslots::soft::{Outcome, SoftError, SoftMemory};

/// One step of a change in native form: a primitive, or a batch for what no primitive expresses.
#[derive(Clone, PartialEq, Eq, Debug, Serialize)]
pub enum NativeStep {
    /// A native primitive.
    Primitive(Primitive),
    /// Raw calls through the atomic list algorithm (deletes, creates, what is left).
    Batch(Batch),
}

/// What one way of applying a commit cost.
#[derive(Clone, Copy, PartialEq, Eq, Default, Debug, Serialize)]
pub struct WayReport {
    /// Units applied (batches, or primitives and batches).
    pub steps: u64,
    /// SPTEs zapped or write-protected.
    pub zapped_pages: u64,
    /// Reader lookups that landed in an invalid slot.
    pub retries: u64,
    /// Reader accesses that exited as MMIO on a GPA that is RAM before and after the change
    /// (what a vCPU would see as a spurious MMIO exit; always 0 without readers).
    pub spurious_mmio: u64,
    /// SPTE misses taken by readers during the change.
    pub faults: u64,
    /// Publishes (each with a grace period).
    pub publishes: u64,
    /// Slots replaced by invalid copies.
    pub invalidated: u64,
}

/// The three ways side by side.
#[derive(Clone, PartialEq, Eq, Debug, Serialize)]
pub struct CommitComparison {
    /// QEMU's calls, each as a one-call batch.
    pub qemu: WayReport,
    /// The planned batch through the list algorithm.
    pub planned: WayReport,
    /// Native primitives where possible, batches for the rest.
    pub native: WayReport,
    /// The native steps used.
    pub native_steps: Vec<NativeStep>,
    /// Whether the planned batch ends in the guest mapping QEMU's calls make.
    pub planned_matches: bool,
    /// Whether the native steps end in the planned batch's layout (they always should).
    pub native_matches: bool,
}

/// How to run a comparison.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct CompareOptions {
    /// Reader threads touching guest pages while each way runs (0: no thread, no RETRY).
    pub readers: usize,
    /// Fault in at most this many pages of the starting layout first (what can be zapped).
    pub prefault_pages: u64,
}

impl Default for CompareOptions {
    fn default() -> Self {
        CompareOptions {
            readers: 0,
            prefault_pages: 1 << 16,
        }
    }
}

/// Applies `primitive` to `cur` if the model accepts it, recording it.
fn try_primitive(cur: &mut Layout, steps: &mut Vec<NativeStep>, primitive: Primitive) -> bool {
    let Ok(lowered) = cur.lower(&primitive) else {
        return false;
    };
    if cur.apply_batch(lowered.batch.calls()).is_err() {
        return false;
    }
    steps.push(NativeStep::Primitive(primitive));
    true
}

/// Whether `s`'s host mapping continues into `gpa` (same host offset).
fn same_mapping(s: &Slot, gpa: u64, host: u64) -> bool {
    host.wrapping_sub(s.host) == gpa.wrapping_sub(s.gpa)
}

/// Flag toggles turning `from`'s flags into `to`.
fn flag_steps(id: SlotId, from: SlotFlags, to: SlotFlags) -> Vec<Primitive> {
    let mut out = Vec::new();
    if from.readonly() != to.readonly() {
        out.push(Primitive::SetReadonly {
            id,
            on: to.readonly(),
        });
    }
    if from.log_dirty() != to.log_dirty() {
        out.push(Primitive::SetDirtyLogging {
            id,
            on: to.log_dirty(),
        });
    }
    out
}

/// Lowers the change `before` -> `after` to native primitives where there are some: splits,
/// deletes, shrinks, moves, flag toggles, merges and grows, then one batch for the rest.
///
/// Best effort: every primitive is checked by the model on the layout the steps before it leave,
/// and whatever no primitive reached is done by a final batch, so the steps always end in `after`.
/// No step leaves MMIO where `before` and `after` both have RAM: a delete, shrink or move is only
/// done as a primitive when what it unmaps is unmapped in `after` too.
pub fn native_steps(before: &Layout, after: &Layout) -> Vec<NativeStep> {
    let mut cur = before.clone();
    let mut steps = Vec::new();

    // Splits: an after slot with a new id that continues a current slot's mapping.
    for a in after.slots() {
        if cur.slot(a.id).is_some() {
            continue;
        }
        let Some(x) = cur.find(a.id.address_space, a.gpa).copied() else {
            continue;
        };
        if x.gpa < a.gpa && same_mapping(&x, a.gpa, a.host) {
            try_primitive(
                &mut cur,
                &mut steps,
                Primitive::Split {
                    id: x.id,
                    at: a.gpa,
                    new_id: a.id,
                },
            );
        }
    }

    // Deletes: current slots that neither survive under their id nor fold into an after slot.
    let keep = |s: &Slot| -> bool {
        if let Some(a) = after.slot(s.id) {
            if a.gpa == s.gpa && a.host == s.host {
                return true;
            }
            if a.size == s.size && a.host == s.host {
                return true; // a move
            }
        }
        // A piece that a merge into an existing slot can take in.
        after.find(s.id.address_space, s.gpa).is_some_and(|a| {
            a.gpa < s.gpa
                && same_mapping(a, s.gpa, s.host)
                && s.end() <= a.end()
                && cur
                    .slot(a.id)
                    .is_some_and(|c| c.gpa == a.gpa && c.host == a.host)
        })
    };
    // Only slots whose range is MMIO afterwards: deleting one under RAM-to-be would open a hole
    // until the final batch; those go into that batch instead.
    let unmapped_after = |s: &Slot| {
        after
            .overlapping(s.id.address_space, s.gpa, s.end())
            .next()
            .is_none()
    };
    let deletes: Batch = cur
        .slots()
        .filter(|s| !keep(s) && unmapped_after(s))
        .map(|s| s.delete_call())
        .collect();
    if !deletes.is_empty() && cur.apply_batch(deletes.calls()).is_ok() {
        steps.push(NativeStep::Batch(deletes));
    }

    // Shrinks, moves and flag toggles of slots that keep their id.
    let ids: Vec<SlotId> = cur.slots().map(|s| s.id).collect();
    for &id in &ids {
        let (Some(c), Some(a)) = (cur.slot(id).copied(), after.slot(id).copied()) else {
            continue;
        };
        // A range a shrink cuts off or a move leaves must be MMIO afterwards, or it would be a
        // hole until the final batch.
        let only_self = |start: u64, end: u64| {
            after
                .overlapping(id.address_space, start, end)
                .all(|s| s.id == id)
        };
        if c.gpa == a.gpa && c.host == a.host && a.size < c.size {
            if after
                .overlapping(id.address_space, c.gpa + a.size, c.end())
                .next()
                .is_none()
            {
                try_primitive(&mut cur, &mut steps, Primitive::Shrink { id, size: a.size });
            }
        } else if c.gpa != a.gpa
            && c.size == a.size
            && c.host == a.host
            && only_self(c.gpa, c.end())
        {
            try_primitive(&mut cur, &mut steps, Primitive::Move { id, gpa: a.gpa });
        }
        if let Some(c) = cur.slot(id).copied() {
            if c.gpa == a.gpa && c.host == a.host && c.size == a.size {
                for p in flag_steps(id, c.flags, a.flags) {
                    try_primitive(&mut cur, &mut steps, p);
                }
            }
        }
    }

    // Merges and grows: fill each after slot from its first piece upwards.
    for a in after.slots() {
        while let Some(c) = cur.slot(a.id).copied() {
            if c.gpa != a.gpa || c.host != a.host || c.end() >= a.end() {
                break;
            }
            let next = cur.find(a.id.address_space, c.end()).copied();
            let progressed = match next {
                Some(n) if same_mapping(a, n.gpa, n.host) && n.end() <= a.end() => {
                    for p in flag_steps(n.id, n.flags, c.flags) {
                        try_primitive(&mut cur, &mut steps, p);
                    }
                    try_primitive(
                        &mut cur,
                        &mut steps,
                        Primitive::Merge {
                            first: a.id,
                            second: n.id,
                        },
                    )
                }
                Some(_) => false,
                None => {
                    // Grow up to the next slot inside `a`, or to `a`'s end.
                    let limit = cur
                        .overlapping(a.id.address_space, c.end(), a.end())
                        .map(|s| s.gpa)
                        .next()
                        .unwrap_or(a.end());
                    try_primitive(
                        &mut cur,
                        &mut steps,
                        Primitive::Grow {
                            id: a.id,
                            size: limit - c.gpa,
                        },
                    )
                }
            };
            if !progressed {
                break;
            }
        }
        if let Some(c) = cur.slot(a.id).copied().filter(|c| {
            c == &Slot {
                flags: c.flags,
                ..*a
            }
        }) {
            for p in flag_steps(a.id, c.flags, a.flags) {
                try_primitive(&mut cur, &mut steps, p);
            }
        }
    }

    // The rest: delete what differs, create what is missing.
    let mut rest: Batch = cur
        .slots()
        .filter(|s| after.slot(s.id) != Some(*s))
        .map(|s| s.delete_call())
        .collect();
    for a in after.slots() {
        if cur.slot(a.id) != Some(a) {
            rest.push(a.set_call());
        }
    }
    if !rest.is_empty() {
        steps.push(NativeStep::Batch(rest));
    }
    steps
}

/// Every page of the slots of `layout`, address space and GPA, at most `limit` of them.
fn pages(layout: &Layout, limit: u64) -> Vec<(u16, u64)> {
    let mut out = Vec::new();
    'all: for s in layout.slots() {
        for p in 0..s.pages() {
            if out.len() as u64 >= limit {
                break 'all;
            }
            out.push((s.id.address_space, s.gpa + p * PAGE_SIZE));
        }
    }
    out
}

/// Runs `apply` on fresh soft memory built from `before`, prefaulted, with reader threads
/// touching the pages of `before` and `after` meanwhile.
fn run_way(
    before: &Layout,
    after: &Layout,
    touched: &[(u16, u64)],
    options: &CompareOptions,
    apply: impl FnOnce(&mut SoftMemory) -> Result<u64, SoftError>,
) -> Result<(WayReport, Layout), SoftError> {
    let mut memory = SoftMemory::with_layout(before.clone());
    let mut prefault = memory.reader();
    for (space, gpa) in pages(before, options.prefault_pages) {
        prefault.access_in(space, gpa, true);
    }
    drop(prefault);
    let start = Mark::of(&memory);
    let stop = AtomicBool::new(false);
    let spurious = AtomicU64::new(0);
    let result = std::thread::scope(|scope| {
        for r in 0..options.readers {
            let mut reader = memory.reader();
            let (stop, spurious) = (&stop, &spurious);
            scope.spawn(move || {
                if touched.is_empty() {
                    return;
                }
                let mut seen = 0;
                let mut i = r * touched.len() / options.readers.max(1);
                while !stop.load(Ordering::Relaxed) {
                    let (space, gpa) = touched[i % touched.len()];
                    if reader.access_in(space, gpa, false) == Access::Mmio
                        && before.find(space, gpa).is_some()
                        && after.find(space, gpa).is_some()
                    {
                        seen += 1;
                    }
                    i += 1;
                }
                spurious.fetch_add(seen, Ordering::Relaxed);
            });
        }
        let result = apply(&mut memory);
        stop.store(true, Ordering::Relaxed);
        result
    });
    let steps = result?;
    Ok((
        WayReport::since(start, &memory, steps, spurious.load(Ordering::Relaxed)),
        memory.layout().clone(),
    ))
}

/// Runs one commit three ways on fresh soft memory states built from `before`: (a) `qemu_calls`
/// as one-call batches, (b) `planned` through the atomic list algorithm, (c) the planned change
/// lowered to native primitives by [`native_steps`].
///
/// Fails if the model refuses QEMU's calls or the planned batch.
pub fn compare_commit(
    before: &Layout,
    qemu_calls: &[SlotCall],
    planned: &Batch,
    options: &CompareOptions,
) -> Result<CommitComparison, SoftError> {
    let mut after = before.clone();
    after.apply_batch(qemu_calls).map_err(SoftError::Refused)?;
    // The primitives lower the planner's change, not QEMU's: QEMU renumbers slots it re-creates,
    // and a primitive only applies to a slot that keeps its id.
    let mut planned_after = before.clone();
    planned_after
        .apply_batch(planned.calls())
        .map_err(SoftError::Refused)?;
    let steps = native_steps(before, &planned_after);
    let mut touched = pages(before, options.prefault_pages);
    touched.extend(pages(&after, options.prefault_pages));

    let (qemu, _) = run_way(before, &after, &touched, options, |m| {
        for call in qemu_calls {
            m.apply_batch(std::slice::from_ref(call))?;
        }
        Ok(qemu_calls.len() as u64)
    })?;
    let (planned_report, planned_layout) = run_way(before, &after, &touched, options, |m| {
        m.apply_batch(planned.calls())?;
        Ok(1)
    })?;
    let (native, native_layout) = run_way(before, &after, &touched, options, |m| {
        for step in &steps {
            match step {
                NativeStep::Primitive(p) => m.apply_primitive(p)?,
                NativeStep::Batch(b) => m.apply_batch(b.calls())?,
            };
        }
        Ok(steps.len() as u64)
    })?;
    Ok(CommitComparison {
        qemu,
        planned: planned_report,
        native,
        native_steps: steps,
        planned_matches: MemoryMap::from_layout(&planned_layout) == MemoryMap::from_layout(&after),
        native_matches: native_layout == planned_after,
    })
}

/// A soft memory's counters at one moment, to report what a way cost since.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Mark(SpteCounters, Outcome);

impl Mark {
    pub(crate) fn of(memory: &SoftMemory) -> Self {
        Mark(memory.counters(), memory.total())
    }
}

impl WayReport {
    /// What `memory` did since `start`: `steps` applied, `spurious_mmio` seen by its readers.
    pub(crate) fn since(start: Mark, memory: &SoftMemory, steps: u64, spurious_mmio: u64) -> Self {
        let (Mark(start, start_total), end, total) = (start, memory.counters(), memory.total());
        WayReport {
            steps,
            zapped_pages: end.zapped - start.zapped,
            retries: end.retries - start.retries,
            spurious_mmio,
            faults: end.faults - start.faults,
            publishes: total.publishes - start_total.publishes,
            invalidated: total.invalidated - start_total.invalidated,
        }
    }

    /// Adds another report's counts to this one.
    pub fn add(&mut self, other: &WayReport) {
        self.steps += other.steps;
        self.zapped_pages += other.zapped_pages;
        self.retries += other.retries;
        self.spurious_mmio += other.spurious_mmio;
        self.faults += other.faults;
        self.publishes += other.publishes;
        self.invalidated += other.invalidated;
    }
}

/// A whole trace run three ways, commit by commit: the sums over its commits.
#[derive(Clone, PartialEq, Eq, Default, Debug, Serialize)]
pub struct TraceComparison {
    /// Commits compared.
    pub commits: u64,
    /// QEMU's calls, each as a one-call batch.
    pub qemu: WayReport,
    /// The planned batches through the list algorithm.
    pub planned: WayReport,
    /// Native primitives where possible.
    pub native: WayReport,
    /// Whether every planned batch ended in QEMU's layout.
    pub planned_matches: bool,
    /// Whether every native lowering ended in QEMU's layout.
    pub native_matches: bool,
}

impl TraceComparison {
    /// Sums over no commit yet: nothing counted, every way matching so far.
    pub fn new() -> Self {
        TraceComparison {
            planned_matches: true,
            native_matches: true,
            ..TraceComparison::default()
        }
    }

    /// Adds one commit's comparison to the sums.
    pub fn add(&mut self, commit: &CommitComparison) {
        self.commits += 1;
        self.qemu.add(&commit.qemu);
        self.planned.add(&commit.planned);
        self.native.add(&commit.native);
        self.planned_matches &= commit.planned_matches;
        self.native_matches &= commit.native_matches;
    }
}

/// Runs every commit of `trace` three ways with [`compare_commit`], starting from an empty layout
/// under `limits`; `plan` turns (layout before, QEMU's accepted calls) into the planned batch.
pub fn compare_trace(
    trace: &crate::trace::Trace,
    limits: memslots::model::Limits,
    mut plan: impl FnMut(&Layout, &[SlotCall]) -> Batch,
    options: &CompareOptions,
) -> Result<TraceComparison, SoftError> {
    let mut layout = Layout::new(limits);
    let mut out = TraceComparison::new();
    for range in trace.commits() {
        let calls = trace.accepted_calls(range);
        let planned = plan(&layout, &calls);
        out.add(&compare_commit(&layout, &calls, &planned, options)?);
        layout.apply_batch(&calls).map_err(SoftError::Refused)?;
    }
    Ok(out)
}
