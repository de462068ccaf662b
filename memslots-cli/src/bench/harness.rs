//! Interleaved A/B measurement: medians and ratios of two things measured in turns in one process,
//! so that a noisy, shared machine slows both alike.

use serde::Serialize;

/// How long a run takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// A round or two of everything: the output's shape, for tests; the figures mean little.
    Smoke,
    /// Under a minute.
    Quick,
    /// Under ten minutes.
    Full,
}

impl Mode {
    /// The value for this mode.
    pub fn pick<T>(self, smoke: T, quick: T, full: T) -> T {
        match self {
            Mode::Smoke => smoke,
            Mode::Quick => quick,
            Mode::Full => full,
        }
    }
}

/// One reported figure beside its baseline.
#[derive(Clone, Debug, Serialize)]
pub struct Figure {
    /// Stable name (read by tools).
    pub name: String,
    /// Unit of `value` and `baseline_value`.
    pub unit: &'static str,
    /// The figure.
    pub value: f64,
    /// What it is compared with.
    pub baseline_name: String,
    /// The baseline's figure, measured in the same run.
    pub baseline_value: f64,
    /// `value / baseline_value`; `None` (JSON `null`) when the baseline is 0.
    pub ratio: Option<f64>,
    /// How much the measured run raised the process's peak resident memory, in KiB: on rows
    /// whose point is that memory stays flat (absent from the JSON elsewhere).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_rss_growth_kib: Option<u64>,
}

impl Figure {
    /// A figure and its baseline.
    pub fn new(
        name: impl Into<String>,
        unit: &'static str,
        value: f64,
        baseline_name: impl Into<String>,
        baseline_value: f64,
    ) -> Self {
        Figure {
            name: name.into(),
            unit,
            value,
            baseline_name: baseline_name.into(),
            baseline_value,
            ratio: (baseline_value > 0.0).then(|| value / baseline_value),
            peak_rss_growth_kib: None,
        }
    }

    /// The figure with the peak resident memory its run added.
    pub fn with_peak_rss_growth(self, kib: u64) -> Self {
        Figure {
            peak_rss_growth_kib: Some(kib),
            ..self
        }
    }
}

/// The `q` quantile (0..=1) of `samples` (sorted in place).
pub fn quantile(samples: &mut [f64], q: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    samples.sort_by(f64::total_cmp);
    let i = ((samples.len() - 1) as f64 * q).round() as usize;
    samples[i]
}

/// The median of `samples`.
pub fn median(samples: &mut [f64]) -> f64 {
    quantile(samples, 0.5)
}

/// Runs `a` and `b` in turns, `rounds` times each, and returns their samples.
pub fn interleave<A, B>(rounds: usize, mut a: A, mut b: B) -> (Vec<f64>, Vec<f64>)
where
    A: FnMut() -> f64,
    B: FnMut() -> f64,
{
    let mut xs = Vec::with_capacity(rounds);
    let mut ys = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        xs.push(a());
        ys.push(b());
    }
    (xs, ys)
}
