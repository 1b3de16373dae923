//! The house at play: every device connected on its own TLS connection, lights and sirens obeying the
//! hub, and a story that moves the sensors as people at home would.
//!
//! Who does what:
//! - each device has a driver task polling its MQTT connection: a light or siren obeys `dpi/ID/set`
//!   ([`crate::payload::obey`]) and reports its state back, retained; one device (a keypad if there is
//!   one) also follows `dpi/alarm/state`. A dropped connection is retried every second and, once back,
//!   the device announces itself again.
//! - one story task, randomised by a seeded [`Xorshift`] and time-scaled by `speed`: motion in a random
//!   room every few seconds, now and then a button press or a switch, doors that open and close while
//!   the alarm is disarmed, lux and temperature readings every minute. Nobody moves while the alarm is
//!   armed (the house is empty). With a code and a keypad, an alarm drill every couple of minutes: arm
//!   away, open an entry door, let the alarm trigger and the siren sound, disarm, close the door.
//!
//! Everything that happens comes out as a [`Happening`] on the caller's channel, in order; the binary
//! prints them, a test reads them. Delays of the hub (exit, entry) are the hub's: only the story's own
//! pace is scaled by `speed`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use rumqttc::{AsyncClient, Event, EventLoop, Outgoing, Packet, Publish, QoS, SubscribeReasonCode};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{AlarmDelays, Kind, Zone};
use crate::mqtt::{self, Endpoint, Login, ALARM_SET, ALARM_STATE};
use crate::payload::{alarm_command, alarm_state, obey, LightState, Reading};
use crate::prng::Xorshift;
use crate::Error;

/// Request queue of each device's client; the story publishes a handful of messages at a time.
const REQUEST_CAPACITY: usize = 32;

/// Pause after a connection error before the client reconnects.
const RETRY_PAUSE: Duration = Duration::from_secs(1);

/// Extra time, beyond the configured delay, to wait for the alarm to reach a state.
const ALARM_SLACK: Duration = Duration::from_secs(15);

/// How long the drill lets the siren sound before disarming (real time, not scaled).
const SIREN_LISTEN: Duration = Duration::from_secs(3);

/// Longest wait, on leaving, for the devices' goodbyes to be written.
const FAREWELL_WAIT: Duration = Duration::from_secs(2);

/// Fastest pace accepted; beyond it the story is a load test in disguise.
pub const MAX_SPEED: f64 = 1000.0;

/// Name used on lines that concern the whole house.
const HOUSE: &str = "house";

/// Name used on lines about the alarm's state.
const ALARM: &str = "alarm";

/// How the story is told.
#[derive(Debug, Clone)]
pub struct PlayOptions {
    /// Pace: 2 makes everything happen twice as often. Does not change the hub's own delays.
    pub speed: f64,
    /// Seed of the story's random choices; the same seed replays the same choices.
    pub seed: u64,
    /// An alarm code; with it and a keypad, the story runs alarm drills.
    pub code: Option<String>,
    /// How long to play; `None` plays until `stop`.
    pub duration: Option<Duration>,
    /// The hub's alarm delays, to know how long a drill waits for each state.
    pub alarm: AlarmDelays,
    /// Light or siren id → the devices whose events may make the hub command it (see [`crate::House`]).
    pub causes: HashMap<String, Vec<String>>,
}

impl Default for PlayOptions {
    /// Real pace, seed 1, no drills, no end.
    fn default() -> Self {
        PlayOptions {
            speed: 1.0,
            seed: 1,
            code: None,
            duration: None,
            alarm: AlarmDelays::default(),
            causes: HashMap::new(),
        }
    }
}

/// Something that happened in the house.
#[derive(Debug, Clone, PartialEq)]
pub struct Happening {
    /// When (wall clock).
    pub at: SystemTime,
    /// The device it happened to, or `house` / `alarm`.
    pub device: String,
    /// What happened.
    pub what: What,
}

/// What happened.
#[derive(Debug, Clone, PartialEq)]
pub enum What {
    /// The device connected (or reconnected) and said `online`.
    Online,
    /// The device published a state (or a keypad a command); the payload hides any code.
    Reported {
        /// The payload as published.
        payload: String,
        /// A few words for people.
        summary: String,
    },
    /// A light or siren obeyed a command from the hub and reported its new state.
    Obeyed {
        /// The command as received.
        command: String,
        /// Its state now.
        state: LightState,
        /// A few words for people.
        summary: String,
        /// The most recent event that could have caused the command, and how long before it came.
        after: Option<(String, Duration)>,
    },
    /// A command the device could not make sense of.
    Ignored {
        /// The command as received.
        command: String,
        /// Why.
        reason: String,
    },
    /// The hub announced a new alarm state.
    Alarm {
        /// `disarmed`, `arming`, `armed_away`, `pending`, `triggered`, …
        state: String,
    },
    /// A line of the story (the drill's steps, the start and the end).
    Note(String),
    /// Something went wrong but the house plays on.
    Trouble(String),
}

impl Happening {
    /// The line shown to people, without the time: `hall-motion     → motion`.
    pub fn text(&self) -> String {
        let who = &self.device;
        match &self.what {
            What::Online => format!("{who:<15} · online"),
            What::Reported { summary, .. } => format!("{who:<15} → {summary}"),
            What::Obeyed { command, summary, after, .. } => match after {
                Some((cause, took)) => format!("{who:<15} ← {command}  {summary} ({} after {cause})", human(*took)),
                None => format!("{who:<15} ← {command}  {summary}"),
            },
            What::Ignored { command, reason } => format!("{who:<15} ← {command}  ignored: {reason}"),
            What::Alarm { state } => format!("{who:<15} = {state}"),
            What::Note(text) => format!("{who:<15} · {text}"),
            What::Trouble(text) => format!("{who:<15} ! {text}"),
        }
    }
}

/// `2.1 ms`, `15.0 s`.
fn human(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{:.1} ms", d.as_secs_f64() * 1000.0)
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

/// Locks a mutex whose data stays valid even if a holder panicked (plain values, no invariants).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the devices' tasks and the story share.
struct Shared {
    /// Where happenings go; a closed receiver just means nobody watches.
    events: mpsc::UnboundedSender<Happening>,
    /// When each device last reported something the hub may act on (and `alarm` last changed), to tell
    /// how long a command took.
    /// A std mutex: held for a map lookup, never across an await.
    last: Mutex<HashMap<String, Instant>>,
    /// Which devices may cause commands to which light or siren.
    causes: HashMap<String, Vec<String>>,
    /// The alarm state as last announced; the drill waits on it.
    alarm: watch::Sender<Option<String>>,
}

impl Shared {
    fn emit(&self, device: &str, what: What) {
        let _ = self.events.send(Happening { at: SystemTime::now(), device: device.to_owned(), what });
    }

    fn mark(&self, device: &str) {
        lock(&self.last).insert(device.to_owned(), Instant::now());
    }

    /// The latest event among `id`'s causes, and the alarm's changes when `alarm` (or among all
    /// events, if it has no known causes), and how long ago it was.
    fn cause_of(&self, id: &str, alarm: bool, now: Instant) -> Option<(String, Duration)> {
        let last = lock(&self.last);
        let latest = match self.causes.get(id) {
            Some(causes) => causes
                .iter()
                .map(String::as_str)
                .chain(alarm.then_some(ALARM))
                .filter_map(|c| last.get(c).map(|at| (c, *at)))
                .max_by_key(|(_, at)| *at),
            None => last.iter().map(|(c, at)| (c.as_str(), *at)).max_by_key(|(_, at)| *at),
        };
        let label = |cause: &str| match (cause, self.alarm.borrow().as_deref()) {
            (ALARM, Some(state)) => format!("{ALARM} {state}"),
            _ => cause.to_owned(),
        };
        latest.map(|(cause, at)| (label(cause), now.saturating_duration_since(at)))
    }
}

/// One device's part, as its driver task plays it.
#[derive(Clone)]
struct Role {
    /// The device.
    login: Login,
    /// Its on/off, for lights and sirens; shared with the story, which may switch a light by hand.
    light: Option<Arc<Mutex<LightState>>>,
    /// Whether this device follows `dpi/alarm/state` for the house.
    watcher: bool,
}

impl Role {
    /// Says `online`, subscribes, reports the current state: on every (re)connect.
    fn announce(&self, client: &AsyncClient, shared: &Shared) {
        let id = &self.login.device;
        let _ = client.try_publish(mqtt::availability_topic(id), QoS::AtLeastOnce, true, "online");
        if let Some(light) = &self.light {
            let _ = client.try_subscribe(mqtt::set_topic(id), QoS::AtLeastOnce);
            let state = *lock(light);
            let _ = client.try_publish(mqtt::state_topic(id), QoS::AtLeastOnce, true, state.to_json(self.login.kind));
        }
        if self.watcher {
            let _ = client.try_subscribe(ALARM_STATE, QoS::AtLeastOnce);
        }
        shared.emit(id, What::Online);
    }

    /// Polls the connection until its DISCONNECT is written or `kill` is cancelled.
    async fn drive(self, mut eventloop: EventLoop, client: AsyncClient, shared: Arc<Shared>, kill: CancellationToken) {
        let id = self.login.device.clone();
        let mut down = false;
        loop {
            let event = tokio::select! {
                _ = kill.cancelled() => return,
                event = eventloop.poll() => event,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) if down => {
                    down = false;
                    self.announce(&client, &shared);
                }
                Ok(Event::Incoming(Packet::Publish(p))) => self.on_publish(&p, &client, &shared),
                Ok(Event::Incoming(Packet::SubAck(ack)))
                    if ack.return_codes.iter().any(|c| matches!(c, SubscribeReasonCode::Failure)) =>
                {
                    shared.emit(&id, What::Trouble("the hub refused a subscription".to_owned()));
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
                Ok(_) => {}
                Err(e) => {
                    if !down {
                        down = true;
                        let what = mqtt::connection_error(e, &id, "the hub");
                        shared.emit(&id, What::Trouble(format!("connection lost: {what}; retrying every second")));
                    }
                    tokio::select! {
                        _ = kill.cancelled() => return,
                        _ = tokio::time::sleep(RETRY_PAUSE) => {}
                    }
                }
            }
        }
    }

    fn on_publish(&self, p: &Publish, client: &AsyncClient, shared: &Shared) {
        if p.topic == ALARM_STATE {
            let Some(state) = alarm_state(&p.payload) else { return };
            let changed = shared.alarm.send_if_modified(|current| {
                let changed = current.as_deref() != Some(state.as_str());
                if changed {
                    *current = Some(state.clone());
                }
                changed
            });
            if changed {
                shared.mark(ALARM);
                shared.emit(ALARM, What::Alarm { state });
            }
            return;
        }
        let id = &self.login.device;
        let Some(light) = self.light.as_ref().filter(|_| p.topic == mqtt::set_topic(id)) else { return };
        let command = String::from_utf8_lossy(&p.payload).trim().to_owned();
        let obeyed = {
            let mut state = lock(light);
            let before = *state;
            obey(before, &p.payload).inspect(|new| *state = *new).map(|new| (before, new))
        };
        match obeyed {
            Ok((before, state)) => {
                let kind = self.login.kind;
                let _ = client.try_publish(mqtt::state_topic(id), QoS::AtLeastOnce, true, state.to_json(kind));
                // Only a change has a cause worth naming; the alarm switches lights on and sirens either way.
                let (summary, after) = if state == before {
                    (format!("unchanged, {}", state.summary(kind).trim_start_matches("now ")), None)
                } else {
                    let alarm = kind == Kind::Siren || state.on;
                    (state.summary(kind), shared.cause_of(id, alarm, Instant::now()))
                };
                shared.emit(id, What::Obeyed { command, state, summary, after });
            }
            Err(e) => shared.emit(id, What::Ignored { command, reason: e.to_string() }),
        }
    }
}

/// A connected device.
struct Player {
    /// Its part, also held by its driver.
    role: Role,
    /// Its alarm zone: the drill opens an entry or perimeter door.
    zone: Zone,
    /// Its MQTT client; the driver polls the matching event loop.
    client: AsyncClient,
    /// The driver task, awaited on leaving.
    driver: JoinHandle<()>,
}

impl Player {
    fn id(&self) -> &str {
        &self.role.login.device
    }

    fn kind(&self) -> Kind {
        self.role.login.kind
    }
}

/// Plays the house: connects every device, tells the story until `opts.duration` has passed or `stop`
/// is cancelled, then says `offline` for each device and disconnects. Happenings go to `events`.
pub async fn play(
    endpoint: &Endpoint,
    devices: Vec<(Login, Zone)>,
    opts: PlayOptions,
    events: mpsc::UnboundedSender<Happening>,
    stop: CancellationToken,
) -> Result<(), Error> {
    if !(opts.speed.is_finite() && opts.speed > 0.0 && opts.speed <= MAX_SPEED) {
        return Err(Error::BadOption {
            name: "speed",
            value: opts.speed.to_string(),
            expected: "above 0 and at most 1000",
        });
    }
    if devices.is_empty() {
        return Err(Error::NoDevices);
    }
    let tls = mqtt::tls_config(&endpoint.ca)?;
    let (alarm_tx, alarm_rx) = watch::channel(None);
    let shared =
        Arc::new(Shared { events, last: Mutex::new(HashMap::new()), causes: opts.causes.clone(), alarm: alarm_tx });
    let watcher = devices
        .iter()
        .position(|(l, _)| l.kind == Kind::Keypad)
        .or_else(|| devices.iter().position(|(l, _)| l.kind == Kind::Siren))
        .unwrap_or(0);
    let kill = CancellationToken::new();
    let mut players = Vec::with_capacity(devices.len());
    for (i, (login, zone)) in devices.into_iter().enumerate() {
        match mqtt::connect(endpoint, &tls, &login, REQUEST_CAPACITY).await {
            Ok((client, eventloop)) => {
                let light = login.kind.obeys_commands().then(|| Arc::new(Mutex::new(LightState::default())));
                let role = Role { login, light, watcher: i == watcher };
                role.announce(&client, &shared);
                let driver =
                    tokio::spawn(role.clone().drive(eventloop, client.clone(), Arc::clone(&shared), kill.clone()));
                players.push(Player { role, zone, client, driver });
            }
            Err(e) => {
                farewell(players, &shared, kill).await;
                return Err(e);
            }
        }
    }
    shared.emit(
        HOUSE,
        What::Note(format!("{} devices playing, seed {}, speed {}×", players.len(), opts.seed, opts.speed)),
    );

    // The duration ends the story the same way a stop does, so a drill can put the house back in order.
    let story_stop = stop.child_token();
    if let Some(duration) = opts.duration {
        let timer = story_stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(duration) => timer.cancel(),
                _ = timer.cancelled() => {}
            }
        });
    }
    let mut story = Story::new(&players, Arc::clone(&shared), alarm_rx, &opts);
    story.run(&story_stop).await;
    story_stop.cancel();
    farewell(players, &shared, kill).await;
    Ok(())
}

/// Each device says `offline` (retained) and disconnects; waits boundedly for that to be written.
async fn farewell(players: Vec<Player>, shared: &Shared, kill: CancellationToken) {
    let count = players.len();
    for p in &players {
        let _ = p.client.try_publish(mqtt::availability_topic(p.id()), QoS::AtLeastOnce, true, "offline");
        let _ = p.client.try_disconnect();
    }
    let drivers = async {
        for p in players {
            let _ = p.driver.await;
        }
    };
    let _ = tokio::time::timeout(FAREWELL_WAIT, drivers).await;
    kill.cancel();
    if count > 0 {
        shared.emit(HOUSE, What::Note(format!("{count} devices offline")));
    }
}

/// How an alarm wait ended.
enum Waited {
    /// The alarm reached the state.
    Reached,
    /// It did not, in time.
    TimedOut,
    /// The story was stopped.
    Stopped,
}

/// What to do after a drill.
enum DrillEnd {
    /// Run another in a while.
    Again,
    /// No more drills (the code was refused).
    Never,
    /// The story was stopped during the drill.
    Stopped,
}

/// The story: who moves, when.
struct Story<'a> {
    /// Every connected device, in the caller's order.
    players: &'a [Player],
    /// Where happenings go, and the alarm state.
    shared: Arc<Shared>,
    /// The alarm state as last announced.
    alarm: watch::Receiver<Option<String>>,
    /// The story's dice.
    rng: Xorshift,
    /// Pace multiplier.
    speed: f64,
    /// The alarm code for drills.
    code: Option<String>,
    /// The hub's alarm delays.
    delays: AlarmDelays,
    /// Contacts that are open now (by player index).
    open: Vec<bool>,
    /// Switches that are on now (by player index).
    switched: Vec<bool>,
    /// Each temperature sensor's reading, drifting slowly (by player index).
    temperature: Vec<f64>,
    /// Follow-ups: motion that stops, a door that closes.
    later: Vec<(Instant, usize, Reading)>,
}

impl<'a> Story<'a> {
    fn new(
        players: &'a [Player],
        shared: Arc<Shared>,
        alarm: watch::Receiver<Option<String>>,
        opts: &PlayOptions,
    ) -> Self {
        let n = players.len();
        Story {
            players,
            shared,
            alarm,
            rng: Xorshift::new(opts.seed),
            speed: opts.speed,
            code: opts.code.clone(),
            delays: opts.alarm,
            open: vec![false; n],
            switched: vec![false; n],
            temperature: vec![21.0; n],
            later: Vec::new(),
        }
    }

    /// Indices of the players of these kinds.
    fn of(&self, kinds: &[Kind]) -> Vec<usize> {
        (0..self.players.len()).filter(|&i| kinds.contains(&self.players[i].kind())).collect()
    }

    /// A random story interval between `lo` and `hi` seconds, scaled by the pace.
    fn pause(&mut self, lo: f64, hi: f64) -> Duration {
        Duration::from_secs_f64(self.rng.between(lo, hi) / self.speed)
    }

    /// A fixed story interval, scaled by the pace.
    fn scaled(&self, secs: f64) -> Duration {
        Duration::from_secs_f64(secs / self.speed)
    }

    /// Nobody moves while the alarm is armed, arming, pending or triggered.
    fn people_home(&self) -> bool {
        self.alarm.borrow().as_deref().is_none_or(|s| s == "disarmed")
    }

    async fn run(&mut self, stop: &CancellationToken) {
        let motions = self.of(&[Kind::Motion]);
        let presses = self.of(&[Kind::Button, Kind::Switch]);
        let doors = self.of(&[Kind::Contact]);
        let readers = self.of(&[Kind::Lux, Kind::Temperature]);
        let keypad = self.of(&[Kind::Keypad]).first().copied();
        let drill_door = [Zone::Entry, Zone::Perimeter]
            .iter()
            .find_map(|zone| doors.iter().copied().find(|&i| self.players[i].zone == *zone));

        let now = Instant::now();
        let mut next_reading = now;
        let [mut next_motion, mut next_press, mut next_door] = self.timers(now);
        let mut next_drill = match (keypad, drill_door, &self.code) {
            (Some(k), Some(d), Some(_)) => Some((now + self.scaled(45.0), k, d)),
            _ => None,
        };
        match next_drill {
            Some((at, _, _)) => self.note(format!("first alarm drill in {} s", (at - now).as_secs())),
            None if self.code.is_some() => {
                self.note("no alarm drills: they need a keypad and an entry or perimeter door".to_owned())
            }
            None => {}
        }
        loop {
            let mut wake = next_motion.min(next_press).min(next_door).min(next_reading);
            if let Some((at, _, _)) = next_drill {
                wake = wake.min(at);
            }
            if let Some(at) = self.later.iter().map(|(at, _, _)| *at).min() {
                wake = wake.min(at);
            }
            tokio::select! {
                _ = stop.cancelled() => {
                    self.settle();
                    return;
                }
                _ = tokio::time::sleep_until(wake) => {}
            }
            let now = Instant::now();
            self.follow_up(now);
            let home = self.people_home();
            if now >= next_motion {
                if let (true, Some(&i)) = (home, self.rng.pick(&motions)) {
                    self.report(i, Reading::Motion(true));
                    let stops = now + self.pause(2.0, 4.0);
                    self.later.retain(|(_, j, _)| *j != i);
                    self.later.push((stops, i, Reading::Motion(false)));
                }
                next_motion = now + self.pause(3.0, 8.0);
            }
            if now >= next_press {
                if let (true, Some(&i)) = (home, self.rng.pick(&presses)) {
                    if self.players[i].kind() == Kind::Switch {
                        self.switched[i] = !self.switched[i];
                        self.report(i, Reading::Switch(self.switched[i]));
                    } else {
                        self.report(i, Reading::Action("single"));
                    }
                }
                next_press = now + self.pause(20.0, 50.0);
            }
            if now >= next_door {
                let closed: Vec<usize> = doors.iter().copied().filter(|&i| !self.open[i]).collect();
                if let (true, Some(&i)) = (home, self.rng.pick(&closed)) {
                    self.open[i] = true;
                    self.report(i, Reading::Contact(true));
                    let closes = now + self.pause(3.0, 10.0);
                    self.later.push((closes, i, Reading::Contact(false)));
                }
                next_door = now + self.pause(15.0, 40.0);
            }
            if now >= next_reading {
                for &i in &readers {
                    let reading = if self.players[i].kind() == Kind::Lux {
                        Reading::Lux(5 + self.rng.below(400) as u32)
                    } else {
                        let t = (self.temperature[i] + self.rng.between(-0.3, 0.3)).clamp(17.0, 25.0);
                        self.temperature[i] = t;
                        Reading::Temperature(t)
                    };
                    self.report(i, reading);
                }
                next_reading = now + self.scaled(60.0);
            }
            if let Some((at, keypad, door)) = next_drill {
                if now >= at {
                    next_drill = match self.drill(keypad, door, stop).await {
                        DrillEnd::Again => Some((Instant::now() + self.scaled(120.0), keypad, door)),
                        DrillEnd::Never => None,
                        DrillEnd::Stopped => {
                            self.settle();
                            return;
                        }
                    };
                    // Life resumes where it was, rather than catching up on what the drill held back.
                    [next_motion, next_press, next_door] = self.timers(Instant::now());
                }
            }
        }
    }

    /// When the next motion, press and door come, from `now`.
    fn timers(&mut self, now: Instant) -> [Instant; 3] {
        [now + self.pause(1.0, 4.0), now + self.pause(15.0, 40.0), now + self.pause(10.0, 30.0)]
    }

    /// On leaving: motion stops and doors close now, so the hub keeps a tidy last state.
    fn settle(&mut self) {
        let far = Instant::now() + Duration::from_secs(1 << 30);
        self.follow_up(far);
    }

    /// Publishes the follow-ups that are due.
    fn follow_up(&mut self, now: Instant) {
        let (due, rest): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.later).into_iter().partition(|(at, _, _)| *at <= now);
        self.later = rest;
        for (_, i, reading) in due {
            if let Reading::Contact(open) = reading {
                self.open[i] = open;
            }
            self.report(i, reading);
        }
    }

    /// Publishes a sensor's state, retained, and tells.
    fn report(&self, i: usize, reading: Reading) {
        let p = &self.players[i];
        let payload = reading.to_json();
        if reading.can_cause() {
            self.shared.mark(p.id());
        }
        match p.client.try_publish(mqtt::state_topic(p.id()), QoS::AtLeastOnce, true, payload.clone()) {
            Ok(()) => self.shared.emit(p.id(), What::Reported { payload, summary: reading.summary() }),
            Err(e) => self.shared.emit(p.id(), What::Trouble(format!("could not publish: {e}"))),
        }
    }

    /// The keypad sends `action` with the code on `dpi/alarm/set`.
    fn keypad(&self, keypad: usize, action: &str) {
        let p = &self.players[keypad];
        let payload = alarm_command(action, self.code.as_deref());
        self.shared.mark(p.id());
        match p.client.try_publish(ALARM_SET, QoS::AtLeastOnce, false, payload) {
            Ok(()) => {
                let shown = alarm_command(action, self.code.as_ref().map(|_| "****"));
                self.shared
                    .emit(p.id(), What::Reported { payload: shown, summary: format!("{action} (with the code)") });
            }
            Err(e) => self.shared.emit(p.id(), What::Trouble(format!("could not publish: {e}"))),
        }
    }

    fn note(&self, text: String) {
        self.shared.emit(HOUSE, What::Note(text));
    }

    /// Waits for the alarm to be in `state`, at most `within`.
    async fn wait_alarm(&self, state: &str, within: Duration, stop: &CancellationToken) -> Waited {
        let mut alarm = self.alarm.clone();
        tokio::select! {
            _ = stop.cancelled() => Waited::Stopped,
            reached = tokio::time::timeout(within, alarm.wait_for(|s| s.as_deref() == Some(state))) => {
                match reached {
                    Ok(Ok(_)) => Waited::Reached,
                    _ => Waited::TimedOut,
                }
            }
        }
    }

    /// Closes every open door now and forgets their pending closes.
    fn close_doors(&mut self) {
        let open: Vec<usize> = (0..self.players.len()).filter(|&i| self.open[i]).collect();
        self.later.retain(|(_, i, r)| !(matches!(r, Reading::Contact(_)) && open.contains(i)));
        for i in open {
            self.open[i] = false;
            self.report(i, Reading::Contact(false));
        }
    }

    /// The resident switches off by hand every light that is on (the alarm switched them all on).
    fn lights_off_by_hand(&self) {
        for p in self.players.iter().filter(|p| p.kind() == Kind::Light) {
            let Some(light) = &p.role.light else { continue };
            let state = {
                let mut state = lock(light);
                if !state.on {
                    continue;
                }
                state.on = false;
                *state
            };
            let payload = state.to_json(Kind::Light);
            if p.client.try_publish(mqtt::state_topic(p.id()), QoS::AtLeastOnce, true, payload.clone()).is_ok() {
                self.shared.emit(p.id(), What::Reported { payload, summary: "switched off by hand".to_owned() });
            }
        }
    }

    /// Leaves the house as found when a drill is cut short: disarm, close the door.
    fn abandon(&mut self, keypad: usize) {
        self.keypad(keypad, "disarm");
        self.close_doors();
    }

    /// Arm away from the keypad, open `door`, let the alarm trigger, disarm, close the door.
    async fn drill(&mut self, keypad: usize, door: usize, stop: &CancellationToken) -> DrillEnd {
        let state = self.alarm.borrow().clone();
        if state.as_deref() != Some("disarmed") {
            self.note(format!("alarm drill postponed: the alarm is {}", state.as_deref().unwrap_or("unknown")));
            return DrillEnd::Again;
        }
        self.close_doors();
        self.note("alarm drill: everybody leaves, the keypad arms away".to_owned());
        self.keypad(keypad, "arm_away");
        let exit = self.delays.exit + ALARM_SLACK;
        match self.wait_alarm("armed_away", exit, stop).await {
            Waited::Reached => {}
            Waited::Stopped => {
                self.abandon(keypad);
                return DrillEnd::Stopped;
            }
            Waited::TimedOut => {
                self.shared.emit(
                    HOUSE,
                    What::Trouble(format!("the alarm was not armed_away within {} s; drill abandoned", exit.as_secs())),
                );
                self.abandon(keypad);
                return DrillEnd::Again;
            }
        }
        let door_id = self.players[door].id().to_owned();
        self.note(format!("a burglar opens {door_id}"));
        self.open[door] = true;
        self.report(door, Reading::Contact(true));
        let entry = self.delays.entry + ALARM_SLACK;
        match self.wait_alarm("triggered", entry, stop).await {
            Waited::Reached => {
                tokio::select! {
                    _ = stop.cancelled() => {
                        self.abandon(keypad);
                        return DrillEnd::Stopped;
                    }
                    _ = tokio::time::sleep(SIREN_LISTEN) => {}
                }
            }
            Waited::Stopped => {
                self.abandon(keypad);
                return DrillEnd::Stopped;
            }
            Waited::TimedOut => {
                self.shared.emit(
                    HOUSE,
                    What::Trouble(format!(
                        "the alarm did not trigger within {} s of {door_id} opening",
                        entry.as_secs()
                    )),
                );
            }
        }
        self.note("the resident comes home and disarms at the keypad".to_owned());
        self.keypad(keypad, "disarm");
        let disarmed = self.wait_alarm("disarmed", ALARM_SLACK, stop).await;
        self.close_doors();
        match disarmed {
            Waited::Reached => {}
            Waited::Stopped => return DrillEnd::Stopped,
            Waited::TimedOut => {
                self.shared.emit(
                    HOUSE,
                    What::Trouble(
                        "the hub did not disarm: is --code the alarm code of a user? Set one with \
                         `domoticpi user pin NAME`. No more drills."
                            .to_owned(),
                    ),
                );
                return DrillEnd::Never;
            }
        }
        self.lights_off_by_hand();
        self.note("alarm drill over".to_owned());
        DrillEnd::Again
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(what: What, device: &str) -> String {
        Happening { at: SystemTime::UNIX_EPOCH, device: device.to_owned(), what }.text()
    }

    #[test]
    fn lines_read_well() {
        let reported = What::Reported { payload: r#"{"motion":true}"#.into(), summary: "motion".into() };
        assert_eq!(at(reported, "hall-motion"), "hall-motion     → motion");
        let obeyed = What::Obeyed {
            command: r#"{"on":true}"#.into(),
            state: LightState { on: true, brightness: 254 },
            summary: "now on".into(),
            after: Some(("hall-motion".into(), Duration::from_micros(2100))),
        };
        assert_eq!(at(obeyed, "hall-light"), r#"hall-light      ← {"on":true}  now on (2.1 ms after hall-motion)"#);
        assert_eq!(at(What::Alarm { state: "armed_away".into() }, ALARM), "alarm           = armed_away");
        assert_eq!(at(What::Trouble("oops".into()), HOUSE), "house           ! oops");
    }

    #[test]
    fn durations_in_people_units() {
        assert_eq!(human(Duration::from_micros(2149)), "2.1 ms");
        assert_eq!(human(Duration::from_millis(15_020)), "15.0 s");
    }

    #[test]
    fn the_latest_cause_wins_and_unknown_lights_take_the_latest_event() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let causes = HashMap::from([("hall-light".to_owned(), vec!["hall-motion".to_owned(), "switch".to_owned()])]);
        let shared = Shared { events: tx, last: Mutex::new(HashMap::new()), causes, alarm: watch::channel(None).0 };
        let t0 = Instant::now();
        lock(&shared.last).extend([
            ("hall-motion".to_owned(), t0),
            ("switch".to_owned(), t0 + Duration::from_millis(5)),
            ("kitchen-motion".to_owned(), t0 + Duration::from_millis(8)),
        ]);
        let now = t0 + Duration::from_millis(10);
        let switch = Some(("switch".to_owned(), Duration::from_millis(5)));
        assert_eq!(shared.cause_of("hall-light", true, now), switch);
        let kitchen = Some(("kitchen-motion".to_owned(), Duration::from_millis(2)));
        assert_eq!(shared.cause_of("porch-light", true, now), kitchen);
        lock(&shared.last).insert(ALARM.to_owned(), t0 + Duration::from_millis(9));
        shared.alarm.send_replace(Some("pending".to_owned()));
        let pending = Some(("alarm pending".to_owned(), Duration::from_millis(1)));
        assert_eq!(shared.cause_of("hall-light", true, now), pending);
        assert_eq!(shared.cause_of("hall-light", false, now), switch, "the alarm never switches a light off");
    }

    #[tokio::test]
    async fn bad_speed_and_no_devices_are_refused() {
        let endpoint = Endpoint { host: "127.0.0.1".into(), port: 1, ca: "/nonexistent".into() };
        let (tx, _rx) = mpsc::unbounded_channel();
        for speed in [0.0, -1.0, f64::INFINITY, 5000.0] {
            let opts = PlayOptions { speed, ..PlayOptions::default() };
            let r = play(&endpoint, vec![], opts, tx.clone(), CancellationToken::new()).await;
            assert!(matches!(r, Err(Error::BadOption { name: "speed", .. })), "{speed}: {r:?}");
        }
        let r = play(&endpoint, vec![], PlayOptions::default(), tx, CancellationToken::new()).await;
        assert!(matches!(r, Err(Error::NoDevices)));
    }
}
