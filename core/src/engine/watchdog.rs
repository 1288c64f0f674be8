//! The watchdog: like the kernel's workqueue watchdog, reports a CPU pool that has runnable
//! work and made no progress for `watchdog_thresh`, and items that run longer than the CPU-hog
//! threshold. It only reports (log line and counter); it never changes an item.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Inner;

pub(crate) fn start(inner: &Arc<Inner>) {
    let (thresh, hog) = (inner.cfg.watchdog_thresh, inner.cfg.hog_thresh);
    if thresh.is_zero() && hog.is_zero() {
        return;
    }
    let tick = [thresh, hog]
        .into_iter()
        .filter(|d| !d.is_zero())
        .min()
        .unwrap_or(Duration::from_secs(1))
        .div_f64(4.0)
        .clamp(Duration::from_millis(10), Duration::from_secs(1));
    let me = inner.clone();
    match std::thread::Builder::new()
        .name("wqd-watchdog".into())
        .spawn(move || loop {
            let mut s = me.sched.write();
            if s.shutdown {
                return;
            }
            me.idle_cv.wait_for(&mut s, tick);
            if s.shutdown {
                return;
            }
            let reports = s.watchdog(Instant::now(), thresh, hog);
            drop(s);
            if let Some(o) = &me.cfg.observer {
                for (lockup, cpu) in reports {
                    if lockup {
                        o.lockup(cpu);
                    } else {
                        o.hog(cpu);
                    }
                }
            }
        }) {
        Ok(h) => inner.threads.lock().push(h),
        Err(e) => tracing::error!(error = %e, "cannot start the watchdog thread"),
    }
}
