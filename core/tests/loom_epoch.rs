//! Model check of the topology seqlock (`core/src/engine/epoch.rs`) with `loom`: the file is
//! included here with loom's atomics in place of `std`'s, and loom runs every interleaving of
//! one publisher against readers (within its bounds), under the C11 memory model.
//!
//! The property: a read returns the flag and the epoch of one published snapshot. Snapshot 1
//! has CPU 0 live and CPU 1 not; snapshot 2 the reverse. A torn read (CPU 1 live "in epoch 1",
//! or CPU 0 not live in epoch 1) is the bug a wrong ordering or a missing retry would allow.

mod sync {
    pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    /// Loom needs a spinning thread to yield, or it reports a livelock.
    pub(crate) fn spin_loop() {
        loom::thread::yield_now();
    }
}

#[allow(dead_code)]
#[path = "../src/engine/epoch.rs"]
mod epoch;

use epoch::LiveFlags;
use loom::sync::Arc;

/// The (live, epoch) pairs snapshots 1 and 2 allow for `cpu`.
fn allowed(cpu: u32, got: (bool, u64)) -> bool {
    matches!(
        (cpu, got),
        (0, (true, 1)) | (0, (false, 2)) | (1, (false, 1)) | (1, (true, 2))
    )
}

fn publish(flags: &LiveFlags, live: [bool; 2], epoch: u64) {
    let p = flags.publish();
    p.set(0, live[0]);
    p.set(1, live[1]);
    p.finish(epoch);
}

/// Snapshot 1 published, and a thread publishing snapshot 2 started.
fn racing_publication() -> (Arc<LiveFlags>, loom::thread::JoinHandle<()>) {
    let flags = Arc::new(LiveFlags::new(2));
    publish(&flags, [true, false], 1);
    let writer = {
        let flags = flags.clone();
        loom::thread::spawn(move || publish(&flags, [false, true], 2))
    };
    (flags, writer)
}

#[test]
fn a_reader_sees_one_snapshot_never_a_mix() {
    loom::model(|| {
        let (flags, writer) = racing_publication();
        for cpu in [1, 0] {
            let got = flags.read(cpu).expect("cpu in range");
            assert!(allowed(cpu, got), "cpu {cpu}: torn read {got:?}");
        }
        writer.join().expect("writer");
        // After the publication, every read sees snapshot 2.
        assert_eq!(flags.read(0), Some((false, 2)));
        assert_eq!(flags.live_now(1), Some(2));
    });
}

#[test]
fn reads_after_a_newer_epoch_never_go_back() {
    // Once a reader has seen epoch 2, a later read by the same thread cannot return epoch 1.
    loom::model(|| {
        let (flags, writer) = racing_publication();
        let first = flags.read(1).expect("cpu in range");
        let second = flags.read(0).expect("cpu in range");
        assert!(allowed(1, first) && allowed(0, second));
        assert!(
            second.1 >= first.1,
            "went back from {first:?} to {second:?}"
        );
        writer.join().expect("writer");
    });
}

#[test]
fn a_publication_dropped_midway_still_closes_the_seqlock() {
    // A panic between set and finish must not leave readers spinning: Drop closes the seqlock.
    loom::model(|| {
        let flags = Arc::new(LiveFlags::new(1));
        {
            let p = flags.publish();
            p.set(0, true);
        }
        assert_eq!(flags.read(0), Some((true, 0)));
    });
}
