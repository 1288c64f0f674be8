//! Who may talk to the daemon, and how: the `[security]` settings, their resolution at load
//! time, the per-connection peer identity of the Unix socket, TLS for the TCP listener, and the
//! [`Guard`] that admits or refuses every request before any service sees it.
//!
//! Owns: [`SecurityConfig`] (the file section), [`Security`] (the resolved, checked form),
//! [`PeerStream`] (a Unix connection carrying its peer's credentials, read once at accept with
//! `SO_PEERCRED` and `SO_PEERGROUPS`; served wrapped in a [`crate::conn::Conn`], so requests
//! carry `ConnInfo<UnixPeer>`), and [`GuardLayer`]/[`Guard`] (the tower layer both
//! listeners' servers are built with). See `docs/security.md` for the model and every setting.
//!
//! Invariants:
//!
//! * Every request on every listener passes [`Guard`] first. A refused request is answered
//!   with a precise status — `PERMISSION_DENIED` naming the peer's uid (Unix socket), or
//!   `UNAUTHENTICATED` naming what is missing (TCP: client certificate, bearer token) — and
//!   never reaches a service, so nothing is queued, changed, cancelled or run.
//! * Methods are classified by explicit lists of the *non-mutating* ones ([`classify`]);
//!   everything else, including RPCs added later, counts as mutating (fail closed).
//! * Everything that can be wrong with the settings (unknown users or groups, unreadable or
//!   mismatched certificate files, an empty token, plaintext TCP off loopback, an
//!   unauthenticated TCP listener that would bypass `allowed_uids`) is found by
//!   [`Security::resolve`], which [`crate::config::Config::validate`] calls: the daemon exits
//!   64 naming the key instead of starting with a weaker policy than written.
//! * Bearer tokens are held only as their SHA-256 and compared in constant time; they are
//!   never logged.

use std::collections::BTreeSet;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use nix::unistd::{Gid, Group, User};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::UnixStream;
use tonic::codegen::http;
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo};
use tonic::transport::{Certificate, Server, ServerTlsConfig};
use tonic::Status;
use tower::layer::util::{Identity as NoLayer, Stack};
use tower::{Layer, Service};

use crate::conn::ConnInfo;
use crate::settings::{invalid as invalid_setting, Invalid};
use wqd_core::handler::exec::ExecConfig;

/// A user or group in the config: a number, or a name resolved when the config is loaded.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum IdSpec {
    Id(u32),
    Name(String),
}

impl std::fmt::Display for IdSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IdSpec::Id(n) => write!(f, "{n}"),
            IdSpec::Name(s) => write!(f, "{s:?}"),
        }
    }
}

/// `[security]`. Every key is optional; the defaults keep the Unix socket as the only door,
/// open to whoever the socket file's mode and group let in.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SecurityConfig {
    /// Give the socket file to this group at bind (name or gid). The daemon must be root or a
    /// member of the group.
    pub socket_group: Option<IdSpec>,
    /// Users (names or uids) allowed to make gated calls on the Unix socket. Empty together
    /// with `allowed_gids`: no restriction beyond the socket file's mode. uid 0 is always
    /// allowed.
    pub allowed_uids: Vec<IdSpec>,
    /// Groups (names or gids): a peer whose primary or supplementary group is listed is
    /// allowed.
    pub allowed_gids: Vec<IdSpec>,
    /// Whether observing calls (topology, stats, workqueue list, health, reflection) stay open
    /// to every peer that can connect when `allowed_uids`/`allowed_gids` restrict the rest.
    pub read_open: bool,
    /// Allow `listen.tcp` without TLS, on a loopback address only.
    pub tcp_plaintext_loopback: bool,
    /// PEM certificate chain of the TCP listener.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate(s): TCP clients must present a certificate it signed.
    pub client_ca: Option<PathBuf>,
    /// A file holding the bearer token TCP clients must send as `authorization: Bearer ...`.
    pub token_file: Option<PathBuf>,
    /// Allow `exec` commands to run as root (no `exec.run_as_user` while the daemon is root,
    /// or one that is uid 0). Off: such a config is refused.
    pub exec_as_root: bool,
}

impl Default for SecurityConfig {
    fn default() -> Self {
        Self {
            socket_group: None,
            allowed_uids: Vec::new(),
            allowed_gids: Vec::new(),
            read_open: true,
            tcp_plaintext_loopback: false,
            tls_cert: None,
            tls_key: None,
            client_ca: None,
            token_file: None,
            exec_as_root: false,
        }
    }
}

impl SecurityConfig {
    /// The checks that need no I/O: a TLS identity is whole, client certificates come with
    /// TLS, and the rules between these settings and the TCP listener `tcp` (`listen.tcp`;
    /// see `docs/security.md`). Returns the settings that are allowed but weaker than they may
    /// look, as warnings.
    ///
    /// # Errors
    /// [`Invalid`] naming the first key found wrong.
    pub fn check(&self, tcp: Option<SocketAddr>) -> Result<Vec<String>, Invalid> {
        let tls = self.tls_files()?.is_some();
        let mut warnings = Vec::new();
        let authenticated = self.client_ca.is_some() || self.token_file.is_some();
        let restricted = !self.allowed_uids.is_empty() || !self.allowed_gids.is_empty();
        match tcp {
            Some(addr) => {
                let loopback = addr.ip().is_loopback();
                if !tls && !self.tcp_plaintext_loopback {
                    return Err(invalid_setting(
                        "security.tcp_plaintext_loopback",
                        format!(
                            "listen.tcp {addr} would serve plaintext: set security.tls_cert and \
                             security.tls_key, or security.tcp_plaintext_loopback = true \
                             (loopback addresses only)"
                        ),
                    ));
                }
                if !tls && !loopback {
                    return Err(invalid_setting(
                        "security.tcp_plaintext_loopback",
                        format!(
                            "allows plaintext on a loopback address only, and listen.tcp {addr} \
                             is not one: set security.tls_cert and security.tls_key"
                        ),
                    ));
                }
                if !loopback && !authenticated {
                    return Err(invalid_setting(
                        "security.client_ca",
                        format!(
                            "listen.tcp {addr} is reachable from other hosts but asks no \
                             credentials: set security.client_ca and/or security.token_file"
                        ),
                    ));
                }
                if restricted && !authenticated {
                    return Err(invalid_setting(
                        "security.token_file",
                        format!(
                            "security.allowed_uids/allowed_gids restrict the Unix socket, but \
                             any local user could reach listen.tcp {addr} without credentials: \
                             set security.token_file or security.client_ca, or remove listen.tcp"
                        ),
                    ));
                }
                if !authenticated {
                    warnings.push(format!(
                        "listen.tcp {addr} asks no credentials: every local user can submit \
                         work through it (set security.token_file or security.client_ca)"
                    ));
                }
            }
            None => {
                if tls || self.token_file.is_some() {
                    warnings.push(
                        "security.tls_cert/client_ca/token_file apply to listen.tcp only, \
                         which is not set"
                            .to_string(),
                    );
                }
            }
        }
        if !self.read_open && !restricted {
            warnings.push(
                "security.read_open = false has no effect without security.allowed_uids or \
                 security.allowed_gids"
                    .to_string(),
            );
        }
        Ok(warnings)
    }

    /// The TLS certificate and key files, when both are set.
    ///
    /// # Errors
    /// [`Invalid`] when only one of them is, or `client_ca` is set without them.
    fn tls_files(&self) -> Result<Option<(&PathBuf, &PathBuf)>, Invalid> {
        let files = match (&self.tls_cert, &self.tls_key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            (Some(_), None) => {
                return Err(invalid_setting(
                    "security.tls_key",
                    "security.tls_cert is set but its key is not",
                ))
            }
            (None, Some(_)) => {
                return Err(invalid_setting(
                    "security.tls_cert",
                    "security.tls_key is set but its certificate is not",
                ))
            }
        };
        if self.client_ca.is_some() && files.is_none() {
            return Err(invalid_setting(
                "security.client_ca",
                "client certificates need TLS: set security.tls_cert and security.tls_key",
            ));
        }
        Ok(files)
    }
}

/// Errors of the security layer.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    /// A setting that cannot be honoured; `key` is the full config key.
    #[error("config key {key}: {problem}")]
    Invalid { key: String, problem: String },
    /// `socket_group` could not be applied to the bound socket.
    #[error("security.socket_group: cannot give the socket {} to group {group}: {source}", .path.display())]
    Chown {
        path: PathBuf,
        group: String,
        #[source]
        source: nix::Error,
    },
    /// The TLS acceptor could not be built at start (it was built once at load already).
    #[error("building the TLS listener: {0}")]
    Tls(String),
}

impl SecurityError {
    /// Whether this is a configuration error (exit 64) rather than a start failure (exit 1).
    pub fn is_config(&self) -> bool {
        matches!(self, SecurityError::Invalid { .. })
    }
}

impl From<Invalid> for SecurityError {
    fn from(e: Invalid) -> Self {
        SecurityError::Invalid {
            key: e.key,
            problem: e.problem,
        }
    }
}

fn invalid(key: impl Into<String>, problem: impl Into<String>) -> SecurityError {
    SecurityError::Invalid {
        key: key.into(),
        problem: problem.into(),
    }
}

/// A resolved group for `socket_group`.
#[derive(Debug, Clone)]
struct SocketGroup {
    name: String,
    gid: u32,
}

/// The checked, resolved `[security]` section. Immutable after [`Security::resolve`].
#[derive(Debug, Clone)]
pub struct Security {
    policy: Arc<Policy>,
    tls: Option<ServerTlsConfig>,
    socket_group: Option<SocketGroup>,
    /// Settings that are allowed but weaker than they look; logged at start.
    warnings: Vec<String>,
}

/// What the [`Guard`] enforces. Immutable; shared by every connection of both listeners.
#[derive(Clone)]
struct Policy {
    uids: BTreeSet<u32>,
    gids: BTreeSet<u32>,
    read_open: bool,
    /// TCP: a verified client certificate is required (`client_ca` set).
    client_cert: bool,
    /// TCP: SHA-256 of the bearer token.
    token: Option<[u8; 32]>,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("uids", &self.uids)
            .field("gids", &self.gids)
            .field("read_open", &self.read_open)
            .field("client_cert", &self.client_cert)
            .field("token", &self.token.map(|_| "<set>"))
            .finish()
    }
}

/// The servers of both listeners: tonic's, with the [`GuardLayer`] in front of every route
/// (inside whatever layers `L` the caller put first, such as the RPC metrics layer).
pub type GuardedServer<L = NoLayer> = Server<Stack<GuardLayer, L>>;

impl Security {
    /// Resolves names, reads and checks every file, builds the TLS acceptor once, applies the
    /// rules between the settings and the TCP listener `tcp` (`listen.tcp`; see
    /// [`SecurityConfig::check`] and `docs/security.md`), and refuses an `exec` allowlist that
    /// would run as root ([`check_exec`], against this process's effective uid). Does I/O:
    /// call it once at start (and on reload, to re-check), and pass the result on.
    ///
    /// # Errors
    /// [`SecurityError::Invalid`] naming the first key found wrong.
    pub fn resolve(
        cfg: &SecurityConfig,
        tcp: Option<SocketAddr>,
        exec: Option<&ExecConfig>,
    ) -> Result<Self, SecurityError> {
        let rule_warnings = cfg.check(tcp)?;
        let mut warnings = Vec::new();
        let uids = resolve_ids("security.allowed_uids", &cfg.allowed_uids, lookup_user)?;
        let gids = resolve_ids("security.allowed_gids", &cfg.allowed_gids, lookup_group)?;
        let socket_group = match &cfg.socket_group {
            Some(g) => {
                let gid = lookup_group(g).map_err(|e| invalid("security.socket_group", e))?;
                check_can_chown(g, gid)?;
                Some(SocketGroup {
                    name: g.to_string(),
                    gid,
                })
            }
            None => None,
        };
        let tls = match cfg.tls_files()? {
            Some((cert, key)) => {
                let identity = tonic::transport::Identity::from_pem(
                    read_file("security.tls_cert", cert)?,
                    read_file("security.tls_key", key)?,
                );
                let mut t = ServerTlsConfig::new().identity(identity);
                if let Some(ca) = &cfg.client_ca {
                    // Optional at the handshake so a client without a certificate gets a
                    // precise UNAUTHENTICATED from the guard instead of a bare TLS alert; a
                    // certificate that is presented must still verify against the CA.
                    t = t
                        .client_ca_root(Certificate::from_pem(read_file("security.client_ca", ca)?))
                        .client_auth_optional(true);
                }
                Server::builder().tls_config(t.clone()).map_err(|e| {
                    let key = if cfg.client_ca.is_some() && error_chain(&e).contains("root") {
                        "security.client_ca"
                    } else {
                        "security.tls_cert"
                    };
                    invalid(
                        key,
                        format!(
                            "cannot build TLS from {} and {}: {}",
                            cert.display(),
                            key_path(cfg).display(),
                            error_chain(&e)
                        ),
                    )
                })?;
                Some(t)
            }
            None => None,
        };
        let token = match &cfg.token_file {
            Some(p) => Some(read_token(p, &mut warnings)?),
            None => None,
        };
        warnings.extend(rule_warnings);
        check_exec(cfg, exec, nix::unistd::geteuid().as_raw())?;
        Ok(Security {
            policy: Arc::new(Policy {
                uids,
                gids,
                read_open: cfg.read_open,
                client_cert: cfg.client_ca.is_some(),
                token,
            }),
            tls,
            socket_group,
            warnings,
        })
    }

    /// The Unix listener's server: `base` (e.g. `Server::builder()` with outer layers) with
    /// the guard checking peer credentials.
    pub fn unix_server<L>(&self, base: Server<L>) -> GuardedServer<L> {
        base.layer(GuardLayer {
            policy: self.policy.clone(),
            door: Door::Unix,
        })
    }

    /// The TCP listener's server: TLS when configured (its handshake bounded by
    /// `handshake_timeout`, `listen.handshake_timeout`), the guard checking the client
    /// certificate and the bearer token.
    ///
    /// # Errors
    /// [`SecurityError::Tls`] if the acceptor cannot be built (it was built at load already).
    pub fn tcp_server<L>(
        &self,
        base: Server<L>,
        handshake_timeout: std::time::Duration,
    ) -> Result<GuardedServer<L>, SecurityError> {
        let mut s = base;
        if let Some(t) = &self.tls {
            s = s
                .tls_config(t.clone().timeout(handshake_timeout))
                .map_err(|e| SecurityError::Tls(error_chain(&e)))?;
        }
        Ok(s.layer(GuardLayer {
            policy: self.policy.clone(),
            door: Door::Tcp,
        }))
    }

    /// Whether the TCP listener serves TLS.
    pub fn tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Gives the bound socket file to `socket_group`, if set. Call right after binding.
    ///
    /// # Errors
    /// [`SecurityError::Chown`].
    pub fn chown_socket(&self, path: &Path) -> Result<(), SecurityError> {
        if let Some(g) = &self.socket_group {
            nix::unistd::chown(path, None, Some(Gid::from_raw(g.gid))).map_err(|source| {
                SecurityError::Chown {
                    path: path.to_path_buf(),
                    group: g.name.clone(),
                    source,
                }
            })?;
        }
        Ok(())
    }

    /// Logs the policy in force and every warning; called once at start.
    pub fn log_summary(&self) {
        let p = &self.policy;
        tracing::info!(
            socket_group = ?self.socket_group.as_ref().map(|g| g.gid),
            allowed_uids = ?p.uids,
            allowed_gids = ?p.gids,
            read_open = p.read_open,
            tls = self.tls.is_some(),
            client_cert = p.client_cert,
            token = p.token.is_some(),
            "security policy"
        );
        for w in &self.warnings {
            tracing::warn!("security: {w}");
        }
    }

    /// Settings that are allowed but weaker than they may look.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }
}

/// Refuses an `[exec]` allowlist whose commands would run as root — no `run_as_user` while
/// the daemon's effective uid (`euid`) is 0, or a `run_as_user` that is uid 0 — unless
/// `security.exec_as_root` says so.
///
/// # Errors
/// [`SecurityError::Invalid`] naming `exec.run_as_user`.
pub fn check_exec(
    sec: &SecurityConfig,
    exec: Option<&ExecConfig>,
    euid: u32,
) -> Result<(), SecurityError> {
    let Some(exec) = exec.filter(|e| !e.commands.is_empty()) else {
        return Ok(());
    };
    let uid = match &exec.run_as_user {
        // An unresolvable user is ExecConfig::validate's to report.
        Some(u) => lookup_user(&IdSpec::Name(u.clone())).unwrap_or(u32::MAX),
        None => euid,
    };
    if uid == 0 && !sec.exec_as_root {
        return Err(invalid(
            "exec.run_as_user",
            "exec commands would run as root: set exec.run_as_user (and run_as_group) to an \
             unprivileged user, or security.exec_as_root = true to accept it",
        ));
    }
    Ok(())
}

fn key_path(cfg: &SecurityConfig) -> PathBuf {
    cfg.tls_key.clone().unwrap_or_default()
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

fn read_file(key: &str, path: &Path) -> Result<Vec<u8>, SecurityError> {
    std::fs::read(path).map_err(|e| invalid(key, format!("cannot read {}: {e}", path.display())))
}

/// Reads the token: surrounding whitespace (a trailing newline) is dropped; the rest must be
/// non-empty visible ASCII. Returns its SHA-256.
fn read_token(path: &Path, warnings: &mut Vec<String>) -> Result<[u8; 32], SecurityError> {
    const KEY: &str = "security.token_file";
    let bytes = read_file(KEY, path)?;
    let token = bytes.trim_ascii();
    if token.is_empty() {
        return Err(invalid(KEY, format!("{} is empty", path.display())));
    }
    if !token.iter().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(
            KEY,
            format!(
                "the token in {} must be visible ASCII without spaces",
                path.display()
            ),
        ));
    }
    if token.len() < 16 {
        warnings.push(format!(
            "the token in {} is short ({} characters); use 32 or more random ones",
            path.display(),
            token.len()
        ));
    }
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o004 != 0 {
            warnings.push(format!(
                "{} is readable by every user; chmod o-r it",
                path.display()
            ));
        }
    }
    Ok(Sha256::digest(token).into())
}

pub(crate) fn lookup_user(id: &IdSpec) -> Result<u32, String> {
    match id {
        IdSpec::Id(n) => Ok(*n),
        IdSpec::Name(s) => match User::from_name(s) {
            Ok(Some(u)) => Ok(u.uid.as_raw()),
            Ok(None) => parse_id(s).ok_or_else(|| format!("no user {s:?}")),
            Err(e) => Err(format!("cannot look up user {s:?}: {e}")),
        },
    }
}

pub(crate) fn lookup_group(id: &IdSpec) -> Result<u32, String> {
    match id {
        IdSpec::Id(n) => Ok(*n),
        IdSpec::Name(s) => match Group::from_name(s) {
            Ok(Some(g)) => Ok(g.gid.as_raw()),
            Ok(None) => parse_id(s).ok_or_else(|| format!("no group {s:?}")),
            Err(e) => Err(format!("cannot look up group {s:?}: {e}")),
        },
    }
}

fn parse_id(s: &str) -> Option<u32> {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        s.parse().ok()
    } else {
        None
    }
}

fn resolve_ids(
    key: &str,
    ids: &[IdSpec],
    lookup: fn(&IdSpec) -> Result<u32, String>,
) -> Result<BTreeSet<u32>, SecurityError> {
    ids.iter()
        .enumerate()
        .map(|(i, id)| lookup(id).map_err(|e| invalid(format!("{key}[{i}]"), e)))
        .collect()
}

/// chown(2) to a group needs root (CAP_CHOWN) or membership; say so at load, not at bind.
fn check_can_chown(g: &IdSpec, gid: u32) -> Result<(), SecurityError> {
    let euid = nix::unistd::geteuid();
    if euid.is_root() || nix::unistd::getegid().as_raw() == gid {
        return Ok(());
    }
    let member = nix::unistd::getgroups()
        .map(|gs| gs.iter().any(|x| x.as_raw() == gid))
        .unwrap_or(false);
    if member {
        Ok(())
    } else {
        Err(invalid(
            "security.socket_group",
            format!(
                "the daemon (uid {euid}) is neither root nor a member of group {g} ({gid}), so \
                 it cannot give the socket to that group"
            ),
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// The peer of a Unix connection.

/// The credentials of a Unix socket peer at connect time, as the kernel reports them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCred {
    pub uid: u32,
    /// The primary (effective) group.
    pub gid: u32,
    pub pid: Option<i32>,
    /// Supplementary groups (`SO_PEERGROUPS`); empty if the kernel cannot tell.
    pub groups: Vec<u32>,
}

/// Connect info of a [`PeerStream`], found in every request's extensions. `None` when the
/// credentials could not be read (the guard then refuses every gated call).
#[derive(Debug, Clone)]
pub struct UnixPeer(pub Option<Arc<PeerCred>>);

/// A Unix connection with its peer's credentials, read once when it was accepted.
#[derive(Debug)]
pub struct PeerStream {
    io: UnixStream,
    peer: UnixPeer,
}

impl PeerStream {
    /// Reads the peer's credentials of an accepted connection.
    pub fn new(io: UnixStream) -> Self {
        let peer = match io.peer_cred() {
            Ok(c) => Some(Arc::new(PeerCred {
                uid: c.uid(),
                gid: c.gid(),
                pid: c.pid(),
                groups: peer_groups(io.as_raw_fd()).unwrap_or_default(),
            })),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the Unix peer's credentials (SO_PEERCRED)");
                None
            }
        };
        Self {
            io,
            peer: UnixPeer(peer),
        }
    }

    /// The peer's credentials, if they could be read.
    pub fn peer(&self) -> Option<&PeerCred> {
        self.peer.0.as_deref()
    }
}

/// `SO_PEERGROUPS` (Linux 4.13+): the peer's supplementary groups at connect time.
fn peer_groups(fd: RawFd) -> Option<Vec<u32>> {
    const GID: usize = std::mem::size_of::<libc::gid_t>();
    let mut buf: Vec<libc::gid_t> = vec![0; 64];
    // At most twice: the first ERANGE says how much room is needed.
    for _ in 0..2 {
        let mut len = (buf.len() * GID) as libc::socklen_t;
        // SAFETY: `buf` is valid for `len` bytes and outlives the call; `len` is a valid
        // socklen_t the kernel writes the needed or used size into.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                buf.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if r == 0 {
            buf.truncate(len as usize / GID);
            return Some(buf);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ERANGE) && len as usize > buf.len() * GID {
            buf.resize(len as usize / GID, 0);
            continue;
        }
        tracing::debug!(error = %e, "SO_PEERGROUPS unavailable; only the primary group counts");
        return None;
    }
    None
}

impl Connected for PeerStream {
    type ConnectInfo = UnixPeer;
    fn connect_info(&self) -> UnixPeer {
        self.peer.clone()
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

crate::shared::write_through!([] PeerStream, io);

// The daemon accepts Unix connections through `crate::conn::Incoming`, which wraps each
// `PeerStream` in a `crate::conn::Conn`: requests then carry `ConnInfo<UnixPeer>`.

// ---------------------------------------------------------------------------------------------
// Method classes.

/// What a method does, for the guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Changes state or runs work: submit, stream, cancel, drain, workqueue create/update/
    /// delete, and anything not listed below. Gated by `allowed_uids`/`allowed_gids`; logged
    /// with the peer at `info`.
    Mutating,
    /// Reads item results and outputs (Flush, GetResults). Gated like mutating calls, since
    /// outputs (of `exec`, say) may be sensitive; not logged at `info`.
    Results,
    /// Observes the machine and the daemon (topology, stats, workqueue list, worker list,
    /// health, reflection). Open when `read_open` (the default).
    Observe,
    /// Attaching a worker (`WorkerService/Attach`): not gated here; the worker service admits
    /// the peer by `[workers]` (which names it may serve), over either door.
    Worker,
}

const RESULTS: &[&str] = &[
    "/wqd.v1.DispatchService/Flush",
    "/wqd.v1.DispatchService/GetResults",
];
const OBSERVE: &[&str] = &[
    "/wqd.v1.TopologyService/GetTopology",
    "/wqd.v1.TopologyService/WatchTopology",
    "/wqd.v1.StatsService/GetStats",
    "/wqd.v1.WorkqueueService/ListWorkqueues",
    "/wqd.v1.WorkerService/ListWorkers",
];
const WORKER: &str = "/wqd.v1.WorkerService/Attach";
const OBSERVE_SERVICES: &[&str] = &[
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
];

/// The class of a request path (`/package.Service/Method`). Unknown paths are
/// [`Class::Mutating`].
pub fn classify(path: &str) -> Class {
    if path == WORKER {
        Class::Worker
    } else if RESULTS.contains(&path) {
        Class::Results
    } else if OBSERVE.contains(&path) || OBSERVE_SERVICES.iter().any(|s| path.starts_with(s)) {
        Class::Observe
    } else {
        Class::Mutating
    }
}

// ---------------------------------------------------------------------------------------------
// The guard.

/// Which listener a guard stands in front of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Door {
    Unix,
    Tcp,
}

impl Policy {
    fn restricted(&self) -> bool {
        !self.uids.is_empty() || !self.gids.is_empty()
    }

    /// Unix socket: `allowed_uids`/`allowed_gids` for gated classes; root always passes.
    #[allow(clippy::result_large_err)]
    fn check_unix(
        &self,
        peer: Option<&PeerCred>,
        class: Class,
        method: &str,
    ) -> Result<(), Status> {
        let gated = class == Class::Mutating
            || class == Class::Results
            || (class == Class::Observe && !self.read_open);
        if !gated || !self.restricted() {
            return Ok(());
        }
        let Some(p) = peer else {
            return Err(Status::permission_denied(format!(
                "{method}: the peer's credentials could not be read, and security.allowed_uids/\
                 allowed_gids restrict this call"
            )));
        };
        let allowed = p.uid == 0
            || self.uids.contains(&p.uid)
            || self.gids.contains(&p.gid)
            || p.groups.iter().any(|g| self.gids.contains(g));
        if allowed {
            Ok(())
        } else {
            Err(Status::permission_denied(format!(
                "uid {} (gid {}) may not call {method}: it is not in security.allowed_uids and \
                 none of its groups is in security.allowed_gids",
                p.uid, p.gid
            )))
        }
    }

    /// TCP: the client certificate when `client_ca` is set, then the bearer token when
    /// `token_file` is set. Applies to every call.
    #[allow(clippy::result_large_err)]
    fn check_tcp(
        &self,
        has_cert: bool,
        auth: Option<&http::HeaderValue>,
        method: &str,
    ) -> Result<(), Status> {
        if self.client_cert && !has_cert {
            return Err(Status::unauthenticated(format!(
                "{method}: this listener requires a client certificate signed by \
                 security.client_ca, and none was presented"
            )));
        }
        if let Some(want) = &self.token {
            let Some(v) = auth else {
                return Err(Status::unauthenticated(format!(
                    "{method}: missing `authorization: Bearer <token>` metadata (this listener \
                     requires the token of security.token_file)"
                )));
            };
            let presented = v
                .as_bytes()
                .split_once_space()
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case(b"bearer"))
                .map(|(_, t)| t.trim_ascii());
            let ok = presented.is_some_and(|t| ct_eq(&Sha256::digest(t).into(), want));
            if !ok {
                return Err(Status::unauthenticated(format!(
                    "{method}: wrong bearer token"
                )));
            }
        }
        Ok(())
    }
}

/// Splits `b"Scheme value"` at its first space.
trait SplitOnceSpace {
    fn split_once_space(&self) -> Option<(&[u8], &[u8])>;
}

impl SplitOnceSpace for [u8] {
    fn split_once_space(&self) -> Option<(&[u8], &[u8])> {
        let i = self.iter().position(|&b| b == b' ')?;
        Some((&self[..i], &self[i + 1..]))
    }
}

/// Constant-time equality of two digests: every byte is looked at, whatever differs first.
fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a
        .iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// The tower layer putting a [`Guard`] in front of every route of a listener.
#[derive(Debug, Clone)]
pub struct GuardLayer {
    policy: Arc<Policy>,
    door: Door,
}

impl<S> Layer<S> for GuardLayer {
    type Service = Guard<S>;
    fn layer(&self, inner: S) -> Guard<S> {
        Guard {
            inner,
            policy: self.policy.clone(),
            door: self.door,
        }
    }
}

/// Admits a request (and logs mutating calls with the peer), or answers it with the refusal
/// status without calling the inner service.
#[derive(Debug, Clone)]
pub struct Guard<S> {
    inner: S,
    policy: Arc<Policy>,
    door: Door,
}

/// The guard's future: the inner service's, or a ready refusal.
pub type GuardFuture<R, E> = Pin<Box<dyn Future<Output = Result<R, E>> + Send>>;

impl<S> Guard<S> {
    #[allow(clippy::result_large_err)]
    fn admit<B>(&self, req: &http::Request<B>) -> Result<(), Status> {
        let method = req.uri().path();
        let class = classify(method);
        match self.door {
            Door::Unix => {
                let peer = req
                    .extensions()
                    .get::<ConnInfo<UnixPeer>>()
                    .and_then(|c| c.peer.0.as_deref());
                let r = self.policy.check_unix(peer, class, method);
                let (uid, gid, pid) = match peer {
                    Some(p) => (Some(p.uid), Some(p.gid), p.pid),
                    None => (None, None, None),
                };
                match (&r, class) {
                    (Err(st), _) => tracing::warn!(
                        method, door = "unix", uid, gid, pid, code = ?st.code(), "refused"
                    ),
                    (Ok(()), Class::Mutating) => {
                        tracing::info!(method, door = "unix", uid, gid, pid, "mutating call")
                    }
                    (Ok(()), _) => tracing::debug!(method, door = "unix", uid, gid, pid, "call"),
                }
                r
            }
            Door::Tcp => {
                let ext = req.extensions();
                let (addr, certs): (Option<SocketAddr>, _) =
                    if let Some(t) = ext.get::<TlsConnectInfo<ConnInfo<TcpConnectInfo>>>() {
                        (t.get_ref().peer.remote_addr(), t.peer_certs())
                    } else {
                        (
                            ext.get::<ConnInfo<TcpConnectInfo>>()
                                .and_then(|t| t.peer.remote_addr()),
                            None,
                        )
                    };
                let cert = certs
                    .as_ref()
                    .and_then(|c| c.first())
                    .map(|c| hex::encode(&Sha256::digest(c.as_ref())[..8]));
                let r = self.policy.check_tcp(
                    cert.is_some(),
                    req.headers().get(http::header::AUTHORIZATION),
                    method,
                );
                let peer = addr.map(|a| a.to_string());
                match (&r, class) {
                    (Err(st), _) => tracing::warn!(
                        method, door = "tcp", peer, cert, code = ?st.code(), "refused"
                    ),
                    (Ok(()), Class::Mutating) => {
                        tracing::info!(method, door = "tcp", peer, cert, "mutating call")
                    }
                    (Ok(()), _) => tracing::debug!(method, door = "tcp", peer, cert, "call"),
                }
                r
            }
        }
    }
}

impl<S, B, R> Service<http::Request<B>> for Guard<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    R: Default + Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = GuardFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        match self.admit(&req) {
            Ok(()) => Box::pin(self.inner.call(req)),
            Err(st) => Box::pin(std::future::ready(Ok(st.into_http()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn policy(uids: &[u32], gids: &[u32], read_open: bool) -> Policy {
        Policy {
            uids: uids.iter().copied().collect(),
            gids: gids.iter().copied().collect(),
            read_open,
            client_cert: false,
            token: None,
        }
    }

    fn peer(uid: u32, gid: u32, groups: &[u32]) -> PeerCred {
        PeerCred {
            uid,
            gid,
            pid: Some(42),
            groups: groups.to_vec(),
        }
    }

    const SUBMIT: &str = "/wqd.v1.DispatchService/Submit";

    #[test]
    fn classes() {
        for m in [
            "Submit",
            "SubmitStream",
            "Cancel",
            "Drain",
            "NewRpcAddedLater",
        ] {
            let p = format!("/wqd.v1.DispatchService/{m}");
            assert_eq!(classify(&p), Class::Mutating, "{p}");
        }
        for m in ["CreateWorkqueue", "UpdateWorkqueue", "DeleteWorkqueue"] {
            let p = format!("/wqd.v1.WorkqueueService/{m}");
            assert_eq!(classify(&p), Class::Mutating, "{p}");
        }
        assert_eq!(classify("/wqd.v1.DispatchService/Flush"), Class::Results);
        assert_eq!(
            classify("/wqd.v1.DispatchService/GetResults"),
            Class::Results
        );
        assert_eq!(
            classify("/wqd.v1.WorkqueueService/ListWorkqueues"),
            Class::Observe
        );
        assert_eq!(classify("/grpc.health.v1.Health/Check"), Class::Observe);
        assert_eq!(classify("/grpc.health.v1.HealthX/Check"), Class::Mutating);
        assert_eq!(classify(""), Class::Mutating);
    }

    /// Every RPC of wqd.v1 is classified on purpose: a new one fails here until it is put in
    /// a list (or accepted as mutating).
    #[test]
    fn every_wqd_rpc_has_a_deliberate_class() {
        use prost::Message;
        let set = prost_types::FileDescriptorSet::decode(wqd_proto::FILE_DESCRIPTOR_SET).unwrap();
        let mut seen = Vec::new();
        for f in &set.file {
            for s in &f.service {
                for m in &s.method {
                    let path = format!("/{}.{}/{}", f.package(), s.name(), m.name());
                    seen.push((path.clone(), classify(&path)));
                }
            }
        }
        seen.sort_by(|a, b| a.0.cmp(&b.0));
        let mutating: Vec<_> = seen
            .iter()
            .filter(|(_, c)| *c == Class::Mutating)
            .map(|(p, _)| p.rsplit('/').next().unwrap_or_default())
            .collect();
        assert_eq!(
            mutating,
            [
                "Cancel",
                "Drain",
                "Submit",
                "SubmitStream",
                "CreateWorkqueue",
                "DeleteWorkqueue",
                "UpdateWorkqueue"
            ]
        );
        let worker: Vec<_> = seen
            .iter()
            .filter(|(_, c)| *c == Class::Worker)
            .map(|(p, _)| p.as_str())
            .collect();
        assert_eq!(worker, ["/wqd.v1.WorkerService/Attach"]);
        assert_eq!(
            classify("/wqd.v1.WorkerService/ListWorkers"),
            Class::Observe
        );
        assert_eq!(seen.len(), 15, "{seen:?}");
    }

    #[test]
    fn unrestricted_lets_everyone_in() {
        let p = policy(&[], &[], true);
        assert!(p
            .check_unix(Some(&peer(1000, 1000, &[])), Class::Mutating, SUBMIT)
            .is_ok());
        assert!(p.check_unix(None, Class::Mutating, SUBMIT).is_ok());
    }

    #[test]
    fn uids_gids_and_root() {
        let p = policy(&[1000], &[500], true);
        assert!(p
            .check_unix(Some(&peer(1000, 1000, &[])), Class::Mutating, SUBMIT)
            .is_ok());
        assert!(p
            .check_unix(Some(&peer(0, 0, &[])), Class::Mutating, SUBMIT)
            .is_ok());
        assert!(p
            .check_unix(Some(&peer(7, 500, &[])), Class::Mutating, SUBMIT)
            .is_ok());
        assert!(p
            .check_unix(Some(&peer(7, 7, &[3, 500])), Class::Results, SUBMIT)
            .is_ok());
        let e = p
            .check_unix(Some(&peer(1001, 1001, &[4])), Class::Mutating, SUBMIT)
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied);
        assert!(
            e.message()
                .starts_with("uid 1001 (gid 1001) may not call /wqd.v1.DispatchService/Submit"),
            "{}",
            e.message()
        );
        assert_eq!(
            p.check_unix(Some(&peer(1001, 1001, &[])), Class::Results, SUBMIT)
                .unwrap_err()
                .code(),
            Code::PermissionDenied
        );
        assert_eq!(
            p.check_unix(None, Class::Mutating, SUBMIT)
                .unwrap_err()
                .code(),
            Code::PermissionDenied
        );
        // Observing calls: open by default, gated when read_open = false.
        assert!(p
            .check_unix(Some(&peer(1001, 1001, &[])), Class::Observe, "x")
            .is_ok());
        let closed = policy(&[1000], &[], false);
        assert_eq!(
            closed
                .check_unix(Some(&peer(1001, 1001, &[])), Class::Observe, "x")
                .unwrap_err()
                .code(),
            Code::PermissionDenied
        );
    }

    #[test]
    fn tcp_cert_and_token() {
        let mut p = policy(&[], &[], true);
        p.client_cert = true;
        p.token = Some(Sha256::digest(b"s3cret-token-value").into());
        let hv = |s: &str| http::HeaderValue::from_str(s).unwrap();
        let e = p
            .check_tcp(false, Some(&hv("Bearer s3cret-token-value")), SUBMIT)
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated);
        assert!(
            e.message().contains("client certificate"),
            "{}",
            e.message()
        );
        assert!(p
            .check_tcp(true, Some(&hv("Bearer s3cret-token-value")), SUBMIT)
            .is_ok());
        assert!(p
            .check_tcp(true, Some(&hv("bearer s3cret-token-value")), SUBMIT)
            .is_ok());
        for bad in [
            "Bearer nope",
            "Basic s3cret-token-value",
            "s3cret-token-value",
            "Bearer ",
        ] {
            let e = p.check_tcp(true, Some(&hv(bad)), SUBMIT).unwrap_err();
            assert_eq!(e.code(), Code::Unauthenticated, "{bad}");
            assert!(e.message().contains("wrong bearer token"), "{bad}");
            assert!(!e.message().contains("s3cret"), "the token is never echoed");
        }
        let e = p.check_tcp(true, None, SUBMIT).unwrap_err();
        assert!(e.message().contains("missing"), "{}", e.message());
    }

    #[test]
    fn ct_eq_compares() {
        let a = [7u8; 32];
        let mut b = a;
        assert!(ct_eq(&a, &b));
        b[31] ^= 1;
        assert!(!ct_eq(&a, &b));
    }

    fn tcp(addr: Option<&str>) -> Option<SocketAddr> {
        addr.map(|t| t.parse().unwrap())
    }

    fn key_of<T: std::fmt::Debug>(r: Result<T, SecurityError>) -> String {
        match r {
            Err(SecurityError::Invalid { key, .. }) => key,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn tcp_rules() {
        let c = SecurityConfig::default();
        // No TCP: nothing to decide.
        assert!(Security::resolve(&c, tcp(None), None).is_ok());
        // Plain TCP needs the explicit loopback opt-in...
        assert_eq!(
            key_of(Security::resolve(&c, tcp(Some("127.0.0.1:0")), None)),
            "security.tcp_plaintext_loopback"
        );
        let plain = SecurityConfig {
            tcp_plaintext_loopback: true,
            ..SecurityConfig::default()
        };
        let s = Security::resolve(&plain, tcp(Some("127.0.0.1:0")), None).unwrap();
        assert_eq!(s.warnings().len(), 1, "{:?}", s.warnings());
        // ... which does not reach off loopback.
        assert_eq!(
            key_of(Security::resolve(&plain, tcp(Some("0.0.0.0:7070")), None)),
            "security.tcp_plaintext_loopback"
        );
        // Restricting the socket while loopback TCP asks nothing would be a bypass.
        let restricted = SecurityConfig {
            allowed_uids: vec![IdSpec::Id(1000)],
            ..plain.clone()
        };
        assert_eq!(
            key_of(Security::resolve(
                &restricted,
                tcp(Some("127.0.0.1:0")),
                None
            )),
            "security.token_file"
        );
        // Half a TLS identity, or a CA without TLS.
        let half = SecurityConfig {
            tls_cert: Some("/x.pem".into()),
            ..SecurityConfig::default()
        };
        assert_eq!(
            key_of(Security::resolve(&half, tcp(None), None)),
            "security.tls_key"
        );
        let ca = SecurityConfig {
            client_ca: Some("/ca.pem".into()),
            ..SecurityConfig::default()
        };
        assert_eq!(
            key_of(Security::resolve(&ca, tcp(None), None)),
            "security.client_ca"
        );
        let missing = SecurityConfig {
            tls_cert: Some("/nonexistent/cert.pem".into()),
            tls_key: Some("/nonexistent/key.pem".into()),
            ..SecurityConfig::default()
        };
        assert_eq!(
            key_of(Security::resolve(&missing, tcp(None), None)),
            "security.tls_cert"
        );
    }

    #[test]
    fn ids_resolve_or_name_the_entry() {
        let c = SecurityConfig {
            allowed_uids: vec![
                IdSpec::Name("root".into()),
                IdSpec::Id(4242),
                IdSpec::Name("777".into()),
            ],
            allowed_gids: vec![IdSpec::Name("root".into())],
            ..SecurityConfig::default()
        };
        let s = Security::resolve(&c, tcp(None), None).unwrap();
        assert_eq!(
            s.policy.uids.iter().copied().collect::<Vec<_>>(),
            [0, 777, 4242]
        );
        assert_eq!(s.policy.gids.iter().copied().collect::<Vec<_>>(), [0]);
        let bad = SecurityConfig {
            allowed_uids: vec![IdSpec::Id(1), IdSpec::Name("no-such-user-wqd".into())],
            ..SecurityConfig::default()
        };
        assert_eq!(
            key_of(Security::resolve(&bad, tcp(None), None)),
            "security.allowed_uids[1]"
        );
        let bad = SecurityConfig {
            socket_group: Some(IdSpec::Name("no-such-group-wqd".into())),
            ..SecurityConfig::default()
        };
        assert_eq!(
            key_of(Security::resolve(&bad, tcp(None), None)),
            "security.socket_group"
        );
    }

    #[test]
    fn exec_never_runs_as_root_by_accident() {
        let sec = SecurityConfig::default();
        let mut exec = ExecConfig::default();
        assert!(
            check_exec(&sec, Some(&exec), 0).is_ok(),
            "no commands, nothing runs"
        );
        exec.commands.insert(
            "true".into(),
            wqd_core::handler::exec::ExecCommand {
                path: "/bin/true".into(),
                ..Default::default()
            },
        );
        assert_eq!(key_of(check_exec(&sec, Some(&exec), 0)), "exec.run_as_user");
        assert!(check_exec(&sec, Some(&exec), 1000).is_ok());
        exec.run_as_user = Some("root".into());
        assert!(check_exec(&sec, Some(&exec), 1000).is_err());
        exec.run_as_user = Some("nobody".into());
        assert!(check_exec(&sec, Some(&exec), 0).is_ok());
        let hatch = SecurityConfig {
            exec_as_root: true,
            ..SecurityConfig::default()
        };
        exec.run_as_user = None;
        assert!(check_exec(&hatch, Some(&exec), 0).is_ok());
    }

    #[test]
    fn token_file_rules() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("token");
        let mut w = Vec::new();
        std::fs::write(&p, "\n").unwrap();
        assert!(read_token(&p, &mut w).is_err());
        std::fs::write(&p, "two words").unwrap();
        assert!(read_token(&p, &mut w).is_err());
        std::fs::write(&p, "0123456789abcdef0123\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let h = read_token(&p, &mut w).unwrap();
        assert_eq!(h, <[u8; 32]>::from(Sha256::digest(b"0123456789abcdef0123")));
        assert!(w.is_empty(), "{w:?}");
    }
}
