//! Workers: OS threads pinned to one CPU that take items from their pool's ready queues.
//!
//! A worker belongs to one (CPU, generation). It takes an item under the engine lock (binding
//! it), then — outside the lock, right before calling the handler — checks that it really is
//! on its CPU (`sched_getcpu`, when pinned) and that the CPU is live in the current epoch
//! (lock-free seqlock read). If either check fails the item is handed back to its queue
//! (counted as a re-bind) and never starts here. Invariant: a handler is called only after
//! both checks passed, with the epoch that proved the CPU live recorded in the result.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use crossbeam_utils::sync::Parker;

use super::sched::{Effects, Finish, Job, Outcome, Started};
use super::Inner;
use crate::handler::{CancelToken, HandlerError, WorkCtx};

static NICE_WARNED: AtomicBool = AtomicBool::new(false);

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
            inner.sched.lock().worker_exit(cpu, gen, true);
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

fn run(inner: Arc<Inner>, cpu: u32, gen: u64, wid: u64) {
    let pinned = inner.cfg.pinning;
    if pinned {
        if let Err(e) = pin(cpu) {
            report(
                &inner,
                cpu,
                &format!("cannot pin a worker to cpu {cpu}: {e}"),
            );
            inner.sched.lock().worker_exit(cpu, gen, true);
            return;
        }
    }
    let token = CancelToken::new();
    let parker = Parker::new();
    let unparker = parker.unparker().clone();
    let mut done: Option<Finish> = None;
    let mut nice = 0;
    let mut idle_since: Option<Instant> = None;
    loop {
        let mut fx = Effects::default();
        // One clock reading serves the whole lock hold (finish, take, idle accounting).
        let now = Instant::now();
        let job = {
            let mut s = inner.sched.lock();
            if let Some(f) = done.take() {
                s.finish(f, now, &mut fx);
            }
            let timed_out = idle_since.is_some() && s.unpark_self(cpu, wid);
            if !s.worker_current(cpu, gen) {
                s.worker_exit(cpu, gen, false);
                drop(s);
                fx.run(&inner);
                return;
            }
            match s.take(cpu, &token, now, &mut fx) {
                Some(job) => {
                    idle_since = None;
                    Some(job)
                }
                None => {
                    let since = *idle_since.get_or_insert(now);
                    if timed_out
                        && now.duration_since(since) >= inner.cfg.worker_idle
                        && s.may_retire(cpu, gen)
                    {
                        s.worker_exit(cpu, gen, false);
                        drop(s);
                        fx.run(&inner);
                        return;
                    }
                    s.park(cpu, wid, unparker.clone());
                    None
                }
            }
        };
        fx.run(&inner);
        match job {
            Some(job) => {
                let (f, exit) = execute(&inner, job, &token, pinned, &mut nice);
                done = Some(f);
                if exit {
                    let mut fx = Effects::default();
                    {
                        let mut s = inner.sched.lock();
                        if let Some(f) = done.take() {
                            s.finish(f, Instant::now(), &mut fx);
                        }
                        s.worker_exit(cpu, gen, true);
                    }
                    fx.run(&inner);
                    return;
                }
            }
            None => parker.park_timeout(inner.cfg.worker_idle),
        }
    }
}

/// Runs one job; returns how it ended and whether the worker must exit (its pinning broke).
fn execute(
    inner: &Inner,
    job: Job,
    token: &CancelToken,
    pinned: bool,
    nice: &mut i32,
) -> (Finish, bool) {
    let id = job.id;
    let handback = |why: &'static str| Finish {
        id,
        outcome: Outcome::HandBack(why),
        started: None,
        finished: None,
    };
    fail::fail_point!("engine::before-start");
    if pinned {
        let on = current_cpu();
        if on != Some(job.cpu) {
            report(
                inner,
                job.cpu,
                &format!("worker of cpu {} found itself on cpu {on:?}", job.cpu),
            );
            let exit = pin(job.cpu).is_err() || current_cpu() != Some(job.cpu);
            return (handback("affinity"), exit);
        }
    }
    let Some(epoch) = inner.live_now(job.cpu) else {
        return (handback("offline"), false);
    };
    if token.is_cancelled() {
        let f = Finish {
            id,
            outcome: Outcome::CancelledBeforeStart,
            started: None,
            finished: None,
        };
        return (f, false);
    }
    if job.nice != *nice {
        set_nice(job.nice);
        *nice = job.nice;
    }
    let started = Started {
        cpu: job.cpu,
        at: SystemTime::now(),
        epoch,
    };
    if let (Some(o), Some(wq)) = (&inner.cfg.observer, &job.workqueue) {
        let waited = started.at.duration_since(job.queued_at).unwrap_or_default();
        o.started(wq, job.cpu, waited);
    }
    let ctx = WorkCtx {
        item: id,
        cpu: job.cpu,
        pinned,
        args: &job.body.args,
        payload: &job.body.payload,
        cancel: token,
    };
    let res = catch_unwind(AssertUnwindSafe(|| job.body.handler.run(&ctx))).unwrap_or_else(|p| {
        let msg = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        Err(HandlerError::Failed(format!("handler panicked: {msg}")))
    });
    let finished_cpu = if pinned {
        current_cpu().unwrap_or(job.cpu)
    } else {
        job.cpu
    };
    let f = Finish {
        id,
        outcome: Outcome::Ran(res),
        started: Some(started),
        finished: Some((finished_cpu, SystemTime::now())),
    };
    (f, false)
}
