//! The driver's timeline: every time the driver logs or checks is a [`Duration`] since the
//! driver started, on the monotonic clock.
//!
//! Results from wqd carry wall-clock times (`SystemTime`). [`Clock::on_timeline`] maps them onto
//! the timeline through (monotonic, wall) pairs sampled during the run ([`Clock::sample`]), so a
//! wall clock that is slewed (NTP on a real host) costs at most the drift since the nearest
//! sample, not the drift since start. In the VM nothing adjusts the clock.

use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;

/// Monotonic timeline with wall-clock samples. Shared as `Arc<Clock>`.
#[derive(Debug)]
pub struct Clock {
    /// Immutable after creation: time zero of the timeline.
    start: Instant,
    /// (timeline, wall) pairs, appended in timeline order; wall order follows unless the wall
    /// clock stepped back.
    samples: Mutex<Vec<(Duration, SystemTime)>>,
}

impl Clock {
    /// A timeline starting now, with a first sample.
    pub fn new() -> Clock {
        let c = Clock {
            start: Instant::now(),
            samples: Mutex::new(Vec::new()),
        };
        c.sample();
        c
    }

    /// Now, on the timeline.
    pub fn now(&self) -> Duration {
        self.start.elapsed()
    }

    /// Records a (timeline, wall) pair; call it now and then (a few times a second is plenty).
    pub fn sample(&self) {
        let mono = self.now();
        let wall = SystemTime::now();
        self.samples.lock().push((mono, wall));
    }

    /// Maps a wall-clock time onto the timeline using the sample nearest in wall time.
    pub fn on_timeline(&self, w: SystemTime) -> Duration {
        let samples = self.samples.lock();
        let i = samples.partition_point(|(_, sw)| *sw < w);
        let nearest = [i.checked_sub(1), Some(i)]
            .into_iter()
            .flatten()
            .filter_map(|k| samples.get(k))
            .min_by_key(|(_, sw)| abs_diff(*sw, w));
        let Some((mono, sw)) = nearest else {
            return Duration::ZERO;
        };
        match w.duration_since(*sw) {
            Ok(after) => *mono + after,
            Err(e) => mono.saturating_sub(e.duration()),
        }
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

fn abs_diff(a: SystemTime, b: SystemTime) -> Duration {
    match a.duration_since(b) {
        Ok(d) => d,
        Err(e) => e.duration(),
    }
}

/// Seconds with millisecond precision, for logs and tables.
pub fn secs(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64())
}

/// Milliseconds, for logs and tables.
pub fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wall_times_map_onto_the_timeline() {
        let c = Clock::new();
        std::thread::sleep(Duration::from_millis(20));
        c.sample();
        let w = SystemTime::now();
        let t = c.on_timeline(w);
        let now = c.now();
        assert!(t <= now + Duration::from_millis(2), "{t:?} vs {now:?}");
        assert!(t + Duration::from_millis(5) >= now, "{t:?} vs {now:?}");
        // Before the start: zero.
        let early = SystemTime::now() - Duration::from_secs(3600);
        assert_eq!(c.on_timeline(early), Duration::ZERO);
    }
}
