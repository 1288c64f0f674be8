//! The scheduler state: every item, queue, pool and flush, behind the engine's one lock.
//!
//! Every state transition of an item happens here, under `Inner::sched`: submit (→ delayed or
//! pending), bind (pending → running, by a worker of a live CPU), hand back (running → pending,
//! when the worker's start check fails), finish and cancel/expire/reject (→ terminal). Each
//! terminal transition goes through [`Sched::terminal`] and removes the item from `items`, so
//! it can happen once only. Wake-ups and thread spawns decided under the lock are collected in
//! [`Effects`] and carried out after it is released.
//!
//! Field ownership: all fields are protected by `Inner::sched` (L). `Pool::live` mirrors
//! `Inner::pool_live`, which is written only here under L inside the topology seqlock.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_utils::sync::Unparker;
use slab::Slab;

use super::idhash::IdMap;
use super::items::Items;

use super::{
    CancelOutcome, EngineConfig, EngineError, EngineStats, Flush, FlushEvent, FlushScope, Inner,
    ItemResult, ItemSpec, Receipt, State, Submitted, WorkerLost, WorkqueueAttrs, WorkqueueStats,
};
use crate::cpuset::CpuSet;
use crate::groups::{Fallback, Level, Placement, Ranking};
use crate::handler::{Args, CancelToken, Handler, HandlerError, HandlerKind};
use crate::live::Snapshot;
use crate::target::Target;

/// An item's id: unique for the engine's lifetime, increasing in submission order.
pub type ItemId = u64;

/// What an item does; shared by identical items of one batch.
pub(crate) struct Body {
    /// The handler, shared by every body of a batch that names it.
    pub handler: Arc<HandlerRef>,
    pub target: Target,
    /// Arguments and payload; `None` when both are empty (most items), which keeps a body at
    /// 48 bytes instead of 88.
    pub extra: Option<Box<Extra>>,
}

/// A handler as items refer to it: the name clients used, the handler and its kind.
pub(crate) struct HandlerRef {
    pub name: Arc<str>,
    pub handler: Arc<dyn Handler>,
    pub kind: HandlerKind,
    /// Served by attached workers (`remote.rs`), not by this process's worker threads.
    pub remote: bool,
}

/// The arguments and payload of a body that has either.
pub(crate) struct Extra {
    pub args: Args,
    pub payload: Vec<u8>,
}

static NO_ARGS: Args = Args::new();

impl Body {
    pub(crate) fn new(
        handler: Arc<HandlerRef>,
        target: Target,
        args: Args,
        payload: Vec<u8>,
    ) -> Body {
        let extra = if args.is_empty() && payload.is_empty() {
            None
        } else {
            Some(Box::new(Extra { args, payload }))
        };
        Body {
            handler,
            target,
            extra,
        }
    }
    pub(crate) fn kind(&self) -> HandlerKind {
        self.handler.kind
    }
    pub(crate) fn handler_name(&self) -> &Arc<str> {
        &self.handler.name
    }
    /// The handler name when attached workers serve it.
    pub(crate) fn remote_name(&self) -> Option<&Arc<str>> {
        self.handler.remote.then_some(&self.handler.name)
    }
    pub(crate) fn args(&self) -> &Args {
        self.extra.as_ref().map_or(&NO_ARGS, |e| &e.args)
    }
    pub(crate) fn payload(&self) -> &[u8] {
        self.extra.as_ref().map_or(&[], |e| e.payload.as_slice())
    }
    pub(crate) fn same_as(&self, it: &ItemSpec) -> bool {
        self.target == it.target
            && *self.handler.name == *it.handler
            && *self.args() == it.args
            && self.payload() == it.payload.as_slice()
    }
}

/// One item of a batch as submit receives it: its (possibly shared) body and own options.
/// `delay` and `deadline` are as the client gave them; pass 1 of [`Sched::submit`] checks them
/// against the limits and the clock.
pub(crate) struct Entry {
    pub body: Arc<Body>,
    pub key: Option<String>,
    pub delay: Option<Duration>,
    pub deadline: Option<Duration>,
}

/// A worker's claim on an item. Kept in `Sched::running`, not in the item: only the few
/// items bound to a worker need it.
pub(crate) struct Bound {
    pub cpu: u32,
    pub at: Instant,
    pub token: CancelToken,
    pub hog_reported: bool,
    /// Whether this item holds its worker's slot in `Wq::running_on`. The first item a worker
    /// takes in a lock hold does; items claimed with it (`Sched::claim_more`) run after it on
    /// the same worker, one at a time, and share that slot.
    pub slot: bool,
    /// For an item held by an attached worker: (worker id, slot).
    pub remote: Option<(u64, u32)>,
}

/// An item that is not terminal yet. Kept small (one of these per pending item): the fields
/// most items never use live out of line in [`Cold`], the worker's claim in `Sched::running`.
pub(crate) struct Item {
    pub batch: u64,
    pub body: Arc<Body>,
    pub key: Option<Arc<str>>,
    pub queued_at: SystemTime,
    /// The first flush waiting for this item (0 = none; flush ids start at 1); any further
    /// ones are in `cold.waiters`.
    pub waiter: u64,
    pub cold: Option<Box<Cold>>,
    pub wq: u32,
    pub queue: u32,
    pub rebinds: u32,
    pub state: State,
    pub fallback: Option<Level>,
}

/// The rarely used part of an item, allocated only when one of its fields is set.
#[derive(Default)]
pub(crate) struct Cold {
    pub deadline: Option<Instant>,
    /// Why its fallback applied (set when it is bound through a widened queue).
    pub reason: String,
    /// The epoch in which that fallback was decided (0: none).
    pub decided: u64,
    /// Flushes waiting for this item beyond `Item::waiter`.
    pub waiters: Vec<u64>,
    /// The attached worker that holds it, or held it last.
    pub worker: Option<super::WorkerRef>,
    /// Times an attached worker was lost holding it and it was queued again.
    pub lost: u32,
}

impl Item {
    fn qid(&self) -> usize {
        self.queue as usize
    }
    fn wi(&self) -> usize {
        self.wq as usize
    }
    fn cold(&mut self) -> &mut Cold {
        self.cold.get_or_insert_with(Box::default)
    }
    fn deadline(&self) -> Option<Instant> {
        self.cold.as_ref().and_then(|c| c.deadline)
    }
    fn reason(&self) -> &str {
        self.cold.as_ref().map_or("", |c| c.reason.as_str())
    }
    fn add_waiter(&mut self, fid: u64) {
        if self.waiter == 0 {
            self.waiter = fid;
        } else {
            self.cold().waiters.push(fid);
        }
    }
}

/// Work handed to a worker. Its cancel token is the worker's own (reset by `take`).
pub(crate) struct Job {
    pub id: ItemId,
    pub body: Arc<Body>,
    /// The epoch in which it was bound. A job claimed behind another (`claim_more`) must
    /// start in this same epoch, or it is handed back.
    pub epoch: u64,
    /// Claimed behind another job of the same lock hold (see `Sched::claim_more`).
    pub claimed: bool,
    pub cpu: u32,
    pub nice: i32,
    pub queue: usize,
    /// The workqueue's name, for the observer (`None` when there is none).
    pub workqueue: Option<Arc<str>>,
    pub queued_at: SystemTime,
}

/// When and where an item started.
#[derive(Clone, Copy)]
pub(crate) struct Started {
    pub cpu: u32,
    pub at: SystemTime,
    pub epoch: u64,
}

/// How a job ended, reported back by its worker.
pub(crate) enum Outcome {
    Ran(Result<Vec<u8>, HandlerError>),
    /// The start check failed; the item goes back to its queue. The reason is a metric label.
    HandBack(&'static str),
    /// Cancelled after it was bound but before the handler was called.
    CancelledBeforeStart,
    /// The attached worker holding it was lost (why); it started when it was sent (`started`).
    Lost(String),
}

pub(crate) struct Finish {
    pub id: ItemId,
    pub outcome: Outcome,
    pub started: Option<Started>,
    pub finished: Option<(u32, SystemTime)>,
}

impl Finish {
    /// The job did not start; its item goes back to its queue.
    pub(crate) fn handback(id: ItemId, why: &'static str) -> Finish {
        Finish {
            id,
            outcome: Outcome::HandBack(why),
            started: None,
            finished: None,
        }
    }
    /// Whether the handler ran and returned within `d` (by the wall clock).
    pub(crate) fn ran_within(&self, d: Duration) -> bool {
        match (&self.started, &self.finished) {
            (Some(s), Some((_, f))) => f.duration_since(s.at).is_ok_and(|r| r < d),
            _ => false,
        }
    }
}

/// Items of one workqueue aimed at one target.
struct Queue {
    wq: usize,
    target: Target,
    /// The handler name, for a queue of items attached workers serve (see `remote.rs`); such
    /// a queue is on pools' `remote_ready` lists, never on `ready`.
    remote: Option<Arc<str>>,
    /// Pending item ids in FIFO order. May hold tombstones: ids no longer pending here.
    items: VecDeque<ItemId>,
    pending: usize,
    delayed: usize,
    running: usize,
    /// CPUs whose workers may take from this queue now.
    eligible: CpuSet,
    fallback: Option<Level>,
    reason: String,
    /// Pools whose `ready` list holds this queue.
    in_ready: CpuSet,
    idle_since: Option<Instant>,
}

/// The workers of one CPU.
struct Pool {
    live: bool,
    /// Bumped each time the CPU becomes live; workers of older generations exit.
    gen: u64,
    /// Workers of the current generation.
    workers: usize,
    idle: Vec<(u64, Unparker)>,
    /// Queues with pending items this pool may take (may hold stale entries).
    ready: VecDeque<usize>,
    /// The same for queues attached workers serve.
    remote_ready: VecDeque<usize>,
    /// Attached workers' slots of this CPU waiting for work: (worker, slot).
    idle_slots: Vec<(u64, u32)>,
    running: usize,
    last_progress: Instant,
    lockup_reported: bool,
    /// After a worker failed to pin: spawn no more until a newer epoch than this, or until
    /// the instant passes (a pinning can break without any topology change, e.g. `taskset`).
    spawn_hold: Option<(u64, Instant)>,
}

/// How long a pool whose worker could not pin waits before trying again (unless the
/// topology changes first).
const SPAWN_HOLD: Duration = Duration::from_secs(1);

impl Pool {
    fn new(now: Instant) -> Pool {
        Pool {
            live: false,
            gen: 0,
            workers: 0,
            idle: Vec::new(),
            ready: VecDeque::new(),
            remote_ready: VecDeque::new(),
            idle_slots: Vec::new(),
            running: 0,
            last_progress: now,
            lockup_reported: false,
            spawn_hold: None,
        }
    }
    fn ready_list(&mut self, remote: bool) -> &mut VecDeque<usize> {
        if remote {
            &mut self.remote_ready
        } else {
            &mut self.ready
        }
    }
    fn may_spawn(&self, epoch: u64) -> bool {
        self.spawn_hold
            .is_none_or(|(e, until)| epoch > e || Instant::now() >= until)
    }
}

struct Wq {
    attrs: WorkqueueAttrs,
    name: Arc<str>,
    queues: HashMap<Target, usize>,
    /// Queues of attached-worker handlers, by (target, handler name).
    remote_queues: HashMap<(Target, Arc<str>), usize>,
    /// Keys of pending (not yet started) items.
    keys: HashMap<Arc<str>, ItemId>,
    draining: bool,
    delayed: usize,
    pending: usize,
    running: usize,
    /// (CPU-bound, waiting) items running per CPU.
    running_on: IdMap<u32, [u32; 2]>,
    /// Ordered workqueues: every pending item in submission order (with tombstones).
    ordered: VecDeque<ItemId>,
    totals: [u64; 8],
    submitted: u64,
}

impl Wq {
    fn live(&self) -> usize {
        self.delayed + self.pending + self.running
    }
    fn all_queues(&self) -> impl Iterator<Item = usize> + '_ {
        self.queues
            .values()
            .chain(self.remote_queues.values())
            .copied()
    }
}

struct BatchRec {
    /// Entry i of the batch has id `first + i`.
    first: ItemId,
    count: usize,
    /// Ids of entries that were duplicates of pending keys (never used; sorted).
    unused: Vec<ItemId>,
    live: usize,
    created: Instant,
}

pub(crate) struct FlushRec {
    tx: flume::Sender<FlushEvent>,
    remaining: usize,
    /// Summary-only flushes count here instead of sending an event per item.
    tally: Option<Arc<parking_lot::Mutex<super::Tally>>>,
}

impl FlushRec {
    /// Stops per-item events: items that end from now on are counted in `t` instead.
    pub(crate) fn count_instead(&mut self, t: Arc<parking_lot::Mutex<super::Tally>>) {
        self.tally = Some(t);
    }
}

/// The error text of an item cancelled, or expired, before it started.
const CANCELLED_UNSTARTED: &str = "cancelled before it started";
const EXPIRED_UNSTARTED: &str = "not started before its deadline";

const TIMER_DELAY: u8 = 0;
const TIMER_DEADLINE: u8 = 1;

/// What a worker's start check says when its CPU is not live; [`Sched::finish`] turns it
/// into the reason (`offline`, `cpuset`, `isolated`) from the snapshot.
pub(crate) const NOT_LIVE: &str = "not-live";

/// Cuts a handler's output to `max` bytes (limits.max_result_bytes).
fn cut_output(mut out: Vec<u8>, max: usize) -> Vec<u8> {
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

/// Side effects decided under the lock, carried out after it is released.
#[derive(Default)]
pub(crate) struct Effects {
    /// Results for the observer (only collected when there is one).
    finished: Vec<Arc<ItemResult>>,
    rebound: Vec<&'static str>,
    submitted: Option<(Arc<str>, usize)>,
    unpark: Vec<Unparker>,
    spawn: Vec<(u32, u64)>,
    timer_kick: bool,
    idle_kick: bool,
    /// Attached workers with a slot that may find work now (one entry per worker).
    remote_wake: Vec<(u64, Arc<dyn super::RemoteSink>)>,
    /// Items sent to attached workers, for the observer: (workqueue, cpu, time queued).
    started: Vec<(Arc<str>, u32, Duration)>,
    /// Items held by attached workers that were cancelled.
    remote_cancel: Vec<(Arc<dyn super::RemoteSink>, ItemId)>,
}

impl Effects {
    pub(crate) fn is_empty(&self) -> bool {
        self.finished.is_empty()
            && self.rebound.is_empty()
            && self.submitted.is_none()
            && self.unpark.is_empty()
            && self.spawn.is_empty()
            && !self.timer_kick
            && !self.idle_kick
            && self.remote_wake.is_empty()
            && self.started.is_empty()
            && self.remote_cancel.is_empty()
    }
    pub(crate) fn run(self, inner: &Arc<Inner>) {
        if let Some(o) = &inner.cfg.observer {
            if let Some((wq, n)) = &self.submitted {
                o.submitted(wq, *n);
            }
            for r in &self.finished {
                o.finished(r);
            }
            for why in &self.rebound {
                o.rebound(why);
            }
            for (wq, cpu, waited) in &self.started {
                o.started(wq, *cpu, *waited);
            }
        }
        for u in self.unpark {
            u.unpark();
        }
        for (cpu, gen) in self.spawn {
            super::worker::spawn(inner, cpu, gen);
        }
        if self.timer_kick {
            inner.timer_cv.notify_one();
        }
        if self.idle_kick {
            inner.idle_cv.notify_all();
        }
        for (_, w) in self.remote_wake {
            w.wake();
        }
        for (w, id) in self.remote_cancel {
            w.cancel(id);
        }
    }
}

/// Terminal results, bounded by count, age and bytes (oldest forgotten first).
struct Results {
    map: IdMap<ItemId, Arc<ItemResult>>,
    order: VecDeque<(Instant, ItemId)>,
    max: usize,
    ttl: Duration,
    /// Estimated bytes of the stored results ([`result_bytes`]).
    bytes: usize,
    max_bytes: usize,
}

/// What one stored result costs, estimated: its texts plus a fixed overhead (the record, its
/// `Arc`, the map and order entries).
pub(crate) fn result_bytes(r: &ItemResult) -> usize {
    const OVERHEAD: usize = std::mem::size_of::<ItemResult>() + 64;
    OVERHEAD + r.output.len() + r.error.len() + r.reason.len()
}

impl Results {
    fn insert(&mut self, r: Arc<ItemResult>, now: Instant) {
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
    fn remove(&mut self, id: ItemId) {
        if let Some(old) = self.map.remove(&id) {
            self.bytes -= result_bytes(&old);
        }
    }
    fn expire(&mut self, now: Instant) {
        while let Some(&(at, _)) = self.order.front() {
            if now.duration_since(at) < self.ttl {
                break;
            }
            self.pop_oldest();
        }
    }
}

/// `now + d`, checked against `max` and the clock; `None` when `d` is unset or zero.
fn instant_after(
    index: usize,
    field: &'static str,
    d: Option<Duration>,
    max: Duration,
    now: Instant,
) -> Result<Option<Instant>, EngineError> {
    let Some(d) = d.filter(|d| !d.is_zero()) else {
        return Ok(None);
    };
    let bad = |problem: String| EngineError::Duration {
        index,
        field,
        problem,
    };
    if d > max {
        return Err(bad(format!(
            "{} is longer than the limit of {}",
            humanize(d),
            humanize(max)
        )));
    }
    now.checked_add(d)
        .map(Some)
        .ok_or_else(|| bad(format!("{} is beyond what the clock can hold", humanize(d))))
}

/// A duration in whole seconds (or milliseconds below one second), for messages.
fn humanize(d: Duration) -> String {
    if d >= Duration::from_secs(1) {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

#[path = "remote.rs"]
pub(crate) mod remote;

/// The scheduler state (see the module docs).
pub(crate) struct Sched {
    pub epoch: u64,
    pub live: CpuSet,
    pub snapshot: Arc<Snapshot>,
    wqs: Slab<Wq>,
    wq_names: HashMap<String, usize>,
    queues: Slab<Queue>,
    pub items: Items,
    /// Items bound to a worker, and the worker's claim on each.
    running: IdMap<ItemId, Bound>,
    next_item: ItemId,
    next_batch: u64,
    next_flush: u64,
    batches: IdMap<u64, BatchRec>,
    batch_order: VecDeque<u64>,
    pools: BTreeMap<u32, Pool>,
    pub flushes: IdMap<u64, FlushRec>,
    results: Results,
    timers: BinaryHeap<Reverse<(Instant, u8, ItemId)>>,
    pub shutdown: bool,
    rr: u64,
    /// The buffers [`Sched::make_ready`] ranks takers into (kept so ranking allocates nothing).
    ranking: Ranking,
    max_workers: usize,
    rebinds: BTreeMap<&'static str, u64>,
    fallbacks: BTreeMap<String, u64>,
    lockups: u64,
    hogs: u64,
    load: Option<super::LoadHook>,
    observed: bool,
    /// Terminal items by state since start, over every workqueue ever (never go down).
    totals: [u64; 8],
    max_delay: Duration,
    max_deadline: Duration,
    max_result_bytes: usize,
    /// Timer-heap entries whose item ended or left the state the timer was for; the heap is
    /// rebuilt when they are more than half of it (see [`Sched::timer_garbage`]).
    stale_timers: usize,
    /// Attached workers (see `remote.rs`).
    remotes: IdMap<u64, remote::RemoteRec>,
    /// Attached workers serving each handler name now.
    served: HashMap<Arc<str>, usize>,
    next_remote: u64,
    /// Items one slot of an attached worker may hold at once.
    max_credits: u32,
    /// Workers detached holding items, and those items, since start.
    remote_lost: (u64, u64),
}

impl Sched {
    pub(crate) fn new(cfg: &EngineConfig, first: Arc<Snapshot>) -> Sched {
        let mut s = Sched {
            epoch: 0,
            live: CpuSet::new(),
            snapshot: first,
            wqs: Slab::new(),
            wq_names: HashMap::new(),
            queues: Slab::new(),
            items: Items::default(),
            running: IdMap::default(),
            next_item: 1,
            next_batch: 1,
            next_flush: 1,
            batches: IdMap::default(),
            batch_order: VecDeque::new(),
            pools: BTreeMap::new(),
            flushes: IdMap::default(),
            results: Results {
                map: IdMap::default(),
                order: VecDeque::new(),
                max: cfg.results_max.max(1),
                ttl: cfg.results_ttl,
                bytes: 0,
                max_bytes: cfg.results_memory,
            },
            timers: BinaryHeap::new(),
            shutdown: false,
            rr: 0,
            ranking: Ranking::new(),
            max_workers: cfg.max_workers_per_cpu.max(1),
            rebinds: BTreeMap::new(),
            fallbacks: BTreeMap::new(),
            lockups: 0,
            hogs: 0,
            load: cfg.load.clone(),
            observed: cfg.observer.is_some(),
            totals: [0; 8],
            max_delay: cfg.max_delay,
            max_deadline: cfg.max_deadline,
            max_result_bytes: cfg.max_result_bytes,
            stale_timers: 0,
            remotes: IdMap::default(),
            served: HashMap::new(),
            next_remote: 1,
            max_credits: cfg.max_credits.max(1),
            remote_lost: (0, 0),
        };
        let _ = s.create_wq(cfg.default_wq.clone());
        s
    }

    // ----- workqueues -----

    pub(crate) fn create_wq(&mut self, attrs: WorkqueueAttrs) -> Result<(), EngineError> {
        if self.wq_names.contains_key(&attrs.name) {
            return Err(EngineError::WorkqueueExists(attrs.name));
        }
        let name: Arc<str> = Arc::from(attrs.name.as_str());
        let idx = self.wqs.insert(Wq {
            attrs,
            name: name.clone(),
            queues: HashMap::new(),
            remote_queues: HashMap::new(),
            keys: HashMap::new(),
            draining: false,
            delayed: 0,
            pending: 0,
            running: 0,
            running_on: IdMap::default(),
            ordered: VecDeque::new(),
            totals: [0; 8],
            submitted: 0,
        });
        self.wq_names.insert(name.to_string(), idx);
        Ok(())
    }

    fn wq_index(&self, name: &str) -> Result<usize, EngineError> {
        self.wq_names
            .get(name)
            .copied()
            .ok_or_else(|| EngineError::UnknownWorkqueue(name.to_string()))
    }

    pub(crate) fn update_wq(
        &mut self,
        attrs: WorkqueueAttrs,
        fx: &mut Effects,
    ) -> Result<(), EngineError> {
        let wi = self.wq_index(&attrs.name)?;
        let wq = &mut self.wqs[wi];
        if wq.attrs.ordered != attrs.ordered && wq.live() > 0 {
            return Err(EngineError::WorkqueueNotEmpty {
                name: attrs.name,
                items: wq.live(),
            });
        }
        wq.attrs = attrs;
        if wq.draining {
            // A drain (or delete) whose caller stopped waiting left it refusing work; an update
            // is the operator's way to take it back.
            tracing::info!(workqueue = %wq.name, items = wq.live(), "workqueue update ends its drain; it accepts work again");
            wq.draining = false;
        }
        let qids: Vec<usize> = wq.all_queues().collect();
        for qid in qids {
            self.resolve_queue(qid, fx);
        }
        Ok(())
    }

    pub(crate) fn delete_wq(&mut self, name: &str) -> Result<(), EngineError> {
        if name == "default" {
            return Err(EngineError::DefaultWorkqueue);
        }
        let wi = self.wq_index(name)?;
        let live = self.wqs[wi].live();
        if live > 0 {
            return Err(EngineError::WorkqueueNotEmpty {
                name: name.to_string(),
                items: live,
            });
        }
        let qids: Vec<usize> = self.wqs[wi].all_queues().collect();
        for qid in qids {
            self.remove_queue(qid);
        }
        self.wqs.remove(wi);
        self.wq_names.remove(name);
        Ok(())
    }

    pub(crate) fn start_drain(&mut self, name: &str) -> Result<(), EngineError> {
        let wi = self.wq_index(name)?;
        let wq = &mut self.wqs[wi];
        if wq.live() > 0 {
            wq.draining = true;
        }
        Ok(())
    }

    pub(crate) fn wq_stats(&self) -> Vec<WorkqueueStats> {
        let mut v: Vec<_> = self
            .wqs
            .iter()
            .map(|(_, wq)| WorkqueueStats {
                attrs: wq.attrs.clone(),
                draining: wq.draining,
                delayed: wq.delayed,
                pending: wq.pending,
                running: wq.running,
                totals: State::ALL
                    .iter()
                    .filter(|s| s.is_terminal())
                    .map(|s| (*s, wq.totals[s.index()]))
                    .collect(),
                submitted: wq.submitted,
            })
            .collect();
        v.sort_by(|a, b| a.attrs.name.cmp(&b.attrs.name));
        v
    }

    pub(crate) fn running_total(&self) -> usize {
        self.running.len()
    }

    /// The running items, described for a log line (shutdown stragglers).
    pub(crate) fn running_items(&self) -> Vec<String> {
        self.running
            .iter()
            .filter_map(|(id, b)| {
                let it = self.items.get(id)?;
                Some(format!(
                    "item {id} {} on cpu {}",
                    it.body.handler_name(),
                    b.cpu
                ))
            })
            .collect()
    }

    pub(crate) fn set_max_durations(&mut self, max_delay: Duration, max_deadline: Duration) {
        self.max_delay = max_delay;
        self.max_deadline = max_deadline;
    }

    pub(crate) fn stats(&self) -> EngineStats {
        EngineStats {
            epoch: self.epoch,
            live: self.live.clone(),
            pools: self.pools.values().filter(|p| p.live).count(),
            workers: self.pools.values().map(|p| p.workers).sum(),
            items: self.items.len(),
            results: self.results.map.len(),
            results_bytes: self.results.bytes,
            timers: self.timers.len(),
            flushes: self.flushes.len(),
            totals: State::ALL
                .iter()
                .filter(|s| s.is_terminal())
                .map(|s| (*s, self.totals[s.index()]))
                .collect(),
            delayed: self.wqs.iter().map(|(_, w)| w.delayed).sum(),
            pending: self.wqs.iter().map(|(_, w)| w.pending).sum(),
            running: self.wqs.iter().map(|(_, w)| w.running).sum(),
            rebinds: self.rebinds.clone(),
            fallbacks: self.fallbacks.clone(),
            lockups: self.lockups,
            hogs: self.hogs,
            running_per_cpu: self
                .pools
                .iter()
                .filter(|(_, p)| p.running > 0)
                .map(|(c, p)| (*c, p.running))
                .collect(),
            pending_by_level: {
                let mut m: BTreeMap<(String, String), usize> = BTreeMap::new();
                for (_, q) in self.queues.iter().filter(|(_, q)| q.pending > 0) {
                    let key = (
                        self.wqs[q.wq].name.to_string(),
                        crate::groups::Level::of(&q.target).to_string(),
                    );
                    *m.entry(key).or_default() += q.pending;
                }
                m
            },
        }
    }

    // ----- queues -----

    /// The queue of workqueue `wi` for `target` and, for an attached-worker handler, its name.
    fn queue_for(&mut self, wi: usize, target: &Target, remote: Option<&Arc<str>>) -> usize {
        let found = match remote {
            None => self.wqs[wi].queues.get(target),
            Some(h) => self.wqs[wi].remote_queues.get(&(target.clone(), h.clone())),
        };
        if let Some(&q) = found {
            return q;
        }
        let qid = self.queues.insert(Queue {
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
        });
        match remote {
            None => self.wqs[wi].queues.insert(target.clone(), qid),
            Some(h) => self.wqs[wi]
                .remote_queues
                .insert((target.clone(), h.clone()), qid),
        };
        let mut fx = Effects::default();
        self.resolve_queue(qid, &mut fx);
        qid
    }

    fn remove_queue(&mut self, qid: usize) {
        let q = self.queues.remove(qid);
        for c in q.in_ready.iter() {
            if let Some(p) = self.pools.get_mut(&c) {
                p.ready_list(q.remote.is_some()).retain(|&x| x != qid);
            }
        }
        match q.remote {
            None => self.wqs[q.wq].queues.remove(&q.target),
            Some(h) => self.wqs[q.wq].remote_queues.remove(&(q.target, h)),
        };
    }

    /// Re-resolves a queue's eligible CPUs against the current live set and applies the
    /// workqueue's fallback: `reject` rejects its pending items when no CPU is eligible.
    fn resolve_queue(&mut self, qid: usize, fx: &mut Effects) {
        let q = &self.queues[qid];
        let wq = &self.wqs[q.wq];
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
        let q = &mut self.queues[qid];
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
        let n = self.queues[qid].pending;
        self.make_ready(qid, n, fx);
    }

    fn is_pending_in(&self, id: ItemId, qid: usize) -> bool {
        self.items
            .get(&id)
            .is_some_and(|it| it.state == State::Pending && it.qid() == qid)
    }

    /// Drops tombstones from the front of a queue (and of its ordered workqueue's FIFO).
    fn clean_front(&mut self, qid: usize) {
        while let Some(&id) = self.queues[qid].items.front() {
            if self.is_pending_in(id, qid) {
                break;
            }
            self.queues[qid].items.pop_front();
        }
    }

    fn ordered_head(&mut self, wi: usize) -> Option<ItemId> {
        while let Some(&id) = self.wqs[wi].ordered.front() {
            if self
                .items
                .get(&id)
                .is_some_and(|it| it.state == State::Pending)
            {
                return Some(id);
            }
            self.wqs[wi].ordered.pop_front();
        }
        None
    }

    /// Ranks the CPUs that may take from a queue into `out`, in the order placement prefers
    /// them ([`Ranking`], the groups' one placement rule). The load of `least-loaded` is the
    /// items running on the CPU; `idle` puts the host's busy fraction first (×1000, so it
    /// decides unless equal) and the running items second. Allocates nothing once `out` has
    /// grown (this runs on every submit).
    fn takers(&mut self, qid: usize, out: &mut Ranking) {
        let q = &self.queues[qid];
        let placement = self.wqs[q.wq].attrs.placement;
        if placement == Placement::Spread && !q.eligible.is_empty() {
            self.rr = self.rr.wrapping_add(1);
        }
        let (pools, host) = (&self.pools, &self.load);
        let load = |c: u32| {
            let running = pools.get(&c).map_or(0, |p| p.running) as f64;
            let busy = match (placement, host) {
                (Placement::Idle, Some(f)) => f(c),
                _ => 0.0,
            };
            busy * 1000.0 + running
        };
        out.rank(placement, &q.eligible, load, self.rr);
    }

    fn may_take(&self, qid: usize, cpu: u32) -> bool {
        let q = &self.queues[qid];
        Ranking::admits(self.wqs[q.wq].attrs.placement, &q.eligible, cpu)
    }

    /// Whether the queue's head may start on `cpu` now under the workqueue's limits.
    /// Call after `clean_front`.
    fn limits_allow(&mut self, qid: usize, cpu: u32) -> bool {
        let Some(&head) = self.queues[qid].items.front() else {
            return false;
        };
        let wi = self.queues[qid].wq;
        if self.wqs[wi].attrs.ordered
            && (self.wqs[wi].running > 0 || self.ordered_head(wi) != Some(head))
        {
            return false;
        }
        let q = &self.queues[qid];
        let wq = &self.wqs[wi];
        if wq.attrs.group_max_active > 0 && q.running >= wq.attrs.group_max_active as usize {
            return false;
        }
        let [cb, w] = wq.running_on.get(&cpu).copied().unwrap_or([0, 0]);
        match self.items.get(&head).map(|i| i.body.kind()) {
            Some(HandlerKind::CpuBound) => cb < wq.attrs.max_active,
            Some(HandlerKind::Waits) => w < wq.attrs.max_waiting,
            None => false,
        }
    }

    /// Puts a queue with pending items on the ready lists of the pools that may take from it
    /// and wakes (or spawns) up to `n` workers, in placement order.
    fn make_ready(&mut self, qid: usize, n: usize, fx: &mut Effects) {
        if self.queues[qid].pending == 0 || self.shutdown {
            return;
        }
        // The buffers go back into `self.ranking` at the end; a nested `make_ready` (none
        // today) would only rank into fresh ones.
        let mut ranking = std::mem::take(&mut self.ranking);
        self.takers(qid, &mut ranking);
        self.wake_takers(qid, ranking.as_slice(), n, fx);
        self.ranking = ranking;
    }

    /// [`make_ready`](Self::make_ready) after ranking: `takers` in placement order.
    fn wake_takers(&mut self, qid: usize, takers: &[u32], n: usize, fx: &mut Effects) {
        let remote = self.queues[qid].remote.clone();
        for &c in takers {
            if self.queues[qid].in_ready.contains(c) {
                continue;
            }
            if let Some(p) = self.pools.get_mut(&c).filter(|p| p.live) {
                p.ready_list(remote.is_some()).push_back(qid);
                self.queues[qid].in_ready.insert(c);
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
            // Only a CPU whose limits let it start the head now is worth a wake-up; waking
            // one that cannot would use up the wake-up and leave an idle CPU asleep.
            if !self.limits_allow(qid, c) {
                continue;
            }
            let (epoch, max) = (self.epoch, self.max_workers);
            let Some(p) = self.pools.get_mut(&c).filter(|p| p.live) else {
                continue;
            };
            if let Some((_, u)) = p.idle.pop() {
                fx.unpark.push(u);
                woken += 1;
            } else if p.workers < max && p.may_spawn(epoch) {
                p.workers += 1;
                fx.spawn.push((c, p.gen));
                woken += 1;
            }
        }
    }

    fn enqueue(&mut self, id: ItemId, fx: &mut Effects) {
        let Some(item) = self.items.get_mut(&id) else {
            return;
        };
        item.state = State::Pending;
        let (qid, wi) = (item.qid(), item.wi());
        let unserved = self.unserved(qid);
        let q = &mut self.queues[qid];
        let no_cpu = q.eligible.is_empty() && self.wqs[wi].attrs.fallback == Fallback::Reject;
        if no_cpu || unserved.is_some() {
            let reason = unserved.unwrap_or_else(|| q.reason.clone());
            q.pending += 1;
            self.wqs[wi].pending += 1;
            let now = Instant::now();
            self.end_unstarted(id, State::Rejected, reason, now, fx);
            return;
        }
        q.items.push_back(id);
        q.pending += 1;
        q.idle_since = None;
        let wq = &mut self.wqs[wi];
        wq.pending += 1;
        if wq.attrs.ordered {
            wq.ordered.push_back(id);
        }
    }

    // ----- submit -----

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
        if self.wqs[wi].draining {
            return Err(EngineError::Draining(wq_name.to_string()));
        }
        // Pass 1: validate everything, compute every instant and count what will be queued;
        // change nothing. Everything that can fail fails here.
        let now = Instant::now();
        let mut last: Option<&Target> = None;
        let mut batch_keys: HashSet<&str> = HashSet::new();
        let mut adding = 0usize;
        // (delay end, deadline) per entry; allocated only for a batch that uses either.
        let mut times: Vec<(Option<Instant>, Option<Instant>)> = Vec::new();
        for (index, e) in bodies.iter().enumerate() {
            let b = &e.body;
            if last != Some(&b.target) {
                self.snapshot
                    .groups
                    .resolve(&b.target, &self.live, Fallback::Wait)
                    .map_err(|source| EngineError::Group { index, source })?;
                last = Some(&b.target);
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
                Some(k) if self.wqs[wi].keys.contains_key(k.as_str()) => {}
                Some(k) if !batch_keys.insert(k.as_str()) => {}
                _ => adding += 1,
            }
        }
        let wq = &self.wqs[wi];
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
        let batch = self.next_batch;
        self.next_batch += 1;
        let first = self.next_item;
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
        let first = self.next_item;
        // The batch's record exists before its items do, so an item that ends during the
        // submit (rejected: no eligible CPU) is counted out of `live` like any other.
        self.batches.insert(
            batch,
            BatchRec {
                first,
                count: bodies.len(),
                live: 0,
                created: now,
                unused: Vec::new(),
            },
        );
        self.batch_order.push_back(batch);
        let wq32 = wi as u32;
        let mut out = Vec::with_capacity(bodies.len());
        let mut touched: Vec<(usize, usize)> = Vec::new();
        let mut unused: Vec<ItemId> = Vec::new();
        // The body of the previous entry and its queue: runs of entries sharing a body (the
        // common case) find their queue without comparing targets.
        let mut last_body: Option<(Arc<Body>, usize)> = None;
        for (index, Entry { body: b, key, .. }) in bodies.into_iter().enumerate() {
            if index > 0 {
                crate::failpoint::seam!("engine::submit-between-items");
            }
            let (delay_at, deadline_at) = times.get(index).copied().unwrap_or((None, None));
            let key: Option<Arc<str>> = key.map(Arc::from);
            // Every entry takes the next id, so entry i of a batch is `first + i`; the id of
            // a duplicate is never used and is left out of the batch's scope.
            let id = self.next_item;
            self.next_item += 1;
            if let Some(k) = &key {
                if let Some(&dup) = self.wqs[wi].keys.get(k) {
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
                            if self.queues[q].target == b.target
                                && self.queues[q].remote.as_ref() == remote =>
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
            let wq = &mut self.wqs[wi];
            wq.submitted += 1;
            if let Some(k) = &key {
                wq.keys.insert(k.clone(), id);
            }
            self.items.insert(
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
                    rebinds: 0,
                    state: State::Delayed,
                    fallback: None,
                },
            );
            if let Some(rec) = self.batches.get_mut(&batch) {
                rec.live += 1;
            }
            match delay_at.filter(|&at| at > now) {
                Some(at) => {
                    self.wqs[wi].delayed += 1;
                    self.queues[qid].delayed += 1;
                    self.timers.push(Reverse((at, TIMER_DELAY, id)));
                    fx.timer_kick = true;
                }
                None => self.enqueue(id, fx),
            }
            if let Some(at) = deadline_at {
                self.timers.push(Reverse((at, TIMER_DEADLINE, id)));
                fx.timer_kick = true;
            }
            out.push(Submitted { id, queued: true });
        }
        if let Some(rec) = self.batches.get_mut(&batch) {
            rec.unused = unused;
        }
        if self.observed {
            let queued = out.iter().filter(|s| s.queued).count();
            fx.submitted = Some((self.wqs[wi].name.clone(), queued));
        }
        for (qid, n) in touched {
            if self.queues.contains(qid) {
                self.make_ready(qid, n, fx);
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
        let ids = first..self.next_item;
        tracing::error!(
            batch,
            items = ids.end - ids.start,
            "submit panicked; rolling the batch back whole"
        );
        for id in ids.clone() {
            if let Some(item) = self.items.remove(&id) {
                self.uncount_waiting(&item);
                let wq = &mut self.wqs[wi];
                wq.submitted -= 1;
                if let Some(k) = &item.key {
                    if wq.keys.get(k) == Some(&id) {
                        wq.keys.remove(k);
                    }
                }
            } else if let Some(r) = self.results.map.get(&id).cloned() {
                // Rejected during the submit: its result and counts go too.
                self.results.remove(id);
                self.totals[r.state.index()] -= 1;
                let wq = &mut self.wqs[wi];
                wq.totals[r.state.index()] -= 1;
                wq.submitted -= 1;
            }
        }
        fx.finished.truncate(finished_before);
        self.timers.retain(|Reverse((_, _, id))| !ids.contains(id));
        self.batches.remove(&batch);
        if self.batch_order.back() == Some(&batch) {
            self.batch_order.pop_back();
        }
    }

    // ----- workers -----

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
            .filter(|p| p.live)?
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
                let theirs = self.queues[qid].remote.as_ref();
                if !theirs.is_some_and(|h| names.contains(h)) {
                    if let Some(p) = self.pools.get_mut(&cpu) {
                        p.remote_ready.push_back(qid);
                    }
                    continue;
                }
            }
            self.clean_front(qid);
            if self.queues[qid].pending == 0 || !self.may_take(qid, cpu) {
                self.queues[qid].in_ready.remove(cpu);
                continue;
            }
            if !self.limits_allow(qid, cpu) {
                if let Some(p) = self.pools.get_mut(&cpu) {
                    p.ready_list(remote).push_back(qid);
                }
                continue;
            }
            // `clean_front` left a pending item of this queue at the front.
            let Some(&id) = self.queues[qid].items.front() else {
                continue;
            };
            let Some((kind, expired)) = self
                .items
                .get(&id)
                .map(|it| (it.body.kind(), it.deadline().is_some_and(|d| d <= now)))
            else {
                continue;
            };
            // From here on the item leaves its queue and is bound or expired.
            self.queues[qid].items.pop_front();
            let wi = self.queues[qid].wq;
            if self.wqs[wi].attrs.ordered {
                self.ordered_head(wi);
                self.wqs[wi].ordered.pop_front();
            }
            // Requeue the queue for this pool while it has more.
            if self.queues[qid].pending > 1 {
                if let Some(p) = self.pools.get_mut(&cpu) {
                    p.ready_list(remote).push_back(qid);
                }
            } else {
                self.queues[qid].in_ready.remove(cpu);
            }
            if expired {
                self.end_unstarted(id, State::Expired, EXPIRED_UNSTARTED.into(), now, fx);
                budget += 1;
                continue;
            }
            let Some((body, queued_at)) = self.bind(id, qid, cpu, token, now, true) else {
                continue;
            };
            let wq = &mut self.wqs[wi];
            let slot = wq.running_on.entry(cpu).or_insert([0, 0]);
            slot[usize::from(kind == HandlerKind::Waits)] += 1;
            let nice = wq.attrs.nice;
            let max = self.max_workers;
            if let Some(pool) = self.pools.get_mut(&cpu) {
                pool.running += 1;
                pool.last_progress = now;
                pool.lockup_reported = false;
                // Keep one worker in reserve while this pool has more it could start.
                if !remote && pool.idle.is_empty() && !pool.ready.is_empty() && pool.workers < max {
                    pool.workers += 1;
                    fx.spawn.push((cpu, pool.gen));
                }
            }
            return Some(Job {
                id,
                body,
                epoch: self.epoch,
                claimed: false,
                cpu,
                nice,
                queue: qid,
                workqueue: self.observed.then(|| self.wqs[wi].name.clone()),
                queued_at,
            });
        }
        None
    }

    /// The bind step shared by [`take`](Self::take) and [`claim_more`](Self::claim_more):
    /// pending item `id`, already popped from queue `qid`, becomes running on `cpu` under
    /// `token` (reset here), with the queue's fallback and reason, the fallback tally, its
    /// `running` entry (`slot`: whether it holds a `running_on` slot) and the queue and
    /// workqueue counters. Returns its body and queue time for the [`Job`].
    fn bind(
        &mut self,
        id: ItemId,
        qid: usize,
        cpu: u32,
        token: &CancelToken,
        now: Instant,
        slot: bool,
    ) -> Option<(Arc<Body>, SystemTime)> {
        let q = &self.queues[qid];
        let (wi, fallback) = (q.wq, q.fallback);
        let epoch = self.epoch;
        // The callers found this item pending under the same lock hold; were it gone, the id
        // they popped was a tombstone and nothing has changed yet.
        let item = self.items.get_mut(&id)?;
        item.state = State::Running;
        item.fallback = fallback;
        if fallback.is_some() {
            let c = item.cold();
            c.reason = q.reason.clone();
            c.decided = epoch;
        }
        if let Some(k) = &item.key {
            let wq = &mut self.wqs[wi];
            if wq.keys.get(k) == Some(&id) {
                wq.keys.remove(k);
            }
        }
        let out = (item.body.clone(), item.queued_at);
        if let Some(l) = fallback {
            *self.fallbacks.entry(l.to_string()).or_default() += 1;
        }
        token.reset();
        self.running.insert(
            id,
            Bound {
                cpu,
                at: now,
                token: token.clone(),
                hog_reported: false,
                slot,
                remote: None,
            },
        );
        let q = &mut self.queues[qid];
        q.pending -= 1;
        q.running += 1;
        let wq = &mut self.wqs[wi];
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
        for token in tokens {
            if !self.queues.contains(qid) {
                return;
            }
            self.clean_front(qid);
            let q = &self.queues[qid];
            let wi = q.wq;
            let wq = &self.wqs[wi];
            if q.pending == 0
                || wq.attrs.ordered
                || (wq.attrs.group_max_active > 0
                    && q.running >= wq.attrs.group_max_active as usize)
                || !self.may_take(qid, cpu)
                || !self.pools.get(&cpu).is_some_and(|p| p.live)
            {
                return;
            }
            let Some(&id) = q.items.front() else { return };
            let Some(item) = self.items.get_mut(&id) else {
                return;
            };
            // The same work as `first` (whose predecessor just returned quickly): a different
            // handler or arguments may be slow and would hold the rest of the batch behind it.
            let same_work = Arc::ptr_eq(&item.body, &first.body)
                || (item.body.handler_name() == first.body.handler_name()
                    && item.body.args() == first.body.args());
            if item.body.kind() != HandlerKind::CpuBound
                || !same_work
                || item.key.is_some()
                || item.cold.is_some()
            {
                return;
            }
            self.queues[qid].items.pop_front();
            let Some((body, queued_at)) = self.bind(id, qid, cpu, token, now, false) else {
                return;
            };
            if let Some(p) = self.pools.get_mut(&cpu) {
                p.running += 1;
            }
            out.push(Job {
                id,
                body,
                epoch: first.epoch,
                claimed: true,
                cpu,
                nice: first.nice,
                queue: qid,
                workqueue: first.workqueue.clone(),
                queued_at,
            });
        }
    }

    /// Records how a worker's jobs of one batch ended, emptying `done`. Last to first: a
    /// hand-back goes to the front of its queue, so the batch's hand-backs keep their order.
    pub(crate) fn finish_all(&mut self, done: &mut Vec<Finish>, now: Instant, fx: &mut Effects) {
        while let Some(f) = done.pop() {
            self.finish(f, now, fx);
        }
    }

    /// Records how a job ended (or hands it back to its queue).
    /// `now` is the worker's clock reading for this lock hold.
    pub(crate) fn finish(&mut self, f: Finish, now: Instant, fx: &mut Effects) {
        let Some(item) = self.items.get(&f.id) else {
            tracing::error!(item = f.id, "finish for an item that is not live");
            return;
        };
        let (qid, wi, kind) = (item.qid(), item.wi(), item.body.kind());
        let Some(bound) = self.running.remove(&f.id) else {
            tracing::error!(item = f.id, "finish for an item that is not bound");
            return;
        };
        let cap_was_full = {
            let wq = &self.wqs[wi];
            wq.attrs.group_max_active > 0
                && self.queues[qid].running >= wq.attrs.group_max_active as usize
        };
        self.queues[qid].running -= 1;
        let wq = &mut self.wqs[wi];
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
                if let Some(item) = self.items.get_mut(&f.id) {
                    item.rebinds += 1;
                }
                self.requeue(f.id, now, fx);
            }
            // A cancel asked while the worker held it: the worker's loss ends it cancelled.
            Outcome::Lost(_) if bound.token.is_cancelled() => {
                let err = "cancelled; its attached worker was lost before it answered".into();
                self.terminal(
                    f.id,
                    State::Cancelled,
                    Vec::new(),
                    err,
                    f.started,
                    None,
                    now,
                    fx,
                );
            }
            Outcome::Lost(why) if self.wqs[wi].attrs.on_worker_lost == WorkerLost::Requeue => {
                // A metric only: the stats' re-bind count is the sum of the items' `rebinds`
                // (hand-backs before a start), which a re-delivery is not.
                if self.observed {
                    fx.rebound.push("worker-lost");
                }
                if let Some(item) = self.items.get_mut(&f.id) {
                    let c = item.cold();
                    c.lost += 1;
                    tracing::info!(item = f.id, lost = c.lost, %why, "worker lost holding an item; queued again (on_worker_lost = requeue)");
                }
                self.requeue(f.id, now, fx);
            }
            Outcome::Lost(why) => {
                let err = format!("worker lost: {why}");
                self.terminal(
                    f.id,
                    State::Failed,
                    Vec::new(),
                    err,
                    f.started,
                    None,
                    now,
                    fx,
                );
            }
            Outcome::CancelledBeforeStart => {
                self.end_unstarted(f.id, State::Cancelled, CANCELLED_UNSTARTED.into(), now, fx);
            }
            Outcome::Ran(res) => {
                let (state, out, err) = match res {
                    Ok(out) => (State::Ok, out, String::new()),
                    Err(HandlerError::Cancelled) => (
                        State::Cancelled,
                        Vec::new(),
                        "cancelled while running".into(),
                    ),
                    Err(e) => (State::Failed, Vec::new(), e.to_string()),
                };
                self.terminal(f.id, state, out, err, f.started, f.finished, now, fx);
            }
        }
        if cap_was_full {
            let n = self.queues[qid].pending;
            self.make_ready(qid, n, fx);
        }
        if bound.slot {
            self.offer_freed_slot(bound.cpu, bound.remote.is_some(), fx);
        }
        if ordered {
            if let Some(head) = self.ordered_head(wi) {
                if let Some(hq) = self.items.get(&head).map(Item::qid) {
                    self.make_ready(hq, 1, fx);
                }
            }
        }
        let q = &mut self.queues[qid];
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
        let Some(item) = self.items.get_mut(&id) else {
            return;
        };
        let (qid, wi) = (item.qid(), item.wi());
        item.state = State::Pending;
        let key = item.key.clone();
        let deadline = item.deadline();
        self.queues[qid].items.push_front(id);
        self.queues[qid].pending += 1;
        let wq = &mut self.wqs[wi];
        wq.pending += 1;
        if wq.attrs.ordered {
            wq.ordered.push_front(id);
        }
        if let Some(k) = key {
            wq.keys.entry(k).or_insert(id);
        }
        let reject = if self.queues[qid].eligible.is_empty()
            && self.wqs[wi].attrs.fallback == Fallback::Reject
        {
            Some(self.queues[qid].reason.clone())
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

    /// [`Sched::terminal`] for an item that never started: no output, no start or finish CPU.
    fn end_unstarted(
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
        let Some(item) = self.items.remove(&id) else {
            return;
        };
        // Its timers (a delay's, a deadline's) are garbage from now on.
        self.stale_timers +=
            usize::from(item.state == State::Delayed) + usize::from(item.deadline().is_some());
        self.totals[state.index()] += 1;
        self.uncount_waiting(&item);
        let wi = item.wi();
        let wq = &mut self.wqs[wi];
        wq.totals[state.index()] += 1;
        if let Some(k) = &item.key {
            if wq.keys.get(k) == Some(&id) {
                wq.keys.remove(k);
            }
        }
        if wq.draining && wq.live() == 0 {
            wq.draining = false;
        }
        let (cold_waiters, item_reason, decided, worker, lost) = match item.cold {
            Some(c) => (c.waiters, c.reason, c.decided, c.worker, c.lost),
            None => (Vec::new(), String::new(), 0, None, 0),
        };
        let (reason, decided) = if item_reason.is_empty() && state == State::Rejected {
            (error.clone(), self.epoch)
        } else {
            (item_reason, decided)
        };
        // A result's texts are bounded (limits.max_result_bytes): cut, saying so.
        let mut error = crate::quote::cap(error, self.max_result_bytes);
        let produced = output.len();
        let output = cut_output(output, self.max_result_bytes);
        if output.len() < produced && error.is_empty() {
            error = format!(
                "output cut from {produced} to {} bytes (limits.max_result_bytes)",
                output.len()
            );
        }
        let result = Arc::new(ItemResult {
            id,
            batch: item.batch,
            workqueue: wq.name.clone(),
            state,
            output,
            error,
            target: item.body.target.clone(),
            handler: item.body.handler_name().clone(),
            cpu_started: started.as_ref().map(|s| s.cpu),
            cpu_finished: finished.map(|f| f.0),
            fallback: item.fallback,
            reason,
            rebinds: item.rebinds,
            queued_at: item.queued_at,
            started_at: started.as_ref().map(|s| s.at),
            finished_at: Some(finished.map_or_else(SystemTime::now, |f| f.1)),
            epoch_started: started.map(|s| s.epoch),
            epoch_decided: (decided != 0).then_some(decided),
            worker,
            worker_lost: lost,
        });
        let first = (item.waiter != 0).then_some(item.waiter);
        for fid in first.into_iter().chain(cold_waiters) {
            if let Some(f) = self.flushes.get_mut(&fid) {
                match &f.tally {
                    Some(t) => t.lock().by_state[state.index()] += 1,
                    None => {
                        let _ = f.tx.send(FlushEvent::Done(result.clone()));
                    }
                }
                f.remaining -= 1;
                if f.remaining == 0 {
                    self.flushes.remove(&fid);
                }
            }
        }
        if let Some(b) = self.batches.get_mut(&item.batch) {
            b.live = b.live.saturating_sub(1);
        }
        if self.observed {
            fx.finished.push(result.clone());
        }
        self.results.insert(result, now);
        if self.shutdown {
            fx.idle_kick = true;
        }
        self.collect_timer_garbage();
    }

    /// Takes an item that left `items` out of its workqueue's and queue's delayed or pending
    /// count (a running item is counted out by `finish`).
    fn uncount_waiting(&mut self, item: &Item) {
        let (qid, wq) = (item.qid(), &mut self.wqs[item.wi()]);
        match item.state {
            State::Delayed => {
                wq.delayed -= 1;
                self.queues[qid].delayed -= 1;
            }
            State::Pending => {
                wq.pending -= 1;
                self.queues[qid].pending -= 1;
            }
            _ => {}
        }
    }

    /// Rebuilds the timer heap without its garbage once garbage is most of it, so the heap is
    /// bounded by the live items' timers (amortised O(1) per item).
    fn collect_timer_garbage(&mut self) {
        if self.stale_timers < 1024 || self.stale_timers * 2 < self.timers.len() {
            return;
        }
        let items = &self.items;
        self.timers.retain(|Reverse((_, kind, id))| {
            items.get(id).is_some_and(|it| match *kind {
                TIMER_DELAY => it.state == State::Delayed,
                _ => matches!(it.state, State::Delayed | State::Pending),
            })
        });
        self.stale_timers = 0;
    }

    /// Registers an idle worker so wake-ups find it.
    pub(crate) fn park(&mut self, cpu: u32, wid: u64, u: Unparker) {
        if let Some(p) = self.pools.get_mut(&cpu) {
            p.idle.push((wid, u));
        }
    }

    /// Removes a worker from its pool's idle list; returns whether it was still there (i.e.
    /// nobody woke it).
    pub(crate) fn unpark_self(&mut self, cpu: u32, wid: u64) -> bool {
        let Some(p) = self.pools.get_mut(&cpu) else {
            return false;
        };
        match p.idle.iter().position(|(w, _)| *w == wid) {
            Some(i) => {
                p.idle.swap_remove(i);
                true
            }
            None => false,
        }
    }

    /// Whether a worker of generation `gen` on `cpu` should keep going.
    pub(crate) fn worker_current(&self, cpu: u32, gen: u64) -> bool {
        !self.shutdown && self.pools.get(&cpu).is_some_and(|p| p.live && p.gen == gen)
    }

    /// Accounts for a worker leaving. `pin_failed` holds off respawning until the next epoch.
    pub(crate) fn worker_exit(&mut self, cpu: u32, gen: u64, pin_failed: bool) {
        let epoch = self.epoch;
        if let Some(p) = self.pools.get_mut(&cpu).filter(|p| p.gen == gen) {
            p.workers = p.workers.saturating_sub(1);
            if pin_failed {
                p.spawn_hold = Some((epoch, Instant::now() + SPAWN_HOLD));
            }
        }
    }

    /// Whether an idle worker may retire (another worker stays).
    pub(crate) fn may_retire(&self, cpu: u32, gen: u64) -> bool {
        self.pools
            .get(&cpu)
            .is_some_and(|p| p.gen == gen && p.workers > 1)
    }

    /// A worker of an old generation of `cpu` is leaving after it finished its jobs, which may
    /// have freed `max_active` slots the CPU's current workers are waiting for: wake one of
    /// them (or start one) if the pool has work, since the leaving worker will not rescan.
    ///
    /// Only a worker of an *older* generation hands off, and never during shutdown: a worker of
    /// the current generation leaves only because the engine stops, and handing off then
    /// would start a worker that leaves at once and hands off again, without end.
    pub(crate) fn hand_off(&mut self, cpu: u32, gen: u64, fx: &mut Effects) {
        if self.shutdown {
            return;
        }
        let (epoch, max) = (self.epoch, self.max_workers);
        let queues = &self.queues;
        let Some(p) = self.pools.get_mut(&cpu).filter(|p| {
            p.live
                && p.gen != gen
                && p.ready
                    .iter()
                    .any(|&q| queues.get(q).is_some_and(|q| q.pending > 0))
        }) else {
            return;
        };
        if let Some((_, u)) = p.idle.pop() {
            fx.unpark.push(u);
        } else if p.workers < max && p.may_spawn(epoch) {
            p.workers += 1;
            fx.spawn.push((cpu, p.gen));
        }
    }

    pub(crate) fn wake_everyone(&mut self, fx: &mut Effects) {
        for p in self.pools.values_mut() {
            fx.unpark.extend(p.idle.drain(..).map(|(_, u)| u));
        }
    }

    // ----- cancel, flush, results -----

    pub(crate) fn cancel(
        &mut self,
        ids: &[ItemId],
        fx: &mut Effects,
    ) -> Vec<(ItemId, CancelOutcome)> {
        let mut out = Vec::with_capacity(ids.len());
        let now = Instant::now();
        for &id in ids {
            let o = match self.items.get(&id) {
                Some(it) if it.state == State::Running => {
                    if let Some(b) = self.running.get(&id) {
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
                None => match self.results.map.get(&id) {
                    Some(r) => CancelOutcome::AlreadyTerminal(r.state),
                    None => CancelOutcome::Unknown,
                },
            };
            out.push((id, o));
        }
        out
    }

    pub(crate) fn scope_ids(&self, scope: &FlushScope) -> Result<Vec<ItemId>, EngineError> {
        match scope {
            FlushScope::Items(v) => {
                if let Some(&bad) = v.iter().find(|&&id| id == 0 || id >= self.next_item) {
                    return Err(EngineError::UnknownItem(bad));
                }
                Ok(v.clone())
            }
            FlushScope::Batch(b) => {
                let rec = self.batches.get(b).ok_or(EngineError::UnknownBatch(*b))?;
                Ok((rec.first..rec.first + rec.count as u64)
                    .filter(|id| rec.unused.binary_search(id).is_err())
                    .collect())
            }
            FlushScope::Workqueue(name) | FlushScope::WorkqueueAll(name) => {
                let wi = self.wq_index(name)?;
                let mut v: Vec<ItemId> = self
                    .items
                    .iter()
                    .filter(|(_, i)| i.wi() == wi)
                    .map(|(&id, _)| id)
                    .collect();
                v.sort_unstable();
                Ok(v)
            }
        }
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
        let is_delayed =
            |s: &Sched, id: &ItemId| s.items.get(id).is_some_and(|it| it.state == State::Delayed);
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

    /// Registers a flush over `ids`. With `summary_only`, no per-item events are sent: the
    /// flush's tally counts terminal states and `Flush::wait` reports them.
    pub(crate) fn register_flush(
        &mut self,
        inner: &Arc<Inner>,
        ids: Vec<ItemId>,
        summary_only: bool,
    ) -> Flush {
        let fid = self.next_flush;
        self.next_flush += 1;
        let (tx, rx) = flume::unbounded();
        let tally =
            summary_only.then(|| Arc::new(parking_lot::Mutex::new(super::Tally::default())));
        let mut remaining = 0;
        for &id in &ids {
            if let Some(it) = self.items.get_mut(&id) {
                it.add_waiter(fid);
                remaining += 1;
            } else if let Some(r) = self.results.map.get(&id) {
                match &tally {
                    Some(t) => t.lock().by_state[r.state.index()] += 1,
                    None => {
                        let _ = tx.send(FlushEvent::Done(r.clone()));
                    }
                }
            } else {
                match &tally {
                    Some(t) => t.lock().gone.push(id),
                    None => {
                        let _ = tx.send(FlushEvent::Gone(id));
                    }
                }
            }
        }
        let id = if remaining > 0 {
            self.flushes.insert(
                fid,
                FlushRec {
                    tx,
                    remaining,
                    tally: tally.clone(),
                },
            );
            Some(fid)
        } else {
            None
        };
        Flush {
            inner: inner.clone(),
            id,
            rx,
            covered: ids.len(),
            delayed_not_covered: 0,
            began: Instant::now(),
            tally,
        }
    }

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

    // ----- topology -----

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
        inner.topo_seq.fetch_add(1, Ordering::AcqRel);
        for c in gone.iter() {
            if let Some(p) = self.pools.get_mut(&c) {
                p.live = false;
                p.gen += 1;
                p.workers = 0;
                fx.unpark.extend(p.idle.drain(..).map(|(_, u)| u));
                // Attached workers' slots of this CPU stay parked in `idle_slots`: they are
                // woken when it is live again and a queue becomes ready on it.
                for qid in p.ready.drain(..).chain(p.remote_ready.drain(..)) {
                    if let Some(q) = self.queues.get_mut(qid) {
                        q.in_ready.remove(c);
                    }
                }
            }
            if let Some(f) = inner.pool_live.get(c as usize) {
                f.store(false, Ordering::Release);
            }
        }
        let eager = new_live.len() <= 256 && !self.shutdown;
        for c in came.iter() {
            let Some(flag) = inner.pool_live.get(c as usize) else {
                continue;
            };
            let p = self.pools.entry(c).or_insert_with(|| Pool::new(now));
            p.live = true;
            p.gen += 1;
            p.workers = 0;
            p.last_progress = now;
            p.lockup_reported = false;
            if eager {
                p.workers = 1;
                fx.spawn.push((c, p.gen));
            }
            flag.store(true, Ordering::Release);
        }
        self.epoch = snap.epoch;
        self.live = new_live;
        self.snapshot = snap.clone();
        inner.epoch.store(snap.epoch, Ordering::Release);
        inner.topo_seq.fetch_add(1, Ordering::Release);
        let qids: Vec<usize> = self.queues.iter().map(|(k, _)| k).collect();
        for qid in qids {
            self.resolve_queue(qid, fx);
        }
        if !gone.is_empty() || !came.is_empty() {
            tracing::info!(epoch = snap.epoch, live = %self.live, gone = %gone, came = %came, "topology applied");
        }
    }

    // ----- timers and housekeeping -----

    pub(crate) fn next_timer(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((at, _, _))| *at)
    }

    pub(crate) fn fire_timers(&mut self, now: Instant, fx: &mut Effects) {
        while let Some(&Reverse((at, kind, id))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            let Some(state) = self.items.get(&id).map(|i| i.state) else {
                self.stale_timers = self.stale_timers.saturating_sub(1);
                continue;
            };
            match (kind, state) {
                (TIMER_DELAY, State::Delayed) => self.undelay(id, fx),
                (TIMER_DEADLINE, State::Delayed | State::Pending) => {
                    self.end_unstarted(id, State::Expired, EXPIRED_UNSTARTED.into(), now, fx);
                }
                _ => self.stale_timers = self.stale_timers.saturating_sub(1),
            }
        }
    }

    /// Moves a delayed item into its queue now (its delay passed, or a flush covers it).
    fn undelay(&mut self, id: ItemId, fx: &mut Effects) {
        let Some(qid) = self
            .items
            .get(&id)
            .filter(|i| i.state == State::Delayed)
            .map(Item::qid)
        else {
            return;
        };
        self.wqs[self.queues[qid].wq].delayed -= 1;
        self.queues[qid].delayed -= 1;
        self.enqueue(id, fx);
        self.make_ready(qid, 1, fx);
    }

    pub(crate) fn housekeeping(&mut self, now: Instant, fx: &mut Effects) {
        self.results.expire(now);
        // A live pool with work and no worker (its last one could not pin) gets a new one once
        // its hold-off has passed.
        let epoch = self.epoch;
        for (&cpu, p) in self.pools.iter_mut() {
            let has_work = p
                .ready
                .iter()
                .any(|&q| self.queues.get(q).is_some_and(|q| q.pending > 0));
            if p.live && p.workers == 0 && has_work && p.may_spawn(epoch) && !self.shutdown {
                p.workers = 1;
                fx.spawn.push((cpu, p.gen));
            }
        }
        let ttl = self.results.ttl;
        while let Some(&b) = self.batch_order.front() {
            let Some(rec) = self.batches.get(&b) else {
                self.batch_order.pop_front();
                continue;
            };
            if rec.live > 0 || now.duration_since(rec.created) < ttl {
                break;
            }
            self.batches.remove(&b);
            self.batch_order.pop_front();
        }
        let idle: Vec<usize> = self
            .queues
            .iter()
            .filter(|(_, q)| {
                q.pending == 0
                    && q.running == 0
                    && q.delayed == 0
                    && q.idle_since
                        .is_some_and(|t| now.duration_since(t) > Duration::from_secs(60))
            })
            .map(|(k, _)| k)
            .collect();
        for qid in idle {
            self.remove_queue(qid);
        }
    }

    /// The watchdog's look: pools with runnable work and no progress for `thresh` are
    /// reported once per stall; items running longer than `hog` once each.
    /// Returns the reports made: (`true` for a lockup, `false` for a hog, cpu).
    pub(crate) fn watchdog(
        &mut self,
        now: Instant,
        thresh: Duration,
        hog: Duration,
    ) -> Vec<(bool, u32)> {
        let mut reports = Vec::new();
        if !thresh.is_zero() {
            let mut stuck = Vec::new();
            for (&cpu, p) in &self.pools {
                let runnable = p.ready.iter().any(|&q| {
                    self.queues
                        .get(q)
                        .is_some_and(|q| q.pending > 0 && q.eligible.contains(cpu))
                });
                let stalled = now.duration_since(p.last_progress);
                if p.live && runnable && !p.lockup_reported && stalled >= thresh {
                    stuck.push((cpu, stalled));
                }
            }
            for (cpu, stalled) in stuck {
                let busy: Vec<String> = self
                    .wqs
                    .iter()
                    .filter(|(_, w)| w.running_on.get(&cpu).is_some_and(|s| s[0] + s[1] > 0))
                    .map(|(_, w)| {
                        let s = w.running_on.get(&cpu).copied().unwrap_or_default();
                        format!("{} (active={} pending={})", w.name, s[0] + s[1], w.pending)
                    })
                    .collect();
                let running: Vec<String> = self
                    .running
                    .iter()
                    .filter(|(_, b)| b.cpu == cpu)
                    .filter_map(|(id, _)| self.items.get(id).map(|i| (id, i)))
                    .map(|(id, i)| {
                        format!("item {id} {} on {}", i.body.handler_name(), i.body.target)
                    })
                    .collect();
                tracing::error!(
                    "BUG: wqd lockup - pool cpus={cpu} stuck for {}s! busy workqueues: [{}]; running: [{}]",
                    stalled.as_secs(),
                    busy.join(", "),
                    running.join(", ")
                );
                self.lockups += 1;
                reports.push((true, cpu));
                if let Some(p) = self.pools.get_mut(&cpu) {
                    p.lockup_reported = true;
                }
            }
        }
        if !hog.is_zero() {
            for (&id, b) in self.running.iter_mut() {
                let Some(it) = self.items.get(&id) else {
                    continue;
                };
                let ran = now.duration_since(b.at);
                if !b.hog_reported && ran >= hog {
                    b.hog_reported = true;
                    tracing::warn!(
                        "wqd: item {} ({} on {}) hogged cpu {} for {}ms",
                        id,
                        it.body.handler_name(),
                        it.body.target,
                        b.cpu,
                        ran.as_millis()
                    );
                    self.hogs += 1;
                    reports.push((false, b.cpu));
                }
            }
        }
        reports
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The engine ranks with `groups::Ranking`: a CPU whose host load is unknown (NaN, here
    /// with the sign bit set, as 0.0 / 0.0 gives on x86) comes last, equal loads go to the
    /// lowest CPU. Its own sort (`total_cmp`) once put a negative NaN first.
    #[test]
    fn idle_takers_put_an_unknown_load_last_and_break_ties_by_cpu() {
        use crate::topology::{AllowedSource, Topology};
        let all = CpuSet::range(0, 3);
        let topo = Topology {
            possible: all.clone(),
            present: all.clone(),
            online: all.clone(),
            isolated: CpuSet::new(),
            allowed: all.clone(),
            allowed_source: AllowedSource::AllOnline,
            cpus: BTreeMap::new(),
            nodes: BTreeMap::new(),
        };
        let groups = crate::groups::GroupMap::build(&topo, &Default::default());
        let snap = Arc::new(Snapshot {
            epoch: 1,
            topology: Arc::new(topo),
            groups: Arc::new(groups),
            live: all.clone(),
            source: crate::live::Source::Manual,
            at: SystemTime::now(),
        });
        let load: super::super::LoadHook = Arc::new(|cpu| match cpu {
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
            s.takers(qid, &mut order);
            assert_eq!(order.as_slice(), want, "{placement}");
        }
    }

    /// One `Item` per pending item, in a hash map: its size is most of the engine's memory
    /// per pending item (target: at most 256 bytes all told, see docs/benchmarks.md).
    #[test]
    fn item_stays_small() {
        assert!(
            std::mem::size_of::<Item>() <= 80,
            "Item grew to {} bytes",
            std::mem::size_of::<Item>()
        );
    }
}
