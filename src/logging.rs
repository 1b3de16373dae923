//! Logging: one line per event on stderr, through `tracing`.
//!
//! Under systemd (`JOURNAL_STREAM` set) lines carry no time stamp: journald adds its own. The
//! filter is `RUST_LOG` when set, else the config's `log_level`; rumqttd's own logs are kept to
//! warnings, as it reports ordinary disconnects as errors.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber; a second call does nothing.
pub fn init(log_level: &str) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new(format!("{log_level},rumqttd=warn")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal());
    let result = if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.without_time().try_init()
    } else {
        builder.try_init()
    };
    drop(result);
}
