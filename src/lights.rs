//! The lights driver: the one task that owns the light rules' state machine
//! ([`domoticpi_rules::lights`]) and carries out what it decides (SPEC §7 "Lights", `dpi/scene/set`).
//!
//! Inputs reach the task over one channel, in the order they happened, through a [`LightsHandle`]:
//! decoded states of the devices the rules use and scene requests (already through the ACL and
//! checked against the configured scenes), both from the dispatcher ([`crate::dispatcher`]), the
//! alarm's "every light on", and a reloaded config ([`Lights::reconfigure`]: timers of rules that
//! still exist keep running). The task maps tokio's monotonic clock to the machine's [`Instant`] (milliseconds
//! since the task started), reads the wall clock ([`crate::wall::now`]) at each event and
//! wake-up — the only place in the hub that does so for the rules — and sleeps until
//! [`Lights::poll_timeout`]. Each [`Action::Set`] is published, not retained, to `dpi/ID/set` as
//! `{"on": bool, "brightness": n}` with only the fields the command carries.
//!
//! At start the lights' and lux sensors' stored states seed the machine (a light's first report
//! belongs to nobody), then [`Lights::start`] applies what the schedules want right now. Motion and
//! switch states from before the start are not replayed: they are not new.
//!
//! This module must not decide what an event means (the machine does) and must not block.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use domoticpi_rules::lights::{
    Action, Days, Event, House, LightCommand, Lights, LightsConfig, LuxLimit, MotionLight, Scene, Schedule, Switch,
    SwitchAction, When,
};
use domoticpi_rules::Instant;
use jiff::civil::Weekday;
use serde_json::Value;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::config::{self, Config, DeviceKind};
use crate::decode::{self, DeviceState, Main};
use crate::dispatcher::Commands;
use crate::store::{self, Store};
use crate::topics;

/// Longest scene id quoted back in an error.
const MAX_QUOTED: usize = 32;

/// Why a `dpi/scene/set` payload was refused; the `Display` is one line for `dpi/hub/error`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SceneError {
    /// The payload is not a JSON object.
    #[error(transparent)]
    Payload(#[from] crate::decode::DecodeError),
    /// The object has no string `scene`.
    #[error("scene must be a string naming a configured scene")]
    MissingScene,
    /// No scene has this id.
    #[error("unknown scene {0:?}")]
    UnknownScene(String),
}

/// Parses a `dpi/scene/set` payload `{"scene": "ID"}` into the scene id; other fields are ignored.
pub fn parse_scene(payload: &[u8]) -> Result<String, SceneError> {
    let fields = crate::decode::json_object(payload)?;
    match fields.get("scene") {
        Some(Value::String(id)) if !id.is_empty() => Ok(id.clone()),
        _ => Err(SceneError::MissingScene),
    }
}

/// Whether `id` is one of the declared `scenes`; an unknown one is refused before it is routed.
pub fn check_scene(scenes: &HashSet<String>, id: &str) -> Result<(), SceneError> {
    match scenes.contains(id) {
        true => Ok(()),
        false => Err(SceneError::UnknownScene(id.chars().take(MAX_QUOTED).collect())),
    }
}

/// The machine's configuration from the hub's.
pub fn lights_config(config: &Config) -> LightsConfig {
    let house = House {
        latitude: config.house.latitude.unwrap_or(0.0),
        longitude: config.house.longitude.unwrap_or(0.0),
        timezone: config.house.timezone.clone(),
    };
    let lights = config.devices.iter().filter(|d| d.kind == DeviceKind::Light).map(|d| d.id.clone()).collect();
    let motion_lights = config
        .rules
        .motion_light
        .iter()
        .map(|r| MotionLight {
            sensors: r.sensors.clone(),
            lights: r.lights.clone(),
            off_after: r.off_after,
            when: match r.when {
                config::When::Always => When::Always,
                config::When::Night => When::Night,
            },
            lux: r.lux_sensor.clone().zip(r.max_lux).map(|(sensor, max_lux)| LuxLimit { sensor, max_lux }),
        })
        .collect();
    let schedules = config
        .rules
        .schedule
        .iter()
        .map(|s| Schedule {
            lights: s.lights.clone(),
            on: s.on,
            off: s.off,
            days: s.days.iter().copied().map(weekday).collect::<Days>(),
        })
        .collect();
    let switches = config
        .rules
        .switch
        .iter()
        .map(|s| Switch {
            switch: s.switch.clone(),
            lights: s.lights.clone(),
            action: match s.action {
                config::SwitchAction::Toggle => SwitchAction::Toggle,
                config::SwitchAction::On => SwitchAction::On,
                config::SwitchAction::Off => SwitchAction::Off,
            },
        })
        .collect();
    let scenes = config
        .scenes
        .iter()
        .map(|s| Scene {
            id: s.id.clone(),
            set: s
                .set
                .iter()
                .map(|(light, setting)| {
                    let brightness = setting.brightness.map(|b| u8::try_from(b).unwrap_or(u8::MAX));
                    (light.clone(), LightCommand { on: setting.on, brightness })
                })
                .collect(),
        })
        .collect();
    LightsConfig { house, lights, motion_lights, schedules, switches, scenes }
}

/// The jiff weekday of a config day.
fn weekday(day: config::Day) -> Weekday {
    match day {
        config::Day::Mon => Weekday::Monday,
        config::Day::Tue => Weekday::Tuesday,
        config::Day::Wed => Weekday::Wednesday,
        config::Day::Thu => Weekday::Thursday,
        config::Day::Fri => Weekday::Friday,
        config::Day::Sat => Weekday::Saturday,
        config::Day::Sun => Weekday::Sunday,
    }
}

/// The machine's event for a device's decoded state, if the state says anything to the rules.
pub fn event_of(id: &str, state: &DeviceState) -> Option<Event> {
    let switch = |action: &str| Some(Event::Switch { device: id.to_owned(), action: action.to_owned() });
    match state.main.as_ref()? {
        // A door opening in a motion-light rule is presence, like motion.
        Main::Motion(true) | Main::Contact(crate::decode::Contact::Open) => {
            Some(Event::Motion { sensor: id.to_owned() })
        }
        Main::Lux(lux) => Some(Event::Lux { sensor: id.to_owned(), lux: *lux }),
        Main::Light { on, brightness } => {
            Some(Event::LightState { light: id.to_owned(), on: *on, brightness: *brightness })
        }
        Main::Switch { action: Some(action), .. } | Main::Button { action } => switch(action),
        Main::Switch { action: None, on: Some(on) } => switch(if *on { "on" } else { "off" }),
        _ => None,
    }
}

/// The JSON of a light command: `{"on": bool, "brightness": n}`, only the fields it carries.
pub fn command_json(command: &LightCommand) -> String {
    let fields: Vec<String> =
        [command.on.map(|on| format!("\"on\":{on}")), command.brightness.map(|b| format!("\"brightness\":{b}"))]
            .into_iter()
            .flatten()
            .collect();
    format!("{{{}}}", fields.join(","))
}

/// One input to the driver.
#[derive(Debug)]
enum Input {
    /// A device the rules use reported something they react to.
    Event(Event),
    /// A resident asked for a scene on connection `client`.
    Scene { id: String, client: String },
    /// The config was reloaded.
    Reconfigure(Arc<Config>),
}

/// The rest of the hub's handle on the driver; cheap to clone.
#[derive(Debug, Clone)]
pub struct LightsHandle {
    /// To the driver task.
    inputs: mpsc::UnboundedSender<Input>,
}

/// The driver's end of the channel, for [`run`].
#[derive(Debug)]
pub struct Inbox(mpsc::UnboundedReceiver<Input>);

/// A handle for the light rules' driver and the inbox to give [`run`].
pub fn channel() -> (LightsHandle, Inbox) {
    let (inputs, rx) = mpsc::unbounded_channel();
    (LightsHandle { inputs }, Inbox(rx))
}

/// The devices the rules of `config` use, and its scene ids.
pub fn interests(config: &Config) -> (HashSet<String>, HashSet<String>) {
    let lights = lights_config(config);
    let mut watched: HashSet<String> = lights.lights.iter().cloned().collect();
    for rule in &lights.motion_lights {
        watched.extend(rule.sensors.iter().chain(&rule.lights).cloned());
        watched.extend(rule.lux.iter().map(|l| l.sensor.clone()));
    }
    for rule in &lights.schedules {
        watched.extend(rule.lights.iter().cloned());
    }
    for rule in &lights.switches {
        watched.insert(rule.switch.clone());
        watched.extend(rule.lights.iter().cloned());
    }
    for scene in &lights.scenes {
        watched.extend(scene.set.keys().cloned());
    }
    (watched, lights.scenes.iter().map(|s| s.id.clone()).collect())
}

impl LightsHandle {
    /// Passes on the decoded state of a device the rules use (see [`interests`]), if it says something.
    pub fn device_state(&self, id: &str, state: &DeviceState) {
        if let Some(event) = event_of(id, state) {
            let _ = self.inputs.send(Input::Event(event));
        }
    }

    /// Hands over a `dpi/scene/set` for a declared scene `id` from connection `client`.
    pub fn scene(&self, id: String, client: &str) {
        let _ = self.inputs.send(Input::Scene { id, client: client.to_owned() });
    }

    /// Applies a reloaded config: timers of rules that still exist keep running, changed rules act
    /// from their next event.
    pub fn reconfigure(&self, config: Arc<Config>) {
        let _ = self.inputs.send(Input::Reconfigure(config));
    }

    /// The alarm triggered with `lights_on_trigger` set: every light goes on.
    pub fn alarm_triggered(&self) {
        let _ = self.inputs.send(Input::Event(Event::AlarmTriggered));
    }
}

/// Runs the light rules until every handle on them is gone (at shutdown, once the dispatcher and
/// the alarm driver have ended).
pub async fn run(config: Arc<Config>, store: Store, commands: Commands, inbox: Inbox) {
    let mut inbox = inbox.0;
    let mut driver =
        Driver { lights: Lights::new(lights_config(&config)), origin: tokio::time::Instant::now(), commands };
    driver.seed(&config, &store).await;
    drop((config, store));
    let now = driver.now();
    driver.lights.start(now, crate::wall::now());
    driver.carry_out();
    let mut steps = crate::wall::StepWatch::default();
    let mut stepped = crate::wall::stepped();
    loop {
        let wake = driver.lights.poll_timeout().map(|t| driver.at(t));
        tokio::select! {
            input = inbox.recv() => match input {
                Some(input) => {
                    steps.look();
                    driver.input(input);
                }
                None => break,
            },
            () = tokio::time::sleep_until(wake.unwrap_or_else(tokio::time::Instant::now)), if wake.is_some() => {
                steps.look();
                driver.timeout();
            }
            // Only the test-only clock setter sends this; a real step is seen at the next wake.
            Ok(()) = stepped.changed() => {
                steps.look();
                driver.timeout();
            }
        }
    }
    info!("light rules stopped");
}

/// Everything the driver task owns.
struct Driver {
    /// The state machine.
    lights: Lights,
    /// The monotonic origin: the machine's `Instant(0)`.
    origin: tokio::time::Instant,
    /// For the lights' commands and errors.
    commands: Commands,
}

impl Driver {
    /// Feeds the stored states of lights and lux sensors, so the machine knows what is on.
    async fn seed(&mut self, config: &Config, store: &Store) {
        let kinds = config.kinds();
        let rows = match store.call(|c| store::device_state::all(c)).await {
            Ok(rows) => rows,
            Err(e) => {
                warn!(error = %e, "could not read stored device states; lights start as unknown");
                return;
            }
        };
        for row in rows {
            let (Some(kind @ (DeviceKind::Light | DeviceKind::Lux)), Some(json)) = (kinds.get(&row.id), row.state)
            else {
                continue;
            };
            let Ok(state) = decode::decode_state(*kind, json.as_bytes(), usize::MAX) else { continue };
            if let Some(event) = event_of(&row.id, &state) {
                let now = self.now();
                let _ = self.lights.handle_event(event, now, crate::wall::now());
            }
        }
        // Seeding only records states; anything it queued would be a stale command.
        while self.lights.poll_action().is_some() {}
    }

    /// Milliseconds since the origin, on the machine's clock.
    fn now(&self) -> Instant {
        Instant::from_millis(u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX))
    }

    /// The tokio instant of a machine instant.
    fn at(&self, t: Instant) -> tokio::time::Instant {
        self.origin + Duration::from_millis(t.as_millis())
    }

    /// Runs what is due and carries it out.
    fn timeout(&mut self) {
        let now = self.now();
        self.lights.handle_timeout(now, crate::wall::now());
        self.carry_out();
    }

    /// Feeds one input and carries out what follows.
    fn input(&mut self, input: Input) {
        let now = self.now();
        let wall = crate::wall::now();
        match input {
            Input::Event(event) => {
                if let Err(e) = self.lights.handle_event(event, now, wall) {
                    warn!(error = %e, "light event refused");
                }
            }
            Input::Scene { id, client } => {
                if let Err(e) = self.lights.handle_event(Event::Scene { id: id.clone() }, now, wall) {
                    warn!(%client, error = %e, "scene refused");
                    self.commands.outbox().report_error(topics::SCENE_SET, &client, &e.to_string());
                } else {
                    info!(scene = %id, %client, "scene applied");
                }
            }
            Input::Reconfigure(config) => {
                self.lights.reconfigure(lights_config(&config), now, wall);
                info!("light rules reconfigured; timers of unchanged rules keep running");
            }
        }
        self.carry_out();
    }

    /// Publishes every queued command, in order.
    fn carry_out(&mut self) {
        while let Some(Action::Set { light, command }) = self.lights.poll_action() {
            let json = command_json(&command);
            info!(%light, command = %json, "light command");
            self.commands.set(&light, &json);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::DecodeError;

    #[test]
    fn commands_carry_only_their_fields() {
        assert_eq!(command_json(&LightCommand::ON), r#"{"on":true}"#);
        assert_eq!(
            command_json(&LightCommand { on: Some(false), brightness: Some(40) }),
            r#"{"on":false,"brightness":40}"#
        );
        assert_eq!(command_json(&LightCommand { on: None, brightness: Some(7) }), r#"{"brightness":7}"#);
    }

    #[test]
    fn scene_payloads() {
        assert_eq!(parse_scene(br#"{"scene":"evening"}"#), Ok("evening".to_owned()));
        assert_eq!(
            parse_scene(b"evening"),
            Err(SceneError::Payload(DecodeError::NotJson("expected value at line 1 column 1".into())))
        );
        assert_eq!(parse_scene(b"[1]"), Err(SceneError::Payload(DecodeError::NotAnObject)));
        assert_eq!(parse_scene(br#"{"scene":3}"#), Err(SceneError::MissingScene));
        assert_eq!(parse_scene(&[0xff]), Err(SceneError::Payload(DecodeError::NotUtf8)));
    }

    #[test]
    fn device_states_become_events() {
        let state = |main| DeviceState { main: Some(main), tamper: None, battery: None, fields: Default::default() };
        assert_eq!(event_of("m", &state(Main::Motion(true))), Some(Event::Motion { sensor: "m".into() }));
        assert_eq!(event_of("m", &state(Main::Motion(false))), None);
        let open = state(Main::Contact(crate::decode::Contact::Open));
        assert_eq!(event_of("door", &open), Some(Event::Motion { sensor: "door".into() }));
        assert_eq!(event_of("door", &state(Main::Contact(crate::decode::Contact::Closed))), None);
        let rocker = state(Main::Switch { on: Some(false), action: None });
        assert_eq!(event_of("s", &rocker), Some(Event::Switch { device: "s".into(), action: "off".into() }));
        let button = state(Main::Button { action: "single".into() });
        assert_eq!(event_of("b", &button), Some(Event::Switch { device: "b".into(), action: "single".into() }));
    }

    #[test]
    fn converts_the_config() {
        let toml = "[house]\nlatitude = 52.0\nlongitude = 4.0\ntimezone = \"Europe/Amsterdam\"\n\
            [[device]]\nid = \"m\"\nkind = \"motion\"\n[[device]]\nid = \"l1\"\nkind = \"light\"\n\
            [[device]]\nid = \"lx\"\nkind = \"lux\"\n\
            [[rule.motion_light]]\nsensors = [\"m\"]\nlights = [\"l1\"]\noff_after_s = 5\nlux_sensor = \"lx\"\nmax_lux = 30.0\n\
            [[rule.schedule]]\nlights = [\"l1\"]\non = \"sunset\"\noff = \"23:00\"\ndays = [\"sat\", \"sun\"]\n\
            [[scene]]\nid = \"dim\"\nset = { l1 = { on = true, brightness = 40 } }\n";
        let config = Config::from_toml(toml, None).unwrap();
        let lights = lights_config(&config);
        assert_eq!(lights.lights, ["l1"]);
        assert_eq!(lights.motion_lights[0].off_after, Duration::from_secs(5));
        assert_eq!(lights.motion_lights[0].lux.as_ref().map(|l| l.max_lux), Some(30.0));
        assert!(lights.schedules[0].days.contains(Weekday::Sunday));
        assert!(!lights.schedules[0].days.contains(Weekday::Monday));
        assert_eq!(lights.scenes[0].set["l1"], LightCommand { on: Some(true), brightness: Some(40) });
        let (watched, scenes) = interests(&config);
        assert!(watched.contains("m") && watched.contains("lx") && scenes.contains("dim"));
    }
}
