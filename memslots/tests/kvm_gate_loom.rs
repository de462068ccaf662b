//! A loom model of the vCPU gate (`memslots::kvm::gate`), the inhibitor of `KVM_RUN`: every
//! interleaving of one or two vCPU threads (each a VMM run loop calling `VcpuTicket::run` around a
//! modelled `KVM_RUN`) with one or two quiescers, one of which may be a vCPU thread that quiesces
//! while it handles an exit, between two `run`s.
//!
//! Modelled as the code does it: the gate's `inhibited`, its lock (`holder`, `depth`) with the
//! condvars `left` and `released`; per vCPU `in_run`, `kicked`, `tid` and `immediate_exit`; the
//! vCPU side of `run` (clear `immediate_exit` only if `kicked` was set, store `in_run`, check
//! `inhibited`, else back off: notify `left`, wait on `released`) and the `Inside` guard; the
//! quiescer (wait for another holder, store `inhibited`, kick every vCPU with `in_run` that is not
//! its own thread, wait on `left` until none is inside) and `resume`; and `SignalKick::kick`
//! (`immediate_exit = 1`, `kicked`, fence, signal). The kernel, as one mutex: `KVM_RUN` returns
//! `EINTR` at once if `immediate_exit` is 1, else runs the guest until a signal forces `EINTR` or
//! the guest exits on its own (an MMIO write at its first instruction, once per vCPU where a test
//! says so, or a shutdown at the end). A signal sent while the thread is not in the guest is eaten
//! by the no-op handler and lost (why `immediate_exit` exists). Checking `immediate_exit` and
//! entering the guest are one step: KVM looks at pending signals between the two.
//!
//! Checked: no vCPU is in the guest while a quiesce holds (from `quiesce` returning to `resume`),
//! and no two quiesces hold at once; every quiesce returns (else loom reports a deadlock), from
//! the main thread, from a vCPU thread between two `run`s (the old gate deadlocked there), nested,
//! and with two quiescers (the second waits; the old gate panicked); a gate kick refuses at most
//! one entry (its `immediate_exit` never survives into the next entry, so a vCPU cannot spin on
//! `EINTR`), and after the last resume every vCPU gets back into the guest; an `immediate_exit`
//! another component set while `kicked` is false (Firecracker's way: queue a request, signal, its
//! handler sets `immediate_exit`, the run loop clears it on `EINTR` and reads the queue) is not
//! cleared by the gate, so that request is seen. Mutations that must fail: the quiescer reading
//! `in_run` before storing `inhibited`, or the vCPU checking `inhibited` before storing `in_run` (a
//! vCPU in the guest during the hold); a kick that only signals (a lost kick: deadlock); `Inside`
//! not notifying `left` (deadlock once the vCPU that left blocks before its next `run`: here it
//! quiesces itself and waits for the quiescer that waits for it); the gate never clearing its
//! `immediate_exit` (a spin on `EINTR`), or clearing it without `kicked` (the other component's
//! request lost). Each mutant runs in a child process: loom reports a deadlock with a panic that
//! aborts the process, which `#[should_panic]` cannot catch.
//!
//! A known race is pinned too (`FOREIGN_AND_GATE`): with `kicked` still set from a gate kick, the
//! other component's `immediate_exit` can be cleared by the gate before the next entry, and its
//! request waits for the next exit.
//!
//! Not modelled: the re-kick after `REKICK` (loom's `wait_timeout` never times out). The library's
//! kick never needs it: `immediate_exit` is stored before the signal, so a kick that lands before
//! the entry makes it return at once and one that lands later finds the thread in the guest. The
//! re-kick is for a VMM's own `Kick` that only signals, whose lost kick the mutation shows. Also
//! not modelled: registration and `ThreadId`s (fixed entries, numbered threads).
//!
//! Loom treats SeqCst loads and stores as AcqRel and implements only `fence(SeqCst)`: where the
//! code relies on a SeqCst store being ordered before a later SeqCst load (`in_run` then
//! `inhibited` in the vCPU, `inhibited` then `in_run` in the quiescer, `in_run` then `inhibited`
//! in `Inside`), the model puts a `fence(SeqCst)` between them.
//!
//! It models the protocol, not the code: the kernel and the signal are not something loom can run.
//! Run with `RUSTFLAGS="--cfg loom" cargo test -p memslots --test kvm_gate_loom --release`
//! (`LOOM_MAX_PREEMPTIONS` overrides the default bound of 2).
#![cfg(loom)]

use loom::sync::atomic::{fence, AtomicBool, AtomicU8, AtomicUsize, Ordering::SeqCst};
use loom::sync::{Arc, Condvar, Mutex};

/// A deliberate bug in the model, to show the checks catch it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mutation {
    None,
    /// The quiescer reads `in_run` before it stores `inhibited`.
    QuiescerReadsInRunFirst,
    /// The vCPU checks `inhibited` before it stores `in_run`.
    VcpuChecksInhibitedFirst,
    /// The kick only signals: no `immediate_exit`, no `kicked`.
    KickOnlySignals,
    /// `Inside` does not notify `left` when the vCPU leaves during a quiesce.
    InsideDoesNotNotify,
    /// `run` never clears the `immediate_exit` a gate kick set.
    NeverClearImmediateExit,
    /// `run` clears `immediate_exit` whether or not the gate set it.
    AlwaysClearImmediateExit,
}

/// Who does what in one model.
#[derive(Clone, Copy, Debug)]
struct Scenario {
    vcpus: usize,
    /// vCPU 0's guest exits once on its own (an MMIO write) and vCPU 0's thread quiesces (nested
    /// once) while it handles that exit, between two `run`s.
    vcpu0_quiesces: bool,
    /// Quiesce/resume rounds of the main thread.
    main_quiesces: usize,
    /// A second thread quiesces once, concurrently.
    second_quiescer: bool,
    /// Another component asks vCPU 0's run loop for something the way Firecracker does: it
    /// queues a request, then signals the thread with its own handler, which sets
    /// `immediate_exit`; the run loop clears `immediate_exit` on `EINTR` and reads its queue.
    foreign: bool,
}

const NO_THREAD: usize = usize::MAX;
const MAIN: usize = 0;
const SECOND_QUIESCER: usize = 8;

/// What the VMM's `KVM_RUN` returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Run {
    Eintr,
    Exit,
}

/// One registered vCPU, as the gate's `Entry` (plus the byte of its `kvm_run` page).
struct Entry {
    tid: AtomicUsize,
    in_run: AtomicBool,
    kicked: AtomicBool,
    immediate_exit: AtomicU8,
    /// Model only: how many times the gate kicked this vCPU.
    kicks: AtomicUsize,
}

struct State {
    holder: Option<usize>,
    depth: usize,
}

/// The kernel's view of one vCPU.
#[derive(Default)]
struct Cpu {
    in_guest: bool,
    /// A signal is pending while in the guest: the next thing KVM does is return `EINTR`.
    signal: bool,
    /// Voluntary exits the guest still makes (at its first instruction).
    voluntary_exits: usize,
    /// The kick (its number) whose `immediate_exit` made the last entry return `EINTR`.
    refused_by: Option<usize>,
}

#[derive(Default)]
struct Kernel {
    cpus: Vec<Cpu>,
    /// A quiesce holds (model only: set by a quiescer once `quiesce` returned).
    held: bool,
    /// The guest shuts down at its next instruction.
    stop: bool,
    /// The VMM's run loop has seen the other component's request.
    foreign_seen: bool,
}

struct Model {
    mutation: Mutation,
    foreign: bool,
    // The gate.
    inhibited: AtomicBool,
    state: Mutex<State>,
    left: Condvar,
    released: Condvar,
    entries: Vec<Entry>,
    // The kernel.
    kernel: Mutex<Kernel>,
    kernel_cv: Condvar,
    // The VMM.
    stop: AtomicBool,
    /// The other component's request to vCPU 0: its queue (a channel, so a lock). An atomic flag
    /// read with `swap` made loom report a false deadlock: its modification order is partial, so
    /// a load ordered after a concurrent `store(true)` could still read an earlier swap's `false`.
    foreign_queue: Mutex<bool>,
}

impl Model {
    fn new(sc: Scenario, mutation: Mutation) -> Self {
        let entries = (0..sc.vcpus)
            .map(|_| Entry {
                tid: AtomicUsize::new(NO_THREAD),
                in_run: AtomicBool::new(false),
                kicked: AtomicBool::new(false),
                immediate_exit: AtomicU8::new(0),
                kicks: AtomicUsize::new(0),
            })
            .collect();
        let cpus = (0..sc.vcpus)
            .map(|i| Cpu {
                voluntary_exits: usize::from(i == 0 && sc.vcpu0_quiesces),
                ..Cpu::default()
            })
            .collect();
        Model {
            mutation,
            foreign: sc.foreign,
            inhibited: AtomicBool::new(false),
            state: Mutex::new(State {
                holder: None,
                depth: 0,
            }),
            left: Condvar::new(),
            released: Condvar::new(),
            entries,
            kernel: Mutex::new(Kernel {
                cpus,
                ..Kernel::default()
            }),
            kernel_cv: Condvar::new(),
            stop: AtomicBool::new(false),
            foreign_queue: Mutex::new(false),
        }
    }

    // ---- The kernel ----

    /// `tgkill` with a signal whose handler does nothing: forces a vCPU in the guest out; lost
    /// if the thread is in user space.
    fn signal(&self, i: usize) {
        let mut k = self.kernel.lock().unwrap();
        if k.cpus[i].in_guest {
            k.cpus[i].signal = true;
            self.kernel_cv.notify_all();
        }
    }

    /// `KVM_RUN` for vCPU `i`.
    fn kvm_run(&self, i: usize) -> Run {
        let mut k = self.kernel.lock().unwrap();
        let e = &self.entries[i];
        if e.immediate_exit.load(SeqCst) == 1 {
            // Only the gate sets it, unless another component does too (then the gate never
            // kicks: see `foreign_kick`).
            if !self.foreign {
                let kick = e.kicks.load(SeqCst);
                assert!(
                    k.cpus[i].refused_by != Some(kick),
                    "immediate_exit survived: vCPU {i} refused twice by kick {kick}"
                );
                k.cpus[i].refused_by = Some(kick);
            }
            return Run::Eintr;
        }
        assert!(!k.held, "vCPU {i} entered the guest while a quiesce holds");
        if k.stop {
            return Run::Exit;
        }
        if k.cpus[i].voluntary_exits > 0 {
            k.cpus[i].voluntary_exits -= 1;
            return Run::Exit;
        }
        k.cpus[i].in_guest = true;
        self.kernel_cv.notify_all();
        while !k.cpus[i].signal && !k.stop {
            k = self.kernel_cv.wait(k).unwrap();
        }
        k.cpus[i].in_guest = false;
        if std::mem::take(&mut k.cpus[i].signal) {
            Run::Eintr
        } else {
            Run::Exit
        }
    }

    // ---- The gate ----

    /// `SignalKick::kick`.
    fn kick(&self, i: usize) {
        let e = &self.entries[i];
        e.kicks.fetch_add(1, SeqCst);
        if self.mutation != Mutation::KickOnlySignals {
            // `KickTarget::set_immediate_exit`.
            e.immediate_exit.store(1, SeqCst);
            e.kicked.store(true, SeqCst);
        }
        fence(SeqCst);
        self.signal(i);
    }

    /// `VcpuTicket::run(|| KVM_RUN)` for vCPU `i` on thread `me`.
    fn run(&self, i: usize, me: usize) -> Run {
        let e = &self.entries[i];
        e.tid.store(me, SeqCst);
        loop {
            match self.mutation {
                Mutation::NeverClearImmediateExit => {}
                Mutation::AlwaysClearImmediateExit => {
                    e.kicked.store(false, SeqCst);
                    e.immediate_exit.store(0, SeqCst);
                }
                _ => {
                    if e.kicked.swap(false, SeqCst) {
                        e.immediate_exit.store(0, SeqCst);
                    }
                }
            }
            let inhibited = if self.mutation == Mutation::VcpuChecksInhibitedFirst {
                let inhibited = self.inhibited.load(SeqCst);
                e.in_run.store(true, SeqCst);
                inhibited
            } else {
                e.in_run.store(true, SeqCst);
                fence(SeqCst);
                self.inhibited.load(SeqCst)
            };
            if !inhibited {
                break;
            }
            e.in_run.store(false, SeqCst);
            let mut s = self.state.lock().unwrap();
            self.left.notify_all();
            while self.inhibited.load(SeqCst) {
                s = self.released.wait(s).unwrap();
            }
        }
        let r = self.kvm_run(i);
        // `Inside::drop`.
        e.in_run.store(false, SeqCst);
        fence(SeqCst);
        if self.inhibited.load(SeqCst) {
            let _s = self.state.lock().unwrap();
            if self.mutation != Mutation::InsideDoesNotNotify {
                self.left.notify_all();
            }
        }
        r
    }

    /// `VcpuGate::quiesce` on thread `me`.
    fn quiesce(&self, me: usize) {
        let mut s = self.state.lock().unwrap();
        if s.holder == Some(me) {
            s.depth += 1;
            return;
        }
        while s.holder.is_some() {
            s = self.released.wait(s).unwrap();
        }
        s.holder = Some(me);
        s.depth = 1;
        let early: Vec<bool> = if self.mutation == Mutation::QuiescerReadsInRunFirst {
            self.entries.iter().map(|e| e.in_run.load(SeqCst)).collect()
        } else {
            Vec::new()
        };
        self.inhibited.store(true, SeqCst);
        fence(SeqCst);
        let mut first = true;
        loop {
            let mut inside = false;
            for (i, e) in self.entries.iter().enumerate() {
                let in_run = if first && !early.is_empty() {
                    early[i]
                } else {
                    e.in_run.load(SeqCst)
                };
                if in_run && e.tid.load(SeqCst) != me {
                    inside = true;
                    // Only on the first pass: no timeouts, so no re-kick.
                    if first {
                        self.kick(i);
                    }
                }
            }
            if !inside {
                break;
            }
            s = self.left.wait(s).unwrap();
            first = false;
        }
    }

    /// `VcpuGate::resume`.
    fn resume(&self) {
        let mut s = self.state.lock().unwrap();
        s.depth -= 1;
        if s.depth == 0 {
            s.holder = None;
            self.inhibited.store(false, SeqCst);
            self.released.notify_all();
        }
    }

    // ---- The checks and the threads ----

    /// Right after `quiesce` returned: from now on no vCPU may be in the guest.
    fn hold(&self) {
        let mut k = self.kernel.lock().unwrap();
        assert!(!k.held, "two quiesces hold at once");
        for (i, c) in k.cpus.iter().enumerate() {
            assert!(!c.in_guest, "vCPU {i} in the guest while a quiesce holds");
        }
        k.held = true;
    }

    /// Right before `resume`.
    fn release(&self) {
        self.kernel.lock().unwrap().held = false;
    }

    fn quiesce_round(&self, me: usize) {
        self.quiesce(me);
        self.hold();
        self.release();
        self.resume();
    }

    /// A VMM's run loop for vCPU `i` on thread `me`.
    fn vcpu_loop(&self, i: usize, me: usize, quiesces: bool) {
        let mut quiesced = false;
        while !self.stop.load(SeqCst) {
            let r = self.run(i, me);
            if self.foreign && i == 0 {
                // Firecracker's run loop: clear `immediate_exit` on `EINTR`, then read the queue.
                if r == Run::Eintr {
                    self.entries[i].immediate_exit.store(0, SeqCst);
                }
                if std::mem::take(&mut *self.foreign_queue.lock().unwrap()) {
                    self.kernel.lock().unwrap().foreign_seen = true;
                    self.kernel_cv.notify_all();
                }
            }
            match r {
                Run::Exit if quiesces && !quiesced => {
                    // Handling the MMIO exit changes the layout: quiesce between two `run`s.
                    quiesced = true;
                    self.quiesce(me);
                    self.hold();
                    self.quiesce(me);
                    self.resume();
                    self.release();
                    self.resume();
                }
                Run::Exit | Run::Eintr => {}
            }
        }
    }

    /// Another component asks vCPU 0's run loop for something, then waits until it is seen.
    /// Its signal handler sets `immediate_exit` on the vCPU thread whenever the signal arrives:
    /// in user space at once, in the guest after forcing it out (modelled as one step here, the
    /// store made by this thread at any point of the vCPU thread's user-space code).
    fn foreign_kick(&self) {
        *self.foreign_queue.lock().unwrap() = true;
        {
            let mut k = self.kernel.lock().unwrap();
            self.entries[0].immediate_exit.store(1, SeqCst);
            if k.cpus[0].in_guest {
                k.cpus[0].signal = true;
                self.kernel_cv.notify_all();
            }
            while !k.foreign_seen {
                k = self.kernel_cv.wait(k).unwrap();
            }
        }
    }

    /// After the last resume every vCPU gets back into the guest; then the guest shuts down.
    fn finish(&self) {
        let mut k = self.kernel.lock().unwrap();
        while k.cpus.iter().any(|c| !c.in_guest) {
            k = self.kernel_cv.wait(k).unwrap();
        }
        self.stop.store(true, SeqCst);
        k.stop = true;
        self.kernel_cv.notify_all();
    }
}

fn check(sc: Scenario, mutation: Mutation) {
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(2);
    }
    builder.check(move || {
        let m = Arc::new(Model::new(sc, mutation));
        let vcpus: Vec<_> = (0..sc.vcpus)
            .map(|i| {
                let m = m.clone();
                loom::thread::spawn(move || m.vcpu_loop(i, 1 + i, i == 0 && sc.vcpu0_quiesces))
            })
            .collect();
        let second = sc.second_quiescer.then(|| {
            let m = m.clone();
            loom::thread::spawn(move || m.quiesce_round(SECOND_QUIESCER))
        });
        let foreign = sc.foreign.then(|| {
            let m = m.clone();
            loom::thread::spawn(move || m.foreign_kick())
        });
        for _ in 0..sc.main_quiesces {
            m.quiesce_round(MAIN);
        }
        for t in second.into_iter().chain(foreign) {
            t.join().unwrap();
        }
        m.finish();
        for t in vcpus {
            t.join().unwrap();
        }
        if sc.foreign && sc.main_quiesces == 0 && !sc.second_quiescer {
            // `kicked` stayed false: vCPU 0's thread never kicks itself.
            assert_eq!(m.entries[0].kicks.load(SeqCst), 0);
        }
    });
}

/// One vCPU (one MMIO exit, then running), quiesced twice by the main thread.
const EXTERNAL: Scenario = Scenario {
    vcpus: 1,
    vcpu0_quiesces: false,
    main_quiesces: 2,
    second_quiescer: false,
    foreign: false,
};

/// The vCPU thread quiesces while it handles its MMIO exit, as the main thread quiesces too.
const VCPU_AND_MAIN: Scenario = Scenario {
    vcpus: 1,
    vcpu0_quiesces: true,
    main_quiesces: 1,
    second_quiescer: false,
    foreign: false,
};

/// vCPU 0's thread quiesces between its runs while vCPU 1 runs the guest.
const VCPU_QUIESCES_OTHER: Scenario = Scenario {
    vcpus: 2,
    vcpu0_quiesces: true,
    main_quiesces: 0,
    second_quiescer: false,
    foreign: false,
};

/// Two threads quiesce one running vCPU at once.
const TWO_QUIESCERS: Scenario = Scenario {
    vcpus: 1,
    vcpu0_quiesces: false,
    main_quiesces: 1,
    second_quiescer: true,
    foreign: false,
};

/// Another component kicks vCPU 0 its own way while the gate runs (no gate kick: the only
/// quiescer is vCPU 0's own thread, which never kicks itself, so `kicked` stays false).
const FOREIGN: Scenario = Scenario {
    vcpus: 1,
    vcpu0_quiesces: true,
    main_quiesces: 0,
    second_quiescer: false,
    foreign: true,
};

#[test]
fn quiesce_holds_out_a_running_vcpu() {
    check(EXTERNAL, Mutation::None);
}

#[test]
fn vcpu_thread_quiesces_between_runs_while_main_quiesces() {
    check(VCPU_AND_MAIN, Mutation::None);
}

#[test]
fn vcpu_thread_quiesces_while_another_vcpu_runs() {
    check(VCPU_QUIESCES_OTHER, Mutation::None);
}

#[test]
fn second_quiescer_waits_for_the_first() {
    check(TWO_QUIESCERS, Mutation::None);
}

#[test]
fn foreign_immediate_exit_is_left_alone() {
    check(FOREIGN, Mutation::None);
}

/// A known race, not a mutation: a gate kick and another component's handler on one vCPU. After a
/// gate kick, `kicked` is still set when the vCPU comes back to `run`; if the other component's
/// signal arrives in user space between `kicked.swap` and the gate's `immediate_exit = 0`, its
/// handler's `immediate_exit = 1` is cleared, its signal is gone, and the vCPU runs the guest with
/// the request queued until some other exit (here: never, so a deadlock).
const FOREIGN_AND_GATE: Scenario = Scenario {
    vcpus: 1,
    vcpu0_quiesces: false,
    main_quiesces: 1,
    second_quiescer: false,
    foreign: true,
};

/// The mutations, the scenario that exposes each, and how it fails (`Mutation::None` is the known
/// race of [`FOREIGN_AND_GATE`]).
const MUTANTS: [(Mutation, Scenario, &str); 7] = [
    (
        Mutation::QuiescerReadsInRunFirst,
        EXTERNAL,
        "while a quiesce holds",
    ),
    (
        Mutation::VcpuChecksInhibitedFirst,
        EXTERNAL,
        "while a quiesce holds",
    ),
    (Mutation::KickOnlySignals, EXTERNAL, "deadlock"),
    (Mutation::InsideDoesNotNotify, VCPU_AND_MAIN, "deadlock"),
    (
        Mutation::NeverClearImmediateExit,
        EXTERNAL,
        "immediate_exit survived",
    ),
    (Mutation::AlwaysClearImmediateExit, FOREIGN, "deadlock"),
    (Mutation::None, FOREIGN_AND_GATE, "deadlock"),
];

const MUTANT_ENV: &str = "KVM_GATE_LOOM_MUTANT";

/// Runs one mutant in a child process (this test binary, test `mutant`) and checks that it fails
/// with the expected message. A child, because loom reports a deadlock by panicking in the thread
/// that blocked last, inside a condvar wait: unwinding drops a loom `MutexGuard`, which panics
/// again and aborts the process, so `#[should_panic]` cannot catch it.
fn mutant_fails(mutation: Mutation) {
    let (_, _, expected) = MUTANTS.iter().find(|(m, ..)| *m == mutation).unwrap();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "mutant", "--nocapture", "--test-threads=1"])
        .env(MUTANT_ENV, format!("{mutation:?}"))
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "mutant {mutation:?} passed:\n{text}");
    let Some(line) = text.lines().find(|l| l.contains(expected)) else {
        panic!("mutant {mutation:?} failed, but not with {expected:?}:\n{text}");
    };
    eprintln!("mutant {mutation:?} failed as expected: {line}");
}

/// The child side of [`mutant_fails`]; does nothing in a normal run.
#[test]
fn mutant() {
    let Ok(name) = std::env::var(MUTANT_ENV) else {
        return;
    };
    let (_, sc, mutation) = MUTANTS
        .iter()
        .map(|(m, sc, _)| (format!("{m:?}"), *sc, *m))
        .find(|(n, ..)| *n == name)
        .expect("unknown mutant");
    check(sc, mutation);
}

#[test]
fn quiescer_reading_in_run_first_lets_a_vcpu_in() {
    mutant_fails(Mutation::QuiescerReadsInRunFirst);
}

#[test]
fn vcpu_checking_inhibited_first_gets_in() {
    mutant_fails(Mutation::VcpuChecksInhibitedFirst);
}

#[test]
fn kick_without_immediate_exit_is_lost() {
    mutant_fails(Mutation::KickOnlySignals);
}

#[test]
fn leaving_without_notifying_blocks_the_quiescer() {
    mutant_fails(Mutation::InsideDoesNotNotify);
}

#[test]
fn never_clearing_immediate_exit_spins() {
    mutant_fails(Mutation::NeverClearImmediateExit);
}

#[test]
fn clearing_immediate_exit_without_kicked_loses_a_foreign_request() {
    mutant_fails(Mutation::AlwaysClearImmediateExit);
}

/// Pins the known race of [`FOREIGN_AND_GATE`]: when it is fixed, this test fails; drop it then
/// and make the scenario a passing test.
#[test]
fn known_race_gate_clear_can_eat_a_foreign_immediate_exit() {
    mutant_fails(Mutation::None);
}
