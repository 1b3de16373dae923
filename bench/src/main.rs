//! `domoticpi-bench`: puts the DomoticPi hub's figures beside Mosquitto's, on this machine, in one table.
//!
//! Run from the workspace: `cargo run --release -p domoticpi-bench` (`--quick` for a short run,
//! `--only NAME` for some rows, `--messages N` for the 1→1 cases). It drives the release binary
//! `target/release/domoticpi` as a process (building it when missing) and Mosquitto when installed,
//! each freshly started for every measurement, on 127.0.0.1 only, in a temp dir; every child is killed
//! at the end, on error, on panic and on Ctrl-C. The table goes to stdout, progress to stderr.
//!
//! This is not a test: nothing asserts a timing.

mod broker;
mod client;
mod logins;
mod reactions;
mod scenarios;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, ValueEnum};
use rumqttc::QoS;

use broker::{Broker, Kind, Setup};
use client::{Target, Transport};
use scenarios::Outcome;

/// Compare the DomoticPi hub with Mosquitto on loopback: throughput, latency, memory, TLS connects.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// A short run (10,000 messages per 1→1 case, 5 s of fleet load, 200 idle clients, 2 s of connects).
    #[arg(long)]
    quick: bool,
    /// Run only these measurements (comma-separated, or repeat the option).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Scenario>,
    /// Messages per 1→1 case [default: 100,000; 10,000 with --quick].
    #[arg(long, value_name = "N")]
    messages: Option<u64>,
    /// The hub binary [default: target/release/domoticpi of this workspace, built when missing].
    #[arg(long, value_name = "PATH")]
    hub_bin: Option<PathBuf>,
    /// Leave Mosquitto out (its column reads n/a).
    #[arg(long)]
    no_mosquitto: bool,
    /// A second hub of the same binary in Mosquitto's column (an A/A run): the ratios then show how
    /// far a figure moves between two runs of one broker on this machine, the floor under which a
    /// difference from Mosquitto means nothing.
    #[arg(long, conflicts_with = "no_mosquitto")]
    twin: bool,
    /// Kill a broker whose RSS passes this many MiB [default: half the available memory, at most 8 GiB].
    #[arg(long, value_name = "MIB")]
    max_broker_rss: Option<u64>,
    /// Run each measurement N times, the brokers taking turns, and print each figure's median and
    /// the median of each round's own hub/other ratio (on a shared machine, where a neighbour's
    /// load comes and goes).
    #[arg(long, value_name = "N", default_value_t = 1)]
    rounds: u32,
    /// Seconds of load per paced rate and broker, twice that at 100 msg/s [default: 10; 5 with --quick].
    #[arg(long, value_name = "S")]
    paced_seconds: Option<u64>,
}

/// One measurement, run against each broker in turn.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, ValueEnum)]
enum Scenario {
    /// 1 publisher → 1 subscriber, QoS0, TLS.
    Qos0Tls,
    /// 1 publisher → 1 subscriber, QoS0, plain TCP.
    Qos0Plain,
    /// 1 publisher → 1 subscriber, QoS1, TLS.
    Qos1Tls,
    /// 1 publisher → 1 subscriber, QoS1, plain TCP.
    Qos1Plain,
    /// 50 devices at QoS1 to one subscriber on dpi/#, fixed total rate.
    Fleet,
    /// Broker RSS idle and with idle TLS clients (two rounds).
    Rss,
    /// TLS connects per second with 10 concurrent clients.
    Connects,
    /// RSS after 100,000 plain connects, each with a fresh client id.
    Churn,
    /// A device's TLS CONNACK time, idle and during 1,000 wrong-password CONNECTs from another address.
    Flood,
    /// Sensor → rule → actuator latency on the hub (motion → light, door → siren), idle and under load.
    Reactions,
    /// A house's paced load (100, 1,000, 5,000 msg/s; plain and TLS): broker CPU per message, latency.
    Paced,
    /// The paced load with each broker confined to one core (a small Pi), the load on the others.
    PacedOneCore,
}

impl Scenario {
    const ALL: [Scenario; 12] = [
        Scenario::Qos0Tls,
        Scenario::Qos0Plain,
        Scenario::Qos1Tls,
        Scenario::Qos1Plain,
        Scenario::Fleet,
        Scenario::Reactions,
        Scenario::Paced,
        Scenario::PacedOneCore,
        Scenario::Rss,
        Scenario::Connects,
        Scenario::Churn,
        Scenario::Flood,
    ];

    /// The name `--only` takes.
    fn name(self) -> String {
        self.to_possible_value().map(|v| v.get_name().to_owned()).unwrap_or_default()
    }
}

/// Sizes of a run.
struct Plan {
    messages: u64,
    fleet_devices: usize,
    fleet_rate: u32,
    fleet_duration: Duration,
    idle_clients: usize,
    idle_concurrency: usize,
    connect_workers: usize,
    connect_duration: Duration,
    reaction_cycles: usize,
    /// How long each paced rate runs, and the rates.
    paced: (Duration, [u32; 3]),
    churn_connects: u64,
    flood_logins: u64,
}

impl Plan {
    fn new(args: &Args) -> Plan {
        let quick = args.quick;
        Plan {
            messages: args.messages.unwrap_or(if quick { 10_000 } else { 100_000 }),
            fleet_devices: 50,
            fleet_rate: 1_000,
            fleet_duration: Duration::from_secs(if quick { 5 } else { 30 }),
            idle_clients: if quick { 200 } else { 1_000 },
            idle_concurrency: 50,
            connect_workers: 10,
            connect_duration: Duration::from_secs(if quick { 2 } else { 5 }),
            reaction_cycles: if quick { 10 } else { 30 },
            paced: (Duration::from_secs(args.paced_seconds.unwrap_or(if quick { 5 } else { 10 })), [100, 1_000, 5_000]),
            churn_connects: if quick { 10_000 } else { 100_000 },
            flood_logins: 1_000,
        }
    }
}

/// Start of the clock shared by publishers and subscribers (the latency timestamps).
static CLOCK: OnceLock<Instant> = OnceLock::new();

/// Nanoseconds on the shared monotonic clock.
pub fn now_ns() -> u64 {
    u64::try_from(CLOCK.get_or_init(Instant::now).elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Nanoseconds since the Unix epoch (only to make the bench password unique).
pub fn now_nanos_since_epoch() -> u128 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or_default()
}

/// A warning on stderr, beside the progress lines.
pub fn warn(msg: &str) {
    eprintln!("  ! {msg}");
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    now_ns();
    // Dropping the run on Ctrl-C drops the broker guards, which kill the brokers.
    let result = tokio::select! {
        r = run(args) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("domoticpi-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs the selected measurements against each broker and prints the header and the table.
async fn run(args: Args) -> Result<()> {
    let plan = Plan::new(&args);
    let selected: Vec<Scenario> =
        Scenario::ALL.into_iter().filter(|s| args.only.is_empty() || args.only.contains(s)).collect();
    let hub_bin = hub_binary(args.hub_bin.as_deref())?;
    let guard_mib = args.max_broker_rss.unwrap_or_else(default_guard_mib);
    // The fleet's sensors, and ten of them for the reconnect storm.
    let devices = if [Scenario::Fleet, Scenario::Connects, Scenario::Reactions, Scenario::Flood]
        .iter()
        .any(|s| selected.contains(s))
    {
        plan.fleet_devices.max(10)
    } else {
        0
    };
    let (setup, setup_notes) =
        Setup::new(&hub_bin, !args.no_mosquitto && !args.twin, args.twin, guard_mib * 1024, devices)?;
    // The broker in the second column.
    let other = if args.twin { Kind::Twin } else { Kind::Mosquitto };
    // Whether `other` can run a scenario (Mosquitto: when installed, and it has no rules to react).
    let other_runs = |scenario: Scenario| match other {
        Kind::Mosquitto => setup.mosquitto.is_some() && scenario != Scenario::Reactions,
        Kind::Hub | Kind::Twin => true,
    };

    let mut report = Report::new(other);
    report.paired = args.rounds > 1;
    report.notes.extend(setup_notes);
    if args.hub_bin.is_none() {
        report.notes.extend(stale_binary_note(&hub_bin));
    }
    let header = header(&setup, &hub_bin, &plan, args.quick, guard_mib)?;

    let rounds = args.rounds.max(1);
    if rounds > 1 {
        report.notes.push(format!("Each figure is the median of {rounds} rounds; the brokers took turns."));
    }
    for (&scenario, round) in selected.iter().flat_map(|s| (1..=rounds).map(move |r| (s, r))) {
        if matches!(scenario, Scenario::Paced | Scenario::PacedOneCore) {
            // Both brokers at once, taking turns slice by slice.
            let kinds: Vec<Kind> =
                [Kind::Hub, other].into_iter().filter(|&k| k == Kind::Hub || other_runs(scenario)).collect();
            if !other_runs(scenario) {
                report.status.insert((scenario, other), Status::NotRun);
            }
            match rounds {
                1 => eprintln!("[both in turn] {} …", scenario.name()),
                _ => eprintln!("[both in turn] {}, round {round} of {rounds} …", scenario.name()),
            }
            let began = Instant::now();
            let limit = Duration::from_secs(1200);
            let result = match tokio::time::timeout(limit, paced_in_turns(&setup, &kinds, scenario, &plan)).await {
                Ok(r) => r,
                Err(_) => Err(anyhow!("did not finish within {limit:?}")),
            };
            match result {
                Ok(outcomes) => {
                    for (kind, outcome) in outcomes {
                        for m in &outcome.metrics {
                            eprintln!("    {}: {}: {}", kind.name(), m.label, format_number(m.value, m.decimals));
                        }
                        report.add(scenario, kind, outcome);
                    }
                    eprintln!("    ({:.1} s)", began.elapsed().as_secs_f64());
                }
                Err(e) => {
                    warn(&format!("{} failed: {e:#}", scenario.name()));
                    for &kind in &kinds {
                        report.status.insert((scenario, kind), Status::Failed);
                    }
                    report.notes.push(format!("{}: failed: {e:#}", scenario.name()));
                }
            }
            continue;
        }
        for kind in [Kind::Hub, other] {
            if kind != Kind::Hub && !other_runs(scenario) {
                report.status.insert((scenario, kind), Status::NotRun);
                continue;
            }
            match rounds {
                1 => eprintln!("[{}] {} …", kind.name(), scenario.name()),
                _ => eprintln!("[{}] {}, round {round} of {rounds} …", kind.name(), scenario.name()),
            }
            let began = Instant::now();
            let limit = Duration::from_secs(600);
            let result = match tokio::time::timeout(limit, measure(&setup, kind, scenario, &plan)).await {
                Ok(r) => r,
                Err(_) => Err(anyhow!("did not finish within {limit:?}")),
            };
            match result {
                Ok(outcome) => {
                    for m in &outcome.metrics {
                        eprintln!("    {}: {}", m.label, format_number(m.value, m.decimals));
                    }
                    eprintln!("    ({:.1} s)", began.elapsed().as_secs_f64());
                    report.add(scenario, kind, outcome);
                }
                Err(e) => {
                    warn(&format!("{} {} failed: {e:#}", kind.name(), scenario.name()));
                    report.status.insert((scenario, kind), Status::Failed);
                    report.notes.push(format!("{} / {}: failed: {e:#}", kind.name(), scenario.name()));
                }
            }
        }
    }

    println!("{header}");
    println!("{}", report.table());
    Ok(())
}

/// Runs one measurement against a freshly started broker of `kind`, which is killed afterwards.
async fn measure(setup: &Setup, kind: Kind, scenario: Scenario, plan: &Plan) -> Result<Outcome> {
    let mut broker: Broker = setup.start_on(kind, None)?;
    let target = target_of(setup, kind, &broker)?;
    let outcome = match scenario {
        Scenario::Qos0Tls => scenarios::one_to_one(&target, QoS::AtMostOnce, Transport::Tls, plan.messages).await,
        Scenario::Qos0Plain => scenarios::one_to_one(&target, QoS::AtMostOnce, Transport::Plain, plan.messages).await,
        Scenario::Qos1Tls => scenarios::one_to_one(&target, QoS::AtLeastOnce, Transport::Tls, plan.messages).await,
        Scenario::Qos1Plain => scenarios::one_to_one(&target, QoS::AtLeastOnce, Transport::Plain, plan.messages).await,
        Scenario::Fleet => {
            // The hub's store under the fleet: its own count of SQLite commits, and the bytes it wrote.
            let pid = broker.pid();
            let probe = move || -> Result<(u64, u64)> { Ok((setup.hub_store_commits()?, write_bytes_of(pid)?)) };
            let probe: Option<&(dyn Fn() -> Result<(u64, u64)> + Sync)> = (kind == Kind::Hub).then_some(&probe);
            scenarios::fleet(&target, plan.fleet_devices, plan.fleet_rate, plan.fleet_duration, probe).await
        }
        Scenario::Paced | Scenario::PacedOneCore => bail!("the paced load runs both brokers in turn"),
        Scenario::Reactions => {
            reactions::reactions(&target, plan.reaction_cycles, plan.fleet_devices, f64::from(plan.fleet_rate)).await
        }
        Scenario::Rss => scenarios::idle_clients(&mut broker, &target, plan.idle_clients, plan.idle_concurrency).await,
        Scenario::Connects => scenarios::connect_rate(&target, plan.connect_workers, plan.connect_duration).await,
        Scenario::Churn => logins::churn(&mut broker, &target, plan.churn_connects, 8, Duration::from_secs(12)).await,
        Scenario::Flood => {
            // A device with its token on the hub; Mosquitto has no device accounts, so the bench user.
            let id = broker::device_id(1);
            let device = match target.logins.get(&id) {
                Some(password) => (id.clone(), password.clone()),
                None => (broker::USER.to_owned(), setup.password.clone()),
            };
            logins::flood(&target, (&device.0, &device.1), plan.flood_logins, 100, 20).await
        }
    };
    // A broker that died during the run invalidates its figures.
    broker.check_alive()?;
    outcome
}

/// How the benchmark's clients reach `broker`, a broker of `kind`.
fn target_of(setup: &Setup, kind: Kind, broker: &Broker) -> Result<Target> {
    Ok(Target {
        tls: broker.tls,
        plain: broker.plain,
        tls_config: client::tls_config(&setup.ca)?,
        ca: setup.ca.clone(),
        user: broker::USER.to_owned(),
        password: setup.password.clone(),
        // Mosquitto has no device accounts: everyone logs in as the bench user there.
        logins: Arc::new(if kind.is_hub() { setup.device_passwords.clone() } else { HashMap::new() }),
        churn: match kind {
            Kind::Hub | Kind::Twin => (broker::CHURN_USER.to_owned(), setup.password.clone()),
            Kind::Mosquitto => (broker::USER.to_owned(), setup.password.clone()),
        },
    })
}

/// Slices each paced rate is cut into; the brokers take turns slice by slice.
const PACED_SLICES: u32 = 4;

/// How long the brokers are left alone before each paced rate: the hub unmaps its start-up code
/// 10 s after it is ready, and gives freed memory back at most 10 s after clients leave.
const SETTLES: Duration = Duration::from_millis(10_500);

/// The paced load against every broker of `kinds`, all started at once and loaded in turn: at
/// each rate, once the brokers have settled, every broker's clients connect and warm up, then
/// the rate's time is cut into [`PACED_SLICES`] slices and the brokers take turns at every slice
/// (the first to go alternates), so that a neighbour's load on a shared machine weighs on each
/// alike. A broker's figures are its slices added up.
async fn paced_in_turns(
    setup: &Setup,
    kinds: &[Kind],
    scenario: Scenario,
    plan: &Plan,
) -> Result<Vec<(Kind, Outcome)>> {
    let one_core = scenario == Scenario::PacedOneCore;
    let mut brokers = Vec::with_capacity(kinds.len());
    for &kind in kinds {
        let broker = setup.start_on(kind, one_core.then_some(BROKER_CPU))?;
        let target = target_of(setup, kind, &broker)?;
        brokers.push((kind, broker, target, Outcome::default()));
    }
    let _load = if one_core { Some(Confined::elsewhere(BROKER_CPU)?) } else { None };
    let label = if one_core { "1 core: " } else { "" };
    let (duration, rates) = plan.paced;
    for transport in [Transport::Plain, Transport::Tls] {
        for rate in rates {
            // The slowest rate runs longer, so that it adds up to as many messages as the CPU needs.
            let duration = if rate < 1_000 { duration * 2 } else { duration };
            let prefix = format!("{label}{rate} msg/s QoS1 {} 10→1 `#`", transport.name());
            // The hub settles after it starts (its start-up code unmapped) and after clients
            // leave (freed memory given back): a house's load is measured on a settled hub.
            tokio::time::sleep(SETTLES).await;
            let mut loads = Vec::with_capacity(brokers.len());
            for (_, broker, target, _) in &brokers {
                let slice = (duration / PACED_SLICES, PACED_SLICES);
                loads.push(scenarios::PacedLoad::connect(target, transport, 10, rate, slice, broker.pid()).await?);
            }
            for slice in 0..PACED_SLICES {
                for i in turns(slice, brokers.len()) {
                    let us = loads[i].slice().await?;
                    let kind = brokers[i].0.name();
                    eprintln!("    {prefix}, slice {} of {PACED_SLICES}, {kind}: {us:.1} µs/msg", slice + 1);
                }
            }
            for ((_, _, _, outcome), load) in brokers.iter_mut().zip(loads) {
                let rows = load.finish(&prefix).await?;
                outcome.metrics.extend(rows.metrics);
                outcome.notes.extend(rows.notes);
            }
        }
    }
    let mut outcomes = Vec::with_capacity(brokers.len());
    for (kind, mut broker, _, outcome) in brokers {
        // A broker that died during the run invalidates its figures.
        broker.check_alive()?;
        outcomes.push((kind, outcome));
    }
    Ok(outcomes)
}

/// Which broker goes when, in slice `slice` of `count` brokers: in order, then the other way round,
/// so that none is always the first after the others' load.
fn turns(slice: u32, count: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..count).collect();
    if slice % 2 == 1 {
        order.reverse();
    }
    order
}

/// The core a confined broker runs on.
const BROKER_CPU: usize = 0;

/// While alive, every thread of this benchmark runs on the cores other than one (`taskset -a -p`),
/// so that the load does not share the confined broker's core; dropping it gives them all back.
struct Confined {
    all: String,
}

impl Confined {
    fn elsewhere(cpu: usize) -> Result<Confined> {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        if cores < 2 {
            bail!("confining the broker to one core needs at least two");
        }
        let others: Vec<String> = (0..cores).filter(|&c| c != cpu).map(|c| c.to_string()).collect();
        let all = format!("0-{}", cores - 1);
        taskset(&others.join(","))?;
        Ok(Confined { all })
    }
}

impl Drop for Confined {
    fn drop(&mut self) {
        if let Err(e) = taskset(&self.all) {
            warn(&format!("could not give the benchmark its cores back: {e:#}"));
        }
    }
}

/// Sets the CPU list of every thread of this process. A thread that ends while taskset walks
/// the list makes it fail: it is tried again.
fn taskset(cpus: &str) -> Result<()> {
    let mut last = None;
    for _ in 0..5 {
        let status = Command::new("taskset")
            .args(["-a", "-p", "-c", cpus, &std::process::id().to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .context("running taskset (util-linux)")?;
        if status.success() {
            return Ok(());
        }
        last = Some(status);
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("taskset -a -p -c {cpus} failed 5 times (last: {})", last.map(|s| s.to_string()).unwrap_or_default())
}

/// Bytes process `pid` caused to be written to storage (`write_bytes` of `/proc/PID/io`).
fn write_bytes_of(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/io");
    let io = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no write_bytes in {path}"))
}

/// Half of MemAvailable, at most 8 GiB, in MiB: a broker that grows past it is killed.
fn default_guard_mib() -> u64 {
    let available_kib: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(2 * 1024 * 1024);
    (available_kib / 2 / 1024).clamp(256, 8 * 1024)
}

/// The hub binary to drive: `--hub-bin`, else the workspace's release build (built when missing).
fn hub_binary(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(path) = explicit {
        if !path.is_file() {
            bail!("--hub-bin {}: no such file", path.display());
        }
        return Ok(path.to_path_buf());
    }
    let workspace = workspace_dir();
    let target_dir = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace.join("target"), PathBuf::from);
    let bin = target_dir.join("release").join("domoticpi");
    if !bin.is_file() {
        eprintln!("{} is missing: building it (cargo build --release -p domoticpi) …", bin.display());
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut child = Command::new(cargo)
            .args(["build", "--release", "-p", "domoticpi"])
            .current_dir(&workspace)
            .spawn()
            .context("starting cargo build")?;
        let deadline = Instant::now() + Duration::from_secs(3600);
        let status = loop {
            if let Some(status) = child.try_wait().context("waiting for cargo build")? {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("cargo build did not finish within an hour");
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        if !status.success() || !bin.is_file() {
            bail!("cargo build --release -p domoticpi failed ({status})");
        }
    }
    Ok(bin)
}

/// The workspace root (this crate lives in `bench/`).
fn workspace_dir() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// A note when the hub binary is older than the hub's sources.
fn stale_binary_note(bin: &Path) -> Option<String> {
    let built = std::fs::metadata(bin).and_then(|m| m.modified()).ok()?;
    let workspace = workspace_dir();
    let newest = [workspace.join("src"), workspace.join("rules/src")].iter().filter_map(|d| newest_mtime(d)).max()?;
    (newest > built).then(|| {
        format!("{} is older than the hub's sources: rebuild with `cargo build --release -p domoticpi`", bin.display())
    })
}

/// Latest modification time of the files under `dir`.
fn newest_mtime(dir: &Path) -> Option<SystemTime> {
    let mut newest = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let time = if path.is_dir() { newest_mtime(&path) } else { entry.metadata().and_then(|m| m.modified()).ok() };
        newest = newest.max(time);
    }
    newest
}

/// The lines above the table: machine, versions, binary size, what was run.
fn header(setup: &Setup, hub_bin: &Path, plan: &Plan, quick: bool, guard_mib: u64) -> Result<String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name") || l.starts_with("Model"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown CPU", |(_, v)| v.trim());
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let os = std::fs::read_to_string("/etc/os-release")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_owned())
        .unwrap_or_default();
    let mem_kib: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    // Other work on the machine skews every figure: show how busy it was when the run began.
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    let size = std::fs::metadata(hub_bin).with_context(|| format!("reading {}", hub_bin.display()))?.len();
    let mosquitto = match (&setup.mosquitto, setup.has_twin()) {
        (Some(m), _) => m.version.clone(),
        (None, true) => "not run: its column is a second hub of the same binary (--twin)".to_owned(),
        (None, false) => "not run".to_owned(),
    };

    let mut h = String::new();
    let _ = writeln!(h, "DomoticPi benchmark ({} run)", if quick { "quick" } else { "full" });
    let _ = writeln!(
        h,
        "machine:   {cores} × {model}, {:.1} GiB RAM, Linux {}, {os}",
        mem_kib as f64 / 1024.0 / 1024.0,
        kernel.trim()
    );
    let _ = writeln!(h, "load avg:  {} (1, 5, 15 min) when the run began", load.join(" "));
    let _ =
        writeln!(h, "hub:       {} — {} ({:.1} MiB, {size} bytes)", setup.hub_version()?, hub_bin.display(), mib(size));
    let _ = writeln!(h, "mosquitto: {mosquitto}");
    let _ = writeln!(
        h,
        "load:      1→1: {} messages of {} B, back to back (QoS1: rumqttc inflight 100)",
        format_number(plan.messages as f64, 0),
        scenarios::PAYLOAD_BYTES
    );
    let _ = writeln!(
        h,
        "           fleet: {} motion sensors (declared on the hub, device logins), retained QoS1 JSON states, \
         {} msg/s in all for {} s",
        plan.fleet_devices,
        format_number(f64::from(plan.fleet_rate), 0),
        plan.fleet_duration.as_secs()
    );
    let _ = writeln!(
        h,
        "           idle: {} TLS clients (bench user), {} connecting at once; connects: {} devices for {} s",
        format_number(plan.idle_clients as f64, 0),
        plan.idle_concurrency,
        plan.connect_workers,
        plan.connect_duration.as_secs()
    );
    let _ = writeln!(
        h,
        "           paced: 10 publishers on bench/pace/N (no rule reads them), QoS1 64 B, to one `#` subscriber, \
         {} s per rate ({} s at 100 msg/s) in {PACED_SLICES} slices after a settling and a warm-up, both brokers running and taking turns \
         at each; broker CPU around each slice: every thread's on-CPU ns (/proc/PID/task/*/sched), or \
         /proc/PID/stat ticks where missing",
        plan.paced.0.as_secs(),
        plan.paced.0.as_secs() * 2
    );
    let _ = writeln!(
        h,
        "           1 core: each broker started under `taskset -c {BROKER_CPU}` (one loaded at a time), the benchmark's \
         threads moved to the other cores"
    );
    let _ = writeln!(h, "guard:     a broker is killed if its RSS passes {} MiB", format_number(guard_mib as f64, 0));
    Ok(h)
}

/// Bytes to MiB.
fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1024.0 / 1024.0
}

/// Whether a broker's part of a scenario ran.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Status {
    Ok,
    Failed,
    NotRun,
}

/// One table row: a metric with a value per broker.
struct Row {
    scenario: Scenario,
    label: String,
    decimals: usize,
    /// Each round's value, per broker; the table shows their median.
    values: HashMap<Kind, Vec<f64>>,
    /// Brokers whose value is flagged (printed with `*`, explained in the notes).
    flagged: Vec<Kind>,
}

/// The middle value (the mean of the two middle ones for an even count); 0 for none.
fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// Everything measured, in order, plus notes.
struct Report {
    /// The broker in the second column, beside the hub.
    other: Kind,
    /// Whether to add the median of the rounds' own ratios, each round's hub figure over the other
    /// broker's in that round: it holds when the machine's speed drifts from round to round,
    /// where the ratio of the two medians compares different moments.
    paired: bool,
    rows: Vec<Row>,
    status: HashMap<(Scenario, Kind), Status>,
    notes: Vec<String>,
}

impl Report {
    fn new(other: Kind) -> Report {
        Report { other, paired: false, rows: Vec::new(), status: HashMap::new(), notes: Vec::new() }
    }

    /// Files one broker's outcome of one scenario.
    fn add(&mut self, scenario: Scenario, kind: Kind, outcome: Outcome) {
        self.status.insert((scenario, kind), Status::Ok);
        for m in outcome.metrics {
            let i = self.rows.iter().position(|r| r.label == m.label).unwrap_or_else(|| {
                let values = HashMap::new();
                self.rows.push(Row {
                    scenario,
                    label: m.label.clone(),
                    decimals: m.decimals,
                    values,
                    flagged: Vec::new(),
                });
                self.rows.len() - 1
            });
            self.rows[i].values.entry(kind).or_default().push(m.value);
            if let Some(flag) = m.flag {
                self.rows[i].flagged.push(kind);
                self.note(format!("* {}, {}: {flag}", kind.name(), m.label));
            }
        }
        for n in outcome.notes {
            self.note(format!("{}: {n}", kind.name()));
        }
    }

    /// Adds a note once, however many rounds make it.
    fn note(&mut self, note: String) {
        if !self.notes.contains(&note) {
            self.notes.push(note);
        }
    }

    /// The table (Markdown, aligned) and the notes under it.
    fn table(&self) -> String {
        let other = self.other;
        let mut lines =
            vec![vec!["metric".to_owned(), "hub".to_owned(), other.name().to_owned(), format!("hub/{}", other.name())]];
        if self.paired {
            lines[0].push("per round".to_owned());
        }
        for row in &self.rows {
            let value = |kind: Kind| row.values.get(&kind).map(|v| median(v));
            let cell = |kind: Kind| match value(kind) {
                Some(v) if row.flagged.contains(&kind) => format!("{}*", format_number(v, row.decimals)),
                Some(v) => format_number(v, row.decimals),
                None => match self.status.get(&(row.scenario, kind)) {
                    Some(Status::Failed) => "error".to_owned(),
                    Some(Status::NotRun) => "n/a".to_owned(),
                    _ => "—".to_owned(),
                },
            };
            let ratio = match (value(Kind::Hub), value(other)) {
                (Some(h), Some(m)) if m > 0.0 => format!("{:.2}", h / m),
                _ => "—".to_owned(),
            };
            let mut line = vec![row.label.clone(), cell(Kind::Hub), cell(other), ratio];
            if self.paired {
                line.push(match (row.values.get(&Kind::Hub), row.values.get(&other)) {
                    (Some(h), Some(o)) if h.len() == o.len() && o.iter().all(|&v| v > 0.0) => {
                        let ratios: Vec<f64> = h.iter().zip(o).map(|(h, o)| h / o).collect();
                        format!("{:.2}", median(&ratios))
                    }
                    _ => "—".to_owned(),
                });
            }
            lines.push(line);
        }
        let width = |i: usize| lines.iter().map(|l| l[i].chars().count()).max().unwrap_or(0);
        let columns = lines[0].len();
        let widths: Vec<usize> = (0..columns).map(width).collect();
        let pad = |s: &str, w: usize, right: bool| {
            let fill = " ".repeat(w.saturating_sub(s.chars().count()));
            if right {
                format!("{fill}{s}")
            } else {
                format!("{s}{fill}")
            }
        };
        let mut out = String::new();
        for (n, l) in lines.iter().enumerate() {
            let cells: Vec<String> = (0..columns).map(|i| pad(&l[i], widths[i], i > 0)).collect();
            let _ = writeln!(out, "| {} |", cells.join(" | "));
            if n == 0 {
                // Markdown: the metric column left-aligned, the numbers right-aligned.
                let rule: Vec<String> = (0..columns)
                    .map(|i| if i == 0 { "-".repeat(widths[i] + 2) } else { format!("{}:", "-".repeat(widths[i] + 1)) })
                    .collect();
                let _ = writeln!(out, "|{}|", rule.join("|"));
            }
        }
        if self.rows.is_empty() {
            out.push_str("(no measurement succeeded)\n");
        }
        out.push_str(
            "\nHigher is better for msgs/s and connects/s; lower for latency, lost messages and RSS.\n\
             Latency: publish() call to receipt by the subscriber, on one clock. Each measurement runs on a\n\
             freshly started broker; clients use TCP_NODELAY and full TLS 1.3 handshakes (no resumption).\n\
             Logging: hub at warn, Mosquitto at error. Logins: on the hub, devices (fleet, connects) use their\n\
             hub-issued token (salted SHA-256) and the bench user argon2id; on Mosquitto, its password file.\n",
        );
        if !self.notes.is_empty() {
            out.push_str("\nNotes:\n");
            for n in &self.notes {
                let _ = writeln!(out, "- {n}");
            }
        }
        out
    }
}

/// `value` with `decimals` digits and thousands separators (1,234,567.89).
fn format_number(value: f64, decimals: usize) -> String {
    let text = format!("{:.*}", decimals, value.abs());
    let (int, frac) = text.split_once('.').map_or((text.as_str(), None), |(i, f)| (i, Some(f)));
    let mut grouped = String::new();
    for (i, c) in int.chars().enumerate() {
        if i > 0 && (int.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(c);
    }
    let sign = if value < 0.0 { "-" } else { "" };
    match frac {
        Some(f) => format!("{sign}{grouped}.{f}"),
        None => format!("{sign}{grouped}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_figure_over_rounds_is_their_median() {
        assert_eq!(median(&[]), 0.0);
        assert_eq!(median(&[3.0]), 3.0);
        assert_eq!(median(&[90.0, 30.0, 31.0]), 31.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 100.0]), 3.0);
    }

    #[test]
    fn brokers_take_turns_and_the_first_to_go_alternates() {
        let order: Vec<Vec<usize>> = (0..4).map(|slice| turns(slice, 2)).collect();
        assert_eq!(order, [vec![0, 1], vec![1, 0], vec![0, 1], vec![1, 0]]);
        assert_eq!(turns(1, 1), [0]);
    }

    #[test]
    fn an_a_a_run_puts_the_twin_in_the_second_column() {
        let mut report = Report::new(Kind::Twin);
        for (kind, value) in [(Kind::Hub, 3.0), (Kind::Twin, 4.0)] {
            let mut outcome = Outcome::default();
            outcome.push("row", value, 1);
            report.add(Scenario::Paced, kind, outcome);
        }
        let table = report.table();
        let header = table.lines().next().unwrap_or_default();
        assert!(header.contains(" twin ") && header.contains(" hub/twin "), "{table}");
        assert!(table.lines().any(|l| l.starts_with("| row") && l.ends_with(" 0.75 |")), "{table}");
    }

    #[test]
    fn with_rounds_the_table_adds_the_median_of_each_rounds_ratio() {
        let mut report = Report::new(Kind::Mosquitto);
        report.paired = true;
        // The machine slows down in the last two rounds: the medians compare different moments.
        for (hub, other) in [(10.0, 14.0), (14.0, 12.0), (16.0, 13.0), (19.0, 22.0), (19.0, 21.0)] {
            for (kind, value) in [(Kind::Hub, hub), (Kind::Mosquitto, other)] {
                let mut outcome = Outcome::default();
                outcome.push("row", value, 1);
                report.add(Scenario::Paced, kind, outcome);
            }
        }
        let table = report.table();
        assert!(table.lines().next().unwrap_or_default().ends_with(" per round |"), "{table}");
        // Medians 16 / 14 = 1.14; each round's ratio 0.71, 1.17, 1.23, 0.86, 0.90: median 0.90.
        assert!(table.lines().any(|l| l.starts_with("| row") && l.ends_with(" 1.14 |      0.90 |")), "{table}");
    }

    #[test]
    fn a_note_made_in_every_round_is_kept_once() {
        let mut report = Report::new(Kind::Mosquitto);
        for value in [1.0, 5.0, 2.0] {
            let mut outcome = Outcome::default();
            outcome.push("row", value, 1);
            outcome.notes.push("the same note".into());
            report.add(Scenario::Paced, Kind::Hub, outcome);
        }
        assert_eq!(report.notes, ["hub: the same note"]);
        let table = report.table();
        assert!(table.lines().any(|l| l.starts_with("| row") && l.contains(" 2.0 ")), "{table}");
    }
}
