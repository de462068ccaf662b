//! A loom model of the vCPU gate's kick protocol (`memslots::kvm::gate`): every interleaving
//! of a vCPU loop and a quiescer, with the signal handler's store of `immediate_exit` able to land
//! anywhere while the vCPU is in user space, and a signal during guest execution forcing an exit.
//!
//! Checked: no vCPU enters the guest after a kick was consumed in user space (a lost kick), no vCPU
//! enters the guest while a quiesce holds, no vCPU parks with an exit KVM has not completed (it is
//! completed by one `KVM_RUN` with `immediate_exit` only when the last `KVM_RUN` returned an exit;
//! after an EINTR KVM has already completed it), and every quiesce returns (else loom reports a
//! deadlock). The same model without the handler's `immediate_exit` store, or without the
//! completing entry, must fail.
//!
//! It models the protocol (clear `immediate_exit`, check `requested`, `KVM_RUN`; park while
//! `requested`), not the code: the kernel and the signal are not something loom can run.
//! Run with `RUSTFLAGS="--cfg loom" cargo test -p memslots --test kvm_gate_loom --release`.
#![cfg(loom)]

use loom::sync::atomic::{fence, AtomicBool, AtomicU8, AtomicUsize, Ordering::SeqCst};
use loom::sync::{Arc, Condvar, Mutex};

#[derive(Default)]
struct Mode {
    in_guest: bool,
    exit_requested: bool,
}

#[derive(Default)]
struct GateState {
    parked: usize,
    requested: bool,
}

struct Model {
    /// The signal handler stores `immediate_exit` (false: the bug this protocol avoids).
    use_immediate_exit: bool,
    /// The vCPU completes a pending exit before it parks (false: the bug that would leave a
    /// port or MMIO access half done while the layout changes).
    complete_before_park: bool,
    // vCPU side ("kernel" state of one vCPU).
    mode: Mutex<Mode>,
    guest_cv: Condvar,
    immediate_exit: AtomicU8,
    /// An exit (PIO) that KVM completes on the next `KVM_RUN` entry.
    io_incomplete: AtomicBool,
    /// A kick was consumed in user space since the loop last looked at the gate.
    kick_in_user: AtomicBool,
    // Gate.
    requested: AtomicBool,
    stop: AtomicBool,
    state: Mutex<GateState>,
    parked_cv: Condvar,
    resumed_cv: Condvar,
    /// Set by the quiescer while it holds the vCPU out.
    held: AtomicBool,
    voluntary_exits: AtomicUsize,
}

impl Model {
    fn new(use_immediate_exit: bool, complete_before_park: bool) -> Self {
        Model {
            use_immediate_exit,
            complete_before_park,
            mode: Mutex::new(Mode::default()),
            guest_cv: Condvar::new(),
            immediate_exit: AtomicU8::new(0),
            io_incomplete: AtomicBool::new(false),
            kick_in_user: AtomicBool::new(false),
            requested: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            state: Mutex::new(GateState::default()),
            parked_cv: Condvar::new(),
            resumed_cv: Condvar::new(),
            held: AtomicBool::new(false),
            voluntary_exits: AtomicUsize::new(0),
        }
    }

    /// `pthread_kill`: a vCPU in the guest is forced out; one in user space runs the handler.
    fn kick(&self) {
        let mut m = self.mode.lock().unwrap();
        if m.in_guest {
            m.exit_requested = true;
            self.guest_cv.notify_all();
        } else {
            // The handler runs on the vCPU thread and the signal is consumed.
            self.kick_in_user.store(true, SeqCst);
            if self.use_immediate_exit {
                self.immediate_exit.store(1, SeqCst);
            }
        }
    }

    /// `KVM_RUN`: returns false for EINTR, true for a guest exit (PIO). As KVM, it first
    /// completes an incomplete exit, then looks at `immediate_exit`.
    fn kvm_run(&self) -> bool {
        {
            let mut m = self.mode.lock().unwrap();
            self.io_incomplete.store(false, SeqCst);
            if self.immediate_exit.load(SeqCst) == 1 {
                return false;
            }
            assert!(
                !self.kick_in_user.load(SeqCst),
                "kick lost: entering the guest after a kick was consumed in user space"
            );
            assert!(
                !self.held.load(SeqCst),
                "vCPU entered the guest while held out"
            );
            m.in_guest = true;
        }
        // The guest exits on its own once (a port write), then runs until kicked.
        if self.voluntary_exits.fetch_add(1, SeqCst) == 0 {
            self.mode.lock().unwrap().in_guest = false;
            self.io_incomplete.store(true, SeqCst);
            return true;
        }
        // Running guest code until a signal arrives (a wait, so a lost kick is a deadlock).
        let mut m = self.mode.lock().unwrap();
        while !m.exit_requested {
            m = self.guest_cv.wait(m).unwrap();
        }
        m.exit_requested = false;
        m.in_guest = false;
        false
    }

    /// As `VcpuGate::park`: counted parked, waits while a quiesce is requested.
    fn park(&self) {
        assert!(
            !self.io_incomplete.load(SeqCst),
            "parked with an exit KVM has not completed"
        );
        let mut s = self.state.lock().unwrap();
        s.parked += 1;
        self.parked_cv.notify_all();
        while s.requested && !self.stop.load(SeqCst) {
            s = self.resumed_cv.wait(s).unwrap();
        }
        s.parked -= 1;
    }

    fn vcpu_loop(&self) {
        // As `GateVcpu::exit_pending`: the last `KVM_RUN` returned an exit, not EINTR.
        let mut exit_pending = false;
        loop {
            // A kick consumed before this point is seen through `requested` below. The handler
            // runs on this thread, between two of its steps: model that with the mode lock
            // (loom treats SeqCst as AcqRel, so plain atomics would admit orders a single thread
            // never shows).
            {
                let _m = self.mode.lock().unwrap();
                self.immediate_exit.store(0, SeqCst);
                self.kick_in_user.store(false, SeqCst);
            }
            fence(SeqCst);
            if self.requested.load(SeqCst) || self.stop.load(SeqCst) {
                if self.stop.load(SeqCst) {
                    return;
                }
                if exit_pending && self.complete_before_park {
                    {
                        let _m = self.mode.lock().unwrap();
                        self.immediate_exit.store(1, SeqCst);
                    }
                    let _ = self.kvm_run(); // completes the exit, never enters the guest
                    exit_pending = false;
                }
                self.park();
                continue;
            }
            exit_pending = self.kvm_run();
        }
    }

    fn quiesce(&self) {
        let mut s = self.state.lock().unwrap();
        s.requested = true;
        self.requested.store(true, SeqCst);
        self.kick();
        while s.parked < 1 {
            s = self.parked_cv.wait(s).unwrap();
        }
        self.held.store(true, SeqCst);
        assert!(
            !self.mode.lock().unwrap().in_guest,
            "parked vCPU in the guest"
        );
    }

    fn resume(&self) {
        let mut s = self.state.lock().unwrap();
        self.held.store(false, SeqCst);
        s.requested = false;
        self.requested.store(false, SeqCst);
        drop(s);
        self.resumed_cv.notify_all();
    }

    fn stop(&self) {
        let _s = self.state.lock().unwrap();
        self.stop.store(true, SeqCst);
        self.kick();
        self.resumed_cv.notify_all();
    }
}

fn check(use_immediate_exit: bool, complete_before_park: bool) {
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(3);
    }
    builder.check(move || {
        let m = Arc::new(Model::new(use_immediate_exit, complete_before_park));
        let vcpu = {
            let m = m.clone();
            loom::thread::spawn(move || m.vcpu_loop())
        };
        m.quiesce();
        m.resume();
        m.quiesce();
        m.resume();
        m.stop();
        vcpu.join().unwrap();
    });
}

#[test]
fn kick_protocol_never_loses_a_kick() {
    check(true, true);
}

#[test]
#[should_panic(expected = "kick lost")]
fn without_immediate_exit_a_kick_is_lost() {
    check(false, true);
}

#[test]
#[should_panic(expected = "parked with an exit KVM has not completed")]
fn parking_right_after_an_exit_leaves_it_incomplete() {
    check(true, false);
}
