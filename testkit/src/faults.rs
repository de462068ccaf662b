//! Fault injection: slot calls made to fail on purpose, with errnos KVM really returns, so every
//! rollback path runs.

use memslots::kvm::FaultHook;
use memslots::model::SlotCall;

use crate::conformance::SplitMix64;

/// Makes slot calls fail on purpose, with errnos KVM really returns.
#[derive(Clone, Debug)]
pub enum FaultInjector {
    /// Fail the `n`-th call from now (0-based), once.
    Nth {
        /// Calls still to let through.
        n: u64,
        /// The errno to fail with.
        errno: i32,
    },
    /// Fail each call with probability `p`, from a seeded generator.
    Random {
        /// Probability of failure per call.
        p: f64,
        /// Generator.
        rng: SplitMix64,
    },
}

impl FaultInjector {
    const ERRNOS: [i32; 3] = [libc::ENOMEM, libc::EFAULT, libc::EEXIST];

    fn fire(&mut self) -> Option<i32> {
        match self {
            FaultInjector::Nth { n, errno } => {
                if *n == 0 {
                    *n = u64::MAX;
                    Some(*errno)
                } else {
                    *n = n.saturating_sub(1);
                    None
                }
            }
            FaultInjector::Random { p, rng } => {
                let x = rng.next_u64();
                let hit = (x >> 11) as f64 / (1u64 << 53) as f64 <= *p;
                hit.then(|| Self::ERRNOS[(x % 3) as usize])
            }
        }
    }
}

impl FaultHook for FaultInjector {
    fn fail(&mut self, _call: &SlotCall) -> Option<i32> {
        self.fire()
    }
}
