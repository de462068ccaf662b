//! The atomic apply of a batch to a running VM: the part a VMM embeds.
//!
//! [`SlotUpdater`] owns the VM's slots (through the one [`SlotTable`]), the host memory behind them,
//! the per-backing dirty log and the device-side view, and parks the VMM's vCPUs through its
//! [`VcpuGate`] only for the calls that need it.

use std::collections::BTreeSet;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::backend::SlotBackend;
use crate::model::{
    Applied, BatchError, Change, Layout, Primitive, PrimitiveError, Slot, SlotCall,
};

use super::dirty::{DirtyLog, DirtyLogError};
use super::gate::{QuiesceTimes, VcpuGate};
use super::memory::{Backing, HostMemory};
use super::slots::{FaultHook, SlotCallError, SlotTable};
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
    device: GuestMemoryAtomic<GuestMemoryMmap>,
    observer: Option<Arc<dyn UpdateObserver>>,
    views_out: std::sync::atomic::AtomicBool,
}

impl Drop for SlotUpdater {
    fn drop(&mut self) {
        // A device thread may still hold a snapshot of the view, which points into the backings
        // without owning them: once views were handed out, keep the memory mapped for good.
        if self.views_out.load(std::sync::atomic::Ordering::Relaxed) {
            std::mem::forget(std::mem::take(&mut self.memory));
        }
    }
}

impl SlotUpdater {
    /// An updater for `vm`, parking vCPUs through `gate` (which the VMM's vCPU threads use).
    pub fn new(vm: Arc<dyn SlotVm>, gate: Arc<VcpuGate>) -> Self {
        let slots = SlotTable::new(vm.clone());
        SlotUpdater {
            vm,
            memory: HostMemory::default(),
            slots,
            dirty: DirtyLog::default(),
            gate,
            device: GuestMemoryAtomic::new(GuestMemoryMmap::default()),
            observer: None,
            views_out: Default::default(),
        }
    }

    /// Adds host memory slots may map; it lives as long as the updater.
    pub fn add_backing(&mut self, backing: Backing) -> Arc<Backing> {
        self.memory.add(backing)
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

    /// The device-side view of guest memory (address space 0), published with every batch inside
    /// the same window as the slot calls.
    pub fn device_memory(&self) -> &GuestMemoryAtomic<GuestMemoryMmap> {
        self.views_out
            .store(true, std::sync::atomic::Ordering::Relaxed);
        &self.device
    }

    /// Sets (or clears) fault injection on slot calls.
    pub fn inject_faults(&mut self, injector: Option<Box<dyn FaultHook>>) {
        self.slots.inject(injector);
    }

    /// Slot ioctls made so far.
    pub fn ioctls(&self) -> u64 {
        self.slots.ioctls()
    }

    /// Reads (and clears) the dirty bits of every logging slot, and returns and clears every
    /// dirty host page collected since the last call, whatever slot it was in then. The VMM must
    /// not call `KVM_GET_DIRTY_LOG` itself: the bits it read would be gone from here.
    ///
    /// On an error (the VM in dirty-ring mode, say) nothing is handed out: the bits already read
    /// are kept for the next call.
    pub fn dirty_pages(&mut self) -> Result<BTreeSet<u64>, DirtyLogError> {
        let logging: Vec<Slot> = self
            .layout()
            .slots()
            .filter(|s| s.flags.log_dirty())
            .copied()
            .collect();
        for slot in &logging {
            self.dirty.collect(&*self.vm, slot)?;
        }
        Ok(self.dirty.take())
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
    /// swap happens. `None` when a slot maps memory the updater does not own (such a batch is
    /// refused by the slot table before any view is needed).
    fn view_of(&self, layout: &Layout) -> Option<GuestMemoryMmap> {
        let mut regions = Vec::new();
        for slot in layout.slots_by_gpa(0) {
            let prot = if slot.flags.readonly() {
                libc::PROT_READ
            } else {
                libc::PROT_READ | libc::PROT_WRITE
            };
            let backing = self.memory.owner(slot.host, slot.size)?;
            // SAFETY: the range lies inside `backing`, which is never unmapped while a view built
            // here may be alive: backings live as long as the updater, and once views have been
            // handed out the updater's `Drop` leaks them instead of unmapping them.
            let region = unsafe {
                MmapRegion::build_raw(
                    backing.ptr(slot.host),
                    slot.size as usize,
                    prot,
                    libc::MAP_SHARED,
                )
            };
            let region = region
                .ok()
                .and_then(|r| GuestRegionMmap::new(r, GuestAddress(slot.gpa)))
                .expect("a page-aligned range of owned memory maps");
            regions.push(region);
        }
        // vm-memory refuses an empty collection: no slot is the empty view.
        Some(if regions.is_empty() {
            GuestMemoryMmap::default()
        } else {
            GuestMemoryMmap::from_regions(regions).expect("slots of one space never overlap")
        })
    }

    /// Swaps `view` in.
    fn swap_view(&self, view: GuestMemoryMmap) {
        self.device
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(view);
    }

    /// Builds the view of the current layout and swaps it in.
    pub(crate) fn publish(&self) {
        let view = self.view_of(self.slots.layout());
        self.swap_view(view.expect("the slot table only maps owned memory"));
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
                self.dirty
                    .collect(&*self.vm, &slot)
                    .map_err(ApplyError::DirtyLog)?;
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
                .and_then(|slot| self.dirty.collect(&*self.vm, &slot).err());
            let result = match unread {
                Some(e) => Err(SlotCallError::DirtyLog {
                    call: *call,
                    slot: e.slot,
                    errno: e.errno,
                }),
                None => self.slots.call(&self.memory, call),
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
                            if self.dirty.collect(&*self.vm, &made).is_err() {
                                self.dirty.mark_all(&made);
                            }
                        }
                        let undo = inverse(a);
                        let before = self.slots.ioctls();
                        if let Err(e) = self.slots.call_uninjected(&self.memory, &undo) {
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
    mid: Option<GuestMemoryMmap>,
    /// The layout after the last call.
    last: Option<GuestMemoryMmap>,
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
