//! Property tests: random sequences of guest memory maps (ROM/MMIO overlays, DIMM hot-plug, BAR
//! moves, dirty-logging and read-only flips) planned one after the other.

use std::collections::BTreeSet;

use memslots::model::{Change, Layout, Limits, SlotFlags, SlotId};
use memslots::planner::{plan_with, CutPolicy, MemoryMap, Region};
use proptest::prelude::*;

const CELL: u64 = 0x4000;
const CELLS: usize = 64; // the low 1 MiB, where firmware overlays
const RAM_HOST: u64 = 0x7f00_0000_0000;
const ROM_HOST: u64 = 0x7f10_0000_0000;
const DIMM_HOST: u64 = 0x7f20_0000_0000;
const BAR_HOST: u64 = 0x7f30_0000_0000;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Ram,
    Rom(u8),
    Mmio,
}

#[derive(Clone, Debug)]
struct Vm {
    low: Vec<(Kind, SlotFlags)>,
    high_ram: SlotFlags,
    dimms: [Option<SlotFlags>; 3],
    bar: Option<u8>,
    smram: bool,
}

#[derive(Clone, Debug)]
enum Op {
    Overlay {
        start: usize,
        len: usize,
        kind: Kind,
    },
    HotPlug {
        dimm: usize,
        present: bool,
    },
    BarMove {
        to: Option<u8>,
    },
    DirtyFlip {
        cell: usize,
        len: usize,
        on: bool,
    },
    ReadonlyFlip {
        cell: usize,
        len: usize,
    },
    HighRamDirty {
        on: bool,
    },
    Smram {
        on: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let kind = prop_oneof![
        Just(Kind::Ram),
        Just(Kind::Mmio),
        (0u8..3).prop_map(Kind::Rom)
    ];
    prop_oneof![
        3 => (0..CELLS, 1..16usize, kind).prop_map(|(start, len, kind)| Op::Overlay { start, len, kind }),
        1 => (0..3usize, any::<bool>()).prop_map(|(dimm, present)| Op::HotPlug { dimm, present }),
        1 => proptest::option::of(0u8..4).prop_map(|to| Op::BarMove { to }),
        1 => (0..CELLS, 1..32usize, any::<bool>()).prop_map(|(cell, len, on)| Op::DirtyFlip { cell, len, on }),
        1 => (0..CELLS, 1..8usize).prop_map(|(cell, len)| Op::ReadonlyFlip { cell, len }),
        1 => any::<bool>().prop_map(|on| Op::HighRamDirty { on }),
        1 => any::<bool>().prop_map(|on| Op::Smram { on }),
    ]
}

impl Vm {
    fn new() -> Self {
        Vm {
            low: vec![(Kind::Ram, SlotFlags::NONE); CELLS],
            high_ram: SlotFlags::NONE,
            dimms: [None; 3],
            bar: None,
            smram: false,
        }
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Overlay { start, len, kind } => {
                for c in &mut self.low[start..(start + len).min(CELLS)] {
                    let ro = matches!(kind, Kind::Rom(_));
                    *c = (kind, SlotFlags::NONE.with(SlotFlags::READONLY, ro));
                }
            }
            Op::HotPlug { dimm, present } => {
                self.dimms[dimm] = present.then_some(SlotFlags::NONE);
            }
            Op::BarMove { to } => self.bar = to,
            Op::DirtyFlip { cell, len, on } => {
                for c in &mut self.low[cell..(cell + len).min(CELLS)] {
                    c.1 = c.1.with(SlotFlags::LOG_DIRTY_PAGES, on);
                }
                for d in self.dimms.iter_mut().flatten() {
                    *d = d.with(SlotFlags::LOG_DIRTY_PAGES, on);
                }
            }
            Op::ReadonlyFlip { cell, len } => {
                for c in &mut self.low[cell..(cell + len).min(CELLS)] {
                    c.1 = c.1.with(SlotFlags::READONLY, !c.1.readonly());
                }
            }
            Op::HighRamDirty { on } => {
                self.high_ram = self.high_ram.with(SlotFlags::LOG_DIRTY_PAGES, on)
            }
            Op::Smram { on } => self.smram = on,
        }
    }

    fn map(&self) -> MemoryMap {
        let region = |gpa, size, host, flags| Region {
            address_space: 0,
            gpa,
            size,
            host,
            flags,
        };
        let mut out = Vec::new();
        for (i, &(kind, flags)) in self.low.iter().enumerate() {
            let gpa = i as u64 * CELL;
            match kind {
                Kind::Ram => out.push(region(gpa, CELL, RAM_HOST + gpa, flags)),
                Kind::Rom(n) => out.push(region(
                    gpa,
                    CELL,
                    ROM_HOST + ((n as u64) << 24) + gpa,
                    flags,
                )),
                Kind::Mmio => {}
            }
        }
        out.push(region(
            0x10_0000,
            0x3ff0_0000,
            RAM_HOST + 0x10_0000,
            self.high_ram,
        ));
        for (k, d) in self.dimms.iter().enumerate() {
            if let Some(flags) = d {
                let k = k as u64;
                out.push(region(
                    0x1_0000_0000 + k * 0x4000_0000,
                    0x1000_0000,
                    DIMM_HOST + (k << 32),
                    *flags,
                ));
            }
        }
        if let Some(p) = self.bar {
            out.push(region(
                0xe000_0000 + p as u64 * 0x10_0000,
                0x1_0000,
                BAR_HOST,
                SlotFlags::READONLY,
            ));
        }
        if self.smram {
            // SMM's address space: RAM behind the VGA window.
            out.push(Region {
                address_space: 1,
                ..region(0xa_0000, 0x2_0000, RAM_HOST + 0xa_0000, SlotFlags::NONE)
            });
        }
        MemoryMap::new(out).expect("the generator makes valid maps")
    }
}

/// Plans the sequence under `limits` and checks every plan; returns the most slots one address
/// space held after any step.
fn check_sequence(ops: &[Op], policy: &CutPolicy, limits: Limits) -> Result<usize, TestCaseError> {
    let mut vm = Vm::new();
    let mut layout = Layout::new(limits);
    let mut most = 0;
    let mut targets = vec![vm.map()];
    for op in ops {
        vm.apply(op);
        targets.push(vm.map());
    }
    for (step, target) in targets.iter().enumerate() {
        let plan = plan_with(&layout, target, policy)
            .map_err(|e| TestCaseError::fail(format!("step {step}: {e}")))?;
        let calls = plan.slot_calls();
        // Ids: a create never uses an id in use before the batch unless the batch deletes it,
        // and new ids are the lowest free ones, then (only when none is free below the limit)
        // the deleted ones, lowest first.
        let before: BTreeSet<SlotId> = layout.slots().map(|s| s.id).collect();
        let created: Vec<SlotId> = plan
            .calls
            .iter()
            .filter(|c| c.change == Change::Create)
            .map(|c| c.call.id())
            .collect();
        let deleted: BTreeSet<SlotId> = plan
            .calls
            .iter()
            .filter(|c| c.change == Change::Delete)
            .map(|c| c.call.id())
            .collect();
        for id in &created {
            prop_assert!(
                !before.contains(id) || deleted.contains(id),
                "step {step}: create reuses live {id}"
            );
        }
        // No new slot spans a host boundary (a backend keeps the memories on each side apart).
        for c in plan.calls.iter().filter(|c| c.change == Change::Create) {
            let (host, end) = (c.call.host, c.call.host + c.call.size);
            prop_assert!(
                !policy.host_boundaries.iter().any(|&b| host < b && b < end),
                "step {}: {} spans a host boundary",
                step,
                c.call
            );
        }
        let mut sorted = created.clone();
        sorted.sort();
        for space in [0u16, 1] {
            let mut mine: Vec<SlotId> = sorted
                .iter()
                .copied()
                .filter(|id| id.address_space == space)
                .collect();
            let mut expected: Vec<SlotId> = (0..limits.slots)
                .map(|id| SlotId::in_space(space, id))
                .filter(|id| !before.contains(id))
                .take(mine.len())
                .collect();
            let reused = mine.len() - expected.len();
            expected.extend(
                deleted
                    .iter()
                    .copied()
                    .filter(|id| id.address_space == space)
                    .take(reused),
            );
            expected.sort();
            mine.sort();
            prop_assert_eq!(mine, expected, "step {}: ids not lowest-first", step);
            if reused > 0 {
                // A deleted id is re-used only after its DELETE.
                for (i, c) in plan.calls.iter().enumerate() {
                    if c.change == Change::Create && deleted.contains(&c.call.id()) {
                        let del = plan
                            .calls
                            .iter()
                            .position(|d| d.change == Change::Delete && d.call.id() == c.call.id());
                        prop_assert!(
                            del.is_some_and(|d| d < i),
                            "step {}: create before delete",
                            step
                        );
                    }
                }
            }
        }
        // The model accepts the plan, the quiesced calls are exactly its hole window, and the
        // result maps exactly like the target.
        let holes = layout
            .holes(&calls)
            .map_err(|e| TestCaseError::fail(format!("step {step}: {e}")))?;
        let window = holes.quiesce_window();
        for (i, c) in plan.calls.iter().enumerate() {
            prop_assert_eq!(c.quiesced, window.contains(&i), "step {} call {}", step, i);
        }
        layout
            .apply_batch(&calls)
            .map_err(|e| TestCaseError::fail(format!("step {step}: {e}")))?;
        prop_assert_eq!(&MemoryMap::from_layout(&layout), target, "step {}", step);
        // Kept slots cost nothing: planning the same map again is empty.
        let again = plan_with(&layout, target, policy)
            .map_err(|e| TestCaseError::fail(format!("step {step} again: {e}")))?;
        prop_assert!(again.is_empty(), "step {}: replanning is not empty", step);
        for space in [0u16, 1] {
            most = most.max(
                layout
                    .slots()
                    .filter(|s| s.id.address_space == space)
                    .count(),
            );
        }
    }
    Ok(most)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn random_map_sequences_plan_safely(ops in proptest::collection::vec(op(), 1..12), minimal in any::<bool>()) {
        let policy = if minimal { CutPolicy::minimal() } else { CutPolicy::x86_pc() };
        check_sequence(&ops, &policy, Limits::default())?;
    }

    /// Host boundaries inside the low RAM (which the map joins into one region) and the DIMMs':
    /// no slot spans one, in either policy, and every plan still maps exactly.
    #[test]
    fn random_map_sequences_plan_within_host_boundaries(
        ops in proptest::collection::vec(op(), 1..12),
        cells in proptest::collection::vec(1..CELLS as u64, 0..6),
        minimal in any::<bool>(),
    ) {
        let base = if minimal { CutPolicy::minimal() } else { CutPolicy::x86_pc() };
        let edges = cells
            .iter()
            .map(|c| RAM_HOST + c * CELL)
            .chain([DIMM_HOST + 0x10_0000]);
        check_sequence(&ops, &base.with_host_boundaries(edges), Limits::default())?;
    }

    /// The same sequences with the slot limit set to the most slots they ever hold: every plan
    /// still fits (re-using ids it deletes where no other is free), since with minimal cuts the
    /// planner's choices do not depend on ids.
    #[test]
    fn random_map_sequences_plan_at_the_slot_limit(ops in proptest::collection::vec(op(), 1..12)) {
        let policy = CutPolicy::minimal();
        let most = check_sequence(&ops, &policy, Limits::default())?;
        let tight = Limits { slots: most.max(1) as u16, ..Limits::default() };
        check_sequence(&ops, &policy, tight)?;
    }
}
