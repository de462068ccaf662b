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

fn check_sequence(ops: &[Op], policy: &CutPolicy) -> Result<(), TestCaseError> {
    let mut vm = Vm::new();
    let mut layout = Layout::new(Limits::default());
    let mut targets = vec![vm.map()];
    for op in ops {
        vm.apply(op);
        targets.push(vm.map());
    }
    for (step, target) in targets.iter().enumerate() {
        let plan = plan_with(&layout, target, policy)
            .map_err(|e| TestCaseError::fail(format!("step {step}: {e}")))?;
        let calls = plan.slot_calls();
        // Ids: a create never uses an id in use before the batch (so never one it deletes), and
        // new ids are the lowest free ones.
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
            prop_assert!(!before.contains(id), "step {step}: create reuses {id}");
            prop_assert!(
                !deleted.contains(id),
                "step {step}: create reuses deleted {id}"
            );
        }
        let mut sorted = created.clone();
        sorted.sort();
        for space in [0u16, 1] {
            let mine: Vec<SlotId> = sorted
                .iter()
                .copied()
                .filter(|id| id.address_space == space)
                .collect();
            let lowest: Vec<SlotId> = (0..u16::MAX)
                .map(|id| SlotId::in_space(space, id))
                .filter(|id| !before.contains(id))
                .take(mine.len())
                .collect();
            prop_assert_eq!(mine, lowest, "step {}: ids not lowest-first", step);
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
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn random_map_sequences_plan_safely(ops in proptest::collection::vec(op(), 1..12), minimal in any::<bool>()) {
        let policy = if minimal { CutPolicy::minimal() } else { CutPolicy::x86_pc() };
        check_sequence(&ops, &policy)?;
    }
}
