//! `[listen]`: where the gRPC listeners are (the Unix socket, the optional TCP address) and
//! what each connection may do (how many at once, how long its handshake and idle time may
//! be, keepalives, the `:authority` rewrite), with their pure checks and the conversion into
//! [`ConnSettings`].
//!
//! Owns: [`ListenConfig`] and [`KEEPALIVE_TIMEOUT`]. Invariant: a [`ListenConfig`] that
//! [`ListenConfig::check`] accepted binds and serves as written (apart from the connection cap,
//! which the daemon lowers to what RLIMIT_NOFILE leaves; see [`crate::conn`]); the check does
//! no I/O. Binding is the daemon's.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::conn::ConnSettings;
use crate::settings::{de_duration, invalid, Invalid};

/// How long a keepalive PING may go unanswered (`listen.keepalive_interval`).
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// `[listen]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ListenConfig {
    /// The Unix socket; default `wqd_proto::socket::default_socket_path()`.
    pub socket: Option<PathBuf>,
    /// Permission bits of the socket file (TOML `0o660` or the string `"0660"`).
    #[serde(deserialize_with = "de_mode")]
    pub socket_mode: u32,
    /// An optional TCP listener, e.g. `127.0.0.1:7070` (port 0 picks a free port).
    pub tcp: Option<SocketAddr>,
    /// Allow `tcp` on a non-loopback address.
    pub allow_remote: bool,
    /// Open connections per listener at most; more are accepted and closed at once. Lowered
    /// at start when RLIMIT_NOFILE leaves less room (see `crate::conn`).
    pub max_connections: usize,
    /// A connection must finish its handshake (TLS, then the HTTP/2 preface) this soon.
    #[serde(deserialize_with = "de_duration")]
    pub handshake_timeout: Duration,
    /// A connection without an open request for this long is closed (0 = never).
    #[serde(deserialize_with = "de_duration")]
    pub idle_timeout: Duration,
    /// HTTP/2 PING every this long on each connection; a peer that does not answer within
    /// [`KEEPALIVE_TIMEOUT`] is dropped, even with a stream open (0 = no pings).
    #[serde(deserialize_with = "de_duration")]
    pub keepalive_interval: Duration,
    /// Rewrite the `:authority` values hyper's h2 refuses (the socket path that grpcio, grpc-java
    /// and grpc-swift send) on the Unix socket; see `crate::authority`.
    pub rewrite_authority: bool,
    /// Threads serving the gRPC API (decoding, encoding, the engine calls of requests); 0 =
    /// [`ListenConfig::rpc_threads_in_force`]'s rule. Read by the `wqd` binary before its
    /// runtime starts.
    pub rpc_threads: usize,
}

/// Most RPC threads `listen.rpc_threads` may ask for.
pub const MAX_RPC_THREADS: usize = 256;

impl Default for ListenConfig {
    fn default() -> Self {
        Self {
            socket: None,
            socket_mode: 0o660,
            tcp: None,
            allow_remote: false,
            max_connections: 1024,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            keepalive_interval: Duration::from_secs(60),
            rewrite_authority: true,
            rpc_threads: 0,
        }
    }
}

impl ListenConfig {
    /// The socket path in force.
    pub fn socket_path(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(wqd_proto::socket::default_socket_path)
    }

    /// The RPC threads to start: `rpc_threads`, or when 0 one per four of the `cpus` this
    /// process may run on, at least one. They share those CPUs with the engine's workers, one
    /// pinned per CPU, which run the items: on a 2-CPU host a second RPC thread only competes
    /// with them (one client's `Submit(wait)` of 100 items ran about 8% faster with one,
    /// docs/benchmarks.md, session 17).
    pub fn rpc_threads_in_force(&self, cpus: usize) -> usize {
        match self.rpc_threads {
            0 => (cpus / 4).clamp(1, MAX_RPC_THREADS),
            n => n,
        }
    }

    /// The HTTP/2 keepalive interval, `None` when off.
    pub fn keepalive(&self) -> Option<Duration> {
        (!self.keepalive_interval.is_zero()).then_some(self.keepalive_interval)
    }

    /// One listener's connection settings: at most `max` connections (the configured cap,
    /// lowered to the fd budget), `tls` when its connections carry TLS.
    pub fn conn_settings(&self, max: usize, tls: bool) -> ConnSettings {
        ConnSettings {
            max_connections: max,
            handshake_timeout: self.handshake_timeout,
            idle_timeout: (!self.idle_timeout.is_zero()).then_some(self.idle_timeout),
            tls,
            rewrite_authority: self.rewrite_authority,
        }
    }

    /// Checks what the types cannot. Pure.
    ///
    /// # Errors
    /// The first [`Invalid`] found, naming its `listen.` key.
    pub fn check(&self) -> Result<(), Invalid> {
        if self.socket_mode > 0o777 {
            return Err(invalid(
                "listen.socket_mode",
                format!(
                    "{:o} is not a permission mode (at most 0777)",
                    self.socket_mode
                ),
            ));
        }
        if self.rpc_threads > MAX_RPC_THREADS {
            return Err(invalid(
                "listen.rpc_threads",
                format!(
                    "{} is more than {MAX_RPC_THREADS} (0 picks one per four CPUs)",
                    self.rpc_threads
                ),
            ));
        }
        if let Some(p) = &self.socket {
            if p.as_os_str().is_empty() {
                return Err(invalid("listen.socket", "empty path"));
            }
        }
        if let Some(addr) = self.tcp {
            if !addr.ip().is_loopback() && !self.allow_remote {
                return Err(invalid(
                    "listen.tcp",
                    format!("{addr} is not a loopback address; set listen.allow_remote = true (or pass --allow-remote) to listen on it"),
                ));
            }
        }
        if self.max_connections == 0 {
            return Err(invalid("listen.max_connections", "must be at least 1"));
        }
        let ms10 = Duration::from_millis(10);
        if self.handshake_timeout < ms10 {
            return Err(invalid(
                "listen.handshake_timeout",
                format!(
                    "{:?} is too short (at least 10ms; it cannot be off)",
                    self.handshake_timeout
                ),
            ));
        }
        for (key, d) in [
            ("listen.idle_timeout", self.idle_timeout),
            ("listen.keepalive_interval", self.keepalive_interval),
        ] {
            if !d.is_zero() && d < ms10 {
                return Err(invalid(
                    key,
                    format!("{d:?} is too short (at least 10ms, or \"0s\" for off)"),
                ));
            }
        }
        // Under TLS the idle clock starts at accept (see crate::conn): a shorter idle timeout
        // would cut handshakes short.
        if !self.idle_timeout.is_zero() && self.idle_timeout < self.handshake_timeout {
            return Err(invalid(
                "listen.idle_timeout",
                format!(
                    "{:?} is shorter than listen.handshake_timeout ({:?}); use at least that, or \"0s\" for off",
                    self.idle_timeout, self.handshake_timeout
                ),
            ));
        }
        Ok(())
    }
}

fn de_mode<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Mode {
        Int(u32),
        Str(String),
    }
    match Mode::deserialize(d)? {
        Mode::Int(m) => Ok(m),
        Mode::Str(s) => parse_mode(&s).map_err(serde::de::Error::custom),
    }
}

/// Parses an octal mode such as `0660` or `0o660`.
pub fn parse_mode(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let digits = t.strip_prefix("0o").unwrap_or(t);
    u32::from_str_radix(digits, 8).map_err(|_| format!("bad octal mode {s:?} (e.g. \"0660\")"))
}
