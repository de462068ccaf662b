//! `memslots stress`, `replay` and `bench` driven as a user would: the binary, its output and exit
//! status, good and bad input.

mod support;

use support::{kvm_usable, last_json, memslots, trace, REPORT_FIELDS};

#[test]
fn stress_json_has_the_contract_fields_and_atomic_is_clean() {
    if !kvm_usable("the live stress runs") {
        return;
    }
    let out = memslots(&["stress", "--updates", "200", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let j = last_json(&out);
    for f in REPORT_FIELDS {
        assert!(j.get(f).is_some(), "missing {f}: {j}");
    }
    for f in ["p50", "p99", "max", "total"] {
        assert!(j["blackout_us"][f].is_number(), "blackout_us.{f}");
    }
    assert_eq!(j["backend"], "kvm");
    assert_eq!(j["strategy"], "atomic");
    assert_eq!(j["workload"], "mixed");
    assert_eq!(j["updates"], 200);
    assert_eq!(j["spurious_exits"], 0);
    assert_eq!(j["internal_errors"], 0);
    assert_eq!(j["data_errors"], 0);
    assert_eq!(j["lost_dirty_pages"], 0);
    assert!(j["layout_matches"].is_null());
}

#[test]
fn injected_faults_roll_back_and_the_guest_stays_clean() {
    if !kvm_usable("the live stress runs") {
        return;
    }
    let out = memslots(&[
        "stress",
        "--updates",
        "300",
        "--inject-faults",
        "0.2",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j = last_json(&out);
    // 300 batches of at least one call at p = 0.2: a run with no fault is all but impossible.
    assert!(j["rollbacks"].as_u64().unwrap() > 0, "{j}");
    assert_eq!(j["updates"], 300);
    for f in [
        "spurious_exits",
        "internal_errors",
        "data_errors",
        "lost_dirty_pages",
    ] {
        assert_eq!(j[f], 0, "{f}: {j}");
    }
    let (start, end) = (j["rss_kib_start"].as_u64(), j["rss_kib_end"].as_u64());
    assert!(start.unwrap() > 0 && end.unwrap() >= start.unwrap(), "{j}");
}

#[test]
fn naive_pam_reproduces_the_bug_and_still_exits_0() {
    if !kvm_usable("the live stress runs") {
        return;
    }
    let out = memslots(&[
        "stress",
        "--strategy",
        "naive",
        "--workload",
        "pam",
        "--updates",
        "400",
        "--json",
    ]);
    assert!(out.status.success());
    let j = last_json(&out);
    assert!(j["spurious_exits"].as_u64().unwrap() > 0, "{j}");
    assert!(j["internal_errors"].as_u64().unwrap() > 0, "{j}");
}

#[test]
fn replay_json_and_layout_matches() {
    if !kvm_usable("the live stress runs") {
        return;
    }
    let t = trace("pc-512m-std.log");
    let out = memslots(&["replay", &t, "--loops", "2", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let j = last_json(&out);
    for f in REPORT_FIELDS {
        assert!(j.get(f).is_some(), "missing {f}");
    }
    assert_eq!(j["layout_matches"], true);
    assert_eq!(j["spurious_exits"], 0);
}

#[test]
fn bad_arguments_and_input_exit_2_with_a_message() {
    for args in [
        &["stress", "--vcpus", "0"][..],
        &["stress", "--workload", "nope"],
        &["stress", "--strategy", "sometimes"],
        &["stress", "--updates", "many"],
        &["stress", "--updates", "5", "--duration", "1"],
        &["stress", "--inject-faults", "2", "--updates", "1"],
        &["stress", "--duration", "-3"],
        &["replay"],
        &["replay", "/nonexistent/trace.log"],
        &["bench", "--sideways"],
    ] {
        let out = memslots(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(!out.stderr.is_empty(), "{args:?} says why");
    }
    let out = memslots(&["replay", "/nonexistent/trace.log"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/trace.log"));
}

#[test]
fn replay_of_a_malformed_trace_names_the_line() {
    let path = std::env::temp_dir().join(format!("memslots-{}-bad-replay.log", std::process::id()));
    std::fs::write(
        &path,
        "kvm_set_user_memory Slot#0 flags=0x0 gpa=0x0 size=0x1000 ua=0x7f0000000000 ret=0\n\
         kvm_set_user_memory Slot#1 flags=0x0 gpa=nope size=0x1000 ua=0x7f0000000000 ret=0\n",
    )
    .expect("write");
    let out = memslots(&["replay", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&path);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 2"));
}
