//! The fleet: this daemon as a member of a fleet of wqd daemons over NATS JetStream. Owns the
//! `[fleet]` config section ([`FleetConfig`], its pure [`FleetConfig::check`]), the one error
//! enum of the layer ([`FleetError`]) and the member ([`member::Member`]): the NATS client
//! task that publishes this host's record, consumes the items addressed to it and to `any`
//! member, runs them in the local engine and publishes their results.
//!
//! Invariant: a daemon whose config has no `[fleet]` section never opens a network
//! connection for the fleet — the daemon calls [`member::Member::start`] only when the section
//! is present. The protocol (subjects, acks, redelivery, de-duplication, the races and why
//! each is safe) is `README.md` beside this file; operators' view is `docs/fleet.md`.

pub mod member;

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::settings::{de_duration, invalid, Invalid};
use wqd_proto::fleet::{is_token, Names};

/// `[fleet]`: join a fleet. Absent: standalone (the default).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FleetConfig {
    /// NATS server URLs (`nats://host:4222`, `tls://host:4222`); at least one.
    pub servers: Vec<String>,
    /// This member's name in the fleet (`host=NAME`); default: the host name, with every
    /// character outside `[A-Za-z0-9_-]` replaced by `-`.
    pub host: Option<String>,
    /// A NATS credentials file (JWT and NKey seed, `.creds`).
    pub credentials_file: Option<PathBuf>,
    /// User and password authentication (both or neither).
    pub user: Option<String>,
    pub password: Option<String>,
    /// Token authentication (a file holding the token).
    pub token_file: Option<PathBuf>,
    /// PEM CA certificate(s) the servers' certificates must chain to (turns TLS on).
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate and key for servers that verify clients (both or neither).
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Refuse servers that do not offer TLS.
    pub tls_required: bool,
    /// Subject prefix of every fleet subject.
    pub prefix: String,
    /// The work stream (work-queue retention): items to members.
    pub work_stream: String,
    /// The results stream: results and batch manifests.
    pub results_stream: String,
    /// The KV bucket of host records.
    pub hosts_bucket: String,
    /// How long JetStream waits for an ack before it redelivers an item (a running item's
    /// member sends progress acks every `ack_wait / 3`).
    #[serde(deserialize_with = "de_duration")]
    pub ack_wait: Duration,
    /// Deliveries of one item at most; past it the item ends `failed`, with the reason.
    pub max_deliver: i64,
    /// How long an `any` item this member cannot place (no live CPU in its group) waits
    /// before it is delivered again, to another member if one can take it.
    #[serde(deserialize_with = "de_duration")]
    pub nak_delay: Duration,
    /// How long a host record lives without being refreshed (it is refreshed every ttl/3).
    #[serde(deserialize_with = "de_duration")]
    pub host_ttl: Duration,
    /// How long results (and batch manifests) are kept in the results stream.
    #[serde(deserialize_with = "de_duration")]
    pub results_max_age: Duration,
    /// Items one member holds unacked at most, per consumer (JetStream's max_ack_pending).
    pub max_in_flight: i64,
}

impl Default for FleetConfig {
    fn default() -> Self {
        let n = Names::default();
        FleetConfig {
            servers: Vec::new(),
            host: None,
            credentials_file: None,
            user: None,
            password: None,
            token_file: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            tls_required: false,
            prefix: n.prefix,
            work_stream: n.work_stream,
            results_stream: n.results_stream,
            hosts_bucket: n.hosts_bucket,
            ack_wait: Duration::from_secs(30),
            max_deliver: 5,
            nak_delay: Duration::from_secs(1),
            host_ttl: Duration::from_secs(15),
            results_max_age: Duration::from_secs(24 * 3600),
            max_in_flight: 1024,
        }
    }
}

impl FleetConfig {
    /// The fleet's names on NATS.
    pub fn names(&self) -> Names {
        Names {
            prefix: self.prefix.clone(),
            work_stream: self.work_stream.clone(),
            results_stream: self.results_stream.clone(),
            hosts_bucket: self.hosts_bucket.clone(),
        }
    }

    /// Everything that needs no I/O: URLs, names, pairs that go together, one authentication
    /// method, durations and bounds.
    ///
    /// # Errors
    /// [`Invalid`] naming the `fleet.` key.
    pub fn check(&self) -> Result<(), Invalid> {
        if self.servers.is_empty() {
            return Err(invalid(
                "fleet.servers",
                "names no server (e.g. servers = [\"nats://127.0.0.1:4222\"])",
            ));
        }
        for (i, s) in self.servers.iter().enumerate() {
            let ok = ["nats://", "tls://"]
                .iter()
                .any(|p| s.strip_prefix(p).is_some_and(|rest| !rest.is_empty()));
            if !ok || s.parse::<async_nats::ServerAddr>().is_err() {
                return Err(invalid(
                    format!("fleet.servers[{i}]"),
                    format!("{s:?} is not a nats:// or tls:// URL with a host"),
                ));
            }
        }
        if let Some(h) = &self.host {
            if !is_token(h) {
                return Err(invalid(
                    "fleet.host",
                    format!("{h:?} is not a name of [A-Za-z0-9_-] (1-64 bytes)"),
                ));
            }
        }
        if let Some((k, problem)) = self.names().problem() {
            return Err(invalid(format!("fleet.{k}"), problem));
        }
        if self.user.is_some() != self.password.is_some() {
            return Err(invalid(
                if self.user.is_some() {
                    "fleet.password"
                } else {
                    "fleet.user"
                },
                "user and password go together",
            ));
        }
        let methods = [
            self.credentials_file.is_some(),
            self.user.is_some(),
            self.token_file.is_some(),
        ]
        .iter()
        .filter(|m| **m)
        .count();
        if methods > 1 {
            return Err(invalid(
                "fleet",
                "credentials_file, user/password and token_file are three ways to authenticate: give one",
            ));
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(invalid(
                if self.tls_cert.is_some() {
                    "fleet.tls_key"
                } else {
                    "fleet.tls_cert"
                },
                "tls_cert and tls_key go together",
            ));
        }
        for (k, d, min) in [
            ("ack_wait", self.ack_wait, Duration::from_secs(1)),
            ("nak_delay", self.nak_delay, Duration::from_millis(10)),
            ("host_ttl", self.host_ttl, Duration::from_secs(1)),
            (
                "results_max_age",
                self.results_max_age,
                Duration::from_secs(60),
            ),
        ] {
            if d < min {
                return Err(invalid(
                    format!("fleet.{k}"),
                    format!("{d:?} is too short (at least {min:?})"),
                ));
            }
        }
        if self.max_deliver < 1 {
            return Err(invalid("fleet.max_deliver", "must be at least 1"));
        }
        if self.max_in_flight < 1 {
            return Err(invalid("fleet.max_in_flight", "must be at least 1"));
        }
        Ok(())
    }
}

/// This host's default member name: the host name with every character outside
/// `[A-Za-z0-9_-]` replaced by `-`, cut to 64 bytes.
pub fn default_host_name(hostname: &str) -> String {
    hostname
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect()
}

/// Errors of the fleet layer. Only start-up ones reach the daemon; once running, the member
/// logs what fails and retries.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("fleet: reading {what} {}: {source}", .path.display())]
    File {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("fleet: cannot find this host's name ({0}); set fleet.host")]
    HostName(String),
    #[error("fleet: connecting to NATS: {0}")]
    Connect(String),
    #[error("fleet: JetStream: {0}")]
    JetStream(String),
    #[error("fleet: the engine refused the item: {0}")]
    Engine(String),
}

impl FleetError {
    /// Whether the operator's config is at fault (exit 64).
    pub fn is_config(&self) -> bool {
        matches!(self, FleetError::File { .. } | FleetError::HostName(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(t: &str) -> Result<FleetConfig, String> {
        let c: FleetConfig = toml::from_str(t).map_err(|e| e.to_string())?;
        c.check().map_err(|e| e.to_string())?;
        Ok(c)
    }

    #[test]
    fn minimal_section_takes_the_defaults() {
        let c = parse("servers = [\"nats://127.0.0.1:4222\"]").unwrap();
        assert_eq!(c.ack_wait, Duration::from_secs(30));
        assert_eq!(c.max_deliver, 5);
        assert_eq!(c.names(), Names::default());
        assert_eq!(c.host, None);
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("", "fleet.servers"),
            ("servers = [\"http://x:1\"]", "fleet.servers[0]"),
            ("servers = [\"nats://\"]", "fleet.servers[0]"),
            ("servers = [\"nats://a:1\"]\nhost = \"a.b\"", "fleet.host"),
            ("servers = [\"nats://a:1\"]\nuser = \"u\"", "fleet.password"),
            ("servers = [\"nats://a:1\"]\npassword = \"p\"", "fleet.user"),
            (
                "servers = [\"nats://a:1\"]\nuser = \"u\"\npassword = \"p\"\ntoken_file = \"/t\"",
                "give one",
            ),
            (
                "servers = [\"nats://a:1\"]\ntls_cert = \"/c\"",
                "fleet.tls_key",
            ),
            (
                "servers = [\"nats://a:1\"]\nack_wait = \"10ms\"",
                "fleet.ack_wait",
            ),
            (
                "servers = [\"nats://a:1\"]\nmax_deliver = 0",
                "fleet.max_deliver",
            ),
            (
                "servers = [\"nats://a:1\"]\nwork_stream = \"a b\"",
                "fleet.work_stream",
            ),
            (
                "servers = [\"nats://a:1\"]\nprefix = \"a.*\"",
                "fleet.prefix",
            ),
            (
                "servers = [\"nats://a:1\"]\nmax_in_flight = 0",
                "fleet.max_in_flight",
            ),
            ("servers = [\"nats://a:1\"]\nbogus = 1", "bogus"),
        ];
        for (t, key) in cases {
            let e = parse(t).expect_err(t);
            assert!(e.contains(key), "{t:?}: {e}");
        }
    }

    #[test]
    fn default_host_names_are_tokens() {
        assert_eq!(
            default_host_name("web-12.example.com"),
            "web-12-example-com"
        );
        assert!(is_token(&default_host_name("a b/c")));
    }
}
