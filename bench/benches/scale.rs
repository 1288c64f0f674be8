//! Criterion view of `GroupMap::resolve` and `GroupMap::build` from 64 to 4096 CPUs (see
//! `wqd_bench::scale`).

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use wqd_bench::{scale, topo};
use wqd_core::groups::{Fallback, GroupMap, GroupsConfig};

fn resolve(c: &mut Criterion) {
    let mut g = c.benchmark_group("resolve");
    for n in [64u32, 256, 1024, 4096] {
        let t = topo::topology(n);
        let m = GroupMap::build(&t, &GroupsConfig::default());
        for (label, target, live) in scale::resolve_cases(n) {
            g.bench_with_input(BenchmarkId::new(label, n), &n, |b, _| {
                b.iter(|| m.resolve(&target, &live, Fallback::Widen).expect("resolve"))
            });
        }
    }
    g.finish();
    let mut g = c.benchmark_group("build");
    g.sample_size(10);
    for n in [64u32, 1024, 4096] {
        let t = topo::topology(n);
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| GroupMap::build(&t, &GroupsConfig::default()))
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    // Short windows keep the whole harness (bench/run.sh) well under 10 minutes on 2 cores.
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = resolve
}
criterion_main!(benches);
