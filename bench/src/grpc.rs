//! Over gRPC: the real `wqd` binary against the transport floor, on a Unix socket and TCP
//! loopback, plus `wqctl topology` on generated machines.
//!
//! Servers (each its own process, started here and stopped with SIGTERM when done):
//! - **wqd**: the release `wqd` binary next to this one (`WQD_BENCH_WQD` overrides), on the
//!   host topology (workers pinned as in production), an empty config file, default limits,
//!   listening on a temporary Unix socket and `127.0.0.1:0`.
//! - **floor**: `wqd-bench-floor` ([`crate::floor`]): `Submit` only decodes and
//!   acknowledges; served with the daemon's tonic setup and runtime shape.
//!
//! Figures (the client is this process: a 2-worker tokio runtime; requests are pre-encoded
//! and responses counted, not parsed, see [`crate::wire`]):
//! - Throughput: `noop` items targeting `all` on the default workqueue, batches of 1, 100,
//!   1000 and 10k, with 1 and 4 connections, each with one call in flight (closed loop) for
//!   a fixed window. Systems: the floor's `Submit` (decode + ack), wqd's `Submit` with
//!   `wait = true` (returns when every item is done, with every result), and wqd's `Submit`
//!   (no wait) followed by `Flush(batch_id, summary_only)`, the same pair and `Submit(wait)`
//!   on a workqueue with `results = summary` ([`SUMMARY_WQ`]), and the two `Submit(wait)`
//!   requests as
//!   requests of a `DispatchService.Session` kept open per connection; plus the empty unary RPC
//!   (`grpc.health.v1.Health/Check` on wqd) in calls/s. Ratios are wqd ÷ floor items/s per
//!   run (1.00 = as fast as the floor).
//! - Latency: one connection to wqd and one to the floor per transport; one call at a time,
//!   alternating the empty RPC, wqd `Submit(wait)` of one item (both on the same wqd
//!   connection) and the floor's `Submit` of one item. p50/p99 per run, ratios per run.
//! - `wqctl topology`: wqd on generated sysfs trees of 1024 and 4096 CPUs with 10k named
//!   groups (`--sysfs-root`, rescan period 1 h so a rescan never overlaps a timing), and on the
//!   host for reference; wall time of the whole `wqctl` process (text and `-o json`, output
//!   to /dev/null), and of the `GetTopology` call alone from an open connection.
//!
//! Every run interleaves the systems (their order rotates) so a burst of load from elsewhere
//! hits all of them; every loop is bounded by its window or sample count.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::report::{self, Table, Verdict};
use crate::stats::{ns, percentile, Spread};
use crate::wire::{self, Addr, Conn, Pre};

/// How much work the gRPC section does.
#[derive(Debug, Clone)]
pub struct Cfg {
    pub runs: usize,
    /// How long each throughput figure keeps calling (at least one call per connection).
    pub window: Duration,
    pub batches: Vec<usize>,
    pub conns: Vec<usize>,
    /// Calls of each kind per latency run.
    pub latency_samples: usize,
    /// `wqctl topology` invocations per machine and format.
    pub topology_reps: usize,
    /// Generated machines for `wqctl topology` (CPUs), and their named groups.
    pub topology_cpus: Vec<u32>,
    pub topology_groups: usize,
}

impl Default for Cfg {
    fn default() -> Self {
        Cfg {
            runs: 5,
            window: Duration::from_millis(120),
            batches: vec![1, 100, 1000, 10_000],
            conns: vec![1, 4],
            latency_samples: 500,
            topology_reps: 5,
            topology_cpus: vec![1024, 4096],
            topology_groups: 10_000,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Server processes

/// A binary next to this one (`target/release/NAME`), or `$WQD_BENCH_<NAME>`.
pub fn binary(name: &str) -> PathBuf {
    let var = format!("WQD_BENCH_{}", name.to_ascii_uppercase().replace('-', "_"));
    let path = std::env::var_os(&var)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let exe = std::env::current_exe().expect("current_exe");
            exe.parent().expect("exe folder").join(name)
        });
    assert!(
        path.exists(),
        "{name} not found at {} (bench/run.sh builds it: cargo build --release -p wqd --bin wqd \
         -p wqd-client --bin wqctl; or set {var})",
        path.display()
    );
    path
}

/// A child process of the bench, stopped on drop: SIGTERM, then SIGKILL if it is still there
/// after 15 s (said on stderr).
pub struct Proc {
    child: Child,
    name: &'static str,
}

impl Proc {
    pub fn new(child: Child, name: &'static str) -> Proc {
        Proc { child, name }
    }

    /// Whether it has exited already (its status, if so).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(15) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "wqd-bench: {} ignored SIGTERM for 15s; killing it",
            self.name
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A server process on a temporary Unix socket and a loopback TCP port; SIGTERM on drop.
pub struct Server {
    /// First field: the process is stopped before its folder is removed.
    _proc: Proc,
    pub name: &'static str,
    pub socket: PathBuf,
    pub tcp: String,
    /// How long from spawn to its "listening on tcp:" line.
    pub started_in: Duration,
    log: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl Server {
    /// Spawns `bin` with `args` plus `--socket DIR/s.sock --tcp-listen 127.0.0.1:0` and waits
    /// (at most `timeout`) for `<prefix>: listening on tcp:ADDR` on its stderr.
    pub fn start(
        name: &'static str,
        bin: &Path,
        args: &[String],
        prefix: &str,
        timeout: Duration,
    ) -> Server {
        let dir = tempfile::Builder::new()
            .prefix("wqd-bench-")
            .tempdir()
            .expect("tempdir");
        let socket = dir.path().join("s.sock");
        let t0 = Instant::now();
        let mut child = Command::new(bin)
            .args(args)
            .arg("--socket")
            .arg(&socket)
            .args(["--tcp-listen", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", bin.display()));
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let want = format!("{prefix}: listening on tcp:");
        let l = log.clone();
        // Drains stderr for the process's whole life (a full pipe would block it).
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(a) = line.strip_prefix(&want) {
                    let _ = tx.send(a.trim().to_string());
                }
                let mut l = l.lock().unwrap_or_else(|e| e.into_inner());
                if l.len() < 200 {
                    l.push(line);
                }
            }
        });
        let tcp = match rx.recv_timeout(timeout) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{name} did not start within {timeout:?}; stderr:\n{}",
                    log.lock().unwrap_or_else(|e| e.into_inner()).join("\n")
                );
            }
        };
        Server {
            _proc: Proc::new(child, name),
            name,
            socket,
            tcp: format!("http://{tcp}"),
            started_in: t0.elapsed(),
            log,
            _dir: dir,
        }
    }

    pub fn unix(&self) -> Addr {
        Addr::Unix(self.socket.clone())
    }

    pub fn tcp(&self) -> Addr {
        Addr::Tcp(self.tcp.clone())
    }

    /// Its stderr so far (at most 200 lines).
    pub fn log(&self) -> String {
        self.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .join("\n")
    }
}

/// Lets the bench's `--tcp-listen 127.0.0.1:0` listener run without TLS (see docs/security.md).
const PLAINTEXT_LOOPBACK: &str = "[security]\ntcp_plaintext_loopback = true\n";

/// The real daemon on the host topology (extra flags in `args`; a config file with defaults
/// except plain TCP on loopback).
pub fn start_wqd(args: &[String]) -> Server {
    start_wqd_config(args, "")
}

/// [`start_wqd`] with more config (TOML appended to the file).
pub fn start_wqd_with(extra: &str) -> Server {
    start_wqd_config(&[], extra)
}

fn start_wqd_config(args: &[String], extra: &str) -> Server {
    let cfg = tempfile::Builder::new()
        .prefix("wqd-bench-cfg")
        .suffix(".toml")
        .tempfile()
        .expect("config file");
    std::fs::write(cfg.path(), format!("{PLAINTEXT_LOOPBACK}{extra}")).expect("config file");
    let mut a = vec![
        "--config".to_string(),
        cfg.path().display().to_string(),
        "--log-level".into(),
        "warn".into(),
    ];
    a.extend_from_slice(args);
    let s = Server::start("wqd", &binary("wqd"), &a, "wqd", Duration::from_secs(120));
    drop(cfg);
    s
}

/// The floor server.
pub fn start_floor(nodelay: bool) -> Server {
    let args: Vec<String> = if nodelay {
        vec!["--nodelay".into()]
    } else {
        Vec::new()
    };
    Server::start(
        "floor",
        &binary("wqd-bench-floor"),
        &args,
        "floor",
        Duration::from_secs(30),
    )
}

// ---------------------------------------------------------------------------------------------
// Throughput

/// What one throughput figure calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Sys {
    /// The empty unary RPC (health check on wqd).
    Empty,
    /// The floor's decode-and-ack `Submit`.
    Floor,
    /// The same, served with `TCP_NODELAY` on accepted sockets (TCP only).
    FloorNd,
    /// wqd `Submit` with `wait`.
    Wait,
    /// wqd `Submit` without `wait` (accepted, not yet run; latency only).
    NoWait,
    /// wqd `Submit`, then `Flush(batch, summary_only)`.
    Flush,
    /// wqd `Submit(wait)` on a workqueue with `results = summary` ([`SUMMARY_WQ`]): submit,
    /// wait for every item and get the counts, in one call — what a client that wants counts
    /// only configures (no per-item result is built or stored).
    WaitSummaryWq,
    /// [`Sys::Wait`]'s request as one request of a `DispatchService.Session` kept open on the
    /// connection (opened before the figure's window).
    Session,
    /// [`Sys::WaitSummaryWq`]'s request as one request of such a session.
    SessionSummaryWq,
    /// [`Sys::Floor`], asked for no receipt per item (`receipts = RECEIPTS_MODE_NONE`).
    FloorBare,
    /// [`Sys::Wait`] without receipts: the full results, and the batch's shape.
    WaitBare,
    /// [`Sys::Flush`] without receipts: the `Submit` answers with the batch's shape.
    FlushBare,
    /// [`Sys::Flush`] on the `results = summary` workqueue ([`SUMMARY_WQ`]): no per-item
    /// result is built or stored, and the flush counts the items that ended before it
    /// registered from the batch's record. The in-process comparator of the target
    /// "`Submit` + summary flush" is the engine with summary results.
    FlushSummaryWq,
    /// [`Sys::FlushSummaryWq`] without receipts.
    FlushSummaryWqBare,
    /// [`Sys::Session`] without receipts.
    SessionBare,
}

/// The kinds that ask for no receipt per item.
const BARE: [Sys; 5] = [
    Sys::FloorBare,
    Sys::WaitBare,
    Sys::FlushBare,
    Sys::FlushSummaryWqBare,
    Sys::SessionBare,
];

/// The workqueue with `results = summary` that [`Sys::WaitSummaryWq`] submits to (created by
/// the section on the daemon it starts).
pub const SUMMARY_WQ: &str = "bench-summary";

impl Sys {
    pub fn label(self) -> &'static str {
        match self {
            Sys::Empty => "empty RPC (health Check on wqd)",
            Sys::Floor => "floor: decode + ack",
            Sys::FloorNd => "floor: decode + ack, TCP_NODELAY",
            Sys::Wait => "wqd Submit(wait)",
            Sys::NoWait => "wqd Submit (no wait)",
            Sys::Flush => "wqd Submit + Flush(summary)",
            Sys::WaitSummaryWq => "wqd Submit(wait), results = summary",
            Sys::Session => "wqd Session(wait)",
            Sys::SessionSummaryWq => "wqd Session(wait), results = summary",
            Sys::FloorBare => "floor: decode + ack, no receipts",
            Sys::WaitBare => "wqd Submit(wait), no receipts",
            Sys::FlushBare => "wqd Submit + Flush(summary), no receipts",
            Sys::FlushSummaryWq => "wqd Submit + Flush(summary), results = summary",
            Sys::FlushSummaryWqBare => {
                "wqd Submit + Flush(summary), results = summary, no receipts"
            }
            Sys::SessionBare => "wqd Session(wait), no receipts",
        }
    }

    fn is_session(self) -> bool {
        matches!(
            self,
            Sys::Session | Sys::SessionSummaryWq | Sys::SessionBare
        )
    }

    /// Asks for no receipt per item.
    fn bare(self) -> bool {
        matches!(
            self,
            Sys::FloorBare
                | Sys::WaitBare
                | Sys::FlushBare
                | Sys::FlushSummaryWqBare
                | Sys::SessionBare
        )
    }
}

/// The connections of one transport: to wqd and to the floor.
#[derive(Clone)]
pub struct Side {
    pub wqd: Vec<Conn>,
    pub floor: Vec<Conn>,
    /// To the `--nodelay` floor (TCP only; empty on the Unix side).
    pub floor_nd: Vec<Conn>,
}

/// One call of `sys` with a batch of `n` (`wait`/`nowait` pre-encoded); panics when the
/// server did less than asked.
pub async fn call(c: &Conn, sys: Sys, n: usize, wait: &Pre, nowait: &Pre) {
    match sys {
        Sys::Empty => c.empty().await.expect("empty RPC"),
        Sys::Floor | Sys::FloorNd => {
            let a = c.submit(nowait).await.expect("floor Submit");
            assert_eq!(a.items.len(), n, "floor receipts");
        }
        Sys::FloorBare => {
            let a = c.submit(nowait).await.expect("floor Submit");
            assert_eq!((a.items.len(), a.item_count), (0, n as u64), "floor shape");
        }
        Sys::WaitBare => {
            let a = c.submit(wait).await.expect("wqd Submit(wait)");
            assert_eq!(a.results.len(), n, "wqd results");
            assert_eq!((a.items.len(), a.item_count), (0, n as u64), "wqd shape");
        }
        Sys::FlushBare | Sys::FlushSummaryWqBare => {
            let a = c.submit(nowait).await.expect("wqd Submit");
            assert_eq!((a.items.len(), a.queued_count), (0, n as u64), "wqd shape");
            let s = c.flush_summary(a.batch_id).await.expect("wqd Flush");
            let ok = s.counts.map_or(0, |c| c.ok);
            assert_eq!(ok as usize, n, "flushed items ok: {s:?}");
        }
        Sys::Wait => {
            let a = c.submit(wait).await.expect("wqd Submit(wait)");
            assert_eq!(a.results.len(), n, "wqd results");
        }
        Sys::NoWait => {
            let a = c.submit(nowait).await.expect("wqd Submit");
            assert_eq!(a.items.len(), n, "wqd receipts");
        }
        Sys::WaitSummaryWq => {
            let a = c
                .submit(wait)
                .await
                .expect("wqd Submit(wait), results = summary");
            let ok = a.counts.map_or(0, |c| c.ok);
            assert_eq!(ok as usize, n, "wqd summary: items ok");
        }
        Sys::Flush | Sys::FlushSummaryWq => {
            let a = c.submit(nowait).await.expect("wqd Submit");
            assert_eq!(a.items.len(), n, "wqd receipts");
            let s = c.flush_summary(a.batch_id).await.expect("wqd Flush");
            let ok = s.counts.map_or(0, |c| c.ok);
            assert_eq!(ok as usize, n, "flushed items ok: {s:?}");
        }
        Sys::Session | Sys::SessionSummaryWq | Sys::SessionBare => {
            panic!("a session's calls go through its open session (see `throughput`)")
        }
    }
}

/// One request of `sys` (a session kind) on `session`: `req` is the session request.
async fn session_call(session: &mut wire::Session, sys: Sys, n: usize, req: &Pre) {
    let a = session.call(req).await.expect("wqd Session request");
    if sys == Sys::Session || sys == Sys::SessionBare {
        assert_eq!(a.results.len(), n, "wqd session results");
        let receipts = if sys == Sys::Session { n } else { 0 };
        assert_eq!(a.items.len(), receipts, "wqd session receipts");
    } else {
        let ok = a.counts.map_or(0, |c| c.ok);
        assert_eq!(ok as usize, n, "wqd session summary: items ok");
    }
}

/// Items/s (calls/s for [`Sys::Empty`]) over `conns`, each with one call in flight, for
/// `window` (at least one timed call per connection; batches of up to 100 after one untimed
/// call, larger ones start timed at once: the connections are warm from the figures before).
pub async fn throughput(conns: &[Conn], sys: Sys, n: usize, window: Duration) -> f64 {
    let wait = match sys {
        Sys::WaitSummaryWq | Sys::SessionSummaryWq => wire::noop_batch_in(SUMMARY_WQ, n, true),
        _ => wire::noop_batch(n, true),
    };
    let nowait = match sys {
        Sys::FlushSummaryWq | Sys::FlushSummaryWqBare => wire::noop_batch_in(SUMMARY_WQ, n, false),
        _ => wire::noop_batch(n, false),
    };
    let (wait, nowait) = match sys.bare() {
        true => (
            wire::without_receipts(&wait),
            wire::without_receipts(&nowait),
        ),
        false => (wait, nowait),
    };
    let per_call = if sys == Sys::Empty { 1 } else { n as u64 };
    let mut tasks = Vec::new();
    let barrier = Arc::new(tokio::sync::Barrier::new(conns.len()));
    for c in conns {
        let (c, wait, nowait, barrier) = (c.clone(), wait.clone(), nowait.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            // A session's requests carry the same batch; the tag is not read here.
            let req = wire::session_request(1, &wait);
            let mut session = match sys.is_session() {
                true => Some(c.session().await.expect("opening a wqd Session")),
                false => None,
            };
            let mut one = async || match &mut session {
                Some(s) => session_call(s, sys, n, &req).await,
                None => call(&c, sys, n, &wait, &nowait).await,
            };
            if n <= 100 || sys.is_session() {
                one().await;
            }
            barrier.wait().await;
            let t0 = Instant::now();
            let mut items = 0u64;
            loop {
                one().await;
                items += per_call;
                if t0.elapsed() >= window {
                    break;
                }
            }
            (items, t0.elapsed())
        }));
    }
    let (mut items, mut el) = (0u64, Duration::ZERO);
    for t in tasks {
        let (i, e) = t.await.expect("client task");
        items += i;
        el = el.max(e);
    }
    items as f64 / el.as_secs_f64()
}

// ---------------------------------------------------------------------------------------------
// Latency

/// Per-run p50/p99 of the single-call kinds on one transport.
#[derive(Debug, Default, Clone)]
pub struct Lat {
    /// (p50, p99) in ns, per run, for Empty, Wait, NoWait and Floor (one item each).
    pub runs: HashMap<Sys, Vec<(f64, f64)>>,
}

/// One latency run: `samples` of each kind, alternating, on `wqd` (empty, submit-wait and
/// submit, the same connection) and `floor`.
pub async fn latency(wqd: &Conn, floor: &Conn, samples: usize, lat: &mut Lat) {
    let one_wait = wire::noop_batch(1, true);
    let one = wire::noop_batch(1, false);
    let kinds = [Sys::Empty, Sys::Wait, Sys::NoWait, Sys::Floor];
    for _ in 0..20 {
        for k in kinds {
            let c = if k == Sys::Floor { floor } else { wqd };
            call(c, k, 1, &one_wait, &one).await;
        }
    }
    let mut t: HashMap<Sys, Vec<Duration>> = HashMap::new();
    for i in 0..samples {
        for j in 0..kinds.len() {
            let k = kinds[(i + j) % kinds.len()];
            let c = if k == Sys::Floor { floor } else { wqd };
            let t0 = Instant::now();
            call(c, k, 1, &one_wait, &one).await;
            t.entry(k).or_default().push(t0.elapsed());
        }
    }
    for (k, mut v) in t {
        let p50 = ns(percentile(&mut v, 50.0));
        let p99 = ns(percentile(&mut v, 99.0));
        lat.runs.entry(k).or_default().push((p50, p99));
    }
}

// ---------------------------------------------------------------------------------------------
// wqctl topology

/// Wall time of `wqctl ARGS topology` (output to /dev/null), `reps` times.
fn wqctl_times(socket: &Path, json: bool, reps: usize) -> Vec<f64> {
    let bin = binary("wqctl");
    (0..reps)
        .map(|_| {
            let mut c = Command::new(&bin);
            c.arg("--socket").arg(socket);
            if json {
                c.args(["-o", "json"]);
            }
            c.arg("topology")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            let t0 = Instant::now();
            let out = c.output().expect("running wqctl");
            let el = t0.elapsed();
            assert!(
                out.status.success(),
                "wqctl topology failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            ns(el)
        })
        .collect()
}

/// The `[[group]]` entries of `count` named groups on an `n`-CPU machine (as the scale
/// section's, so the figures compare).
fn groups_toml(n: u32, count: usize) -> String {
    let g = crate::scale::named_groups(n, count);
    let mut s = String::new();
    for (name, cpus) in &g.named {
        let _ = writeln!(s, "[[group]]\nname = \"{name}\"\ncpus = \"{cpus}\"");
    }
    s
}

/// One machine's `wqctl topology` figures.
struct TopoFig {
    label: String,
    start: Duration,
    bytes: usize,
    rpc: Vec<f64>,
    text: Vec<f64>,
    json: Vec<f64>,
}

fn topology_on(rt: &tokio::runtime::Runtime, label: String, s: &Server, reps: usize) -> TopoFig {
    let c = rt.block_on(wire::connect(&s.unix()));
    let mut bytes = 0;
    let mut rpc = Vec::new();
    for _ in 0..reps {
        let t0 = Instant::now();
        bytes = rt
            .block_on(c.topology_bytes())
            .unwrap_or_else(|e| panic!("GetTopology: {e}\n{}", s.log()));
        rpc.push(ns(t0.elapsed()));
    }
    let mut text = Vec::new();
    let mut json = Vec::new();
    // Interleaved, so load hits both formats alike.
    for _ in 0..reps {
        text.extend(wqctl_times(&s.socket, false, 1));
        json.extend(wqctl_times(&s.socket, true, 1));
    }
    TopoFig {
        label,
        start: s.started_in,
        bytes,
        rpc,
        text,
        json,
    }
}

fn topology_table(rt: &tokio::runtime::Runtime, cfg: &Cfg, host: &Server) -> Table {
    let mut figs = vec![topology_on(
        rt,
        "host (this VM), default groups".into(),
        host,
        cfg.topology_reps,
    )];
    for &n in &cfg.topology_cpus {
        let tree = crate::topo::sysfs_tree_tmpfs(n);
        let conf = tempfile::Builder::new()
            .prefix("wqd-bench-topo")
            .suffix(".toml")
            .tempfile()
            .expect("config");
        let toml = format!(
            "{PLAINTEXT_LOOPBACK}{}",
            groups_toml(n, cfg.topology_groups)
        );
        std::fs::write(conf.path(), toml).expect("config");
        let args: Vec<String> = vec![
            "--config".into(),
            conf.path().display().to_string(),
            "--log-level".into(),
            "warn".into(),
            "--sysfs-root".into(),
            tree.path().display().to_string(),
            "--pinning".into(),
            "off".into(),
            "--rescan".into(),
            "1h".into(),
            "--no-netlink".into(),
        ];
        let s = Server::start(
            "wqd",
            &binary("wqd"),
            &args,
            "wqd",
            Duration::from_secs(300),
        );
        figs.push(topology_on(
            rt,
            format!("generated, {n} CPUs, {} named groups", cfg.topology_groups),
            &s,
            cfg.topology_reps,
        ));
    }
    let mut t = Table::new(
        "gRPC: `wqctl topology` (wall time, lower is better)",
        &format!(
            "The whole `wqctl --socket S topology` process (start, connect, `GetTopology`, \
             render, write to /dev/null), text and `-o json` interleaved, and the \
             `GetTopology` call alone on an open connection (decoded); {} times each, \
             min / median / max. wqd runs on a generated sysfs tree (on /dev/shm, `--sysfs-root`, pinning \
             off, rescan 1 h, no netlink) with the named groups in its config; no items are \
             pending (`GetTopology` reads only the topology snapshot, never the engine). \
             `x host` is the median over the host's median.",
            cfg.topology_reps
        ),
        &[
            "machine",
            "daemon start (to listening)",
            "snapshot bytes",
            "`GetTopology` call",
            "`wqctl topology`",
            "`wqctl -o json topology`",
            "wqctl text x host",
        ],
    );
    let host_text = Spread::of(&mut figs[0].text.clone()).median;
    for mut f in figs {
        let text = Spread::of(&mut f.text);
        t.row(vec![
            f.label,
            report::dur_ns(ns(f.start)),
            f.bytes.to_string(),
            report::dur_spread(Spread::of(&mut f.rpc)),
            report::dur_spread(text),
            report::dur_spread(Spread::of(&mut f.json)),
            format!("{:.1}", text.median / host_text),
        ]);
    }
    t
}

// ---------------------------------------------------------------------------------------------
// The section

/// `v` rotated left by `k` (the order of the systems in run `k`).
pub fn rotate<T: Copy>(v: &[T], k: usize) -> Vec<T> {
    let mut v = v.to_vec();
    if !v.is_empty() {
        let r = k % v.len();
        v.rotate_left(r);
    }
    v
}

/// Runs the gRPC section: throughput, latency and `wqctl topology` tables, and the verdicts.
pub fn run(cfg: Cfg) -> (Vec<Table>, Vec<Verdict>) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("bench-client")
        .enable_all()
        .build()
        .expect("client runtime");
    let wqd = start_wqd(&[]);
    // The same daemon with metrics on (an ephemeral loopback port, never scraped here): what
    // the per-item observer costs a Prometheus-scraped daemon.
    let wqd_m = start_wqd(&["--metrics-listen".into(), "127.0.0.1:0".into()]);
    let floor = start_floor(false);
    let floor_nd = start_floor(true);
    eprintln!(
        "wqd-bench: grpc: wqd started in {:.1?}, floor in {:.1?}",
        wqd.started_in, floor.started_in
    );
    let maxc = cfg.conns.iter().copied().max().unwrap_or(1);
    let sides: Vec<(&'static str, Side)> = [
        (wqd.unix(), floor.unix(), None),
        (wqd.tcp(), floor.tcp(), Some(floor_nd.tcp())),
    ]
    .into_iter()
    .map(|(w, f, nd)| {
        let side = rt.block_on(async {
            let mut s = Side {
                wqd: Vec::new(),
                floor: Vec::new(),
                floor_nd: Vec::new(),
            };
            for _ in 0..maxc {
                s.wqd.push(wire::connect(&w).await);
                s.floor.push(wire::connect(&f).await);
                if let Some(nd) = &nd {
                    s.floor_nd.push(wire::connect(nd).await);
                }
            }
            s
        });
        (w.transport(), side)
    })
    .collect();
    rt.block_on(
        sides[0].1.wqd[0].create_workqueue(SUMMARY_WQ, wqd_proto::v1::ResultsMode::Summary),
    )
    .expect("creating the summary workqueue");
    let metered = rt.block_on(async {
        let c = wire::connect(&wqd_m.unix()).await;
        c.create_workqueue(SUMMARY_WQ, wqd_proto::v1::ResultsMode::Summary)
            .await
            .expect("creating the summary workqueue (metrics on)");
        c
    });
    // (batch, sys, metrics on) → per-run items/s, one connection over the Unix socket.
    let mut mt: HashMap<(usize, Sys, bool), Vec<f64>> = HashMap::new();
    let metric_batches: Vec<usize> = cfg.batches.iter().copied().filter(|&n| n >= 100).collect();

    // (transport, conns, batch, sys) → per-run items/s.
    let mut tp: HashMap<(&str, usize, usize, Sys), Vec<f64>> = HashMap::new();
    let mut lat: HashMap<&str, Lat> = HashMap::new();
    let t_runs = Instant::now();
    for run in 0..cfg.runs {
        for (ti, (tr, side)) in rotate(&[0usize, 1], run)
            .into_iter()
            .map(|i| (i, &sides[i]))
        {
            let _ = ti;
            for &nc in &cfg.conns {
                let (w, f) = (&side.wqd[..nc], &side.floor[..nc]);
                let r = rt.block_on(throughput(w, Sys::Empty, 1, cfg.window));
                tp.entry((tr, nc, 0, Sys::Empty)).or_default().push(r);
                for (bi, &n) in cfg.batches.iter().enumerate() {
                    let mut systems = vec![
                        Sys::Floor,
                        Sys::Wait,
                        Sys::Flush,
                        Sys::FlushSummaryWq,
                        Sys::WaitSummaryWq,
                        Sys::Session,
                        Sys::SessionSummaryWq,
                    ];
                    if !side.floor_nd.is_empty() {
                        systems.push(Sys::FloorNd);
                    }
                    // Without receipts: where they weigh (a receipt per item), on the
                    // transport the targets are judged on.
                    if *tr == "unix" && n >= 100 {
                        systems.extend(BARE);
                    }
                    for sys in rotate(&systems, run + bi) {
                        let conns = match sys {
                            Sys::Floor | Sys::FloorBare => f,
                            Sys::FloorNd => &side.floor_nd[..nc],
                            _ => w,
                        };
                        let r = rt.block_on(throughput(conns, sys, n, cfg.window));
                        tp.entry((tr, nc, n, sys)).or_default().push(r);
                    }
                }
            }
            rt.block_on(latency(
                &side.wqd[0],
                &side.floor[0],
                cfg.latency_samples,
                lat.entry(tr).or_default(),
            ));
        }
        for (bi, &n) in metric_batches.iter().enumerate() {
            for sys in [Sys::Wait, Sys::WaitSummaryWq] {
                for on in rotate(&[false, true], run + bi) {
                    let c = if on { &metered } else { &sides[0].1.wqd[0] };
                    let r = rt.block_on(throughput(std::slice::from_ref(c), sys, n, cfg.window));
                    mt.entry((n, sys, on)).or_default().push(r);
                }
            }
        }
        eprintln!("wqd-bench: grpc: run {}/{} done", run + 1, cfg.runs);
    }

    let mut verdicts = Vec::new();
    let mut t = Table::new(
        "gRPC: batch throughput (items/s, higher is better)",
        &format!(
            "Real `wqd` binary (host topology, pinned workers, default workqueue, `noop` items \
             targeting `all`) vs the decode-and-acknowledge floor server (same tonic setup, \
             separate process); client in the bench process, requests pre-encoded, one call \
             in flight per connection, {:?} window per figure; {} runs, min / median / max. \
             `Submit(wait), results = summary` submits to a workqueue created with `results = \
             summary` and waits in the same call (no per-item result built or stored; the \
             counts come back: what a client that only wants counts configures); `Submit + \
             Flush(summary), results = summary` submits there and then flushes the batch (the \
             flush counts items that ended before it from the batch's record). \
             `of floor` is wqd's items/s ÷ the floor's in the same run (1.00 = as fast as the \
             floor; the target is ≥ 0.70 at 1000). The floor is served as wqd serves (tonic \
             `serve_with_incoming` over a `TcpListenerStream`, which leaves Nagle on for \
             accepted sockets); `floor, nodelay` is a second floor process that sets \
             `TCP_NODELAY` on them (TCP only), and `of nodelay floor` compares wqd with it.",
            cfg.window, cfg.runs
        ),
        &[
            "transport",
            "conns",
            "batch",
            "floor: decode + ack",
            "wqd Submit(wait)",
            "Submit(wait) of floor",
            "wqd Submit + Flush(summary)",
            "Submit+Flush of floor",
            "wqd Submit + Flush(summary), results = summary",
            "of floor",
            "wqd Submit(wait), results = summary",
            "of floor",
            "floor, nodelay",
            "Submit(wait) of nodelay floor",
        ],
    );
    let mut st = Table::new(
        "gRPC: the same batches as requests of a session (items/s, higher is better)",
        &format!(
            "The throughput table's `Submit(wait)` requests (default workqueue, full results; \
             and on the `results = summary` workqueue), sent as requests of one \
             `DispatchService.Session` per connection, opened before the figure (each request \
             is one DATA frame each way: no new HTTP/2 stream, headers or trailers); one \
             request in flight per connection, in the same runs, {:?} window per figure, \
             min / median / max. `÷ Submit(wait)` is the session's items/s over the unary \
             call's of the same kind, per run.",
            cfg.window
        ),
        &[
            "transport",
            "conns",
            "batch",
            "floor: decode + ack",
            "wqd Session(wait)",
            "of floor",
            "÷ Submit(wait)",
            "wqd Session(wait), results = summary",
            "of floor",
            "÷ Submit(wait), results = summary",
        ],
    );
    let mut bare = Table::new(
        "gRPC: the same calls without a receipt per item (items/s, higher is better)",
        &format!(
            "The throughput and session tables' calls with `receipts = RECEIPTS_MODE_NONE`: \
             the answer carries the batch's shape (`first_item_id`, `item_count`, \
             `queued_count`, the duplicates) instead of an `ItemReceipt` per item; Unix \
             socket, batches of 100 and more, in the same runs, {:?} window per figure, min / \
             median / max. The floor answers the same way. `÷ with` is this figure over the \
             same call's with receipts, per run.",
            cfg.window
        ),
        &[
            "transport",
            "conns",
            "batch",
            "floor, no receipts",
            "÷ with",
            "wqd Submit(wait), no receipts",
            "÷ with",
            "wqd Submit + Flush(summary), no receipts",
            "÷ with",
            "wqd Submit + Flush(summary), results = summary, no receipts",
            "÷ with",
            "wqd Session(wait), no receipts",
            "÷ with",
        ],
    );
    let mut empty = Table::new(
        "gRPC: the empty unary RPC (calls/s, higher is better)",
        "`grpc.health.v1.Health/Check` on the same wqd process and connections, in the same \
         runs; `batch 1 x empty` is wqd `Submit(wait)` of one item per call ÷ the empty \
         RPC's calls/s, per run.",
        &[
            "transport",
            "conns",
            "empty RPC calls/s",
            "floor batch 1 of empty",
            "wqd Submit(wait) batch 1 of empty",
        ],
    );
    for (tr, _) in &sides {
        for &nc in &cfg.conns {
            let get = |n, s| tp[&(*tr, nc, n, s)].clone();
            let per_run = |a: &[f64], b: &[f64]| {
                let mut v: Vec<f64> = a.iter().zip(b).map(|(x, y)| x / y).collect();
                Spread::of(&mut v)
            };
            let e = get(0, Sys::Empty);
            let b1 = *cfg.batches.first().unwrap_or(&1);
            empty.row(vec![
                tr.to_string(),
                nc.to_string(),
                report::rate_spread(Spread::of(&mut e.clone())),
                report::spread(per_run(&get(b1, Sys::Floor), &e), 2),
                report::spread(per_run(&get(b1, Sys::Wait), &e), 2),
            ]);
            for &n in &cfg.batches {
                let (fl, wa, fu) = (get(n, Sys::Floor), get(n, Sys::Wait), get(n, Sys::Flush));
                let (rw, rf) = (per_run(&wa, &fl), per_run(&fu, &fl));
                let fs = get(n, Sys::WaitSummaryWq);
                let rs = per_run(&fs, &fl);
                let ff = get(n, Sys::FlushSummaryWq);
                let rff = per_run(&ff, &fl);
                let (se, ss) = (get(n, Sys::Session), get(n, Sys::SessionSummaryWq));
                st.row(vec![
                    tr.to_string(),
                    nc.to_string(),
                    n.to_string(),
                    report::rate_spread(Spread::of(&mut fl.clone())),
                    report::rate_spread(Spread::of(&mut se.clone())),
                    report::spread(per_run(&se, &fl), 2),
                    report::spread(per_run(&se, &wa), 2),
                    report::rate_spread(Spread::of(&mut ss.clone())),
                    report::spread(per_run(&ss, &fl), 2),
                    report::spread(per_run(&ss, &fs), 2),
                ]);
                if let Some(fb) = tp.get(&(*tr, nc, n, Sys::FloorBare)) {
                    let mut row = vec![tr.to_string(), nc.to_string(), n.to_string()];
                    for (with, without) in [
                        (&fl, fb),
                        (&wa, &get(n, Sys::WaitBare)),
                        (&fu, &get(n, Sys::FlushBare)),
                        (&ff, &get(n, Sys::FlushSummaryWqBare)),
                        (&se, &get(n, Sys::SessionBare)),
                    ] {
                        row.push(report::rate_spread(Spread::of(&mut without.clone())));
                        row.push(report::spread(per_run(without, with), 2));
                    }
                    bare.row(row);
                }
                let nd = tp.get(&(*tr, nc, n, Sys::FloorNd)).cloned();
                let (nd_rate, nd_ratio) = match &nd {
                    Some(v) => (
                        report::rate_spread(Spread::of(&mut v.clone())),
                        report::spread(per_run(&wa, v), 2),
                    ),
                    None => ("—".to_string(), "—".to_string()),
                };
                t.row(vec![
                    tr.to_string(),
                    nc.to_string(),
                    n.to_string(),
                    report::rate_spread(Spread::of(&mut fl.clone())),
                    report::rate_spread(Spread::of(&mut wa.clone())),
                    report::spread(rw, 2),
                    report::rate_spread(Spread::of(&mut fu.clone())),
                    report::spread(rf, 2),
                    report::rate_spread(Spread::of(&mut ff.clone())),
                    report::spread(rff, 2),
                    report::rate_spread(Spread::of(&mut fs.clone())),
                    report::spread(rs, 2),
                    nd_rate,
                    nd_ratio,
                ]);
                if n == 1000 {
                    // Judged, and reported, against the faster floor: with Nagle on, the
                    // as-served TCP floor stalls on delayed ACKs and any ratio to it flatters
                    // wqd (it read "3660% of floor").
                    let (floor_name, base) = match &nd {
                        Some(v) => ("the nodelay floor", v),
                        None => ("the floor", &fl),
                    };
                    let (jw, jf, js) = (
                        per_run(&wa, base).median,
                        per_run(&fu, base).median,
                        per_run(&fs, base).median,
                    );
                    let judged = jw.min(rw.median);
                    verdicts.push(Verdict::new(
                        &format!(
                            "gRPC batches of 1000 ({tr}, {nc} conn): ≥ 70% of the \
                             decode-and-ack floor's items/s"
                        ),
                        judged >= 0.70,
                        format!(
                            "Submit(wait) {:.0}% of {floor_name} ({} vs {} items/s); \
                             Submit+Flush {:.0}% (on a results = summary workqueue {:.0}%); \
                             Submit(wait) on a results = summary \
                             workqueue {:.0}%; as session requests {:.0}% ({} items/s) and \
                             {:.0}% ({} items/s){}",
                            jw * 100.0,
                            report::rate(Spread::of(&mut wa.clone()).median),
                            report::rate(Spread::of(&mut base.clone()).median),
                            jf * 100.0,
                            per_run(&ff, base).median * 100.0,
                            js * 100.0,
                            per_run(&se, base).median * 100.0,
                            report::rate(Spread::of(&mut se.clone()).median),
                            per_run(&ss, base).median * 100.0,
                            report::rate(Spread::of(&mut ss.clone()).median),
                            if nd.is_some() {
                                format!(
                                    " (the floor as served, Nagle on: {} items/s)",
                                    report::rate(Spread::of(&mut fl.clone()).median)
                                )
                            } else {
                                String::new()
                            },
                        ),
                    ));
                }
            }
        }
    }

    let mut mtab = Table::new(
        "gRPC: the daemon with metrics on (items/s, higher is better)",
        &format!(
            "Two `wqd` daemons alike but for `--metrics-listen` (the engine then has an \
             observer: per-item counters and histograms; nobody scrapes here), one connection \
             each over the Unix socket, the two alternating (order rotating), {:?} window per \
             figure; {} runs, min / median / max. `on ÷ off` is per run.",
            cfg.window, cfg.runs
        ),
        &["batch", "call", "metrics off", "metrics on", "on ÷ off"],
    );
    for &n in &metric_batches {
        for sys in [Sys::Wait, Sys::WaitSummaryWq] {
            let (off, on) = (&mt[&(n, sys, false)], &mt[&(n, sys, true)]);
            let mut r: Vec<f64> = on.iter().zip(off).map(|(a, b)| a / b).collect();
            mtab.row(vec![
                n.to_string(),
                sys.label().to_string(),
                report::rate_spread(Spread::of(&mut off.clone())),
                report::rate_spread(Spread::of(&mut on.clone())),
                report::spread(Spread::of(&mut r), 2),
            ]);
        }
    }
    drop(metered);
    drop(wqd_m);

    let mut lt = Table::new(
        "gRPC: single-item round trip (lower is better)",
        &format!(
            "One call at a time on one connection per server, the four kinds alternating \
             (order rotating); {} calls of each per run, p50 and p99 per run, min / median / \
             max over {} runs. The empty RPC, `Submit` and `Submit(wait)` share the wqd \
             connection; `Submit (no wait)` returns once the item is accepted, so it splits \
             the round trip into accepting and running + waiting; `x empty` is per run.",
            cfg.latency_samples, cfg.runs
        ),
        &[
            "transport",
            "call",
            "p50",
            "p99",
            "p50 x empty",
            "p99 x empty",
        ],
    );
    for (tr, _) in &sides {
        let l = &lat[tr];
        let e = &l.runs[&Sys::Empty];
        for k in [Sys::Empty, Sys::Floor, Sys::NoWait, Sys::Wait] {
            let v = &l.runs[&k];
            let mut p50: Vec<f64> = v.iter().map(|x| x.0).collect();
            let mut p99: Vec<f64> = v.iter().map(|x| x.1).collect();
            let mut r50: Vec<f64> = v.iter().zip(e).map(|(x, y)| x.0 / y.0).collect();
            let mut r99: Vec<f64> = v.iter().zip(e).map(|(x, y)| x.1 / y.1).collect();
            let r50 = Spread::of(&mut r50);
            let p50s = Spread::of(&mut p50);
            lt.row(vec![
                tr.to_string(),
                match k {
                    Sys::Empty => "empty RPC (health Check on wqd)".into(),
                    Sys::Floor => "floor Submit, 1 item (decode + ack)".into(),
                    Sys::NoWait => "wqd Submit (no wait), 1 item".into(),
                    _ => "wqd Submit(wait), 1 item".into(),
                },
                report::dur_spread(p50s),
                report::dur_spread(Spread::of(&mut p99)),
                report::spread(r50, 2),
                report::spread(Spread::of(&mut r99), 2),
            ]);
            if k == Sys::Wait {
                let mut ep50: Vec<f64> = e.iter().map(|x| x.0).collect();
                verdicts.push(Verdict::new(
                    &format!(
                        "gRPC submit-and-wait, single item ({tr}): ≤ 1.3x the empty RPC's p50"
                    ),
                    r50.median <= 1.3,
                    format!(
                        "{:.2}x ({} vs {})",
                        r50.median,
                        report::dur_ns(p50s.median),
                        report::dur_ns(Spread::of(&mut ep50).median)
                    ),
                ));
            }
        }
    }
    drop(sides);
    drop(floor);
    drop(floor_nd);
    eprintln!(
        "wqd-bench: grpc: throughput + latency took {:.1?}; wqctl topology...",
        t_runs.elapsed()
    );
    let t_topo = Instant::now();
    let topo = topology_table(&rt, &cfg, &wqd);
    eprintln!(
        "wqd-bench: grpc: wqctl topology took {:.1?}",
        t_topo.elapsed()
    );
    drop(wqd);
    (vec![t, st, bare, mtab, empty, lt, topo], verdicts)
}

/// What [`profile_client`] calls, and how.
#[derive(Debug, Clone)]
pub struct ProfileCall {
    /// `noop` items per `Submit`.
    pub batch: usize,
    /// `Submit` with `wait` (else `Submit` only: accepted, not run).
    pub wait: bool,
    /// On [`SUMMARY_WQ`] (created if missing), checking the counts instead of results.
    pub summary: bool,
    /// Each `Submit` (without wait) followed by `Flush(batch, summary_only)`, as
    /// [`Sys::Flush`]; the figures then cover both calls.
    pub flush: bool,
    /// The empty unary RPC (health check) instead of any `Submit`: the gRPC stack alone.
    pub empty: bool,
    /// Each `Submit` as a request of one `Session` opened at the start (without `flush`).
    pub session: bool,
    /// Slept before each call (every thread asleep when it comes, as in the service bench's
    /// single-item loop).
    pub pause: Duration,
    /// The items' targets, comma-separated, taken in turn item by item (`all` by default).
    pub targets: String,
    /// The targets in runs (the first `batch / n` items to the first, and so on) instead.
    pub runs: bool,
    /// A receipt per item in each answer (else `receipts = RECEIPTS_MODE_NONE`: the item
    /// count is checked instead).
    pub receipts: bool,
}

/// For a profiler on the daemon side: `rounds` calls as `call` says to the daemon on
/// `socket`, one at a time; prints the rate and the call's p50 and p99.
pub fn profile_client(socket: &Path, rounds: usize, call: ProfileCall) {
    let ProfileCall {
        batch,
        wait,
        summary,
        flush,
        empty,
        session,
        pause,
        receipts,
        ..
    } = call;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let c = wire::connect(&Addr::Unix(socket.to_path_buf())).await;
        let wq = if summary {
            // Already there from an earlier run against the same daemon: fine.
            let _ = c
                .create_workqueue(SUMMARY_WQ, wqd_proto::v1::ResultsMode::Summary)
                .await;
            SUMMARY_WQ
        } else {
            ""
        };
        let targets: Vec<&str> = call.targets.split(',').collect();
        let req = wire::noop_batch_to(wq, &targets, call.runs, batch, wait);
        let req = if receipts {
            req
        } else {
            wire::without_receipts(&req)
        };
        let mut sess = if session && !flush {
            Some(c.session().await.expect("Session"))
        } else {
            None
        };
        let sreq = wire::session_request(1, &req);
        let mut lat = Vec::with_capacity(rounds);
        let t0 = Instant::now();
        let mut items: Option<usize> = None;
        for _ in 0..rounds {
            if !pause.is_zero() {
                // As the service bench's single-item loop: every thread has gone to sleep.
                std::thread::sleep(pause);
            }
            let t = Instant::now();
            if empty {
                c.empty().await.expect("empty RPC");
                lat.push(t.elapsed());
                continue;
            }
            let a = match sess.as_mut() {
                Some(s) => s.call(&sreq).await.expect("Session"),
                None => c.submit(&req).await.expect("Submit"),
            };
            // An `each:` target fans a wire item out to one item per group.
            let n = *items.get_or_insert(a.item_count as usize);
            if flush {
                let s = c.flush_summary(a.batch_id).await.expect("Flush");
                assert_eq!(s.counts.map_or(0, |c| c.ok) as usize, n, "flushed ok");
            }
            lat.push(t.elapsed());
            assert_eq!(a.item_count as usize, n, "items in the batch");
            assert_eq!(a.items.len(), if receipts { n } else { 0 }, "receipts");
            if summary && wait {
                assert_eq!(a.counts.map_or(0, |c| c.ok) as usize, n, "items ok");
            }
        }
        let batch = items.unwrap_or(batch);
        let el = t0.elapsed();
        lat.sort();
        println!(
            "{rounds} x {}(wait = {wait}){} of {batch} in {el:.1?}: {:.0} items/s; call p50 {:.1?}, p99 {:.1?}",
            if sess.is_some() { "Session" } else { "Submit" },
            if flush { " + Flush(summary)" } else { "" },
            (rounds * batch) as f64 / el.as_secs_f64(),
            lat[lat.len() / 2],
            lat[lat.len() * 99 / 100],
        );
    });
}
