//! Cancel and flush: [`Sched::cancel`] (pending items end now, running ones get their token
//! raised), the ids a flush scope covers, and flush registration ([`FlushRec`]).
//!
//! Invariant (under L): coverage is computed and registered in one lock hold, so each covered
//! item is either live (its waiters hold the flush, and `terminal` counts it) or already
//! terminal (its stored result is sent at once); a flush's `remaining` reaches zero exactly
//! when its last covered item ends, and its record is then removed, closing its channel. A
//! counting flush of a whole batch may instead wait on the batch's record
//! ([`Sched::flush_batch_shared`], under L shared and the batches' lock): it is told, with the
//! batch's counts, by the `notify` that takes the record's `live` to zero, or at once if it
//! is zero.

use std::sync::Arc;
use std::time::Instant;

use crate::engine::{
    CancelOutcome, EngineError, Flush, FlushEvent, FlushMsg, FlushScope, Inner, State,
};

use super::finish::CANCELLED_UNSTARTED;
use super::item::ItemId;
use super::results::{Made, Stored};
use super::submit::BatchWaiter;
use super::{Effects, Sched};

/// How a flush hands over what it learns of each covered item.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// An event per item as items end (one message per worker finish batch): a stream.
    Stream,
    /// An event per item, in messages of at least [`KEPT_CHUNK`] entries, the rest when the
    /// last covered item ends: for a caller that handles them in bulk (the daemon's
    /// `Submit(wait)`), a few wake-ups of its waiter per flush instead of one per finish
    /// batch.
    AtEnd,
    /// No event per item: the flush's tally counts.
    Count,
}

pub(crate) struct FlushRec {
    pub(super) tx: flume::Sender<FlushMsg>,
    /// Events of items that ended in the current worker's finish batch, sent together when
    /// it ends (see [`Sched::finish_all`]); empty whenever L is free.
    pub(super) held: Vec<FlushEvent>,
    pub(super) remaining: usize,
    /// Summary-only flushes count here instead of sending an event per item.
    pub(super) tally: Option<Arc<parking_lot::Mutex<crate::engine::Tally>>>,
    /// For a counting flush, items of the current worker's finish batch counted under L,
    /// added to `tally` once when the batch ends (one lock of the tally per batch, not per
    /// item); all zero whenever L is free.
    pub(super) held_counts: [usize; 8],
    /// Whether it is on `Sched::held_flushes` (it has held events or counts); `false`
    /// whenever L is free.
    pub(super) listed: bool,
    /// [`Delivery::AtEnd`]: what it learnt so far, sent together with the last item's.
    pub(super) kept: Option<Kept>,
}

/// What a [`Delivery::AtEnd`] flush keeps until its last item ends or [`KEPT_CHUNK`] entries
/// are kept, and then sends in one message ([`crate::engine::FlushMsg::Kept`]): events, and
/// full results as copies of the records the store gets, made into
/// [`crate::engine::ItemResult`]s by the receiver (`Flush::next`) or read in place
/// (`Flush::next_delivered`), not made under L by the worker that ended the item (an
/// allocation and three counts on names every worker shares, per item). Events before
/// records: the caller of an at-end flush uses them together, not in order.
#[derive(Default)]
pub(crate) struct Kept {
    pub(crate) events: Vec<FlushEvent>,
    pub(crate) records: Vec<Stored>,
}

impl Kept {
    pub(crate) fn is_empty(&self) -> bool {
        self.events.is_empty() && self.records.is_empty()
    }

    /// Events and records kept.
    pub(crate) fn len(&self) -> usize {
        self.events.len() + self.records.len()
    }
}

/// How many entries an at-end flush keeps before it hands them over while items are still
/// live (see `notify`): a batch of 1 000 wakes its waiter about four times instead of once,
/// and the waiter's work on the first parts overlaps the items still running.
pub(crate) const KEPT_CHUNK: usize = 256;

impl FlushRec {
    /// Stops per-item events: items that end from now on are counted in `t` instead.
    pub(crate) fn count_instead(&mut self, t: Arc<parking_lot::Mutex<crate::engine::Tally>>) {
        self.tally = Some(t);
    }

    /// Whether the flush's waiter spins on its channel now (a sync [`Flush::wait`] in its
    /// first `SPIN`; never an async one).
    pub(super) fn waiter_spins(&self) -> bool {
        self.tally.as_ref().is_some_and(|t| t.lock().waiter_spins)
    }

    /// Adds the counts held in a finish batch to the tally (before the flush's channel can
    /// close, so its waiter reads them all).
    pub(super) fn add_held_counts(&mut self) {
        if self.held_counts == [0; 8] {
            return;
        }
        if let Some(t) = &self.tally {
            let mut t = t.lock();
            for (n, held) in t.by_state.iter_mut().zip(&self.held_counts) {
                *n += held;
            }
        }
        self.held_counts = [0; 8];
    }
}

impl Sched {
    pub(crate) fn cancel(
        &mut self,
        ids: &[ItemId],
        fx: &mut Effects,
    ) -> Vec<(ItemId, CancelOutcome)> {
        let mut out = Vec::with_capacity(ids.len());
        let now = Instant::now();
        for &id in ids {
            let o = match self.items.get_mut().get(&id) {
                Some(it) if it.state == State::Running => {
                    if let Some(b) = self.bound(id) {
                        b.token.cancel();
                        // An attached worker holds it: tell it; the item ends when the worker
                        // answers, or is lost.
                        if let Some(rec) = b.remote.and_then(|(w, _)| self.remotes.get(&w)) {
                            fx.remote_cancel.push((rec.sink.clone(), id));
                        }
                    }
                    CancelOutcome::WasRunning
                }
                Some(_) => {
                    self.end_unstarted(id, State::Cancelled, CANCELLED_UNSTARTED.into(), now, fx);
                    CancelOutcome::CancelledPending
                }
                None => match self.results.lock().state(id) {
                    Some(state) => CancelOutcome::AlreadyTerminal(state),
                    None => CancelOutcome::Unknown,
                },
            };
            out.push((id, o));
        }
        out
    }

    pub(crate) fn scope_ids(&mut self, scope: &FlushScope) -> Result<Vec<ItemId>, EngineError> {
        match scope {
            FlushScope::Items(v) => {
                if let Some(&bad) = v
                    .iter()
                    .find(|&&id| id == 0 || id >= *self.next_item.get_mut())
                {
                    return Err(EngineError::UnknownItem(bad));
                }
                Ok(v.clone())
            }
            FlushScope::Batch(b) => {
                let rec = self
                    .batches
                    .get_mut()
                    .get(b)
                    .ok_or(EngineError::UnknownBatch(*b))?;
                Ok((rec.first..rec.first + rec.count as u64)
                    .filter(|id| rec.unused.binary_search(id).is_err())
                    .collect())
            }
            FlushScope::Workqueue(name) | FlushScope::WorkqueueAll(name) => {
                let wi = self.wq_index(name)?;
                let mut v: Vec<ItemId> = self
                    .items
                    .get_mut()
                    .iter()
                    .filter(|(_, i)| i.wi() == wi)
                    .map(|(id, _)| id)
                    .collect();
                v.sort_unstable();
                Ok(v)
            }
        }
    }

    /// For a batch scope, what its record counted of its ended items (see
    /// [`Sched::register_flush`]); nothing for every other scope, or a batch no longer known.
    pub(crate) fn ended_counts(&mut self, scope: &FlushScope) -> EndedCounts {
        match scope {
            FlushScope::Batch(b) => {
                self.batches
                    .get_mut()
                    .get(b)
                    .map_or(EndedCounts::default(), |rec| EndedCounts {
                        by_state: rec.ended.map(|n| n as usize),
                        recorded: rec.recorded as usize,
                    })
            }
            _ => EndedCounts::default(),
        }
    }

    /// A counting flush of batch `b` registered on the batch's record, under L *shared*: no
    /// item is touched, and the workers go on. `None` when the batch is unknown, or had
    /// delayed entries (a batch flush queues them at once, which only the exclusive path
    /// does); [`Sched::register_flush`] answers then.
    ///
    /// Under the batches' lock, in which `notify` counts each ended item into the record
    /// (`live` down, `ended` up) and, when `live` reaches zero, gives every waiter the counts
    /// and closes its channel: a flush registered while `live` is above zero is told by the
    /// item that takes it to zero, and one registered at zero is answered now. Either way its
    /// counts are every covered item's final state, once.
    pub(crate) fn flush_batch_shared(&self, inner: &Arc<Inner>, b: u64) -> Option<Flush> {
        let mut batches = self.batches.lock();
        let rec = batches.get_mut(&b)?;
        if rec.delays {
            return None;
        }
        let covered = rec.count - rec.unused.len();
        let opening = Opening::new(Delivery::Count);
        if rec.live == 0 {
            let (_, mut flush) = opening.open(inner, 0, 0, covered, Vec::new());
            flush.counted_before = rec.ended.map(|n| n as usize);
            return Some(flush);
        }
        // Waiters whose flush was dropped (a client gone) go now: the list stays as long as
        // the flushes still waiting.
        rec.waiters.retain(|w| !w.tx.is_disconnected());
        let (waiter, flush) = opening.on_record(inner, covered)?;
        rec.waiters.push(waiter);
        Some(flush)
    }

    /// The ids a flush of `scope` covers, and how many delayed items it leaves out. Delayed
    /// items of an item, batch or `WorkqueueAll` scope are queued at once (the kernel's
    /// `flush_delayed_work()`); a `Workqueue` scope leaves them out and counts them.
    pub(crate) fn flush_ids(
        &mut self,
        scope: &FlushScope,
        fx: &mut Effects,
    ) -> Result<(Vec<ItemId>, usize), EngineError> {
        let mut ids = self.scope_ids(scope)?;
        let is_delayed = |s: &mut Sched, id: &ItemId| {
            s.items
                .get_mut()
                .get(id)
                .is_some_and(|it| it.state == State::Delayed)
        };
        if scope.promotes_delayed() {
            let delayed: Vec<ItemId> = ids
                .iter()
                .copied()
                .filter(|id| is_delayed(self, id))
                .collect();
            for id in delayed {
                // Its delay timer is garbage now.
                self.stale_timers += 1;
                self.undelay(id, fx);
            }
            Ok((ids, 0))
        } else {
            let before = ids.len();
            ids.retain(|id| !is_delayed(self, id));
            let left_out = before - ids.len();
            Ok((ids, left_out))
        }
    }

    /// Registers a flush over `ids`, delivering as `delivery` says. With [`Delivery::Count`]
    /// no per-item events are sent: the flush's tally counts terminal states and
    /// `Flush::wait` reports them.
    ///
    /// `known`: what the caller knows of the `ids` not live (a batch's record, or the pending
    /// items a drain just cancelled on a workqueue keeping no result): how many ended, by
    /// state, and how many of them with a record in the store; nothing otherwise. The others
    /// ended without a record (their workqueue keeps no per-item result). When as many ended
    /// ids as that are missing from the store, they are those, and the flush counts them by
    /// state (the known counts less the stored results found) instead of listing them as
    /// gone; were expired results missing as well, no id can be told from another and all
    /// are gone, as without the counts. When none has a record, nothing is looked up.
    pub(crate) fn register_flush(
        &mut self,
        inner: &Arc<Inner>,
        ids: Vec<ItemId>,
        delivery: Delivery,
        known: EndedCounts,
    ) -> Flush {
        let fid = *self.next_flush.get_mut();
        *self.next_flush.get_mut() += 1;
        let opening = Opening::new(delivery);
        let mut remaining = 0;
        // Covered ids no longer live.
        let mut ended_ids = Vec::new();
        for &id in &ids {
            if let Some(it) = self.items.get_mut().get_mut(&id) {
                it.add_waiter(fid);
                remaining += 1;
            } else {
                ended_ids.push(id);
            }
        }
        let n_known: usize = known.by_state.iter().sum();
        // The counts describe these ids, or nothing is taken from them.
        let fits = n_known == ended_ids.len();
        let n_unrecorded = n_known.saturating_sub(known.recorded);
        // Items already terminal: their events go in one message.
        let mut ended = Vec::new();
        // Ended ids the store has no record of, and the stored results found, by state.
        let mut missing = Vec::new();
        let mut found = [0usize; 8];
        // When none of the ended ids has a record, no look-up is needed (a batch of a
        // workqueue keeping no per-item result).
        let look_up = !(fits && known.recorded == 0 && n_known > 0);
        if look_up {
            // R only for an id not live (a flush of a fresh batch never takes it): a worker
            // storing its finish batch's results holds R after its L hold (see `Finished`).
            let g = self.results.lock();
            // A stored result is made into an `ItemResult` once per id, whatever the copies
            // of the id in `ids` (`Made`, as for `Engine::results`).
            let mut made = Made::default();
            for id in ended_ids {
                let Some(r) = g.stored(id) else {
                    missing.push(id);
                    continue;
                };
                found[r.state().index()] += 1;
                match &opening.tally {
                    Some(t) => t.lock().by_state[r.state().index()] += 1,
                    None => ended.extend(
                        made.once(id, || Some(Arc::new(r.to_result(Some(&g.names)))))
                            .map(FlushEvent::Done),
                    ),
                }
            }
        }
        // The unrecorded never have a record: when as many ids have none, they are those (all
        // of them when nothing was looked up).
        let counted = fits && n_unrecorded > 0 && (!look_up || missing.len() == n_unrecorded);
        let mut precounted = [0; 8];
        if counted {
            for ((p, k), f) in precounted.iter_mut().zip(known.by_state).zip(found) {
                *p = k.saturating_sub(f);
            }
        } else {
            // Expired results among them (or no counts): every one is gone.
            match &opening.tally {
                Some(t) => t.lock().gone.append(&mut missing),
                None => ended.extend(missing.into_iter().map(FlushEvent::Gone)),
            }
        }
        let (rec, mut flush) = opening.open(inner, fid, remaining, ids.len(), ended);
        if let Some(rec) = rec {
            self.flushes.get_mut().insert(fid, rec);
        }
        flush.counted_before = precounted;
        flush
    }
}

/// What a flush's caller knows of the covered ids that ended (see
/// [`Sched::register_flush`]): how many by state, and how many of them have a record in the
/// store.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct EndedCounts {
    pub(crate) by_state: [usize; 8],
    pub(crate) recorded: usize,
}

/// A flush being registered: its channel and, when it counts ([`Delivery::Count`]), its
/// tally.
pub(super) struct Opening {
    delivery: Delivery,
    tx: flume::Sender<FlushMsg>,
    rx: flume::Receiver<FlushMsg>,
    pub(super) tally: Option<Arc<parking_lot::Mutex<crate::engine::Tally>>>,
}

impl Opening {
    pub(super) fn new(delivery: Delivery) -> Opening {
        let (tx, rx) = flume::unbounded();
        let tally = (delivery == Delivery::Count)
            .then(|| Arc::new(parking_lot::Mutex::new(crate::engine::Tally::default())));
        Opening {
            delivery,
            tx,
            rx,
            tally,
        }
    }

    /// The flush `fid` over `covered` ids, `remaining` of them live (their waiters name
    /// `fid`) and the others ended, `ended` their events: its record (none when no covered item
    /// is live: its channel closes once the events are in it) and its handle.
    pub(super) fn open(
        self,
        inner: &Arc<Inner>,
        fid: u64,
        remaining: usize,
        covered: usize,
        mut ended: Vec<FlushEvent>,
    ) -> (Option<FlushRec>, Flush) {
        // Kept for the last event when it delivers at the end and some item is still live.
        let kept = (self.delivery == Delivery::AtEnd && remaining > 0).then(|| Kept {
            events: std::mem::take(&mut ended),
            records: Vec::new(),
        });
        if !ended.is_empty() {
            let _ = self.tx.send(FlushMsg::Many(ended));
        }
        let rec = (remaining > 0).then(|| FlushRec {
            tx: self.tx,
            held: Vec::new(),
            remaining,
            tally: self.tally.clone(),
            held_counts: [0; 8],
            listed: false,
            kept,
        });
        let flush = handle(
            inner,
            rec.as_ref().map(|_| fid),
            self.rx,
            covered,
            self.tally,
        );
        (rec, flush)
    }

    /// A counting flush over `covered` ids that waits on their batch's record instead of a
    /// record of its own: the waiter the batch's record keeps (see `notify`) and the handle.
    /// `None` for a flush that does not count.
    pub(super) fn on_record(
        self,
        inner: &Arc<Inner>,
        covered: usize,
    ) -> Option<(BatchWaiter, Flush)> {
        let tally = self.tally?;
        let flush = handle(inner, None, self.rx, covered, Some(tally.clone()));
        Some((BatchWaiter { tx: self.tx, tally }, flush))
    }
}

/// The handle of flush `id` (`None`: registered nowhere by id) over `covered` ids.
fn handle(
    inner: &Arc<Inner>,
    id: Option<u64>,
    rx: flume::Receiver<FlushMsg>,
    covered: usize,
    tally: Option<Arc<parking_lot::Mutex<crate::engine::Tally>>>,
) -> Flush {
    Flush {
        inner: inner.clone(),
        id,
        rx,
        pending: std::collections::VecDeque::new(),
        covered,
        delayed_not_covered: 0,
        began: Instant::now(),
        tally,
        counted_before: [0; 8],
    }
}
