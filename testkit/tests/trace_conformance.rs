//! Every committed QEMU trace is predicted call for call by the model.

use memslots::model::Limits;
use memslots_testkit::conformance::run_trace;
use memslots_testkit::trace::Trace;

mod support;
use support::{dirty_log_traces, smm_traces, traces};

#[test]
fn every_trace_is_predicted() {
    let all = traces();
    assert!(
        all.len() >= 8,
        "expected the captured traces, found {all:?}"
    );
    for path in all
        .into_iter()
        .chain(smm_traces())
        .chain(dirty_log_traces())
    {
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

#[test]
fn qemu_7_2_smm_slots_are_read_and_predicted() {
    let all = smm_traces();
    assert!(!all.is_empty(), "no SMM trace");
    for path in all {
        let trace = Trace::from_file(&path).expect("parses");
        let smm = trace
            .calls
            .iter()
            .filter(|c| c.call.id().address_space == 1)
            .count();
        assert!(smm > 0, "{}: no address-space-1 call", path.display());
        let report = run_trace(&trace, Limits::default());
        assert_eq!(report.mismatches, 0, "{:#?}", report.first_mismatch);
    }
}
