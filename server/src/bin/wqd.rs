//! `wqd`, the daemon: parses the command line, loads the config, sets up logging and runs
//! [`wqd::daemon::run`] on a tokio runtime.
//!
//! Exit codes: 0 after a clean SIGTERM/SIGINT shutdown; 64 for bad flags or config; 1 when the
//! daemon cannot start (unreadable topology, a live daemon on the socket, a bind error, a bad
//! socket passed by systemd).
//!
//! Under systemd: the socket passed by `wqd.socket` (`LISTEN_FDS`) is taken here, before any
//! thread starts, and `NOTIFY_SOCKET` / `WATCHDOG_USEC` are read; [`wqd::daemon::run`] does
//! the rest. The log filter sits behind a reload handle so SIGHUP can change `[log] level`.
//! Once listening it prints `wqd: listening on unix:PATH` (and `wqd: listening on
//! tcp:ADDR`, and `wqd: metrics on http://ADDR/metrics`) on stderr, so scripts and tests can
//! wait for that line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;
use wqd::config::{parse_mode, Config, Pinning};
use wqd::daemon::RunOptions;
use wqd::reload::LogSetter;

const EX_USAGE: u8 = 64;

/// Run work on CPU groups that survive CPU hotplug.
///
/// wqd serves the wqd.v1 gRPC API (plus grpc.health.v1 and server reflection) on a Unix
/// socket, and optionally on TCP. Flags override the config file, which overrides the
/// built-in defaults. See docs/daemon.md for every config key.
#[derive(Debug, Clone, Parser)]
#[command(name = "wqd", version)]
struct Cli {
    /// The Unix socket to listen on. Default: $XDG_RUNTIME_DIR/wqd/wqd.sock for a non-root
    /// user with XDG_RUNTIME_DIR set, else /run/wqd/wqd.sock (the same rule as wqctl). The
    /// folder is created; a stale socket is replaced; if a daemon answers on it, wqd exits 1.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,

    /// Permission bits of the socket file, in octal. Default: 0660.
    #[arg(long, value_name = "MODE", value_parser = parse_mode)]
    socket_mode: Option<u32>,

    /// Also listen on TCP at ADDR (e.g. 127.0.0.1:7070; port 0 picks a free one). Only
    /// loopback addresses unless --allow-remote. Needs TLS ([security] tls_cert, tls_key) or,
    /// on loopback, [security] tcp_plaintext_loopback = true in --config (docs/security.md).
    /// Default: no TCP listener.
    #[arg(long, value_name = "ADDR")]
    tcp_listen: Option<SocketAddr>,

    /// Allow --tcp-listen on a non-loopback address (set up TLS and client authentication in
    /// [security] first: docs/security.md).
    #[arg(long)]
    allow_remote: bool,

    /// A directory tree standing in for /sys (e.g. a test fixture). The topology and the
    /// allowed CPUs (its root cpuset, else all of its online CPUs) both come from it, and
    /// with --pinning auto workers are not pinned when it names CPUs this host lacks.
    /// Default: the real /sys.
    #[arg(long, value_name = "PATH")]
    sysfs_root: Option<PathBuf>,

    /// The TOML config file. Default: /etc/wqd/wqd.toml when it exists, else built-in
    /// defaults.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,

    /// Serve Prometheus metrics on http://ADDR/metrics (e.g. 127.0.0.1:9464; port 0 picks a
    /// free one). Only loopback addresses unless --allow-remote. Default: not served.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,

    /// Log filter, tracing EnvFilter syntax (e.g. info, debug, wqd=debug,tonic=warn). Default:
    /// RUST_LOG if set, else [log] level from the config, else info.
    #[arg(long, value_name = "FILTER")]
    log_level: Option<String>,

    /// Pin worker threads to their CPU: auto (pin unless --sysfs-root names CPUs this process
    /// cannot run on), on, off. Default: auto.
    #[arg(long, value_enum, value_name = "MODE")]
    pinning: Option<Pinning>,

    /// Period of the topology rescan (e.g. 500ms, 2s). Default: 1s.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    rescan: Option<Duration>,

    /// Do not listen to kernel CPU hotplug uevents; rely on the periodic rescan only.
    #[arg(long)]
    no_netlink: bool,

    /// On SIGTERM/SIGINT, how long running items get to finish before they are cancelled.
    /// Default: 10s.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    shutdown_grace: Option<Duration>,

    /// Threads serving the gRPC API ([listen] rpc_threads). They share the CPUs with the
    /// engine's workers, which run the items. Default: one per four CPUs this process may run
    /// on, at least one.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=256))]
    rpc_threads: Option<u16>,
}

impl Cli {
    /// Applies the flags on top of the file.
    fn apply(&self, cfg: &mut Config) {
        if let Some(p) = &self.socket {
            cfg.listen.socket = Some(p.clone());
        }
        if let Some(m) = self.socket_mode {
            cfg.listen.socket_mode = m;
        }
        if let Some(a) = self.tcp_listen {
            cfg.listen.tcp = Some(a);
        }
        if self.allow_remote {
            cfg.listen.allow_remote = true;
        }
        if let Some(p) = &self.sysfs_root {
            cfg.topology.sysfs_root = Some(p.clone());
        }
        if let Some(a) = self.metrics_listen {
            cfg.metrics.listen = Some(a);
        }
        if let Some(p) = self.pinning {
            cfg.topology.pinning = p;
        }
        if let Some(r) = self.rescan {
            cfg.topology.rescan = r;
        }
        if self.no_netlink {
            cfg.topology.netlink = false;
        }
        if let Some(g) = self.shutdown_grace {
            cfg.engine.shutdown_grace = g;
        }
        if let Some(n) = self.rpc_threads {
            cfg.listen.rpc_threads = usize::from(n);
        }
    }
}

/// Freed heap the daemon keeps for reuse (glibc), at most, above what it uses.
const KEEP_FREED_HEAP: usize = 32 << 20;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EX_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let mut cfg = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("wqd: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    cli.apply(&mut cfg);
    if let Err(e) = cfg.validate() {
        let e = if e.to_string().contains("listen.tcp") && cli.tcp_listen.is_some() {
            format!("{e} (from --tcp-listen)")
        } else {
            e.to_string()
        };
        eprintln!("wqd: {e}");
        return ExitCode::from(EX_USAGE);
    }
    let fixed_filter = cli
        .log_level
        .clone()
        .or_else(|| std::env::var("RUST_LOG").ok().filter(|s| !s.is_empty()));
    let from_file = fixed_filter.is_none();
    let filter = fixed_filter
        .or_else(|| cfg.log.level.clone())
        .unwrap_or_else(|| "info".to_string());
    let filter = match EnvFilter::try_new(&filter) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("wqd: bad log filter {filter:?}: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .init();
    // Only a level that came from the file may be changed by reloading the file.
    let log: Option<LogSetter> = from_file.then(|| {
        Box::new(move |level: &str| {
            let f = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
            handle.reload(f).map_err(|e| e.to_string())
        }) as LogSetter
    });

    // Before any thread starts: this edits the environment.
    let activated = match wqd::systemd::take_listener() {
        Ok(l) => l,
        Err(e) => {
            eprintln!("wqd: socket activation: {e}");
            return ExitCode::from(1);
        }
    };
    let notify = match wqd::systemd::Notifier::from_env() {
        Ok(n) => n,
        Err(e) => {
            eprintln!("wqd: NOTIFY_SOCKET: {e}");
            return ExitCode::from(1);
        }
    };
    let flags = cli.clone();
    let opts = RunOptions {
        config_path: cli.config.clone(),
        overrides: Some(Box::new(move |c: &mut Config| flags.apply(c))),
        log,
        activated,
        watchdog: notify.as_ref().and(wqd::systemd::watchdog_from_env()),
        notify,
    };

    // At start, before the engine and the RPC threads: freed heap is kept for the next
    // batches instead of being faulted in again per batch (see `wqd_core::malloc`).
    let kept = wqd_core::malloc::keep_freed(KEEP_FREED_HEAP);
    tracing::debug!(kept, bytes = KEEP_FREED_HEAP, "freed heap kept for reuse");
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let rpc_threads = cfg.listen.rpc_threads_in_force(cpus);
    tracing::info!(rpc_threads, cpus, "RPC threads");
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(rpc_threads)
        .thread_name("wqd-rpc")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wqd: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let r = rt.block_on(wqd::daemon::run(cfg, opts, |d| {
        eprintln!("wqd: listening on unix:{}", d.socket_path().display());
        if let Some(a) = d.tcp_addr() {
            eprintln!("wqd: listening on tcp:{a}");
        }
        if let Some(a) = d.metrics_addr() {
            eprintln!("wqd: metrics on http://{a}/metrics");
        }
    }));
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wqd: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}
