//! A Python virtual environment for the tests that run stock Python gRPC code.
//!
//! Owns: `target/pyenv` — one venv, created on first use with `python3 -m venv` and filled by
//! `pip` from PyPI with the pinned [`REQUIREMENTS`] (stock `grpcio` and `protobuf`, nothing
//! patched), then marked ready with a file naming exactly those requirements.
//!
//! Invariants: creation runs under an exclusive `flock` on `target/pyenv.lock`, so parallel
//! test binaries create it once and never see half of it; a venv whose marker names other
//! requirements is rebuilt from scratch. `WQD_PYTHON` names an interpreter to use instead
//! (it must already have the requirements). Every step is bounded by pip's own timeouts.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;

/// What the venv holds. grpcio 1.57 and later send the Unix socket path as `:authority`, the
/// case the daemon must accept (issue #11 part 4); Debian's python3-grpcio (1.51) does not.
pub const REQUIREMENTS: &[&str] = &["grpcio==1.85.3", "protobuf==6.33.5"];

/// The venv's Python interpreter, creating the venv first if needed.
///
/// # Errors
/// A message saying which step failed and what to install (python3, python3-venv, network
/// access to PyPI).
pub fn python() -> Result<PathBuf, String> {
    if let Ok(p) = std::env::var("WQD_PYTHON") {
        return Ok(PathBuf::from(p));
    }
    let target = crate::profile_dir()
        .parent()
        .map(PathBuf::from)
        .ok_or("the target folder has no parent")?;
    let dir = target.join("pyenv");
    let lock_path = target.join("pyenv.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| format!("{}: {e}", lock_path.display()))?;
    // SAFETY: flock on a descriptor we own; released when `lock` is dropped.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(format!(
            "flock {}: {}",
            lock_path.display(),
            std::io::Error::last_os_error()
        ));
    }
    let py = dir.join("bin/python3");
    let marker = dir.join(".wqd-ready");
    let want = REQUIREMENTS.join("\n");
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(want.as_str()) && py.exists() {
        return Ok(py);
    }
    let _ = std::fs::remove_dir_all(&dir);
    run(
        Command::new("python3").args(["-m", "venv"]).arg(&dir),
        "python3 -m venv (install python3 and python3-venv)",
    )?;
    run(
        Command::new(&py)
            .args(["-m", "pip", "install", "--disable-pip-version-check", "-q"])
            .args(REQUIREMENTS),
        "pip install from PyPI",
    )?;
    std::fs::write(&marker, &want).map_err(|e| format!("{}: {e}", marker.display()))?;
    Ok(py)
}

fn run(cmd: &mut Command, what: &str) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{what}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}
