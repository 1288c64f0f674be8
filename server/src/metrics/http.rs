//! The scrape endpoint: a minimal HTTP/1.1 listener answering `GET /metrics` with the
//! Prometheus text format, plus the histogram upkeep tick.
//!
//! Owns the metrics TCP listener and its task. One request per connection (`Connection:
//! close`), a bounded request head read with a timeout, at most [`MAX_CONNECTIONS`] at once;
//! anything but `GET`/`HEAD` of `/metrics` gets 404 or 405. Invariant: the task ends when the
//! daemon's `stopping` flips, taking its connection tasks with it (a refresh already running
//! on the blocking pool finishes on its own), and nothing it does holds the engine lock longer
//! than one stats copy.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

use super::{Metrics, MetricsError, UPKEEP};
use wqd_core::engine::Engine;
use wqd_core::live::LiveView;

/// Scrape connections served at once; more wait in the accept queue.
pub const MAX_CONNECTIONS: usize = 8;
/// A client has this long to send its request head.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Request heads larger than this are refused.
const MAX_HEAD: usize = 8 * 1024;

/// A running scrape endpoint.
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl MetricsServer {
    /// Binds `addr` and serves until `stopping` says the daemon stops. The address check
    /// (loopback unless allowed) is `MetricsConfig::check`'s, done with the rest of the config.
    ///
    /// # Errors
    /// [`MetricsError::Listen`] when `addr` cannot be bound.
    pub async fn start(
        metrics: Arc<Metrics>,
        addr: SocketAddr,
        engine: Arc<Engine>,
        view: Arc<LiveView>,
        stopping: watch::Receiver<bool>,
    ) -> Result<MetricsServer, MetricsError> {
        let err = |source| MetricsError::Listen { addr, source };
        let l = TcpListener::bind(addr).await.map_err(err)?;
        let local = l.local_addr().map_err(err)?;
        let task = tokio::spawn(accept_loop(l, metrics, engine, view, stopping));
        tracing::info!(addr = %local, "serving metrics on /metrics");
        Ok(MetricsServer { addr: local, task })
    }

    /// The address served (with the real port when 0 was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The serving task; it ends once the daemon is stopping.
    pub fn into_task(self) -> JoinHandle<()> {
        self.task
    }
}

async fn accept_loop(
    l: TcpListener,
    metrics: Arc<Metrics>,
    engine: Arc<Engine>,
    view: Arc<LiveView>,
    stopping: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    // Dropped (aborting every connection task) when the loop returns.
    let mut conns = tokio::task::JoinSet::new();
    let stop = crate::shared::stopped(stopping);
    tokio::pin!(stop);
    let mut upkeep = tokio::time::interval(UPKEEP);
    upkeep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        while conns.try_join_next().is_some() {}
        tokio::select! {
            _ = &mut stop => return,
            _ = upkeep.tick() => metrics.upkeep(),
            r = l.accept() => match r {
                Ok((conn, peer)) => {
                    let Ok(permit) = slots.clone().acquire_owned().await else { return };
                    let (m, e, v) = (metrics.clone(), engine.clone(), view.clone());
                    conns.spawn(async move {
                        if let Err(err) = serve_one(conn, m, e, v).await {
                            tracing::debug!(%peer, error = %err, "metrics connection failed");
                        }
                        drop(permit);
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

/// Reads the request head: up to the blank line, [`MAX_HEAD`] bytes, [`READ_TIMEOUT`].
async fn read_head(conn: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    let read = async {
        loop {
            let n = conn.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
                return Ok(());
            }
            if buf.len() > MAX_HEAD {
                return Err(std::io::Error::other("request head too large"));
            }
        }
    };
    match tokio::time::timeout(READ_TIMEOUT, read).await {
        Ok(r) => r.map(|()| buf),
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "request head not received in time",
        )),
    }
}

async fn serve_one(
    mut conn: TcpStream,
    metrics: Arc<Metrics>,
    engine: Arc<Engine>,
    view: Arc<LiveView>,
) -> std::io::Result<()> {
    let head = read_head(&mut conn).await?;
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut words = line.split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => {
            let text = tokio::task::spawn_blocking(move || metrics.scrape(&engine, &view))
                .await
                .map_err(|e| std::io::Error::other(format!("scrape failed: {e}")))?;
            ("200 OK", text)
        }
        ("GET" | "HEAD", _) => (
            "404 Not Found",
            "not found; metrics are at /metrics\n".into(),
        ),
        _ => (
            "405 Method Not Allowed",
            "only GET and HEAD are served\n".into(),
        ),
    };
    let ctype = if status.starts_with("200") {
        "text/plain; version=0.0.4; charset=utf-8"
    } else {
        "text/plain; charset=utf-8"
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if method != "HEAD" {
        out.extend_from_slice(body.as_bytes());
    }
    conn.write_all(&out).await?;
    conn.shutdown().await
}
