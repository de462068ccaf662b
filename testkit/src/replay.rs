//! QEMU traces replayed through the planner: each commit's target map, QEMU's own figures, and the
//! plan that reaches the same map from the layout the previous plans produced.
//!
//! [`QemuCommits`] and [`PlannedCommits`] stream a trace commit by commit, keeping only the current
//! layouts, so a trace of any length plans in memory the size of one layout;
//! [`qemu_commits`] and [`replay`] collect them for tests and short traces.

use std::ops::Range;

use serde::Serialize;

use crate::trace::{Commits, Trace, TraceCall, TraceError};
use crate::window::{WindowError, WindowPlanner};
use memslots::model::{GpaRange, Layout, Limits, Rule, SlotCall};
use memslots::planner::CutPolicy;
use memslots::planner::MemoryMap;
use memslots::planner::{Plan, PlanError};

/// What QEMU's own calls cost in one commit (or a whole trace).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, Serialize)]
pub struct QemuFigures {
    /// Calls QEMU made (refused ones included: each was an ioctl).
    pub ioctls: usize,
    /// Calls QEMU 8.0 makes with every vCPU held out: all calls of a commit in which a deleted
    /// range overlaps an added one.
    pub inhibited_ioctls: usize,
    /// Size of every slot QEMU's DELETEs and MOVEs removed.
    pub zapped_bytes: u64,
}

impl std::ops::AddAssign for QemuFigures {
    fn add_assign(&mut self, o: Self) {
        self.ioctls += o.ioctls;
        self.inhibited_ioctls += o.inhibited_ioctls;
        self.zapped_bytes += o.zapped_bytes;
    }
}

/// One QEMU commit as read, without the map after it: its calls, what they cost and where they
/// changed the mapping.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct CommitCalls {
    /// The commit's calls, as a range of [`Trace::calls`] (the order calls were read in).
    pub calls: Range<usize>,
    /// 1-based trace line of its first call.
    pub first_line: usize,
    /// 1-based trace line of its last call.
    pub last_line: usize,
    /// The calls of the commit that KVM accepted, in order: what QEMU's listener changed.
    pub accepted: Vec<SlotCall>,
    /// The old and the new range of every accepted call's slot: outside them QEMU's mapping is
    /// what it was before the commit.
    pub touched: Vec<GpaRange>,
    /// What QEMU's calls cost.
    pub qemu: QemuFigures,
}

/// One QEMU commit: its calls and the mapping after it.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct QemuCommit {
    /// The commit's calls, as a range of [`Trace::calls`] (the order calls were read in).
    pub calls: Range<usize>,
    /// 1-based trace line of its first call.
    pub first_line: usize,
    /// 1-based trace line of its last call.
    pub last_line: usize,
    /// The calls of the commit that KVM accepted, in order: what QEMU's listener changed.
    pub accepted: Vec<SlotCall>,
    /// The mapping QEMU's layout has after the commit.
    pub target: MemoryMap,
    /// What QEMU's calls cost.
    pub qemu: QemuFigures,
}

impl QemuCommit {
    /// A commit read and the map after it.
    pub fn new(c: CommitCalls, target: MemoryMap) -> Self {
        QemuCommit {
            calls: c.calls,
            first_line: c.first_line,
            last_line: c.last_line,
            accepted: c.accepted,
            target,
            qemu: c.qemu,
        }
    }
}

/// Why a trace cannot be replayed.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The trace could not be read (a streamed trace is parsed as it is replayed).
    #[error(transparent)]
    Trace(#[from] TraceError),
    /// A call the trace says KVM accepted is refused by the model.
    #[error("trace line {line}: call `{call}` succeeded in the trace but the model refuses it")]
    Refused {
        /// 1-based line.
        line: usize,
        /// The call.
        call: SlotCall,
        /// The rule it breaks.
        #[source]
        rule: Rule,
    },
    /// No plan reaches a commit's map.
    #[error("commit ending at trace line {line}")]
    Plan {
        /// Last line of the commit.
        line: usize,
        /// Why.
        #[source]
        source: PlanError,
    },
    /// A plan did not produce the commit's map (a planner bug; the replay stops).
    #[error("commit ending at trace line {line}: the plan's layout does not map like QEMU's")]
    Mismatch {
        /// Last line of the commit.
        line: usize,
    },
}

pub use crate::qemu::inhibits as qemu_inhibits;

/// QEMU's commits (see [`Trace::commits`]) rebuilt one at a time from a stream of trace calls:
/// QEMU's layout after each, kept alone. The streams below are built on it.
struct Rebuild<I: Iterator> {
    commits: Commits<I>,
    layout: Layout,
    /// Calls read so far: where the next commit's range starts in the trace.
    read: usize,
    failed: bool,
}

impl<I: Iterator<Item = Result<TraceCall, TraceError>>> Rebuild<I> {
    fn new(calls: I, limits: Limits) -> Self {
        Rebuild {
            commits: Commits::new(calls),
            layout: Layout::new(limits),
            read: 0,
            failed: false,
        }
    }

    /// The next commit, its calls applied to the layout; `None` after the last or an error.
    fn next_commit(&mut self) -> Option<Result<CommitCalls, ReplayError>> {
        if self.failed {
            return None;
        }
        let item = match self.commits.next()? {
            Ok(calls) => self.apply(calls),
            Err(e) => Err(e.into()),
        };
        self.failed = item.is_err();
        Some(item)
    }

    fn apply(&mut self, calls: Vec<TraceCall>) -> Result<CommitCalls, ReplayError> {
        let mut done = Vec::with_capacity(calls.len());
        for tc in calls.iter().filter(|tc| tc.accepted()) {
            let applied = self
                .layout
                .apply(&tc.call)
                .map_err(|rule| ReplayError::Refused {
                    line: tc.line,
                    call: tc.call,
                    rule,
                })?;
            done.push(applied);
        }
        let zapped: u64 = done
            .iter()
            .filter(|a| a.change.zaps())
            .filter_map(|a| a.before)
            .map(|old| old.size)
            .sum();
        let touched = done
            .iter()
            .flat_map(|a| a.before.into_iter().chain(a.after))
            .map(|s| GpaRange {
                address_space: s.id.address_space,
                start: s.gpa,
                end: s.end(),
            })
            .collect();
        let overlap = qemu_inhibits(&done);
        let range = self.read..self.read + calls.len();
        self.read = range.end;
        let (first, last) = match (calls.first(), calls.last()) {
            (Some(first), Some(last)) => (first.line, last.line),
            // `Commits` never hands out an empty commit.
            _ => (0, 0),
        };
        Ok(CommitCalls {
            first_line: first,
            last_line: last,
            qemu: QemuFigures {
                ioctls: range.len(),
                inhibited_ioctls: if overlap { range.len() } else { 0 },
                zapped_bytes: zapped,
            },
            calls: range,
            accepted: calls
                .iter()
                .filter(|tc| tc.accepted())
                .map(|tc| tc.call)
                .collect(),
            touched,
        })
    }
}

/// QEMU's commits (see [`Trace::commits`]) rebuilt one at a time from a stream of trace calls,
/// each with the mapping after it.
///
/// Only QEMU's current layout is kept, and each commit's map is built when the commit is handed
/// out: memory is one layout (plus the commit) whatever the trace's length, and a trace can be
/// read from a file as it goes ([`TraceReader`](crate::trace::TraceReader)). Building the map
/// costs time in the layout's size per commit ([`PlannedCommits`] does without). The stream ends
/// after its first error.
pub struct QemuCommits<I: Iterator> {
    rebuild: Rebuild<I>,
}

impl<I: Iterator> std::fmt::Debug for QemuCommits<I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QemuCommits")
            .field("read", &self.rebuild.read)
            .field("slots", &self.rebuild.layout.len())
            .finish_non_exhaustive()
    }
}

impl<I: Iterator<Item = Result<TraceCall, TraceError>>> QemuCommits<I> {
    /// The commits of the calls `calls` yields, starting from an empty layout under `limits`.
    pub fn new(calls: I, limits: Limits) -> Self {
        QemuCommits {
            rebuild: Rebuild::new(calls, limits),
        }
    }

    /// QEMU's layout after the last commit handed out.
    pub fn layout(&self) -> &Layout {
        &self.rebuild.layout
    }

    /// Trace calls read so far (all of them once the stream is done).
    pub fn calls_read(&self) -> usize {
        self.rebuild.read
    }
}

impl<I: Iterator<Item = Result<TraceCall, TraceError>>> Iterator for QemuCommits<I> {
    type Item = Result<QemuCommit, ReplayError>;

    fn next(&mut self) -> Option<Self::Item> {
        let item = self.rebuild.next_commit()?;
        Some(item.map(|c| QemuCommit::new(c, MemoryMap::from_layout(&self.rebuild.layout))))
    }
}

/// The calls of a parsed trace as the stream [`QemuCommits`] and [`PlannedCommits`] read.
pub fn calls_of(trace: &Trace) -> impl Iterator<Item = Result<TraceCall, TraceError>> + '_ {
    trace.calls.iter().copied().map(Ok)
}

/// Rebuilds QEMU's commits (see [`Trace::commits`]) and the mapping after each, all at once.
///
/// Every commit's map is kept: memory grows with commits times layout. For tests and short
/// traces; a long trace is streamed with [`QemuCommits`].
pub fn qemu_commits(trace: &Trace, limits: Limits) -> Result<Vec<QemuCommit>, ReplayError> {
    QemuCommits::new(calls_of(trace), limits).collect()
}

/// What QEMU's KVM listener would do between two maps: delete every region of `from` that does
/// not stay identical, re-create every region of `to` that is new, and re-issue a region whose only
/// change is dirty logging as a flags-only call. Each joined region counts as one QEMU section.
pub fn qemu_equivalent(from: &MemoryMap, to: &MemoryMap) -> QemuFigures {
    use memslots::model::SlotFlags;
    let key = |r: &memslots::planner::Region| {
        (
            r.address_space,
            r.gpa,
            r.size,
            r.host,
            r.flags.with(SlotFlags::LOG_DIRTY_PAGES, false).bits(),
        )
    };
    let old: std::collections::BTreeMap<_, _> =
        from.regions().iter().map(|r| (key(r), *r)).collect();
    let new: std::collections::BTreeMap<_, _> = to.regions().iter().map(|r| (key(r), *r)).collect();
    let mut figures = QemuFigures::default();
    let mut deleted = Vec::new();
    let mut added = Vec::new();
    for (k, r) in &old {
        match new.get(k) {
            Some(n) if n.flags != r.flags => figures.ioctls += 1,
            Some(_) => {}
            None => {
                figures.ioctls += 1;
                figures.zapped_bytes += r.size;
                deleted.push(*r);
            }
        }
    }
    for (k, r) in &new {
        if !old.contains_key(k) {
            figures.ioctls += 1;
            added.push(*r);
        }
    }
    let overlap = any_overlap(&deleted, &added);
    if overlap {
        figures.inhibited_ioctls = figures.ioctls;
    }
    figures
}

/// Whether some region of `deleted` overlaps some region of `added` in the same address space.
///
/// The regions of one map are disjoint within an address space, so `added` sorted by (address
/// space, GPA) is sorted by (address space, end) too: each deleted region needs one binary
/// search, O((d + a) log a) in all instead of d times a.
fn any_overlap(deleted: &[memslots::planner::Region], added: &[memslots::planner::Region]) -> bool {
    let mut added: Vec<(u16, u64, u64)> = added
        .iter()
        .map(|a| (a.address_space, a.gpa, a.end()))
        .collect();
    added.sort_unstable();
    deleted.iter().any(|d| {
        // The first added region of d's address space that ends after d starts.
        let i = added.partition_point(|a| (a.0, a.2) <= (d.address_space, d.gpa));
        added
            .get(i)
            .is_some_and(|a| a.0 == d.address_space && a.1 < d.end())
    })
}

/// One commit replayed: QEMU's commit, the map before it, and the plan.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct CommitReplay {
    /// QEMU's commit and its target map.
    pub commit: QemuCommit,
    /// The mapping before the commit.
    pub before: MemoryMap,
    /// The planner's batch from the previous plans' layout.
    pub plan: Plan,
}

/// Figures summed over a trace, the planner's beside QEMU's.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, Serialize)]
pub struct Totals {
    /// The planner's calls.
    pub ioctls: usize,
    /// The planner's calls that run quiesced.
    pub quiesced_ioctls: usize,
    /// Size of every slot the planner's DELETEs and MOVEs remove.
    pub zapped_bytes: u64,
    /// QEMU's figures.
    pub qemu: QemuFigures,
}

impl Totals {
    /// Adds one commit: the planner's `plan` and QEMU's figures.
    pub fn add(&mut self, plan: &Plan, qemu: QemuFigures) {
        self.ioctls += plan.ioctls();
        self.quiesced_ioctls += plan.quiesced_ioctls();
        self.zapped_bytes += plan.zapped_bytes();
        self.qemu += qemu;
    }
}

/// A whole trace replayed through the planner.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct TraceReplay {
    /// Every commit, in order.
    pub commits: Vec<CommitReplay>,
    /// The layout after the last plan.
    pub layout: Layout,
}

impl TraceReplay {
    /// Figures summed over the trace.
    pub fn totals(&self) -> Totals {
        let mut t = Totals::default();
        for c in &self.commits {
            t.add(&c.plan, c.commit.qemu);
        }
        t
    }
}

/// One commit planned: QEMU's commit and the planner's batch to its map.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct PlannedCommit {
    /// QEMU's commit.
    pub commit: CommitCalls,
    /// The planner's batch from the previous plans' layout.
    pub plan: Plan,
}

/// Every commit of a stream of trace calls planned from the layout the previous plans produced,
/// each plan applied to the model and checked to map exactly like QEMU's layout after the
/// commit; one commit at a time.
///
/// Keeps QEMU's layout, the planner's layout and the running [`Totals`], so memory does not grow
/// with the trace; and plans each commit from the part of the map it changed (the plans are the
/// whole-map planner's, see `window.rs`), so time grows with the trace times the log of the
/// layout, not with commits times slots. The stream ends after its first error.
pub struct PlannedCommits<I: Iterator> {
    rebuild: Rebuild<I>,
    planner: WindowPlanner,
    totals: Totals,
    failed: bool,
}

impl<I: Iterator> std::fmt::Debug for PlannedCommits<I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlannedCommits")
            .field("read", &self.rebuild.read)
            .field("totals", &self.totals)
            .finish_non_exhaustive()
    }
}

impl<I: Iterator<Item = Result<TraceCall, TraceError>>> PlannedCommits<I> {
    /// Plans the commits of `calls` from an empty layout under `limits`, cutting with `policy`.
    pub fn new(calls: I, limits: Limits, policy: &CutPolicy) -> Self {
        PlannedCommits {
            rebuild: Rebuild::new(calls, limits),
            planner: WindowPlanner::new(limits, policy),
            totals: Totals::default(),
            failed: false,
        }
    }

    /// The layout after the last plan.
    pub fn layout(&self) -> &Layout {
        self.planner.layout()
    }

    /// QEMU's layout after the last commit handed out.
    pub fn qemu_layout(&self) -> &Layout {
        &self.rebuild.layout
    }

    /// The mapping after the last commit handed out (built anew: time in the layout's size).
    pub fn target(&self) -> MemoryMap {
        MemoryMap::from_layout(&self.rebuild.layout)
    }

    /// The ranges outside which the last plan changed neither QEMU's mapping nor any slot of
    /// the planner's layout, sorted and disjoint, each holding whole every slot (before and after)
    /// that reaches into it; `None` when the last commit was planned from the whole map.
    pub fn window(&self) -> Option<&[GpaRange]> {
        self.planner.window()
    }

    /// Figures summed over the commits handed out so far.
    pub fn totals(&self) -> Totals {
        self.totals
    }

    /// Trace calls read so far (all of them once the stream is done).
    pub fn calls_read(&self) -> usize {
        self.rebuild.read
    }

    fn plan(&mut self, commit: CommitCalls) -> Result<PlannedCommit, ReplayError> {
        let line = commit.last_line;
        let plan = self
            .planner
            .plan(&self.rebuild.layout, &commit.touched)
            .map_err(|e| match e {
                WindowError::Plan(source) => ReplayError::Plan { line, source },
                WindowError::Mismatch => ReplayError::Mismatch { line },
            })?;
        self.totals.add(&plan, commit.qemu);
        Ok(PlannedCommit { commit, plan })
    }
}

impl<I: Iterator<Item = Result<TraceCall, TraceError>>> Iterator for PlannedCommits<I> {
    type Item = Result<PlannedCommit, ReplayError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let item = self.rebuild.next_commit()?.and_then(|c| self.plan(c));
        self.failed = item.is_err();
        Some(item)
    }
}

/// Plans every commit of `trace` from the layout the previous plans produced, applying each plan
/// to the model and checking that it maps exactly like QEMU's layout after the commit.
///
/// Every commit's maps and plan are kept: memory grows with commits times layout. For tests and
/// short traces; `memslots plan` streams with [`PlannedCommits`].
pub fn replay(
    trace: &Trace,
    limits: Limits,
    policy: &CutPolicy,
) -> Result<TraceReplay, ReplayError> {
    let mut stream = PlannedCommits::new(calls_of(trace), limits, policy);
    let mut before = MemoryMap::default();
    let mut commits = Vec::new();
    while let Some(planned) = stream.next() {
        let PlannedCommit { commit, plan } = planned?;
        let target = stream.target();
        commits.push(CommitReplay {
            commit: QemuCommit::new(commit, target.clone()),
            before: std::mem::replace(&mut before, target),
            plan,
        });
    }
    Ok(TraceReplay {
        commits,
        layout: stream.layout().clone(),
    })
}

#[cfg(test)]
mod overlap_tests {
    use super::any_overlap;
    use crate::conformance::SplitMix64;
    use memslots::model::SlotFlags;
    use memslots::planner::Region;

    /// Disjoint regions of two address spaces, in random order.
    fn regions(rng: &mut SplitMix64) -> Vec<Region> {
        let mut out = Vec::new();
        for address_space in 0..2 {
            let mut gpa = 0;
            for _ in 0..rng.next_u64() % 12 {
                gpa += (rng.next_u64() % 4) * 0x1000;
                let size = (1 + rng.next_u64() % 4) * 0x1000;
                out.push(Region {
                    address_space,
                    gpa,
                    size,
                    host: 0,
                    flags: SlotFlags::NONE,
                });
                gpa += size;
            }
        }
        let n = out.len().max(1);
        for i in 0..out.len() {
            out.swap(i, (rng.next_u64() as usize) % n);
        }
        out
    }

    #[test]
    fn sorted_overlap_check_agrees_with_every_pair() {
        let mut rng = SplitMix64::new(17);
        let (mut yes, mut no) = (0, 0);
        for _ in 0..5_000 {
            let (deleted, added) = (regions(&mut rng), regions(&mut rng));
            let pairs = deleted.iter().any(|d| {
                added.iter().any(|a| {
                    a.address_space == d.address_space && a.gpa < d.end() && d.gpa < a.end()
                })
            });
            assert_eq!(
                any_overlap(&deleted, &added),
                pairs,
                "{deleted:?} {added:?}"
            );
            if pairs {
                yes += 1;
            } else {
                no += 1;
            }
        }
        assert!(yes > 100 && no > 100, "{yes} overlapping, {no} not");
    }
}
