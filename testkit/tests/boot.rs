//! Real firmware drives the slot changes: Debian's SeaBIOS boots on the test kit's i440fx VMM
//! with 4 vCPUs, twice, with the atomic strategy; its PAM writes are applied on the vCPU thread
//! that made them and the mapping after POST is QEMU 7.2's.

mod support;

use std::path::{Path, PathBuf};

use memslots_testkit::boot::compare::{compare, qemu_final_map};
use memslots_testkit::boot::{self, BootConfig, BootError, DEFAULT_BIOS};
use memslots_testkit::trace::Trace;

fn qemu_trace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/data/traces/boot/seabios-pc-smp4-m512.log")
}

/// The BIOS image, or `None` (said loudly) when Debian's `seabios` is not installed.
fn bios_or_skip() -> Option<Vec<u8>> {
    match boot::read_bios(Path::new(DEFAULT_BIOS)) {
        Ok(image) => Some(image),
        Err(e @ BootError::BiosMissing(_)) => {
            eprintln!("SKIPPED: {e}; this SeaBIOS boot test did not run");
            None
        }
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn seabios_boots_on_4_vcpus_with_its_pam_writes_applied_on_the_vcpu_thread() {
    if !support::kvm_or_skip() {
        return;
    }
    let Some(image) = bios_or_skip() else { return };
    let qemu = qemu_final_map(&Trace::from_file(&qemu_trace()).unwrap()).unwrap();
    let cfg = BootConfig {
        vcpus: 4,
        // A shared, loaded machine can slow a boot several times over; a hung one still fails.
        time_limit: std::time::Duration::from_secs(300),
        ..BootConfig::default()
    };
    for k in 1..=2 {
        let r = boot::boot(&cfg, &image).unwrap();
        let context = format!(
            "boot {k}: problems {:?}\n--- SeaBIOS log ---\n{}",
            r.problems, r.debug_log
        );
        assert!(r.ok(4), "{context}");
        assert_eq!(r.cpus_found, Some(4), "{context}");
        assert!(r.end_of_post && r.no_bootable_device, "{context}");
        assert_eq!(
            (r.internal_errors, r.unexpected_exits, r.spurious_exits),
            (0, 0, 0),
            "{context}"
        );
        // make_bios_writable and make_bios_readonly both wrote the PAM, and each write that
        // changed the map was one commit.
        assert!(r.pam_writes >= 2, "{context}");
        assert!(
            r.commits.len() >= 2 && r.commits.len() as u64 <= r.pam_writes,
            "{context}"
        );
        // Applied where the guest's write was handled: the boot CPU's thread, never the thread
        // that set the VM up.
        assert!(
            r.commits_on_vcpu_threads(),
            "{:?} {:?}",
            r.commits,
            r.vcpu_tids
        );
        for c in &r.commits {
            assert_eq!(c.vcpu, 0, "only the boot CPU writes PAM");
            assert_eq!(c.tid, r.vcpu_tids[0]);
            assert_ne!(c.tid, r.main_tid);
            assert!(c.quiesced_ioctls <= c.ioctls);
        }
        let mut tids = r.vcpu_tids.clone();
        tids.sort_unstable();
        tids.dedup();
        assert_eq!(tids.len(), 4, "one thread per vCPU: {:?}", r.vcpu_tids);

        // The mapping after POST is QEMU's, but for the named difference, which is there.
        let cmp = r
            .compare_with(&qemu, 512 << 20, image.len() as u64)
            .expect("the committed trace is of this RAM and BIOS size");
        assert!(cmp.matches(), "{:#?}", cmp.differences);
        assert!(
            cmp.named_bytes() > 0,
            "SeaBIOS leaves ROM shadows in mode 1"
        );

        // The trace the VMM writes reads back, every call accepted, and ends in the same map.
        let ours = Trace::parse(&r.trace()).unwrap();
        assert_eq!(ours.calls.len() as u64, r.ioctls);
        assert!(ours.calls.iter().all(|c| c.accepted()));
        let replayed = qemu_final_map(&ours).unwrap();
        let same = compare(&replayed.runs, &r.final_map, |_, _| false);
        assert!(same.differences.is_empty(), "{:#?}", same.differences);
    }
}

#[test]
fn a_missing_bios_is_named_with_its_package() {
    let cfg = BootConfig {
        bios: PathBuf::from("/nonexistent/bios.bin"),
        ..BootConfig::default()
    };
    let e = boot::read_bios(&cfg.bios).unwrap_err().to_string();
    assert!(
        e.contains("/nonexistent/bios.bin") && e.contains("seabios"),
        "{e}"
    );
    let bad = BootConfig {
        vcpus: 0,
        ..BootConfig::default()
    };
    assert!(matches!(boot::check(&bad), Err(BootError::Vcpus(0))));
    let bad = BootConfig {
        memory_mib: 1,
        ..BootConfig::default()
    };
    assert!(matches!(boot::check(&bad), Err(BootError::Memory(1))));
}
