//! A condition variable for threads that wait with the engine lock L held, now that L is a
//! reader-writer lock (a `Condvar` waits only with a `Mutex` guard).
//!
//! Invariant: no wake-up is lost. A waiter reads the signal's generation while it still holds
//! L, and only then releases L; a notifier bumps the generation after the change it signals
//! (made under L, in a hold that is either before the waiter's — which then saw the change —
//! or after its release — whose bump the waiter then sees, since it read the generation
//! first). The generation's own mutex is taken inside L or with no lock held, never the other
//! way round.

use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, RwLockWriteGuard};

use super::sched::Sched;

#[derive(Default)]
pub(crate) struct Signal {
    gen: Mutex<u64>,
    cv: Condvar,
}

impl Signal {
    pub(crate) fn notify_one(&self) {
        *self.gen.lock() += 1;
        self.cv.notify_one();
    }

    pub(crate) fn notify_all(&self) {
        *self.gen.lock() += 1;
        self.cv.notify_all();
    }

    /// Releases L (`guard`), waits until a notification that comes after this call or until
    /// `deadline`, and takes L again. Returns whether the deadline passed first.
    pub(crate) fn wait_until(
        &self,
        guard: &mut RwLockWriteGuard<'_, Sched>,
        deadline: Instant,
    ) -> bool {
        let mut g = self.gen.lock();
        let seen = *g;
        // `move`: the generation's lock is released inside, before L is taken again (a
        // notifier holding L takes it: the other order would deadlock).
        RwLockWriteGuard::unlocked(guard, move || {
            while *g == seen {
                if self.cv.wait_until(&mut g, deadline).timed_out() {
                    return true;
                }
            }
            false
        })
    }

    /// [`wait_until`](Self::wait_until) for `wait` from now.
    pub(crate) fn wait_for(&self, guard: &mut RwLockWriteGuard<'_, Sched>, wait: Duration) -> bool {
        self.wait_until(guard, Instant::now() + wait)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use parking_lot::RwLock;

    use super::Signal;
    use crate::cpuset::CpuSet;
    use crate::engine::sched::Sched;
    use crate::engine::EngineConfig;

    /// The notifier can take L only once the waiter released it inside the wait, and notifies
    /// after its own hold: the waiter must hear it (a generation read after L's release could
    /// miss it and sleep to the deadline).
    #[test]
    fn a_change_made_after_the_waiter_released_l_wakes_it() {
        let snap = crate::live::flat_snapshot(&CpuSet::range(0, 0));
        let l = Arc::new(RwLock::new(Sched::new(&EngineConfig::default(), snap)));
        let sig = Arc::new(Signal::default());
        for _ in 0..50 {
            let mut g = l.write();
            let (l2, sig2) = (l.clone(), sig.clone());
            let notifier = std::thread::spawn(move || {
                let mut s = l2.write();
                s.shutdown = !s.shutdown;
                drop(s);
                sig2.notify_one();
            });
            let before = g.shutdown;
            let deadline = Instant::now() + Duration::from_secs(60);
            assert!(!sig.wait_until(&mut g, deadline), "the wake-up was lost");
            assert_ne!(g.shutdown, before, "woken only after the change");
            drop(g);
            notifier.join().unwrap();
        }
        // And with nobody to notify, the deadline ends the wait.
        let mut g = l.write();
        assert!(sig.wait_for(&mut g, Duration::from_millis(5)));
    }

    /// Shutdown notifies with L held. A waiter woken (or timed out) at that moment must not
    /// take L again while it still holds the generation's lock: the notifier, holding L, waits
    /// for that lock, and both would wait forever. The rounds run on threads of their own; the
    /// test fails if they have not all finished within a minute (a deadlock leaves them stuck).
    #[test]
    fn a_notifier_holding_l_never_deadlocks_against_a_waking_waiter() {
        let snap = crate::live::flat_snapshot(&CpuSet::range(0, 0));
        let l = Arc::new(RwLock::new(Sched::new(&EngineConfig::default(), snap)));
        let sig = Arc::new(Signal::default());
        const ROUNDS: u32 = 20_000;
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let waiter = {
            let (l, sig, done) = (l.clone(), sig.clone(), done_tx.clone());
            std::thread::spawn(move || {
                let mut woken = 0u32;
                for _ in 0..ROUNDS {
                    let mut g = l.write();
                    // Short deadlines: some waits end by timeout, some by a notification.
                    if !sig.wait_for(&mut g, Duration::from_micros(50)) {
                        woken += 1;
                    }
                }
                done.send(()).unwrap();
                woken
            })
        };
        let notifier = {
            let (l, sig, done) = (l.clone(), sig.clone(), done_tx);
            std::thread::spawn(move || {
                for _ in 0..ROUNDS {
                    let s = l.write();
                    // Two notifications in one hold: the waiter the first wakes wants L back
                    // while the second takes the generation's lock.
                    sig.notify_all();
                    sig.notify_one();
                    drop(s);
                }
                done.send(()).unwrap();
            })
        };
        for _ in 0..2 {
            done_rx
                .recv_timeout(Duration::from_secs(60))
                .expect("the waiter and a notifier holding L deadlocked");
        }
        notifier.join().unwrap();
        let woken = waiter.join().unwrap();
        assert!(
            woken > 0,
            "no wait ever ended by a notification: the test raced nothing"
        );
    }
}
