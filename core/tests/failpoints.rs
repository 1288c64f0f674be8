//! The seed's race, forced deterministically: a CPU goes offline after a worker bound an item
//! to it and before the handler started. The failpoint `engine::before-start` pauses the
//! worker exactly there. The seams are armed at run time through `wqd_core::failpoint`.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use wqd_core::cpuset::CpuSet;
use wqd_core::engine::{
    CancelOutcome, Engine, EngineConfig, EngineError, FlushScope, ItemSpec, State, WorkqueueAttrs,
};
use wqd_core::groups::Fallback;
use wqd_core::handler::{Args, Handler, HandlerError, Registry, WorkCtx};
use wqd_core::live::Snapshot;
use wqd_core::target::Target;

const SEAM: &str = "engine::before-start";

/// Counts runs and remembers the CPUs they ran on.
#[derive(Default)]
struct Runs {
    n: AtomicU32,
    cpus: Mutex<Vec<u32>>,
}

struct Count(Arc<Runs>);

impl Handler for Count {
    fn name(&self) -> &str {
        "count"
    }
    fn validate(&self, _a: &Args, _p: &[u8]) -> Result<(), HandlerError> {
        Ok(())
    }
    fn run(&self, ctx: &WorkCtx<'_>) -> Result<Vec<u8>, HandlerError> {
        self.0.n.fetch_add(1, Ordering::SeqCst);
        self.0.cpus.lock().push(ctx.cpu);
        Ok(Vec::new())
    }
}

struct Rig {
    engine: Engine,
    runs: Arc<Runs>,
    snap: Mutex<Arc<Snapshot>>,
}

fn rig(fallback: Fallback) -> Rig {
    let topo = common::topology(2);
    let snap = common::snapshot(&topo, 1, &CpuSet::range(0, 1));
    let runs = Arc::new(Runs::default());
    let mut reg = Registry::new();
    reg.register(Arc::new(Count(runs.clone())));
    let cfg = EngineConfig {
        pinning: false,
        ..EngineConfig::default()
    };
    let engine = Engine::start(cfg, reg, snap.clone()).unwrap();
    let mut a = WorkqueueAttrs::named("wq");
    a.fallback = fallback;
    engine.create_workqueue(a).unwrap();
    Rig {
        engine,
        runs,
        snap: Mutex::new(snap),
    }
}

impl Rig {
    fn set_live(&self, live: &str) {
        let mut s = self.snap.lock();
        *s = common::next(&s, &live.parse().unwrap());
        self.engine.apply_snapshot(&s);
    }
    /// Submits one item to cpu:1 and waits until a worker has bound it (and paused).
    fn bind_one(&self) -> u64 {
        let r = self
            .engine
            .submit("wq", vec![ItemSpec::new(Target::Cpu(1), "count")])
            .unwrap();
        let id = r.items[0].id;
        let t0 = Instant::now();
        while self.engine.results(&[id])[0].as_ref().map(|r| r.state) != Some(State::Running) {
            assert!(t0.elapsed() < Duration::from_secs(10), "item never bound");
            std::thread::sleep(Duration::from_millis(1));
        }
        id
    }
}

#[test]
fn cpu_lost_between_bind_and_start_rebinds_and_widens() {
    let scenario = fail::FailScenario::setup();
    let rig = rig(Fallback::Widen);
    wqd_core::failpoint::cfg(SEAM, "pause").unwrap();
    let id = rig.bind_one();
    let flush = rig.engine.flush(FlushScope::Items(vec![id])).unwrap();
    rig.set_live("0");
    wqd_core::failpoint::remove(SEAM);
    let sum = flush
        .wait(Some(Duration::from_secs(10)))
        .expect("flush returns");
    assert_eq!(sum.by_state.get(&State::Ok), Some(&1));
    let r = rig.engine.results(&[id])[0].clone().unwrap();
    assert_eq!(r.state, State::Ok);
    assert_eq!(r.cpu_started, Some(0), "never started on the dead cpu 1");
    assert_eq!(r.rebinds, 1);
    assert!(
        r.fallback.is_some(),
        "ran outside cpu:1 with the fallback recorded"
    );
    assert_eq!(*rig.runs.cpus.lock(), vec![0]);
    assert_eq!(rig.engine.stats().rebinds.get("offline"), Some(&1));
    scenario.teardown();
}

#[test]
fn cpu_lost_between_bind_and_start_waits_for_return() {
    let scenario = fail::FailScenario::setup();
    let rig = rig(Fallback::Wait);
    wqd_core::failpoint::cfg(SEAM, "pause").unwrap();
    let id = rig.bind_one();
    rig.set_live("0");
    wqd_core::failpoint::remove(SEAM);
    let t0 = Instant::now();
    while rig.engine.results(&[id])[0].as_ref().map(|r| r.state) != Some(State::Pending) {
        assert!(t0.elapsed() < Duration::from_secs(10), "not handed back");
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        rig.runs.n.load(Ordering::SeqCst),
        0,
        "waits; does not run elsewhere"
    );
    rig.set_live("0-1");
    let sum = rig
        .engine
        .flush(FlushScope::Items(vec![id]))
        .unwrap()
        .wait(Some(Duration::from_secs(10)))
        .unwrap();
    assert_eq!(sum.by_state.get(&State::Ok), Some(&1));
    let r = rig.engine.results(&[id])[0].clone().unwrap();
    assert_eq!((r.cpu_started, r.rebinds, r.fallback), (Some(1), 1, None));
    scenario.teardown();
}

#[test]
fn cancel_between_bind_and_start_never_runs() {
    let scenario = fail::FailScenario::setup();
    let rig = rig(Fallback::Widen);
    wqd_core::failpoint::cfg(SEAM, "pause").unwrap();
    let id = rig.bind_one();
    let rep = rig.engine.cancel(FlushScope::Items(vec![id])).unwrap();
    assert_eq!(rep.outcomes[0].1, CancelOutcome::WasRunning);
    wqd_core::failpoint::remove(SEAM);
    rep.running.wait(Some(Duration::from_secs(10))).unwrap();
    let r = rig.engine.results(&[id])[0].clone().unwrap();
    assert_eq!(r.state, State::Cancelled);
    assert_eq!(r.cpu_started, None);
    assert_eq!(rig.runs.n.load(Ordering::SeqCst), 0);
    scenario.teardown();
}

/// A snapshot of the rig's topology in which `cpu` is not live for `why`: offline, out of the
/// cpuset, or isolated.
fn without(prev: &Snapshot, cpu: u32, why: &str) -> Arc<Snapshot> {
    let mut t = (*prev.topology).clone();
    match why {
        "offline" => {
            t.online.remove(cpu);
        }
        "cpuset" => {
            t.allowed.remove(cpu);
        }
        "isolated" => {
            t.isolated.insert(cpu);
        }
        other => panic!("{other}"),
    }
    let mut live = prev.live.clone();
    live.remove(cpu);
    Arc::new(Snapshot {
        epoch: prev.epoch + 1,
        topology: Arc::new(t),
        groups: prev.groups.clone(),
        live,
        source: prev.source,
        at: std::time::SystemTime::now(),
    })
}

#[test]
fn a_hand_back_says_why_the_cpu_left() {
    for why in ["offline", "cpuset", "isolated"] {
        let scenario = fail::FailScenario::setup();
        let rig = rig(Fallback::Widen);
        wqd_core::failpoint::cfg(SEAM, "pause").unwrap();
        let id = rig.bind_one();
        let flush = rig.engine.flush(FlushScope::Items(vec![id])).unwrap();
        {
            let mut s = rig.snap.lock();
            *s = without(&s, 1, why);
            rig.engine.apply_snapshot(&s);
        }
        wqd_core::failpoint::remove(SEAM);
        flush
            .wait(Some(Duration::from_secs(10)))
            .expect("flush returns");
        let st = rig.engine.stats();
        assert_eq!(st.rebinds.get(why), Some(&1), "{why}: {:?}", st.rebinds);
        assert_eq!(
            st.rebinds.values().sum::<u64>(),
            1,
            "{why}: {:?}",
            st.rebinds
        );
        let r = rig.engine.results(&[id])[0].clone().unwrap();
        assert_eq!((r.cpu_started, r.rebinds), (Some(0), 1), "{why}");
        scenario.teardown();
    }
}

/// The engine call that panics between two items of a batch (a bug, forced here) leaves no
/// half batch: nothing of it is queued, counted or keyed, and the engine goes on.
#[test]
fn a_submit_that_panics_between_items_leaves_nothing_behind() {
    const BETWEEN: &str = "engine::submit-between-items";
    let scenario = fail::FailScenario::setup();
    let rig = rig(Fallback::Reject);
    let mut w = WorkqueueAttrs::named("waits");
    w.fallback = Fallback::Wait;
    rig.engine.create_workqueue(w).unwrap();
    rig.set_live("0");
    let before_wqs = rig.engine.workqueues();
    let before = rig.engine.stats();
    let spec = |key: &str, delay: bool, deadline: bool| {
        let mut s = ItemSpec::new(Target::Cpu(1), "count");
        s.key = Some(key.into());
        s.delay = delay.then(|| Duration::from_secs(60));
        s.deadline = deadline.then(|| Duration::from_secs(600));
        s
    };
    for wq in ["waits", "wq"] {
        // Panic at the third entry: two are queued (or, on "wq", rejected at once) by then.
        wqd_core::failpoint::cfg(BETWEEN, "2*off->panic").unwrap();
        let batch = vec![
            spec("a", false, true),
            spec("b", true, true),
            spec("c", false, false),
            spec("d", false, false),
        ];
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            rig.engine.submit(wq, batch)
        }));
        assert!(r.is_err(), "{wq}: the failpoint panics");
        wqd_core::failpoint::remove(BETWEEN);
        assert_eq!(
            rig.engine.workqueues(),
            before_wqs,
            "{wq}: counters restored"
        );
        let st = rig.engine.stats();
        assert_eq!(st.items, 0, "{wq}");
        assert_eq!(st.totals, before.totals, "{wq}: rejections rolled back");
        assert_eq!(st.timers, 0, "{wq}: timers rolled back");
    }
    // The keys are free and the engine works: the same batch goes through.
    rig.set_live("0-1");
    let r = rig
        .engine
        .submit(
            "waits",
            vec![spec("a", false, false), spec("b", false, false)],
        )
        .unwrap();
    assert!(r.items.iter().all(|s| s.queued));
    let sum = rig
        .engine
        .flush(FlushScope::Batch(r.batch))
        .unwrap()
        .wait(Some(Duration::from_secs(10)))
        .unwrap();
    assert_eq!(sum.by_state.get(&State::Ok), Some(&2));
    scenario.teardown();
}

/// Waits until workqueue `wq` counts one item ended `Ok` (counted under L, so another L hold
/// has seen the end).
fn ended_ok(rig: &Rig) {
    let t0 = Instant::now();
    loop {
        let ended = rig
            .engine
            .workqueues()
            .into_iter()
            .find(|w| w.attrs.name == "wq")
            .and_then(|w| w.totals.get(&State::Ok).copied());
        if ended == Some(1) {
            return;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "item never ended");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A worker's full results are made and stored after the L hold they ended in, with R taken
/// before that hold ends (`Finished` in `sched/finish.rs`). The seam pauses the worker between
/// releasing L and storing: a flush, a look-up and a cancel that come then must wait for R and
/// find the item ended, never forgotten (`Gone`, `Unknown`, `None`).
#[test]
fn a_result_stored_after_the_lock_is_found_by_whoever_comes_next() {
    const UNSTORED: &str = "engine::results-unstored";
    let scenario = fail::FailScenario::setup();
    let rig = rig(Fallback::Widen);
    wqd_core::failpoint::cfg(UNSTORED, "pause").unwrap();
    let r = rig
        .engine
        .submit("wq", vec![ItemSpec::new(Target::Cpu(1), "count")])
        .unwrap();
    let id = r.items[0].id;
    // Its end is counted under L: once another L hold sees it, its worker holds R and waits at
    // the seam.
    ended_ok(&rig);
    let e = &rig.engine;
    std::thread::scope(|sc| {
        let flush = sc.spawn(|| {
            e.flush(FlushScope::Items(vec![id]))
                .unwrap()
                .wait(Some(Duration::from_secs(20)))
                .unwrap()
        });
        let look = sc.spawn(|| e.results(&[id]));
        let cancel = sc.spawn(|| e.cancel(FlushScope::Items(vec![id])).unwrap().outcomes);
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !flush.is_finished() && !look.is_finished() && !cancel.is_finished(),
            "nobody gets past R before the results are stored"
        );
        wqd_core::failpoint::remove(UNSTORED);
        let sum = flush.join().unwrap();
        assert_eq!(sum.by_state.get(&State::Ok), Some(&1), "{sum:?}");
        assert_eq!(sum.gone, 0);
        let got = look.join().unwrap();
        assert_eq!(got[0].as_ref().map(|r| r.state), Some(State::Ok));
        assert_eq!(
            cancel.join().unwrap(),
            vec![(id, CancelOutcome::AlreadyTerminal(State::Ok))]
        );
    });
    assert_eq!(rig.runs.n.load(Ordering::SeqCst), 1);
    scenario.teardown();
}

/// A worker's finish batch sends its flush events after L (and after its results are
/// stored), each flush's channel kept open by a sender the batch holds (`Finished` in
/// `sched/finish.rs`). The seam pauses the worker between releasing its locks and sending:
/// L is free then (a look-up finds the item ended), the flush's waiter — turning to a tally
/// under L, which no longer finds the item — must not return before the event arrives, and
/// must count the item exactly once.
#[test]
fn a_flush_event_sent_after_the_lock_is_awaited_and_counted_once() {
    const UNSENT: &str = "engine::events-unsent";
    let scenario = fail::FailScenario::setup();
    let rig = rig(Fallback::Widen);
    wqd_core::failpoint::cfg(UNSENT, "pause").unwrap();
    let (r, flush) = rig
        .engine
        .submit_and_flush("wq", vec![ItemSpec::new(Target::Cpu(1), "count")], false)
        .unwrap();
    let id = r.items[0].id;
    // Its end is counted under L: once another L hold sees it, its worker has released L and
    // R and waits at the seam with the flush's event.
    ended_ok(&rig);
    let e = &rig.engine;
    std::thread::scope(|sc| {
        let waiter = sc.spawn(move || flush.wait(Some(Duration::from_secs(20))));
        // L and R are free while the event is unsent: the result is there to look up.
        let got = e.results(&[id]);
        assert_eq!(got[0].as_ref().map(|r| r.state), Some(State::Ok));
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !waiter.is_finished(),
            "the flush returned before its item's event was sent"
        );
        wqd_core::failpoint::remove(UNSENT);
        let sum = waiter.join().unwrap().unwrap();
        assert_eq!(sum.by_state.get(&State::Ok), Some(&1), "{sum:?}");
        assert_eq!(sum.by_state.values().sum::<usize>(), 1, "{sum:?}");
        assert_eq!(sum.gone, 0);
    });
    assert_eq!(rig.runs.n.load(Ordering::SeqCst), 1);
    scenario.teardown();
}

/// Two shared submits can never pass `max_queued` together: the limit is checked and the
/// batch counted in one hold of the workqueue's lock, before the items go in. The first batch
/// is held in its insert (a failpoint sleeps between its items) while the second checks the
/// limit; the second is refused whole, once the first is in. Workers pause before starting, so
/// every accepted item stays live.
#[test]
fn a_shared_submit_held_in_its_insert_is_counted_against_max_queued() {
    const BETWEEN: &str = "engine::submit-between-items";
    let scenario = fail::FailScenario::setup();
    let rig = rig(Fallback::Wait);
    let mut a = WorkqueueAttrs::named("small");
    a.max_queued = 10;
    rig.engine.create_workqueue(a).unwrap();
    let one = |n: usize| -> Vec<ItemSpec> {
        (0..n)
            .map(|_| ItemSpec::new(Target::Cpu(1), "count"))
            .collect()
    };
    // The queue exists (its first batch is the exclusive submit's).
    let (_, f) = rig.engine.submit_and_wait("small", one(1)).unwrap();
    f.wait(Some(Duration::from_secs(10))).unwrap();
    let shared = rig.engine.stats().shared_submits;
    wqd_core::failpoint::cfg(SEAM, "pause").unwrap();
    wqd_core::failpoint::cfg(BETWEEN, "sleep(40)").unwrap();
    let outcomes: Vec<Result<usize, EngineError>> = std::thread::scope(|s| {
        let first = s.spawn(|| rig.engine.submit("small", one(6)).map(|r| r.items.len()));
        // The first is in its insert (5 sleeps of 40 ms) when the second checks the limit.
        std::thread::sleep(Duration::from_millis(60));
        let second = s.spawn(|| rig.engine.submit("small", one(6)).map(|r| r.items.len()));
        vec![first.join().unwrap(), second.join().unwrap()]
    });
    wqd_core::failpoint::remove(BETWEEN);
    assert!(matches!(outcomes[0], Ok(6)), "{outcomes:?}");
    assert!(
        matches!(
            outcomes[1],
            Err(EngineError::QueueFull {
                limit: 10,
                pending: 6,
                adding: 6,
                ..
            })
        ),
        "{outcomes:?}"
    );
    assert_eq!(rig.engine.stats().shared_submits, shared + 1);
    let st = rig.engine.stats();
    assert_eq!(st.pending + st.running, 6, "{st:?}");
    rig.engine
        .cancel(FlushScope::Workqueue("small".into()))
        .unwrap();
    wqd_core::failpoint::remove(SEAM);
    let t0 = Instant::now();
    while rig.engine.stats().items > 0 {
        assert!(t0.elapsed() < Duration::from_secs(10), "the items end");
        std::thread::sleep(Duration::from_millis(5));
    }
    scenario.teardown();
}

/// A shared submit that panics between two items (a bug, forced here) leaves no half batch
/// either: its items are taken out of the table before any is in a queue, and its workqueue's
/// counts are given back; the engine goes on, and the same batch then goes through.
#[test]
fn a_shared_submit_that_panics_between_items_leaves_nothing_behind() {
    const BETWEEN: &str = "engine::submit-between-items";
    let scenario = fail::FailScenario::setup();
    let rig = rig(Fallback::Wait);
    let batch = || -> Vec<ItemSpec> {
        (0..4)
            .map(|_| ItemSpec::new(Target::Cpu(1), "count"))
            .collect()
    };
    // The queue exists (its first batch is the exclusive submit's).
    let (_, f) = rig.engine.submit_and_wait("wq", batch()).unwrap();
    f.wait(Some(Duration::from_secs(10))).unwrap();
    let before_wqs = rig.engine.workqueues();
    let before = rig.engine.stats();
    let ran = rig.runs.n.load(Ordering::SeqCst);
    wqd_core::failpoint::cfg(BETWEEN, "2*off->panic").unwrap();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        rig.engine.submit_and_wait("wq", batch())
    }));
    assert!(r.is_err(), "the failpoint panics");
    wqd_core::failpoint::remove(BETWEEN);
    assert_eq!(rig.engine.workqueues(), before_wqs, "counters restored");
    let st = rig.engine.stats();
    assert_eq!((st.items, st.flushes), (0, 0));
    assert_eq!(st.shared_submits, before.shared_submits);
    assert_eq!(st.totals, before.totals);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(rig.runs.n.load(Ordering::SeqCst), ran, "nothing of it ran");
    let (r, f) = rig.engine.submit_and_wait("wq", batch()).unwrap();
    let sum = f.wait(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(sum.by_state.get(&State::Ok), Some(&4));
    assert_eq!(r.items.len(), 4);
    assert_eq!(rig.engine.stats().shared_submits, before.shared_submits + 1);
    scenario.teardown();
}
