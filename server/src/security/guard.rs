//! The tower guard in front of both listeners: [`GuardLayer`]/[`Guard`] admit or refuse each
//! request by the [`Policy`] before any service sees it, and log the calls that pass; the
//! listeners' servers are built with it by [`Security::unix_server`] and
//! [`Security::tcp_server`].
//!
//! Owns: the guarded server type and the request-side reading of who the peer is (Unix
//! credentials from the connection's `ConnInfo<UnixPeer>`; TCP client certificate and
//! `authorization` header). Invariant: a refused request is answered with the refusal status
//! without calling the inner service, so nothing is queued, changed, cancelled or run.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use sha2::{Digest, Sha256};
use tonic::codegen::http;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::transport::Server;
use tonic::Status;
use tower::layer::util::{Identity as NoLayer, Stack};
use tower::{Layer, Service};

use super::policy::{classify, Class, Policy};
use super::resolve::error_chain;
use super::{Security, SecurityError, UnixPeer};
use crate::conn::ConnInfo;

/// The servers of both listeners: tonic's, with the [`GuardLayer`] in front of every route
/// (inside whatever layers `L` the caller put first, such as the RPC metrics layer).
pub type GuardedServer<L = NoLayer> = Server<Stack<GuardLayer, L>>;

impl Security {
    /// The Unix listener's server: `base` (e.g. `Server::builder()` with outer layers) with
    /// the guard checking peer credentials.
    pub fn unix_server<L>(&self, base: Server<L>) -> GuardedServer<L> {
        base.layer(GuardLayer {
            policy: self.policy.clone(),
            door: Door::Unix,
        })
    }

    /// The TCP listener's server: TLS when configured (its handshake bounded by
    /// `handshake_timeout`, `listen.handshake_timeout`), the guard checking the client
    /// certificate and the bearer token.
    ///
    /// # Errors
    /// [`SecurityError::Tls`] if the acceptor cannot be built (it was built at load already).
    pub fn tcp_server<L>(
        &self,
        base: Server<L>,
        handshake_timeout: std::time::Duration,
    ) -> Result<GuardedServer<L>, SecurityError> {
        let mut s = base;
        if let Some(t) = &self.tls {
            s = s
                .tls_config(t.clone().timeout(handshake_timeout))
                .map_err(|e| SecurityError::Tls(error_chain(&e)))?;
        }
        Ok(s.layer(GuardLayer {
            policy: self.policy.clone(),
            door: Door::Tcp,
        }))
    }
}

/// Which listener a guard stands in front of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Door {
    Unix,
    Tcp,
}

/// The tower layer putting a [`Guard`] in front of every route of a listener.
#[derive(Debug, Clone)]
pub struct GuardLayer {
    policy: Arc<Policy>,
    door: Door,
}

impl<S> Layer<S> for GuardLayer {
    type Service = Guard<S>;
    fn layer(&self, inner: S) -> Guard<S> {
        Guard {
            inner,
            policy: self.policy.clone(),
            door: self.door,
        }
    }
}

/// Admits a request (and logs mutating calls with the peer), or answers it with the refusal
/// status without calling the inner service.
#[derive(Debug, Clone)]
pub struct Guard<S> {
    inner: S,
    policy: Arc<Policy>,
    door: Door,
}

/// The guard's future: the inner service's, or a ready refusal.
pub type GuardFuture<R, E> = Pin<Box<dyn Future<Output = Result<R, E>> + Send>>;

impl<S> Guard<S> {
    #[allow(clippy::result_large_err)]
    fn admit<B>(&self, req: &http::Request<B>) -> Result<(), Status> {
        let method = req.uri().path();
        let class = classify(method);
        match self.door {
            Door::Unix => {
                let peer = req
                    .extensions()
                    .get::<ConnInfo<UnixPeer>>()
                    .and_then(|c| c.peer.0.as_deref());
                let r = self.policy.check_unix(peer, class, method);
                let (uid, gid, pid) = match peer {
                    Some(p) => (Some(p.uid), Some(p.gid), p.pid),
                    None => (None, None, None),
                };
                match (&r, class) {
                    (Err(st), _) => tracing::warn!(
                        method, door = "unix", uid, gid, pid, code = ?st.code(), "refused"
                    ),
                    (Ok(()), Class::Mutating) => {
                        tracing::info!(method, door = "unix", uid, gid, pid, "mutating call")
                    }
                    (Ok(()), _) => tracing::debug!(method, door = "unix", uid, gid, pid, "call"),
                }
                r
            }
            Door::Tcp => {
                let ext = req.extensions();
                let (addr, certs): (Option<SocketAddr>, _) =
                    if let Some(t) = ext.get::<TlsConnectInfo<ConnInfo<TcpConnectInfo>>>() {
                        (t.get_ref().peer.remote_addr(), t.peer_certs())
                    } else {
                        (
                            ext.get::<ConnInfo<TcpConnectInfo>>()
                                .and_then(|t| t.peer.remote_addr()),
                            None,
                        )
                    };
                let cert = certs
                    .as_ref()
                    .and_then(|c| c.first())
                    .map(|c| hex::encode(&Sha256::digest(c.as_ref())[..8]));
                let r = self.policy.check_tcp(
                    cert.is_some(),
                    req.headers().get(http::header::AUTHORIZATION),
                    method,
                );
                let peer = addr.map(|a| a.to_string());
                match (&r, class) {
                    (Err(st), _) => tracing::warn!(
                        method, door = "tcp", peer, cert, code = ?st.code(), "refused"
                    ),
                    (Ok(()), Class::Mutating) => {
                        tracing::info!(method, door = "tcp", peer, cert, "mutating call")
                    }
                    (Ok(()), _) => tracing::debug!(method, door = "tcp", peer, cert, "call"),
                }
                r
            }
        }
    }
}

impl<S, B, R> Service<http::Request<B>> for Guard<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    R: Default + Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = GuardFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        match self.admit(&req) {
            Ok(()) => Box::pin(self.inner.call(req)),
            Err(st) => Box::pin(std::future::ready(Ok(st.into_http()))),
        }
    }
}
