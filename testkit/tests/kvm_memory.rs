//! Host memory behind slots: memfd backings, the device-side view, and memory the library does
//! not own.

use std::sync::Arc;

use memslots::kvm::{
    ApplyError, Backing, DirtyLogError, MemoryError, SlotCallError, SlotUpdater, VcpuGate, Vm,
};
use memslots::model::{Slot, SlotFlags, SlotId};
use memslots_testkit::strategy::Strategy;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};

fn updater() -> Option<SlotUpdater> {
    match Vm::new() {
        Ok(vm) => Some(SlotUpdater::new(
            Arc::new(vm),
            Arc::new(
                VcpuGate::with_signal(memslots_testkit::testvm::kick_signal())
                    .expect("kick signal"),
            ),
        )),
        Err(e) => {
            eprintln!("SKIPPED: /dev/kvm cannot be used ({e}); this KVM test did not run");
            None
        }
    }
}

#[test]
fn memfd_backing_is_seen_by_devices_through_the_published_view() {
    let Some(mut u) = updater() else { return };
    let b = u
        .add_backing(Backing::memfd("ram", 1 << 20, false).expect("memfd"))
        .expect("register");
    let slot = Slot {
        id: SlotId::new(0),
        gpa: 0x10_0000,
        size: 1 << 20,
        host: b.host(),
        flags: SlotFlags::NONE,
        guest_memfd: 0,
        guest_memfd_offset: 0,
    };
    u.apply(&[slot.set_call()]).expect("create");
    b.write_u32(b.host() + 0x2000, 0xfeed_f00d);
    let view = u.device_memory().expect("own view").memory();
    let v: u32 = view.read_obj(GuestAddress(0x10_2000)).expect("mapped");
    assert_eq!(v, 0xfeed_f00d);
    // Removing the slot republishes the view without it; the old snapshot still reads (its
    // memory lives as long as the updater).
    u.apply(&[slot.delete_call()]).expect("delete");
    assert!(u
        .device_memory()
        .expect("own view")
        .memory()
        .read_obj::<u32>(GuestAddress(0x10_2000))
        .is_err());
    assert_eq!(
        view.read_obj::<u32>(GuestAddress(0x10_2000)).unwrap(),
        0xfeed_f00d
    );
}

#[test]
fn hugetlb_backing_works_or_fails_with_a_clear_error() {
    match Backing::memfd("huge", 2 << 20, true) {
        Ok(b) => assert_eq!(b.size(), 2 << 20),
        Err(e @ (MemoryError::Memfd { .. } | MemoryError::Map { .. })) => {
            eprintln!("no huge pages here: {e}");
        }
        Err(e) => panic!("not a mapping error: {e}"),
    }
}

#[test]
fn a_slot_over_memory_the_library_does_not_own_is_refused_before_the_kernel() {
    let Some(mut u) = updater() else { return };
    let owned = u
        .add_backing(Backing::anonymous("ram", 1 << 20).expect("mmap"))
        .expect("register");
    let stranger = Backing::anonymous("not registered", 1 << 20).expect("mmap");
    let ioctls = u.ioctls();
    for host in [stranger.host(), owned.host() + (1 << 20) - 0x1000] {
        let slot = Slot {
            id: SlotId::new(0),
            gpa: 0,
            size: 0x2000, // the second one runs off the end of the owned backing
            host,
            flags: SlotFlags::NONE,
            guest_memfd: 0,
            guest_memfd_offset: 0,
        };
        match u.apply(&[slot.set_call()]) {
            Err(ApplyError::RolledBack { source, .. }) => {
                assert!(
                    matches!(*source, SlotCallError::NotOwned { .. }),
                    "{source:?}"
                );
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(u.ioctls(), ioctls, "the kernel was never asked");
    assert!(u.layout().is_empty());
}

/// A VM in dirty-ring mode has no dirty bitmaps: every `KVM_GET_DIRTY_LOG` fails. The error
/// reaches the caller, and a batch that would drop a logging slot's bitmap is not started.
#[test]
fn dirty_log_errors_reach_the_caller_and_stop_the_batch() {
    let Ok(vm) = Vm::new() else {
        eprintln!("SKIPPED: /dev/kvm cannot be used; this KVM test did not run");
        return;
    };
    // KVM_CAP_DIRTY_LOG_RING, 64 KiB per vCPU, before any vCPU exists.
    let cap = kvm_bindings::kvm_enable_cap {
        cap: kvm_bindings::KVM_CAP_DIRTY_LOG_RING,
        args: [64 << 10, 0, 0, 0],
        ..Default::default()
    };
    if let Err(e) = vm.fd().enable_cap(&cap) {
        eprintln!(
            "SKIPPED: this kernel has no dirty ring ({e}); the dirty-log error test did not run"
        );
        return;
    }
    let mut u = SlotUpdater::new(
        Arc::new(vm),
        Arc::new(
            VcpuGate::with_signal(memslots_testkit::testvm::kick_signal()).expect("kick signal"),
        ),
    );
    let b = u
        .add_backing(Backing::anonymous("ram", 1 << 20).expect("ram"))
        .expect("register");
    let logged = Slot {
        id: SlotId::new(0),
        gpa: 0x10_0000,
        size: 1 << 20,
        host: b.host(),
        flags: SlotFlags::LOG_DIRTY_PAGES,
        guest_memfd: 0,
        guest_memfd_offset: 0,
    };
    u.apply(&[logged.set_call()]).expect("create");
    let err = u.dirty_pages().expect_err("no bitmap to read in ring mode");
    let bitmap_of_logged = |e: &DirtyLogError| matches!(*e, DirtyLogError::Bitmap { slot, errno } if slot == logged.id && errno != 0);
    assert!(bitmap_of_logged(&err), "{err:?}");
    let layout = u.layout().clone();
    match u.apply(&[logged.delete_call()]) {
        Err(ApplyError::DirtyLog(e)) => assert!(bitmap_of_logged(&e), "{e:?}"),
        other => panic!("the delete must not run: {other:?}"),
    }
    assert_eq!(u.layout(), &layout, "nothing changed");
    // The qemu strategy reads the bitmap just before the delete: the batch rolls back.
    match memslots_testkit::strategy::apply(&mut u, &[logged.delete_call()], Strategy::Qemu) {
        Err(ApplyError::RolledBack { source, .. }) => {
            assert!(
                matches!(*source, SlotCallError::DirtyLog { .. }),
                "{source}"
            )
        }
        other => panic!("the delete must not run: {other:?}"),
    }
    assert_eq!(u.layout(), &layout, "nothing changed");
}
