//! The engine: workqueues, per-CPU pools of pinned workers, late-binding dispatch, flush,
//! cancel, delayed work, deadlines, results and the watchdog.
//!
//! [`Engine`] owns one scheduler state behind one lock (see `sched/mod.rs`), a timer thread, a
//! watchdog thread and, per live CPU, a pool of worker threads pinned to that CPU. Items wait
//! in queues per (workqueue, target) and are bound to a CPU only when a worker of a live CPU of
//! their group takes them, so pending work never sits on a CPU that went away.
//!
//! Invariant (the contract): every accepted item reaches exactly one terminal state, once; an
//! item starts only on a CPU that is live at that moment and eligible for its group (or the
//! widened group its workqueue's fallback chose, recorded in its result); a flush returns once
//! every covered item is terminal. The protocol, its races and why each is safe are in
//! `README.md` beside this file.

mod clock;
mod epoch;
mod idhash;
mod items;
mod lock;
mod sched;
mod signal;
mod timer;
mod watchdog;
mod worker;

/// The atomics `epoch` is written against: `std`'s here, loom's when `core/tests/loom_epoch.rs`
/// includes the file to model-check it.
mod sync {
    pub(crate) use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    pub(crate) fn spin_loop() {
        std::hint::spin_loop();
    }
}

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::{Mutex, RwLock};

use crate::cpuset::{CpuSet, MAX_CPUS};
use crate::groups::{Fallback, GroupError, Level, Placement};
use crate::handler::{Args, HandlerError, Registry};
use crate::live::Snapshot;
use crate::target::Target;
use sched::Delivery;

pub use sched::remote::{
    check_name as check_worker_handler_name, RemoteAnswer, RemoteInfo, RemoteJob, RemoteWorker,
    SlotInfo, WorkerMeta,
};
pub use sched::ItemId;

/// A batch's id.
pub type BatchId = u64;

/// Errors of the engine layer. The RPC layer maps each to one gRPC status.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    #[error("unknown workqueue {}", crate::quote::quote(.0))]
    UnknownWorkqueue(String),
    #[error("workqueue {} already exists", crate::quote::quote(.0))]
    WorkqueueExists(String),
    #[error("invalid workqueue attributes: {0}")]
    InvalidAttrs(String),
    #[error("workqueue {name:?} is not empty ({items} items not terminal)")]
    WorkqueueNotEmpty { name: String, items: usize },
    #[error("the default workqueue cannot be deleted")]
    DefaultWorkqueue,
    #[error("item {index}: {source}")]
    Group {
        index: usize,
        #[source]
        source: GroupError,
    },
    #[error("item {index}: unknown handler {} (known: {known})", crate::quote::quote(.name))]
    UnknownHandler {
        index: usize,
        name: String,
        known: String,
    },
    #[error("item {index}: {source}")]
    Handler {
        index: usize,
        #[source]
        source: HandlerError,
    },
    /// An item's `delay` or `deadline` is over the engine's limit (or would overflow the
    /// clock). Nothing of the batch is queued.
    #[error("item {index}: {field}: {problem}")]
    Duration {
        index: usize,
        field: &'static str,
        problem: String,
    },
    #[error("workqueue {} is draining and refuses new work (it was drained or deleted; it accepts work again once empty, or after UpdateWorkqueue)", crate::quote::quote(.0))]
    Draining(String),
    #[error("workqueue {workqueue:?} is full: {pending} items not terminal, max_queued is {limit}, the batch adds {adding}")]
    QueueFull {
        workqueue: String,
        limit: usize,
        pending: usize,
        adding: usize,
    },
    #[error("unknown batch {0}")]
    UnknownBatch(BatchId),
    #[error("unknown item {0}")]
    UnknownItem(ItemId),
    #[error("the engine is shutting down")]
    ShuttingDown,
    #[error("timed out after {0:?}; the work goes on")]
    Timeout(Duration),
    /// An attached worker broke the protocol, or asked for something it may not have (a
    /// built-in name, a CPU the machine lacks, a slot it did not open...).
    #[error("{0}")]
    Worker(String),
}

/// An item's state. The last five are terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum State {
    /// Waiting for its `delay` to pass.
    Delayed,
    /// Queued, bound to no CPU.
    Pending,
    /// Bound to a worker of a CPU (about to start, or running).
    Running,
    Ok,
    Failed,
    Cancelled,
    Expired,
    Rejected,
}

impl State {
    pub const ALL: [State; 8] = [
        State::Delayed,
        State::Pending,
        State::Running,
        State::Ok,
        State::Failed,
        State::Cancelled,
        State::Expired,
        State::Rejected,
    ];
    pub fn is_terminal(self) -> bool {
        !matches!(self, State::Delayed | State::Pending | State::Running)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            State::Delayed => "delayed",
            State::Pending => "pending",
            State::Running => "running",
            State::Ok => "ok",
            State::Failed => "failed",
            State::Cancelled => "cancelled",
            State::Expired => "expired",
            State::Rejected => "rejected",
        }
    }
    fn index(self) -> usize {
        self as usize
    }
}

crate::display_as_str!(State);

/// What happened to an item (terminal), or where it stands (pending/running).
#[derive(Debug, Clone, PartialEq)]
pub struct ItemResult {
    pub id: ItemId,
    pub batch: BatchId,
    pub workqueue: Arc<str>,
    pub state: State,
    pub output: Vec<u8>,
    pub error: String,
    pub target: Target,
    pub handler: Arc<str>,
    /// The CPU the item started on (where its worker verified it was running).
    pub cpu_started: Option<u32>,
    /// The CPU it was on when the handler returned (differs if the CPU went away meanwhile).
    pub cpu_finished: Option<u32>,
    /// The enclosing level it ran in because its own group had no live CPU.
    pub fallback: Option<Level>,
    /// Why a fallback, rejection or expiry happened, in words.
    pub reason: String,
    /// How often it was bound to a CPU and handed back before it started (counted up to
    /// 65 535, then it stays there).
    pub rebinds: u32,
    pub queued_at: SystemTime,
    /// Wall-clock times. A worker running a batch of quick items back to back reads the wall
    /// clock at the batch's first start and after its last end, and places the times in
    /// between by the CPU's counter (linear interpolation: each time lies between those two
    /// readings, and an item never ends before it starts; see `engine/clock.rs`).
    pub started_at: Option<SystemTime>,
    pub finished_at: Option<SystemTime>,
    /// The topology epoch in which the item started.
    pub epoch_started: Option<u64>,
    /// The topology epoch in which its fallback (widening) or rejection was decided; `None`
    /// when neither applied.
    pub epoch_decided: Option<u64>,
    /// The attached worker that ran it (or held it last): its id, pid and slot. `None` for
    /// built-in handlers and items no worker took.
    pub worker: Option<WorkerRef>,
    /// Times a worker was lost while holding it and it was queued again (`on_worker_lost =
    /// requeue`): more than 0 means at-least-once.
    pub worker_lost: u32,
}

/// An attached worker's slot as an item's result names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerRef {
    pub worker: u64,
    pub pid: u32,
    pub slot: u32,
}

impl ItemResult {
    /// Time from queueing to start.
    pub fn wait_time(&self) -> Option<Duration> {
        self.started_at?.duration_since(self.queued_at).ok()
    }
    /// Time from start to finish.
    pub fn run_time(&self) -> Option<Duration> {
        self.finished_at?.duration_since(self.started_at?).ok()
    }
    /// Its fields, borrowed.
    pub fn view(&self) -> ResultView<'_> {
        ResultView {
            id: self.id,
            batch: self.batch,
            workqueue: &self.workqueue,
            state: self.state,
            output: &self.output,
            error: &self.error,
            target: &self.target,
            handler: &self.handler,
            cpu_started: self.cpu_started,
            cpu_finished: self.cpu_finished,
            fallback: self.fallback,
            reason: &self.reason,
            rebinds: self.rebinds,
            queued_at: self.queued_at,
            started_at: self.started_at,
            finished_at: self.finished_at,
            epoch_started: self.epoch_started,
            epoch_decided: self.epoch_decided,
            worker: self.worker,
            worker_lost: self.worker_lost,
        }
    }
}

/// The fields of an [`ItemResult`], borrowed: what an encoder reads, from an `ItemResult` or
/// from a [`ResultRecord`] without making one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ResultView<'a> {
    pub id: ItemId,
    pub batch: BatchId,
    pub workqueue: &'a Arc<str>,
    pub state: State,
    pub output: &'a [u8],
    pub error: &'a str,
    pub target: &'a Target,
    pub handler: &'a Arc<str>,
    pub cpu_started: Option<u32>,
    pub cpu_finished: Option<u32>,
    pub fallback: Option<Level>,
    pub reason: &'a str,
    pub rebinds: u32,
    pub queued_at: SystemTime,
    pub started_at: Option<SystemTime>,
    pub finished_at: Option<SystemTime>,
    pub epoch_started: Option<u64>,
    pub epoch_decided: Option<u64>,
    pub worker: Option<WorkerRef>,
    pub worker_lost: u32,
}

impl ResultView<'_> {
    /// An owned copy (names counted, texts copied).
    pub fn to_result(&self) -> ItemResult {
        ItemResult {
            id: self.id,
            batch: self.batch,
            workqueue: self.workqueue.clone(),
            state: self.state,
            output: self.output.to_vec(),
            error: self.error.to_owned(),
            target: self.target.clone(),
            handler: self.handler.clone(),
            cpu_started: self.cpu_started,
            cpu_finished: self.cpu_finished,
            fallback: self.fallback,
            reason: self.reason.to_owned(),
            rebinds: self.rebinds,
            queued_at: self.queued_at,
            started_at: self.started_at,
            finished_at: self.finished_at,
            epoch_started: self.epoch_started,
            epoch_decided: self.epoch_decided,
            worker: self.worker,
            worker_lost: self.worker_lost,
        }
    }
}

/// A full result as an at-end flush hands it over ([`Flush::next_delivered`]): the engine's
/// compact record, read in place ([`ResultRecord::view`]) or made into an [`ItemResult`].
pub struct ResultRecord(sched::Stored);

impl ResultRecord {
    pub fn id(&self) -> ItemId {
        self.0.id()
    }
    pub fn state(&self) -> State {
        self.0.state()
    }
    /// Its fields, borrowed.
    pub fn view(&self) -> ResultView<'_> {
        self.0.view(None)
    }
    /// The result as [`FlushEvent::Done`] carries it.
    pub fn to_result(&self) -> ItemResult {
        self.0.to_result(None)
    }
}

impl fmt::Debug for ResultRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.view().fmt(f)
    }
}

/// What [`Flush::next_delivered`] returns: an event, or the full results an at-end flush
/// kept, as records.
#[derive(Debug)]
pub enum Delivered {
    Event(FlushEvent),
    Records(Vec<ResultRecord>),
}

/// A workqueue's attributes.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkqueueAttrs {
    pub name: String,
    /// CPU-bound items of this workqueue running at once on one CPU (default 1).
    pub max_active: u32,
    /// Waiting items (handlers of kind `Waits`) of this workqueue at once on one CPU.
    pub max_waiting: u32,
    /// Items of this workqueue running at once in one group (0 = no cap).
    pub group_max_active: u32,
    /// Strict FIFO across the whole workqueue, one item at a time.
    pub ordered: bool,
    /// Nice value of the worker while it runs this workqueue's items.
    pub nice: i32,
    pub placement: Placement,
    pub fallback: Fallback,
    /// Items not yet terminal that the workqueue holds at most; more is RESOURCE_EXHAUSTED.
    pub max_queued: usize,
    /// Attached-worker handlers: what an item becomes when the worker holding it is lost.
    pub on_worker_lost: WorkerLost,
    /// Attached-worker handlers: what an item does while no attached worker serves it.
    pub unserved: Unserved,
    /// What the workqueue keeps of an item once it is terminal.
    pub results: ResultsMode,
}

/// What a workqueue keeps of each item once it is terminal (workqueue attribute `results`).
/// Whatever the mode, every item reaches exactly one terminal state and flushes wait for it;
/// the mode only says what is recorded about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ResultsMode {
    /// A full [`ItemResult`] per item: flushes stream it, the result store keeps it (bounded by
    /// count, age and bytes) for `GetResults`.
    #[default]
    Full,
    /// Counts and latencies only: the per-state counts and the wait and run times (metrics,
    /// [`FlushSummary`]), but no per-item record; flushes and waits report counts, and
    /// `GetResults` knows the item only while it is live.
    Summary,
    /// Counts only: as `Summary`, without observing latencies.
    None,
}

impl ResultsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ResultsMode::Full => "full",
            ResultsMode::Summary => "summary",
            ResultsMode::None => "none",
        }
    }
}

crate::display_as_str!(ResultsMode);

impl std::str::FromStr for ResultsMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "full" => Ok(ResultsMode::Full),
            "summary" => Ok(ResultsMode::Summary),
            "none" => Ok(ResultsMode::None),
            _ => Err(format!(
                "unknown results mode {}; expected full, summary or none",
                crate::quote::quote(s)
            )),
        }
    }
}

/// What an item held by a lost attached worker becomes (workqueue attribute `on_worker_lost`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WorkerLost {
    /// `failed`, error "worker lost: ...": at-most-once.
    #[default]
    Fail,
    /// Queued again, its result counting the loss (`ItemResult::worker_lost`): at-least-once.
    Requeue,
}

/// What an item of an attached-worker handler does while no worker serves that handler
/// (workqueue attribute `unserved`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Unserved {
    /// It waits for a worker (bounded by its deadline).
    #[default]
    Wait,
    /// It is rejected: at submit, or when the last worker serving its handler leaves.
    Reject,
}

impl WorkerLost {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerLost::Fail => "fail",
            WorkerLost::Requeue => "requeue",
        }
    }
}

crate::display_as_str!(WorkerLost);

impl std::str::FromStr for WorkerLost {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fail" => Ok(WorkerLost::Fail),
            "requeue" => Ok(WorkerLost::Requeue),
            _ => Err(format!(
                "unknown on_worker_lost {}; expected fail or requeue",
                crate::quote::quote(s)
            )),
        }
    }
}

impl Unserved {
    pub fn as_str(self) -> &'static str {
        match self {
            Unserved::Wait => "wait",
            Unserved::Reject => "reject",
        }
    }
}

crate::display_as_str!(Unserved);

impl std::str::FromStr for Unserved {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "wait" => Ok(Unserved::Wait),
            "reject" => Ok(Unserved::Reject),
            _ => Err(format!(
                "unknown unserved policy {}; expected wait or reject",
                crate::quote::quote(s)
            )),
        }
    }
}

/// How many of a batch's last distinct bodies its later entries are compared with (see
/// `Engine::bodies`): a fan-out over up to this many groups makes one body per group.
const RECENT_BODIES: usize = 16;

/// `max_queued` of a workqueue made with [`WorkqueueAttrs::named`] (an in-process engine); the
/// daemon passes its `limits.max_queued` to [`WorkqueueAttrs::new`] instead.
pub const DEFAULT_MAX_QUEUED: usize = 1 << 20;

/// How long a worker with nothing to take, and a thread waiting in [`Flush::wait`], keep
/// checking for work (or the flush's end) before they sleep. Work that arrives within it is
/// found without a futex wake-up, which costs tens of microseconds on a VM (rayon and tokio
/// spin the same way). Bounded; see [`spin`] for its yields and when it stops early.
pub(crate) const SPIN: Duration = Duration::from_micros(50);

/// A yield that kept the thread off its CPU longer than this means it shares the CPU with a
/// thread that does not sleep (beside one, some yields last a time slice, 1.5–4 ms on this
/// host): [`spin`] stops yielding for [`BUSY_PAUSE`]. Ten times the spin's own length; on a
/// quiet host a yield that long is rare (one in 1.6 s of `Submit(wait)` batches of 1 000,
/// whose workers yield thousands of times a second there, session 35).
const YIELD_SLOW: Duration = Duration::from_micros(500);

/// How long a thread that found its CPU shared (see [`YIELD_SLOW`]) spins without yielding.
const BUSY_PAUSE: Duration = Duration::from_millis(100);

std::thread_local! {
    /// Until when this thread spins without yielding (see [`spin`]).
    static NO_YIELD_UNTIL: std::cell::Cell<Option<Instant>> = const { std::cell::Cell::new(None) };
}

/// One round of a spin the caller bounds (by [`SPIN`] mostly): a pause hint, and every 64
/// rounds a yield, unless this thread found its CPU shared with a thread that never sleeps.
///
/// The yield lets a thread that shares the CPU and has work (the daemon's RPC thread, on a
/// small host) run at once instead of after the spin: on two CPUs, `Submit(wait)` of 1 000
/// ran about 5% faster with it than with no yield at all. But a yield puts the thread behind
/// every runnable thread of its CPU, and beside a thread that never sleeps each costs from
/// 20 µs to a whole time slice. So a yield that took longer than [`YIELD_SLOW`] stops this
/// thread's yields for [`BUSY_PAUSE`]; it spins on without them, and finds its work without
/// a futex wake-up. Sessions 30–34 stopped spinning for the pause instead (the thread slept
/// at once and was woken through the futex): beside a `nice 10` spinning thread on each CPU,
/// the daemon's session requests of 1 000 ran 2.1–3.2M items/s that way and 2.9–3.8M this
/// way, beside `nice 0` ones 1.2–1.3M and 1.6–2.1M, and batches of 100 in process took 700
/// and 510–530 ns per item; on a quiet host the same (session 35, `docs/benchmarks.md`).
pub(crate) fn spin(rounds: &mut u32) {
    *rounds = rounds.wrapping_add(1);
    if !rounds.is_multiple_of(64) {
        std::hint::spin_loop();
        return;
    }
    let now = Instant::now();
    if NO_YIELD_UNTIL.get().is_some_and(|t| now < t) {
        std::hint::spin_loop();
        return;
    }
    std::thread::yield_now();
    let back = Instant::now();
    if back.duration_since(now) > YIELD_SLOW {
        NO_YIELD_UNTIL.set(Some(back + BUSY_PAUSE));
    }
}

/// Whether this thread's spins yield now (see [`spin`]); for tests.
#[cfg(test)]
pub(crate) fn spin_yields() -> bool {
    NO_YIELD_UNTIL.get().is_none_or(|t| Instant::now() >= t)
}

/// Attributes to set on a workqueue, `None` keeping the value there is (the default, for a new
/// one): what a config entry, a `CreateWorkqueue` (zero values unset) or an `UpdateWorkqueue`
/// asks for, in the engine's types. Applied by [`WorkqueueAttrs::apply`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkqueueChanges {
    pub max_active: Option<u32>,
    pub max_waiting: Option<u32>,
    pub group_max_active: Option<u32>,
    pub ordered: Option<bool>,
    pub nice: Option<i32>,
    pub placement: Option<Placement>,
    pub fallback: Option<Fallback>,
    pub max_queued: Option<usize>,
    pub on_worker_lost: Option<WorkerLost>,
    pub unserved: Option<Unserved>,
    pub results: Option<ResultsMode>,
}

impl WorkqueueAttrs {
    /// The one constructor: workqueue `name` with the defaults `docs/workqueues.md` documents
    /// (max_active 1, max_waiting 256, no group cap, not ordered, nice 0, placement spread,
    /// fallback widen, on_worker_lost fail, unserved wait, results full) and `max_queued`, the one default
    /// that is the caller's to give (the daemon's `limits.max_queued`).
    pub fn new(name: &str, max_queued: usize) -> Self {
        Self {
            name: name.to_string(),
            max_active: 1,
            max_waiting: 256,
            group_max_active: 0,
            ordered: false,
            nice: 0,
            placement: Placement::default(),
            fallback: Fallback::default(),
            max_queued,
            on_worker_lost: WorkerLost::default(),
            unserved: Unserved::default(),
            results: ResultsMode::default(),
        }
    }

    /// [`WorkqueueAttrs::new`] with [`DEFAULT_MAX_QUEUED`].
    pub fn named(name: &str) -> Self {
        Self::new(name, DEFAULT_MAX_QUEUED)
    }

    /// Sets every attribute `c` names and leaves the others. Does not [`validate`]: the engine
    /// does when the attributes are used.
    ///
    /// [`validate`]: WorkqueueAttrs::validate
    pub fn apply(&mut self, c: &WorkqueueChanges) {
        let WorkqueueChanges {
            max_active,
            max_waiting,
            group_max_active,
            ordered,
            nice,
            placement,
            fallback,
            max_queued,
            on_worker_lost,
            unserved,
            results,
        } = *c;
        self.max_active = max_active.unwrap_or(self.max_active);
        self.max_waiting = max_waiting.unwrap_or(self.max_waiting);
        self.group_max_active = group_max_active.unwrap_or(self.group_max_active);
        self.ordered = ordered.unwrap_or(self.ordered);
        self.nice = nice.unwrap_or(self.nice);
        self.placement = placement.unwrap_or(self.placement);
        self.fallback = fallback.unwrap_or(self.fallback);
        self.max_queued = max_queued.unwrap_or(self.max_queued);
        self.on_worker_lost = on_worker_lost.unwrap_or(self.on_worker_lost);
        self.unserved = unserved.unwrap_or(self.unserved);
        self.results = results.unwrap_or(self.results);
    }

    /// `self` after [`apply`](WorkqueueAttrs::apply).
    #[must_use]
    pub fn with(mut self, c: &WorkqueueChanges) -> Self {
        self.apply(c);
        self
    }

    /// Checks the attributes.
    ///
    /// # Errors
    /// [`EngineError::InvalidAttrs`] naming the attribute and the allowed range.
    pub fn validate(&self) -> Result<(), EngineError> {
        let bad = |m: String| Err(EngineError::InvalidAttrs(m));
        let ok_name = !self.name.is_empty()
            && self.name != "."
            && self.name != ".."
            && self.name.len() <= 64
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
        if !ok_name {
            return bad(format!(
                "name {} must be 1-64 characters of [A-Za-z0-9._-], not \".\" or \"..\"",
                crate::quote::quote(&self.name)
            ));
        }
        if self.max_active == 0 || self.max_active > 512 {
            return bad(format!("max_active {} must be in 1..=512", self.max_active));
        }
        if self.max_waiting == 0 || self.max_waiting > 4096 {
            return bad(format!(
                "max_waiting {} must be in 1..=4096",
                self.max_waiting
            ));
        }
        if !(-20..=19).contains(&self.nice) {
            return bad(format!("nice {} must be in -20..=19", self.nice));
        }
        if self.max_queued == 0 {
            return bad("max_queued must be at least 1".into());
        }
        Ok(())
    }
}

impl Default for WorkqueueAttrs {
    /// The `default` workqueue of an in-process engine: [`WorkqueueAttrs::named`]`("default")`.
    fn default() -> Self {
        Self::named("default")
    }
}

/// A batch of items to submit: runs of copies of an [`ItemSpec`]. `N` copies of one item (the
/// common "N in parallel on this group") cost one spec, one handler look-up and one
/// validation, not `N`; entry *i* of the batch is still item `first + i` of its receipt.
/// A `Vec<ItemSpec>` (or one `ItemSpec`) converts into a batch of runs of one.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    runs: Vec<(ItemSpec, usize)>,
    len: usize,
}

impl Batch {
    pub fn new() -> Batch {
        Batch::default()
    }

    /// Appends one item.
    pub fn push(&mut self, spec: ItemSpec) -> &mut Batch {
        self.copies(spec, 1)
    }

    /// Appends `n` copies of `spec` (nothing when `n` is 0).
    pub fn copies(&mut self, spec: ItemSpec, n: usize) -> &mut Batch {
        if n > 0 {
            self.runs.push((spec, n));
            self.len += n;
        }
        self
    }

    /// Items in the batch, copies counted.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The runs: each spec with its number of copies, in order.
    pub fn runs(&self) -> &[(ItemSpec, usize)] {
        &self.runs
    }

    /// Every entry in order, a run's spec once per copy.
    pub fn iter(&self) -> impl Iterator<Item = &ItemSpec> + '_ {
        self.runs
            .iter()
            .flat_map(|(spec, n)| std::iter::repeat_n(spec, *n))
    }
}

impl From<Vec<ItemSpec>> for Batch {
    fn from(items: Vec<ItemSpec>) -> Batch {
        Batch {
            len: items.len(),
            runs: items.into_iter().map(|it| (it, 1)).collect(),
        }
    }
}

impl From<ItemSpec> for Batch {
    fn from(item: ItemSpec) -> Batch {
        Batch {
            runs: vec![(item, 1)],
            len: 1,
        }
    }
}

/// One item to submit.
#[derive(Debug, Clone)]
pub struct ItemSpec {
    pub target: Target,
    pub handler: String,
    pub args: Args,
    pub payload: Vec<u8>,
    /// At most one pending item per key and workqueue (the kernel's `queue_work` returning false).
    pub key: Option<String>,
    /// Queue only after this long (delayed work). Zero is the same as `None`. At most the
    /// engine's `max_delay` ([`EngineError::Duration`] beyond it).
    pub delay: Option<Duration>,
    /// Not started within this long of submission → `expired`. Zero is the same as `None`
    /// (no deadline), as on the wire. At most the engine's `max_deadline`.
    pub deadline: Option<Duration>,
}

impl ItemSpec {
    pub fn new(target: Target, handler: &str) -> Self {
        Self {
            target,
            handler: handler.to_string(),
            args: Args::new(),
            payload: Vec::new(),
            key: None,
            delay: None,
            deadline: None,
        }
    }
    pub fn arg(mut self, k: &str, v: &str) -> Self {
        self.args.insert(k.to_string(), v.to_string());
        self
    }
}

/// What submit did with one item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Submitted {
    /// The item's id; for a duplicate key, the id of the pending item it matched.
    pub id: ItemId,
    /// False when the key was already pending and nothing new was queued.
    pub queued: bool,
}

/// What submit did with a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    pub batch: BatchId,
    /// The id reserved for entry 0; entry i's slot is `first + i` (duplicates included).
    pub first: ItemId,
    pub items: Vec<Submitted>,
}

/// What a flush covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FlushScope {
    Items(Vec<ItemId>),
    Batch(BatchId),
    /// Every item of the workqueue queued or running when the flush began (not those queued
    /// after, and not its delayed items: the flush counts those in
    /// [`Flush::delayed_not_covered`]), like the kernel's `flush_workqueue()`.
    Workqueue(String),
    /// As [`FlushScope::Workqueue`], and its delayed items too: they are queued at once (the
    /// kernel's `flush_delayed_work()` on each) and covered.
    WorkqueueAll(String),
}

impl FlushScope {
    /// Whether a delayed item this scope covers is queued at once. Item and batch scopes do
    /// (`flush_delayed_work`); a plain workqueue scope leaves delayed items out.
    pub(crate) fn promotes_delayed(&self) -> bool {
        !matches!(self, FlushScope::Workqueue(_))
    }
}

/// One event of a flush.
#[derive(Debug, Clone)]
pub enum FlushEvent {
    /// A covered item is terminal.
    Done(Arc<ItemResult>),
    /// A covered item's result has already expired from the result store.
    Gone(ItemId),
    /// A covered item of a workqueue that keeps no per-item results (`results = summary` or
    /// `none`) is terminal, in this state.
    Ended(ItemId, State),
}

/// What a flush's channel carries: one event, or the events of the items a worker's batch
/// ended in one lock hold (one send and at most one wake-up of the waiter for all of them).
pub(crate) enum FlushMsg {
    One(FlushEvent),
    Many(Vec<FlushEvent>),
    /// What an at-end flush learnt (`sched::Kept`): its full results as records, made into
    /// `Done` events by the receiver. A part of at least `KEPT_CHUNK` entries while covered
    /// items are live, the rest with the last one.
    Kept(sched::Kept),
}

/// Whether the flush of [`Engine::submit_flush`] counts instead of sending an event per item.
#[derive(Debug, Clone, Copy)]
enum Counting {
    Always,
    Never,
    /// Unless the workqueue keeps full results.
    UnlessFull,
}

impl Counting {
    /// How the flush delivers, given the workqueue's results mode.
    fn delivery(self) -> fn(ResultsMode) -> Delivery {
        match self {
            Counting::Always => |_| Delivery::Count,
            Counting::Never => |_| Delivery::Stream,
            Counting::UnlessFull => |m| match m {
                ResultsMode::Full => Delivery::AtEnd,
                _ => Delivery::Count,
            },
        }
    }
}

/// A flush in progress. Dropping it stops the wait, never the work.
pub struct Flush {
    inner: Arc<Inner>,
    id: Option<u64>,
    rx: flume::Receiver<FlushMsg>,
    /// Events of a received `FlushMsg::Many` not yet returned.
    pending: std::collections::VecDeque<FlushEvent>,
    covered: usize,
    /// Delayed items of a workqueue scope that the flush left out.
    delayed_not_covered: usize,
    began: Instant,
    /// Set for summary-only flushes (`Engine::flush_summary`): the counts, filled under the
    /// engine lock; final once `rx` is disconnected.
    tally: Option<Arc<Mutex<Tally>>>,
    /// Covered items counted by state from their batch's record when the flush began: those
    /// that had ended without a record (their workqueue keeps no per-item result; see
    /// `Sched::register_flush`), or every item of a batch that had ended
    /// (`Sched::flush_batch_shared`). In [`Flush::tally`] and [`Flush::wait`]'s summary.
    pub(crate) counted_before: [usize; 8],
}

/// Terminal counts of a summary-only flush.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    pub(crate) by_state: [usize; 8],
    pub(crate) gone: Vec<ItemId>,
    /// The waiter spins on the channel ([`Flush::wait`]'s first [`SPIN`]): the worker that
    /// ends the flush need not get off its CPU for it (see `worker.rs`, `Wake::wait`).
    pub(crate) waiter_spins: bool,
}

/// Counts of a finished flush.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FlushSummary {
    pub covered: usize,
    /// Delayed items a workqueue flush left out (see [`Flush::delayed_not_covered`]).
    pub delayed_not_covered: usize,
    pub by_state: BTreeMap<State, usize>,
    pub gone: usize,
    pub waited: Duration,
}

impl Flush {
    /// Items the flush covers.
    pub fn covered(&self) -> usize {
        self.covered
    }
    /// For a [`FlushScope::Workqueue`] flush: the workqueue's delayed items it does not cover
    /// (0 for every other scope, which queue covered delayed items at once).
    pub fn delayed_not_covered(&self) -> usize {
        self.delayed_not_covered
    }
    /// For a summary-only flush ([`Engine::flush_summary`]): the terminal counts so far (final
    /// once [`Flush::next`] returned `None`) and the ids whose results had already expired.
    ///
    /// Any flush that began after some covered items had ended without a record (a batch of
    /// a workqueue with `results` summary or none) counts those here too, by state.
    pub fn tally(&self) -> Option<(BTreeMap<State, usize>, Vec<ItemId>)> {
        let (mut counts, gone) = match &self.tally {
            Some(t) => {
                let t = t.lock();
                (t.by_state, t.gone.clone())
            }
            None if self.counted_before == [0; 8] => return None,
            None => ([0; 8], Vec::new()),
        };
        for (n, before) in counts.iter_mut().zip(self.counted_before) {
            *n += before;
        }
        let by_state = State::ALL
            .into_iter()
            .filter(|s| counts[s.index()] > 0)
            .map(|s| (s, counts[s.index()]))
            .collect();
        Some((by_state, gone))
    }
    /// When the flush began.
    pub fn began(&self) -> Instant {
        self.began
    }
    /// The next covered item to finish; `None` once all are terminal.
    pub async fn next(&mut self) -> Option<FlushEvent> {
        loop {
            if let Some(ev) = self.pending.pop_front() {
                return Some(ev);
            }
            let msg = self.rx.recv_async().await.ok()?;
            self.unpack(msg);
        }
    }
    /// [`Flush::next`], except that the full results of an at-end flush
    /// ([`Engine::submit_and_wait`] on a workqueue keeping them) come as the records they
    /// were kept as, a few hundred at a time (the last part when the last item ends), for a
    /// caller that reads them in place instead of making an [`ItemResult`] of each
    /// ([`ResultRecord::view`]). Parts handed over by different workers may come in any
    /// order.
    pub async fn next_delivered(&mut self) -> Option<Delivered> {
        loop {
            if let Some(ev) = self.pending.pop_front() {
                return Some(Delivered::Event(ev));
            }
            match self.rx.recv_async().await.ok()? {
                FlushMsg::Kept(k) => {
                    self.pending.extend(k.events);
                    if !k.records.is_empty() {
                        return Some(Delivered::Records(
                            k.records.into_iter().map(ResultRecord).collect(),
                        ));
                    }
                }
                msg => self.unpack(msg),
            }
        }
    }
    /// Blocking [`Flush::next`]; `Err(())` when `deadline` passes first.
    #[allow(clippy::result_unit_err)]
    pub fn next_blocking(&mut self, deadline: Option<Instant>) -> Result<Option<FlushEvent>, ()> {
        loop {
            if let Some(ev) = self.pending.pop_front() {
                return Ok(Some(ev));
            }
            let msg = match deadline {
                None => self.rx.recv().ok(),
                Some(d) => match self.rx.recv_deadline(d) {
                    Ok(m) => Some(m),
                    Err(flume::RecvTimeoutError::Disconnected) => None,
                    Err(flume::RecvTimeoutError::Timeout) => return Err(()),
                },
            };
            match msg {
                Some(m) => self.unpack(m),
                None => return Ok(None),
            }
        }
    }
    /// Queues the events of `msg` in `pending`.
    fn unpack(&mut self, msg: FlushMsg) {
        match msg {
            FlushMsg::One(ev) => self.pending.push_back(ev),
            FlushMsg::Many(evs) => self.pending.extend(evs),
            FlushMsg::Kept(k) => {
                self.pending.reserve(k.events.len() + k.records.len());
                self.pending.extend(k.events);
                self.pending.extend(
                    k.records
                        .iter()
                        .map(|r| FlushEvent::Done(Arc::new(r.to_result(None)))),
                );
            }
        }
    }
    /// Waits until every covered item is terminal.
    ///
    /// On `Ok` return, every covered item is terminal (or its result expired).
    ///
    /// # Errors
    /// [`EngineError::Timeout`] when `timeout` passes first; the items keep running.
    pub fn wait(mut self, timeout: Option<Duration>) -> Result<FlushSummary, EngineError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut sum = FlushSummary {
            covered: self.covered,
            delayed_not_covered: self.delayed_not_covered,
            ..Default::default()
        };
        // Nobody reads per-item events from here on: turn the flush into a counting one, so
        // the items still to finish bump a tally instead of each sending (and waking us).
        // Under the flushes' lock (with L shared, which every path that tells a flush holds:
        // a worker's shared finish, in its hold of the flushes; every other path with L
        // exclusive), so every item is counted once: either its event is already in the
        // channel or held by a worker to send there (drained below), or it finds the tally.
        // Not under L exclusive, which would wait for every shared holder and keep out new
        // ones: beside a busy thread its writer side yields for whole time slices.
        if self.tally.is_none() {
            if let Some(id) = self.id {
                let t = Arc::new(Mutex::new(Tally::default()));
                if let Some(rec) = self.inner.sched.read().flushes.lock().get_mut(&id) {
                    rec.count_instead(t.clone());
                }
                self.tally = Some(t);
            }
        }
        if let Some(t) = &self.tally {
            t.lock().waiter_spins = true;
        }
        // Spin first (see SPIN): a flush that ends within it returns without a futex wake-up.
        let spin_until = Instant::now() + SPIN;
        let mut closed = false;
        let mut spins = 0u32;
        for ev in self.pending.drain(..) {
            sum.add(&ev);
        }
        while deadline.is_none_or(|d| Instant::now() < d) {
            match self.rx.try_recv() {
                Ok(FlushMsg::One(ev)) => sum.add(&ev),
                Ok(FlushMsg::Many(evs)) => evs.iter().for_each(|ev| sum.add(ev)),
                Ok(msg @ FlushMsg::Kept(_)) => {
                    self.unpack(msg);
                    self.pending.drain(..).for_each(|ev| sum.add(&ev));
                }
                Err(flume::TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
                Err(flume::TryRecvError::Empty) if Instant::now() < spin_until => spin(&mut spins),
                Err(flume::TryRecvError::Empty) => break,
            }
        }
        if let (false, Some(t)) = (closed, &self.tally) {
            t.lock().waiter_spins = false;
        }
        while !closed {
            match self.next_blocking(deadline) {
                Ok(Some(ev)) => sum.add(&ev),
                Ok(None) => closed = true,
                Err(()) => return Err(EngineError::Timeout(timeout.unwrap_or_default())),
            }
        }
        if let Some(t) = &self.tally {
            let t = t.lock();
            for s in State::ALL {
                let n = t.by_state[s.index()];
                if n > 0 {
                    *sum.by_state.entry(s).or_default() += n;
                }
            }
            sum.gone += t.gone.len();
        }
        for s in State::ALL {
            let n = self.counted_before[s.index()];
            if n > 0 {
                *sum.by_state.entry(s).or_default() += n;
            }
        }
        sum.waited = self.began.elapsed();
        Ok(sum)
    }
}

impl FlushSummary {
    /// Counts one event.
    pub fn add(&mut self, ev: &FlushEvent) {
        match ev {
            FlushEvent::Done(r) => *self.by_state.entry(r.state).or_default() += 1,
            FlushEvent::Gone(_) => self.gone += 1,
            FlushEvent::Ended(_, state) => *self.by_state.entry(*state).or_default() += 1,
        }
    }
}

impl Drop for Flush {
    /// Removes the flush's record, under L shared and the flushes' lock (as `wait`'s switch
    /// to a tally, and for the same reason).
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            self.inner.sched.read().flushes.lock().remove(&id);
        }
    }
}

/// What cancel did with one item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// It was pending or delayed; it will never run.
    CancelledPending,
    /// It was running; its cancellation signal is raised and the returned flush waits for it.
    WasRunning,
    /// It was already terminal in this state.
    AlreadyTerminal(State),
    /// No such item (or its result expired).
    Unknown,
}

/// The answer to a cancel: per-item outcomes and a flush over the items that were running.
pub struct CancelReport {
    pub outcomes: Vec<(ItemId, CancelOutcome)>,
    pub running: Flush,
}

/// Per-workqueue numbers.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkqueueStats {
    pub attrs: WorkqueueAttrs,
    pub draining: bool,
    pub delayed: usize,
    pub pending: usize,
    pub running: usize,
    /// Terminal items by state since start.
    pub totals: BTreeMap<State, u64>,
    pub submitted: u64,
}

/// Engine-wide counters.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineStats {
    pub epoch: u64,
    pub live: CpuSet,
    pub pools: usize,
    pub workers: usize,
    pub items: usize,
    pub results: usize,
    /// Estimated bytes the retained results take (bounded by `results_memory`).
    pub results_bytes: usize,
    /// Entries in the timer heap (delays and deadlines; bounded by about twice the live
    /// items that have one).
    pub timers: usize,
    pub flushes: usize,
    /// Batch records kept (a batch flush or cancel names one): while an item of the batch is
    /// live, then until `results_ttl` after its submit, and no more than `results_max` of
    /// them once their items ended (the oldest go first; housekeeping, once a second).
    pub batches: usize,
    /// Queues, one per (workqueue, target) (and handler, for attached workers) that has had
    /// items; an empty one is dropped after `worker_idle`.
    pub queues: usize,
    /// Terminal items by state since the engine started, over every workqueue (deleted ones
    /// included): these never go down.
    pub totals: BTreeMap<State, u64>,
    /// Items now delayed, pending and running, read in the same lock hold as `totals` (so an
    /// item ending between two reads is never missed or counted twice).
    pub delayed: usize,
    pub pending: usize,
    pub running: usize,
    pub rebinds: BTreeMap<&'static str, u64>,
    pub fallbacks: BTreeMap<String, u64>,
    pub lockups: u64,
    pub hogs: u64,
    pub running_per_cpu: BTreeMap<u32, usize>,
    /// Pending items by (workqueue, level of their target).
    pub pending_by_level: BTreeMap<(String, String), usize>,
    /// Batches accepted under the engine lock's shared side since start: the common case (no
    /// key, delay or deadline; queues that exist and can run them; a workqueue neither
    /// ordered nor draining), which does not stop the workers. The others took it exclusive.
    pub shared_submits: u64,
}

/// Receives the engine's events for metrics. Called outside the engine lock (from workers,
/// the timer and submitters), so implementations must be cheap and must not call back into the
/// engine. Every method has a no-op default.
pub trait Observer: Send + Sync {
    /// A batch was accepted: `queued` new items (duplicates excluded).
    fn submitted(&self, _workqueue: &str, _queued: usize) {}
    /// An item passed its start check on `cpu` after waiting `waited` since it was queued.
    fn started(&self, _workqueue: &str, _cpu: u32, _waited: Duration) {}
    /// An item reached a terminal state.
    fn finished(&self, _ended: &Ended) {}
    /// Items reached a terminal state, in the order they did: what one lock hold ended (a
    /// worker's finish batch), given at once so that an observer can look up what it keeps
    /// per workqueue once per run of one. Default: [`Observer::finished`] for each.
    fn finished_all(&self, ended: &[Ended]) {
        for e in ended {
            self.finished(e);
        }
    }
    /// Items of `workqueue` passed their start check on `cpu`, having waited `waited` each:
    /// the quick items a worker claimed behind another and ran one after the other, told
    /// when they have run (microseconds later). Default: [`Observer::started`] for each.
    fn started_all(&self, workqueue: &str, cpu: u32, waited: &[Duration]) {
        for w in waited {
            self.started(workqueue, cpu, *w);
        }
    }
    /// An item was handed back before it started: `offline`, `cpuset`, `isolated` (why its
    /// CPU stopped being live), `affinity` (its worker found itself on another CPU) or
    /// `stall` (it waited bound behind other work while the topology changed).
    fn rebound(&self, _reason: &'static str) {}
    /// The watchdog reported a lockup of `cpu`'s pool, or a CPU hog on `cpu`.
    fn lockup(&self, _cpu: u32) {}
    fn hog(&self, _cpu: u32) {}
}

/// What [`Observer::finished`] hears of an item that reached a terminal state: the same for
/// every [`ResultsMode`] (the run time only when the mode keeps latencies).
#[derive(Debug, Clone)]
pub struct Ended {
    pub id: ItemId,
    pub workqueue: Arc<str>,
    pub handler: Arc<str>,
    pub state: State,
    /// From its start to its end; `None` when it never started, or its workqueue's results
    /// are `none`.
    pub run_time: Option<Duration>,
    /// Run (or held last) by an attached worker.
    pub remote: bool,
}

/// How the engine reaches an attached worker's session (its `Attach` stream). Called outside
/// the engine lock; implementations must be cheap and must not call back into the engine.
pub trait RemoteSink: Send + Sync {
    /// A slot of this worker may find work now: call [`RemoteWorker::take`].
    fn wake(&self);
    /// Item `id`, which this worker holds, was cancelled: tell the worker.
    fn cancel(&self, id: ItemId);
}

/// Hook the engine calls when a worker finds its CPU gone or its affinity changed (the
/// daemon wires it to the live view's worker-report source).
pub type ReportHook = Arc<dyn Fn(u32, &str) + Send + Sync>;

/// Host load per CPU, 0.0 (idle) to 1.0 (busy), for the `idle` placement.
pub type LoadHook = Arc<dyn Fn(u32) -> f64 + Send + Sync>;

/// Engine settings.
#[derive(Clone)]
pub struct EngineConfig {
    /// Pin workers with `sched_setaffinity` (off for fixture topologies naming absent CPUs).
    pub pinning: bool,
    /// Results kept at most, and for how long, after an item is terminal.
    pub results_max: usize,
    pub results_ttl: Duration,
    /// Bytes of one result's output and error text kept at most; longer ones are cut, saying
    /// so (`limits.max_result_bytes`).
    pub max_result_bytes: usize,
    /// Bytes all stored results may take (estimated: texts plus a fixed overhead per result);
    /// the oldest are forgotten beyond it (`engine.results_memory`).
    pub results_memory: usize,
    /// Longest `delay` and `deadline` an item may ask for (`limits.max_delay`,
    /// `limits.max_deadline`); longer ones refuse the batch.
    pub max_delay: Duration,
    pub max_deadline: Duration,
    /// Worker threads per CPU at most.
    pub max_workers_per_cpu: usize,
    /// An idle worker beyond the first retires after this long; a queue (per workqueue and
    /// target) left empty this long is dropped.
    pub worker_idle: Duration,
    /// A pool with runnable work and no progress this long is reported as a lockup (0 = off).
    pub watchdog_thresh: Duration,
    /// An item running longer than this is reported as a CPU hog (0 = off).
    pub hog_thresh: Duration,
    /// Attributes of the `default` workqueue.
    pub default_wq: WorkqueueAttrs,
    /// Items one slot of an attached worker may hold at once (`workers.max_credits`).
    pub max_credits: u32,
    /// For a batch of one item, `spread` wakes the submitting thread's own CPU first, when
    /// that CPU may take the work and runs no item (`engine.wake_local`; the daemon's default,
    /// off for the library).
    /// Worth it for a submitter that gives its CPU up next, as the daemon's RPC thread does
    /// (it waits on the network): on a host whose other CPUs sleep, a call then stays on one
    /// CPU instead of waking a sleeping one (see `sched/queue.rs`, `local_first`). A
    /// submitter that keeps its CPU (spinning in [`Flush::wait`]) would only share it.
    pub wake_local: bool,
    pub report: Option<ReportHook>,
    pub load: Option<LoadHook>,
    pub observer: Option<Arc<dyn Observer>>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            pinning: true,
            results_max: 1 << 20,
            results_ttl: Duration::from_secs(600),
            max_result_bytes: 64 << 10,
            results_memory: 256 << 20,
            max_delay: Duration::from_secs(365 * 86_400),
            max_deadline: Duration::from_secs(365 * 86_400),
            max_workers_per_cpu: 64,
            worker_idle: Duration::from_secs(60),
            watchdog_thresh: Duration::from_secs(30),
            hog_thresh: Duration::from_secs(10),
            default_wq: WorkqueueAttrs::default(),
            max_credits: 1,
            wake_local: false,
            report: None,
            load: None,
            observer: None,
        }
    }
}

impl fmt::Debug for EngineConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EngineConfig")
            .field("pinning", &self.pinning)
            .field("results_max", &self.results_max)
            .field("results_ttl", &self.results_ttl)
            .field("watchdog_thresh", &self.watchdog_thresh)
            .finish_non_exhaustive()
    }
}

/// State shared by the engine's threads.
pub(crate) struct Inner {
    /// L: everything about items, queues, pools and flushes. See `sched/mod.rs`.
    pub(crate) sched: RwLock<sched::Sched>,
    /// R: the result store (also reached from `sched`, inside L). Look-ups of terminal
    /// results take R alone.
    pub(crate) results: sched::ResultStore,
    /// Wakes the timer thread (delays, deadlines, housekeeping). Used with `sched`.
    pub(crate) timer_cv: signal::Signal,
    /// Wakes the watchdog and shutdown waiters. Used with `sched`.
    pub(crate) idle_cv: signal::Signal,
    pub(crate) cfg: EngineConfig,
    pub(crate) handlers: RwLock<Registry>,
    /// Which CPUs are live, and the epoch (a seqlock, `epoch.rs`). Published only under
    /// `sched`; read lock-free by workers right before an item starts.
    pub(crate) live: epoch::LiveFlags,
    pub(crate) threads: Mutex<Vec<JoinHandle<()>>>,
    pub(crate) next_worker: AtomicU64,
    /// Worker threads running or spinning, not parked (`worker.rs`, `Wake::wait`).
    pub(crate) awake: std::sync::atomic::AtomicUsize,
    /// Threads the last shutdown left running.
    pub(crate) stragglers: std::sync::atomic::AtomicUsize,
    /// Handler names attached workers serve: those ever served since start, and those
    /// declared in config (a submit may name them while no worker serves them; see
    /// `WorkqueueAttrs::unserved`). At most `remote::MAX_KNOWN`.
    pub(crate) remote_known: RwLock<HashMap<Arc<str>, Arc<sched::HandlerRef>>>,
}

/// How long shutdown waits for cancelled running items, and then for the threads, beyond the
/// grace period.
const SHUTDOWN_JOIN: Duration = Duration::from_secs(5);

/// The handler items of attached-worker handlers refer to. Local workers never take such
/// items (their queues are on `remote_ready` lists), so `run` is never called.
struct RemoteHandler;

impl crate::handler::Handler for RemoteHandler {
    fn name(&self) -> &str {
        "(attached worker)"
    }
    fn validate(&self, _: &Args, _: &[u8]) -> Result<(), HandlerError> {
        Ok(())
    }
    fn run(&self, _: &crate::handler::WorkCtx<'_>) -> Result<Vec<u8>, HandlerError> {
        Err(HandlerError::Failed(
            "served by attached workers, not by the daemon".into(),
        ))
    }
}

impl Inner {
    /// Remembers attached-worker handler names (see `remote_known`).
    ///
    /// # Errors
    /// [`EngineError::Worker`] when that would pass `remote::MAX_KNOWN` names.
    pub(crate) fn learn_remote(&self, names: &[Arc<str>]) -> Result<(), EngineError> {
        let mut known = self.remote_known.write();
        let new = names.iter().filter(|h| !known.contains_key(*h)).count();
        if known.len() + new > sched::remote::MAX_KNOWN {
            return Err(EngineError::Worker(format!(
                "the daemon already knows {} attached-worker handler names; at most {} are kept",
                known.len(),
                sched::remote::MAX_KNOWN
            )));
        }
        for h in names {
            known.entry(h.clone()).or_insert_with(|| {
                Arc::new(sched::HandlerRef {
                    name: h.clone(),
                    handler: Arc::new(RemoteHandler),
                    kind: crate::handler::HandlerKind::CpuBound,
                    remote: true,
                })
            });
        }
        Ok(())
    }

    /// Whether `cpu` is live right now, and the epoch that says so (lock-free seqlock read).
    pub(crate) fn live_now(&self, cpu: u32) -> Option<u64> {
        self.live.live_now(cpu)
    }
}

/// The engine. Cheap to share behind an `Arc`; dropping the last handle shuts it down.
pub struct Engine {
    inner: Arc<Inner>,
}

impl Engine {
    /// Starts the engine on a first snapshot: creates the `default` workqueue, a pool per live
    /// CPU, the timer and the watchdog.
    ///
    /// # Errors
    /// [`EngineError::InvalidAttrs`] if the default workqueue's attributes are invalid.
    pub fn start(
        cfg: EngineConfig,
        handlers: Registry,
        first: Arc<Snapshot>,
    ) -> Result<Engine, EngineError> {
        cfg.default_wq.validate()?;
        let s = sched::Sched::new(&cfg, first.clone());
        let inner = Arc::new(Inner {
            results: s.results_store(),
            sched: RwLock::new(s),
            timer_cv: signal::Signal::default(),
            idle_cv: signal::Signal::default(),
            cfg,
            handlers: RwLock::new(handlers),
            live: epoch::LiveFlags::new(MAX_CPUS as usize),
            threads: Mutex::new(Vec::new()),
            next_worker: AtomicU64::new(0),
            awake: std::sync::atomic::AtomicUsize::new(0),
            stragglers: std::sync::atomic::AtomicUsize::new(0),
            remote_known: RwLock::new(HashMap::new()),
        });
        timer::start(&inner);
        watchdog::start(&inner);
        let engine = Engine { inner };
        engine.apply_snapshot(&first);
        Ok(engine)
    }

    /// Applies a new topology snapshot: retires pools of CPUs that left, starts pools for CPUs
    /// that came, re-resolves every queue (applying each workqueue's fallback) and wakes
    /// workers. Snapshots older than the current epoch are ignored.
    pub fn apply_snapshot(&self, snap: &Arc<Snapshot>) {
        let mut fx = sched::Effects::default();
        {
            let mut s = self.inner.sched.write();
            s.apply_snapshot(&self.inner, snap, &mut fx);
        }
        fx.run(&self.inner);
    }

    /// The snapshot the engine currently schedules by.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.inner.sched.read().snapshot.clone()
    }

    /// Replaces the handler registry (config reload). Queued items keep their handler.
    pub fn set_handlers(&self, r: Registry) {
        *self.inner.handlers.write() = r;
    }

    /// Registered handler names.
    pub fn handler_names(&self) -> Vec<String> {
        self.inner.handlers.read().names()
    }

    /// Every handler name a submit may use: registered ones, then attached-worker names.
    pub fn known_names(&self) -> Vec<String> {
        let mut v = self.inner.handlers.read().names();
        let mut remote: Vec<String> = self
            .inner
            .remote_known
            .read()
            .keys()
            .map(|h| h.to_string())
            .collect();
        remote.sort();
        v.extend(remote);
        v
    }

    /// Declares handler names attached workers will serve (`workers.handlers` in config): a
    /// submit may name them before any worker serving them attaches.
    ///
    /// # Errors
    /// [`EngineError::Worker`] for a malformed name, one the daemon serves itself, or too many.
    pub fn declare_remote(&self, names: &[String]) -> Result<(), EngineError> {
        let reg = self.inner.handlers.read();
        let mut v = Vec::with_capacity(names.len());
        for h in names {
            sched::remote::check_name(h).map_err(EngineError::Worker)?;
            if reg.get(h).is_some() {
                return Err(EngineError::Worker(format!(
                    "handler name {} is served by the daemon itself",
                    crate::quote::quote(h)
                )));
            }
            v.push(Arc::from(h.as_str()));
        }
        drop(reg);
        self.inner.learn_remote(&v)
    }

    /// Attaches a worker serving `handlers` (see `WorkerService.Attach`); `sink` is how the
    /// engine wakes it and tells it about cancels.
    ///
    /// # Errors
    /// [`EngineError::Worker`]: no names, too many, a malformed or repeated name, a name the
    /// daemon serves itself; [`EngineError::ShuttingDown`].
    pub fn attach(
        &self,
        meta: WorkerMeta,
        handlers: Vec<String>,
        sink: Arc<dyn RemoteSink>,
    ) -> Result<RemoteWorker, EngineError> {
        RemoteWorker::attach(&self.inner, meta, handlers, sink)
    }

    /// The attached workers, by id.
    pub fn remote_workers(&self) -> Vec<RemoteInfo> {
        self.remote_workers_and_losses().0
    }

    /// The attached workers, by id, and (workers, items) lost since start: workers that went
    /// away holding items, and those items.
    pub fn remote_workers_and_losses(&self) -> (Vec<RemoteInfo>, (u64, u64)) {
        let (mut v, lost) = self.inner.remote_infos();
        v.sort_by_key(|w| w.id);
        (v, lost)
    }

    /// Attached workers per handler name, and open slots per CPU (for metrics).
    pub fn remote_counts(&self) -> (BTreeMap<String, usize>, BTreeMap<u32, usize>) {
        self.inner.sched.read().remote_counts()
    }

    /// Whether workers pin themselves (false on fixture topologies).
    pub fn pinning(&self) -> bool {
        self.inner.cfg.pinning
    }

    /// Most items one attached worker's slot may hold at once.
    pub fn max_credits(&self) -> u32 {
        self.inner.cfg.max_credits.max(1)
    }

    /// Bytes of output one result keeps at most.
    pub fn max_result_bytes(&self) -> usize {
        self.inner.cfg.max_result_bytes
    }

    /// Submits a batch to workqueue `wq`: all items are accepted, or none.
    ///
    /// # Errors
    /// Unknown workqueue, draining, a bad target/handler/argument (naming the item's index),
    /// or a full workqueue; nothing is queued then.
    pub fn submit(&self, wq: &str, items: impl Into<Batch>) -> Result<Receipt, EngineError> {
        let mut bodies = self.bodies(wq, items.into())?;
        let mut fx = sched::Effects::default();
        // The common case under shared L (`sched/shared_submit.rs`); the rest exclusive.
        let shared = self
            .inner
            .sched
            .read()
            .submit_shared(wq, &mut bodies, None, &mut fx);
        let r = match shared {
            Some((rec, _)) => Ok(rec),
            None => {
                let mut s = self.inner.sched.write();
                s.submit(wq, bodies, &mut fx)
            }
        };
        fx.run(&self.inner);
        r
    }

    /// [`Engine::submit`], and a flush of the batch registered in the same lock hold
    /// (counting only with `summary_only`, as [`Engine::flush_summary`]): no item of the batch
    /// can end before the flush hears of it, which matters for a workqueue that keeps no
    /// results (`results = summary | none`): a flush registered later learns only that items
    /// already ended are gone. Also one lock hold less than submit then flush.
    ///
    /// # Errors
    /// As [`Engine::submit`].
    pub fn submit_and_flush(
        &self,
        wq: &str,
        items: impl Into<Batch>,
        summary_only: bool,
    ) -> Result<(Receipt, Flush), EngineError> {
        let counting = match summary_only {
            true => Counting::Always,
            false => Counting::Never,
        };
        self.submit_flush(wq, items.into(), counting)
    }

    /// [`Engine::submit_and_flush`] for a caller that waits for the batch's full results and
    /// its counts: where the workqueue keeps full results the flush has an event per item
    /// (`Done`), sent in parts of a few hundred while items are live and the rest when the
    /// last item ends (the caller handles them in bulk: a few wake-ups of its waiter instead
    /// of one per worker finish batch), and
    /// otherwise it counts only, as a summary-only flush ([`Flush::tally`]): an `Ended` event
    /// per item would tell such a caller nothing the tally does not, at the price of a
    /// channel message per item. The daemon's `Submit(wait)`. A caller that wants the results
    /// as they come uses [`Engine::submit_and_flush`].
    ///
    /// # Errors
    /// As [`Engine::submit`].
    pub fn submit_and_wait(
        &self,
        wq: &str,
        items: impl Into<Batch>,
    ) -> Result<(Receipt, Flush), EngineError> {
        self.submit_flush(wq, items.into(), Counting::UnlessFull)
    }

    fn submit_flush(
        &self,
        wq: &str,
        items: Batch,
        counting: Counting,
    ) -> Result<(Receipt, Flush), EngineError> {
        let mut bodies = self.bodies(wq, items)?;
        // Without a delayed entry the batch has no delayed item to promote: its ids are the
        // flush's as they are (one look-up per item less under L).
        let delays = bodies.iter().any(|e| e.delay.is_some());
        let mut fx = sched::Effects::default();
        // The common case under shared L (`sched/shared_submit.rs`), its flush registered
        // before any of its items can be taken; the rest exclusive.
        let with = sched::WithFlush {
            inner: &self.inner,
            delivery: counting.delivery(),
        };
        let shared = self
            .inner
            .sched
            .read()
            .submit_shared(wq, &mut bodies, Some(with), &mut fx);
        if let Some((rec, f)) = shared {
            fx.run(&self.inner);
            return match f {
                Some(f) => Ok((rec, f)),
                // Not reached: a shared submit asked for a flush registers one. Were it to
                // return none, the batch is in all the same, and a flush of it is registered
                // now.
                None => Ok((
                    rec.clone(),
                    self.flush_with(FlushScope::Batch(rec.batch), true)?,
                )),
            };
        }
        let r = (|| {
            let mut s = self.inner.sched.write();
            let rec = s.submit(wq, bodies, &mut fx)?;
            let scope = FlushScope::Batch(rec.batch);
            let ids = match delays {
                true => s.flush_ids(&scope, &mut fx)?.0,
                false => s.scope_ids(&scope)?,
            };
            let delivery = (counting.delivery())(s.results_mode(wq)?);
            // Items the submit rejected at once on a workqueue keeping no result: counted.
            let known = s.ended_counts(&scope);
            let f = s.register_flush(&self.inner, ids, delivery, known);
            Ok((rec, f))
        })();
        fx.run(&self.inner);
        r
    }

    /// The batch's entries: handlers looked up and `validate`d once per run of copies (and
    /// per run of identical neighbours), every entry of such a run sharing one body, and
    /// every body naming workqueue `wq` through one count. Outside L.
    fn bodies(&self, wq: &str, batch: Batch) -> Result<Vec<sched::Entry>, EngineError> {
        let reg = self.inner.handlers.read();
        let wq: Arc<str> = Arc::from(wq);
        let mut bodies = Vec::with_capacity(batch.len);
        // The batch's last bodies, newest last: an entry equal to one of them shares it. Runs
        // of copies find the newest; a fan-out (`each:`) cycles through one body per group.
        // After `RECENT_BODIES` entries in a row matched none, only the newest is looked at
        // (a batch of distinct items pays a bounded number of comparisons).
        let mut recent: Vec<Arc<sched::Body>> = Vec::new();
        let mut misses = 0;
        // Bodies of one batch naming the same handler share one record of it (name, handler,
        // kind).
        let mut handlers: Vec<Arc<sched::HandlerRef>> = Vec::new();
        for (it, copies) in batch.runs {
            let index = bodies.len();
            let look = if misses < RECENT_BODIES {
                recent.len()
            } else {
                recent.len().min(1)
            };
            let same = recent
                .iter()
                .rev()
                .take(look)
                .find(|b| b.same_as(&it))
                .cloned();
            misses = if same.is_some() { 0 } else { misses + 1 };
            let body = match same {
                Some(b) => b,
                None => {
                    let handler = match handlers.iter().find(|r| &*r.name == it.handler.as_str()) {
                        Some(r) => r.clone(),
                        None => {
                            let r = self.handler_ref(&reg, index, &it.handler)?;
                            handlers.push(r.clone());
                            r
                        }
                    };
                    handler
                        .handler
                        .validate(&it.args, &it.payload)
                        .map_err(|source| EngineError::Handler { index, source })?;
                    let b = Arc::new(sched::Body::new(
                        wq.clone(),
                        handler,
                        it.target,
                        it.args,
                        it.payload,
                    ));
                    if recent.len() == RECENT_BODIES {
                        recent.remove(0);
                    }
                    recent.push(b.clone());
                    b
                }
            };
            for _ in 1..copies {
                bodies.push(sched::Entry {
                    body: body.clone(),
                    key: it.key.clone(),
                    delay: it.delay,
                    deadline: it.deadline,
                });
            }
            bodies.push(sched::Entry {
                body,
                key: it.key,
                delay: it.delay,
                deadline: it.deadline,
            });
        }
        Ok(bodies)
    }

    /// The record of handler `name` for a batch: a built-in or registered handler, or a name
    /// attached workers serve (or served, or config declares).
    fn handler_ref(
        &self,
        reg: &Registry,
        index: usize,
        name: &str,
    ) -> Result<Arc<sched::HandlerRef>, EngineError> {
        if let Some(h) = reg.get(name) {
            return Ok(Arc::new(sched::HandlerRef {
                name: Arc::from(name),
                handler: h.clone(),
                kind: h.kind(),
                remote: false,
            }));
        }
        match self.inner.remote_known.read().get(name) {
            Some(r) => Ok(r.clone()),
            None => Err(EngineError::UnknownHandler {
                index,
                name: name.to_string(),
                known: self.known_names().join(", "),
            }),
        }
    }

    /// Starts a flush over `scope`. Delayed items an item or batch scope covers are queued at
    /// once (the kernel's `flush_delayed_work()`); a [`FlushScope::Workqueue`] leaves them
    /// out and counts them ([`Flush::delayed_not_covered`]).
    ///
    /// On completion of the returned [`Flush`], every covered item is terminal. A flush never
    /// waits on a CPU that is gone: pending items are bound only to live CPUs.
    ///
    /// # Errors
    /// Unknown workqueue, batch or item.
    pub fn flush(&self, scope: FlushScope) -> Result<Flush, EngineError> {
        self.flush_with(scope, false)
    }

    /// Like [`Engine::flush`], but the flush yields no per-item events: [`Flush::wait`]
    /// returns the counts. Much cheaper for large flushes whose results nobody reads.
    ///
    /// # Errors
    /// Unknown workqueue, batch or item.
    pub fn flush_summary(&self, scope: FlushScope) -> Result<Flush, EngineError> {
        self.flush_with(scope, true)
    }

    fn flush_with(&self, scope: FlushScope, summary_only: bool) -> Result<Flush, EngineError> {
        // A counting flush of a whole batch waits on the batch's record, under L shared: the
        // workers are not stopped for it (every item's waiters are not needed to count them).
        if let (true, FlushScope::Batch(b)) = (summary_only, &scope) {
            if let Some(f) = self.inner.sched.read().flush_batch_shared(&self.inner, *b) {
                return Ok(f);
            }
        }
        let mut fx = sched::Effects::default();
        let r = {
            let mut s = self.inner.sched.write();
            let (ids, left_out) = s.flush_ids(&scope, &mut fx)?;
            let delivery = match summary_only {
                true => Delivery::Count,
                false => Delivery::Stream,
            };
            let known = s.ended_counts(&scope);
            let mut f = s.register_flush(&self.inner, ids, delivery, known);
            f.delayed_not_covered = left_out;
            f
        };
        fx.run(&self.inner);
        Ok(r)
    }

    /// Cancels items: pending ones never run; running ones get their cancellation signal and
    /// the report's flush waits for them (`cancel_work_sync`).
    ///
    /// # Errors
    /// Unknown batch.
    pub fn cancel(&self, scope: FlushScope) -> Result<CancelReport, EngineError> {
        let mut fx = sched::Effects::default();
        let r = {
            let mut s = self.inner.sched.write();
            let ids = match &scope {
                FlushScope::Items(v) => v.clone(),
                // Cancel covers delayed items of a workqueue too: they never run.
                FlushScope::Workqueue(w) => s.scope_ids(&FlushScope::WorkqueueAll(w.clone()))?,
                other => s.scope_ids(other)?,
            };
            let outcomes = s.cancel(&ids, &mut fx);
            let running: Vec<_> = outcomes
                .iter()
                .filter(|(_, o)| *o == CancelOutcome::WasRunning)
                .map(|(id, _)| *id)
                .collect();
            let running = s.register_flush(
                &self.inner,
                running,
                Delivery::Stream,
                sched::EndedCounts::default(),
            );
            CancelReport { outcomes, running }
        };
        fx.run(&self.inner);
        Ok(r)
    }

    /// Drains a workqueue: it refuses new work until every item in it is terminal; its
    /// delayed items are queued at once. The returned flush counts (it sends no per-item
    /// events: see [`Flush::tally`]) and completes when the workqueue is empty.
    ///
    /// # Errors
    /// Unknown workqueue.
    pub fn drain(&self, wq: &str) -> Result<Flush, EngineError> {
        self.drain_with(wq, false)
    }

    /// [`Engine::drain`]; with `cancel_pending`, its pending and delayed items are cancelled
    /// (in the same lock hold as the drain mark, so none starts in between) and the flush
    /// waits only for the running ones (`destroy_workqueue` after cancelling everything).
    ///
    /// # Errors
    /// Unknown workqueue.
    pub fn drain_with(&self, wq: &str, cancel_pending: bool) -> Result<Flush, EngineError> {
        let mut fx = sched::Effects::default();
        let r = {
            let mut s = self.inner.sched.write();
            s.start_drain(wq)?;
            let all = FlushScope::WorkqueueAll(wq.to_string());
            if cancel_pending {
                // Covered first, so the flush counts the cancelled ones too.
                let ids = s.scope_ids(&all)?;
                let waiting: Vec<ItemId> = ids
                    .iter()
                    .copied()
                    .filter(|id| {
                        s.items
                            .get_mut()
                            .get(id)
                            .is_some_and(|i| i.state != State::Running)
                    })
                    .collect();
                let cancelled = s
                    .cancel(&waiting, &mut fx)
                    .iter()
                    .filter(|(_, o)| *o == CancelOutcome::CancelledPending)
                    .count();
                // On a workqueue keeping no per-item result they ended with none: counted.
                let mut known = sched::EndedCounts::default();
                if s.results_mode(wq)? != ResultsMode::Full {
                    known.by_state[State::Cancelled.index()] = cancelled;
                }
                s.register_flush(&self.inner, ids, Delivery::Count, known)
            } else {
                let (ids, _) = s.flush_ids(&all, &mut fx)?;
                s.register_flush(
                    &self.inner,
                    ids,
                    Delivery::Count,
                    sched::EndedCounts::default(),
                )
            }
        };
        fx.run(&self.inner);
        Ok(r)
    }

    /// Results (or current state) of items; `None` for unknown or expired ids.
    ///
    /// Stored results are read under the store's own lock R, without L: a large look-up does
    /// not hold up submits, takes and finishes. Only the ids not stored (live items, or ids
    /// never issued or forgotten) are looked up again under L, where an item that ended
    /// meanwhile is found stored.
    ///
    /// A result is made when read (the store keeps a compact record), once per distinct id:
    /// the copies of an id named many times share it, so a request naming one id a million
    /// times makes one `ItemResult`, not a million.
    pub fn results(&self, ids: &[ItemId]) -> Vec<Option<Arc<ItemResult>>> {
        let mut made = sched::ResultsMade::default();
        let mut out: Vec<Option<Arc<ItemResult>>> = {
            let store = self.inner.results.lock();
            ids.iter()
                .map(|&id| made.once(id, || store.get(id)))
                .collect()
        };
        if out.iter().any(Option::is_none) {
            let mut s = self.inner.sched.write();
            for (o, &id) in out.iter_mut().zip(ids) {
                if o.is_none() {
                    *o = made.once(id, || s.result_of(id));
                }
            }
        }
        out
    }

    /// Whether `id` was ever issued by this engine, so a `None` from [`Engine::results`] can
    /// be told apart: issued means its result was forgotten, not issued means never known.
    pub fn issued(&self, id: ItemId) -> bool {
        // Exclusive: a shared submit advances `next_item` inside its insert, before the
        // item is in the table; under shared L an id could read as issued and not found.
        self.inner.sched.write().issued(id)
    }

    /// Item ids of a batch.
    ///
    /// # Errors
    /// Unknown (or expired) batch.
    pub fn batch_items(&self, batch: BatchId) -> Result<Vec<ItemId>, EngineError> {
        self.inner
            .sched
            .write()
            .scope_ids(&FlushScope::Batch(batch))
    }

    /// Creates a workqueue.
    ///
    /// # Errors
    /// Invalid attributes or an existing name.
    pub fn create_workqueue(&self, attrs: WorkqueueAttrs) -> Result<(), EngineError> {
        attrs.validate()?;
        self.inner.sched.write().create_wq(attrs)
    }

    /// Changes a workqueue's attributes live (re-resolving its queues). A workqueue left
    /// draining (by a drain or delete whose caller stopped waiting) accepts work again.
    ///
    /// # Errors
    /// Unknown workqueue, invalid attributes, or toggling `ordered` on a non-empty workqueue.
    pub fn update_workqueue(&self, attrs: WorkqueueAttrs) -> Result<(), EngineError> {
        attrs.validate()?;
        let mut fx = sched::Effects::default();
        let r = self.inner.sched.write().update_wq(attrs, &mut fx);
        fx.run(&self.inner);
        r
    }

    /// Deletes an empty workqueue.
    ///
    /// # Errors
    /// Unknown, `default`, or not empty.
    pub fn delete_workqueue(&self, name: &str) -> Result<(), EngineError> {
        self.inner.sched.write().delete_wq(name)
    }

    /// Every workqueue with its numbers, by name.
    pub fn workqueues(&self) -> Vec<WorkqueueStats> {
        self.inner.sched.write().wq_stats()
    }

    /// Engine-wide counters.
    pub fn stats(&self) -> EngineStats {
        self.inner.sched.write().stats()
    }

    /// Every CPU pool's and queue's scheduling state (workers, idle and coming workers, ready
    /// lists; pending and running counts, the head of each queue), one line each: what a test
    /// that found an item stuck prints. For people; the format may change.
    #[doc(hidden)]
    pub fn dump(&self) -> String {
        self.inner.sched.write().dump()
    }

    /// Changes the longest `delay` and `deadline` items may ask for (config reload).
    pub fn set_max_durations(&self, max_delay: Duration, max_deadline: Duration) {
        self.inner
            .sched
            .write()
            .set_max_durations(max_delay, max_deadline);
    }

    /// Stops the engine: refuses new work, cancels what has not started, gives running items
    /// `grace` to finish, then raises their cancellation signal and waits for them.
    /// Returns how many items were cancelled.
    pub fn shutdown(&self, grace: Duration) -> usize {
        let mut fx = sched::Effects::default();
        let cancelled = {
            let mut s = self.inner.sched.write();
            if s.shutdown {
                return 0;
            }
            s.shutdown = true;
            let mut ids: Vec<_> = s.items.get_mut().keys().collect();
            // Oldest first: in id order the items sit in slot order (the table fills its slots
            // in submission order), so cancelling walks memory in sequence instead of at random.
            ids.sort_unstable();
            let mut n = 0;
            for id in ids {
                if s.items
                    .get_mut()
                    .get(&id)
                    .is_some_and(|i| i.state != State::Running)
                {
                    s.cancel(&[id], &mut fx);
                    n += 1;
                }
            }
            let deadline = Instant::now() + grace;
            while s.running_total() > 0 {
                if self.inner.idle_cv.wait_until(&mut s, deadline) {
                    break;
                }
            }
            let running: Vec<_> = s.items.get_mut().keys().collect();
            n += running.len();
            s.cancel(&running, &mut fx);
            while s.running_total() > 0 {
                if self.inner.idle_cv.wait_for(&mut s, SHUTDOWN_JOIN) {
                    tracing::warn!(
                        running = s.running_total(),
                        "items still running at shutdown"
                    );
                    break;
                }
            }
            s.wake_everyone(&mut fx);
            n
        };
        fx.run(&self.inner);
        self.inner.timer_cv.notify_all();
        self.inner.idle_cv.notify_all();
        self.join_threads(Instant::now() + SHUTDOWN_JOIN);
        cancelled
    }

    /// Joins the engine's threads until `deadline`. A thread still running then (a handler
    /// that ignores its cancel token) is left behind, detached, and reported: shutdown is
    /// bounded whatever a handler does.
    fn join_threads(&self, deadline: Instant) {
        let threads: Vec<_> = std::mem::take(&mut *self.inner.threads.lock());
        let me = std::thread::current().id();
        let mut left = Vec::new();
        for t in threads {
            if t.thread().id() == me {
                continue;
            }
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                left.push(t.thread().name().unwrap_or("?").to_string());
            }
        }
        if !left.is_empty() {
            let running: Vec<String> = { self.inner.sched.write().running_items() };
            tracing::error!(
                threads = left.len(),
                names = ?left,
                items = ?running,
                "engine shutdown: threads still running after the grace period (handlers that \
                 ignore cancellation); leaving them behind"
            );
        }
        self.inner.stragglers.store(left.len(), Ordering::Relaxed);
    }

    /// Threads the last shutdown left running (handlers that ignored their cancel token).
    pub fn stragglers(&self) -> usize {
        self.inner.stragglers.load(Ordering::Relaxed)
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown(Duration::ZERO);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::cpuset::CpuSet;
    use crate::engine::{Engine, EngineConfig, ItemSpec, RECENT_BODIES};
    use crate::handler::Registry;
    use crate::target::Target;

    /// A spin beside a thread that never sleeps, on the same CPU, stops yielding: one of its
    /// yields kept it off the CPU for a time slice, so the waiter spins on without handing the
    /// CPU away (a slice per yield there), until the pause ends. Fails with spins that yield on
    /// and on beside a busy thread (38 µs per item at batches of 100 in process, session 30).
    #[test]
    fn a_spin_beside_a_busy_thread_stops_yielding() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let Some(cpu) = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))
            .ok()
            .and_then(|set| {
                (0..nix::sched::CpuSet::count()).find(|&c| set.is_set(c).unwrap_or(false))
            })
        else {
            panic!("no CPU in this thread's affinity");
        };
        let cpu = cpu as u32;
        let stop = Arc::new(AtomicBool::new(false));
        let spinning = Arc::new(AtomicBool::new(false));
        let busy = {
            let (stop, spinning) = (stop.clone(), spinning.clone());
            std::thread::spawn(move || {
                crate::engine::worker::pin(cpu).expect("pin the busy thread");
                spinning.store(true, Ordering::Release);
                while !stop.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        };
        while !spinning.load(Ordering::Acquire) {
            std::thread::yield_now();
        }
        let waiter = std::thread::spawn(move || {
            crate::engine::worker::pin(cpu).expect("pin the waiter");
            assert!(super::spin_yields(), "a new thread's spins yield");
            let mut rounds = 0;
            // A yield every 64 rounds, each beside the busy thread; within a few of them
            // one lasts its time slice.
            while super::spin_yields() {
                super::spin(&mut rounds);
                assert!(
                    rounds < 64 * 64,
                    "the spins yielded on beside a busy thread"
                );
            }
            rounds
        });
        let rounds = waiter.join().expect("the waiter");
        stop.store(true, Ordering::Relaxed);
        busy.join().expect("the busy thread");
        assert!(
            rounds >= 64,
            "it spun up to its first yield: {rounds} rounds"
        );
    }

    /// An engine on two flat CPUs, workers unpinned (for the engine's own unit tests).
    pub(crate) fn engine() -> Engine {
        let snap = crate::live::flat_snapshot(&CpuSet::range(0, 1));
        let cfg = EngineConfig {
            pinning: false,
            ..EngineConfig::default()
        };
        Engine::start(cfg, Registry::with_builtins(None), snap).unwrap()
    }

    /// Race 4's baton. A worker called for two queues at once — one `sleep`, one `noop`, both
    /// on CPU 0 and made ready in one submit, so the `noop`'s wake-up is held back for the
    /// worker already coming — takes the `sleep` (first on the ready list) and blocks in it,
    /// while a second worker of CPU 0 sleeps idle. The worker that took hands the `noop` on to
    /// the idle one: under shared L, and (a keyed `sleep`) under exclusive L. Fails (the
    /// `noop` waits the whole `sleep`) when a take only starts a reserve worker where none is
    /// idle.
    #[test]
    fn a_worker_that_takes_a_long_item_hands_the_rest_on() {
        use crate::engine::{FlushScope, State};
        use std::time::{Duration, Instant};
        for keyed in [false, true] {
            let e = engine();
            let sleep = |ms: &str| ItemSpec::new(Target::Cpu(0), "sleep").arg("ms", ms);
            // Two workers on CPU 0, both idle after (a `sleep` waits: one worker each).
            let warm = e.submit("default", vec![sleep("30"), sleep("30")]).unwrap();
            let f = e.flush(FlushScope::Batch(warm.batch)).unwrap();
            f.wait(Some(Duration::from_secs(5))).unwrap();
            let mut long = sleep("4000");
            // A keyed head is taken under exclusive L.
            long.key = keyed.then(|| "k".to_string());
            let quick = ItemSpec::new(Target::Cpus(CpuSet::range(0, 0)), "noop");
            let r = e.submit("default", vec![long, quick]).unwrap();
            let noop = r.items[1].id;
            let t0 = Instant::now();
            let f = e.flush(FlushScope::Items(vec![noop])).unwrap();
            let done = f.wait(Some(Duration::from_secs(2)));
            assert!(
                done.is_ok(),
                "keyed {keyed}: the noop waited {:?} behind the sleep; the engine:\n{}",
                t0.elapsed(),
                e.dump()
            );
            let res = e.results(&[noop]);
            assert_eq!(res[0].as_ref().map(|r| r.state), Some(State::Ok));
            e.cancel(FlushScope::Items(vec![r.items[0].id])).unwrap();
        }
    }

    fn noop(t: Target, payload: &str) -> ItemSpec {
        let mut i = ItemSpec::new(t, "noop");
        i.payload = payload.as_bytes().to_vec();
        i
    }

    /// Equal entries of a batch share one body even when others come between them (a
    /// fan-out cycles through its groups): one body per group, not one per entry. Entries
    /// that differ in target or payload never share. Fails when only the previous entry's body
    /// is looked at.
    #[test]
    fn equal_entries_share_a_body_across_the_batch() {
        let e = engine();
        let (a, b) = (Target::Cpu(0), Target::Cpu(1));
        let specs = vec![
            noop(a.clone(), "x"),
            noop(b.clone(), "x"),
            noop(a.clone(), "x"),
            noop(b.clone(), "x"),
            noop(a.clone(), "y"),
            noop(a.clone(), "x"),
        ];
        let bodies = e.bodies("default", specs.into()).unwrap();
        let same = |i: usize, j: usize| Arc::ptr_eq(&bodies[i].body, &bodies[j].body);
        assert!(same(0, 2) && same(0, 5), "cpu:0 x shared");
        assert!(same(1, 3), "cpu:1 x shared");
        assert!(!same(0, 1), "targets differ");
        assert!(!same(0, 4), "payloads differ");
        // Past RECENT_BODIES distinct bodies the first is forgotten: a later equal entry
        // makes its own (a batch of distinct items compares a bounded number of bodies).
        let mut specs: Vec<ItemSpec> = (0..=RECENT_BODIES)
            .map(|i| noop(a.clone(), &i.to_string()))
            .collect();
        specs.push(noop(a.clone(), "0"));
        let bodies = e.bodies("default", specs.into()).unwrap();
        assert!(!Arc::ptr_eq(
            &bodies[0].body,
            &bodies[RECENT_BODIES + 1].body
        ));
    }
}
