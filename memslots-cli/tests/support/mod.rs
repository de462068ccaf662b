//! What every CLI test needs: run the binary, read its JSON line, find the committed traces.

// Each test file uses a different subset of these helpers.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Runs the `memslots` binary with `args`.
pub fn memslots(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_memslots"))
        .args(args)
        .output()
        .expect("run memslots")
}

/// The arguments of `memslots plan --from FROM --to TO`.
pub fn plan_args<'a>(from: &'a Path, to: &'a Path) -> Vec<&'a str> {
    let utf8 = |p: &'a Path| p.to_str().expect("a UTF-8 temp path");
    vec!["plan", "--from", utf8(from), "--to", utf8(to)]
}

/// Runs `memslots plan --from FROM --to TO --json`.
pub fn plan_json(from: &Path, to: &Path) -> Output {
    let mut args = plan_args(from, to);
    args.push("--json");
    memslots(&args)
}

/// The JSON object on the last line of stdout.
pub fn last_json(out: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().expect("output");
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"))
}

/// Stderr as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The keys of a JSON object.
pub fn keys(v: &serde_json::Value) -> BTreeSet<String> {
    v.as_object().expect("object").keys().cloned().collect()
}

/// Whether `/dev/kvm` opens; if not, says loudly on stderr which checks (`what`) did not run.
pub fn kvm_usable(what: &str) -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        eprintln!("SKIPPED: /dev/kvm cannot be opened; {what} did not run");
    }
    ok
}

/// The path of a committed trace.
pub fn trace(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/data/traces")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

/// Every committed trace (`tests/data/traces/*.log`), sorted.
pub fn traces() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/data/traces");
    memslots_testkit::trace::Trace::files_in(&dir).expect("the traces directory")
}

/// The fields of the `stress`/`replay` JSON object (issues 5 and 8).
pub const REPORT_FIELDS: [&str; 18] = [
    "backend",
    "strategy",
    "trigger",
    "workload",
    "vcpus",
    "updates",
    "ioctls",
    "guest_accesses",
    "spurious_exits",
    "internal_errors",
    "data_errors",
    "lost_dirty_pages",
    "rollbacks",
    "blackout_us",
    "update_us",
    "layout_matches",
    "rss_kib_start",
    "rss_kib_end",
];

/// The fields `replay --backend kvm` adds to [`REPORT_FIELDS`] (issue 17, item 9): what the
/// guest's probes cover. `stress` has none of them.
pub const REPLAY_KVM_FIELDS: [&str; 3] = ["probed_bytes", "hole_bytes", "hole_bytes_probed"];

/// [`REPORT_FIELDS`] as a set.
/// The report's problem counters, which a clean run keeps at 0.
pub const DETECTORS: [&str; 4] = [
    "spurious_exits",
    "internal_errors",
    "data_errors",
    "lost_dirty_pages",
];

/// Asserts that a stress or replay report saw no problem.
pub fn assert_no_problems(report: &serde_json::Value) {
    for k in DETECTORS {
        assert_eq!(report[k], 0, "{k}: {report}");
    }
}

pub fn report_fields() -> BTreeSet<String> {
    REPORT_FIELDS.iter().map(|s| s.to_string()).collect()
}

/// A file in the temp directory, removed when dropped.
pub struct Temp(PathBuf);

impl std::ops::Deref for Temp {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Temp {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Writes `text` to a fresh temp file named after `name` and this process.
pub fn temp(name: &str, text: &str) -> Temp {
    let path = std::env::temp_dir().join(format!("memslots-{}-{name}", std::process::id()));
    std::fs::write(&path, text).expect("write temp file");
    Temp(path)
}
