//! The `[security]` section as written ([`SecurityConfig`], [`IdSpec`]) and the checks of it
//! that need no I/O ([`SecurityConfig::check`]).
//!
//! Owns: the file's keys and their defaults. Invariant: nothing here does I/O (users, groups
//! and files are [`super::resolve`]'s); a config [`SecurityConfig::check`] accepted has a
//! whole TLS identity or none, client certificates only with TLS, and no TCP listener that
//! would serve plaintext off loopback or let a local user around `allowed_uids`.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use crate::settings::{invalid, Invalid};

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
                    return Err(invalid(
                        "security.tcp_plaintext_loopback",
                        format!(
                            "listen.tcp {addr} would serve plaintext: set security.tls_cert and \
                             security.tls_key, or security.tcp_plaintext_loopback = true \
                             (loopback addresses only)"
                        ),
                    ));
                }
                if !tls && !loopback {
                    return Err(invalid(
                        "security.tcp_plaintext_loopback",
                        format!(
                            "allows plaintext on a loopback address only, and listen.tcp {addr} \
                             is not one: set security.tls_cert and security.tls_key"
                        ),
                    ));
                }
                if !loopback && !authenticated {
                    return Err(invalid(
                        "security.client_ca",
                        format!(
                            "listen.tcp {addr} is reachable from other hosts but asks no \
                             credentials: set security.client_ca and/or security.token_file"
                        ),
                    ));
                }
                if restricted && !authenticated {
                    return Err(invalid(
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
    pub(super) fn tls_files(&self) -> Result<Option<(&PathBuf, &PathBuf)>, Invalid> {
        let files = match (&self.tls_cert, &self.tls_key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            (Some(_), None) => {
                return Err(invalid(
                    "security.tls_key",
                    "security.tls_cert is set but its key is not",
                ))
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "security.tls_cert",
                    "security.tls_key is set but its certificate is not",
                ))
            }
        };
        if self.client_ca.is_some() && files.is_none() {
            return Err(invalid(
                "security.client_ca",
                "client certificates need TLS: set security.tls_cert and security.tls_key",
            ));
        }
        Ok(files)
    }
}
