//! Logging: one line per event on stderr, through `tracing`.
//!
//! Under systemd (`JOURNAL_STREAM` set) lines carry no time stamp: journald adds its own. The
//! filter is `RUST_LOG` when set, else the config's `log_level`: a level, or a level and
//! `target=level` directives ([`filter`]); rumqttd's own logs are kept to
//! warnings, as it reports ordinary disconnects as errors, and its "no-connection id N is already
//! gone" is dropped: it is logged at ERROR when a link's last wake-up reaches the router after the
//! link's own DISCONNECT, whose data the router had already taken (nothing is lost). A second layer
//! watches rumqttd for subscribers it had to skip ahead ([`crate::broker::lag`]), whatever the log
//! filter.

use std::io::IsTerminal;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Metadata};
use tracing_subscriber::filter::{FilterExt as _, Targets};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::layer::{Context, Filter};
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::Layer as _;

use crate::broker::lag::LagLayer;

/// Parses a log filter: `info`, or `info,domoticpi::broker=debug` (comma-separated, a bare level
/// for every target, `target=level` for a target and the modules under it; the longest match wins).
/// Span and field filters are not taken (they would compile a regex engine into the binary).
pub fn filter(text: &str) -> Result<Targets, String> {
    // A bare word would otherwise name a target to log at every level: a mistyped level.
    let levels = ["off", "error", "warn", "info", "debug", "trace"];
    if let Some(word) = text
        .split(',')
        .map(str::trim)
        .find(|d| !d.is_empty() && !d.contains('=') && !levels.contains(&d.to_ascii_lowercase().as_str()))
    {
        return Err(format!("{word:?} is not a level"));
    }
    text.parse::<Targets>().map_err(|e| e.to_string())
}

/// Installs the global subscriber; a second call does nothing.
pub fn init(log_level: &str) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|f| filter(&f).ok())
        .or_else(|| filter(&format!("{log_level},rumqttd=warn")).ok())
        .unwrap_or_else(|| Targets::new().with_default(Level::INFO).with_target("rumqttd", Level::WARN));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal());
    let fmt = if std::env::var_os("JOURNAL_STREAM").is_some() { fmt.without_time().boxed() } else { fmt.boxed() };
    let lag = LagLayer.with_filter(Targets::new().with_target("rumqttd::router", Level::INFO));
    let _ = tracing_subscriber::registry().with(fmt.with_filter(filter.and(QuietRouter))).with(lag).try_init();
}

/// Drops rumqttd's benign "no-connection id N is already gone" (see the module docs).
struct QuietRouter;

impl<S> Filter<S> for QuietRouter {
    fn enabled(&self, _meta: &Metadata<'_>, _cx: &Context<'_, S>) -> bool {
        true
    }

    fn event_enabled(&self, event: &Event<'_>, _cx: &Context<'_, S>) -> bool {
        if !event.metadata().target().starts_with("rumqttd::router") {
            return true;
        }
        let mut benign = AlreadyGone(false);
        event.record(&mut benign);
        !benign.0
    }
}

/// Whether an event's message is the router's "… is already gone".
struct AlreadyGone(bool);

impl Visit for AlreadyGone {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let text = format!("{value:?}");
            self.0 = text.starts_with("no-connection id ") && text.ends_with(" is already gone");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Collects what the fmt layer writes.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_routers_already_gone_is_dropped_and_its_other_errors_kept() {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let fmt = tracing_subscriber::fmt::layer().with_writer(move || writer.clone()).with_ansi(false);
        let filter = super::filter("info,rumqttd=warn").unwrap().and(QuietRouter);
        let subscriber = tracing_subscriber::registry().with(fmt.with_filter(filter));
        tracing::subscriber::with_default(subscriber, || {
            tracing::error!(target: "rumqttd::router::routing", "no-connection id {} is already gone", 8);
            tracing::error!(target: "rumqttd::router::routing", "something else went wrong");
            tracing::error!(target: "domoticpi::hub", "no-connection id 3 is already gone");
            tracing::info!(target: "rumqttd::router::routing", "below the filter");
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        assert!(!text.contains("id 8 is already gone"), "{text}");
        assert!(text.contains("something else went wrong"), "{text}");
        assert!(text.contains("id 3 is already gone"), "only rumqttd's own is dropped: {text}");
        assert!(!text.contains("below the filter"), "{text}");
    }
}
