//! The writer: a VM's slots in two copies, changed by the proposal's atomic list algorithm or by
//! native primitives, with the SPTE cache zapped as KVM would.

use std::sync::Arc;

use super::rcu::Publisher;
use super::reader::Reader;
use super::set::{SetOp, Slots, SoftSlot};
use super::spte::{SpteCache, SpteCounters};
use crate::backend::SlotBackend;
use crate::model::{
    Applied, BatchError, Change, Layout, Limits, Primitive, PrimitiveError, Slot, SlotCall, SlotId,
};

/// Why the soft backend refused or undid a change.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
pub enum SoftError {
    /// The model refuses the batch; nothing was touched.
    #[error("the batch is refused")]
    Refused(#[source] BatchError),
    /// The model refuses the primitive; nothing was touched.
    #[error("the primitive is refused")]
    Primitive(#[source] PrimitiveError),
    /// A failure injected with [`SoftMemory::fail_call`]; the batch was rolled back.
    #[error("injected failure at call {index} ({call}); the batch was rolled back")]
    Injected {
        /// Position of the failing call in the batch.
        index: usize,
        /// The failing call.
        call: SlotCall,
    },
}

/// What one batch or primitive cost.
#[derive(Clone, Copy, PartialEq, Eq, Default, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Outcome {
    /// Swaps of the active slot set (each followed by a grace period).
    pub publishes: u64,
    /// Slots replaced by invalid copies (readers got RETRY there).
    pub invalidated: u64,
    /// SPTEs zapped or write-protected.
    pub zapped: u64,
}

impl std::ops::AddAssign for Outcome {
    fn add_assign(&mut self, o: Outcome) {
        self.publishes += o.publishes;
        self.invalidated += o.invalidated;
        self.zapped += o.zapped;
    }
}

/// A VM's memory slots in userspace: one writer (this), any number of [`Reader`]s.
#[derive(Debug)]
pub struct SoftMemory {
    layout: Layout,
    slots: Publisher<Slots>,
    /// Ops applied to the inactive copy since the last publish, replayed on the other one after.
    pending: Vec<SetOp>,
    generation: u64,
    spte: Arc<SpteCache>,
    fail_at: Option<usize>,
    total: Outcome,
}

impl SoftMemory {
    /// No slot, under `limits`.
    pub fn new(limits: Limits) -> Self {
        Self::with_layout(Layout::new(limits))
    }

    /// Starts from `layout`'s slots (generation 0, empty SPTE cache).
    pub fn with_layout(layout: Layout) -> Self {
        let spaces = layout.limits().address_spaces;
        let mut copy = Slots::new(spaces);
        for slot in layout.slots() {
            copy.apply(&SetOp::Insert(SoftSlot::valid(*slot)));
        }
        SoftMemory {
            slots: Publisher::new(copy.clone(), copy),
            layout,
            pending: Vec::new(),
            generation: 0,
            spte: Arc::new(SpteCache::new(spaces)),
            fail_at: None,
            total: Outcome::default(),
        }
    }

    /// A reader handle for one vCPU or device thread.
    pub fn reader(&self) -> Reader {
        Reader::new(self.slots.reader(), Arc::clone(&self.spte))
    }

    /// The published layout (what readers see once the change in flight, if any, is done).
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The generation of the active slot set.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The SPTE cache.
    pub fn spte(&self) -> &SpteCache {
        &self.spte
    }

    /// Fault, zap and retry counters so far.
    pub fn counters(&self) -> SpteCounters {
        self.spte.counters()
    }

    /// Publishes, invalidations and zaps of every change so far.
    pub fn total(&self) -> Outcome {
        self.total
    }

    /// Grace periods waited for so far.
    pub fn grace_periods(&self) -> u64 {
        self.slots.grace_periods()
    }

    /// Zaps the SPTEs of every guest page backed by host memory `[start, end)`, in every slot
    /// that maps it (aliases included), as KVM's MMU notifier does when host memory is unmapped
    /// or migrated; returns the number of entries zapped. Found through the host-range index.
    pub fn zap_host_range(&mut self, start: u64, end: u64) -> u64 {
        let mut ranges: Vec<(u16, u64, u64)> = Vec::new();
        self.slots.with_active(|slots| {
            for space in 0..self.layout.limits().address_spaces {
                let Some(set) = slots.space(space) else {
                    continue;
                };
                for s in set.overlapping_host(start, end) {
                    let lo = start.max(s.slot.host);
                    let hi = end.min(s.slot.host + s.slot.size);
                    ranges.push((
                        space,
                        s.slot.gpa + (lo - s.slot.host),
                        s.slot.gpa + (hi - s.slot.host),
                    ));
                }
            }
        });
        let zapped = ranges
            .into_iter()
            .map(|(space, s, e)| self.spte.zap(space, s, e))
            .sum();
        self.total.zapped += zapped;
        zapped
    }

    /// Drops every cached translation without counting a zap, as an MMU starting afresh would
    /// have none; returns how many there were. Ways of applying the same change are compared on
    /// equal terms when each starts from the same cache, whatever earlier changes left in it.
    pub fn drop_sptes(&mut self) -> u64 {
        self.spte.clear()
    }

    /// Makes call `index` of every following batch fail after the invalid slots were published
    /// and zapped (the soft stand-in for an ioctl failing mid-batch), or stops doing so.
    pub fn fail_call(&mut self, index: Option<usize>) {
        self.fail_at = index;
    }

    fn stage(&mut self, op: SetOp) {
        self.slots.with_inactive(|s| s.apply(&op));
        self.pending.push(op);
    }

    /// Swap, grace period, replay on the copy readers just left.
    fn publish(&mut self, outcome: &mut Outcome) {
        self.generation += 1;
        let generation = self.generation;
        self.slots.with_inactive(|s| s.generation = generation);
        self.slots.publish();
        let pending = std::mem::take(&mut self.pending);
        self.slots.with_inactive(|s| {
            for op in &pending {
                s.apply(op);
            }
            s.generation = generation;
        });
        self.pending = pending;
        self.pending.clear();
        outcome.publishes += 1;
    }

    /// Applies `calls` with the proposal's atomic list algorithm: all or nothing, and readers
    /// see either the old layout, RETRY, or the new layout, never MMIO where both are RAM.
    ///
    /// 1. every slot a DELETE or MOVE touches is replaced by an invalid copy, published;
    /// 2. after that grace period their SPTEs are zapped and the invalid slots dropped from the
    ///    inactive set;
    /// 3. all calls are applied in order to the inactive set (on failure the original slots are
    ///    restored and published, and the error returned);
    /// 4. one publish makes the whole batch visible.
    pub fn apply_batch(&mut self, calls: &[SlotCall]) -> Result<Outcome, SoftError> {
        let done = self.layout.check_batch(calls).map_err(SoftError::Refused)?;
        let mut outcome = Outcome::default();

        // Original slots that some DELETE or MOVE of the batch takes away.
        let mut targets: Vec<Slot> = Vec::new();
        for applied in &done {
            if let (true, Some(before)) = (applied.change.zaps(), applied.before) {
                if let Some(original) = self.layout.slot(before.id) {
                    if !targets.iter().any(|t| t.id == original.id) {
                        targets.push(*original);
                    }
                }
            }
        }

        // Steps 1 and 2.
        let mut removed: Vec<SlotId> = Vec::with_capacity(targets.len());
        if !targets.is_empty() {
            for t in &targets {
                self.stage(SetOp::Remove(SoftSlot::valid(*t)));
                self.stage(SetOp::Insert(SoftSlot::invalid(*t)));
            }
            self.publish(&mut outcome);
            outcome.invalidated += targets.len() as u64;
            for t in &targets {
                outcome.zapped += self.spte.zap(t.id.address_space, t.gpa, t.end());
                self.stage(SetOp::Remove(SoftSlot::invalid(*t)));
                removed.push(t.id);
            }
        }

        // Step 3.
        let mut applied_ops: Vec<SetOp> = Vec::with_capacity(2 * calls.len());
        let mut applied_calls: Vec<Applied> = Vec::with_capacity(calls.len());
        let mut failure = None;
        for (index, call) in calls.iter().enumerate() {
            if self.fail_at == Some(index) {
                failure = Some(SoftError::Injected { index, call: *call });
                break;
            }
            let applied = match self.layout.apply(call) {
                Ok(a) => a,
                // Cannot happen after check_batch; handled like any other failure all the same.
                Err(rule) => {
                    failure = Some(SoftError::Refused(BatchError {
                        index,
                        call: *call,
                        rule,
                    }));
                    break;
                }
            };
            applied_calls.push(applied);
            if let Some(before) = applied.before {
                if let Some(pos) = removed.iter().position(|&id| id == before.id) {
                    // Already out of the inactive set (step 2).
                    removed.swap_remove(pos);
                } else {
                    let op = SetOp::Remove(SoftSlot::valid(before));
                    self.stage(op);
                    applied_ops.push(op);
                }
            }
            if let Some(after) = applied.after {
                let op = SetOp::Insert(SoftSlot::valid(after));
                self.stage(op);
                applied_ops.push(op);
            }
        }

        if let Some(error) = failure {
            // Undo step 3, newest first, then put back the originals dropped in step 2.
            for op in applied_ops.iter().rev() {
                self.stage(op.inverse());
            }
            self.layout.revert_all(&applied_calls);
            for t in &targets {
                self.stage(SetOp::Insert(SoftSlot::valid(*t)));
            }
            if !self.pending.is_empty() {
                self.publish(&mut outcome);
            }
            self.total += outcome;
            return Err(error);
        }

        // Step 4.
        if !self.pending.is_empty() {
            self.publish(&mut outcome);
        }
        // Dirty logging switched on: KVM write-protects the slot so that writes get logged.
        for a in &done {
            if let (Change::FlagsOnly, Some(before), Some(after)) = (a.change, a.before, a.after) {
                if after.flags.log_dirty()
                    && !before.flags.log_dirty()
                    && self.layout.slot(after.id) == Some(&after)
                {
                    outcome.zapped +=
                        self.spte
                            .write_protect(after.id.address_space, after.gpa, after.end());
                }
            }
        }
        self.total += outcome;
        Ok(outcome)
    }

    /// Applies a primitive natively, as the kernel could if it had it: one publish of the net
    /// change, no invalid slot; grow, split and merge zap nothing, shrink zaps the cut range,
    /// a move zaps the old range, read-only on (and dirty logging on) write-protects the slot.
    pub fn apply_primitive(&mut self, primitive: &Primitive) -> Result<Outcome, SoftError> {
        let lowered = self.layout.lower(primitive).map_err(SoftError::Primitive)?;
        let old = match *primitive {
            Primitive::Grow { id, .. }
            | Primitive::Shrink { id, .. }
            | Primitive::Split { id, .. }
            | Primitive::Move { id, .. }
            | Primitive::SetReadonly { id, .. }
            | Primitive::SetDirtyLogging { id, .. } => self.layout.slot(id).copied(),
            Primitive::Merge { first, .. } => self.layout.slot(first).copied(),
        };
        let done = self
            .layout
            .apply_batch(lowered.batch.calls())
            .map_err(SoftError::Refused)?;
        let mut outcome = Outcome::default();
        let (Some(old), false) = (old, done.is_empty()) else {
            return Ok(outcome);
        };
        for a in &done {
            if let Some(before) = a.before {
                self.stage(SetOp::Remove(SoftSlot::valid(before)));
            }
            if let Some(after) = a.after {
                self.stage(SetOp::Insert(SoftSlot::valid(after)));
            }
        }
        self.publish(&mut outcome);
        let space = old.id.address_space;
        outcome.zapped += match *primitive {
            Primitive::Shrink { size, .. } => self.spte.zap(space, old.gpa + size, old.end()),
            Primitive::Move { .. } => self.spte.zap(space, old.gpa, old.end()),
            Primitive::SetReadonly { on: true, .. }
            | Primitive::SetDirtyLogging { on: true, .. } => {
                self.spte.write_protect(space, old.gpa, old.end())
            }
            _ => 0,
        };
        self.total += outcome;
        Ok(outcome)
    }
}

impl SlotBackend for SoftMemory {
    type Error = SoftError;

    fn name(&self) -> &'static str {
        "soft"
    }

    fn layout(&self) -> &Layout {
        SoftMemory::layout(self)
    }

    fn apply_batch(&mut self, calls: &[SlotCall]) -> Result<(), Self::Error> {
        SoftMemory::apply_batch(self, calls)?;
        Ok(())
    }

    fn apply_primitive(&mut self, primitive: &Primitive) -> Result<(), Self::Error> {
        SoftMemory::apply_primitive(self, primitive)?;
        Ok(())
    }
}
