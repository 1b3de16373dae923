//! `domoticpi-house`: plays a small house against a running DomoticPi hub, or loads it.
//!
//! Only wiring: parse the command line, check the options in one place ([`Plan::from_args`]), get the
//! devices' credentials, run [`domoticpi_house::play`] or [`domoticpi_house::run_load`] until Ctrl-C,
//! SIGTERM or `--duration`, print what happens, and map the outcome to an exit code.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use clap::Parser;
use domoticpi_house::{
    default_hub_bin, issue_creds, play, probe, read_creds_file, run_load, Creds, Device, Error, Happening, House,
    LoadPlan, LoadStats, PlayOptions,
};
use tokio_util::sync::CancellationToken;

/// The command line as typed.
#[derive(Parser)]
#[command(
    name = "domoticpi-house",
    version,
    about = "Plays a small house against a running DomoticPi hub: motion, doors, buttons, readings and alarm \
             drills, printing each thing that happens, so you can watch the rules work.",
    after_help = "Credentials: for every device it plays, it runs `domoticpi --config CONFIG device creds ID`, \
                  which issues a NEW password and revokes the old one. Fine for a simulated house; never point it \
                  at a config whose devices are real. With --creds-dir it reads saved output instead.\n\n\
                  Load mode (--devices N --rate R): the first N sensors (motion, contact, lux, temperature) publish \
                  retained QoS 1 states at R messages per second in total, each with \"seq\" and \"t\" (Unix ns), \
                  and a line per second shows sent, acknowledged and errors."
)]
struct Args {
    /// The hub's config file; the devices to play are read from it.
    #[arg(long, env = "DOMOTICPI_CONFIG", value_name = "PATH")]
    config: PathBuf,
    /// The hub binary that issues credentials. Default: `domoticpi` next to this program, else on PATH.
    #[arg(long, value_name = "PATH")]
    hub_bin: Option<PathBuf>,
    /// Read each device's credentials from DIR/ID.txt (saved `device creds` output) instead of issuing them.
    #[arg(long, value_name = "DIR")]
    creds_dir: Option<PathBuf>,
    /// A user's alarm code (`domoticpi user pin NAME`). With a keypad declared, runs an alarm drill every
    /// couple of minutes.
    #[arg(long, value_name = "CODE")]
    code: Option<String>,
    /// Pace of the story: 2 makes things happen twice as often. The hub's own delays are unchanged.
    #[arg(long, value_name = "X", default_value_t = 1.0)]
    speed: f64,
    /// Seed of the story's random choices (printed at start; the same seed replays the same story).
    #[arg(long, value_name = "N")]
    seed: Option<u64>,
    /// Stop after this many seconds. Default: run until Ctrl-C.
    #[arg(long, value_name = "SECS")]
    duration: Option<f64>,
    /// Load mode: how many sensor devices publish.
    #[arg(long, value_name = "N", requires = "rate")]
    devices: Option<usize>,
    /// Load mode: messages per second, all devices together.
    #[arg(long, value_name = "MSGS_PER_S", requires = "devices")]
    rate: Option<f64>,
}

/// What to do, checked.
struct Plan {
    /// The hub's config file.
    config: PathBuf,
    /// What was read from it.
    house: House,
    /// How devices get their credentials.
    creds: CredsSource,
    /// How long to run; `None` until a signal.
    duration: Option<Duration>,
    /// Story or load.
    mode: Mode,
}

/// Where credentials come from.
enum CredsSource {
    /// Run `HUB --config CONFIG device creds ID`.
    Issue { hub_bin: PathBuf },
    /// Read `DIR/ID.txt`.
    Saved { dir: PathBuf },
}

/// Story or load.
enum Mode {
    /// Play a day at home.
    Story { speed: f64, seed: u64, code: Option<String> },
    /// Publish at a rate with the first `devices` sensors.
    Load { devices: usize, rate: f64 },
}

impl Plan {
    /// Validates the arguments and reads the config.
    fn from_args(args: Args) -> Result<Plan> {
        let duration = match args.duration {
            None => None,
            Some(secs) if secs.is_finite() && secs > 0.0 && secs < 1e9 => Some(Duration::from_secs_f64(secs)),
            Some(secs) => bail!("--duration must be a positive number of seconds (got {secs})"),
        };
        let mode = match (args.devices, args.rate) {
            (Some(devices), Some(rate)) => {
                if devices == 0 {
                    bail!("--devices must be at least 1");
                }
                if !(rate.is_finite() && rate >= domoticpi_house::load::MIN_RATE) {
                    bail!(
                        "--rate must be at least {} messages per second (got {rate})",
                        domoticpi_house::load::MIN_RATE
                    );
                }
                Mode::Load { devices, rate }
            }
            _ => {
                let speed = args.speed;
                if !(speed.is_finite() && speed > 0.0 && speed <= domoticpi_house::story::MAX_SPEED) {
                    bail!("--speed must be above 0 and at most {} (got {speed})", domoticpi_house::story::MAX_SPEED);
                }
                if let Some(code) = &args.code {
                    if !(4..=8).contains(&code.len()) || !code.bytes().all(|b| b.is_ascii_digit()) {
                        bail!("--code must be 4 to 8 digits, a user's alarm code");
                    }
                }
                let seed = args.seed.unwrap_or_else(|| {
                    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
                });
                Mode::Story { speed, seed, code: args.code }
            }
        };
        let house = House::from_path(&args.config)?;
        let creds = match args.creds_dir {
            Some(dir) => CredsSource::Saved { dir },
            None => CredsSource::Issue { hub_bin: args.hub_bin.unwrap_or_else(default_hub_bin) },
        };
        Ok(Plan { config: args.config, house, creds, duration, mode })
    }

    /// The devices to play.
    fn devices(&self) -> Result<Vec<Device>> {
        let devices: Vec<Device> = match self.mode {
            Mode::Load { devices, .. } => self.house.load_sensors(devices)?.into_iter().cloned().collect(),
            Mode::Story { .. } => self.house.story_devices().into_iter().cloned().collect(),
        };
        if devices.is_empty() {
            return Err(Error::NoDevices.into());
        }
        Ok(devices)
    }

    /// The command that starts the hub on this config, for messages.
    fn start_command(&self) -> String {
        let hub = match &self.creds {
            CredsSource::Issue { hub_bin } => hub_bin.display().to_string(),
            CredsSource::Saved { .. } => "domoticpi".to_owned(),
        };
        format!("{hub} --config {} run", self.config.display())
    }

    /// Rewords "hub not running" with the exact command to start it.
    fn explain(&self, error: Error) -> anyhow::Error {
        match error {
            Error::HubNotRunning { addr } => anyhow::anyhow!(
                "no hub answers at {addr} (connection refused): is the hub running? Start it in another terminal \
                 with `{}`",
                self.start_command()
            ),
            other => other.into(),
        }
    }

    /// Gets every device's credentials; `None` if `stop` came first.
    fn credentials(&self, devices: &[Device], stop: &CancellationToken) -> Result<Option<Vec<Creds>>> {
        if let CredsSource::Issue { .. } = self.creds {
            println!("issuing credentials for {} devices (new passwords)…", devices.len());
        }
        let mut all = Vec::with_capacity(devices.len());
        for device in devices {
            if stop.is_cancelled() {
                return Ok(None);
            }
            let creds = match &self.creds {
                CredsSource::Issue { hub_bin } => issue_creds(hub_bin, &self.config, &device.id),
                CredsSource::Saved { dir } => read_creds_file(dir, &device.id),
            };
            all.push(creds.map_err(|e| self.explain(e))?);
        }
        Ok(Some(all))
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("domoticpi-house: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let plan = Plan::from_args(Args::parse())?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting tokio")?;
    // Listening from the start: a Ctrl-C while credentials are issued ends the run cleanly too.
    let stop = CancellationToken::new();
    runtime.spawn(cancel_on_signal(stop.clone()));
    // Before any password is re-issued: a stopped hub is said plainly, and its devices keep their passwords.
    if let (CredsSource::Issue { .. }, Some(addr)) = (&plan.creds, plan.house.local_hub_addr()) {
        runtime.block_on(probe(addr)).map_err(|e| plan.explain(e))?;
    }
    let devices = plan.devices()?;
    let Some(creds) = plan.credentials(&devices, &stop)? else { return Ok(()) };
    let endpoint = match creds.first() {
        Some(c) => c.endpoint(),
        None => return Err(Error::NoDevices.into()),
    };
    let logins: Vec<_> = devices.iter().zip(&creds).map(|(d, c)| (c.login(d), d.zone)).collect();
    runtime.block_on(async {
        match plan.mode {
            Mode::Story { speed, seed, ref code } => {
                let opts = PlayOptions {
                    speed,
                    seed,
                    code: code.clone(),
                    duration: plan.duration,
                    alarm: plan.house.alarm,
                    causes: plan.house.causes.clone(),
                };
                if code.is_none() {
                    println!("(no --code: no alarm drills; give a user's alarm code to watch one)");
                }
                let clock = Clock::new(plan.house.timezone.as_deref());
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
                let game = tokio::spawn(async move { play(&endpoint, logins, opts, tx, stop).await });
                while let Some(happening) = rx.recv().await {
                    println!("{}", clock.line(&happening));
                }
                game.await.context("the house stopped unexpectedly")?.map_err(|e| plan.explain(e))
            }
            Mode::Load { rate, .. } => {
                let logins = logins.into_iter().map(|(login, _)| login).collect();
                let stats = Arc::new(LoadStats::default());
                let load_plan = LoadPlan { rate, duration: plan.duration };
                let ticker = tokio::spawn(report_every_second(Arc::clone(&stats)));
                let started = Instant::now();
                let result = run_load(&endpoint, logins, load_plan, Arc::clone(&stats), stop).await;
                ticker.abort();
                let (sent, acked, errors) = stats.snapshot();
                let secs = started.elapsed().as_secs_f64();
                println!(
                    "done: {sent} sent, {acked} acknowledged, {errors} errors in {secs:.1} s ({:.0} msg/s acknowledged)",
                    acked as f64 / secs.max(1e-9)
                );
                result.map_err(|e| plan.explain(e))
            }
        }
    })
}

/// Prints one line per second: totals and the last second's rate.
async fn report_every_second(stats: Arc<LoadStats>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut before = stats.snapshot();
    loop {
        tick.tick().await;
        let now = stats.snapshot();
        println!(
            "sent {} (+{}/s)  acknowledged {} (+{}/s)  errors {}",
            now.0,
            now.0 - before.0,
            now.1,
            now.1 - before.1,
            now.2
        );
        before = now;
    }
}

/// Cancels `stop` on Ctrl-C or SIGTERM.
async fn cancel_on_signal(stop: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    stop.cancel();
}

/// Formats happenings with the wall-clock time in the house's time zone.
struct Clock {
    /// `[house] timezone`, or UTC (as the hub does) when absent or unknown.
    zone: jiff::tz::TimeZone,
}

impl Clock {
    fn new(name: Option<&str>) -> Clock {
        let zone = name.and_then(|n| jiff::tz::TimeZone::get(n).ok()).unwrap_or(jiff::tz::TimeZone::UTC);
        Clock { zone }
    }

    /// `14:02:11.204 hall-motion     → motion`.
    fn line(&self, h: &Happening) -> String {
        let time = jiff::Timestamp::try_from(h.at)
            .map(|t| t.to_zoned_datetime(self.zone.clone()).strftime("%H:%M:%S%.3f").to_string())
            .unwrap_or_else(|_| "--:--:--.---".to_owned());
        format!("{time} {}", h.text())
    }
}
