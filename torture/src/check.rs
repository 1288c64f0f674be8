//! The checks: from the ledger, the results, the handlers' run counts (library mode), the
//! daemon's own counts (daemon mode), the hotplug log and the history of wqd's own live set,
//! decide whether wqd kept its contract. Pure functions over plain data; nothing here talks to
//! wqd or the kernel.
//!
//! Two bounds make the checks fair to a real kernel:
//!
//! - `W`, the race window (`--race-window-ms`, 100 ms): how far a time stamp may sit from the
//!   moment it describes (the engine stamps a start after its start check; a thread may be
//!   preempted in between).
//! - `L`, the view lag bound (`--lag-bound`, 2 s): how long wqd may take to notice a
//!   transition. wqd hears of it through a uevent and a sysfs rescan, with a periodic rescan
//!   (1 s in library mode, 200 ms for the daemon in the VM) as the backstop, so `L` = one
//!   rescan period plus one slow read. Every transition wqd's live set took longer than `L` to
//!   reflect fails the run.
//!
//! The checks that use them:
//!
//! - *Started offline*: an item that started on CPU C at time t fails only if C was certainly
//!   offline during all of `[t-W, t+W]` — after an offline write had returned and before the
//!   next online write began, `W` to spare on both sides. The state during a write counts as
//!   unknown (the kernel flips it somewhere inside), so the window is the write's own duration
//!   plus `W` on each side. The engine's own `sched_getcpu` check and the handler's are both
//!   held to this.
//! - *Fallback / rejection*: wqd decides a fallback when a worker binds the item, somewhere
//!   between its submit (`queued_at`, q) and its start (t); a preempted worker may start it
//!   long after. So an item widened fails if some member of its group was certainly online
//!   during all of `[q-W, t]` *and* wqd's live set had it live during all of that interval too.
//!   A rejection is decided and stamped at once: rejected at t fails on `[t-W, t]`. Acting
//!   against its own view is a bug; acting on a view that lags is bounded separately by `L`. In
//!   daemon mode the view is `WatchTopology`'s, timed by each snapshot's `taken_at`; a stretch
//!   where the watch skipped epochs counts as not live. Without any view the interval starts
//!   `L` earlier, on the kernel's state alone.
//!   When the result names the epoch its fallback or rejection was decided in and the driver
//!   saw that epoch, the check is exact instead: no member of the group may be live in it.
//! - *Started in its epoch*: the CPU an item started on must be live in the snapshot of the
//!   epoch its result names (the engine's start check read that epoch). Exact, no window.
//! - *Counts* (daemon mode): each workqueue's terminal totals and the re-bind counter must equal
//!   what the results add up to; an item that ended twice would count twice.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::Duration;

use wqd_core::cpuset::CpuSet;
use wqd_core::engine::State;
use wqd_core::groups::Fallback;

use crate::backend::{DaemonCounts, Rec, Run};
use crate::clock::secs;
use crate::hotplug::{HotplugLog, Transition};
use crate::load::{wq_name, FlushRec, Plan, Submitted, WQS};

/// A kind of broken promise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Problem {
    /// The backend does not know an id it returned.
    Lost,
    /// Not terminal after every CPU came back and every workqueue was flushed.
    NotTerminal,
    /// Two submits returned the same id.
    ReusedId,
    /// A handler ran more than once for one item.
    RanTwice,
    /// The result and the handler's runs disagree (ok without a run, rejected with one, ...).
    RunMismatch,
    /// A handler ran for an id nobody submitted.
    RanUnknown,
    /// `failed` or `expired` (the workload makes neither).
    BadState,
    /// Started on a CPU that was certainly offline then.
    StartedOffline,
    /// Started on a CPU that was not live in the epoch its result names.
    StartedNotLive,
    /// Started outside its group without a recorded fallback.
    OutsideGroup,
    /// Widened while its group had a CPU certainly online, or widened on a non-widen queue.
    BadFallback,
    /// Rejected while its group had a CPU certainly online, or rejected on a non-reject queue.
    BadReject,
    /// A flush or cancel wait did not return within the bound, or failed.
    FlushStuck,
    /// A flush or cancel answered wrongly: an item twice, one not terminal, a count off.
    BadAnswer,
    /// The daemon's own counters disagree with the results (an item ended twice, ...).
    CountMismatch,
    /// A submit was refused (not for a full workqueue).
    SubmitError,
    /// wqd's live set took longer than the lag bound to reflect a transition, or never did.
    SlowView,
}

impl Problem {
    pub fn as_str(self) -> &'static str {
        match self {
            Problem::Lost => "lost",
            Problem::NotTerminal => "not terminal",
            Problem::ReusedId => "id reused",
            Problem::RanTwice => "ran twice",
            Problem::RunMismatch => "result/run mismatch",
            Problem::RanUnknown => "ran unknown id",
            Problem::BadState => "failed/expired",
            Problem::StartedOffline => "started on offline CPU",
            Problem::StartedNotLive => "started on a CPU not live in its epoch",
            Problem::OutsideGroup => "outside group",
            Problem::BadFallback => "bad fallback",
            Problem::BadReject => "bad reject",
            Problem::FlushStuck => "flush stuck",
            Problem::BadAnswer => "bad flush/cancel answer",
            Problem::CountMismatch => "daemon count mismatch",
            Problem::SubmitError => "submit error",
            Problem::SlowView => "slow topology view",
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the checks found.
#[derive(Debug, Default)]
pub struct Findings {
    pub counts: BTreeMap<Problem, u64>,
    /// The first few examples of each problem, in words.
    pub examples: BTreeMap<Problem, Vec<String>>,
    /// Items by final state.
    pub by_state: BTreeMap<State, u64>,
    /// Items that fell back, by level.
    pub fallbacks: BTreeMap<String, u64>,
    /// Items re-bound at least once, and the sum of re-binds.
    pub rebound_items: u64,
    pub rebinds: u64,
    /// Items whose handler saw another CPU than the one they started on (the CPU went away
    /// between the start check and the handler's first instruction). Allowed; counted.
    pub cpu_moved: u64,
    /// Items that started on a CPU within `W` of one of its transitions (the race was exercised).
    pub near_transition: u64,
    /// Started items whose start CPU was held against the live set of their epoch.
    pub epoch_checked: u64,
    /// Fallbacks and rejections held exactly against the live set of their decision's epoch.
    pub decided_checked: u64,
    /// Items of the attached workers' handler that ended ok (each run by a worker), and the
    /// re-deliveries after a worker was killed holding an item.
    pub attached_ok: u64,
    pub worker_lost: u64,
}

impl Findings {
    fn add(&mut self, p: Problem, example: impl FnOnce() -> String) {
        *self.counts.entry(p).or_default() += 1;
        let ex = self.examples.entry(p).or_default();
        if ex.len() < 5 {
            ex.push(example());
        }
    }

    /// `None` when every check passed, else a one-line reason.
    pub fn verdict(&self) -> Option<String> {
        if self.counts.is_empty() {
            return None;
        }
        let parts: Vec<String> = self
            .counts
            .iter()
            .map(|(p, n)| format!("{n} {p}"))
            .collect();
        Some(parts.join(", "))
    }
}

/// Everything the checks read.
pub struct Input<'a> {
    pub plan: &'a Plan,
    pub items: &'a [Submitted],
    /// Results by id, as fetched after the final flush.
    pub results: &'a HashMap<u64, Rec>,
    /// Handler runs by id (library mode).
    pub runs: Option<&'a HashMap<u64, Run>>,
    pub log: &'a HotplugLog,
    /// wqd's live set over time, as it published it.
    pub view: Option<&'a [(Duration, Option<CpuSet>)]>,
    /// The live set of each epoch wqd published (those the driver saw).
    pub epochs: &'a HashMap<u64, CpuSet>,
    /// The daemon's own counts (daemon mode).
    pub daemon: Option<&'a DaemonCounts>,
    pub flushes: &'a [FlushRec],
    pub submit_errors: &'a [String],
    pub reused_ids: &'a [u64],
    pub window: Duration,
    pub lag_bound: Duration,
    /// How far wqd's fallback/reject decisions may lag the view it published (it publishes to
    /// watchers just before its engine applies a snapshot). Zero judges against the view alone.
    pub decision_lag: Duration,
    pub flush_bound: Duration,
}

/// Runs every check.
pub fn check(inp: &Input<'_>) -> Findings {
    let mut f = Findings::default();
    let w = inp.window;
    for e in inp.submit_errors {
        f.add(Problem::SubmitError, || e.clone());
    }
    for id in inp.reused_ids {
        f.add(Problem::ReusedId, || format!("item {id}"));
    }
    for fl in inp.flushes {
        if let Some(e) = &fl.error {
            f.add(Problem::FlushStuck, || {
                format!(
                    "{} flush on {} at {}: {e}",
                    fl.kind.as_str(),
                    wq_name(fl.wq),
                    secs(fl.at)
                )
            });
        }
        for b in &fl.bad {
            f.add(Problem::BadAnswer, || {
                format!(
                    "{} on {} at {}: {b}",
                    fl.kind.as_str(),
                    wq_name(fl.wq),
                    secs(fl.at)
                )
            });
        }
        if fl.error.is_none() && fl.waited > inp.flush_bound {
            f.add(Problem::FlushStuck, || {
                format!(
                    "{} flush on {} at {} waited {:?}",
                    fl.kind.as_str(),
                    wq_name(fl.wq),
                    secs(fl.at),
                    fl.waited
                )
            });
        }
    }
    if let Some(runs) = inp.runs {
        let known: std::collections::HashSet<u64> = inp.items.iter().map(|s| s.id).collect();
        for (id, r) in runs {
            if !known.contains(id) {
                f.add(Problem::RanUnknown, || {
                    format!("item {id} ran {} time(s) on cpu {}", r.count, r.cpu_seen)
                });
            }
        }
    }
    if let Some(view) = inp.view {
        let lag = lags(inp.log, view, inp.lag_bound);
        for (t, what) in &lag.slow {
            f.add(Problem::SlowView, || {
                format!(
                    "cpu{} {} at {}: {what}",
                    t.cpu,
                    if t.now_online { "online" } else { "offline" },
                    secs(t.end)
                )
            });
        }
    }
    for s in inp.items {
        check_item(inp, s, w, &mut f);
    }
    if let Some(d) = inp.daemon {
        check_counts(inp, d, &mut f);
    }
    f
}

/// The daemon's per-workqueue terminal totals and re-bind counter against the results.
fn check_counts(inp: &Input<'_>, d: &DaemonCounts, f: &mut Findings) {
    let mut ours: BTreeMap<&str, BTreeMap<State, u64>> = BTreeMap::new();
    let mut rebinds = 0u64;
    for s in inp.items {
        let Some(r) = inp.results.get(&s.id) else {
            continue;
        };
        rebinds += u64::from(r.rebinds);
        if r.state.is_terminal() {
            *ours
                .entry(WQS[s.wq as usize].0)
                .or_default()
                .entry(r.state)
                .or_default() += 1;
        }
    }
    for (wq, _) in WQS {
        let theirs = d.totals.get(wq);
        for st in State::ALL.iter().filter(|s| s.is_terminal()) {
            let a = theirs.and_then(|t| t.get(st)).copied().unwrap_or(0);
            let b = ours.get(wq).and_then(|t| t.get(st)).copied().unwrap_or(0);
            if a != b {
                f.add(Problem::CountMismatch, || {
                    format!("{wq}: the daemon counted {a} items {st}, the results say {b}")
                });
            }
        }
    }
    if d.rebinds != rebinds {
        f.add(Problem::CountMismatch, || {
            format!(
                "the daemon counted {} re-binds, the results add up to {rebinds}",
                d.rebinds
            )
        });
    }
}

fn check_item(inp: &Input<'_>, s: &Submitted, w: Duration, f: &mut Findings) {
    let info = &inp.plan.targets[s.target as usize];
    let (wq_name, policy) = WQS[s.wq as usize];
    let what = || format!("item {} ({} on {wq_name})", s.id, info.target);
    let Some(r) = inp.results.get(&s.id) else {
        f.add(Problem::Lost, || {
            format!("{}: no result; submitted at {}", what(), secs(s.at))
        });
        return;
    };
    *f.by_state.entry(r.state).or_default() += 1;
    if r.rebinds > 0 {
        f.rebound_items += 1;
        f.rebinds += u64::from(r.rebinds);
    }
    if let Some(l) = &r.fallback {
        *f.fallbacks.entry(l.clone()).or_default() += 1;
    }
    if !r.state.is_terminal() {
        f.add(Problem::NotTerminal, || {
            format!("{}: still {} at the end", what(), r.state)
        });
        return;
    }
    if matches!(r.state, State::Failed | State::Expired) {
        f.add(Problem::BadState, || {
            format!("{}: {} ({}{})", what(), r.state, r.error, r.reason)
        });
    }
    // Attached workers: an item of their handler that ran was run by a worker (and says
    // which); no other item names one.
    let attached = r.handler == crate::attached::HANDLER;
    f.worker_lost += u64::from(r.worker_lost);
    if r.state == State::Ok && attached {
        f.attached_ok += 1;
    }
    if (r.state == State::Ok && attached && r.worker == 0) || (!attached && r.worker != 0) {
        f.add(Problem::RunMismatch, || {
            format!(
                "{}: handler {} {} but names worker {}",
                what(),
                r.handler,
                r.state,
                r.worker
            )
        });
    }

    // Exactly one run for what started, none for what never did.
    if let Some(runs) = inp.runs {
        let n = runs.get(&s.id).map_or(0, |r| r.count);
        let started = r.cpu_started.is_some();
        if n > 1 {
            f.add(Problem::RanTwice, || format!("{}: ran {n} times", what()));
        } else if started != (n == 1) || (r.state == State::Ok && n != 1) {
            f.add(Problem::RunMismatch, || {
                format!(
                    "{}: state {} cpu_started {:?} but the handler ran {n} time(s)",
                    what(),
                    r.state,
                    r.cpu_started
                )
            });
        }
    } else if r.state == State::Ok && r.cpu_started.is_none() {
        f.add(Problem::RunMismatch, || {
            format!("{}: ok without a start CPU", what())
        });
    } else if r.state == State::Rejected && r.cpu_started.is_some() {
        f.add(Problem::RunMismatch, || {
            format!(
                "{}: rejected after it started on {:?}",
                what(),
                r.cpu_started
            )
        });
    }
    if let (Some(cpu), Some(e)) = (r.cpu_started, r.epoch) {
        if let Some(live) = inp.epochs.get(&e) {
            f.epoch_checked += 1;
            if !live.contains(cpu) {
                f.add(Problem::StartedNotLive, || {
                    format!(
                        "{}: started on cpu{cpu} in epoch {e}, whose live set is {live}",
                        what()
                    )
                });
            }
        }
    }

    // Where and when it started.
    if let (Some(cpu), Some(t)) = (r.cpu_started, r.started) {
        let t0 = t.saturating_sub(w);
        if inp.log.certainly(cpu, false, t0, t + w) {
            f.add(Problem::StartedOffline, || {
                format!(
                    "{}: started on cpu{cpu} at {}, offline from before {} to after {}",
                    what(),
                    secs(t),
                    secs(t0),
                    secs(t + w)
                )
            });
        }
        if near(inp.log, cpu, t, w) {
            f.near_transition += 1;
        }
        if let Some(run) = inp.runs.and_then(|m| m.get(&s.id)) {
            if run.cpu_seen >= 0 && run.cpu_seen as u32 != cpu {
                f.cpu_moved += 1;
                let seen = run.cpu_seen as u32;
                let t0 = run.at.saturating_sub(w);
                if inp.log.certainly(seen, false, t0, run.at + w) {
                    f.add(Problem::StartedOffline, || {
                        format!(
                            "{}: handler ran on cpu{seen} at {} while it was offline",
                            what(),
                            secs(run.at)
                        )
                    });
                }
            }
        }
        if r.fallback.is_none() && !info.members.contains(cpu) {
            f.add(Problem::OutsideGroup, || {
                format!(
                    "{}: started on cpu{cpu}, members {}, no fallback recorded",
                    what(),
                    info.members
                )
            });
        }
        if let Some(level) = &r.fallback {
            if policy != Fallback::Widen {
                f.add(Problem::BadFallback, || {
                    format!("{}: widened to {level} on a non-widen queue", what())
                });
            } else if let Some((e, m)) = live_member_in(inp, r, &info.members) {
                f.decided_checked += 1;
                f.add(Problem::BadFallback, || {
                    format!(
                        "{}: widened to {level} in epoch {e}, whose live set has member cpu{m}",
                        what()
                    )
                });
            } else if r.decided.is_some_and(|e| inp.epochs.contains_key(&e)) {
                f.decided_checked += 1;
            } else if let Some(m) = up_member(inp, &info.members, r.queued.min(t), t, w) {
                f.add(Problem::BadFallback, || {
                    format!(
                        "{}: widened to {level} (queued {}, started {} in epoch {:?}) while cpu{m} was online and live since before {}",
                        what(),
                        secs(r.queued),
                        secs(t),
                        r.epoch,
                        secs(r.queued.min(t).saturating_sub(w))
                    )
                });
            }
        }
    }

    if r.state == State::Rejected {
        let t = r.finished.unwrap_or(s.at);
        if policy != Fallback::Reject {
            f.add(Problem::BadReject, || {
                format!("{}: rejected on a {policy:?} queue: {}", what(), r.reason)
            });
        } else if let Some((e, m)) = live_member_in(inp, r, &info.members) {
            f.decided_checked += 1;
            f.add(Problem::BadReject, || {
                format!(
                    "{}: rejected in epoch {e}, whose live set has member cpu{m}",
                    what()
                )
            });
        } else if r.decided.is_some_and(|e| inp.epochs.contains_key(&e)) {
            f.decided_checked += 1;
        } else if let Some(m) = up_member(inp, &info.members, t, t, w) {
            f.add(Problem::BadReject, || {
                format!(
                    "{}: rejected at {} (queued {}) while cpu{m} was online and live since before {}: {:?}",
                    what(),
                    secs(t),
                    secs(r.queued),
                    secs(t.saturating_sub(w)),
                    if r.error.is_empty() { &r.reason } else { &r.error }
                )
            });
        }
    }
}

/// For a result that names the epoch of its fallback or rejection, and an epoch the driver
/// saw: a member of the group live in that epoch (exact: the decision went against wqd's own
/// live set). `None` when no member was live, or the epoch is unknown (then the timed check
/// applies).
fn live_member_in(inp: &Input<'_>, r: &Rec, members: &CpuSet) -> Option<(u64, u32)> {
    let e = r.decided?;
    let live = inp.epochs.get(&e)?;
    members.iter().find(|&m| live.contains(m)).map(|m| (e, m))
}

/// A member of the group that was certainly up during `[from-w, t]` by the rules in the module
/// docs: online in the kernel and live in wqd's view, or (no view) online in the kernel since
/// `from-w-L`.
fn up_member(
    inp: &Input<'_>,
    members: &CpuSet,
    from: Duration,
    t: Duration,
    w: Duration,
) -> Option<u32> {
    let from = from.saturating_sub(w);
    // Used only when a result does not name its decision's epoch, or the driver did not see
    // that epoch (see `live_member_in` for the exact check). wqd publishes an epoch to watchers
    // after its engine applied it, so `decision_lag` is zero in practice; a member counts as
    // up only if it was live in the view since `decision_lag` before the window.
    let view_from = from.saturating_sub(inp.decision_lag);
    members.iter().find(|&m| match inp.view {
        Some(view) => inp.log.certainly(m, true, view_from, t) && view_live(view, m, view_from, t),
        None => inp
            .log
            .certainly(m, true, from.saturating_sub(inp.lag_bound), t),
    })
}

/// Whether wqd's published live set held `cpu` during all of `[from, to]` (an unknown stretch
/// does not).
pub fn view_live(
    view: &[(Duration, Option<CpuSet>)],
    cpu: u32,
    from: Duration,
    to: Duration,
) -> bool {
    // The set in force at `from` is the last one published at or before it.
    let first = view.partition_point(|(at, _)| *at <= from);
    let Some(start) = first.checked_sub(1) else {
        return false;
    };
    view[start..]
        .iter()
        .take_while(|(at, _)| *at <= to)
        .all(|(_, live)| live.as_ref().is_some_and(|l| l.contains(cpu)))
}

/// Whether `cpu` had a transition within `w` of `t`.
fn near(log: &HotplugLog, cpu: u32, t: Duration, w: Duration) -> bool {
    log.transitions
        .iter()
        .any(|x| x.cpu == cpu && x.begin <= t + w && x.end + w >= t)
}

/// How long wqd took to see the transitions.
#[derive(Debug, Default)]
pub struct Lags {
    /// Lag of every transition wqd saw, sorted.
    pub seen: Vec<Duration>,
    /// Transitions undone (by the next write of that CPU) within the bound, before wqd saw them.
    pub undone: usize,
    /// Transitions not seen while the view had an unknown stretch (skipped epochs): not judged.
    pub unknown: usize,
    /// Transitions seen late or never, with why.
    pub slow: Vec<(Transition, String)>,
}

/// For each successful transition: the time from the write's end to the first live set wqd
/// published after the write began that agrees with it, looking only until the same CPU's next
/// write. A state that lasted longer than `bound` and that wqd reflected late or never is slow.
pub fn lags(log: &HotplugLog, view: &[(Duration, Option<CpuSet>)], bound: Duration) -> Lags {
    let mut out = Lags::default();
    let ok: Vec<&Transition> = log
        .transitions
        .iter()
        .filter(|t| t.error.is_none())
        .collect();
    for (i, t) in ok.iter().enumerate() {
        let next = ok[i + 1..].iter().find(|n| n.cpu == t.cpu).map(|n| n.begin);
        let window = || {
            view.iter()
                .skip_while(|(at, _)| *at < t.begin)
                .take_while(|(at, _)| next.is_none_or(|n| *at < n))
        };
        let seen = window()
            .find(|(_, live)| {
                live.as_ref()
                    .is_some_and(|l| l.contains(t.cpu) == t.now_online)
            })
            .map(|(at, _)| at.saturating_sub(t.end));
        if seen.is_none() && window().any(|(_, live)| live.is_none()) {
            out.unknown += 1;
            continue;
        }
        match (seen, next) {
            (Some(lag), _) if lag <= bound => out.seen.push(lag),
            (Some(lag), _) => {
                out.seen.push(lag);
                out.slow
                    .push(((*t).clone(), format!("wqd saw it after {lag:?}")));
            }
            (None, Some(n)) if n.saturating_sub(t.end) <= bound => out.undone += 1,
            (None, Some(n)) => out.slow.push((
                (*t).clone(),
                format!(
                    "wqd never saw it in the {:?} before the next write",
                    n.saturating_sub(t.end)
                ),
            )),
            (None, None) => out
                .slow
                .push(((*t).clone(), "wqd never saw it".to_string())),
        }
    }
    out.seen.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hotplug::Cause;
    use crate::load::{Plan, Submitted};

    fn d(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    fn log() -> HotplugLog {
        // cpu1 offline from 160 ms to 1000 ms; cpu2 and cpu3 offline from 300 ms to 2000 ms.
        let tr = |cpu, online, b, e| Transition {
            cpu,
            online,
            begin: d(b),
            end: d(e),
            now_online: online,
            error: None,
            cause: Cause::Random,
        };
        HotplugLog {
            initial: [(1, true), (2, true), (3, true)].into_iter().collect(),
            transitions: vec![
                tr(1, false, 100, 160),
                tr(2, false, 240, 300),
                tr(3, false, 240, 300),
                tr(1, true, 1000, 1060),
                tr(2, true, 2000, 2060),
                tr(3, true, 2000, 2060),
            ],
        }
    }

    fn rec(id: u64, state: State, cpu: Option<u32>, started: Option<u64>) -> Rec {
        Rec {
            id,
            state,
            cpu_started: cpu,
            queued: started.map_or(d(0), |s| d(s.saturating_sub(5))),
            started: started.map(d),
            finished: started.map(|s| d(s + 1)),
            fallback: None,
            rebinds: 0,
            epoch: None,
            decided: None,
            error: String::new(),
            reason: String::new(),
            handler: "noop".into(),
            worker: 0,
            worker_lost: 0,
        }
    }

    struct Case {
        plan: Plan,
        items: Vec<Submitted>,
        results: HashMap<u64, Rec>,
        runs: HashMap<u64, Run>,
        log: HotplugLog,
        view: Vec<(Duration, Option<CpuSet>)>,
        epochs: HashMap<u64, CpuSet>,
    }

    impl Case {
        fn new() -> Case {
            let nodes = [(0, CpuSet::range(0, 1)), (1, CpuSet::range(2, 3))];
            Case {
                plan: Plan::new(4, &nodes, 2, vec![1, 2, 3]),
                items: Vec::new(),
                results: HashMap::new(),
                runs: HashMap::new(),
                log: log(),
                // wqd sees each change 30 ms after the write's end.
                view: vec![
                    (d(0), Some(CpuSet::range(0, 3))),
                    (d(190), Some("0,2-3".parse().expect("cpulist"))),
                    (d(330), Some(CpuSet::single(0))),
                    (d(1090), Some(CpuSet::range(0, 1))),
                    (d(2090), Some(CpuSet::range(0, 3))),
                ],
                epochs: [(1, CpuSet::range(0, 3)), (2, CpuSet::single(0))]
                    .into_iter()
                    .collect(),
            }
        }
        fn target(&self, t: &str) -> u16 {
            self.plan
                .targets
                .iter()
                .position(|x| x.target.to_string() == t)
                .expect("target in plan") as u16
        }
        fn item(&mut self, wq: u8, target: &str, r: Rec, ran: bool) {
            let target = self.target(target);
            self.items.push(Submitted {
                id: r.id,
                wq,
                target,
                at: d(0),
                scenario: false,
            });
            if ran {
                self.runs.insert(
                    r.id,
                    Run {
                        count: 1,
                        cpu_seen: r.cpu_started.map_or(-1, |c| c as i32),
                        cpu_ctx: r.cpu_started.unwrap_or(0),
                        at: r.started.unwrap_or_default(),
                    },
                );
            }
            self.results.insert(r.id, r);
        }
        fn check(&self) -> Findings {
            check(&Input {
                plan: &self.plan,
                items: &self.items,
                results: &self.results,
                runs: Some(&self.runs),
                log: &self.log,
                view: Some(&self.view),
                epochs: &self.epochs,
                daemon: None,
                flushes: &[],
                submit_errors: &[],
                reused_ids: &[],
                window: d(100),
                lag_bound: Duration::from_secs(2),
                decision_lag: Duration::ZERO,
                flush_bound: Duration::from_secs(30),
            })
        }
    }

    #[test]
    fn a_decision_epoch_is_judged_exactly() {
        // Epoch 1 has cpu1 live, epoch 2 does not. Times that the timed check would excuse
        // (started long after cpu1 left) do not matter: the epoch decides.
        let mut c = Case::new();
        let mut good = rec(1, State::Ok, Some(0), Some(500));
        good.fallback = Some("node".into());
        good.decided = Some(2);
        c.item(0, "cpu:1", good, true);
        let mut bad = rec(2, State::Ok, Some(0), Some(500));
        bad.fallback = Some("node".into());
        bad.decided = Some(1);
        c.item(0, "cpu:1", bad, true);
        let mut bad_reject = rec(3, State::Rejected, None, Some(1500));
        bad_reject.decided = Some(1);
        c.item(2, "cpus:2-3", bad_reject, false);
        let f = c.check();
        assert_eq!(f.decided_checked, 3);
        assert_eq!(
            f.counts.get(&Problem::BadFallback),
            Some(&1),
            "{:?}",
            f.examples
        );
        assert_eq!(
            f.counts.get(&Problem::BadReject),
            Some(&1),
            "{:?}",
            f.examples
        );
    }

    #[test]
    fn a_clean_run_passes() {
        let mut c = Case::new();
        c.item(0, "cpu:1", rec(1, State::Ok, Some(1), Some(50)), true);
        // Started on cpu1 right after its offline write: inside the window, allowed.
        c.item(0, "cpu:1", rec(2, State::Ok, Some(1), Some(200)), true);
        let mut widened = rec(3, State::Ok, Some(0), Some(500));
        widened.fallback = Some("node".into());
        c.item(0, "cpu:1", widened, true);
        c.item(
            2,
            "cpus:2-3",
            rec(4, State::Rejected, None, Some(1500)),
            false,
        );
        c.item(1, "cpu:2", rec(5, State::Cancelled, None, None), false);
        let f = c.check();
        assert_eq!(f.verdict(), None, "{:?}", f.examples);
        // Items 1 (50 ms) and 2 (200 ms) are both within 100 ms of the write at 100-160 ms.
        assert_eq!(f.near_transition, 2);
    }

    #[test]
    fn each_broken_promise_is_reported() {
        let mut c = Case::new();
        // Started on cpu1 in the middle of its offline period.
        c.item(0, "cpu:1", rec(1, State::Ok, Some(1), Some(600)), true);
        // Widened while cpu1 had been back for a long time.
        let mut w = rec(2, State::Ok, Some(0), Some(1500));
        w.fallback = Some("all".into());
        c.item(0, "cpu:1", w, true);
        // Rejected while cpus 2-3 were up.
        c.item(
            2,
            "cpus:2-3",
            rec(3, State::Rejected, None, Some(100)),
            false,
        );
        // Ran twice.
        c.item(0, "all", rec(4, State::Ok, Some(0), Some(10)), true);
        if let Some(r) = c.runs.get_mut(&4) {
            r.count = 2;
        }
        // Lost: submitted, no result.
        c.items.push(Submitted {
            id: 5,
            wq: 0,
            target: 0,
            at: d(0),
            scenario: false,
        });
        // Still pending at the end.
        c.item(1, "cpu:3", rec(6, State::Pending, None, None), false);
        // Ran outside its group with no fallback.
        c.item(1, "cpus:2-3", rec(7, State::Ok, Some(0), Some(2500)), true);
        // Ok but the handler never ran.
        c.item(0, "all", rec(8, State::Ok, Some(0), Some(2500)), false);
        let f = c.check();
        let got: Vec<Problem> = f.counts.keys().copied().collect();
        assert_eq!(
            got,
            vec![
                Problem::Lost,
                Problem::NotTerminal,
                Problem::RanTwice,
                Problem::RunMismatch,
                Problem::StartedOffline,
                Problem::OutsideGroup,
                Problem::BadFallback,
                Problem::BadReject,
            ],
            "{:#?}",
            f.examples
        );
        assert!(f.verdict().is_some());
    }

    #[test]
    fn the_epoch_and_the_daemon_counts_are_held_against_the_results() {
        let mut c = Case::new();
        // Epoch 2 had only cpu0 live: starting on cpu1 in it is a bug, on cpu0 is not.
        let mut a = rec(1, State::Ok, Some(1), Some(50));
        a.epoch = Some(2);
        c.item(0, "cpu:1", a, true);
        let mut b = rec(2, State::Ok, Some(0), Some(50));
        b.epoch = Some(2);
        c.item(0, "cpu:0", b, true);
        let f = c.check();
        assert_eq!(
            f.counts.keys().copied().collect::<Vec<_>>(),
            vec![Problem::StartedNotLive],
            "{:?}",
            f.examples
        );
        assert_eq!(f.epoch_checked, 2);

        // The daemon counted one ok more on tw-widen than the results show (an item ended
        // twice), and one re-bind the results lack.
        let mut c = Case::new();
        c.item(0, "cpu:1", rec(1, State::Ok, Some(1), Some(50)), true);
        let totals = [(
            "tw-widen".to_string(),
            [(State::Ok, 2)].into_iter().collect(),
        )]
        .into_iter()
        .collect();
        let counted = DaemonCounts { totals, rebinds: 1 };
        let mut inp = Input {
            plan: &c.plan,
            items: &c.items,
            results: &c.results,
            runs: None,
            log: &c.log,
            view: Some(&c.view),
            epochs: &c.epochs,
            daemon: Some(&counted),
            flushes: &[],
            submit_errors: &[],
            reused_ids: &[],
            window: d(100),
            lag_bound: Duration::from_secs(2),
            decision_lag: Duration::ZERO,
            flush_bound: Duration::from_secs(30),
        };
        let f = check(&inp);
        assert_eq!(
            f.counts.get(&Problem::CountMismatch),
            Some(&2),
            "{:?}",
            f.examples
        );
        let ok = DaemonCounts {
            totals: [(
                "tw-widen".to_string(),
                [(State::Ok, 1)].into_iter().collect(),
            )]
            .into_iter()
            .collect(),
            rebinds: 0,
        };
        inp.daemon = Some(&ok);
        assert_eq!(check(&inp).verdict(), None);
    }

    #[test]
    fn a_skipped_stretch_of_the_view_is_never_live() {
        let mut c = Case::new();
        // wqd's view is unknown from 1000 ms to 1560 ms (the watch skipped epochs there).
        c.view.insert(3, (d(1000), None));
        c.view[4].0 = d(1560);
        // A widen at 1300 ms while cpu1 was back in the kernel: not judged against an unknown
        // view (and the lag of cpu1's return is not judged either).
        let mut w = rec(1, State::Ok, Some(0), Some(1300));
        w.fallback = Some("node".into());
        c.item(0, "cpu:1", w, true);
        let f = c.check();
        assert_eq!(f.verdict(), None, "{:?}", f.examples);
        assert!(!view_live(&c.view, 1, d(1100), d(1200)));
        assert!(view_live(&c.view, 0, d(0), d(900)));
    }

    #[test]
    fn a_lagging_view_excuses_a_fallback_but_not_past_the_bound() {
        let mut c = Case::new();
        // wqd sees cpu1 come back (write ends at 1060 ms) only at 1560 ms.
        c.view[3].0 = d(1560);
        let mut w = rec(1, State::Ok, Some(0), Some(1300));
        w.fallback = Some("node".into());
        c.item(0, "cpu:1", w, true);
        let f = c.check();
        assert_eq!(f.verdict(), None, "{:?}", f.examples);
        let l = lags(&c.log, &c.view, Duration::from_secs(2));
        assert_eq!(l.seen.iter().max(), Some(&d(500)));

        // The same fallback after wqd had it live for 100 ms is a bug.
        let mut c2 = Case::new();
        c2.view[3].0 = d(1560);
        let mut w = rec(1, State::Ok, Some(0), Some(1700));
        w.fallback = Some("node".into());
        c2.item(0, "cpu:1", w, true);
        assert_eq!(
            c2.check().counts.keys().copied().collect::<Vec<_>>(),
            vec![Problem::BadFallback]
        );

        // A view that never shows cpu2 and cpu3 back is slow.
        let mut c3 = Case::new();
        c3.view.truncate(4);
        let f = c3.check();
        assert_eq!(
            f.counts.get(&Problem::SlowView),
            Some(&2),
            "{:?}",
            f.examples
        );
    }
}
