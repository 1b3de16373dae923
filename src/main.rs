//! `domoticpi`: parse the command line, run the command, map the outcome to an exit code.

use std::process::ExitCode;

use clap::Parser as _;
use domoticpi::cli::{self, Cli, Command};
use domoticpi::{hub, logging};
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, each cause once: most of the hub's errors already say
/// their cause in their own message.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.is_empty() {
            line = text;
        } else if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
    }
    line
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    let config = cli::load_config(cli)?;
    match cli.command {
        Command::Run => {
            keep_large_blocks_out_of_the_heap();
            logging::init(&config.log_level);
            // One thread for every session, the rules and the web app, beside rumqttd's router
            // thread, the store's and the password checks': each message then crosses two threads
            // instead of bouncing between workers (measured in BENCHMARKS.md, "At a house's load").
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(async {
                let listeners = hub::Listeners::bind(&config).await?;
                let shutdown = CancellationToken::new();
                tokio::spawn(signals(shutdown.clone(), config.clone()));
                hub::run(config, listeners, shutdown).await?;
                Ok(())
            })
        }
        _ => cli::execute(cli, &config),
    }
}

/// Pins glibc's mmap threshold at its default, 128 KiB.
///
/// glibc otherwise raises the threshold to the size of the largest block freed (up to 32 MiB):
/// after the first argon2id check (a 19 MiB block), every later one is carved from the heap arenas,
/// written in full, and stays resident once freed. With 1,000 idle TLS clients logged in with a
/// password that was about 210 MiB of the hub's 270 MiB RSS; with the threshold pinned, 61 MiB.
/// The cost: each check maps fresh pages (logins measured 15–25 % slower; device tokens are unaffected).
fn keep_large_blocks_out_of_the_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; it runs before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

/// Cancels `shutdown` on SIGTERM or Ctrl-C; on SIGHUP asks the hub, through its control socket as
/// `domoticpi reload` does, to apply the config file (the hub logs the outcome).
async fn signals(shutdown: CancellationToken, config: domoticpi::config::Config) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut hup)) = (signal(SignalKind::terminate()), signal(SignalKind::hangup())) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM received"); break; }
            _ = tokio::signal::ctrl_c() => { tracing::info!("interrupt received"); break; }
            _ = hup.recv() => {
                tracing::info!("SIGHUP received: reloading the config");
                let data_dir = config.data_dir.clone();
                let asked = tokio::task::spawn_blocking(move || {
                    domoticpi::control::request(&data_dir, &domoticpi::control::Request::Reload)
                });
                if let Ok(Err(e)) = asked.await {
                    tracing::error!(error = %e, "SIGHUP: could not reach the hub's control socket; nothing reloaded");
                }
            }
        }
    }
    shutdown.cancel();
}
