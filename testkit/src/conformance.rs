//! The model held against the running kernel, call for call.
//!
//! [`run_random`] sends seeded random slot calls (valid and invalid, every rule exercised) both to
//! a fresh KVM VM and to a [`Layout`], and reports every disagreement in errno or classification.
//! The kernel does not say what kind of change it made, so after each accepted call the slot's
//! state is probed with `KVM_GET_DIRTY_LOG` (absent, logging, or not logging), and calls that
//! re-issue, move, resize or delete existing slots make any drift in the kernel's layout show as a
//! disagreement in errno. [`run_trace`] predicts the result of each call of a QEMU trace.
//!
//! Calls go through both ioctls: `KVM_SET_USER_MEMORY_REGION2` where the kernel has it (about half
//! of the plain calls, nearly all guest_memfd ones) and `KVM_SET_USER_MEMORY_REGION`. Where the VM
//! takes guest_memfd slots, the run creates two guest_memfds (`KVM_CREATE_GUEST_MEMFD`) and tells
//! the model their sizes, so binding rules are judged too; it never binds to an fd the model does
//! not know (that is the kernel's call alone: see [`Rule`]).

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd};

use serde::Serialize;

use crate::trace::Trace;
use memslots::kvm::{KvmError, Vm};
use memslots::model::{
    Change, Ioctl, Layout, Limits, Rule, Slot, SlotCall, SlotFlags, SlotId, PAGE_SIZE,
};

/// What one side said of a call.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize)]
pub struct Verdict {
    /// Whether the call was accepted.
    pub accepted: bool,
    /// The errno of a refusal.
    pub errno: Option<i32>,
    /// The change an accepted call makes (the model's word; `None` where the kernel cannot say).
    pub change: Option<Change>,
    /// The model's rule for a refusal.
    pub rule: Option<&'static str>,
}

impl Verdict {
    fn of_model(result: &Result<Change, Rule>) -> Self {
        match result {
            Ok(change) => Verdict {
                accepted: true,
                errno: None,
                change: Some(*change),
                rule: None,
            },
            Err(rule) => Verdict {
                accepted: false,
                errno: Some(rule.errno()),
                change: None,
                rule: Some(rule.name()),
            },
        }
    }

    fn of_kernel(result: Result<(), i32>) -> Self {
        Verdict {
            accepted: result.is_ok(),
            errno: result.err(),
            change: None,
            rule: None,
        }
    }
}

/// One disagreement between the model and the kernel.
#[derive(Clone, PartialEq, Eq, Debug, Serialize)]
pub struct Mismatch {
    /// Index of the call (0-based).
    pub index: usize,
    /// Trace line of the call, for trace runs.
    pub line: Option<usize>,
    /// The call.
    pub call: SlotCall,
    /// What disagreed: `"result"` (accepted or errno) or `"state"` (the slot's probed state).
    pub what: &'static str,
    /// The model's verdict.
    pub model: Verdict,
    /// The kernel's verdict (for a `"state"` mismatch: of the probe).
    pub kernel: Verdict,
    /// The model's slots in the call's address space before the call.
    pub layout: Vec<Slot>,
}

/// The outcome of a conformance run.
#[derive(Clone, PartialEq, Eq, Debug, Default, Serialize)]
pub struct Report {
    /// Calls made.
    pub calls: u64,
    /// Calls the kernel (or the trace) accepted.
    pub accepted: u64,
    /// Calls the kernel (or the trace) refused.
    pub rejected: u64,
    /// Calls sent with `KVM_SET_USER_MEMORY_REGION2` (in a trace run, which does not record the
    /// ioctl: calls judged as v2 calls, all of them under limits with `user_memory2`).
    pub v2_calls: u64,
    /// Calls with `KVM_MEM_GUEST_MEMFD` in their flags (valid or not).
    pub guest_memfd_calls: u64,
    /// Disagreements.
    pub mismatches: u64,
    /// The first disagreement.
    pub first_mismatch: Option<Mismatch>,
    /// Whether the run stopped early because the kernel accepted a call the model refused, after
    /// which the two layouts can no longer be compared.
    pub diverged: bool,
    /// How many calls the model refused under each rule (by [`Rule::name`]).
    #[serde(skip)]
    pub refused_by_rule: BTreeMap<&'static str, u64>,
    /// How many calls the model classified as each change.
    #[serde(skip)]
    pub changes: BTreeMap<Change, u64>,
    /// Calls whose last guest frame is within one of the maximum guest frame (either side), and
    /// how many of them the kernel accepted: the max-GFN rule's boundary.
    #[serde(skip)]
    pub at_max_gfn: (u64, u64),
    /// guest_memfd slots the kernel (or the trace) created.
    #[serde(skip)]
    pub guest_memfd_slots: u64,
    /// Why the random run could not bind guest_memfd slots on this VM, when it could not.
    #[serde(skip)]
    pub guest_memfd_unavailable: Option<String>,
}

/// Errors that stop a conformance run before it starts.
#[derive(Debug, thiserror::Error)]
pub enum ConformanceError {
    /// No VM could be had.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// The host memory pool could not be mapped.
    #[error("cannot map {size} bytes of host memory for the slots")]
    Pool {
        /// Bytes asked for.
        size: usize,
        /// The cause.
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
}

/// A deliberate change to the model's verdict, to show that the checker catches a wrong rule.
pub type ModelPatch = fn(&Layout, &SlotCall, Result<Change, Rule>) -> Result<Change, Rule>;

/// Options of a random run.
#[derive(Clone, Copy, Debug)]
pub struct RandomRun {
    /// Number of calls.
    pub ops: u64,
    /// Seed of the call generator.
    pub seed: u64,
    /// Limits the model uses instead of the kernel's (to show a wrong limit is caught).
    pub model_limits: Option<Limits>,
    /// A change to the model's verdicts (to show a wrong rule is caught).
    pub patch: Option<ModelPatch>,
}

impl RandomRun {
    /// `ops` calls from `seed`, with the true model.
    pub fn new(ops: u64, seed: u64) -> Self {
        RandomRun {
            ops,
            seed,
            model_limits: None,
            patch: None,
        }
    }
}

/// SplitMix64: tiny, and its sequences never change with a dependency's version, so a seed
/// printed today reproduces a run tomorrow.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

const POOL_PAGES: u64 = 16 * 1024; // 64 MiB of really mapped host memory
const GPA_PAGES: u64 = 32 * 1024; // slots land in the first 128 MiB of GPA space, so they collide
const IDS: u64 = 24;
/// The guest_memfds' sizes: one roomy, one small enough that random ranges collide and overrun.
/// Their memory is only allocated when faulted, which no vCPU does here.
const GUEST_MEMFD_PAGES: [u64; 2] = [1024, 64];

/// Makes random calls against a layout: valid ones and ones that break each rule.
struct CallGen {
    rng: SplitMix64,
    pool: u64,
    limits: Limits,
    /// The guest_memfds the model knows: (fd, pages).
    guest_memfds: Vec<(u32, u64)>,
}

impl CallGen {
    fn flags(&mut self) -> u32 {
        if !self.guest_memfds.is_empty() && self.rng.below(5) == 0 {
            return SlotFlags::GUEST_MEMFD.bits();
        }
        [0, 0, 1, 2, 3][self.rng.below(5) as usize]
    }

    /// A guest_memfd and an offset in it (now and then past its end). Every call carries one, so
    /// a call that gains `GUEST_MEMFD` later names a file the model knows.
    fn guest_memfd(&mut self) -> (u32, u64) {
        match self.guest_memfds.len() {
            0 => (0, 0),
            n => {
                let (fd, pages) = self.guest_memfds[self.rng.below(n as u64) as usize];
                (fd, self.rng.below(pages + 16) * PAGE_SIZE)
            }
        }
    }

    /// The ioctl a call is sent with: v2 for nearly every guest_memfd call (v1 refuses the flag)
    /// and half the others, v1 for the rest; now and then v2 on a kernel without it.
    fn ioctl(&mut self, call: &SlotCall) -> Ioctl {
        let v2 = if !self.limits.user_memory2 {
            self.rng.below(64) == 0
        } else if call.is_guest_memfd() {
            self.rng.below(8) != 0
        } else {
            self.rng.below(2) == 0
        };
        if v2 {
            Ioctl::V2
        } else {
            Ioctl::V1
        }
    }

    fn space(&mut self) -> u16 {
        u16::from(self.limits.address_spaces > 1 && self.rng.below(6) == 0)
    }

    fn fresh(&mut self) -> SlotCall {
        let pages = if self.rng.below(8) == 0 {
            1 + self.rng.below(POOL_PAGES / 2)
        } else {
            1 + self.rng.below(64)
        };
        let (guest_memfd, guest_memfd_offset) = self.guest_memfd();
        SlotCall {
            slot: SlotId::in_space(self.space(), self.rng.below(IDS) as u16).raw(),
            flags: self.flags(),
            gpa: self.rng.below(GPA_PAGES) * PAGE_SIZE,
            size: pages * PAGE_SIZE,
            host: self.pool + self.rng.below(POOL_PAGES - pages + 1) * PAGE_SIZE,
            guest_memfd,
            guest_memfd_offset,
        }
    }

    /// The next call and the ioctl it goes through.
    fn next(&mut self, layout: &Layout) -> (SlotCall, Ioctl) {
        let mut call = self.pick(layout);
        if self.guest_memfds.is_empty() && self.limits.guest_memfd {
            // The VM takes guest_memfd slots but none could be made: a GUEST_MEMFD call would
            // name an fd the model does not know.
            call.flags &= !SlotFlags::GUEST_MEMFD.bits();
        }
        let ioctl = self.ioctl(&call);
        (call, ioctl)
    }

    fn pick(&mut self, layout: &Layout) -> SlotCall {
        let existing = match layout.len() {
            0 => None,
            n => layout
                .slots()
                .nth(self.rng.below(n as u64) as usize)
                .copied(),
        };
        let pick = self.rng.below(100);
        let Some(slot) = existing.filter(|_| (30..83).contains(&pick)) else {
            return if pick < 83 {
                self.fresh()
            } else {
                self.invalid()
            };
        };
        let page = PAGE_SIZE;
        match pick {
            30..=41 => slot.delete_call(),
            42..=47 => SlotCall {
                slot: SlotId::in_space(self.space(), self.rng.below(IDS) as u16).raw(),
                size: 0,
                ..self.fresh()
            },
            48..=57 => SlotCall {
                gpa: self.rng.below(GPA_PAGES) * page,
                ..slot.set_call()
            },
            // A MOVE to the top of the guest physical space: the last frame lands just below, at
            // or just past the maximum.
            58 | 59 => {
                let last = self.limits.max_gfn - 1 + self.rng.below(3);
                SlotCall {
                    gpa: (last + 1).saturating_mul(page).saturating_sub(slot.size),
                    ..slot.set_call()
                }
            }
            60..=67 => SlotCall {
                flags: slot.flags.bits() ^ SlotFlags::LOG_DIRTY_PAGES.bits(),
                ..slot.set_call()
            },
            // A guest_memfd slot re-issued without GUEST_MEMFD, in place or moved.
            68 | 69 if slot.is_guest_memfd() => SlotCall {
                flags: 0,
                gpa: if pick == 68 {
                    slot.gpa
                } else {
                    self.rng.below(GPA_PAGES) * page
                },
                guest_memfd: 0,
                guest_memfd_offset: 0,
                ..slot.set_call()
            },
            68..=71 => SlotCall {
                flags: slot.flags.bits() ^ SlotFlags::READONLY.bits(),
                ..slot.set_call()
            },
            72..=75 => SlotCall {
                size: if self.rng.below(2) == 0 || slot.size == page {
                    slot.size + page
                } else {
                    slot.size - page
                },
                ..slot.set_call()
            },
            76..=78 => SlotCall {
                host: if slot.host > self.pool {
                    slot.host - page
                } else {
                    slot.host + page
                },
                ..slot.set_call()
            },
            _ => slot.set_call(),
        }
    }

    /// A call that breaks one rule (or sits just inside its boundary).
    fn invalid(&mut self) -> SlotCall {
        let base = self.fresh();
        let l = self.limits;
        let page = PAGE_SIZE;
        let id = SlotId::from_raw(base.slot);
        let memfd = SlotCall {
            flags: SlotFlags::GUEST_MEMFD.bits(),
            ..base
        };
        match self.rng.below(18) {
            0 => SlotCall {
                flags: [4, 8, 0x10, 0x1_0000, 0x8000_0000, 5, 6][self.rng.below(7) as usize],
                ..base
            },
            1 => SlotCall {
                size: base.size + 1 + self.rng.below(page - 1),
                ..base
            },
            2 => SlotCall {
                gpa: base.gpa + 1 + self.rng.below(page - 1),
                ..base
            },
            3 => SlotCall {
                host: base.host + 1 + self.rng.below(page - 1),
                ..base
            },
            // The user-range boundary: just inside, at and past the last accepted end.
            4 => {
                let end = l.user_addr_max & !(page - 1);
                let shift = [0, page, 2 * page][self.rng.below(3) as usize];
                SlotCall {
                    size: page,
                    host: end - 2 * page + shift,
                    ..base
                }
            }
            5 => SlotCall {
                host: [0xffff_8000_0000_0000, !(page - 1), 1 << 47, 1 << 56]
                    [self.rng.below(4) as usize],
                ..base
            },
            6 => SlotCall {
                slot: SlotId::in_space(
                    id.address_space,
                    [l.slots - 1, l.slots, l.slots.saturating_add(1), u16::MAX]
                        [self.rng.below(4) as usize],
                )
                .raw(),
                ..base
            },
            7 => SlotCall {
                slot: SlotId::in_space(l.address_spaces + self.rng.below(2) as u16, id.id).raw(),
                ..base
            },
            8 => SlotCall {
                gpa: u64::MAX - page + 1 - self.rng.below(4) * page,
                size: 8 * page,
                ..base
            },
            9 => SlotCall {
                size: (l.max_pages + 1 + self.rng.below(4)) * page,
                host: page,
                ..base
            },
            10 => SlotCall {
                size: 0,
                slot: SlotId::in_space(id.address_space, l.slots - 1).raw(),
                ..base
            },
            // The top of the guest physical space: a slot whose last frame is just below, at or
            // just past the maximum guest frame (accepted ones stay, so later calls move and
            // delete them too).
            12 | 13 => {
                let pages = 1 + self.rng.below(3);
                let last = l.max_gfn - 1 + self.rng.below(3);
                let gpa = (last + 1 - pages).saturating_mul(page);
                SlotCall {
                    gpa,
                    size: pages * page,
                    ..base
                }
            }
            14 => SlotCall {
                guest_memfd_offset: memfd.guest_memfd_offset + 1 + self.rng.below(page - 1),
                ..memfd
            },
            // The offset's wrap, and offsets the kernel's signed loff_t reads as negative.
            15 => SlotCall {
                guest_memfd_offset: !(page - 1) - self.rng.below(4) * page,
                ..memfd
            },
            16 => SlotCall {
                guest_memfd_offset: (1 << 63) + self.rng.below(4) * page,
                ..memfd
            },
            17 => SlotCall {
                flags: memfd.flags | [1, 2, 3][self.rng.below(3) as usize],
                ..memfd
            },
            _ => SlotCall {
                size: 0,
                host: base.host + 1,
                ..base
            },
        }
    }
}

/// Two guest_memfds of `vm`, or why there are none.
fn guest_memfds(vm: &Vm) -> Result<Vec<(OwnedFd, u64)>, String> {
    if !vm.limits().guest_memfd {
        return Err(if vm.limits().user_memory2 {
            "this VM type has no guest_memfd (KVM_CAP_GUEST_MEMFD is 0 on the VM)".to_owned()
        } else {
            "this kernel has no KVM_SET_USER_MEMORY_REGION2 (KVM_CAP_USER_MEMORY2)".to_owned()
        });
    }
    GUEST_MEMFD_PAGES
        .iter()
        .map(|&pages| {
            vm.create_guest_memfd(pages * PAGE_SIZE)
                .map(|fd| (fd, pages))
                .map_err(|errno| {
                    format!(
                        "KVM_CREATE_GUEST_MEMFD failed: {}",
                        std::io::Error::from_raw_os_error(errno)
                    )
                })
        })
        .collect()
}

/// Runs `run.ops` random calls against a fresh VM and the model.
pub fn run_random(run: RandomRun) -> Result<Report, ConformanceError> {
    let pool_size = (POOL_PAGES * PAGE_SIZE) as usize;
    let pool =
        vm_memory::MmapRegion::<()>::new(pool_size).map_err(|source| ConformanceError::Pool {
            size: pool_size,
            source,
        })?;
    let vm = Vm::new()?;
    let limits = run.model_limits.unwrap_or(*vm.limits());
    let mut layout = Layout::new(limits);
    let mut report = Report::default();
    let files = guest_memfds(&vm).unwrap_or_else(|why| {
        report.guest_memfd_unavailable = Some(why);
        Vec::new()
    });
    let mut known = Vec::new();
    for (fd, pages) in &files {
        let fd = fd.as_raw_fd() as u32;
        layout.add_guest_memfd(fd, pages * PAGE_SIZE);
        known.push((fd, *pages));
    }
    let mut gen = CallGen {
        rng: SplitMix64::new(run.seed),
        pool: pool.as_ptr() as u64,
        limits: *vm.limits(),
        guest_memfds: known,
    };
    for index in 0..run.ops {
        let (call, ioctl) = gen.next(&layout);
        // SAFETY: the pool outlives `vm` and the guest_memfds, which keep the VM alive (all are
        // dropped before it at the end of this function), and no vCPU exists, so slots over host
        // ranges outside the pool (boundary probes) are never touched.
        let kernel = unsafe { vm.set_region_ioctl(&call, ioctl) };
        let step = Step {
            index: index as usize,
            line: None,
            call,
            ioctl,
            kernel,
        };
        if !step.compare(&mut layout, run.patch, &mut report) {
            break;
        }
        if kernel.is_ok() {
            probe_state(&vm, &layout, &step, &mut report);
        }
    }
    drop(vm);
    drop(files);
    drop(pool);
    Ok(report)
}

/// Checks the slot's dirty-logging state as the kernel reports it against the model.
fn probe_state(vm: &Vm, layout: &Layout, step: &Step, report: &mut Report) {
    let id = step.call.id();
    let expect = layout.slot(id).filter(|s| s.flags.log_dirty()).is_some();
    // A generous buffer: KVM copies the whole bitmap of its own slot, whatever size we pass.
    let got = vm.dirty_log(id.raw(), 1 << 30);
    if got.is_ok() != expect {
        let mut model = Verdict::of_kernel(if expect { Ok(()) } else { Err(libc::ENOENT) });
        model.change = layout.slot(id).map(|_| Change::Unchanged);
        record(report, || Mismatch {
            index: step.index,
            line: step.line,
            call: step.call,
            what: "state",
            model,
            kernel: Verdict::of_kernel(got.map(|_| ())),
            layout: space_slots(layout, id.address_space),
        });
    }
}

fn space_slots(layout: &Layout, space: u16) -> Vec<Slot> {
    layout.slots_by_gpa(space).copied().collect()
}

/// Counts a mismatch; only the first is built (it copies the layout).
fn record(report: &mut Report, mismatch: impl FnOnce() -> Mismatch) {
    report.mismatches += 1;
    if report.first_mismatch.is_none() {
        report.first_mismatch = Some(mismatch());
    }
}

/// One call with the kernel's (or the trace's) result.
struct Step {
    index: usize,
    line: Option<usize>,
    call: SlotCall,
    ioctl: Ioctl,
    kernel: Result<(), i32>,
}

impl Step {
    /// Compares the model's verdict with the kernel's, keeps the model in step with the kernel,
    /// and returns whether the run can go on.
    fn compare(&self, layout: &mut Layout, patch: Option<ModelPatch>, report: &mut Report) -> bool {
        report.calls += 1;
        report.v2_calls += u64::from(self.ioctl == Ioctl::V2);
        report.guest_memfd_calls += u64::from(self.call.is_guest_memfd());
        if self.kernel.is_ok() {
            // An accepted GUEST_MEMFD call is a CREATE or a DELETE (the kernel changes no other).
            report.guest_memfd_slots +=
                u64::from(self.call.is_guest_memfd() && !self.call.is_delete());
            report.accepted += 1;
        } else {
            report.rejected += 1;
        }
        let max_gfn = layout.limits().max_gfn;
        let last_gfn = (self.call.gpa.saturating_add(self.call.size.max(1)) - 1) / PAGE_SIZE;
        if self.call.size > 0 && last_gfn.abs_diff(max_gfn) <= 1 {
            report.at_max_gfn.0 += 1;
            report.at_max_gfn.1 += u64::from(self.kernel.is_ok());
        }
        let mut predicted = layout.check_ioctl(&self.call, self.ioctl);
        if let Some(patch) = patch {
            predicted = patch(layout, &self.call, predicted);
        }
        match &predicted {
            Ok(change) => *report.changes.entry(*change).or_default() += 1,
            Err(rule) => *report.refused_by_rule.entry(rule.name()).or_default() += 1,
        }
        let model = Verdict::of_model(&predicted);
        let kernel = Verdict::of_kernel(self.kernel);
        if model.accepted != kernel.accepted || model.errno != kernel.errno {
            // The layout is copied only for the first mismatch (copying it on every call made a
            // trace run cost calls x slots).
            record(report, || Mismatch {
                index: self.index,
                line: self.line,
                call: self.call,
                what: "result",
                model,
                kernel,
                layout: space_slots(layout, self.call.id().address_space),
            });
        }
        if self.kernel.is_ok() {
            // Follow the kernel. If the true rules refuse what the kernel did, the layouts part.
            if layout.apply_ioctl(&self.call, self.ioctl).is_err() {
                report.diverged = true;
                return false;
            }
        }
        true
    }
}

/// Predicts every call of a QEMU trace with the model and compares with the `ret` QEMU recorded.
///
/// Calls the trace says KVM accepted are applied; refused ones are not. No KVM is needed.
pub fn run_trace(trace: &Trace, limits: Limits) -> Report {
    match run_trace_calls(
        trace
            .calls
            .iter()
            .copied()
            .map(Ok::<_, std::convert::Infallible>),
        limits,
    ) {
        Ok(report) => report,
        Err(e) => match e {},
    }
}

/// [`run_trace`] over a stream of trace calls (a file read as it goes, see
/// [`TraceReader`](crate::trace::TraceReader)), in memory that does not grow with the trace; stops
/// at the stream's first error.
pub fn run_trace_calls<E>(
    calls: impl IntoIterator<Item = Result<crate::trace::TraceCall, E>>,
    limits: Limits,
) -> Result<Report, E> {
    let mut layout = Layout::new(limits);
    let mut report = Report::default();
    for (index, tc) in calls.into_iter().enumerate() {
        let tc = tc?;
        let step = Step {
            index,
            line: Some(tc.line),
            call: tc.call,
            // A trace does not say which ioctl QEMU used: judged as a backend here would send it.
            ioctl: limits.ioctl(),
            kernel: tc.result(),
        };
        if !step.compare(&mut layout, None, &mut report) {
            break;
        }
    }
    Ok(report)
}
