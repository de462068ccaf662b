//! `KVM_SET_USER_MEMORY_REGION2` and guest_memfd slots through the KVM backend: the VM fd sends
//! v2 where the kernel has it, and the slot table keeps its rules (the model first, owned host
//! memory only) for guest_memfd slots too.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use memslots::kvm::{Backing, HostMemory, SlotCallError, SlotTable, SlotVm, Vm};
use memslots::model::{Ioctl, Layout, Rule, Slot, SlotFlags, SlotId, PAGE_SIZE};

const GPA: u64 = 0x4000_0000;

/// A VM whose kernel takes guest_memfd slots, or `None` with a loud note.
fn guest_memfd_vm() -> Option<Vm> {
    let vm = match Vm::new() {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("SKIPPED: /dev/kvm cannot be used ({e}); this KVM test did not run");
            return None;
        }
    };
    if !vm.limits().guest_memfd {
        eprintln!(
            "SKIPPED: this VM takes no guest_memfd slot (limits {:?}); this test did not run",
            vm.limits()
        );
        return None;
    }
    Some(vm)
}

fn private(id: u16, gpa: u64, host: u64, pages: u64, fd: u32, offset: u64) -> Slot {
    Slot {
        id: SlotId::new(id),
        gpa,
        size: pages * PAGE_SIZE,
        host,
        flags: SlotFlags::GUEST_MEMFD,
        guest_memfd: fd,
        guest_memfd_offset: offset,
    }
}

#[test]
fn the_vm_fd_sends_v2_so_a_guest_memfd_slot_is_created() {
    let Some(vm) = guest_memfd_vm() else { return };
    let limits = SlotVm::limits(vm.fd());
    assert!(limits.user_memory2 && limits.guest_memfd, "{limits:?}");
    let memfd = vm.create_guest_memfd(16 * PAGE_SIZE).expect("guest_memfd");
    let memory = Backing::anonymous("shared", 16 * PAGE_SIZE).expect("mmap");
    let slot = private(0, GPA, memory.host(), 4, memfd.as_raw_fd() as u32, 0);
    // Through v1 the kernel refuses the flag outright, as the model says...
    let v1 = Layout::new(limits).check_ioctl(&slot.set_call(), Ioctl::V1);
    assert_eq!(v1.map_err(|r| r.name()), Err("flags_need_v2"));
    // SAFETY: `memory` outlives the VM's slot: the slot is deleted below, before it is dropped.
    let got = unsafe { vm.set_region_ioctl(&slot.set_call(), Ioctl::V1) };
    assert_eq!(got, Err(libc::EINVAL));
    // ... so the VM fd's own call going through is v2.
    // SAFETY: as above.
    unsafe { SlotVm::set_region(vm.fd(), &slot.set_call()) }.expect("a v2 call");
    // Created, and immutable: the same call again is refused; the delete goes through.
    // SAFETY: as above.
    let again = unsafe { SlotVm::set_region(vm.fd(), &slot.set_call()) };
    assert_eq!(again, Err(libc::EINVAL));
    // SAFETY: a delete maps nothing.
    unsafe { SlotVm::set_region(vm.fd(), &slot.delete_call()) }.expect("delete");
    drop(memory);
}

#[test]
fn the_slot_table_keeps_its_rules_for_guest_memfd_slots() {
    let Some(vm) = guest_memfd_vm() else { return };
    let file = vm.create_guest_memfd(8 * PAGE_SIZE).expect("guest_memfd");
    let fd = file.as_raw_fd() as u32;
    let mut table = SlotTable::new(Arc::new(vm));
    let mut memory = HostMemory::default();
    let owned = memory.add(Backing::anonymous("owned", 16 * PAGE_SIZE).expect("mmap"));
    let stranger = Backing::anonymous("stranger", 16 * PAGE_SIZE).expect("mmap");

    // userspace_addr must be memory the table owns, guest_memfd or not; the kernel is not asked.
    let foreign = private(0, GPA, stranger.host(), 4, fd, 0);
    let before = table.ioctls();
    let err = table.call(&memory, &foreign.set_call()).unwrap_err();
    assert!(matches!(err, SlotCallError::NotOwned { .. }), "{err}");
    assert_eq!(table.ioctls(), before);

    // A file the model was not told about: its end is the kernel's to check.
    let past_end = private(0, GPA, owned.host(), 4, fd, 6 * PAGE_SIZE);
    let err = table.call(&memory, &past_end.set_call()).unwrap_err();
    assert!(
        matches!(
            err,
            SlotCallError::Kernel {
                errno: libc::EINVAL,
                injected: false,
                ..
            }
        ),
        "{err}"
    );
    // Told, the model refuses it before the kernel.
    table.add_guest_memfd(fd, 8 * PAGE_SIZE);
    let before = table.ioctls();
    let err = table.call(&memory, &past_end.set_call()).unwrap_err();
    assert!(
        matches!(
            err,
            SlotCallError::Refused {
                rule: Rule::GuestMemfdRange { .. },
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(table.ioctls(), before);

    let a = private(0, GPA, owned.host(), 4, fd, 0);
    table.call(&memory, &a.set_call()).expect("create");
    assert_eq!(table.layout().slot(a.id), Some(&a));
    // The range is bound: a second slot over it is refused by the model, one beside it is made.
    let b = private(
        1,
        GPA + 0x10_0000,
        owned.host() + 4 * PAGE_SIZE,
        4,
        fd,
        2 * PAGE_SIZE,
    );
    let err = table.call(&memory, &b.set_call()).unwrap_err();
    assert!(
        matches!(
            err,
            SlotCallError::Refused {
                rule: Rule::GuestMemfdBound { .. },
                ..
            }
        ),
        "{err}"
    );
    let b = Slot {
        guest_memfd_offset: 4 * PAGE_SIZE,
        ..b
    };
    table.call(&memory, &b.set_call()).expect("beside");
    // No move, no flag change, with or without GUEST_MEMFD.
    let moved = Slot {
        gpa: GPA + 0x20_0000,
        ..a
    };
    let plain = Slot {
        flags: SlotFlags::NONE,
        guest_memfd: 0,
        guest_memfd_offset: 0,
        ..moved
    };
    for (call, rule) in [
        (moved.set_call(), "guest_memfd_immutable"),
        (plain.set_call(), "guest_memfd_toggle"),
    ] {
        match table.call(&memory, &call) {
            Err(SlotCallError::Refused { rule: r, .. }) => assert_eq!(r.name(), rule),
            other => panic!("{call}: {other:?}"),
        }
    }
    table.call(&memory, &a.delete_call()).expect("delete");
    table
        .call(&memory, &a.set_call())
        .expect("the range is free again");
    drop(table);
    drop(file);
}
