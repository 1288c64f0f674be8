//! The wall clock a worker times one batch of jobs by. The wall clock (`CLOCK_REALTIME`) is
//! read for real twice per batch: when its first recorded job starts and after its last job
//! ends. Between the two, each job's start and end is a reading of a cheap counter (the
//! CPU's time-stamp counter where the kernel itself keeps time by it, else the monotonic
//! clock), placed on the wall clock by linear interpolation between the two real readings.
//! On this host a `clock_gettime` through the vDSO costs ≈ 28 ns and an `rdtsc` ≈ 11 ns; a
//! batch of 64 quick jobs read the wall clock 65 times before, and reads it twice now.
//!
//! Invariant: counter readings taken through one [`Ticks`] never decrease (a reading lower
//! than the last one counts as the last one), and [`Span::at`] is non-decreasing in the
//! reading and lies between the batch's two real readings (both included; the later one
//! counts as the earlier if the wall clock stepped back). So a job never ends before it
//! starts, a worker's later job never starts before its earlier one ended, and no job's time
//! lies outside the batch's real readings, however the counter and the wall clock drift
//! apart: the error is bounded by the batch's own length and does not carry over.

use std::time::{Duration, Instant, SystemTime};

/// Whether the time-stamp counter may be read directly: on x86-64, when the kernel's own
/// clocksource is `tsc` (it checked that the counter is invariant and synchronised across
/// CPUs; a worker may run unpinned). Elsewhere the monotonic clock is the counter.
#[cfg(target_arch = "x86_64")]
fn tsc_usable() -> bool {
    static USABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *USABLE.get_or_init(|| {
        std::fs::read_to_string("/sys/devices/system/clocksource/clocksource0/current_clocksource")
            .is_ok_and(|s| s.trim() == "tsc")
    })
}

/// Readings of the cheap counter, for one worker: never decreasing.
pub(crate) struct Ticks {
    /// Whether `read` uses `rdtsc` (x86-64 only).
    #[cfg(target_arch = "x86_64")]
    tsc: bool,
    /// Origin of the fallback counter (nanoseconds of the monotonic clock since then).
    base: Instant,
    last: u64,
}

impl Ticks {
    pub(crate) fn new() -> Ticks {
        Ticks {
            #[cfg(target_arch = "x86_64")]
            tsc: tsc_usable(),
            base: Instant::now(),
            last: 0,
        }
    }

    /// A counter reading, at least the last one.
    #[inline]
    pub(crate) fn now(&mut self) -> u64 {
        let c = self.read();
        self.last = self.last.max(c);
        self.last
    }

    #[inline]
    fn read(&self) -> u64 {
        #[cfg(target_arch = "x86_64")]
        if self.tsc {
            // SAFETY: `rdtsc` reads a counter; it has no effect on memory and `tsc_usable`
            // checked the architecture.
            return unsafe { std::arch::x86_64::_rdtsc() };
        }
        u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// A real wall-clock reading and the counter's, taken together: one end of a batch. The
    /// counter is read on both sides of the wall clock and the pair taken at the midpoint;
    /// when the two sides are far apart (the thread was preempted in between, which would
    /// shift the whole batch's times by as much), it tries again, up to three times, and
    /// keeps the closest pair.
    pub(crate) fn anchor(&mut self) -> (SystemTime, u64) {
        /// Counter ticks between the two sides of a good pair: under a microsecond for
        /// either counter (a wall-clock read is tens of nanoseconds).
        const CLOSE: u64 = 1_000;
        let mut best: Option<(u64, SystemTime, u64)> = None;
        for _ in 0..3 {
            let before = self.now();
            let wall = SystemTime::now();
            let gap = self.now() - before;
            if best.is_none_or(|(g, _, _)| gap < g) {
                best = Some((gap, wall, before + gap / 2));
            }
            if gap <= CLOSE {
                break;
            }
        }
        let (_, wall, at) = best.unwrap_or((0, SystemTime::now(), self.last));
        (wall, at)
    }
}

/// A batch's two real readings, (wall clock, counter) at each end: places counter readings
/// taken between them on the wall clock.
#[derive(Clone, Copy)]
pub(crate) struct Span {
    t0: SystemTime,
    c0: u64,
    /// Counter ticks and nanoseconds from the first reading to the second (0 if either went
    /// back).
    dc: u64,
    dt: u64,
    /// `dt / dc` in 64.64 fixed point: one multiply per reading placed, no division, and
    /// under a nanosecond of rounding at any `dt` (`off * per_tick <= dt * 2^64 < 2^128`).
    per_tick: u128,
}

impl Span {
    pub(crate) fn new((t0, c0): (SystemTime, u64), (t1, c1): (SystemTime, u64)) -> Span {
        let dt = t1
            .duration_since(t0)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        let dc = c1.saturating_sub(c0);
        let per_tick = if dc == 0 {
            0
        } else {
            (u128::from(dt) << 64) / u128::from(dc)
        };
        Span {
            t0,
            c0,
            dc,
            dt,
            per_tick,
        }
    }

    /// The wall-clock time of counter reading `c` (clamped into the span).
    #[inline]
    pub(crate) fn at(&self, c: u64) -> SystemTime {
        let off = c.saturating_sub(self.c0).min(self.dc);
        // Rounded to the nearest nanosecond: the span's end lands on its second reading.
        let scaled = u128::from(off) * self.per_tick + (1 << 63);
        let ns = u64::try_from(scaled >> 64).unwrap_or(u64::MAX);
        self.t0 + Duration::from_nanos(ns.min(self.dt))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(ns: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_nanos(1_700_000_000_000_000_000 + ns)
    }

    #[test]
    fn a_span_is_exact_at_its_ends_and_linear_between() {
        let s = Span::new((t(0), 1_000), (t(3_000), 10_000));
        assert_eq!(s.at(1_000), t(0));
        assert_eq!(s.at(10_000), t(3_000));
        assert_eq!(s.at(4_000), t(1_000));
        assert_eq!(s.at(7_000), t(2_000));
    }

    #[test]
    fn a_span_keeps_every_reading_inside_and_in_order() {
        // Readings before, inside and after the span, in order: times in order, inside.
        let s = Span::new((t(500), 7_777), (t(123_456), 987_654));
        let mut prev = s.at(0);
        assert_eq!(prev, t(500));
        for c in (0..1_200_000).step_by(997) {
            let at = s.at(c);
            assert!(at >= prev, "{c}: {at:?} before {prev:?}");
            assert!(at >= t(500) && at <= t(123_456), "{c}: {at:?} outside");
            prev = at;
        }
        assert_eq!(s.at(u64::MAX), t(123_456));
    }

    #[test]
    fn a_clock_or_counter_that_went_back_pins_the_span_to_its_start() {
        // The wall clock stepped back during the batch.
        let s = Span::new((t(5_000), 100), (t(1_000), 900));
        assert_eq!(s.at(100), t(5_000));
        assert_eq!(s.at(900), t(5_000));
        // The counter did not move (or went back).
        let s = Span::new((t(0), 900), (t(4_000), 900));
        assert_eq!(s.at(900), t(0));
        let s = Span::new((t(0), 900), (t(4_000), 100));
        assert_eq!(s.at(500), t(0));
    }

    #[test]
    fn long_spans_do_not_overflow() {
        // A day of a 5 GHz counter.
        let day = 86_400_000_000_000u64;
        let s = Span::new((t(0), 0), (t(day), day * 5));
        assert_eq!(s.at(day * 5), t(day));
        assert_eq!(s.at(day * 5 / 2), t(day / 2));
        assert_eq!(s.at(7), t(1));
        // The widest span a u64 of nanoseconds holds.
        let s = Span::new((t(0), 0), (t(0) + Duration::from_nanos(u64::MAX), u64::MAX));
        assert_eq!(s.at(u64::MAX), t(0) + Duration::from_nanos(u64::MAX));
    }

    #[test]
    fn an_anchor_pairs_the_wall_clock_with_a_counter_reading_beside_it() {
        let mut ticks = Ticks::new();
        let before = ticks.now();
        let wall_before = SystemTime::now();
        let (wall, at) = ticks.anchor();
        let after = ticks.now();
        assert!(wall >= wall_before && wall <= SystemTime::now());
        assert!(before <= at && at <= after, "{before} {at} {after}");
    }

    #[test]
    fn readings_never_decrease() {
        let mut ticks = Ticks::new();
        let mut prev = ticks.now();
        for _ in 0..10_000 {
            let c = ticks.now();
            assert!(c >= prev);
            prev = c;
        }
        // A reading the counter gives lower than the last one counts as the last one.
        ticks.last = u64::MAX - 1;
        assert_eq!(ticks.now(), u64::MAX - 1);
    }
}
