//! Every RPC of `wqd.v1` end to end against the real daemon on the `two-socket` fixture (16
//! CPUs: two packages/nodes of 4 cores × 2 threads, CPU k and k+8 siblings, four LLCs of two
//! cores, CPUs 14-15 isolated), through the client library; plus `grpc.health.v1` and server
//! reflection.
//!
//! Each test starts its own daemon, so tests are independent and run in parallel.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use tokio_stream::StreamExt;
use wqd_client::proto::{
    self, CancelOutcome, FallbackPolicy, GroupLevel, ItemState, LookupStatus, Placement,
    UpdateWorkqueueRequest,
};
use wqd_client::{Batch, CancelScope, FlushEvent, FlushScope, Item, Target};
use wqd_e2e::{parse_cpulist, stats, total, wait_for, wait_states, wq_attrs, Daemon};

const LONG: Duration = Duration::from_secs(30);

fn live_cpus() -> BTreeSet<u32> {
    (0..14).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_topology_is_exactly_the_two_socket_fixture() {
    let d = Daemon::start("two-socket");
    let c = d.client().await;
    let t = c.topology().await.expect("GetTopology");
    assert!(t.epoch >= 1, "epoch starts at 1 or more, got {}", t.epoch);
    assert_eq!(t.possible, "0-15");
    assert_eq!(t.online, "0-15");
    assert_eq!(
        t.allowed, "0-15",
        "no cpuset files: every online CPU is allowed"
    );
    assert_eq!(t.isolated, "14-15");
    assert_eq!(t.live, "0-13");
    assert!(!t.allowed_source.is_empty(), "allowed_source is named");
    assert!(t.taken_at.is_some(), "taken_at is set");

    assert_eq!(t.cpus.len(), 16, "{:?}", t.cpus);
    for (i, cpu) in t.cpus.iter().enumerate() {
        let n = i as u32;
        assert_eq!(cpu.cpu, n, "cpus are listed by number");
        let thread = n % 8;
        let want = (
            true,
            true,
            n >= 14,
            n < 14,
            thread,
            thread / 2,
            thread / 2,
            thread / 4,
            thread / 4,
        );
        let got = (
            cpu.online,
            cpu.allowed,
            cpu.isolated,
            cpu.live,
            cpu.core,
            cpu.cache,
            cpu.shard,
            cpu.node,
            cpu.package,
        );
        assert_eq!(
            got, want,
            "cpu {n}: (online, allowed, isolated, live, core, cache, shard, node, package)"
        );
        assert!((0.0..=1.0).contains(&cpu.busy), "cpu {n} busy {}", cpu.busy);
    }

    // Every group, by level then index, with members and live members.
    let live = |m: &str| {
        let s: BTreeSet<u32> = parse_cpulist(m)
            .intersection(&live_cpus())
            .copied()
            .collect();
        wqd_e2e::cpulist(&s)
    };
    let mut want: Vec<(GroupLevel, String, String)> = Vec::new();
    for n in 0..16 {
        want.push((GroupLevel::Cpu, format!("cpu:{n}"), n.to_string()));
    }
    for n in 0..8 {
        want.push((
            GroupLevel::Core,
            format!("core:{n}"),
            format!("{n},{}", n + 8),
        ));
    }
    let llcs = ["0-1,8-9", "2-3,10-11", "4-5,12-13", "6-7,14-15"];
    for (n, m) in llcs.iter().enumerate() {
        want.push((GroupLevel::Shard, format!("shard:{n}"), m.to_string()));
    }
    for (n, m) in llcs.iter().enumerate() {
        want.push((GroupLevel::Cache, format!("cache:{n}"), m.to_string()));
    }
    for (n, m) in ["0-3,8-11", "4-7,12-15"].iter().enumerate() {
        want.push((GroupLevel::Node, format!("node:{n}"), m.to_string()));
    }
    for (n, m) in ["0-3,8-11", "4-7,12-15"].iter().enumerate() {
        want.push((GroupLevel::Package, format!("package:{n}"), m.to_string()));
    }
    want.push((GroupLevel::All, "all".into(), "0-15".into()));
    let want: Vec<(GroupLevel, String, String, String)> = want
        .into_iter()
        .map(|(l, t, m)| {
            let lm = live(&m);
            (l, t, m, lm)
        })
        .collect();
    let got: Vec<(GroupLevel, String, String, String)> = t
        .groups
        .iter()
        .map(|g| {
            (
                g.level(),
                g.target.clone(),
                g.members.clone(),
                g.live_members.clone(),
            )
        })
        .collect();
    assert_eq!(got, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_without_wait_then_with_wait() {
    let d = Daemon::start("two-socket");
    let c = d.client().await;

    // Without wait: receipts at once, ids first+i.
    let r = c
        .submit(Batch::new().items(
            (0..5).map(|i| Item::new(Target::cache(1), "spin").arg("us", (100 * i).to_string())),
        ))
        .await
        .expect("Submit");
    assert_ne!(r.batch_id, 0);
    assert_eq!(r.items.len(), 5);
    assert!(r.results.is_empty(), "no results without wait");
    let first = r.items[0].item_id;
    assert_ne!(first, 0);
    for (i, rc) in r.items.iter().enumerate() {
        assert!(rc.queued);
        assert_eq!(rc.duplicate_of, 0);
        assert_eq!(
            rc.item_id,
            first + i as u64,
            "entry i of a batch is first+i"
        );
    }
    let (results, summary) = c
        .flush_all(FlushScope::Batch(r.batch_id))
        .await
        .expect("Flush");
    assert_eq!(results.len(), 5);
    assert_eq!(summary.items_covered, 5);
    assert_eq!(summary.counts.unwrap().ok, 5);
    for res in &results {
        assert_eq!(res.state(), ItemState::Ok, "{res:?}");
        assert_eq!(res.target, "cache:1");
        assert_eq!(res.handler, "spin");
        assert_eq!(res.workqueue, "default");
        assert_eq!(res.batch_id, r.batch_id);
        let cpu = res.cpu_started.expect("cpu_started");
        assert!(
            [2, 3, 10, 11].contains(&cpu),
            "cache:1 item ran on cpu {cpu}"
        );
        assert!(res.started_at.is_some() && res.finished_at.is_some());
        assert!(res.topology_epoch >= 1);
        assert!(
            !res.output.is_empty(),
            "spin reports its iteration count as output"
        );
    }

    // With wait: the call returns every result, in submission order, all terminal. Targets
    // come back in canonical form.
    let spellings = ["cpus:3,0-2", " node:01 ", "cpu:5", "all", "package:1"];
    let canonical = ["cpus:0-3", "node:1", "cpu:5", "all", "package:1"];
    let r = c
        .submit(
            Batch::new()
                .items(spellings.iter().map(|t| Item::new(*t, "noop")))
                .wait(true),
        )
        .await
        .expect("Submit wait");
    assert_eq!(r.results.len(), 5);
    for (i, res) in r.results.iter().enumerate() {
        assert_eq!(
            res.item_id, r.items[i].item_id,
            "results in submission order"
        );
        assert_eq!(res.state(), ItemState::Ok, "{res:?}");
        assert_eq!(res.target, canonical[i]);
        let cpu = res.cpu_started.expect("started");
        assert!(cpu < 14, "item ran on non-live cpu {cpu}");
    }
    assert_eq!(r.results[2].cpu_started, Some(5));
    assert!(
        [4, 5, 6, 7, 12, 13].contains(&r.results[4].cpu_started.unwrap()),
        "package:1 ran on a live cpu of package 1"
    );

    // A failing item ends FAILED with its text; the others are unaffected.
    let r = c
        .submit(
            Batch::new()
                .item(Item::new("cpu:0", "noop").arg("fail", "boom"))
                .item(Item::new("cpu:0", "noop"))
                .wait(true),
        )
        .await
        .expect("Submit wait");
    assert_eq!(r.results[0].state(), ItemState::Failed);
    assert!(r.results[0].error.contains("boom"), "{:?}", r.results[0]);
    assert_eq!(r.results[1].state(), ItemState::Ok);
}

/// A `Submit(wait)` large enough that its results come in parts (the engine hands over what
/// the wait kept every 256 items while others still run, and the daemon encodes each part as
/// it comes): the response still holds exactly the queued entries' results, in submission
/// order, each once, the same as `GetResults` reads from the store, and the counts add up.
/// 1 500 entries on all live CPUs of the fixture, so that the parts of several workers
/// interleave; every 7th fails. Twice: without keys (the engine's submit under a shared lock)
/// and with a key repeated in pairs over the first 200 entries (the exclusive submit; every
/// second entry of a pair is merged into the first and has no result of its own). Fails if a
/// part is lost, encoded twice or out of order, or a merged entry takes a result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_wait_results_in_parts_stay_in_submission_order() {
    let d = Daemon::start("two-socket");
    let c = d.client().await;
    let n = 1500;
    for keyed in [false, true] {
        let items = (0..n).map(|i| {
            let it = Item::new("all", "noop");
            let it = if i % 7 == 0 {
                it.arg("fail", format!("entry {i}"))
            } else {
                it
            };
            if keyed && i < 200 {
                it.key(format!("pair {}", i / 2))
            } else {
                it
            }
        });
        let r = c
            .submit(Batch::new().items(items).wait(true))
            .await
            .expect("Submit wait");
        assert_eq!(r.items.len(), n);
        let queued: Vec<(usize, u64)> = r
            .items
            .iter()
            .enumerate()
            .filter(|(_, rc)| rc.queued)
            .map(|(i, rc)| (i, rc.item_id))
            .collect();
        let merged = if keyed { 100 } else { 0 };
        assert_eq!(queued.len(), n - merged, "keyed {keyed}");
        let got: Vec<u64> = r.results.iter().map(|x| x.item_id).collect();
        let want: Vec<u64> = queued.iter().map(|&(_, id)| id).collect();
        assert_eq!(
            got, want,
            "keyed {keyed}: one result per queued entry, in submission order"
        );
        for (res, &(i, _)) in r.results.iter().zip(&queued) {
            if i % 7 == 0 {
                assert_eq!(res.state(), ItemState::Failed, "entry {i}");
                assert_eq!(res.error, format!("entry {i}"));
            } else {
                assert_eq!(res.state(), ItemState::Ok, "entry {i}: {res:?}");
            }
        }
        let counts = r.counts.expect("counts");
        let failed = queued.iter().filter(|&&(i, _)| i % 7 == 0).count() as u64;
        assert_eq!(
            (counts.ok, counts.failed),
            (want.len() as u64 - failed, failed),
            "keyed {keyed}"
        );
        let stored = c.results(want).await.expect("GetResults");
        for (res, l) in r.results.iter().zip(&stored.items) {
            assert_eq!(l.status(), LookupStatus::Found, "{}", res.item_id);
            assert_eq!(
                l.result.as_ref(),
                Some(res),
                "the stored result is the one returned"
            );
        }
    }
}

/// A batch's duplicates as (index, pending id).
fn pairs(d: &[proto::DuplicateItem]) -> Vec<(u64, u64)> {
    d.iter().map(|x| (x.index, x.duplicate_of)).collect()
}

/// Flushes batch `batch` and checks that exactly the items `ids` ran, each ending ok.
async fn flush_ok(c: &wqd_client::Client, batch: u64, ids: impl Iterator<Item = u64>) {
    let want: BTreeSet<u64> = ids.collect();
    let (results, summary) = c.flush_all(FlushScope::Batch(batch)).await.expect("Flush");
    assert_eq!(summary.items_covered, want.len() as u64);
    assert_eq!(summary.counts.unwrap().ok, want.len() as u64);
    let got: BTreeSet<u64> = results.iter().map(|x| x.item_id).collect();
    assert_eq!(got, want);
}

/// Items 0-11 on `node:0`, delayed so that they stay pending (a repeated key is then a
/// duplicate); items 5 and 9 carry `key`, and item 11 is `each:node` (two items, one per node).
fn keyed_batch(key: &str) -> Batch {
    Batch::new().items((0..12).map(|i| {
        let t = if i == 11 { "each:node" } else { "node:0" };
        let it = Item::new(t, "noop").delay(Duration::from_millis(300));
        if i == 5 || i == 9 {
            it.key(key)
        } else {
            it
        }
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_without_receipts_answers_with_the_batch_shape() {
    let d = Daemon::start("two-socket");
    let c = d.client().await;

    // A receipt per item (the default): the shape fields agree with them.
    let r = c.submit(keyed_batch("a")).await.expect("Submit");
    assert_eq!(r.items.len(), 13, "each:node counts as its two items");
    assert_eq!(r.item_count, 13);
    assert_eq!(r.queued_count, 12);
    assert!(r.duplicates.is_empty(), "the receipts say it: {r:?}");
    for (i, rc) in r.items.iter().enumerate() {
        if rc.queued {
            assert_eq!(rc.item_id, r.first_item_id + i as u64, "entry {i}");
        } else {
            assert_eq!((i, rc.duplicate_of), (9, r.first_item_id + 5));
        }
    }

    // No receipts: the same batch in SubmitStream's shape, duplicates included.
    let r = c
        .submit(keyed_batch("b").receipts(false))
        .await
        .expect("Submit without receipts");
    assert!(r.items.is_empty(), "{r:?}");
    assert_eq!((r.item_count, r.queued_count), (13, 12));
    let first = r.first_item_id;
    let dups = pairs(&r.duplicates);
    assert_eq!(dups, vec![(9, first + 5)]);
    // The queued items are first_item_id + i.
    flush_ok(
        &c,
        r.batch_id,
        (0..13).filter(|&i| i != 9).map(|i| first + i),
    )
    .await;

    // With wait, unary and as a session's request: the results and counts as ever, still no
    // receipts.
    let mut s = c.session().await.expect("Session");
    for session in [false, true] {
        let batch = Batch::new()
            .items((0..4).map(|i| Item::new(format!("cpu:{i}"), "noop")))
            .wait(true)
            .receipts(false);
        let r = match session {
            false => c.submit(batch).await,
            true => s.submit(batch).await,
        }
        .expect("Submit(wait) without receipts");
        assert!(r.items.is_empty(), "session {session}");
        assert_eq!((r.item_count, r.queued_count), (4, 4));
        assert_eq!(r.counts.map(|c| c.ok), Some(4));
        let ids: Vec<u64> = r.results.iter().map(|x| x.item_id).collect();
        assert_eq!(ids, (0..4).map(|i| r.first_item_id + i).collect::<Vec<_>>());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_stream_with_duplicates_then_flush() {
    let d = Daemon::start("two-socket");
    let c = d.client().await.with_chunk_bytes(256);
    // Delayed items with keys stay pending, so a repeated key is a duplicate.
    let items: Vec<Item> = (0..40)
        .map(|i| {
            let it = Item::new(Target::node(0), "noop").delay(Duration::from_millis(300));
            if i % 10 == 9 {
                it.key("k") // items 9, 19, 29, 39: the first is queued, the rest merged into it
            } else {
                it
            }
        })
        .collect();
    let r = c.submit_stream("", items).await.expect("SubmitStream");
    assert_ne!(r.batch_id, 0);
    assert_eq!(r.item_count, 40);
    assert_eq!(r.queued_count, 37);
    let first = r.first_item_id;
    let dups = pairs(&r.duplicates);
    assert_eq!(
        dups,
        vec![(19, first + 9), (29, first + 9), (39, first + 9)]
    );

    let queued = (0..40).filter(|i| ![19, 29, 39].contains(i));
    flush_ok(&c, r.batch_id, queued.map(|i| first + i)).await;
    let s = stats(&c).await;
    assert_eq!(s.deduplicated, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_items_batch_and_workqueue_stream_results_then_summary() {
    let d = Daemon::start("two-socket");
    let c = d.client().await;
    c.create_workqueue(wq_attrs("fl")).await.expect("create");
    let r = c
        .submit(
            Batch::new().workqueue("fl").items(
                (0..12).map(|i| Item::new(format!("cpu:{}", i % 4), "sleep").arg("ms", "50")),
            ),
        )
        .await
        .expect("Submit");
    let ids: Vec<u64> = r.items.iter().map(|x| x.item_id).collect();

    // Workqueue scope: covers what is pending or running now; the stream is result groups,
    // then exactly one summary, last.
    let mut s = c
        .flush(FlushScope::Workqueue("fl".into()), false)
        .await
        .expect("Flush wq");
    let mut seen = Vec::new();
    let mut summary = None;
    while let Some(ev) = s.next().await {
        match ev.expect("flush event") {
            FlushEvent::Results(rs) => {
                assert!(summary.is_none(), "results after the summary");
                for x in rs {
                    assert!(
                        !matches!(x.state(), ItemState::Pending | ItemState::Running),
                        "flush streamed a non-terminal result {x:?}"
                    );
                    seen.push(x.item_id);
                }
            }
            FlushEvent::Summary(sm) => {
                assert!(summary.is_none(), "two summaries");
                summary = Some(sm);
            }
        }
    }
    let summary = summary.expect("the stream ends with a summary");
    assert_eq!(summary.items_covered, 12);
    assert_eq!(summary.counts.unwrap().ok, 12);
    assert!(summary.waited.is_some());
    seen.sort_unstable();
    assert_eq!(seen, ids, "every covered item streamed exactly once");

    // Items scope: already-terminal items are reported at once; unknown ids are listed.
    let bogus = ids[11] + 1_000_000;
    let (res, sm) = c
        .flush_all(FlushScope::Items(vec![ids[0], ids[3], ids[3], bogus]))
        .await
        .expect("Flush items");
    let got: BTreeSet<u64> = res.iter().map(|x| x.item_id).collect();
    assert_eq!(got, BTreeSet::from([ids[0], ids[3]]));
    assert_eq!(sm.items_covered, 2);
    assert_eq!(sm.unknown_item_ids, vec![bogus]);

    // summary_only: no results, only the summary.
    let mut s = c
        .flush(FlushScope::Batch(r.batch_id), true)
        .await
        .expect("Flush summary only");
    let mut events = Vec::new();
    while let Some(ev) = s.next().await {
        events.push(ev.expect("event"));
    }
    assert_eq!(events.len(), 1, "{events:?}");
    match &events[0] {
        FlushEvent::Summary(sm) => assert_eq!(sm.counts.unwrap().ok, 12),
        other => panic!("expected only a summary, got {other:?}"),
    }

    // An empty workqueue flushes at once.
    let (res, sm) = c
        .flush_all(FlushScope::Workqueue("fl".into()))
        .await
        .expect("Flush empty wq");
    assert!(res.is_empty());
    assert_eq!(sm.items_covered, 0);

    // Unknown scopes.
    let e = c
        .flush_all(FlushScope::Batch(r.batch_id + 1000))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
    let e = c
        .flush_all(FlushScope::Workqueue("nope".into()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
    // A request without a scope.
    let e = c
        .dispatch_stub()
        .flush(proto::FlushRequest {
            scope: None,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_pending_never_runs_running_is_waited_for() {
    let d = Daemon::start("two-socket");
    let c = d.client().await;
    c.create_workqueue(proto::WorkqueueAttrs {
        max_active: 1,
        ..wq_attrs("c")
    })
    .await
    .expect("create");
    // One CPU, one slot: the first spin runs, the second waits behind it; a delayed item
    // waits for its timer.
    let r = c
        .submit(
            Batch::new()
                .workqueue("c")
                .item(Item::new("cpu:0", "spin").arg("ms", "20000"))
                .item(Item::new("cpu:0", "spin").arg("ms", "1"))
                .item(Item::new("cpu:1", "noop").delay(Duration::from_secs(60))),
        )
        .await
        .expect("Submit");
    let ids: Vec<u64> = r.items.iter().map(|x| x.item_id).collect();
    wait_states(&c, &ids[..1], ItemState::Running, LONG).await;
    assert_eq!(
        wqd_e2e::states(&c, &ids[1..]).await,
        vec![ItemState::Pending, ItemState::Delayed]
    );

    let t0 = Instant::now();
    let out = c
        .cancel(CancelScope::Batch(r.batch_id))
        .await
        .expect("Cancel");
    assert!(
        t0.elapsed() < Duration::from_secs(15),
        "cancel of a running spin took {:?}: the handler was not signalled",
        t0.elapsed()
    );
    let got: Vec<(u64, CancelOutcome, ItemState)> = out
        .items
        .iter()
        .map(|i| (i.item_id, i.outcome(), i.state()))
        .collect();
    assert_eq!(
        got,
        vec![
            (ids[0], CancelOutcome::WaitedRunning, ItemState::Cancelled),
            (
                ids[1],
                CancelOutcome::CancelledPending,
                ItemState::Cancelled
            ),
            (
                ids[2],
                CancelOutcome::CancelledPending,
                ItemState::Cancelled
            ),
        ]
    );
    // The pending ones never ran; the running one is terminal when Cancel returned.
    let looked = c.results(ids.clone()).await.expect("GetResults");
    for (i, l) in looked.items.iter().enumerate() {
        let res = l.result.as_ref().expect("result");
        assert_eq!(res.state(), ItemState::Cancelled, "{res:?}");
        assert!(res.finished_at.is_some());
        if i == 0 {
            assert_eq!(res.cpu_started, Some(0));
        } else {
            assert_eq!(
                res.cpu_started, None,
                "a cancelled pending item started: {res:?}"
            );
            assert!(res.started_at.is_none());
        }
    }
    // Cancelling again: already terminal; unknown ids are reported per id.
    let again = c
        .cancel(CancelScope::Items(vec![ids[1], ids[2] + 1_000_000]))
        .await
        .expect("Cancel again");
    let got: Vec<CancelOutcome> = again.items.iter().map(|i| i.outcome()).collect();
    assert_eq!(
        got,
        vec![CancelOutcome::AlreadyTerminal, CancelOutcome::Unknown]
    );
    let e = c
        .cancel(CancelScope::Batch(r.batch_id + 1000))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
    let s = stats(&c).await;
    let items = s.items.unwrap();
    assert_eq!((items.pending, items.running, items.cancelled), (0, 0, 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_waits_for_everything_and_refuses_new_work_meanwhile() {
    let d = Daemon::start("two-socket");
    let c = d.client().await;
    c.create_workqueue(wq_attrs("dr")).await.expect("create");
    let r = c
        .submit(
            Batch::new()
                .workqueue("dr")
                .items((0..6).map(|i| Item::new(format!("cpu:{i}"), "sleep").arg("ms", "1500"))),
        )
        .await
        .expect("Submit");
    let ids: Vec<u64> = r.items.iter().map(|x| x.item_id).collect();
    wait_states(&c, &ids, ItemState::Running, LONG).await;

    let c2 = c.clone();
    let drain = tokio::spawn(async move { c2.drain("dr").await });
    // While it drains, the workqueue refuses work and reports draining.
    wait_for("workqueue dr to report draining", LONG, || async {
        let l = c.list_workqueues(Some("dr".into())).await.expect("List");
        l[0].stats.as_ref().unwrap().draining.then_some(())
    })
    .await;
    let e = c
        .submit(
            Batch::new()
                .workqueue("dr")
                .item(Item::new("cpu:0", "noop")),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
    // Other workqueues are not affected.
    c.submit(Batch::new().item(Item::new("cpu:0", "noop")).wait(true))
        .await
        .expect("default still accepts work");

    let out = drain.await.unwrap().expect("Drain");
    assert_eq!(out.counts.unwrap().ok, 6);
    assert!(out.waited.is_some());
    assert!(
        wqd_e2e::states(&c, &ids)
            .await
            .iter()
            .all(|s| *s == ItemState::Ok),
        "drain returned before its items were done"
    );
    // Afterwards it accepts work again.
    c.submit(
        Batch::new()
            .workqueue("dr")
            .item(Item::new("cpu:0", "noop"))
            .wait(true),
    )
    .await
    .expect("accepts work after the drain");
    let e = c.drain("nope").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_results_reports_found_and_unknown_per_id() {
    let d = Daemon::start("two-socket");
    let c = d.client().await;
    let r = c
        .submit(
            Batch::new()
                .item(Item::new("cpu:2", "digest").payload(b"abc".to_vec()))
                .item(Item::new("cpu:2", "noop").delay(Duration::from_secs(60)))
                .wait(false),
        )
        .await
        .expect("Submit");
    let (a, b) = (r.items[0].item_id, r.items[1].item_id);
    wait_states(&c, &[a], ItemState::Ok, LONG).await;
    let l = c
        .results([b, a, 0, b + 1_000_000])
        .await
        .expect("GetResults");
    let got: Vec<(u64, LookupStatus)> = l.items.iter().map(|x| (x.item_id, x.status())).collect();
    assert_eq!(
        got,
        vec![
            (b, LookupStatus::Found),
            (a, LookupStatus::Found),
            (0, LookupStatus::Unknown),
            (b + 1_000_000, LookupStatus::Unknown),
        ]
    );
    let ra = l.items[1].result.as_ref().unwrap();
    assert_eq!(ra.state(), ItemState::Ok);
    assert_eq!(
        String::from_utf8_lossy(&ra.output),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
        "digest of \"abc\" (sha256)"
    );
    let rb = l.items[0].result.as_ref().unwrap();
    assert_eq!(
        rb.state(),
        ItemState::Delayed,
        "a delayed item reads delayed"
    );
    assert!(rb.finished_at.is_none() && rb.cpu_started.is_none());
    c.cancel(CancelScope::Items(vec![b])).await.expect("Cancel");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workqueues_create_list_update_delete() {
    let d = Daemon::start("two-socket");
    let c = d.client().await;

    // Defaults are filled in.
    let a = c.create_workqueue(wq_attrs("alpha")).await.expect("create");
    assert_eq!(a.name, "alpha");
    assert_eq!(a.max_active, 1);
    assert_eq!(a.group_max_active, 0);
    assert!(!a.ordered);
    assert_eq!(a.nice, 0);
    assert_eq!(
        a.placement(),
        Placement::Spread,
        "PLACEMENT_UNSPECIFIED means the documented default, SPREAD"
    );
    assert_eq!(a.fallback(), FallbackPolicy::Widen);
    assert!(
        a.max_queued > 0,
        "max_queued 0 means the configured default"
    );

    let b = c
        .create_workqueue(proto::WorkqueueAttrs {
            name: "beta".into(),
            max_active: 4,
            group_max_active: 6,
            ordered: true,
            nice: 5,
            placement: Placement::LeastLoaded as i32,
            fallback: FallbackPolicy::Wait as i32,
            max_queued: 10,
            ..Default::default()
        })
        .await
        .expect("create beta");
    assert_eq!(
        (
            b.max_active,
            b.group_max_active,
            b.ordered,
            b.nice,
            b.max_queued
        ),
        (4, 6, true, 5, 10)
    );
    assert_eq!(b.placement(), Placement::LeastLoaded);
    assert_eq!(b.fallback(), FallbackPolicy::Wait);

    let e = c.create_workqueue(wq_attrs("alpha")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e}");
    for bad in [
        wq_attrs(""),
        wq_attrs("has space"),
        wq_attrs(&"x".repeat(65)),
        proto::WorkqueueAttrs {
            nice: 20,
            ..wq_attrs("n")
        },
    ] {
        let e = c.create_workqueue(bad.clone()).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad:?}: {e}");
    }

    // List: sorted by name, default always there, counters present.
    let l = c.list_workqueues(None).await.expect("List");
    let names: Vec<&str> = l
        .iter()
        .map(|w| w.attrs.as_ref().unwrap().name.as_str())
        .collect();
    assert_eq!(names, vec!["alpha", "beta", "default"]);
    assert!(l.iter().all(|w| w.stats.is_some()));
    let one = c
        .list_workqueues(Some("beta".into()))
        .await
        .expect("List beta");
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].attrs.as_ref().unwrap(), &b);
    let e = c.list_workqueues(Some("gamma".into())).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
    assert_eq!(stats(&c).await.workqueues, 3);

    // Update: set fields change, the rest stay.
    let u = c
        .update_workqueue(UpdateWorkqueueRequest {
            name: "beta".into(),
            max_active: Some(2),
            placement: Some(Placement::Spread as i32),
            ..Default::default()
        })
        .await
        .expect("Update");
    assert_eq!(
        (
            u.max_active,
            u.group_max_active,
            u.ordered,
            u.nice,
            u.max_queued
        ),
        (2, 6, true, 5, 10)
    );
    assert_eq!(u.placement(), Placement::Spread);
    assert_eq!(u.fallback(), FallbackPolicy::Wait);
    for bad in [
        UpdateWorkqueueRequest {
            name: "beta".into(),
            placement: Some(Placement::Unspecified as i32),
            ..Default::default()
        },
        UpdateWorkqueueRequest {
            name: "beta".into(),
            fallback: Some(FallbackPolicy::Unspecified as i32),
            ..Default::default()
        },
        UpdateWorkqueueRequest {
            name: "beta".into(),
            max_active: Some(0),
            ..Default::default()
        },
    ] {
        let e = c.update_workqueue(bad.clone()).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad:?}: {e}");
    }
    let e = c
        .update_workqueue(UpdateWorkqueueRequest {
            name: "gamma".into(),
            max_active: Some(2),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e}");

    // Delete: drains first, and reports what it waited for.
    let r = c
        .submit(
            Batch::new()
                .workqueue("alpha")
                .items((0..3).map(|_| Item::new("cpu:4", "sleep").arg("ms", "200"))),
        )
        .await
        .expect("Submit");
    let del = c.delete_workqueue("alpha", false).await.expect("Delete");
    assert_eq!(del.counts.unwrap().ok, 3);
    let ids: Vec<u64> = r.items.iter().map(|x| x.item_id).collect();
    assert!(wqd_e2e::states(&c, &ids)
        .await
        .iter()
        .all(|s| *s == ItemState::Ok));
    // With cancel_pending, pending items are cancelled instead of run.
    let r = c
        .submit(
            Batch::new()
                .workqueue("beta")
                .items((0..3).map(|_| Item::new("cpu:4", "noop").delay(Duration::from_secs(60)))),
        )
        .await
        .expect("Submit");
    let del = c.delete_workqueue("beta", true).await.expect("Delete beta");
    assert_eq!(del.counts.unwrap().cancelled, 3);
    let ids: Vec<u64> = r.items.iter().map(|x| x.item_id).collect();
    assert!(wqd_e2e::states(&c, &ids)
        .await
        .iter()
        .all(|s| *s == ItemState::Cancelled));

    let l = c.list_workqueues(None).await.expect("List");
    assert_eq!(l.len(), 1);
    let e = c.delete_workqueue("default", false).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
    let e = c.delete_workqueue("alpha", false).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
    let e = c
        .submit(
            Batch::new()
                .workqueue("alpha")
                .item(Item::new("cpu:0", "noop")),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_stats_counts_what_happened() {
    let d = Daemon::start("two-socket");
    let c = d.client().await;
    let s0 = stats(&c).await;
    assert!(!s0.version.is_empty());
    assert!(s0.started_at.is_some() && s0.uptime.is_some());
    assert!(s0.topology_epoch >= 1);
    assert_eq!(total(&s0.items.unwrap()), 0);
    assert_eq!(s0.workqueues, 1);
    let mut sorted = s0.handlers.clone();
    sorted.sort();
    assert_eq!(s0.handlers, sorted, "handlers are sorted");
    for h in ["digest", "noop", "sleep", "spin"] {
        assert!(
            s0.handlers.iter().any(|x| x == h),
            "{h} in {:?}",
            s0.handlers
        );
    }

    c.submit(
        Batch::new()
            .items((0..4).map(|_| Item::new("node:1", "noop")))
            .item(Item::new("node:1", "noop").arg("fail", "x"))
            .wait(true),
    )
    .await
    .expect("Submit");
    let bad = c
        .submit(Batch::new().item(Item::new("node:9", "noop")))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    let s = stats(&c).await;
    let items = s.items.unwrap();
    assert_eq!(
        (items.pending, items.running, items.ok, items.failed),
        (0, 0, 4, 1)
    );
    assert_eq!(s.batches_accepted, s0.batches_accepted + 1);
    assert_eq!(s.batches_refused, s0.batches_refused + 1);
    assert_eq!(s.results_retained, 5);
    assert_eq!(s.topology_epoch, s0.topology_epoch);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_check_and_reflection() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

    let d = Daemon::start("two-socket");
    let ch = d.channel().await;
    let mut h = HealthClient::new(ch.clone());
    let r = h
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("Health/Check")
        .into_inner();
    assert_eq!(r.status(), ServingStatus::Serving);
    let r = h
        .check(HealthCheckRequest {
            service: "wqd.v1.DispatchService".into(),
        })
        .await
        .expect("Health/Check DispatchService")
        .into_inner();
    assert_eq!(r.status(), ServingStatus::Serving);

    let services = list_services(ch).await;
    for s in [
        "wqd.v1.DispatchService",
        "wqd.v1.WorkqueueService",
        "wqd.v1.TopologyService",
        "wqd.v1.StatsService",
        "grpc.health.v1.Health",
    ] {
        assert!(services.contains(s), "reflection lists {s}: {services:?}");
    }
}

/// The services listed by server reflection (v1, else v1alpha).
async fn list_services(ch: tonic::transport::Channel) -> BTreeSet<String> {
    use tonic_reflection::pb::v1 as r1;
    use tonic_reflection::pb::v1alpha as r0;
    let req = r1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(r1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut c = r1::server_reflection_client::ServerReflectionClient::new(ch.clone());
    match c.server_reflection_info(tokio_stream::iter([req])).await {
        Ok(resp) => {
            let mut s = resp.into_inner();
            let m = s
                .next()
                .await
                .expect("a reflection response")
                .expect("reflection response ok");
            match m.message_response {
                Some(r1::server_reflection_response::MessageResponse::ListServicesResponse(l)) => {
                    l.service.into_iter().map(|x| x.name).collect()
                }
                other => panic!("unexpected reflection answer {other:?}"),
            }
        }
        Err(e) if e.code() == tonic::Code::Unimplemented => {
            let req = r0::ServerReflectionRequest {
                host: String::new(),
                message_request: Some(r0::server_reflection_request::MessageRequest::ListServices(
                    String::new(),
                )),
            };
            let mut c = r0::server_reflection_client::ServerReflectionClient::new(ch);
            let mut s = c
                .server_reflection_info(tokio_stream::iter([req]))
                .await
                .expect("reflection v1alpha")
                .into_inner();
            let m = s.next().await.expect("response").expect("ok");
            match m.message_response {
                Some(r0::server_reflection_response::MessageResponse::ListServicesResponse(l)) => {
                    l.service.into_iter().map(|x| x.name).collect()
                }
                other => panic!("unexpected reflection answer {other:?}"),
            }
        }
        Err(e) => panic!("reflection: {e:?}"),
    }
}
