//! A batch of one million `noop` items submitted through the client-streaming `SubmitStream`
//! call and flushed, with every result streamed back: exactly 1,000,000 distinct ids, the
//! receipt's contiguous range, every one OK, and the summary agreeing.
//!
//! Timing goes to stderr (`--nocapture` shows it) so regressions in throughput are visible.

use std::time::{Duration, Instant};

use tokio_stream::StreamExt;
use wqd_client::proto::ItemState;
use wqd_client::{FlushEvent, FlushScope, Item};
use wqd_e2e::{stats, Daemon};

const N: u64 = 1_000_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_million_noop_items_streamed_in_and_flushed_out() {
    let d = Daemon::start("two-socket");
    let c = d
        .client()
        .await
        .with_timeout(Some(Duration::from_secs(600)));

    let t0 = Instant::now();
    let template = Item::new("all", "noop");
    let r = c
        .submit_stream("", (0..N).map(move |_| template.clone()))
        .await
        .expect("SubmitStream of 1M items");
    let submitted = t0.elapsed();
    assert_ne!(r.batch_id, 0);
    assert_eq!(r.item_count, N);
    assert_eq!(r.queued_count, N);
    assert!(r.duplicates.is_empty());
    let first = r.first_item_id;
    assert_ne!(first, 0);

    let mut seen = vec![false; N as usize];
    let mut count = 0u64;
    let mut messages = 0u64;
    let mut summary = None;
    let mut s = c
        .flush(FlushScope::Batch(r.batch_id), false)
        .await
        .expect("Flush");
    while let Some(ev) = s.next().await {
        match ev.expect("flush stream") {
            FlushEvent::Results(rs) => {
                assert!(summary.is_none(), "results after the summary");
                messages += 1;
                for x in rs {
                    let i = x
                        .item_id
                        .checked_sub(first)
                        .filter(|i| *i < N)
                        .unwrap_or_else(|| panic!("id {} outside the batch's range", x.item_id));
                    assert!(!seen[i as usize], "id {} streamed twice", x.item_id);
                    seen[i as usize] = true;
                    assert_eq!(x.state(), ItemState::Ok, "{x:?}");
                    assert_eq!(x.batch_id, r.batch_id);
                    count += 1;
                }
            }
            FlushEvent::Summary(sm) => {
                assert!(summary.is_none(), "two summaries");
                summary = Some(sm);
            }
        }
    }
    let flushed = t0.elapsed();
    let summary = summary.expect("the flush ends with a summary");
    assert_eq!(count, N, "results streamed");
    assert!(seen.iter().all(|b| *b), "every id of the range streamed");
    assert_eq!(summary.items_covered, N);
    let counts = summary.counts.unwrap();
    assert_eq!((counts.ok, counts.pending, counts.running), (N, 0, 0));

    let s = stats(&c).await;
    let items = s.items.unwrap();
    assert_eq!((items.pending, items.running, items.ok), (0, 0, N));
    eprintln!(
        "1M noop: submitted in {submitted:?}, all results back after {flushed:?} \
         ({messages} result messages, {:.0} items/s end to end)",
        N as f64 / flushed.as_secs_f64()
    );
}
