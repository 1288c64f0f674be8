//! As a service (issue 13): the same job through wqd and through two general-purpose services
//! used as work queues, NATS JetStream and Redis ([`crate::peers`]), in one run, side by side:
//! N noop-equivalent items submitted by one client, executed by one worker per CPU, completion
//! awaited. This module owns the section: the systems, the interleaved runs, the tables and
//! the verdicts on the issue's target ("ahead of JetStream and Redis on items/s for batches of
//! 100 and 1000, and on single-item submit→completion p50").
//!
//! - **wqd**: the release daemon started as the gRPC section starts it
//!   ([`crate::grpc::start_wqd`]: host topology, one pinned worker per CPU, default workqueue),
//!   `noop` items targeting `all`, one client connection over the Unix socket on a
//!   current-thread runtime driven by the calling thread (as `wqctl`, and as the synchronous
//!   Redis client), requests pre-encoded ([`crate::wire`]); five rows: `Submit(wait)` on the
//!   default workqueue (returns every item's full result), `Submit` then `Flush(summary_only)` (returns counts) —
//!   the gRPC section's [`crate::grpc::call`] — `Submit(wait)` on a workqueue created at
//!   start with `results = summary` (no per-item record; the call returns counts), which is
//!   what the peers keep, and the first and third as requests of one `Session` kept open on
//!   the same connection (as the peers' clients keep theirs: a request is a DATA frame each
//!   way, no new HTTP/2 stream). The verdicts judge wqd's best row per figure and name it. One more
//!   row, not judged, makes the summary call through a second connection on a 2-thread
//!   runtime (the client of sessions 6 and 7), so the client's share stays visible.
//! - **NATS JetStream** and **Redis**: see [`crate::peers`] (servers on loopback TCP, two
//!   worker threads of this process with a connection each, completions are item ids).
//!
//! Figures: items/s of a closed loop of batches (one batch in flight, the next submitted when
//! every item of the last is complete) for a fixed window per figure, batches of 100 and 1000;
//! and the submit→completion time of one item at a time, p50 and p99 per run. Every run
//! interleaves the systems (their order rotates); latency samples come in a block per system,
//! each after a pause (see the latency loop in [`run`]); a
//! peer whose server is not installed is skipped with a line saying how to install it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::busy::{self, Neighbours};
use crate::grpc::{self, rotate, SUMMARY_WQ};
use crate::peers::{self, Nats, Redis};
use crate::report::{self, Table, Verdict};
use crate::stats::{ns, percentile, Spread};
use crate::wire::{self, Conn, Pre};

/// How much work the section does.
#[derive(Debug, Clone)]
pub struct Cfg {
    pub runs: usize,
    /// How long each throughput figure keeps submitting batches (at least one).
    pub window: Duration,
    pub batches: Vec<usize>,
    /// Single items per system per latency run.
    pub latency_samples: usize,
    /// The pause before each single item (see [`run`]'s latency loop).
    pub latency_gap: Duration,
    /// Measured beside a busy thread on each CPU ([`crate::busy`]); no target judged.
    pub busy: bool,
}

impl Default for Cfg {
    fn default() -> Self {
        Cfg {
            runs: 7,
            window: Duration::from_millis(500),
            batches: vec![100, 1000],
            latency_samples: 1000,
            latency_gap: Duration::from_millis(1),
            busy: false,
        }
    }
}

/// One way to run the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Sys {
    Wait,
    Flush,
    /// `Submit(wait)` on [`SUMMARY_WQ`].
    WaitSummary,
    /// [`Sys::Wait`]'s request as one request of a `Session` kept open.
    Session,
    /// [`Sys::WaitSummary`]'s request as one request of that `Session`.
    SessionSummary,
    /// [`Sys::WaitSummary`] from a client whose connection runs on a 2-thread runtime (the
    /// setup of sessions 6 and 7), for comparison: not one of wqd's judged rows.
    WaitSummaryMt,
    Nats,
    Redis,
}

impl Sys {
    fn label(self) -> &'static str {
        match self {
            Sys::Wait => grpc::Sys::Wait.label(),
            Sys::Flush => grpc::Sys::Flush.label(),
            Sys::WaitSummary => "wqd Submit(wait), results summary",
            Sys::Session => "wqd Session(wait)",
            Sys::SessionSummary => "wqd Session(wait), results summary",
            Sys::WaitSummaryMt => "wqd Submit(wait), results summary, client on a 2-thread runtime",
            Sys::Nats => "NATS JetStream",
            Sys::Redis => "Redis",
        }
    }

    /// The server binary a peer needs.
    fn server(self) -> Option<&'static str> {
        match self {
            Sys::Nats => Some("nats-server"),
            Sys::Redis => Some("redis-server"),
            _ => None,
        }
    }
}

/// wqd's rows.
const WQD: [Sys; 5] = [
    Sys::Wait,
    Sys::Flush,
    Sys::WaitSummary,
    Sys::Session,
    Sys::SessionSummary,
];

/// Every system of the section, started.
struct Rig {
    /// The NATS client's runtime, and [`Sys::WaitSummaryMt`]'s.
    rt: tokio::runtime::Runtime,
    /// wqd's client: a current-thread runtime driven by the calling thread, as `wqctl` runs and
    /// as a synchronous caller would (Redis's client here is the `redis` crate's synchronous
    /// connection, on the calling thread too). Its connection's tasks run only inside its
    /// `block_on`, so a call costs no hand-off between client threads.
    wqd_rt: tokio::runtime::Runtime,
    wqd: Conn,
    /// A second connection, on `rt`.
    wqd_mt: Conn,
    /// A `Session` on `wqd`'s connection, open for the whole section.
    session: wire::Session,
    /// Batch size → requests.
    pre: HashMap<usize, Reqs>,
    nats: Option<Nats>,
    redis: Option<Redis>,
    // Last: the daemon stops after the client's connection is gone.
    _daemon: grpc::Server,
}

/// The requests of one batch size, encoded once.
struct Reqs {
    /// `Submit(wait)`, `Submit`, `Submit(wait)` on [`SUMMARY_WQ`].
    wait: Pre,
    nowait: Pre,
    summary: Pre,
    /// `wait` and `summary` as session requests.
    session: Pre,
    session_summary: Pre,
}

impl Rig {
    /// One batch of `n` through `sys`, completion awaited.
    fn batch(&mut self, sys: Sys, n: usize) {
        match sys {
            Sys::Session | Sys::SessionSummary => {
                let r = &self.pre[&n];
                let req = if sys == Sys::Session {
                    &r.session
                } else {
                    &r.session_summary
                };
                let a = self
                    .wqd_rt
                    .block_on(self.session.call(req))
                    .expect("wqd Session");
                if sys == Sys::Session {
                    assert_eq!(a.results.len(), n, "wqd session: results");
                } else {
                    let ok = a.counts.map_or(0, |c| c.ok);
                    assert_eq!(ok as usize, n, "wqd session summary: items ok");
                }
            }
            Sys::WaitSummary | Sys::WaitSummaryMt => {
                let req = &self.pre[&n].summary;
                let a = if sys == Sys::WaitSummary {
                    self.wqd_rt.block_on(self.wqd.submit(req))
                } else {
                    self.rt.block_on(self.wqd_mt.submit(req))
                }
                .expect("wqd Submit(wait), results summary");
                let ok = a.counts.map_or(0, |c| c.ok);
                assert_eq!(ok as usize, n, "wqd summary: items ok");
            }
            Sys::Wait | Sys::Flush => {
                let Reqs { wait, nowait, .. } = &self.pre[&n];
                let s = if sys == Sys::Wait {
                    grpc::Sys::Wait
                } else {
                    grpc::Sys::Flush
                };
                self.wqd_rt
                    .block_on(grpc::call(&self.wqd, s, n, wait, nowait));
            }
            Sys::Nats => {
                let nats = self.nats.as_mut().expect("NATS started");
                self.rt.block_on(nats.batch(n));
            }
            Sys::Redis => self.redis.as_mut().expect("Redis started").batch(n),
        }
    }

    /// Items/s of batches of `n` through `sys` for `window` (at least one batch).
    fn throughput(&mut self, sys: Sys, n: usize, window: Duration) -> f64 {
        let t0 = Instant::now();
        let mut items = 0usize;
        loop {
            self.batch(sys, n);
            items += n;
            if t0.elapsed() >= window {
                break;
            }
        }
        items as f64 / t0.elapsed().as_secs_f64()
    }
}

/// The (min, median, max) of `a[i] / b[i]` over runs.
fn per_run(a: &[f64], b: &[f64]) -> Spread {
    let mut v: Vec<f64> = a.iter().zip(b).map(|(x, y)| x / y).collect();
    Spread::of(&mut v)
}

/// Runs the section: a throughput table, a latency table, and the verdicts.
pub fn run(cfg: Cfg) -> (Vec<Table>, Vec<Verdict>) {
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("bench-client")
        .enable_all()
        .build()
        .expect("client runtime");
    let wqd_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("wqd client runtime");
    let daemon = grpc::start_wqd(&[]);
    let wqd = wqd_rt.block_on(wire::connect(&daemon.unix()));
    let wqd_mt = rt.block_on(wire::connect(&daemon.unix()));
    wqd_rt
        .block_on(wqd.create_workqueue(SUMMARY_WQ, wqd_proto::v1::ResultsMode::Summary))
        .expect("creating the summary workqueue");
    let mut sizes = cfg.batches.clone();
    sizes.push(1);
    let pre = sizes
        .into_iter()
        .map(|n| {
            let wait = wire::noop_batch(n, true);
            let summary = wire::noop_batch_in(SUMMARY_WQ, n, true);
            let r = Reqs {
                session: wire::session_request(1, &wait),
                session_summary: wire::session_request(1, &summary),
                wait,
                nowait: wire::noop_batch(n, false),
                summary,
            };
            (n, r)
        })
        .collect();
    let session = wqd_rt
        .block_on(wqd.session())
        .expect("opening a wqd Session");
    // Peers: started when installed; otherwise a line, and a skipped row.
    let mut missing: Vec<Sys> = Vec::new();
    let mut found = |sys: Sys| {
        let name = sys.server().expect("a peer");
        let bin = peers::find(name);
        if bin.is_none() {
            eprintln!(
                "wqd-bench: service: {name} not found (PATH, /usr/sbin, $WQD_BENCH_*): {} rows \
                 skipped; install it with `{}`",
                sys.label(),
                peers::INSTALL
            );
            missing.push(sys);
        }
        bin
    };
    let nats_bin = found(Sys::Nats);
    let redis_bin = found(Sys::Redis);
    let nats = nats_bin.map(|b| Nats::start(&b, cpus, &rt));
    let redis = redis_bin.map(|b| Redis::start(&b, cpus));
    let mut systems = WQD.to_vec();
    systems.push(Sys::WaitSummaryMt);
    if nats.is_some() {
        systems.push(Sys::Nats);
    }
    if redis.is_some() {
        systems.push(Sys::Redis);
    }
    let mut rig = Rig {
        rt,
        wqd_rt,
        wqd,
        wqd_mt,
        session,
        pre,
        nats,
        redis,
        _daemon: daemon,
    };
    eprintln!(
        "wqd-bench: service: {} started",
        systems
            .iter()
            .map(|s| s.label())
            .collect::<Vec<_>>()
            .join(", ")
    );

    // Warm-up: connections, the daemon's and servers' first allocations, the workers' pulls.
    for &s in &systems {
        for _ in 0..3 {
            rig.batch(s, cfg.batches[0]);
        }
        for _ in 0..20 {
            rig.batch(s, 1);
        }
    }
    // (batch, system) → per-run items/s; system → per-run (p50, p99) in ns.
    let mut tp: HashMap<(usize, Sys), Vec<f64>> = HashMap::new();
    let mut lat: HashMap<Sys, Vec<(f64, f64)>> = HashMap::new();
    let neighbours = cfg.busy.then(Neighbours::start);
    for run in 0..cfg.runs {
        for (bi, &n) in cfg.batches.iter().enumerate() {
            for s in rotate(&systems, run + bi) {
                let r = rig.throughput(s, n, cfg.window);
                tp.entry((n, s)).or_default().push(r);
            }
        }
        let mut t: HashMap<Sys, Vec<Duration>> = HashMap::new();
        // Each system's items in a block of their own (the blocks' order rotating over
        // runs), each item after the same pause: every item follows an item of its own system
        // and finds that system's threads asleep (the pause outlasts every spin, wqd's 50 µs
        // included). Sessions 6 and 7 alternated the systems item by item in a rotation whose
        // cyclic order gave each system the same predecessor in every sample: a wqd row that
        // followed another wqd row started with warm threads and caches, the others with a
        // peer's, which moved p50s by up to 80 µs.
        for s in rotate(&systems, run) {
            for _ in 0..cfg.latency_samples {
                std::thread::sleep(cfg.latency_gap);
                let t0 = Instant::now();
                rig.batch(s, 1);
                t.entry(s).or_default().push(t0.elapsed());
            }
        }
        for (s, mut v) in t {
            let p = (ns(percentile(&mut v, 50.0)), ns(percentile(&mut v, 99.0)));
            lat.entry(s).or_default().push(p);
        }
        eprintln!("wqd-bench: service: run {}/{} done", run + 1, cfg.runs);
    }
    drop(neighbours);
    drop(rig);

    let skipped = |s: Sys| {
        format!(
            "skipped: {} not installed (`{}`)",
            s.server().unwrap_or("?"),
            peers::INSTALL
        )
    };
    let mut verdicts = Vec::new();
    let mut t = Table::new(
        "As a service: wqd vs NATS JetStream vs Redis, batch throughput (items/s, higher is better)",
        &format!(
            "The same job through three services: batches of `noop`-equivalent items submitted \
             by one client, run by one worker per CPU ({cpus} here), every completion awaited \
             before the next batch (closed loop), {:?} per figure; {} runs interleaved (order \
             rotating), min / median / max. wqd: the release daemon (host topology, pinned \
             workers, default workqueue), one gRPC connection over its Unix socket driven by \
             the calling thread (a current-thread tokio runtime, as `wqctl` runs, like Redis's \
             synchronous client here; the row `client on a 2-thread runtime` is the same call \
             through a connection on a 2-thread runtime, as sessions 6 and 7 measured), `noop` \
             items targeting `all`; the `Session` rows send the same requests as requests of \
             one `DispatchService.Session` kept open on that connection. NATS JetStream ({}): work-queue stream in memory, one durable \
             pull consumer (explicit ack) shared by {cpus} worker threads (`messages()`, acks \
             each item, publishes the ids of each run of ready items to a results subject), \
             client publishes with async publish and awaits every publish ack. Redis ({}): \
             client `LPUSH`es the batch, {cpus} worker threads `BLMPOP` up to {} items and \
             `LPUSH` their ids to a results list, client `BLMPOP`s results. Peers on \
             127.0.0.1 TCP, one connection per worker and one for the client, no persistence. \
             `wqd ÷ this` is wqd's items/s over this row's in the same run (above 1 = wqd \
             ahead).",
            cfg.window,
            cfg.runs,
            version("nats-server"),
            version("redis-server"),
            peers::WORKER_BATCH
        ),
        &[
            "system",
            "batch",
            "items/s",
            "wqd Submit(wait) ÷ this",
            "wqd Submit + Flush ÷ this",
            "wqd Submit(wait), summary ÷ this",
            "wqd Session(wait) ÷ this",
            "wqd Session(wait), summary ÷ this",
        ],
    );
    let all = [
        Sys::Wait,
        Sys::Flush,
        Sys::WaitSummary,
        Sys::Session,
        Sys::SessionSummary,
        Sys::WaitSummaryMt,
        Sys::Nats,
        Sys::Redis,
    ];
    for &n in &cfg.batches {
        let rows: Vec<&Vec<f64>> = WQD.iter().map(|s| &tp[&(n, *s)]).collect();
        for s in all {
            let Some(v) = tp.get(&(n, s)) else {
                let mut row = vec![s.label().into(), n.to_string(), skipped(s)];
                row.extend(WQD.iter().map(|_| String::new()));
                t.row(row);
                continue;
            };
            let mut row = vec![
                s.label().into(),
                n.to_string(),
                report::rate_spread(Spread::of(&mut v.clone())),
            ];
            row.extend(rows.iter().map(|w| report::spread(per_run(w, v), 2)));
            t.row(row);
        }
        let med = |v: &[f64]| Spread::of(&mut v.to_vec()).median;
        // wqd's best row: the highest median items/s; the verdict judges it and names it.
        let best = WQD
            .iter()
            .copied()
            .max_by(|a, b| med(&tp[&(n, *a)]).total_cmp(&med(&tp[&(n, *b)])))
            .unwrap_or(Sys::Wait);
        let bv = &tp[&(n, best)];
        let mut ok = missing.is_empty();
        let mut measured = vec![format!(
            "wqd's best row {} {}; {}",
            best.label(),
            report::rate(med(bv)),
            WQD.iter()
                .filter(|s| **s != best)
                .map(|s| format!("{} {}", s.label(), report::rate(med(&tp[&(n, *s)]))))
                .collect::<Vec<_>>()
                .join(", ")
        )];
        for p in [Sys::Nats, Sys::Redis] {
            match tp.get(&(n, p)) {
                Some(v) => {
                    let r = per_run(bv, v).median;
                    ok &= r > 1.0;
                    measured.push(format!(
                        "{} {}: wqd's best {r:.2}x",
                        p.label(),
                        report::rate(med(v))
                    ));
                }
                None => measured.push(format!("{}: not measured", p.label())),
            }
        }
        verdicts.push(Verdict::new(
            &format!(
                "as a service, batches of {n}: wqd ahead of NATS JetStream and Redis on items/s \
                 (its best row)"
            ),
            ok,
            measured.join("; "),
        ));
    }

    let mut lt = Table::new(
        "As a service: wqd vs NATS JetStream vs Redis, single-item submit→completion (lower is better)",
        &format!(
            "One item at a time from the same client, each system's items in a block of their \
             own (blocks' order rotating over runs), each item's submit until its completion \
             is known to the client (wqd: the call's return; JetStream: the publish ack and the \
             completion message; Redis: the completion popped); {} items per system per run, \
             each after a {:?} pause (so that none starts with threads the previous call left \
             awake), p50 and p99 per run, min / median / max over {} runs. `÷ wqd` is this \
             row's figure over wqd `Submit(wait)`'s in the same run (above 1 = wqd ahead).",
            cfg.latency_samples, cfg.latency_gap, cfg.runs
        ),
        &[
            "system",
            "p50",
            "p99",
            "p50 ÷ wqd Submit(wait)",
            "p99 ÷ wqd Submit(wait)",
        ],
    );
    let base = &lat[&Sys::Wait];
    let col = |v: &[(f64, f64)], f: fn(&(f64, f64)) -> f64| v.iter().map(f).collect::<Vec<f64>>();
    let (b50, b99) = (col(base, |x| x.0), col(base, |x| x.1));
    let mut ok = missing.is_empty();
    let p50_med = |s: Sys| Spread::of(&mut col(&lat[&s], |x| x.0)).median;
    // wqd's best row for one item: the lowest median p50.
    let best = WQD
        .iter()
        .copied()
        .min_by(|a, b| p50_med(*a).total_cmp(&p50_med(*b)))
        .unwrap_or(Sys::Wait);
    let best50 = col(&lat[&best], |x| x.0);
    let mut measured = vec![format!(
        "wqd's best row {} p50 {}",
        best.label(),
        report::dur_ns(p50_med(best))
    )];
    for s in all {
        let Some(v) = lat.get(&s) else {
            lt.row(vec![
                s.label().into(),
                skipped(s),
                String::new(),
                String::new(),
                String::new(),
            ]);
            measured.push(format!("{}: not measured", s.label()));
            continue;
        };
        let (p50, p99) = (col(v, |x| x.0), col(v, |x| x.1));
        let r50 = per_run(&p50, &b50);
        lt.row(vec![
            s.label().into(),
            report::dur_spread(Spread::of(&mut p50.clone())),
            report::dur_spread(Spread::of(&mut p99.clone())),
            report::spread(r50, 2),
            report::spread(per_run(&p99, &b99), 2),
        ]);
        if matches!(s, Sys::Nats | Sys::Redis) {
            // Against wqd's best row, per run.
            let r = per_run(&p50, &best50).median;
            ok &= r > 1.0;
            measured.push(format!(
                "{} p50 {} = {r:.2}x wqd's best",
                s.label(),
                report::dur_ns(Spread::of(&mut p50.clone()).median),
            ));
        }
    }
    verdicts.push(Verdict::new(
        "as a service, single item: wqd's submit→completion p50 ahead of NATS JetStream and Redis",
        ok,
        measured.join("; "),
    ));
    if cfg.busy {
        busy::mark(&mut t);
        busy::mark(&mut lt);
        return (vec![t, lt], Vec::new());
    }
    (vec![t, lt], verdicts)
}

/// A peer server's version (`nats-server v2.9.10`, `redis-server v7.0.15`), from `--version`.
/// A peer server's version, for other sections' notes.
pub fn server_version(name: &str) -> String {
    version(name)
}

fn version(name: &str) -> String {
    let out = peers::find(name)
        .and_then(|b| std::process::Command::new(b).arg("--version").output().ok());
    let Some(out) = out else {
        return format!("{name}: not installed");
    };
    // `nats-server: v2.9.10`; `Redis server v=7.0.15 sha=… malloc=…`.
    let text = String::from_utf8_lossy(&out.stdout);
    let v = text
        .split_whitespace()
        .find_map(|w| {
            let w = w.strip_prefix("v=").or_else(|| w.strip_prefix('v'))?;
            w.starts_with(|c: char| c.is_ascii_digit()).then_some(w)
        })
        .unwrap_or("?");
    format!("{name} v{v}")
}
