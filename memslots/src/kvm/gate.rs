//! The vCPU gate: hold every vCPU outside `KVM_RUN` for as short a time as possible.
//!
//! A vCPU thread runs `KVM_RUN` through a [`GateVcpu`]; [`VcpuGate::quiesce`] asks every
//! vCPU to park, kicks the ones inside `KVM_RUN` with a real-time signal whose handler sets the
//! thread's `kvm_run.immediate_exit`, and waits (on a condvar, no polling) until all are parked.
//! The returned [`Quiesced`] guard resumes them when dropped.
//!
//! Why the kick cannot be lost: the quiescer publishes `requested` (SeqCst) before it signals. A
//! vCPU clears `immediate_exit` *before* it checks `requested`, then enters `KVM_RUN`. If the
//! signal lands before the check, the check sees `requested`; if it lands between the check and
//! `KVM_RUN`, `immediate_exit` is 1 and `KVM_RUN` returns `EINTR` at once; if it lands inside
//! `KVM_RUN`, the signal itself makes it return `EINTR`.

use std::cell::Cell;
use std::os::raw::{c_int, c_void};
use std::ptr;
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, Once};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

thread_local! {
    /// This thread's `kvm_run`, for the kick handler (null when the thread runs no vCPU).
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(ptr::null_mut()) };
}

/// The real-time signal that kicks a vCPU out of `KVM_RUN`.
pub fn kick_signal() -> c_int {
    SIGRTMIN()
}

extern "C" fn on_kick(_: c_int, _: *mut libc::siginfo_t, _: *mut c_void) {
    // Const-initialised, destructor-free thread local: reading it is async-signal-safe.
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is this thread's own `kvm_run` mapping, set by `bind_kvm_run` and
        // cleared before the mapping goes away; a signal handler runs on this thread, so the
        // vCPU is not inside a Rust borrow of it that this write could break (KVM reads the
        // field only when `KVM_RUN` starts).
        unsafe { ptr::write_volatile(&mut (*run).immediate_exit, 1) };
    }
    fence(Ordering::SeqCst);
}

static HANDLER: Once = Once::new();

fn install_handler() {
    HANDLER.call_once(|| {
        register_signal_handler(kick_signal(), on_kick)
            .expect("the kick signal is a valid real-time signal");
    });
}

/// Binds this thread's `kvm_run` for the kick handler; `None` unbinds.
///
/// # Safety
///
/// `run` must point to the `kvm_run` mapping of a vCPU that this thread runs, and must stay
/// valid until this thread calls `bind_kvm_run(None)` (or exits).
unsafe fn bind_kvm_run(run: Option<*mut kvm_run>) {
    KVM_RUN.with(|c| c.set(run.unwrap_or(ptr::null_mut())));
}

#[derive(Debug, Default)]
struct State {
    requested: bool,
    parked: usize,
    threads: Vec<libc::pthread_t>,
}

/// Times of one quiesce.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QuiesceTimes {
    /// From the kick to every vCPU parked.
    pub kick_to_parked: Duration,
    /// From the kick to the resume: how long the guest was held out.
    pub blackout: Duration,
}

/// Parks and resumes vCPU threads.
#[derive(Debug, Default)]
pub struct VcpuGate {
    requested: AtomicBool,
    state: Mutex<State>,
    parked_changed: Condvar,
    resumed: Condvar,
}

impl VcpuGate {
    /// A gate with no vCPU yet.
    pub fn new() -> Self {
        install_handler();
        VcpuGate::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers the calling thread as a vCPU thread (to be kicked).
    fn register(&self) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        self.lock().threads.push(me);
    }

    /// Unregisters the calling thread; a quiesce in progress stops waiting for it.
    fn unregister(&self) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        let mut s = self.lock();
        // SAFETY: pthread_equal only compares handles.
        s.threads
            .retain(|&t| unsafe { libc::pthread_equal(t, me) } == 0);
        self.parked_changed.notify_all();
    }

    /// Whether a quiesce asks vCPUs to park. Checked by a vCPU thread after clearing its
    /// `immediate_exit` and before `KVM_RUN`.
    fn park_requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// Parks the calling vCPU thread until the quiesce ends. The caller must have completed any
    /// pending MMIO/PIO exit first (one `KVM_RUN` with `immediate_exit = 1`).
    fn park(&self) {
        let mut s = self.lock();
        s.parked += 1;
        self.parked_changed.notify_all();
        while s.requested {
            s = self.resumed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.parked -= 1;
    }

    /// Kicks every vCPU out of `KVM_RUN` and waits until all are parked.
    pub fn quiesce(&self) -> Quiesced<'_> {
        let start = Instant::now();
        let mut s = self.lock();
        assert!(!s.requested, "quiesce is not reentrant");
        s.requested = true;
        self.requested.store(true, Ordering::SeqCst);
        for &t in &s.threads {
            // SAFETY: `t` is a registered vCPU thread, which unregisters (under this lock)
            // before it exits, so the handle is live; the signal has a handler installed.
            unsafe { libc::pthread_kill(t, kick_signal()) };
        }
        while s.parked < s.threads.len() {
            s = self
                .parked_changed
                .wait(s)
                .unwrap_or_else(|p| p.into_inner());
        }
        drop(s);
        Quiesced {
            gate: self,
            start,
            parked: start.elapsed(),
            done: false,
        }
    }

    fn resume(&self) {
        let mut s = self.lock();
        s.requested = false;
        self.requested.store(false, Ordering::SeqCst);
        self.resumed.notify_all();
    }

    /// Number of registered vCPU threads.
    pub fn vcpus(&self) -> usize {
        self.lock().threads.len()
    }
}

/// A vCPU run through a gate, on the thread that created this: it owns the `VcpuFd`, so the
/// `kvm_run` mapping the kick handler writes lives exactly as long as the binding. Not `Send`.
#[derive(Debug)]
pub struct GateVcpu {
    gate: std::sync::Arc<VcpuGate>,
    vcpu: kvm_ioctls::VcpuFd,
    /// The last `KVM_RUN` returned an exit whose operation (MMIO, PIO...) KVM completes only on
    /// the next entry. After an `EINTR` nothing is pending: KVM finishes incomplete operations
    /// before it looks at signals and `immediate_exit`.
    exit_pending: bool,
    _not_send: std::marker::PhantomData<*const ()>,
}

impl GateVcpu {
    /// Joins the calling thread to `gate` as the thread running `vcpu`.
    pub fn join(gate: std::sync::Arc<VcpuGate>, mut vcpu: kvm_ioctls::VcpuFd) -> Self {
        let run: *mut kvm_run = vcpu.get_kvm_run();
        // SAFETY: the mapping belongs to `vcpu`, which `Self` owns; `Drop` unbinds it before the
        // fd (and its mapping) go, and `Self` cannot leave this thread (not `Send`).
        unsafe { bind_kvm_run(Some(run)) };
        gate.register();
        GateVcpu {
            gate,
            vcpu,
            exit_pending: false,
            _not_send: std::marker::PhantomData,
        }
    }

    /// The vCPU, for register access between runs.
    pub fn vcpu(&mut self) -> &mut kvm_ioctls::VcpuFd {
        &mut self.vcpu
    }

    /// Runs the vCPU once through the gate. `Ok(None)`: it was kicked or parked (call again);
    /// `Ok(Some(exit))`: an exit for the VMM to handle before the next call.
    pub fn run(&mut self) -> Result<Option<kvm_ioctls::VcpuExit<'_>>, kvm_ioctls::Error> {
        // Clear first, then check the gate: a kick after the check still stops `KVM_RUN`.
        self.vcpu.set_kvm_immediate_exit(0);
        if self.gate.park_requested() {
            if self.exit_pending {
                // Complete the pending exit without running guest code, then park.
                self.vcpu.set_kvm_immediate_exit(1);
                let _ = self.vcpu.run();
                self.vcpu.set_kvm_immediate_exit(0);
                self.exit_pending = false;
            }
            self.gate.park();
            return Ok(None);
        }
        match self.vcpu.run() {
            Ok(exit) => {
                self.exit_pending = true;
                Ok(Some(exit))
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.exit_pending = false;
                Ok(None)
            }
            Err(e) => {
                // Whatever state KVM is in, one more entry with `immediate_exit` is harmless.
                self.exit_pending = true;
                Err(e)
            }
        }
    }
}

impl Drop for GateVcpu {
    fn drop(&mut self) {
        // SAFETY: unbinding; the mapping is still alive here.
        unsafe { bind_kvm_run(None) };
        self.gate.unregister();
    }
}

/// Every vCPU is parked while this lives; dropping it (or [`Quiesced::resume`]) lets them run.
#[derive(Debug)]
pub struct Quiesced<'a> {
    gate: &'a VcpuGate,
    start: Instant,
    parked: Duration,
    done: bool,
}

impl Quiesced<'_> {
    /// Resumes the vCPUs and says how long they were held out.
    pub fn resume(mut self) -> QuiesceTimes {
        self.done = true;
        self.gate.resume();
        QuiesceTimes {
            kick_to_parked: self.parked,
            blackout: self.start.elapsed(),
        }
    }
}

impl Drop for Quiesced<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.gate.resume();
        }
    }
}
