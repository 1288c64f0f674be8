//! Attached workers in the torture (daemon mode, `--attached-worker PATH`): worker processes
//! (the `wqd-worker-example` binary of `wqd-client`, one slot per CPU, pinned, checking
//! `sched_getcpu` before each item) serve the handler [`HANDLER`] while the CPUs churn; the
//! submitters send a share of their items to it. A keeper thread kills one worker with SIGKILL
//! every few seconds (seeded) and starts a new one, so items are lost mid-run by their worker;
//! the torture's workqueues re-deliver them (`on_worker_lost = requeue`), and the checks hold
//! those items to the same contract as every other (started only on a CPU live in its epoch,
//! inside its group or its recorded fallback, terminal exactly once).
//!
//! Invariant: when the run ends ([`Keeper::finish`]), every worker slot is alive again, so
//! the final flush never waits for a handler nobody serves; every process started here is
//! killed and reaped before the driver exits.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The handler attached workers serve.
pub const HANDLER: &str = "tw";

/// What the keeper did, for the report.
#[derive(Debug, Default)]
pub struct KeeperStats {
    pub started: AtomicU64,
    pub killed: AtomicU64,
}

/// The worker processes and the thread that kills and restarts them.
pub struct Keeper {
    procs: Arc<Mutex<Vec<Child>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub stats: Arc<KeeperStats>,
    spawn: Arc<dyn Fn(usize) -> Result<Child> + Send + Sync>,
}

impl Keeper {
    /// Starts `n` workers of `bin` on `socket` and the keeper thread.
    ///
    /// # Errors
    /// A worker that cannot be started.
    pub fn start(bin: PathBuf, socket: PathBuf, n: usize, seed: u64) -> Result<Keeper> {
        let stats = Arc::new(KeeperStats::default());
        let st = stats.clone();
        let spawn: Arc<dyn Fn(usize) -> Result<Child> + Send + Sync> = Arc::new(move |k| {
            st.started.fetch_add(1, Ordering::Relaxed);
            Command::new(&bin)
                .arg("--socket")
                .arg(&socket)
                .args(["--target", "all", "--handler", HANDLER])
                .args(["--name", &format!("torture-{k}")])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .with_context(|| format!("starting {}", bin.display()))
        });
        let mut v = Vec::with_capacity(n);
        for k in 0..n {
            v.push(spawn(k)?);
        }
        let procs = Arc::new(Mutex::new(v));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (procs, stop, spawn, stats) =
                (procs.clone(), stop.clone(), spawn.clone(), stats.clone());
            std::thread::Builder::new()
                .name("torture-keeper".into())
                .spawn(move || {
                    let mut rng = StdRng::seed_from_u64(seed ^ 0x6b65_6570);
                    while !stop.load(Ordering::Relaxed) {
                        let pause = Duration::from_millis(rng.gen_range(2000..6000));
                        let until = std::time::Instant::now() + pause;
                        while std::time::Instant::now() < until && !stop.load(Ordering::Relaxed) {
                            std::thread::sleep(Duration::from_millis(50));
                        }
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let mut p = procs.lock();
                        let k = rng.gen_range(0..p.len());
                        let _ = p[k].kill();
                        let _ = p[k].wait();
                        stats.killed.fetch_add(1, Ordering::Relaxed);
                        match spawn(k) {
                            Ok(c) => p[k] = c,
                            Err(e) => eprintln!("torture: restarting worker {k}: {e:#}"),
                        }
                    }
                })
                .context("starting the keeper thread")?
        };
        Ok(Keeper {
            procs,
            stop,
            thread: Some(thread),
            stats,
            spawn,
        })
    }

    /// Stops killing; makes sure every worker is running (restarting the dead), so the final
    /// flush has someone to serve [`HANDLER`].
    pub fn finish(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let mut p = self.procs.lock();
        for (k, c) in p.iter_mut().enumerate() {
            if !matches!(c.try_wait(), Ok(None)) {
                if let Ok(n) = (self.spawn)(k) {
                    *c = n;
                }
            }
        }
    }

    /// How many workers are running now.
    pub fn running(&self) -> usize {
        self.procs
            .lock()
            .iter_mut()
            .map(|c| matches!(c.try_wait(), Ok(None)))
            .filter(|alive| *alive)
            .count()
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        for c in self.procs.lock().iter_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
