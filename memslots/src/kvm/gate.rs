//! The vCPU gate: an inhibitor of `KVM_RUN`, held only while slot calls could open a hole.
//!
//! Trade-off first: a vCPU counts as stopped whenever it is not inside `KVM_RUN` (QEMU's
//! `accel-blocker` rule). A quiesce stops new entries, kicks only the vCPUs inside `KVM_RUN` and
//! waits only for them. So it can be called from any thread, a vCPU thread in the middle of
//! handling its exit included (where real layout changes start: a PAM, BAR or hot-plug register
//! write), and a vCPU busy in device emulation delays nobody. The price: a vCPU may still be
//! emulating an exit it took under the old layout while the new one is applied; that is the same
//! as the change landing just after that exit, which the guest cannot tell apart.
//!
//! No `KVM_RUN` result is thrown away: nothing is "completed" before a vCPU is held out. A pending
//! MMIO or PIO exit completes on the vCPU's next entry, after the quiesce, under the new layout;
//! KVM's API ties the completing entry to saving vCPU state, not to slot changes (DESIGN.md).
//!
//! The kick is the VMM's choice ([`Kick`]): the library's [`SignalKick`] on a signal the VMM
//! names, or the VMM's own. The gate keeps its own mapping of each vCPU's `kvm_run` page, so
//! `immediate_exit` is written from the kicking thread (never from a signal handler) into memory
//! the gate owns, whatever the VMM does with its `VcpuFd`.
//!
//! Why no kick is lost: a vCPU stores `in_run` before it checks `inhibited`; a quiescer stores
//! `inhibited` before it reads `in_run` (all SeqCst). Either the vCPU sees the inhibitor and backs
//! off, or the quiescer sees the vCPU and kicks it: `immediate_exit = 1` makes a `KVM_RUN` that
//! has not started return at once, and the signal interrupts one that has. A vCPU leaving
//! `KVM_RUN` during a quiesce takes the gate's lock, which the quiescer holds while it kicks: a
//! thread is never signalled after it has left, so a thread id is never stale.

use std::fmt;
use std::os::fd::AsRawFd;
use std::os::raw::c_int;
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicBool, AtomicI32, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

/// How long a quiescer waits for a kicked vCPU before kicking it again (a kick that only signals
/// can land just before `KVM_RUN` starts; Cloud Hypervisor re-sends too).
const REKICK: Duration = Duration::from_millis(2);

/// Offset of `immediate_exit` in `struct kvm_run`.
const IMMEDIATE_EXIT: usize = std::mem::offset_of!(kvm_bindings::kvm_run, immediate_exit);

/// Makes a vCPU leave `KVM_RUN`: what a VMM implements to kick its vCPUs its own way.
///
/// The gate calls it with its lock held, only for a vCPU that is inside `KVM_RUN` or about to
/// enter it, and again every few milliseconds while that vCPU stays inside. It must not block
/// and must not call back into the gate.
pub trait Kick: Send + Sync + fmt::Debug {
    /// Kicks `vcpu` out of `KVM_RUN` (or stops it from entering).
    fn kick(&self, vcpu: &KickTarget<'_>);
}

/// The vCPU a [`Kick`] is asked to kick.
#[derive(Debug)]
pub struct KickTarget<'a> {
    entry: &'a Entry,
}

impl KickTarget<'_> {
    /// The index the VMM registered the vCPU with.
    pub fn index(&self) -> usize {
        self.entry.index
    }

    /// The kernel thread id of the thread running the vCPU (for `tgkill`).
    pub fn tid(&self) -> libc::pid_t {
        self.entry.tid.load(Ordering::SeqCst)
    }

    /// Sets the vCPU's `immediate_exit`, so that a `KVM_RUN` not yet started returns `EINTR` at
    /// once. The gate clears it again before the vCPU's next entry, and only after such a kick: a
    /// value some other component set is left alone, except one set in the instant between the
    /// gate's check and its clear (DESIGN.md, "The kick is the VMM's"). A VMM whose own signal
    /// handler sets `immediate_exit` should therefore kick with its own [`Kick`] that does not
    /// call this.
    pub fn set_immediate_exit(&self) {
        self.entry.immediate_exit().store(1, Ordering::SeqCst);
        self.entry.kicked.store(true, Ordering::SeqCst);
    }
}

/// Why a kick could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum KickError {
    /// Not a real-time signal.
    #[error("signal {0} is not a real-time signal (SIGRTMIN..=SIGRTMAX)")]
    NotRealTime(c_int),
    /// The VMM (or another library) has a handler on the signal: it is not replaced.
    #[error(
        "signal {0} already has a handler that memslots did not install; name another signal, or \
         use SignalKick::with_installed_handler to kick with that handler"
    )]
    HandlerInstalled(c_int),
    /// The signal is ignored: it would never interrupt `KVM_RUN`.
    #[error("signal {0} is ignored (SIG_IGN): it cannot interrupt KVM_RUN")]
    Ignored(c_int),
    /// `with_installed_handler` on a signal with no handler.
    #[error("signal {0} has no handler installed (it would kill the process)")]
    NoHandler(c_int),
    /// `sigaction` failed.
    #[error("sigaction({0})")]
    Sigaction(c_int, #[source] std::io::Error),
}

extern "C" fn on_kick(_: c_int) {
    // Nothing to do: the kicker set `immediate_exit` before signalling; the signal only has to
    // interrupt `KVM_RUN`, which any handler does.
}

/// Serializes looking at and installing handlers, so two gates cannot both see `SIG_DFL`.
static HANDLERS: Mutex<()> = Mutex::new(());

fn disposition(signal: c_int) -> Result<libc::sighandler_t, KickError> {
    // SAFETY: a zeroed sigaction is a valid out-parameter; a null new action only reads.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: `old` is a valid, writable sigaction; the new action is null.
    if unsafe { libc::sigaction(signal, std::ptr::null(), &mut old) } != 0 {
        return Err(KickError::Sigaction(
            signal,
            std::io::Error::last_os_error(),
        ));
    }
    Ok(old.sa_sigaction)
}

fn check_real_time(signal: c_int) -> Result<(), KickError> {
    if (libc::SIGRTMIN()..=libc::SIGRTMAX()).contains(&signal) {
        Ok(())
    } else {
        Err(KickError::NotRealTime(signal))
    }
}

/// The library's kick: `immediate_exit` set, a fence, then `tgkill` with a real-time signal the
/// VMM names.
#[derive(Clone, Copy, Debug)]
pub struct SignalKick {
    signal: c_int,
}

impl SignalKick {
    /// Kicks with `signal`, installing memslots' (empty) handler on it. Refuses a signal that has
    /// a handler memslots did not install, or that is ignored: nothing is replaced.
    pub fn new(signal: c_int) -> Result<Self, KickError> {
        check_real_time(signal)?;
        let _guard = HANDLERS.lock().unwrap_or_else(|p| p.into_inner());
        let ours = on_kick as extern "C" fn(c_int) as libc::sighandler_t;
        match disposition(signal)? {
            d if d == ours => {}
            libc::SIG_DFL => {
                // SAFETY: a zeroed sigaction with an empty mask is valid; the handler is an
                // async-signal-safe function that does nothing.
                let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
                act.sa_sigaction = ours;
                // SAFETY: `act.sa_mask` is a valid sigset to initialise.
                unsafe { libc::sigemptyset(&mut act.sa_mask) };
                // SAFETY: `act` is a valid action; the old one is not asked for.
                if unsafe { libc::sigaction(signal, &act, std::ptr::null_mut()) } != 0 {
                    return Err(KickError::Sigaction(
                        signal,
                        std::io::Error::last_os_error(),
                    ));
                }
            }
            libc::SIG_IGN => return Err(KickError::Ignored(signal)),
            _ => return Err(KickError::HandlerInstalled(signal)),
        }
        Ok(SignalKick { signal })
    }

    /// Kicks with `signal` through the handler the VMM already has on it (Firecracker and Cloud
    /// Hypervisor have one on `SIGRTMIN`): any handler interrupts `KVM_RUN`. Nothing is installed.
    pub fn with_installed_handler(signal: c_int) -> Result<Self, KickError> {
        check_real_time(signal)?;
        match disposition(signal)? {
            libc::SIG_DFL => Err(KickError::NoHandler(signal)),
            libc::SIG_IGN => Err(KickError::Ignored(signal)),
            _ => Ok(SignalKick { signal }),
        }
    }

    /// The signal.
    pub fn signal(&self) -> c_int {
        self.signal
    }
}

impl Kick for SignalKick {
    fn kick(&self, vcpu: &KickTarget<'_>) {
        vcpu.set_immediate_exit();
        // The store above must be visible before the signal makes the vCPU look.
        fence(Ordering::SeqCst);
        // SAFETY: plain syscall; the gate guarantees the thread is alive (it cannot leave
        // `KVM_RUN` past the gate's lock, which is held during kicks). A failure (the thread
        // already gone) is harmless.
        unsafe {
            libc::syscall(
                libc::SYS_tgkill,
                libc::getpid(),
                vcpu.tid(),
                self.signal as libc::c_long,
            )
        };
    }
}

/// The gate's own mapping of a vCPU's `kvm_run` page.
struct RunPage(NonNull<u8>);

// SAFETY: the page is only accessed through atomics (`immediate_exit`), from any thread.
unsafe impl Send for RunPage {}
// SAFETY: as above.
unsafe impl Sync for RunPage {}

impl RunPage {
    fn map(vcpu: &kvm_ioctls::VcpuFd) -> std::io::Result<Self> {
        // SAFETY: maps the first page of a vCPU fd (`struct kvm_run`) shared; the kernel keeps
        // the vCPU alive while the mapping exists, whatever happens to `vcpu`.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                page_size(),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(RunPage(
            NonNull::new(p.cast()).expect("mmap never returns null on success"),
        ))
    }
}

impl Drop for RunPage {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by `map` with this size and nothing refers to it anymore
        // (it lives in an `Entry`, dropped with its last reference).
        unsafe { libc::munmap(self.0.as_ptr().cast(), page_size()) };
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).unwrap_or(4096)
}

/// This thread's kernel id, cached.
fn current_tid() -> libc::pid_t {
    thread_local! {
        static TID: std::cell::Cell<libc::pid_t> = const { std::cell::Cell::new(0) };
    }
    TID.with(|t| {
        if t.get() == 0 {
            // SAFETY: gettid has no preconditions.
            t.set(unsafe { libc::syscall(libc::SYS_gettid) } as libc::pid_t);
        }
        t.get()
    })
}

/// One registered vCPU.
struct Entry {
    index: usize,
    /// The thread that last entered `KVM_RUN` through the ticket.
    tid: AtomicI32,
    /// Inside `KVM_RUN` (or about to enter it).
    in_run: AtomicBool,
    /// The gate's kick set `immediate_exit`; cleared (with it) before the next entry.
    kicked: AtomicBool,
    run: RunPage,
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entry")
            .field("index", &self.index)
            .field("tid", &self.tid)
            .field("in_run", &self.in_run)
            .finish_non_exhaustive()
    }
}

impl Entry {
    fn immediate_exit(&self) -> &AtomicU8 {
        // SAFETY: the byte lies inside the page this entry maps for as long as it lives;
        // `AtomicU8` has the layout of `u8` and any alignment works. The kernel only reads it at
        // `KVM_RUN` entry; every access from this process goes through this atomic (kvm-ioctls'
        // own mapping of the page is a different address, never used by the gate).
        unsafe { AtomicU8::from_ptr(self.run.0.as_ptr().add(IMMEDIATE_EXIT)) }
    }
}

#[derive(Debug, Default)]
struct State {
    entries: Vec<Arc<Entry>>,
    /// The thread holding the vCPUs out, and how many nested quiesces it made.
    holder: Option<ThreadId>,
    depth: usize,
}

/// Holds vCPUs out of `KVM_RUN` (see the module documentation).
pub struct VcpuGate {
    inhibited: AtomicBool,
    state: Mutex<State>,
    /// A vCPU left `KVM_RUN` during a quiesce.
    left: Condvar,
    /// A quiesce ended: vCPUs may enter, another quiescer may start.
    released: Condvar,
    kick: Box<dyn Kick>,
}

impl fmt::Debug for VcpuGate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VcpuGate")
            .field("inhibited", &self.inhibited)
            .field("kick", &self.kick)
            .finish_non_exhaustive()
    }
}

/// Times of one quiesce.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QuiesceTimes {
    /// From the start of the quiesce to no vCPU inside `KVM_RUN`.
    pub kick_to_parked: Duration,
    /// From the start of the quiesce to the resume: how long entries were held out.
    pub blackout: Duration,
}

impl VcpuGate {
    /// A gate whose vCPUs are kicked by `kick`.
    pub fn new(kick: impl Kick + 'static) -> Self {
        VcpuGate {
            inhibited: AtomicBool::new(false),
            state: Mutex::new(State::default()),
            left: Condvar::new(),
            released: Condvar::new(),
            kick: Box::new(kick),
        }
    }

    /// A gate kicking with the library's handler on `signal` (see [`SignalKick::new`]).
    pub fn with_signal(signal: c_int) -> Result<Self, KickError> {
        Ok(VcpuGate::new(SignalKick::new(signal)?))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers `vcpu` as vCPU `index` (the number the VMM's [`Kick`] is given). Its thread
    /// enters `KVM_RUN` through the returned ticket; dropping the ticket unregisters it.
    pub fn register(
        self: &Arc<Self>,
        index: usize,
        vcpu: &kvm_ioctls::VcpuFd,
    ) -> std::io::Result<VcpuTicket> {
        let entry = Arc::new(Entry {
            index,
            tid: AtomicI32::new(0),
            in_run: AtomicBool::new(false),
            kicked: AtomicBool::new(false),
            run: RunPage::map(vcpu)?,
        });
        self.lock().entries.push(entry.clone());
        Ok(VcpuTicket {
            gate: self.clone(),
            entry,
        })
    }

    /// Stops new `KVM_RUN` entries, kicks every vCPU inside one and waits until none is. Callable
    /// from any thread, a vCPU thread handling an exit included; a second caller waits for the
    /// first to resume; a nested call from the holding thread returns at once.
    pub fn quiesce(&self) -> Quiesced<'_> {
        let start = Instant::now();
        let me = std::thread::current().id();
        let mut s = self.lock();
        if s.holder == Some(me) {
            s.depth += 1;
            return Quiesced::new(self, start);
        }
        while s.holder.is_some() {
            s = self.released.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.holder = Some(me);
        s.depth = 1;
        self.inhibited.store(true, Ordering::SeqCst);
        let tid = current_tid();
        let mut kick = true;
        loop {
            let mut inside = false;
            for e in &s.entries {
                // A vCPU thread calling this from its own run closure is not inside KVM_RUN.
                if e.in_run.load(Ordering::SeqCst) && e.tid.load(Ordering::SeqCst) != tid {
                    inside = true;
                    if kick {
                        self.kick.kick(&KickTarget { entry: e });
                    }
                }
            }
            if !inside {
                break;
            }
            let (next, timeout) = self
                .left
                .wait_timeout(s, REKICK)
                .unwrap_or_else(|p| p.into_inner());
            s = next;
            kick = timeout.timed_out();
        }
        drop(s);
        Quiesced::new(self, start)
    }

    fn resume(&self) {
        let mut s = self.lock();
        s.depth -= 1;
        if s.depth == 0 {
            s.holder = None;
            self.inhibited.store(false, Ordering::SeqCst);
            self.released.notify_all();
        }
    }

    /// Number of registered vCPUs.
    pub fn vcpus(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether a quiesce holds entries out now.
    pub fn is_inhibited(&self) -> bool {
        self.inhibited.load(Ordering::SeqCst)
    }
}

/// A vCPU's pass through the gate: its thread calls [`VcpuTicket::run`] around each `KVM_RUN`.
/// Dropping it unregisters the vCPU; forgetting it leaves a vCPU that never counts as inside.
#[derive(Debug)]
pub struct VcpuTicket {
    gate: Arc<VcpuGate>,
    entry: Arc<Entry>,
}

impl VcpuTicket {
    /// Runs `enter` (the VMM's `KVM_RUN`) as a vCPU inside the gate: waits first while a quiesce
    /// holds entries out, clears the `immediate_exit` a gate kick set, and counts the vCPU inside
    /// until `enter` returns (or unwinds). `enter` may return `EINTR` when kicked.
    ///
    /// # Panics
    ///
    /// When called by the thread that holds a quiesce (it would wait for itself forever).
    pub fn run<R>(&mut self, enter: impl FnOnce() -> R) -> R {
        let (gate, e) = (&*self.gate, &*self.entry);
        e.tid.store(current_tid(), Ordering::SeqCst);
        loop {
            if e.kicked.swap(false, Ordering::SeqCst) {
                e.immediate_exit().store(0, Ordering::SeqCst);
            }
            e.in_run.store(true, Ordering::SeqCst);
            if !gate.inhibited.load(Ordering::SeqCst) {
                break;
            }
            e.in_run.store(false, Ordering::SeqCst);
            let mut s = gate.lock();
            gate.left.notify_all();
            assert!(
                s.holder != Some(std::thread::current().id()),
                "VcpuTicket::run called by the thread holding a quiesce: it would wait for itself"
            );
            while gate.inhibited.load(Ordering::SeqCst) {
                s = gate.released.wait(s).unwrap_or_else(|p| p.into_inner());
            }
        }
        let _inside = Inside(gate, e);
        enter()
    }

    /// The index this vCPU was registered with.
    pub fn index(&self) -> usize {
        self.entry.index
    }

    /// The gate.
    pub fn gate(&self) -> &Arc<VcpuGate> {
        &self.gate
    }
}

/// Counts a vCPU out of `KVM_RUN` when dropped, even on unwind.
struct Inside<'a>(&'a VcpuGate, &'a Entry);

impl Drop for Inside<'_> {
    fn drop(&mut self) {
        self.1.in_run.store(false, Ordering::SeqCst);
        if self.0.inhibited.load(Ordering::SeqCst) {
            // Taking the lock also waits out a kick in progress (see the module documentation).
            let _s = self.0.lock();
            self.0.left.notify_all();
        }
    }
}

impl Drop for VcpuTicket {
    fn drop(&mut self) {
        let mut s = self.gate.lock();
        s.entries.retain(|e| !Arc::ptr_eq(e, &self.entry));
    }
}

/// Entries are held out while this lives; dropping it (or [`Quiesced::resume`]) lets them in.
#[derive(Debug)]
pub struct Quiesced<'a> {
    gate: &'a VcpuGate,
    start: Instant,
    parked: Duration,
    done: bool,
}

impl<'a> Quiesced<'a> {
    fn new(gate: &'a VcpuGate, start: Instant) -> Self {
        Quiesced {
            gate,
            start,
            parked: start.elapsed(),
            done: false,
        }
    }

    /// Lets the vCPUs in again and says how long they were held out.
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

/// A vCPU and its ticket on the thread that runs it: the reference run loop step, optional.
#[derive(Debug)]
pub struct GateVcpu {
    ticket: VcpuTicket,
    vcpu: kvm_ioctls::VcpuFd,
    ring: Option<Arc<super::DirtyRing>>,
}

impl GateVcpu {
    /// Registers `vcpu` with `gate` as vCPU `index`.
    pub fn new(
        gate: &Arc<VcpuGate>,
        index: usize,
        vcpu: kvm_ioctls::VcpuFd,
    ) -> std::io::Result<Self> {
        Ok(GateVcpu {
            ticket: gate.register(index, &vcpu)?,
            vcpu,
            ring: None,
        })
    }

    /// Handles `KVM_EXIT_DIRTY_RING_FULL` in [`GateVcpu::run`] by reaping `ring` before the vCPU
    /// enters again. A VMM with its own loop does the same: on that exit
    /// ([`EXIT_DIRTY_RING_FULL`](super::EXIT_DIRTY_RING_FULL), `VcpuExit::Unsupported` in
    /// kvm-ioctls) it calls [`DirtyRing::reap`](super::DirtyRing::reap) before re-entering.
    pub fn set_dirty_ring(&mut self, ring: Arc<super::DirtyRing>) {
        self.ring = Some(ring);
    }

    /// The vCPU, for register access between runs.
    pub fn vcpu(&self) -> &kvm_ioctls::VcpuFd {
        &self.vcpu
    }

    /// The vCPU, mutably. Safe to hand out: the gate kicks through its own mapping of
    /// `kvm_run`, so replacing or dropping this fd cannot leave the kick writing freed memory.
    pub fn vcpu_mut(&mut self) -> &mut kvm_ioctls::VcpuFd {
        &mut self.vcpu
    }

    /// One `KVM_RUN` through the gate. `Ok(None)`: interrupted by a kick, or a full dirty ring
    /// reaped (call again; it waits while a quiesce holds); `Ok(Some(exit))`: an exit for the VMM to handle before the next
    /// call (KVM completes an MMIO/PIO exit on that next entry).
    pub fn run(&mut self) -> Result<Option<kvm_ioctls::VcpuExit<'_>>, kvm_ioctls::Error> {
        let vcpu = &mut self.vcpu;
        match self.ticket.run(move || vcpu.run()) {
            Ok(kvm_ioctls::VcpuExit::Unsupported(super::EXIT_DIRTY_RING_FULL))
                if self.ring.is_some() =>
            {
                let ring = self.ring.as_ref().expect("checked");
                ring.reap().map_err(kvm_ioctls::Error::new)?;
                Ok(None)
            }
            Ok(exit) => Ok(Some(exit)),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The vCPU's ticket.
    pub fn ticket(&self) -> &VcpuTicket {
        &self.ticket
    }
}
