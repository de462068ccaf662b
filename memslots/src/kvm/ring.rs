//! KVM's dirty ring (`KVM_CAP_DIRTY_LOG_RING`), kept exact across re-slotting.
//!
//! An entry names a slot id and a page offset in it; once that slot is deleted, moved or its id
//! re-used, the entry is ambiguous (QEMU's reaper marks whatever slot has the id now, or drops the
//! entry). The rule that keeps every entry unambiguous here: **the rings are reaped with the vCPUs
//! out of `KVM_RUN` before any call that deletes or moves a logging slot or turns its logging off**
//! (the updater does it inside the quiesce its batch takes for those calls), and the table that
//! translates ids is changed under the same lock as the reaper, together with the slot call. So an
//! entry is always translated through the slot that was live when it was pushed:
//! - a *delete* or *move* of a logging slot, or *logging turned off*: reaped just before, with no
//!   vCPU in `KVM_RUN`, so no entry for the old slot can be pushed after the reap;
//! - an *id re-used*: its old logging slot was deleted, so reaped before that delete: no entry with
//!   the old meaning is left;
//! - a *new* logging slot (created, or logging turned on): its id enters the table under the
//!   reaper's lock together with the ioctl, so a concurrent reap (a vCPU thread handling
//!   `KVM_EXIT_DIRTY_RING_FULL`) never meets an id it cannot translate.
//!
//! Harvested entries are marked for reset and `KVM_RESET_DIRTY_RINGS` is called in the same reap,
//! so the kernel's re-protection also acts on the slot the entry was pushed for.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use kvm_bindings::{kvm_dirty_gfn, KVM_DIRTY_LOG_PAGE_OFFSET};

use crate::model::{Applied, Slot, PAGE_SIZE};

use super::dirty::{DirtyLog, DirtyPages};
use super::memory::Backing;
use super::vm::SlotVm;

/// `KVM_DIRTY_GFN_F_DIRTY`: the entry holds a dirty page not yet harvested.
const F_DIRTY: u32 = 1;
/// `KVM_DIRTY_GFN_F_RESET`: harvested; the kernel may re-protect the page and reuse the entry.
const F_RESET: u32 = 2;
/// `KVM_EXIT_DIRTY_RING_FULL`: a vCPU's ring is full; reap before it enters again.
pub const EXIT_DIRTY_RING_FULL: u32 = kvm_bindings::KVM_EXIT_DIRTY_RING_FULL;

/// Why the dirty ring could not be set up or reaped.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    /// The ring size must be a power of two of at least one page, and within the kernel's limit.
    #[error("a dirty ring of {bytes} bytes is not a power of two between 4096 and {max} bytes")]
    Size {
        /// Asked for.
        bytes: u32,
        /// The kernel's limit (0: no dirty ring on this kernel).
        max: u32,
    },
    /// `KVM_ENABLE_CAP` failed (after a vCPU exists, for one).
    #[error("enabling the dirty ring failed with errno {0} (it must be enabled before any vCPU)")]
    Enable(i32),
    /// The vCPU's ring is mapped already.
    #[error("vCPU {0}'s dirty ring is mapped already")]
    Twice(usize),
    /// Mapping a vCPU's ring failed.
    #[error("mapping vCPU {index}'s dirty ring")]
    Map {
        /// The vCPU.
        index: usize,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// One vCPU's ring, mapped from its fd.
struct RingMap {
    index: usize,
    entries: NonNull<kvm_dirty_gfn>,
    count: u32,
    /// The next entry to harvest (the kernel's and ours move in step).
    fetch: u32,
}

// SAFETY: the mapping is shared memory the kernel writes; it is only read and written under the
// ring's mutex, through atomics for the flags.
unsafe impl Send for RingMap {}

impl Drop for RingMap {
    fn drop(&mut self) {
        // SAFETY: mapped by `DirtyRing::add_vcpu` with this length; nothing refers to it now.
        unsafe {
            libc::munmap(
                self.entries.as_ptr().cast(),
                self.count as usize * std::mem::size_of::<kvm_dirty_gfn>(),
            )
        };
    }
}

/// What the reaper keeps under its lock.
struct State {
    rings: Vec<RingMap>,
    /// Logging slots by raw id (address space in bits 16 and up), with their memory.
    slots: BTreeMap<u32, (Slot, Arc<Backing>)>,
    log: DirtyLog,
}

/// The VM's dirty rings: mapped per vCPU, reaped into one bitmap per backing.
pub struct DirtyRing {
    vm: Arc<dyn SlotVm>,
    bytes: u32,
    state: Mutex<State>,
    /// Entries that named an id no logging slot had: 0 unless the rule above was broken.
    untranslated: AtomicU64,
    /// Reaps that found a ring full (and so counted every logging page dirty).
    overflows: AtomicU64,
    reaps: AtomicU64,
}

impl std::fmt::Debug for DirtyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyRing")
            .field("bytes", &self.bytes)
            .field("untranslated", &self.untranslated)
            .finish()
    }
}

impl DirtyRing {
    /// Puts `vm` in dirty-ring mode with rings of `bytes` per vCPU (a power of two; 16 bytes an
    /// entry). KVM requires this before any vCPU is created; from then on `KVM_GET_DIRTY_LOG`
    /// fails, so hand the ring to the updater ([`SlotUpdater::set_dirty_ring`]) and map each
    /// vCPU's ring ([`DirtyRing::add_vcpu`]) as it is created.
    ///
    /// [`SlotUpdater::set_dirty_ring`]: super::SlotUpdater::set_dirty_ring
    pub fn enable(vm: Arc<dyn SlotVm>, bytes: u32) -> Result<Arc<Self>, RingError> {
        let max = vm.dirty_ring_max();
        if !bytes.is_power_of_two() || bytes < PAGE_SIZE as u32 || bytes > max {
            return Err(RingError::Size { bytes, max });
        }
        vm.enable_dirty_ring(bytes).map_err(RingError::Enable)?;
        Ok(Arc::new(DirtyRing {
            vm,
            bytes,
            state: Mutex::new(State {
                rings: Vec::new(),
                slots: BTreeMap::new(),
                log: DirtyLog::default(),
            }),
            untranslated: AtomicU64::new(0),
            overflows: AtomicU64::new(0),
            reaps: AtomicU64::new(0),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ring size per vCPU in bytes.
    pub fn bytes(&self) -> u32 {
        self.bytes
    }

    /// Maps vCPU `index`'s ring (call once per vCPU, right after creating it).
    pub fn add_vcpu(&self, index: usize, vcpu: &kvm_ioctls::VcpuFd) -> Result<(), RingError> {
        if self.lock().rings.iter().any(|r| r.index == index) {
            return Err(RingError::Twice(index));
        }
        // SAFETY: maps the vCPU fd's ring pages shared, at the offset KVM documents; the kernel
        // keeps them alive while the mapping exists, whatever happens to `vcpu`.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                self.bytes as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                KVM_DIRTY_LOG_PAGE_OFFSET as libc::off_t * PAGE_SIZE as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(RingError::Map {
                index,
                source: std::io::Error::last_os_error(),
            });
        }
        let entries = NonNull::new(p.cast()).expect("mmap never returns null on success");
        let count = self.bytes / std::mem::size_of::<kvm_dirty_gfn>() as u32;
        self.lock().rings.push(RingMap {
            index,
            entries,
            count,
            fetch: 0,
        });
        Ok(())
    }

    /// Harvests every vCPU's ring into the per-backing bitmaps, marks the entries harvested and
    /// resets the rings. Callable from any thread, a vCPU thread handling
    /// `KVM_EXIT_DIRTY_RING_FULL` included (it must, before that vCPU enters again). Returns the
    /// entries harvested; `Err` carries the errno of `KVM_RESET_DIRTY_RINGS`.
    pub fn reap(&self) -> Result<u64, i32> {
        let mut state = self.lock();
        let State { rings, slots, log } = &mut *state;
        let mut n = 0;
        let mut wrapped = false;
        for ring in rings.iter_mut() {
            let mut in_ring = 0u32;
            loop {
                let i = (ring.fetch % ring.count) as usize;
                // SAFETY: `i < count`, inside the mapping; the flags word is read and written
                // atomically (the kernel writes it too), the rest only after seeing F_DIRTY.
                let e = unsafe { ring.entries.as_ptr().add(i) };
                // SAFETY: as above: `flags` is the entry's first, 4-aligned field.
                let flags = unsafe { AtomicU32::from_ptr(std::ptr::addr_of_mut!((*e).flags)) };
                if flags.load(Ordering::Acquire) & F_DIRTY == 0 {
                    break;
                }
                // SAFETY: the entry is published (acquire above) and not written again by the
                // kernel until we hand it back with F_RESET.
                let (slot, offset) = unsafe { ((*e).slot, (*e).offset) };
                match slots.get(&slot) {
                    Some((s, backing)) if offset < s.pages() => {
                        log.mark(backing, s.host + offset * PAGE_SIZE);
                    }
                    _ => {
                        self.untranslated.fetch_add(1, Ordering::Relaxed);
                    }
                }
                flags.store(F_RESET, Ordering::Release);
                ring.fetch = ring.fetch.wrapping_add(1);
                n += 1;
                in_ring += 1;
                if in_ring == ring.count {
                    break;
                }
            }
            // KVM stops a vCPU before its ring is full (soft limit); a ring found full was pushed
            // past it and may have wrapped over entries never seen (nested PVM does that when the
            // guest keeps faulting). Which pages those were is unknowable: count every page of
            // every logging slot as dirty, so that none is lost.
            wrapped |= in_ring == ring.count;
        }
        if wrapped {
            self.overflows.fetch_add(1, Ordering::Relaxed);
            for (s, backing) in slots.values() {
                log.mark_all(s, backing);
            }
        }
        if n > 0 {
            self.vm.reset_dirty_rings()?;
        }
        self.reaps.fetch_add(1, Ordering::Relaxed);
        Ok(n)
    }

    /// Makes a slot call (`call`, returning what the model applied and the slot's memory) with
    /// the id table locked, and updates the table: no reap can meet an entry of a slot the table
    /// does not know yet.
    pub(crate) fn around<E>(
        &self,
        call: impl FnOnce() -> Result<(Applied, Option<Arc<Backing>>), E>,
    ) -> Result<Applied, E> {
        let mut state = self.lock();
        let (applied, backing) = call()?;
        let raw = applied.before.or(applied.after).expect("a slot").id.raw();
        match (applied.after, backing) {
            (Some(s), Some(b)) if s.flags.log_dirty() => {
                state.slots.insert(raw, (s, b));
            }
            _ => {
                state.slots.remove(&raw);
            }
        }
        Ok(applied)
    }

    /// Returns and clears the pages reaped so far.
    pub(crate) fn take(&self) -> DirtyPages {
        self.lock().log.take()
    }

    /// Entries that named an id no logging slot had when reaped (0 while every logging slot was
    /// reaped before it changed; the `naive` and `qemu` strategies break that).
    pub fn untranslated(&self) -> u64 {
        self.untranslated.load(Ordering::Relaxed)
    }

    /// Reaps that found a ring full, which KVM's soft limit should prevent: its entries may have
    /// wrapped over unseen ones, so every page of every logging slot was counted dirty.
    pub fn overflows(&self) -> u64 {
        self.overflows.load(Ordering::Relaxed)
    }

    /// Reaps so far.
    pub fn reaps(&self) -> u64 {
        self.reaps.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    //! The reaper on rings the test writes itself (anonymous memory standing in for a vCPU's
    //! ring, so the kernel's rings stay untouched): what a ring found full does, which no
    //! kernel honouring its soft limit produces on demand.

    use std::ptr::NonNull;
    use std::sync::Arc;

    use kvm_bindings::kvm_dirty_gfn;
    use kvm_ioctls::Kvm;

    use super::{DirtyRing, RingMap, F_DIRTY, F_RESET};
    use crate::kvm::memory::Backing;
    use crate::kvm::vm::SlotVm;
    use crate::model::{Slot, SlotFlags, SlotId, PAGE_SIZE};

    const BYTES: u32 = 4096;
    const ENTRIES: u32 = BYTES / std::mem::size_of::<kvm_dirty_gfn>() as u32;

    /// A ring in dirty-ring mode, or `None` (said loudly) without KVM or its dirty ring.
    fn ring() -> Option<Arc<DirtyRing>> {
        let vm = match Kvm::new().and_then(|k| k.create_vm()) {
            Ok(vm) => Arc::new(vm),
            Err(e) => {
                eprintln!("SKIPPED: /dev/kvm cannot be opened ({e}): this test needs KVM");
                return None;
            }
        };
        if SlotVm::dirty_ring_max(&vm) < BYTES {
            eprintln!("SKIPPED: this kernel has no dirty ring: this test needs one");
            return None;
        }
        Some(DirtyRing::enable(vm, BYTES).expect("dirty ring"))
    }

    /// A logging slot over a backing of its own, entered in the ring's id table.
    fn logging_slot(ring: &DirtyRing, id: u16, gpa: u64) -> (Slot, Arc<Backing>) {
        let backing = Arc::new(Backing::anonymous("ram", 0x4_0000).expect("memory"));
        let slot = Slot {
            id: SlotId::new(id),
            gpa,
            size: backing.size(),
            host: backing.host(),
            flags: SlotFlags::LOG_DIRTY_PAGES,
            guest_memfd: 0,
            guest_memfd_offset: 0,
        };
        ring.lock()
            .slots
            .insert(slot.id.raw(), (slot, backing.clone()));
        (slot, backing)
    }

    /// Adds a ring of `ENTRIES` entries in anonymous memory, the first `dirty` of them pushed
    /// for `slot` (page `i % pages` each); returns a pointer to its entries.
    fn forged_ring(ring: &DirtyRing, slot: &Slot, dirty: u32) -> NonNull<kvm_dirty_gfn> {
        // SAFETY: a fresh private anonymous mapping; `RingMap::drop` unmaps it with this length.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                BYTES as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
        let entries = NonNull::new(p.cast::<kvm_dirty_gfn>()).expect("not null");
        for i in 0..dirty {
            // SAFETY: `i < ENTRIES`, inside the mapping, which nothing else uses yet.
            unsafe {
                entries.as_ptr().add(i as usize).write(kvm_dirty_gfn {
                    flags: F_DIRTY,
                    slot: slot.id.raw(),
                    offset: u64::from(i) % slot.pages(),
                })
            };
        }
        ring.lock().rings.push(RingMap {
            index: 0,
            entries,
            count: ENTRIES,
            fetch: 0,
        });
        entries
    }

    fn pages_of(pages: &crate::kvm::DirtyPages, backing: &Backing) -> u64 {
        (0..backing.size() / PAGE_SIZE)
            .filter(|p| pages.contains(backing.host() + p * PAGE_SIZE))
            .count() as u64
    }

    #[test]
    fn a_ring_found_full_counts_every_logging_page_dirty() {
        let Some(ring) = ring() else { return };
        let (slot, backing) = logging_slot(&ring, 0, 0);
        let (_, other) = logging_slot(&ring, 1, 0x10_0000);
        let entries = forged_ring(&ring, &slot, ENTRIES);
        assert_eq!(ring.reap(), Ok(u64::from(ENTRIES)));
        assert_eq!(ring.overflows(), 1);
        let pages = ring.take();
        // Entries may have wrapped over unseen ones, of any logging slot: all of them count.
        assert_eq!(pages_of(&pages, &backing), slot.pages());
        assert_eq!(pages_of(&pages, &other), other.size() / PAGE_SIZE);
        // Every entry was handed back to the kernel.
        for i in 0..ENTRIES as usize {
            // SAFETY: inside the mapping, which the ring keeps until it is dropped.
            assert_eq!(unsafe { (*entries.as_ptr().add(i)).flags }, F_RESET);
        }
    }

    #[test]
    fn a_ring_not_full_counts_only_its_entries() {
        let Some(ring) = ring() else { return };
        let (slot, backing) = logging_slot(&ring, 0, 0);
        let (_, other) = logging_slot(&ring, 1, 0x10_0000);
        forged_ring(&ring, &slot, 10);
        assert_eq!(ring.reap(), Ok(10));
        assert_eq!(ring.overflows(), 0);
        let pages = ring.take();
        assert_eq!(pages_of(&pages, &backing), 10);
        assert_eq!(pages_of(&pages, &other), 0);
    }
}
