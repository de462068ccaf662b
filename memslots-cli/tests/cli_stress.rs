//! `memslots stress`, `replay` and `bench` driven as a user would: the binary, its output and exit
//! status, good and bad input.

mod support;

use support::{
    assert_no_problems, kvm_usable, last_json, memslots, trace, REPLAY_KVM_FIELDS, REPORT_FIELDS,
};

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
    for f in REPLAY_KVM_FIELDS {
        assert!(j.get(f).is_none(), "stress has replay's {f}: {j}");
    }
    for f in ["p50", "p99", "max", "total"] {
        assert!(j["blackout_us"][f].is_number(), "blackout_us.{f}");
    }
    assert_eq!(j["backend"], "kvm");
    assert_eq!(j["strategy"], "atomic");
    assert_eq!(j["trigger"], "guest", "guest-triggered by default");
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
    assert_no_problems(&j);
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
    for f in REPORT_FIELDS.iter().chain(&REPLAY_KVM_FIELDS) {
        assert!(j.get(f).is_some(), "missing {f}");
    }
    assert_eq!(j["layout_matches"], true);
    assert_eq!(j["spurious_exits"], 0);
    // What the probes cover: pc-512m-std's QEMU calls delete the RAM slot, so some hole bytes
    // are under a probe, and no more than the probes cover.
    let probed = j["probed_bytes"].as_u64().expect("probed_bytes");
    let holes = j["hole_bytes"].as_u64().expect("hole_bytes");
    let in_holes = j["hole_bytes_probed"].as_u64().expect("hole_bytes_probed");
    assert!(
        in_holes > 0 && in_holes <= probed && in_holes <= holes,
        "{j}"
    );
}

#[test]
fn bench_json_has_the_contract_names_each_with_baseline_and_ratio() {
    if !kvm_usable("the bench") {
        return;
    }
    // `--smoke`: a round or two of everything, the output's shape only (no figure is judged; the
    // one figure it leaves out is soft_setup_32764_vs_gm_atomic, minutes in a debug build).
    let out = memslots(&["bench", "--smoke", "--json"]);
    assert!(out.status.success(), "{}", support::stderr(&out));
    let j = last_json(&out);
    for f in ["cpu", "kernel", "cores"] {
        assert!(j["machine"].get(f).is_some(), "machine.{f}: {j}");
    }
    assert!(j["machine"]["cores"].as_u64().unwrap() > 0);
    let results = j["results"].as_array().expect("results");
    let mut names = std::collections::BTreeSet::new();
    // The scale rows (run on small traces by --smoke; their names say how small) also carry
    // the peak resident memory their run added.
    let scale = |name: &str| {
        (name.starts_with("plan_trace_") && name.ends_with("_commits"))
            || (name.starts_with("conformance_trace_") && name.ends_with("_slots"))
    };
    let mut scale_rows = 0;
    for r in results {
        let fields: std::collections::BTreeSet<String> = support::keys(r);
        let mut want: std::collections::BTreeSet<String> = [
            "name",
            "unit",
            "value",
            "baseline_name",
            "baseline_value",
            "ratio",
        ]
        .map(String::from)
        .into();
        if scale(r["name"].as_str().unwrap()) {
            scale_rows += 1;
            want.insert("peak_rss_growth_kib".into());
            assert!(r["peak_rss_growth_kib"].is_u64(), "{r}");
        }
        assert_eq!(fields, want, "{r}");
        assert!(
            r["value"].is_number() && r["baseline_value"].is_number(),
            "{r}"
        );
        assert!(!r["baseline_name"].as_str().unwrap().is_empty(), "{r}");
        // A ratio is value / baseline, and null exactly when the baseline is 0.
        let (v, b) = (
            r["value"].as_f64().unwrap(),
            r["baseline_value"].as_f64().unwrap(),
        );
        if b == 0.0 {
            assert!(r["ratio"].is_null(), "{r}");
        } else {
            let ratio = r["ratio"].as_f64().expect("a ratio");
            assert!((ratio - v / b).abs() <= 1e-9 * ratio.abs().max(1.0), "{r}");
        }
        assert!(
            names.insert(r["name"].as_str().unwrap().to_owned()),
            "twice: {r}"
        );
    }
    let mut want: Vec<String> = [
        "soft_setup_32764",
        "soft_translate_p50_32764",
        "soft_translate_p50_32764_vs_gm_atomic",
        "soft_translate_p50_32764_writer",
        "soft_translate_p50_32764_writer_vs_gm_atomic",
        "soft_move_batch_32764",
        "soft_move_batch_32764_vs_gm_atomic",
        "soft_mixed_8_call_batch_32764",
        "soft_mixed_8_call_batch_32764_vs_gm_atomic",
        "plan_32764",
    ]
    .map(String::from)
    .into();
    for w in ["pam", "resize", "bar"] {
        for what in ["blackout", "blackout_mean", "blackout_held"] {
            want.push(format!("{what}_atomic_vs_qemu_{w}"));
            want.push(format!("{what}_atomic_vs_floor_{w}"));
        }
        want.push(format!("blackout_guest_atomic_vs_qemu_{w}"));
        want.push(format!("blackout_guest_1vcpu_atomic_vs_floor_{w}"));
    }
    for n in [1, 2, 4] {
        want.push(format!("kick_park_p50_{n}vcpu"));
        want.push(format!("kick_park_p99_{n}vcpu"));
    }
    for op in ["create", "delete", "move", "flags_only"] {
        for n in [10, 509, 32764] {
            want.push(format!("ioctl_{op}_{n}"));
        }
    }
    for t in support::traces() {
        let t = t
            .file_stem()
            .unwrap()
            .to_string_lossy()
            .replace(['-', '.'], "_");
        want.push(format!("plan_trace_{t}"));
        want.push(format!("blackout_atomic_vs_qemu_trace_{t}"));
        want.push(format!("blackout_atomic_vs_floor_trace_{t}"));
    }
    for w in &want {
        assert!(names.contains(w), "missing {w}");
    }
    assert_eq!(
        scale_rows, 2,
        "plan_trace_N_commits and conformance_trace_N_slots"
    );
    // Every figure is in the table too, with its baseline.
    let table = String::from_utf8_lossy(&out.stdout);
    for r in results {
        let (n, b) = (
            r["name"].as_str().unwrap(),
            r["baseline_name"].as_str().unwrap(),
        );
        assert!(
            table
                .lines()
                .any(|l| l.starts_with(&format!("{n} ")) && l.contains(b)),
            "{n} not in the table"
        );
    }
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
        &["bench", "--quick", "--smoke"],
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
    let place = format!("{}:2: ", path.display());
    assert!(String::from_utf8_lossy(&out.stderr).contains(&place));
}
