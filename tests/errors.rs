//! Every refusal status of the dispatch service, each checked to leave nothing behind: after a
//! refused batch the daemon's counters show no accepted batch and no item (pending, running or
//! terminal) from it, and the refusal is counted in `batches_refused`.
//!
//! The daemon runs on the `two-socket` fixture (CPUs 14-15 isolated, so `cpu:14` never has a
//! live CPU) with small limits from a config file: 100 items per batch, 1 KiB payloads.

use std::time::Duration;

use tonic::Code;
use wqd_client::proto::{self, FallbackPolicy, GetStatsResponse, ItemState};
use wqd_client::{Batch, CancelScope, Client, ClientError, Item};
use wqd_e2e::{stats, total, wait_for, wq_attrs, Daemon, RawCodec};

const LIMITS: &str = "[limits]\nmax_batch_items = 100\nmax_payload_bytes = 1024\n";

fn daemon() -> Daemon {
    Daemon::builder("two-socket").config(LIMITS).start()
}

/// Asserts that between `before` and now exactly one batch was refused and nothing of it was
/// accepted or ran.
async fn assert_refused_whole(c: &Client, before: &GetStatsResponse, what: &str) {
    let now = stats(c).await;
    assert_eq!(
        now.batches_accepted, before.batches_accepted,
        "{what}: a refused batch was counted as accepted"
    );
    assert_eq!(
        now.batches_refused,
        before.batches_refused + 1,
        "{what}: the refusal is counted once"
    );
    let (b, n) = (before.items.unwrap(), now.items.unwrap());
    assert_eq!(
        (total(&n), n.ok, n.failed),
        (total(&b), b.ok, b.failed),
        "{what}: items of a refused batch exist or ran: before {b:?}, now {n:?}"
    );
    assert_eq!(now.results_retained, before.results_retained, "{what}");
}

/// Submits `batch`, expects `code` with a message containing every one of `needles`, and
/// checks nothing was accepted.
async fn refused(c: &Client, batch: Batch, code: Code, needles: &[&str], what: &str) -> String {
    let before = stats(c).await;
    let e = c.submit(batch).await.expect_err(what);
    check_status(&e, code, needles, what);
    assert_refused_whole(c, &before, what).await;
    e.message()
}

fn check_status(e: &ClientError, code: Code, needles: &[&str], what: &str) {
    assert_eq!(e.code(), code, "{what}: {e}");
    for n in needles {
        assert!(
            e.message().contains(n),
            "{what}: the message should name {n:?}: {e}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_target_syntax_names_the_item_and_accepts_nothing() {
    let d = daemon();
    let c = d.client().await;
    for (bad, what) in [
        ("cpu: 3", "white space inside"),
        ("CPU:1", "upper case level"),
        ("cpus:", "empty cpulist"),
        ("cpu:x", "not a number"),
        ("", "empty target"),
        ("all:0", "all with an argument"),
    ] {
        let batch = Batch::new()
            .item(Item::new("cpu:0", "noop"))
            .item(Item::new("cpu:1", "noop"))
            .item(Item::new(bad, "noop"))
            .item(Item::new("cpu:2", "noop"));
        refused(
            &c,
            batch,
            Code::InvalidArgument,
            &["items[2]", "target"],
            what,
        )
        .await;
    }
    // Well-formed but naming something this machine lacks.
    for bad in ["node:9", "cpu:16", "cache:7", "cpus:10-20", "nosuchgroup"] {
        let batch = Batch::new()
            .item(Item::new(bad, "noop"))
            .item(Item::new("cpu:0", "noop"));
        refused(&c, batch, Code::InvalidArgument, &["items[0]"], bad).await;
    }
    // Through the stream, the index counts across chunks.
    let c = c.with_chunk_bytes(200);
    let before = stats(&c).await;
    let items = (0..60).map(|i| Item::new(if i == 47 { "cpu:-1" } else { "cpu:1" }, "noop"));
    let e = c.submit_stream("", items).await.unwrap_err();
    check_status(&e, Code::InvalidArgument, &["items[47]"], "stream");
    assert_refused_whole(&c, &before, "stream").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_handler_and_bad_handler_args() {
    let d = daemon();
    let c = d.client().await;
    let batch = Batch::new()
        .item(Item::new("cpu:0", "noop"))
        .item(Item::new("cpu:0", "frobnicate"));
    refused(
        &c,
        batch,
        Code::InvalidArgument,
        &["items[1]", "frobnicate"],
        "unknown handler",
    )
    .await;
    for (item, what) in [
        (Item::new("cpu:0", "spin").arg("ms", "abc"), "spin ms=abc"),
        (Item::new("cpu:0", "spin"), "spin without a duration"),
        (
            Item::new("cpu:0", "spin").arg("ms", "1").arg("us", "1"),
            "spin ms and us",
        ),
        (
            Item::new("cpu:0", "sleep").arg("ms", "700000"),
            "sleep over the cap",
        ),
        (
            Item::new("cpu:0", "noop").arg("colour", "red"),
            "unknown argument",
        ),
        (
            Item::new("cpu:0", "noop").arg("fail", ""),
            "empty fail text",
        ),
        (
            Item::new("cpu:0", "digest").arg("algo", "md5"),
            "digest algo",
        ),
    ] {
        let batch = Batch::new()
            .item(Item::new("cpu:0", "noop"))
            .item(Item::new("cpu:1", "noop"))
            .item(item);
        refused(&c, batch, Code::InvalidArgument, &["items[2]"], what).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_workqueue_is_not_found() {
    let d = daemon();
    let c = d.client().await;
    let batch = Batch::new()
        .workqueue("nope")
        .item(Item::new("cpu:0", "noop"));
    refused(&c, batch, Code::NotFound, &["nope"], "Submit").await;
    let before = stats(&c).await;
    let e = c
        .submit_stream("nope", [Item::new("cpu:0", "noop")])
        .await
        .unwrap_err();
    check_status(&e, Code::NotFound, &["nope"], "SubmitStream");
    assert_refused_whole(&c, &before, "SubmitStream").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_batch_and_payload_name_the_limit() {
    let d = daemon();
    let c = d.client().await;
    // 100 is fine, 101 is one too many, by Submit or SubmitStream.
    let ok = Batch::new().items((0..100).map(|_| Item::new("cpu:0", "noop")));
    c.submit(ok.wait(true)).await.expect("a batch at the limit");
    let big = Batch::new().items((0..101).map(|_| Item::new("cpu:0", "noop")));
    refused(
        &c,
        big,
        Code::InvalidArgument,
        &["max_batch_items"],
        "101 items",
    )
    .await;
    let before = stats(&c).await;
    let e = c
        .clone()
        .with_chunk_bytes(300)
        .submit_stream("", (0..101).map(|_| Item::new("cpu:0", "noop")))
        .await
        .unwrap_err();
    check_status(
        &e,
        Code::InvalidArgument,
        &["max_batch_items"],
        "stream of 101",
    );
    assert_refused_whole(&c, &before, "stream of 101").await;
    // GetResults takes at most max_batch_items ids.
    let e = c.results(1..=101).await.unwrap_err();
    check_status(
        &e,
        Code::InvalidArgument,
        &["max_batch_items"],
        "GetResults",
    );

    // Payload: 1024 bytes is fine, 1025 is refused, naming the item and the limit.
    c.submit(
        Batch::new()
            .item(Item::new("cpu:0", "digest").payload(vec![7u8; 1024]))
            .wait(true),
    )
    .await
    .expect("a payload at the limit");
    let batch = Batch::new()
        .item(Item::new("cpu:0", "digest"))
        .item(Item::new("cpu:0", "digest").payload(vec![7u8; 1025]));
    refused(
        &c,
        batch,
        Code::InvalidArgument,
        &["items[1]", "max_payload_bytes"],
        "payload of 1025 bytes",
    )
    .await;
}

/// A request message over `limits.max_message_bytes` is refused by tonic before wqd's
/// handlers see it; wqd still answers RESOURCE_EXHAUSTED naming the limit (not tonic's
/// OUT_OF_RANGE), by Submit or by one SubmitStream message, and accepts nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_max_message_bytes_is_resource_exhausted_naming_the_limit() {
    let d = Daemon::builder("two-socket")
        .config("[limits]\nmax_message_bytes = 4096\nmax_payload_bytes = 1024\n")
        .start();
    let c = d.client().await;
    let item = || Item::new("cpu:0", "digest").payload(vec![7u8; 1000]);
    // Three payloads fit in one message; ten do not (each payload is within its own limit).
    c.submit(Batch::new().items((0..3).map(|_| item())).wait(true))
        .await
        .expect("a message under the limit");
    let before = stats(&c).await;
    let e = c
        .submit(Batch::new().items((0..10).map(|_| item())).wait(true))
        .await
        .expect_err("a 10 KB Submit");
    check_status(
        &e,
        Code::ResourceExhausted,
        &["limits.max_message_bytes", "4096"],
        "Submit over the message limit",
    );
    let e = c
        .clone()
        .with_chunk_bytes(64 << 10)
        .submit_stream("", (0..10).map(move |_| item()))
        .await
        .expect_err("a 10 KB SubmitStream message");
    check_status(
        &e,
        Code::ResourceExhausted,
        &["limits.max_message_bytes"],
        "SubmitStream message over the message limit",
    );
    let now = stats(&c).await;
    assert_eq!(
        now.batches_accepted, before.batches_accepted,
        "nothing accepted"
    );
    let (b, n) = (before.items.unwrap(), now.items.unwrap());
    assert_eq!(total(&n), total(&b), "no item from the refused messages");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_is_resource_exhausted_and_keeps_what_it_had() {
    let d = daemon();
    let c = d.client().await;
    c.create_workqueue(proto::WorkqueueAttrs {
        max_queued: 3,
        fallback: FallbackPolicy::Wait as i32,
        ..wq_attrs("tiny")
    })
    .await
    .expect("create");
    // cpu:14 is isolated: with fallback wait its items stay pending.
    let r = c
        .submit(
            Batch::new()
                .workqueue("tiny")
                .items((0..3).map(|_| Item::new("cpu:14", "noop"))),
        )
        .await
        .expect("three fit");
    let held: Vec<u64> = r.items.iter().map(|x| x.item_id).collect();
    assert_eq!(
        wqd_e2e::states(&c, &held).await,
        vec![ItemState::Pending; 3]
    );
    let batch = Batch::new()
        .workqueue("tiny")
        .item(Item::new("cpu:0", "noop"));
    refused(
        &c,
        batch,
        Code::ResourceExhausted,
        &["max_queued"],
        "one more than max_queued",
    )
    .await;
    let before = stats(&c).await;
    let e = c
        .submit_stream("tiny", [Item::new("cpu:0", "noop")])
        .await
        .unwrap_err();
    check_status(&e, Code::ResourceExhausted, &["max_queued"], "stream");
    assert_refused_whole(&c, &before, "stream").await;
    // The held items are untouched; freeing the queue lets work in again.
    assert_eq!(
        wqd_e2e::states(&c, &held).await,
        vec![ItemState::Pending; 3]
    );
    let l = c.list_workqueues(Some("tiny".into())).await.expect("List");
    assert_eq!(l[0].stats.as_ref().unwrap().pending, 3);
    c.cancel(CancelScope::Batch(r.batch_id))
        .await
        .expect("Cancel");
    c.submit(
        Batch::new()
            .workqueue("tiny")
            .items((0..3).map(|_| Item::new("cpu:0", "noop")))
            .wait(true),
    )
    .await
    .expect("room again after the cancel");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_refused() {
    let d = daemon();
    let c = d.client().await;

    // An empty batch.
    refused(&c, Batch::new(), Code::InvalidArgument, &[], "empty batch").await;

    // Stream framing: options missing on the first message, or repeated later.
    let item = proto::WorkItem {
        target: "cpu:0".into(),
        handler: "noop".into(),
        ..Default::default()
    };
    let opts = Some(proto::SubmitOptions::default());
    for (msgs, what) in [
        (
            vec![proto::SubmitStreamRequest {
                options: None,
                items: vec![item.clone()],
                commit: true,
            }],
            "no options on the first message",
        ),
        (
            vec![
                proto::SubmitStreamRequest {
                    options: opts.clone(),
                    items: vec![item.clone()],
                    commit: false,
                },
                proto::SubmitStreamRequest {
                    options: opts.clone(),
                    items: vec![item.clone()],
                    commit: true,
                },
            ],
            "options on a later message",
        ),
    ] {
        let before = stats(&c).await;
        let e = c
            .dispatch_stub()
            .submit_stream(tokio_stream::iter(msgs))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{what}: {e:?}");
        assert_refused_whole(&c, &before, what).await;
    }

    // Bytes that are not a SubmitRequest at all (wire type 7 does not exist).
    let before = stats(&c).await;
    let mut g = tonic::client::Grpc::new(d.channel().await);
    g.ready().await.expect("channel ready");
    let e = g
        .unary(
            tonic::Request::new(vec![0x0f_u8, 0xff, 0xff, 0xff]),
            "/wqd.v1.DispatchService/Submit".parse().unwrap(),
            RawCodec,
        )
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Code::InvalidArgument,
        "an undecodable request is the caller's error, not INTERNAL: {e:?}"
    );
    let now = stats(&c).await;
    assert_eq!(now.batches_accepted, before.batches_accepted);
    assert_eq!(total(&now.items.unwrap()), total(&before.items.unwrap()));

    // The daemon still works afterwards.
    let r = c
        .submit(Batch::new().item(Item::new("cpu:0", "noop")).wait(true))
        .await
        .expect("a good batch after the bad ones");
    assert_eq!(r.results[0].state(), ItemState::Ok);
    wait_for("stats to settle", Duration::from_secs(5), || async {
        let s = stats(&c).await.items.unwrap();
        (s.pending + s.running == 0).then_some(())
    })
    .await;
}

/// A `Submit(wait)` response over `limits.max_message_bytes` is RESOURCE_EXHAUSTED (the batch
/// was accepted and ran; Flush fetches its results), and one under it comes back whole, even
/// when the daemon's cheap size bound is over the limit and only the exact size fits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_receipts_mode_is_refused_whole() {
    let d = daemon();
    let c = d.client().await;
    for mode in [3, -1, i32::MAX] {
        let before = stats(&c).await;
        let e = c
            .dispatch_stub()
            .submit(proto::SubmitRequest {
                items: vec![Item::new("cpu:0", "noop").into_proto()],
                receipts: mode,
                ..Default::default()
            })
            .await
            .expect_err("an unknown receipts mode");
        assert_eq!(e.code(), Code::InvalidArgument, "{mode}: {e:?}");
        assert!(
            e.message().contains("receipts") && e.message().contains(&mode.to_string()),
            "the message names the field and the value: {e:?}"
        );
        assert_refused_whole(&c, &before, "unknown receipts mode").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_wait_response_over_the_message_limit_is_resource_exhausted() {
    // A `noop` result on `all` takes ≈ 90 bytes here; the daemon's bound counts ≈ 300.
    let d = Daemon::builder("two-socket")
        .config("[limits]\nmax_message_bytes = 16384\n")
        .start();
    let c = d.client().await;
    let wait = |n: usize| {
        Batch::new()
            .items((0..n).map(|_| Item::new("all", "noop")))
            .wait(true)
    };
    // Under the bound, then over the bound but under the limit: every result, in order.
    for n in [10, 100] {
        let r = c.submit(wait(n)).await.expect("fits in one message");
        assert_eq!(r.results.len(), n);
        for (res, rec) in r.results.iter().zip(&r.items) {
            assert_eq!(res.item_id, rec.item_id, "results in submission order");
            assert_eq!(res.state(), ItemState::Ok);
        }
    }
    let before = stats(&c).await;
    let e = c
        .submit(wait(300))
        .await
        .expect_err("300 results do not fit");
    check_status(
        &e,
        Code::ResourceExhausted,
        &["limits.max_message_bytes = 16384", "Flush (batch_id "],
        "response over the limit",
    );
    let now = stats(&c).await;
    assert_eq!(
        now.batches_accepted,
        before.batches_accepted + 1,
        "it was accepted"
    );
    assert_eq!(
        now.items.unwrap().ok,
        before.items.unwrap().ok + 300,
        "and it ran"
    );
}
