//! Worker threads as the scheduler sees them: parking and unparking, whether a worker of a
//! generation should go on, exit or retire, and the hand-off of an old-generation worker.
//!
//! Invariant (under L): a worker registers itself idle in the same critical section in which
//! it found nothing to take, so a submitter either sees it idle or the worker sees the item
//! (README, race 3); `Pool::workers` counts the workers of the pool's current generation, and
//! `Pool::coming` those of them called (woken or started) that have not entered L since: each
//! increment is matched by the called worker's next [`Sched::arrive`] (README, race 4).

use std::time::Instant;

use std::sync::Arc;

use super::queue::{Pool, SPAWN_HOLD};
use super::{Effects, Sched};
use crate::engine::worker::Wake;

impl Sched {
    /// Registers an idle worker so wake-ups find it.
    pub(crate) fn park(&mut self, cpu: u32, wid: u64, u: Arc<Wake>) {
        if let Some(p) = self.pools.get_mut(&cpu) {
            p.idle.push((wid, u));
        }
    }

    /// A worker of generation `gen` enters L: `fresh` on its first entry (it was started),
    /// `parked` when it registered idle in its previous hold. Removes it from its pool's idle
    /// list and returns whether it was still there (nobody woke it: its wait timed out);
    /// a worker that was started or woken is no longer coming.
    pub(crate) fn arrive(
        &mut self,
        cpu: u32,
        gen: u64,
        wid: u64,
        fresh: bool,
        parked: bool,
    ) -> bool {
        self.pools
            .get_mut(&cpu)
            .is_some_and(|p| p.arrive(gen, wid, fresh, parked))
    }

    /// Whether a worker of generation `gen` on `cpu` should keep going.
    pub(crate) fn worker_current(&mut self, cpu: u32, gen: u64) -> bool {
        !self.shutdown
            && self
                .pools
                .get_mut(&cpu)
                .is_some_and(|p| p.live && p.gen == gen)
    }

    /// Accounts for a worker leaving. `pin_failed` holds off respawning until the next epoch.
    pub(crate) fn worker_exit(&mut self, cpu: u32, gen: u64, pin_failed: bool) {
        let epoch = self.epoch;
        if let Some(p) = self.pools.get_mut(&cpu).filter(|p| p.gen == gen) {
            p.workers = p.workers.saturating_sub(1);
            if pin_failed {
                p.spawn_hold = Some((epoch, Instant::now() + SPAWN_HOLD));
            }
        }
    }

    /// Whether an idle worker may retire (another worker stays).
    pub(crate) fn may_retire(&mut self, cpu: u32, gen: u64) -> bool {
        self.pools
            .get_mut(&cpu)
            .is_some_and(|p| p.gen == gen && p.workers > 1)
    }

    /// A worker of an old generation of `cpu` is leaving after it finished its jobs, which may
    /// have freed `max_active` slots the CPU's current workers are waiting for: wake one of
    /// them (or start one) if the pool has work, since the leaving worker will not rescan.
    ///
    /// Only a worker of an *older* generation hands off, and never during shutdown: a worker of
    /// the current generation leaves only because the engine stops, and handing off then
    /// would start a worker that leaves at once and hands off again, without end.
    pub(crate) fn hand_off(&mut self, cpu: u32, gen: u64, fx: &mut Effects) {
        if self.shutdown {
            return;
        }
        let (epoch, max) = (self.epoch, self.max_workers);
        let queues = &self.queues;
        let Some(p) = self.pools.get_mut(&cpu).filter(|p| {
            p.live
                && p.gen != gen
                && p.ready
                    .iter()
                    .any(|&q| queues.get(q).is_some_and(|q| q.lock().pending > 0))
        }) else {
            return;
        };
        p.call_worker(cpu, epoch, max, fx);
    }

    pub(crate) fn wake_everyone(&mut self, fx: &mut Effects) {
        for p in self.pools.values_mut() {
            p.coming += p.idle.len();
            fx.unpark.extend(p.idle.drain(..).map(|(_, u)| u));
        }
    }
}

impl Pool {
    /// [`Sched::arrive`] in this pool (also the shared hold's, under P).
    pub(super) fn arrive(&mut self, gen: u64, wid: u64, fresh: bool, parked: bool) -> bool {
        let still_idle = parked
            && match self.idle.iter().position(|(w, _)| *w == wid) {
                Some(i) => {
                    self.idle.swap_remove(i);
                    true
                }
                None => false,
            };
        if (fresh || (parked && !still_idle)) && self.gen == gen {
            self.coming = self.coming.saturating_sub(1);
        }
        still_idle
    }
}
