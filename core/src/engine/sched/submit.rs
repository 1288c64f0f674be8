//! Submit: pass 1 checks a whole batch (groups, delays and deadlines, `max_queued`) and
//! changes nothing; pass 2 ([`Sched::queue_batch`]) cannot fail and queues every entry; should
//! it panic all the same, [`Sched::roll_back`] undoes the batch. Also the batch records
//! ([`BatchRec`]) that flushes of a batch scope read.
//!
//! Invariant: a batch is accepted whole or not at all — no half batch is ever left behind, and
//! entry *i* of a batch always has id `first + i`.

use std::cmp::Reverse;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use crate::engine::{EngineError, Receipt, State, Submitted};
use crate::groups::Fallback;
use crate::target::Target;

use super::item::{Body, Cold, Entry, Item, ItemId, NOT_BOUND};
use super::timers::{instant_after, TIMER_DEADLINE, TIMER_DELAY};
use super::{Effects, Sched};

pub(super) struct BatchRec {
    /// Entry i of the batch has id `first + i`.
    pub(super) first: ItemId,
    pub(super) count: usize,
    /// Ids of entries that were duplicates of pending keys (never used; sorted).
    pub(super) unused: Vec<ItemId>,
    pub(super) live: usize,
    pub(super) created: Instant,
    /// Its items that ended, by state: what a flush of the batch that begins after they ended
    /// counts those without a record as (see `Sched::register_flush`).
    pub(super) ended: [u32; 8],
    /// How many of them ended with a full result in the store.
    pub(super) recorded: u32,
    /// Counting flushes of the whole batch registered on the record rather than on each item
    /// (`Sched::flush_batch_shared`): told, with `ended`, when `live` reaches zero.
    pub(super) waiters: Vec<BatchWaiter>,
    /// Some entry was delayed at submit: a flush of the batch queues delayed items at once,
    /// which only the exclusive path does.
    pub(super) delays: bool,
}

impl BatchRec {
    /// The record of a batch of `count` entries from id `first`, all live, submitted `now`.
    pub(super) fn new(first: ItemId, count: usize, now: Instant) -> BatchRec {
        BatchRec {
            first,
            count,
            unused: Vec::new(),
            live: count,
            created: now,
            ended: [0; 8],
            recorded: 0,
            waiters: Vec::new(),
            delays: false,
        }
    }
}

/// A counting flush waiting on a batch record: its channel closes, after its tally got the
/// batch's counts, when the batch's last item ends.
pub(crate) struct BatchWaiter {
    pub(super) tx: flume::Sender<crate::engine::FlushMsg>,
    pub(super) tally: std::sync::Arc<parking_lot::Mutex<crate::engine::Tally>>,
}

impl Sched {
    pub(crate) fn submit(
        &mut self,
        wq_name: &str,
        bodies: Vec<Entry>,
        fx: &mut Effects,
    ) -> Result<Receipt, EngineError> {
        if self.shutdown {
            return Err(EngineError::ShuttingDown);
        }
        let wi = self.wq_index(wq_name)?;
        if self.wqs[wi].get_mut().draining {
            return Err(EngineError::Draining(wq_name.to_string()));
        }
        // Pass 1: validate everything, compute every instant and count what will be queued;
        // change nothing. Everything that can fail fails here.
        let now = Instant::now();
        let mut last: Option<&Target> = None;
        // Runs of entries sharing a body (copies) skip even the comparison of targets.
        let mut last_body: Option<&Arc<Body>> = None;
        let mut batch_keys: HashSet<&str> = HashSet::new();
        let mut adding = 0usize;
        // (delay end, deadline) per entry; allocated only for a batch that uses either.
        let mut times: Vec<(Option<Instant>, Option<Instant>)> = Vec::new();
        for (index, e) in bodies.iter().enumerate() {
            let b = &e.body;
            if !last_body.is_some_and(|lb| Arc::ptr_eq(lb, b)) {
                if last != Some(&b.target) {
                    self.snapshot
                        .groups
                        .resolve(&b.target, &self.live, Fallback::Wait)
                        .map_err(|source| EngineError::Group { index, source })?;
                    last = Some(&b.target);
                }
                last_body = Some(b);
            }
            if e.delay.is_some() || e.deadline.is_some() {
                if times.is_empty() {
                    times.resize(bodies.len(), (None, None));
                }
                times[index] = (
                    instant_after(index, "delay", e.delay, self.max_delay, now)?,
                    instant_after(index, "deadline", e.deadline, self.max_deadline, now)?,
                );
            }
            match &e.key {
                Some(k) if self.wqs[wi].get_mut().keys.contains_key(k.as_str()) => {}
                Some(k) if !batch_keys.insert(k.as_str()) => {}
                _ => adding += 1,
            }
        }
        let wq = self.wqs[wi].get_mut();
        if wq.live() + adding > wq.attrs.max_queued {
            return Err(EngineError::QueueFull {
                workqueue: wq_name.to_string(),
                limit: wq.attrs.max_queued,
                pending: wq.live(),
                adding,
            });
        }
        drop(batch_keys);
        // Pass 2: queue. It cannot fail; should it panic all the same (a bug), the batch is
        // rolled back whole before the panic goes on, so no half batch is ever left behind.
        let batch = *self.next_batch.get_mut();
        *self.next_batch.get_mut() += 1;
        let first = *self.next_item.get_mut();
        let finished_before = fx.finished.len();
        let pass2 = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.queue_batch(wi, batch, now, bodies, &times, fx)
        }));
        let items = match pass2 {
            Ok(items) => items,
            Err(panic) => {
                self.roll_back(wi, batch, first, finished_before, fx);
                std::panic::resume_unwind(panic);
            }
        };
        Ok(Receipt {
            batch,
            first,
            items,
        })
    }

    /// Pass 2 of [`Sched::submit`]: every entry takes the next id and is queued (or delayed,
    /// or rejected at once when its queue has no eligible CPU and its fallback is `reject`).
    fn queue_batch(
        &mut self,
        wi: usize,
        batch: u64,
        now: Instant,
        bodies: Vec<Entry>,
        times: &[(Option<Instant>, Option<Instant>)],
        fx: &mut Effects,
    ) -> Vec<Submitted> {
        let wall = SystemTime::now();
        let first = *self.next_item.get_mut();
        // The batch's record exists before its items do, so an item that ends during the
        // submit (rejected: no eligible CPU) is counted out of `live` like any other. Every
        // entry counts as live from the start (one update, not one look-up per entry); the
        // duplicates, which never become items, are taken out at the end.
        self.batches
            .get_mut()
            .insert(batch, BatchRec::new(first, bodies.len(), now));
        self.batch_order.get_mut().push_back(batch);
        let wq32 = wi as u32;
        let mut out = Vec::with_capacity(bodies.len());
        let mut touched: Vec<(usize, usize)> = Vec::new();
        let mut unused: Vec<ItemId> = Vec::new();
        // The body of the previous entry and its queue: runs of entries sharing a body (the
        // common case) find their queue without comparing targets.
        let mut last_body: Option<(Arc<Body>, usize)> = None;
        // The last queue asked for its refusal (see `Sched::refusal`), and the answer.
        let mut refusal: Option<(usize, Option<String>)> = None;
        let mut delays = false;
        for (index, Entry { body: b, key, .. }) in bodies.into_iter().enumerate() {
            if index > 0 {
                crate::failpoint::seam!("engine::submit-between-items");
            }
            let (delay_at, deadline_at) = times.get(index).copied().unwrap_or((None, None));
            let key: Option<Arc<str>> = key.map(Arc::from);
            // Every entry takes the next id, so entry i of a batch is `first + i`; the id of
            // a duplicate is never used and is left out of the batch's scope.
            let id = *self.next_item.get_mut();
            *self.next_item.get_mut() += 1;
            if let Some(k) = &key {
                if let Some(&dup) = self.wqs[wi].get_mut().keys.get(k) {
                    out.push(Submitted {
                        id: dup,
                        queued: false,
                    });
                    unused.push(id);
                    continue;
                }
            }
            let qid = match &last_body {
                Some((lb, q)) if Arc::ptr_eq(lb, &b) => *q,
                _ => {
                    let remote = b.remote_name();
                    let q = match touched.last() {
                        Some(&(q, _))
                            if self.queues[q].get_mut().target == b.target
                                && self.queues[q].get_mut().remote.as_ref() == remote =>
                        {
                            q
                        }
                        _ => self.queue_for(wi, &b.target, remote),
                    };
                    last_body = Some((b.clone(), q));
                    q
                }
            };
            match touched.last_mut() {
                Some((q, n)) if *q == qid => *n += 1,
                _ => touched.push((qid, 1)),
            }
            let wq = self.wqs[wi].get_mut();
            wq.submitted += 1;
            if let Some(k) = &key {
                wq.keys.insert(k.clone(), id);
            }
            let delayed = delay_at.filter(|&at| at > now);
            // Whether the queue refuses new pending items: asked once per run of one queue.
            let refused = match &refusal {
                Some((q, r)) if *q == qid => r.clone(),
                _ => {
                    let r = self.refusal(qid);
                    refusal = Some((qid, r.clone()));
                    r
                }
            };
            self.items.get_mut().insert(
                id,
                Item {
                    batch,
                    body: b,
                    key,
                    queued_at: wall,
                    waiter: 0,
                    cold: deadline_at.map(|d| {
                        Box::new(Cold {
                            deadline: Some(d),
                            ..Cold::default()
                        })
                    }),
                    wq: wq32,
                    queue: qid as u32,
                    bound: NOT_BOUND,
                    rebinds: 0,
                    state: if delayed.is_some() {
                        State::Delayed
                    } else {
                        State::Pending
                    },
                    fallback: None,
                },
            );
            match (delayed, refused) {
                (Some(at), _) => {
                    delays = true;
                    self.wqs[wi].get_mut().delayed += 1;
                    self.queues[qid].get_mut().delayed += 1;
                    self.timers.push(Reverse((at, TIMER_DELAY, id)));
                    fx.timer_kick = true;
                }
                (None, Some(reason)) => self.refuse(id, qid, reason, fx),
                (None, None) => self.push_pending(id, qid, wi),
            }
            if let Some(at) = deadline_at {
                self.timers.push(Reverse((at, TIMER_DEADLINE, id)));
                fx.timer_kick = true;
            }
            out.push(Submitted { id, queued: true });
        }
        if let Some(rec) = self.batches.get_mut().get_mut(&batch) {
            rec.live -= unused.len();
            rec.unused = unused;
            rec.delays = delays;
        }
        if self.observed {
            let queued = out.iter().filter(|s| s.queued).count();
            fx.submitted = Some((self.wqs[wi].get_mut().name.clone(), queued));
        }
        // Each queue made ready once, for all its runs (a fan-out's runs alternate queues).
        if touched.len() > 1 {
            touched.sort_by_key(|t| t.0);
        }
        for same in touched.chunk_by(|a, b| a.0 == b.0) {
            let qid = same[0].0;
            if self.queues.contains(qid) {
                self.make_ready_submitted(qid, same.iter().map(|t| t.1).sum(), fx);
            }
        }
        out
    }

    /// Undoes a batch whose pass 2 panicked after inserting items `first..next_item`: removes
    /// them (and the results and totals of any it rejected at once), their keys, timers and
    /// the batch record, and restores every counter. Their ids stay used (never reissued).
    fn roll_back(
        &mut self,
        wi: usize,
        batch: u64,
        first: ItemId,
        finished_before: usize,
        fx: &mut Effects,
    ) {
        let ids = first..*self.next_item.get_mut();
        tracing::error!(
            batch,
            items = ids.end - ids.start,
            "submit panicked; rolling the batch back whole"
        );
        for id in ids.clone() {
            if let Some(item) = self.items.get_mut().remove(&id) {
                self.uncount_waiting(&item);
                let wq = self.wqs[wi].get_mut();
                wq.submitted -= 1;
                if let Some(k) = &item.key {
                    if wq.keys.get(k) == Some(&id) {
                        wq.keys.remove(k);
                    }
                }
            } else if let Some(state) = self.results.lock().take(id) {
                // Rejected during the submit: its result and counts go too.
                self.totals.get_mut()[state.index()] -= 1;
                let wq = self.wqs[wi].get_mut();
                wq.totals[state.index()] -= 1;
                wq.submitted -= 1;
            }
        }
        fx.finished.truncate(finished_before);
        self.timers.retain(|Reverse((_, _, id))| !ids.contains(id));
        self.batches.get_mut().remove(&batch);
        if self.batch_order.get_mut().back() == Some(&batch) {
            self.batch_order.get_mut().pop_back();
        }
    }
}
