//! `memslots plan` on a trace far longer and wider than the committed ones (generated in code):
//! its memory must not grow with commits times slots. The binary runs as a child of its own so
//! its peak resident memory is its own (`wait4`'s `ru_maxrss`).

mod support;

use std::io::Read;
use std::process::{Command, Stdio};

use memslots_testkit::samples::SyntheticTrace;
use support::temp;

/// Runs `memslots args`: exit code, stdout, stderr and the child's peak resident memory in KiB.
// The child is reaped by `wait4`, not `Child::wait`: only `wait4` reports its peak memory.
#[allow(clippy::zombie_processes)]
fn measured(args: &[&str]) -> (Option<i32>, String, String, u64) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_memslots"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run memslots");
    let mut err_pipe = child.stderr.take().expect("piped");
    let err = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = err_pipe.read_to_string(&mut text);
        text
    });
    let mut out = String::new();
    child
        .stdout
        .take()
        .expect("piped")
        .read_to_string(&mut out)
        .expect("stdout");
    let err = err.join().expect("stderr reader");
    let pid = libc::pid_t::try_from(child.id()).expect("a pid");
    let mut status = 0;
    // SAFETY: all-zero bytes are a valid `rusage` (plain integers).
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `status` and `usage` are valid for writes; `pid` is our child, not yet reaped
    // (`Child` is never waited on, and dropping it does not wait).
    let reaped = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(reaped, pid, "wait4: {}", std::io::Error::last_os_error());
    let code = libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
    (code, out, err, u64::try_from(usage.ru_maxrss).unwrap_or(0))
}

/// 5,000 commits over 2,000 slots. With two maps kept per commit (before and after, for the table
/// and the drawing), the release binary's peak was 612,904 KiB on this trace; streamed, the
/// debug binary's is about 10,000 KiB.
#[test]
fn plan_of_a_long_wide_trace_keeps_no_map_per_commit() {
    let spec = SyntheticTrace {
        commits: 5_000,
        slots: 2_000,
        seed: 11,
    };
    let trace = temp("scale-5000x2000.log", &spec.text());
    let (code, out, err, peak_kib) = measured(&["plan", trace.to_str().unwrap(), "--json"]);
    eprintln!("memslots plan, 5,000 commits over 2,000 slots: peak RSS {peak_kib} KiB");
    assert_eq!(code, Some(0), "{err}");
    let first = out.lines().next().expect("output");
    assert!(
        first.ends_with(&format!(
            "{} calls in 5000 commits; every plan maps exactly like QEMU's layout",
            spec.calls()
        )),
        "{first}"
    );
    let json: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let transactions = json["transactions"].as_array().unwrap();
    assert_eq!(transactions.len(), 5_000);
    let ops: usize = transactions
        .iter()
        .map(|t| t["ops"].as_array().unwrap().len())
        .sum();
    assert_eq!(json["ioctls"].as_u64(), Some(ops as u64));
    assert_eq!(json["qemu_ioctls"].as_u64(), Some(spec.calls() as u64));
    assert!(peak_kib > 0, "no peak RSS reported");
    assert!(peak_kib < 64 * 1024, "peak RSS {peak_kib} KiB");
}
