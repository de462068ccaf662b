//! Embedding memslots in a VMM: a VM with one vCPU running a tiny real-mode guest through a
//! [`GateVcpu`], memory regions described QEMU-style to a [`Listener`], and every commit applied by
//! a [`SlotUpdater`] that holds the vCPU out only for the calls that open a hole.
//!
//! Run it with `cargo run --release -p memslots --example embed` (needs `/dev/kvm`).

use std::error::Error;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use memslots::kvm::{Backing, GateVcpu, SlotUpdater, VcpuGate, Vm};
use memslots::model::{SlotCall, SlotFlags};
use memslots::planner::{Listener, Plan, Section};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vmm_sys_util::signal::SIGRTMIN;

const RAM: u64 = 2 << 20;
const ROM: u64 = 0x2_0000;
const ROM_GPA: u64 = 0xc_0000;

/// Applies a plan: the planner already ordered it; the updater finds the hole window itself.
fn apply(updater: &mut SlotUpdater, plan: &Plan, what: &str) -> Result<(), Box<dyn Error>> {
    let calls: Vec<SlotCall> = plan.calls.iter().map(|c| c.call).collect();
    let stats = updater.apply(&calls)?;
    println!(
        "{what}: {} calls, {} with the vCPU held out, blackout {:?}",
        stats.ioctls,
        stats.quiesced_ioctls,
        stats.quiesce.map(|q| q.blackout)
    );
    Ok(())
}

fn main() -> Result<(), Box<dyn Error>> {
    let vm = match Vm::new() {
        Ok(vm) => Arc::new(vm),
        Err(e) => {
            eprintln!("this example needs /dev/kvm: {e}");
            return Ok(());
        }
    };
    // The VMM names the kick signal (not SIGRTMIN if its own vCPU loop already uses that one,
    // or pass its own `Kick`): memslots never replaces a handler it did not install.
    let gate = Arc::new(VcpuGate::with_signal(SIGRTMIN() + 2)?);
    let mut updater = SlotUpdater::new(vm.clone(), gate.clone());
    let ram = updater.add_backing(Backing::anonymous("ram", RAM)?);
    let rom = updater.add_backing(Backing::anonymous("rom", ROM)?);
    // The guest: `inc word [0x2000]; jmp $-4`, at 0x1000, in real mode.
    ram.write_bytes(ram.host() + 0x1000, &[0xff, 0x06, 0x00, 0x20, 0xeb, 0xfa]);

    let mut listener = Listener::new(*vm.limits());
    let ram_section = |gpa: u64, size: u64| Section {
        address_space: 0,
        gpa,
        size,
        host: ram.host() + gpa,
        flags: SlotFlags::NONE,
    };
    listener.begin()?;
    listener.region_add(ram_section(0, RAM))?;
    apply(&mut updater, &listener.commit()?, "boot")?;

    // The VMM's vCPU thread: its run loop goes through the gate.
    let stop = Arc::new(AtomicBool::new(false));
    let vcpu_fd = vm.fd().create_vcpu(0)?;
    let mut sregs = vcpu_fd.get_sregs()?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu_fd.set_sregs(&sregs)?;
    let mut regs = vcpu_fd.get_regs()?;
    regs.rip = 0x1000;
    regs.rflags = 2;
    vcpu_fd.set_regs(&regs)?;
    let thread = {
        let (gate, stop) = (gate.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut vcpu = GateVcpu::new(&gate, 0, vcpu_fd).expect("register the vCPU");
            while !stop.load(Ordering::SeqCst) {
                match vcpu.run() {
                    Ok(None) => {} // kicked: go round (the next entry waits out a quiesce)
                    Ok(Some(exit)) => {
                        eprintln!("unexpected exit: {exit:?}");
                        break;
                    }
                    Err(e) => {
                        eprintln!("KVM_RUN: {e}");
                        break;
                    }
                }
            }
        })
    };

    // Firmware shadows a ROM over RAM (a hole-free split and a quiesced overlay), then removes it.
    listener.begin()?;
    listener.region_del(ram_section(0, RAM))?;
    listener.region_add(ram_section(0, ROM_GPA))?;
    listener.region_add(Section {
        address_space: 0,
        gpa: ROM_GPA,
        size: ROM,
        host: rom.host(),
        flags: SlotFlags::READONLY,
    })?;
    listener.region_add(ram_section(ROM_GPA + ROM, RAM - ROM_GPA - ROM))?;
    apply(&mut updater, &listener.commit()?, "ROM overlay")?;
    listener.begin()?;
    listener.region_del(Section {
        address_space: 0,
        gpa: ROM_GPA,
        size: ROM,
        host: rom.host(),
        flags: SlotFlags::READONLY,
    })?;
    listener.region_add(ram_section(ROM_GPA, ROM))?;
    apply(&mut updater, &listener.commit()?, "ROM removed")?;

    // Device threads read guest memory through the view published with each batch.
    let view = updater.device_memory().memory();
    let count: u16 = view.read_obj(GuestAddress(0x2000))?;
    println!("the guest has counted to {count} (it never stopped but for the quiesced calls)");

    let held = gate.quiesce();
    stop.store(true, Ordering::SeqCst);
    drop(held);
    thread.join().map_err(|_| "vCPU thread panicked")?;
    Ok(())
}
