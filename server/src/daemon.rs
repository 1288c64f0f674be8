//! The daemon's wiring and life cycle: reader → live view → engine → monitor → listeners, then
//! an orderly stop.
//!
//! Owns: the listening sockets (and the socket file), the server tasks, the monitor and the
//! load sampler. [`Daemon::start_with`] runs four steps, each a function, in this order and
//! for these reasons:
//!
//! 0. *check and resolve* (`Resolved`): validate the config (pure), then resolve what needs
//!    I/O — `[security]` (users, groups, TLS and token files, exec-as-root) and `[workers]` —
//!    once; a config error exits 64 before anything is bound or started;
//! 1. *bind the listeners* (`Bound`): raise RLIMIT_NOFILE first thing, bind the Unix socket
//!    (refusing if a live daemon answers on it, replacing a stale file; a second daemon must
//!    refuse before it touches anything else) and give it to `socket_group`, then bind the
//!    optional TCP listener. Under socket activation the listener systemd passed (fd 3) is
//!    used instead: no bind, no mode change, and the file is never removed (it belongs to
//!    `wqd.socket`);
//! 2. *start the core* (`Core`): read the topology once (a machine that cannot be read is
//!    fatal: exit 1); build the [`LiveView`] from that reading and start the load sampler;
//!    start the [`Engine`] on the view's first snapshot, its `report` hook forwarding to the
//!    monitor's reporter (set last) and its `load` hook reading the sampler; register
//!    `engine.apply_snapshot` on the view *before* the monitor runs, so the engine sees every
//!    epoch after its first one, in order; start the [`Monitor`] (rescan + uevents);
//! 3. *start the servers* (`Serving`): the metrics endpoint, then the guarded gRPC routers on
//!    both listeners. Each listener serves through [`crate::conn::Incoming`]: its cap is
//!    `listen.max_connections`, lowered to what RLIMIT_NOFILE leaves once every listening
//!    socket is open and a reserve is set aside (see [`crate::conn`]).
//!
//! 4. *join the fleet* (only with `[fleet]`): start the fleet member
//!    ([`crate::fleet::member`]), which connects to NATS in the background and takes work only
//!    now that everything above runs. Its I/O (host name, credential files) was step 0's.
//!
//! systemd's notifications (`READY=1`, the watchdog) start in [`run`], once the binary has
//! printed its "listening" lines.
//!
//! Run ([`run`]): after start, `READY=1` to systemd, a supervisor task sending `STATUS=` and
//! `WATCHDOG=1` (see [`crate::systemd`]); SIGHUP reloads the config ([`Daemon::reload`],
//! [`crate::reload`]); SIGTERM/SIGINT sends `STOPPING=1` and stops.
//!
//! Stop ([`Daemon::shutdown`]): mark health NOT_SERVING and stop accepting; shut the engine
//! down with the grace period (pending items are cancelled, running ones get the grace, then
//! their cancel signal), which ends every flush — the fleet member, told first, hands the
//! items this cancels back to the fleet and publishes the ones that finished, then leaves;
//! end watch streams; wait briefly for the
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

use crate::config::{Config, ConfigError, Pinning};
use crate::conn::{ConnLayer, Incoming, Listener, ListenerStats};
use crate::fleet::member::{Member, MemberContext, Prepared};
use crate::fleet::FleetError;
use crate::listen::{ListenConfig, KEEPALIVE_TIMEOUT};
use crate::metrics::Metrics;
use crate::reload::{LogSetter, Plan, ReloadError, Targets};
use crate::rpc::limits::SharedLimits;
use crate::rpc::worker::WorkerPolicy;
use crate::rpc::{Counters, Rpc};
use crate::security::{Security, SecurityError};
use crate::shared::stopped;
use crate::systemd::Notifier;
use wqd_core::cpuset::CpuSet;
use wqd_core::engine::{Engine, EngineError};
use wqd_core::handler::Registry;
use wqd_core::live::{LiveError, LiveView, Monitor, Reporter};
use wqd_core::load::LoadSampler;
use wqd_core::topology::sysfs::Reader;
use wqd_core::topology::TopologyError;

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
    #[error("installing a signal handler: {0}")]
    Signal(#[source] io::Error),
    #[error("starting the systemd health probe: {0}")]
    Probe(#[source] io::Error),
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    #[error(transparent)]
    Security(#[from] SecurityError),
    #[error(transparent)]
    Fleet(#[from] FleetError),
}

impl DaemonError {
    /// 64 (`EX_USAGE`) for configuration errors, 1 for everything else.
    pub fn exit_code(&self) -> i32 {
        match self {
            DaemonError::Config(_) => 64,
            DaemonError::Security(e) if e.is_config() => 64,
            DaemonError::Fleet(e) if e.is_config() => 64,
            _ => 1,
        }
    }
}

/// Connections per listener: `listen.max_connections`, lowered (with a warning) to what
/// RLIMIT_NOFILE leaves once the descriptors open now and [`crate::conn::fd_budget`]'s reserve
/// are set aside. `nofile` is `(soft, hard)`; unknown means no clamp.
fn connection_cap(listen: &ListenConfig, nofile: Option<(u64, u64)>, listeners: usize) -> usize {
    let want = listen.max_connections;
    let (Some((soft, _)), Some(in_use)) = (nofile, crate::conn::fds_in_use()) else {
        return want;
    };
    let budget = crate::conn::fd_budget(soft, in_use, listeners);
    if budget.per_listener < want {
        tracing::warn!(
            configured = want,
            effective = budget.per_listener,
            rlimit_nofile = soft,
            fds_in_use = in_use,
            reserve = budget.reserve,
            listeners,
            "listen.max_connections lowered to what RLIMIT_NOFILE allows (raise LimitNOFILE= to serve more)"
        );
        budget.per_listener
    } else {
        tracing::info!(
            max_connections = want,
            rlimit_nofile = soft,
            fds_in_use = in_use,
            reserve = budget.reserve,
            "connection limits"
        );
        want
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
    /// Declared after the servers' handles are aborted in `drop`; removes the file. `None`
    /// under socket activation.
    socket_file: Option<SocketFile>,
    /// The config in force (the last one started or reloaded).
    cfg: Config,
    /// Whether the Unix listener came from systemd.
    activated: bool,
    tcp: Option<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    stop: watch::Sender<bool>,
    health: tonic_health::server::HealthReporter,
    servers: Vec<JoinHandle<()>>,
    pinning: bool,
    /// The fleet member, when `[fleet]` is set.
    fleet: Option<Member>,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("socket", &self.socket)
            .field("tcp", &self.tcp)
            .finish_non_exhaustive()
    }
}

/// Whether to pin workers: `auto` pins unless a fixture tree names online CPUs this process
/// cannot run on.
pub fn decide_pinning(mode: Pinning, fixture: bool, online: &CpuSet) -> bool {
    match mode {
        Pinning::On => true,
        Pinning::Off => false,
        Pinning::Auto if !fixture => true,
        Pinning::Auto => wqd_core::topology::sysfs::affinity().is_ok_and(|a| online.is_subset(&a)),
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

/// Step 0 of start-up: the config checked and everything in it that needs I/O (users,
/// groups, TLS and token files, the daemon's own uid) resolved, once, before anything is
/// bound. Later steps use these values; nothing resolves them again.
struct Resolved {
    security: Security,
    workers: WorkerPolicy,
    /// `[fleet]`'s host name and credential files, when the section is present.
    fleet: Option<Prepared>,
}

impl Resolved {
    /// Validates `cfg` (pure) and resolves `[security]`, `[workers]` and `[fleet]`.
    async fn from_config(cfg: &Config) -> Result<Resolved, DaemonError> {
        cfg.validate()?;
        let security = Security::resolve(&cfg.security, cfg.listen.tcp, cfg.exec.as_ref())?;
        let workers = WorkerPolicy::resolve(&cfg.workers, nix::unistd::geteuid().as_raw())
            .map_err(|e| {
                DaemonError::Config(ConfigError::Invalid {
                    key: "workers.allow".into(),
                    problem: e,
                })
            })?;
        let fleet = match &cfg.fleet {
            Some(f) => Some(Member::prepare(f).await?),
            None => None,
        };
        Ok(Resolved {
            security,
            workers,
            fleet,
        })
    }
}

/// Step 1: the listening sockets, bound (or taken from systemd) and not yet served.
struct Bound {
    socket: PathBuf,
    /// `None` under socket activation (the file is `wqd.socket`'s).
    socket_file: Option<SocketFile>,
    activated: bool,
    listeners: Listeners,
}

/// The gRPC listeners [`Serving`] serves.
struct Listeners {
    unix: tokio::net::UnixListener,
    tcp: Option<(tokio::net::TcpListener, SocketAddr)>,
    /// RLIMIT_NOFILE `(soft, hard)` after raising it, if known.
    nofile: Option<(u64, u64)>,
}

impl Bound {
    /// Raises RLIMIT_NOFILE, binds the Unix socket (or takes `activated`) and gives it to
    /// `security.socket_group`, then binds the optional TCP listener. The Unix socket comes
    /// first: a second daemon must refuse before it touches anything else.
    async fn listen(
        listen: &ListenConfig,
        activated: Option<std::os::unix::net::UnixListener>,
        security: &Security,
    ) -> Result<Bound, DaemonError> {
        // Before anything opens descriptors: the connection budget is computed from the
        // raised limit.
        let nofile = crate::conn::raise_nofile().ok();
        let is_activated = activated.is_some();
        let (socket, unix, socket_file) = match activated {
            Some(l) => {
                let path = l
                    .local_addr()
                    .ok()
                    .and_then(|a| a.as_pathname().map(Path::to_path_buf))
                    .unwrap_or_else(|| PathBuf::from("<socket passed by systemd>"));
                if listen.socket.as_deref().is_some_and(|p| p != path) {
                    tracing::info!(passed = %path.display(), "listen.socket is ignored: serving the socket systemd passed");
                }
                // tokio needs it non-blocking; take_listener does this, other callers may not.
                l.set_nonblocking(true).map_err(|e| DaemonError::Socket {
                    path: path.clone(),
                    what: "making the passed socket non-blocking",
                    source: e,
                })?;
                (path, l, None)
            }
            None => {
                let socket = listen.socket_path();
                let unix = bind_unix(&socket, listen.socket_mode)?;
                let file = SocketFile(socket.clone());
                (socket, unix, Some(file))
            }
        };
        // The socket's group (systemd's SocketGroup= sets it on a passed socket).
        if socket_file.is_some() {
            security.chown_socket(&socket)?;
        }
        security.log_summary();
        let unix = tokio::net::UnixListener::from_std(unix).map_err(|e| DaemonError::Socket {
            path: socket.clone(),
            what: "registering it with the runtime",
            source: e,
        })?;
        let tcp = match listen.tcp {
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
        Ok(Bound {
            socket,
            socket_file,
            activated: is_activated,
            listeners: Listeners { unix, tcp, nofile },
        })
    }
}

/// Step 2: the core running — topology read, live view, load sampler, engine with its
/// handlers and workqueues, monitor.
struct Core {
    engine: Arc<Engine>,
    view: Arc<LiveView>,
    load: Option<Arc<LoadSampler>>,
    monitor: Monitor,
    pinning: bool,
}

impl Core {
    /// Starts the core in the order the module docs give (steps 1 to 5 there), the engine
    /// observed by `metrics` when they are on.
    fn start(cfg: &Config, metrics: Option<&Arc<Metrics>>) -> Result<Core, DaemonError> {
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
        ecfg.observer = metrics.map(|m| m.observer());
        let registry = Registry::with_builtins(cfg.exec.clone());
        let engine = Arc::new(Engine::start(ecfg, registry, view.current())?);
        for attrs in cfg.extra_workqueues()? {
            engine.create_workqueue(attrs)?;
        }
        engine.declare_remote(&cfg.workers.handlers)?;
        let weak = Arc::downgrade(&engine);
        let at_registration = view.on_change(Box::new(move |snap| {
            if let Some(e) = weak.upgrade() {
                e.apply_snapshot(snap);
            }
        }));
        engine.apply_snapshot(&at_registration);
        let monitor = Monitor::start(reader, view.clone(), cfg.monitor_config())?;
        let _ = reporter.set(monitor.reporter());
        Ok(Core {
            engine,
            view,
            load,
            monitor,
            pinning,
        })
    }
}

/// Step 3: the servers running — metrics, then the gRPC routers on both listeners.
struct Serving {
    rpc: Rpc,
    /// The TCP address served, with the real port.
    tcp: Option<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    stop: watch::Sender<bool>,
    health: tonic_health::server::HealthReporter,
    servers: Vec<JoinHandle<()>>,
}

impl Serving {
    /// Starts the metrics endpoint, builds the shared RPC state, caps connections by what
    /// the descriptor limit leaves once every listening socket is open, and serves the
    /// guarded routers on the bound listeners until the returned `stop` flips.
    async fn start(
        cfg: &Config,
        resolved: Resolved,
        bound: Listeners,
        core: &Core,
        metrics: Option<Arc<Metrics>>,
    ) -> Result<Serving, DaemonError> {
        let Resolved {
            security, workers, ..
        } = resolved;
        let (stop, stopping) = watch::channel(false);
        let metrics_server =
            crate::metrics::serve(&metrics, &cfg.metrics, &core.engine, &core.view, &stopping)
                .await?;
        let metrics_addr = metrics_server.as_ref().map(|m| m.local_addr());
        let rpc = Rpc {
            engine: core.engine.clone(),
            view: core.view.clone(),
            load: core.load.clone(),
            limits: SharedLimits::new(cfg.limits.clone()),
            started: SystemTime::now(),
            counters: Arc::new(Counters::default()),
            stopping: stopping.clone(),
            metrics,
            workers: Arc::new(workers),
        };
        let health = tonic_health::server::HealthReporter::new();
        Rpc::set_health(&health, true).await;
        let mut servers: Vec<_> = metrics_server.into_iter().map(|m| m.into_task()).collect();
        // Every listening socket is open now: what the descriptor limit leaves for connections.
        let max_conns = connection_cap(
            &cfg.listen,
            bound.nofile,
            1 + usize::from(bound.tcp.is_some()),
        );
        let server = || {
            rpc.server()
                .http2_keepalive_interval(cfg.listen.keepalive())
                .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
                .layer(ConnLayer)
        };
        let unix_stats = Arc::new(ListenerStats::new(Listener::Unix, max_conns));
        let unix_incoming = Incoming::new(
            bound.unix,
            cfg.listen.conn_settings(max_conns, false),
            unix_stats.clone(),
        );
        let mut conn_stats = vec![unix_stats];
        let router = rpc.router_with(&health, security.unix_server(server()))?;
        servers.push(spawn_server(
            "unix",
            router.serve_with_incoming_shutdown(unix_incoming, stopped(stopping.clone())),
        ));
        let tcp = match bound.tcp {
            Some((l, local)) => {
                let router = rpc.router_with(
                    &health,
                    security.tcp_server(server(), cfg.listen.handshake_timeout)?,
                )?;
                let stats = Arc::new(ListenerStats::new(Listener::Tcp, max_conns));
                let incoming = Incoming::new(
                    l,
                    cfg.listen.conn_settings(max_conns, security.tls()),
                    stats.clone(),
                );
                conn_stats.push(stats);
                servers.push(spawn_server(
                    "tcp",
                    router.serve_with_incoming_shutdown(incoming, stopped(stopping.clone())),
                ));
                Some(local)
            }
            None => None,
        };
        if let Some(m) = &rpc.metrics {
            m.watch_listeners(conn_stats);
        }
        Ok(Serving {
            rpc,
            tcp,
            metrics_addr,
            stop,
            health,
            servers,
        })
    }
}

/// Runs one listener's server (`serving`) as a task, logging how it failed if it does.
fn spawn_server(
    listener: &'static str,
    serving: impl std::future::Future<Output = Result<(), tonic::transport::Error>> + Send + 'static,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(e) = serving.await {
            tracing::error!(error = %e, "{listener} listener failed");
        }
    })
}

impl Daemon {
    /// Starts everything (see the module docs) and serves. Must run inside a tokio runtime.
    ///
    /// # Errors
    /// Configuration errors (exit 64); an unreadable topology, a socket in use or any other
    /// start failure (exit 1). Nothing is left running on error.
    pub async fn start(cfg: Config) -> Result<Daemon, DaemonError> {
        Daemon::start_with(cfg, None).await
    }

    /// As [`start`](Self::start), serving `activated` (a listening Unix socket passed by
    /// systemd, see [`crate::systemd::take_listener`]) instead of binding `listen.socket`.
    ///
    /// # Errors
    /// As [`start`](Self::start).
    pub async fn start_with(
        cfg: Config,
        activated: Option<std::os::unix::net::UnixListener>,
    ) -> Result<Daemon, DaemonError> {
        let mut resolved = Resolved::from_config(&cfg).await?;
        let fleet = resolved.fleet.take();
        let Bound {
            socket,
            socket_file,
            activated,
            listeners,
        } = Bound::listen(&cfg.listen, activated, &resolved.security).await?;
        let metrics = crate::metrics::for_config(&cfg.metrics)?;
        let core = Core::start(&cfg, metrics.as_ref())?;
        let serving = Serving::start(&cfg, resolved, listeners, &core, metrics).await?;
        // Last: the fleet member takes work only once the daemon serves. Absent `[fleet]`,
        // nothing here touches the network.
        let fleet = match fleet {
            Some(p) => Some(
                Member::start(
                    p,
                    MemberContext {
                        engine: core.engine.clone(),
                        view: core.view.clone(),
                        load: core.load.clone(),
                        limits: serving.rpc.limits.clone(),
                        metrics: serving.rpc.metrics.clone(),
                    },
                )
                .await?,
            ),
            None => None,
        };
        tracing::info!(
            socket = %socket.display(),
            activated,
            tcp = ?serving.tcp,
            pinning = core.pinning,
            epoch = core.view.current().epoch,
            live = %core.view.current().live,
            netlink = core.monitor.netlink_active(),
            "wqd serving"
        );
        Ok(Daemon {
            rpc: serving.rpc,
            engine: core.engine,
            monitor: Some(core.monitor),
            load: core.load,
            socket,
            socket_file,
            cfg,
            activated,
            tcp: serving.tcp,
            metrics_addr: serving.metrics_addr,
            stop: serving.stop,
            health: serving.health,
            servers: serving.servers,
            pinning: core.pinning,
            fleet,
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

    /// The metrics address served (with the real port when 0 was asked), if any.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// This daemon's name in its fleet, when it is a member.
    pub fn fleet_host(&self) -> Option<&str> {
        self.fleet.as_ref().map(Member::host)
    }

    /// Whether workers are pinned.
    pub fn pinning(&self) -> bool {
        self.pinning
    }

    /// The shared RPC state (tests).
    pub fn rpc(&self) -> &Rpc {
        &self.rpc
    }

    /// The config in force.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Whether the Unix listener was passed by systemd (socket activation).
    pub fn activated(&self) -> bool {
        self.activated
    }

    /// Reloads: checks `new` against the config in force and the engine's contents, then
    /// applies the live changes (see [`crate::reload`]). Queued and running items are not
    /// touched. `log` sets the log filter, `None` when flags or `RUST_LOG` fixed it.
    ///
    /// # Errors
    /// [`ReloadError`]: the file is invalid, a restart-only key changed, or a workqueue change
    /// cannot apply now. The config in force is then unchanged in every respect.
    pub fn reload(&mut self, new: Config, log: Option<&LogSetter>) -> Result<Plan, ReloadError> {
        let plan = crate::reload::plan(&self.cfg, &new, &self.engine.workqueues())?;
        crate::reload::apply(
            &plan,
            &Targets {
                engine: &self.engine,
                view: &self.rpc.view,
                limits: &self.rpc.limits,
                log,
            },
        )?;
        self.cfg = new;
        Ok(plan)
    }

    /// Live CPUs, pending and running items, for `STATUS=` and logs. Takes the engine lock.
    pub fn status_line(&self) -> String {
        status_line(&self.engine, &self.rpc.view)
    }

    /// Stops in order (see the module docs). Postcondition: no wqd thread or task runs and the
    /// socket file is removed. Returns how many items the engine cancelled.
    pub async fn shutdown(mut self) -> usize {
        let grace = self.cfg.engine.shutdown_grace;
        tracing::info!(?grace, "shutting down");
        Rpc::set_health(&self.health, false).await;
        let _ = self.stop.send(true);
        // Before the engine cancels anything: the member stops pulling, and items the engine
        // cancels now are handed back to the fleet rather than published as cancelled.
        if let Some(f) = &self.fleet {
            f.begin_stop();
        }
        let engine = self.engine.clone();
        let cancelled = tokio::task::spawn_blocking(move || engine.shutdown(grace))
            .await
            .unwrap_or(0);
        // The engine has stopped: items it cancelled are handed back to the fleet, finished
        // ones are published, then the member leaves.
        if let Some(f) = self.fleet.take() {
            f.stop().await;
        }
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

/// How often `STATUS=` is refreshed (and the health probes run) when no watchdog asks for
/// more often.
const STATUS_EVERY: Duration = Duration::from_secs(5);

/// Live CPUs, pending and running items. Takes the engine lock once.
fn status_line(engine: &Engine, view: &LiveView) -> String {
    let (mut pending, mut running) = (0, 0);
    for w in engine.workqueues() {
        pending += w.delayed + w.pending;
        running += w.running;
    }
    let live = view.current().live.clone();
    format!(
        "{} live CPUs ({live}), {pending} pending, {running} running",
        live.len()
    )
}

/// Applies the command-line flags on top of a config read from the file.
pub type Overrides = Box<dyn Fn(&mut Config) + Send + Sync>;

/// What [`run`] needs beyond the config: how to re-read it on SIGHUP, and what systemd handed
/// the process. `Default` is a plain foreground run with no reload source.
#[derive(Default)]
pub struct RunOptions {
    /// The file to re-read on SIGHUP (`None`: the same rule as at start, see
    /// [`Config::load`]).
    pub config_path: Option<PathBuf>,
    /// Applies the command-line flags on top of a re-read file, as at start.
    pub overrides: Option<Overrides>,
    /// Sets the log filter on reload; `None` when flags or `RUST_LOG` fixed it.
    pub log: Option<LogSetter>,
    /// The listener systemd passed (socket activation).
    pub activated: Option<std::os::unix::net::UnixListener>,
    /// Where to send `sd_notify` messages (`NOTIFY_SOCKET`).
    pub notify: Option<Notifier>,
    /// systemd's watchdog timeout (`WATCHDOG_USEC`); `WATCHDOG=1` goes out at half of it.
    pub watchdog: Option<Duration>,
}

/// Health as the watchdog sees it: the engine lock can be taken within a bound, and the
/// topology monitor keeps applying readings.
struct Probe {
    /// Written by the probe thread after each `status_line` (which takes the engine lock).
    last: parking_lot::Mutex<(std::time::Instant, String)>,
    /// The last reload's outcome ("reloaded (...)" or "reload refused: ..."), which every
    /// periodic `STATUS=` carries after the line, so `systemctl status` keeps showing it.
    reload: parking_lot::Mutex<Option<String>>,
    stop: std::sync::atomic::AtomicBool,
}

/// Starts the `wqd-sd-probe` thread: takes the engine lock every `period` and records when it
/// got it. A wedged engine leaves the record stale, which stops the watchdog pings. Holds only
/// weak references, so it never keeps the engine alive.
fn start_probe(
    engine: &Arc<Engine>,
    view: &Arc<LiveView>,
    period: Duration,
) -> io::Result<Arc<Probe>> {
    let probe = Arc::new(Probe {
        last: parking_lot::Mutex::new((std::time::Instant::now(), String::new())),
        reload: parking_lot::Mutex::new(None),
        stop: std::sync::atomic::AtomicBool::new(false),
    });
    let (p, e, v) = (probe.clone(), Arc::downgrade(engine), Arc::downgrade(view));
    std::thread::Builder::new()
        .name("wqd-sd-probe".into())
        .spawn(move || {
            while !p.stop.load(std::sync::atomic::Ordering::Acquire) {
                let (Some(engine), Some(view)) = (e.upgrade(), v.upgrade()) else {
                    return;
                };
                let line = status_line(&engine, &view);
                drop((engine, view));
                *p.last.lock() = (std::time::Instant::now(), line);
                std::thread::sleep(period);
            }
        })?;
    Ok(probe)
}

/// Sends `STATUS=` and, while healthy, `WATCHDOG=1` every `tick` until aborted.
async fn supervise(
    notify: Arc<Notifier>,
    probe: Arc<Probe>,
    view: Arc<LiveView>,
    watchdog: Option<Duration>,
    tick: Duration,
    rescan: Duration,
) {
    let events = |v: &LiveView| v.stats().iter().map(|(_, s)| s.events).sum::<u64>();
    // A monitor that applied no reading for this long is stuck (its rescan period, thrice, and
    // a read's worth of slack).
    let monitor_bound = rescan * 3 + Duration::from_secs(2);
    let engine_bound = watchdog.map_or(STATUS_EVERY * 2, |w| (w / 2).max(tick * 2));
    let mut seen = (events(&view), std::time::Instant::now());
    let mut warned = false;
    let mut every = tokio::time::interval(tick);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let now = std::time::Instant::now();
        let ev = events(&view);
        if ev != seen.0 {
            seen = (ev, now);
        }
        let (at, line) = probe.last.lock().clone();
        let problem = if now.duration_since(at) > engine_bound {
            Some(format!(
                "engine lock not taken for {:?}",
                now.duration_since(at)
            ))
        } else if now.duration_since(seen.1) > monitor_bound {
            Some(format!(
                "topology monitor applied no reading for {:?}",
                now.duration_since(seen.1)
            ))
        } else {
            None
        };
        match &problem {
            None => {
                if !line.is_empty() {
                    match probe.reload.lock().as_deref() {
                        Some(r) => notify.send(&format!("STATUS={line}; last reload: {r}")),
                        None => notify.send(&format!("STATUS={line}")),
                    }
                }
                if watchdog.is_some() {
                    notify.send("WATCHDOG=1");
                }
                warned = false;
            }
            Some(p) => {
                if !warned {
                    tracing::error!(
                        problem = %p,
                        "unhealthy: withholding the systemd watchdog ping"
                    );
                    warned = true;
                }
                notify.send(&format!("STATUS=unhealthy: {p}"));
            }
        }
    }
}

/// Re-reads the config (the file, then the flags on top) and reloads it into `daemon`,
/// logging and reporting the outcome (to systemd through `notify`, which [`run`] has taken out
/// of `opts`). Never stops the daemon.
async fn reload(
    daemon: &mut Daemon,
    opts: &RunOptions,
    notify: Option<&Notifier>,
    probe: Option<&Probe>,
) {
    if let Some(n) = notify {
        n.send(&crate::systemd::reloading_message());
    }
    let path = opts.config_path.clone();
    let loaded = tokio::task::spawn_blocking(move || Config::load(path.as_deref()))
        .await
        .unwrap_or_else(|e| {
            Err(ConfigError::Parse {
                origin: "reload".into(),
                message: e.to_string(),
            })
        });
    let outcome = loaded.map_err(ReloadError::from).and_then(|mut cfg| {
        if let Some(o) = &opts.overrides {
            o(&mut cfg);
        }
        daemon.reload(cfg, opts.log.as_ref())
    });
    let (status, last) = match outcome {
        Ok(plan) => {
            tracing::info!(changes = %plan.summary(), "config reloaded");
            let done = format!("reloaded ({})", plan.summary());
            (format!("{done}; {}", daemon.status_line()), done)
        }
        Err(e) => {
            tracing::error!(error = %e, "config reload refused; the running config stays in force");
            let refused = format!("reload refused: {e}");
            (refused.clone(), refused)
        }
    };
    if let Some(p) = probe {
        *p.reload.lock() = Some(last);
    }
    if let Some(n) = notify {
        n.send(&format!("READY=1\nSTATUS={status}"));
    }
}

/// Runs the daemon until SIGTERM or SIGINT, then shuts it down. `ready` is called once the
/// listeners are bound (the binary prints its "listening" lines there); `READY=1` follows.
/// SIGHUP reloads the config ([`Daemon::reload`]).
///
/// # Errors
/// As [`Daemon::start`], and a signal handler that cannot be installed (exit 1).
pub async fn run(
    cfg: Config,
    mut opts: RunOptions,
    ready: impl FnOnce(&Daemon),
) -> Result<(), DaemonError> {
    use tokio::signal::unix::{signal, SignalKind};
    let sig = |k| signal(k).map_err(DaemonError::Signal);
    let mut term = sig(SignalKind::terminate())?;
    let mut int = sig(SignalKind::interrupt())?;
    let mut hup = sig(SignalKind::hangup())?;
    let rescan = cfg.topology.rescan;
    let mut daemon = Daemon::start_with(cfg, opts.activated.take()).await?;
    ready(&daemon);
    let notify = opts.notify.take().map(Arc::new);
    let mut supervisor = None;
    let mut probe = None;
    if let Some(n) = &notify {
        let tick = opts
            .watchdog
            .map_or(STATUS_EVERY, |w| (w / 2).min(STATUS_EVERY));
        let p = start_probe(
            &daemon.engine,
            &daemon.rpc.view,
            (tick / 2).min(Duration::from_secs(1)),
        )
        .map_err(DaemonError::Probe)?;
        n.send(&format!("READY=1\nSTATUS={}", daemon.status_line()));
        supervisor = Some(tokio::spawn(supervise(
            n.clone(),
            p.clone(),
            daemon.rpc.view.clone(),
            opts.watchdog,
            tick,
            rescan,
        )));
        probe = Some(p);
        if let Some(w) = opts.watchdog {
            tracing::info!(timeout = ?w, "systemd watchdog on; pinging every {:?}", tick);
        }
    }
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM"); break; }
            _ = int.recv() => { tracing::info!("SIGINT"); break; }
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading the config");
                reload(&mut daemon, &opts, notify.as_deref(), probe.as_deref()).await;
            }
        }
    }
    if let Some(s) = supervisor {
        s.abort();
    }
    if let Some(p) = probe {
        p.stop.store(true, std::sync::atomic::Ordering::Release);
    }
    if let Some(n) = &notify {
        n.send(&format!(
            "STOPPING=1\nSTATUS=stopping: refusing new work, giving running items up to {:?}; {}",
            daemon.cfg.engine.shutdown_grace,
            daemon.status_line()
        ));
    }
    let cancelled = daemon.shutdown().await;
    if let Some(n) = &notify {
        n.send(&format!("STATUS=stopped; cancelled {cancelled} items"));
    }
    Ok(())
}
