//! Live reload (SPEC §4): `SIGHUP` and `domoticpi reload` apply the config file to the running hub
//! without dropping a connection.
//!
//! The file is read and validated whole, device ids are checked against the users' names in the
//! database, and only then is anything applied: a bad file changes nothing and its every error is
//! returned with line and column. Applying means: the dispatcher's house is swapped whole (devices,
//! rooms, rules, scenes, `[house]`), the alarm and light drivers get the new config (the alarm keeps
//! its state and any running delay; light timers of rules that still exist keep running), the writer
//! takes the new `[store]` at its next interval, new devices are announced offline and may connect at
//! once, and the connection of a device that is gone, or whose kind changed, is closed (its
//! credentials are refused from then on, as the authenticator asks the dispatcher). What only a
//! restart applies (`[broker]`, `data_dir`, `log_level`, `[bridge]`, `[web]`) is reported, never ignored.

use std::collections::HashSet;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::broker::sessions::Sessions;
use crate::config::{self, Config, ConfigError};
use crate::dispatcher::{Dispatcher, House};
use crate::store::{self, Store, StoreError};

/// What a reload did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// What changed and applies now, one line each (empty: nothing changed).
    pub applied: Vec<String>,
    /// Settings that changed but apply only at the next restart.
    pub restart: Vec<String>,
    /// Device connections closed because their device is gone or changed kind.
    pub closed: Vec<String>,
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The hub runs on its built-in defaults.
    #[error("the hub runs on its built-in defaults: there is no config file to reload")]
    NoFile,
    /// The new file is unreadable or invalid; every error is listed.
    #[error("the new config is rejected, the running one is kept:\n{0}")]
    Config(#[from] ConfigError),
    /// The users' names could not be read to check the device ids against them.
    #[error("the users' names could not be read to check device ids: {0}")]
    Store(#[from] StoreError),
}

/// Applies reloads to the running hub, one at a time.
#[derive(Debug)]
pub struct Reloader {
    /// Holds the one reload in progress.
    busy: tokio::sync::Mutex<()>,
    /// Has the running config, and takes the new house.
    dispatcher: Dispatcher,
    /// Closes the connections of devices that are gone.
    sessions: Arc<Sessions>,
    /// Users' names, which no device id may take.
    store: Store,
    /// `[store]`, for the writer.
    settings: watch::Sender<config::Store>,
}

impl Reloader {
    /// A reloader for the hub made of these parts.
    pub fn new(
        dispatcher: Dispatcher,
        sessions: Arc<Sessions>,
        store: Store,
        settings: watch::Sender<config::Store>,
    ) -> Reloader {
        Reloader { busy: tokio::sync::Mutex::new(()), dispatcher, sessions, store, settings }
    }

    /// Reads the config file again and applies it, or changes nothing and says why.
    pub async fn reload(&self) -> Result<Report, ReloadError> {
        let _one = self.busy.lock().await;
        let started = std::time::Instant::now();
        let old = Arc::clone(&self.dispatcher.house().config);
        let outcome = self.load(&old).await;
        let new = match outcome {
            Ok(new) => new,
            Err(e) => {
                // One log line per event: the errors, which the CLI prints one per line, joined.
                let errors = e.to_string().replace('\n', "; ");
                error!(%errors, "reload refused");
                return Err(e);
            }
        };
        let mut report = compare(&old, &new);
        self.settings.send_replace(new.store.clone());
        let before: Vec<_> = old.devices.iter().map(|d| (d.id.clone(), self.dispatcher.declared(&d.id))).collect();
        self.dispatcher.swap(House::new(new));
        // A device gone, or whose kind or firmware topics changed, must log in again.
        let gone = before.into_iter().filter(|(id, was)| self.dispatcher.declared(id) != *was).map(|(id, _)| id);
        // After the swap: a device that reconnects at once is judged against the new house.
        for id in gone {
            if self.sessions.kick(&id) {
                report.closed.push(id);
            }
        }
        for line in &report.applied {
            info!(change = %line, "reload: applied");
        }
        for key in &report.restart {
            warn!(key = %key, "reload: changed, applies at the next restart");
        }
        for id in &report.closed {
            info!(device = %id, "reload: connection closed, the device is no longer declared as it was (kind, or topics it speaks)");
        }
        info!(took = ?started.elapsed(), changes = report.applied.len(), "config reloaded");
        Ok(report)
    }

    /// Reads and checks the file the running config came from.
    async fn load(&self, old: &Config) -> Result<Config, ReloadError> {
        let path = old.source.clone().ok_or(ReloadError::NoFile)?;
        let mut new = Config::load(&path)?;
        // A data dir given on the command line overrides the file's, now as at start.
        if old.data_dir_given {
            new.data_dir.clone_from(&old.data_dir);
            new.data_dir_given = true;
        }
        let users: HashSet<String> =
            self.store.call(|c| store::users::list(c)).await?.into_iter().map(|u| u.name).collect();
        new.check_user_names(|id| users.contains(id))?;
        Ok(new)
    }
}

/// What differs between the running config and the new one.
fn compare(old: &Config, new: &Config) -> Report {
    let mut report = Report::default();
    let differs = |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") != format!("{b:?}");
    let ids = |c: &Config| c.devices.iter().map(|d| d.id.clone()).collect::<Vec<_>>();
    let (before, after) = (ids(old), ids(new));
    let added: Vec<&str> = after.iter().filter(|id| !before.contains(id)).map(String::as_str).collect();
    let removed: Vec<&str> = before.iter().filter(|id| !after.contains(id)).map(String::as_str).collect();
    let changed: Vec<&str> = old
        .devices
        .iter()
        .filter(|d| new.device(&d.id).is_some_and(|n| (n.kind, &n.room, n.zone) != (d.kind, &d.room, d.zone)))
        .map(|d| d.id.as_str())
        .collect();
    for (what, list) in [("devices added", &added), ("devices removed", &removed), ("devices changed", &changed)] {
        if !list.is_empty() {
            report.applied.push(format!("{what}: {}", list.join(", ")));
        }
    }
    let sections: [(&str, &dyn std::fmt::Debug, &dyn std::fmt::Debug); 7] = [
        ("[homeassistant]", &old.homeassistant, &new.homeassistant),
        ("[house]", &old.house.name, &new.house.name),
        ("[[room]]", &old.rooms, &new.rooms),
        ("[rule]", &old.rules, &new.rules),
        ("[[scene]]", &old.scenes, &new.scenes),
        ("[alarm]", &old.alarm, &new.alarm),
        ("[store]", &old.store, &new.store),
    ];
    let place = |h: &config::House| (h.latitude, h.longitude, h.timezone_name.clone());
    if differs(&place(&old.house), &place(&new.house)) {
        report.applied.push("[house] location or time zone".to_owned());
    }
    for (name, a, b) in sections {
        if differs(a, b) {
            report.applied.push(name.to_owned());
        }
    }
    let b = (&old.broker, &new.broker);
    let restart: [(&str, bool); 10] = [
        ("web.listen", old.web != new.web),
        ("broker.tls_listen", b.0.tls_listen != b.1.tls_listen),
        ("broker.plain_listen", b.0.plain_listen != b.1.plain_listen),
        ("broker.server_names", b.0.server_names != b.1.server_names),
        ("broker.require_client_cert", b.0.require_client_cert != b.1.require_client_cert),
        ("broker.max_connections", b.0.max_connections != b.1.max_connections),
        ("broker.max_payload_bytes", b.0.max_payload_bytes != b.1.max_payload_bytes),
        ("data_dir", old.data_dir != new.data_dir),
        ("log_level", old.log_level != new.log_level),
        ("[bridge]", differs(&old.bridge, &new.bridge)),
    ];
    report.restart = restart.iter().filter(|(_, changed)| *changed).map(|(key, _)| (*key).to_owned()).collect();
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(toml: &str) -> Config {
        Config::from_toml(toml, None).unwrap()
    }

    #[test]
    fn an_unchanged_file_reports_nothing() {
        let c = config("[[device]]\nid = \"door\"\nkind = \"contact\"\n");
        assert_eq!(compare(&c, &c.clone()), Report::default());
    }

    #[test]
    fn devices_sections_and_restart_keys_are_each_named() {
        let old =
            config("[[device]]\nid = \"door\"\nkind = \"contact\"\n[[device]]\nid = \"pir\"\nkind = \"motion\"\n");
        let new = config(
            "[broker]\ntls_listen = \"127.0.0.1:9883\"\n[alarm]\nentry_delay_s = 45\n\
             [[device]]\nid = \"door\"\nkind = \"contact\"\nzone = \"entry\"\n[[device]]\nid = \"lamp\"\nkind = \"light\"\n",
        );
        let report = compare(&old, &new);
        assert_eq!(
            report.applied,
            ["devices added: lamp", "devices removed: pir", "devices changed: door", "[alarm]"],
            "{report:?}"
        );
        assert_eq!(report.restart, ["broker.tls_listen"]);
    }
}
