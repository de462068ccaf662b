//! The listener API driven the way QEMU drives its KVM listener, from every committed trace: each
//! QEMU slot call becomes a `region_del` / `region_add` of the section it stands for.

use std::collections::HashMap;
use std::path::PathBuf;

use memslots::model::{Layout, Limits, SlotFlags};
use memslots::planner::{Listener, MemoryMap, Section};
use memslots_testkit::replay::qemu_commits;
use memslots_testkit::trace::Trace;

#[test]
fn every_trace_through_the_listener() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/data/traces");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|x| x != "log") {
            continue;
        }
        seen += 1;
        let name = path.display().to_string();
        let trace = Trace::from_file(&path).unwrap();
        let commits = qemu_commits(&trace, Limits::default()).unwrap();
        let mut listener = Listener::new(Limits::default());
        let mut sections: HashMap<u32, Section> = HashMap::new();
        let mut layout = Layout::new(Limits::default());
        for commit in &commits {
            listener.begin().unwrap();
            for tc in trace.calls[commit.calls.clone()]
                .iter()
                .filter(|t| t.accepted())
            {
                if let Some(old) = sections.remove(&tc.call.slot) {
                    listener.region_del(old).unwrap();
                }
                if !tc.call.is_delete() {
                    let s = Section {
                        address_space: tc.call.id().address_space,
                        gpa: tc.call.gpa,
                        size: tc.call.size,
                        host: tc.call.host,
                        flags: SlotFlags(tc.call.flags),
                    };
                    listener.region_add(s).unwrap();
                    sections.insert(tc.call.slot, s);
                }
            }
            let plan = listener.commit().unwrap_or_else(|e| panic!("{name}: {e}"));
            let window = layout.holes(&plan.slot_calls()).unwrap().quiesce_window();
            assert_eq!(plan.quiesced_range(), window, "{name}");
            layout.apply_batch(&plan.slot_calls()).unwrap();
            assert_eq!(listener.layout(), &layout, "{name}");
            assert_eq!(MemoryMap::from_layout(&layout), commit.target, "{name}");
            assert_eq!(listener.map(), commit.target, "{name}");
        }
    }
    assert!(seen > 0, "no traces in {}", dir.display());
}
