//! The gRPC layer: every service of `wqd.v1` (dispatch, workqueues, topology, stats) over one
//! shared [`Rpc`] state, plus `grpc.health.v1` and server reflection.
//!
//! Owns: request validation that the engine does not do (wire shapes, limits, durations),
//! the proto ↔ engine conversions ([`convert`]), client deadlines, result streaming, and the
//! one mapping from errors to `tonic::Status` ([`status`]). Invariants:
//!
//! * Only [`status`] builds a `tonic::Status` from an error; every handler returns
//!   `Result<_, RpcError>` internally and converts at its edge.
//! * A batch is validated whole (targets parsed, limits, payload sizes) before
//!   `Engine::submit` is called once; the engine re-checks and is all-or-nothing too, so a
//!   refused batch leaves nothing queued.
//! * Waiting RPCs (Submit with wait, Flush, Cancel, Drain, DeleteWorkqueue) stop waiting at the
//!   client's deadline or when the client goes away; stopping a wait drops the engine
//!   `Flush`, which never stops the work itself.
//! * Streams end when the daemon shuts down ([`Rpc::shutdown`]), so graceful shutdown never
//!   waits on a watcher.

pub mod budget;
pub mod convert;
mod dispatch;
pub mod encode;
pub mod limits;
mod session;
mod stats;
mod topology;
mod wait;
pub mod worker;
mod workqueue;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;
use tonic::{Code, Status};
use wqd_proto::v1;

use limits::SharedLimits;
use wqd_core::engine::{Engine, EngineError};
use wqd_core::live::LiveView;
use wqd_core::load::LoadSampler;

/// Results per `FlushResponse` message at most.
pub const FLUSH_BATCH_ITEMS: usize = 1000;
/// A partly filled result group is sent after this long.
pub const FLUSH_BATCH_DELAY: Duration = Duration::from_millis(5);
/// How much earlier than the client's deadline the daemon answers DEADLINE_EXCEEDED itself
/// (at most), so its precise status wins over transport's generic timeout.
const DEADLINE_MARGIN: Duration = Duration::from_millis(20);

/// Errors of the RPC layer: the engine's, and what this layer checks itself.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// A field of one item of a batch (`items[3].target: ...`).
    #[error("items[{index}].{field}: {problem}")]
    Item {
        index: usize,
        field: &'static str,
        problem: String,
    },
    /// A request field.
    #[error("{field}: {problem}")]
    Field { field: String, problem: String },
    /// More of something than a configured limit allows (INVALID_ARGUMENT).
    #[error("{what} is {found}, over the limit {limit} = {max}")]
    OverLimit {
        what: String,
        found: usize,
        limit: &'static str,
        max: usize,
    },
    /// A response that would not fit in one message (RESOURCE_EXHAUSTED).
    #[error("{what}")]
    Exhausted { what: String },
    /// The client's deadline passed while waiting; the work goes on.
    #[error("deadline exceeded after {waited:?} while {what}; the work goes on")]
    Deadline { waited: Duration, what: String },
    #[error("the daemon is shutting down")]
    ShuttingDown,
    /// A status from the transport while reading a client stream (message too large, client
    /// cancelled, ...).
    #[error("{}", .0.message())]
    Transport(Status),
    /// A bug: an engine call panicked.
    #[error("internal error: {0}")]
    Internal(String),
}

/// The one mapping from errors to gRPC statuses (see `docs/status-codes.md`).
pub fn status(e: RpcError) -> Status {
    use EngineError as E;
    let code = match &e {
        RpcError::Engine(ee) => match ee {
            E::UnknownWorkqueue(_) | E::UnknownBatch(_) | E::UnknownItem(_) => Code::NotFound,
            E::WorkqueueExists(_) => Code::AlreadyExists,
            E::InvalidAttrs(_)
            | E::Group { .. }
            | E::UnknownHandler { .. }
            | E::Handler { .. }
            | E::Duration { .. }
            | E::Worker(_) => Code::InvalidArgument,
            E::WorkqueueNotEmpty { .. } | E::DefaultWorkqueue | E::Draining(_) => {
                Code::FailedPrecondition
            }
            E::QueueFull { .. } => Code::ResourceExhausted,
            E::ShuttingDown => Code::Unavailable,
            E::Timeout(_) => Code::DeadlineExceeded,
        },
        RpcError::Item { .. } | RpcError::Field { .. } | RpcError::OverLimit { .. } => {
            Code::InvalidArgument
        }
        RpcError::Exhausted { .. } => Code::ResourceExhausted,
        RpcError::Deadline { .. } => Code::DeadlineExceeded,
        RpcError::ShuttingDown => Code::Unavailable,
        RpcError::Transport(st) if is_too_large(st) => Code::ResourceExhausted,
        RpcError::Transport(st) if is_bad_framing(st) => Code::InvalidArgument,
        RpcError::Transport(st) => st.code(),
        RpcError::Internal(_) => Code::Internal,
    };
    let msg = match e {
        // The engine names items "item N"; on the wire they are "items[N].field".
        RpcError::Engine(E::Group { index, source }) => format!("items[{index}].target: {source}"),
        RpcError::Engine(E::UnknownHandler { index, name, known }) => {
            format!(
                "items[{index}].handler: unknown handler {} (known: {known})",
                wqd_core::quote::quote(&name)
            )
        }
        RpcError::Engine(E::Handler { index, source }) => {
            format!("items[{index}].args/payload: {source}")
        }
        RpcError::Engine(E::Duration {
            index,
            field,
            problem,
        }) => format!("items[{index}].{field}: {problem}"),
        RpcError::Transport(st) => match too_large(&st).or_else(|| bad_framing(&st)) {
            Some(ours) => return ours,
            None => st.message().to_string(),
        },
        other => other.to_string(),
    };
    // Whatever a message quotes, it stays short: clients refuse large status metadata.
    Status::new(code, wqd_core::quote::cap(msg, MAX_STATUS_MESSAGE))
}

/// Bytes of a status message at most.
pub const MAX_STATUS_MESSAGE: usize = 1024;

/// Whether tonic's decoder refused the request's gRPC framing: the body ended inside a
/// message, or a message's compressed flag is neither 0 nor 1. Tonic says INTERNAL; it is the
/// client's malformed request. (A flag of 1 without `grpc-encoding` stays INTERNAL: the gRPC
/// spec asks for exactly that.)
fn is_bad_framing(st: &Status) -> bool {
    st.code() == Code::Internal
        && (st.message().contains("Unexpected EOF decoding stream")
            || st.message().contains("invalid compression flag")
            // A unary body that ends before a whole message: tonic's decoder reads the 5-byte
            // header, finds no more bytes and ends the stream without an error, and the unary
            // wrapper calls the missing message INTERNAL.
            || st.message().contains("Missing request message"))
}

/// wqd's status for a request whose gRPC framing tonic refused; `None` for any other.
pub(crate) fn bad_framing(st: &Status) -> Option<Status> {
    is_bad_framing(st).then(|| {
        let what = if st.message().contains("compression flag") {
            "a gRPC message's compressed flag is neither 0 nor 1"
        } else if st.message().contains("Missing request message") {
            "the body ended before a whole gRPC message (none, or one cut short)"
        } else {
            "the body ended inside a gRPC message (truncated)"
        };
        Status::invalid_argument(format!("malformed request: {what}"))
    })
}

/// Whether tonic refused a message for its size (it says OUT_OF_RANGE; wqd says
/// RESOURCE_EXHAUSTED and names the limit).
fn is_too_large(st: &Status) -> bool {
    st.code() == Code::OutOfRange && st.message().contains("message length too large")
}

/// wqd's status for tonic's refusal of a message over the size limit (streamed requests here,
/// unary ones in [`limits::TooLargeLayer`]); `None` for any other status.
pub(crate) fn too_large(st: &Status) -> Option<Status> {
    is_too_large(st).then(|| {
        Status::resource_exhausted(format!(
            "{} (limits.max_message_bytes; split the batch into smaller messages)",
            st.message()
        ))
    })
}

/// Counters kept by this layer (the engine does not see refused batches).
#[derive(Debug, Default)]
pub struct Counters {
    pub batches_accepted: AtomicU64,
    pub batches_refused: AtomicU64,
    pub deduplicated: AtomicU64,
}

/// State shared by every service. Cheap to clone.
#[derive(Clone)]
pub struct Rpc {
    pub engine: Arc<Engine>,
    pub view: Arc<LiveView>,
    /// `None` in tests that run without a sampler (busy reads 0).
    pub load: Option<Arc<LoadSampler>>,
    /// Swapped whole by a config reload; a request loads them once.
    pub limits: SharedLimits,
    pub started: SystemTime,
    pub counters: Arc<Counters>,
    /// Flips to `true` once when the daemon shuts down; streams end then.
    pub stopping: watch::Receiver<bool>,
    /// Prometheus metrics (RPC counts, flush timings); `None` when not served.
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
    /// Who may attach workers, and how many are attached (`[workers]`).
    pub workers: Arc<worker::WorkerPolicy>,
}

impl std::fmt::Debug for Rpc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rpc")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// The layers of [`Rpc::server`]: the metrics layer wraps [`limits::TooLargeLayer`], which
/// wraps [`budget::BudgetLayer`].
pub type BaseLayers = tower::layer::util::Stack<
    budget::BudgetLayer,
    tower::layer::util::Stack<
        limits::TooLargeLayer,
        tower::layer::util::Stack<
            crate::metrics::grpc::RpcMetricsLayer,
            tower::layer::util::Identity,
        >,
    >,
>;

impl Rpc {
    /// Every service (wqd.v1, health, reflection) on one router, with the message limits,
    /// behind the metrics layer (a pass-through when metrics are off).
    ///
    /// # Errors
    /// The reflection service's error if the descriptor set does not decode (a build bug).
    pub fn router(
        &self,
        health: &tonic_health::server::HealthReporter,
    ) -> Result<tonic::transport::server::Router<BaseLayers>, tonic_reflection::server::Error> {
        self.router_with(health, self.server())
    }

    /// tonic's server with wqd's outer layers: the RPC metrics (a pass-through when metrics
    /// are off) outermost, so calls refused by inner layers (the security guard) are counted
    /// too, then [`limits::TooLargeLayer`]. Add more layers (the guard), TLS, then routes.
    pub fn server(&self) -> tonic::transport::Server<BaseLayers> {
        let metrics = match &self.metrics {
            Some(m) => m.rpc_layer(),
            None => crate::metrics::grpc::RpcMetricsLayer::default(),
        };
        tonic::transport::Server::builder()
            .layer(metrics)
            .layer(limits::TooLargeLayer)
            .layer(budget::BudgetLayer::new(
                self.limits.clone(),
                self.counters.clone(),
            ))
    }

    /// As [`Rpc::router`], on a server the caller configured (normally [`Rpc::server`] plus
    /// TLS and the [`crate::security::GuardLayer`]).
    ///
    /// # Errors
    /// As [`Rpc::router`].
    pub fn router_with<L: Clone>(
        &self,
        health: &tonic_health::server::HealthReporter,
        mut server: tonic::transport::Server<L>,
    ) -> Result<tonic::transport::server::Router<L>, tonic_reflection::server::Error> {
        // The daemon's own build of the service, sending results pre-encoded (wqd_proto::out).
        use v1::stats_service_server::StatsServiceServer;
        use v1::topology_service_server::TopologyServiceServer;
        use v1::worker_service_server::WorkerServiceServer;
        use v1::workqueue_service_server::WorkqueueServiceServer;
        use wqd_proto::out::dispatch_service_server::DispatchServiceServer;
        let max = self.limits.load().max_message_bytes;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(wqd_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let reflection_alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(wqd_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()?;
        Ok(server
            .add_service(
                DispatchServiceServer::new(self.clone())
                    .max_decoding_message_size(max)
                    .max_encoding_message_size(max),
            )
            .add_service(
                WorkqueueServiceServer::new(self.clone())
                    .max_decoding_message_size(max)
                    .max_encoding_message_size(max),
            )
            .add_service(
                TopologyServiceServer::new(self.clone())
                    .max_decoding_message_size(max)
                    .max_encoding_message_size(max),
            )
            .add_service(
                StatsServiceServer::new(self.clone())
                    .max_decoding_message_size(max)
                    .max_encoding_message_size(max),
            )
            .add_service(
                WorkerServiceServer::new(self.clone())
                    .max_decoding_message_size(max)
                    .max_encoding_message_size(max),
            )
            .add_service(tonic_health::pb::health_server::HealthServer::new(
                tonic_health::server::HealthService::from_health_reporter(health.clone()),
            ))
            .add_service(reflection)
            .add_service(reflection_alpha))
    }

    /// Marks every wqd.v1 service serving (or not) on the health service.
    pub async fn set_health(reporter: &tonic_health::server::HealthReporter, serving: bool) {
        use tonic_health::ServingStatus;
        let st = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        for name in [
            "",
            "wqd.v1.DispatchService",
            "wqd.v1.WorkqueueService",
            "wqd.v1.TopologyService",
            "wqd.v1.StatsService",
            "wqd.v1.WorkerService",
        ] {
            reporter.set_service_status(name, st).await;
        }
    }
}

/// The instant to stop waiting for a request: its `grpc-timeout` minus a small margin (so
/// the daemon's own DEADLINE_EXCEEDED arrives before transport's generic one), or `None`.
pub fn deadline_of(meta: &tonic::metadata::MetadataMap) -> Option<Instant> {
    let timeout = parse_grpc_timeout(meta.get("grpc-timeout")?.to_str().ok()?)?;
    let margin = (timeout / 10).min(DEADLINE_MARGIN);
    Some(Instant::now() + timeout - margin)
}

/// Parses a `grpc-timeout` header value (`100m`, `5S`, ...).
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (num, unit) = v.split_at(v.len() - 1);
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Sleeps until `deadline`, or forever when there is none.
pub(crate) async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wqd_core::groups::GroupError;
    use wqd_core::handler::HandlerError;

    fn code(e: impl Into<RpcError>) -> (Code, String) {
        let s = status(e.into());
        (s.code(), s.message().to_string())
    }

    #[test]
    fn every_engine_error_has_its_code() {
        use EngineError as E;
        let cases: Vec<(EngineError, Code)> = vec![
            (E::UnknownWorkqueue("x".into()), Code::NotFound),
            (E::UnknownBatch(3), Code::NotFound),
            (E::UnknownItem(4), Code::NotFound),
            (E::WorkqueueExists("x".into()), Code::AlreadyExists),
            (E::InvalidAttrs("nice".into()), Code::InvalidArgument),
            (
                E::WorkqueueNotEmpty {
                    name: "x".into(),
                    items: 2,
                },
                Code::FailedPrecondition,
            ),
            (E::DefaultWorkqueue, Code::FailedPrecondition),
            (E::Draining("x".into()), Code::FailedPrecondition),
            (
                E::QueueFull {
                    workqueue: "x".into(),
                    limit: 5,
                    pending: 4,
                    adding: 2,
                },
                Code::ResourceExhausted,
            ),
            (E::ShuttingDown, Code::Unavailable),
            (E::Timeout(Duration::from_secs(1)), Code::DeadlineExceeded),
        ];
        for (e, want) in cases {
            let text = e.to_string();
            let (c, m) = code(e);
            assert_eq!(c, want, "{text}");
            assert_eq!(m, text);
        }
    }

    #[test]
    fn item_errors_name_the_index_and_field() {
        let (c, m) = code(EngineError::Group {
            index: 7,
            source: GroupError::UnknownShard { shard: 9, count: 2 },
        });
        assert_eq!(c, Code::InvalidArgument);
        assert!(m.starts_with("items[7].target: no shard 9"), "{m}");
        let (c, m) = code(EngineError::UnknownHandler {
            index: 2,
            name: "nope".into(),
            known: "noop, spin".into(),
        });
        assert_eq!(c, Code::InvalidArgument);
        assert_eq!(
            m,
            "items[2].handler: unknown handler \"nope\" (known: noop, spin)"
        );
        let (c, m) = code(EngineError::Handler {
            index: 0,
            source: HandlerError::InvalidArgument("ms: bad".into()),
        });
        assert_eq!(c, Code::InvalidArgument);
        assert!(
            m.starts_with("items[0].args/payload: invalid argument"),
            "{m}"
        );
        let (c, m) = code(RpcError::OverLimit {
            what: "the batch's item count".into(),
            found: 11,
            limit: "limits.max_batch_items",
            max: 10,
        });
        assert_eq!(c, Code::InvalidArgument);
        assert!(m.contains("limits.max_batch_items = 10"), "{m}");
        let (c, _) = code(RpcError::Deadline {
            waited: Duration::from_millis(5),
            what: "flushing".into(),
        });
        assert_eq!(c, Code::DeadlineExceeded);
        assert_eq!(code(RpcError::ShuttingDown).0, Code::Unavailable);
        assert_eq!(
            code(RpcError::Exhausted { what: "x".into() }).0,
            Code::ResourceExhausted
        );
    }

    #[test]
    fn grpc_timeout_values() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout("m"), None);
        assert_eq!(parse_grpc_timeout("10x"), None);
        assert_eq!(parse_grpc_timeout("123456789S"), None);
    }
}
