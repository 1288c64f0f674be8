//! Two groups busy at once: what the engine's one lock L costs when its work could be split.
//!
//! Two submitting threads, pinned to different CPUs, each run batches of `noop` items on the
//! *other* CPU's group (`cpu:W`), four threads on two CPUs in all, all at once. Three systems,
//! side by side in each run:
//! - the floor: two crossbeam channels, each to its own pinned thread;
//! - `wqd, one engine per group`: two engines, nothing shared (what the sharded engine of
//!   `core/src/engine/README.md` would give two groups: each its own queue lock);
//! - `wqd, one engine`: both groups on one engine, every submit, take and finish of both
//!   through L.
//!
//! The ratio `one engine ÷ one per group` is the price of L for two busy groups on this host
//! (results `summary`, so the result store plays no part).

use std::sync::Arc;
use std::time::Instant;

use wqd_core::engine::{Batch, Engine, EngineConfig, ItemSpec, ResultsMode, WorkqueueAttrs};
use wqd_core::handler::Registry;
use wqd_core::target::Target;

use crate::busy::{self, Neighbours};
use crate::report::{self, Table, Verdict};
use crate::stats::Spread;
use crate::topo;

/// How much work each run does.
#[derive(Debug, Clone, Copy)]
pub struct Cfg {
    pub runs: usize,
    /// (batch size, batches per submitter per run).
    pub batches: [(usize, usize); 2],
    /// Measured beside a busy thread on each CPU ([`crate::busy`]).
    pub busy: bool,
}

impl Default for Cfg {
    fn default() -> Self {
        Cfg {
            runs: 5,
            batches: [(100, 3000), (1000, 300)],
            busy: false,
        }
    }
}

fn engine() -> Arc<Engine> {
    engine_with(ResultsMode::Summary)
}

/// An engine whose workqueue "summary" keeps `results` (named for the section's default).
fn engine_with(results: ResultsMode) -> Arc<Engine> {
    let cfg = EngineConfig {
        pinning: true,
        ..EngineConfig::default()
    };
    let e =
        Engine::start(cfg, Registry::with_builtins(None), topo::host_snapshot()).expect("engine");
    let mut a = WorkqueueAttrs::named("summary");
    a.results = results;
    e.create_workqueue(a).expect("workqueue");
    Arc::new(e)
}

/// Runs `rounds` batches of `n` on `engine`, target `cpu:w`.
fn wqd_rounds(engine: &Engine, w: u32, n: usize, rounds: usize) {
    let target: Target = format!("cpu:{w}").parse().expect("target");
    for _ in 0..rounds {
        let mut items = Batch::new();
        items.copies(ItemSpec::new(target.clone(), "noop"), n);
        let (_, flush) = engine
            .submit_and_flush("summary", items, true)
            .expect("submit");
        let s = flush.wait(None).expect("wait");
        assert_eq!(s.covered, n);
    }
}

/// One crossbeam channel to a thread pinned to `w`; `rounds` batches of `n` closures, each
/// batch awaited.
struct Lane {
    tx: crossbeam_channel::Sender<Box<dyn FnOnce() + Send>>,
}

impl Lane {
    fn new(w: u32) -> Lane {
        let (tx, rx) = crossbeam_channel::unbounded::<Box<dyn FnOnce() + Send>>();
        std::thread::spawn(move || {
            topo::pin(w);
            for f in rx {
                f();
            }
        });
        Lane { tx }
    }
    fn rounds(&self, n: usize, rounds: usize) {
        let (done_tx, done_rx) = crossbeam_channel::bounded::<()>(1);
        for _ in 0..rounds {
            for i in 0..n {
                let d = (i + 1 == n).then(|| done_tx.clone());
                self.tx
                    .send(Box::new(move || {
                        std::hint::black_box(());
                        if let Some(d) = d {
                            let _ = d.send(());
                        }
                    }))
                    .expect("lane");
            }
            done_rx.recv().expect("lane done");
        }
    }
}

/// Runs `f(side)` on two threads pinned to `a` and `b` at once; returns the wall time in s.
fn both(a: u32, b: u32, f: &(dyn Fn(usize) + Sync)) -> f64 {
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for (side, cpu) in [(0, a), (1, b)] {
            s.spawn(move || {
                topo::pin(cpu);
                f(side);
            });
        }
    });
    t0.elapsed().as_secs_f64()
}

/// The two CPUs the submitters run on (`a`, `b`) and the target of each side: the submitter
/// on `a` targets `b` and the other way round. One CPU only: both sides share it.
fn sides() -> (u32, u32, [u32; 2]) {
    let cpus: Vec<u32> = topo::affinity().iter().collect();
    let (a, b) = (cpus[0], *cpus.get(1).unwrap_or(&cpus[0]));
    (a, b, [b, a])
}

/// Only the wqd part of one system, for a profiler (`wqd-bench --profile-contention one|split
/// ROUNDS [full]`): both submitters run `rounds` batches of 1 000 through one engine (`one`) or one
/// engine each (`split`), results `summary` or (`full`) full; returns the wall time in s.
pub fn profile(one_engine: bool, rounds: usize, full: bool) -> f64 {
    let (a, b, targets) = sides();
    let mode = if full {
        ResultsMode::Full
    } else {
        ResultsMode::Summary
    };
    let engines = if one_engine {
        let e = engine_with(mode);
        [e.clone(), e]
    } else {
        [engine_with(mode), engine_with(mode)]
    };
    for (side, e) in engines.iter().enumerate() {
        wqd_rounds(e, targets[side], 1000, 2);
    }
    both(a, b, &|side| {
        wqd_rounds(&engines[side], targets[side], 1000, rounds)
    })
}

/// Runs the comparison; returns its table and verdicts (none: it measures, it judges nothing
/// yet, see `docs/benchmarks.md`).
pub fn run(cfg: Cfg) -> (Vec<Table>, Vec<Verdict>) {
    let (a, b, targets) = sides();
    let lanes = [Lane::new(targets[0]), Lane::new(targets[1])];
    let split = [engine(), engine()];
    let one = engine();
    // Warm up: workers started on both CPUs of every engine.
    for e in split.iter().chain([&one]) {
        for &t in &targets {
            wqd_rounds(e, t, 1000, 2);
        }
    }
    let names = [
        "crossbeam floor (2 channels)",
        "wqd, one engine per group",
        "wqd, one engine",
    ];
    let mut rates: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); 3]; cfg.batches.len()];
    let neighbours = cfg.busy.then(Neighbours::start);
    for run in 0..cfg.runs {
        for (j, &(n, rounds)) in cfg.batches.iter().enumerate() {
            for k in 0..3 {
                let i = (k + run) % 3;
                let el = match i {
                    0 => both(a, b, &|side| lanes[side].rounds(n, rounds)),
                    1 => both(a, b, &|side| {
                        wqd_rounds(&split[side], targets[side], n, rounds)
                    }),
                    _ => both(a, b, &|side| wqd_rounds(&one, targets[side], n, rounds)),
                };
                rates[j][i].push((2 * n * rounds) as f64 / el);
            }
        }
    }
    drop(neighbours);
    let mut t = Table::new(
        "Two groups at once: one engine lock against one engine per group (items/s, higher is better)",
        &format!(
            "Two submitters pinned to CPUs {a} and {b}, each running batches of `noop` items on the \
             other CPU's group (`cpu:{b}`, `cpu:{a}`) at the same time, each batch awaited \
             (results `summary`); {} runs, min / median / max. `one engine ÷ per group` is per \
             run: below 1.00 is what the shared lock costs when two groups are busy.",
            cfg.runs
        ),
        &["system", "batch", "items/s (both groups)", "x floor (time per item)", "one engine ÷ per group"],
    );
    for (j, &(n, _)) in cfg.batches.iter().enumerate() {
        for (i, name) in names.iter().enumerate() {
            let per = |k: usize, num: usize| {
                let mut v: Vec<f64> = rates[j][num]
                    .iter()
                    .zip(&rates[j][k])
                    .map(|(x, y)| x / y)
                    .collect();
                Spread::of(&mut v)
            };
            t.row(vec![
                name.to_string(),
                n.to_string(),
                report::rate_spread(Spread::of(&mut rates[j][i].clone())),
                report::spread(per(i, 0), 2),
                if i == 2 {
                    report::spread(per(1, 2), 2)
                } else {
                    String::new()
                },
            ]);
        }
    }
    if cfg.busy {
        busy::mark(&mut t);
    }
    (vec![t], Vec::new())
}
