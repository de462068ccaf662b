//! Fixed-size duration statistics, so that a run of a million batches keeps flat memory.
//!
//! Percentiles come from a log-linear histogram: 128 buckets per power of two, so a reported
//! percentile is within 0.4% of the true sample. Zeros (a batch that held nobody out) are counted
//! exactly, as are the count, the sum and the maximum.

use serde::Serialize;

/// Sub-buckets per power of two.
const SUB: usize = 128;
/// Smallest power of two kept apart: 2^-4 us (62.5 ns); anything smaller lands in the first bucket.
const MIN_EXP: i32 = -4;
/// Largest power of two: 2^40 us (about 12 days); anything larger lands in the last bucket.
const MAX_EXP: i32 = 40;
const BUCKETS: usize = (MAX_EXP - MIN_EXP + 1) as usize * SUB;

/// Percentiles of a time series, in microseconds.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub struct Micros {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
    /// Sum (only for the blackout).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total: Option<f64>,
}

/// Durations in microseconds, summarized in constant memory.
///
/// ```
/// use memslots_testkit::stats::Samples;
/// let mut s = Samples::new();
/// for us in [0.0, 0.0, 10.0, 20.0, 1000.0] {
///     s.push(us);
/// }
/// let m = s.micros(true);
/// assert_eq!(m.max, 1000.0);
/// assert_eq!(m.total, Some(1030.0));
/// assert!((m.p50 - 10.0).abs() < 0.05);
/// ```
#[derive(Clone, Debug)]
pub struct Samples {
    zeros: u64,
    buckets: Box<[u64]>,
    count: u64,
    sum: f64,
    max: f64,
}

impl Default for Samples {
    fn default() -> Self {
        Self::new()
    }
}

impl Samples {
    /// No samples yet.
    pub fn new() -> Self {
        Samples {
            zeros: 0,
            buckets: vec![0; BUCKETS].into_boxed_slice(),
            count: 0,
            sum: 0.0,
            max: 0.0,
        }
    }

    /// Adds one duration in microseconds (negative or NaN counts as 0).
    pub fn push(&mut self, us: f64) {
        self.count += 1;
        if us.is_nan() || us <= 0.0 {
            self.zeros += 1;
            return;
        }
        self.sum += us;
        self.max = self.max.max(us);
        self.buckets[bucket(us)] += 1;
    }

    /// How many durations were added.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The summary; `with_total` adds the sum.
    pub fn micros(&self, with_total: bool) -> Micros {
        Micros {
            p50: self.quantile(0.5),
            p99: self.quantile(0.99),
            max: self.max,
            total: with_total.then_some(self.sum),
        }
    }

    /// The sample of rank `round((count - 1) * q)` in sorted order, to within 0.4%.
    pub fn quantile(&self, q: f64) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        let rank = ((self.count - 1) as f64 * q.clamp(0.0, 1.0)).round() as u64;
        if rank < self.zeros {
            return 0.0;
        }
        if rank == self.count - 1 {
            return self.max;
        }
        let mut seen = self.zeros;
        for (i, &n) in self.buckets.iter().enumerate() {
            seen += n;
            if rank < seen {
                // The bucket's middle, but never above what was really seen.
                return middle(i).min(self.max);
            }
        }
        self.max
    }
}

fn bucket(us: f64) -> usize {
    let exp = us.log2().floor() as i32;
    if exp < MIN_EXP {
        return 0;
    }
    if exp > MAX_EXP {
        return BUCKETS - 1;
    }
    let base = 2f64.powi(exp);
    let sub = (((us / base) - 1.0) * SUB as f64) as usize;
    (exp - MIN_EXP) as usize * SUB + sub.min(SUB - 1)
}

fn middle(index: usize) -> f64 {
    let exp = (index / SUB) as i32 + MIN_EXP;
    let sub = (index % SUB) as f64;
    2f64.powi(exp) * (1.0 + (sub + 0.5) / SUB as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exact rank-based percentile the histogram approximates.
    fn exact(mut xs: Vec<f64>, q: f64) -> f64 {
        xs.sort_by(f64::total_cmp);
        xs[((xs.len() - 1) as f64 * q).round() as usize]
    }

    #[test]
    fn empty_is_all_zero() {
        assert_eq!(
            Samples::new().micros(true),
            Micros {
                total: Some(0.0),
                ..Micros::default()
            }
        );
    }

    #[test]
    fn zeros_are_exact() {
        let mut s = Samples::new();
        for _ in 0..60 {
            s.push(0.0);
        }
        for _ in 0..40 {
            s.push(150.0);
        }
        let m = s.micros(true);
        assert_eq!(m.p50, 0.0);
        assert!((m.p99 - 150.0).abs() / 150.0 < 0.004, "{m:?}");
        assert_eq!(m.total, Some(6000.0));
        assert_eq!(s.count(), 100);
    }

    #[test]
    fn percentiles_within_bucket_precision() {
        // A spread from 0.1 us to 10 s, deterministic.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut xs = Vec::new();
        let mut s = Samples::new();
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let v = 0.1 * 10f64.powf((x % 8000) as f64 / 1000.0);
            xs.push(v);
            s.push(v);
        }
        for q in [0.0, 0.1, 0.5, 0.9, 0.99, 1.0] {
            let want = exact(xs.clone(), q);
            let got = s.quantile(q);
            assert!((got - want).abs() / want < 0.004, "q={q}: {got} vs {want}");
        }
        assert_eq!(s.micros(false).max, exact(xs, 1.0));
    }

    #[test]
    fn extremes_land_in_the_end_buckets() {
        let mut s = Samples::new();
        s.push(1e-9);
        s.push(1e15);
        assert_eq!(s.quantile(1.0), 1e15);
        assert!(s.quantile(0.0) < 0.07);
    }
}
