//! Hole analysis: where a batch, applied call by call, leaves a GPA that is mapped before and after
//! the batch unmapped, or mapped somewhere that is neither its old nor its new place.
//!
//! A vCPU that touches such a GPA between two calls sees MMIO (wrong data) or, on an instruction
//! fetch, an internal error. The calls from the one that opens a hole to the one that closes it
//! must run with vCPUs held out; everything else may run while they run.

use std::collections::BTreeMap;
use std::ops::Range;

use super::batch::BatchError;
use super::layout::{Layout, Mapping, Segment};
use super::slot::SlotCall;

/// A guest-physical range of one address space.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct GpaRange {
    /// Address space.
    pub address_space: u16,
    /// First GPA.
    pub start: u64,
    /// One past the last GPA.
    pub end: u64,
}

/// A hole: `range` is wrong after call `opened_by` and right again after call `closed_by`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Hole {
    /// The range.
    pub range: GpaRange,
    /// Index of the call after which the range is wrong.
    pub opened_by: usize,
    /// Index of the call after which it is right again.
    pub closed_by: usize,
}

/// The holes of a batch on a layout.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct HoleReport {
    /// Every hole, ordered by opening call then address.
    pub holes: Vec<Hole>,
}

impl HoleReport {
    /// Whether the batch can run call by call with vCPUs running.
    pub fn is_empty(&self) -> bool {
        self.holes.is_empty()
    }

    /// The smallest run of calls that must be made with vCPUs held out: from the first call that
    /// opens a hole to the last that closes one. Empty when there is no hole.
    pub fn quiesce_window(&self) -> Range<usize> {
        let start = self.holes.iter().map(|h| h.opened_by).min();
        let end = self.holes.iter().map(|h| h.closed_by + 1).max();
        match (start, end) {
            (Some(s), Some(e)) => s..e,
            _ => 0..0,
        }
    }

    /// For each of `len` calls, whether it opens a hole.
    pub fn opens_hole(&self, len: usize) -> Vec<bool> {
        let mut out = vec![false; len];
        for hole in &self.holes {
            out[hole.opened_by] = true;
        }
        out
    }

    /// Bytes of guest memory that are in a hole at some point.
    pub fn bytes(&self) -> u64 {
        self.holes.iter().map(|h| h.range.end - h.range.start).sum()
    }
}

/// The GPA ranges one accepted call changes: the old slot's range and the new slot's range.
fn touched(before: Option<crate::model::Slot>, after: Option<crate::model::Slot>) -> Vec<GpaRange> {
    let mut out: Vec<GpaRange> = Vec::with_capacity(2);
    for slot in [before, after].into_iter().flatten() {
        let r = GpaRange {
            address_space: slot.id.address_space,
            start: slot.gpa,
            end: slot.end(),
        };
        if !out.contains(&r) {
            out.push(r);
        }
    }
    out
}

/// Pieces of `range` that are mapped in both `old` and `new` and whose current mapping is neither.
fn wrong_pieces(
    range: GpaRange,
    old: &[Segment],
    new: &[Segment],
    now: &[Segment],
) -> Vec<(u64, u64)> {
    // Walk the three segment lists together; each covers `range` exactly.
    let mut cuts: Vec<u64> = old
        .iter()
        .chain(new)
        .chain(now)
        .flat_map(|s| [s.start, s.end])
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    let at = |segs: &[Segment], gpa: u64| -> Option<Mapping> {
        let i = segs.partition_point(|s| s.end <= gpa);
        segs[i].mapping.map(|m| Mapping {
            host: m.host + (gpa - segs[i].start),
            readonly: m.readonly,
        })
    };
    let mut out: Vec<(u64, u64)> = Vec::new();
    for w in cuts.windows(2) {
        let (s, e) = (w[0], w[1]);
        if s < range.start || e > range.end {
            continue;
        }
        let (o, n, c) = (at(old, s), at(new, s), at(now, s));
        let wrong = o.is_some() && n.is_some() && c != o && c != n;
        if wrong {
            match out.last_mut() {
                Some(last) if last.1 == s => last.1 = e,
                _ => out.push((s, e)),
            }
        }
    }
    out
}

impl Layout {
    /// Finds the holes `calls` would open if applied one by one to this layout.
    ///
    /// The layout is left unchanged. Fails like [`Layout::apply_batch`] on an invalid batch.
    /// Cost: O(k log n) lookups plus the size of the touched ranges' segment lists.
    pub fn holes(&mut self, calls: &[SlotCall]) -> Result<HoleReport, BatchError> {
        // Pass 1: what each call touches, and the final mapping of those ranges.
        let done = self.apply_batch(calls)?;
        let ranges: Vec<Vec<GpaRange>> = done.iter().map(|a| touched(a.before, a.after)).collect();
        let seg = |l: &Layout, r: &GpaRange| l.segments(r.address_space, r.start, r.end);
        let new: Vec<Vec<Vec<Segment>>> = ranges
            .iter()
            .map(|rs| rs.iter().map(|r| seg(self, r)).collect())
            .collect();
        self.revert_all(&done);
        let old: Vec<Vec<Vec<Segment>>> = ranges
            .iter()
            .map(|rs| rs.iter().map(|r| seg(self, r)).collect())
            .collect();

        // Pass 2: after each call, re-judge only what it touched.
        // Open holes: (space, start) -> (end, opened_by).
        let mut open: BTreeMap<(u16, u64), (u64, usize)> = BTreeMap::new();
        let mut holes = Vec::new();
        for (i, call) in calls.iter().enumerate() {
            // Valid: pass 1 accepted the same calls from the same layout.
            let applied = self.apply(call).expect("batch was checked");
            debug_assert_eq!(applied, done[i]);
            for (k, r) in ranges[i].iter().enumerate() {
                let now = seg(self, r);
                let wrong = wrong_pieces(*r, &old[i][k], &new[i][k], &now);
                close_and_open(&mut open, &mut holes, *r, &wrong, i);
            }
        }
        self.revert_all(&done);
        debug_assert!(open.is_empty(), "the final layout has no hole");
        holes.sort_by_key(|h: &Hole| (h.opened_by, h.range));
        Ok(HoleReport { holes })
    }
}

/// Updates the open holes inside `r` after call `i`: pieces no longer wrong close (recorded in
/// `holes`); pieces newly wrong open at `i`; pieces still wrong keep their opening call.
fn close_and_open(
    open: &mut BTreeMap<(u16, u64), (u64, usize)>,
    holes: &mut Vec<Hole>,
    r: GpaRange,
    wrong: &[(u64, u64)],
    i: usize,
) {
    let space = r.address_space;
    // Take every open hole that intersects r out of the map, cutting at r's edges.
    let mut inside: Vec<(u64, u64, usize)> = Vec::new();
    let keys: Vec<(u16, u64)> = open
        .range((space, 0)..(space, r.end))
        .filter(|(_, &(end, _))| end > r.start)
        .map(|(k, _)| *k)
        .collect();
    for key in keys {
        let (end, by) = open.remove(&key).expect("key listed");
        let start = key.1;
        if start < r.start {
            open.insert((space, start), (r.start, by));
        }
        if end > r.end {
            open.insert((space, r.end), (end, by));
        }
        inside.push((start.max(r.start), end.min(r.end), by));
    }
    // Pieces of old holes that are no longer wrong are closed by call i.
    for &(s, e, by) in &inside {
        let mut at = s;
        for &(ws, we) in wrong.iter().filter(|w| w.1 > s && w.0 < e) {
            if ws.max(s) > at {
                holes.push(hole(space, at, ws.max(s), by, i));
            }
            at = we.min(e);
        }
        if at < e {
            holes.push(hole(space, at, e, by, i));
        }
    }
    // Wrong pieces: keep the opening call of an old hole where there was one, else i.
    for &(ws, we) in wrong {
        let mut at = ws;
        for &(s, e, by) in inside.iter().filter(|h| h.1 > ws && h.0 < we) {
            if s.max(ws) > at {
                open.insert((space, at), (s.max(ws), i));
            }
            open.insert((space, s.max(ws)), (e.min(we), by));
            at = e.min(we);
        }
        if at < we {
            open.insert((space, at), (we, i));
        }
    }
}

fn hole(address_space: u16, start: u64, end: u64, opened_by: usize, closed_by: usize) -> Hole {
    Hole {
        range: GpaRange {
            address_space,
            start,
            end,
        },
        opened_by,
        closed_by,
    }
}
