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

use bytes::BytesMut;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::{
    ConnAck, ConnectReturnCode, Disconnect, DisconnectReasonCode, LastWill, Packet, PingResp, Protocol,
};
use rumqttd::Notification;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{Shared, HANDSHAKE_TIMEOUT};
use crate::auth::{Identity, Refusal};
use crate::secret::Secret;

/// Room for the fixed header and topic beyond the payload limit.
const PACKET_OVERHEAD: usize = 1024;

/// Runs a client session on an established (TLS or plain) stream.
pub async fn run<S>(stream: S, peer: SocketAddr, shared: Arc<Shared>)
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
    let identity = match shared.auth.check(username.clone(), password).await {
        Ok(identity) => identity,
        Err(refusal) => {
            let code = match refusal {
                Refusal::Anonymous => ConnectReturnCode::NotAuthorized,
                Refusal::BadCredentials => ConnectReturnCode::BadUserNamePassword,
                Refusal::ClientId(_) => ConnectReturnCode::ClientIdentifierNotValid,
                Refusal::Unavailable(_) => ConnectReturnCode::ServiceUnavailable,
            };
            warn!(%peer, client = %connect.client_id, user = username.as_deref().unwrap_or(""), reason = %refusal, "connection refused");
            let _ = conn.refuse(code).await;
            return;
        }
    };

    let client_id = match client_id_for(&connect.client_id, connect.clean_session, &identity, &shared) {
        Ok(id) => id,
        Err(reason) => {
            warn!(%peer, client = %connect.client_id, user = identity.name(), %reason, "connection refused");
            let _ = conn.refuse(ConnectReturnCode::ClientIdentifierNotValid).await;
            return;
        }
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

    let mut session = Session {
        conn,
        link_tx,
        link_rx,
        client_id,
        peer,
        keepalive: (connect.keep_alive > 0).then(|| Duration::from_millis(u64::from(connect.keep_alive) * 1500)),
        max_packet,
        shared: shared.clone(),
    };
    let end = session.pump().await;
    let Session { mut link_tx, client_id, mut conn, .. } = session;
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
    }
}

/// The client id this session registers with the router.
fn client_id_for(requested: &str, clean: bool, identity: &Identity, shared: &Shared) -> Result<String, String> {
    if requested.is_empty() {
        if !clean {
            return Err("an empty client id needs clean session".into());
        }
        // MQTT 3.1.1 §3.1.3-6: the server assigns one.
        return Ok(format!("auto-{:016x}", rand_u64()));
    }
    if requested.chars().any(|c| c.is_control() || "+#/$".contains(c)) {
        return Err("client id holds a control character or one of + # / $".into());
    }
    match identity {
        Identity::User { .. } if shared.device_ids.contains(requested) => {
            Err(format!("{requested:?} is a device's id; users may not take it"))
        }
        Identity::User { .. } => Ok(requested.to_owned()),
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
                    if let Some(end) = self.handle_incoming().await {
                        return end;
                    }
                }
                notification = self.link_rx.next() => {
                    match notification {
                        Ok(Some(n)) => {
                            if let Err(e) = self.handle_outgoing(n).await {
                                return End::Lost(e.to_string());
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

    /// Decodes every complete packet in the read buffer and acts on it.
    async fn handle_incoming(&mut self) -> Option<End> {
        let mut to_router: Vec<Packet> = Vec::new();
        let mut end = None;
        loop {
            let packet = match V4.read_mut(&mut self.conn.read, self.max_packet) {
                Ok(p) => p,
                Err(rumqttd::protocol::Error::InsufficientBytes(_)) => break,
                Err(e) => {
                    warn!(peer = %self.peer, client = %self.client_id, error = %e, "closing: bad packet");
                    end = Some(End::Lost(format!("bad packet: {e}")));
                    break;
                }
            };
            match packet {
                Packet::Publish(publish, props) => {
                    if publish.topic.is_empty() || publish.topic.iter().any(|b| *b == b'+' || *b == b'#') {
                        warn!(client = %self.client_id, topic = %String::from_utf8_lossy(&publish.topic), "closing: publish to an invalid topic");
                        end = Some(End::Lost("publish to an invalid topic".into()));
                        break;
                    }
                    to_router.push(Packet::Publish(publish, props));
                }
                Packet::PingReq(_) => {
                    if self.conn.send(Packet::PingResp(PingResp)).await.is_err() {
                        end = Some(End::Lost("write failed".into()));
                        break;
                    }
                }
                Packet::Disconnect(..) => {
                    end = Some(End::Clean);
                    break;
                }
                Packet::Connect(..) => {
                    warn!(client = %self.client_id, "closing: second CONNECT on a connection");
                    end = Some(End::Lost("second CONNECT".into()));
                    break;
                }
                p @ (Packet::PubAck(..)
                | Packet::PubRec(..)
                | Packet::PubRel(..)
                | Packet::PubComp(..)
                | Packet::Subscribe(..)
                | Packet::Unsubscribe(..)) => to_router.push(p),
                other => {
                    warn!(client = %self.client_id, packet = ?other, "closing: packet a client may not send");
                    end = Some(End::Lost("unexpected packet".into()));
                    break;
                }
            }
        }
        if let Some(last) = to_router.pop() {
            self.link_tx.buffer().extend(to_router);
            if self.link_tx.send(last).await.is_err() {
                return Some(End::Router);
            }
        }
        end
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
            Notification::Forward(f) => {
                V4.write(Packet::Publish(f.publish, None), &mut self.conn.write).map_err(std::io::Error::other)?;
            }
            Notification::DeviceAck(ack) => {
                let packet: Option<Packet> = Notification::DeviceAck(ack).into();
                if let Some(packet) = packet {
                    V4.write(packet, &mut self.conn.write).map_err(std::io::Error::other)?;
                }
            }
            // MQTT 3.1.1 has no server DISCONNECT: the connection is simply closed.
            Notification::Disconnect(..) => return Err(std::io::Error::other("router disconnected the client")),
            _ => {}
        }
        Ok(())
    }

    /// At shutdown: writes what the router already queued for this client (the hub's `offline`
    /// status among it), waiting a moment for stragglers.
    async fn drain(&mut self) {
        let until = Instant::now() + Duration::from_millis(50);
        let mut unscheduled = false;
        while let Ok(Ok(Some(n))) = tokio::time::timeout_at(until, self.link_rx.next()).await {
            if self.encode(n, &mut unscheduled).is_err() {
                break;
            }
        }
        let _ = self.conn.flush().await;
    }
}
