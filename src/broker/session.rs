//! One client's MQTT 3.1.1 session: CONNECT, authentication, then packets both ways between the
//! socket and its link until either side ends. A persistent session's link is its own router link;
//! a clean session's is its seat in [`super::local`], filled on the publisher's thread.
//!
//! The session answers what the router cannot: a CONNACK for every refusal, so that a device can
//! tell a bad password from a network fault (no credentials, a certificate required, revoked or
//! unknown, a will refused: 5; bad credentials: 4; client id not acceptable or held by another
//! identity: 2; the hub full or busy: 3; another protocol level: 1); keepalive measured on what the
//! client sends (1.5 × its value, none for 0); a second CONNECT, a packet 1 KiB over
//! `max_payload_bytes` or a publish to a topic the guard refuses closing the connection; PINGRESP,
//! UNSUBACK and a QoS 1 PUBLISH's PUBACK (once the message is routed) without a router round
//! trip; the client's acknowledgements of deliveries handed to the router in batches
//! (`ROUTER_ACK_BATCH`), one wake-up of its thread for many; a clean session's PUBACKs left in
//! its socket until it next writes to the client (`ANSWERS_UNREAD` at most, [`super::socket`]),
//! so that they wake nobody; and the will published once, only for
//! a connection that died without DISCONNECT, before the device's `offline`. It is also where
//! [`super::guard`] is applied: nothing reaches the router that the guard, [`super::acks`] and
//! [`super::sessions`] have not let through. Retained publishes it lets through also go to the
//! writer, to be kept on disk.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use std::collections::HashMap;

use bytes::{BufMut, Bytes, BytesMut};
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::{
    ConnAck, ConnectReturnCode, Disconnect, DisconnectReasonCode, LastWill, Packet, PingResp, Protocol, PubAck,
    PubAckReason, PubComp, PubCompReason, PubRec, PubRecReason, PubRel, PubRelReason, Publish, PublishProperties,
    SubAck, Subscribe, SubscribeReasonCode, UnsubAck, Unsubscribe,
};
use rumqttd::Notification;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{Instant, Sleep};
use tracing::{debug, info, warn};

use super::acks::{Ack, Acks, Incoming, Sends};
use super::admission::Ticket;
use super::dispatch::{Origin, Verdict};
use super::local::{Delivery, Outgoing, Seat};
use super::sessions::{Claim, ClaimError, FilterVerdict};
use super::socket::Socket;
use super::wakes::Sources;
use super::{acl, guard, Shared, HANDSHAKE_TIMEOUT};
use crate::auth::{Identity, PeerCert, Presented, Refusal};
use crate::secret::Secret;

/// A connection's read and write buffers to begin with: a device's packets are tens of bytes, and
/// the buffers grow for a client that sends or gets more.
const BUFFER: usize = 256;

/// Room for the fixed header and topic beyond the payload limit.
const PACKET_OVERHEAD: usize = 1024;

/// What `encode` says when the router disconnected the client (the guard should make it never happen).
const ROUTER_DISCONNECTED: &str = "the router disconnected the client";

/// How long a client may leave written data unread before the connection is closed.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Settled deliveries (the client's PUBACKs and PUBCOMPs) gathered before they go to the router
/// on their own. Each would otherwise wake the router's thread once; it keeps at most 100 deliveries
/// of a link in flight, so a third of that never holds up the next delivery.
const ROUTER_ACK_BATCH: usize = 32;

/// The longest a settled delivery waits for others before it goes to the router alone.
const ROUTER_ACK_LINGER: Duration = Duration::from_millis(500);

/// The longest the answers a clean session is owed wait unread in its socket ([`super::socket`])
/// when no delivery follows them, and so the longest a packet too small to reach the socket's
/// mark waits with them (a PINGREQ sent while a PUBACK is still owed). Timers that fire wake the
/// hub's thread: this one fires at most once a second while deliveries flow.
const ANSWERS_UNREAD: Duration = Duration::from_secs(1);

/// How often the timer of a client with keepalive 0 fires when it has nothing else to wait for.
const NO_KEEPALIVE: Duration = Duration::from_secs(3600);

/// Runs a client session on an established (TLS or plain) stream: CONNECT and login, then the
/// client id and its link, then packets both ways, then the end. `ticket` holds the socket's
/// place in the admission count until the session is over.
pub fn run<S>(
    stream: S,
    peer: SocketAddr,
    cert: Option<PeerCert>,
    shared: Arc<Shared>,
    ticket: Ticket,
) -> impl std::future::Future<Output = ()>
where
    S: Socket,
{
    // A future keeps room for its largest state, and for its arguments, as long as it lives. The
    // stream goes at once into the boxed first step (login, opening the link), and closing is
    // boxed too, so an idle session holds only what `serve` needs.
    let start = Box::pin(start(stream, peer, cert, Arc::clone(&shared), ticket));
    async move {
        let _ended = Ended(&shared);
        let Some((mut session, session_present, _ticket)) = start.await else { return };
        let end = session.serve(session_present).await;
        Box::pin(session.close(end)).await;
    }
}

/// CONNECT, login, the client id and its link: the session, whether the router kept one under
/// that id, and the admission ticket to hold until the end.
async fn start<S>(
    stream: S,
    peer: SocketAddr,
    cert: Option<PeerCert>,
    shared: Arc<Shared>,
    mut ticket: Ticket,
) -> Option<(Session<S>, bool, Ticket)>
where
    S: Socket,
{
    let conn = Conn { stream, read: BytesMut::with_capacity(BUFFER), write: BytesMut::with_capacity(BUFFER) };
    let accepted = Box::pin(accept(conn, peer, cert, &shared, &mut ticket)).await?;
    let (session, session_present) = Box::pin(Session::open(accepted, &shared)).await?;
    Some((session, session_present, ticket))
}

/// A client whose CONNECT was read and whose login and will were accepted.
struct Accepted<S> {
    conn: Conn<S>,
    peer: SocketAddr,
    connect: rumqttd::protocol::Connect,
    will: Option<LastWill>,
    identity: Identity,
    max_packet: usize,
}

/// Reads CONNECT and decides whether the client may go on: room on the hub, a valid client id, a
/// login, a will it could publish. Every refusal is answered with its CONNACK here.
async fn accept<S>(
    mut conn: Conn<S>,
    peer: SocketAddr,
    cert: Option<PeerCert>,
    shared: &Shared,
    ticket: &mut Ticket,
) -> Option<Accepted<S>>
where
    S: Socket,
{
    let max_packet = shared.limits.max_payload_bytes + PACKET_OVERHEAD;
    let Packet::Connect(connect, _, will, _, login) = first_packet(&mut conn, peer, max_packet).await? else {
        info!(%peer, "closed: first packet was not CONNECT");
        return None;
    };
    let shown_id = guard::shown(&connect.client_id);
    let refused = if ticket.over_limit() {
        warn!(%peer, client = %shown_id, max = shared.limits.max_connections, "connection refused: too many connections");
        Some(ConnectReturnCode::ServiceUnavailable)
    } else if let Err(reason) = guard::client_id(&connect.client_id, connect.clean_session) {
        warn!(%peer, client = %shown_id, %reason, "connection refused");
        Some(ConnectReturnCode::ClientIdentifierNotValid)
    } else {
        None
    };
    if let Some(code) = refused {
        let _ = conn.refuse(code).await;
        return None;
    }
    let (username, password) = match login {
        Some(l) if !l.username.is_empty() => (Some(l.username), Some(Secret::new(l.password))),
        _ => (None, None),
    };
    let presented = Presented { client_id: connect.client_id.clone(), username, password, cert };
    let identity = match log_in(&mut conn, shared, peer, presented, max_packet).await {
        Ok(identity) => identity,
        Err(code) => {
            if let Some(code) = code {
                let _ = conn.refuse(code).await;
            }
            return None;
        }
    };
    ticket.logged_in();
    if let Some(w) = &will {
        if let Err(reason) = check_will(shared, &identity, &connect.client_id, w) {
            let topic = guard::shown(&String::from_utf8_lossy(&w.topic));
            warn!(%peer, client = %shown_id, user = identity.name(), %topic, %reason, "connection refused: will refused");
            shared.report_error(&topic, &connect.client_id, &format!("will refused: {reason}"));
            let _ = conn.refuse(ConnectReturnCode::NotAuthorized).await;
            return None;
        }
    }
    Some(Accepted { conn, peer, connect, will, identity, max_packet })
}

/// The client's first packet, read within the handshake timeout; `None` once the client has been
/// answered (an overlong client id, another protocol level) or dropped (malformed, silent).
async fn first_packet<S>(conn: &mut Conn<S>, peer: SocketAddr, max_packet: usize) -> Option<Packet>
where
    S: Socket,
{
    let code = match tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.read_connect(max_packet)).await {
        Ok(Ok(packet)) => return packet,
        Ok(Err(FirstRead::ClientIdTooLong(len))) => {
            warn!(%peer, len, max = guard::MAX_CLIENT_ID_BYTES, "connection refused: client id too long");
            ConnectReturnCode::ClientIdentifierNotValid
        }
        Ok(Err(FirstRead::Protocol(rumqttd::protocol::Error::InvalidProtocolLevel(level)))) => {
            info!(%peer, level, "refused: unsupported MQTT protocol level (MQTT 3.1.1 only)");
            ConnectReturnCode::RefusedProtocolVersion
        }
        Ok(Err(FirstRead::Protocol(e))) => {
            info!(%peer, error = %e, "closed: malformed CONNECT");
            return None;
        }
        Err(_) => {
            debug!(%peer, "closed: no CONNECT in time");
            return None;
        }
    };
    let _ = conn.refuse(code).await;
    None
}

/// Decides who the client is. An address with recent failed logins waits first (before a password
/// check, so a flood cannot keep the argon2 pool busy; after a failed token check); password
/// checks wait on the bounded argon2 queue under the CONNECT timeout; a client that leaves in the
/// meantime is forgotten (`Err(None)`), its queued check cancelled.
async fn log_in<S>(
    conn: &mut Conn<S>,
    shared: &Shared,
    peer: SocketAddr,
    presented: Presented,
    max_packet: usize,
) -> Result<Identity, Option<ConnectReturnCode>>
where
    S: Socket,
{
    let ip = peer.ip();
    let delay = shared.throttle.delay(ip, std::time::Instant::now());
    let password = presented.is_password(&shared.auth);
    let client = guard::shown(&presented.client_id);
    let user = presented.username.clone().or_else(|| presented.cert.as_ref().map(|c| c.cn.clone())).unwrap_or_default();
    if password && !delay.is_zero() {
        debug!(%peer, ?delay, "throttled: recent failed logins from this address");
        conn.while_present(tokio::time::sleep(delay), max_packet).await.ok_or(None)?;
    }
    let check = async {
        // An address waits for its share of the argon2 queue; tokens and certificates never do.
        let _slot = match password {
            true => Some(shared.throttle.begin_check(ip).await),
            false => None,
        };
        shared.auth.check(presented).await
    };
    let checked = conn.while_present(tokio::time::timeout(HANDSHAKE_TIMEOUT, check), max_packet);
    let refusal = match checked.await {
        None => {
            debug!(%peer, client = %client, "client left during its login");
            return Err(None);
        }
        Some(Ok(Ok(identity))) => return Ok(identity),
        Some(Ok(Err(refusal))) => refusal,
        Some(Err(_)) => Refusal::Unavailable("timed out".to_owned()),
    };
    if matches!(refusal, Refusal::BadCredentials | Refusal::RevokedCertificate(_)) {
        shared.throttle.failed(ip, std::time::Instant::now());
        if !password && !delay.is_zero() {
            conn.while_present(tokio::time::sleep(delay), max_packet).await.ok_or(None)?;
        }
    }
    let code = match refusal {
        Refusal::Anonymous
        | Refusal::CertificateRequired
        | Refusal::UnknownCertificate(_)
        | Refusal::RevokedCertificate(_) => ConnectReturnCode::NotAuthorized,
        Refusal::BadCredentials => ConnectReturnCode::BadUserNamePassword,
        Refusal::ClientId(_) => ConnectReturnCode::ClientIdentifierNotValid,
        Refusal::Unavailable(_) => ConnectReturnCode::ServiceUnavailable,
    };
    warn!(%peer, %client, %user, reason = %refusal, "connection refused");
    Err(Some(code))
}

/// Checks a will at CONNECT as its PUBLISH would be checked, without acting on it.
fn check_will(shared: &Shared, identity: &Identity, client_id: &str, will: &LastWill) -> Result<(), String> {
    let topic = guard::topic(&will.topic).map_err(|e| format!("topic {e}"))?;
    if !acl::may_publish(identity, topic) {
        return Err("topic not allowed for this client".to_owned());
    }
    shared.house.check_will(Origin { identity, client_id }, topic, &will.message)
}

/// Publishes the will of a connection that died, through the same checks as a PUBLISH.
fn publish_will(shared: &Shared, identity: &Identity, client_id: &str, will: LastWill) {
    let Ok(topic) = guard::topic(&will.topic) else { return };
    match inspect(shared, identity, client_id, topic, &will.message) {
        Ok(replacement) => {
            debug!(client = %client_id, %topic, "publishing will");
            shared.hub.publish(topic.to_owned(), replacement.unwrap_or(will.message), will.retain);
        }
        Err(reason) => {
            warn!(client = %client_id, %topic, %reason, "will refused");
            shared.report_error(topic, client_id, &format!("will refused: {reason}"));
        }
    }
}

/// The hub's checks on a message a client sent (a PUBLISH, or its will), after the guard: the
/// ACL, then the house, which acts on what the message means. Returns the payload to route in
/// place of the one sent (an alarm command without its code), or why the message is refused.
fn inspect(
    shared: &Shared,
    identity: &Identity,
    client_id: &str,
    topic: &str,
    payload: &Bytes,
) -> Result<Option<Bytes>, String> {
    if !acl::may_publish(identity, topic) {
        return Err("publish not allowed for this client".to_owned());
    }
    match shared.house.publish(Origin { identity, client_id }, topic, payload) {
        Verdict::Route => Ok(None),
        Verdict::RouteInstead(payload) => Ok(Some(payload)),
        Verdict::Refuse(reason) => Err(reason),
    }
}

/// Counts the session's end for the memory trimmer, whatever the path.
struct Ended<'a>(&'a Shared);

impl Drop for Ended<'_> {
    fn drop(&mut self) {
        self.0.ended.fetch_add(1, Ordering::Relaxed);
    }
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.finish()
}

/// Tells the router this client is gone.
async fn disconnect_link(link_tx: &mut LinkTx) -> Result<(), rumqttd::local::LinkError> {
    link_tx
        .send(Packet::Disconnect(Disconnect { reason_code: DisconnectReasonCode::NormalDisconnection }, None))
        .await
        .map(drop)
}

/// How a session ended.
enum End {
    /// The client sent DISCONNECT.
    Clean,
    /// The router dropped the link, or disconnected the client: only if it died, when the guard holds.
    Router,
    /// The hub closed it: another connection took the client id over, or its credentials were revoked.
    Kicked,
    /// The hub is shutting down.
    HubClosing,
    /// The network connection failed, timed out or carried a protocol violation.
    Lost(String),
}

/// The socket with its buffers.
struct Conn<S> {
    stream: S,
    read: BytesMut,
    write: BytesMut,
}

/// Why the first packet could not be read.
enum FirstRead {
    /// Malformed, over the size limit, or another protocol.
    Protocol(rumqttd::protocol::Error),
    /// A CONNECT whose client id is longer than the guard allows.
    ClientIdTooLong(usize),
}

/// The length a CONNECT at the start of `buf` gives its client id, read from its first bytes, so
/// that an overlong id is answered (CONNACK 2) even when the whole packet is over the size limit.
fn connect_client_id_len(buf: &[u8]) -> Option<usize> {
    let i = variable_header(buf, 1)?;
    // Protocol name (length first), level, flags, keepalive; then the client id's length.
    let name_len = usize::from(u16_at(buf, i)?);
    Some(usize::from(u16_at(buf, i + 2 + name_len + 4)?))
}

/// Where the variable header starts in the packet at the start of `buf`, if the packet is of
/// type `kind` and its fixed header (type byte, then up to four 7-bit length groups) is all there.
fn variable_header(buf: &[u8], kind: u8) -> Option<usize> {
    if buf.first()? >> 4 != kind {
        return None;
    }
    let mut i = 1;
    loop {
        let b = *buf.get(i)?;
        i += 1;
        if b & 0x80 == 0 || i > 4 {
            return Some(i);
        }
    }
}

/// The big-endian `u16` at `at`, if it is all there.
fn u16_at(buf: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*buf.get(at)?, *buf.get(at + 1)?]))
}

impl<S: Socket> Conn<S> {
    /// Reads the first packet; `None` when the peer closed the connection first.
    async fn read_connect(&mut self, max: usize) -> Result<Option<Packet>, FirstRead> {
        loop {
            if let Some(len) = connect_client_id_len(&self.read).filter(|len| *len > guard::MAX_CLIENT_ID_BYTES) {
                return Err(FirstRead::ClientIdTooLong(len));
            }
            match V4.read_mut(&mut self.read, max) {
                Ok(packet) => return Ok(Some(packet)),
                Err(rumqttd::protocol::Error::InsufficientBytes(_)) => {}
                Err(e) => return Err(FirstRead::Protocol(e)),
            }
            match self.stream.read_buf(&mut self.read).await {
                Ok(0) | Err(_) => return Ok(None),
                Ok(_) => {}
            }
        }
    }

    async fn send(&mut self, packet: Packet) -> std::io::Result<()> {
        V4.write(packet, &mut self.write).map_err(std::io::Error::other)?;
        self.flush().await
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        self.stream.write_all(&self.write).await?;
        self.write.clear();
        self.stream.flush().await
    }

    async fn refuse(&mut self, code: ConnectReturnCode) -> std::io::Result<()> {
        let answer = async {
            self.send(Packet::ConnAck(ConnAck { session_present: false, code }, None)).await?;
            self.stream.shutdown().await
        };
        tokio::time::timeout(Duration::from_secs(1), answer).await.unwrap_or(Ok(()))
    }

    /// Runs `work` while watching the socket: `None` if the client closed the connection first.
    /// What the client sends meanwhile is kept for later, up to `limit` bytes.
    async fn while_present<T>(&mut self, work: impl std::future::Future<Output = T>, limit: usize) -> Option<T> {
        let gone = async {
            loop {
                if self.read.len() > limit {
                    return std::future::pending().await;
                }
                match self.stream.read_buf(&mut self.read).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        };
        tokio::select! {
            done = work => Some(done),
            () = gone => None,
        }
    }
}

/// Where a session's messages come from.
enum Link {
    /// A persistent session's own router link: the router queues for it while it is away.
    Router {
        /// Packets from the client into the router.
        tx: LinkTx,
        /// Packets from the router to the client.
        rx: LinkRx,
    },
    /// A clean session's seat in [`super::local`]; what it publishes reaches the router's
    /// subscribers through the link clean sessions share.
    Local { seat: Seat, out: Outgoing },
}

/// What a session's wait found to do.
// Lives on the stack for one step of the pump: boxing would cost an allocation per delivery.
#[allow(clippy::large_enum_variant)]
enum Woke {
    /// The hub closes the connection.
    Kicked,
    /// A persistent session's router link.
    Router(Result<Option<Notification>, ()>),
    /// A clean session's mailbox.
    Mail,
    /// The socket was read.
    Read(std::io::Result<usize>),
    /// The timer fired.
    Due,
}

/// The sources a session waits on, in the order it polls them ([`super::wakes`]): so that a
/// client that never stops sending is still closed when asked, and still gets what it is sent
/// (its deliveries in flight are bounded).
const KICK: usize = 0;
const LINK: usize = 1;
const READ: usize = 2;
const TIMER: usize = 3;

/// An established session.
struct Session<S> {
    /// The client's socket.
    conn: Conn<S>,
    /// The router link, or the seat of a clean session.
    link: Link,
    /// The client's own id, for logs (the router knows it by the claim's id).
    client_id: String,
    /// The client's address, for logs.
    peer: SocketAddr,
    /// 1.5 × the client's keepalive; `None` for keepalive 0.
    keepalive: Option<Duration>,
    /// Largest packet accepted.
    max_packet: usize,
    /// What all sessions share.
    shared: Arc<Shared>,
    /// Who the client is, for the ACL.
    identity: Identity,
    /// The hold on the client id: its router id, and the token that closes the session.
    claim: Claim,
    /// Acknowledgements, put in the router's order.
    acks: Acks,
    /// SUBSCRIBEs partly refused: per packet id, for each requested filter its index among the
    /// filters passed to the router, or `None` if refused (answered 0x80).
    pending_subscribes: HashMap<u16, Vec<Option<usize>>>,
    /// Packets for the router gathered while handling one batch, and settled deliveries waiting
    /// for company ([`ROUTER_ACK_BATCH`]).
    to_router: Vec<Packet>,
    /// When the oldest settled delivery in `to_router` must go, if only those wait there.
    acks_due: Option<Instant>,
    /// Retained QoS 2 publishes awaiting their PUBREL: kept on disk once the router has them.
    retained_on_release: HashMap<u16, (String, Option<Bytes>)>,
    /// A clean session's QoS 2 publishes awaiting their PUBREL, routed then (as the router does).
    held_for_release: HashMap<u16, Publish>,
    /// The will, published if the connection dies without DISCONNECT.
    will: Option<LastWill>,
    /// The keepalive (seconds) and clean-session flag the client asked for, for the log.
    asked: (u16, bool),
    /// When the client last sent something.
    heard: Instant,
    /// When the socket was last read, whether or not something was there.
    checked: Instant,
    /// The socket's receive low-water mark ([`super::socket`]); `None` if it could not be set.
    low_water: Option<usize>,
    /// What the client sent since the last flush was put in other sessions' mailboxes.
    woke_others: bool,
    /// Deliveries taken from the mailbox to be written (kept, so that writing them allocates nothing).
    batch: Vec<Delivery>,
    /// A write waited on the kick with the task's own waker: the pump polls it again.
    kick_polled_elsewhere: bool,
}

impl<S: Socket> Session<S> {
    /// Gives the accepted client its client id (refusing one another identity holds) and opens its
    /// router link; returns the session and whether the router kept one under that id.
    async fn open(a: Accepted<S>, shared: &Arc<Shared>) -> Option<(Session<S>, bool)> {
        let Accepted { mut conn, peer, connect, will, identity, max_packet } = a;
        let client_id = match connect.client_id.is_empty() {
            // MQTT 3.1.1 §3.1.3-6: the server assigns one.
            true => format!("auto-{:016x}", rand_u64()),
            false => connect.client_id,
        };
        let clean = connect.clean_session;
        let claim = match shared.sessions.claim(&client_id, &identity, clean).await {
            Ok(claim) => claim,
            Err(e) => {
                let code = match e {
                    ClaimError::Taken => ConnectReturnCode::ClientIdentifierNotValid,
                    ClaimError::StillClosing | ClaimError::Full => ConnectReturnCode::ServiceUnavailable,
                };
                warn!(%peer, client = %client_id, user = identity.name(), reason = %e, "connection refused");
                let _ = conn.refuse(code).await;
                return None;
            }
        };
        let (link, session_present) = if clean {
            let seat = shared.router.local.join(&claim.router_id);
            (Link::Local { seat, out: Outgoing::default() }, false)
        } else {
            let links = shared.router.links.clone();
            let (router_id, purge) = (claim.router_id.clone(), claim.purge);
            // Opening a link waits for the router's answer on a blocking channel.
            let link =
                match tokio::task::spawn_blocking(move || super::open_link(&links, &router_id, purge, clean)).await {
                    Ok(opened) => opened.map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
            let (tx, rx, ack) = match link {
                Ok(link) => link,
                Err(error) => {
                    warn!(%peer, client = %client_id, %error, "connection refused: the router refused the link");
                    shared.sessions.release(&claim);
                    let _ = conn.refuse(ConnectReturnCode::ServiceUnavailable).await;
                    return None;
                }
            };
            let router_ack: Option<Packet> = ack.into();
            let present = matches!(router_ack, Some(Packet::ConnAck(ConnAck { session_present: true, .. }, _)));
            (Link::Router { tx, rx }, present)
        };
        let keepalive = (connect.keep_alive > 0).then(|| Duration::from_millis(u64::from(connect.keep_alive) * 1500));
        let session = Session {
            conn,
            link,
            client_id,
            peer,
            keepalive,
            max_packet,
            shared: Arc::clone(shared),
            identity,
            claim,
            acks: Acks::default(),
            pending_subscribes: HashMap::new(),
            to_router: Vec::new(),
            acks_due: None,
            retained_on_release: HashMap::new(),
            held_for_release: HashMap::new(),
            will,
            asked: (connect.keep_alive, clean),
            heard: Instant::now(),
            checked: Instant::now(),
            low_water: Some(1),
            woke_others: false,
            batch: Vec::new(),
            kick_polled_elsewhere: false,
        };
        Some((session, session_present))
    }

    /// Answers CONNACK, announces the client to the house and moves packets until the end.
    async fn serve(&mut self, session_present: bool) -> End {
        let connack = Packet::ConnAck(ConnAck { session_present, code: ConnectReturnCode::Success }, None);
        if let Err(e) = self.conn.send(connack).await {
            return End::Lost(e.to_string());
        }
        let (keepalive, clean) = self.asked;
        info!(peer = %self.peer, client = %self.client_id, user = self.identity.name(), keepalive, clean, session_present, "client connected");
        self.shared.house.connection(&self.identity, true);
        self.pump().await
    }

    /// Ends the session: the router link first (a connection taking the client id over opens it
    /// next), then the will of a connection that died, then the device's `offline`, so that the
    /// hub's word on availability comes last; a taken-over connection publishes neither.
    async fn close(self, end: End) {
        let Session { link, client_id, mut conn, claim, identity, shared, peer, will, to_router, .. } = self;
        match (matches!(end, End::Router), link) {
            (true, _) => shared.sessions.router_dropped(),
            (false, Link::Router { mut tx, .. }) => {
                // Deliveries the client settled are settled for the router too, before a
                // persistent session is put away.
                tx.buffer().extend(to_router);
                drop(disconnect_link(&mut tx).await);
            }
            (false, Link::Local { seat, .. }) => {
                shared.router.local.leave(&seat);
                shared.router.forward.send(to_router.into_iter());
            }
        }
        let replaced = shared.sessions.is_replaced(&claim);
        if !replaced {
            if let (End::Lost(_), Some(will)) = (&end, will) {
                publish_will(&shared, &identity, &client_id, will);
            }
            shared.house.connection(&identity, false);
        }
        // Lets a connection waiting to take the client id over go on.
        shared.sessions.release(&claim);
        drop(claim);
        let _ = tokio::time::timeout(Duration::from_secs(1), conn.stream.shutdown()).await;
        match end {
            End::Clean => info!(%peer, client = %client_id, "client disconnected"),
            End::Router => warn!(%peer, client = %client_id, "client closed by the router"),
            End::Kicked if replaced => {
                info!(%peer, client = %client_id, "client replaced by a new connection with the same id")
            }
            End::Kicked => info!(%peer, client = %client_id, "client closed: its credentials or its device changed"),
            End::HubClosing => info!(%peer, client = %client_id, "client closed: hub shutting down"),
            End::Lost(reason) => info!(%peer, client = %client_id, %reason, "client connection lost"),
        }
    }

    /// Moves packets both ways until the session ends.
    async fn pump(&mut self) -> End {
        // Only what the client sends keeps it alive (MQTT 3.1.1 §3.1.2.10).
        self.heard = Instant::now();
        // One timer for every deadline, made once and moved only when it fires or a deadline comes
        // sooner: made anew, it would register with the runtime's timer, and leave it, at every wake-up.
        let timer = tokio::time::sleep_until(self.next_due());
        tokio::pin!(timer);
        let mut sources = Sources::<4>::new();
        loop {
            match self.wait(&mut sources, timer.as_mut()).await {
                Woke::Kicked => return self.stopped().await,
                Woke::Router(Ok(Some(n))) => {
                    if let Err(end) = self.handle_outgoing(n).await {
                        return end;
                    }
                    if !self.flush_router().await {
                        return End::Router;
                    }
                }
                Woke::Router(Ok(None)) => {}
                Woke::Router(Err(())) => return End::Router,
                Woke::Mail => {
                    // The answers first: they make room for the deliveries. Read after them, they
                    // would often come with the next delivery's answer, which crosses the socket's
                    // mark: a wake-up for nothing (BENCHMARKS.md, "the deliveries before the answers").
                    let end = if self.answers_unread() { self.read_arrived() } else { None };
                    if let Err(end) = self.answer().await {
                        return end;
                    }
                    if let Some(end) = end {
                        return end;
                    }
                }
                Woke::Read(read) => {
                    match read {
                        Ok(0) => return End::Lost("connection closed by peer".into()),
                        Err(e) => return End::Lost(e.to_string()),
                        Ok(_) => {}
                    }
                    self.heard = Instant::now();
                    self.checked = self.heard;
                    let end = self.handle_incoming();
                    if let Err(end) = self.answer().await {
                        return end;
                    }
                    if let Some(end) = end {
                        return end;
                    }
                }
                Woke::Due => {
                    if let Err(end) = self.due().await {
                        return end;
                    }
                    // Polled again, as every source that was ready.
                    timer.as_mut().reset(self.next_due());
                }
            }
            // A deadline that came sooner (answers left unread, settled deliveries waiting).
            let due = self.next_due();
            if due < timer.deadline() {
                timer.as_mut().reset(due);
                sources.mark(TIMER);
            }
            if std::mem::take(&mut self.kick_polled_elsewhere) {
                sources.mark(KICK);
            }
        }
    }

    /// Waits for something to do, polling only the sources that woke the task ([`super::wakes`]).
    async fn wait(&mut self, sources: &mut Sources<4>, mut timer: Pin<&mut Sleep>) -> Woke {
        let Session { conn, link, claim, .. } = self;
        let kick = &claim.kick;
        // The router's `next` forgets the task once dropped: a persistent session polls it at each wait.
        let (router, local) = match link {
            Link::Router { rx, .. } => {
                sources.mark(LINK);
                (Some(rx.next()), None)
            }
            Link::Local { seat, out } => (None, Some((&*seat, &*out))),
        };
        let mut router = std::pin::pin!(router);
        std::future::poll_fn(|cx| {
            sources.begin(cx);
            if sources.poll(KICK, |cx| kick.poll_fired(cx)).is_ready() {
                return Poll::Ready(Woke::Kicked);
            }
            if let Some(next) = router.as_mut().as_pin_mut() {
                if let Poll::Ready(n) = sources.poll(LINK, |cx| next.poll(cx)) {
                    return Poll::Ready(Woke::Router(n.map_err(drop)));
                }
            }
            // A client with every delivery unanswered gets more once it answers: until then its
            // mailbox stays due, and is looked at again after each answer.
            if let Some((seat, _)) = local.filter(|(_, out)| out.room() > 0) {
                if sources.poll(LINK, |cx| seat.mailbox.poll_ready(cx)).is_ready() {
                    return Poll::Ready(Woke::Mail);
                }
            }
            let read = |cx: &mut Context<'_>| std::pin::pin!(conn.stream.read_buf(&mut conn.read)).poll(cx);
            if let Poll::Ready(read) = sources.poll(READ, read) {
                return Poll::Ready(Woke::Read(read));
            }
            if sources.poll(TIMER, |cx| timer.as_mut().poll(cx)).is_ready() {
                return Poll::Ready(Woke::Due);
            }
            Poll::Pending
        })
        .await
    }

    /// When the timer must next fire: the client's keepalive, the answers it owes left unread,
    /// settled deliveries waiting for company.
    fn next_due(&self) -> Instant {
        let mut due = self.heard + self.keepalive.unwrap_or(NO_KEEPALIVE);
        if self.answers_unread() {
            due = due.min(self.checked + ANSWERS_UNREAD);
        }
        if let Some(at) = self.acks_due {
            due = due.min(at);
        }
        due
    }

    /// The timer fired: answers left unread too long are read (they keep the client alive too),
    /// a client silent past its keepalive is closed, settled deliveries due go to the router.
    async fn due(&mut self) -> Result<(), End> {
        let now = Instant::now();
        let silent = |s: &Self| s.keepalive.is_some_and(|keepalive| now >= s.heard + keepalive);
        if self.answers_unread() && (silent(self) || now >= self.checked + ANSWERS_UNREAD) {
            let end = self.read_arrived();
            if let Some(end) = self.answer().await.err().or(end) {
                return Err(end);
            }
        }
        if silent(self) {
            return Err(End::Lost("keepalive timeout".into()));
        }
        if self.acks_due.is_some_and(|at| now >= at) && !self.send_to_router().await {
            return Err(End::Router);
        }
        Ok(())
    }

    /// After reading: the deliveries that found room, the socket's mark for the answers they
    /// bring, then the router first (a QoS 1 PUBLISH is acknowledged once the router has it) and
    /// the client.
    async fn answer(&mut self) -> Result<(), End> {
        self.deliver_local();
        self.expect_answers();
        if !self.flush_router().await {
            return Err(End::Router);
        }
        // The sessions given the client's messages write them before it hears its answers, as a
        // one-thread broker does: a write wakes its reader, who may take this core before the next.
        if std::mem::take(&mut self.woke_others) {
            step_aside().await;
        }
        self.flush_client().await
    }

    /// Whether answers may wait in the socket, read by no one (the mark is above one byte).
    fn answers_unread(&self) -> bool {
        self.low_water.is_some_and(|mark| mark > 1)
    }

    /// Sets the socket's low-water mark one byte above the PUBACKs a clean session is owed, so
    /// that they wake no one and anything more does ([`super::socket`]). The mark is one byte
    /// while a QoS 2 delivery is in flight (its flow goes on at each answer) or half the room in
    /// flight is taken (the answers make room for the next deliveries).
    fn expect_answers(&mut self) {
        let (Some(mark), Link::Local { out, .. }) = (self.low_water, &self.link) else { return };
        let owed = out.owed_pubacks().filter(|owed| *owed <= super::local::MAX_INFLIGHT / 2).unwrap_or(0);
        let wanted = owed * self.conn.stream.ack_bytes() + 1;
        if wanted == mark {
            return;
        }
        self.low_water = match self.conn.stream.set_low_water(wanted) {
            Ok(()) => Some(wanted),
            Err(e) => {
                warn!(client = %self.client_id, error = %e, "could not set the socket's receive low-water mark: answers are read as they come");
                let _ = self.conn.stream.set_low_water(1);
                None
            }
        };
    }

    /// Reads and acts on what the client sent that woke no one: the answers it owes, and maybe
    /// what came with them.
    fn read_arrived(&mut self) -> Option<End> {
        self.checked = Instant::now();
        match self.conn.stream.read_arrived(&mut self.conn.read) {
            Ok(arrived) => {
                if arrived.read > 0 {
                    self.heard = self.checked;
                    if let Some(end) = self.handle_incoming() {
                        return Some(end);
                    }
                }
                arrived.closed.then(|| End::Lost("connection closed by peer".into()))
            }
            Err(e) => Some(End::Lost(e.to_string())),
        }
    }

    /// Writes what is queued for the client; a client that does not read for [`WRITE_TIMEOUT`],
    /// or a session the hub closes meanwhile, ends here rather than holding the session.
    async fn flush_client(&mut self) -> Result<(), End> {
        let (conn, kick) = (&mut self.conn, &self.claim.kick);
        let written = {
            let flush = conn.flush();
            tokio::pin!(flush);
            // Nearly always written at once: then neither the timer nor the token is set up.
            match std::future::poll_fn(|cx| Poll::Ready(flush.as_mut().poll(cx))).await {
                Poll::Ready(written) => Some(Ok(written)),
                Poll::Pending => {
                    self.kick_polled_elsewhere = true;
                    tokio::select! {
                        biased;
                        written = tokio::time::timeout(WRITE_TIMEOUT, flush) => Some(written),
                        () = kick.fired() => None,
                    }
                }
            }
        };
        match written {
            Some(Ok(Ok(()))) => Ok(()),
            Some(Ok(Err(e))) => Err(End::Lost(e.to_string())),
            Some(Err(_)) => Err(End::Lost("write timeout: the client does not read".into())),
            None => Err(self.stopped().await),
        }
    }

    /// Why the session's kick fired: the client id taken over or its rights revoked, or the hub
    /// closing (then what is queued for the client is written first).
    async fn stopped(&mut self) -> End {
        if !self.shared.closing.is_cancelled() {
            return End::Kicked;
        }
        self.drain().await;
        End::HubClosing
    }

    /// Sends what was gathered for the router with one wake-up, unless only settled deliveries
    /// wait there, fewer than [`ROUTER_ACK_BATCH`]: those wait for company until they are due.
    /// False if the router is gone.
    async fn flush_router(&mut self) -> bool {
        let only_acks = self.to_router.iter().all(|p| matches!(p, Packet::PubAck(..) | Packet::PubComp(..)));
        if only_acks && self.to_router.len() < ROUTER_ACK_BATCH {
            if self.to_router.is_empty() {
                self.acks_due = None;
            } else if self.acks_due.is_none() {
                self.acks_due = Some(Instant::now() + ROUTER_ACK_LINGER);
            }
            return true;
        }
        self.send_to_router().await
    }

    /// Sends everything gathered for the router with one wake-up; false if the router is gone.
    async fn send_to_router(&mut self) -> bool {
        self.acks_due = None;
        // A send into the router blocks while its inbox is full; the router drains it on its own
        // thread and never waits for a session (it only try-sends to links). On the daemon's
        // current-thread runtime the wait is brief and stalls the sessions with it, as one
        // thread's broker does; on a multi-thread runtime (some tests), tell the runtime first.
        let runtime = tokio::runtime::Handle::current();
        let tell_runtime = runtime.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
            && (self.shared.router.backlog)() > super::ROUTER_INBOX / 2;
        let Link::Router { tx: link_tx, .. } = &mut self.link else {
            let (forward, packets) = (&self.shared.router.forward, self.to_router.drain(..));
            return match tell_runtime {
                true => tokio::task::block_in_place(|| forward.send(packets)),
                false => forward.send(packets),
            };
        };
        let Some(last) = self.to_router.pop() else {
            return true;
        };
        link_tx.buffer().extend(self.to_router.drain(..));
        match tell_runtime {
            true => tokio::task::block_in_place(|| runtime.block_on(link_tx.send(last)).is_ok()),
            false => link_tx.send(last).await.is_ok(),
        }
    }

    /// Writes a packet to the client's write buffer (sent at the next flush).
    fn queue(&mut self, packet: Packet) {
        if let Err(e) = V4.write(packet, &mut self.conn.write) {
            warn!(client = %self.client_id, error = %e, "could not encode a packet");
        }
    }

    /// Writes an acknowledgement to the client's write buffer: four bytes, without building a packet.
    fn queue_ack(&mut self, ack: Ack) {
        self.conn.write.extend_from_slice(&ack_bytes(ack));
    }

    /// Sends what the acknowledgement state asks: to the router (gathered) and to the client.
    fn apply(&mut self, sends: Sends) {
        for ack in sends.router {
            if let Ack::PubRel(pkid) = ack {
                if let Some((topic, payload)) = self.retained_on_release.remove(&pkid) {
                    self.shared.retain(topic, payload);
                }
            }
            self.to_router.push(ack_packet(ack));
        }
        for ack in sends.client {
            self.queue_ack(ack);
        }
    }

    /// Decodes every complete packet in the read buffer and acts on it.
    fn handle_incoming(&mut self) -> Option<End> {
        // Nearly every read ends on a packet's last byte: then the decoder is not asked again.
        while !self.conn.read.is_empty() {
            // QoS and packet id of a PUBLISH, read from its bytes: rumqttd keeps those fields private.
            let meta = publish_meta(&self.conn.read);
            let packet = match V4.read_mut(&mut self.conn.read, self.max_packet) {
                Ok(p) => p,
                Err(rumqttd::protocol::Error::InsufficientBytes(_)) => return None,
                Err(e) => {
                    warn!(peer = %self.peer, client = %self.client_id, error = %e, "closing: bad packet");
                    return Some(End::Lost(format!("bad packet: {e}")));
                }
            };
            match packet {
                Packet::Publish(publish, _) => {
                    let (qos, pkid) = meta.unwrap_or((0, 0));
                    if let Some(end) = self.incoming_publish(publish, qos, pkid) {
                        return Some(end);
                    }
                }
                Packet::Subscribe(subscribe, _) => self.incoming_subscribe(subscribe),
                Packet::Unsubscribe(unsubscribe, _) => self.incoming_unsubscribe(unsubscribe),
                Packet::PubAck(ack, _) => match &mut self.link {
                    Link::Local { out, .. } => out.puback(ack.pkid),
                    Link::Router { .. } => {
                        let sends = self.acks.puback(ack.pkid);
                        self.apply(sends);
                    }
                },
                Packet::PubRec(rec, _) => match &mut self.link {
                    Link::Local { out, .. } => {
                        if out.pubrec(rec.pkid) {
                            self.queue_ack(Ack::PubRel(rec.pkid));
                        }
                    }
                    Link::Router { .. } => {
                        let sends = self.acks.pubrec(rec.pkid);
                        self.apply(sends);
                    }
                },
                Packet::PubRel(rel, _) => {
                    if let Some(publish) = self.held_for_release.remove(&rel.pkid) {
                        let name = publish.topic.clone();
                        // The guard read it as text when it came: this never fails.
                        if let Ok(topic) = std::str::from_utf8(&name) {
                            self.route_local(publish, topic, 2);
                        }
                    }
                    let sends = self.acks.pubrel(rel.pkid);
                    self.apply(sends);
                }
                Packet::PubComp(comp, _) => match &mut self.link {
                    Link::Local { out, .. } => out.pubcomp(comp.pkid),
                    Link::Router { .. } => {
                        let sends = self.acks.pubcomp(comp.pkid);
                        self.apply(sends);
                    }
                },
                Packet::PingReq(_) => self.queue(Packet::PingResp(PingResp)),
                Packet::Disconnect(..) => return Some(End::Clean),
                Packet::Connect(..) => {
                    warn!(client = %self.client_id, "closing: second CONNECT on a connection");
                    return Some(End::Lost("second CONNECT".into()));
                }
                other => {
                    warn!(client = %self.client_id, packet = ?other, "closing: packet a client may not send");
                    return Some(End::Lost("unexpected packet".into()));
                }
            }
        }
        None
    }

    /// Checks a PUBLISH and passes it to the router, or refuses it.
    fn incoming_publish(&mut self, mut publish: Publish, qos: u8, pkid: u16) -> Option<End> {
        // The topic's bytes are shared, not copied: `publish` moves on while the name is read.
        let name = publish.topic.clone();
        let topic = match guard::topic(&name) {
            Ok(topic) => topic,
            Err(e) => {
                let shown = guard::shown(&String::from_utf8_lossy(&publish.topic));
                warn!(client = %self.client_id, topic = %shown, reason = %e, "closing: publish to a topic the hub does not take");
                self.shared.report_error(&shown, &self.client_id, &format!("topic {e}"));
                return Some(End::Lost(format!("publish to a refused topic ({e})")));
            }
        };
        // A QoS 2 message the router already has (or the hub refused) is answered, never handled twice.
        if qos == 2 && self.acks.awaiting_release(pkid) {
            self.queue_ack(Ack::PubRec(pkid));
            return None;
        }
        match inspect(&self.shared, &self.identity, &self.client_id, topic, &publish.payload) {
            Ok(replacement) => {
                if let Some(payload) = replacement {
                    publish.payload = payload;
                }
            }
            Err(reason) => {
                warn!(client = %self.client_id, user = self.identity.name(), topic = %guard::shown(topic), %reason, "publish refused");
                return self.refuse_publish(topic, &reason, qos, pkid);
            }
        }
        let local = matches!(self.link, Link::Local { .. });
        let overflow = match (qos, local) {
            (2, true) => !self.acks.answered_qos2(pkid),
            (2, false) => self.acks.incoming_qos2(pkid) == Incoming::Overflow,
            _ => false,
        };
        if overflow {
            warn!(client = %self.client_id, "closing: too many QoS 2 messages awaiting release");
            return Some(End::Lost("too many QoS 2 messages awaiting release".into()));
        }
        if local {
            match qos {
                // Routed once released, as the router does: a message its publisher never
                // releases reaches no one.
                2 => {
                    self.held_for_release.insert(pkid, publish);
                    self.queue_ack(Ack::PubRec(pkid));
                }
                1 => {
                    self.route_local(publish, topic, 1);
                    self.queue_ack(Ack::PubAck(pkid));
                }
                _ => self.route_local(publish, topic, 0),
            }
            return None;
        }
        // Clean sessions subscribed get it now; the router those it serves.
        let local = &self.shared.router.local;
        let reach = local.publish_named(&publish.topic, topic, &publish.payload, qos, publish.retain);
        self.woke_others |= reach.sessions > 0;
        if publish.retain {
            let payload = (!publish.payload.is_empty()).then(|| publish.payload.clone());
            // The router takes a QoS 2 message only once it is released: so does the disk.
            match qos {
                2 => drop(self.retained_on_release.insert(pkid, (topic.to_owned(), payload))),
                _ => self.shared.retain(topic.to_owned(), payload),
            }
        }
        // The router delivers at the subscription's QoS; the publish QoS travels with the message
        // (in a field MQTT 3.1.1 never sees) so that the receiving session can lower it.
        let props = PublishProperties { payload_format_indicator: Some(qos), ..Default::default() };
        if qos == 1 {
            // Answered here, in order with every other QoS 1 PUBLISH of the connection, and written
            // to the client once the router has the message (`pump` flushes the router first). The
            // router gets it at QoS 0: it would only answer PUBACK, a hand-over between the router's
            // thread and this one for every message, and it delivers at the subscriptions' QoS anyway.
            let at_most_once = Publish::new(publish.topic, publish.payload, publish.retain);
            self.to_router.push(Packet::Publish(at_most_once, Some(props)));
            self.queue_ack(Ack::PubAck(pkid));
        } else {
            self.to_router.push(Packet::Publish(publish, Some(props)));
        }
        None
    }

    /// Routes a clean session's accepted PUBLISH (its topic read as `topic`): to the clean sessions
    /// it matches, to the router if its subscribers match it (see [`super::local`]), and to the disk
    /// if retained.
    fn route_local(&mut self, publish: Publish, topic: &str, qos: u8) {
        let local = &self.shared.router.local;
        let reach = local.publish_named(&publish.topic, topic, &publish.payload, qos, publish.retain);
        self.woke_others |= reach.sessions > 0;
        if reach.router {
            let props = PublishProperties { payload_format_indicator: Some(qos), ..Default::default() };
            let at_most_once = Publish::new(publish.topic.clone(), publish.payload.clone(), publish.retain);
            self.to_router.push(Packet::Publish(at_most_once, Some(props)));
        }
        if publish.retain {
            self.shared.retain(topic.to_owned(), (!publish.payload.is_empty()).then_some(publish.payload));
        }
    }

    /// Drops a PUBLISH: reports it on `dpi/hub/error` and acknowledges it as MQTT 3.1.1 brokers
    /// do, so that the client does not resend it forever.
    fn refuse_publish(&mut self, topic: &str, reason: &str, qos: u8, pkid: u16) -> Option<End> {
        self.shared.report_error(topic, &self.client_id, reason);
        match qos {
            1 => self.queue_ack(Ack::PubAck(pkid)),
            2 => {
                if !self.acks.answered_qos2(pkid) {
                    return Some(End::Lost("too many QoS 2 messages awaiting release".into()));
                }
                self.queue_ack(Ack::PubRec(pkid));
            }
            _ => {}
        }
        None
    }

    /// Passes the allowed filters of a SUBSCRIBE to the router; refused ones get 0x80.
    fn incoming_subscribe(&mut self, subscribe: Subscribe) {
        let pkid = subscribe.pkid;
        let mut slots = Vec::with_capacity(subscribe.filters.len());
        let mut allowed = Vec::new();
        for filter in subscribe.filters {
            match self.may_subscribe(&filter.path) {
                Ok(()) => {
                    slots.push(Some(allowed.len()));
                    allowed.push(filter);
                }
                Err(reason) => {
                    warn!(client = %self.client_id, user = self.identity.name(), filter = %guard::shown(&filter.path), %reason, "subscription refused");
                    slots.push(None);
                }
            }
        }
        if allowed.is_empty() {
            let return_codes = vec![SubscribeReasonCode::Failure; slots.len()];
            self.queue(Packet::SubAck(SubAck { pkid, return_codes }, None));
            return;
        }
        if let Link::Local { seat, .. } = &self.link {
            // Answered at once; the retained messages the filters match follow the SUBACK.
            let local = &self.shared.router.local;
            let return_codes = slots
                .iter()
                .map(|slot| match slot.and_then(|i| allowed.get(i)) {
                    Some(filter) => {
                        local.subscribe(seat, &filter.path, filter.qos as u8);
                        SubscribeReasonCode::Success(filter.qos)
                    }
                    None => SubscribeReasonCode::Failure,
                })
                .collect();
            self.queue(Packet::SubAck(SubAck { pkid, return_codes }, None));
            return;
        }
        for filter in &allowed {
            // Messages from clean sessions that this filter matches go to the router too.
            self.shared.router.local.want(&filter.path);
        }
        if slots.iter().any(Option::is_none) {
            self.pending_subscribes.insert(pkid, slots);
        }
        self.to_router.push(Packet::Subscribe(Subscribe { pkid, filters: allowed }, None));
    }

    /// The guard, the ACL and the session's limits on one filter.
    fn may_subscribe(&self, filter: &str) -> Result<(), String> {
        guard::filter(filter).map_err(|e| e.to_string())?;
        if !acl::may_subscribe(&self.identity, filter) {
            return Err("not allowed for this client".to_owned());
        }
        match self.shared.sessions.subscribe(&self.claim, &self.identity, filter) {
            FilterVerdict::Granted => Ok(()),
            FilterVerdict::TooMany => {
                Err(format!("more than {} subscriptions on one connection", guard::MAX_SUBSCRIPTIONS))
            }
            FilterVerdict::OverBudget => {
                Err("no room for another new filter (the router keeps each until the hub restarts)".to_owned())
            }
        }
    }

    /// Answers an UNSUBSCRIBE at once, and passes the router the filters the session holds (the
    /// router answers nothing for the others, and once per filter for several).
    fn incoming_unsubscribe(&mut self, unsubscribe: Unsubscribe) {
        let pkid = unsubscribe.pkid;
        let held: Vec<String> =
            unsubscribe.filters.into_iter().filter(|f| self.shared.sessions.unsubscribe(&self.claim, f)).collect();
        if let Link::Local { seat, .. } = &self.link {
            for filter in &held {
                self.shared.router.local.unsubscribe(seat, filter);
            }
        } else if !held.is_empty() {
            self.to_router.push(Packet::Unsubscribe(Unsubscribe { pkid, filters: held }, None));
        }
        self.queue(Packet::UnsubAck(UnsubAck { pkid, reasons: Vec::new() }, None));
    }

    /// Writes one router notification, and everything else already queued, to the client.
    async fn handle_outgoing(&mut self, first: Notification) -> Result<(), End> {
        let mut next = Some(first);
        let mut unscheduled = false;
        while let Some(n) = next {
            self.encode(n, &mut unscheduled).map_err(|e| match e.to_string() == ROUTER_DISCONNECTED {
                true => End::Router,
                false => End::Lost(e.to_string()),
            })?;
            next = match &mut self.link {
                Link::Router { rx, .. } => rx.recv_deadline(std::time::Instant::now()).ok().flatten(),
                Link::Local { .. } => None,
            };
        }
        self.flush_client().await?;
        if let (true, Link::Router { rx, .. }) = (unscheduled, &mut self.link) {
            // Only ever for this session's own link, which the router still holds (see the guard).
            rx.wake().await.map_err(|_| End::Router)?;
        }
        Ok(())
    }

    fn encode(&mut self, n: Notification, unscheduled: &mut bool) -> std::io::Result<()> {
        match n {
            Notification::Unschedule => *unscheduled = true,
            Notification::Forward(f) => self.forward(f.publish, f.properties),
            Notification::DeviceAck(ack) => match Option::<Packet>::from(Notification::DeviceAck(ack)) {
                Some(Packet::SubAck(mut suback, _)) => {
                    if let Some(slots) = self.pending_subscribes.remove(&suback.pkid) {
                        let granted = std::mem::take(&mut suback.return_codes);
                        suback.return_codes = slots
                            .iter()
                            .map(|slot| {
                                slot.and_then(|i| granted.get(i).copied()).unwrap_or(SubscribeReasonCode::Failure)
                            })
                            .collect();
                    }
                    self.queue(Packet::SubAck(suback, None));
                }
                Some(Packet::PubRel(rel, _)) => {
                    let sends = self.acks.router_pubrel(rel.pkid);
                    self.apply(sends);
                }
                // Answered by the session already.
                Some(Packet::UnsubAck(..)) => {}
                Some(packet) => self.queue(packet),
                None => {}
            },
            // MQTT 3.1.1 has no server DISCONNECT: the connection is simply closed.
            Notification::Disconnect(..) => return Err(std::io::Error::other(ROUTER_DISCONNECTED)),
            _ => {}
        }
        Ok(())
    }

    /// Writes a forwarded message at the lower of its publish QoS and the subscription's.
    fn forward(&mut self, publish: Publish, props: Option<PublishProperties>) {
        let start = self.conn.write.len();
        let (topic, payload, retain) = (publish.topic.clone(), publish.payload.clone(), publish.retain);
        self.queue(Packet::Publish(publish, None));
        let Some((sent_qos, pkid)) = publish_meta(&self.conn.write[start..]) else {
            return;
        };
        let wanted = props.and_then(|p| p.payload_format_indicator).unwrap_or(sent_qos).min(sent_qos);
        if wanted < sent_qos {
            self.conn.write.truncate(start);
            match wanted {
                0 => self.queue(Packet::Publish(Publish::new(topic, payload, retain), None)),
                _ => self.queue(Packet::Publish(publish_qos1(&topic, &payload, retain, pkid), None)),
            }
        }
        let sends = self.acks.delivered(pkid, sent_qos, wanted);
        self.apply(sends);
    }

    /// At shutdown: writes what the router already queued for this client (the hub's `offline`
    /// status among it), waiting a moment for stragglers.
    async fn drain(&mut self) {
        let until = Instant::now() + Duration::from_millis(250);
        let mut unscheduled = false;
        loop {
            let Link::Router { rx, .. } = &mut self.link else {
                self.deliver_local();
                break;
            };
            let Ok(Ok(Some(n))) = tokio::time::timeout_at(until, rx.next()).await else { break };
            if self.encode(n, &mut unscheduled).is_err() {
                break;
            }
        }
        let _ = tokio::time::timeout(Duration::from_millis(250), self.conn.flush()).await;
    }

    /// Writes what waits in a clean session's mailbox, as far as its room in flight allows.
    fn deliver_local(&mut self) {
        let Link::Local { seat, out } = &mut self.link else { return };
        let batch = &mut self.batch;
        loop {
            let room = out.room();
            let emptied = seat.mailbox.take(room, batch);
            for delivery in batch.drain(..) {
                let pkid = out.send(delivery.qos);
                delivery.encode(pkid, &mut self.conn.write);
            }
            if emptied || out.room() == 0 {
                return;
            }
        }
    }
}

/// Lets the tasks this one woke run before it goes on: it wakes itself and steps aside once, to
/// the back of the runtime's queue (`tokio::task::yield_now` would poll the I/O driver first on a
/// current-thread runtime: a system call).
async fn step_aside() {
    let mut stepped = false;
    std::future::poll_fn(|cx| {
        if std::mem::replace(&mut stepped, true) {
            return Poll::Ready(());
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await;
}

/// The packet for an acknowledgement.
fn ack_packet(ack: Ack) -> Packet {
    match ack {
        Ack::PubAck(pkid) => Packet::PubAck(PubAck { pkid, reason: PubAckReason::Success }, None),
        Ack::PubRec(pkid) => Packet::PubRec(PubRec { pkid, reason: PubRecReason::Success }, None),
        Ack::PubRel(pkid) => Packet::PubRel(PubRel { pkid, reason: PubRelReason::Success }, None),
        Ack::PubComp(pkid) => Packet::PubComp(PubComp { pkid, reason: PubCompReason::Success }, None),
    }
}

/// An acknowledgement as it goes on the wire (MQTT 3.1.1 §3.4–3.7: PUBREL's header has flags 0010).
fn ack_bytes(ack: Ack) -> [u8; 4] {
    let (header, [hi, lo]) = match ack {
        Ack::PubAck(pkid) => (0x40, pkid.to_be_bytes()),
        Ack::PubRec(pkid) => (0x50, pkid.to_be_bytes()),
        Ack::PubRel(pkid) => (0x62, pkid.to_be_bytes()),
        Ack::PubComp(pkid) => (0x70, pkid.to_be_bytes()),
    };
    [header, 2, hi, lo]
}

/// QoS and packet id of the PUBLISH at the start of `buf`, if it is a complete-enough PUBLISH.
fn publish_meta(buf: &[u8]) -> Option<(u8, u16)> {
    let i = variable_header(buf, 3)?;
    let qos = (buf[0] >> 1) & 0b11;
    let topic_len = usize::from(u16_at(buf, i)?);
    let pkid = if qos > 0 { u16_at(buf, i + 2 + topic_len)? } else { 0 };
    Some((qos, pkid))
}

/// A QoS 1 PUBLISH with a given packet id (rumqttd's `Publish` keeps QoS and id private, but
/// its own serialisation format can carry them).
fn publish_qos1(topic: &Bytes, payload: &Bytes, retain: bool, pkid: u16) -> Publish {
    let mut b = BytesMut::with_capacity(5 + topic.len() + payload.len());
    b.put_u8(0b0011_0000 | u8::from(retain) | (1 << 1));
    b.put_u16(pkid);
    b.put_u16(u16::try_from(topic.len()).unwrap_or(u16::MAX));
    b.extend_from_slice(topic);
    b.extend_from_slice(payload);
    Publish::deserialize(b.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_id_length_is_read_from_the_start_of_a_connect() {
        let connect = |id: &str| {
            let mut buf = BytesMut::new();
            let c = rumqttd::protocol::Connect { keep_alive: 30, client_id: id.to_owned(), clean_session: true };
            V4.write(Packet::Connect(c, None, None, None, None), &mut buf).unwrap();
            buf
        };
        assert_eq!(connect_client_id_len(&connect("abc")), Some(3));
        let long = connect(&"x".repeat(20_000));
        assert_eq!(connect_client_id_len(&long[..20]), Some(20_000), "the header alone tells");
        assert_eq!(connect_client_id_len(&long[..5]), None);
        assert_eq!(connect_client_id_len(&[0x30, 0]), None);
    }

    #[test]
    fn acknowledgements_are_written_as_the_router_writes_them() {
        for pkid in [1, 255, 256, 513, u16::MAX] {
            for ack in [Ack::PubAck(pkid), Ack::PubRec(pkid), Ack::PubRel(pkid), Ack::PubComp(pkid)] {
                let mut theirs = BytesMut::new();
                V4.write(ack_packet(ack), &mut theirs).unwrap();
                assert_eq!(&theirs[..], &ack_bytes(ack), "{ack:?}");
            }
        }
    }

    #[test]
    fn publish_meta_reads_qos_and_packet_id() {
        let mut buf = BytesMut::new();
        V4.write(Packet::Publish(publish_qos1(&Bytes::from("a/b"), &Bytes::from("x"), false, 513), None), &mut buf)
            .unwrap();
        assert_eq!(publish_meta(&buf), Some((1, 513)));
        let mut buf = BytesMut::new();
        V4.write(Packet::Publish(Publish::new("t", "payload", true), None), &mut buf).unwrap();
        assert_eq!(publish_meta(&buf), Some((0, 0)));
        assert_eq!(publish_meta(&[0x30]), None);
        assert_eq!(publish_meta(&[0xC0, 0]), None);
    }
}
