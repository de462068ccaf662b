//! Issue 17, items 5 and 6: no panic on any input or output, and every error said once, naming its
//! file and line.

mod support;

use std::process::{Command, Stdio};

use support::{memslots, plan_args, stderr, temp, trace};

/// Asserts a bad-input exit: status 2, no panic, and `want` in the one-line message.
fn bad_input(args: &[&str], want: &str) -> String {
    let out = memslots(args);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    assert!(!err.contains("panicked"), "{args:?}: {err}");
    assert!(err.contains(want), "{args:?}: want `{want}` in: {err}");
    err
}

#[test]
fn a_closed_stdout_ends_quietly_with_status_0() {
    for args in [
        vec!["plan", &trace("pc-512m-std.log") as &str, "--json"],
        vec!["conformance", "--trace", &trace("q35-ovmf.log")],
        vec!["plan", "--help"],
    ] {
        // The reading end is closed before the tool writes anything, so its first write fails
        // with EPIPE, as `memslots plan ... | head -1` does once head has its line.
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        let out = Command::new(env!("CARGO_BIN_EXE_memslots"))
            .args(&args)
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .expect("run memslots");
        let err = stderr(&out);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        if args[1] != "--help" {
            // clap prints help itself; the tool's own output must end with status 0.
            assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
            assert!(err.is_empty(), "{args:?}: {err}");
        }
    }
}

#[test]
fn durations_are_bounded() {
    for d in ["1e20", "1e300", "inf", "NaN", "0", "-1"] {
        bad_input(
            &["stress", "--backend", "soft", &format!("--duration={d}")],
            "--duration takes a positive number of seconds up to",
        );
    }
}

#[test]
fn unknown_bench_sections_are_refused() {
    bad_input(&["bench", "--only", "nonsense"], "nonsense");
    bad_input(&["bench", "--only", "planner,nope"], "nope");
}

#[test]
fn a_map_error_is_printed_once() {
    let a = temp(
        "once-a.json",
        r#"{"regions":[{"gpa":"0x0","size":"0x2000","host":"0x7f0000000000"}]}"#,
    );
    let b = temp(
        "once-b.json",
        r#"{"regions":[{"gpa":"0x0","size":"0x2000","host":"0x7f0000000000"},
                       {"gpa":"0x1000","size":"0x1000","host":"0x7f0000100000"}]}"#,
    );
    let err = bad_input(&plan_args(&a, &b), "regions[1] overlaps regions[0]");
    assert_eq!(err.matches("overlaps").count(), 1, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn a_number_too_large_says_so() {
    let a = temp(
        "big-a.json",
        r#"{"regions":[{"gpa":18446744073709551616,"size":"0x1000","host":"0x1000"}]}"#,
    );
    let err = bad_input(&plan_args(&a, &a), "not a whole number from 0 to 2^64 - 1");
    assert!(!err.contains("untagged"), "{err}");
    assert!(err.contains(&format!("{}:1:", a.display())), "{err}");
}

#[test]
fn trace_errors_name_file_and_line() {
    let ok = "kvm_set_user_memory Slot#0 flags=0x0 gpa=0x0 size=0x1000 ua=0x7f0000000000 ret=0";
    for (bad, want) in [
        (
            "kvm_set_user_memory Slot#1 flags=0x0 gpa=0x0 gpa=0x5000 size=0x1000 ua=0x1000 ret=0",
            "gpa= is given twice",
        ),
        (
            "kvm_set_user_memory Slot#1 flags=0x0 gpa=0x0 size=0x1000 ua=0x1000 ret=-2147483648",
            "is not 0 or a negative errno",
        ),
    ] {
        let t = temp("bad.log", &format!("{ok}\n{bad}\n"));
        let place = format!("{}:2: malformed", t.display());
        for args in [
            vec!["plan", t.to_str().unwrap()],
            vec!["conformance", "--trace", t.to_str().unwrap()],
        ] {
            let err = bad_input(&args, &place);
            assert!(err.contains(want), "{err}");
            assert_eq!(err.lines().count(), 1, "{err}");
        }
    }
    // One non-UTF-8 byte names its line instead of rejecting the whole file unnamed.
    let path = std::env::temp_dir().join(format!("memslots-{}-utf8.log", std::process::id()));
    let mut bytes = format!("{ok}\n{ok}\n").into_bytes();
    bytes.extend_from_slice(b"kvm_set_user_memory Slot#1 fl\xffags=0x0\n");
    std::fs::write(&path, bytes).unwrap();
    bad_input(
        &["plan", path.to_str().unwrap()],
        &format!("{}:3: malformed", path.display()),
    );
    std::fs::remove_file(&path).unwrap();
}
