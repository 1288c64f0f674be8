//! The per-item histograms (`wqd_item_queue_wait_seconds`, `wqd_item_run_seconds`): fixed
//! buckets of atomic counts per workqueue, rendered by the scrape.
//!
//! The recorder's histograms keep every value (`AtomicBucket::push` under an epoch guard,
//! plus a clock reading per value) until an upkeep tick folds them into buckets: with
//! metrics on, those two calls per item cost the daemon's `Submit(wait)` of 1 000 about a
//! third of its items/s. Here a value is one bucket index and an atomic add, and the
//! observer's batched calls ([`Local`]) add each bucket and the sum once per batch.
//!
//! Invariant: a scrape reads each bucket once and renders the cumulative counts of that one
//! reading, so `_count` equals the `+Inf` bucket and the buckets never decrease along `le`;
//! `_sum` is read apart (a scrape racing an update may see a sum one batch ahead of the
//! counts, as Prometheus allows for a histogram read while it changes). Counts never go
//! down: a workqueue's series stay for the daemon's life, as the recorder's did.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::ITEM_BUCKETS;

/// Buckets of [`ITEM_BUCKETS`] plus the `+Inf` one.
const N: usize = ITEM_BUCKETS.len() + 1;

/// Upper bounds in nanoseconds (a value equal to a bound is in its bucket, as `le` says).
fn bounds() -> &'static [u64; N - 1] {
    static B: std::sync::OnceLock<[u64; N - 1]> = std::sync::OnceLock::new();
    B.get_or_init(|| std::array::from_fn(|i| (ITEM_BUCKETS[i] * 1e9).round() as u64))
}

/// The bucket of a value of `nanos`.
fn index(nanos: u64) -> usize {
    bounds().partition_point(|&b| b < nanos)
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// One histogram series (one workqueue's).
#[derive(Debug)]
pub(crate) struct ItemHistogram {
    counts: [AtomicU64; N],
    sum_nanos: AtomicU64,
}

impl Default for ItemHistogram {
    fn default() -> Self {
        ItemHistogram {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_nanos: AtomicU64::new(0),
        }
    }
}

/// Values gathered by one call of the observer, added to an [`ItemHistogram`] at once.
#[derive(Default)]
pub(crate) struct Local {
    counts: [u64; N],
    sum_nanos: u64,
}

impl Local {
    pub(crate) fn record(&mut self, d: Duration) {
        let n = nanos(d);
        self.counts[index(n)] += 1;
        self.sum_nanos = self.sum_nanos.saturating_add(n);
    }
}

impl ItemHistogram {
    pub(crate) fn record(&self, d: Duration) {
        let n = nanos(d);
        self.counts[index(n)].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(n, Ordering::Relaxed);
    }

    /// Adds what `l` gathered (nothing when it is empty).
    pub(crate) fn add(&self, l: &Local) {
        for (c, &n) in self.counts.iter().zip(&l.counts) {
            if n > 0 {
                c.fetch_add(n, Ordering::Relaxed);
            }
        }
        if l.sum_nanos > 0 {
            self.sum_nanos.fetch_add(l.sum_nanos, Ordering::Relaxed);
        }
    }

    /// Appends the series' lines in the Prometheus text format: `name_bucket` per bound and
    /// `+Inf`, `name_sum`, `name_count`, each with `label="value"` first.
    pub(crate) fn render(&self, name: &str, label: &str, value: &str, out: &mut String) {
        let value = escape(value);
        let mut total = 0u64;
        for (i, c) in self.counts.iter().enumerate() {
            total += c.load(Ordering::Relaxed);
            let _ = match ITEM_BUCKETS.get(i) {
                Some(le) => writeln!(
                    out,
                    "{name}_bucket{{{label}=\"{value}\",le=\"{le}\"}} {total}"
                ),
                None => writeln!(
                    out,
                    "{name}_bucket{{{label}=\"{value}\",le=\"+Inf\"}} {total}"
                ),
            };
        }
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum{{{label}=\"{value}\"}} {sum}");
        let _ = writeln!(out, "{name}_count{{{label}=\"{value}\"}} {total}");
    }
}

/// A label value escaped as the text format requires (backslash, double quote, newline).
fn escape(v: &str) -> std::borrow::Cow<'_, str> {
    if !v.contains(['\\', '"', '\n']) {
        return v.into();
    }
    let mut s = String::with_capacity(v.len() + 2);
    for ch in v.chars() {
        match ch {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values land in the bucket whose bound is the first at or above them (`le`), the
    /// rendering is cumulative and ends with `+Inf` = `_count`, and a batch added at once
    /// counts as its values one by one. Fails if a bound is exclusive, a bucket is rendered
    /// per bucket instead of cumulatively, or `Local` loses a value.
    #[test]
    fn values_fall_in_le_buckets_and_render_cumulatively() {
        let h = ItemHistogram::default();
        let us = Duration::from_micros;
        h.record(us(100)); // le="0.0001" exactly
        h.record(us(101)); // le="0.00025"
        h.record(Duration::from_secs(700)); // +Inf
        let mut l = Local::default();
        for d in [us(50), us(250), us(251)] {
            l.record(d);
        }
        h.add(&l);
        let mut out = String::new();
        h.render("x_seconds", "workqueue", "a\"b", &mut out);
        let line = |s: &str| {
            assert!(out.lines().any(|l| l == s), "no {s:?} in\n{out}");
        };
        line(r#"x_seconds_bucket{workqueue="a\"b",le="0.0001"} 2"#);
        line(r#"x_seconds_bucket{workqueue="a\"b",le="0.00025"} 4"#);
        line(r#"x_seconds_bucket{workqueue="a\"b",le="0.0005"} 5"#);
        line(r#"x_seconds_bucket{workqueue="a\"b",le="600"} 5"#);
        line(r#"x_seconds_bucket{workqueue="a\"b",le="+Inf"} 6"#);
        line(r#"x_seconds_count{workqueue="a\"b"} 6"#);
        let sum: f64 = out
            .lines()
            .find_map(|l| l.strip_prefix(r#"x_seconds_sum{workqueue="a\"b"} "#))
            .expect("a sum")
            .parse()
            .unwrap();
        assert!((sum - (700.0 + 0.000_752)).abs() < 1e-9, "{sum}");
        assert_eq!(out.lines().count(), N + 2);
    }
}
