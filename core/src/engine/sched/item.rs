//! What an item is: its id, its [`Body`] (handler, target, arguments), the live [`Item`]
//! record with its rarely used [`Cold`] part, a worker's claim on it ([`Bound`]), and what
//! crosses between the scheduler and a worker: the [`Job`] handed out, and the [`Finish`]
//! ([`Started`], [`Outcome`]) that comes back.
//!
//! Invariant: an `Item` exists (in `Sched::items`) exactly while its item is not terminal, and
//! stays small (one per pending item: 80 bytes, checked below and in `items.rs`); a `Bound`
//! exists (in its CPU's pool, `Pool::claims`) exactly while its item is `Running`. Both are
//! touched under L only (shared or exclusive); a `Job` and a `Finish` are the worker's own,
//! outside L.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::engine::{ItemSpec, State};
use crate::groups::Level;
use crate::handler::{Args, CancelToken, Handler, HandlerError, HandlerKind};
use crate::target::Target;

/// An item's id: unique for the engine's lifetime, increasing in submission order.
pub type ItemId = u64;

/// What an item does; shared by identical items of one batch.
pub(crate) struct Body {
    /// The handler, shared by every body of a batch that names it.
    pub handler: Arc<HandlerRef>,
    pub(super) target: Target,
    /// The name of the workqueue its batch was submitted to, shared by the batch's bodies:
    /// a full result names its workqueue through the body it moves to the result store
    /// (`results.rs`'s name table), so ending an item takes no count on a shared name.
    pub(super) workqueue: Arc<str>,
    /// Arguments and payload; `None` when both are empty (most items), which keeps a body at
    /// 64 bytes instead of 104.
    extra: Option<Box<Extra>>,
}

/// A handler as items refer to it: the name clients used, the handler and its kind.
pub(crate) struct HandlerRef {
    pub name: Arc<str>,
    pub handler: Arc<dyn Handler>,
    pub kind: HandlerKind,
    /// Served by attached workers (`remote.rs`), not by this process's worker threads.
    pub remote: bool,
}

/// The arguments and payload of a body that has either.
struct Extra {
    args: Args,
    payload: Vec<u8>,
}

static NO_ARGS: Args = Args::new();

impl Body {
    pub(crate) fn new(
        workqueue: Arc<str>,
        handler: Arc<HandlerRef>,
        target: Target,
        args: Args,
        payload: Vec<u8>,
    ) -> Body {
        let extra = if args.is_empty() && payload.is_empty() {
            None
        } else {
            Some(Box::new(Extra { args, payload }))
        };
        Body {
            handler,
            target,
            workqueue,
            extra,
        }
    }
    pub(crate) fn kind(&self) -> HandlerKind {
        self.handler.kind
    }
    pub(crate) fn handler_name(&self) -> &Arc<str> {
        &self.handler.name
    }
    /// The handler name when attached workers serve it.
    pub(crate) fn remote_name(&self) -> Option<&Arc<str>> {
        self.handler.remote.then_some(&self.handler.name)
    }
    pub(crate) fn args(&self) -> &Args {
        self.extra.as_ref().map_or(&NO_ARGS, |e| &e.args)
    }
    pub(crate) fn payload(&self) -> &[u8] {
        self.extra.as_ref().map_or(&[], |e| e.payload.as_slice())
    }
    pub(crate) fn same_as(&self, it: &ItemSpec) -> bool {
        self.target == it.target
            && *self.handler.name == *it.handler
            && *self.args() == it.args
            && self.payload() == it.payload.as_slice()
    }
}

/// One item of a batch as submit receives it: its (possibly shared) body and own options.
/// `delay` and `deadline` are as the client gave them; pass 1 of
/// [`Sched::submit`](super::Sched::submit) checks them against the limits and the clock.
pub(crate) struct Entry {
    pub body: Arc<Body>,
    pub key: Option<String>,
    pub delay: Option<Duration>,
    pub deadline: Option<Duration>,
}

/// A worker's claim on an item. Kept in its CPU's pool (`Pool::claims`), not in the item: only the few
/// items bound to a worker need it.
pub(crate) struct Bound {
    /// The bound item (its `Item::bound` names this record's CPU and slot, [`claim_of`]).
    pub(super) id: ItemId,
    pub(super) cpu: u32,
    /// The item's queue, workqueue and handler kind, copied from it at bind, so that a
    /// finish reads them here instead of looking the item up a second time.
    pub(super) queue: u32,
    pub(super) wq: u32,
    pub(super) kind: HandlerKind,
    pub(super) at: Instant,
    pub(super) token: CancelToken,
    pub(super) hog_reported: bool,
    /// Whether this item holds its worker's slot in `Wq::running_on`. The first item a worker
    /// takes in a lock hold does; items claimed with it (`Sched::claim_more`) run after it on
    /// the same worker, one at a time, and share that slot.
    pub(super) slot: bool,
    /// For an item held by an attached worker: (worker id, slot).
    pub(super) remote: Option<(u64, u32)>,
}

/// An item that is not terminal yet. Kept small (one of these per pending item): the fields
/// most items never use live out of line in [`Cold`], the worker's claim in its CPU's pool.
pub(crate) struct Item {
    pub batch: u64,
    pub body: Arc<Body>,
    pub key: Option<Arc<str>>,
    pub queued_at: SystemTime,
    /// The first flush waiting for this item (0 = none; flush ids start at 1); any further
    /// ones are in `cold.waiters`.
    pub waiter: u64,
    pub cold: Option<Box<Cold>>,
    pub wq: u32,
    pub queue: u32,
    /// While `Running`: its claim, the CPU and the slot in that CPU's pool's claims
    /// ([`claim_of`]; [`NOT_BOUND`] otherwise), so that binding and finishing cost no id
    /// look-up beyond the item's own.
    pub bound: u32,
    /// Times it was handed back before a start (saturating: 65 535 is "at least that many").
    pub rebinds: u16,
    pub state: State,
    pub fallback: Option<Level>,
}

/// The rarely used part of an item, allocated only when one of its fields is set.
#[derive(Default)]
pub(crate) struct Cold {
    pub(super) deadline: Option<Instant>,
    /// Why its fallback applied (set when it is bound through a widened queue).
    pub(super) reason: String,
    /// The epoch in which that fallback was decided (0: none).
    pub(super) decided: u64,
    /// Flushes waiting for this item beyond `Item::waiter`.
    pub(super) waiters: Vec<u64>,
    /// The attached worker that holds it, or held it last.
    pub(super) worker: Option<crate::engine::WorkerRef>,
    /// Times an attached worker was lost holding it and it was queued again.
    pub(super) lost: u32,
}

/// `Item::bound` of an item that is not bound.
pub(crate) const NOT_BOUND: u32 = u32::MAX;

/// Bits of a claim ([`Job::claim`], `Item::bound`) that hold its slot in its CPU's pool; the
/// CPU number is above them (CPUs are below `MAX_CPUS`, 2^13).
const SLOT_BITS: u32 = 19;

/// Claims one CPU may hold at once: a take stops (its items stay pending) while its pool
/// holds more than this less a batch, so a slot always fits its bits and no claim is
/// [`NOT_BOUND`]. (Half a million items running on one CPU: never in practice.)
pub(crate) const MAX_CLAIMS: usize = (1 << SLOT_BITS) - 1024;

/// The claim of slot `slot` of CPU `cpu`'s claims.
pub(crate) fn claim_of(cpu: u32, slot: usize) -> u32 {
    debug_assert!(
        slot < (1 << SLOT_BITS) - 1,
        "claim slot {slot} out of range"
    );
    (cpu << SLOT_BITS) | slot as u32
}

/// The CPU and slot of a claim (meaningless for [`NOT_BOUND`]).
pub(crate) fn claim_parts(claim: u32) -> (u32, usize) {
    (
        claim >> SLOT_BITS,
        (claim & ((1 << SLOT_BITS) - 1)) as usize,
    )
}

impl Item {
    pub(super) fn qid(&self) -> usize {
        self.queue as usize
    }
    pub(super) fn wi(&self) -> usize {
        self.wq as usize
    }
    pub(super) fn cold(&mut self) -> &mut Cold {
        self.cold.get_or_insert_with(Box::default)
    }
    pub(super) fn deadline(&self) -> Option<Instant> {
        self.cold.as_ref().and_then(|c| c.deadline)
    }
    pub(super) fn reason(&self) -> &str {
        self.cold.as_ref().map_or("", |c| c.reason.as_str())
    }
    /// Whether this item is still pending in queue `qid`: otherwise an id left in that
    /// queue's FIFO is a tombstone.
    pub(super) fn is_pending_in(&self, qid: usize) -> bool {
        self.state == State::Pending && self.qid() == qid
    }
    pub(super) fn add_waiter(&mut self, fid: u64) {
        if self.waiter == 0 {
            self.waiter = fid;
        } else {
            self.cold().waiters.push(fid);
        }
    }
}

/// Work handed to a worker. Its cancel token is the worker's own (reset by `take`).
pub(crate) struct Job {
    pub id: ItemId,
    /// Its claim (CPU and slot, [`claim_of`]), handed back in its [`Finish`].
    pub claim: u32,
    /// `None` for a copy claimed behind the first job of its batch (`Sched::claim_more`):
    /// it runs the first job's body, which the worker holds for the batch. Sharing it spares
    /// each copy a count taken and dropped on the body's reference count, a cache line every
    /// worker running copies of that body writes.
    pub body: Option<Arc<Body>>,
    /// The epoch in which it was bound. A job claimed behind another (`claim_more`) must
    /// start in this same epoch, or it is handed back.
    pub epoch: u64,
    /// Claimed behind another job of the same lock hold (see `Sched::claim_more`).
    pub claimed: bool,
    pub cpu: u32,
    pub nice: i32,
    pub queue: usize,
    /// The workqueue's name, for the observer (`None` when there is none, and for a job
    /// claimed behind another: it is the first job's, as for the body).
    pub workqueue: Option<Arc<str>>,
    pub queued_at: SystemTime,
    /// Whether its end is recorded with wall-clock times and CPUs: its workqueue keeps full
    /// results, or an observer wants run times. Otherwise (results `summary` or `none`, no
    /// observer) the worker reads no clock and no CPU for it beyond its start check.
    pub record: bool,
}

/// When and where an item started.
#[derive(Clone, Copy)]
pub(crate) struct Started {
    pub cpu: u32,
    pub at: SystemTime,
    pub epoch: u64,
}

/// How a job ended, reported back by its worker.
pub(crate) enum Outcome {
    Ran(Result<Vec<u8>, HandlerError>),
    /// The start check failed; the item goes back to its queue. The reason is a metric label.
    HandBack(&'static str),
    /// Cancelled after it was bound but before the handler was called.
    CancelledBeforeStart,
    /// The attached worker holding it was lost (why); it started when it was sent (`started`).
    Lost(String),
}

pub(crate) struct Finish {
    pub id: ItemId,
    /// The job's claim slot ([`Job::claim`]), or [`NOT_BOUND`] when not known (the finish
    /// then finds the claim through the item). Checked against `id` before it is used.
    pub claim: u32,
    pub outcome: Outcome,
    pub started: Option<Started>,
    pub finished: Option<(u32, SystemTime)>,
}

impl Finish {
    /// The job did not start; its item goes back to its queue.
    pub(crate) fn handback(id: ItemId, why: &'static str) -> Finish {
        Finish {
            id,
            claim: NOT_BOUND,
            outcome: Outcome::HandBack(why),
            started: None,
            finished: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A claim (`Item::bound`, `Job::claim`) says the CPU whose pool holds it and the slot
    /// there, for every CPU and every slot a take can reach, and is never `NOT_BOUND`.
    #[test]
    fn claims_name_their_cpu_and_slot_and_never_look_unbound() {
        // The largest CPU and the largest slot a take can reach (it stops at MAX_CLAIMS
        // claims, then binds at most a batch of 64).
        let cpu = crate::cpuset::MAX_CPUS - 1;
        for (c, slot) in [(0, 0), (3, 17), (cpu, 0), (cpu, MAX_CLAIMS + 64)] {
            let claim = claim_of(c, slot);
            assert_ne!(claim, NOT_BOUND, "cpu {c} slot {slot}");
            assert_eq!(claim_parts(claim), (c, slot));
        }
    }

    /// One `Item` per pending item, in a hash map: its size is most of the engine's memory
    /// per pending item (target: at most 256 bytes all told, see docs/benchmarks.md).
    #[test]
    fn item_stays_small() {
        assert!(
            std::mem::size_of::<Item>() <= 80,
            "Item grew to {} bytes",
            std::mem::size_of::<Item>()
        );
    }
}
