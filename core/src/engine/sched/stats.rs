//! Engine-wide statistics and the running items, read under L.
//!
//! Invariant: reading only; every number comes from the counters the other files keep under L,
//! so one call sees one consistent state.

use std::collections::BTreeMap;

use crate::engine::{EngineStats, State};

use super::Sched;

impl Sched {
    pub(crate) fn running_total(&self) -> usize {
        self.running.len()
    }

    /// The running items, described for a log line (shutdown stragglers).
    pub(crate) fn running_items(&self) -> Vec<String> {
        self.running
            .iter()
            .filter_map(|(_, b)| {
                let (id, it) = (b.id, self.items.get(&b.id)?);
                Some(format!(
                    "item {id} {} on cpu {}",
                    it.body.handler_name(),
                    b.cpu
                ))
            })
            .collect()
    }

    pub(crate) fn stats(&self) -> EngineStats {
        let store = self.results.lock();
        EngineStats {
            epoch: self.epoch,
            live: self.live.clone(),
            pools: self.pools.values().filter(|p| p.live).count(),
            workers: self.pools.values().map(|p| p.workers).sum(),
            items: self.items.len(),
            results: store.len(),
            results_bytes: store.bytes,
            timers: self.timers.len(),
            flushes: self.flushes.len(),
            queues: self.queues.len(),
            totals: State::ALL
                .iter()
                .filter(|s| s.is_terminal())
                .map(|s| (*s, self.totals[s.index()]))
                .collect(),
            delayed: self.wqs.iter().map(|(_, w)| w.delayed).sum(),
            pending: self.wqs.iter().map(|(_, w)| w.pending).sum(),
            running: self.wqs.iter().map(|(_, w)| w.running).sum(),
            rebinds: self.rebinds.clone(),
            fallbacks: self.fallbacks.clone(),
            lockups: self.lockups,
            hogs: self.hogs,
            running_per_cpu: self
                .pools
                .iter()
                .filter(|(_, p)| p.running > 0)
                .map(|(c, p)| (c, p.running))
                .collect(),
            pending_by_level: {
                let mut m: BTreeMap<(String, String), usize> = BTreeMap::new();
                for (_, q) in self.queues.iter().filter(|(_, q)| q.pending > 0) {
                    let key = (
                        self.wqs[q.wq].name.to_string(),
                        crate::groups::Level::of(&q.target).to_string(),
                    );
                    *m.entry(key).or_default() += q.pending;
                }
                m
            },
        }
    }
}
