//! The mutex the scheduler's pieces sit behind (each pool's P, each queue's Q, each
//! workqueue's record, the item table, the flushes, the batches, the totals, the result
//! store's R): `std`'s futex mutex, without poisoning, under the names the engine uses.
//!
//! Why not `parking_lot`'s, which the rest of the crate uses: a thread that finds a
//! `parking_lot` mutex held spins a few rounds and then calls `sched_yield` up to seven times
//! before it parks. Beside a thread that never sleeps (a busy host, even one running at a
//! lower priority) each yield gives the CPU away for a time slice, milliseconds: two busy
//! groups through one engine made 9 800 yields per 2 000 batches of 1 000 there, most inside
//! [`Mutex::lock_spinning`] after its own spin had stopped for the busy CPU, and ran at 1.1M
//! items/s (4.3M with this lock; 7.3M on a quiet host, 6.9M with this lock). `std`'s slow
//! path spins without yielding and then waits on the futex, and a woken waiter runs soon
//! even beside a busy thread. The shared holds' own spinning is [`Mutex::lock_spinning`]'s,
//! which stops yielding beside a busy thread (`spin`). (L, the engine's `RwLock`, is still
//! `parking_lot`'s: its exclusive holds are off the hot path, and a flush no longer takes it
//! exclusive.)
//!
//! Invariant: a panic while the lock is held does not poison it (as with `parking_lot`): the
//! engine's holders leave every piece consistent before anything that may panic, or roll
//! back (`shared_submit.rs`), and the next holder goes on.

use std::sync::{PoisonError, TryLockError};
use std::time::{Duration, Instant};

use super::{spin, SPIN};

/// How long [`Mutex::lock_spinning`] keeps trying a lock that another thread holds before
/// it waits: as long as an idle worker spins for work ([`SPIN`]).
const LOCK_SPIN: Duration = SPIN;

/// A guard of [`Mutex`].
pub(crate) type MutexGuard<'a, T> = std::sync::MutexGuard<'a, T>;

/// See the module docs.
#[derive(Default)]
pub(crate) struct Mutex<T>(std::sync::Mutex<T>);

impl<T> Mutex<T> {
    pub(crate) const fn new(t: T) -> Mutex<T> {
        Mutex(std::sync::Mutex::new(t))
    }

    /// Takes the lock, waiting on the futex after a short spin (no yields).
    #[inline]
    pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes the lock, trying for up to [`LOCK_SPIN`] before it waits in [`Mutex::lock`]:
    /// rounds of [`spin`] (pause hints, a yield every 64, none on a CPU found shared with a
    /// thread that does not sleep), trying the lock every fourth.
    ///
    /// For the locks the two CPUs' workers meet on in their shared holds (a queue's Q and the
    /// item table, taken for binds and removals of the same batch) and R, which both take to
    /// store their results. Each is held for a few microseconds at a time (never across an
    /// item's run), but [`Mutex::lock`] waits on the futex after a short spin, and a futex
    /// wait and wake-up cost tens of microseconds on a VM. Session requests of 1 000 items
    /// over gRPC, two workers on one queue: 1.49–1.58M -> 1.60–1.69M items/s with full
    /// results, 2.90–3.57M -> 3.70–4.17M with summary ones; two busy groups through one engine
    /// 5.6–5.9M -> 6.6–6.7M (session 33, on `parking_lot`'s mutex).
    pub(crate) fn lock_spinning(&self) -> MutexGuard<'_, T> {
        if let Some(g) = self.try_lock() {
            return g;
        }
        let until = Instant::now() + LOCK_SPIN;
        let mut rounds = 0u32;
        loop {
            // Tried every 4 rounds: each try writes the line its holder is using.
            if rounds.is_multiple_of(4) {
                if let Some(g) = self.try_lock() {
                    return g;
                }
            }
            // The clock is read every 16 rounds, not each (a round is one pause hint).
            spin(&mut rounds);
            if rounds.is_multiple_of(16) && Instant::now() >= until {
                return self.lock();
            }
        }
    }

    /// Takes the lock if it is free.
    #[inline]
    pub(crate) fn try_lock(&self) -> Option<MutexGuard<'_, T>> {
        match self.0.try_lock() {
            Ok(g) => Some(g),
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }

    /// The value, the lock consumed.
    pub(crate) fn into_inner(self) -> T {
        self.0.into_inner().unwrap_or_else(PoisonError::into_inner)
    }

    /// The value, through a unique reference (no locking).
    #[inline]
    pub(crate) fn get_mut(&mut self) -> &mut T {
        self.0.get_mut().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::Mutex;

    #[test]
    fn a_panic_while_held_does_not_poison_it() {
        let m = std::sync::Arc::new(Mutex::new(1u32));
        let m2 = m.clone();
        let r = std::thread::spawn(move || {
            let mut g = m2.lock();
            *g = 2;
            panic!("while held");
        })
        .join();
        assert!(r.is_err(), "the thread panicked");
        assert_eq!(*m.lock(), 2, "the value written before the panic is kept");
        assert_eq!(m.try_lock().map(|g| *g), Some(2), "and the lock is free");
    }

    /// `lock_spinning` excludes as `lock` does: four threads add to a plain counter under
    /// it, with holds long enough that most takers spin and some outlast the spin and park
    /// (a hold of 200 µs every 64th time); the count must come out exact, and no taker may
    /// hang. A thread that waits on a hold far longer than the spin parks: it spends a small
    /// part of the hold's time on its CPU, and gets the lock once it is released.
    #[test]
    fn lock_spinning_excludes_and_outlasts_long_holds() {
        use std::time::{Duration, Instant};
        let m = std::sync::Arc::new(Mutex::new(0u64));
        const THREADS: u64 = 4;
        const ADDS: u64 = 2_000;
        let threads: Vec<_> = (0..THREADS)
            .map(|t| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for i in 0..ADDS {
                        let mut g = m.lock_spinning();
                        let v = *g;
                        for _ in 0..8 {
                            std::hint::spin_loop();
                        }
                        if (i + t) % 64 == 0 {
                            std::thread::sleep(Duration::from_micros(200));
                        }
                        *g = v + 1;
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("no panic");
        }
        assert_eq!(
            *m.lock(),
            THREADS * ADDS,
            "every add under the lock, none lost"
        );
        // Held far past the spin: the waiter spins for about LOCK_SPIN, then parks (its
        // CPU time stays far below the hold), and gets the lock once it is released.
        let g = m.lock();
        let waiter = {
            let m = m.clone();
            std::thread::spawn(move || {
                let cpu = || {
                    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
                        .map(Duration::from)
                        .expect("thread CPU clock")
                };
                let (t0, c0) = (Instant::now(), cpu());
                *m.lock_spinning() += 1;
                (t0.elapsed(), cpu() - c0)
            })
        };
        std::thread::sleep(Duration::from_millis(100));
        drop(g);
        let (waited, spent) = waiter.join().expect("no panic");
        assert!(
            waited >= Duration::from_millis(90),
            "it waited for the release: {waited:?}"
        );
        assert!(
            spent < Duration::from_millis(20),
            "it spun through the hold instead of parking: {spent:?} of CPU in {waited:?}"
        );
        assert_eq!(*m.lock(), THREADS * ADDS + 1);
    }
}
