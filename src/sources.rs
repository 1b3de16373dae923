//! Devices that speak their own firmware's topics (SPEC §11): Tasmota, Zigbee2MQTT and ESPHome,
//! mapped onto the hub's model in both directions.
//!
//! [`Sources`] is built from the config with the house. The dispatcher asks it what a PUBLISH on a
//! firmware topic means ([`Sources::inbound`]): a state, in the hub's own JSON for the device's
//! kind, which the dispatcher then judges and records like any `dpi/ID/state`, or an
//! availability. A command for such a device (`{"on":…,"brightness":…}`, from a resident, a rule or
//! the alarm) becomes the firmware's own ([`Sources::command`]). And the client that speaks for
//! them is confined to their topics ([`Sources::declared`] gives the broker its [`Scope`]):
//!
//! | source | speaks | publishes | subscribes within |
//! | --- | --- | --- | --- |
//! | `tasmota = "T"` | the device itself | `tele/T/#`, `stat/T/#` | `cmnd/T/#` |
//! | `zigbee2mqtt = "NAME"` | the `bridge` device `zigbee2mqtt` | `zigbee2mqtt/NAME`, `…/NAME/#`, `zigbee2mqtt/bridge/#` | `zigbee2mqtt/#` |
//! | `esphome = "NODE/C/O"` | the `bridge` device `NODE` | `NODE/#` | `NODE/#` |
//!
//! Zigbee2MQTT subscribes to its whole base topic at start, which only it, the hub and admins may
//! write. Scales differ: Tasmota's `Dimmer` is 0–100, Zigbee2MQTT's `brightness` 0–254, the hub's
//! and ESPHome's 0–255. Pure: no I/O, no clock.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{json, Map, Value};

use crate::auth::{Declared, Scope};
use crate::config::{Config, DeviceKind, Source};

/// What a firmware topic carries.
#[derive(Debug, Clone)]
enum Inbound {
    /// A device's state, in `format`.
    State { id: String, kind: DeviceKind, format: Format },
    /// The availability of these devices, in `format`.
    Availability { ids: Vec<String>, format: Presence },
}

/// How a state is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    /// Tasmota `stat/T/POWER`: `ON` or `OFF`.
    TasmotaPower,
    /// Tasmota `tele/T/STATE` and `stat/T/RESULT`: JSON with `POWER` and `Dimmer`.
    TasmotaStatus,
    /// Tasmota `tele/T/SENSOR`: JSON with one object per sensor.
    TasmotaSensor,
    /// Zigbee2MQTT `zigbee2mqtt/NAME`: JSON with Zigbee2MQTT's fields.
    Zigbee2mqtt,
    /// ESPHome `NODE/COMPONENT/OBJECT/state`: `ON`/`OFF`, a number, or a light's JSON.
    Esphome,
}

/// How an availability is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Presence {
    /// Tasmota's LWT: `Online` / `Offline`.
    Tasmota,
    /// Zigbee2MQTT: `{"state":"online"}`, or plain `online` (its legacy form).
    Zigbee2mqtt,
    /// ESPHome's birth and will: `online` / `offline`.
    Esphome,
}

/// What a PUBLISH on a firmware topic means.
#[derive(Debug, Clone, PartialEq)]
pub enum Mapped {
    /// A state of device `id`, as the hub's own JSON for its kind.
    State { id: String, json: String },
    /// These devices are online or offline.
    Availability { ids: Vec<String>, online: bool },
    /// Nothing the hub uses (a Tasmota status without `POWER`, a Zigbee2MQTT link quality).
    Nothing,
}

/// The house's off-the-shelf devices; built from a validated config, replaced at a reload.
#[derive(Debug, Default)]
pub struct Sources {
    /// Firmware topic → what it carries.
    inbound: HashMap<String, Inbound>,
    /// Device id → its source and kind, for commands.
    devices: HashMap<String, (Source, DeviceKind)>,
    /// Speaking client id → its scope.
    scopes: HashMap<String, Arc<Scope>>,
    /// Speaking client id → the other devices it speaks for.
    members: HashMap<String, Vec<String>>,
    /// The largest payload read (`broker.max_payload_bytes`); a larger one is refused unread.
    max_payload: usize,
}

impl Sources {
    /// The sources of a validated config.
    pub fn new(config: &Config) -> Sources {
        let mut s = Sources { max_payload: config.broker.max_payload_bytes, ..Sources::default() };
        for device in config.devices.iter().filter(|d| d.kind == DeviceKind::Bridge) {
            let scope = if device.id == Source::ZIGBEE2MQTT {
                Scope { publish: vec!["zigbee2mqtt/bridge/#".into()], subscribe: vec!["zigbee2mqtt/#".into()] }
            } else {
                let node = &device.id;
                s.inbound.insert(
                    format!("{node}/status"),
                    Inbound::Availability { ids: Vec::new(), format: Presence::Esphome },
                );
                Scope { publish: vec![format!("{node}/#")], subscribe: vec![format!("{node}/#")] }
            };
            s.scopes.insert(device.id.clone(), Arc::new(scope));
        }
        for device in &config.devices {
            let Some(source) = &device.source else { continue };
            let (id, kind) = (device.id.clone(), device.kind);
            let state = |format| Inbound::State { id: id.clone(), kind, format };
            let presence = |format| Inbound::Availability { ids: vec![id.clone()], format };
            match source {
                Source::Tasmota(t) => {
                    s.inbound.insert(format!("stat/{t}/POWER"), state(Format::TasmotaPower));
                    s.inbound.insert(format!("tele/{t}/STATE"), state(Format::TasmotaStatus));
                    s.inbound.insert(format!("stat/{t}/RESULT"), state(Format::TasmotaStatus));
                    s.inbound.insert(format!("tele/{t}/SENSOR"), state(Format::TasmotaSensor));
                    s.inbound.insert(format!("tele/{t}/LWT"), presence(Presence::Tasmota));
                    let scope = Scope {
                        publish: vec![format!("tele/{t}/#"), format!("stat/{t}/#")],
                        subscribe: vec![format!("cmnd/{t}/#")],
                    };
                    s.scopes.insert(id.clone(), Arc::new(scope));
                }
                Source::Zigbee2mqtt(name) => {
                    s.inbound.insert(format!("zigbee2mqtt/{name}"), state(Format::Zigbee2mqtt));
                    s.inbound.insert(format!("zigbee2mqtt/{name}/availability"), presence(Presence::Zigbee2mqtt));
                    if let Some(scope) = s.scopes.get_mut(Source::ZIGBEE2MQTT) {
                        let scope = Arc::make_mut(scope);
                        scope.publish.push(format!("zigbee2mqtt/{name}"));
                        scope.publish.push(format!("zigbee2mqtt/{name}/#"));
                    }
                }
                Source::Esphome { node, component, object } => {
                    s.inbound.insert(format!("{node}/{component}/{object}/state"), state(Format::Esphome));
                    if let Some(Inbound::Availability { ids, .. }) = s.inbound.get_mut(&format!("{node}/status")) {
                        ids.push(id.clone());
                    }
                }
            }
            let speaker = source.speaker(&device.id);
            if speaker != device.id {
                s.members.entry(speaker.to_owned()).or_default().push(id.clone());
            }
            s.devices.insert(id, (source.clone(), kind));
        }
        s
    }

    /// What the broker needs of a declared device: its kind, and its scope if it speaks its own
    /// firmware's topics.
    pub fn declared(&self, id: &str, kind: DeviceKind) -> Declared {
        Declared { kind, scope: self.scopes.get(id).cloned() }
    }

    /// The devices `speaker` speaks for besides itself (online and offline with its connection).
    pub fn members(&self, speaker: &str) -> &[String] {
        self.members.get(speaker).map_or(&[], Vec::as_slice)
    }

    /// Whether `id` is a device on firmware topics.
    pub fn is_sourced(&self, id: &str) -> bool {
        self.devices.contains_key(id)
    }

    /// What a PUBLISH on `topic` means, if it is a declared device's firmware topic; `Err` says
    /// why a payload that does not fit is refused.
    pub fn inbound(&self, topic: &str, payload: &[u8]) -> Option<Result<Mapped, String>> {
        let inbound = self.inbound.get(topic)?;
        if payload.len() > self.max_payload {
            let (len, max) = (payload.len(), self.max_payload);
            return Some(Err(format!("payload of {len} bytes is larger than the limit of {max} bytes")));
        }
        let Ok(text) = std::str::from_utf8(payload) else {
            return Some(Err("payload is not UTF-8 text".to_owned()));
        };
        let text = text.trim();
        Some(match inbound {
            Inbound::State { id, kind, format } => state(*format, *kind, text).map(|fields| {
                fields.map_or(Mapped::Nothing, |f| Mapped::State { id: id.clone(), json: Value::Object(f).to_string() })
            }),
            Inbound::Availability { ids, format } => {
                presence(*format, text).map(|online| Mapped::Availability { ids: ids.clone(), online })
            }
        })
    }

    /// The firmware's own messages for a hub command (`{"on":…,"brightness":…}`) to `id`, as
    /// (topic, payload) in the order to publish; `None` when `id` is not on firmware topics or its
    /// kind takes no commands; `Err` says why the command cannot be said in the firmware's words.
    #[allow(clippy::type_complexity)]
    pub fn command(&self, id: &str, payload: &[u8]) -> Option<Result<Vec<(String, String)>, String>> {
        let (source, kind) = self.devices.get(id)?;
        if !matches!(kind, DeviceKind::Light | DeviceKind::Switch | DeviceKind::Siren) {
            return None;
        }
        let dims =
            *kind == DeviceKind::Light && !matches!(source, Source::Esphome { component, .. } if component == "switch");
        Some(parse_command(payload, dims).map(|(on, brightness)| match source {
            Source::Tasmota(t) => {
                let mut out = Vec::new();
                if let Some(on) = on {
                    out.push((format!("cmnd/{t}/POWER"), word(on).to_owned()));
                }
                if let (Some(b), true) = (brightness, on != Some(false)) {
                    out.push((format!("cmnd/{t}/Dimmer"), scale(b, 255, 100).to_string()));
                }
                out
            }
            Source::Zigbee2mqtt(name) => {
                let mut body = Map::new();
                if let Some(on) = on {
                    body.insert("state".into(), json!(word(on)));
                }
                if let Some(b) = brightness {
                    body.insert("brightness".into(), json!(scale(b, 255, 254)));
                }
                vec![(format!("zigbee2mqtt/{name}/set"), Value::Object(body).to_string())]
            }
            Source::Esphome { node, component, object } => {
                let topic = format!("{node}/{component}/{object}/command");
                if component == "light" {
                    let mut body = Map::new();
                    body.insert("state".into(), json!(word(on.unwrap_or(true))));
                    if let Some(b) = brightness {
                        body.insert("brightness".into(), json!(b));
                    }
                    vec![(topic, Value::Object(body).to_string())]
                } else {
                    on.map(|on| vec![(topic, word(on).to_owned())]).unwrap_or_default()
                }
            }
        }))
    }
}

/// `ON` or `OFF`.
fn word(on: bool) -> &'static str {
    if on {
        "ON"
    } else {
        "OFF"
    }
}

/// `value` on a scale of `0..=from`, rounded onto `0..=to`.
fn scale(value: u64, from: u64, to: u64) -> u64 {
    (value.min(from) * to + from / 2) / from
}

/// A hub command's `on` and `brightness` (0–255; only when the device dims), at least one of them.
fn parse_command(payload: &[u8], dims: bool) -> Result<(Option<bool>, Option<u64>), String> {
    let usage = if dims {
        r#"a command for this device is {"on":true|false} and/or {"brightness":0-255}"#
    } else {
        r#"a command for this device is {"on":true|false}"#
    };
    let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(payload) else {
        return Err(usage.to_owned());
    };
    let on = match fields.get("on") {
        None => None,
        Some(Value::Bool(on)) => Some(*on),
        Some(_) => return Err(usage.to_owned()),
    };
    let brightness = match fields.get("brightness") {
        None => None,
        Some(b) if dims => Some(b.as_u64().filter(|b| *b <= 255).ok_or_else(|| usage.to_owned())?),
        Some(_) => return Err(usage.to_owned()),
    };
    match (on, brightness) {
        (None, None) => Err(usage.to_owned()),
        pair => Ok(pair),
    }
}

/// Whether `text` says on (`ON`, `on`, …) or off.
fn on_off(text: &str, field: &str) -> Result<bool, String> {
    match text {
        t if t.eq_ignore_ascii_case("on") => Ok(true),
        t if t.eq_ignore_ascii_case("off") => Ok(false),
        t => Err(format!("{field} must be ON or OFF, not {:?}", t.chars().take(32).collect::<String>())),
    }
}

/// A JSON object, or why not.
fn object(text: &str) -> Result<Map<String, Value>, String> {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(fields)) => Ok(fields),
        Ok(_) => Err("payload is JSON but not an object".to_owned()),
        Err(e) => Err(format!("payload is not valid JSON: {e}")),
    }
}

/// A state in the hub's JSON for `kind`; `None` when the message carries nothing the hub uses.
fn state(format: Format, kind: DeviceKind, text: &str) -> Result<Option<Map<String, Value>>, String> {
    let mut out = Map::new();
    let relay = matches!(kind, DeviceKind::Light | DeviceKind::Switch | DeviceKind::Siren);
    match format {
        // A sensor's Tasmota board may have a relay too: it is not the device.
        Format::TasmotaPower | Format::TasmotaStatus if !relay => {}
        Format::TasmotaPower => {
            out.insert("on".into(), json!(on_off(text, "POWER")?));
        }
        Format::TasmotaStatus => {
            let fields = object(text)?;
            if let Some(power) = fields.get("POWER").or_else(|| fields.get("POWER1")) {
                out.insert("on".into(), json!(on_off(power.as_str().unwrap_or_default(), "POWER")?));
            }
            if let (Some(dimmer), DeviceKind::Light) = (fields.get("Dimmer"), kind) {
                let d = dimmer.as_u64().filter(|d| *d <= 100).ok_or("Dimmer must be an integer from 0 to 100")?;
                out.insert("brightness".into(), json!(scale(d, 100, 255)));
            }
        }
        Format::TasmotaSensor => {
            let fields = object(text)?;
            let (key, field) = match kind {
                DeviceKind::Temperature => ("Temperature", "temperature"),
                DeviceKind::Lux => ("Illuminance", "lux"),
                _ => return Ok(None),
            };
            // Each sensor is an object of its own ("AM2301": {"Temperature": 21.5, …}); the first
            // that has the reading is the device's.
            let reading = fields.values().filter_map(|v| v.get(key)).find_map(Value::as_f64);
            if let Some(mut value) = reading {
                if kind == DeviceKind::Temperature && fields.get("TempUnit").and_then(Value::as_str) == Some("F") {
                    value = ((value - 32.0) * 5.0 / 9.0 * 10.0).round() / 10.0;
                }
                out.insert(field.into(), json!(value));
            }
        }
        Format::Zigbee2mqtt => zigbee2mqtt(kind, &object(text)?, &mut out)?,
        Format::Esphome => esphome(kind, text, &mut out)?,
    }
    Ok((!out.is_empty()).then_some(out))
}

/// Zigbee2MQTT's fields, in the hub's words for `kind`.
fn zigbee2mqtt(kind: DeviceKind, fields: &Map<String, Value>, out: &mut Map<String, Value>) -> Result<(), String> {
    let boolean = |name: &str| match fields.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(format!("{name} must be true or false")),
    };
    let number = |name: &str| match fields.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_f64().map(Some).ok_or_else(|| format!("{name} must be a number")),
    };
    let text = |name: &str| match fields.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok((!s.is_empty()).then(|| s.clone())),
        Some(_) => Err(format!("{name} must be a string")),
    };
    match kind {
        DeviceKind::Motion => {
            if let Some(o) = boolean("occupancy")? {
                out.insert("motion".into(), json!(o));
            }
        }
        // Zigbee2MQTT's contact is true when the magnet is near: the door is closed.
        DeviceKind::Contact => {
            if let Some(c) = boolean("contact")? {
                out.insert("contact".into(), json!(if c { "closed" } else { "open" }));
            }
        }
        DeviceKind::Light | DeviceKind::Switch => {
            if let Some(state) = text("state")? {
                out.insert("on".into(), json!(on_off(&state, "state")?));
            }
            if kind == DeviceKind::Light {
                if let Some(b) = number("brightness")? {
                    let b = Some(b).filter(|b| (0.0..=254.0).contains(b)).ok_or("brightness must be 0 to 254")?;
                    out.insert("brightness".into(), json!(scale(b.round() as u64, 254, 255)));
                }
            } else if let Some(action) = text("action")? {
                out.insert("action".into(), json!(action));
            }
        }
        DeviceKind::Button => {
            if let Some(action) = text("action")? {
                out.insert("action".into(), json!(action));
            }
        }
        DeviceKind::Lux => {
            // `illuminance_lux` until Zigbee2MQTT 2.0, `illuminance` (in lux) since.
            if let Some(lux) = number("illuminance_lux")?.or(number("illuminance")?) {
                out.insert("lux".into(), json!(lux));
            }
        }
        DeviceKind::Temperature => {
            if let Some(t) = number("temperature")? {
                out.insert("temperature".into(), json!(t));
            }
        }
        DeviceKind::Smoke => {
            if let Some(s) = boolean("smoke")? {
                out.insert("smoke".into(), json!(s));
            }
        }
        DeviceKind::Siren | DeviceKind::Keypad | DeviceKind::Bridge => {}
    }
    if let Some(t) = boolean("tamper")? {
        out.insert("tamper".into(), json!(t));
    }
    if let Some(b) = number("battery")? {
        let b = Some(b).filter(|b| (0.0..=100.0).contains(b)).ok_or("battery must be 0 to 100")?;
        out.insert("battery".into(), json!(b.round() as u64));
    }
    Ok(())
}

/// An ESPHome component's state, in the hub's words for `kind`.
fn esphome(kind: DeviceKind, text: &str, out: &mut Map<String, Value>) -> Result<(), String> {
    match kind {
        DeviceKind::Motion => {
            out.insert("motion".into(), json!(on_off(text, "state")?));
        }
        DeviceKind::Smoke => {
            out.insert("smoke".into(), json!(on_off(text, "state")?));
        }
        // A door binary_sensor is ON when open.
        DeviceKind::Contact => {
            out.insert("contact".into(), json!(if on_off(text, "state")? { "open" } else { "closed" }));
        }
        DeviceKind::Light if text.starts_with('{') => {
            let fields = object(text)?;
            if let Some(state) = fields.get("state").and_then(Value::as_str) {
                out.insert("on".into(), json!(on_off(state, "state")?));
            }
            if let Some(b) = fields.get("brightness") {
                out.insert(
                    "brightness".into(),
                    json!(b.as_u64().filter(|b| *b <= 255).ok_or("brightness must be 0 to 255")?),
                );
            }
        }
        DeviceKind::Light | DeviceKind::Switch | DeviceKind::Siren => {
            out.insert("on".into(), json!(on_off(text, "state")?));
        }
        DeviceKind::Temperature | DeviceKind::Lux => {
            // A sensor with no reading yet says `nan`.
            if text.eq_ignore_ascii_case("nan") {
                return Ok(());
            }
            let value: f64 = text.parse().map_err(|_| format!("a sensor's state must be a number, not {text:?}"))?;
            let field = if kind == DeviceKind::Temperature { "temperature" } else { "lux" };
            out.insert(field.into(), json!(value));
        }
        DeviceKind::Button | DeviceKind::Keypad | DeviceKind::Bridge => {}
    }
    Ok(())
}

/// Whether an availability message says online (or offline).
fn presence(format: Presence, text: &str) -> Result<bool, String> {
    let word = match format {
        Presence::Zigbee2mqtt if text.starts_with('{') => {
            object(text)?.get("state").and_then(Value::as_str).map(str::to_owned).unwrap_or_default()
        }
        _ => text.to_owned(),
    };
    match word.to_ascii_lowercase().as_str() {
        "online" => Ok(true),
        "offline" => Ok(false),
        _ => {
            Err(format!("availability must be online or offline, not {:?}", word.chars().take(32).collect::<String>()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use DeviceKind::*;

    /// The documented messages of `tests/fixtures/sources.toml`, by name: (topic, payload).
    fn fixture(name: &str) -> (String, String) {
        let file: toml::Value = toml::from_str(include_str!("../tests/fixtures/sources.toml")).unwrap();
        let messages = file["message"].as_array().unwrap();
        let m =
            messages.iter().find(|m| m["name"].as_str() == Some(name)).unwrap_or_else(|| panic!("no fixture {name}"));
        assert!(m["source"].as_str().is_some_and(|s| !s.is_empty()), "{name} names no source");
        // Placeholders of the documentation, as a house would have them.
        let topic = m["topic"]
            .as_str()
            .unwrap()
            .replace("%topic%", "tasmota_test")
            .replace("<TOPIC_PREFIX>", "node")
            .replace("<COMPONENT_NAME>", "thing");
        (topic, m["payload"].as_str().unwrap().to_owned())
    }

    /// A house with one device of `kind` on the firmware topic of `topic` (and its speaker).
    fn house_for(topic: &str, kind: DeviceKind) -> Config {
        let parts: Vec<&str> = topic.split('/').collect();
        let (source, speaker) = match parts[0] {
            "tele" | "stat" | "cmnd" => (format!("{{ tasmota = \"{}\" }}", parts[1]), String::new()),
            "zigbee2mqtt" => {
                let name = topic
                    .strip_prefix("zigbee2mqtt/")
                    .unwrap()
                    .trim_end_matches("/availability")
                    .trim_end_matches("/set");
                (
                    format!("{{ zigbee2mqtt = {name:?} }}"),
                    "[[device]]\nid = \"zigbee2mqtt\"\nkind = \"bridge\"\n".to_owned(),
                )
            }
            node => {
                let path =
                    if parts[1] == "status" { format!("{node}/binary_sensor/thing") } else { parts[..3].join("/") };
                let node = node.replace('_', "-");
                let path = path.replacen(parts[0], &node, 1);
                (format!("{{ esphome = {path:?} }}"), format!("[[device]]\nid = \"{node}\"\nkind = \"bridge\"\n"))
            }
        };
        let text = format!("{speaker}[[device]]\nid = \"dev\"\nkind = \"{}\"\nsource = {source}\n", kind.as_str());
        Config::from_toml(&text, None).unwrap_or_else(|e| panic!("{text}\n{e}"))
    }

    /// What the fixture `name` means for a device of `kind`.
    fn map(name: &str, kind: DeviceKind) -> Result<Mapped, String> {
        let (topic, payload) = fixture(name);
        let sources = Sources::new(&house_for(&topic, kind));
        // An ESPHome node's name is a device id here: `-` where its documentation has `_`.
        let topic = match topic.split_once('/') {
            Some((node, rest)) if !["tele", "stat", "zigbee2mqtt"].contains(&node) => {
                format!("{}/{rest}", node.replace('_', "-"))
            }
            _ => topic,
        };
        sources.inbound(&topic, payload.as_bytes()).unwrap_or_else(|| panic!("{topic} is not mapped"))
    }

    /// The hub's JSON for fixture `name` on a device of `kind`.
    fn json(name: &str, kind: DeviceKind) -> Value {
        match map(name, kind) {
            Ok(Mapped::State { json, .. }) => serde_json::from_str(&json).unwrap(),
            other => panic!("{name}: {other:?}"),
        }
    }

    /// Each documented state, as the hub's JSON; each valid for its kind.
    #[test]
    fn documented_states_become_the_hubs_own() {
        let cases: &[(&str, DeviceKind, Value)] = &[
            ("tasmota_power_on", Light, json!({"on": true})),
            ("tasmota_power_off", Switch, json!({"on": false})),
            ("tasmota_result_power_on", Light, json!({"on": true})),
            ("tasmota_result_dimmer", Light, json!({"on": true, "brightness": 204})),
            ("tasmota_state_power_on", Light, json!({"on": true})),
            ("tasmota_state_power_off_vcc", Switch, json!({"on": false})),
            ("tasmota_state_dimmer", Light, json!({"on": true, "brightness": 204})),
            ("tasmota_sensor_ds18b20_single", Temperature, json!({"temperature": 20.6})),
            ("tasmota_sensor_am2301", Temperature, json!({"temperature": 24.6})),
            ("tasmota_sensor_bh1750_illuminance", Lux, json!({"lux": 79.0})),
            ("z2m_motion_rtcgq01lm_docs", Motion, json!({"motion": true})),
            ("z2m_motion_rtcgq11lm_log", Motion, json!({"motion": false, "battery": 100})),
            ("z2m_motion_rtcgq11lm_occupied", Motion, json!({"motion": true, "battery": 100})),
            ("z2m_motion_tamper_osram", Motion, json!({"motion": true, "tamper": true})),
            ("z2m_motion_rtcgq11lm_occupied", Lux, json!({"lux": 7.0, "battery": 100})),
            ("z2m_contact_mccgq11lm", Contact, json!({"contact": "closed", "battery": 100})),
            ("z2m_contact_mccgq11lm_state_1_26", Contact, json!({"contact": "open", "battery": 100})),
            ("z2m_contact_tamper_snzb04p", Contact, json!({"contact": "closed", "tamper": false, "battery": 100})),
            ("z2m_smoke_jtyj_full", Smoke, json!({"smoke": false, "battery": 100})),
            ("z2m_action_wxkg01lm_docs", Button, json!({"action": "single"})),
            ("z2m_bulb_state_docs", Light, json!({"on": true, "brightness": 216})),
            ("esphome_binary_sensor_state_on", Motion, json!({"motion": true})),
            ("esphome_binary_sensor_state_off", Contact, json!({"contact": "closed"})),
            ("esphome_light_state_pre_2021_8", Light, json!({"on": false, "brightness": 255})),
            ("esphome_switch_state_off", Switch, json!({"on": false})),
            ("esphome_sensor_state_float", Temperature, json!({"temperature": 0.105})),
        ];
        for (name, kind, want) in cases {
            let got = json(name, *kind);
            assert_eq!(&got, want, "{name} as a {}", kind.as_str());
            let decoded = crate::decode::decode_state(*kind, got.to_string().as_bytes(), usize::MAX);
            assert!(decoded.is_ok(), "{name}: the mapped state is not valid for its kind: {decoded:?}");
        }
    }

    #[test]
    fn documented_availability_in_every_form() {
        for (name, online) in [
            ("tasmota_lwt_online", true),
            ("tasmota_lwt_offline", false),
            ("z2m_availability_json", true),
            ("z2m_availability_json_offline", false),
            ("z2m_availability_legacy", true),
            ("z2m_availability_legacy_offline", false),
            ("esphome_status_online", true),
            ("esphome_status_offline", false),
        ] {
            let kind = if name.starts_with("tasmota") { Light } else { Motion };
            assert_eq!(map(name, kind), Ok(Mapped::Availability { ids: vec!["dev".into()], online }), "{name}");
        }
    }

    #[test]
    fn messages_without_a_reading_mean_nothing_and_wrong_ones_are_refused() {
        // A Tasmota status of a temperature sensor, and a Zigbee2MQTT message with only link quality.
        assert_eq!(map("tasmota_state_power_on", Temperature), Ok(Mapped::Nothing));
        assert_eq!(map("tasmota_sensor_bh1750_illuminance", Temperature), Ok(Mapped::Nothing));
        let sources = Sources::new(&house_for("zigbee2mqtt/pir", Motion));
        assert_eq!(sources.inbound("zigbee2mqtt/pir", br#"{"linkquality":42}"#), Some(Ok(Mapped::Nothing)));
        for bad in [&br#"{"occupancy":"yes"}"#[..], b"not json", b"[1]", br#"{"battery":180}"#, b"\xff"] {
            assert!(
                matches!(sources.inbound("zigbee2mqtt/pir", bad), Some(Err(_))),
                "{:?} accepted",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(matches!(sources.inbound("zigbee2mqtt/pir/availability", b"maybe"), Some(Err(_))));
        assert_eq!(sources.inbound("zigbee2mqtt/other", b"{}"), None, "an undeclared name is not the hub's to map");
        let huge = format!("{{\"occupancy\":true,\"pad\":\"{}\"}}", "x".repeat(20_000));
        assert!(matches!(sources.inbound("zigbee2mqtt/pir", huge.as_bytes()), Some(Err(e)) if e.contains("limit")));
        let tasmota = Sources::new(&house_for("stat/plug/POWER", Light));
        assert!(matches!(tasmota.inbound("stat/plug/POWER", b"TOGGLE"), Some(Err(e)) if e.contains("ON or OFF")));
        assert!(matches!(tasmota.inbound("tele/plug/STATE", br#"{"POWER":"ON","Dimmer":140}"#), Some(Err(_))));
    }

    /// Commands in each firmware's words, as their documentation writes them.
    #[test]
    fn commands_in_each_firmwares_words() {
        let command = |topic: &str, kind, payload: &str| {
            Sources::new(&house_for(topic, kind)).command("dev", payload.as_bytes()).unwrap()
        };
        let pairs = |v: &[(&str, &str)]| v.iter().map(|(t, p)| (t.to_string(), p.to_string())).collect::<Vec<_>>();
        assert_eq!(command("cmnd/plug/POWER", Light, r#"{"on":true}"#), Ok(pairs(&[("cmnd/plug/POWER", "ON")])));
        assert_eq!(
            command("cmnd/plug/POWER", Light, r#"{"on":true,"brightness":204}"#),
            Ok(pairs(&[("cmnd/plug/POWER", "ON"), ("cmnd/plug/Dimmer", "80")]))
        );
        assert_eq!(command("cmnd/plug/POWER", Siren, r#"{"on":false}"#), Ok(pairs(&[("cmnd/plug/POWER", "OFF")])));
        assert!(command("cmnd/plug/POWER", Switch, r#"{"brightness":10}"#).is_err(), "a switch does not dim");
        // Zigbee2MQTT: the documented /set body, brightness on its 0–254 scale.
        let z2m = command("zigbee2mqtt/bulb", Light, r#"{"on":true,"brightness":255}"#).unwrap();
        assert_eq!(z2m[0].0, "zigbee2mqtt/bulb/set");
        let body: Value = serde_json::from_str(&z2m[0].1).unwrap();
        let (_, documented) = fixture("z2m_bulb_set_docs");
        let documented: Value = serde_json::from_str(&documented).unwrap();
        assert_eq!(body["state"], documented["state"]);
        assert_eq!(body["brightness"], 254);
        // ESPHome: a light's JSON command and a switch's word, as documented.
        let (_, on) = fixture("esphome_light_command_on");
        let light = command("node/light/lamp/state", Light, r#"{"on":true}"#).unwrap();
        assert_eq!(light[0].0, "node/light/lamp/command");
        assert_eq!(serde_json::from_str::<Value>(&light[0].1).unwrap(), serde_json::from_str::<Value>(&on).unwrap());
        let (_, word) = fixture("esphome_switch_command_on");
        assert_eq!(
            command("node/switch/siren/state", Siren, r#"{"on":true}"#),
            Ok(pairs(&[("node/switch/siren/command", &word)]))
        );
        // Sensors take no commands; bad commands are refused.
        assert_eq!(Sources::new(&house_for("zigbee2mqtt/pir", Motion)).command("dev", b"{}"), None);
        for bad in ["{}", "ON", r#"{"on":"yes"}"#, r#"{"brightness":300}"#] {
            assert!(command("zigbee2mqtt/bulb", Light, bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn speakers_are_confined_to_their_devices_topics() {
        let config = Config::from_toml(
            "[[device]]\nid = \"zigbee2mqtt\"\nkind = \"bridge\"\n\
             [[device]]\nid = \"pir\"\nkind = \"motion\"\nsource = { zigbee2mqtt = \"hall pir\" }\n\
             [[device]]\nid = \"plug\"\nkind = \"light\"\nsource = { tasmota = \"plug_1\" }\n\
             [[device]]\nid = \"desk\"\nkind = \"bridge\"\n\
             [[device]]\nid = \"desk-lamp\"\nkind = \"light\"\nsource = { esphome = \"desk/light/lamp\" }\n\
             [[device]]\nid = \"door\"\nkind = \"contact\"\n",
            None,
        )
        .unwrap();
        let s = Sources::new(&config);
        let scope = |id: &str| s.declared(id, Light).scope.map(|s| (s.publish.clone(), s.subscribe.clone()));
        let z2m = scope("zigbee2mqtt").unwrap();
        assert!(z2m.0.contains(&"zigbee2mqtt/hall pir".to_owned()) && z2m.1 == ["zigbee2mqtt/#"]);
        assert_eq!(scope("plug").unwrap().1, ["cmnd/plug_1/#"]);
        assert_eq!(scope("desk").unwrap().0, ["desk/#"]);
        assert_eq!(scope("door"), None, "a native device keeps dpi/door/…");
        assert_eq!(s.members("zigbee2mqtt"), ["pir"]);
        assert_eq!(s.members("desk"), ["desk-lamp"]);
        assert!(s.members("plug").is_empty());
        assert_eq!(
            s.inbound("desk/status", b"offline"),
            Some(Ok(Mapped::Availability { ids: vec!["desk-lamp".into()], online: false }))
        );
    }

    /// Whatever a speaker sends on a mapped topic, the mapping answers (never panics), and a
    /// state it makes is a JSON object. Payloads: the documented ones, mutated at random.
    #[test]
    fn random_payloads_on_every_mapped_topic_get_an_answer() {
        let file: toml::Value = toml::from_str(include_str!("../tests/fixtures/sources.toml")).unwrap();
        let seeds: Vec<Vec<u8>> = file["message"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["payload"].as_str().unwrap().as_bytes().to_vec())
            .collect();
        let topics = ["stat/t/POWER", "tele/t/STATE", "stat/t/RESULT", "tele/t/SENSOR", "tele/t/LWT"];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let pieces: [&[u8]; 10] = [b"{", b"}", b"\"", b":", b",", b"null", b"-1e999", b"\xff\xfe", b"[]", b"\"ON\""];
        for kind in [Motion, Contact, Light, Switch, Button, Siren, Lux, Temperature, Smoke] {
            let sourced = [
                "cmnd/t/POWER",
                "zigbee2mqtt/z",
                "n/binary_sensor/o/state",
                "n/sensor/o/state",
                "n/switch/o/state",
                "n/light/o/state",
            ];
            for topic in sourced {
                let text = |k: DeviceKind| {
                    let parts: Vec<&str> = topic.split('/').collect();
                    match parts[0] {
                        "cmnd" => format!("[[device]]\nid = \"dev\"\nkind = \"{}\"\nsource = {{ tasmota = \"t\" }}\n", k.as_str()),
                        "zigbee2mqtt" => format!("[[device]]\nid = \"zigbee2mqtt\"\nkind = \"bridge\"\n[[device]]\nid = \"dev\"\nkind = \"{}\"\nsource = {{ zigbee2mqtt = \"z\" }}\n", k.as_str()),
                        _ => format!("[[device]]\nid = \"n\"\nkind = \"bridge\"\n[[device]]\nid = \"dev\"\nkind = \"{}\"\nsource = {{ esphome = \"n/{}/o\" }}\n", k.as_str(), parts[1]),
                    }
                };
                // Only the kinds the source can be.
                let Ok(config) = Config::from_toml(&text(kind), None) else { continue };
                let sources = Sources::new(&config);
                let mapped: Vec<String> =
                    sources.inbound.keys().cloned().chain(topics.iter().map(|t| t.to_string())).collect();
                for _ in 0..300 {
                    let mut payload = seeds[(next() % seeds.len() as u64) as usize].clone();
                    for _ in 0..(next() % 4) {
                        let at = (next() as usize) % (payload.len() + 1);
                        match next() % 3 {
                            0 => payload.truncate(at),
                            1 => payload.splice(at..at, pieces[(next() % 10) as usize].iter().copied()).for_each(drop),
                            _ => {
                                if at < payload.len() {
                                    payload[at] = next() as u8;
                                }
                            }
                        }
                    }
                    for topic in &mapped {
                        if let Some(Ok(Mapped::State { json, .. })) = sources.inbound(topic, &payload) {
                            assert!(serde_json::from_str::<Map<String, Value>>(&json).is_ok(), "{topic}: {json}");
                        }
                    }
                    let _ = sources.command("dev", &payload);
                }
            }
        }
    }

    #[test]
    fn scales_round_both_ways() {
        assert_eq!((scale(80, 100, 255), scale(204, 255, 100)), (204, 80));
        assert_eq!((scale(254, 254, 255), scale(255, 255, 254), scale(0, 255, 254)), (255, 254, 0));
        for d in 0..=100 {
            assert_eq!(scale(scale(d, 100, 255), 255, 100), d, "Dimmer {d} does not survive the round trip");
        }
    }
}
