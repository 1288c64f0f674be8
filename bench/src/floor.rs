//! The transport floor of the gRPC benchmarks: a benchmark-only `wqd.v1.DispatchService`
//! whose `Submit` (and each request of a `Session`) only decodes the batch and acknowledges it, served exactly as the daemon
//! serves its own service (kept out of the production service; run by the
//! `wqd-bench-floor` binary as a separate process, like `wqd`).
//!
//! What it does per `Submit`: tonic decodes the whole `SubmitRequest` (every `WorkItem`, its
//! strings and args map) as it does for the daemon; the floor then hands out one id per
//! item from an atomic counter and returns one `ItemReceipt` per item, ignoring `wait` (no
//! results: nothing ran). No validation, no engine, no `spawn_blocking`. Every other RPC of
//! the service answers UNIMPLEMENTED. `grpc.health.v1` is served too (readiness).
//!
//! How it is served, and why: the same tonic version, a multi-thread runtime with 2 workers
//! (as `wqd`'s), the daemon's message size limits, and the same listener plumbing as
//! `wqd::daemon` (`serve_with_incoming_shutdown` over `UnixListenerStream` /
//! `TcpListenerStream`), so the floor pays every transport cost the daemon pays and the
//! ratio isolates what the daemon adds. `--nodelay` sets `TCP_NODELAY` on accepted TCP
//! sockets (the daemon's plumbing does not: tonic ignores `tcp_nodelay` with
//! `serve_with_incoming`); it exists to measure what that costs.

use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use wqd_proto::v1;

type Out<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The decode-and-acknowledge service.
#[derive(Debug, Default)]
pub struct Floor {
    ids: std::sync::Arc<Ids>,
}

/// The ids the floor hands out.
#[derive(Debug, Default)]
struct Ids {
    next: AtomicU64,
    batches: AtomicU64,
}

impl Ids {
    /// One receipt per item (none when the request asks for none, as wqd does), ids from the
    /// counter; `wait` ignored.
    fn ack(&self, r: v1::SubmitRequest) -> v1::SubmitResponse {
        let n = r.items.len() as u64;
        let first = self.next.fetch_add(n, Ordering::Relaxed) + 1;
        let batch_id = self.batches.fetch_add(1, Ordering::Relaxed) + 1;
        let each = r.receipts() != v1::ReceiptsMode::None;
        v1::SubmitResponse {
            batch_id,
            items: (first..first + if each { n } else { 0 })
                .map(|id| v1::ItemReceipt {
                    item_id: id,
                    queued: true,
                    duplicate_of: 0,
                    ..Default::default()
                })
                .collect(),
            results: Vec::new(),
            counts: None,
            first_item_id: first,
            item_count: n,
            queued_count: n,
            duplicates: Vec::new(),
        }
    }
}

fn unimplemented<T>(what: &str) -> Result<T, Status> {
    Err(Status::unimplemented(format!(
        "{what}: the benchmark floor only acknowledges Submit"
    )))
}

#[tonic::async_trait]
impl v1::dispatch_service_server::DispatchService for Floor {
    async fn submit(
        &self,
        req: Request<v1::SubmitRequest>,
    ) -> Result<Response<v1::SubmitResponse>, Status> {
        Ok(Response::new(self.ids.ack(req.into_inner())))
    }

    type SessionStream = Out<v1::SessionResponse>;

    /// Each request acknowledged as `Submit` is, in order, on the response stream's poll (as
    /// the daemon's session runs).
    async fn session(
        &self,
        req: Request<Streaming<v1::SessionRequest>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let ids = self.ids.clone();
        Ok(Response::new(Box::pin(req.into_inner().map(move |m| {
            m.map(|r| v1::SessionResponse {
                tag: r.tag,
                outcome: Some(v1::session_response::Outcome::Submitted(
                    ids.ack(r.submit.unwrap_or_default()),
                )),
            })
        }))))
    }

    async fn submit_stream(
        &self,
        _req: Request<Streaming<v1::SubmitStreamRequest>>,
    ) -> Result<Response<v1::SubmitStreamResponse>, Status> {
        unimplemented("SubmitStream")
    }

    type FlushStream = Out<v1::FlushResponse>;

    async fn flush(
        &self,
        _req: Request<v1::FlushRequest>,
    ) -> Result<Response<Self::FlushStream>, Status> {
        unimplemented("Flush")
    }

    async fn cancel(
        &self,
        _req: Request<v1::CancelRequest>,
    ) -> Result<Response<v1::CancelResponse>, Status> {
        unimplemented("Cancel")
    }

    async fn drain(
        &self,
        _req: Request<v1::DrainRequest>,
    ) -> Result<Response<v1::DrainResponse>, Status> {
        unimplemented("Drain")
    }

    async fn get_results(
        &self,
        _req: Request<v1::GetResultsRequest>,
    ) -> Result<Response<v1::GetResultsResponse>, Status> {
        unimplemented("GetResults")
    }
}

/// The floor's router: the floor service with the daemon's default message limits, and health.
fn router(
    floor: std::sync::Arc<Floor>,
    health: tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService>,
) -> tonic::transport::server::Router {
    use v1::dispatch_service_server::DispatchServiceServer;
    let max = wqd::config::Limits::default().max_message_bytes;
    tonic::transport::Server::builder()
        .add_service(
            DispatchServiceServer::from_arc(floor)
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(health)
}

/// Serves the floor on the Unix socket `socket` and TCP `tcp` until SIGTERM/SIGINT; `ready`
/// gets the bound TCP address. Must run inside a tokio runtime.
///
/// # Errors
/// Binding or serving errors.
pub async fn serve(
    socket: &Path,
    tcp: SocketAddr,
    nodelay: bool,
    ready: impl FnOnce(SocketAddr),
) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let floor = std::sync::Arc::new(Floor::default());
    // "" is SERVING from the start; the reporter lives as long as the servers.
    let reporter = tonic_health::server::HealthReporter::new();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let health = tonic_health::pb::health_server::HealthServer::new(
        tonic_health::server::HealthService::from_health_reporter(reporter.clone()),
    );
    let unix = tokio::net::UnixListener::bind(socket)?;
    let tcp = tokio::net::TcpListener::bind(tcp).await?;
    let local = tcp.local_addr()?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let u = tokio::spawn(
        router(floor.clone(), health.clone())
            .serve_with_incoming_shutdown(UnixListenerStream::new(unix), stopped(stop_rx.clone())),
    );
    let incoming = TcpListenerStream::new(tcp).map(move |s| {
        if nodelay {
            if let Ok(s) = &s {
                let _ = s.set_nodelay(true);
            }
        }
        s
    });
    let t = tokio::spawn(
        router(floor, health).serve_with_incoming_shutdown(incoming, stopped(stop_rx.clone())),
    );
    ready(local);
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    let _ = stop_tx.send(true);
    for h in [u, t] {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(3), h).await;
    }
    let _ = std::fs::remove_file(socket);
    Ok(())
}
