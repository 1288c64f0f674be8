//! Churn stress: random CPU loss and return every few milliseconds while 100k+ items are
//! submitted across many groups and workqueues, with random flushes and cancels; some batches
//! are submitted waiting (`submit_and_wait`, the daemon's `Submit(wait)`).
//!
//! Counts and asserts: every item terminal exactly once; no item run twice; every flush
//! returned within a bound; no item started on a CPU that was dead in the epoch its start
//! check saw; no item started outside its group without a recorded fallback, and fallbacks
//! only where the group had no live CPU in some epoch between submit and start.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use wqd_core::cpuset::CpuSet;
use wqd_core::engine::{
    Engine, EngineConfig, EngineError, FlushEvent, FlushScope, ItemSpec, State, WorkqueueAttrs,
};
use wqd_core::groups::{Fallback, Placement};
use wqd_core::handler::{Args, Handler, HandlerError, HandlerKind, Registry, WorkCtx};
use wqd_core::live::Snapshot;
use wqd_core::target::Target;

const CPUS: u32 = 16;
const ITEMS: u64 = 120_000;
const FLUSH_BOUND: Duration = Duration::from_secs(30);

/// Counts runs per item id.
struct Counter {
    runs: Vec<AtomicU32>,
    kind: HandlerKind,
    name: &'static str,
}

impl Handler for Counter {
    fn name(&self) -> &str {
        self.name
    }
    fn kind(&self) -> HandlerKind {
        self.kind
    }
    fn validate(&self, _a: &Args, _p: &[u8]) -> Result<(), HandlerError> {
        Ok(())
    }
    fn run(&self, ctx: &WorkCtx<'_>) -> Result<Vec<u8>, HandlerError> {
        if let Some(c) = self.runs.get(ctx.item as usize) {
            c.fetch_add(1, Ordering::SeqCst);
        }
        if self.kind == HandlerKind::Waits && ctx.cancel.wait_timeout(Duration::from_micros(300)) {
            return Err(HandlerError::Cancelled);
        }
        Ok(Vec::new())
    }
}

struct World {
    engine: Engine,
    /// Live set of every epoch ever applied.
    history: Mutex<HashMap<u64, CpuSet>>,
    current: Mutex<Arc<Snapshot>>,
    epoch: AtomicU64,
}

fn targets() -> Vec<Target> {
    let mut t: Vec<Target> = (0..CPUS).map(Target::Cpu).collect();
    for lo in (0..CPUS).step_by(4) {
        t.push(Target::Cpus(CpuSet::range(lo, lo + 3)));
    }
    t.push(Target::Cpus(CpuSet::range(0, 1)));
    t.push(Target::Cpus("3,9,14".parse().unwrap()));
    t.push(Target::All);
    t
}

#[test]
fn churn_keeps_the_contract() {
    let seed: u64 = std::env::var("WQD_CHURN_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed);
    let topo = common::topology(CPUS);
    let all = CpuSet::range(0, CPUS - 1);
    let first = common::snapshot(&topo, 1, &all);
    let cpu_runs = Arc::new(Counter {
        runs: (0..ITEMS + 50_000).map(|_| AtomicU32::new(0)).collect(),
        kind: HandlerKind::CpuBound,
        name: "count",
    });
    let wait_runs = Arc::new(Counter {
        runs: (0..ITEMS + 50_000).map(|_| AtomicU32::new(0)).collect(),
        kind: HandlerKind::Waits,
        name: "count-wait",
    });
    let mut reg = Registry::new();
    reg.register(cpu_runs.clone());
    reg.register(wait_runs.clone());
    let cfg = EngineConfig {
        pinning: false,
        results_max: 10_000_000,
        ..EngineConfig::default()
    };
    let engine = Engine::start(cfg, reg, first.clone()).unwrap();
    let wqs = [
        ("default", Fallback::Widen, Placement::Spread, false, 0),
        ("wait", Fallback::Wait, Placement::Spread, false, 0),
        ("reject", Fallback::Reject, Placement::LeastLoaded, false, 0),
        ("first", Fallback::Widen, Placement::First, false, 0),
        ("ordered", Fallback::Widen, Placement::Spread, true, 0),
        ("capped", Fallback::Wait, Placement::Spread, false, 3),
    ];
    for (name, fb, pl, ordered, cap) in wqs.iter().skip(1) {
        let mut a = WorkqueueAttrs::named(name);
        a.fallback = *fb;
        a.placement = *pl;
        a.ordered = *ordered;
        a.group_max_active = *cap;
        a.max_active = 2;
        engine.create_workqueue(a).unwrap();
    }
    let world = Arc::new(World {
        engine,
        history: Mutex::new(HashMap::from([(1, all.clone())])),
        current: Mutex::new(first),
        epoch: AtomicU64::new(1),
    });
    let stop = Arc::new(AtomicBool::new(false));

    // Topology churn: a new live set every 1-4 ms.
    let churn = {
        let (world, stop) = (world.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut rng = StdRng::seed_from_u64(seed ^ 1);
            let mut events = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let live: CpuSet = match rng.gen_range(0..100) {
                    0..=4 => CpuSet::single(0),
                    5..=9 => CpuSet::range(0, CPUS - 1),
                    _ => (0..CPUS).filter(|_| rng.gen_bool(0.7)).collect(),
                };
                let live = if live.is_empty() {
                    CpuSet::single(0)
                } else {
                    live
                };
                let mut cur = world.current.lock();
                let next = common::next(&cur, &live);
                world.history.lock().insert(next.epoch, live);
                world.engine.apply_snapshot(&next);
                world.epoch.store(next.epoch, Ordering::SeqCst);
                *cur = next;
                drop(cur);
                events += 1;
                std::thread::sleep(Duration::from_micros(rng.gen_range(1000..4000)));
            }
            events
        })
    };

    // Submitters.
    let submitted = Arc::new(Mutex::new(Vec::<(u64, u64, Target)>::new()));
    let max_flush = Arc::new(Mutex::new(Duration::ZERO));
    let flushes = Arc::new(AtomicU64::new(0));
    let cancels = Arc::new(AtomicU64::new(0));
    let total = Arc::new(AtomicU64::new(0));
    // (id, state) of every item a `submit_and_wait` heard of.
    let waited = Arc::new(Mutex::new(Vec::<(u64, State)>::new()));
    let mut subs = Vec::new();
    for t in 0..2u64 {
        let (world, submitted, max_flush, flushes, cancels, total, waited) = (
            world.clone(),
            submitted.clone(),
            max_flush.clone(),
            flushes.clone(),
            cancels.clone(),
            total.clone(),
            waited.clone(),
        );
        subs.push(std::thread::spawn(move || {
            let mut rng = StdRng::seed_from_u64(seed ^ (t + 10));
            let targets = targets();
            while total.load(Ordering::Relaxed) < ITEMS {
                let wq = wqs[rng.gen_range(0..wqs.len())].0;
                let n = rng.gen_range(1..300);
                let epoch = world.epoch.load(Ordering::SeqCst);
                let mut batch = Vec::with_capacity(n);
                for _ in 0..n {
                    let target = targets[rng.gen_range(0..targets.len())].clone();
                    let h = if rng.gen_bool(0.05) {
                        "count-wait"
                    } else {
                        "count"
                    };
                    let mut it = ItemSpec::new(target, h);
                    if rng.gen_bool(0.02) {
                        it.delay = Some(Duration::from_millis(rng.gen_range(1..5)));
                    }
                    if rng.gen_bool(0.02) {
                        it.deadline = Some(Duration::from_millis(rng.gen_range(1..20)));
                    }
                    batch.push(it);
                }
                let targets_of: Vec<Target> = batch.iter().map(|i| i.target.clone()).collect();
                // Some batches wait in the submit (`submit_and_wait`: an at-end flush, whose
                // full results the workers keep as records until the last item ends).
                let wait = rng.gen_bool(0.08);
                let submit = if wait {
                    world
                        .engine
                        .submit_and_wait(wq, batch)
                        .map(|(r, f)| (r, Some(f)))
                } else {
                    world.engine.submit(wq, batch).map(|r| (r, None))
                };
                let (r, waiting) = match submit {
                    Ok(r) => r,
                    Err(EngineError::QueueFull { .. }) => {
                        std::thread::sleep(Duration::from_millis(1));
                        continue;
                    }
                    Err(e) => panic!("submit: {e}"),
                };
                total.fetch_add(n as u64, Ordering::Relaxed);
                {
                    let mut s = submitted.lock();
                    for (it, tg) in r.items.iter().zip(targets_of) {
                        s.push((it.id, epoch, tg));
                    }
                }
                let recent: Vec<u64> = r.items.iter().map(|i| i.id).collect();
                if let Some(mut f) = waiting {
                    // Every item of the batch once, terminal, with its full result.
                    let deadline = Some(Instant::now() + FLUSH_BOUND);
                    let mut got = Vec::new();
                    while let Some(ev) =
                        f.next_blocking(deadline).expect("submit_and_wait in bound")
                    {
                        match ev {
                            FlushEvent::Done(r) => {
                                assert!(r.state.is_terminal(), "{} is {:?}", r.id, r.state);
                                got.push((r.id, r.state));
                            }
                            other => panic!("submit_and_wait (results = full): {other:?}"),
                        }
                    }
                    let mut ids: Vec<u64> = got.iter().map(|g| g.0).collect();
                    ids.sort_unstable();
                    assert_eq!(ids, recent, "one result per item of the waited batch");
                    waited.lock().extend(got);
                }
                match rng.gen_range(0..100) {
                    0..=9 => {
                        let f = world.engine.flush(FlushScope::Batch(r.batch)).unwrap();
                        let sum = f
                            .wait(Some(FLUSH_BOUND))
                            .expect("batch flush returned in bound");
                        let mut m = max_flush.lock();
                        *m = (*m).max(sum.waited);
                        flushes.fetch_add(1, Ordering::Relaxed);
                    }
                    10..=11 => {
                        let f = world
                            .engine
                            .flush(FlushScope::Workqueue(wq.into()))
                            .unwrap();
                        let sum = f.wait(Some(FLUSH_BOUND)).expect("workqueue flush returned");
                        let mut m = max_flush.lock();
                        *m = (*m).max(sum.waited);
                        flushes.fetch_add(1, Ordering::Relaxed);
                    }
                    12..=17 => {
                        let k = rng.gen_range(0..recent.len());
                        let ids = recent[k..].to_vec();
                        let rep = world.engine.cancel(FlushScope::Items(ids)).unwrap();
                        rep.running
                            .wait(Some(FLUSH_BOUND))
                            .expect("cancel wait returned");
                        cancels.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {}
                }
            }
        }));
    }
    for s in subs {
        s.join().expect("submitter");
    }
    stop.store(true, Ordering::Relaxed);
    let events = churn.join().expect("churn");
    {
        let mut cur = world.current.lock();
        let next = common::next(&cur, &all);
        world.history.lock().insert(next.epoch, all.clone());
        world.engine.apply_snapshot(&next);
        *cur = next;
    }

    // Everything must come to an end.
    let submitted = std::mem::take(&mut *submitted.lock());
    let ids: Vec<u64> = submitted.iter().map(|s| s.0).collect();
    let t0 = Instant::now();
    let mut f = world.engine.flush(FlushScope::Items(ids.clone())).unwrap();
    let mut results = HashMap::new();
    let deadline = Some(Instant::now() + Duration::from_secs(60));
    while let Some(ev) = f
        .next_blocking(deadline)
        .expect("final flush returned in bound")
    {
        match ev {
            FlushEvent::Done(r) => {
                assert!(
                    results.insert(r.id, r).is_none(),
                    "one terminal event per item"
                );
            }
            FlushEvent::Gone(id) => panic!("result of {id} expired"),
            FlushEvent::Ended(id, _) => panic!("{id} ended without a result (results = full)"),
        }
    }
    let final_wait = t0.elapsed();

    let history = world.history.lock();
    let groups = world.current.lock().groups.clone();
    let mut by_state: HashMap<State, u64> = HashMap::new();
    let (mut fallbacks, mut rebinds) = (0u64, 0u64);
    for (id, submit_epoch, target) in &submitted {
        let r = results
            .get(id)
            .unwrap_or_else(|| panic!("item {id} has no result"));
        assert!(r.state.is_terminal(), "item {id} is {:?}", r.state);
        *by_state.entry(r.state).or_default() += 1;
        let runs = cpu_runs.runs[*id as usize].load(Ordering::SeqCst)
            + wait_runs.runs[*id as usize].load(Ordering::SeqCst);
        assert!(runs <= 1, "item {id} ran {runs} times");
        match r.state {
            State::Ok => assert_eq!(runs, 1, "item {id} ok without running"),
            State::Expired | State::Rejected => assert_eq!(runs, 0, "item {id} ran"),
            _ => {}
        }
        rebinds += u64::from(r.rebinds);
        if runs == 1 {
            let cpu = r.cpu_started.expect("started cpu");
            let e = r.epoch_started.expect("start epoch");
            assert!(
                history[&e].contains(cpu),
                "item {id} started on cpu {cpu}, dead in epoch {e}"
            );
            let members = groups
                .resolve(target, &all, Fallback::Wait)
                .unwrap()
                .members;
            match r.fallback {
                None => assert!(
                    members.contains(cpu),
                    "item {id} of {target} ran on {cpu} with no fallback"
                ),
                Some(_) => {
                    fallbacks += 1;
                    let dead_once = (*submit_epoch..=e).any(|ep| {
                        history
                            .get(&ep)
                            .is_some_and(|live| !live.intersects(&members))
                    });
                    assert!(
                        dead_once,
                        "item {id} of {target} fell back while its group was live"
                    );
                }
            }
        }
    }
    // What each `submit_and_wait` heard is what the final flush finds.
    let waited = std::mem::take(&mut *waited.lock());
    for (id, state) in &waited {
        assert_eq!(
            results[id].state, *state,
            "item {id}: its waiter and the store agree"
        );
    }
    assert!(!waited.is_empty(), "some batches waited in the submit");
    let stats = world.engine.stats();
    eprintln!(
        "churn: {} items ({} waited in the submit), {} topology events, {} flushes (max wait {:?}), \
         {} cancels, final flush {:?}, {} fallbacks, {} re-binds, by state {:?}, engine re-binds {:?}",
        submitted.len(),
        waited.len(),
        events,
        flushes.load(Ordering::Relaxed),
        *max_flush.lock(),
        cancels.load(Ordering::Relaxed),
        final_wait,
        fallbacks,
        rebinds,
        by_state,
        stats.rebinds
    );
    assert!(submitted.len() as u64 >= ITEMS);
    assert!(events > 50, "the topology really churned");
    assert_eq!(stats.items, 0, "nothing left live in the engine");
    assert_eq!(stats.flushes, 0, "no flush left registered");
}
