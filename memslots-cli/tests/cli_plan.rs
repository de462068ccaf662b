//! `memslots plan` driven as a user would: output, JSON last line, SVG, exit status on bad input.

mod support;

use support::{last_json, memslots, plan_args, plan_json, stderr, temp, trace};

#[test]
fn trace_json_has_exactly_the_issue_fields() {
    let svg = temp("trace.svg", "");
    let out = memslots(&[
        "plan",
        &trace("pc-512m-std.log"),
        "--json",
        "--svg",
        svg.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let json = last_json(&out);
    let mut keys: Vec<&str> = json
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "ioctls",
            "qemu_inhibited_ioctls",
            "qemu_ioctls",
            "qemu_zapped_bytes",
            "quiesced_ioctls",
            "transactions",
            "zapped_bytes"
        ]
    );
    let transactions = json["transactions"].as_array().unwrap();
    let ops: Vec<&serde_json::Value> = transactions
        .iter()
        .flat_map(|t| t["ops"].as_array().unwrap())
        .collect();
    assert_eq!(ops.len() as u64, json["ioctls"].as_u64().unwrap());
    let mut op_keys: Vec<&str> = ops[0]
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    op_keys.sort();
    assert_eq!(
        op_keys,
        [
            "drops_dirty_bitmap",
            "flags",
            "gpa",
            "quiesced",
            "size",
            "slot",
            "ua"
        ]
    );
    let quiesced = ops.iter().filter(|o| o["quiesced"] == true).count() as u64;
    assert_eq!(quiesced, json["quiesced_ioctls"].as_u64().unwrap());
    assert_eq!(json["qemu_ioctls"], 35);
    // The trace's own host addresses are kept.
    assert!(ops.iter().any(|o| o["ua"] == 0x7fc2_7fe0_0000u64));
    let drawing = std::fs::read_to_string(&*svg).unwrap();
    assert!(drawing.starts_with("<svg") && drawing.contains("commit 7"));
}

const A: &str = r#"{"backings": {"ram": {"host": "0x7f0000000000", "size": "0x40000000"}},
  "regions": [{"gpa": "0x0", "size": "0x40000000", "backing": "ram"}]}"#;
const B: &str = r#"{"backings": {"ram": {"host": "0x7f0000000000", "size": "0x40000000"},
                 "rom": {"host": "0x7f1000000000", "size": "0x20000"}},
  "regions": [{"gpa": "0x0", "size": "0xc0000", "backing": "ram"},
              {"gpa": "0xc0000", "size": "0x20000", "backing": "rom", "readonly": true},
              {"gpa": "0xe0000", "size": "0x3ff20000", "backing": "ram", "offset": "0xe0000"}]}"#;

#[test]
fn two_maps_give_one_transaction() {
    let (a, b) = (temp("a.json", A), temp("b.json", B));
    let out = plan_json(&a, &b);
    assert!(out.status.success(), "{}", stderr(&out));
    let json = last_json(&out);
    assert_eq!(json["transactions"].as_array().unwrap().len(), 1);
    // The ROM lands in the 0xc0000..0x100000 slot the boot cut: that slot is all that is zapped.
    assert_eq!(json["zapped_bytes"], 0x4_0000);
    assert_eq!(json["qemu_zapped_bytes"], 0x4000_0000);
    assert!(json["quiesced_ioctls"].as_u64().unwrap() <= json["ioctls"].as_u64().unwrap());
}

#[test]
fn malformed_trace_names_its_line_and_exits_2() {
    let bad = temp(
        "bad.log",
        "kvm_set_user_memory Slot#0 flags=0x0 gpa=0x0 size=0x1000 ua=0x7f0000000000 ret=0\n\
         kvm_set_user_memory Slot#1 flags=0x0 gpa=zz size=0x1000 ua=0x7f0000001000 ret=0\n",
    );
    let out = memslots(&["plan", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let place = format!("{}:2: ", bad.display());
    assert!(stderr(&out).contains(&place), "{}", stderr(&out));
}

#[test]
fn overlapping_map_names_the_regions_and_exits_2() {
    let a = temp("ok.json", A);
    let b = temp(
        "overlap.json",
        r#"{"regions": [{"gpa": "0x0", "size": "0x2000", "host": "0x7f0000000000"},
                       {"gpa": "0x1000", "size": "0x1000", "host": "0x7f1000000000"}]}"#,
    );
    let out = memslots(&plan_args(&a, &b));
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("regions[1] overlaps regions[0]"), "{err}");
    assert!(err.contains("overlap.json"), "{err}");
}

#[test]
fn json_syntax_error_gives_line_and_column() {
    let a = temp(
        "syntax.json",
        "{\n \"regions\": [\n  {\"gpa\": 0x0}\n ]\n}\n",
    );
    let out = memslots(&plan_args(&a, &a));
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("syntax.json:3:"), "{}", stderr(&out));
}

#[test]
fn map_with_more_slots_than_the_kernel_allows_exits_2() {
    let regions: Vec<String> = (0..32_765u64)
        .map(|i| {
            format!(
                r#"{{"gpa": {}, "size": 4096, "host": {}}}"#,
                i * 0x2000,
                0x7f00_0000_0000u64 + i * 0x2000
            )
        })
        .collect();
    let big = temp(
        "big.json",
        &format!(r#"{{"regions": [{}]}}"#, regions.join(",")),
    );
    let out = memslots(&plan_args(&big, &big));
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("32765 slot ids") && err.contains("32764"),
        "{err}"
    );
}

#[test]
fn missing_files_and_bad_arguments_exit_2() {
    let out = memslots(&["plan", "/nonexistent/trace.log"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("/nonexistent/trace.log"),
        "{}",
        stderr(&out)
    );
    let out = memslots(&[
        "plan",
        "--from",
        "/nonexistent/a.json",
        "--to",
        "/nonexistent/b.json",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("/nonexistent/a.json"),
        "{}",
        stderr(&out)
    );
    let out = memslots(&["plan"]);
    assert_eq!(out.status.code(), Some(2));
    let out = memslots(&["plan", "--from", "/nonexistent/a.json"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn a_map_past_the_maximum_guest_frame_is_refused() {
    let a = temp(
        "top-a.json",
        r#"{"regions":[{"gpa":"0x0","size":"0x1000","host":"0x7f0000000000"}]}"#,
    );
    let b = temp(
        "top-b.json",
        r#"{"regions":[{"gpa":"0xffffffffff000","size":"0x2000","host":"0x7f0000000000"}]}"#,
    );
    let out = memslots(&plan_args(&a, &b));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("maximum guest frame"), "{err}");
    // One page lower fits: the last frame is the maximum itself.
    let c = temp(
        "top-c.json",
        r#"{"regions":[{"gpa":"0xffffffffff000","size":"0x1000","host":"0x7f0000000000"}]}"#,
    );
    let out = memslots(&plan_args(&a, &c));
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn a_qemu_7_2_trace_with_smm_slots_plans() {
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/data/traces/smm/q35-2g-smm-handmade.log");
    let out = memslots(&["plan", path.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let json = last_json(&out);
    let smm_ops = json["transactions"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|t| t["ops"].as_array().unwrap())
        .filter(|o| o["slot"].as_u64().unwrap() >> 16 == 1)
        .count();
    assert!(smm_ops > 0, "no address-space-1 op planned");
    let out = memslots(&["conformance", "--trace", path.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(last_json(&out)["mismatches"], 0);
}

#[test]
fn ops_that_drop_a_dirty_bitmap_say_so() {
    let logged = |gpa: &str, log: bool| {
        format!(r#"{{"gpa":"0x{gpa}","size":"0x100000","host":"0x7f000{gpa}","log_dirty":{log}}}"#)
    };
    let a = temp(
        "dirty-a.json",
        &format!(
            r#"{{"regions":[{},{}]}}"#,
            logged("100000", true),
            logged("300000", true)
        ),
    );
    let b = temp(
        "dirty-b.json",
        &format!(r#"{{"regions":[{}]}}"#, logged("100000", false)),
    );
    let out = plan_json(&a, &b);
    assert!(out.status.success(), "{}", stderr(&out));
    let json = last_json(&out);
    let ops = json["transactions"][0]["ops"].as_array().unwrap();
    // Logging turned off on one, the other deleted: both drop their bitmap.
    assert_eq!(ops.len(), 2, "{json}");
    for op in ops {
        assert_eq!(op["drops_dirty_bitmap"], true, "{op}");
    }
}

/// A trace of `commits` commits made in code: slot 1 (one page) deleted and created again at
/// another GPA in each.
fn long_trace(commits: usize) -> String {
    let line = |slot: u32, gpa: u64, size: u64| {
        format!(
            "kvm_set_user_memory Slot#{slot} flags=0x0 gpa={gpa:#x} size={size:#x} ua={:#x} ret=0\n",
            0x7f00_0000_0000_u64 + gpa
        )
    };
    let mut text = line(0, 0, 0x10_0000);
    text += &line(1, 0x10_0000, 0x1000);
    for i in 1..commits {
        let gpa = 0x10_0000 + (i as u64 % 2) * 0x1000;
        let old = 0x10_0000 + ((i as u64 + 1) % 2) * 0x1000;
        text += &line(1, old, 0);
        text += &line(1, gpa, 0x1000);
    }
    text
}

#[test]
fn svg_of_a_trace_too_large_to_draw_is_refused() {
    let svg = temp("long.svg", "");
    let _ = std::fs::remove_file(&*svg);
    let t = temp("long-trace.log", &long_trace(1_000));
    let out = memslots(&["plan", t.to_str().unwrap(), "--svg", svg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("too large to draw") && err.contains("1000 commits"),
        "{err}"
    );
    assert!(!svg.exists(), "nothing is written");
    // The same trace without --svg plans, and a short one still draws.
    let out = memslots(&["plan", t.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let t = temp("short-trace.log", &long_trace(10));
    let out = memslots(&["plan", t.to_str().unwrap(), "--svg", svg.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(std::fs::read_to_string(&*svg).unwrap().starts_with("<svg"));
}
