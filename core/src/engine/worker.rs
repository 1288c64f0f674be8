//! Workers: OS threads pinned to one CPU that take items from their pool's ready queues.
//!
//! A worker belongs to one (CPU, generation). It takes an item under the engine lock (binding
//! it) — and, while its items run in microseconds, up to 63 more of the same queue in that
//! same lock hold (a batch, see README "Batched take") — then, outside the lock, right before
//! calling each handler, checks that it really is on its CPU (`sched_getcpu`, when pinned),
//! that the CPU is live in the current epoch (lock-free seqlock read; for batched items, the
//! epoch they were bound in) and that the item's own cancel token is not raised. If a check
//! fails the item is handed back to its queue (counted as a re-bind) or cancelled, and never
//! starts here. Finishes are reported at the next entry into the lock (their full results
//! stored right after that hold, under R taken before it ended); a batch's recorded times are
//! counter readings until the batch ends, then placed on the wall clock (`clock.rs`).
//! Invariant: a handler is called only after its own checks passed, with the epoch that
//! proved the CPU live recorded in the result.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_utils::sync::{Parker, Unparker};

use super::clock::{Span, Ticks};
use super::sched::{Body, Effects, Finish, Finished, Holder, Job, Outcome, SharedHold, Started};
use super::Inner;
use crate::handler::{CancelToken, HandlerError, WorkCtx};

static NICE_WARNED: AtomicBool = AtomicBool::new(false);

/// Most jobs a worker binds in one lock hold (see `Sched::claim_more`).
const BATCH: usize = 64;

/// A worker binds more than one job per lock hold only while its last batch ran in less than
/// this per job (its handlers and start checks, from after the lock hold that took it to
/// before the next; not the wait for the lock): batching pays off for items that take microseconds, and it must not keep items waiting
/// behind a long one that another CPU of their group could start.
const QUICK: Duration = Duration::from_micros(50);

/// How an idle worker is woken: a state word it can spin on (see [`super::SPIN`]) before it
/// parks, and its parker's unparker for when it sleeps. Registered in its pool under L, like
/// the unparker alone before: either a submitter finds it registered, or its take saw the item.
///
/// The word is `IDLE` (spinning, or between wake-ups), `WOKEN` (a wake-up not yet consumed) or
/// `PARKED` (asleep, or about to be). A waker swaps in `WOKEN` and unparks only when it
/// swapped out `PARKED`, so a wake-up caught by the spin leaves no token in the parker that
/// would make the next park return at once; a worker parks only after moving `IDLE` to
/// `PARKED`, so a wake-up between its spin and its park is never missed.
pub(crate) struct Wake {
    state: AtomicU8,
    unparker: Unparker,
}

const IDLE: u8 = 0;
const WOKEN: u8 = 1;
const PARKED: u8 = 2;

impl Wake {
    fn new(unparker: Unparker) -> Arc<Wake> {
        Arc::new(Wake {
            state: AtomicU8::new(IDLE),
            unparker,
        })
    }

    /// Wakes the worker, spinning or parked.
    pub(crate) fn unpark(&self) {
        if self.state.swap(WOKEN, Ordering::AcqRel) == PARKED {
            self.unparker.unpark();
        }
    }

    /// Takes a pending wake-up, if any.
    fn consume(&self) -> bool {
        self.state
            .compare_exchange(WOKEN, IDLE, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }

    /// Waits for a wake-up: spins up to [`super::SPIN`] (when `spin`), then parks up to
    /// `timeout`. Returns with the wake-up consumed (or the timeout passed); the state is
    /// `IDLE` again.
    fn wait(&self, parker: &Parker, timeout: Duration, spin: bool, awake: &AtomicUsize) {
        let until = Instant::now() + if spin { super::SPIN } else { Duration::ZERO };
        let mut rounds = 0;
        while Instant::now() < until {
            if self.consume() {
                return;
            }
            super::spin(&mut rounds);
        }
        if self
            .state
            .compare_exchange(IDLE, PARKED, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            // Woken between the last spin and now.
            self.state.store(IDLE, Ordering::Release);
            return;
        }
        awake.fetch_sub(1, Ordering::Relaxed);
        parker.park_timeout(timeout);
        awake.fetch_add(1, Ordering::Relaxed);
        // Woken, timed out, or a spurious return: either way the caller goes back to L and
        // looks. A waker that swaps out `PARKED` after a timeout leaves one parker token
        // (one extra trip through L at worst).
        self.state.store(IDLE, Ordering::Release);
    }
}

/// Starts a worker for `cpu` in generation `gen` (the pool already counted it).
pub(crate) fn spawn(inner: &Arc<Inner>, cpu: u32, gen: u64) {
    let wid = inner.next_worker.fetch_add(1, Ordering::Relaxed);
    let me = inner.clone();
    let res = std::thread::Builder::new()
        .name(format!("wqd/{cpu}:{wid}"))
        .spawn(move || run(me, cpu, gen, wid));
    match res {
        Ok(h) => {
            let mut t = inner.threads.lock();
            t.retain(|h| !h.is_finished());
            t.push(h);
        }
        Err(e) => {
            tracing::error!(cpu, error = %e, "cannot start a worker thread");
            let mut s = inner.sched.write();
            s.arrive(cpu, gen, wid, true, false);
            s.worker_exit(cpu, gen, true);
        }
    }
}

/// The CPU the calling thread runs on now.
pub(crate) fn current_cpu() -> Option<u32> {
    // SAFETY: sched_getcpu has no preconditions; it returns -1 on error.
    let c = unsafe { libc::sched_getcpu() };
    u32::try_from(c).ok()
}

/// Pins the calling thread to `cpu`.
pub(crate) fn pin(cpu: u32) -> Result<(), nix::Error> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu as usize)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
}

fn set_nice(nice: i32) {
    // SAFETY: plain syscalls on the calling thread's own id.
    let r = unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, nice)
    };
    if r != 0 && !NICE_WARNED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            nice,
            error = %std::io::Error::last_os_error(),
            "cannot set a worker's nice value (negative values need CAP_SYS_NICE); running at the current one"
        );
    }
}

fn report(inner: &Inner, cpu: u32, why: &str) {
    tracing::warn!(cpu, "worker report: {why}");
    if let Some(h) = &inner.cfg.report {
        h(cpu, why);
    }
}

/// Counts its worker in `Inner::awake` while the thread runs (parks aside).
struct Awake<'a>(&'a AtomicUsize);

impl<'a> Awake<'a> {
    fn new(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::Relaxed);
        Awake(n)
    }
}

impl Drop for Awake<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn run(inner: Arc<Inner>, cpu: u32, gen: u64, wid: u64) {
    let _awake = Awake::new(&inner.awake);
    let pinned = inner.cfg.pinning;
    if pinned {
        if let Err(e) = pin(cpu) {
            report(
                &inner,
                cpu,
                &format!("cannot pin a worker to cpu {cpu}: {e}"),
            );
            let mut s = inner.sched.write();
            s.arrive(cpu, gen, wid, true, false);
            s.worker_exit(cpu, gen, true);
            return;
        }
    }
    // One cancel token per job of a batch (the first and those `claim_more` binds behind it),
    // reused: a token is reset only when its previous item has been reported finished.
    let tokens: Vec<CancelToken> = (0..BATCH).map(|_| CancelToken::new()).collect();
    let parker = Parker::new();
    let wake = Wake::new(parker.unparker().clone());
    let mut done: Vec<Finish> = Vec::with_capacity(BATCH);
    // The full results of a finish batch, made under L and stored after it (see `release`).
    let mut fin = Finished::default();
    let mut extra: Vec<Job> = Vec::with_capacity(BATCH);
    let mut waits: Vec<Duration> = Vec::new();
    let mut timed: Vec<Timed> = Vec::with_capacity(BATCH);
    // The counter the batch's jobs are timed by between two wall-clock readings (`clock.rs`).
    let mut ticks = Ticks::new();
    // When the last batch began to run (after its lock hold), and how many jobs it had.
    let mut last: Option<(Instant, u32)> = None;
    let mut nice = 0;
    let mut idle_since: Option<Instant> = None;
    // Started by a scheduler step that counts this worker as coming until it enters L.
    let mut fresh = true;
    // The queue of the batch in `done`.
    let mut queue: Option<usize> = None;
    loop {
        let mut fx = Effects::default();
        // One clock reading serves the whole lock hold (finish, take, idle accounting) and
        // ends the timing of the batch before it.
        let now = Instant::now();
        let quick = last
            .take()
            .is_some_and(|(t, n)| now.duration_since(t) < QUICK * n);
        // The hot path holds L shared (`sched/shared.rs`); what it cannot do, the exclusive
        // hold below does.
        let shared = {
            let s = inner.sched.read();
            let holder = Holder {
                cpu,
                gen,
                wid,
                fresh,
                parked: idle_since.is_some(),
                idle_long: idle_since
                    .is_some_and(|t| now.duration_since(t) >= inner.cfg.worker_idle),
                queue,
                wake: &wake,
            };
            let r = s.hold_shared(
                &holder, &mut done, now, quick, &tokens, &mut extra, &mut fx, &mut fin,
            );
            release(&inner, s, &mut fin);
            after_hold(&inner, fx, &mut fin);
            r
        };
        let first = match shared {
            SharedHold::Took(job) => {
                fresh = false;
                idle_since = None;
                Some(job)
            }
            SharedHold::Parked => {
                fresh = false;
                idle_since.get_or_insert(now);
                None
            }
            SharedHold::Exclusive { arrived } => {
                let mut fx = Effects::default();
                let first = {
                    let mut s = inner.sched.write();
                    s.finish_all(&mut done, now, &mut fx, &mut fin);
                    // The shared hold may have entered already (`arrive` is done once).
                    let timed_out = match arrived {
                        Some(t) => t,
                        None => s.arrive(cpu, gen, wid, fresh, idle_since.is_some()),
                    };
                    fresh = false;
                    if !s.worker_current(cpu, gen) {
                        s.worker_exit(cpu, gen, false);
                        s.hand_off(cpu, gen, &mut fx);
                        release(&inner, s, &mut fin);
                        after_hold(&inner, fx, &mut fin);
                        return;
                    }
                    let first = match s.take(cpu, &tokens[0], now, &mut fx) {
                        Some(job) => {
                            idle_since = None;
                            // Items that run in microseconds: bind a few more in this same
                            // lock hold.
                            if quick {
                                s.claim_more(&job, &tokens[1..], now, &mut extra);
                            }
                            Some(job)
                        }
                        None => {
                            let since = *idle_since.get_or_insert(now);
                            if timed_out
                                && now.duration_since(since) >= inner.cfg.worker_idle
                                && s.may_retire(cpu, gen)
                            {
                                s.worker_exit(cpu, gen, false);
                                release(&inner, s, &mut fin);
                                after_hold(&inner, fx, &mut fin);
                                return;
                            }
                            s.park(cpu, wid, wake.clone());
                            None
                        }
                    };
                    release(&inner, s, &mut fin);
                    first
                };
                after_hold(&inner, fx, &mut fin);
                first
            }
        };
        // Whether the holds above ended a flush whose waiter sleeps: its wake-up is sent.
        let woke = fin.take_woke();
        let Some(first) = first else {
            // A wake-up within the spin skips the futex on both sides. But not after waking a
            // flush's waiter while every other worker sleeps: the kernel places a woken thread
            // on a sleeping CPU rather than beside a running one, so a spin here would send
            // that waiter (the RPC thread that answers, then its client) to wake another CPU
            // (≈ 40 µs on this project's VM, most of a single item's round trip); parked, this
            // worker leaves them its own. While another worker is awake its CPU is not
            // sleeping, and the spin still catches the next batch (session 37,
            // `docs/benchmarks.md`).
            let alone = inner.awake.load(Ordering::Relaxed) <= 1;
            wake.wait(
                &parker,
                inner.cfg.worker_idle,
                !(woke && alone),
                &inner.awake,
            );
            continue;
        };
        queue = Some(first.queue);
        let mut exit = false;
        // One clock reading per batch (not per job) times it; a long wait for L before this
        // batch does not count against it.
        last = Some((Instant::now(), 1 + extra.len() as u32));
        // The jobs claimed behind the first share its body and workqueue name (see `Job`):
        // held for the batch only when there are such jobs (a count taken and dropped on a
        // shared line otherwise spent per job).
        let claimed = !extra.is_empty();
        let mut shared = Shared {
            body: if claimed { first.body.clone() } else { None },
            workqueue: if claimed {
                first.workqueue.clone()
            } else {
                None
            },
            last_end: None,
            start: None,
            waits: std::mem::take(&mut waits),
            timed: std::mem::take(&mut timed),
        };
        for (job, token) in std::iter::once(&first).chain(extra.iter()).zip(&tokens) {
            if exit {
                // The pinning broke: the rest of the batch goes back to its queue unstarted.
                done.push(Finish {
                    claim: job.claim,
                    ..Finish::handback(job.id, "affinity")
                });
                continue;
            }
            exit = execute(
                &inner,
                job,
                &mut shared,
                token,
                pinned,
                &mut nice,
                &mut done,
                &mut ticks,
            );
        }
        // Read in place above (a job moved out of `extra` was a copy per job).
        extra.clear();
        place_times(
            &mut shared,
            &mut done,
            &mut ticks,
            inner.cfg.observer.is_some(),
        );
        timed = std::mem::take(&mut shared.timed);
        if let (Some(o), Some(wq), false) = (
            &inner.cfg.observer,
            shared.workqueue.as_ref(),
            shared.waits.is_empty(),
        ) {
            o.started_all(wq, cpu, &shared.waits);
        }
        waits = std::mem::take(&mut shared.waits);
        waits.clear();
        if exit {
            let mut fx = Effects::default();
            {
                let mut s = inner.sched.write();
                s.finish_all(&mut done, Instant::now(), &mut fx, &mut fin);
                s.worker_exit(cpu, gen, true);
                release(&inner, s, &mut fin);
            }
            after_hold(&inner, fx, &mut fin);
            return;
        }
    }
}

/// Ends a lock hold that began with [`Sched::finish_all`]: R is taken before L is released
/// (hand over hand, see [`Finished`]), and the batch's full results are stored with R alone.
/// Its flush events are sent by [`after_hold`].
fn release<G>(inner: &Inner, s: G, fin: &mut Finished) {
    if fin.is_empty() {
        drop(s);
    } else {
        let store = inner.results.lock_spinning();
        drop(s);
        crate::failpoint::seam!("engine::results-unstored");
        fin.store(store);
    }
}

/// What follows a lock hold that began with [`Sched::finish_all`], with no lock held: the
/// hold's effects (wake-ups, spawns, the observer's `finished`), then the batch's flush
/// events — so a flush's waiter returns only after the observer saw its items end.
fn after_hold(inner: &Arc<Inner>, fx: Effects, fin: &mut Finished) {
    fx.run(inner);
    if fin.has_events() {
        crate::failpoint::seam!("engine::events-unsent");
        fin.send_events();
    }
}

/// What the jobs of one batch share: the first job's body and workqueue name, which the jobs
/// claimed behind it run with (their own are `None`), and the clock.
struct Shared {
    body: Option<Arc<Body>>,
    workqueue: Option<Arc<str>>,
    /// The counter reading that ended the previous job, when its end was recorded: the next
    /// job's start, if that job starts right after (its start check passes and its nice
    /// level is the same), is that same reading (the start check between the two takes well
    /// under a microsecond).
    last_end: Option<u64>,
    /// The batch's first real reading (wall clock, counter), taken as its first recorded job
    /// starts; the second is taken after the batch ([`place_times`]).
    start: Option<(SystemTime, u64)>,
    /// The recorded jobs' counter readings, placed on the wall clock after the batch.
    timed: Vec<Timed>,
    /// The queue waits of the jobs claimed behind the first, for the observer's
    /// `started_all` once the batch has run (quick items: microseconds later), instead of a
    /// call per job (each a look-up of the workqueue's metrics).
    waits: Vec<Duration>,
}

/// A recorded job's times as counter readings, until [`place_times`] makes them wall-clock
/// times in its `Finish`.
struct Timed {
    /// Its `Finish`'s place in `done`.
    at: usize,
    /// Its start, when it is a counter reading (`None`: the batch's first real reading, set
    /// already).
    start: Option<u64>,
    end: u64,
    /// For the observer's queue wait of a job claimed behind the first.
    queued_at: SystemTime,
    claimed: bool,
}

/// Places the batch's recorded times on the wall clock, between the batch's first real
/// reading and one taken now (see `clock.rs`), and adds the queue waits of the jobs claimed
/// behind the first to `shared.waits` for the observer.
fn place_times(shared: &mut Shared, done: &mut [Finish], ticks: &mut Ticks, observed: bool) {
    let Some(first) = shared.start.take() else {
        return;
    };
    let span = Span::new(first, ticks.anchor());
    for t in shared.timed.drain(..) {
        let Some(f) = done.get_mut(t.at) else {
            continue;
        };
        let started = f.started.as_mut().map(|s| {
            if let Some(c) = t.start {
                s.at = span.at(c);
            }
            s.at
        });
        if let Some((_, at)) = f.finished.as_mut() {
            *at = span.at(t.end);
        }
        if let (true, true, Some(s)) = (observed, t.claimed, started) {
            shared
                .waits
                .push(s.duration_since(t.queued_at).unwrap_or_default());
        }
    }
}

/// Runs one job and pushes how it ended to `done`; returns whether the worker must exit (its
/// pinning broke).
#[allow(clippy::too_many_arguments)]
fn execute(
    inner: &Inner,
    job: &Job,
    shared: &mut Shared,
    token: &CancelToken,
    pinned: bool,
    nice: &mut i32,
    done: &mut Vec<Finish>,
    ticks: &mut Ticks,
) -> bool {
    let id = job.id;
    let claim = job.claim;
    let handback = |why: &'static str| Finish {
        claim,
        ..Finish::handback(id, why)
    };
    // The previous job's end serves as this one's start only if this one starts next.
    let carried = shared.last_end.take();
    crate::failpoint::seam!("engine::before-start");
    // A cancelled item never runs, wherever it is: checked first, so it is not handed back
    // (and placed again) only to be cancelled then (`Sched::finish` enforces the same).
    if token.is_cancelled() {
        let f = Finish {
            id,
            claim,
            outcome: Outcome::CancelledBeforeStart,
            started: None,
            finished: None,
        };
        done.push(f);
        return false;
    }
    if pinned {
        let on = current_cpu();
        if on != Some(job.cpu) {
            report(
                inner,
                job.cpu,
                &format!("worker of cpu {} found itself on cpu {on:?}", job.cpu),
            );
            let exit = pin(job.cpu).is_err() || current_cpu() != Some(job.cpu);
            done.push(handback("affinity"));
            return exit;
        }
    }
    let Some(epoch) = inner.live_now(job.cpu) else {
        // `Sched::finish` names why: offline, cpuset or isolated.
        done.push(handback(super::sched::NOT_LIVE));
        return false;
    };
    // A job claimed behind another waited bound while its predecessors ran: if the topology
    // changed meanwhile (its queue may have been re-resolved away from this CPU), it goes back
    // to be placed afresh.
    if job.claimed && epoch != job.epoch {
        done.push(handback("stall"));
        return false;
    }
    let carried = if job.nice != *nice {
        set_nice(job.nice);
        *nice = job.nice;
        None
    } else {
        carried
    };
    // A recorded job's start: the batch's first real reading, or a counter reading (the
    // previous job's end, or a fresh one) placed on the wall clock after the batch.
    let (at, start_tick) = match (job.record, carried, shared.start) {
        (false, _, _) => (SystemTime::UNIX_EPOCH, None),
        (true, None, None) => {
            let first = ticks.anchor();
            shared.start = Some(first);
            (first.0, None)
        }
        (true, Some(c), _) => (SystemTime::UNIX_EPOCH, Some(c)),
        (true, None, Some(_)) => (SystemTime::UNIX_EPOCH, Some(ticks.now())),
    };
    let started = Started {
        cpu: job.cpu,
        at,
        epoch,
    };
    // The first job's queue wait now (its start is a real reading); those claimed behind it
    // once their starts are placed, for `started_all` after the batch.
    if let (Some(o), Some(wq), false) = (
        &inner.cfg.observer,
        job.workqueue.as_ref().or(shared.workqueue.as_ref()),
        job.claimed,
    ) {
        debug_assert!(
            start_tick.is_none(),
            "a batch's first job starts at a real reading"
        );
        o.started(
            wq,
            job.cpu,
            at.duration_since(job.queued_at).unwrap_or_default(),
        );
    }
    let Some(body) = job.body.as_ref().or(shared.body.as_ref()) else {
        // Not made by the engine (a claimed job always has a first job's body to share).
        tracing::error!(item = id, "a job without a body; handed back");
        done.push(handback("stall"));
        return false;
    };
    let ctx = WorkCtx {
        item: id,
        cpu: job.cpu,
        pinned,
        args: body.args(),
        payload: body.payload(),
        cancel: token,
    };
    let res =
        catch_unwind(AssertUnwindSafe(|| body.handler.handler.run(&ctx))).unwrap_or_else(|p| {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(HandlerError::Failed(format!("handler panicked: {msg}")))
        });
    // Where and when it finished, only for a result or an observer that keeps them.
    let finished = job.record.then(|| {
        let cpu = if pinned {
            current_cpu().unwrap_or(job.cpu)
        } else {
            job.cpu
        };
        let end = ticks.now();
        shared.last_end = Some(end);
        shared.timed.push(Timed {
            at: done.len(),
            start: start_tick,
            end,
            queued_at: job.queued_at,
            claimed: job.claimed,
        });
        (cpu, SystemTime::UNIX_EPOCH)
    });
    let f = Finish {
        id,
        claim,
        outcome: Outcome::Ran(res),
        started: Some(started),
        finished,
    };
    done.push(f);
    false
}
