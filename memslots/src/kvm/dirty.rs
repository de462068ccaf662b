//! Dirty pages kept by host memory, so they survive any re-slotting.

use std::collections::BTreeSet;

use crate::model::{Slot, PAGE_SIZE};

use super::vm::Vm;

/// Dirty host pages collected from slots and not yet handed out.
#[derive(Debug, Default)]
pub struct DirtyLog {
    pages: BTreeSet<u64>,
}

impl DirtyLog {
    /// Reads (and so clears) `slot`'s bitmap from KVM and keeps its bits by host page.
    pub fn collect(&mut self, vm: &Vm, slot: &Slot) -> Result<u64, i32> {
        let bitmap = vm.dirty_log(slot.id.raw(), slot.size)?;
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

    /// Returns and clears the dirty host pages.
    pub fn take(&mut self) -> BTreeSet<u64> {
        std::mem::take(&mut self.pages)
    }
}
