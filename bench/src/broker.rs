//! The brokers under test: the hub (the release binary) and Mosquitto, each run as a child process on
//! 127.0.0.1 in a temp dir, and killed when its [`Broker`] guard is dropped (also on error or panic).

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// The MQTT user every bench client logs in as (admin on the hub).
pub const USER: &str = "bench";

/// The hub user of the fresh-id churn, whose password hash is cheap to check.
pub const CHURN_USER: &str = "bench-churn";

/// The bench user's alarm code on the hub (disarms in the door → siren cycles).
pub const ALARM_CODE: &str = "2468";

/// The hub's devices for sensor → rule → actuator latency: a motion sensor that switches a light
/// (`when = "always"`, off 1 s after the last motion), and a perimeter door that sounds a siren.
pub const MOTION: &str = "bench-motion";
pub const LIGHT: &str = "bench-light";
pub const DOOR: &str = "bench-door";
pub const SIREN: &str = "bench-siren";

/// The light the fleet's motion sensors switch: the fleet also keeps the light rules busy.
const FLEET_LIGHT: &str = "fleet-light";

/// Open-file limit given to each broker: 1,000 idle clients need more than the usual 1,024.
const BROKER_NOFILE: u32 = 8192;

/// How long a broker may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Which broker a measurement runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Hub,
    Mosquitto,
    /// A second hub of the same binary, on a copy of the first's data dir (`--twin`): both columns
    /// the same broker, so the ratios show how far the table moves when nothing differs.
    Twin,
}

impl Kind {
    /// The column name.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Hub => "hub",
            Kind::Mosquitto => "mosquitto",
            Kind::Twin => "twin",
        }
    }

    /// Whether this is a DomoticPi hub (its logins, its store).
    pub fn is_hub(self) -> bool {
        matches!(self, Kind::Hub | Kind::Twin)
    }
}

/// Mosquitto's executables and version, when it is installed.
pub struct Mosquitto {
    bin: PathBuf,
    passwd_file: PathBuf,
    /// First line of `mosquitto -h`, e.g. `mosquitto version 2.0.11`.
    pub version: String,
}

/// What is prepared once for all runs: the temp dir, the hub's data dir (CA, server certificate,
/// database with the bench user) and Mosquitto's password file using the same password.
pub struct Setup {
    dir: tempfile::TempDir,
    hub_bin: PathBuf,
    hub_config: PathBuf,
    /// The twin hub's config, on its copy of the data dir (`--twin` only).
    twin_config: Option<PathBuf>,
    /// The hub CA, trusted by every TLS client; Mosquitto serves the hub's server certificate.
    pub ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    /// The bench user's password on both brokers.
    pub password: String,
    /// The hub's password for each declared device (its username is its id); empty if not issued.
    pub device_passwords: HashMap<String, String>,
    /// `None` when Mosquitto is not installed (its column then reads n/a).
    pub mosquitto: Option<Mosquitto>,
    /// RSS above which a broker is killed (KiB).
    guard_kib: u64,
}

impl Setup {
    /// Initialises the hub's data dir with `domoticpi init` and `user add`, and, when `want_mosquitto`
    /// and it is installed, Mosquitto's password file. The hub's config declares `devices` motion
    /// sensors `dev-1`… (it rejects states of undeclared devices) that switch a light by rule, and
    /// the devices of the reaction measurements; the bench user gets an alarm code. Brokers
    /// started from this setup are killed when their RSS passes `guard_kib`. With `twin`, a copy
    /// of the hub's data dir for a second hub ([`Kind::Twin`]). Returns notes (e.g. Mosquitto
    /// unavailable).
    pub fn new(
        hub_bin: &Path,
        want_mosquitto: bool,
        twin: bool,
        guard_kib: u64,
        devices: usize,
    ) -> Result<(Setup, Vec<String>)> {
        let dir = tempfile::Builder::new().prefix("domoticpi-bench-").tempdir().context("creating the temp dir")?;
        let data = dir.path().join("hub-data");
        let hub_config = dir.path().join("domoticpi.toml");
        let mut config = String::from(
            "log_level = \"warn\"\n\n[web]\nlisten = \"127.0.0.1:0\"\n\n[broker]\n\
             tls_listen = \"127.0.0.1:0\"\nplain_listen = \"127.0.0.1:0\"\nmax_connections = 4000\n",
        );
        config.push_str(&reaction_config());
        for n in 1..=devices {
            config.push_str(&format!("\n[[device]]\nid = \"{}\"\nkind = \"motion\"\n", device_id(n)));
        }
        if devices > 0 {
            let sensors: Vec<String> = (1..=devices).map(|n| format!("{:?}", device_id(n))).collect();
            config.push_str(&format!(
                "\n[[device]]\nid = \"{FLEET_LIGHT}\"\nkind = \"light\"\n\n[[rule.motion_light]]\n\
                 sensors = [{}]\nlights = [\"{FLEET_LIGHT}\"]\noff_after_s = 1\nwhen = \"always\"\n",
                sensors.join(", ")
            ));
        }
        // TOML: the top-level keys come before the first table.
        let config_on = |data: &Path| format!("data_dir = {:?}\n{config}", data.display().to_string());
        std::fs::write(&hub_config, config_on(&data)).with_context(|| format!("writing {}", hub_config.display()))?;
        let password = format!("bench-{:x}-{:x}", std::process::id(), crate::now_nanos_since_epoch());

        let config_arg = hub_config.to_str().context("temp dir path is not UTF-8")?;
        run_checked(Command::new(hub_bin).args(["--config", config_arg, "init"]), None, "domoticpi init")?;
        run_checked(
            Command::new(hub_bin).args([
                "--config",
                config_arg,
                "user",
                "add",
                USER,
                "--role",
                "admin",
                "--password-stdin",
            ]),
            Some(&format!("{password}\n")),
            "domoticpi user add",
        )?;
        run_checked(
            Command::new(hub_bin).args(["--config", config_arg, "user", "pin", USER, "--password-stdin"]),
            Some(&format!("{ALARM_CODE}\n")),
            "domoticpi user pin",
        )?;

        add_cheap_user(&data.join("hub.db"), CHURN_USER, &password)?;

        let certs = data.join("certs");
        let mut setup = Setup {
            hub_bin: hub_bin.to_path_buf(),
            hub_config,
            twin_config: None,
            ca: certs.join("ca.pem"),
            server_cert: certs.join("server.pem"),
            server_key: certs.join("server.key"),
            password,
            device_passwords: HashMap::new(),
            mosquitto: None,
            guard_kib,
            dir,
        };
        let mut notes = Vec::new();
        {
            let ids = (1..=devices).map(device_id).chain([MOTION, LIGHT, DOOR, SIREN].map(str::to_owned));
            match setup.issue_device_passwords(ids) {
                Ok(passwords) => setup.device_passwords = passwords,
                Err(e) => notes.push(format!(
                    "hub: no device credentials ({e:#}); the fleet's devices log in as the admin user `{USER}`"
                )),
            }
        }
        if twin {
            // Once the first hub's data dir is complete: the same users, devices and certificates.
            let twin_data = setup.dir.path().join("twin-data");
            run_checked(Command::new("cp").arg("-a").arg(&data).arg(&twin_data), None, "copying the data dir")?;
            let twin_config = setup.dir.path().join("twin.toml");
            std::fs::write(&twin_config, config_on(&twin_data))
                .with_context(|| format!("writing {}", twin_config.display()))?;
            setup.twin_config = Some(twin_config);
        }
        if want_mosquitto {
            match setup.prepare_mosquitto() {
                Ok(m) => setup.mosquitto = Some(m),
                Err(e) => notes.push(format!("mosquitto column n/a: {e:#}")),
            }
        }
        Ok((setup, notes))
    }

    /// Runs `domoticpi device creds ID` for each device and reads the `password:` line.
    fn issue_device_passwords(&self, ids: impl Iterator<Item = String>) -> Result<HashMap<String, String>> {
        let mut passwords = HashMap::new();
        for id in ids {
            let mut cmd = Command::new(&self.hub_bin);
            cmd.arg("--config").arg(&self.hub_config).args(["device", "creds", &id]);
            let out = run_checked(&mut cmd, None, "domoticpi device creds")?;
            let password = out
                .stdout
                .lines()
                .find_map(|l| l.strip_prefix("password: "))
                .with_context(|| format!("no `password:` line from `device creds {id}`"))?;
            passwords.insert(id, password.trim().to_owned());
        }
        Ok(passwords)
    }

    /// Finds `mosquitto` and `mosquitto_passwd` and writes the password file.
    fn prepare_mosquitto(&self) -> Result<Mosquitto> {
        let bin = find_program("mosquitto")
            .ok_or_else(|| anyhow!("mosquitto is not installed (Debian: apt-get install mosquitto)"))?;
        let passwd_bin = find_program("mosquitto_passwd")
            .ok_or_else(|| anyhow!("mosquitto_passwd is not installed (Debian: apt-get install mosquitto)"))?;
        let passwd_file = self.dir.path().join("mosquitto.passwd");
        let file_arg = passwd_file.to_str().context("temp dir path is not UTF-8")?;
        run_checked(
            Command::new(passwd_bin).args(["-b", "-c", file_arg, USER, &self.password]),
            None,
            "mosquitto_passwd",
        )?;
        let out = run(Command::new(&bin).arg("-h"), None, Duration::from_secs(10)).context("running mosquitto -h")?;
        let version = out.stdout.lines().next().unwrap_or("mosquitto (unknown version)").trim().to_owned();
        Ok(Mosquitto { bin, passwd_file, version })
    }

    /// Whether a twin hub was set up.
    pub fn has_twin(&self) -> bool {
        self.twin_config.is_some()
    }

    /// The running hub's count of its SQLite write transactions, from `domoticpi status`.
    pub fn hub_store_commits(&self) -> Result<u64> {
        let mut cmd = Command::new(&self.hub_bin);
        cmd.arg("--config").arg(&self.hub_config).arg("status");
        let out = run_checked(&mut cmd, None, "domoticpi status")?;
        // `store: N write transactions in S s of uptime (…)`
        out.stdout
            .lines()
            .find_map(|l| l.strip_prefix("store: ")?.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("no `store:` line in `domoticpi status`:\n{}", out.stdout))
    }

    /// The hub's `--version` line.
    pub fn hub_version(&self) -> Result<String> {
        let out = run_checked(Command::new(&self.hub_bin).arg("--version"), None, "domoticpi --version")?;
        Ok(out.stdout.trim().to_owned())
    }

    /// Starts a fresh broker of `kind`, killed when the returned guard is dropped; confined to CPU `cpu` when given (`taskset -c CPU`: every thread of the
    /// broker may run on that core only, and the hub's runtime sizes itself to it).
    pub fn start_on(&self, kind: Kind, cpu: Option<usize>) -> Result<Broker> {
        match kind {
            Kind::Hub => self.start_hub(kind, &self.hub_config, cpu),
            Kind::Twin => {
                let config = self.twin_config.as_ref().ok_or_else(|| anyhow!("no twin hub was set up"))?;
                self.start_hub(kind, config, cpu)
            }
            Kind::Mosquitto => {
                let m = self.mosquitto.as_ref().ok_or_else(|| anyhow!("mosquitto is not available"))?;
                let mut last_error = anyhow!("mosquitto did not start");
                // A port picked free may be taken again before Mosquitto binds it: try a few times.
                for _ in 0..3 {
                    match self.start_mosquitto(m, cpu) {
                        Ok(b) => return Ok(b),
                        Err(e) => last_error = e,
                    }
                }
                Err(last_error)
            }
        }
    }

    /// Runs `domoticpi --config C run` and reads its listeners from the `hub ready` log line.
    fn start_hub(&self, kind: Kind, config: &Path, cpu: Option<usize>) -> Result<Broker> {
        let mut cmd = wrapped(&self.hub_bin, cpu);
        cmd.arg("--config").arg(config).arg("run");
        // Warnings only, like Mosquitto's `log_type error`, plus the one line that gives the ports.
        cmd.env("RUST_LOG", "warn,domoticpi::hub=info");
        let (mut broker, lines) = Broker::spawn(kind, cmd, self.guard_kib)?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match lines.recv_timeout(left) {
                Ok(line) => line,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    bail!("the hub did not report `hub ready` within {START_TIMEOUT:?}{}", broker.recent_log())
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    broker.check_alive()?;
                    bail!("the hub closed its stderr before `hub ready`{}", broker.recent_log());
                }
            };
            if line.contains("hub ready") {
                broker.tls = field_addr(&line, "tls=")?;
                broker.plain = field_addr(&line, "plain=")?;
                return Ok(broker);
            }
        }
    }

    /// Writes a mosquitto.conf equivalent to the hub's config and starts Mosquitto on it.
    fn start_mosquitto(&self, m: &Mosquitto, cpu: Option<usize>) -> Result<Broker> {
        let tls_port = free_port()?;
        let plain_port = free_port()?;
        let conf = self.dir.path().join("mosquitto.conf");
        let mut text = String::new();
        text.push_str("per_listener_settings false\nallow_anonymous false\n");
        text.push_str(&format!("password_file {}\n", m.passwd_file.display()));
        text.push_str("persistence false\nmax_queued_messages 0\nmax_inflight_messages 100\n");
        text.push_str("set_tcp_nodelay true\nlog_dest stderr\nlog_type error\n");
        if is_root() {
            // Otherwise Mosquitto drops to the `mosquitto` user, who cannot read the 0700 data dir.
            text.push_str("user root\n");
        }
        text.push_str(&format!("\nlistener {tls_port} 127.0.0.1\n"));
        text.push_str(&format!("cafile {}\n", self.ca.display()));
        text.push_str(&format!("certfile {}\n", self.server_cert.display()));
        text.push_str(&format!("keyfile {}\n", self.server_key.display()));
        text.push_str(&format!("\nlistener {plain_port} 127.0.0.1\n"));
        std::fs::write(&conf, text).with_context(|| format!("writing {}", conf.display()))?;

        let mut cmd = wrapped(&m.bin, cpu);
        cmd.arg("-c").arg(&conf);
        let (mut broker, _lines) = Broker::spawn(Kind::Mosquitto, cmd, self.guard_kib)?;
        broker.tls = SocketAddr::from(([127, 0, 0, 1], tls_port));
        broker.plain = SocketAddr::from(([127, 0, 0, 1], plain_port));
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            broker.check_alive()?;
            let up = |addr| TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok();
            if up(broker.plain) && up(broker.tls) {
                return Ok(broker);
            }
            if Instant::now() > deadline {
                bail!("mosquitto did not listen within {START_TIMEOUT:?}{}", broker.recent_log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A running broker. Dropping it kills the process and reaps it.
///
/// A watchdog thread reads its RSS every 100 ms and kills it if it passes the memory guard, so a
/// broker that balloons cannot push the machine into swap or the OOM killer.
pub struct Broker {
    /// Which broker this is.
    pub kind: Kind,
    /// Its MQTT-over-TLS listener.
    pub tls: SocketAddr,
    /// Its plain MQTT listener.
    pub plain: SocketAddr,
    pid: u32,
    child: Arc<Mutex<Child>>,
    guard: Arc<Guard>,
    log: Arc<Mutex<VecDeque<String>>>,
}

/// State shared with a broker's memory watchdog.
struct Guard {
    limit_kib: u64,
    /// The RSS that tripped the guard (0: not tripped).
    tripped_kib: AtomicU64,
    /// Set when the broker is dropped: the watchdog ends.
    done: AtomicBool,
}

impl Broker {
    /// Spawns `cmd` with stderr captured (the last lines are kept for error messages, and every
    /// line is also sent on the returned channel, where the hub's ready line is read) and starts the
    /// memory watchdog at `guard_kib`.
    fn spawn(kind: Kind, mut cmd: Command, guard_kib: u64) -> Result<(Broker, mpsc::Receiver<String>)> {
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = cmd.spawn().with_context(|| format!("starting {}", kind.name()))?;
        let pid = child.id();
        let stderr = child.stderr.take().context("child stderr")?;
        let child = Arc::new(Mutex::new(child));
        let guard =
            Arc::new(Guard { limit_kib: guard_kib, tripped_kib: AtomicU64::new(0), done: AtomicBool::new(false) });
        let log = Arc::new(Mutex::new(VecDeque::new()));
        let unset = SocketAddr::from(([127, 0, 0, 1], 0));
        // From here on, dropping `broker` kills the child.
        let broker = Broker { kind, tls: unset, plain: unset, pid, child, guard, log };

        let (tx, rx) = mpsc::channel();
        let ring = Arc::clone(&broker.log);
        std::thread::Builder::new()
            .name(format!("{}-stderr", kind.name()))
            .spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if let Ok(mut ring) = ring.lock() {
                        if ring.len() == 30 {
                            ring.pop_front();
                        }
                        ring.push_back(line.clone());
                    }
                    let _ = tx.send(line);
                }
            })
            .context("spawning the stderr reader")?;

        let (child, guard) = (Arc::clone(&broker.child), Arc::clone(&broker.guard));
        std::thread::Builder::new()
            .name(format!("{}-watchdog", kind.name()))
            .spawn(move || {
                while !guard.done.load(Ordering::Relaxed) {
                    match rss_kib_of(pid) {
                        Ok(kib) if kib > guard.limit_kib => {
                            guard.tripped_kib.store(kib, Ordering::Relaxed);
                            // Through the Child handle: never signals a PID that was already reaped.
                            if let Ok(mut c) = child.lock() {
                                let _ = c.kill();
                            }
                            return;
                        }
                        Ok(_) => {}
                        Err(_) => return,
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
            .context("spawning the memory watchdog")?;
        Ok((broker, rx))
    }

    /// The broker's process id (the shell wrapper `exec`s it, so this is the broker itself).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The memory guard, in KiB of RSS.
    pub fn guard_kib(&self) -> u64 {
        self.guard.limit_kib
    }

    /// Resident set size in KiB, from `/proc/PID/status` (VmRSS).
    pub fn rss_kib(&mut self) -> Result<u64> {
        self.check_alive()?;
        rss_kib_of(self.pid)
    }

    /// An error (with the broker's last log lines) if the process has exited or was killed by the guard.
    pub fn check_alive(&mut self) -> Result<()> {
        let status = {
            let mut child = self.child.lock().map_err(|_| anyhow!("broker handle poisoned"))?;
            child.try_wait().context("checking the broker process")?
        };
        let tripped = self.guard.tripped_kib.load(Ordering::Relaxed);
        if tripped > 0 {
            bail!(
                "{} killed: its RSS reached {:.0} MiB, past the memory guard of {:.0} MiB (--max-broker-rss)",
                self.kind.name(),
                tripped as f64 / 1024.0,
                self.guard.limit_kib as f64 / 1024.0
            );
        }
        match status {
            None => Ok(()),
            Some(status) => bail!("{} exited ({status}){}", self.kind.name(), self.recent_log()),
        }
    }

    /// The last lines the broker wrote to stderr, formatted for an error message.
    pub fn recent_log(&self) -> String {
        // Give the reader thread a moment to collect the final lines of a process that just died.
        std::thread::sleep(Duration::from_millis(100));
        let lines: Vec<String> = self.log.lock().map(|l| l.iter().cloned().collect()).unwrap_or_default();
        if lines.is_empty() {
            String::new()
        } else {
            format!("; its last log lines:\n    {}", lines.join("\n    "))
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.guard.done.store(true, Ordering::Relaxed);
        if let Ok(mut child) = self.child.lock() {
            // SIGKILL cannot be ignored, so the wait that follows is short.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Adds a resident to the hub's database whose argon2id hash has the smallest parameters argon2
/// allows (8 KiB, one pass): the hub verifies a hash with the parameters it carries, so the churn's
/// 100,000 logins measure the hub, not argon2. Only the bench does this; `user add` never does.
fn add_cheap_user(db: &Path, name: &str, password: &str) -> Result<()> {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let params = argon2::Params::new(8, 1, 1, None).map_err(|e| anyhow!("argon2 parameters: {e}"))?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    // A bench user's salt need not be secret: the time and the process id make it unique.
    let seed = crate::now_nanos_since_epoch() ^ u128::from(std::process::id());
    let salt = SaltString::encode_b64(&seed.to_le_bytes()).map_err(|e| anyhow!("salt: {e}"))?;
    let hash = argon.hash_password(password.as_bytes(), &salt).map_err(|e| anyhow!("hashing: {e}"))?.to_string();
    let conn = rusqlite::Connection::open(db).with_context(|| format!("opening {}", db.display()))?;
    conn.execute(
        "INSERT INTO users (name, role, password_hash, created_at) VALUES (?1, 'resident', ?2, '')",
        [name, hash.as_str()],
    )
    .context("adding the churn user")?;
    Ok(())
}

/// Resident set size of process `pid` in KiB, from `/proc/PID/status` (VmRSS).
pub fn rss_kib_of(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no VmRSS in {path} (process exited?)"))
}

/// The anonymous and the file-backed parts of process `pid`'s RSS in KiB (`RssAnon`, `RssFile`):
/// the memory it wrote, and the pages of its binary and libraries mapped from the page cache.
pub fn rss_parts_kib_of(pid: u32) -> Result<(u64, u64)> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .with_context(|| format!("no {name} in {path}"))
    };
    Ok((field("RssAnon:")?, field("RssFile:")?))
}

/// Config of the reaction measurements' devices and rules, and of an alarm that arms at once.
fn reaction_config() -> String {
    format!(
        "\n[alarm]\nexit_delay_s = 0\nentry_delay_s = 0\nsiren_s = 60\nlights_on_trigger = false\n\
         \n[[device]]\nid = \"{MOTION}\"\nkind = \"motion\"\n\
         \n[[device]]\nid = \"{LIGHT}\"\nkind = \"light\"\n\
         \n[[device]]\nid = \"{DOOR}\"\nkind = \"contact\"\nzone = \"perimeter\"\n\
         \n[[device]]\nid = \"{SIREN}\"\nkind = \"siren\"\n\
         \n[[rule.motion_light]]\nsensors = [\"{MOTION}\"]\nlights = [\"{LIGHT}\"]\noff_after_s = 1\nwhen = \"always\"\n"
    )
}

/// The id of fleet device `n` (from 1): also its client id and its topic segment.
pub fn device_id(n: usize) -> String {
    format!("dev-{n}")
}

/// `sh -c 'ulimit -n N; exec PROGRAM "$@"'`: raises the open-file limit, then becomes the program.
fn wrapped(program: &Path, cpu: Option<usize>) -> Command {
    let pin = cpu.map_or_else(String::new, |cpu| format!("taskset -c {cpu} "));
    let script = format!(r#"ulimit -n {BROKER_NOFILE} 2>/dev/null || ulimit -n "$(ulimit -Hn)"; exec {pin}"$0" "$@""#);
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(script).arg(program);
    cmd
}

/// Parses the address after `key` (e.g. `tls=`) in a log line.
fn field_addr(line: &str, key: &str) -> Result<SocketAddr> {
    let value = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .with_context(|| format!("no `{key}` in the hub's ready line: {line}"))?;
    value.parse().with_context(|| format!("bad address `{value}` in the hub's ready line: {line}"))
}

/// A loopback port that was free a moment ago.
fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0 to pick a port")?;
    Ok(listener.local_addr().context("local address")?.port())
}

/// Whether this process runs as root (read from /proc, no libc needed).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Uid:")).map(|v| v.split_whitespace().next() == Some("0")))
        .unwrap_or(false)
}

/// Looks `name` up on PATH, then in the sbin directories (Debian installs mosquitto in /usr/sbin).
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// What a short-lived command printed.
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cmd` to completion with optional stdin, killing it after `timeout`.
pub fn run(cmd: &mut Command, stdin: Option<&str>, timeout: Duration) -> Result<Output> {
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("starting {:?}", cmd.get_program()))?;
    let mut input = child.stdin.take().context("child stdin")?;
    if let Some(text) = stdin {
        // Short inputs fit in the pipe buffer; a failure shows up as the command's own error.
        let _ = input.write_all(text.as_bytes());
    }
    drop(input);
    let read_all = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = read_all(Box::new(child.stdout.take().context("child stdout")?));
    let err = read_all(Box::new(child.stderr.take().context("child stderr")?));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().context("waiting for the command")? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{:?} did not finish within {timeout:?}", cmd.get_program());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(Output { status, stdout: out.join().unwrap_or_default(), stderr: err.join().unwrap_or_default() })
}

/// [`run`] with a 60 s limit, failing on a non-zero exit with the command's stderr.
fn run_checked(cmd: &mut Command, stdin: Option<&str>, what: &str) -> Result<Output> {
    let out = run(cmd, stdin, Duration::from_secs(60)).with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!("{what} failed ({}): {}", out.status, out.stderr.trim());
    }
    Ok(out)
}
