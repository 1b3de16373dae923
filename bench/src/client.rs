//! MQTT clients for the measurements: rumqttc over TLS (rustls with the ring provider) or plain TCP,
//! logged in as the bench user, with TCP_NODELAY on and TLS session resumption off (every TLS
//! connect is a full handshake, as for a device after a power cut).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use rumqttc::{
    AsyncClient, ConnectReturnCode, Event, EventLoop, MqttOptions, NetworkOptions, Outgoing, Packet, QoS,
    SubscribeReasonCode, TlsConfiguration, Transport as RumqttcTransport,
};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// Longest wait for a CONNACK (the TCP connect, TLS handshake and login included).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Request channel capacity of each client (rumqttc's own default is 10).
const REQUEST_CAPACITY: usize = 10;

/// Which listener a client uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Tls,
    Plain,
}

impl Transport {
    /// As shown in the table.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Tls => "TLS",
            Transport::Plain => "plain",
        }
    }
}

/// Where and how clients connect to one running broker.
#[derive(Clone)]
pub struct Target {
    pub tls: SocketAddr,
    pub plain: SocketAddr,
    pub tls_config: Arc<rustls::ClientConfig>,
    /// The CA the TLS config trusts (for clients that build their own, such as the house simulator's).
    pub ca: std::path::PathBuf,
    pub user: String,
    pub password: String,
    /// Client ids that log in under their own name, with their password (the hub's devices).
    pub logins: Arc<HashMap<String, String>>,
    /// The login of the fresh-id churn: on the hub a user whose hash is cheap to check (the
    /// churn measures memory per client id, not argon2), on Mosquitto the bench user.
    pub churn: (String, String),
}

/// A rustls client config trusting only `ca`, without session resumption.
pub fn tls_config(ca: &Path) -> Result<Arc<rustls::ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // rumqttc's TLS glue may ask for the process default; installing it twice is harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert.context("parsing the CA certificate")?).context("adding the CA certificate")?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// Connects client `id` and waits for a successful CONNACK.
pub async fn connect(target: &Target, id: &str, transport: Transport) -> Result<(AsyncClient, EventLoop)> {
    let addr = match transport {
        Transport::Tls => target.tls,
        Transport::Plain => target.plain,
    };
    let mut opts = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    opts.set_keep_alive(Duration::from_secs(60));
    match target.logins.get(id) {
        Some(password) => opts.set_credentials(id, password.clone()),
        None => opts.set_credentials(target.user.clone(), target.password.clone()),
    };
    if transport == Transport::Tls {
        opts.set_transport(RumqttcTransport::tls_with_config(TlsConfiguration::Rustls(target.tls_config.clone())));
    }
    let (client, mut eventloop) = AsyncClient::new(opts, REQUEST_CAPACITY);
    let mut net = NetworkOptions::new();
    net.set_tcp_nodelay(true);
    net.set_connection_timeout(CONNECT_TIMEOUT.as_secs());
    eventloop.set_network_options(net);
    let event = tokio::time::timeout(CONNECT_TIMEOUT, eventloop.poll())
        .await
        .map_err(|_| anyhow!("{id}: no CONNACK within {CONNECT_TIMEOUT:?}"))?
        .with_context(|| format!("{id}: connecting to {addr} ({})", transport.name()))?;
    match event {
        Event::Incoming(Packet::ConnAck(ack)) if ack.code == ConnectReturnCode::Success => Ok((client, eventloop)),
        Event::Incoming(Packet::ConnAck(ack)) => bail!("{id}: connection refused: {:?}", ack.code),
        other => bail!("{id}: expected CONNACK, got {other:?}"),
    }
}

/// Connects every id in `ids` with at most `concurrency` connects in flight; results keep the order of `ids`.
pub async fn connect_many(
    target: &Target,
    ids: Vec<String>,
    transport: Transport,
    concurrency: usize,
) -> Vec<Result<(AsyncClient, EventLoop)>> {
    let gate = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut set = JoinSet::new();
    let count = ids.len();
    for (i, id) in ids.into_iter().enumerate() {
        let target = target.clone();
        let gate = Arc::clone(&gate);
        set.spawn(async move {
            let result = match gate.acquire().await {
                Ok(_permit) => connect(&target, &id, transport).await,
                Err(_) => Err(anyhow!("connect gate closed")),
            };
            (i, result)
        });
    }
    let mut results: Vec<Option<Result<(AsyncClient, EventLoop)>>> = (0..count).map(|_| None).collect();
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok((i, r)) => results[i] = Some(r),
            Err(e) => crate::warn(&format!("connect task failed: {e}")),
        }
    }
    results.into_iter().map(|r| r.unwrap_or_else(|| Err(anyhow!("connect task did not finish")))).collect()
}

/// Subscribes to `filter` and waits (bounded) for a SUBACK that grants it.
pub async fn subscribe(client: &AsyncClient, eventloop: &mut EventLoop, filter: &str, qos: QoS) -> Result<()> {
    client.subscribe(filter, qos).await.context("queueing SUBSCRIBE")?;
    let wait = async {
        loop {
            if let Event::Incoming(Packet::SubAck(ack)) = eventloop.poll().await.context("waiting for SUBACK")? {
                return match ack.return_codes.first() {
                    Some(SubscribeReasonCode::Success(_)) => Ok(()),
                    other => Err(anyhow!("subscription to {filter} refused: {other:?}")),
                };
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait).await.map_err(|_| anyhow!("no SUBACK within 10 s"))?
}

/// Polls `eventloop` until the connection ends or a DISCONNECT has been sent (never reconnects).
pub async fn drive(mut eventloop: EventLoop) {
    loop {
        match eventloop.poll().await {
            Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Sends DISCONNECT and polls until it is written (at most 2 s); the socket closes when dropped.
pub async fn disconnect(client: &AsyncClient, eventloop: EventLoop) {
    if client.try_disconnect().is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(2), drive(eventloop)).await;
    }
}
