//! Where a daemon and its clients meet by default: the Unix socket path rule, shared by the
//! daemon (`wqd`) and every client (`wqd-client`, `wqctl`) so both sides read it from here.
//!
//! Invariant: [`default_socket_path`] is the single definition of the default path, so a
//! daemon and a client started by the same user with no flags always meet.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

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
}
