//! The embedded MQTT broker: rumqttd's router, fed by the hub's own connection layer.
//!
//! rumqttd routes messages between links, for persistent sessions and the hub's own links; clean
//! sessions, most of a house's clients, are served without it ([`local`]). Everything a client sees
//! before and around that is the hub's: the listeners ([`serve`]), admission ([`admission`]), TLS,
//! the MQTT 3.1.1 session with each client ([`session`]), who may connect ([`crate::auth`]) and do
//! what ([`acl`]), and what may reach the router at all ([`guard`], [`acks`], [`sessions`]). The router runs on a thread of its
//! own and cannot be stopped: if it ends, the hub treats that as fatal and lets systemd restart it.
//!
//! The hub's own in-process client, [`HubLink`], has a client id holding a NUL (no network client
//! can take it) and is not subject to the ACL. It publishes the hub's status, the wills of dead
//! clients, the reports on `dpi/hub/error`, and, through [`dispatch::Outbox`], whatever the house
//! side publishes; its retained publishes are also persisted, and the stored ones are restored
//! through it at start.
//!
//! This module must not decode payloads or run rules; it moves packets. What messages mean is the
//! house side's, behind the one interface of [`dispatch`].

pub mod acks;
pub mod acl;
pub mod admission;
pub mod dispatch;
pub mod guard;
pub mod lag;
pub mod local;
pub mod session;
pub mod sessions;
pub mod socket;
pub mod tls;
pub mod wakes;

use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use bytes::Bytes;
use rumqttd::local::{LinkBuilder, LinkRx, LinkTx};
use rumqttd::protocol::{Packet, Publish};
use rumqttd::{Notification, Router, RouterConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::auth::Authenticator;

/// Router slots kept for the hub's own links beyond `max_connections`.
const LOCAL_LINKS: usize = 8;

/// Time a client has to finish its TLS handshake and send CONNECT. A dead ESP or a port scan
/// holding a socket open costs one idle task, never another client's connect.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The client id of the hub's own link. It holds a NUL, which MQTT forbids in strings, so no
/// network client can take it over.
const HUB_CLIENT_ID: &str = "\u{0}hub";

/// Why the broker could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The router refused a local link or is gone.
    #[error("router link: {0}")]
    Link(String),
    /// The router thread could not be reached.
    #[error("the router thread is gone")]
    RouterGone,
}

/// Opens a link to the router for a client id; `clean` is MQTT's clean-session flag.
///
/// rumqttd does not export the type of its router channel, so the channel lives inside this
/// closure, where its type is inferred.
pub type LinkFactory = Arc<dyn Fn(&str, bool) -> Result<(LinkTx, LinkRx, Notification), BrokerError> + Send + Sync>;

/// How many events wait in the router's inbox (a bounded channel of [`ROUTER_INBOX`]).
pub type RouterBacklog = Arc<dyn Fn() -> usize + Send + Sync>;

/// Capacity of rumqttd's router inbox; a send into a full inbox blocks the sending thread.
pub const ROUTER_INBOX: usize = 1000;

/// The router and ways to reach it.
pub struct RouterHandle {
    /// Opens links.
    pub links: LinkFactory,
    /// Reads the inbox backlog.
    pub backlog: RouterBacklog,
    /// Clean sessions' subscriptions, served without the router.
    pub local: Arc<local::Local>,
    /// The link clean sessions' messages reach the router's subscribers through.
    pub forward: Forward,
}

/// The client id of the link clean sessions share to the router (a NUL: no network client's).
const FORWARD_CLIENT_ID: &str = "\u{0}local";

/// One router link for what clean sessions publish to the router's subscribers: QoS 0, the
/// publish QoS in the property the receiving session lowers it by (see `session`).
pub struct Forward {
    link: std::sync::Mutex<(LinkTx, LinkRx)>,
}

impl Forward {
    /// Hands `packets` to the router with one wake-up; false if the router is gone. Blocks while
    /// the router's inbox is full, as a session's own link does.
    pub fn send(&self, packets: impl Iterator<Item = Packet>) -> bool {
        let mut link = self.link.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let tx = &mut link.0;
        let mut packets = packets.peekable();
        while let Some(packet) = packets.next() {
            if packets.peek().is_some() {
                tx.buffer().push_back(packet);
            } else {
                return tx.push_packet(packet).is_ok();
            }
        }
        true
    }
}

/// Limits the sessions enforce.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Most client connections at once.
    pub max_connections: usize,
    /// Largest accepted MQTT packet, in bytes.
    pub max_payload_bytes: usize,
}

/// What every session shares.
pub struct Shared {
    /// Opens router links, and tells the inbox backlog (a session sending into a nearly full inbox
    /// first tells the runtime it may block).
    pub router: RouterHandle,
    /// Checks credentials at CONNECT.
    pub auth: Authenticator,
    /// Failed logins per address, which slow the address down.
    pub throttle: Arc<crate::auth::Throttle>,
    /// Sockets open and logins in progress.
    pub admission: Arc<admission::Admission>,
    /// Who holds which client id, and the ids the router sees.
    pub sessions: Arc<sessions::Sessions>,
    /// Limits per connection and in total.
    pub limits: Limits,
    /// Sessions ended since start: the memory trimmer acts only after some ended.
    pub ended: AtomicUsize,
    /// Publishes wills on behalf of clients that died.
    pub hub: HubLink,
    /// Cancelled when sessions must flush and close.
    pub closing: CancellationToken,
    /// Changes to retained messages, for the store.
    pub retained: RetainedSink,
    /// What messages mean: the house side.
    pub house: Arc<dyn dispatch::Dispatch>,
}

/// Where changes to retained messages go to be persisted: (topic, payload or `None` to clear).
pub type RetainedSink = mpsc::UnboundedSender<(String, Option<Bytes>)>;

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("limits", &self.limits).finish_non_exhaustive()
    }
}

impl Shared {
    /// Sockets open now, logged in or not.
    pub fn connected(&self) -> usize {
        self.admission.sockets()
    }

    /// Records a change to a retained message for the store.
    pub fn retain(&self, topic: String, payload: Option<Bytes>) {
        let _ = self.retained.send((topic, payload));
    }

    /// Tells `dpi/hub/error` subscribers about a message the hub rejected.
    pub fn report_error(&self, topic: &str, client: &str, error: &str) {
        self.hub.publish(crate::topics::HUB_ERROR, crate::topics::error_body(topic, client, error), false);
    }
}

/// Router settings sized for a Raspberry Pi.
///
/// rumqttd's defaults are unusable (`max_connections = 0` drops every connect) and its sample
/// config is sized for a datacentre (100 MB segments). Each subscription filter keeps at most
/// `(count + 1) × size` bytes of recent messages: 5 × 256 KiB, enough for thousands of small
/// device messages in flight to a slow reader.
pub fn router_config(max_connections: usize) -> RouterConfig {
    RouterConfig {
        max_connections: max_connections + LOCAL_LINKS,
        max_outgoing_packet_count: 200,
        max_segment_size: 256 * 1024,
        max_segment_count: 4,
        custom_segment: None,
        initialized_filters: None,
        shared_subscriptions_strategy: Default::default(),
    }
}

/// Opens a session's router link under the id its claim names; a claim marked `purge` first
/// opens the id with clean session and closes it, so that the router drops whatever session it
/// kept under it. Blocks on the router's answer: call it off the runtime.
pub fn open_link(
    links: &LinkFactory,
    router_id: &str,
    purge: bool,
    clean: bool,
) -> Result<(LinkTx, LinkRx, Notification), BrokerError> {
    if purge {
        let (mut tx, _rx, _ack) = links(router_id, true)?;
        tx.push_packet(Packet::Disconnect(
            rumqttd::protocol::Disconnect { reason_code: rumqttd::protocol::DisconnectReasonCode::NormalDisconnection },
            None,
        ))?;
    }
    links(router_id, clean)
}

/// Starts the router on its own thread; returns a factory for links to it, and the table and
/// link of clean sessions. `lagging` is told the router id of each clean session that starts
/// losing messages.
pub fn start_router(
    max_connections: usize,
    lagging: mpsc::UnboundedSender<String>,
) -> Result<RouterHandle, BrokerError> {
    let router_tx = Router::new(0, router_config(max_connections)).spawn();
    let probe = router_tx.clone();
    let links: LinkFactory = Arc::new(move |client_id: &str, clean: bool| {
        LinkBuilder::new(client_id, router_tx.clone())
            .clean_session(clean)
            .build()
            .map_err(|e| BrokerError::Link(e.to_string()))
    });
    let (tx, rx, _ack) = links(FORWARD_CLIENT_ID, true)?;
    Ok(RouterHandle {
        links,
        backlog: Arc::new(move || probe.len()),
        local: Arc::new(local::Local::new(lagging)),
        forward: Forward { link: std::sync::Mutex::new((tx, rx)) },
    })
}

/// A message the hub's link received from the router.
#[derive(Debug, Clone)]
pub struct Message {
    /// Topic it was published on.
    pub topic: String,
    /// Its payload.
    pub payload: Bytes,
}

/// A command for the thread that owns the hub link's sending half.
enum LinkCommand {
    Publish(Publish),
    Subscribe(String),
}

/// The hub's own in-process MQTT client: it publishes status, wills and rule actions, and
/// receives what the hub subscribes to.
///
/// rumqttd's `LinkTx` sends block on a bounded channel when the router is busy, so the sending
/// half lives on a thread of its own and callers only queue (never block, never await).
#[derive(Clone, Debug)]
pub struct HubLink {
    commands: std::sync::mpsc::Sender<LinkCommand>,
    /// Retained publishes are also persisted.
    retained: RetainedSink,
    /// Clean sessions get the hub's messages from here; the router only what its subscribers match.
    local: Arc<local::Local>,
}

impl std::fmt::Debug for LinkCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkCommand::Publish(p) => write!(f, "Publish({:?})", p.topic),
            LinkCommand::Subscribe(s) => write!(f, "Subscribe({s:?})"),
        }
    }
}

impl HubLink {
    /// Connects the hub's link; returns it, the stream of messages it receives, and the task
    /// that reads from the router (it ends when the router does).
    pub fn connect(
        router: &RouterHandle,
        retained: RetainedSink,
    ) -> Result<(HubLink, mpsc::UnboundedReceiver<Message>, LinkReader), BrokerError> {
        HubLink::connect_as(router, HUB_CLIENT_ID, retained)
    }

    /// [`HubLink::connect`] under another in-process client id (which must hold a NUL, so that no
    /// network client can take it): the bridge's own link.
    pub fn connect_as(
        router: &RouterHandle,
        client_id: &str,
        retained: RetainedSink,
    ) -> Result<(HubLink, mpsc::UnboundedReceiver<Message>, LinkReader), BrokerError> {
        let (mut tx, rx, _ack) = (router.links)(client_id, true)?;
        let (commands, queue) = std::sync::mpsc::channel::<LinkCommand>();
        thread::Builder::new()
            .name("hub-link".to_owned())
            .spawn(move || {
                while let Ok(cmd) = queue.recv() {
                    let sent = match cmd {
                        LinkCommand::Publish(p) => tx.push_packet(Packet::Publish(p, None)),
                        LinkCommand::Subscribe(filter) => {
                            tx.subscribe(filter).map(drop).map_err(|e| BrokerError::Link(e.to_string()))
                        }
                    };
                    if let Err(e) = sent {
                        warn!(error = %e, "hub link: router is gone");
                        return;
                    }
                }
            })
            .map_err(|_| BrokerError::RouterGone)?;
        let (messages_tx, messages) = mpsc::unbounded_channel();
        let local = Arc::clone(&router.local);
        Ok((HubLink { commands, retained, local }, messages, LinkReader { rx, messages: messages_tx }))
    }

    /// Queues a QoS 0 publish from the hub; a retained one is also persisted.
    pub fn publish(&self, topic: impl Into<String>, payload: impl Into<Bytes>, retain: bool) {
        let (topic, payload) = (topic.into(), payload.into());
        if retain {
            let _ = self.retained.send((topic.clone(), (!payload.is_empty()).then(|| payload.clone())));
        }
        let topic = Bytes::from(topic);
        if self.local.publish(&topic, &payload, local::AT_SUBSCRIPTION_QOS, retain).router {
            let _ = self.commands.send(LinkCommand::Publish(Publish::new(topic, payload, retain)));
        }
    }

    /// Re-publishes a retained message read back from the store at start (not persisted again).
    pub fn restore(&self, topic: String, payload: Bytes) {
        let topic = Bytes::from(topic);
        self.local.publish(&topic, &payload, local::AT_SUBSCRIPTION_QOS, true);
        let _ = self.commands.send(LinkCommand::Publish(Publish::new(topic, payload, true)));
    }

    /// Subscribes the hub to a filter; matching messages arrive on the hub's message stream.
    pub fn subscribe(&self, filter: impl Into<String>) {
        let filter = filter.into();
        self.local.want(&filter);
        let _ = self.commands.send(LinkCommand::Subscribe(filter));
    }
}

/// Publishes `payload` on `topic` from an in-process client (the bridge, for remote commands) as
/// `identity`, through the checks a network client's PUBLISH goes through (the guard, the ACL, the
/// house), then routes it, not retained, on `link`. A refusal is reported on `dpi/hub/error` and
/// returned.
pub fn publish_checked(
    house: &dyn dispatch::Dispatch,
    link: &HubLink,
    identity: &crate::auth::Identity,
    client_id: &str,
    topic: &str,
    payload: Bytes,
) -> Result<(), String> {
    let checked = guard::topic(topic.as_bytes()).map_err(|e| format!("topic {e}")).and_then(|topic| {
        if !acl::may_publish(identity, topic) {
            return Err("publish not allowed for this client".to_owned());
        }
        match house.publish(dispatch::Origin { identity, client_id }, topic, &payload) {
            dispatch::Verdict::Route => Ok(payload.clone()),
            dispatch::Verdict::RouteInstead(replacement) => Ok(replacement),
            dispatch::Verdict::Refuse(reason) => Err(reason),
        }
    });
    match checked {
        Ok(routed) => {
            link.publish(topic.to_owned(), routed, false);
            Ok(())
        }
        Err(reason) => {
            link.publish(crate::topics::HUB_ERROR, crate::topics::error_body(topic, client_id, &reason), false);
            Err(reason)
        }
    }
}

/// Sends one packet into the router and wakes it (`LinkTx::send` is async in name only: it
/// blocks on the router channel, which is why only the hub-link thread calls this).
pub(crate) trait Push {
    fn push_packet(&mut self, packet: Packet) -> Result<(), BrokerError>;
}

impl Push for LinkTx {
    fn push_packet(&mut self, packet: Packet) -> Result<(), BrokerError> {
        // The future completes on its first poll: it awaits nothing.
        let mut fut = std::pin::pin!(self.send(packet));
        let waker = std::task::Waker::noop();
        match fut.as_mut().poll(&mut std::task::Context::from_waker(waker)) {
            std::task::Poll::Ready(r) => r.map(drop).map_err(|e| BrokerError::Link(e.to_string())),
            std::task::Poll::Pending => Ok(()),
        }
    }
}

use std::future::Future as _;

/// The topic of the [`Message`] that stands for a SUBACK to the link (no real topic holds a NUL):
/// the router handled a subscription (the health probe re-subscribes to a filter it has).
pub const SUBACK: &str = "\0suback";

/// Reads what the router sends to the hub's link.
pub struct LinkReader {
    rx: LinkRx,
    messages: mpsc::UnboundedSender<Message>,
}

impl LinkReader {
    /// Runs until the router ends, which is fatal for the hub.
    pub async fn run(mut self) -> BrokerError {
        loop {
            match self.rx.next().await {
                Ok(Some(Notification::Forward(f))) => {
                    let topic = String::from_utf8_lossy(&f.publish.topic).into_owned();
                    let _ = self.messages.send(Message { topic, payload: f.publish.payload });
                }
                // The link publishes at QoS 0 only: the one acknowledgement it gets is a SUBACK
                // (rumqttd does not export the type to match it by name).
                Ok(Some(Notification::DeviceAck(_))) => {
                    let _ = self.messages.send(Message { topic: SUBACK.to_owned(), payload: Bytes::new() });
                }
                Ok(Some(Notification::Unschedule)) => {
                    if let Err(e) = self.rx.wake().await {
                        return BrokerError::Link(e.to_string());
                    }
                }
                Ok(_) => {}
                Err(e) => return BrokerError::Link(e.to_string()),
            }
        }
    }
}

/// Accepts connections on `listener` until `token` is cancelled; each client runs in its own
/// task (TLS handshake included, under a timeout), tracked by `tracker`.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    tracker: TaskTracker,
    token: CancellationToken,
) {
    let kind = if tls.is_some() { "tls" } else { "plain" };
    loop {
        let (socket, peer) = tokio::select! {
            _ = token.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, typically: back off instead of spinning.
                    warn!(listener = kind, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // Counted from here: a socket that never logs in holds a place too.
        let Ok(ticket) = shared.admission.admit(peer.ip()) else {
            drop(socket);
            continue;
        };
        let shared = shared.clone();
        let tls = tls.clone();
        tracker.spawn(async move {
            accept_one(socket, peer, tls, shared, ticket).await;
        });
    }
}

async fn accept_one(
    socket: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    ticket: admission::Ticket,
) {
    // Without NODELAY, Nagle holds small MQTT packets (CONNACK, PUBACK) for tens of milliseconds.
    let _ = socket.set_nodelay(true);
    // A task keeps room for its largest state while it lives. The handshake is boxed and freed
    // once done, and nothing but the boxed session is held across its await: a value held there
    // (a match on the handshake's result, say) would keep room for a whole TLS stream beside it.
    let session: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> = match tls {
        None => Box::pin(session::run(socket, peer, None, shared, ticket)),
        Some(acceptor) => match tokio::time::timeout(HANDSHAKE_TIMEOUT, Box::pin(acceptor.accept(socket))).await {
            Ok(Ok(stream)) => {
                let cert = stream.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(|c| peer_cert(c));
                Box::pin(session::run(stream, peer, cert, shared, ticket))
            }
            Ok(Err(e)) => return info!(%peer, error = %e, "TLS handshake failed"),
            Err(_) => return debug!(%peer, "TLS handshake timed out"),
        },
    };
    session.await
}

/// The CN and fingerprint of a client certificate the TLS layer already verified.
fn peer_cert(der: &[u8]) -> Option<crate::auth::PeerCert> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?.to_owned();
    Some(crate::auth::PeerCert { cn, sha256: crate::certs::sha256_of(der) })
}
