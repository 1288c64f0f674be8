//! The peer of a Unix connection: its credentials as the kernel reports them at connect time
//! (`SO_PEERCRED`, and `SO_PEERGROUPS` for the supplementary groups), read once when the
//! connection is accepted and carried by the stream ([`PeerStream`]) into every request's
//! connect info ([`UnixPeer`]).
//!
//! Owns: [`PeerCred`], [`UnixPeer`], [`PeerStream`] and the one `unsafe` call of the daemon
//! (`getsockopt(SO_PEERGROUPS)`, with its SAFETY argument). Invariants: the credentials are
//! read once at accept and never change for the connection; credentials that cannot be read
//! are `None` (the guard then refuses every gated call), never a guess. This sits below
//! `crate::conn` (which wraps each accepted Unix stream in a [`PeerStream`]) and below
//! `crate::security` (whose guard reads [`UnixPeer`] from the request), so neither imports
//! the other through it.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::UnixStream;
use tonic::transport::server::Connected;
use wqd_proto::stream::QuietUnixStream;

/// The credentials of a Unix socket peer at connect time, as the kernel reports them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCred {
    pub uid: u32,
    /// The primary (effective) group.
    pub gid: u32,
    pub pid: Option<i32>,
    /// Supplementary groups (`SO_PEERGROUPS`); empty if the kernel cannot tell.
    pub groups: Vec<u32>,
}

/// Connect info of a [`PeerStream`], found in every request's extensions. `None` when the
/// credentials could not be read (the guard then refuses every gated call).
#[derive(Debug, Clone)]
pub struct UnixPeer(pub Option<Arc<PeerCred>>);

/// A Unix connection with its peer's credentials, read once when it was accepted. The stream
/// is a [`QuietUnixStream`]: the reactor wakes the connection when a request arrives, not also
/// each time the client reads a response.
#[derive(Debug)]
pub struct PeerStream {
    io: QuietUnixStream,
    peer: UnixPeer,
}

impl PeerStream {
    /// Reads the peer's credentials of an accepted connection.
    ///
    /// # Errors
    /// The stream cannot be registered with the reactor again (see [`QuietUnixStream`]).
    pub fn new(io: UnixStream) -> io::Result<Self> {
        let peer = match io.peer_cred() {
            Ok(c) => Some(Arc::new(PeerCred {
                uid: c.uid(),
                gid: c.gid(),
                pid: c.pid(),
                groups: peer_groups(io.as_raw_fd()).unwrap_or_default(),
            })),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the Unix peer's credentials (SO_PEERCRED)");
                None
            }
        };
        Ok(Self {
            io: QuietUnixStream::from_tokio(io)?,
            peer: UnixPeer(peer),
        })
    }

    /// The peer's credentials, if they could be read.
    pub fn peer(&self) -> Option<&PeerCred> {
        self.peer.0.as_deref()
    }
}

/// `SO_PEERGROUPS` (Linux 4.13+): the peer's supplementary groups at connect time.
fn peer_groups(fd: RawFd) -> Option<Vec<u32>> {
    const GID: usize = std::mem::size_of::<libc::gid_t>();
    let mut buf: Vec<libc::gid_t> = vec![0; 64];
    // At most twice: the first ERANGE says how much room is needed.
    for _ in 0..2 {
        let mut len = (buf.len() * GID) as libc::socklen_t;
        // SAFETY: `buf` is valid for `len` bytes and outlives the call; `len` is a valid
        // socklen_t the kernel writes the needed or used size into.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                buf.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if r == 0 {
            buf.truncate(len as usize / GID);
            return Some(buf);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ERANGE) && len as usize > buf.len() * GID {
            buf.resize(len as usize / GID, 0);
            continue;
        }
        tracing::debug!(error = %e, "SO_PEERGROUPS unavailable; only the primary group counts");
        return None;
    }
    None
}

impl Connected for PeerStream {
    type ConnectInfo = UnixPeer;
    fn connect_info(&self) -> UnixPeer {
        self.peer.clone()
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

crate::shared::write_through!([] PeerStream, io);

// The daemon accepts Unix connections through `crate::conn::Incoming`, which wraps each
// `PeerStream` in a `crate::conn::Conn`: requests then carry `ConnInfo<UnixPeer>`.
