//! The embedding seams, used as a VMM would: its own `VmFd`, its own memory (registered with an
//! owner, file-backed), its own `GuestMemoryAtomic` with a dirty bitmap; and what must never
//! happen to it: a read-only slot writable through the view, memory unmapped under a reader,
//! memory leaked once the last reader goes, device writes missing from the harvest.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use kvm_ioctls::{Kvm, VmFd};
use memslots::kvm::{Backing, MemoryError, SlotUpdater, SlotVm, VcpuGate};
use memslots::model::{Slot, SlotFlags, SlotId, PAGE_SIZE};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend,
    GuestMemoryMmap, GuestMemoryRegion, MmapRegion,
};
use vmm_sys_util::signal::SIGRTMIN;

/// The VMM's VM fd, or `None` (said loudly) where `/dev/kvm` cannot be opened.
fn vmm_vm() -> Option<Arc<VmFd>> {
    match Kvm::new().and_then(|k| k.create_vm()) {
        Ok(vm) => Some(Arc::new(vm)),
        Err(e) => {
            eprintln!("SKIPPED: /dev/kvm cannot be opened ({e}): this test needs KVM");
            None
        }
    }
}

fn gate() -> Arc<VcpuGate> {
    // No vCPU is registered: quiesces hold nobody, which is all these tests need.
    Arc::new(VcpuGate::with_signal(SIGRTMIN() + 3).expect("gate"))
}

/// A memfd-backed region the VMM mapped with vm-memory.
fn memfd_region(size: usize) -> Arc<MmapRegion<()>> {
    let file = vmm_sys_util::tempfile::TempFile::new()
        .expect("temp file")
        .into_file();
    file.set_len(size as u64).expect("size");
    Arc::new(MmapRegion::from_file(FileOffset::new(file, 0), size).expect("mmap"))
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

#[test]
fn the_vmms_own_vm_memory_and_view_are_kept_in_step() {
    let Some(vm) = vmm_vm() else { return };
    let view: GuestMemoryAtomic<GuestMemoryMmap<AtomicBitmap>> =
        GuestMemoryAtomic::new(GuestMemoryMmap::default());
    let mut u = SlotUpdater::with_view(vm.clone(), gate(), view.clone());
    assert!(
        u.device_memory().is_none(),
        "the VMM's view, not one of ours"
    );
    let region = memfd_region(0x10_0000);
    let ram = u
        .add_backing(Backing::from_mmap_region("ram", region.clone()).expect("register"))
        .expect("register");
    let low = slot(0, 0, 0x8_0000, ram.host(), SlotFlags::NONE);
    let rom = slot(
        1,
        0x20_0000,
        0x8_0000,
        ram.host() + 0x8_0000,
        SlotFlags::READONLY,
    );
    u.apply(&[low.set_call(), rom.set_call()]).expect("apply");
    assert_eq!(SlotVm::limits(&vm), *u.layout().limits());

    let mem = view.memory();
    // RAM is there, file-backed at the right offset (a vhost-user backend maps the same).
    let r = mem.find_region(GuestAddress(0x1000)).expect("ram in view");
    assert_eq!(r.file_offset().map(|f| f.start()), Some(0));
    mem.write_obj(0x1234_5678u32, GuestAddress(0x2000))
        .expect("ram is writable");
    assert_eq!(region.as_ptr() as u64, ram.host());
    // The read-only slot is not in the view: a device cannot write the guest's ROM through it.
    assert!(mem.write_obj(1u32, GuestAddress(0x20_0000)).is_err());
    assert!(mem.find_region(GuestAddress(0x20_0000)).is_none());

    // The device's write is in the harvest, by backing, even after the slot moves away.
    let moved = slot(0, 0x10_0000, 0x8_0000, ram.host(), SlotFlags::NONE);
    u.apply(&[low.delete_call(), moved.set_call()])
        .expect("move");
    let dirty = u.dirty_pages().expect("harvest");
    assert!(dirty.contains(ram.host() + 0x2000), "{dirty:?}");
    assert_eq!(dirty.len(), 1);
    assert!(
        u.dirty_pages().expect("harvest").is_empty(),
        "handed out once"
    );
    // And the old view still reads what was written (the reader's snapshot is intact).
    assert_eq!(
        mem.read_obj::<u32>(GuestAddress(0x2000)).unwrap(),
        0x1234_5678
    );
}

#[test]
fn registered_memory_is_released_when_the_last_slot_and_view_go_and_not_before() {
    let Some(vm) = vmm_vm() else { return };
    let region = memfd_region(4 * PAGE_SIZE as usize);
    let weak: Weak<MmapRegion<()>> = Arc::downgrade(&region);
    let mut u = SlotUpdater::new(vm, gate());
    let ram = u
        .add_backing(Backing::from_mmap_region("ram", region).expect("register"))
        .expect("register");
    let s = slot(0, 0, 4 * PAGE_SIZE, ram.host(), SlotFlags::NONE);
    u.apply(&[s.set_call()]).expect("apply");
    drop(ram);
    let view = u.device_memory().expect("own view").clone();
    let snapshot = view.memory();
    snapshot.write_obj(7u64, GuestAddress(0x100)).unwrap();
    // The VMM drops the updater while a device thread still reads through its snapshot.
    drop(u);
    assert!(weak.upgrade().is_some(), "unmapped under a reader");
    assert_eq!(snapshot.read_obj::<u64>(GuestAddress(0x100)).unwrap(), 7);
    assert_eq!(
        view.memory().num_regions(),
        0,
        "the view empties with the slots"
    );
    drop(snapshot);
    // The reaper lets go of it once no reader holds it.
    let start = Instant::now();
    while weak.upgrade().is_some() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the memory leaked after the last reader went"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn memory_registered_raw_is_checked_and_may_not_overlap() {
    let Some(vm) = vmm_vm() else { return };
    let mut u = SlotUpdater::new(vm, gate());
    let region = Arc::new(MmapRegion::<()>::new(8 * PAGE_SIZE as usize).expect("mmap"));
    let host = region.as_ptr() as u64;
    // SAFETY: `region` maps the range read-write for as long as it lives, and owns it.
    let first = unsafe { Backing::from_raw("a", host, 4 * PAGE_SIZE, None, region.clone()) };
    u.add_backing(first.expect("aligned")).expect("register");
    // SAFETY: as above.
    let overlapping = unsafe {
        Backing::from_raw(
            "b",
            host + 3 * PAGE_SIZE,
            2 * PAGE_SIZE,
            None,
            region.clone(),
        )
    };
    assert!(matches!(
        u.add_backing(overlapping.expect("aligned")),
        Err(MemoryError::Overlap { .. })
    ));
    // SAFETY: as above (the call fails before anything refers to the range).
    let unaligned = unsafe { Backing::from_raw("c", host + 1, PAGE_SIZE, None, region.clone()) };
    assert!(matches!(unaligned, Err(MemoryError::Unaligned { .. })));
    // Memory outside every registration cannot be slotted.
    let outside = slot(0, 0, PAGE_SIZE, host + 5 * PAGE_SIZE, SlotFlags::NONE);
    assert!(u.apply(&[outside.set_call()]).is_err());
    assert!(u.layout().is_empty());
}

#[test]
fn memory_mapped_read_only_is_refused() {
    let ro = vm_memory::mmap::MmapRegionBuilder::<()>::new(PAGE_SIZE as usize)
        .with_mmap_prot(libc::PROT_READ)
        .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS)
        .build()
        .expect("mmap");
    assert!(matches!(
        Backing::from_mmap_region("ro", Arc::new(ro)),
        Err(MemoryError::NotWritable { .. })
    ));
}

/// Two memories the VMM registered apart that mmap placed back to back, mapped back to back in
/// GPA too: the map joins them into one range, and a plan cut only by the default policy makes
/// one slot over both, which the updater refuses (a slot lies in one registered memory). Cut at
/// the updater's host edges, the plan makes one slot each, and it applies.
#[test]
fn memories_registered_apart_are_never_one_slot() {
    use memslots::kvm::ApplyError;
    use memslots::planner::{plan_with, CutPolicy, MemoryMap, Region};

    let Some(vm) = vmm_vm() else { return };
    let mut u = SlotUpdater::new(vm, gate());
    let both = memfd_region(0x20_0000);
    let host = both.as_ptr() as u64;
    for (name, start) in [("low", host), ("high", host + 0x10_0000)] {
        // SAFETY: `both` maps the whole 2 MiB read-write and each backing owns a clone of it.
        let backing = unsafe { Backing::from_raw(name, start, 0x10_0000, None, both.clone()) };
        u.add_backing(backing.expect("aligned")).expect("register");
    }
    assert_eq!(u.host_edges(), vec![host + 0x10_0000]);
    let map = MemoryMap::new(vec![
        Region {
            address_space: 0,
            gpa: 0x100_0000,
            size: 0x10_0000,
            host,
            flags: SlotFlags::NONE,
        },
        Region {
            address_space: 0,
            gpa: 0x110_0000,
            size: 0x10_0000,
            host: host + 0x10_0000,
            flags: SlotFlags::NONE,
        },
    ])
    .expect("a valid map");
    assert_eq!(map.len(), 1, "the map joins what continues in GPA and host");

    let joined = plan_with(u.layout(), &map, &CutPolicy::default()).expect("plans");
    assert_eq!(joined.ioctls(), 1, "{joined:?}");
    match u.apply(&joined.slot_calls()) {
        Err(ApplyError::RolledBack { index: 0, .. }) => {}
        other => panic!("one slot over two memories: {other:?}"),
    }
    assert!(u.layout().is_empty(), "nothing applied");

    let policy = CutPolicy::default().with_host_boundaries(u.host_edges());
    let plan = plan_with(u.layout(), &map, &policy).expect("plans");
    assert_eq!(plan.ioctls(), 2, "{plan:?}");
    u.apply(&plan.slot_calls())
        .expect("one slot per memory applies");
    assert_eq!(MemoryMap::from_layout(u.layout()), map);
    // The device view reaches both memories through their slots.
    let view = u.device_memory().expect("the updater's own view").memory();
    view.write_obj(0x5a5a_5a5a_u32, GuestAddress(0x10f_fffc))
        .expect("low");
    view.write_obj(0xa5a5_a5a5_u32, GuestAddress(0x110_0000))
        .expect("high");
    // SAFETY: both offsets lie inside the 2 MiB `both` maps; plain reads of u32s.
    let read = |offset: usize| unsafe { both.as_ptr().add(offset).cast::<u32>().read_volatile() };
    assert_eq!(
        (read(0xf_fffc), read(0x10_0000)),
        (0x5a5a_5a5a, 0xa5a5_a5a5)
    );
}

/// A batch rebuilds only the view regions of the slots it changes: a slot it leaves alone keeps
/// its region (the same one, with the device bits already in it, which the next harvest still
/// hands out), while a region it replaces is released once no reader holds it.
#[test]
fn a_batch_keeps_the_view_regions_of_the_slots_it_leaves_alone() {
    let Some(vm) = vmm_vm() else { return };
    let view: GuestMemoryAtomic<GuestMemoryMmap<AtomicBitmap>> =
        GuestMemoryAtomic::new(GuestMemoryMmap::default());
    let mut u = SlotUpdater::with_view(vm, gate(), view.clone());
    let ram = u
        .add_backing(Backing::anonymous("ram", 0x20_0000).expect("memory"))
        .expect("register");
    let a = slot(0, 0, 0x10_0000, ram.host(), SlotFlags::NONE);
    let b = slot(
        1,
        0x100_0000,
        0x10_0000,
        ram.host() + 0x10_0000,
        SlotFlags::NONE,
    );
    u.apply(&[a.set_call(), b.set_call()]).expect("apply");
    let region_at = |gpa: u64| {
        let mem = view.memory();
        let r = mem.find_region(GuestAddress(gpa)).expect("in view");
        std::ptr::from_ref(r) as usize
    };
    let (a_region, b_region) = (region_at(0), region_at(0x100_0000));
    // A device writes both, then a batch moves b and turns logging on for a.
    let mem = view.memory();
    mem.write_obj(1u32, GuestAddress(0x3000)).expect("a");
    mem.write_obj(2u32, GuestAddress(0x100_5000)).expect("b");
    drop(mem);
    let logged = Slot {
        flags: SlotFlags::LOG_DIRTY_PAGES,
        ..a
    };
    let moved = Slot {
        gpa: 0x200_0000,
        ..b
    };
    u.apply(&[logged.set_call(), b.delete_call(), moved.set_call()])
        .expect("apply");
    assert_eq!(region_at(0), a_region, "a's region was rebuilt");
    assert_ne!(region_at(0x200_0000), b_region, "b moved: a new region");
    assert!(view
        .memory()
        .find_region(GuestAddress(0x100_0000))
        .is_none());
    // Both device writes are in the harvest: a's from its kept region, b's from the one replaced.
    let dirty = u.dirty_pages().expect("harvest");
    assert!(dirty.contains(ram.host() + 0x3000), "{dirty:?}");
    assert!(dirty.contains(ram.host() + 0x10_5000), "{dirty:?}");
    // A write through the kept region after the batch is harvested too, once.
    view.memory()
        .write_obj(3u32, GuestAddress(0x4000))
        .expect("a");
    let dirty = u.dirty_pages().expect("harvest");
    assert!(dirty.contains(ram.host() + 0x4000), "{dirty:?}");
    assert!(!dirty.contains(ram.host() + 0x3000), "handed out twice");
}
