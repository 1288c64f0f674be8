//! Take and bind: a worker of a live CPU (or an attached worker's slot) takes the next item
//! its CPU may start, pending → running, and may claim more of the same work in the same lock
//! hold ([`Sched::claim_more`], the batched take).
//!
//! Invariant (under L): every check that can end an attempt comes before the first change;
//! once an item is popped from its queue it is bound (or expired) in the same step, never
//! dropped, and it is bound only to a CPU live in the current epoch and eligible for its queue.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use crate::engine::{ResultsMode, State};
use crate::handler::{CancelToken, HandlerKind};

use super::finish::EXPIRED_UNSTARTED;
use super::item::{claim_of, claim_parts, Body, Bound, ItemId, Job, MAX_CLAIMS, NOT_BOUND};
use super::{Effects, Sched};

impl Sched {
    /// Takes the next item `cpu`'s worker may start, binding it to `cpu`.
    /// `token` is the worker's own cancel token, reset here for the item it binds; `now` is
    /// the worker's clock reading for this lock hold.
    ///
    /// Every check that can end the attempt comes before the first change: once an item is
    /// popped from its queue it is bound (or expired) in the same step, never dropped.
    pub(crate) fn take(
        &mut self,
        cpu: u32,
        token: &CancelToken,
        now: Instant,
        fx: &mut Effects,
    ) -> Option<Job> {
        self.take_from(cpu, None, token, now, fx)
    }

    /// [`take`](Self::take) for this process's workers (`serves` is `None`: queues on the
    /// pool's `ready` list) or for a slot of an attached worker serving the handler names
    /// `serves` (queues on `remote_ready` whose handler it serves; others are kept there).
    pub(crate) fn take_from(
        &mut self,
        cpu: u32,
        serves: Option<&[Arc<str>]>,
        token: &CancelToken,
        now: Instant,
        fx: &mut Effects,
    ) -> Option<Job> {
        let remote = serves.is_some();
        let mut budget = self
            .pools
            .get_mut(&cpu)
            .filter(|p| p.live && p.claims.len() < MAX_CLAIMS)?
            .ready_list(remote)
            .len();
        while budget > 0 {
            budget -= 1;
            let qid = self
                .pools
                .get_mut(&cpu)
                .and_then(|p| p.ready_list(remote).pop_front())?;
            if !self.queues.contains(qid) {
                continue;
            }
            if let Some(names) = serves {
                let theirs = self.queues[qid].get_mut().remote.as_ref();
                if !theirs.is_some_and(|h| names.contains(h)) {
                    if let Some(p) = self.pools.get_mut(&cpu) {
                        p.remote_ready.push_back(qid);
                    }
                    continue;
                }
            }
            self.clean_front(qid);
            if self.queues[qid].get_mut().pending == 0 || !self.may_take(qid, cpu) {
                self.queues[qid].get_mut().in_ready.remove(cpu);
                continue;
            }
            if !self.limits_allow(qid, cpu) {
                if let Some(p) = self.pools.get_mut(&cpu) {
                    p.ready_list(remote).push_back(qid);
                }
                continue;
            }
            // `clean_front` left a pending item of this queue at the front.
            let Some(&id) = self.queues[qid].get_mut().items.front() else {
                continue;
            };
            let Some((kind, expired)) = self
                .items
                .get_mut()
                .get(&id)
                .map(|it| (it.body.kind(), it.deadline().is_some_and(|d| d <= now)))
            else {
                continue;
            };
            // From here on the item leaves its queue and is bound or expired.
            self.queues[qid].get_mut().items.pop_front();
            let wi = self.queues[qid].get_mut().wq;
            if self.wqs[wi].get_mut().attrs.ordered {
                self.ordered_head(wi);
                self.wqs[wi].get_mut().ordered.pop_front();
            }
            // Requeue the queue for this pool while it has more.
            if self.queues[qid].get_mut().pending > 1 {
                if let Some(p) = self.pools.get_mut(&cpu) {
                    p.ready_list(remote).push_back(qid);
                }
            } else {
                self.queues[qid].get_mut().in_ready.remove(cpu);
            }
            if expired {
                self.end_unstarted(id, State::Expired, EXPIRED_UNSTARTED.into(), now, fx);
                budget += 1;
                continue;
            }
            let Some((body, queued_at, claim)) = self.bind(id, qid, cpu, token, now, true, None)
            else {
                continue;
            };
            let wq = self.wqs[wi].get_mut();
            let slot = wq.running_on.entry(cpu).or_insert([0, 0]);
            slot[usize::from(kind == HandlerKind::Waits)] += 1;
            let nice = wq.attrs.nice;
            if let Some(pool) = self.pools.get_mut(&cpu) {
                pool.running += 1;
                pool.last_progress = now;
                pool.lockup_reported = false;
            }
            if !remote {
                self.pass_on(cpu, fx);
            }
            return Some(Job {
                id,
                claim,
                body,
                epoch: self.epoch,
                claimed: false,
                cpu,
                nice,
                queue: qid,
                workqueue: self.observed.then(|| self.wqs[wi].get_mut().name.clone()),
                queued_at,
                record: self.observed || self.wqs[wi].get_mut().attrs.results == ResultsMode::Full,
            });
        }
        None
    }

    /// The bind step shared by [`take`](Self::take) and [`claim_more`](Self::claim_more):
    /// pending item `id`, already popped from queue `qid`, becomes running on `cpu` under
    /// `token` (reset here), with the queue's fallback and reason and the fallback tally,
    /// then [`bind_in`].
    #[allow(clippy::too_many_arguments)]
    fn bind(
        &mut self,
        id: ItemId,
        qid: usize,
        cpu: u32,
        token: &CancelToken,
        now: Instant,
        slot: bool,
        shared: Option<&Arc<Body>>,
    ) -> Option<(Option<Arc<Body>>, SystemTime, u32)> {
        let q = self.queues[qid].get_mut();
        let (wi, fallback) = (q.wq, q.fallback);
        // The callers found this item pending under the same lock hold; were it gone, the id
        // they popped was a tombstone and nothing has changed yet.
        let item = self.items.get_mut().get_mut(&id)?;
        item.fallback = fallback;
        if let Some(l) = fallback {
            let c = item.cold();
            c.reason = q.reason.clone();
            c.decided = self.epoch;
            *self.fallbacks.entry(l.to_string()).or_default() += 1;
        }
        let at = Binding {
            id,
            qid,
            cpu,
            token,
            now,
            slot,
            shared,
        };
        let key = item.key.clone();
        let claims = &mut self.pools.get_mut(&cpu)?.claims;
        let out = bind_in(&at, item, q, claims);
        let wq = self.wqs[wi].get_mut();
        if let Some(k) = key {
            if wq.keys.get(&k) == Some(&id) {
                wq.keys.remove(&k);
            }
        }
        wq.pending -= 1;
        wq.running += 1;
        Some(out)
    }

    /// Right after `take` gave `first`, in the same lock hold: binds up to `tokens.len()` more
    /// items of the same queue to this worker, which will run them after `first`, one at a
    /// time, each after its own start check (see README, "Batched take").
    ///
    /// Only plain items doing the same work as `first` qualify (same body, or same handler and
    /// arguments): CPU-bound, no key (a key is released when its item is bound,
    /// and these wait a while bound), no deadline (checked only here), not of an ordered
    /// workqueue, within the queue's group cap. They count as running everywhere except in
    /// `Wq::running_on`, where they share `first`'s slot: the worker runs one at a time and
    /// releases the slot only when it reports them all, in its next lock hold.
    pub(crate) fn claim_more(
        &mut self,
        first: &Job,
        tokens: &[CancelToken],
        now: Instant,
        out: &mut Vec<Job>,
    ) {
        let (qid, cpu) = (first.queue, first.cpu);
        // The first job of a batch always has its own body (only the jobs claimed behind it
        // share one).
        let Some(first_body) = first.body.as_ref() else {
            return;
        };
        // What cannot change within this lock hold is checked once: the queue's existence,
        // its workqueue's `ordered`, its eligibility on `cpu` and the pool's liveness are
        // changed only by topology, update and housekeeping steps, each under L.
        if !self.queues.contains(qid)
            || self.wqs[self.queues[qid].get_mut().wq]
                .get_mut()
                .attrs
                .ordered
            || !self.may_take(qid, cpu)
            || !self.pools.get_mut(&cpu).is_some_and(|p| p.live)
        {
            return;
        }
        let wi = self.queues[qid].get_mut().wq;
        let cap = self.wqs[wi].get_mut().attrs.group_max_active as usize;
        let mut claimed = 0;
        'claim: for token in tokens {
            let q = self.queues[qid].get_mut();
            if q.pending == 0 || (cap > 0 && q.running >= cap) {
                break;
            }
            // One look-up per item: tombstones (ids no longer pending in this queue) are
            // dropped from the front, as `clean_front` does; the first pending item is
            // checked and bound.
            let (id, item) = loop {
                let Some(&id) = self.queues[qid].get_mut().items.front() else {
                    break 'claim;
                };
                match self.items.get_mut().get(&id) {
                    Some(it) if it.is_pending_in(qid) => break (id, it),
                    _ => {
                        self.queues[qid].get_mut().items.pop_front();
                    }
                }
            };
            if !joins_batch(item, first_body) {
                break;
            }
            self.queues[qid].get_mut().items.pop_front();
            let bound = self.bind(id, qid, cpu, token, now, false, Some(first_body));
            let Some((body, queued_at, claim)) = bound else {
                break;
            };
            claimed += 1;
            out.push(Job {
                id,
                claim,
                body,
                epoch: first.epoch,
                claimed: true,
                cpu,
                nice: first.nice,
                queue: qid,
                workqueue: None,
                queued_at,
                record: first.record,
            });
        }
        if claimed > 0 {
            if let Some(p) = self.pools.get_mut(&cpu) {
                p.running += claimed;
            }
        }
    }
}

impl Sched {
    /// The claim of bound item `id`, if it is bound.
    pub(super) fn bound(&mut self, id: ItemId) -> Option<&Bound> {
        self.bound_mut(id).map(|b| &*b)
    }

    /// [`bound`](Self::bound), to change the claim.
    pub(super) fn bound_mut(&mut self, id: ItemId) -> Option<&mut Bound> {
        let it = self.items.get_mut().get(&id)?;
        let (cpu, slot) = claim_parts(it.bound);
        self.pools
            .get_mut(&cpu)?
            .claims
            .get_mut(slot)
            .filter(|b| b.id == id)
    }

    /// Ends the claim of bound item `id` and returns it. `claim` is the slot its job was
    /// given ([`NOT_BOUND`] if not known): when it holds `id`'s claim, no look-up of the item
    /// is needed, and its `Item::bound` goes stale — the caller must end the item or, if it
    /// stays live, set it to [`NOT_BOUND`] (`requeue` does).
    pub(super) fn unbind(&mut self, id: ItemId, claim: u32) -> Option<Bound> {
        if claim != NOT_BOUND {
            let (cpu, slot) = claim_parts(claim);
            if let Some(p) = self.pools.get_mut(&cpu) {
                if p.claims.get(slot).is_some_and(|b| b.id == id) {
                    return p.claims.try_remove(slot);
                }
            }
        }
        let it = self.items.get_mut().get_mut(&id)?;
        let claim = std::mem::replace(&mut it.bound, NOT_BOUND);
        if claim == NOT_BOUND {
            return None;
        }
        let (cpu, slot) = claim_parts(claim);
        let b = self.pools.get_mut(&cpu)?.claims.try_remove(slot)?;
        debug_assert_eq!(b.id, id, "a claim names its item");
        Some(b)
    }
}

/// Whether pending `item` may be claimed behind a job of body `first` (`claim_more`, both
/// paths): plain (CPU-bound, no key — a key is released when its item is bound, and these
/// wait a while bound —, nothing cold: no deadline, no fallback) and the same work as
/// `first` (whose predecessor just returned quickly): a different handler or arguments may be
/// slow and would hold the rest of the batch behind it.
pub(super) fn joins_batch(item: &super::Item, first: &Arc<Body>) -> bool {
    let same_work = Arc::ptr_eq(&item.body, first)
        || (item.body.handler_name() == first.handler_name() && item.body.args() == first.args());
    item.body.kind() == HandlerKind::CpuBound
        && same_work
        && item.key.is_none()
        && item.cold.is_none()
}

/// Where and how [`bind_in`] binds an item.
pub(super) struct Binding<'a> {
    pub(super) id: ItemId,
    pub(super) qid: usize,
    pub(super) cpu: u32,
    pub(super) token: &'a CancelToken,
    pub(super) now: Instant,
    /// Whether its claim holds a `running_on` slot (the first job of a batch).
    pub(super) slot: bool,
    /// The body of the job it is claimed behind, if any.
    pub(super) shared: Option<&'a Arc<Body>>,
}

/// The bind step both paths share (exclusive L, or shared L with the queue's, items' and
/// claims' locks held): pending `item`, already popped from queue `q`, becomes running on
/// `at.cpu` under `at.token` (reset here): its claim in `running`, the queue's counters moved.
/// The caller moves the workqueue's counters and releases the key; the fallback is the
/// caller's too (the hot path binds only from queues without one). Returns its body (`None`
/// when it is the body of the job it is claimed behind), queue time and claim slot for the
/// [`Job`].
#[inline(always)]
pub(super) fn bind_in(
    at: &Binding<'_>,
    item: &mut super::Item,
    q: &mut super::Queue,
    claims: &mut slab::Slab<Bound>,
) -> (Option<Arc<Body>>, SystemTime, u32) {
    let id = at.id;
    item.state = State::Running;
    let body = match at.shared {
        Some(b) if Arc::ptr_eq(b, &item.body) => None,
        _ => Some(item.body.clone()),
    };
    let kind = item.body.kind();
    at.token.reset();
    let slot = claims.insert(Bound {
        id,
        cpu: at.cpu,
        queue: at.qid as u32,
        wq: q.wq as u32,
        kind,
        at: at.now,
        token: at.token.clone(),
        hog_reported: false,
        slot: at.slot,
        remote: None,
    });
    let claim = claim_of(at.cpu, slot);
    item.bound = claim;
    q.pending -= 1;
    q.running += 1;
    (body, item.queued_at, claim)
}
