//! CPU hotplug: the writer thread that offlines and onlines CPUs, and the log it keeps.
//!
//! [`CpuCtl`] is the only code that writes `cpuN/online`. It is reached only when the driver was
//! started with `--allow-hotplug` (the VM's `/init` passes it; a host never should unless it is
//! a machine you mean to torture). One thread ([`run`]) does every write, so transitions never
//! overlap; each is logged as a [`Transition`] with the monotonic time before and after the
//! write and the state read back afterwards.
//!
//! [`HotplugLog`] answers the question the checks need: was CPU N *certainly* online (or
//! offline) during a whole interval? A CPU's state is known between writes and unknown during a
//! write (the kernel flips it somewhere inside); a failed write leaves the state read back.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError};
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::clock::{ms, secs, Clock};

/// Why a transition happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Cause {
    /// Bringing every CPU online before the run.
    Setup,
    /// One random CPU toggled.
    Random,
    /// Every hotpluggable CPU taken offline together.
    AllOff,
    /// Every offline CPU brought back together.
    AllOn,
    /// The seed's scenario took a leaf's CPUs down.
    Scenario,
    /// Bringing every CPU back at the end.
    Final,
}

impl Cause {
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Setup => "setup",
            Cause::Random => "random",
            Cause::AllOff => "all-off",
            Cause::AllOn => "all-on",
            Cause::Scenario => "scenario",
            Cause::Final => "final",
        }
    }
}

/// One write to `cpuN/online`.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub cpu: u32,
    /// What was written: true for online.
    pub online: bool,
    /// Timeline before the write started and after it returned.
    pub begin: Duration,
    pub end: Duration,
    /// The state read back after the write.
    pub now_online: bool,
    /// The write's error, if it failed.
    pub error: Option<String>,
    pub cause: Cause,
}

/// Reads and writes `<root>/devices/system/cpu/cpuN/online`.
#[derive(Debug, Clone)]
pub struct CpuCtl {
    cpu_dir: PathBuf,
}

impl CpuCtl {
    /// Controls the CPUs under `sys_root` (normally `/sys`).
    pub fn new(sys_root: &Path) -> CpuCtl {
        CpuCtl {
            cpu_dir: sys_root.join("devices/system/cpu"),
        }
    }

    fn online_file(&self, cpu: u32) -> PathBuf {
        self.cpu_dir.join(format!("cpu{cpu}/online"))
    }

    /// CPUs of `cpus` that have an `online` file (cpu0 usually has none).
    pub fn hotpluggable(&self, cpus: impl Iterator<Item = u32>) -> Vec<u32> {
        cpus.filter(|c| self.online_file(*c).exists()).collect()
    }

    /// Whether `cpu` is online now.
    ///
    /// # Errors
    /// The file cannot be read.
    pub fn is_online(&self, cpu: u32) -> io::Result<bool> {
        let p = self.online_file(cpu);
        match std::fs::read_to_string(&p) {
            Ok(s) => Ok(s.trim() == "1"),
            // No `online` file: a CPU that cannot be hotplugged is always online.
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(true),
            Err(e) => Err(e),
        }
    }

    /// Writes `1` or `0` to `cpuN/online`.
    ///
    /// # Errors
    /// The kernel refused (EBUSY, EPERM, ...).
    pub fn set(&self, cpu: u32, online: bool) -> io::Result<()> {
        std::fs::write(self.online_file(cpu), if online { "1" } else { "0" })
    }
}

/// The log of every transition, shared between the writer thread and the checks.
#[derive(Debug, Default)]
pub struct HotplugLog {
    /// State of each hotpluggable CPU when the log started.
    pub initial: BTreeMap<u32, bool>,
    /// In write order (one writer, so also in time order, never overlapping).
    pub transitions: Vec<Transition>,
}

impl HotplugLog {
    /// Whether `cpu` was certainly in state `online` during all of `[from, to]`: the interval
    /// lies between the end of one write (or the start) and the begin of the next, in a period
    /// where the CPU was in that state. CPUs the log never touched (cpu0) are always online.
    pub fn certainly(&self, cpu: u32, online: bool, from: Duration, to: Duration) -> bool {
        let Some(&initial) = self.initial.get(&cpu) else {
            return online;
        };
        // Known segments: [start, next.begin) in `state`, then after each write's end.
        let mut seg_start = Duration::ZERO;
        let mut state = initial;
        for t in self.transitions.iter().filter(|t| t.cpu == cpu) {
            if state == online && from >= seg_start && to < t.begin {
                return true;
            }
            seg_start = t.end;
            state = t.now_online;
        }
        state == online && from >= seg_start
    }

    /// Counts: (offline writes, online writes, failed writes).
    pub fn counts(&self) -> (usize, usize, usize) {
        let mut c = (0, 0, 0);
        for t in &self.transitions {
            if t.error.is_some() {
                c.2 += 1;
            } else if t.online {
                c.1 += 1;
            } else {
                c.0 += 1;
            }
        }
        c
    }
}

/// What the scenario asks of the writer thread.
#[derive(Debug)]
pub enum Cmd {
    /// Take these CPUs offline now, in this order (the ones that are online).
    Offline(Vec<u32>),
}

/// Settings of the writer thread.
#[derive(Debug, Clone)]
pub struct HotplugConfig {
    pub seed: u64,
    /// The CPUs it may take down (never cpu0).
    pub cpus: Vec<u32>,
    /// Pause between operations, drawn uniformly from this range.
    pub min_gap: Duration,
    pub max_gap: Duration,
}

/// The writer: owns the only [`CpuCtl`] that writes, and appends to the log.
pub struct Writer {
    ctl: CpuCtl,
    clock: Arc<Clock>,
    log: Arc<Mutex<HotplugLog>>,
    print: bool,
}

impl Writer {
    pub fn new(ctl: CpuCtl, clock: Arc<Clock>, log: Arc<Mutex<HotplugLog>>, print: bool) -> Self {
        Writer {
            ctl,
            clock,
            log,
            print,
        }
    }

    /// Writes one transition and logs it. Returns the state read back afterwards.
    pub fn write(&self, cpu: u32, online: bool, cause: Cause) -> bool {
        let begin = self.clock.now();
        let r = self.ctl.set(cpu, online);
        let end = self.clock.now();
        let now_online = match (&r, self.ctl.is_online(cpu)) {
            (_, Ok(s)) => s,
            // Cannot read back: assume the write did what it said if it succeeded.
            (Ok(()), Err(_)) => online,
            (Err(_), Err(_)) => !online,
        };
        let t = Transition {
            cpu,
            online,
            begin,
            end,
            now_online,
            error: r.err().map(|e| e.to_string()),
            cause,
        };
        if self.print {
            println!(
                "hp {} cpu{} {} {} {}{}",
                secs(t.begin),
                cpu,
                if online { "on " } else { "off" },
                ms(t.end - t.begin),
                cause.as_str(),
                t.error
                    .as_deref()
                    .map(|e| format!(" ERROR {e}"))
                    .unwrap_or_default()
            );
        }
        self.clock.sample();
        self.log.lock().transitions.push(t);
        now_online
    }

    /// Brings every CPU of `cpus` online (the ones that are not). Returns those still offline.
    pub fn all_online(&self, cpus: &[u32], cause: Cause) -> Vec<u32> {
        let mut left = Vec::new();
        for &c in cpus {
            if !self.ctl.is_online(c).unwrap_or(false) && !self.write(c, true, cause) {
                left.push(c);
            }
        }
        left
    }
}

/// Runs the random on/off loop until `stop`, serving scenario commands first.
pub fn run(
    w: &Writer,
    cfg: &HotplugConfig,
    cmds: &Receiver<Cmd>,
    stop: &AtomicBool,
) -> io::Result<()> {
    let mut rng = StdRng::seed_from_u64(cfg.seed ^ 0x4070_1096);
    let mut online: BTreeMap<u32, bool> = BTreeMap::new();
    for &c in &cfg.cpus {
        online.insert(c, w.ctl.is_online(c)?);
    }
    if cfg.cpus.is_empty() {
        return Ok(());
    }
    let set = |c: u32, on: bool, cause: Cause, online: &mut BTreeMap<u32, bool>| {
        let now = w.write(c, on, cause);
        online.insert(c, now);
    };
    while !stop.load(Ordering::Relaxed) {
        let gap = rng.gen_range(cfg.min_gap..=cfg.max_gap);
        match cmds.recv_timeout(gap) {
            Ok(Cmd::Offline(cpus)) => {
                for c in cpus {
                    if online.get(&c) == Some(&true) {
                        set(c, false, Cause::Scenario, &mut online);
                    }
                }
                continue;
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let roll = rng.gen_range(0..100);
        if roll < 7 {
            let mut up: Vec<u32> = online
                .iter()
                .filter(|(_, on)| **on)
                .map(|(c, _)| *c)
                .collect();
            up.shuffle(&mut rng);
            for c in up {
                set(c, false, Cause::AllOff, &mut online);
            }
        } else if roll < 14 {
            let down: Vec<u32> = online
                .iter()
                .filter(|(_, on)| !**on)
                .map(|(c, _)| *c)
                .collect();
            for c in down {
                set(c, true, Cause::AllOn, &mut online);
            }
        } else {
            let c = cfg.cpus[rng.gen_range(0..cfg.cpus.len())];
            let on = online.get(&c).copied().unwrap_or(true);
            set(c, !on, Cause::Random, &mut online);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tr(cpu: u32, online: bool, begin: u64, end: u64, now_online: bool) -> Transition {
        Transition {
            cpu,
            online,
            begin: Duration::from_millis(begin),
            end: Duration::from_millis(end),
            now_online,
            error: None,
            cause: Cause::Random,
        }
    }

    fn d(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    #[test]
    fn certainty_follows_known_segments() {
        let log = HotplugLog {
            initial: BTreeMap::from([(1, true), (2, true)]),
            transitions: vec![
                tr(1, false, 100, 160, false),
                tr(2, false, 170, 230, false),
                tr(1, true, 400, 470, true),
            ],
        };
        // cpu1: online until 100, unknown 100-160, offline 160-400, unknown 400-470, online after.
        assert!(log.certainly(1, true, d(0), d(99)));
        assert!(!log.certainly(1, true, d(50), d(120)));
        assert!(!log.certainly(1, false, d(150), d(200)));
        assert!(log.certainly(1, false, d(160), d(399)));
        assert!(!log.certainly(1, false, d(300), d(420)));
        assert!(log.certainly(1, true, d(470), d(10_000)));
        // cpu2 never came back.
        assert!(log.certainly(2, false, d(230), d(99_999)));
        // cpu0 is not in the log: always online.
        assert!(log.certainly(0, true, d(0), d(99_999)));
        assert!(!log.certainly(0, false, d(0), d(1)));
    }

    #[test]
    fn a_failed_write_keeps_the_state_read_back() {
        let mut t = tr(3, false, 10, 20, true);
        t.error = Some("EBUSY".into());
        let log = HotplugLog {
            initial: BTreeMap::from([(3, true)]),
            transitions: vec![t],
        };
        assert!(log.certainly(3, true, d(25), d(900)));
        assert!(!log.certainly(3, true, d(15), d(900)));
        assert_eq!(log.counts(), (0, 0, 1));
    }
}
