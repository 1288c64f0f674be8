//! What the driver drives: wqd in-process ([`Library`]) or a running daemon
//! ([`crate::daemon::Daemon`], through `wqd-client`). Both sit behind [`Backend`], so the
//! workload and the checks are the same.
//!
//! [`Library`] runs the engine exactly as the daemon wires it: the host topology
//! (`Reader::host()`), a [`LiveView`], a [`Monitor`] with the netlink uevent socket, pinned
//! workers, the workers' reports feeding the monitor. Its handlers are the built-ins wrapped in
//! [`Counted`], which counts every run of every item and notes the CPU the handler really ran
//! on (`sched_getcpu`) and when, so duplicates and strays are seen directly, not inferred from
//! results.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use parking_lot::Mutex;
use wqd_core::cpuset::CpuSet;
use wqd_core::engine::{
    Engine, EngineConfig, EngineError, FlushScope, ItemResult, ItemSpec, State, WorkqueueAttrs,
};
use wqd_core::groups::Fallback;
use wqd_core::handler::{Args, Handler, HandlerError, HandlerKind, Registry, WorkCtx};
use wqd_core::live::{LiveConfig, LiveView, Monitor, MonitorConfig};
use wqd_core::target::Target;
use wqd_core::topology::sysfs::Reader;

use crate::clock::Clock;

/// One item to submit.
#[derive(Debug, Clone)]
pub struct Spec {
    pub target: Target,
    pub handler: &'static str,
    pub args: Vec<(&'static str, String)>,
}

/// What a flush or cancel covers.
#[derive(Debug, Clone)]
pub enum Scope {
    Items(Vec<u64>),
    Batch(u64),
    Workqueue(String),
}

/// An item's result as the checks need it, whatever the backend.
#[derive(Debug, Clone)]
pub struct Rec {
    pub id: u64,
    pub state: State,
    pub cpu_started: Option<u32>,
    /// Timeline times (see [`Clock::on_timeline`]).
    pub queued: Duration,
    pub started: Option<Duration>,
    pub finished: Option<Duration>,
    /// The level it was widened to, lowercase.
    pub fallback: Option<String>,
    pub rebinds: u32,
    /// The topology epoch that proved its CPU live at start (`None` if it never started).
    pub epoch: Option<u64>,
    /// The epoch in which its fallback or rejection was decided (`None`: neither).
    pub decided: Option<u64>,
    pub error: String,
    pub reason: String,
    /// The handler name, as submitted.
    pub handler: String,
    /// The attached worker that ran it (0: none, a built-in handler).
    pub worker: u64,
    /// Times an attached worker was lost holding it and it was re-delivered.
    pub worker_lost: u32,
}

impl Rec {
    /// Converts an engine result, mapping its wall-clock times onto the timeline.
    pub fn from_result(r: &ItemResult, clock: &Clock) -> Rec {
        Rec {
            id: r.id,
            state: r.state,
            cpu_started: r.cpu_started,
            queued: clock.on_timeline(r.queued_at),
            started: r.started_at.map(|t| clock.on_timeline(t)),
            finished: r.finished_at.map(|t| clock.on_timeline(t)),
            fallback: r.fallback.map(|l| l.to_string()),
            rebinds: r.rebinds,
            epoch: r.epoch_started,
            decided: r.epoch_decided,
            error: r.error.clone(),
            handler: r.handler.to_string(),
            worker: r.worker.map_or(0, |w| w.worker),
            worker_lost: r.worker_lost,
            reason: r.reason.clone(),
        }
    }
}

/// A run of one item as its handler saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// How many times the handler was called for the item.
    pub count: u32,
    /// `sched_getcpu()` at the first call's start.
    pub cpu_seen: i32,
    /// The CPU the engine said it started on (`WorkCtx::cpu`).
    pub cpu_ctx: u32,
    /// Timeline time of the first call's start.
    pub at: Duration,
}

/// Outcome of a flush or a cancel's wait.
#[derive(Debug, Clone)]
pub struct Waited {
    pub covered: usize,
    pub waited: Duration,
    /// What the answer got wrong (daemon mode: an item streamed twice, a non-terminal result,
    /// a count that does not add up). Each is a failure.
    pub bad: Vec<String>,
}

/// wqd's published live sets over time: from each time on, the set in force; `None` where it
/// is not known (daemon mode: the topology watch skipped an epoch).
pub type View = Vec<(Duration, Option<CpuSet>)>;

/// What the daemon counted, to hold against the results (daemon mode).
#[derive(Debug, Clone, Default)]
pub struct DaemonCounts {
    /// Per workqueue, items that reached each terminal state (bumped once per item end).
    pub totals: BTreeMap<String, BTreeMap<State, u64>>,
    /// Re-binds summed over items.
    pub rebinds: u64,
}

/// What the driver needs from wqd.
pub trait Backend: Send + Sync {
    /// One line saying what runs.
    fn describe(&self) -> String;
    /// The handler names a submit may use now (daemon mode: attached workers' too).
    ///
    /// # Errors
    /// The backend could not say.
    fn handlers(&self) -> Result<Vec<String>> {
        Ok(Vec::new())
    }
    /// Creates a workqueue with this fallback.
    ///
    /// # Errors
    /// The backend refused it.
    fn create_workqueue(&self, name: &str, fallback: Fallback, max_active: u32) -> Result<()>;
    /// Submits a batch; returns the batch id and the item ids in order. `Ok(None)` when the
    /// workqueue is full for now (try again later).
    ///
    /// # Errors
    /// Any other refusal.
    fn submit(&self, wq: &str, items: &[Spec]) -> Result<Option<(u64, Vec<u64>)>>;
    /// Flushes and waits at most `bound`.
    ///
    /// # Errors
    /// The flush could not start, or `bound` passed (the message says so).
    fn flush(&self, scope: Scope, bound: Duration) -> Result<Waited>;
    /// Cancels the items and waits at most `bound` for the running ones.
    ///
    /// # Errors
    /// As [`Backend::flush`].
    fn cancel(&self, ids: &[u64], bound: Duration) -> Result<Waited>;
    /// Results of `ids`, `None` for an id the backend does not know.
    ///
    /// # Errors
    /// The backend could not answer.
    fn results(&self, ids: &[u64]) -> Result<Vec<Option<Rec>>>;
    /// The CPUs the backend schedules on now.
    ///
    /// # Errors
    /// The backend could not answer.
    fn live(&self) -> Result<CpuSet>;
    /// Runs seen by the handlers, when the backend can see them (library mode).
    fn runs(&self) -> Option<HashMap<u64, Run>>;
    /// When the backend's view of the live CPUs changed, with the new set.
    fn live_history(&self) -> View;
    /// The live set of every epoch the backend published (that the driver saw).
    fn epochs(&self) -> HashMap<u64, CpuSet>;
    /// The daemon's own counts, when it has an API for them (daemon mode).
    ///
    /// # Errors
    /// The backend could not answer.
    fn daemon_counts(&self) -> Result<Option<DaemonCounts>> {
        Ok(None)
    }
    /// Backend counters for the summary: (name, value).
    fn counters(&self) -> Vec<(String, u64)>;
    /// Stops everything the backend started.
    fn shutdown(&self);
}

/// Runs per item, filled by [`Counted`].
type Runs = Mutex<HashMap<u64, Run>>;

/// A handler that counts runs per item and delegates to a built-in.
struct Counted {
    inner: Arc<dyn Handler>,
    runs: Arc<Runs>,
    clock: Arc<Clock>,
}

impl Handler for Counted {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn kind(&self) -> HandlerKind {
        self.inner.kind()
    }
    fn validate(&self, args: &Args, payload: &[u8]) -> Result<(), HandlerError> {
        self.inner.validate(args, payload)
    }
    fn run(&self, ctx: &WorkCtx<'_>) -> Result<Vec<u8>, HandlerError> {
        // SAFETY: sched_getcpu has no preconditions; it returns -1 on error.
        let cpu_seen = unsafe { libc::sched_getcpu() };
        let at = self.clock.now();
        self.runs
            .lock()
            .entry(ctx.item)
            .and_modify(|r| r.count += 1)
            .or_insert(Run {
                count: 1,
                cpu_seen,
                cpu_ctx: ctx.cpu,
                at,
            });
        self.inner.run(ctx)
    }
}

/// wqd in-process on the real host topology.
pub struct Library {
    engine: Arc<Engine>,
    view: Arc<LiveView>,
    monitor: Mutex<Option<Monitor>>,
    runs: Arc<Runs>,
    history: Arc<Mutex<View>>,
    epochs: Arc<Mutex<HashMap<u64, CpuSet>>>,
    clock: Arc<Clock>,
    netlink: bool,
}

impl Library {
    /// Starts the live view, the monitor (netlink on) and the engine (pinning on), wired as the
    /// daemon wires them. `keep` is how long results must be kept (the run's length and then
    /// some).
    ///
    /// # Errors
    /// The host topology cannot be read, or a thread cannot start.
    pub fn start(clock: Arc<Clock>, keep: Duration) -> Result<Library> {
        let reader = Reader::host();
        let first = reader.read().context("reading the host topology")?;
        let view = LiveView::new(first, LiveConfig::default());
        let monitor = Monitor::start(reader, view.clone(), MonitorConfig::default())
            .context("starting the topology monitor")?;
        let netlink = monitor.netlink_active();
        let reporter = monitor.reporter();
        let runs: Arc<Runs> = Arc::new(Mutex::new(HashMap::new()));
        let builtins = Registry::with_builtins(None);
        let mut reg = Registry::new();
        for name in ["noop", "spin", "sleep"] {
            let inner = builtins
                .get(name)
                .ok_or_else(|| anyhow!("no built-in handler {name}"))?
                .clone();
            reg.register(Arc::new(Counted {
                inner,
                runs: runs.clone(),
                clock: clock.clone(),
            }));
        }
        let cfg = EngineConfig {
            pinning: true,
            results_max: 1 << 23,
            results_ttl: keep,
            report: Some(Arc::new(move |cpu, why| reporter.report(cpu, why))),
            ..EngineConfig::default()
        };
        let engine =
            Arc::new(Engine::start(cfg, reg, view.current()).context("starting the engine")?);
        let history = Arc::new(Mutex::new(Vec::new()));
        let epochs = Arc::new(Mutex::new(HashMap::new()));
        let (e2, h2, p2, c2) = (
            engine.clone(),
            history.clone(),
            epochs.clone(),
            clock.clone(),
        );
        let cur = view.on_change(Box::new(move |snap| {
            e2.apply_snapshot(snap);
            h2.lock().push((c2.now(), Some(snap.live.clone())));
            p2.lock().insert(snap.epoch, snap.live.clone());
        }));
        history.lock().push((clock.now(), Some(cur.live.clone())));
        epochs.lock().insert(cur.epoch, cur.live.clone());
        engine.apply_snapshot(&cur);
        Ok(Library {
            engine,
            view,
            monitor: Mutex::new(Some(monitor)),
            runs,
            history,
            epochs,
            clock,
            netlink,
        })
    }

    fn wait_flush(f: wqd_core::engine::Flush, bound: Duration) -> Result<Waited> {
        let covered = f.covered();
        let s = f.wait(Some(bound)).map_err(|e| match e {
            EngineError::Timeout(_) => anyhow!("did not return within {bound:?}"),
            e => anyhow!(e),
        })?;
        Ok(Waited {
            covered,
            waited: s.waited,
            bad: Vec::new(),
        })
    }
}

impl Backend for Library {
    fn describe(&self) -> String {
        let snap = self.view.current();
        format!(
            "library (in-process engine, pinning on, netlink {}), live {} at epoch {}",
            if self.netlink { "on" } else { "OFF" },
            snap.live,
            snap.epoch
        )
    }

    fn create_workqueue(&self, name: &str, fallback: Fallback, max_active: u32) -> Result<()> {
        let mut a = WorkqueueAttrs::named(name);
        a.fallback = fallback;
        a.max_active = max_active;
        self.engine
            .create_workqueue(a)
            .with_context(|| format!("creating workqueue {name}"))
    }

    fn submit(&self, wq: &str, items: &[Spec]) -> Result<Option<(u64, Vec<u64>)>> {
        let specs: Vec<ItemSpec> = items
            .iter()
            .map(|s| {
                let mut it = ItemSpec::new(s.target.clone(), s.handler);
                for (k, v) in &s.args {
                    it = it.arg(k, v);
                }
                it
            })
            .collect();
        match self.engine.submit(wq, specs) {
            Ok(r) => Ok(Some((r.batch, r.items.iter().map(|s| s.id).collect()))),
            Err(EngineError::QueueFull { .. }) => Ok(None),
            Err(e) => Err(anyhow!(e).context(format!("submitting to {wq}"))),
        }
    }

    fn flush(&self, scope: Scope, bound: Duration) -> Result<Waited> {
        let scope = match scope {
            Scope::Items(v) => FlushScope::Items(v),
            Scope::Batch(b) => FlushScope::Batch(b),
            Scope::Workqueue(w) => FlushScope::Workqueue(w),
        };
        let f = self.engine.flush(scope)?;
        Self::wait_flush(f, bound)
    }

    fn cancel(&self, ids: &[u64], bound: Duration) -> Result<Waited> {
        let rep = self.engine.cancel(FlushScope::Items(ids.to_vec()))?;
        Self::wait_flush(rep.running, bound)
    }

    fn results(&self, ids: &[u64]) -> Result<Vec<Option<Rec>>> {
        Ok(self
            .engine
            .results(ids)
            .into_iter()
            .map(|r| r.map(|r| Rec::from_result(&r, &self.clock)))
            .collect())
    }

    fn live(&self) -> Result<CpuSet> {
        Ok(self.engine.snapshot().live.clone())
    }

    fn runs(&self) -> Option<HashMap<u64, Run>> {
        Some(self.runs.lock().clone())
    }

    fn live_history(&self) -> View {
        self.history.lock().clone()
    }

    fn epochs(&self) -> HashMap<u64, CpuSet> {
        self.epochs.lock().clone()
    }

    fn counters(&self) -> Vec<(String, u64)> {
        let s = self.engine.stats();
        let mut v = vec![
            ("epoch".to_string(), s.epoch),
            ("lockups".to_string(), s.lockups),
            ("hogs".to_string(), s.hogs),
        ];
        v.extend(s.rebinds.iter().map(|(k, n)| (format!("rebinds.{k}"), *n)));
        v.extend(
            s.fallbacks
                .iter()
                .map(|(k, n)| (format!("fallbacks.{k}"), *n)),
        );
        let live = self.view.stats();
        v.extend(
            live.iter()
                .filter(|(_, st)| st.events > 0)
                .map(|(src, st)| (format!("topology.{}", src.as_str()), st.epochs)),
        );
        v
    }

    fn shutdown(&self) {
        if let Some(m) = self.monitor.lock().take() {
            m.stop();
        }
        self.engine.shutdown(Duration::from_secs(5));
    }
}
