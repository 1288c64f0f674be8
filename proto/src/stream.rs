//! A Unix stream that the reactor wakes for reads, and for writes only once a write has blocked.
//!
//! Tokio registers every `UnixStream` for readable and writable events, edge-triggered. On a
//! Unix socket the writer's side signals "writable" each time the peer *reads* (the kernel
//! frees the written buffer and wakes whoever polls for `EPOLLOUT`), so a request/response
//! connection wakes each end once more per call, for nothing: the client as soon as the daemon
//! reads the request (on a busy 2-CPU host it preempts the daemon that is handling the
//! request), the daemon once the client reads the response (measured with `perf sched` and
//! `strace`: one `epoll_wait` per call returning only `EPOLLOUT`).
//!
//! [`QuietUnixStream`] registers the socket for readable events only and writes directly. The
//! first write that returns `WouldBlock` turns it, for the rest of its life, into tokio's own
//! `UnixStream` (registered for both events; a connection that filled its socket buffer once is
//! the kind that will again), which then waits for room. Invariants: no second descriptor is
//! ever opened (a daemon at its descriptor limit has none to spare); no wake-up is lost in the
//! switch: `epoll_ctl` reports an already-ready socket at registration, and the task waiting to
//! read on the old registration is woken here (tokio *clears* a dropped registration's wakers
//! without waking them, so the stream keeps the reader's waker itself).

use std::io::{self, IoSlice, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// A connected Unix stream registered for writable events only after a write has blocked (see
/// the module docs).
#[derive(Debug)]
pub struct QuietUnixStream {
    io: Io,
    /// While quiet: the waker of the last read that found nothing, woken at the switch.
    reader: Option<Waker>,
}

#[derive(Debug)]
enum Io {
    /// Registered for readable events only.
    Quiet(AsyncFd<UnixStream>),
    /// After a write blocked: tokio's stream, registered for both.
    Full(tokio::net::UnixStream),
    /// Only when the switch to `Full` failed (the error went to that write's caller).
    Lost,
}

impl QuietUnixStream {
    /// Wraps a connected stream (set non-blocking here). Must be called within a tokio runtime.
    pub fn new(s: UnixStream) -> io::Result<Self> {
        s.set_nonblocking(true)?;
        // SAFETY: the `UnixStream` owns its descriptor: it stays open, and `as_raw_fd` returns
        // it, until the stream is dropped, which happens only when the `AsyncFd` owning it is
        // (or after `into_inner` hands it back).
        let fd = unsafe { AsyncFd::register_with_interest(s, Interest::READABLE) }?;
        Ok(QuietUnixStream {
            io: Io::Quiet(fd),
            reader: None,
        })
    }

    /// From tokio's stream (deregistered from the reactor and registered again, read-only).
    pub fn from_tokio(s: tokio::net::UnixStream) -> io::Result<Self> {
        Self::new(s.into_std()?)
    }

    /// Whether a write has blocked, so that the stream is registered for writable events too.
    pub fn registered_for_writes(&self) -> bool {
        !matches!(self.io, Io::Quiet(_))
    }

    /// From quiet to tokio's stream, registered for both events.
    fn switch(&mut self) -> io::Result<()> {
        match std::mem::replace(&mut self.io, Io::Lost) {
            Io::Quiet(fd) => {
                // Dropping the registration forgets its waiters: wake the reader, whose next
                // poll waits on the new one.
                let s = fd.into_inner();
                if let Some(w) = self.reader.take() {
                    w.wake();
                }
                self.io = Io::Full(tokio::net::UnixStream::from_std(s)?);
            }
            other => self.io = other,
        }
        Ok(())
    }

    /// Writes with `f` while quiet; on the first `WouldBlock`, switches to tokio's stream and
    /// lets it write with `full`.
    fn poll_write_with<R>(
        &mut self,
        cx: &mut Context<'_>,
        f: impl FnOnce(&UnixStream) -> io::Result<R>,
        full: impl FnOnce(Pin<&mut tokio::net::UnixStream>, &mut Context<'_>) -> Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        if let Io::Quiet(fd) = &self.io {
            match f(fd.get_ref()) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.switch()?,
                r => return Poll::Ready(r),
            }
        }
        match &mut self.io {
            Io::Full(s) => full(Pin::new(s), cx),
            _ => Poll::Ready(Err(lost())),
        }
    }
}

/// The error of a stream whose switch to writable events failed.
fn lost() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "the stream could not be registered for writable events",
    )
}

impl AsyncRead for QuietUnixStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let fd = match &mut this.io {
            Io::Quiet(fd) => fd,
            Io::Full(s) => return Pin::new(s).poll_read(cx, buf),
            Io::Lost => return Poll::Ready(Err(lost())),
        };
        loop {
            let mut guard = match fd.poll_read_ready(cx) {
                Poll::Ready(r) => r?,
                Poll::Pending => {
                    match &mut this.reader {
                        Some(w) if w.will_wake(cx.waker()) => {}
                        w => *w = Some(cx.waker().clone()),
                    }
                    return Poll::Pending;
                }
            };
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|s| s.get_ref().read(unfilled)) {
                Ok(Ok(n)) => {
                    // A short read drained the socket: the next read waits for the next edge
                    // instead of paying a system call for `EAGAIN` (as tokio's own streams do).
                    if n > 0 && n < unfilled.len() {
                        guard.clear_ready();
                    }
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for QuietUnixStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_write_with(cx, |mut s| s.write(buf), |s, cx| s.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_with(
            cx,
            |mut s| s.write_vectored(bufs),
            |s, cx| s.poll_write_vectored(cx, bufs),
        )
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Quiet(fd) => Poll::Ready(fd.get_ref().shutdown(Shutdown::Write)),
            Io::Full(s) => Pin::new(s).poll_shutdown(cx),
            Io::Lost => Poll::Ready(Err(lost())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const EPOLLIN: u32 = 0x1;
    const EPOLLOUT: u32 = 0x4;

    /// The events `fd` is registered for in this process's epoll instances, as the kernel
    /// reports them in `/proc/self/fdinfo` (one entry per descriptor of an instance that holds
    /// it: tokio's reactor keeps two descriptors of its instance).
    fn registered_events(fd: i32) -> Vec<u32> {
        let mut found = Vec::new();
        for e in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
            let is_epoll = std::fs::read_link(e.path())
                .map(|t| t.to_string_lossy().contains("eventpoll"))
                .unwrap_or(false);
            if !is_epoll {
                continue;
            }
            let info = std::fs::read_to_string(format!(
                "/proc/self/fdinfo/{}",
                e.file_name().to_string_lossy()
            ))
            .unwrap_or_default();
            for line in info.lines() {
                let mut words = line.split_whitespace();
                if words.next() != Some("tfd:")
                    || words.next().and_then(|t| t.parse::<i32>().ok()) != Some(fd)
                {
                    continue;
                }
                if let (Some("events:"), Some(ev)) = (words.next(), words.next()) {
                    found.push(u32::from_str_radix(ev, 16).unwrap());
                }
            }
        }
        found
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// The byte at offset `i` of a test stream: a long period, so a reordered or repeated
    /// chunk shows.
    fn byte(i: usize) -> u8 {
        (i % 251) as u8 ^ (i / 251 % 256) as u8
    }

    /// How many of this process's descriptors refer to the same socket as `fd`.
    fn descriptors_of(fd: i32) -> usize {
        let target = std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap();
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .flatten()
            .filter(|e| std::fs::read_link(e.path()).is_ok_and(|t| t == target))
            .count()
    }

    #[test]
    fn the_socket_is_registered_for_reads_only_until_a_write_blocks() {
        rt().block_on(async {
            let (a, b) = UnixStream::pair().unwrap();
            let fd = a.as_raw_fd();
            let q = QuietUnixStream::new(a).unwrap();
            let ev = registered_events(fd);
            assert!(!ev.is_empty());
            assert!(
                ev.iter().all(|e| e & (EPOLLIN | EPOLLOUT) == EPOLLIN),
                "{ev:x?}"
            );
            let (mut rd, mut wr) = tokio::io::split(q);

            // Writes that fit leave it so: the peer reading them cannot wake this side.
            wr.write_all(b"request").await.unwrap();
            let mut got = [0u8; 7];
            (&b).read_exact(&mut got).unwrap();
            assert_eq!(&got, b"request");
            assert_eq!(registered_events(fd), ev);

            // A reader waits on the read-only registration while a write larger than the
            // socket's buffer blocks: the stream switches to a registration for both events on
            // the same descriptor, the write completes once the peer reads, and the waiting
            // reader still gets what the peer sends afterwards.
            let reader = tokio::spawn(async move {
                let mut got = [0u8; 5];
                rd.read_exact(&mut got).await.unwrap();
                (rd, got)
            });
            tokio::task::yield_now().await;
            let total = 8 << 20;
            let data: Vec<u8> = (0..total).map(byte).collect();
            let peer = std::thread::spawn(move || {
                let mut all = vec![0u8; total];
                // Late, so the writer has certainly filled the buffer first.
                std::thread::sleep(std::time::Duration::from_millis(50));
                (&b).read_exact(&mut all).unwrap();
                (&b).write_all(b"reply").unwrap();
                (b, all)
            });
            wr.write_all(&data).await.unwrap();
            let (b, all) = peer.join().unwrap();
            assert!(all == data, "every byte, in order");
            let (rd, got) = tokio::time::timeout(std::time::Duration::from_secs(10), reader)
                .await
                .expect("the waiting reader was woken")
                .unwrap();
            assert_eq!(&got, b"reply");
            let q = rd.unsplit(wr);
            assert!(q.registered_for_writes());
            let ev = registered_events(fd);
            assert!(!ev.is_empty());
            assert!(
                ev.iter()
                    .all(|e| e & (EPOLLIN | EPOLLOUT) == EPOLLIN | EPOLLOUT),
                "{ev:x?}"
            );
            assert_eq!(descriptors_of(fd), 1, "no second descriptor");
            drop(b);
        });
    }

    /// Writes `total` bytes of the test stream in mixed sizes (1 byte to 300 KiB), plain and
    /// vectored, then shuts the write side.
    async fn send(mut w: impl AsyncWrite + Unpin, total: usize) {
        let data: Vec<u8> = (0..total).map(byte).collect();
        let (mut at, mut k) = (0, 0usize);
        while at < total {
            let n = [1, 700, 16 << 10, 300 << 10, 33][k % 5].min(total - at);
            k += 1;
            let chunk = &data[at..at + n];
            if k % 2 == 0 {
                let (x, y) = chunk.split_at(n / 2);
                let mut done = 0;
                while done < n {
                    let bufs = if done < x.len() {
                        [IoSlice::new(&x[done..]), IoSlice::new(y)]
                    } else {
                        [IoSlice::new(&y[done - x.len()..]), IoSlice::new(&[])]
                    };
                    done += w.write_vectored(&bufs).await.unwrap();
                }
            } else {
                w.write_all(chunk).await.unwrap();
            }
            at += n;
        }
        w.shutdown().await.unwrap();
    }

    /// Everything until end of file, read 1 000 bytes at most at a time.
    async fn recv(mut r: impl AsyncRead + Unpin) -> Vec<u8> {
        let mut all = Vec::new();
        let mut buf = [0u8; 1000];
        loop {
            let n = r.read(&mut buf).await.unwrap();
            if n == 0 {
                return all;
            }
            all.extend_from_slice(&buf[..n]);
        }
    }

    #[test]
    fn both_directions_under_backpressure_arrive_whole_and_in_order_then_eof() {
        rt().block_on(async {
            let (a, b) = UnixStream::pair().unwrap();
            let (ra, wa) = tokio::io::split(QuietUnixStream::new(a).unwrap());
            let (rb, wb) = tokio::io::split(QuietUnixStream::new(b).unwrap());
            let total = 3 << 20;
            let (at_b, at_a, (), ()) =
                tokio::join!(recv(rb), recv(ra), send(wa, total), send(wb, total));
            let want: Vec<u8> = (0..total).map(byte).collect();
            assert!(
                at_b == want,
                "a to b: {} of {total} bytes, or out of order",
                at_b.len()
            );
            assert!(
                at_a == want,
                "b to a: {} of {total} bytes, or out of order",
                at_a.len()
            );
        });
    }
}
