//! Issue 13, "results off the hot path": the workqueue attribute `results` (`full`, `summary`,
//! `none`) end to end against the real daemon on the `two-socket` fixture — over gRPC, in the
//! config file and through `SubmitResponse.counts`.
//!
//! The wire tests (round trip, validation, config, counts of a waited submit) hold for any
//! engine; [`summary_and_none_workqueues_keep_counts_only`] checks what the engine does with
//! the mode (no per-item result, a flush that streams none, a look-up that answers forgotten).

use tokio_stream::StreamExt;
use wqd_client::proto::{self, LookupStatus, ResultsMode, UpdateWorkqueueRequest};
use wqd_client::{Batch, Client, FlushEvent, FlushScope, Item};
use wqd_e2e::{total, wq_attrs, Daemon};

/// Two workqueues from the config, one per mode that keeps no per-item results.
const CONFIG: &str = r#"
[[workqueue]]
name = "c-summary"
results = "summary"

[[workqueue]]
name = "c-none"
results = "none"
"#;

fn attrs(name: &str, results: ResultsMode) -> proto::WorkqueueAttrs {
    proto::WorkqueueAttrs {
        results: results as i32,
        ..wq_attrs(name)
    }
}

async fn results_of(c: &Client, name: &str) -> ResultsMode {
    let l = c
        .list_workqueues(Some(name.into()))
        .await
        .unwrap_or_else(|e| panic!("list {name}: {e}"));
    l[0].attrs.as_ref().expect("attrs").results()
}

/// Every result and the summary of a flush of `batch`.
async fn flush(c: &Client, batch: u64) -> (Vec<proto::ItemResult>, proto::FlushSummary) {
    flush_of(c, FlushScope::Batch(batch), false).await
}

/// The results a flush of `scope` streams, and its summary.
async fn flush_of(
    c: &Client,
    scope: FlushScope,
    summary_only: bool,
) -> (Vec<proto::ItemResult>, proto::FlushSummary) {
    let what = format!("{scope:?}");
    let mut s = c.flush(scope, summary_only).await.expect("Flush");
    let mut results = Vec::new();
    while let Some(ev) = s.next().await {
        match ev.expect("flush event") {
            FlushEvent::Results(r) => results.extend(r),
            FlushEvent::Summary(sum) => return (results, sum),
        }
    }
    panic!("the flush of {what} ended without a summary");
}

fn noops(wq: &str, n: usize) -> Batch {
    Batch::new()
        .workqueue(wq)
        .items((0..n).map(|_| Item::new("all", "noop")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_mode_round_trips_over_grpc_and_config() {
    let d = Daemon::builder("two-socket").config(CONFIG).start();
    let c = d.client().await;

    // UNSPECIFIED on create is the default, full; the default workqueue is full.
    let a = c
        .create_workqueue(wq_attrs("g-default"))
        .await
        .expect("create");
    assert_eq!(a.results(), ResultsMode::Full);
    assert_eq!(results_of(&c, "default").await, ResultsMode::Full);
    for (name, mode) in [
        ("g-full", ResultsMode::Full),
        ("g-summary", ResultsMode::Summary),
        ("g-none", ResultsMode::None),
    ] {
        let a = c.create_workqueue(attrs(name, mode)).await.expect("create");
        assert_eq!(a.results(), mode, "{name}: CreateWorkqueue echoes it");
        assert_eq!(
            results_of(&c, name).await,
            mode,
            "{name}: ListWorkqueues shows it"
        );
    }
    assert_eq!(results_of(&c, "c-summary").await, ResultsMode::Summary);
    assert_eq!(results_of(&c, "c-none").await, ResultsMode::None);

    // Update: any time, and only when given.
    let u = c
        .update_workqueue(UpdateWorkqueueRequest {
            name: "g-summary".into(),
            results: Some(ResultsMode::None as i32),
            ..Default::default()
        })
        .await
        .expect("update results");
    assert_eq!(u.results(), ResultsMode::None);
    let u = c
        .update_workqueue(UpdateWorkqueueRequest {
            name: "g-summary".into(),
            max_active: Some(2),
            ..Default::default()
        })
        .await
        .expect("update max_active");
    assert_eq!(
        (u.max_active, u.results()),
        (2, ResultsMode::None),
        "an update without results leaves it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_mode_out_of_range_or_unspecified_is_invalid_argument() {
    let d = Daemon::start("two-socket");
    let c = d.client().await;
    for v in [4, -1, 1000] {
        let e = c
            .create_workqueue(proto::WorkqueueAttrs {
                results: v,
                ..wq_attrs("bad")
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "results = {v}: {e}");
        assert!(e.message().contains("attrs.results"), "{e}");
    }
    c.create_workqueue(wq_attrs("w")).await.expect("create");
    for v in [ResultsMode::Unspecified as i32, 4] {
        let e = c
            .update_workqueue(UpdateWorkqueueRequest {
                name: "w".into(),
                results: Some(v),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "results = {v}: {e}");
        assert!(e.message().contains("results"), "{e}");
    }
    assert_eq!(
        results_of(&c, "w").await,
        ResultsMode::Full,
        "a refused update changes nothing"
    );
    let l = c.list_workqueues(None).await.expect("list");
    assert!(
        !l.iter()
            .any(|w| w.attrs.as_ref().is_some_and(|a| a.name == "bad")),
        "a refused create creates nothing"
    );
}

#[test]
fn a_bad_results_word_in_the_config_names_the_key() {
    let e = match Daemon::builder("two-socket")
        .config("[[workqueue]]\nname = \"a\"\n\n[[workqueue]]\nname = \"b\"\nresults = \"some\"\n")
        .try_start()
    {
        Ok(_) => panic!("the daemon started with results = \"some\""),
        Err(e) => e,
    };
    assert_eq!(
        e.status.code(),
        Some(64),
        "bad config exits 64: {}",
        e.stderr
    );
    assert!(
        e.stderr.contains("workqueue[1].results") && e.stderr.contains("full, summary or none"),
        "the error names the key and the words: {}",
        e.stderr
    );
}

/// A waited submit fills `counts` by final state, on a full workqueue (beside the results,
/// counted from them) as on a summary or none one (no results: the daemon's flush counts in a
/// tally there); the receipts name every item, in order. Without wait `counts` is unset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waited_submit_counts_its_items_by_final_state() {
    let d = Daemon::start("two-socket");
    let c = d.client().await;
    for (name, mode) in [
        ("w-summary", ResultsMode::Summary),
        ("w-none", ResultsMode::None),
    ] {
        c.create_workqueue(attrs(name, mode)).await.expect("create");
    }
    for (wq, results) in [("default", 5), ("w-summary", 0), ("w-none", 0)] {
        let r = c
            .submit(
                Batch::new()
                    .workqueue(wq)
                    .items((0..3).map(|_| Item::new("all", "noop")))
                    .item(Item::new("cpu:0", "noop").arg("fail", "boom"))
                    .item(Item::new("all", "noop"))
                    .wait(true),
            )
            .await
            .expect("Submit wait");
        let counts = r.counts.expect("counts with wait");
        assert_eq!((counts.ok, counts.failed), (4, 1), "{wq}");
        assert_eq!(
            counts.pending + counts.running + counts.delayed + counts.cancelled,
            0,
            "{wq}"
        );
        assert_eq!(r.results.len(), results, "{wq}");
        let ids: Vec<u64> = r.items.iter().map(|x| x.item_id).collect();
        let first = ids[0];
        assert_eq!(
            ids,
            (first..first + 5).collect::<Vec<_>>(),
            "{wq}: receipts in order"
        );
        assert!(
            r.items.iter().all(|x| x.queued && x.duplicate_of == 0),
            "{wq}"
        );
    }
    let r = c
        .submit(Batch::new().item(Item::new("all", "noop")))
        .await
        .expect("Submit");
    assert!(r.counts.is_none(), "no counts without wait: {:?}", r.counts);
}

/// What the engine does with `summary` and `none`: a waited submit answers with counts and no
/// results; a flush streams no result but counts the items that end while it waits, and a
/// batch flush also those already ended (a flush of their ids lists them as unknown); an ended item is looked up as forgotten, a live one
/// found; after an update to `full` later items have results again (the earlier ones stay
/// without).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn summary_and_none_workqueues_keep_counts_only() {
    let d = Daemon::builder("two-socket").config(CONFIG).start();
    let c = d.client().await;
    for (name, mode) in [
        ("g-summary", ResultsMode::Summary),
        ("g-none", ResultsMode::None),
    ] {
        c.create_workqueue(attrs(name, mode)).await.expect("create");
    }
    let n = 6;
    for name in ["g-summary", "g-none", "c-summary", "c-none"] {
        let r = c
            .submit(noops(name, n).wait(true))
            .await
            .expect("Submit wait");
        assert!(
            r.results.is_empty(),
            "{name}: no per-item results, got {}",
            r.results.len()
        );
        assert_eq!(r.counts.expect("counts").ok, n as u64, "{name}");
        let ids: Vec<u64> = r.items.iter().map(|x| x.item_id).collect();

        // A flush of the batch that begins after they ended counts them from the batch's
        // record, summary-only or not: no result streamed, none unknown.
        let (results, summary) = flush(&c, r.batch_id).await;
        assert!(results.is_empty(), "{name}: a flush streams no ItemResult");
        let counts = summary.counts.expect("counts");
        assert_eq!((counts.ok, total(&counts)), (n as u64, n as u64), "{name}");
        assert!(summary.unknown_item_ids.is_empty(), "{name}: {summary:?}");
        assert_eq!(summary.items_covered, n as u64, "{name}");
        let (results, sum) = flush_of(&c, FlushScope::Batch(r.batch_id), true).await;
        assert!(results.is_empty(), "{name}");
        assert_eq!(sum.counts.map(|c| c.ok), Some(n as u64), "{name}: {sum:?}");
        assert!(sum.unknown_item_ids.is_empty(), "{name}: {sum:?}");
        // A flush of their ids finds no record of them: they are listed as unknown
        // (forgotten), as items whose results expired.
        let (results, sum) = flush_of(&c, FlushScope::Items(ids.clone()), false).await;
        assert!(results.is_empty(), "{name}");
        assert_eq!(total(&sum.counts.expect("counts")), 0, "{name}");
        assert_eq!(sum.unknown_item_ids, ids, "{name}");

        let l = c.results(ids.clone()).await.expect("GetResults");
        assert!(
            l.items
                .iter()
                .all(|x| x.status() == LookupStatus::Forgotten),
            "{name}: an ended item answers as forgotten: {:?}",
            l.items
        );

        // A flush of live items streams no result for them, and its summary counts them. While
        // live they are known; once ended, forgotten.
        let r = c
            .submit(
                Batch::new()
                    .workqueue(name)
                    .items((0..n).map(|_| Item::new("all", "sleep").arg("ms", "1000"))),
            )
            .await
            .expect("Submit");
        let live: Vec<u64> = r.items.iter().map(|x| x.item_id).collect();
        let l = c.results(live.clone()).await.expect("GetResults live");
        assert!(
            l.items.iter().all(|x| x.status() == LookupStatus::Found),
            "{name}: a live item is known: {:?}",
            l.items
        );
        let (results, summary) = flush(&c, r.batch_id).await;
        assert!(results.is_empty(), "{name}: a flush streams no ItemResult");
        assert_eq!(summary.counts.expect("counts").ok, n as u64, "{name}");
        assert!(summary.unknown_item_ids.is_empty(), "{name}");
        let l = c.results(live).await.expect("GetResults");
        assert!(
            l.items
                .iter()
                .all(|x| x.status() == LookupStatus::Forgotten),
            "{name}: ended, forgotten: {:?}",
            l.items
        );

        // Back to full: later items have results; the earlier ones stay without.
        c.update_workqueue(UpdateWorkqueueRequest {
            name: name.into(),
            results: Some(ResultsMode::Full as i32),
            ..Default::default()
        })
        .await
        .expect("update to full");
        let r = c
            .submit(noops(name, n).wait(true))
            .await
            .expect("Submit wait");
        assert_eq!(r.results.len(), n, "{name}: full again");
        assert_eq!(r.counts.expect("counts").ok, n as u64);
        let l = c.results(ids).await.expect("GetResults");
        assert!(
            l.items
                .iter()
                .all(|x| x.status() == LookupStatus::Forgotten),
            "{name}: items that ended before the update stay without a result"
        );
    }
}
