//! What the bridge sends upstream for each local message (SPEC §8), and the alerts it derives:
//! pure, no I/O.
//!
//! `dpi/ID/state`, `dpi/ID/availability`, `dpi/alarm/state`, `dpi/alarm/event` and `dpi/hub/status`
//! go to `houses/HOUSE_ID/` + the same suffix, retained as they are locally. An alarm event that
//! people must hear about (`triggered`, `tamper`, `sensor_offline`, `code_lockout`) also makes an
//! alert on `houses/HOUSE_ID/alert`; so does a battery at or under [`LOW_BATTERY`] (once, until it
//! reads [`BATTERY_OK`] or more), a hub start, and a disk under [`DISK_LOW_MB`].

use std::collections::{HashMap, HashSet};

use serde_json::{json, Value};

use crate::store::outbox::{Class, Entry};
use crate::topics::{self, Leaf, Topic};

/// A battery at or under this percentage raises `low_battery`.
pub const LOW_BATTERY: u64 = 15;
/// A battery must read this much again before it can raise `low_battery` anew.
pub const BATTERY_OK: u64 = 25;
/// Free space under this many MiB on the data dir's disk raises `disk_low`.
pub const DISK_LOW_MB: u64 = 100;

/// Maps local messages to upstream entries, remembering what alerts it raised.
#[derive(Debug)]
pub struct Forwarder {
    /// `houses/HOUSE_ID/`.
    prefix: String,
    /// Devices whose low battery was reported and has not recovered.
    low_battery: HashSet<String>,
    /// `disk_low` was reported and the disk has not recovered.
    disk_low: bool,
    /// Each device's last availability, as forwarded.
    availability: HashMap<String, bool>,
    /// The alarm's last state, as forwarded.
    alarm: Option<String>,
    /// The house changed (a device came or went, the alarm moved) since the last health report.
    changed: bool,
}

/// What the health report says of the house.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Devices whose availability was seen.
    pub devices: usize,
    /// Of those, online.
    pub online: usize,
    /// The alarm's state, once seen.
    pub alarm: Option<String>,
}

impl Forwarder {
    /// A forwarder for `house_id`.
    pub fn new(house_id: &str) -> Forwarder {
        Forwarder {
            prefix: format!("houses/{house_id}/"),
            low_battery: HashSet::new(),
            disk_low: false,
            availability: HashMap::new(),
            alarm: None,
            changed: false,
        }
    }

    /// The upstream topic for a local suffix (`ID/state`, `hub/status`, `alert`, …).
    pub fn topic(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.prefix)
    }

    /// What to send for a local message at `at` (RFC 3339); nothing for topics not forwarded.
    pub fn entries(&mut self, topic: &str, payload: &[u8], at: &str) -> Vec<Entry> {
        let Some(parsed) = topics::parse(topic) else { return Vec::new() };
        let Some(suffix) = topic.strip_prefix("dpi/") else { return Vec::new() };
        let (class, retain) = match parsed {
            Topic::Device { leaf: Leaf::State | Leaf::Availability, .. } | Topic::HubStatus => (Class::State, true),
            Topic::AlarmState => (Class::Event, true),
            Topic::AlarmEvent => (Class::Event, false),
            _ => return Vec::new(),
        };
        self.note(parsed, payload);
        let mut out = vec![Entry { topic: self.topic(suffix), payload: payload.to_vec(), retain, class }];
        let alert = match parsed {
            Topic::AlarmEvent => alarm_alert(payload),
            Topic::Device { id, leaf: Leaf::State } => self.battery(id, payload, at),
            _ => None,
        };
        out.extend(alert.map(|body| self.alert(body)));
        out
    }

    /// The house as the forwarded messages tell it.
    pub fn summary(&self) -> Summary {
        Summary {
            devices: self.availability.len(),
            online: self.availability.values().filter(|o| **o).count(),
            alarm: self.alarm.clone(),
        }
    }

    /// Whether the house changed since the last call.
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    /// Keeps what the health report needs: availability and the alarm's state.
    fn note(&mut self, topic: Topic<'_>, payload: &[u8]) {
        match topic {
            Topic::Device { id, leaf: Leaf::Availability } => {
                let online = crate::decode::decode_availability(payload).unwrap_or(false);
                self.changed |= self.availability.insert(id.to_owned(), online) != Some(online);
            }
            Topic::AlarmState => {
                let state = serde_json::from_slice::<Value>(payload)
                    .ok()
                    .and_then(|v| Some(v.get("state")?.as_str()?.to_owned()));
                self.changed |= state.is_some() && state != self.alarm;
                if state.is_some() {
                    self.alarm = state;
                }
            }
            _ => {}
        }
    }

    /// The `hub_restarted` alert, sent once at each start.
    pub fn restarted(&self, at: &str) -> Entry {
        self.alert(json!({ "alert": "hub_restarted", "at": at }))
    }

    /// `disk_low` when the free space first falls under [`DISK_LOW_MB`].
    pub fn disk(&mut self, free_mb: u64, at: &str) -> Option<Entry> {
        let low = free_mb < DISK_LOW_MB;
        let news = low && !self.disk_low;
        self.disk_low = low;
        news.then(|| self.alert(json!({ "alert": "disk_low", "at": at, "disk_free_mb": free_mb })))
    }

    /// The retained health report.
    pub fn health(&self, body: &Value) -> Entry {
        Entry {
            topic: self.topic("hub/health"),
            payload: body.to_string().into_bytes(),
            retain: true,
            class: Class::State,
        }
    }

    fn alert(&self, body: Value) -> Entry {
        Entry { topic: self.topic("alert"), payload: body.to_string().into_bytes(), retain: false, class: Class::Alert }
    }

    /// `low_battery` when a device's battery first reads [`LOW_BATTERY`] or less.
    fn battery(&mut self, id: &str, payload: &[u8], at: &str) -> Option<Value> {
        let battery = serde_json::from_slice::<Value>(payload).ok()?.get("battery")?.as_u64()?;
        if battery >= BATTERY_OK {
            self.low_battery.remove(id);
        }
        (battery <= LOW_BATTERY && self.low_battery.insert(id.to_owned()))
            .then(|| json!({ "alert": "low_battery", "device": id, "at": at, "battery": battery }))
    }
}

/// The alert an alarm event raises, if people must hear of it.
fn alarm_alert(payload: &[u8]) -> Option<Value> {
    let event: Value = serde_json::from_slice(payload).ok()?;
    let alert = match event.get("event")?.as_str()? {
        "triggered" => "alarm_triggered",
        "tamper" => "tamper",
        "sensor_offline" => "sensor_offline",
        "code_lockout" => "code_lockout",
        _ => return None,
    };
    let mut body = json!({ "alert": alert, "at": event.get("at"), "reason": event.get("reason") });
    if let Some(device) = event.get("device").filter(|d| !d.is_null()) {
        body["device"] = device.clone();
    }
    Some(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    const AT: &str = "2026-11-30T12:00:00Z";

    fn topics_of(entries: &[Entry]) -> Vec<(&str, Class, bool)> {
        entries.iter().map(|e| (e.topic.as_str(), e.class, e.retain)).collect()
    }

    #[test]
    fn local_topics_go_under_the_house_prefix_and_others_nowhere() {
        let mut f = Forwarder::new("house-0042");
        let one = |f: &mut Forwarder, topic| {
            topics_of(&f.entries(topic, b"{}", AT)).into_iter().map(|t| t.0.to_owned()).collect::<Vec<_>>()
        };
        assert_eq!(one(&mut f, "dpi/door/state"), ["houses/house-0042/door/state"]);
        assert_eq!(one(&mut f, "dpi/door/availability"), ["houses/house-0042/door/availability"]);
        assert_eq!(one(&mut f, "dpi/alarm/state"), ["houses/house-0042/alarm/state"]);
        assert_eq!(one(&mut f, "dpi/hub/status"), ["houses/house-0042/hub/status"]);
        for not_forwarded in ["dpi/door/set", "dpi/alarm/set", "dpi/scene/set", "dpi/hub/error", "house/note"] {
            assert!(one(&mut f, not_forwarded).is_empty(), "{not_forwarded}");
        }
    }

    #[test]
    fn a_trigger_is_an_event_and_an_alert() {
        let mut f = Forwarder::new("h");
        let event = br#"{"event":"triggered","device":"door","reason":"perimeter opened","at":"2026-11-30T12:00:00Z"}"#;
        let entries = f.entries("dpi/alarm/event", event, AT);
        assert_eq!(
            topics_of(&entries),
            [("houses/h/alarm/event", Class::Event, false), ("houses/h/alert", Class::Alert, false)]
        );
        let alert: Value = serde_json::from_slice(&entries[1].payload).unwrap();
        assert_eq!((alert["alert"].as_str(), alert["device"].as_str()), (Some("alarm_triggered"), Some("door")));
        let armed = br#"{"event":"armed","device":null,"reason":"armed_away","at":"2026-11-30T12:00:00Z"}"#;
        assert_eq!(f.entries("dpi/alarm/event", armed, AT).len(), 1, "no alert for arming");
    }

    #[test]
    fn each_alarm_event_people_must_hear_of_is_its_alert() {
        let mut f = Forwarder::new("h");
        for (event, alert) in [
            ("triggered", Some("alarm_triggered")),
            ("tamper", Some("tamper")),
            ("sensor_offline", Some("sensor_offline")),
            ("code_lockout", Some("code_lockout")),
            ("pending", None),
            ("disarmed", None),
            ("code_rejected", None),
            ("arm_refused", None),
        ] {
            let payload = format!(r#"{{"event":"{event}","device":"pir","reason":"r","at":"{AT}"}}"#);
            let entries = f.entries("dpi/alarm/event", payload.as_bytes(), AT);
            let got = entries.iter().find(|e| e.class == Class::Alert).map(|e| {
                let v: Value = serde_json::from_slice(&e.payload).unwrap();
                assert_eq!(v["device"], "pir");
                v["alert"].as_str().unwrap().to_owned()
            });
            assert_eq!(got.as_deref(), alert, "{event}");
        }
    }

    #[test]
    fn a_low_battery_is_reported_once_until_it_recovers() {
        let mut f = Forwarder::new("h");
        let alerts = |f: &mut Forwarder, b: u64| {
            f.entries("dpi/door/state", format!(r#"{{"contact":"closed","battery":{b}}}"#).as_bytes(), AT)
                .iter()
                .filter(|e| e.class == Class::Alert)
                .count()
        };
        assert_eq!(alerts(&mut f, 40), 0);
        assert_eq!(alerts(&mut f, 15), 1);
        assert_eq!(alerts(&mut f, 12), 0, "reported already");
        assert_eq!(alerts(&mut f, 20), 0);
        assert_eq!(alerts(&mut f, 14), 0, "not recovered yet");
        assert_eq!(alerts(&mut f, 90), 0);
        assert_eq!(alerts(&mut f, 10), 1, "recovered, then low again");
    }

    #[test]
    fn the_summary_follows_availability_and_the_alarm_and_says_when_it_changed() {
        let mut f = Forwarder::new("h");
        f.entries("dpi/door/availability", b"online", AT);
        f.entries("dpi/pir/availability", b"offline", AT);
        assert!(f.take_changed());
        assert!(!f.take_changed());
        f.entries("dpi/door/availability", b"online", AT);
        assert!(!f.take_changed(), "the same availability again is no change");
        f.entries("dpi/alarm/state", br#"{"state":"armed_away","since":"x","by":"alice"}"#, AT);
        assert!(f.take_changed());
        assert_eq!(f.summary(), Summary { devices: 2, online: 1, alarm: Some("armed_away".into()) });
    }

    #[test]
    fn a_low_disk_is_reported_once_until_it_recovers() {
        let mut f = Forwarder::new("h");
        assert!(f.disk(500, AT).is_none());
        assert!(f.disk(50, AT).is_some());
        assert!(f.disk(40, AT).is_none());
        assert!(f.disk(800, AT).is_none());
        assert!(f.disk(60, AT).is_some());
    }
}
