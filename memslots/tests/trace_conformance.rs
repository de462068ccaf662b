//! Every committed QEMU trace is predicted call for call by the model.

use memslots::conformance::run_trace;
use memslots::model::Limits;
use memslots::trace::Trace;

mod support;
use support::traces;

#[test]
fn every_trace_is_predicted() {
    let all = traces();
    assert!(
        all.len() >= 8,
        "expected the captured traces, found {all:?}"
    );
    for path in all {
        let trace = Trace::from_file(&path).expect("parses");
        assert!(!trace.calls.is_empty(), "{}", path.display());
        let report = run_trace(&trace, Limits::default());
        assert_eq!(report.calls as usize, trace.calls.len());
        assert_eq!(
            report.mismatches,
            0,
            "{}: {:#?}",
            path.display(),
            report.first_mismatch
        );
        assert!(trace.commits().len() >= 2, "{}", path.display());
    }
}
