//! The VMM's mapping after POST held against QEMU's: both reduced to "guest page -> (memory,
//! offset in it, read-only)" in address space 0, whatever the slots were cut into, and compared
//! range by range. The one difference named and allowed is PAM mode 1: read-only here, writable
//! in QEMU 7.2 (its `pam-rom` alias is read-only, but its KVM slot is not).
//!
//! Also QEMU 7.2's trace line, which `memslots boot --trace-out` writes.

use std::fmt;

use memslots::model::{Layout, Limits, Slot, SlotCall};

use crate::trace::{HostRuns, Trace};

use super::pam::{Source, FOUR_GIB};

/// A guest-physical range mapping contiguous bytes of one named memory.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct MapRun {
    /// First byte.
    pub gpa: u64,
    /// One past the last.
    pub end: u64,
    /// What it maps.
    pub to: Mapped,
}

/// What a guest page maps: a named memory, the offset in it, and whether guest writes exit.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Mapped {
    /// `pc.ram`, `pc.bios`, `pc.rom` (QEMU's names), or a name for memory neither knows.
    pub memory: String,
    /// Offset of the range's first byte in that memory.
    pub offset: u64,
    /// `KVM_MEM_READONLY`.
    pub readonly: bool,
}

impl fmt::Display for Mapped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ro = if self.readonly { " read-only" } else { "" };
        write!(f, "{}+{:#x}{ro}", self.memory, self.offset)
    }
}

/// The runs of `slots` (address space 0 only), merged where they continue each other; `name`
/// says which memory a host address lies in and at which offset.
pub fn runs<'a>(
    slots: impl IntoIterator<Item = &'a Slot>,
    name: impl Fn(u64) -> Option<(String, u64)>,
) -> Vec<MapRun> {
    let mut out: Vec<MapRun> = Vec::new();
    let mut slots: Vec<&Slot> = slots
        .into_iter()
        .filter(|s| s.id.address_space == 0)
        .collect();
    slots.sort_by_key(|s| s.gpa);
    for s in slots {
        let (memory, offset) = name(s.host).unwrap_or_else(|| ("unknown".into(), s.host));
        let to = Mapped {
            memory,
            offset,
            readonly: s.flags.readonly(),
        };
        match out.last_mut() {
            Some(last)
                if last.end == s.gpa
                    && last.to.memory == to.memory
                    && last.to.readonly == to.readonly
                    && last.to.offset + (last.end - last.gpa) == to.offset =>
            {
                last.end = s.gpa + s.size;
            }
            _ => out.push(MapRun {
                gpa: s.gpa,
                end: s.gpa + s.size,
                to,
            }),
        }
    }
    out
}

/// What a QEMU trace of a SeaBIOS boot ends in, and the sizes of its RAM and BIOS.
#[derive(Clone, Debug)]
pub struct QemuBoot {
    /// The mapping after the trace's last call.
    pub runs: Vec<MapRun>,
    /// Bytes of RAM (the host run behind the slot at GPA 0).
    pub ram: u64,
    /// Bytes of BIOS (the host run behind the slot ending at 4 GiB).
    pub bios: u64,
}

/// Replays `trace`'s accepted calls on the model and names QEMU's memory: the host run mapped
/// at GPA 0 first is `pc.ram`, the one mapped up to 4 GiB `pc.bios`, another `pc.rom`.
pub fn qemu_final_map(trace: &Trace) -> Result<QemuBoot, String> {
    let mut layout = Layout::new(Limits::default());
    for tc in trace.calls.iter().filter(|c| c.accepted()) {
        layout
            .apply(&tc.call)
            .map_err(|rule| format!("line {}: {} is refused: {rule}", tc.line, tc.call))?;
    }
    let host_runs = HostRuns::of(trace);
    let first = |pick: &dyn Fn(&SlotCall) -> bool| {
        trace
            .calls
            .iter()
            .find(|c| !c.call.is_delete() && pick(&c.call))
            .and_then(|c| host_runs.locate(c.call.host))
            .map(|(i, _)| i)
    };
    let ram = first(&|c| c.gpa == 0).ok_or("no slot maps GPA 0: not a PC boot")?;
    let bios = first(&|c| c.gpa + c.size == FOUR_GIB).ok_or("no slot ends at 4 GiB: no BIOS")?;
    let others: Vec<usize> = (0..host_runs.runs.len())
        .filter(|&i| i != ram && i != bios)
        .collect();
    let name_of = |i: usize| -> String {
        if i == ram {
            Source::Ram.name().into()
        } else if i == bios {
            Source::Bios.name().into()
        } else if others.len() == 1 {
            Source::Rom.name().into()
        } else {
            format!("qemu-memory-{i}")
        }
    };
    let size = |i: usize| host_runs.runs[i].1 - host_runs.runs[i].0;
    Ok(QemuBoot {
        runs: runs(layout.slots(), |host| {
            host_runs.locate(host).map(|(i, off)| (name_of(i), off))
        }),
        ram: size(ram),
        bios: size(bios),
    })
}

/// Why a range differs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    /// The same RAM, read-only here and writable in QEMU 7.2: PAM mode 1. Named and allowed.
    Mode1ReadOnly,
    /// Anything else: the maps do not match.
    Unexplained,
}

/// A range where the two mappings differ.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Difference {
    /// First byte.
    pub gpa: u64,
    /// One past the last.
    pub end: u64,
    /// Ours (`None`: unmapped).
    pub ours: Option<Mapped>,
    /// QEMU's.
    pub qemu: Option<Mapped>,
    /// Named or not.
    pub kind: Kind,
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |m: &Option<Mapped>| m.as_ref().map_or("unmapped".into(), |m| m.to_string());
        let why = match self.kind {
            Kind::Mode1ReadOnly => "PAM mode 1: read-only here, writable in QEMU 7.2 (named)",
            Kind::Unexplained => "unexplained",
        };
        write!(
            f,
            "{:#x}-{:#x}: ours {}, QEMU {}: {why}",
            self.gpa,
            self.end,
            show(&self.ours),
            show(&self.qemu)
        )
    }
}

/// The outcome of a comparison.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct MapComparison {
    /// Every range that differs, in address order.
    pub differences: Vec<Difference>,
}

impl MapComparison {
    /// Whether the maps match once the named differences are excluded.
    pub fn matches(&self) -> bool {
        self.differences.iter().all(|d| d.kind != Kind::Unexplained)
    }

    /// Bytes of the named (allowed) differences.
    pub fn named_bytes(&self) -> u64 {
        self.differences
            .iter()
            .filter(|d| d.kind == Kind::Mode1ReadOnly)
            .map(|d| d.end - d.gpa)
            .sum()
    }
}

fn at(runs: &[MapRun], gpa: u64) -> Option<Mapped> {
    let i = runs.partition_point(|r| r.end <= gpa);
    runs.get(i).filter(|r| r.gpa <= gpa).map(|r| Mapped {
        offset: r.to.offset + (gpa - r.gpa),
        ..r.to.clone()
    })
}

/// Compares `ours` with `qemu` (each sorted, not overlapping). `mode1(start, end)` says whether
/// the PAM left every byte of the range in mode 1 on our side.
pub fn compare(
    ours: &[MapRun],
    qemu: &[MapRun],
    mode1: impl Fn(u64, u64) -> bool,
) -> MapComparison {
    let mut cuts: Vec<u64> = ours
        .iter()
        .chain(qemu)
        .flat_map(|r| [r.gpa, r.end])
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut differences: Vec<Difference> = Vec::new();
    for w in cuts.windows(2) {
        let (a, b) = (w[0], w[1]);
        let (o, q) = (at(ours, a), at(qemu, a));
        if o == q {
            continue;
        }
        let kind = match (&o, &q) {
            (Some(o), Some(q))
                if o.memory == q.memory
                    && o.offset == q.offset
                    && o.readonly
                    && !q.readonly
                    && o.memory == Source::Ram.name()
                    && mode1(a, b) =>
            {
                Kind::Mode1ReadOnly
            }
            _ => Kind::Unexplained,
        };
        // A range continuing the previous difference in the same way joins it.
        if let Some(last) = differences.last_mut() {
            let continues = |x: &Option<Mapped>, y: &Option<Mapped>, len: u64| match (x, y) {
                (None, None) => true,
                (Some(x), Some(y)) => {
                    x.memory == y.memory && x.readonly == y.readonly && x.offset + len == y.offset
                }
                _ => false,
            };
            let len = last.end - last.gpa;
            if last.end == a
                && last.kind == kind
                && continues(&last.ours, &o, len)
                && continues(&last.qemu, &q, len)
            {
                last.end = b;
                continue;
            }
        }
        differences.push(Difference {
            gpa: a,
            end: b,
            ours: o,
            qemu: q,
            kind,
        });
    }
    MapComparison { differences }
}

/// `call` and what KVM returned (0 or `-errno`) as QEMU 7.2 traces it (`Slot#` is KVM's raw
/// slot, `address_space << 16 | id`).
pub fn trace_line(call: &SlotCall, ret: i32) -> String {
    format!(
        "kvm_set_user_memory Slot#{} flags={:#x} gpa={:#x} size={:#x} ua={:#x} ret={ret}",
        call.slot, call.flags, call.gpa, call.size, call.host
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use memslots::model::{SlotFlags, SlotId};

    fn slot(id: u16, gpa: u64, size: u64, host: u64, ro: bool) -> Slot {
        Slot {
            id: SlotId::new(id),
            gpa,
            size,
            host,
            flags: if ro {
                SlotFlags::READONLY
            } else {
                SlotFlags::NONE
            },
            guest_memfd: 0,
            guest_memfd_offset: 0,
        }
    }

    fn named(host: u64) -> Option<(String, u64)> {
        match host {
            0x1000_0000..0x3000_0000 => Some(("pc.ram".into(), host - 0x1000_0000)),
            0x4000_0000..0x4002_0000 => Some(("pc.bios".into(), host - 0x4000_0000)),
            _ => None,
        }
    }

    #[test]
    fn cuts_do_not_matter_and_only_mode_1_is_forgiven() {
        let ram = 0x1000_0000;
        let whole = [slot(0, 0, 0x2000_0000, ram, false)];
        let cut = [
            slot(0, 0, 0xc_0000, ram, false),
            slot(1, 0xc_0000, 0x4_0000, ram + 0xc_0000, false),
            slot(2, 0x10_0000, 0x1ff0_0000, ram + 0x10_0000, false),
        ];
        let (a, b) = (runs(&whole, named), runs(&cut, named));
        assert_eq!(a, b);
        assert!(compare(&a, &b, |_, _| false).differences.is_empty());

        // 0xf0000 read-only on our side: named only where the PAM says mode 1.
        let ours = runs(
            &[
                slot(0, 0, 0xf_0000, ram, false),
                slot(1, 0xf_0000, 0x1_0000, ram + 0xf_0000, true),
                slot(2, 0x10_0000, 0x1ff0_0000, ram + 0x10_0000, false),
            ],
            named,
        );
        let named_mode1 = compare(&ours, &a, |s, e| s >= 0xf_0000 && e <= 0x10_0000);
        assert!(named_mode1.matches());
        assert_eq!(named_mode1.named_bytes(), 0x1_0000);
        assert!(!compare(&ours, &a, |_, _| false).matches());

        // Another offset (the BIOS segment mapping the wrong RAM) is never forgiven.
        let shifted = runs(
            &[
                slot(0, 0, 0xf_0000, ram, false),
                slot(1, 0xf_0000, 0x1_0000, ram + 0xe_0000, true),
                slot(2, 0x10_0000, 0x1ff0_0000, ram + 0x10_0000, false),
            ],
            named,
        );
        let c = compare(&shifted, &a, |_, _| true);
        assert!(!c.matches());
        assert_eq!(c.differences.len(), 1, "{:?}", c.differences);
        assert_eq!(
            (c.differences[0].gpa, c.differences[0].end),
            (0xf_0000, 0x10_0000)
        );

        // A page missing on one side is a difference too.
        let hole = runs(&[slot(0, 0, 0x1fff_f000, ram, false)], named);
        assert!(!compare(&hole, &a, |_, _| true).matches());
    }

    #[test]
    fn qemu_memory_is_named_from_the_trace() {
        let text = "\
kvm_set_user_memory Slot#0 flags=0x0 gpa=0x0 size=0x20000000 ua=0x7f0010000000 ret=0
kvm_set_user_memory Slot#1 flags=0x2 gpa=0xfffe0000 size=0x20000 ua=0x7f0040000000 ret=0
kvm_set_user_memory Slot#0 flags=0x0 gpa=0x0 size=0x0 ua=0x7f0010000000 ret=0
kvm_set_user_memory Slot#0 flags=0x0 gpa=0x0 size=0xc0000 ua=0x7f0010000000 ret=0
kvm_set_user_memory Slot#2 flags=0x2 gpa=0xc0000 size=0x20000 ua=0x7f0050000000 ret=0
kvm_set_user_memory Slot#3 flags=0x2 gpa=0xe0000 size=0x20000 ua=0x7f0040000000 ret=0
kvm_set_user_memory Slot#4 flags=0x0 gpa=0x100000 size=0x1ff00000 ua=0x7f0010100000 ret=0
";
        let q = qemu_final_map(&Trace::parse(text).unwrap()).unwrap();
        assert_eq!((q.ram, q.bios), (0x2000_0000, 0x2_0000));
        let names: Vec<_> = q.runs.iter().map(|r| r.to.to_string()).collect();
        assert_eq!(
            names,
            [
                "pc.ram+0x0",
                "pc.rom+0x0 read-only",
                "pc.bios+0x0 read-only",
                "pc.ram+0x100000",
                "pc.bios+0x0 read-only"
            ]
        );
        let line = trace_line(
            &slot(3, 0xe_0000, 0x2_0000, 0x7f00_4000_0000, true).set_call(),
            0,
        );
        let back = Trace::parse(&line).unwrap();
        assert_eq!(
            back.calls[0].call,
            slot(3, 0xe_0000, 0x2_0000, 0x7f00_4000_0000, true).set_call()
        );
    }
}
