//! Helpers shared by the integration tests.
#![allow(dead_code)] // each test file uses some of them

use std::path::PathBuf;

/// Whether `/dev/kvm` can be used; says so loudly on stderr when it cannot.
pub fn kvm_or_skip() -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            eprintln!("SKIPPED: /dev/kvm cannot be opened ({e}); this KVM test did not run");
            false
        }
    }
}

/// Every committed QEMU trace, sorted.
pub fn traces() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/data/traces");
    memslots_testkit::trace::Trace::files_in(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

/// The hand-made traces with SMM (address space 1) slots, `tests/data/traces/smm/*.log`: kept out
/// of [`traces`] because a replay on a kernel without a second address space cannot run them.
pub fn smm_traces() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/data/traces/smm");
    memslots_testkit::trace::Trace::files_in(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

/// The hand-made traces in which dirty logging stays on across a re-slot,
/// `tests/data/traces/dirty-log/*.log` (see the README there): kept out of [`traces`], which are
/// all captured.
pub fn dirty_log_traces() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/data/traces/dirty-log");
    memslots_testkit::trace::Trace::files_in(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

/// One committed trace by file name.
pub fn trace(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/data/traces")
        .join(name)
}

/// Asserts that the test guest saw no spurious exit, internal error or data error, showing the
/// first problem it recorded otherwise.
pub fn assert_guest_clean(vm: &memslots_testkit::testvm::TestVm) {
    let s = vm.guest_stats();
    assert_eq!(
        (s.spurious_exits, s.internal_errors, s.data_errors),
        (0, 0, 0),
        "{:?}",
        vm.first_problem()
    );
}
