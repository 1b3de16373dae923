//! The hub's configuration: one TOML file, read in two stages.
//!
//! Stage one is a serde shape (`raw`) that mirrors the file key for key and refuses unknown keys.
//! Stage two, [`Config::from_toml`], validates everything at once and builds typed values, so that
//! every mistake an installer can make is reported with its line and column before the hub starts,
//! and none is found later at run time. Parsing works on a `&str`: tests need no files.
//!
//! This module must not open sockets, touch the data dir or read anything but the file it is given.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use domoticpi_rules::lights::TimeExpr;
use toml::Spanned;

/// Where the file lives on an installed hub; the CLI and the daemon read it when given no
/// `--config` or `--data-dir`.
pub const SYSTEM_CONFIG_PATH: &str = "/etc/domoticpi/domoticpi.toml";

/// One problem in a config file, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// 1-based line of the offending value.
    pub line: usize,
    /// 1-based column (in characters) of the offending value.
    pub column: usize,
    /// What is wrong, in words an installer understands.
    pub message: String,
}

/// Why a config could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// The file was read but holds one or more mistakes.
    #[error("{}", render(.path.as_deref(), .diagnostics))]
    Invalid { path: Option<PathBuf>, diagnostics: Vec<Diagnostic> },
}

fn render(path: Option<&Path>, diagnostics: &[Diagnostic]) -> String {
    let name = path.map_or_else(|| "<config>".to_owned(), |p| p.display().to_string());
    diagnostics.iter().map(|d| format!("{name}:{}:{}: {}", d.line, d.column, d.message)).collect::<Vec<_>>().join("\n")
}

/// The validated configuration the hub runs on.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this came from, if any (absent: built-in defaults).
    pub source: Option<PathBuf>,
    /// Where the database and certificates live.
    pub data_dir: PathBuf,
    /// `data_dir` was given on the command line, over the file's.
    pub data_dir_given: bool,
    /// Default log filter when `RUST_LOG` is not set.
    pub log_level: String,
    /// The house: name, coordinates and time zone.
    pub house: House,
    /// Listeners and limits of the embedded broker.
    pub broker: Broker,
    /// How the SQLite store trades durability for SD-card wear.
    pub store: Store,
    /// Rooms, in file order.
    pub rooms: Vec<Room>,
    /// Devices, in file order.
    pub devices: Vec<Device>,
    /// Alarm timings and options.
    pub alarm: Alarm,
    /// Light rules.
    pub rules: Rules,
    /// Scenes by id.
    pub scenes: Vec<Scene>,
    /// The optional bridge to the company's broker.
    pub bridge: Option<Bridge>,
    /// The residents' web app: its HTTPS listener, `None` when turned off.
    pub web: Option<SocketAddr>,
    /// Home Assistant discovery: the prefix to announce under, `None` when off (the default).
    pub homeassistant: Option<String>,
}

/// The house the hub runs.
#[derive(Debug, Clone)]
pub struct House {
    /// Display name.
    pub name: String,
    /// Latitude in degrees, for sunrise and sunset; absent when not configured.
    pub latitude: Option<f64>,
    /// Longitude in degrees.
    pub longitude: Option<f64>,
    /// IANA name of the time zone.
    pub timezone_name: String,
    /// The time zone itself, resolved from the bundled database.
    pub timezone: jiff::tz::TimeZone,
}

/// Listeners and limits of the embedded broker.
#[derive(Debug, Clone)]
pub struct Broker {
    /// The TLS listener devices connect to.
    pub tls_listen: SocketAddr,
    /// The optional plain-text listener.
    pub plain_listen: Option<SocketAddr>,
    /// Names and addresses put in the server certificate besides the defaults.
    pub server_names: Vec<ServerName>,
    /// Devices must present a hub-signed client certificate.
    pub require_client_cert: bool,
    /// Most simultaneous client connections.
    pub max_connections: usize,
    /// Largest accepted MQTT packet payload, in bytes.
    pub max_payload_bytes: usize,
}

/// A name the server certificate is valid for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ServerName {
    /// A DNS name such as `domoticpi.local`.
    Dns(String),
    /// An IP address, for devices that connect without DNS.
    Ip(IpAddr),
}

impl fmt::Display for ServerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerName::Dns(name) => f.write_str(name),
            ServerName::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// Store tuning.
#[derive(Debug, Clone)]
pub struct Store {
    /// Device state is written at most this often.
    pub commit_interval: Duration,
    /// How long history rows are kept.
    pub history_days: u32,
}

/// A room.
#[derive(Debug, Clone)]
pub struct Room {
    /// Identifier used by devices.
    pub id: String,
    /// Display name.
    pub name: String,
}

/// What a device is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
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
    /// A client that speaks for other devices in their own firmware's topics (Zigbee2MQTT, an
    /// ESPHome node); it has no state of its own.
    Bridge,
}

impl DeviceKind {
    /// The name used in the config file and in listings.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceKind::Motion => "motion",
            DeviceKind::Contact => "contact",
            DeviceKind::Light => "light",
            DeviceKind::Switch => "switch",
            DeviceKind::Button => "button",
            DeviceKind::Siren => "siren",
            DeviceKind::Keypad => "keypad",
            DeviceKind::Lux => "lux",
            DeviceKind::Temperature => "temperature",
            DeviceKind::Smoke => "smoke",
            DeviceKind::Bridge => "bridge",
        }
    }
}

/// The alarm zone a device belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Deserialize)]
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

/// A device declared by the installer.
#[derive(Debug, Clone)]
pub struct Device {
    /// Its id: MQTT client id, username and topic segment.
    pub id: String,
    /// What it is.
    pub kind: DeviceKind,
    /// The room it is in, if any.
    pub room: Option<String>,
    /// Its alarm zone.
    pub zone: Zone,
    /// The firmware topics it speaks instead of `dpi/ID/…`, if any (SPEC §11).
    pub source: Option<Source>,
    /// Line and column of its id in the file, for errors found after validation.
    pub at: (usize, usize),
}

/// The topics an off-the-shelf device speaks (SPEC §11): who speaks them is in [`Source::speaker`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Source {
    /// A Tasmota device's `%topic%`: `tele/TOPIC/…`, `stat/TOPIC/…`, `cmnd/TOPIC/…`.
    Tasmota(String),
    /// A Zigbee2MQTT friendly name: `zigbee2mqtt/NAME`, `…/set`, `…/availability`.
    Zigbee2mqtt(String),
    /// An ESPHome component: `NODE/COMPONENT/OBJECT/state` and `…/command`, `NODE/status`.
    Esphome {
        /// The node's topic prefix (its name), also the id of the `bridge` device that speaks for it.
        node: String,
        /// `binary_sensor`, `sensor`, `switch` or `light`.
        component: String,
        /// The component's object id.
        object: String,
    },
}

impl Source {
    /// The id Zigbee2MQTT logs in as.
    pub const ZIGBEE2MQTT: &'static str = "zigbee2mqtt";

    /// The id of the device that speaks for this source's device (`own` is the device's id).
    pub fn speaker<'a>(&'a self, own: &'a str) -> &'a str {
        match self {
            Source::Tasmota(_) => own,
            Source::Zigbee2mqtt(_) => Source::ZIGBEE2MQTT,
            Source::Esphome { node, .. } => node,
        }
    }

    /// Reads `{ tasmota = … }`, `{ zigbee2mqtt = … }` or `{ esphome = "NODE/COMPONENT/OBJECT" }`
    /// for a device of `kind`, or says what is wrong.
    fn parse(raw: &raw::Source, kind: DeviceKind) -> Result<Source, String> {
        use DeviceKind::*;
        let source = match (&raw.tasmota, &raw.zigbee2mqtt, &raw.esphome) {
            (Some(topic), None, None) => {
                let ok = (1..=32).contains(&topic.len())
                    && topic.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
                if !ok {
                    return Err(format!("tasmota topic {topic:?} must be 1 to 32 of A-Z, a-z, 0-9, _ and -"));
                }
                Source::Tasmota(topic.clone())
            }
            (None, Some(name), None) => {
                let reserved = name == "bridge"
                    || name.starts_with("bridge/")
                    || ["/set", "/get", "/availability"].iter().any(|s| name.ends_with(s));
                let ok = (1..=64).contains(&name.len())
                    && name.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'+' && b != b'#')
                    && !name.starts_with('/')
                    && !name.ends_with('/')
                    && !name.contains("//");
                if !ok || reserved {
                    return Err(format!(
                        "zigbee2mqtt name {name:?} must be 1 to 64 printable ASCII characters without + or #, \
                         not bridge, and not end in /set, /get or /availability"
                    ));
                }
                Source::Zigbee2mqtt(name.clone())
            }
            (None, None, Some(path)) => {
                let parts: Vec<&str> = path.split('/').collect();
                let [node, component, object] = parts[..] else {
                    return Err(format!("esphome {path:?} must be NODE/COMPONENT/OBJECT_ID"));
                };
                if !is_valid_id(node) || Source::FOREIGN_ROOTS.contains(&node) {
                    return Err(format!(
                        "esphome node {node:?} must be a device id (1 to 32 of a-z, 0-9 and -) other than {}",
                        Source::FOREIGN_ROOTS.join(", ")
                    ));
                }
                let object_ok = (1..=64).contains(&object.len())
                    && object.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
                if !object_ok {
                    return Err(format!("esphome object id {object:?} must be 1 to 64 of a-z, 0-9, _ and -"));
                }
                Source::Esphome { node: node.to_owned(), component: component.to_owned(), object: object.to_owned() }
            }
            _ => return Err("source takes exactly one of tasmota, zigbee2mqtt or esphome".to_owned()),
        };
        let (project, kinds): (&str, &[DeviceKind]) = match &source {
            Source::Tasmota(_) => ("a Tasmota device", &[Light, Switch, Siren, Temperature, Lux]),
            Source::Zigbee2mqtt(_) => {
                ("a Zigbee2MQTT device", &[Motion, Contact, Light, Switch, Button, Lux, Temperature, Smoke])
            }
            Source::Esphome { component, .. } => match component.as_str() {
                "binary_sensor" => ("an ESPHome binary_sensor", &[Motion, Contact, Smoke]),
                "sensor" => ("an ESPHome sensor", &[Temperature, Lux]),
                "switch" => ("an ESPHome switch", &[Switch, Siren, Light]),
                "light" => ("an ESPHome light", &[Light]),
                other => {
                    return Err(format!("esphome component {other:?} must be binary_sensor, sensor, switch or light"))
                }
            },
        };
        if !kinds.contains(&kind) {
            let names: Vec<&str> = kinds.iter().map(|k| k.as_str()).collect();
            return Err(format!("{project} cannot be a {}; it can be {}", kind.as_str(), names.join(", ")));
        }
        Ok(source)
    }

    /// First topic levels that belong to another namespace: never an ESPHome node's prefix.
    pub const FOREIGN_ROOTS: &'static [&'static str] =
        &["dpi", "zigbee2mqtt", "tele", "stat", "cmnd", "tasmota", "homeassistant", "esphome"];
}

/// Alarm options.
#[derive(Debug, Clone)]
pub struct Alarm {
    /// Time to leave after arming.
    pub exit_delay: Duration,
    /// Time to disarm after an entry sensor trips.
    pub entry_delay: Duration,
    /// How long the sirens sound.
    pub siren: Duration,
    /// Arming needs a code too.
    pub code_arm_required: bool,
    /// Every light goes on when the alarm triggers.
    pub lights_on_trigger: bool,
}

/// When a motion light may switch on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum When {
    Always,
    Night,
}

/// What a switch does to its lights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SwitchAction {
    Toggle,
    On,
    Off,
}

/// A day of the week.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Day {
    Mon,
    Tue,
    Wed,
    Thu,
    Fri,
    Sat,
    Sun,
}

/// All light rules.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    /// Lights that follow motion sensors.
    pub motion_light: Vec<MotionLight>,
    /// Lights on a timetable.
    pub schedule: Vec<Schedule>,
    /// Switches and buttons that drive a group of lights.
    pub switch: Vec<SwitchRule>,
}

/// A motion light rule.
#[derive(Debug, Clone)]
pub struct MotionLight {
    pub sensors: Vec<String>,
    pub lights: Vec<String>,
    pub off_after: Duration,
    pub when: When,
    pub lux_sensor: Option<String>,
    pub max_lux: Option<f64>,
}

/// A schedule rule.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub lights: Vec<String>,
    pub on: TimeExpr,
    pub off: TimeExpr,
    pub days: Vec<Day>,
}

/// A switch rule.
#[derive(Debug, Clone)]
pub struct SwitchRule {
    pub switch: String,
    pub lights: Vec<String>,
    pub action: SwitchAction,
}

/// A scene: settings for some lights.
#[derive(Debug, Clone)]
pub struct Scene {
    pub id: String,
    pub set: BTreeMap<String, SceneSetting>,
}

/// What a scene sets on one light.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SceneSetting {
    pub on: Option<bool>,
    pub brightness: Option<u16>,
}

/// The bridge to the company's broker.
#[derive(Debug, Clone)]
pub struct Bridge {
    pub url: String,
    /// The upstream's host name or address, from `url`.
    pub host: String,
    /// The upstream's port, from `url` (8883 when it names none).
    pub port: u16,
    pub house_id: String,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub ca: PathBuf,
    pub allow_remote_control: bool,
    pub max_queue: usize,
}

/// The serde shape of the file: every key the installer may write, nothing else.
mod raw {
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub struct File {
        pub data_dir: Option<String>,
        pub log_level: Option<Spanned<String>>,
        #[serde(default)]
        pub house: House,
        #[serde(default)]
        pub broker: Broker,
        #[serde(default)]
        pub store: Store,
        #[serde(default)]
        pub room: Vec<Room>,
        #[serde(default)]
        pub device: Vec<Device>,
        #[serde(default)]
        pub alarm: Alarm,
        #[serde(default)]
        pub rule: Rules,
        #[serde(default)]
        pub scene: Vec<Scene>,
        pub bridge: Option<Bridge>,
        #[serde(default)]
        pub web: Web,
        #[serde(default)]
        pub homeassistant: HomeAssistant,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub struct House {
        pub name: Option<String>,
        pub latitude: Option<Spanned<f64>>,
        pub longitude: Option<Spanned<f64>>,
        pub timezone: Option<Spanned<String>>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub struct Broker {
        pub tls_listen: Option<Spanned<String>>,
        pub plain_listen: Option<Spanned<String>>,
        pub allow_insecure_lan: Option<bool>,
        pub server_names: Option<Vec<Spanned<String>>>,
        pub require_client_cert: Option<bool>,
        pub max_connections: Option<Spanned<i64>>,
        pub max_payload_bytes: Option<Spanned<i64>>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub struct Store {
        pub commit_interval_ms: Option<Spanned<i64>>,
        pub history_days: Option<Spanned<i64>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Room {
        pub id: Spanned<String>,
        pub name: Option<String>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Device {
        pub id: Spanned<String>,
        pub kind: DeviceKind,
        pub room: Option<Spanned<String>>,
        #[serde(default)]
        pub zone: Zone,
        pub source: Option<Spanned<Source>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Source {
        pub tasmota: Option<String>,
        pub zigbee2mqtt: Option<String>,
        pub esphome: Option<String>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub struct Alarm {
        pub exit_delay_s: Option<Spanned<i64>>,
        pub entry_delay_s: Option<Spanned<i64>>,
        pub siren_s: Option<Spanned<i64>>,
        pub code_arm_required: Option<bool>,
        pub lights_on_trigger: Option<bool>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub struct Rules {
        #[serde(default)]
        pub motion_light: Vec<MotionLight>,
        #[serde(default)]
        pub schedule: Vec<Schedule>,
        #[serde(default)]
        pub switch: Vec<Switch>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct MotionLight {
        pub sensors: Vec<Spanned<String>>,
        pub lights: Vec<Spanned<String>>,
        pub off_after_s: Option<Spanned<i64>>,
        pub when: Option<Spanned<When>>,
        pub lux_sensor: Option<Spanned<String>>,
        pub max_lux: Option<Spanned<f64>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Schedule {
        pub lights: Vec<Spanned<String>>,
        pub on: Spanned<String>,
        pub off: Spanned<String>,
        pub days: Option<Vec<Day>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Switch {
        pub switch: Spanned<String>,
        pub lights: Vec<Spanned<String>>,
        pub action: Option<SwitchAction>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Scene {
        pub id: Spanned<String>,
        pub set: Spanned<BTreeMap<Spanned<String>, SceneSetting>>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub struct HomeAssistant {
        pub discovery: Option<bool>,
        pub prefix: Option<Spanned<String>>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub struct Web {
        pub listen: Option<Spanned<String>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Bridge {
        pub url: Spanned<String>,
        pub house_id: Spanned<String>,
        pub client_cert: String,
        pub client_key: String,
        pub ca: String,
        pub allow_remote_control: Option<bool>,
        pub max_queue: Option<Spanned<i64>>,
    }
}

/// Collects diagnostics during validation, turning byte spans into lines and columns.
struct Checker<'a> {
    source: &'a str,
    diagnostics: Vec<Diagnostic>,
}

impl<'a> Checker<'a> {
    fn error(&mut self, span: Range<usize>, message: impl Into<String>) {
        let (line, column) = line_column(self.source, span.start);
        self.diagnostics.push(Diagnostic { line, column, message: message.into() });
    }

    /// A whole number of `unit`s within `range`, or a diagnostic.
    fn integer(&mut self, value: &Spanned<i64>, key: &str, range: Range<i64>) -> Option<u64> {
        let v = *value.get_ref();
        if range.contains(&v) {
            u64::try_from(v).ok()
        } else {
            let (lo, hi) = (range.start, range.end - 1);
            self.error(value.span(), format!("{key} = {v} is out of range ({lo} to {hi})"));
            None
        }
    }
}

/// 1-based line and character column of a byte offset.
fn line_column(source: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(source.len());
    let before = &source[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = source[line_start..offset].chars().count() + 1;
    (line, column)
}

/// `[a-z0-9-]{1,32}`: the shape of every id (device, room, scene).
pub fn is_valid_id(id: &str) -> bool {
    (1..=32).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

impl Default for Config {
    fn default() -> Self {
        // The built-in defaults are an empty file; it cannot fail to validate.
        match Config::from_toml("", None) {
            Ok(config) => config,
            Err(e) => unreachable!("built-in defaults are invalid: {e}"),
        }
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Config::from_toml(&text, Some(path))
    }

    /// Validates config text; `path` is used in messages and to resolve nothing else.
    pub fn from_toml(text: &str, path: Option<&Path>) -> Result<Config, ConfigError> {
        let invalid = |diagnostics| ConfigError::Invalid { path: path.map(Path::to_owned), diagnostics };
        let file: raw::File = toml::from_str(text).map_err(|e| {
            let (line, column) = line_column(text, e.span().map_or(0, |s| s.start));
            invalid(vec![Diagnostic { line, column, message: e.message().trim().to_owned() }])
        })?;
        let mut c = Checker { source: text, diagnostics: Vec::new() };
        let config = build(file, &mut c, path);
        if c.diagnostics.is_empty() {
            Ok(config)
        } else {
            c.diagnostics.sort_by_key(|d| (d.line, d.column));
            Err(invalid(c.diagnostics))
        }
    }

    /// Every declared device's kind, by id.
    pub fn kinds(&self) -> HashMap<String, DeviceKind> {
        self.devices.iter().map(|d| (d.id.clone(), d.kind)).collect()
    }

    /// The device with this id.
    pub fn device(&self, id: &str) -> Option<&Device> {
        self.devices.iter().find(|d| d.id == id)
    }

    /// Refuses device ids that are users' names in the database (SPEC §6: users and devices share
    /// one namespace), each with its line and column.
    pub fn check_user_names(&self, is_user: impl Fn(&str) -> bool) -> Result<(), ConfigError> {
        let diagnostics: Vec<Diagnostic> = self
            .devices
            .iter()
            .filter(|d| is_user(&d.id))
            .map(|d| Diagnostic {
                line: d.at.0,
                column: d.at.1,
                message: format!(
                    "device id {:?} is a user's name in the database; users and devices share one namespace",
                    d.id
                ),
            })
            .collect();
        match diagnostics.is_empty() {
            true => Ok(()),
            false => Err(ConfigError::Invalid { path: self.source.clone(), diagnostics }),
        }
    }
}

/// Checks the devices' sources together: each speaker declared with the right kind (a Tasmota
/// device speaks for itself, not a bridge), and no two devices on the same firmware topics.
/// `spans[i]` is where device `i`'s source (or id) is written.
fn check_sources(devices: &[Device], spans: &[Range<usize>], kinds: &HashMap<String, DeviceKind>, c: &mut Checker<'_>) {
    let mut seen = HashMap::new();
    for (device, span) in devices.iter().zip(spans) {
        let foreign = Source::FOREIGN_ROOTS.contains(&device.id.as_str());
        if device.kind == DeviceKind::Bridge && device.id != Source::ZIGBEE2MQTT && foreign {
            c.error(
                span.clone(),
                format!(
                    "bridge {:?} would speak on another namespace's topics; name it after its ESPHome node",
                    device.id
                ),
            );
        }
        let Some(source) = &device.source else { continue };
        if device.kind == DeviceKind::Bridge {
            c.error(
                span.clone(),
                format!("device {:?} is a bridge: it speaks for others and has no source", device.id),
            );
            continue;
        }
        let speaker = source.speaker(&device.id);
        if speaker != device.id && kinds.get(speaker) != Some(&DeviceKind::Bridge) {
            c.error(
                span.clone(),
                format!(
                    "device {:?} is spoken for by {speaker:?}, which must be declared as a device of kind \"bridge\"",
                    device.id
                ),
            );
        }
        if let Some(first) = seen.insert(source.clone(), device.id.clone()) {
            c.error(span.clone(), format!("device {:?} has the same source as {first:?}", device.id));
        }
    }
}

fn build(file: raw::File, c: &mut Checker<'_>, path: Option<&Path>) -> Config {
    let house = build_house(file.house, c);
    let broker = build_broker(file.broker, c);

    let log_level = match file.log_level {
        Some(level) => {
            let value = level.get_ref().clone();
            if crate::logging::filter(&value).is_err() {
                c.error(level.span(), format!("log_level {value:?} is not a valid level or filter"));
            }
            value
        }
        None => "info".to_owned(),
    };

    let store = Store {
        commit_interval: Duration::from_millis(
            file.store
                .commit_interval_ms
                .map_or(Some(1000), |v| c.integer(&v, "commit_interval_ms", 10..3_600_001))
                .unwrap_or(1000),
        ),
        history_days: file
            .store
            .history_days
            .map_or(Some(30), |v| c.integer(&v, "history_days", 1..3651))
            .and_then(|v| u32::try_from(v).ok())
            .unwrap_or(30),
    };

    let mut room_ids = HashSet::new();
    let mut rooms = Vec::new();
    for room in file.room {
        let id = room.id.get_ref().clone();
        if !is_valid_id(&id) {
            c.error(room.id.span(), format!("room id {id:?} must be 1 to 32 of a-z, 0-9 and -"));
        } else if !room_ids.insert(id.clone()) {
            c.error(room.id.span(), format!("duplicate room id {id:?}"));
        }
        rooms.push(Room { name: room.name.unwrap_or_else(|| id.clone()), id });
    }

    let mut kinds: HashMap<String, DeviceKind> = HashMap::new();
    let mut devices = Vec::new();
    let mut spans = Vec::new();
    for device in file.device {
        let id = device.id.get_ref().clone();
        if !is_valid_id(&id) {
            c.error(device.id.span(), format!("device id {id:?} must be 1 to 32 of a-z, 0-9 and -"));
        } else if crate::topics::RESERVED_IDS.contains(&id.as_str()) {
            c.error(device.id.span(), format!("device id {id:?} is reserved for the hub's own topics"));
        } else if kinds.insert(id.clone(), device.kind).is_some() {
            c.error(device.id.span(), format!("duplicate device id {id:?}"));
        }
        if let Some(room) = &device.room {
            if !room_ids.contains(room.get_ref()) {
                c.error(room.span(), format!("device {id:?} is in room {:?}, which is not declared", room.get_ref()));
            }
        }
        let source = device.source.as_ref().and_then(|raw| match Source::parse(raw.get_ref(), device.kind) {
            Ok(source) => Some(source),
            Err(e) => {
                c.error(raw.span(), format!("device {id:?}: {e}"));
                None
            }
        });
        if device.kind == DeviceKind::Bridge && device.zone != Zone::None {
            c.error(device.id.span(), format!("device {id:?} is a bridge, which has no alarm zone"));
        }
        let at = line_column(c.source, device.id.span().start);
        spans.push(device.source.map_or(device.id.span(), |s| s.span()));
        devices.push(Device {
            id,
            kind: device.kind,
            room: device.room.map(Spanned::into_inner),
            zone: device.zone,
            source,
            at,
        });
    }
    check_sources(&devices, &spans, &kinds, c);

    let alarm = Alarm {
        exit_delay: secs(c, file.alarm.exit_delay_s, "exit_delay_s", 30, 0..3601),
        entry_delay: secs(c, file.alarm.entry_delay_s, "entry_delay_s", 30, 0..3601),
        siren: secs(c, file.alarm.siren_s, "siren_s", 180, 1..3601),
        code_arm_required: file.alarm.code_arm_required.unwrap_or(false),
        lights_on_trigger: file.alarm.lights_on_trigger.unwrap_or(true),
    };

    let refs = DeviceRefs { kinds: &kinds };
    let rules = build_rules(file.rule, &refs, &house, c);
    let scenes = build_scenes(file.scene, &refs, c);
    let bridge = file.bridge.map(|b| build_bridge(b, c));
    let homeassistant = file.homeassistant.discovery.unwrap_or(false).then(|| match file.homeassistant.prefix {
        None => "homeassistant".to_owned(),
        Some(prefix) => {
            let p = prefix.get_ref().clone();
            if p.is_empty() || p.contains(['+', '#']) || p.starts_with(['/', '$']) || p.ends_with('/') {
                c.error(prefix.span(), format!("homeassistant prefix {p:?} must be a topic without wildcards"));
            }
            p
        }
    });
    // An ESPHome node may write anything under its name: never Home Assistant's discovery prefix.
    let ha_root = homeassistant.as_deref().and_then(|p| p.split('/').next());
    for d in devices.iter().filter(|d| d.kind == DeviceKind::Bridge && Some(d.id.as_str()) == ha_root) {
        let (line, column) = d.at;
        let message =
            format!("bridge {:?} would speak on Home Assistant's discovery prefix; rename it or the prefix", d.id);
        c.diagnostics.push(Diagnostic { line, column, message });
    }
    let web = match file.web.listen {
        None => Some(SocketAddr::from(([0, 0, 0, 0], 8443))),
        Some(listen) if listen.get_ref().is_empty() => None,
        Some(listen) => match listen.get_ref().parse() {
            Ok(addr) => Some(addr),
            Err(_) => {
                c.error(
                    listen.span(),
                    format!("web listen {:?} is not an IP:port (or \"\" for off)", listen.get_ref()),
                );
                None
            }
        },
    };

    let data_dir = PathBuf::from(file.data_dir.unwrap_or_else(|| "./domoticpi-data".to_owned()));
    Config {
        source: path.map(Path::to_owned),
        data_dir,
        data_dir_given: false,
        log_level,
        house,
        broker,
        store,
        rooms,
        devices,
        alarm,
        rules,
        scenes,
        bridge,
        web,
        homeassistant,
    }
}

fn secs(c: &mut Checker<'_>, v: Option<Spanned<i64>>, key: &str, default: u64, range: Range<i64>) -> Duration {
    Duration::from_secs(v.map_or(Some(default), |v| c.integer(&v, key, range)).unwrap_or(default))
}

fn build_house(house: raw::House, c: &mut Checker<'_>) -> House {
    let mut coordinate = |v: Option<Spanned<f64>>, key: &str, limit: f64| {
        let v = v?;
        let x = *v.get_ref();
        if x.is_finite() && (-limit..=limit).contains(&x) {
            Some(x)
        } else {
            c.error(v.span(), format!("{key} = {x} is out of range (-{limit} to {limit})"));
            None
        }
    };
    let latitude = coordinate(house.latitude, "latitude", 90.0);
    let longitude = coordinate(house.longitude, "longitude", 180.0);
    let (timezone_name, timezone) = match house.timezone {
        None => ("UTC".to_owned(), jiff::tz::TimeZone::UTC),
        Some(tz) => match jiff::tz::TimeZone::get(tz.get_ref()) {
            Ok(zone) => (tz.get_ref().clone(), zone),
            Err(_) => {
                c.error(
                    tz.span(),
                    format!("unknown timezone {:?} (use an IANA name such as \"Europe/Paris\")", tz.get_ref()),
                );
                ("UTC".to_owned(), jiff::tz::TimeZone::UTC)
            }
        },
    };
    House { name: house.name.unwrap_or_else(|| "My house".to_owned()), latitude, longitude, timezone_name, timezone }
}

fn build_broker(broker: raw::Broker, c: &mut Checker<'_>) -> Broker {
    let mut address = |v: &Spanned<String>, key: &str| match v.get_ref().parse::<SocketAddr>() {
        Ok(addr) => Some(addr),
        Err(_) => {
            c.error(v.span(), format!("{key} = {:?} is not an IP:port address (e.g. \"0.0.0.0:8883\")", v.get_ref()));
            None
        }
    };
    let default_tls: SocketAddr = SocketAddr::from(([0, 0, 0, 0], 8883));
    let tls_listen = broker.tls_listen.as_ref().and_then(|v| address(v, "tls_listen")).unwrap_or(default_tls);
    let plain_listen = match &broker.plain_listen {
        Some(v) if !v.get_ref().is_empty() => address(v, "plain_listen").inspect(|addr| {
            if !addr.ip().is_loopback() && !broker.allow_insecure_lan.unwrap_or(false) {
                c.error(
                    v.span(),
                    format!("plain_listen = \"{addr}\" is not a loopback address: devices would send passwords in clear; use 127.0.0.1, or set allow_insecure_lan = true"),
                );
            }
        }),
        _ => None,
    };
    let mut server_names = Vec::new();
    for name in broker.server_names.unwrap_or_default() {
        let text = name.get_ref().trim();
        if let Ok(ip) = text.parse::<IpAddr>() {
            server_names.push(ServerName::Ip(ip));
        } else if is_dns_name(text) {
            server_names.push(ServerName::Dns(text.to_ascii_lowercase()));
        } else {
            c.error(name.span(), format!("server name {text:?} is neither an IP address nor a DNS name"));
        }
    }
    let max_connections =
        broker.max_connections.map_or(Some(500), |v| c.integer(&v, "max_connections", 1..65_536)).unwrap_or(500);
    let max_payload_bytes = broker
        .max_payload_bytes
        .map_or(Some(16_384), |v| c.integer(&v, "max_payload_bytes", 16..268_435_456))
        .unwrap_or(16_384);
    Broker {
        tls_listen,
        plain_listen,
        server_names,
        require_client_cert: broker.require_client_cert.unwrap_or(false),
        max_connections: usize::try_from(max_connections).unwrap_or(500),
        max_payload_bytes: usize::try_from(max_payload_bytes).unwrap_or(16_384),
    }
}

fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Checks references from rules and scenes to declared devices.
struct DeviceRefs<'a> {
    kinds: &'a HashMap<String, DeviceKind>,
}

impl DeviceRefs<'_> {
    /// The referenced ids, each checked to be declared and of one of `allowed` kinds.
    fn check(&self, c: &mut Checker<'_>, ids: Vec<Spanned<String>>, what: &str, allowed: &[DeviceKind]) -> Vec<String> {
        ids.into_iter()
            .map(|id| {
                self.check_one(c, &id, what, allowed);
                id.into_inner()
            })
            .collect()
    }

    fn check_one(&self, c: &mut Checker<'_>, id: &Spanned<String>, what: &str, allowed: &[DeviceKind]) {
        match self.kinds.get(id.get_ref()) {
            None => c.error(id.span(), format!("{what} {:?} is not a declared device", id.get_ref())),
            Some(kind) if !allowed.contains(kind) => {
                let names: Vec<_> = allowed.iter().map(|k| k.as_str()).collect();
                c.error(
                    id.span(),
                    format!("{what} {:?} is a {} device; expected {}", id.get_ref(), kind.as_str(), names.join(" or ")),
                );
            }
            Some(_) => {}
        }
    }
}

fn build_rules(rules: raw::Rules, refs: &DeviceRefs<'_>, house: &House, c: &mut Checker<'_>) -> Rules {
    use DeviceKind as K;
    let mut out = Rules::default();
    for rule in rules.motion_light {
        let when = rule.when.map_or(When::Always, |w| {
            if *w.get_ref() == When::Night && (house.latitude.is_none() || house.longitude.is_none()) {
                c.error(w.span(), "when = \"night\" needs [house] latitude and longitude for sunrise and sunset");
            }
            w.into_inner()
        });
        if let Some(lux) = &rule.lux_sensor {
            refs.check_one(c, lux, "lux_sensor", &[K::Lux]);
            if rule.max_lux.is_none() {
                c.error(lux.span(), "lux_sensor needs max_lux too");
            }
        }
        if let Some(max) = &rule.max_lux {
            if !max.get_ref().is_finite() || *max.get_ref() < 0.0 {
                c.error(max.span(), "max_lux must be a number of lux, 0 or more");
            }
        }
        out.motion_light.push(MotionLight {
            sensors: refs.check(c, rule.sensors, "sensor", &[K::Motion, K::Contact]),
            lights: refs.check(c, rule.lights, "light", &[K::Light]),
            off_after: secs(c, rule.off_after_s, "off_after_s", 120, 1..86_401),
            when,
            lux_sensor: rule.lux_sensor.map(Spanned::into_inner),
            max_lux: rule.max_lux.map(Spanned::into_inner),
        });
    }
    for rule in rules.schedule {
        let mut time = |v: &Spanned<String>, key: &str| match TimeExpr::parse(v.get_ref()) {
            Ok(t) => {
                if !matches!(t, TimeExpr::At(_)) && (house.latitude.is_none() || house.longitude.is_none()) {
                    c.error(v.span(), format!("{key} = {:?} needs [house] latitude and longitude", v.get_ref()));
                }
                Some(t)
            }
            Err(e) => {
                c.error(v.span(), format!("{key} = {:?}: {e}", v.get_ref()));
                None
            }
        };
        let on = time(&rule.on, "on");
        let off = time(&rule.off, "off");
        let lights = refs.check(c, rule.lights, "light", &[K::Light]);
        let days =
            rule.days.unwrap_or_else(|| vec![Day::Mon, Day::Tue, Day::Wed, Day::Thu, Day::Fri, Day::Sat, Day::Sun]);
        if let (Some(on), Some(off)) = (on, off) {
            out.schedule.push(Schedule { lights, on, off, days });
        }
    }
    for rule in rules.switch {
        refs.check_one(c, &rule.switch, "switch", &[K::Switch, K::Button]);
        out.switch.push(SwitchRule {
            switch: rule.switch.into_inner(),
            lights: refs.check(c, rule.lights, "light", &[K::Light]),
            action: rule.action.unwrap_or(SwitchAction::Toggle),
        });
    }
    out
}

fn build_scenes(scenes: Vec<raw::Scene>, refs: &DeviceRefs<'_>, c: &mut Checker<'_>) -> Vec<Scene> {
    let mut ids = HashSet::new();
    let mut out = Vec::new();
    for scene in scenes {
        let id = scene.id.get_ref().clone();
        if !is_valid_id(&id) {
            c.error(scene.id.span(), format!("scene id {id:?} must be 1 to 32 of a-z, 0-9 and -"));
        } else if !ids.insert(id.clone()) {
            c.error(scene.id.span(), format!("duplicate scene id {id:?}"));
        }
        let mut set = BTreeMap::new();
        for (light, setting) in scene.set.into_inner() {
            refs.check_one(c, &light, "light", &[DeviceKind::Light]);
            if setting.brightness.is_some_and(|b| b > 255) {
                c.error(light.span(), "brightness must be 0 to 255");
            }
            set.insert(light.into_inner(), setting);
        }
        out.push(Scene { id, set });
    }
    out
}

/// `HOST`, `HOST:PORT` or `[IPV6]:PORT` as (host, port); 8883, MQTT over TLS, by default.
fn upstream_endpoint(authority: &str) -> Option<(String, u16)> {
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && (!host.contains(':') || host.ends_with(']')) => {
            (host, port.parse().ok().filter(|p| *p > 0)?)
        }
        _ if authority.contains(':') && !authority.starts_with('[') => return None,
        _ => (authority, 8883),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let valid = !host.is_empty() && !host.contains(['/', '@', '?', '#', ' ']);
    valid.then(|| (host.to_owned(), port))
}

fn build_bridge(b: raw::Bridge, c: &mut Checker<'_>) -> Bridge {
    let url = b.url.get_ref().clone();
    let rest = url.strip_prefix("mqtts://").or_else(|| url.strip_prefix("ssl://"));
    let (host, port) = match rest.map(|r| upstream_endpoint(r.trim_end_matches('/'))) {
        None => {
            c.error(b.url.span(), format!("bridge url {url:?} must start with mqtts:// (the bridge always uses TLS)"));
            (String::new(), 0)
        }
        Some(None) => {
            c.error(b.url.span(), format!("bridge url {url:?} must be mqtts://HOST or mqtts://HOST:PORT"));
            (String::new(), 0)
        }
        Some(Some(endpoint)) => endpoint,
    };
    let house_id = b.house_id.get_ref().clone();
    if house_id.is_empty() || house_id.contains(['+', '#', '/']) {
        c.error(b.house_id.span(), format!("house_id {house_id:?} must be non-empty, without '+', '#' or '/'"));
    }
    let max_queue = b.max_queue.map_or(Some(10_000), |v| c.integer(&v, "max_queue", 1..10_000_001)).unwrap_or(10_000);
    Bridge {
        url,
        host,
        port,
        house_id,
        client_cert: PathBuf::from(b.client_cert),
        client_key: PathBuf::from(b.client_key),
        ca: PathBuf::from(b.ca),
        allow_remote_control: b.allow_remote_control.unwrap_or(false),
        max_queue: usize::try_from(max_queue).unwrap_or(10_000),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(text: &str) -> Vec<(usize, usize, String)> {
        match Config::from_toml(text, None) {
            Ok(_) => vec![],
            Err(ConfigError::Invalid { diagnostics, .. }) => {
                diagnostics.into_iter().map(|d| (d.line, d.column, d.message)).collect()
            }
            Err(e) => panic!("{e}"),
        }
    }

    /// One line per case: config text, expected (line, column), a word the message must contain.
    macro_rules! rejects {
        ($($name:ident: $text:expr => ($line:expr, $col:expr), $needle:expr;)*) => {$(
            #[test]
            fn $name() {
                let errs = errors($text);
                assert!(
                    errs.iter().any(|(l, c, m)| *l == $line && *c == $col && m.contains($needle)),
                    "expected {}:{} containing {:?}, got {:?}", $line, $col, $needle, errs
                );
            }
        )*};
    }

    const DEVICES: &str = "[[device]]\nid = \"m1\"\nkind = \"motion\"\n[[device]]\nid = \"l1\"\nkind = \"light\"\n";

    #[test]
    fn log_levels_and_per_target_filters_are_taken_anything_else_is_refused() {
        for good in ["info", "debug", "warn,domoticpi::broker=trace", "info,rumqttd=error", "info,"] {
            assert_eq!(errors(&format!("log_level = {good:?}\n")), vec![], "{good}");
        }
        for bad in ["loud", "info,domoticpi=shout", "INFO,verbose"] {
            let errs = errors(&format!("log_level = {bad:?}\n"));
            assert!(errs.iter().any(|(l, _, m)| *l == 1 && m.contains("not a valid level")), "{bad}: {errs:?}");
        }
    }

    #[test]
    fn the_bridge_url_gives_host_and_port() {
        for (authority, endpoint) in [
            ("broker.example.com", Some(("broker.example.com", 8883))),
            ("broker.example.com:9883", Some(("broker.example.com", 9883))),
            ("127.0.0.1:8883", Some(("127.0.0.1", 8883))),
            ("[::1]:8883", Some(("::1", 8883))),
            ("[::1]", Some(("::1", 8883))),
            ("broker:0", None),
            ("broker:http", None),
            ("::1", None),
            ("", None),
            ("user@broker", None),
        ] {
            let got = upstream_endpoint(authority);
            assert_eq!(got.as_ref().map(|(h, p)| (h.as_str(), *p)), endpoint, "{authority}");
        }
    }

    const Z2M: &str = "[[device]]\nid = \"zigbee2mqtt\"\nkind = \"bridge\"\n";

    rejects! {
        tasmota_topic_with_slash: "[[device]]\nid = \"p\"\nkind = \"light\"\nsource = { tasmota = \"a/b\" }\n" => (4, 10), "tasmota topic";
        tasmota_motion_sensor: "[[device]]\nid = \"p\"\nkind = \"motion\"\nsource = { tasmota = \"pir\" }\n" => (4, 10), "cannot be a motion";
        two_sources: "[[device]]\nid = \"p\"\nkind = \"light\"\nsource = { tasmota = \"a\", zigbee2mqtt = \"b\" }\n" => (4, 10), "exactly one";
        unknown_source: "[[device]]\nid = \"p\"\nkind = \"light\"\nsource = { shelly = \"a\" }\n" => (4, 12), "unknown field";
        zigbee_without_its_bridge: "[[device]]\nid = \"p\"\nkind = \"motion\"\nsource = { zigbee2mqtt = \"hall\" }\n" => (4, 10), "kind \"bridge\"";
        zigbee_wildcard_name: concat!("[[device]]\nid = \"zigbee2mqtt\"\nkind = \"bridge\"\n", "[[device]]\nid = \"p\"\nkind = \"motion\"\nsource = { zigbee2mqtt = \"hall/#\" }\n") => (7, 10), "without + or #";
        zigbee_bridge_name: concat!("[[device]]\nid = \"zigbee2mqtt\"\nkind = \"bridge\"\n", "[[device]]\nid = \"p\"\nkind = \"motion\"\nsource = { zigbee2mqtt = \"bridge\" }\n") => (7, 10), "not bridge";
        zigbee_twice: concat!("[[device]]\nid = \"zigbee2mqtt\"\nkind = \"bridge\"\n", "[[device]]\nid = \"p\"\nkind = \"motion\"\nsource = { zigbee2mqtt = \"a\" }\n", "[[device]]\nid = \"q\"\nkind = \"motion\"\nsource = { zigbee2mqtt = \"a\" }\n") => (11, 10), "same source";
        esphome_node_not_a_bridge: "[[device]]\nid = \"desk\"\nkind = \"light\"\n[[device]]\nid = \"p\"\nkind = \"light\"\nsource = { esphome = \"desk/light/lamp\" }\n" => (7, 10), "kind \"bridge\"";
        esphome_short_path: "[[device]]\nid = \"p\"\nkind = \"light\"\nsource = { esphome = \"desk/lamp\" }\n" => (4, 10), "NODE/COMPONENT/OBJECT_ID";
        esphome_foreign_node: "[[device]]\nid = \"p\"\nkind = \"light\"\nsource = { esphome = \"dpi/light/lamp\" }\n" => (4, 10), "other than dpi";
        esphome_wrong_component: "[[device]]\nid = \"p\"\nkind = \"motion\"\nsource = { esphome = \"desk/light/lamp\" }\n" => (4, 10), "ESPHome light cannot be a motion";
        esphome_unknown_component: "[[device]]\nid = \"p\"\nkind = \"motion\"\nsource = { esphome = \"desk/climate/x\" }\n" => (4, 10), "binary_sensor, sensor, switch or light";
        bridge_with_a_zone: "[[device]]\nid = \"zigbee2mqtt\"\nkind = \"bridge\"\nzone = \"entry\"\n" => (2, 6), "no alarm zone";
        bridge_with_a_source: "[[device]]\nid = \"zigbee2mqtt\"\nkind = \"bridge\"\nsource = { tasmota = \"x\" }\n" => (4, 10), "cannot be a bridge";
        bridge_on_foreign_topics: "[[device]]\nid = \"tele\"\nkind = \"bridge\"\n" => (2, 6), "another namespace";
        bridge_on_discovery_prefix: "[homeassistant]\ndiscovery = true\nprefix = \"ha/x\"\n[[device]]\nid = \"ha\"\nkind = \"bridge\"\n" => (5, 6), "discovery prefix";
        unknown_top_level_key: "colour = 1\n" => (1, 1), "unknown field";
        unknown_nested_key: "[broker]\ntls_port = 1\n" => (2, 1), "unknown field";
        bad_listen_address: "[broker]\ntls_listen = \"localhost\"\n" => (2, 14), "not an IP:port";
        plain_listener_on_lan: "[broker]\nplain_listen = \"0.0.0.0:1883\"\n" => (2, 16), "allow_insecure_lan";
        latitude_out_of_range: "[house]\nlatitude = 91.5\nlongitude = 0.0\n" => (2, 12), "out of range";
        longitude_out_of_range: "[house]\nlatitude = 1.0\nlongitude = -181\n" => (3, 13), "out of range";
        unknown_timezone: "[house]\ntimezone = \"Mars/Olympus\"\n" => (2, 12), "unknown timezone";
        duplicate_device: "[[device]]\nid = \"a\"\nkind = \"motion\"\n[[device]]\nid = \"a\"\nkind = \"light\"\n" => (5, 6), "duplicate device";
        bad_device_id: "[[device]]\nid = \"Front Door\"\nkind = \"contact\"\n" => (2, 6), "must be 1 to 32";
        reserved_device_id: "[[device]]\nid = \"alarm\"\nkind = \"keypad\"\n" => (2, 6), "reserved";
        unknown_kind: "[[device]]\nid = \"a\"\nkind = \"toaster\"\n" => (3, 8), "unknown variant";
        undeclared_room: "[[device]]\nid = \"a\"\nkind = \"motion\"\nroom = \"attic\"\n" => (4, 8), "not declared";
        rule_undeclared_device: &format!("{DEVICES}[[rule.motion_light]]\nsensors = [\"m2\"]\nlights = [\"l1\"]\n") => (8, 12), "not a declared device";
        rule_wrong_kind: &format!("{DEVICES}[[rule.motion_light]]\nsensors = [\"m1\"]\nlights = [\"m1\"]\n") => (9, 11), "is a motion device";
        bad_time_expression: &format!("{DEVICES}[[rule.schedule]]\nlights = [\"l1\"]\non = \"25:00\"\noff = \"23:30\"\n") => (9, 6), "on = \"25:00\"";
        night_without_coordinates: &format!("{DEVICES}[[rule.motion_light]]\nsensors = [\"m1\"]\nlights = [\"l1\"]\nwhen = \"night\"\n") => (10, 8), "latitude";
        scene_unknown_light: "[[scene]]\nid = \"evening\"\nset = { \"ghost\" = { on = true } }\n" => (3, 9), "not a declared device";
        duplicate_scene: "[[scene]]\nid = \"a\"\nset = {}\n[[scene]]\nid = \"a\"\nset = {}\n" => (5, 6), "duplicate scene";
        out_of_range_integer: "[broker]\nmax_connections = 0\n" => (2, 19), "out of range";
    }

    #[test]
    fn sources_of_each_project_are_accepted() {
        let text = format!(
            "{Z2M}[[device]]\nid = \"desk\"\nkind = \"bridge\"\n\
             [[device]]\nid = \"pir\"\nkind = \"motion\"\nzone = \"interior\"\nsource = {{ zigbee2mqtt = \"Hall PIR/1\" }}\n\
             [[device]]\nid = \"plug\"\nkind = \"light\"\nsource = {{ tasmota = \"tasmota_5A3F10\" }}\n\
             [[device]]\nid = \"lamp\"\nkind = \"light\"\nsource = {{ esphome = \"desk/light/desk_lamp\" }}\n"
        );
        let c = Config::from_toml(&text, None).unwrap();
        assert_eq!(c.device("pir").unwrap().source, Some(Source::Zigbee2mqtt("Hall PIR/1".into())));
        assert_eq!(c.device("plug").unwrap().source.as_ref().map(|s| s.speaker("plug")), Some("plug"));
        assert_eq!(c.device("lamp").unwrap().source.as_ref().map(|s| s.speaker("lamp")), Some("desk"));
    }

    #[test]
    fn empty_file_gives_built_in_defaults() {
        let c = Config::from_toml("", None).unwrap();
        assert_eq!(c.broker.tls_listen, "0.0.0.0:8883".parse().unwrap());
        assert_eq!(c.broker.plain_listen, None);
        assert_eq!(c.data_dir, PathBuf::from("./domoticpi-data"));
        assert_eq!(c.store.commit_interval, Duration::from_secs(1));
        assert_eq!(c.alarm.siren, Duration::from_secs(180));
    }

    #[test]
    fn every_error_is_reported_at_once() {
        let errs = errors("[house]\nlatitude = 100.0\nlongitude = 200.0\ntimezone = \"Nowhere\"\n");
        assert_eq!(errs.len(), 3, "{errs:?}");
    }

    #[test]
    fn loopback_plain_listener_is_allowed() {
        let c = Config::from_toml("[broker]\nplain_listen = \"127.0.0.1:1883\"\n", None).unwrap();
        assert_eq!(c.broker.plain_listen, Some("127.0.0.1:1883".parse().unwrap()));
        assert!(
            Config::from_toml("[broker]\nplain_listen = \"0.0.0.0:1883\"\nallow_insecure_lan = true\n", None).is_ok()
        );
    }

    #[test]
    fn shipped_example_is_valid() {
        let text = include_str!("../config/domoticpi.toml");
        if let Err(e) = Config::from_toml(text, None) {
            panic!("config/domoticpi.toml: {e}");
        }
    }
}
