//! The systemd side of the daemon: the `sd_notify` protocol (readiness, status, watchdog,
//! reload and stop notices) and socket activation (`LISTEN_FDS`), both written here in a few
//! lines instead of pulling in libsystemd.
//!
//! Owns: the notify datagram socket and the parsing of systemd's environment variables.
//! Invariants:
//!
//! * Without `NOTIFY_SOCKET` nothing is sent and nothing fails: a daemon started by hand or by
//!   a test behaves exactly as before.
//! * A passed listener is used only when `LISTEN_PID` is this process and the fd is a
//!   listening `AF_UNIX` stream socket; the variables are removed from the environment once
//!   read (as `sd_listen_fds(1)` does), so no child ever sees them.
//!
//! The protocol (`man sd_notify`): each message is one datagram of newline-separated
//! `KEY=VALUE` lines sent to the socket named by `NOTIFY_SOCKET` (a path, or an abstract
//! name when it starts with `@`). wqd sends `READY=1` once its listeners accept, `STATUS=...`
//! every few seconds, `WATCHDOG=1` every half `WATCHDOG_USEC` while its probes pass,
//! `RELOADING=1` + `MONOTONIC_USEC=...` / `READY=1` around a SIGHUP reload, and `STOPPING=1`
//! on SIGTERM.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixListener};
use std::time::Duration;

/// The first fd systemd passes (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;

/// Errors of socket activation. A daemon given a bad socket exits 1.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    #[error("LISTEN_FDS={0:?} is not a number of file descriptors")]
    BadCount(String),
    #[error("LISTEN_PID={0:?} is not a process id")]
    BadPid(String),
    #[error("fd {fd} passed by systemd: {problem}")]
    BadSocket { fd: RawFd, problem: String },
}

/// Where to send notifications: the socket named by `NOTIFY_SOCKET`.
#[derive(Debug)]
pub struct Notifier {
    sock: UnixDatagram,
    addr: SocketAddr,
    name: String,
}

impl Notifier {
    /// The notifier for `NOTIFY_SOCKET`, or `None` when it is unset or empty.
    ///
    /// # Errors
    /// The socket cannot be created or the name is not a valid address.
    pub fn from_env() -> io::Result<Option<Notifier>> {
        match std::env::var("NOTIFY_SOCKET") {
            Ok(s) if !s.is_empty() => Notifier::new(&s).map(Some),
            _ => Ok(None),
        }
    }

    /// A notifier sending to `name`: a socket path, or `@name` for the abstract namespace.
    ///
    /// # Errors
    /// As [`from_env`](Self::from_env).
    pub fn new(name: &str) -> io::Result<Notifier> {
        let addr = match name.strip_prefix('@') {
            Some(abs) => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(abs.as_bytes())?
            }
            None => SocketAddr::from_pathname(name)?,
        };
        let sock = UnixDatagram::unbound()?;
        sock.set_nonblocking(true)?;
        Ok(Notifier {
            sock,
            addr,
            name: name.to_string(),
        })
    }

    /// Sends one message (newline-separated `KEY=VALUE` lines). Never blocks.
    ///
    /// # Errors
    /// The send failed (systemd gone, socket buffer full); callers log and carry on.
    pub fn notify(&self, msg: &str) -> io::Result<()> {
        self.sock
            .send_to_addr(msg.as_bytes(), &self.addr)
            .map(|_| ())
    }

    /// Sends `msg`, logging a failure at debug level (notifications are best effort).
    pub fn send(&self, msg: &str) {
        if let Err(e) = self.notify(msg) {
            tracing::debug!(socket = %self.name, error = %e, msg, "sd_notify failed");
        }
    }
}

/// `READY=1` after a reload, `RELOADING=1` with the monotonic clock before it.
pub fn reloading_message() -> String {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000)
        .unwrap_or(0);
    format!("RELOADING=1\nMONOTONIC_USEC={ts}")
}

/// The watchdog timeout systemd enforces, from `WATCHDOG_USEC` (and `WATCHDOG_PID`, when
/// set, must be `pid`). `None` when the watchdog is off or meant for another process.
pub fn watchdog_timeout(usec: Option<&str>, wpid: Option<&str>, pid: u32) -> Option<Duration> {
    if let Some(p) = wpid {
        if p.trim().parse::<u32>().ok() != Some(pid) {
            return None;
        }
    }
    let us: u64 = usec?.trim().parse().ok()?;
    (us > 0).then(|| Duration::from_micros(us))
}

/// [`watchdog_timeout`] from this process's environment.
pub fn watchdog_from_env() -> Option<Duration> {
    watchdog_timeout(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

/// How many fds systemd passed to `pid`: 0 when `LISTEN_PID` names another process or the
/// variables are absent.
///
/// # Errors
/// Malformed values.
pub fn listen_fds_count(
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    pid: u32,
) -> Result<usize, ActivationError> {
    let (Some(p), Some(n)) = (listen_pid, listen_fds) else {
        return Ok(0);
    };
    let p: u32 = p
        .trim()
        .parse()
        .map_err(|_| ActivationError::BadPid(p.to_string()))?;
    if p != pid {
        return Ok(0);
    }
    n.trim()
        .parse()
        .map_err(|_| ActivationError::BadCount(n.to_string()))
}

/// Takes the Unix listener systemd passed (fd 3), if any, and removes `LISTEN_PID`,
/// `LISTEN_FDS` and `LISTEN_FDNAMES` from the environment. Call it from `main` before any
/// thread starts (it edits the environment). Extra fds beyond the first are closed with a
/// warning: wqd.socket passes exactly one.
///
/// # Errors
/// Malformed variables, or fd 3 is not a listening `AF_UNIX` stream socket.
pub fn take_listener() -> Result<Option<UnixListener>, ActivationError> {
    let n = listen_fds_count(
        std::env::var("LISTEN_PID").ok().as_deref(),
        std::env::var("LISTEN_FDS").ok().as_deref(),
        std::process::id(),
    );
    for k in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(k);
    }
    let n = n?;
    if n == 0 {
        return Ok(None);
    }
    for extra in 1..n {
        let fd = LISTEN_FDS_START + extra as RawFd;
        tracing::warn!(
            fd,
            "systemd passed more than one socket; closing the extra one"
        );
        // SAFETY: systemd passed this fd to us and nothing else in the process owns it.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    // SAFETY: as above, for fd 3; it is owned from here on.
    let fd = unsafe { OwnedFd::from_raw_fd(LISTEN_FDS_START) };
    check_listener(&fd)?;
    let l = UnixListener::from(fd);
    l.set_nonblocking(true)
        .map_err(|e| bad(format!("making it non-blocking: {e}")))?;
    Ok(Some(l))
}

fn bad(problem: String) -> ActivationError {
    ActivationError::BadSocket {
        fd: LISTEN_FDS_START,
        problem,
    }
}

/// Checks that `fd` is a listening `AF_UNIX` stream socket, and marks it close-on-exec.
fn check_listener(fd: &OwnedFd) -> Result<(), ActivationError> {
    use nix::sys::socket::{getsockname, getsockopt, sockopt, AddressFamily, SockType};
    use nix::sys::socket::{SockaddrLike, SockaddrStorage};
    use std::os::fd::AsRawFd;
    let ty = getsockopt(fd, sockopt::SockType).map_err(|e| bad(format!("not a socket ({e})")))?;
    if ty != SockType::Stream {
        return Err(bad(format!("a {ty:?} socket; wqd needs a stream socket")));
    }
    let addr: SockaddrStorage =
        getsockname(fd.as_raw_fd()).map_err(|e| bad(format!("getsockname: {e}")))?;
    if addr.family() != Some(AddressFamily::Unix) {
        return Err(bad(format!(
            "a {:?} socket; wqd.socket must pass a Unix socket (ListenStream=/run/wqd/wqd.sock)",
            addr.family()
        )));
    }
    match getsockopt(fd, sockopt::AcceptConn) {
        Ok(true) => {}
        Ok(false) => return Err(bad("not listening".into())),
        Err(e) => return Err(bad(format!("SO_ACCEPTCONN: {e}"))),
    }
    nix::fcntl::fcntl(
        fd.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(|e| bad(format!("setting close-on-exec: {e}")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_timeout_reads_usec_and_checks_the_pid() {
        assert_eq!(
            watchdog_timeout(Some("2000000"), None, 7),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            watchdog_timeout(Some("500000"), Some("7"), 7),
            Some(Duration::from_millis(500))
        );
        assert_eq!(watchdog_timeout(Some("500000"), Some("8"), 7), None);
        assert_eq!(watchdog_timeout(Some("0"), None, 7), None);
        assert_eq!(watchdog_timeout(Some("x"), None, 7), None);
        assert_eq!(watchdog_timeout(None, None, 7), None);
    }

    #[test]
    fn listen_fds_count_only_for_this_pid() {
        assert_eq!(listen_fds_count(None, None, 5).unwrap(), 0);
        assert_eq!(listen_fds_count(Some("5"), Some("1"), 5).unwrap(), 1);
        assert_eq!(listen_fds_count(Some("6"), Some("1"), 5).unwrap(), 0);
        assert!(listen_fds_count(Some("5"), Some("one"), 5).is_err());
        assert!(listen_fds_count(Some("x"), Some("1"), 5).is_err());
    }

    #[test]
    fn notifier_sends_datagrams_to_a_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::new(path.to_str().unwrap()).unwrap();
        n.notify("READY=1").unwrap();
        let mut buf = [0u8; 64];
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1");
        assert!(reloading_message().starts_with("RELOADING=1\nMONOTONIC_USEC="));
    }
}
