//! The worker's side of one `WorkerService.Attach` stream: the handshake, the slots, and the
//! loop that turns daemon messages into work for the slot threads and slot answers into
//! `Done`/`HandBack`/`Credit` messages. Runs on the worker's own tokio runtime (one thread).
//!
//! Invariants (the steps and races are argued in `README.md` beside this file):
//! - every `Work` received is answered exactly once (`Done` or `HandBack`) while the stream
//!   is open, unless the stream is lost, in which case the daemon's lost-worker policy applies;
//! - a slot never holds more items than the credits this session granted it (it grants
//!   `prefetch` at open and one more per answer, none once stopping);
//! - the session half-closes only when it holds nothing and the daemon has answered every
//!   `CloseSlot` with `SlotClosed` (no `Work` for that slot follows it), so no `Work` can cross
//!   the half-close.

use std::collections::{HashMap, HashSet};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tracing::{debug, info, warn};
use wqd_proto::v1::{self, daemon_message, done, worker_message};

use super::item::{Held, WorkItem, TAKEN_BACK};
use super::slot::{self, Answer, Handlers, SlotEvent};
use super::{Attached, Graceful, WorkerError, WorkerReport};
use crate::Client;

/// How long an affinity hand-back keeps the slot's credit before returning it.
const AFFINITY_BACKOFF: Duration = Duration::from_millis(100);
/// The longest a stopping session waits for every `SlotClosed` before half-closing anyway
/// (once it holds nothing).
const CLOSE_ACK_LIMIT: Duration = Duration::from_secs(10);

/// What the session needs to attach.
pub(crate) struct Plan {
    pub(crate) client: Client,
    pub(crate) handlers: Arc<Handlers>,
    pub(crate) name: String,
    pub(crate) prefetch: u32,
    pub(crate) cpus: Vec<u32>,
}

/// Internal events: the slot threads' answers, and the timers of this session.
enum Event {
    Slot(SlotEvent),
    Recredit(u32),
}

struct SlotHandle {
    cpu: u32,
    tx: Option<std_mpsc::Sender<Arc<Held>>>,
    thread: Option<JoinHandle<()>>,
}

/// One attached session, owned by the runtime thread.
struct Session {
    worker_id: u64,
    /// `None` once half-closed.
    out: Option<UnboundedSender<v1::WorkerMessage>>,
    slots: HashMap<u32, SlotHandle>,
    /// Items received and not answered, with their slot.
    held: HashMap<u64, (u32, Arc<Held>)>,
    events_tx: UnboundedSender<Event>,
    stopping: Option<Graceful>,
    /// Slots the daemon answered `SlotClosed` for.
    closed: HashSet<u32>,
    /// Set when [`CLOSE_ACK_LIMIT`] passed without every `SlotClosed`.
    close_wait_over: bool,
    report: WorkerReport,
}

/// Attaches, reports the welcome through `ready`, serves until stopped or lost, then stops
/// and joins every slot thread.
///
/// Postcondition: every slot thread has returned.
pub(crate) async fn run(
    plan: Plan,
    ready: std_mpsc::Sender<Attached>,
    mut stop_rx: UnboundedReceiver<Graceful>,
) -> Result<WorkerReport, WorkerError> {
    let (out_tx, out_rx) = unbounded_channel();
    let hello = v1::Hello {
        handlers: {
            let mut h: Vec<String> = plan.handlers.keys().cloned().collect();
            h.sort();
            h
        },
        pid: std::process::id(),
        name: plan.name.clone(),
    };
    let _ = out_tx.send(msg(worker_message::Msg::Hello(hello)));
    // A refusal can come as the call's own status (before any message): the same as a
    // status that ends the stream.
    let mut inbound = plan
        .client
        .attach(UnboundedReceiverStream::new(out_rx))
        .await
        .map_err(|e| match e {
            crate::ClientError::Status(s) => WorkerError::Ended(s),
            other => WorkerError::Client(other),
        })?;
    let welcome = match inbound.message().await {
        Ok(Some(v1::DaemonMessage {
            msg: Some(daemon_message::Msg::Welcome(w)),
        })) => w,
        Ok(Some(other)) => {
            return Err(WorkerError::Protocol(format!(
                "the daemon's first message is not Welcome: {other:?}"
            )))
        }
        Ok(None) => {
            return Err(WorkerError::Protocol(
                "the session ended before Welcome".into(),
            ))
        }
        Err(s) => return Err(WorkerError::Ended(s)),
    };
    let prefetch = if welcome.max_credits > 0 {
        plan.prefetch.min(welcome.max_credits)
    } else {
        plan.prefetch
    };
    let (events_tx, mut events_rx) = unbounded_channel::<Event>();
    let mut s = Session {
        worker_id: welcome.worker_id,
        out: Some(out_tx),
        slots: HashMap::new(),
        held: HashMap::new(),
        events_tx,
        stopping: None,
        closed: HashSet::new(),
        close_wait_over: false,
        report: WorkerReport {
            worker_id: welcome.worker_id,
            ..Default::default()
        },
    };
    let mut opened = Vec::new();
    for (i, &cpu) in plan.cpus.iter().enumerate() {
        let slot = u32::try_from(i).map_err(|_| WorkerError::Config("too many slots".into()))?;
        let (tx, rx) = std_mpsc::channel();
        let handlers = Arc::clone(&plan.handlers);
        let events = s.events_tx.clone();
        let pinning = welcome.pinning;
        let thread = std::thread::Builder::new()
            .name(format!("wqd-slot-{cpu}"))
            .spawn(move || {
                slot::run(slot, cpu, pinning, handlers, rx, |e| {
                    events.send(Event::Slot(e)).is_ok()
                })
            })
            .map_err(WorkerError::Start)?;
        s.slots.insert(
            slot,
            SlotHandle {
                cpu,
                tx: Some(tx),
                thread: Some(thread),
            },
        );
        s.send(worker_message::Msg::OpenSlot(v1::OpenSlot { slot, cpu }));
        s.send(worker_message::Msg::Credit(v1::Credit {
            slot,
            credits: prefetch,
        }));
        opened.push((slot, cpu));
    }
    info!(
        worker_id = welcome.worker_id,
        slots = opened.len(),
        pinning = welcome.pinning,
        "attached to wqd"
    );
    let _ = ready.send(Attached {
        worker_id: welcome.worker_id,
        pinning: welcome.pinning,
        epoch: welcome.epoch,
        max_credits: welcome.max_credits,
        max_output_bytes: welcome.max_output_bytes,
        slots: opened,
    });
    drop(ready);

    // Armed when a stop begins; until then far away (and its branch disabled).
    let close_wait = tokio::time::sleep(Duration::from_secs(86_400));
    tokio::pin!(close_wait);
    let result = loop {
        tokio::select! {
            m = inbound.message() => match m {
                Ok(Some(m)) => s.on_daemon(m),
                Ok(None) if s.out.is_none() => break Ok(()),
                Ok(None) => break Err(WorkerError::Protocol(
                    "the daemon ended the session while the worker was attached".into(),
                )),
                Err(st) => break Err(WorkerError::Ended(st)),
            },
            Some(ev) = events_rx.recv() => s.on_event(ev),
            stop = stop_rx.recv(), if s.stopping.is_none() => {
                // A dropped handle stops the worker too, handing back what it has not started.
                s.begin_stop(stop.unwrap_or(Graceful::HandBack));
                close_wait
                    .as_mut()
                    .reset(tokio::time::Instant::now() + CLOSE_ACK_LIMIT);
            }
            () = &mut close_wait, if s.stopping.is_some() && !s.close_wait_over => {
                warn!(
                    worker_id = s.worker_id,
                    "not every slot was answered SlotClosed in {CLOSE_ACK_LIMIT:?}; half-closing once nothing is held"
                );
                s.close_wait_over = true;
            }
        }
        s.maybe_half_close();
    };
    s.shutdown(result.is_err());
    result.map(|()| s.report.clone())
}

fn msg(m: worker_message::Msg) -> v1::WorkerMessage {
    v1::WorkerMessage { msg: Some(m) }
}

impl Session {
    fn send(&self, m: worker_message::Msg) {
        match &self.out {
            Some(out) => {
                let _ = out.send(msg(m));
            }
            None => warn!(
                worker_id = self.worker_id,
                "message after half-close dropped: {m:?}"
            ),
        }
    }

    /// Credits to return with an answer: one while serving, none once stopping.
    fn credit(&self) -> u32 {
        u32::from(self.stopping.is_none())
    }

    fn hand_back(&mut self, item_id: u64, reason: &str, credits: u32) {
        self.report.handed_back += 1;
        self.send(worker_message::Msg::HandBack(v1::HandBack {
            item_id,
            reason: reason.into(),
            credits,
        }));
    }

    fn on_daemon(&mut self, m: v1::DaemonMessage) {
        match m.msg {
            Some(daemon_message::Msg::Work(w)) => self.on_work(w),
            Some(daemon_message::Msg::Cancel(c)) => self.on_cancel(c.item_id),
            Some(daemon_message::Msg::SlotClosed(c)) => {
                if self.stopping.is_none() {
                    warn!(
                        worker_id = self.worker_id,
                        slot = c.slot,
                        "SlotClosed for a slot not being closed; ignored"
                    );
                } else {
                    self.closed.insert(c.slot);
                }
            }
            Some(daemon_message::Msg::Welcome(_)) => {
                warn!(worker_id = self.worker_id, "a second Welcome; ignored")
            }
            None => warn!(
                worker_id = self.worker_id,
                "an empty daemon message; ignored"
            ),
        }
    }

    fn on_work(&mut self, w: v1::Work) {
        let (id, slot) = (w.item_id, w.slot);
        if self.held.contains_key(&id) {
            warn!(
                item = id,
                "the daemon sent an item this worker already holds; ignored"
            );
            return;
        }
        if self.out.is_none() {
            warn!(
                item = id,
                "work after half-close cannot be answered; the daemon's lost-worker policy applies"
            );
            return;
        }
        if matches!(self.stopping, Some(Graceful::HandBack)) {
            self.hand_back(id, "stopping", 0);
            return;
        }
        let Some(tx) = self.slots.get(&slot).and_then(|s| s.tx.as_ref()) else {
            warn!(
                item = id,
                slot, "work for a slot this worker did not open; handed back"
            );
            self.hand_back(id, "no-slot", 0);
            return;
        };
        let held = Arc::new(Held::new(WorkItem::from_work(w)));
        if tx.send(Arc::clone(&held)).is_err() {
            self.report.failed += 1;
            self.send(worker_message::Msg::Done(v1::Done {
                item_id: id,
                outcome: Some(done::Outcome::Error(
                    "the worker's slot thread is gone".into(),
                )),
                cpu_finished: None,
                credits: 0,
            }));
            return;
        }
        self.held.insert(id, (slot, held));
    }

    fn on_cancel(&mut self, item_id: u64) {
        let Some((_, held)) = self.held.get(&item_id) else {
            debug!(item = item_id, "cancel of an item no longer held; ignored");
            return;
        };
        held.item.cancel.raise();
        if held.claim(TAKEN_BACK) {
            // Not started: answer now; the slot thread will skip it.
            self.held.remove(&item_id);
            self.report.cancelled += 1;
            let credits = self.credit();
            self.send(worker_message::Msg::Done(v1::Done {
                item_id,
                outcome: Some(done::Outcome::Cancelled(true)),
                cpu_finished: None,
                credits,
            }));
        }
    }

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Slot(SlotEvent::Answered {
                slot,
                item_id,
                answer,
                cpu_finished,
            }) => {
                if self.held.remove(&item_id).is_none() {
                    return;
                }
                debug!(item = item_id, slot, ?cpu_finished, "answered");
                let outcome = match answer {
                    Answer::Ok(out) => {
                        self.report.ok += 1;
                        done::Outcome::Ok(out)
                    }
                    Answer::Error(e) => {
                        self.report.failed += 1;
                        done::Outcome::Error(e)
                    }
                    Answer::Cancelled => {
                        self.report.cancelled += 1;
                        done::Outcome::Cancelled(true)
                    }
                };
                let credits = self.credit();
                self.send(worker_message::Msg::Done(v1::Done {
                    item_id,
                    outcome: Some(outcome),
                    cpu_finished,
                    credits,
                }));
            }
            Event::Slot(SlotEvent::Affinity { slot, item_id }) => {
                if self.held.remove(&item_id).is_none() {
                    return;
                }
                self.hand_back(item_id, "affinity", 0);
                if self.stopping.is_none() {
                    // Keep the credit a moment, so a slot that cannot reach its CPU does not
                    // spin taking and handing back items.
                    let tx = self.events_tx.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(AFFINITY_BACKOFF).await;
                        let _ = tx.send(Event::Recredit(slot));
                    });
                }
            }
            Event::Recredit(slot) => {
                if self.stopping.is_none() {
                    self.send(worker_message::Msg::Credit(v1::Credit { slot, credits: 1 }));
                }
            }
        }
    }

    /// Step 1 of a graceful stop: no more credits, every slot closed, and with `HandBack`
    /// every unstarted item handed back. Items that arrive later (sent before the daemon read
    /// the close) are run (`Finish`) or handed back (`HandBack`); see `maybe_half_close`.
    fn begin_stop(&mut self, mode: Graceful) {
        info!(
            worker_id = self.worker_id,
            ?mode,
            held = self.held.len(),
            "stopping"
        );
        self.stopping = Some(mode);
        let mut slots: Vec<u32> = self.slots.keys().copied().collect();
        slots.sort_unstable();
        for slot in slots {
            self.send(worker_message::Msg::CloseSlot(v1::CloseSlot { slot }));
        }
        if mode == Graceful::HandBack {
            let unstarted: Vec<u64> = self
                .held
                .iter()
                .filter(|(_, (_, h))| h.claim(TAKEN_BACK))
                .map(|(&id, _)| id)
                .collect();
            for id in unstarted {
                self.held.remove(&id);
                self.hand_back(id, "stopping", 0);
            }
        }
    }

    /// Step 2 of a graceful stop: half-close once nothing is held and every slot's
    /// `SlotClosed` has arrived (or the wait for them is over).
    fn maybe_half_close(&mut self) {
        if self.stopping.is_none() || self.out.is_none() || !self.held.is_empty() {
            return;
        }
        let all_closed = self.slots.keys().all(|k| self.closed.contains(k));
        if all_closed || self.close_wait_over {
            debug!(
                worker_id = self.worker_id,
                "slots closed, nothing held; half-closing"
            );
            self.out = None;
        }
    }

    /// Ends the session: on a lost stream raises every held item's cancel flag (nobody can
    /// answer them now); closes every slot's queue and joins its thread.
    fn shutdown(&mut self, lost: bool) {
        if lost {
            for (_, h) in self.held.values() {
                h.item.cancel.raise();
            }
            if !self.held.is_empty() {
                warn!(
                    worker_id = self.worker_id,
                    held = self.held.len(),
                    "session lost with items held; the daemon's on_worker_lost policy decides them"
                );
            }
        }
        self.out = None;
        for s in self.slots.values_mut() {
            s.tx = None;
        }
        for (slot, s) in self.slots.iter_mut() {
            if let Some(t) = s.thread.take() {
                if t.join().is_err() {
                    warn!(slot = *slot, cpu = s.cpu, "slot thread panicked");
                }
            }
        }
    }
}
