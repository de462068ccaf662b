//! The stable layouts a vCPU may have seen between entering `KVM_RUN` and handling its exit, so
//! an MMIO exit can be judged exactly: it is spurious when every one of them maps the address.
//!
//! Only the newest layout is kept whole; each older one as the slots that changed on the way to
//! the next. Memory is the layout plus what the kept updates changed, not 1,024 layouts (which
//! was 1,024 copies of every slot: 150 MB at 2,000 slots), and a query walks back through the
//! changes, a few slots per update.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use memslots::model::{Layout, Slot};

const KEPT: usize = 1024;

/// The slots one state removed from the state before it and the slots it added.
#[derive(Debug, Default)]
struct Change {
    removed: Vec<Slot>,
    added: Vec<Slot>,
}

fn holds(s: &Slot, gpa: u64) -> bool {
    s.id.address_space == 0 && s.gpa <= gpa && gpa < s.end()
}

impl Change {
    /// What changed from `old` to `new`: a walk of both in id order.
    fn between(old: &Layout, new: &Layout) -> Self {
        let mut change = Change::default();
        let (mut a, mut b) = (old.slots().peekable(), new.slots().peekable());
        loop {
            match (a.peek(), b.peek()) {
                (None, None) => return change,
                (Some(&x), Some(&y)) if x.id == y.id => {
                    if x != y {
                        change.removed.push(*x);
                        change.added.push(*y);
                    }
                    a.next();
                    b.next();
                }
                (Some(&x), Some(&y)) if x.id < y.id => {
                    change.removed.push(*x);
                    a.next();
                }
                (Some(&x), None) => {
                    change.removed.push(*x);
                    a.next();
                }
                (_, Some(&y)) => {
                    change.added.push(*y);
                    b.next();
                }
            }
        }
    }

    /// The slot holding `gpa` in the state before, given the one holding it in this state.
    /// At most one slot holds a GPA in any state, so a slot that stays is still the one, and
    /// where this state's holder was added (or there is none) the holder before is a removed one.
    fn undo(&self, holder: Option<Slot>, gpa: u64) -> Option<Slot> {
        match holder {
            Some(s) if !self.added.contains(&s) => Some(s),
            _ => self.removed.iter().find(|r| holds(r, gpa)).copied(),
        }
    }
}

#[derive(Debug)]
struct States {
    /// Number of the newest state.
    newest: u64,
    /// The newest state's layout.
    layout: Layout,
    /// For each kept state after the oldest, oldest first, what it changed.
    changes: VecDeque<Change>,
}

impl States {
    fn oldest(&self) -> u64 {
        self.newest - self.changes.len() as u64
    }

    fn push(&mut self, layout: &Layout) -> u64 {
        self.changes
            .push_back(Change::between(&self.layout, layout));
        if self.changes.len() >= KEPT {
            self.changes.pop_front();
        }
        self.layout = layout.clone();
        self.newest += 1;
        self.newest
    }
}

/// Stable layouts, numbered; `gen` is `2 * state` when stable and odd while an update runs.
#[derive(Debug)]
pub struct LayoutHistory {
    gen: AtomicU64,
    states: Mutex<States>,
}

impl LayoutHistory {
    /// A history whose state 0 is `layout`.
    pub fn new(layout: Layout) -> Self {
        LayoutHistory {
            gen: AtomicU64::new(0),
            states: Mutex::new(States {
                newest: 0,
                layout,
                changes: VecDeque::new(),
            }),
        }
    }

    /// The current generation (read by a vCPU before `KVM_RUN` and when handling an exit).
    pub fn gen(&self) -> u64 {
        self.gen.load(Ordering::SeqCst)
    }

    fn states(&self) -> std::sync::MutexGuard<'_, States> {
        self.states.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An update towards `target` starts.
    pub fn begin(&self, target: &Layout) {
        let state = self.states().push(target);
        self.gen.store(2 * state - 1, Ordering::SeqCst);
    }

    /// The update ended in `result` (the target, or the old layout after a rollback).
    pub fn end(&self, result: &Layout) {
        let mut states = self.states();
        let state = if states.layout == *result {
            states.newest
        } else {
            states.push(result)
        };
        drop(states);
        self.gen.store(2 * state, Ordering::SeqCst);
    }

    /// Whether every stable layout between generations `from` and `to` maps `gpa` of address
    /// space 0 (writably, for a write). `None` when the window is older than what is kept.
    pub fn always_mapped(&self, from: u64, to: u64, gpa: u64, write: bool) -> Option<bool> {
        let first = from / 2;
        let last = to.div_ceil(2);
        let states = self.states();
        if first < states.oldest() || first > states.newest {
            return None;
        }
        let maps = |s: &Option<Slot>| s.is_some_and(|s| !(write && s.flags.readonly()));
        let mut holder = states.layout.find(0, gpa).copied();
        let mut changes = states.changes.iter().rev();
        let mut state = states.newest;
        loop {
            if state <= last && !maps(&holder) {
                return Some(false);
            }
            if state == first {
                return Some(true);
            }
            // `first` is kept, so every state after it has its change.
            holder = changes.next()?.undo(holder, gpa);
            state -= 1;
        }
    }
}

impl memslots::kvm::UpdateObserver for LayoutHistory {
    fn begin(&self, target: &Layout) {
        LayoutHistory::begin(self, target);
    }

    fn end(&self, result: &Layout) {
        LayoutHistory::end(self, result);
    }
}

#[cfg(test)]
mod tests {
    use super::{LayoutHistory, KEPT};
    use crate::conformance::SplitMix64;
    use memslots::model::{Layout, Limits, Slot, SlotFlags, SlotId, PAGE_SIZE};

    /// A random layout of up to 6 slots over 16 pages of address space 0 (and one slot of
    /// address space 1 over the same GPAs, which must never count).
    fn layout(rng: &mut SplitMix64) -> Layout {
        let mut l = Layout::new(Limits::default());
        let mut page = 0;
        for id in 0..6u16 {
            page += rng.below(3);
            let pages = 1 + rng.below(3);
            if page + pages > 16 {
                break;
            }
            if rng.below(4) > 0 {
                let flags = if rng.below(3) == 0 {
                    SlotFlags::READONLY
                } else {
                    SlotFlags::NONE
                };
                // Ids are shuffled so that a GPA changes holder between ids.
                let id = (id + rng.below(6) as u16 * 7) % 40;
                let slot = Slot {
                    id: SlotId::in_space(0, id),
                    gpa: page * PAGE_SIZE,
                    size: pages * PAGE_SIZE,
                    host: rng.below(4) * 0x10_0000,
                    flags,
                    guest_memfd: 0,
                    guest_memfd_offset: 0,
                };
                let _ = l.apply(&slot.set_call());
            }
            page += pages;
        }
        let smm = Slot {
            id: SlotId::in_space(1, 0),
            gpa: 0,
            size: 16 * PAGE_SIZE,
            host: 0,
            flags: SlotFlags::NONE,
            guest_memfd: 0,
            guest_memfd_offset: 0,
        };
        l.apply(&smm.set_call()).expect("address space 1 is empty");
        l
    }

    /// The history keeping every layout whole, as it did: the reference.
    fn reference(states: &[Layout], first: u64, last: u64, gpa: u64, write: bool) -> bool {
        (first..=last).all(|n| {
            states[n as usize]
                .find(0, gpa)
                .is_some_and(|s| !(write && s.flags.readonly()))
        })
    }

    #[test]
    fn answers_like_every_layout_kept_whole() {
        let mut rng = SplitMix64::new(9);
        let mut checked = (0, 0);
        for _ in 0..20 {
            let mut states = vec![layout(&mut rng)];
            let history = LayoutHistory::new(states[0].clone());
            for _ in 0..(KEPT + 200) {
                let target = layout(&mut rng);
                history.begin(&target);
                states.push(target.clone());
                // Now and then a rollback: the update ends where it started.
                if rng.below(5) == 0 {
                    let back = states[states.len() - 2].clone();
                    history.end(&back);
                    states.push(back);
                } else {
                    history.end(&target);
                }
                assert_eq!(history.gen(), 2 * (states.len() as u64 - 1));
                let newest = states.len() as u64 - 1;
                for _ in 0..4 {
                    let to = 2 * newest - rng.below(2);
                    // Mostly the few states one exit spans, now and then past what is kept.
                    let span = if rng.below(8) == 0 {
                        rng.below(2 * newest.min(1100) + 1)
                    } else {
                        rng.below(5)
                    };
                    let from = to.saturating_sub(span);
                    let gpa = rng.below(17) * PAGE_SIZE + rng.below(PAGE_SIZE);
                    let write = rng.below(2) == 0;
                    let (first, last) = (from / 2, to.div_ceil(2));
                    let got = history.always_mapped(from, to, gpa, write);
                    if newest - first >= KEPT as u64 {
                        assert_eq!(got, None, "{from}..{to} is older than what is kept");
                    } else {
                        let want = reference(&states, first, last.min(newest), gpa, write);
                        assert_eq!(got, Some(want), "{from}..{to} gpa {gpa:#x} write {write}");
                        if want {
                            checked.0 += 1;
                        } else {
                            checked.1 += 1;
                        }
                    }
                }
            }
        }
        assert!(checked.0 > 10_000 && checked.1 > 10_000, "{checked:?}");
    }
}
