//! Layouts and maps at KVM's slot limit, shared by `memslots bench`, the criterion benches and the
//! tests, so that every figure and every check describes the same change.
//!
//! Two shapes:
//! - the *planner grid*: region `i` is 1 MiB of RAM at GPA `i` × 2 MiB (the second half of each
//!   2 MiB cell free), backed at its own 16 MiB host range; [`planner_change`] deletes a quarter,
//!   switches a quarter to dirty logging, moves a quarter into the free half and keeps a quarter;
//! - the *dense layout*: slot `i` is 2 pages at GPA page `4i`, host pages packed, for the soft
//!   backend's lookups and batches.
//!
//! ```
//! use memslots::model::{Change, Layout, Limits};
//! use memslots::planner::{plan, plan_with, CutPolicy};
//! use memslots_testkit::samples;
//!
//! let mut layout = Layout::new(Limits::default());
//! let boot = plan_with(&layout, &samples::planner_grid(8)?, &CutPolicy::x86_pc())?;
//! layout.apply_batch(&boot.slot_calls())?;
//! let change = plan(&layout, &samples::planner_change(8)?)?;
//! let count = |kind| change.calls.iter().filter(|c| c.change == kind).count();
//! assert_eq!((count(Change::FlagsOnly), count(Change::Move)), (2, 2));
//! // Regions 0 and 4 go; the PC policy had cut region 0 (the low MiB) in three.
//! assert_eq!(count(Change::Delete), 4);
//! assert_eq!(change.quiesced_ioctls(), 0);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use memslots::model::{Layout, Limits, Slot, SlotCall, SlotFlags, SlotId, PAGE_SIZE};
use memslots::planner::{MapError, MemoryMap, Region};

/// Host address of the first sample region or slot (only ever handed to the model, never mapped).
pub const SAMPLE_HOST: u64 = 0x7f00_0000_0000;

/// Region `i` of the planner grid: 1 MiB at `i` × 2 MiB, host `SAMPLE_HOST + i` × 16 MiB.
pub fn planner_region(i: u64) -> Region {
    Region {
        address_space: 0,
        gpa: i * 0x20_0000,
        size: 0x10_0000,
        host: SAMPLE_HOST + i * 0x100_0000,
        flags: SlotFlags::NONE,
    }
}

/// The planner grid of `n` regions.
pub fn planner_grid(n: u64) -> Result<MemoryMap, MapError> {
    MemoryMap::new((0..n).map(planner_region).collect())
}

/// The grid of `n` regions changed by quarters: `i % 4 == 0` deleted, `1` switched to dirty
/// logging, `2` moved into the free second half of its 2 MiB cell, `3` kept.
pub fn planner_change(n: u64) -> Result<MemoryMap, MapError> {
    MemoryMap::new(
        (0..n)
            .filter_map(|i| {
                let r = planner_region(i);
                match i % 4 {
                    0 => None,
                    1 => Some(Region {
                        flags: SlotFlags::LOG_DIRTY_PAGES,
                        ..r
                    }),
                    2 => Some(Region {
                        gpa: r.gpa + 0x10_0000,
                        ..r
                    }),
                    _ => Some(r),
                }
            })
            .collect(),
    )
}

/// Slot `i` of the dense layout: 2 pages at GPA page `4i`, host pages packed.
pub fn dense_slot(i: u16) -> Slot {
    Slot {
        id: SlotId::new(i),
        gpa: u64::from(i) * 4 * PAGE_SIZE,
        size: 2 * PAGE_SIZE,
        host: SAMPLE_HOST + u64::from(i) * 2 * PAGE_SIZE,
        flags: SlotFlags::NONE,
        guest_memfd: 0,
        guest_memfd_offset: 0,
    }
}

/// The dense layout with every slot `limits` allows (32,764 by default).
pub fn dense_layout(limits: Limits) -> Layout {
    let mut layout = Layout::new(limits);
    let calls: Vec<SlotCall> = (0..limits.slots)
        .map(|i| dense_slot(i).set_call())
        .collect();
    layout
        .apply_batch(&calls)
        .expect("dense slots are disjoint, page aligned and within the limit");
    layout
}

/// A QEMU `kvm_set_user_memory` trace made in code, as long and as wide as a test or bench needs
/// (a 50,000-commit trace is 9 MB of text: generated, not committed).
///
/// QEMU 8's line format (`AddrSpace#0`), deterministic from `seed`, every call one the model
/// accepts (`ret=0`). Commit 0 creates `slots` slots: slot `i` maps 1 MiB at GPA `i` × 2 MiB
/// from host `SAMPLE_HOST + i` MiB (host memory is one run, as QEMU's RAM is, so a replay's
/// arena stays the size of the memory). Every later commit deletes one slot picked by the seed
/// and creates it again changed, as QEMU's listener does: moved to the other 1 MiB half of its
/// 2 MiB cell, resized (1 to 256 pages), or given other flags (none, dirty logging, read-only).
/// So the trace has `slots + 2 × (commits - 1)` calls in `commits` commits.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct SyntheticTrace {
    /// Commits, the first creating every slot (at least 1).
    pub commits: usize,
    /// Slots in address space 0 (at most the kernel's 32,764).
    pub slots: u16,
    /// Seed of the changes.
    pub seed: u64,
}

impl SyntheticTrace {
    /// Calls in the trace.
    pub fn calls(&self) -> usize {
        usize::from(self.slots) + 2 * self.commits.saturating_sub(1)
    }

    /// Writes the trace, one line per call.
    pub fn write_to(&self, out: &mut impl std::io::Write) -> std::io::Result<()> {
        const CELL: u64 = 0x20_0000;
        const HALF: u64 = 0x10_0000;
        // Per slot: which half of its cell, pages, flags.
        let mut slots: Vec<(bool, u64, u32)> =
            vec![(false, HALF / PAGE_SIZE, 0); self.slots.into()];
        let line = |out: &mut dyn std::io::Write, id: usize, s: (bool, u64, u32), delete: bool| {
            let gpa = id as u64 * CELL + if s.0 { HALF } else { 0 };
            let (flags, size) = if delete {
                (0, 0)
            } else {
                (s.2, s.1 * PAGE_SIZE)
            };
            writeln!(
                out,
                "kvm_set_user_memory AddrSpace#0 Slot#{id} flags={flags:#x} gpa={gpa:#x} \
                 size={size:#x} ua={:#x} ret=0",
                SAMPLE_HOST + id as u64 * HALF
            )
        };
        for (id, s) in slots.iter().enumerate() {
            line(out, id, *s, false)?;
        }
        if slots.is_empty() {
            return Ok(());
        }
        let mut rng = crate::conformance::SplitMix64::new(self.seed);
        for _ in 1..self.commits {
            let id = rng.below(slots.len() as u64) as usize;
            let old = slots[id];
            line(out, id, old, true)?;
            let new = match rng.below(3) {
                0 => (!old.0, old.1, old.2),
                1 => (old.0, 1 + rng.below(HALF / PAGE_SIZE), old.2),
                // Another of none, LOG_DIRTY_PAGES, READONLY.
                _ => (
                    old.0,
                    old.1,
                    [0, 1, 2][(old.2 as usize + 1 + rng.below(2) as usize) % 3],
                ),
            };
            slots[id] = new;
            line(out, id, new, false)?;
        }
        Ok(())
    }

    /// The trace as text.
    pub fn text(&self) -> String {
        let mut out = Vec::with_capacity(self.calls() * 96);
        self.write_to(&mut out)
            .expect("writing to a Vec does not fail");
        String::from_utf8(out).expect("the lines are ASCII")
    }
}
