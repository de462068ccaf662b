//! QEMU `kvm_set_user_memory` traces: parsing, and QEMU's commits rebuilt from the call order.
//!
//! Three line formats are accepted (see the README): QEMU 7.2's, later QEMU's with `AddrSpace#`,
//! and newer still with `guest_memfd` fields; any of them may carry a `PID@SECONDS.MICROS:` prefix.
//! Lines of other trace events are ignored.

use std::io::BufRead;
use std::ops::Range;
use std::path::{Path, PathBuf};

use memslots::model::{SlotCall, SlotId};

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

    /// What KVM said: `Ok(())`, or the errno (positive) it refused the call with.
    pub fn result(&self) -> Result<(), i32> {
        match self.ret {
            0 => Ok(()),
            // The parser keeps `ret` in -4095..=0; `saturating_neg` keeps a hand-built
            // `i32::MIN` from overflowing.
            ret => Err(ret.saturating_neg()),
        }
    }
}

/// The call as newer QEMU prints it (`AddrSpace#`, the guest_memfd fields, no timestamp):
/// [`Trace::parse`] reads it back to the same call.
impl std::fmt::Display for TraceCall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = &self.call;
        let id = c.id();
        write!(
            f,
            "{EVENT} AddrSpace#{} Slot#{} flags={:#x} gpa={:#x} size={:#x} ua={:#x} \
             guest_memfd={} guest_memfd_offset={:#x} ret={}",
            id.address_space,
            id.id,
            c.flags,
            c.gpa,
            c.size,
            c.host,
            c.guest_memfd as i32,
            c.guest_memfd_offset,
            self.ret
        )
    }
}

/// The largest errno the kernel returns (`MAX_ERRNO`): `ret` is 0 or in `-4095..=-1`.
pub const MAX_ERRNO: i32 = 4095;

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
    #[error("{}: malformed {EVENT} line: {reason}", place(.path.as_deref(), *.line))]
    Malformed {
        /// The file, when the trace was read from one.
        path: Option<PathBuf>,
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
    /// Reads and parses a trace file; errors name the file and line.
    pub fn from_file(path: &Path) -> Result<Self, TraceError> {
        let calls = TraceReader::open(path)?.collect::<Result<Vec<_>, _>>()?;
        Ok(Trace { calls })
    }

    /// Parses trace bytes: a line that is not UTF-8 is an error only if it is a
    /// `kvm_set_user_memory` line (other events are ignored whatever they hold).
    pub fn parse_bytes(bytes: &[u8]) -> Result<Self, TraceError> {
        let calls = TraceReader::new(bytes, None).collect::<Result<Vec<_>, _>>()?;
        Ok(Trace { calls })
    }

    /// Parses trace text.
    ///
    /// ```
    /// use memslots_testkit::trace::Trace;
    /// let t = Trace::parse("kvm_set_user_memory Slot#2 flags=0x2 gpa=0xc0000 size=0x20000 \
    ///                       ua=0x7f92c9400000 ret=0\nsome_other_event x=1\n").unwrap();
    /// assert_eq!(t.calls.len(), 1);
    /// assert_eq!(t.calls[0].call.gpa, 0xc0000);
    /// ```
    pub fn parse(text: &str) -> Result<Self, TraceError> {
        Self::parse_bytes(text.as_bytes())
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

/// A trace read call by call from any reader, in constant memory: what `plan`, `replay` and
/// `conformance --trace` stream through, so their memory does not grow with the trace.
#[derive(Debug)]
pub struct TraceReader<R> {
    reader: R,
    path: Option<PathBuf>,
    line: usize,
    buf: Vec<u8>,
    failed: bool,
}

impl TraceReader<std::io::BufReader<std::fs::File>> {
    /// Opens a trace file.
    pub fn open(path: &Path) -> Result<Self, TraceError> {
        let file = std::fs::File::open(path).map_err(|source| TraceError::Io {
            path: path.to_owned(),
            source,
        })?;
        Ok(TraceReader::new(
            std::io::BufReader::with_capacity(1 << 16, file),
            Some(path.to_owned()),
        ))
    }
}

impl<R: BufRead> TraceReader<R> {
    /// Reads `reader`; `path` names it in errors.
    pub fn new(reader: R, path: Option<PathBuf>) -> Self {
        TraceReader {
            reader,
            path,
            line: 0,
            buf: Vec::new(),
            failed: false,
        }
    }
}

impl<R: BufRead> Iterator for TraceReader<R> {
    type Item = Result<TraceCall, TraceError>;

    fn next(&mut self) -> Option<Self::Item> {
        // After an error the reader stops: the first error is the one reported.
        while !self.failed {
            self.buf.clear();
            match self.reader.read_until(b'\n', &mut self.buf) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(source) => {
                    self.failed = true;
                    return Some(Err(TraceError::Io {
                        path: self.path.clone().unwrap_or_else(|| PathBuf::from("-")),
                        source,
                    }));
                }
            }
            self.line += 1;
            match parse_line(&self.buf, self.line) {
                Ok(None) => continue,
                Ok(Some(call)) => return Some(Ok(call)),
                Err(reason) => {
                    self.failed = true;
                    return Some(Err(TraceError::Malformed {
                        path: self.path.clone(),
                        line: self.line,
                        reason,
                    }));
                }
            }
        }
        None
    }
}

/// QEMU's commits read one at a time from a stream of calls (see [`Trace::commits`]): the calls
/// of each commit, in order.
pub struct Commits<I: Iterator> {
    calls: std::iter::Peekable<I>,
}

impl<I: Iterator> std::fmt::Debug for Commits<I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Commits").finish_non_exhaustive()
    }
}

impl<I: Iterator<Item = Result<TraceCall, TraceError>>> Commits<I> {
    /// Groups `calls` into commits.
    pub fn new(calls: I) -> Self {
        Commits {
            calls: calls.peekable(),
        }
    }
}

impl<I: Iterator<Item = Result<TraceCall, TraceError>>> Iterator for Commits<I> {
    type Item = Result<Vec<TraceCall>, TraceError>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut out: Vec<TraceCall> = Vec::new();
        loop {
            match self.calls.peek() {
                None => break,
                Some(Err(_)) => {
                    if !out.is_empty() {
                        // Hand out the complete commit first; the error comes next time.
                        break;
                    }
                    return self.calls.next().map(|r| r.map(|_| Vec::new()));
                }
                Some(Ok(tc)) => {
                    let starts_new = tc.call.is_delete()
                        && out.last().is_some_and(|prev| !prev.call.is_delete());
                    if starts_new {
                        break;
                    }
                }
            }
            if let Some(Ok(tc)) = self.calls.next() {
                out.push(tc);
            }
        }
        (!out.is_empty()).then_some(Ok(out))
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

/// `FILE:LINE` or `line LINE`, where an error happened.
fn place(path: Option<&Path>, line: usize) -> String {
    match path {
        Some(p) => format!("{}:{line}", p.display()),
        None => format!("line {line}"),
    }
}

fn number(field: &str, text: &str) -> Result<u64, String> {
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse::<u64>(),
    };
    parsed.map_err(|_| format!("{field}: `{text}` is not a number that fits 64 bits"))
}

/// QEMU's `guest_memfd=%d`: -1 (no guest_memfd) and other negative ints are kept as the `u32` the
/// kernel receives.
fn guest_memfd_fd(text: &str) -> Result<u32, String> {
    let fd = match text.strip_prefix('-') {
        Some(_) => text.parse::<i32>().ok().map(|v| v as u32),
        None => number("guest_memfd", text)
            .ok()
            .and_then(|v| u32::try_from(v).ok()),
    };
    fd.ok_or_else(|| format!("guest_memfd: `{text}` is not a 32-bit file descriptor"))
}

/// Sets a field once: a field given twice is an error, not "the last one wins".
fn once<T>(slot: &mut Option<T>, name: &str, value: T) -> Result<(), String> {
    if slot.is_some() {
        return Err(format!("{name} is given twice"));
    }
    *slot = Some(value);
    Ok(())
}

/// Parses one line; `Ok(None)` for lines of other events, `Err(reason)` for a malformed one.
fn parse_line(bytes: &[u8], line: usize) -> Result<Option<TraceCall>, String> {
    let raw = match std::str::from_utf8(bytes) {
        Ok(raw) => raw,
        Err(e) => {
            let event = EVENT.as_bytes();
            if bytes.windows(event.len()).any(|w| w == event) {
                return Err(format!(
                    "byte {:#04x} at column {} is not UTF-8",
                    bytes[e.valid_up_to()],
                    e.valid_up_to() + 1
                ));
            }
            return Ok(None);
        }
    };
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
    let (mut memfd, mut memfd_offset) = (None, None);
    for word in words {
        if let Some(v) = word.strip_prefix("AddrSpace#") {
            once(&mut space, "AddrSpace#", number("AddrSpace", v)?)?;
        } else if let Some(v) = word.strip_prefix("Slot#") {
            once(&mut slot, "Slot#", number("Slot", v)?)?;
        } else if let Some((key, v)) = word.split_once('=') {
            match key {
                "flags" => once(&mut flags, "flags=", number(key, v)?)?,
                "gpa" => once(&mut gpa, "gpa=", number(key, v)?)?,
                "size" => once(&mut size, "size=", number(key, v)?)?,
                "ua" => once(&mut ua, "ua=", number(key, v)?)?,
                "ret" => {
                    let r = v
                        .parse::<i32>()
                        .ok()
                        .filter(|r| (-MAX_ERRNO..=0).contains(r))
                        .ok_or_else(|| {
                            format!("ret: `{v}` is not 0 or a negative errno (-1 to -{MAX_ERRNO})")
                        })?;
                    once(&mut ret, "ret=", r)?
                }
                // Newer QEMU: guest_memfd=FD (a C int, -1 when unused) guest_memfd_offset=OFF.
                "guest_memfd" => once(&mut memfd, "guest_memfd=", guest_memfd_fd(v)?)?,
                "guest_memfd_offset" => {
                    once(&mut memfd_offset, "guest_memfd_offset=", number(key, v)?)?
                }
                _ => return Err(format!("unknown field `{key}`")),
            }
        } else {
            return Err(format!("unexpected word `{word}`"));
        }
    }
    let need = |v: Option<u64>, name: &str| v.ok_or_else(|| format!("no {name}"));
    let slot = need(slot, "Slot#")?;
    // QEMU 7.2 prints no AddrSpace# and gives `Slot#` as KVM's raw slot, `as_id << 16 | id`
    // (an SMM slot is Slot#65536 and up); later QEMU prints the two apart.
    let (space, id) = match space {
        Some(space) => {
            if space > u64::from(u16::MAX) || slot > u64::from(u16::MAX) {
                return Err("AddrSpace# and Slot# must each fit 16 bits".to_owned());
            }
            (space as u16, slot as u16)
        }
        None => {
            let raw = u32::try_from(slot)
                .map_err(|_| format!("Slot#{slot} does not fit KVM's 32-bit slot field"))?;
            let id = SlotId::from_raw(raw);
            (id.address_space, id.id)
        }
    };
    let flags = need(flags, "flags=")?;
    let flags = u32::try_from(flags).map_err(|_| "flags do not fit 32 bits".to_owned())?;
    let call = SlotCall {
        slot: SlotId::in_space(space, id).raw(),
        flags,
        gpa: need(gpa, "gpa=")?,
        size: need(size, "size=")?,
        host: need(ua, "ua=")?,
        guest_memfd: memfd.unwrap_or(0),
        guest_memfd_offset: memfd_offset.unwrap_or(0),
    };
    let ret = ret.ok_or_else(|| "no ret=".to_owned())?;
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
            "kvm_set_user_memory Slot#4294967296 flags=0 gpa=0x0 size=0x1000 ua=0x1000 ret=0",
            "kvm_set_user_memory AddrSpace#1 Slot#65536 flags=0 gpa=0x0 size=0x1000 ua=0x1000 ret=0",
            "kvm_set_user_memory garbage",
            // A field given twice is refused, not "the last one wins".
            "kvm_set_user_memory Slot#1 flags=0x0 gpa=0x0 gpa=0x5000 size=0x1000 ua=0x1000 ret=0",
            "kvm_set_user_memory Slot#1 Slot#2 flags=0x0 gpa=0x0 size=0x1000 ua=0x1000 ret=0",
            "kvm_set_user_memory Slot#1 flags=0x0 gpa=0x0 size=0x1000 ua=0x1000 ret=0 ret=0",
            // `ret` is 0 or a negative errno: i32::MIN cannot be negated, 1 is no errno.
            "kvm_set_user_memory Slot#1 flags=0x0 gpa=0x0 size=0x1000 ua=0x1000 ret=-2147483648",
            "kvm_set_user_memory Slot#1 flags=0x0 gpa=0x0 size=0x1000 ua=0x1000 ret=1",
            "kvm_set_user_memory Slot#1 flags=0x0 gpa=0x0 size=0x1000 ua=0x1000 ret=-4096",
            "kvm_set_user_memory Slot#1 flags=0x0 gpa=0x0 size=0x100000000000000000 ua=0 ret=0",
        ] {
            match Trace::parse(&format!("{V72}\n{bad}\n")) {
                Err(TraceError::Malformed { line: 2, .. }) => {}
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    #[test]
    fn errors_name_file_and_line_once() {
        let err = Trace::parse(&format!(
            "{V72}\nkvm_set_user_memory Slot#1 gpa=0x0 gpa=0x1\n"
        ))
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "line 2: malformed kvm_set_user_memory line: gpa= is given twice"
        );
        let dir = std::env::temp_dir().join(format!("memslots-trace-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.log");
        // A non-UTF-8 byte on another event's line is ignored; on ours it names its line.
        let mut bytes = format!("{V72}\n").into_bytes();
        bytes.extend_from_slice(b"other_event \xff ok\n");
        bytes.extend_from_slice(b"kvm_set_user_memory Slot#1 flags=0x0 gpa=0x\xfe\n");
        std::fs::write(&path, &bytes).unwrap();
        let err = Trace::from_file(&path).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{}:3: malformed kvm_set_user_memory line: byte 0xfe at column 44 is not UTF-8",
                path.display()
            )
        );
        assert!(std::error::Error::source(&err).is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn qemu_7_2_slot_carries_the_address_space() {
        // QEMU 7.2 prints KVM's raw slot: an SMM slot (address space 1) is Slot#65536 and up.
        let t = Trace::parse(
            "kvm_set_user_memory Slot#65537 flags=0x0 gpa=0xa0000 size=0x20000 ua=0x7f0000000000 ret=0",
        )
        .unwrap();
        assert_eq!(t.calls[0].call.id(), SlotId::in_space(1, 1));
        assert_eq!(t.calls[0].call.slot, 65537);
    }

    #[test]
    fn streamed_commits_equal_whole_trace_commits() {
        let del = "kvm_set_user_memory Slot#1 flags=0x0 gpa=0x0 size=0x0 ua=0x1000 ret=0";
        let add = "kvm_set_user_memory Slot#1 flags=0x0 gpa=0x0 size=0x1000 ua=0x1000 ret=0";
        let text = [add, add, del, del, add, del, add].join("\n");
        let t = Trace::parse(&text).unwrap();
        let streamed: Vec<Vec<TraceCall>> = Commits::new(TraceReader::new(text.as_bytes(), None))
            .collect::<Result<_, _>>()
            .unwrap();
        let whole: Vec<Vec<TraceCall>> = t
            .commits()
            .into_iter()
            .map(|r| t.calls[r].to_vec())
            .collect();
        assert_eq!(streamed, whole);
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
    fn guest_memfd_fields_are_kept_and_round_trip() {
        let t = Trace::parse(&format!("{V9}\n{V72}\n")).unwrap();
        assert_eq!(
            t.calls[0].call.guest_memfd,
            u32::MAX,
            "-1 as the kernel gets it"
        );
        assert_eq!(t.calls[1].call.guest_memfd, 0, "absent: 0");
        let private = "kvm_set_user_memory AddrSpace#0 Slot#3 flags=0x4 gpa=0x100000 \
                       size=0x10000 ua=0x7f0000000000 guest_memfd=27 \
                       guest_memfd_offset=0x20000 ret=-9";
        let t = Trace::parse(&format!("{V72}\n{V8}\n{V9}\n{private}\n")).unwrap();
        let c = t.calls[3].call;
        assert_eq!(
            (c.flags, c.guest_memfd, c.guest_memfd_offset),
            (4, 27, 0x20000)
        );
        let text: String = t.calls.iter().map(|tc| format!("{tc}\n")).collect();
        let again = Trace::parse(&text).unwrap();
        let calls = |t: &Trace| t.calls.iter().map(|c| (c.call, c.ret)).collect::<Vec<_>>();
        assert_eq!(calls(&again), calls(&t));
        // Every committed trace round-trips too.
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/traces");
        for path in Trace::files_in(&dir).unwrap() {
            let t = Trace::from_file(&path).unwrap();
            let text: String = t.calls.iter().map(|tc| format!("{tc}\n")).collect();
            assert_eq!(
                calls(&Trace::parse(&text).unwrap()),
                calls(&t),
                "{}",
                path.display()
            );
        }
        for bad in [
            "guest_memfd=x",
            "guest_memfd=-2147483649",
            "guest_memfd=4294967296",
            "guest_memfd_offset=-1",
            "guest_memfd=1 guest_memfd=1",
        ] {
            let line = format!("{V72} {bad}");
            assert!(
                matches!(
                    Trace::parse(&line),
                    Err(TraceError::Malformed { line: 1, .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn commits_split_at_delete_after_create() {
        let del = "kvm_set_user_memory Slot#1 flags=0x0 gpa=0x0 size=0x0 ua=0x1000 ret=0";
        let add = "kvm_set_user_memory Slot#1 flags=0x0 gpa=0x0 size=0x1000 ua=0x1000 ret=0";
        let t = Trace::parse(&[add, add, del, del, add, del, add].join("\n")).unwrap();
        assert_eq!(t.commits(), vec![0..2, 2..5, 5..7]);
    }
}
