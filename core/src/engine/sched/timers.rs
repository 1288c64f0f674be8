//! Timers and housekeeping: the heap of delay and deadline timers, firing them (delay →
//! pending, deadline → expired), queueing a delayed item early ([`Sched::undelay`]), the
//! once-a-second housekeeping (results, batches, idle queues, pools without a worker), and
//! the instants submit computes for delays and deadlines.
//!
//! Invariant (under L): a timer entry whose item ended or left the state it was for is
//! garbage, counted in `stale_timers`; the heap is rebuilt without it once garbage is over 1024
//! entries and half the heap, so it stays within about twice the live items' timers. A batch
//! record stays while an item of its batch is live; once none is, housekeeping drops it when
//! `results_ttl` has passed since its submit or while more than `results_max` records are kept.

use std::cmp::Reverse;
use std::time::{Duration, Instant};

use crate::engine::{EngineError, State};

use super::finish::EXPIRED_UNSTARTED;
use super::item::{Item, ItemId};
use super::{Effects, Sched};

pub(super) const TIMER_DELAY: u8 = 0;
pub(super) const TIMER_DEADLINE: u8 = 1;

/// `now + d`, checked against `max` and the clock; `None` when `d` is unset or zero.
pub(super) fn instant_after(
    index: usize,
    field: &'static str,
    d: Option<Duration>,
    max: Duration,
    now: Instant,
) -> Result<Option<Instant>, EngineError> {
    let Some(d) = d.filter(|d| !d.is_zero()) else {
        return Ok(None);
    };
    let bad = |problem: String| EngineError::Duration {
        index,
        field,
        problem,
    };
    if d > max {
        return Err(bad(format!(
            "{} is longer than the limit of {}",
            humanize(d),
            humanize(max)
        )));
    }
    now.checked_add(d)
        .map(Some)
        .ok_or_else(|| bad(format!("{} is beyond what the clock can hold", humanize(d))))
}

/// A duration in whole seconds (or milliseconds below one second), for messages.
fn humanize(d: Duration) -> String {
    if d >= Duration::from_secs(1) {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// Live batch records a housekeeping pass moves from the front of the batch order to its
/// back at most (each a constant-time step): a pass stays short whatever is live.
const ROTATE: usize = 64;

impl Sched {
    pub(crate) fn next_timer(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((at, _, _))| *at)
    }

    pub(crate) fn fire_timers(&mut self, now: Instant, fx: &mut Effects) {
        while let Some(&Reverse((at, kind, id))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            let Some(state) = self.items.get_mut().get(&id).map(|i| i.state) else {
                self.stale_timers = self.stale_timers.saturating_sub(1);
                continue;
            };
            match (kind, state) {
                (TIMER_DELAY, State::Delayed) => self.undelay(id, fx),
                (TIMER_DEADLINE, State::Delayed | State::Pending) => {
                    self.end_unstarted(id, State::Expired, EXPIRED_UNSTARTED.into(), now, fx);
                }
                _ => self.stale_timers = self.stale_timers.saturating_sub(1),
            }
        }
    }

    /// Moves a delayed item into its queue now (its delay passed, or a flush covers it).
    pub(super) fn undelay(&mut self, id: ItemId, fx: &mut Effects) {
        let Some(qid) = self
            .items
            .get_mut()
            .get(&id)
            .filter(|i| i.state == State::Delayed)
            .map(Item::qid)
        else {
            return;
        };
        self.wqs[self.queues[qid].get_mut().wq].get_mut().delayed -= 1;
        self.queues[qid].get_mut().delayed -= 1;
        self.enqueue(id, fx);
        self.make_ready(qid, 1, fx);
    }

    pub(crate) fn housekeeping(&mut self, now: Instant, fx: &mut Effects) {
        self.results.lock().expire(now);
        // A live pool with work and no worker (its last one could not pin) gets a new one once
        // its hold-off has passed.
        let epoch = self.epoch;
        for (cpu, p) in self.pools.iter_mut() {
            let has_work = p
                .ready
                .iter()
                .any(|&q| self.queues.get(q).is_some_and(|q| q.lock().pending > 0));
            if p.live && p.workers == 0 && has_work && p.may_spawn(epoch) && !self.shutdown {
                p.workers = 1;
                p.coming += 1;
                fx.spawn.push((cpu, p.gen));
            }
        }
        // Batch records: one goes once all its items ended and `results_ttl` has passed since
        // its submit, or sooner while more are kept than the store keeps results
        // (`results_max`), oldest first: a client submitting many small batches must not grow
        // them for a whole ttl. One still live at the front moves to the back (at most
        // `ROTATE` per pass) instead of holding up the ended ones behind it.
        let (ttl, max) = {
            let r = self.results.lock();
            (r.ttl, r.max)
        };
        let mut rotated = 0;
        loop {
            let order = self.batch_order.get_mut();
            let Some(&b) = order.front() else {
                break;
            };
            let over = order.len() > max;
            let Some(rec) = self.batches.get_mut().get(&b) else {
                order.pop_front();
                continue;
            };
            if !over && now.duration_since(rec.created) < ttl {
                break;
            }
            if rec.live > 0 {
                if rotated == ROTATE {
                    break;
                }
                rotated += 1;
                order.pop_front();
                order.push_back(b);
                continue;
            }
            self.batches.get_mut().remove(&b);
            order.pop_front();
        }
        // A queue with nothing in it is dropped once it has been empty for `queue_idle`. Its
        // idle time starts when its last running item finishes (`finish`) or, for a queue
        // whose items all ended without running (cancelled, expired, rejected), when this
        // pass first finds it empty: otherwise such a queue would never be dropped, and a
        // client naming ever new targets would grow the engine without bound.
        let queue_idle = self.queue_idle;
        let mut idle: Vec<usize> = Vec::new();
        for (k, q) in self.queues.iter_mut() {
            let q = q.get_mut();
            if q.pending != 0 || q.running != 0 || q.delayed != 0 {
                continue;
            }
            match q.idle_since {
                None => q.idle_since = Some(now),
                Some(t) if now.duration_since(t) >= queue_idle => idle.push(k),
                Some(_) => {}
            }
        }
        for qid in idle {
            self.remove_queue(qid);
        }
    }

    /// Rebuilds the timer heap without its garbage once garbage is most of it, so the heap is
    /// bounded by the live items' timers (amortised O(1) per item).
    pub(super) fn collect_timer_garbage(&mut self) {
        if self.stale_timers < 1024 || self.stale_timers * 2 < self.timers.len() {
            return;
        }
        let items = self.items.get_mut();
        self.timers.retain(|Reverse((_, kind, id))| {
            items.get(id).is_some_and(|it| match *kind {
                TIMER_DELAY => it.state == State::Delayed,
                _ => matches!(it.state, State::Delayed | State::Pending),
            })
        });
        self.stale_timers = 0;
    }
}
