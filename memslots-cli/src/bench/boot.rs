//! SeaBIOS's own PAM commits: the total blackout of a boot's commits with memslots' atomic apply,
//! against QEMU 8.0's rule on a boot of the same firmware, boots alternating in one run.

use std::error::Error;
use std::time::Duration;

use memslots_testkit::boot::{self, BootConfig, BootError, DEFAULT_BIOS};
use memslots_testkit::strategy::Strategy;

use super::harness::{median, Figure, Mode};

/// One boot's total blackout over its PAM commits, in microseconds.
fn total_blackout_us(cfg: &BootConfig, image: &[u8]) -> Result<f64, Box<dyn Error>> {
    let r = boot::boot(cfg, image)?;
    if !r.ok(cfg.vcpus) {
        return Err(format!(
            "a {}-vCPU {} boot failed: {:?}",
            cfg.vcpus,
            cfg.strategy.name(),
            r.problems
        )
        .into());
    }
    Ok(r.commits
        .iter()
        .map(|c| c.blackout.as_secs_f64() * 1e6)
        .sum())
}

/// `boot_pam_blackout_atomic_vs_qemu_{2,8}vcpu`; nothing (said on stderr) without the BIOS.
pub fn run(q: Mode) -> Result<Vec<Figure>, Box<dyn Error>> {
    let image = match boot::read_bios(std::path::Path::new(DEFAULT_BIOS)) {
        Ok(image) => image,
        Err(e @ BootError::BiosMissing(_)) => {
            eprintln!("SKIPPED: section boot: {e}");
            return Ok(Vec::new());
        }
        Err(e) => return Err(e.into()),
    };
    let rounds = q.pick(1, 3, 7);
    let mut figures = Vec::new();
    for vcpus in [2, 8] {
        let cfg = |strategy| BootConfig {
            vcpus,
            strategy,
            // Generous: a loaded machine slows boots, and a bench should not fail for it.
            time_limit: Duration::from_secs(300),
            ..BootConfig::default()
        };
        let (atomic, qemu) = (cfg(Strategy::Atomic), cfg(Strategy::Qemu));
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            a.push(total_blackout_us(&atomic, &image)?);
            b.push(total_blackout_us(&qemu, &image)?);
        }
        figures.push(Figure::new(
            format!("boot_pam_blackout_atomic_vs_qemu_{vcpus}vcpu"),
            "us",
            median(&mut a),
            format!("boot_pam_blackout_qemu_{vcpus}vcpu"),
            median(&mut b),
        ));
    }
    Ok(figures)
}
