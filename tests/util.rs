//! Shared test helpers: start a hub (in-process or as a process), make TLS clients, read the DB.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use domoticpi::config::Config;
use domoticpi::hub::{self, Listeners};
use domoticpi::store::{self, users::Role};
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Packet, Publish, QoS, TlsConfiguration, Transport,
};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The built binary.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_domoticpi")
}

/// Whether an outside tool is installed. Missing: the test skips itself, unless
/// `DOMOTICPI_REQUIRE_TOOLS=1` (set by CI), where it fails.
pub fn have_tool(name: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        if std::env::var("DOMOTICPI_REQUIRE_TOOLS").is_ok_and(|v| v == "1") {
            panic!("{name} is required (DOMOTICPI_REQUIRE_TOOLS=1) but not installed");
        }
        eprintln!("SKIPPED: {name} is not installed (Debian: apt-get install mosquitto-clients)");
    }
    found
}

fn install_crypto() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A hub running in this process.
pub struct TestHub {
    pub dir: tempfile::TempDir,
    pub data_dir: PathBuf,
    pub tls: SocketAddr,
    pub plain: Option<SocketAddr>,
    pub web: Option<SocketAddr>,
    pub token: CancellationToken,
    pub task: Option<tokio::task::JoinHandle<Result<(), hub::HubError>>>,
}

/// The config text every test hub starts from; `extra` is appended.
pub fn config_text(data_dir: &Path, extra: &str) -> String {
    format!(
        "data_dir = {:?}\n[web]\nlisten = \"127.0.0.1:0\"\n[broker]\ntls_listen = \"127.0.0.1:0\"\n{extra}",
        data_dir.display().to_string()
    )
}

impl TestHub {
    /// Starts a hub with the default test config plus `extra` (TOML, appended inside [broker]
    /// unless it opens a table of its own).
    pub async fn start(extra: &str) -> TestHub {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        Self::start_in(dir, data_dir, extra).await
    }

    pub async fn start_in(dir: tempfile::TempDir, data_dir: PathBuf, extra: &str) -> TestHub {
        // `DOMOTICPI_TEST_LOG=debug` shows the in-process hubs' logs (with --nocapture).
        if let Ok(level) = std::env::var("DOMOTICPI_TEST_LOG") {
            domoticpi::logging::init(&level);
        }
        let text = config_text(&data_dir, extra);
        let path = dir.path().join("domoticpi.toml");
        std::fs::write(&path, &text).unwrap();
        let config = Config::from_toml(&text, Some(&path)).unwrap();
        hub::init(&config).unwrap();
        let tls = TcpListener::bind(config.broker.tls_listen).await.unwrap();
        let plain = match config.broker.plain_listen {
            Some(addr) => Some(TcpListener::bind(addr).await.unwrap()),
            None => None,
        };
        let web = match config.web {
            Some(addr) => Some(TcpListener::bind(addr).await.unwrap()),
            None => None,
        };
        let tls_addr = tls.local_addr().unwrap();
        let plain_addr = plain.as_ref().map(|p| p.local_addr().unwrap());
        let web_addr = web.as_ref().map(|w| w.local_addr().unwrap());
        let token = CancellationToken::new();
        let task = tokio::spawn(hub::run(config, Listeners { tls, plain, web }, token.clone()));
        TestHub { dir, data_dir, tls: tls_addr, plain: plain_addr, web: web_addr, token, task: Some(task) }
    }

    /// Stops this hub and starts a new one on the same data dir with `extra` config.
    pub async fn restart(mut self, extra: &str) -> TestHub {
        self.token.cancel();
        self.task.take().unwrap().await.unwrap().unwrap();
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        TestHub::start_in(dir, self.data_dir.clone(), extra).await
    }

    /// The config file the hub was started from (for CLI commands).
    pub fn config_path(&self) -> String {
        self.dir.path().join("domoticpi.toml").display().to_string()
    }

    /// Replaces the config file with the test config plus `extra` (the hub reads it at a reload).
    pub fn rewrite_config(&self, extra: &str) {
        std::fs::write(self.config_path(), config_text(&self.data_dir, extra)).unwrap();
    }

    /// Gives device `id` the password `password`, as `domoticpi device creds` does but cheaply.
    pub fn set_device_password(&self, id: &str, password: &str) {
        let hash = domoticpi::auth::hash_token(&domoticpi::secret::Secret::new(password));
        store::devices::set_password(&self.db(), id, &hash).unwrap();
    }

    /// Runs `domoticpi device creds ID [--cert]` and returns its `key: value` lines.
    pub fn device_creds(&self, id: &str, cert: bool) -> std::collections::HashMap<String, String> {
        let path = self.config_path();
        let mut args = vec!["--config", path.as_str(), "device", "creds", id];
        if cert {
            args.push("--cert");
        }
        let (code, out, err) = run_cli(&args, None);
        assert_eq!(code, 0, "device creds failed: {err}");
        out.lines().filter_map(|l| l.split_once(": ")).map(|(k, v)| (k.to_owned(), v.to_owned())).collect()
    }

    /// Connects as a device with its password.
    pub async fn device(&self, id: &str, password: &str) -> Result<Client, ConnectionError> {
        self.client(id, id, password).await
    }

    pub fn ca(&self) -> PathBuf {
        self.data_dir.join("certs/ca.pem")
    }

    pub fn db(&self) -> rusqlite::Connection {
        store::open(&self.data_dir.join("hub.db")).unwrap()
    }

    /// Adds a user straight into the hub's database, as `domoticpi user add` does.
    pub fn add_user(&self, name: &str, role: Role, password: &str) {
        let hash = domoticpi::auth::hash(&domoticpi::secret::Secret::new(password));
        store::users::add(&self.db(), name, role, &hash).unwrap();
    }

    /// Adds a user whose password hash takes microseconds to check (argon2id with 8 KiB and one
    /// pass, which the hub verifies with the parameters stored in the hash): for tests that log
    /// in thousands of times.
    pub fn add_cheap_user(&self, name: &str, role: Role, password: &str) {
        store::users::add(&self.db(), name, role, &cheap_hash(password)).unwrap();
    }

    /// Stops the hub and returns how it ended.
    pub async fn stop(mut self) -> Result<(), hub::HubError> {
        self.token.cancel();
        self.task.take().unwrap().await.unwrap()
    }

    pub async fn client(&self, id: &str, user: &str, password: &str) -> Result<Client, ConnectionError> {
        Client::connect(self.tls, &self.ca(), id, Some((user, password))).await
    }
}

impl Drop for TestHub {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

/// An argon2id PHC string with the smallest parameters argon2 allows.
pub fn cheap_hash(password: &str) -> String {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let params = argon2::Params::new(8, 1, 1, None).unwrap();
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    argon.hash_password(password.as_bytes(), &salt).unwrap().to_string()
}

/// A rustls client config trusting `ca` and presenting a client certificate.
pub fn tls_config_with_cert(ca: &Path, cert: &Path, key: &Path) -> Arc<rustls::ClientConfig> {
    install_crypto();
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut std::fs::read(ca).unwrap().as_slice()) {
        roots.add(c.unwrap()).unwrap();
    }
    let chain = rustls_pemfile::certs(&mut std::fs::read(cert).unwrap().as_slice()).map(Result::unwrap).collect();
    let key = rustls_pemfile::private_key(&mut std::fs::read(key).unwrap().as_slice()).unwrap().unwrap();
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .unwrap(),
    )
}

/// A rustls client config trusting `ca`.
pub fn tls_config(ca: &Path) -> Arc<rustls::ClientConfig> {
    install_crypto();
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca).unwrap();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert.unwrap()).unwrap();
    }
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// An MQTT client over TLS whose received publishes arrive on `rx`.
pub struct Client {
    pub client: AsyncClient,
    pub rx: mpsc::UnboundedReceiver<Publish>,
    pub task: tokio::task::JoinHandle<Option<ConnectionError>>,
}

impl Client {
    /// Connects and waits for the CONNACK; a refusal comes back as the error.
    pub async fn connect(
        addr: SocketAddr,
        ca: &Path,
        id: &str,
        login: Option<(&str, &str)>,
    ) -> Result<Client, ConnectionError> {
        let mut opts = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        opts.set_keep_alive(Duration::from_secs(30));
        if let Some((u, p)) = login {
            opts.set_credentials(u, p);
        }
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls_config(ca))));
        Self::connect_with(opts).await
    }

    /// Connects with the given options and waits for the CONNACK.
    pub async fn connect_with(opts: MqttOptions) -> Result<Client, ConnectionError> {
        let (client, mut eventloop) = AsyncClient::new(opts, 100);
        // Without it, a publish written just after an acknowledgement waits for the hub's delayed
        // ACK (40 ms): the tests' clients send at once, as the hub does.
        let mut network = rumqttc::NetworkOptions::new();
        network.set_tcp_nodelay(true);
        eventloop.set_network_options(network);
        tokio::time::timeout(Duration::from_secs(10), wait_connack(&mut eventloop))
            .await
            .expect("no CONNACK within 10 s")?;
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = tx.send(p);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        // rumqttc reads every packet that arrived before the connection closed,
                        // but reports the close first and keeps those packets for a later poll
                        // (after a reconnect): hand them over now, or a message the hub sent
                        // just before closing (its `offline`, say) would be lost here.
                        for event in eventloop.state.events.drain(..) {
                            if let Event::Incoming(Packet::Publish(p)) = event {
                                let _ = tx.send(p);
                            }
                        }
                        return Some(e);
                    }
                }
            }
        });
        Ok(Client { client, rx, task })
    }

    pub async fn subscribe(&self, filter: &str, qos: QoS) {
        self.client.subscribe(filter, qos).await.unwrap();
    }

    /// The next publish, or panics after `secs`.
    pub async fn recv(&mut self, secs: u64) -> Publish {
        tokio::time::timeout(Duration::from_secs(secs), self.rx.recv())
            .await
            .expect("no message in time")
            .expect("client ended")
    }

    /// Waits for a message on `topic` with `payload`, skipping others.
    pub async fn expect(&mut self, topic: &str, payload: &[u8]) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let p = tokio::time::timeout(left, self.rx.recv())
                .await
                .unwrap_or_else(|_| panic!("no {topic} {:?} in time", String::from_utf8_lossy(payload)))
                .expect("client ended");
            if p.topic == topic && &p.payload[..] == payload {
                return;
            }
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // Closes the connection (without DISCONNECT) as soon as the client goes out of scope.
        self.task.abort();
    }
}

async fn wait_connack(eventloop: &mut EventLoop) -> Result<(), ConnectionError> {
    loop {
        if let Event::Incoming(Packet::ConnAck(_)) = eventloop.poll().await? {
            return Ok(());
        }
    }
}

/// A hub started as a separate process, as systemd would run it.
pub struct HubProcess {
    pub child: Child,
    pub tls: SocketAddr,
    /// The web app's address, when it is on.
    pub web: Option<SocketAddr>,
    pub stderr: std::sync::mpsc::Receiver<String>,
    /// The log lines up to "hub ready".
    pub early: Vec<String>,
}

impl HubProcess {
    /// Runs `domoticpi --config CONFIG run` and waits for it to report its listeners.
    // The child is reaped by `HubProcess::drop` once the guard holds it.
    #[allow(clippy::zombie_processes)]
    pub fn start(config: &Path) -> HubProcess {
        let mut command = Command::new(bin());
        command.args(["--config", config.to_str().unwrap(), "run"]);
        Self::spawn(command)
    }

    /// [`HubProcess::start`] as systemd starts a service with a watchdog: these environment
    /// variables (`NOTIFY_SOCKET`, `WATCHDOG_USEC`, …) and `WATCHDOG_PID` set to the hub's own pid.
    pub fn start_as_service(config: &Path, env: &[(&str, &str)]) -> HubProcess {
        let mut command = Command::new("sh");
        command.args(["-c", "WATCHDOG_PID=$$ exec \"$0\" --config \"$1\" run", bin(), config.to_str().unwrap()]);
        command.envs(env.iter().copied());
        Self::spawn(command)
    }

    #[allow(clippy::zombie_processes)]
    fn spawn(mut command: Command) -> HubProcess {
        let mut child = command
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("hub> {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut web = None;
        let mut early = Vec::new();
        loop {
            let line =
                rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).expect("hub did not report ready");
            early.push(line.clone());
            if line.contains("web app listening") {
                web = line.split("Some(").nth(1).and_then(|a| a.split(')').next()).and_then(|a| a.parse().ok());
            }
            if line.contains("hub ready") {
                let tls = line.split("tls=").nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap();
                return HubProcess { child, tls, web, stderr: rx, early };
            }
        }
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill").args([&format!("-{sig}"), &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit; returns its status and how long it took.
    pub fn wait(&mut self, max: Duration) -> (std::process::ExitStatus, Duration) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, start.elapsed());
            }
            assert!(start.elapsed() < max, "hub did not exit within {max:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for HubProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the binary with arguments and optional stdin; returns (exit code, stdout, stderr).
pub fn run_cli(args: &[&str], stdin: Option<&str>) -> (i32, String, String) {
    use std::io::Write;
    let mut child = Command::new(bin())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        let mut input = child.stdin.take().unwrap();
        if let Some(text) = stdin {
            // The command may exit before reading (a refused name, say): a broken pipe is fine.
            let _ = input.write_all(text.as_bytes());
        }
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Writes a config file for a process hub in a temp dir; returns (dir, config path, data dir).
pub fn process_config(extra: &str) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let path = dir.path().join("domoticpi.toml");
    std::fs::write(&path, config_text(&data, extra)).unwrap();
    (dir, path, data)
}

/// Subscribe QoS used throughout.
pub const QOS1: QoS = QoS::AtLeastOnce;

/// Either side of a raw client's connection.
trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for S {}

/// A hand-driven MQTT client (TLS or plain), for what well-behaved libraries never do (stay
/// silent, send CONNECT twice, ask for keepalive 0, acknowledge out of order, never acknowledge).
pub struct RawClient {
    stream: Box<dyn Stream>,
    buf: bytes::BytesMut,
    cipher: Option<rustls::CipherSuite>,
    /// QoS and packet id of the last PUBLISH read (rumqttd keeps them private).
    pub last_meta: (u8, u16),
}

/// What a raw client's read came to.
#[allow(clippy::large_enum_variant)] // one at a time, in tests
#[derive(Debug)]
pub enum Read {
    /// A packet.
    Packet(rumqttd::protocol::Packet),
    /// The server closed the connection.
    Closed,
    /// Nothing within the time given.
    Silent,
}

impl RawClient {
    pub async fn connect(addr: SocketAddr, ca: &Path) -> RawClient {
        Self::connect_from(addr, ca, None).await
    }

    /// Connects over TLS from a given local address (127.0.0.2, say), or any.
    pub async fn connect_from(addr: SocketAddr, ca: &Path, from: Option<std::net::IpAddr>) -> RawClient {
        Self::try_connect_from(addr, ca, from).await.unwrap()
    }

    /// [`RawClient::connect_from`]; an error when the server closes the socket before or during TLS.
    pub async fn try_connect_from(
        addr: SocketAddr,
        ca: &Path,
        from: Option<std::net::IpAddr>,
    ) -> std::io::Result<RawClient> {
        let tcp = tcp_from(addr, from).await?;
        let connector = tokio_rustls::TlsConnector::from(tls_config(ca));
        let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
        let stream = connector.connect(name, tcp).await?;
        let cipher = stream.get_ref().1.negotiated_cipher_suite().map(|s| s.suite());
        Ok(RawClient { stream: Box::new(stream), buf: bytes::BytesMut::new(), cipher, last_meta: (0, 0) })
    }

    /// Connects over plain TCP (the hub's plain listener).
    pub async fn connect_plain(addr: SocketAddr) -> std::io::Result<RawClient> {
        Self::connect_plain_from(addr, None).await
    }

    /// Connects over plain TCP from a given local address, or any.
    pub async fn connect_plain_from(addr: SocketAddr, from: Option<std::net::IpAddr>) -> std::io::Result<RawClient> {
        let tcp = tcp_from(addr, from).await?;
        Ok(RawClient { stream: Box::new(tcp), buf: bytes::BytesMut::new(), cipher: None, last_meta: (0, 0) })
    }

    /// The TLS cipher suite the server chose.
    pub fn cipher_suite(&self) -> Option<rustls::CipherSuite> {
        self.cipher
    }

    pub async fn send(&mut self, packet: rumqttd::protocol::Packet) {
        self.try_send(packet).await.unwrap();
    }

    /// Sends a packet; an error when the connection is gone.
    pub async fn try_send(&mut self, packet: rumqttd::protocol::Packet) -> std::io::Result<()> {
        use rumqttd::protocol::Protocol;
        use tokio::io::AsyncWriteExt;
        let mut out = bytes::BytesMut::new();
        rumqttd::protocol::v4::V4.write(packet, &mut out).map_err(std::io::Error::other)?;
        self.stream.write_all(&out).await?;
        self.stream.flush().await
    }

    /// Sends raw bytes.
    pub async fn send_bytes(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }

    /// Sends a CONNECT with a login.
    pub async fn connect_packet(&mut self, id: &str, user: &str, password: &str, keep_alive: u16) {
        self.connect_full(id, Some((user, password)), keep_alive, true, None).await;
    }

    /// Sends a CONNECT with every option.
    pub async fn connect_full(
        &mut self,
        id: &str,
        login: Option<(&str, &str)>,
        keep_alive: u16,
        clean_session: bool,
        will: Option<rumqttd::protocol::LastWill>,
    ) {
        use rumqttd::protocol::{Connect, Login, Packet};
        let connect = Connect { keep_alive, client_id: id.to_owned(), clean_session };
        let login = login.map(|(u, p)| Login { username: u.to_owned(), password: p.to_owned() });
        let _ = self.try_send(Packet::Connect(connect, None, will, None, login)).await;
    }

    /// Sends CONNECT and returns the CONNACK's code, or `None` if the server closed without one.
    pub async fn login(
        &mut self,
        id: &str,
        login: Option<(&str, &str)>,
        clean_session: bool,
        will: Option<rumqttd::protocol::LastWill>,
    ) -> Option<rumqttd::protocol::ConnAck> {
        self.connect_full(id, login, 30, clean_session, will).await;
        match self.read(Duration::from_secs(10)).await {
            Read::Packet(rumqttd::protocol::Packet::ConnAck(ack, _)) => Some(ack),
            Read::Closed => None,
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// [`RawClient::login`] with clean session and no will, waiting up to `within` for the answer.
    pub async fn login_within(
        &mut self,
        id: &str,
        login: Option<(&str, &str)>,
        within: Duration,
    ) -> Option<rumqttd::protocol::ConnAck> {
        self.connect_full(id, login, 30, true, None).await;
        match self.read(within).await {
            Read::Packet(rumqttd::protocol::Packet::ConnAck(ack, _)) => Some(ack),
            Read::Closed => None,
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// The next packet; `None` when the server closed the connection; panics after `within`.
    pub async fn recv(&mut self, within: Duration) -> Option<rumqttd::protocol::Packet> {
        match self.read(within).await {
            Read::Packet(p) => Some(p),
            Read::Closed => None,
            Read::Silent => panic!("nothing from the hub within {within:?}"),
        }
    }

    /// The next packet, the end of the connection, or silence for `within`.
    pub async fn read(&mut self, within: Duration) -> Read {
        use rumqttd::protocol::Protocol;
        use tokio::io::AsyncReadExt;
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let meta = publish_meta(&self.buf);
            match rumqttd::protocol::v4::V4.read_mut(&mut self.buf, 1 << 20) {
                Ok(p) => {
                    if let Some(meta) = meta {
                        self.last_meta = meta;
                    }
                    return Read::Packet(p);
                }
                Err(rumqttd::protocol::Error::InsufficientBytes(_)) => {}
                Err(e) => panic!("bad packet from the hub: {e}"),
            }
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return Read::Closed,
                Ok(Ok(_)) => {}
                Err(_) => return Read::Silent,
            }
        }
    }

    /// Reads until the server closes the connection (true) or `within` passes (false), dropping packets.
    pub async fn closed_within(&mut self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match self.read(deadline.saturating_duration_since(tokio::time::Instant::now())).await {
                Read::Packet(_) => continue,
                Read::Closed => return true,
                Read::Silent => return false,
            }
        }
    }
}

/// A TCP connection to `addr`, from a given local address (127.0.0.2, say) or any, with NODELAY.
async fn tcp_from(addr: SocketAddr, from: Option<std::net::IpAddr>) -> std::io::Result<tokio::net::TcpStream> {
    let tcp = match from {
        Some(ip) => {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(ip, 0))?;
            socket.connect(addr).await?
        }
        None => tokio::net::TcpStream::connect(addr).await?,
    };
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// A subscription filter for raw packets.
pub fn raw_filter(path: &str, qos: rumqttd::protocol::QoS) -> rumqttd::protocol::Filter {
    rumqttd::protocol::Filter {
        path: path.into(),
        qos,
        nolocal: false,
        preserve_retain: false,
        retain_forward_rule: rumqttd::protocol::RetainForwardRule::OnEverySubscribe,
    }
}

/// A SUBACK's return codes as on the wire: the granted QoS, or 0x80.
pub fn suback_codes(codes: &[rumqttd::protocol::SubscribeReasonCode]) -> Vec<u8> {
    use rumqttd::protocol::SubscribeReasonCode as C;
    codes
        .iter()
        .map(|c| match c {
            C::QoS0 | C::Success(rumqttd::protocol::QoS::AtMostOnce) => 0,
            C::QoS1 | C::Success(rumqttd::protocol::QoS::AtLeastOnce) => 1,
            C::QoS2 | C::Success(rumqttd::protocol::QoS::ExactlyOnce) => 2,
            _ => 0x80,
        })
        .collect()
}

/// A raw SUBSCRIBE.
pub fn raw_subscribe(pkid: u16, filters: &[(&str, rumqttd::protocol::QoS)]) -> rumqttd::protocol::Packet {
    let filters = filters.iter().map(|(f, q)| raw_filter(f, *q)).collect();
    rumqttd::protocol::Packet::Subscribe(rumqttd::protocol::Subscribe { pkid, filters }, None)
}

/// A raw PUBLISH at any QoS (rumqttd keeps QoS and packet id private: built from its wire form).
pub fn raw_publish(topic: &str, payload: &[u8], qos: u8, pkid: u16, retain: bool) -> rumqttd::protocol::Packet {
    use rumqttd::protocol::Protocol;
    let mut wire = bytes::BytesMut::new();
    let len = 2 + topic.len() + if qos > 0 { 2 } else { 0 } + payload.len();
    wire.extend_from_slice(&[0x30 | (qos << 1) | u8::from(retain)]);
    let mut remaining = len;
    loop {
        let mut b = (remaining % 128) as u8;
        remaining /= 128;
        if remaining > 0 {
            b |= 0x80;
        }
        wire.extend_from_slice(&[b]);
        if remaining == 0 {
            break;
        }
    }
    wire.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    wire.extend_from_slice(topic.as_bytes());
    if qos > 0 {
        wire.extend_from_slice(&pkid.to_be_bytes());
    }
    wire.extend_from_slice(payload);
    rumqttd::protocol::v4::V4.read_mut(&mut wire, usize::MAX).unwrap()
}

/// QoS and packet id of the PUBLISH at the start of `buf`, if it is one.
fn publish_meta(buf: &[u8]) -> Option<(u8, u16)> {
    let first = *buf.first()?;
    if first >> 4 != 3 {
        return None;
    }
    let qos = (first >> 1) & 0b11;
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

impl TestHub {
    /// Waits (at most 10 s) until the hub has recorded its start and listeners in the database, where
    /// `device creds` reads the port of a hub configured on port 0.
    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let running = store::runtime::get(&self.db()).ok().flatten().is_some_and(|r| r.stopped_at.is_none());
            if running {
                return;
            }
            assert!(Instant::now() < deadline, "the hub did not record its start within 10 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Waits (at most `secs`) until `check` holds, looking every 20 ms: for what the hub does on its
/// own time (the writer's interval, a session's end), waited for by its outcome.
pub async fn eventually(what: &str, secs: u64, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !check() {
        assert!(Instant::now() < deadline, "{what}: not within {secs} s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl TestHub {
    /// The running alarm's status, through the control socket.
    pub async fn alarm_status(&self) -> domoticpi::alarm::Status {
        let data_dir = self.data_dir.clone();
        let answer = tokio::task::spawn_blocking(move || {
            domoticpi::control::request(&data_dir, &domoticpi::control::Request::AlarmStatus)
        });
        answer.await.unwrap().unwrap().alarm.expect("no alarm status")
    }
}

/// Waits until a message `publisher` sends on `topic` reaches `sub` (publishing again every
/// 100 ms): then `sub`'s subscription is in place, and the hub has handled everything `publisher`
/// sent before. Other messages `sub` receives meanwhile are dropped.
pub async fn until_routed(publisher: &AsyncClient, sub: &mut Client, topic: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        publisher.publish(topic, QoS::AtMostOnce, false, "probe").await.unwrap();
        let wait = Instant::now() + Duration::from_millis(100);
        while let Ok(Some(p)) = tokio::time::timeout_at(wait.into(), sub.rx.recv()).await {
            if p.topic == topic {
                return;
            }
        }
        assert!(Instant::now() < deadline, "nothing on {topic} reached the subscriber in 10 s");
    }
}

/// An HTTP response as the tests read it.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// Header lines, lower-cased names.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// Opens a TLS connection to the web app and sends one HTTP/1.1 request.
async fn https_send(
    hub: &TestHub,
    method: &str,
    path: &str,
    cookie: Option<&str>,
    body: Option<&str>,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    https_send_to(hub.web.expect("the web app is off"), &hub.ca(), method, path, cookie, body).await
}

/// [`https_send`] to the web app at `addr`, whose CA is `ca`.
pub async fn https_send_to(
    addr: SocketAddr,
    ca: &Path,
    method: &str,
    path: &str,
    cookie: Option<&str>,
    body: Option<&str>,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt;
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(tls_config(ca));
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let mut stream = connector.connect(name, tcp).await.unwrap();
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(c) = cookie {
        request.push_str(&format!("Cookie: {c}\r\n"));
    }
    let body = body.unwrap_or("");
    if method == "POST" {
        request.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).await.unwrap();
    stream
}

/// One HTTPS request to the hub's web app (a JSON body for POST), read to the end.
pub async fn https(hub: &TestHub, method: &str, path: &str, cookie: Option<&str>, body: Option<&str>) -> HttpResponse {
    https_to(hub.web.expect("the web app is off"), &hub.ca(), method, path, cookie, body).await
}

/// [`https`] to the web app at `addr`, whose CA is `ca`.
pub async fn https_to(
    addr: SocketAddr,
    ca: &Path,
    method: &str,
    path: &str,
    cookie: Option<&str>,
    body: Option<&str>,
) -> HttpResponse {
    use tokio::io::AsyncReadExt;
    let mut stream = https_send_to(addr, ca, method, path, cookie, body).await;
    let mut raw = Vec::new();
    let _ =
        tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut raw)).await.expect("no answer in 20 s");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split_whitespace().nth(1)).and_then(|s| s.parse().ok()).unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect::<Vec<_>>();
    let chunked = headers.iter().any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked { dechunk(body) } else { body.to_owned() };
    HttpResponse { status, headers, body }
}

/// The body of a chunked response.
fn dechunk(mut text: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = text.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { break };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        text = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Signs in on the web app; the session cookie (`dpi_session=…`).
pub async fn web_login(hub: &TestHub, user: &str, password: &str) -> String {
    let body = serde_json::json!({ "user": user, "password": password }).to_string();
    let r = https(hub, "POST", "/api/login", None, Some(&body)).await;
    assert_eq!(r.status, 200, "{r:?}");
    let cookie = r.header("set-cookie").expect("no cookie");
    cookie.split(';').next().unwrap().to_owned()
}

/// The live event stream (`GET /api/events`), as data lines.
pub struct EventStream {
    lines: tokio::io::Lines<tokio::io::BufReader<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>>,
}

impl EventStream {
    pub async fn open(hub: &TestHub, cookie: &str) -> EventStream {
        Self::open_at(hub.web.expect("the web app is off"), &hub.ca(), cookie).await
    }

    /// [`EventStream::open`] on the web app at `addr`, whose CA is `ca`.
    pub async fn open_at(addr: SocketAddr, ca: &Path, cookie: &str) -> EventStream {
        use tokio::io::AsyncBufReadExt;
        let stream = https_send_to(addr, ca, "GET", "/api/events", Some(cookie), None).await;
        let mut lines = tokio::io::BufReader::new(stream).lines();
        let status = lines.next_line().await.unwrap().unwrap_or_default();
        assert!(status.contains(" 200 "), "{status}");
        EventStream { lines }
    }

    /// The next event's data, as JSON.
    pub async fn next(&mut self) -> serde_json::Value {
        loop {
            let line = tokio::time::timeout(Duration::from_secs(10), self.lines.next_line())
                .await
                .expect("no event in 10 s")
                .unwrap()
                .expect("stream ended");
            if let Some(data) = line.strip_prefix("data: ").or_else(|| line.strip_prefix("data:")) {
                return serde_json::from_str(data).unwrap();
            }
        }
    }
}
