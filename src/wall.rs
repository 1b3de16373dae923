//! The hub's wall clock: every timestamp it stores or publishes, and the schedules' time of day.
//!
//! A Pi has no real-time clock: it boots with the time it had at its last shutdown (or older),
//! and NTP later steps it forward, by seconds or by years. Nothing that measures a length reads
//! this clock: delays run on the monotonic clock. The light rules read it at each event and wake at
//! least every minute to notice a step ([`domoticpi_rules::lights::WALL_RECHECK`]); [`StepWatch`]
//! says in the log when it stepped.
//!
//! It is the system's clock plus an offset that is zero in service. A test sets the offset through
//! the control socket (only with `DOMOTICPI_TEST_FAULTS=1`), to run the real daemon years in the
//! past and step it forward; [`stepped`] wakes the light rules at once, as a step notification
//! would.

use std::sync::LazyLock;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use tokio::sync::watch;

/// Milliseconds added to the system's clock: zero unless a test set it.
static OFFSET_MS: LazyLock<watch::Sender<i64>> = LazyLock::new(|| watch::Sender::new(0));

/// A step of at least this much is logged.
pub const LOGGED_STEP: Duration = Duration::from_secs(5);

/// The wall clock now.
pub fn now() -> Timestamp {
    let offset = *OFFSET_MS.borrow();
    Timestamp::now().checked_add(SignedDuration::from_millis(offset)).unwrap_or_else(|_| Timestamp::now())
}

/// The wall clock now, for the code that formats with the `time` crate.
pub fn now_utc() -> time::OffsetDateTime {
    let t = now();
    time::OffsetDateTime::from_unix_timestamp_nanos(t.as_nanosecond())
        .unwrap_or_else(|_| time::OffsetDateTime::now_utc())
}

/// Sets the wall clock to `at` (the test-only fault switch): every later reading moves on from it.
pub fn set(at: Timestamp) {
    let offset = at.duration_since(Timestamp::now()).as_millis();
    OFFSET_MS.send_replace(i64::try_from(offset).unwrap_or(0));
}

/// The variable that starts a hub whose fault switch is armed with its wall clock at a given
/// RFC 3339 time.
pub const TEST_CLOCK_ENV: &str = "DOMOTICPI_TEST_CLOCK";

/// Sets the clock from [`TEST_CLOCK_ENV`] when the fault switch is armed (at the hub's start).
pub fn set_from_test_env() {
    if !std::env::var(crate::health::FAULTS_ENV).is_ok_and(|v| v == "1") {
        return;
    }
    if let Ok(at) = std::env::var(TEST_CLOCK_ENV) {
        match at.parse() {
            Ok(at) => {
                tracing::warn!(%at, "test fault: the hub starts with its wall clock set");
                set(at);
            }
            Err(e) => tracing::error!(error = %e, "{TEST_CLOCK_ENV} is not an RFC 3339 time; the clock is left alone"),
        }
    }
}

/// A receiver that changes each time [`set`] steps the clock.
pub fn stepped() -> watch::Receiver<i64> {
    OFFSET_MS.subscribe()
}

/// Notices when the wall clock moved other than with the monotonic clock since the last look.
#[derive(Debug)]
pub struct StepWatch {
    /// The last look: monotonic and wall.
    last: (std::time::Instant, Timestamp),
}

impl Default for StepWatch {
    fn default() -> Self {
        StepWatch { last: (std::time::Instant::now(), now()) }
    }
}

impl StepWatch {
    /// Looks at both clocks; logs and returns the step when the wall clock jumped by
    /// [`LOGGED_STEP`] or more since the last look.
    pub fn look(&mut self) -> Option<SignedDuration> {
        let (mono, wall) = (std::time::Instant::now(), now());
        let (last_mono, last_wall) = std::mem::replace(&mut self.last, (mono, wall));
        let expected = SignedDuration::try_from(mono.duration_since(last_mono)).unwrap_or(SignedDuration::MAX);
        let step = wall.duration_since(last_wall).checked_sub(expected)?;
        if step.unsigned_abs() < LOGGED_STEP {
            return None;
        }
        let span = jiff::Span::try_from(step.abs())
            .ok()
            .and_then(|s| s.round(jiff::SpanRound::new().largest(jiff::Unit::Hour)).ok());
        let by = span.map_or_else(|| format!("{}s", step.abs().as_secs()), |s| format!("{s:#}"));
        let direction = if step.is_negative() { "back" } else { "forward" };
        tracing::warn!(by, now = %wall, "the wall clock stepped {direction}: schedules apply the time it says now, delays keep their length");
        Some(step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_is_seen_once_and_small_drifts_are_not() {
        let mut watch = StepWatch::default();
        assert_eq!(watch.look(), None);
        // The watch's own last look moved back by a year: as if the wall clock jumped forward.
        watch.last.1 = watch.last.1.checked_sub(SignedDuration::from_hours(24 * 365)).unwrap();
        let step = watch.look().unwrap();
        assert!((step.as_secs() - 365 * 24 * 3600).abs() <= 1, "{step:?}");
        assert_eq!(watch.look(), None);
        watch.last.1 = watch.last.1.checked_add(SignedDuration::from_secs(2)).unwrap();
        assert_eq!(watch.look(), None, "a 2 s drift is not a step");
        watch.last.1 = watch.last.1.checked_add(SignedDuration::from_secs(60)).unwrap();
        assert!(watch.look().unwrap().is_negative());
    }
}
