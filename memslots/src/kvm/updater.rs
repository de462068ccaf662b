//! The atomic apply of a batch to a running VM: the part a VMM embeds.
//!
//! [`SlotUpdater`] owns the VM's slots (through the one [`SlotTable`]), the host memory behind them,
//! the per-backing dirty log and the device-side view, and parks the VMM's vCPUs through its
//! [`VcpuGate`] only for the calls that need it.

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::backend::SlotBackend;
use crate::model::{
    Applied, BatchError, Change, Layout, Primitive, PrimitiveError, Slot, SlotCall,
};

use super::dirty::{DirtyLog, DirtyLogError, DirtyPages};
use super::gate::{QuiesceTimes, VcpuGate};
use super::memory::{Backing, HostMemory, MemoryError};
use super::ring::DirtyRing;
use super::slots::{FaultHook, SlotCallError, SlotTable};
use super::view::{self, Prepared, TypedView, View, ViewBitmap};
use super::vm::SlotVm;

/// Which calls of a batch run with the vCPUs held out.
#[derive(Clone, PartialEq, Eq, Debug, Hash)]
pub enum Hold {
    /// The calls from the first that opens a hole to the last that closes one, and the calls
    /// that drop a logging slot's bitmap: what [`SlotUpdater::apply`] uses.
    Holes,
    /// Exactly these calls (indices into the batch); an empty range holds nobody. A range that
    /// does not cover every hole lets vCPUs see a half-applied layout: this exists to measure
    /// other policies (QEMU's whole-commit inhibit, none at all) against [`Hold::Holes`].
    Calls(Range<usize>),
}

/// How the dirty bits of a slot the batch drops are kept.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum DirtyBits {
    /// Read just before the call that drops them (and, with [`Hold::Holes`], once before the
    /// hold with the vCPUs running, so the read inside it is short).
    Keep,
    /// Not read: the pages dirtied since the last harvest are lost. Exists to show the loss.
    Drop,
}

/// What one applied batch cost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    /// Slot ioctls made (rollback included).
    pub ioctls: u64,
    /// Of those, made with vCPUs held out.
    pub quiesced_ioctls: u64,
    /// Kick-to-parked and blackout of the quiesce, if there was one.
    pub quiesce: Option<QuiesceTimes>,
    /// Wall time of the whole apply.
    pub update: Duration,
    /// Whether a failure was rolled back.
    pub rolled_back: bool,
}

/// Why a batch was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The model refuses the batch: nothing was sent to the kernel.
    #[error("the batch is refused by the model")]
    Invalid(#[source] BatchError),
    /// A call failed in the kernel; everything done before it was undone.
    #[error("call {index} failed; the batch was rolled back")]
    RolledBack {
        /// Index of the failed call (in the batch as the strategy ordered it).
        index: usize,
        /// The failure.
        #[source]
        source: Box<SlotCallError>,
        /// What the attempt and the rollback cost.
        stats: Box<ApplyStats>,
    },
    /// A dirty bitmap the batch would drop could not be read (first collection, vCPUs running):
    /// no call was made.
    #[error("the batch was not started")]
    DirtyLog(#[source] DirtyLogError),
    /// Undoing a failed batch failed too: the layout is the model's, but not the old one.
    #[error("rolling back after call {index} failed")]
    RollbackFailed {
        /// Index of the call whose failure started the rollback.
        index: usize,
        /// The rollback failure.
        #[source]
        source: Box<SlotCallError>,
    },
}

/// Told about every update, before the first call and after the last (the test guest's exit judge
/// uses it to know which layouts a vCPU may have seen).
pub trait UpdateObserver: Send + Sync + std::fmt::Debug {
    /// An update towards `target` starts.
    fn begin(&self, target: &Layout);
    /// The update ended in `result` (the target, or the old layout after a rollback).
    fn end(&self, result: &Layout);
}

/// Why a primitive was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyPrimitiveError {
    /// The primitive's preconditions fail, or its calls are refused by the model.
    #[error("the primitive cannot be lowered")]
    Lower(#[from] PrimitiveError),
    /// Applying its calls failed.
    #[error(transparent)]
    Apply(#[from] ApplyError),
}

/// A VM's slots, changed atomically while its vCPUs run.
#[derive(Debug)]
pub struct SlotUpdater {
    vm: Arc<dyn SlotVm>,
    memory: HostMemory,
    slots: SlotTable,
    dirty: DirtyLog,
    gate: Arc<VcpuGate>,
    /// Always `Some` but in `drop`.
    view: Option<Box<dyn View>>,
    ring: Option<Arc<DirtyRing>>,
    /// The view `new` made, for [`SlotUpdater::device_memory`]; `None` with the VMM's own.
    own_view: Option<GuestMemoryAtomic<GuestMemoryMmap>>,
    observer: Option<Arc<dyn UpdateObserver>>,
}

impl Drop for SlotUpdater {
    fn drop(&mut self) {
        // The slot table deletes every slot next: the view empties first, and whatever a reader
        // still holds is released by the reaper once the reader lets go.
        if let Some(mut view) = self.view.take() {
            let empty = view.prepare(&[]);
            view.publish(empty, &mut self.dirty);
            view::reap(view);
        }
    }
}

impl SlotUpdater {
    /// An updater for `vm`, parking vCPUs through `gate` (which the VMM's vCPU threads use), with
    /// a device view of its own ([`SlotUpdater::device_memory`]).
    pub fn new(vm: Arc<dyn SlotVm>, gate: Arc<VcpuGate>) -> Self {
        let own = GuestMemoryAtomic::new(GuestMemoryMmap::default());
        let mut updater = Self::with_view(vm, gate, own.clone());
        updater.own_view = Some(own);
        updater
    }

    /// An updater that keeps the VMM's own device view (`view`, address space 0) equal to the
    /// slots. With `B = AtomicBitmap` the pages devices write through it are harvested with the
    /// vCPUs' ([`SlotUpdater::dirty_pages`]); with `()` nothing is tracked. Whatever `view` held
    /// is replaced by the (empty) layout at once.
    pub fn with_view<B: ViewBitmap>(
        vm: Arc<dyn SlotVm>,
        gate: Arc<VcpuGate>,
        view: GuestMemoryAtomic<GuestMemoryMmap<B>>,
    ) -> Self {
        let slots = SlotTable::new(vm.clone());
        let mut updater = SlotUpdater {
            vm,
            memory: HostMemory::default(),
            slots,
            dirty: DirtyLog::default(),
            gate,
            view: Some(Box::new(TypedView::new(view))),
            own_view: None,
            ring: None,
            observer: None,
        };
        updater.publish();
        updater
    }

    /// Registers host memory slots may map. Registered memory may not overlap.
    pub fn add_backing(&mut self, backing: Backing) -> Result<Arc<Backing>, MemoryError> {
        if let Some(other) = self.memory.overlapping(backing.host(), backing.size()) {
            return Err(MemoryError::Overlap {
                name: backing.name().to_owned(),
                other: other.name().to_owned(),
            });
        }
        Ok(self.memory.add(backing))
    }

    /// Keeps dirty pages with KVM's dirty ring instead of bitmaps (`ring` enabled on this updater's
    /// VM): every reap and id change goes through it, so entries are translated through the slot
    /// they were pushed for. Set it before any logging slot exists; `false` (and nothing changed)
    /// otherwise.
    pub fn set_dirty_ring(&mut self, ring: Arc<DirtyRing>) -> bool {
        if self.layout().slots().any(|s| s.flags.log_dirty()) {
            return false;
        }
        self.ring = Some(ring);
        true
    }

    /// The dirty ring, if the updater keeps dirty pages with one.
    pub fn dirty_ring(&self) -> Option<&Arc<DirtyRing>> {
        self.ring.as_ref()
    }

    /// One slot call through the slot table, with the ring's id table kept in step.
    fn slot_call(&mut self, call: &SlotCall, injectable: bool) -> Result<Applied, SlotCallError> {
        let (slots, memory) = (&mut self.slots, &self.memory);
        let mut make = || {
            let applied = if injectable {
                slots.call(memory, call)?
            } else {
                slots.call_uninjected(memory, call)?
            };
            Ok((applied, slots.backing(call.slot).cloned()))
        };
        match self.ring.clone() {
            Some(ring) => ring.around(make),
            None => make().map(|(a, _)| a),
        }
    }

    /// Host addresses where one registered memory ends and another begins: a slot may not span
    /// them, so a plan for this updater cuts there ([`CutPolicy::with_host_boundaries`]). mmap
    /// often places two mappings back to back, and a map joins them where they are adjacent in
    /// GPA too.
    ///
    /// [`CutPolicy::with_host_boundaries`]: crate::planner::CutPolicy::with_host_boundaries
    pub fn host_edges(&self) -> Vec<u64> {
        self.memory.edges()
    }

    /// Unregisters memory: no new slot may map it. Slots and views that do keep it mapped until
    /// they go. Returns whether it was registered.
    pub fn remove_backing(&mut self, backing: &Arc<Backing>) -> bool {
        self.memory.remove(backing)
    }

    /// Tells the model about a guest_memfd of this VM: [`SlotTable::add_guest_memfd`].
    pub fn add_guest_memfd(&mut self, fd: u32, size: u64) {
        self.slots.add_guest_memfd(fd, size);
    }

    /// Sets the observer told about every update.
    pub fn set_observer(&mut self, observer: Arc<dyn UpdateObserver>) {
        self.observer = Some(observer);
    }

    /// The layout (equal to the kernel's).
    pub fn layout(&self) -> &Layout {
        self.slots.layout()
    }

    /// The VM.
    pub fn vm(&self) -> &Arc<dyn SlotVm> {
        &self.vm
    }

    /// The gate vCPUs are parked through.
    pub fn gate(&self) -> &Arc<VcpuGate> {
        &self.gate
    }

    /// The device-side view of guest memory (address space 0) made by [`SlotUpdater::new`],
    /// published with every batch inside the same window as the slot calls; `None` when the
    /// updater keeps the VMM's own ([`SlotUpdater::with_view`]).
    pub fn device_memory(&self) -> Option<&GuestMemoryAtomic<GuestMemoryMmap>> {
        self.own_view.as_ref()
    }

    /// Sets (or clears) fault injection on slot calls.
    pub fn inject_faults(&mut self, injector: Option<Box<dyn FaultHook>>) {
        self.slots.inject(injector);
    }

    /// Slot ioctls made so far.
    pub fn ioctls(&self) -> u64 {
        self.slots.ioctls()
    }

    /// The harvest: reads (and clears) the dirty bits of every logging slot and of the device
    /// view, and returns every page dirtied since the last call, by backing, whatever slot it was
    /// in then. The VMM must not call `KVM_GET_DIRTY_LOG` itself: the bits it read would be gone
    /// from here.
    ///
    /// On an error (the VM in dirty-ring mode, say) nothing is handed out: the bits already read
    /// are kept for the next call.
    pub fn dirty_pages(&mut self) -> Result<DirtyPages, DirtyLogError> {
        match self.ring.clone() {
            Some(ring) => {
                ring.reap().map_err(|errno| DirtyLogError::Ring { errno })?;
                self.dirty.absorb(ring.take());
            }
            None => {
                let logging: Vec<Slot> = self
                    .layout()
                    .slots()
                    .filter(|s| s.flags.log_dirty())
                    .copied()
                    .collect();
                for slot in &logging {
                    self.collect(slot)?;
                }
            }
        }
        if let Some(view) = self.view.as_mut() {
            view.drain(&mut self.dirty);
        }
        Ok(self.dirty.take())
    }

    /// Reads `slot`'s bitmap (the slot must exist) into its backing's.
    fn collect(&mut self, slot: &Slot) -> Result<u64, DirtyLogError> {
        if let Some(ring) = &self.ring {
            // Every ring, every slot: with the vCPUs held out, nothing of `slot` is left behind.
            return ring.reap().map_err(|errno| DirtyLogError::Ring { errno });
        }
        let backing = self
            .slots
            .backing(slot.id.raw())
            .expect("every slot holds its backing")
            .clone();
        self.dirty.collect(&*self.vm, slot, &backing)
    }

    /// Lowers a model primitive to raw calls and applies them atomically.
    pub fn apply_primitive(
        &mut self,
        primitive: &Primitive,
    ) -> Result<ApplyStats, ApplyPrimitiveError> {
        let lowered = self.slots.layout_mut().lower(primitive)?;
        Ok(self.apply(lowered.batch.calls())?)
    }

    /// The device-side view of `layout`: built outside any quiesce, so that inside one only the
    /// swap happens. `None` when a slot maps memory that is not registered (such a batch is
    /// refused by the slot table before any view is needed).
    fn view_of(&self, layout: &Layout) -> Option<Prepared> {
        let mut slots = Vec::new();
        for slot in layout.slots_by_gpa(0) {
            // The slot's own backing if it exists now (its memory may be unregistered since).
            let held = self
                .slots
                .backing(slot.id.raw())
                .filter(|_| self.slots.layout().slot(slot.id) == Some(slot));
            let backing = held.or_else(|| self.memory.owner(slot.host, slot.size))?;
            slots.push((*slot, backing.clone()));
        }
        Some(self.view.as_ref()?.prepare(&slots))
    }

    /// Swaps `view` in.
    fn swap_view(&mut self, view: Prepared) {
        if let Some(v) = self.view.as_mut() {
            v.publish(view, &mut self.dirty);
        }
    }

    /// Builds the view of the current layout and swaps it in.
    pub(crate) fn publish(&mut self) {
        if let Some(view) = self.view_of(self.slots.layout()) {
            self.swap_view(view);
        }
    }

    /// Applies `calls` (in order) as one atomic update: vCPUs are held out only for the calls
    /// that open a hole or drop a dirty bitmap, and no dirty bit is lost. On failure everything
    /// is undone.
    pub fn apply(&mut self, calls: &[SlotCall]) -> Result<ApplyStats, ApplyError> {
        self.apply_with(calls, Hold::Holes, DirtyBits::Keep)
    }

    /// Applies `calls` (in order) as one update, holding vCPUs out for `hold` and keeping dirty
    /// bits as `dirty` says. On failure everything is undone (with vCPUs held out).
    pub fn apply_with(
        &mut self,
        calls: &[SlotCall],
        hold: Hold,
        dirty: DirtyBits,
    ) -> Result<ApplyStats, ApplyError> {
        let start = Instant::now();
        let ioctls_before = self.slots.ioctls();
        let before = self.slots.layout().clone();
        let mut target = before.clone();
        target.apply_batch(calls).map_err(ApplyError::Invalid)?;
        let done = self
            .slots
            .layout_mut()
            .check_batch(calls)
            .map_err(ApplyError::Invalid)?;
        let window = match &hold {
            Hold::Holes => {
                let holes = self
                    .slots
                    .layout_mut()
                    .holes(calls)
                    .map_err(ApplyError::Invalid)?;
                let mut w = holes.quiesce_window();
                for (i, a) in done.iter().enumerate() {
                    if loses_dirty_bits(a) {
                        w = if w.is_empty() {
                            i..i + 1
                        } else {
                            w.start.min(i)..w.end.max(i + 1)
                        };
                    }
                }
                w
            }
            Hold::Calls(range) => range.start.min(calls.len())..range.end.min(calls.len()),
        };
        // Atomic: a first collection with vCPUs running keeps the one inside the hold short. A
        // bitmap that cannot be read stops the batch before its first call. Only slots that exist
        // now: one an earlier call of the batch creates is read just before the call that drops it.
        if hold == Hold::Holes && dirty == DirtyBits::Keep {
            for a in done.iter().filter(|a| loses_dirty_bits(a)) {
                let slot = a.before.expect("a change that loses bits has an old slot");
                if before.slot(slot.id) != Some(&slot) {
                    continue;
                }
                self.collect(&slot).map_err(ApplyError::DirtyLog)?;
            }
        }
        // Device views, built before any vCPU is held out: the layout at the window's end (if
        // calls follow it) and the final one.
        let mid_view = if !window.is_empty() && window.end < calls.len() {
            let mut mid = before.clone();
            mid.apply_batch(&calls[..window.end])
                .map_err(ApplyError::Invalid)?;
            self.view_of(&mid)
        } else {
            None
        };
        let views = Views {
            mid: mid_view,
            last: self.view_of(&target),
        };
        if let Some(o) = &self.observer {
            o.begin(&target);
        }
        let result = self.run_calls(calls, &done, window, dirty, views);
        if let Some(o) = &self.observer {
            o.end(self.slots.layout());
        }
        let (failure, quiesce, quiesced_ioctls) = result;
        let mut stats = ApplyStats {
            ioctls: self.slots.ioctls() - ioctls_before,
            quiesced_ioctls,
            quiesce,
            update: start.elapsed(),
            rolled_back: false,
        };
        match failure {
            None => Ok(stats),
            Some(Ok((index, source))) => {
                stats.rolled_back = true;
                Err(ApplyError::RolledBack {
                    index,
                    source: Box::new(source),
                    stats: Box::new(stats),
                })
            }
            Some(Err((index, source))) => Err(ApplyError::RollbackFailed {
                index,
                source: Box::new(source),
            }),
        }
    }

    /// Makes the calls, holding vCPUs out for `window`; on a failure undoes what was done.
    #[allow(clippy::type_complexity)]
    fn run_calls(
        &mut self,
        calls: &[SlotCall],
        preview: &[Applied],
        window: Range<usize>,
        dirty: DirtyBits,
        mut views: Views,
    ) -> (
        Option<Result<(usize, SlotCallError), (usize, SlotCallError)>>,
        Option<QuiesceTimes>,
        u64,
    ) {
        let gate = self.gate.clone();
        let mut held = None;
        let mut times = None;
        let mut quiesced_ioctls = 0;
        let mut done: Vec<Applied> = Vec::with_capacity(calls.len());
        for (i, call) in calls.iter().enumerate() {
            if i == window.start && !window.is_empty() {
                held = Some(gate.quiesce());
            }
            let ioctls = self.slots.ioctls();
            // The last read of a bitmap the call drops; if it fails, the call is not made and
            // the batch rolls back like a failed call.
            let unread = (dirty == DirtyBits::Keep && loses_dirty_bits(&preview[i]))
                .then(|| preview[i].before.expect("has an old slot"))
                .and_then(|slot| self.collect(&slot).err());
            let result = match unread {
                Some(source) => Err(SlotCallError::DirtyLog {
                    call: *call,
                    source,
                }),
                None => self.slot_call(call, true),
            };
            if held.is_some() {
                quiesced_ioctls += self.slots.ioctls() - ioctls;
            }
            match result {
                Ok(applied) => done.push(applied),
                Err(source) => {
                    // Undo with vCPUs held out, so the rollback opens no visible hole either.
                    let hold = held.take().unwrap_or_else(|| gate.quiesce());
                    for a in done.iter().rev() {
                        if let Some(made) = a.after.filter(|s| s.flags.log_dirty()) {
                            // The rollback cannot stop: a bitmap it cannot read counts as all
                            // dirty, so no page is lost.
                            if self.collect(&made).is_err() {
                                let backing = self.slots.backing(made.id.raw()).cloned();
                                if let Some(b) = backing {
                                    self.dirty.mark_all(&made, &b);
                                }
                            }
                        }
                        let undo = inverse(a);
                        let before = self.slots.ioctls();
                        if let Err(e) = self.slot_call(&undo, false) {
                            self.publish();
                            hold.resume();
                            return (Some(Err((i, e))), None, quiesced_ioctls);
                        }
                        quiesced_ioctls += self.slots.ioctls() - before;
                    }
                    self.publish();
                    times = Some(hold.resume());
                    return (Some(Ok((i, source))), times, quiesced_ioctls);
                }
            }
            if held.is_some() && i + 1 == window.end {
                // Only the swap happens with vCPUs held out.
                match views.mid.take().or_else(|| views.last.take()) {
                    Some(view) => self.swap_view(view),
                    None => self.publish(),
                }
                times = held.take().map(|h| h.resume());
            }
        }
        match views.last {
            Some(last) => self.swap_view(last),
            // Not built before (see `view_of`): every call went through, so it builds now.
            None if window.is_empty() || window.end < calls.len() => self.publish(),
            None => {}
        }
        (None, times, quiesced_ioctls)
    }
}

/// The device views an apply swaps in, built before it starts.
struct Views {
    /// The layout at the end of the quiesce window, when calls follow it.
    mid: Option<Prepared>,
    /// The layout after the last call.
    last: Option<Prepared>,
}

/// Whether a change drops the slot's dirty bitmap (or might: a MOVE is treated alike).
fn loses_dirty_bits(a: &Applied) -> bool {
    let Some(old) = a.before else { return false };
    old.flags.log_dirty()
        && match a.change {
            Change::Delete | Change::Move => true,
            Change::FlagsOnly => !a.after.is_some_and(|s| s.flags.log_dirty()),
            _ => false,
        }
}

/// The call that undoes an accepted call.
fn inverse(a: &Applied) -> SlotCall {
    match (a.before, a.after) {
        (Some(old), _) => old.set_call(),
        (None, Some(new)) => new.delete_call(),
        (None, None) => unreachable!("an accepted call has a slot before or after"),
    }
}

impl SlotBackend for SlotUpdater {
    type Error = ApplyPrimitiveError;

    fn name(&self) -> &'static str {
        "kvm"
    }

    fn layout(&self) -> &Layout {
        SlotUpdater::layout(self)
    }

    fn apply_batch(&mut self, calls: &[SlotCall]) -> Result<(), Self::Error> {
        self.apply(calls)?;
        Ok(())
    }

    fn apply_primitive(&mut self, primitive: &Primitive) -> Result<(), Self::Error> {
        SlotUpdater::apply_primitive(self, primitive)?;
        Ok(())
    }
}
