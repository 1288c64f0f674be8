//! Criterion view of the daemon's response encoding for `Submit(wait)` side by side with
//! prost's generated code for the same bytes: the answer to one call of 1 000 `noop` items as
//! a worker ends them (one workqueue, target and handler; one queue time; each item started
//! at the clock reading that ended the one before), its receipts (`EncodedReceipts`) and its
//! results (`wqd::rpc::encode::ResultEncoder`) against `v1::ItemReceipt`s and `result_out`
//! then `Message::encode`. The ratio of the two is the encoder's gain over the stock path;
//! `docs/benchmarks.md` records it.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use prost::Message;
use wqd::rpc::convert::result_out;
use wqd::rpc::encode::ResultEncoder;
use wqd_core::engine::{ItemResult, State};
use wqd_core::target::Target;
use wqd_proto::out::{EncodedReceipts, SubmitResponseOut};
use wqd_proto::v1;

/// Results of one batch of `n` `noop` items, 300 ns each, run back to back on CPU 1.
fn batch(n: u64) -> Vec<ItemResult> {
    let queued = SystemTime::UNIX_EPOCH + Duration::new(1_764_900_000, 123_456_789);
    let workqueue: Arc<str> = Arc::from("default");
    let handler: Arc<str> = Arc::from("noop");
    (0..n)
        .map(|i| ItemResult {
            id: 1_000_000 + i,
            batch: 77,
            workqueue: workqueue.clone(),
            state: State::Ok,
            output: Vec::new(),
            error: String::new(),
            target: Target::All,
            handler: handler.clone(),
            cpu_started: Some(1),
            cpu_finished: Some(1),
            fallback: None,
            reason: String::new(),
            rebinds: 0,
            queued_at: queued,
            started_at: Some(queued + Duration::from_nanos(20_000 + 300 * i)),
            finished_at: Some(queued + Duration::from_nanos(20_300 + 300 * i)),
            epoch_started: Some(3),
            epoch_decided: None,
            worker: None,
            worker_lost: 0,
        })
        .collect()
}

/// The daemon's path: plain receipts and result views straight to bytes.
fn ours(rs: &[ItemResult]) -> Vec<u8> {
    let mut resp = SubmitResponseOut {
        batch_id: 77,
        items: EncodedReceipts::with_capacity(rs.len()),
        ..Default::default()
    };
    let mut enc = ResultEncoder::default();
    for r in rs {
        resp.items.push_queued(r.id);
        enc.push(&r.view(), &mut resp.results);
    }
    resp.encode_to_vec()
}

/// The stock path: a `v1::ItemReceipt` and a `v1::ItemResult` per item, then prost's
/// encoding.
fn stock(rs: &[ItemResult]) -> Vec<u8> {
    v1::SubmitResponse {
        batch_id: 77,
        items: rs
            .iter()
            .map(|r| v1::ItemReceipt {
                item_id: r.id,
                queued: true,
                ..Default::default()
            })
            .collect(),
        results: rs.iter().map(result_out).collect(),
        counts: None,
        ..Default::default()
    }
    .encode_to_vec()
}

fn encode(c: &mut Criterion) {
    let rs = batch(1000);
    // Both paths write the same bytes (the encoders' tests check more shapes).
    assert_eq!(ours(&rs), stock(&rs));
    let mut g = c.benchmark_group("submit_wait_response_1000");
    g.throughput(Throughput::Elements(rs.len() as u64));
    g.bench_function("wqd_encoders", |b| b.iter(|| ours(&rs)));
    g.bench_function("prost_generated", |b| b.iter(|| stock(&rs)));
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = encode
}
criterion_main!(benches);
