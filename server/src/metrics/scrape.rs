//! Gauges (and source-kept counters) refreshed at scrape time from `Engine::stats()`,
//! `Engine::workqueues()` and the `LiveView`.
//!
//! Owns [`ScrapeState`]: per gauge family, the label sets published by the previous scrape.
//! Invariant: after a refresh every family shows exactly the current label sets with their
//! current values, plus 0 for a label set that was published before and is gone now (set once;
//! the registry's idle timeout then drops it). Counters kept by the engine or the view (fallbacks,
//! topology events and epochs) are copied with `absolute`, so they never go backwards; so are
//! the connection counters of the listeners ([`connections`]).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use super::observer::EngineMetrics;
use super::{names, Labels, Registry};
use crate::conn::ListenerStats;
use wqd_core::engine::{Engine, State};
use wqd_core::groups::widen_levels;
use wqd_core::live::LiveView;

/// What the previous scrape published, per gauge family.
#[derive(Debug, Default)]
pub(crate) struct ScrapeState {
    last: HashMap<&'static str, HashSet<Labels>>,
    /// CPUs whose per-CPU counters were registered (so their series exist at 0).
    cpus_seen: BTreeSet<u32>,
}

fn l1(k: &'static str, v: impl ToString) -> Labels {
    vec![(k, v.to_string())]
}

impl ScrapeState {
    /// Publishes one gauge family: `now` as given, 0 for label sets that disappeared.
    fn publish(
        &mut self,
        reg: &Registry,
        name: &'static str,
        now: impl IntoIterator<Item = (Labels, f64)>,
    ) {
        let mut seen = HashSet::new();
        for (l, v) in now {
            reg.gauge(name, &l).set(v);
            seen.insert(l);
        }
        let last = self.last.entry(name).or_default();
        for gone in last.difference(&seen) {
            reg.gauge(name, gone).set(0.0);
        }
        *last = seen;
    }

    /// Refreshes every scrape-time metric. Takes the engine lock twice, briefly.
    pub(crate) fn refresh(
        &mut self,
        reg: &Registry,
        obs: &EngineMetrics,
        engine: &Engine,
        view: &LiveView,
    ) {
        let es = engine.stats();
        let wqs = engine.workqueues();
        let snap = view.current();
        let ls = view.stats();

        // Engine-wide.
        reg.gauge(names::WORKERS, &[]).set(es.workers as f64);
        reg.gauge(names::FLUSHES_ACTIVE, &[]).set(es.flushes as f64);
        reg.gauge(names::RESULTS_RETAINED, &[])
            .set(es.results as f64);
        reg.gauge(names::ENGINE_TOPOLOGY_EPOCH, &[])
            .set(es.epoch as f64);
        // The levels an item can widen to: their fallback series start at 0.
        for l in widen_levels() {
            let n = es.fallbacks.get(l.as_str()).copied().unwrap_or(0);
            reg.counter(names::FALLBACKS, &l1("level", l.as_str()))
                .absolute(n);
        }
        for (level, n) in &es.fallbacks {
            if !widen_levels().iter().any(|l| l.as_str() == level) {
                reg.counter(names::FALLBACKS, &l1("level", level))
                    .absolute(*n);
            }
        }

        // Per workqueue (workqueues beyond the label cap share `_other`: sum them).
        let mut pending: HashMap<Labels, f64> = HashMap::new();
        for ((wq, level), n) in &es.pending_by_level {
            let l = vec![("workqueue", obs.label(wq)), ("level", level.clone())];
            *pending.entry(l).or_default() += *n as f64;
        }
        self.publish(reg, names::ITEMS_PENDING, pending);
        let mut items: HashMap<Labels, f64> = HashMap::new();
        let mut max_queued: HashMap<Labels, f64> = HashMap::new();
        let mut draining: HashMap<Labels, f64> = HashMap::new();
        for w in &wqs {
            let wq = obs.label(&w.attrs.name);
            for (state, n) in [
                (State::Delayed, w.delayed),
                (State::Pending, w.pending),
                (State::Running, w.running),
            ] {
                let l = vec![("workqueue", wq.clone()), ("state", state.to_string())];
                *items.entry(l).or_default() += n as f64;
            }
            *max_queued.entry(l1("workqueue", &wq)).or_default() += w.attrs.max_queued as f64;
            let d = draining.entry(l1("workqueue", &wq)).or_default();
            *d = d.max(if w.draining { 1.0 } else { 0.0 });
        }
        self.publish(reg, names::WORKQUEUE_ITEMS, items);
        self.publish(reg, names::WORKQUEUE_MAX_QUEUED, max_queued);
        self.publish(reg, names::WORKQUEUE_DRAINING, draining);

        // Per CPU: every CPU the machine has shown (present, online, or ever seen online).
        let topo = &snap.topology;
        let mut cpus: BTreeSet<u32> = topo.present.iter().collect();
        cpus.extend(topo.online.iter());
        cpus.extend(topo.cpus.keys().copied());
        for &c in cpus.difference(&self.cpus_seen.clone()) {
            // Registering creates the series at 0, so `increase()` sees the first report.
            let _ = reg.counter(names::WATCHDOG_LOCKUPS, &l1("cpu", c));
            let _ = reg.counter(names::CPU_HOGS, &l1("cpu", c));
            self.cpus_seen.insert(c);
        }
        let running = cpus.iter().map(|&c| {
            let n = es.running_per_cpu.get(&c).copied().unwrap_or(0);
            (l1("cpu", c), n as f64)
        });
        self.publish(reg, names::CPU_RUNNING_ITEMS, running.collect::<Vec<_>>());
        let live = cpus
            .iter()
            .map(|&c| (l1("cpu", c), if snap.live.contains(c) { 1.0 } else { 0.0 }));
        self.publish(reg, names::CPU_LIVE, live.collect::<Vec<_>>());
        reg.gauge(names::LIVE_CPUS, &[]).set(snap.live.len() as f64);
        reg.gauge(names::ONLINE_CPUS, &[])
            .set(topo.online.len() as f64);

        // Attached workers: slots and items in flight per CPU, workers per handler name.
        let workers = engine.remote_workers();
        reg.gauge(names::WORKERS_ATTACHED, &[])
            .set(workers.len() as f64);
        let mut slots: BTreeMap<u32, (f64, f64)> = cpus.iter().map(|&c| (c, (0.0, 0.0))).collect();
        for w in &workers {
            for s in w.slots.iter().filter(|s| !s.closed) {
                let e = slots.entry(s.cpu).or_default();
                e.0 += 1.0;
                e.1 += f64::from(s.in_flight);
            }
        }
        self.publish(
            reg,
            names::WORKER_SLOTS,
            slots
                .iter()
                .map(|(&c, v)| (l1("cpu", c), v.0))
                .collect::<Vec<_>>(),
        );
        self.publish(
            reg,
            names::WORKER_IN_FLIGHT,
            slots
                .iter()
                .map(|(&c, v)| (l1("cpu", c), v.1))
                .collect::<Vec<_>>(),
        );
        let (served, _) = engine.remote_counts();
        let served: Vec<_> = served
            .into_iter()
            .take(super::MAX_WORKQUEUE_LABELS)
            .map(|(h, n)| (l1("handler", h), n as f64))
            .collect();
        self.publish(reg, names::WORKER_HANDLER_WORKERS, served);

        // Groups.
        let groups: Vec<_> = snap
            .groups
            .listing()
            .into_iter()
            .map(|g| {
                let l = vec![
                    ("level", g.level.as_str().to_string()),
                    ("group", g.target.to_string()),
                ];
                (l, g.members.intersection(&snap.live).len() as f64)
            })
            .collect();
        self.publish(reg, names::GROUP_LIVE_CPUS, groups);

        // Topology.
        reg.gauge(names::TOPOLOGY_EPOCH, &[]).set(snap.epoch as f64);
        for (source, s) in ls.iter() {
            reg.counter(names::TOPOLOGY_EVENTS, &l1("source", source.as_str()))
                .absolute(s.events);
            reg.counter(names::TOPOLOGY_EPOCHS, &l1("source", source.as_str()))
                .absolute(s.epochs);
        }
    }
}

/// Publishes each listener's connection gauges and counters (every series from the first
/// scrape, at 0 until something happens).
pub(crate) fn connections(reg: &Registry, listeners: &[std::sync::Arc<ListenerStats>]) {
    use std::sync::atomic::Ordering::Relaxed;
    for st in listeners {
        let l = || ("listener", st.listener.as_str().to_string());
        reg.gauge(names::CONNECTIONS_OPEN, &[l()])
            .set(st.open() as f64);
        reg.gauge(names::CONNECTIONS_MAX, &[l()])
            .set(st.max_connections as f64);
        reg.counter(names::CONNECTIONS_ACCEPTED, &[l()])
            .absolute(st.accepted.load(Relaxed));
        reg.counter(
            names::CONNECTIONS_REFUSED,
            &[l(), ("reason", "limit".into())],
        )
        .absolute(st.refused_limit.load(Relaxed));
        for (reason, c) in [
            ("handshake", &st.closed_handshake),
            ("idle", &st.closed_idle),
        ] {
            reg.counter(names::CONNECTIONS_CLOSED, &[l(), ("reason", reason.into())])
                .absolute(c.load(Relaxed));
        }
        for (reason, c) in [
            ("fds", &st.accept_errors_fds),
            ("other", &st.accept_errors_other),
        ] {
            reg.counter(names::ACCEPT_ERRORS, &[l(), ("reason", reason.into())])
                .absolute(c.load(Relaxed));
        }
        if st.listener == crate::conn::Listener::Unix {
            reg.counter(names::AUTHORITY_REWRITTEN, &[l()])
                .absolute(st.authority_rewritten.load(Relaxed));
        }
    }
}
