//! Planning: from the current slots and a target map to the smallest safe batch of raw calls.

use std::collections::BTreeMap;
use std::ops::Range;

use super::map::{MemoryMap, Region};
use super::policy::CutPolicy;
use crate::model::{Batch, BatchError, Change, Layout, Slot, SlotCall, SlotFlags, SlotId};

/// One call of a plan.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct PlannedCall {
    /// The raw call.
    pub call: SlotCall,
    /// What KVM will do with it.
    pub change: Change,
    /// Whether it must run with every vCPU held out (it is inside the model's quiesce window).
    pub quiesced: bool,
    /// Bytes of slot KVM zaps for it (the old slot's size for a DELETE or MOVE, else 0).
    pub zapped_bytes: u64,
    /// Whether it drops the slot's dirty bitmap ([`Applied::drops_dirty_bitmap`]): a VMM
    /// applying the plan itself harvests the slot's dirty log before this call, with vCPUs held
    /// out if it wants every bit (pages dirtied after its last harvest are otherwise lost).
    ///
    /// [`Applied::drops_dirty_bitmap`]: crate::model::Applied::drops_dirty_bitmap
    pub drops_dirty_bitmap: bool,
}

/// A batch of raw slot calls that takes a layout to a target mapping, in the order they must be
/// made; the quiesced calls form one contiguous run.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Plan {
    /// The calls, in order.
    pub calls: Vec<PlannedCall>,
}

impl Plan {
    /// Number of ioctls.
    pub fn ioctls(&self) -> usize {
        self.calls.len()
    }

    /// Number of ioctls that must run quiesced.
    pub fn quiesced_ioctls(&self) -> usize {
        self.calls.iter().filter(|c| c.quiesced).count()
    }

    /// The quiesced calls as a range of [`Plan::calls`] (empty when no vCPU need stop).
    pub fn quiesced_range(&self) -> Range<usize> {
        let start = self.calls.iter().position(|c| c.quiesced);
        let end = self.calls.iter().rposition(|c| c.quiesced);
        match (start, end) {
            (Some(s), Some(e)) => s..e + 1,
            _ => 0..0,
        }
    }

    /// Bytes KVM zaps: the size of every slot a DELETE or MOVE removes.
    pub fn zapped_bytes(&self) -> u64 {
        self.calls.iter().map(|c| c.zapped_bytes).sum()
    }

    /// The raw calls.
    pub fn slot_calls(&self) -> Vec<SlotCall> {
        self.calls.iter().map(|c| c.call).collect()
    }

    /// The calls as a model batch.
    pub fn batch(&self) -> Batch {
        self.calls.iter().map(|c| c.call).collect()
    }

    /// The calls that drop a dirty bitmap (harvest the slot's dirty log before each).
    pub fn dirty_bitmap_drops(&self) -> impl Iterator<Item = &PlannedCall> + '_ {
        self.calls.iter().filter(|c| c.drops_dirty_bitmap)
    }

    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }
}

/// Why no plan can reach a target map.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
pub enum PlanError {
    /// The map needs more slot ids at once than the kernel has.
    #[error(
        "address space {address_space} needs {needed} slot ids at once ({current} in use before \
         the batch, {deleted} deleted, {new} new, first new slot at gpa {gpa:#x}); the kernel \
         allows {limit}"
    )]
    TooManySlots {
        /// The address space.
        address_space: u16,
        /// Ids in use once the batch's deletes are done and its creates made.
        needed: usize,
        /// Ids in use before the batch.
        current: usize,
        /// Slots the batch deletes (their ids are re-used when no other id is free).
        deleted: usize,
        /// New slots.
        new: usize,
        /// GPA of the first new slot.
        gpa: u64,
        /// `KVM_CAP_NR_MEMSLOTS`.
        limit: u16,
    },
    /// A region the kernel cannot map (address space, READONLY support, host range).
    #[error("region {region}: {reason}")]
    Unmappable {
        /// The region.
        region: Region,
        /// Why.
        reason: String,
    },
    /// The planned batch is refused by the model (a planner bug, or limits the map breaks).
    #[error("the planned batch is refused by the model")]
    Refused(#[source] BatchError),
}

/// Plans with the default [`CutPolicy`] (x86 PC).
pub fn plan(current: &Layout, target: &MemoryMap) -> Result<Plan, PlanError> {
    plan_with(current, target, &CutPolicy::default())
}

/// A slot that survives the batch, possibly with new flags or at a new GPA.
struct Moved {
    slot: Slot,
    gpa: u64,
    flags: SlotFlags,
}

/// One address space's decisions.
#[derive(Default)]
struct SpacePlan {
    flags: Vec<SlotCall>,
    deletes: Vec<Slot>,
    moves: Vec<Moved>,
    creates: Vec<Region>,
}

/// Plans the calls that take `current` to a layout whose mapping is exactly `target`.
///
/// Slots whose whole range still maps identically are kept (a flags-only call if dirty logging
/// changes); a slot whose host memory appears whole elsewhere moves; everything else not covered
/// is created in slots cut by `policy`. Calls are ordered: flag changes and hole-free deletes and
/// moves (those that end dirty logging on a slot last, next to the window, so a backend that
/// collects their final dirty bits with vCPUs held out can extend its quiesce by just them), then
/// the calls inside the model's quiesce window (deletes and moves that open holes, then the
/// creates that close them), then hole-free creates. New ids are the lowest free ones; an id
/// this batch deletes is re-used only when no other is free (every DELETE precedes every
/// CREATE). O(n log n) in slots and regions.
pub fn plan_with(
    current: &Layout,
    target: &MemoryMap,
    policy: &CutPolicy,
) -> Result<Plan, PlanError> {
    let limits = *current.limits();
    for r in target.regions() {
        let reason = if r.address_space >= limits.address_spaces {
            Some(format!(
                "address space {} is not below {}",
                r.address_space, limits.address_spaces
            ))
        } else if r.flags.readonly() && !limits.readonly {
            Some("the kernel has no read-only slots".to_owned())
        } else if r.host + r.size > limits.user_addr_max {
            Some(format!(
                "host range ends past {:#x}, the kernel's user range",
                limits.user_addr_max
            ))
        } else if (r.end() - 1) / limits.page_size > limits.max_gfn {
            Some(format!(
                "guest range ends past {:#x}, the host's maximum guest frame {:#x}",
                (limits.max_gfn + 1).saturating_mul(limits.page_size),
                limits.max_gfn
            ))
        } else {
            None
        };
        if let Some(reason) = reason {
            return Err(PlanError::Unmappable { region: *r, reason });
        }
    }
    let mut spaces: Vec<u16> = target.address_spaces();
    spaces.extend(current.slots().map(|s| s.id.address_space));
    spaces.sort_unstable();
    spaces.dedup();

    let max_bytes = limits.max_pages * limits.page_size;
    let mut head: Vec<(SlotCall, u64)> = Vec::new(); // (call, zapped)
                                                     // Hole-free calls that end dirty logging on a slot (delete, move, logging off): a backend
                                                     // collects their last dirty bits with vCPUs held out, so they go last before the window.
    let mut lossy: Vec<(SlotCall, u64)> = Vec::new();
    let mut open: Vec<(SlotCall, u64)> = Vec::new();
    let mut moves_open: Vec<(SlotCall, u64)> = Vec::new();
    let mut close: Vec<SlotCall> = Vec::new();
    let mut tail: Vec<SlotCall> = Vec::new();
    for space in spaces {
        let slots: Vec<Slot> = current.slots_by_gpa(space).copied().collect();
        let regions = target.space(space);
        let mut sp = plan_space(&slots, regions, policy, max_bytes);
        let limit = limits.slots as usize;
        let budget = limit.saturating_sub(policy.headroom as usize);
        // Every delete runs before every create (see the ordering below), so the ids in use at
        // once peak at the larger of before and after the batch; `slots.len() <= limit` already.
        let after = |sp: &SpacePlan| slots.len() - sp.deletes.len() + sp.creates.len();
        if after(&sp) > budget {
            sp = plan_space(&slots, regions, &policy.minimal_within(), max_bytes);
        }
        let needed = after(&sp);
        if needed > limit {
            return Err(PlanError::TooManySlots {
                address_space: space,
                needed,
                current: slots.len(),
                deleted: sp.deletes.len(),
                new: sp.creates.len(),
                gpa: sp.creates.first().map_or(0, |r| r.gpa),
                limit: limits.slots,
            });
        }
        // New ids: lowest first, skipping every id in use before the batch; only when none is
        // left, the ids this batch deletes, lowest first (their DELETEs run before any CREATE).
        let mut used: Vec<u16> = slots.iter().map(|s| s.id.id).collect();
        used.sort_unstable();
        let mut used = used.into_iter().peekable();
        let mut freed: Vec<u16> = sp.deletes.iter().map(|s| s.id.id).collect();
        freed.sort_unstable();
        let mut freed = freed.into_iter();
        let mut next = 0u16;
        let mut new_slots = Vec::with_capacity(sp.creates.len());
        for r in &sp.creates {
            // Skip ids in use (`used` is sorted).
            while let Some(&u) = used.peek() {
                if u > next {
                    break;
                }
                used.next();
                if u == next {
                    next += 1;
                }
            }
            let id = if next < limits.slots {
                next += 1;
                next - 1
            } else {
                // `needed <= limit` leaves a deleted id for every create past the free ones.
                freed.next().ok_or(PlanError::TooManySlots {
                    address_space: space,
                    needed,
                    current: slots.len(),
                    deleted: sp.deletes.len(),
                    new: sp.creates.len(),
                    gpa: r.gpa,
                    limit: limits.slots,
                })?
            };
            new_slots.push(Slot {
                id: SlotId::in_space(space, id),
                gpa: r.gpa,
                size: r.size,
                host: r.host,
                flags: r.flags,
                guest_memfd: 0,
                guest_memfd_offset: 0,
            });
        }

        // Ordering. A delete opens a hole iff the target maps part of its range; a create closes
        // one iff its range was mapped before; a move is hole-free iff neither end needs it.
        let mapped_after = |s: u64, e: u64| intersects(regions, s, e);
        let mapped_before = |s: u64, e: u64, except: Option<SlotId>| {
            let i = slots.partition_point(|x| x.end() <= s);
            slots[i..]
                .iter()
                .take_while(|x| x.gpa < e)
                .any(|x| Some(x.id) != except)
        };
        for c in &sp.flags {
            let was_logged = slots
                .binary_search_by_key(&c.gpa, |s| s.gpa)
                .is_ok_and(|i| slots[i].flags.log_dirty());
            if was_logged && !c.slot_flags().log_dirty() {
                lossy.push((*c, 0));
            } else {
                head.push((*c, 0));
            }
        }
        for d in &sp.deletes {
            let entry = (d.delete_call(), d.size);
            if mapped_after(d.gpa, d.end()) {
                open.push(entry);
            } else if d.flags.log_dirty() {
                lossy.push(entry);
            } else {
                head.push(entry);
            }
        }
        for m in &sp.moves {
            let call = Slot {
                gpa: m.gpa,
                flags: m.flags,
                ..m.slot
            }
            .set_call();
            let (ns, ne) = (m.gpa, m.gpa + m.slot.size);
            let (os, oe) = (m.slot.gpa, m.slot.end());
            let old_left = (os < ns.min(oe) && mapped_after(os, ns.min(oe)))
                || (oe > ne.max(os) && mapped_after(ne.max(os), oe));
            if old_left || mapped_before(ns, ne, Some(m.slot.id)) {
                moves_open.push((call, m.slot.size));
            } else if m.slot.flags.log_dirty() {
                lossy.push((call, m.slot.size));
            } else {
                head.push((call, m.slot.size));
            }
        }
        for n in new_slots {
            if mapped_before(n.gpa, n.end(), None) {
                close.push(n.set_call());
            } else {
                tail.push(n.set_call());
            }
        }
    }

    // The quiesce window runs from the first hole-opening call to the last hole-closing one:
    // exactly the `open`, `moves_open` and `close` groups, in that order. The tests hold this
    // against the model's own hole analysis (`Layout::holes`).
    let mut calls: Vec<PlannedCall> = Vec::with_capacity(
        head.len() + lossy.len() + open.len() + moves_open.len() + close.len() + tail.len(),
    );
    let planned = |(call, zapped): (SlotCall, u64), quiesced: bool| PlannedCall {
        call,
        change: if call.is_delete() {
            Change::Delete
        } else if zapped > 0 && current.slot(call.id()).is_some_and(|s| s.gpa != call.gpa) {
            Change::Move
        } else if current.slot(call.id()).is_some() {
            Change::FlagsOnly
        } else {
            Change::Create
        },
        quiesced,
        zapped_bytes: zapped,
        // The plan's calls touch each id once, so the slot before the batch is the one the
        // call changes.
        drops_dirty_bitmap: current.slot(call.id()).is_some_and(|old| {
            old.flags.log_dirty()
                && (call.is_delete() || call.gpa != old.gpa || !call.slot_flags().log_dirty())
        }),
    };
    calls.extend(head.into_iter().map(|c| planned(c, false)));
    calls.extend(lossy.into_iter().map(|c| planned(c, false)));
    calls.extend(open.into_iter().map(|c| planned(c, true)));
    calls.extend(moves_open.into_iter().map(|c| planned(c, true)));
    // New slots are CREATEs even when they re-use an id the batch deleted (the slot before the
    // batch is not the one they change, and they drop no bitmap).
    let created = |call: SlotCall, quiesced: bool| PlannedCall {
        call,
        change: Change::Create,
        quiesced,
        zapped_bytes: 0,
        drops_dirty_bitmap: false,
    };
    calls.extend(close.into_iter().map(|c| created(c, true)));
    calls.extend(tail.into_iter().map(|c| created(c, false)));
    Ok(Plan { calls })
}

/// Whether any region overlaps `[s, e)`.
fn intersects(regions: &[Region], s: u64, e: u64) -> bool {
    let i = regions.partition_point(|r| r.end() <= s);
    regions.get(i).is_some_and(|r| r.gpa < e)
}

/// Decides, for one address space, which slots stay, change flags, move or go, and the new
/// slots' ranges (in GPA order).
fn plan_space(slots: &[Slot], regions: &[Region], policy: &CutPolicy, max_bytes: u64) -> SpacePlan {
    let mut sp = SpacePlan::default();
    // 1. Keep every slot whose whole range maps identically (READONLY included).
    let mut kept: Vec<(u64, u64)> = Vec::new();
    let mut dead: Vec<Slot> = Vec::new();
    for s in slots {
        let i = regions.partition_point(|r| r.end() <= s.gpa);
        let same = regions.get(i).filter(|r| {
            r.gpa <= s.gpa
                && r.end() >= s.end()
                && r.host_of(s.gpa) == s.host
                && r.flags.readonly() == s.flags.readonly()
        });
        match same {
            Some(r) => {
                kept.push((s.gpa, s.end()));
                if r.flags != s.flags {
                    sp.flags.push(
                        Slot {
                            flags: r.flags,
                            ..*s
                        }
                        .set_call(),
                    );
                }
            }
            None => dead.push(*s),
        }
    }
    // 2. What the kept slots leave uncovered.
    let mut pieces: Vec<Region> = Vec::new();
    let mut k = 0;
    for r in regions {
        let mut at = r.gpa;
        while k < kept.len() && kept[k].1 <= at {
            k += 1;
        }
        while k < kept.len() && kept[k].0 < r.end() {
            if kept[k].0 > at {
                pieces.push(sub(r, at, kept[k].0));
            }
            at = at.max(kept[k].1);
            if kept[k].1 > r.end() {
                break;
            }
            k += 1;
        }
        if at < r.end() {
            pieces.push(sub(r, at, r.end()));
        }
    }
    // 3. A dead slot whose host memory appears whole in an uncovered piece moves there.
    // (Only needed when some slot is dead; a boot or a pure grow skips building it.)
    let mut by_host: BTreeMap<(u64, u64), Region> = if dead.is_empty() {
        BTreeMap::new()
    } else {
        pieces.drain(..).map(|p| ((p.host, p.gpa), p)).collect()
    };
    let mut moves: Vec<Moved> = Vec::new();
    let mut deletes: Vec<Slot> = Vec::new();
    for s in dead {
        let found = by_host
            .range(..=(s.host, u64::MAX))
            .rev()
            .take(4)
            .map(|(_, p)| *p)
            .find(|p| {
                p.host + p.size >= s.host + s.size && p.flags.readonly() == s.flags.readonly()
            });
        match found {
            Some(p) if p.gpa + (s.host - p.host) != s.gpa => {
                let gpa = p.gpa + (s.host - p.host);
                by_host.remove(&(p.host, p.gpa));
                for rest in [sub(&p, p.gpa, gpa), sub(&p, gpa + s.size, p.end())] {
                    if rest.size > 0 {
                        by_host.insert((rest.host, rest.gpa), rest);
                    }
                }
                moves.push(Moved {
                    slot: s,
                    gpa,
                    flags: p.flags,
                });
            }
            _ => deletes.push(s),
        }
    }
    // 4. Moves that depend on each other in a cycle (a swap) become delete + create.
    let (ordered, broken) = order_moves(moves);
    for m in broken {
        deletes.push(m.slot);
        let r = Region {
            address_space: m.slot.id.address_space,
            gpa: m.gpa,
            size: m.slot.size,
            host: m.slot.host,
            flags: m.flags,
        };
        by_host.insert((r.host, r.gpa), r);
    }
    sp.moves = ordered;
    deletes.sort_by_key(|s| s.gpa);
    sp.deletes = deletes;
    // 5. Cut what is left into new slots.
    let mut rest: Vec<Region> = pieces;
    rest.extend(by_host.into_values());
    rest.sort_by_key(|r| r.gpa);
    // Rejoin pieces a move carved and a broken cycle gave back.
    let mut joined: Vec<Region> = Vec::with_capacity(rest.len());
    for r in rest {
        match joined.last_mut() {
            Some(last) if last.continued_by(&r) => last.size += r.size,
            _ => joined.push(r),
        }
    }
    let mut cuts = Vec::new();
    for r in joined {
        cuts.clear();
        policy.cuts(r.gpa, r.end(), r.host, &mut cuts);
        let mut at = r.gpa;
        for &c in cuts.iter().chain(std::iter::once(&r.end())) {
            while at < c {
                let e = c.min(at.saturating_add(max_bytes));
                sp.creates.push(sub(&r, at, e));
                at = e;
            }
        }
    }
    sp
}

/// The part `[s, e)` of a region.
fn sub(r: &Region, s: u64, e: u64) -> Region {
    Region {
        gpa: s,
        size: e - s,
        host: r.host_of(s),
        ..*r
    }
}

/// Orders moves so each one's new range is free when it runs (a move waits for the moves whose
/// old range it lands on); moves caught in a cycle are returned separately.
fn order_moves(moves: Vec<Moved>) -> (Vec<Moved>, Vec<Moved>) {
    if moves.len() < 2 {
        return (moves, Vec::new());
    }
    let n = moves.len();
    // Old ranges are disjoint: sort them to find which old ranges a new range lands on.
    let mut old: Vec<(u64, u64, usize)> = moves
        .iter()
        .enumerate()
        .map(|(i, m)| (m.slot.gpa, m.slot.end(), i))
        .collect();
    old.sort_unstable();
    let mut waits_for: Vec<Vec<usize>> = vec![Vec::new(); n];
    let mut blockers = vec![0usize; n];
    for (i, m) in moves.iter().enumerate() {
        let (s, e) = (m.gpa, m.gpa + m.slot.size);
        let j = old.partition_point(|o| o.1 <= s);
        for &(_, _, other) in old[j..].iter().take_while(|o| o.0 < e) {
            if other != i {
                waits_for[other].push(i);
                blockers[i] += 1;
            }
        }
    }
    let mut ready: Vec<usize> = (0..n).filter(|&i| blockers[i] == 0).collect();
    let mut order = Vec::with_capacity(n);
    let mut broken = Vec::new();
    let mut done = vec![false; n];
    let mut next_stuck = 0;
    loop {
        while let Some(i) = ready.pop() {
            done[i] = true;
            order.push(i);
            for &w in &waits_for[i] {
                if !done[w] {
                    blockers[w] -= 1;
                    if blockers[w] == 0 {
                        ready.push(w);
                    }
                }
            }
        }
        // Every move left waits in a cycle: turn one into delete + create, which frees its old
        // range before any move runs.
        while next_stuck < n && done[next_stuck] {
            next_stuck += 1;
        }
        if next_stuck == n {
            break;
        }
        let i = next_stuck;
        done[i] = true;
        broken.push(i);
        for &w in &waits_for[i] {
            if !done[w] {
                blockers[w] -= 1;
                if blockers[w] == 0 {
                    ready.push(w);
                }
            }
        }
    }
    let mut slots: Vec<Option<Moved>> = moves.into_iter().map(Some).collect();
    let ordered: Vec<Moved> = order.iter().filter_map(|&i| slots[i].take()).collect();
    let broken: Vec<Moved> = broken.iter().filter_map(|&i| slots[i].take()).collect();
    (ordered, broken)
}
