//! Dirty pages kept by registered memory, one bit per 4 KiB page of each backing, so they survive
//! any re-slotting: a slot's bits are moved into its backing's bitmap before the slot changes,
//! and a harvest hands out every backing's bits at once.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::model::{Slot, SlotId, PAGE_SIZE};

use super::memory::Backing;
use super::vm::SlotVm;

/// Dirty pages could not be harvested.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DirtyLogError {
    /// `KVM_GET_DIRTY_LOG` failed for a slot (for example with the VM in dirty-ring mode).
    #[error("KVM_GET_DIRTY_LOG of slot {slot} failed with errno {errno}")]
    Bitmap {
        /// The slot.
        slot: SlotId,
        /// The errno.
        errno: i32,
    },
    /// `KVM_RESET_DIRTY_RINGS` failed after the rings were read (one reset covers every slot).
    #[error("KVM_RESET_DIRTY_RINGS failed with errno {errno}")]
    Ring {
        /// The errno.
        errno: i32,
    },
}

/// One backing's dirty pages: a bitmap, one bit per page from the backing's first byte.
#[derive(Clone, Debug)]
pub struct DirtyBitmap {
    backing: Arc<Backing>,
    bits: Vec<u64>,
}

impl DirtyBitmap {
    fn new(backing: Arc<Backing>) -> Self {
        let pages = backing.size() / PAGE_SIZE;
        DirtyBitmap {
            bits: vec![0; pages.div_ceil(64) as usize],
            backing,
        }
    }

    /// The backing the bits are of.
    pub fn backing(&self) -> &Arc<Backing> {
        &self.backing
    }

    /// The bitmap: bit `i` is the page at `backing().host() + i * 4096`.
    pub fn bits(&self) -> &[u64] {
        &self.bits
    }

    /// Sets the bit of the page at `host`, which must lie in the backing.
    fn set(&mut self, host: u64) {
        let i = (host - self.backing.host()) / PAGE_SIZE;
        self.bits[(i / 64) as usize] |= 1 << (i % 64);
    }

    /// The dirty pages' host addresses, in order.
    pub fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        let base = self.backing.host();
        self.bits.iter().enumerate().flat_map(move |(w, &word)| {
            let mut bits = word;
            std::iter::from_fn(move || {
                (bits != 0).then(|| {
                    let b = bits.trailing_zeros() as u64;
                    bits &= bits - 1;
                    base + (w as u64 * 64 + b) * PAGE_SIZE
                })
            })
        })
    }
}

/// What a harvest hands the VMM: the pages dirtied since the last harvest, per backing.
#[derive(Clone, Debug, Default)]
pub struct DirtyPages {
    bitmaps: Vec<DirtyBitmap>,
}

impl DirtyPages {
    /// Per backing, its bitmap (backings with no dirty page are left out).
    pub fn bitmaps(&self) -> &[DirtyBitmap] {
        &self.bitmaps
    }

    /// Every dirty page's host address.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.bitmaps.iter().flat_map(DirtyBitmap::pages)
    }

    /// Whether the page holding `host` is dirty.
    pub fn contains(&self, host: u64) -> bool {
        self.bitmaps.iter().any(|b| {
            b.backing.holds(host, 1) && {
                let i = (host - b.backing.host()) / PAGE_SIZE;
                b.bits[(i / 64) as usize] & (1 << (i % 64)) != 0
            }
        })
    }

    /// Number of dirty pages.
    pub fn len(&self) -> usize {
        self.bitmaps
            .iter()
            .map(|b| {
                b.bits
                    .iter()
                    .map(|w| w.count_ones() as usize)
                    .sum::<usize>()
            })
            .sum()
    }

    /// Whether no page is dirty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Dirty pages collected from slots (and device views) and not yet handed out, by backing.
#[derive(Debug, Default)]
pub struct DirtyLog {
    /// Keyed by the backing's host address (registered backings never overlap).
    bitmaps: BTreeMap<u64, DirtyBitmap>,
}

impl DirtyLog {
    fn bitmap(&mut self, backing: &Arc<Backing>) -> &mut DirtyBitmap {
        self.bitmaps
            .entry(backing.host())
            .or_insert_with(|| DirtyBitmap::new(backing.clone()))
    }

    /// Reads (and so clears) `slot`'s bitmap from KVM and keeps its bits in `backing`'s, which
    /// holds the slot's host range.
    pub fn collect(
        &mut self,
        vm: &dyn SlotVm,
        slot: &Slot,
        backing: &Arc<Backing>,
    ) -> Result<u64, DirtyLogError> {
        let bitmap =
            vm.dirty_log(slot.id.raw(), slot.size)
                .map_err(|errno| DirtyLogError::Bitmap {
                    slot: slot.id,
                    errno,
                })?;
        let into = self.bitmap(backing);
        let mut n = 0;
        for (w, word) in bitmap.iter().enumerate() {
            let mut bits = *word;
            while bits != 0 {
                let b = bits.trailing_zeros() as u64;
                bits &= bits - 1;
                let page = w as u64 * 64 + b;
                if page < slot.pages() {
                    into.set(slot.host + page * PAGE_SIZE);
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    /// Marks the page at `host` of `backing` dirty (a device write seen through a view).
    pub fn mark(&mut self, backing: &Arc<Backing>, host: u64) {
        self.bitmap(backing).set(host);
    }

    /// Marks every page of `slot` dirty: what a bitmap that cannot be read must count as, so
    /// that no page is lost (a harvest may then report pages that were not written).
    pub fn mark_all(&mut self, slot: &Slot, backing: &Arc<Backing>) {
        let into = self.bitmap(backing);
        for p in 0..slot.pages() {
            into.set(slot.host + p * PAGE_SIZE);
        }
    }

    /// Adds `pages` (from another log) to these.
    pub fn absorb(&mut self, pages: DirtyPages) {
        for b in pages.bitmaps {
            let into = self.bitmap(&b.backing);
            for (w, word) in into.bits.iter_mut().zip(&b.bits) {
                *w |= word;
            }
        }
    }

    /// Returns and clears the dirty pages.
    pub fn take(&mut self) -> DirtyPages {
        let bitmaps = std::mem::take(&mut self.bitmaps)
            .into_values()
            .filter(|b| b.bits.iter().any(|w| *w != 0))
            .collect();
        DirtyPages { bitmaps }
    }
}
