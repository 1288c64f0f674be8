//! Issue #10 against the real daemon: each hostile request that once broke the contract, and
//! what it must do now. A cancelled stream queues nothing; huge durations are refused whole;
//! oversized requests are refused before they are decoded (the daemon's peak RSS barely
//! moves); responses and stored results are bounded in bytes; error messages quote a short
//! prefix; malformed messages are INVALID_ARGUMENT; totals never go down; flushes do not wait
//! out delays; a timed-out delete leaves a workqueue draining, visibly, until an update or a
//! later delete resolves it.
//!
//! The daemon runs on the `two-socket` fixture (16 CPUs, pinning off) with default limits
//! unless a test says otherwise.

use std::time::{Duration, Instant};

use tonic::Code;
use wqd_client::proto::{self, ItemState};
use wqd_client::{Batch, FlushScope, Item};
use wqd_e2e::{stats, total, wait_for, wq_attrs, Daemon, RawCodec};

/// A status field of `/proc/PID/status`, in kB.
fn proc_kb(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
}

/// Sends raw bytes as a gRPC message to `path`; the status, or the raw response.
async fn raw_unary(d: &Daemon, path: &str, bytes: Vec<u8>) -> Result<Vec<u8>, tonic::Status> {
    let mut g = tonic::client::Grpc::new(d.channel().await)
        .max_encoding_message_size(usize::MAX)
        .max_decoding_message_size(usize::MAX);
    g.ready().await.expect("channel ready");
    g.unary(tonic::Request::new(bytes), path.parse().unwrap(), RawCodec)
        .await
        .map(|r| r.into_inner())
}

/// The encoded `SubmitRequest` of `n` items `{target: "all", handler: "noop"}`, built
/// directly as bytes (13 bytes an item) so the test itself stays small.
fn tiny_items(n: usize) -> Vec<u8> {
    let item: [u8; 11] = [0x0a, 3, b'a', b'l', b'l', 0x12, 4, b'n', b'o', b'o', b'p'];
    let mut out = Vec::with_capacity(n * 13);
    for _ in 0..n {
        out.push(0x12);
        out.push(item.len() as u8);
        out.extend_from_slice(&item);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_or_uncommitted_stream_queues_nothing() {
    let d = Daemon::start("two-socket");
    let c = d.client().await;
    let item = proto::WorkItem {
        target: "cpu:0".into(),
        handler: "sleep".into(),
        args: [("ms".to_string(), "1000".to_string())].into(),
        ..Default::default()
    };
    let chunk = |first: bool, commit: bool| proto::SubmitStreamRequest {
        options: first.then(proto::SubmitOptions::default),
        items: vec![item.clone(); 1000],
        commit,
    };
    let before = stats(&c).await;

    // 1. 15 chunks sent, then the client cancels the call (RST_STREAM CANCEL): before the fix
    //    the daemon read the reset as a clean end and queued all 15 000.
    let (tx, rx) = tokio::sync::mpsc::channel(32);
    for i in 0..15 {
        tx.send(chunk(i == 0, false)).await.unwrap();
    }
    let mut stub = c.dispatch_stub();
    let call = tokio::spawn(async move {
        stub.submit_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    call.abort();
    let _ = call.await;
    drop(tx);

    // 2. A stream that half-closes cleanly without commit.
    let e = c
        .dispatch_stub()
        .submit_stream(tokio_stream::iter(vec![
            chunk(true, false),
            chunk(false, false),
        ]))
        .await
        .expect_err("no commit");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("commit"), "{e:?}");

    // 3. A message after the commit refuses the whole stream.
    let e = c
        .dispatch_stub()
        .submit_stream(tokio_stream::iter(vec![
            chunk(true, true),
            chunk(false, false),
        ]))
        .await
        .expect_err("a message after the commit");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    tokio::time::sleep(Duration::from_millis(300)).await;
    let now = stats(&c).await;
    let (b, n) = (before.items.unwrap(), now.items.unwrap());
    assert_eq!(
        total(&n),
        total(&b),
        "a cancelled or uncommitted stream queued items: before {b:?}, now {n:?}"
    );
    assert_eq!(now.batches_accepted, before.batches_accepted);

    // A committed stream still works.
    let r = c
        .submit_stream("", (0..3).map(|_| Item::new("cpu:1", "noop")))
        .await
        .expect("committed stream");
    assert_eq!(r.item_count, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_delays_and_deadlines_are_refused_whole() {
    let d = Daemon::start("two-socket");
    let c = d.client().await;
    let before = stats(&c).await;
    let huge = |secs: i64, nanos: i32| prost_types::Duration {
        seconds: secs,
        nanos,
    };
    for (field, d_, needle) in [
        ("delay", huge(i64::MAX, 0), "range"),
        ("deadline", huge(i64::MAX - 1, 999_999_999), "range"),
        ("delay", huge(315_576_000_001, 0), "range"),
        ("delay", huge(-1, 0), "negative"),
        ("delay", huge(0, 1_000_000_000), "nanos"),
        ("delay", huge(366 * 86_400, 0), "limits.max_delay"),
        ("deadline", huge(400 * 86_400, 0), "limits.max_deadline"),
    ] {
        let mut bad = Item::new("cpu:2", "noop").key("k-bad").into_proto();
        if field == "delay" {
            bad.delay = Some(d_);
        } else {
            bad.deadline = Some(d_);
        }
        let req = proto::SubmitRequest {
            workqueue: String::new(),
            items: vec![
                Item::new("cpu:2", "noop").key("k0").into_proto(),
                Item::new("cpu:2", "noop")
                    .delay(Duration::from_secs(5))
                    .into_proto(),
                bad,
            ],
            wait: false,
            receipts: 0,
        };
        let e = c.dispatch_stub().submit(req).await.expect_err(field);
        assert_eq!(e.code(), Code::InvalidArgument, "{field} {d_:?}: {e:?}");
        assert!(
            e.message().starts_with(&format!("items[2].{field}")) && e.message().contains(needle),
            "{field} {d_:?}: {}",
            e.message()
        );
    }
    let now = stats(&c).await;
    assert_eq!(now.batches_accepted, before.batches_accepted);
    assert_eq!(total(&now.items.unwrap()), total(&before.items.unwrap()));
    // The keys of the refused batches are free, and the same target works: before the fix a
    // later submit to it started items of the refused batch.
    let r = c
        .submit(
            Batch::new()
                .item(Item::new("cpu:2", "noop").key("k0"))
                .wait(true),
        )
        .await
        .expect("good batch");
    assert!(r.items[0].queued);
    assert_eq!(r.results.len(), 1);
    let s = stats(&c).await.items.unwrap();
    assert_eq!(s.ok, 1, "only the good item ran: {s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_requests_are_refused_before_they_are_decoded() {
    let d = Daemon::start("two-socket");
    let c = d.client().await;
    let pid = d.pid();
    let hwm0 = proc_kb(pid, "VmHWM:");

    // 4 194 305 items in 52 MiB: one over limits.max_batch_items.
    let t0 = Instant::now();
    let e = raw_unary(
        &d,
        "/wqd.v1.DispatchService/Submit",
        tiny_items((1 << 22) + 1),
    )
    .await
    .expect_err("over the count");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("limits.max_batch_items"), "{e:?}");
    // 2 million items: within the count, over the memory estimate.
    let e = raw_unary(&d, "/wqd.v1.DispatchService/Submit", tiny_items(2_000_000))
        .await
        .expect_err("over the memory estimate");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("limits.max_request_memory"), "{e:?}");
    let took = t0.elapsed();

    // GetResults with a million copies of one id: the response would be ~300 MB.
    let r = c
        .submit(Batch::new().item(Item::new("cpu:0", "noop")).wait(true))
        .await
        .unwrap();
    let id = r.items[0].item_id;
    let e = c
        .dispatch_stub()
        .get_results(proto::GetResultsRequest {
            item_ids: vec![id; 1_000_000],
        })
        .await
        .expect_err("response over the message limit");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("limits.max_message_bytes"), "{e:?}");

    let grew_mb = proc_kb(pid, "VmHWM:").saturating_sub(hwm0) / 1024;
    eprintln!("peak RSS grew {grew_mb} MiB over three hostile requests ({took:?})");
    // The 52 MiB request itself is buffered (and HTTP/2 may hold a copy); before the fix the
    // peak grew by over 1 GiB.
    assert!(grew_mb < 300, "peak RSS grew {grew_mb} MiB");
    let s = stats(&c).await;
    assert_eq!(s.batches_accepted, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_results_and_error_messages_are_bounded() {
    let d = Daemon::builder("two-socket")
        .config("[limits]\nmax_result_bytes = 4096\n")
        .start();
    let c = d.client().await;
    // Twelve items failing with a ~1 MB text each: once 69 MiB held for the results' TTL.
    let text = "x".repeat(1_000_000);
    let r = c
        .submit(
            Batch::new()
                .items((0..12).map(|_| Item::new("all", "noop").arg("fail", text.clone())))
                .wait(true),
        )
        .await
        .expect("batch");
    assert_eq!(r.results.len(), 12);
    for res in &r.results {
        assert_eq!(res.state(), ItemState::Failed);
        assert!(res.error.len() <= 4096, "{} bytes", res.error.len());
        assert!(res.error.ends_with("bytes, cut)"), "{}", &res.error[4000..]);
    }
    // Args count against max_payload_bytes (1 MiB): a 2 MB text is refused.
    let e = c
        .submit(Batch::new().item(Item::new("all", "noop").arg("fail", "y".repeat(2 << 20))))
        .await
        .expect_err("args over the payload limit");
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains("limits.max_payload_bytes"), "{e}");

    // A 1 MB target: INVALID_ARGUMENT with a short message (grpcio once saw the 1 MB echo as
    // RESOURCE_EXHAUSTED "metadata exceeds hard limit").
    for (target, handler, wq) in [
        ("c".repeat(1 << 20), "noop".to_string(), String::new()),
        ("cpu:0".into(), "h".repeat(1 << 20), String::new()),
        ("cpu:0".into(), "noop".into(), "w".repeat(1 << 20)),
        (
            format!("cpus:{}", "9".repeat(100_000)),
            "noop".into(),
            String::new(),
        ),
    ] {
        let e = c
            .submit(Batch::new().workqueue(wq).item(Item::new(target, handler)))
            .await
            .expect_err("bad input");
        assert!(
            matches!(e.code(), Code::InvalidArgument | Code::NotFound),
            "{e}"
        );
        assert!(e.message().len() < 1024, "{} bytes", e.message().len());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_are_invalid_argument() {
    let d = Daemon::start("two-socket");
    let c = d.client().await;
    let good = {
        use prost::Message;
        Batch::new()
            .item(Item::new("cpu:0", "noop"))
            .into_proto()
            .encode_to_vec()
    };
    let mut bad_utf8 = good.clone();
    // The target's text ("cpu:0") starts after the item's tag, its length, the target's tag
    // and length: make its first byte invalid UTF-8.
    let at = bad_utf8.windows(5).position(|w| w == b"cpu:0").unwrap();
    bad_utf8[at] = 0xff;
    for (bytes, what) in [
        (vec![0x0f, 0xff, 0xff, 0xff], "wire type 7"),
        (good[..good.len() - 3].to_vec(), "truncated"),
        (bad_utf8, "bad UTF-8"),
        (vec![0x12, 0xff, 0xff, 0xff, 0xff, 0x0f], "huge length"),
        (
            vec![
                0x10, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01,
            ],
            "overlong varint",
        ),
    ] {
        for path in [
            "/wqd.v1.DispatchService/Submit",
            "/wqd.v1.DispatchService/GetResults",
            "/wqd.v1.WorkqueueService/CreateWorkqueue",
        ] {
            match raw_unary(&d, path, bytes.clone()).await {
                Err(e) => {
                    assert_eq!(e.code(), Code::InvalidArgument, "{what} to {path}: {e:?}");
                }
                // Some garbage is a valid message of another type (unknown fields are
                // skipped); it must then be answered as that message.
                Ok(_) => assert_ne!(path, "/wqd.v1.DispatchService/Submit", "{what}"),
            }
        }
    }
    let s = stats(&c).await;
    assert_eq!(s.batches_accepted, 0);
    assert_eq!(total(&s.items.unwrap()), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn totals_survive_deleting_a_workqueue() {
    let d = Daemon::start("two-socket");
    let c = d.client().await;
    c.create_workqueue(wq_attrs("tmp")).await.unwrap();
    c.submit(
        Batch::new()
            .workqueue("tmp")
            .items((0..50).map(|_| Item::new("all", "noop")))
            .wait(true),
    )
    .await
    .unwrap();
    c.submit(Batch::new().item(Item::new("all", "noop")).wait(true))
        .await
        .unwrap();
    let before = stats(&c).await.items.unwrap();
    assert_eq!(before.ok, 51);
    c.delete_workqueue("tmp", false).await.unwrap();
    let after = stats(&c).await.items.unwrap();
    assert_eq!(
        after.ok, 51,
        "totals since start went down: {before:?} → {after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushes_do_not_wait_out_delays() {
    let d = Daemon::start("two-socket");
    let c = d.client().await;
    let far = Duration::from_secs(300 * 86_400);
    let r = c
        .submit(Batch::new().items((0..2).map(|_| Item::new("cpu:3", "noop").delay(far))))
        .await
        .unwrap();
    let ids: Vec<u64> = r.items.iter().map(|i| i.item_id).collect();
    let looked = c.results(ids.iter().copied()).await.unwrap();
    assert!(looked
        .items
        .iter()
        .all(|l| l.result.as_ref().unwrap().state() == ItemState::Delayed));
    // A workqueue flush covers what is queued, returns, and says what it left out.
    let (_, sum) = c
        .clone()
        .with_timeout(Some(Duration::from_secs(10)))
        .flush_all(FlushScope::Workqueue("default".into()))
        .await
        .expect("returns at once");
    assert_eq!((sum.items_covered, sum.delayed_not_covered), (0, 2));
    // Flushing one by id queues it now (flush_delayed_work).
    let (res, _) = c
        .clone()
        .with_timeout(Some(Duration::from_secs(10)))
        .flush_all(FlushScope::Items(vec![ids[0]]))
        .await
        .expect("flush of a delayed item");
    assert_eq!(res[0].state(), ItemState::Ok);
    // Including delayed items covers the rest.
    let (res, sum) = c
        .clone()
        .with_timeout(Some(Duration::from_secs(10)))
        .flush_all(FlushScope::WorkqueueAll("default".into()))
        .await
        .unwrap();
    assert_eq!((res.len(), sum.delayed_not_covered), (1, 0));
    let s = stats(&c).await.items.unwrap();
    assert_eq!((s.ok, s.delayed, s.pending), (2, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_delete_leaves_a_visible_drain_that_update_or_delete_resolves() {
    let d = Daemon::start("two-socket");
    let c = d.client().await;
    for bad in [".", ".."] {
        let e = c.create_workqueue(wq_attrs(bad)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{bad}: {e}");
    }
    let mut a = wq_attrs("slow");
    a.fallback = proto::FallbackPolicy::Wait as i32;
    c.create_workqueue(a).await.unwrap();
    // cpu:14 is isolated: with fallback `wait` its item stays pending.
    c.submit(
        Batch::new()
            .workqueue("slow")
            .item(Item::new("cpu:14", "noop")),
    )
    .await
    .unwrap();
    let e = c
        .clone()
        .with_timeout(Some(Duration::from_millis(300)))
        .delete_workqueue("slow", false)
        .await
        .expect_err("cannot drain");
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e}");
    let listed = c.list_workqueues(Some("slow".into())).await.unwrap();
    assert!(
        listed[0].stats.as_ref().unwrap().draining,
        "the drain is visible"
    );
    let e = c
        .submit(
            Batch::new()
                .workqueue("slow")
                .item(Item::new("cpu:0", "noop")),
        )
        .await
        .expect_err("draining");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    assert!(e.message().contains("UpdateWorkqueue"), "{e}");
    // An update takes it back.
    c.update_workqueue(proto::UpdateWorkqueueRequest {
        name: "slow".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let listed = c.list_workqueues(Some("slow".into())).await.unwrap();
    assert!(!listed[0].stats.as_ref().unwrap().draining);
    c.submit(
        Batch::new()
            .workqueue("slow")
            .item(Item::new("cpu:0", "noop")),
    )
    .await
    .expect("accepts work again");
    // A later delete with cancel_pending finishes the job.
    wait_for("the cpu:0 item to run", Duration::from_secs(10), || async {
        let l = c.list_workqueues(Some("slow".into())).await.unwrap();
        (l[0].stats.as_ref().unwrap().totals.as_ref().unwrap().ok == 1).then_some(())
    })
    .await;
    c.clone()
        .with_timeout(Some(Duration::from_secs(10)))
        .delete_workqueue("slow", true)
        .await
        .expect("delete with cancel_pending");
    assert!(c.list_workqueues(Some("slow".into())).await.is_err());
}
