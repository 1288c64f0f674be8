//! Criterion view of in-process dispatch: a batch of 100 `noop` items per iteration through
//! the engine and each peer, same pinned shape as the `wqd-bench` binary (see
//! `wqd_bench::dispatch`).

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use wqd_bench::{dispatch, topo};

fn batches(c: &mut Criterion) {
    let (s, w) = dispatch::cpus();
    topo::pin(s);
    let mut g = c.benchmark_group("dispatch");
    for n in [1usize, 100] {
        g.throughput(Throughput::Elements(n as u64));
        for mut sys in dispatch::systems(w) {
            let name = format!("{}/{n}", sys.name());
            g.bench_function(name, |b| b.iter(|| sys.batch(n)));
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    // Short windows keep the whole harness (bench/run.sh) well under 10 minutes on 2 cores.
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = batches
}
criterion_main!(benches);
