//! Results: the store of terminal results ([`Results`], bounded by count, age and bytes,
//! oldest forgotten first), what one costs, the output cut to `max_result_bytes`, and look-ups
//! of an item's result or current state.
//!
//! The store has its own lock, **R** (the first piece of the sharded engine's split, see
//! `engine/README.md`): the scheduler takes it inside L (`terminal` stores, flush
//! registration and cancel read), and a look-up of terminal results takes R alone, so a
//! large `GetResults` never holds the workers' lock. Lock order: L → R; nothing holding R
//! takes L.
//!
//! Invariant (under R): `bytes` is the sum of [`result_bytes`] over the stored results, and
//! after each insert the store is within `max` results and `max_bytes` (keeping at least one).
//! An item leaves `items` and enters the store in one L hold, or (a worker's finish batch,
//! `finish.rs`'s `Finished`) after it, with R taken before that hold ended; so a reader
//! holding L, then R, finds every issued, unforgotten item in exactly one of them.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::engine::idhash::IdMap;
use crate::engine::{ItemResult, State};

use super::item::ItemId;
use super::Sched;

/// Cuts a handler's output to `max` bytes (limits.max_result_bytes).
pub(super) fn cut_output(mut out: Vec<u8>, max: usize) -> Vec<u8> {
    if out.len() > max {
        tracing::debug!(
            bytes = out.len(),
            max,
            "result output cut to limits.max_result_bytes"
        );
        out.truncate(max);
        out.shrink_to_fit();
    }
    out
}

/// Terminal results, bounded by count, age and bytes (oldest forgotten first).
pub(crate) struct Results {
    pub(super) map: IdMap<ItemId, Arc<ItemResult>>,
    pub(super) order: VecDeque<(Instant, ItemId)>,
    pub(super) max: usize,
    pub(super) ttl: Duration,
    /// Estimated bytes of the stored results ([`result_bytes`]).
    pub(super) bytes: usize,
    pub(super) max_bytes: usize,
}

/// The store behind R, shared by the scheduler (inside L) and look-ups (R alone).
pub(crate) type Store = Arc<parking_lot::Mutex<Results>>;

/// R, held.
pub(crate) type ResultsGuard<'a> = parking_lot::MutexGuard<'a, Results>;

/// What one stored result costs, estimated: its texts plus a fixed overhead (the record, its
/// `Arc`, the map and order entries).
fn result_bytes(r: &ItemResult) -> usize {
    const OVERHEAD: usize = std::mem::size_of::<ItemResult>() + 64;
    OVERHEAD + r.output.len() + r.error.len() + r.reason.len()
}

impl Results {
    /// A stored result, taken with R alone (see the module docs).
    pub(crate) fn get(&self, id: ItemId) -> Option<Arc<ItemResult>> {
        self.map.get(&id).cloned()
    }
    pub(super) fn insert(&mut self, r: Arc<ItemResult>, now: Instant) {
        self.order.push_back((now, r.id));
        self.bytes += result_bytes(&r);
        if let Some(old) = self.map.insert(r.id, r) {
            self.bytes -= result_bytes(&old);
        }
        while self.map.len() > self.max || (self.bytes > self.max_bytes && self.map.len() > 1) {
            if !self.pop_oldest() {
                break;
            }
        }
    }
    /// Forgets the oldest result; `false` when there is none.
    fn pop_oldest(&mut self) -> bool {
        match self.order.pop_front() {
            Some((_, id)) => {
                if let Some(old) = self.map.remove(&id) {
                    self.bytes -= result_bytes(&old);
                }
                true
            }
            None => false,
        }
    }
    /// Removes one result (a batch rolled back) and returns it.
    pub(super) fn take(&mut self, id: ItemId) -> Option<Arc<ItemResult>> {
        let old = self.map.remove(&id)?;
        self.bytes -= result_bytes(&old);
        Some(old)
    }
    pub(super) fn expire(&mut self, now: Instant) {
        while let Some(&(at, _)) = self.order.front() {
            if now.duration_since(at) < self.ttl {
                break;
            }
            self.pop_oldest();
        }
    }
}

impl Sched {
    /// Whether `id` was ever handed out (as an item or a duplicate's reserved slot).
    pub(crate) fn issued(&self, id: ItemId) -> bool {
        id != 0 && id < self.next_item
    }

    /// The store behind R, for look-ups that do not take L.
    pub(crate) fn results_store(&self) -> Store {
        self.results.clone()
    }

    /// An item's current state (live), or its stored result; under L, so an item that ends
    /// meanwhile is found in one or the other.
    pub(crate) fn result_of(&self, id: ItemId) -> Option<Arc<ItemResult>> {
        let Some(it) = self.items.get(&id) else {
            return self.results.lock().get(id);
        };
        Some(Arc::new(ItemResult {
            id,
            batch: it.batch,
            workqueue: self.wqs[it.wi()].name.clone(),
            state: it.state,
            output: Vec::new(),
            error: String::new(),
            target: it.body.target.clone(),
            handler: it.body.handler_name().clone(),
            cpu_started: self.bound(id).map(|b| b.cpu),
            cpu_finished: None,
            fallback: it.fallback,
            reason: if it.state == State::Pending {
                self.queues[it.qid()].reason.clone()
            } else {
                it.reason().to_string()
            },
            rebinds: it.rebinds.into(),
            queued_at: it.queued_at,
            started_at: None,
            finished_at: None,
            epoch_started: None,
            epoch_decided: it
                .cold
                .as_ref()
                .and_then(|c| (c.decided != 0).then_some(c.decided)),
            worker: it.cold.as_ref().and_then(|c| c.worker),
            worker_lost: it.cold.as_ref().map_or(0, |c| c.lost),
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::cpuset::CpuSet;
    use crate::engine::{Engine, EngineConfig, ItemSpec, State};
    use crate::handler::Registry;
    use crate::target::Target;

    fn engine() -> Engine {
        let snap = crate::live::flat_snapshot(&CpuSet::range(0, 1));
        let cfg = EngineConfig {
            pinning: false,
            ..EngineConfig::default()
        };
        Engine::start(cfg, Registry::with_builtins(None), snap).unwrap()
    }

    /// Terminal results are read under R alone: with L held by someone else (a long submit,
    /// a topology change), a look-up of stored results still returns, and one of a live item
    /// waits for L and then sees it live. Fails if `Engine::results` takes L for stored ids.
    #[test]
    fn stored_results_are_read_without_the_scheduler_lock() {
        let engine = engine();
        let items: Vec<ItemSpec> = (0..100)
            .map(|_| ItemSpec::new(Target::All, "noop"))
            .collect();
        let (receipt, flush) = engine.submit_and_flush("default", items, false).unwrap();
        let ids: Vec<_> = receipt.items.iter().map(|s| s.id).collect();
        let sum = flush.wait(Some(Duration::from_secs(30))).unwrap();
        assert_eq!(sum.covered, 100);

        let (tx, rx) = std::sync::mpsc::channel();
        let held = engine.inner.sched.lock();
        std::thread::scope(|s| {
            s.spawn(|| {
                let got = engine.results(&ids);
                let _ = tx.send(got);
            });
            let got = rx
                .recv_timeout(Duration::from_secs(20))
                .expect("a look-up of stored results waited for L");
            assert_eq!(got.len(), 100);
            for (r, id) in got.iter().zip(&ids) {
                let r = r.as_ref().expect("stored result");
                assert_eq!((r.id, r.state), (*id, State::Ok));
            }
            drop(held);
        });
        // An id never issued is looked up under L too, and is unknown.
        assert!(engine.results(&[1 << 40]).iter().all(Option::is_none));
        engine.shutdown(Duration::from_secs(5));
    }
}
