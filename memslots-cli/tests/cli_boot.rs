//! `memslots boot`: the JSON contract, the trace it writes, bad input, and its bench rows.

mod support;

use std::collections::BTreeSet;
use std::path::Path;

use support::{keys, kvm_usable, last_json, memslots, stderr};

const BIOS: &str = "/usr/share/seabios/bios.bin";

/// Whether the boot can run here; says loudly which checks (`what`) did not when it cannot.
fn can_boot(what: &str) -> bool {
    if !kvm_usable(what) {
        return false;
    }
    if !Path::new(BIOS).exists() {
        eprintln!("SKIPPED: {BIOS} is missing (Debian package `seabios`); {what} did not run");
        return false;
    }
    true
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

#[test]
fn boot_json_has_the_contract_and_the_trace_reads_back() {
    if !can_boot("the boot JSON check") {
        return;
    }
    let out_path = std::env::temp_dir().join(format!("memslots-{}-boot.log", std::process::id()));
    let out = memslots(&[
        "boot",
        "--vcpus",
        "2",
        "--json",
        "--trace-out",
        out_path.to_str().unwrap(),
        "--time-limit",
        "300",
    ]);
    let trace = std::fs::read_to_string(&out_path);
    let _ = std::fs::remove_file(&out_path);
    assert!(out.status.success(), "{}", stderr(&out));
    let j = last_json(&out);
    assert_eq!(
        keys(&j),
        set(&[
            "bios",
            "vcpus",
            "memory_mib",
            "strategy",
            "boots",
            "ok",
            "cpus_found_min",
            "pam_writes",
            "commits",
            "ioctls",
            "quiesced_ioctls",
            "blackout_us",
            "internal_errors",
            "boot_ms",
            "final_map_matches_qemu",
        ]),
        "{j}"
    );
    assert_eq!(
        keys(&j["blackout_us"]),
        set(&["p50", "p99", "max", "total"])
    );
    assert_eq!(keys(&j["boot_ms"]), set(&["p50", "max"]));
    assert_eq!(j["bios"], BIOS);
    assert_eq!(
        (j["vcpus"].as_u64(), j["memory_mib"].as_u64()),
        (Some(2), Some(512))
    );
    assert_eq!(j["strategy"], "atomic");
    assert_eq!(
        (j["boots"].as_u64(), j["ok"].as_u64()),
        (Some(1), Some(1)),
        "{j}"
    );
    assert_eq!(j["cpus_found_min"].as_u64(), Some(2), "{j}");
    assert_eq!(j["internal_errors"].as_u64(), Some(0), "{j}");
    assert_eq!(j["final_map_matches_qemu"], true, "{j}");
    let commits = j["commits"].as_u64().unwrap();
    assert!(
        commits >= 2 && commits <= j["pam_writes"].as_u64().unwrap(),
        "{j}"
    );
    assert!(j["quiesced_ioctls"].as_u64() <= j["ioctls"].as_u64(), "{j}");
    let ms = &j["boot_ms"];
    assert!(ms["p50"].as_f64().unwrap() > 0.0 && ms["p50"].as_f64() <= ms["max"].as_f64());

    // --trace-out: QEMU 7.2's format, one line per slot ioctl, every one accepted.
    let trace = trace.expect("the trace file");
    let parsed = memslots_testkit::trace::Trace::parse(&trace).unwrap();
    assert_eq!(parsed.calls.len() as u64, j["ioctls"].as_u64().unwrap());
    assert!(parsed.calls.iter().all(|c| c.accepted()));
    assert!(trace
        .lines()
        .all(|l| l.starts_with("kvm_set_user_memory Slot#")));
}

#[test]
fn bad_input_exits_2_and_says_why() {
    let out = memslots(&["boot", "--bios", "/nonexistent/bios.bin"]);
    assert_eq!(out.status.code(), Some(2));
    let e = stderr(&out);
    assert!(
        e.contains("/nonexistent/bios.bin") && e.contains("seabios"),
        "{e}"
    );
    for (args, says) in [
        (&["boot", "--vcpus", "0"][..], "--vcpus"),
        (&["boot", "--memory", "1"], "--memory"),
        (&["boot", "--boots", "0"], "--boots"),
        (&["boot", "--strategy", "sometimes"], "--strategy"),
        (&["boot", "--hlt-exits", "maybe"], "--hlt-exits"),
    ] {
        let out = memslots(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(stderr(&out).contains(says), "{args:?}: {}", stderr(&out));
    }
    // A file that is not a BIOS image.
    let tiny = support::temp("not-a-bios", "hello");
    let out = memslots(&["boot", "--bios", tiny.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("not a BIOS image"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn bench_boot_rows_are_atomic_against_qemu() {
    if !can_boot("the boot bench rows") {
        return;
    }
    let out = memslots(&["bench", "--only", "boot", "--smoke", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let j = last_json(&out);
    let rows = j["results"].as_array().unwrap();
    for n in [2, 8] {
        let name = format!("boot_pam_blackout_atomic_vs_qemu_{n}vcpu");
        let r = rows
            .iter()
            .find(|r| r["name"] == name.as_str())
            .unwrap_or_else(|| panic!("no {name}: {j}"));
        assert_eq!(
            r["baseline_name"],
            format!("boot_pam_blackout_qemu_{n}vcpu")
        );
        assert_eq!(r["unit"], "us");
        // QEMU's rule holds every vCPU out for the read-only step's deletes: never free.
        assert!(r["baseline_value"].as_f64().unwrap() > 0.0, "{r}");
    }
}
