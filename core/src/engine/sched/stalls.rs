//! Stalls: the look the watchdog thread (`engine/watchdog.rs`) takes under L — pools with runnable
//! work and no progress (lockups) and items running too long (CPU hogs).
//!
//! Invariant: each stall is reported once (`Pool::lockup_reported`, cleared on progress) and each
//! hog once (`Bound::hog_reported`); it only reports and counts, and changes no item's state.

use std::time::{Duration, Instant};

use super::Sched;

impl Sched {
    /// The watchdog's look: pools with runnable work and no progress for `thresh` are
    /// reported once per stall; items running longer than `hog` once each.
    /// Returns the reports made: (`true` for a lockup, `false` for a hog, cpu).
    pub(crate) fn watchdog(
        &mut self,
        now: Instant,
        thresh: Duration,
        hog: Duration,
    ) -> Vec<(bool, u32)> {
        let mut reports = Vec::new();
        if !thresh.is_zero() {
            let mut stuck = Vec::new();
            for (cpu, p) in self.pools.iter_mut() {
                let runnable = p.ready.iter().any(|&q| {
                    self.queues.get(q).is_some_and(|q| {
                        let q = q.lock();
                        q.pending > 0 && q.eligible.contains(cpu)
                    })
                });
                let stalled = now.duration_since(p.last_progress);
                if p.live && runnable && !p.lockup_reported && stalled >= thresh {
                    stuck.push((cpu, stalled));
                }
            }
            for (cpu, stalled) in stuck {
                let busy: Vec<String> = self
                    .wqs
                    .iter_mut()
                    .map(|(_, w)| &*w.get_mut())
                    .filter(|w| w.running_on.get(&cpu).is_some_and(|s| s[0] + s[1] > 0))
                    .map(|w| {
                        let s = w.running_on.get(&cpu).copied().unwrap_or_default();
                        format!("{} (active={} pending={})", w.name, s[0] + s[1], w.pending)
                    })
                    .collect();
                let items = self.items.get_mut();
                let running: Vec<String> = self
                    .pools
                    .get_mut(&cpu)
                    .into_iter()
                    .flat_map(|p| p.claims.iter())
                    .filter_map(|(_, b)| items.get(&b.id).map(|i| (b.id, i)))
                    .map(|(id, i)| {
                        format!("item {id} {} on {}", i.body.handler_name(), i.body.target)
                    })
                    .collect();
                tracing::error!(
                    "BUG: wqd lockup - pool cpus={cpu} stuck for {}s! busy workqueues: [{}]; running: [{}]",
                    stalled.as_secs(),
                    busy.join(", "),
                    running.join(", ")
                );
                self.lockups += 1;
                reports.push((true, cpu));
                if let Some(p) = self.pools.get_mut(&cpu) {
                    p.lockup_reported = true;
                }
            }
        }
        if !hog.is_zero() {
            for (_, b) in self.pools.values_mut().flat_map(|p| p.claims.iter_mut()) {
                let id = b.id;
                let Some(it) = self.items.get_mut().get(&id) else {
                    continue;
                };
                let ran = now.duration_since(b.at);
                if !b.hog_reported && ran >= hog {
                    b.hog_reported = true;
                    tracing::warn!(
                        "wqd: item {} ({} on {}) hogged cpu {} for {}ms",
                        id,
                        it.body.handler_name(),
                        it.body.target,
                        b.cpu,
                        ran.as_millis()
                    );
                    self.hogs += 1;
                    reports.push((false, b.cpu));
                }
            }
        }
        reports
    }
}
