//! Dirty pages kept by host memory, so they survive any re-slotting.

use std::collections::BTreeSet;

use crate::model::{Slot, SlotId, PAGE_SIZE};

use super::vm::SlotVm;

/// `KVM_GET_DIRTY_LOG` failed for a slot (for example with the VM in dirty-ring mode).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("KVM_GET_DIRTY_LOG of slot {slot} failed with errno {errno}")]
pub struct DirtyLogError {
    /// The slot.
    pub slot: SlotId,
    /// The errno.
    pub errno: i32,
}

/// Dirty host pages collected from slots and not yet handed out.
#[derive(Debug, Default)]
pub struct DirtyLog {
    pages: BTreeSet<u64>,
}

impl DirtyLog {
    /// Reads (and so clears) `slot`'s bitmap from KVM and keeps its bits by host page.
    pub fn collect(&mut self, vm: &dyn SlotVm, slot: &Slot) -> Result<u64, DirtyLogError> {
        let bitmap = vm
            .dirty_log(slot.id.raw(), slot.size)
            .map_err(|errno| DirtyLogError {
                slot: slot.id,
                errno,
            })?;
        let mut n = 0;
        for (w, word) in bitmap.iter().enumerate() {
            let mut bits = *word;
            while bits != 0 {
                let b = bits.trailing_zeros() as u64;
                bits &= bits - 1;
                let page = w as u64 * 64 + b;
                if page < slot.pages() {
                    self.pages.insert(slot.host + page * PAGE_SIZE);
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    /// Marks every page of `slot` dirty: what a bitmap that cannot be read must count as, so
    /// that no page is lost (a harvest may then report pages that were not written).
    pub fn mark_all(&mut self, slot: &Slot) {
        self.pages
            .extend((0..slot.pages()).map(|p| slot.host + p * PAGE_SIZE));
    }

    /// Returns and clears the dirty host pages.
    pub fn take(&mut self) -> BTreeSet<u64> {
        std::mem::take(&mut self.pages)
    }
}
