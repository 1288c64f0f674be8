//! `WorkerService.Attach` spoken message by message with the generated tonic stub against the
//! real daemon: the protocol of `proto/wqd/v1/worker.proto` as a worker library would speak
//! it, and every refusal it documents (first message not Hello, a built-in name, an answer for
//! an item not held, Done twice, credit for an unopened slot), each ending the stream with its
//! status while other workers and items carry on. The worker libraries have their own tests
//! (`tests/workers.rs`, `tests/python.rs`).

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::Code;
use wqd_client::proto::worker_service_client::WorkerServiceClient;
use wqd_client::proto::{self, daemon_message, worker_message, ItemState};
use wqd_client::{Batch, FlushScope, Item, Target};
use wqd_e2e::{metric, Daemon};

const LONG: Duration = Duration::from_secs(30);

/// One attached session: the sender of its requests and its response stream.
struct Session {
    tx: mpsc::Sender<proto::WorkerMessage>,
    rx: tonic::Streaming<proto::DaemonMessage>,
}

fn m(msg: worker_message::Msg) -> proto::WorkerMessage {
    proto::WorkerMessage { msg: Some(msg) }
}

fn hello(handlers: &[&str]) -> proto::WorkerMessage {
    m(worker_message::Msg::Hello(proto::Hello {
        handlers: handlers.iter().map(|s| s.to_string()).collect(),
        pid: std::process::id(),
        name: "attach-test".into(),
    }))
}

async fn open(d: &Daemon, first: proto::WorkerMessage) -> Result<Session, tonic::Status> {
    let mut c = WorkerServiceClient::new(d.channel().await);
    let (tx, rx) = mpsc::channel(64);
    tx.send(first).await.expect("queue first message");
    let rx = c
        .attach(ReceiverStream::new(rx))
        .await
        .map(tonic::Response::into_inner)?;
    Ok(Session { tx, rx })
}

/// A session welcomed by the daemon, serving `handlers`, with `slots` (slot, cpu) open and
/// given one credit each.
async fn ready(d: &Daemon, handlers: &[&str], slots: &[(u32, u32)]) -> Session {
    let mut s = open(d, hello(handlers)).await.expect("attach");
    assert!(matches!(
        s.next().await,
        Ok(daemon_message::Msg::Welcome(_))
    ));
    for &(slot, cpu) in slots {
        s.send(worker_message::Msg::OpenSlot(proto::OpenSlot { slot, cpu }))
            .await;
        s.send(worker_message::Msg::Credit(proto::Credit {
            slot,
            credits: 1,
        }))
        .await;
    }
    s
}

impl Session {
    async fn send(&self, msg: worker_message::Msg) {
        self.tx.send(m(msg)).await.expect("send");
    }
    async fn next(&mut self) -> Result<daemon_message::Msg, tonic::Status> {
        match tokio::time::timeout(LONG, self.rx.next()).await {
            Ok(Some(Ok(proto::DaemonMessage { msg: Some(x) }))) => Ok(x),
            Ok(Some(Ok(_))) => panic!("empty DaemonMessage"),
            Ok(Some(Err(st))) => Err(st),
            Ok(None) => Err(tonic::Status::ok("stream ended")),
            Err(_) => panic!("no message within {LONG:?}"),
        }
    }
    async fn work(&mut self) -> proto::Work {
        match self.next().await {
            Ok(daemon_message::Msg::Work(w)) => w,
            other => panic!("expected Work, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_serves_items_of_its_group_and_a_hostile_one_is_cut_off_alone() {
    let d = Daemon::start("two-socket");
    let c = d.client().await;
    let mut good = open(&d, hello(&["resize"])).await.expect("attach");
    let welcome = match good.next().await {
        Ok(daemon_message::Msg::Welcome(w)) => w,
        other => panic!("expected Welcome, got {other:?}"),
    };
    assert!(!welcome.pinning, "a fixture topology: no pinning");
    assert!(welcome.worker_id > 0 && welcome.max_credits >= 1);
    // Slots on CPU 2 (LLC 1) and CPU 0 (LLC 0).
    good.send(worker_message::Msg::OpenSlot(proto::OpenSlot {
        slot: 1,
        cpu: 2,
    }))
    .await;
    good.send(worker_message::Msg::OpenSlot(proto::OpenSlot {
        slot: 7,
        cpu: 0,
    }))
    .await;
    let r = c
        .submit(
            Batch::new()
                .item(Item::new(Target::cache(1), "resize").payload(b"one".to_vec()))
                .item(Item::new(Target::cache(1), "resize").arg("k", "v")),
        )
        .await
        .expect("submit");
    let ids: Vec<u64> = r.items.iter().map(|x| x.item_id).collect();
    // Nothing comes before credits; slot 7 (LLC 0) never gets these items.
    good.send(worker_message::Msg::Credit(proto::Credit {
        slot: 7,
        credits: 5,
    }))
    .await;
    good.send(worker_message::Msg::Credit(proto::Credit {
        slot: 1,
        credits: 1,
    }))
    .await;
    let w1 = good.work().await;
    assert_eq!((w1.slot, w1.cpu, w1.handler.as_str()), (1, 2, "resize"));
    assert_eq!(w1.item_id, ids[0]);
    assert_eq!(w1.payload, b"one");
    // The second item waits: the slot has no credit left (max_credits is 1 by default).
    good.send(worker_message::Msg::Done(proto::Done {
        item_id: w1.item_id,
        outcome: Some(proto::done::Outcome::Ok(b"ONE".to_vec())),
        cpu_finished: Some(2),
        credits: 1,
    }))
    .await;
    let w2 = good.work().await;
    assert_eq!(w2.item_id, ids[1]);
    assert_eq!(w2.args.get("k").map(String::as_str), Some("v"));

    // A hostile worker answers an item it was not given: cut off with INVALID_ARGUMENT.
    let mut bad = open(&d, hello(&["resize"])).await.expect("attach");
    assert!(matches!(
        bad.next().await,
        Ok(daemon_message::Msg::Welcome(_))
    ));
    bad.send(worker_message::Msg::Done(proto::Done {
        item_id: w2.item_id,
        outcome: Some(proto::done::Outcome::Ok(vec![])),
        cpu_finished: None,
        credits: 0,
    }))
    .await;
    let st = bad.next().await.expect_err("disconnected");
    assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");
    assert!(st.message().contains("does not hold"), "{}", st.message());

    // The good worker finishes; nothing else changed.
    good.send(worker_message::Msg::Done(proto::Done {
        item_id: w2.item_id,
        outcome: Some(proto::done::Outcome::Error("bad input".into())),
        cpu_finished: None,
        credits: 0,
    }))
    .await;
    let (results, _) = c
        .clone()
        .with_timeout(Some(LONG))
        .flush_all(FlushScope::Batch(r.batch_id))
        .await
        .expect("flush");
    assert_eq!(results.len(), 2);
    let a = results.iter().find(|x| x.item_id == ids[0]).expect("a");
    let b = results.iter().find(|x| x.item_id == ids[1]).expect("b");
    assert_eq!(a.state(), ItemState::Ok);
    assert_eq!(a.output, b"ONE");
    assert_eq!((a.cpu_started, a.worker_id), (Some(2), welcome.worker_id));
    assert_eq!(a.worker_pid, std::process::id());
    assert_eq!(a.worker_slot, 1);
    assert_eq!(b.state(), ItemState::Failed);
    assert_eq!(b.error, "bad input");

    // Done for it again: a protocol violation for the good worker too.
    good.send(worker_message::Msg::Done(proto::Done {
        item_id: w2.item_id,
        outcome: Some(proto::done::Outcome::Ok(vec![])),
        cpu_finished: None,
        credits: 0,
    }))
    .await;
    let st = good.next().await.expect_err("disconnected");
    assert_eq!(st.code(), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_name_what_is_wrong() {
    let d = Daemon::start("two-socket");
    // Not Hello first.
    let st = match open(
        &d,
        m(worker_message::Msg::Credit(proto::Credit {
            slot: 0,
            credits: 1,
        })),
    )
    .await
    {
        Ok(mut s) => s.next().await.expect_err("refused"),
        Err(st) => st,
    };
    assert_eq!(st.code(), Code::InvalidArgument);
    assert!(st.message().contains("must be Hello"), "{}", st.message());
    // A built-in name.
    let st = match open(&d, hello(&["noop"])).await {
        Ok(mut s) => s.next().await.expect_err("refused"),
        Err(st) => st,
    };
    assert_eq!(st.code(), Code::InvalidArgument);
    assert!(st.message().contains("may not shadow"), "{}", st.message());
    // Credit for a slot it did not open; a CPU the machine lacks.
    for bad in [
        worker_message::Msg::Credit(proto::Credit {
            slot: 3,
            credits: 1,
        }),
        worker_message::Msg::OpenSlot(proto::OpenSlot { slot: 0, cpu: 999 }),
    ] {
        let mut s = open(&d, hello(&["x"])).await.expect("attach");
        assert!(matches!(
            s.next().await,
            Ok(daemon_message::Msg::Welcome(_))
        ));
        s.send(bad).await;
        let st = s.next().await.expect_err("cut off");
        assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");
    }
    // ListWorkers sees none of them once they are gone.
    let mut c = WorkerServiceClient::new(d.channel().await);
    let deadline = std::time::Instant::now() + LONG;
    loop {
        let l = c
            .list_workers(proto::ListWorkersRequest {})
            .await
            .expect("ListWorkers")
            .into_inner();
        if l.workers.is_empty() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{l:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_goes_away_fails_what_it_held_and_cancel_reaches_it() {
    let d = Daemon::start("two-socket");
    let c = d.client().await;
    let mut s = ready(&d, &["slow"], &[(0, 1), (1, 3)]).await;
    let r = c
        .submit(
            Batch::new()
                .item(Item::new(Target::cpu(1), "slow"))
                .item(Item::new(Target::cpu(3), "slow")),
        )
        .await
        .expect("submit");
    let (a, b) = (r.items[0].item_id, r.items[1].item_id);
    let mut got = [s.work().await.item_id, s.work().await.item_id];
    got.sort_unstable();
    assert_eq!(got, [a, b]);
    // Cancel a: the daemon tells the worker; a stays running until the worker answers.
    let cancel = tokio::spawn({
        let c = c.clone().with_timeout(Some(LONG));
        async move { c.cancel(wqd_client::CancelScope::Items(vec![a])).await }
    });
    match s.next().await {
        Ok(daemon_message::Msg::Cancel(x)) => assert_eq!(x.item_id, a),
        other => panic!("expected Cancel, got {other:?}"),
    }
    s.send(worker_message::Msg::Done(proto::Done {
        item_id: a,
        outcome: Some(proto::done::Outcome::Cancelled(true)),
        cpu_finished: None,
        credits: 0,
    }))
    .await;
    cancel.await.expect("join").expect("cancel");
    // The worker vanishes holding b: b fails "worker lost".
    drop(s);
    let (results, _) = c
        .clone()
        .with_timeout(Some(LONG))
        .flush_all(FlushScope::Batch(r.batch_id))
        .await
        .expect("flush");
    let ra = results.iter().find(|x| x.item_id == a).expect("a");
    let rb = results.iter().find(|x| x.item_id == b).expect("b");
    assert_eq!(ra.state(), ItemState::Cancelled);
    assert_eq!(rb.state(), ItemState::Failed);
    assert!(rb.error.starts_with("worker lost"), "{}", rb.error);
    // ListWorkers counts the loss: one worker, one item (a was answered).
    let l = c.list_workers_response().await.expect("ListWorkers");
    assert!(l.workers.is_empty(), "{l:?}");
    assert_eq!((l.workers_lost, l.items_lost), (1, 1));
    let ran = d.wqctl(&["workers"]);
    ran.expect_code(0);
    assert!(
        ran.stdout
            .contains("lost since start: 1 workers holding 1 items"),
        "{}",
        ran.stdout
    );
}

/// Cancel waits for a running item until it ends (`WAITED_RUNNING`), and a client deadline
/// ends that wait, not the work (`DEADLINE_EXCEEDED`; pending items are cancelled already).
/// An attached worker holds the running item, so the test decides when it ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_waits_for_running_items_and_a_deadline_ends_the_wait_not_the_work() {
    let d = Daemon::start("two-socket");
    let c = d.client().await;
    // One slot with one credit: a runs, b waits pending behind it.
    let mut s = ready(&d, &["slow"], &[(0, 3)]).await;
    let r = c
        .submit(
            Batch::new()
                .item(Item::new(Target::cpu(3), "slow"))
                .item(Item::new(Target::cpu(3), "slow")),
        )
        .await
        .expect("submit");
    let (a, b) = (r.items[0].item_id, r.items[1].item_id);
    assert_eq!(s.work().await.item_id, a);

    // The worker is told but does not answer within the client's 300 ms.
    let t0 = std::time::Instant::now();
    let e = c
        .clone()
        .with_timeout(Some(Duration::from_millis(300)))
        .cancel(wqd_client::CancelScope::Batch(r.batch_id))
        .await
        .expect_err("a is still running");
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e}");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    match s.next().await {
        Ok(daemon_message::Msg::Cancel(x)) => assert_eq!(x.item_id, a),
        other => panic!("expected Cancel, got {other:?}"),
    }
    assert_eq!(
        wqd_e2e::states(&c, &[a, b]).await,
        vec![ItemState::Running, ItemState::Cancelled]
    );
    // The work goes on: the worker may finish it anyway, and then it is ok.
    s.send(worker_message::Msg::Done(proto::Done {
        item_id: a,
        outcome: Some(proto::done::Outcome::Ok(vec![])),
        cpu_finished: Some(3),
        credits: 1,
    }))
    .await;
    wqd_e2e::wait_states(&c, &[a], ItemState::Ok, LONG).await;

    // Without a deadline, Cancel returns only once the running item has ended.
    let r = c
        .submit(Batch::new().item(Item::new(Target::cpu(3), "slow")))
        .await
        .expect("submit");
    let x = r.items[0].item_id;
    assert_eq!(s.work().await.item_id, x);
    let cancel = tokio::spawn({
        let c = c.clone().with_timeout(Some(LONG));
        async move { c.cancel(wqd_client::CancelScope::Items(vec![x])).await }
    });
    match s.next().await {
        Ok(daemon_message::Msg::Cancel(m)) => assert_eq!(m.item_id, x),
        other => panic!("expected Cancel, got {other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!cancel.is_finished(), "Cancel returned while x was running");
    s.send(worker_message::Msg::Done(proto::Done {
        item_id: x,
        outcome: Some(proto::done::Outcome::Cancelled(true)),
        cpu_finished: Some(3),
        credits: 1,
    }))
    .await;
    let out = cancel.await.expect("join").expect("cancel");
    let got: Vec<_> = out
        .items
        .iter()
        .map(|i| (i.item_id, i.outcome(), i.state()))
        .collect();
    assert_eq!(
        got,
        vec![(x, proto::CancelOutcome::WaitedRunning, ItemState::Cancelled)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_slot_is_answered_after_its_last_work_and_a_half_close_ends_ok() {
    let d = Daemon::start("two-socket");
    let c = d.client().await;
    let mut s = ready(&d, &["tidy"], &[(4, 1)]).await;
    let r = c
        .submit(
            Batch::new()
                .item(Item::new(Target::cpu(1), "tidy"))
                .item(Item::new(Target::cpu(1), "tidy")),
        )
        .await
        .expect("submit");
    let w = s.work().await;
    s.send(worker_message::Msg::CloseSlot(proto::CloseSlot { slot: 4 }))
        .await;
    match s.next().await {
        Ok(daemon_message::Msg::SlotClosed(x)) => assert_eq!(x.slot, 4),
        other => panic!("expected SlotClosed, got {other:?}"),
    }
    // Held items are still answered after the close; credits on the answer are moot.
    s.send(worker_message::Msg::HandBack(proto::HandBack {
        item_id: w.item_id,
        reason: "stopping".into(),
        credits: 1,
    }))
    .await;
    // Half-close: the session ends OK, and both items are still pending, none lost.
    let Session { tx, mut rx } = s;
    drop(tx);
    match tokio::time::timeout(LONG, rx.next()).await {
        Ok(None) => {}
        other => panic!("expected the stream to end OK, got {other:?}"),
    }
    let ids: Vec<u64> = r.items.iter().map(|x| x.item_id).collect();
    let got = c.results(ids).await.expect("results");
    assert!(
        got.items
            .iter()
            .all(|x| x.result.as_ref().map(|r| r.state()) == Some(ItemState::Pending)),
        "{got:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_attached_workers_their_slots_and_items() {
    let d = Daemon::builder("two-socket")
        .arg("--metrics-listen")
        .arg("127.0.0.1:0")
        .start();
    let c = d.client().await;
    let mut s = ready(&d, &["m.h"], &[(0, 4)]).await;
    let r = c
        .submit(Batch::new().item(Item::new(Target::cpu(4), "m.h")))
        .await
        .expect("submit");
    let w = s.work().await;
    // While the item is held: one attached worker, a slot on cpu 4 with one item in flight.
    let deadline = std::time::Instant::now() + LONG;
    loop {
        let text = d.scrape_metrics();
        let got = (
            metric(&text, "wqd_workers_attached"),
            metric(&text, "wqd_worker_slots{cpu=\"4\"}"),
            metric(&text, "wqd_worker_in_flight{cpu=\"4\"}"),
            metric(&text, "wqd_worker_handler_workers{handler=\"m.h\"}"),
        );
        if got == (Some(1.0), Some(1.0), Some(1.0), Some(1.0)) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{got:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s.send(worker_message::Msg::Done(proto::Done {
        item_id: w.item_id,
        outcome: Some(proto::done::Outcome::Ok(vec![])),
        cpu_finished: None,
        credits: 0,
    }))
    .await;
    c.clone()
        .with_timeout(Some(LONG))
        .flush_all(FlushScope::Batch(r.batch_id))
        .await
        .expect("flush");
    let text = d.scrape_metrics();
    assert_eq!(
        metric(
            &text,
            "wqd_worker_items_total{handler=\"m.h\",state=\"ok\"}"
        ),
        Some(1.0),
        "{text}"
    );
}
