//! `DispatchService.Session`: many batches over one stream, each answered as a `Submit` is.
//!
//! A unary `Submit` of one item costs the daemon and its client a new HTTP/2 stream each: the
//! request's headers decoded and routed, a task spawned, the response's headers and trailers
//! encoded. A session pays that once; each request after it is one DATA frame in and one out.
//! This module owns the session's loop ([`Session`]): it reads requests while fewer than
//! [`IN_FLIGHT`] are unanswered, runs each through the same code as `Submit`
//! ([`Rpc::do_submit`]), and answers each with its tag as soon as it is done, in the order they
//! finish. A request's `wait_timeout` ends its own wait (answered DEADLINE_EXCEEDED with its
//! batch's id; the work goes on), so a wait that outlives its use does not hold one of the
//! [`IN_FLIGHT`] places until the session ends.
//!
//! Invariants: batches are queued in the order their requests were read (a request's future
//! is first polled before any later one's, `FuturesUnordered` being FIFO for new futures,
//! and `do_submit` queues within that first poll: inline, or in place on the daemon's
//! multi-thread runtime; the blocking pool, used only on a current-thread runtime, would not
//! keep the order); every request read is answered exactly once, unless the session ends first
//! (its deadline, the client gone), in which case the unanswered requests' work goes on as a
//! `Submit`'s does when its client goes away; a refused request is answered with its status
//! and the session goes on; a failed read (a message over the request limits, a message that
//! does not decode) or the daemon stopping stops the reading, and the session ends with that
//! status (UNAVAILABLE for the daemon stopping) once every request already read is answered.
//! The loop runs inside the response stream's poll, with no task of its own, so an answer is
//! no further hand-off than a unary call's.

use std::future::Future;
use std::pin::Pin;
use std::time::Instant;

use futures_util::stream::{FuturesUnordered, StreamExt};
use tonic::{Status, Streaming};
use wqd_proto::out::{SessionOutcomeOut, SessionResponseOut};
use wqd_proto::submit_in::{SessionRequestIn, SubmitRequestIn};
use wqd_proto::v1;

use super::convert::duration_in;
use super::{sleep_until, status, Rpc, RpcError};
use crate::shared::stopped;

/// At most this many requests of one session are read and not yet answered; the session
/// reads the next request once one is answered, and HTTP/2 flow control holds the rest back in
/// the client.
pub const IN_FLIGHT: usize = 64;

type Answer = Pin<Box<dyn Future<Output = SessionResponseOut> + Send>>;

/// A request's batch and the end of its wait (from `wait_timeout`, measured from now), or
/// why the request is refused before anything is queued.
fn checked(req: SessionRequestIn) -> Result<(SubmitRequestIn, Option<Instant>), RpcError> {
    let bad = |problem: String| RpcError::Field {
        field: "wait_timeout".into(),
        problem,
    };
    let Some(s) = req.submit else {
        return Err(RpcError::Field {
            field: "submit".into(),
            problem: "required".into(),
        });
    };
    let limit = duration_in(req.wait_timeout)
        .map_err(bad)?
        .filter(|d| !d.is_zero());
    if limit.is_some() && !s.wait {
        return Err(bad(
            "set on a request without submit.wait: there is no wait to limit".into(),
        ));
    }
    // A limit past what `Instant` can hold is no limit.
    Ok((s, limit.and_then(|d| Instant::now().checked_add(d))))
}

/// One session's state, polled by its response stream (see the module docs).
pub(super) struct Session {
    rpc: Rpc,
    /// `None` once the client half-closed or a read failed.
    inbound: Option<Streaming<SessionRequestIn>>,
    /// Requests read and not yet answered.
    running: FuturesUnordered<Answer>,
    /// The status to end with once `running` is empty: the first of a failed read and the
    /// daemon stopping.
    ending: Option<Status>,
    deadline: Option<Instant>,
    began: Instant,
    stop: Pin<Box<dyn Future<Output = ()> + Send>>,
    /// `stop` has fired (it must not be polled again).
    stopping: bool,
    /// Requests read, and answered.
    read: u64,
    answered: u64,
    done: bool,
}

impl Session {
    pub(super) fn new(
        rpc: Rpc,
        inbound: Streaming<SessionRequestIn>,
        deadline: Option<Instant>,
    ) -> Session {
        let stop = Box::pin(stopped(rpc.stopping.clone()));
        Session {
            rpc,
            inbound: Some(inbound),
            running: FuturesUnordered::new(),
            ending: None,
            deadline,
            began: Instant::now(),
            stop,
            stopping: false,
            read: 0,
            answered: 0,
            done: false,
        }
    }

    /// Runs one request as a `Submit` would; its refusal becomes its answer.
    fn start(&mut self, req: SessionRequestIn) {
        self.read += 1;
        let rpc = self.rpc.clone();
        let tag = req.tag;
        self.running.push(Box::pin(async move {
            // Set once the batch is queued: an error answered after that names it.
            let mut queued = 0;
            let outcome = match checked(req) {
                Err(e) => {
                    rpc.refused();
                    Err(e)
                }
                // The session's deadline ends the session (see `next_message`); a request's
                // own `wait_timeout` ends only its wait.
                Ok((s, wait_until)) => rpc.do_submit(s, wait_until, &mut queued).await,
            };
            let outcome = match outcome {
                Ok(r) => SessionOutcomeOut::Submitted(r),
                Err(e) => {
                    let st = status(e);
                    SessionOutcomeOut::Error(v1::SessionError {
                        code: st.code() as i32,
                        message: st.message().to_string(),
                        batch_id: queued,
                    })
                }
            };
            if let Some(m) = &rpc.metrics {
                m.session_answered(match &outcome {
                    SessionOutcomeOut::Submitted(_) => tonic::Code::Ok,
                    SessionOutcomeOut::Error(e) => tonic::Code::from(e.code),
                });
            }
            SessionResponseOut {
                tag,
                outcome: Some(outcome),
            }
        }));
    }

    /// The next message of the response stream, `None` once it is over.
    async fn next_message(&mut self) -> Option<Result<SessionResponseOut, Status>> {
        if self.done {
            return None;
        }
        loop {
            let reading = self.inbound.is_some() && self.running.len() < IN_FLIGHT;
            if !reading && self.running.is_empty() {
                self.done = true;
                tracing::debug!(
                    read = self.read,
                    answered = self.answered,
                    ending = ?self.ending.as_ref().map(Status::code),
                    "session over after {:?}",
                    self.began.elapsed()
                );
                return self.ending.take().map(Err);
            }
            let inbound = &mut self.inbound;
            let read = async {
                match inbound {
                    Some(s) => s.message().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                // Answers first: a ready answer never waits behind a read.
                biased;
                Some(answer) = self.running.next() => {
                    self.answered += 1;
                    return Some(Ok(answer));
                }
                m = read, if reading => match m {
                    Ok(Some(req)) => self.start(req),
                    Ok(None) => self.inbound = None,
                    Err(st) => {
                        // wqd's own status for tonic's refusals (too large, bad framing).
                        self.inbound = None;
                        self.ending.get_or_insert(status(RpcError::Transport(st)));
                    }
                },
                _ = sleep_until(self.deadline) => {
                    return Some(Err(self.end(RpcError::Deadline {
                        waited: self.began.elapsed(),
                        what: format!("the session ({} requests unanswered; their work goes on)",
                            self.running.len()),
                    })));
                }
                _ = &mut self.stop, if !self.stopping => {
                    // As in a graceful shutdown's unary calls: what is open is answered,
                    // nothing more is read.
                    self.stopping = true;
                    self.inbound = None;
                    self.ending.get_or_insert(Status::unavailable(format!(
                        "the daemon is stopping: the session read {} requests and answered \
                         each; no more are read",
                        self.read
                    )));
                }
            }
        }
    }

    /// Ends the session early with `e`'s status; unanswered requests' work goes on.
    fn end(&mut self, e: RpcError) -> Status {
        self.done = true;
        self.running = FuturesUnordered::new();
        status(e)
    }

    /// The response body.
    pub(super) fn into_stream(
        self,
    ) -> Pin<Box<dyn tokio_stream::Stream<Item = Result<SessionResponseOut, Status>> + Send>> {
        Box::pin(futures_util::stream::unfold(self, |mut s| async move {
            s.next_message().await.map(|m| (m, s))
        }))
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if !self.done && !self.running.is_empty() {
            tracing::debug!(
                unanswered = self.running.len(),
                "session client went away; the work goes on"
            );
        }
    }
}
