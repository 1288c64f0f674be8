//! Queues and pools, and placement: a [`Queue`] holds the pending items of one (workqueue,
//! target[, attached-worker handler]) in FIFO order with the CPUs eligible to take them; a
//! [`Pool`] is one CPU's workers with its `ready` lists. This file resolves a queue's eligible
//! CPUs (with the workqueue's fallback), ranks takers (`groups::Ranking`, the one placement
//! rule), checks a workqueue's limits for a CPU, makes queues ready and wakes takers, and
//! enqueues items.
//!
//! Invariant (under L): a queue's `eligible` set is recomputed on every topology change and
//! workqueue update, so only a CPU live in the current epoch may take from it; `in_ready` marks
//! the pools whose ready list holds the queue, so it is put there once per pool (the lists may
//! also hold stale entries, which `take` drops); and a wake-up goes only to a CPU whose limits
//! let it start the head now (README, race 4).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::engine::lock::{Mutex, MutexGuard};

use crate::cpuset::CpuSet;
use crate::engine::State;
use crate::groups::{Fallback, Level, Placement, Ranking};
use crate::handler::HandlerKind;
use crate::target::Target;

use super::item::ItemId;
use super::{Effects, Sched};
use crate::engine::worker::Wake;

/// Items of one workqueue aimed at one target.
pub(super) struct Queue {
    pub(super) wq: usize,
    pub(super) target: Target,
    /// The handler name, for a queue of items attached workers serve (see `remote.rs`); such
    /// a queue is on pools' `remote_ready` lists, never on `ready`.
    pub(super) remote: Option<Arc<str>>,
    /// Pending item ids in FIFO order. May hold tombstones: ids no longer pending here.
    pub(super) items: VecDeque<ItemId>,
    pub(super) pending: usize,
    pub(super) delayed: usize,
    pub(super) running: usize,
    /// CPUs whose workers may take from this queue now.
    pub(super) eligible: CpuSet,
    pub(super) fallback: Option<Level>,
    pub(super) reason: String,
    /// Pools whose `ready` list holds this queue.
    pub(super) in_ready: CpuSet,
    pub(super) idle_since: Option<Instant>,
}

/// The pools, by CPU number: a dense vector (CPU numbers are below
/// [`crate::cpuset::MAX_CPUS`] and mostly contiguous), so finding a CPU's pool — on every
/// take, finish and wake-up — is an index, not a tree search. Iteration is in CPU order.
#[derive(Default)]
pub(super) struct Pools(Vec<Option<Mutex<Pool>>>);

impl Pools {
    /// CPU `cpu`'s pool, locked (its lock P; uncontended under exclusive L).
    #[inline]
    pub(super) fn get(&self, cpu: &u32) -> Option<MutexGuard<'_, Pool>> {
        Some(self.0.get(*cpu as usize)?.as_ref()?.lock())
    }

    #[inline]
    pub(super) fn get_mut(&mut self, cpu: &u32) -> Option<&mut Pool> {
        Some(self.0.get_mut(*cpu as usize)?.as_mut()?.get_mut())
    }

    /// CPU `cpu`'s pool, made by `make` if it has none. `cpu` is a CPU of the machine (below
    /// `MAX_CPUS`): the vector grows to it.
    pub(super) fn get_or_insert_with(
        &mut self,
        cpu: u32,
        make: impl FnOnce() -> Pool,
    ) -> &mut Pool {
        debug_assert!(cpu < crate::cpuset::MAX_CPUS, "cpu {cpu} out of range");
        let i = cpu as usize;
        if self.0.len() <= i {
            self.0.resize_with(i + 1, || None);
        }
        self.0[i]
            .get_or_insert_with(|| Mutex::new(make()))
            .get_mut()
    }

    pub(super) fn iter_mut(&mut self) -> impl Iterator<Item = (u32, &mut Pool)> + '_ {
        self.0
            .iter_mut()
            .enumerate()
            .filter_map(|(c, p)| Some((c as u32, p.as_mut()?.get_mut())))
    }

    pub(super) fn values_mut(&mut self) -> impl Iterator<Item = &mut Pool> + '_ {
        self.0.iter_mut().flatten().map(Mutex::get_mut)
    }
}

/// The workers of one CPU.
pub(super) struct Pool {
    pub(super) live: bool,
    /// Bumped each time the CPU becomes live; workers of older generations exit.
    pub(super) gen: u64,
    /// Workers of the current generation.
    pub(super) workers: usize,
    /// Workers of the current generation woken (or started) that have not entered L since:
    /// each will take from this pool's ready list. A wake-up is not repeated for a CPU whose
    /// coming workers already fill the slots free there (see [`Pool::call_worker`]).
    pub(super) coming: usize,
    pub(super) idle: Vec<(u64, Arc<Wake>)>,
    /// Queues with pending items this pool may take (may hold stale entries).
    pub(super) ready: VecDeque<usize>,
    /// The same for queues attached workers serve.
    pub(super) remote_ready: VecDeque<usize>,
    /// Attached workers' slots of this CPU waiting for work: (worker, slot).
    pub(super) idle_slots: Vec<(u64, u32)>,
    pub(super) running: usize,
    /// The claims of the items bound to this CPU (`Item::bound` encodes CPU and slot).
    pub(super) claims: slab::Slab<super::item::Bound>,
    pub(super) last_progress: Instant,
    pub(super) lockup_reported: bool,
    /// After a worker failed to pin: spawn no more until a newer epoch than this, or until
    /// the instant passes (a pinning can break without any topology change, e.g. `taskset`).
    pub(super) spawn_hold: Option<(u64, Instant)>,
}

/// How long a pool whose worker could not pin waits before trying again (unless the
/// topology changes first).
pub(super) const SPAWN_HOLD: Duration = Duration::from_secs(1);

impl Pool {
    pub(super) fn new(now: Instant) -> Pool {
        Pool {
            live: false,
            gen: 0,
            workers: 0,
            coming: 0,
            idle: Vec::new(),
            ready: VecDeque::new(),
            remote_ready: VecDeque::new(),
            idle_slots: Vec::new(),
            running: 0,
            claims: slab::Slab::new(),
            last_progress: now,
            lockup_reported: false,
            spawn_hold: None,
        }
    }
    pub(super) fn ready_list(&mut self, remote: bool) -> &mut VecDeque<usize> {
        if remote {
            &mut self.remote_ready
        } else {
            &mut self.ready
        }
    }
    pub(super) fn may_spawn(&self, epoch: u64) -> bool {
        self.spawn_hold
            .is_none_or(|(e, until)| epoch > e || Instant::now() >= until)
    }

    /// Wakes an idle worker of this pool, or starts one (below `max` workers, outside a
    /// spawn hold), and counts it as coming until it enters L ([`Sched::arrive`]). Returns
    /// whether one was called.
    pub(super) fn call_worker(
        &mut self,
        cpu: u32,
        epoch: u64,
        max: usize,
        fx: &mut Effects,
    ) -> bool {
        if let Some((_, u)) = self.idle.pop() {
            fx.unpark.push(u);
        } else if self.workers < max && self.may_spawn(epoch) {
            self.workers += 1;
            fx.spawn.push((cpu, self.gen));
        } else {
            return false;
        }
        self.coming += 1;
        true
    }
}

impl Sched {
    /// The queue of workqueue `wi` for `target` and, for an attached-worker handler, its name.
    pub(super) fn queue_for(
        &mut self,
        wi: usize,
        target: &Target,
        remote: Option<&Arc<str>>,
    ) -> usize {
        let found = match remote {
            None => self.wqs[wi].get_mut().queues.get(target),
            Some(h) => self.wqs[wi]
                .get_mut()
                .remote_queues
                .get(&(target.clone(), h.clone())),
        };
        if let Some(&q) = found {
            return q;
        }
        let qid = self.queues.insert(Mutex::new(Queue {
            wq: wi,
            target: target.clone(),
            remote: remote.cloned(),
            items: VecDeque::new(),
            pending: 0,
            delayed: 0,
            running: 0,
            eligible: CpuSet::new(),
            fallback: None,
            reason: String::new(),
            in_ready: CpuSet::new(),
            idle_since: None,
        }));
        match remote {
            None => self.wqs[wi].get_mut().queues.insert(target.clone(), qid),
            Some(h) => self.wqs[wi]
                .get_mut()
                .remote_queues
                .insert((target.clone(), h.clone()), qid),
        };
        let mut fx = Effects::default();
        self.resolve_queue(qid, &mut fx);
        qid
    }

    pub(super) fn remove_queue(&mut self, qid: usize) {
        let q = self.queues.remove(qid).into_inner();
        for c in q.in_ready.iter() {
            if let Some(p) = self.pools.get_mut(&c) {
                p.ready_list(q.remote.is_some()).retain(|&x| x != qid);
            }
        }
        match q.remote {
            None => self.wqs[q.wq].get_mut().queues.remove(&q.target),
            Some(h) => self.wqs[q.wq]
                .get_mut()
                .remote_queues
                .remove(&(q.target, h)),
        };
    }

    /// Re-resolves a queue's eligible CPUs against the current live set and applies the
    /// workqueue's fallback: `reject` rejects its pending items when no CPU is eligible.
    pub(super) fn resolve_queue(&mut self, qid: usize, fx: &mut Effects) {
        let q = self.queues[qid].get_mut();
        let wq = self.wqs[q.wq].get_mut();
        let policy = wq.attrs.fallback;
        let (eligible, fallback, reason) =
            match self.snapshot.groups.resolve(&q.target, &self.live, policy) {
                Ok(r) => {
                    let reason = match (r.fallback, r.eligible.is_empty()) {
                        (Some(l), _) => format!(
                            "no live CPU in {}; widened to {} (cpus {})",
                            q.target, l, r.eligible
                        ),
                        (None, true) => match policy {
                            Fallback::Wait => {
                                format!("no live CPU in {}; waiting for one to return", q.target)
                            }
                            _ => format!(
                                "no live CPU in {} and the workqueue's fallback is {policy}",
                                q.target
                            ),
                        },
                        (None, false) => String::new(),
                    };
                    (r.eligible, r.fallback, reason)
                }
                Err(e) => (CpuSet::new(), None, format!("{}: {e}", q.target)),
            };
        let q = self.queues[qid].get_mut();
        q.eligible = eligible;
        q.fallback = fallback;
        q.reason = reason;
        if q.eligible.is_empty() && policy == Fallback::Reject && q.pending > 0 {
            let ids: Vec<ItemId> = q.items.iter().copied().collect();
            let reason = q.reason.clone();
            for id in ids {
                if self.is_pending_in(id, qid) {
                    self.end_unstarted(id, State::Rejected, reason.clone(), Instant::now(), fx);
                }
            }
        }
        let n = self.queues[qid].get_mut().pending;
        self.make_ready(qid, n, fx);
    }

    pub(super) fn is_pending_in(&mut self, id: ItemId, qid: usize) -> bool {
        self.items
            .get_mut()
            .get(&id)
            .is_some_and(|it| it.is_pending_in(qid))
    }

    /// Drops tombstones from the front of a queue (and of its ordered workqueue's FIFO).
    pub(super) fn clean_front(&mut self, qid: usize) {
        while let Some(&id) = self.queues[qid].get_mut().items.front() {
            if self.is_pending_in(id, qid) {
                break;
            }
            self.queues[qid].get_mut().items.pop_front();
        }
    }

    pub(super) fn ordered_head(&mut self, wi: usize) -> Option<ItemId> {
        while let Some(&id) = self.wqs[wi].get_mut().ordered.front() {
            if self
                .items
                .get_mut()
                .get(&id)
                .is_some_and(|it| it.state == State::Pending)
            {
                return Some(id);
            }
            self.wqs[wi].get_mut().ordered.pop_front();
        }
        None
    }

    /// Ranks the CPUs that may take from a queue into `out`, in the order placement prefers
    /// them ([`Ranking`], the groups' one placement rule). The load of `least-loaded` is the
    /// items running on the CPU; `idle` puts the host's busy fraction first (×1000, so it
    /// decides unless equal) and the running items second. Allocates nothing once `out` has
    /// grown (this runs on every submit).
    /// `submitted`: a submit of one item (see [`local_first`]).
    fn takers(&mut self, qid: usize, out: &mut Ranking, submitted: bool) {
        let q = self.queues[qid].get_mut();
        let placement = self.wqs[q.wq].get_mut().attrs.placement;
        if placement == Placement::Spread && !q.eligible.is_empty() {
            *self.rr.get_mut() = self.rr.get_mut().wrapping_add(1);
        }
        let load = taker_load(&self.pools, &self.load, placement);
        out.rank(placement, &q.eligible, load, *self.rr.get_mut());
        if let Some(c) = local_first(&self.pools, placement, self.wake_local && submitted) {
            out.prefer(c);
        }
    }

    pub(super) fn may_take(&mut self, qid: usize, cpu: u32) -> bool {
        let q = self.queues[qid].get_mut();
        Ranking::admits(self.wqs[q.wq].get_mut().attrs.placement, &q.eligible, cpu)
    }

    /// Whether the queue's head may start on `cpu` now under the workqueue's limits.
    /// Call after `clean_front`.
    pub(super) fn limits_allow(&mut self, qid: usize, cpu: u32) -> bool {
        self.head_room(qid, cpu) > 0
    }

    /// How many items like the queue's head could start on `cpu` now under the workqueue's
    /// limits: the free `max_active` (or `max_waiting`) slots of the head's kind there, within
    /// the group cap; one at most for an ordered workqueue; 0 when the head cannot start.
    /// Call after `clean_front`.
    pub(super) fn head_room(&mut self, qid: usize, cpu: u32) -> usize {
        let Some(&head) = self.queues[qid].get_mut().items.front() else {
            return 0;
        };
        let wi = self.queues[qid].get_mut().wq;
        if self.wqs[wi].get_mut().attrs.ordered {
            return usize::from(
                self.wqs[wi].get_mut().running == 0 && self.ordered_head(wi) == Some(head),
            );
        }
        let Some(kind) = self.items.get_mut().get(&head).map(|i| i.body.kind()) else {
            return 0;
        };
        let running = self.queues[qid].get_mut().running;
        let wq = self.wqs[wi].get_mut();
        let on = wq.running_on.get(&cpu).copied().unwrap_or([0, 0]);
        room(wq.slots(), on, running, kind)
    }

    /// Puts a queue with pending items on the ready lists of the pools that may take from it
    /// and wakes (or spawns) up to `n` workers, in placement order.
    pub(super) fn make_ready(&mut self, qid: usize, n: usize, fx: &mut Effects) {
        self.make_ready_from(qid, n, false, fx);
    }

    /// [`make_ready`](Self::make_ready) for `n` items just submitted: one alone may go to
    /// the submitting thread's CPU first ([`local_first`]).
    pub(super) fn make_ready_submitted(&mut self, qid: usize, n: usize, fx: &mut Effects) {
        self.make_ready_from(qid, n, n == 1, fx);
    }

    fn make_ready_from(&mut self, qid: usize, n: usize, one_submitted: bool, fx: &mut Effects) {
        if self.queues[qid].get_mut().pending == 0 || self.shutdown {
            return;
        }
        // The buffers go back into `self.ranking` at the end; a nested `make_ready` (none
        // today) would only rank into fresh ones.
        let mut ranking = std::mem::take(&mut self.ranking);
        self.takers(qid, &mut ranking, one_submitted);
        self.wake_takers(qid, ranking.as_slice(), n, fx);
        self.ranking = ranking;
    }

    /// [`make_ready`](Self::make_ready) after ranking: `takers` in placement order.
    fn wake_takers(&mut self, qid: usize, takers: &[u32], n: usize, fx: &mut Effects) {
        let remote = self.queues[qid].get_mut().remote.clone();
        for &c in takers {
            if self.queues[qid].get_mut().in_ready.contains(c) {
                continue;
            }
            if let Some(p) = self.pools.get_mut(&c).filter(|p| p.live) {
                p.ready_list(remote.is_some()).push_back(qid);
                self.queues[qid].get_mut().in_ready.insert(c);
            }
        }
        self.clean_front(qid);
        if let Some(h) = remote {
            self.wake_slots(qid, &h, takers, n, fx);
            return;
        }
        let mut woken = 0;
        for &c in takers {
            if woken >= n {
                break;
            }
            if self.call_worker_for(qid, c, fx) {
                woken += 1;
            }
        }
    }

    /// Calls a worker of `cpu` (wakes or starts one) for the head of queue `qid`, if it is
    /// worth it: only a CPU whose limits let it start the head now (waking one that cannot
    /// would use up the wake-up and leave an idle CPU asleep), and whose coming workers (woken,
    /// not yet in L) do not already fill the slots free there: they will take from its ready
    /// list, which has this queue (README, race 4). Returns whether one was called.
    pub(super) fn call_worker_for(&mut self, qid: usize, cpu: u32, fx: &mut Effects) -> bool {
        let room = self.head_room(qid, cpu);
        let (epoch, max) = (self.epoch, self.max_workers);
        self.pools
            .get_mut(&cpu)
            .filter(|p| p.live && p.coming < room)
            .is_some_and(|p| p.call_worker(cpu, epoch, max, fx))
    }

    /// After a take on `cpu`: calls one more worker there (wakes an idle one, or starts one)
    /// when none is coming and the pool's ready list has more — always while no worker is
    /// idle (one in reserve), and while one is, if the head of a queue on the list could
    /// start there now. The baton of race 4: `call_worker_for` holds back the wake-up of a
    /// queue whose free slots the coming workers fill, but a coming worker takes one queue's
    /// job, and if that job runs long the other queues it was counted for would wait for it
    /// beside a sleeping idle worker. So each worker that takes hands the rest on.
    pub(super) fn pass_on(&mut self, cpu: u32, fx: &mut Effects) {
        let Some(p) = self.pools.get_mut(&cpu) else {
            return;
        };
        if p.coming > 0 || p.ready.is_empty() {
            return;
        }
        if !p.idle.is_empty() && !self.ready_startable(cpu) {
            return;
        }
        let (epoch, max) = (self.epoch, self.max_workers);
        if let Some(p) = self.pools.get_mut(&cpu) {
            p.call_worker(cpu, epoch, max, fx);
        }
    }

    /// Whether the head of a queue on `cpu`'s ready list could start there now (tombstones
    /// at the fronts dropped on the way, as a take does).
    fn ready_startable(&mut self, cpu: u32) -> bool {
        let n = self.pools.get_mut(&cpu).map_or(0, |p| p.ready.len());
        for i in 0..n {
            let Some(qid) = self
                .pools
                .get_mut(&cpu)
                .and_then(|p| p.ready.get(i).copied())
            else {
                break;
            };
            if !self.queues.contains(qid) {
                continue;
            }
            self.clean_front(qid);
            if self.queues[qid].get_mut().pending > 0
                && self.may_take(qid, cpu)
                && self.head_room(qid, cpu) > 0
            {
                return true;
            }
        }
        false
    }

    /// A delayed item whose delay ended becomes pending in its queue (or is rejected, see
    /// [`refusal`](Self::refusal)).
    pub(super) fn enqueue(&mut self, id: ItemId, fx: &mut Effects) {
        let Some(item) = self.items.get_mut().get_mut(&id) else {
            return;
        };
        item.state = State::Pending;
        let (qid, wi) = (item.qid(), item.wi());
        match self.refusal(qid) {
            Some(reason) => self.refuse(id, qid, reason, fx),
            None => self.push_pending(id, qid, wi),
        }
    }

    /// Why queue `qid` refuses new pending items now, if it does: it has no eligible CPU and
    /// its workqueue's fallback is `reject`, or no attached worker serves its handler and the
    /// workqueue rejects unserved items. Nothing a submit does changes the answer, so a
    /// submit asks once per run of entries of one queue.
    pub(super) fn refusal(&mut self, qid: usize) -> Option<String> {
        let q = self.queues[qid].get_mut();
        if q.eligible.is_empty() && self.wqs[q.wq].get_mut().attrs.fallback == Fallback::Reject {
            return Some(q.reason.clone());
        }
        self.unserved(qid)
    }

    /// Ends pending item `id` of queue `qid` (live in `items`, not yet in the queue's FIFO)
    /// `Rejected` at once, counted in and out of `pending` like any other pending item.
    pub(super) fn refuse(&mut self, id: ItemId, qid: usize, reason: String, fx: &mut Effects) {
        let wi = self.queues[qid].get_mut().wq;
        self.queues[qid].get_mut().pending += 1;
        self.wqs[wi].get_mut().pending += 1;
        self.end_unstarted(id, State::Rejected, reason, Instant::now(), fx);
    }

    /// Appends pending item `id` (live in `items`, state `Pending`) to queue `qid` of
    /// workqueue `wi` and counts it.
    #[inline]
    pub(super) fn push_pending(&mut self, id: ItemId, qid: usize, wi: usize) {
        let q = self.queues[qid].get_mut();
        q.items.push_back(id);
        q.pending += 1;
        q.idle_since = None;
        let wq = self.wqs[wi].get_mut();
        wq.pending += 1;
        if wq.attrs.ordered {
            wq.ordered.push_back(id);
        }
    }
}

/// The load [`Ranking`] orders `least-loaded` and `idle` takers by: the items running on the
/// CPU, and for `idle` the host's busy fraction first (×1000, so it decides unless equal).
/// Reads each CPU's pool under its P (one at a time).
pub(super) fn taker_load<'a>(
    pools: &'a Pools,
    host: &'a Option<crate::engine::LoadHook>,
    placement: Placement,
) -> impl Fn(u32) -> f64 + 'a {
    move |c: u32| {
        let running = pools.get(&c).map_or(0, |p| p.running) as f64;
        let busy = match (placement, host) {
            (Placement::Idle, Some(f)) => f(c),
            _ => 0.0,
        };
        busy * 1000.0 + running
    }
}

/// The CPU `spread` wakes first for a submit of one item, when the engine's `wake_local` is
/// on (`on`): the calling thread's own, when its pool is live and runs no item (the caller
/// moves it to the front of the ranking, where it counts only if it is eligible). Placement
/// stays round-robin otherwise, so items that keep their CPUs busy still go round, and so do
/// larger batches: they need more than one CPU, and their submitter's CPU is busy with the
/// rest of the call (unary `Submit(wait)` of 1 000 ran about 5% slower when it woke that CPU
/// first).
///
/// Why: a daemon's RPC thread submits and then gives its CPU up (it waits on the network).
/// A worker woken on that CPU runs as soon as it does, and the answer's wake-ups stay there
/// too; a worker woken on a sleeping CPU first waits for that CPU to wake (on this project's
/// 2-vCPU VM about 40 µs, most of a single item's round trip; session 37 in
/// `docs/benchmarks.md`). The kernel's `queue_work` on an unbound CPU picks the local one for
/// the same reason.
pub(super) fn local_first(pools: &Pools, placement: Placement, on: bool) -> Option<u32> {
    if !on || placement != Placement::Spread {
        return None;
    }
    let c = crate::engine::worker::current_cpu()?;
    pools
        .get(&c)
        .is_some_and(|p| p.live && p.running == 0)
        .then_some(c)
}

/// How many more items of `kind` may start on a CPU now running `on` (CPU-bound, waiting) of
/// a workqueue with these limits (`group` = `group_max_active`, 0 for none), from a queue
/// running `queue_running`: the free `max_active` (or `max_waiting`) slots, within the group
/// cap. Not for ordered workqueues (one at a time).
pub(super) fn room(
    [max_active, max_waiting, group]: [u32; 3],
    on: [u32; 2],
    queue_running: usize,
    kind: HandlerKind,
) -> usize {
    let cap = match group as usize {
        0 => usize::MAX,
        g => g.saturating_sub(queue_running),
    };
    let free = match kind {
        HandlerKind::CpuBound => max_active.saturating_sub(on[0]),
        HandlerKind::Waits => max_waiting.saturating_sub(on[1]),
    } as usize;
    free.min(cap)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{EngineConfig, WorkqueueAttrs};

    /// The engine ranks with `groups::Ranking`: a CPU whose host load is unknown (NaN, here
    /// with the sign bit set, as 0.0 / 0.0 gives on x86) comes last, equal loads go to the
    /// lowest CPU. Its own sort (`total_cmp`) once put a negative NaN first.
    #[test]
    fn idle_takers_put_an_unknown_load_last_and_break_ties_by_cpu() {
        let all = CpuSet::range(0, 3);
        let snap = crate::live::flat_snapshot(&all);
        let load: crate::engine::LoadHook = Arc::new(|cpu| match cpu {
            0 => -f64::NAN,
            1 => 0.5,
            _ => 0.25,
        });
        let cfg = EngineConfig {
            load: Some(load),
            ..EngineConfig::default()
        };
        let mut s = Sched::new(&cfg, snap);
        s.live = all.clone();
        let mut order = Ranking::new();
        for (placement, want) in [
            (Placement::Idle, [2, 3, 1, 0]),
            // Without the host load, every CPU runs nothing: a tie, lowest first.
            (Placement::LeastLoaded, [0, 1, 2, 3]),
        ] {
            let mut attrs = WorkqueueAttrs::named(placement.as_str());
            attrs.placement = placement;
            s.create_wq(attrs).unwrap();
            let wi = s.wq_index(placement.as_str()).unwrap();
            let qid = s.queue_for(wi, &Target::Cpus(all.clone()), None);
            s.takers(qid, &mut order, false);
            assert_eq!(order.as_slice(), want, "{placement}");
        }
    }
}
