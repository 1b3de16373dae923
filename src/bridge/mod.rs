//! The bridge (SPEC §8): one mutual-TLS MQTT connection from the hub to the company's broker
//! cluster, and the outbox that makes it lossless.
//!
//! Its tasks, none of which anything local waits on:
//! - **collect** reads what the bridge's own in-process link receives (`dpi/+/state`, which takes
//!   in `dpi/alarm/state`, `dpi/+/availability`, `dpi/alarm/event`), maps it with [`forward`], and
//!   appends it to the outbox in SQLite: states through the writer's batched transactions (at most
//!   one commit per `store.commit_interval_ms`), alarm events and alerts at once and durably. It
//!   also queues a `hub_restarted` alert at start and the retained `hub/health` report every
//!   [`HEALTH_EVERY`] and within a second of a change (a device online or offline, the alarm's
//!   state).
//! - **send** keeps the upstream connection (rumqttc, client id `house_id`, clean session off, a
//!   retained `offline` will on `houses/HOUSE_ID/hub/status`), reconnecting with exponential backoff
//!   and jitter from 1 s to 5 min. Each connection starts a fresh client, publishes `online` on that
//!   status topic, then sends the outbox from its oldest entry, in order, at QoS 1, at most
//!   [`WINDOW`] in flight, and deletes entries as the upstream acknowledges them. An entry sent but
//!   not yet deleted when the connection drops is sent again: at least once, never lost.
//! - the link reader, which ends only with the router;
//! - remote commands ([`Commands::run`]), below.
//!
//! With `allow_remote_control`, the send task subscribes to `houses/HOUSE_ID/cmd/#` and hands
//! `cmd/ID/set`, `cmd/alarm/set` and `cmd/scene/set` to [`Commands::run`], which applies them as
//! the resident `bridge` through the broker's own checks ([`crate::broker::publish_checked`]): the
//! ACL, the payload checks, the alarm's code. Anything else from upstream is ignored and logged.
//!
//! Alarm events and alerts are appended as they come; states wait for the writer's next commit: an
//! event can pass a state received up to one commit interval before it. The hub's status upstream is
//! the bridge's own (`online` at connect, `offline` at a clean stop, the will otherwise), not a copy
//! of `dpi/hub/status`, so that an `offline` queued at the last stop is never sent after `online`.

pub mod forward;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Outgoing, Packet, QoS, TlsConfiguration, Transport};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::auth::Identity;
use crate::broker::dispatch::Dispatch;
use crate::broker::{BrokerError, HubLink, Message};
use crate::config;
use crate::devices::OutboxInput;
use crate::store::users::Role;
use crate::store::{self, outbox, Store};
use crate::topics::{Leaf, Topic};
use forward::Forwarder;

/// The bridge's in-process client id (with a NUL: no network client can take it).
const CLIENT_ID: &str = "\u{0}bridge";

/// The local filters whose messages go upstream (`dpi/+/state` covers `dpi/alarm/state`: a filter
/// of its own would deliver it twice).
const FORWARDED: [&str; 3] = ["dpi/+/state", "dpi/+/availability", "dpi/alarm/event"];

/// Entries in flight upstream at most.
pub const WINDOW: usize = 64;

/// How often the health report is queued.
pub const HEALTH_EVERY: Duration = Duration::from_secs(60);

/// The first wait before reconnecting, doubled at each failure up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_secs(1);
/// The longest wait before reconnecting.
const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// How long a connection attempt may take, TCP, TLS and CONNACK together.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Acknowledged entries are deleted at least this often (one transaction for all of them).
const DELETE_EVERY: Duration = Duration::from_millis(500);

/// The bridge as `domoticpi status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// `connecting`, `connected`, or `down: WHY`.
    pub state: String,
    /// When the upstream last acknowledged an entry (RFC 3339).
    pub last_sent: Option<String>,
}

/// The running bridge's status, shared with the control socket.
pub type SharedStatus = Arc<Mutex<Status>>;

fn set_state(status: &SharedStatus, state: impl Into<String>) {
    status.lock().unwrap_or_else(std::sync::PoisonError::into_inner).state = state.into();
}

/// What [`start`] hands back to the supervisor.
#[derive(Debug)]
pub struct Started {
    /// The writer's outbox input.
    pub outbox: OutboxInput,
    /// The bridge's status, for the control socket.
    pub status: SharedStatus,
    /// Remote commands, to run once the house is up ([`Commands::run`]).
    pub commands: Commands,
}

/// Remote commands from upstream, applied locally under a resident's rights.
#[derive(Debug)]
pub struct Commands {
    /// (local topic, payload), from the send task.
    incoming: mpsc::UnboundedReceiver<(String, bytes::Bytes)>,
    /// The bridge's own link, which routes them.
    link: HubLink,
}

/// The identity remote commands run under: a resident named `bridge` (a reserved id, so no user
/// of the hub has that name). A disarm still needs one of the users' codes.
pub fn remote_identity() -> Identity {
    Identity::User { name: "bridge".to_owned(), role: Role::Resident }
}

impl Commands {
    /// Applies each command through the checks a resident's PUBLISH goes through, until the send
    /// task ends.
    pub async fn run(mut self, house: Arc<dyn Dispatch>) {
        let identity = remote_identity();
        while let Some((topic, payload)) = self.incoming.recv().await {
            match crate::broker::publish_checked(house.as_ref(), &self.link, &identity, "bridge", &topic, payload) {
                Ok(()) => info!(%topic, "bridge: remote command applied"),
                Err(reason) => warn!(%topic, %reason, "bridge: remote command refused"),
            }
        }
    }
}

/// Starts the bridge's tasks on `tasks`, until `closing`.
pub fn start(
    config: &config::Bridge,
    router: &crate::broker::RouterHandle,
    store: &Store,
    tasks: &TaskTracker,
    closing: &CancellationToken,
) -> Result<Started, BrokerError> {
    // The bridge's link publishes nothing retained: its sink goes nowhere.
    let (link, messages, reader) = HubLink::connect_as(router, CLIENT_ID, mpsc::unbounded_channel().0)?;
    tasks.spawn(closing.clone().run_until_cancelled_owned(async move { drop(reader.run().await) }));
    for filter in FORWARDED {
        link.subscribe(filter);
    }
    let (states, entries) = mpsc::unbounded_channel();
    let written = Arc::new(Notify::new());
    let status: SharedStatus = Arc::new(Mutex::new(Status { state: "connecting".into(), last_sent: None }));
    let collector = Collector {
        forwarder: Forwarder::new(&config.house_id),
        store: store.clone(),
        states,
        written: Arc::clone(&written),
        max_queue: config.max_queue,
        data_dir: store.path().parent().map(std::path::Path::to_owned).unwrap_or_default(),
        started: std::time::Instant::now(),
    };
    tasks.spawn(collector.run(messages, closing.clone()));
    let (remote, incoming) = mpsc::unbounded_channel();
    let sender = Sender {
        config: config.clone(),
        store: store.clone(),
        written: Arc::clone(&written),
        status: Arc::clone(&status),
        remote,
    };
    tasks.spawn(sender.run(closing.clone()));
    let outbox = OutboxInput { entries, max: config.max_queue, written };
    Ok(Started { outbox, status, commands: Commands { incoming, link } })
}

/// The collect task's state.
struct Collector {
    forwarder: Forwarder,
    store: Store,
    /// States, for the writer's next transaction.
    states: mpsc::UnboundedSender<outbox::Entry>,
    /// Wakes the sender once durable entries are in.
    written: Arc<Notify>,
    max_queue: usize,
    /// Where the database lives, for the free space.
    data_dir: std::path::PathBuf,
    started: std::time::Instant,
}

impl Collector {
    async fn run(mut self, mut messages: mpsc::UnboundedReceiver<Message>, closing: CancellationToken) {
        let restarted = self.forwarder.restarted(&store::now_rfc3339());
        self.append(vec![restarted]).await;
        let mut health = tokio::time::interval(HEALTH_EVERY);
        // A change (a device came or went, the alarm moved) is reported within a second.
        let mut changes = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                () = closing.cancelled() => break,
                message = messages.recv() => {
                    let Some(m) = message else { break };
                    let entries = self.forwarder.entries(&m.topic, &m.payload, &store::now_rfc3339());
                    self.append(entries).await;
                }
                _ = health.tick() => self.health().await,
                _ = changes.tick() => {
                    if self.forwarder.take_changed() {
                        self.health().await;
                    }
                }
            }
        }
    }

    /// States to the writer; alarm events and alerts durably, now.
    async fn append(&self, entries: Vec<outbox::Entry>) {
        let (states, urgent): (Vec<_>, Vec<_>) = entries.into_iter().partition(|e| e.class == outbox::Class::State);
        for e in states {
            let _ = self.states.send(e);
        }
        if urgent.is_empty() {
            return;
        }
        let max = self.max_queue;
        match self.store.durable(move |tx| outbox::append(tx, &urgent, max)).await {
            Ok(_) => self.written.notify_one(),
            Err(e) => warn!(error = %e, "bridge: an alarm event or alert could not be queued"),
        }
    }

    /// Queues the health report, and `disk_low` when the disk first runs low.
    async fn health(&mut self) {
        let uptime_s = self.started.elapsed().as_secs();
        let commits = self.store.commits();
        let figures =
            self.store.call(|c| Ok((store::lag::all(c)?.len(), outbox::depth(c)?, outbox::dropped(c)?))).await;
        let house = self.forwarder.summary();
        let (slow_clients, queue, dropped) = match figures {
            Ok(figures) => figures,
            Err(e) => return warn!(error = %e, "bridge: the health report could not be read"),
        };
        let free_mb = disk_free_mb(&self.data_dir);
        let body = json!({
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_s": uptime_s,
            "devices_online": house.online,
            "devices": house.devices,
            "alarm": house.alarm,
            "disk_free_mb": free_mb,
            "store_commits": commits,
            "slow_clients": slow_clients,
            "queue": queue,
            "dropped": dropped,
        });
        let mut entries = vec![self.forwarder.health(&body)];
        entries.extend(free_mb.and_then(|mb| self.forwarder.disk(mb, &store::now_rfc3339())));
        self.append(entries).await;
    }
}

/// Free space on the disk holding `dir`, in MiB.
fn disk_free_mb(dir: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt as _;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a NUL-terminated string and `stat` a properly sized, writable struct.
    if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
        return None;
    }
    // The fields are 32-bit on 32-bit ARM (a Pi on a 32-bit system), 64-bit elsewhere.
    #[allow(clippy::useless_conversion)]
    let (blocks, size) = (u64::from(stat.f_bavail), u64::from(stat.f_frsize));
    Some(blocks.saturating_mul(size) / (1024 * 1024))
}

/// The send task's state.
struct Sender {
    config: config::Bridge,
    store: Store,
    /// Woken when entries were appended.
    written: Arc<Notify>,
    status: SharedStatus,
    /// Remote commands accepted from upstream, as (local topic, payload).
    remote: mpsc::UnboundedSender<(String, bytes::Bytes)>,
}

/// Why a connection ended.
struct Failure {
    /// It had been established (the backoff starts over).
    connected: bool,
    reason: String,
}

impl Sender {
    async fn run(self, closing: CancellationToken) {
        let mut backoff = BACKOFF_MIN;
        let mut last_reason = String::new();
        loop {
            set_state(&self.status, "connecting");
            let failure = match tls_config(&self.config) {
                Ok(tls) => match self.connection(tls, &closing).await {
                    Ok(()) => return,
                    Err(f) => f,
                },
                Err(reason) => Failure { connected: false, reason },
            };
            if failure.connected {
                backoff = BACKOFF_MIN;
            }
            if failure.reason != last_reason {
                warn!(upstream = %self.config.url, reason = %failure.reason, "bridge: upstream unreachable; queueing, retrying with backoff");
                last_reason.clone_from(&failure.reason);
            }
            set_state(&self.status, format!("down: {}", failure.reason));
            let wait = jitter(backoff);
            debug!(?wait, "bridge: next attempt");
            backoff = (backoff * 2).min(BACKOFF_MAX);
            tokio::select! {
                () = closing.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// One upstream connection: connect, then send the outbox until it fails or the hub stops.
    async fn connection(&self, tls: Arc<rustls::ClientConfig>, closing: &CancellationToken) -> Result<(), Failure> {
        let status_topic = format!("houses/{}/hub/status", self.config.house_id);
        let mut opts = MqttOptions::new(&self.config.house_id, &self.config.host, self.config.port);
        opts.set_keep_alive(Duration::from_secs(30))
            .set_clean_session(false)
            .set_inflight(u16::try_from(WINDOW + 8).unwrap_or(u16::MAX))
            .set_last_will(LastWill::new(status_topic.as_str(), "offline", QoS::AtLeastOnce, true))
            .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
        let (client, mut events) = AsyncClient::new(opts, WINDOW + 16);
        events.network_options.set_connection_timeout(CONNECT_TIMEOUT.as_secs());
        let refused = |reason: String| Failure { connected: false, reason };
        // An attempt that hangs (a listener that never answers) must not hold up the hub's stop.
        let attempt = tokio::select! {
            () = closing.cancelled() => return Ok(()),
            attempt = tokio::time::timeout(CONNECT_TIMEOUT, events.poll()) => attempt,
        };
        match attempt {
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => {}
            Ok(Ok(other)) => return Err(refused(format!("unexpected first packet {other:?}"))),
            Ok(Err(e)) => return Err(refused(e.to_string())),
            Err(_) => return Err(refused("no CONNACK within 10 s".to_owned())),
        }
        info!(upstream = %self.config.url, house = %self.config.house_id, "bridge: connected");
        let commands = format!("houses/{}/cmd/", self.config.house_id);
        if self.config.allow_remote_control {
            let _ = client.try_subscribe(format!("{commands}#"), QoS::AtLeastOnce);
        }
        set_state(&self.status, "connected");
        let mut flight = Flight::default();
        // `online` first; -1 marks a publish that is not an outbox entry.
        if client.try_publish(status_topic.as_str(), QoS::AtLeastOnce, true, "online").is_ok() {
            flight.queued.push_back(-1);
        }
        let mut more = true;
        let mut delete_tick = tokio::time::interval(DELETE_EVERY);
        loop {
            if more && flight.len() < WINDOW {
                more = self.top_up(&client, &mut flight).await;
            }
            tokio::select! {
                event = events.poll() => match event {
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => flight.sent(pkid),
                    Ok(Event::Incoming(Packet::PubAck(ack))) => {
                        flight.acked(ack.pkid);
                        more |= flight.len() < WINDOW / 2;
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => self.upstream_message(&commands, &p.topic, p.payload),
                    Ok(_) => {}
                    Err(e) => {
                        self.delete_acked(&mut flight).await;
                        return Err(Failure { connected: true, reason: e.to_string() });
                    }
                },
                () = self.written.notified() => more = true,
                _ = delete_tick.tick() => self.delete_acked(&mut flight).await,
                () = closing.cancelled() => {
                    self.delete_acked(&mut flight).await;
                    let _ = client.try_publish(status_topic.as_str(), QoS::AtLeastOnce, true, "offline");
                    let _ = client.try_disconnect();
                    let _ = tokio::time::timeout(Duration::from_millis(500), async {
                        while let Ok(event) = events.poll().await {
                            if matches!(event, Event::Outgoing(Outgoing::Disconnect)) {
                                break;
                            }
                        }
                    })
                    .await;
                    return Ok(());
                }
            }
        }
    }

    /// A message from upstream: a remote command when remote control is on and the topic is one
    /// (`cmd/ID/set`, `cmd/alarm/set`, `cmd/scene/set`); anything else is ignored and logged.
    fn upstream_message(&self, commands: &str, topic: &str, payload: bytes::Bytes) {
        let local = topic.strip_prefix(commands).map(|rest| format!("dpi/{rest}"));
        let command = local.filter(|t| {
            matches!(
                crate::topics::parse(t),
                Some(Topic::Device { leaf: Leaf::Set, .. } | Topic::AlarmSet | Topic::SceneSet)
            )
        });
        match command {
            Some(local) if self.config.allow_remote_control => {
                let _ = self.remote.send((local, payload));
            }
            Some(_) => warn!(%topic, "bridge: remote command ignored: allow_remote_control is off"),
            None => warn!(%topic, "bridge: message from upstream ignored: not a remote command"),
        }
    }

    /// Publishes the next entries after the cursor, up to the window; false when the outbox had no
    /// more to give.
    async fn top_up(&self, client: &AsyncClient, flight: &mut Flight) -> bool {
        let (after, room) = (flight.cursor, WINDOW - flight.len());
        let rows = match self.store.call(move |c| outbox::after(c, after, room)).await {
            Ok(rows) => rows,
            Err(e) => {
                warn!(error = %e, "bridge: the outbox could not be read");
                return false;
            }
        };
        let full = rows.len() == room;
        for row in rows {
            let outbox::Entry { topic, payload, retain, .. } = row.entry;
            if client.try_publish(topic, QoS::AtLeastOnce, retain, payload).is_err() {
                return true;
            }
            flight.queued.push_back(row.id);
            flight.cursor = row.id;
        }
        full
    }

    /// Deletes what the upstream acknowledged, in one transaction.
    async fn delete_acked(&self, flight: &mut Flight) {
        if flight.acked.is_empty() {
            return;
        }
        let ids = std::mem::take(&mut flight.acked);
        match self.store.call(move |c| outbox::delete(c, &ids)).await {
            Ok(()) => {
                let mut status = self.status.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                status.last_sent = Some(store::now_rfc3339());
            }
            Err(e) => warn!(error = %e, "bridge: sent entries could not be deleted; they will be sent again"),
        }
    }
}

/// What one connection has in flight.
#[derive(Debug, Default)]
struct Flight {
    /// The last outbox id published on this connection.
    cursor: i64,
    /// Ids published, waiting for their packet id (rumqttc assigns them in order).
    queued: VecDeque<i64>,
    /// Ids by packet id, waiting for PUBACK.
    unacked: HashMap<u16, i64>,
    /// Ids acknowledged, to delete.
    acked: Vec<i64>,
}

impl Flight {
    fn len(&self) -> usize {
        self.queued.len() + self.unacked.len()
    }

    fn sent(&mut self, pkid: u16) {
        if let Some(id) = self.queued.pop_front() {
            self.unacked.insert(pkid, id);
        }
    }

    fn acked(&mut self, pkid: u16) {
        if let Some(id) = self.unacked.remove(&pkid).filter(|id| *id >= 0) {
            self.acked.push(id);
        }
    }
}

/// `base` scaled by a random factor in [0.5, 1.0): houses that lost the upstream together do not
/// all come back in the same second.
fn jitter(base: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    let fraction = (h.finish() % 1000) as f64 / 2000.0;
    base.mul_f64(0.5 + fraction)
}

/// The TLS client configuration: the company CA, the house's certificate and key.
fn tls_config(config: &config::Bridge) -> Result<Arc<rustls::ClientConfig>, String> {
    let read = |path: &std::path::Path| std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()));
    // Like the hub's own keys: refused when other users can read it.
    crate::certs::check_key_mode(&config.client_key).map_err(|e| e.to_string())?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut read(&config.ca)?.as_slice()) {
        roots.add(cert.map_err(|e| format!("{}: {e}", config.ca.display()))?).map_err(|e| e.to_string())?;
    }
    let chain = rustls_pemfile::certs(&mut read(&config.client_cert)?.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", config.client_cert.display()))?;
    let key = rustls_pemfile::private_key(&mut read(&config.client_key)?.as_slice())
        .map_err(|e| format!("{}: {e}", config.client_key.display()))?
        .ok_or_else(|| format!("{}: no private key", config.client_key.display()))?;
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| e.to_string())?;
    Ok(Arc::new(tls))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acknowledgements_map_back_to_outbox_ids_in_publish_order() {
        let mut f = Flight::default();
        f.queued.extend([-1, 7, 8]);
        f.sent(1);
        f.sent(2);
        f.sent(3);
        f.acked(2);
        f.acked(1);
        f.acked(9);
        assert_eq!(f.acked, [7], "the status publish and unknown packet ids are not outbox entries");
        assert_eq!(f.len(), 1);
    }

    #[test]
    fn jitter_stays_within_half_and_all_of_the_backoff() {
        for _ in 0..100 {
            let j = jitter(Duration::from_secs(10));
            assert!(j >= Duration::from_secs(5) && j < Duration::from_secs(10), "{j:?}");
        }
    }
}
