//! The engine [`Observer`]: per-item counters and histograms, re-binds and watchdog reports.
//!
//! Owns the cached handles per workqueue ([`WqHandles`]): the recorder's counters, and the
//! per-item histograms of our own ([`super::buckets`]), which the scrape renders from here
//! ([`EngineMetrics::render_items`]). Invariant: a workqueue's handles are registered once,
//! the first time it is seen, under the write lock; every later event takes the read lock,
//! looks the name up (no allocation) and updates atomics. Past [`MAX_WORKQUEUE_LABELS`]
//! names, new workqueues share the `_other` handles, so the label stays bounded whatever
//! clients create. Called outside the engine lock, never calls back into it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ::metrics::Counter;
use parking_lot::RwLock;

use super::buckets::{ItemHistogram, Local};
use super::{names, Registry, MAX_WORKQUEUE_LABELS};
use wqd_core::engine::{Ended, Observer, State};

/// The label value of workqueues beyond [`MAX_WORKQUEUE_LABELS`].
pub(crate) const OTHER_WORKQUEUE: &str = "_other";

/// Terminal states in label order.
const TERMINAL: [State; 5] = [
    State::Ok,
    State::Failed,
    State::Cancelled,
    State::Expired,
    State::Rejected,
];

fn terminal_index(s: State) -> Option<usize> {
    TERMINAL.iter().position(|t| *t == s)
}

/// Which histogram of a workqueue's handles a family renders.
type Pick = fn(&WqHandles) -> &ItemHistogram;

/// Handles of one workqueue label value.
struct WqHandles {
    submitted: Counter,
    finished: [Counter; 5],
    wait: ItemHistogram,
    run: ItemHistogram,
}

impl WqHandles {
    fn new(reg: &Registry, wq: &str) -> WqHandles {
        let l = |extra: Option<State>| {
            let mut v = vec![("workqueue", wq.to_string())];
            if let Some(s) = extra {
                v.push(("state", s.as_str().to_string()));
            }
            v
        };
        WqHandles {
            submitted: reg.counter(names::ITEMS_SUBMITTED, &l(None)),
            finished: TERMINAL.map(|s| reg.counter(names::ITEMS_FINISHED, &l(Some(s)))),
            wait: ItemHistogram::default(),
            run: ItemHistogram::default(),
        }
    }
}

/// See the module docs.
pub(crate) struct EngineMetrics {
    reg: Arc<Registry>,
    /// L: read on every event; written when a new workqueue name shows up.
    wqs: RwLock<HashMap<Box<str>, Arc<WqHandles>>>,
    other: Arc<WqHandles>,
    rebind_offline: Counter,
    rebind_affinity: Counter,
    /// Terminal counters of attached-worker handlers, by handler name (capped like
    /// workqueues: past [`MAX_WORKQUEUE_LABELS`] names, `_other`).
    handlers: RwLock<HashMap<Box<str>, Arc<[Counter; 5]>>>,
}

impl EngineMetrics {
    pub(crate) fn new(reg: Arc<Registry>) -> EngineMetrics {
        let rb = |r: &str| reg.counter(names::REBINDS, &[("reason", r.to_string())]);
        let m = EngineMetrics {
            rebind_offline: rb("offline"),
            rebind_affinity: rb("affinity"),
            other: Arc::new(WqHandles::new(&reg, OTHER_WORKQUEUE)),
            wqs: RwLock::new(HashMap::new()),
            handlers: RwLock::new(HashMap::new()),
            reg,
        };
        // The default workqueue always exists: its series start at 0.
        m.wq("default");
        m
    }

    fn wq(&self, name: &str) -> Arc<WqHandles> {
        if let Some(h) = self.wqs.read().get(name) {
            return h.clone();
        }
        let mut w = self.wqs.write();
        if let Some(h) = w.get(name) {
            return h.clone();
        }
        // A workqueue named like the overflow label shares its handles (one series each).
        if name == OTHER_WORKQUEUE {
            w.insert(name.into(), self.other.clone());
            return self.other.clone();
        }
        if w.len() >= MAX_WORKQUEUE_LABELS {
            return self.other.clone();
        }
        let h = Arc::new(WqHandles::new(&self.reg, name));
        w.insert(name.into(), h.clone());
        h
    }

    /// The label value of workqueue `name`: its own while under the cap, else `_other`
    /// (registering it, so the scrape and the events agree).
    pub(crate) fn label(&self, name: &str) -> String {
        if Arc::ptr_eq(&self.wq(name), &self.other) {
            OTHER_WORKQUEUE.to_string()
        } else {
            name.to_string()
        }
    }

    /// Runs `f` on the handles of `name` without cloning the `Arc` on the common path.
    fn with_wq(&self, name: &str, f: impl FnOnce(&WqHandles)) {
        if let Some(h) = self.wqs.read().get(name) {
            f(h);
            return;
        }
        f(&self.wq(name));
    }

    /// The terminal counters of attached-worker handler `name`.
    fn handler(&self, name: &str) -> Arc<[Counter; 5]> {
        if let Some(h) = self.handlers.read().get(name) {
            return h.clone();
        }
        let mut w = self.handlers.write();
        let label = if w.len() >= MAX_WORKQUEUE_LABELS && !w.contains_key(name) {
            OTHER_WORKQUEUE
        } else {
            name
        };
        w.entry(label.into())
            .or_insert_with(|| {
                Arc::new(TERMINAL.map(|s| {
                    self.reg.counter(
                        names::WORKER_ITEMS,
                        &[
                            ("handler", label.to_string()),
                            ("state", s.as_str().to_string()),
                        ],
                    )
                }))
            })
            .clone()
    }

    /// Appends the per-item histograms in the Prometheus text format, each family with its
    /// `# HELP` and `# TYPE`, its series by workqueue (`_other` first, then by name).
    pub(crate) fn render_items(&self, out: &mut String) {
        let wqs = self.wqs.read();
        let mut series: Vec<(&str, &WqHandles)> = wqs
            .iter()
            .filter(|(_, v)| !Arc::ptr_eq(v, &self.other))
            .map(|(k, v)| (&**k, &**v))
            .collect();
        series.sort_unstable_by_key(|(k, _)| *k);
        series.insert(0, (OTHER_WORKQUEUE, &self.other));
        let families: [(&str, &str, Pick); 2] = [
            (
                names::ITEM_QUEUE_WAIT,
                "Time from queueing to start of items, by workqueue.",
                |h| &h.wait,
            ),
            (
                names::ITEM_RUN,
                "Run time of items that started, from start to finish, by workqueue.",
                |h| &h.run,
            ),
        ];
        for (name, help, hist) in families {
            if !out.is_empty() && !out.ends_with("\n\n") {
                out.push('\n');
            }
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} histogram\n"));
            for (wq, h) in &series {
                hist(h).render(name, "workqueue", wq, out);
            }
        }
    }

    fn cpu_counter(&self, name: &'static str, cpu: u32) -> Counter {
        self.reg.counter(name, &[("cpu", cpu.to_string())])
    }
}

impl Observer for EngineMetrics {
    fn submitted(&self, workqueue: &str, queued: usize) {
        self.with_wq(workqueue, |h| h.submitted.increment(queued as u64));
    }

    fn started(&self, workqueue: &str, _cpu: u32, waited: Duration) {
        self.with_wq(workqueue, |h| h.wait.record(waited));
    }

    fn started_all(&self, workqueue: &str, _cpu: u32, waited: &[Duration]) {
        let mut l = Local::default();
        waited.iter().for_each(|w| l.record(*w));
        self.with_wq(workqueue, |h| h.wait.add(&l));
    }

    /// One look-up of the workqueue's handles per run of items of one workqueue, and one
    /// increment per state per run (a worker's finish batch is mostly one run).
    fn finished_all(&self, ended: &[Ended]) {
        let mut rest = ended;
        while let Some(first) = rest.first() {
            let n = rest
                .iter()
                .position(|e| {
                    !Arc::ptr_eq(&e.workqueue, &first.workqueue) && *e.workqueue != *first.workqueue
                })
                .unwrap_or(rest.len());
            let (run, tail) = rest.split_at(n);
            rest = tail;
            self.with_wq(&first.workqueue, |h| {
                let mut by_state = [0u64; 5];
                let mut times = Local::default();
                for e in run {
                    if let Some(i) = terminal_index(e.state) {
                        by_state[i] += 1;
                    }
                    if let Some(t) = e.run_time {
                        times.record(t);
                    }
                }
                h.run.add(&times);
                for (c, n) in h.finished.iter().zip(by_state) {
                    if n > 0 {
                        c.increment(n);
                    }
                }
            });
            for e in run.iter().filter(|e| e.remote) {
                if let Some(i) = terminal_index(e.state) {
                    self.handler(&e.handler)[i].increment(1);
                }
            }
        }
    }

    fn finished(&self, r: &Ended) {
        self.finished_all(std::slice::from_ref(r));
    }

    fn rebound(&self, reason: &'static str) {
        match reason {
            "offline" => self.rebind_offline.increment(1),
            "affinity" => self.rebind_affinity.increment(1),
            other => self
                .reg
                .counter(names::REBINDS, &[("reason", other.to_string())])
                .increment(1),
        }
    }

    // Rare events: registering per call is fine (the registry returns the same value).
    fn lockup(&self, cpu: u32) {
        self.cpu_counter(names::WATCHDOG_LOCKUPS, cpu).increment(1);
    }

    fn hog(&self, cpu: u32) {
        self.cpu_counter(names::CPU_HOGS, cpu).increment(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A workqueue named `_other` (a valid name) and the workqueues past the cap share one
    /// series: the scrape has each histogram series once. Fails if `_other` gets handles of
    /// its own (two series with the same labels, which Prometheus rejects).
    #[test]
    fn a_workqueue_named_other_shares_the_overflow_series() {
        let m = super::super::Metrics::new().unwrap();
        let o = &m.observer;
        o.started("_other", 0, Duration::from_micros(3));
        o.started("_other", 0, Duration::from_micros(3));
        assert_eq!(o.label("_other"), OTHER_WORKQUEUE);
        let mut text = m.handle.render();
        o.render_items(&mut text);
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("wqd_item_queue_wait_seconds_count{workqueue=\"_other\"}"))
            .collect();
        assert_eq!(
            lines,
            ["wqd_item_queue_wait_seconds_count{workqueue=\"_other\"} 2"]
        );
    }

    #[test]
    fn workqueue_labels_are_capped() {
        let m = super::super::Metrics::new().unwrap();
        let o = &m.observer;
        for i in 0..MAX_WORKQUEUE_LABELS + 10 {
            o.submitted(&format!("wq{i}"), 1);
        }
        assert_eq!(o.wqs.read().len(), MAX_WORKQUEUE_LABELS);
        let text = m.handle.render();
        assert!(
            text.contains("wqd_items_submitted_total{workqueue=\"_other\"} 11"),
            "{text}"
        );
    }

    /// A finish batch told at once counts each item once, under its own workqueue and state,
    /// however the workqueues interleave (runs of one, names equal but not the same `Arc`),
    /// and records a run time per item that has one; claimed jobs' waits told at once are
    /// each recorded. Fails if a run is counted under its first item's state, or the
    /// grouping takes an item for the previous run's workqueue.
    #[test]
    fn a_finish_batch_counts_each_item_once() {
        let m = super::super::Metrics::new().unwrap();
        let o = &m.observer;
        let e = |wq: &str, state: State, run: bool| Ended {
            id: 1,
            workqueue: Arc::from(wq),
            handler: Arc::from("noop"),
            state,
            run_time: run.then(|| Duration::from_micros(5)),
            remote: false,
        };
        let batch = [
            e("a", State::Ok, true),
            e("a", State::Ok, true),
            e("a", State::Failed, true),
            e("b", State::Ok, false),
            e("a", State::Cancelled, false),
            e("b", State::Ok, true),
        ];
        o.finished_all(&batch);
        o.finished_all(&batch[..1]);
        o.started_all("b", 0, &[Duration::from_micros(3); 7]);
        let mut text = m.handle.render();
        o.render_items(&mut text);
        for (wq, state, n) in [
            ("a", "ok", 3),
            ("a", "failed", 1),
            ("a", "cancelled", 1),
            ("b", "ok", 2),
        ] {
            let line =
                format!("wqd_items_finished_total{{workqueue=\"{wq}\",state=\"{state}\"}} {n}");
            assert!(text.contains(&line), "no {line} in {text}");
        }
        assert!(
            text.contains("wqd_item_run_seconds_count{workqueue=\"a\"} 4"),
            "{text}"
        );
        assert!(
            text.contains("wqd_item_run_seconds_count{workqueue=\"b\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("wqd_item_queue_wait_seconds_count{workqueue=\"b\"} 7"),
            "{text}"
        );
    }
}
