//! One slot: an OS thread bound to one CPU that runs the handlers of the items the session
//! gives it, one at a time, and reports each answer back to the session.
//!
//! Invariants: a handler runs only on its slot's thread, only for an item whose claim the
//! thread won (see [`super::item::Held`]), and, when the daemon asked for pinning, only after
//! `sched_getcpu()` said the thread is on the slot's CPU; every item the thread claims
//! produces exactly one [`SlotEvent`]. A panic in a handler is caught here and becomes an
//! error answer; it never takes the thread down.

use std::any::Any;
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::Receiver;
use std::sync::Arc;

use nix::sched::{sched_setaffinity, CpuSet};
use nix::unistd::Pid;
use tracing::{debug, warn};

use super::item::{Held, WorkItem, STARTED};

/// A handler: the item in, its output or an error text out.
pub type HandlerFn = dyn Fn(&WorkItem) -> Result<Vec<u8>, String> + Send + Sync + 'static;

/// The handlers of one worker, by name; immutable once the worker is spawned.
pub(crate) type Handlers = HashMap<String, Arc<HandlerFn>>;

/// How an item ended on its slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Answer {
    Ok(Vec<u8>),
    Error(String),
    Cancelled,
}

/// What a slot thread tells the session.
#[derive(Debug)]
pub(crate) enum SlotEvent {
    /// The handler ran (or could not be found); answer `Done`.
    Answered {
        slot: u32,
        item_id: u64,
        answer: Answer,
        cpu_finished: Option<u32>,
    },
    /// The thread was not on its CPU and could not get there; answer `HandBack("affinity")`.
    Affinity { slot: u32, item_id: u64 },
}

/// Pins the calling thread to `cpu`.
pub(crate) fn pin(cpu: u32) -> nix::Result<()> {
    let mut set = CpuSet::new();
    set.set(usize::try_from(cpu).map_err(|_| nix::Error::EINVAL)?)?;
    sched_setaffinity(Pid::from_raw(0), &set)
}

/// The CPU the calling thread runs on now.
pub(crate) fn current_cpu() -> Option<u32> {
    // SAFETY: sched_getcpu takes no arguments and has no preconditions; -1 means error.
    let c = unsafe { libc::sched_getcpu() };
    u32::try_from(c).ok()
}

/// The slot thread's body: runs until the session drops the sending side of `rx` (or
/// `report` says the session is gone).
pub(crate) fn run(
    slot: u32,
    cpu: u32,
    pinning: bool,
    handlers: Arc<Handlers>,
    rx: Receiver<Arc<Held>>,
    report: impl Fn(SlotEvent) -> bool,
) {
    if pinning {
        // An offline CPU cannot be pinned to; the slot stays, and the daemon sends it nothing
        // until the CPU is live again (then the per-item check below re-pins).
        if let Err(e) = pin(cpu) {
            warn!(slot, cpu, error = %e, "cannot pin the slot thread yet");
        }
    }
    while let Ok(held) = rx.recv() {
        if !held.claim(STARTED) {
            continue; // handed back or cancelled by the session before it started
        }
        let item = &held.item;
        if pinning && current_cpu() != Some(cpu) {
            let _ = pin(cpu);
            if current_cpu() != Some(cpu) {
                debug!(
                    slot,
                    cpu,
                    item = item.id,
                    "not on the slot's CPU; handing back"
                );
                let _ = report(SlotEvent::Affinity {
                    slot,
                    item_id: item.id,
                });
                continue;
            }
        }
        let answer = run_handler(&handlers, item);
        let cpu_finished = if pinning { current_cpu() } else { None };
        let sent = report(SlotEvent::Answered {
            slot,
            item_id: item.id,
            answer,
            cpu_finished,
        });
        if !sent {
            break; // the session is gone (stream lost); nobody can answer any more
        }
    }
}

/// Runs the item's handler and turns its outcome into an answer (the rule is documented on
/// [`crate::worker`]): `Ok` → ok; `Err` while the item is cancelled → cancelled; `Err` →
/// error; a panic → error `handler panicked: MESSAGE`.
pub(crate) fn run_handler(handlers: &Handlers, item: &WorkItem) -> Answer {
    let Some(h) = handlers.get(&item.handler) else {
        warn!(item = item.id, handler = %item.handler, "the daemon sent a handler this worker does not serve");
        return Answer::Error(format!(
            "handler {:?} is not served by this worker",
            item.handler
        ));
    };
    match catch_unwind(AssertUnwindSafe(|| h(item))) {
        Ok(Ok(out)) => Answer::Ok(out),
        Ok(Err(e)) if item.is_cancelled() => {
            debug!(item = item.id, error = %e, "handler stopped after cancel");
            Answer::Cancelled
        }
        Ok(Err(e)) => Answer::Error(e),
        Err(p) => Answer::Error(format!("handler panicked: {}", panic_message(&*p))),
    }
}

fn panic_message(p: &(dyn Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(not a string)".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wqd_proto::v1;

    fn item(handler: &str) -> WorkItem {
        WorkItem::from_work(v1::Work {
            item_id: 7,
            handler: handler.into(),
            payload: b"abc".to_vec(),
            ..Default::default()
        })
    }

    fn handlers() -> Handlers {
        let mut h: Handlers = HashMap::new();
        h.insert(
            "echo".into(),
            Arc::new(|i: &WorkItem| Ok(i.payload.clone())),
        );
        h.insert("fail".into(), Arc::new(|_: &WorkItem| Err("nope".into())));
        h.insert("boom".into(), Arc::new(|_: &WorkItem| panic!("boom {}", 1)));
        h
    }

    #[test]
    fn outcomes_map_to_answers() {
        let h = handlers();
        assert_eq!(run_handler(&h, &item("echo")), Answer::Ok(b"abc".to_vec()));
        assert_eq!(run_handler(&h, &item("fail")), Answer::Error("nope".into()));
        assert_eq!(
            run_handler(&h, &item("boom")),
            Answer::Error("handler panicked: boom 1".into())
        );
        let cancelled = item("fail");
        cancelled.cancel.raise();
        assert_eq!(run_handler(&h, &cancelled), Answer::Cancelled);
        // Ok after cancel is still ok: the work was done.
        let done = item("echo");
        done.cancel.raise();
        assert_eq!(run_handler(&h, &done), Answer::Ok(b"abc".to_vec()));
        assert!(
            matches!(run_handler(&h, &item("other")), Answer::Error(e) if e.contains("not served"))
        );
    }

    #[test]
    fn pins_to_an_allowed_cpu() {
        // The first CPU this process may use; pinning there must put the thread on it.
        let allowed = nix::sched::sched_getaffinity(Pid::from_raw(0)).expect("getaffinity");
        let Some(cpu) = (0..CpuSet::count()).find(|&c| allowed.is_set(c).unwrap_or(false)) else {
            return;
        };
        let cpu = u32::try_from(cpu).expect("small cpu number");
        let t = std::thread::spawn(move || {
            pin(cpu).expect("pin");
            current_cpu()
        });
        assert_eq!(t.join().ok().flatten(), Some(cpu));
    }
}
