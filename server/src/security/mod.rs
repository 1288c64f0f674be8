//! Who may talk to the daemon, and how: the `[security]` settings (`settings.rs`), their
//! resolution at start (`resolve.rs`), the method classes and the policy that decides on them
//! (`policy.rs`), and the [`Guard`] in front of both listeners (`guard.rs`). The peer identity
//! of a Unix connection is read at accept by [`crate::peer`] (below `crate::conn`, which
//! accepts the connections this module then guards) and re-exported here. See
//! `docs/security.md` for the model and every setting.
//!
//! Owns: [`SecurityError`], the layer's one error enum. Invariants (each file keeps its part):
//!
//! * Every request on every listener passes [`Guard`] first. A refused request is answered
//!   with a precise status — `PERMISSION_DENIED` naming the peer's uid (Unix socket), or
//!   `UNAUTHENTICATED` naming what is missing (TCP: client certificate, bearer token) — and
//!   never reaches a service, so nothing is queued, changed, cancelled or run.
//! * Methods are classified by explicit lists of the *non-mutating* ones ([`classify`]);
//!   everything else, including RPCs added later, counts as mutating (fail closed).
//! * Everything that can be wrong with the settings is found before anything is bound: what
//!   needs no I/O (half a TLS identity, plaintext TCP off loopback, an unauthenticated TCP
//!   listener that would bypass `allowed_uids`) by [`SecurityConfig::check`], which
//!   `Config::validate` runs; the rest (unknown users or groups, unreadable or mismatched
//!   certificate files, an empty token, exec commands that would run as root) by
//!   [`Security::resolve`], which the daemon runs once at start (and reload re-runs). The
//!   daemon exits 64 naming the key instead of starting with a weaker policy than written.
//! * Bearer tokens are held only as their SHA-256 and compared in constant time; they are
//!   never logged.

mod guard;
mod policy;
mod resolve;
mod settings;

use std::path::PathBuf;

pub use crate::peer::{PeerCred, PeerStream, UnixPeer};
pub use guard::{Guard, GuardFuture, GuardLayer, GuardedServer};
pub use policy::{classify, Class};
pub use resolve::{check_exec, lookup_group, lookup_user, Security};
pub use settings::{IdSpec, SecurityConfig};

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

impl From<crate::settings::Invalid> for SecurityError {
    fn from(e: crate::settings::Invalid) -> Self {
        SecurityError::Invalid {
            key: e.key,
            problem: e.problem,
        }
    }
}

fn invalid(key: impl Into<String>, problem: impl Into<String>) -> SecurityError {
    crate::settings::invalid(key, problem).into()
}
