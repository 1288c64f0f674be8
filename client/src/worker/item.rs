//! What a handler sees: [`WorkItem`], one `Work` message of the daemon plus the item's
//! cancellation flag, and the claim that decides who owns an item the slot thread has not
//! started yet.
//!
//! Invariant: an item held by the worker is answered exactly once. The slot thread and the
//! session both try to move [`Held::claim`] out of `QUEUED`; whoever wins answers the item
//! (the slot thread by running it, the session by handing it back or answering it cancelled),
//! and the loser leaves it alone.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use wqd_proto::v1;

/// One item the daemon sent to this worker, as the handler sees it.
///
/// Fields are immutable after the session builds it; only the cancellation flag changes
/// (raised once by the session when the daemon sends `Cancel`, never lowered).
#[derive(Debug)]
pub struct WorkItem {
    /// The item's id in the daemon.
    pub id: u64,
    /// The handler name it was submitted with (one this worker serves).
    pub handler: String,
    /// Its arguments.
    pub args: HashMap<String, String>,
    /// Its payload.
    pub payload: Vec<u8>,
    /// The CPU it was bound to: the CPU of the slot running it.
    pub cpu: u32,
    /// The daemon's topology epoch in which it checked the CPU live and sent the item.
    pub epoch: u64,
    /// The batch it was submitted in.
    pub batch_id: u64,
    /// Its workqueue.
    pub workqueue: String,
    /// Times a worker was lost while holding it and it was queued again (workqueue
    /// `on_worker_lost = REQUEUE`): with `attempt > 0` it may have run before, in part or whole.
    pub attempt: u32,
    /// Times it was bound and handed back before (re-binds).
    pub rebinds: u32,
    /// The worker's slot running it.
    pub slot: u32,
    pub(crate) cancel: CancelFlag,
}

impl WorkItem {
    pub(crate) fn from_work(w: v1::Work) -> WorkItem {
        WorkItem {
            id: w.item_id,
            handler: w.handler,
            args: w.args.into_iter().collect(),
            payload: w.payload,
            cpu: w.cpu,
            epoch: w.epoch,
            batch_id: w.batch_id,
            workqueue: w.workqueue,
            attempt: w.attempt,
            rebinds: w.rebinds,
            slot: w.slot,
            cancel: CancelFlag::default(),
        }
    }

    /// Whether the daemon has cancelled this item (its `Cancel` arrived). A handler that
    /// notices should stop and return `Err`: an `Err` returned while cancelled is answered
    /// `Done {cancelled}` (see [`crate::worker`]).
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_raised()
    }

    /// Blocks until the item is cancelled or `timeout` passes; returns whether it is
    /// cancelled. Handy as an interruptible sleep inside a handler.
    pub fn wait_cancelled(&self, timeout: Duration) -> bool {
        self.cancel.wait(timeout)
    }

    /// An argument's value.
    pub fn arg(&self, key: &str) -> Option<&str> {
        self.args.get(key).map(String::as_str)
    }
}

/// A flag raised once. Fast path: the atomic; waiters sleep on the condvar.
#[derive(Debug, Default)]
pub(crate) struct CancelFlag {
    /// Written under `lock` (so no waiter misses it), read without it. Release/Acquire.
    raised: AtomicBool,
    lock: Mutex<()>,
    cond: Condvar,
}

impl CancelFlag {
    pub(crate) fn raise(&self) {
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.raised.store(true, Ordering::Release);
        self.cond.notify_all();
    }

    pub(crate) fn is_raised(&self) -> bool {
        self.raised.load(Ordering::Acquire)
    }

    fn wait(&self, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        let mut g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        while !self.raised.load(Ordering::Acquire) {
            let now = Instant::now();
            if now >= end {
                return false;
            }
            g = match self.cond.wait_timeout(g, end - now) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
        true
    }
}

/// `Held::claim` states.
pub(crate) const QUEUED: u8 = 0;
/// The slot thread took it: it will run and answer it.
pub(crate) const STARTED: u8 = 1;
/// The session took it back (hand-back or cancelled before start): the slot thread skips it.
pub(crate) const TAKEN_BACK: u8 = 2;

/// An item between the session and its slot thread.
#[derive(Debug)]
pub(crate) struct Held {
    pub(crate) item: WorkItem,
    /// QUEUED → STARTED (slot thread) or QUEUED → TAKEN_BACK (session); one CAS decides.
    claim: AtomicU8,
}

impl Held {
    pub(crate) fn new(item: WorkItem) -> Held {
        Held {
            item,
            claim: AtomicU8::new(QUEUED),
        }
    }

    /// Moves the claim from QUEUED to `to`; true if this caller won.
    pub(crate) fn claim(&self, to: u8) -> bool {
        self.claim
            .compare_exchange(QUEUED, to, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_claim_wins() {
        let h = Held::new(WorkItem::from_work(v1::Work::default()));
        assert!(h.claim(STARTED));
        assert!(!h.claim(TAKEN_BACK));
    }

    #[test]
    fn cancel_wakes_a_waiter() {
        let item = std::sync::Arc::new(WorkItem::from_work(v1::Work::default()));
        assert!(!item.wait_cancelled(Duration::from_millis(5)));
        let i2 = std::sync::Arc::clone(&item);
        let t = std::thread::spawn(move || i2.wait_cancelled(Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(20));
        item.cancel.raise();
        assert!(t.join().unwrap_or(false));
        assert!(item.is_cancelled());
    }
}
