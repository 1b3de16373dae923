//! The payloads of a simulated device, per kind (SPEC §5): the states sensors publish, the commands a
//! light or siren obeys and the state it reports back, the keypad's alarm commands, and the load
//! generator's numbered states.
//!
//! Pure: no I/O, no clock (the caller passes the time), no randomness (the caller passes the values).

use serde_json::{json, Map, Value};

use crate::config::Kind;

/// The brightness a light reports when it is switched on without one (Zigbee's usual maximum).
pub const FULL_BRIGHTNESS: u8 = 254;

/// Something a sensor reports.
#[derive(Debug, Clone, PartialEq)]
pub enum Reading {
    /// A motion sensor: motion seen or not.
    Motion(bool),
    /// A contact: open (true) or closed.
    Contact(bool),
    /// A button (or a switch's press): `single`, `double`, `hold`.
    Action(&'static str),
    /// A switch's on/off.
    Switch(bool),
    /// Illuminance in lux.
    Lux(u32),
    /// Temperature in °C, one decimal.
    Temperature(f64),
}

impl Reading {
    /// The JSON state published on `dpi/ID/state`.
    pub fn to_json(&self) -> String {
        let value = match self {
            Reading::Motion(m) => json!({ "motion": m }),
            Reading::Contact(open) => json!({ "contact": if *open { "open" } else { "closed" } }),
            Reading::Action(a) => json!({ "action": a }),
            Reading::Switch(on) => json!({ "on": on }),
            Reading::Lux(lux) => json!({ "lux": lux }),
            Reading::Temperature(t) => json!({ "temperature": (t * 10.0).round() / 10.0 }),
        };
        value.to_string()
    }

    /// Whether the hub may act on it: motion, a door opening, a press or a switch (not the end of
    /// motion, a door closing, or a reading).
    pub fn can_cause(&self) -> bool {
        matches!(self, Reading::Motion(true) | Reading::Contact(true) | Reading::Action(_) | Reading::Switch(_))
    }

    /// A few words for the event line.
    pub fn summary(&self) -> String {
        match self {
            Reading::Motion(true) => "motion".to_owned(),
            Reading::Motion(false) => "no motion".to_owned(),
            Reading::Contact(true) => "open".to_owned(),
            Reading::Contact(false) => "closed".to_owned(),
            Reading::Action(a) => format!("press ({a})"),
            Reading::Switch(on) => format!("switched {}", if *on { "on" } else { "off" }),
            Reading::Lux(lux) => format!("{lux} lx"),
            Reading::Temperature(t) => format!("{t:.1} °C"),
        }
    }
}

/// A light's or a siren's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LightState {
    /// Lit (or sounding).
    pub on: bool,
    /// 0–255; kept while off so that "on" comes back at the same level. Sirens do not report it.
    pub brightness: u8,
}

impl Default for LightState {
    /// Off, at full brightness: how a light powers up.
    fn default() -> Self {
        LightState { on: false, brightness: FULL_BRIGHTNESS }
    }
}

impl LightState {
    /// The state reported on `dpi/ID/state`: `{"on":…,"brightness":…}` for a light, `{"on":…}` for a siren.
    pub fn to_json(self, kind: Kind) -> String {
        match kind {
            // Written by hand to keep `on` first, as devices usually send it.
            Kind::Light => format!(r#"{{"on":{},"brightness":{}}}"#, self.on, self.brightness),
            _ => format!(r#"{{"on":{}}}"#, self.on),
        }
    }

    /// A few words for the event line.
    pub fn summary(self, kind: Kind) -> String {
        match (kind, self.on) {
            (Kind::Siren, true) => "now sounding".to_owned(),
            (Kind::Siren, false) => "now silent".to_owned(),
            (_, true) if self.brightness < FULL_BRIGHTNESS => format!("now on at {}", self.brightness),
            (_, true) => "now on".to_owned(),
            (_, false) => "now off".to_owned(),
        }
    }
}

/// Why a command on `dpi/ID/set` was not obeyed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// The payload is not UTF-8.
    #[error("not UTF-8 text")]
    NotUtf8,
    /// Neither a known bare word nor a JSON object.
    #[error("neither ON/OFF nor a JSON object")]
    NotACommand,
    /// A JSON object with neither `on` nor `brightness`.
    #[error("no \"on\" or \"brightness\" in the command")]
    NothingToDo,
    /// A field of the wrong type or out of range.
    #[error("{field} must be {expected}")]
    BadField { field: &'static str, expected: &'static str },
}

/// The state after obeying `payload` from `current`: `{"on":…,"brightness":…}` (either may be left out;
/// a brightness alone switches on above 0 and off at 0) or a bare `ON`/`OFF`/`1`/`0`/`true`/`false`.
pub fn obey(current: LightState, payload: &[u8]) -> Result<LightState, CommandError> {
    let text = std::str::from_utf8(payload).map_err(|_| CommandError::NotUtf8)?.trim();
    if !text.starts_with('{') {
        return match text.to_ascii_lowercase().as_str() {
            "on" | "1" | "true" => Ok(LightState { on: true, ..current }),
            "off" | "0" | "false" => Ok(LightState { on: false, ..current }),
            _ => Err(CommandError::NotACommand),
        };
    }
    let fields: Map<String, Value> = match serde_json::from_str(text) {
        Ok(Value::Object(fields)) => fields,
        _ => return Err(CommandError::NotACommand),
    };
    let on = match fields.get("on") {
        None => None,
        Some(Value::Bool(on)) => Some(*on),
        Some(_) => return Err(CommandError::BadField { field: "on", expected: "true or false" }),
    };
    let brightness = match fields.get("brightness") {
        None => None,
        Some(v) => match v.as_u64().and_then(|b| u8::try_from(b).ok()) {
            Some(b) => Some(b),
            None => return Err(CommandError::BadField { field: "brightness", expected: "an integer from 0 to 255" }),
        },
    };
    match (on, brightness) {
        (None, None) => Err(CommandError::NothingToDo),
        (Some(on), None) => Ok(LightState { on, ..current }),
        (on, Some(0)) => Ok(LightState { on: on.unwrap_or(false), ..current }),
        (on, Some(b)) => Ok(LightState { on: on.unwrap_or(true), brightness: b }),
    }
}

/// The `state` of a `dpi/alarm/state` payload (`{"state":"armed_away","since":…,"by":…}`).
pub fn alarm_state(payload: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(payload).ok()?;
    value.get("state")?.as_str().map(str::to_owned)
}

/// A keypad's command on `dpi/alarm/set`, e.g. `{"action":"arm_away","code":"1234"}`.
pub fn alarm_command(action: &str, code: Option<&str>) -> String {
    match code {
        Some(code) => json!({ "action": action, "code": code }).to_string(),
        None => json!({ "action": action }).to_string(),
    }
}

/// A load-mode state for a sensor of `kind`: valid for the kind, varying with `seq`, plus `"seq"` (the
/// device's counter) and `"t"` (Unix time in nanoseconds at publish), which the hub keeps as extra
/// fields. `None` for kinds load mode does not play.
pub fn load_state(kind: Kind, seq: u64, t_ns: u128) -> Option<String> {
    let mut value = match kind {
        Kind::Motion => json!({ "motion": seq % 2 == 1 }),
        Kind::Contact => json!({ "contact": if seq % 2 == 1 { "open" } else { "closed" } }),
        Kind::Lux => json!({ "lux": seq % 1000 }),
        Kind::Temperature => json!({ "temperature": 15.0 + (seq % 100) as f64 / 10.0 }),
        _ => return None,
    };
    let fields = value.as_object_mut()?;
    fields.insert("seq".to_owned(), json!(seq));
    // Nanoseconds since 1970 fit in a u64 until 2554.
    fields.insert("t".to_owned(), json!(u64::try_from(t_ns).unwrap_or(u64::MAX)));
    Some(value.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const OFF: LightState = LightState { on: false, brightness: FULL_BRIGHTNESS };
    const DIM: LightState = LightState { on: true, brightness: 40 };

    /// `cmd!(name, from, payload, result)`: obeying `payload` in state `from` gives `result`.
    macro_rules! cmd {
        ($name:ident, $from:expr, $payload:expr, $result:expr) => {
            #[test]
            fn $name() {
                assert_eq!(obey($from, $payload.as_bytes()), $result);
            }
        };
    }

    fn lit(on: bool, brightness: u8) -> Result<LightState, CommandError> {
        Ok(LightState { on, brightness })
    }

    cmd!(json_on, OFF, r#"{"on":true}"#, lit(true, 254));
    cmd!(json_off_keeps_level, DIM, r#"{"on":false}"#, lit(false, 40));
    cmd!(json_on_with_brightness, OFF, r#"{"on":true,"brightness":120}"#, lit(true, 120));
    cmd!(brightness_alone_switches_on, OFF, r#"{"brightness":80}"#, lit(true, 80));
    cmd!(brightness_zero_switches_off, DIM, r#"{"brightness":0}"#, lit(false, 40));
    cmd!(off_with_brightness_stays_off, OFF, r#"{"on":false,"brightness":10}"#, lit(false, 10));
    cmd!(extra_fields_ignored, OFF, r#"{"on":true,"transition":2}"#, lit(true, 254));
    cmd!(bare_on, OFF, "ON", lit(true, 254));
    cmd!(bare_off_lower_trimmed, DIM, " off\n", lit(false, 40));
    cmd!(bare_one, OFF, "1", lit(true, 254));
    cmd!(bare_false, DIM, "false", lit(false, 40));
    cmd!(bare_unknown, OFF, "toggle", Err(CommandError::NotACommand));
    cmd!(not_json, OFF, r#"{"on":tru"#, Err(CommandError::NotACommand));
    cmd!(empty_object, OFF, "{}", Err(CommandError::NothingToDo));
    cmd!(on_string, OFF, r#"{"on":"ON"}"#, Err(CommandError::BadField { field: "on", expected: "true or false" }));
    cmd!(
        brightness_too_high,
        OFF,
        r#"{"on":true,"brightness":256}"#,
        Err(CommandError::BadField { field: "brightness", expected: "an integer from 0 to 255" })
    );
    cmd!(
        brightness_float,
        OFF,
        r#"{"brightness":12.5}"#,
        Err(CommandError::BadField { field: "brightness", expected: "an integer from 0 to 255" })
    );

    #[test]
    fn non_utf8_is_refused() {
        assert_eq!(obey(OFF, b"\xffON"), Err(CommandError::NotUtf8));
    }

    #[test]
    fn lights_report_brightness_and_sirens_do_not() {
        let on = LightState { on: true, brightness: 254 };
        assert_eq!(on.to_json(Kind::Light), r#"{"on":true,"brightness":254}"#);
        assert_eq!(on.to_json(Kind::Siren), r#"{"on":true}"#);
        assert_eq!(on.summary(Kind::Siren), "now sounding");
        assert_eq!(DIM.summary(Kind::Light), "now on at 40");
        assert_eq!(OFF.summary(Kind::Light), "now off");
    }

    /// `reading!(name, reading, json)`: the reading's payload is exactly `json`.
    macro_rules! reading {
        ($name:ident, $reading:expr, $json:expr) => {
            #[test]
            fn $name() {
                assert_eq!($reading.to_json(), $json);
            }
        };
    }

    reading!(motion_true, Reading::Motion(true), r#"{"motion":true}"#);
    reading!(motion_false, Reading::Motion(false), r#"{"motion":false}"#);
    reading!(contact_open, Reading::Contact(true), r#"{"contact":"open"}"#);
    reading!(contact_closed, Reading::Contact(false), r#"{"contact":"closed"}"#);
    reading!(button, Reading::Action("single"), r#"{"action":"single"}"#);
    reading!(switch, Reading::Switch(true), r#"{"on":true}"#);
    reading!(lux, Reading::Lux(35), r#"{"lux":35}"#);
    reading!(temperature_rounded, Reading::Temperature(21.46), r#"{"temperature":21.5}"#);

    #[test]
    fn only_events_the_hub_acts_on_are_causes() {
        let causes: Vec<bool> = [
            Reading::Motion(true),
            Reading::Motion(false),
            Reading::Contact(true),
            Reading::Contact(false),
            Reading::Action("single"),
            Reading::Switch(false),
            Reading::Lux(3),
            Reading::Temperature(20.0),
        ]
        .iter()
        .map(Reading::can_cause)
        .collect();
        assert_eq!(causes, [true, false, true, false, true, true, false, false]);
    }

    #[test]
    fn alarm_state_and_commands() {
        let state = br#"{"state":"armed_away","since":"2025-01-01T10:00:00Z","by":"keypad"}"#;
        assert_eq!(alarm_state(state).as_deref(), Some("armed_away"));
        assert_eq!(alarm_state(b"armed_away"), None);
        assert_eq!(alarm_state(br#"{"state":3}"#), None);
        assert_eq!(alarm_command("arm_away", Some("1234")), r#"{"action":"arm_away","code":"1234"}"#);
        assert_eq!(alarm_command("disarm", None), r#"{"action":"disarm"}"#);
    }

    #[test]
    fn load_states_are_valid_per_kind_and_carry_seq_and_t() {
        let t = 1_700_000_000_123_456_789u128;
        for (kind, main) in [
            (Kind::Motion, "motion"),
            (Kind::Contact, "contact"),
            (Kind::Lux, "lux"),
            (Kind::Temperature, "temperature"),
        ] {
            for seq in [1u64, 2, 999, 1000] {
                let text = load_state(kind, seq, t).expect("a sensor");
                let v: Value = serde_json::from_str(&text).expect("JSON");
                assert_eq!(v["seq"].as_u64(), Some(seq), "{text}");
                assert_eq!(v["t"].as_u64(), Some(1_700_000_000_123_456_789), "{text}");
                assert!(v.get(main).is_some(), "{text}");
            }
        }
        assert_eq!(load_state(Kind::Contact, 3, 0).as_deref(), Some(r#"{"contact":"open","seq":3,"t":0}"#));
        let temp: Value =
            serde_json::from_str(&load_state(Kind::Temperature, 199, 0).expect("a sensor")).expect("JSON");
        assert!((-60.0..=100.0).contains(&temp["temperature"].as_f64().unwrap_or(f64::NAN)));
        assert_eq!(load_state(Kind::Light, 1, 0), None);
        assert_eq!(load_state(Kind::Smoke, 1, 0), None);
    }
}
