//! Busy neighbours for the `busy` section and the profile loops' `busy` option: one thread per
//! CPU of the bench's affinity that never sleeps, 10 nice levels below the bench (below every
//! thread of the bench and of the servers it starts; at most nice 19), for as long as the
//! [`Neighbours`] value lives. It stands for a host whose other work keeps every CPU busy, the
//! case where a thread that yields loses its CPU for a time slice.
//!
//! Invariant: the threads stop and are joined when the value is dropped; each loop checks
//! the stop flag on every round.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::report::Table;

/// The running neighbours (see the module docs).
pub struct Neighbours {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// The threads' kernel ids.
    tids: Vec<libc::pid_t>,
}

impl Neighbours {
    /// Started when the profile's arguments ask for `busy` (anywhere among them).
    pub fn if_asked(args: &[String]) -> Option<Neighbours> {
        args.iter().any(|a| a == "busy").then(Neighbours::start)
    }

    /// Starts one busy thread per CPU the bench may run on.
    pub fn start() -> Neighbours {
        // Relative to the bench's own nice level, so that `nice -n 10 bash bench/run.sh`
        // keeps the neighbours below it. (-1 is also getpriority's error return; 9 is then a
        // fine level too.)
        // SAFETY: a plain syscall about this process.
        let own = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
        let nice = (own + 10).min(19);
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let threads = crate::topo::affinity()
            .iter()
            .map(|_| {
                let (stop, tx) = (stop.clone(), tx.clone());
                std::thread::spawn(move || {
                    // SAFETY: plain syscalls on this thread's own id.
                    let (tid, set) = unsafe {
                        let tid = libc::gettid();
                        (
                            tid,
                            libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice),
                        )
                    };
                    if set != 0 {
                        eprintln!("wqd-bench: busy: could not lower a neighbour's priority");
                    }
                    let _ = tx.send(tid);
                    while !stop.load(Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect::<Vec<_>>();
        let tids = rx.iter().take(threads.len()).collect();
        Neighbours {
            stop,
            threads,
            tids,
        }
    }

    /// The neighbours' kernel thread ids (for `perf` and `/proc`).
    pub fn tids(&self) -> &[libc::pid_t] {
        &self.tids
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

/// Marks a section's table as measured beside [`Neighbours`]: its title and note say so.
pub fn mark(t: &mut Table) {
    t.title = format!("Beside a busy thread on each CPU: {}", t.title);
    t.note = format!(
        "{} Measured beside one thread per CPU that never sleeps, 10 nice levels below the \
         bench (at most nice 19; `bench/src/busy.rs`, started after the warm-up): a host \
         whose other work keeps every CPU busy, where a thread that yields its CPU loses it \
         for a time slice. No target is judged here.",
        t.note
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A thread's nice level, field 19 of `/proc/self/task/TID/stat` (after the `(comm)`).
    fn nice_of(tid: libc::pid_t) -> Option<i32> {
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
        let after = &stat[stat.rfind(')')? + 2..];
        after.split(' ').nth(16)?.parse().ok()
    }

    #[test]
    fn neighbours_run_below_the_bench_one_per_cpu_and_stop_when_dropped() {
        // SAFETY: a plain syscall about this process.
        let own = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
        let n = Neighbours::start();
        let tids = n.tids().to_vec();
        assert_eq!(tids.len(), crate::topo::affinity().iter().count());
        for &t in &tids {
            assert_eq!(nice_of(t), Some((own + 10).min(19)), "thread {t}");
        }
        drop(n);
        for &t in &tids {
            assert_eq!(nice_of(t), None, "thread {t} still runs");
        }
    }
}
