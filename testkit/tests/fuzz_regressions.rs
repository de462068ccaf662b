//! Replays every saved fuzz input (`fuzz/regressions/<target>/*`) through the same harness the
//! fuzz targets run, so what the fuzzers once found stays fixed.

#[path = "../../fuzz/harness.rs"]
mod harness;

use std::path::PathBuf;

fn replay(target: &str, check: fn(&[u8])) -> usize {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/regressions")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.is_file() && p.file_name().is_some_and(|n| n != ".gitkeep"))
        .collect();
    files.sort();
    for file in &files {
        let data = std::fs::read(file).expect("read input");
        eprintln!("replaying {}", file.display());
        check(&data);
    }
    files.len()
}

#[test]
fn trace_inputs() {
    let n = replay("trace", harness::trace);
    assert!(n > 0, "no saved trace inputs");
}

#[test]
fn batch_inputs() {
    let n = replay("batch", harness::batch);
    assert!(n > 0, "no saved batch inputs");
}

#[test]
fn map_json_inputs() {
    let n = replay("map_json", harness::map_json);
    assert!(n > 0, "no saved map inputs");
}

#[test]
fn planner_inputs() {
    let n = replay("planner", harness::planner);
    assert!(n > 0, "no saved planner inputs");
}
