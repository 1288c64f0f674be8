//! Attached workers: processes that serve handlers of their own over `WorkerService.Attach`,
//! as the scheduler sees them, and the [`RemoteWorker`] handle the RPC layer drives.
//!
//! An attached worker opens *slots*, each one of its threads pinned to one CPU, and gives each
//! slot credits. A slot with credits takes items exactly as a worker thread of its CPU does
//! ([`Sched::take_from`]: under L, only from queues eligible on its CPU while that CPU is live
//! in the current epoch, within the workqueue's limits), but only from the queues of handler
//! names its worker serves (those queues sit on the pools' `remote_ready` lists, never on
//! `ready`, so this process's workers never take them). A slot without work parks in its
//! CPU's pool (`idle_slots`) and is woken by `make_ready` like a worker thread, through the
//! worker's [`RemoteSink`].
//!
//! Invariants: a slot is never sent more items than its credits (clamped to `max_credits`);
//! an item sent to a worker is in exactly one worker's `held` map until that worker answers
//! for it ([`RemoteWorker::answer`]: only once, only the worker that holds it) or is lost
//! ([`RemoteWorker::detach`]), and both paths end in [`Sched::finish`], so the item reaches one
//! terminal state or goes back to its queue — never both, never neither.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use super::item::NOT_BOUND;
use super::{Effects, Finish, Outcome, Sched, Started};
use crate::engine::{EngineError, Inner, ItemId, RemoteSink, WorkerRef};
use crate::handler::{Args, CancelToken, HandlerError};

/// Most handler names one worker may serve.
pub const MAX_HANDLERS: usize = 64;
/// Most slots one worker may open.
pub const MAX_SLOTS: usize = 4096;
/// Longest handler name, in bytes.
pub const MAX_NAME: usize = 128;
/// Most distinct attached-worker handler names the engine remembers (names a submit may use
/// before a worker serving them attaches: those ever served, and those declared in config).
pub const MAX_KNOWN: usize = 4096;

/// Who an attached worker is, for `ListWorkers` and the logs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkerMeta {
    pub pid: u32,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub cert_names: Vec<String>,
    pub name: String,
}

/// An attached worker as the scheduler keeps it.
pub(crate) struct RemoteRec {
    pub sink: Arc<dyn RemoteSink>,
    /// The handler names it serves, sorted.
    pub handlers: Arc<[Arc<str>]>,
    pub meta: WorkerMeta,
    pub attached: Instant,
    pub slots: BTreeMap<u32, SlotRec>,
    /// Items sent to it and not answered yet.
    pub held: BTreeMap<ItemId, Held>,
    pub done: u64,
    pub handed_back: u64,
}

pub(crate) struct SlotRec {
    pub cpu: u32,
    pub credits: u32,
    pub in_flight: u32,
    pub done: u64,
    /// In its CPU's pool's `idle_slots`.
    pub parked: bool,
    pub closed: bool,
}

/// An item a worker holds: where and when it was sent (its start, as far as the daemon sees).
pub(crate) struct Held {
    pub slot: u32,
    pub cpu: u32,
    pub at: SystemTime,
    pub epoch: u64,
}

/// One item sent to a slot.
#[derive(Debug, Clone)]
pub struct RemoteJob {
    pub id: ItemId,
    pub slot: u32,
    pub cpu: u32,
    pub epoch: u64,
    pub handler: Arc<str>,
    pub args: Args,
    pub payload: Vec<u8>,
    pub batch: u64,
    pub workqueue: Arc<str>,
    pub rebinds: u32,
    /// Times a worker was lost holding it before (`on_worker_lost = requeue`).
    pub attempt: u32,
}

/// How a worker answered for an item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoteAnswer {
    Ok(Vec<u8>),
    Failed(String),
    Cancelled,
    /// Not started; back to its queue (`affinity`, `stopping`, ...).
    HandBack(String),
}

/// A slot as `ListWorkers` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotInfo {
    pub slot: u32,
    pub cpu: u32,
    pub credits: u32,
    pub in_flight: u32,
    pub done: u64,
    pub closed: bool,
    pub live: bool,
}

/// An attached worker as `ListWorkers` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteInfo {
    pub id: u64,
    pub meta: WorkerMeta,
    pub handlers: Vec<String>,
    pub slots: Vec<SlotInfo>,
    pub attached_for: std::time::Duration,
    pub done: u64,
    pub handed_back: u64,
}

/// Checks one handler name a worker wants to serve (format only; shadowing is checked
/// against the registry by the caller).
///
/// # Errors
/// A message saying what is wrong with the name.
pub fn check_name(h: &str) -> Result<(), String> {
    let ok = !h.is_empty()
        && h.len() <= MAX_NAME
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'/' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "handler name {} must be 1-{MAX_NAME} bytes of [A-Za-z0-9._:/-]",
            crate::quote::quote(h)
        ))
    }
}

/// The reason a hand-back from a worker is counted under (a metric label).
fn handback_word(reason: &str) -> &'static str {
    match reason {
        "affinity" => "affinity",
        "stopping" => "stopping",
        _ => "worker",
    }
}

impl Sched {
    /// Why queue `qid`'s items are rejected for want of a worker: it is a queue of an
    /// attached-worker handler that no attached worker serves now, and its workqueue's
    /// `unserved` policy is `reject`. `None` otherwise.
    pub(crate) fn unserved(&mut self, qid: usize) -> Option<String> {
        let q = self.queues[qid].get_mut();
        let h = q.remote.as_ref()?;
        if self.wqs[q.wq].get_mut().attrs.unserved != crate::engine::Unserved::Reject
            || self.served.get(h).is_some_and(|&n| n > 0)
        {
            return None;
        }
        Some(format!(
            "no attached worker serves handler {} and the workqueue's unserved policy is reject",
            crate::quote::quote(h)
        ))
    }

    /// `make_ready` for a queue of attached-worker handler `h`: wakes up to `n` parked slots
    /// serving `h`, one per CPU, in placement order, on CPUs whose limits let them start the
    /// head now.
    pub(crate) fn wake_slots(
        &mut self,
        qid: usize,
        h: &Arc<str>,
        takers: &[u32],
        n: usize,
        fx: &mut Effects,
    ) -> usize {
        let mut woken = 0;
        for &c in takers {
            if woken >= n {
                break;
            }
            if !self.limits_allow(qid, c) {
                continue;
            }
            let remotes = &self.remotes;
            let Some(p) = self.pools.get_mut(&c).filter(|p| p.live) else {
                continue;
            };
            let Some(i) = p
                .idle_slots
                .iter()
                .position(|(w, _)| remotes.get(w).is_some_and(|r| r.handlers.contains(h)))
            else {
                continue;
            };
            let (w, slot) = p.idle_slots.swap_remove(i);
            if let Some(r) = self.remotes.get_mut(&w) {
                if let Some(s) = r.slots.get_mut(&slot) {
                    s.parked = false;
                }
                if !fx.remote_wake.iter().any(|(id, _)| *id == w) {
                    fx.remote_wake.push((w, r.sink.clone()));
                }
            }
            woken += 1;
        }
        woken
    }

    /// An item that held a `max_active` slot of `cpu` ended. A worker thread that finishes
    /// one loops back into `take` for the queues on its pool's `ready` list, but nobody does
    /// that for the other kind of taker: when a thread's item ends, parked slots waiting for
    /// that `max_active` slot are woken here; when an attached worker's item ends, a worker
    /// thread (or another worker's slot) is. Cheap when nothing else waits: a pool without
    /// remote queues costs one emptiness test per finish.
    pub(crate) fn offer_freed_slot(&mut self, cpu: u32, remote_finished: bool, fx: &mut Effects) {
        let Some(p) = self.pools.get_mut(&cpu).filter(|p| p.live) else {
            return;
        };
        if p.remote_ready.is_empty() && !remote_finished {
            return;
        }
        let remote: Vec<usize> = p.remote_ready.iter().copied().collect();
        let local: Vec<usize> = if remote_finished {
            p.ready.iter().copied().collect()
        } else {
            Vec::new()
        };
        let startable = |s: &mut Sched, qid: usize| {
            s.queues.contains(qid) && {
                s.clean_front(qid);
                s.queues[qid].get_mut().pending > 0
                    && s.may_take(qid, cpu)
                    && s.limits_allow(qid, cpu)
            }
        };
        for qid in local {
            if !startable(self, qid) {
                continue;
            }
            self.call_worker_for(qid, cpu, fx);
            break;
        }
        for qid in remote {
            if !startable(self, qid) {
                continue;
            }
            let Some(h) = self.queues[qid].get_mut().remote.clone() else {
                continue;
            };
            if self.wake_slots(qid, &h, &[cpu], 1, fx) > 0 {
                break;
            }
        }
    }

    fn attach(
        &mut self,
        meta: WorkerMeta,
        handlers: Arc<[Arc<str>]>,
        sink: Arc<dyn RemoteSink>,
        now: Instant,
    ) -> u64 {
        let id = self.next_remote;
        self.next_remote += 1;
        for h in handlers.iter() {
            *self.served.entry(h.clone()).or_default() += 1;
        }
        self.remotes.insert(
            id,
            RemoteRec {
                sink,
                handlers,
                meta,
                attached: now,
                slots: BTreeMap::new(),
                held: BTreeMap::new(),
                done: 0,
                handed_back: 0,
            },
        );
        id
    }

    fn open_slot(&mut self, w: u64, slot: u32, cpu: u32, now: Instant) -> Result<(), String> {
        if !self.snapshot.topology.possible.contains(cpu) {
            return Err(format!(
                "slot {slot}: cpu {cpu} is not a CPU of this machine (possible: {})",
                self.snapshot.topology.possible
            ));
        }
        let rec = self.remotes.get_mut(&w).ok_or("the worker is detached")?;
        if rec.slots.len() >= MAX_SLOTS {
            return Err(format!("a worker may open at most {MAX_SLOTS} slots"));
        }
        if rec.slots.contains_key(&slot) {
            return Err(format!("slot {slot} is already open"));
        }
        rec.slots.insert(
            slot,
            SlotRec {
                cpu,
                credits: 0,
                in_flight: 0,
                done: 0,
                parked: false,
                closed: false,
            },
        );
        self.pools
            .get_or_insert_with(cpu, || super::queue::Pool::new(now));
        Ok(())
    }

    fn credit(&mut self, w: u64, slot: u32, n: u32) -> Result<(), String> {
        let max = self.max_credits;
        let rec = self.remotes.get_mut(&w).ok_or("the worker is detached")?;
        let s = rec
            .slots
            .get_mut(&slot)
            .ok_or_else(|| format!("credit for slot {slot}, which is not open"))?;
        if s.closed {
            return Err(format!("credit for slot {slot}, which is closed"));
        }
        // Credits count items the slot may hold: held ones use theirs up.
        s.credits = s
            .credits
            .saturating_add(n)
            .min(max.saturating_sub(s.in_flight));
        Ok(())
    }

    /// Binds up to each slot's credits of work to the slots of worker `w`, appending what it
    /// sends to `out`; parks the slots that still have credits.
    fn remote_take(&mut self, w: u64, now: Instant, fx: &mut Effects, out: &mut Vec<RemoteJob>) {
        let Some(rec) = self.remotes.get(&w) else {
            return;
        };
        let handlers = rec.handlers.clone();
        let (pid, slots): (u32, Vec<(u32, u32)>) = (
            rec.meta.pid,
            rec.slots
                .iter()
                .filter(|(_, s)| !s.closed && s.credits > 0)
                .map(|(&k, s)| (k, s.cpu))
                .collect(),
        );
        let wall = SystemTime::now();
        for (slot, cpu) in slots {
            loop {
                let credits = self
                    .remotes
                    .get(&w)
                    .and_then(|r| r.slots.get(&slot))
                    .map_or(0, |s| s.credits);
                if credits == 0 {
                    break;
                }
                // A fresh token per item: a cancel raised while the worker holds it makes a
                // hand-back or a loss end it cancelled (`Sched::finish`).
                let token = CancelToken::new();
                let Some(job) = self.take_from(cpu, Some(&handlers), &token, now, fx) else {
                    break;
                };
                let epoch = job.epoch;
                // A taken job has its own body (only jobs claimed behind another share one);
                // the item's is the same.
                let Some(body) = job
                    .body
                    .clone()
                    .or_else(|| self.items.get_mut().get(&job.id).map(|it| it.body.clone()))
                else {
                    continue;
                };
                if let Some(b) = self.bound_mut(job.id) {
                    b.remote = Some((w, slot));
                }
                let (rebinds, attempt) = match self.items.get_mut().get_mut(&job.id) {
                    Some(it) => {
                        let rebinds = it.rebinds.into();
                        let c = it.cold();
                        c.worker = Some(WorkerRef {
                            worker: w,
                            pid,
                            slot,
                        });
                        (rebinds, c.lost)
                    }
                    None => (0, 0),
                };
                let wq = self.wqs[self.queues[job.queue].get_mut().wq]
                    .get_mut()
                    .name
                    .clone();
                if self.observed {
                    let waited = wall.duration_since(job.queued_at).unwrap_or_default();
                    fx.started.push((wq.clone(), cpu, waited));
                }
                if let Some(r) = self.remotes.get_mut(&w) {
                    r.held.insert(
                        job.id,
                        Held {
                            slot,
                            cpu,
                            at: wall,
                            epoch,
                        },
                    );
                    if let Some(s) = r.slots.get_mut(&slot) {
                        s.credits -= 1;
                        s.in_flight += 1;
                    }
                }
                out.push(RemoteJob {
                    id: job.id,
                    slot,
                    cpu,
                    epoch,
                    handler: body.handler_name().clone(),
                    args: body.args().clone(),
                    payload: body.payload().to_vec(),
                    batch: self.items.get_mut().get(&job.id).map_or(0, |it| it.batch),
                    workqueue: wq,
                    rebinds,
                    attempt,
                });
            }
            self.park_slot(w, slot);
        }
    }

    /// Parks slot `slot` of worker `w` in its CPU's pool when it has credits left (so a queue
    /// becoming ready wakes it), and unparks it when it has none.
    fn park_slot(&mut self, w: u64, slot: u32) {
        let Some(s) = self
            .remotes
            .get_mut(&w)
            .and_then(|r| r.slots.get_mut(&slot))
        else {
            return;
        };
        let want = s.credits > 0 && !s.closed;
        if want == s.parked {
            return;
        }
        s.parked = want;
        let cpu = s.cpu;
        if let Some(p) = self.pools.get_mut(&cpu) {
            if want {
                p.idle_slots.push((w, slot));
            } else {
                p.idle_slots.retain(|&x| x != (w, slot));
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn answer(
        &mut self,
        w: u64,
        id: ItemId,
        answer: RemoteAnswer,
        cpu_finished: Option<u32>,
        credits: u32,
        now: Instant,
        fx: &mut Effects,
    ) -> Result<(), String> {
        let rec = self.remotes.get_mut(&w).ok_or("the worker is detached")?;
        let held = rec.held.remove(&id).ok_or_else(|| {
            format!("an answer for item {id}, which this worker does not hold (never sent to it, or answered already)")
        })?;
        let handback = matches!(answer, RemoteAnswer::HandBack(_));
        if handback {
            rec.handed_back += 1;
        } else {
            rec.done += 1;
        }
        if let Some(s) = rec.slots.get_mut(&held.slot) {
            s.in_flight -= 1;
            if !handback {
                s.done += 1;
            }
        }
        let started = Started {
            cpu: held.cpu,
            at: held.at,
            epoch: held.epoch,
        };
        let ran = |r: Result<Vec<u8>, HandlerError>| Finish {
            id,
            claim: NOT_BOUND,
            outcome: Outcome::Ran(r),
            started: Some(started),
            finished: Some((cpu_finished.unwrap_or(held.cpu), SystemTime::now())),
        };
        let f = match answer {
            RemoteAnswer::Ok(out) => ran(Ok(out)),
            RemoteAnswer::Failed(e) => ran(Err(HandlerError::Failed(e))),
            RemoteAnswer::Cancelled => ran(Err(HandlerError::Cancelled)),
            RemoteAnswer::HandBack(why) => Finish::handback(id, handback_word(&why)),
        };
        self.finish(f, now, fx);
        // Credits that ride on an answer for a slot closed meanwhile are moot, not an error.
        let open = self
            .remotes
            .get(&w)
            .and_then(|r| r.slots.get(&held.slot))
            .is_some_and(|s| !s.closed);
        if credits > 0 && open {
            self.credit(w, held.slot, credits)?;
        }
        Ok(())
    }

    fn close_slot(&mut self, w: u64, slot: u32) -> Result<(), String> {
        let rec = self.remotes.get_mut(&w).ok_or("the worker is detached")?;
        let s = rec
            .slots
            .get_mut(&slot)
            .ok_or_else(|| format!("close of slot {slot}, which is not open"))?;
        s.closed = true;
        s.credits = 0;
        self.park_slot(w, slot);
        Ok(())
    }

    /// Worker `w` is gone: its slots leave their pools, every item it holds is lost (`why`),
    /// and the handler names nobody serves any more reject what their workqueues say to.
    fn detach(&mut self, w: u64, why: &str, now: Instant, fx: &mut Effects) {
        let Some(rec) = self.remotes.remove(&w) else {
            return;
        };
        for (&slot, s) in &rec.slots {
            if s.parked {
                if let Some(p) = self.pools.get_mut(&s.cpu) {
                    p.idle_slots.retain(|&x| x != (w, slot));
                }
            }
        }
        if !rec.held.is_empty() {
            self.remote_lost.0 += 1;
            self.remote_lost.1 += rec.held.len() as u64;
            tracing::warn!(worker = w, pid = rec.meta.pid, items = rec.held.len(), %why, "attached worker lost holding items");
        }
        for (id, h) in rec.held {
            let f = Finish {
                id,
                claim: NOT_BOUND,
                outcome: Outcome::Lost(why.to_string()),
                started: Some(Started {
                    cpu: h.cpu,
                    at: h.at,
                    epoch: h.epoch,
                }),
                finished: None,
            };
            self.finish(f, now, fx);
        }
        let mut unserved = Vec::new();
        for h in rec.handlers.iter() {
            if let Some(n) = self.served.get_mut(h) {
                *n -= 1;
                if *n == 0 {
                    self.served.remove(h);
                    unserved.push(h.clone());
                }
            }
        }
        if unserved.is_empty() {
            return;
        }
        let qids: Vec<usize> = self
            .queues
            .iter_mut()
            .filter_map(|(k, q)| {
                let q = q.get_mut();
                (q.pending > 0 && q.remote.as_ref().is_some_and(|h| unserved.contains(h)))
                    .then_some(k)
            })
            .collect();
        for qid in qids {
            let Some(reason) = self.unserved(qid) else {
                continue;
            };
            let ids: Vec<ItemId> = self.queues[qid].get_mut().items.iter().copied().collect();
            for id in ids {
                if self.is_pending_in(id, qid) {
                    self.end_unstarted(id, crate::engine::State::Rejected, reason.clone(), now, fx);
                }
            }
        }
    }

    fn remote_infos(&self, now: Instant) -> Vec<RemoteInfo> {
        self.remotes
            .iter()
            .map(|(&id, r)| RemoteInfo {
                id,
                meta: r.meta.clone(),
                handlers: r.handlers.iter().map(|h| h.to_string()).collect(),
                slots: r
                    .slots
                    .iter()
                    .map(|(&slot, s)| SlotInfo {
                        slot,
                        cpu: s.cpu,
                        credits: s.credits,
                        in_flight: s.in_flight,
                        done: s.done,
                        closed: s.closed,
                        live: self.pools.get(&s.cpu).is_some_and(|p| p.live),
                    })
                    .collect(),
                attached_for: now.duration_since(r.attached),
                done: r.done,
                handed_back: r.handed_back,
            })
            .collect()
    }

    /// Attached workers serving each handler name now, and slots per CPU (for metrics).
    pub(crate) fn remote_counts(&self) -> (BTreeMap<String, usize>, BTreeMap<u32, usize>) {
        let names = self
            .served
            .iter()
            .map(|(h, &n)| (h.to_string(), n))
            .collect();
        let mut per_cpu: BTreeMap<u32, usize> = BTreeMap::new();
        for r in self.remotes.values() {
            for s in r.slots.values().filter(|s| !s.closed) {
                *per_cpu.entry(s.cpu).or_default() += 1;
            }
        }
        (names, per_cpu)
    }
}

/// The engine side of one attached worker, driven by its `Attach` stream. Dropping it
/// detaches the worker (its held items are lost) if [`RemoteWorker::detach`] was not called.
pub struct RemoteWorker {
    inner: Arc<Inner>,
    id: u64,
    detached: bool,
}

impl RemoteWorker {
    pub(crate) fn attach(
        inner: &Arc<Inner>,
        meta: WorkerMeta,
        handlers: Vec<String>,
        sink: Arc<dyn RemoteSink>,
    ) -> Result<RemoteWorker, EngineError> {
        let bad = |m: String| Err(EngineError::Worker(m));
        if handlers.is_empty() {
            return bad("a worker must serve at least one handler name".into());
        }
        if handlers.len() > MAX_HANDLERS {
            return bad(format!(
                "a worker may serve at most {MAX_HANDLERS} handler names"
            ));
        }
        let mut names: Vec<Arc<str>> = Vec::with_capacity(handlers.len());
        {
            let reg = inner.handlers.read();
            for h in &handlers {
                check_name(h).map_err(EngineError::Worker)?;
                if reg.get(h).is_some() {
                    return bad(format!(
                        "handler name {} is served by the daemon itself (a built-in or exec handler); a worker may not shadow it",
                        crate::quote::quote(h)
                    ));
                }
                names.push(Arc::from(h.as_str()));
            }
        }
        names.sort();
        if names.windows(2).any(|w| w[0] == w[1]) {
            return bad("a handler name is repeated".into());
        }
        inner.learn_remote(&names)?;
        let now = Instant::now();
        let id = {
            let mut s = inner.sched.write();
            if s.shutdown {
                return Err(EngineError::ShuttingDown);
            }
            s.attach(meta, names.into(), sink, now)
        };
        Ok(RemoteWorker {
            inner: inner.clone(),
            id,
            detached: false,
        })
    }

    /// This worker's id (unique for the engine's lifetime).
    pub fn id(&self) -> u64 {
        self.id
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut Sched, Instant, &mut Effects) -> Result<T, String>,
    ) -> Result<T, EngineError> {
        let mut fx = Effects::default();
        let r = {
            let mut s = self.inner.sched.write();
            f(&mut s, Instant::now(), &mut fx)
        };
        fx.run(&self.inner);
        r.map_err(EngineError::Worker)
    }

    /// Opens slot `slot` on `cpu` (any CPU of the machine, live or not).
    ///
    /// # Errors
    /// [`EngineError::Worker`]: not a CPU of the machine, a slot id already open, too many.
    pub fn open_slot(&self, slot: u32, cpu: u32) -> Result<(), EngineError> {
        let id = self.id;
        self.with(|s, now, _| s.open_slot(id, slot, cpu, now))
    }

    /// Gives a slot `n` more credits (clamped so it holds at most `max_credits`).
    ///
    /// # Errors
    /// [`EngineError::Worker`]: the slot is not open, or closed.
    pub fn credit(&self, slot: u32, n: u32) -> Result<(), EngineError> {
        let id = self.id;
        self.with(|s, _, _| s.credit(id, slot, n))
    }

    /// Binds work to every slot with credits, appending the items to send to `out`.
    pub fn take(&self, out: &mut Vec<RemoteJob>) {
        let id = self.id;
        let _ = self.with(|s, now, fx| {
            s.remote_take(id, now, fx, out);
            Ok(())
        });
    }

    /// The worker's answer for an item it holds; `credits` more for that item's slot.
    ///
    /// # Errors
    /// [`EngineError::Worker`]: the worker does not hold that item (never sent to it, or
    /// answered already) — a protocol violation; nothing changed.
    pub fn answer(
        &self,
        item: ItemId,
        answer: RemoteAnswer,
        cpu_finished: Option<u32>,
        credits: u32,
    ) -> Result<(), EngineError> {
        let id = self.id;
        self.with(|s, now, fx| s.answer(id, item, answer, cpu_finished, credits, now, fx))
    }

    /// Closes a slot: it is sent nothing more; items it holds must still be answered.
    ///
    /// # Errors
    /// [`EngineError::Worker`]: the slot is not open.
    pub fn close_slot(&self, slot: u32) -> Result<(), EngineError> {
        let id = self.id;
        self.with(|s, _, _| s.close_slot(id, slot))
    }

    /// Items it holds now.
    pub fn held(&self) -> usize {
        self.inner
            .sched
            .write()
            .remotes
            .get(&self.id)
            .map_or(0, |r| r.held.len())
    }

    /// Detaches the worker: its held items are lost with reason `why` (failed, cancelled, or
    /// queued again per their workqueue's `on_worker_lost`).
    pub fn detach(mut self, why: &str) {
        self.detach_now(why);
    }

    fn detach_now(&mut self, why: &str) {
        if std::mem::replace(&mut self.detached, true) {
            return;
        }
        let id = self.id;
        let _ = self.with(|s, now, fx| {
            s.detach(id, why, now, fx);
            Ok(())
        });
    }
}

impl Drop for RemoteWorker {
    fn drop(&mut self) {
        self.detach_now("its stream ended");
    }
}

impl Inner {
    /// The attached workers, for `ListWorkers`, and (workers, items) lost since start.
    pub(crate) fn remote_infos(&self) -> (Vec<RemoteInfo>, (u64, u64)) {
        let s = self.sched.write();
        (s.remote_infos(Instant::now()), s.remote_lost)
    }
}
