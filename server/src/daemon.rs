//! The daemon's wiring and life cycle: reader → live view → engine → monitor → listeners, then
//! an orderly stop.
//!
//! Owns: the listening sockets (and the socket file), the server tasks, the monitor and the
//! load sampler. Start order, and why:
//!
//! 1. read the topology once (a machine that cannot be read is fatal: exit 1);
//! 2. build the [`LiveView`] from that reading, start the load sampler;
//! 3. start the [`Engine`] on the view's first snapshot, its `report` hook forwarding to the
//!    monitor's reporter (set in step 5) and its `load` hook reading the sampler;
//! 4. register `engine.apply_snapshot` on the view *before* the monitor runs, so the engine
//!    sees every epoch after its first one, in order;
//! 5. start the [`Monitor`] (rescan + uevents);
//! 6. bind the Unix socket (refusing if a live daemon answers on it, replacing a stale file),
//!    then the optional TCP listener, and serve.
//!
//! Stop ([`Daemon::shutdown`]): mark health NOT_SERVING and stop accepting; shut the engine
//! down with the grace period (pending items are cancelled, running ones get the grace, then
//! their cancel signal), which ends every flush; end watch streams; wait briefly for the
//! servers; stop the monitor and the sampler; remove the socket file. Invariant: once
//! `shutdown` returns, no wqd thread or task runs and the socket file is gone.

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;

use crate::config::{Config, ConfigError, Pinning};
use crate::cpuset::CpuSet;
use crate::engine::{Engine, EngineError};
use crate::handler::Registry;
use crate::live::{LiveError, LiveView, Monitor, Reporter};
use crate::load::LoadSampler;
use crate::rpc::{Counters, Rpc};
use crate::security::{Security, SecurityError};
use crate::topology::sysfs::Reader;
use crate::topology::TopologyError;

/// How long the servers get to close their connections after the engine stopped.
const SERVER_CLOSE_GRACE: Duration = Duration::from_secs(3);

/// Errors of the daemon layer. [`DaemonError::exit_code`] says how the binary exits.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot read the CPU topology from {root}: {source}")]
    Topology {
        root: String,
        #[source]
        source: TopologyError,
    },
    #[error("another wqd is already listening on {}; stop it first or pass --socket with another path", .0.display())]
    SocketInUse(PathBuf),
    #[error("socket {}: {what}: {source}", .path.display())]
    Socket {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("socket {}: exists and is not a socket; refusing to replace it", .0.display())]
    NotASocket(PathBuf),
    #[error("cannot listen on tcp {addr}: {source}")]
    Tcp {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("starting the engine: {0}")]
    Engine(#[from] EngineError),
    #[error("starting the topology monitor: {0}")]
    Live(#[from] LiveError),
    #[error("starting the load sampler: {0}")]
    Load(#[source] io::Error),
    #[error("building the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error(transparent)]
    Security(#[from] SecurityError),
}

impl DaemonError {
    /// 64 (`EX_USAGE`) for configuration errors, 1 for everything else.
    pub fn exit_code(&self) -> i32 {
        match self {
            DaemonError::Config(_) => 64,
            DaemonError::Security(e) if e.is_config() => 64,
            _ => 1,
        }
    }
}

/// The socket file this daemon created; removed on drop.
#[derive(Debug)]
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(path = %self.0.display(), error = %e, "cannot remove the socket file");
            }
        }
    }
}

/// A running daemon. Drop without [`Daemon::shutdown`] only in tests that do not care.
pub struct Daemon {
    rpc: Rpc,
    engine: Arc<Engine>,
    monitor: Option<Monitor>,
    load: Option<Arc<LoadSampler>>,
    socket: PathBuf,
    /// Declared after the servers' handles are aborted in `drop`; removes the file.
    socket_file: Option<SocketFile>,
    tcp: Option<SocketAddr>,
    stop: watch::Sender<bool>,
    health: tonic_health::server::HealthReporter,
    servers: Vec<JoinHandle<()>>,
    grace: Duration,
    pinning: bool,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("socket", &self.socket)
            .field("tcp", &self.tcp)
            .finish_non_exhaustive()
    }
}

/// The CPUs this process may run on (its affinity).
fn own_affinity() -> Option<CpuSet> {
    let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).ok()?;
    Some(
        (0..nix::sched::CpuSet::count())
            .filter(|&c| set.is_set(c).unwrap_or(false))
            .map(|c| c as u32)
            .collect(),
    )
}

/// Whether to pin workers: `auto` pins unless a fixture tree names online CPUs this process
/// cannot run on.
pub fn decide_pinning(mode: Pinning, fixture: bool, online: &CpuSet) -> bool {
    match mode {
        Pinning::On => true,
        Pinning::Off => false,
        Pinning::Auto if !fixture => true,
        Pinning::Auto => own_affinity().is_some_and(|a| online.is_subset(&a)),
    }
}

/// Binds the Unix socket at `path` with `mode`: creates the parent folder, replaces a stale
/// socket file, refuses when a daemon answers on it.
///
/// # Errors
/// [`DaemonError::SocketInUse`], [`DaemonError::NotASocket`], [`DaemonError::Socket`].
pub fn bind_unix(path: &Path, mode: u32) -> Result<std::os::unix::net::UnixListener, DaemonError> {
    let err = |what, source| DaemonError::Socket {
        path: path.to_path_buf(),
        what,
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| err("creating its folder", e))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(DaemonError::NotASocket(path.to_path_buf()))
        }
        Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => return Err(DaemonError::SocketInUse(path.to_path_buf())),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                tracing::info!(path = %path.display(), "replacing a stale socket file");
                std::fs::remove_file(path).map_err(|e| err("removing the stale file", e))?;
            }
            Err(e) => return Err(err("probing the existing socket", e)),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err("inspecting the path", e)),
    }
    let l = std::os::unix::net::UnixListener::bind(path).map_err(|e| err("binding", e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| err("setting its mode", e))?;
    l.set_nonblocking(true)
        .map_err(|e| err("making it non-blocking", e))?;
    Ok(l)
}

impl Daemon {
    /// Starts everything (see the module docs) and serves. Must run inside a tokio runtime.
    ///
    /// # Errors
    /// Configuration errors (exit 64); an unreadable topology, a socket in use or any other
    /// start failure (exit 1). Nothing is left running on error.
    pub async fn start(cfg: Config) -> Result<Daemon, DaemonError> {
        cfg.validate()?;
        // The socket first: a second daemon must refuse before it touches anything else.
        let socket = cfg.listen.socket_path();
        let unix = bind_unix(&socket, cfg.listen.socket_mode)?;
        let socket_file = SocketFile(socket.clone());
        // [security]: the socket's group, then the guarded servers below (see security.rs).
        let security = Security::resolve(&cfg.security, &cfg.listen)?;
        security.chown_socket(&socket)?;
        security.log_summary();
        let unix = tokio::net::UnixListener::from_std(unix).map_err(|e| DaemonError::Socket {
            path: socket.clone(),
            what: "registering it with the runtime",
            source: e,
        })?;
        let fixture = cfg.topology.sysfs_root.is_some();
        let reader = match &cfg.topology.sysfs_root {
            Some(root) => Reader::fixture(root),
            None => Reader::host(),
        };
        let first = reader.read().map_err(|source| DaemonError::Topology {
            root: reader.sys_root().display().to_string(),
            source,
        })?;
        let pinning = decide_pinning(cfg.topology.pinning, fixture, &first.online);
        if !pinning {
            tracing::warn!(
                online = %first.online,
                "worker pinning is off (the topology names CPUs this process cannot run on, or --pinning off)"
            );
        }
        let view = LiveView::new(first, cfg.live_config()?);
        // Host load means nothing for a fixture naming CPUs this host lacks: busy reads 0 then.
        let load = if fixture && !pinning {
            None
        } else {
            Some(Arc::new(
                LoadSampler::start(cfg.engine.load_sample).map_err(DaemonError::Load)?,
            ))
        };

        let reporter: Arc<OnceLock<Reporter>> = Arc::new(OnceLock::new());
        let rep = reporter.clone();
        let mut ecfg = cfg.engine_config()?;
        ecfg.pinning = pinning;
        ecfg.report = Some(Arc::new(move |cpu, why| {
            if let Some(r) = rep.get() {
                r.report(cpu, why);
            }
        }));
        ecfg.load = load.as_ref().map(|l| l.hook());
        let registry = Registry::with_builtins(cfg.exec.clone());
        let engine = Arc::new(Engine::start(ecfg, registry, view.current())?);
        for attrs in cfg.extra_workqueues()? {
            engine.create_workqueue(attrs)?;
        }
        let weak = Arc::downgrade(&engine);
        let at_registration = view.on_change(Box::new(move |snap| {
            if let Some(e) = weak.upgrade() {
                e.apply_snapshot(snap);
            }
        }));
        engine.apply_snapshot(&at_registration);
        let monitor = Monitor::start(reader, view.clone(), cfg.monitor_config())?;
        let _ = reporter.set(monitor.reporter());

        let tcp = match cfg.listen.tcp {
            Some(addr) => {
                let l = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| DaemonError::Tcp { addr, source })?;
                let local = l
                    .local_addr()
                    .map_err(|source| DaemonError::Tcp { addr, source })?;
                Some((l, local))
            }
            None => None,
        };
        if let Some(m) = cfg.metrics.listen {
            tracing::warn!(addr = %m, "metrics endpoint configured but not served yet (this build has no metrics exporter)");
        }

        let (stop, stopping) = watch::channel(false);
        let rpc = Rpc {
            engine: engine.clone(),
            view: view.clone(),
            load: load.clone(),
            limits: cfg.limits.clone(),
            started: SystemTime::now(),
            counters: Arc::new(Counters::default()),
            stopping: stopping.clone(),
        };
        let health = tonic_health::server::HealthReporter::new();
        Rpc::set_health(&health, true).await;
        let mut servers = Vec::new();
        let router = rpc.router_with(&health, security.unix_server())?;
        let st = stopping.clone();
        servers.push(tokio::spawn(async move {
            let r = router
                .serve_with_incoming_shutdown(
                    crate::security::peer_incoming(unix),
                    crate::rpc::stopped(st),
                )
                .await;
            if let Err(e) = r {
                tracing::error!(error = %e, "unix listener failed");
            }
        }));
        let tcp_addr = match tcp {
            Some((l, local)) => {
                let router = rpc.router_with(&health, security.tcp_server()?)?;
                let st = stopping.clone();
                servers.push(tokio::spawn(async move {
                    let r = router
                        .serve_with_incoming_shutdown(
                            TcpListenerStream::new(l),
                            crate::rpc::stopped(st),
                        )
                        .await;
                    if let Err(e) = r {
                        tracing::error!(error = %e, "tcp listener failed");
                    }
                }));
                Some(local)
            }
            None => None,
        };
        tracing::info!(
            socket = %socket.display(),
            tcp = ?tcp_addr,
            pinning,
            epoch = view.current().epoch,
            live = %view.current().live,
            netlink = monitor.netlink_active(),
            "wqd serving"
        );
        Ok(Daemon {
            rpc,
            engine,
            monitor: Some(monitor),
            load,
            socket,
            socket_file: Some(socket_file),
            tcp: tcp_addr,
            stop,
            health,
            servers,
            grace: cfg.engine.shutdown_grace,
            pinning,
        })
    }

    /// The Unix socket path served.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// The TCP address served (with the real port when 0 was asked), if any.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp
    }

    /// Whether workers are pinned.
    pub fn pinning(&self) -> bool {
        self.pinning
    }

    /// The shared RPC state (tests).
    pub fn rpc(&self) -> &Rpc {
        &self.rpc
    }

    /// Stops in order (see the module docs). Postcondition: no wqd thread or task runs and the
    /// socket file is removed. Returns how many items the engine cancelled.
    pub async fn shutdown(mut self) -> usize {
        tracing::info!(grace = ?self.grace, "shutting down");
        Rpc::set_health(&self.health, false).await;
        let _ = self.stop.send(true);
        let engine = self.engine.clone();
        let grace = self.grace;
        let cancelled = tokio::task::spawn_blocking(move || engine.shutdown(grace))
            .await
            .unwrap_or(0);
        for mut s in std::mem::take(&mut self.servers) {
            if tokio::time::timeout(SERVER_CLOSE_GRACE, &mut s)
                .await
                .is_err()
            {
                tracing::warn!("connections still open after shutdown; closing them");
                s.abort();
            }
        }
        self.stop_threads();
        drop(self.socket_file.take());
        tracing::info!(cancelled, "stopped");
        cancelled
    }

    fn stop_threads(&mut self) {
        if let Some(m) = self.monitor.take() {
            m.stop();
        }
        self.load = None;
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        for s in &self.servers {
            s.abort();
        }
        self.stop_threads();
        drop(self.socket_file.take());
    }
}

/// Runs the daemon until SIGTERM or SIGINT, then shuts it down. `ready` is called once the
/// listeners are bound (the binary prints its "listening" lines there).
///
/// # Errors
/// As [`Daemon::start`], and a signal handler that cannot be installed (exit 1).
pub async fn run(cfg: Config, ready: impl FnOnce(&Daemon)) -> Result<(), DaemonError> {
    use tokio::signal::unix::{signal, SignalKind};
    let sig = |k| {
        signal(k).map_err(|source| DaemonError::Socket {
            path: PathBuf::from("<signal>"),
            what: "installing a signal handler",
            source,
        })
    };
    let mut term = sig(SignalKind::terminate())?;
    let mut int = sig(SignalKind::interrupt())?;
    let daemon = Daemon::start(cfg).await?;
    ready(&daemon);
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
    daemon.shutdown().await;
    Ok(())
}
