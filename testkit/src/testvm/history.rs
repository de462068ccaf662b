//! The stable layouts a vCPU may have seen between entering `KVM_RUN` and handling its exit, so
//! an MMIO exit can be judged exactly: it is spurious when every one of them maps the address.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use memslots::model::Layout;

const KEPT: usize = 1024;

/// Stable layouts, numbered; `gen` is `2 * state` when stable and odd while an update runs.
#[derive(Debug)]
pub struct LayoutHistory {
    gen: AtomicU64,
    states: Mutex<VecDeque<(u64, Arc<Layout>)>>,
}

impl LayoutHistory {
    /// A history whose state 0 is `layout`.
    pub fn new(layout: Layout) -> Self {
        LayoutHistory {
            gen: AtomicU64::new(0),
            states: Mutex::new(VecDeque::from([(0, Arc::new(layout))])),
        }
    }

    /// The current generation (read by a vCPU before `KVM_RUN` and when handling an exit).
    pub fn gen(&self) -> u64 {
        self.gen.load(Ordering::SeqCst)
    }

    fn push(&self, layout: Layout) -> u64 {
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        let next = states.back().map_or(0, |s| s.0 + 1);
        states.push_back((next, Arc::new(layout)));
        if states.len() > KEPT {
            states.pop_front();
        }
        next
    }

    /// An update towards `target` starts.
    pub fn begin(&self, target: Layout) {
        let state = self.push(target);
        self.gen.store(2 * state - 1, Ordering::SeqCst);
    }

    /// The update ended in `result` (the target, or the old layout after a rollback).
    pub fn end(&self, result: &Layout) {
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        let (last, target) = states.back().cloned().expect("begin pushed a state");
        let state = if *target == *result {
            last
        } else {
            states.push_back((last + 1, Arc::new(result.clone())));
            last + 1
        };
        drop(states);
        self.gen.store(2 * state, Ordering::SeqCst);
    }

    /// Whether every stable layout between generations `from` and `to` maps `gpa` of address
    /// space 0 (writably, for a write). `None` when the window is older than what is kept.
    pub fn always_mapped(&self, from: u64, to: u64, gpa: u64, write: bool) -> Option<bool> {
        let first = from / 2;
        let last = to.div_ceil(2);
        let states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        if states.front().is_none_or(|s| s.0 > first) {
            return None;
        }
        Some(
            states
                .iter()
                .filter(|(n, _)| (first..=last).contains(n))
                .all(|(_, layout)| {
                    layout
                        .find(0, gpa)
                        .is_some_and(|s| !(write && s.flags.readonly()))
                }),
        )
    }
}

impl memslots::kvm::UpdateObserver for LayoutHistory {
    fn begin(&self, target: &Layout) {
        LayoutHistory::begin(self, target.clone());
    }

    fn end(&self, result: &Layout) {
        LayoutHistory::end(self, result);
    }
}
