//! The alarm driver: the one task that owns the alarm state machine ([`domoticpi_rules::alarm`]) and
//! carries out what it decides (SPEC §7 "Alarm", the `dpi/alarm/*` topics of §5).
//!
//! Inputs reach the task over one channel, in the order they happened, through an [`AlarmHandle`]:
//! sensor states and availability and `dpi/alarm/set` commands (already through the ACL, with who
//! sent them) from the dispatcher ([`crate::dispatcher`]), commands and status requests from the
//! control socket ([`crate::control`]), and a reloaded config, which changes sensors, sirens, delays
//! and options but neither the state nor a running delay. The task reads the monotonic clock (tokio's, so tests may pause it),
//! hands the machine the milliseconds since the task started, and sleeps until
//! [`Alarm::poll_timeout`]. It carries out [`Action`]s strictly in order: a `Persist` is on disk
//! ([`Store::durable`]) before anything after it is published.
//!
//! What the driver decides, beyond the machine:
//! - **Codes** are verified here, against every user's `pin_hash` (argon2, on a blocking thread), one
//!   command at a time in arrival order, while sensors and delays keep being handled. During a lockout
//!   no code is verified. A code never appears in a log, an event, `dpi/hub/error`, or (see
//!   [`redact`]) the copy of `dpi/alarm/set` other subscribers receive.
//! - **Readings.** `contact: open`, `motion: true` and `smoke: true` are "tripped"; `tamper: true` is a
//!   tamper. A heartbeat without the main field keeps the last main state and is passed as a
//!   replay (`first_after_connect`), so it can raise a tamper but never counts as a new motion.
//! - **Start.** The stored snapshot is restored ([`Alarm::restore`]: delays resume with the time that
//!   was left); sensors are seeded from the stored device states, then the retained `dpi/ID/state`
//!   messages replayed at start are fed as first-after-connect reports. An unreadable snapshot is
//!   logged as an error and the alarm starts disarmed: the only alternative, refusing to start, would
//!   leave the house without a hub at all.
//! - **Checkpoints.** While a delay runs, the snapshot (with the time left) goes every second to the
//!   periodic writer ([`crate::devices::run`]), which writes it with the device states in its one
//!   transaction per interval; one taken before a newer durable save is skipped. After a kill the
//!   delay resumes with at most about a second plus the commit interval more than was really left;
//!   after a power cut perhaps from an earlier checkpoint (those writes are not fsynced): never less.
//! - **Availability.** Every device is marked offline when the hub starts; those marks are not a
//!   sensor "going offline" while armed, so an `offline` for a device not seen online since the
//!   driver started is ignored. A siren that comes online gets its command again two seconds later
//!   too, because it subscribes to `dpi/ID/set` only after its connection is announced.
//! - **A failing disk** does not silence the alarm: a failed `Persist` is logged (once per run of
//!   failures) and the actions after it are still carried out.
//!
//! This module must not decide what a reading or a command means (the machine does) and must not
//! block the runtime: the store and argon2 run on threads of their own.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use domoticpi_rules::alarm::{
    Action, Alarm, AlarmConfig, CodeCheck, Command, Event, Mode, Sensor, SensorKind, Snapshot, Source, State, Zone,
};
use domoticpi_rules::Instant;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::auth::{self, Identity};
use crate::broker::dispatch::Outbox;
use crate::config::{self, Config, DeviceKind};
use crate::decode::{self, Contact, DeviceState, Main};
use crate::dispatcher::Commands;
use crate::secret::Secret;
use crate::store::{self, Store};
use crate::topics::{self, Leaf, Topic};

/// Commands waiting for their code to be checked; more are refused (a flood cannot queue argon2 work).
const MAX_QUEUED_COMMANDS: usize = 32;
/// How often the snapshot is rewritten while a delay runs.
const CHECKPOINT: Duration = Duration::from_secs(1);
/// When a siren that came online gets its command again (it subscribes after connecting).
const SIREN_RESEND: Duration = Duration::from_secs(2);
/// Longest code accepted in a command; longer ones are refused before any hashing.
const MAX_CODE_CHARS: usize = 64;
/// Longest unknown action quoted back in an error.
const MAX_QUOTED: usize = 32;

/// Why a `dpi/alarm/set` payload was refused. The `Display` is one line without the code, fit for
/// `dpi/hub/error` and the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SetError {
    /// The payload is not a JSON object (the parser's reason gives a position, never the text).
    #[error(transparent)]
    Payload(#[from] decode::DecodeError),
    /// The object has no `action`.
    #[error("action is missing (arm_away, arm_home, arm_night, disarm or panic)")]
    MissingAction,
    /// The action is not one of the five.
    #[error("unknown action {0:?} (arm_away, arm_home, arm_night, disarm or panic)")]
    UnknownAction(String),
    /// A field has the wrong type (its value is not quoted: it may be a code).
    #[error("{field} must be {expected}")]
    WrongType {
        /// The field.
        field: &'static str,
        /// What it must be.
        expected: &'static str,
    },
}

/// A parsed `dpi/alarm/set` (or control-socket) command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetCommand {
    /// What it asks for.
    pub action: Command,
    /// The code that came with it, if any (an empty string counts as none).
    pub code: Option<Secret>,
    /// Bypass open entry/perimeter sensors instead of refusing to arm.
    pub force: bool,
}

/// Parses a `dpi/alarm/set` payload: `{"action": "...", "code": "1234", "force": false}`; other
/// fields are ignored.
pub fn parse_set(payload: &[u8]) -> Result<SetCommand, SetError> {
    let fields = decode::json_object(payload)?;
    let action = match fields.get("action") {
        None => return Err(SetError::MissingAction),
        Some(Value::String(a)) => {
            Command::from_action(a).ok_or_else(|| SetError::UnknownAction(a.chars().take(MAX_QUOTED).collect()))?
        }
        Some(_) => return Err(SetError::WrongType { field: "action", expected: "a string" }),
    };
    let code = match fields.get("code") {
        None | Some(Value::Null) => None,
        Some(Value::String(c)) if c.is_empty() => None,
        Some(Value::String(c)) if c.chars().count() <= MAX_CODE_CHARS => Some(Secret::new(c.as_str())),
        Some(_) => return Err(SetError::WrongType { field: "code", expected: "a string of at most 64 characters" }),
    };
    let force = match fields.get("force") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(SetError::WrongType { field: "force", expected: "true or false" }),
    };
    Ok(SetCommand { action, code, force })
}

/// The payload without its `code`, for the copy routed to other subscribers; `None` when it had none
/// (route it unchanged).
pub fn redact(payload: &[u8]) -> Option<Vec<u8>> {
    let mut value: Value = serde_json::from_slice(payload).ok()?;
    value.as_object_mut()?.remove("code")?;
    serde_json::to_vec(&value).ok()
}

/// Who sent a `dpi/alarm/set` that passed the ACL: a user by name, or a keypad by id.
pub fn source_of(identity: &Identity) -> Source {
    match identity {
        Identity::User { name, .. } => Source::User(name.clone()),
        Identity::Device { id, .. } => Source::Keypad(id.clone()),
    }
}

/// The machine's configuration from the hub's: delays, options, every device but plain lights and
/// switches as a sensor (its tamper counts), and the sirens.
pub fn alarm_config(config: &Config) -> AlarmConfig {
    let sensors = config
        .devices
        .iter()
        .filter(|d| !matches!(d.kind, DeviceKind::Light | DeviceKind::Switch) || d.zone != config::Zone::None)
        .map(|d| Sensor { id: d.id.clone(), zone: zone(d.zone), kind: sensor_kind(d.kind) })
        .collect();
    AlarmConfig {
        exit_delay: config.alarm.exit_delay,
        entry_delay: config.alarm.entry_delay,
        siren: config.alarm.siren,
        code_arm_required: config.alarm.code_arm_required,
        lights_on_trigger: config.alarm.lights_on_trigger,
        sensors,
        sirens: ids_of(config, DeviceKind::Siren),
    }
}

fn ids_of(config: &Config, kind: DeviceKind) -> Vec<String> {
    config.devices.iter().filter(|d| d.kind == kind).map(|d| d.id.clone()).collect()
}

fn zone(zone: config::Zone) -> Zone {
    match zone {
        config::Zone::Entry => Zone::Entry,
        config::Zone::Perimeter => Zone::Perimeter,
        config::Zone::Interior => Zone::Interior,
        config::Zone::H24 => Zone::H24,
        config::Zone::None => Zone::None,
    }
}

fn sensor_kind(kind: DeviceKind) -> SensorKind {
    match kind {
        DeviceKind::Contact => SensorKind::Contact,
        DeviceKind::Motion => SensorKind::Motion,
        DeviceKind::Smoke => SensorKind::Smoke,
        _ => SensorKind::Other,
    }
}

/// What a state says to the alarm: (tripped, tamper), each `None` when the state does not say.
/// Contact open, motion and smoke are tripped; other kinds' main fields never are.
pub fn reading(state: &DeviceState) -> (Option<bool>, Option<bool>) {
    let tripped = state.main.as_ref().map(|main| match main {
        Main::Contact(c) => *c == Contact::Open,
        Main::Motion(m) | Main::Smoke(m) => *m,
        _ => false,
    });
    (tripped, state.tamper)
}

/// The alarm as `domoticpi alarm status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// `disarmed`, `arming`, `armed_away`, … `triggered`.
    pub state: String,
    /// When it was entered (RFC 3339).
    pub since: String,
    /// Who or what caused it.
    pub by: String,
    /// Sensors bypassed until the next disarm.
    pub bypassed: Vec<String>,
    /// Code entry is locked after too many wrong codes.
    pub code_locked_out: bool,
    /// Milliseconds left of the state's delay (exit, entry) or siren time; absent when none runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remaining_ms: Option<u64>,
    /// When code entry opens again (RFC 3339), while it is locked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locked_until: Option<String>,
}

/// One `dpi/alarm/event`, as published and as returned to the CLI.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    /// `triggered`, `pending`, `armed`, … `sensor_offline`.
    pub event: String,
    /// The device concerned, if any.
    pub device: Option<String>,
    /// Why, for people.
    pub reason: String,
    /// When (RFC 3339).
    pub at: String,
    /// The user concerned, if any (never a code).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// What a command from the control socket led to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// The events it caused, in order.
    pub events: Vec<EventRecord>,
    /// The alarm afterwards.
    pub status: Status,
}

/// Why a request to the driver got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AlarmError {
    /// The driver has stopped (the hub is shutting down).
    #[error("the alarm is not running (the hub is stopping)")]
    Gone,
    /// Too many commands are waiting for their code to be checked.
    #[error("too many alarm commands waiting; try again")]
    Busy,
    /// The users' codes could not be read or checked.
    #[error("alarm codes could not be checked: {0}")]
    CodeCheck(String),
}

/// One input to the driver.
#[derive(Debug)]
enum Input {
    /// A watched device reported a state.
    Sensor { device: String, tripped: Option<bool>, tamper: Option<bool>, first_after_connect: bool },
    /// A watched device came online or went offline.
    Availability { device: String, online: bool },
    /// A command, from a session (`reply` none) or the control socket.
    Command(Queued),
    /// The control socket asks for the status.
    Status { reply: oneshot::Sender<Status> },
    /// The config was reloaded.
    Reconfigure(Arc<Config>),
    /// The health fault switch: stop answering, for good.
    Stall,
}

/// A command waiting for its turn.
#[derive(Debug)]
struct Queued {
    command: SetCommand,
    source: Source,
    /// The MQTT client id, for `dpi/hub/error`; empty for the control socket.
    client: String,
    reply: Option<oneshot::Sender<Result<Outcome, AlarmError>>>,
}

/// The rest of the hub's handle on the driver; cheap to clone.
#[derive(Debug, Clone)]
pub struct AlarmHandle {
    /// To the driver task.
    inputs: mpsc::UnboundedSender<Input>,
}

/// The driver's end of the channel, for [`run`].
#[derive(Debug)]
pub struct Inbox(mpsc::UnboundedReceiver<Input>);

/// A handle for the alarm driver and the inbox to give [`run`].
pub fn channel() -> (AlarmHandle, Inbox) {
    let (inputs, rx) = mpsc::unbounded_channel();
    (AlarmHandle { inputs }, Inbox(rx))
}

/// The devices whose state or availability the alarm of `config` uses: its sensors and sirens.
pub fn watched(config: &Config) -> HashSet<String> {
    let alarm = alarm_config(config);
    alarm.sensors.into_iter().map(|s| s.id).chain(alarm.sirens).collect()
}

impl AlarmHandle {
    /// Passes on the decoded state of a device the alarm watches (see [`watched`]).
    pub fn device_state(&self, id: &str, state: &DeviceState, first_after_connect: bool) {
        let (tripped, tamper) = reading(state);
        let _ = self.inputs.send(Input::Sensor { device: id.to_owned(), tripped, tamper, first_after_connect });
    }

    /// Passes on the availability of a device the alarm watches.
    pub fn availability(&self, id: &str, online: bool) {
        let _ = self.inputs.send(Input::Availability { device: id.to_owned(), online });
    }

    /// Applies a reloaded config: sensors, sirens, delays and options change; the state, a running
    /// delay and the lockout do not.
    pub fn reconfigure(&self, config: Arc<Config>) {
        let _ = self.inputs.send(Input::Reconfigure(config));
    }

    /// Hands over a `dpi/alarm/set` that passed the ACL, sent by `source` on connection `client`.
    pub fn command(&self, command: SetCommand, source: Source, client: &str) {
        let queued = Queued { command, source, client: client.to_owned(), reply: None };
        let _ = self.inputs.send(Input::Command(queued));
    }

    /// Runs a command from the hub's own CLI and returns what it led to.
    pub async fn cli_command(&self, command: SetCommand) -> Result<Outcome, AlarmError> {
        let (reply, answer) = oneshot::channel();
        let queued = Queued { command, source: Source::Cli, client: String::new(), reply: Some(reply) };
        self.inputs.send(Input::Command(queued)).map_err(|_| AlarmError::Gone)?;
        answer.await.map_err(|_| AlarmError::Gone)?
    }

    /// Stops the driver for good (the health fault switch; never in normal use).
    pub fn stall(&self) {
        let _ = self.inputs.send(Input::Stall);
    }

    /// The alarm's status now.
    pub async fn status(&self) -> Result<Status, AlarmError> {
        let (reply, answer) = oneshot::channel();
        self.inputs.send(Input::Status { reply }).map_err(|_| AlarmError::Gone)?;
        answer.await.map_err(|_| AlarmError::Gone)
    }
}

/// The snapshot as stored in the `alarm` table: the machine's [`Snapshot`] in milliseconds, plus the
/// wall-clock time the state was entered (for `since` after a restart).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Stored {
    state: String,
    #[serde(default)]
    mode: Option<String>,
    by: String,
    mode_by: String,
    #[serde(default)]
    bypassed: Vec<String>,
    #[serde(default)]
    remaining_ms: Option<u64>,
    #[serde(default)]
    lockout_remaining_ms: Option<u64>,
    #[serde(default)]
    wrong_codes_ms: Vec<u64>,
    #[serde(default)]
    since: Option<String>,
}

/// The state and `since` of a stored snapshot, for `domoticpi status` (which reads the database).
pub fn stored_status(json: &str) -> Option<(String, Option<String>)> {
    serde_json::from_str::<Stored>(json).ok().map(|s| (s.state, s.since))
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Stored {
    fn new(s: &Snapshot, since: String) -> Stored {
        Stored {
            state: s.state.clone(),
            mode: s.mode.clone(),
            by: s.by.clone(),
            mode_by: s.mode_by.clone(),
            bypassed: s.bypassed.clone(),
            remaining_ms: s.remaining.map(millis),
            lockout_remaining_ms: s.lockout_remaining.map(millis),
            wrong_codes_ms: s.wrong_codes.iter().copied().map(millis).collect(),
            since: Some(since),
        }
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            state: self.state.clone(),
            mode: self.mode.clone(),
            by: self.by.clone(),
            mode_by: self.mode_by.clone(),
            bypassed: self.bypassed.clone(),
            remaining: self.remaining_ms.map(Duration::from_millis),
            lockout_remaining: self.lockout_remaining_ms.map(Duration::from_millis),
            wrong_codes: self.wrong_codes_ms.iter().copied().map(Duration::from_millis).collect(),
        }
    }
}

/// Reads the stored snapshot, retrying a few times: giving up starts the alarm disarmed and
/// overwrites what was stored, so a passing error (a CLI holding the database) must not do that.
async fn load_snapshot(store: &Store) -> Option<String> {
    const ATTEMPTS: u32 = 5;
    for attempt in 1..=ATTEMPTS {
        match store.call(|c| store::alarm::load(c)).await {
            Ok(json) => return json,
            Err(e) if attempt == ATTEMPTS => {
                error!(error = %e, "could not read the stored alarm state; starting disarmed");
            }
            Err(e) => {
                warn!(error = %e, attempt, "could not read the stored alarm state; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    None
}

/// A code being checked, and the command it came with.
type Verifying = (Queued, JoinHandle<Result<CodeCheck, AlarmError>>);

/// What the alarm driver works with.
#[derive(Debug)]
pub struct Parts {
    /// Snapshots, codes and the event log.
    pub store: Store,
    /// The state, events and commands to sirens.
    pub commands: Commands,
    /// The light rules, for `lights_on_trigger`.
    pub lights: crate::lights::LightsHandle,
    /// Checkpoints during delays, for the periodic writer.
    pub checkpoints: mpsc::UnboundedSender<store::alarm::Checkpoint>,
}

/// Runs the alarm until every handle on it is gone (at shutdown, once the sessions and the
/// control socket have ended).
pub async fn run(config: Arc<Config>, parts: Parts, inbox: Inbox) {
    let mut inbox = inbox.0;
    let Parts { store, commands, lights, checkpoints } = parts;
    let mut driver = Driver::start(&config, store, commands, lights, checkpoints).await;
    drop(config);
    driver.carry_out().await;
    driver.replay_retained().await;
    let mut queue: VecDeque<Queued> = VecDeque::new();
    let mut verifying: Option<Verifying> = None;
    loop {
        // Resolve the commands at the head of the queue; one code is checked at a time, in order.
        while verifying.is_none() {
            let Some(queued) = queue.pop_front() else { break };
            verifying = driver.begin(queued).await;
        }
        let wake = driver.next_wake();
        tokio::select! {
            input = inbox.recv() => match input {
                Some(Input::Command(queued)) if queue.len() >= MAX_QUEUED_COMMANDS => driver.refuse_busy(queued),
                Some(Input::Command(queued)) => queue.push_back(queued),
                Some(Input::Sensor { device, tripped, tamper, first_after_connect }) => {
                    driver.sensor(device, tripped, tamper, first_after_connect);
                    driver.carry_out().await;
                }
                Some(Input::Availability { device, online }) => driver.availability(device, online).await,
                Some(Input::Status { reply }) => {
                    let _ = reply.send(driver.status());
                }
                Some(Input::Reconfigure(config)) => driver.reconfigure(&config),
                Some(Input::Stall) => std::future::pending::<()>().await,
                None => break,
            },
            verdict = async {
                match verifying.as_mut() {
                    Some((_, job)) => job.await,
                    None => std::future::pending().await,
                }
            } => {
                if let Some((queued, _)) = verifying.take() {
                    let check = verdict.unwrap_or_else(|e| Err(AlarmError::CodeCheck(e.to_string())));
                    driver.finish(queued, check).await;
                }
            },
            () = tokio::time::sleep_until(wake.unwrap_or_else(tokio::time::Instant::now)), if wake.is_some() => {
                driver.on_wake().await;
            }
        }
    }
    info!("alarm stopped");
}

/// Everything the driver task owns.
struct Driver {
    /// The state machine.
    alarm: Alarm,
    /// The monotonic origin: the machine's `Instant(0)`.
    origin: tokio::time::Instant,
    /// For snapshots, codes and the event log.
    store: Store,
    /// For the state and events.
    outbox: Outbox,
    /// For commands to sirens.
    commands: Commands,
    /// Each declared device's kind, to decode stored states.
    kinds: HashMap<String, DeviceKind>,
    /// The sirens, to know whose coming online deserves a second command.
    sirens: HashSet<String>,
    /// The light rules, which switch every light on for `lights_on_trigger`.
    lights: crate::lights::LightsHandle,
    /// Each sensor's last (tripped, tamper), to fill in what a heartbeat leaves out.
    last: HashMap<String, (bool, bool)>,
    /// Devices seen online since the driver started.
    seen_online: HashSet<String>,
    /// When the current state was entered, RFC 3339.
    since: String,
    /// The stored `since` of a restored state, used for the first state published.
    restored_since: Option<String>,
    /// When the snapshot was last written, for checkpoints during delays.
    last_write: tokio::time::Instant,
    /// Where checkpoints go: the periodic writer, whose one transaction per interval they share.
    checkpoints: mpsc::UnboundedSender<store::alarm::Checkpoint>,
    /// Durable saves made so far; a checkpoint carries it so that a stale one is never written.
    generation: u64,
    /// The generation of the last durable save that reached the store thread.
    saved: Arc<std::sync::atomic::AtomicU64>,
    /// Sirens to command again, and when.
    resend: Vec<(tokio::time::Instant, String)>,
    /// The last snapshot write failed (logged once until one succeeds).
    persist_failing: bool,
}

impl Driver {
    /// Restores or creates the machine and seeds it from the store.
    async fn start(
        config: &Config,
        store: Store,
        commands: Commands,
        lights: crate::lights::LightsHandle,
        checkpoints: mpsc::UnboundedSender<store::alarm::Checkpoint>,
    ) -> Driver {
        let origin = tokio::time::Instant::now();
        let alarm_config = alarm_config(config);
        let stored = load_snapshot(&store).await;
        let restored = stored.and_then(|json| match serde_json::from_str::<Stored>(&json) {
            Ok(s) => match Alarm::restore(alarm_config.clone(), &s.snapshot(), Instant::from_millis(0)) {
                Ok(alarm) => Some((alarm, s.since)),
                Err(e) => {
                    error!(error = %e, "stored alarm state is not valid; starting disarmed");
                    None
                }
            },
            Err(e) => {
                error!(error = %e, "stored alarm state is not readable; starting disarmed");
                None
            }
        });
        let (mut alarm, restored_since) = match restored {
            Some((alarm, since)) => {
                info!(state = %alarm.state(), by = alarm.by(), "alarm restored");
                (alarm, since)
            }
            None => (Alarm::new(alarm_config, Instant::from_millis(0)), None),
        };
        let kinds = config.kinds();
        let mut last = HashMap::new();
        match store.call(|c| store::device_state::all(c)).await {
            Ok(rows) => {
                for row in rows {
                    let (Some(kind), Some(json)) = (kinds.get(&row.id), row.state) else { continue };
                    let Ok(state) = decode::decode_state(*kind, json.as_bytes(), usize::MAX) else { continue };
                    let (tripped, tamper) = reading(&state);
                    let (tripped, tamper) = (tripped.unwrap_or(false), tamper.unwrap_or(false));
                    alarm.seed_sensor(&row.id, tripped, tamper);
                    last.insert(row.id, (tripped, tamper));
                }
            }
            Err(e) => warn!(error = %e, "could not read stored device states; sensors start as not tripped"),
        }
        match store.call(|c| store::alarm::pin_hashes(c)).await {
            Ok(pins) if pins.is_empty() => {
                warn!("no user has an alarm code: nobody can disarm; set one with `domoticpi user pin NAME`")
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "could not read the users' alarm codes"),
        }
        Driver {
            alarm,
            origin,
            store,
            outbox: commands.outbox().clone(),
            commands,
            kinds,
            sirens: ids_of(config, DeviceKind::Siren).into_iter().collect(),
            lights,
            last,
            seen_online: HashSet::new(),
            since: store::rfc3339(crate::wall::now_utc()),
            restored_since,
            last_write: origin,
            checkpoints,
            generation: 0,
            saved: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            resend: Vec::new(),
            persist_failing: false,
        }
    }

    /// Applies a reloaded config to the machine and to what the driver keeps per device.
    fn reconfigure(&mut self, config: &Config) {
        self.alarm.reconfigure(alarm_config(config));
        self.kinds = config.kinds();
        self.sirens = ids_of(config, DeviceKind::Siren).into_iter().collect();
        self.last.retain(|id, _| self.kinds.contains_key(id));
        self.resend.retain(|(_, id)| self.kinds.contains_key(id));
        info!(state = %self.alarm.state(), "alarm reconfigured; its state and any running delay are kept");
    }

    /// Feeds the retained device states replayed at start as first-after-connect reports.
    async fn replay_retained(&mut self) {
        let retained = match self.store.call(|c| store::retained::all(c)).await {
            Ok(rows) => rows,
            Err(e) => {
                warn!(error = %e, "could not read retained device states for the alarm");
                return;
            }
        };
        for (topic, payload) in retained {
            let Ok(topic) = std::str::from_utf8(&topic) else { continue };
            let Some(Topic::Device { id, leaf: Leaf::State }) = topics::parse(topic) else { continue };
            let Some(kind) = self.kinds.get(id) else { continue };
            let Ok(state) = decode::decode_state(*kind, &payload, usize::MAX) else { continue };
            let (tripped, tamper) = reading(&state);
            self.sensor(id.to_owned(), tripped, tamper, true);
            self.carry_out().await;
        }
    }

    /// Milliseconds since the origin, on the machine's clock.
    fn now(&self) -> Instant {
        Instant::from_millis(millis(self.origin.elapsed()))
    }

    /// The tokio instant of a machine instant.
    fn at(&self, t: Instant) -> tokio::time::Instant {
        self.origin + Duration::from_millis(t.as_millis())
    }

    /// The earliest of the machine's deadline, a checkpoint and a siren resend.
    fn next_wake(&self) -> Option<tokio::time::Instant> {
        let deadline = self.alarm.poll_timeout().map(|t| self.at(t));
        let checkpoint = deadline.map(|_| self.last_write + CHECKPOINT);
        let resend = self.resend.iter().map(|(t, _)| *t).min();
        [deadline, checkpoint, resend].into_iter().flatten().min()
    }

    /// The wall-clock time of a machine instant, RFC 3339.
    fn wall(&self, t: Instant) -> String {
        let ago = self.now().saturating_duration_since(t);
        let now = crate::wall::now_utc();
        store::rfc3339(time::Duration::try_from(ago).ok().and_then(|d| now.checked_sub(d)).unwrap_or(now))
    }

    fn status(&self) -> Status {
        Status {
            state: self.alarm.state().as_str().to_owned(),
            since: self.since.clone(),
            by: self.alarm.by().to_owned(),
            bypassed: self.alarm.bypassed().map(str::to_owned).collect(),
            code_locked_out: self.alarm.code_locked_out(self.now()),
            remaining_ms: self.alarm.snapshot(self.now()).remaining.map(millis),
            locked_until: self.alarm.snapshot(self.now()).lockout_remaining.map(|left| {
                let now = crate::wall::now_utc();
                store::rfc3339(time::Duration::try_from(left).ok().and_then(|d| now.checked_add(d)).unwrap_or(now))
            }),
        }
    }

    /// Feeds one sensor report, filling what it leaves out with the last one.
    fn sensor(&mut self, device: String, tripped: Option<bool>, tamper: Option<bool>, first_after_connect: bool) {
        let (was_tripped, was_tamper) = self.last.get(&device).copied().unwrap_or((false, false));
        let heartbeat = tripped.is_none();
        let (tripped, tamper) = (tripped.unwrap_or(was_tripped), tamper.unwrap_or(was_tamper));
        self.last.insert(device.clone(), (tripped, tamper));
        let first_after_connect = first_after_connect || heartbeat;
        let now = self.now();
        self.alarm.handle_event(Event::SensorState { device, tripped, tamper, first_after_connect }, now);
    }

    /// Feeds a device's availability; sirens coming online are commanded again a little later.
    async fn availability(&mut self, device: String, online: bool) {
        if online {
            self.seen_online.insert(device.clone());
            if self.sirens.contains(&device) {
                self.resend.retain(|(_, d)| *d != device);
                self.resend.push((tokio::time::Instant::now() + SIREN_RESEND, device.clone()));
            }
        } else if !self.seen_online.contains(&device) {
            // The hub marks every device offline at start: that is no sensor going offline.
            return;
        }
        let now = self.now();
        self.alarm.handle_event(Event::Availability { device, online }, now);
        self.carry_out().await;
    }

    /// Starts on a command: applies it at once when no code needs checking, else starts the check.
    async fn begin(&mut self, queued: Queued) -> Option<Verifying> {
        let check = match (&queued.command.action, &queued.command.code) {
            (Command::Panic, _) | (_, None) => CodeCheck::Missing,
            (_, Some(_)) if self.alarm.code_locked_out(self.now()) => CodeCheck::Invalid,
            (_, Some(code)) => {
                let (store, code) = (self.store.clone(), code.clone());
                let job = tokio::spawn(async move {
                    let pins = store.call(|c| store::alarm::pin_hashes(c)).await;
                    let pins = pins.map_err(|e| AlarmError::CodeCheck(e.to_string()))?;
                    tokio::task::spawn_blocking(move || {
                        let user = pins.into_iter().find(|(_, hash)| auth::verify(hash, &code)).map(|(user, _)| user);
                        user.map_or(CodeCheck::Invalid, |user| CodeCheck::Valid { user })
                    })
                    .await
                    .map_err(|e| AlarmError::CodeCheck(e.to_string()))
                });
                return Some((queued, job));
            }
        };
        self.finish(queued, Ok(check)).await;
        None
    }

    /// Applies a command with the verdict on its code, and answers whoever waits for it.
    async fn finish(&mut self, queued: Queued, check: Result<CodeCheck, AlarmError>) {
        let Queued { command, source, client, reply } = queued;
        let code = match check {
            Ok(code) => code,
            Err(e) => {
                error!(error = %e, by = source.name(), "alarm command dropped");
                match reply {
                    Some(reply) => {
                        let _ = reply.send(Err(e));
                    }
                    None => self.outbox.report_error(topics::ALARM_SET, &client, &e.to_string()),
                }
                return;
            }
        };
        let now = self.now();
        let event = Event::Command { action: command.action, code, force: command.force, by: source };
        self.alarm.handle_event(event, now);
        let events = self.carry_out().await;
        if let Some(reply) = reply {
            let _ = reply.send(Ok(Outcome { events, status: self.status() }));
        }
    }

    /// Refuses a command because too many wait.
    fn refuse_busy(&self, queued: Queued) {
        warn!(by = queued.source.name(), "alarm command refused: too many waiting");
        match queued.reply {
            Some(reply) => {
                let _ = reply.send(Err(AlarmError::Busy));
            }
            None => self.outbox.report_error(topics::ALARM_SET, &queued.client, &AlarmError::Busy.to_string()),
        }
    }

    /// Fires the machine's deadline, siren resends and checkpoints that are due.
    async fn on_wake(&mut self) {
        let now = self.now();
        if self.alarm.poll_timeout().is_some_and(|t| t <= now) {
            self.alarm.handle_timeout(now);
            self.carry_out().await;
        }
        let due = tokio::time::Instant::now();
        let (resend, later): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.resend).into_iter().partition(|(t, _)| *t <= due);
        self.resend = later;
        let on = matches!(self.alarm.state(), State::Triggered { .. });
        for (_, device) in resend {
            self.siren(&device, on);
        }
        if self.alarm.poll_timeout().is_some() && self.last_write + CHECKPOINT <= due {
            let snapshot = self.alarm.snapshot(self.now());
            let since = self.since.clone();
            self.checkpoint(&snapshot, since);
        }
    }

    /// Carries out every queued action in order; returns the events published.
    async fn carry_out(&mut self) -> Vec<EventRecord> {
        let actions: Vec<Action> = std::iter::from_fn(|| self.alarm.poll_action()).collect();
        let mut events = Vec::new();
        for (i, action) in actions.iter().enumerate() {
            match action {
                Action::Persist(snapshot) => {
                    // The `since` of the state this snapshot announces, if it announces one.
                    let since = actions[i + 1..]
                        .iter()
                        .take_while(|a| !matches!(a, Action::Persist(_)))
                        .find_map(|a| match a {
                            Action::PublishState { since, .. } => Some(self.since_of(*since)),
                            _ => None,
                        })
                        .unwrap_or_else(|| self.since.clone());
                    self.persist(snapshot, since).await;
                }
                Action::PublishState { state, since, by } => {
                    self.since = self.since_of(*since);
                    self.restored_since = None;
                    let body = serde_json::json!({ "state": state.as_str(), "since": self.since, "by": by });
                    self.outbox.publish(topics::ALARM_STATE, body.to_string(), true);
                    info!(state = %state, %by, "alarm state");
                }
                Action::Event { kind, device, reason, user } => {
                    let record = EventRecord {
                        event: kind.as_str().to_owned(),
                        device: device.clone(),
                        reason: reason.clone(),
                        at: store::now_rfc3339(),
                        user: user.clone(),
                    };
                    self.event(&record).await;
                    events.push(record);
                }
                Action::Siren { device, on } => self.siren(device, *on),
                Action::AllLightsOn => {
                    // The light rules command every light, so they know the hub switched them on.
                    self.lights.alarm_triggered();
                    info!("alarm: every light on");
                }
            }
        }
        events
    }

    /// The RFC 3339 `since` of a state entered at `t` (the stored one for a restored state).
    fn since_of(&self, t: Instant) -> String {
        self.restored_since.clone().unwrap_or_else(|| self.wall(t))
    }

    /// Hands the time left in a delay to the periodic writer (not fsynced: after a power cut the
    /// delay resumes from an earlier checkpoint or the state change, a little longer, never shorter).
    fn checkpoint(&mut self, snapshot: &Snapshot, since: String) {
        self.last_write = tokio::time::Instant::now();
        match serde_json::to_string(&Stored::new(snapshot, since)) {
            Ok(json) => {
                let saved = Arc::clone(&self.saved);
                let _ = self.checkpoints.send(store::alarm::Checkpoint { generation: self.generation, json, saved });
            }
            Err(e) => error!(error = %e, "could not encode the alarm state"),
        }
    }

    /// Writes the snapshot durably; a failure is logged and the alarm carries on.
    async fn persist(&mut self, snapshot: &Snapshot, since: String) {
        self.last_write = tokio::time::Instant::now();
        let json = match serde_json::to_string(&Stored::new(snapshot, since)) {
            Ok(json) => json,
            Err(e) => {
                error!(error = %e, "could not encode the alarm state");
                return;
            }
        };
        self.generation += 1;
        let (generation, saved) = (self.generation, Arc::clone(&self.saved));
        match self.store.durable(move |tx| store::alarm::save_durable(tx, &json, generation, &saved)).await {
            Ok(()) if self.persist_failing => {
                info!("the alarm state is being saved again");
                self.persist_failing = false;
            }
            Ok(()) => {}
            Err(e) => {
                if !self.persist_failing {
                    error!(error = %e, "alarm state NOT saved (disk full?); the alarm carries on but a restart would lose it");
                }
                self.persist_failing = true;
            }
        }
    }

    /// Publishes one event, logs it and records it in the event log.
    async fn event(&self, record: &EventRecord) {
        match serde_json::to_string(record) {
            Ok(body) => self.outbox.publish(topics::ALARM_EVENT, body, false),
            Err(e) => warn!(error = %e, "could not encode an alarm event"),
        }
        let device = record.device.as_deref().unwrap_or("-");
        let user = record.user.as_deref().unwrap_or("-");
        info!(event = %record.event, %device, %user, reason = %record.reason, "alarm event");
        let mut detail = format!("{}: {}", record.event, record.reason);
        if let Some(device) = &record.device {
            detail.push_str(&format!(" (device {device})"));
        }
        if let Some(user) = &record.user {
            detail.push_str(&format!(" (user {user})"));
        }
        if let Err(e) = self.store.call(move |c| store::events::record(c, "alarm", &detail)).await {
            warn!(error = %e, "could not record an alarm event");
        }
    }

    fn siren(&self, device: &str, on: bool) {
        self.commands.set(device, if on { r#"{"on":true}"# } else { r#"{"on":false}"# });
        info!(%device, on, "siren");
    }
}

/// `arm_away`, `arm_home`, `arm_night` for a mode.
pub fn arm_action(mode: Mode) -> &'static str {
    match mode {
        Mode::Away => "arm_away",
        Mode::Home => "arm_home",
        Mode::Night => "arm_night",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One line per case: payload ⇒ Ok((action, has code, force)) or the error's text.
    macro_rules! set_cases {
        ($($name:ident: $payload:expr => $want:expr;)*) => {$(
            #[test]
            fn $name() {
                let got = parse_set($payload.as_bytes())
                    .map(|c| (c.action, c.code.map(|s| s.expose().to_owned()), c.force))
                    .map_err(|e| e.to_string());
                assert_eq!(got, $want);
            }
        )*};
    }

    fn ok(action: Command, code: Option<&str>, force: bool) -> Result<(Command, Option<String>, bool), String> {
        Ok((action, code.map(str::to_owned), force))
    }
    fn err(text: &str) -> Result<(Command, Option<String>, bool), String> {
        Err(text.to_owned())
    }

    set_cases! {
        set_arm_away: r#"{"action":"arm_away"}"# => ok(Command::Arm(Mode::Away), None, false);
        set_arm_night_forced: r#"{"action":"arm_night","force":true}"# => ok(Command::Arm(Mode::Night), None, true);
        set_disarm_with_code: r#"{"action":"disarm","code":"1234"}"# => ok(Command::Disarm, Some("1234"), false);
        set_empty_code_is_none: r#"{"action":"disarm","code":""}"# => ok(Command::Disarm, None, false);
        set_null_code_is_none: r#"{"action":"disarm","code":null}"# => ok(Command::Disarm, None, false);
        set_panic_extra_fields: r#"{"action":"panic","battery":80}"# => ok(Command::Panic, None, false);
        set_numeric_code_refused_unquoted: r#"{"action":"disarm","code":1234}"# => err("code must be a string of at most 64 characters");
        set_unknown_action: r#"{"action":"explode"}"# => err("unknown action \"explode\" (arm_away, arm_home, arm_night, disarm or panic)");
        set_missing_action: r#"{"code":"1234"}"# => err("action is missing (arm_away, arm_home, arm_night, disarm or panic)");
        set_force_not_bool: r#"{"action":"arm_home","force":"yes"}"# => err("force must be true or false");
        set_not_an_object: r#"["disarm"]"# => err("payload is JSON but not an object");
        set_bare_word: "disarm" => err("payload is not valid JSON: expected value at line 1 column 1");
    }

    #[test]
    fn errors_never_quote_the_code() {
        for payload in [r#"{"action":"disarm","code":987654}"#, r#"{"action":"disarm","code":["987654"]}"#] {
            let e = parse_set(payload.as_bytes()).unwrap_err().to_string();
            assert!(!e.contains("987654"), "{e}");
        }
        let long = format!(r#"{{"action":"disarm","code":"{}"}}"#, "9".repeat(65));
        assert!(!parse_set(long.as_bytes()).unwrap_err().to_string().contains("999"));
    }

    #[test]
    fn redaction_drops_only_the_code() {
        assert_eq!(redact(br#"{"action":"panic"}"#), None);
        let out = redact(br#"{"action":"disarm","code":"1234","force":false}"#).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v, serde_json::json!({"action": "disarm", "force": false}));
    }

    #[test]
    fn readings_per_kind() {
        let state = |kind, payload: &str| decode::decode_state(kind, payload.as_bytes(), 1024).unwrap();
        assert_eq!(reading(&state(DeviceKind::Contact, "OPEN")), (Some(true), None));
        assert_eq!(
            reading(&state(DeviceKind::Contact, r#"{"contact":"closed","tamper":true}"#)),
            (Some(false), Some(true))
        );
        assert_eq!(reading(&state(DeviceKind::Motion, r#"{"motion":true}"#)), (Some(true), None));
        assert_eq!(reading(&state(DeviceKind::Smoke, "1")), (Some(true), None));
        assert_eq!(reading(&state(DeviceKind::Siren, r#"{"on":true}"#)), (Some(false), None));
        assert_eq!(reading(&state(DeviceKind::Motion, r#"{"battery":50}"#)), (None, None));
    }

    #[test]
    fn the_stored_snapshot_round_trips() {
        let snapshot = Snapshot {
            state: "pending".into(),
            mode: Some("away".into()),
            by: "front-door".into(),
            mode_by: "alice".into(),
            bypassed: vec!["back-window".into()],
            remaining: Some(Duration::from_millis(1_500)),
            lockout_remaining: None,
            wrong_codes: vec![Duration::from_secs(200)],
        };
        let stored = Stored::new(&snapshot, "2024-01-01T00:00:00Z".into());
        let back: Stored = serde_json::from_str(&serde_json::to_string(&stored).unwrap()).unwrap();
        assert_eq!(back.snapshot(), snapshot);
        assert_eq!(back.since.as_deref(), Some("2024-01-01T00:00:00Z"));
    }

    #[test]
    fn the_config_lists_sensors_and_sirens() {
        let text = "[[device]]\nid = \"door\"\nkind = \"contact\"\nzone = \"entry\"\n\
            [[device]]\nid = \"lamp\"\nkind = \"light\"\n\
            [[device]]\nid = \"smoke\"\nkind = \"smoke\"\n\
            [[device]]\nid = \"siren\"\nkind = \"siren\"\n";
        let config = Config::from_toml(text, None).unwrap();
        let alarm = alarm_config(&config);
        let ids: Vec<&str> = alarm.sensors.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["door", "smoke", "siren"]);
        assert_eq!(alarm.sensors[0].zone, Zone::Entry);
        assert_eq!(alarm.sensors[1].kind, SensorKind::Smoke);
        assert_eq!(alarm.sirens, ["siren"]);
    }
}
