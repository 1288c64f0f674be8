//! CPU hotplug events from the kernel's `NETLINK_KOBJECT_UEVENT` socket.
//!
//! This module owns the uevent socket and the uevent wire format, nothing more: an event only
//! tells wqd *when* to re-read sysfs, never *what* the machine looks like (events can be lost
//! when the socket buffer overflows, and a rescan is the truth). Invariant: [`parse_uevent`]
//! yields a [`CpuEvent`] only for a kernel-formatted `online`/`offline` message whose device is
//! exactly `/devices/system/cpu/cpuN`; [`UeventSocket::recv_timeout`] yields only those, and only
//! from the kernel (sender port 0).
//!
//! Kernel format (one datagram): `ACTION@DEVPATH\0KEY=VALUE\0KEY=VALUE\0...`, for example
//! `offline@/devices/system/cpu/cpu3\0ACTION=offline\0DEVPATH=/devices/system/cpu/cpu3\0`
//! `SUBSYSTEM=cpu\0SEQNUM=4242\0`. udev re-broadcasts on group 2 with a binary header starting
//! `libudev\0`; those are ignored should they ever arrive.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    bind, recvfrom, setsockopt, socket, sockopt, AddressFamily, NetlinkAddr, SockFlag,
    SockProtocol, SockType,
};

use super::TopologyError;

/// A CPU went online or offline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CpuEvent {
    pub cpu: u32,
    pub online: bool,
}

/// The kernel's uevent multicast group.
const KERNEL_GROUP: u32 = 1;
/// Receive buffer asked for, so that a burst (onlining hundreds of CPUs) is not dropped.
const RCVBUF: usize = 1 << 20;
/// Uevents are at most a few KiB (`UEVENT_BUFFER_SIZE` is 2048 plus the header).
const MAX_MSG: usize = 8192;

/// A bound `NETLINK_KOBJECT_UEVENT` socket listening to kernel group 1.
#[derive(Debug)]
pub struct UeventSocket {
    fd: OwnedFd,
}

impl UeventSocket {
    /// Opens and binds the socket.
    ///
    /// # Errors
    /// [`TopologyError::Netlink`] when the socket cannot be opened or bound (as in some
    /// containers); the caller then relies on periodic rescans alone.
    pub fn open() -> Result<Self, TopologyError> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkKObjectUEvent,
        )
        .map_err(TopologyError::Netlink)?;
        // Best effort: RcvBufForce needs CAP_NET_ADMIN, RcvBuf is capped by rmem_max.
        if setsockopt(&fd, sockopt::RcvBufForce, &RCVBUF).is_err() {
            let _ = setsockopt(&fd, sockopt::RcvBuf, &RCVBUF);
        }
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, KERNEL_GROUP)).map_err(TopologyError::Netlink)?;
        Ok(Self { fd })
    }

    /// Waits up to `timeout` for a CPU online/offline event, skipping every other uevent.
    /// `Ok(None)` when the time ran out.
    ///
    /// # Errors
    /// [`TopologyError::Netlink`]. `ENOBUFS` means the kernel dropped events because the buffer
    /// was full: the caller must rescan, then may keep receiving.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Option<CpuEvent>, TopologyError> {
        // A timeout past the clock's range waits for ever.
        self.recv_until(None, Instant::now().checked_add(timeout))
    }

    /// Waits, without a timeout, for a CPU online/offline event or for `wake` to become
    /// readable (data, or its peer closed): `Ok(None)` then. A thread blocked here costs no
    /// wake-ups while nothing happens; whoever stops it writes to or closes `wake`'s peer.
    ///
    /// # Errors
    /// As [`UeventSocket::recv_timeout`] (`ENOBUFS`: events were dropped, rescan).
    pub fn recv_or_wake(&self, wake: &impl AsFd) -> Result<Option<CpuEvent>, TopologyError> {
        self.recv_until(Some(wake.as_fd()), None)
    }

    /// Waits for a CPU online/offline event until `deadline` (none: for ever) or until `wake`
    /// is readable: `Ok(None)` then. The socket is read only when `poll` says a datagram is
    /// there, so no receive ever blocks (and no socket option is set per wait).
    fn recv_until(
        &self,
        wake: Option<BorrowedFd<'_>>,
        deadline: Option<Instant>,
    ) -> Result<Option<CpuEvent>, TopologyError> {
        let mut buf = vec![0u8; MAX_MSG];
        loop {
            let timeout = match deadline {
                None => PollTimeout::NONE,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(None);
                    }
                    // Whole milliseconds, rounded up (a wait cut to zero would spin).
                    let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128);
                    PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
                }
            };
            let mut fds = [
                PollFd::new(self.fd.as_fd(), PollFlags::POLLIN),
                PollFd::new(wake.unwrap_or(self.fd.as_fd()), PollFlags::POLLIN),
            ];
            let n = if wake.is_some() { 2 } else { 1 };
            match poll(&mut fds[..n], timeout) {
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(TopologyError::Netlink(e)),
            }
            if wake.is_some() && fds[1].revents().is_some_and(|r| !r.is_empty()) {
                return Ok(None);
            }
            if fds[0].revents().is_none_or(|r| r.is_empty()) {
                continue;
            }
            // Readable (or an error pending, which the receive reports): one datagram, at
            // once, since this thread is the socket's only reader.
            if let Some(ev) = self.recv_one(&mut buf)? {
                return Ok(Some(ev));
            }
        }
    }

    /// Receives one datagram (blocking while none is queued): `Some` for a kernel CPU
    /// online/offline event; `None` for any other datagram, or a receive to retry.
    fn recv_one(&self, buf: &mut [u8]) -> Result<Option<CpuEvent>, TopologyError> {
        match recvfrom::<NetlinkAddr>(self.fd.as_raw_fd(), buf) {
            // Only the kernel (port 0) is trusted; anything else is a forgery or udev.
            Ok((_, Some(from))) if from.pid() != 0 => Ok(None),
            Ok((n, _)) => Ok(parse_uevent(&buf[..n])),
            Err(Errno::EAGAIN | Errno::EINTR) => Ok(None),
            Err(e) => Err(TopologyError::Netlink(e)),
        }
    }
}

/// Parses one kernel uevent datagram; `Some` only for a CPU going online or offline.
pub fn parse_uevent(buf: &[u8]) -> Option<CpuEvent> {
    if buf.starts_with(b"libudev\0") {
        return None;
    }
    let mut fields = buf.split(|b| *b == 0).filter(|f| !f.is_empty());
    let header = std::str::from_utf8(fields.next()?).ok()?;
    let (action, devpath) = header.split_once('@')?;
    let mut subsystem = None;
    for f in fields {
        let Ok(f) = std::str::from_utf8(f) else {
            continue;
        };
        match f.split_once('=') {
            // The header and the keys must agree; a message that contradicts itself is dropped.
            Some(("ACTION", v)) if v != action => return None,
            Some(("DEVPATH", v)) if v != devpath => return None,
            Some(("SUBSYSTEM", v)) => subsystem = Some(v),
            _ => {}
        }
    }
    if subsystem.is_some_and(|s| s != "cpu") {
        return None;
    }
    let online = match action {
        "online" => true,
        "offline" => false,
        _ => return None,
    };
    let n = devpath.strip_prefix("/devices/system/cpu/cpu")?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(CpuEvent {
        cpu: n.parse().ok()?,
        online,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_cpu_events() {
        let off = b"offline@/devices/system/cpu/cpu3\0ACTION=offline\0DEVPATH=/devices/system/cpu/cpu3\0SUBSYSTEM=cpu\0SEQNUM=4242\0";
        assert_eq!(
            parse_uevent(off),
            Some(CpuEvent {
                cpu: 3,
                online: false
            })
        );
        let on = b"online@/devices/system/cpu/cpu17\0ACTION=online\0DEVPATH=/devices/system/cpu/cpu17\0SUBSYSTEM=cpu\0SEQNUM=9\0";
        assert_eq!(
            parse_uevent(on),
            Some(CpuEvent {
                cpu: 17,
                online: true
            })
        );
        // Header only (no trailing keys) is still a well-formed event.
        assert_eq!(
            parse_uevent(b"online@/devices/system/cpu/cpu0\0"),
            Some(CpuEvent {
                cpu: 0,
                online: true
            })
        );
    }

    #[test]
    fn other_events_are_ignored() {
        for msg in [
            &b"add@/devices/system/cpu/cpu3\0ACTION=add\0SUBSYSTEM=cpu\0"[..],
            b"change@/devices/system/cpu/cpu3\0ACTION=change\0",
            b"offline@/devices/system/memory/memory7\0ACTION=offline\0SUBSYSTEM=memory\0",
            b"online@/devices/system/cpu/cpu3/cache\0ACTION=online\0",
            b"online@/devices/system/cpu/cpufreq\0ACTION=online\0",
            b"online@/devices/system/cpu/cpu\0",
            b"online@/devices/system/cpu/cpu3\0ACTION=offline\0",
            b"online@/devices/system/cpu/cpu3\0SUBSYSTEM=memory\0",
            b"libudev\0\xfe\xed\xca\xfe\0\0\0\0online@/devices/system/cpu/cpu3\0",
            b"",
            b"\0\0",
            b"garbage without separator",
            b"online@/devices/system/cpu/cpu99999999999999\0",
        ] {
            assert_eq!(
                parse_uevent(msg),
                None,
                "{:?}",
                String::from_utf8_lossy(msg)
            );
        }
    }

    #[test]
    fn open_or_fail_cleanly() {
        // Containers may forbid the socket; either way this must not panic or hang.
        if let Ok(s) = UeventSocket::open() {
            let t = Instant::now();
            let r = s.recv_timeout(Duration::from_millis(50));
            assert!(r.is_ok());
            assert!(t.elapsed() < Duration::from_secs(2));
        }
    }

    /// A receive waits its whole timeout (no CPU changes on this host, which the tests never
    /// offline), and one waiting on a wake socket returns once its peer writes or closes.
    #[test]
    fn a_receive_ends_at_its_timeout_or_its_wake() {
        use std::io::Write;
        use std::os::unix::net::UnixStream;
        let Ok(s) = UeventSocket::open() else {
            eprintln!("skipped: no uevent socket here");
            return;
        };
        let t = Instant::now();
        assert!(matches!(
            s.recv_timeout(Duration::from_millis(30)),
            Ok(None)
        ));
        assert!(
            t.elapsed() >= Duration::from_millis(30),
            "{:?}",
            t.elapsed()
        );
        for close in [false, true] {
            let (mut peer, wake) = UnixStream::pair().expect("socketpair");
            let waker = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                match close {
                    true => drop(peer),
                    false => peer.write_all(b"x").expect("write"),
                }
            });
            let t = Instant::now();
            assert!(matches!(s.recv_or_wake(&wake), Ok(None)));
            assert!(t.elapsed() >= Duration::from_millis(20));
            waker.join().expect("waker");
        }
    }
}
