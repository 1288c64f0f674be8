//! Engine-wide statistics and the running items, read under L.
//!
//! Invariant: reading only; every number comes from the counters the other files keep under L,
//! so one call sees one consistent state.

use std::collections::BTreeMap;

use crate::engine::{EngineStats, State};

use super::Sched;

impl Sched {
    pub(crate) fn running_total(&mut self) -> usize {
        self.pools.values_mut().map(|p| p.claims.len()).sum()
    }

    /// The running items, described for a log line (shutdown stragglers).
    pub(crate) fn running_items(&mut self) -> Vec<String> {
        let items = self.items.get_mut();
        self.pools
            .values_mut()
            .flat_map(|p| p.claims.iter())
            .filter_map(|(_, b)| {
                let (id, it) = (b.id, items.get(&b.id)?);
                Some(format!(
                    "item {id} {} on cpu {}",
                    it.body.handler_name(),
                    b.cpu
                ))
            })
            .collect()
    }

    pub(crate) fn stats(&mut self) -> EngineStats {
        let store = self.results.lock();
        EngineStats {
            epoch: self.epoch,
            live: self.live.clone(),
            pools: self.pools.values_mut().filter(|p| p.live).count(),
            workers: self.pools.values_mut().map(|p| p.workers).sum(),
            items: self.items.get_mut().len(),
            results: store.len(),
            results_bytes: store.bytes,
            timers: self.timers.len(),
            flushes: self.flushes.get_mut().len(),
            batches: self.batches.get_mut().len(),
            queues: self.queues.len(),
            totals: State::ALL
                .iter()
                .filter(|s| s.is_terminal())
                .map(|s| (*s, self.totals.get_mut()[s.index()]))
                .collect(),
            delayed: self.wqs.iter_mut().map(|(_, w)| w.get_mut().delayed).sum(),
            pending: self.wqs.iter_mut().map(|(_, w)| w.get_mut().pending).sum(),
            running: self.wqs.iter_mut().map(|(_, w)| w.get_mut().running).sum(),
            rebinds: self.rebinds.clone(),
            fallbacks: self.fallbacks.clone(),
            lockups: self.lockups,
            hogs: self.hogs,
            running_per_cpu: self
                .pools
                .iter_mut()
                .filter(|(_, p)| p.running > 0)
                .map(|(c, p)| (c, p.running))
                .collect(),
            pending_by_level: {
                let mut m: BTreeMap<(String, String), usize> = BTreeMap::new();
                for (_, q) in self.queues.iter_mut() {
                    let q = q.get_mut();
                    if q.pending == 0 {
                        continue;
                    }
                    let key = (
                        self.wqs[q.wq].get_mut().name.to_string(),
                        crate::groups::Level::of(&q.target).to_string(),
                    );
                    *m.entry(key).or_default() += q.pending;
                }
                m
            },
            shared_submits: *self.shared_submits.get_mut(),
        }
    }

    /// Every pool's and queue's scheduling state, one line each, for a test that found an
    /// item stuck (the format is for people and may change).
    pub(crate) fn dump(&mut self) -> String {
        use std::fmt::Write;
        let mut out = format!("epoch {} live {}\n", self.epoch, self.live);
        for (c, p) in self.pools.iter_mut() {
            let _ = writeln!(
                out,
                "cpu {c}: live {} gen {} workers {} coming {} idle {} running {} claims {} \
                 ready {:?} remote_ready {:?} spawn_hold {:?}",
                p.live,
                p.gen,
                p.workers,
                p.coming,
                p.idle.len(),
                p.running,
                p.claims.len(),
                p.ready,
                p.remote_ready,
                p.spawn_hold.map(|(e, _)| e),
            );
        }
        for (_, w) in self.wqs.iter_mut() {
            let w = w.get_mut();
            let mut on: Vec<_> = w.running_on.iter().filter(|(_, n)| **n != [0, 0]).collect();
            on.sort();
            let _ = writeln!(
                out,
                "wq {}: slots {:?} ordered {} pending {} running {} delayed {} running_on {on:?}",
                w.name,
                w.slots(),
                w.attrs.ordered,
                w.pending,
                w.running,
                w.delayed,
            );
        }
        let items = self.items.get_mut();
        for (qid, q) in self.queues.iter_mut() {
            let q = q.get_mut();
            let head: Vec<String> = q
                .items
                .iter()
                .take(4)
                .map(|id| match items.get(id) {
                    Some(it) => format!("{id}:{:?}", it.state),
                    None => format!("{id}:gone"),
                })
                .collect();
            let _ = writeln!(
                out,
                "queue {qid}: wq {} target {:?} pending {} delayed {} running {} eligible {} \
                 in_ready {} fallback {:?} head {head:?}",
                self.wqs[q.wq].get_mut().name,
                q.target,
                q.pending,
                q.delayed,
                q.running,
                q.eligible,
                q.in_ready,
                q.fallback,
            );
        }
        out
    }
}
