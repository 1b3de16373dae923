//! One client's MQTT 3.1.1 session: CONNECT, authentication, then packets both ways between the
//! socket and the client's own router link until either side ends.
//!
//! The session answers what the router cannot: a CONNACK for every refusal (so a device can tell
//! a bad password from a network fault), keepalive measured on what the client sends (1.5 × its
//! value, none for 0), a second CONNECT closing the connection, PINGRESP without a router round
//! trip, and the will published once, only for a connection that died without DISCONNECT.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use std::collections::{HashMap, HashSet};

use bytes::{BufMut, Bytes, BytesMut};
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::{
    ConnAck, ConnectReturnCode, Disconnect, DisconnectReasonCode, LastWill, Packet, PingResp, Protocol, PubAck,
    PubAckReason, PubComp, PubCompReason, PubRec, PubRecReason, Publish, PublishProperties, SubAck, Subscribe,
    SubscribeReasonCode,
};
use rumqttd::Notification;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{acl, Shared, HANDSHAKE_TIMEOUT};
use crate::auth::{Identity, Presented, Refusal};
use crate::secret::Secret;

/// Room for the fixed header and topic beyond the payload limit.
const PACKET_OVERHEAD: usize = 1024;

/// Longest topic name accepted in a PUBLISH; longer ones close the connection.
pub const MAX_TOPIC_BYTES: usize = 512;

/// Runs a client session on an established (TLS or plain) stream.
pub async fn run<S>(stream: S, peer: SocketAddr, cert_cn: Option<String>, shared: Arc<Shared>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut conn = Conn { stream, read: BytesMut::with_capacity(1024), write: BytesMut::with_capacity(1024) };
    let max_packet = shared.limits.max_payload_bytes + PACKET_OVERHEAD;

    let first = match tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.read_packet(max_packet)).await {
        Ok(Ok(Some(packet))) => packet,
        Ok(Ok(None)) => return,
        Ok(Err(rumqttd::protocol::Error::InvalidProtocolLevel(level))) => {
            info!(%peer, level, "refused: unsupported MQTT protocol level (MQTT 3.1.1 only)");
            let _ = conn.refuse(ConnectReturnCode::RefusedProtocolVersion).await;
            return;
        }
        Ok(Err(e)) => {
            info!(%peer, error = %e, "closed: malformed CONNECT");
            return;
        }
        Err(_) => {
            debug!(%peer, "closed: no CONNECT in time");
            return;
        }
    };
    let Packet::Connect(connect, _, will, _, login) = first else {
        info!(%peer, "closed: first packet was not CONNECT");
        return;
    };

    let (username, password) = match login {
        Some(l) if !l.username.is_empty() => (Some(l.username), Some(Secret::new(l.password))),
        _ => (None, None),
    };
    if let Err(reason) = check_client_id(&connect.client_id, connect.clean_session) {
        warn!(%peer, client = %connect.client_id, %reason, "connection refused");
        let _ = conn.refuse(ConnectReturnCode::ClientIdentifierNotValid).await;
        return;
    }
    let user_for_log = username.clone().or_else(|| cert_cn.clone()).unwrap_or_default();
    let presented = Presented { client_id: connect.client_id.clone(), username, password, cert_cn };
    let identity = match shared.auth.check(presented).await {
        Ok(identity) => identity,
        Err(refusal) => {
            let code = match refusal {
                Refusal::Anonymous | Refusal::CertificateRequired | Refusal::UnknownCertificate(_) => {
                    ConnectReturnCode::NotAuthorized
                }
                Refusal::BadCredentials => ConnectReturnCode::BadUserNamePassword,
                Refusal::ClientId(_) => ConnectReturnCode::ClientIdentifierNotValid,
                Refusal::Unavailable(_) => ConnectReturnCode::ServiceUnavailable,
            };
            warn!(%peer, client = %connect.client_id, user = %user_for_log, reason = %refusal, "connection refused");
            let _ = conn.refuse(code).await;
            return;
        }
    };
    if let Some(w) = &will {
        let topic = String::from_utf8_lossy(&w.topic);
        if !acl::may_publish(&identity, &topic) {
            warn!(%peer, client = %connect.client_id, user = identity.name(), %topic, "connection refused: will topic not allowed");
            let _ = conn.refuse(ConnectReturnCode::NotAuthorized).await;
            return;
        }
    }
    let client_id = if connect.client_id.is_empty() {
        // MQTT 3.1.1 §3.1.3-6: the server assigns one.
        format!("auto-{:016x}", rand_u64())
    } else {
        connect.client_id.clone()
    };

    // Count the connection before it exists, so that racing connects cannot overshoot the limit.
    let connected = shared.connected.fetch_add(1, Ordering::AcqRel) + 1;
    let _slot = Slot(&shared);
    if connected > shared.limits.max_connections {
        warn!(%peer, client = %client_id, max = shared.limits.max_connections, "connection refused: too many connections");
        let _ = conn.refuse(ConnectReturnCode::ServiceUnavailable).await;
        return;
    }

    let links = shared.links.clone();
    let (id, clean) = (client_id.clone(), connect.clean_session);
    // Building a link waits for the router's answer on a blocking channel.
    let link = tokio::task::spawn_blocking(move || links(&id, clean)).await;
    let (link_tx, link_rx, ack) = match link {
        Ok(Ok(link)) => link,
        Ok(Err(e)) => {
            warn!(%peer, client = %client_id, error = %e, "connection refused: router refused the link");
            let _ = conn.refuse(ConnectReturnCode::ServiceUnavailable).await;
            return;
        }
        Err(e) => {
            warn!(%peer, client = %client_id, error = %e, "connection refused: link task failed");
            return;
        }
    };
    let router_ack: Option<Packet> = ack.into();
    let session_present = matches!(router_ack, Some(Packet::ConnAck(ConnAck { session_present: true, .. }, _)));
    if conn.send(Packet::ConnAck(ConnAck { session_present, code: ConnectReturnCode::Success }, None)).await.is_err() {
        let mut link_tx = link_tx;
        let _ = disconnect_link(&mut link_tx).await;
        return;
    }
    info!(%peer, client = %client_id, user = identity.name(), keepalive = connect.keep_alive, "client connected");
    let device = match &identity {
        Identity::Device { id, .. } => Some(id.clone()),
        Identity::User { .. } => None,
    };
    if let Some(id) = &device {
        shared.availability(id, true);
    }

    let mut session = Session {
        conn,
        link_tx,
        link_rx,
        client_id,
        peer,
        keepalive: (connect.keep_alive > 0).then(|| Duration::from_millis(u64::from(connect.keep_alive) * 1500)),
        max_packet,
        shared: shared.clone(),
        identity,
        pending_subscribes: HashMap::new(),
        refused_qos2: HashSet::new(),
        downgraded: HashMap::new(),
        to_router: Vec::new(),
    };
    let end = session.pump().await;
    let Session { mut link_tx, client_id, mut conn, .. } = session;
    // A replaced connection's successor already announced the device online.
    if let (Some(id), false) = (&device, matches!(end, End::Router)) {
        shared.availability(id, false);
    }
    match &end {
        End::Router => {}
        _ => {
            let _ = disconnect_link(&mut link_tx).await;
        }
    }
    let _ = conn.stream.shutdown().await;
    match (end, will) {
        (End::Clean, _) => info!(%peer, client = %client_id, "client disconnected"),
        (End::Router, _) => info!(%peer, client = %client_id, "client replaced by a new connection with the same id"),
        (End::HubClosing, _) => info!(%peer, client = %client_id, "client closed: hub shutting down"),
        (End::Lost(reason), will) => {
            info!(%peer, client = %client_id, %reason, "client connection lost");
            if let Some(LastWill { topic, message, retain, .. }) = will {
                debug!(client = %client_id, topic = %String::from_utf8_lossy(&topic), "publishing will");
                shared.hub.publish(String::from_utf8_lossy(&topic).into_owned(), message, retain);
            }
        }
    }
}

/// Releases a connection slot when the session ends, whatever the path.
struct Slot<'a>(&'a Shared);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.connected.fetch_sub(1, Ordering::AcqRel);
        self.0.ended.fetch_add(1, Ordering::Relaxed);
    }
}

/// MQTT-level checks on the requested client id, before credentials are looked at.
fn check_client_id(requested: &str, clean: bool) -> Result<(), String> {
    if requested.is_empty() && !clean {
        return Err("an empty client id needs clean session".into());
    }
    if requested.chars().any(|c| c.is_control() || "+#/$".contains(c)) {
        return Err("client id holds a control character or one of + # / $".into());
    }
    Ok(())
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
    /// The router dropped the link (another connection took the client id).
    Router,
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

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    /// Reads one packet; `None` when the peer closed the connection cleanly between packets.
    async fn read_packet(&mut self, max: usize) -> Result<Option<Packet>, rumqttd::protocol::Error> {
        loop {
            match V4.read_mut(&mut self.read, max) {
                Ok(packet) => return Ok(Some(packet)),
                Err(rumqttd::protocol::Error::InsufficientBytes(_)) => {}
                Err(e) => return Err(e),
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
        self.send(Packet::ConnAck(ConnAck { session_present: false, code }, None)).await?;
        self.stream.shutdown().await
    }
}

/// What the session owes the router for an outgoing message it sent the client at a lower QoS
/// than the router did (MQTT 3.1.1 §3.8.4: delivered QoS is the lower of publish and subscription).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Downgrade {
    /// Router sent QoS 2, client got QoS 1: its PUBACK becomes the router's PUBREC.
    TwoToOne,
    /// The router's PUBREL for this id is answered with PUBCOMP here, not passed to the client.
    AwaitingRelease,
}

/// An established session.
struct Session<S> {
    /// The client's socket.
    conn: Conn<S>,
    /// Packets from the client into the router.
    link_tx: LinkTx,
    /// Packets from the router to the client.
    link_rx: LinkRx,
    /// The id registered with the router, for logs.
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
    /// SUBSCRIBEs partly refused: per packet id, for each requested filter its index among the
    /// filters passed to the router, or `None` if refused (answered 0x80).
    pending_subscribes: HashMap<u16, Vec<Option<usize>>>,
    /// Ids of refused QoS 2 publishes, whose PUBREL the session answers itself.
    refused_qos2: HashSet<u16>,
    /// Outgoing packet ids delivered at a lower QoS than the router used.
    downgraded: HashMap<u16, Downgrade>,
    /// Packets for the router gathered while handling one batch.
    to_router: Vec<Packet>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// Moves packets both ways until the session ends.
    async fn pump(&mut self) -> End {
        let mut deadline = self.keepalive.map(|k| Instant::now() + k);
        loop {
            let keepalive = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                read = self.conn.stream.read_buf(&mut self.conn.read) => {
                    match read {
                        Ok(0) => return End::Lost("connection closed by peer".into()),
                        Err(e) => return End::Lost(e.to_string()),
                        Ok(_) => {}
                    }
                    // Only what the client sends keeps it alive (MQTT 3.1.1 §3.1.2.10).
                    deadline = self.keepalive.map(|k| Instant::now() + k);
                    let end = self.handle_incoming().await;
                    if let Err(e) = self.conn.flush().await {
                        return End::Lost(e.to_string());
                    }
                    if !self.flush_router().await {
                        return End::Router;
                    }
                    if let Some(end) = end {
                        return end;
                    }
                }
                notification = self.link_rx.next() => {
                    match notification {
                        Ok(Some(n)) => {
                            if let Err(e) = self.handle_outgoing(n).await {
                                return End::Lost(e.to_string());
                            }
                            if !self.flush_router().await {
                                return End::Router;
                            }
                        }
                        Ok(None) => {}
                        Err(_) => return End::Router,
                    }
                }
                () = keepalive => return End::Lost("keepalive timeout".into()),
                () = self.shared.closing.cancelled() => {
                    self.drain().await;
                    return End::HubClosing;
                }
            }
        }
    }

    /// Sends what was gathered for the router with one wake-up; false if the router is gone.
    async fn flush_router(&mut self) -> bool {
        let Some(last) = self.to_router.pop() else {
            return true;
        };
        self.link_tx.buffer().extend(self.to_router.drain(..));
        // `LinkTx::send` blocks when the router's inbox is full. Far from full (the usual case),
        // it cannot; close to full, tell the runtime first so that other sessions keep running.
        let runtime = tokio::runtime::Handle::current();
        let crowded = (self.shared.backlog)() > super::ROUTER_INBOX / 2;
        if crowded && runtime.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread {
            let link_tx = &mut self.link_tx;
            tokio::task::block_in_place(|| runtime.block_on(link_tx.send(last)).is_ok())
        } else {
            self.link_tx.send(last).await.is_ok()
        }
    }

    /// Writes a packet to the client's write buffer (sent at the next flush).
    fn queue(&mut self, packet: Packet) {
        if let Err(e) = V4.write(packet, &mut self.conn.write) {
            warn!(client = %self.client_id, error = %e, "could not encode a packet");
        }
    }

    /// Decodes every complete packet in the read buffer and acts on it.
    async fn handle_incoming(&mut self) -> Option<End> {
        loop {
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
                Packet::PubRel(rel, _) if self.refused_qos2.remove(&rel.pkid) => {
                    self.queue(Packet::PubComp(PubComp { pkid: rel.pkid, reason: PubCompReason::Success }, None));
                }
                Packet::PubAck(ack, _) if self.downgraded.get(&ack.pkid) == Some(&Downgrade::TwoToOne) => {
                    self.downgraded.insert(ack.pkid, Downgrade::AwaitingRelease);
                    self.to_router.push(Packet::PubRec(PubRec { pkid: ack.pkid, reason: PubRecReason::Success }, None));
                }
                Packet::PingReq(_) => self.queue(Packet::PingResp(PingResp)),
                Packet::Disconnect(..) => return Some(End::Clean),
                Packet::Connect(..) => {
                    warn!(client = %self.client_id, "closing: second CONNECT on a connection");
                    return Some(End::Lost("second CONNECT".into()));
                }
                p @ (Packet::PubAck(..)
                | Packet::PubRec(..)
                | Packet::PubRel(..)
                | Packet::PubComp(..)
                | Packet::Unsubscribe(..)) => self.to_router.push(p),
                other => {
                    warn!(client = %self.client_id, packet = ?other, "closing: packet a client may not send");
                    return Some(End::Lost("unexpected packet".into()));
                }
            }
        }
    }

    /// Checks a PUBLISH and passes it to the router, or refuses it.
    fn incoming_publish(&mut self, mut publish: Publish, qos: u8, pkid: u16) -> Option<End> {
        let Ok(topic) = std::str::from_utf8(&publish.topic) else {
            return Some(End::Lost("topic is not UTF-8".into()));
        };
        if topic.is_empty() || topic.contains(['+', '#']) || topic.len() > MAX_TOPIC_BYTES {
            warn!(client = %self.client_id, topic = %topic.chars().take(80).collect::<String>(), "closing: publish to an invalid or overlong topic");
            return Some(End::Lost("publish to an invalid topic".into()));
        }
        if !acl::may_publish(&self.identity, topic) {
            warn!(client = %self.client_id, user = self.identity.name(), %topic, "publish refused: not allowed");
            self.refuse_publish(topic, "publish not allowed for this client", qos, pkid);
            return None;
        }
        if let crate::devices::Verdict::Reject(reason) = self.shared.devices.check(topic, &publish.payload) {
            warn!(client = %self.client_id, %topic, %reason, "publish rejected");
            self.refuse_publish(topic, &reason, qos, pkid);
            return None;
        }
        if topic == crate::alarm::SET_TOPIC {
            match crate::alarm::parse_set(&publish.payload) {
                Ok(command) => {
                    let source = crate::alarm::source_of(&self.identity);
                    self.shared.alarm.command(command, source, &self.client_id);
                    // Other subscribers see the command, never the code in it.
                    if let Some(redacted) = crate::alarm::redact(&publish.payload) {
                        publish.payload = redacted.into();
                    }
                }
                Err(e) => {
                    warn!(client = %self.client_id, %topic, reason = %e, "alarm command rejected");
                    self.refuse_publish(topic, &e.to_string(), qos, pkid);
                    return None;
                }
            }
        }
        if topic == crate::lights::SCENE_TOPIC {
            let handed = crate::lights::parse_scene(&publish.payload)
                .and_then(|scene| self.shared.lights.scene(scene, &self.client_id));
            if let Err(e) = handed {
                warn!(client = %self.client_id, %topic, reason = %e, "scene request rejected");
                self.refuse_publish(topic, &e.to_string(), qos, pkid);
                return None;
            }
        }
        if publish.retain {
            let payload = (!publish.payload.is_empty()).then(|| publish.payload.clone());
            self.shared.retain(topic.to_owned(), payload);
        }
        // The router delivers at the subscription's QoS; the publish QoS travels with the message
        // (in a field MQTT 3.1.1 never sees) so that the receiving session can lower it.
        let props = PublishProperties { payload_format_indicator: Some(qos), ..Default::default() };
        self.to_router.push(Packet::Publish(publish, Some(props)));
        None
    }

    /// Drops a PUBLISH: reports it on `dpi/hub/error` and acknowledges it as MQTT 3.1.1 brokers
    /// do, so that the client does not resend it forever.
    fn refuse_publish(&mut self, topic: &str, reason: &str, qos: u8, pkid: u16) {
        self.shared.report_error(topic, &self.client_id, reason);
        match qos {
            1 => self.queue(Packet::PubAck(PubAck { pkid, reason: PubAckReason::Success }, None)),
            2 => {
                self.refused_qos2.insert(pkid);
                self.queue(Packet::PubRec(PubRec { pkid, reason: PubRecReason::Success }, None));
            }
            _ => {}
        }
    }

    /// Passes the allowed filters of a SUBSCRIBE to the router; refused ones get 0x80.
    fn incoming_subscribe(&mut self, subscribe: Subscribe) {
        let pkid = subscribe.pkid;
        let mut slots = Vec::with_capacity(subscribe.filters.len());
        let mut allowed = Vec::new();
        for filter in subscribe.filters {
            if acl::may_subscribe(&self.identity, &filter.path) {
                slots.push(Some(allowed.len()));
                allowed.push(filter);
            } else {
                warn!(client = %self.client_id, user = self.identity.name(), filter = %filter.path, "subscription refused: not allowed");
                slots.push(None);
            }
        }
        if allowed.is_empty() {
            let return_codes = vec![SubscribeReasonCode::Failure; slots.len()];
            self.queue(Packet::SubAck(SubAck { pkid, return_codes }, None));
            return;
        }
        if slots.iter().any(Option::is_none) {
            self.pending_subscribes.insert(pkid, slots);
        }
        self.to_router.push(Packet::Subscribe(Subscribe { pkid, filters: allowed }, None));
    }

    /// Writes one router notification, and everything else already queued, to the client.
    async fn handle_outgoing(&mut self, first: Notification) -> std::io::Result<()> {
        let mut next = Some(first);
        let mut unscheduled = false;
        while let Some(n) = next {
            self.encode(n, &mut unscheduled)?;
            next = self.link_rx.recv_deadline(std::time::Instant::now()).ok().flatten();
        }
        self.conn.flush().await?;
        if unscheduled {
            self.link_rx.wake().await.map_err(std::io::Error::other)?;
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
                Some(Packet::PubRel(rel, _)) if self.downgraded.remove(&rel.pkid).is_some() => {
                    self.to_router
                        .push(Packet::PubComp(PubComp { pkid: rel.pkid, reason: PubCompReason::Success }, None));
                }
                Some(packet) => self.queue(packet),
                None => {}
            },
            // MQTT 3.1.1 has no server DISCONNECT: the connection is simply closed.
            Notification::Disconnect(..) => return Err(std::io::Error::other("router disconnected the client")),
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
        if wanted == sent_qos {
            return;
        }
        self.conn.write.truncate(start);
        match (sent_qos, wanted) {
            (1, 0) => {
                self.queue(Packet::Publish(Publish::new(topic, payload, retain), None));
                self.to_router.push(Packet::PubAck(PubAck { pkid, reason: PubAckReason::Success }, None));
            }
            (2, 0) => {
                self.queue(Packet::Publish(Publish::new(topic, payload, retain), None));
                self.downgraded.insert(pkid, Downgrade::AwaitingRelease);
                self.to_router.push(Packet::PubRec(PubRec { pkid, reason: PubRecReason::Success }, None));
            }
            _ => {
                self.queue(Packet::Publish(publish_qos1(&topic, &payload, retain, pkid), None));
                self.downgraded.insert(pkid, Downgrade::TwoToOne);
            }
        }
    }

    /// At shutdown: writes what the router already queued for this client (the hub's `offline`
    /// status among it), waiting a moment for stragglers.
    async fn drain(&mut self) {
        let until = Instant::now() + Duration::from_millis(250);
        let mut unscheduled = false;
        while let Ok(Ok(Some(n))) = tokio::time::timeout_at(until, self.link_rx.next()).await {
            if self.encode(n, &mut unscheduled).is_err() {
                break;
            }
        }
        let _ = self.conn.flush().await;
    }
}

/// QoS and packet id of the PUBLISH at the start of `buf`, if it is a complete-enough PUBLISH.
fn publish_meta(buf: &[u8]) -> Option<(u8, u16)> {
    let first = *buf.first()?;
    if first >> 4 != 3 {
        return None;
    }
    let qos = (first >> 1) & 0b11;
    // Remaining length: up to four 7-bit groups.
    let mut i = 1;
    loop {
        let b = *buf.get(i)?;
        i += 1;
        if b & 0x80 == 0 || i > 4 {
            break;
        }
    }
    let topic_len = usize::from(u16::from_be_bytes([*buf.get(i)?, *buf.get(i + 1)?]));
    let at = i + 2 + topic_len;
    let pkid = if qos > 0 { u16::from_be_bytes([*buf.get(at)?, *buf.get(at + 1)?]) } else { 0 };
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
