//! The light rules: motion lights, schedules, switches and buttons, scenes, and every light on when
//! the alarm triggers (SPEC §7 "Lights").
//!
//! Owns what the hub knows and decides about lights: who switched each one on, the motion rules'
//! off timers, the schedules' progress on the wall clock, and the commands that follow. Must not
//! read a clock, touch MQTT, SQLite or the disk, or block: like `quinn-proto`, it is fed events
//! with the time (`handle_event`, `handle_timeout`, `start`) and gives back commands
//! (`poll_action`) and the next instant it wants to be woken at (`poll_timeout`). The driver
//! publishes each [`Action::Set`] as JSON to `dpi/ID/set` and turns device states into [`Event`]s.
//!
//! # Who switched a light on
//!
//! A light a person switched on by hand must not be switched off by a motion rule. The machine
//! keeps, for each light, its on/off as last known (from the hub's last command or the light's last
//! report, whichever came later), the hub's last command until the light confirms it (with the
//! monotonic instant it was sent), and who switched it on (`Owner`):
//!
//! - a report that matches the pending command, within [`CONFIRM_WINDOW`] of it, confirms it; a
//!   report that does not match, within that window, is the light's state from before the command
//!   reached it, and is ignored;
//! - otherwise, a report whose on/off differs from the last known one is a person's doing: "on"
//!   makes the light the person's, "off" makes it nobody's (any "off" does);
//! - a motion rule switches on only lights that are off, and switches off only lights it switched
//!   on and that nobody has taken over since. Lights the hub switched on for a schedule, a switch
//!   or button, a scene or the alarm are not the motion rule's either: a person asked for them.
//!
//! A light's first report (at start-up, retained) has no "before": an "on" then belongs to nobody,
//! so a restart may leave on a light the motion rule had switched on, until someone switches it
//! off, but never switches off one a person switched on. Only on/off counts: a person dimming a
//! light the motion rule switched on does not take it over, and a person's switch within
//! [`CONFIRM_WINDOW`] of a hub command to the same light is taken for the light's stale state.
//!
//! # Schedules and the two clocks
//!
//! Motion delays run on the monotonic [`Instant`] only. Schedules are wall-clock rules: each
//! schedule has, for every listed day, a window from its `on` instant to the first `off` instant
//! after it (a window crossing midnight belongs to the day it started). The day's instants are
//! resolved with jiff in the house's zone, so a time in a spring-forward gap runs once, just after
//! the gap, and a time in a fall-back fold runs once, at its first occurrence; sunrise and sunset
//! come from [`crate::sun`].
//!
//! The machine remembers the wall time up to which it has applied the schedules. On each
//! `handle_timeout(now, wall)` it applies, for each schedule, the last window edge in `(applied,
//! wall]` (on or off) and moves `applied` to `wall`; a wall clock that steps back leaves `applied`
//! where it was, so nothing runs twice, and one that steps forward over several edges applies only
//! the state they end in. The next edge is turned into a monotonic deadline when it is computed:
//! `now + (edge - wall)`, capped at [`WALL_RECHECK`] so that a wall clock stepped forward (NTP
//! after a boot without an RTC) is noticed within that time; a wake-up before the wall clock
//! reaches the edge fires nothing and computes a new deadline. `start(now, wall)` applies the state
//! each schedule wants right now ("on" inside a window); outside its windows a schedule switches
//! nothing off at start, so a restart or a reload never switches off lights people are using.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use jiff::civil::{Date, Time, Weekday};
use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp, ToSpan};

use crate::clock::Instant;
use crate::sun;

/// How long after a command a light's reports are taken as its answer rather than a person's doing.
pub const CONFIRM_WINDOW: Duration = Duration::from_secs(10);

/// The longest the machine sleeps while schedules exist, so a stepped wall clock is noticed.
pub const WALL_RECHECK: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// Configuration, built by the hub's config module from the TOML.
// ---------------------------------------------------------------------------------------------

/// Where the house is: what sunrise, sunset and the local time of day are computed from.
#[derive(Debug, Clone)]
pub struct House {
    /// Degrees north (negative: south), -90..=90.
    pub latitude: f64,
    /// Degrees east (negative: west), -180..=180.
    pub longitude: f64,
    /// The house's zone: local times, days of the week and daylight-saving changes.
    pub timezone: TimeZone,
}

/// Every light rule of one house.
#[derive(Debug, Clone)]
pub struct LightsConfig {
    /// Where the house is.
    pub house: House,
    /// Every light device of the house, in config order: what [`Event::AlarmTriggered`] lights.
    pub lights: Vec<String>,
    /// `[[rule.motion_light]]`.
    pub motion_lights: Vec<MotionLight>,
    /// `[[rule.schedule]]`.
    pub schedules: Vec<Schedule>,
    /// `[[rule.switch]]`.
    pub switches: Vec<Switch>,
    /// `[[scene]]`.
    pub scenes: Vec<Scene>,
}

/// A motion rule: lights on at motion if its condition holds, off `off_after` after the last one.
#[derive(Debug, Clone)]
pub struct MotionLight {
    /// Motion sensors whose motion switches the lights on and restarts the timer.
    pub sensors: Vec<String>,
    /// The lights it switches.
    pub lights: Vec<String>,
    /// Time from the last motion to switching the lights off.
    pub off_after: Duration,
    /// When the lights may go on.
    pub when: When,
    /// Optionally, also only while a lux sensor reads below a limit (TOML `lux_sensor`, `max_lux`).
    pub lux: Option<LuxLimit>,
}

/// When a motion rule may switch its lights on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    /// At any time.
    Always,
    /// While the sun is below the horizon at the house.
    Night,
}

/// A motion rule's light-level condition: the sensor's last reading must be below `max_lux`.
#[derive(Debug, Clone)]
pub struct LuxLimit {
    /// The lux sensor's device id; with no reading yet the condition does not hold.
    pub sensor: String,
    /// Switch on only below this reading.
    pub max_lux: f64,
}

/// A schedule: lights on at `on`, off at the next `off`, on the listed days.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// The lights it switches.
    pub lights: Vec<String>,
    /// When the window opens.
    pub on: TimeExpr,
    /// When the window closes: the first such instant after `on`.
    pub off: TimeExpr,
    /// The days on which a window opens: the date `on` is resolved on (for `sunset+HH:MM` past
    /// midnight, the date of that sunset).
    pub days: Days,
}

/// A set of weekdays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Days(u8);

impl Days {
    /// Every day of the week.
    pub const ALL: Days = Days(0x7f);
    /// No day.
    pub const NONE: Days = Days(0);

    /// This set plus `day`.
    pub fn with(self, day: Weekday) -> Days {
        Days(self.0 | Days::bit(day))
    }

    /// Whether `day` is in the set.
    pub fn contains(self, day: Weekday) -> bool {
        self.0 & Days::bit(day) != 0
    }

    fn bit(day: Weekday) -> u8 {
        1 << day.to_monday_zero_offset()
    }
}

impl FromIterator<Weekday> for Days {
    fn from_iter<I: IntoIterator<Item = Weekday>>(days: I) -> Days {
        days.into_iter().fold(Days::NONE, Days::with)
    }
}

/// A time of day in a schedule: `HH:MM`, or sunrise/sunset with an optional signed offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeExpr {
    /// A fixed local time.
    At(Time),
    /// The day's sunrise plus the offset (negative: before).
    Sunrise(SignedDuration),
    /// The day's sunset plus the offset (negative: before).
    Sunset(SignedDuration),
}

/// A switch or button rule: what its presses do to a group of lights.
#[derive(Debug, Clone)]
pub struct Switch {
    /// The switch or button's device id.
    pub switch: String,
    /// The group of lights it drives.
    pub lights: Vec<String>,
    /// What a press does.
    pub action: SwitchAction,
}

/// What a switch rule does when pressed (see [`Event::Switch`] for how device actions map).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwitchAction {
    /// All off if any light of the group is on, else all on.
    Toggle,
    /// All on.
    On,
    /// All off.
    Off,
}

/// A scene: settings applied to lights together.
#[derive(Debug, Clone)]
pub struct Scene {
    /// What `dpi/scene/set {"scene": ID}` names.
    pub id: String,
    /// Light id to its setting, applied in id order.
    pub set: BTreeMap<String, LightCommand>,
}

/// A command for one light: the JSON payload published to `dpi/ID/set`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LightCommand {
    /// Switch on or off; `None` leaves it.
    pub on: Option<bool>,
    /// Brightness 0..=255; `None` leaves it.
    pub brightness: Option<u8>,
}

impl LightCommand {
    /// `{"on": true}`.
    pub const ON: LightCommand = LightCommand { on: Some(true), brightness: None };
    /// `{"on": false}`.
    pub const OFF: LightCommand = LightCommand { on: Some(false), brightness: None };

    /// `{"on": on}`.
    pub fn switch(on: bool) -> LightCommand {
        LightCommand { on: Some(on), brightness: None }
    }
}

// ---------------------------------------------------------------------------------------------
// Time expressions.
// ---------------------------------------------------------------------------------------------

/// A schedule time that does not parse, with the text it was given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad time {input:?}: {kind}")]
pub struct TimeExprError {
    /// The text as given.
    pub input: String,
    /// What is wrong with it.
    pub kind: TimeExprErrorKind,
}

/// What is wrong with a schedule time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TimeExprErrorKind {
    /// Nothing was given.
    #[error("it is empty; expected HH:MM, sunrise or sunset, with an optional +HH:MM or -HH:MM")]
    Empty,
    /// Neither `HH:MM` nor `sunrise`/`sunset`.
    #[error("expected HH:MM, sunrise or sunset, with an optional +HH:MM or -HH:MM")]
    NotATime,
    /// The hour is above 23.
    #[error("the hour must be 00 to 23")]
    HourOutOfRange,
    /// The minute is above 59.
    #[error("the minute must be 00 to 59")]
    MinuteOutOfRange,
    /// What follows `sunrise`/`sunset` is not `+HH:MM` or `-HH:MM` under 24 hours.
    #[error("the offset after sunrise or sunset must be +HH:MM or -HH:MM, under 24 hours")]
    BadOffset,
}

impl TimeExpr {
    /// Parses `HH:MM` (or `H:MM`), `sunrise`, `sunset`, `sunrise+HH:MM`, `sunset-HH:MM` (any case).
    pub fn parse(input: &str) -> Result<TimeExpr, TimeExprError> {
        let error = |kind| TimeExprError { input: input.to_string(), kind };
        let text = input.trim().to_ascii_lowercase();
        if text.is_empty() {
            return Err(error(TimeExprErrorKind::Empty));
        }
        let (make, rest): (fn(SignedDuration) -> TimeExpr, &str) = if let Some(rest) = text.strip_prefix("sunrise") {
            (TimeExpr::Sunrise, rest)
        } else if let Some(rest) = text.strip_prefix("sunset") {
            (TimeExpr::Sunset, rest)
        } else {
            return parse_clock(&text).map(TimeExpr::At).map_err(error);
        };
        let offset = if rest.is_empty() {
            SignedDuration::ZERO
        } else {
            let (sign, clock) = if let Some(clock) = rest.strip_prefix('+') {
                (1, clock)
            } else if let Some(clock) = rest.strip_prefix('-') {
                (-1, clock)
            } else {
                return Err(error(TimeExprErrorKind::BadOffset));
            };
            let time = parse_clock(clock).map_err(|_| error(TimeExprErrorKind::BadOffset))?;
            SignedDuration::from_mins(sign * (i64::from(time.hour()) * 60 + i64::from(time.minute())))
        };
        Ok(make(offset))
    }

    /// The instant this names on `date` at `house`; `None` if that day has no such sunrise/sunset.
    pub fn resolve(&self, date: Date, house: &House) -> Option<Timestamp> {
        let sun = |date| sun::sun_day(house.latitude, house.longitude, date, &house.timezone);
        match *self {
            // jiff's "compatible" choice: a time in a gap is taken after the gap, one in a fold at
            // its first occurrence; either way, one instant per day.
            TimeExpr::At(time) => house.timezone.to_timestamp(date.to_datetime(time)).ok(),
            TimeExpr::Sunrise(offset) => sun(date).sunrise().map(|t| sun::add_saturating(t, offset)),
            TimeExpr::Sunset(offset) => sun(date).sunset().map(|t| sun::add_saturating(t, offset)),
        }
    }
}

/// `HH:MM` or `H:MM`, 00:00 to 23:59.
fn parse_clock(text: &str) -> Result<Time, TimeExprErrorKind> {
    let (hours, minutes) = text.split_once(':').ok_or(TimeExprErrorKind::NotATime)?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(hours) || !digits(minutes) || hours.len() > 2 || minutes.len() != 2 {
        return Err(TimeExprErrorKind::NotATime);
    }
    let hour: i8 = hours.parse().map_err(|_| TimeExprErrorKind::NotATime)?;
    let minute: i8 = minutes.parse().map_err(|_| TimeExprErrorKind::NotATime)?;
    if hour > 23 {
        return Err(TimeExprErrorKind::HourOutOfRange);
    }
    if minute > 59 {
        return Err(TimeExprErrorKind::MinuteOutOfRange);
    }
    Time::new(hour, minute, 0, 0).map_err(|_| TimeExprErrorKind::NotATime)
}

impl FromStr for TimeExpr {
    type Err = TimeExprError;
    fn from_str(s: &str) -> Result<TimeExpr, TimeExprError> {
        TimeExpr::parse(s)
    }
}

impl fmt::Display for TimeExpr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (word, offset) = match *self {
            TimeExpr::At(t) => return write!(f, "{:02}:{:02}", t.hour(), t.minute()),
            TimeExpr::Sunrise(offset) => ("sunrise", offset),
            TimeExpr::Sunset(offset) => ("sunset", offset),
        };
        f.write_str(word)?;
        if !offset.is_zero() {
            let minutes = offset.as_mins().unsigned_abs();
            let sign = if offset.is_negative() { '-' } else { '+' };
            write!(f, "{sign}{:02}:{:02}", minutes / 60, minutes % 60)?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Events in, actions out.
// ---------------------------------------------------------------------------------------------

/// Something the light rules react to, as the driver decoded it from a device or a resident.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A motion sensor reported motion (`{"motion": true}`; "no motion" is not an event here).
    Motion {
        /// The sensor's device id.
        sensor: String,
    },
    /// A lux sensor's reading.
    Lux {
        /// The sensor's device id.
        sensor: String,
        /// The reading.
        lux: f64,
    },
    /// A light reported its state; only `on` decides who switched it (see the module docs).
    LightState {
        /// The light's device id.
        light: String,
        /// Whether it is on.
        on: bool,
        /// Its brightness, if it reports one.
        brightness: Option<u8>,
    },
    /// A switch or button acted: `{"action": "single"}`, or a rocker's `{"on": true}` as "on".
    ///
    /// Actions `on`/`on_*` mean on and `off`/`off_*` mean off, whatever the rule (a toggle rule
    /// obeys them; an `on` rule ignores "off" and an `off` rule ignores "on"); actions ending in
    /// `release` or `stop`, `brightness*` (dimming) and the empty string are ignored; any other
    /// action (`single`, `double`, `hold`, `toggle`, …) is a press and does the rule's action.
    Switch {
        /// The switch or button's device id.
        device: String,
        /// The action it reported.
        action: String,
    },
    /// A resident asked for a scene (`dpi/scene/set {"scene": ID}`).
    Scene {
        /// The scene's id.
        id: String,
    },
    /// The alarm triggered with `lights_on_trigger` set: every light goes on.
    AlarmTriggered,
}

/// A command for the driver to carry out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Publish `command` as JSON to `dpi/{light}/set`.
    Set {
        /// The light's device id.
        light: String,
        /// What to tell it.
        command: LightCommand,
    },
}

/// An event the light rules refuse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LightsError {
    /// A scene request named no configured scene.
    #[error("unknown scene {id:?}")]
    UnknownScene {
        /// The id asked for.
        id: String,
    },
}

// ---------------------------------------------------------------------------------------------
// The machine.
// ---------------------------------------------------------------------------------------------

/// The light rules of one house as a sans-I/O state machine.
#[derive(Debug)]
pub struct Lights {
    /// The rules, as configured; replaced whole by [`Lights::reconfigure`].
    config: LightsConfig,
    /// What is known of each light, and the commands waiting for the driver.
    tracker: Tracker,
    /// Each lux sensor's last reading, for the motion rules' lux conditions.
    lux: HashMap<String, f64>,
    /// Per motion rule (same index as `config.motion_lights`): when its lights go off.
    motion_off_at: Vec<Option<Instant>>,
    /// The wall time up to which schedules have been applied; `None` until `start`.
    schedules_applied: Option<Timestamp>,
    /// When the schedules next need a look, on the monotonic clock; `None` without schedules.
    schedule_check_at: Option<Instant>,
}

/// Who switched a light on, which decides whether a motion rule may switch it off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Owner {
    /// Off, or on since before the hub knew it.
    #[default]
    Nobody,
    /// The motion rule at this index switched it on and may switch it off.
    Motion(usize),
    /// The hub, for a schedule, a switch, a scene or the alarm: a motion rule leaves it alone.
    Hub,
    /// A person, by hand: a motion rule leaves it alone.
    Person,
}

/// What the machine knows of one light.
#[derive(Debug, Clone, Default)]
struct LightTrack {
    /// On or off as last known, from the hub's last command or the light's last report, whichever
    /// came later (a stale report excepted); `None` until either.
    state: Option<bool>,
    /// The hub's last command, until a matching report or until [`CONFIRM_WINDOW`] has passed.
    pending: Option<Pending>,
    /// Who switched it on.
    owner: Owner,
}

/// A command the light has not confirmed yet.
#[derive(Debug, Clone, Copy)]
struct Pending {
    /// The on/off commanded (`None`: brightness only).
    on: Option<bool>,
    /// When it was sent.
    sent: Instant,
}

impl LightTrack {
    /// The pending command, if still within its confirmation window at `now`.
    fn live_pending(&self, now: Instant) -> Option<Pending> {
        self.pending.filter(|p| now.saturating_duration_since(p.sent) <= CONFIRM_WINDOW)
    }
}

/// The mutable half of the machine that rules read and command through.
#[derive(Debug, Default)]
struct Tracker {
    /// Every light seen in the config or in a report, by id.
    lights: HashMap<String, LightTrack>,
    /// Commands not yet taken by `poll_action`, oldest first.
    actions: VecDeque<Action>,
}

impl Tracker {
    fn track(&mut self, light: &str) -> &mut LightTrack {
        self.lights.entry(light.to_string()).or_default()
    }

    /// Whether `light` is on as far as the hub knows (unknown: off).
    fn believed_on(&self, light: &str) -> bool {
        self.lights.get(light).is_some_and(|t| t.state == Some(true))
    }

    /// Queues `command` for `light`; if it switches the light on, `owner` now owns it.
    fn command(&mut self, light: &str, command: LightCommand, owner: Owner, now: Instant) {
        let track = self.track(light);
        track.pending = Some(Pending { on: command.on, sent: now });
        track.state = command.on.or(track.state);
        match command.on {
            Some(true) => track.owner = owner,
            Some(false) => track.owner = Owner::Nobody,
            None => {}
        }
        self.actions.push_back(Action::Set { light: light.to_string(), command });
    }

    /// A light's report: confirmation, stale state, or a person's doing (see the module docs).
    fn reported(&mut self, light: &str, on: bool, now: Instant) {
        let track = self.track(light);
        if let Some(pending) = track.live_pending(now) {
            if pending.on.is_none() || pending.on == Some(on) {
                track.pending = None;
                track.state = Some(on);
            }
            // Otherwise the light's state from before the command reached it: ignored.
            return;
        }
        track.pending = None;
        let previous = track.state.replace(on);
        if !on {
            track.owner = Owner::Nobody;
        } else if previous == Some(false) {
            track.owner = Owner::Person;
        }
    }
}

impl Lights {
    /// A machine for `config`; call [`Lights::start`] once the driver has the clocks.
    pub fn new(config: LightsConfig) -> Lights {
        let mut tracker = Tracker::default();
        for light in &config.lights {
            tracker.track(light);
        }
        let motion_off_at = vec![None; config.motion_lights.len()];
        // Schedules ask to be woken at once, so a driver that skips `start` still starts them.
        let schedule_check_at = (!config.schedules.is_empty()).then_some(Instant::from_millis(0));
        Lights { config, tracker, lux: HashMap::new(), motion_off_at, schedules_applied: None, schedule_check_at }
    }

    /// Applies the state each schedule wants at `wall` (on inside a window) and arms the schedules.
    pub fn start(&mut self, now: Instant, wall: Timestamp) {
        for schedule in &self.config.schedules {
            if wants_on(schedule, &self.config.house, wall) {
                for light in &schedule.lights {
                    self.tracker.command(light, LightCommand::ON, Owner::Hub, now);
                }
            }
        }
        self.schedules_applied = Some(wall);
        self.schedule_check_at = self.next_schedule_check(now, wall, wall);
    }

    /// Replaces the rules (a reload) at `now`/`wall`, keeping what is known of every light and lux
    /// sensor. A motion rule with the same sensors and lights as one before is the same rule: its
    /// running timer keeps its deadline and its lights stay its own, and a changed `off_after`
    /// applies from its next motion. The lights of a motion rule that is gone stay as they are,
    /// left to people and to the other rules. Schedules are not re-applied: a new or changed one
    /// acts from its next edge.
    pub fn reconfigure(&mut self, config: LightsConfig, now: Instant, wall: Timestamp) {
        let mut old: Vec<Option<&MotionLight>> = self.config.motion_lights.iter().map(Some).collect();
        // For each new rule, the index of the old rule it continues.
        let continues: Vec<Option<usize>> = config
            .motion_lights
            .iter()
            .map(|rule| {
                let same = |o: &&MotionLight| o.sensors == rule.sensors && o.lights == rule.lights;
                let i = old.iter().position(|o| o.as_ref().is_some_and(same))?;
                old[i] = None;
                Some(i)
            })
            .collect();
        let motion_off_at = continues.iter().map(|c| c.and_then(|i| self.motion_off_at[i])).collect();
        for track in self.tracker.lights.values_mut() {
            if let Owner::Motion(i) = track.owner {
                track.owner = continues.iter().position(|c| *c == Some(i)).map_or(Owner::Hub, Owner::Motion);
            }
        }
        for light in &config.lights {
            self.tracker.track(light);
        }
        self.motion_off_at = motion_off_at;
        self.config = config;
        self.schedule_check_at = match self.schedules_applied {
            Some(applied) => self.next_schedule_check(now, wall, applied.max(wall)),
            None => (!self.config.schedules.is_empty()).then_some(now),
        };
    }

    /// Feeds one event at monotonic `now` and wall time `wall`.
    pub fn handle_event(&mut self, event: Event, now: Instant, wall: Timestamp) -> Result<(), LightsError> {
        match event {
            Event::Motion { sensor } => self.motion(&sensor, now, wall),
            Event::Lux { sensor, lux } => {
                self.lux.insert(sensor, lux);
            }
            Event::LightState { light, on, brightness: _ } => self.tracker.reported(&light, on, now),
            Event::Switch { device, action } => self.switch(&device, &action, now),
            Event::Scene { id } => {
                let scene = self.config.scenes.iter().find(|s| s.id == id);
                let scene = scene.ok_or(LightsError::UnknownScene { id })?;
                for (light, command) in &scene.set {
                    self.tracker.command(light, *command, Owner::Hub, now);
                }
            }
            Event::AlarmTriggered => {
                for light in &self.config.lights {
                    self.tracker.command(light, LightCommand::ON, Owner::Hub, now);
                }
            }
        }
        Ok(())
    }

    /// Runs what is due: motion lights whose delay ran out, schedule edges the wall clock passed.
    pub fn handle_timeout(&mut self, now: Instant, wall: Timestamp) {
        let Lights { config, tracker, motion_off_at, .. } = self;
        let rules = config.motion_lights.iter().zip(motion_off_at.iter_mut());
        for (index, (rule, off_at)) in rules.enumerate() {
            if off_at.is_some_and(|at| at <= now) {
                *off_at = None;
                for light in &rule.lights {
                    let owner = tracker.lights.get(light.as_str()).map(|t| t.owner);
                    if owner == Some(Owner::Motion(index)) {
                        tracker.command(light, LightCommand::OFF, Owner::Nobody, now);
                    }
                }
            }
        }
        let Some(applied) = self.schedules_applied else {
            self.start(now, wall);
            return;
        };
        if wall > applied {
            for schedule in &self.config.schedules {
                if let Some(on) = last_edge(schedule, &self.config.house, applied, wall) {
                    for light in &schedule.lights {
                        self.tracker.command(light, LightCommand::switch(on), Owner::Hub, now);
                    }
                }
            }
            self.schedules_applied = Some(wall);
        }
        let applied = applied.max(wall);
        self.schedule_check_at = self.next_schedule_check(now, wall, applied);
    }

    /// The next command for the driver, oldest first.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.tracker.actions.pop_front()
    }

    /// When the driver should next call [`Lights::handle_timeout`], on the monotonic clock.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.motion_off_at.iter().flatten().copied().chain(self.schedule_check_at).min()
    }

    fn motion(&mut self, sensor: &str, now: Instant, wall: Timestamp) {
        let Lights { config, tracker, lux, motion_off_at, .. } = self;
        let rules = config.motion_lights.iter().zip(motion_off_at.iter_mut());
        for (index, (rule, off_at)) in rules.enumerate() {
            if !rule.sensors.iter().any(|s| s == sensor) {
                continue;
            }
            let allowed = condition_holds(rule, &config.house, lux, wall);
            let mut owns_any = false;
            for light in &rule.lights {
                if tracker.believed_on(light) {
                    // Already on: ours (or another motion rule's, which this motion now extends)
                    // re-arms the timer; a person's or the hub's stays theirs.
                    let track = tracker.track(light);
                    if let Owner::Motion(_) = track.owner {
                        track.owner = Owner::Motion(index);
                        owns_any = true;
                    }
                } else if allowed {
                    tracker.command(light, LightCommand::ON, Owner::Motion(index), now);
                    owns_any = true;
                }
            }
            // The condition gates switching on only: the light itself may raise the lux reading,
            // and dawn must not cut a light someone is walking under.
            if owns_any {
                *off_at = Some(now + rule.off_after);
            }
        }
    }

    fn switch(&mut self, device: &str, action: &str, now: Instant) {
        let Some(input) = SwitchInput::classify(action) else {
            return;
        };
        for rule in self.config.switches.iter().filter(|r| r.switch == device) {
            let on = match (rule.action, input) {
                (SwitchAction::Toggle, SwitchInput::Press) => !rule.lights.iter().any(|l| self.tracker.believed_on(l)),
                (SwitchAction::Toggle | SwitchAction::On, SwitchInput::On) => true,
                (SwitchAction::Toggle | SwitchAction::Off, SwitchInput::Off) => false,
                (SwitchAction::On, SwitchInput::Press) => true,
                (SwitchAction::Off, SwitchInput::Press) => false,
                (SwitchAction::On, SwitchInput::Off) | (SwitchAction::Off, SwitchInput::On) => continue,
            };
            for light in &rule.lights {
                self.tracker.command(light, LightCommand::switch(on), Owner::Hub, now);
            }
        }
    }

    /// The monotonic instant at which the schedules next need a look, seen at `now`/`wall`,
    /// with edges up to `applied` already done.
    fn next_schedule_check(&self, now: Instant, wall: Timestamp, applied: Timestamp) -> Option<Instant> {
        if self.config.schedules.is_empty() {
            return None;
        }
        let house = &self.config.house;
        let next_edge = self.config.schedules.iter().filter_map(|s| next_edge(s, house, applied)).min();
        let wait = next_edge.map_or(WALL_RECHECK, |edge| {
            // Rounded up to the millisecond, so the wake-up is never before the edge on a clock
            // that keeps pace; positive, since the edge is after `applied` ≥ `wall`.
            let millis = edge.duration_since(wall).unsigned_abs().as_nanos().div_ceil(1_000_000);
            Duration::from_millis(u64::try_from(millis).unwrap_or(u64::MAX)).min(WALL_RECHECK)
        });
        Some(now + wait)
    }
}

/// Whether a motion rule may switch its lights on at `wall`, given the last lux readings.
fn condition_holds(rule: &MotionLight, house: &House, lux: &HashMap<String, f64>, wall: Timestamp) -> bool {
    let time_ok = match rule.when {
        When::Always => true,
        When::Night => sun::is_night(house.latitude, house.longitude, wall),
    };
    let lux_ok = match &rule.lux {
        None => true,
        Some(limit) => lux.get(&limit.sensor).is_some_and(|lux| *lux < limit.max_lux),
    };
    time_ok && lux_ok
}

/// A switch's action, as the rules understand it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SwitchInput {
    Press,
    On,
    Off,
}

impl SwitchInput {
    /// See [`Event::Switch`]; `None` for actions that do nothing.
    fn classify(action: &str) -> Option<SwitchInput> {
        let action = action.trim().to_ascii_lowercase();
        let ignored = action.is_empty()
            || action.ends_with("release")
            || action.ends_with("stop")
            || action.starts_with("brightness");
        if ignored {
            None
        } else if action == "on" || action.starts_with("on_") {
            Some(SwitchInput::On)
        } else if action == "off" || action.starts_with("off_") {
            Some(SwitchInput::Off)
        } else {
            Some(SwitchInput::Press)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Schedule windows on the wall clock.
// ---------------------------------------------------------------------------------------------

/// The window that opens on `date`, if `date` is a listed day and both ends exist.
fn window(schedule: &Schedule, house: &House, date: Date) -> Option<(Timestamp, Timestamp)> {
    if !schedule.days.contains(date.weekday()) {
        return None;
    }
    let on = schedule.on.resolve(date, house)?;
    // The first `off` after `on`: the same day, or the next for a window crossing midnight (two
    // days on only for a sunrise/sunset `off` missing on the next day near a polar day or night).
    let mut day = date;
    for _ in 0..3 {
        if let Some(off) = schedule.off.resolve(day, house).filter(|off| *off > on) {
            return Some((on, off));
        }
        day = day.tomorrow().ok()?;
    }
    None
}

/// The windows opening on `first` to `last` (inclusive), in order.
fn windows(schedule: &Schedule, house: &House, first: Date, last: Date) -> Vec<(Timestamp, Timestamp)> {
    let mut found = Vec::new();
    let mut day = first;
    while day <= last {
        found.extend(window(schedule, house, day));
        let Ok(next) = day.tomorrow() else { break };
        day = next;
    }
    found
}

/// The house-local date of `at`.
fn local_date(house: &House, at: Timestamp) -> Date {
    house.timezone.to_datetime(at).date()
}

/// `date` moved by `days` (pinned to `date` itself at the ends of the calendar).
fn shift(date: Date, days: i64) -> Date {
    date.checked_add(days.days()).unwrap_or(date)
}

/// Whether `at` is inside one of the schedule's windows.
fn wants_on(schedule: &Schedule, house: &House, at: Timestamp) -> bool {
    let today = local_date(house, at);
    windows(schedule, house, shift(today, -2), today).iter().any(|&(on, off)| on <= at && at < off)
}

/// The state (`true`: on) of the last window edge in `(after, upto]`, if any.
fn last_edge(schedule: &Schedule, house: &House, after: Timestamp, upto: Timestamp) -> Option<bool> {
    let last = local_date(house, upto);
    // A window starts at most two days before its end; beyond a week back, older edges are
    // superseded by a later one in any schedule that has windows at all.
    let first = shift(local_date(house, after), -2).max(shift(last, -9));
    windows(schedule, house, first, last)
        .into_iter()
        .flat_map(|(on, off)| [(on, true), (off, false)])
        .filter(|&(at, _)| after < at && at <= upto)
        .max_by_key(|&(at, _)| at)
        .map(|(_, on)| on)
}

/// The first window edge after `after`, looking a week and a day ahead.
fn next_edge(schedule: &Schedule, house: &House, after: Timestamp) -> Option<Timestamp> {
    let today = local_date(house, after);
    windows(schedule, house, shift(today, -2), shift(today, 8))
        .into_iter()
        .flat_map(|(on, off)| [on, off])
        .filter(|&at| at > after)
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::civil::DateTime;

    // ---- Time expressions -------------------------------------------------------------------

    macro_rules! parses {
        ($($name:ident: $input:expr => $want:expr, $shown:expr;)*) => {
            $(#[test] fn $name() {
                let got = TimeExpr::parse($input).unwrap();
                assert_eq!(got, $want);
                assert_eq!(got.to_string(), $shown);
            })*
        };
    }

    fn at(h: i8, m: i8) -> TimeExpr {
        TimeExpr::At(Time::new(h, m, 0, 0).unwrap())
    }

    parses! {
        parse_fixed: "23:30" => at(23, 30), "23:30";
        parse_fixed_one_digit_hour: "7:05" => at(7, 5), "07:05";
        parse_midnight: "00:00" => at(0, 0), "00:00";
        parse_sunrise: "sunrise" => TimeExpr::Sunrise(SignedDuration::ZERO), "sunrise";
        parse_sunset_minus: "sunset-00:15" => TimeExpr::Sunset(SignedDuration::from_mins(-15)), "sunset-00:15";
        parse_sunrise_plus: "sunrise+01:00" => TimeExpr::Sunrise(SignedDuration::from_hours(1)), "sunrise+01:00";
        parse_trims_and_ignores_case: " Sunset+1:30 " => TimeExpr::Sunset(SignedDuration::from_mins(90)), "sunset+01:30";
    }

    macro_rules! refuses {
        ($($name:ident: $input:expr => $kind:ident;)*) => {
            $(#[test] fn $name() {
                let err = TimeExpr::parse($input).unwrap_err();
                assert_eq!(err, TimeExprError { input: $input.to_string(), kind: TimeExprErrorKind::$kind });
            })*
        };
    }

    refuses! {
        refuse_empty: "  " => Empty;
        refuse_word: "noon" => NotATime;
        refuse_no_colon: "2330" => NotATime;
        refuse_seconds: "23:30:00" => NotATime;
        refuse_one_digit_minute: "23:5" => NotATime;
        refuse_signed_time: "+23:30" => NotATime;
        refuse_hour_24: "24:00" => HourOutOfRange;
        refuse_minute_60: "12:60" => MinuteOutOfRange;
        refuse_offset_without_sign: "sunset00:15" => BadOffset;
        refuse_offset_not_a_time: "sunset-15" => BadOffset;
        refuse_offset_too_large: "sunrise+24:00" => BadOffset;
        refuse_sunset_twice: "sunset-sunset" => BadOffset;
    }

    #[test]
    fn error_message_names_input_and_syntax() {
        let err = TimeExpr::parse("sunset-15").unwrap_err();
        assert_eq!(
            err.to_string(),
            "bad time \"sunset-15\": the offset after sunrise or sunset must be +HH:MM or -HH:MM, under 24 hours"
        );
    }

    // ---- The harness: a fake clock that jumps to `poll_timeout()` ---------------------------

    /// A machine, a monotonic clock and a wall clock that the test moves.
    struct Harness {
        lights: Lights,
        now: Instant,
        wall: Timestamp,
        tz: TimeZone,
    }

    impl Harness {
        fn new(config: LightsConfig, start: &str) -> Harness {
            let tz = config.house.timezone.clone();
            let wall = local(&tz, start);
            Harness { lights: Lights::new(config), now: Instant::from_millis(1_000_000), wall, tz }
        }

        /// Runs one script step; returns the actions it caused, `light:on`, `light:off,b120`,
        /// tagged `@HH:MM` (local wall time) when they came from a timeout.
        fn step(&mut self, step: &str) -> Vec<String> {
            let words: Vec<&str> = step.split_whitespace().collect();
            let (now, wall) = (self.now, self.wall);
            let mut out = Vec::new();
            let result = match words.as_slice() {
                ["start"] => {
                    self.lights.start(now, wall);
                    Ok(())
                }
                ["motion", s] => self.event(Event::Motion { sensor: s.to_string() }),
                ["lux", s, v] => self.event(Event::Lux { sensor: s.to_string(), lux: v.parse().unwrap() }),
                ["state", l, on] => {
                    self.event(Event::LightState { light: l.to_string(), on: *on == "on", brightness: None })
                }
                ["switch", d, a] => self.event(Event::Switch { device: d.to_string(), action: a.to_string() }),
                ["scene", id] => self.event(Event::Scene { id: id.to_string() }),
                ["alarm"] => self.event(Event::AlarmTriggered),
                ["wait", d] => {
                    let target = self.now + parse_duration(d).unsigned_abs();
                    return self.advance_to(target);
                }
                ["until", t] => {
                    let target = local(&self.tz, t);
                    let ahead = target.duration_since(self.wall).unsigned_abs();
                    assert!(target >= self.wall, "`until {t}` is in the past");
                    return self.advance_to(self.now + ahead);
                }
                ["wall", d] => {
                    self.wall = sun::add_saturating(self.wall, parse_duration(d));
                    Ok(())
                }
                _ => panic!("unknown step {step:?}"),
            };
            if let Err(LightsError::UnknownScene { .. }) = result {
                out.push("error:unknown-scene".to_string());
            }
            out.extend(self.drain(None));
            out
        }

        fn event(&mut self, event: Event) -> Result<(), LightsError> {
            self.lights.handle_event(event, self.now, self.wall)
        }

        /// Moves both clocks to `target`, stopping at every deadline on the way.
        fn advance_to(&mut self, target: Instant) -> Vec<String> {
            let mut out = Vec::new();
            let mut steps = 0;
            while let Some(deadline) = self.lights.poll_timeout() {
                if deadline > target {
                    break;
                }
                self.jump(deadline.max(self.now));
                self.lights.handle_timeout(self.now, self.wall);
                let tag = self.tz.to_datetime(self.wall);
                out.extend(self.drain(Some(format!("@{:02}:{:02}", tag.hour(), tag.minute()))));
                steps += 1;
                assert!(steps < 100_000, "the machine keeps asking to be woken at {deadline:?}");
            }
            self.jump(target);
            out
        }

        /// Moves the monotonic clock to `to` and the wall clock by the same amount.
        fn jump(&mut self, to: Instant) {
            let by = to.saturating_duration_since(self.now);
            self.now = to;
            self.wall = sun::add_saturating(self.wall, SignedDuration::try_from(by).unwrap());
        }

        fn drain(&mut self, tag: Option<String>) -> Vec<String> {
            std::iter::from_fn(|| self.lights.poll_action())
                .map(|Action::Set { light, command }| {
                    let mut s = light;
                    let mut sep = ':';
                    if let Some(on) = command.on {
                        s.push(sep);
                        s.push_str(if on { "on" } else { "off" });
                        sep = ',';
                    }
                    if let Some(b) = command.brightness {
                        s.push_str(&format!("{sep}b{b}"));
                    }
                    s + tag.as_deref().unwrap_or("")
                })
                .collect()
        }
    }

    /// `2024-01-15T18:00` as a local time in `tz`.
    fn local(tz: &TimeZone, civil: &str) -> Timestamp {
        let dt: DateTime = civil.parse().unwrap();
        tz.to_timestamp(dt).unwrap()
    }

    /// `90s`, `15m`, `2h`, `1d`, optionally signed.
    fn parse_duration(text: &str) -> SignedDuration {
        let (number, unit) = text.split_at(text.len() - 1);
        let n: i64 = number.parse().unwrap();
        match unit {
            "s" => SignedDuration::from_secs(n),
            "m" => SignedDuration::from_mins(n),
            "h" => SignedDuration::from_hours(n),
            "d" => SignedDuration::from_hours(24 * n),
            _ => panic!("unit of {text:?}"),
        }
    }

    /// Runs a script: steps separated by `|`, each `command => expected actions` (none if no `=>`).
    fn run(config: LightsConfig, start: &str, script: &str) {
        let mut harness = Harness::new(config, start);
        for (i, step) in script.split('|').enumerate() {
            let (command, want) = step.split_once("=>").unwrap_or((step, ""));
            let got = harness.step(command.trim());
            assert_eq!(got.join(" "), want.trim(), "step {} `{}` of: {script}", i + 1, command.trim());
        }
    }

    // ---- Configs ----------------------------------------------------------------------------

    fn lyon() -> House {
        House { latitude: 45.76, longitude: 4.84, timezone: TimeZone::get("Europe/Paris").unwrap() }
    }

    fn ids(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn house_config() -> LightsConfig {
        LightsConfig {
            house: lyon(),
            lights: ids(&["hall-light", "stairs-light", "porch-light", "living-light"]),
            motion_lights: vec![],
            schedules: vec![],
            switches: vec![],
            scenes: vec![],
        }
    }

    /// `hall-pir` drives `hall-light`, off after 120 s; with `lux`, also `hall-lux` below it.
    fn motion(when: When, lux: Option<f64>) -> LightsConfig {
        let mut config = house_config();
        config.motion_lights.push(MotionLight {
            sensors: ids(&["hall-pir", "stairs-pir"]),
            lights: ids(&["hall-light"]),
            off_after: Duration::from_secs(120),
            when,
            lux: lux.map(|max_lux| LuxLimit { sensor: "hall-lux".into(), max_lux }),
        });
        config
    }

    /// `porch-light` from `on` to `off` on `days` ("mon,tue" or "all").
    fn schedule(on: &str, off: &str, days: &str) -> LightsConfig {
        let mut config = house_config();
        config.schedules.push(schedule_rule(on, off, days));
        config
    }

    fn schedule_rule(on: &str, off: &str, days: &str) -> Schedule {
        let days = if days == "all" {
            Days::ALL
        } else {
            days.split(',')
                .map(|d| match d {
                    "mon" => Weekday::Monday,
                    "tue" => Weekday::Tuesday,
                    "wed" => Weekday::Wednesday,
                    "thu" => Weekday::Thursday,
                    "fri" => Weekday::Friday,
                    "sat" => Weekday::Saturday,
                    "sun" => Weekday::Sunday,
                    _ => panic!("day {d}"),
                })
                .collect()
        };
        Schedule { lights: ids(&["porch-light"]), on: on.parse().unwrap(), off: off.parse().unwrap(), days }
    }

    /// The porch has a motion light (`porch-pir`) and an evening schedule, 18:00 to 23:00.
    fn porch_motion_and_schedule() -> LightsConfig {
        let mut config = schedule("18:00", "23:00", "all");
        config.motion_lights.push(MotionLight {
            sensors: ids(&["porch-pir"]),
            lights: ids(&["porch-light"]),
            off_after: Duration::from_secs(60),
            when: When::Always,
            lux: None,
        });
        config
    }

    /// `hall-switch` toggles (or `action`s) the hall and the stairs.
    fn switch(action: SwitchAction) -> LightsConfig {
        let mut config = house_config();
        config.switches.push(Switch {
            switch: "hall-switch".into(),
            lights: ids(&["hall-light", "stairs-light"]),
            action,
        });
        config
    }

    fn scenes() -> LightsConfig {
        let mut config = motion(When::Always, None);
        let mut set = BTreeMap::new();
        set.insert("living-light".to_string(), LightCommand { on: Some(true), brightness: Some(120) });
        set.insert("porch-light".to_string(), LightCommand::ON);
        set.insert("stairs-light".to_string(), LightCommand { on: None, brightness: Some(40) });
        config.scenes.push(Scene { id: "evening".into(), set });
        config
    }

    macro_rules! script {
        ($($name:ident: $config:expr, $start:expr, $script:expr;)*) => {
            $(#[test] fn $name() { run($config, $start, $script) })*
        };
    }

    // 2024-01-15 is a Monday. In Lyon that day the sun rises at 08:18 and sets at 17:22.

    // ---- Motion lights ------------------------------------------------------------------------
    script! {
        motion_on_then_off_after_delay: motion(When::Always, None), "2024-01-15T12:00",
            "motion hall-pir => hall-light:on | wait 119s | wait 1s => hall-light:off@12:02";
        motion_rearms_the_timer: motion(When::Always, None), "2024-01-15T12:00",
            "motion hall-pir => hall-light:on | wait 100s | motion stairs-pir | wait 119s | wait 1s => hall-light:off@12:03";
        motion_after_off_switches_on_again: motion(When::Always, None), "2024-01-15T12:00",
            "motion hall-pir => hall-light:on | wait 3m => hall-light:off@12:02 | motion hall-pir => hall-light:on";
        unrelated_sensor_does_nothing: motion(When::Always, None), "2024-01-15T12:00",
            "motion kitchen-pir | wait 10m";
        confirmation_is_not_a_person: motion(When::Always, None), "2024-01-15T12:00",
            "motion hall-pir => hall-light:on | state hall-light on | wait 2m => hall-light:off@12:02 | state hall-light off";
        stale_report_is_not_a_person: motion(When::Always, None), "2024-01-15T12:00",
            "state hall-light off | motion hall-pir => hall-light:on | state hall-light off | state hall-light on | wait 2m => hall-light:off@12:02";
        light_switched_on_by_hand_is_left_on: motion(When::Always, None), "2024-01-15T12:00",
            "state hall-light off | state hall-light on | motion hall-pir | wait 1h";
        light_on_at_first_report_is_left_on: motion(When::Always, None), "2024-01-15T12:00",
            "state hall-light on | motion hall-pir | wait 1h";
        person_taking_over_a_motion_light_keeps_it_on: motion(When::Always, None), "2024-01-15T12:00",
            "motion hall-pir => hall-light:on | state hall-light on | wait 30s | state hall-light off | state hall-light on | motion hall-pir | wait 1h";
        switched_off_by_hand_then_motion_switches_on: motion(When::Always, None), "2024-01-15T12:00",
            "motion hall-pir => hall-light:on | state hall-light on | wait 30s | state hall-light off | motion hall-pir => hall-light:on | wait 2m => hall-light:off@12:02";
        night_rule_ignores_daytime_motion: motion(When::Night, None), "2024-01-15T12:00",
            "motion hall-pir | wait 10m";
        night_rule_switches_on_after_sunset: motion(When::Night, None), "2024-01-15T12:00",
            "motion hall-pir | until 2024-01-15T17:40 | motion hall-pir => hall-light:on | wait 2m => hall-light:off@17:42";
        night_rule_switches_on_before_sunrise: motion(When::Night, None), "2024-01-15T07:00",
            "motion hall-pir => hall-light:on | until 2024-01-15T09:00 => hall-light:off@07:02 | motion hall-pir";
        dawn_does_not_cut_a_light_in_use: motion(When::Night, None), "2024-01-15T08:17",
            "motion hall-pir => hall-light:on | wait 90s | motion hall-pir | wait 90s | motion hall-pir | wait 119s | wait 1s => hall-light:off@08:22 | motion hall-pir";
        lux_rule_needs_a_reading: motion(When::Always, Some(20.0)), "2024-01-15T12:00",
            "motion hall-pir | lux hall-lux 50 | motion hall-pir | lux hall-lux 10 | motion hall-pir => hall-light:on";
        lux_raised_by_the_light_still_rearms: motion(When::Always, Some(20.0)), "2024-01-15T12:00",
            "lux hall-lux 5 | motion hall-pir => hall-light:on | lux hall-lux 300 | wait 60s | motion hall-pir | wait 119s | wait 1s => hall-light:off@12:03";
        lux_and_night_both_needed: motion(When::Night, Some(20.0)), "2024-01-15T12:00",
            "lux hall-lux 5 | motion hall-pir | until 2024-01-15T20:00 | lux hall-lux 30 | motion hall-pir | lux hall-lux 5 | motion hall-pir => hall-light:on";
        scheduled_light_is_not_switched_off_by_motion: porch_motion_and_schedule(), "2024-01-15T20:00",
            "start => porch-light:on | motion porch-pir | wait 10m | until 2024-01-15T23:10 => porch-light:off@23:00 | motion porch-pir => porch-light:on | wait 1m => porch-light:off@23:11";
    }

    // ---- Schedules ----------------------------------------------------------------------------
    script! {
        schedule_fixed_times: schedule("18:00", "23:00", "all"), "2024-01-15T17:00",
            "start | until 2024-01-15T17:59 | until 2024-01-16T12:00 => porch-light:on@18:00 porch-light:off@23:00";
        schedule_runs_every_listed_day: schedule("18:00", "23:00", "all"), "2024-01-15T12:00",
            "start | until 2024-01-17T12:00 => porch-light:on@18:00 porch-light:off@23:00 porch-light:on@18:00 porch-light:off@23:00";
        schedule_across_midnight_belongs_to_its_first_day: schedule("22:00", "06:00", "fri"), "2024-01-18T12:00",
            "start | until 2024-01-19T21:59 | until 2024-01-20T12:00 => porch-light:on@22:00 porch-light:off@06:00 | until 2024-01-26T12:00 | until 2024-01-27T12:00 => porch-light:on@22:00 porch-light:off@06:00";
        schedule_sunset_to_sunrise_on_saturdays: schedule("sunset", "sunrise", "sat"), "2024-01-19T12:00",
            "start | until 2024-01-21T12:00 => porch-light:on@17:28 porch-light:off@08:14 | until 2024-01-27T12:00";
        schedule_before_sunset_until_fixed: schedule("sunset-00:15", "23:30", "all"), "2024-06-21T12:00",
            "start | until 2024-06-22T12:00 => porch-light:on@21:19 porch-light:off@23:30";
        schedule_spring_forward_gap_runs_once_after_it: schedule("02:30", "05:00", "all"), "2024-03-30T12:00",
            "start | until 2024-03-31T12:00 => porch-light:on@03:30 porch-light:off@05:00 | until 2024-04-01T12:00 => porch-light:on@02:30 porch-light:off@05:00";
        schedule_spring_forward_keeps_local_time: schedule("18:00", "01:00", "all"), "2024-03-30T12:00",
            "start | until 2024-04-01T12:00 => porch-light:on@18:00 porch-light:off@01:00 porch-light:on@18:00 porch-light:off@01:00";
        schedule_fall_back_fold_runs_once: schedule("02:15", "02:45", "all"), "2024-10-26T12:00",
            "start | until 2024-10-27T12:00 => porch-light:on@02:15 porch-light:off@02:45";
        schedule_fall_back_window_spans_the_repeated_hour: schedule("01:00", "02:30", "all"), "2024-10-26T12:00",
            "start | until 2024-10-27T12:00 => porch-light:on@01:00 porch-light:off@02:30";
        restart_inside_window_switches_on: schedule("18:00", "23:00", "all"), "2024-01-15T20:00",
            "start => porch-light:on | until 2024-01-16T00:00 => porch-light:off@23:00";
        restart_inside_window_across_midnight: schedule("22:00", "06:00", "fri"), "2024-01-20T01:00",
            "start => porch-light:on | until 2024-01-20T12:00 => porch-light:off@06:00";
        restart_outside_window_switches_nothing: schedule("18:00", "23:00", "all"), "2024-01-15T23:30",
            "start | until 2024-01-16T12:00";
        restart_on_a_day_not_listed_switches_nothing: schedule("22:00", "06:00", "fri"), "2024-01-21T01:00",
            "start";
        timeout_before_start_starts: schedule("18:00", "23:00", "all"), "2024-01-15T20:00",
            "wait 1s => porch-light:on@20:00";
        wall_clock_stepped_back_does_not_fire_twice: schedule("18:00", "23:00", "all"), "2024-01-15T22:50",
            "start => porch-light:on | until 2024-01-15T23:01 => porch-light:off@23:00 | wall -30m | wait 40m | until 2024-01-16T12:00";
        wall_clock_stepped_forward_fires_within_a_minute: schedule("18:00", "23:00", "all"), "2024-01-15T17:00",
            "start | wall +3h | wait 60s => porch-light:on@20:01 | until 2024-01-16T00:00 => porch-light:off@23:00";
        wall_clock_stepped_over_a_whole_window_applies_its_end: schedule("18:00", "23:00", "all"), "2024-01-15T17:00",
            "start | wall +7h | wait 60s => porch-light:off@00:01 | until 2024-01-16T12:00";
        wall_clock_stepped_back_into_a_window_does_not_refire: schedule("18:00", "23:00", "all"), "2024-01-15T17:59",
            "start | wait 2m => porch-light:on@18:00 | wall -5m | wait 10m";
        // A Pi has no RTC: it boots years in the past, then NTP steps the clock to now. The
        // skipped years' edges collapse into the state they end in, applied once, then the
        // schedule runs at the right local times.
        booted_years_in_the_past_then_stepped_to_now_applies_now_once: schedule("18:00", "23:00", "all"),
            "2019-01-01T12:00",
            "start | wall +1826d | wait 60s => porch-light:off@12:01 | until 2024-01-02T00:00 => porch-light:on@18:00 porch-light:off@23:00";
        booted_years_in_the_past_then_stepped_into_a_window: schedule("18:00", "23:00", "all"), "2019-01-01T12:00",
            "start | wall +1826d | wall +8h | wait 60s => porch-light:on@20:01 | until 2024-01-02T00:00 => porch-light:off@23:00";
        wall_clock_set_years_back_fires_nothing_until_it_catches_up: schedule("18:00", "23:00", "all"),
            "2024-01-15T17:00",
            "start | wall -1826d | until 2019-01-17T00:00";
        motion_delay_keeps_its_length_across_a_years_step: motion(When::Always, None), "2019-01-01T12:00",
            "motion hall-pir => hall-light:on | wall +1826d | wait 119s | wait 1s => hall-light:off@12:02";
    }

    // ---- Switches, scenes, alarm --------------------------------------------------------------
    script! {
        switch_toggles_a_group_on_then_off: switch(SwitchAction::Toggle), "2024-01-15T12:00",
            "switch hall-switch single => hall-light:on stairs-light:on | switch hall-switch single => hall-light:off stairs-light:off";
        switch_toggle_with_one_light_on_switches_all_off: switch(SwitchAction::Toggle), "2024-01-15T12:00",
            "state stairs-light on | switch hall-switch single => hall-light:off stairs-light:off";
        switch_toggle_remembers_its_command_without_reports: switch(SwitchAction::Toggle), "2024-01-15T12:00",
            "switch hall-switch single => hall-light:on stairs-light:on | wait 1m | switch hall-switch toggle => hall-light:off stairs-light:off";
        switch_toggle_sees_a_light_switched_off_by_hand: switch(SwitchAction::Toggle), "2024-01-15T12:00",
            "switch hall-switch single => hall-light:on stairs-light:on | state hall-light on | state stairs-light on | wait 1m | state hall-light off | state stairs-light off | switch hall-switch single => hall-light:on stairs-light:on";
        switch_rocker_on_and_off: switch(SwitchAction::Toggle), "2024-01-15T12:00",
            "switch hall-switch on => hall-light:on stairs-light:on | switch hall-switch ON => hall-light:on stairs-light:on | switch hall-switch off_press => hall-light:off stairs-light:off";
        switch_releases_and_dimming_do_nothing: switch(SwitchAction::Toggle), "2024-01-15T12:00",
            "switch hall-switch release | switch hall-switch on_press_release | switch hall-switch brightness_move_up | switch hall-switch brightness_stop";
        switch_on_rule_ignores_off: switch(SwitchAction::On), "2024-01-15T12:00",
            "switch hall-switch double => hall-light:on stairs-light:on | switch hall-switch off";
        switch_off_rule: switch(SwitchAction::Off), "2024-01-15T12:00",
            "switch hall-switch single => hall-light:off stairs-light:off | switch hall-switch on";
        unknown_switch_does_nothing: switch(SwitchAction::Toggle), "2024-01-15T12:00",
            "switch kitchen-switch single";
        switch_on_is_not_switched_off_by_motion: { let mut c = switch(SwitchAction::Toggle); c.motion_lights = motion(When::Always, None).motion_lights; c }, "2024-01-15T12:00",
            "motion hall-pir => hall-light:on | switch hall-switch on => hall-light:on stairs-light:on | wait 1h";
        scene_applies_its_settings: scenes(), "2024-01-15T12:00",
            "scene evening => living-light:on,b120 porch-light:on stairs-light:b40";
        unknown_scene_is_an_error: scenes(), "2024-01-15T12:00",
            "scene party => error:unknown-scene";
        alarm_switches_every_light_on: house_config(), "2024-01-15T12:00",
            "alarm => hall-light:on stairs-light:on porch-light:on living-light:on";
        alarm_lights_are_not_switched_off_by_motion: motion(When::Always, None), "2024-01-15T12:00",
            "motion hall-pir => hall-light:on | alarm => hall-light:on stairs-light:on porch-light:on living-light:on | wait 1h";
    }

    #[test]
    fn no_timeout_without_timers_or_schedules() {
        let mut lights = Lights::new(motion(When::Always, None));
        let wall = local(&TimeZone::get("Europe/Paris").unwrap(), "2024-01-15T12:00");
        lights.start(Instant::from_millis(0), wall);
        assert_eq!(lights.poll_timeout(), None);
    }

    #[test]
    fn schedule_sleeps_until_the_edge_when_it_is_near() {
        let mut lights = Lights::new(schedule("18:00", "23:00", "all"));
        let wall = local(&TimeZone::get("Europe/Paris").unwrap(), "2024-01-15T17:59:30");
        lights.start(Instant::from_millis(0), wall);
        assert_eq!(lights.poll_timeout(), Some(Instant::from_millis(30_000)));
    }

    /// Reloads `config` into the harness's machine at its clocks.
    fn reload(h: &mut Harness, config: LightsConfig) {
        let (now, wall) = (h.now, h.wall);
        h.lights.reconfigure(config, now, wall);
    }

    fn motion_after(secs: u64) -> LightsConfig {
        let mut config = motion(When::Always, None);
        config.motion_lights[0].off_after = Duration::from_secs(secs);
        config
    }

    #[test]
    fn a_reloaded_rule_keeps_its_running_timer_and_takes_its_new_delay_at_the_next_motion() {
        let mut h = Harness::new(motion_after(120), "2024-01-15T12:00");
        assert_eq!(h.step("motion hall-pir"), ["hall-light:on"]);
        assert!(h.step("wait 60s").is_empty());
        reload(&mut h, motion_after(600));
        assert_eq!(h.step("wait 60s"), ["hall-light:off@12:02"], "the running timer kept its deadline");
        assert_eq!(h.step("motion hall-pir"), ["hall-light:on"]);
        assert!(h.step("wait 599s").is_empty(), "the new delay applies");
        assert_eq!(h.step("wait 1s"), ["hall-light:off@12:12"]);
    }

    #[test]
    fn the_lights_of_a_removed_rule_stay_as_they_are() {
        let mut h = Harness::new(motion_after(120), "2024-01-15T12:00");
        assert_eq!(h.step("motion hall-pir"), ["hall-light:on"]);
        reload(&mut h, house_config());
        assert!(h.step("wait 1h").is_empty(), "a rule that is gone switched its light off");
        assert_eq!(h.lights.poll_timeout(), None);
    }

    #[test]
    fn a_rule_with_other_lights_is_another_rule_and_does_not_inherit_the_timer() {
        let mut h = Harness::new(motion_after(120), "2024-01-15T12:00");
        assert_eq!(h.step("motion hall-pir"), ["hall-light:on"]);
        let mut other = motion_after(120);
        other.motion_lights[0].lights = ids(&["stairs-light"]);
        reload(&mut h, other);
        assert!(h.step("wait 1h").is_empty());
        // The new rule acts from its next motion; the hall light is no longer its business.
        assert_eq!(h.step("motion hall-pir"), ["stairs-light:on"]);
        assert_eq!(h.step("wait 120s"), ["stairs-light:off@13:02"]);
    }

    #[test]
    fn a_schedule_added_by_a_reload_acts_from_its_next_edge() {
        let mut h = Harness::new(house_config(), "2024-01-15T19:00");
        h.step("start");
        reload(&mut h, schedule("18:00", "23:00", "all"));
        assert!(h.step("wait 1h").is_empty(), "the window already open is not applied at the reload");
        assert_eq!(h.step("until 2024-01-15T23:01"), ["porch-light:off@23:00"]);
    }
}
