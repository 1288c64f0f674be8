//! What `wqctl` prints after a waited or flushed batch: counts by state, items per CPU,
//! fallbacks, re-binds and latency percentiles, computed from the items' results alone.
//!
//! Invariant: pure functions of their inputs (no clock, no I/O), so they are tested here
//! on made-up results.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;
use wqd_client::proto::{FallbackLevel, ItemResult, ItemState, StateCounts};

/// Items by state, with lower-case names as in JSON output.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct States {
    pub ok: u64,
    pub failed: u64,
    pub cancelled: u64,
    pub expired: u64,
    pub rejected: u64,
    pub pending: u64,
    pub running: u64,
}

impl States {
    pub fn add(&mut self, state: ItemState) {
        match state {
            ItemState::Ok => self.ok += 1,
            ItemState::Failed => self.failed += 1,
            ItemState::Cancelled => self.cancelled += 1,
            ItemState::Expired => self.expired += 1,
            ItemState::Rejected => self.rejected += 1,
            ItemState::Pending | ItemState::Delayed | ItemState::Unspecified => self.pending += 1,
            ItemState::Running => self.running += 1,
        }
    }
    pub fn total(&self) -> u64 {
        self.ok
            + self.failed
            + self.cancelled
            + self.expired
            + self.rejected
            + self.pending
            + self.running
    }
    /// True when every item ended OK (and none is still in flight).
    pub fn all_ok(&self) -> bool {
        self.total() == self.ok
    }
}

impl From<&StateCounts> for States {
    fn from(c: &StateCounts) -> Self {
        States {
            ok: c.ok,
            failed: c.failed,
            cancelled: c.cancelled,
            expired: c.expired,
            rejected: c.rejected,
            pending: c.pending + c.delayed,
            running: c.running,
        }
    }
}

/// Nearest-rank percentiles of a set of durations, in microseconds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub max: u64,
}

impl Percentiles {
    /// Computes from unsorted samples; all zero when there are none.
    pub fn of(mut samples: Vec<Duration>) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        samples.sort_unstable();
        let n = samples.len();
        let at = |p: f64| {
            // Nearest rank: the smallest sample with at least p% of samples <= it.
            let rank = ((p / 100.0) * n as f64).ceil() as usize;
            micros(samples[rank.clamp(1, n) - 1])
        };
        Percentiles {
            count: n as u64,
            p50: at(50.0),
            p90: at(90.0),
            p99: at(99.0),
            max: micros(samples[n - 1]),
        }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// One distinct error text and how many items ended with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ErrorCount {
    pub error: String,
    pub count: u64,
}

/// How many distinct error texts the summary keeps.
const TOP_ERRORS: usize = 5;

/// The summary of a set of item results.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Results summarised.
    pub items: u64,
    pub states: States,
    /// Items by the CPU they started on (items that never started are not counted).
    pub per_cpu: BTreeMap<u32, u64>,
    /// Items that ran outside their group, by fallback level name.
    pub fallbacks: BTreeMap<String, u64>,
    pub fallback_items: u64,
    /// Re-binds summed over items, and how many items were re-bound at least once.
    pub rebinds: u64,
    pub rebound_items: u64,
    /// queued → started, for items that started.
    pub queue_latency_us: Percentiles,
    /// started → finished, for items that finished after starting.
    pub run_time_us: Percentiles,
    /// The most frequent error texts (at most 5), most frequent first.
    pub errors: Vec<ErrorCount>,
}

/// `b - a`, when both are set and b is not earlier.
fn between(
    a: Option<&prost_types::Timestamp>,
    b: Option<&prost_types::Timestamp>,
) -> Option<Duration> {
    let ns =
        |t: &prost_types::Timestamp| i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos);
    let d = ns(b?) - ns(a?);
    u64::try_from(d).ok().map(Duration::from_nanos)
}

/// Lower-case short name of a fallback level (`cache`), `none` for no fallback.
pub fn fallback_name(l: FallbackLevel) -> &'static str {
    match l {
        FallbackLevel::Unspecified => "none",
        FallbackLevel::Core => "core",
        FallbackLevel::Shard => "shard",
        FallbackLevel::Cache => "cache",
        FallbackLevel::Node => "node",
        FallbackLevel::Package => "package",
        FallbackLevel::All => "all",
    }
}

/// Lower-case short name of an item state (`ok`, `failed`, ...).
pub fn state_name(s: ItemState) -> &'static str {
    match s {
        ItemState::Unspecified => "unspecified",
        ItemState::Pending => "pending",
        ItemState::Delayed => "delayed",
        ItemState::Running => "running",
        ItemState::Ok => "ok",
        ItemState::Failed => "failed",
        ItemState::Cancelled => "cancelled",
        ItemState::Expired => "expired",
        ItemState::Rejected => "rejected",
    }
}

impl Summary {
    /// Summarises results.
    pub fn of<'a>(results: impl IntoIterator<Item = &'a ItemResult>) -> Self {
        let mut s = Summary::default();
        let mut queue = Vec::new();
        let mut run = Vec::new();
        let mut errors: BTreeMap<&str, u64> = BTreeMap::new();
        for r in results {
            s.items += 1;
            s.states.add(r.state());
            if let Some(cpu) = r.cpu_started {
                *s.per_cpu.entry(cpu).or_default() += 1;
            }
            let level = r.fallback_level();
            if level != FallbackLevel::Unspecified {
                s.fallback_items += 1;
                *s.fallbacks
                    .entry(fallback_name(level).to_string())
                    .or_default() += 1;
            }
            s.rebinds += u64::from(r.rebinds);
            if r.rebinds > 0 {
                s.rebound_items += 1;
            }
            if let Some(d) = between(r.queued_at.as_ref(), r.started_at.as_ref()) {
                queue.push(d);
            }
            if let Some(d) = between(r.started_at.as_ref(), r.finished_at.as_ref()) {
                run.push(d);
            }
            if !r.error.is_empty() {
                *errors.entry(r.error.as_str()).or_default() += 1;
            }
        }
        s.queue_latency_us = Percentiles::of(queue);
        s.run_time_us = Percentiles::of(run);
        let mut errs: Vec<_> = errors
            .into_iter()
            .map(|(e, c)| ErrorCount {
                error: e.to_string(),
                count: c,
            })
            .collect();
        errs.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.error.cmp(&b.error)));
        errs.truncate(TOP_ERRORS);
        s.errors = errs;
        s
    }

    /// The summary of a wait: [`Summary::of`] the results, with the states taken from the
    /// daemon's `counts` when it sent them. A workqueue with `results = summary` or `none`
    /// returns counts and no results; `items` (the results summarised) is then below
    /// `states.total()`.
    pub fn of_wait(results: &[ItemResult], counts: Option<&StateCounts>) -> Self {
        let mut s = Summary::of(results);
        if let Some(c) = counts {
            s.states = States::from(c);
        }
        s
    }
}

/// One row of the per-group table of a fan-out (`--target each:cache`): one item and the group
/// it was expanded to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GroupRow {
    /// The group, canonical (`cache:3`): the result's target.
    pub group: String,
    pub item_id: u64,
    /// Lower-case state name (`ok`, `rejected`, ...).
    pub state: &'static str,
    /// The CPU it started on; `None` when it never started.
    pub cpu: Option<u32>,
    /// The fallback level it ran at (`node`), `none` when it ran inside its group.
    pub fallback: &'static str,
    /// Why it fell back; empty without a fallback.
    pub fallback_reason: String,
}

/// The per-group rows of a fan-out's results, in item id order — the order the daemon
/// expanded the groups in (ascending group number), whatever order the results came in.
pub fn per_group<'a>(results: impl IntoIterator<Item = &'a ItemResult>) -> Vec<GroupRow> {
    let mut rows: Vec<GroupRow> = results
        .into_iter()
        .map(|r| GroupRow {
            group: r.target.clone(),
            item_id: r.item_id,
            state: state_name(r.state()),
            cpu: r.cpu_started,
            fallback: fallback_name(r.fallback_level()),
            fallback_reason: r.fallback_reason.clone(),
        })
        .collect();
    rows.sort_by_key(|r| r.item_id);
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_takes_its_states_from_the_counts() {
        // A summary/none workqueue: counts, no results.
        let c = StateCounts {
            ok: 4,
            failed: 1,
            ..Default::default()
        };
        let s = Summary::of_wait(&[], Some(&c));
        assert_eq!((s.items, s.states.ok, s.states.failed), (0, 4, 1));
        assert!(!s.states.all_ok());
        // A full workqueue: the counts agree with the results.
        let r = [result(ItemState::Ok, Some(1), 0, 1, 2)];
        let c = StateCounts {
            ok: 1,
            ..Default::default()
        };
        assert_eq!(Summary::of_wait(&r, Some(&c)), Summary::of(&r));
        // No counts (an older daemon): the results alone.
        assert_eq!(Summary::of_wait(&r, None), Summary::of(&r));
    }

    #[test]
    fn per_group_rows_follow_item_ids() {
        let mut a = result(ItemState::Ok, Some(3), 0, 1, 2);
        a.item_id = 11;
        a.target = "cache:1".into();
        let mut b = result(ItemState::Ok, Some(4), 0, 1, 2);
        b.item_id = 12;
        b.target = "cache:2".into();
        b.fallback_level = FallbackLevel::Node as i32;
        b.fallback_reason = "no live CPU in cache:2".into();
        let mut c = result(ItemState::Rejected, None, 0, 0, 2);
        c.item_id = 10;
        c.target = "cache:0".into();
        let rows = per_group(&[a, b, c]);
        let groups: Vec<_> = rows.iter().map(|r| r.group.as_str()).collect();
        assert_eq!(groups, ["cache:0", "cache:1", "cache:2"]);
        assert_eq!((rows[0].state, rows[0].cpu), ("rejected", None));
        assert_eq!((rows[2].fallback, rows[2].cpu), ("node", Some(4)));
        assert_eq!(rows[1].fallback, "none");
        let v = serde_json::to_value(&rows[2]).unwrap();
        assert_eq!(v["group"], "cache:2");
        assert_eq!(v["fallback"], "node");
        assert_eq!(v["cpu"], 4);
    }

    fn ts(us: i64) -> Option<prost_types::Timestamp> {
        Some(prost_types::Timestamp {
            seconds: us / 1_000_000,
            nanos: ((us % 1_000_000) * 1000) as i32,
        })
    }

    fn result(
        state: ItemState,
        cpu: Option<u32>,
        queued: i64,
        started: i64,
        finished: i64,
    ) -> ItemResult {
        ItemResult {
            item_id: 1,
            state: state as i32,
            cpu_started: cpu,
            cpu_finished: cpu,
            queued_at: ts(queued),
            started_at: cpu.and(ts(started)),
            finished_at: ts(finished),
            ..Default::default()
        }
    }

    #[test]
    fn percentiles_nearest_rank() {
        let v: Vec<_> = (1..=100).rev().map(Duration::from_micros).collect();
        let p = Percentiles::of(v);
        assert_eq!(
            (p.count, p.p50, p.p90, p.p99, p.max),
            (100, 50, 90, 99, 100)
        );
        let p = Percentiles::of(vec![Duration::from_micros(7)]);
        assert_eq!((p.p50, p.p99, p.max), (7, 7, 7));
        assert_eq!(Percentiles::of(vec![]), Percentiles::default());
        let p = Percentiles::of((1..=10).map(Duration::from_micros).collect());
        assert_eq!((p.p50, p.p90, p.p99), (5, 9, 10));
    }

    #[test]
    fn summary_counts_states_cpus_fallbacks_and_latency() {
        let mut a = result(ItemState::Ok, Some(0), 0, 100, 1100);
        a.rebinds = 2;
        let mut b = result(ItemState::Ok, Some(2), 0, 300, 400);
        b.fallback_level = FallbackLevel::Cache as i32;
        let mut c = result(ItemState::Failed, Some(0), 0, 200, 250);
        c.error = "boom".into();
        let mut d = result(ItemState::Expired, None, 0, 0, 5000);
        d.error = "deadline passed".into();
        let s = Summary::of(&[a, b, c, d]);
        assert_eq!(s.items, 4);
        assert_eq!(s.states.ok, 2);
        assert_eq!(s.states.failed, 1);
        assert_eq!(s.states.expired, 1);
        assert!(!s.states.all_ok());
        assert_eq!(s.per_cpu, BTreeMap::from([(0, 2), (2, 1)]));
        assert_eq!(s.fallbacks, BTreeMap::from([("cache".to_string(), 1)]));
        assert_eq!((s.fallback_items, s.rebinds, s.rebound_items), (1, 2, 1));
        assert_eq!(s.queue_latency_us.count, 3);
        assert_eq!(s.queue_latency_us.p50, 200);
        assert_eq!(s.queue_latency_us.max, 300);
        assert_eq!(s.run_time_us.max, 1000);
        assert_eq!(s.errors.len(), 2);
    }

    #[test]
    fn all_ok_and_json_shape() {
        let s = Summary::of(&[result(ItemState::Ok, Some(1), 0, 10, 20)]);
        assert!(s.states.all_ok());
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["states"]["ok"], 1);
        assert_eq!(v["per_cpu"]["1"], 1);
        assert_eq!(v["queue_latency_us"]["p50"], 10);
        assert_eq!(v["run_time_us"]["max"], 10);
        assert!(v["errors"].as_array().unwrap().is_empty());
    }
}
