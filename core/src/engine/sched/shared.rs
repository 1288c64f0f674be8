//! The worker's hot path under *shared* L: finish the last batch, enter, take the next one
//! (with the batched take), or park — the pieces it touches locked one by one, so two workers
//! of different CPUs taking from and finishing items of different queues run side by side.
//!
//! Invariant: a shared hold changes only what its locks guard — its own CPU's pool (P), the
//! queue it takes from or finishes in (Q), that queue's workqueue (W), the item table, the
//! claims, the flushes, the batches and the totals, always locked in that order — and it
//! does only what the exclusive path would do in the same state. Whatever else a step would
//! touch (an ordered workqueue, a group cap, a fallback, a deadline, a drain, a hand-back,
//! attached workers, shutdown) sends the worker to the exclusive path, *before* the step
//! changes anything; [`SharedHold::Exclusive`] says which steps are done. Every path that
//! is not a worker's hot path holds L exclusive, so it excludes every shared hold and sees
//! no lock held: a topology publication, a submit, a cancel or a flush registration is
//! entirely before or after each shared hold, as it was before or after each hold of L.

use std::sync::Arc;
use std::time::Instant;

use crate::engine::worker::Wake;
use crate::engine::ResultsMode;
use crate::groups::Ranking;
use crate::handler::{CancelToken, HandlerKind};

use super::finish::{end_ran, notify, send_held, EndCtx, Finished};
use super::item::{claim_parts, Finish, Job, Outcome, MAX_CLAIMS, NOT_BOUND};
use super::queue::{room, Pool};
use super::take::{bind_in, joins_batch, Binding};
use super::{Effects, Sched};

/// What a worker's shared hold did.
pub(crate) enum SharedHold {
    /// It took a job (and may have claimed more behind it).
    Took(Job),
    /// Nothing to take: the worker is on its pool's idle list, registered in the same hold
    /// of P in which it found nothing (README, race 3).
    Parked,
    /// The rest needs the exclusive hold. `arrived` is `Some(timed_out)` once the worker
    /// entered (its `arrive` is done and must not be repeated); the finish batch is done
    /// when `done` is empty.
    Exclusive { arrived: Option<bool> },
}

/// Who holds L shared: a worker of `cpu` in generation `gen`.
pub(crate) struct Holder<'a> {
    pub cpu: u32,
    pub gen: u64,
    pub wid: u64,
    /// First entry (it was started).
    pub fresh: bool,
    /// It registered idle in its previous hold.
    pub parked: bool,
    /// It has been idle for the engine's `worker_idle`: it may retire, which the exclusive
    /// path decides.
    pub idle_long: bool,
    /// The queue of the batch in `done` (every job of a batch is of one queue).
    pub queue: Option<usize>,
    pub wake: &'a Arc<Wake>,
}

impl Sched {
    /// A worker's whole hold under shared L (see the module docs); `done`, `now`, `quick`,
    /// `tokens`, `extra`, `fx` and `out` as in the exclusive hold.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn hold_shared(
        &self,
        w: &Holder<'_>,
        done: &mut Vec<Finish>,
        now: Instant,
        quick: bool,
        tokens: &[CancelToken],
        extra: &mut Vec<Job>,
        fx: &mut Effects,
        out: &mut Finished,
    ) -> SharedHold {
        if self.shutdown {
            return SharedHold::Exclusive { arrived: None };
        }
        // P for the whole hold: between the finish and the take, another holder of P (a
        // worker of this CPU, or a submit making a queue ready) would see this worker neither
        // busy nor idle nor coming, and call or start another for the slot it is about to
        // take (the baton's rule, `Sched::pass_on`, counts idle and coming workers).
        let Some(mut p) = self.pools.get(&w.cpu) else {
            return SharedHold::Exclusive { arrived: None };
        };
        if !done.is_empty() && !self.finish_shared(&mut p, w.cpu, w.queue, done, now, fx, out) {
            return SharedHold::Exclusive { arrived: None };
        }
        let timed_out = p.arrive(w.gen, w.wid, w.fresh, w.parked);
        let arrived = Some(timed_out);
        if !(p.live && p.gen == w.gen) {
            return SharedHold::Exclusive { arrived };
        }
        match self.take_shared(&mut p, w.cpu, tokens, quick, now, fx, extra) {
            Taken::Job(job) => SharedHold::Took(job),
            Taken::Nothing if !(timed_out && w.idle_long) => {
                p.idle.push((w.wid, w.wake.clone()));
                SharedHold::Parked
            }
            Taken::Nothing | Taken::Bail => SharedHold::Exclusive { arrived },
        }
    }

    /// [`Sched::finish_all`] under shared L, for a batch of jobs of queue `queue` that all
    /// ran on `cpu` and returned: all of it, or (returning `false`) none of it.
    ///
    /// `p` is the caller's pool, locked for its whole hold. Each other shared table is held
    /// briefly, never across the per-item work: the items and their claims are taken out in
    /// one hold of the item table (full results made in it as each item leaves), the queue's
    /// counters move and its lock is released, other records are made (with only P held: the
    /// other CPU's worker takes from or finishes in the same queue meanwhile), the pool's
    /// counters move, the workqueue's in one hold, and the flushes and batches hear of them
    /// in one hold (their held events sent with it, as `finish_all` does; see `send_held`).
    #[allow(clippy::too_many_arguments)]
    fn finish_shared(
        &self,
        p: &mut Pool,
        cpu: u32,
        queue: Option<usize>,
        done: &mut Vec<Finish>,
        now: Instant,
        fx: &mut Effects,
        out: &mut Finished,
    ) -> bool {
        let Some(qid) = queue else {
            return false;
        };
        let Some(qm) = self.queues.get(qid) else {
            return false;
        };
        // A freed slot is offered to attached workers' slots waiting on this pool.
        if !p.remote_ready.is_empty() {
            return false;
        }
        let mut q = qm.lock_spinning();
        let Some(wm) = self.wqs.get(q.wq) else {
            return false;
        };
        let (mode, name) = {
            let wq = wm.lock();
            // Ordered: the next head is made ready; a group cap: the queue may be made
            // ready; draining: the drain mark may be cleared (all under exclusive L).
            if wq.attrs.ordered || wq.attrs.group_max_active > 0 || wq.draining {
                return false;
            }
            (wq.attrs.results, self.observed.then(|| wq.name.clone()))
        };
        let ctx = EndCtx {
            epoch: self.epoch,
            max_result_bytes: self.max_result_bytes,
            observed: self.observed,
            holding: true,
        };
        out.set_now(now);
        let mut notices = std::mem::take(&mut out.notices);
        let mut later = std::mem::take(&mut out.ending);
        let n = done.len();
        let freed = {
            let mut items = self.items.lock_spinning();
            // Every check before the first change.
            for f in done.iter() {
                if !matches!(f.outcome, Outcome::Ran(_)) {
                    return false;
                }
                let (on, slot) = claim_parts(f.claim);
                let bound = (f.claim != NOT_BOUND && on == cpu)
                    .then(|| p.claims.get(slot))
                    .flatten()
                    .filter(|b| b.id == f.id);
                if !bound
                    .is_some_and(|b| b.queue as usize == qid && b.cpu == cpu && b.remote.is_none())
                {
                    return false;
                }
                // A deadline leaves a timer behind, which only exclusive L collects. (A
                // running item holds no key: it is released when the item is bound.)
                if items.get(&f.id).is_none_or(|it| it.deadline().is_some()) {
                    return false;
                }
            }
            // Last to first, as `finish_all`; the claim's bound and the item were checked
            // above, so both are there. A full result is made as its item leaves the table:
            // its body moves to the result, and a pass of its own would move the item twice
            // more. Any other record drops the body, counts on names the other CPUs' workers
            // share, so those are made after the table's lock.
            let mut freed = [0u32; 2];
            let mut unclaim = |f: &Finish| {
                if let Some(b) = p.claims.try_remove(claim_parts(f.claim).1) {
                    if b.slot {
                        freed[usize::from(b.kind == HandlerKind::Waits)] += 1;
                    }
                }
            };
            if mode == ResultsMode::Full {
                for f in done.drain(..).rev() {
                    unclaim(&f);
                    if let Some(item) = items.remove(&f.id) {
                        notices.extend(end_ran(&ctx, mode, &name, f, item, out, fx));
                    }
                }
            } else {
                for f in done.iter().rev() {
                    unclaim(f);
                    later.extend(items.remove(&f.id));
                }
            }
            freed
        };
        q.running -= n;
        if q.pending == 0 && q.running == 0 && q.delayed == 0 {
            q.idle_since = Some(now);
        }
        drop(q);
        for (f, item) in done.drain(..).rev().zip(later.drain(..)) {
            notices.extend(end_ran(&ctx, mode, &name, f, item, out, fx));
        }
        out.ending = later;
        let mut by_state = [0u64; 8];
        for n in &notices {
            by_state[n.state().index()] += 1;
        }
        p.running -= n;
        p.last_progress = now;
        p.lockup_reported = false;
        {
            let mut wq = wm.lock();
            wq.running -= n;
            if freed != [0, 0] {
                if let Some(slot) = wq.running_on.get_mut(&cpu) {
                    slot[0] -= freed[0];
                    slot[1] -= freed[1];
                }
            }
            for (t, add) in wq.totals.iter_mut().zip(by_state) {
                *t += add;
            }
        }
        {
            let mut flushes = self.flushes.lock();
            let mut batches = self.batches.lock();
            let mut held = std::mem::take(&mut out.held);
            for n in notices.drain(..) {
                notify(&ctx, n, &mut flushes, &mut batches, &mut held, out);
            }
            send_held(&mut flushes, &mut held, out);
            out.held = held;
        }
        out.notices = notices;
        let mut t = self.totals.lock();
        for (n, add) in t.iter_mut().zip(by_state) {
            *n += add;
        }
        true
    }

    /// [`Sched::take`] and [`Sched::claim_more`] under shared L, with the worker's pool `p`
    /// locked (the caller's hold of P): the same scan of the ready list, the same checks, the
    /// same binds. The workqueue is read in one short hold and its counters moved in another:
    /// `running_on` of this CPU changes only under this CPU's P, held throughout.
    #[allow(clippy::too_many_arguments)]
    fn take_shared(
        &self,
        p: &mut Pool,
        cpu: u32,
        tokens: &[CancelToken],
        quick: bool,
        now: Instant,
        fx: &mut Effects,
        extra: &mut Vec<Job>,
    ) -> Taken {
        let mut budget = if p.claims.len() < MAX_CLAIMS {
            p.ready.len()
        } else {
            0
        };
        while budget > 0 {
            budget -= 1;
            let Some(qid) = p.ready.pop_front() else {
                break;
            };
            let Some(qm) = self.queues.get(qid) else {
                continue;
            };
            let mut q = qm.lock_spinning();
            let wm = match self.wqs.get(q.wq) {
                Some(wm) if q.remote.is_none() => wm,
                _ => {
                    p.ready.push_front(qid);
                    return Taken::Bail;
                }
            };
            let (a, [cb, wt], name) = {
                let wq = wm.lock();
                if wq.attrs.ordered {
                    p.ready.push_front(qid);
                    return Taken::Bail;
                }
                let a = &wq.attrs;
                let limits = Limits {
                    placement: a.placement,
                    slots: wq.slots(),
                    group: a.group_max_active as usize,
                    nice: a.nice,
                    full: a.results == ResultsMode::Full,
                };
                let on = wq.running_on.get(&cpu).copied().unwrap_or([0, 0]);
                (limits, on, self.observed.then(|| wq.name.clone()))
            };
            let mut items = self.items.lock_spinning();
            let front = front_pending(&mut q, &items, qid);
            if q.pending == 0 || !Ranking::admits(a.placement, &q.eligible, cpu) {
                q.in_ready.remove(cpu);
                continue;
            }
            let Some(id) = front else {
                continue;
            };
            let Some(head) = items.get_mut(&id) else {
                continue;
            };
            let kind = head.body.kind();
            // `head_room` (not ordered).
            if room(a.slots, [cb, wt], q.running, kind) == 0 {
                p.ready.push_back(qid);
                continue;
            }
            // A fallback is tallied, a key released and an expired item ended under
            // exclusive L.
            if q.fallback.is_some()
                || head.key.is_some()
                || head.deadline().is_some_and(|d| d <= now)
            {
                p.ready.push_front(qid);
                return Taken::Bail;
            }
            // From here on the item leaves its queue and is bound.
            q.items.pop_front();
            if q.pending > 1 {
                p.ready.push_back(qid);
            } else {
                q.in_ready.remove(cpu);
            }
            let at = Binding {
                id,
                qid,
                cpu,
                token: &tokens[0],
                now,
                slot: true,
                shared: None,
            };
            let (body, queued_at, claim) = bind_in(&at, head, &mut q, &mut p.claims);
            let job = Job {
                id,
                claim,
                body,
                epoch: self.epoch,
                claimed: false,
                cpu,
                nice: a.nice,
                queue: qid,
                workqueue: name,
                queued_at,
                record: self.observed || a.full,
            };
            let mut claimed = 0;
            if let (true, Some(first_body)) = (quick, job.body.as_ref()) {
                for token in &tokens[1..] {
                    if q.pending == 0 || (a.group > 0 && q.running >= a.group) {
                        break;
                    }
                    // As `claim_more`: tombstones dropped, the first pending item checked.
                    let next = front_pending(&mut q, &items, qid);
                    let Some((id, item)) = next.and_then(|id| Some((id, items.get_mut(&id)?)))
                    else {
                        break;
                    };
                    if !joins_batch(item, first_body) {
                        break;
                    }
                    q.items.pop_front();
                    let at = Binding {
                        id,
                        qid,
                        cpu,
                        token,
                        now,
                        slot: false,
                        shared: Some(first_body),
                    };
                    let (body, queued_at, claim) = bind_in(&at, item, &mut q, &mut p.claims);
                    claimed += 1;
                    extra.push(Job {
                        id,
                        claim,
                        body,
                        epoch: job.epoch,
                        claimed: true,
                        cpu,
                        nice: a.nice,
                        queue: qid,
                        workqueue: None,
                        queued_at,
                        record: job.record,
                    });
                }
            }
            // Whether the queue's next head could start here too (see `pass_on`), asked only
            // when an idle worker might otherwise sleep beside it.
            let more_here = p.coming == 0
                && !p.idle.is_empty()
                && q.pending > 0
                && head_kind(&mut q, &items, qid).is_some_and(|next| {
                    let mut on = [cb, wt];
                    on[usize::from(kind == HandlerKind::Waits)] += 1;
                    room(a.slots, on, q.running, next) > 0
                });
            drop((items, q));
            {
                let mut wq = wm.lock();
                wq.pending -= 1 + claimed;
                wq.running += 1 + claimed;
                let slot = wq.running_on.entry(cpu).or_insert([0, 0]);
                slot[usize::from(kind == HandlerKind::Waits)] += 1;
            }
            p.running += 1 + claimed;
            p.last_progress = now;
            p.lockup_reported = false;
            // `Sched::pass_on` under shared L.
            if p.coming == 0
                && !p.ready.is_empty()
                && (p.idle.is_empty() || more_here || self.others_startable(p, cpu, qid))
            {
                p.call_worker(cpu, self.epoch, self.max_workers, fx);
            }
            return Taken::Job(job);
        }
        Taken::Nothing
    }
}

impl Sched {
    /// [`Sched::pass_on`]'s look at the ready list under shared L: whether a queue on `p`'s
    /// list other than `skip` has a head that could start on `cpu` now. Locks each queue's
    /// Q, its workqueue and the item table in turn (P → Q → workqueue → items); an ordered
    /// workqueue counts as startable (a wake-up too many, never one too few).
    fn others_startable(&self, p: &Pool, cpu: u32, skip: usize) -> bool {
        p.ready.iter().filter(|&&q| q != skip).any(|&qid| {
            let Some(qm) = self.queues.get(qid) else {
                return false;
            };
            let mut q = qm.lock();
            if q.pending == 0 || q.remote.is_some() {
                return false;
            }
            let Some(wm) = self.wqs.get(q.wq) else {
                return false;
            };
            let wq = wm.lock();
            if wq.attrs.ordered {
                return true;
            }
            if !Ranking::admits(wq.attrs.placement, &q.eligible, cpu) {
                return false;
            }
            let on = wq.running_on.get(&cpu).copied().unwrap_or([0, 0]);
            let items = self.items.lock();
            head_kind(&mut q, &items, qid)
                .is_some_and(|kind| room(wq.slots(), on, q.running, kind) > 0)
        })
    }
}

/// Queue `qid`'s first pending item, the tombstones before it dropped (`Sched::clean_front`
/// under shared L: the caller holds the queue's Q and the item table).
fn front_pending(
    q: &mut super::queue::Queue,
    items: &super::Items,
    qid: usize,
) -> Option<super::ItemId> {
    while let Some(&id) = q.items.front() {
        if items.get(&id).is_some_and(|it| it.is_pending_in(qid)) {
            return Some(id);
        }
        q.items.pop_front();
    }
    None
}

/// The kind of queue `qid`'s first pending item ([`front_pending`]).
fn head_kind(q: &mut super::queue::Queue, items: &super::Items, qid: usize) -> Option<HandlerKind> {
    let id = front_pending(q, items, qid)?;
    items.get(&id).map(|it| it.body.kind())
}

/// What a take reads of its workqueue's attributes, copied in one short hold.
struct Limits {
    placement: crate::groups::Placement,
    /// As [`room`] takes them.
    slots: [u32; 3],
    group: usize,
    nice: i32,
    full: bool,
}

/// What [`Sched::take_shared`] found.
enum Taken {
    Job(Job),
    Nothing,
    /// The exclusive path must take (nothing changed but tombstones dropped).
    Bail,
}
