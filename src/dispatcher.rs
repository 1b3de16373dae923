//! The house side's one entry: what each accepted message means, and the house as configured.
//!
//! The broker hands every PUBLISH that passed its guard and ACL, every will at CONNECT and every
//! connection up or down to the [`Dispatcher`] (through [`Dispatch`], the one interface between
//! them). The dispatcher judges device messages ([`devices::judge`]), records them
//! ([`devices::Pipeline`]), and hands what matters on: sensor states and availability to the alarm
//! driver, states to the light rules' driver, `dpi/alarm/set` and `dpi/scene/set` to theirs. It
//! announces each device's availability (retained), the hub's word on it.
//!
//! Devices on their own firmware's topics (SPEC §11) are translated by [`sources`](crate::sources) both ways: a
//! firmware state is judged and recorded as the device's `dpi/ID/state` (which the hub then
//! publishes, retained), and a command to such a device, from a client or from a driver through
//! [`Commands`], is also published in the firmware's words.
//!
//! The configured house is one value, [`House`], built from the config and swapped whole at a
//! reload ([`Dispatcher::swap`]): a message is judged against one house, never half of two.
//! This module must not speak MQTT (that is the broker's) nor decide anything a rule decides.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tokio_util::task::TaskTracker;

use crate::alarm::{self, AlarmHandle};
use crate::auth::{Declared, Identity};
use crate::broker::dispatch::{Dispatch, Origin, Outbox, Verdict};
use crate::config::{self, Config, DeviceKind};
use crate::decode::DeviceState;
use crate::devices::{self, Judged, OutboxInput, Pipeline, RetainedChange};
use crate::hass;
use crate::lights::{self, LightsHandle};
use crate::sources::{Mapped, Sources};
use crate::store::Store;
use crate::topics::{self, Leaf, Topic};

/// The house as configured: the config and what the dispatcher looks up in it on every message.
#[derive(Debug)]
pub struct House {
    /// The config it was built from.
    pub config: Arc<Config>,
    /// Declared devices and their kinds.
    kinds: HashMap<String, DeviceKind>,
    /// Devices whose states and availability the alarm uses.
    alarm_watch: HashSet<String>,
    /// Devices whose states the light rules use.
    lights_watch: HashSet<String>,
    /// Declared scene ids.
    scenes: HashSet<String>,
    /// The devices on their own firmware's topics.
    sources: Sources,
}

impl House {
    /// The house of a validated config.
    pub fn new(config: Config) -> House {
        let kinds = config.kinds();
        let alarm_watch = alarm::watched(&config);
        let (lights_watch, scenes) = lights::interests(&config);
        let sources = Sources::new(&config);
        House { config: Arc::new(config), kinds, alarm_watch, lights_watch, scenes, sources }
    }

    /// The kind of a declared device.
    pub fn kind(&self, id: &str) -> Option<DeviceKind> {
        self.kinds.get(id).copied()
    }
}

/// The house now, shared by the dispatcher and the [`Commands`] of its drivers.
type Current = Arc<RwLock<Arc<House>>>;

/// Reads the house now.
fn current(house: &Current) -> Arc<House> {
    Arc::clone(&house.read().unwrap_or_else(std::sync::PoisonError::into_inner))
}

/// How the drivers command devices: `dpi/ID/set`, and the firmware's own words for a device on
/// firmware topics. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Commands {
    house: Current,
    outbox: Outbox,
}

impl Commands {
    /// Publishes a command (`{"on":…}`, `{"brightness":…}`) to device `id`.
    pub fn set(&self, id: &str, json: &str) {
        self.outbox.publish(topics::device(id, Leaf::Set), json.to_owned(), false);
        if let Err(reason) = translate(&current(&self.house), &self.outbox, id, json.as_bytes()) {
            tracing::warn!(device = %id, command = %json, %reason, "command not sent in the device's firmware's words");
        }
    }

    /// The hub's outbox, for what is not a device command.
    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }
}

/// Publishes a command to `id` in its firmware's words, when it is on firmware topics. A command
/// the firmware cannot say is refused with the reason.
fn translate(house: &House, outbox: &Outbox, id: &str, payload: &[u8]) -> Result<(), String> {
    match house.sources.command(id, payload) {
        None => Ok(()),
        Some(Err(reason)) => Err(reason),
        Some(Ok(messages)) => {
            for (topic, payload) in messages {
                outbox.publish(topic, payload, false);
            }
            Ok(())
        }
    }
}

/// The house side behind the broker; cheap to clone.
#[derive(Debug, Clone)]
pub struct Dispatcher(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    /// The house now; replaced whole at a reload.
    house: Current,
    /// Records states and availability for the writer.
    pipeline: Pipeline,
    /// The alarm driver.
    alarm: AlarmHandle,
    /// The light rules' driver.
    lights: LightsHandle,
    /// Where availability is announced.
    outbox: Outbox,
    /// Largest device state accepted (`broker.max_payload_bytes`, fixed until restart).
    max_payload: usize,
}

impl Dispatcher {
    /// Starts the house side on `tasks`: the light rules' and the alarm's drivers, the writer (fed
    /// the retained changes and the bridge's outbox entries of `writer` too), and the dispatcher in front of them, which
    /// announces every declared device offline until it connects. Returns the dispatcher and the
    /// writer's `[store]` settings, which a reload changes. The drivers and the writer end once
    /// every handle on them is gone.
    pub fn start(
        house: House,
        store: &Store,
        outbox: Outbox,
        writer: (mpsc::UnboundedReceiver<RetainedChange>, OutboxInput),
        tasks: &TaskTracker,
    ) -> (Dispatcher, watch::Sender<config::Store>) {
        let (retained, queued) = writer;
        let config = Arc::clone(&house.config);
        let house: Current = Arc::new(RwLock::new(Arc::new(house)));
        let commands = Commands { house: Arc::clone(&house), outbox: outbox.clone() };
        let ((lights, lights_inbox), (alarm, alarm_inbox)) = (lights::channel(), alarm::channel());
        let (checkpoints, checkpoints_rx) = mpsc::unbounded_channel();
        tasks.spawn(lights::run(Arc::clone(&config), store.clone(), commands.clone(), lights_inbox));
        let parts = alarm::Parts { store: store.clone(), commands, lights: lights.clone(), checkpoints };
        tasks.spawn(alarm::run(Arc::clone(&config), parts, alarm_inbox));
        let (pipeline, events) = Pipeline::new();
        let (settings, settings_rx) = watch::channel(config.store.clone());
        let inputs = devices::WriterInputs { events, retained, alarm: checkpoints_rx, outbox: queued };
        tasks.spawn(devices::run(store.clone(), inputs, settings_rx));
        let max_payload = config.broker.max_payload_bytes;
        let dispatcher = Dispatcher(Arc::new(Inner { house, pipeline, alarm, lights, outbox, max_payload }));
        dispatcher.all_offline();
        dispatcher.announce_to_home_assistant(None);
        (dispatcher, settings)
    }

    /// The alarm driver's handle, for the control socket.
    pub fn alarm(&self) -> AlarmHandle {
        self.0.alarm.clone()
    }

    /// The house now.
    pub fn house(&self) -> Arc<House> {
        current(&self.0.house)
    }

    /// The kind of a device declared now; `None` for any other name.
    pub fn kind_of(&self, id: &str) -> Option<DeviceKind> {
        self.house().kind(id)
    }

    /// A device declared now, as the broker's authenticator sees it.
    pub fn declared(&self, id: &str) -> Option<Declared> {
        let house = self.house();
        house.kind(id).map(|kind| house.sources.declared(id, kind))
    }

    /// Announces every declared device offline until it connects (at start).
    fn all_offline(&self) {
        let house = self.house();
        for device in &house.config.devices {
            self.announce(&device.id, false);
            self.0.pipeline.availability(&device.id, false);
        }
    }

    /// Puts a reloaded house in place and hands its config to the drivers; devices it adds are
    /// announced offline until they connect. Returns the house it replaced.
    pub fn swap(&self, house: House) -> Arc<House> {
        let house = Arc::new(house);
        let mut current = self.0.house.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        // Under the lock: every message judged against the new house reaches a driver after its
        // new config does.
        self.0.alarm.reconfigure(Arc::clone(&house.config));
        self.0.lights.reconfigure(Arc::clone(&house.config));
        let old = std::mem::replace(&mut *current, Arc::clone(&house));
        drop(current);
        for device in house.config.devices.iter().filter(|d| !old.kinds.contains_key(&d.id)) {
            self.announce(&device.id, false);
            self.0.pipeline.availability(&device.id, false);
        }
        self.announce_to_home_assistant(Some(&old));
        old
    }

    /// Announces every device and the alarm to Home Assistant (retained), when discovery is on;
    /// after a reload, the entities of the `before` house that are gone are withdrawn (an empty
    /// retained config).
    fn announce_to_home_assistant(&self, before: Option<&House>) {
        let house = self.house();
        let now =
            house.config.homeassistant.as_deref().map(|p| hass::announcements(&house.config, p)).unwrap_or_default();
        if let Some(before) = before {
            let earlier = before.config.homeassistant.as_deref().map(|p| hass::announcements(&before.config, p));
            for (topic, _) in earlier.unwrap_or_default() {
                if !now.iter().any(|(t, _)| *t == topic) {
                    self.0.outbox.publish(topic, bytes::Bytes::new(), true);
                }
            }
        }
        for (topic, payload) in now {
            self.0.outbox.publish(topic, payload, true);
        }
    }

    /// Publishes a device's availability, retained.
    fn announce(&self, id: &str, online: bool) {
        self.0.outbox.publish(topics::device(id, Leaf::Availability), if online { "online" } else { "offline" }, true);
    }

    /// Records a declared device's availability and tells the alarm, if it watches the device.
    fn availability(&self, house: &House, id: &str, online: bool) {
        self.0.pipeline.availability(id, online);
        if house.alarm_watch.contains(id) {
            self.0.alarm.availability(id, online);
        }
    }

    /// Records a declared device's valid state and hands it to the drivers that use it.
    fn state(&self, house: &House, id: &str, state: DeviceState) {
        let (alarm, lights) = (house.alarm_watch.contains(id), house.lights_watch.contains(id));
        let copy = (alarm || lights).then(|| state.clone());
        let first = self.0.pipeline.state(id, state);
        if let Some(state) = copy {
            if alarm {
                self.0.alarm.device_state(id, &state, first);
            }
            if lights {
                self.0.lights.device_state(id, &state);
            }
        }
    }

    /// Acts on a firmware message of a device on firmware topics: a state is judged as the
    /// device's own and published as its `dpi/ID/state` (retained); the message itself is routed.
    fn firmware(&self, house: &House, mapped: Result<Mapped, String>) -> Verdict {
        match mapped {
            Err(reason) => Verdict::Refuse(reason),
            Ok(Mapped::Nothing) => Verdict::Route,
            Ok(Mapped::Availability { ids, online }) => {
                for id in &ids {
                    self.announce(id, online);
                    self.availability(house, id, online);
                }
                Verdict::Route
            }
            Ok(Mapped::State { id, json }) => {
                let topic = topics::device(&id, Leaf::State);
                match devices::judge(&house.kinds, usize::MAX, &topic, json.as_bytes()) {
                    Judged::State(_, state) => {
                        self.state(house, &id, state);
                        self.0.outbox.publish(topic, json, true);
                        Verdict::Route
                    }
                    Judged::Invalid(reason) => Verdict::Refuse(reason),
                    Judged::Other | Judged::Undeclared(_) | Judged::Availability(..) => Verdict::Route,
                }
            }
        }
    }

    /// What a command on the hub's own topics asks for, checked against `house`.
    fn command(&self, house: &House, topic: &str, payload: &[u8]) -> Result<Command, String> {
        match topics::parse(topic) {
            Some(Topic::AlarmSet) => alarm::parse_set(payload).map(Command::Alarm).map_err(|e| e.to_string()),
            Some(Topic::SceneSet) => {
                let scene = lights::parse_scene(payload).map_err(|e| e.to_string())?;
                lights::check_scene(&house.scenes, &scene).map_err(|e| e.to_string())?;
                Ok(Command::Scene(scene))
            }
            _ => Ok(Command::None),
        }
    }
}

/// A command for a driver, parsed.
enum Command {
    /// Not a command topic.
    None,
    /// `dpi/alarm/set`.
    Alarm(alarm::SetCommand),
    /// `dpi/scene/set`, a declared scene.
    Scene(String),
}

impl Dispatch for Dispatcher {
    fn publish(&self, from: Origin<'_>, topic: &str, payload: &Bytes) -> Verdict {
        let house = self.house();
        // Home Assistant came (back) online: it wants the announcements again.
        if let Some(prefix) = &house.config.homeassistant {
            if topic.strip_prefix(prefix.as_str()) == Some("/status") && payload.eq_ignore_ascii_case(b"online") {
                self.announce_to_home_assistant(None);
            }
        }
        if let Some(mapped) = house.sources.inbound(topic, payload) {
            return self.firmware(&house, mapped);
        }
        if let Some(Topic::Device { id, leaf: Leaf::Set }) = topics::parse(topic) {
            if let Err(reason) = translate(&house, &self.0.outbox, id, payload) {
                return Verdict::Refuse(reason);
            }
        }
        match self.command(&house, topic, payload) {
            Err(reason) => return Verdict::Refuse(reason),
            Ok(Command::Alarm(command)) => {
                self.0.alarm.command(command, alarm::source_of(from.identity), from.client_id);
                // Other subscribers see the command, never the code in it.
                return alarm::redact(payload).map_or(Verdict::Route, |p| Verdict::RouteInstead(p.into()));
            }
            Ok(Command::Scene(scene)) => {
                self.0.lights.scene(scene, from.client_id);
                return Verdict::Route;
            }
            Ok(Command::None) => {}
        }
        match devices::judge(&house.kinds, self.0.max_payload, topic, payload) {
            Judged::Other => Verdict::Route,
            Judged::Undeclared(id) => {
                self.0.pipeline.rejected(id);
                Verdict::Refuse(format!("{id:?} is not a declared device"))
            }
            Judged::Invalid(reason) => Verdict::Refuse(reason),
            Judged::State(id, state) => {
                self.state(&house, id, state);
                Verdict::Route
            }
            Judged::Availability(id, online) => {
                self.availability(&house, id, online);
                Verdict::Route
            }
        }
    }

    fn check_will(&self, _from: Origin<'_>, topic: &str, payload: &[u8]) -> Result<(), String> {
        let house = self.house();
        if let Some(mapped) = house.sources.inbound(topic, payload) {
            return mapped.map(drop);
        }
        self.command(&house, topic, payload)?;
        match devices::judge(&house.kinds, self.0.max_payload, topic, payload) {
            Judged::Undeclared(id) => Err(format!("{id:?} is not a declared device")),
            Judged::Invalid(reason) => Err(reason),
            Judged::Other | Judged::State(..) | Judged::Availability(..) => Ok(()),
        }
    }

    fn connection(&self, identity: &Identity, up: bool) {
        let Identity::Device { id, .. } = identity else { return };
        // A device whose reload removed it is still recorded going offline, for the truth of the table.
        let house = self.house();
        self.announce(id, up);
        self.availability(&house, id, up);
        // The devices it speaks for come and go with it.
        for member in house.sources.members(id) {
            self.announce(member, up);
            self.availability(&house, member, up);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::DeviceEvent;
    use crate::store::users::Role;

    fn house(toml: &str) -> House {
        House::new(Config::from_toml(toml, None).unwrap())
    }

    const DOOR: &str = "[[device]]\nid = \"door\"\nkind = \"contact\"\nzone = \"entry\"\n";
    const SCENE: &str =
        "[[device]]\nid = \"lamp\"\nkind = \"light\"\n[[scene]]\nid = \"evening\"\nset = { lamp = { on = true } }\n";

    /// A dispatcher on a real router's link, with drivers nobody reads, and the writer's input.
    fn dispatcher(toml: &str) -> (Dispatcher, mpsc::UnboundedReceiver<DeviceEvent>) {
        let router = crate::broker::start_router(4, tokio::sync::mpsc::unbounded_channel().0).unwrap();
        let (retained, _) = mpsc::unbounded_channel();
        let (link, _, _) = crate::broker::HubLink::connect(&router, retained).unwrap();
        let (pipeline, events) = Pipeline::new();
        let ((alarm, _), (lights, _)) = (alarm::channel(), lights::channel());
        let house = Arc::new(RwLock::new(Arc::new(house(toml))));
        let inner = Inner { house, pipeline, alarm, lights, outbox: Outbox::new(link), max_payload: 1024 };
        (Dispatcher(Arc::new(inner)), events)
    }

    fn resident() -> Identity {
        Identity::User { name: "alice".into(), role: Role::Resident }
    }

    fn from(identity: &Identity) -> Origin<'_> {
        Origin { identity, client_id: "phone" }
    }

    #[test]
    fn the_house_knows_its_devices_watchers_and_scenes() {
        let h = house(&format!("{DOOR}{SCENE}"));
        assert_eq!(h.kind("door"), Some(DeviceKind::Contact));
        assert_eq!(h.kind("ghost"), None);
        assert!(h.alarm_watch.contains("door") && !h.alarm_watch.contains("lamp"));
        assert!(h.lights_watch.contains("lamp"));
        assert!(h.scenes.contains("evening"));
    }

    #[test]
    fn a_swapped_house_judges_the_next_message() {
        let (d, mut events) = dispatcher(DOOR);
        let admin = Identity::User { name: "root".into(), role: Role::Admin };
        let porch = Bytes::from_static(b"{\"motion\":true}");
        assert!(
            matches!(d.publish(from(&admin), "dpi/porch/state", &porch), Verdict::Refuse(r) if r.contains("not a declared"))
        );
        assert!(matches!(events.try_recv(), Ok(DeviceEvent::Rejected { id }) if id == "porch"));
        let old = d.swap(house(&format!("{DOOR}[[device]]\nid = \"porch\"\nkind = \"motion\"\n")));
        assert_eq!(old.kind("porch"), None);
        assert!(matches!(events.try_recv(), Ok(DeviceEvent::Availability { id, online: false }) if id == "porch"));
        assert_eq!(d.publish(from(&admin), "dpi/porch/state", &porch), Verdict::Route);
        assert!(matches!(events.try_recv(), Ok(DeviceEvent::State { id, .. }) if id == "porch"));
        assert_eq!(d.kind_of("porch"), Some(DeviceKind::Motion));
    }

    #[test]
    fn an_alarm_command_is_routed_without_its_code() {
        let (d, _) = dispatcher(DOOR);
        let alice = resident();
        let set = Bytes::from_static(br#"{"action":"disarm","code":"4821"}"#);
        let Verdict::RouteInstead(routed) = d.publish(from(&alice), "dpi/alarm/set", &set) else {
            panic!("routed as sent")
        };
        assert!(!String::from_utf8_lossy(&routed).contains("4821"));
        let bad = Bytes::from_static(br#"{"action":"dance"}"#);
        assert!(matches!(d.publish(from(&alice), "dpi/alarm/set", &bad), Verdict::Refuse(_)));
    }

    #[test]
    fn an_unknown_scene_is_refused_and_a_declared_one_routed() {
        let (d, _) = dispatcher(SCENE);
        let alice = resident();
        let ask = |scene: &'static [u8]| d.publish(from(&alice), "dpi/scene/set", &Bytes::from_static(scene));
        assert_eq!(ask(br#"{"scene":"evening"}"#), Verdict::Route);
        assert!(matches!(ask(br#"{"scene":"party"}"#), Verdict::Refuse(r) if r.contains("party")));
    }

    #[test]
    fn checking_a_will_acts_on_nothing() {
        let (d, mut events) = dispatcher(DOOR);
        let door = Identity::Device { id: "door".into(), kind: DeviceKind::Contact, scope: None };
        assert!(d.check_will(from(&door), "dpi/door/availability", b"offline").is_ok());
        assert!(d.check_will(from(&door), "dpi/door/availability", b"maybe").is_err());
        assert!(d.check_will(from(&door), "dpi/ghost/state", b"OPEN").is_err());
        assert!(d.check_will(from(&door), "dpi/scene/set", br#"{"scene":"none"}"#).is_err());
        assert!(events.try_recv().is_err(), "a will check recorded something");
    }
}
