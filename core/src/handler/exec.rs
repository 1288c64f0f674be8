//! The `exec` handler: runs commands from an operator-written allowlist, never a shell.
//!
//! This module owns the allowlist ([`ExecConfig`], [`ExecCommand`]), the item argument grammar
//! (`cmd=NAME`, `arg1=..`, `arg2=..`) and the life of each child process. Invariants:
//!
//! * Only a configured absolute path runs, with its fixed `args` first and then the item's extra
//!   arguments, each of which matched its anchored pattern. `run` re-checks what `validate`
//!   checked, so nothing unchecked reaches `execve`. No shell is involved; the environment is
//!   empty; the working directory is `/`.
//! * Each child leads its own process group. On timeout, cancel, or stdout overflow the whole
//!   group gets `SIGKILL`; after a normal exit of the leader the group also gets `SIGKILL` (so
//!   background descendants do not outlive the item). The group is always signalled while the
//!   leader is still an unreaped zombie, so its id cannot have been reused, and the leader is
//!   always reaped before `run` returns (also on panic, through a drop guard).
//! * Memory per item is bounded: stdout by `max_output_bytes` (plus one read buffer), stderr to
//!   the last [`STDERR_TAIL`] bytes.
//!
//! A descendant that leaves the process group (`setsid`) escapes the kill; confining those needs
//! a cgroup, which is the engine's business.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sched::{sched_setaffinity, CpuSet};
use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::{Group, Pid, User};
use regex::Regex;
use serde::Deserialize;

use super::{Args, Handler, HandlerError, HandlerKind, WorkCtx};

/// Default bound on a command's stdout: 1 MiB.
pub const DEFAULT_MAX_OUTPUT_BYTES: usize = 1 << 20;
/// Default time limit of a command: 30 s.
pub const DEFAULT_TIMEOUT_MS: u64 = 30_000;
/// How much of the end of stderr is kept for the error text.
pub const STDERR_TAIL: usize = 4096;
/// Longest interval between looks at the cancel token, the deadline and the child.
const TICK_MS: u16 = 10;
const TICK: Duration = Duration::from_millis(TICK_MS as u64);
/// After the leader exits and its group is killed, how long to wait for the pipes to close.
const DRAIN_GRACE: Duration = Duration::from_secs(1);
/// Read and write chunk size.
const CHUNK: usize = 64 * 1024;

/// The `[exec]` configuration: which commands may run and as whom.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExecConfig {
    /// The allowlist, by the name clients pass as `cmd=NAME`.
    pub commands: BTreeMap<String, ExecCommand>,
    /// Run every command as this user (name, or numeric uid). Its primary group is used unless
    /// `run_as_group` is set. Requires the daemon to run as root.
    pub run_as_user: Option<String>,
    /// Run every command with this primary group (name, or numeric gid).
    pub run_as_group: Option<String>,
}

/// One allowlisted command.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecCommand {
    /// Absolute path of the program; never looked up in `PATH`.
    pub path: PathBuf,
    /// Fixed arguments, always passed first.
    #[serde(default)]
    pub args: Vec<String>,
    /// One regex per extra argument position (`arg1` uses the first), matched against the whole
    /// argument. The command takes at most this many extra arguments.
    #[serde(default)]
    pub arg_patterns: Vec<String>,
    /// Stdout beyond this many bytes kills the command and fails the item.
    #[serde(default = "default_max_output_bytes")]
    pub max_output_bytes: usize,
    /// Wall-clock limit in milliseconds; past it the command is killed (`timed out`).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_max_output_bytes() -> usize {
    DEFAULT_MAX_OUTPUT_BYTES
}
fn default_timeout_ms() -> u64 {
    DEFAULT_TIMEOUT_MS
}

impl Default for ExecCommand {
    /// An empty path (which `validate` rejects) with the default limits; for struct update
    /// syntax: `ExecCommand { path: "/bin/cat".into(), ..Default::default() }`.
    fn default() -> Self {
        Self {
            path: PathBuf::new(),
            args: Vec::new(),
            arg_patterns: Vec::new(),
            max_output_bytes: DEFAULT_MAX_OUTPUT_BYTES,
            timeout_ms: DEFAULT_TIMEOUT_MS,
        }
    }
}

impl ExecConfig {
    /// The pure part of [`ExecConfig::validate`]: command names, absolute paths, patterns that
    /// compile, non-zero limits. Reads nothing outside `self`.
    ///
    /// # Errors
    /// Every problem found, joined by `"; "`.
    pub fn check(&self) -> Result<(), String> {
        self.problems(false)
    }

    /// Checks the whole configuration: what [`ExecConfig::check`] checks, and that
    /// `run_as_user`/`run_as_group` resolve (a name-service lookup). Call it once when starting
    /// (and when reloading) and refuse to start on error.
    ///
    /// # Errors
    /// Every problem found, joined by `"; "`.
    pub fn validate(&self) -> Result<(), String> {
        self.problems(true)
    }

    fn problems(&self, lookup: bool) -> Result<(), String> {
        let mut problems: Vec<String> = self
            .commands
            .iter()
            .filter_map(|(name, c)| c.compile(name).err())
            .collect();
        if lookup {
            if let Err(e) = self.resolve_creds() {
                problems.push(e);
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }

    fn resolve_creds(&self) -> Result<Creds, String> {
        let mut creds = Creds::default();
        if let Some(name) = &self.run_as_user {
            match User::from_name(name) {
                Ok(Some(u)) => {
                    creds.uid = Some(u.uid.as_raw());
                    creds.gid = Some(u.gid.as_raw());
                }
                Ok(None) => match parse_id(name) {
                    Some(uid) => creds.uid = Some(uid),
                    None => return Err(format!("exec: run_as_user {name:?} does not exist")),
                },
                Err(e) => return Err(format!("exec: cannot look up user {name:?}: {e}")),
            }
        }
        if let Some(name) = &self.run_as_group {
            match Group::from_name(name) {
                Ok(Some(g)) => creds.gid = Some(g.gid.as_raw()),
                Ok(None) => match parse_id(name) {
                    Some(gid) => creds.gid = Some(gid),
                    None => return Err(format!("exec: run_as_group {name:?} does not exist")),
                },
                Err(e) => return Err(format!("exec: cannot look up group {name:?}: {e}")),
            }
        }
        Ok(creds)
    }
}

fn parse_id(s: &str) -> Option<u32> {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        s.parse().ok()
    } else {
        None
    }
}

impl ExecCommand {
    fn compile(&self, name: &str) -> Result<Compiled, String> {
        let valid_name = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        if !valid_name {
            return Err(format!(
                "exec: command name {name:?} must be non-empty ASCII letters, digits, '_', '-', '.'"
            ));
        }
        if !self.path.is_absolute() {
            return Err(format!(
                "exec: command {name:?}: path {:?} must be absolute",
                self.path
            ));
        }
        if self.args.iter().any(|a| a.contains('\0')) {
            return Err(format!(
                "exec: command {name:?}: fixed args must not contain NUL"
            ));
        }
        if self.max_output_bytes == 0 {
            return Err(format!(
                "exec: command {name:?}: max_output_bytes must be > 0"
            ));
        }
        if self.timeout_ms == 0 {
            return Err(format!("exec: command {name:?}: timeout_ms must be > 0"));
        }
        let mut patterns = Vec::with_capacity(self.arg_patterns.len());
        for (i, p) in self.arg_patterns.iter().enumerate() {
            let anchored = format!("^(?:{p})$");
            let re = Regex::new(&anchored).map_err(|e| {
                format!("exec: command {name:?}: arg_patterns[{i}] {p:?} is not a valid regex: {e}")
            })?;
            patterns.push(re);
        }
        Ok(Compiled {
            path: self.path.clone(),
            args: self.args.clone(),
            patterns,
            max_output: self.max_output_bytes,
            timeout: Duration::from_millis(self.timeout_ms),
        })
    }
}

/// Who the child runs as; `None` keeps the daemon's id.
#[derive(Debug, Clone, Copy, Default)]
struct Creds {
    uid: Option<u32>,
    gid: Option<u32>,
}

/// A checked allowlist entry. Immutable after [`Exec::new`].
#[derive(Debug)]
struct Compiled {
    path: PathBuf,
    args: Vec<String>,
    /// Anchored (`^(?:..)$`); `as_str()` is what error texts show.
    patterns: Vec<Regex>,
    max_output: usize,
    timeout: Duration,
}

/// The `exec` handler. Immutable after construction; shared by all workers.
#[derive(Debug)]
pub struct Exec {
    commands: BTreeMap<String, Compiled>,
    /// `Err` disables the handler: every item is refused rather than run with the wrong ids.
    creds: Result<Creds, String>,
}

/// A checked item: the command and its extra arguments in order.
struct Invocation<'a> {
    name: &'a str,
    cmd: &'a Compiled,
    extra: Vec<&'a str>,
}

impl Exec {
    /// Builds the handler, failing closed: a command whose entry does not pass
    /// [`ExecConfig::validate`] is left out of the allowlist, and a `run_as_user`/`run_as_group`
    /// that does not resolve disables every command. Each is logged at `error`. Prefer
    /// [`Exec::try_new`] (or `validate` first) so a bad config stops the daemon instead.
    pub fn new(cfg: ExecConfig) -> Self {
        let mut commands = BTreeMap::new();
        for (name, c) in &cfg.commands {
            match c.compile(name) {
                Ok(compiled) => {
                    if !compiled.path.exists() {
                        tracing::warn!(command = %name, path = %compiled.path.display(),
                            "exec command path does not exist (yet)");
                    }
                    commands.insert(name.clone(), compiled);
                }
                Err(e) => tracing::error!(error = %e, "exec command left out of the allowlist"),
            }
        }
        let creds = cfg.resolve_creds();
        if let Err(e) = &creds {
            tracing::error!(error = %e, "exec handler disabled");
        }
        Self { commands, creds }
    }

    /// Builds the handler from a configuration that must be wholly valid.
    ///
    /// # Errors
    /// What [`ExecConfig::validate`] reports.
    pub fn try_new(cfg: ExecConfig) -> Result<Self, String> {
        cfg.validate()?;
        Ok(Self::new(cfg))
    }

    /// The allowlisted command names, sorted.
    pub fn command_names(&self) -> Vec<&str> {
        self.commands.keys().map(String::as_str).collect()
    }

    fn allowed(&self) -> String {
        if self.commands.is_empty() {
            "no commands are configured".to_string()
        } else {
            format!("allowed: {}", self.command_names().join(", "))
        }
    }

    fn parse<'a>(&'a self, args: &'a Args) -> Result<Invocation<'a>, HandlerError> {
        let bad = HandlerError::InvalidArgument;
        if let Err(e) = &self.creds {
            return Err(bad(format!("exec is disabled: {e}")));
        }
        let name = args
            .get("cmd")
            .ok_or_else(|| bad(format!("exec needs cmd ({})", self.allowed())))?;
        let cmd = self.commands.get(name).ok_or_else(|| {
            bad(format!(
                "exec: unknown command {name:?} ({})",
                self.allowed()
            ))
        })?;

        let mut positions: Vec<(usize, &str)> = Vec::new();
        let mut unknown: Vec<&str> = Vec::new();
        for (k, v) in args {
            if k == "cmd" {
                continue;
            }
            match arg_position(k) {
                Some(n) => positions.push((n, v.as_str())),
                None => unknown.push(k),
            }
        }
        if !unknown.is_empty() {
            return Err(bad(format!(
                "exec: unknown argument{} {} (allowed: cmd, arg1, arg2, ...)",
                if unknown.len() == 1 { "" } else { "s" },
                unknown.join(", ")
            )));
        }
        positions.sort_unstable_by_key(|&(n, _)| n);
        for (i, &(n, _)) in positions.iter().enumerate() {
            if n != i + 1 {
                return Err(bad(format!(
                    "exec: extra arguments must be contiguous from arg1 (arg{n} given, arg{} missing)",
                    i + 1
                )));
            }
        }
        if positions.len() > cmd.patterns.len() {
            return Err(bad(format!(
                "exec: command {name:?} takes at most {} extra argument{}, got arg{}",
                cmd.patterns.len(),
                if cmd.patterns.len() == 1 { "" } else { "s" },
                positions.len()
            )));
        }
        for ((n, v), re) in positions.iter().zip(&cmd.patterns) {
            if v.contains('\0') || !re.is_match(v) {
                return Err(bad(format!(
                    "exec: arg{n} of {name:?} must match {}, got {v:?}",
                    re.as_str()
                )));
            }
        }
        Ok(Invocation {
            name,
            cmd,
            extra: positions.into_iter().map(|(_, v)| v).collect(),
        })
    }
}

/// `arg7` → 7; `arg0`, `arg07`, `argx` → `None`.
fn arg_position(key: &str) -> Option<usize> {
    let digits = key.strip_prefix("arg")?;
    if digits.is_empty() || digits.starts_with('0') || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

impl Handler for Exec {
    fn name(&self) -> &str {
        "exec"
    }
    fn kind(&self) -> HandlerKind {
        HandlerKind::Waits
    }
    fn validate(&self, args: &Args, _payload: &[u8]) -> Result<(), HandlerError> {
        self.parse(args).map(drop)
    }
    fn run(&self, ctx: &WorkCtx<'_>) -> Result<Vec<u8>, HandlerError> {
        let inv = self.parse(ctx.args).map_err(|e| match e {
            HandlerError::InvalidArgument(_) => HandlerError::Failed(e.to_string()),
            other => other,
        })?;
        if ctx.cancel.is_cancelled() {
            return Err(HandlerError::Cancelled);
        }
        // `parse` returned Ok, so `creds` is Ok.
        let creds = self.creds.clone().unwrap_or_default();
        let child = spawn(&inv, creds, ctx)?;
        let pid = child.id();
        tracing::debug!(item = ctx.item, command = inv.name, pid, "exec started");
        let r = supervise(child, inv.cmd, ctx);
        match &r {
            Ok(out) => {
                tracing::debug!(
                    item = ctx.item,
                    command = inv.name,
                    pid,
                    bytes = out.len(),
                    "exec done"
                );
            }
            Err(e) => {
                tracing::debug!(item = ctx.item, command = inv.name, pid, error = %e, "exec failed")
            }
        }
        r
    }
}

fn spawn(inv: &Invocation<'_>, creds: Creds, ctx: &WorkCtx<'_>) -> Result<Child, HandlerError> {
    let c = inv.cmd;
    let mut cmd = Command::new(&c.path);
    cmd.args(&c.args)
        .args(&inv.extra)
        .env_clear()
        .current_dir("/")
        .process_group(0)
        .stdin(if ctx.payload.is_empty() {
            Stdio::null()
        } else {
            Stdio::piped()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(gid) = creds.gid {
        cmd.gid(gid);
    }
    if let Some(uid) = creds.uid {
        // std also drops supplementary groups (setgroups(0)) when it changes uid as root.
        cmd.uid(uid);
    }
    if ctx.pinned {
        let mut set = CpuSet::new();
        set.set(ctx.cpu as usize)
            .map_err(|e| HandlerError::Failed(format!("cannot pin to cpu {}: {e}", ctx.cpu)))?;
        // SAFETY: the closure runs in the forked child before exec. It only calls
        // sched_setaffinity(2) (async-signal-safe) on a mask built before the fork, and builds
        // its error with `io::Error::from_raw_os_error`, which does not allocate.
        unsafe {
            cmd.pre_exec(move || {
                sched_setaffinity(Pid::from_raw(0), &set)
                    .map_err(|e| io::Error::from_raw_os_error(e as i32))
            });
        }
    }
    cmd.spawn()
        .map_err(|e| HandlerError::Failed(format!("cannot start {}: {e}", c.path.display())))
}

/// Owns a running child whose pid is also its process group id. Dropping it unreaped kills the
/// group and reaps the leader, so no path out of [`supervise`] (a panic included) leaves a
/// zombie or a stray group behind.
struct Running {
    child: Child,
    pgid: Pid,
    reaped: bool,
}

impl Running {
    /// SIGKILLs the whole group. Only valid before the leader is reaped (the unreaped leader,
    /// zombie or not, keeps the group id from being reused).
    fn kill_group(&self) {
        debug_assert!(!self.reaped);
        match killpg(self.pgid, Signal::SIGKILL) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(e) => tracing::warn!(pgid = %self.pgid, error = %e, "killpg failed"),
        }
    }

    /// Whether the leader has exited, without reaping it.
    fn leader_exited(&self) -> bool {
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
        match waitid(Id::Pid(self.pgid), flags) {
            Ok(WaitStatus::StillAlive) => false,
            Ok(_) => true,
            Err(Errno::EINTR) => false,
            // ECHILD: someone else reaped it (SIGCHLD set to SIG_IGN?); `reap` reports it.
            Err(_) => true,
        }
    }

    /// Waits for the leader and reaps it.
    fn reap(&mut self) -> Result<ExitStatus, HandlerError> {
        self.reaped = true;
        self.child
            .wait()
            .map_err(|e| HandlerError::Failed(format!("lost track of the child: {e}")))
    }

    fn kill_and_reap(&mut self) {
        self.kill_group();
        if let Err(e) = self.reap() {
            tracing::warn!(pgid = %self.pgid, error = %e, "reaping a killed child failed");
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if !self.reaped {
            self.kill_and_reap();
        }
    }
}

/// Why the I/O loop stopped.
enum End {
    Exited,
    Overflow,
    Cancelled,
    TimedOut,
}

/// Feeds stdin, collects stdout and the stderr tail, and watches exit, cancel and the
/// deadline, all from the calling thread with `poll(2)` (no helper threads to leak).
///
/// Postcondition: the leader is reaped and its group has been sent SIGKILL.
fn supervise(mut child: Child, cmd: &Compiled, ctx: &WorkCtx<'_>) -> Result<Vec<u8>, HandlerError> {
    let mut stdin = child.stdin.take();
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let pgid = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
    let mut running = Running {
        child,
        pgid,
        reaped: false,
    };
    for fd in [
        stdin.as_ref().map(|s| s.as_raw_fd()),
        stdout.as_ref().map(|s| s.as_raw_fd()),
        stderr.as_ref().map(|s| s.as_raw_fd()),
    ]
    .into_iter()
    .flatten()
    {
        set_nonblocking(fd).map_err(|e| HandlerError::Failed(format!("pipe setup: {e}")))?;
    }

    let deadline = Instant::now() + cmd.timeout;
    let mut drain_until: Option<Instant> = None; // Some once the leader has exited
    let mut written = 0usize;
    let mut out = Vec::new();
    let mut err_tail = Vec::new();
    let mut err_truncated = false;
    let mut buf = vec![0u8; CHUNK];

    let end = loop {
        if drain_until.is_some() && stdout.is_none() && stderr.is_none() {
            break End::Exited;
        }

        // Wait for pipe activity, at most one tick.
        let (in_ready, out_ready, err_ready) = {
            let want_in = PollFlags::POLLOUT;
            let want_read = PollFlags::POLLIN;
            let mut fds = Vec::with_capacity(3);
            let mut slot = [None; 3];
            if let Some(s) = &stdin {
                slot[0] = Some(fds.len());
                fds.push(PollFd::new(s.as_fd(), want_in));
            }
            if let Some(s) = &stdout {
                slot[1] = Some(fds.len());
                fds.push(PollFd::new(s.as_fd(), want_read));
            }
            if let Some(s) = &stderr {
                slot[2] = Some(fds.len());
                fds.push(PollFd::new(s.as_fd(), want_read));
            }
            if fds.is_empty() {
                ctx.cancel.wait_timeout(TICK);
            } else {
                match poll(&mut fds, PollTimeout::from(TICK_MS)) {
                    Ok(_) | Err(Errno::EINTR) => {}
                    Err(e) => return Err(HandlerError::Failed(format!("poll: {e}"))),
                }
            }
            let ready = |i: Option<usize>| {
                i.and_then(|i| fds[i].revents())
                    .is_some_and(|r| !r.is_empty())
            };
            (ready(slot[0]), ready(slot[1]), ready(slot[2]))
        };

        if in_ready {
            if let Some(s) = stdin.as_mut() {
                let end = (written + CHUNK).min(ctx.payload.len());
                match s.write(&ctx.payload[written..end]) {
                    Ok(n) => written += n,
                    Err(e) if is_transient(&e) => {}
                    // EPIPE and the like: the child does not want (more) input.
                    Err(_) => written = ctx.payload.len(),
                }
                if written >= ctx.payload.len() {
                    stdin = None; // EOF for the child
                }
            }
        }
        if out_ready {
            if let Some(s) = stdout.as_mut() {
                match s.read(&mut buf) {
                    Ok(0) => stdout = None,
                    Ok(n) => out.extend_from_slice(&buf[..n]),
                    Err(e) if is_transient(&e) => {}
                    Err(_) => stdout = None,
                }
            }
            if out.len() > cmd.max_output {
                break End::Overflow;
            }
        }
        if err_ready {
            if let Some(s) = stderr.as_mut() {
                match s.read(&mut buf) {
                    Ok(0) => stderr = None,
                    Ok(n) => {
                        err_tail.extend_from_slice(&buf[..n]);
                        if err_tail.len() > 2 * STDERR_TAIL {
                            err_tail.drain(..err_tail.len() - STDERR_TAIL);
                            err_truncated = true;
                        }
                    }
                    Err(e) if is_transient(&e) => {}
                    Err(_) => stderr = None,
                }
            }
        }

        match drain_until {
            None => {
                if running.leader_exited() {
                    // Kill what the leader left behind while its zombie still pins the group
                    // id; the pipes then close once the group is gone.
                    running.kill_group();
                    stdin = None;
                    drain_until = Some(Instant::now() + DRAIN_GRACE);
                } else if ctx.cancel.is_cancelled() {
                    break End::Cancelled;
                } else if Instant::now() >= deadline {
                    break End::TimedOut;
                }
            }
            Some(until) => {
                if Instant::now() >= until {
                    tracing::warn!(item = ctx.item, pgid = %pgid,
                        "exec: output pipes still open after the command's group was killed; \
                         a descendant left the process group");
                    break End::Exited;
                }
            }
        }
    };
    drop((stdin, stdout, stderr));

    let tail = || {
        let mut t =
            String::from_utf8_lossy(&err_tail[err_tail.len().saturating_sub(STDERR_TAIL)..])
                .trim()
                .to_string();
        if err_truncated && !t.is_empty() {
            t.insert_str(0, "...");
        }
        t
    };
    match end {
        End::Overflow => {
            running.kill_and_reap();
            tracing::warn!(
                item = ctx.item,
                max = cmd.max_output,
                "exec stdout bound exceeded; killed"
            );
            Err(HandlerError::Failed(format!(
                "stdout exceeded {} bytes",
                cmd.max_output
            )))
        }
        End::Cancelled => {
            running.kill_and_reap();
            Err(HandlerError::Cancelled)
        }
        End::TimedOut => {
            running.kill_and_reap();
            tracing::warn!(item = ctx.item, timeout = ?cmd.timeout, "exec timed out; killed");
            Err(HandlerError::TimedOut(cmd.timeout))
        }
        End::Exited => {
            let status = running.reap()?;
            if status.success() {
                return Ok(out);
            }
            let what = match (status.code(), status.signal()) {
                (Some(code), _) => format!("exit status {code}"),
                (None, Some(sig)) => match Signal::try_from(sig) {
                    Ok(s) => format!("killed by signal {sig} ({})", s.as_str()),
                    Err(_) => format!("killed by signal {sig}"),
                },
                (None, None) => format!("{status}"),
            };
            let t = tail();
            Err(HandlerError::Failed(if t.is_empty() {
                what
            } else {
                format!("{what}: {t}")
            }))
        }
    }
}

fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

fn set_nonblocking(fd: std::os::fd::RawFd) -> nix::Result<()> {
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).map(drop)
}
