//! Host CPU load: a sampler thread that refreshes every CPU's busy fraction from the kernel
//! (`/proc/stat`, through `sysinfo`) into atomics, for the engine's `idle` placement
//! ([`LoadSampler::hook`]) and the `busy` column of `GetTopology` ([`LoadSampler::busy`]).
//!
//! Owns: the `wqd-load` thread and the per-CPU table. Invariants: the table is written only by
//! the sampler thread and read lock-free by anyone (relaxed: each value is an independent
//! statistic, a reader may see one CPU's new sample next to another's old one); every stored
//! value is in `0.0..=1.0`; a CPU the host does not report (offline, or named only by a
//! fixture tree) reads 0.0. Dropping the [`LoadSampler`] stops and joins the thread.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{RecvTimeoutError, Sender};
use sysinfo::{CpuRefreshKind, RefreshKind, System};

use crate::cpuset::MAX_CPUS;
use crate::engine::LoadHook;

/// How often the sampler refreshes by default.
pub const DEFAULT_PERIOD: Duration = Duration::from_millis(500);

/// Busy fractions by CPU number, as `f32` bits. Written by the sampler thread only.
struct Table {
    busy: Box<[AtomicU32]>,
}

impl Table {
    fn get(&self, cpu: u32) -> f64 {
        self.busy.get(cpu as usize).map_or(0.0, |a| {
            f64::from(f32::from_bits(a.load(Ordering::Relaxed)))
        })
    }
}

/// The running sampler. See the module docs.
pub struct LoadSampler {
    table: Arc<Table>,
    /// Dropping it wakes the thread, which then exits.
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for LoadSampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadSampler").finish_non_exhaustive()
    }
}

impl LoadSampler {
    /// Starts the `wqd-load` thread, sampling every `period` (at least 200 ms, the shortest
    /// interval over which the kernel's counters give a meaningful fraction).
    ///
    /// # Errors
    /// The OS error when the thread cannot be spawned.
    pub fn start(period: Duration) -> std::io::Result<LoadSampler> {
        let period = period.max(sysinfo::MINIMUM_CPU_UPDATE_INTERVAL);
        let table = Arc::new(Table {
            busy: (0..MAX_CPUS).map(|_| AtomicU32::new(0)).collect(),
        });
        let (tx, rx) = crossbeam_channel::bounded::<()>(0);
        let t = table.clone();
        let thread = std::thread::Builder::new()
            .name("wqd-load".into())
            .spawn(move || {
                let mut sys = System::new_with_specifics(
                    RefreshKind::nothing().with_cpu(CpuRefreshKind::nothing().with_cpu_usage()),
                );
                loop {
                    match rx.recv_timeout(period) {
                        Err(RecvTimeoutError::Timeout) => {}
                        Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
                    }
                    sys.refresh_cpu_usage();
                    for (i, cpu) in sys.cpus().iter().enumerate() {
                        let n = cpu
                            .name()
                            .strip_prefix("cpu")
                            .and_then(|n| n.parse::<usize>().ok())
                            .unwrap_or(i);
                        let frac = (cpu.cpu_usage() / 100.0).clamp(0.0, 1.0);
                        if let Some(slot) = t.busy.get(n) {
                            slot.store(frac.to_bits(), Ordering::Relaxed);
                        }
                    }
                }
            })?;
        Ok(LoadSampler {
            table,
            stop: Some(tx),
            thread: Some(thread),
        })
    }

    /// The busy fraction of `cpu` over the last sample, 0.0 (idle) to 1.0 (busy).
    pub fn busy(&self, cpu: u32) -> f64 {
        self.table.get(cpu)
    }

    /// The engine's load hook, reading the same table. It stays valid after the sampler is
    /// dropped (it then reads the last values).
    pub fn hook(&self) -> LoadHook {
        let t = self.table.clone();
        Arc::new(move |cpu| t.get(cpu))
    }
}

impl Drop for LoadSampler {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("load sampler thread panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_fractions_and_drop_stops_the_thread() {
        let s = LoadSampler::start(Duration::from_millis(200)).expect("spawn");
        std::thread::sleep(Duration::from_millis(450));
        let hook = s.hook();
        for cpu in 0..4 {
            let b = s.busy(cpu);
            assert!((0.0..=1.0).contains(&b), "cpu {cpu}: {b}");
            assert_eq!(b, hook(cpu));
        }
        assert_eq!(s.busy(MAX_CPUS + 5), 0.0);
        let started = std::time::Instant::now();
        drop(s);
        assert!(started.elapsed() < Duration::from_millis(150));
    }
}
