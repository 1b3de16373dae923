//! The hub's config file, read for what the simulator needs: the declared devices (id, kind, zone,
//! room), the alarm delays, the house's time zone, the TLS listen address, and which devices' events
//! may lead the hub to command a given light or siren.
//!
//! Lenient on purpose: the serde shapes below have no `deny_unknown_fields`, so a newer hub config
//! with keys this crate does not know still plays. Validating the file is the hub's job
//! (`domoticpi check-config`); this module only refuses what it cannot read at all.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::Error;

/// What a device is (SPEC §4 `kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Motion,
    Contact,
    Light,
    Switch,
    Button,
    Siren,
    Keypad,
    Lux,
    Temperature,
    Smoke,
}

impl Kind {
    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Motion => "motion",
            Kind::Contact => "contact",
            Kind::Light => "light",
            Kind::Switch => "switch",
            Kind::Button => "button",
            Kind::Siren => "siren",
            Kind::Keypad => "keypad",
            Kind::Lux => "lux",
            Kind::Temperature => "temperature",
            Kind::Smoke => "smoke",
        }
    }

    /// Whether load mode can play it: a sensor with a state worth publishing at a rate.
    pub fn is_load_sensor(self) -> bool {
        matches!(self, Kind::Motion | Kind::Contact | Kind::Lux | Kind::Temperature)
    }

    /// Whether it obeys commands on `dpi/ID/set` (and reports its on/off).
    pub fn obeys_commands(self) -> bool {
        matches!(self, Kind::Light | Kind::Siren)
    }
}

/// A device's alarm zone (SPEC §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Zone {
    Entry,
    Perimeter,
    Interior,
    #[serde(rename = "24h")]
    H24,
    #[default]
    None,
}

/// A declared device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// Its id: client id, username and topic segment.
    pub id: String,
    /// What it is, which decides what it publishes and obeys.
    pub kind: Kind,
    /// Its room, if declared; only shown.
    pub room: Option<String>,
    /// Its alarm zone: the drill opens an entry or perimeter door.
    pub zone: Zone,
}

/// The alarm's delays, so the drill knows how long to wait for each state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlarmDelays {
    /// From arming to armed.
    pub exit: Duration,
    /// From an entry door opening to triggered.
    pub entry: Duration,
    /// How long the sirens sound.
    pub siren: Duration,
}

impl Default for AlarmDelays {
    /// The hub's defaults (SPEC §4).
    fn default() -> Self {
        AlarmDelays { exit: Duration::from_secs(30), entry: Duration::from_secs(30), siren: Duration::from_secs(180) }
    }
}

/// What the simulator knows of the house, from the hub's config.
#[derive(Debug, Clone, Default)]
pub struct House {
    /// Where it was read from, for messages.
    pub source: String,
    /// `[house] timezone`, for the clock shown on each line; `None` means UTC, as for the hub.
    pub timezone: Option<String>,
    /// `[broker] tls_listen` as written, to check the hub is up before issuing credentials.
    pub tls_listen: Option<String>,
    /// Every declared device, in the file's order.
    pub devices: Vec<Device>,
    /// The alarm's delays.
    pub alarm: AlarmDelays,
    /// Light or siren id → devices whose events may make the hub command it (rule sensors, switches).
    pub causes: HashMap<String, Vec<String>>,
}

/// The serde shape: only the keys the simulator reads, and no `deny_unknown_fields`.
mod raw {
    use super::*;

    #[derive(Deserialize, Default)]
    pub struct File {
        #[serde(default)]
        pub house: House,
        #[serde(default)]
        pub broker: Broker,
        #[serde(default)]
        pub device: Vec<Device>,
        #[serde(default)]
        pub alarm: Alarm,
        #[serde(default)]
        pub rule: Rules,
    }

    #[derive(Deserialize, Default)]
    pub struct House {
        pub timezone: Option<String>,
    }

    #[derive(Deserialize, Default)]
    pub struct Broker {
        pub tls_listen: Option<String>,
    }

    #[derive(Deserialize)]
    pub struct Device {
        pub id: String,
        pub kind: Kind,
        pub room: Option<String>,
        #[serde(default)]
        pub zone: Zone,
    }

    #[derive(Deserialize, Default)]
    pub struct Alarm {
        pub exit_delay_s: Option<u64>,
        pub entry_delay_s: Option<u64>,
        pub siren_s: Option<u64>,
    }

    #[derive(Deserialize, Default)]
    pub struct Rules {
        #[serde(default)]
        pub motion_light: Vec<MotionLight>,
        #[serde(default)]
        pub switch: Vec<Switch>,
    }

    #[derive(Deserialize)]
    pub struct MotionLight {
        #[serde(default)]
        pub sensors: Vec<String>,
        #[serde(default)]
        pub lights: Vec<String>,
    }

    #[derive(Deserialize)]
    pub struct Switch {
        pub switch: String,
        #[serde(default)]
        pub lights: Vec<String>,
    }
}

/// The hub's default TLS listener (SPEC §4).
const DEFAULT_TLS_LISTEN: &str = "0.0.0.0:8883";

impl House {
    /// Reads the config at `path`.
    pub fn from_path(path: &Path) -> Result<House, Error> {
        let text = std::fs::read_to_string(path).map_err(|error| Error::ReadConfig { path: path.to_owned(), error })?;
        House::from_toml(&text, &path.display().to_string())
    }

    /// Reads config text; `source` names it in errors.
    pub fn from_toml(text: &str, source: &str) -> Result<House, Error> {
        let file: raw::File = toml::from_str(text).map_err(|e| Error::ParseConfig {
            source_name: source.to_owned(),
            message: e.to_string().trim().replace('\n', " "),
        })?;
        let defaults = AlarmDelays::default();
        let secs = |v: Option<u64>, default: Duration| v.map_or(default, Duration::from_secs);
        let alarm = AlarmDelays {
            exit: secs(file.alarm.exit_delay_s, defaults.exit),
            entry: secs(file.alarm.entry_delay_s, defaults.entry),
            siren: secs(file.alarm.siren_s, defaults.siren),
        };
        let mut causes: HashMap<String, Vec<String>> = HashMap::new();
        let mut add = |light: &str, cause: &str| {
            let list = causes.entry(light.to_owned()).or_default();
            if !list.iter().any(|c| c == cause) {
                list.push(cause.to_owned());
            }
        };
        for rule in &file.rule.motion_light {
            for light in &rule.lights {
                rule.sensors.iter().for_each(|s| add(light, s));
            }
        }
        for rule in &file.rule.switch {
            rule.lights.iter().for_each(|light| add(light, &rule.switch));
        }
        let devices: Vec<Device> =
            file.device.into_iter().map(|d| Device { id: d.id, kind: d.kind, room: d.room, zone: d.zone }).collect();
        // Sirens answer the alarm, which the alarm's sensors and the keypads move.
        let alarm_movers: Vec<String> = devices
            .iter()
            .filter(|d| d.zone != Zone::None || matches!(d.kind, Kind::Keypad | Kind::Smoke))
            .map(|d| d.id.clone())
            .collect();
        for siren in devices.iter().filter(|d| d.kind == Kind::Siren) {
            alarm_movers.iter().for_each(|m| add(&siren.id, m));
        }
        Ok(House {
            source: source.to_owned(),
            timezone: file.house.timezone,
            tls_listen: file.broker.tls_listen,
            devices,
            alarm,
            causes,
        })
    }

    /// The declared device `id`, or [`Error::UnknownDevice`].
    pub fn device(&self, id: &str) -> Result<&Device, Error> {
        self.devices
            .iter()
            .find(|d| d.id == id)
            .ok_or_else(|| Error::UnknownDevice { id: id.to_owned(), config: self.source.clone() })
    }

    /// The devices a story plays: every declared one but smoke detectors (a simulation never cries fire).
    pub fn story_devices(&self) -> Vec<&Device> {
        self.devices.iter().filter(|d| d.kind != Kind::Smoke).collect()
    }

    /// The first `n` declared sensors that load mode can play, or [`Error::TooFewSensors`].
    pub fn load_sensors(&self, n: usize) -> Result<Vec<&Device>, Error> {
        let sensors: Vec<&Device> = self.devices.iter().filter(|d| d.kind.is_load_sensor()).collect();
        if sensors.len() < n {
            return Err(Error::TooFewSensors { wanted: n, found: sensors.len() });
        }
        Ok(sensors.into_iter().take(n).collect())
    }

    /// Where a local hub listens for TLS, to check it is up: the configured address with an unspecified
    /// IP turned into loopback; `None` when the port is 0 (picked at start) or the address is unreadable.
    pub fn local_hub_addr(&self) -> Option<SocketAddr> {
        let text = self.tls_listen.as_deref().unwrap_or(DEFAULT_TLS_LISTEN);
        let mut addr: SocketAddr = text.parse().ok()?;
        if addr.port() == 0 {
            return None;
        }
        if addr.ip().is_unspecified() {
            let loopback = if addr.is_ipv6() {
                IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)
            } else {
                IpAddr::V4(Ipv4Addr::LOCALHOST)
            };
            addr.set_ip(loopback);
        }
        Some(addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"
data_dir = "./somewhere"
log_level = "info"
future_key = "ignored"

[house]
name = "Maison"
timezone = "Europe/Paris"

[broker]
tls_listen = "0.0.0.0:8884"
max_connections = 10

[[device]]
id = "hall-motion"
kind = "motion"
zone = "interior"

[[device]]
id = "front-door"
kind = "contact"
room = "hall"
zone = "entry"
colour = "red"

[[device]]
id = "hall-light"
kind = "light"

[[device]]
id = "wall-switch"
kind = "switch"

[[device]]
id = "siren"
kind = "siren"

[[device]]
id = "keypad"
kind = "keypad"

[[device]]
id = "kitchen-smoke"
kind = "smoke"
zone = "24h"

[[device]]
id = "hall-lux"
kind = "lux"

[alarm]
exit_delay_s = 10
entry_delay_s = 5
lights_on_trigger = true

[[rule.motion_light]]
sensors = ["hall-motion", "front-door"]
lights = ["hall-light"]
off_after_s = 15
when = "always"

[[rule.switch]]
switch = "wall-switch"
lights = ["hall-light"]

[[scene]]
id = "evening"
set = { "hall-light" = { on = true } }
"#;

    fn house() -> House {
        House::from_toml(TEXT, "test.toml").expect("the test config reads")
    }

    #[test]
    fn devices_keep_the_file_order_and_unknown_keys_are_ignored() {
        let h = house();
        let ids: Vec<&str> = h.devices.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(
            ids,
            ["hall-motion", "front-door", "hall-light", "wall-switch", "siren", "keypad", "kitchen-smoke", "hall-lux"]
        );
        let door = h.device("front-door").expect("declared");
        assert_eq!((door.kind, door.zone, door.room.as_deref()), (Kind::Contact, Zone::Entry, Some("hall")));
        assert_eq!(h.device("hall-light").map(|d| d.zone).ok(), Some(Zone::None));
        assert_eq!(h.device("kitchen-smoke").map(|d| d.zone).ok(), Some(Zone::H24));
        assert_eq!(h.timezone.as_deref(), Some("Europe/Paris"));
    }

    #[test]
    fn alarm_delays_default_per_key() {
        let h = house();
        assert_eq!(h.alarm.exit, Duration::from_secs(10));
        assert_eq!(h.alarm.entry, Duration::from_secs(5));
        assert_eq!(h.alarm.siren, Duration::from_secs(180));
        assert_eq!(House::from_toml("", "empty").expect("empty is fine").alarm, AlarmDelays::default());
    }

    #[test]
    fn causes_follow_the_rules() {
        let h = house();
        assert_eq!(h.causes["hall-light"], ["hall-motion", "front-door", "wall-switch"]);
        assert_eq!(h.causes["siren"], ["hall-motion", "front-door", "keypad", "kitchen-smoke"]);
    }

    #[test]
    fn unknown_device_is_an_error_naming_the_file() {
        let err = house().device("attic-light").expect_err("not declared").to_string();
        assert!(err.contains("attic-light") && err.contains("test.toml"), "{err}");
    }

    #[test]
    fn story_skips_smoke_and_load_takes_the_first_sensors() {
        let h = house();
        assert!(h.story_devices().iter().all(|d| d.kind != Kind::Smoke));
        let two: Vec<&str> = h.load_sensors(2).expect("enough").iter().map(|d| d.id.as_str()).collect();
        assert_eq!(two, ["hall-motion", "front-door"]);
        assert!(matches!(h.load_sensors(4), Err(Error::TooFewSensors { wanted: 4, found: 3 })));
    }

    #[test]
    fn local_hub_addr_maps_unspecified_to_loopback() {
        assert_eq!(house().local_hub_addr(), Some("127.0.0.1:8884".parse().expect("addr")));
        let default = House::from_toml("", "empty").expect("reads");
        assert_eq!(default.local_hub_addr(), Some("127.0.0.1:8883".parse().expect("addr")));
        let zero = House::from_toml("[broker]\ntls_listen = \"127.0.0.1:0\"\n", "zero").expect("reads");
        assert_eq!(zero.local_hub_addr(), None);
    }

    #[test]
    fn bad_toml_and_bad_kind_are_errors_with_a_position() {
        for text in ["[[device]]\nid = \"x\"\nkind = \"toaster\"\n", "data_dir = \n"] {
            let err = House::from_toml(text, "bad.toml").expect_err("refused").to_string();
            assert!(err.starts_with("bad.toml is not a valid hub config") && err.contains("line"), "{err}");
        }
    }
}
