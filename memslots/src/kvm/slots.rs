//! The one place every slot call goes through: the model first, then the kernel, then the model's
//! layout, so the library's [`Layout`] equals the kernel's at all times. Fault injection lives here.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::model::{Applied, Layout, Rule, SlotCall};

use super::memory::{Backing, HostMemory};
use super::vm::SlotVm;

/// Why a slot call did not happen.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SlotCallError {
    /// The model refuses the call; the kernel was not asked.
    #[error("{call} is refused by KVM's rules")]
    Refused {
        /// The call.
        call: SlotCall,
        /// The rule it breaks.
        #[source]
        rule: Rule,
    },
    /// The call would create or move a slot over host memory no one registered memory holds
    /// whole: memory never registered, or two registered memories back to back (a slot lies in
    /// one; plans cut at [`SlotUpdater::host_edges`](super::SlotUpdater::host_edges)).
    #[error("{call} maps host memory no single registered memory holds")]
    NotOwned {
        /// The call.
        call: SlotCall,
    },
    /// The kernel refused a call the model accepts (or an injected fault said it did).
    #[error("{call} failed in the kernel with errno {errno}{}", if *.injected { " (injected)" } else { "" })]
    Kernel {
        /// The call.
        call: SlotCall,
        /// The errno.
        errno: i32,
        /// Whether the failure was injected.
        injected: bool,
    },
    /// The last harvest of a logging slot's dirty pages failed just before a call that would
    /// drop them; that call was not made, so no dirty bit was lost.
    #[error("the last dirty pages before {call} could not be read; it was not made")]
    DirtyLog {
        /// The call that would have dropped the dirty pages.
        call: SlotCall,
        /// Why they could not be read.
        #[source]
        source: super::dirty::DirtyLogError,
    },
}

/// Decides, before each slot ioctl, whether it fails on purpose: fault injection for tests of
/// the rollback. Rollback calls are never offered to it.
pub trait FaultHook: Send + std::fmt::Debug {
    /// `Some(errno)` fails `call` with `errno` without asking the kernel.
    fn fail(&mut self, call: &SlotCall) -> Option<i32>;
}

/// The VM's slots: the kernel's and the model's, kept equal.
///
/// Every slot holds the backing it maps (an `Arc`), so its memory stays mapped as long as the
/// kernel's slot exists, whatever happens to the [`HostMemory`] it was made from. Dropping the
/// table deletes its slots from the kernel (the VM may outlive it: a vCPU fd keeps it alive) and
/// only then lets go of the memory; if a delete fails, that memory is leaked, never unmapped.
#[derive(Debug)]
pub struct SlotTable {
    vm: Arc<dyn SlotVm>,
    layout: Layout,
    held: BTreeMap<u32, Arc<Backing>>,
    injector: Option<Box<dyn FaultHook>>,
    ioctls: u64,
}

impl Drop for SlotTable {
    fn drop(&mut self) {
        let mut failed = false;
        for slot in self.layout.slots() {
            // SAFETY: a delete maps nothing.
            failed |= unsafe { self.vm.set_region(&slot.delete_call()) }.is_err();
        }
        if failed {
            // Some slot may still point into its backing: keep all of them mapped for good.
            std::mem::forget(std::mem::take(&mut self.held));
        }
    }
}

impl SlotTable {
    /// An empty table for `vm`.
    pub fn new(vm: Arc<dyn SlotVm>) -> Self {
        let layout = Layout::new(vm.limits());
        SlotTable {
            vm,
            layout,
            held: BTreeMap::new(),
            injector: None,
            ioctls: 0,
        }
    }

    /// The layout (equal to the kernel's).
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Mutable access to the layout for analysis that leaves it as it was (`holes`, `lower`).
    pub(crate) fn layout_mut(&mut self) -> &mut Layout {
        &mut self.layout
    }

    /// The backing slot `raw` (address space in bits 16 and up) maps, if the slot exists.
    pub fn backing(&self, raw: u32) -> Option<&Arc<Backing>> {
        self.held.get(&raw)
    }

    /// Slot ioctls made so far.
    pub fn ioctls(&self) -> u64 {
        self.ioctls
    }

    /// Tells the model about a guest_memfd of this VM, so that a `GUEST_MEMFD` call binding past
    /// its end or over a bound range is refused before the kernel is asked
    /// ([`Layout::add_guest_memfd`]); binding to a guest_memfd it does not know is left to the
    /// kernel.
    pub fn add_guest_memfd(&mut self, fd: u32, size: u64) {
        self.layout.add_guest_memfd(fd, size);
    }

    /// Sets (or clears) the fault hook.
    pub fn inject(&mut self, injector: Option<Box<dyn FaultHook>>) {
        self.injector = injector;
    }

    /// Makes one call: checked by the model, owned memory only, then the kernel.
    pub fn call(&mut self, memory: &HostMemory, call: &SlotCall) -> Result<Applied, SlotCallError> {
        self.call_inner(memory, call, true)
    }

    /// Like [`SlotTable::call`] but never injected (for rollback).
    pub fn call_uninjected(
        &mut self,
        memory: &HostMemory,
        call: &SlotCall,
    ) -> Result<Applied, SlotCallError> {
        self.call_inner(memory, call, false)
    }

    fn call_inner(
        &mut self,
        memory: &HostMemory,
        call: &SlotCall,
        injectable: bool,
    ) -> Result<Applied, SlotCallError> {
        self.layout
            .check(call)
            .map_err(|rule| SlotCallError::Refused { call: *call, rule })?;
        let owner = if call.is_delete() {
            None
        } else {
            let owner = memory.owner(call.host, call.size);
            Some(
                owner
                    .ok_or(SlotCallError::NotOwned { call: *call })?
                    .clone(),
            )
        };
        if injectable {
            if let Some(errno) = self.injector.as_mut().and_then(|h| h.fail(call)) {
                return Err(SlotCallError::Kernel {
                    call: *call,
                    errno,
                    injected: true,
                });
            }
        }
        self.ioctls += 1;
        // SAFETY: a non-delete call maps memory inside `owner` (checked above), which the table
        // holds from here for as long as the slot exists (`held`), and keeps mapped after it
        // (leaks it) if it cannot delete the slot when dropped.
        unsafe { self.vm.set_region(call) }.map_err(|errno| SlotCallError::Kernel {
            call: *call,
            errno,
            injected: false,
        })?;
        match owner {
            Some(backing) => self.held.insert(call.slot, backing),
            None => self.held.remove(&call.slot),
        };
        Ok(self
            .layout
            .apply(call)
            .expect("the model accepted this call a moment ago"))
    }
}
