//! Race 6 under load: workers store their finish batches' full results after the scheduler
//! lock L (hand over hand: R taken before L is released, `sched/finish.rs` `Finished`), while
//! other threads look results up and register flushes over ids that are ending right then.
//!
//! Counts and asserts: no look-up of an issued id ever comes back empty (it is live or its
//! result is stored; the store is big enough that nothing expires); no flush over issued ids
//! reports one `Gone` or ends without counting every id it covers; at the end every item ran
//! exactly once and its stored result says `Ok`.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use wqd_core::cpuset::CpuSet;
use wqd_core::engine::{Engine, EngineConfig, FlushScope, ItemId, ItemSpec, State};
use wqd_core::handler::{Args, Handler, HandlerError, Registry, WorkCtx};
use wqd_core::target::Target;

const CPUS: u32 = 4;
/// Items each submitter submits (the load loops end with them).
const PER_SUBMITTER: usize = 30_000;
const SUBMITTERS: usize = 2;
/// Look-ups and flushes the readers must have done before they stop.
const MIN_LOOKUPS: u64 = 10_000;
const MIN_FLUSHES: u64 = 50;

/// Counts runs per item id, and keeps the highest id run so far: the ids just below it are
/// the ones whose results are being stored right now.
struct Count(Vec<AtomicU32>, AtomicU64);

impl Handler for Count {
    fn name(&self) -> &str {
        "count"
    }
    fn validate(&self, _a: &Args, _p: &[u8]) -> Result<(), HandlerError> {
        Ok(())
    }
    fn run(&self, ctx: &WorkCtx<'_>) -> Result<Vec<u8>, HandlerError> {
        if let Some(c) = self.0.get(ctx.item as usize) {
            c.fetch_add(1, Ordering::SeqCst);
        }
        self.1.fetch_max(ctx.item, Ordering::SeqCst);
        Ok(Vec::new())
    }
}

/// `n` ids at most 48 below `last` (none when nothing ran yet).
fn near(rng: &mut StdRng, last: u64, n: usize) -> Vec<ItemId> {
    if last == 0 {
        return Vec::new();
    }
    (0..n)
        .map(|_| last.saturating_sub(rng.gen_range(0..48)).max(1))
        .collect()
}

#[test]
fn results_ending_while_others_look_are_never_missing() {
    let topo = common::topology(CPUS);
    let snap = common::snapshot(&topo, 1, &CpuSet::range(0, CPUS - 1));
    let count = Arc::new(Count(
        (0..=SUBMITTERS * PER_SUBMITTER + 1)
            .map(|_| AtomicU32::new(0))
            .collect(),
        AtomicU64::new(0),
    ));
    let mut reg = Registry::new();
    reg.register(count.clone());
    let cfg = EngineConfig {
        pinning: false,
        results_max: 1 << 20,
        ..EngineConfig::default()
    };
    let engine = Engine::start(cfg, reg, snap).unwrap();
    let issued: Mutex<Vec<ItemId>> = Mutex::new(Vec::new());
    let submitting = AtomicU64::new(SUBMITTERS as u64);
    let stop = AtomicBool::new(false);
    let (lookups, flushes, missing, gone, short) = (
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
    );
    std::thread::scope(|sc| {
        for s in 0..SUBMITTERS {
            let (engine, issued, submitting) = (&engine, &issued, &submitting);
            sc.spawn(move || {
                let mut rng = StdRng::seed_from_u64(11 + s as u64);
                let mut left = PER_SUBMITTER;
                while left > 0 {
                    let n = rng.gen_range(1..=64).min(left);
                    let batch: Vec<ItemSpec> = (0..n)
                        .map(|_| ItemSpec::new(Target::Cpu(rng.gen_range(0..CPUS)), "count"))
                        .collect();
                    let r = engine.submit("default", batch).unwrap();
                    issued.lock().extend(r.items.iter().map(|i| i.id));
                    left -= n;
                }
                submitting.fetch_sub(1, Ordering::SeqCst);
            });
        }
        // Look-ups of the ids that just ran (their results are being stored), R alone first,
        // then L and R. Every id up to the highest run was issued.
        for l in 0..2u64 {
            let (engine, count, stop) = (&engine, &count, &stop);
            let (lookups, missing) = (&lookups, &missing);
            sc.spawn(move || {
                let mut rng = StdRng::seed_from_u64(101 + l);
                while !stop.load(Ordering::SeqCst) {
                    let ids: Vec<ItemId> = near(&mut rng, count.1.load(Ordering::SeqCst), 8);
                    for r in engine.results(&ids) {
                        lookups.fetch_add(1, Ordering::Relaxed);
                        if r.is_none() {
                            missing.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
            });
        }
        // Flushes registered over the ids that just ran: each is live (waited for) or stored
        // (sent at registration); none may be `Gone`, and the flush counts each once.
        {
            let (engine, count, stop) = (&engine, &count, &stop);
            let (flushes, gone, short) = (&flushes, &gone, &short);
            sc.spawn(move || {
                let mut rng = StdRng::seed_from_u64(7);
                while !stop.load(Ordering::SeqCst) {
                    let mut ids = near(&mut rng, count.1.load(Ordering::SeqCst), 16);
                    if ids.is_empty() {
                        std::thread::yield_now();
                        continue;
                    }
                    ids.sort_unstable();
                    ids.dedup();
                    let n = ids.len();
                    let sum = engine
                        .flush(FlushScope::Items(ids))
                        .unwrap()
                        .wait(Some(Duration::from_secs(30)))
                        .unwrap();
                    flushes.fetch_add(1, Ordering::Relaxed);
                    gone.fetch_add(sum.gone as u64, Ordering::SeqCst);
                    let counted: usize = sum.by_state.values().sum();
                    if counted + sum.gone != n {
                        short.fetch_add(1, Ordering::SeqCst);
                    }
                }
            });
        }
        // Until the submitters are done and the readers have had their share (a loaded machine
        // can starve them), at most a minute.
        let t0 = Instant::now();
        while (submitting.load(Ordering::SeqCst) > 0
            || lookups.load(Ordering::SeqCst) < MIN_LOOKUPS
            || flushes.load(Ordering::SeqCst) < MIN_FLUSHES)
            && t0.elapsed() < Duration::from_secs(60)
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        stop.store(true, Ordering::SeqCst);
    });
    let ids = issued.into_inner();
    assert_eq!(ids.len(), SUBMITTERS * PER_SUBMITTER);
    let sum = engine
        .flush(FlushScope::Items(ids.clone()))
        .unwrap()
        .wait(Some(Duration::from_secs(60)))
        .unwrap();
    assert_eq!(sum.gone, 0);
    assert_eq!(sum.by_state.get(&State::Ok), Some(&ids.len()), "{sum:?}");
    let results = engine.results(&ids);
    let not_ok = results
        .iter()
        .filter(|r| r.as_ref().map(|r| r.state) != Some(State::Ok))
        .count();
    assert_eq!(not_ok, 0, "every stored result says Ok");
    let runs: Vec<u32> = ids
        .iter()
        .map(|&id| count.0[id as usize].load(Ordering::SeqCst))
        .collect();
    assert!(runs.iter().all(|&n| n == 1), "every item ran exactly once");
    let (lookups, flushes) = (lookups.into_inner(), flushes.into_inner());
    eprintln!(
        "{lookups} look-ups, {flushes} flushes while {} items ended",
        ids.len()
    );
    assert_eq!(
        missing.into_inner(),
        0,
        "a look-up of an issued id came back empty"
    );
    assert_eq!(gone.into_inner(), 0, "a flush found an issued id gone");
    assert_eq!(
        short.into_inner(),
        0,
        "a flush ended without counting every id"
    );
    assert!(
        lookups >= MIN_LOOKUPS && flushes >= MIN_FLUSHES,
        "the readers did their share within a minute"
    );
}
