//! The rules' notion of time: a monotonic instant, in milliseconds from an origin the driver picks.
//!
//! Delays (exit, entry, siren, motion-off) run on this clock only, so a jump of the wall clock
//! (a Pi has no RTC, NTP may step it minutes after boot) neither fires nor stretches them.
//! Wall-clock time (for schedules and sunrise/sunset) is passed separately where a rule needs it.

use std::ops::{Add, Sub};
use std::time::Duration;

/// A point on the monotonic clock, in milliseconds from the driver's origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Instant(pub u64);

impl Instant {
    /// The instant `ms` milliseconds after the origin.
    pub const fn from_millis(ms: u64) -> Self {
        Instant(ms)
    }

    /// Milliseconds from the origin.
    pub const fn as_millis(self) -> u64 {
        self.0
    }

    /// Time from `earlier` to `self`, zero if `earlier` is later.
    pub fn saturating_duration_since(self, earlier: Instant) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }
}

impl Add<Duration> for Instant {
    type Output = Instant;
    fn add(self, d: Duration) -> Instant {
        Instant(self.0.saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)))
    }
}

impl Sub<Duration> for Instant {
    type Output = Instant;
    fn sub(self, d: Duration) -> Instant {
        Instant(self.0.saturating_sub(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_saturates() {
        let t = Instant::from_millis(1_000);
        assert_eq!(t + Duration::from_secs(1), Instant(2_000));
        assert_eq!(t - Duration::from_secs(5), Instant(0));
        assert_eq!(Instant(500).saturating_duration_since(t), Duration::ZERO);
        assert_eq!(t.saturating_duration_since(Instant(400)), Duration::from_millis(600));
    }
}
