//! Resolution of `[security]`: user and group names to ids, the TLS material and the token
//! read from their files, the daemon's own uid — everything about the settings that needs
//! I/O — into the immutable [`Security`] the listeners are built from.
//!
//! Owns: [`Security`] and the name-service lookups ([`lookup_user`], [`lookup_group`], also
//! used for `[workers]`). Invariant: [`Security::resolve`] is the only place that reads the
//! security files or resolves names for it; it runs once at start, before anything is bound
//! (and again on reload, only to re-check), and its result is passed on, never re-read. A
//! [`Security`] that exists has passed every check, so the guard never starts with a weaker
//! policy than written.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::unistd::{Gid, Group, User};
use sha2::{Digest, Sha256};
use tonic::transport::{Certificate, Server, ServerTlsConfig};

use super::policy::Policy;
use super::{invalid, IdSpec, SecurityConfig, SecurityError};
use wqd_core::handler::exec::ExecConfig;

/// A resolved group for `socket_group`.
#[derive(Debug, Clone)]
struct SocketGroup {
    name: String,
    gid: u32,
}

/// The checked, resolved `[security]` section. Immutable after [`Security::resolve`].
#[derive(Debug, Clone)]
pub struct Security {
    pub(super) policy: Arc<Policy>,
    pub(super) tls: Option<ServerTlsConfig>,
    socket_group: Option<SocketGroup>,
    /// Settings that are allowed but weaker than they look; logged at start.
    warnings: Vec<String>,
}

impl Security {
    /// Resolves names, reads and checks every file, builds the TLS acceptor once, applies the
    /// rules between the settings and the TCP listener `tcp` (`listen.tcp`; see
    /// [`SecurityConfig::check`] and `docs/security.md`), resolves the `exec` allowlist's
    /// `run_as_user`/`run_as_group` and refuses one that would run as root ([`check_exec`],
    /// against this process's effective uid). Does I/O:
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
        if let Some(exec) = exec {
            // The lookups of `run_as_user`/`run_as_group` (`Config::validate` ran the pure part).
            exec.validate().map_err(|e| invalid("exec", e))?;
        }
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

pub(super) fn error_chain(e: &dyn std::error::Error) -> String {
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

pub fn lookup_user(id: &IdSpec) -> Result<u32, String> {
    match id {
        IdSpec::Id(n) => Ok(*n),
        IdSpec::Name(s) => match User::from_name(s) {
            Ok(Some(u)) => Ok(u.uid.as_raw()),
            Ok(None) => parse_id(s).ok_or_else(|| format!("no user {s:?}")),
            Err(e) => Err(format!("cannot look up user {s:?}: {e}")),
        },
    }
}

pub fn lookup_group(id: &IdSpec) -> Result<u32, String> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
