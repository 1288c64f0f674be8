//! The mutex the scheduler's pieces sit behind (each pool's P, each queue's Q, each
//! workqueue's record, the item table, the flushes, the batches, the totals, the result
//! store's R): `std`'s futex mutex, without poisoning, under the names the engine uses.
//!
//! Why not `parking_lot`'s, which the rest of the crate uses: a thread that finds a
//! `parking_lot` mutex held spins a few rounds and then calls `sched_yield` up to seven times
//! before it parks. Beside a thread that never sleeps (a busy host, even one running at a
//! lower priority) each yield gives the CPU away for a time slice, milliseconds: two busy
//! groups through one engine made 9 800 yields per 2 000 batches of 1 000 there, most inside
//! [`super::lock_spinning`] after its own spin had stopped for the busy CPU, and ran at 1.1M
//! items/s (4.3M with this lock; 7.3M on a quiet host, 6.9M with this lock). `std`'s slow
//! path spins without yielding and then waits on the futex, and a woken waiter runs soon
//! even beside a busy thread. The shared holds' own spinning is [`super::lock_spinning`]'s,
//! which stops beside a busy thread. (L, the engine's `RwLock`, is still `parking_lot`'s: its
//! exclusive holds are off the hot path, and a flush no longer takes it exclusive.)
//!
//! Invariant: a panic while the lock is held does not poison it (as with `parking_lot`): the
//! engine's holders leave every piece consistent before anything that may panic, or roll
//! back (`shared_submit.rs`), and the next holder goes on.

use std::sync::{PoisonError, TryLockError};

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
}
