//! The one place a request refused by tonic itself gets wqd's status: tonic rejects a unary
//! request over `limits.max_message_bytes` with `OUT_OF_RANGE`, and one whose body ends
//! inside a message or whose compressed flag is invalid with `INTERNAL`, before any handler
//! sees it, as a trailers-only response. [`TooLargeLayer`] rewrites exactly those responses:
//! `RESOURCE_EXHAUSTED` naming the limit, and `INVALID_ARGUMENT` for the malformed framing
//! (a client error, not a daemon bug), as [`super::status`] does for the streaming path.
//!
//! Owns: nothing but those rewrites. Invariant: only a trailers-only response whose status is
//! one of those two tonic refusals is touched, and only its `grpc-status`/`grpc-message`
//! headers; bodies and every other response pass through unchanged.

use std::task::{Context, Poll};

use tonic::codegen::http;
use tonic::Status;

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
