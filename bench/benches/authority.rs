//! Criterion view of the Unix listener's authority rewriter (`wqd::authority`, run by
//! `wqd::conn::Rewrite` below hyper): the cost per request header block, rewritten or only
//! parsed, and per byte of the DATA it passes.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use wqd::authority::{rewrite_block, Rewriter};
use wqd::conn::PREFACE;

/// A raw HPACK string literal.
fn string(s: &[u8]) -> Vec<u8> {
    let mut v = vec![s.len() as u8];
    v.extend_from_slice(s);
    v
}

/// A unary call's header block as grpcio sends its first one: `:authority` a literal with
/// incremental indexing, then the usual gRPC headers.
fn block(authority: &[u8]) -> Vec<u8> {
    let mut b = vec![0x83, 0x86]; // :method POST, :scheme http
    b.push(0x44); // :path
    b.extend(string(b"/wqd.v1.TopologyService/GetTopology"));
    b.push(0x41); // :authority
    b.extend(string(authority));
    b.push(0x5f); // content-type (static 31)
    b.extend(string(b"application/grpc"));
    b.push(0x40);
    b.extend(string(b"te"));
    b.extend(string(b"trailers"));
    b.push(0x40);
    b.extend(string(b"grpc-accept-encoding"));
    b.extend(string(b"identity, deflate, gzip"));
    b.push(0x7a); // user-agent (static 58)
    b.extend(string(b"grpc-python/1.85.3 grpc-c/52.0.0 (linux; chttp2)"));
    b
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

const PATH: &[u8] = b"tmp%2Fpytest-of-root%2Fpytest-0%2Fwqd.sock";

fn authority(c: &mut Criterion) {
    let mut g = c.benchmark_group("authority");
    for (name, value) in [("block_path", PATH), ("block_localhost", &b"localhost"[..])] {
        let b0 = block(value);
        g.throughput(Throughput::Elements(1));
        g.bench_function(name, |b| {
            b.iter_batched_ref(
                || b0.clone(),
                |blk| rewrite_block(blk).expect("parses"),
                BatchSize::SmallInput,
            )
        });
    }

    // One request (HEADERS + a 5-byte DATA) through a rewriter past the preface, fed whole.
    let mut req = frame(0x1, 0x4, 1, &block(PATH));
    req.extend(frame(0x0, 0x1, 1, &[0, 0, 0, 0, 0]));
    let mut rw = Rewriter::new();
    let mut out = Vec::with_capacity(4096);
    rw.feed(PREFACE, &mut out);
    g.throughput(Throughput::Elements(1));
    g.bench_function("request_path", |b| {
        b.iter(|| {
            out.clear();
            rw.feed(&req, &mut out)
        })
    });

    // A 1 MiB DATA frame read in 16 KiB chunks the way `conn::Rewrite` reads: `skip` leaves
    // the payload in the reader's buffer.
    let data = frame(0x0, 0x0, 1, &vec![0x5a; 1 << 20]);
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.bench_function("data_1MiB", |b| {
        b.iter(|| {
            let mut passed = 0;
            for chunk in data.chunks(16 * 1024) {
                let k = rw.skip(chunk.len());
                passed += k;
                out.clear();
                rw.feed(&chunk[k..], &mut out);
            }
            passed
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = authority
}
criterion_main!(benches);
