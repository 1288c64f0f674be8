//! `[limits]`, what one request may carry ([`Limits`], shared and swapped whole on reload as
//! [`SharedLimits`]), and the one place a request refused by tonic itself gets wqd's status:
//! tonic rejects a unary request over `limits.max_message_bytes` with `OUT_OF_RANGE`, and one
//! whose body ends inside a message or whose compressed flag is invalid with `INTERNAL`,
//! before any handler sees it, as a trailers-only response. [`TooLargeLayer`] rewrites exactly
//! those responses: `RESOURCE_EXHAUSTED` naming the limit, and `INVALID_ARGUMENT` for the
//! malformed framing (a client error, not a daemon bug), as [`super::status`] does for the
//! streaming path.
//!
//! Owns: the `[limits]` section and its pure check, and those rewrites. Invariants: limits
//! that [`Limits::check`] accepted are all non-zero and the engine's clock can hold now plus
//! the longest duration; a request sees one version of the limits throughout
//! ([`SharedLimits::load`]); only a trailers-only response whose status is one of those two
//! tonic refusals is touched, and only its `grpc-status`/`grpc-message` headers; bodies and
//! every other response pass through unchanged.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use serde::Deserialize;

use tonic::codegen::http;
use tonic::Status;

use crate::settings::{de_duration, invalid, Invalid};

/// `[limits]`: what one request may carry. Every refusal names the limit.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest gRPC message decoded or encoded, in bytes.
    pub max_message_bytes: usize,
    /// Items in one batch (Submit or the whole of a SubmitStream), and ids in one GetResults.
    pub max_batch_items: usize,
    /// Payload bytes of one item.
    pub max_payload_bytes: usize,
    /// Default `max_queued` of every workqueue (items not yet terminal).
    pub max_queued: usize,
    /// Longest `delay` an item may ask for.
    #[serde(deserialize_with = "de_duration")]
    pub max_delay: Duration,
    /// Longest `deadline` an item may ask for.
    #[serde(deserialize_with = "de_duration")]
    pub max_deadline: Duration,
    /// Bytes of one result's output, and of its error text, kept at most (longer ones are
    /// cut, saying so). Restart-only.
    pub max_result_bytes: usize,
    /// Memory one request may make the daemon hold while it decodes and checks it, estimated
    /// from its item count and size before it is decoded (see docs/status-codes.md).
    pub max_request_memory: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: 64 << 20,
            max_batch_items: 1 << 22,
            max_payload_bytes: 1 << 20,
            max_queued: 1 << 22,
            max_delay: Duration::from_secs(365 * 86_400),
            max_deadline: Duration::from_secs(365 * 86_400),
            max_result_bytes: 64 << 10,
            max_request_memory: 512 << 20,
        }
    }
}

impl Limits {
    /// Checks what the types cannot. Pure.
    ///
    /// # Errors
    /// The first [`Invalid`] found, naming its `limits.` key.
    pub fn check(&self) -> Result<(), Invalid> {
        for (key, v) in [
            ("limits.max_message_bytes", self.max_message_bytes),
            ("limits.max_batch_items", self.max_batch_items),
            ("limits.max_queued", self.max_queued),
            ("limits.max_result_bytes", self.max_result_bytes),
            ("limits.max_request_memory", self.max_request_memory),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        // The engine's clock must be able to hold now + the longest duration; a century is
        // far past any use and far inside what `Instant` holds.
        const CENTURY: Duration = Duration::from_secs(100 * 365 * 86_400);
        for (key, v) in [
            ("limits.max_delay", self.max_delay),
            ("limits.max_deadline", self.max_deadline),
        ] {
            if v > CENTURY {
                return Err(invalid(
                    key,
                    format!(
                        "{} is too long (at most 100 years)",
                        humantime::format_duration(v)
                    ),
                ));
            }
        }
        if self.max_message_bytes < 1024 {
            return Err(invalid(
                "limits.max_message_bytes",
                format!("{} is too small (at least 1024)", self.max_message_bytes),
            ));
        }
        Ok(())
    }
}

/// The limits in force, shared by the RPC layer and swapped whole by a SIGHUP reload. Readers
/// take a snapshot with [`load`](Self::load) (lock-free); a request sees one version throughout.
#[derive(Clone, Default)]
pub struct SharedLimits(Arc<arc_swap::ArcSwap<Limits>>);

impl SharedLimits {
    pub fn new(l: Limits) -> Self {
        Self(Arc::new(arc_swap::ArcSwap::from_pointee(l)))
    }

    /// The limits in force now.
    pub fn load(&self) -> Arc<Limits> {
        self.0.load_full()
    }

    /// Replaces the limits; requests already past their checks keep the old ones.
    pub fn store(&self, l: Limits) {
        self.0.store(Arc::new(l));
    }
}

impl std::fmt::Debug for SharedLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.load().fmt(f)
    }
}

impl From<Limits> for SharedLimits {
    fn from(l: Limits) -> Self {
        Self::new(l)
    }
}

/// Wraps every route; see the module docs.
#[derive(Debug, Clone, Copy, Default)]
pub struct TooLargeLayer;

impl<S> tower::Layer<S> for TooLargeLayer {
    type Service = TooLarge<S>;
    fn layer(&self, inner: S) -> TooLarge<S> {
        TooLarge { inner }
    }
}

/// The service of [`TooLargeLayer`].
#[derive(Debug, Clone)]
pub struct TooLarge<S> {
    inner: S,
}

impl<S, ReqB, ResB> tower::Service<http::Request<ReqB>> for TooLarge<S>
where
    S: tower::Service<http::Request<ReqB>, Response = http::Response<ResB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqB>) -> Self::Future {
        let fut = self.inner.call(req);
        Box::pin(async move {
            let mut res = fut.await?;
            rewrite(res.headers_mut());
            Ok(res)
        })
    }
}

/// Rewrites a trailers-only "too large" status in `h`, if that is what `h` holds.
fn rewrite(h: &mut http::HeaderMap) {
    // Cheap test first: nearly every response has grpc-status only in its trailers.
    let code = h.get("grpc-status").map(http::HeaderValue::as_bytes);
    if code != Some(b"11") && code != Some(b"13") {
        return;
    }
    let Some(st) = Status::from_header_map(h) else {
        return;
    };
    let Some(ours) = super::too_large(&st).or_else(|| super::bad_framing(&st)) else {
        return;
    };
    h.remove("grpc-status");
    h.remove("grpc-message");
    h.remove("grpc-status-details-bin");
    if let Err(e) = ours.add_header(h) {
        tracing::warn!(error = %e, "could not rewrite a too-large status");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn only_tonic_size_refusals_are_rewritten() {
        let tonic_says = Status::out_of_range(
            "Error, decoded message length too large: found 70000 bytes, the limit is: 4096 bytes",
        );
        let mut r: http::Response<()> = tonic_says.into_http();
        rewrite(r.headers_mut());
        let st = Status::from_header_map(r.headers()).unwrap();
        assert_eq!(st.code(), Code::ResourceExhausted);
        assert!(
            st.message().contains("found 70000 bytes"),
            "{}",
            st.message()
        );
        assert!(
            st.message().contains("limits.max_message_bytes"),
            "{}",
            st.message()
        );

        // A unary body without a whole message is the client's malformed request.
        let mut r: http::Response<()> = Status::internal("Missing request message.").into_http();
        rewrite(r.headers_mut());
        let st = Status::from_header_map(r.headers()).unwrap();
        assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");
        assert!(st
            .message()
            .starts_with("malformed request: the body ended"));

        // Another OUT_OF_RANGE, and any other status, stay as they are.
        for other in [
            Status::out_of_range("offset past the end"),
            Status::not_found("x"),
        ] {
            let mut r: http::Response<()> = other.clone().into_http();
            rewrite(r.headers_mut());
            let st = Status::from_header_map(r.headers()).unwrap();
            assert_eq!((st.code(), st.message()), (other.code(), other.message()));
        }
    }
}
