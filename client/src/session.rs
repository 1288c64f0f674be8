//! [`Session`]: many batches over one `DispatchService.Session` stream, each answered by tag.
//!
//! For a caller that submits small batches often (one item at a time, say): after the first
//! request, each batch costs one HTTP/2 DATA frame each way instead of a new stream with its
//! headers and trailers. Invariant: tags are handed out in sending order from 1 and each
//! answer names its request's tag, so a caller with several requests open can match them;
//! a refused request is an answer ([`SessionAnswer::outcome`] holds the daemon's status) and
//! the session goes on.

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use wqd_proto::v1;

use crate::error::ClientError;
use crate::item::Batch;

/// Requests buffered in the client before the stream takes them.
const SEND_BUFFER: usize = 16;

/// One answer of a session.
#[derive(Debug)]
pub struct SessionAnswer {
    /// The tag [`Session::send`] returned for the request.
    pub tag: u64,
    /// What `Submit` would have returned: its response, or its status.
    pub outcome: Result<v1::SubmitResponse, ClientError>,
    /// With an error outcome: the batch's id when it was queued all the same (its wait limit
    /// passed, `DEADLINE_EXCEEDED`; its results were over the daemon's message limit,
    /// `RESOURCE_EXHAUSTED`). Its work goes on: flush it, or fetch its results, by this id.
    pub queued_batch: Option<u64>,
}

/// An open session (see the module docs). Dropping it ends the session; work already
/// accepted goes on.
pub struct Session {
    tx: Option<mpsc::Sender<v1::SessionRequest>>,
    rx: Streaming<v1::SessionResponse>,
    next_tag: u64,
    /// Requests sent and not yet answered.
    open: usize,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("next_tag", &self.next_tag)
            .field("open", &self.open)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// Opens a session with `stub`; `req` wraps the request stream (metadata, deadline).
    pub(crate) async fn start(
        mut stub: v1::dispatch_service_client::DispatchServiceClient<tonic::transport::Channel>,
        req: impl FnOnce(
            ReceiverStream<v1::SessionRequest>,
        ) -> tonic::Request<ReceiverStream<v1::SessionRequest>>,
    ) -> Result<Session, ClientError> {
        let (tx, out) = mpsc::channel(SEND_BUFFER);
        let rx = stub
            .session(req(ReceiverStream::new(out)))
            .await?
            .into_inner();
        Ok(Session {
            tx: Some(tx),
            rx,
            next_tag: 1,
            open: 0,
        })
    }

    /// Sends one batch; returns its tag. Waits while the stream's buffer is full: the daemon
    /// reads at most 64 requests ahead of its answers, and the answers wait for
    /// [`Session::next`]. A caller that sends many waiting batches before reading any can
    /// therefore wait here until its deadline: keep [`Session::open`] bounded (say, under 64)
    /// by reading answers as it goes.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` for an empty batch, or after [`Session::close`]; `UNAVAILABLE`
    /// when the session has ended (read [`Session::next`] for its status).
    pub async fn send(&mut self, batch: Batch) -> Result<u64, ClientError> {
        self.send_request(batch, None).await
    }

    /// As [`Session::send`], for a waiting batch whose wait ends after `limit`: past it the
    /// answer is `DEADLINE_EXCEEDED` with [`SessionAnswer::queued_batch`] set (the work goes
    /// on), and the request no longer counts against the daemon's 64 open requests. The
    /// session itself goes on.
    ///
    /// # Errors
    /// As [`Session::send`], and `INVALID_ARGUMENT` for a batch that does not wait.
    pub async fn send_with_wait_limit(
        &mut self,
        batch: Batch,
        limit: std::time::Duration,
    ) -> Result<u64, ClientError> {
        if !batch.waits() {
            return Err(ClientError::InvalidRequest(
                "a wait limit needs a batch that waits (Batch::wait(true))".into(),
            ));
        }
        let limit = prost_types::Duration {
            seconds: i64::try_from(limit.as_secs()).unwrap_or(i64::MAX),
            nanos: limit.subsec_nanos() as i32,
        };
        self.send_request(batch, Some(limit)).await
    }

    async fn send_request(
        &mut self,
        batch: Batch,
        wait_timeout: Option<prost_types::Duration>,
    ) -> Result<u64, ClientError> {
        let submit = batch.into_proto();
        if submit.items.is_empty() {
            return Err(ClientError::InvalidRequest(
                "a batch needs at least one item".into(),
            ));
        }
        let Some(tx) = &self.tx else {
            return Err(ClientError::InvalidRequest(
                "the session was closed for sending".into(),
            ));
        };
        let tag = self.next_tag;
        tx.send(v1::SessionRequest {
            tag,
            submit: Some(submit),
            wait_timeout,
        })
        .await
        .map_err(|_| {
            ClientError::Status(tonic::Status::unavailable(
                "the session has ended; its status is the next answer's",
            ))
        })?;
        self.next_tag += 1;
        self.open += 1;
        Ok(tag)
    }

    /// The next answer, in the order the daemon gives them (the order requests finish, not the
    /// order they were sent); `None` once the session is over (after [`Session::close`], when
    /// every request is answered).
    ///
    /// # Errors
    /// The status the session ended with: its deadline, the daemon stopping (`UNAVAILABLE`), a
    /// request over the daemon's request limits (refused before it is read).
    pub async fn next(&mut self) -> Result<Option<SessionAnswer>, ClientError> {
        let Some(m) = self.rx.message().await? else {
            return Ok(None);
        };
        self.open = self.open.saturating_sub(1);
        let mut queued_batch = None;
        let outcome = match m.outcome {
            Some(v1::session_response::Outcome::Submitted(r)) => Ok(r),
            Some(v1::session_response::Outcome::Error(e)) => {
                queued_batch = (e.batch_id != 0).then_some(e.batch_id);
                Err(ClientError::Status(tonic::Status::new(
                    tonic::Code::from(e.code),
                    e.message,
                )))
            }
            None => Err(ClientError::Protocol(format!(
                "session answer {} has no outcome",
                m.tag
            ))),
        };
        Ok(Some(SessionAnswer {
            tag: m.tag,
            outcome,
            queued_batch,
        }))
    }

    /// Sends `batch` and waits for its answer: for a caller with no other request open.
    ///
    /// # Errors
    /// As [`Session::send`] and [`Session::next`], the request's own status, and
    /// `INVALID_ARGUMENT` when other requests are open (their answers would be skipped).
    pub async fn submit(&mut self, batch: Batch) -> Result<v1::SubmitResponse, ClientError> {
        if self.open > 0 {
            return Err(ClientError::InvalidRequest(format!(
                "Session::submit with {} requests open; read their answers with next() first",
                self.open
            )));
        }
        let tag = self.send(batch).await?;
        match self.next().await? {
            Some(a) if a.tag == tag => a.outcome,
            Some(a) => Err(ClientError::Protocol(format!(
                "answer for tag {} while waiting for {tag}",
                a.tag
            ))),
            None => Err(ClientError::Protocol(format!(
                "the session ended without answering tag {tag}"
            ))),
        }
    }

    /// Requests sent and not yet answered.
    pub fn open(&self) -> usize {
        self.open
    }

    /// Half-closes: no more requests; the daemon answers the open ones, then [`Session::next`]
    /// returns `None`.
    pub fn close(&mut self) {
        self.tx = None;
    }
}
