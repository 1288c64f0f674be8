//! `WorkerService`: worker processes attach over a bidirectional `Attach` stream and serve
//! items of their own handlers (see `proto/wqd/v1/worker.proto` for the protocol and
//! `docs/workers.md`), and `ListWorkers` shows them.
//!
//! Owns: the `[workers]` section ([`WorkersSection`], its pure check), who may attach serving
//! which names ([`WorkerPolicy`], resolved from it once at start: Unix peer credentials or the
//! TCP client certificate's names), the cap on attached workers, and one
//! session task per stream that turns the worker's messages into calls on its engine
//! [`RemoteWorker`] and the engine's wake-ups and cancels into messages.
//!
//! Invariants: a session sends a slot only what the engine bound to it (never more than its
//! credits: the engine counts them); any message that breaks the protocol ends the stream
//! with INVALID_ARGUMENT and detaches the worker, whose held items are then lost per their
//! workqueue's `on_worker_lost` — and nothing else changes; a session always detaches its
//! worker when it ends, however it ends (the handle's `Drop` too).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::Deserialize;
use tokio::sync::{mpsc, Notify};
use tokio_stream::Stream;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::{Request, Response, Status, Streaming};
use wqd_proto::v1;
use wqd_proto::v1::daemon_message::Msg as Out;
use wqd_proto::v1::worker_message::Msg as In;

use super::Rpc;
use crate::conn::ConnInfo;
use crate::security::{lookup_group, lookup_user, IdSpec, UnixPeer};
use crate::settings::{invalid, Invalid};
use wqd_core::engine::{
    EngineError, ItemId, RemoteAnswer, RemoteJob, RemoteSink, RemoteWorker, WorkerMeta,
};

/// How long a new stream may take to send its Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Messages queued for one worker's response stream at most; the session waits beyond (a
/// worker that does not read holds up only itself).
const OUTBOUND: usize = 256;

/// Errors of the worker layer, each one status.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The peer may not serve a name (`[workers]`).
    #[error("{0}")]
    Denied(String),
    /// A malformed or out-of-order message, a name the daemon serves itself...
    #[error("{0}")]
    Protocol(String),
    #[error("{0}")]
    Full(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl From<WorkerError> for Status {
    fn from(e: WorkerError) -> Status {
        match e {
            WorkerError::Denied(m) => Status::permission_denied(m),
            WorkerError::Protocol(m) => Status::invalid_argument(m),
            WorkerError::Full(m) => Status::resource_exhausted(m),
            WorkerError::Engine(e) => super::status(super::RpcError::Engine(e)),
        }
    }
}

/// `[workers]`: worker processes that attach over `WorkerService.Attach`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct WorkersSection {
    /// Handler names attached workers will serve, declared so a submit may name them before
    /// any worker serving them attaches (names served once stay known until restart anyway).
    pub handlers: Vec<String>,
    /// Attached workers at most (more are refused with RESOURCE_EXHAUSTED).
    pub max_workers: usize,
    /// Items one slot may hold at once (its credits are clamped to this). 1 sends an item
    /// only to a slot that is idle, so it starts at once on a CPU checked live.
    pub max_credits: u32,
    /// Who may attach, serving what. Empty: root and the daemon's own user may serve any
    /// name over the Unix socket; nobody over TCP.
    pub allow: Vec<WorkerRule>,
}

impl Default for WorkersSection {
    fn default() -> Self {
        Self {
            handlers: Vec::new(),
            max_workers: 256,
            max_credits: 1,
            allow: Vec::new(),
        }
    }
}

/// One `[[workers.allow]]` rule: a peer matching any of its uids, gids (primary or
/// supplementary; Unix socket) or certificate names (subject CN or DNS SAN of the TCP
/// client certificate) may serve the handler names matching its `handlers` patterns (exact
/// names, `prefix*`, or `*`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerRule {
    pub uids: Vec<IdSpec>,
    pub gids: Vec<IdSpec>,
    pub cert_names: Vec<String>,
    pub handlers: Vec<String>,
}

impl WorkersSection {
    /// Checks what the types cannot: the caps, and every handler name and pattern. Pure (users
    /// and groups are resolved by [`WorkerPolicy::resolve`] at start).
    ///
    /// # Errors
    /// The first [`Invalid`] found, naming its `workers.` key.
    pub fn check(&self) -> Result<(), Invalid> {
        if self.max_workers == 0 {
            return Err(invalid("workers.max_workers", "must be at least 1"));
        }
        if !(1..=64).contains(&self.max_credits) {
            return Err(invalid(
                "workers.max_credits",
                format!("{} must be in 1..=64", self.max_credits),
            ));
        }
        for h in &self.handlers {
            wqd_core::engine::check_worker_handler_name(h)
                .map_err(|e| invalid("workers.handlers", e))?;
        }
        for (i, r) in self.allow.iter().enumerate() {
            if r.handlers.is_empty() {
                return Err(invalid(
                    format!("workers.allow[{i}].handlers"),
                    "must name at least one handler pattern (\"*\" for any)",
                ));
            }
            if r.uids.is_empty() && r.gids.is_empty() && r.cert_names.is_empty() {
                return Err(invalid(
                    format!("workers.allow[{i}]"),
                    "names nobody: give uids, gids or cert_names",
                ));
            }
            for p in &r.handlers {
                let name = p.strip_suffix('*').unwrap_or(p);
                if !name.is_empty() {
                    wqd_core::engine::check_worker_handler_name(name)
                        .map_err(|e| invalid(format!("workers.allow[{i}].handlers"), e))?;
                }
            }
        }
        Ok(())
    }
}

/// A resolved `[[workers.allow]]` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    uids: Vec<u32>,
    gids: Vec<u32>,
    cert_names: Vec<String>,
    handlers: Vec<String>,
}

/// Who may attach, serving what; and how many may be attached at once.
#[derive(Debug)]
pub struct WorkerPolicy {
    rules: Vec<Rule>,
    /// With no rules: these uids may serve any name over the Unix socket (root and the
    /// daemon's own user).
    default_uids: Vec<u32>,
    max_workers: usize,
    attached: AtomicUsize,
}

/// Who is attaching.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub groups: Vec<u32>,
    pub pid: Option<u32>,
    /// Subject CN and DNS SANs of the TCP client certificate.
    pub cert_names: Vec<String>,
}

impl Identity {
    /// The peer of a request: Unix credentials, or the TLS client certificate's names.
    pub fn of<T>(req: &Request<T>) -> Identity {
        let ext = req.extensions();
        if let Some(p) = ext
            .get::<ConnInfo<UnixPeer>>()
            .and_then(|c| c.peer.0.as_deref())
        {
            return Identity {
                uid: Some(p.uid),
                gid: Some(p.gid),
                groups: p.groups.clone(),
                pid: p.pid.and_then(|p| u32::try_from(p).ok()),
                cert_names: Vec::new(),
            };
        }
        let certs = ext
            .get::<TlsConnectInfo<ConnInfo<TcpConnectInfo>>>()
            .and_then(|t| t.peer_certs());
        let cert_names = certs
            .as_ref()
            .and_then(|c| c.first())
            .map(|c| cert_names(c.as_ref()))
            .unwrap_or_default();
        Identity {
            cert_names,
            ..Identity::default()
        }
    }

    fn describe(&self) -> String {
        match (self.uid, self.cert_names.is_empty()) {
            (Some(u), _) => format!("uid {u} (gid {})", self.gid.unwrap_or(u32::MAX)),
            (None, false) => format!("certificate {}", self.cert_names.join(", ")),
            (None, true) => "a peer without credentials or certificate".into(),
        }
    }
}

/// The subject common names and DNS subject alternative names of a DER certificate.
fn cert_names(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let mut v: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_string))
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                v.push((*d).to_string());
            }
        }
    }
    v
}

/// Whether handler pattern `p` (`name`, `prefix*` or `*`) matches `name`.
fn matches(p: &str, name: &str) -> bool {
    match p.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => p == name,
    }
}

impl WorkerPolicy {
    /// Resolves `[workers]` (user and group names to ids).
    ///
    /// # Errors
    /// A text naming the rule whose user or group does not resolve.
    pub fn resolve(w: &WorkersSection, euid: u32) -> Result<WorkerPolicy, String> {
        let rules = w
            .allow
            .iter()
            .enumerate()
            .map(|(i, r): (usize, &WorkerRule)| {
                let at = |e: String| format!("workers.allow[{i}]: {e}");
                Ok(Rule {
                    uids: r
                        .uids
                        .iter()
                        .map(lookup_user)
                        .collect::<Result<_, _>>()
                        .map_err(at)?,
                    gids: r
                        .gids
                        .iter()
                        .map(lookup_group)
                        .collect::<Result<_, _>>()
                        .map_err(at)?,
                    cert_names: r.cert_names.clone(),
                    handlers: r.handlers.clone(),
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let mut default_uids = vec![0, euid];
        default_uids.dedup();
        Ok(WorkerPolicy {
            rules,
            default_uids,
            max_workers: w.max_workers.max(1),
            attached: AtomicUsize::new(0),
        })
    }

    /// Whether `who` may serve every name of `handlers`.
    ///
    /// # Errors
    /// [`WorkerError::Denied`] naming the first name it may not serve.
    pub fn check(&self, who: &Identity, handlers: &[String]) -> Result<(), WorkerError> {
        for h in handlers {
            let ok = if self.rules.is_empty() {
                who.uid.is_some_and(|u| self.default_uids.contains(&u))
            } else {
                self.rules.iter().any(|r| {
                    let person = who.uid.is_some_and(|u| u == 0 || r.uids.contains(&u))
                        || who.gid.is_some_and(|g| r.gids.contains(&g))
                        || who.groups.iter().any(|g| r.gids.contains(g))
                        || who.cert_names.iter().any(|n| r.cert_names.contains(n));
                    person && r.handlers.iter().any(|p| matches(p, h))
                })
            };
            if !ok {
                let why = if self.rules.is_empty() {
                    "without [[workers.allow]] rules only root and the daemon's own user may attach workers"
                } else {
                    "no [[workers.allow]] rule lets it"
                };
                return Err(WorkerError::Denied(format!(
                    "{} may not serve handler {}: {why}",
                    who.describe(),
                    wqd_core::quote::quote(h)
                )));
            }
        }
        Ok(())
    }

    fn admit(self: &Arc<Self>) -> Result<Seat, WorkerError> {
        let n = self.attached.fetch_add(1, Ordering::AcqRel);
        let seat = Seat(self.clone());
        if n >= self.max_workers {
            return Err(WorkerError::Full(format!(
                "{} workers are attached, workers.max_workers is {}",
                n, self.max_workers
            )));
        }
        Ok(seat)
    }
}

/// One of `max_workers`, given back when dropped.
struct Seat(Arc<WorkerPolicy>);

impl Drop for Seat {
    fn drop(&mut self) {
        self.0.attached.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How the engine reaches a session: a wake-up, and cancels to forward.
#[derive(Default)]
struct Sink {
    notify: Notify,
    cancels: Mutex<Vec<ItemId>>,
}

impl RemoteSink for Sink {
    fn wake(&self) {
        self.notify.notify_one();
    }
    fn cancel(&self, id: ItemId) {
        self.cancels.lock().push(id);
        self.notify.notify_one();
    }
}

type AttachStream = Pin<Box<dyn Stream<Item = Result<v1::DaemonMessage, Status>> + Send>>;

fn msg(m: Out) -> v1::DaemonMessage {
    v1::DaemonMessage { msg: Some(m) }
}

fn work(j: RemoteJob) -> v1::DaemonMessage {
    msg(Out::Work(v1::Work {
        item_id: j.id,
        slot: j.slot,
        cpu: j.cpu,
        handler: j.handler.to_string(),
        args: j.args.into_iter().collect::<HashMap<_, _>>(),
        payload: j.payload,
        epoch: j.epoch,
        batch_id: j.batch,
        workqueue: j.workqueue.to_string(),
        rebinds: j.rebinds,
        attempt: j.attempt,
    }))
}

/// Why a session ended, for the log and for the items it held.
enum End {
    /// The worker half-closed.
    Closed,
    /// The stream failed or was reset (the worker died, or the connection dropped).
    Failed(Status),
    /// The worker broke the protocol.
    Protocol(String),
    /// The daemon is stopping.
    Stopping,
    /// The response stream's receiver is gone (the connection dropped).
    Gone,
}

struct Session {
    worker: RemoteWorker,
    sink: Arc<Sink>,
    tx: mpsc::Sender<Result<v1::DaemonMessage, Status>>,
    jobs: Vec<RemoteJob>,
}

impl Session {
    /// Sends a message; `false` when the worker's side is gone.
    async fn send(&self, m: v1::DaemonMessage) -> bool {
        self.tx.send(Ok(m)).await.is_ok()
    }

    /// Binds work to slots with credits and sends it, then any cancels.
    async fn pump(&mut self) -> bool {
        self.worker.take(&mut self.jobs);
        for j in std::mem::take(&mut self.jobs) {
            if !self.send(work(j)).await {
                return false;
            }
        }
        let cancels = std::mem::take(&mut *self.sink.cancels.lock());
        for id in cancels {
            if !self
                .send(msg(Out::Cancel(v1::Cancel { item_id: id })))
                .await
            {
                return false;
            }
        }
        true
    }

    /// Applies one worker message, returning the answer it calls for (if any); `Err` is a
    /// protocol violation.
    fn apply(&self, m: v1::WorkerMessage) -> Result<Option<v1::DaemonMessage>, String> {
        let w = &self.worker;
        let engine = |e: EngineError| e.to_string();
        match m.msg {
            None => Err("a WorkerMessage without a message".into()),
            Some(In::Hello(_)) => Err("a second Hello".into()),
            Some(In::OpenSlot(o)) => w.open_slot(o.slot, o.cpu).map(|()| None).map_err(engine),
            Some(In::Credit(c)) => w.credit(c.slot, c.credits).map(|()| None).map_err(engine),
            // Every Work for the slot went out before this answer (one task sends both).
            Some(In::CloseSlot(c)) => w
                .close_slot(c.slot)
                .map(|()| Some(msg(Out::SlotClosed(v1::SlotClosed { slot: c.slot }))))
                .map_err(engine),
            Some(In::HandBack(h)) => w
                .answer(h.item_id, RemoteAnswer::HandBack(h.reason), None, h.credits)
                .map(|()| None)
                .map_err(engine),
            Some(In::Done(d)) => {
                use v1::done::Outcome;
                let answer = match d.outcome {
                    Some(Outcome::Ok(out)) => RemoteAnswer::Ok(out),
                    Some(Outcome::Error(e)) => RemoteAnswer::Failed(e),
                    Some(Outcome::Cancelled(true)) => RemoteAnswer::Cancelled,
                    Some(Outcome::Cancelled(false)) | None => {
                        return Err(format!(
                            "Done for item {} without an outcome (ok, error or cancelled = true)",
                            d.item_id
                        ))
                    }
                };
                w.answer(d.item_id, answer, d.cpu_finished, d.credits)
                    .map(|()| None)
                    .map_err(engine)
            }
        }
    }

    async fn run(
        mut self,
        mut inbound: Streaming<v1::WorkerMessage>,
        mut stopping: tokio::sync::watch::Receiver<bool>,
    ) -> End {
        loop {
            tokio::select! {
                m = inbound.message() => match m {
                    Ok(Some(m)) => {
                        match self.apply(m) {
                            Err(e) => return self.end(End::Protocol(e)).await,
                            Ok(Some(answer)) => {
                                if !self.send(answer).await {
                                    return self.end(End::Gone).await;
                                }
                            }
                            Ok(None) => {}
                        }
                        if !self.pump().await {
                            return self.end(End::Gone).await;
                        }
                    }
                    Ok(None) => return self.end(End::Closed).await,
                    Err(st) => return self.end(End::Failed(st)).await,
                },
                () = self.sink.notify.notified() => {
                    if !self.pump().await {
                        return self.end(End::Gone).await;
                    }
                }
                r = stopping.changed() => {
                    if r.is_err() || *stopping.borrow() {
                        return self.end(End::Stopping).await;
                    }
                }
            }
        }
    }

    /// Detaches the worker (its held items are lost, per their workqueues) and ends the
    /// response stream with the status `end` calls for.
    async fn end(self, end: End) -> End {
        let id = self.worker.id();
        let held = self.worker.held();
        let (why, status) = match &end {
            End::Closed => ("it closed its stream".to_string(), None),
            End::Failed(st) => (
                format!("its stream failed ({:?}: {})", st.code(), st.message()),
                None,
            ),
            End::Protocol(e) => (
                format!("it broke the protocol: {e}"),
                Some(Status::invalid_argument(e.clone())),
            ),
            End::Stopping => (
                "the daemon is stopping".to_string(),
                Some(Status::unavailable("the daemon is stopping")),
            ),
            End::Gone => ("its connection is gone".to_string(), None),
        };
        match &end {
            End::Closed if held == 0 => tracing::info!(worker = id, "worker detached"),
            _ => tracing::warn!(worker = id, held, %why, "worker detached"),
        }
        self.worker.detach(&why);
        if let Some(st) = status {
            let _ = self.tx.send(Err(st)).await;
        }
        end
    }
}

impl Rpc {
    async fn do_attach(
        &self,
        req: Request<Streaming<v1::WorkerMessage>>,
    ) -> Result<AttachStream, WorkerError> {
        let who = Identity::of(&req);
        let mut inbound = req.into_inner();
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
            Ok(Ok(Some(v1::WorkerMessage {
                msg: Some(In::Hello(h)),
            }))) => h,
            Ok(Ok(Some(_))) => {
                return Err(WorkerError::Protocol(
                    "the first message of Attach must be Hello".into(),
                ))
            }
            Ok(Ok(None)) => {
                return Err(WorkerError::Protocol(
                    "the stream ended before its Hello".into(),
                ))
            }
            Ok(Err(st)) => return Err(WorkerError::Protocol(st.message().to_string())),
            Err(_) => {
                return Err(WorkerError::Protocol(format!(
                    "no Hello within {HELLO_TIMEOUT:?}"
                )))
            }
        };
        self.workers.check(&who, &hello.handlers)?;
        let seat = self.workers.admit()?;
        let meta = WorkerMeta {
            pid: who.pid.unwrap_or(hello.pid),
            uid: who.uid,
            gid: who.gid,
            cert_names: who.cert_names.clone(),
            name: wqd_core::quote::cap(hello.name, 128),
        };
        let sink = Arc::new(Sink::default());
        let worker = self
            .engine
            .attach(meta.clone(), hello.handlers.clone(), sink.clone())?;
        let (tx, rx) = mpsc::channel(OUTBOUND);
        let welcome = msg(Out::Welcome(v1::Welcome {
            worker_id: worker.id(),
            pinning: self.engine.pinning(),
            epoch: self.engine.snapshot().epoch,
            max_credits: self.engine.max_credits(),
            max_output_bytes: self.engine.max_result_bytes() as u64,
        }));
        tracing::info!(
            worker = worker.id(),
            pid = meta.pid,
            uid = meta.uid,
            name = %meta.name,
            handlers = ?hello.handlers,
            "worker attached"
        );
        let _ = tx.send(Ok(welcome)).await;
        let session = Session {
            worker,
            sink,
            tx,
            jobs: Vec::new(),
        };
        let stopping = self.stopping.clone();
        tokio::spawn(async move {
            let _seat = seat;
            session.run(inbound, stopping).await;
        });
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }
}

#[tonic::async_trait]
impl v1::worker_service_server::WorkerService for Rpc {
    type AttachStream = AttachStream;

    async fn attach(
        &self,
        req: Request<Streaming<v1::WorkerMessage>>,
    ) -> Result<Response<AttachStream>, Status> {
        self.do_attach(req).await.map(Response::new).map_err(|e| {
            tracing::warn!(error = %e, "worker refused");
            Status::from(e)
        })
    }

    async fn list_workers(
        &self,
        _req: Request<v1::ListWorkersRequest>,
    ) -> Result<Response<v1::ListWorkersResponse>, Status> {
        let (list, (workers_lost, items_lost)) = self.engine.remote_workers_and_losses();
        let workers = list
            .into_iter()
            .map(|w| v1::WorkerInfo {
                worker_id: w.id,
                pid: w.meta.pid,
                uid: w.meta.uid,
                gid: w.meta.gid,
                cert_names: w.meta.cert_names,
                name: w.meta.name,
                handlers: w.handlers,
                slots: w
                    .slots
                    .into_iter()
                    .map(|s| v1::SlotInfo {
                        slot: s.slot,
                        cpu: s.cpu,
                        credits: s.credits,
                        in_flight: s.in_flight,
                        done: s.done,
                        closed: s.closed,
                        live: s.live,
                    })
                    .collect(),
                attached_seconds: w.attached_for.as_secs_f64(),
                done: w.done,
                handed_back: w.handed_back,
            })
            .collect();
        Ok(Response::new(v1::ListWorkersResponse {
            workers,
            workers_lost,
            items_lost,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(rules: Vec<WorkerRule>) -> WorkerPolicy {
        let w = WorkersSection {
            allow: rules,
            ..WorkersSection::default()
        };
        WorkerPolicy::resolve(&w, 1000).expect("resolves")
    }

    fn unix(uid: u32, gid: u32, groups: &[u32]) -> Identity {
        Identity {
            uid: Some(uid),
            gid: Some(gid),
            groups: groups.to_vec(),
            ..Identity::default()
        }
    }

    #[test]
    fn without_rules_root_and_the_daemons_user_serve_anything() {
        let p = policy(vec![]);
        let h = vec!["resize".to_string(), "a.b".into()];
        assert!(p.check(&unix(0, 0, &[]), &h).is_ok());
        assert!(p.check(&unix(1000, 1000, &[]), &h).is_ok());
        let e = p.check(&unix(1001, 1001, &[]), &h).unwrap_err().to_string();
        assert!(
            e.starts_with("uid 1001 (gid 1001) may not serve handler \"resize\""),
            "{e}"
        );
        let tls = Identity {
            cert_names: vec!["w.example".into()],
            ..Identity::default()
        };
        assert!(p.check(&tls, &h).is_err(), "no TCP workers without rules");
    }

    #[test]
    fn rules_match_people_and_name_patterns() {
        let p = policy(vec![
            WorkerRule {
                uids: vec![IdSpec::Id(7)],
                handlers: vec!["img.*".into(), "exact".into()],
                ..WorkerRule::default()
            },
            WorkerRule {
                gids: vec![IdSpec::Id(50)],
                cert_names: vec!["w.example".into()],
                handlers: vec!["*".into()],
                ..WorkerRule::default()
            },
        ]);
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert!(p
            .check(&unix(7, 7, &[]), &s(&["img.resize", "exact"]))
            .is_ok());
        assert!(p.check(&unix(7, 7, &[]), &s(&["exactly"])).is_err());
        assert!(p.check(&unix(7, 7, &[]), &s(&["img.x", "other"])).is_err());
        assert!(p.check(&unix(8, 1, &[50]), &s(&["anything"])).is_ok());
        assert!(p.check(&unix(8, 50, &[]), &s(&["anything"])).is_ok());
        assert!(p.check(&unix(0, 0, &[]), &s(&["img.a"])).is_ok(), "root");
        // The daemon's own user needs a rule once there are rules.
        assert!(p.check(&unix(1000, 1000, &[]), &s(&["img.a"])).is_err());
        let tls = Identity {
            cert_names: vec!["w.example".into()],
            ..Identity::default()
        };
        assert!(p.check(&tls, &s(&["x"])).is_ok());
    }

    #[test]
    fn certificate_names_are_its_common_name_and_dns_alt_names() {
        use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};
        let key = KeyPair::generate().expect("key");
        let mut params =
            CertificateParams::new(vec!["w1.example".into(), "w1.internal".into()]).expect("p");
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "worker one");
        params.distinguished_name = dn;
        let cert = params.self_signed(&key).expect("cert");
        let names = cert_names(cert.der());
        assert_eq!(names, ["worker one", "w1.example", "w1.internal"]);
        assert!(cert_names(b"not a certificate").is_empty());
        // And a rule naming one of them lets that peer serve.
        let p = policy(vec![WorkerRule {
            cert_names: vec!["w1.internal".into()],
            handlers: vec!["x.*".into()],
            ..WorkerRule::default()
        }]);
        let who = Identity {
            cert_names: names,
            ..Identity::default()
        };
        assert!(p.check(&who, &["x.y".to_string()]).is_ok());
        assert!(p.check(&who, &["z".to_string()]).is_err());
    }

    #[test]
    fn the_cap_counts_attached_workers() {
        let w = WorkersSection {
            max_workers: 2,
            ..WorkersSection::default()
        };
        let p = Arc::new(WorkerPolicy::resolve(&w, 0).expect("resolves"));
        let a = p.admit().expect("first");
        let b = p.admit().expect("second");
        assert!(matches!(p.admit(), Err(WorkerError::Full(_))));
        drop(a);
        let _c = p.admit().expect("a seat came back");
        drop(b);
    }
}
