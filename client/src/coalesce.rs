//! One system call for what a connection writes in one turn of the scheduler.
//!
//! A unary call on an HTTP/2 connection leaves the client as two frames written by two tasks:
//! the connection task writes the request's HEADERS as soon as it opens the stream, and the
//! body's task (hyper's pipe, woken once the new stream has flow-control capacity) writes its
//! DATA a moment later. On the socket that was two `writev`s per call, and the daemon at times
//! woke for the HEADERS alone, handed the stream to a task that found no body yet, and slept
//! again until the DATA came (measured on the Unix socket: 2 writes per single-item call;
//! under `perf trace`, one request in five read in two parts).
//!
//! [`Coalesce`] wraps the stream: small writes are kept in a buffer, and a flush that finds
//! bytes kept gives way once (the task wakes itself and is polled again after the tasks already
//! woken, such as that body task) before it writes the buffer in one call. Large writes go
//! straight through (after what is kept). Invariant: every byte accepted is written, in order,
//! before a flush returns `Ready`; at most [`KEEP`] bytes are ever kept, and a flush is
//! deferred at most once per kept buffer, so nothing waits longer than one scheduler turn.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes kept before a write goes to the socket; a write that would not fit is written (after
/// what is kept) rather than copied.
pub(crate) const KEEP: usize = 16 * 1024;

/// A stream whose small writes of one scheduler turn go out in one system call (see the
/// module docs).
#[derive(Debug)]
pub struct Coalesce<T> {
    io: T,
    kept: Vec<u8>,
    /// The flush of the bytes in `kept` has given way once already.
    deferred: bool,
}

impl<T> Coalesce<T> {
    /// Wraps `io`.
    pub fn new(io: T) -> Self {
        Coalesce {
            io,
            kept: Vec::new(),
            deferred: false,
        }
    }
}

impl<T: AsyncWrite + Unpin> Coalesce<T> {
    /// Writes everything kept; `Ready(Ok)` once `kept` is empty.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.kept.is_empty() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.kept))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.kept.drain(..n);
        }
        self.deferred = false;
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalesce<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesce<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.kept.len() + buf.len() <= KEEP {
            this.kept.extend_from_slice(buf);
            return Poll::Ready(Ok(buf.len()));
        }
        // Too big to keep: what is kept goes first, then this write as it is.
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if this.kept.len() + total <= KEEP {
            for b in bufs {
                this.kept.extend_from_slice(b);
            }
            return Poll::Ready(Ok(total));
        }
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.kept.is_empty() && !this.deferred {
            // Give way once: a task woken itself while polled runs again after the tasks
            // already woken (tokio's schedulers, current-thread and multi-thread alike), so
            // a body written by another task in this turn joins the same write.
            this.deferred = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::{poll_fn, Future};
    use std::io::Read;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    /// A real socket that counts the writes that reached it.
    struct Counted {
        io: tokio::net::UnixStream,
        writes: Arc<AtomicUsize>,
    }

    impl AsyncWrite for Counted {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            let r = Pin::new(&mut this.io).poll_write(cx, buf);
            if let Poll::Ready(Ok(_)) = r {
                this.writes.fetch_add(1, Ordering::SeqCst);
            }
            r
        }
        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().io).poll_flush(cx)
        }
        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
        }
    }

    /// A socket pair: the wrapped, counted end, and a thread reading the other end to its
    /// close.
    fn pair(
        rt: &tokio::runtime::Runtime,
    ) -> (
        Coalesce<Counted>,
        Arc<AtomicUsize>,
        std::thread::JoinHandle<Vec<u8>>,
    ) {
        let (a, mut b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        a.set_nonblocking(true).expect("nonblocking");
        let _in_rt = rt.enter();
        let writes = Arc::new(AtomicUsize::new(0));
        let io = Counted {
            io: tokio::net::UnixStream::from_std(a).expect("register"),
            writes: writes.clone(),
        };
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            b.read_to_end(&mut got).expect("read");
            got
        });
        (Coalesce::new(io), writes, reader)
    }

    async fn write_all(c: &Mutex<Coalesce<Counted>>, mut buf: &[u8]) {
        while !buf.is_empty() {
            let n = poll_fn(|cx| Pin::new(&mut *c.lock().expect("lock")).poll_write(cx, buf))
                .await
                .expect("write");
            buf = &buf[n..];
        }
    }

    async fn flush(c: &Mutex<Coalesce<Counted>>) {
        poll_fn(|cx| Pin::new(&mut *c.lock().expect("lock")).poll_flush(cx))
            .await
            .expect("flush");
    }

    /// The shape of a unary call on HTTP/2: a connection task writes the HEADERS and flushes,
    /// having woken the body's task, which hands its DATA back for the connection to write.
    /// Both leave in one write, on either scheduler; without the deferred flush they were two.
    fn headers_then_body(rt: tokio::runtime::Runtime) {
        let (c, writes, reader) = pair(&rt);
        let c = Arc::new(Mutex::new(c));
        rt.block_on(async {
            // The connection's preface, written and flushed first: the socket is then known
            // to be writable (a socket not yet reported writable makes every write wait for
            // the reactor, which would join the two frames by accident).
            write_all(&c, b"PREFACE").await;
            flush(&c).await;
            writes.store(0, Ordering::SeqCst);
            let (data_tx, data_rx) = tokio::sync::oneshot::channel::<Vec<u8>>();
            let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
            // The body's task: runs once the connection has opened the stream.
            let body = tokio::spawn(async move {
                go_rx.await.expect("go");
                data_tx.send(b"DATA".to_vec()).expect("send");
            });
            let conn = {
                let c = c.clone();
                tokio::spawn(async move {
                    write_all(&c, b"HEADERS").await;
                    go_tx.send(()).expect("go");
                    // Each poll, as h2's connection: frames the streams queued go into the
                    // socket's writer first, then the writer is flushed.
                    let mut data_rx = data_rx;
                    let mut sent = false;
                    poll_fn(|cx| {
                        let mut w = c.lock().expect("lock");
                        if !sent {
                            if let Poll::Ready(data) = Pin::new(&mut data_rx).poll(cx) {
                                let data = data.expect("data");
                                let n = match Pin::new(&mut *w).poll_write(cx, &data) {
                                    Poll::Ready(n) => n.expect("write"),
                                    Poll::Pending => unreachable!("a small write is kept"),
                                };
                                assert_eq!(n, data.len());
                                sent = true;
                            }
                        }
                        match Pin::new(&mut *w).poll_flush(cx) {
                            Poll::Ready(r) => r.expect("flush"),
                            Poll::Pending => return Poll::Pending,
                        }
                        if sent {
                            Poll::Ready(())
                        } else {
                            Poll::Pending
                        }
                    })
                    .await;
                })
            };
            conn.await.expect("conn");
            body.await.expect("body");
            poll_fn(|cx| Pin::new(&mut *c.lock().expect("lock")).poll_shutdown(cx))
                .await
                .expect("shutdown");
        });
        drop(c);
        drop(rt);
        assert_eq!(reader.join().expect("reader"), b"PREFACEHEADERSDATA");
        // The first flush gives way; the body's bytes are kept before the second flush, and
        // the two go out together.
        assert_eq!(
            writes.load(Ordering::SeqCst),
            1,
            "HEADERS and DATA in one write"
        );
    }

    #[test]
    fn headers_and_body_leave_in_one_write_on_a_current_thread_runtime() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        headers_then_body(rt);
    }

    #[test]
    fn headers_and_body_leave_in_one_write_on_a_multi_thread_runtime() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        headers_then_body(rt);
    }

    /// Small and large writes mixed, far more than the socket buffer holds (writes and
    /// flushes meet backpressure while the reader catches up): every byte arrives, in order,
    /// and a flush returns only once all of it is written.
    #[test]
    fn mixed_writes_under_backpressure_arrive_whole_and_in_order() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let (c, writes, reader) = pair(&rt);
        let c = Mutex::new(c);
        let mut want = Vec::new();
        rt.block_on(async {
            for i in 0..400usize {
                // 1..=40 bytes, or 20..60 KiB every seventh write (past what is kept).
                let len = if i % 7 == 0 {
                    20_000 + i * 100
                } else {
                    1 + i % 40
                };
                let chunk: Vec<u8> = (0..len).map(|j| (i * 31 + j) as u8).collect();
                write_all(&c, &chunk).await;
                want.extend_from_slice(&chunk);
                if i % 3 == 0 {
                    flush(&c).await;
                    assert!(c.lock().expect("lock").kept.is_empty(), "flushed = written");
                }
            }
            flush(&c).await;
            poll_fn(|cx| Pin::new(&mut *c.lock().expect("lock")).poll_shutdown(cx))
                .await
                .expect("shutdown");
        });
        drop(c);
        let got = reader.join().expect("reader");
        assert_eq!(got.len(), want.len());
        assert!(got == want, "bytes reordered or lost");
        // Small writes between flushes were joined: far fewer writes than the 400 made.
        assert!(writes.load(Ordering::SeqCst) < 400);
    }
}
