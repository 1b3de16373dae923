//! The command line: parsing (clap) and one function per command.
//!
//! Commands that change users or read state open the database directly; the daemon reads it at
//! every connect, so nothing needs a restart. `alarm …` acts on the running hub through its control
//! socket ([`crate::control`]). Every error a person can cause comes back as an error value that
//! `main` prints on one line.

use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::auth;
use crate::certs::{self, CertPaths};
use crate::config::{self, Config, DeviceKind};
use crate::hub;
use crate::secret::Secret;
use crate::store::{self, users::Role};

/// DomoticPi hub: a TLS MQTT broker, state store and local alarm and light rules for one house.
///
/// Run `domoticpi run` to start the hub (it creates its CA, certificates and database on first
/// start). Devices connect over MQTT with TLS; people and scripts use a user name and password.
#[derive(Debug, Parser)]
#[command(name = "domoticpi", version, about, long_about, max_term_width = 100)]
pub struct Cli {
    /// Config file (TOML). Without one, the built-in defaults apply.
    #[arg(long, global = true, env = "DOMOTICPI_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// Data directory (database and certificates); overrides `data_dir` in the config.
    #[arg(long, global = true, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

/// What to do.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start the hub in the foreground (systemd runs it as is); initialises an empty data dir first.
    Run,
    /// Create the data dir, CA, server certificate and database, then exit (safe to repeat).
    Init,
    /// Validate the config file; print every error with line and column; exit 1 on any.
    CheckConfig,
    /// Apply the config file to the running hub without dropping connections (as SIGHUP does);
    /// print what changed and what needs a restart, or every error (exit 1; the running config stays).
    Reload,
    /// Certificates of the hub.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// The bridge to the company's broker.
    #[command(subcommand)]
    Bridge(BridgeCommand),
    /// Devices declared in the config: credentials and state.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// People who log in with a name and password.
    #[command(subcommand)]
    User(UserCommand),
    /// The running hub's alarm: status, arm, disarm.
    #[command(subcommand)]
    Alarm(AlarmCommand),
    /// Whether the hub is up, its listeners, devices and last events.
    Status,
    /// Consistent copy of the database (SQLite online backup), safe while the hub runs.
    Backup {
        /// Where to write the archive: a new file, created with mode 0600 (an existing one is never replaced).
        path: PathBuf,
    },
    /// With the hub stopped, put a backup back into the data dir: the database, the certificates
    /// (the CA too: every device keeps working) and the config it held, written beside them for
    /// you to put in place. Refuses a data dir that is not empty, unless --force.
    Restore {
        /// The archive `backup` wrote.
        path: PathBuf,
        /// Replace the database and certificates of a data dir that has some.
        #[arg(long)]
        force: bool,
    },
}

/// `bridge …`
#[derive(Debug, Subcommand)]
pub enum BridgeCommand {
    /// Make the bridge's key (bridge.client_key, mode 0600; an existing one is kept) and print a
    /// certificate signing request with CN = bridge.house_id, for the company's CA to sign; the
    /// signed certificate goes to bridge.client_cert.
    Request,
}

/// How `device creds` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CredsFormat {
    /// `key: value` lines.
    Lines,
    /// An ESPHome `mqtt:` block.
    Esphome,
    /// An Arduino header for PubSubClient.
    Arduino,
}

/// `certs …`
#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// CA path, server certificate names and expiry, SHA-256 and SHA-1 fingerprints.
    Show,
}

/// `device …`
#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// Issue MQTT credentials for a declared device: a fresh password (printed once, stored
    /// hashed; the previous one stops working) and, with --cert, a client certificate and key (the
    /// previous certificate stops working). Prints `key: value` lines to paste into the device's
    /// sketch. A connection of the device still open is closed.
    Creds {
        /// Device id from the config.
        id: String,
        /// Also issue a client certificate signed by the hub CA (CN = the device id).
        #[arg(long)]
        cert: bool,
        /// How to print them: `key: value` lines, an ESPHome `mqtt:` block, or an Arduino header
        /// for PubSubClient (ESP8266 fingerprint and ESP32 CA certificate).
        #[arg(long, value_enum, default_value_t = CredsFormat::Lines)]
        format: CredsFormat,
    },
    /// Devices from the config with online/offline, last seen and last state.
    List,
    /// Revoke a device's password and client certificate at once; its open connection is closed.
    Revoke {
        /// Device id from the config.
        id: String,
    },
}

/// `user …`
#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Create a user; the password is read from the terminal (or stdin with --password-stdin).
    Add {
        /// User name (also the MQTT username).
        name: String,
        /// What the user may do: residents command devices and read dpi/#, admins do anything.
        #[arg(long, value_enum)]
        role: RoleArg,
        #[command(flatten)]
        input: SecretInput,
    },
    /// Set the user's alarm code (4 to 8 digits), read from the terminal or stdin.
    Pin {
        /// User name.
        name: String,
        #[command(flatten)]
        input: SecretInput,
    },
    /// List users.
    List,
    /// Remove a user; their next connect is refused.
    Remove {
        /// User name.
        name: String,
    },
}

/// `alarm …`
#[derive(Debug, Subcommand)]
pub enum AlarmCommand {
    /// The alarm's state, since when, who set it, bypassed sensors.
    Status,
    /// Arm the alarm (after the exit delay). Refused with an entry or perimeter sensor open,
    /// unless --force, which bypasses those sensors until the next disarm.
    Arm {
        /// Which armed mode.
        #[arg(value_enum)]
        mode: ArmMode,
        /// Alarm code (needed when `code_arm_required`; asked on the terminal when omitted).
        #[arg(long, value_name = "C", value_parser = parse_secret)]
        code: Option<Secret>,
        /// Bypass open entry/perimeter sensors until the next disarm.
        #[arg(long)]
        force: bool,
    },
    /// Disarm the alarm; a valid code is always needed (asked on the terminal when omitted).
    Disarm {
        /// Alarm code of a user (see `domoticpi user pin`).
        #[arg(long, value_name = "C", value_parser = parse_secret)]
        code: Option<Secret>,
    },
}

/// An armed mode, as typed.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ArmMode {
    /// Nobody home: every zone is watched.
    Away,
    /// Someone home: interior sensors are ignored.
    Home,
    /// Asleep: interior sensors are ignored.
    Night,
}

/// Takes a secret from the command line into a type that never prints it.
fn parse_secret(s: &str) -> Result<Secret, String> {
    Ok(Secret::new(s))
}

/// Where a secret comes from.
#[derive(Debug, Args)]
pub struct SecretInput {
    /// Read the secret from the first line of standard input instead of the terminal.
    #[arg(long)]
    pub password_stdin: bool,
}

/// A role, as typed.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum RoleArg {
    Admin,
    Resident,
}

impl From<RoleArg> for Role {
    fn from(r: RoleArg) -> Role {
        match r {
            RoleArg::Admin => Role::Admin,
            RoleArg::Resident => Role::Resident,
        }
    }
}

/// Loads the config the options point at; without `--config` or `--data-dir`, the installed
/// hub's (`/etc/domoticpi/domoticpi.toml`) when there is one; else the built-in defaults.
pub fn load_config(cli: &Cli) -> anyhow::Result<Config> {
    let system = std::path::Path::new(config::SYSTEM_CONFIG_PATH);
    let mut config = match &cli.config {
        Some(path) => Config::load(path)?,
        None if cli.data_dir.is_none() && system.exists() => Config::load(system)?,
        None => Config::default(),
    };
    if let Some(dir) = &cli.data_dir {
        config.data_dir.clone_from(dir);
        config.data_dir_given = true;
    }
    Ok(config)
}

/// Runs every command but `run` (which `main` handles: it needs logging and a runtime).
pub fn execute(cli: &Cli, config: &Config) -> anyhow::Result<()> {
    match &cli.command {
        Command::Run => unreachable!("main handles run"),
        Command::Init => {
            hub::init(config)?;
            println!("data dir ready: {}", config.data_dir.display());
            println!("ca: {}", CertPaths::new(&config.data_dir).ca_cert.display());
            Ok(())
        }
        Command::CheckConfig => {
            check_user_names(config)?;
            let source =
                config.source.as_ref().map_or_else(|| "built-in defaults".to_owned(), |p| p.display().to_string());
            println!(
                "{source}: ok ({} rooms, {} devices, {} rules, {} scenes)",
                config.rooms.len(),
                config.devices.len(),
                config.rules.motion_light.len() + config.rules.schedule.len() + config.rules.switch.len(),
                config.scenes.len()
            );
            Ok(())
        }
        Command::Reload => reload(config),
        Command::Bridge(BridgeCommand::Request) => {
            let Some(bridge) = &config.bridge else {
                bail!("no [bridge] section in {}; add one first (house_id, client_key, …)", config_name(config));
            };
            print!("{}", certs::bridge_request(&bridge.client_key, &bridge.house_id)?);
            eprintln!(
                "key: {} (stays on this hub); have the company's CA sign the request above, then copy the certificate to {}",
                bridge.client_key.display(),
                bridge.client_cert.display()
            );
            Ok(())
        }
        Command::Certs(CertsCommand::Show) => certs_show(config),
        Command::User(cmd) => user(cmd, config),
        Command::Device(DeviceCommand::Creds { id, cert, format }) => device_creds(config, id, *cert, *format),
        Command::Device(DeviceCommand::List) => device_list(config),
        Command::Device(DeviceCommand::Revoke { id }) => device_revoke(config, id),
        Command::Status => status(config),
        Command::Alarm(cmd) => alarm(cmd, config),
        Command::Backup { path } => {
            let written = crate::backup::create(config, path)?;
            println!(
                "backup written to {} ({} files, {} bytes: database, certificates with the CA key, config)",
                path.display(),
                written.files,
                written.bytes
            );
            Ok(())
        }
        Command::Restore { path, force } => {
            let restored = crate::backup::restore(path, &config.data_dir, *force)?;
            println!("restored {} files into {} ({})", restored.files, config.data_dir.display(), restored.manifest);
            match &restored.config {
                Some(at) => println!(
                    "config from the backup: {} (check it, then put it in place: {})",
                    at.display(),
                    config.source.as_ref().map_or(config::SYSTEM_CONFIG_PATH.into(), |p| p.display().to_string())
                ),
                None => println!("the backup held no config file (the hub ran on built-in defaults)"),
            }
            Ok(())
        }
    }
}

/// Refuses device ids that are users' names, when the database exists and can be read.
fn check_user_names(config: &Config) -> anyhow::Result<()> {
    let db = hub::db_path(&config.data_dir);
    if !db.exists() {
        return Ok(());
    }
    let users = match store::open(&db).and_then(|c| store::users::list(&c)) {
        Ok(users) => users,
        Err(e) => {
            eprintln!("note: device ids not checked against users' names ({e})");
            return Ok(());
        }
    };
    config.check_user_names(|id| users.iter().any(|u| u.name == id))?;
    Ok(())
}

/// `reload`: asks the running hub to apply its config file and prints the outcome.
fn reload(config: &Config) -> anyhow::Result<()> {
    let response = crate::control::request(&config.data_dir, &crate::control::Request::Reload)?;
    if !response.ok {
        bail!("{}", response.error.as_deref().unwrap_or("the hub refused the request"));
    }
    let report = response.reload.unwrap_or_default();
    if report.applied.is_empty() && report.restart.is_empty() {
        println!("reloaded: no change");
    }
    for line in &report.applied {
        println!("applied: {line}");
    }
    for id in &report.closed {
        println!("closed: the connection of device {id}");
    }
    for key in &report.restart {
        println!("needs a restart: {key} changed; the running hub keeps the old value");
    }
    Ok(())
}

/// Opens the database of an initialised data dir, creating it if needed.
fn open_db(config: &Config) -> anyhow::Result<rusqlite::Connection> {
    certs::create_private_dir(&config.data_dir)?;
    Ok(store::open(&hub::db_path(&config.data_dir))?)
}

fn certs_show(config: &Config) -> anyhow::Result<()> {
    let paths = CertPaths::new(&config.data_dir);
    if !paths.server_cert.exists() {
        bail!("no certificates in {} yet; run `domoticpi init` or start the hub", config.data_dir.display());
    }
    let info = certs::read_info(&paths.server_cert)?;
    let ca = certs::read_info(&paths.ca_cert)?;
    let names: Vec<String> = info.names.iter().map(ToString::to_string).collect();
    let date = |t: time::OffsetDateTime| t.date().to_string();
    println!("ca: {}", paths.ca_cert.display());
    println!("ca_expires: {}", date(ca.not_after));
    println!("ca_sha256: {}", ca.sha256);
    println!("server_cert: {}", paths.server_cert.display());
    println!("server_names: {}", names.join(", "));
    println!("server_expires: {}", date(info.not_after));
    println!("server_sha256: {}", info.sha256);
    println!("server_sha1: {}", info.sha1);
    Ok(())
}

/// Why a device's firmware takes no ESPHome block or Arduino header, if it does not.
fn snippet_unfit(device: &config::Device, format: CredsFormat) -> Option<String> {
    let id = &device.id;
    match (&device.source, device.kind) {
        (_, DeviceKind::Bridge) if id == config::Source::ZIGBEE2MQTT => {
            Some("Zigbee2MQTT takes these in the mqtt: section of its configuration.yaml".to_owned())
        }
        (_, DeviceKind::Bridge) if format == CredsFormat::Arduino => {
            Some(format!("{id:?} is an ESPHome node (a bridge): ask for --format esphome"))
        }
        (Some(config::Source::Tasmota(_)), _) => {
            Some("a Tasmota device takes these in its web page (Configuration, MQTT)".to_owned())
        }
        (Some(config::Source::Esphome { node, .. }), _) => {
            Some(format!("{id:?} is a component of ESPHome node {node:?}, which logs in: `device creds {node}`"))
        }
        _ => None,
    }
}

fn device_creds(config: &Config, id: &str, with_cert: bool, format: CredsFormat) -> anyhow::Result<()> {
    let Some(device) = config.device(id) else {
        bail!("no device {id:?} in {}; declare it in a [[device]] section first", config_name(config));
    };
    if let Some(problem) = snippet_unfit(device, format).filter(|_| format != CredsFormat::Lines) {
        bail!("{problem}; `device creds {id}` prints its credentials as lines");
    }
    hub::init(config)?;
    let paths = CertPaths::new(&config.data_dir);
    let password = auth::random_secret();
    let conn = open_db(config)?;
    store::devices::set_password(&conn, id, &auth::hash_token(&password))?;
    let cert = if with_cert { Some(certs::issue_device(&paths, id)?) } else { None };
    if let Some((cert, _)) = &cert {
        // The hub accepts only the certificate recorded last: the one it replaces is revoked.
        store::devices::set_cert(&conn, id, &certs::read_info(cert)?.sha256)?;
    }
    store::events::record(&conn, "device", &format!("credentials issued for {id}"))?;
    close_device(config, id);
    if format != CredsFormat::Lines {
        let node = device.kind == DeviceKind::Bridge;
        let ca_pem = std::fs::read_to_string(&paths.ca_cert).with_context(|| paths.ca_cert.display().to_string())?;
        let (host, port) = (device_host(config), device_port(config, &conn)?);
        if port == 0 {
            bail!(
                "broker.tls_listen names port 0 and the hub is not running: start it, or give the port in the config"
            );
        }
        let server_sha1 = certs::read_info(&paths.server_cert)?.sha1;
        let creds = crate::snippets::Creds {
            id,
            host: &host,
            port,
            password: password.expose(),
            ca_pem: &ca_pem,
            server_sha1: &server_sha1,
            node,
        };
        match format {
            CredsFormat::Esphome => print!("{}", crate::snippets::esphome(&creds)),
            _ => print!("{}", crate::snippets::arduino(&creds)),
        }
        return Ok(());
    }
    let abs = |p: &std::path::Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_owned()).display().to_string();
    println!("host: {}", device_host(config));
    println!("port: {}", device_port(config, &conn)?);
    println!("ca: {}", abs(&paths.ca_cert));
    println!("client_id: {id}");
    println!("username: {id}");
    println!("password: {}", password.expose());
    if let Some((cert, key)) = cert {
        println!("cert: {}", abs(&cert));
        println!("key: {}", abs(&key));
    }
    // A device on its own firmware's topics (or one that speaks for such devices) is held to them.
    if let Some(scope) = crate::sources::Sources::new(config).declared(id, device.kind).scope {
        println!("publish: {}", scope.publish.join(", "));
        println!("subscribe: {}", scope.subscribe.join(", "));
        return Ok(());
    }
    use crate::topics::{self, Leaf};
    let mut publish = vec![topics::device(id, Leaf::State), topics::device(id, Leaf::Availability)];
    if device.kind == config::DeviceKind::Keypad {
        publish.push(topics::ALARM_SET.to_owned());
    }
    println!("publish: {}", publish.join(", "));
    println!("subscribe: {}, {}", topics::device(id, Leaf::Set), topics::ALARM_STATE);
    Ok(())
}

fn device_revoke(config: &Config, id: &str) -> anyhow::Result<()> {
    if config.device(id).is_none() {
        bail!("no device {id:?} in {}", config_name(config));
    }
    let conn = open_db(config)?;
    let had = store::devices::revoke(&conn, id)?;
    let paths = CertPaths::new(&config.data_dir);
    for file in [paths.devices.join(format!("{id}.pem")), paths.devices.join(format!("{id}.key"))] {
        match std::fs::remove_file(&file) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => bail!("credentials revoked, but {} could not be removed: {e}", file.display()),
        }
    }
    store::events::record(&conn, "device", &format!("credentials revoked for {id}"))?;
    let closed = close_device(config, id);
    match (had, closed) {
        (false, _) => println!("{id} had no credentials; nothing to revoke"),
        (true, true) => println!("credentials of {id} revoked; the running hub closed its connection if it had one"),
        (true, false) => println!("credentials of {id} revoked (the hub is not running)"),
    }
    Ok(())
}

/// Asks the running hub, if any, to close the device's connection; true if a hub answered.
fn close_device(config: &Config, id: &str) -> bool {
    let request = crate::control::Request::CloseDevice { id: id.to_owned() };
    crate::control::request_within(&config.data_dir, &request, std::time::Duration::from_secs(5)).is_ok_and(|r| r.ok)
}

/// The TLS port: the configured one, or the one the running hub picked when configured as 0.
fn device_port(config: &Config, conn: &rusqlite::Connection) -> anyhow::Result<u16> {
    let port = config.broker.tls_listen.port();
    if port != 0 {
        return Ok(port);
    }
    let running = store::runtime::get(conn)?.filter(|r| r.stopped_at.is_none());
    Ok(running.and_then(|r| r.tls_listen.parse::<std::net::SocketAddr>().ok()).map_or(0, |a| a.port()))
}

/// The address a device should use: an IP first (devices reach the hub without DNS).
fn device_host(config: &Config) -> String {
    let names = &config.broker.server_names;
    names
        .iter()
        .find(|n| matches!(n, config::ServerName::Ip(_)))
        .or_else(|| names.first())
        .map(ToString::to_string)
        .unwrap_or_else(|| {
            let ip = config.broker.tls_listen.ip();
            if ip.is_unspecified() {
                "127.0.0.1".to_owned()
            } else {
                ip.to_string()
            }
        })
}

fn device_list(config: &Config) -> anyhow::Result<()> {
    let conn = open_db(config)?;
    let rows: std::collections::HashMap<String, store::device_state::Row> =
        store::device_state::all(&conn)?.into_iter().map(|r| (r.id.clone(), r)).collect();
    if config.devices.is_empty() {
        println!("no devices declared in {}", config_name(config));
    }
    for d in &config.devices {
        let row = rows.get(&d.id).cloned().unwrap_or_default();
        let availability = match row.online {
            Some(true) => "online",
            Some(false) => "offline",
            None => "never-seen",
        };
        let seen = row.seen_at.as_deref().or(row.state_at.as_deref()).unwrap_or("-");
        let state = row.state.as_deref().unwrap_or("-");
        println!("{}\t{}\t{availability}\tlast seen {seen}\t{state}", d.id, d.kind.as_str());
    }
    Ok(())
}

/// User names share a namespace with device ids and become MQTT usernames.
fn check_user_name(name: &str, config: &Config) -> anyhow::Result<()> {
    auth::check_user_name(name, |id| config.device(id).is_some())
        .map_err(|e| anyhow::anyhow!("{e} (in {})", config_name(config)))
}

fn config_name(config: &Config) -> String {
    config.source.as_ref().map_or_else(|| "the config".to_owned(), |p| p.display().to_string())
}

fn user(cmd: &UserCommand, config: &Config) -> anyhow::Result<()> {
    match cmd {
        UserCommand::Add { name, role, input } => {
            check_user_name(name, config)?;
            let password = read_secret(input, "Password", true)?;
            auth::check_password(&password).map_err(|e| anyhow::anyhow!(e))?;
            let conn = open_db(config)?;
            store::users::add(&conn, name, (*role).into(), &auth::hash(&password))?;
            let role: Role = (*role).into();
            store::events::record(&conn, "user", &format!("user {name} added ({})", role.as_str()))?;
            println!("user {name} added ({})", role.as_str());
        }
        UserCommand::Pin { name, input } => {
            let pin = read_secret(input, "Alarm code", true)?;
            auth::check_pin(&pin).map_err(|e| anyhow::anyhow!(e))?;
            let conn = open_db(config)?;
            store::users::set_pin(&conn, name, &auth::hash(&pin))?;
            store::events::record(&conn, "user", &format!("alarm code set for {name}"))?;
            println!("alarm code set for {name}");
        }
        UserCommand::List => {
            let conn = open_db(config)?;
            let users = store::users::list(&conn)?;
            if users.is_empty() {
                println!("no users; add one with: domoticpi user add NAME --role admin");
            }
            for u in users {
                println!(
                    "{}\t{}\t{}\tcreated {}",
                    u.name,
                    u.role.as_str(),
                    if u.has_pin { "pin" } else { "no-pin" },
                    u.created_at
                );
            }
        }
        UserCommand::Remove { name } => {
            let conn = open_db(config)?;
            store::users::remove(&conn, name)?;
            store::events::record(&conn, "user", &format!("user {name} removed"))?;
            println!("user {name} removed");
        }
    }
    Ok(())
}

/// Reads a secret from the terminal (asking twice) or from the first line of stdin.
fn read_secret(input: &SecretInput, what: &str, confirm: bool) -> anyhow::Result<Secret> {
    if input.password_stdin {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line).context("reading standard input")?;
        let value = line.trim_end_matches(['\n', '\r']).to_owned();
        if value.is_empty() {
            bail!("no {} on standard input", what.to_lowercase());
        }
        return Ok(Secret::new(value));
    }
    if !std::io::stdin().is_terminal() {
        bail!("standard input is not a terminal; pass --password-stdin to read the {} from it", what.to_lowercase());
    }
    let first = Secret::new(rpassword::prompt_password(format!("{what}: ")).context("reading from the terminal")?);
    if confirm {
        let second =
            Secret::new(rpassword::prompt_password(format!("{what} again: ")).context("reading from the terminal")?);
        if first != second {
            bail!("the two entries differ");
        }
    }
    Ok(first)
}

fn status(config: &Config) -> anyhow::Result<()> {
    let source = config.source.as_ref().map_or_else(|| "built-in defaults".to_owned(), |p| p.display().to_string());
    println!("config: {source}");
    println!("data_dir: {}", config.data_dir.display());
    let db = hub::db_path(&config.data_dir);
    if !db.exists() {
        println!("hub: down (no database at {}; never started)", db.display());
        return Ok(());
    }
    let conn = store::open(&db)?;
    // Live figures come from the running hub itself, over its control socket: an answer also proves it is up.
    let stats = crate::control::request(&config.data_dir, &crate::control::Request::Stats).ok().and_then(|r| r.stats);
    match store::runtime::get(&conn)? {
        Some(r) if r.stopped_at.is_none() && (stats.is_some() || process_alive(r.pid)) => {
            println!("hub: up (pid {}, since {})", r.pid, r.started_at);
            println!("tls_listen: {}", r.tls_listen);
            println!("plain_listen: {}", r.plain_listen.as_deref().unwrap_or("off"));
            if let Some(s) = &stats {
                let per_minute = if s.uptime_s > 0 { s.store_commits as f64 * 60.0 / s.uptime_s as f64 } else { 0.0 };
                println!(
                    "store: {} write transactions in {} s of uptime ({per_minute:.1} per minute)",
                    s.store_commits, s.uptime_s
                );
                println!(
                    "clients: {} connected, {} client ids held (persistent sessions included), {} router ids used",
                    s.connected, s.client_ids, s.router_ids
                );
                println!(
                    "memory: heap {} KiB in use, {} KiB freed but held; SQLite holds {} KiB of it (page cache, schema, statements)",
                    s.heap_kib.0, s.heap_kib.1, s.store_memory_kib
                );
                if s.router_drops > 0 {
                    println!("router: closed {} connections on its own (a client it could not handle)", s.router_drops);
                }
            }
        }
        Some(r) => match r.stopped_at {
            Some(at) => println!("hub: down (stopped {at})"),
            None => println!("hub: down (pid {} is gone: it did not stop cleanly)", r.pid),
        },
        None => println!("hub: down (never started)"),
    }
    let rows = store::device_state::all(&conn)?;
    let online = rows.iter().filter(|r| r.online == Some(true) && config.device(&r.id).is_some()).count();
    println!("devices: {} declared, {online} online, {} offline", config.devices.len(), config.devices.len() - online);
    let thinned = store::device_state::counter(&conn, store::device_state::THINNED)?;
    if thinned > 0 {
        println!("store: {thinned} states not written, replaced while a flooding device waited for its disk budget");
    }
    match store::alarm::load(&conn)?.as_deref().and_then(crate::alarm::stored_status) {
        Some((state, since)) => println!("alarm: {state} (since {})", since.as_deref().unwrap_or("-")),
        None => println!("alarm: disarmed (never armed)"),
    }
    if let Some(bridge) = &config.bridge {
        let (queue, dropped) = (store::outbox::depth(&conn)?, store::outbox::dropped(&conn)?);
        let live = stats.as_ref().and_then(|s| s.bridge.clone());
        let state = live.as_ref().map_or("not running", |b| b.state.as_str());
        let last = live.as_ref().and_then(|b| b.last_sent.as_deref()).unwrap_or("never since the hub started");
        println!("bridge: {state} ({}), {queue} queued, {dropped} dropped, last sent {last}", bridge.url);
    }
    let rejected = store::device_state::rejected(&conn)?;
    if !rejected.is_empty() {
        println!("undeclared devices that published (rejected; declare them in the config):");
        for (id, count, at) in rejected {
            println!("  {id}: {count} messages, last {at}");
        }
    }
    let lagging = store::lag::all(&conn)?;
    if !lagging.is_empty() {
        println!("slow clients (messages dropped because they did not read them in time):");
        for (client, jumps, at) in lagging {
            println!("  {client}: dropped {jumps} times, last {at}");
        }
    }
    println!("last events:");
    for (at, kind, detail) in store::events::latest(&conn, 10)? {
        println!("  {at}  {kind}: {detail}");
    }
    Ok(())
}

fn alarm(cmd: &AlarmCommand, config: &Config) -> anyhow::Result<()> {
    use crate::control::{self, Request};
    let (action, code, force, needs_code) = match cmd {
        AlarmCommand::Status => {
            let response = control::request(&config.data_dir, &Request::AlarmStatus)?;
            return print_alarm(response);
        }
        AlarmCommand::Arm { mode, code, force } => {
            let mode = match mode {
                ArmMode::Away => crate::alarm::arm_action(domoticpi_rules::alarm::Mode::Away),
                ArmMode::Home => crate::alarm::arm_action(domoticpi_rules::alarm::Mode::Home),
                ArmMode::Night => crate::alarm::arm_action(domoticpi_rules::alarm::Mode::Night),
            };
            (mode, code, *force, config.alarm.code_arm_required)
        }
        AlarmCommand::Disarm { code } => ("disarm", code, false, true),
    };
    // A code typed at a prompt stays out of the shell history and the process list.
    let code = match code {
        Some(code) => Some(code.clone()),
        None if needs_code && std::io::stdin().is_terminal() => {
            Some(Secret::new(rpassword::prompt_password("Alarm code: ").context("reading from the terminal")?))
        }
        None => None,
    };
    let mut command = serde_json::json!({ "action": action, "force": force });
    if let Some(code) = code {
        command["code"] = serde_json::Value::from(code.expose());
    }
    let response = control::request(&config.data_dir, &Request::Alarm { command })?;
    print_alarm(response)
}

/// Prints the events and the alarm's state; an error when the hub refused the request.
fn print_alarm(response: crate::control::Response) -> anyhow::Result<()> {
    if !response.ok {
        bail!("{}", response.error.as_deref().unwrap_or("the hub refused the request"));
    }
    for e in &response.events {
        let mut line = format!("event: {}: {}", e.event, e.reason);
        if let Some(device) = &e.device {
            line.push_str(&format!(" (device {device})"));
        }
        if let Some(user) = &e.user {
            line.push_str(&format!(" (user {user})"));
        }
        println!("{line}");
    }
    if let Some(a) = &response.alarm {
        println!("alarm: {}", a.state);
        println!("since: {}", a.since);
        println!("by: {}", a.by);
        println!("bypassed: {}", if a.bypassed.is_empty() { "-".to_owned() } else { a.bypassed.join(", ") });
        println!("code_entry: {}", if a.code_locked_out { "locked" } else { "open" });
        if let Some(ms) = a.remaining_ms {
            println!("time_left: {:.1} s", ms as f64 / 1000.0);
        }
    }
    let refused = ["arm_refused", "code_rejected", "code_lockout"];
    if let Some(e) = response.events.iter().find(|e| refused.contains(&e.event.as_str())) {
        bail!("refused: {}: {}", e.event, e.reason);
    }
    Ok(())
}

fn process_alive(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmd| cmd.windows(9).any(|w| w == b"domoticpi"))
}
