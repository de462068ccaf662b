//! The planner on hand-made changes: each kind of change is lowered the cheapest way, ids are
//! allocated as KVM batches need, limits give typed errors, and a 32,764-slot change is planned.

use std::time::Instant;

use memslots::model::{Change, Layout, Limits, SlotFlags, SlotId};
use memslots::planner::{plan, plan_with, CutPolicy, MemoryMap, Plan, PlanError, Region};
use memslots_testkit::samples;

const HOST: u64 = 0x7f00_0000_0000;

fn ram(gpa: u64, size: u64) -> Region {
    Region {
        address_space: 0,
        gpa,
        size,
        host: HOST + gpa,
        flags: SlotFlags::NONE,
    }
}

fn map(regions: &[Region]) -> MemoryMap {
    MemoryMap::new(regions.to_vec()).unwrap()
}

/// Plans `to` from `layout`, checks the plan with the model and applies it.
fn step(layout: &mut Layout, to: &MemoryMap, policy: &CutPolicy) -> Plan {
    let plan = plan_with(layout, to, policy).unwrap();
    let window = layout.holes(&plan.slot_calls()).unwrap().quiesce_window();
    for (i, c) in plan.calls.iter().enumerate() {
        assert_eq!(c.quiesced, window.contains(&i), "call {i} of {plan:#?}");
    }
    // Every call that drops a dirty bitmap is marked, and no other.
    let mut scratch = layout.clone();
    for c in &plan.calls {
        let applied = scratch.apply(&c.call).unwrap();
        assert_eq!(c.drops_dirty_bitmap, applied.drops_dirty_bitmap(), "{c:?}");
    }
    layout.apply_batch(&plan.slot_calls()).unwrap();
    assert_eq!(&MemoryMap::from_layout(layout), to);
    plan
}

fn changes(plan: &Plan) -> Vec<Change> {
    plan.calls.iter().map(|c| c.change).collect()
}

fn start(regions: &[Region]) -> Layout {
    let mut layout = Layout::new(Limits::default());
    step(&mut layout, &map(regions), &CutPolicy::minimal());
    layout
}

#[test]
fn grow_keeps_the_slot_and_adds_one() {
    let mut layout = start(&[ram(0x1000_0000, 0x1000_0000)]);
    let plan = step(
        &mut layout,
        &map(&[ram(0x1000_0000, 0x2000_0000)]),
        &CutPolicy::minimal(),
    );
    assert_eq!(changes(&plan), vec![Change::Create]);
    assert_eq!(plan.zapped_bytes(), 0);
    assert_eq!(plan.quiesced_ioctls(), 0);
}

#[test]
fn shrink_is_delete_then_create_inside_the_window() {
    let mut layout = start(&[ram(0, 0x2000_0000)]);
    let plan = step(
        &mut layout,
        &map(&[ram(0, 0x1000_0000)]),
        &CutPolicy::minimal(),
    );
    assert_eq!(changes(&plan), vec![Change::Delete, Change::Create]);
    assert_eq!(plan.quiesced_ioctls(), 2);
    assert_eq!(plan.zapped_bytes(), 0x2000_0000);
}

#[test]
fn an_overlay_deletes_only_the_small_slot_the_policy_cut() {
    // Boot: 1 GiB of RAM, cut at x86's legacy boundaries.
    let mut layout = Layout::new(Limits::default());
    step(
        &mut layout,
        &map(&[ram(0, 0x4000_0000)]),
        &CutPolicy::x86_pc(),
    );
    // Firmware maps two ROMs over 0xc0000..0x100000.
    // Two ROMs in separate host memory (so they are two regions, not one).
    let rom = |gpa: u64| Region {
        host: 0x7f10_0000_0000 + (gpa << 8),
        flags: SlotFlags::READONLY,
        ..ram(gpa, 0x2_0000)
    };
    let overlaid = map(&[
        ram(0, 0xc_0000),
        rom(0xc_0000),
        rom(0xe_0000),
        ram(0x10_0000, 0x3ff0_0000),
    ]);
    let plan = step(&mut layout, &overlaid, &CutPolicy::x86_pc());
    assert_eq!(plan.zapped_bytes(), 0x4_0000, "{plan:#?}");
    assert_eq!(
        changes(&plan),
        vec![Change::Delete, Change::Create, Change::Create]
    );
    assert_eq!(plan.quiesced_ioctls(), 3);
    // Back to RAM (a merge): the two ROM slots go, RAM comes back in one slot.
    let plan = step(
        &mut layout,
        &map(&[ram(0, 0x4000_0000)]),
        &CutPolicy::x86_pc(),
    );
    assert_eq!(
        changes(&plan),
        vec![Change::Delete, Change::Delete, Change::Create]
    );
    assert_eq!(plan.zapped_bytes(), 0x4_0000);
}

#[test]
fn split_around_a_hole_and_readonly_toggle() {
    let mut layout = start(&[ram(0, 0x40_0000)]);
    // A hole in the middle: delete, re-create both sides.
    let plan = step(
        &mut layout,
        &map(&[ram(0, 0x10_0000), ram(0x20_0000, 0x20_0000)]),
        &CutPolicy::minimal(),
    );
    assert_eq!(
        changes(&plan),
        vec![Change::Delete, Change::Create, Change::Create]
    );
    // READONLY on the upper part: KVM cannot toggle it in place.
    let ro = Region {
        flags: SlotFlags::READONLY,
        ..ram(0x20_0000, 0x20_0000)
    };
    let plan = step(
        &mut layout,
        &map(&[ram(0, 0x10_0000), ro]),
        &CutPolicy::minimal(),
    );
    assert_eq!(changes(&plan), vec![Change::Delete, Change::Create]);
    assert_eq!(plan.quiesced_ioctls(), 2);
    assert_eq!(plan.calls[0].call.gpa, 0x20_0000);
}

#[test]
fn dirty_logging_is_flags_only_and_never_quiesced() {
    let mut layout = start(&[ram(0, 0x10_0000), ram(0x20_0000, 0x20_0000)]);
    let logged = Region {
        flags: SlotFlags::LOG_DIRTY_PAGES,
        ..ram(0x20_0000, 0x20_0000)
    };
    let plan = step(
        &mut layout,
        &map(&[ram(0, 0x10_0000), logged]),
        &CutPolicy::minimal(),
    );
    assert_eq!(changes(&plan), vec![Change::FlagsOnly]);
    assert_eq!((plan.quiesced_ioctls(), plan.zapped_bytes()), (0, 0));
}

#[test]
fn bar_move_is_one_move_call_and_a_swap_is_broken() {
    let bar = |gpa, host| Region {
        host,
        ..ram(gpa, 0x1_0000)
    };
    let mut layout = start(&[bar(0xe000_0000, 0x7f30_0000_0000)]);
    let plan = step(
        &mut layout,
        &map(&[bar(0xe010_0000, 0x7f30_0000_0000)]),
        &CutPolicy::minimal(),
    );
    assert_eq!(changes(&plan), vec![Change::Move]);
    assert_eq!(plan.quiesced_ioctls(), 0);
    assert_eq!(plan.zapped_bytes(), 0x1_0000);
    // Two BARs trade places: a cycle of moves; one becomes delete + create.
    let mut layout = start(&[
        bar(0xe000_0000, 0x7f30_0000_0000),
        bar(0xe010_0000, 0x7f40_0000_0000),
    ]);
    let plan = step(
        &mut layout,
        &map(&[
            bar(0xe010_0000, 0x7f30_0000_0000),
            bar(0xe000_0000, 0x7f40_0000_0000),
        ]),
        &CutPolicy::minimal(),
    );
    let mut kinds = changes(&plan);
    kinds.sort();
    assert_eq!(
        kinds,
        vec![Change::Create, Change::Delete, Change::Move],
        "{plan:#?}"
    );
}

#[test]
fn new_ids_are_lowest_free_and_never_a_deleted_one() {
    let mut layout = start(&[
        ram(0, 0x1000),
        ram(0x10_0000, 0x1000),
        ram(0x20_0000, 0x1000),
    ]);
    // Slot 0 goes and a new slot comes: id 0 is in flight, so the new slot gets 3.
    let plan = step(
        &mut layout,
        &map(&[
            ram(0x10_0000, 0x1000),
            ram(0x20_0000, 0x1000),
            ram(0x30_0000, 0x1000),
        ]),
        &CutPolicy::minimal(),
    );
    let created: Vec<SlotId> = plan
        .calls
        .iter()
        .filter(|c| c.change == Change::Create)
        .map(|c| c.call.id())
        .collect();
    assert_eq!(created, vec![SlotId::new(3)]);
    // Next batch: id 0 has landed free and is the lowest.
    let plan = step(
        &mut layout,
        &map(&[
            ram(0x10_0000, 0x1000),
            ram(0x20_0000, 0x1000),
            ram(0x30_0000, 0x1000),
            ram(0x40_0000, 0x1000),
        ]),
        &CutPolicy::minimal(),
    );
    assert_eq!(plan.calls[0].call.id(), SlotId::new(0));
}

#[test]
fn too_many_slots_is_a_typed_error() {
    let limits = Limits {
        slots: 4,
        ..Limits::default()
    };
    let layout = Layout::new(limits);
    let five: Vec<Region> = (0..5).map(|i| ram(i * 0x10_0000, 0x1000)).collect();
    match plan(&layout, &map(&five)) {
        Err(PlanError::TooManySlots {
            needed: 5,
            limit: 4,
            address_space: 0,
            gpa: 0,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    // Within the limit, the policy's extra cuts give way to the budget.
    let one = map(&[ram(0, 0x4000_0000)]);
    let plan = plan(&layout, &one).unwrap();
    assert!(plan.ioctls() <= 4);
}

#[test]
fn unmappable_regions_are_typed_errors() {
    let layout = Layout::new(Limits {
        address_spaces: 1,
        readonly: false,
        ..Limits::default()
    });
    let smm = Region {
        address_space: 1,
        ..ram(0, 0x1000)
    };
    assert!(matches!(
        plan(&layout, &map(&[smm])),
        Err(PlanError::Unmappable { .. })
    ));
    let rom = Region {
        flags: SlotFlags::READONLY,
        ..ram(0, 0x1000)
    };
    assert!(matches!(
        plan(&layout, &map(&[rom])),
        Err(PlanError::Unmappable { .. })
    ));
}

/// 32,764 regions (the x86-64 slot limit), then a change touching all of them: a quarter
/// dropped, a quarter flipping dirty logging, a quarter moving (each region is its own backing).
/// Timing is printed, never asserted.
#[test]
fn a_full_32764_slot_layout_change() {
    let n = Limits::X86_64_SLOTS as u64;
    let full = samples::planner_grid(n).unwrap();
    let mut layout = Layout::new(Limits::default());
    let t = Instant::now();
    let boot = plan_with(&layout, &full, &CutPolicy::x86_pc()).unwrap();
    eprintln!("plan empty -> {n} slots: {:?}", t.elapsed());
    assert_eq!(boot.ioctls() as u64, n);
    layout.apply_batch(&boot.slot_calls()).unwrap();

    // A quarter dropped, a quarter to dirty logging, a quarter into the free half of its cell.
    let target = samples::planner_change(n).unwrap();
    let t = Instant::now();
    let plan = plan(&layout, &target).unwrap();
    eprintln!("plan {n}-slot change: {:?}", t.elapsed());
    let count = |c: Change| plan.calls.iter().filter(|p| p.change == c).count() as u64;
    assert_eq!(count(Change::Delete), n.div_ceil(4));
    assert_eq!(count(Change::FlagsOnly), n / 4);
    assert_eq!(count(Change::Move), n / 4);
    assert_eq!(count(Change::Create), 0);
    assert_eq!(plan.quiesced_ioctls(), 0);
    layout.apply_batch(&plan.slot_calls()).unwrap();
    assert_eq!(MemoryMap::from_layout(&layout), target);
}

#[test]
fn merge_costs_nothing_and_unplug_is_hole_free() {
    // Two slots that continue each other already map the joined region: no call at all.
    let mut layout = start(&[ram(0, 0x10_0000), ram(0x10_0000, 0x10_0000)]);
    assert_eq!(
        layout.len(),
        1,
        "the map joins them, so the boot plan made one slot"
    );
    let two = {
        let mut l = Layout::new(Limits::default());
        for (i, r) in [ram(0, 0x10_0000), ram(0x10_0000, 0x10_0000)]
            .iter()
            .enumerate()
        {
            let slot = memslots::model::Slot {
                id: SlotId::new(i as u16),
                gpa: r.gpa,
                size: r.size,
                host: r.host,
                flags: r.flags,
                guest_memfd: 0,
                guest_memfd_offset: 0,
            };
            l.apply(&slot.set_call()).unwrap();
        }
        l
    };
    let merged = map(&[ram(0, 0x20_0000)]);
    assert!(plan(&two, &merged).unwrap().is_empty());
    // A DIMM is unplugged: its slot goes while vCPUs run.
    let dimm = ram(0x1_0000_0000, 0x2000_0000);
    step(
        &mut layout,
        &map(&[ram(0, 0x20_0000), dimm]),
        &CutPolicy::x86_pc(),
    );
    let plan = step(
        &mut layout,
        &map(&[ram(0, 0x20_0000)]),
        &CutPolicy::x86_pc(),
    );
    assert_eq!(changes(&plan), vec![Change::Delete]);
    assert_eq!(plan.quiesced_ioctls(), 0);
}

#[test]
fn address_spaces_are_planned_separately_with_their_own_ids() {
    let smram = Region {
        address_space: 1,
        ..ram(0xa_0000, 0x2_0000)
    };
    let mut layout = Layout::new(Limits::default());
    let plan = step(
        &mut layout,
        &map(&[ram(0, 0x10_0000), smram]),
        &CutPolicy::minimal(),
    );
    let ids: Vec<SlotId> = plan.calls.iter().map(|c| c.call.id()).collect();
    assert_eq!(ids, vec![SlotId::new(0), SlotId::in_space(1, 0)]);
    // SMRAM goes away in address space 1 only; address space 0 is untouched.
    let plan = step(
        &mut layout,
        &map(&[ram(0, 0x10_0000)]),
        &CutPolicy::minimal(),
    );
    assert_eq!(changes(&plan), vec![Change::Delete]);
    assert_eq!(plan.calls[0].call.id(), SlotId::in_space(1, 0));
    assert_eq!(plan.quiesced_ioctls(), 0);
}

#[test]
fn calls_that_end_dirty_logging_come_last_before_the_window() {
    let logged = |r: Region| Region {
        flags: SlotFlags::LOG_DIRTY_PAGES,
        ..r
    };
    // A: logged, goes away. B: logging turns on. C: logged, logging turns off. D: split.
    let (a, b, c, d) = (
        logged(ram(0x100_0000, 0x10_0000)),
        ram(0x200_0000, 0x10_0000),
        logged(ram(0x300_0000, 0x10_0000)),
        ram(0x400_0000, 0x40_0000),
    );
    let mut layout = start(&[a, b, c, d]);
    let plan = step(
        &mut layout,
        &map(&[
            logged(b),
            ram(0x300_0000, 0x10_0000),
            ram(0x400_0000, 0x10_0000),
            ram(0x420_0000, 0x20_0000),
        ]),
        &CutPolicy::minimal(),
    );
    let gpas: Vec<(Change, u64, bool)> = plan
        .calls
        .iter()
        .map(|c| (c.change, c.call.gpa, c.quiesced))
        .collect();
    assert_eq!(
        gpas,
        vec![
            (Change::FlagsOnly, 0x200_0000, false),
            (Change::FlagsOnly, 0x300_0000, false),
            (Change::Delete, 0x100_0000, false),
            (Change::Delete, 0x400_0000, true),
            (Change::Create, 0x400_0000, true),
            (Change::Create, 0x420_0000, true),
        ]
    );
}

#[test]
fn calls_that_drop_a_dirty_bitmap_are_marked() {
    let logged = |r: Region| Region {
        flags: SlotFlags::LOG_DIRTY_PAGES,
        ..r
    };
    let mut layout = start(&[
        logged(ram(0, 0x10_0000)),
        logged(ram(0x20_0000, 0x10_0000)),
        logged(ram(0x40_0000, 0x10_0000)),
        ram(0x60_0000, 0x10_0000),
    ]);
    // Logging off on the first, the second deleted, the third kept logging, the fourth deleted.
    let plan = step(
        &mut layout,
        &map(&[ram(0, 0x10_0000), logged(ram(0x40_0000, 0x10_0000))]),
        &CutPolicy::minimal(),
    );
    let marked: Vec<(Change, u64)> = plan
        .dirty_bitmap_drops()
        .map(|c| (c.change, c.call.gpa))
        .collect();
    assert_eq!(marked.len(), 2, "{plan:#?}");
    assert!(marked.contains(&(Change::FlagsOnly, 0)), "{marked:?}");
    assert!(marked.contains(&(Change::Delete, 0x20_0000)), "{marked:?}");
    // Neither opens a hole, so neither is quiesced: the mark is what tells a VMM to harvest.
    assert!(plan.dirty_bitmap_drops().all(|c| !c.quiesced));
}

#[test]
fn the_2_mib_cut_needs_host_and_guest_congruent() {
    let policy = CutPolicy {
        boundaries: Vec::new(),
        ..CutPolicy::x86_pc()
    };
    let (gpa, size) = (0x10_1000, 0x4000_0000 - 0x10_2000);
    let creates = |host: u64| {
        let mut layout = Layout::new(Limits::default());
        let target = map(&[Region {
            host,
            ..ram(gpa, size)
        }]);
        step(&mut layout, &target, &policy).ioctls()
    };
    // Congruent modulo 2 MiB: head, body and tail, so the body can keep huge pages.
    assert_eq!(creates(0x7f00_0010_1000), 3);
    // Not congruent: KVM maps no huge page there whatever the cut, so one slot.
    assert_eq!(creates(0x7f00_0010_2000), 1);
    assert_eq!(creates(0x7f00_0000_0000), 1);
}

/// The three changes issue 17 found refused at 32,764 slots: each needs an id its own batch
/// deletes, and plans within the limit.
#[test]
fn changes_at_the_slot_limit_reuse_deleted_ids() {
    let n = u64::from(Limits::X86_64_SLOTS);
    let grid: Vec<Region> = samples::planner_grid(n).unwrap().regions().to_vec();
    let boot = || {
        let mut layout = Layout::new(Limits::default());
        step(&mut layout, &map(&grid), &CutPolicy::minimal());
        assert_eq!(layout.len(), n as usize);
        layout
    };
    let reused = |plan: &Plan| {
        let deleted: Vec<SlotId> = plan
            .calls
            .iter()
            .filter(|c| c.change == Change::Delete)
            .map(|c| c.call.id())
            .collect();
        plan.calls
            .iter()
            .filter(|c| c.change == Change::Create && deleted.contains(&c.call.id()))
            .count()
    };
    // One slot made read-only: DELETE x, CREATE x.
    let mut layout = boot();
    let mut one_ro = grid.clone();
    one_ro[7].flags = SlotFlags::READONLY;
    let plan = step(&mut layout, &map(&one_ro), &CutPolicy::default());
    eprintln!("one slot read-only: {} calls", plan.ioctls());
    assert_eq!(changes(&plan), vec![Change::Delete, Change::Create]);
    assert_eq!(reused(&plan), 1);
    // 32,764 slots to 1: every slot deleted, one created over new memory.
    let mut layout = boot();
    let one = Region {
        address_space: 0,
        gpa: 0,
        size: n * 0x20_0000,
        host: samples::SAMPLE_HOST + (n << 24),
        flags: SlotFlags::NONE,
    };
    let plan = step(&mut layout, &map(&[one]), &CutPolicy::default());
    let count = |plan: &Plan, kind| plan.calls.iter().filter(|c| c.change == kind).count();
    eprintln!(
        "32,764 slots to 1 region: {} calls ({} creates: the PC policy cuts below 1 MiB)",
        plan.ioctls(),
        count(&plan, Change::Create)
    );
    assert_eq!(count(&plan, Change::Delete), n as usize);
    // No id is free before the batch: every create re-uses a deleted one.
    assert_eq!(reused(&plan), count(&plan, Change::Create));
    assert_eq!(layout.len(), count(&plan, Change::Create));
    // Every slot rotated by one place: a cycle of moves, one broken into DELETE + CREATE.
    let mut layout = boot();
    let rotated: Vec<Region> = (0..grid.len())
        .map(|i| Region {
            gpa: grid[(i + 1) % grid.len()].gpa,
            ..grid[i]
        })
        .collect();
    let plan = step(&mut layout, &map(&rotated), &CutPolicy::default());
    eprintln!(
        "rotate every slot: {} calls ({} moves)",
        plan.ioctls(),
        count(&plan, Change::Move)
    );
    assert_eq!(count(&plan, Change::Delete), 1);
    assert_eq!(count(&plan, Change::Create), 1);
    assert_eq!(count(&plan, Change::Move), n as usize - 1);
    assert_eq!(reused(&plan), 1);
    // With an id free, none is re-used.
    let mut layout = boot();
    layout
        .apply(&layout.slot(SlotId::new(3)).unwrap().delete_call())
        .unwrap();
    let mut fewer = one_ro.clone();
    fewer.remove(3);
    let plan = step(&mut layout, &map(&fewer), &CutPolicy::default());
    assert_eq!(reused(&plan), 0);
    assert_eq!(plan.calls[1].call.id(), SlotId::new(3));
}
