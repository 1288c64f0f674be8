//! Failpoints at the engine's racy seams (see `engine/README.md`), compiled in always and armed
//! only at run time. A disarmed seam costs one load of [`armed`]'s flag; nothing arms it but
//! [`cfg()`], which only tests call (the daemon never reads `FAILPOINTS` from its environment).
//!
//! Invariant: a seam fires only after [`cfg()`] armed the seams and configured its name.

use std::sync::atomic::{AtomicBool, Ordering};

static ARMED: AtomicBool = AtomicBool::new(false);

/// Whether any failpoint was ever configured through [`cfg()`].
#[doc(hidden)]
#[inline]
pub fn armed() -> bool {
    ARMED.load(Ordering::Acquire)
}

/// Configures failpoint `name` with `fail`'s action grammar (`"pause"`, `"2*off->panic"`, ...)
/// and arms the seams.
pub fn cfg(name: &str, actions: &str) -> Result<(), String> {
    ARMED.store(true, Ordering::Release);
    fail::cfg(name, actions)
}

/// Removes failpoint `name`: its seam does nothing again (paused threads go on).
pub fn remove(name: &str) {
    fail::remove(name);
}

/// A seam: evaluates failpoint `$name` once the failpoints are armed.
macro_rules! seam {
    ($name:expr) => {
        if $crate::failpoint::armed() {
            fail::fail_point!($name);
        }
    };
}
pub(crate) use seam;
