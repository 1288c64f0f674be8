//! [`Session`]: many batches over one `DispatchService.Session` stream, each answered by tag.
//!
//! For a caller that submits small batches often (one item at a time, say): after the first
//! request, each batch costs one HTTP/2 DATA frame each way instead of a new stream with its
//! headers and trailers. A caller that sends from one task and reads answers in another
//! splits the session ([`Session::split`]) into a [`SessionSender`] (cloneable: several tasks
//! may send) and a [`SessionReceiver`].
//!
//! Invariant: tags are handed out from 1, each once, in the order senders take them, and each
//! answer names its request's tag, so a caller with several requests open can match them; a
//! refused request is an answer ([`SessionAnswer::outcome`] holds the daemon's status) and
//! the session goes on.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

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

/// What both halves of a session count.
#[derive(Debug)]
struct Counts {
    next_tag: AtomicU64,
    /// Requests sent and not yet answered.
    open: AtomicUsize,
}

/// An open session (see the module docs). Dropping it ends the session; work already
/// accepted goes on.
#[derive(Debug)]
pub struct Session {
    tx: SessionSender,
    rx: SessionReceiver,
}

/// The sending half of a [`Session`] (see [`Session::split`]). Clones send on the same
/// session; once every clone is dropped (or [`SessionSender::close`]d) the session is
/// half-closed: the daemon answers the open requests, then the receiver's `next` returns
/// `None`.
#[derive(Debug, Clone)]
pub struct SessionSender {
    /// `None` once closed.
    tx: Option<mpsc::Sender<v1::SessionRequest>>,
    counts: Arc<Counts>,
}

/// The receiving half of a [`Session`] (see [`Session::split`]). Dropping it ends the session
/// at once (the daemon sees the stream cancelled); work already accepted goes on.
pub struct SessionReceiver {
    rx: Streaming<v1::SessionResponse>,
    counts: Arc<Counts>,
}

impl std::fmt::Debug for SessionReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionReceiver")
            .field("counts", &self.counts)
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
        let counts = Arc::new(Counts {
            next_tag: AtomicU64::new(1),
            open: AtomicUsize::new(0),
        });
        Ok(Session {
            tx: SessionSender {
                tx: Some(tx),
                counts: counts.clone(),
            },
            rx: SessionReceiver { rx, counts },
        })
    }

    /// Sends one batch; returns its tag. The daemon queues a session's batches in the order
    /// they are sent (with several senders, the order their sends complete); their answers come
    /// as they finish. Waits while the stream's buffer is full: the daemon
    /// reads at most 64 requests ahead of its answers, and the answers wait for
    /// [`Session::next`]. A caller that sends many waiting batches before reading any can
    /// therefore wait here until its deadline: keep [`Session::open`] bounded (say, under 64)
    /// by reading answers as it goes, or [`Session::split`] the session and read in another
    /// task.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` for an empty batch, or after [`Session::close`]; `UNAVAILABLE`
    /// when the session has ended (read [`Session::next`] for its status).
    pub async fn send(&mut self, batch: Batch) -> Result<u64, ClientError> {
        self.tx.send(batch).await
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
        limit: Duration,
    ) -> Result<u64, ClientError> {
        self.tx.send_with_wait_limit(batch, limit).await
    }

    /// The next answer, in the order the daemon gives them (the order requests finish, not the
    /// order they were sent); `None` once the session is over (after [`Session::close`], when
    /// every request is answered).
    ///
    /// # Errors
    /// The status the session ended with: its deadline, the daemon stopping (`UNAVAILABLE`), a
    /// request over the daemon's request limits (refused before it is read).
    pub async fn next(&mut self) -> Result<Option<SessionAnswer>, ClientError> {
        self.rx.next().await
    }

    /// Sends `batch` and waits for its answer: for a caller with no other request open.
    ///
    /// # Errors
    /// As [`Session::send`] and [`Session::next`], the request's own status, and
    /// `INVALID_ARGUMENT` when other requests are open (their answers would be skipped).
    pub async fn submit(&mut self, batch: Batch) -> Result<v1::SubmitResponse, ClientError> {
        let open = self.open();
        if open > 0 {
            return Err(ClientError::InvalidRequest(format!(
                "Session::submit with {open} requests open; read their answers with next() first"
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
        self.rx.open()
    }

    /// Half-closes: no more requests; the daemon answers the open ones, then [`Session::next`]
    /// returns `None`.
    pub fn close(&mut self) {
        self.tx.tx = None;
    }

    /// The two halves, for a caller that sends from one task and reads answers in another
    /// (a sender never waits on unread answers then, whatever the number open).
    pub fn split(self) -> (SessionSender, SessionReceiver) {
        (self.tx, self.rx)
    }
}

impl SessionSender {
    /// As [`Session::send`].
    ///
    /// # Errors
    /// As [`Session::send`].
    pub async fn send(&self, batch: Batch) -> Result<u64, ClientError> {
        self.send_request(batch, None).await
    }

    /// As [`Session::send_with_wait_limit`].
    ///
    /// # Errors
    /// As [`Session::send_with_wait_limit`].
    pub async fn send_with_wait_limit(
        &self,
        batch: Batch,
        limit: Duration,
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

    /// Closes this sender: the session is half-closed once every clone is closed or dropped.
    pub fn close(self) {}

    async fn send_request(
        &self,
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
        let tag = self.counts.next_tag.fetch_add(1, Ordering::Relaxed);
        // Counted before the send, so that an answer read at once never finds it uncounted.
        self.counts.open.fetch_add(1, Ordering::Relaxed);
        let sent = tx
            .send(v1::SessionRequest {
                tag,
                submit: Some(submit),
                wait_timeout,
            })
            .await;
        if sent.is_err() {
            self.counts.open.fetch_sub(1, Ordering::Relaxed);
            return Err(ClientError::Status(tonic::Status::unavailable(
                "the session has ended; its status is the next answer's",
            )));
        }
        Ok(tag)
    }
}

impl SessionReceiver {
    /// As [`Session::next`]: `None` once every sender is closed and every request answered.
    ///
    /// # Errors
    /// As [`Session::next`].
    pub async fn next(&mut self) -> Result<Option<SessionAnswer>, ClientError> {
        let Some(m) = self.rx.message().await? else {
            return Ok(None);
        };
        let _ = self
            .counts
            .open
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
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

    /// Requests sent (by any sender) and not yet answered.
    pub fn open(&self) -> usize {
        self.counts.open.load(Ordering::Relaxed)
    }
}
