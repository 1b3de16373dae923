//! A simulated house for the DomoticPi hub: declared devices that connect over TLS like real ones and
//! either live an ordinary day (motion in the rooms, doors, buttons, readings, an alarm drill) or push
//! a steady stream of sensor states as a load generator.
//!
//! It owns only the devices' side of the contract (SPEC §5 and §6): what each kind publishes, how lights
//! and sirens obey `dpi/ID/set`, what a keypad sends on `dpi/alarm/set`. It must not reach into the hub:
//! no access to its database or files. Credentials come from the hub's own CLI (`domoticpi device creds`,
//! see [`creds`]), everything else goes over MQTT, so what it shows is what a real house would see.
//!
//! - [`config`] reads the hub's TOML leniently: the devices, the alarm delays, which rules drive which light.
//! - [`creds`] parses `device creds` output and runs the hub's CLI to get it.
//! - [`mqtt`] connects one device (TLS with rustls and ring, last will, keepalive).
//! - [`payload`] is pure: the states each kind publishes, the commands a light or siren obeys.
//! - [`prng`] is a tiny seeded xorshift, so a story can be replayed.
//! - [`story`] plays the house ([`play`]) and reports what happens as [`Happening`]s.
//! - [`load`] is the load generator ([`run_load`]) the benchmark also calls in-process.

pub mod config;
pub mod creds;
pub mod load;
pub mod mqtt;
pub mod payload;
pub mod prng;
pub mod story;

use std::path::PathBuf;

pub use config::{AlarmDelays, Device, House, Kind, Zone};
pub use creds::{default_hub_bin, issue_creds, parse_creds, read_creds_file, Creds};
pub use load::{run_load, LoadPlan, LoadStats};
pub use mqtt::{probe, Endpoint, Login};
pub use story::{play, Happening, PlayOptions, What};

/// Everything that can go wrong in the simulator. One enum for the crate: its modules share most
/// failure modes (a device refused, the hub down), and callers match on a few variants only. Each
/// message is complete on one line (I/O errors are part of it, not a separate `source`).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The config file could not be read.
    #[error("cannot read {path}: {error}")]
    ReadConfig { path: PathBuf, error: std::io::Error },
    /// The config file is not TOML of the expected shape (the message carries line and column).
    #[error("{source_name} is not a valid hub config: {message}")]
    ParseConfig { source_name: String, message: String },
    /// A device the caller asked for is not declared in the config.
    #[error("no device {id:?} is declared in {config}; declare it in a [[device]] section")]
    UnknownDevice { id: String, config: String },
    /// There is nothing to play.
    #[error("no devices to play: declare some [[device]] sections in the config")]
    NoDevices,
    /// Load mode asked for more sensor devices than the config declares.
    #[error("--devices {wanted} needs {wanted} sensor devices (motion, contact, lux, temperature); the config declares {found}")]
    TooFewSensors { wanted: usize, found: usize },
    /// Load mode was given a device that is not a sensor (it has no state to publish at a rate).
    #[error("{device} is a {kind} device; load mode plays only motion, contact, lux and temperature sensors")]
    NotASensor { device: String, kind: &'static str },
    /// An option is out of range.
    #[error("{name} must be {expected} (got {value})")]
    BadOption { name: &'static str, value: String, expected: &'static str },
    /// The hub binary does not exist where we looked.
    #[error(
        "cannot run the hub's CLI {path}: not found; build it with `cargo build --release` or pass --hub-bin PATH"
    )]
    HubBinNotFound { path: PathBuf },
    /// The hub binary could not be started for another reason.
    #[error("cannot run {path}: {error}")]
    RunHub { path: PathBuf, error: std::io::Error },
    /// `domoticpi device creds ID` ran and failed; `message` is its own error line.
    #[error("`domoticpi device creds {id}` failed ({status}): {message}")]
    CredsFailed { id: String, status: String, message: String },
    /// A saved credentials file could not be read.
    #[error("cannot read credentials {path}: {error}")]
    ReadCreds { path: PathBuf, error: std::io::Error },
    /// The credentials text lacks a line the device needs.
    #[error("the credentials have no `{field}:` line (expected the output of `domoticpi device creds ID`)")]
    CredsMissing { field: &'static str },
    /// A credentials line has a value that cannot be used.
    #[error("the credentials' `{field}:` value {value:?} is not valid")]
    CredsInvalid { field: &'static str, value: String },
    /// The hub's CA certificate could not be read or used.
    #[error("cannot use the hub's CA certificate {path}: {reason}")]
    BadCa { path: PathBuf, reason: String },
    /// Nothing listens at the hub's address.
    #[error(
        "no hub answers at {addr} (connection refused): is the hub running? \
         Start it with `domoticpi --config YOUR-CONFIG run` in another terminal"
    )]
    HubNotRunning { addr: String },
    /// The credentials carry port 0: the hub picks its port at start and is not running now.
    #[error(
        "the hub's port is unknown (its config listens on port 0 and no running hub reported one): is the hub running?"
    )]
    HubPortUnknown,
    /// The hub answered the CONNECT with a refusal.
    #[error("the hub refused {device} ({code}): its password may have been re-issued since; issue new credentials")]
    Refused { device: String, code: String },
    /// The connection failed for another reason (TLS, network).
    #[error("cannot connect {device} to {addr}: {reason}")]
    Connect { device: String, addr: String, reason: String },
    /// No CONNACK came in time.
    #[error("{device}: no answer from the hub at {addr} within {secs} s")]
    ConnectTimeout { device: String, addr: String, secs: u64 },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_not_running_says_what_to_do() {
        let text = Error::HubNotRunning { addr: "127.0.0.1:8883".into() }.to_string();
        assert!(text.contains("127.0.0.1:8883") && text.contains("is the hub running?"), "{text}");
        assert!(!text.contains('\n'));
    }
}
