//! Busy neighbours for the profile loops' `busy` option: one thread per CPU of the bench's
//! affinity that never sleeps, at nice 10 (below every thread of the bench and the daemon),
//! for as long as the [`Neighbours`] value lives. It stands for a host whose other work keeps
//! every CPU busy, the case where a thread that yields loses its CPU for a time slice.
//!
//! Invariant: the threads stop and are joined when the value is dropped; each loop checks
//! the stop flag on every round.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// The running neighbours (see the module docs).
pub struct Neighbours {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Neighbours {
    /// Started when the profile's arguments ask for `busy` (anywhere among them).
    pub fn if_asked(args: &[String]) -> Option<Neighbours> {
        args.iter().any(|a| a == "busy").then(Neighbours::start)
    }

    /// Starts one busy thread per CPU the bench may run on.
    pub fn start() -> Neighbours {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = crate::topo::affinity()
            .iter()
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    // SAFETY: plain syscalls on this thread's own id.
                    let set = unsafe {
                        let tid = libc::gettid() as libc::id_t;
                        libc::setpriority(libc::PRIO_PROCESS, tid, 10)
                    };
                    if set != 0 {
                        eprintln!("wqd-bench: busy: could not lower a neighbour's priority");
                    }
                    while !stop.load(Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        Neighbours { stop, threads }
    }
}

impl Drop for Neighbours {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
