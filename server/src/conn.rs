//! The accepted connections of both gRPC listeners (the Unix socket and the optional TCP one):
//! accepting them, capping how many are open, timing out the ones that never finish their
//! handshake or sit idle, and counting all of it.
//!
//! Owns: [`Incoming`] (the stream of accepted connections tonic serves, replacing
//! `tokio_stream`'s listener streams), [`Conn`] (each accepted connection's IO, with its
//! handshake and idle deadlines), [`Rewrite`] (the read side of a Unix connection through a
//! `crate::authority` rewriter), [`ConnLayer`] (the tower layer that counts each connection's
//! open requests), [`ListenerStats`] (the counters `metrics` publishes) and the start-up fd
//! budget ([`raise_nofile`], [`fd_budget`]).
//!
//! Invariants:
//!
//! * [`Incoming`] never yields an error. tonic's accept loop retries an error at once, so an
//!   `EMFILE` handed to it spins a CPU; here fd exhaustion (`EMFILE`, `ENFILE`, `ENOBUFS`,
//!   `ENOMEM`) and any other unexpected accept error back off ([`Backoff`]: 5 ms doubling to
//!   1 s, reset by the next successful accept), are counted, and logged at most once per
//!   [`LOG_EVERY`] per listener and kind.
//! * At most `max` connections of a listener are open at once: each [`Conn`] holds a
//!   [`Slot`] of its listener's [`Cap`] from accept until tonic drops it. A connection beyond
//!   the cap is accepted and closed at once (the client reads EOF, it does not hang in the
//!   backlog), counted and logged (rate-limited). The daemon computes `max` so that the
//!   connections of all listeners together leave [`fd_budget`]'s reserve of descriptors free
//!   for the topology rescan, the metrics listener, exec pipes and the log.
//! * A plaintext connection that has not sent the HTTP/2 client preface and its first frame
//!   within `handshake_timeout` of its accept is closed ([`Conn`] parses just those bytes). For
//!   TLS the handshake is bounded by tonic's TLS handshake timeout, set to the same value by
//!   the daemon; the bytes under TLS are opaque here, so the preface after it counts as idle.
//! * A connection with no open request for `idle_timeout` (from its handshake, or from the end
//!   of its last request) is closed. An open request is one whose response (body included,
//!   so a Flush or WatchTopology stream) has not ended: [`ConnLayer`] counts them per
//!   connection through the [`ConnInfo`] tonic puts in every request's extensions.
//! * On the Unix listener (unless `listen.rewrite_authority` is off), hyper reads the client's
//!   bytes through [`Rewrite`]: the same bytes, in the same order, except the `:authority`
//!   values h2 would refuse (the socket path stock grpcio, grpc-java and grpc-swift send),
//!   rewritten at the same length (see `crate::authority`). A header block is handed on once
//!   complete, which h2 waits for anyway. TCP connections are read as they come.
//!
//! A timed-out connection is closed by failing its next read (or write) with `TimedOut`:
//! hyper drops it without a GOAWAY. Nothing of a request can be lost that way: the idle
//! deadline only fires with no request open, and a request's headers reach [`ConnLayer`]
//! synchronously in the connection task before the next read.

use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::authority::Rewriter;
pub use crate::authority::PREFACE;
use crate::peer::{PeerStream, UnixPeer};
use crate::shared::write_through;

/// An fd-exhaustion or unexpected accept error is logged at most this often per listener.
pub const LOG_EVERY: Duration = Duration::from_secs(10);
/// First pause after a failed accept.
pub const BACKOFF_MIN: Duration = Duration::from_millis(5);
/// Longest pause after failed accepts.
pub const BACKOFF_MAX: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------------------------------------
// Settings and counters

/// Which listener a connection came in on (the `listener` label of the connection metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Unix,
    Tcp,
}

impl Listener {
    pub fn as_str(self) -> &'static str {
        match self {
            Listener::Unix => "unix",
            Listener::Tcp => "tcp",
        }
    }
}

impl std::fmt::Display for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What one listener enforces; built by the daemon from `[listen]` and the fd budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnSettings {
    /// Open connections at most (after clamping to the fd budget).
    pub max_connections: usize,
    /// Time from accept to the end of the HTTP/2 preface and first frame (plaintext).
    pub handshake_timeout: Duration,
    /// Time without an open request before the connection is closed; `None`: never.
    pub idle_timeout: Option<Duration>,
    /// Whether the listener's connections carry TLS (tonic bounds that handshake; see the
    /// module docs).
    pub tls: bool,
    /// Whether connections run through an authority rewriter ([`Rewrite`]). Only the Unix
    /// listener reads it.
    pub rewrite_authority: bool,
}

/// Counters of one listener. Written with relaxed atomics by the accept loop and the
/// connections; read at scrape time by `metrics` (a scrape may see one counter a step ahead of
/// another, never a counter going back).
#[derive(Debug)]
pub struct ListenerStats {
    /// Immutable after construction.
    pub listener: Listener,
    /// Immutable after construction: the cap in force.
    pub max_connections: usize,
    /// Open connections now (the cap's count).
    open: Arc<AtomicUsize>,
    pub accepted: AtomicU64,
    /// Accepted and closed at once: the listener was at `max_connections`.
    pub refused_limit: AtomicU64,
    /// `accept` failed for lack of descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM).
    pub accept_errors_fds: AtomicU64,
    /// `accept` failed for another reason (transient aborts by the peer are not counted).
    pub accept_errors_other: AtomicU64,
    pub closed_handshake: AtomicU64,
    pub closed_idle: AtomicU64,
    /// `:authority` values rewritten by [`Rewrite`] (Unix listener only).
    pub authority_rewritten: AtomicU64,
}

impl ListenerStats {
    pub fn new(listener: Listener, max_connections: usize) -> Self {
        Self {
            listener,
            max_connections,
            open: Arc::new(AtomicUsize::new(0)),
            accepted: AtomicU64::new(0),
            refused_limit: AtomicU64::new(0),
            accept_errors_fds: AtomicU64::new(0),
            accept_errors_other: AtomicU64::new(0),
            closed_handshake: AtomicU64::new(0),
            closed_idle: AtomicU64::new(0),
            authority_rewritten: AtomicU64::new(0),
        }
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

// ---------------------------------------------------------------------------------------------
// Pure parts: backoff, cap, fd budget, the preface parser, the log limiter

/// Pauses between failed accepts: [`BACKOFF_MIN`], doubling to [`BACKOFF_MAX`].
#[derive(Debug, Clone, Default)]
pub struct Backoff {
    /// The pause the next failure gets; `None` after a success.
    next: Option<Duration>,
}

impl Backoff {
    /// A failure: the pause to take now.
    pub fn fail(&mut self) -> Duration {
        let d = self.next.unwrap_or(BACKOFF_MIN);
        self.next = Some((d * 2).min(BACKOFF_MAX));
        d
    }

    /// A success: the next failure starts again at [`BACKOFF_MIN`].
    pub fn reset(&mut self) {
        self.next = None;
    }
}

/// The open-connection count of one listener against its maximum.
#[derive(Debug, Clone)]
pub struct Cap {
    open: Arc<AtomicUsize>,
    max: usize,
}

/// One open connection's place under a [`Cap`]; given back on drop.
#[derive(Debug)]
pub struct Slot(Arc<AtomicUsize>);

impl Cap {
    pub fn new(open: Arc<AtomicUsize>, max: usize) -> Self {
        Self { open, max }
    }

    /// A slot, or `None` when `max` are taken. Only the accept loop takes slots, so the
    /// check-then-add cannot overshoot; drops may run anywhere.
    pub fn try_take(&self) -> Option<Slot> {
        let mut cur = self.open.load(Ordering::Acquire);
        loop {
            if cur >= self.max {
                return None;
            }
            match self
                .open
                .compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Some(Slot(self.open.clone())),
                Err(now) => cur = now,
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How the fd limit splits: descriptors kept free for everything but connections, and the
/// connections each of `listeners` may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdBudget {
    /// Descriptors never given to connections: the rescan's sysfs reads, the metrics
    /// listener and its connections, exec pipes, the log. `soft / 8`, within 16..=256.
    pub reserve: u64,
    /// Connections per listener the limit leaves room for (at least 1).
    pub per_listener: usize,
}

/// The split of `soft` (RLIMIT_NOFILE) when `in_use` descriptors are open before serving.
pub fn fd_budget(soft: u64, in_use: u64, listeners: usize) -> FdBudget {
    let reserve = (soft / 8).clamp(16, 256);
    let free = soft.saturating_sub(in_use).saturating_sub(reserve);
    let per = free / listeners.max(1) as u64;
    FdBudget {
        reserve,
        per_listener: usize::try_from(per).unwrap_or(usize::MAX).max(1),
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard one (common daemon practice: the default soft
/// limit of 1024 is too small for a busy socket). Returns `(soft, hard)` in force after.
///
/// # Errors
/// `getrlimit` failing (it does not on Linux); a refused raise is logged and the old limit kept.
pub fn raise_nofile() -> io::Result<(u64, u64)> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(io::Error::from)?;
    if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => {
                tracing::info!(from = soft, to = hard, "raised the soft RLIMIT_NOFILE");
                return Ok((hard, hard));
            }
            Err(e) => tracing::warn!(soft, hard, error = %e, "cannot raise RLIMIT_NOFILE"),
        }
    }
    Ok((soft, hard))
}

/// Descriptors this process has open now (`/proc/self/fd`, minus the one reading it).
pub fn fds_in_use() -> Option<u64> {
    let n = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
    Some(n.saturating_sub(1))
}

/// Largest first-frame payload counted: the default SETTINGS_MAX_FRAME_SIZE (hyper refuses
/// a larger frame before any settings are exchanged).
const MAX_FIRST_FRAME: usize = 16_384;

/// Watches a plaintext connection's first bytes until the client preface and the frame after
/// it (SETTINGS, by the protocol) have arrived. It does not validate them: hyper does, and
/// closes the connection on garbage.
#[derive(Debug, Clone)]
pub struct PrefaceWatch {
    /// The preface and the first frame's 9-byte header, as they arrive.
    head: [u8; 33],
    got: usize,
    /// Payload bytes of the first frame still to come, once its header is complete.
    payload_left: Option<usize>,
}

impl Default for PrefaceWatch {
    fn default() -> Self {
        Self {
            head: [0; 33],
            got: 0,
            payload_left: None,
        }
    }
}

impl PrefaceWatch {
    /// Feeds the next bytes read; returns whether the preface and first frame are complete.
    pub fn feed(&mut self, mut bytes: &[u8]) -> bool {
        if self.payload_left.is_none() {
            let n = (self.head.len() - self.got).min(bytes.len());
            self.head[self.got..self.got + n].copy_from_slice(&bytes[..n]);
            self.got += n;
            bytes = &bytes[n..];
            if self.got < self.head.len() {
                return false;
            }
            let h = &self.head[24..27];
            let len = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
            self.payload_left = Some(len.min(MAX_FIRST_FRAME));
        }
        let left = self.payload_left.get_or_insert(0);
        *left = left.saturating_sub(bytes.len());
        *left == 0
    }
}

/// At most one log line per [`LOG_EVERY`]; counts what it held back.
#[derive(Debug, Default)]
pub struct LogLimit {
    /// L: the limiter's own; held only to compare and swap two fields.
    state: Mutex<(Option<Instant>, u64)>,
}

impl LogLimit {
    /// `Some(suppressed since the last line)` when a line may be logged now.
    pub fn allow(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock();
        match s.0 {
            Some(last) if now.duration_since(last) < LOG_EVERY => {
                s.1 += 1;
                None
            }
            _ => {
                let held = s.1;
                *s = (Some(now), 0);
                Some(held)
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The accept loop

/// A listening socket [`Incoming`] accepts from, and how an accepted socket becomes what tonic
/// serves.
pub trait Accept: Unpin {
    /// The socket as accepted.
    type Raw;
    /// What tonic serves (its connect info goes into every request).
    type Io: AsyncRead + AsyncWrite + Connected + Unpin;
    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Self::Raw>>;
    /// Called only for connections under the cap.
    ///
    /// # Errors
    /// The connection cannot be set up (it is dropped).
    fn prepare(
        raw: Self::Raw,
        settings: &ConnSettings,
        stats: &Arc<ListenerStats>,
    ) -> io::Result<Self::Io>;
}

impl Accept for tokio::net::UnixListener {
    type Raw = tokio::net::UnixStream;
    type Io = Rewrite<PeerStream>;
    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Self::Raw>> {
        tokio::net::UnixListener::poll_accept(self, cx).map_ok(|(s, _)| s)
    }
    fn prepare(
        raw: Self::Raw,
        settings: &ConnSettings,
        stats: &Arc<ListenerStats>,
    ) -> io::Result<Self::Io> {
        let rewriter = settings.rewrite_authority.then(Rewriter::new);
        Ok(Rewrite::new(PeerStream::new(raw)?, rewriter, stats.clone()))
    }
}

impl Accept for tokio::net::TcpListener {
    type Raw = tokio::net::TcpStream;
    type Io = tokio::net::TcpStream;
    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Self::Raw>> {
        tokio::net::TcpListener::poll_accept(self, cx).map_ok(|(s, _)| s)
    }
    fn prepare(raw: Self::Raw, _: &ConnSettings, _: &Arc<ListenerStats>) -> io::Result<Self::Io> {
        // tonic's own nodelay setting does not reach sockets of a passed-in stream; without it
        // Nagle holds multi-write responses ~40 ms.
        if let Err(e) = raw.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY on an accepted connection");
        }
        Ok(raw)
    }
}

/// What kind of accept failure `e` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptFailure {
    /// The peer gave up between SYN and accept, or a signal: retry at once.
    Transient,
    /// Out of descriptors or kernel memory: back off.
    Fds,
    /// Anything else: back off too (retrying at once is what made tonic spin).
    Other,
}

/// Classifies an accept error.
pub fn classify(e: &io::Error) -> AcceptFailure {
    match e.raw_os_error() {
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => AcceptFailure::Fds,
        Some(libc::ECONNABORTED | libc::EINTR | libc::EAGAIN | libc::EPROTO | libc::EPERM) => {
            AcceptFailure::Transient
        }
        _ => match e.kind() {
            io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock => AcceptFailure::Transient,
            _ => AcceptFailure::Other,
        },
    }
}

/// The accepted connections of one listener, for `serve_with_incoming_shutdown`. See the
/// module docs for what it guarantees; it ends only when dropped.
pub struct Incoming<L: Accept> {
    listener: L,
    settings: ConnSettings,
    cap: Cap,
    stats: Arc<ListenerStats>,
    backoff: Backoff,
    /// Set while backing off after a failed accept.
    pause: Option<Pin<Box<Sleep>>>,
    log_refused: LogLimit,
    log_fds: LogLimit,
    log_other: LogLimit,
}

impl<L: Accept> Incoming<L> {
    /// Accepts from `listener` under `settings`, counting into `stats` (whose
    /// `max_connections` must be `settings.max_connections`).
    pub fn new(listener: L, settings: ConnSettings, stats: Arc<ListenerStats>) -> Self {
        Self {
            cap: Cap::new(stats.open.clone(), settings.max_connections),
            listener,
            settings,
            stats,
            backoff: Backoff::default(),
            pause: None,
            log_refused: LogLimit::default(),
            log_fds: LogLimit::default(),
            log_other: LogLimit::default(),
        }
    }

    fn failed(&mut self, e: &io::Error, kind: AcceptFailure) {
        let pause = self.backoff.fail();
        let (counter, limit, what) = match kind {
            AcceptFailure::Fds => (
                &self.stats.accept_errors_fds,
                &self.log_fds,
                "accept failed: out of file descriptors or memory; backing off (raise LimitNOFILE or lower listen.max_connections)",
            ),
            _ => (
                &self.stats.accept_errors_other,
                &self.log_other,
                "accept failed; backing off",
            ),
        };
        bump(counter);
        if let Some(suppressed) = limit.allow(Instant::now()) {
            tracing::warn!(
                listener = %self.stats.listener,
                error = %e,
                ?pause,
                open = self.stats.open(),
                suppressed,
                "{what}"
            );
        }
        self.pause = Some(Box::pin(tokio::time::sleep(pause)));
    }

    fn refuse(&self, raw: L::Raw) {
        drop(raw);
        bump(&self.stats.refused_limit);
        if let Some(suppressed) = self.log_refused.allow(Instant::now()) {
            tracing::warn!(
                listener = %self.stats.listener,
                max = self.settings.max_connections,
                suppressed,
                "connection refused: listen.max_connections open already"
            );
        }
    }
}

impl<L: Accept> tokio_stream::Stream for Incoming<L> {
    type Item = io::Result<Conn<L::Io>>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(p) = this.pause.as_mut() {
                std::task::ready!(p.as_mut().poll(cx));
                this.pause = None;
            }
            match std::task::ready!(this.listener.poll_accept(cx)) {
                Ok(raw) => {
                    this.backoff.reset();
                    match this.cap.try_take() {
                        Some(slot) => {
                            bump(&this.stats.accepted);
                            match L::prepare(raw, &this.settings, &this.stats) {
                                Ok(io) => {
                                    let conn =
                                        Conn::new(io, slot, this.settings, this.stats.clone());
                                    return Poll::Ready(Some(Ok(conn)));
                                }
                                // Dropping the socket closes it; the slot goes back to the cap.
                                Err(e) => tracing::warn!(
                                    listener = %this.stats.listener,
                                    error = %e,
                                    "accepted connection dropped: cannot set it up"
                                ),
                            }
                        }
                        None => this.refuse(raw),
                    }
                }
                Err(e) => match classify(&e) {
                    AcceptFailure::Transient => {
                        tracing::debug!(listener = %this.stats.listener, error = %e, "accept aborted")
                    }
                    kind => this.failed(&e, kind),
                },
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// One connection

/// A connection's state shared between its IO ([`Conn`], polled by the connection task) and
/// [`ConnLayer`] (run by whichever task handles a request).
#[derive(Debug)]
pub struct ConnState {
    /// Immutable: the connection's accept time, the origin of `idle_since`.
    born: Instant,
    /// Requests whose response has not ended. Release on every change, Acquire to read.
    in_flight: AtomicUsize,
    /// Nanoseconds after `born` when the connection last became idle; only grows
    /// (`fetch_max`). Stored before the decrement that makes `in_flight` 0.
    idle_since: AtomicU64,
    /// L: the connection task's waker, stored by [`Conn`] while requests are open and taken
    /// by the request that makes `in_flight` 0, so the idle deadline is armed at once.
    waker: Mutex<Option<Waker>>,
}

impl ConnState {
    fn new(born: Instant) -> Self {
        Self {
            born,
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            waker: Mutex::new(None),
        }
    }

    fn mark_idle_from(&self, at: Instant) {
        let ns = u64::try_from(at.duration_since(self.born).as_nanos()).unwrap_or(u64::MAX);
        self.idle_since.fetch_max(ns, Ordering::Release);
    }

    fn idle_since(&self) -> Instant {
        self.born + Duration::from_nanos(self.idle_since.load(Ordering::Acquire))
    }

    /// A request started.
    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// Requests open now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }
}

/// One open request of a connection; its drop (the response ended, or was dropped) may make
/// the connection idle.
#[derive(Debug)]
pub struct InFlight(Arc<ConnState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.mark_idle_from(Instant::now());
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            if let Some(w) = self.0.waker.lock().take() {
                w.wake();
            }
        }
    }
}

/// The connect info of a [`Conn`]: the inner stream's (`peer`) plus the connection's state.
/// tonic puts it in every request's extensions (for TLS, beside `TlsConnectInfo<ConnInfo<_>>`).
#[derive(Debug, Clone)]
pub struct ConnInfo<T> {
    pub peer: T,
    state: Arc<ConnState>,
}

impl<T> ConnInfo<T> {
    pub fn state(&self) -> &Arc<ConnState> {
        &self.state
    }
}

/// Which deadline a connection is under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Handshake,
    Open,
}

/// An accepted connection: the inner IO, its slot under the listener's cap, and its
/// deadlines (see the module docs).
pub struct Conn<IO> {
    io: IO,
    state: Arc<ConnState>,
    settings: ConnSettings,
    stats: Arc<ListenerStats>,
    phase: Phase,
    preface: PrefaceWatch,
    /// Armed at the current deadline, if any.
    timer: Pin<Box<Sleep>>,
    armed: Option<Instant>,
    /// Set once the connection was failed by a deadline (counted once).
    expired: bool,
    _slot: Slot,
}

impl<IO> std::fmt::Debug for Conn<IO> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("listener", &self.stats.listener)
            .field("phase", &self.phase)
            .field("in_flight", &self.state.in_flight())
            .finish_non_exhaustive()
    }
}

impl<IO> Conn<IO> {
    fn new(io: IO, slot: Slot, settings: ConnSettings, stats: Arc<ListenerStats>) -> Self {
        let now = Instant::now();
        let state = Arc::new(ConnState::new(now));
        // Under TLS tonic times the handshake (module docs): idle from accept.
        let phase = if settings.tls {
            Phase::Open
        } else {
            Phase::Handshake
        };
        Self {
            io,
            state,
            settings,
            stats,
            phase,
            preface: PrefaceWatch::default(),
            timer: Box::pin(tokio::time::sleep_until(now.into())),
            armed: None,
            expired: false,
            _slot: slot,
        }
    }

    /// The deadline in force now: `None` while requests are open (or idle timeouts are off).
    fn deadline(&self) -> Option<(Instant, &'static str)> {
        match self.phase {
            Phase::Handshake => Some((
                self.state.born + self.settings.handshake_timeout,
                "handshake",
            )),
            Phase::Open if self.state.in_flight() > 0 => None,
            Phase::Open => self
                .settings
                .idle_timeout
                .map(|t| (self.state.idle_since() + t, "idle")),
        }
    }

    /// Fails the IO once the deadline passed; otherwise arms the timer (or, with requests
    /// open, leaves the waker for the request that ends last) so the task is woken for it.
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if self.expired {
            return Err(timed_out("connection closed by the daemon's deadline"));
        }
        let Some((at, which)) = self.deadline() else {
            if self.phase == Phase::Open && self.settings.idle_timeout.is_some() {
                let mut w = self.state.waker.lock();
                if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    *w = Some(cx.waker().clone());
                }
                drop(w);
                // The last request may have ended before the waker was stored.
                if self.state.in_flight() == 0 {
                    cx.waker().wake_by_ref();
                }
            }
            return Ok(());
        };
        if Instant::now() >= at {
            self.expired = true;
            let counter = if which == "handshake" {
                &self.stats.closed_handshake
            } else {
                &self.stats.closed_idle
            };
            bump(counter);
            tracing::debug!(listener = %self.stats.listener, deadline = which, "closing a connection");
            return Err(timed_out(match which {
                "handshake" => "HTTP/2 handshake not completed within listen.handshake_timeout",
                _ => "no request within listen.idle_timeout",
            }));
        }
        if self.armed != Some(at) {
            self.timer.as_mut().reset(at.into());
            self.armed = Some(at);
        }
        // Registers the waker; it cannot be ready since `at` is still ahead.
        let _ = self.timer.as_mut().poll(cx);
        Ok(())
    }
}

fn timed_out(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, msg)
}

impl<IO: Connected> Connected for Conn<IO> {
    type ConnectInfo = ConnInfo<IO::ConnectInfo>;
    fn connect_info(&self) -> Self::ConnectInfo {
        ConnInfo {
            peer: self.io.connect_info(),
            state: self.state.clone(),
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Conn<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        let before = buf.filled().len();
        std::task::ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        if this.phase == Phase::Handshake {
            let new = &buf.filled()[before..];
            if new.is_empty() || this.preface.feed(new) {
                // EOF ends the handshake too: hyper sees it and closes.
                this.phase = Phase::Open;
                this.state.mark_idle_from(Instant::now());
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Conn<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.io).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

// ---------------------------------------------------------------------------------------------
// The authority rewrite

/// A connection whose reads go through an authority [`Rewriter`] (when it has one); writes,
/// and the connect info tonic reads (the peer's credentials), are the inner stream's.
pub struct Rewrite<IO> {
    io: IO,
    rewriter: Option<Rewriter>,
    /// Rewritten bytes not yet handed to the reader, from `at`.
    out: Vec<u8>,
    at: usize,
    /// The inner stream ended (what was held has been moved to `out`).
    eof: bool,
    stats: Arc<ListenerStats>,
}

impl<IO> std::fmt::Debug for Rewrite<IO> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rewrite")
            .field("rewriting", &self.rewriter.is_some())
            .field("pending", &(self.out.len() - self.at))
            .finish_non_exhaustive()
    }
}

impl<IO> Rewrite<IO> {
    /// `io` read through `rewriter` (`None`: read as is), counting rewrites into `stats`.
    pub fn new(io: IO, rewriter: Option<Rewriter>, stats: Arc<ListenerStats>) -> Self {
        Self {
            io,
            rewriter,
            out: Vec::new(),
            at: 0,
            eof: false,
            stats,
        }
    }
}

impl<IO: Connected> Connected for Rewrite<IO> {
    type ConnectInfo = IO::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Rewrite<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let Some(rw) = this.rewriter.as_mut() else {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        };
        loop {
            if this.at < this.out.len() {
                let n = (this.out.len() - this.at).min(buf.remaining());
                buf.put_slice(&this.out[this.at..this.at + n]);
                this.at += n;
                if this.at == this.out.len() {
                    this.out.clear();
                    this.at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            // Read into the caller's buffer; the bytes the rewriter passes without looking
            // (DATA payloads, the bulk) stay there, the rest goes through `out`.
            let before = buf.filled().len();
            std::task::ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
            let new = &buf.filled()[before..];
            if new.is_empty() {
                rw.finish(&mut this.out);
                this.eof = true;
                continue;
            }
            let skip = rw.skip(new.len());
            if skip == new.len() {
                return Poll::Ready(Ok(()));
            }
            let n = rw.feed(&new[skip..], &mut this.out);
            if n > 0 {
                this.stats
                    .authority_rewritten
                    .fetch_add(n as u64, Ordering::Relaxed);
            }
            buf.set_filled(before + skip);
            if skip > 0 {
                return Poll::Ready(Ok(()));
            }
            // Everything read may be held (a header block not complete yet): read on.
        }
    }
}

write_through!([IO: AsyncWrite + Unpin] Rewrite<IO>, io);

// ---------------------------------------------------------------------------------------------
// Counting open requests

/// The connection state of a request, from the [`ConnInfo`] tonic put in its extensions.
pub fn request_conn(ext: &http::Extensions) -> Option<&Arc<ConnState>> {
    ext.get::<ConnInfo<UnixPeer>>()
        .map(ConnInfo::state)
        .or_else(|| ext.get::<ConnInfo<TcpConnectInfo>>().map(ConnInfo::state))
}

/// The tower layer counting each connection's open requests (see the module docs).
#[derive(Debug, Clone, Copy, Default)]
pub struct ConnLayer;

impl<S> tower::Layer<S> for ConnLayer {
    type Service = ConnCount<S>;
    fn layer(&self, inner: S) -> ConnCount<S> {
        ConnCount { inner }
    }
}

/// The service of [`ConnLayer`].
#[derive(Debug, Clone)]
pub struct ConnCount<S> {
    inner: S,
}

impl<S, B, R> tower::Service<http::Request<B>> for ConnCount<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
{
    type Response = http::Response<CountedBody<R>>;
    type Error = S::Error;
    type Future = CountedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let open = request_conn(req.extensions()).map(ConnState::begin);
        CountedFuture {
            inner: self.inner.call(req),
            open,
        }
    }
}

pin_project_lite::pin_project! {
    /// A response future holding its request's [`InFlight`], handed on to the body.
    pub struct CountedFuture<F> {
        #[pin]
        inner: F,
        open: Option<InFlight>,
    }
}

impl<F, R, E> std::future::Future for CountedFuture<F>
where
    F: std::future::Future<Output = Result<http::Response<R>, E>>,
{
    type Output = Result<http::Response<CountedBody<R>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let res = std::task::ready!(this.inner.poll(cx))?;
        let open = this.open.take();
        Poll::Ready(Ok(res.map(|inner| CountedBody { inner, open })))
    }
}

pin_project_lite::pin_project! {
    /// A response body holding its request's [`InFlight`] until it ends or is dropped.
    pub struct CountedBody<B> {
        #[pin]
        inner: B,
        open: Option<InFlight>,
    }
}

impl<B: Default> Default for CountedBody<B> {
    fn default() -> Self {
        Self {
            inner: B::default(),
            open: None,
        }
    }
}

impl<B: http_body::Body> http_body::Body for CountedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let r = std::task::ready!(this.inner.poll_frame(cx));
        if r.is_none() {
            this.open.take();
        }
        Poll::Ready(r)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_max_and_resets() {
        let mut b = Backoff::default();
        let steps: Vec<_> = (0..10).map(|_| b.fail().as_millis()).collect();
        assert_eq!(steps, [5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        b.reset();
        assert_eq!(b.fail(), BACKOFF_MIN);
        // Over 2 s of continuous failure, about ten attempts, not thousands.
        let mut b = Backoff::default();
        let (mut t, mut n) = (Duration::ZERO, 0);
        while t < Duration::from_secs(2) {
            t += b.fail();
            n += 1;
        }
        assert!(n <= 10, "{n} attempts in 2 s");
    }

    #[test]
    fn cap_gives_out_max_slots_and_takes_them_back() {
        let open = Arc::new(AtomicUsize::new(0));
        let cap = Cap::new(open.clone(), 3);
        let slots: Vec<_> = (0..3)
            .map(|_| cap.try_take().expect("under the cap"))
            .collect();
        assert!(cap.try_take().is_none());
        assert_eq!(open.load(Ordering::Relaxed), 3);
        drop(slots);
        assert_eq!(open.load(Ordering::Relaxed), 0);
        let a = cap.try_take();
        assert!(a.is_some());
        assert_eq!(open.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn fd_budget_keeps_a_reserve_and_splits_the_rest() {
        // The usual raised limit: the configured cap is what binds.
        let b = fd_budget(1 << 20, 40, 2);
        assert_eq!(b.reserve, 256);
        assert!(b.per_listener > 500_000);
        // A default soft limit of 1024: 128 reserved, the rest halved.
        let b = fd_budget(1024, 40, 2);
        assert_eq!(
            b,
            FdBudget {
                reserve: 128,
                per_listener: (1024 - 40 - 128) / 2
            }
        );
        // Tiny limits keep 16 in reserve and always allow one connection.
        assert_eq!(
            fd_budget(64, 30, 1),
            FdBudget {
                reserve: 16,
                per_listener: 18
            }
        );
        assert_eq!(fd_budget(32, 30, 1).per_listener, 1);
        assert_eq!(fd_budget(0, 30, 0).per_listener, 1);
    }

    fn preface_and_settings(payload: usize) -> Vec<u8> {
        let mut v = PREFACE.to_vec();
        v.extend_from_slice(&[0, (payload >> 8) as u8, payload as u8, 4, 0, 0, 0, 0, 0]);
        v.extend(std::iter::repeat_n(0u8, payload));
        v
    }

    #[test]
    fn preface_watch_needs_the_preface_and_the_whole_first_frame() {
        for payload in [0, 6, 18] {
            let bytes = preface_and_settings(payload);
            // All at once, with more frames behind it.
            let mut w = PrefaceWatch::default();
            let mut more = bytes.clone();
            more.extend_from_slice(&[0, 0, 0, 4, 1, 0, 0, 0, 0]);
            assert!(w.feed(&more));
            // Byte by byte: complete exactly at the last byte.
            let mut w = PrefaceWatch::default();
            for (i, b) in bytes.iter().enumerate() {
                assert_eq!(
                    w.feed(std::slice::from_ref(b)),
                    i == bytes.len() - 1,
                    "byte {i}"
                );
            }
            // Split inside the header.
            let mut w = PrefaceWatch::default();
            assert!(!w.feed(&bytes[..30]));
            assert!(w.feed(&bytes[30..]));
        }
        // A silly length is capped, so the watch still ends.
        let mut w = PrefaceWatch::default();
        let mut v = PREFACE.to_vec();
        v.extend_from_slice(&[0xff, 0xff, 0xff, 4, 0, 0, 0, 0, 0]);
        assert!(!w.feed(&v));
        assert!(w.feed(&vec![0; MAX_FIRST_FRAME]));
    }

    #[test]
    fn log_limit_allows_one_line_per_period_and_counts_the_rest() {
        let l = LogLimit::default();
        let t = Instant::now();
        assert_eq!(l.allow(t), Some(0));
        assert_eq!(l.allow(t + Duration::from_secs(1)), None);
        assert_eq!(l.allow(t + Duration::from_secs(2)), None);
        assert_eq!(l.allow(t + LOG_EVERY), Some(2));
    }

    #[test]
    fn accept_errors_are_classified() {
        let os = io::Error::from_raw_os_error;
        for e in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            assert_eq!(classify(&os(e)), AcceptFailure::Fds);
        }
        assert_eq!(classify(&os(libc::ECONNABORTED)), AcceptFailure::Transient);
        assert_eq!(classify(&os(libc::EINVAL)), AcceptFailure::Other);
    }

    #[test]
    fn a_request_ending_wakes_the_connection_and_restarts_idle() {
        let t0 = Instant::now();
        let st = Arc::new(ConnState::new(t0));
        let a = st.begin();
        let b = st.begin();
        assert_eq!(st.in_flight(), 2);
        let flag = Arc::new(Flag::default());
        *st.waker.lock() = Some(Waker::from(flag.clone()));
        drop(a);
        assert!(!flag.0.load(Ordering::SeqCst), "one request still open");
        drop(b);
        assert!(
            flag.0.load(Ordering::SeqCst),
            "the last one wakes the connection"
        );
        assert_eq!(st.in_flight(), 0);
        assert!(st.idle_since() > t0);
    }

    #[derive(Default)]
    struct Flag(std::sync::atomic::AtomicBool);
    impl std::task::Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    /// A client stream read through [`Rewrite`] in tiny reads, with the writer pausing inside
    /// a header block and a DATA frame: the reader gets exactly what a [`Rewriter`] fed the
    /// whole stream gives, never an early EOF, and the rewrite is counted.
    #[test]
    fn rewrite_reads_what_the_rewriter_gives_whatever_the_reads() {
        fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
            let len = payload.len() as u32;
            let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
            f.extend_from_slice(&1u32.to_be_bytes());
            f.extend_from_slice(payload);
            f
        }
        let path = b"/tmp/a/wqd.sock";
        let mut block = vec![0x83, 0x86, 0x41, path.len() as u8];
        block.extend_from_slice(path);
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, &[]));
        input.extend(frame(0x1, 0, &block[..5]));
        input.extend(frame(0x9, 0x4, &block[5..]));
        input.extend(frame(0x0, 0x1, &vec![7; 100_000]));
        let mut want = Vec::new();
        let mut rw = Rewriter::new();
        assert_eq!(rw.feed(&input, &mut want), 1);
        rw.finish(&mut want);
        assert_ne!(want, input);

        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let got = rt.block_on(async {
            let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
            let writer = std::thread::spawn({
                let input = input.clone();
                move || {
                    let mut a = a;
                    // Pauses inside the HEADERS frame, the CONTINUATION and the DATA payload.
                    for part in input.chunks(33) {
                        std::io::Write::write_all(&mut a, part).unwrap();
                        std::thread::sleep(Duration::from_micros(200));
                    }
                }
            });
            b.set_nonblocking(true).unwrap();
            let b = tokio::net::UnixStream::from_std(b).unwrap();
            let stats = Arc::new(ListenerStats::new(Listener::Unix, 1));
            let mut r = Rewrite::new(b, Some(Rewriter::new()), stats.clone());
            let mut got = Vec::new();
            loop {
                let mut space = [0u8; 7];
                let mut buf = ReadBuf::new(&mut space);
                std::future::poll_fn(|cx| Pin::new(&mut r).poll_read(cx, &mut buf))
                    .await
                    .unwrap();
                if buf.filled().is_empty() {
                    break;
                }
                got.extend_from_slice(buf.filled());
            }
            writer.join().unwrap();
            assert_eq!(stats.authority_rewritten.load(Ordering::Relaxed), 1);
            got
        });
        assert_eq!(got.len(), want.len());
        assert!(got == want, "the bytes read differ from the rewriter's");
    }
}
