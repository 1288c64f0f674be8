//! Criterion view of the daemon's result encoder (`wqd::rpc::encode::ResultEncoder`) side by
//! side with prost's generated code for the same bytes (`result_out`, then
//! `Message::encode`): the 1 000 results of one `Submit(wait)` of `noop` items as a worker
//! ends them (one workqueue, target and handler; one queue time; each item started at the
//! clock reading that ended the one before). The ratio of the two is the encoder's gain
//! over the stock path; `docs/benchmarks.md` records it.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use prost::Message;
use wqd::rpc::convert::result_out;
use wqd::rpc::encode::ResultEncoder;
use wqd_core::engine::{ItemResult, State};
use wqd_core::target::Target;
use wqd_proto::out::SubmitResponseOut;
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

fn encode(c: &mut Criterion) {
    let rs = batch(1000);
    let mut g = c.benchmark_group("encode_1000_results");
    g.throughput(Throughput::Elements(rs.len() as u64));
    // The daemon's path: views of the results straight to bytes.
    g.bench_function("result_encoder", |b| {
        b.iter(|| {
            let mut enc = ResultEncoder::default();
            let mut resp = SubmitResponseOut::default();
            for r in &rs {
                enc.push(&r.view(), &mut resp.results);
            }
            resp.encode_to_vec()
        })
    });
    // The stock path: a `v1::ItemResult` per result, then prost's encoding.
    g.bench_function("prost_generated", |b| {
        b.iter(|| {
            v1::SubmitResponse {
                results: rs.iter().map(result_out).collect(),
                ..Default::default()
            }
            .encode_to_vec()
        })
    });
    g.finish();
    // Both paths write the same bytes (the encoder's tests check more shapes).
    let mut enc = ResultEncoder::default();
    let mut resp = SubmitResponseOut::default();
    for r in &rs {
        enc.push(&r.view(), &mut resp.results);
    }
    let stock = v1::SubmitResponse {
        results: rs.iter().map(result_out).collect(),
        ..Default::default()
    };
    assert_eq!(resp.encode_to_vec(), stock.encode_to_vec());
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = encode
}
criterion_main!(benches);
