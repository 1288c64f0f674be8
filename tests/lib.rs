//! Shared helpers for the end-to-end tests: locate (or build) the real `wqd` and `wqctl`
//! binaries, copy a sysfs fixture tree and change it the way the kernel does on CPU hotplug,
//! start a daemon on a temporary Unix socket, connect to it, run `wqctl` against it, and wait
//! for conditions with a bound.
//!
//! Invariants: every [`Daemon`] runs in its own temporary directory (socket, config) with its
//! own copy of a fixture tree, so tests never share state and can run in parallel; dropping a
//! [`Daemon`] always ends the process (SIGTERM, then SIGKILL after a grace period) and, when
//! the test is failing, prints the daemon's stderr so the failure message says what the daemon
//! saw. Every wait is bounded and names what it waited for.
//!
//! Binaries: `target/<profile>/wqd`, `wqctl` and `wqd-worker-example` next to the test
//! executable, built with `cargo build` in the same profile only when missing (`cargo test
//! --workspace` builds them, since `wqd` and `wqd-client` have integration tests, so CI always
//! runs fresh ones; when running only this crate, rebuild them first or a stale binary is
//! used). `WQD_E2E_WQD` / `WQD_E2E_WQCTL` / `WQD_E2E_WQD_WORKER_EXAMPLE` point the tests at
//! other binaries.

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tonic::transport::Channel;
#[path = "../core/tests/common/fixtures.rs"]
mod fixtures;
#[path = "support/python.rs"]
pub mod python;

use wqd_client::proto;
use wqd_client::{Client, Endpoint};

/// Writes `text` to `path` atomically (temporary file, then rename), so the daemon's rescan
/// never reads a half-written file.
pub use fixtures::write;

/// How long a daemon may take to print its ready line.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// The rescan period the tests give the daemon, so fixture changes are seen quickly.
pub const RESCAN: &str = "50ms";

// ---------------------------------------------------------------------------------------------
// Binaries

/// `target/<profile>`: the folder holding the test executable's `deps/` folder.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("test executable has a parent folder");
    if deps.file_name().is_some_and(|n| n == "deps") {
        deps.parent().expect("deps has a parent").to_path_buf()
    } else {
        deps.to_path_buf()
    }
}

/// The path of binary `bin` of package `package`, next to the test executable; built with
/// `cargo build` in the same profile when missing. `WQD_E2E_<BIN>` (e.g. `WQD_E2E_WQD`,
/// `WQD_E2E_WQD_WORKER_EXAMPLE`; dashes become underscores) overrides the location.
pub fn binary(bin: &'static str, package: &'static str) -> PathBuf {
    static BUILT: OnceLock<Mutex<Vec<(&'static str, PathBuf)>>> = OnceLock::new();
    let lock = BUILT.get_or_init(|| Mutex::new(Vec::new()));
    let mut built = lock.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, p)) = built.iter().find(|(b, _)| *b == bin) {
        return p.clone();
    }
    let var = format!("WQD_E2E_{}", bin.to_ascii_uppercase().replace('-', "_"));
    let path = match std::env::var_os(&var) {
        Some(p) => PathBuf::from(p),
        None => {
            let dir = profile_dir();
            let path = dir.join(bin);
            if !path.exists() {
                build(bin, package, &dir);
            }
            path
        }
    };
    assert!(
        path.exists(),
        "{bin} not found at {} (set {var} to use another)",
        path.display()
    );
    built.push((bin, path.clone()));
    path
}

fn build(bin: &str, package: &str, dir: &Path) {
    let profile = match dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => "dev".to_string(),
        Some(p) => p.to_string(),
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    eprintln!("e2e: {bin} missing in {}; building it", dir.display());
    let status = Command::new(cargo)
        .args(["build", "--profile", &profile, "-p", package, "--bin", bin])
        .arg("--manifest-path")
        .arg(&manifest)
        .status()
        .unwrap_or_else(|e| panic!("cannot run cargo to build {bin}: {e}"));
    assert!(status.success(), "cargo build of {bin} failed: {status}");
}

/// The `wqd` daemon binary.
pub fn wqd_bin() -> PathBuf {
    binary("wqd", "wqd")
}

/// The `wqctl` binary.
pub fn wqctl_bin() -> PathBuf {
    binary("wqctl", "wqd-client")
}

/// The `wqd-worker-example` binary (`client/examples/worker.rs`): a scriptable attached worker.
pub fn worker_example_bin() -> PathBuf {
    binary("wqd-worker-example", "wqd-client")
}

// ---------------------------------------------------------------------------------------------
// Fixture trees

/// A temporary copy of a committed sysfs fixture tree (`core/tests/fixtures/NAME`), changed
/// in place the way the kernel changes sysfs.
pub struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    pristine: PathBuf,
}

impl Fixture {
    /// Copies fixture `name` (two-socket, vm8-offline, cgroup-restricted, empty-node).
    pub fn new(name: &str) -> Fixture {
        let pristine = fixtures::fixture(name);
        assert!(pristine.is_dir(), "no fixture tree {}", pristine.display());
        let dir = tempfile::Builder::new()
            .prefix("wqd-e2e-sys")
            .tempdir()
            .expect("tempdir");
        let root = dir.path().join("sys");
        fixtures::copy_tree(&pristine, &root);
        Fixture {
            _dir: dir,
            root,
            pristine,
        }
    }

    /// The tree to pass as `--sysfs-root`.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Offlines `cpu` as the kernel does (see `core/tests/common/fixtures.rs`).
    pub fn set_offline(&self, cpu: u32) {
        fixtures::set_offline(&self.root, cpu);
    }

    /// Undoes [`Fixture::set_offline`] from the pristine tree.
    pub fn set_online(&self, cpu: u32) {
        fixtures::set_online(&self.root, &self.pristine, cpu);
    }
}

/// Parses a kernel cpulist (`0-3,8`; empty or blank = no CPU).
pub fn parse_cpulist(s: &str) -> BTreeSet<u32> {
    let mut out = BTreeSet::new();
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.parse().unwrap(), b.parse().unwrap());
                out.extend(a..=b);
            }
            None => {
                out.insert(part.parse().unwrap());
            }
        }
    }
    out
}

/// The kernel's canonical cpulist of `set` (ascending, runs merged).
pub fn cpulist(set: &BTreeSet<u32>) -> String {
    let mut parts = Vec::new();
    let mut it = set.iter().copied().peekable();
    while let Some(a) = it.next() {
        let mut b = a;
        while it.peek() == Some(&(b + 1)) {
            b = it.next().unwrap();
        }
        parts.push(if a == b {
            a.to_string()
        } else {
            format!("{a}-{b}")
        });
    }
    parts.join(",")
}

// ---------------------------------------------------------------------------------------------
// The daemon

/// How to start a daemon.
pub struct DaemonBuilder {
    fixture: Fixture,
    config: Option<String>,
    args: Vec<String>,
    socket: Option<PathBuf>,
    nofile: Option<u64>,
}

impl DaemonBuilder {
    /// Starts the daemon with RLIMIT_NOFILE soft = hard = `n` (it cannot raise it).
    pub fn rlimit_nofile(mut self, n: u64) -> Self {
        self.nofile = Some(n);
        self
    }
    /// Adds `--config FILE` with this TOML text.
    pub fn config(mut self, toml: &str) -> Self {
        self.config = Some(toml.to_string());
        self
    }
    /// Adds more command-line arguments.
    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }
    /// Uses this socket path instead of a fresh one.
    pub fn socket(mut self, p: impl Into<PathBuf>) -> Self {
        self.socket = Some(p.into());
        self
    }

    /// The command that would start the daemon, and its working folder.
    fn command(&self, dir: &Path, socket: &Path) -> Command {
        let mut cmd = Command::new(wqd_bin());
        cmd.arg("--socket")
            .arg(socket)
            .arg("--sysfs-root")
            .arg(self.fixture.root())
            .args(["--rescan", RESCAN, "--no-netlink"]);
        if let Some(text) = &self.config {
            let path = dir.join("wqd.toml");
            fs::write(&path, text).unwrap();
            cmd.arg("--config").arg(path);
        }
        if let Some(n) = self.nofile {
            use std::os::unix::process::CommandExt;
            let lim = libc::rlimit {
                rlim_cur: n as libc::rlim_t,
                rlim_max: n as libc::rlim_t,
            };
            // SAFETY: setrlimit is async-signal-safe and only reads `lim`, a plain value moved
            // into the closure; nothing else runs between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        cmd.args(&self.args)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        cmd
    }

    /// Starts the daemon and waits for its ready line (`wqd: listening on unix:PATH`).
    ///
    /// # Panics
    /// When it exits first or is not ready within [`START_TIMEOUT`], with its stderr.
    pub fn start(self) -> Daemon {
        match self.try_start() {
            Ok(d) => d,
            Err(e) => panic!(
                "wqd exited before it was ready ({}); stderr:\n{}",
                e.status, e.stderr
            ),
        }
    }

    /// Starts the daemon; `Err` when it exits before printing its ready line.
    ///
    /// # Panics
    /// When it neither exits nor is ready within [`START_TIMEOUT`].
    pub fn try_start(self) -> Result<Daemon, Exited> {
        let dir = tempfile::Builder::new()
            .prefix("wqd-e2e")
            .tempdir()
            .expect("tempdir");
        let socket = self
            .socket
            .clone()
            .unwrap_or_else(|| dir.path().join("wqd.sock"));
        let mut child = self
            .command(dir.path(), &socket)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", wqd_bin().display()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let pipe = child.stderr.take().expect("piped stderr");
        let log = Arc::clone(&stderr);
        let ready = format!("wqd: listening on unix:{}", socket.display());
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                let is_ready = line.contains(&ready);
                {
                    let mut l = log.lock().unwrap_or_else(|e| e.into_inner());
                    l.push_str(&line);
                    l.push('\n');
                }
                if is_ready {
                    let _ = tx.send(true);
                }
            }
            let _ = tx.send(false);
        });
        let mut d = Daemon {
            child: Some(child),
            stderr,
            socket,
            dir,
            fixture: self.fixture,
        };
        match rx.recv_timeout(START_TIMEOUT) {
            Ok(true) => Ok(d),
            Ok(false) => {
                let status = d
                    .wait_exit(Duration::from_secs(10))
                    .expect("stderr closed but the process did not exit");
                let stderr = d.stderr();
                d.child = None;
                Err(Exited { status, stderr })
            }
            Err(_) => panic!(
                "wqd did not print its ready line within {START_TIMEOUT:?}; stderr:\n{}",
                d.stderr()
            ),
        }
    }
}

/// A daemon that exited before it was ready.
#[derive(Debug)]
pub struct Exited {
    pub status: ExitStatus,
    pub stderr: String,
}

/// A running `wqd`. Dropping it terminates the process.
pub struct Daemon {
    child: Option<Child>,
    stderr: Arc<Mutex<String>>,
    socket: PathBuf,
    dir: tempfile::TempDir,
    fixture: Fixture,
}

impl Daemon {
    /// A builder for a daemon on a copy of fixture `name`.
    pub fn builder(fixture: &str) -> DaemonBuilder {
        DaemonBuilder {
            fixture: Fixture::new(fixture),
            config: None,
            args: Vec::new(),
            socket: None,
            nofile: None,
        }
    }

    /// A daemon on a copy of fixture `name` with defaults.
    pub fn start(fixture: &str) -> Daemon {
        Self::builder(fixture).start()
    }

    /// Its socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Its private temporary folder (holds the socket and config).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Its fixture tree.
    pub fn fixture(&self) -> &Fixture {
        &self.fixture
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Everything it printed on stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(None)))
    }

    /// Waits up to `limit` for the process to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let end = Instant::now() + limit;
        loop {
            if let Ok(Some(s)) = child.try_wait() {
                return Some(s);
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends SIGTERM, waits up to 10 s, then SIGKILL. Returns the exit status.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let pid = libc::pid_t::try_from(self.child.as_ref()?.id()).ok()?;
        if pid <= 0 {
            return None;
        }
        if !self.is_running() {
            return self.wait_exit(Duration::ZERO);
        }
        // SAFETY: kill has no memory preconditions; pid is our own child, not yet reaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        if let Some(s) = self.wait_exit(Duration::from_secs(10)) {
            return Some(s);
        }
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            return c.wait().ok();
        }
        None
    }

    /// The endpoint of its socket.
    pub fn endpoint(&self) -> Endpoint {
        Endpoint::unix(&self.socket)
    }

    /// The address of its metrics endpoint (started with `--metrics-listen 127.0.0.1:0`),
    /// from its `wqd: metrics on http://ADDR/metrics` line; waits for it, bounded.
    pub fn metrics_addr(&self) -> String {
        let end = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(a) = self.stderr().lines().find_map(|l| {
                l.strip_prefix("wqd: metrics on http://")
                    .and_then(|r| r.strip_suffix("/metrics"))
                    .map(str::to_string)
            }) {
                return a;
            }
            assert!(Instant::now() < end, "no metrics line: {}", self.stderr());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Its metrics page now (see [`Daemon::metrics_addr`]).
    pub fn scrape_metrics(&self) -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(self.metrics_addr()).expect("connect to metrics");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
            .expect("metrics request");
        let mut text = String::new();
        s.read_to_string(&mut text).expect("read metrics");
        text
    }

    /// A connected client library handle.
    pub async fn client(&self) -> Client {
        Client::connect(self.endpoint())
            .await
            .unwrap_or_else(|e| panic!("connect to wqd: {e}; stderr:\n{}", self.stderr()))
    }

    /// A raw channel to its socket (for the health and reflection stubs).
    pub async fn channel(&self) -> Channel {
        unix_channel(&self.socket).await
    }

    /// Runs `wqctl --socket SOCKET ARGS...` to completion.
    pub fn wqctl(&self, args: &[&str]) -> Ran {
        self.wqctl_stdin(args, None)
    }

    /// As [`Daemon::wqctl`], feeding `stdin`.
    pub fn wqctl_stdin(&self, args: &[&str], stdin: Option<&[u8]>) -> Ran {
        run_wqctl(Some(&self.socket), args, stdin)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!(
                "---- wqd stderr (socket {}) ----\n{}---- end of wqd stderr ----",
                self.socket.display(),
                self.stderr()
            );
        }
    }
}

/// A channel over the Unix socket at `path`.
pub async fn unix_channel(path: &Path) -> Channel {
    wqd_client::unix_channel(path)
        .await
        .expect("connect a channel to the daemon socket")
}

// ---------------------------------------------------------------------------------------------
// wqctl

/// A finished `wqctl` run.
#[derive(Debug)]
pub struct Ran {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    pub args: Vec<String>,
}

impl Ran {
    /// Stdout as exactly one JSON document.
    ///
    /// # Panics
    /// If stdout is not one JSON document.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "wqctl {:?}: stdout is not one JSON document ({e}):\n{}\nstderr:\n{}",
                self.args, self.stdout, self.stderr
            )
        })
    }

    /// Asserts the exit code, showing both streams otherwise.
    pub fn expect_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code, code,
            "wqctl {:?} exited {} (expected {code});\nstdout:\n{}\nstderr:\n{}",
            self.args, self.code, self.stdout, self.stderr
        );
        self
    }
}

/// Runs `wqctl [--socket S] ARGS...` with a bound of two minutes.
pub fn run_wqctl(socket: Option<&Path>, args: &[&str], stdin: Option<&[u8]>) -> Ran {
    let mut cmd = Command::new(wqctl_bin());
    let mut all: Vec<String> = Vec::new();
    if let Some(s) = socket {
        all.push("--socket".into());
        all.push(s.display().to_string());
    }
    all.extend(args.iter().map(|a| a.to_string()));
    cmd.args(&all)
        .env_remove("WQD_SOCKET")
        .env_remove("WQD_ADDR")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("start wqctl");
    if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
        use std::io::Write;
        pipe.write_all(data).expect("write wqctl stdin");
    }
    // Bound the run: a watchdog kills wqctl if it hangs.
    let pid = child.id();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if done_rx.recv_timeout(Duration::from_secs(120)).is_err() {
            if let Ok(p) = libc::pid_t::try_from(pid) {
                // SAFETY: plain syscall; the child is not reaped until wait_with_output returns.
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
        }
    });
    let out = child.wait_with_output().expect("wait for wqctl");
    let _ = done_tx.send(());
    let _ = watchdog.join();
    Ran {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        args: all,
    }
}

// ---------------------------------------------------------------------------------------------
// Waiting and small helpers

/// Polls `f` every 10 ms until it returns `Some`, for at most `limit`.
///
/// # Panics
/// After `limit`, naming `what`.
pub async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let end = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < end,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The daemon's counters.
pub async fn stats(c: &Client) -> proto::GetStatsResponse {
    c.stats().await.expect("GetStats")
}

/// The current states of `ids`.
pub async fn states(c: &Client, ids: &[u64]) -> Vec<proto::ItemState> {
    c.results(ids.iter().copied())
        .await
        .expect("GetResults")
        .items
        .iter()
        .map(|l| {
            l.result
                .as_ref()
                .map(|r| r.state())
                .unwrap_or(proto::ItemState::Unspecified)
        })
        .collect()
}

/// Waits until every one of `ids` is in `state`.
pub async fn wait_states(c: &Client, ids: &[u64], state: proto::ItemState, limit: Duration) {
    wait_for(
        &format!("items {ids:?} to be {}", state.as_str_name()),
        limit,
        || async {
            states(c, ids)
                .await
                .iter()
                .all(|s| *s == state)
                .then_some(())
        },
    )
    .await
}

/// A workqueue's attributes with zero (default) values except the name.
pub fn wq_attrs(name: &str) -> proto::WorkqueueAttrs {
    proto::WorkqueueAttrs {
        name: name.to_string(),
        ..Default::default()
    }
}

/// The total of all terminal and transient counts.
pub fn total(c: &proto::StateCounts) -> u64 {
    c.delayed + c.pending + c.running + c.ok + c.failed + c.cancelled + c.expired + c.rejected
}

/// A codec that sends raw bytes as a gRPC message and reads the answer as raw bytes, for
/// requests no well-behaved client would build.
#[derive(Debug, Clone, Copy)]
pub struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        use bytes::Buf;
        let n = src.remaining();
        Ok(Some(src.copy_to_bytes(n).to_vec()))
    }
}

/// The value of one series (`name{labels}` exactly as exposed) on a metrics page.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
