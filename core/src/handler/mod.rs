//! Handlers: what an item does when it runs.
//!
//! A [`Handler`] is looked up by name in a [`Registry`] when a batch is submitted
//! ([`Handler::validate`] runs then, so a bad argument rejects the whole batch before anything
//! is queued) and called on a worker thread pinned to the item's CPU ([`Handler::run`]).
//! Invariant: handlers never see an item twice, and a handler that waits instead of computing
//! says so through [`Handler::kind`], so the engine does not count it against the CPU's
//! `max_active` slots.
//!
//! Built-ins live in [`builtin`] (`noop`, `spin`, `sleep`, `digest`) and [`exec`] (allowlisted
//! commands, absent unless configured).

pub mod builtin;
pub mod exec;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

/// Item arguments: `k=v` pairs given at submit time.
pub type Args = BTreeMap<String, String>;

/// Errors of the handler layer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandlerError {
    /// Rejected at submit time: the arguments or payload are not what the handler takes.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The handler ran and failed; the text becomes the item's error.
    #[error("{0}")]
    Failed(String),
    /// The handler observed its cancellation signal and stopped.
    #[error("cancelled")]
    Cancelled,
    /// The handler ran past its time limit and was stopped.
    #[error("timed out after {0:?}")]
    TimedOut(Duration),
}

/// Whether a handler computes or waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandlerKind {
    /// Occupies the CPU while it runs; counts against `max_active`.
    CpuBound,
    /// Mostly waits (a timer, a child process); does not hold a `max_active` slot.
    Waits,
}

/// The cancellation signal of one item. Cheap to clone; observable by polling
/// ([`CancelToken::is_cancelled`]) or by waiting ([`CancelToken::wait_timeout`]).
///
/// The flag is an atomic, so polling it and lowering it (once per item, by the engine's
/// workers) cost a load and a store; the mutex and condvar serve only the waiters: `cancel`
/// raises the flag with the mutex held and then wakes them, and a waiter checks the flag with
/// the mutex held before it sleeps, so no wake-up is lost.
#[derive(Clone, Default)]
pub struct CancelToken(Arc<TokenState>);

#[derive(Default)]
struct TokenState {
    raised: AtomicBool,
    lock: Mutex<()>,
    cv: Condvar,
}

impl CancelToken {
    pub fn new() -> Self {
        Self::default()
    }
    /// Raises the signal and wakes every waiter. Idempotent.
    pub fn cancel(&self) {
        let _g = self.0.lock.lock();
        self.0.raised.store(true, Ordering::Release);
        self.0.cv.notify_all();
    }
    /// Lowers the signal. The engine reuses one token per worker: it resets it under its lock
    /// when it binds the worker's next item, after the previous item finished (so no cancel can
    /// still target that item). A handler must not keep the token beyond its `run`.
    pub fn reset(&self) {
        self.0.raised.store(false, Ordering::Release);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.raised.load(Ordering::Acquire)
    }
    /// Waits up to `d`; returns `true` if the signal was raised (now or before).
    pub fn wait_timeout(&self, d: Duration) -> bool {
        let deadline = std::time::Instant::now() + d;
        let mut g = self.0.lock.lock();
        while !self.is_cancelled() {
            if self.0.cv.wait_until(&mut g, deadline).timed_out() {
                break;
            }
        }
        self.is_cancelled()
    }
}

impl std::fmt::Debug for CancelToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CancelToken({})", self.is_cancelled())
    }
}

/// What a running handler may see of its item.
pub struct WorkCtx<'a> {
    /// The item's id.
    pub item: u64,
    /// The logical CPU the item was started on.
    pub cpu: u32,
    /// Whether the worker thread is really pinned to `cpu` (off with fixture topologies).
    pub pinned: bool,
    pub args: &'a Args,
    pub payload: &'a [u8],
    pub cancel: &'a CancelToken,
}

/// A kind of work. Implementations must be cheap to call concurrently from many workers.
pub trait Handler: Send + Sync + 'static {
    /// The name clients use (`noop`, `spin`, ...).
    fn name(&self) -> &str;
    /// Whether it computes or waits; see [`HandlerKind`].
    fn kind(&self) -> HandlerKind {
        HandlerKind::CpuBound
    }
    /// Checks arguments and payload at submit time.
    ///
    /// # Errors
    /// [`HandlerError::InvalidArgument`] saying which argument is wrong and what was expected.
    fn validate(&self, args: &Args, payload: &[u8]) -> Result<(), HandlerError>;
    /// Runs one item and returns its output bytes.
    ///
    /// # Errors
    /// [`HandlerError::Failed`], [`HandlerError::Cancelled`] or [`HandlerError::TimedOut`];
    /// a panic is caught by the engine and also becomes `failed`.
    fn run(&self, ctx: &WorkCtx<'_>) -> Result<Vec<u8>, HandlerError>;
}

/// Handlers by name.
#[derive(Clone, Default)]
pub struct Registry {
    map: HashMap<String, Arc<dyn Handler>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }
    /// `noop`, `spin`, `sleep` and `digest`; `exec` only when `exec` is configured.
    pub fn with_builtins(exec: Option<exec::ExecConfig>) -> Self {
        let mut r = Self::new();
        r.register(Arc::new(builtin::Noop));
        r.register(Arc::new(builtin::Spin));
        r.register(Arc::new(builtin::Sleep));
        r.register(Arc::new(builtin::Digest));
        if let Some(cfg) = exec {
            r.register(Arc::new(exec::Exec::new(cfg)));
        }
        r
    }
    /// Adds or replaces a handler under its name.
    pub fn register(&mut self, h: Arc<dyn Handler>) {
        self.map.insert(h.name().to_string(), h);
    }
    pub fn get(&self, name: &str) -> Option<&Arc<dyn Handler>> {
        self.map.get(name)
    }
    /// Registered names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<_> = self.map.keys().cloned().collect();
        v.sort();
        v
    }
}
