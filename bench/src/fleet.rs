//! The fleet section (issue 15): what the fleet layer costs. The same job — N `noop` items,
//! every result awaited — three ways, in one run, side by side:
//!
//! - **fleet**: `wqd_client::fleet` submits the batch as `any` items to a one-member fleet (the
//!   release daemon with `[fleet]`, on the host topology) over a loopback `nats-server -js`, and
//!   a fleet flush waits for every result (the member publishes each to the results stream,
//!   then acks);
//! - **direct**: the same daemon, `Submit(wait)` of the batch over its Unix socket
//!   (`wqd_client::Client`): no JetStream at all;
//! - **bare JetStream**: the service section's work-queue peer ([`crate::peers::Nats`], on
//!   the same server): a work-queue stream, two worker threads that ack each item and report
//!   completions — the floor any JetStream-based fleet adds to.
//!
//! Figures per batch size (1, 100, 1000): items/s of a closed loop of batches for a fixed
//! window, and the submit→all-results time of one batch (p50); ratios fleet/direct and
//! fleet/bare. Owns only the section; a missing `nats-server` skips it with a line.

use std::time::{Duration, Instant};

use crate::grpc;
use crate::peers::{self, Nats};
use crate::report::{Table, Verdict};
use crate::stats::percentile;
use wqd_client::fleet::{Fleet, FleetOptions, Selector};
use wqd_client::{Batch, Client, Endpoint, Item};

/// How much work the section does.
#[derive(Debug, Clone)]
pub struct Cfg {
    /// How long each (system, batch size) keeps submitting batches (at least one batch).
    pub window: Duration,
    pub batches: Vec<usize>,
}

impl Default for Cfg {
    fn default() -> Self {
        Cfg {
            window: Duration::from_secs(2),
            batches: vec![1, 100, 1000],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sys {
    Fleet,
    Direct,
    Bare,
}

impl Sys {
    fn label(self) -> &'static str {
        match self {
            Sys::Fleet => "wqd fleet (any, 1 member)",
            Sys::Direct => "wqd direct Submit(wait)",
            Sys::Bare => "bare JetStream work queue",
        }
    }
}

/// One figure: items/s and batch times.
struct Figure {
    items_per_s: f64,
    p50: Duration,
    p99: Duration,
}

/// Runs the section.
pub fn run(cfg: Cfg) -> (Vec<Table>, Vec<Verdict>) {
    let Some(bin) = peers::find("nats-server") else {
        eprintln!(
            "wqd-bench: fleet: nats-server not found (PATH, /usr/sbin, $WQD_BENCH_NATS_SERVER): section skipped; install it with `{}`",
            peers::INSTALL
        );
        return (Vec::new(), Vec::new());
    };
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("bench-fleet")
        .enable_all()
        .build()
        .expect("client runtime");
    let mut bare = Nats::start(&bin, cpus, &rt);
    let url = bare.url().to_string();
    let daemon = grpc::start_wqd_with(&format!(
        "\n[fleet]\nservers = [\"{url}\"]\nhost = \"bench\"\nack_wait = \"30s\"\n"
    ));
    let (fleet, direct) = rt.block_on(async {
        let f = Fleet::connect(FleetOptions::new(&url))
            .await
            .expect("fleet: connect");
        // The member joins in the background: wait for its record.
        let t0 = Instant::now();
        while f.hosts().await.map(|h| h.is_empty()).unwrap_or(true) {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "fleet: no member joined"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let c = Client::connect(Endpoint::unix(&daemon.socket))
            .await
            .expect("connect to the daemon");
        (f, c)
    });
    let mut t = Table::new(
        "Fleet: the fleet layer vs direct submission vs bare JetStream",
        &format!(
            "N noop items, every result awaited; closed loop of batches for {:?} per figure; one member (the release daemon, host topology), loopback {}; p50/p99 of the submit→all-results time of a batch.",
            cfg.window,
            crate::service::server_version("nats-server")
        ),
        &[
            "batch",
            "system",
            "items/s",
            "batch p50",
            "batch p99",
            "fleet/this items/s",
            "fleet/this p50",
        ],
    );
    for &n in &cfg.batches {
        let mut figs = Vec::new();
        for sys in [Sys::Fleet, Sys::Direct, Sys::Bare] {
            let mut times = Vec::new();
            let t0 = Instant::now();
            let mut items = 0usize;
            while times.is_empty() || t0.elapsed() < cfg.window {
                let b0 = Instant::now();
                rt.block_on(async {
                    match sys {
                        Sys::Fleet => {
                            let b = fleet
                                .submit(
                                    "default",
                                    (0..n).map(|_| (Selector::Any, Item::new("all", "noop"))),
                                )
                                .await
                                .expect("fleet submit");
                            let rep = fleet
                                .flush_ids(&b.batch, &b.ids, peers::DEADLINE)
                                .await
                                .expect("fleet flush");
                            assert!(rep.complete() && rep.all_ok(), "fleet: batch not all ok");
                        }
                        Sys::Direct => {
                            let r = direct
                                .submit(
                                    Batch::new()
                                        .items((0..n).map(|_| Item::new("all", "noop")))
                                        .wait(true),
                                )
                                .await
                                .expect("Submit(wait)");
                            assert_eq!(r.results.len(), n);
                        }
                        Sys::Bare => bare.batch(n).await,
                    }
                });
                times.push(b0.elapsed());
                items += n;
            }
            let total = t0.elapsed();
            figs.push((
                sys,
                Figure {
                    items_per_s: items as f64 / total.as_secs_f64(),
                    p50: percentile(&mut times, 50.0),
                    p99: percentile(&mut times, 99.0),
                },
            ));
        }
        let fleet_fig = &figs[0].1;
        let (f_ips, f_p50) = (fleet_fig.items_per_s, fleet_fig.p50);
        for (sys, f) in &figs {
            t.row(vec![
                n.to_string(),
                sys.label().to_string(),
                format!("{:.0}", f.items_per_s),
                format!("{:.2?}", f.p50),
                format!("{:.2?}", f.p99),
                format!("{:.2}", f_ips / f.items_per_s),
                format!("{:.2}", f_p50.as_secs_f64() / f.p50.as_secs_f64()),
            ]);
        }
    }
    drop(direct);
    drop(fleet);
    drop(daemon);
    (vec![t], Vec::new())
}
