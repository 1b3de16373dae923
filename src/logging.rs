//! Logging: one line per event on stderr, through `tracing`.
//!
//! Under systemd (`JOURNAL_STREAM` set) lines carry no time stamp: journald adds its own. The
//! filter is `RUST_LOG` when set, else the config's `log_level`; rumqttd's own logs are kept to
//! warnings, as it reports ordinary disconnects as errors. A second layer watches rumqttd for
//! subscribers it had to skip ahead ([`crate::broker::lag`]), whatever the log filter.

use std::io::IsTerminal;

use tracing::Level;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

use crate::broker::lag::LagLayer;

/// Installs the global subscriber; a second call does nothing.
pub fn init(log_level: &str) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new(format!("{log_level},rumqttd=warn")));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal());
    let fmt = if std::env::var_os("JOURNAL_STREAM").is_some() { fmt.without_time().boxed() } else { fmt.boxed() };
    let lag = LagLayer.with_filter(Targets::new().with_target("rumqttd::router", Level::INFO));
    let _ = tracing_subscriber::registry().with(fmt.with_filter(filter)).with(lag).try_init();
}
