//! The summary table printed at the end of a run (before the PASS/FAIL marker).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use wqd_core::engine::State;

use crate::check::{Findings, Lags};
use crate::clock::ms;
use crate::hotplug::{Cause, HotplugLog};
use crate::load::{wq_name, FlushRec, WaitKind};

/// What the table shows besides the findings.
pub struct Summary<'a> {
    pub header: Vec<(String, String)>,
    pub findings: &'a Findings,
    pub submitted: usize,
    pub scenario_items: usize,
    pub scenario_runs: u64,
    pub queue_full: u64,
    pub log: &'a HotplugLog,
    pub flushes: &'a [FlushRec],
    /// wqd's delay in seeing transitions.
    pub lags: Option<Lags>,
    pub counters: Vec<(String, u64)>,
    pub window: Duration,
}

fn pct(v: &[Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    let i = ((v.len() - 1) as f64 * p).round() as usize;
    v[i.min(v.len() - 1)]
}

/// Renders the table.
pub fn render(s: &Summary<'_>) -> String {
    let mut o = String::from("==== wqd-torture summary ====\n");
    let mut row = |k: &str, v: String| {
        let _ = writeln!(o, "{k:<14}{v}");
    };
    for (k, v) in &s.header {
        row(k, v.clone());
    }
    let f = s.findings;
    let states: Vec<String> = State::ALL
        .iter()
        .map(|st| format!("{} {}", st, f.by_state.get(st).copied().unwrap_or(0)))
        .collect();
    row(
        "items",
        format!(
            "{} submitted ({} by the scenario): {}",
            s.submitted,
            s.scenario_items,
            states.join(", ")
        ),
    );
    let (off, on, failed) = s.log.counts();
    let mut by_cause: BTreeMap<Cause, usize> = BTreeMap::new();
    for t in &s.log.transitions {
        *by_cause.entry(t.cause).or_default() += 1;
    }
    let causes: Vec<String> = by_cause
        .iter()
        .map(|(c, n)| format!("{} {n}", c.as_str()))
        .collect();
    let mut writes: Vec<Duration> = s
        .log
        .transitions
        .iter()
        .filter(|t| t.error.is_none())
        .map(|t| t.end - t.begin)
        .collect();
    writes.sort();
    row(
        "hotplug",
        format!(
            "{} writes: offline {off}, online {on}, failed {failed} ({})",
            s.log.transitions.len(),
            causes.join(", ")
        ),
    );
    row(
        "",
        format!(
            "write time p50 {}, max {}",
            ms(pct(&writes, 0.5)),
            ms(pct(&writes, 1.0))
        ),
    );
    if let Some(l) = &s.lags {
        row(
            "topology lag",
            format!(
                "write end to wqd's live set: p50 {}, p99 {}, max {} over {} writes ({} undone before seen, {} in skipped epochs, {} slow)",
                ms(pct(&l.seen, 0.5)),
                ms(pct(&l.seen, 0.99)),
                ms(pct(&l.seen, 1.0)),
                l.seen.len(),
                l.undone,
                l.unknown,
                l.slow.len()
            ),
        );
    }
    let mut kinds: BTreeMap<WaitKind, usize> = BTreeMap::new();
    for fl in s.flushes {
        *kinds.entry(fl.kind).or_default() += 1;
    }
    let kinds: Vec<String> = WaitKind::ALL
        .iter()
        .map(|k| format!("{} {}", k.as_str(), kinds.get(k).copied().unwrap_or(0)))
        .collect();
    row(
        "flushes",
        format!("{} ({})", s.flushes.len(), kinds.join(", ")),
    );
    if let Some(l) = s.flushes.iter().max_by_key(|f| f.waited) {
        let mut waits: Vec<Duration> = s.flushes.iter().map(|f| f.waited).collect();
        waits.sort();
        row(
            "",
            format!(
                "longest {} ({} on {}, {} items), p50 {}, p99 {}",
                ms(l.waited),
                l.kind.as_str(),
                wq_name(l.wq),
                l.covered,
                ms(pct(&waits, 0.5)),
                ms(pct(&waits, 0.99))
            ),
        );
    }
    row("scenario", format!("{} replays", s.scenario_runs));
    let fb: Vec<String> = f
        .fallbacks
        .iter()
        .map(|(l, n)| format!("{l} {n}"))
        .collect();
    row(
        "fallbacks",
        format!(
            "{} ({})",
            f.fallbacks.values().sum::<u64>(),
            if fb.is_empty() {
                "none".into()
            } else {
                fb.join(", ")
            }
        ),
    );
    row(
        "re-binds",
        format!("{} items re-bound, {} re-binds", f.rebound_items, f.rebinds),
    );
    row(
        "race",
        format!(
            "{} items started within {} of a transition of their CPU; {} handlers found their CPU gone at start",
            f.near_transition,
            ms(s.window),
            f.cpu_moved
        ),
    );
    row(
        "epochs",
        format!(
            "{} started items held against the live set of the epoch that let them start; \
             {} fallbacks and rejections against the epoch that decided them",
            f.epoch_checked, f.decided_checked
        ),
    );
    if f.attached_ok > 0 || f.worker_lost > 0 {
        row(
            "attached",
            format!(
                "{} items run by attached worker processes; {} re-deliveries after a worker was killed holding an item",
                f.attached_ok, f.worker_lost
            ),
        );
    }
    row(
        "queue full",
        format!("{} submits refused for a full queue", s.queue_full),
    );
    if !s.counters.is_empty() {
        let c: Vec<String> = s.counters.iter().map(|(k, v)| format!("{k}={v}")).collect();
        row("wqd", c.join(" "));
    }
    match f.verdict() {
        None => row("checks", "all passed: nothing lost or duplicated, every flush returned, no start on an offline CPU, fallbacks and rejections only with the whole group down".into()),
        Some(v) => {
            row("checks", format!("FAILED: {v}"));
            for (p, ex) in &f.examples {
                for e in ex {
                    row("", format!("{p}: {e}"));
                }
            }
        }
    }
    o
}
