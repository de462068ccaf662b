//! QEMU `kvm_set_user_memory` traces: parsing, and QEMU's commits rebuilt from the call order.
//!
//! Three line formats are accepted (see the README): QEMU 7.2's, later QEMU's with `AddrSpace#`,
//! and newer still with `guest_memfd` fields; any of them may carry a `PID@SECONDS.MICROS:` prefix.
//! Lines of other trace events are ignored.

use std::ops::Range;
use std::path::{Path, PathBuf};

use crate::model::{SlotCall, SlotId};

/// The trace event this module reads.
pub const EVENT: &str = "kvm_set_user_memory";

/// One slot call recorded in a trace.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct TraceCall {
    /// 1-based line number in the trace.
    pub line: usize,
    /// The call as QEMU made it.
    pub call: SlotCall,
    /// What KVM returned: 0, or a negative errno.
    pub ret: i32,
}

impl TraceCall {
    /// Whether KVM accepted the call.
    pub fn accepted(&self) -> bool {
        self.ret == 0
    }
}

/// Why a trace could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// The file could not be read.
    #[error("cannot read trace {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A `kvm_set_user_memory` line that does not parse.
    #[error("line {line}: malformed {EVENT} line: {reason}")]
    Malformed {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
}

/// A parsed trace: every slot call in order, and QEMU's commits.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct Trace {
    /// The calls, in trace order.
    pub calls: Vec<TraceCall>,
}

impl Trace {
    /// Reads and parses a trace file.
    pub fn from_file(path: &Path) -> Result<Self, TraceError> {
        let text = std::fs::read_to_string(path).map_err(|source| TraceError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Parses trace text.
    ///
    /// ```
    /// use memslots::trace::Trace;
    /// let t = Trace::parse("kvm_set_user_memory Slot#2 flags=0x2 gpa=0xc0000 size=0x20000 \
    ///                       ua=0x7f92c9400000 ret=0\nsome_other_event x=1\n").unwrap();
    /// assert_eq!(t.calls.len(), 1);
    /// assert_eq!(t.calls[0].call.gpa, 0xc0000);
    /// ```
    pub fn parse(text: &str) -> Result<Self, TraceError> {
        let mut calls = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            if let Some(call) = parse_line(raw, i + 1)? {
                calls.push(call);
            }
        }
        Ok(Trace { calls })
    }

    /// The trace files (`*.log`) in `dir`, sorted by name.
    pub fn files_in(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
        let mut out: Vec<PathBuf> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        out.sort();
        Ok(out)
    }

    /// The calls in `range` of [`Trace::calls`] that KVM accepted, in order: what QEMU's
    /// listener actually changed.
    pub fn accepted_calls(&self, range: Range<usize>) -> Vec<SlotCall> {
        self.calls[range]
            .iter()
            .filter(|tc| tc.accepted())
            .map(|tc| tc.call)
            .collect()
    }

    /// QEMU's commits as ranges of [`Trace::calls`].
    ///
    /// QEMU's KVM listener issues a commit's DELETEs before its CREATEs and flag changes, so a
    /// DELETE that follows any other call starts a new commit.
    pub fn commits(&self) -> Vec<Range<usize>> {
        let mut out = Vec::new();
        let mut start = 0;
        for i in 1..self.calls.len() {
            if self.calls[i].call.is_delete() && !self.calls[i - 1].call.is_delete() {
                out.push(start..i);
                start = i;
            }
        }
        if start < self.calls.len() {
            out.push(start..self.calls.len());
        }
        out
    }
}

/// QEMU's host memory as a trace shows it: the union of every slot's host range, cut into
/// maximal runs. Ranges that overlap or touch belong to one run (QEMU aliases ROM into several
/// slots), so a replay that gives each run its own backing keeps every offset.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct HostRuns {
    /// `(start, end)` of each run, sorted, disjoint and not touching.
    pub runs: Vec<(u64, u64)>,
}

impl HostRuns {
    /// The runs of every non-delete call of `trace` (accepted or not).
    pub fn of(trace: &Trace) -> Self {
        let mut ranges: Vec<(u64, u64)> = trace
            .calls
            .iter()
            .filter(|c| !c.call.is_delete())
            .map(|c| (c.call.host, c.call.host.saturating_add(c.call.size)))
            .collect();
        ranges.sort_unstable();
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (start, end) in ranges {
            match runs.last_mut() {
                Some(last) if start <= last.1 => last.1 = last.1.max(end),
                _ => runs.push((start, end)),
            }
        }
        HostRuns { runs }
    }

    /// The run holding `host`, as its index and the offset of `host` in it.
    pub fn locate(&self, host: u64) -> Option<(usize, u64)> {
        let i = self.runs.partition_point(|r| r.1 <= host);
        let (start, end) = *self.runs.get(i)?;
        (start <= host && host < end).then(|| (i, host - start))
    }

    /// Total bytes of all runs.
    pub fn bytes(&self) -> u64 {
        self.runs.iter().map(|r| r.1 - r.0).sum()
    }
}

fn malformed(line: usize, reason: impl Into<String>) -> TraceError {
    TraceError::Malformed {
        line,
        reason: reason.into(),
    }
}

fn number(line: usize, field: &str, text: &str) -> Result<u64, TraceError> {
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse::<u64>(),
    };
    parsed.map_err(|_| malformed(line, format!("{field}: `{text}` is not a number")))
}

/// Parses one line; `Ok(None)` for lines of other events.
fn parse_line(raw: &str, line: usize) -> Result<Option<TraceCall>, TraceError> {
    let text = raw.trim();
    // Optional `PID@SECONDS.MICROS:` prefix.
    let body = match text.split_once(':') {
        Some((prefix, rest)) if prefix.contains('@') && !prefix.contains(' ') => rest.trim_start(),
        _ => text,
    };
    let mut words = body.split_whitespace();
    if words.next() != Some(EVENT) {
        return Ok(None);
    }
    let (mut space, mut slot, mut flags, mut gpa, mut size, mut ua, mut ret) =
        (None, None, None, None, None, None, None);
    for word in words {
        if let Some(v) = word.strip_prefix("AddrSpace#") {
            space = Some(number(line, "AddrSpace", v)?);
        } else if let Some(v) = word.strip_prefix("Slot#") {
            slot = Some(number(line, "Slot", v)?);
        } else if let Some((key, v)) = word.split_once('=') {
            match key {
                "flags" => flags = Some(number(line, key, v)?),
                "gpa" => gpa = Some(number(line, key, v)?),
                "size" => size = Some(number(line, key, v)?),
                "ua" => ua = Some(number(line, key, v)?),
                "ret" => {
                    ret = Some(
                        v.parse::<i32>()
                            .map_err(|_| malformed(line, format!("ret: `{v}` is not a number")))?,
                    )
                }
                // Newer QEMU: guest_memfd=FD guest_memfd_offset=OFF; not part of the v1 call.
                "guest_memfd" | "guest_memfd_offset" => {}
                _ => return Err(malformed(line, format!("unknown field `{key}`"))),
            }
        } else {
            return Err(malformed(line, format!("unexpected word `{word}`")));
        }
    }
    let need = |v: Option<u64>, name: &str| v.ok_or_else(|| malformed(line, format!("no {name}")));
    let space = space.unwrap_or(0);
    let slot = need(slot, "Slot#")?;
    if space > u16::MAX as u64 || slot > u16::MAX as u64 {
        return Err(malformed(
            line,
            "address space or slot does not fit 16 bits",
        ));
    }
    let flags = need(flags, "flags=")?;
    let flags = u32::try_from(flags).map_err(|_| malformed(line, "flags do not fit 32 bits"))?;
    let call = SlotCall {
        slot: SlotId::in_space(space as u16, slot as u16).raw(),
        flags,
        gpa: need(gpa, "gpa=")?,
        size: need(size, "size=")?,
        host: need(ua, "ua=")?,
    };
    let ret = ret.ok_or_else(|| malformed(line, "no ret="))?;
    Ok(Some(TraceCall { line, call, ret }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const V72: &str =
        "kvm_set_user_memory Slot#2 flags=0x2 gpa=0xc0000 size=0x20000 ua=0x7f92c9400000 ret=0";
    const V8: &str = "kvm_set_user_memory AddrSpace#1 Slot#2 flags=0x2 gpa=0xc0000 size=0x20000 ua=0x7f92c9400000 ret=0";
    const V9: &str = "1234@1700000000.123456:kvm_set_user_memory AddrSpace#0 Slot#2 flags=0x0 gpa=0xc0000 size=0x20000 ua=0x7f92c9400000 guest_memfd=-1 guest_memfd_offset=0x0 ret=-22";

    #[test]
    fn three_formats() {
        let t = Trace::parse(&format!("{V72}\n{V8}\nother_event foo=1\n\n{V9}\n")).unwrap();
        assert_eq!(t.calls.len(), 3);
        assert_eq!(t.calls[0].call.id(), SlotId::new(2));
        assert_eq!(t.calls[1].call.id(), SlotId::in_space(1, 2));
        assert_eq!(t.calls[1].call.flags, 2);
        assert_eq!(t.calls[2].line, 5);
        assert_eq!(t.calls[2].ret, -22);
        assert!(!t.calls[2].accepted());
        assert_eq!(t.calls[2].call.host, 0x7f92c9400000);
    }

    #[test]
    fn malformed_lines_name_their_line() {
        for bad in [
            "kvm_set_user_memory Slot#x flags=0x0 gpa=0x0 size=0x1000 ua=0x1000 ret=0",
            "kvm_set_user_memory Slot#1 flags=0x0 gpa=0x0 size=0x1000 ret=0",
            "kvm_set_user_memory Slot#1 flags=0x0 gpa=0x0 size=0x1000 ua=0x1000",
            "kvm_set_user_memory Slot#1 bogus=1 gpa=0x0 size=0x1000 ua=0x1000 ret=0",
            "kvm_set_user_memory Slot#70000 flags=0 gpa=0x0 size=0x1000 ua=0x1000 ret=0",
            "kvm_set_user_memory garbage",
        ] {
            match Trace::parse(&format!("{V72}\n{bad}\n")) {
                Err(TraceError::Malformed { line: 2, .. }) => {}
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    #[test]
    fn host_runs_merge_aliases() {
        let line = |slot: u32, gpa: u64, size: u64, ua: u64| {
            format!("kvm_set_user_memory Slot#{slot} flags=0x0 gpa={gpa:#x} size={size:#x} ua={ua:#x} ret=0")
        };
        let text = [
            line(0, 0, 0xa0000, 0x1000_0000),
            line(1, 0xfffc0000, 0x40000, 0x2000_0000),
            // An alias of the ROM's upper half, and a delete (ignored).
            line(2, 0xe0000, 0x20000, 0x2002_0000),
            line(2, 0xe0000, 0, 0x9999_0000),
            // Touching the RAM run: one run.
            line(3, 0x100000, 0x1000, 0x100a_0000),
        ]
        .join("\n");
        let runs = HostRuns::of(&Trace::parse(&text).unwrap());
        assert_eq!(
            runs.runs,
            vec![(0x1000_0000, 0x100a_1000), (0x2000_0000, 0x2004_0000)]
        );
        assert_eq!(runs.locate(0x2002_0000), Some((1, 0x20000)));
        assert_eq!(runs.locate(0x2004_0000), None);
        assert_eq!(runs.locate(0x0fff_ffff), None);
        assert_eq!(runs.bytes(), 0xa1000 + 0x40000);
    }

    #[test]
    fn commits_split_at_delete_after_create() {
        let del = "kvm_set_user_memory Slot#1 flags=0x0 gpa=0x0 size=0x0 ua=0x1000 ret=0";
        let add = "kvm_set_user_memory Slot#1 flags=0x0 gpa=0x0 size=0x1000 ua=0x1000 ret=0";
        let t = Trace::parse(&[add, add, del, del, add, del, add].join("\n")).unwrap();
        assert_eq!(t.commits(), vec![0..2, 2..5, 5..7]);
    }
}
