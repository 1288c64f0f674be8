//! Topology: applying a new snapshot. CPUs that left lose their pool's generation, idle
//! workers and ready lists; CPUs that came get a new generation and a worker; every queue is
//! re-resolved.
//!
//! Invariant: this is the only publisher of `Inner::live` (the live flags and the epoch); it
//! publishes under L, through the seqlock of `epoch.rs`, so a worker's lock-free start check
//! sees the flag and epoch of one applied snapshot (README, races 1 and 2).

use std::sync::Arc;
use std::time::Instant;

use crate::engine::Inner;
use crate::live::Snapshot;

use super::queue::Pool;
use super::{Effects, Sched};

impl Sched {
    /// Applies a new snapshot (see `Engine::apply_snapshot`).
    pub(crate) fn apply_snapshot(
        &mut self,
        inner: &Arc<Inner>,
        snap: &Arc<Snapshot>,
        fx: &mut Effects,
    ) {
        if self.epoch != 0 && snap.epoch <= self.epoch {
            return;
        }
        let new_live = snap.live.clone();
        let gone = self.live.difference(&new_live);
        let came = new_live.difference(&self.live);
        let now = Instant::now();
        let publish = inner.live.publish();
        for c in gone.iter() {
            if let Some(p) = self.pools.get_mut(&c) {
                p.live = false;
                p.gen += 1;
                p.workers = 0;
                p.coming = 0;
                fx.unpark.extend(p.idle.drain(..).map(|(_, u)| u));
                // Attached workers' slots of this CPU stay parked in `idle_slots`: they are
                // woken when it is live again and a queue becomes ready on it.
                for qid in p.ready.drain(..).chain(p.remote_ready.drain(..)) {
                    if let Some(q) = self.queues.get_mut(qid) {
                        q.get_mut().in_ready.remove(c);
                    }
                }
            }
            publish.set(c, false);
        }
        let eager = new_live.len() <= 256 && !self.shutdown;
        for c in came.iter() {
            if !inner.live.covers(c) {
                continue;
            }
            let p = self.pools.get_or_insert_with(c, || Pool::new(now));
            p.live = true;
            p.gen += 1;
            p.workers = 0;
            p.coming = 0;
            p.last_progress = now;
            p.lockup_reported = false;
            if eager {
                p.workers = 1;
                p.coming = 1;
                fx.spawn.push((c, p.gen));
            }
            publish.set(c, true);
        }
        self.epoch = snap.epoch;
        self.live = new_live;
        self.snapshot = snap.clone();
        publish.finish(snap.epoch);
        let qids: Vec<usize> = self.queues.iter().map(|(k, _)| k).collect();
        for qid in qids {
            self.resolve_queue(qid, fx);
        }
        if !gone.is_empty() || !came.is_empty() {
            tracing::info!(epoch = snap.epoch, live = %self.live, gone = %gone, came = %came, "topology applied");
        }
    }
}
