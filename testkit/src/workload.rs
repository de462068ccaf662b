//! Stress workloads: the real-world layout changes `memslots stress` cycles through, as model
//! [`Primitive`]s over an arena of guest memory.
//!
//! Each workload owns a guest-physical window and the host memory behind it; an update is one batch
//! (the primitives of one change, lowered to the raw calls the stock kernel needs, DELETEs first as
//! QEMU issues them). Workloads know nothing of KVM: a backend applies their batches.

use std::fmt;
use std::str::FromStr;

use crate::conformance::SplitMix64;
use memslots::model::{Batch, Layout, Primitive, PrimitiveError, Slot, SlotFlags, SlotId};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const PAGE: u64 = memslots::model::PAGE_SIZE;

/// The workloads of `memslots stress --workload`.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum WorkloadKind {
    /// A RAM region grows and shrinks (the virtio-mem / hot-plug case).
    Resize,
    /// Firmware shadowing: an overlay split out of a RAM region, its pieces flipping between ROM
    /// (read-only) and RAM, then merged back; guest code runs from the overlay.
    Pam,
    /// A BAR-like region moving between two GPAs.
    Bar,
    /// Dirty logging switched on and off while regions are resized, split and merged.
    Dirty,
    /// All of the above interleaved.
    Mixed,
}

impl WorkloadKind {
    /// Every workload, in the order `mixed` interleaves them (then `mixed`).
    pub const ALL: [WorkloadKind; 5] = [
        WorkloadKind::Resize,
        WorkloadKind::Pam,
        WorkloadKind::Bar,
        WorkloadKind::Dirty,
        WorkloadKind::Mixed,
    ];

    /// The name used on the command line and in JSON.
    pub const fn name(self) -> &'static str {
        match self {
            WorkloadKind::Resize => "resize",
            WorkloadKind::Pam => "pam",
            WorkloadKind::Bar => "bar",
            WorkloadKind::Dirty => "dirty",
            WorkloadKind::Mixed => "mixed",
        }
    }

    /// Guest-physical (and host) bytes the workload needs.
    pub const fn arena_size(self) -> u64 {
        match self {
            WorkloadKind::Resize => 2 * MIB,
            WorkloadKind::Pam => MIB,
            WorkloadKind::Bar => MIB,
            WorkloadKind::Dirty => 2 * MIB,
            WorkloadKind::Mixed => 6 * MIB,
        }
    }
}

impl fmt::Display for WorkloadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An unknown workload name.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
#[error("unknown workload `{0}` (expected resize, pam, bar, dirty or mixed)")]
pub struct UnknownWorkload(pub String);

impl FromStr for WorkloadKind {
    type Err = UnknownWorkload;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        WorkloadKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| UnknownWorkload(s.to_owned()))
    }
}

/// Where a workload lives: a guest-physical window and the host memory behind it (same size).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Arena {
    /// First GPA of the window.
    pub gpa: u64,
    /// Host address of the memory behind the window's first byte.
    pub host: u64,
    /// Bytes of the window (and of the host memory).
    pub size: u64,
    /// Address space of the slots.
    pub address_space: u16,
    /// The first slot id the workload may use; it uses at most [`Workload::IDS`] from there.
    pub first_id: u16,
}

impl Arena {
    fn part(&self, offset: u64, size: u64, k: u16) -> Arena {
        Arena {
            gpa: self.gpa + offset,
            host: self.host + offset,
            size,
            address_space: self.address_space,
            first_id: self.first_id + k * Workload::IDS_PER_PART,
        }
    }

    fn id(&self, k: u16) -> SlotId {
        SlotId::in_space(self.address_space, self.first_id + k)
    }
}

/// One update: a named change and its batch.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Update {
    /// What the change is (`grow`, `split`, `readonly-on`, `move`, ...).
    pub name: &'static str,
    /// The raw calls, in order.
    pub batch: Batch,
}

#[derive(Clone, Debug)]
enum Part {
    Resize { arena: Arena },
    Pam { arena: Arena },
    Bar { arena: Arena },
    Dirty { arena: Arena },
}

/// A workload: its initial slots and an endless sequence of updates.
#[derive(Clone, Debug)]
pub struct Workload {
    kind: WorkloadKind,
    parts: Vec<Part>,
    rng: SplitMix64,
    turn: usize,
}

/// Layout of the pam arena: RAM [0, OVERLAY) [overlay pieces] [.., 1 MiB).
const PAM_OVERLAY: u64 = 512 * KIB;
const PAM_PIECE: u64 = 64 * KIB;
const PAM_PIECES: u16 = 2;
const BAR_SIZE: u64 = 256 * KIB;

impl Workload {
    /// Slot ids one part of a workload may use.
    pub const IDS_PER_PART: u16 = 8;
    /// Slot ids a workload may use from [`Arena::first_id`].
    pub const IDS: u16 = 4 * Self::IDS_PER_PART;

    /// A workload of `kind` in `arena` (at least [`WorkloadKind::arena_size`] bytes), seeded.
    pub fn new(kind: WorkloadKind, arena: Arena, seed: u64) -> Self {
        assert!(
            arena.size >= kind.arena_size(),
            "arena too small for {kind}"
        );
        let part = |k: WorkloadKind, offset: u64, i: u16| -> Part {
            let a = arena.part(offset, k.arena_size(), i);
            match k {
                WorkloadKind::Resize => Part::Resize { arena: a },
                WorkloadKind::Pam => Part::Pam { arena: a },
                WorkloadKind::Bar => Part::Bar { arena: a },
                WorkloadKind::Dirty => Part::Dirty { arena: a },
                WorkloadKind::Mixed => unreachable!("mixed is made of the others"),
            }
        };
        let parts = match kind {
            WorkloadKind::Mixed => {
                let mut offset = 0;
                let mut parts = Vec::new();
                for (i, k) in WorkloadKind::ALL[..4].iter().enumerate() {
                    parts.push(part(*k, offset, i as u16));
                    offset += k.arena_size();
                }
                parts
            }
            k => vec![part(k, 0, 0)],
        };
        Workload {
            kind,
            parts,
            rng: SplitMix64::new(seed),
            turn: 0,
        }
    }

    /// The workload's kind.
    pub fn kind(&self) -> WorkloadKind {
        self.kind
    }

    /// The slots to create before the first update.
    pub fn initial_slots(&self) -> Vec<Slot> {
        self.parts
            .iter()
            .map(|part| {
                let (arena, size, flags) = match part {
                    Part::Resize { arena } => (arena, arena.size / 2, SlotFlags::NONE),
                    Part::Pam { arena, .. } => (arena, arena.size, SlotFlags::NONE),
                    Part::Bar { arena, .. } => (arena, BAR_SIZE, SlotFlags::NONE),
                    Part::Dirty { arena, .. } => {
                        (arena, arena.size / 2, SlotFlags::LOG_DIRTY_PAGES)
                    }
                };
                Slot {
                    id: arena.id(0),
                    gpa: arena.gpa,
                    size,
                    host: arena.host,
                    flags,
                    guest_memfd: 0,
                    guest_memfd_offset: 0,
                }
            })
            .collect()
    }

    /// GPA ranges from which the guest should execute code: memory the workload re-slots but that
    /// stays mapped (read-only or not) across every update. Empty unless the workload has `pam`.
    pub fn exec_ranges(&self) -> Vec<(u64, u64)> {
        self.parts
            .iter()
            .filter_map(|part| match part {
                Part::Pam { arena, .. } => Some((
                    arena.gpa + PAM_OVERLAY,
                    arena.gpa + PAM_OVERLAY + u64::from(PAM_PIECES) * PAM_PIECE,
                )),
                _ => None,
            })
            .collect()
    }

    /// Every guest page the workload ever maps, with the host page behind it (the same whenever
    /// it is mapped), for the guest to probe.
    pub fn probe_pages(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        for part in &self.parts {
            match part {
                Part::Bar { arena, .. } => {
                    for base in [arena.gpa, arena.gpa + arena.size / 2] {
                        for off in (0..BAR_SIZE).step_by(PAGE as usize) {
                            out.push((base + off, arena.host + off));
                        }
                    }
                }
                Part::Resize { arena } | Part::Pam { arena, .. } | Part::Dirty { arena, .. } => {
                    for off in (0..arena.size).step_by(PAGE as usize) {
                        out.push((arena.gpa + off, arena.host + off));
                    }
                }
            }
        }
        out
    }

    /// Host ranges whose slots may log dirty pages.
    pub fn dirty_host_ranges(&self) -> Vec<(u64, u64)> {
        self.parts
            .iter()
            .filter_map(|part| match part {
                Part::Dirty { arena, .. } => Some((arena.host, arena.host + arena.size)),
                _ => None,
            })
            .collect()
    }

    /// The next update, lowered against `layout` (which is left unchanged).
    pub fn next(&mut self, layout: &mut Layout) -> Result<Update, PrimitiveError> {
        let i = self.turn % self.parts.len();
        self.turn += 1;
        let coin = self.rng.next_u64();
        let (name, primitives) = plan_part(&self.parts[i], layout, coin);
        lower_all(layout, name, &primitives)
    }
}

/// Lowers primitives one after another into one batch; the layout is left unchanged.
fn lower_all(
    layout: &mut Layout,
    name: &'static str,
    primitives: &[Primitive],
) -> Result<Update, PrimitiveError> {
    let mut calls = Vec::new();
    let mut applied = Vec::new();
    let mut result = Ok(());
    for p in primitives {
        match layout.lower(p) {
            Ok(lowered) => {
                let done = layout
                    .apply_batch(lowered.batch.calls())
                    .map_err(PrimitiveError::Refused);
                match done {
                    Ok(done) => {
                        calls.extend_from_slice(lowered.batch.calls());
                        applied.push(done);
                    }
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    for done in applied.iter().rev() {
        layout.revert_all(done);
    }
    result.map(|()| Update {
        name,
        batch: Batch::from(calls),
    })
}

/// Chooses one part's next change from the layout alone (no state of its own, so an update that
/// was rolled back leaves nothing to undo here).
fn plan_part(part: &Part, layout: &Layout, coin: u64) -> (&'static str, Vec<Primitive>) {
    match part {
        Part::Resize { arena } => {
            let id = arena.id(0);
            let current = layout.slot(id).map_or(0, |s| s.size);
            // Sizes from 256 KiB to the whole arena, in 256 KiB steps, never the current one.
            let steps = arena.size / (256 * KIB);
            let mut size = (1 + coin % steps) * 256 * KIB;
            if size == current {
                size = if current == arena.size {
                    256 * KIB
                } else {
                    arena.size
                };
            }
            if size > current {
                ("grow", vec![Primitive::Grow { id, size }])
            } else {
                ("shrink", vec![Primitive::Shrink { id, size }])
            }
        }
        Part::Pam { arena } => {
            let ram = arena.id(0);
            let piece = |k: u16| arena.id(1 + k);
            let hi = arena.id(1 + PAM_PIECES);
            let piece_gpa = |k: u16| arena.gpa + PAM_OVERLAY + u64::from(k) * PAM_PIECE;
            if layout.slot(hi).is_none() {
                // Cut the overlay out of RAM: [ram][piece 0][piece 1][hi].
                let mut out: Vec<Primitive> = (0..PAM_PIECES)
                    .map(|k| Primitive::Split {
                        id: if k == 0 { ram } else { piece(k - 1) },
                        at: piece_gpa(k),
                        new_id: piece(k),
                    })
                    .collect();
                out.push(Primitive::Split {
                    id: piece(PAM_PIECES - 1),
                    at: piece_gpa(PAM_PIECES),
                    new_id: hi,
                });
                // Shadowed ROM starts read-only.
                out.extend((0..PAM_PIECES).map(|k| Primitive::SetReadonly {
                    id: piece(k),
                    on: true,
                }));
                return ("pam-split", out);
            }
            if coin % 4 == 0 {
                // Back to plain RAM: every piece writable, then merged.
                let mut out: Vec<Primitive> = (0..PAM_PIECES)
                    .map(|k| Primitive::SetReadonly {
                        id: piece(k),
                        on: false,
                    })
                    .collect();
                out.extend((0..PAM_PIECES).map(|k| Primitive::Merge {
                    first: ram,
                    second: piece(k),
                }));
                out.push(Primitive::Merge {
                    first: ram,
                    second: hi,
                });
                return ("pam-merge", out);
            }
            // Flip one or both pieces between ROM and RAM.
            let which = (coin >> 8) % (u64::from(PAM_PIECES) + 1);
            let out = (0..PAM_PIECES)
                .filter(|&k| which == u64::from(PAM_PIECES) || which == u64::from(k))
                .filter_map(|k| {
                    let on = !layout.slot(piece(k))?.flags.readonly();
                    Some(Primitive::SetReadonly { id: piece(k), on })
                })
                .collect();
            ("pam-flip", out)
        }
        Part::Bar { arena } => {
            let at_a = layout.slot(arena.id(0)).is_some_and(|s| s.gpa == arena.gpa);
            let gpa = if at_a {
                arena.gpa + arena.size / 2
            } else {
                arena.gpa
            };
            (
                "bar-move",
                vec![Primitive::Move {
                    id: arena.id(0),
                    gpa,
                }],
            )
        }
        Part::Dirty { arena } => {
            let split = layout.slot(arena.id(1)).is_some();
            let id = arena.id(0);
            let upper = arena.id(1);
            let Some(slot) = layout.slot(id).copied() else {
                return ("dirty-none", vec![]);
            };
            match coin % 4 {
                0 => (
                    "dirty-toggle",
                    vec![Primitive::SetDirtyLogging {
                        id,
                        on: !slot.flags.log_dirty(),
                    }],
                ),
                1 if !split => (
                    "dirty-split",
                    vec![Primitive::Split {
                        id,
                        at: slot.gpa + slot.size / 2,
                        new_id: upper,
                    }],
                ),
                1 => {
                    // Flags must match to merge: bring the upper half to the lower half's.
                    let mut out = Vec::new();
                    if let Some(u) = layout.slot(upper) {
                        if u.flags.log_dirty() != slot.flags.log_dirty() {
                            out.push(Primitive::SetDirtyLogging {
                                id: upper,
                                on: slot.flags.log_dirty(),
                            });
                        }
                    }
                    out.push(Primitive::Merge {
                        first: id,
                        second: upper,
                    });
                    ("dirty-merge", out)
                }
                2 if split => (
                    "dirty-toggle-upper",
                    vec![Primitive::SetDirtyLogging {
                        id: upper,
                        on: !layout.slot(upper).is_some_and(|u| u.flags.log_dirty()),
                    }],
                ),
                _ if split => (
                    "dirty-toggle",
                    vec![Primitive::SetDirtyLogging {
                        id,
                        on: !slot.flags.log_dirty(),
                    }],
                ),
                _ => {
                    // Whole (unsplit): resize between half and all of the arena.
                    let size = if slot.size == arena.size {
                        arena.size / 2
                    } else {
                        arena.size
                    };
                    if size > slot.size {
                        ("dirty-grow", vec![Primitive::Grow { id, size }])
                    } else {
                        ("dirty-shrink", vec![Primitive::Shrink { id, size }])
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use memslots::model::Limits;

    fn arena() -> Arena {
        Arena {
            gpa: 0x1000_0000,
            host: 0x7f00_0000_0000,
            size: WorkloadKind::Mixed.arena_size(),
            address_space: 0,
            first_id: 1,
        }
    }

    /// Runs a workload on the model alone: every update is valid, stays in the arena, and the
    /// updates that must open holes do.
    fn run(kind: WorkloadKind, updates: usize) -> Vec<(&'static str, usize)> {
        let mut w = Workload::new(kind, arena(), 7);
        let mut layout = Layout::new(Limits::default());
        for slot in w.initial_slots() {
            layout.apply(&slot.set_call()).unwrap();
        }
        let a = arena();
        let mut seen = Vec::new();
        for _ in 0..updates {
            let before = layout.clone();
            let update = w.next(&mut layout).unwrap();
            assert_eq!(layout, before, "next() leaves the layout unchanged");
            let holes = layout.holes(update.batch.calls()).unwrap();
            layout.apply_batch(update.batch.calls()).unwrap();
            for s in layout.slots() {
                assert!(s.gpa >= a.gpa && s.end() <= a.gpa + a.size, "{s:?}");
                assert!(s.host >= a.host && s.host + s.size <= a.host + a.size);
                assert!(s.id.id >= a.first_id && s.id.id < a.first_id + Workload::IDS);
            }
            if matches!(
                update.name,
                "pam-split" | "pam-merge" | "pam-flip" | "grow" | "shrink"
            ) {
                assert!(
                    !holes.is_empty() || update.batch.is_empty(),
                    "{}",
                    update.name
                );
            }
            if matches!(update.name, "bar-move" | "dirty-toggle") {
                assert!(holes.is_empty(), "{}", update.name);
            }
            seen.push((update.name, update.batch.len()));
        }
        seen
    }

    #[test]
    fn every_workload_runs_on_the_model() {
        for kind in WorkloadKind::ALL {
            let seen = run(kind, 400);
            assert_eq!(seen.len(), 400);
        }
    }

    #[test]
    fn mixed_covers_every_change() {
        let names: std::collections::BTreeSet<&str> = run(WorkloadKind::Mixed, 400)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        for n in [
            "grow",
            "shrink",
            "pam-split",
            "pam-flip",
            "pam-merge",
            "bar-move",
            "dirty-toggle",
            "dirty-split",
            "dirty-merge",
        ] {
            assert!(names.contains(n), "{n} missing from {names:?}");
        }
    }

    #[test]
    fn exec_ranges_stay_mapped() {
        let mut w = Workload::new(WorkloadKind::Pam, arena(), 3);
        let mut layout = Layout::new(Limits::default());
        for slot in w.initial_slots() {
            layout.apply(&slot.set_call()).unwrap();
        }
        let ranges = w.exec_ranges();
        assert_eq!(ranges.len(), 1);
        for _ in 0..100 {
            let update = w.next(&mut layout).unwrap();
            layout.apply_batch(update.batch.calls()).unwrap();
            for gpa in (ranges[0].0..ranges[0].1).step_by(4096) {
                assert!(layout.translate(0, gpa).is_some());
            }
        }
    }

    #[test]
    fn names_parse() {
        for k in WorkloadKind::ALL {
            assert_eq!(k.name().parse::<WorkloadKind>(), Ok(k));
        }
        assert!("nope".parse::<WorkloadKind>().is_err());
    }
}
