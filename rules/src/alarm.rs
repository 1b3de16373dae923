//! The burglar alarm as a pure state machine (SPEC §7 "Alarm", the `dpi/alarm/*` topics of §5).
//!
//! This module owns the alarm's decisions: its state, the exit/entry/siren delays, which zone trips what in
//! which state, the bypass list, whether a code was needed and the wrong-code lockout. It must not read a
//! clock, touch SQLite or MQTT, or see a PIN: the driver verifies codes against the users' argon2 hashes
//! (slow, so not here) and passes only the verdict ([`CodeCheck`]); every time comes in as a monotonic
//! [`Instant`] argument. Out come [`Action`]s, which the driver carries out in order.
//!
//! ```text
//! +----------+   arm m    +-----------+  exit delay ends  +-------------------------+
//! | disarmed | ---------> | arming(m) | ----------------> | armed_away, armed_home, |
//! +----------+            +-----------+ <---------------- | armed_night  (mode m)   |
//!      |                        |        arm another mode +-------------------------+
//!      |                        |                             |                 |
//!      |                        |                  entry zone |                 | perimeter,
//!      |                        |                             v                 | interior (away),
//!      |                        |                      +------------+           | 24h, smoke,
//!      |                        |                      | pending(m) |           | tamper, panic
//!      |                        |                      +------------+           |
//!      | 24h, smoke,            | 24h, smoke,                 | entry delay ends, |
//!      | tamper, panic          | tamper, panic               | perimeter, 24h,   |
//!      |                        |                             | tamper, panic     |
//!      v                        v                             v                 v
//! +-------------------------------------------------------------------------------------+
//! | triggered(m, or none from disarmed): every siren on for `siren`, lights on (option) |
//! +-------------------------------------------------------------------------------------+
//!      siren time ends: sirens off, back to armed_m (or to disarmed)
//!
//! disarm with a valid code: from every other state to disarmed (sirens off, bypass cleared)
//! ```
//!
//! Decisions the SPEC leaves open, taken here:
//! - **Arming** (exit delay) ignores every sensor but the 24h ones, like Home Assistant's manual panel.
//!   A trigger during arming returns to the armed mode being armed when the siren time ends.
//! - **Pending** (entry delay) ignores `entry` (the delay is already running) and `interior` (the person
//!   walks from the door to the keypad past the motion sensor); `perimeter`, 24h, tamper and panic trigger.
//! - **Triggered** ignores every trip; a new tamper is still reported as a `tamper` event.
//! - **Tamper** from any listed sensor, whatever its zone, is a 24h trigger (SPEC: "24h (smoke, tamper,
//!   panic)"), and so is any report of a `smoke` sensor whatever its zone, so a smoke detector left in
//!   zone `none` still works. A bypassed sensor's tamper still triggers.
//! - **Trips are edges.** The machine remembers each sensor's last state: a contact, smoke or other sensor
//!   trips when it goes from not tripped to tripped, so a device that republishes `open` with its battery
//!   level does not re-trigger. A motion sensor trips on every live `motion:true` (some only ever send
//!   `true`), except the first report after (re)connecting or a retained replay
//!   (`first_after_connect` in [`Event::SensorState`]), which trips only if it differs from the remembered
//!   state (SPEC: "a sensor that reconnects is not a trip"). At start the driver seeds the memory with the
//!   states the store holds ([`Alarm::seed_sensor`]).
//! - **Codes.** Disarm always needs a valid code. Arm needs one if `code_arm_required`; a code supplied
//!   when not required is still checked (a wrong one is rejected and counted), otherwise arming would be
//!   an oracle for guessing PINs. Panic never needs one and ignores any code. A missing code where one is
//!   needed is rejected (`code_rejected`, "code required") but does not count towards the lockout. A
//!   valid code does not clear earlier wrong ones: "5 wrong codes in 5 minutes" is a sliding window.
//! - **Arming while armed** in another mode re-arms through the exit delay of the new mode (Home
//!   Assistant does the same); in the same mode it changes nothing. Arming from `pending` or `triggered`
//!   is refused: disarm first, so an intruder cannot escape the entry delay by pressing "arm".
//! - **`sensor_offline`** is raised in every state but `disarmed`, once per online-to-offline change. It
//!   is not a trip. A sensor's last state is kept while it is offline.
//! - **Sirens**: one [`Action::Siren`] per configured siren. A siren that comes online is sent `on` again
//!   while triggered, and `off` otherwise (it may have missed the `off` while it was away).
//! - **Durability**: every change of state, bypass list or lockout counters is preceded by
//!   [`Action::Persist`], queued before [`Action::PublishState`] and the events, so a driver that carries
//!   actions out in order writes to disk before it announces. Delays are kept as time left, so after a
//!   restart [`Alarm::restore`] resumes them with the time that was left (downtime does not count: the
//!   monotonic clock does not survive a reboot).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::time::Duration;

use crate::clock::Instant;

/// How long a wrong code counts towards a lockout.
pub const WRONG_CODE_WINDOW: Duration = Duration::from_secs(5 * 60);
/// Wrong codes within [`WRONG_CODE_WINDOW`] that lock code entry.
pub const WRONG_CODES_BEFORE_LOCKOUT: usize = 5;
/// How long code entry stays locked.
pub const LOCKOUT: Duration = Duration::from_secs(5 * 60);

/// The `by` of a state nobody in particular caused (a fresh install).
const HUB: &str = "hub";

/// The alarm zone of a sensor (SPEC §4 `zone`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Zone {
    /// Trips `pending` (the entry delay) when armed.
    Entry,
    /// Triggers at once when armed.
    Perimeter,
    /// Triggers at once when `armed_away`; ignored by `armed_home` and `armed_night`.
    Interior,
    /// Triggers in every state, even disarmed (`24h` in the config).
    H24,
    /// Never trips (its tamper still triggers).
    None,
}

impl Zone {
    /// The config's name: `entry`, `perimeter`, `interior`, `24h`, `none`.
    pub fn as_str(self) -> &'static str {
        match self {
            Zone::Entry => "entry",
            Zone::Perimeter => "perimeter",
            Zone::Interior => "interior",
            Zone::H24 => "24h",
            Zone::None => "none",
        }
    }

    /// The zone named as in the config (`entry`, `perimeter`, `interior`, `24h`, `none`).
    pub fn from_name(name: &str) -> Option<Zone> {
        [Zone::Entry, Zone::Perimeter, Zone::Interior, Zone::H24, Zone::None].into_iter().find(|z| z.as_str() == name)
    }
}

/// What kind of sensor a device is, as far as the alarm cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SensorKind {
    /// A door or window contact: trips when it opens.
    Contact,
    /// A motion sensor: every live `motion:true` is a trip.
    Motion,
    /// A smoke detector: always a 24h sensor, whatever its zone.
    Smoke,
    /// Anything else (keypad, lux, temperature…): trips on a rising edge; mostly here for its tamper.
    Other,
}

/// One device the alarm listens to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sensor {
    /// The device id.
    pub id: String,
    /// Its alarm zone.
    pub zone: Zone,
    /// What it is.
    pub kind: SensorKind,
}

/// The alarm's configuration (SPEC §4 `[alarm]` and the devices).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlarmConfig {
    /// Time to leave after arming; sensors other than 24h ones are ignored meanwhile.
    pub exit_delay: Duration,
    /// Time to disarm after an entry sensor trips.
    pub entry_delay: Duration,
    /// How long the sirens sound before the alarm returns to its armed mode.
    pub siren: Duration,
    /// Arming needs a valid code too.
    pub code_arm_required: bool,
    /// Every light goes on when the alarm triggers.
    pub lights_on_trigger: bool,
    /// Every device whose state or tamper matters to the alarm.
    pub sensors: Vec<Sensor>,
    /// The ids of every `siren` device.
    pub sirens: Vec<String>,
}

/// An armed mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Nobody home: every zone is watched.
    Away,
    /// Someone home: `interior` is ignored.
    Home,
    /// Asleep: `interior` is ignored.
    Night,
}

impl Mode {
    /// Every mode, for loops in tests and listings.
    pub const ALL: [Mode; 3] = [Mode::Away, Mode::Home, Mode::Night];

    /// `away`, `home` or `night`.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Away => "away",
            Mode::Home => "home",
            Mode::Night => "night",
        }
    }

    /// The mode named `away`, `home` or `night`.
    pub fn from_name(name: &str) -> Option<Mode> {
        Mode::ALL.into_iter().find(|m| m.as_str() == name)
    }

    /// The armed state of this mode.
    pub fn armed(self) -> State {
        match self {
            Mode::Away => State::ArmedAway,
            Mode::Home => State::ArmedHome,
            Mode::Night => State::ArmedNight,
        }
    }
}

/// The alarm's state, as published on `dpi/alarm/state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// Nothing but 24h zones is watched.
    Disarmed,
    /// The exit delay is running; then `mode` is armed.
    Arming {
        /// The mode being armed.
        mode: Mode,
    },
    /// Armed, nobody home.
    ArmedAway,
    /// Armed, someone home.
    ArmedHome,
    /// Armed for the night.
    ArmedNight,
    /// The entry delay is running; then triggered.
    Pending {
        /// The armed mode it returns to after the siren time.
        mode: Mode,
    },
    /// The sirens sound; then back to `mode`.
    Triggered {
        /// The armed mode it returns to, or `None` if it triggered while disarmed.
        mode: Option<Mode>,
    },
}

impl State {
    /// The SPEC's name of the state: `disarmed`, `arming`, `armed_away`, … `triggered`.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Disarmed => "disarmed",
            State::Arming { .. } => "arming",
            State::ArmedAway => "armed_away",
            State::ArmedHome => "armed_home",
            State::ArmedNight => "armed_night",
            State::Pending { .. } => "pending",
            State::Triggered { .. } => "triggered",
        }
    }

    /// The armed mode this state is in, is arming, or returns to; `None` when it returns to disarmed.
    pub fn mode(self) -> Option<Mode> {
        match self {
            State::Disarmed => None,
            State::Arming { mode } | State::Pending { mode } => Some(mode),
            State::ArmedAway => Some(Mode::Away),
            State::ArmedHome => Some(Mode::Home),
            State::ArmedNight => Some(Mode::Night),
            State::Triggered { mode } => mode,
        }
    }

    /// The state named `name` (as [`State::as_str`]) with the mode stored next to it.
    fn from_parts(name: &str, mode: Option<Mode>) -> Result<State, SnapshotError> {
        let needs = |state: fn(Mode) -> State| mode.map(state).ok_or(SnapshotError::MissingMode(name.to_owned()));
        match name {
            "disarmed" => Ok(State::Disarmed),
            "arming" => needs(|mode| State::Arming { mode }),
            "armed_away" => Ok(State::ArmedAway),
            "armed_home" => Ok(State::ArmedHome),
            "armed_night" => Ok(State::ArmedNight),
            "pending" => needs(|mode| State::Pending { mode }),
            "triggered" => Ok(State::Triggered { mode }),
            other => Err(SnapshotError::UnknownState(other.to_owned())),
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a `dpi/alarm/set` asks for (its `action` field).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// `arm_away`, `arm_home`, `arm_night`.
    Arm(Mode),
    /// `disarm`.
    Disarm,
    /// `panic`: trigger now, no code needed.
    Panic,
}

impl Command {
    /// The command for an `action` field (`arm_away`, `arm_home`, `arm_night`, `disarm`, `panic`).
    pub fn from_action(action: &str) -> Option<Command> {
        match action {
            "arm_away" => Some(Command::Arm(Mode::Away)),
            "arm_home" => Some(Command::Arm(Mode::Home)),
            "arm_night" => Some(Command::Arm(Mode::Night)),
            "disarm" => Some(Command::Disarm),
            "panic" => Some(Command::Panic),
            _ => None,
        }
    }
}

/// The driver's verdict on the code that came with a command.
///
/// While code entry is locked out ([`Alarm::code_locked_out`]) the driver need not verify anything: the
/// machine rejects every supplied code with `code_lockout` whatever the verdict; pass `Invalid`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CodeCheck {
    /// The code matches this user's PIN.
    Valid {
        /// The user whose PIN it is.
        user: String,
    },
    /// A code was given and matches nobody (or was not checked during a lockout).
    Invalid,
    /// No code was given.
    Missing,
}

/// Who sent a command, for the `by` of the state and the `user`/`device` of events.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Source {
    /// A resident's MQTT client, by user name.
    User(String),
    /// A keypad, by device id.
    Keypad(String),
    /// `domoticpi alarm …` on the hub itself.
    Cli,
    /// A remote command through the bridge (SPEC §8).
    Bridge,
}

impl Source {
    /// The name used for `by`: the user, the keypad's id, `cli` or `bridge`.
    pub fn name(&self) -> &str {
        match self {
            Source::User(name) | Source::Keypad(name) => name,
            Source::Cli => "cli",
            Source::Bridge => "bridge",
        }
    }

    /// The user it names, if it is a user.
    fn user(&self) -> Option<String> {
        match self {
            Source::User(name) => Some(name.clone()),
            _ => None,
        }
    }

    /// The device it names, if it is a keypad.
    fn device(&self) -> Option<String> {
        match self {
            Source::Keypad(id) => Some(id.clone()),
            _ => None,
        }
    }
}

/// Something that happened, for [`Alarm::handle_event`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Event {
    /// A `dpi/alarm/set` from a resident, a keypad, the CLI or the bridge.
    Command {
        /// What it asks for.
        action: Command,
        /// The driver's verdict on its code.
        code: CodeCheck,
        /// Bypass open entry/perimeter sensors instead of refusing to arm.
        force: bool,
        /// Who sent it.
        by: Source,
    },
    /// A sensor reported its state on `dpi/ID/state`.
    SensorState {
        /// The device id.
        device: String,
        /// Open, motion or smoke: the kind's main field says "something is there".
        tripped: bool,
        /// Its tamper switch is open.
        tamper: bool,
        /// The first report since the device (re)connected, or a retained one replayed at start: it
        /// trips only if it differs from the state the machine remembers.
        first_after_connect: bool,
    },
    /// A device went online or offline (`dpi/ID/availability`).
    Availability {
        /// The device id.
        device: String,
        /// `online` or not.
        online: bool,
    },
}

/// The `event` field of a `dpi/alarm/event` payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// The sirens went on.
    Triggered,
    /// The entry delay started.
    Pending,
    /// An arm command was accepted, or the exit delay ended, or the siren time ended in an armed mode.
    Armed,
    /// A disarm was accepted, or the siren time ended for an alarm that triggered while disarmed.
    Disarmed,
    /// Arming was refused (an open sensor, or the alarm is pending or triggered).
    ArmRefused,
    /// A code was wrong or missing.
    CodeRejected,
    /// Code entry is locked after too many wrong codes.
    CodeLockout,
    /// A sensor's tamper switch opened.
    Tamper,
    /// A sensor went offline while the alarm was not disarmed.
    SensorOffline,
}

impl EventKind {
    /// The SPEC's name: `triggered`, `pending`, `armed`, … `sensor_offline`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Triggered => "triggered",
            EventKind::Pending => "pending",
            EventKind::Armed => "armed",
            EventKind::Disarmed => "disarmed",
            EventKind::ArmRefused => "arm_refused",
            EventKind::CodeRejected => "code_rejected",
            EventKind::CodeLockout => "code_lockout",
            EventKind::Tamper => "tamper",
            EventKind::SensorOffline => "sensor_offline",
        }
    }
}

/// What the driver must do, from [`Alarm::poll_action`], in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Write this snapshot durably; it always comes before the announcements it covers.
    Persist(Snapshot),
    /// Publish `dpi/alarm/state` (retained).
    PublishState {
        /// The new state.
        state: State,
        /// When it was entered, on the monotonic clock (the driver turns it into the RFC 3339 `since`).
        since: Instant,
        /// Who or what caused it: a user, a keypad, `cli`, `bridge`, a sensor's id, or `hub`.
        by: String,
    },
    /// Publish one `dpi/alarm/event` (the driver adds `at`).
    Event {
        /// Its `event` field.
        kind: EventKind,
        /// The device concerned (a sensor, a keypad), if any.
        device: Option<String>,
        /// Why, for people.
        reason: String,
        /// The user concerned (whose code was accepted, or who sent a rejected one), never a code.
        user: Option<String>,
    },
    /// Send `{"on": on}` to this siren on `dpi/ID/set`.
    Siren {
        /// The siren's device id.
        device: String,
        /// Sound or stop.
        on: bool,
    },
    /// Switch every light on (the alarm triggered and `lights_on_trigger` is set).
    AllLightsOn,
}

/// Everything the alarm must not forget across a restart, as plain data for the driver to store.
///
/// Times are durations relative to the `now` it was taken at, because the monotonic clock starts again
/// at every boot.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Snapshot {
    /// The state's name ([`State::as_str`]).
    pub state: String,
    /// The armed mode being armed or returned to (`away`, `home`, `night`), if any.
    pub mode: Option<String>,
    /// Who caused the current state.
    pub by: String,
    /// Who chose the current armed or disarmed mode, the `by` restored after a trigger.
    pub mode_by: String,
    /// Sensors bypassed until the next disarm.
    pub bypassed: Vec<String>,
    /// Time left on the running exit, entry or siren delay.
    pub remaining: Option<Duration>,
    /// Time left on a code lockout.
    pub lockout_remaining: Option<Duration>,
    /// For each recent wrong code, the time until it stops counting towards a lockout.
    pub wrong_codes: Vec<Duration>,
}

/// Why [`Alarm::restore`] could not read a snapshot.
///
/// Hand-written rather than `thiserror`: this crate keeps no dependencies beyond the calendar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotError {
    /// The state is not one of the SPEC's names.
    UnknownState(String),
    /// The mode is not `away`, `home` or `night`.
    UnknownMode(String),
    /// `arming` or `pending` without the mode it arms or returns to.
    MissingMode(String),
}

impl fmt::Display for SnapshotError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SnapshotError::UnknownState(s) => write!(f, "unknown alarm state {s:?}"),
            SnapshotError::UnknownMode(m) => write!(f, "unknown alarm mode {m:?}"),
            SnapshotError::MissingMode(s) => write!(f, "alarm state {s:?} stored without its mode"),
        }
    }
}

impl std::error::Error for SnapshotError {}

/// What the machine knows about one sensor.
#[derive(Debug, Clone)]
struct Tracked {
    /// The zone it acts in (`H24` for any smoke detector).
    zone: Zone,
    /// Decides whether repeated trips count (motion) or only edges.
    kind: SensorKind,
    /// Its last reported main state, the baseline for edges and for refusing to arm.
    tripped: bool,
    /// Its last reported tamper, so one open tamper switch is one trigger.
    tamper: bool,
    /// Its last availability, so `sensor_offline` is raised once per disconnection.
    online: Option<bool>,
}

impl Tracked {
    fn new(sensor: &Sensor) -> Tracked {
        let zone = if sensor.kind == SensorKind::Smoke { Zone::H24 } else { sensor.zone };
        Tracked { zone, kind: sensor.kind, tripped: false, tamper: false, online: None }
    }
}

/// The alarm state machine. See the module documentation.
#[derive(Debug, Clone)]
pub struct Alarm {
    /// Delays, code policy and the sirens to command.
    config: AlarmConfig,
    /// Each listed sensor's zone and last state, by id: trips are decided against it.
    sensors: BTreeMap<String, Tracked>,
    /// The current state.
    state: State,
    /// When the state was entered, for the published `since`.
    since: Instant,
    /// When the exit, entry or siren delay ends; `None` in the other states.
    deadline: Option<Instant>,
    /// Who caused the current state.
    by: String,
    /// Who set the armed/disarmed mode: the `by` when the exit delay or the siren time ends.
    mode_by: String,
    /// Sensors bypassed by `force`, until the next disarm.
    bypassed: BTreeSet<String>,
    /// When each recent wrong code stops counting, oldest first.
    wrong_codes: VecDeque<Instant>,
    /// Until when code entry is locked.
    locked_until: Option<Instant>,
    /// Actions not yet taken by the driver.
    actions: VecDeque<Action>,
}

impl Alarm {
    /// A disarmed alarm for a fresh install; queues its first `Persist` and `PublishState`.
    pub fn new(config: AlarmConfig, now: Instant) -> Alarm {
        let mut alarm = Alarm::blank(config, now);
        alarm.announce();
        alarm
    }

    /// The alarm as it was when `snapshot` was taken, its delays resumed from `now` with the time that
    /// was left. Queues `Persist`, `PublishState` and, if triggered, the sirens (and lights) again.
    pub fn restore(config: AlarmConfig, snapshot: &Snapshot, now: Instant) -> Result<Alarm, SnapshotError> {
        let mode = match &snapshot.mode {
            None => None,
            Some(name) => Some(Mode::from_name(name).ok_or_else(|| SnapshotError::UnknownMode(name.clone()))?),
        };
        let state = State::from_parts(&snapshot.state, mode)?;
        let mut alarm = Alarm::blank(config, now);
        alarm.state = state;
        alarm.by = snapshot.by.clone();
        alarm.mode_by = snapshot.mode_by.clone();
        alarm.bypassed = snapshot.bypassed.iter().cloned().collect();
        // A delay state stored without its time left (not written by `snapshot`) gets its full delay.
        alarm.deadline = alarm.delay_of(state).map(|full| now + snapshot.remaining.unwrap_or(full));
        alarm.locked_until = snapshot.lockout_remaining.map(|left| now + left);
        let mut expiries: Vec<Instant> = snapshot.wrong_codes.iter().map(|left| now + *left).collect();
        expiries.sort();
        alarm.wrong_codes = expiries.into();
        alarm.announce();
        if let State::Triggered { .. } = state {
            alarm.sound();
        }
        Ok(alarm)
    }

    /// Replaces the configuration (a SIGHUP reload), keeping the state, its deadline and what is known
    /// about sensors that are still listed.
    pub fn reconfigure(&mut self, config: AlarmConfig) {
        let old = std::mem::take(&mut self.sensors);
        self.sensors = tracked(&config.sensors);
        for (id, t) in &mut self.sensors {
            if let Some(before) = old.get(id) {
                t.tripped = before.tripped;
                t.tamper = before.tamper;
                t.online = before.online;
            }
        }
        self.config = config;
    }

    /// Sets a sensor's remembered state without tripping anything: at start, from the store.
    pub fn seed_sensor(&mut self, device: &str, tripped: bool, tamper: bool) {
        if let Some(t) = self.sensors.get_mut(device) {
            t.tripped = tripped;
            t.tamper = tamper;
        }
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// Who caused the current state.
    pub fn by(&self) -> &str {
        &self.by
    }

    /// The sensors bypassed until the next disarm, sorted.
    pub fn bypassed(&self) -> impl Iterator<Item = &str> {
        self.bypassed.iter().map(String::as_str)
    }

    /// Whether code entry is locked at `now`: the driver may then skip verifying codes.
    pub fn code_locked_out(&self, now: Instant) -> bool {
        self.locked_until.is_some_and(|until| now < until)
    }

    /// Everything to persist, with times relative to `now`.
    pub fn snapshot(&self, now: Instant) -> Snapshot {
        Snapshot {
            state: self.state.as_str().to_owned(),
            mode: self.state.mode().map(|m| m.as_str().to_owned()),
            by: self.by.clone(),
            mode_by: self.mode_by.clone(),
            bypassed: self.bypassed.iter().cloned().collect(),
            remaining: self.deadline.map(|d| d.saturating_duration_since(now)),
            lockout_remaining: self.locked_until.filter(|u| now < *u).map(|u| u.saturating_duration_since(now)),
            wrong_codes: self
                .wrong_codes
                .iter()
                .filter(|e| now < **e)
                .map(|e| e.saturating_duration_since(now))
                .collect(),
        }
    }

    /// Feeds one event in; the consequences come out of [`Alarm::poll_action`].
    pub fn handle_event(&mut self, event: Event, now: Instant) {
        match event {
            Event::Command { action, code, force, by } => self.on_command(action, code, force, &by, now),
            Event::SensorState { device, tripped, tamper, first_after_connect } => {
                self.on_sensor(&device, tripped, tamper, first_after_connect, now)
            }
            Event::Availability { device, online } => self.on_availability(&device, online),
        }
    }

    /// Fires the delay that has ended by `now`, if any: exit ⇒ armed, entry ⇒ triggered, siren ⇒ back.
    pub fn handle_timeout(&mut self, now: Instant) {
        // Terminates: the state a siren time ends in has no deadline.
        while let Some(deadline) = self.deadline {
            if now < deadline {
                return;
            }
            match self.state {
                State::Arming { mode } => {
                    let by = self.mode_by.clone();
                    self.enter(mode.armed(), by, now);
                    self.event(EventKind::Armed, None, format!("exit delay ended: {}", mode.armed()), None);
                }
                State::Pending { .. } => {
                    let device = self.by.clone();
                    self.trigger(device.clone(), now);
                    self.event(EventKind::Triggered, Some(device), "entry delay ended".to_owned(), None);
                }
                State::Triggered { mode } => {
                    let back = mode.map_or(State::Disarmed, Mode::armed);
                    let by = self.mode_by.clone();
                    self.enter(back, by, now);
                    let kind = if mode.is_some() { EventKind::Armed } else { EventKind::Disarmed };
                    self.event(kind, None, format!("siren time ended: back to {back}"), None);
                }
                State::Disarmed | State::ArmedAway | State::ArmedHome | State::ArmedNight => self.deadline = None,
            }
        }
    }

    /// The next action for the driver, in order.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`Alarm::handle_timeout`] must next be called, if a delay is running.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadline
    }

    fn blank(config: AlarmConfig, now: Instant) -> Alarm {
        Alarm {
            sensors: tracked(&config.sensors),
            config,
            state: State::Disarmed,
            since: now,
            deadline: None,
            by: HUB.to_owned(),
            mode_by: HUB.to_owned(),
            bypassed: BTreeSet::new(),
            wrong_codes: VecDeque::new(),
            locked_until: None,
            actions: VecDeque::new(),
        }
    }

    /// The full delay a state runs for, if it has one.
    fn delay_of(&self, state: State) -> Option<Duration> {
        match state {
            State::Arming { .. } => Some(self.config.exit_delay),
            State::Pending { .. } => Some(self.config.entry_delay),
            State::Triggered { .. } => Some(self.config.siren),
            State::Disarmed | State::ArmedAway | State::ArmedHome | State::ArmedNight => None,
        }
    }

    /// Queues `Persist` then `PublishState` for the current state.
    fn announce(&mut self) {
        let snapshot = self.snapshot(self.since);
        self.actions.push_back(Action::Persist(snapshot));
        self.actions.push_back(Action::PublishState { state: self.state, since: self.since, by: self.by.clone() });
    }

    /// Every siren on, and the lights if configured.
    fn sound(&mut self) {
        self.sirens(true);
        if self.config.lights_on_trigger {
            self.actions.push_back(Action::AllLightsOn);
        }
    }

    fn sirens(&mut self, on: bool) {
        for device in &self.config.sirens {
            self.actions.push_back(Action::Siren { device: device.clone(), on });
        }
    }

    /// Moves to `state` (skipping a delay of zero), starts its delay and announces it.
    fn enter(&mut self, state: State, by: String, now: Instant) {
        let state = match (state, self.delay_of(state)) {
            (State::Arming { mode }, Some(d)) if d.is_zero() => mode.armed(),
            (State::Pending { mode }, Some(d)) if d.is_zero() => State::Triggered { mode: Some(mode) },
            _ => state,
        };
        let was_triggered = matches!(self.state, State::Triggered { .. });
        self.state = state;
        self.since = now;
        self.by = by;
        self.deadline = self.delay_of(state).map(|d| now + d);
        self.announce();
        match (was_triggered, matches!(state, State::Triggered { .. })) {
            (false, true) => self.sound(),
            (true, false) => self.sirens(false),
            _ => {}
        }
    }

    /// Triggers now, remembering the armed mode to return to.
    fn trigger(&mut self, by: String, now: Instant) {
        let mode = self.state.mode();
        self.enter(State::Triggered { mode }, by, now);
    }

    fn event(&mut self, kind: EventKind, device: Option<String>, reason: String, user: Option<String>) {
        self.actions.push_back(Action::Event { kind, device, reason, user });
    }

    fn on_command(&mut self, action: Command, code: CodeCheck, force: bool, source: &Source, now: Instant) {
        let required = match action {
            Command::Panic => {
                if !matches!(self.state, State::Triggered { .. }) {
                    self.trigger(source.name().to_owned(), now);
                    let why = format!("panic from {}", source.name());
                    self.event(EventKind::Triggered, source.device(), why, source.user());
                }
                return;
            }
            Command::Disarm => true,
            Command::Arm(_) => self.config.code_arm_required,
        };
        let Verdict::Accepted(user) = self.check_code(code, required, source, now) else {
            return;
        };
        let by = user.clone().unwrap_or_else(|| source.name().to_owned());
        let device = source.device();
        match action {
            Command::Disarm if self.state == State::Disarmed => {
                self.event(EventKind::Disarmed, device, "already disarmed".to_owned(), user);
            }
            Command::Disarm => {
                let from = self.state;
                self.bypassed.clear();
                self.mode_by = by.clone();
                self.enter(State::Disarmed, by, now);
                self.event(EventKind::Disarmed, device, format!("disarmed from {from}"), user);
            }
            Command::Arm(mode) => self.arm(mode, force, by, device, user, now),
            Command::Panic => {}
        }
    }

    fn arm(&mut self, mode: Mode, force: bool, by: String, device: Option<String>, user: Option<String>, now: Instant) {
        let refusal = match self.state {
            State::Pending { .. } | State::Triggered { .. } => {
                Some((EventKind::ArmRefused, format!("alarm is {}: disarm first", self.state)))
            }
            State::Arming { mode: m } if m == mode => {
                Some((EventKind::Armed, format!("already arming {}", mode.armed())))
            }
            s if s == mode.armed() => Some((EventKind::Armed, format!("already {s}"))),
            _ => None,
        };
        if let Some((kind, why)) = refusal {
            self.event(kind, device, why, user);
            return;
        }
        let open: Vec<String> = self
            .sensors
            .iter()
            .filter(|(id, t)| {
                t.tripped && matches!(t.zone, Zone::Entry | Zone::Perimeter) && !self.bypassed.contains(*id)
            })
            .map(|(id, _)| id.clone())
            .collect();
        if !open.is_empty() && !force {
            let why = format!("open: {}", open.join(", "));
            self.event(EventKind::ArmRefused, open.first().cloned(), why, user);
            return;
        }
        // Who armed is said even when no code named a user (arming needs none by default).
        let mut why = match self.config.exit_delay.as_secs() {
            0 => format!("{} accepted from {by}", mode.armed()),
            s => format!("{} accepted from {by}, exit delay {s} s", mode.armed()),
        };
        if !open.is_empty() {
            why.push_str(&format!(", bypassing {}", open.join(", ")));
        }
        self.bypassed.extend(open);
        self.mode_by = by.clone();
        self.enter(State::Arming { mode }, by, now);
        self.event(EventKind::Armed, device, why, user);
    }

    /// Applies the code policy; on refusal the events (and a `Persist` for a counted wrong code) are queued.
    fn check_code(&mut self, code: CodeCheck, required: bool, source: &Source, now: Instant) -> Verdict {
        if !required && code == CodeCheck::Missing {
            return Verdict::Accepted(None);
        }
        if let Some(until) = self.locked_until {
            if now < until {
                let left = until.saturating_duration_since(now).as_secs();
                let why = format!("code entry locked for {left} s more");
                self.event(EventKind::CodeLockout, source.device(), why, source.user());
                return Verdict::Refused;
            }
            self.locked_until = None;
        }
        match code {
            CodeCheck::Valid { user } => Verdict::Accepted(Some(user)),
            CodeCheck::Missing => {
                self.event(EventKind::CodeRejected, source.device(), "code required".to_owned(), source.user());
                Verdict::Refused
            }
            CodeCheck::Invalid => {
                while self.wrong_codes.front().is_some_and(|expiry| *expiry <= now) {
                    self.wrong_codes.pop_front();
                }
                self.wrong_codes.push_back(now + WRONG_CODE_WINDOW);
                let count = self.wrong_codes.len();
                let locked = count >= WRONG_CODES_BEFORE_LOCKOUT;
                if locked {
                    self.wrong_codes.clear();
                    self.locked_until = Some(now + LOCKOUT);
                }
                self.actions.push_back(Action::Persist(self.snapshot(now)));
                let why = format!("wrong code ({count} in {} s)", WRONG_CODE_WINDOW.as_secs());
                self.event(EventKind::CodeRejected, source.device(), why, source.user());
                if locked {
                    let why = format!("{count} wrong codes: code entry locked for {} s", LOCKOUT.as_secs());
                    self.event(EventKind::CodeLockout, source.device(), why, source.user());
                }
                Verdict::Refused
            }
        }
    }

    fn on_sensor(&mut self, device: &str, tripped: bool, tamper: bool, first_after_connect: bool, now: Instant) {
        let Some(t) = self.sensors.get_mut(device) else {
            return;
        };
        let was = (t.tripped, t.tamper);
        t.tripped = tripped;
        t.tamper = tamper;
        let (zone, kind) = (t.zone, t.kind);
        if tamper && !was.1 {
            if !matches!(self.state, State::Triggered { .. }) {
                self.trigger(device.to_owned(), now);
                self.event(EventKind::Triggered, Some(device.to_owned()), "tamper (24h)".to_owned(), None);
            }
            self.event(EventKind::Tamper, Some(device.to_owned()), "tamper switch opened".to_owned(), None);
            return;
        }
        let trips = tripped && (!was.0 || (kind == SensorKind::Motion && !first_after_connect));
        if !trips || (zone != Zone::H24 && self.bypassed.contains(device)) {
            return;
        }
        match effect(self.state, zone) {
            Effect::Ignore => {}
            Effect::Pending(mode) => {
                self.enter(State::Pending { mode }, device.to_owned(), now);
                // An entry delay of zero goes straight to triggered.
                let kind =
                    if self.state == (State::Pending { mode }) { EventKind::Pending } else { EventKind::Triggered };
                let why = format!("entry zone, entry delay {} s", self.config.entry_delay.as_secs());
                self.event(kind, Some(device.to_owned()), why, None);
            }
            Effect::Trigger => {
                let why = format!("{} zone while {}", zone.as_str(), self.state);
                self.trigger(device.to_owned(), now);
                self.event(EventKind::Triggered, Some(device.to_owned()), why, None);
            }
        }
    }

    fn on_availability(&mut self, device: &str, online: bool) {
        if online && self.config.sirens.iter().any(|s| s == device) {
            let on = matches!(self.state, State::Triggered { .. });
            self.actions.push_back(Action::Siren { device: device.to_owned(), on });
        }
        let Some(t) = self.sensors.get_mut(device) else {
            return;
        };
        let was = t.online.replace(online);
        if !online && was != Some(false) && self.state != State::Disarmed {
            let why = format!("went offline while {}", self.state);
            self.event(EventKind::SensorOffline, Some(device.to_owned()), why, None);
        }
    }
}

fn tracked(sensors: &[Sensor]) -> BTreeMap<String, Tracked> {
    sensors.iter().map(|s| (s.id.clone(), Tracked::new(s))).collect()
}

/// The outcome of the code policy for one command.
enum Verdict {
    /// Go ahead; the user whose valid code came with it, if any.
    Accepted(Option<String>),
    /// Refused; the events saying why are queued.
    Refused,
}

/// What a trip does.
enum Effect {
    /// Nothing in this state.
    Ignore,
    /// Start the entry delay, returning to this mode.
    Pending(Mode),
    /// Trigger now.
    Trigger,
}

/// The zone table of SPEC §7, with the choices of the module documentation for arming and pending.
fn effect(state: State, zone: Zone) -> Effect {
    match (state, zone) {
        (_, Zone::None) | (State::Triggered { .. }, _) => Effect::Ignore,
        (_, Zone::H24) => Effect::Trigger,
        (State::Disarmed | State::Arming { .. }, _) => Effect::Ignore,
        (State::Pending { .. }, Zone::Perimeter) => Effect::Trigger,
        (State::Pending { .. }, Zone::Entry | Zone::Interior) => Effect::Ignore,
        (State::ArmedAway, Zone::Entry) => Effect::Pending(Mode::Away),
        (State::ArmedHome, Zone::Entry) => Effect::Pending(Mode::Home),
        (State::ArmedNight, Zone::Entry) => Effect::Pending(Mode::Night),
        (State::ArmedAway, Zone::Perimeter | Zone::Interior) => Effect::Trigger,
        (State::ArmedHome | State::ArmedNight, Zone::Perimeter) => Effect::Trigger,
        (State::ArmedHome | State::ArmedNight, Zone::Interior) => Effect::Ignore,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOOR: &str = "front-door"; // contact, entry
    const WINDOW: &str = "back-window"; // contact, perimeter
    const GARAGE: &str = "garage-door"; // contact, perimeter
    const HALL: &str = "hall-motion"; // motion, interior
    const SMOKE: &str = "kitchen-smoke"; // smoke, zone none: still 24h
    const KEYPAD: &str = "hall-keypad"; // other, zone none
    const SIREN: &str = "siren-1";
    const SIREN2: &str = "siren-2";
    const T0: Instant = Instant(1_000_000);

    const DISARMED: State = State::Disarmed;
    const ARMING_AWAY: State = State::Arming { mode: Mode::Away };
    const ARMING_HOME: State = State::Arming { mode: Mode::Home };
    const AWAY: State = State::ArmedAway;
    const HOME: State = State::ArmedHome;
    const NIGHT: State = State::ArmedNight;
    const PENDING_AWAY: State = State::Pending { mode: Mode::Away };
    const PENDING_HOME: State = State::Pending { mode: Mode::Home };
    const PENDING_NIGHT: State = State::Pending { mode: Mode::Night };
    const TRIGGERED_AWAY: State = State::Triggered { mode: Some(Mode::Away) };
    const TRIGGERED_HOME: State = State::Triggered { mode: Some(Mode::Home) };
    const TRIGGERED_NIGHT: State = State::Triggered { mode: Some(Mode::Night) };
    const TRIGGERED_NONE: State = State::Triggered { mode: None };

    fn all_states() -> Vec<State> {
        let mut states = vec![DISARMED, TRIGGERED_NONE];
        for m in Mode::ALL {
            states.extend([State::Arming { mode: m }, m.armed(), State::Pending { mode: m }]);
            states.push(State::Triggered { mode: Some(m) });
        }
        states
    }

    fn sensor(id: &str, zone: Zone, kind: SensorKind) -> Sensor {
        Sensor { id: id.to_owned(), zone, kind }
    }

    fn config() -> AlarmConfig {
        AlarmConfig {
            exit_delay: Duration::from_secs(30),
            entry_delay: Duration::from_secs(30),
            siren: Duration::from_secs(180),
            code_arm_required: false,
            lights_on_trigger: true,
            sensors: vec![
                sensor(DOOR, Zone::Entry, SensorKind::Contact),
                sensor(WINDOW, Zone::Perimeter, SensorKind::Contact),
                sensor(GARAGE, Zone::Perimeter, SensorKind::Contact),
                sensor(HALL, Zone::Interior, SensorKind::Motion),
                sensor(SMOKE, Zone::None, SensorKind::Smoke),
                sensor(KEYPAD, Zone::None, SensorKind::Other),
            ],
            sirens: vec![SIREN.to_owned(), SIREN2.to_owned()],
        }
    }

    /// One thing that happens to the alarm in a test.
    #[derive(Debug, Clone)]
    enum Step {
        Do(Event),
        Wait(u64),
        Jump,
        Seed(&'static str, bool),
    }

    // Every helper returns a Vec so that a table line can splice repeated steps (`times(5, ..)`).
    fn command(action: Command, code: CodeCheck, force: bool) -> Vec<Step> {
        vec![Step::Do(Event::Command { action, code, force, by: Source::Keypad(KEYPAD.to_owned()) })]
    }
    fn good() -> CodeCheck {
        CodeCheck::Valid { user: "alice".to_owned() }
    }
    const BAD: CodeCheck = CodeCheck::Invalid;
    const NONE: CodeCheck = CodeCheck::Missing;
    fn arm(mode: Mode) -> Vec<Step> {
        command(Command::Arm(mode), NONE, false)
    }
    fn arm_code(mode: Mode, code: CodeCheck) -> Vec<Step> {
        command(Command::Arm(mode), code, false)
    }
    fn arm_force(mode: Mode) -> Vec<Step> {
        command(Command::Arm(mode), NONE, true)
    }
    fn disarm(code: CodeCheck) -> Vec<Step> {
        command(Command::Disarm, code, false)
    }
    fn panic() -> Vec<Step> {
        command(Command::Panic, NONE, false)
    }
    fn report(device: &str, tripped: bool, tamper: bool, first_after_connect: bool) -> Vec<Step> {
        vec![Step::Do(Event::SensorState { device: device.to_owned(), tripped, tamper, first_after_connect })]
    }
    fn open(device: &str) -> Vec<Step> {
        report(device, true, false, false)
    }
    fn close(device: &str) -> Vec<Step> {
        report(device, false, false, false)
    }
    fn tamper(device: &str) -> Vec<Step> {
        report(device, false, true, false)
    }
    fn replay(device: &str, tripped: bool) -> Vec<Step> {
        report(device, tripped, false, true)
    }
    fn seed(device: &'static str, tripped: bool) -> Vec<Step> {
        vec![Step::Seed(device, tripped)]
    }
    fn availability(device: &str, online: bool) -> Vec<Step> {
        vec![Step::Do(Event::Availability { device: device.to_owned(), online })]
    }
    fn offline(device: &str) -> Vec<Step> {
        availability(device, false)
    }
    fn online(device: &str) -> Vec<Step> {
        availability(device, true)
    }
    fn wait(secs: u64) -> Vec<Step> {
        vec![Step::Wait(secs)]
    }
    fn jump() -> Vec<Step> {
        vec![Step::Jump]
    }
    fn times(n: usize, steps: Vec<Step>) -> Vec<Step> {
        steps.iter().cloned().cycle().take(n * steps.len()).collect()
    }

    /// An alarm, a fake clock, and every action it has asked for.
    struct Harness {
        alarm: Alarm,
        now: Instant,
        log: Vec<Action>,
    }

    impl Harness {
        fn new(config: AlarmConfig) -> Harness {
            let mut h = Harness { alarm: Alarm::new(config, T0), now: T0, log: Vec::new() };
            h.drain();
            h.log.clear();
            h
        }

        /// A fresh alarm driven into `state` by ordinary events, its log cleared.
        fn in_state(state: State, config: AlarmConfig) -> Harness {
            let mut h = Harness::new(config);
            let armed = |m: Mode| [arm_code(m, good()), jump()].concat();
            let steps = match state {
                State::Disarmed => vec![],
                State::Arming { mode } => arm_code(mode, good()),
                State::ArmedAway | State::ArmedHome | State::ArmedNight => armed(state.mode().unwrap()),
                State::Pending { mode } => [armed(mode), open(DOOR)].concat(),
                State::Triggered { mode: Some(mode) } => [armed(mode), open(WINDOW)].concat(),
                State::Triggered { mode: None } => open(SMOKE),
            };
            h.run(&steps);
            assert_eq!(h.alarm.state(), state, "could not reach {state:?}");
            h.log.clear();
            h
        }

        /// Takes every queued action, checking that a batch that persists starts by persisting and that
        /// every `PublishState` follows a `Persist` of the same state.
        fn drain(&mut self) {
            let batch: Vec<Action> = std::iter::from_fn(|| self.alarm.poll_action()).collect();
            assert_persisted_first(&batch);
            self.log.extend(batch);
        }

        fn run(&mut self, steps: &[Step]) {
            for step in steps {
                match step {
                    Step::Do(event) => self.alarm.handle_event(event.clone(), self.now),
                    Step::Wait(secs) => self.advance(Duration::from_secs(*secs)),
                    Step::Jump => {
                        if let Some(deadline) = self.alarm.poll_timeout() {
                            self.now = deadline;
                            self.alarm.handle_timeout(self.now);
                        }
                    }
                    Step::Seed(device, tripped) => self.alarm.seed_sensor(device, *tripped, false),
                }
                self.drain();
            }
        }

        /// Moves the clock on like a driver would: waking at each deadline on the way.
        fn advance(&mut self, by: Duration) {
            let until = self.now + by;
            while let Some(deadline) = self.alarm.poll_timeout().filter(|d| *d <= until) {
                self.now = deadline;
                self.alarm.handle_timeout(self.now);
                self.drain();
            }
            self.now = until;
        }

        /// The kinds of the events published, space-separated.
        fn events(&self) -> String {
            let kinds: Vec<&str> = self
                .log
                .iter()
                .filter_map(|a| match a {
                    Action::Event { kind, .. } => Some(kind.as_str()),
                    _ => None,
                })
                .collect();
            kinds.join(" ")
        }

        /// The commands sent to `siren-1`, space-separated.
        fn siren(&self) -> String {
            let commands: Vec<&str> = self
                .log
                .iter()
                .filter_map(|a| match a {
                    Action::Siren { device, on } if device == SIREN => Some(if *on { "on" } else { "off" }),
                    _ => None,
                })
                .collect();
            commands.join(" ")
        }

        fn published(&self) -> Vec<(State, String)> {
            self.log
                .iter()
                .filter_map(|a| match a {
                    Action::PublishState { state, by, .. } => Some((*state, by.clone())),
                    _ => None,
                })
                .collect()
        }
    }

    fn assert_persisted_first(batch: &[Action]) {
        if batch.iter().any(|a| matches!(a, Action::Persist(_))) {
            assert!(matches!(batch[0], Action::Persist(_)), "a batch announced before persisting: {batch:#?}");
        }
        let mut persisted: Option<&Snapshot> = None;
        for action in batch {
            match action {
                Action::Persist(snapshot) => persisted = Some(snapshot),
                Action::PublishState { state, by, .. } => {
                    let snapshot = persisted.take().expect("PublishState without a Persist before it");
                    assert_eq!(snapshot.state, state.as_str());
                    assert_eq!(&snapshot.by, by);
                }
                Action::Event { .. } | Action::Siren { .. } | Action::AllLightsOn => {}
            }
        }
    }

    /// `"code_rejected*3 armed"` ⇒ `"code_rejected code_rejected code_rejected armed"`.
    fn expand(expected: &str) -> String {
        let words: Vec<String> = expected
            .split_whitespace()
            .flat_map(|word| match word.split_once('*') {
                Some((kind, n)) => vec![kind.to_owned(); n.parse().unwrap()],
                None => vec![word.to_owned()],
            })
            .collect();
        words.join(" ")
    }

    fn check(from: State, steps: Vec<Step>, to: State, siren: &str, events: &str) {
        let mut h = Harness::in_state(from, config());
        h.run(&steps);
        assert_eq!(h.alarm.state(), to, "state; log: {:#?}", h.log);
        assert_eq!(h.siren(), siren, "siren commands; log: {:#?}", h.log);
        assert_eq!(h.events(), expand(events), "events; log: {:#?}", h.log);
    }

    /// One line per case: start state, steps => end state, commands to `siren-1`, event kinds.
    macro_rules! table {
        ($($name:ident: $from:expr, [$($step:expr),* $(,)?] => $to:expr, siren $siren:literal, events $events:literal;)+) => {
            $(
                #[test]
                fn $name() {
                    check($from, [$($step),*].concat(), $to, $siren, $events);
                }
            )+
        };
    }

    table! {
        // disarmed
        disarmed_arm_away_without_code_starts_exit_delay: DISARMED, [arm(Mode::Away)] => ARMING_AWAY, siren "", events "armed";
        disarmed_arm_away_29s_still_arming: DISARMED, [arm(Mode::Away), wait(29)] => ARMING_AWAY, siren "", events "armed";
        disarmed_arm_away_30s_armed: DISARMED, [arm(Mode::Away), wait(30)] => AWAY, siren "", events "armed armed";
        disarmed_arm_home_exit_delay_ends_armed_home: DISARMED, [arm(Mode::Home), jump()] => HOME, siren "", events "armed armed";
        disarmed_arm_night_exit_delay_ends_armed_night: DISARMED, [arm(Mode::Night), jump()] => NIGHT, siren "", events "armed armed";
        disarmed_arm_with_good_code: DISARMED, [arm_code(Mode::Away, good())] => ARMING_AWAY, siren "", events "armed";
        disarmed_arm_with_wrong_code_refused_even_if_not_required: DISARMED, [arm_code(Mode::Away, BAD)] => DISARMED, siren "", events "code_rejected";
        disarmed_entry_door_open_arm_refused: DISARMED, [open(DOOR), arm(Mode::Away)] => DISARMED, siren "", events "arm_refused";
        disarmed_perimeter_window_open_arm_night_refused: DISARMED, [open(WINDOW), arm(Mode::Night)] => DISARMED, siren "", events "arm_refused";
        disarmed_door_open_then_closed_arms: DISARMED, [open(DOOR), close(DOOR), arm(Mode::Away)] => ARMING_AWAY, siren "", events "armed";
        disarmed_door_open_force_arms: DISARMED, [open(DOOR), arm_force(Mode::Away), jump()] => AWAY, siren "", events "armed armed";
        disarmed_motion_does_not_block_arming: DISARMED, [open(HALL), arm(Mode::Away)] => ARMING_AWAY, siren "", events "armed";
        disarmed_door_opens_ignored: DISARMED, [open(DOOR)] => DISARMED, siren "", events "";
        disarmed_window_opens_ignored: DISARMED, [open(WINDOW)] => DISARMED, siren "", events "";
        disarmed_motion_ignored: DISARMED, [open(HALL), open(HALL)] => DISARMED, siren "", events "";
        disarmed_smoke_triggers: DISARMED, [open(SMOKE)] => TRIGGERED_NONE, siren "on", events "triggered";
        disarmed_smoke_siren_ends_back_to_disarmed: DISARMED, [open(SMOKE), wait(180)] => DISARMED, siren "on off", events "triggered disarmed";
        disarmed_smoke_179s_still_sounding: DISARMED, [open(SMOKE), wait(179)] => TRIGGERED_NONE, siren "on", events "triggered";
        disarmed_tamper_triggers: DISARMED, [tamper(HALL)] => TRIGGERED_NONE, siren "on", events "triggered tamper";
        disarmed_keypad_tamper_triggers: DISARMED, [tamper(KEYPAD)] => TRIGGERED_NONE, siren "on", events "triggered tamper";
        disarmed_panic_triggers: DISARMED, [panic()] => TRIGGERED_NONE, siren "on", events "triggered";
        disarmed_disarm_good_code_changes_nothing: DISARMED, [disarm(good())] => DISARMED, siren "", events "disarmed";
        disarmed_disarm_wrong_code_rejected: DISARMED, [disarm(BAD)] => DISARMED, siren "", events "code_rejected";
        disarmed_disarm_without_code_rejected: DISARMED, [disarm(NONE)] => DISARMED, siren "", events "code_rejected";
        disarmed_sensor_offline_not_reported: DISARMED, [offline(DOOR)] => DISARMED, siren "", events "";
        disarmed_siren_reconnects_told_off: DISARMED, [offline(SIREN), online(SIREN)] => DISARMED, siren "off", events "";
        disarmed_unknown_device_ignored: DISARMED, [open("nobody"), tamper("nobody"), offline("nobody")] => DISARMED, siren "", events "";

        // arming (exit delay)
        arming_door_opens_ignored: ARMING_AWAY, [open(DOOR)] => ARMING_AWAY, siren "", events "";
        arming_window_opens_ignored: ARMING_AWAY, [open(WINDOW)] => ARMING_AWAY, siren "", events "";
        arming_motion_ignored: ARMING_AWAY, [open(HALL)] => ARMING_AWAY, siren "", events "";
        arming_door_left_open_is_no_trip_when_armed: ARMING_AWAY, [open(DOOR), jump()] => AWAY, siren "", events "armed";
        arming_door_left_open_then_reopened_goes_pending: ARMING_AWAY, [open(DOOR), jump(), close(DOOR), open(DOOR)] => PENDING_AWAY, siren "", events "armed pending";
        arming_smoke_triggers_then_back_to_armed: ARMING_AWAY, [open(SMOKE), jump()] => AWAY, siren "on off", events "triggered armed";
        arming_tamper_triggers: ARMING_HOME, [tamper(DOOR)] => TRIGGERED_HOME, siren "on", events "triggered tamper";
        arming_panic_triggers: ARMING_AWAY, [panic()] => TRIGGERED_AWAY, siren "on", events "triggered";
        arming_disarm_good_code: ARMING_AWAY, [disarm(good())] => DISARMED, siren "", events "disarmed";
        arming_disarm_wrong_code: ARMING_AWAY, [disarm(BAD)] => ARMING_AWAY, siren "", events "code_rejected";
        arming_sensor_offline_reported: ARMING_AWAY, [offline(DOOR)] => ARMING_AWAY, siren "", events "sensor_offline";
        arming_same_mode_again_keeps_exit_delay: ARMING_AWAY, [wait(20), arm(Mode::Away), wait(10)] => AWAY, siren "", events "armed armed";
        arming_other_mode_restarts_exit_delay: ARMING_AWAY, [wait(20), arm(Mode::Home), wait(10)] => ARMING_HOME, siren "", events "armed";
        arming_home_ignores_door: ARMING_HOME, [open(DOOR)] => ARMING_HOME, siren "", events "";

        // armed_away
        away_entry_door_29s_disarm_good_code_no_siren: AWAY, [open(DOOR), wait(29), disarm(good())] => DISARMED, siren "", events "pending disarmed";
        away_entry_door_nobody_disarms_siren_at_30s: AWAY, [open(DOOR), wait(30)] => TRIGGERED_AWAY, siren "on", events "pending triggered";
        away_entry_door_siren_time_ends_back_to_away: AWAY, [open(DOOR), wait(30), wait(180)] => AWAY, siren "on off", events "pending triggered armed";
        away_entry_door_wrong_code_then_siren: AWAY, [open(DOOR), disarm(BAD), wait(30)] => TRIGGERED_AWAY, siren "on", events "pending code_rejected triggered";
        away_window_triggers_at_once: AWAY, [open(WINDOW)] => TRIGGERED_AWAY, siren "on", events "triggered";
        away_motion_triggers_at_once: AWAY, [open(HALL)] => TRIGGERED_AWAY, siren "on", events "triggered";
        away_smoke_triggers: AWAY, [open(SMOKE)] => TRIGGERED_AWAY, siren "on", events "triggered";
        away_tamper_triggers: AWAY, [tamper(WINDOW)] => TRIGGERED_AWAY, siren "on", events "triggered tamper";
        away_panic_triggers: AWAY, [panic()] => TRIGGERED_AWAY, siren "on", events "triggered";
        away_door_closing_ignored: AWAY, [close(DOOR)] => AWAY, siren "", events "";
        away_zone_none_sensor_ignored: AWAY, [open(KEYPAD)] => AWAY, siren "", events "";
        away_disarm_good_code: AWAY, [disarm(good())] => DISARMED, siren "", events "disarmed";
        away_disarm_wrong_code: AWAY, [disarm(BAD)] => AWAY, siren "", events "code_rejected";
        away_disarm_without_code: AWAY, [disarm(NONE)] => AWAY, siren "", events "code_rejected";
        away_sensor_offline_reported: AWAY, [offline(DOOR)] => AWAY, siren "", events "sensor_offline";
        away_sensor_offline_twice_reported_once: AWAY, [offline(DOOR), offline(DOOR)] => AWAY, siren "", events "sensor_offline";
        away_sensor_offline_again_after_online: AWAY, [offline(DOOR), online(DOOR), offline(DOOR)] => AWAY, siren "", events "sensor_offline*2";
        away_siren_offline_is_no_sensor_offline: AWAY, [offline(SIREN)] => AWAY, siren "", events "";
        away_arm_home_rearms_through_exit_delay: AWAY, [arm(Mode::Home)] => ARMING_HOME, siren "", events "armed";
        away_arm_away_again_changes_nothing: AWAY, [arm(Mode::Away)] => AWAY, siren "", events "armed";
        away_door_reconnects_closed_no_trip: AWAY, [offline(DOOR), replay(DOOR, false)] => AWAY, siren "", events "sensor_offline";
        away_door_reconnects_open_differs_from_stored_trips: AWAY, [offline(DOOR), replay(DOOR, true)] => PENDING_AWAY, siren "", events "sensor_offline pending";
        away_motion_replayed_same_as_stored_no_trip: AWAY, [seed(HALL, true), replay(HALL, true)] => AWAY, siren "", events "";
        away_motion_replayed_differs_from_stored_trips: AWAY, [seed(HALL, false), replay(HALL, true)] => TRIGGERED_AWAY, siren "on", events "triggered";
        away_motion_live_repeat_trips: AWAY, [seed(HALL, true), open(HALL)] => TRIGGERED_AWAY, siren "on", events "triggered";
        away_door_republished_open_after_siren_no_retrigger: AWAY, [open(DOOR), jump(), jump(), open(DOOR)] => AWAY, siren "on off", events "pending triggered armed";

        // armed_home / armed_night
        home_motion_ignored: HOME, [open(HALL)] => HOME, siren "", events "";
        night_motion_ignored: NIGHT, [open(HALL)] => NIGHT, siren "", events "";
        home_door_goes_pending: HOME, [open(DOOR)] => PENDING_HOME, siren "", events "pending";
        night_door_29s_good_code_no_siren: NIGHT, [open(DOOR), wait(29), disarm(good())] => DISARMED, siren "", events "pending disarmed";
        home_window_triggers: HOME, [open(GARAGE)] => TRIGGERED_HOME, siren "on", events "triggered";
        night_window_triggers: NIGHT, [open(WINDOW)] => TRIGGERED_NIGHT, siren "on", events "triggered";
        home_smoke_triggers_then_back_home: HOME, [open(SMOKE), jump()] => HOME, siren "on off", events "triggered armed";
        night_arm_away_rearms: NIGHT, [arm(Mode::Away), jump()] => AWAY, siren "", events "armed armed";

        // pending (entry delay)
        pending_door_again_does_not_restart_delay: PENDING_AWAY, [wait(20), close(DOOR), open(DOOR), wait(10)] => TRIGGERED_AWAY, siren "on", events "triggered";
        pending_motion_follows_entry_delay: PENDING_AWAY, [open(HALL)] => PENDING_AWAY, siren "", events "";
        pending_window_triggers: PENDING_AWAY, [open(WINDOW)] => TRIGGERED_AWAY, siren "on", events "triggered";
        pending_smoke_triggers: PENDING_NIGHT, [open(SMOKE)] => TRIGGERED_NIGHT, siren "on", events "triggered";
        pending_tamper_triggers: PENDING_AWAY, [tamper(HALL)] => TRIGGERED_AWAY, siren "on", events "triggered tamper";
        pending_panic_triggers: PENDING_AWAY, [panic()] => TRIGGERED_AWAY, siren "on", events "triggered";
        pending_disarm_good_code: PENDING_AWAY, [disarm(good())] => DISARMED, siren "", events "disarmed";
        pending_arm_refused: PENDING_AWAY, [arm(Mode::Away)] => PENDING_AWAY, siren "", events "arm_refused";
        pending_home_returns_home_after_siren: PENDING_HOME, [jump(), jump()] => HOME, siren "on off", events "triggered armed";
        pending_sensor_offline_reported: PENDING_AWAY, [offline(WINDOW)] => PENDING_AWAY, siren "", events "sensor_offline";

        // triggered
        triggered_trips_ignored: TRIGGERED_AWAY, [open(DOOR), open(HALL), open(SMOKE), close(WINDOW), open(WINDOW)] => TRIGGERED_AWAY, siren "", events "";
        triggered_tamper_reported_only: TRIGGERED_AWAY, [tamper(DOOR)] => TRIGGERED_AWAY, siren "", events "tamper";
        triggered_panic_changes_nothing: TRIGGERED_AWAY, [panic()] => TRIGGERED_AWAY, siren "", events "";
        triggered_arm_refused: TRIGGERED_AWAY, [arm(Mode::Home)] => TRIGGERED_AWAY, siren "", events "arm_refused";
        triggered_disarm_good_code_sirens_off: TRIGGERED_AWAY, [disarm(good())] => DISARMED, siren "off", events "disarmed";
        triggered_disarm_wrong_code_keeps_sounding: TRIGGERED_AWAY, [disarm(BAD)] => TRIGGERED_AWAY, siren "", events "code_rejected";
        triggered_siren_reconnects_sent_on_again: TRIGGERED_AWAY, [offline(SIREN), online(SIREN)] => TRIGGERED_AWAY, siren "on", events "";
        triggered_179s_still_sounding: TRIGGERED_AWAY, [wait(179)] => TRIGGERED_AWAY, siren "", events "";
        triggered_siren_time_ends_back_to_away: TRIGGERED_AWAY, [wait(180)] => AWAY, siren "off", events "armed";
        triggered_night_returns_to_night: TRIGGERED_NIGHT, [jump()] => NIGHT, siren "off", events "armed";
        triggered_while_disarmed_disarm: TRIGGERED_NONE, [disarm(good())] => DISARMED, siren "off", events "disarmed";
        triggered_sensor_offline_reported: TRIGGERED_AWAY, [offline(HALL)] => TRIGGERED_AWAY, siren "", events "sensor_offline";

        // force and bypass
        bypassed_door_ignored_while_armed: DISARMED, [open(DOOR), arm_force(Mode::Away), jump(), close(DOOR), open(DOOR)] => AWAY, siren "", events "armed armed";
        bypassed_door_tamper_still_triggers: DISARMED, [open(DOOR), arm_force(Mode::Away), jump(), tamper(DOOR)] => TRIGGERED_AWAY, siren "on", events "armed armed triggered tamper";
        force_bypasses_only_the_open_sensors: DISARMED, [open(DOOR), arm_force(Mode::Away), jump(), open(WINDOW)] => TRIGGERED_AWAY, siren "on", events "armed armed triggered";
        bypass_survives_a_trigger: DISARMED, [open(DOOR), arm_force(Mode::Away), jump(), open(WINDOW), jump(), close(DOOR), open(DOOR)] => AWAY, siren "on off", events "armed armed triggered armed";
        bypass_cleared_by_disarm: DISARMED, [open(DOOR), arm_force(Mode::Away), jump(), disarm(good()), arm(Mode::Away)] => DISARMED, siren "", events "armed armed disarmed arm_refused";

        // wrong codes and lockout
        five_wrong_codes_lock_code_entry: AWAY, [times(5, disarm(BAD)), disarm(good())] => AWAY, siren "", events "code_rejected*5 code_lockout code_lockout";
        lockout_still_on_at_4m59: AWAY, [times(5, disarm(BAD)), wait(299), disarm(good())] => AWAY, siren "", events "code_rejected*5 code_lockout code_lockout";
        lockout_ends_after_5_min: AWAY, [times(5, disarm(BAD)), wait(300), disarm(good())] => DISARMED, siren "", events "code_rejected*5 code_lockout disarmed";
        lockout_ends_with_a_fresh_counter: AWAY, [times(5, disarm(BAD)), wait(300), times(4, disarm(BAD))] => AWAY, siren "", events "code_rejected*5 code_lockout code_rejected*4";
        four_wrong_then_5_min_counter_resets: AWAY, [times(4, disarm(BAD)), wait(300), disarm(BAD)] => AWAY, siren "", events "code_rejected*5";
        four_wrong_then_4m59_fifth_locks: AWAY, [times(4, disarm(BAD)), wait(299), disarm(BAD)] => AWAY, siren "", events "code_rejected*5 code_lockout";
        wrong_codes_window_slides: AWAY, [disarm(BAD), wait(200), times(3, disarm(BAD)), wait(100), disarm(BAD)] => AWAY, siren "", events "code_rejected*5";
        wrong_codes_on_arm_count_too: DISARMED, [times(5, arm_code(Mode::Away, BAD)), disarm(good())] => DISARMED, siren "", events "code_rejected*5 code_lockout code_lockout";
        valid_code_does_not_reset_counter: AWAY, [times(4, disarm(BAD)), disarm(good()), arm(Mode::Away), disarm(BAD)] => ARMING_AWAY, siren "", events "code_rejected*4 disarmed armed code_rejected code_lockout";
        missing_codes_do_not_count: AWAY, [times(6, disarm(NONE)), disarm(good())] => DISARMED, siren "", events "code_rejected*6 disarmed";
        lockout_during_entry_delay_siren_sounds: AWAY, [open(DOOR), times(5, disarm(BAD)), disarm(good()), wait(30)] => TRIGGERED_AWAY, siren "on", events "pending code_rejected*5 code_lockout code_lockout triggered";
        lockout_blocks_arming_with_a_code_not_without: DISARMED, [times(5, disarm(BAD)), arm_code(Mode::Away, good()), arm(Mode::Away)] => ARMING_AWAY, siren "", events "code_rejected*5 code_lockout code_lockout armed";
        panic_works_during_lockout: AWAY, [times(5, disarm(BAD)), panic()] => TRIGGERED_AWAY, siren "on", events "code_rejected*5 code_lockout triggered";
    }

    /// Every step the exhaustive test tries in every state.
    fn all_steps() -> Vec<Vec<Step>> {
        let mut steps = Vec::new();
        let actions = [
            Command::Arm(Mode::Away),
            Command::Arm(Mode::Home),
            Command::Arm(Mode::Night),
            Command::Disarm,
            Command::Panic,
        ];
        for action in actions {
            for code in [good(), BAD, NONE] {
                for force in [false, true] {
                    steps.push(command(action, code.clone(), force));
                }
            }
        }
        for device in [DOOR, WINDOW, GARAGE, HALL, SMOKE, KEYPAD, "nobody"] {
            for tripped in [false, true] {
                for tamper in [false, true] {
                    for first in [false, true] {
                        steps.push(report(device, tripped, tamper, first));
                    }
                }
            }
        }
        for device in [DOOR, HALL, SMOKE, SIREN, SIREN2, "nobody"] {
            steps.push(online(device));
            steps.push(offline(device));
        }
        steps.extend([jump(), wait(1)]);
        steps
    }

    /// How alarmed a state is; sensors and availability never lower it.
    fn rank(state: State) -> u8 {
        match state {
            State::Disarmed => 0,
            State::Arming { .. } | State::ArmedAway | State::ArmedHome | State::ArmedNight => 1,
            State::Pending { .. } => 2,
            State::Triggered { .. } => 3,
        }
    }

    #[test]
    fn every_state_and_event_keeps_the_invariants() {
        let mut cases = 0;
        for code_arm_required in [false, true] {
            let config = AlarmConfig { code_arm_required, ..config() };
            for from in all_states() {
                for step in all_steps() {
                    let mut h = Harness::in_state(from, config.clone());
                    h.run(&step);
                    let to = h.alarm.state();
                    let case = format!("{from:?} + {step:?} (code_arm_required {code_arm_required}) => {to:?}");
                    let triggered = |s: State| matches!(s, State::Triggered { .. });

                    // Announced iff changed, and the last announcement is the state it is in.
                    let published = h.published();
                    assert_eq!(published.is_empty(), from == to, "{case}");
                    if let Some((last, _)) = published.last() {
                        assert_eq!(*last, to, "{case}");
                    }

                    // Sirens and lights follow the triggered state.
                    let sirens: Vec<(&String, bool)> = h
                        .log
                        .iter()
                        .filter_map(|a| match a {
                            Action::Siren { device, on } => Some((device, *on)),
                            _ => None,
                        })
                        .collect();
                    let lights = h.log.iter().filter(|a| matches!(a, Action::AllLightsOn)).count();
                    if !triggered(from) && triggered(to) {
                        assert!(sirens.contains(&(&SIREN.to_owned(), true)), "{case}");
                        assert!(sirens.contains(&(&SIREN2.to_owned(), true)), "{case}");
                        assert_eq!(lights, 1, "{case}");
                    } else {
                        assert_eq!(lights, 0, "{case}");
                    }
                    for (_, on) in &sirens {
                        assert_eq!(*on, triggered(to), "{case}");
                    }
                    if triggered(from) && !triggered(to) {
                        assert_eq!(sirens.len(), 2, "both sirens told off: {case}");
                    }

                    // A delay runs exactly in the states that have one, and ends in the future.
                    let has_delay =
                        matches!(to, State::Arming { .. } | State::Pending { .. } | State::Triggered { .. });
                    assert_eq!(h.alarm.poll_timeout().is_some(), has_delay, "{case}");
                    assert!(h.alarm.poll_timeout().is_none_or(|d| d > h.now), "{case}");

                    // What each kind of step may do.
                    let kinds = h.events();
                    match &step[0] {
                        Step::Do(Event::SensorState { .. }) => {
                            assert!(rank(to) >= rank(from), "{case}");
                            assert!(from != DISARMED || to == DISARMED || to == TRIGGERED_NONE, "{case}");
                            assert!(
                                kinds.split_whitespace().all(|k| ["pending", "triggered", "tamper"].contains(&k)),
                                "{case}"
                            );
                        }
                        Step::Do(Event::Availability { .. }) => {
                            assert_eq!(from, to, "{case}");
                            assert!(kinds.split_whitespace().all(|k| k == "sensor_offline"), "{case}");
                        }
                        Step::Do(Event::Command { action, code, .. }) => {
                            let silent = *action == Command::Panic && triggered(from);
                            assert_eq!(
                                kinds.is_empty(),
                                silent,
                                "every command but a second panic gets an answer: {case}"
                            );
                            match (action, code) {
                                (Command::Disarm, CodeCheck::Valid { .. }) => {
                                    assert_eq!(to, DISARMED, "{case}")
                                }
                                (Command::Panic, _) => assert!(triggered(to), "{case}"),
                                (_, CodeCheck::Invalid) => {
                                    assert_eq!(from, to, "{case}");
                                    assert_eq!(kinds, "code_rejected", "{case}");
                                }
                                (Command::Disarm, CodeCheck::Missing) => {
                                    assert_eq!(from, to, "{case}")
                                }
                                (Command::Arm(_), _) => {
                                    assert!(to == from || rank(to) == 1, "{case}")
                                }
                            }
                            if matches!(action, Command::Arm(_)) && code_arm_required && *code == NONE {
                                assert_eq!(from, to, "{case}");
                            }
                        }
                        Step::Wait(_) | Step::Jump | Step::Seed(..) => {}
                    }

                    // A snapshot restores to the same machine.
                    let snapshot = h.alarm.snapshot(h.now);
                    let restored = Alarm::restore(config.clone(), &snapshot, h.now).expect(&case);
                    assert_eq!(restored.state(), to, "{case}");
                    assert_eq!(restored.poll_timeout(), h.alarm.poll_timeout(), "{case}");
                    assert_eq!(restored.snapshot(h.now), snapshot, "{case}");
                    cases += 1;
                }
            }
        }
        assert!(cases > 2_000, "only {cases} cases");
    }

    #[test]
    fn persist_precedes_publish_and_the_rest_of_a_trigger() {
        let mut h = Harness::in_state(AWAY, config());
        h.run(&open(WINDOW));
        let shape: Vec<&str> = h
            .log
            .iter()
            .map(|a| match a {
                Action::Persist(_) => "persist",
                Action::PublishState { .. } => "publish",
                Action::Siren { .. } => "siren",
                Action::AllLightsOn => "lights",
                Action::Event { .. } => "event",
            })
            .collect();
        assert_eq!(shape, ["persist", "publish", "siren", "siren", "lights", "event"]);
        let Action::Persist(snapshot) = &h.log[0] else { unreachable!() };
        assert_eq!(snapshot.state, "triggered");
        assert_eq!(snapshot.mode.as_deref(), Some("away"));
        assert_eq!(snapshot.remaining, Some(Duration::from_secs(180)));
        assert_eq!(h.log[1], Action::PublishState { state: TRIGGERED_AWAY, since: h.now, by: WINDOW.to_owned() });
    }

    #[test]
    fn a_fresh_alarm_persists_and_announces_disarmed() {
        let mut alarm = Alarm::new(config(), T0);
        assert!(matches!(alarm.poll_action(), Some(Action::Persist(s)) if s.state == "disarmed"));
        assert_eq!(alarm.poll_action(), Some(Action::PublishState { state: DISARMED, since: T0, by: HUB.to_owned() }));
        assert_eq!(alarm.poll_action(), None);
        assert_eq!(alarm.poll_timeout(), None);
    }

    #[test]
    fn by_names_the_code_owner_then_the_source() {
        let mut h = Harness::new(config());
        let by_bob = Event::Command {
            action: Command::Arm(Mode::Away),
            code: good(),
            force: false,
            by: Source::User("bob".to_owned()),
        };
        h.run(&[Step::Do(by_bob), Step::Jump]);
        assert_eq!(h.published(), [(ARMING_AWAY, "alice".to_owned()), (AWAY, "alice".to_owned())]);
        let accepted = h.log.iter().find(|a| matches!(a, Action::Event { .. }));
        assert!(
            matches!(accepted, Some(Action::Event { kind: EventKind::Armed, user: Some(u), device: None, .. }) if u == "alice")
        );

        let mut h = Harness::new(config());
        h.run(&arm(Mode::Home));
        assert_eq!(h.published(), [(ARMING_HOME, KEYPAD.to_owned())]);

        // A rejected code names the user who sent it, or the keypad it was typed on.
        let mut h = Harness::new(config());
        let cli =
            Event::Command { action: Command::Disarm, code: BAD, force: false, by: Source::User("bob".to_owned()) };
        h.run(&[Step::Do(cli)]);
        h.run(&disarm(BAD));
        let rejected: Vec<(Option<String>, Option<String>)> = h
            .log
            .iter()
            .filter_map(|a| match a {
                Action::Event { device, user, .. } => Some((device.clone(), user.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(rejected, [(None, Some("bob".to_owned())), (Some(KEYPAD.to_owned()), None)]);

        // After a trigger the armed state comes back under the name of whoever armed it.
        let mut h = Harness::in_state(AWAY, config());
        h.run(&[open(DOOR), jump(), jump()].concat());
        assert_eq!(
            h.published(),
            [(PENDING_AWAY, DOOR.to_owned()), (TRIGGERED_AWAY, DOOR.to_owned()), (AWAY, "alice".to_owned())]
        );
    }

    #[test]
    fn code_arm_required_needs_a_valid_code_to_arm() {
        let config = AlarmConfig { code_arm_required: true, ..config() };
        let mut h = Harness::new(config);
        h.run(&arm(Mode::Away));
        assert_eq!((h.alarm.state(), h.events()), (DISARMED, "code_rejected".to_owned()));
        h.run(&arm_code(Mode::Away, BAD));
        assert_eq!(h.alarm.state(), DISARMED);
        h.run(&arm_code(Mode::Away, good()));
        assert_eq!(h.alarm.state(), ARMING_AWAY);
        assert_eq!(h.events(), "code_rejected code_rejected armed");
        assert_eq!(h.alarm.snapshot(h.now).wrong_codes.len(), 1, "only the wrong code counted, not the missing one");
    }

    #[test]
    fn lockout_is_visible_to_the_driver_and_persisted() {
        let mut h = Harness::in_state(AWAY, config());
        h.run(&times(4, disarm(BAD)));
        assert!(!h.alarm.code_locked_out(h.now));
        assert_eq!(
            h.log.iter().filter(|a| matches!(a, Action::Persist(_))).count(),
            4,
            "every wrong code is persisted"
        );
        h.run(&disarm(BAD));
        assert!(h.alarm.code_locked_out(h.now));
        let snapshot = h.alarm.snapshot(h.now);
        assert_eq!(snapshot.lockout_remaining, Some(LOCKOUT));
        assert!(snapshot.wrong_codes.is_empty());
        h.run(&wait(300));
        assert!(!h.alarm.code_locked_out(h.now));
        assert_eq!(h.alarm.snapshot(h.now).lockout_remaining, None);
    }

    #[test]
    fn restore_mid_entry_delay_resumes_with_the_time_left() {
        let mut h = Harness::in_state(AWAY, config());
        h.run(&[open(DOOR), wait(10)].concat());
        let snapshot = h.alarm.snapshot(h.now);
        assert_eq!(snapshot.remaining, Some(Duration::from_secs(20)));

        // kill -9, reboot: the monotonic clock starts again from a small value.
        let boot = Instant::from_millis(500);
        let mut h = Harness { alarm: Alarm::restore(config(), &snapshot, boot).unwrap(), now: boot, log: vec![] };
        h.drain();
        assert_eq!(h.published(), [(PENDING_AWAY, DOOR.to_owned())]);
        assert_eq!(h.alarm.poll_timeout(), Some(boot + Duration::from_secs(20)));
        h.run(&wait(19));
        assert_eq!(h.alarm.state(), PENDING_AWAY);
        h.run(&wait(1));
        assert_eq!(h.alarm.state(), TRIGGERED_AWAY);
        assert_eq!(h.siren(), "on");
    }

    #[test]
    fn restore_mid_exit_delay_resumes_with_the_time_left() {
        let mut h = Harness::in_state(ARMING_HOME, config());
        h.run(&wait(25));
        let snapshot = h.alarm.snapshot(h.now);
        let mut h = Harness { alarm: Alarm::restore(config(), &snapshot, T0).unwrap(), now: T0, log: vec![] };
        h.run(&wait(4));
        assert_eq!(h.alarm.state(), ARMING_HOME);
        h.run(&wait(1));
        assert_eq!(h.alarm.state(), HOME);
        assert_eq!(h.alarm.by(), "alice");
    }

    #[test]
    fn restore_while_triggered_sounds_again_for_the_time_left() {
        let mut h = Harness::in_state(TRIGGERED_NIGHT, config());
        h.run(&wait(100));
        let snapshot = h.alarm.snapshot(h.now);
        let mut h = Harness { alarm: Alarm::restore(config(), &snapshot, T0).unwrap(), now: T0, log: vec![] };
        h.drain();
        assert_eq!(h.siren(), "on");
        assert!(h.log.contains(&Action::Siren { device: SIREN2.to_owned(), on: true }));
        assert!(h.log.contains(&Action::AllLightsOn));
        h.run(&wait(79));
        assert_eq!(h.alarm.state(), TRIGGERED_NIGHT);
        h.run(&wait(1));
        assert_eq!(h.alarm.state(), NIGHT);
        assert_eq!(h.siren(), "on off");
    }

    #[test]
    fn restore_keeps_bypass_lockout_and_wrong_codes() {
        let mut h = Harness::new(config());
        h.run(
            &[open(DOOR), arm_force(Mode::Away), jump(), times(3, disarm(BAD)), wait(60), times(2, disarm(BAD))]
                .concat(),
        );
        assert!(h.alarm.code_locked_out(h.now));
        h.run(&wait(60));
        let snapshot = h.alarm.snapshot(h.now);
        assert_eq!(snapshot.bypassed, [DOOR]);
        assert_eq!(snapshot.lockout_remaining, Some(Duration::from_secs(240)));

        let mut h = Harness { alarm: Alarm::restore(config(), &snapshot, T0).unwrap(), now: T0, log: vec![] };
        h.drain();
        assert_eq!(h.alarm.bypassed().collect::<Vec<_>>(), [DOOR]);
        h.run(&[disarm(good()), wait(240), close(DOOR), open(DOOR)].concat());
        assert_eq!(h.alarm.state(), AWAY, "still locked out, door still bypassed");
        h.run(&disarm(good()));
        assert_eq!(h.alarm.state(), DISARMED);

        // Wrong codes short of a lockout keep counting after a restart.
        let mut h = Harness::in_state(AWAY, config());
        h.run(&[times(4, disarm(BAD)), wait(100)].concat());
        let snapshot = h.alarm.snapshot(h.now);
        assert_eq!(snapshot.wrong_codes, vec![Duration::from_secs(200); 4]);
        let mut h = Harness { alarm: Alarm::restore(config(), &snapshot, T0).unwrap(), now: T0, log: vec![] };
        h.run(&disarm(BAD));
        assert!(h.alarm.code_locked_out(h.now));
    }

    #[test]
    fn restore_rejects_a_bad_snapshot() {
        let bad = |state: &str, mode: Option<&str>| Snapshot {
            state: state.to_owned(),
            mode: mode.map(str::to_owned),
            ..Snapshot::default()
        };
        let restore = |s: Snapshot| Alarm::restore(config(), &s, T0).map(|a| a.state());
        assert_eq!(restore(bad("asleep", None)), Err(SnapshotError::UnknownState("asleep".to_owned())));
        assert_eq!(restore(bad("pending", Some("party"))), Err(SnapshotError::UnknownMode("party".to_owned())));
        assert_eq!(restore(bad("arming", None)), Err(SnapshotError::MissingMode("arming".to_owned())));
        assert_eq!(restore(bad("triggered", None)), Ok(TRIGGERED_NONE));
        // A delay stored without its time left gets the full delay.
        let alarm = Alarm::restore(config(), &bad("pending", Some("home")), T0).unwrap();
        assert_eq!(alarm.poll_timeout(), Some(T0 + Duration::from_secs(30)));
    }

    #[test]
    fn zero_delays_skip_arming_and_pending() {
        let config = AlarmConfig { exit_delay: Duration::ZERO, entry_delay: Duration::ZERO, ..config() };
        let mut h = Harness::new(config);
        h.run(&arm(Mode::Away));
        assert_eq!(h.alarm.state(), AWAY);
        h.run(&open(DOOR));
        assert_eq!(h.alarm.state(), TRIGGERED_AWAY);
        assert_eq!(h.events(), "armed triggered");
        assert_eq!(h.siren(), "on");
    }

    #[test]
    fn no_lights_unless_lights_on_trigger() {
        let mut h = Harness::in_state(AWAY, AlarmConfig { lights_on_trigger: false, ..config() });
        h.run(&open(WINDOW));
        assert_eq!(h.alarm.state(), TRIGGERED_AWAY);
        assert!(!h.log.contains(&Action::AllLightsOn));
    }

    #[test]
    fn a_late_wakeup_still_sounds_the_whole_siren_time() {
        let mut h = Harness::in_state(PENDING_AWAY, config());
        let late = h.now + Duration::from_secs(1_000);
        h.alarm.handle_timeout(late);
        h.drain();
        assert_eq!(h.alarm.state(), TRIGGERED_AWAY);
        assert_eq!(h.alarm.poll_timeout(), Some(late + Duration::from_secs(180)));
    }

    #[test]
    fn an_early_wakeup_does_nothing() {
        let mut h = Harness::in_state(ARMING_AWAY, config());
        h.alarm.handle_timeout(h.now + Duration::from_millis(29_999));
        h.drain();
        assert!(h.log.is_empty());
        assert_eq!(h.alarm.state(), ARMING_AWAY);
    }

    #[test]
    fn reconfigure_keeps_state_deadline_and_sensor_memory() {
        let mut h = Harness::in_state(PENDING_AWAY, config());
        let deadline = h.alarm.poll_timeout();
        let mut smaller = config();
        smaller.sensors.retain(|s| s.id != GARAGE);
        h.alarm.reconfigure(smaller);
        assert_eq!((h.alarm.state(), h.alarm.poll_timeout()), (PENDING_AWAY, deadline));
        h.run(&[disarm(good()), arm(Mode::Away)].concat());
        assert_eq!(h.events(), "disarmed arm_refused", "the door is still remembered open");
        h.run(&[open(GARAGE), close(DOOR), arm(Mode::Away), jump(), open(GARAGE)].concat());
        assert_eq!(h.alarm.state(), AWAY, "an unlisted sensor is ignored");
    }

    #[test]
    fn names_round_trip() {
        for state in all_states() {
            let parsed = State::from_parts(state.as_str(), state.mode()).unwrap();
            assert_eq!(parsed, state);
        }
        for zone in [Zone::Entry, Zone::Perimeter, Zone::Interior, Zone::H24, Zone::None] {
            assert_eq!(Zone::from_name(zone.as_str()), Some(zone));
        }
        assert_eq!(Command::from_action("arm_night"), Some(Command::Arm(Mode::Night)));
        assert_eq!(Command::from_action("disarm"), Some(Command::Disarm));
        assert_eq!(Command::from_action("open_sesame"), None);
        assert_eq!(Source::Cli.name(), "cli");
    }
}
