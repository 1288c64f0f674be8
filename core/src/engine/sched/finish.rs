//! Finish: how a bound item ends or goes back. [`Sched::finish`] applies a worker's outcome —
//! hand-back and requeue (with the reason from the snapshot), a lost attached worker, or the
//! handler's result — and [`Sched::terminal`] is the one way out of `items`;
//! [`Sched::end_unstarted`] is `terminal` for an item that never started.
//!
//! Invariant (under L): `terminal` removes the item from `items` before anything else and
//! returns at once for an id not there, so each item reaches a terminal state exactly once;
//! it is called directly only for an item that started (all others go through
//! `end_unstarted`). A hand-back whose cancel token was raised ends `Cancelled`, never re-queued.

use std::cmp::Reverse;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use crate::engine::{Ended, FlushEvent, FlushMsg, ItemResult, ResultsMode, State, WorkerLost};
use crate::groups::Fallback;
use crate::handler::{HandlerError, HandlerKind};

use super::flush::KEPT_CHUNK;
use super::item::{Finish, Item, ItemId, Outcome, Started, NOT_BOUND};
use super::results::{cut_output, Names, ResultsGuard, Stored, StoredExtra};
use super::timers::TIMER_DEADLINE;
use super::{BatchRec, Effects, FlushRec, Sched, Wq};
use crate::engine::idhash::IdMap;

/// The error text of an item cancelled, or expired, before it started.
pub(super) const CANCELLED_UNSTARTED: &str = "cancelled before it started";
pub(super) const EXPIRED_UNSTARTED: &str = "not started before its deadline";

/// What a worker's start check says when its CPU is not live; [`Sched::finish`] turns it
/// into the reason (`offline`, `cpuset`, `isolated`) from the snapshot.
pub(crate) const NOT_LIVE: &str = "not-live";

/// The full results of one worker's finish batch, stored after the L hold they were made in.
///
/// Invariant: hand over hand. The worker takes R *before* it releases the L hold in which
/// these items left `items`, and releases R only after [`Finished::store`] has stored every
/// one. Whoever takes L afterwards and then R (flush registration, cancel, `result_of`, the
/// timers' expiry) therefore finds each of them stored, exactly as if it had been stored
/// under L; a reader of R alone that misses one looks again under L, then R, and waits for
/// the store. (A flush's waiter cannot miss one its events name: a batch's events are sent
/// after its results are stored, see below.)
///
/// The batch's flush events are made under L too and sent after it, by
/// [`Finished::send_events`], once the results are stored: each flush's sender is cloned (or,
/// for a flush whose last item ended, taken) under L, so its channel stays open until the
/// events are in it, and its waiter, woken by the send, finds every result it names stored.
#[derive(Default)]
pub(crate) struct Finished {
    results: Vec<Stored>,
    now: Option<Instant>,
    /// Per flush: its sender and the message for the batch's items it covers (`None` for a
    /// counting flush whose last item ended: dropping the sender closes its channel).
    sends: Vec<(flume::Sender<FlushMsg>, Option<FlushMsg>)>,
    /// The shared hold's buffers (`shared.rs`), kept between holds so that a hold allocates
    /// nothing: the items it takes out to record after the item table's lock (results other
    /// than `full`), and what their flushes are told.
    pub(super) ending: Vec<Item>,
    pub(super) notices: Vec<Notice>,
    pub(super) held: Vec<u64>,
    /// A flush whose waiter does not spin ended in a hold since [`Finished::take_woke`]:
    /// sending its end wakes that waiter (a thread, or the task of an RPC).
    woke: bool,
}

impl Finished {
    /// The clock reading of the hold that makes these results (their store's expiry clock).
    pub(super) fn set_now(&mut self, now: Instant) {
        self.now = Some(now);
    }

    /// No result waits to be stored.
    pub(crate) fn is_empty(&self) -> bool {
        self.results.is_empty()
    }

    /// Flush events (or a flush to close) wait to be sent.
    pub(crate) fn has_events(&self) -> bool {
        !self.sends.is_empty()
    }

    /// Sends the batch's flush events (call after L is released and the results are stored):
    /// one message per flush, and a flush whose last item ended is closed here.
    pub(crate) fn send_events(&mut self) {
        for (tx, msg) in self.sends.drain(..) {
            if let Some(msg) = msg {
                let _ = tx.send(msg);
            }
        }
    }

    /// Whether a flush whose waiter does not spin ended since the last call (see `woke`).
    pub(crate) fn take_woke(&mut self) -> bool {
        std::mem::take(&mut self.woke)
    }

    /// Stores the results, with `store` the R guard taken inside the L hold they were made
    /// in, then releases R.
    pub(crate) fn store(&mut self, mut store: ResultsGuard<'_>) {
        let now = self.now.unwrap_or_else(Instant::now);
        store.insert(&mut self.results, now);
    }
}

impl Sched {
    /// Records how a worker's jobs of one batch ended, emptying `done`. Last to first: a
    /// hand-back goes to the front of its queue, so the batch's hand-backs keep their order.
    ///
    /// The flush events of the items that end here are made under L and collected per flush
    /// in `out`, one message per flush (one send and at most one wake-up of its waiter instead
    /// of one per item), to be sent after L: an item counted by an event in `out` has left
    /// `items`, so a flush turning to a tally in a later hold does not count it again, and
    /// the channel stays open (`out` holds a sender) until the event is in it.
    ///
    /// The full results of the items that end here are made under L but not stored: they go
    /// to `out`, and the caller must pass `out` to [`Finished::store`] with R taken before it
    /// releases L (hand over hand, see [`Finished`]), then call [`Finished::send_events`].
    pub(crate) fn finish_all(
        &mut self,
        done: &mut Vec<Finish>,
        now: Instant,
        fx: &mut Effects,
        out: &mut Finished,
    ) {
        debug_assert!(self.fin.is_empty());
        std::mem::swap(&mut self.fin, out);
        self.fin.now = Some(now);
        self.holding = true;
        while let Some(f) = done.pop() {
            self.finish(f, now, fx);
        }
        self.holding = false;
        self.send_held_events();
        std::mem::swap(&mut self.fin, out);
    }

    /// Moves the events held by [`Sched::finish_all`] to its `Finished` ([`send_held`]).
    fn send_held_events(&mut self) {
        send_held(
            self.flushes.get_mut(),
            &mut self.held_flushes,
            &mut self.fin,
        );
    }

    /// Records how a job ended (or hands it back to its queue).
    /// `now` is the worker's clock reading for this lock hold.
    pub(crate) fn finish(&mut self, f: Finish, now: Instant, fx: &mut Effects) {
        // A bound item is live (`Bound` exists exactly while its item is `Running`), and its
        // claim carries what the finish needs of it.
        let Some(bound) = self.unbind(f.id, f.claim) else {
            tracing::error!(item = f.id, "finish for an item that is not bound");
            return;
        };
        let (qid, wi, kind) = (bound.queue as usize, bound.wq as usize, bound.kind);
        let cap_was_full = {
            let wq = self.wqs[wi].get_mut();
            wq.attrs.group_max_active > 0
                && self.queues[qid].get_mut().running >= wq.attrs.group_max_active as usize
        };
        self.queues[qid].get_mut().running -= 1;
        let wq = self.wqs[wi].get_mut();
        wq.running -= 1;
        if bound.slot {
            if let Some(slot) = wq.running_on.get_mut(&bound.cpu) {
                slot[usize::from(kind == HandlerKind::Waits)] -= 1;
            }
        }
        let ordered = wq.attrs.ordered;
        if let Some(p) = self.pools.get_mut(&bound.cpu) {
            p.running -= 1;
            p.last_progress = now;
            p.lockup_reported = false;
        }
        match f.outcome {
            // A cancel raised while the item was bound wins over the hand-back: it never runs
            // (cancel_work_sync's promise), wherever it would have gone next.
            Outcome::HandBack(_) if bound.token.is_cancelled() => {
                self.end_unstarted(f.id, State::Cancelled, CANCELLED_UNSTARTED.into(), now, fx);
            }
            Outcome::HandBack(why) => {
                let why = self.handback_reason(why, bound.cpu);
                *self.rebinds.entry(why).or_default() += 1;
                if self.observed {
                    fx.rebound.push(why);
                }
                if let Some(item) = self.items.get_mut().get_mut(&f.id) {
                    item.rebinds = item.rebinds.saturating_add(1);
                }
                self.requeue(f.id, now, fx);
            }
            // A cancel asked while the worker held it: the worker's loss ends it cancelled.
            Outcome::Lost(_) if bound.token.is_cancelled() => {
                let err = "cancelled; its attached worker was lost before it answered".into();
                self.end_lost(f.id, State::Cancelled, err, f.started, now, fx);
            }
            Outcome::Lost(why)
                if self.wqs[wi].get_mut().attrs.on_worker_lost == WorkerLost::Requeue =>
            {
                // A metric only: the stats' re-bind count is the sum of the items' `rebinds`
                // (hand-backs before a start), which a re-delivery is not.
                if self.observed {
                    fx.rebound.push("worker-lost");
                }
                if let Some(item) = self.items.get_mut().get_mut(&f.id) {
                    let c = item.cold();
                    c.lost += 1;
                    tracing::info!(item = f.id, lost = c.lost, %why, "worker lost holding an item; queued again (on_worker_lost = requeue)");
                }
                self.requeue(f.id, now, fx);
            }
            Outcome::Lost(why) => {
                let err = format!("worker lost: {why}");
                self.end_lost(f.id, State::Failed, err, f.started, now, fx);
            }
            Outcome::CancelledBeforeStart => {
                self.end_unstarted(f.id, State::Cancelled, CANCELLED_UNSTARTED.into(), now, fx);
            }
            Outcome::Ran(res) => {
                let (state, out, err) = ran(res);
                self.terminal(f.id, state, out, err, f.started, f.finished, now, fx);
            }
        }
        if cap_was_full {
            let n = self.queues[qid].get_mut().pending;
            self.make_ready(qid, n, fx);
        }
        if bound.slot {
            self.offer_freed_slot(bound.cpu, bound.remote.is_some(), fx);
        }
        if ordered {
            if let Some(head) = self.ordered_head(wi) {
                if let Some(hq) = self.items.get_mut().get(&head).map(Item::qid) {
                    self.make_ready(hq, 1, fx);
                }
            }
        }
        let q = self.queues[qid].get_mut();
        if q.pending == 0 && q.running == 0 && q.delayed == 0 {
            q.idle_since = Some(now);
        }
        if self.shutdown {
            fx.idle_kick = true;
        }
    }

    /// A bound item goes back to the front of its queue (a hand-back, or a lost worker's item
    /// with `on_worker_lost = requeue`), key restored if free; then, if its deadline passed
    /// while it was bound (its timer fired and was ignored), it expires; if its queue has no
    /// eligible CPU and the fallback is `reject`, or no attached worker serves it and the
    /// workqueue rejects unserved items, it is rejected; otherwise its deadline timer is armed
    /// again and the queue made ready.
    fn requeue(&mut self, id: ItemId, now: Instant, fx: &mut Effects) {
        let Some(item) = self.items.get_mut().get_mut(&id) else {
            return;
        };
        let (qid, wi) = (item.qid(), item.wi());
        item.state = State::Pending;
        // Its claim ended in `finish` (perhaps without this look-up, see `Sched::unbind`).
        item.bound = NOT_BOUND;
        let key = item.key.clone();
        let deadline = item.deadline();
        self.queues[qid].get_mut().items.push_front(id);
        self.queues[qid].get_mut().pending += 1;
        let wq = self.wqs[wi].get_mut();
        wq.pending += 1;
        if wq.attrs.ordered {
            wq.ordered.push_front(id);
        }
        if let Some(k) = key {
            wq.keys.entry(k).or_insert(id);
        }
        let reject = if self.queues[qid].get_mut().eligible.is_empty()
            && self.wqs[wi].get_mut().attrs.fallback == Fallback::Reject
        {
            Some(self.queues[qid].get_mut().reason.clone())
        } else {
            self.unserved(qid)
        };
        match deadline {
            Some(d) if d <= now => {
                self.end_unstarted(id, State::Expired, EXPIRED_UNSTARTED.into(), now, fx)
            }
            // Its queue lost every CPU (or its last worker) meanwhile: the policy applies to
            // it as to the queue's other pending items.
            _ if reject.is_some() => {
                let reason = reject.unwrap_or_default();
                self.end_unstarted(id, State::Rejected, reason, now, fx);
            }
            Some(d) => {
                self.timers.push(Reverse((d, TIMER_DEADLINE, id)));
                fx.timer_kick = true;
                self.make_ready(qid, 1, fx);
            }
            None => self.make_ready(qid, 1, fx),
        }
    }

    /// The reason a hand-back is counted under: a worker that found its CPU not live (or
    /// itself moved off it) says [`NOT_LIVE`] or `affinity`, and the current snapshot tells
    /// why the CPU left: `offline`, `cpuset` (out of the process's cpuset or affinity) or
    /// `isolated`. Other reasons (`stall`) pass through.
    fn handback_reason(&self, why: &'static str, cpu: u32) -> &'static str {
        if why != NOT_LIVE && why != "affinity" {
            return why;
        }
        let t = &self.snapshot.topology;
        if !t.online.contains(cpu) {
            "offline"
        } else if !t.allowed.contains(cpu) {
            "cpuset"
        } else if t.isolated.contains(cpu) && !self.live.contains(cpu) {
            "isolated"
        } else if why == "affinity" {
            "affinity"
        } else {
            // Not live when the worker checked, live again now: it went and came back.
            "offline"
        }
    }

    /// [`Sched::terminal`] for an item whose attached worker was lost holding it: no output,
    /// no finish CPU (the worker never answered).
    fn end_lost(
        &mut self,
        id: ItemId,
        state: State,
        error: String,
        started: Option<Started>,
        now: Instant,
        fx: &mut Effects,
    ) {
        self.terminal(id, state, Vec::new(), error, started, None, now, fx);
    }

    /// [`Sched::terminal`] for an item that never started: no output, no start or finish CPU.
    pub(super) fn end_unstarted(
        &mut self,
        id: ItemId,
        state: State,
        reason: String,
        now: Instant,
        fx: &mut Effects,
    ) {
        self.terminal(id, state, Vec::new(), reason, None, None, now, fx);
    }

    /// The one way out: makes a live item terminal, notifies its flushes, stores its result.
    #[allow(clippy::too_many_arguments)]
    fn terminal(
        &mut self,
        id: ItemId,
        state: State,
        output: Vec<u8>,
        error: String,
        started: Option<Started>,
        finished: Option<(u32, SystemTime)>,
        now: Instant,
        fx: &mut Effects,
    ) {
        debug_assert!(state.is_terminal());
        let Some(item) = self.items.get_mut().remove(&id) else {
            return;
        };
        // Its timers (a delay's, a deadline's) are garbage from now on.
        self.stale_timers +=
            usize::from(item.state == State::Delayed) + usize::from(item.deadline().is_some());
        self.totals.get_mut()[state.index()] += 1;
        self.uncount_waiting(&item);
        let wi = item.wi();
        let ctx = EndCtx {
            epoch: self.epoch,
            max_result_bytes: self.max_result_bytes,
            observed: self.observed,
            holding: self.holding,
        };
        let mode = ended(
            &ctx,
            End {
                id,
                item,
                state,
                output,
                error,
                started,
                finished,
            },
            Tables {
                wq: self.wqs[wi].get_mut(),
                flushes: self.flushes.get_mut(),
                batches: self.batches.get_mut(),
                held_flushes: &mut self.held_flushes,
                fin: &mut self.fin,
            },
            fx,
        );
        // In a worker's finish batch the result is stored after L (see `finish_all`).
        if !self.holding && mode == ResultsMode::Full {
            self.results.lock().insert(&mut self.fin.results, now);
        }
        if self.shutdown {
            fx.idle_kick = true;
        }
        self.collect_timer_garbage();
    }

    /// Takes an item that left `items` out of its workqueue's and queue's delayed or pending
    /// count (a running item is counted out by `finish`).
    pub(super) fn uncount_waiting(&mut self, item: &Item) {
        let (qid, wq) = (item.qid(), self.wqs[item.wi()].get_mut());
        match item.state {
            State::Delayed => {
                wq.delayed -= 1;
                self.queues[qid].get_mut().delayed -= 1;
            }
            State::Pending => {
                wq.pending -= 1;
                self.queues[qid].get_mut().pending -= 1;
            }
            _ => {}
        }
    }
}

/// The terminal state, output and error of a job whose handler returned `res` (both finish
/// paths).
#[inline(always)]
pub(super) fn ran(res: Result<Vec<u8>, HandlerError>) -> (State, Vec<u8>, String) {
    match res {
        Ok(out) => (State::Ok, out, String::new()),
        Err(HandlerError::Cancelled) => (
            State::Cancelled,
            Vec::new(),
            "cancelled while running".into(),
        ),
        Err(e) => (State::Failed, Vec::new(), e.to_string()),
    }
}

/// [`record`] for a job whose handler returned (`None` for any other outcome: the shared
/// finish, its caller, checks that every job of its batch ran).
#[inline(always)]
pub(super) fn end_ran(
    ctx: &EndCtx,
    mode: ResultsMode,
    name: &Option<Arc<str>>,
    f: Finish,
    item: Item,
    fin: &mut Finished,
    fx: &mut Effects,
) -> Option<Notice> {
    let Outcome::Ran(res) = f.outcome else {
        return None;
    };
    let (state, output, error) = ran(res);
    let end = End {
        id: f.id,
        item,
        state,
        output,
        error,
        started: f.started,
        finished: f.finished,
    };
    Some(record(ctx, mode, name.clone(), end, fin, fx))
}

/// What [`ended`] reads of the scheduler.
pub(super) struct EndCtx {
    pub(super) epoch: u64,
    pub(super) max_result_bytes: usize,
    pub(super) observed: bool,
    /// In a worker's finish batch: flush events are held in their records and listed in
    /// `Tables::held_flushes`, sent with the batch (see [`Sched::finish_all`]).
    pub(super) holding: bool,
}

/// An item that left `items`, and how it ended.
pub(super) struct End {
    pub(super) id: ItemId,
    pub(super) item: Item,
    pub(super) state: State,
    pub(super) output: Vec<u8>,
    pub(super) error: String,
    pub(super) started: Option<Started>,
    pub(super) finished: Option<(u32, SystemTime)>,
}

/// What [`ended`] changes: the item's workqueue, the flushes, the batches, the finish batch's
/// list of flushes holding events and its results and sends. Exclusive L lends them from
/// the scheduler's own fields; a hot path under shared L from the guards of their locks.
pub(super) struct Tables<'a> {
    pub(super) wq: &'a mut Wq,
    pub(super) flushes: &'a mut IdMap<u64, FlushRec>,
    pub(super) batches: &'a mut IdMap<u64, BatchRec>,
    pub(super) held_flushes: &'a mut Vec<u64>,
    pub(super) fin: &'a mut Finished,
}

/// The part of `terminal` after the item left `items` and was counted out of its state: the
/// workqueue's tallies, key and drain mark, then [`record`] and [`notify`]. Returns the
/// workqueue's results mode.
#[inline(always)]
pub(super) fn ended(ctx: &EndCtx, e: End, t: Tables<'_>, fx: &mut Effects) -> ResultsMode {
    let (id, state) = (e.id, e.state);
    t.wq.totals[state.index()] += 1;
    if let Some(k) = &e.item.key {
        if t.wq.keys.get(k) == Some(&id) {
            t.wq.keys.remove(k);
        }
    }
    if t.wq.draining && t.wq.live() == 0 {
        t.wq.draining = false;
    }
    let mode = t.wq.attrs.results;
    let name = ctx.observed.then(|| t.wq.name.clone());
    let n = record(ctx, mode, name, e, t.fin, fx);
    notify(ctx, n, t.flushes, t.batches, t.held_flushes, t.fin);
    mode
}

impl Notice {
    pub(super) fn state(&self) -> State {
        self.state
    }
}

/// What [`notify`] needs of an item [`record`] ended.
pub(super) struct Notice {
    id: ItemId,
    state: State,
    batch: u64,
    /// The flushes covering it: `Item::waiter` and the cold ones.
    first: Option<u64>,
    waiters: Vec<u64>,
    /// Its full result's place in the finish batch's list.
    stored: Option<usize>,
}

/// Makes an ended item's result (results `full`: pushed to `fin`'s list, which the caller
/// stores) and the observer's event (`name`, the workqueue's, only when observed); touches
/// no shared table.
#[inline(always)]
pub(super) fn record(
    ctx: &EndCtx,
    mode: ResultsMode,
    name: Option<Arc<str>>,
    e: End,
    fin: &mut Finished,
    fx: &mut Effects,
) -> Notice {
    let End {
        id,
        item,
        state,
        output,
        error,
        started,
        finished,
    } = e;
    // Only the observer names the workqueue and handler here (an `Arc` count per item
    // otherwise); a full result names them through the body it moves to the store.
    let names = name.map(|w| (w, item.body.handler_name().clone()));
    let batch = item.batch;
    let (cold_waiters, item_reason, decided, worker, lost) = match item.cold {
        Some(c) => (c.waiters, c.reason, c.decided, c.worker, c.lost),
        None => (Vec::new(), String::new(), 0, None, 0),
    };
    let first = (item.waiter != 0).then_some(item.waiter);
    // What the flushes, the observer and the store get: a full result, or (results =
    // summary | none) only the state, and the run time for summary.
    // Made straight into the finish batch's list (one move of the record, not three);
    // stored from there after L, or below when not in a finish batch.
    if mode == ResultsMode::Full {
        let (reason, decided) = if item_reason.is_empty() && state == State::Rejected {
            (error.clone(), ctx.epoch)
        } else {
            (item_reason, decided)
        };
        // A result's texts are bounded (limits.max_result_bytes): cut, saying so.
        let mut error = crate::quote::cap(error, ctx.max_result_bytes);
        let produced = output.len();
        let output = cut_output(output, ctx.max_result_bytes);
        if output.len() < produced && error.is_empty() {
            error = format!(
                "output cut from {produced} to {} bytes (limits.max_result_bytes)",
                output.len()
            );
        }
        // Most results have none of these: no box then.
        let plain = output.is_empty()
            && error.is_empty()
            && reason.is_empty()
            && decided == 0
            && worker.is_none()
            && lost == 0;
        fin.results.push(Stored {
            id,
            batch: item.batch,
            // Moved, not counted: the store interns the names and drops the body.
            names: Names::Body(item.body),
            queued_at: item.queued_at,
            started,
            finished_at: finished.map_or_else(SystemTime::now, |f| f.1),
            cpu_finished: finished.map(|f| f.0),
            rebinds: item.rebinds,
            state,
            fallback: item.fallback,
            extra: (!plain).then(|| {
                Box::new(StoredExtra {
                    output,
                    error,
                    reason,
                    epoch_decided: (decided != 0).then_some(decided),
                    worker,
                    worker_lost: lost,
                })
            }),
        });
    }
    let result = if mode == ResultsMode::Full {
        fin.results.last()
    } else {
        None
    };
    // Only the observer reads the run time (two clock conversions per item otherwise).
    let run_time = match (&result, mode, &started) {
        _ if !ctx.observed => None,
        (Some(r), _, _) => r.run_time(),
        (None, ResultsMode::Summary, Some(s)) => {
            finished.and_then(|(_, at)| at.duration_since(s.at).ok())
        }
        _ => None,
    };
    let notice = Notice {
        id,
        state,
        batch,
        first,
        waiters: cold_waiters,
        stored: result.is_some().then(|| fin.results.len() - 1),
    };
    if let Some((workqueue, handler)) = names {
        fx.finished.push(Ended {
            id,
            workqueue,
            handler,
            state,
            run_time,
            remote: worker.is_some(),
        });
    }
    notice
}

/// Tells the flushes covering an ended item (events held in their records while
/// `ctx.holding`, listed in `held_flushes`; see [`send_held`]) and counts it out of its
/// batch. Its full result, if any, is in `fin`'s list ([`record`]).
#[inline(always)]
pub(super) fn notify(
    ctx: &EndCtx,
    n: Notice,
    flushes: &mut IdMap<u64, FlushRec>,
    batches: &mut IdMap<u64, BatchRec>,
    held_flushes: &mut Vec<u64>,
    fin: &mut Finished,
) {
    let Notice {
        id,
        state,
        batch,
        first,
        waiters,
        stored,
    } = n;
    let Finished {
        results,
        sends,
        woke,
        ..
    } = fin;
    let result = stored.and_then(|i| results.get(i));
    // The result as the API gives it, made once for the flushes that take events.
    let mut given: Option<Arc<ItemResult>> = None;
    for fid in first.into_iter().chain(waiters) {
        if let Some(f) = flushes.get_mut(&fid) {
            // A flush that delivers at the end keeps a copy of the record (one count on
            // the body): its receiver makes the `ItemResult`, off L.
            let kept_record = match (&f.tally, &result, f.kept.as_mut()) {
                (None, Some(r), Some(kept)) => {
                    kept.records.push(r.unstored_copy());
                    true
                }
                _ => false,
            };
            let ev = match (&f.tally, &result) {
                _ if kept_record => None,
                // In a finish batch, counted under L and added to the tally once when
                // the batch ends (`send_held_events`) or the flush's last item ends.
                (Some(_), _) if ctx.holding => {
                    f.held_counts[state.index()] += 1;
                    if !f.listed {
                        f.listed = true;
                        held_flushes.push(fid);
                    }
                    None
                }
                (Some(tally), _) => {
                    tally.lock().by_state[state.index()] += 1;
                    None
                }
                (None, Some(r)) => Some(FlushEvent::Done(
                    given
                        .get_or_insert_with(|| Arc::new(r.to_result(None)))
                        .clone(),
                )),
                (None, None) => Some(FlushEvent::Ended(id, state)),
            };
            // A flush that delivers at the end keeps the event until its last item.
            let ev = match (ev, f.kept.as_mut()) {
                (Some(ev), Some(kept)) => {
                    kept.events.push(ev);
                    None
                }
                (ev, _) => ev,
            };
            match ev {
                Some(ev) if ctx.holding => {
                    if !f.listed {
                        f.listed = true;
                        held_flushes.push(fid);
                    }
                    f.held.push(ev);
                }
                Some(ev) => {
                    let _ = f.tx.send(FlushMsg::One(ev));
                }
                None => {}
            }
            f.remaining -= 1;
            if f.remaining > 0 {
                // An at-end flush hands over what it kept every `KEPT_CHUNK` entries, so
                // that its waiter works on them (the daemon encodes them) while the rest
                // run; the last part goes with the last item, below.
                if let Some(kept) = f.kept.as_mut().filter(|k| k.len() >= KEPT_CHUNK) {
                    let msg = FlushMsg::Kept(std::mem::take(kept));
                    if ctx.holding {
                        sends.push((f.tx.clone(), Some(msg)));
                    } else {
                        let _ = f.tx.send(msg);
                    }
                }
            } else {
                // Its last item: the record goes, and with its sender the channel closes
                // once what it holds is sent (after L, in a worker's finish batch).
                // A flush that delivers at the end sends what it kept now (`held` is
                // empty then: its events go to `kept`).
                if let Some(mut rec) = flushes.remove(&fid) {
                    rec.add_held_counts();
                    *woke |= ctx.holding && !rec.waiter_spins();
                    let msg = match rec.kept {
                        Some(k) => (!k.is_empty()).then_some(FlushMsg::Kept(k)),
                        None => (!rec.held.is_empty()).then_some(FlushMsg::Many(rec.held)),
                    };
                    if ctx.holding {
                        sends.push((rec.tx, msg));
                    } else if let Some(msg) = msg {
                        let _ = rec.tx.send(msg);
                    }
                }
            }
        }
    }
    if let Some(b) = batches.get_mut(&batch) {
        b.live = b.live.saturating_sub(1);
        b.ended[state.index()] += 1;
        b.recorded += u32::from(stored.is_some());
        if b.live == 0 {
            // The batch's flushes registered on its record: counts in, then the channel
            // closes (after L when in a finish batch, as a record's last message).
            for w in b.waiters.drain(..) {
                {
                    let mut t = w.tally.lock();
                    for (n, e) in t.by_state.iter_mut().zip(b.ended) {
                        *n += e as usize;
                    }
                    *woke |= ctx.holding && !t.waiter_spins;
                }
                if ctx.holding {
                    sends.push((w.tx, None));
                }
            }
        }
    }
}

/// Moves the events held in the records of the flushes `held` lists (a finish batch's) to
/// `fin`, each flush's with a clone of its sender, to be sent after L, and adds their held
/// counts to their tallies; empties `held`. Called in the same hold of the flushes as the
/// finish batch, so a record's held events and counts are empty whenever that hold ends.
pub(super) fn send_held(
    flushes: &mut IdMap<u64, FlushRec>,
    held: &mut Vec<u64>,
    fin: &mut Finished,
) {
    for fid in held.drain(..) {
        if let Some(f) = flushes.get_mut(&fid) {
            f.listed = false;
            f.add_held_counts();
            if !f.held.is_empty() {
                let evs = std::mem::take(&mut f.held);
                fin.sends.push((f.tx.clone(), Some(FlushMsg::Many(evs))));
            }
        }
    }
}
