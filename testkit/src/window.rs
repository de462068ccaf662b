//! Planning one commit of a trace from the part of the map it changed, so a long trace over many
//! slots costs time linear in the trace (times the log of the layout), not commits times slots.
//!
//! A commit changes QEMU's mapping only where its calls touched (their old and new slots). The
//! planner's layout maps the previous mapping exactly, so everywhere else every slot maps
//! identically and [`plan_with`] keeps it without a call. The *window* is the touched ranges
//! grown until every planner slot and every target region (a run of QEMU slots continuing each
//! other) reaching into it lies inside it. Outside the window the full planner would keep every
//! slot, make no call and leave no uncovered piece (so no move can land there); inside, it sees
//! exactly the slots and regions the window holds. So planning the window's slots towards the
//! window's map makes the full plan's calls, in its order, except for two things that depend on
//! the whole layout:
//! - new slot ids: the lowest ids free in the whole layout (then ids the batch deletes), in GPA
//!   order of the new slots, as the planner gives them; [`FreeIds`] keeps the free ones;
//! - the slot budget: where the ids in use after the batch would pass the policy's budget, the
//!   planner cuts that address space minimally, and past the kernel's limit it refuses; both
//!   are judged from the whole layout's count (`WindowPlanner::windowed`).
//!
//! The tests hold the result against the whole-map planner on every committed trace and on
//! random traces (`tests/trace_streaming.rs`).

use std::collections::{BTreeMap, BTreeSet};

use memslots::model::{Applied, Change, GpaRange, Layout, Slot, SlotId};
use memslots::planner::{plan_with, CutPolicy, MemoryMap, Plan, PlanError};

/// Why a commit could not be planned.
#[derive(Debug)]
pub(crate) enum WindowError {
    /// No plan reaches the map.
    Plan(PlanError),
    /// The plan did not produce the map.
    Mismatch,
}

/// The planner's layout through a trace, and the ids it leaves free.
#[derive(Clone, Debug)]
pub(crate) struct WindowPlanner {
    layout: Layout,
    free: FreeIds,
    policy: CutPolicy,
    /// The last plan's window; `None` when it was planned from the whole map.
    window: Option<Vec<GpaRange>>,
}

impl WindowPlanner {
    /// An empty layout under `limits`.
    pub(crate) fn new(limits: memslots::model::Limits, policy: &CutPolicy) -> Self {
        WindowPlanner {
            layout: Layout::new(limits),
            free: FreeIds::default(),
            policy: policy.clone(),
            window: None,
        }
    }

    /// The layout after the last plan.
    pub(crate) fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The ranges outside which the last plan changed neither layout's mapping nor any slot,
    /// sorted and disjoint, each holding whole every slot of both layouts (before and after the
    /// plan) that reaches into it; `None` when it was planned from the whole map.
    pub(crate) fn window(&self) -> Option<&[GpaRange]> {
        self.window.as_deref()
    }

    /// Plans, applies and checks the change to `qemu`'s mapping, which differs from the one the
    /// layout maps only inside `touched`.
    pub(crate) fn plan(
        &mut self,
        qemu: &Layout,
        touched: &[GpaRange],
    ) -> Result<Plan, WindowError> {
        self.window = None;
        let window = window(qemu, &self.layout, touched);
        let target = MemoryMap::from_layout(&within(qemu, &window));
        let (plan, whole) = match self.windowed(&window, &target) {
            Some(p) => (self.renumber(p), false),
            // Where the window cannot stand for the whole map (see `windowed`), and for the
            // errors, which count every slot.
            None => {
                let all = MemoryMap::from_layout(qemu);
                let p = plan_with(&self.layout, &all, &self.policy).map_err(WindowError::Plan)?;
                (p, true)
            }
        };
        let done = self
            .layout
            .apply_batch(&plan.slot_calls())
            .map_err(|e| WindowError::Plan(PlanError::Refused(e)))?;
        self.free.update(&done);
        // Outside the window neither map changed.
        let matches = if whole {
            MemoryMap::from_layout(&self.layout) == MemoryMap::from_layout(qemu)
        } else {
            MemoryMap::from_layout(&within(&self.layout, &window)) == target
        };
        self.window = (!whole).then_some(window);
        if matches {
            Ok(plan)
        } else {
            Err(WindowError::Mismatch)
        }
    }

    /// The window's plan, with the window's ids, where it is the whole-map plan.
    ///
    /// The planner cuts an address space with the minimal policy when its ids in use after the
    /// batch would pass the policy's budget, and refuses past the kernel's limit; both count
    /// every slot, so they are judged here from the whole layout's count. `plan_with` takes one
    /// policy for all address spaces: a window whose spaces are some past the budget and some
    /// not is left to the whole map (`None`), as is a plan past the limit (for its error).
    fn windowed(&self, window: &[GpaRange], target: &MemoryMap) -> Option<Plan> {
        let limit = usize::from(self.layout.limits().slots);
        let budget = limit.saturating_sub(usize::from(self.policy.headroom));
        let mut spaces: Vec<u16> = window.iter().map(|r| r.address_space).collect();
        spaces.dedup();
        let current = within(&self.layout, window);
        let plan = plan_with(&current, target, &self.policy).ok()?;
        let over: Vec<bool> = spaces
            .iter()
            .map(|&s| self.ids_after(&plan, s) > budget)
            .collect();
        if !over.contains(&true) {
            return Some(plan);
        }
        if over.contains(&false) {
            return None;
        }
        let plan = plan_with(&current, target, &self.policy.minimal_within()).ok()?;
        spaces
            .iter()
            .all(|&s| self.ids_after(&plan, s) <= limit)
            .then_some(plan)
    }

    /// Ids of address space `space` in use once `plan` ran, in the whole layout.
    fn ids_after(&self, plan: &Plan, space: u16) -> usize {
        let of_space = |kind: Change| {
            plan.calls
                .iter()
                .filter(|c| c.change == kind && c.call.id().address_space == space)
                .count()
        };
        (self.free.used(space) + of_space(Change::Create)).saturating_sub(of_space(Change::Delete))
    }

    /// The plan with its new slots given the ids the whole-layout planner gives them.
    fn renumber(&self, mut plan: Plan) -> Plan {
        let limit = self.layout.limits().slots;
        // New slots per address space, in GPA order (the order the planner numbers them in).
        let mut creates: BTreeMap<u16, Vec<(u64, usize)>> = BTreeMap::new();
        let mut deleted: BTreeMap<u16, Vec<u16>> = BTreeMap::new();
        for (i, c) in plan.calls.iter().enumerate() {
            let id = c.call.id();
            match c.change {
                Change::Create => creates
                    .entry(id.address_space)
                    .or_default()
                    .push((c.call.gpa, i)),
                Change::Delete => deleted.entry(id.address_space).or_default().push(id.id),
                _ => {}
            }
        }
        for (space, mut news) in creates {
            news.sort_unstable();
            let mut freed = deleted.remove(&space).unwrap_or_default();
            freed.sort_unstable();
            let ids = self
                .free
                .lowest(space, news.len(), limit)
                .into_iter()
                .chain(freed);
            for ((_, i), id) in news.into_iter().zip(ids) {
                let call = &mut plan.calls[i].call;
                call.slot = SlotId::in_space(space, id).raw();
            }
        }
        plan
    }
}

/// The ids not in use in each address space of a layout, kept up to date from the calls applied
/// to it, so the lowest free ones are found without walking every slot.
#[derive(Clone, Debug, Default)]
struct FreeIds {
    /// Per address space: free ids below `high`, `high` (every id from it up is free), ids in use.
    spaces: BTreeMap<u16, (BTreeSet<u16>, u32, usize)>,
}

impl FreeIds {
    fn update(&mut self, done: &[Applied]) {
        for a in done {
            match (a.before, a.after) {
                (None, Some(new)) => self.take(new.id),
                (Some(old), None) => self.give(old.id),
                _ => {}
            }
        }
    }

    fn take(&mut self, id: SlotId) {
        let (free, high, used) = self.spaces.entry(id.address_space).or_default();
        let n = u32::from(id.id);
        if n >= *high {
            free.extend((*high..n).filter_map(|x| u16::try_from(x).ok()));
            *high = n + 1;
        } else {
            free.remove(&id.id);
        }
        *used += 1;
    }

    fn give(&mut self, id: SlotId) {
        let (free, _, used) = self.spaces.entry(id.address_space).or_default();
        free.insert(id.id);
        *used = used.saturating_sub(1);
    }

    fn used(&self, space: u16) -> usize {
        self.spaces.get(&space).map_or(0, |s| s.2)
    }

    /// The `n` lowest free ids of `space` below `limit` (fewer if there are not that many).
    fn lowest(&self, space: u16, n: usize, limit: u16) -> Vec<u16> {
        let (below, high) = match self.spaces.get(&space) {
            Some((free, high, _)) => (Some(free), *high),
            None => (None, 0),
        };
        below
            .into_iter()
            .flatten()
            .copied()
            .chain((high..u32::from(limit)).filter_map(|x| u16::try_from(x).ok()))
            .take_while(|&id| id < limit)
            .take(n)
            .collect()
    }
}

/// Whether `next` continues `s` (adjacent in GPA and host memory, same flags): one region of the
/// map.
fn continues(s: &Slot, next: &Slot) -> bool {
    s.end() == next.gpa && s.host.checked_add(s.size) == Some(next.host) && s.flags == next.flags
}

/// The touched ranges grown until every slot of `planner` and every region of `qemu`'s map
/// reaching into a range lies inside it; sorted and disjoint.
fn window(qemu: &Layout, planner: &Layout, touched: &[GpaRange]) -> Vec<GpaRange> {
    // Ranges that overlap or touch are joined; what reaches into the join reaches into a part,
    // so the join is closed too.
    join(
        touched
            .iter()
            .filter(|r| r.start < r.end)
            .map(|&r| close(qemu, planner, r))
            .collect(),
    )
}

/// `ranges` sorted by address space and GPA, those that overlap or touch joined.
pub(crate) fn join(mut ranges: Vec<GpaRange>) -> Vec<GpaRange> {
    ranges.sort_unstable();
    let mut joined: Vec<GpaRange> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match joined.last_mut() {
            Some(last) if last.address_space == r.address_space && r.start <= last.end => {
                last.end = last.end.max(r.end);
            }
            _ => joined.push(r),
        }
    }
    joined
}

/// `r` grown to the slots and regions reaching into it. Only what holds its first or last byte
/// can reach out of it, so each round looks at two places.
fn close(qemu: &Layout, planner: &Layout, mut r: GpaRange) -> GpaRange {
    let space = r.address_space;
    loop {
        let (mut start, mut end) = (r.start, r.end);
        for s in [planner.find(space, start), planner.find(space, end - 1)]
            .into_iter()
            .flatten()
        {
            start = start.min(s.gpa);
            end = end.max(s.end());
        }
        // The region holding the first byte runs left while slots continue each other; the one
        // holding the last byte runs right.
        if let Some(mut s) = qemu.find(space, start).copied() {
            while let Some(prev) = s
                .gpa
                .checked_sub(1)
                .and_then(|g| qemu.find(space, g))
                .filter(|p| continues(p, &s))
            {
                s = *prev;
            }
            start = start.min(s.gpa);
        }
        if let Some(mut s) = qemu.find(space, end - 1).copied() {
            while let Some(next) = qemu.find(space, s.end()).filter(|n| continues(&s, n)) {
                s = *next;
            }
            end = end.max(s.end());
        }
        if (start, end) == (r.start, r.end) {
            return r;
        }
        r.start = start;
        r.end = end;
    }
}

/// The slots of `layout` inside `window` (which holds each whole), as a layout of their own.
pub(crate) fn within(layout: &Layout, window: &[GpaRange]) -> Layout {
    let mut out = Layout::new(*layout.limits());
    for r in window {
        for s in layout.overlapping(r.address_space, r.start, r.end) {
            // Valid in `layout`, so valid among fewer slots (and a slot missing here would show
            // as a mismatch, not pass unseen).
            let _ = out.apply(&s.set_call());
        }
    }
    out
}
