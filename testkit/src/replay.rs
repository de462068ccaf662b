//! QEMU traces replayed through the planner: each commit's target map, QEMU's own figures, and the
//! plan that reaches the same map from the layout the previous plans produced.

use std::ops::Range;

use serde::Serialize;

use crate::trace::Trace;
use memslots::model::{Layout, Limits, Rule, SlotCall};
use memslots::planner::CutPolicy;
use memslots::planner::MemoryMap;
use memslots::planner::{plan_with, Plan, PlanError};

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

/// One QEMU commit: its calls and the mapping after it.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct QemuCommit {
    /// The commit's calls, as a range of [`Trace::calls`].
    pub calls: Range<usize>,
    /// 1-based trace line of its first call.
    pub first_line: usize,
    /// 1-based trace line of its last call.
    pub last_line: usize,
    /// The mapping QEMU's layout has after the commit.
    pub target: MemoryMap,
    /// What QEMU's calls cost.
    pub qemu: QemuFigures,
}

/// Why a trace cannot be replayed.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
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

/// Rebuilds QEMU's commits (see [`Trace::commits`]) and the mapping after each.
pub fn qemu_commits(trace: &Trace, limits: Limits) -> Result<Vec<QemuCommit>, ReplayError> {
    let mut layout = Layout::new(limits);
    let mut out = Vec::new();
    for range in trace.commits() {
        let mut done = Vec::new();
        for tc in &trace.calls[range.clone()] {
            if !tc.accepted() {
                continue;
            }
            let applied = layout
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
        let overlap = qemu_inhibits(&done);
        out.push(QemuCommit {
            first_line: trace.calls[range.start].line,
            last_line: trace.calls[range.end - 1].line,
            qemu: QemuFigures {
                ioctls: range.len(),
                inhibited_ioctls: if overlap { range.len() } else { 0 },
                zapped_bytes: zapped,
            },
            calls: range,
            target: MemoryMap::from_layout(&layout),
        });
    }
    Ok(out)
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
            t.ioctls += c.plan.ioctls();
            t.quiesced_ioctls += c.plan.quiesced_ioctls();
            t.zapped_bytes += c.plan.zapped_bytes();
            t.qemu += c.commit.qemu;
        }
        t
    }
}

/// Plans every commit of `trace` from the layout the previous plans produced, applying each plan
/// to the model and checking that it maps exactly like QEMU's layout after the commit.
pub fn replay(
    trace: &Trace,
    limits: Limits,
    policy: &CutPolicy,
) -> Result<TraceReplay, ReplayError> {
    let mut layout = Layout::new(limits);
    let mut before = MemoryMap::default();
    let mut commits = Vec::new();
    for commit in qemu_commits(trace, limits)? {
        let line = commit.last_line;
        let plan = plan_with(&layout, &commit.target, policy)
            .map_err(|source| ReplayError::Plan { line, source })?;
        layout
            .apply_batch(&plan.slot_calls())
            .map_err(|e| ReplayError::Plan {
                line,
                source: PlanError::Refused(e),
            })?;
        if MemoryMap::from_layout(&layout) != commit.target {
            return Err(ReplayError::Mismatch { line });
        }
        let next = commit.target.clone();
        commits.push(CommitReplay {
            commit,
            before: std::mem::replace(&mut before, next),
            plan,
        });
    }
    Ok(TraceReplay { commits, layout })
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
