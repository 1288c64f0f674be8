//! Hotplug reaction: how long after a CPU leaves its pending items start elsewhere, and how
//! much later a flush over them returns than it would have without the loss.
//!
//! Each trial blocks the leaving CPU X with a `gate` item (a handler that waits until the
//! bench releases it), queues `pending` `noop` items on `cpu:X` behind it (they stay pending:
//! X's one slot is taken) and then makes the event happen:
//!
//! - **loss**: X leaves. The items widen to X's core sibling and run there.
//! - **baseline**: the gate opens instead and the items run on X. The flush of the baseline
//!   is "the remaining work"; the extra flush delay a loss causes is loss − baseline.
//!
//! Paths: `direct` calls `Engine::apply_snapshot` on a made-up 8-CPU topology (the event is
//! the call). `rescan` and `trigger` copy the `two-socket` sysfs fixture to a temporary
//! folder, run a `LiveView` whose listener applies each snapshot to the engine and a
//! `Monitor` (netlink off) over that tree; the event is the moment the tree says X is offline
//! (written the way the kernel changes sysfs). `rescan` waits for the periodic rescan (the
//! daemon's default period, 1 s); `trigger` also sends a `Reporter::report` right away, the
//! same channel a netlink uevent uses. Pinning is off (fixture CPUs are not the host's).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::{Condvar, Mutex};
use wqd_core::cpuset::CpuSet;
use wqd_core::engine::{Engine, EngineConfig, FlushScope, ItemId, ItemSpec, WorkqueueAttrs};
use wqd_core::groups::Fallback;
use wqd_core::handler::{Args, Handler, HandlerError, Registry, WorkCtx};
use wqd_core::live::{LiveConfig, LiveView, MonitorConfig, Snapshot};
use wqd_core::target::Target;
use wqd_core::topology::sysfs::Reader;

use crate::report::{self, Table, Verdict};
use crate::stats::{ns, Spread};
use crate::topo;

/// A handler that holds its CPU until the bench opens gate `gen` (its argument).
#[derive(Default)]
pub struct Gate {
    /// (gates opened up to this generation, items inside).
    state: Mutex<(u64, u64)>,
    cv: Condvar,
}

impl Gate {
    pub fn open(&self, gen: u64) {
        self.state.lock().0 = gen;
        self.cv.notify_all();
    }
    /// Waits until `n` gate items in all have entered.
    pub fn wait_entered(&self, n: u64) {
        let mut g = self.state.lock();
        while g.1 < n {
            self.cv.wait(&mut g);
        }
    }
}

/// The [`Handler`] side of a shared [`Gate`].
pub struct GateHandler(pub Arc<Gate>);

impl Handler for GateHandler {
    fn name(&self) -> &str {
        "gate"
    }
    fn validate(&self, args: &Args, _p: &[u8]) -> Result<(), HandlerError> {
        args.get("gen")
            .and_then(|g| g.parse::<u64>().ok())
            .map(drop)
            .ok_or_else(|| HandlerError::InvalidArgument("gen=N".into()))
    }
    fn run(&self, ctx: &WorkCtx<'_>) -> Result<Vec<u8>, HandlerError> {
        let gen: u64 = ctx.args["gen"].parse().unwrap_or(0);
        let mut g = self.0.state.lock();
        g.1 += 1;
        self.0.cv.notify_all();
        while g.0 < gen && !ctx.cancel.is_cancelled() {
            self.0.cv.wait_for(&mut g, Duration::from_millis(50));
        }
        Ok(Vec::new())
    }
}

/// What one trial saw, in ns from the event.
#[derive(Debug, Clone, Copy, Default)]
pub struct Trial {
    /// `apply_snapshot` returned (direct path only).
    pub applied: f64,
    /// The first pending item started.
    pub first: f64,
    /// The last pending item started.
    pub last: f64,
    /// The flush over the pending items returned.
    pub flush: f64,
}

/// An engine with the gate handler and a `hp` workqueue (widen, one item per CPU).
pub fn engine(first: Arc<Snapshot>, gate: &Arc<Gate>) -> Engine {
    let mut reg = Registry::with_builtins(None);
    reg.register(Arc::new(GateHandler(gate.clone())));
    let cfg = EngineConfig {
        pinning: false,
        results_max: 1 << 16,
        ..EngineConfig::default()
    };
    let e = Engine::start(cfg, reg, first).expect("engine");
    e.create_workqueue(WorkqueueAttrs {
        fallback: Fallback::Widen,
        ..WorkqueueAttrs::named("hp")
    })
    .expect("workqueue");
    e
}

/// Blocks `cpu:x` with gate `gen` and queues `pending` noop items behind it.
/// Returns (gate item, pending items' batch).
fn block(engine: &Engine, gate: &Gate, x: u32, gen: u64, pending: usize) -> (ItemId, u64) {
    let t: Target = format!("cpu:{x}").parse().expect("target");
    let g = engine
        .submit(
            "hp",
            vec![ItemSpec::new(t.clone(), "gate").arg("gen", &gen.to_string())],
        )
        .expect("submit gate");
    gate.wait_entered(gen);
    let r = engine
        .submit("hp", vec![ItemSpec::new(t, "noop"); pending])
        .expect("submit");
    (g.items[0].id, r.batch)
}

/// Waits for the pending batch; returns the trial's figures relative to (`t0`, `wall0`).
fn settle(
    engine: &Engine,
    batch: u64,
    x: u32,
    lost: bool,
    t0: Instant,
    wall0: SystemTime,
) -> Trial {
    engine
        .flush(FlushScope::Batch(batch))
        .expect("flush")
        .wait(Some(Duration::from_secs(30)))
        .expect("flush in time");
    let flush = ns(t0.elapsed());
    let ids = engine.batch_items(batch).expect("batch");
    let mut first = f64::MAX;
    let mut last = 0f64;
    for r in engine.results(&ids).into_iter().flatten() {
        let moved = r.cpu_started.is_some_and(|c| c != x);
        assert_eq!(moved, lost, "item {} ran on {:?}", r.id, r.cpu_started);
        let s = r
            .started_at
            .and_then(|s| s.duration_since(wall0).ok())
            .map_or(0.0, ns);
        first = first.min(s);
        last = last.max(s);
    }
    Trial {
        applied: 0.0,
        first,
        last,
        flush,
    }
}

fn release(engine: &Engine, gate: &Gate, gen: u64, item: ItemId) {
    gate.open(gen);
    engine
        .flush(FlushScope::Items(vec![item]))
        .expect("flush")
        .wait(Some(Duration::from_secs(30)))
        .expect("gate item done");
}

/// The direct path: `trials` losses and `trials` baselines on a made-up 8-CPU machine, CPU 3
/// leaving. Returns (loss, baseline).
pub fn direct(trials: usize, pending: usize) -> (Vec<Trial>, Vec<Trial>) {
    const X: u32 = 3;
    let topo = topo::topology(8);
    let all = CpuSet::range(0, 7);
    let mut cur = topo::snapshot(&topo, 1, &all);
    let gate = Arc::new(Gate::default());
    let engine = engine(cur.clone(), &gate);
    let (mut loss, mut base) = (Vec::new(), Vec::new());
    let mut gen = 0;
    for _ in 0..trials {
        for lost in [true, false] {
            gen += 1;
            let (g, batch) = block(&engine, &gate, X, gen, pending);
            let wall0 = SystemTime::now();
            let t0 = Instant::now();
            let mut applied = 0.0;
            if lost {
                let mut less = all.clone();
                less.remove(X);
                cur = topo::next(&cur, &less);
                engine.apply_snapshot(&cur);
                applied = ns(t0.elapsed());
            } else {
                gate.open(gen);
            }
            let mut t = settle(&engine, batch, X, lost, t0, wall0);
            t.applied = applied;
            release(&engine, &gate, gen, g);
            if lost {
                cur = topo::next(&cur, &all);
                engine.apply_snapshot(&cur);
                loss.push(t);
            } else {
                base.push(t);
            }
        }
    }
    engine.shutdown(Duration::ZERO);
    (loss, base)
}

/// The monitor path on a copy of the `two-socket` fixture, CPU 5 (core sibling 13) leaving.
/// With `trigger`, a worker report follows the event at once; without, only the periodic
/// rescan (`period`) notices. Returns the loss trials.
pub fn monitor(trials: usize, pending: usize, period: Duration, trigger: bool) -> Vec<Trial> {
    const X: u32 = 5;
    let pristine = topo::fixture("two-socket");
    let dir = topo::copy_fixture("two-socket");
    let root: &Path = dir.path();
    let reader = Reader::fixture(root);
    let view = LiveView::new(reader.read().expect("read"), LiveConfig::default());
    let gate = Arc::new(Gate::default());
    let engine = Arc::new(engine(view.current(), &gate));
    let e2 = engine.clone();
    view.on_change(Box::new(move |s| e2.apply_snapshot(s)));
    let mon = wqd_core::live::Monitor::start(
        reader,
        view.clone(),
        MonitorConfig {
            rescan: period,
            netlink: false,
        },
    )
    .expect("monitor");
    let reporter = mon.reporter();
    let mut out = Vec::new();
    for gen in 1..=trials as u64 {
        let (g, batch) = block(&engine, &gate, X, gen, pending);
        topo::set_offline(root, X);
        let wall0 = SystemTime::now();
        let t0 = Instant::now();
        if trigger {
            reporter.report(X, "bench: cpu went away");
        }
        out.push(settle(&engine, batch, X, true, t0, wall0));
        release(&engine, &gate, gen, g);
        topo::set_online(root, &pristine, X);
        mon.rescan_now().expect("rescan");
        assert!(engine.snapshot().live.contains(X), "cpu {X} back");
    }
    mon.stop();
    engine.shutdown(Duration::ZERO);
    out
}

/// How much work the hotplug section does.
#[derive(Debug, Clone, Copy)]
pub struct Cfg {
    pub trials: usize,
    pub monitor_trials: usize,
    pub pending: usize,
    pub period: Duration,
}

impl Default for Cfg {
    fn default() -> Self {
        Cfg {
            trials: 15,
            monitor_trials: 6,
            pending: 1000,
            period: Duration::from_secs(1),
        }
    }
}

fn spread(v: &[Trial], f: impl Fn(&Trial) -> f64) -> Spread {
    Spread::of(&mut v.iter().map(f).collect::<Vec<_>>())
}

/// Runs every hotplug measurement; returns its table and verdicts.
pub fn run(cfg: Cfg) -> (Vec<Table>, Vec<Verdict>) {
    let (loss, base) = direct(cfg.trials, cfg.pending);
    let trig = monitor(cfg.monitor_trials, cfg.pending, cfg.period, true);
    let resc = monitor(cfg.monitor_trials, cfg.pending, cfg.period, false);
    let mut t = Table::new(
        "Hotplug reaction (time from the event, lower is better)",
        &format!(
            "{} `noop` items pending on `cpu:X` behind a gate item when X leaves; they widen to \
             X's core sibling. `baseline` opens the gate instead (no loss): its flush is the \
             remaining work. min / median / max over {} trials (direct) and {} trials (monitor \
             paths, rescan period {:?}, netlink off). Pinning off.",
            cfg.pending, cfg.trials, cfg.monitor_trials, cfg.period
        ),
        &[
            "path",
            "apply_snapshot returned",
            "first pending item started",
            "last pending item started",
            "flush returned",
        ],
    );
    let dash = || "—".to_string();
    t.row(vec![
        "direct `apply_snapshot`, loss".into(),
        report::dur_spread(spread(&loss, |t| t.applied)),
        report::dur_spread(spread(&loss, |t| t.first)),
        report::dur_spread(spread(&loss, |t| t.last)),
        report::dur_spread(spread(&loss, |t| t.flush)),
    ]);
    t.row(vec![
        "baseline (gate opens, no loss)".into(),
        dash(),
        report::dur_spread(spread(&base, |t| t.first)),
        report::dur_spread(spread(&base, |t| t.last)),
        report::dur_spread(spread(&base, |t| t.flush)),
    ]);
    // Pair trial i of loss with trial i of the baseline (they ran back to back).
    let mut extra: Vec<f64> = loss
        .iter()
        .zip(&base)
        .map(|(l, b)| l.flush - b.flush)
        .collect();
    let extra = Spread::of(&mut extra);
    let mut ratio: Vec<f64> = loss
        .iter()
        .zip(&base)
        .map(|(l, b)| l.flush / b.flush)
        .collect();
    let ratio = Spread::of(&mut ratio);
    t.row(vec![
        "extra flush delay of a loss (loss − baseline, per pair)".into(),
        dash(),
        dash(),
        dash(),
        format!(
            "{} (x baseline {})",
            report::dur_spread(extra),
            report::spread(ratio, 2)
        ),
    ]);
    for (name, v) in [
        ("monitor: sysfs change + worker report (trigger)", &trig),
        ("monitor: sysfs change, periodic rescan alone", &resc),
    ] {
        t.row(vec![
            name.into(),
            dash(),
            report::dur_spread(spread(v, |t| t.first)),
            report::dur_spread(spread(v, |t| t.last)),
            report::dur_spread(spread(v, |t| t.flush)),
        ]);
    }
    let first = spread(&loss, |t| t.first);
    let trig_first = spread(&trig, |t| t.first);
    let resc_first = spread(&resc, |t| t.first);
    let v = vec![
        Verdict::new(
            "hotplug (direct): pending items re-bound within 5 ms of the event",
            first.median <= 5e6,
            format!(
                "first started elsewhere after {}, all {} after {}",
                report::dur_ns(first.median),
                cfg.pending,
                report::dur_ns(spread(&loss, |t| t.last).median)
            ),
        ),
        Verdict::new(
            "hotplug (monitor, explicit trigger): re-bound within 5 ms",
            trig_first.median <= 5e6,
            format!(
                "first started elsewhere after {}",
                report::dur_ns(trig_first.median)
            ),
        ),
        Verdict::new(
            "hotplug (monitor, rescan alone): re-bound within 5 ms",
            resc_first.median <= 5e6,
            format!(
                "first started elsewhere after {} (period {:?})",
                report::dur_ns(resc_first.median),
                cfg.period
            ),
        ),
        Verdict::new(
            "hotplug: flush after a CPU loss within 10 ms of the remaining work",
            extra.median <= 1e7,
            format!(
                "{} over the baseline (negative: faster)",
                report::dur_ns(extra.median)
            ),
        ),
    ];
    (vec![t], v)
}
