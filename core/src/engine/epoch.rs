//! The topology as workers see it without the scheduler lock: which CPUs are live, and in
//! which epoch. The scheduler publishes each applied snapshot here (under its lock L, so there
//! is one writer at a time); a worker's start check reads one CPU's flag and the epoch together
//! through a seqlock, without waiting for L.
//!
//! Invariant: a read returns the flag and the epoch of one published snapshot, never a mix of
//! two (the sequence number is odd while a publication is under way, and a read that saw it
//! change or odd tries again). `core/tests/loom_epoch.rs` model-checks this with `loom`, which
//! includes this file with loom's atomics in place of `std`'s (`super::sync`).

use super::sync::{spin_loop, AtomicBool, AtomicU64, Ordering};

/// Per-CPU live flags and the epoch they belong to, behind a seqlock.
pub(crate) struct LiveFlags {
    /// Odd while a publication is under way.
    seq: AtomicU64,
    epoch: AtomicU64,
    live: Box<[AtomicBool]>,
}

impl LiveFlags {
    /// Flags for CPUs `0..cpus`, none live, epoch 0.
    pub(crate) fn new(cpus: usize) -> LiveFlags {
        LiveFlags {
            seq: AtomicU64::new(0),
            epoch: AtomicU64::new(0),
            live: (0..cpus).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    /// Whether `cpu` has a flag (CPUs beyond the range are never run by the engine).
    pub(crate) fn covers(&self, cpu: u32) -> bool {
        (cpu as usize) < self.live.len()
    }

    /// Whether `cpu` is live, and the epoch of the snapshot that says so.
    pub(crate) fn read(&self, cpu: u32) -> Option<(bool, u64)> {
        let flag = self.live.get(cpu as usize)?;
        loop {
            let s1 = self.seq.load(Ordering::Acquire);
            if s1 & 1 == 1 {
                spin_loop();
                continue;
            }
            let live = flag.load(Ordering::Acquire);
            let epoch = self.epoch.load(Ordering::Acquire);
            let s2 = self.seq.load(Ordering::Acquire);
            if s1 == s2 {
                return Some((live, epoch));
            }
        }
    }

    /// `Some(epoch)` when `cpu` is live now (the start check's question).
    pub(crate) fn live_now(&self, cpu: u32) -> Option<u64> {
        match self.read(cpu) {
            Some((true, epoch)) => Some(epoch),
            _ => None,
        }
    }

    /// Starts publishing a snapshot. The caller must be the only writer (the scheduler holds
    /// L); readers retry until the returned guard is finished or dropped.
    pub(crate) fn publish(&self) -> Publish<'_> {
        // AcqRel: the flag and epoch stores below cannot move before this increment, so a
        // reader that sees any of them sees the sequence number odd or changed.
        self.seq.fetch_add(1, Ordering::AcqRel);
        Publish { flags: self }
    }
}

/// A publication in progress: set flags, then [`Publish::finish`] with the new epoch. Dropped
/// without finishing (a panic), it still closes the seqlock so readers do not spin forever.
pub(crate) struct Publish<'a> {
    flags: &'a LiveFlags,
}

impl Publish<'_> {
    /// Marks `cpu` live or not in the snapshot being published (CPUs beyond the flags' range
    /// are ignored: the engine does not run them).
    pub(crate) fn set(&self, cpu: u32, live: bool) {
        if let Some(f) = self.flags.live.get(cpu as usize) {
            f.store(live, Ordering::Release);
        }
    }

    /// Stores the snapshot's epoch and closes the seqlock.
    pub(crate) fn finish(self, epoch: u64) {
        self.flags.epoch.store(epoch, Ordering::Release);
        // Drop closes it.
    }
}

impl Drop for Publish<'_> {
    fn drop(&mut self) {
        self.flags.seq.fetch_add(1, Ordering::Release);
    }
}
