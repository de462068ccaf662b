//! Guest isolation and memory lifetime on a real guest (`/dev/kvm`):
//!
//! - after a DELETE or a shrink the guest's reads of the removed range exit as MMIO and return the
//!   MMIO answer, never what host memory holds there, and its writes never reach that memory;
//! - a READONLY slot turns guest writes into MMIO exits and leaves host memory alone while reads
//!   see it; toggling READONLY through the library never shows a running guest a missing slot;
//! - memory is never unmapped while a KVM slot or a device-side snapshot refers to it, and is
//!   released once nothing does;
//! - no path of the library creates a slot over host memory it does not own.
//!
//! `kvm_memory.rs` already checks that a deleted slot's old device snapshot still reads, and that
//! `SlotUpdater::apply` (atomic) refuses a stranger's memory and a range running off a backing's
//! end; the tests here cover the rest.

use std::sync::Arc;
use std::time::{Duration, Instant};

use memslots::backend::SlotBackend;
use memslots::kvm::{
    ApplyError, ApplyPrimitiveError, Backing, HostMemory, SlotCallError, SlotTable, SlotUpdater,
    VcpuGate, Vm,
};
use memslots::model::{Primitive, Slot, SlotFlags, SlotId, PAGE_SIZE};
use memslots::planner::{plan, MemoryMap, Region};
use memslots_testkit::guest::MMIO_READ_VALUE;
use memslots_testkit::strategy::{apply, Strategy};
use memslots_testkit::testvm::{Probe, TestVm, TestVmConfig};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};

mod support;
use support::{assert_guest_clean, kvm_or_skip};

/// Where the slots under test go (the private slot is at GPA 0).
const GPA: u64 = 0x1000_0000;
const VCPUS: usize = 2;
/// What the host writes where the guest must not see it (or must, while mapped).
const PATTERN: u32 = 0x5afe_c0de;
const PATTERN2: u32 = 0x0bad_f00d;

fn test_vm() -> TestVm {
    TestVm::new(TestVmConfig::new(VCPUS, 1 << 20)).expect("test VM")
}

/// A slot of `pages` pages at `GPA + gpa_off` over the arena at `host_off`.
fn slot(vm: &TestVm, id: u16, gpa_off: u64, host_off: u64, pages: u64, flags: SlotFlags) -> Slot {
    Slot {
        id: SlotId::new(id),
        gpa: GPA + gpa_off,
        size: pages * PAGE_SIZE,
        host: vm.arena_host() + host_off,
        flags,
        guest_memfd: 0,
        guest_memfd_offset: 0,
    }
}

/// Writes `value` where every vCPU's probe of the page at arena offset `page_off` lands.
fn fill(vm: &TestVm, page_off: u64, value: u32) {
    for cpu in 0..VCPUS as u64 {
        vm.arena()
            .write_u32(vm.arena_host() + page_off + cpu * 4, value);
    }
}

/// What the vCPUs' probes of the page at arena offset `page_off` find in host memory.
fn host_values(vm: &TestVm, page_off: u64) -> Vec<u32> {
    (0..VCPUS as u64)
        .map(|cpu| vm.arena().read_u32(vm.arena_host() + page_off + cpu * 4))
        .collect()
}

/// What each vCPU's last read of probe `probe` returned.
fn reads(vm: &TestVm, probe: usize) -> Vec<u32> {
    (0..VCPUS).map(|cpu| vm.probe_read(cpu, probe)).collect()
}

/// Waits until every vCPU has completed `n` more rounds: each has read every probe at least
/// once after the call (a round in progress when it was made counts as at most one of them).
fn rounds(vm: &TestVm, n: u64) {
    let start: Vec<u64> = (0..VCPUS).map(|c| vm.vcpu_rounds(c)).collect();
    let deadline = Instant::now() + Duration::from_secs(20); // a hang guard, not a measurement
    while (0..VCPUS).any(|c| vm.vcpu_rounds(c) < start[c] + n) {
        assert!(Instant::now() < deadline, "the guest stopped making rounds");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn after_a_delete_the_guest_gets_mmio_and_never_the_old_memory() {
    if !kvm_or_skip() {
        return;
    }
    let mut vm = test_vm();
    let kept = slot(&vm, 1, 0x10_0000, 0x8_0000, 1, SlotFlags::NONE);
    let gone = slot(&vm, 2, 0, 0, 2, SlotFlags::NONE);
    vm.apply(&[kept.set_call(), gone.set_call()], Strategy::Atomic)
        .expect("slots");
    fill(&vm, PAGE_SIZE, PATTERN);
    vm.start_probes(
        &[
            Probe::checked(kept.gpa, kept.host),
            Probe::checked(gone.gpa, gone.host),
            Probe::read_only(gone.gpa + PAGE_SIZE),
        ],
        None,
    )
    .expect("start");
    rounds(&vm, 2);
    // While mapped, the guest reads host memory: the pattern, and what it wrote itself.
    assert_eq!(reads(&vm, 2), [PATTERN; VCPUS]);
    assert!(reads(&vm, 1).iter().all(|&v| v != MMIO_READ_VALUE));
    let mmio_before = vm.guest_stats().mmio_exits;
    // With the guest held, put the pattern where its next read and write of the checked probe
    // go, and delete the slot: the first thing the guest does after is access the removed range.
    vm.with_vcpus_parked(|vm| {
        fill(vm, 0, PATTERN);
        vm.apply(&[gone.delete_call()], Strategy::Atomic)
            .expect("delete");
    });
    rounds(&vm, 3);
    assert_eq!(
        reads(&vm, 1),
        [MMIO_READ_VALUE; VCPUS],
        "read of the removed page"
    );
    assert_eq!(
        reads(&vm, 2),
        [MMIO_READ_VALUE; VCPUS],
        "read of the removed page"
    );
    assert_eq!(
        host_values(&vm, 0),
        [PATTERN; VCPUS],
        "a guest write landed"
    );
    assert_eq!(host_values(&vm, PAGE_SIZE), [PATTERN; VCPUS]);
    // Two MMIO reads and one MMIO write per vCPU per round (the first round may have been
    // past them when the vCPUs were parked).
    assert!(vm.guest_stats().mmio_exits >= mmio_before + 2 * 3 * VCPUS as u64);
    // The slot left in place still works.
    assert!(reads(&vm, 0).iter().all(|&v| v != MMIO_READ_VALUE));
    assert_guest_clean(&vm);
}

#[test]
fn after_a_shrink_the_cut_range_is_mmio_and_the_rest_still_ram() {
    if !kvm_or_skip() {
        return;
    }
    let mut vm = test_vm();
    let s = slot(&vm, 1, 0, 0, 4, SlotFlags::NONE);
    vm.apply(&[s.set_call()], Strategy::Atomic).expect("slot");
    fill(&vm, 2 * PAGE_SIZE, PATTERN);
    vm.start_probes(
        &[
            Probe::checked(s.gpa, s.host),                                 // kept
            Probe::checked(s.gpa + 3 * PAGE_SIZE, s.host + 3 * PAGE_SIZE), // cut
            Probe::read_only(s.gpa + 2 * PAGE_SIZE),                       // cut
        ],
        None,
    )
    .expect("start");
    rounds(&vm, 2);
    assert_eq!(reads(&vm, 2), [PATTERN; VCPUS]);
    assert!(reads(&vm, 1).iter().all(|&v| v != MMIO_READ_VALUE));
    // Shrink while the guest runs: DELETE + CREATE smaller, the hole held out by the updater.
    vm.updater()
        .apply_primitive(&Primitive::Shrink {
            id: s.id,
            size: 2 * PAGE_SIZE,
        })
        .expect("shrink");
    assert_eq!(vm.layout().slot(s.id).map(|s| s.size), Some(2 * PAGE_SIZE));
    // No guest write can land in the cut range from here on.
    fill(&vm, 3 * PAGE_SIZE, PATTERN2);
    rounds(&vm, 3);
    assert_eq!(
        reads(&vm, 1),
        [MMIO_READ_VALUE; VCPUS],
        "read of the cut range"
    );
    assert_eq!(
        reads(&vm, 2),
        [MMIO_READ_VALUE; VCPUS],
        "read of the cut range"
    );
    assert_eq!(
        host_values(&vm, 3 * PAGE_SIZE),
        [PATTERN2; VCPUS],
        "a guest write landed"
    );
    assert_eq!(host_values(&vm, 2 * PAGE_SIZE), [PATTERN; VCPUS]);
    // The kept page is RAM throughout: its reads are real and checked (no data error).
    assert!(reads(&vm, 0).iter().all(|&v| v != MMIO_READ_VALUE));
    assert_guest_clean(&vm);
}

#[test]
fn a_readonly_slot_is_read_but_never_written_by_the_guest() {
    if !kvm_or_skip() {
        return;
    }
    let mut vm = test_vm();
    let ro = slot(&vm, 1, 0, 0, 2, SlotFlags::READONLY);
    vm.apply(&[ro.set_call()], Strategy::Atomic).expect("slot");
    fill(&vm, 0, PATTERN);
    vm.start_probes(
        &[
            Probe::read_only(ro.gpa),
            Probe::checked(ro.gpa + PAGE_SIZE, ro.host + PAGE_SIZE),
        ],
        None,
    )
    .expect("start");
    rounds(&vm, 3);
    // Reads see host memory, not the MMIO answer.
    assert_eq!(reads(&vm, 0), [PATTERN; VCPUS]);
    assert_eq!(reads(&vm, 1), [0; VCPUS]);
    // Every write exited as MMIO and left host memory as it was.
    assert_eq!(
        host_values(&vm, PAGE_SIZE),
        [0; VCPUS],
        "a guest write landed"
    );
    assert!(vm.guest_stats().mmio_exits >= 2 * VCPUS as u64);
    assert_guest_clean(&vm);
}

/// Toggles READONLY on `s` `n` times while the guest runs, alternately as a primitive and as a
/// raw batch; returns the slot as it ends.
fn toggle_readonly(vm: &mut TestVm, mut s: Slot, n: usize, strategy: Strategy) -> Slot {
    for i in 0..n {
        let on = !s.flags.readonly();
        if i % 2 == 0 {
            memslots_testkit::strategy::apply_primitive(
                &mut vm.updater(),
                &Primitive::SetReadonly { id: s.id, on },
                strategy,
            )
            .expect("primitive");
        } else {
            let new = Slot {
                flags: s.flags.with(SlotFlags::READONLY, on),
                ..s
            };
            vm.apply(&[s.delete_call(), new.set_call()], strategy)
                .expect("batch");
        }
        s.flags = s.flags.with(SlotFlags::READONLY, on);
        assert_eq!(vm.layout().slot(s.id), Some(&s));
        // Let the guest run into the next toggle.
        let r = vm.guest_stats().rounds;
        let deadline = Instant::now() + Duration::from_secs(20); // a hang guard
        while vm.guest_stats().rounds == r {
            assert!(Instant::now() < deadline, "the guest stopped making rounds");
            std::thread::yield_now();
        }
    }
    s
}

fn toggling_vm() -> (TestVm, Slot) {
    let mut vm = test_vm();
    let s = slot(&vm, 1, 0, 0, 2, SlotFlags::NONE);
    vm.apply(&[s.set_call()], Strategy::Atomic).expect("slot");
    fill(&vm, PAGE_SIZE, PATTERN);
    vm.start_probes(
        &[
            Probe::checked(s.gpa, s.host),
            Probe::read_only(s.gpa + PAGE_SIZE),
        ],
        None,
    )
    .expect("start");
    rounds(&vm, 1);
    (vm, s)
}

#[test]
fn readonly_toggles_are_atomic_and_take_effect() {
    if !kvm_or_skip() {
        return;
    }
    let (mut vm, s) = toggling_vm();
    let s = toggle_readonly(&mut vm, s, 60, Strategy::Atomic);
    assert!(!s.flags.readonly());
    // Never a missing slot: no read ever exited as MMIO on a page every layout maps.
    assert_guest_clean(&vm);
    assert!(reads(&vm, 1).iter().all(|&v| v == PATTERN));

    // Read-only on: guest writes stop landing, reads still work.
    let s = toggle_readonly(&mut vm, s, 1, Strategy::Atomic);
    assert!(s.flags.readonly());
    rounds(&vm, 1);
    let frozen = host_values(&vm, 0);
    let mmio = vm.guest_stats().mmio_exits;
    rounds(&vm, 3);
    assert_eq!(
        host_values(&vm, 0),
        frozen,
        "a write landed in a read-only slot"
    );
    assert!(vm.guest_stats().mmio_exits >= mmio + 2 * VCPUS as u64);
    assert_eq!(reads(&vm, 1), [PATTERN; VCPUS]);

    // And off again: writes land again.
    let s = toggle_readonly(&mut vm, s, 1, Strategy::Atomic);
    assert!(!s.flags.readonly());
    rounds(&vm, 2);
    let moving = host_values(&vm, 0);
    rounds(&vm, 2);
    assert_ne!(
        host_values(&vm, 0),
        moving,
        "writes land once read-only is off"
    );
    assert_guest_clean(&vm);
}

#[test]
fn naive_readonly_toggles_are_caught() {
    // The same toggles one call at a time with nobody held out: the detector above fires.
    if !kvm_or_skip() {
        return;
    }
    let (mut vm, mut s) = toggling_vm();
    for _ in 0..100 {
        s = toggle_readonly(&mut vm, s, 10, Strategy::Naive);
        if vm.guest_stats().spurious_exits > 0 {
            break;
        }
    }
    eprintln!("naive toggles: {:?}", vm.guest_stats());
    assert!(
        vm.guest_stats().spurious_exits > 0,
        "a read falls into the hole of a naive toggle"
    );
}

/// Whether all of `[host, host + size)` is mapped by the file whose path contains `name`,
/// according to `/proc/self/maps`.
fn mapped_as(host: u64, size: u64, name: &str) -> bool {
    let maps = std::fs::read_to_string("/proc/self/maps").expect("/proc/self/maps");
    let mut covered = host;
    let mut ranges: Vec<(u64, u64)> = maps
        .lines()
        .filter(|l| l.contains(name))
        .filter_map(|l| {
            let (range, _) = l.split_once(' ')?;
            let (a, b) = range.split_once('-')?;
            Some((
                u64::from_str_radix(a, 16).ok()?,
                u64::from_str_radix(b, 16).ok()?,
            ))
        })
        .collect();
    ranges.sort();
    for (a, b) in ranges {
        if a <= covered && b > covered {
            covered = b;
        }
    }
    covered >= host + size
}

/// A name no other mapping of this process has.
fn unique(what: &str) -> String {
    format!("memslots-isolation-{what}-{}", std::process::id())
}

fn updater() -> (Arc<Vm>, SlotUpdater) {
    let vm = Arc::new(Vm::new().expect("VM"));
    let u = SlotUpdater::new(
        vm.clone(),
        Arc::new(
            VcpuGate::with_signal(memslots_testkit::testvm::kick_signal()).expect("kick signal"),
        ),
    );
    (vm, u)
}

#[test]
fn a_device_snapshot_keeps_removed_memory_mapped_and_usable() {
    if !kvm_or_skip() {
        return;
    }
    let name = unique("snapshot");
    let (_vm, mut u) = updater();
    let b = u
        .add_backing(Backing::memfd(&name, 4 * PAGE_SIZE, false).expect("memfd"))
        .expect("register");
    let (host, size) = (b.host(), b.size());
    let s = Slot {
        id: SlotId::new(0),
        gpa: GPA,
        size: 4 * PAGE_SIZE,
        host,
        flags: SlotFlags::NONE,
        guest_memfd: 0,
        guest_memfd_offset: 0,
    };
    u.apply(&[s.set_call()]).expect("slot");
    b.write_u32(host + 3 * PAGE_SIZE, PATTERN);
    drop(b);
    let snapshot = u.device_memory().expect("own view").memory();
    let cut = GuestAddress(GPA + 3 * PAGE_SIZE);
    u.apply_primitive(&Primitive::Shrink {
        id: s.id,
        size: PAGE_SIZE,
    })
    .expect("shrink");
    assert!(u
        .device_memory()
        .expect("own view")
        .memory()
        .read_obj::<u32>(cut)
        .is_err());
    u.apply(&[u.layout().slot(s.id).unwrap().delete_call()])
        .expect("delete");
    assert!(u.layout().is_empty());
    // No slot maps the memory any more, but the snapshot does: it must still be there.
    let check = |u: &str| {
        assert!(
            mapped_as(host, size, &name),
            "{u}: unmapped under a snapshot"
        );
        assert_eq!(
            snapshot.read_obj::<u32>(cut).expect("in the snapshot"),
            PATTERN
        );
        snapshot.write_obj(PATTERN2, cut).expect("writable");
        assert_eq!(snapshot.read_obj::<u32>(cut).unwrap(), PATTERN2);
        snapshot.write_obj(PATTERN, cut).expect("writable");
    };
    check("after shrink and delete");
    // Even with the updater gone.
    drop(u);
    check("after the updater is dropped");
}

#[test]
fn memory_is_released_once_no_slot_refers_to_it_and_not_before() {
    if !kvm_or_skip() {
        return;
    }
    let name = unique("table");
    let vm = Arc::new(Vm::new().expect("VM"));
    let mut table = SlotTable::new(vm.clone());
    let mut memory = HostMemory::default();
    let b = memory.add(Backing::memfd(&name, 2 * PAGE_SIZE, false).expect("memfd"));
    let (host, size) = (b.host(), b.size());
    let s = Slot {
        id: SlotId::new(0),
        gpa: GPA,
        size,
        host,
        flags: SlotFlags::NONE,
        guest_memfd: 0,
        guest_memfd_offset: 0,
    };
    table.call(&memory, &s.set_call()).expect("create");
    // Everything that owned the memory goes; the slot still refers to it.
    drop(b);
    drop(memory);
    assert!(mapped_as(host, size, &name), "unmapped under a KVM slot");
    // The slot goes: nothing refers to the memory any more, and it is released.
    table
        .call(&HostMemory::default(), &s.delete_call())
        .expect("delete");
    assert!(!mapped_as(host, size, &name), "not released");

    // An updater dropped while its VM lives on takes its slots with it before the memory goes
    // (no device view was handed out, so nothing else refers to the memory).
    let name = unique("updater");
    let mut u = SlotUpdater::new(
        vm.clone(),
        Arc::new(
            VcpuGate::with_signal(memslots_testkit::testvm::kick_signal()).expect("kick signal"),
        ),
    );
    let b = u
        .add_backing(Backing::memfd(&name, 2 * PAGE_SIZE, false).expect("memfd"))
        .expect("register");
    let (host, size) = (b.host(), b.size());
    drop(b);
    let s = Slot { host, ..s };
    u.apply(&[s.set_call()]).expect("create");
    drop(u);
    assert!(!mapped_as(host, size, &name), "not released");
    // The kernel no longer has the slot: a slot with another id over its GPA range is accepted
    // (KVM refuses an overlap with EEXIST). The new memory may well reuse the freed addresses.
    let mut memory = HostMemory::default();
    let other = memory.add(Backing::anonymous("other", size).expect("mmap"));
    let probe = Slot {
        id: SlotId::new(1),
        host: other.host(),
        ..s
    };
    let mut table = SlotTable::new(vm);
    table
        .call(&memory, &probe.set_call())
        .expect("the kernel still had the dropped updater's slot");
}

/// The NotOwned refusal of one attempt; the kernel must not have been asked.
fn not_owned<E: std::fmt::Debug>(what: &str, r: Result<impl std::fmt::Debug, E>) -> E {
    match r {
        Err(e) => {
            let text = format!("{e:?}");
            assert!(text.contains("NotOwned"), "{what}: {text}");
            e
        }
        Ok(v) => panic!("{what}: accepted: {v:?}"),
    }
}

#[test]
fn no_path_creates_a_slot_over_memory_the_library_does_not_own() {
    if !kvm_or_skip() {
        return;
    }
    let (_vm, mut u) = updater();
    let owned = u
        .add_backing(Backing::anonymous("owned", 4 * PAGE_SIZE).expect("mmap"))
        .expect("register");
    let stranger = Backing::anonymous("stranger", 4 * PAGE_SIZE).expect("mmap");
    let end = owned.host() + owned.size();
    let at = |id: u16, gpa: u64, host: u64, pages: u64| Slot {
        id: SlotId::new(id),
        gpa: GPA + gpa,
        size: pages * PAGE_SIZE,
        host,
        flags: SlotFlags::NONE,
        guest_memfd: 0,
        guest_memfd_offset: 0,
    };
    // A slot inside the owned backing, ending one page before its end.
    let base = at(0, 0, owned.host(), 3);
    u.apply(&[base.set_call()]).expect("owned");
    let layout = u.layout().clone();
    let bad = [
        ("stranger's memory", at(2, 0x10_0000, stranger.host(), 1)),
        ("straddles the end", at(2, 0x10_0000, end - PAGE_SIZE, 2)),
        (
            "starts below",
            at(2, 0x10_0000, owned.host() - PAGE_SIZE, 2),
        ),
        ("covers it and more", at(2, 0x10_0000, owned.host(), 5)),
        ("just past the end", at(2, 0x10_0000, end, 1)),
    ];
    let valid = at(1, 0x20_0000, owned.host(), 1);
    for (what, s) in bad {
        for strategy in [Strategy::Atomic, Strategy::Qemu, Strategy::Naive] {
            let ioctls = u.ioctls();
            let e = not_owned(what, apply(&mut u, &[s.set_call()], strategy));
            assert!(
                matches!(e, ApplyError::RolledBack { index: 0, .. }),
                "{what}: {e:?}"
            );
            assert_eq!(u.ioctls(), ioctls, "{what}: the kernel was asked");
            // Behind a valid call: that one is undone.
            let e = not_owned(
                what,
                apply(&mut u, &[valid.set_call(), s.set_call()], strategy),
            );
            assert!(matches!(e, ApplyError::RolledBack { .. }), "{what}: {e:?}");
            assert_eq!(u.layout(), &layout, "{what}: the layout is unchanged");
        }
        let ioctls = u.ioctls();
        not_owned(what, SlotBackend::apply_batch(&mut u, &[s.set_call()]));
        // Through the planner: a map with the region over that memory, planned and applied.
        let region = |s: Slot| Region {
            address_space: 0,
            gpa: s.gpa,
            size: s.size,
            host: s.host,
            flags: s.flags,
        };
        let map = MemoryMap::new(vec![region(base), region(s)]).expect("map");
        let p = plan(u.layout(), &map).expect("plan");
        assert_eq!(p.calls.len(), 1, "{what}: only the new region is created");
        not_owned(what, SlotBackend::apply_plan(&mut u, &p));
        assert_eq!(u.ioctls(), ioctls, "{what}: the kernel was asked");
        assert_eq!(u.layout(), &layout, "{what}: the layout is unchanged");
    }
    // Growing the owned slot past the backing's end, as a primitive (its CREATE is refused after
    // its DELETE ran: the DELETE is undone).
    let grow = Primitive::Grow {
        id: base.id,
        size: 5 * PAGE_SIZE,
    };
    let e = not_owned("grow", u.apply_primitive(&grow));
    assert!(matches!(e, ApplyPrimitiveError::Apply(_)), "{e:?}");
    not_owned("grow", SlotBackend::apply_primitive(&mut u, &grow));
    assert_eq!(u.layout(), &layout);
    // The published device view never covered the unowned memory either.
    let view = u.device_memory().expect("own view").memory();
    assert!(view
        .read_obj::<u32>(GuestAddress(base.gpa + 3 * PAGE_SIZE))
        .is_err());
    assert!(view.read_obj::<u32>(GuestAddress(GPA + 0x10_0000)).is_err());

    // The table itself, for callers below the updater (on a VM of its own).
    let mut table = SlotTable::new(Arc::new(Vm::new().expect("VM")));
    let mut memory = HostMemory::default();
    let mine = memory.add(Backing::anonymous("mine", 2 * PAGE_SIZE).expect("mmap"));
    for (what, s) in [
        ("stranger's memory", at(0, 0, stranger.host(), 1)),
        ("straddles the end", at(0, 0, mine.host() + PAGE_SIZE, 2)),
        ("owned by another VM's updater", at(0, 0, owned.host(), 1)),
    ] {
        let e = not_owned(what, table.call(&memory, &s.set_call()));
        assert!(matches!(e, SlotCallError::NotOwned { .. }));
        not_owned(what, table.call_uninjected(&memory, &s.set_call()));
    }
    assert_eq!(table.ioctls(), 0);
    // Moving or re-flagging a slot keeps its memory; it cannot be pointed elsewhere (the model
    // refuses a new host address for an existing slot before ownership is even asked).
    let s = at(0, 0, mine.host(), 2);
    table.call(&memory, &s.set_call()).expect("owned");
    let moved = Slot {
        host: stranger.host(),
        ..s
    };
    let e = table.call(&memory, &moved.set_call()).unwrap_err();
    assert!(matches!(e, SlotCallError::Refused { .. }), "{e:?}");
}
