//! The stress run behind `memslots stress`: a workload's updates applied to a running test guest
//! with one strategy, every detector counting.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::conformance::SplitMix64;
use memslots::kvm::{ApplyError, SlotUpdater};

use crate::faults::FaultInjector;
use crate::strategy::Strategy;
use crate::testvm::{Probe, TestVm, TestVmConfig};
use crate::workload::{Arena, Workload, WorkloadKind};
use memslots::model::{Layout, SlotCall, PAGE_SIZE};
use memslots::planner::MemoryMap;

/// Where workloads live in guest-physical space (above the test guest's private slot).
pub const ARENA_GPA: u64 = 0x1000_0000;

/// Where each layout change is started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// The guest on vCPU 0 asks for it with a port write; the vCPU thread handling that exit
    /// plans and applies it while the other vCPUs run (as in a VMM).
    Guest,
    /// A separate updater thread plans and applies it.
    Host,
}

impl Trigger {
    /// The name used on the command line and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Trigger::Guest => "guest",
            Trigger::Host => "host",
        }
    }
}

/// What to run.
#[derive(Clone, Copy, Debug)]
pub struct StressConfig {
    /// How updates are applied.
    pub strategy: Strategy,
    /// Where updates are started.
    pub trigger: Trigger,
    /// Which layout changes.
    pub workload: WorkloadKind,
    /// vCPUs running the guest.
    pub vcpus: usize,
    /// Stop after this many applied updates...
    pub updates: Option<u64>,
    /// ...or after this long (whichever comes first; at least one must be set).
    pub duration: Option<Duration>,
    /// Seed of the workload's choices (and of injected faults).
    pub seed: u64,
    /// Probability that a slot ioctl fails on purpose.
    pub inject_faults: Option<f64>,
    /// Keep dirty pages with KVM's dirty ring (bytes per vCPU) instead of bitmaps.
    pub dirty_ring: Option<u32>,
}

/// The dirty ring `--dirty-log ring` asks for: 64 KiB (4,096 entries) per vCPU, small enough
/// that the `dirty` workload fills it and `KVM_EXIT_DIRTY_RING_FULL` is handled too.
pub const DIRTY_RING_BYTES: u32 = 64 << 10;

pub use crate::stats::Micros;
use crate::stats::Samples;

/// The summary `memslots stress` and `memslots replay` print as JSON.
#[derive(Clone, Debug, Serialize)]
pub struct StressReport {
    /// `kvm` or `soft`.
    pub backend: &'static str,
    /// `atomic`, `qemu` or `naive`.
    pub strategy: &'static str,
    /// `guest` (vCPU 0 asks, its thread applies) or `host` (an updater thread).
    pub trigger: &'static str,
    /// The workload (or the trace's file name, for replay).
    pub workload: String,
    /// vCPUs.
    pub vcpus: usize,
    /// Batches applied (rolled-back ones not counted).
    pub updates: u64,
    /// Slot ioctls made.
    pub ioctls: u64,
    /// Guest probe reads, writes and calls.
    pub guest_accesses: u64,
    /// MMIO exits or failed fetches on GPAs that were RAM before and after.
    pub spurious_exits: u64,
    /// `KVM_EXIT_INTERNAL_ERROR` and other exits the guest never causes on purpose.
    pub internal_errors: u64,
    /// Values the guest read other than the last it wrote.
    pub data_errors: u64,
    /// Pages written while dirty logging was on that no harvest reported.
    pub lost_dirty_pages: u64,
    /// Batches that failed (injected faults) and were rolled back.
    pub rollbacks: u64,
    /// Time vCPUs were held out per batch.
    pub blackout_us: Micros,
    /// Wall time per batch.
    pub update_us: Micros,
    /// Replay only: whether every commit ended in the trace's mapping.
    pub layout_matches: Option<bool>,
    /// Replay on KVM only: bytes of guest-physical space under a probe page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probed_bytes: Option<u64>,
    /// Replay on KVM only: bytes QEMU's calls leave unmapped (or mapped elsewhere) between two
    /// calls of one commit, over a pass through the trace and back (address space 0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hole_bytes: Option<u64>,
    /// Replay on KVM only: of `hole_bytes`, the bytes under a probe page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hole_bytes_probed: Option<u64>,
    /// Peak resident memory of the process (KiB) once the guest runs.
    pub rss_kib_start: u64,
    /// Peak resident memory of the process (KiB) at the end: flat on a soak.
    pub rss_kib_end: u64,
    /// Kick-to-all-parked over the quiesced batches (not in the JSON contract).
    #[serde(skip)]
    pub kick_to_parked_us: Micros,
    /// The first problem seen, described (not in the JSON contract).
    #[serde(skip)]
    pub first_problem: Option<String>,
}

impl StressReport {
    /// Whether no detector fired.
    pub fn clean(&self) -> bool {
        self.spurious_exits == 0
            && self.internal_errors == 0
            && self.data_errors == 0
            && self.lost_dirty_pages == 0
    }
}

/// What a run adds up while it applies batches.
struct Tally {
    updates: u64,
    rollbacks: u64,
    blackout: Samples,
    update_us: Samples,
    kick: Samples,
    ioctls_start: u64,
    rss_kib_start: u64,
}

impl Tally {
    fn new(vm: &TestVm) -> Self {
        Tally {
            updates: 0,
            rollbacks: 0,
            blackout: Samples::new(),
            update_us: Samples::new(),
            kick: Samples::new(),
            ioctls_start: vm.ioctls(),
            rss_kib_start: peak_rss_kib(),
        }
    }

    /// One attempt at a batch: applied, or rolled back.
    fn record(&mut self, stats: &memslots::kvm::ApplyStats, applied: bool) {
        if applied {
            self.updates += 1;
        } else {
            self.rollbacks += 1;
        }
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        self.blackout
            .push(stats.quiesce.map_or(0.0, |q| us(q.blackout)));
        if let Some(q) = stats.quiesce {
            self.kick.push(us(q.kick_to_parked));
        }
        self.update_us.push(us(stats.update));
    }

    #[allow(clippy::too_many_arguments)]
    fn report(
        self,
        vm: &TestVm,
        strategy: Strategy,
        trigger: Trigger,
        workload: String,
        vcpus: usize,
        lost_dirty_pages: u64,
        layout_matches: Option<bool>,
    ) -> StressReport {
        let guest = vm.guest_stats();
        StressReport {
            backend: "kvm",
            strategy: strategy.name(),
            trigger: trigger.name(),
            workload,
            vcpus,
            updates: self.updates,
            ioctls: vm.ioctls() - self.ioctls_start,
            guest_accesses: guest.accesses,
            spurious_exits: guest.spurious_exits,
            internal_errors: guest.internal_errors,
            data_errors: guest.data_errors,
            lost_dirty_pages,
            rollbacks: self.rollbacks,
            blackout_us: self.blackout.micros(true),
            update_us: self.update_us.micros(false),
            layout_matches,
            probed_bytes: None,
            hole_bytes: None,
            hole_bytes_probed: None,
            rss_kib_start: self.rss_kib_start,
            rss_kib_end: peak_rss_kib(),
            kick_to_parked_us: self.kick.micros(false),
            first_problem: vm.first_problem(),
        }
    }
}

/// Why a stress run could not run.
#[derive(Debug, thiserror::Error)]
pub enum StressError {
    /// The VM.
    #[error(transparent)]
    Vm(#[from] crate::testvm::TestVmError),
    /// A workload update the model refuses: a bug in the workload.
    #[error("workload update refused")]
    Workload(#[source] memslots::model::PrimitiveError),
    /// A batch failed in a way that could not be undone.
    #[error("applying a batch")]
    Apply(#[source] ApplyError),
    /// The planner refused a change: a bug in the planner.
    #[error("planning a workload update")]
    Plan(#[source] memslots::planner::PlanError),
    /// Neither a count nor a duration.
    #[error("a stress run needs --updates or --duration")]
    Unbounded,
    /// A harvest could not read a dirty bitmap.
    #[error("harvesting dirty pages")]
    DirtyLog(#[source] memslots::kvm::DirtyLogError),
}

/// Why a change run on a vCPU thread failed, before it comes back to the caller.
enum ChangeError {
    Plan(memslots::planner::PlanError),
    Apply(ApplyError),
}

/// Runs `change` as `trigger` says: on vCPU 0's thread when the guest asks, or here.
fn apply_change<R: Send + 'static>(
    vm: &TestVm,
    trigger: Trigger,
    change: impl FnOnce(&mut SlotUpdater) -> R + Send + 'static,
) -> Result<R, crate::testvm::TestVmError> {
    match trigger {
        Trigger::Host => Ok(change(&mut vm.updater())),
        Trigger::Guest => vm.apply_on_vcpu0(change),
    }
}

/// Checks that every page written while logging was on is reported by some harvest.
///
/// A page counts as lost when its content changed since the last harvest, logging covered it at
/// that harvest and at every update since, and this harvest does not report it. Harvests run with
/// the vCPUs parked: with them running, a write landing between reading the bitmaps and reading
/// the contents would look lost, and no ordering of the two reads avoids that without hiding real
/// losses.
#[derive(Debug, Default)]
pub struct DirtyCheck {
    ranges: Vec<(u64, u64)>,
    snapshot: BTreeMap<u64, [u32; 4]>,
    eligible: BTreeSet<u64>,
    /// Pages lost so far.
    pub lost: u64,
    /// Pages reported so far.
    pub reported: u64,
}

impl DirtyCheck {
    /// A check over host `ranges`.
    pub fn new(ranges: Vec<(u64, u64)>) -> Self {
        DirtyCheck {
            ranges,
            ..Default::default()
        }
    }

    /// Pages of the checked ranges that some logging slot covers.
    fn logging(&self, layout: &Layout) -> BTreeSet<u64> {
        let slots: Vec<(u64, u64)> = layout
            .slots()
            .filter(|s| s.flags.log_dirty())
            .map(|s| (s.host, s.host + s.size))
            .collect();
        self.pages()
            .filter(|p| slots.iter().any(|s| (s.0..s.1).contains(p)))
            .collect()
    }

    fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.ranges
            .iter()
            .flat_map(|&(start, end)| (start..end).step_by(PAGE_SIZE as usize))
    }

    /// After an update: only pages logging still covers stay eligible.
    pub fn after_update(&mut self, layout: &Layout) {
        let now = self.logging(layout);
        self.eligible.retain(|p| now.contains(p));
    }

    /// Harvests dirty pages from `vm` and checks them.
    pub fn harvest(&mut self, vm: &mut TestVm) -> Result<(), StressError> {
        if self.ranges.is_empty() {
            return Ok(());
        }
        vm.with_vcpus_parked(|vm| {
            let reported = vm.dirty_pages().map_err(StressError::DirtyLog)?;
            self.reported += reported.len() as u64;
            let arena = vm.arena();
            let pages: Vec<u64> = self.pages().collect();
            for page in pages {
                let now = [0, 4, 8, 12].map(|o| arena.read_u32(page + o));
                let changed = self.snapshot.get(&page).is_some_and(|old| *old != now);
                if changed && self.eligible.contains(&page) && !reported.contains(page) {
                    self.lost += 1;
                }
                self.snapshot.insert(page, now);
            }
            self.eligible = self.logging(&vm.layout());
            Ok(())
        })
    }
}

/// Peak resident set size of this process in KiB (`VmHWM`), 0 where /proc cannot tell.
pub fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Probes for the guest: at most `limit`, spread over `pages`, keeping every `must` page.
fn pick_probes(pages: &[(u64, u64)], limit: usize, must: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let stride = pages
        .len()
        .div_ceil(limit.saturating_sub(must.len()).max(1))
        .max(1);
    let mut out: Vec<(u64, u64)> = pages.iter().step_by(stride).copied().collect();
    for &(s, e) in must {
        for p in pages.iter().filter(|p| p.0 >= s && p.0 < e) {
            if !out.contains(p) {
                out.push(*p);
            }
        }
    }
    out.truncate(limit);
    out
}

/// What one workload update did to the VM.
#[derive(Clone, Copy, Debug)]
pub enum Step {
    /// The batch was applied.
    Applied(memslots::kvm::ApplyStats),
    /// A call failed (an injected fault) and the batch was rolled back whole.
    RolledBack(memslots::kvm::ApplyStats),
}

/// A test VM whose arena a workload keeps changing: what `memslots stress` and `memslots bench`
/// drive.
///
/// The workload changes QEMU-style sections; [`Strategy::Atomic`] plans the VM's own slots toward
/// the same mapping with the planner, the other strategies make the workload's calls as they are
/// (what QEMU's listener issues). Two `WorkloadVm`s made with the same kind and seed get the same
/// updates, whatever their strategies.
pub struct WorkloadVm {
    vm: TestVm,
    workload: Workload,
    sections: Layout,
    arena: Arena,
}

impl std::fmt::Debug for WorkloadVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadVm")
            .field("arena", &self.arena)
            .field("sections", &self.sections)
            .finish_non_exhaustive()
    }
}

impl WorkloadVm {
    /// A VM with `vcpus` vCPUs (not yet running) and the workload's first layout in place.
    pub fn new(kind: WorkloadKind, vcpus: usize, seed: u64) -> Result<Self, StressError> {
        Self::with_dirty_ring(kind, vcpus, seed, None)
    }

    /// [`WorkloadVm::new`], keeping dirty pages with a dirty ring of `ring` bytes per vCPU.
    pub fn with_dirty_ring(
        kind: WorkloadKind,
        vcpus: usize,
        seed: u64,
        ring: Option<u32>,
    ) -> Result<Self, StressError> {
        let mut vm = TestVm::new(TestVmConfig {
            dirty_ring: ring,
            ..TestVmConfig::new(vcpus, kind.arena_size())
        })?;
        let arena = Arena {
            gpa: ARENA_GPA,
            host: vm.arena_host(),
            size: kind.arena_size(),
            address_space: 0,
            first_id: 1,
        };
        let workload = Workload::new(kind, arena, seed);
        let initial: Vec<SlotCall> = workload
            .initial_slots()
            .iter()
            .map(|s| s.set_call())
            .collect();
        vm.apply(&initial, Strategy::Atomic)
            .map_err(StressError::Apply)?;
        let sections = vm.layout().clone();
        Ok(WorkloadVm {
            vm,
            workload,
            sections,
            arena,
        })
    }

    /// Starts the vCPUs on the test guest, probing the workload's pages and executing from its
    /// code range, if it has one.
    pub fn start(&mut self) -> Result<(), StressError> {
        let exec_ranges = self.workload.exec_ranges();
        let probes = pick_probes(
            &self.workload.probe_pages(),
            crate::guest::ctl::MAX_PROBES,
            &exec_ranges,
        );
        // The function lives half-way into the first overlay page, clear of the probes' dwords.
        let exec = exec_ranges.first().map(|&(gpa, _)| {
            (
                gpa + 0x800,
                self.arena.host + (gpa - self.arena.gpa) + 0x800,
            )
        });
        self.vm.start(&probes, exec)?;
        Ok(())
    }

    /// The workload's next update, applied with `strategy`, started as `trigger` says.
    pub fn step(&mut self, strategy: Strategy, trigger: Trigger) -> Result<Step, StressError> {
        let update = self
            .workload
            .next(&mut self.sections)
            .map_err(StressError::Workload)?;
        let mut after = self.sections.clone();
        after
            .apply_batch(update.batch.calls())
            .map_err(|e| StressError::Workload(memslots::model::PrimitiveError::Refused(e)))?;
        let map = MemoryMap::from_layout(&after);
        let given = update.batch.calls().to_vec();
        let change = move |u: &mut SlotUpdater| {
            let calls: Vec<SlotCall> = match strategy {
                Strategy::Atomic => memslots::planner::plan(u.layout(), &map)
                    .map_err(ChangeError::Plan)?
                    .calls
                    .iter()
                    .map(|p| p.call)
                    .collect(),
                _ => given,
            };
            crate::strategy::apply(u, &calls, strategy).map_err(ChangeError::Apply)
        };
        match apply_change(&self.vm, trigger, change)? {
            Ok(stats) => {
                self.sections = after;
                Ok(Step::Applied(stats))
            }
            Err(ChangeError::Apply(ApplyError::RolledBack { stats, .. })) => {
                Ok(Step::RolledBack(*stats))
            }
            Err(ChangeError::Apply(e)) => Err(StressError::Apply(e)),
            Err(ChangeError::Plan(e)) => Err(StressError::Plan(e)),
        }
    }

    /// The VM.
    pub fn vm(&self) -> &TestVm {
        &self.vm
    }

    /// The VM, mutably (to inject faults, harvest dirty logs).
    pub fn vm_mut(&mut self) -> &mut TestVm {
        &mut self.vm
    }

    /// The workload.
    pub fn workload(&self) -> &Workload {
        &self.workload
    }

    /// The VM and the workload, for a caller that starts the vCPUs and drives updates itself.
    pub fn into_parts(self) -> (TestVm, Workload) {
        (self.vm, self.workload)
    }
}

/// Runs `config`; `progress(done, total)` after each update.
pub fn run(
    config: &StressConfig,
    mut progress: impl FnMut(u64, Option<u64>),
) -> Result<StressReport, StressError> {
    if config.updates.is_none() && config.duration.is_none() {
        return Err(StressError::Unbounded);
    }
    let kind = config.workload;
    let mut run = WorkloadVm::with_dirty_ring(kind, config.vcpus, config.seed, config.dirty_ring)?;
    run.start()?;
    if let Some(p) = config.inject_faults {
        run.vm_mut().inject_faults(Some(FaultInjector::Random {
            p,
            rng: SplitMix64::new(config.seed ^ 0xfa17),
        }));
    }
    let mut dirty = DirtyCheck::new(run.workload().dirty_host_ranges());
    dirty.harvest(run.vm_mut())?;

    let started = Instant::now();
    let mut tally = Tally::new(run.vm());
    loop {
        if config.updates.is_some_and(|n| tally.updates >= n)
            || config.duration.is_some_and(|d| started.elapsed() >= d)
        {
            break;
        }
        match run.step(config.strategy, config.trigger)? {
            Step::Applied(stats) => tally.record(&stats, true),
            Step::RolledBack(stats) => tally.record(&stats, false),
        }
        dirty.after_update(&run.vm().layout());
        dirty.harvest(run.vm_mut())?;
        progress(tally.updates, config.updates);
        // Let the guest run over the new layout before the next change.
        std::thread::sleep(Duration::from_micros(200));
    }
    let report = tally.report(
        run.vm(),
        config.strategy,
        config.trigger,
        kind.name().to_owned(),
        config.vcpus,
        dirty.lost,
        None,
    );
    drop(run);
    Ok(report)
}

/// What to replay a trace with.
#[derive(Clone, Copy, Debug)]
pub struct ReplayConfig {
    /// How each commit is applied: the planner's batch for `atomic`, QEMU's own calls otherwise.
    pub strategy: Strategy,
    /// Where each commit is started.
    pub trigger: Trigger,
    /// vCPUs running the guest.
    pub vcpus: usize,
    /// Times through the trace (forward, then back to the first commit's layout).
    pub loops: u64,
    /// Seed of injected faults.
    pub seed: u64,
    /// Probability that a slot ioctl fails on purpose.
    pub inject_faults: Option<f64>,
    /// Keep dirty pages with KVM's dirty ring (bytes per vCPU) instead of bitmaps.
    pub dirty_ring: Option<u32>,
}

/// Why a trace could not be replayed.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The trace's commits could not be rebuilt.
    #[error("rebuilding the trace's commits")]
    Trace(#[from] crate::replay::ReplayError),
    /// The planner refused a commit.
    #[error("planning commit {commit}")]
    Plan {
        /// Commit index.
        commit: usize,
        /// The cause.
        #[source]
        source: memslots::planner::PlanError,
    },
    /// The trace has too little in it.
    #[error("the trace has {0} commits; replay needs at least 2")]
    TooShort(usize),
    /// No 2 MiB below 4 GiB is free in every commit for the test guest.
    #[error("no free 2 MiB window below 4 GiB for the test guest")]
    NoRoom,
    /// The run itself.
    #[error(transparent)]
    Stress(#[from] StressError),
}

/// QEMU's host memory laid out in one arena: each run of QEMU's host ranges keeps its offsets.
struct HostLayout {
    runs: Vec<(u64, u64, u64)>, // (qemu start, qemu end, arena offset)
    size: u64,
}

impl HostLayout {
    fn of(trace: &crate::trace::Trace) -> Self {
        let mut runs = crate::trace::HostRuns::of(trace).runs;
        // Small runs (ROMs, VRAM) first, so the guest's probes reach the re-slotted memory with
        // small cell numbers; RAM last.
        runs.sort_by_key(|r| (r.1 - r.0, r.0));
        let mut offset = 0;
        let runs = runs
            .into_iter()
            .map(|(s, e)| {
                let r = (s, e, offset);
                offset += (e - s).div_ceil(PAGE_SIZE) * PAGE_SIZE;
                r
            })
            .collect();
        HostLayout { runs, size: offset }
    }

    fn to_arena(&self, arena: u64, qemu: u64) -> Option<u64> {
        self.runs
            .iter()
            .find(|r| (r.0..r.1).contains(&qemu))
            .map(|r| arena + r.2 + (qemu - r.0))
    }

    fn to_qemu(&self, arena: u64, ours: u64) -> Option<u64> {
        let off = ours.checked_sub(arena)?;
        self.runs
            .iter()
            .find(|r| (r.2..r.2 + (r.1 - r.0)).contains(&off))
            .map(|r| r.0 + (off - r.2))
    }

    fn call(&self, arena: u64, call: &SlotCall) -> SlotCall {
        SlotCall {
            host: self.to_arena(arena, call.host).unwrap_or(arena),
            ..*call
        }
    }
}

/// How the calls to one commit of a trace are made (owned: they may be planned on a vCPU thread).
enum Commit {
    /// The planner's batch towards this mapping (`atomic`).
    Planned(MemoryMap),
    /// QEMU's accepted calls of the commit.
    Qemu(Vec<SlotCall>),
    /// Back to commit 0: QEMU's listener's calls to its layout after commit 0.
    BackTo(Layout),
}

impl Commit {
    /// The calls from `shadow` (the VM's slots in QEMU's host addresses) to this commit.
    fn calls(&self, shadow: &Layout) -> Result<Vec<SlotCall>, memslots::planner::PlanError> {
        Ok(match self {
            Commit::Planned(target) => memslots::planner::plan(shadow, target)?
                .calls
                .iter()
                .map(|p| p.call)
                .collect(),
            Commit::Qemu(calls) => calls.clone(),
            Commit::BackTo(first) => crate::qemu::batch(shadow, first),
        })
    }
}

/// Sorted, disjoint `[start, end)` ranges covering the same bytes as `ranges`.
fn merged(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.retain(|r| r.0 < r.1);
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (s, e) in ranges {
        match out.last_mut() {
            Some(last) if last.1 >= s => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// Bytes of `[start, end)` inside the sorted, disjoint `ranges`.
fn overlap(ranges: &[(u64, u64)], start: u64, end: u64) -> u64 {
    let first = ranges.partition_point(|r| r.1 <= start);
    ranges[first..]
        .iter()
        .take_while(|r| r.0 < end)
        .map(|r| r.1.min(end) - r.0.max(start))
        .sum()
}

/// What QEMU's own calls do in address space 0 over one pass of a replay: forward through the
/// trace's commits, then its listener's calls back to commit 0 (what `qemu` and `naive` make).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QemuPass {
    /// Ranges some call removes, re-slots or creates: the old and the new slot of every call
    /// (sorted, disjoint).
    pub touched: Vec<(u64, u64)>,
    /// Ranges left unmapped, or mapped elsewhere, between two calls of one commit
    /// ([`Layout::holes`]; sorted, disjoint).
    pub holes: Vec<(u64, u64)>,
}

impl QemuPass {
    /// The pass of QEMU's accepted `calls` per commit, from the empty layout; `first` is the
    /// layout after commit 0.
    fn of(calls: &[Vec<SlotCall>], first: &Layout) -> Self {
        let mut touched = Vec::new();
        let mut holes = Vec::new();
        let mut layout = first.clone();
        let back = |l: &Layout| crate::qemu::batch(l, first);
        let mut batches: Vec<Vec<SlotCall>> = Vec::new();
        for c in calls.iter().skip(1) {
            batches.push(c.clone());
        }
        for i in 0..=batches.len() {
            let batch = if i < batches.len() {
                batches[i].clone()
            } else {
                back(&layout)
            };
            // QEMU's accepted calls, and its listener's way back, are valid on this layout: the
            // replay applies them to the VM from the same one.
            let Ok(report) = layout.holes(&batch) else {
                continue;
            };
            holes.extend(
                report
                    .holes
                    .iter()
                    .filter(|h| h.range.address_space == 0)
                    .map(|h| (h.range.start, h.range.end)),
            );
            let Ok(done) = layout.apply_batch(&batch) else {
                continue;
            };
            for a in &done {
                for s in a.before.iter().chain(a.after.iter()) {
                    if s.id.address_space == 0 {
                        touched.push((s.gpa, s.gpa + s.size));
                    }
                }
            }
        }
        QemuPass {
            touched: merged(touched),
            holes: merged(holes),
        }
    }
}

/// Each commit's address-space-0 mapping, for finding what is behind a GPA across the trace.
struct Mappings(Vec<Vec<(u64, u64, u64)>>);

impl Mappings {
    fn new(targets: &[MemoryMap]) -> Self {
        Mappings(
            targets
                .iter()
                .map(|m| {
                    let mut v: Vec<(u64, u64, u64)> = m
                        .regions()
                        .iter()
                        .filter(|r| r.address_space == 0)
                        .map(|r| (r.gpa, r.end(), r.host))
                        .collect();
                    v.sort_unstable();
                    v
                })
                .collect(),
        )
    }

    /// QEMU's host address behind `gpa` across the commits: `None` when no commit maps it,
    /// `Some(Some(h))` when every commit that maps it maps it to `h`, `Some(None)` when they
    /// differ.
    fn host(&self, gpa: u64) -> Option<Option<u64>> {
        let mut seen: Option<Option<u64>> = None;
        for regions in &self.0 {
            let i = regions.partition_point(|r| r.1 <= gpa);
            if let Some(&(start, _, host)) = regions.get(i).filter(|r| r.0 <= gpa) {
                let h = host + (gpa - start);
                seen = match seen {
                    None => Some(Some(h)),
                    Some(Some(old)) if old == h => Some(Some(h)),
                    Some(_) => Some(None),
                };
            }
        }
        seen
    }
}

/// The replay's probes: every range a hole of QEMU's calls covers gets some (about half the
/// probes, spread in proportion to the bytes), every other range a call touches at least one,
/// then the first MiB (where firmware re-slots) and one page per 2 MiB below 4 GiB, up to
/// [`ctl::MAX_PROBES`](crate::guest::ctl::MAX_PROBES). A page every commit maps to one host
/// page (or leaves unmapped) is read, checked and written; a page commits map to different host
/// pages is only read (an MMIO answer there is still judged).
fn choose_probes(
    mappings: &Mappings,
    hosts: &HostLayout,
    arena: u64,
    window: u64,
    pass: &QemuPass,
) -> Vec<Probe> {
    const LIMIT: u64 = 0x1_0000_0000;
    let max = crate::guest::ctl::MAX_PROBES;
    let private = window..window + crate::guest::PRIVATE_SIZE;
    let probe_at = |gpa: u64| -> Option<Probe> {
        if gpa >= LIMIT - PAGE_SIZE || private.contains(&gpa) {
            return None;
        }
        match mappings.host(gpa)? {
            Some(h) => Some(
                hosts
                    .to_arena(arena, h)
                    .map_or(Probe::read_only(gpa), |ours| Probe::checked(gpa, ours)),
            ),
            None => Some(Probe::read_only(gpa)),
        }
    };
    let mut chosen: BTreeMap<u64, Probe> = BTreeMap::new();
    let take = |chosen: &mut BTreeMap<u64, Probe>, gpa: u64| -> bool {
        if chosen.len() >= max || chosen.contains_key(&gpa) {
            return chosen.contains_key(&gpa);
        }
        match probe_at(gpa) {
            Some(p) => {
                chosen.insert(gpa, p);
                true
            }
            None => false,
        }
    };
    // `budget` probes over `ranges` (below 4 GiB), in proportion to their bytes, at least one
    // each where any page of the range can be probed.
    let spread = |chosen: &mut BTreeMap<u64, Probe>, ranges: &[(u64, u64)], budget: u64| {
        let ranges: Vec<(u64, u64)> = ranges
            .iter()
            .filter(|r| r.0 < LIMIT)
            .map(|&(s, e)| {
                (
                    s & !(PAGE_SIZE - 1),
                    e.min(LIMIT).div_ceil(PAGE_SIZE) * PAGE_SIZE,
                )
            })
            .collect();
        let total: u64 = ranges.iter().map(|r| r.1 - r.0).sum();
        for &(s, e) in &ranges {
            let pages = (e - s) / PAGE_SIZE;
            let n = (u128::from(budget) * u128::from(e - s) / u128::from(total.max(1))) as u64;
            let n = n.clamp(1, pages);
            let mut hit = false;
            for i in 0..n {
                let gpa = s + (i * pages / n) * PAGE_SIZE;
                hit |= take(chosen, gpa);
            }
            // Nothing probeable where the spread fell: the first page that is.
            if !hit {
                (s..e)
                    .step_by(PAGE_SIZE as usize)
                    .take(4096)
                    .any(|gpa| take(chosen, gpa));
            }
        }
    };
    spread(&mut chosen, &pass.holes, max as u64 / 2);
    let others: Vec<(u64, u64)> = pass
        .touched
        .iter()
        .filter(|r| overlap(&pass.holes, r.0, r.1) < r.1 - r.0)
        .copied()
        .collect();
    spread(&mut chosen, &others, max as u64 / 4);
    for gpa in (0..0x10_0000)
        .step_by(PAGE_SIZE as usize)
        .chain((0x10_0000..LIMIT).step_by(0x20_0000))
    {
        take(&mut chosen, gpa);
    }
    chosen.into_values().collect()
}

/// What a replay's probes cover.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Coverage {
    /// Bytes of guest-physical space under a probe page.
    pub probed_bytes: u64,
    /// Bytes in a hole of QEMU's calls ([`QemuPass::holes`]).
    pub hole_bytes: u64,
    /// Of those, the bytes under a probe page.
    pub hole_bytes_probed: u64,
}

impl Coverage {
    fn of(probes: &[Probe], holes: &[(u64, u64)]) -> Self {
        let pages: BTreeSet<u64> = probes.iter().map(|p| p.gpa & !(PAGE_SIZE - 1)).collect();
        Coverage {
            probed_bytes: pages.len() as u64 * PAGE_SIZE,
            hole_bytes: holes.iter().map(|r| r.1 - r.0).sum(),
            hole_bytes_probed: pages
                .iter()
                .map(|&p| overlap(holes, p, p + PAGE_SIZE))
                .sum(),
        }
    }
}

/// Waits (at most a second) until the guest has completed `rounds` rounds in all.
fn wait_for_rounds(vm: &TestVm, rounds: u64) {
    let deadline = Instant::now() + Duration::from_secs(1);
    while vm.guest_stats().rounds < rounds && Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// A test VM that steps through a QEMU trace's commits with one strategy: what `memslots replay`
/// and `memslots bench` drive.
///
/// Host memory is laid out like QEMU's (every run of QEMU's host ranges keeps its offsets in one
/// arena). Commit 0 is applied when the VM is made; each [`TraceVm::step`] applies the next
/// commit, cycling forward through the trace and then back to commit 0. `atomic` applies the
/// planner's batch for each commit, `qemu` and `naive` QEMU's own calls (its listener's calls on
/// the way back).
pub struct TraceVm {
    vm: TestVm,
    vcpus: usize,
    /// Whether the vCPUs run.
    started: bool,
    strategy: Strategy,
    targets: Vec<memslots::planner::MemoryMap>,
    /// QEMU's accepted calls of each commit.
    calls: Vec<Vec<SlotCall>>,
    /// QEMU's layout after commit 0, for the way back.
    first_layout: Layout,
    hosts: std::sync::Arc<HostLayout>,
    arena: u64,
    probes: Vec<Probe>,
    /// What the probes cover.
    coverage: Coverage,
    /// The VM's slots in QEMU's host addresses.
    shadow: Layout,
    /// The commit the VM is at.
    at: usize,
}

impl std::fmt::Debug for TraceVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TraceVm")
            .field("strategy", &self.strategy)
            .field("commits", &self.targets.len())
            .field("at", &self.at)
            .finish_non_exhaustive()
    }
}

impl TraceVm {
    /// A VM with `vcpus` vCPUs (not yet running) holding the trace's first commit, applied with
    /// `strategy` from then on.
    pub fn new(
        trace: &crate::trace::Trace,
        vcpus: usize,
        strategy: Strategy,
    ) -> Result<Self, ReplayError> {
        Self::with_dirty_ring(trace, vcpus, strategy, None)
    }

    /// [`TraceVm::new`], keeping dirty pages with a dirty ring of `ring` bytes per vCPU.
    pub fn with_dirty_ring(
        trace: &crate::trace::Trace,
        vcpus: usize,
        strategy: Strategy,
        ring: Option<u32>,
    ) -> Result<Self, ReplayError> {
        let limits = memslots::model::Limits::default();
        let commits = crate::replay::qemu_commits(trace, limits)?;
        if commits.len() < 2 {
            return Err(ReplayError::TooShort(commits.len()));
        }
        let targets: Vec<MemoryMap> = commits.iter().map(|c| c.target.clone()).collect();
        let calls: Vec<Vec<SlotCall>> = commits
            .iter()
            .map(|c| trace.accepted_calls(c.calls.clone()))
            .collect();
        // QEMU's own layout after commit 0, for its calls back to it.
        let mut first_layout = Layout::new(limits);
        for call in &calls[0] {
            let _ = first_layout.apply(call);
        }
        let hosts = std::sync::Arc::new(HostLayout::of(trace));
        // A 2 MiB window below 4 GiB that no commit maps, for the guest's own slot.
        let window = (1..(0xffe0_0000 / crate::guest::PRIVATE_SIZE))
            .rev()
            .map(|i| i * crate::guest::PRIVATE_SIZE)
            .find(|&base| {
                let end = base + crate::guest::PRIVATE_SIZE;
                targets.iter().all(|m| {
                    m.regions()
                        .iter()
                        .all(|r| r.address_space != 0 || r.end() <= base || r.gpa >= end)
                })
            })
            .ok_or(ReplayError::NoRoom)?;
        let vm = TestVm::new(TestVmConfig {
            vcpus,
            arena_size: hosts.size,
            private_gpa: window,
            dirty_ring: ring,
            ..TestVmConfig::new(vcpus, hosts.size)
        })
        .map_err(StressError::from)?;
        let arena = vm.arena_host();

        let pass = QemuPass::of(&calls, &first_layout);
        let mappings = Mappings::new(&targets);
        let probes = choose_probes(&mappings, &hosts, arena, window, &pass);
        let coverage = Coverage::of(&probes, &pass.holes);

        let mut me = TraceVm {
            vm,
            vcpus,
            started: false,
            strategy,
            targets,
            calls,
            first_layout,
            hosts,
            arena,
            probes,
            coverage,
            shadow: Layout::new(limits),
            at: 0,
        };
        // Commit 0 builds the first layout, always in one batch (no vCPU runs yet).
        let first = me.calls_to(0)?;
        let ours: Vec<SlotCall> = first.iter().map(|c| me.hosts.call(arena, c)).collect();
        me.vm
            .apply(&ours, Strategy::Atomic)
            .map_err(StressError::Apply)?;
        me.shadow
            .apply_batch(&first)
            .expect("the model accepted these calls for the VM");
        Ok(me)
    }

    /// The calls that take the VM from where it is to commit `c`, in QEMU's host addresses.
    fn calls_to(&self, c: usize) -> Result<Vec<SlotCall>, ReplayError> {
        self.commit(c)
            .calls(&self.shadow)
            .map_err(|source| ReplayError::Plan { commit: c, source })
    }

    /// What planning commit `c` needs.
    fn commit(&self, c: usize) -> Commit {
        match self.strategy {
            Strategy::Atomic => Commit::Planned(self.targets[c].clone()),
            // QEMU's own calls forward; its listener's calls back to (and into) commit 0.
            _ if c == 0 => Commit::BackTo(self.first_layout.clone()),
            _ => Commit::Qemu(self.calls[c].clone()),
        }
    }

    /// Starts the vCPUs on the probes and waits until each has made a pass over them.
    pub fn start(&mut self) -> Result<(), StressError> {
        self.vm.start_probes(&self.probes, None)?;
        self.started = true;
        self.wait_for_pass();
        Ok(())
    }

    /// Waits (at most a second) until every vCPU has had time for one more pass over its probes;
    /// at once if the vCPUs were never started.
    pub fn wait_for_pass(&self) {
        if self.started {
            wait_for_rounds(&self.vm, self.vm.guest_stats().rounds + self.vcpus as u64);
        }
    }

    /// Commits in one pass through the trace and back (the steps before the VM is where it
    /// started).
    pub fn steps_per_pass(&self) -> usize {
        self.targets.len()
    }

    /// The next commit (after the last, commit 0 again), applied, started as `trigger` says. A
    /// batch rolled back (by an injected fault) leaves the VM where it was; the next step tries
    /// the same commit again.
    pub fn step(&mut self, trigger: Trigger) -> Result<Step, ReplayError> {
        let c = (self.at + 1) % self.targets.len();
        let (commit, shadow) = (self.commit(c), self.shadow.clone());
        let (hosts, arena, strategy) = (self.hosts.clone(), self.arena, self.strategy);
        let change = move |u: &mut SlotUpdater| {
            let calls = commit.calls(&shadow).map_err(ChangeError::Plan)?;
            let ours: Vec<SlotCall> = calls.iter().map(|call| hosts.call(arena, call)).collect();
            let stats = crate::strategy::apply(u, &ours, strategy).map_err(ChangeError::Apply)?;
            Ok((calls, stats))
        };
        match apply_change(&self.vm, trigger, change).map_err(StressError::from)? {
            Ok((calls, stats)) => {
                self.shadow
                    .apply_batch(&calls)
                    .expect("the model accepted these calls for the VM");
                self.at = c;
                Ok(Step::Applied(stats))
            }
            Err(ChangeError::Apply(ApplyError::RolledBack { stats, .. })) => {
                Ok(Step::RolledBack(*stats))
            }
            Err(ChangeError::Apply(e)) => Err(StressError::Apply(e).into()),
            Err(ChangeError::Plan(source)) => Err(ReplayError::Plan { commit: c, source }),
        }
    }

    /// Whether the VM's own slots, in QEMU's host addresses, map exactly like the trace after
    /// the commit the VM is at.
    pub fn layout_matches(&self) -> bool {
        let mut seen = Layout::new(*self.shadow.limits());
        for s in self.vm.layout().slots() {
            if s.id == self.vm.private_slot_id() {
                continue;
            }
            let host = self.hosts.to_qemu(self.arena, s.host).unwrap_or(0);
            let _ = seen.apply(&memslots::model::Slot { host, ..*s }.set_call());
        }
        MemoryMap::from_layout(&seen) == self.targets[self.at]
    }

    /// The checked probes' host pages (each once), for a [`DirtyCheck`].
    pub fn probe_host_ranges(&self) -> Vec<(u64, u64)> {
        let pages: BTreeSet<u64> = self.probes.iter().filter_map(|p| p.host).collect();
        pages.into_iter().map(|h| (h, h + PAGE_SIZE)).collect()
    }

    /// The pages the guest probes.
    pub fn probes(&self) -> &[Probe] {
        &self.probes
    }

    /// What the probes cover of guest-physical space and of QEMU's holes.
    pub fn coverage(&self) -> Coverage {
        self.coverage
    }

    /// The VM.
    pub fn vm(&self) -> &TestVm {
        &self.vm
    }

    /// The VM, mutably (to inject faults, harvest dirty logs).
    pub fn vm_mut(&mut self) -> &mut TestVm {
        &mut self.vm
    }
}

/// Replays a QEMU trace's commits on a running test guest.
pub fn replay(
    trace: &crate::trace::Trace,
    name: &str,
    config: &ReplayConfig,
    mut progress: impl FnMut(u64, Option<u64>),
) -> Result<StressReport, ReplayError> {
    let mut run =
        TraceVm::with_dirty_ring(trace, config.vcpus, config.strategy, config.dirty_ring)?;
    run.start()?;
    if let Some(p) = config.inject_faults {
        run.vm_mut().inject_faults(Some(FaultInjector::Random {
            p,
            rng: SplitMix64::new(config.seed ^ 0xfa17),
        }));
    }
    let mut dirty = DirtyCheck::new(run.probe_host_ranges());
    dirty.harvest(run.vm_mut())?;

    let mut tally = Tally::new(run.vm());
    let total = run.steps_per_pass() as u64 * config.loops;
    let mut matches = true;
    for _ in 0..total {
        // A batch rolled back by an injected fault is tried again: the trace must go on.
        loop {
            match run.step(config.trigger)? {
                Step::Applied(stats) => break tally.record(&stats, true),
                Step::RolledBack(stats) => tally.record(&stats, false),
            }
        }
        matches &= run.layout_matches();
        dirty.after_update(&run.vm().layout());
        dirty.harvest(run.vm_mut())?;
        progress(tally.updates, Some(total));
        // Let every vCPU make a full pass over its probes on this commit's layout.
        run.wait_for_pass();
    }
    let mut report = tally.report(
        run.vm(),
        config.strategy,
        config.trigger,
        name.to_owned(),
        config.vcpus,
        dirty.lost,
        Some(matches),
    );
    let coverage = run.coverage();
    report.probed_bytes = Some(coverage.probed_bytes);
    report.hole_bytes = Some(coverage.hole_bytes);
    report.hole_bytes_probed = Some(coverage.hole_bytes_probed);
    Ok(report)
}
