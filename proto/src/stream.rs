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
//! [`QuietUnixStream`] registers the socket for readable events only. A write is tried
//! directly; only when one returns `WouldBlock` is a duplicate of the descriptor registered for
//! writable events, and it stays registered for the life of the stream (a connection that has
//! filled its socket buffer once is the kind that will again). Invariant: a write that blocked
//! is retried only after the writable registration reports readiness, which `epoll_ctl` checks
//! at registration time, so no wake-up is lost between the `WouldBlock` and the registration.

use std::io::{self, IoSlice, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// A connected Unix stream registered for writable events only after a write has blocked (see
/// the module docs).
#[derive(Debug)]
pub struct QuietUnixStream {
    rd: AsyncFd<UnixStream>,
    /// A duplicate of `rd`'s descriptor registered for writable events, from the first write
    /// that blocked.
    wr: Option<AsyncFd<UnixStream>>,
}

impl QuietUnixStream {
    /// Wraps a connected stream (set non-blocking here). Must be called within a tokio runtime.
    pub fn new(s: UnixStream) -> io::Result<Self> {
        s.set_nonblocking(true)?;
        Ok(QuietUnixStream {
            rd: register(s, Interest::READABLE)?,
            wr: None,
        })
    }

    /// From tokio's stream (deregistered from the reactor and registered again, read-only).
    pub fn from_tokio(s: tokio::net::UnixStream) -> io::Result<Self> {
        Self::new(s.into_std()?)
    }

    /// The underlying socket.
    pub fn get_ref(&self) -> &UnixStream {
        self.rd.get_ref()
    }

    /// Writes with `f`, waiting for the writable registration (made on the first `WouldBlock`)
    /// whenever the socket is full.
    fn poll_write_with<R>(
        &mut self,
        cx: &mut Context<'_>,
        mut f: impl FnMut(&UnixStream) -> io::Result<R>,
    ) -> Poll<io::Result<R>> {
        loop {
            let Some(wr) = &self.wr else {
                match f(self.rd.get_ref()) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.wr = Some(register(
                            self.rd.get_ref().try_clone()?,
                            Interest::WRITABLE,
                        )?);
                        continue;
                    }
                    r => return Poll::Ready(r),
                }
            };
            let mut guard = ready!(wr.poll_write_ready(cx))?;
            match guard.try_io(|s| f(s.get_ref())) {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => continue,
            }
        }
    }
}

/// `s` registered with the reactor for `interest`.
fn register(s: UnixStream, interest: Interest) -> io::Result<AsyncFd<UnixStream>> {
    // SAFETY: the `UnixStream` owns its descriptor: it stays open, and `as_raw_fd` returns it,
    // until the stream is dropped, which happens only when the `AsyncFd` owning it is.
    unsafe { AsyncFd::register_with_interest(s, interest) }.map_err(io::Error::from)
}

impl AsyncRead for QuietUnixStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            let mut guard = ready!(this.rd.poll_read_ready(cx))?;
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
        self.get_mut().poll_write_with(cx, |mut s| s.write(buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_write_with(cx, |mut s| s.write_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.rd.get_ref().shutdown(Shutdown::Write))
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

    #[test]
    fn the_socket_is_registered_for_reads_only_until_a_write_blocks() {
        rt().block_on(async {
            let (a, b) = UnixStream::pair().unwrap();
            let mut q = QuietUnixStream::new(a).unwrap();
            let fd = q.get_ref().as_raw_fd();
            let ev = registered_events(fd);
            assert!(!ev.is_empty());
            assert!(
                ev.iter().all(|e| e & (EPOLLIN | EPOLLOUT) == EPOLLIN),
                "{ev:x?}"
            );

            // Writes that fit leave it so: the peer reading them cannot wake this side.
            q.write_all(b"request").await.unwrap();
            let mut got = [0u8; 7];
            (&b).read_exact(&mut got).unwrap();
            assert_eq!(&got, b"request");
            assert!(q.wr.is_none());
            assert_eq!(registered_events(fd), ev);

            // A write larger than the socket's buffer blocks: a duplicate descriptor is
            // registered for writable events, and the write completes once the peer reads.
            let total = 8 << 20;
            let data: Vec<u8> = (0..total).map(byte).collect();
            let reader = std::thread::spawn(move || {
                let mut all = vec![0u8; total];
                // Late, so the writer has certainly filled the buffer first.
                std::thread::sleep(std::time::Duration::from_millis(50));
                (&b).read_exact(&mut all).unwrap();
                all
            });
            q.write_all(&data).await.unwrap();
            let wr =
                q.wr.as_ref()
                    .expect("a blocked write registers for writable events");
            let wfd = wr.as_raw_fd();
            assert_ne!(wfd, fd);
            let wev = registered_events(wfd);
            assert!(!wev.is_empty());
            assert!(
                wev.iter().all(|e| e & (EPOLLIN | EPOLLOUT) == EPOLLOUT),
                "{wev:x?}"
            );
            assert_eq!(registered_events(fd), ev);
            assert!(reader.join().unwrap() == data, "every byte, in order");
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
