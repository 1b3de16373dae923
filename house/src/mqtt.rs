//! One device's MQTT connection to the hub: always TLS (rustls with the ring provider, trusting only the
//! hub's CA), username = client id = the device id, keepalive 30 s, and a last will that marks the
//! device `offline` (retained) if it vanishes without saying goodbye.
//!
//! Owns turning connection failures into the crate's errors a person can act on (the hub not running,
//! a refused password). Does not decide what a device publishes: that is [`crate::payload`]'s.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, LastWill, MqttOptions, NetworkOptions, Packet, QoS,
    TlsConfiguration, TlsError, Transport,
};

use crate::config::Kind;
use crate::Error;

/// Keepalive of every simulated device.
pub const KEEP_ALIVE: Duration = Duration::from_secs(30);

/// Longest wait for a CONNACK (TCP connect, TLS handshake and login included).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Where the hub listens. Always TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// An IP or a name in the server certificate.
    pub host: String,
    /// The TLS port.
    pub port: u16,
    /// The hub's CA certificate (`DATA_DIR/certs/ca.pem`).
    pub ca: PathBuf,
}

impl Endpoint {
    /// `host:port`, for messages.
    pub fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// How one device logs in.
#[derive(Clone, PartialEq, Eq)]
pub struct Login {
    /// The MQTT client id; the hub requires it to be the device id.
    pub client_id: String,
    /// The MQTT username; the hub requires it to be the device id.
    pub username: String,
    /// The password from `device creds`; never printed by `Debug`.
    pub password: String,
    /// The device id, for topics (`dpi/ID/…`) and messages.
    pub device: String,
    /// What it is, which decides what it publishes and obeys.
    pub kind: Kind,
}

impl fmt::Debug for Login {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Login")
            .field("client_id", &self.client_id)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .field("device", &self.device)
            .field("kind", &self.kind)
            .finish()
    }
}

/// `dpi/ID/state`.
pub fn state_topic(id: &str) -> String {
    format!("dpi/{id}/state")
}

/// `dpi/ID/set`.
pub fn set_topic(id: &str) -> String {
    format!("dpi/{id}/set")
}

/// `dpi/ID/availability`.
pub fn availability_topic(id: &str) -> String {
    format!("dpi/{id}/availability")
}

/// The hub's retained alarm state.
pub const ALARM_STATE: &str = "dpi/alarm/state";

/// Where keypads and residents send alarm commands.
pub const ALARM_SET: &str = "dpi/alarm/set";

/// A rustls client config trusting only the CA at `ca`.
pub fn tls_config(ca: &Path) -> Result<Arc<rustls::ClientConfig>, Error> {
    let bad = |reason: String| Error::BadCa { path: ca.to_owned(), reason };
    // rumqttc's TLS glue may ask for the process default; installing it a second time is harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let pem = std::fs::read(ca).map_err(|e| bad(e.to_string()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        let cert = cert.map_err(|e| bad(format!("not PEM: {e}")))?;
        roots.add(cert).map_err(|e| bad(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(bad("no certificate in the file".to_owned()));
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Connects `login` and waits for a successful CONNACK. `capacity` bounds the client's request queue.
pub(crate) async fn connect(
    endpoint: &Endpoint,
    tls: &Arc<rustls::ClientConfig>,
    login: &Login,
    capacity: usize,
) -> Result<(AsyncClient, EventLoop), Error> {
    if endpoint.port == 0 {
        return Err(Error::HubPortUnknown);
    }
    let mut opts = MqttOptions::new(login.client_id.clone(), endpoint.host.clone(), endpoint.port);
    opts.set_keep_alive(KEEP_ALIVE);
    opts.set_credentials(login.username.clone(), login.password.clone());
    opts.set_last_will(LastWill::new(availability_topic(&login.device), "offline", QoS::AtLeastOnce, true));
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(Arc::clone(tls))));
    let (client, mut eventloop) = AsyncClient::new(opts, capacity);
    let mut net = NetworkOptions::new();
    net.set_tcp_nodelay(true);
    net.set_connection_timeout(CONNECT_TIMEOUT.as_secs());
    eventloop.set_network_options(net);
    let addr = endpoint.addr();
    let first = tokio::time::timeout(CONNECT_TIMEOUT, eventloop.poll()).await.map_err(|_| Error::ConnectTimeout {
        device: login.device.clone(),
        addr: addr.clone(),
        secs: CONNECT_TIMEOUT.as_secs(),
    })?;
    match first {
        Ok(Event::Incoming(Packet::ConnAck(_))) => Ok((client, eventloop)),
        Ok(other) => Err(Error::Connect { device: login.device.clone(), addr, reason: format!("got {other:?}") }),
        Err(e) => Err(connection_error(e, &login.device, &addr)),
    }
}

/// Turns rumqttc's error into the crate's: a refused TCP connect means the hub is not running.
pub(crate) fn connection_error(error: ConnectionError, device: &str, addr: &str) -> Error {
    let io_kind = match &error {
        ConnectionError::Io(e) | ConnectionError::Tls(TlsError::Io(e)) => Some(e.kind()),
        _ => None,
    };
    match (io_kind, error) {
        (Some(std::io::ErrorKind::ConnectionRefused), _) => Error::HubNotRunning { addr: addr.to_owned() },
        (_, ConnectionError::ConnectionRefused(code)) => {
            Error::Refused { device: device.to_owned(), code: format!("{code:?}") }
        }
        (_, ConnectionError::NetworkTimeout) => {
            Error::ConnectTimeout { device: device.to_owned(), addr: addr.to_owned(), secs: CONNECT_TIMEOUT.as_secs() }
        }
        (_, other) => Error::Connect { device: device.to_owned(), addr: addr.to_owned(), reason: other.to_string() },
    }
}

/// Checks that something accepts TCP connections at `addr` (the hub's TLS listener), without
/// speaking MQTT: run before issuing credentials, so a stopped hub is reported before any password
/// is re-issued.
pub async fn probe(addr: SocketAddr) -> Result<(), Error> {
    match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            Err(Error::HubNotRunning { addr: addr.to_string() })
        }
        Ok(Err(e)) => Err(Error::Connect { device: "house".to_owned(), addr: addr.to_string(), reason: e.to_string() }),
        Err(_) => Err(Error::ConnectTimeout {
            device: "house".to_owned(),
            addr: addr.to_string(),
            secs: CONNECT_TIMEOUT.as_secs(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_tcp_is_hub_not_running() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let err = connection_error(ConnectionError::Io(refused), "hall-motion", "127.0.0.1:8883");
        assert!(matches!(err, Error::HubNotRunning { ref addr } if addr == "127.0.0.1:8883"), "{err}");
    }

    #[test]
    fn refused_connack_names_the_device() {
        let err = connection_error(
            ConnectionError::ConnectionRefused(rumqttc::ConnectReturnCode::BadUserNamePassword),
            "hall-motion",
            "127.0.0.1:8883",
        );
        assert!(err.to_string().starts_with("the hub refused hall-motion (BadUserNamePassword)"), "{err}");
    }

    #[test]
    fn endpoint_addr_brackets_ipv6() {
        let e = Endpoint { host: "::1".into(), port: 8883, ca: PathBuf::new() };
        assert_eq!(e.addr(), "[::1]:8883");
    }

    #[test]
    fn debug_hides_the_password() {
        let login = Login {
            client_id: "a".into(),
            username: "a".into(),
            password: "s3cret".into(),
            device: "a".into(),
            kind: Kind::Motion,
        };
        assert!(!format!("{login:?}").contains("s3cret"));
    }

    #[tokio::test]
    async fn probe_reports_a_closed_port_as_hub_not_running() {
        let addr = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            listener.local_addr().expect("addr")
        };
        let err = probe(addr).await.expect_err("nothing listens");
        assert!(err.to_string().contains("is the hub running?"), "{err}");
    }
}
