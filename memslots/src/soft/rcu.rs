//! Two copies of a value, one active for readers and one inactive for the single writer, with
//! per-reader epoch counters for grace periods (the scheme of KVM's two memslot sets under SRCU,
//! and of the `left-right` crate).
//!
//! Readers never lock, never allocate and never write shared memory other than their own
//! cache-line-sized counter. The writer changes the inactive copy at will, [`Publisher::publish`]es
//! it (swap, then grace period), and from then on has the old copy to itself again: no reader can
//! still be inside it. That is what lets the writer replay a change on the old copy in place
//! (O(change), never a copy of the whole value) and free what it removed.
//!
//! Protocol (checked by `tests/soft_loom.rs`):
//! - reader: `counter += 1` (Release; odd: inside), SeqCst fence, load `active` (Acquire), read
//!   that copy, `counter += 1` (Release: even, outside);
//! - writer: store `active` (Release), SeqCst fence, then for every reader whose counter is odd,
//!   wait until it changes (Acquire). The fences make it impossible for a reader to enter after
//!   the writer has looked at its counter and still load the old `active`.

use std::fmt;

use super::sync::{
    fence, spin_wait, Arc, AtomicU64, AtomicUsize, Mutex, MutexGuard, Ordering, UnsafeCell,
};

/// One reader's epoch counter, alone on its cache line so that readers do not slow each other.
#[repr(align(128))]
#[derive(Debug)]
struct ReaderEpoch {
    counter: AtomicU64,
}

struct Shared<T> {
    copies: [UnsafeCell<T>; 2],
    active: AtomicUsize,
    readers: Mutex<Vec<Arc<ReaderEpoch>>>,
}

// SAFETY: the copies are only read through `&T` by readers (so `T: Sync` is needed to share them)
// and changed through `&mut T` by the one `Publisher` (which may run on another thread than the one
// that made `T`, so `T: Send`); the epoch protocol keeps those accesses apart in time.
unsafe impl<T: Send + Sync> Sync for Shared<T> {}
// SAFETY: as above; `Shared` owns the copies and drops them on whichever thread drops it last.
unsafe impl<T: Send + Sync> Send for Shared<T> {}

/// The single writer of a pair of copies.
pub struct Publisher<T> {
    shared: Arc<Shared<T>>,
    /// The index readers are sent to (only the writer changes it).
    active: usize,
    grace_periods: u64,
}

impl<T> fmt::Debug for Publisher<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Publisher")
            .field("active", &self.active)
            .field("grace_periods", &self.grace_periods)
            .finish_non_exhaustive()
    }
}

impl<T> Publisher<T> {
    /// Two copies of one value: `active` is what readers see first, `inactive` must be equal to it
    /// (the writer keeps them equal by replaying every change).
    pub fn new(active: T, inactive: T) -> Self {
        Publisher {
            shared: Arc::new(Shared {
                copies: [UnsafeCell::new(active), UnsafeCell::new(inactive)],
                active: AtomicUsize::new(0),
                readers: Mutex::new(Vec::new()),
            }),
            active: 0,
            grace_periods: 0,
        }
    }

    /// A new reader handle (registers one epoch counter; allocates, so do it once per thread).
    pub fn reader(&self) -> ReadHandle<T> {
        let epoch = Arc::new(ReaderEpoch {
            counter: AtomicU64::new(0),
        });
        lock(&self.shared.readers).push(epoch.clone());
        ReadHandle {
            shared: self.shared.clone(),
            epoch,
        }
    }

    /// Reads the active copy (the writer never changes it, so no protocol is needed).
    pub fn with_active<R>(&self, f: impl FnOnce(&T) -> R) -> R {
        self.shared.copies[self.active].with(|ptr| {
            // SAFETY: only the writer (`&self` of the unique `Publisher`) ever mutates a copy, and
            // only the inactive one; readers only read. So no `&mut` to this copy exists.
            f(unsafe { &*ptr })
        })
    }

    /// Changes the inactive copy; readers cannot see it until [`Publisher::publish`].
    pub fn with_inactive<R>(&mut self, f: impl FnOnce(&mut T) -> R) -> R {
        self.shared.copies[1 - self.active].with_mut(|ptr| {
            // SAFETY: no reader is in the inactive copy: it was never active (start), or it was
            // unpublished by `publish`, which returned only after a grace period, and readers
            // arriving since then were sent to the other copy. `&mut self` excludes other writes.
            f(unsafe { &mut *ptr })
        })
    }

    /// Makes the inactive copy active, then waits for a grace period: when this returns, no
    /// reader is still inside the old copy, which is now the inactive one.
    pub fn publish(&mut self) {
        let new = 1 - self.active;
        self.shared.active.store(new, Ordering::Release);
        self.active = new;
        fence(Ordering::SeqCst);
        self.grace_period();
    }

    /// Waits until every reader that may have loaded the old `active` index has left.
    fn grace_period(&mut self) {
        let readers = lock(&self.shared.readers);
        for reader in readers.iter() {
            let seen = reader.counter.load(Ordering::Acquire);
            if seen % 2 == 1 {
                let mut round = 0;
                while reader.counter.load(Ordering::Acquire) == seen {
                    spin_wait(round);
                    round = round.saturating_add(1);
                }
            }
        }
        self.grace_periods += 1;
    }

    /// Grace periods waited for so far.
    pub fn grace_periods(&self) -> u64 {
        self.grace_periods
    }

    /// Number of reader handles alive.
    pub fn readers(&self) -> usize {
        lock(&self.shared.readers).len()
    }
}

/// A reader of the active copy, one per thread; reading allocates nothing and takes no lock.
pub struct ReadHandle<T> {
    shared: Arc<Shared<T>>,
    epoch: Arc<ReaderEpoch>,
}

impl<T> fmt::Debug for ReadHandle<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadHandle")
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

/// Leaves the read-side critical section even if the reading closure panics.
struct Exit<'a> {
    counter: &'a AtomicU64,
    value: u64,
}

impl Drop for Exit<'_> {
    fn drop(&mut self) {
        self.counter.store(self.value, Ordering::Release);
    }
}

impl<T> ReadHandle<T> {
    /// Runs `f` on the active copy. The copy cannot change or be freed while `f` runs; a
    /// [`Publisher::publish`] that starts meanwhile waits for `f` to return.
    pub fn read<R>(&mut self, f: impl FnOnce(&T) -> R) -> R {
        // Only this handle writes its counter (`&mut self`), so a plain load/store pair is enough.
        // The entering store is Release too: a writer that waited on our previous section may see
        // this value, not the exit store, and must still be ordered after that section's reads
        // (loom found this: a plain store does not continue the exit store's release sequence).
        let before = self.epoch.counter.load(Ordering::Relaxed);
        self.epoch.counter.store(before + 1, Ordering::Release);
        fence(Ordering::SeqCst);
        let index = self.shared.active.load(Ordering::Acquire);
        let _exit = Exit {
            counter: &self.epoch.counter,
            value: before + 2,
        };
        self.shared.copies[index].with(|ptr| {
            // SAFETY: our counter is odd and the fence orders it before the load of `active`, so
            // a writer that unpublishes this copy sees us inside and waits before changing it.
            f(unsafe { &*ptr })
        })
    }
}

impl<T> Drop for ReadHandle<T> {
    fn drop(&mut self) {
        let mut readers = lock(&self.shared.readers);
        readers.retain(|r| !Arc::ptr_eq(r, &self.epoch));
    }
}

/// Locks the reader registry; a panic elsewhere while holding it leaves a list that is still valid.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
