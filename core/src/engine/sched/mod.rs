//! The scheduler state: every item, queue, pool and flush, behind the engine's one lock.
//!
//! Every state transition of an item happens here, under `Inner::sched`: submit (→ delayed or
//! pending), bind (pending → running, by a worker of a live CPU), hand back (running → pending,
//! when the worker's start check fails), finish and cancel/expire/reject (→ terminal). Each
//! terminal transition goes through [`Sched::terminal`] and removes the item from `items`, so
//! it can happen once only. Wake-ups and thread spawns decided under the lock are collected in
//! [`Effects`] and carried out after it is released.
//!
//! This file holds the state, [`Sched`], its constructor and [`Effects`]. Each concern is an
//! `impl Sched` block in a file of its own:
//!
//! | file | concern |
//! |---|---|
//! | `item.rs` | what an item is: [`ItemId`], bodies, the live item record, a worker's claim, jobs and how they end |
//! | `workqueue.rs` | workqueues: create, update, delete, drain, per-workqueue stats |
//! | `queue.rs` | queues and pools, and placement: resolving eligible CPUs and fallbacks, ranking takers, limits, ready lists and wake-ups, enqueue |
//! | `submit.rs` | submit's two passes, the roll-back of a panicking batch, batch records |
//! | `take.rs` | take and bind (pending → running), the batched take |
//! | `finish.rs` | finish, hand-back and requeue, and `terminal`, the one way out |
//! | `flush.rs` | cancel, flush scopes, flush registration |
//! | `results.rs` | the bounded result store and result look-ups |
//! | `topology.rs` | applying a topology snapshot (the seqlock's writer) |
//! | `timers.rs` | delays, deadlines, housekeeping, the timer heap's garbage |
//! | `stalls.rs` | the watchdog's look (lockups and CPU hogs); the thread is `engine/watchdog.rs` |
//! | `workers.rs` | worker threads: park, go on, exit, retire, hand off |
//! | `stats.rs` | engine-wide stats and the running items |
//! | `remote.rs` | attached workers: their slots, credits, answers and loss |
//! | `shared.rs` | a worker's hold under shared L: finish, take, park |
//! | `shared_submit.rs` | the plain submit under shared L, and its `make_ready` |
//!
//! The protocol they implement together is `engine/README.md`.
//!
//! Lock invariant: all of it is under `Inner::sched` (L), a reader-writer lock. Every path
//! holds L exclusive except a worker's hold (`shared.rs`) and a plain submit
//! (`shared_submit.rs`), which hold it shared; so every field of `Sched`, and of every record
//! it holds, is read and written only with L held. The pieces a shared hold writes — each pool
//! (P), queue (Q) and workqueue, the item table, the flushes, the batches and their order, the
//! totals — are each behind a lock of their own, which a shared hold takes (in that order) and
//! an exclusive holder does not need (`Mutex::get_mut`: it excludes every shared hold); the
//! next id, batch and flush, the round-robin counter and the shared submits' count are atomics
//! (`get_mut` under exclusive L); every other field changes only under exclusive L. The result
//! store has its own lock R, taken inside L (`results.rs`). No method here blocks, and
//! whatever must happen outside L (unparking, spawning, notifying) is returned in [`Effects`].
//! `Pool::live` mirrors `Inner::pool_live`, which is written only by `topology.rs`, under L
//! inside the topology seqlock. The fields are private to this module:
//! its files see them, the rest of the engine goes through methods.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::engine::lock::Mutex;
use slab::Slab;

use super::idhash::IdMap;
use super::items::Items;
use super::worker::Wake;
use super::{Ended, EngineConfig, Inner};
use crate::cpuset::CpuSet;
use crate::groups::Ranking;
use crate::live::Snapshot;

mod finish;
mod flush;
mod item;
mod queue;
mod results;
mod shared;
mod shared_submit;
mod stalls;
mod stats;
mod submit;
mod take;
mod timers;
mod topology;
mod workers;
mod workqueue;

pub(crate) mod remote;

pub(crate) use finish::{Finished, NOT_LIVE};
pub(crate) use flush::{Delivery, EndedCounts, FlushRec, Kept};
pub use item::ItemId;
#[cfg(test)]
pub(crate) use item::NOT_BOUND;
pub(crate) use item::{Body, Entry, Finish, HandlerRef, Item, Job, Outcome, Started};
pub(crate) use results::{Made as ResultsMade, Store as ResultStore, Stored};
pub(crate) use shared::{Holder, SharedHold};
pub(crate) use shared_submit::WithFlush;

use queue::{Pools, Queue};
use results::Results;
use submit::BatchRec;
use workqueue::Wq;

/// Side effects decided under the lock, carried out after it is released.
#[derive(Default)]
pub(crate) struct Effects {
    /// Terminal items for the observer (only collected when there is one).
    finished: Vec<Ended>,
    rebound: Vec<&'static str>,
    submitted: Option<(Arc<str>, usize)>,
    unpark: Vec<Arc<Wake>>,
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
            if !self.finished.is_empty() {
                o.finished_all(&self.finished);
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

/// The scheduler state (see the module docs).
pub(crate) struct Sched {
    epoch: u64,
    live: CpuSet,
    pub snapshot: Arc<Snapshot>,
    wqs: Slab<Mutex<Wq>>,
    wq_names: HashMap<String, usize>,
    queues: Slab<Mutex<Queue>>,
    pub items: Mutex<Items>,
    /// The next id, batch and flush: atomics, since a submit under shared L takes them
    /// (`shared_submit.rs`; a batch's ids inside the item table's hold); `get_mut` under
    /// exclusive L.
    next_item: AtomicU64,
    next_batch: AtomicU64,
    next_flush: AtomicU64,
    batches: Mutex<IdMap<u64, BatchRec>>,
    batch_order: Mutex<VecDeque<u64>>,
    pools: Pools,
    pub flushes: Mutex<IdMap<u64, FlushRec>>,
    /// Set while [`Sched::finish_all`] runs: flush events are held in their records.
    holding: bool,
    /// Flushes holding events (see `holding`).
    held_flushes: Vec<u64>,
    /// While `holding`: the finish batch's full results, made under L and stored after it.
    fin: Finished,
    /// The result store, behind its own lock R (taken inside L; see `results.rs`).
    results: results::Store,
    timers: BinaryHeap<Reverse<(Instant, u8, ItemId)>>,
    pub shutdown: bool,
    rr: AtomicU64,
    /// Batches [`Sched::submit_shared`] accepted (`EngineStats::shared_submits`).
    shared_submits: AtomicU64,
    /// The buffers [`Sched::make_ready`] ranks takers into (kept so ranking allocates nothing).
    ranking: Ranking,
    max_workers: usize,
    /// A queue empty this long is dropped (the engine's `worker_idle`).
    queue_idle: Duration,
    rebinds: BTreeMap<&'static str, u64>,
    fallbacks: BTreeMap<String, u64>,
    lockups: u64,
    hogs: u64,
    load: Option<super::LoadHook>,
    /// The engine's `wake_local` ([`queue::local_first`]).
    wake_local: bool,
    observed: bool,
    /// Terminal items by state since start, over every workqueue ever (never go down).
    totals: Mutex<[u64; 8]>,
    max_delay: Duration,
    max_deadline: Duration,
    max_result_bytes: usize,
    /// Timer-heap entries whose item ended or left the state the timer was for; the heap is
    /// rebuilt when they are more than half of it (see [`Sched::collect_timer_garbage`]).
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
            items: Mutex::new(Items::default()),
            next_item: AtomicU64::new(1),
            next_batch: AtomicU64::new(1),
            next_flush: AtomicU64::new(1),
            batches: Mutex::new(IdMap::default()),
            batch_order: Mutex::new(VecDeque::new()),
            pools: Pools::default(),
            flushes: Mutex::new(IdMap::default()),
            holding: false,
            held_flushes: Vec::new(),
            fin: Finished::default(),
            results: Arc::new(Mutex::new(Results::new(
                cfg.results_max,
                cfg.results_ttl,
                cfg.results_memory,
            ))),
            timers: BinaryHeap::new(),
            shutdown: false,
            rr: AtomicU64::new(0),
            shared_submits: AtomicU64::new(0),
            ranking: Ranking::new(),
            max_workers: cfg.max_workers_per_cpu.max(1),
            queue_idle: cfg.worker_idle,
            rebinds: BTreeMap::new(),
            fallbacks: BTreeMap::new(),
            lockups: 0,
            hogs: 0,
            load: cfg.load.clone(),
            wake_local: cfg.wake_local,
            observed: cfg.observer.is_some(),
            totals: Mutex::new([0; 8]),
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

    pub(crate) fn set_max_durations(&mut self, max_delay: Duration, max_deadline: Duration) {
        self.max_delay = max_delay;
        self.max_deadline = max_deadline;
    }
}
