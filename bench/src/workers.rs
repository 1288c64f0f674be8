//! Attached workers against the same work done by a built-in handler, in one run.
//!
//! One real `wqd` (release binary, host topology, workers pinned as in production, the Unix
//! socket) serves three kinds of the same empty work on the default workqueue, target `all`:
//! - **built-in**: the `noop` handler, run by the daemon's own pinned threads;
//! - **Rust worker**: handler `bench.rs`, served by one `wqd-worker-example` process (the
//!   `wqd_client::worker` library: one pinned thread per CPU, one credit per slot; its work
//!   is a hash of the empty payload and one line to /dev/null);
//! - **Rust worker, 16 credits**: handler `bench.rs16`, a second `wqd-worker-example` with
//!   `--prefetch 16` (the daemon's `workers.max_credits = 16`) on a workqueue with `max_active`
//!   16: a slot holds up to 16 items and answers them back to back;
//! - **Python worker**: handler `bench.py`, served by one Python process running
//!   `wqd.Worker` from `client/python` with stock grpcio (handler returns `None`), when the
//!   venv `target/pyenv` exists (the test suite creates it); otherwise the row says skipped.
//!
//! Figures, per batch size (1, 100, 1000): items/s of a closed loop of `Submit(wait)` from one
//! client for a fixed window (the batch's items spread over the CPUs, `max_active` 1 per CPU
//! for each kind), and the submit→start latency of those items (`started_at - queued_at` of
//! their results: for an attached worker, the moment the daemon sent the item; p50 and p99).
//! Ratios are each worker's items/s ÷ the built-in's in the same run. Runs interleave the
//! three kinds (their order rotates), so load from elsewhere hits all of them.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use wqd_client::{Batch, Client, Endpoint, Item};

use crate::grpc::{binary, start_wqd_with, Proc, Server};
use crate::report::{Table, Verdict};
use crate::stats::{percentile, Spread};

/// How much work the section does.
#[derive(Debug, Clone)]
pub struct Cfg {
    pub runs: usize,
    pub window: Duration,
    pub batches: Vec<usize>,
}

impl Default for Cfg {
    fn default() -> Self {
        Cfg {
            runs: 3,
            window: Duration::from_millis(1500),
            batches: vec![1, 100, 1000],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Builtin,
    Rust,
    Python,
    /// The Rust worker with 16 credits per slot, on a workqueue with `max_active` 16.
    RustWide,
}

impl Kind {
    fn handler(self) -> &'static str {
        match self {
            Kind::Builtin => "noop",
            Kind::Rust => "bench.rs",
            Kind::Python => "bench.py",
            Kind::RustWide => "bench.rs16",
        }
    }
    fn workqueue(self) -> &'static str {
        match self {
            Kind::RustWide => "wide",
            _ => "",
        }
    }
    fn label(self) -> &'static str {
        match self {
            Kind::Builtin => "built-in `noop`",
            Kind::Rust => "Rust attached worker",
            Kind::Python => "Python attached worker",
            Kind::RustWide => "Rust attached worker, 16 credits, `max_active` 16",
        }
    }
}

/// Waits (bounded) until `line_has` appears on the child's stdout, then drains the rest.
fn wait_ready(child: &mut Child, line_has: &str, what: &str) {
    let out = child.stdout.take().expect("stdout piped");
    let (tx, rx) = std::sync::mpsc::channel();
    let want = line_has.to_string();
    std::thread::spawn(move || {
        let mut told = false;
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if !told && line.contains(&want) {
                let _ = tx.send(());
                told = true;
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("{what} did not attach within 60 s"));
}

fn rust_worker(s: &Server, handler: &str, prefetch: u32) -> Proc {
    let mut c = Command::new(binary("wqd-worker-example"))
        .arg("--socket")
        .arg(&s.socket)
        .args(["--target", "all", "--handler", handler, "--name", "bench"])
        .args(["--prefetch", &prefetch.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn wqd-worker-example");
    wait_ready(&mut c, "attached", "wqd-worker-example");
    Proc::new(c, "wqd-worker-example")
}

const PY_WORKER: &str = r#"
import sys, signal, wqd
w = wqd.Worker({"bench.py": lambda item: None}, target="all", name="bench")
w.start()
print("attached", flush=True)
signal.signal(signal.SIGTERM, lambda *a: w.stop(graceful=False))
w.wait()
"#;

fn python_worker(s: &Server) -> Option<Proc> {
    // target/release/wqd → the repository.
    let root: PathBuf = binary("wqd").parent()?.parent()?.parent()?.to_path_buf();
    let py = root.join("target/pyenv/bin/python3");
    if !py.exists() {
        return None;
    }
    let mut c = Command::new(py)
        .args(["-c", PY_WORKER])
        .env("PYTHONPATH", root.join("client/python"))
        .env("WQD_SOCKET", &s.socket)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    wait_ready(&mut c, "attached", "the Python worker");
    Some(Proc::new(c, "the Python worker"))
}

/// One figure: items/s and the submit→start latencies of a window of `Submit(wait)` calls.
async fn figure(c: &Client, kind: Kind, n: usize, window: Duration) -> (f64, Vec<Duration>) {
    let mut items = 0usize;
    let mut lat = Vec::new();
    let t0 = Instant::now();
    while items == 0 || t0.elapsed() < window {
        let mut b = Batch::new().wait(true).workqueue(kind.workqueue());
        for _ in 0..n {
            b = b.item(Item::new("all", kind.handler()));
        }
        let r = c.submit(b).await.expect("Submit(wait)");
        items += r.results.len();
        for x in &r.results {
            let at = |t: &Option<prost_types::Timestamp>| {
                t.as_ref().map(|t| {
                    SystemTime::UNIX_EPOCH + Duration::new(t.seconds as u64, t.nanos as u32)
                })
            };
            if let (Some(q), Some(s)) = (at(&x.queued_at), at(&x.started_at)) {
                lat.push(s.duration_since(q).unwrap_or_default());
            }
        }
    }
    (items as f64 / t0.elapsed().as_secs_f64(), lat)
}

/// Runs the section: one table of items/s and latency per kind and batch size, and ratios.
pub fn run(cfg: Cfg) -> (Vec<Table>, Vec<Verdict>) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("client runtime");
    // Slots may hold 16 items (the `wide` row); the others ask for one at a time.
    let s = start_wqd_with("[workers]\nmax_credits = 16\n");
    let _rust = rust_worker(&s, "bench.rs", 1);
    let _wide = rust_worker(&s, "bench.rs16", 16);
    let py = python_worker(&s);
    let mut kinds = vec![Kind::Builtin, Kind::Rust, Kind::RustWide];
    if py.is_some() {
        kinds.push(Kind::Python);
    } else {
        eprintln!("wqd-bench: workers: no target/pyenv (run the test suite once); Python skipped");
    }
    let c = rt
        .block_on(Client::connect(Endpoint::unix(&s.socket)))
        .expect("connect");
    let wide = wqd_client::proto::WorkqueueAttrs {
        name: "wide".into(),
        max_active: 16,
        ..Default::default()
    };
    rt.block_on(c.create_workqueue(wide))
        .expect("create workqueue wide");
    // (kind, batch) → per-run items/s, and all latencies.
    let mut tp: std::collections::HashMap<(usize, usize), Vec<f64>> = Default::default();
    let mut lat: std::collections::HashMap<(usize, usize), Vec<Duration>> = Default::default();
    // Warm-up: every kind once.
    for &k in &kinds {
        rt.block_on(figure(&c, k, 10, Duration::from_millis(50)));
    }
    for run in 0..cfg.runs {
        for (bi, &n) in cfg.batches.iter().enumerate() {
            let mut order: Vec<usize> = (0..kinds.len()).collect();
            order.rotate_left((run + bi) % kinds.len());
            for ki in order {
                let (r, l) = rt.block_on(figure(&c, kinds[ki], n, cfg.window));
                tp.entry((ki, n)).or_default().push(r);
                lat.entry((ki, n)).or_default().extend(l);
            }
        }
    }
    let mut t = Table::new(
        "Attached workers and the same work as a built-in handler",
        &format!(
            "One `wqd` on the host topology, Unix socket; one client, closed loop of `Submit(wait)` \
             for {:?} per figure, {} runs (median, min–max); target `all`, default workqueue \
             (`max_active` 1 per CPU). Latency: `started_at - queued_at` of every result \
             (p50/p99 over all runs). Ratio: items/s ÷ the built-in's in the same runs.",
            cfg.window, cfg.runs
        ),
        &["system", "batch", "items/s", "÷ built-in", "submit→start p50", "p99"],
    );
    let mut verdicts = Vec::new();
    for &n in &cfg.batches {
        let base = Spread::of(&mut tp.get(&(0, n)).cloned().unwrap_or_default()).median;
        for (ki, k) in kinds.iter().enumerate() {
            let sp = Spread::of(&mut tp.get(&(ki, n)).cloned().unwrap_or_default());
            let mut l = lat.get(&(ki, n)).cloned().unwrap_or_default();
            t.row(vec![
                k.label().into(),
                n.to_string(),
                format!("{:.0} ({:.0}–{:.0})", sp.median, sp.min, sp.max),
                format!("{:.2}", sp.median / base),
                format!("{:.0?}", percentile(&mut l, 50.0)),
                format!("{:.0?}", percentile(&mut l, 99.0)),
            ]);
            if *k == Kind::RustWide && n == 1000 {
                verdicts.push(Verdict::new(
                    "attached Rust worker with 16 credits (max_active 16), batches of 1000: at least a third of the built-in's items/s",
                    sp.median / base >= 0.33,
                    format!("{:.2}x", sp.median / base),
                ));
            }
            if *k == Kind::Rust && n == 1000 {
                verdicts.push(Verdict::new(
                    "attached Rust worker, batches of 1000: at least a third of the built-in's items/s",
                    sp.median / base >= 0.33,
                    format!("{:.2}x", sp.median / base),
                ));
            }
        }
    }
    if py.is_none() {
        t.row(vec![
            Kind::Python.label().into(),
            "—".into(),
            "skipped: no target/pyenv".into(),
            String::new(),
            String::new(),
            String::new(),
        ]);
    }
    drop(py);
    (vec![t], verdicts)
}
