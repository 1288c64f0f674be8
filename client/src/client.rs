//! The connected [`Client`]: one HTTP/2 channel to the daemon (Unix socket or TCP) shared by
//! the four service stubs, with one method per RPC.
//!
//! Invariants: every call carries the client's timeout (if set) as the gRPC deadline, so the
//! daemon can stop waiting when the caller has given up; a status from the daemon reaches
//! the caller unchanged inside [`ClientError::Status`]. `Client` is cheap to clone and every
//! clone shares the channel.

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tokio_stream::{Stream, StreamExt};
use tonic::transport::{Channel, Uri};
use tonic::Request;
use tracing::debug;
use wqd_proto::v1::{
    self, dispatch_service_client::DispatchServiceClient, stats_service_client::StatsServiceClient,
    topology_service_client::TopologyServiceClient, worker_service_client::WorkerServiceClient,
    workqueue_service_client::WorkqueueServiceClient,
};

use crate::chunk::{Chunker, DEFAULT_CHUNK_BYTES};
use crate::endpoint::Endpoint;
use crate::error::{chain, ClientError};
use crate::item::{Batch, Item};

/// Largest message the client accepts or sends (a waited batch returns every result).
const MAX_MESSAGE_BYTES: usize = 256 << 20;

/// A boxed stream of typed events or errors.
pub type EventStream<T> = Pin<Box<dyn Stream<Item = Result<T, ClientError>> + Send>>;

/// What a flush waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FlushScope {
    /// These items.
    Items(Vec<u64>),
    /// Every item of a batch.
    Batch(u64),
    /// Everything pending or running on a workqueue when the flush starts (not its delayed
    /// items: the summary counts them in `delayed_not_covered`).
    Workqueue(String),
    /// As `Workqueue`, and its delayed items too, queued at once.
    WorkqueueAll(String),
}

/// What a cancel applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelScope {
    /// These items.
    Items(Vec<u64>),
    /// Every item of a batch.
    Batch(u64),
}

/// One event of a flush stream.
#[derive(Debug, Clone, PartialEq)]
pub enum FlushEvent {
    /// Items that became (or already were) terminal.
    Results(Vec<v1::ItemResult>),
    /// The last event.
    Summary(v1::FlushSummary),
}

/// One HTTP/2 connection (a tonic [`Channel`]) to the daemon's Unix socket at `path`,
/// connected eagerly. Every Rust client of the socket connects through here: this library,
/// the worker library, the benchmarks and the end-to-end tests. What the connection writes in
/// one turn of the scheduler leaves in one system call (a unary call's HEADERS and DATA
/// together; see the `coalesce` module), and the daemon reading a request does not wake the
/// client ([`wqd_proto::stream::QuietUnixStream`]).
///
/// # Errors
/// The socket cannot be connected to, or the HTTP/2 handshake fails.
pub async fn unix_channel(path: &Path) -> Result<Channel, tonic::transport::Error> {
    let path = Arc::new(path.to_path_buf());
    // The URI is only used for the :authority header; the connector ignores it.
    tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = Arc::clone(&path);
            async move {
                let s = UnixStream::connect(&*path).await?;
                wqd_proto::stream::QuietUnixStream::from_tokio(s)
                    .map(|s| TokioIo::new(crate::coalesce::Coalesce::new(s)))
            }
        }))
        .await
}

/// A TCP connection to `uri`'s host and port (80 unless said), Nagle's algorithm off (as
/// tonic's own connector sets it): each address the name resolves to is tried in turn.
async fn tcp_connect(uri: &Uri) -> std::io::Result<tokio::net::TcpStream> {
    let host = uri
        .host()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "no host"))?;
    // An IPv6 literal comes bracketed ("[::1]").
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let s = tokio::net::TcpStream::connect((host, uri.port_u16().unwrap_or(80))).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// A connection to wqd.
#[derive(Clone)]
pub struct Client {
    endpoint: Endpoint,
    dispatch: DispatchServiceClient<Channel>,
    workqueues: WorkqueueServiceClient<Channel>,
    topology: TopologyServiceClient<Channel>,
    stats: StatsServiceClient<Channel>,
    workers: WorkerServiceClient<Channel>,
    timeout: Option<Duration>,
    chunk_bytes: usize,
    /// `Bearer <token>`, sent as `authorization` metadata with every call (marked sensitive).
    token: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

/// TLS settings for an `https://` endpoint (PEM bytes, as read from files).
#[derive(Clone, Default)]
pub struct TlsOptions {
    /// CA certificate(s) the daemon's certificate must chain to. Without it only a certificate
    /// from no known CA verifies, so set it for a private CA (the usual case).
    pub ca_pem: Option<Vec<u8>>,
    /// This client's certificate chain and private key (mTLS: `[security] client_ca`).
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The name to verify the daemon's certificate against; default: the URL's host.
    pub domain: Option<String>,
}

impl std::fmt::Debug for TlsOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsOptions")
            .field("ca", &self.ca_pem.is_some())
            .field("identity", &self.identity.is_some())
            .field("domain", &self.domain)
            .finish()
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("endpoint", &self.endpoint)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects to the daemon at `endpoint` (eagerly: a missing daemon fails here).
    ///
    /// # Errors
    /// [`ClientError::Connect`] naming the address when the socket or host cannot be
    /// reached; [`ClientError::InvalidEndpoint`] for a malformed URL.
    pub async fn connect(endpoint: Endpoint) -> Result<Self, ClientError> {
        Self::connect_with(endpoint, None).await
    }

    /// As [`Client::connect`], with TLS settings for an `https://` endpoint (an `https://`
    /// endpoint always uses TLS; settings for another endpoint are refused).
    ///
    /// # Errors
    /// As [`Client::connect`]; [`ClientError::InvalidRequest`] for TLS settings on a
    /// `unix:` or `http://` endpoint.
    pub async fn connect_with(
        endpoint: Endpoint,
        tls: Option<TlsOptions>,
    ) -> Result<Self, ClientError> {
        let addr = endpoint.to_string();
        let https = matches!(&endpoint, Endpoint::Http(u) if u.starts_with("https://"));
        if tls.is_some() && !https {
            return Err(ClientError::InvalidRequest(format!(
                "TLS settings need an https:// address, not {addr}"
            )));
        }
        let conn_err = |e: tonic::transport::Error| ClientError::Connect {
            addr: addr.clone(),
            reason: chain(&e),
        };
        let channel = match &endpoint {
            Endpoint::Unix(path) => unix_channel(path).await.map_err(conn_err)?,
            Endpoint::Http(url) => {
                let invalid = |e: tonic::transport::Error| ClientError::InvalidEndpoint {
                    endpoint: url.clone(),
                    reason: chain(&e),
                };
                let mut ep =
                    tonic::transport::Endpoint::from_shared(url.clone()).map_err(invalid)?;
                if https {
                    let o = tls.unwrap_or_default();
                    let mut t = tonic::transport::ClientTlsConfig::new();
                    if let Some(ca) = o.ca_pem {
                        t = t.ca_certificate(tonic::transport::Certificate::from_pem(ca));
                    }
                    if let Some((cert, key)) = o.identity {
                        t = t.identity(tonic::transport::Identity::from_pem(cert, key));
                    }
                    if let Some(d) = o.domain {
                        t = t.domain_name(d);
                    }
                    ep = ep.tls_config(t).map_err(invalid)?;
                    ep.connect().await.map_err(conn_err)?
                } else {
                    // Plain TCP: the same one-write-per-call stream as the Unix socket's.
                    ep.connect_with_connector(tower::service_fn(|uri: Uri| async move {
                        tcp_connect(&uri)
                            .await
                            .map(|s| TokioIo::new(crate::coalesce::Coalesce::new(s)))
                    }))
                    .await
                    .map_err(conn_err)?
                }
            }
        };
        debug!(%endpoint, "connected to wqd");
        Ok(Self::from_channel(endpoint, channel))
    }

    /// Wraps an existing channel (for tests and custom transports).
    pub fn from_channel(endpoint: Endpoint, channel: Channel) -> Self {
        Client {
            endpoint,
            dispatch: DispatchServiceClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            workqueues: WorkqueueServiceClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
            topology: TopologyServiceClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
            stats: StatsServiceClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
            workers: WorkerServiceClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            timeout: None,
            chunk_bytes: DEFAULT_CHUNK_BYTES,
            token: None,
        }
    }

    /// Sets a deadline for every call (sent as the gRPC timeout). For streams it bounds the
    /// whole stream.
    pub fn with_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sends `authorization: Bearer <token>` with every call (the daemon's TCP listener with
    /// `[security] token_file`). Surrounding whitespace is dropped.
    ///
    /// # Errors
    /// [`ClientError::InvalidRequest`] for an empty token or one that is not visible ASCII.
    pub fn with_token(mut self, token: &str) -> Result<Self, ClientError> {
        let t = token.trim();
        if t.is_empty() || !t.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ClientError::InvalidRequest(
                "the bearer token must be non-empty visible ASCII without spaces".into(),
            ));
        }
        let mut v: tonic::metadata::MetadataValue<tonic::metadata::Ascii> =
            format!("Bearer {t}").parse().map_err(|_| {
                ClientError::InvalidRequest("the bearer token is not a valid header value".into())
            })?;
        v.set_sensitive(true);
        self.token = Some(v);
        Ok(self)
    }

    /// Sets the encoded size budget of one `SubmitStream` message.
    pub fn with_chunk_bytes(mut self, bytes: usize) -> Self {
        self.chunk_bytes = bytes;
        self
    }

    /// The endpoint this client is connected to.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    fn req<T>(&self, msg: T) -> Request<T> {
        let mut r = self.req_without_deadline(msg);
        if let Some(t) = self.timeout {
            r.set_timeout(t);
        }
        r
    }

    /// A request with the token but no deadline (sessions that last as long as the caller).
    fn req_without_deadline<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        if let Some(t) = &self.token {
            r.metadata_mut().insert("authorization", t.clone());
        }
        r
    }

    /// The generated dispatch stub, for calls this wrapper does not cover.
    pub fn dispatch_stub(&self) -> DispatchServiceClient<Channel> {
        self.dispatch.clone()
    }

    /// Submits one batch in a single message.
    ///
    /// # Errors
    /// The daemon's status: `INVALID_ARGUMENT` (bad item; nothing queued), `NOT_FOUND`
    /// (workqueue), `RESOURCE_EXHAUSTED` (limits), `FAILED_PRECONDITION` (draining).
    pub async fn submit(&self, batch: Batch) -> Result<v1::SubmitResponse, ClientError> {
        let r = self
            .dispatch
            .clone()
            .submit(self.req(batch.into_proto()))
            .await?;
        Ok(r.into_inner())
    }

    /// Opens a [`crate::Session`]: many batches over one stream, each answered as
    /// [`Client::submit`] would answer it, by tag. The client's timeout (if set) bounds the
    /// whole session.
    ///
    /// # Errors
    /// The daemon's status when the stream cannot be opened.
    pub async fn session(&self) -> Result<crate::Session, ClientError> {
        crate::Session::start(self.dispatch.clone(), |s| self.req(s)).await
    }

    /// Submits a batch of any size through `SubmitStream`, pulling items lazily and sending
    /// them in messages under the chunk budget. Nothing is queued unless the whole stream
    /// is accepted. Per-item receipts: [`crate::chunk::stream_receipts`].
    ///
    /// # Errors
    /// As [`Client::submit`].
    pub async fn submit_stream<I>(
        &self,
        workqueue: impl Into<String>,
        items: I,
    ) -> Result<v1::SubmitStreamResponse, ClientError>
    where
        I: IntoIterator,
        I::Item: Into<Item>,
        I::IntoIter: Send + 'static,
    {
        let options = v1::SubmitOptions {
            workqueue: workqueue.into(),
        };
        let chunks = Chunker::new(
            items.into_iter().map(|i| i.into().into_proto()),
            options,
            self.chunk_bytes,
        );
        let r = self
            .dispatch
            .clone()
            .submit_stream(self.req(tokio_stream::iter(chunks)))
            .await?;
        Ok(r.into_inner())
    }

    /// Starts a flush; the stream yields result groups as items finish, then the summary.
    ///
    /// # Errors
    /// The daemon's status (`NOT_FOUND` for an unknown batch or workqueue); stream items
    /// carry later errors, such as `DEADLINE_EXCEEDED` when the client timeout passes.
    pub async fn flush(
        &self,
        scope: FlushScope,
        summary_only: bool,
    ) -> Result<EventStream<FlushEvent>, ClientError> {
        let include_delayed = matches!(scope, FlushScope::WorkqueueAll(_));
        let scope = match scope {
            FlushScope::Items(ids) => v1::flush_request::Scope::Items(v1::ItemIds { ids }),
            FlushScope::Batch(b) => v1::flush_request::Scope::BatchId(b),
            FlushScope::Workqueue(w) | FlushScope::WorkqueueAll(w) => {
                v1::flush_request::Scope::Workqueue(w)
            }
        };
        let req = v1::FlushRequest {
            scope: Some(scope),
            summary_only,
            include_delayed,
        };
        let stream = self
            .dispatch
            .clone()
            .flush(self.req(req))
            .await?
            .into_inner();
        Ok(Box::pin(stream.map(|m| {
            use v1::flush_response::Event;
            match m?.event {
                Some(Event::Results(r)) => Ok(FlushEvent::Results(r.results)),
                Some(Event::Summary(s)) => Ok(FlushEvent::Summary(s)),
                None => Err(ClientError::Protocol("flush message without event".into())),
            }
        })))
    }

    /// Flushes and collects every result and the summary.
    ///
    /// Postcondition on `Ok`: none of the covered items is pending or running.
    ///
    /// # Errors
    /// As [`Client::flush`]; [`ClientError::Protocol`] if the stream ends without summary.
    pub async fn flush_all(
        &self,
        scope: FlushScope,
    ) -> Result<(Vec<v1::ItemResult>, v1::FlushSummary), ClientError> {
        let mut stream = self.flush(scope, false).await?;
        let mut results = Vec::new();
        while let Some(ev) = stream.next().await {
            match ev? {
                FlushEvent::Results(r) => results.extend(r),
                FlushEvent::Summary(s) => return Ok((results, s)),
            }
        }
        Err(ClientError::Protocol(
            "flush stream ended without summary".into(),
        ))
    }

    /// Cancels items; running ones are waited for.
    ///
    /// # Errors
    /// The daemon's status (`NOT_FOUND` for an unknown batch).
    pub async fn cancel(&self, scope: CancelScope) -> Result<v1::CancelResponse, ClientError> {
        let scope = match scope {
            CancelScope::Items(ids) => v1::cancel_request::Scope::Items(v1::ItemIds { ids }),
            CancelScope::Batch(b) => v1::cancel_request::Scope::BatchId(b),
        };
        let req = v1::CancelRequest { scope: Some(scope) };
        Ok(self
            .dispatch
            .clone()
            .cancel(self.req(req))
            .await?
            .into_inner())
    }

    /// Drains a workqueue (empty name = `default`).
    ///
    /// Postcondition on `Ok`: the workqueue had nothing pending or running.
    ///
    /// # Errors
    /// `NOT_FOUND` for an unknown workqueue; `DEADLINE_EXCEEDED` past the timeout.
    pub async fn drain(
        &self,
        workqueue: impl Into<String>,
    ) -> Result<v1::DrainResponse, ClientError> {
        let req = v1::DrainRequest {
            workqueue: workqueue.into(),
        };
        Ok(self
            .dispatch
            .clone()
            .drain(self.req(req))
            .await?
            .into_inner())
    }

    /// Looks up results by id; unknown and forgotten ids are reported per id.
    ///
    /// # Errors
    /// The daemon's status (`INVALID_ARGUMENT` for too many ids).
    pub async fn results(
        &self,
        item_ids: impl IntoIterator<Item = u64>,
    ) -> Result<v1::GetResultsResponse, ClientError> {
        let req = v1::GetResultsRequest {
            item_ids: item_ids.into_iter().collect(),
        };
        Ok(self
            .dispatch
            .clone()
            .get_results(self.req(req))
            .await?
            .into_inner())
    }

    /// Creates a workqueue.
    ///
    /// # Errors
    /// `ALREADY_EXISTS`, or `INVALID_ARGUMENT` for bad attributes.
    pub async fn create_workqueue(
        &self,
        attrs: v1::WorkqueueAttrs,
    ) -> Result<v1::WorkqueueAttrs, ClientError> {
        let req = v1::CreateWorkqueueRequest { attrs: Some(attrs) };
        let r = self
            .workqueues
            .clone()
            .create_workqueue(self.req(req))
            .await?;
        r.into_inner()
            .attrs
            .ok_or_else(|| ClientError::Protocol("CreateWorkqueueResponse without attrs".into()))
    }

    /// Lists workqueues (all, or only `name`).
    ///
    /// # Errors
    /// `NOT_FOUND` when `name` is given and absent.
    pub async fn list_workqueues(
        &self,
        name: Option<String>,
    ) -> Result<Vec<v1::WorkqueueInfo>, ClientError> {
        let req = v1::ListWorkqueuesRequest {
            name: name.unwrap_or_default(),
        };
        let r = self
            .workqueues
            .clone()
            .list_workqueues(self.req(req))
            .await?;
        Ok(r.into_inner().workqueues)
    }

    /// Changes the set fields of `update`.
    ///
    /// # Errors
    /// `NOT_FOUND`, or `INVALID_ARGUMENT` for bad values.
    pub async fn update_workqueue(
        &self,
        update: v1::UpdateWorkqueueRequest,
    ) -> Result<v1::WorkqueueAttrs, ClientError> {
        let r = self
            .workqueues
            .clone()
            .update_workqueue(self.req(update))
            .await?;
        r.into_inner()
            .attrs
            .ok_or_else(|| ClientError::Protocol("UpdateWorkqueueResponse without attrs".into()))
    }

    /// Drains (or with `cancel_pending`, cancels) then deletes a workqueue.
    ///
    /// # Errors
    /// `NOT_FOUND`; `FAILED_PRECONDITION` for `default`.
    pub async fn delete_workqueue(
        &self,
        name: impl Into<String>,
        cancel_pending: bool,
    ) -> Result<v1::DeleteWorkqueueResponse, ClientError> {
        let req = v1::DeleteWorkqueueRequest {
            name: name.into(),
            cancel_pending,
        };
        Ok(self
            .workqueues
            .clone()
            .delete_workqueue(self.req(req))
            .await?
            .into_inner())
    }

    /// The current topology snapshot.
    ///
    /// # Errors
    /// The daemon's status.
    pub async fn topology(&self) -> Result<v1::TopologySnapshot, ClientError> {
        let r = self
            .topology
            .clone()
            .get_topology(self.req(v1::GetTopologyRequest {}))
            .await?;
        r.into_inner()
            .snapshot
            .ok_or_else(|| ClientError::Protocol("GetTopologyResponse without snapshot".into()))
    }

    /// The current snapshot, then one per new epoch, until dropped.
    ///
    /// # Errors
    /// The daemon's status.
    pub async fn watch_topology(&self) -> Result<EventStream<v1::TopologySnapshot>, ClientError> {
        let s = self
            .topology
            .clone()
            .watch_topology(self.req(v1::WatchTopologyRequest {}))
            .await?
            .into_inner();
        Ok(Box::pin(s.map(|m| {
            m?.snapshot
                .ok_or_else(|| ClientError::Protocol("watch message without snapshot".into()))
        })))
    }

    /// The attached workers (`WorkerService.ListWorkers`).
    ///
    /// # Errors
    /// The daemon's status.
    pub async fn list_workers(&self) -> Result<Vec<v1::WorkerInfo>, ClientError> {
        Ok(self.list_workers_response().await?.workers)
    }

    /// `ListWorkers` whole: the workers, and the workers and items lost since the daemon
    /// started.
    pub async fn list_workers_response(&self) -> Result<v1::ListWorkersResponse, ClientError> {
        let r = self
            .workers
            .clone()
            .list_workers(self.req(v1::ListWorkersRequest {}))
            .await?;
        Ok(r.into_inner())
    }

    /// Opens a raw `WorkerService.Attach` session: `outbound` is what the worker sends, the
    /// returned stream what the daemon answers. Carries the token, never the client's
    /// timeout (a session lasts as long as the worker). [`crate::worker`] is the safe way to
    /// serve handlers; this is for tests and other protocol-level users.
    ///
    /// # Errors
    /// The daemon's status when the call itself is refused.
    pub async fn attach<S>(
        &self,
        outbound: S,
    ) -> Result<tonic::Streaming<v1::DaemonMessage>, ClientError>
    where
        S: Stream<Item = v1::WorkerMessage> + Send + 'static,
    {
        let r = self
            .workers
            .clone()
            .attach(self.req_without_deadline(outbound))
            .await?;
        Ok(r.into_inner())
    }

    /// Daemon-wide counters.
    ///
    /// # Errors
    /// The daemon's status.
    pub async fn stats(&self) -> Result<v1::GetStatsResponse, ClientError> {
        let r = self
            .stats
            .clone()
            .get_stats(self.req(v1::GetStatsRequest {}))
            .await?;
        Ok(r.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn missing_socket_is_a_connect_error_naming_the_path() {
        let dir = std::env::temp_dir().join(format!("wqd-client-test-{}", std::process::id()));
        let path = dir.join("absent.sock");
        let err = Client::connect(Endpoint::unix(&path)).await.unwrap_err();
        match &err {
            ClientError::Connect { addr, reason } => {
                assert_eq!(addr, &format!("unix:{}", path.display()));
                assert!(!reason.is_empty());
            }
            other => panic!("expected Connect, got {other:?}"),
        }
        assert_eq!(err.code(), tonic::Code::Unavailable);
    }
}
