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
