//! Behaviour of the engine on a made-up topology (pinning off): placement, fallback, keys,
//! delays, deadlines, flush, cancel, drain, ordered, limits, panics and batch atomicity.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;
use wqd_core::engine::{
    Batch, CancelOutcome, Delivered, Engine, EngineConfig, EngineError, Flush, FlushEvent,
    FlushScope, ItemResult, ItemSpec, ResultsMode, State, WorkqueueAttrs, WorkqueueChanges,
};
use wqd_core::groups::{Fallback, Placement};
use wqd_core::handler::{Args, Handler, HandlerError, HandlerKind, Registry, WorkCtx};
use wqd_core::target::Target;

/// Records every run: (item, cpu), concurrency per CPU, and the order of starts.
#[derive(Default)]
struct Probe {
    runs: Mutex<Vec<(u64, u32)>>,
    running: Mutex<BTreeMap<u32, usize>>,
    max_running: Mutex<BTreeMap<u32, usize>>,
    total_running: AtomicUsize,
    max_total: AtomicUsize,
}

struct ProbeHandler(Arc<Probe>, &'static str, HandlerKind);

impl Handler for ProbeHandler {
    fn name(&self) -> &str {
        self.1
    }
    fn kind(&self) -> HandlerKind {
        self.2
    }
    fn validate(&self, args: &Args, _p: &[u8]) -> Result<(), HandlerError> {
        match args.keys().find(|k| *k != "ms") {
            Some(k) => Err(HandlerError::InvalidArgument(format!(
                "unknown argument {k}"
            ))),
            None => Ok(()),
        }
    }
    fn run(&self, ctx: &WorkCtx<'_>) -> Result<Vec<u8>, HandlerError> {
        let p = &self.0;
        p.runs.lock().push((ctx.item, ctx.cpu));
        {
            let mut r = p.running.lock();
            let n = r.entry(ctx.cpu).or_default();
            *n += 1;
            let m = *n;
            let mut mx = p.max_running.lock();
            let e = mx.entry(ctx.cpu).or_default();
            *e = (*e).max(m);
        }
        let t = p.total_running.fetch_add(1, Ordering::SeqCst) + 1;
        p.max_total.fetch_max(t, Ordering::SeqCst);
        let ms: u64 = ctx.args.get("ms").and_then(|v| v.parse().ok()).unwrap_or(0);
        let cancelled = ms > 0 && ctx.cancel.wait_timeout(Duration::from_millis(ms));
        p.total_running.fetch_sub(1, Ordering::SeqCst);
        *p.running.lock().entry(ctx.cpu).or_default() -= 1;
        if cancelled {
            return Err(HandlerError::Cancelled);
        }
        Ok(ctx.item.to_le_bytes().to_vec())
    }
}

struct Rig {
    engine: Engine,
    probe: Arc<Probe>,
    topo: wqd_core::topology::Topology,
    snap: Mutex<Arc<wqd_core::live::Snapshot>>,
}

impl Rig {
    fn new(n: u32, live: &str) -> Rig {
        Rig::with(n, live, |_| {})
    }
    /// As `new`, with `f` applied to the engine's config (workers not pinned).
    fn with(n: u32, live: &str, f: impl FnOnce(&mut EngineConfig)) -> Rig {
        let topo = common::topology(n);
        let snap = common::snapshot(&topo, 1, &live.parse().unwrap());
        let probe = Arc::new(Probe::default());
        let mut reg = Registry::with_builtins(None);
        reg.register(Arc::new(ProbeHandler(
            probe.clone(),
            "probe",
            HandlerKind::CpuBound,
        )));
        reg.register(Arc::new(ProbeHandler(
            probe.clone(),
            "wait",
            HandlerKind::Waits,
        )));
        let mut cfg = EngineConfig {
            pinning: false,
            ..EngineConfig::default()
        };
        f(&mut cfg);
        let engine = Engine::start(cfg, reg, snap.clone()).unwrap();
        Rig {
            engine,
            probe,
            topo,
            snap: Mutex::new(snap),
        }
    }
    fn set_live(&self, live: &str) {
        let mut s = self.snap.lock();
        *s = common::next(&s, &live.parse().unwrap());
        self.engine.apply_snapshot(&s);
    }
    fn wq(&self, name: &str, f: impl FnOnce(&mut WorkqueueAttrs)) {
        let mut a = WorkqueueAttrs::named(name);
        f(&mut a);
        self.engine.create_workqueue(a).unwrap();
    }
    fn submit(&self, wq: &str, items: Vec<ItemSpec>) -> Vec<u64> {
        let r = self.engine.submit(wq, items).unwrap();
        r.items.iter().map(|s| s.id).collect()
    }
    fn flush(&self, ids: &[u64]) -> Vec<Arc<ItemResult>> {
        let mut f = self.engine.flush(FlushScope::Items(ids.to_vec())).unwrap();
        let deadline = Some(Instant::now() + Duration::from_secs(20));
        let mut out = Vec::new();
        while let Some(ev) = f.next_blocking(deadline).expect("flush timed out") {
            match ev {
                FlushEvent::Done(r) => out.push(r),
                FlushEvent::Gone(id) => panic!("result of {id} gone"),
                FlushEvent::Ended(id, _) => panic!("{id} ended without a result (results = full)"),
            }
        }
        out.sort_by_key(|r| r.id);
        out
    }
}

fn item(t: &str, h: &str) -> ItemSpec {
    ItemSpec::new(parse_target(t), h)
}

/// A `probe` item on `t` with dedupe key `k`.
fn keyed(t: &str, k: &str) -> ItemSpec {
    let mut i = item(t, "probe");
    i.key = Some(k.into());
    i
}

fn parse_target(t: &str) -> Target {
    let (k, v) = t.split_once(':').unwrap_or((t, ""));
    match k {
        "cpu" => Target::Cpu(v.parse().unwrap()),
        "cpus" => Target::Cpus(v.parse().unwrap()),
        "all" => Target::All,
        other => panic!("test target {other}"),
    }
}

#[test]
fn runs_on_the_named_cpu_and_reports_it() {
    let rig = Rig::new(4, "0-3");
    let ids = rig.submit("default", (0..20).map(|_| item("cpu:2", "probe")).collect());
    let res = rig.flush(&ids);
    assert_eq!(res.len(), 20);
    for r in &res {
        assert_eq!(r.state, State::Ok, "{r:?}");
        assert_eq!(r.cpu_started, Some(2));
        assert_eq!(r.cpu_finished, Some(2));
        assert_eq!(r.fallback, None);
        assert_eq!(r.output, r.id.to_le_bytes());
        assert!(r.started_at.unwrap() >= r.queued_at);
        assert_eq!(r.epoch_started, Some(1));
    }
    assert_eq!(rig.probe.runs.lock().len(), 20);
}

/// Pins the calling thread to `cpu`.
fn pin_to(cpu: u32) {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu as usize).expect("a CPU number within the set");
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
        .unwrap_or_else(|e| panic!("sched_setaffinity to {cpu}: {e}"));
}

/// `wake_local` (the daemon's default): a batch of one item goes to the submitting thread's
/// CPU first when that CPU is in the group and runs no item; without it, `spread` goes round
/// the group. The submitter is pinned to a host CPU that is also a CPU of the fixture (its
/// workers are not pinned: the pool's CPU is what the result reports), the highest it may use
/// below 4, so that round robin starting at the group's low CPUs would show.
#[test]
fn wake_local_sends_a_lone_item_to_the_submitters_cpu() {
    let allowed = wqd_core::topology::sysfs::affinity().expect("sched_getaffinity");
    let Some(here) = allowed.iter().filter(|&c| c < 4).max() else {
        eprintln!("skipped: this thread may run on none of CPUs 0-3");
        return;
    };
    // A worker entering L for the first time takes from its pool's ready list whatever it
    // finds there (late binding), wherever the wake-up went: each pool first runs one item,
    // so that every worker has arrived and parked before the items that count.
    let warmed = |wake_local: bool| {
        let rig = Rig::with(4, "0-3", |c| c.wake_local = wake_local);
        let ids = rig.submit(
            "default",
            (0..4).map(|c| item(&format!("cpu:{c}"), "probe")).collect(),
        );
        rig.flush(&ids);
        std::thread::sleep(Duration::from_millis(50));
        rig
    };
    let cpus_of = |wake_local: bool| -> Vec<u32> {
        let rig = warmed(wake_local);
        std::thread::scope(|s| {
            s.spawn(|| {
                pin_to(here);
                (0..12)
                    .map(|_| {
                        let ids = rig.submit("default", vec![item("all", "probe")]);
                        let r = rig.flush(&ids);
                        assert_eq!(r[0].state, State::Ok, "{:?}", r[0]);
                        r[0].cpu_started.expect("started")
                    })
                    .collect()
            })
            .join()
            .unwrap()
        })
    };
    let local = cpus_of(true);
    assert!(
        local.iter().all(|&c| c == here),
        "{local:?} not all on {here}"
    );
    let round = cpus_of(false);
    let distinct: HashSet<u32> = round.iter().copied().collect();
    assert!(distinct.len() >= 3, "spread went round: {round:?}");
    // A batch of two is not a lone item: its wake-ups still go round (so not every pair runs
    // where it is submitted; which CPUs run them depends on which woken worker arrives
    // first, since one binds both).
    let rig = warmed(true);
    let pairs: HashSet<u32> = std::thread::scope(|s| {
        s.spawn(|| {
            pin_to(here);
            (0..8)
                .flat_map(|_| {
                    let ids = rig.submit("default", vec![item("all", "probe"); 2]);
                    rig.flush(&ids)
                })
                .filter_map(|r| r.cpu_started)
                .collect()
        })
        .join()
        .unwrap()
    });
    assert!(
        pairs.iter().any(|&c| c != here),
        "pairs all ran on {here}: {pairs:?}"
    );
}

#[test]
fn a_group_runs_one_per_live_cpu_in_parallel() {
    let rig = Rig::new(8, "0-7");
    let ids = rig.submit(
        "default",
        (0..32)
            .map(|_| item("cpus:0-3", "probe").arg("ms", "20"))
            .collect(),
    );
    let res = rig.flush(&ids);
    let cpus: HashSet<u32> = res.iter().filter_map(|r| r.cpu_started).collect();
    assert_eq!(
        cpus,
        HashSet::from([0, 1, 2, 3]),
        "spread over the group only"
    );
    // max_active 1: never two items of the workqueue on one CPU at once.
    for (&cpu, &m) in rig.probe.max_running.lock().iter() {
        assert_eq!(m, 1, "cpu {cpu} ran {m} at once");
    }
    assert!(
        rig.probe.max_total.load(Ordering::SeqCst) >= 2,
        "ran in parallel"
    );
}

#[test]
fn first_placement_uses_the_lowest_live_cpu() {
    let rig = Rig::new(4, "1-3");
    rig.wq("first", |a| a.placement = Placement::First);
    let ids = rig.submit(
        "first",
        (0..10).map(|_| item("cpus:0-3", "probe")).collect(),
    );
    for r in rig.flush(&ids) {
        assert_eq!(
            r.cpu_started,
            Some(1),
            "cpu 0 is offline; 1 is the first live"
        );
    }
}

#[test]
fn widen_records_the_fallback_when_the_group_is_dead() {
    let rig = Rig::new(4, "0-2");
    let ids = rig.submit("default", vec![item("cpu:3", "probe")]);
    let r = &rig.flush(&ids)[0];
    assert_eq!(r.state, State::Ok);
    assert!(r.fallback.is_some(), "{r:?}");
    assert!(r.reason.contains("no live CPU in cpu:3"), "{}", r.reason);
    assert!(r.cpu_started.unwrap() <= 2);
}

#[test]
fn reject_policy_rejects_and_says_why() {
    let rig = Rig::new(4, "0-2");
    rig.wq("strict", |a| a.fallback = Fallback::Reject);
    let ids = rig.submit(
        "strict",
        vec![item("cpu:3", "probe"), item("cpu:1", "probe")],
    );
    let res = rig.flush(&ids);
    assert_eq!(res[0].state, State::Rejected);
    assert!(res[0].reason.contains("reject"), "{}", res[0].reason);
    assert_eq!(res[1].state, State::Ok);
    assert_eq!(rig.probe.runs.lock().len(), 1);
}

#[test]
fn wait_policy_waits_for_the_cpu_to_return() {
    let rig = Rig::new(4, "0-2");
    rig.wq("patient", |a| a.fallback = Fallback::Wait);
    let ids = rig.submit("patient", vec![item("cpu:3", "probe")]);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        rig.engine.results(&ids)[0].as_ref().unwrap().state,
        State::Pending
    );
    assert!(rig.probe.runs.lock().is_empty());
    rig.set_live("0-3");
    let r = &rig.flush(&ids)[0];
    assert_eq!(
        (r.state, r.cpu_started, r.fallback),
        (State::Ok, Some(3), None)
    );
}

#[test]
fn pending_items_move_when_their_cpu_leaves() {
    let rig = Rig::new(4, "0-3");
    rig.wq("patient", |a| a.fallback = Fallback::Wait);
    // Occupy cpu 1 so the rest stay pending, then take cpu 1 away.
    let ids = rig.submit(
        "default",
        (0..6)
            .map(|_| item("cpus:1-2", "probe").arg("ms", "30"))
            .collect(),
    );
    rig.set_live("0,2-3");
    let res = rig.flush(&ids);
    assert!(res.iter().all(|r| r.state == State::Ok));
    let late: Vec<_> = res
        .iter()
        .filter(|r| r.epoch_started == Some(2))
        .map(|r| r.cpu_started)
        .collect();
    assert!(
        late.iter().all(|c| *c == Some(2)),
        "after the loss only cpu 2: {late:?}"
    );
}

#[test]
fn keys_dedupe_pending_items() {
    let rig = Rig::new(2, "0-1");
    rig.wq("patient", |a| a.fallback = Fallback::Wait);
    rig.set_live("0");
    let a = rig
        .engine
        .submit("patient", vec![keyed("cpu:1", "k"), keyed("cpu:1", "k")])
        .unwrap();
    assert!(a.items[0].queued);
    assert!(!a.items[1].queued);
    assert_eq!(a.items[1].id, a.items[0].id);
    // The duplicate's slot in the batch's id range is left out of the batch.
    assert_eq!(
        rig.engine.batch_items(a.batch).unwrap(),
        vec![a.items[0].id]
    );
    let b = rig
        .engine
        .submit("patient", vec![keyed("cpu:1", "k")])
        .unwrap();
    assert_eq!(
        b.items[0],
        wqd_core::engine::Submitted {
            id: a.items[0].id,
            queued: false
        }
    );
    rig.set_live("0-1");
    rig.flush(&[a.items[0].id]);
    // Once it has started the key is free again.
    let c = rig
        .engine
        .submit("patient", vec![keyed("cpu:1", "k")])
        .unwrap();
    assert!(c.items[0].queued);
    rig.flush(&[c.items[0].id]);
    assert_eq!(rig.probe.runs.lock().len(), 2);
}

#[test]
fn delayed_items_start_after_their_delay() {
    let rig = Rig::new(2, "0-1");
    let mut i = item("cpu:0", "probe");
    i.delay = Some(Duration::from_millis(150));
    let ids = rig.submit("default", vec![i]);
    assert_eq!(
        rig.engine.results(&ids)[0].as_ref().unwrap().state,
        State::Delayed
    );
    // Not flushed (a flush would queue it at once): it runs when its delay passes.
    let t0 = Instant::now();
    let r = loop {
        let r = rig.engine.results(&ids)[0].clone().unwrap();
        if r.state.is_terminal() {
            break r;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "never ran");
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(r.state, State::Ok);
    assert!(r.wait_time().unwrap() >= Duration::from_millis(150));
}

#[test]
fn deadline_expires_items_that_cannot_start() {
    let rig = Rig::new(2, "0");
    rig.wq("patient", |a| a.fallback = Fallback::Wait);
    let mut i = item("cpu:1", "probe");
    i.deadline = Some(Duration::from_millis(50));
    let ids = rig.submit("patient", vec![i]);
    let r = &rig.flush(&ids)[0];
    assert_eq!(r.state, State::Expired);
    assert!(rig.probe.runs.lock().is_empty());
}

#[test]
fn cancel_pending_never_runs_and_cancel_running_waits() {
    let rig = Rig::new(2, "0-1");
    rig.wq("patient", |a| a.fallback = Fallback::Wait);
    rig.set_live("0");
    let pending = rig.submit("patient", vec![item("cpu:1", "probe")]);
    let running = rig.submit("default", vec![item("cpu:0", "probe").arg("ms", "5000")]);
    while rig.probe.runs.lock().is_empty() {
        std::thread::sleep(Duration::from_millis(2));
    }
    let t0 = Instant::now();
    let rep = rig
        .engine
        .cancel(FlushScope::Items(vec![pending[0], running[0]]))
        .unwrap();
    assert_eq!(rep.outcomes[0].1, CancelOutcome::CancelledPending);
    assert_eq!(rep.outcomes[1].1, CancelOutcome::WasRunning);
    rep.running.wait(Some(Duration::from_secs(5))).unwrap();
    assert!(
        t0.elapsed() < Duration::from_secs(4),
        "the handler saw the signal"
    );
    let res = rig.engine.results(&[pending[0], running[0]]);
    assert_eq!(res[0].as_ref().unwrap().state, State::Cancelled);
    assert_eq!(res[1].as_ref().unwrap().state, State::Cancelled);
    rig.set_live("0-1");
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(rig.probe.runs.lock().len(), 1, "the pending one never ran");
    let again = rig
        .engine
        .cancel(FlushScope::Items(vec![pending[0], 999_999]))
        .unwrap();
    assert_eq!(
        again.outcomes[0].1,
        CancelOutcome::AlreadyTerminal(State::Cancelled)
    );
    assert_eq!(again.outcomes[1].1, CancelOutcome::Unknown);
}

#[test]
fn workqueue_flush_covers_only_what_was_queued_before() {
    let rig = Rig::new(2, "0-1");
    let before = rig.submit(
        "default",
        (0..4)
            .map(|_| item("cpu:0", "probe").arg("ms", "20"))
            .collect(),
    );
    let f = rig
        .engine
        .flush(FlushScope::Workqueue("default".into()))
        .unwrap();
    let after = rig.submit(
        "default",
        (0..4)
            .map(|_| item("cpu:0", "probe").arg("ms", "20"))
            .collect(),
    );
    assert_eq!(f.covered(), 4);
    let sum = f.wait(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(sum.by_state.get(&State::Ok), Some(&4));
    let now = rig.engine.results(&before);
    assert!(now.iter().all(|r| r.as_ref().unwrap().state == State::Ok));
    rig.flush(&after);
}

#[test]
fn flush_timeout_ends_the_wait_not_the_work() {
    let rig = Rig::new(2, "0-1");
    let ids = rig.submit("default", vec![item("cpu:0", "probe").arg("ms", "300")]);
    let f = rig.engine.flush(FlushScope::Items(ids.clone())).unwrap();
    assert!(matches!(
        f.wait(Some(Duration::from_millis(20))),
        Err(EngineError::Timeout(_))
    ));
    assert_eq!(rig.flush(&ids)[0].state, State::Ok);
    assert_eq!(
        rig.engine.stats().flushes,
        0,
        "dropped flushes leave nothing behind"
    );
}

#[test]
fn drain_refuses_new_work_until_empty() {
    let rig = Rig::new(2, "0-1");
    rig.submit(
        "default",
        (0..3)
            .map(|_| item("cpu:0", "probe").arg("ms", "30"))
            .collect(),
    );
    let d = rig.engine.drain("default").unwrap();
    assert!(matches!(
        rig.engine.submit("default", vec![item("cpu:0", "probe")]),
        Err(EngineError::Draining(_))
    ));
    d.wait(Some(Duration::from_secs(10))).unwrap();
    rig.submit("default", vec![item("cpu:0", "probe")]);
}

#[test]
fn ordered_runs_one_at_a_time_in_order() {
    let rig = Rig::new(4, "0-3");
    rig.wq("ord", |a| a.ordered = true);
    let targets = ["cpu:0", "cpu:1", "cpu:2", "cpu:3", "all", "cpus:1-2"];
    let ids = rig.submit(
        "ord",
        (0..24)
            .map(|i| item(targets[i % targets.len()], "probe").arg("ms", "2"))
            .collect(),
    );
    rig.flush(&ids);
    let order: Vec<u64> = rig.probe.runs.lock().iter().map(|r| r.0).collect();
    assert_eq!(order, ids, "strict FIFO");
    assert_eq!(
        rig.probe.max_total.load(Ordering::SeqCst),
        1,
        "one at a time"
    );
}

#[test]
fn max_active_and_group_cap_limit_concurrency() {
    let rig = Rig::new(4, "0-3");
    rig.wq("wide", |a| a.max_active = 3);
    let ids = rig.submit(
        "wide",
        (0..12)
            .map(|_| item("cpu:1", "probe").arg("ms", "30"))
            .collect(),
    );
    rig.flush(&ids);
    assert_eq!(rig.probe.max_running.lock().get(&1), Some(&3));
    rig.wq("capped", |a| a.group_max_active = 2);
    rig.probe.max_total.store(0, Ordering::SeqCst);
    let ids = rig.submit(
        "capped",
        (0..12)
            .map(|_| item("all", "probe").arg("ms", "20"))
            .collect(),
    );
    rig.flush(&ids);
    assert_eq!(rig.probe.max_total.load(Ordering::SeqCst), 2);
}

#[test]
fn waiting_handlers_do_not_hold_the_cpu_slot() {
    let rig = Rig::new(2, "0-1");
    // A long waiting item on cpu 0, then CPU-bound items there: they must not wait for it.
    let w = rig.submit("default", vec![item("cpu:0", "wait").arg("ms", "3000")]);
    std::thread::sleep(Duration::from_millis(30));
    let t0 = Instant::now();
    let ids = rig.submit("default", (0..3).map(|_| item("cpu:0", "probe")).collect());
    let res = rig.flush(&ids);
    assert!(res.iter().all(|r| r.state == State::Ok));
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "CPU-bound work ran beside the waiter"
    );
    rig.engine
        .cancel(FlushScope::Items(w))
        .unwrap()
        .running
        .wait(None)
        .unwrap();
}

/// Back-to-back batches of CPU-bound items (`max_active` 1) must not start a thread per
/// submit: a worker woken but not yet in the engine lock is coming, and another wake-up for
/// the same free slot is not sent. Before the `coming` count, each submit that found the
/// woken worker not yet running started another, up to `max_workers_per_cpu` (64) per CPU.
#[test]
fn back_to_back_batches_do_not_start_a_worker_per_submit() {
    let rig = Rig::new(2, "0-1");
    let mut ids = Vec::new();
    let mut most = 0;
    for _ in 0..300 {
        ids.extend(rig.submit("default", (0..200).map(|_| item("all", "noop")).collect()));
        most = most.max(rig.engine.stats().workers);
    }
    let res = rig.flush(&ids);
    assert_eq!(res.len(), 60_000);
    assert!(res.iter().all(|r| r.state == State::Ok));
    // Per CPU: the worker that runs and the one kept in reserve.
    assert!(most <= 4, "{most} workers for 2 CPUs of max_active 1");
}

/// The other side of the same rule: items that wait (`max_waiting` 256 per CPU) get a worker
/// each, all of them at once, however quickly they are submitted one by one.
#[test]
fn waiting_items_submitted_one_by_one_all_wait_at_once() {
    let rig = Rig::new(2, "0-1");
    let ids: Vec<u64> = (0..12)
        .flat_map(|_| rig.submit("default", vec![item("cpu:1", "wait").arg("ms", "300")]))
        .collect();
    let res = rig.flush(&ids);
    assert!(res.iter().all(|r| r.state == State::Ok));
    assert_eq!(rig.probe.max_total.load(Ordering::SeqCst), 12);
}

/// A flush streams: a worker holds the events of the items it finishes in one lock hold and
/// sends them together at the end of that hold, never later. The quick items' events arrive
/// while a long item of the same flush still runs.
#[test]
fn flush_events_arrive_while_other_covered_items_still_run() {
    let rig = Rig::new(2, "0-1");
    let mut ids = rig.submit("default", vec![item("cpu:1", "probe").arg("ms", "1500")]);
    ids.extend(rig.submit("default", (0..40).map(|_| item("cpu:0", "noop")).collect()));
    let t0 = Instant::now();
    let mut f = rig.engine.flush(FlushScope::Items(ids.clone())).unwrap();
    let deadline = Some(t0 + Duration::from_secs(10));
    let mut quick = 0;
    while quick < 40 {
        match f.next_blocking(deadline).expect("flush timed out") {
            Some(FlushEvent::Done(r)) if r.id != ids[0] => quick += 1,
            Some(ev) => panic!("the long item ended first: {ev:?}"),
            None => panic!("the flush ended before its events"),
        }
    }
    assert!(
        t0.elapsed() < Duration::from_millis(1000),
        "40 noops' events took {:?}: held behind the long item?",
        t0.elapsed()
    );
    match f.next_blocking(deadline).expect("flush timed out") {
        Some(FlushEvent::Done(r)) => assert_eq!((r.id, r.state), (ids[0], State::Ok)),
        other => panic!("expected the long item's result, got {other:?}"),
    }
    assert!(f.next_blocking(deadline).expect("closed").is_none());
}

#[test]
fn panics_fail_the_item_and_the_worker_carries_on() {
    let rig = Rig::new(2, "0-1");
    let ids = rig.submit(
        "default",
        vec![
            item("cpu:0", "noop").arg("panic", "1"),
            item("cpu:0", "noop").arg("fail", "boom"),
            item("cpu:0", "noop"),
        ],
    );
    let res = rig.flush(&ids);
    assert_eq!(res[0].state, State::Failed);
    assert!(res[0].error.contains("panicked"), "{}", res[0].error);
    assert_eq!(
        (res[1].state, res[1].error.as_str()),
        (State::Failed, "boom")
    );
    assert_eq!(res[2].state, State::Ok);
}

#[test]
fn a_bad_batch_changes_nothing() {
    let rig = Rig::new(2, "0-1");
    let before = rig.engine.workqueues();
    let bad = vec![item("cpu:0", "probe"), item("cpu:0", "nope")];
    match rig.engine.submit("default", bad) {
        Err(EngineError::UnknownHandler { index: 1, name, .. }) => assert_eq!(name, "nope"),
        other => panic!("{other:?}"),
    }
    let bad = vec![item("cpu:0", "probe"), item("cpu:0", "probe").arg("x", "1")];
    assert!(matches!(
        rig.engine.submit("default", bad),
        Err(EngineError::Handler { index: 1, .. })
    ));
    let bad = vec![item("cpu:0", "probe"), item("cpu:9", "probe")];
    assert!(matches!(
        rig.engine.submit("default", bad),
        Err(EngineError::Group { index: 1, .. })
    ));
    assert!(matches!(
        rig.engine.submit("nope", vec![item("cpu:0", "probe")]),
        Err(EngineError::UnknownWorkqueue(_))
    ));
    assert_eq!(rig.engine.workqueues(), before);
    assert_eq!(rig.engine.stats().items, 0);
    assert!(rig.probe.runs.lock().is_empty());
}

#[test]
fn full_workqueue_pushes_back() {
    let rig = Rig::new(2, "0");
    rig.wq("small", |a| {
        a.max_queued = 5;
        a.fallback = Fallback::Wait;
    });
    rig.submit("small", (0..4).map(|_| item("cpu:1", "probe")).collect());
    match rig.engine.submit(
        "small",
        (0..2).map(|_| item("cpu:1", "probe")).collect::<Vec<_>>(),
    ) {
        Err(EngineError::QueueFull {
            limit: 5,
            pending: 4,
            adding: 2,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    rig.submit("small", vec![item("cpu:1", "probe")]);
    let _ = &rig.topo;
}

#[test]
fn workqueue_attrs_defaults_and_changes() {
    // The defaults docs/workqueues.md lists, in the one constructor.
    let d = WorkqueueAttrs::named("w");
    assert_eq!(
        (
            d.max_active,
            d.max_waiting,
            d.group_max_active,
            d.ordered,
            d.nice
        ),
        (1, 256, 0, false, 0)
    );
    assert_eq!(
        (d.placement, d.fallback, d.max_queued),
        (Placement::Spread, Fallback::Widen, 1 << 20)
    );
    assert_eq!(WorkqueueAttrs::default(), WorkqueueAttrs::named("default"));
    assert_eq!(d.clone().with(&WorkqueueChanges::default()), d);
    let c = WorkqueueChanges {
        nice: Some(5),
        placement: Some(Placement::First),
        ..Default::default()
    };
    let a = WorkqueueAttrs::new("w", 7).with(&c);
    assert_eq!(
        (a.nice, a.placement, a.max_queued, a.max_active),
        (5, Placement::First, 7, 1)
    );
}

#[test]
fn workqueue_lifecycle() {
    let rig = Rig::new(2, "0-1");
    rig.wq("tmp", |_| {});
    assert!(matches!(
        rig.engine.create_workqueue(WorkqueueAttrs::named("tmp")),
        Err(EngineError::WorkqueueExists(_))
    ));
    let mut a = WorkqueueAttrs::named("tmp");
    a.max_active = 0;
    assert!(matches!(
        rig.engine.update_workqueue(a),
        Err(EngineError::InvalidAttrs(_))
    ));
    let mut a = WorkqueueAttrs::named("tmp");
    a.max_active = 4;
    rig.engine.update_workqueue(a).unwrap();
    assert_eq!(
        rig.engine
            .workqueues()
            .iter()
            .find(|w| w.attrs.name == "tmp")
            .unwrap()
            .attrs
            .max_active,
        4
    );
    assert!(matches!(
        rig.engine.delete_workqueue("default"),
        Err(EngineError::DefaultWorkqueue)
    ));
    rig.engine.delete_workqueue("tmp").unwrap();
    assert!(matches!(
        rig.engine.delete_workqueue("tmp"),
        Err(EngineError::UnknownWorkqueue(_))
    ));
}

#[derive(Default)]
struct Seen {
    submitted: AtomicUsize,
    started: AtomicUsize,
    finished: Mutex<Vec<State>>,
    lockups: AtomicUsize,
    hogs: AtomicUsize,
}

impl wqd_core::engine::Observer for Seen {
    fn submitted(&self, _wq: &str, n: usize) {
        self.submitted.fetch_add(n, Ordering::SeqCst);
    }
    fn started(&self, _wq: &str, _cpu: u32, _w: Duration) {
        self.started.fetch_add(1, Ordering::SeqCst);
    }
    fn finished(&self, r: &wqd_core::engine::Ended) {
        self.finished.lock().push(r.state);
    }
    fn lockup(&self, _cpu: u32) {
        self.lockups.fetch_add(1, Ordering::SeqCst);
    }
    fn hog(&self, _cpu: u32) {
        self.hogs.fetch_add(1, Ordering::SeqCst);
    }
}

/// An engine on 2 live CPUs with the built-in handlers and `probe`, configured by `cfg` (which
/// names the observer).
fn observed_engine(cfg: EngineConfig) -> Engine {
    let topo = common::topology(2);
    let snap = common::snapshot(&topo, 1, &"0-1".parse().unwrap());
    let mut reg = Registry::with_builtins(None);
    reg.register(Arc::new(ProbeHandler(
        Arc::new(Probe::default()),
        "probe",
        HandlerKind::CpuBound,
    )));
    Engine::start(cfg, reg, snap).unwrap()
}

#[test]
fn watchdog_reports_lockups_and_hogs_and_the_observer_sees_everything() {
    let seen = Arc::new(Seen::default());
    let engine = observed_engine(EngineConfig {
        pinning: false,
        watchdog_thresh: Duration::from_millis(100),
        hog_thresh: Duration::from_millis(100),
        observer: Some(seen.clone()),
        ..EngineConfig::default()
    });
    // A long item on cpu 0 and one queued behind it: the pool has work and makes no progress.
    let r = engine
        .submit(
            "default",
            vec![
                ItemSpec::new(Target::Cpu(0), "probe").arg("ms", "600"),
                ItemSpec::new(Target::Cpu(0), "probe"),
                ItemSpec::new(Target::Cpu(1), "noop").arg("fail", "x"),
            ],
        )
        .unwrap();
    let ids: Vec<u64> = r.items.iter().map(|i| i.id).collect();
    engine
        .flush(FlushScope::Items(ids))
        .unwrap()
        .wait(Some(Duration::from_secs(10)))
        .unwrap();
    let st = engine.stats();
    assert!(st.lockups >= 1, "lockup reported: {st:?}");
    assert!(st.hogs >= 1, "hog reported");
    assert_eq!(seen.lockups.load(Ordering::SeqCst) as u64, st.lockups);
    assert_eq!(seen.hogs.load(Ordering::SeqCst) as u64, st.hogs);
    assert_eq!(seen.submitted.load(Ordering::SeqCst), 3);
    assert_eq!(seen.started.load(Ordering::SeqCst), 3);
    let mut fin = seen.finished.lock().clone();
    fin.sort();
    assert_eq!(fin, vec![State::Ok, State::Ok, State::Failed]);
}

#[test]
fn summary_flush_counts_without_per_item_events() {
    let rig = Rig::new(2, "0-1");
    let early = rig.submit("default", vec![item("cpu:0", "noop")]);
    rig.flush(&early);
    let ids = rig.submit(
        "default",
        vec![
            item("cpu:0", "probe").arg("ms", "10"),
            item("cpu:1", "noop").arg("fail", "x"),
            item("cpu:1", "probe"),
        ],
    );
    let mut all = early.clone();
    all.extend(&ids);
    let mut f = rig.engine.flush_summary(FlushScope::Items(all)).unwrap();
    assert_eq!(f.covered(), 4);
    let sum = {
        // No per-item event ever arrives; the channel just closes at the end.
        assert!(f
            .next_blocking(Some(Instant::now() + Duration::from_secs(10)))
            .unwrap()
            .is_none());
        f.wait(Some(Duration::from_secs(1))).unwrap()
    };
    assert_eq!(sum.by_state.get(&State::Ok), Some(&3));
    assert_eq!(sum.by_state.get(&State::Failed), Some(&1));
    assert_eq!(sum.gone, 0);
    assert_eq!(rig.engine.stats().flushes, 0);
}

/// `Flush::wait` on an event flush switches it to counting while items are still finishing:
/// each item must be counted exactly once, whether its event was already sent or it found
/// the tally.
#[test]
fn waiting_on_an_event_flush_counts_every_item_once() {
    let rig = Rig::new(2, "0-1");
    for round in 0..20 {
        let mut items: Vec<ItemSpec> = (0..50).map(|_| item("cpu:0", "noop")).collect();
        items.extend((0..50).map(|_| item("cpu:1", "noop").arg("fail", "x")));
        items.push(item("cpu:1", "probe").arg("ms", "2"));
        let ids = rig.submit("default", items);
        let f = rig.engine.flush(FlushScope::Items(ids)).unwrap();
        if round % 2 == 0 {
            // Let some items end (and send their events) before the switch.
            std::thread::sleep(Duration::from_micros(200));
        }
        let sum = f.wait(Some(Duration::from_secs(20))).unwrap();
        assert_eq!(sum.covered, 101);
        assert_eq!(sum.by_state.get(&State::Ok), Some(&51), "round {round}");
        assert_eq!(sum.by_state.get(&State::Failed), Some(&50), "round {round}");
        assert_eq!(sum.gone, 0);
    }
    assert_eq!(rig.engine.stats().flushes, 0);
}

/// Batched takes: a worker whose items run in microseconds binds several per lock hold and
/// runs them one by one, each after its own start check. With the CPU leaving and returning
/// and cancels landing while items wait bound in such a batch, every item still ends exactly
/// once, a cancelled item never runs, an item runs on its own CPU or through a recorded
/// fallback, and the CPU never runs two of them at once (`max_active` 1).
#[test]
fn batched_takes_lose_nothing_under_hotplug_and_cancel() {
    let rig = Rig::new(2, "0-1");
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (ids, results) = std::thread::scope(|sc| {
        sc.spawn(|| {
            let mut k = 0;
            while !stop.load(Ordering::SeqCst) {
                rig.set_live(if k % 2 == 0 { "1" } else { "0-1" });
                k += 1;
                std::thread::sleep(Duration::from_micros(200));
            }
            rig.set_live("0-1");
        });
        // Submit in chunks; cancel every 7th item of the previous chunk, which by then is
        // partly pending, partly bound in a worker's batch, running or done.
        let mut ids: Vec<u64> = Vec::new();
        let mut prev: Vec<u64> = Vec::new();
        let until = Instant::now() + Duration::from_millis(300);
        while Instant::now() < until {
            let chunk = rig.submit(
                "default",
                (0..200).map(|_| item("cpu:0", "probe")).collect(),
            );
            let doomed: Vec<u64> = prev.iter().copied().filter(|id| id % 7 == 0).collect();
            rig.engine.cancel(FlushScope::Items(doomed)).unwrap();
            ids.extend(&chunk);
            prev = chunk;
        }
        let results = rig.flush(&ids);
        stop.store(true, Ordering::SeqCst);
        (ids, results)
    });
    let n = ids.len();
    assert_eq!(results.len(), n, "every item ends once");
    let mut ran: BTreeMap<u64, usize> = BTreeMap::new();
    for (id, _) in rig.probe.runs.lock().iter() {
        *ran.entry(*id).or_default() += 1;
    }
    for r in &results {
        let runs = ran.get(&r.id).copied().unwrap_or(0);
        match r.state {
            State::Ok => assert_eq!(runs, 1, "item {} ran {runs} times", r.id),
            State::Cancelled => {
                assert_eq!(runs, 0, "cancelled item {} ran", r.id);
                assert_eq!(r.id % 7, 0, "item {} cancelled without being asked", r.id);
            }
            s => panic!("item {} ended {s}", r.id),
        }
        if r.state == State::Ok {
            assert!(
                r.cpu_started == Some(0) || r.fallback.is_some(),
                "item {} started on {:?} without a fallback",
                r.id,
                r.cpu_started
            );
        }
    }
    assert_eq!(ran.values().sum::<usize>(), ran.len(), "no item ran twice");
    for (&cpu, &m) in rig.probe.max_running.lock().iter() {
        assert!(m <= 1, "cpu {cpu} ran {m} items at once");
    }
}

/// Batched takes share a body: the copies of one item claimed behind the first job of a batch
/// run with that job's body, while items claimed behind it that only do the same work (same
/// handler and arguments, another payload) run with their own. Runs of copies and distinct
/// payloads alternate through one CPU's worker; every `digest` result must be the hash of its
/// own item's payload.
#[test]
fn batched_takes_run_each_item_with_its_own_payload() {
    let rig = Rig::new(2, "0");
    let payload =
        |i: usize| format!("payload {}", if i % 8 < 4 { i / 8 } else { 1000 + i }).into_bytes();
    for round in 0..5 {
        let specs: Vec<ItemSpec> = (0..800)
            .map(|i| {
                let mut s = item("cpu:0", "digest");
                s.payload = payload(i);
                s
            })
            .collect();
        let ids = rig.submit("default", specs);
        let results = rig.flush(&ids);
        assert_eq!(results.len(), ids.len(), "round {round}");
        for (i, (id, r)) in ids.iter().zip(&results).enumerate() {
            assert_eq!(r.id, *id);
            assert_eq!(r.state, State::Ok, "round {round}, item {i}: {}", r.error);
            let mut h = <sha2::Sha256 as sha2::Digest>::new();
            sha2::Digest::update(&mut h, payload(i));
            assert_eq!(
                r.output,
                hex::encode(sha2::Digest::finalize(h)).into_bytes(),
                "round {round}, item {i}: the hash of another payload"
            );
        }
    }
}

/// Wall-clock times of items run one at a time on one CPU (`max_active` 1, batched takes,
/// where a job's start reuses the counter reading that ended the job before it, and a
/// batch's times are placed between two real readings of the wall clock, `engine/clock.rs`):
/// each item starts after it was queued and ends after it starts, no item starts before the
/// one run before it ended, and every time lies between readings of the wall clock taken
/// before the submit and after the flush.
#[test]
fn items_run_one_at_a_time_have_ordered_times() {
    let rig = Rig::new(2, "0");
    for round in 0..3 {
        let before = SystemTime::now();
        let ids = rig.submit("default", (0..600).map(|_| item("cpu:0", "noop")).collect());
        let mut results = rig.flush(&ids);
        let after = SystemTime::now();
        results.sort_by_key(|r| (r.started_at, r.id));
        let mut prev_end = None;
        for r in &results {
            let (Some(start), Some(end)) = (r.started_at, r.finished_at) else {
                panic!("round {round}: item {} has no times", r.id);
            };
            assert!(
                before <= start && end <= after,
                "round {round}: item {} ran {start:?}..{end:?}, outside {before:?}..{after:?}",
                r.id
            );
            assert!(
                r.queued_at <= start,
                "round {round}: item {} started before it was queued",
                r.id
            );
            assert!(
                start <= end,
                "round {round}: item {} ended before it started",
                r.id
            );
            if let Some(p) = prev_end {
                assert!(
                    p <= start,
                    "round {round}: item {} started before the one before it ended",
                    r.id
                );
            }
            prev_end = Some(end);
        }
    }
}

/// `stamp`: a quick CPU-bound handler that returns the wall clock as it runs (nanoseconds
/// since the epoch, little-endian).
struct Stamp;

impl Handler for Stamp {
    fn name(&self) -> &str {
        "stamp"
    }
    fn validate(&self, _args: &Args, _payload: &[u8]) -> Result<(), HandlerError> {
        Ok(())
    }
    fn run(&self, _ctx: &WorkCtx<'_>) -> Result<Vec<u8>, HandlerError> {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        Ok(now.as_nanos().to_le_bytes().to_vec())
    }
}

/// The times a worker places on the wall clock after a batch (`engine/clock.rs`) agree with
/// the wall clock the handler itself read while it ran: each item's handler ran between its
/// `started_at` and `finished_at`, within 2 µs (the counter is read without fencing, a few
/// dozen cycles either way). Items of a batch are timed by the CPU's counter between two
/// wall-clock readings, so a wrong scale or origin puts later items of a batch microseconds
/// off (checked: times placed at one nanosecond per counter tick fail here).
#[test]
fn placed_times_agree_with_the_handlers_own_clock() {
    let topo = common::topology(2);
    let snap = common::snapshot(&topo, 1, &"0".parse().unwrap());
    let mut reg = Registry::with_builtins(None);
    reg.register(Arc::new(Stamp));
    let cfg = EngineConfig {
        pinning: false,
        ..EngineConfig::default()
    };
    let engine = Engine::start(cfg, reg, snap).unwrap();
    let slack = Duration::from_micros(2);
    for round in 0..3 {
        let items: Vec<ItemSpec> = (0..600).map(|_| item("cpu:0", "stamp")).collect();
        let (receipt, flush) = engine.submit_and_flush("default", items, true).unwrap();
        assert_eq!(flush.wait(None).unwrap().covered, 600, "round {round}");
        let ids: Vec<u64> = receipt.items.iter().map(|i| i.id).collect();
        let results: Vec<_> = engine.results(&ids).into_iter().flatten().collect();
        assert_eq!(results.len(), 600, "round {round}");
        for r in results {
            let ran = u128::from_le_bytes(r.output[..16].try_into().unwrap());
            let ran = SystemTime::UNIX_EPOCH + Duration::from_nanos(ran as u64);
            let (Some(start), Some(end)) = (r.started_at, r.finished_at) else {
                panic!("round {round}: item {} has no times", r.id);
            };
            assert!(
                start <= ran + slack && ran <= end + slack,
                "round {round}: item {} ran at {ran:?}, placed {start:?}..{end:?}",
                r.id
            );
        }
    }
}

// ----- issue #10: hostile input and faults -----

/// A `probe` item with a delay and/or deadline.
fn timed(t: &str, delay: Option<Duration>, deadline: Option<Duration>) -> ItemSpec {
    let mut i = item(t, "probe");
    i.delay = delay;
    i.deadline = deadline;
    i
}

#[test]
fn huge_delays_and_deadlines_refuse_the_whole_batch() {
    let rig = Rig::new(2, "0-1");
    let before = rig.engine.workqueues();
    let huge = Duration::from_secs(i64::MAX as u64);
    for (bad, field) in [
        (timed("cpu:0", Some(huge), None), "delay"),
        (timed("cpu:0", None, Some(huge)), "deadline"),
        (timed("cpu:0", Some(Duration::MAX), None), "delay"),
        // Just over the default limit of 365 days.
        (
            timed("cpu:0", Some(Duration::from_secs(366 * 86_400)), None),
            "delay",
        ),
    ] {
        let mut batch = vec![keyed("cpu:0", "k0"), keyed("cpu:0", "k1")];
        batch.push(bad);
        match rig.engine.submit("default", batch) {
            Err(EngineError::Duration {
                index: 2,
                field: f,
                problem,
            }) => {
                assert_eq!(f, field, "{problem}");
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(rig.engine.workqueues(), before, "nothing half-applied");
    assert_eq!(rig.engine.stats().items, 0);
    assert!(rig.probe.runs.lock().is_empty());
    // The keys were never taken: the same keys queue now.
    let ids = rig.submit("default", vec![keyed("cpu:0", "k0"), keyed("cpu:0", "k1")]);
    let res = rig.flush(&ids);
    assert!(res.iter().all(|r| r.state == State::Ok), "{res:?}");
    // A limit set lower refuses what the default accepted.
    rig.engine
        .set_max_durations(Duration::from_secs(1), Duration::from_secs(1));
    assert!(matches!(
        rig.engine.submit(
            "default",
            vec![timed("cpu:0", None, Some(Duration::from_secs(2)))]
        ),
        Err(EngineError::Duration {
            field: "deadline",
            ..
        })
    ));
}

#[test]
fn flushing_a_delayed_item_queues_it_at_once() {
    let rig = Rig::new(2, "0-1");
    let hour = Some(Duration::from_secs(3600));
    let ids = rig.submit(
        "default",
        vec![timed("cpu:0", hour, None), timed("cpu:1", hour, None)],
    );
    let r = rig.engine.results(&ids);
    assert!(
        r.iter()
            .all(|r| r.as_ref().unwrap().state == State::Delayed),
        "{r:?}"
    );
    // A workqueue flush leaves delayed items out, says so, and returns at once.
    let f = rig
        .engine
        .flush(FlushScope::Workqueue("default".into()))
        .unwrap();
    assert_eq!(f.covered(), 0);
    assert_eq!(f.delayed_not_covered(), 2);
    let sum = f.wait(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(sum.delayed_not_covered, 2);
    // Flushing one item by id queues it now (flush_delayed_work) and waits for it.
    let t0 = Instant::now();
    let res = rig.flush(&ids[..1]);
    assert_eq!(res[0].state, State::Ok);
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert_eq!(
        rig.engine.results(&ids[1..])[0].as_ref().unwrap().state,
        State::Delayed
    );
    // Including delayed items in a workqueue flush covers the other one.
    let sum = rig
        .engine
        .flush(FlushScope::WorkqueueAll("default".into()))
        .unwrap()
        .wait(Some(Duration::from_secs(10)))
        .unwrap();
    assert_eq!(sum.covered, 1);
    assert_eq!(sum.by_state.get(&State::Ok), Some(&1));
    assert_eq!(rig.engine.stats().items, 0);
}

#[test]
fn drain_queues_delayed_items_and_a_batch_flush_covers_them() {
    let rig = Rig::new(2, "0-1");
    rig.wq("d", |_| {});
    let far = Some(Duration::from_secs(50 * 365 * 86_400 / 100));
    let r = rig
        .engine
        .submit(
            "d",
            vec![timed("cpu:0", far, None), timed("cpu:1", far, None)],
        )
        .unwrap();
    let sum = rig
        .engine
        .flush(FlushScope::Batch(r.batch))
        .unwrap()
        .wait(Some(Duration::from_secs(10)))
        .expect("a batch flush does not wait out the delay");
    assert_eq!(sum.by_state.get(&State::Ok), Some(&2));
    rig.submit("d", vec![timed("cpu:0", far, None)]);
    let sum = rig
        .engine
        .drain("d")
        .unwrap()
        .wait(Some(Duration::from_secs(10)))
        .expect("drain empties the workqueue");
    assert_eq!(sum.by_state.get(&State::Ok), Some(&1));
    rig.engine.delete_workqueue("d").unwrap();
}

#[test]
fn totals_never_go_down_when_a_workqueue_is_deleted() {
    let rig = Rig::new(2, "0-1");
    rig.wq("gone", |_| {});
    let ids = rig.submit("gone", (0..7).map(|_| item("cpu:0", "probe")).collect());
    rig.flush(&ids);
    let ids = rig.submit("default", (0..3).map(|_| item("cpu:1", "probe")).collect());
    rig.flush(&ids);
    let before = rig.engine.stats().totals;
    assert_eq!(before.get(&State::Ok), Some(&10));
    rig.engine.delete_workqueue("gone").unwrap();
    assert_eq!(rig.engine.stats().totals, before);
}

#[test]
fn dot_names_are_refused_and_an_update_ends_a_left_drain() {
    let rig = Rig::new(2, "0-1");
    for bad in [".", ".."] {
        assert!(matches!(
            rig.engine.create_workqueue(WorkqueueAttrs::named(bad)),
            Err(EngineError::InvalidAttrs(_))
        ));
    }
    rig.wq("w", |a| a.fallback = Fallback::Wait);
    rig.set_live("0");
    // Pending forever on the offline cpu 1: a drain's caller gives up.
    rig.submit("w", vec![item("cpu:1", "probe")]);
    let f = rig.engine.drain("w").unwrap();
    assert!(f.wait(Some(Duration::from_millis(50))).is_err());
    assert!(rig
        .engine
        .workqueues()
        .iter()
        .any(|w| w.attrs.name == "w" && w.draining));
    assert!(matches!(
        rig.engine.submit("w", vec![item("cpu:0", "probe")]),
        Err(EngineError::Draining(_))
    ));
    // An update takes the workqueue back.
    let mut a = WorkqueueAttrs::named("w");
    a.fallback = Fallback::Wait;
    rig.engine.update_workqueue(a).unwrap();
    assert!(rig
        .engine
        .workqueues()
        .iter()
        .any(|w| w.attrs.name == "w" && !w.draining));
    let ids = rig.submit("w", vec![item("cpu:0", "probe")]);
    assert_eq!(rig.flush(&ids)[0].state, State::Ok);
}

#[test]
fn timers_of_ended_items_do_not_pile_up() {
    let rig = Rig::new(2, "0-1");
    // Each item has a deadline an hour away and ends at once: its timer is garbage.
    for _ in 0..10 {
        let ids = rig.submit(
            "default",
            (0..1000)
                .map(|_| timed("cpu:0", None, Some(Duration::from_secs(3600))))
                .collect(),
        );
        rig.flush(&ids);
    }
    let st = rig.engine.stats();
    assert_eq!(st.items, 0);
    assert!(
        st.timers <= 2048,
        "{} timer entries for 0 live items",
        st.timers
    );
}

#[test]
fn results_are_bounded_in_bytes() {
    struct Big;
    impl Handler for Big {
        fn name(&self) -> &str {
            "big"
        }
        fn validate(&self, _a: &Args, _p: &[u8]) -> Result<(), HandlerError> {
            Ok(())
        }
        fn run(&self, ctx: &WorkCtx<'_>) -> Result<Vec<u8>, HandlerError> {
            if ctx.item.is_multiple_of(2) {
                Err(HandlerError::Failed("e".repeat(100_000)))
            } else {
                Ok(vec![1; 100_000])
            }
        }
    }
    let topo = common::topology(2);
    let snap = common::snapshot(&topo, 1, &"0-1".parse().unwrap());
    let mut reg = Registry::new();
    reg.register(Arc::new(Big));
    let cfg = EngineConfig {
        pinning: false,
        max_result_bytes: 1000,
        results_memory: 50_000,
        ..EngineConfig::default()
    };
    let engine = Engine::start(cfg, reg, snap).unwrap();
    // The flush is registered with the submit: 200 results of ~1 KB overflow the 50 KB store,
    // so a flush that began after the first items ended could find them already forgotten.
    let (_, mut f) = engine
        .submit_and_flush(
            "default",
            (0..200).map(|_| item("cpu:0", "big")).collect::<Vec<_>>(),
            false,
        )
        .unwrap();
    let mut seen = 0;
    while let Some(ev) = f
        .next_blocking(Some(Instant::now() + Duration::from_secs(20)))
        .unwrap()
    {
        if let FlushEvent::Done(r) = ev {
            seen += 1;
            assert!(
                r.output.len() <= 1000 && r.error.len() <= 1000,
                "{}",
                r.error.len()
            );
            if r.state == State::Ok {
                assert!(
                    r.error.contains("output cut from 100000 to 1000 bytes"),
                    "{}",
                    r.error
                );
            } else {
                assert!(r.error.ends_with("bytes, cut)"), "{}", &r.error[900..]);
            }
        }
    }
    assert_eq!(seen, 200);
    let st = engine.stats();
    assert!(st.results_bytes <= 50_000, "{} bytes", st.results_bytes);
    assert!(st.results < 200 && st.results > 0, "{}", st.results);
}

#[test]
fn shutdown_is_bounded_by_a_handler_that_ignores_cancellation() {
    struct Stubborn;
    impl Handler for Stubborn {
        fn name(&self) -> &str {
            "stubborn"
        }
        fn validate(&self, _a: &Args, _p: &[u8]) -> Result<(), HandlerError> {
            Ok(())
        }
        fn run(&self, _ctx: &WorkCtx<'_>) -> Result<Vec<u8>, HandlerError> {
            std::thread::sleep(Duration::from_secs(30));
            Ok(Vec::new())
        }
    }
    let topo = common::topology(2);
    let snap = common::snapshot(&topo, 1, &"0-1".parse().unwrap());
    let mut reg = Registry::new();
    reg.register(Arc::new(Stubborn));
    let cfg = EngineConfig {
        pinning: false,
        ..EngineConfig::default()
    };
    let engine = Engine::start(cfg, reg, snap).unwrap();
    let r = engine
        .submit("default", vec![item("cpu:0", "stubborn")])
        .unwrap();
    let t0 = Instant::now();
    while engine.results(&[r.first])[0].as_ref().map(|r| r.state) != Some(State::Running) {
        assert!(t0.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(2));
    }
    let t0 = Instant::now();
    engine.shutdown(Duration::from_millis(100));
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(15), "shutdown took {took:?}");
    assert_eq!(engine.stragglers(), 1);
}

#[test]
fn fallback_results_say_which_epoch_decided() {
    let rig = Rig::new(4, "0-3");
    rig.wq("rej", |a| a.fallback = Fallback::Reject);
    rig.set_live("0-1"); // epoch 2
    let ids = rig.submit("default", vec![item("cpu:3", "probe")]);
    let r = &rig.flush(&ids)[0];
    assert!(r.fallback.is_some(), "{r:?}");
    assert_eq!(r.epoch_decided, Some(2));
    rig.set_live("0"); // epoch 3
    let ids = rig.submit("rej", vec![item("cpu:3", "probe")]);
    let r = &rig.flush(&ids)[0];
    assert_eq!(r.state, State::Rejected);
    assert_eq!(r.epoch_decided, Some(3));
    let ids = rig.submit("default", vec![item("cpu:0", "probe")]);
    assert_eq!(rig.flush(&ids)[0].epoch_decided, None);
}

/// Every terminal item the observer heard of: (id, state, run time known).
#[derive(Default)]
struct Ends(Mutex<Vec<(u64, State, bool)>>);

impl wqd_core::engine::Observer for Ends {
    fn finished(&self, e: &wqd_core::engine::Ended) {
        self.0.lock().push((e.id, e.state, e.run_time.is_some()));
    }
}

#[test]
fn results_modes_keep_what_they_say_and_every_item_still_ends_once() {
    let ends = Arc::new(Ends::default());
    let engine = observed_engine(EngineConfig {
        pinning: false,
        observer: Some(ends.clone()),
        ..EngineConfig::default()
    });
    for (name, mode) in [("sum", ResultsMode::Summary), ("none", ResultsMode::None)] {
        let mut a = WorkqueueAttrs::named(name);
        a.results = mode;
        a.max_active = 4;
        engine.create_workqueue(a).unwrap();
    }
    let batch = |n: usize, fail_every: usize| -> Vec<ItemSpec> {
        (0..n)
            .map(|i| {
                let it = ItemSpec::new(Target::Cpu((i % 2) as u32), "probe").arg("ms", "1");
                if fail_every > 0 && i % fail_every == 0 {
                    ItemSpec::new(Target::Cpu(0), "noop").arg("fail", "x")
                } else {
                    it
                }
            })
            .collect()
    };
    for wq in ["sum", "none"] {
        // Waiting through the flush registered with the submit: counts, no records.
        let (rec, flush) = engine.submit_and_flush(wq, batch(40, 10), false).unwrap();
        let ids: Vec<u64> = rec.items.iter().map(|s| s.id).collect();
        let sum = flush.wait(Some(Duration::from_secs(20))).unwrap();
        assert_eq!(sum.covered, 40);
        assert_eq!(sum.by_state.get(&State::Ok), Some(&36), "{wq}: {sum:?}");
        assert_eq!(sum.by_state.get(&State::Failed), Some(&4), "{wq}: {sum:?}");
        assert_eq!(
            sum.gone, 0,
            "{wq}: registered with the submit, nothing is gone"
        );
        assert!(
            engine.results(&ids).iter().all(Option::is_none),
            "{wq}: no record kept once ended"
        );
        // An event flush registered while items are live hears Ended, never Done.
        let (rec, mut flush) = engine.submit_and_flush(wq, batch(6, 0), false).unwrap();
        let mut ended = Vec::new();
        let deadline = Some(Instant::now() + Duration::from_secs(20));
        while let Some(ev) = flush.next_blocking(deadline).expect("in time") {
            match ev {
                FlushEvent::Ended(id, s) => ended.push((id, s)),
                other => panic!("{wq}: expected Ended, got {other:?}"),
            }
        }
        ended.sort();
        let want: Vec<(u64, State)> = rec.items.iter().map(|s| (s.id, State::Ok)).collect();
        assert_eq!(ended, want, "{wq}: one Ended per item");
        // A flush of the batch that begins after they ended counts them from the batch's
        // record, summary-only or not; a flush of their ids has nothing to count them by.
        for summary_only in [true, false] {
            let f = match summary_only {
                true => engine.flush_summary(FlushScope::Batch(rec.batch)),
                false => engine.flush(FlushScope::Batch(rec.batch)),
            };
            let late = f.unwrap().wait(Some(Duration::from_secs(5))).unwrap();
            assert_eq!(late.covered, 6, "{wq}: {late:?}");
            assert_eq!(late.by_state.get(&State::Ok), Some(&6), "{wq}: {late:?}");
            assert_eq!((late.gone, late.by_state.len()), (0, 1), "{wq}: {late:?}");
        }
        let ids: Vec<u64> = rec.items.iter().map(|s| s.id).collect();
        let late = engine
            .flush_summary(FlushScope::Items(ids))
            .unwrap()
            .wait(Some(Duration::from_secs(5)))
            .unwrap();
        assert_eq!((late.gone, late.by_state.len()), (6, 0), "{wq}: {late:?}");
    }
    // The observer heard of each item once, with a run time for summary only.
    let seen = ends.0.lock().clone();
    let mut ids: Vec<u64> = seen.iter().map(|e| e.0).collect();
    ids.sort();
    ids.dedup();
    assert_eq!((seen.len(), ids.len()), (92, 92), "each item once");
    let ran = |e: &&(u64, State, bool)| e.1 == State::Ok;
    let timed: Vec<bool> = seen.iter().filter(ran).map(|e| e.2).collect();
    assert_eq!(
        timed.iter().filter(|t| **t).count(),
        42,
        "summary: run times kept"
    );
    // `submit_and_wait` on a workqueue without records: a counting flush, no event per item.
    for wq in ["sum", "none"] {
        let (rec, mut flush) = engine.submit_and_wait(wq, batch(10, 5)).unwrap();
        assert_eq!(rec.items.len(), 10);
        let deadline = Some(Instant::now() + Duration::from_secs(20));
        let ev = flush.next_blocking(deadline).expect("in time");
        assert!(ev.is_none(), "{wq}: no per-item event, got {ev:?}");
        let (by_state, gone) = flush.tally().expect("a counting flush");
        assert_eq!(by_state.get(&State::Ok), Some(&8), "{wq}: {by_state:?}");
        assert_eq!(by_state.get(&State::Failed), Some(&2), "{wq}: {by_state:?}");
        assert!(gone.is_empty(), "{wq}");
    }
    // Back to full: later items have records again.
    engine
        .update_workqueue(WorkqueueAttrs::named("sum").with(&WorkqueueChanges {
            results: Some(ResultsMode::Full),
            max_active: Some(4),
            ..Default::default()
        }))
        .unwrap();
    let (rec, flush) = engine.submit_and_flush("sum", batch(3, 0), true).unwrap();
    flush.wait(Some(Duration::from_secs(20))).unwrap();
    let ids: Vec<u64> = rec.items.iter().map(|s| s.id).collect();
    let rs = engine.results(&ids);
    assert!(rs
        .iter()
        .all(|r| r.as_ref().is_some_and(|r| r.state == State::Ok)));
    // ... and `submit_and_wait` hears each item's full result.
    let (rec, mut flush) = engine.submit_and_wait("sum", batch(3, 0)).unwrap();
    assert!(flush.tally().is_none(), "full: an event per item");
    let deadline = Some(Instant::now() + Duration::from_secs(20));
    let mut done = Vec::new();
    while let Some(ev) = flush.next_blocking(deadline).expect("in time") {
        match ev {
            FlushEvent::Done(r) => done.push((r.id, r.state)),
            other => panic!("full: expected Done, got {other:?}"),
        }
    }
    done.sort();
    let want: Vec<(u64, State)> = rec.items.iter().map(|s| (s.id, State::Ok)).collect();
    assert_eq!(done, want);
}

/// Waits until none of `ids` is live (a workqueue keeping no record answers `None` for an
/// item that ended).
fn until_ended(engine: &Engine, ids: &[u64]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while engine.results(ids).iter().any(|r| {
        r.as_ref()
            .is_some_and(|r| matches!(r.state, State::Pending | State::Running))
    }) {
        assert!(Instant::now() < deadline, "items {ids:?} never ended");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A flush of a batch that begins after some of its items ended, on a workqueue keeping no
/// per-item result, counts them by state from the batch's record (they used to be "gone"),
/// and still waits for the live ones; one that begins after all ended counts all, whether it
/// is a counting flush or an event flush.
#[test]
fn a_late_batch_flush_counts_items_that_ended_without_a_record() {
    for mode in [ResultsMode::Summary, ResultsMode::None] {
        let rig = Rig::new(4, "0-2");
        rig.wq("w", |a| {
            a.results = mode;
            a.fallback = Fallback::Reject;
            a.max_active = 4;
        });
        let rec = rig
            .engine
            .submit(
                "w",
                vec![
                    item("cpu:1", "probe"),
                    item("cpu:1", "probe"),
                    item("cpu:1", "probe"),
                    item("cpu:0", "noop").arg("fail", "x"),
                    // Cpu 3 is offline: rejected during the submit.
                    item("cpu:3", "probe"),
                    // Runs until cancelled.
                    item("cpu:2", "probe").arg("ms", "60000"),
                ],
            )
            .unwrap();
        let ids: Vec<u64> = rec.items.iter().map(|s| s.id).collect();
        until_ended(&rig.engine, &ids[..5]);
        // An event flush counts the ended ones as it begins (it waits on the live one's
        // record); a counting flush of the batch waits on the batch's record, and has its
        // counts when the batch's last item ends.
        let f = rig.engine.flush(FlushScope::Batch(rec.batch)).unwrap();
        assert_eq!(f.covered(), 6);
        let (so_far, gone) = f.tally().expect("counts of the ended items");
        let want_before =
            BTreeMap::from([(State::Ok, 3), (State::Failed, 1), (State::Rejected, 1)]);
        assert_eq!((&so_far, gone.len()), (&want_before, 0), "{mode:?}");
        // The live one is still waited for, by either kind.
        let counting = rig.engine.flush_summary(FlushScope::Batch(rec.batch));
        for (what, f) in [("event", f), ("counting", counting.unwrap())] {
            assert_eq!(f.covered(), 6, "{mode:?} {what}");
            assert!(
                f.wait(Some(Duration::from_millis(50))).is_err(),
                "{mode:?}: the {what} flush must wait for the running item"
            );
        }
        let f = rig
            .engine
            .flush_summary(FlushScope::Batch(rec.batch))
            .unwrap();
        let report = rig.engine.cancel(FlushScope::Items(vec![ids[5]])).unwrap();
        assert_eq!(report.outcomes[0].1, CancelOutcome::WasRunning);
        let sum = f.wait(Some(Duration::from_secs(20))).unwrap();
        let mut want = want_before.clone();
        want.insert(State::Cancelled, 1);
        assert_eq!(
            (&sum.by_state, sum.gone, sum.covered),
            (&want, 0, 6),
            "{mode:?}"
        );
        // After all ended: an event flush counts them too (no event: nothing to say per item).
        for summary_only in [true, false] {
            let mut f = match summary_only {
                true => rig.engine.flush_summary(FlushScope::Batch(rec.batch)),
                false => rig.engine.flush(FlushScope::Batch(rec.batch)),
            }
            .unwrap();
            let (by_state, gone) = f.tally().expect("counts of the ended items");
            assert_eq!((&by_state, gone.len()), (&want, 0), "{mode:?}");
            let deadline = Some(Instant::now() + Duration::from_secs(5));
            assert!(f.next_blocking(deadline).unwrap().is_none(), "{mode:?}");
            let sum = f.wait(Some(Duration::from_secs(5))).unwrap();
            assert_eq!((&sum.by_state, sum.gone), (&want, 0), "{mode:?}");
        }
        // `submit_and_wait` counts the items its submit rejected at once.
        let (_, mut flush) = rig
            .engine
            .submit_and_wait("w", vec![item("cpu:3", "probe"), item("cpu:0", "probe")])
            .unwrap();
        let deadline = Some(Instant::now() + Duration::from_secs(20));
        assert!(flush.next_blocking(deadline).unwrap().is_none());
        let (by_state, gone) = flush.tally().expect("a counting flush");
        assert_eq!(
            (by_state, gone.len()),
            (BTreeMap::from([(State::Ok, 1), (State::Rejected, 1)]), 0),
            "{mode:?}"
        );
    }
}

/// Polls the engine's batch records until `done` holds of their count (housekeeping runs
/// once a second), failing after 10 s.
fn until_batches(engine: &Engine, done: impl Fn(usize) -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n = engine.stats().batches;
        if done(n) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {n} batch records kept");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Quick single-item batches behind a long one: a run of `n` of them, flushed to the end.
fn quick_batches(rig: &Rig, n: usize) -> Vec<u64> {
    let mut batches = Vec::new();
    let mut ids = Vec::new();
    for _ in 0..n {
        let r = rig
            .engine
            .submit("default", vec![item("cpu:1", "noop")])
            .unwrap();
        batches.push(r.batch);
        ids.extend(r.items.iter().map(|s| s.id));
    }
    rig.engine
        .flush_summary(FlushScope::Items(ids))
        .unwrap()
        .wait(Some(Duration::from_secs(20)))
        .unwrap();
    batches
}

/// Batch records are bounded in count, not only by age: past `results_max` the oldest ended
/// ones go (a client submitting many small batches must not grow them for a whole ttl), and
/// a live batch at the front does not hold them up.
#[test]
fn batch_records_are_bounded_by_results_max() {
    let rig = Rig::with(2, "0-1", |c| c.results_max = 10);
    let long = rig
        .engine
        .submit("default", vec![item("cpu:0", "probe").arg("ms", "60000")])
        .unwrap();
    let quick = quick_batches(&rig, 50);
    until_batches(&rig.engine, |n| n <= 10, "results_max 10");
    let known = |b: u64| match rig.engine.flush_summary(FlushScope::Batch(b)) {
        Ok(_) => true,
        Err(EngineError::UnknownBatch(x)) if x == b => false,
        Err(e) => panic!("flush of batch {b}: {e:?}"),
    };
    assert!(known(long.batch), "a live batch is kept");
    assert!(!known(quick[0]), "the oldest ended batch went");
    assert!(known(quick[49]), "the newest is kept");
    rig.engine.cancel(FlushScope::Batch(long.batch)).unwrap();
}

/// An ended batch's record goes once `results_ttl` has passed, even behind a batch that is
/// still live (which used to keep every later record until it ended).
#[test]
fn ended_batch_records_expire_behind_a_live_one() {
    let rig = Rig::with(2, "0-1", |c| c.results_ttl = Duration::from_millis(100));
    let long = rig
        .engine
        .submit("default", vec![item("cpu:0", "probe").arg("ms", "60000")])
        .unwrap();
    quick_batches(&rig, 20);
    until_batches(&rig.engine, |n| n == 1, "ttl 100 ms");
    assert!(rig
        .engine
        .flush_summary(FlushScope::Batch(long.batch))
        .is_ok());
    rig.engine.cancel(FlushScope::Batch(long.batch)).unwrap();
}

/// Counting flushes of whole batches wait on the batch's record (under L shared) while the
/// batch's items end on both CPUs: each must count every item once, never return before the
/// last one ended and never hang, whether registered at once, from another thread while
/// items end, or after they all ended, with flushes dropped unread beside them.
#[test]
fn batch_record_flushes_count_every_item_once_under_load() {
    for mode in [ResultsMode::Summary, ResultsMode::Full] {
        let rig = Rig::new(2, "0-1");
        rig.wq("w", |a| {
            a.results = mode;
            a.max_active = 4;
        });
        for round in 0..150usize {
            let n = 1 + (round * 37) % 300;
            let items: Vec<ItemSpec> = (0..n)
                .map(|i| {
                    let it = item(&format!("cpu:{}", i % 2), "noop");
                    if i % 7 == 0 {
                        it.arg("fail", "x")
                    } else {
                        it
                    }
                })
                .collect();
            let failed = (0..n).filter(|i| i % 7 == 0).count();
            let rec = rig.engine.submit("w", items).unwrap();
            let b = rec.batch;
            let early = rig.engine.flush_summary(FlushScope::Batch(b)).unwrap();
            drop(rig.engine.flush_summary(FlushScope::Batch(b)).unwrap());
            let engine = &rig.engine;
            let (first, second) = std::thread::scope(|sc| {
                let h = sc.spawn(move || {
                    std::thread::sleep(Duration::from_micros((round % 5) as u64 * 20));
                    let f = engine.flush_summary(FlushScope::Batch(b)).unwrap();
                    f.wait(Some(Duration::from_secs(20)))
                });
                let a = early.wait(Some(Duration::from_secs(20)));
                (a, h.join().unwrap())
            });
            let late = rig
                .engine
                .flush_summary(FlushScope::Batch(b))
                .unwrap()
                .wait(Some(Duration::from_secs(20)));
            for (what, sum) in [("early", first), ("other thread", second), ("late", late)] {
                let sum = sum.unwrap_or_else(|e| panic!("{mode:?} round {round} {what}: {e:?}"));
                let want = BTreeMap::from([(State::Ok, n - failed), (State::Failed, failed)]);
                let want: BTreeMap<State, usize> =
                    want.into_iter().filter(|(_, k)| *k > 0).collect();
                assert_eq!(
                    (&sum.by_state, sum.gone, sum.covered),
                    (&want, 0, n),
                    "{mode:?} round {round} {what}"
                );
            }
        }
        assert_eq!(rig.engine.stats().flushes, 0, "{mode:?}: no record left");
    }
}

/// A batch whose workqueue switched from `full` to `summary` while it ran: a late flush
/// counts the recorded items by their results and the others by the batch's record.
#[test]
fn a_late_batch_flush_counts_recorded_and_unrecorded_items_alike() {
    let rig = Rig::new(4, "0-3");
    rig.wq("w", |a| a.max_active = 4);
    let rec = rig
        .engine
        .submit(
            "w",
            vec![
                item("cpu:0", "probe"),
                item("cpu:0", "noop").arg("fail", "x"),
                item("cpu:1", "probe").arg("ms", "60000"),
                item("cpu:2", "probe").arg("ms", "60000"),
            ],
        )
        .unwrap();
    let ids: Vec<u64> = rec.items.iter().map(|s| s.id).collect();
    until_ended(&rig.engine, &ids[..2]);
    assert!(
        rig.engine.results(&ids[..2]).iter().all(Option::is_some),
        "full: kept"
    );
    rig.engine
        .update_workqueue(WorkqueueAttrs::named("w").with(&WorkqueueChanges {
            results: Some(ResultsMode::Summary),
            max_active: Some(4),
            ..Default::default()
        }))
        .unwrap();
    rig.engine
        .cancel(FlushScope::Items(ids[2..].to_vec()))
        .unwrap();
    until_ended(&rig.engine, &ids);
    assert!(
        rig.engine.results(&ids[2..]).iter().all(Option::is_none),
        "summary: none"
    );
    let sum = rig
        .engine
        .flush_summary(FlushScope::Batch(rec.batch))
        .unwrap()
        .wait(Some(Duration::from_secs(5)))
        .unwrap();
    let want = BTreeMap::from([(State::Ok, 1), (State::Failed, 1), (State::Cancelled, 2)]);
    assert_eq!((sum.by_state, sum.gone, sum.covered), (want, 0, 4));
}

/// Draining with `cancel_pending` on a workqueue keeping no result counts the items it
/// cancelled (they end with no record before the drain's flush registers).
#[test]
fn a_cancelling_drain_counts_what_it_cancelled_without_records() {
    let rig = Rig::new(2, "0-1");
    rig.wq("w", |a| {
        a.results = ResultsMode::Summary;
        a.max_active = 1;
    });
    let mut items = vec![item("cpu:0", "probe").arg("ms", "60000")];
    items.extend((0..3).map(|_| item("cpu:0", "probe")));
    let ids = rig.submit("w", items);
    let deadline = Instant::now() + Duration::from_secs(20);
    while rig.engine.results(&ids[..1])[0].as_ref().map(|r| r.state) != Some(State::Running) {
        assert!(Instant::now() < deadline, "the first item never started");
        std::thread::sleep(Duration::from_millis(2));
    }
    let drain = rig.engine.drain_with("w", true).unwrap();
    let (by_state, gone) = drain.tally().expect("a counting flush");
    assert_eq!(
        (by_state, gone.len()),
        (BTreeMap::from([(State::Cancelled, 3)]), 0)
    );
    rig.engine
        .cancel(FlushScope::Items(ids[..1].to_vec()))
        .unwrap();
    let sum = drain.wait(Some(Duration::from_secs(20))).unwrap();
    assert_eq!(
        (sum.by_state, sum.gone, sum.covered),
        (BTreeMap::from([(State::Cancelled, 4)]), 0, 4)
    );
}

/// A queue whose items all ended without running (cancelled while delayed, rejected at
/// submit) is still dropped once empty for `worker_idle`: before, only a finished run started
/// a queue's idle time, so a client naming ever new targets grew the engine without bound.
#[test]
fn queues_whose_items_never_ran_are_dropped_when_idle() {
    let topo = common::topology(4);
    let snap = common::snapshot(&topo, 1, &"0-1".parse().unwrap());
    let cfg = EngineConfig {
        pinning: false,
        worker_idle: Duration::from_millis(100),
        ..EngineConfig::default()
    };
    let engine = Engine::start(cfg, Registry::with_builtins(None), snap).unwrap();
    let mut a = WorkqueueAttrs::named("strict");
    a.fallback = Fallback::Reject;
    engine.create_workqueue(a).unwrap();
    let before = engine.stats().queues;
    // Twenty delayed items on distinct cpulists, all cancelled before they are due.
    let mut items = Vec::new();
    for i in 0..20u32 {
        let mut it = ItemSpec::new(format!("cpus:0,{}", 2 + i % 2).parse().unwrap(), "noop");
        it.key = Some(format!("k{i}"));
        it.delay = Some(Duration::from_secs(3600));
        items.push(it);
        let mut it = ItemSpec::new(format!("cpus:1-{}", 2 + i % 2).parse().unwrap(), "noop");
        it.delay = Some(Duration::from_secs(3600));
        items.push(it);
    }
    let rec = engine.submit("default", items).unwrap();
    // Items on a workqueue that rejects, on CPUs that are not live: rejected at submit.
    let rejected = engine
        .submit(
            "strict",
            vec![ItemSpec::new("cpu:3".parse().unwrap(), "noop")],
        )
        .unwrap();
    let grown = engine.stats().queues;
    assert!(grown >= before + 5, "queues {before} -> {grown}");
    let ids: Vec<u64> = rec.items.iter().map(|s| s.id).collect();
    let report = engine.cancel(FlushScope::Items(ids.clone())).unwrap();
    assert_eq!(report.outcomes.len(), ids.len());
    let all: Vec<u64> = ids.iter().copied().chain([rejected.items[0].id]).collect();
    for r in engine.results(&all) {
        let r = r.expect("result kept");
        assert!(
            matches!(r.state, State::Cancelled | State::Rejected),
            "{r:?}"
        );
    }
    queues_dropped_to(&engine, before, "");
}

/// Waits (up to 10 s) until the engine holds no more than `before` queues, with no item live
/// at any look; `why` is added to the message when they stay.
fn queues_dropped_to(engine: &Engine, before: usize, why: &str) {
    let t0 = Instant::now();
    loop {
        let s = engine.stats();
        assert_eq!(
            (s.items, s.pending, s.running),
            (0, 0, 0),
            "nothing left live"
        );
        if s.queues <= before {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{} queues still there ({before} before the items){why}",
            s.queues
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A batch of runs of copies is the batch of the items written out: consecutive ids in
/// order, every copy run once on its group, a keyed run de-duplicated to its first copy, and a
/// bad run refusing the whole batch, named by its first entry's index.
#[test]
fn copies_are_items_like_any_other() {
    let rig = Rig::new(2, "0-1");
    let mut b = Batch::new();
    b.copies(item("cpu:1", "probe"), 5)
        .push(item("cpu:0", "probe"))
        .copies(item("cpu:0", "probe"), 0)
        .copies(keyed("cpu:0", "once"), 3);
    assert_eq!(b.len(), 9);
    let rec = rig.engine.submit("default", b).unwrap();
    assert_eq!(rec.items.len(), 9);
    let queued: Vec<u64> = rec
        .items
        .iter()
        .filter(|s| s.queued)
        .map(|s| s.id)
        .collect();
    assert_eq!(queued, (rec.first..rec.first + 7).collect::<Vec<_>>());
    // The keyed copies after the first are duplicates of it.
    assert!(rec.items[7..]
        .iter()
        .all(|s| !s.queued && s.id == rec.first + 6));
    let results = rig.flush(&queued);
    assert!(results.iter().all(|r| r.state == State::Ok));
    let cpus: Vec<Option<u32>> = results.iter().map(|r| r.cpu_started).collect();
    assert_eq!(cpus[..5], [Some(1); 5]);
    assert_eq!(cpus[5..], [Some(0); 2]);
    let mut runs: Vec<u64> = rig.probe.runs.lock().iter().map(|r| r.0).collect();
    runs.sort_unstable();
    assert_eq!(runs, queued, "every copy ran exactly once");

    let mut bad = Batch::new();
    bad.copies(item("cpu:0", "probe"), 3)
        .copies(item("cpu:0", "probe").arg("x", "1"), 4);
    assert!(matches!(
        rig.engine.submit("default", bad),
        Err(EngineError::Handler { index: 3, .. })
    ));
    let mut bad = Batch::new();
    bad.copies(item("cpu:0", "probe"), 2)
        .copies(item("cpu:9", "probe"), 2);
    assert!(matches!(
        rig.engine.submit("default", bad),
        Err(EngineError::Group { index: 2, .. })
    ));
    assert_eq!(rig.engine.stats().items, 0);
    assert_eq!(rig.probe.runs.lock().len(), 7);
}

/// `submit_and_wait` on a workqueue keeping full results sends its `Done` events together
/// (fewer than 256 of them: see the next test), once the last item ends (one wake-up of the
/// waiter, not one per worker finish batch), whether the others ended in a worker's finish
/// batch or were cancelled pending; a streaming flush (`submit_and_flush`) of the same batch
/// hears of them as they end.
#[test]
fn submit_and_wait_delivers_full_results_together_at_the_end() {
    let rig = Rig::new(2, "0-1");
    rig.wq("w", |a| a.max_active = 1);
    // The gate holds CPU 0's one slot until cancelled; three quick items run on CPU 1; two
    // wait behind the gate on CPU 0 (cancelled pending below).
    let batch = || {
        let mut v = vec![item("cpu:0", "probe").arg("ms", "20000")];
        v.extend((0..3).map(|_| item("cpu:1", "noop")));
        v.extend((0..2).map(|_| item("cpu:0", "noop")));
        v
    };
    let settle = |ids: &[u64]| {
        // The quick ones ended (their results are stored) and the gate is running.
        let deadline = Instant::now() + Duration::from_secs(20);
        while !(rig.engine.results(&ids[1..4]).iter().all(Option::is_some)
            && rig.probe.total_running.load(Ordering::SeqCst) == 1)
        {
            assert!(Instant::now() < deadline, "the quick items did not end");
            std::thread::sleep(Duration::from_millis(2));
        }
        let c = rig
            .engine
            .cancel(FlushScope::Items(ids[4..].to_vec()))
            .unwrap();
        assert!(c
            .outcomes
            .iter()
            .all(|(_, o)| *o == CancelOutcome::CancelledPending));
    };
    let soon = || Some(Instant::now() + Duration::from_millis(300));

    // Streaming: the ended items' events come while the gate still runs.
    let (rec, mut flush) = rig.engine.submit_and_flush("w", batch(), false).unwrap();
    let ids: Vec<u64> = rec.items.iter().map(|s| s.id).collect();
    settle(&ids);
    let ev = flush
        .next_blocking(soon())
        .expect("a streaming flush hears of ended items");
    assert!(matches!(ev, Some(FlushEvent::Done(_))), "{ev:?}");
    rig.engine.cancel(FlushScope::Items(vec![ids[0]])).unwrap();
    flush.wait(Some(Duration::from_secs(20))).unwrap();

    // At the end: nothing while the gate runs, then all six at once.
    let (rec, mut flush) = rig.engine.submit_and_wait("w", batch()).unwrap();
    let ids: Vec<u64> = rec.items.iter().map(|s| s.id).collect();
    settle(&ids);
    assert!(
        flush.next_blocking(soon()).is_err(),
        "no event before the last item ends"
    );
    rig.engine.cancel(FlushScope::Items(vec![ids[0]])).unwrap();
    let first = flush
        .next_blocking(Some(Instant::now() + Duration::from_secs(20)))
        .expect("the events come when the gate ends");
    let mut done = Vec::new();
    let mut ev = first;
    while let Some(e) = ev {
        match e {
            FlushEvent::Done(r) => done.push((r.id, r.state)),
            other => panic!("expected Done, got {other:?}"),
        }
        ev = flush
            .next_blocking(Some(Instant::now() + Duration::from_secs(20)))
            .expect("the rest of the events");
    }
    done.sort();
    let mut want: Vec<(u64, State)> = vec![(ids[0], State::Cancelled)];
    want.extend(ids[1..4].iter().map(|&id| (id, State::Ok)));
    want.extend(ids[4..].iter().map(|&id| (id, State::Cancelled)));
    assert_eq!(done, want);
}

/// `Flush::next_delivered` with a timeout: `None` when nothing came within `within`, else
/// what it returned (`Some(None)` at the end of the flush). Polled on this thread (the core
/// has no async runtime of its own).
fn delivered_within(flush: &mut Flush, within: Duration) -> Option<Option<Delivered>> {
    use std::future::Future;
    use std::task::{Context, Poll, Wake, Waker};
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let until = Instant::now() + within;
    let mut next = std::pin::pin!(flush.next_delivered());
    loop {
        if let Poll::Ready(d) = next.as_mut().poll(&mut cx) {
            return Some(d);
        }
        let now = Instant::now();
        if now >= until {
            return None;
        }
        std::thread::park_timeout(until - now);
    }
}

/// An at-end flush keeping full results hands over what it kept in parts of 256 while items
/// are still live, so that its waiter can work on them (the daemon encodes them) before the
/// last item ends; the rest comes with the last item. 600 quick items on CPU 1 end while a
/// gate holds CPU 0: two parts of 256 come meanwhile and nothing more; the gate cancelled,
/// the other 88 and the gate come in one part, then the end. Every item is in exactly one
/// part. Fails if the parts wait for the last item, come smaller, or lose or repeat a record.
#[test]
fn submit_and_wait_hands_over_full_results_in_parts_while_items_run() {
    let rig = Rig::new(2, "0-1");
    rig.wq("w", |a| a.max_active = 1);
    let mut batch = vec![item("cpu:0", "probe").arg("ms", "20000")];
    batch.extend((0..600).map(|_| item("cpu:1", "noop")));
    let (rec, mut flush) = rig.engine.submit_and_wait("w", batch).unwrap();
    let ids: Vec<u64> = rec.items.iter().map(|s| s.id).collect();
    let long = Duration::from_secs(20);
    let mut parts = Vec::new();
    for _ in 0..2 {
        match delivered_within(&mut flush, long) {
            Some(Some(Delivered::Records(rs))) => parts.push(rs),
            other => panic!("expected a part while the gate runs, got {other:?}"),
        }
    }
    assert!(
        delivered_within(&mut flush, Duration::from_millis(300)).is_none(),
        "the rest waits for the last item"
    );
    assert_eq!(
        rig.probe.total_running.load(Ordering::SeqCst),
        1,
        "the gate runs"
    );
    rig.engine.cancel(FlushScope::Items(vec![ids[0]])).unwrap();
    loop {
        match delivered_within(&mut flush, long) {
            Some(Some(Delivered::Records(rs))) => parts.push(rs),
            Some(None) => break,
            other => panic!("expected the last part or the end, got {other:?}"),
        }
    }
    let sizes: Vec<usize> = parts.iter().map(Vec::len).collect();
    assert_eq!(sizes, [256, 256, 89]);
    let mut got: Vec<(u64, State)> = parts
        .iter()
        .flatten()
        .map(|r| (r.id(), r.state()))
        .collect();
    got.sort_unstable();
    let mut want: Vec<(u64, State)> = vec![(ids[0], State::Cancelled)];
    want.extend(ids[1..].iter().map(|&id| (id, State::Ok)));
    assert_eq!(got, want, "each item in one part");
}

/// An at-end flush (`submit_and_wait`, full results) hands its caller the same results the
/// store keeps, field by field: the worker keeps a copy of each record and the caller makes
/// the `ItemResult` (names, target, output, error, CPUs, times). Items on several targets,
/// with and without output, failing and not, and copies sharing one body; `Flush::wait` on
/// such a flush counts them by state. Fails if the copy loses a field, names the wrong
/// body, or the counting skips the kept records.
#[test]
fn submit_and_wait_results_equal_the_stored_ones() {
    let rig = Rig::new(2, "0-1");
    rig.wq("w", |a| a.max_active = 4);
    let batch = || {
        let mut v = vec![
            item("cpu:0", "probe"),
            item("cpu:1", "probe"),
            item("cpus:0-1", "noop").arg("fail", "on purpose"),
            item("all", "sleep").arg("ms", "1"),
        ];
        v.extend((0..40).map(|_| item("cpu:1", "noop")));
        v
    };
    let (rec, mut flush) = rig.engine.submit_and_wait("w", batch()).unwrap();
    let deadline = Some(Instant::now() + Duration::from_secs(20));
    let mut got = Vec::new();
    while let Some(ev) = flush.next_blocking(deadline).expect("in time") {
        match ev {
            FlushEvent::Done(r) => got.push(r),
            other => panic!("full: expected Done, got {other:?}"),
        }
    }
    got.sort_by_key(|r| r.id);
    let ids: Vec<u64> = rec.items.iter().map(|s| s.id).collect();
    assert_eq!(got.iter().map(|r| r.id).collect::<Vec<_>>(), ids);
    let stored = rig.engine.results(&ids);
    for (r, s) in got.iter().zip(&stored) {
        let s = s.as_ref().expect("stored");
        assert_eq!(
            **r, **s,
            "item {}: the waiter's result is the stored one",
            r.id
        );
        assert_eq!(&*r.workqueue, "w");
    }
    assert_eq!(
        got[0].output,
        got[0].id.to_le_bytes().to_vec(),
        "probe output"
    );
    assert_eq!(got[1].target.to_string(), "cpu:1");
    assert_eq!(
        (got[2].state, got[2].error.as_str(), &*got[2].handler),
        (State::Failed, "on purpose", "noop")
    );
    assert_eq!(&*got[3].handler, "sleep");
    assert!(got[4..].iter().all(|r| r.state == State::Ok
        && r.cpu_started == Some(1)
        && r.started_at.is_some()
        && r.finished_at >= r.started_at));
    // `wait` counts what the flush kept (every item ended before the wait began).
    let (rec, flush) = rig.engine.submit_and_wait("w", batch()).unwrap();
    let ids: Vec<u64> = rec.items.iter().map(|s| s.id).collect();
    let until = Instant::now() + Duration::from_secs(20);
    while !rig.engine.results(&ids).iter().all(Option::is_some) {
        assert!(Instant::now() < until, "the batch did not end");
        std::thread::sleep(Duration::from_millis(2));
    }
    let sum = flush.wait(Some(Duration::from_secs(20))).unwrap();
    assert_eq!(sum.covered, rec.items.len());
    assert_eq!(sum.by_state.get(&State::Ok), Some(&43), "{sum:?}");
    assert_eq!(sum.by_state.get(&State::Failed), Some(&1), "{sum:?}");
}

/// Counting flushes count every item once, by state, across many workers' finish batches
/// (their counts are added to the tally once per batch, not per item): 3 000 items, a third
/// failing, ended by two CPUs' workers in takes of up to 16, counted by two flushes at once
/// (the batch's own and one of the workqueue). Fails if the counts of a finish batch are
/// lost (the batch that ends a flush, whose record goes before the batch's end) or counted
/// twice.
#[test]
fn counting_flushes_count_every_finish_batch_once() {
    let rig = Rig::new(2, "0-1");
    for round in 0..3 {
        let items: Vec<ItemSpec> = (0..3000)
            .map(|i| {
                let it = item("all", "noop");
                if i % 3 == 2 {
                    it.arg("fail", "on purpose")
                } else {
                    it
                }
            })
            .collect();
        let (receipt, batch_flush) = rig.engine.submit_and_flush("default", items, true).unwrap();
        assert_eq!(receipt.items.len(), 3000);
        let wq_flush = rig
            .engine
            .flush_summary(FlushScope::Workqueue("default".into()))
            .unwrap();
        let covered = wq_flush.covered();
        for (f, want) in [(batch_flush, 3000), (wq_flush, covered)] {
            let sum = f.wait(Some(Duration::from_secs(60))).unwrap();
            let counted: usize = sum.by_state.values().sum::<usize>() + sum.gone;
            assert_eq!(counted, want, "round {round}: {sum:?}");
            if want == 3000 {
                assert_eq!(sum.by_state.get(&State::Ok), Some(&2000), "{sum:?}");
                assert_eq!(sum.by_state.get(&State::Failed), Some(&1000), "{sum:?}");
            }
        }
    }
}

/// Items of one flush ending in two CPUs' workers at once (every worker hold is shared since
/// session 20, and a hold hands its flush events over with a clone of the flush's sender): every
/// flush hears each of its items exactly once and returns, whatever its delivery — full results
/// as events, `Ended` events, a tally, or everything at the end — with two submitters at once.
/// The ids a flush hears of until it ends (by `deadline`), sorted: every item must have ended
/// `Ok`, as a full result (`Done`, also given to `done`) or a state (`Ended`).
fn ended_ok(
    flush: &mut Flush,
    deadline: Option<Instant>,
    wq: &str,
    mut done: impl FnMut(&ItemResult),
) -> Vec<u64> {
    let mut got = Vec::new();
    while let Some(ev) = flush.next_blocking(deadline).expect("in time") {
        match ev {
            FlushEvent::Done(r) => {
                assert_eq!(r.state, State::Ok);
                done(&r);
                got.push(r.id);
            }
            FlushEvent::Ended(id, st) => {
                assert_eq!(st, State::Ok);
                got.push(id);
            }
            other => panic!("{wq}: unexpected {other:?}"),
        }
    }
    got.sort_unstable();
    got
}

/// A hold that let a flush's last item close its channel while the other worker's events were
/// on their way would lose them here.
#[test]
fn flushes_whose_items_end_on_two_cpus_at_once_hear_each_item_once() {
    let engine = Arc::new(observed_engine(EngineConfig {
        pinning: false,
        ..EngineConfig::default()
    }));
    for (name, mode) in [("full", ResultsMode::Full), ("sum", ResultsMode::Summary)] {
        let mut a = WorkqueueAttrs::named(name);
        a.results = mode;
        engine.create_workqueue(a).unwrap();
    }
    let batch = |n: usize| -> Vec<ItemSpec> {
        (0..n)
            .map(|i| ItemSpec::new(Target::Cpu((i % 2) as u32), "noop"))
            .collect()
    };
    let heard = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for side in 0..2 {
            let (engine, heard, batch) = (&engine, &heard, &batch);
            s.spawn(move || {
                for round in 0..200 {
                    let n = 64 + (round * 7 + side * 13) % 200;
                    let deadline = Some(Instant::now() + Duration::from_secs(30));
                    match round % 4 {
                        // Events (full results, then `Ended`), and at the end (full).
                        0..=2 => {
                            let (wq, waits) = match round % 4 {
                                0 => ("full", false),
                                1 => ("sum", false),
                                _ => ("full", true),
                            };
                            let (rec, mut flush) = if waits {
                                engine.submit_and_wait(wq, batch(n)).unwrap()
                            } else {
                                engine.submit_and_flush(wq, batch(n), false).unwrap()
                            };
                            let got = ended_ok(&mut flush, deadline, wq, |_| {});
                            let want: Vec<u64> = rec.items.iter().map(|i| i.id).collect();
                            assert_eq!(got, want, "{wq} (waits {waits}): each item once");
                        }
                        // A tally.
                        _ => {
                            let (_, flush) = engine.submit_and_wait("sum", batch(n)).unwrap();
                            let sum = flush.wait(Some(Duration::from_secs(30))).unwrap();
                            assert_eq!(sum.covered, n);
                            assert_eq!(sum.by_state.get(&State::Ok), Some(&n), "{sum:?}");
                        }
                    }
                    heard.fetch_add(n, Ordering::Relaxed);
                }
            });
        }
    });
    assert!(heard.load(Ordering::Relaxed) > 2 * 200 * 64);
    assert_eq!(engine.stats().items, 0, "nothing left live");
}

/// Both CPUs' workers take from one queue (every item targets `all`) and finish in it, under
/// L's shared side: a worker releases the queue's lock before it makes its batch's records,
/// so the other takes from the queue meanwhile. Every item is heard of once, in either
/// results mode, both CPUs run items, nothing is left live, and the queue's counts come back
/// to zero (an idle queue is dropped only with none pending or running).
#[test]
fn one_queue_shared_by_both_cpus_workers_ends_each_item_once() {
    let engine = Arc::new(observed_engine(EngineConfig {
        pinning: false,
        worker_idle: Duration::from_millis(100),
        ..EngineConfig::default()
    }));
    let before = engine.stats().queues;
    for (name, mode) in [("full", ResultsMode::Full), ("sum", ResultsMode::Summary)] {
        let mut a = WorkqueueAttrs::named(name);
        a.results = mode;
        engine.create_workqueue(a).unwrap();
    }
    let batch = |n: usize| -> Vec<ItemSpec> {
        (0..n).map(|_| ItemSpec::new(Target::All, "noop")).collect()
    };
    let heard = AtomicUsize::new(0);
    let on_cpu = [AtomicUsize::new(0), AtomicUsize::new(0)];
    std::thread::scope(|s| {
        for side in 0..2 {
            let (engine, heard, on_cpu, batch) = (&engine, &heard, &on_cpu, &batch);
            s.spawn(move || {
                for round in 0..150 {
                    let n = 200 + (round * 37 + side * 11) % 400;
                    let wq = if round % 2 == side { "sum" } else { "full" };
                    let deadline = Some(Instant::now() + Duration::from_secs(30));
                    let (rec, mut flush) = engine.submit_and_flush(wq, batch(n), false).unwrap();
                    let got = ended_ok(&mut flush, deadline, wq, |r| {
                        if let Some(c) = r.cpu_finished {
                            on_cpu[c as usize].fetch_add(1, Ordering::Relaxed);
                        }
                    });
                    let want: Vec<u64> = rec.items.iter().map(|i| i.id).collect();
                    assert_eq!(got, want, "{wq}: each item once");
                    heard.fetch_add(n, Ordering::Relaxed);
                }
            });
        }
    });
    assert!(heard.load(Ordering::Relaxed) >= 2 * 150 * 200);
    let ran = on_cpu.each_ref().map(|c| c.load(Ordering::Relaxed));
    assert!(
        ran[0] > 0 && ran[1] > 0,
        "both CPUs ran items of the queue: {ran:?}"
    );
    queues_dropped_to(&engine, before, ": one still counts an item running");
}

/// The submit takes L's shared side for a plain batch into queues that exist and can run it,
/// and the exclusive side for everything else: a batch that makes a queue, a key, a delay, a
/// deadline, an ordered workqueue, a queue without an eligible CPU. Both kinds run their items.
#[test]
fn plain_batches_are_submitted_under_the_shared_side_and_the_rest_exclusive() {
    let rig = Rig::new(2, "0-1");
    rig.wq("fifo", |a| a.ordered = true);
    let shared = || rig.engine.stats().shared_submits;
    let mut ids = Vec::new();
    // The first batch of a target makes its queue: exclusive.
    ids.extend(rig.submit("default", vec![item("cpu:1", "probe")]));
    assert_eq!(shared(), 0);
    // Plain batches into it: shared (one count per batch).
    ids.extend(rig.submit("default", (0..50).map(|_| item("cpu:1", "probe")).collect()));
    ids.extend(rig.submit("default", vec![item("cpu:1", "probe")]));
    assert_eq!(shared(), 2);
    // A key, a delay, a deadline: exclusive.
    ids.extend(rig.submit("default", vec![keyed("cpu:1", "k")]));
    let mut delayed = item("cpu:1", "probe");
    delayed.delay = Some(Duration::from_millis(5));
    let mut deadline = item("cpu:1", "probe");
    deadline.deadline = Some(Duration::from_secs(60));
    ids.extend(rig.submit("default", vec![delayed]));
    ids.extend(rig.submit("default", vec![deadline]));
    // An ordered workqueue's: exclusive, even once its queue exists.
    ids.extend(rig.submit("fifo", vec![item("cpu:1", "probe")]));
    ids.extend(rig.submit("fifo", vec![item("cpu:1", "probe")]));
    assert_eq!(shared(), 2);
    // A queue whose CPU left (fallback `widen` decides): exclusive.
    rig.set_live("0");
    ids.extend(rig.submit("default", vec![item("cpu:1", "probe")]));
    assert_eq!(shared(), 2);
    rig.set_live("0-1");
    let res = rig.flush(&ids);
    assert_eq!(res.len(), ids.len());
    assert!(res.iter().all(|r| r.state == State::Ok), "{res:?}");
}

/// A batch whose targets alternate item by item (as a fan-out, `each:`, makes them) goes in
/// under the shared side, each queue filled once for all its runs: every item runs once, on
/// its own target's CPU, and each queue's items run in id order (`max_active` 1: one at a
/// time per CPU, so the probe's log per CPU is its queue's FIFO).
#[test]
fn a_batch_alternating_targets_fills_each_queue_in_id_order() {
    let rig = Rig::new(2, "0-1");
    rig.wq("one", |a| a.max_active = 1);
    // Both queues exist first (a batch that makes a queue is exclusive).
    let mut ids = rig.submit("one", vec![item("cpu:0", "probe"), item("cpu:1", "probe")]);
    let before = rig.engine.stats().shared_submits;
    // Runs of one and two, alternating.
    let targets = ["cpu:0", "cpu:1", "cpu:1", "cpu:0", "cpu:1"];
    let batch: Vec<ItemSpec> = (0..300)
        .map(|i| item(targets[i % targets.len()], "probe"))
        .collect();
    let shared = rig.submit("one", batch);
    assert_eq!(
        rig.engine.stats().shared_submits - before,
        1,
        "one shared submit"
    );
    ids.extend(&shared);
    let res = rig.flush(&ids);
    assert_eq!(res.len(), ids.len());
    for r in &res {
        assert_eq!(r.state, State::Ok, "{r:?}");
        let want = if r.target == parse_target("cpu:0") {
            0
        } else {
            1
        };
        assert_eq!(r.cpu_started, Some(want), "{r:?}");
    }
    let runs = rig.probe.runs.lock().clone();
    let mut ran: Vec<u64> = runs.iter().map(|&(id, _)| id).collect();
    ran.sort_unstable();
    let mut want = ids.clone();
    want.sort_unstable();
    assert_eq!(ran, want, "every item ran once");
    for (cpu, count) in [(0u32, 120), (1, 180)] {
        let order: Vec<u64> = runs
            .iter()
            .filter(|&&(id, c)| c == cpu && shared.contains(&id))
            .map(|&(id, _)| id)
            .collect();
        assert_eq!(order.len(), count, "cpu {cpu}");
        assert!(
            order.windows(2).all(|w| w[0] < w[1]),
            "cpu {cpu} ran its queue out of id order: {order:?}"
        );
    }
}

/// Shared submits racing each other never pass `max_queued` together: the limit is checked
/// and the batch counted in one hold of the workqueue's lock. Four submitters fill a workqueue
/// of 1 000 with batches of 100 items that wait until cancelled: exactly 1 000 are accepted,
/// every other batch is refused whole, and the count never goes past the limit.
#[test]
fn shared_submits_racing_each_other_never_pass_max_queued() {
    let rig = Rig::new(2, "0-1");
    rig.wq("small", |a| a.max_queued = 1000);
    // The queue exists before the race (its first batch is exclusive).
    let first = rig.submit("small", vec![item("all", "wait").arg("ms", "60000")]);
    let before = rig.engine.stats().shared_submits;
    let accepted = AtomicUsize::new(first.len());
    let refused = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..20 {
                    let batch: Vec<ItemSpec> = (0..100)
                        .map(|_| item("all", "wait").arg("ms", "60000"))
                        .collect();
                    match rig.engine.submit("small", batch) {
                        Ok(r) => {
                            accepted.fetch_add(r.items.len(), Ordering::SeqCst);
                        }
                        Err(EngineError::QueueFull { limit: 1000, .. }) => {
                            refused.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(e) => panic!("{e}"),
                    }
                    let st = rig.engine.stats();
                    assert!(st.pending + st.running <= 1000, "{st:?}");
                }
            });
        }
    });
    // 1 + 9 batches of 100 fit (the tenth would make 1 001).
    assert_eq!(accepted.load(Ordering::SeqCst), 901);
    assert_eq!(refused.load(Ordering::SeqCst), 80 - 9);
    assert_eq!(rig.engine.stats().shared_submits - before, 9);
    rig.engine
        .cancel(FlushScope::Workqueue("small".into()))
        .unwrap()
        .running
        .wait(Some(Duration::from_secs(30)))
        .unwrap();
    let t0 = Instant::now();
    while rig.engine.stats().items > 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "cancelled items end"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Shared submits racing the workers that run their items, each other, and cancels (which
/// hold L exclusive): every item reaches exactly one terminal state, each flush hears each of
/// its items once, and nothing is left live. Three submitters send batches into the same
/// queues (a CPU each, and both) while a fourth thread cancels ids of recent batches.
#[test]
fn shared_submits_racing_workers_and_cancels_lose_and_repeat_nothing() {
    let rig = Rig::new(2, "0-1");
    for t in ["cpu:0", "cpu:1", "all"] {
        rig.flush(&rig.submit("default", vec![item(t, "probe")]));
    }
    let before = rig.engine.stats();
    let recent: Mutex<Vec<u64>> = Mutex::new(Vec::new());
    let done = std::sync::atomic::AtomicBool::new(false);
    let (ok, cancelled) = (AtomicUsize::new(0), AtomicUsize::new(0));
    std::thread::scope(|s| {
        let mut submitters = Vec::new();
        for side in 0..3usize {
            let (rig, recent, ok, cancelled) = (&rig, &recent, &ok, &cancelled);
            submitters.push(s.spawn(move || {
                for round in 0..150usize {
                    let n = 1 + (round * 37 + side * 11) % 150;
                    let target = ["cpu:0", "cpu:1", "all"][(round + side) % 3];
                    let batch: Vec<ItemSpec> = (0..n).map(|_| item(target, "probe")).collect();
                    let (rec, mut flush) = rig
                        .engine
                        .submit_and_flush("default", batch, false)
                        .unwrap();
                    recent
                        .lock()
                        .extend(rec.items.iter().map(|i| i.id).step_by(7));
                    let deadline = Some(Instant::now() + Duration::from_secs(30));
                    let mut got = Vec::new();
                    while let Some(ev) = flush.next_blocking(deadline).expect("in time") {
                        let FlushEvent::Done(r) = ev else {
                            panic!("unexpected {ev:?}");
                        };
                        match r.state {
                            State::Ok => ok.fetch_add(1, Ordering::SeqCst),
                            State::Cancelled => cancelled.fetch_add(1, Ordering::SeqCst),
                            other => panic!("item {} ended {other:?}", r.id),
                        };
                        got.push(r.id);
                    }
                    got.sort_unstable();
                    let want: Vec<u64> = rec.items.iter().map(|i| i.id).collect();
                    assert_eq!(got, want, "each item of the batch heard once");
                }
            }));
        }
        let (rig, recent, done) = (&rig, &recent, &done);
        // Set however the submitters end (a failed one panics): the canceller stops, and
        // the test fails rather than hangs.
        struct Stop<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let _stop = Stop(done);
        s.spawn(move || {
            while !done.load(Ordering::SeqCst) {
                let ids = std::mem::take(&mut *recent.lock());
                if !ids.is_empty() {
                    rig.engine.cancel(FlushScope::Items(ids)).unwrap();
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        });
        let joined: Vec<_> = submitters.into_iter().map(|t| t.join()).collect();
        done.store(true, Ordering::SeqCst);
        for j in joined {
            j.unwrap();
        }
    });
    let st = rig.engine.stats();
    assert_eq!(st.items, 0, "nothing left live");
    let ended = ok.load(Ordering::SeqCst) + cancelled.load(Ordering::SeqCst);
    let by = |s: State| {
        st.totals.get(&s).copied().unwrap_or(0) - before.totals.get(&s).copied().unwrap_or(0)
    };
    assert_eq!(
        by(State::Ok) as usize,
        ok.load(Ordering::SeqCst),
        "each Ok once"
    );
    assert_eq!(
        by(State::Cancelled) as usize,
        cancelled.load(Ordering::SeqCst)
    );
    let runs = rig.probe.runs.lock();
    let mut seen = HashSet::new();
    assert!(
        runs.iter().all(|(id, _)| seen.insert(*id)),
        "no item ran twice"
    );
    assert!(ended > 3 * 150, "{ended} items");
    assert!(cancelled.load(Ordering::SeqCst) < ended, "most items ran");
    assert!(
        cancelled.load(Ordering::SeqCst) > 0,
        "the cancels raced the submits"
    );
    assert_eq!(
        st.shared_submits - before.shared_submits,
        3 * 150,
        "every batch shared"
    );
}
