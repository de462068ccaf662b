//! Unit tests: one case per row of KVM's rule table, batches, primitives and holes.

use super::*;

const P: u64 = PAGE_SIZE;
const HOST: u64 = 0x7f00_0000_0000;

fn layout() -> Layout {
    Layout::new(Limits::default())
}

fn slot(id: u16, gpa: u64, size: u64, host: u64, flags: SlotFlags) -> Slot {
    Slot {
        id: SlotId::new(id),
        gpa,
        size,
        host,
        flags,
        guest_memfd: 0,
        guest_memfd_offset: 0,
    }
}

fn ram(id: u16, gpa: u64, size: u64) -> Slot {
    slot(id, gpa, size, HOST + gpa, SlotFlags::NONE)
}

fn with(slots: &[Slot]) -> Layout {
    let mut l = layout();
    for s in slots {
        l.apply(&s.set_call()).expect("setup slot accepted");
    }
    l
}

fn refuses(l: &Layout, call: SlotCall, name: &str, errno: i32) {
    let err = l.check(&call).expect_err(name);
    assert_eq!(err.name(), name, "{call}");
    assert_eq!(err.errno(), errno, "{call}");
}

#[test]
fn rule_slot_id_out_of_range_is_checked_first() {
    let mut call = ram(0, 0, P).set_call();
    call.slot = u32::from(Limits::X86_64_SLOTS);
    call.flags = 0x80; // also bad flags: the id check comes first, as in the ioctl
    refuses(&layout(), call, "slot_id_out_of_range", libc::EINVAL);
    call.slot = u32::from(Limits::X86_64_SLOTS - 1);
    call.flags = 0;
    assert_eq!(layout().check(&call), Ok(Change::Create));
}

#[test]
fn rule_flags() {
    let l = layout();
    for bad in [8, 0x10, 0x1_0000, 0x8000_0000, 0xc] {
        let call = SlotCall {
            flags: bad,
            ..ram(0, 0, P).set_call()
        };
        refuses(&l, call, "invalid_flags", libc::EINVAL);
        // v1 refuses every flag but LOG_DIRTY_PAGES and READONLY before anything else.
        let err = l.check_ioctl(&call, Ioctl::V1).unwrap_err();
        assert_eq!((err.name(), err.errno()), ("flags_need_v2", libc::EINVAL));
    }
    // x86-64's default VM type has no guest_memfd.
    for memfd in [4, 5, 6] {
        let call = SlotCall {
            flags: memfd,
            ..ram(0, 0, P).set_call()
        };
        refuses(&l, call, "guest_memfd_unsupported", libc::EINVAL);
    }
    // LOG_DIRTY_PAGES | READONLY together is accepted (QEMU issues it).
    let both = slot(
        0,
        0,
        P,
        HOST,
        SlotFlags::LOG_DIRTY_PAGES | SlotFlags::READONLY,
    );
    assert_eq!(l.check(&both.set_call()), Ok(Change::Create));
    // READONLY without kernel support.
    let no_ro = Layout::new(Limits {
        readonly: false,
        ..Limits::default()
    });
    let ro = slot(0, 0, P, HOST, SlotFlags::READONLY);
    refuses(&no_ro, ro.set_call(), "invalid_flags", libc::EINVAL);
    // GUEST_MEMFD: only with support, and never with LOG_DIRTY_PAGES or READONLY.
    let memfd = Layout::new(Limits {
        guest_memfd: true,
        ..Limits::default()
    });
    let private = slot(0, 0, P, HOST, SlotFlags::GUEST_MEMFD);
    assert_eq!(memfd.check(&private.set_call()), Ok(Change::Create));
    for extra in [SlotFlags::LOG_DIRTY_PAGES, SlotFlags::READONLY] {
        let call = slot(0, 0, P, HOST, SlotFlags::GUEST_MEMFD | extra).set_call();
        refuses(&memfd, call, "guest_memfd_flags", libc::EINVAL);
    }
    refuses(
        &l,
        private.set_call(),
        "guest_memfd_unsupported",
        libc::EINVAL,
    );
    // Only the v2 ioctl carries GUEST_MEMFD; a kernel without it has no v2 at all.
    let err = memfd
        .check_ioctl(&private.set_call(), Ioctl::V1)
        .unwrap_err();
    assert_eq!((err.name(), err.errno()), ("flags_need_v2", libc::EINVAL));
    let old = Layout::new(Limits {
        user_memory2: false,
        ..Limits::default()
    });
    assert_eq!(old.limits().ioctl(), Ioctl::V1);
    let err = old.check_ioctl(&ram(0, 0, P).set_call(), Ioctl::V2);
    assert_eq!(err.map_err(|r| r.errno()), Err(libc::ENOTTY));
}

#[test]
fn rule_alignment() {
    let l = layout();
    let base = ram(0, 0x10_0000, 4 * P).set_call();
    refuses(
        &l,
        SlotCall {
            size: base.size + 1,
            ..base
        },
        "unaligned_size",
        libc::EINVAL,
    );
    refuses(
        &l,
        SlotCall {
            gpa: base.gpa + 0x800,
            ..base
        },
        "unaligned_gpa",
        libc::EINVAL,
    );
    refuses(
        &l,
        SlotCall {
            host: base.host + 8,
            ..base
        },
        "unaligned_host",
        libc::EINVAL,
    );
    // Alignment is checked on deletes too.
    let d = SlotCall { size: 0, ..base };
    refuses(&l, SlotCall { gpa: 1, ..d }, "unaligned_gpa", libc::EINVAL);
}

#[test]
fn rule_host_range() {
    let l = layout();
    let max = Limits::default().user_addr_max;
    let at_end = SlotCall {
        host: max - P,
        ..ram(0, 0, P).set_call()
    };
    assert_eq!(l.check(&at_end), Ok(Change::Create));
    refuses(
        &l,
        SlotCall {
            host: max,
            ..at_end
        },
        "invalid_host_range",
        libc::EINVAL,
    );
    refuses(
        &l,
        SlotCall {
            host: u64::MAX - P + 1,
            ..at_end
        },
        "invalid_host_range",
        libc::EINVAL,
    );
}

#[test]
fn rule_address_space() {
    let l = layout();
    let mut call = ram(0, 0, P).set_call();
    call.slot = SlotId::in_space(1, 0).raw();
    assert_eq!(l.check(&call), Ok(Change::Create));
    call.slot = SlotId::in_space(2, 0).raw();
    refuses(&l, call, "address_space_out_of_range", libc::EINVAL);
}

#[test]
fn rule_gpa_wraps_and_too_many_pages() {
    let l = layout();
    let wrap = SlotCall {
        gpa: u64::MAX - P + 1,
        size: 2 * P,
        ..ram(0, 0, P).set_call()
    };
    refuses(&l, wrap, "gpa_wraps", libc::EINVAL);
    let huge = SlotCall {
        size: (1 << 31) * P,
        host: P,
        gpa: 0,
        ..wrap
    };
    refuses(&l, huge, "too_many_pages", libc::EINVAL);
    let largest = SlotCall {
        size: ((1 << 31) - 1) * P,
        ..huge
    };
    assert_eq!(l.check(&largest), Ok(Change::Create));
}

#[test]
fn rule_max_gfn_on_create_and_move() {
    // Measured on this machine's kernel (issue 17): the last frame may be 2^40 - 1, not 2^40.
    let at = |id, gpa, size| slot(id, gpa, size, HOST, SlotFlags::NONE);
    let l = layout();
    let top = 0xf_ffff_ffff_f000;
    assert_eq!(l.check(&at(0, top, P).set_call()), Ok(Change::Create));
    refuses(
        &l,
        at(0, top, 2 * P).set_call(),
        "gfn_too_high",
        libc::EINVAL,
    );
    refuses(
        &l,
        at(0, top + P, P).set_call(),
        "gfn_too_high",
        libc::EINVAL,
    );
    // A MOVE is checked too; a DELETE, a flags change or an unchanged slot is not.
    let l = with(&[ram(0, 0, 2 * P)]);
    let moved = |gpa| SlotCall {
        gpa,
        ..ram(0, 0, 2 * P).set_call()
    };
    assert_eq!(l.check(&moved(top - P)), Ok(Change::Move));
    refuses(&l, moved(top), "gfn_too_high", libc::EINVAL);
    let l = with(&[at(0, top, P)]);
    assert_eq!(l.check(&at(0, top, P).delete_call()), Ok(Change::Delete));
    let logging = slot(0, top, P, HOST, SlotFlags::LOG_DIRTY_PAGES);
    assert_eq!(l.check(&logging.set_call()), Ok(Change::FlagsOnly));
    // Overlap (EEXIST) is checked before it, as in the kernel.
    refuses(&l, at(1, top, 2 * P).set_call(), "overlap", libc::EEXIST);
    // A smaller maximum, as a kernel with TDP on a 48-bit host has.
    let l = Layout::new(Limits {
        max_gfn: Limits::max_gfn_for_bits(48),
        ..Limits::default()
    });
    assert_eq!(
        l.check(&at(0, (1 << 48) - P, P).set_call()),
        Ok(Change::Create)
    );
    refuses(
        &l,
        at(0, 1 << 48, P).set_call(),
        "gfn_too_high",
        libc::EINVAL,
    );
}

#[test]
fn delete_create_move_flags_noop() {
    let s = ram(3, 0x10_0000, 8 * P);
    let l = with(&[s]);
    refuses(&l, ram(4, 0, 0).set_call(), "delete_missing", libc::EINVAL);
    assert_eq!(l.check(&s.delete_call()), Ok(Change::Delete));
    // A delete ignores the other fields once they pass the generic checks.
    let odd = SlotCall {
        gpa: 0x4000_0000,
        flags: 3,
        ..s.delete_call()
    };
    assert_eq!(l.check(&odd), Ok(Change::Delete));
    assert_eq!(l.check(&ram(4, 0, P).set_call()), Ok(Change::Create));
    let moved = Slot {
        gpa: 0x20_0000,
        ..s
    };
    assert_eq!(l.check(&moved.set_call()), Ok(Change::Move));
    let logged = Slot {
        flags: SlotFlags::LOG_DIRTY_PAGES,
        ..s
    };
    assert_eq!(l.check(&logged.set_call()), Ok(Change::FlagsOnly));
    // A move may change dirty logging at the same time.
    let both = Slot {
        gpa: 0x20_0000,
        ..logged
    };
    assert_eq!(l.check(&both.set_call()), Ok(Change::Move));
    assert_eq!(l.check(&s.set_call()), Ok(Change::Unchanged));
}

#[test]
fn existing_slot_is_immutable() {
    let s = ram(3, 0x10_0000, 8 * P);
    let l = with(&[s]);
    let bigger = Slot { size: 9 * P, ..s };
    refuses(&l, bigger.set_call(), "immutable", libc::EINVAL);
    let remapped = Slot {
        host: s.host + P,
        ..s
    };
    refuses(&l, remapped.set_call(), "immutable", libc::EINVAL);
    let ro = Slot {
        flags: SlotFlags::READONLY,
        ..s
    };
    refuses(&l, ro.set_call(), "readonly_toggle", libc::EINVAL);
    // Immutability is checked before the move.
    let moved_bigger = Slot {
        gpa: 0x40_0000,
        ..bigger
    };
    refuses(&l, moved_bigger.set_call(), "immutable", libc::EINVAL);
}

fn memfd_layout() -> Layout {
    Layout::new(Limits {
        guest_memfd: true,
        ..Limits::default()
    })
}

/// A guest_memfd slot bound at `offset` of `fd`.
fn private(id: u16, gpa: u64, size: u64, fd: u32, offset: u64) -> Slot {
    Slot {
        guest_memfd: fd,
        guest_memfd_offset: offset,
        ..slot(id, gpa, size, HOST + gpa, SlotFlags::GUEST_MEMFD)
    }
}

#[test]
fn guest_memfd_slots_can_only_be_deleted() {
    let mut l = memfd_layout();
    let s = private(1, 0, 4 * P, 7, 0);
    l.apply(&s.set_call()).unwrap();
    let moved = Slot {
        gpa: 0x10_0000,
        ..s
    };
    // Any call carrying GUEST_MEMFD on an existing slot, even the same one again.
    refuses(&l, moved.set_call(), "guest_memfd_immutable", libc::EINVAL);
    refuses(&l, s.set_call(), "guest_memfd_immutable", libc::EINVAL);
    // Without the flag: a MOVE, a flags change or the same range all drop GUEST_MEMFD.
    for flags in [SlotFlags::NONE, SlotFlags::LOG_DIRTY_PAGES] {
        for gpa in [0, 0x10_0000] {
            let plain = Slot {
                flags,
                gpa,
                guest_memfd: 0,
                guest_memfd_offset: 0,
                ..s
            };
            refuses(&l, plain.set_call(), "guest_memfd_toggle", libc::EINVAL);
        }
    }
    // A resize is refused as for any slot (one EINVAL test in the kernel).
    let bigger = Slot {
        flags: SlotFlags::NONE,
        size: 8 * P,
        ..s
    };
    refuses(&l, bigger.set_call(), "immutable", libc::EINVAL);
    assert_eq!(l.check(&s.delete_call()), Ok(Change::Delete));
    l.apply(&s.delete_call()).unwrap();
    assert!(l.is_empty());
}

#[test]
fn guest_memfd_offset_rules() {
    let l = memfd_layout();
    let s = private(0, 0, 4 * P, 3, 0);
    let call = |offset| {
        Slot {
            guest_memfd_offset: offset,
            ..s
        }
        .set_call()
    };
    refuses(
        &l,
        call(0x800),
        "guest_memfd_offset_unaligned",
        libc::EINVAL,
    );
    refuses(
        &l,
        call(u64::MAX - P + 1),
        "guest_memfd_offset_wraps",
        libc::EINVAL,
    );
    // The offset is checked with the other alignments: before the address space.
    let mut other_space = call(0x800);
    other_space.slot = SlotId::in_space(5, 0).raw();
    refuses(
        &l,
        other_space,
        "guest_memfd_offset_unaligned",
        libc::EINVAL,
    );
    // Without GUEST_MEMFD the kernel ignores both fields (QEMU sends guest_memfd=-1).
    let plain = SlotCall {
        guest_memfd: u32::MAX,
        guest_memfd_offset: 0x123,
        ..ram(0, 0, P).set_call()
    };
    assert_eq!(l.check(&plain), Ok(Change::Create));
    let mut applied = l.clone();
    let slot = applied.apply(&plain).unwrap().after.unwrap();
    assert_eq!((slot.guest_memfd, slot.guest_memfd_offset), (0, 0));
}

#[test]
fn guest_memfd_binding_rules() {
    let mut l = memfd_layout();
    l.add_guest_memfd(3, 16 * P);
    let a = private(0, 0, 4 * P, 3, 4 * P);
    l.apply(&a.set_call()).unwrap();
    // Past the file's end; an offset of 2^63 is negative to the kernel.
    refuses(
        &l,
        private(1, 0x10_0000, 4 * P, 3, 13 * P).set_call(),
        "guest_memfd_range",
        libc::EINVAL,
    );
    refuses(
        &l,
        private(1, 0x10_0000, P, 3, 1 << 63).set_call(),
        "guest_memfd_range",
        libc::EINVAL,
    );
    // Overlapping another slot's binding, from either side; touching is fine.
    for offset in [P, 4 * P, 7 * P] {
        let err = l
            .check(&private(1, 0x10_0000, 4 * P, 3, offset).set_call())
            .unwrap_err();
        assert_eq!(err, Rule::GuestMemfdBound { fd: 3, other: a.id });
    }
    for offset in [0, 8 * P, 12 * P] {
        let b = private(1, 0x10_0000, 4 * P, 3, offset);
        assert_eq!(l.check(&b.set_call()), Ok(Change::Create), "{offset:#x}");
    }
    // Binding comes after the GPA overlap check and before the maximum guest frame.
    let clash = private(1, 0, P, 3, 0);
    assert_eq!(
        l.check(&clash.set_call()).unwrap_err().errno(),
        libc::EEXIST
    );
    let top = Slot {
        host: HOST,
        ..private(1, l.limits().max_gfn * P, 2 * P, 3, 4 * P)
    };
    assert!(l
        .check(
            &Slot {
                guest_memfd_offset: 0,
                ..top
            }
            .set_call()
        )
        .is_err_and(|r| r.name() == "gfn_too_high"));
    refuses(&l, top.set_call(), "guest_memfd_bound", libc::EINVAL);
    // Another file, or one the model was not told about (the kernel's call), binds freely.
    l.add_guest_memfd(4, 4 * P);
    assert_eq!(
        l.check(&private(1, 0x10_0000, 4 * P, 4, 0).set_call()),
        Ok(Change::Create)
    );
    assert_eq!(
        l.check(&private(1, 0x10_0000, 64 * P, 9, 0).set_call()),
        Ok(Change::Create)
    );
    // A delete frees the range; its revert binds it again.
    let deleted = l.apply(&a.delete_call()).unwrap();
    let again = private(1, 0x10_0000, 4 * P, 3, 4 * P);
    assert_eq!(l.check(&again.set_call()), Ok(Change::Create));
    l.revert(&deleted);
    assert!(l.check(&again.set_call()).is_err());
    // A file closed and its fd re-used: the old bindings are gone with it.
    l.remove_guest_memfd(3);
    l.add_guest_memfd(3, 16 * P);
    assert_eq!(l.check(&again.set_call()), Ok(Change::Create));
    // ... and deleting the slot of the old file leaves the new file's bindings alone.
    l.apply(&again.set_call()).unwrap();
    l.apply(&a.delete_call()).unwrap();
    let clash = private(2, 0x20_0000, P, 3, 4 * P);
    refuses(&l, clash.set_call(), "guest_memfd_bound", libc::EINVAL);
}

#[test]
fn v1_calls_carry_no_guest_memfd_fields() {
    let mut l = memfd_layout();
    let call = SlotCall {
        guest_memfd: 5,
        guest_memfd_offset: 0x1001,
        ..ram(0, 0, P).set_call()
    };
    assert_eq!(l.check_ioctl(&call, Ioctl::V1), Ok(Change::Create));
    let slot = l.apply_ioctl(&call, Ioctl::V1).unwrap().after.unwrap();
    assert_eq!(slot, ram(0, 0, P));
}

#[test]
fn overlap_on_create_and_move_only() {
    let a = ram(0, 0x10_0000, 16 * P);
    let b = ram(1, 0x20_0000, 16 * P);
    let l = with(&[a, b]);
    for gpa in [0x10_0000 - P, 0x10_0000, 0x10_0000 + 15 * P] {
        let c = ram(2, gpa, 2 * P);
        let err = l.check(&c.set_call()).unwrap_err();
        assert_eq!(err, Rule::Overlap { other: a.id });
        assert_eq!(err.errno(), libc::EEXIST);
    }
    // Touching is not overlapping.
    assert_eq!(
        l.check(&ram(2, 0x10_0000 - P, P).set_call()),
        Ok(Change::Create)
    );
    assert_eq!(
        l.check(&ram(2, 0x10_0000 + 16 * P, P).set_call()),
        Ok(Change::Create)
    );
    // A move may overlap its own old range but not another slot.
    let a_up = Slot {
        gpa: 0x10_0000 + 4 * P,
        ..a
    };
    assert_eq!(l.check(&a_up.set_call()), Ok(Change::Move));
    let a_onto_b = Slot {
        gpa: 0x20_0000 - 8 * P,
        ..a
    };
    assert_eq!(
        l.check(&a_onto_b.set_call()),
        Err(Rule::Overlap { other: b.id })
    );
    // Other address spaces do not collide.
    let smm = Slot {
        id: SlotId::in_space(1, 0),
        ..a
    };
    assert_eq!(l.check(&smm.set_call()), Ok(Change::Create));
}

#[test]
fn lookups() {
    let a = ram(0, 0x10_0000, 16 * P);
    let b = ram(7, 0x20_0000, 16 * P);
    let l = with(&[b, a]);
    assert_eq!(l.find(0, 0x10_0000).map(|s| s.id), Some(a.id));
    assert_eq!(l.find(0, 0x10_0000 + 16 * P), None);
    assert_eq!(l.find(1, 0x10_0000), None);
    assert_eq!(l.translate(0, 0x20_0123), Some(HOST + 0x20_0123));
    let ids: Vec<u16> = l.slots_by_gpa(0).map(|s| s.id.id).collect();
    assert_eq!(ids, vec![0, 7]);
    let segs = l.segments(0, 0x10_0000 + 15 * P, 0x20_0000 + P);
    assert_eq!(segs.len(), 3);
    assert!(segs[1].mapping.is_none());
    assert_eq!(l.free_id(0, &[]), Some(1));
    assert_eq!(l.free_id(0, &[1, 2]), Some(3));
    assert_eq!(l.free_id(1, &[]), Some(0));
}

#[test]
fn batch_delete_then_create_same_id() {
    let s = ram(0, 0x10_0000, 16 * P);
    let mut l = with(&[s]);
    let bigger = Slot { size: 32 * P, ..s };
    let done = l
        .apply_batch(&[s.delete_call(), bigger.set_call()])
        .unwrap();
    assert_eq!(done[0].change, Change::Delete);
    assert_eq!(done[1].change, Change::Create);
    assert_eq!(l.slot(s.id), Some(&bigger));
}

#[test]
fn batch_is_all_or_nothing_at_every_position() {
    let a = ram(0, 0x10_0000, 16 * P);
    let b = ram(1, 0x20_0000, 16 * P);
    let start = with(&[a, b]);
    let good = [
        a.delete_call(),
        Slot { size: 8 * P, ..a }.set_call(),
        ram(2, 0x10_0000 + 8 * P, 8 * P).set_call(),
        Slot {
            flags: SlotFlags::LOG_DIRTY_PAGES,
            ..b
        }
        .set_call(),
        ram(3, 0x40_0000, P).set_call(),
    ];
    let bad = ram(9, 0x20_0000, P).set_call(); // overlaps b
    for pos in 0..=good.len() {
        let mut calls = good.to_vec();
        calls.insert(pos, bad);
        let mut l = start.clone();
        let err = l.apply_batch(&calls).unwrap_err();
        assert_eq!(err.index, pos);
        assert_eq!(err.rule, Rule::Overlap { other: b.id });
        assert_eq!(l, start, "layout unchanged after a refusal at {pos}");
    }
    let mut l = start.clone();
    assert!(l.check_batch(&good).is_ok());
    assert_eq!(l, start, "check_batch leaves the layout unchanged");
}

#[test]
fn primitives_lower_and_mark_holes() {
    let s = ram(0, 0x10_0000, 16 * P);
    let mut l = with(&[s, ram(5, 0x80_0000, P)]);
    let before = l.clone();

    let grow = l
        .lower(&Primitive::Grow {
            id: s.id,
            size: 32 * P,
        })
        .unwrap();
    assert_eq!(grow.batch.len(), 2);
    assert_eq!(grow.holes.quiesce_window(), 0..2);
    assert_eq!(grow.holes.opens_hole(2), vec![true, false]);
    assert_eq!(grow.holes.bytes(), 16 * P, "the old range is the hole");

    let shrink = l
        .lower(&Primitive::Shrink {
            id: s.id,
            size: 4 * P,
        })
        .unwrap();
    assert_eq!(shrink.holes.bytes(), 4 * P, "only the kept part is a hole");

    let split = l
        .lower(&Primitive::Split {
            id: s.id,
            at: 0x10_0000 + 4 * P,
            new_id: SlotId::new(1),
        })
        .unwrap();
    assert_eq!(split.batch.len(), 3);
    assert_eq!(split.holes.quiesce_window(), 0..3);
    // The lower part is mapped again after call 1, the upper after call 2.
    assert_eq!(split.holes.holes.len(), 2);
    assert!(split
        .holes
        .holes
        .iter()
        .all(|h| h.opened_by == 0 && h.closed_by >= 1));

    let mv = l
        .lower(&Primitive::Move {
            id: s.id,
            gpa: 0x40_0000,
        })
        .unwrap();
    assert_eq!(mv.batch.len(), 1);
    assert!(mv.holes.is_empty(), "a move is one atomic call");

    let ro = l
        .lower(&Primitive::SetReadonly { id: s.id, on: true })
        .unwrap();
    assert_eq!(ro.batch.len(), 2);
    assert_eq!(ro.holes.bytes(), 16 * P);
    let log = l
        .lower(&Primitive::SetDirtyLogging { id: s.id, on: true })
        .unwrap();
    assert_eq!(log.batch.len(), 1);
    assert!(log.holes.is_empty());
    assert_eq!(l, before, "lowering changes nothing");

    // Merge after a split.
    let mut l2 = l.clone();
    l2.apply_batch(split.batch.calls()).unwrap();
    let merge = l2
        .lower(&Primitive::Merge {
            first: s.id,
            second: SlotId::new(1),
        })
        .unwrap();
    l2.apply_batch(merge.batch.calls()).unwrap();
    assert_eq!(l2, l, "split then merge is the identity");
}

#[test]
fn primitive_preconditions() {
    let s = ram(0, 0x10_0000, 16 * P);
    let t = ram(1, 0x10_0000 + 16 * P, 4 * P);
    let far = ram(2, 0x40_0000, P);
    let mut l = with(&[s, t, far]);
    use PrimitiveError as E;
    let grow_small = l.lower(&Primitive::Grow {
        id: s.id,
        size: 8 * P,
    });
    assert!(matches!(grow_small, Err(E::WrongSize { .. })));
    let shrink_zero = l.lower(&Primitive::Shrink { id: s.id, size: 0 });
    assert!(matches!(shrink_zero, Err(E::WrongSize { .. })));
    let unaligned = l.lower(&Primitive::Grow {
        id: s.id,
        size: 40 * P + 1,
    });
    assert!(matches!(unaligned, Err(E::Unaligned { .. })));
    // Growing into the next slot is refused by KVM's overlap rule, at the CREATE.
    match l.lower(&Primitive::Grow {
        id: s.id,
        size: 17 * P,
    }) {
        Err(E::Refused(e)) => assert_eq!(e.index, 1),
        other => panic!("{other:?}"),
    }
    let edge = l.lower(&Primitive::Split {
        id: s.id,
        at: 0x10_0000,
        new_id: SlotId::new(9),
    });
    assert!(matches!(edge, Err(E::SplitOutside { .. })));
    let used = l.lower(&Primitive::Split {
        id: s.id,
        at: 0x10_0000 + P,
        new_id: t.id,
    });
    assert!(matches!(used, Err(E::IdNotFree(_))));
    let apart = l.lower(&Primitive::Merge {
        first: s.id,
        second: far.id,
    });
    assert!(matches!(apart, Err(E::NotAdjacent { .. })));
    assert!(matches!(
        l.lower(&Primitive::Move {
            id: SlotId::new(30),
            gpa: 0
        }),
        Err(E::NoSuchSlot(_))
    ));
    // Merge needs host adjacency too.
    let mut l3 = with(&[
        s,
        Slot {
            host: t.host + P,
            ..t
        },
    ]);
    let host_gap = l3.lower(&Primitive::Merge {
        first: s.id,
        second: t.id,
    });
    assert!(matches!(host_gap, Err(E::NotAdjacent { .. })));
}

#[test]
fn holes_ignore_ranges_unmapped_before_or_after() {
    let s = ram(0, 0x10_0000, 16 * P);
    let mut l = with(&[s]);
    // Deleting and creating elsewhere: nothing is mapped both before and after.
    let r = l
        .holes(&[s.delete_call(), ram(0, 0x80_0000, P).set_call()])
        .unwrap();
    assert!(r.is_empty());
    // Create then delete of a fresh range: mapped neither before nor after.
    let mut l = layout();
    let t = ram(3, 0, P);
    assert!(l
        .holes(&[t.set_call(), t.delete_call()])
        .unwrap()
        .is_empty());
}

#[test]
fn holes_for_a_remap_between_two_host_addresses() {
    // A range that maps host A before and host B after, through host C in between, is a hole.
    let s = slot(0, 0, 4 * P, HOST, SlotFlags::NONE);
    let mut l = with(&[s]);
    let c = slot(0, 0, 4 * P, HOST + 0x100_0000, SlotFlags::NONE);
    let b = slot(0, 0, 4 * P, HOST + 0x200_0000, SlotFlags::NONE);
    let calls = [s.delete_call(), c.set_call(), c.delete_call(), b.set_call()];
    let r = l.holes(&calls).unwrap();
    assert_eq!(r.quiesce_window(), 0..4);
    assert_eq!(r.bytes(), 4 * P);
    // Straight to B is a hole only across the delete.
    let r = l.holes(&[s.delete_call(), b.set_call()]).unwrap();
    assert_eq!(r.quiesce_window(), 0..2);
}
