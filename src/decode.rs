//! What devices publish, turned into typed values: the payload of `dpi/ID/state` per device kind, the
//! `online`/`offline` of `dpi/ID/availability` (SPEC §5; the topics themselves are [`crate::topics`]').
//!
//! This module owns the payload grammar: which JSON fields each kind must or may carry, their types and
//! ranges, and the bare words tiny sketches may send instead of JSON. It is pure: no I/O, no tokio, no
//! clock, no logging. It never decides what a reading *means* (the rules do) and never stores anything
//! (the store does); on a bad payload it returns a [`DecodeError`] whose `Display` is one line, fit to be
//! published on `dpi/hub/error` and logged.
//!
//! Choices worth knowing:
//! - A state payload is trimmed, then: text starting with `{` must be a JSON object; a single token
//!   (no whitespace, not starting with `[` or `"`) is a bare word; anything else is rejected as not JSON
//!   or not an object. So `35` sent by a lux sensor is a bare word that is not valid for the kind.
//! - JSON values are checked strictly: `contact` is exactly `"open"` or `"closed"` (not `true`/`false`,
//!   not `"OPEN"`: the lenient spellings are the bare words'), booleans are JSON booleans, `brightness`
//!   (0–255) and `battery` (0–100) are JSON integers (`87.0` is refused), and `null` is a wrong type,
//!   not an absent field.
//! - A JSON object without the kind's main field is a heartbeat: accepted only if it carries `tamper` or
//!   `battery`, and then [`DeviceState::main`] is `None`. Fields it does carry are still checked.
//! - Unknown extra fields are kept in [`DeviceState::fields`] and in [`DeviceState::to_json`].
//! - An empty payload (which in MQTT deletes a retained message) is an error here; whether to treat it
//!   as a deletion is the caller's business.

use serde_json::{Map, Value};

use crate::config::DeviceKind;

/// Longest bare word quoted back in an error, in characters; the rest is elided.
const MAX_QUOTED_WORD: usize = 32;

/// Reads a payload that must be one JSON object (commands such as `dpi/alarm/set` and
/// `dpi/scene/set`): UTF-8, valid JSON, an object. Errors name no part of the payload.
pub fn json_object(payload: &[u8]) -> Result<Map<String, Value>, DecodeError> {
    let text = std::str::from_utf8(payload).map_err(|_| DecodeError::NotUtf8)?;
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(fields)) => Ok(fields),
        Ok(_) => Err(DecodeError::NotAnObject),
        Err(e) => Err(DecodeError::NotJson(e.to_string())),
    }
}

/// Why a payload was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The payload is longer than the configured `max_payload_bytes`.
    #[error("payload of {len} bytes is larger than the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    /// The payload is not UTF-8 text.
    #[error("payload is not UTF-8 text")]
    NotUtf8,
    /// The payload is neither a bare word nor valid JSON (or is empty); carries the parser's reason.
    #[error("payload is not valid JSON: {0}")]
    NotJson(String),
    /// The payload is valid JSON but not an object (e.g. an array or a string).
    #[error("payload is JSON but not an object")]
    NotAnObject,
    /// The object has neither the kind's main field nor `tamper`/`battery` (which would make it a heartbeat).
    #[error("state lacks {field} (a state without it must carry tamper or battery)")]
    MissingField { field: &'static str },
    /// A field has the wrong JSON type or an unknown value (e.g. `"contact":"ajar"`).
    #[error("{field} must be {expected}")]
    WrongType { field: &'static str, expected: &'static str },
    /// A numeric field is outside its range (`value` is the number as received).
    #[error("{field} {value} is out of range ({})", valid_range(.field))]
    OutOfRange { field: &'static str, value: String },
    /// A bare word that this kind does not accept (e.g. `OPEN` for a light, `ON` for a lux sensor).
    #[error("bare word {word:?} is not valid for a {} device (send a JSON object)", .kind.as_str())]
    BareWordNotValid { word: String, kind: DeviceKind },
    /// A bridge (Zigbee2MQTT, an ESPHome node) speaks for other devices and has no state.
    #[error("a bridge has no state of its own; its devices' states come on their own topics")]
    NoState,
}

/// The accepted range of a numeric field, for [`DecodeError::OutOfRange`]'s message.
fn valid_range(field: &str) -> &'static str {
    match field {
        "brightness" => "0 to 255",
        "battery" => "0 to 100",
        "lux" => "0 or more",
        "temperature" => "-60 to 100",
        _ => "see SPEC section 5",
    }
}

/// The state of a contact sensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Contact {
    /// The door or window is open.
    Open,
    /// The door or window is closed.
    Closed,
}

impl Contact {
    /// The JSON spelling: `"open"` or `"closed"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Contact::Open => "open",
            Contact::Closed => "closed",
        }
    }
}

/// The main field of a state, typed per device kind.
#[derive(Debug, Clone, PartialEq)]
pub enum Main {
    /// `motion`: whether motion is detected.
    Motion(bool),
    /// `contact`: open or closed.
    Contact(Contact),
    /// `on` and the optional `brightness` (0–255) of a light.
    Light { on: bool, brightness: Option<u8> },
    /// A switch reports `on`, an `action` (e.g. `"single"`), or both; never neither.
    Switch { on: Option<bool>, action: Option<String> },
    /// `action` of a button (e.g. `"single"`, `"double"`, `"hold"`).
    Button { action: String },
    /// `on` of a siren.
    Siren { on: bool },
    /// `action` of a keypad; `decode_state` always sets it (a keypad without one is a heartbeat, `main` None).
    Keypad { action: Option<String> },
    /// `lux`: illuminance, 0 or more.
    Lux(f64),
    /// `temperature` in °C, −60 to 100.
    Temperature(f64),
    /// `smoke`: whether smoke is detected.
    Smoke(bool),
}

/// A decoded `dpi/ID/state` payload.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceState {
    /// The kind's main field; `None` for a heartbeat that only carries `tamper` and/or `battery`.
    pub main: Option<Main>,
    /// `tamper`, if the device reported it.
    pub tamper: Option<bool>,
    /// `battery` in percent (0–100), if the device reported it.
    pub battery: Option<u8>,
    /// The whole object as received, unknown fields included; a bare word becomes its one main field.
    pub fields: Map<String, Value>,
}

impl DeviceState {
    /// The canonical JSON object that is stored and shown: the received fields, main field normalised.
    pub fn to_json(&self) -> String {
        match serde_json::to_string(&self.fields) {
            Ok(json) => json,
            // A map of string keys to JSON values always serialises.
            Err(e) => unreachable!("serialising a JSON object failed: {e}"),
        }
    }
}

/// Decodes a `dpi/ID/availability` payload: `online` → true, `offline` → false (trimmed, any case, or
/// as a JSON string).
pub fn decode_availability(payload: &[u8]) -> Result<bool, DecodeError> {
    let text = std::str::from_utf8(payload).map_err(|_| DecodeError::NotUtf8)?.trim();
    let word = text.strip_prefix('"').and_then(|t| t.strip_suffix('"')).unwrap_or(text);
    if word.eq_ignore_ascii_case("online") {
        Ok(true)
    } else if word.eq_ignore_ascii_case("offline") {
        Ok(false)
    } else {
        Err(DecodeError::WrongType { field: "availability", expected: "online or offline" })
    }
}

/// Decodes a `dpi/ID/state` payload for a device of `kind`; refuses payloads longer than `max_bytes`.
pub fn decode_state(kind: DeviceKind, payload: &[u8], max_bytes: usize) -> Result<DeviceState, DecodeError> {
    if payload.len() > max_bytes {
        return Err(DecodeError::TooLarge { len: payload.len(), max: max_bytes });
    }
    if kind == DeviceKind::Bridge {
        return Err(DecodeError::NoState);
    }
    let text = std::str::from_utf8(payload).map_err(|_| DecodeError::NotUtf8)?.trim();
    if text.is_empty() {
        return Err(DecodeError::NotJson("the payload is empty".to_owned()));
    }
    if text.starts_with('{') {
        return match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(fields)) => decode_object(kind, fields),
            Ok(_) => Err(DecodeError::NotAnObject),
            Err(e) => Err(DecodeError::NotJson(e.to_string())),
        };
    }
    let is_token = !text.contains(char::is_whitespace) && !text.starts_with(['[', '"']);
    if is_token {
        return decode_bare_word(kind, text);
    }
    match serde_json::from_str::<Value>(text) {
        Ok(_) => Err(DecodeError::NotAnObject),
        Err(e) => Err(DecodeError::NotJson(e.to_string())),
    }
}

/// A known bare word as `(value, is_door_word)`: value true for ON/1/true/OPEN, false for OFF/0/false/CLOSED;
/// `is_door_word` for OPEN/CLOSED, which only a contact accepts. `None` for any other word.
fn bare_word_value(word: &str) -> Option<(bool, bool)> {
    const WORDS: [(&str, bool, bool); 8] = [
        ("on", true, false),
        ("off", false, false),
        ("1", true, false),
        ("0", false, false),
        ("true", true, false),
        ("false", false, false),
        ("open", true, true),
        ("closed", false, true),
    ];
    WORDS.iter().find(|(w, _, _)| word.eq_ignore_ascii_case(w)).map(|&(_, value, door)| (value, door))
}

/// Decodes a bare word for `kind` into a state whose fields hold the one normalised main field.
fn decode_bare_word(kind: DeviceKind, word: &str) -> Result<DeviceState, DecodeError> {
    let refuse = || {
        let mut quoted: String = word.chars().take(MAX_QUOTED_WORD).collect();
        if word.chars().count() > MAX_QUOTED_WORD {
            quoted.push('…');
        }
        DecodeError::BareWordNotValid { word: quoted, kind }
    };
    let (value, door_word) = bare_word_value(word).ok_or_else(refuse)?;
    let (main, key, json) = match kind {
        DeviceKind::Contact => {
            let contact = if value { Contact::Open } else { Contact::Closed };
            (Main::Contact(contact), "contact", Value::from(contact.as_str()))
        }
        _ if door_word => return Err(refuse()),
        DeviceKind::Motion => (Main::Motion(value), "motion", Value::Bool(value)),
        DeviceKind::Smoke => (Main::Smoke(value), "smoke", Value::Bool(value)),
        DeviceKind::Light => (Main::Light { on: value, brightness: None }, "on", Value::Bool(value)),
        DeviceKind::Switch => (Main::Switch { on: Some(value), action: None }, "on", Value::Bool(value)),
        DeviceKind::Siren => (Main::Siren { on: value }, "on", Value::Bool(value)),
        DeviceKind::Button | DeviceKind::Keypad | DeviceKind::Lux | DeviceKind::Temperature | DeviceKind::Bridge => {
            return Err(refuse())
        }
    };
    let mut fields = Map::new();
    fields.insert(key.to_owned(), json);
    Ok(DeviceState { main: Some(main), tamper: None, battery: None, fields })
}

/// Decodes a JSON object for `kind`: checks the common fields, then the kind's own.
fn decode_object(kind: DeviceKind, fields: Map<String, Value>) -> Result<DeviceState, DecodeError> {
    let tamper = bool_field(&fields, "tamper")?;
    let battery = int_field(&fields, "battery", 100)?;
    let main = match kind {
        DeviceKind::Motion => bool_field(&fields, "motion")?.map(Main::Motion),
        DeviceKind::Smoke => bool_field(&fields, "smoke")?.map(Main::Smoke),
        DeviceKind::Contact => match fields.get("contact") {
            None => None,
            Some(Value::String(s)) if s == "open" => Some(Main::Contact(Contact::Open)),
            Some(Value::String(s)) if s == "closed" => Some(Main::Contact(Contact::Closed)),
            Some(_) => return Err(DecodeError::WrongType { field: "contact", expected: r#""open" or "closed""# }),
        },
        DeviceKind::Light => {
            let brightness = int_field(&fields, "brightness", 255)?;
            bool_field(&fields, "on")?.map(|on| Main::Light { on, brightness })
        }
        DeviceKind::Siren => bool_field(&fields, "on")?.map(|on| Main::Siren { on }),
        DeviceKind::Switch => {
            let on = bool_field(&fields, "on")?;
            let action = action_field(&fields)?;
            (on.is_some() || action.is_some()).then_some(Main::Switch { on, action })
        }
        DeviceKind::Button => action_field(&fields)?.map(|action| Main::Button { action }),
        DeviceKind::Keypad => action_field(&fields)?.map(|action| Main::Keypad { action: Some(action) }),
        DeviceKind::Lux => number_field(&fields, "lux", 0.0, f64::INFINITY)?.map(Main::Lux),
        DeviceKind::Temperature => number_field(&fields, "temperature", -60.0, 100.0)?.map(Main::Temperature),
        DeviceKind::Bridge => return Err(DecodeError::NoState),
    };
    if main.is_none() && tamper.is_none() && battery.is_none() {
        return Err(DecodeError::MissingField { field: main_field(kind) });
    }
    Ok(DeviceState { main, tamper, battery, fields })
}

/// The name of the kind's main field, for [`DecodeError::MissingField`].
fn main_field(kind: DeviceKind) -> &'static str {
    match kind {
        DeviceKind::Motion => "motion",
        DeviceKind::Contact => "contact",
        DeviceKind::Light | DeviceKind::Siren => "on",
        DeviceKind::Switch => "on or action",
        DeviceKind::Button | DeviceKind::Keypad => "action",
        DeviceKind::Lux => "lux",
        DeviceKind::Temperature => "temperature",
        DeviceKind::Smoke => "smoke",
        DeviceKind::Bridge => "nothing",
    }
}

/// An optional JSON boolean.
fn bool_field(fields: &Map<String, Value>, field: &'static str) -> Result<Option<bool>, DecodeError> {
    match fields.get(field) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(DecodeError::WrongType { field, expected: "a boolean" }),
    }
}

/// An optional JSON integer in `0..=max`.
fn int_field(fields: &Map<String, Value>, field: &'static str, max: u8) -> Result<Option<u8>, DecodeError> {
    let Some(value) = fields.get(field) else { return Ok(None) };
    let Some(n) = value.as_number().filter(|n| n.is_u64() || n.is_i64()) else {
        return Err(DecodeError::WrongType { field, expected: "an integer" });
    };
    match n.as_u64().and_then(|n| u8::try_from(n).ok()).filter(|n| *n <= max) {
        Some(n) => Ok(Some(n)),
        None => Err(DecodeError::OutOfRange { field, value: n.to_string() }),
    }
}

/// An optional JSON number in `min..=max`.
fn number_field(
    fields: &Map<String, Value>,
    field: &'static str,
    min: f64,
    max: f64,
) -> Result<Option<f64>, DecodeError> {
    let Some(value) = fields.get(field) else { return Ok(None) };
    let Some(n) = value.as_f64() else {
        return Err(DecodeError::WrongType { field, expected: "a number" });
    };
    if n.is_finite() && (min..=max).contains(&n) {
        Ok(Some(n))
    } else {
        Err(DecodeError::OutOfRange { field, value: value.to_string() })
    }
}

/// An optional `action`: a non-empty JSON string.
fn action_field(fields: &Map<String, Value>) -> Result<Option<String>, DecodeError> {
    match fields.get("action") {
        None => Ok(None),
        Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
        Some(_) => Err(DecodeError::WrongType { field: "action", expected: "a non-empty string" }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use DeviceKind::*;

    /// The payload limit in these tests.
    const MAX: usize = 64;

    /// `ok!(name, Kind, payload, main)`: the payload decodes and its main field is `main`.
    macro_rules! ok {
        ($name:ident, $kind:expr, $payload:expr, $main:expr) => {
            #[test]
            fn $name() {
                let payload = $payload;
                let bytes: &[u8] = payload.as_ref();
                let state = decode_state($kind, bytes, MAX);
                assert_eq!(state.map(|s| s.main), Ok($main));
            }
        };
    }

    /// `err!(name, Kind, payload, error)`: the payload is refused with `error`.
    macro_rules! err {
        ($name:ident, $kind:expr, $payload:expr, $error:expr) => {
            #[test]
            fn $name() {
                let payload = $payload;
                let bytes: &[u8] = payload.as_ref();
                assert_eq!(decode_state($kind, bytes, MAX), Err($error));
            }
        };
    }

    /// `not_json!(name, Kind, payload)`: the payload is refused as not JSON (the parser's words vary).
    macro_rules! not_json {
        ($name:ident, $kind:expr, $payload:expr) => {
            #[test]
            fn $name() {
                let result = decode_state($kind, $payload.as_bytes(), MAX);
                assert!(matches!(result, Err(DecodeError::NotJson(_))), "{result:?}");
            }
        };
    }

    /// `canon!(name, Kind, payload, json)`: the payload decodes and `to_json` is the same object as `json`.
    macro_rules! canon {
        ($name:ident, $kind:expr, $payload:expr, $json:expr) => {
            #[test]
            fn $name() {
                let payload = $payload;
                let bytes: &[u8] = payload.as_ref();
                let state = decode_state($kind, bytes, 1024).expect("decodes");
                let got: Value = serde_json::from_str(&state.to_json()).expect("to_json is JSON");
                let want: Value = serde_json::from_str($json).expect("test JSON");
                assert_eq!(got, want);
            }
        };
    }

    /// `kept!(name, Kind, json)`: the JSON decodes and `to_json` gives back the same object, extras included.
    macro_rules! kept {
        ($name:ident, $kind:expr, $json:expr) => {
            canon!($name, $kind, $json, $json);
        };
    }

    /// `common!(name, Kind, payload, tamper, battery)`: the payload decodes with these common fields.
    macro_rules! common {
        ($name:ident, $kind:expr, $payload:expr, $tamper:expr, $battery:expr) => {
            #[test]
            fn $name() {
                let state = decode_state($kind, $payload.as_bytes(), MAX).map(|s| (s.tamper, s.battery));
                assert_eq!(state, Ok(($tamper, $battery)));
            }
        };
    }

    /// `avail!(name, payload, result)`: `decode_availability` of the payload.
    macro_rules! avail {
        ($name:ident, $payload:expr, $result:expr) => {
            #[test]
            fn $name() {
                let payload = $payload;
                let bytes: &[u8] = payload.as_ref();
                assert_eq!(decode_availability(bytes), $result);
            }
        };
    }

    fn wrong(field: &'static str, expected: &'static str) -> DecodeError {
        DecodeError::WrongType { field, expected }
    }
    fn range(field: &'static str, value: &str) -> DecodeError {
        DecodeError::OutOfRange { field, value: value.to_owned() }
    }
    fn missing(field: &'static str) -> DecodeError {
        DecodeError::MissingField { field }
    }
    fn bare(word: &str, kind: DeviceKind) -> DecodeError {
        DecodeError::BareWordNotValid { word: word.to_owned(), kind }
    }
    /// `json` with a `"pad"` field added so that it is exactly `len` bytes long.
    fn padded(json: &str, len: usize) -> String {
        let head = json.strip_suffix('}').expect("an object");
        let pad = len - head.len() - r#","pad":""}"#.len();
        format!(r#"{head},"pad":"{}"}}"#, "x".repeat(pad))
    }
    fn light(on: bool, brightness: Option<u8>) -> Option<Main> {
        Some(Main::Light { on, brightness })
    }
    fn switch(on: Option<bool>, action: Option<&str>) -> Option<Main> {
        Some(Main::Switch { on, action: action.map(str::to_owned) })
    }
    fn button(action: &str) -> Option<Main> {
        Some(Main::Button { action: action.to_owned() })
    }
    fn keypad(action: &str) -> Option<Main> {
        Some(Main::Keypad { action: Some(action.to_owned()) })
    }
    const OPEN: Option<Main> = Some(Main::Contact(super::Contact::Open));
    const CLOSED: Option<Main> = Some(Main::Contact(super::Contact::Closed));

    // Every kind, valid JSON.
    ok!(motion_json_true, Motion, r#"{"motion":true}"#, Some(Main::Motion(true)));
    ok!(motion_json_false, Motion, r#"{"motion":false}"#, Some(Main::Motion(false)));
    ok!(contact_json_open, Contact, r#"{"contact":"open"}"#, OPEN);
    ok!(contact_json_closed, Contact, r#"{"contact":"closed"}"#, CLOSED);
    ok!(light_json_on_brightness, Light, r#"{"on":true,"brightness":200}"#, light(true, Some(200)));
    ok!(light_json_off, Light, r#"{"on":false}"#, light(false, None));
    ok!(light_json_brightness_bounds, Light, r#"{"on":true,"brightness":255}"#, light(true, Some(255)));
    ok!(light_json_brightness_zero, Light, r#"{"on":true,"brightness":0}"#, light(true, Some(0)));
    ok!(switch_json_on, Switch, r#"{"on":true}"#, switch(Some(true), None));
    ok!(switch_json_action, Switch, r#"{"action":"single"}"#, switch(None, Some("single")));
    ok!(switch_json_both, Switch, r#"{"on":false,"action":"hold"}"#, switch(Some(false), Some("hold")));
    ok!(button_json_action, Button, r#"{"action":"single"}"#, button("single"));
    ok!(siren_json_on, Siren, r#"{"on":true}"#, Some(Main::Siren { on: true }));
    ok!(keypad_json_action, Keypad, r#"{"action":"arm_away"}"#, keypad("arm_away"));
    ok!(lux_json_int, Lux, r#"{"lux":35}"#, Some(Main::Lux(35.0)));
    ok!(lux_json_zero, Lux, r#"{"lux":0}"#, Some(Main::Lux(0.0)));
    ok!(lux_json_float, Lux, r#"{"lux":12.5}"#, Some(Main::Lux(12.5)));
    ok!(temperature_json, Temperature, r#"{"temperature":21.5}"#, Some(Main::Temperature(21.5)));
    ok!(temperature_json_low, Temperature, r#"{"temperature":-60}"#, Some(Main::Temperature(-60.0)));
    ok!(temperature_json_high, Temperature, r#"{"temperature":100}"#, Some(Main::Temperature(100.0)));
    ok!(smoke_json, Smoke, r#"{"smoke":true}"#, Some(Main::Smoke(true)));
    ok!(json_with_whitespace, Motion, " \n{ \"motion\" : true }\r\n", Some(Main::Motion(true)));

    // Heartbeats: no main field, but tamper or battery.
    ok!(motion_heartbeat_battery, Motion, r#"{"battery":87}"#, None);
    ok!(contact_heartbeat_tamper, Contact, r#"{"tamper":true}"#, None);
    ok!(keypad_heartbeat, Keypad, r#"{"tamper":false,"battery":50}"#, None);
    ok!(light_heartbeat_with_brightness, Light, r#"{"brightness":10,"battery":5}"#, None);
    err!(motion_empty_object, Motion, "{}", missing("motion"));
    err!(switch_empty_object, Switch, r#"{"linkquality":80}"#, missing("on or action"));
    err!(light_brightness_without_on, Light, r#"{"brightness":80}"#, missing("on"));
    err!(button_without_action, Button, r#"{"on":true}"#, missing("action"));
    err!(lux_wrong_main_field, Lux, r#"{"temperature":20}"#, missing("lux"));

    // Common fields.
    common!(common_tamper_battery, Motion, r#"{"motion":true,"tamper":true,"battery":87}"#, Some(true), Some(87));
    common!(common_none, Contact, r#"{"contact":"open"}"#, None, None);
    common!(common_battery_bounds, Smoke, r#"{"smoke":false,"battery":100}"#, None, Some(100));
    common!(common_battery_zero, Lux, r#"{"battery":0}"#, None, Some(0));
    err!(battery_over_100, Motion, r#"{"motion":true,"battery":101}"#, range("battery", "101"));
    err!(battery_negative, Motion, r#"{"motion":true,"battery":-1}"#, range("battery", "-1"));
    err!(battery_huge, Motion, r#"{"motion":true,"battery":300}"#, range("battery", "300"));
    err!(battery_float, Motion, r#"{"motion":true,"battery":87.0}"#, wrong("battery", "an integer"));
    err!(battery_string, Motion, r#"{"motion":true,"battery":"87"}"#, wrong("battery", "an integer"));
    err!(tamper_string, Contact, r#"{"contact":"open","tamper":"yes"}"#, wrong("tamper", "a boolean"));

    // Bare words: kinds that take them, any case, trimmed.
    ok!(light_bare_on, Light, "ON", light(true, None));
    ok!(light_bare_off_lower, Light, "off", light(false, None));
    ok!(light_bare_1, Light, "1", light(true, None));
    ok!(light_bare_false, Light, "False", light(false, None));
    ok!(switch_bare_on, Switch, "ON\n", switch(Some(true), None));
    ok!(siren_bare_0, Siren, "0", Some(Main::Siren { on: false }));
    ok!(siren_bare_true, Siren, "true", Some(Main::Siren { on: true }));
    ok!(contact_bare_open, Contact, "OPEN", OPEN);
    ok!(contact_bare_closed, Contact, " closed ", CLOSED);
    ok!(contact_bare_1, Contact, "1", OPEN);
    ok!(contact_bare_0, Contact, "0", CLOSED);
    ok!(contact_bare_on, Contact, "ON", OPEN);
    ok!(contact_bare_false, Contact, "false", CLOSED);
    ok!(motion_bare_on, Motion, "ON", Some(Main::Motion(true)));
    ok!(motion_bare_0, Motion, "0", Some(Main::Motion(false)));
    ok!(smoke_bare_true, Smoke, "TRUE", Some(Main::Smoke(true)));
    ok!(smoke_bare_off, Smoke, "Off", Some(Main::Smoke(false)));

    // Bare words the kind does not accept.
    err!(light_bare_open, Light, "OPEN", bare("OPEN", Light));
    err!(siren_bare_closed, Siren, "closed", bare("closed", Siren));
    err!(motion_bare_open, Motion, "OPEN", bare("OPEN", Motion));
    err!(lux_bare_on, Lux, "ON", bare("ON", Lux));
    err!(lux_bare_number, Lux, "35", bare("35", Lux));
    err!(temperature_bare_number, Temperature, "21.5", bare("21.5", Temperature));
    err!(button_bare_1, Button, "1", bare("1", Button));
    err!(keypad_bare_true, Keypad, "true", bare("true", Keypad));
    err!(light_bare_unknown, Light, "toggle", bare("toggle", Light));
    err!(contact_bare_typo, Contact, "OPENED", bare("OPENED", Contact));
    err!(motion_bare_null, Motion, "null", bare("null", Motion));
    err!(bare_word_quoted_short, Light, "x".repeat(40), bare(&format!("{}…", "x".repeat(32)), Light));

    // Invalid JSON and non-objects.
    not_json!(truncated_json, Motion, r#"{"motion":tru"#);
    not_json!(unclosed_object, Contact, r#"{"contact":"open""#);
    not_json!(trailing_garbage, Smoke, r#"{"smoke":true} x"#);
    not_json!(single_quotes, Motion, "{'motion':true}");
    not_json!(two_words, Light, "turn on");
    err!(json_array, Motion, "[true]", DecodeError::NotAnObject);
    err!(json_string, Contact, r#""open""#, DecodeError::NotAnObject);
    err!(empty_payload, Motion, "", DecodeError::NotJson("the payload is empty".into()));
    err!(blank_payload, Light, "  \n", DecodeError::NotJson("the payload is empty".into()));
    err!(non_utf8, Light, b"\xffON", DecodeError::NotUtf8);
    err!(oversize, Lux, padded(r#"{"lux":1}"#, MAX + 1), DecodeError::TooLarge { len: MAX + 1, max: MAX });
    ok!(exactly_max, Motion, padded(r#"{"motion":true}"#, MAX), Some(Main::Motion(true)));
    err!(oversize_bare_word, Light, " ".repeat(MAX) + "ON", DecodeError::TooLarge { len: MAX + 2, max: MAX });

    // Wrong types.
    err!(motion_string, Motion, r#"{"motion":"true"}"#, wrong("motion", "a boolean"));
    err!(motion_number, Motion, r#"{"motion":1}"#, wrong("motion", "a boolean"));
    err!(motion_null, Motion, r#"{"motion":null}"#, wrong("motion", "a boolean"));
    err!(contact_bool, Contact, r#"{"contact":true}"#, wrong("contact", r#""open" or "closed""#));
    err!(contact_upper, Contact, r#"{"contact":"OPEN"}"#, wrong("contact", r#""open" or "closed""#));
    err!(contact_ajar, Contact, r#"{"contact":"ajar"}"#, wrong("contact", r#""open" or "closed""#));
    err!(light_on_string, Light, r#"{"on":"ON"}"#, wrong("on", "a boolean"));
    err!(light_brightness_float, Light, r#"{"on":true,"brightness":12.5}"#, wrong("brightness", "an integer"));
    err!(light_brightness_string, Light, r#"{"on":true,"brightness":"80"}"#, wrong("brightness", "an integer"));
    err!(switch_action_number, Switch, r#"{"action":1}"#, wrong("action", "a non-empty string"));
    err!(switch_on_number, Switch, r#"{"on":1,"action":"single"}"#, wrong("on", "a boolean"));
    err!(button_action_empty, Button, r#"{"action":""}"#, wrong("action", "a non-empty string"));
    err!(button_action_null, Button, r#"{"action":null}"#, wrong("action", "a non-empty string"));
    err!(siren_on_number, Siren, r#"{"on":0}"#, wrong("on", "a boolean"));
    err!(keypad_action_object, Keypad, r#"{"action":{"a":1}}"#, wrong("action", "a non-empty string"));
    err!(lux_string, Lux, r#"{"lux":"35"}"#, wrong("lux", "a number"));
    err!(temperature_string, Temperature, r#"{"temperature":"21.5"}"#, wrong("temperature", "a number"));
    err!(smoke_string, Smoke, r#"{"smoke":"yes"}"#, wrong("smoke", "a boolean"));

    // Out of range.
    err!(light_brightness_256, Light, r#"{"on":true,"brightness":256}"#, range("brightness", "256"));
    err!(light_brightness_negative, Light, r#"{"on":true,"brightness":-1}"#, range("brightness", "-1"));
    err!(lux_negative, Lux, r#"{"lux":-0.5}"#, range("lux", "-0.5"));
    err!(temperature_too_hot, Temperature, r#"{"temperature":100.5}"#, range("temperature", "100.5"));
    err!(temperature_too_cold, Temperature, r#"{"temperature":-61}"#, range("temperature", "-61"));

    // Unknown extra fields are kept; the canonical JSON is the received object, main field normalised.
    kept!(kept_motion_extra, Motion, r#"{"motion":true,"linkquality":120,"fw":{"v":"1.2"}}"#);
    kept!(kept_contact_extra, Contact, r#"{"contact":"open","tamper":false,"battery":90,"x":[1,2]}"#);
    kept!(kept_light, Light, r#"{"on":true,"brightness":200,"color_temp":370}"#);
    kept!(kept_switch, Switch, r#"{"action":"double","power":3.5}"#);
    kept!(kept_button, Button, r#"{"action":"hold","battery":12}"#);
    kept!(kept_siren, Siren, r#"{"on":false,"volume":"high"}"#);
    kept!(kept_keypad, Keypad, r#"{"action":"disarm","code":"1234"}"#);
    kept!(kept_lux, Lux, r#"{"lux":35,"unit":"lx"}"#);
    kept!(kept_temperature, Temperature, r#"{"temperature":21.5,"humidity":40}"#);
    kept!(kept_smoke, Smoke, r#"{"smoke":false,"test":true}"#);
    kept!(kept_heartbeat, Motion, r#"{"battery":87,"rssi":-70}"#);
    canon!(canon_bare_open, Contact, "OPEN", r#"{"contact":"open"}"#);
    canon!(canon_bare_contact_1, Contact, "1", r#"{"contact":"open"}"#);
    canon!(canon_bare_light_off, Light, "off", r#"{"on":false}"#);
    canon!(canon_bare_switch, Switch, "TRUE", r#"{"on":true}"#);
    canon!(canon_bare_siren, Siren, "1", r#"{"on":true}"#);
    canon!(canon_bare_motion, Motion, "ON", r#"{"motion":true}"#);
    canon!(canon_bare_smoke, Smoke, "0", r#"{"smoke":false}"#);

    #[test]
    fn fields_keep_unknown_values() {
        let state = decode_state(Light, br#"{"on":true,"effect":"blink"}"#, MAX).expect("decodes");
        assert_eq!(state.fields.get("effect"), Some(&Value::from("blink")));
        assert_eq!(state.fields.len(), 2);
    }

    #[test]
    fn to_json_of_bare_word_is_exact() {
        let state = decode_state(Contact, b"OPEN", MAX).expect("decodes");
        assert_eq!(state.to_json(), r#"{"contact":"open"}"#);
    }

    #[test]
    fn error_messages_are_one_line() {
        let cases = [
            (
                DecodeError::TooLarge { len: 70000, max: 16384 },
                "payload of 70000 bytes is larger than the limit of 16384 bytes",
            ),
            (DecodeError::NotUtf8, "payload is not UTF-8 text"),
            (DecodeError::NotAnObject, "payload is JSON but not an object"),
            (missing("motion"), "state lacks motion (a state without it must carry tamper or battery)"),
            (wrong("motion", "a boolean"), "motion must be a boolean"),
            (range("temperature", "150"), "temperature 150 is out of range (-60 to 100)"),
            (range("brightness", "300"), "brightness 300 is out of range (0 to 255)"),
            (bare("OPEN", Light), r#"bare word "OPEN" is not valid for a light device (send a JSON object)"#),
        ];
        for (error, message) in cases {
            assert_eq!(error.to_string(), message);
        }
        let not_json = decode_state(Motion, b"{\"motion\":\ntru", MAX).expect_err("refused").to_string();
        assert!(!not_json.contains('\n'), "{not_json}");
    }

    // Availability.
    avail!(avail_online, "online", Ok(true));
    avail!(avail_offline, "offline", Ok(false));
    avail!(avail_upper_trimmed, " ONLINE\n", Ok(true));
    avail!(avail_json_string, r#""online""#, Ok(true));
    avail!(avail_json_string_offline, r#""Offline""#, Ok(false));
    avail!(avail_empty, "", Err(wrong("availability", "online or offline")));
    avail!(avail_unknown, "up", Err(wrong("availability", "online or offline")));
    avail!(avail_json_object, r#"{"online":true}"#, Err(wrong("availability", "online or offline")));
    avail!(avail_not_utf8, b"\xfe\xff", Err(DecodeError::NotUtf8));

    // Topics.
}
