//! Detects subscribers that read slower than the router keeps messages.
//!
//! rumqttd keeps a bounded log per subscription filter; a reader that falls further behind has its
//! cursor moved to the head, silently skipping messages (QoS 1 included). The only trace is a
//! WARN event inside the router's `outgoing_publish{client_id}` span. [`LagLayer`] is a tracing
//! layer that recognises that event and reports the client id on a process-wide channel; a clean
//! session's full mailbox ([`super::local`]) is reported to its own hub. The hub logs the first
//! loss per client and keeps counts in the database for `domoticpi status`.

use std::sync::{Mutex, OnceLock};

use tokio::sync::mpsc;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// The router span that names the client a forward is for.
const SPAN: &str = "outgoing_publish";

/// A field only the router's cursor-jump warning carries.
const JUMP_FIELD: &str = "start_cursor";

struct Channel {
    tx: mpsc::UnboundedSender<String>,
    rx: Mutex<Option<mpsc::UnboundedReceiver<String>>>,
}

fn channel() -> &'static Channel {
    static CHANNEL: OnceLock<Channel> = OnceLock::new();
    CHANNEL.get_or_init(|| {
        let (tx, rx) = mpsc::unbounded_channel();
        Channel { tx, rx: Mutex::new(Some(rx)) }
    })
}

/// The stream of client ids the router skipped ahead; only the first caller gets it.
pub fn skipped_clients() -> Option<mpsc::UnboundedReceiver<String>> {
    channel().rx.lock().ok()?.take()
}

/// Reports one skip-ahead (used by the layer, and by tests).
pub fn report(client: &str) {
    let _ = channel().tx.send(client.to_owned());
}

/// Set by the fault switch ([`crate::health::Fault::Router`]): the router thread stops at its next
/// span (the next packet it handles), for good.
static STALL: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Stalls the router thread at the next packet it handles (the health fault switch; never in normal use).
pub fn stall_router() {
    STALL.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// The tracing layer; install it with a filter that passes rumqttd's INFO spans and WARN events.
#[derive(Debug, Default)]
pub struct LagLayer;

/// The client id recorded on a router span.
struct ClientId(String);

struct ClientIdVisitor(Option<String>);

impl Visit for ClientIdVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "client_id" {
            self.0 = Some(value.to_owned());
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "client_id" {
            self.0 = Some(format!("{value:?}").trim_matches('"').to_owned());
        }
    }
}

struct JumpVisitor(bool);

impl Visit for JumpVisitor {
    fn record_debug(&mut self, field: &Field, _: &dyn std::fmt::Debug) {
        self.0 |= field.name() == JUMP_FIELD;
    }
}

impl<S> Layer<S> for LagLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        if STALL.load(std::sync::atomic::Ordering::Relaxed) {
            loop {
                std::thread::park();
            }
        }
        if attrs.metadata().name() != SPAN {
            return;
        }
        let mut visitor = ClientIdVisitor(None);
        attrs.record(&mut visitor);
        if let (Some(client), Some(span)) = (visitor.0, ctx.span(id)) {
            span.extensions_mut().insert(ClientId(client));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let meta = event.metadata();
        if *meta.level() != Level::WARN || !meta.target().starts_with("rumqttd") {
            return;
        }
        let mut visitor = JumpVisitor(false);
        event.record(&mut visitor);
        if !visitor.0 {
            return;
        }
        let Some(scope) = ctx.event_scope(event) else { return };
        for span in scope {
            if let Some(ClientId(client)) = span.extensions().get::<ClientId>() {
                report(client);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt as _;

    #[test]
    fn a_router_cursor_jump_reports_the_client() {
        let mut rx = skipped_clients().expect("receiver taken twice");
        let subscriber = tracing_subscriber::registry().with(LagLayer);
        tracing::subscriber::with_default(subscriber, || {
            let span =
                tracing::info_span!(target: "rumqttd::router::routing", "outgoing_publish", client_id = "slow-one");
            let _guard = span.enter();
            // What the router logs, field for field, when it jumps a reader's cursor.
            tracing::warn!(target: "rumqttd::router::routing", request_cursor = ?(0u64, 3u64), start_cursor = ?(1u64, 0u64), error = "Read cursor start jumped");
            // Other warnings are not skips.
            tracing::warn!(target: "rumqttd::router::routing", "something else");
        });
        assert_eq!(rx.try_recv().ok().as_deref(), Some("slow-one"));
        assert!(rx.try_recv().is_err());
    }
}
