//! A tower layer counting every gRPC call by method and final status code, and timing it.
//!
//! Owns [`RpcMetrics`]: the known methods (read from the served descriptor sets, so the label
//! stays bounded: any other path counts as `unknown`) and their cached handles. The final
//! status is where gRPC puts it: in the response headers for a trailers-only response (an
//! error returned before any message), else in the trailers at the end of the body (unary
//! successes and every stream). Invariant: each call is counted exactly once, when its status
//! is known: headers, trailers, or, when the body ends without trailers or is dropped first
//! (the client went away), as `UNKNOWN` or `CANCELLED`.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use ::metrics::{Counter, Histogram};
use http_body::{Body, Frame, SizeHint};
use prost::Message;

use super::{names, Registry};

/// gRPC status code names, indexed by code number (as in the gRPC spec and docs/status-codes.md).
pub const CODE_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];
const CANCELLED: usize = 1;
const UNKNOWN: usize = 2;

/// Reflection paths (their descriptors are not in the sets below).
const REFLECTION: [&str; 2] = [
    "grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// Handles of one method label value, registered on first use (so an idle daemon does not
/// render a zero histogram per method).
struct MethodHandles {
    label: String,
    duration: OnceLock<Histogram>,
    codes: [OnceLock<Counter>; 17],
}

impl MethodHandles {
    fn new(label: &str) -> MethodHandles {
        MethodHandles {
            label: label.to_string(),
            duration: OnceLock::new(),
            codes: std::array::from_fn(|_| OnceLock::new()),
        }
    }
}

/// See the module docs.
pub struct RpcMetrics {
    reg: Arc<Registry>,
    /// Immutable after construction: `/pkg.Service/Method` → handles.
    methods: HashMap<String, Arc<MethodHandles>>,
    unknown: Arc<MethodHandles>,
}

impl std::fmt::Debug for RpcMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcMetrics")
            .field("methods", &self.methods.len())
            .finish()
    }
}

/// `pkg.Service/Method` of every method in an encoded descriptor set.
fn methods_of(encoded: &[u8]) -> Vec<String> {
    let Ok(set) = prost_types::FileDescriptorSet::decode(encoded) else {
        tracing::error!("a served descriptor set does not decode; its RPCs count as unknown");
        return Vec::new();
    };
    let mut out = Vec::new();
    for f in &set.file {
        let pkg = f.package();
        for s in &f.service {
            for m in &s.method {
                out.push(format!("{pkg}.{}/{}", s.name(), m.name()));
            }
        }
    }
    out
}

impl RpcMetrics {
    pub(crate) fn new(reg: Arc<Registry>) -> RpcMetrics {
        let mut methods = HashMap::new();
        let all = methods_of(wqd_proto::FILE_DESCRIPTOR_SET)
            .into_iter()
            .chain(methods_of(tonic_health::pb::FILE_DESCRIPTOR_SET))
            .chain(REFLECTION.iter().map(|s| s.to_string()));
        for m in all {
            let h = Arc::new(MethodHandles::new(&m));
            methods.insert(format!("/{m}"), h);
        }
        RpcMetrics {
            unknown: Arc::new(MethodHandles::new("unknown")),
            methods,
            reg,
        }
    }

    fn method(&self, path: &str) -> Arc<MethodHandles> {
        self.methods.get(path).unwrap_or(&self.unknown).clone()
    }

    fn count(&self, m: &MethodHandles, code: usize, began: Instant) {
        let code = code.min(CODE_NAMES.len() - 1);
        m.codes[code]
            .get_or_init(|| {
                self.reg.counter(
                    names::RPC_HANDLED,
                    &[
                        ("method", m.label.clone()),
                        ("code", CODE_NAMES[code].to_string()),
                    ],
                )
            })
            .increment(1);
        m.duration
            .get_or_init(|| {
                self.reg
                    .histogram(names::RPC_DURATION, &[("method", m.label.clone())])
            })
            .record(began.elapsed().as_secs_f64());
    }
}

/// The `grpc-status` of a header map, if any (an unparsable value is UNKNOWN).
fn status_of(h: &http::HeaderMap) -> Option<usize> {
    let v = h.get("grpc-status")?;
    Some(
        v.to_str()
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
            .filter(|c| *c < CODE_NAMES.len())
            .unwrap_or(UNKNOWN),
    )
}

/// The layer; `None` inside makes it a pass-through (no metrics configured).
#[derive(Debug, Clone, Default)]
pub struct RpcMetricsLayer {
    m: Option<Arc<RpcMetrics>>,
}

impl RpcMetricsLayer {
    pub fn new(m: Option<Arc<RpcMetrics>>) -> Self {
        Self { m }
    }
}

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetricsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RpcMetricsService {
            inner,
            m: self.m.clone(),
        }
    }
}

/// The service of [`RpcMetricsLayer`].
#[derive(Debug, Clone)]
pub struct RpcMetricsService<S> {
    inner: S,
    m: Option<Arc<RpcMetrics>>,
}

/// The part of a call still to be counted; counts on drop unless told otherwise.
struct Pending {
    m: Arc<RpcMetrics>,
    method: Arc<MethodHandles>,
    began: Instant,
}

impl Pending {
    fn finish(self, code: usize) {
        self.m.count(&self.method, code, self.began);
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, ReqB, ResB> tower::Service<http::Request<ReqB>> for RpcMetricsService<S>
where
    S: tower::Service<http::Request<ReqB>, Response = http::Response<ResB>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResB: Body + Send + 'static,
{
    type Response = http::Response<CountedBody<ResB>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqB>) -> Self::Future {
        let pending = self.m.as_ref().map(|m| Pending {
            method: m.method(req.uri().path()),
            m: m.clone(),
            began: Instant::now(),
        });
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = fut.await;
            let Some(p) = pending else {
                return res.map(|r| r.map(|b| CountedBody::new(b, None)));
            };
            match res {
                Ok(r) => {
                    let (parts, body) = r.into_parts();
                    let rest = match status_of(&parts.headers) {
                        // Trailers-only: the status is final now.
                        Some(code) => {
                            p.finish(code);
                            None
                        }
                        None => Some(p),
                    };
                    Ok(http::Response::from_parts(
                        parts,
                        CountedBody::new(body, rest),
                    ))
                }
                Err(e) => {
                    p.finish(UNKNOWN);
                    Err(e)
                }
            }
        })
    }
}

pin_project_lite::pin_project! {
    /// A response body that counts its call when the trailers carry the status, or when it
    /// ends or is dropped without them.
    pub struct CountedBody<B> {
        #[pin]
        inner: B,
        pending: Option<Pending>,
    }

    impl<B> PinnedDrop for CountedBody<B> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(p) = this.project().pending.take() {
                p.finish(CANCELLED);
            }
        }
    }
}

impl<B> CountedBody<B> {
    fn new(inner: B, pending: Option<Pending>) -> Self {
        Self { inner, pending }
    }
}

impl<B: Body> Body for CountedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let r = this.inner.poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(code) = f.trailers_ref().and_then(status_of) {
                    if let Some(p) = this.pending.take() {
                        p.finish(code);
                    }
                }
            }
            Poll::Ready(Some(Err(_))) | Poll::Ready(None) => {
                if let Some(p) = this.pending.take() {
                    p.finish(UNKNOWN);
                }
            }
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_served_method_is_known() {
        let m = super::super::Metrics::new().unwrap();
        let r = &m.rpc;
        for p in [
            "/wqd.v1.DispatchService/Submit",
            "/wqd.v1.DispatchService/Flush",
            "/wqd.v1.StatsService/GetStats",
            "/wqd.v1.TopologyService/WatchTopology",
            "/grpc.health.v1.Health/Check",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        ] {
            assert_eq!(r.method(p).label, &p[1..], "{p}");
        }
        assert_eq!(r.method("/evil/{}\"label").label, "unknown");
    }

    #[test]
    fn status_header_values() {
        let mut h = http::HeaderMap::new();
        assert_eq!(status_of(&h), None);
        h.insert("grpc-status", http::HeaderValue::from_static("5"));
        assert_eq!(status_of(&h), Some(5));
        h.insert("grpc-status", http::HeaderValue::from_static("99"));
        assert_eq!(status_of(&h), Some(UNKNOWN));
    }
}
