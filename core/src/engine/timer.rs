//! The timer thread: moves delayed items into their queues when their delay passes, expires
//! items whose deadline passes before they start, and does housekeeping once a second
//! (result and batch expiry, dropping idle queues). Invariant: it changes items only under the
//! engine lock, through the same transitions as everything else.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::sched::Effects;
use super::Inner;

pub(crate) fn start(inner: &Arc<Inner>) {
    let me = inner.clone();
    match std::thread::Builder::new()
        .name("wqd-timer".into())
        .spawn(move || run(&me))
    {
        Ok(h) => inner.threads.lock().push(h),
        Err(e) => tracing::error!(error = %e, "cannot start the timer thread"),
    }
}

fn run(inner: &Arc<Inner>) {
    let mut housekeeping = Instant::now() + Duration::from_secs(1);
    loop {
        let mut fx = Effects::default();
        {
            let mut s = inner.sched.write();
            if s.shutdown {
                return;
            }
            let now = Instant::now();
            s.fire_timers(now, &mut fx);
            if now >= housekeeping {
                s.housekeeping(now, &mut fx);
                housekeeping = now + Duration::from_secs(1);
            }
            if fx.is_empty() {
                let next = s.next_timer().map_or(housekeeping, |t| t.min(housekeeping));
                inner.timer_cv.wait_until(&mut s, next);
            }
        }
        fx.run(inner);
    }
}
