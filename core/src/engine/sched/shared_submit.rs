//! The submit under *shared* L, for its common case: a batch with no key, delay or deadline,
//! every entry into a queue that exists and has an eligible CPU, of a workqueue that is not
//! ordered or draining, with no attached-worker handler. Anything else (and any error) is the
//! exclusive submit's (`submit.rs`), decided before anything changes.
//!
//! Invariant: a batch becomes visible — its ids in their queues' FIFOs, under each queue's Q
//! — only after every one of its items is in the item table (with its flush as waiter), the
//! flush's record is in the flushes and the batch's record in the batches; so no worker can
//! take, finish or count out an item before everything that hears of its end exists, and a
//! batch is visible whole or, should its insertion panic, not at all (its items are taken out
//! again and its count given back). Its ids are allocated inside the item table's hold that inserts them, so
//! a batch's ids are contiguous (`first + i`) and inserted in order. `max_queued` is checked
//! and the batch's items counted in one hold of the workqueue's lock, so two shared submits
//! cannot both pass the limit. Locks are taken one at a time, except P → Q → workqueue → item
//! table when a worker is called (the order of the worker's shared hold), and every path
//! that is not a worker's hold or this submit holds L exclusive, so it sees all of a shared
//! submit or none of it. Each queue's FIFO gets its items in id order, all of its runs in
//! one hold of its Q, and is made ready once per batch however its runs alternate with
//! other queues' (a fan-out's do).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use crate::engine::{Flush, Inner, Receipt, State, Submitted};
use crate::groups::{Fallback, Placement, Ranking};
use crate::target::Target;

use super::flush::{Delivery, Opening};
use super::item::{Entry, Item, NOT_BOUND};
use super::queue::{local_first, room, taker_load, Queue};
use super::submit::BatchRec;
use super::{Effects, Sched};
use crate::engine::ResultsMode;

/// How many distinct targets of one batch the shared submit remembers with their queues
/// (a fan-out over more groups looks the rest up item by item, as before).
const SEEN_TARGETS: usize = 16;

/// The flush a shared submit registers with its batch: the engine's handle, and how it
/// delivers given the workqueue's results mode.
pub(crate) struct WithFlush<'a> {
    pub inner: &'a Arc<Inner>,
    pub delivery: fn(ResultsMode) -> Delivery,
}

impl Sched {
    /// Submits `bodies` to workqueue `wq_name` under shared L, registering a flush of the
    /// batch with it when `flush` says how; `None` (with `bodies` untouched and nothing
    /// changed) when the batch needs the exclusive submit (see the module docs).
    pub(crate) fn submit_shared(
        &self,
        wq_name: &str,
        bodies: &mut Vec<Entry>,
        flush: Option<WithFlush<'_>>,
        fx: &mut Effects,
    ) -> Option<(Receipt, Option<Flush>)> {
        let n = bodies.len();
        if self.shutdown || n == 0 {
            return None;
        }
        let wi = *self.wq_names.get(wq_name)?;
        let wm = self.wqs.get(wi)?;
        // The runs of entries of one queue, in batch order.
        let mut runs: Vec<(usize, usize)> = Vec::new();
        let (placement, mode) = {
            let wq = wm.lock();
            if wq.draining || wq.attrs.ordered {
                return None;
            }
            let mut last: Option<(&Arc<super::Body>, usize)> = None;
            // The batch's first targets and their queues, resolved once each: a fan-out
            // (`each:`) alternates its groups' targets item by item.
            let mut seen: Vec<(&Target, usize)> = Vec::new();
            for e in bodies.iter() {
                if e.key.is_some() || e.delay.is_some() || e.deadline.is_some() {
                    return None;
                }
                let qid = match last {
                    Some((b, q)) if Arc::ptr_eq(b, &e.body) => q,
                    _ => {
                        if e.body.remote_name().is_some() {
                            return None;
                        }
                        let q = match seen.iter().find(|(t, _)| **t == e.body.target) {
                            Some(&(_, q)) => q,
                            None => {
                                // A target the current groups no longer resolve is the
                                // exclusive submit's error to report.
                                if self
                                    .snapshot
                                    .groups
                                    .resolve(&e.body.target, &self.live, Fallback::Wait)
                                    .is_err()
                                {
                                    return None;
                                }
                                let q = *wq.queues.get(&e.body.target)?;
                                if seen.len() < SEEN_TARGETS {
                                    seen.push((&e.body.target, q));
                                }
                                q
                            }
                        };
                        last = Some((&e.body, q));
                        q
                    }
                };
                match runs.last_mut() {
                    Some((q, k)) if *q == qid => *k += 1,
                    _ => runs.push((qid, 1)),
                }
            }
            (wq.attrs.placement, wq.attrs.results)
        };
        // Each queue's runs together, in id order: a queue is filled and made ready once
        // per batch, however its runs alternate with other queues'. (qid, first index, k).
        let mut spans: Vec<(usize, usize, usize)> = Vec::with_capacity(runs.len());
        let mut at = 0;
        for &(qid, k) in &runs {
            spans.push((qid, at, k));
            at += k;
        }
        if spans.len() > 1 {
            // Stable: a queue's spans keep their order.
            spans.sort_by_key(|s| s.0);
        }
        // Each queue can take its items now: an eligible CPU, no fallback in force (its
        // policy, and a rejection, are the exclusive submit's).
        for same in spans.chunk_by(|a, b| a.0 == b.0) {
            let q = self.queues.get(same[0].0)?.lock();
            if q.eligible.is_empty() || q.fallback.is_some() || q.remote.is_some() {
                return None;
            }
        }
        // The limit, and the batch counted in (pending from now: no worker sees its items
        // before they are in their queues, and every reader of the counts holds L exclusive).
        let name = {
            let mut wq = wm.lock();
            if wq.live() + n > wq.attrs.max_queued {
                return None;
            }
            wq.pending += n;
            wq.submitted += n as u64;
            self.observed.then(|| wq.name.clone())
        };
        // From here on the batch goes in.
        let now = Instant::now();
        let batch = self.next_batch.fetch_add(1, Relaxed);
        let opened = flush.map(|f| {
            let fid = self.next_flush.fetch_add(1, Relaxed);
            (f.inner, fid, Opening::new((f.delivery)(mode)))
        });
        let fid = opened.as_ref().map_or(0, |o| o.1);
        let wall = SystemTime::now();
        let first = {
            let mut items = self.items.lock();
            let first = self.next_item.fetch_add(n as u64, Relaxed);
            let inserted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let mut qids = runs.iter().flat_map(|&(q, k)| std::iter::repeat_n(q, k));
                for (i, e) in bodies.drain(..).enumerate() {
                    if i > 0 {
                        crate::failpoint::seam!("engine::submit-between-items");
                    }
                    let qid = qids.next().unwrap_or_default();
                    items.insert(
                        first + i as u64,
                        Item {
                            batch,
                            body: e.body,
                            key: None,
                            queued_at: wall,
                            waiter: fid,
                            cold: None,
                            wq: wi as u32,
                            queue: qid as u32,
                            bound: NOT_BOUND,
                            rebinds: 0,
                            state: State::Pending,
                            fallback: None,
                        },
                    );
                }
            }));
            if let Err(panic) = inserted {
                // Nothing of it is visible yet: its items go, its count goes back.
                tracing::error!(batch, "submit panicked; rolling the batch back whole");
                for id in first..first + n as u64 {
                    items.remove(&id);
                }
                drop(items);
                let mut wq = wm.lock();
                wq.pending -= n;
                wq.submitted -= n as u64;
                drop(wq);
                std::panic::resume_unwind(panic);
            }
            first
        };
        let flush = opened.map(|(inner, fid, opening)| {
            let (rec, flush) = opening.open(inner, fid, n, n, Vec::new());
            if let Some(rec) = rec {
                self.flushes.lock().insert(fid, rec);
            }
            flush
        });
        self.batches
            .lock()
            .insert(batch, BatchRec::new(first, n, now));
        self.batch_order.lock().push_back(batch);
        // Visible: each queue's runs into its FIFO in one hold of its Q, and the queue made
        // ready once for all of them (ranked into one buffer for the batch).
        let mut ranking = Ranking::new();
        for same in spans.chunk_by(|a, b| a.0 == b.0) {
            let qid = same[0].0;
            let k: usize = same.iter().map(|s| s.2).sum();
            if let Some(qm) = self.queues.get(qid) {
                let mut q = qm.lock();
                for &(_, at, n) in same {
                    let from = first + at as u64;
                    q.items.extend(from..from + n as u64);
                }
                q.pending += k;
                q.idle_since = None;
            }
            self.make_ready_shared(qid, k, placement, &mut ranking, fx);
        }
        if let Some(name) = name {
            fx.submitted = Some((name, n));
        }
        self.shared_submits.fetch_add(1, Relaxed);
        let receipt = Receipt {
            batch,
            first,
            items: (first..first + n as u64)
                .map(|id| Submitted { id, queued: true })
                .collect(),
        };
        Some((receipt, flush))
    }

    /// [`Sched::make_ready`] under shared L, for a queue with no attached-worker handler: the
    /// takers ranked (their loads read each under its P), then per taker, in placement order,
    /// under its P and the queue's Q: the queue put on its ready list, and a worker called
    /// while `n` are not (only where the head can start now, as `call_worker_for`). Race 3
    /// holds under P: a worker registers idle in the same P hold in which it found the ready
    /// list empty, and this adds to the list and pops an idle worker in one P hold.
    fn make_ready_shared(
        &self,
        qid: usize,
        n: usize,
        placement: Placement,
        ranking: &mut Ranking,
        fx: &mut Effects,
    ) {
        let Some(qm) = self.queues.get(qid) else {
            return;
        };
        let eligible = {
            let q = qm.lock();
            if q.pending == 0 {
                return;
            }
            q.eligible.clone()
        };
        let rr = match placement {
            Placement::Spread => self.rr.fetch_add(1, Relaxed).wrapping_add(1),
            _ => self.rr.load(Relaxed),
        };
        let load = taker_load(&self.pools, &self.load, placement);
        ranking.rank(placement, &eligible, load, rr);
        let takers = match local_first(&self.pools, placement, self.wake_local && n == 1) {
            Some(c) => ranking.prefer(c),
            None => ranking.as_slice(),
        };
        let mut woken = 0;
        for &c in takers {
            let Some(mut p) = self.pools.get(&c) else {
                continue;
            };
            if !p.live {
                continue;
            }
            let mut q = qm.lock();
            if !q.in_ready.contains(c) {
                p.ready.push_back(qid);
                q.in_ready.insert(c);
            }
            if woken >= n || p.coming >= self.head_room_shared(&mut q, qid, c) {
                continue;
            }
            drop(q);
            if p.call_worker(c, self.epoch, self.max_workers, fx) {
                woken += 1;
            }
        }
    }

    /// [`Sched::head_room`] under shared L for a queue `q` (locked) of a workqueue that is not
    /// ordered.
    fn head_room_shared(&self, q: &mut Queue, qid: usize, cpu: u32) -> usize {
        // `clean_front`: the head is the first id still pending here (a cancelled item
        // leaves its id behind).
        let kind = {
            let items = self.items.lock();
            loop {
                let Some(&head) = q.items.front() else {
                    return 0;
                };
                match items.get(&head) {
                    Some(it) if it.is_pending_in(qid) => break it.body.kind(),
                    _ => {
                        q.items.pop_front();
                    }
                }
            }
        };
        let Some(wm) = self.wqs.get(q.wq) else {
            return 0;
        };
        let (slots, on) = {
            let wq = wm.lock();
            (
                wq.slots(),
                wq.running_on.get(&cpu).copied().unwrap_or([0, 0]),
            )
        };
        room(slots, on, q.running, kind)
    }
}
