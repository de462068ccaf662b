//! The device-side view of guest memory: the VMM's own `GuestMemoryAtomic<GuestMemoryMmap<B>>`,
//! kept equal to the slots of address space 0 and swapped inside the same window as the slot
//! calls, so a device thread never sees a layout the vCPUs could not.
//!
//! Trade-offs, stated first:
//! - **Read-only slots are left out.** vm-memory does not enforce a region's protection, so a
//!   read-only slot in the view would be writable by a device. A device access there fails as a
//!   guest write there exits to the VMM: the VMM emulates its ROM itself.
//! - **Memory outlives views, not the other way round.** Each view region holds its backing's
//!   `Arc`; a replaced region is kept (with its backing) until no reader holds a snapshot with it,
//!   which is checked at every update and harvest, and, once the updater is gone, by a short-lived
//!   reaper thread. Nothing is unmapped under a reader and nothing leaks.
//! - **Device writes are dirty pages too.** With a tracking bitmap (`AtomicBitmap`), the bits a
//!   device set through any view (current or replaced) go into the harvest, by backing.
//! - **Only what a batch changed is rebuilt.** A slot the batch leaves alone keeps its region (and
//!   the device bits in it); the collection itself is vm-memory's, rebuilt from the regions, so
//!   a batch still costs one pointer per slot.

use std::any::Any;
use std::collections::{HashMap, HashSet};
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vm_memory::bitmap::{AtomicBitmap, Bitmap};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap, GuestRegionMmap};

use crate::model::{Slot, PAGE_SIZE};

use super::dirty::DirtyLog;
use super::memory::Backing;

/// A vm-memory bitmap a view region can carry: made fresh for each region, and drained of the
/// pages a device dirtied through it.
pub trait ViewBitmap: Bitmap + Send + Sync + 'static {
    /// The bitmap of a new view region of `len` bytes.
    fn for_region(len: usize) -> Self;

    /// Calls `page` with the index (4 KiB pages from the region's start) of every page marked
    /// dirty, and clears them.
    fn drain(&self, page: &mut dyn FnMut(u64));
}

/// No tracking: costs nothing.
impl ViewBitmap for () {
    fn for_region(_len: usize) -> Self {}

    fn drain(&self, _page: &mut dyn FnMut(u64)) {}
}

/// One bit per 4 KiB page, set by vm-memory on every write through the view.
impl ViewBitmap for AtomicBitmap {
    fn for_region(len: usize) -> Self {
        AtomicBitmap::new(
            len,
            NonZeroUsize::new(PAGE_SIZE as usize).expect("non-zero"),
        )
    }

    fn drain(&self, page: &mut dyn FnMut(u64)) {
        for (w, word) in self.get_and_reset().into_iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let b = bits.trailing_zeros() as u64;
                bits &= bits - 1;
                page(w as u64 * 64 + b);
            }
        }
    }
}

/// A view built outside any quiesce, ready to be swapped in.
pub(crate) struct Prepared(Box<dyn Any + Send>);

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Prepared")
    }
}

/// What the updater does with a view, whatever its bitmap type.
pub(crate) trait View: Send + Sync + std::fmt::Debug {
    /// Builds the view of `slots` (address space 0, each with the backing holding it).
    fn prepare(&self, slots: &[(Slot, Arc<Backing>)]) -> Prepared;
    /// Swaps `view` in; the replaced regions are kept until no reader holds them.
    fn publish(&mut self, view: Prepared, log: &mut DirtyLog);
    /// Moves every region's device-dirtied pages into `log`, and lets go of replaced regions
    /// no reader holds any more.
    fn drain(&mut self, log: &mut DirtyLog);
    /// Whether a reader still holds a replaced region.
    fn in_use(&self) -> bool;
}

/// One region of a view and the memory it points into.
struct Held<B> {
    region: Arc<GuestRegionMmap<B>>,
    backing: Arc<Backing>,
    /// The slot the region was built for: GPA, size, host address of its first byte.
    gpa: u64,
    size: u64,
    host: u64,
}

impl<B: ViewBitmap> Held<B> {
    fn drain(&self, log: &mut DirtyLog) {
        self.region
            .bitmap()
            .drain(&mut |p| log.mark(&self.backing, self.host + p * PAGE_SIZE));
    }
}

/// The VMM's view, with the regions in it and those replaced but maybe still read.
pub(crate) struct TypedView<B: ViewBitmap> {
    atomic: GuestMemoryAtomic<GuestMemoryMmap<B>>,
    current: Vec<Held<B>>,
    replaced: Vec<Held<B>>,
}

impl<B: ViewBitmap> std::fmt::Debug for TypedView<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TypedView")
            .field("current", &self.current.len())
            .field("replaced", &self.replaced.len())
            .finish()
    }
}

impl<B: ViewBitmap> TypedView<B> {
    pub(crate) fn new(atomic: GuestMemoryAtomic<GuestMemoryMmap<B>>) -> Self {
        TypedView {
            atomic,
            current: Vec::new(),
            replaced: Vec::new(),
        }
    }
}

impl<B: ViewBitmap> View for TypedView<B> {
    fn prepare(&self, slots: &[(Slot, Arc<Backing>)]) -> Prepared {
        // A slot the current view already holds, over the same memory, keeps its region (and
        // the device bits in it): only what the batch changed is built anew.
        let current: HashMap<(u64, u64, u64), &Held<B>> = self
            .current
            .iter()
            .map(|h| ((h.gpa, h.size, h.host), h))
            .collect();
        let mut held = Vec::new();
        for (slot, backing) in slots.iter().filter(|(s, _)| !s.flags.readonly()) {
            if let Some(h) = current
                .get(&(slot.gpa, slot.size, slot.host))
                .filter(|h| Arc::ptr_eq(&h.backing, backing))
            {
                held.push(Held {
                    region: h.region.clone(),
                    backing: h.backing.clone(),
                    ..**h
                });
                continue;
            }
            let size = slot.size as usize;
            let mut builder = MmapRegionBuilder::new_with_bitmap(size, B::for_region(size))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_SHARED);
            if let Some(file) = backing.file_offset(slot.host) {
                builder = builder.with_file_offset(file);
            }
            // SAFETY: the slot's range lies inside `backing` (the slot table only maps registered
            // memory), which stays mapped while this region exists: `Held` keeps its `Arc`, and a
            // region is dropped only once no reader holds it.
            let builder = unsafe { builder.with_raw_mmap_pointer(backing.ptr(slot.host)) };
            let region = builder
                .build()
                .ok()
                .and_then(|r| GuestRegionMmap::new(r, GuestAddress(slot.gpa)))
                .expect("a page-aligned range of registered memory maps");
            held.push(Held {
                region: Arc::new(region),
                backing: backing.clone(),
                gpa: slot.gpa,
                size: slot.size,
                host: slot.host,
            });
        }
        // vm-memory refuses an empty collection: no slot is the empty view.
        let memory = if held.is_empty() {
            GuestMemoryMmap::default()
        } else {
            GuestMemoryMmap::from_arc_regions(held.iter().map(|h| h.region.clone()).collect())
                .expect("slots of one space never overlap")
        };
        Prepared(Box::new((memory, held)))
    }

    fn publish(&mut self, view: Prepared, log: &mut DirtyLog) {
        let (memory, held) = *view
            .0
            .downcast::<(GuestMemoryMmap<B>, Vec<Held<B>>)>()
            .expect("prepared by this view");
        self.atomic
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(memory);
        // A region the new view kept is current, not replaced (a batch's first view may have
        // replaced it and its second taken it back).
        let kept: HashSet<*const GuestRegionMmap<B>> =
            held.iter().map(|h| Arc::as_ptr(&h.region)).collect();
        self.replaced
            .retain(|h| !kept.contains(&Arc::as_ptr(&h.region)));
        let old = std::mem::replace(&mut self.current, held);
        self.replaced.extend(
            old.into_iter()
                .filter(|h| !kept.contains(&Arc::as_ptr(&h.region))),
        );
        self.release(log);
    }

    fn drain(&mut self, log: &mut DirtyLog) {
        for h in &self.current {
            h.drain(log);
        }
        self.release(log);
    }

    fn in_use(&self) -> bool {
        self.replaced
            .iter()
            .any(|h| Arc::strong_count(&h.region) > 1)
    }
}

impl<B: ViewBitmap> TypedView<B> {
    /// Drains every replaced region and drops those only this view still holds. The swap in
    /// `publish` has already turned readers' borrowed snapshots into counted ones (arc-swap pays
    /// its debts on a store), so a count of one means no reader.
    fn release(&mut self, log: &mut DirtyLog) {
        self.replaced.retain(|h| {
            h.drain(log);
            Arc::strong_count(&h.region) > 1
        });
    }
}

/// Views whose updater is gone while a reader still held a replaced region.
static PENDING: Mutex<Vec<Box<dyn View>>> = Mutex::new(Vec::new());
/// Whether the reaper thread runs (changed only with `PENDING` locked).
static REAPING: AtomicBool = AtomicBool::new(false);

/// Once the updater is gone: a reaper thread, off any VMM thread, waits until no reader holds a
/// replaced region, then drops them with their memory. Device bits drained there have no harvest
/// left to go to. If no thread can be started the views stay pending (mapped): never an unmap
/// under a reader.
pub(crate) fn reap(view: Box<dyn View>) {
    if !view.in_use() {
        return;
    }
    let mut pending = PENDING.lock().unwrap_or_else(|p| p.into_inner());
    pending.push(view);
    if REAPING.swap(true, Ordering::SeqCst) {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("memslots-reaper".into())
        .spawn(|| loop {
            std::thread::sleep(Duration::from_millis(10));
            let mut pending = PENDING.lock().unwrap_or_else(|p| p.into_inner());
            let mut log = DirtyLog::default();
            pending.retain_mut(|v| {
                v.drain(&mut log);
                v.in_use()
            });
            if pending.is_empty() {
                REAPING.store(false, Ordering::SeqCst);
                return;
            }
        });
    if spawned.is_err() {
        REAPING.store(false, Ordering::SeqCst);
    }
}
