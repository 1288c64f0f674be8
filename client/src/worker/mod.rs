//! Attached workers: serve handlers of your own to wqd over `WorkerService.Attach`, on one OS
//! thread per CPU, pulling items with credits (the protocol is the header of
//! `proto/wqd/v1/worker.proto`; this module's own steps and races are in `README.md` beside
//! it).
//!
//! This module owns the builder ([`Worker::builder`]), the running worker ([`WorkerHandle`])
//! and its one error enum ([`WorkerError`]). Invariants: each slot is one std thread bound to
//! one CPU, and a handler only ever runs on its slot's thread; every item the daemon sends is
//! answered exactly once while the session lives; a slot never holds more than `prefetch`
//! items; and a session that ends for any reason other than a graceful stop ends
//! [`WorkerHandle::join`] with an error — the worker never reconnects on its own (a new
//! session would get a new worker id and the daemon has already applied its lost-worker
//! policy to what the old one held; reconnecting is the caller's decision).
//!
//! ```no_run
//! use wqd_client::worker::{Graceful, Worker, WorkItem};
//! use wqd_client::Endpoint;
//! # fn demo() -> Result<(), wqd_client::worker::WorkerError> {
//! let worker = Worker::builder(Endpoint::default())
//!     .target("cache:1")
//!     .handler("resize", |item: &WorkItem| -> Result<Vec<u8>, String> {
//!         Ok(item.payload.iter().rev().copied().collect())
//!     })
//!     .prefetch(2)
//!     .spawn()?;
//! // ... later
//! worker.stop(Graceful::HandBack);
//! let report = worker.join()?;
//! println!("worker {} ran {} items", report.worker_id, report.ok);
//! # Ok(()) }
//! ```
//!
//! # Handler outcomes
//! A handler returns `Ok(output)` → `Done {ok: output}`; `Err(text)` → `Done {error: text}`,
//! except when the item's cancellation flag ([`WorkItem::is_cancelled`]) was raised before
//! the handler returned: then `Err` means "stopped because cancelled" → `Done {cancelled}`
//! (the text is only logged). `Ok` after a cancel is still `ok`: the work was done, and the
//! daemon decides. A panic is caught → `Done {error: "handler panicked: MESSAGE"}`. An item
//! cancelled before its slot started it is answered `Done {cancelled}` without running.
//! Output longer than the daemon's `max_output_bytes` is cut by the daemon.
//!
//! # Pinning
//! Only when the daemon's `Welcome.pinning` is true (it is false for a daemon reading a
//! fixture topology, whose CPU numbers are not the host's): each slot thread pins itself to
//! its CPU when it starts (if the CPU is offline the slot stays; the daemon sends it nothing
//! until the CPU is live), and before each item checks `sched_getcpu()`; off its CPU it
//! re-pins, and if that fails it hands the item back with reason `affinity`. `cpu_finished` is
//! reported only with pinning (without it the host's CPU numbers mean nothing to the daemon).

mod item;
mod session;
mod slot;

use std::collections::{BTreeSet, HashMap};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};
use wqd_proto::v1;

pub use item::WorkItem;
pub use slot::HandlerFn;

use crate::error::code_name;
use crate::{Client, ClientError, Endpoint};

/// Errors of the worker layer.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The builder was incomplete or invalid (no handler, no CPUs, a bad `cpus:` list).
    #[error("invalid worker: {0}")]
    Config(String),
    /// The target names no group of the daemon's topology.
    #[error("target {0:?} is not a group of the daemon's topology (see `wqctl topology`)")]
    UnknownTarget(String),
    /// Connecting, or a call before the session (GetTopology), failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The daemon (or the transport) ended the session with this status: a refusal at Hello
    /// (`PERMISSION_DENIED`, `INVALID_ARGUMENT`, `RESOURCE_EXHAUSTED`), a disconnect for a
    /// protocol violation, or the connection lost.
    #[error("worker session ended: {}: {}", code_name(.0.code()), .0.message())]
    Ended(tonic::Status),
    /// The daemon broke the protocol (e.g. ended the stream while the worker was attached).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The worker's threads or runtime could not be started.
    #[error("cannot start the worker: {0}")]
    Start(std::io::Error),
    /// The session thread panicked (a bug in this library).
    #[error("the worker's session thread panicked")]
    Panicked,
}

impl WorkerError {
    /// The gRPC code this error stands for (`OK` never; local errors as in [`ClientError`]).
    pub fn code(&self) -> tonic::Code {
        match self {
            WorkerError::Config(_) | WorkerError::UnknownTarget(_) => tonic::Code::InvalidArgument,
            WorkerError::Client(e) => e.code(),
            WorkerError::Ended(s) => s.code(),
            WorkerError::Protocol(_) | WorkerError::Start(_) | WorkerError::Panicked => {
                tonic::Code::Internal
            }
        }
    }
}

/// How a worker stops (see [`WorkerHandle::stop`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Graceful {
    /// Stop crediting and close every slot; run every item already held (and any the daemon
    /// sent before it read the close, i.e. before its `SlotClosed`), then detach.
    Finish,
    /// Stop crediting and close every slot; hand back (`reason = "stopping"`) every item not
    /// started yet, finish the running ones, then detach.
    HandBack,
}

/// Where a worker connects: an endpoint (the worker connects on its own runtime) or an
/// existing [`Client`] (whose channel keeps being driven by the runtime that created it,
/// which must outlive the worker).
#[derive(Debug, Clone)]
pub enum Connection {
    Endpoint(Endpoint),
    Client(Box<Client>),
}

impl From<Endpoint> for Connection {
    fn from(e: Endpoint) -> Self {
        Connection::Endpoint(e)
    }
}
impl From<Client> for Connection {
    fn from(c: Client) -> Self {
        Connection::Client(Box::new(c))
    }
}
impl From<&Client> for Connection {
    fn from(c: &Client) -> Self {
        Connection::Client(Box::new(c.clone()))
    }
}

/// Entry point: `Worker::builder(endpoint_or_client)`.
#[derive(Debug)]
pub struct Worker;

impl Worker {
    /// A builder for a worker attached through `conn`.
    pub fn builder(conn: impl Into<Connection>) -> WorkerBuilder {
        WorkerBuilder {
            conn: conn.into(),
            cpus: None,
            handlers: HashMap::new(),
            prefetch: 1,
            name: default_name(),
        }
    }
}

fn default_name() -> String {
    std::env::args()
        .next()
        .and_then(|a| {
            std::path::Path::new(&a)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "wqd-client".into())
}

#[derive(Debug, Clone)]
enum Cpus {
    Target(String),
    List(Vec<u32>),
}

/// Configures and spawns a worker. Handlers are `Fn(&WorkItem) -> Result<Vec<u8>, String>`.
pub struct WorkerBuilder {
    conn: Connection,
    cpus: Option<Cpus>,
    handlers: HashMap<String, Arc<HandlerFn>>,
    prefetch: u32,
    name: String,
}

impl std::fmt::Debug for WorkerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerBuilder")
            .field("conn", &self.conn)
            .field("cpus", &self.cpus)
            .field("handlers", &self.handlers.keys().collect::<Vec<_>>())
            .field("prefetch", &self.prefetch)
            .field("name", &self.name)
            .finish()
    }
}

impl WorkerBuilder {
    /// One slot per CPU of this target: `cpus:LIST` is read locally; any other target (e.g.
    /// `cache:1`, `node:0`, a named group) is looked up in the daemon's topology groups (every
    /// member, live or not); `all` is every CPU the daemon knows.
    pub fn target(mut self, target: impl Into<String>) -> Self {
        self.cpus = Some(Cpus::Target(target.into()));
        self
    }

    /// One slot per CPU of this list.
    pub fn cpus(mut self, cpus: impl IntoIterator<Item = u32>) -> Self {
        self.cpus = Some(Cpus::List(cpus.into_iter().collect()));
        self
    }

    /// Serves handler `name` with `f` (a later call with the same name replaces it).
    pub fn handler<F>(mut self, name: impl Into<String>, f: F) -> Self
    where
        F: Fn(&WorkItem) -> Result<Vec<u8>, String> + Send + Sync + 'static,
    {
        self.handlers.insert(name.into(), Arc::new(f));
        self
    }

    /// Items each slot may hold at once (credits per slot; default 1, at least 1; the daemon's
    /// `max_credits` caps it).
    pub fn prefetch(mut self, n: u32) -> Self {
        self.prefetch = n.max(1);
        self
    }

    /// The name `wqctl workers` shows (default: the program's name).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    fn check(&self) -> Result<(), WorkerError> {
        if self.handlers.is_empty() {
            return Err(WorkerError::Config("no handler".into()));
        }
        if self.cpus.is_none() {
            return Err(WorkerError::Config(
                "no CPUs: call .target(..) or .cpus(..)".into(),
            ));
        }
        Ok(())
    }

    /// Connects, attaches, opens the slots and starts their threads; returns once the daemon
    /// has welcomed the worker and every slot is opened.
    ///
    /// Blocks the calling thread. With a [`Connection::Client`] whose channel lives on a
    /// current-thread runtime, call it outside that runtime (or use [`WorkerBuilder::start`]).
    ///
    /// # Errors
    /// [`WorkerError::Config`] and [`WorkerError::UnknownTarget`] for what was asked;
    /// [`WorkerError::Client`] when connecting or GetTopology fails; [`WorkerError::Ended`]
    /// when the daemon refuses the Hello.
    pub fn spawn(self) -> Result<WorkerHandle, WorkerError> {
        let (handle, ready) = self.launch()?;
        match ready.recv() {
            Ok(attached) => Ok(handle.attached(attached)),
            // The session ended before it was welcomed: its result says why.
            Err(_) => Err(handle.join().err().unwrap_or(WorkerError::Panicked)),
        }
    }

    /// As [`WorkerBuilder::spawn`], without blocking the caller's runtime.
    ///
    /// # Errors
    /// As [`WorkerBuilder::spawn`].
    pub async fn start(self) -> Result<WorkerHandle, WorkerError> {
        let (handle, ready) = self.launch()?;
        let r = tokio::task::spawn_blocking(move || ready.recv())
            .await
            .map_err(|_| WorkerError::Panicked)?;
        match r {
            Ok(attached) => Ok(handle.attached(attached)),
            Err(_) => Err(handle.wait().await.err().unwrap_or(WorkerError::Panicked)),
        }
    }

    /// Starts the session thread. The receiver gets the welcome, or is dropped unanswered when
    /// the session ends before it (then the thread's result says why).
    fn launch(self) -> Result<(WorkerHandle, std_mpsc::Receiver<Attached>), WorkerError> {
        self.check()?;
        let (ready_tx, ready_rx) = std_mpsc::channel();
        let (stop_tx, stop_rx) = unbounded_channel();
        let WorkerBuilder {
            conn,
            cpus,
            handlers,
            prefetch,
            name,
        } = self;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("wqd-worker")
            .build()
            .map_err(WorkerError::Start)?;
        let thread = std::thread::Builder::new()
            .name("wqd-worker".into())
            .spawn(move || {
                rt.block_on(async move {
                    let client = match conn {
                        Connection::Endpoint(e) => Client::connect(e).await?,
                        Connection::Client(c) => *c,
                    };
                    let cpus = match cpus {
                        Some(Cpus::List(l)) => normalize(l)?,
                        Some(Cpus::Target(t)) => match t.strip_prefix("cpus:") {
                            Some(list) => normalize(parse_cpulist(list)?)?,
                            None => normalize(resolve(&t, &client.topology().await?)?)?,
                        },
                        None => return Err(WorkerError::Config("no CPUs".into())),
                    };
                    let plan = session::Plan {
                        client,
                        handlers: Arc::new(handlers),
                        name,
                        prefetch,
                        cpus,
                    };
                    session::run(plan, ready_tx, stop_rx).await
                })
            })
            .map_err(WorkerError::Start)?;
        Ok((
            WorkerHandle {
                stop: stop_tx,
                thread: Some(thread),
                attached: None,
            },
            ready_rx,
        ))
    }
}

/// What the daemon's Welcome said, and the slots opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attached {
    /// This worker's id in the daemon (`wqctl workers`, `ItemResult.worker_id`).
    pub worker_id: u64,
    /// Whether slot threads pin themselves (false against a fixture topology).
    pub pinning: bool,
    /// The daemon's topology epoch at attach.
    pub epoch: u64,
    /// Most items one slot may hold.
    pub max_credits: u32,
    /// Most output bytes a `Done` may carry.
    pub max_output_bytes: u64,
    /// `(slot, cpu)` of every slot opened, in slot order.
    pub slots: Vec<(u32, u32)>,
}

/// What a worker did, returned by [`WorkerHandle::join`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkerReport {
    pub worker_id: u64,
    /// Items answered `Done {ok}`.
    pub ok: u64,
    /// Items answered `Done {error}`.
    pub failed: u64,
    /// Items answered `Done {cancelled}`.
    pub cancelled: u64,
    /// Items handed back (affinity or stopping).
    pub handed_back: u64,
}

/// A running worker. Dropping it without [`WorkerHandle::stop`] stops it with
/// [`Graceful::HandBack`] in the background (no join).
#[derive(Debug)]
pub struct WorkerHandle {
    stop: UnboundedSender<Graceful>,
    thread: Option<JoinHandle<Result<WorkerReport, WorkerError>>>,
    attached: Option<Attached>,
}

impl WorkerHandle {
    fn attached(mut self, a: Attached) -> Self {
        self.attached = Some(a);
        self
    }

    /// The Welcome and the slots.
    pub fn info(&self) -> Option<&Attached> {
        self.attached.as_ref()
    }

    /// This worker's id in the daemon.
    pub fn worker_id(&self) -> u64 {
        self.attached.as_ref().map(|a| a.worker_id).unwrap_or(0)
    }

    /// Asks the worker to stop (does not wait; the first request wins).
    pub fn stop(&self, mode: Graceful) {
        let _ = self.stop.send(mode);
    }

    /// Whether the session has ended (stopped, refused or lost).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Waits for the session to end, without stopping it.
    ///
    /// Postcondition: the session is over and every slot thread has returned (a handler
    /// still running when the stream was lost has its item's cancel flag raised and is waited
    /// for).
    ///
    /// # Errors
    /// How the session ended if not by a graceful stop: [`WorkerError::Ended`] (the daemon's
    /// status or a lost connection), [`WorkerError::Protocol`], [`WorkerError::Panicked`].
    pub fn join(mut self) -> Result<WorkerReport, WorkerError> {
        match self.thread.take() {
            Some(t) => t.join().unwrap_or(Err(WorkerError::Panicked)),
            None => Err(WorkerError::Panicked),
        }
    }

    /// [`WorkerHandle::join`] for async callers (on a blocking thread of the current runtime).
    ///
    /// # Errors
    /// As [`WorkerHandle::join`].
    pub async fn wait(self) -> Result<WorkerReport, WorkerError> {
        tokio::task::spawn_blocking(move || self.join())
            .await
            .unwrap_or(Err(WorkerError::Panicked))
    }
}

/// Sorted, without repeats, not empty.
fn normalize(cpus: Vec<u32>) -> Result<Vec<u32>, WorkerError> {
    let set: BTreeSet<u32> = cpus.into_iter().collect();
    if set.is_empty() {
        return Err(WorkerError::Config("no CPUs to serve".into()));
    }
    Ok(set.into_iter().collect())
}

/// The CPUs of `target` in the daemon's topology: `all` = every CPU, otherwise the members of
/// the group named exactly `target`.
fn resolve(target: &str, t: &v1::TopologySnapshot) -> Result<Vec<u32>, WorkerError> {
    if target == "all" {
        return Ok(t.cpus.iter().map(|c| c.cpu).collect());
    }
    match t.groups.iter().find(|g| g.target == target) {
        Some(g) => parse_cpulist(&g.members),
        None => Err(WorkerError::UnknownTarget(target.to_string())),
    }
}

/// Parses a kernel cpulist (`0-3,8`, blanks ignored).
pub fn parse_cpulist(s: &str) -> Result<Vec<u32>, WorkerError> {
    let bad = |p: &str| WorkerError::Config(format!("bad cpulist {s:?} at {p:?}"));
    let mut out = Vec::new();
    for part in s.trim().split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let a: u32 = a.trim().parse().map_err(|_| bad(part))?;
                let b: u32 = b.trim().parse().map_err(|_| bad(part))?;
                if a > b || b - a > 65_536 {
                    return Err(bad(part));
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().map_err(|_| bad(part))?),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpulists() {
        assert_eq!(parse_cpulist("0-3,8").ok(), Some(vec![0, 1, 2, 3, 8]));
        assert_eq!(parse_cpulist(" 5 ").ok(), Some(vec![5]));
        assert_eq!(parse_cpulist("").ok(), Some(vec![]));
        assert!(parse_cpulist("3-1").is_err());
        assert!(parse_cpulist("x").is_err());
        assert!(normalize(vec![]).is_err());
        assert_eq!(normalize(vec![3, 1, 3]).ok(), Some(vec![1, 3]));
    }

    #[test]
    fn targets_resolve_through_groups() {
        let t = v1::TopologySnapshot {
            cpus: (0..4)
                .map(|cpu| v1::CpuState {
                    cpu,
                    ..Default::default()
                })
                .collect(),
            groups: vec![v1::GroupInfo {
                target: "cache:1".into(),
                members: "2-3".into(),
                live_members: "2".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(resolve("cache:1", &t).ok(), Some(vec![2, 3]));
        assert_eq!(resolve("all", &t).ok(), Some(vec![0, 1, 2, 3]));
        assert!(matches!(
            resolve("cache:9", &t),
            Err(WorkerError::UnknownTarget(_))
        ));
    }

    #[test]
    fn a_builder_without_handlers_is_refused() {
        let e = Worker::builder(Endpoint::unix("/nonexistent"))
            .cpus([0])
            .spawn()
            .err();
        assert!(matches!(e, Some(WorkerError::Config(_))), "{e:?}");
    }
}
