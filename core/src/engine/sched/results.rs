//! Results: the store of terminal results ([`Results`], bounded by count, age and bytes,
//! oldest forgotten first), what one costs, the output cut to `max_result_bytes`, and look-ups
//! of an item's result or current state.
//!
//! Invariant (under L): `bytes` is the sum of [`result_bytes`] over the stored results, and
//! after each insert the store is within `max` results and `max_bytes` (keeping at least one).

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
pub(super) struct Results {
    pub(super) map: IdMap<ItemId, Arc<ItemResult>>,
    pub(super) order: VecDeque<(Instant, ItemId)>,
    pub(super) max: usize,
    pub(super) ttl: Duration,
    /// Estimated bytes of the stored results ([`result_bytes`]).
    pub(super) bytes: usize,
    pub(super) max_bytes: usize,
}

/// What one stored result costs, estimated: its texts plus a fixed overhead (the record, its
/// `Arc`, the map and order entries).
fn result_bytes(r: &ItemResult) -> usize {
    const OVERHEAD: usize = std::mem::size_of::<ItemResult>() + 64;
    OVERHEAD + r.output.len() + r.error.len() + r.reason.len()
}

impl Results {
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
    /// Removes one result (a batch rolled back).
    pub(super) fn remove(&mut self, id: ItemId) {
        if let Some(old) = self.map.remove(&id) {
            self.bytes -= result_bytes(&old);
        }
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

    pub(crate) fn result_of(&self, id: ItemId) -> Option<Arc<ItemResult>> {
        if let Some(r) = self.results.map.get(&id) {
            return Some(r.clone());
        }
        let it = self.items.get(&id)?;
        Some(Arc::new(ItemResult {
            id,
            batch: it.batch,
            workqueue: self.wqs[it.wi()].name.clone(),
            state: it.state,
            output: Vec::new(),
            error: String::new(),
            target: it.body.target.clone(),
            handler: it.body.handler_name().clone(),
            cpu_started: self.running.get(&id).map(|b| b.cpu),
            cpu_finished: None,
            fallback: it.fallback,
            reason: if it.state == State::Pending {
                self.queues[it.qid()].reason.clone()
            } else {
                it.reason().to_string()
            },
            rebinds: it.rebinds,
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
