//! In-process dispatch: the engine (library API, `noop` items, pinned workers, the host's real
//! topology) against the same work handed to a pinned thread over a crossbeam channel (the
//! floor), to a one-thread `rayon::ThreadPool` and to a one-worker tokio multi-thread runtime.
//!
//! Shape, identical for every system: the submitting thread is pinned to one CPU (S) and the
//! one worker to another (W); the engine's items target `cpu:W`, so its one pinned worker of W
//! runs them. Peers run a boxed closure per item that bumps a completion counter; the
//! submitter waits for the counter (mutex + condvar, woken by the item that reaches the count).
//! The engine's completion is its own: `submit` then `flush(Batch)` and `Flush::wait`.
//! Latency is submit→start of one item at a time on an idle system: peers stamp the start in
//! the closure; the engine's is `ItemResult::started_at` minus the wall clock before `submit`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use parking_lot::{Condvar, Mutex};
use wqd_core::engine::{Batch, Engine, EngineConfig, ItemSpec, ResultsMode, WorkqueueAttrs};
use wqd_core::handler::Registry;
use wqd_core::target::Target;

use crate::busy::{self, Neighbours};
use crate::report::{self, Table, Verdict};
use crate::stats::{ns, percentile, Spread};
use crate::topo;

/// Completion counting shared by the peers' closures.
pub struct Done {
    n: AtomicU64,
    target: AtomicU64,
    lat_ns: AtomicU64,
    lock: Mutex<()>,
    cv: Condvar,
}

impl Done {
    fn leak() -> &'static Done {
        Box::leak(Box::new(Done {
            n: AtomicU64::new(0),
            target: AtomicU64::new(u64::MAX),
            lat_ns: AtomicU64::new(0),
            lock: Mutex::new(()),
            cv: Condvar::new(),
        }))
    }
    /// Announces `k` more items; returns the count to wait for. Call before submitting them.
    fn expect(&self, k: u64) -> u64 {
        let t = self.n.load(Ordering::SeqCst) + k;
        self.target.store(t, Ordering::SeqCst);
        t
    }
    /// Called by each item as it finishes.
    #[inline]
    pub fn hit(&self) {
        let v = self.n.fetch_add(1, Ordering::SeqCst) + 1;
        if v == self.target.load(Ordering::SeqCst) {
            let _g = self.lock.lock();
            self.cv.notify_one();
        }
    }
    fn wait(&self, t: u64) {
        if self.n.load(Ordering::SeqCst) >= t {
            return;
        }
        let mut g = self.lock.lock();
        while self.n.load(Ordering::SeqCst) < t {
            self.cv.wait(&mut g);
        }
    }
}

type Job = Box<dyn FnOnce() + Send + 'static>;

/// One system under test.
pub trait System {
    fn name(&self) -> &'static str;
    /// Runs `n` `noop` items and returns once all have finished.
    fn batch(&mut self, n: usize);
    /// Submits one item on an idle system and returns its submit→start latency.
    fn latency(&mut self) -> Duration;
}

/// Peers: anything that takes a boxed closure.
struct Peer<S: Fn(Job)> {
    name: &'static str,
    spawn: S,
    done: &'static Done,
}

impl<S: Fn(Job)> System for Peer<S> {
    fn name(&self) -> &'static str {
        self.name
    }
    fn batch(&mut self, n: usize) {
        let t = self.done.expect(n as u64);
        let d = self.done;
        for _ in 0..n {
            (self.spawn)(Box::new(move || {
                std::hint::black_box(());
                d.hit();
            }));
        }
        d.wait(t);
    }
    fn latency(&mut self) -> Duration {
        let t = self.done.expect(1);
        let d = self.done;
        let t0 = Instant::now();
        (self.spawn)(Box::new(move || {
            d.lat_ns
                .store(t0.elapsed().as_nanos() as u64, Ordering::SeqCst);
            d.hit();
        }));
        d.wait(t);
        Duration::from_nanos(d.lat_ns.load(Ordering::SeqCst))
    }
}

/// The floor: a crossbeam channel to one thread pinned to `w`.
pub fn floor(w: u32) -> Box<dyn System> {
    let (tx, rx) = crossbeam_channel::unbounded::<Job>();
    std::thread::Builder::new()
        .name("floor".into())
        .spawn(move || {
            topo::pin(w);
            for f in rx {
                f();
            }
        })
        .expect("spawn");
    Box::new(Peer {
        name: "crossbeam floor",
        spawn: move |f| tx.send(f).expect("floor thread"),
        done: Done::leak(),
    })
}

/// `rayon::ThreadPool::spawn` on a one-thread pool pinned to `w`.
pub fn rayon(w: u32) -> Box<dyn System> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .start_handler(move |_| {
            topo::pin(w);
        })
        .build()
        .expect("rayon pool");
    Box::new(Peer {
        name: "rayon spawn",
        spawn: move |f| pool.spawn(f),
        done: Done::leak(),
    })
}

/// `tokio::spawn` (from outside the runtime) on a one-worker multi-thread runtime pinned to `w`.
pub fn tokio(w: u32) -> Box<dyn System> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .on_thread_start(move || {
            topo::pin(w);
        })
        .build()
        .expect("tokio runtime");
    Box::new(Peer {
        name: "tokio spawn",
        spawn: move |f| {
            rt.spawn(async move { f() });
        },
        done: Done::leak(),
    })
}

/// The engine on the host topology with pinning on; items target `cpu:w`.
pub struct Wqd {
    engine: Engine,
    target: Target,
    wq: &'static str,
    name: &'static str,
}

impl Wqd {
    /// The engine with its `default` workqueue (results `full`).
    pub fn start(w: u32) -> Wqd {
        Wqd::with_results(w, ResultsMode::Full)
    }

    /// The engine, its items on a workqueue keeping `results` (`summary` is what the peers
    /// keep: nothing per item).
    pub fn with_results(w: u32, results: ResultsMode) -> Wqd {
        // Keep the result store small: the runs make ~10^5 results.
        Wqd::with_store(w, results, 1 << 16)
    }

    /// [`Wqd::with_results`], the result store holding at most `results_max` results.
    pub fn with_store(w: u32, results: ResultsMode, results_max: usize) -> Wqd {
        let cfg = EngineConfig {
            pinning: true,
            results_max,
            ..EngineConfig::default()
        };
        let engine = Engine::start(cfg, Registry::with_builtins(None), topo::host_snapshot())
            .expect("engine");
        let (wq, name) = match results {
            ResultsMode::Full => ("default", "wqd engine"),
            ResultsMode::Summary => ("summary", "wqd engine, results summary"),
            ResultsMode::None => ("none", "wqd engine, results none"),
        };
        if wq != "default" {
            let mut a = WorkqueueAttrs::named(wq);
            a.results = results;
            engine.create_workqueue(a).expect("workqueue");
        }
        Wqd {
            engine,
            target: format!("cpu:{w}").parse().expect("target"),
            wq,
            name,
        }
    }
}

impl System for Wqd {
    fn name(&self) -> &'static str {
        self.name
    }
    fn batch(&mut self, n: usize) {
        // N copies of one item: what a caller submitting "N of this on that group" writes.
        let mut items = Batch::new();
        items.copies(ItemSpec::new(self.target.clone(), "noop"), n);
        let (_, flush) = self
            .engine
            .submit_and_flush(self.wq, items, true)
            .expect("submit");
        let s = flush.wait(None).expect("wait");
        debug_assert_eq!(s.covered, n);
    }
    fn latency(&mut self) -> Duration {
        let wall = SystemTime::now();
        let item = vec![ItemSpec::new(self.target.clone(), "noop")];
        let (r, flush) = self
            .engine
            .submit_and_flush("default", item, false)
            .expect("submit");
        flush.wait(None).expect("wait");
        // The start time is in the item's result, which the `default` workqueue keeps.
        let res = self.engine.results(&[r.items[0].id])[0]
            .clone()
            .expect("result");
        res.started_at
            .and_then(|s| s.duration_since(wall).ok())
            .unwrap_or_default()
    }
}

/// How much work each run does.
#[derive(Debug, Clone)]
pub struct Cfg {
    pub runs: usize,
    /// (batch size, batches per run). A batch of [`COMPARATOR`] items gets a row but no
    /// verdict.
    pub batches: Vec<(usize, usize)>,
    pub latency_samples: usize,
    /// Measured beside a busy thread on each CPU ([`crate::busy`]); no target judged.
    pub busy: bool,
}

impl Default for Cfg {
    fn default() -> Self {
        Cfg {
            runs: 7,
            batches: vec![(1, 3000), (100, 200), (COMPARATOR, 40), (10_000, 4)],
            latency_samples: 1000,
            busy: false,
        }
    }
}

/// The batch size of the gRPC section's targets ("batches of 1 000: at least 70% / 50% of the
/// in-process engine's items/s"): its in-process row is their comparator, judged by no
/// verdict of its own (the in-process targets are batches of 1, 100 and 10 000).
pub const COMPARATOR: usize = 1000;

/// The figures of one system: per run, items/s per batch size (in `Cfg::batches`' order) and
/// latency p50/p99 (ns).
#[derive(Debug, Clone, Default)]
struct Figures {
    rate: Vec<Vec<f64>>,
    p50: Vec<f64>,
    p99: Vec<f64>,
}

/// The CPUs used: (submitter, worker).
pub fn cpus() -> (u32, u32) {
    let a: Vec<u32> = topo::affinity().iter().collect();
    let s = a[0];
    let w = *a.get(1).unwrap_or(&s);
    (s, w)
}

/// The systems: the floor, wqd (results full), rayon, tokio, wqd (results summary).
pub fn systems(w: u32) -> Vec<Box<dyn System>> {
    vec![
        floor(w),
        Box::new(Wqd::start(w)),
        rayon(w),
        tokio(w),
        Box::new(Wqd::with_results(w, ResultsMode::Summary)),
    ]
}

/// Indexes in [`systems`] of the wqd rows the verdicts judge.
const WQD_ROWS: [usize; 2] = [1, 4];

/// Runs the dispatch comparison; returns its tables and verdicts.
pub fn run(cfg: Cfg) -> (Vec<Table>, Vec<Verdict>) {
    let all = topo::affinity();
    let (s, w) = cpus();
    topo::pin(s);
    let mut sys = systems(w);
    let mut figs = vec![
        Figures {
            rate: vec![Vec::new(); cfg.batches.len()],
            ..Figures::default()
        };
        sys.len()
    ];
    // Warm up every system (threads started, caches and allocators primed).
    for x in sys.iter_mut() {
        for _ in 0..200 {
            x.batch(1);
        }
        x.batch(10_000);
    }
    let neighbours = cfg.busy.then(Neighbours::start);
    for run in 0..cfg.runs {
        // Rotate the order so no system always runs right after the same one.
        for k in 0..sys.len() {
            let i = (k + run) % sys.len();
            let x = &mut sys[i];
            for (j, &(n, rounds)) in cfg.batches.iter().enumerate() {
                let t0 = Instant::now();
                for _ in 0..rounds {
                    x.batch(n);
                }
                let el = t0.elapsed().as_secs_f64();
                figs[i].rate[j].push((n * rounds) as f64 / el);
            }
            let mut lat: Vec<Duration> = (0..cfg.latency_samples).map(|_| x.latency()).collect();
            figs[i].p50.push(ns(percentile(&mut lat, 50.0)));
            figs[i].p99.push(ns(percentile(&mut lat, 99.0)));
        }
    }
    drop(neighbours);
    let names: Vec<&str> = sys.iter().map(|x| x.name()).collect();
    drop(sys);
    topo::unpin(&all);

    let mut tables = Vec::new();
    let mut t = Table::new(
        "In-process dispatch: throughput (items/s, higher is better)",
        &format!(
            "`noop` items, submitter pinned to CPU {s}, one worker pinned to CPU {w}; submit + wait \
             for the whole batch; {} runs, figures min / median / max over runs. `x floor` is the \
             floor's items/s divided by the system's in the same run (1.00 = as fast as the floor).",
            cfg.runs
        ),
        &["system", "batch", "items/s", "x floor (time per item)"],
    );
    let ratio = |i: usize, f: &dyn Fn(&Figures) -> &Vec<f64>, inv: bool| {
        let mut v: Vec<f64> = f(&figs[0])
            .iter()
            .zip(f(&figs[i]))
            .map(|(a, b)| if inv { a / b } else { b / a })
            .collect();
        Spread::of(&mut v)
    };
    let mut wqd_vs = Vec::new();
    for (j, &(n, _)) in cfg.batches.iter().enumerate() {
        for (i, name) in names.iter().enumerate() {
            let r = ratio(i, &|f: &Figures| &f.rate[j], true);
            t.row(vec![
                name.to_string(),
                n.to_string(),
                report::rate_spread(Spread::of(&mut figs[i].rate[j].clone())),
                report::spread(r, 2),
            ]);
        }
        // Each wqd row against rayon (2) and tokio (3), per run.
        for &w in &WQD_ROWS {
            let vs = |k: usize| {
                let mut v: Vec<f64> = figs[w].rate[j]
                    .iter()
                    .zip(&figs[k].rate[j])
                    .map(|(a, b)| a / b)
                    .collect();
                Spread::of(&mut v)
            };
            let floor = ratio(w, &|f: &Figures| &f.rate[j], true);
            wqd_vs.push((names[w], n, floor, vs(2), vs(3)));
        }
    }
    tables.push(t);
    let mut l = Table::new(
        "In-process dispatch: submit→start latency of one item (lower is better)",
        &format!(
            "One item at a time on an idle system, {} samples per run; p50 and p99 per run, \
             min / median / max over {} runs; `x floor` per run.",
            cfg.latency_samples, cfg.runs
        ),
        &["system", "p50", "p99", "p50 x floor", "p99 x floor"],
    );
    for (i, name) in names.iter().enumerate() {
        l.row(vec![
            name.to_string(),
            report::dur_spread(Spread::of(&mut figs[i].p50.clone())),
            report::dur_spread(Spread::of(&mut figs[i].p99.clone())),
            report::spread(ratio(i, &|f: &Figures| &f.p50, false), 2),
            report::spread(ratio(i, &|f: &Figures| &f.p99, false), 2),
        ]);
    }
    tables.push(l);
    if cfg.busy {
        // The verdicts' figures, as a table: no target is judged beside busy threads.
        let mut v = Table::new(
            "In-process dispatch: wqd against rayon and tokio (higher is better)",
            "wqd's items/s over rayon's and tokio's in the same run, per run, min / median / max.",
            &[
                "system",
                "batch",
                "÷ rayon spawn",
                "÷ tokio spawn",
                "x floor",
            ],
        );
        for (name, n, floor, rayon, tokio) in wqd_vs {
            v.row(vec![
                name.to_string(),
                n.to_string(),
                report::spread(rayon, 2),
                report::spread(tokio, 2),
                report::spread(floor, 2),
            ]);
        }
        tables.push(v);
        tables.iter_mut().for_each(busy::mark);
        return (tables, Vec::new());
    }

    let mut verdicts = Vec::new();
    for (name, n, floor, rayon, tokio) in wqd_vs.into_iter().filter(|v| v.1 != COMPARATOR) {
        // Issue 13: within 2x of the floor at 10 000 (the long-run goal stays 1.5x).
        let bound = if n >= 10_000 { 2.0 } else { 1.5 };
        verdicts.push(Verdict::new(
            &format!("{name}, batch {n}: within {bound}x of the crossbeam floor"),
            floor.median <= bound,
            format!("{:.2}x floor", floor.median),
        ));
        verdicts.push(Verdict::new(
            &format!("{name}, batch {n}: ahead of rayon and tokio spawn"),
            rayon.median >= 1.0 && tokio.median >= 1.0,
            format!(
                "{:.2}x rayon's items/s, {:.2}x tokio's",
                rayon.median, tokio.median
            ),
        ));
    }
    (tables, verdicts)
}
