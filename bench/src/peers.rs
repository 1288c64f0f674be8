//! The peers of the service section ([`crate::service`]): NATS JetStream and Redis used as a
//! work queue, each a server process this module starts on loopback (a free port, a temporary
//! folder, stopped on drop), two worker threads of the bench process (one per CPU, each with
//! its own connection) that take items, run nothing ("noop") and report completions, and the
//! client that submits a batch and awaits its completions. It owns the peers' configuration,
//! which follows each one's documentation for a work queue rather than being tuned either way:
//!
//! - **NATS JetStream** (`nats-server -js`): a stream with `WorkQueue` retention and `Memory`
//!   storage on subject `work`; one durable pull consumer (explicit ack, the server's defaults
//!   otherwise) shared by both workers, each consuming it with `PullConsumer::messages` (the
//!   client library's documented way: pull requests of 200 kept ahead), acking every item, and
//!   publishing one core NATS message to `results` per run of items it had ready (the ids of
//!   the items, 8 bytes each). The client publishes the batch with JetStream's async publish,
//!   awaits every publish ack, and counts ids on `results` until all are back.
//! - **Redis** (`redis-server --save '' --appendonly no`): the client `LPUSH`es the batch to
//!   list `work` (one command of up to 1000 values, pipelined when larger), each worker
//!   `BLMPOP`s up to 200 items from `work` and `LPUSH`es their ids to `results` in one
//!   command, and the client `BLMPOP`s `results` until all are back. The sync client: one
//!   connection per worker and one for the client.
//!
//! Item ids carry the client's round number in their high 32 bits; a completion of another
//! round fails the run, as does a batch not completed within [`DEADLINE`]. Every loop is
//! bounded: workers block at most [`POLL`] before checking their stop flag.

use std::io::Read as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{FutureExt as _, StreamExt as _};

use crate::grpc::Proc;

/// How long a batch may take to complete before the run fails.
pub const DEADLINE: Duration = Duration::from_secs(30);
/// How long a worker blocks waiting for work before it checks whether to stop.
pub const POLL: Duration = Duration::from_millis(100);
/// Most items a Redis worker pops at once (JetStream's pull batch in `messages()` is the same).
pub const WORKER_BATCH: usize = 200;
/// Most values in one `LPUSH` of the Redis client.
const PUSH_CHUNK: usize = 1000;

/// The command that installs both peers (Debian packages).
pub const INSTALL: &str = "apt-get install nats-server redis-server";

/// `$WQD_BENCH_<NAME>` (e.g. `WQD_BENCH_NATS_SERVER`; when set, only there), else `name` on
/// `PATH`, else in the sbin folders Debian installs servers to (`nats-server` is in /usr/sbin,
/// which is not on a normal user's `PATH`). `None` when it is not an existing file.
pub fn find(name: &str) -> Option<PathBuf> {
    let var = format!("WQD_BENCH_{}", name.to_ascii_uppercase().replace('-', "_"));
    if let Some(p) = std::env::var_os(&var) {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A loopback port nobody listens on right now (the server binds it a moment later).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// A peer server process, its log file in its temporary folder; stopped (SIGTERM) on drop,
/// then the folder removed.
struct PeerServer {
    proc: Proc,
    name: &'static str,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl PeerServer {
    /// Runs `bin` with `args(dir, log, port)` on a free loopback port, in a new temporary folder.
    fn spawn(
        name: &'static str,
        bin: &Path,
        args: impl FnOnce(&Path, &Path, u16) -> Vec<String>,
    ) -> (PeerServer, u16) {
        let dir = tempfile::Builder::new()
            .prefix(&format!("wqd-bench-{name}-"))
            .tempdir()
            .expect("tempdir");
        let log = dir.path().join(format!("{name}.log"));
        let port = free_port();
        let child = Command::new(bin)
            .args(args(dir.path(), &log, port))
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", bin.display()));
        let s = PeerServer {
            proc: Proc::new(child, name),
            name,
            log,
            _dir: dir,
        };
        (s, port)
    }

    fn log_text(&self) -> String {
        let mut s = String::new();
        let _ = std::fs::File::open(&self.log).and_then(|mut f| f.read_to_string(&mut s));
        s
    }

    /// Calls `ready` until it returns true (at most 20 s); panics with the log otherwise, or as
    /// soon as the process has exited.
    fn wait_ready(&mut self, mut ready: impl FnMut() -> bool) {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(20) {
            if let Some(st) = self.proc.exited() {
                panic!("{} exited ({st}); log:\n{}", self.name, self.log_text());
            }
            if ready() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "{} not ready within 20 s; log:\n{}",
            self.name,
            self.log_text()
        );
    }
}

/// Worker threads stopped (flag, then join) on drop; each blocks at most [`POLL`] at a time.
struct Workers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Workers {
    fn spawn(
        n: usize,
        name: &str,
        f: impl Fn(usize, Arc<AtomicBool>) + Send + Sync + 'static,
    ) -> Workers {
        let stop = Arc::new(AtomicBool::new(false));
        let f = Arc::new(f);
        let threads = (0..n)
            .map(|i| {
                let (f, stop) = (f.clone(), stop.clone());
                std::thread::Builder::new()
                    .name(format!("{name}-worker-{i}"))
                    .spawn(move || f(i, stop))
                    .expect("spawn worker thread")
            })
            .collect();
        Workers { stop, threads }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            // A worker that panicked already said why on stderr.
            let _ = t.join();
        }
    }
}

/// An item's id: the round in the high 32 bits, the index in the low ones.
fn id(round: u32, i: usize) -> u64 {
    (u64::from(round) << 32) | i as u64
}

/// The "work" of an item: nothing, kept from being optimized away.
fn noop(payload: &[u8]) {
    std::hint::black_box(payload);
}

// ---------------------------------------------------------------------------------------------
// NATS JetStream

/// `nats-server -js` on loopback with its two workers, and the client.
pub struct Nats {
    // Field order is drop order: the client and workers go before the server.
    js: async_nats::jetstream::Context,
    results: async_nats::Subscriber,
    round: u32,
    url: String,
    _workers: Workers,
    _server: PeerServer,
}

const NATS_STREAM: &str = "WORK";
const NATS_CONSUMER: &str = "workers";

impl Nats {
    /// Starts the server (binary `bin`), creates the stream and the consumer, starts `workers`
    /// worker threads and connects the client (on the runtime `rt` the calls will run on).
    pub fn start(bin: &Path, workers: usize, rt: &tokio::runtime::Runtime) -> Nats {
        let (mut server, port) = PeerServer::spawn("nats-server", bin, |dir, log, port| {
            vec![
                "-js".into(),
                "-a".into(),
                "127.0.0.1".into(),
                "-p".into(),
                port.to_string(),
                "-sd".into(),
                dir.join("store").display().to_string(),
                "-l".into(),
                log.display().to_string(),
            ]
        });
        let url = format!("nats://127.0.0.1:{port}");
        server.wait_ready(|| std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
        let (js, results) = rt.block_on(async {
            let client = async_nats::connect(&url)
                .await
                .unwrap_or_else(|e| panic!("connecting to nats-server at {url}: {e}"));
            let js = async_nats::jetstream::new(client.clone());
            use async_nats::jetstream::{consumer, stream};
            let s = js
                .create_stream(stream::Config {
                    name: NATS_STREAM.into(),
                    subjects: vec!["work".into()],
                    retention: stream::RetentionPolicy::WorkQueue,
                    storage: stream::StorageType::Memory,
                    ..Default::default()
                })
                .await
                .expect("JetStream: create the work-queue stream");
            s.create_consumer(consumer::pull::Config {
                durable_name: Some(NATS_CONSUMER.into()),
                ack_policy: consumer::AckPolicy::Explicit,
                ..Default::default()
            })
            .await
            .expect("JetStream: create the durable pull consumer");
            let results = client
                .subscribe("results")
                .await
                .expect("subscribe to results");
            client.flush().await.expect("flush the subscription");
            (js, results)
        });
        let worker_url = url.clone();
        let workers = Workers::spawn(workers, "nats", move |_, stop| {
            nats_worker(&worker_url, &stop)
        });
        Nats {
            js,
            results,
            round: 0,
            url,
            _workers: workers,
            _server: server,
        }
    }

    /// The server's URL (the fleet section runs its members on the same server).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Publishes `n` items (async publish, then every publish ack awaited) and awaits their `n`
    /// completions on `results`.
    pub async fn batch(&mut self, n: usize) {
        self.round += 1;
        let round = self.round;
        let mut acks = Vec::with_capacity(n);
        for i in 0..n {
            let payload = Bytes::copy_from_slice(&id(round, i).to_le_bytes());
            acks.push(
                self.js
                    .publish("work", payload)
                    .await
                    .expect("JetStream publish"),
            );
        }
        for a in acks {
            a.await.expect("JetStream publish ack");
        }
        let t0 = Instant::now();
        let mut done = 0usize;
        while done < n {
            let left = DEADLINE.saturating_sub(t0.elapsed());
            let m = match tokio::time::timeout(left, self.results.next()).await {
                Ok(Some(m)) => m,
                Ok(None) => panic!("NATS: the results subscription ended"),
                Err(_) => panic!("NATS: {done} of {n} completions within {DEADLINE:?}"),
            };
            for c in m.payload.chunks_exact(8) {
                let got = u64::from_le_bytes(c.try_into().expect("8 bytes"));
                assert_eq!(
                    got >> 32,
                    u64::from(round),
                    "NATS: a completion of another round"
                );
                done += 1;
            }
        }
        assert_eq!(done, n, "NATS: more completions than items");
    }
}

/// One JetStream worker: its own connection and current-thread runtime; consumes the shared
/// durable consumer, acks each item, and publishes the ids of every run of items it had ready.
fn nats_worker(url: &str, stop: &AtomicBool) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("worker runtime");
    rt.block_on(async {
        let client = async_nats::connect(url)
            .await
            .expect("worker: connect to nats-server");
        let js = async_nats::jetstream::new(client.clone());
        let consumer: async_nats::jetstream::consumer::PullConsumer = js
            .get_stream(NATS_STREAM)
            .await
            .expect("worker: get the stream")
            .get_consumer(NATS_CONSUMER)
            .await
            .expect("worker: get the consumer");
        let mut msgs = consumer.messages().await.expect("worker: consume");
        let mut done: Vec<u8> = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let first = match tokio::time::timeout(POLL, msgs.next()).await {
                Err(_) => continue,
                Ok(None) => break,
                Ok(Some(m)) => m,
            };
            let mut next = Some(first);
            // This item and every one already here (up to a pull batch), then one completion.
            while let Some(m) = next.take() {
                let m = m.expect("worker: a JetStream message");
                noop(&m.payload);
                m.ack().await.expect("worker: ack");
                done.extend_from_slice(&m.payload);
                if done.len() < 8 * WORKER_BATCH {
                    next = msgs.next().now_or_never().flatten();
                }
            }
            client
                .publish("results", Bytes::from(std::mem::take(&mut done)))
                .await
                .expect("worker: publish the completions");
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Redis

/// `redis-server` on loopback with its two workers, and the client's connection.
pub struct Redis {
    con: redis::Connection,
    round: u32,
    _workers: Workers,
    _server: PeerServer,
}

impl Redis {
    /// Starts the server (binary `bin`, no persistence), `workers` worker threads, and the
    /// client's connection.
    pub fn start(bin: &Path, workers: usize) -> Redis {
        let (mut server, port) = PeerServer::spawn("redis-server", bin, |dir, log, port| {
            vec![
                "--bind".into(),
                "127.0.0.1".into(),
                "--port".into(),
                port.to_string(),
                "--save".into(),
                String::new(),
                "--appendonly".into(),
                "no".into(),
                "--dir".into(),
                dir.display().to_string(),
                "--logfile".into(),
                log.display().to_string(),
            ]
        });
        let url = format!("redis://127.0.0.1:{port}/");
        let client = redis::Client::open(url.as_str()).expect("redis url");
        server.wait_ready(|| {
            client
                .get_connection()
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
                .is_ok()
        });
        let con = client.get_connection().expect("connect to redis-server");
        let workers = Workers::spawn(workers, "redis", move |_, stop| redis_worker(&url, &stop));
        Redis {
            con,
            round: 0,
            _workers: workers,
            _server: server,
        }
    }

    /// `LPUSH`es `n` items (chunks of 1000 values, pipelined) and `BLMPOP`s `results` until
    /// their `n` completions are back.
    pub fn batch(&mut self, n: usize) {
        self.round += 1;
        let round = self.round;
        let ids: Vec<u64> = (0..n).map(|i| id(round, i)).collect();
        let mut p = redis::pipe();
        for c in ids.chunks(PUSH_CHUNK) {
            p.cmd("LPUSH").arg("work").arg(c).ignore();
        }
        p.query::<()>(&mut self.con).expect("Redis LPUSH work");
        let t0 = Instant::now();
        let mut done = 0usize;
        while done < n {
            assert!(
                t0.elapsed() < DEADLINE,
                "Redis: {done} of {n} completions within {DEADLINE:?}"
            );
            let got: Option<(String, Vec<u64>)> = redis::cmd("BLMPOP")
                .arg(POLL.as_secs_f64())
                .arg(1)
                .arg("results")
                .arg("RIGHT")
                .arg("COUNT")
                .arg(n - done)
                .query(&mut self.con)
                .expect("Redis BLMPOP results");
            for x in got.map(|g| g.1).unwrap_or_default() {
                assert_eq!(
                    x >> 32,
                    u64::from(round),
                    "Redis: a completion of another round"
                );
                done += 1;
            }
        }
    }
}

/// One Redis worker: its own connection; pops up to [`WORKER_BATCH`] items, runs nothing, and
/// pushes their ids to `results` in one command.
fn redis_worker(url: &str, stop: &AtomicBool) {
    let mut con = redis::Client::open(url)
        .and_then(|c| c.get_connection())
        .expect("worker: connect to redis-server");
    while !stop.load(Ordering::Relaxed) {
        let got: Option<(String, Vec<Vec<u8>>)> = redis::cmd("BLMPOP")
            .arg(POLL.as_secs_f64())
            .arg(1)
            .arg("work")
            .arg("RIGHT")
            .arg("COUNT")
            .arg(WORKER_BATCH)
            .query(&mut con)
            .expect("worker: BLMPOP work");
        let Some((_, items)) = got else { continue };
        for x in &items {
            noop(x);
        }
        redis::cmd("LPUSH")
            .arg("results")
            .arg(&items)
            .query::<()>(&mut con)
            .expect("worker: LPUSH results");
    }
}
