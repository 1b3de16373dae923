//! Sunrise, sunset and "is the sun down?" for the house, computed offline.
//!
//! Owns the solar arithmetic used by the light rules: the sun's declination and the equation of
//! time for an instant, the sunrise/sunset of a civil date in the house's time zone ([`sun_day`]),
//! the sun's elevation at an instant ([`elevation`]) and [`is_night`]. Must not read a clock, the
//! disk or the network, and must not panic on any input: the caller passes the date, the instant
//! and the zone.
//!
//! The maths are NOAA's published solar equations (the NOAA Solar Calculator and its spreadsheet,
//! <https://gml.noaa.gov/grad/solcalc/calcdetails.html>, after Meeus, *Astronomical Algorithms*),
//! written out here rather than taken from a crate. The best-kept crate, `sunrise` 3.0, is sound
//! but pulls in `chrono` for its date type while this crate already speaks `jiff`; it reports a
//! polar day and a polar night alike as `None` (we must tell "always up" from "always down"); and
//! it has no elevation at an arbitrary instant, which [`is_night`] needs. NOAA's equations are some
//! sixty lines of arithmetic, need no dependency, and NOAA states them accurate to about a minute
//! between ±72° of latitude (within ten minutes further north or south): the tests check published
//! tables.
//!
//! Near the polar circles the first day of the midnight sun has a sunrise but no sunset and the
//! last one a sunset but no sunrise ([`SunDay::RiseOnly`], [`SunDay::SetOnly`]), as in the USNO's
//! tables.
//!
//! Sunrise and sunset are the instants the sun's centre is 0.833° below the horizon (34′ of
//! standard refraction plus 16′ of solar semi-diameter), as in NOAA's and the USNO's tables;
//! [`is_night`] uses the same threshold, so it agrees with [`sun_day`] at the boundary. Coordinates
//! are degrees, north and east positive; the config validator keeps them in range.

use jiff::civil::Date;
use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};

/// The sun's elevation, in degrees, at sunrise and sunset (refraction plus semi-diameter).
pub const HORIZON_DEG: f64 = -0.833;

/// What the sun does on one civil date at one place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SunDay {
    /// The sun rises and sets; `set` may fall after local midnight at extreme latitudes.
    RiseSet {
        /// When the upper edge of the sun appears.
        rise: Timestamp,
        /// When the upper edge of the sun disappears.
        set: Timestamp,
    },
    /// The first day of a polar day: the sun rises (just after a short night) and does not set.
    RiseOnly {
        /// When the upper edge of the sun appears.
        rise: Timestamp,
    },
    /// The last day of a polar day: the sun, up since the day began, sets.
    SetOnly {
        /// When the upper edge of the sun disappears.
        set: Timestamp,
    },
    /// Polar day: the sun stays above the horizon all day.
    AlwaysUp,
    /// Polar night: the sun stays below the horizon all day.
    AlwaysDown,
}

impl SunDay {
    /// The sunrise, if the sun rises that day.
    pub fn sunrise(&self) -> Option<Timestamp> {
        match *self {
            SunDay::RiseSet { rise, .. } | SunDay::RiseOnly { rise } => Some(rise),
            SunDay::SetOnly { .. } | SunDay::AlwaysUp | SunDay::AlwaysDown => None,
        }
    }

    /// The sunset, if the sun sets that day.
    pub fn sunset(&self) -> Option<Timestamp> {
        match *self {
            SunDay::RiseSet { set, .. } | SunDay::SetOnly { set } => Some(set),
            SunDay::RiseOnly { .. } | SunDay::AlwaysUp | SunDay::AlwaysDown => None,
        }
    }
}

/// Sunrise and sunset at `latitude`/`longitude` on the civil `date` of the time zone `tz`.
///
/// The day is the one whose solar noon is nearest to 12:00 on `date` in `tz`, so the answer is the
/// sunrise and sunset a person there calls "today's" even where the zone is far from the meridian.
pub fn sun_day(latitude: f64, longitude: f64, date: Date, tz: &TimeZone) -> SunDay {
    // Fails only at the ends of jiff's ±9999-year range, where no light rule will ever look.
    let Ok(local_noon) = tz.to_timestamp(date.at(12, 0, 0, 0)) else {
        return SunDay::AlwaysDown;
    };
    // Solar noon: true solar time 12:00. Two passes: the equation of time moves by seconds a day.
    let mut noon = local_noon;
    for _ in 0..2 {
        let pos = SolarPosition::at(noon);
        noon = shift_to_solar_time(noon, longitude, &pos, 720.0);
    }
    let lat = latitude.to_radians();
    let cos_h = cos_hour_angle(lat, SolarPosition::at(noon).declination);
    if cos_h.is_nan() || cos_h > 1.0 {
        // NaN only for coordinates the validator refuses; dark is the answer that harms nothing.
        return SunDay::AlwaysDown;
    }
    if cos_h < -1.0 {
        return SunDay::AlwaysUp;
    }
    match (event_near(lat, longitude, noon, -1.0), event_near(lat, longitude, noon, 1.0)) {
        (Some(rise), Some(set)) => SunDay::RiseSet { rise, set },
        (Some(rise), None) => SunDay::RiseOnly { rise },
        (None, Some(set)) => SunDay::SetOnly { set },
        // Both crossings vanish only within a day of a polar night or day: go by noon's sun.
        (None, None) if cos_h < 0.0 => SunDay::AlwaysUp,
        (None, None) => SunDay::AlwaysDown,
    }
}

/// The sun's centre's geometric elevation above the horizon, in degrees, at `at`.
pub fn elevation(latitude: f64, longitude: f64, at: Timestamp) -> f64 {
    let pos = SolarPosition::at(at);
    let hour_angle = (true_solar_minutes(at, longitude, &pos) / 4.0 - 180.0).to_radians();
    let lat = latitude.to_radians();
    let cos_zenith = lat.sin() * pos.declination.sin() + lat.cos() * pos.declination.cos() * hour_angle.cos();
    90.0 - cos_zenith.clamp(-1.0, 1.0).acos().to_degrees()
}

/// Whether the sun is below the horizon (as sunrise and sunset define it) at `at`.
pub fn is_night(latitude: f64, longitude: f64, at: Timestamp) -> bool {
    elevation(latitude, longitude, at) < HORIZON_DEG
}

/// The two quantities of NOAA's equations that sunrise, sunset and elevation need.
struct SolarPosition {
    /// The sun's declination, in radians.
    declination: f64,
    /// Apparent minus mean solar time, in minutes.
    equation_of_time: f64,
}

impl SolarPosition {
    /// NOAA's equations for the instant `at` (the spreadsheet's columns G to V).
    fn at(at: Timestamp) -> SolarPosition {
        // Milliseconds since 1970 fit an f64 exactly for any date jiff can hold.
        let julian_day = at.as_millisecond() as f64 / 86_400_000.0 + 2_440_587.5;
        let t = (julian_day - 2_451_545.0) / 36_525.0; // Julian centuries since J2000.0
        let mean_long = (280.46646 + t * (36_000.769_83 + t * 0.000_303_2)).rem_euclid(360.0);
        let mean_anom = 357.52911 + t * (35_999.050_29 - 0.000_153_7 * t);
        let eccent = 0.016_708_634 - t * (0.000_042_037 + 0.000_000_126_7 * t);
        let m = mean_anom.to_radians();
        let centre = m.sin() * (1.914_602 - t * (0.004_817 + 0.000_014 * t))
            + (2.0 * m).sin() * (0.019_993 - 0.000_101 * t)
            + (3.0 * m).sin() * 0.000_289;
        let true_long = mean_long + centre;
        let omega = (125.04 - 1_934.136 * t).to_radians();
        let apparent_long = (true_long - 0.00569 - 0.00478 * omega.sin()).to_radians();
        let mean_obliq = 23.0 + (26.0 + (21.448 - t * (46.815 + t * (0.000_59 - t * 0.001_813))) / 60.0) / 60.0;
        let obliq = (mean_obliq + 0.00256 * omega.cos()).to_radians();
        let declination = (obliq.sin() * apparent_long.sin()).asin();
        let y = (obliq / 2.0).tan().powi(2);
        let l0 = mean_long.to_radians();
        let equation_of_time = 4.0
            * (y * (2.0 * l0).sin() - 2.0 * eccent * m.sin() + 4.0 * eccent * y * m.sin() * (2.0 * l0).cos()
                - 0.5 * y * y * (4.0 * l0).sin()
                - 1.25 * eccent * eccent * (2.0 * m).sin())
            .to_degrees();
        SolarPosition { declination, equation_of_time }
    }
}

/// Cosine of the hour angle at which the sun's centre reaches [`HORIZON_DEG`]; outside
/// [-1, 1] it never does that day (below -1: always above, above 1: always below).
fn cos_hour_angle(lat: f64, declination: f64) -> f64 {
    (HORIZON_DEG.to_radians().sin() - lat.sin() * declination.sin()) / (lat.cos() * declination.cos())
}

/// True (apparent) solar time at `at` and `longitude`, in minutes after solar midnight, 0..1440.
fn true_solar_minutes(at: Timestamp, longitude: f64, pos: &SolarPosition) -> f64 {
    let utc_minutes = at.as_millisecond().rem_euclid(86_400_000) as f64 / 60_000.0;
    (utc_minutes + pos.equation_of_time + 4.0 * longitude).rem_euclid(1440.0)
}

/// The instant within 12 hours of `at` at which true solar time is `target` minutes.
fn shift_to_solar_time(at: Timestamp, longitude: f64, pos: &SolarPosition, target: f64) -> Timestamp {
    let delta = (target - true_solar_minutes(at, longitude, pos) + 720.0).rem_euclid(1440.0) - 720.0;
    add_saturating(at, SignedDuration::from_millis((delta * 60_000.0).round() as i64))
}

/// `at + by`, pinned to jiff's range instead of failing (only reachable near the year ±9999).
pub(crate) fn add_saturating(at: Timestamp, by: SignedDuration) -> Timestamp {
    at.checked_add(by).unwrap_or(if by.is_negative() { Timestamp::MIN } else { Timestamp::MAX })
}

/// Sunrise (`side` = -1) or sunset (`side` = 1) around the solar noon `noon`.
///
/// Like NOAA's calculator, it first uses the sun's position at noon, then recomputes the position
/// at the estimate and moves the estimate, twice more. `None` if, with the sun's position at the
/// estimate, the sun does not reach the horizon: on the first or last day of a polar day or night,
/// when the sun's declination changes enough between noon and midnight.
fn event_near(lat: f64, longitude: f64, noon: Timestamp, side: f64) -> Option<Timestamp> {
    let mut estimate = noon;
    for _ in 0..3 {
        let pos = SolarPosition::at(estimate);
        let cos_h = cos_hour_angle(lat, pos.declination);
        if !(-1.0..=1.0).contains(&cos_h) {
            return None;
        }
        let target = 720.0 + side * 4.0 * cos_h.acos().to_degrees();
        estimate = shift_to_solar_time(estimate, longitude, &pos, target);
    }
    Some(estimate)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Local wall time of `ts` in `tz`, rounded to the nearest minute, as minutes of the day.
    fn local_minutes(ts: Timestamp, tz: &TimeZone) -> i64 {
        let dt = tz.to_datetime(add_saturating(ts, SignedDuration::from_secs(30)));
        i64::from(dt.hour()) * 60 + i64::from(dt.minute())
    }

    fn hhmm(s: &str) -> i64 {
        let (h, m) = s.split_once(':').unwrap();
        h.parse::<i64>().unwrap() * 60 + m.parse::<i64>().unwrap()
    }

    fn check(lat: f64, lon: f64, zone: &str, date: &str, rise: &str, set: &str) {
        let tz = TimeZone::get(zone).unwrap();
        let date: Date = date.parse().unwrap();
        let day = sun_day(lat, lon, date, &tz);
        let SunDay::RiseSet { rise: r, set: s } = day else {
            panic!("{date} at {lat},{lon}: expected a rise and a set, got {day:?}");
        };
        let (got_r, got_s) = (local_minutes(r, &tz), local_minutes(s, &tz));
        assert!(
            (got_r - hhmm(rise)).abs() <= 2 && (got_s - hhmm(set)).abs() <= 2,
            "{date} at {lat},{lon}: got {}/{}, published {rise}/{set}",
            tz.to_datetime(r),
            tz.to_datetime(s),
        );
        // The sun is down a minute before sunrise and up a minute after.
        let minute = SignedDuration::from_mins(1);
        assert!(is_night(lat, lon, add_saturating(r, -minute)));
        assert!(!is_night(lat, lon, add_saturating(r, minute)));
        assert!(!is_night(lat, lon, add_saturating(s, -minute)));
        assert!(is_night(lat, lon, add_saturating(s, minute)));
    }

    macro_rules! published {
        ($($name:ident: $lat:expr, $lon:expr, $zone:expr, $date:expr => $rise:expr, $set:expr;)*) => {
            $(#[test] fn $name() { check($lat, $lon, $zone, $date, $rise, $set) })*
        };
    }

    published! {
        // Lyon Capitale, "Rester à l'heure d'hiver ou d'été", 2019: Lyon (45.76 N 4.84 E), legal time.
        lyon_summer_solstice: 45.76, 4.84, "Europe/Paris", "2019-06-21" => "05:51", "21:34";
        lyon_winter_solstice: 45.76, 4.84, "Europe/Paris", "2019-12-21" => "08:19", "16:59";
        // Museums Victoria, Melbourne Planetarium "Skynotes" for December 2013 and October 2025,
        // tables for Melbourne (37°50' S, 145° E), legal time.
        melbourne_dec_1: -37.833, 145.0, "Australia/Melbourne", "2013-12-01" => "05:52", "20:26";
        melbourne_dec_21: -37.833, 145.0, "Australia/Melbourne", "2013-12-21" => "05:54", "20:42";
        melbourne_oct_1_standard_time: -37.833, 145.0, "Australia/Melbourne", "2025-10-01" => "05:55", "18:24";
        melbourne_oct_21_summer_time: -37.833, 145.0, "Australia/Melbourne", "2025-10-21" => "06:26", "19:43";
        // USNO "Sun and Moon Data for One Day", Tromsø (69.5 N, 19.0 E), Universal Time + 1 h, so
        // given here in UTC+1 (Etc/GMT-1 is UTC+1 in POSIX's inverted sign).
        tromso_april_1: 69.5, 19.0, "Etc/GMT-1", "2014-04-01" => "04:50", "18:49";
        tromso_april_30: 69.5, 19.0, "Etc/GMT-1", "2014-04-30" => "02:29", "20:58";
        // The same source: 17 May 2014 is the last day with a sunset before the midnight sun.
        tromso_last_sunset_before_midnight_sun: 69.5, 19.0, "Etc/GMT-1", "2014-05-17" => "00:29", "23:06";
    }

    macro_rules! polar {
        ($($name:ident: $lat:expr, $lon:expr, $date:expr => $want:expr;)*) => {
            $(#[test] fn $name() {
                let tz = TimeZone::get("Europe/Oslo").unwrap();
                let date: Date = $date.parse().unwrap();
                assert_eq!(sun_day($lat, $lon, date, &tz), $want);
            })*
        };
    }

    // Tromsø has the midnight sun from about 20 May to 22 July and polar night from about
    // 27 November to 15 January (the USNO table above gives the last set on 17 May 2014,
    // after which the sun stays up until 25 July).
    polar! {
        tromso_midsummer_sun_never_sets: 69.65, 18.96, "2024-06-21" => SunDay::AlwaysUp;
        tromso_early_july_sun_never_sets: 69.65, 18.96, "2024-07-05" => SunDay::AlwaysUp;
        tromso_first_whole_day_of_midnight_sun: 69.5, 19.0, "2014-05-19" => SunDay::AlwaysUp;
        tromso_midwinter_sun_never_rises: 69.65, 18.96, "2024-12-21" => SunDay::AlwaysDown;
        south_pole_in_june_is_dark: -89.9, 0.0, "2024-06-21" => SunDay::AlwaysDown;
    }

    macro_rules! night {
        ($($name:ident: $lat:expr, $lon:expr, $at:expr => $night:expr;)*) => {
            $(#[test] fn $name() {
                let at: Timestamp = $at.parse().unwrap();
                assert_eq!(is_night($lat, $lon, at), $night);
            })*
        };
    }

    night! {
        lyon_noon_is_day: 45.76, 4.84, "2024-06-21T11:40:00Z" => false;
        lyon_midnight_is_night: 45.76, 4.84, "2024-06-21T23:00:00Z" => true;
        lyon_winter_evening_is_night: 45.76, 4.84, "2024-12-21T17:00:00Z" => true;
        tromso_midnight_sun_is_day: 69.65, 18.96, "2024-06-21T22:00:00Z" => false;
        tromso_polar_noon_is_night: 69.65, 18.96, "2024-12-21T10:45:00Z" => true;
        melbourne_january_noon_is_day: -37.833, 145.0, "2024-01-15T02:00:00Z" => false;
    }

    macro_rules! polar_edge {
        ($($name:ident: $date:expr => $variant:ident $field:ident $hhmm:expr;)*) => {
            $(#[test] fn $name() {
                // USNO, as quoted above: at 69.5 N 19.0 E in UTC+1, in 2014 the sun rises at 00:13
                // on 18 May and then stays up until it sets at 23:20 on 25 July.
                let tz = TimeZone::get("Etc/GMT-1").unwrap();
                let day = sun_day(69.5, 19.0, $date.parse().unwrap(), &tz);
                let SunDay::$variant { $field } = day else { panic!("{}: {day:?}", $date) };
                assert!((local_minutes($field, &tz) - hhmm($hhmm)).abs() <= 2, "{}", tz.to_datetime($field));
            })*
        };
    }

    polar_edge! {
        tromso_midnight_sun_begins_with_a_rise_and_no_set: "2014-05-18" => RiseOnly rise "00:13";
        tromso_midnight_sun_ends_with_a_set_and_no_rise: "2014-07-25" => SetOnly set "23:20";
    }

    #[test]
    fn far_zone_still_gives_that_days_sun() {
        // Kiritimati (UTC+14, 157° W): the local date's solar noon is picked, not a neighbour's.
        let tz = TimeZone::get("Pacific/Kiritimati").unwrap();
        let date: Date = "2024-03-20".parse().unwrap();
        let day = sun_day(1.87, -157.4, date, &tz);
        let (Some(rise), Some(set)) = (day.sunrise(), day.sunset()) else {
            panic!("{day:?}");
        };
        assert_eq!(tz.to_datetime(rise).date(), date);
        assert_eq!(tz.to_datetime(set).date(), date);
        assert!(rise < set);
    }
}
