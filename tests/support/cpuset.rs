//! A scratch cpuset cgroup on the real kernel, and a `wqd` daemon started inside it.
//!
//! Owns: finding a writable cpuset hierarchy (cgroup v1 `cpuset` mount, else cgroup v2 with the
//! `cpuset` controller), creating one child cgroup `wqd-e2e-cpuset-<pid>` under its root,
//! changing that child's CPUs, starting a process inside it, and removing it again.
//!
//! Invariants:
//! - [`Cgroup`] is a drop guard: dropping it (also while unwinding from a panic) moves every
//!   task still in the child back to the parent and removes the child. It never touches any
//!   other cgroup's CPUs, and never writes `/sys/devices/system/cpu/*/online`.
//! - [`Daemon`] is a drop guard too: dropping it stops the process it started (SIGTERM, then
//!   SIGKILL after a bounded wait) by its pid, and reaps it. Declare it after the [`Cgroup`] so
//!   it drops first.
//! - A process started with [`Cgroup::command_inside`] is in the child *before* it executes:
//!   the forked child writes `0` (itself) into the child's `cgroup.procs` in `pre_exec`, so every
//!   thread it will ever have starts inside the cpuset. It also gets `PR_SET_PDEATHSIG` =
//!   SIGKILL, so a test process killed from outside (no guard runs) does not leave it behind;
//!   the leftover folder is removed by the next run.
//! - Every wait here is bounded.

use std::ffi::CString;
use std::fs;
use std::io::{self, BufRead, BufReader};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Which cgroup interface the cpuset lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// A v1 `cpuset` hierarchy (`cpuset.cpus`, `cpuset.mems`, `cpuset.effective_cpus`).
    V1,
    /// The v2 unified hierarchy (`cgroup.subtree_control`, `cpuset.cpus`,
    /// `cpuset.cpus.effective`).
    V2,
}

/// Why no scratch cgroup could be made. Only [`Unavailable::NotRoot`] and
/// [`Unavailable::NoHierarchy`] are reasons to skip; anything else is an error.
#[derive(Debug)]
pub enum Unavailable {
    NotRoot(u32),
    NoHierarchy(String),
}

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unavailable::NotRoot(euid) => write!(f, "needs root (running as euid {euid})"),
            Unavailable::NoHierarchy(why) => write!(f, "no writable cpuset hierarchy: {why}"),
        }
    }
}

/// The prefix of every cgroup this module creates.
const PREFIX: &str = "wqd-e2e-cpuset-";

/// One child cpuset cgroup. Removed on drop.
#[derive(Debug)]
pub struct Cgroup {
    version: Version,
    /// The hierarchy's root folder (where the child is made).
    parent: PathBuf,
    dir: PathBuf,
    /// v2: we turned `+cpuset` on in the parent's `subtree_control` and turn it off again.
    enabled_subtree: bool,
}

fn is_permission(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EACCES | libc::EPERM | libc::EROFS)
    )
}

fn write(path: &Path, value: &str) -> io::Result<()> {
    fs::write(path, value).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("writing {value:?} to {}: {e}", path.display()),
        )
    })
}

fn read(path: &Path) -> io::Result<String> {
    fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|e| io::Error::new(e.kind(), format!("reading {}: {e}", path.display())))
}

/// The cpuset hierarchy of this host: v1 first (on hybrid hosts the v2 tree has no cpuset
/// controller), then v2 with `cpuset` in its root's `cgroup.controllers`.
pub fn find_hierarchy() -> Result<(Version, PathBuf), Unavailable> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Unavailable::NoHierarchy(format!("reading /proc/self/mountinfo: {e}")))?;
    let mut v2 = None;
    for line in mountinfo.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let Some(mount_point) = pre.split(' ').nth(4) else {
            continue;
        };
        let mut post = post.split(' ');
        let (fstype, _source, opts) = (post.next(), post.next(), post.next().unwrap_or(""));
        match fstype {
            Some("cgroup") if opts.split(',').any(|o| o == "cpuset") => {
                return Ok((Version::V1, PathBuf::from(mount_point)));
            }
            Some("cgroup2") if v2.is_none() => {
                let root = PathBuf::from(mount_point);
                let controllers =
                    fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
                if controllers.split_whitespace().any(|c| c == "cpuset") {
                    v2 = Some(root);
                }
            }
            _ => {}
        }
    }
    v2.map(|root| (Version::V2, root))
        .ok_or_else(|| Unavailable::NoHierarchy("no cgroup v1 cpuset mount and no cgroup2 mount with the cpuset controller in /proc/self/mountinfo".into()))
}

impl Cgroup {
    /// Creates `wqd-e2e-cpuset-<pid>` under the hierarchy's root with CPUs `cpus` (and, for
    /// v1, the parent's memory nodes). Removes leftovers of earlier runs whose process is gone.
    ///
    /// # Errors
    /// `Err(Ok(Unavailable))` when the test must be skipped (not root, no writable
    /// hierarchy); `Err(Err(io))` for any other failure, naming the file.
    pub fn create(cpus: &str) -> Result<Cgroup, Result<Unavailable, io::Error>> {
        // SAFETY: no preconditions.
        let euid = unsafe { libc::geteuid() };
        if euid != 0 {
            return Err(Ok(Unavailable::NotRoot(euid)));
        }
        let (version, parent) = find_hierarchy().map_err(Ok)?;
        sweep_stale(&parent);
        let mut enabled_subtree = false;
        if version == Version::V2 {
            let ctl = parent.join("cgroup.subtree_control");
            let on = fs::read_to_string(&ctl).unwrap_or_default();
            if !on.split_whitespace().any(|c| c == "cpuset") {
                if let Err(e) = fs::write(&ctl, "+cpuset") {
                    return Err(Ok(Unavailable::NoHierarchy(format!(
                        "cannot enable +cpuset in {}: {e}",
                        ctl.display()
                    ))));
                }
                enabled_subtree = true;
            }
        }
        let dir = parent.join(format!("{PREFIX}{}", std::process::id()));
        if let Err(e) = fs::create_dir(&dir) {
            if is_permission(&e) {
                return Err(Ok(Unavailable::NoHierarchy(format!(
                    "cannot create {}: {e}",
                    dir.display()
                ))));
            }
            return Err(Err(io::Error::new(
                e.kind(),
                format!("creating {}: {e}", dir.display()),
            )));
        }
        let cg = Cgroup {
            version,
            parent,
            dir,
            enabled_subtree,
        };
        if version == Version::V1 {
            // A v1 cpuset takes no task until both cpus and mems are set.
            let mems = read(&cg.parent.join("cpuset.effective_mems"))
                .or_else(|_| read(&cg.parent.join("cpuset.mems")))
                .map_err(Err)?;
            write(&cg.dir.join("cpuset.mems"), &mems).map_err(Err)?;
        }
        cg.set_cpus(cpus).map_err(Err)?;
        Ok(cg)
    }

    pub fn version(&self) -> Version {
        self.version
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Writes `cpuset.cpus`. In v1 the kernel rewrites the affinity of every task inside
    /// before the write returns.
    ///
    /// # Errors
    /// The write's error, naming the file.
    pub fn set_cpus(&self, cpus: &str) -> io::Result<()> {
        write(&self.dir.join("cpuset.cpus"), cpus)
    }

    /// The CPUs the kernel lets tasks inside use now.
    ///
    /// # Errors
    /// The read's error, naming the file.
    pub fn effective_cpus(&self) -> io::Result<String> {
        let name = match self.version {
            Version::V1 => "cpuset.effective_cpus",
            Version::V2 => "cpuset.cpus.effective",
        };
        read(&self.dir.join(name))
    }

    /// Pids inside the child.
    pub fn pids(&self) -> Vec<u32> {
        read(&self.dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// A command whose process joins this cgroup between fork and exec.
    ///
    /// # Errors
    /// A path with a NUL byte.
    pub fn command_inside(&self, program: &Path) -> io::Result<Command> {
        let procs = CString::new(self.dir.join("cgroup.procs").as_os_str().as_bytes())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let mut cmd = Command::new(program);
        // SAFETY: the closure runs in the forked child before exec and only makes
        // async-signal-safe calls (prctl, open, write, close) on memory prepared before the
        // fork.
        unsafe {
            cmd.pre_exec(move || {
                // If the test process is killed (a CI timeout), its guards never run: the
                // kernel then kills the daemon instead of leaving it behind.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                let n = libc::write(fd, b"0\n".as_ptr().cast(), 2);
                let err = io::Error::last_os_error();
                libc::close(fd);
                if n < 0 {
                    return Err(err);
                }
                Ok(())
            });
        }
        Ok(cmd)
    }
}

/// Moves every task of `dir` to `parent` and removes `dir`, retrying for a bounded time while
/// exiting tasks still hold it.
fn remove(dir: &Path, parent: &Path) -> io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
            for pid in procs.split_whitespace() {
                let _ = fs::write(parent.join("cgroup.procs"), pid);
            }
        }
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("removing {}: {e}", dir.display()),
                ))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Removes `wqd-e2e-cpuset-<pid>` folders whose test process no longer exists (a run that was
/// killed before its guards ran). Best effort: a folder that cannot be removed is reported.
fn sweep_stale(parent: &Path) {
    let Ok(rd) = fs::read_dir(parent) else {
        return;
    };
    for entry in rd.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(PREFIX)) else {
            continue;
        };
        if Path::new("/proc").join(pid).exists() {
            continue;
        }
        if let Err(e) = remove(&entry.path(), parent) {
            eprintln!(
                "cpuset: leftover {} not removed: {e}",
                entry.path().display()
            );
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if let Err(e) = remove(&self.dir, &self.parent) {
            eprintln!("cpuset: CLEANUP FAILED: {e}");
        }
        if self.enabled_subtree {
            let _ = fs::write(self.parent.join("cgroup.subtree_control"), "-cpuset");
        }
    }
}

/// A started process with its output collected; stopped and reaped on drop.
pub struct Daemon {
    child: Child,
    lines: mpsc::Receiver<String>,
    log: Arc<Mutex<Vec<String>>>,
}

/// Lines of output kept for the failure report.
const LOG_KEEP: usize = 400;

impl Daemon {
    /// Spawns `cmd` with stdout and stderr piped; both are read line by line.
    ///
    /// # Errors
    /// The spawn's error (including one from `pre_exec`).
    pub fn spawn(mut cmd: Command) -> io::Result<Daemon> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn()?;
        let (tx, rx) = mpsc::channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let out = child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn io::Read + Send>);
        let err = child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn io::Read + Send>);
        for stream in [out, err].into_iter().flatten() {
            let tx = tx.clone();
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    {
                        let mut l = log.lock().unwrap_or_else(|p| p.into_inner());
                        if l.len() >= LOG_KEEP {
                            l.remove(0);
                        }
                        l.push(line.clone());
                    }
                    let _ = tx.send(line);
                }
            });
        }
        Ok(Daemon {
            child,
            lines: rx,
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits (at most `timeout`) for an output line containing `needle`; returns it.
    ///
    /// # Errors
    /// A text with the output so far when the line does not come or the process exits.
    pub fn wait_for_line(&mut self, needle: &str, timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self
                .lines
                .recv_timeout(left.min(Duration::from_millis(100)))
            {
                Ok(line) if line.contains(needle) => return Ok(line),
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(format!(
                        "process exited before printing {needle:?}:\n{}",
                        self.log_tail()
                    ))
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                std::thread::sleep(Duration::from_millis(50));
                return Err(format!(
                    "process exited ({status}) before printing {needle:?}:\n{}",
                    self.log_tail()
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "no {needle:?} within {timeout:?}:\n{}",
                    self.log_tail()
                ));
            }
        }
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The last lines of output.
    pub fn log_tail(&self) -> String {
        self.log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .join("\n")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.running() {
            let pid = libc::pid_t::try_from(self.child.id()).unwrap_or(0);
            // SAFETY: signalling our own child by its pid.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while self.running() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if self.running() {
                let _ = self.child.kill();
            }
        }
        let _ = self.child.wait();
    }
}
