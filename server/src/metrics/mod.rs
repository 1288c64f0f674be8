//! Prometheus metrics: the registry, the engine [`Observer`](wqd_core::engine::Observer), the
//! gauges refreshed at scrape time, the gRPC layer counting RPCs, flush timings, and the HTTP
//! listener serving `/metrics`.
//!
//! Owns one [`Metrics`]: a `metrics-exporter-prometheus` recorder that is *not* installed as
//! the global recorder. The daemon builds it and hands out what each part needs: the engine
//! gets an `Observer` (counters and histograms updated as items move), the RPC layer a
//! [`grpc::RpcMetricsLayer`] and [`Metrics::observe_flush`], the listener a scrape that first
//! refreshes the gauges from `Engine::stats()`, `Engine::workqueues()` and the `LiveView`, then
//! renders. Every metric, its type, labels and meaning are in `docs/metrics.md`; the names are
//! the constants of [`names`].
//!
//! Invariants:
//! * Label values are bounded: workqueue names (capped at [`MAX_WORKQUEUE_LABELS`], then
//!   `_other`), levels, CPU numbers, group targets of the topology and config, handler-free
//!   states, fixed reasons and sources, known RPC methods (others are `unknown`), gRPC code
//!   names. Never item or batch ids.
//! * The per-item path (observer) takes a read lock and one hash lookup per call, then updates
//!   atomics through cached handles; it allocates only the first time it sees a workqueue.
//! * Gauges are set only at scrape time. A label set that disappears from its source is set
//!   to 0 once, then dropped from the output after [`GAUGE_IDLE`] without updates.
//! * Histogram samples are drained into buckets by an upkeep tick ([`UPKEEP`]) even when
//!   nobody scrapes, so memory stays bounded; the per-item histograms count into buckets
//!   directly (`buckets.rs`) and are rendered after the recorder's metrics.

mod buckets;
pub mod grpc;
mod http;
mod observer;
mod scrape;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ::metrics::{Counter, Gauge, Histogram, Key, Label, Metadata, Recorder};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use metrics_util::MetricKindMask;
use parking_lot::Mutex;

use serde::Deserialize;

use crate::settings::{invalid, Invalid};
use wqd_core::engine::{Engine, Observer};
use wqd_core::live::LiveView;

pub use http::MetricsServer;

/// Distinct workqueue label values at most; later workqueues are counted as `_other`.
pub const MAX_WORKQUEUE_LABELS: usize = 256;
/// A gauge label set not updated for this long leaves the output (a deleted workqueue, a
/// group removed by a config change).
pub const GAUGE_IDLE: Duration = Duration::from_secs(120);
/// How often histogram samples are folded into buckets.
pub const UPKEEP: Duration = Duration::from_secs(5);

/// Metric names (see `docs/metrics.md`).
pub mod names {
    pub const ITEMS_SUBMITTED: &str = "wqd_items_submitted_total";
    pub const ITEMS_FINISHED: &str = "wqd_items_finished_total";
    pub const ITEM_QUEUE_WAIT: &str = "wqd_item_queue_wait_seconds";
    pub const ITEM_RUN: &str = "wqd_item_run_seconds";
    pub const ITEMS_PENDING: &str = "wqd_items_pending";
    pub const WORKQUEUE_ITEMS: &str = "wqd_workqueue_items";
    pub const WORKQUEUE_MAX_QUEUED: &str = "wqd_workqueue_max_queued";
    pub const WORKQUEUE_DRAINING: &str = "wqd_workqueue_draining";
    pub const CPU_RUNNING_ITEMS: &str = "wqd_cpu_running_items";
    pub const REBINDS: &str = "wqd_rebinds_total";
    pub const FALLBACKS: &str = "wqd_fallbacks_total";
    pub const FLUSH_DURATION: &str = "wqd_flush_duration_seconds";
    pub const LIVE_CPUS: &str = "wqd_live_cpus";
    pub const ONLINE_CPUS: &str = "wqd_online_cpus";
    pub const CPU_LIVE: &str = "wqd_cpu_live";
    pub const GROUP_LIVE_CPUS: &str = "wqd_group_live_cpus";
    pub const TOPOLOGY_EPOCH: &str = "wqd_topology_epoch";
    pub const ENGINE_TOPOLOGY_EPOCH: &str = "wqd_engine_topology_epoch";
    pub const TOPOLOGY_EVENTS: &str = "wqd_topology_events_total";
    pub const TOPOLOGY_EPOCHS: &str = "wqd_topology_epochs_total";
    pub const WATCHDOG_LOCKUPS: &str = "wqd_watchdog_lockups_total";
    pub const CPU_HOGS: &str = "wqd_cpu_hogs_total";
    pub const RPC_HANDLED: &str = "wqd_rpc_handled_total";
    pub const RPC_DURATION: &str = "wqd_rpc_duration_seconds";
    pub const SESSION_REQUESTS: &str = "wqd_session_requests_total";
    pub const WORKERS: &str = "wqd_workers";
    pub const FLUSHES_ACTIVE: &str = "wqd_flushes_active";
    pub const RESULTS_RETAINED: &str = "wqd_results_retained";
    pub const BUILD_INFO: &str = "wqd_build_info";
    pub const CONNECTIONS_OPEN: &str = "wqd_connections_open";
    pub const CONNECTIONS_MAX: &str = "wqd_connections_max";
    pub const CONNECTIONS_ACCEPTED: &str = "wqd_connections_accepted_total";
    pub const CONNECTIONS_REFUSED: &str = "wqd_connections_refused_total";
    pub const CONNECTIONS_CLOSED: &str = "wqd_connections_closed_total";
    pub const ACCEPT_ERRORS: &str = "wqd_accept_errors_total";
    pub const WORKERS_ATTACHED: &str = "wqd_workers_attached";
    pub const WORKER_SLOTS: &str = "wqd_worker_slots";
    pub const WORKER_IN_FLIGHT: &str = "wqd_worker_in_flight";
    pub const WORKER_HANDLER_WORKERS: &str = "wqd_worker_handler_workers";
    pub const WORKER_ITEMS: &str = "wqd_worker_items_total";
    pub const AUTHORITY_REWRITTEN: &str = "wqd_connections_authority_rewritten_total";
    pub const FLEET_DELIVERIES: &str = "wqd_fleet_deliveries_total";
    pub const FLEET_REDELIVERIES: &str = "wqd_fleet_redeliveries_total";
    pub const FLEET_ACKS: &str = "wqd_fleet_acks_total";
    pub const FLEET_NAKS: &str = "wqd_fleet_naks_total";
    pub const FLEET_DUPLICATES: &str = "wqd_fleet_duplicates_suppressed_total";
    pub const FLEET_RESULTS: &str = "wqd_fleet_results_published_total";
    pub const FLEET_PUBLISH: &str = "wqd_fleet_result_publish_seconds";
    pub const FLEET_CONSUMER_PENDING: &str = "wqd_fleet_consumer_pending";
    pub const FLEET_CONSUMER_ACK_PENDING: &str = "wqd_fleet_consumer_ack_pending";
    pub const FLEET_CONNECTED: &str = "wqd_fleet_connected";
}

/// Bucket upper bounds, in seconds, for item wait and run times: 100µs to 10 minutes.
pub const ITEM_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0, 300.0, 600.0,
];
/// Bucket upper bounds, in seconds, for flushes and RPCs: 1ms to 10 minutes.
pub const WAIT_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 600.0,
];

/// Errors of the metrics layer.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("bad histogram buckets: {0}")]
    Buckets(#[from] metrics_exporter_prometheus::BuildError),
    #[error("cannot listen for metrics on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// `[metrics]`
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Where to serve Prometheus metrics (`GET /metrics`); loopback unless
    /// `listen.allow_remote`. See docs/metrics.md.
    pub listen: Option<SocketAddr>,
}

impl MetricsConfig {
    /// Checks `[metrics] listen`: a non-loopback address needs `listen.allow_remote`
    /// (`allow_remote`; the endpoint has no authentication, like the plain TCP API). Pure.
    ///
    /// # Errors
    /// [`Invalid`] naming `metrics.listen`.
    pub fn check(&self, allow_remote: bool) -> Result<(), Invalid> {
        match self.listen {
            Some(addr) if !addr.ip().is_loopback() && !allow_remote => Err(invalid(
                "metrics.listen",
                format!(
                    "{addr} is not a loopback address; set listen.allow_remote = true (or pass \
                     --allow-remote) to serve metrics on it"
                ),
            )),
            _ => Ok(()),
        }
    }
}

static META: Metadata<'static> =
    Metadata::new(module_path!(), ::metrics::Level::INFO, Some(module_path!()));

/// The recorder, shared by everything that registers handles. Registering is idempotent: the
/// same name and labels give a handle to the same value.
#[derive(Debug)]
pub(crate) struct Registry {
    recorder: PrometheusRecorder,
}

/// A label set: fixed keys, owned values.
pub(crate) type Labels = Vec<(&'static str, String)>;

fn key(name: &'static str, labels: &[(&'static str, String)]) -> Key {
    let labels: Vec<Label> = labels
        .iter()
        .map(|(k, v)| Label::new(*k, v.clone()))
        .collect();
    Key::from_parts(name, labels)
}

impl Registry {
    pub(crate) fn counter(&self, name: &'static str, labels: &[(&'static str, String)]) -> Counter {
        self.recorder.register_counter(&key(name, labels), &META)
    }
    pub(crate) fn gauge(&self, name: &'static str, labels: &[(&'static str, String)]) -> Gauge {
        self.recorder.register_gauge(&key(name, labels), &META)
    }
    pub(crate) fn histogram(
        &self,
        name: &'static str,
        labels: &[(&'static str, String)],
    ) -> Histogram {
        self.recorder.register_histogram(&key(name, labels), &META)
    }
}

/// Every metric of one daemon. Build one with [`Metrics::new`], hand
/// [`Metrics::observer`] to the engine config, [`Metrics::rpc_layer`] to the gRPC server, and
/// serve it with [`MetricsServer::start`].
pub struct Metrics {
    reg: Arc<Registry>,
    handle: PrometheusHandle,
    observer: Arc<observer::EngineMetrics>,
    rpc: Arc<grpc::RpcMetrics>,
    flush: FlushMetrics,
    /// `wqd_session_requests_total` by code number, registered at first use.
    session: [OnceLock<Counter>; 17],
    /// L: serialises scrapes (each refresh compares with the previous one).
    scrape: Mutex<scrape::ScrapeState>,
    /// Set once by the daemon after its listeners are up; read at scrape time.
    conns: OnceLock<Vec<Arc<crate::conn::ListenerStats>>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// The daemon's metrics when `[metrics] listen` is set, else `None` (then nothing is
/// recorded and the engine runs without an observer).
///
/// # Errors
/// As [`Metrics::new`].
pub fn for_config(cfg: &MetricsConfig) -> Result<Option<Arc<Metrics>>, MetricsError> {
    match cfg.listen {
        Some(_) => Ok(Some(Arc::new(Metrics::new()?))),
        None => Ok(None),
    }
}

impl Metrics {
    /// A fresh registry with every histogram's buckets and the gauge idle timeout.
    ///
    /// # Errors
    /// [`MetricsError::Buckets`] (a bug: the bucket lists are constants).
    pub fn new() -> Result<Metrics, MetricsError> {
        let full = |n: &str| Matcher::Full(n.to_string());
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(full(names::FLUSH_DURATION), WAIT_BUCKETS)?
            .set_buckets_for_metric(full(names::RPC_DURATION), WAIT_BUCKETS)?
            .set_buckets_for_metric(full(names::FLEET_PUBLISH), WAIT_BUCKETS)?
            .idle_timeout(MetricKindMask::GAUGE, Some(GAUGE_IDLE))
            .build_recorder();
        let handle = recorder.handle();
        let reg = Arc::new(Registry { recorder });
        describe(&reg.recorder);
        reg.gauge(
            names::BUILD_INFO,
            &[("version", env!("CARGO_PKG_VERSION").to_string())],
        )
        .set(1.0);
        Ok(Metrics {
            observer: Arc::new(observer::EngineMetrics::new(reg.clone())),
            rpc: Arc::new(grpc::RpcMetrics::new(reg.clone())),
            flush: FlushMetrics::new(),
            session: std::array::from_fn(|_| OnceLock::new()),
            scrape: Mutex::new(scrape::ScrapeState::default()),
            conns: OnceLock::new(),
            handle,
            reg,
        })
    }

    /// The engine observer feeding the item, re-bind and watchdog metrics.
    pub fn observer(&self) -> Arc<dyn Observer> {
        self.observer.clone()
    }

    /// The tower layer counting every RPC by method and final status code.
    pub fn rpc_layer(&self) -> grpc::RpcMetricsLayer {
        grpc::RpcMetricsLayer::new(Some(self.rpc.clone()))
    }

    /// Records how long a flush (or a Submit/Cancel/Drain wait) took and how it ended.
    pub fn observe_flush(&self, method: FlushMethod, outcome: FlushOutcome, took: Duration) {
        self.flush
            .get(&self.reg, method, outcome)
            .record(took.as_secs_f64());
    }

    /// Counts one answered request of a `DispatchService.Session` by its code (`OK` for an
    /// accepted batch): a session counts once in `wqd_rpc_handled_total`, when it ends, so its
    /// requests' refusals would be invisible there.
    pub fn session_answered(&self, code: tonic::Code) {
        let i = (code as usize).min(grpc::CODE_NAMES.len() - 1);
        self.session[i]
            .get_or_init(|| {
                self.reg.counter(
                    names::SESSION_REQUESTS,
                    &[("code", grpc::CODE_NAMES[i].to_string())],
                )
            })
            .increment(1);
    }

    /// Publishes the connection counters of these listeners at every scrape (the daemon calls
    /// it once, after binding; later calls are ignored).
    pub fn watch_listeners(&self, stats: Vec<Arc<crate::conn::ListenerStats>>) {
        let _ = self.conns.set(stats);
    }

    /// Refreshes the gauges from `engine` and `view`, then renders the Prometheus text format.
    /// Blocking (takes the engine lock briefly): call it off the async threads.
    pub fn scrape(&self, engine: &Engine, view: &LiveView) -> String {
        self.scrape
            .lock()
            .refresh(&self.reg, &self.observer, engine, view);
        if let Some(conns) = self.conns.get() {
            scrape::connections(&self.reg, conns);
        }
        let mut text = self.handle.render();
        self.observer.render_items(&mut text);
        text
    }

    /// The fleet member's handles (see [`FleetMetrics`]).
    pub fn fleet(&self) -> FleetMetrics {
        let r = &self.reg;
        let c = |n, l: &[(&'static str, String)]| r.counter(n, l);
        let g = |n, l: &[(&'static str, String)]| r.gauge(n, l);
        FleetMetrics {
            deliveries: c(names::FLEET_DELIVERIES, &[]),
            redeliveries: c(names::FLEET_REDELIVERIES, &[]),
            acks: c(names::FLEET_ACKS, &[]),
            naks: c(names::FLEET_NAKS, &[("reason", "no_live_cpu".into())]),
            naks_busy: c(names::FLEET_NAKS, &[("reason", "engine_refused".into())]),
            dup_member: c(names::FLEET_DUPLICATES, &[("at", "member".into())]),
            dup_publish: c(names::FLEET_DUPLICATES, &[("at", "publish".into())]),
            results: c(names::FLEET_RESULTS, &[]),
            publish: r.histogram(names::FLEET_PUBLISH, &[]),
            pending_host: g(
                names::FLEET_CONSUMER_PENDING,
                &[("consumer", "host".into())],
            ),
            pending_any: g(names::FLEET_CONSUMER_PENDING, &[("consumer", "any".into())]),
            ack_pending_host: g(
                names::FLEET_CONSUMER_ACK_PENDING,
                &[("consumer", "host".into())],
            ),
            ack_pending_any: g(
                names::FLEET_CONSUMER_ACK_PENDING,
                &[("consumer", "any".into())],
            ),
            connected: g(names::FLEET_CONNECTED, &[]),
        }
    }

    /// Folds recorded histogram samples into buckets (the [`UPKEEP`] tick).
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }
}

/// The fleet member's metric handles (`crate::fleet`), updated as items move; the consumer
/// gauges are set by the member's record refresh (every `fleet.host_ttl / 3`), not at scrape
/// time, since reading them takes a JetStream request.
#[derive(Clone)]
pub struct FleetMetrics {
    pub deliveries: Counter,
    pub redeliveries: Counter,
    pub acks: Counter,
    pub naks: Counter,
    pub naks_busy: Counter,
    pub dup_member: Counter,
    pub dup_publish: Counter,
    pub results: Counter,
    pub publish: Histogram,
    pub pending_host: Gauge,
    pub pending_any: Gauge,
    pub ack_pending_host: Gauge,
    pub ack_pending_any: Gauge,
    pub connected: Gauge,
}

/// Which RPC waited for a flush (the `method` label of `wqd_flush_duration_seconds`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushMethod {
    Flush,
    Submit,
    Cancel,
    Drain,
}

/// How a flush wait ended (the `outcome` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushOutcome {
    /// Every covered item is terminal.
    Complete,
    /// The client's deadline passed first.
    Deadline,
    /// The client went away first.
    Abandoned,
}

impl FlushMethod {
    fn as_str(self) -> &'static str {
        match self {
            FlushMethod::Flush => "Flush",
            FlushMethod::Submit => "Submit",
            FlushMethod::Cancel => "Cancel",
            FlushMethod::Drain => "Drain",
        }
    }
}

impl FlushOutcome {
    fn as_str(self) -> &'static str {
        match self {
            FlushOutcome::Complete => "complete",
            FlushOutcome::Deadline => "deadline",
            FlushOutcome::Abandoned => "abandoned",
        }
    }
}

/// Flush histograms by [method][outcome], registered on first use.
struct FlushMetrics {
    h: [[OnceLock<Histogram>; 3]; 4],
}

impl FlushMetrics {
    fn new() -> FlushMetrics {
        FlushMetrics {
            h: Default::default(),
        }
    }

    fn get(&self, reg: &Registry, m: FlushMethod, o: FlushOutcome) -> &Histogram {
        self.h[m as usize][o as usize].get_or_init(|| {
            reg.histogram(
                names::FLUSH_DURATION,
                &[
                    ("method", m.as_str().to_string()),
                    ("outcome", o.as_str().to_string()),
                ],
            )
        })
    }
}

/// `# HELP` lines (units are in the names, so none are passed).
fn describe(r: &PrometheusRecorder) {
    use names::*;
    let c = |n: &'static str, d: &'static str| r.describe_counter(n.into(), None, d.into());
    let g = |n: &'static str, d: &'static str| r.describe_gauge(n.into(), None, d.into());
    let h = |n: &'static str, d: &'static str| r.describe_histogram(n.into(), None, d.into());
    c(
        ITEMS_SUBMITTED,
        "Items queued by accepted batches (duplicates of a pending key excluded).",
    );
    c(
        ITEMS_FINISHED,
        "Items that reached a terminal state, by workqueue and state.",
    );
    g(
        ITEMS_PENDING,
        "Items queued and not bound to a CPU, by workqueue and level of their target.",
    );
    g(
        WORKQUEUE_ITEMS,
        "Items of a workqueue not yet terminal, by state (delayed, pending, running).",
    );
    g(
        WORKQUEUE_MAX_QUEUED,
        "The workqueue's max_queued: non-terminal items it accepts at most.",
    );
    g(
        WORKQUEUE_DRAINING,
        "1 while the workqueue drains and refuses new work.",
    );
    g(
        CPU_RUNNING_ITEMS,
        "Items bound to a worker of the CPU (running or about to start).",
    );
    c(
        REBINDS,
        "Items handed back before they started, by reason (offline, affinity).",
    );
    c(
        FALLBACKS,
        "Items started outside their own group, by the widened level they ran in.",
    );
    h(
        FLUSH_DURATION,
        "How long flush waits took, by RPC and outcome.",
    );
    g(
        LIVE_CPUS,
        "CPUs work may run on now (online, allowed, not isolated).",
    );
    g(ONLINE_CPUS, "CPUs online in the current topology snapshot.");
    g(
        CPU_LIVE,
        "1 if the CPU is live, 0 if it is known but not live.",
    );
    g(
        GROUP_LIVE_CPUS,
        "Live CPUs of each group (target) of the topology and config.",
    );
    g(TOPOLOGY_EPOCH, "The live view's current topology epoch.");
    g(
        ENGINE_TOPOLOGY_EPOCH,
        "The topology epoch the engine schedules by.",
    );
    c(
        TOPOLOGY_EVENTS,
        "Topology readings applied, by source, whether or not they changed anything.",
    );
    c(TOPOLOGY_EPOCHS, "Topology epochs published, by source.");
    c(
        WATCHDOG_LOCKUPS,
        "Watchdog lockup reports: the CPU's pool had runnable work and made no progress.",
    );
    c(
        CPU_HOGS,
        "Items reported as running longer than the CPU-hog threshold, by CPU.",
    );
    c(
        RPC_HANDLED,
        "RPCs completed, by method and final gRPC status code (streams when they end).",
    );
    c(
        SESSION_REQUESTS,
        "Requests of DispatchService.Session answered, by gRPC status code (OK: accepted).",
    );
    h(
        RPC_DURATION,
        "Time from request to final status of RPCs, by method.",
    );
    g(WORKERS, "Worker threads of all CPU pools.");
    g(
        WORKERS_ATTACHED,
        "Worker processes attached over WorkerService.Attach.",
    );
    g(
        WORKER_SLOTS,
        "Open slots of attached workers (threads pinned to the CPU), by CPU.",
    );
    g(
        WORKER_IN_FLIGHT,
        "Items sent to attached workers' slots and not answered yet, by CPU.",
    );
    g(
        WORKER_HANDLER_WORKERS,
        "Attached workers serving each handler name (0: items of it wait or are rejected).",
    );
    c(
        WORKER_ITEMS,
        "Items of attached-worker handlers that reached a terminal state, by handler and state.",
    );
    g(
        FLUSHES_ACTIVE,
        "Flushes (and cancel/drain waits) in progress in the engine.",
    );
    g(RESULTS_RETAINED, "Terminal results kept for GetResults.");
    g(
        BUILD_INFO,
        "Always 1; the version label says which wqd runs.",
    );
    g(
        CONNECTIONS_OPEN,
        "Open gRPC connections, by listener (unix, tcp).",
    );
    g(
        CONNECTIONS_MAX,
        "Open connections a listener accepts at most (listen.max_connections, after the fd clamp).",
    );
    c(
        CONNECTIONS_ACCEPTED,
        "Connections accepted and served, by listener.",
    );
    c(
        CONNECTIONS_REFUSED,
        "Connections accepted and closed at once, by listener and reason (limit).",
    );
    c(
        CONNECTIONS_CLOSED,
        "Connections closed by the daemon's deadlines, by listener and reason (handshake, idle).",
    );
    c(
        ACCEPT_ERRORS,
        "Failed accepts, by listener and reason (fds: out of descriptors or memory; other).",
    );
    c(
        AUTHORITY_REWRITTEN,
        "HTTP/2 :authority values h2 would refuse (a socket path), rewritten on the Unix listener.",
    );
    c(
        FLEET_DELIVERIES,
        "Fleet items JetStream delivered to this member.",
    );
    c(
        FLEET_REDELIVERIES,
        "Fleet deliveries that were not an item's first (ack wait passed, a member died, a nak).",
    );
    c(
        FLEET_ACKS,
        "Fleet items acked (terminal, result published).",
    );
    c(
        FLEET_NAKS,
        "Fleet items handed back with a delay, by reason (no_live_cpu: an any item whose group has no live CPU here; engine_refused: full, draining or stopping).",
    );
    c(
        FLEET_DUPLICATES,
        "Fleet duplicates suppressed, by where (member: a redelivered item whose result was already published, not run again; publish: a result JetStream de-duplicated by id).",
    );
    c(FLEET_RESULTS, "Fleet results this member published.");
    h(
        FLEET_PUBLISH,
        "Time to publish one fleet result and get JetStream's ack.",
    );
    g(
        FLEET_CONSUMER_PENDING,
        "Fleet items not yet delivered on this member's consumers (host, any): the consumer lag.",
    );
    g(
        FLEET_CONSUMER_ACK_PENDING,
        "Fleet items delivered and not yet acked on this member's consumers (all members, for any).",
    );
    g(
        FLEET_CONNECTED,
        "1 while the fleet member is connected to NATS.",
    );
}

/// The daemon's scrape endpoint: started on `[metrics] listen` when metrics are on.
///
/// # Errors
/// [`MetricsError::Listen`].
pub async fn serve(
    metrics: &Option<Arc<Metrics>>,
    cfg: &MetricsConfig,
    engine: &Arc<Engine>,
    view: &Arc<LiveView>,
    stopping: &tokio::sync::watch::Receiver<bool>,
) -> Result<Option<MetricsServer>, MetricsError> {
    let (Some(m), Some(addr)) = (metrics, cfg.listen) else {
        return Ok(None);
    };
    let (e, v, s) = (engine.clone(), view.clone(), stopping.clone());
    MetricsServer::start(m.clone(), addr, e, v, s)
        .await
        .map(Some)
}
