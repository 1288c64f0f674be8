//! The worker library against a scripted fake `WorkerService` on a temporary Unix socket: the
//! test plays the daemon message by message, so it can check the exact protocol the library
//! speaks (Hello, OpenSlot, Credit, Done, HandBack, CloseSlot, waiting for SlotClosed, half-close) without the real
//! daemon. The real daemon is exercised by `tests/workers.rs` of the e2e crate.

use std::pin::Pin;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use wqd_client::proto::{
    self as v1, daemon_message, done, worker_message, worker_service_server as ws,
};
use wqd_client::worker::{Graceful, WorkItem, Worker, WorkerError};
use wqd_client::Endpoint;

const LIMIT: Duration = Duration::from_secs(10);

type Out = Pin<Box<dyn Stream<Item = Result<v1::DaemonMessage, Status>> + Send>>;

/// One Attach call handed to the test: what the worker sends, and where the daemon's
/// messages (or the final status) go.
struct Session {
    inbound: Streaming<v1::WorkerMessage>,
    out: mpsc::UnboundedSender<Result<v1::DaemonMessage, Status>>,
}

struct Fake {
    sessions: mpsc::UnboundedSender<Session>,
}

#[tonic::async_trait]
impl ws::WorkerService for Fake {
    type AttachStream = Out;
    async fn attach(
        &self,
        r: Request<Streaming<v1::WorkerMessage>>,
    ) -> Result<Response<Out>, Status> {
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = self.sessions.send(Session {
            inbound: r.into_inner(),
            out: tx,
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
        )))
    }
    async fn list_workers(
        &self,
        _r: Request<v1::ListWorkersRequest>,
    ) -> Result<Response<v1::ListWorkersResponse>, Status> {
        // The library does not call it (its graceful stop waits for SlotClosed).
        Ok(Response::new(v1::ListWorkersResponse::default()))
    }
}

struct Harness {
    _dir: tempfile::TempDir,
    endpoint: Endpoint,
    sessions: mpsc::UnboundedReceiver<Session>,
}

async fn serve() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fake.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let fake = Fake { sessions: tx };
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(ws::WorkerServiceServer::new(fake))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
            .await
            .unwrap();
    });
    Harness {
        _dir: dir,
        endpoint: Endpoint::unix(path),
        sessions: rx,
    }
}

impl Session {
    async fn next(&mut self) -> worker_message::Msg {
        let m = tokio::time::timeout(LIMIT, self.inbound.next())
            .await
            .expect("a worker message in time")
            .expect("the stream is open")
            .expect("no transport error");
        m.msg.expect("a message with a body")
    }
    fn send(&self, m: daemon_message::Msg) {
        self.out
            .send(Ok(v1::DaemonMessage { msg: Some(m) }))
            .unwrap();
    }
    /// Reads Hello, welcomes it, and returns the Hello and the (OpenSlot, Credit) pairs.
    async fn handshake(&mut self, slots: usize) -> (v1::Hello, Vec<(v1::OpenSlot, v1::Credit)>) {
        let worker_message::Msg::Hello(h) = self.next().await else {
            panic!("first message is not Hello")
        };
        self.send(daemon_message::Msg::Welcome(v1::Welcome {
            worker_id: 42,
            pinning: false,
            epoch: 3,
            max_credits: 4,
            max_output_bytes: 1 << 20,
        }));
        let mut out = Vec::new();
        for _ in 0..slots {
            let worker_message::Msg::OpenSlot(o) = self.next().await else {
                panic!("expected OpenSlot")
            };
            let worker_message::Msg::Credit(c) = self.next().await else {
                panic!("expected Credit")
            };
            out.push((o, c));
        }
        (h, out)
    }
    /// The worker's half-close: the inbound stream ends.
    async fn expect_end(&mut self) {
        let m = tokio::time::timeout(LIMIT, self.inbound.next())
            .await
            .expect("half-close in time");
        assert!(m.is_none(), "expected half-close, got {m:?}");
    }
}

fn work(id: u64, slot: u32, cpu: u32, handler: &str, payload: &[u8]) -> daemon_message::Msg {
    daemon_message::Msg::Work(v1::Work {
        item_id: id,
        slot,
        cpu,
        handler: handler.into(),
        payload: payload.to_vec(),
        epoch: 3,
        workqueue: "default".into(),
        ..Default::default()
    })
}

fn handlers(b: wqd_client::worker::WorkerBuilder) -> wqd_client::worker::WorkerBuilder {
    b.handler("echo", |i: &WorkItem| Ok(i.payload.clone()))
        .handler("fail", |_: &WorkItem| Err("bad input".into()))
        .handler("boom", |_: &WorkItem| panic!("exploded"))
        .handler("slow", |i: &WorkItem| {
            if i.wait_cancelled(Duration::from_millis(
                i.arg("ms").and_then(|m| m.parse().ok()).unwrap_or(5_000),
            )) {
                Err("stopped".into())
            } else {
                Ok(b"slept".to_vec())
            }
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_work_outcomes_and_credits() {
    let mut h = serve().await;
    let w = tokio::spawn(
        handlers(Worker::builder(h.endpoint.clone()))
            .target("cpus:4,6")
            .prefetch(9) // above max_credits (4): clamped
            .name("fake-test")
            .start(),
    );
    let mut s = tokio::time::timeout(LIMIT, h.sessions.recv())
        .await
        .unwrap()
        .unwrap();
    let (hello, slots) = s.handshake(2).await;
    let w = w.await.unwrap().expect("welcomed");
    assert_eq!(w.worker_id(), 42);
    assert_eq!(hello.name, "fake-test");
    assert_eq!(hello.pid, std::process::id());
    assert_eq!(hello.handlers, vec!["boom", "echo", "fail", "slow"]);
    let got: Vec<(u32, u32, u32)> = slots
        .iter()
        .map(|(o, c)| {
            assert_eq!(o.slot, c.slot);
            (o.slot, o.cpu, c.credits)
        })
        .collect();
    assert_eq!(got, vec![(0, 4, 4), (1, 6, 4)]);

    s.send(work(1, 0, 4, "echo", b"hi"));
    s.send(work(2, 1, 6, "fail", b""));
    s.send(work(3, 0, 4, "boom", b""));
    s.send(work(4, 1, 6, "nobody", b""));
    let mut dones = Vec::new();
    for _ in 0..4 {
        match s.next().await {
            worker_message::Msg::Done(d) => dones.push(d),
            other => panic!("expected Done, got {other:?}"),
        }
    }
    dones.sort_by_key(|d| d.item_id);
    assert_eq!(dones[0].outcome, Some(done::Outcome::Ok(b"hi".to_vec())));
    assert_eq!(
        dones[1].outcome,
        Some(done::Outcome::Error("bad input".into()))
    );
    assert_eq!(
        dones[2].outcome,
        Some(done::Outcome::Error("handler panicked: exploded".into()))
    );
    assert!(
        matches!(&dones[3].outcome, Some(done::Outcome::Error(e)) if e.contains("not served")),
        "{:?}",
        dones[3]
    );
    assert!(
        dones
            .iter()
            .all(|d| d.credits == 1 && d.cpu_finished.is_none()),
        "every answer returns its credit; no cpu_finished without pinning: {dones:?}"
    );

    // Finish: CloseSlot for both; the half-close waits for both SlotClosed.
    w.stop(Graceful::Finish);
    let mut closes = Vec::new();
    for _ in 0..2 {
        match s.next().await {
            worker_message::Msg::CloseSlot(c) => closes.push(c.slot),
            other => panic!("expected CloseSlot, got {other:?}"),
        }
    }
    closes.sort_unstable();
    assert_eq!(closes, vec![0, 1]);
    s.send(daemon_message::Msg::SlotClosed(v1::SlotClosed { slot: 0 }));
    // One slot still open on the daemon's side: no half-close yet.
    let early = tokio::time::timeout(Duration::from_millis(200), s.inbound.next()).await;
    assert!(
        early.is_err(),
        "half-closed before every SlotClosed: {early:?}"
    );
    s.send(daemon_message::Msg::SlotClosed(v1::SlotClosed { slot: 1 }));
    s.expect_end().await;
    drop(s); // the daemon's side ends OK
    let report = w.wait().await.expect("a graceful stop ends Ok");
    assert_eq!((report.ok, report.failed), (1, 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_running_and_queued_then_hand_back_on_stop() {
    let mut h = serve().await;
    let w = tokio::spawn(
        handlers(Worker::builder(h.endpoint.clone()))
            .cpus([0])
            .prefetch(3)
            .start(),
    );
    let mut s = tokio::time::timeout(LIMIT, h.sessions.recv())
        .await
        .unwrap()
        .unwrap();
    s.handshake(1).await;
    let w = w.await.unwrap().expect("welcomed");

    // 10 runs; 11 and 12 wait behind it on the one slot thread.
    s.send(work(10, 0, 0, "slow", b""));
    s.send(work(11, 0, 0, "slow", b""));
    s.send(work(12, 0, 0, "slow", b""));
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Cancel the queued 11: answered at once, without running.
    s.send(daemon_message::Msg::Cancel(v1::Cancel { item_id: 11 }));
    let worker_message::Msg::Done(d) = s.next().await else {
        panic!("expected Done")
    };
    assert_eq!(
        (d.item_id, d.outcome, d.credits),
        (11, Some(done::Outcome::Cancelled(true)), 1)
    );
    // Cancel the running 10: the handler sees the flag, returns Err → cancelled.
    s.send(daemon_message::Msg::Cancel(v1::Cancel { item_id: 10 }));
    let worker_message::Msg::Done(d) = s.next().await else {
        panic!("expected Done")
    };
    assert_eq!(
        (d.item_id, d.outcome),
        (10, Some(done::Outcome::Cancelled(true)))
    );

    // 12 is running now (5 s unless cancelled); 13 waits behind it. HandBack: CloseSlot, 13
    // handed back at once; then work that crossed the close (14) is handed back too, and the
    // running 12 is still answered (here quickly, by a cancel) before the half-close.
    s.send(work(13, 0, 0, "echo", b"x"));
    tokio::time::sleep(Duration::from_millis(50)).await;
    w.stop(Graceful::HandBack);
    let mut seen = Vec::new();
    let mut injected = false;
    loop {
        let m = tokio::time::timeout(LIMIT, s.inbound.next())
            .await
            .expect("messages until the half-close");
        let Some(m) = m else { break };
        match m.expect("no transport error").msg.expect("a body") {
            worker_message::Msg::CloseSlot(c) => seen.push(format!("close {}", c.slot)),
            worker_message::Msg::HandBack(b) => {
                seen.push(format!("handback {} {} {}", b.item_id, b.reason, b.credits))
            }
            worker_message::Msg::Done(d) => {
                seen.push(format!("done {} {:?} {}", d.item_id, d.outcome, d.credits))
            }
            other => panic!("unexpected {other:?}"),
        }
        if !injected && seen.iter().any(|x| x.starts_with("handback 13")) {
            injected = true;
            // 14 was sent before the daemon read the close; SlotClosed follows it.
            s.send(work(14, 0, 0, "echo", b"late"));
            s.send(daemon_message::Msg::SlotClosed(v1::SlotClosed { slot: 0 }));
            s.send(daemon_message::Msg::Cancel(v1::Cancel { item_id: 12 }));
        }
    }
    assert_eq!(
        seen,
        vec![
            "close 0",
            "handback 13 stopping 0",
            "handback 14 stopping 0",
            "done 12 Some(Cancelled(true)) 0"
        ]
    );
    drop(s);
    let r = w.wait().await.expect("graceful");
    assert_eq!(r.handed_back, 2, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_stream_ends_join_with_the_status() {
    let mut h = serve().await;
    let w = tokio::spawn(
        handlers(Worker::builder(h.endpoint.clone()))
            .cpus([0])
            .start(),
    );
    let mut s = tokio::time::timeout(LIMIT, h.sessions.recv())
        .await
        .unwrap()
        .unwrap();
    s.handshake(1).await;
    let w = w.await.unwrap().expect("welcomed");
    s.send(work(1, 0, 0, "slow", b""));
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.out
        .send(Err(Status::invalid_argument("Done for an item not held")))
        .unwrap();
    let e = tokio::time::timeout(LIMIT, w.wait())
        .await
        .expect("join returns: the running handler was told to stop")
        .expect_err("a lost session is an error");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    assert!(matches!(e, WorkerError::Ended(_)), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_hello_fails_spawn() {
    let mut h = serve().await;
    let w = tokio::spawn(
        handlers(Worker::builder(h.endpoint.clone()))
            .cpus([0])
            .start(),
    );
    let mut s = tokio::time::timeout(LIMIT, h.sessions.recv())
        .await
        .unwrap()
        .unwrap();
    let worker_message::Msg::Hello(_) = s.next().await else {
        panic!("Hello first")
    };
    s.out
        .send(Err(Status::permission_denied(
            "uid 1000 may not serve echo",
        )))
        .unwrap();
    let e = w.await.unwrap().expect_err("refused");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
}
