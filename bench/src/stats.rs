//! Small statistics: percentiles of samples and min/median/max over repeated runs.

use std::time::Duration;

/// Min, median and max of repeated measurements of one figure.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

impl Spread {
    /// The spread of `v` (which it sorts). Panics on an empty vector.
    pub fn of(v: &mut [f64]) -> Spread {
        assert!(!v.is_empty(), "no samples");
        v.sort_by(f64::total_cmp);
        Spread {
            min: v[0],
            median: v[v.len() / 2],
            max: v[v.len() - 1],
        }
    }

    /// Applies `f` to each of min, median, max (keeping their order if `f` is increasing).
    pub fn map(self, f: impl Fn(f64) -> f64) -> Spread {
        let (a, b) = (f(self.min), f(self.max));
        Spread {
            min: a.min(b),
            median: f(self.median),
            max: a.max(b),
        }
    }
}

/// The `p`-th percentile (0..=100) of `samples` (sorted in place), nearest rank.
pub fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    assert!(!samples.is_empty(), "no samples");
    samples.sort_unstable();
    let rank = ((p / 100.0) * samples.len() as f64).ceil() as usize;
    samples[rank.clamp(1, samples.len()) - 1]
}

/// Nanoseconds as f64.
pub fn ns(d: Duration) -> f64 {
    d.as_secs_f64() * 1e9
}
