//! Where the daemon listens: the default Unix socket path both `wqd` and `wqctl` use, and
//! the parsing of `unix:/path`, a bare path, or `http(s)://host:port`.
//!
//! Invariant: [`default_socket_path`] is the single definition of the default path; the
//! daemon calls it too, so a daemon and a client started by the same user with no flags
//! always meet.

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::error::ClientError;

/// Socket file name under the runtime directory.
const SOCKET_DIR: &str = "wqd";
const SOCKET_FILE: &str = "wqd.sock";
/// The system-wide path, used by root (systemd) and when no user runtime dir is known.
pub const SYSTEM_SOCKET_PATH: &str = "/run/wqd/wqd.sock";

/// The default socket path: `$XDG_RUNTIME_DIR/wqd/wqd.sock` for a non-root user whose
/// `XDG_RUNTIME_DIR` is set (to an absolute path), otherwise `/run/wqd/wqd.sock`.
pub fn default_socket_path() -> PathBuf {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    socket_path_for(root, std::env::var_os("XDG_RUNTIME_DIR"))
}

/// The rule behind [`default_socket_path`], with its inputs passed in (for tests).
pub fn socket_path_for(is_root: bool, xdg_runtime_dir: Option<OsString>) -> PathBuf {
    match xdg_runtime_dir {
        Some(dir) if !is_root && Path::new(&dir).is_absolute() => {
            PathBuf::from(dir).join(SOCKET_DIR).join(SOCKET_FILE)
        }
        _ => PathBuf::from(SYSTEM_SOCKET_PATH),
    }
}

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
    fn default_path_rule() {
        let xdg = Some(OsString::from("/run/user/1000"));
        assert_eq!(
            socket_path_for(false, xdg.clone()),
            PathBuf::from("/run/user/1000/wqd/wqd.sock")
        );
        assert_eq!(
            socket_path_for(true, xdg),
            PathBuf::from(SYSTEM_SOCKET_PATH)
        );
        assert_eq!(
            socket_path_for(false, None),
            PathBuf::from(SYSTEM_SOCKET_PATH)
        );
        assert_eq!(
            socket_path_for(false, Some(OsString::from("relative"))),
            PathBuf::from(SYSTEM_SOCKET_PATH)
        );
        assert_eq!(
            socket_path_for(false, Some(OsString::new())),
            PathBuf::from(SYSTEM_SOCKET_PATH)
        );
    }

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
