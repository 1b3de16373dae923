//! Home Assistant MQTT discovery (SPEC §11): every device as the matching Home Assistant component
//! and the alarm as an `alarm_control_panel` that requires a code, each a retained
//! `PREFIX/COMPONENT/domoticpi/OBJECT/config`. Pure: the dispatcher publishes what this returns, at
//! start, after a reload, and whenever `PREFIX/status` says `online`.
//!
//! The configs point Home Assistant at the hub's own topics (`dpi/ID/state`, `/set`,
//! `/availability`, `dpi/alarm/*`), with templates for its payloads, so Home Assistant needs no
//! YAML; it connects as an admin user, and its commands go through the same checks as anyone's.

use serde_json::{json, Value};

use crate::config::{Config, DeviceKind};
use crate::topics::{self, Leaf};

/// One retained discovery message: (topic, payload).
pub type Announcement = (String, String);

/// The node id under which the hub's entities are announced.
const NODE: &str = "domoticpi";

/// Every device's and the alarm's discovery config, under `prefix`.
pub fn announcements(config: &Config, prefix: &str) -> Vec<Announcement> {
    let device = json!({ "identifiers": [format!("domoticpi-{}", config.house.name)], "name": config.house.name, "manufacturer": "DomoticPi" });
    let mut out: Vec<Announcement> = config
        .devices
        .iter()
        .filter_map(|d| {
            let (component, mut body) = component(&d.id, d.kind)?;
            body["unique_id"] = json!(format!("domoticpi_{}", d.id));
            body["object_id"] = json!(d.id.replace('-', "_"));
            body["name"] = json!(d.id);
            body["availability_topic"] = json!(topics::device(&d.id, Leaf::Availability));
            body["payload_available"] = json!("online");
            body["payload_not_available"] = json!("offline");
            body["device"] = device.clone();
            Some((format!("{prefix}/{component}/{NODE}/{}/config", d.id.replace('-', "_")), body.to_string()))
        })
        .collect();
    let alarm = json!({
        "unique_id": "domoticpi_alarm",
        "name": "Alarm",
        "state_topic": topics::ALARM_STATE,
        "value_template": "{{ value_json.state }}",
        "command_topic": topics::ALARM_SET,
        "command_template": "{\"action\": \"{{ action }}\", \"code\": \"{{ code }}\"}",
        "payload_arm_away": "arm_away",
        "payload_arm_home": "arm_home",
        "payload_arm_night": "arm_night",
        "payload_disarm": "disarm",
        "payload_trigger": "panic",
        "code": "REMOTE_CODE",
        "code_arm_required": config.alarm.code_arm_required,
        "code_disarm_required": true,
        "supported_features": ["arm_home", "arm_away", "arm_night", "trigger"],
        "device": device,
    });
    out.push((format!("{prefix}/alarm_control_panel/{NODE}/alarm/config"), alarm.to_string()));
    out
}

/// The component and its kind-specific keys for a device; `None` for kinds Home Assistant has
/// nothing to show for (a keypad: its commands are the alarm's; a bridge, which speaks for others).
fn component(id: &str, kind: DeviceKind) -> Option<(&'static str, Value)> {
    let state = topics::device(id, Leaf::State);
    let set = topics::device(id, Leaf::Set);
    let binary = |class: &str, template: &str| json!({ "state_topic": state, "device_class": class, "value_template": template, "payload_on": "ON", "payload_off": "OFF" });
    let sensor = |class: Option<&str>, unit: Option<&str>, template: &str| {
        let mut v = json!({ "state_topic": state, "value_template": template });
        if let Some(class) = class {
            v["device_class"] = json!(class);
            v["state_class"] = json!("measurement");
        }
        if let Some(unit) = unit {
            v["unit_of_measurement"] = json!(unit);
        }
        v
    };
    Some(match kind {
        DeviceKind::Motion => ("binary_sensor", binary("motion", "{{ 'ON' if value_json.motion else 'OFF' }}")),
        DeviceKind::Contact => {
            ("binary_sensor", binary("door", "{{ 'ON' if value_json.contact == 'open' else 'OFF' }}"))
        }
        DeviceKind::Smoke => ("binary_sensor", binary("smoke", "{{ 'ON' if value_json.smoke else 'OFF' }}")),
        DeviceKind::Lux => ("sensor", sensor(Some("illuminance"), Some("lx"), "{{ value_json.lux }}")),
        DeviceKind::Temperature => ("sensor", sensor(Some("temperature"), Some("°C"), "{{ value_json.temperature }}")),
        DeviceKind::Switch | DeviceKind::Button => {
            ("sensor", sensor(None, None, "{{ value_json.action | default('') }}"))
        }
        DeviceKind::Light => (
            "light",
            json!({
                "state_topic": state,
                "state_value_template": "{{ 'ON' if value_json.on else 'OFF' }}",
                "command_topic": set,
                "payload_on": "{\"on\": true}",
                "payload_off": "{\"on\": false}",
                "brightness_state_topic": state,
                "brightness_value_template": "{{ value_json.brightness | default(255) }}",
                "brightness_command_topic": set,
                "brightness_command_template": "{\"brightness\": {{ value }} }",
                "brightness_scale": 255,
            }),
        ),
        DeviceKind::Siren => (
            "switch",
            json!({
                "state_topic": state,
                "value_template": "{{ 'ON' if value_json.on else 'OFF' }}",
                "state_on": "ON",
                "state_off": "OFF",
                "command_topic": set,
                "payload_on": "{\"on\": true}",
                "payload_off": "{\"on\": false}",
            }),
        ),
        DeviceKind::Keypad | DeviceKind::Bridge => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The keys Home Assistant's MQTT integration requires of each component (its documentation:
    /// `state_topic` for binary_sensor and sensor; `command_topic` for light and switch; both for
    /// alarm_control_panel), and the ones every entity here carries.
    fn required(component: &str) -> &'static [&'static str] {
        match component {
            "binary_sensor" | "sensor" => &["state_topic"],
            "light" | "switch" => &["command_topic", "state_topic"],
            "alarm_control_panel" => &["command_topic", "state_topic", "code"],
            other => panic!("unexpected component {other}"),
        }
    }

    #[test]
    fn every_device_and_the_alarm_are_announced_with_the_keys_home_assistant_requires() {
        let kinds =
            ["motion", "contact", "light", "switch", "button", "siren", "keypad", "lux", "temperature", "smoke"];
        let toml: String = kinds.iter().map(|k| format!("[[device]]\nid = \"my-{k}\"\nkind = \"{k}\"\n")).collect();
        let config = Config::from_toml(&toml, None).unwrap();
        let all = announcements(&config, "homeassistant");
        assert_eq!(all.len(), kinds.len() - 1 + 1, "one per device but the keypad, and the alarm");
        for (topic, payload) in &all {
            let levels: Vec<&str> = topic.split('/').collect();
            assert_eq!((levels[0], levels[2], levels[4]), ("homeassistant", "domoticpi", "config"), "{topic}");
            assert!(levels[3].chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "object id {topic}");
            let body: Value = serde_json::from_str(payload).unwrap();
            for key in required(levels[1]).iter().chain(&["unique_id", "name", "device"]) {
                assert!(body.get(*key).is_some(), "{topic} lacks {key}: {body}");
            }
            for key in ["state_topic", "command_topic", "availability_topic"] {
                if let Some(t) = body.get(key).and_then(Value::as_str) {
                    assert!(t.starts_with("dpi/"), "{topic}: {key} {t}");
                }
            }
        }
        let alarm = all.iter().find(|(t, _)| t.contains("alarm_control_panel")).unwrap();
        let alarm: Value = serde_json::from_str(&alarm.1).unwrap();
        assert_eq!(
            (alarm["code"].as_str(), alarm["code_disarm_required"].as_bool()),
            (Some("REMOTE_CODE"), Some(true))
        );
    }

    #[test]
    fn a_fifty_device_house_announces_fifty_one_messages() {
        let kinds = ["motion", "contact", "light", "lux", "temperature"];
        let toml: String =
            (0..50).map(|n| format!("[[device]]\nid = \"d{n}\"\nkind = \"{}\"\n", kinds[n % kinds.len()])).collect();
        let all = announcements(&Config::from_toml(&toml, None).unwrap(), "homeassistant");
        let bytes: usize = all.iter().map(|(t, p)| t.len() + p.len()).sum();
        assert_eq!(all.len(), 51);
        println!("50 devices: {} discovery messages, {bytes} bytes of topics and payloads", all.len());
    }
}
