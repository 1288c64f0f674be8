//! `DispatchService.Session` against the real daemon: every request answered once, by tag, as
//! `Submit` would answer it; refusals answered without ending the session; answers in the
//! order requests finish; half-close, deadline, the in-flight bound, a message over the
//! limits and the daemon stopping each end the session as the contract says, and the work
//! of a session that ended goes on.
//!
//! The daemon runs on the `two-socket` fixture with 100 items per batch at most.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tonic::Code;
use wqd_client::proto::{self, ItemState, LookupStatus};
use wqd_client::{Batch, Client, Item};
use wqd_e2e::{stats, total, wait_for, Daemon};

const LIMITS: &str = "[limits]\nmax_batch_items = 100\n";

fn daemon() -> Daemon {
    Daemon::builder("two-socket").config(LIMITS).start()
}

/// A waiting batch of one 30-second item, on CPU `i % 4`.
fn long_wait(i: usize) -> Batch {
    Batch::new()
        .item(Item::new(format!("cpu:{}", i % 4), "sleep").arg("ms", "30000"))
        .wait(true)
}

/// 240 requests in rounds of 60 (sent, then read): waiting ones of 1 to 5 items with every
/// 5th failing, and not-waiting ones. Every tag is answered once; a waiting answer carries
/// one result per item, in order, each the one `GetResults` has; a not-waiting one carries
/// receipts only. Fails if an answer is lost, doubled, mis-tagged or not Submit's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_answers_every_request_once_by_tag_as_submit_would() {
    let d = daemon();
    let c = d.client().await;
    let mut s = c.session().await.expect("Session");
    // tag → (items, wait)
    let mut sent: BTreeMap<u64, (usize, bool)> = BTreeMap::new();
    let mut answered = BTreeSet::new();
    let mut waited_ids = Vec::new();
    for round in 0..4u64 {
        for i in 0..60u64 {
            let k = round * 60 + i;
            let n = (k % 5 + 1) as usize;
            let wait = k % 3 != 0;
            let items = (0..n).map(|j| {
                let it = Item::new(format!("cpu:{}", (k as usize + j) % 4), "noop");
                if j % 5 == 4 || k % 5 == 0 && j == 0 {
                    it.arg("fail", format!("request {k} item {j}"))
                } else {
                    it
                }
            });
            let tag = s
                .send(Batch::new().items(items).wait(wait))
                .await
                .expect("send");
            assert_eq!(tag, k + 1, "tags count up from 1");
            sent.insert(tag, (n, wait));
        }
        for _ in 0..60 {
            let a = s.next().await.expect("answer").expect("not ended");
            assert!(answered.insert(a.tag), "tag {} answered twice", a.tag);
            let (n, wait) = sent[&a.tag];
            let r = a.outcome.expect("accepted");
            assert_eq!(r.items.len(), n, "tag {}: one receipt per item", a.tag);
            assert!(r.items.iter().all(|x| x.queued && x.item_id != 0));
            if !wait {
                assert!(r.results.is_empty() && r.counts.is_none(), "tag {}", a.tag);
                continue;
            }
            let ids: Vec<u64> = r.items.iter().map(|x| x.item_id).collect();
            let got: Vec<u64> = r.results.iter().map(|x| x.item_id).collect();
            assert_eq!(got, ids, "tag {}: results in submission order", a.tag);
            let k = a.tag - 1;
            for (j, res) in r.results.iter().enumerate() {
                let fails = j % 5 == 4 || k % 5 == 0 && j == 0;
                let want = if fails {
                    ItemState::Failed
                } else {
                    ItemState::Ok
                };
                assert_eq!(res.state(), want, "tag {} item {j}", a.tag);
            }
            let counts = r.counts.expect("counts with wait");
            assert_eq!(total(&counts), n as u64);
            waited_ids.extend(r.results.into_iter().map(|x| (x.item_id, x)));
        }
        assert_eq!(s.open(), 0);
    }
    assert_eq!(answered.len(), 240);
    let (ids, want): (Vec<u64>, Vec<proto::ItemResult>) = waited_ids.into_iter().unzip();
    for (ids, want) in ids.chunks(100).zip(want.chunks(100)) {
        let stored = c.results(ids.to_vec()).await.expect("GetResults");
        assert_eq!(stored.items.len(), ids.len());
        for (l, w) in stored.items.iter().zip(want) {
            assert_eq!(l.status(), LookupStatus::Found);
            assert_eq!(
                l.result.as_ref(),
                Some(w),
                "the stored result is the one answered"
            );
        }
    }
    s.close();
    assert!(s.next().await.expect("clean end").is_none());
}

/// Refused requests are answered with Submit's status, count as refused batches, queue
/// nothing, and the session goes on to accept the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_request_is_answered_with_its_status_and_the_session_goes_on() {
    let d = daemon();
    let c = d.client().await;
    let before = stats(&c).await;
    let mut s = c.session().await.expect("Session");
    let bad: Vec<(Batch, Code, &str)> = vec![
        (
            Batch::new()
                .item(Item::new("cpu:0", "noop"))
                .workqueue("nope"),
            Code::NotFound,
            "nope",
        ),
        (
            Batch::new()
                .item(Item::new("cpu:0", "noop"))
                .item(Item::new("bogus:1", "noop")),
            Code::InvalidArgument,
            "items[1].target",
        ),
        (
            Batch::new().item(Item::new("cpu:0", "frobnicate")),
            Code::InvalidArgument,
            "frobnicate",
        ),
    ];
    for (b, code, says) in bad {
        let e = s.submit(b).await.expect_err("refused");
        assert_eq!(e.code(), code, "{e}");
        assert!(e.message().contains(says), "{e}");
    }
    // A request without its batch, through the stock stub.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut raw = c
        .dispatch_stub()
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("stub session")
        .into_inner();
    tx.send(proto::SessionRequest {
        tag: 7,
        submit: None,
        wait_timeout: None,
    })
    .await
    .expect("send");
    let refusal = |m: proto::SessionResponse, tag: u64, says: &str| {
        assert_eq!(m.tag, tag);
        match m.outcome {
            Some(proto::session_response::Outcome::Error(e)) => {
                assert_eq!(e.code, Code::InvalidArgument as i32, "{}", e.message);
                assert!(e.message.contains(says), "{}", e.message);
                assert_eq!(e.batch_id, 0, "nothing queued");
            }
            other => panic!("want an error, got {other:?}"),
        }
    };
    refusal(
        raw.message().await.expect("answer").expect("one"),
        7,
        "submit",
    );
    // Wait limits that are refused: negative, nanos out of range, and one on a request that
    // does not wait.
    let one = || proto::SubmitRequest {
        items: vec![Item::new("cpu:0", "noop").into_proto()],
        wait: true,
        ..Default::default()
    };
    for (tag, wait, seconds, nanos, says) in [
        (8, true, -1, 0, "wait_timeout: must not be negative"),
        (9, true, 0, 1_000_000_000, "wait_timeout: nanos"),
        (
            10,
            false,
            1,
            0,
            "wait_timeout: set on a request without submit.wait",
        ),
    ] {
        tx.send(proto::SessionRequest {
            tag,
            submit: Some(proto::SubmitRequest { wait, ..one() }),
            wait_timeout: Some(prost_types::Duration { seconds, nanos }),
        })
        .await
        .expect("send");
        refusal(
            raw.message().await.expect("answer").expect("one"),
            tag,
            says,
        );
    }
    drop(tx);
    assert!(raw.message().await.expect("clean end").is_none());

    let mid = stats(&c).await;
    assert_eq!(mid.batches_accepted, before.batches_accepted);
    assert_eq!(mid.batches_refused, before.batches_refused + 7);
    assert_eq!(total(&mid.items.unwrap()), total(&before.items.unwrap()));
    let r = s
        .submit(Batch::new().item(Item::new("cpu:1", "noop")).wait(true))
        .await
        .expect("accepted after refusals");
    assert_eq!(r.results[0].state(), ItemState::Ok);
}

/// Answers come in the order requests finish: a not-waiting request sent after a waiting
/// one is answered first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_come_as_requests_finish_not_as_sent() {
    let d = daemon();
    let c = d.client().await;
    let mut s = c.session().await.expect("Session");
    let slow = s
        .send(
            Batch::new()
                .item(Item::new("cpu:1", "sleep").arg("ms", "800"))
                .wait(true),
        )
        .await
        .expect("send");
    let quick = s
        .send(Batch::new().item(Item::new("cpu:2", "noop")))
        .await
        .expect("send");
    let first = s.next().await.expect("answer").expect("one");
    assert_eq!(first.tag, quick, "the quick request is answered first");
    let second = s.next().await.expect("answer").expect("one");
    assert_eq!(second.tag, slow);
    let r = second.outcome.expect("accepted");
    assert_eq!(r.results[0].state(), ItemState::Ok);
}

/// A request's wait limit ends its own wait: it is answered DEADLINE_EXCEEDED with its
/// batch's id once the limit passes, while its item still runs; the batch can be flushed by
/// that id and its item ends OK; requests sent after it are answered, and the session goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_limit_ends_that_requests_wait_and_the_session_goes_on() {
    let d = daemon();
    let c = d.client().await;
    let mut s = c.session().await.expect("Session");
    let began = std::time::Instant::now();
    let limited = s
        .send_with_wait_limit(
            Batch::new()
                .item(Item::new("cpu:1", "sleep").arg("ms", "1500"))
                .wait(true),
            Duration::from_millis(300),
        )
        .await
        .expect("send");
    let quick = s
        .send(Batch::new().item(Item::new("cpu:2", "noop")).wait(true))
        .await
        .expect("send");
    let a = s.next().await.expect("answer").expect("one");
    assert_eq!(a.tag, quick);
    assert_eq!(a.outcome.expect("ok").results[0].state(), ItemState::Ok);
    let a = s.next().await.expect("answer").expect("one");
    let waited = began.elapsed();
    assert_eq!(a.tag, limited);
    let e = a.outcome.expect_err("its wait ended");
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e}");
    assert!(
        (Duration::from_millis(300)..Duration::from_millis(1400)).contains(&waited),
        "answered after {waited:?}: the limit, not the item, ended the wait"
    );
    let batch = a.queued_batch.expect("the queued batch is named");
    assert!(e.message().contains(&format!("batch {batch}")), "{e}");
    assert_eq!(
        stats(&c).await.items.unwrap().running,
        1,
        "the item still runs"
    );
    // The session goes on while the item runs, and the batch is flushed by its id.
    let r = s
        .submit(Batch::new().item(Item::new("cpu:3", "noop")).wait(true))
        .await
        .expect("the session goes on");
    assert_eq!(r.results[0].state(), ItemState::Ok);
    let (results, summary) = c
        .flush_all(wqd_client::FlushScope::Batch(batch))
        .await
        .expect("flush the batch");
    assert_eq!(summary.items_covered, 1);
    assert_eq!(results[0].state(), ItemState::Ok, "the work went on");
    // A limit the batch beats changes nothing.
    let tag = s
        .send_with_wait_limit(
            Batch::new().item(Item::new("cpu:0", "noop")).wait(true),
            Duration::from_secs(30),
        )
        .await
        .expect("send");
    let a = s.next().await.expect("answer").expect("one");
    assert_eq!((a.tag, a.queued_batch), (tag, None));
    assert_eq!(a.outcome.expect("ok").results[0].state(), ItemState::Ok);
    assert!(s
        .send_with_wait_limit(
            Batch::new().item(Item::new("cpu:0", "noop")),
            Duration::from_secs(1)
        )
        .await
        .is_err_and(|e| e.code() == Code::InvalidArgument));
}

/// A request whose wait limit passed no longer holds one of the session's 64 places: 64
/// waiting requests for 30-second items, each limited to 300 ms, then a 65th request, which
/// is read and answered once the limits pass (without them it would wait 30 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_its_wait_limit_frees_its_place() {
    let d = daemon();
    let c = d.client().await;
    let before = stats(&c).await.batches_accepted;
    let mut s = c.session().await.expect("Session");
    for i in 0..64 {
        s.send_with_wait_limit(long_wait(i), Duration::from_millis(300))
            .await
            .expect("send");
    }
    let last = s
        .send(Batch::new().item(Item::new("cpu:0", "noop")))
        .await
        .expect("send");
    let mut batches = BTreeSet::new();
    let answered = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            let a = s.next().await.expect("answer").expect("one");
            if a.tag == last {
                return a;
            }
            let e = a.outcome.expect_err("each limited wait ends");
            assert_eq!(e.code(), Code::DeadlineExceeded, "{e}");
            assert!(batches.insert(a.queued_batch.expect("named")));
        }
    })
    .await
    .expect("the 65th request answered well before its neighbours' items end");
    answered.outcome.expect("accepted");
    assert!(!batches.is_empty(), "a place was freed by a limit");
    assert_eq!(stats(&c).await.batches_accepted - before, 65);
}

/// A split session: two tasks send 150 waiting requests each through clones of the sender
/// while a third reads the answers, far more than the 64 the daemon reads ahead and the
/// client buffers (sent without reading, they would stall). Every tag from 1 to 300 is
/// answered once, and once both senders are dropped the receiver sees the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_session_sends_from_two_tasks_and_reads_in_a_third() {
    let d = daemon();
    let c = d.client().await;
    let (tx, mut rx) = c.session().await.expect("Session").split();
    let senders: Vec<_> = (0..2)
        .map(|k| {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut tags = Vec::new();
                for i in 0..150 {
                    let b = Batch::new()
                        .item(Item::new(format!("cpu:{}", (k + 2 * i) % 4), "noop"))
                        .wait(true);
                    tags.push(tx.send(b).await.expect("send"));
                }
                tags
            })
        })
        .collect();
    tx.close();
    let reader = tokio::spawn(async move {
        let mut answered = BTreeSet::new();
        while let Some(a) = rx.next().await.expect("no error") {
            let r = a.outcome.expect("accepted");
            assert_eq!(r.results[0].state(), ItemState::Ok);
            assert!(answered.insert(a.tag), "tag {} answered twice", a.tag);
        }
        (answered, rx.open())
    });
    let mut sent = BTreeSet::new();
    for s in senders {
        let tags = tokio::time::timeout(Duration::from_secs(60), s)
            .await
            .expect("the senders never stall on unread answers")
            .expect("join");
        sent.extend(tags);
    }
    let (answered, open) = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .expect("the session ends once both senders are gone")
        .expect("join");
    assert_eq!(
        sent,
        (1..=300).collect::<BTreeSet<u64>>(),
        "tags 1 to 300, once each"
    );
    assert_eq!(answered, sent, "every request answered once");
    assert_eq!(open, 0);
}

/// A session's batches are queued in the order sent, even when an earlier one is large enough
/// to leave the request's task (over 1 024 items): on an ordered workqueue, five one-item
/// batches sent right behind a 3 000-item one get later item ids and start after its last
/// item ends. (With such batches submitted through the blocking pool instead of in place,
/// this fails in the first round: checked.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sessions_batches_are_queued_in_the_order_sent() {
    let d = Daemon::builder("two-socket").start();
    let c = d.client().await;
    c.create_workqueue(proto::WorkqueueAttrs {
        name: "in-order".into(),
        ordered: true,
        ..Default::default()
    })
    .await
    .expect("create the ordered workqueue");
    for round in 0..3 {
        let mut s = c.session().await.expect("Session");
        let big = s
            .send(
                Batch::new()
                    .workqueue("in-order")
                    .items((0..3000).map(|_| Item::new("all", "noop")))
                    .wait(true),
            )
            .await
            .expect("send");
        for _ in 0..5 {
            s.send(
                Batch::new()
                    .workqueue("in-order")
                    .item(Item::new("all", "noop"))
                    .wait(true),
            )
            .await
            .expect("send");
        }
        s.close();
        let mut answers = BTreeMap::new();
        while let Some(a) = s.next().await.expect("no error") {
            answers.insert(a.tag, a.outcome.expect("accepted"));
        }
        assert_eq!(answers.len(), 6);
        let at = |t: &Option<prost_types::Timestamp>| {
            let t = t.as_ref().expect("timestamp");
            (t.seconds, t.nanos)
        };
        let big = &answers[&big];
        let last_id = big
            .results
            .iter()
            .map(|r| r.item_id)
            .max()
            .expect("results");
        let last_end = big.results.iter().map(|r| at(&r.finished_at)).max();
        for (tag, r) in answers.iter().filter(|(t, _)| **t != 1) {
            let one = &r.results[0];
            assert!(
                one.item_id > last_id,
                "round {round}: request {tag}'s item {} was queued before the 3 000 sent \
                 ahead of it (the last of them {last_id})",
                one.item_id
            );
            assert!(
                Some(at(&one.started_at)) >= last_end,
                "round {round}: request {tag}"
            );
        }
    }
}

/// After a half-close the daemon answers every open request, then ends the stream with OK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_close_answers_the_open_requests_then_ends() {
    let d = daemon();
    let c = d.client().await;
    let mut s = c.session().await.expect("Session");
    for i in 0..3 {
        s.send(
            Batch::new()
                .item(Item::new(format!("cpu:{i}"), "sleep").arg("ms", "300"))
                .wait(true),
        )
        .await
        .expect("send");
    }
    s.close();
    assert!(s
        .send(Batch::new().item(Item::new("cpu:0", "noop")))
        .await
        .is_err());
    let mut tags = BTreeSet::new();
    while let Some(a) = s.next().await.expect("no error") {
        let r = a.outcome.expect("accepted");
        assert_eq!(r.results[0].state(), ItemState::Ok);
        tags.insert(a.tag);
    }
    assert_eq!(
        tags,
        BTreeSet::from([1, 2, 3]),
        "every open request answered"
    );
}

/// The daemon reads at most 64 requests of a session ahead of its answers: 80 waiting
/// requests for 30-second items leave 64 batches accepted. Dropping the session leaves their
/// work in place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_reads_at_most_64_requests_ahead_of_its_answers() {
    let d = daemon();
    let c = d.client().await;
    let before = stats(&c).await.batches_accepted;
    let mut s = c.session().await.expect("Session");
    for i in 0..80 {
        s.send(long_wait(i)).await.expect("send");
    }
    wait_for("64 batches accepted", Duration::from_secs(10), || async {
        (stats(&c).await.batches_accepted - before == 64).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        stats(&c).await.batches_accepted - before,
        64,
        "no 65th request read while 64 are open"
    );
    drop(s);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let st = stats(&c).await;
    assert_eq!(st.batches_accepted - before, 64);
    let items = st.items.unwrap();
    assert_eq!(
        (items.pending + items.running, items.cancelled),
        (64, 0),
        "the work of a dropped session goes on"
    );
}

/// A request over the limits ends the session with its status, after the requests read
/// before it are answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_limits_ends_the_session_after_the_open_answers() {
    let d = daemon();
    let c = d.client().await;
    let mut s = c.session().await.expect("Session");
    let first = s
        .send(
            Batch::new()
                .item(Item::new("cpu:1", "sleep").arg("ms", "300"))
                .wait(true),
        )
        .await
        .expect("send");
    s.send(Batch::new().items((0..101).map(|_| Item::new("cpu:0", "noop"))))
        .await
        .expect("send");
    let a = s.next().await.expect("answer").expect("one");
    assert_eq!(a.tag, first);
    assert_eq!(
        a.outcome.expect("accepted").results[0].state(),
        ItemState::Ok
    );
    let e = s.next().await.expect_err("the session ends");
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains("limits.max_batch_items = 100"), "{e}");
}

/// The client's deadline ends the session with DEADLINE_EXCEEDED; the item runs anyway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_deadline_ends_it_and_the_work_goes_on() {
    let d = daemon();
    let c: Client = d.client().await;
    let ok_before = stats(&c).await.items.unwrap().ok;
    let short = c.clone().with_timeout(Some(Duration::from_millis(400)));
    let mut s = short.session().await.expect("Session");
    s.send(
        Batch::new()
            .item(Item::new("cpu:3", "sleep").arg("ms", "1200"))
            .wait(true),
    )
    .await
    .expect("send");
    let e = s.next().await.expect_err("deadline");
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e}");
    wait_for("the item to end", Duration::from_secs(10), || async {
        (stats(&c).await.items.unwrap().ok == ok_before + 1).then_some(())
    })
    .await;
}

/// A daemon that stops reads no more requests of a session, answers the open ones (as it
/// answers unary calls in its grace period), then ends the session with UNAVAILABLE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_daemon_answers_the_open_requests_then_ends_its_sessions() {
    let mut d = daemon();
    let c = d.client().await;
    let mut s = c.session().await.expect("Session");
    let tag = s
        .send(
            Batch::new()
                .item(Item::new("cpu:0", "sleep").arg("ms", "1000"))
                .wait(true),
        )
        .await
        .expect("send");
    wait_for("the item running", Duration::from_secs(10), || async {
        (stats(&c).await.items.unwrap().running == 1).then_some(())
    })
    .await;
    let stop = tokio::task::spawn_blocking(move || {
        let st = d.stop();
        (st, d)
    });
    let a = s.next().await.expect("the open answer").expect("one");
    assert_eq!(a.tag, tag);
    assert_eq!(
        a.outcome.expect("accepted").results[0].state(),
        ItemState::Ok
    );
    let e = s.next().await.expect_err("the session ends");
    assert_eq!(e.code(), Code::Unavailable, "{e}");
    assert!(e.message().contains("stopping"), "{e}");
    let (st, _d) = stop.await.expect("join");
    assert!(
        st.is_some_and(|s| s.success()),
        "the daemon stops cleanly: {st:?}"
    );
}
