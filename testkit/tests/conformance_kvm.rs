//! The model against the running kernel: random calls agree, and a deliberately wrong model is
//! caught.

use memslots::kvm::Vm;
use memslots::model::{Change, Layout, Limits, Rule, SlotCall};
use memslots_testkit::conformance::{run_random, RandomRun, Report};

/// A VM's limits, or `None` (with a loud note) when `/dev/kvm` cannot be opened.
fn kvm_limits() -> Option<Limits> {
    match Vm::new() {
        Ok(vm) => Some(*vm.limits()),
        Err(err) => {
            eprintln!("SKIPPED: /dev/kvm cannot be used here ({err}); the KVM conformance test did not run");
            None
        }
    }
}

fn seed() -> u64 {
    std::env::var("MEMSLOTS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_2026)
}

fn assert_clean(report: &Report, seed: u64) {
    assert_eq!(
        report.mismatches, 0,
        "seed {seed} (rerun with MEMSLOTS_SEED={seed}): first mismatch {:#?}",
        report.first_mismatch
    );
    assert!(!report.diverged, "seed {seed}");
}

#[test]
fn twenty_thousand_random_calls_agree_and_every_rule_is_exercised() {
    if kvm_limits().is_none() {
        return;
    }
    let seed = seed();
    eprintln!("conformance seed {seed} (set MEMSLOTS_SEED to reproduce)");
    let report = run_random(RandomRun::new(20_000, seed)).expect("run");
    assert_clean(&report, seed);
    assert_eq!(report.calls, 20_000);
    let rules = [
        "slot_id_out_of_range",
        "invalid_flags",
        "unaligned_size",
        "unaligned_gpa",
        "unaligned_host",
        "invalid_host_range",
        "gpa_wraps",
        "too_many_pages",
        "delete_missing",
        "immutable",
        "readonly_toggle",
        "overlap",
        "address_space_out_of_range",
        "gfn_too_high",
    ];
    for rule in rules {
        assert!(
            report.refused_by_rule.get(rule).copied().unwrap_or(0) > 0,
            "rule {rule} never exercised: {:?}",
            report.refused_by_rule
        );
    }
    // The top of the guest physical space is reached from both sides.
    let (at_max, accepted) = report.at_max_gfn;
    eprintln!("calls at the maximum guest frame: {at_max}, {accepted} accepted");
    assert!(accepted > 0 && accepted < at_max, "{:?}", report.at_max_gfn);
    for change in [
        Change::Create,
        Change::Delete,
        Change::Move,
        Change::FlagsOnly,
        Change::Unchanged,
    ] {
        assert!(
            report.changes.get(&change).copied().unwrap_or(0) > 0,
            "{change} never made"
        );
    }
}

#[test]
fn a_model_with_a_wrong_slot_limit_is_caught() {
    let Some(limits) = kvm_limits() else { return };
    let wrong = Limits {
        slots: limits.slots + 1,
        ..limits
    };
    let report = run_random(RandomRun {
        model_limits: Some(wrong),
        ..RandomRun::new(20_000, seed())
    })
    .expect("run");
    assert!(report.mismatches > 0 || report.diverged, "{report:?}");
    let first = report.first_mismatch.expect("a mismatch");
    assert_eq!(
        first.call.slot as u16, limits.slots,
        "the boundary id is the one caught"
    );
}

#[test]
fn a_model_with_a_wrong_max_gfn_is_caught() {
    let Some(limits) = kvm_limits() else { return };
    for max_gfn in [limits.max_gfn + 1, limits.max_gfn - 1] {
        let report = run_random(RandomRun {
            model_limits: Some(Limits { max_gfn, ..limits }),
            ..RandomRun::new(5_000, seed())
        })
        .expect("run");
        let first = report
            .first_mismatch
            .expect("a wrong maximum guest frame is caught");
        let last_gfn = (first.call.gpa + first.call.size - 1) / memslots::model::PAGE_SIZE;
        assert!(
            last_gfn == max_gfn.max(limits.max_gfn),
            "caught at the boundary: {first:?}"
        );
    }
}

fn max_gfn_ignored(
    _: &Layout,
    call: &SlotCall,
    verdict: Result<Change, Rule>,
) -> Result<Change, Rule> {
    match verdict {
        Err(Rule::GfnTooHigh { .. }) => Ok(if call.size > 0 {
            Change::Create
        } else {
            Change::Delete
        }),
        other => other,
    }
}

fn overlap_allowed(
    _: &Layout,
    _: &SlotCall,
    verdict: Result<Change, Rule>,
) -> Result<Change, Rule> {
    match verdict {
        Err(Rule::Overlap { .. }) => Ok(Change::Create),
        other => other,
    }
}

fn readonly_toggle_is_flags_only(
    _: &Layout,
    _: &SlotCall,
    verdict: Result<Change, Rule>,
) -> Result<Change, Rule> {
    match verdict {
        Err(Rule::ReadonlyToggle { .. }) => Ok(Change::FlagsOnly),
        other => other,
    }
}

#[test]
fn a_model_with_a_wrong_rule_is_caught() {
    if kvm_limits().is_none() {
        return;
    }
    for patch in [
        overlap_allowed as memslots_testkit::conformance::ModelPatch,
        readonly_toggle_is_flags_only,
        max_gfn_ignored,
    ] {
        let report = run_random(RandomRun {
            patch: Some(patch),
            ..RandomRun::new(5_000, seed())
        })
        .expect("run");
        let first = report.first_mismatch.expect("the wrong rule is caught");
        assert_eq!(first.what, "result");
        assert!(first.model.accepted && !first.kernel.accepted);
    }
}

#[test]
fn v2_and_guest_memfd_calls_agree_and_every_guest_memfd_rule_is_exercised() {
    let Some(limits) = kvm_limits() else { return };
    let seed = seed();
    let report = run_random(RandomRun::new(20_000, seed)).expect("run");
    assert_clean(&report, seed);
    eprintln!(
        "v2 calls {}, guest_memfd calls {}, guest_memfd slots {}",
        report.v2_calls, report.guest_memfd_calls, report.guest_memfd_slots
    );
    if !limits.user_memory2 {
        eprintln!("SKIPPED: this kernel has no KVM_SET_USER_MEMORY_REGION2; only v1 was checked");
        let refused = report.refused_by_rule.get("v2_unsupported").copied();
        assert_eq!(refused.unwrap_or(0), report.v2_calls);
        return;
    }
    // Both ioctls are used, v2 for about half the calls.
    assert!(
        report.v2_calls > 5_000 && report.v2_calls < 15_000,
        "{}",
        report.v2_calls
    );
    assert!(
        report
            .refused_by_rule
            .get("flags_need_v2")
            .copied()
            .unwrap_or(0)
            > 0
    );
    if let Some(why) = &report.guest_memfd_unavailable {
        assert!(
            !limits.guest_memfd,
            "the VM says it takes guest_memfd: {why}"
        );
        eprintln!(
            "SKIPPED: no guest_memfd slot on this VM ({why}); the guest_memfd rules did not run"
        );
        return;
    }
    assert!(
        report.guest_memfd_calls > 1_000,
        "{}",
        report.guest_memfd_calls
    );
    assert!(
        report.guest_memfd_slots > 100,
        "{}",
        report.guest_memfd_slots
    );
    for rule in [
        "guest_memfd_flags",
        "guest_memfd_offset_unaligned",
        "guest_memfd_offset_wraps",
        "guest_memfd_immutable",
        "guest_memfd_toggle",
        "guest_memfd_range",
        "guest_memfd_bound",
    ] {
        assert!(
            report.refused_by_rule.get(rule).copied().unwrap_or(0) > 0,
            "rule {rule} never exercised: {:?}",
            report.refused_by_rule
        );
    }
}

fn guest_memfd_toggle_allowed(
    layout: &Layout,
    call: &SlotCall,
    verdict: Result<Change, Rule>,
) -> Result<Change, Rule> {
    // What kernels before the fix did: a guest_memfd slot without GUEST_MEMFD is a plain slot.
    match verdict {
        Err(Rule::GuestMemfdToggle { id }) => Ok(match layout.slot(id) {
            Some(old) if old.gpa != call.gpa => Change::Move,
            _ => Change::FlagsOnly,
        }),
        other => other,
    }
}

fn guest_memfd_binding_overlap_allowed(
    _: &Layout,
    _: &SlotCall,
    verdict: Result<Change, Rule>,
) -> Result<Change, Rule> {
    match verdict {
        Err(Rule::GuestMemfdBound { .. }) => Ok(Change::Create),
        other => other,
    }
}

fn guest_memfd_range_unchecked(
    _: &Layout,
    _: &SlotCall,
    verdict: Result<Change, Rule>,
) -> Result<Change, Rule> {
    match verdict {
        Err(Rule::GuestMemfdRange { .. }) => Ok(Change::Create),
        other => other,
    }
}

#[test]
fn a_model_with_a_wrong_guest_memfd_rule_is_caught() {
    let Some(limits) = kvm_limits() else { return };
    if !limits.guest_memfd {
        eprintln!(
            "SKIPPED: this VM takes no guest_memfd slot; the guest_memfd mutations did not run"
        );
        return;
    }
    for (patch, rule) in [
        (
            guest_memfd_toggle_allowed as memslots_testkit::conformance::ModelPatch,
            "guest_memfd_toggle",
        ),
        (guest_memfd_binding_overlap_allowed, "guest_memfd_bound"),
        (guest_memfd_range_unchecked, "guest_memfd_range"),
    ] {
        let report = run_random(RandomRun {
            patch: Some(patch),
            ..RandomRun::new(5_000, seed())
        })
        .expect("run");
        let first = report
            .first_mismatch
            .unwrap_or_else(|| panic!("a model without {rule} is caught"));
        assert_eq!(first.what, "result", "{rule}");
        assert!(first.model.accepted, "{rule}: {first:?}");
        assert_eq!(first.kernel.errno, Some(libc::EINVAL), "{rule}: {first:?}");
        // The call the kernel refused is the one the patched rule let through.
        let id = first.call.id();
        let bound_here = first
            .layout
            .iter()
            .any(|s| s.id == id && s.is_guest_memfd());
        if rule == "guest_memfd_toggle" {
            assert!(bound_here && !first.call.is_guest_memfd(), "{first:?}");
        } else {
            assert!(first.call.is_guest_memfd() && first.layout.iter().all(|s| s.id != id));
        }
    }
    // A model that thinks this VM has no guest_memfd refuses what the kernel creates.
    let report = run_random(RandomRun {
        model_limits: Some(Limits {
            guest_memfd: false,
            ..limits
        }),
        ..RandomRun::new(5_000, seed())
    })
    .expect("run");
    let first = report.first_mismatch.expect("caught");
    assert!(first.call.is_guest_memfd() && !first.model.accepted && first.kernel.accepted);
}
