//! Where the daemon listens: the default Unix socket path both `wqd` and `wqctl` use, and
//! the parsing of `unix:/path`, a bare path, or `http(s)://host:port`.
//!
//! Invariant: the default path is [`wqd_proto::socket::default_socket_path`], the one
//! definition the daemon uses too, so a daemon and a client started by the same user with no
//! flags always meet.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

pub use wqd_proto::socket::{default_socket_path, socket_path_for, SYSTEM_SOCKET_PATH};

use crate::error::ClientError;

/// A daemon address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A Unix domain socket.
    Unix(PathBuf),
    /// A TCP address, `http://host:port` or `https://host:port`.
    Http(String),
}

impl Default for Endpoint {
    /// The Unix socket at [`default_socket_path`].
    fn default() -> Self {
        Endpoint::Unix(default_socket_path())
    }
}

impl Endpoint {
    /// A Unix socket endpoint.
    pub fn unix(path: impl Into<PathBuf>) -> Self {
        Endpoint::Unix(path.into())
    }
}

impl FromStr for Endpoint {
    type Err = ClientError;

    /// Accepts `unix:/path`, `unix:///path`, an absolute or `./` path, `http://host:port`
    /// and `https://host:port`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = |why: &str| ClientError::InvalidEndpoint {
            endpoint: s.to_string(),
            reason: why.to_string(),
        };
        if let Some(rest) = s.strip_prefix("unix:") {
            let path = rest.strip_prefix("//").unwrap_or(rest);
            if path.is_empty() {
                return Err(invalid("empty socket path"));
            }
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        if s.starts_with("http://") || s.starts_with("https://") {
            let authority = s.split_once("://").map(|(_, a)| a).unwrap_or_default();
            if authority.trim_end_matches('/').is_empty() {
                return Err(invalid("missing host:port"));
            }
            return Ok(Endpoint::Http(s.to_string()));
        }
        if s.starts_with('/') || s.starts_with("./") || s.starts_with("../") {
            return Ok(Endpoint::Unix(PathBuf::from(s)));
        }
        Err(invalid(
            "expected unix:/path, a socket path, or http(s)://host:port",
        ))
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Http(u) => f.write_str(u),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_endpoints() {
        let e: Endpoint = "unix:/tmp/x.sock".parse().unwrap();
        assert_eq!(e, Endpoint::unix("/tmp/x.sock"));
        let e: Endpoint = "unix:///tmp/x.sock".parse().unwrap();
        assert_eq!(e, Endpoint::unix("/tmp/x.sock"));
        let e: Endpoint = "/tmp/x.sock".parse().unwrap();
        assert_eq!(e.to_string(), "unix:/tmp/x.sock");
        let e: Endpoint = "http://127.0.0.1:7070".parse().unwrap();
        assert_eq!(e, Endpoint::Http("http://127.0.0.1:7070".into()));
        assert!("https://h:1".parse::<Endpoint>().is_ok());
        assert!("unix:".parse::<Endpoint>().is_err());
        assert!("http://".parse::<Endpoint>().is_err());
        assert!("localhost:80".parse::<Endpoint>().is_err());
    }
}
