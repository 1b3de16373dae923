//! The bridge end to end (SPEC §8) against a real Mosquitto, configured from `deploy/company/`,
//! with its own CA and `require_certificate`: the hub's key and request from `domoticpi bridge
//! request`, signed by that CA, as an installer and the company would do it.
//!
//! Needs `mosquitto` (Debian package `mosquitto`); skipped without it unless
//! `DOMOTICPI_REQUIRE_TOOLS=1`.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use domoticpi::store::users::Role;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rumqttc::{MqttOptions, QoS, TlsConfiguration, Transport};
use serde_json::Value;

use crate::util::*;

const HOUSE: &str = "house-0042";
const DOOR: &str = "[[device]]\nid = \"front-door\"\nkind = \"contact\"\nzone = \"entry\"\n";

/// The company's side: its CA, its broker and its services' certificates.
struct Company {
    dir: tempfile::TempDir,
    port: u16,
    issuer: Issuer<'static, KeyPair>,
    broker: Option<Child>,
}

impl Company {
    /// A CA, a server certificate for 127.0.0.1, and Mosquitto's config from `deploy/company/` on a
    /// free loopback port.
    fn new() -> Company {
        let dir = tempfile::tempdir().unwrap();
        let mut ca = CertificateParams::default();
        ca.distinguished_name.push(DnType::CommonName, "Company CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let ca_key = KeyPair::generate().unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.self_signed(&ca_key).unwrap().pem()).unwrap();
        let issuer = Issuer::new(ca, ca_key);

        let mut server = CertificateParams::default();
        server.distinguished_name.push(DnType::CommonName, "company broker");
        server.subject_alt_names = vec![SanType::IpAddress([127, 0, 0, 1].into())];
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_key = KeyPair::generate().unwrap();
        std::fs::write(dir.path().join("server.pem"), server.signed_by(&server_key, &issuer).unwrap().pem()).unwrap();
        std::fs::write(dir.path().join("server.key"), server_key.serialize_pem()).unwrap();

        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/company");
        let here = format!("{}/", dir.path().display());
        let conf = std::fs::read_to_string(root.join("mosquitto.conf"))
            .unwrap()
            .replace("/etc/mosquitto/company/", &here)
            .replace("/var/lib/mosquitto/", &here)
            .replace("listener 8883", &format!("listener {port} 127.0.0.1"));
        // Run as root (CI), Mosquitto would switch to its own user, which cannot read these files.
        let user = if unsafe { libc::geteuid() } == 0 { "user root\n" } else { "" };
        std::fs::write(dir.path().join("mosquitto.conf"), format!("{conf}\n{user}log_dest file {here}mosquitto.log\n"))
            .unwrap();
        std::fs::copy(root.join("acl"), dir.path().join("acl")).unwrap();
        Company { dir, port, issuer, broker: None }
    }

    fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Signs a certificate request as the company's CA does.
    fn sign(&self, csr: &str) -> String {
        CertificateSigningRequestParams::from_pem(csr).unwrap().signed_by(&self.issuer).unwrap().pem()
    }

    /// A client certificate and key for `cn`, signed by the company's CA.
    fn client(&self, cn: &str) -> (PathBuf, PathBuf) {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().unwrap();
        let (cert_path, key_path) =
            (self.dir.path().join(format!("{cn}.pem")), self.dir.path().join(format!("{cn}.key")));
        std::fs::write(&cert_path, params.signed_by(&key, &self.issuer).unwrap().pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }

    /// Starts the broker and waits until it accepts connections.
    fn start(&mut self) {
        let child = Command::new("mosquitto")
            .args(["-c", self.dir.path().join("mosquitto.conf").to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.broker = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "mosquitto did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the broker as its service manager would (it saves its sessions first).
    fn stop(&mut self) {
        if let Some(mut child) = self.broker.take() {
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
            let _ = child.wait();
        }
    }

    /// Makes `cn`'s persistent session on the broker, subscribed to `houses/+/front-door/state` and
    /// `houses/+/alert` (the SUBACK seen, through a probe), and leaves it.
    async fn leave_session(&self, cn: &str) {
        let mut client = self.connect(cn, false).await;
        for filter in ["houses/+/front-door/state", "houses/+/alert"] {
            client.subscribe(filter, QoS::AtLeastOnce).await;
        }
        let own = client.client.clone();
        until_routed(&own, &mut client, "houses/probe/alert").await;
        client.client.disconnect().await.unwrap();
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut client.task).await;
    }

    /// A company service back on its persistent session: no new SUBSCRIBE, so no retained copies
    /// ahead of what was queued for it.
    async fn resume(&self, cn: &str) -> Client {
        self.connect(cn, false).await
    }

    /// A company service connected with its certificate, subscribed to `filter` at QoS 1.
    async fn service(&self, cn: &str, clean: bool, filter: &str) -> Client {
        let client = self.connect(cn, clean).await;
        client.subscribe(filter, QoS::AtLeastOnce).await;
        client
    }

    async fn connect(&self, cn: &str, clean: bool) -> Client {
        self.connect_as(cn, cn, clean).await
    }

    /// Connects with client id `id` and a certificate for `cn`.
    async fn connect_as(&self, id: &str, cn: &str, clean: bool) -> Client {
        let (cert, key) = self.client(cn);
        let mut opts = MqttOptions::new(id, "127.0.0.1", self.port);
        opts.set_keep_alive(Duration::from_secs(30)).set_clean_session(clean);
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls_config_with_cert(
            &self.ca(),
            &cert,
            &key,
        ))));
        Client::connect_with(opts).await.expect("the company service could not connect")
    }
}

impl Drop for Company {
    fn drop(&mut self) {
        if let Some(mut child) = self.broker.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The `[bridge]` section for a hub of `company`, with the house's key and signed certificate made
/// through `domoticpi bridge request`, as an installer would.
fn enrol(company: &Company, house_dir: &Path) -> String {
    let section = format!(
        "[bridge]\nurl = \"mqtts://127.0.0.1:{}\"\nhouse_id = \"{HOUSE}\"\nclient_cert = \"{}\"\nclient_key = \"{}\"\nca = \"{}\"\n",
        company.port,
        house_dir.join("bridge.pem").display(),
        house_dir.join("bridge.key").display(),
        company.ca().display()
    );
    let config = house_dir.join("enrol.toml");
    std::fs::write(&config, config_text(&house_dir.join("data"), &section)).unwrap();
    let (code, csr, err) = run_cli(&["--config", config.to_str().unwrap(), "bridge", "request"], None);
    assert_eq!(code, 0, "{err}");
    assert!(csr.starts_with("-----BEGIN CERTIFICATE REQUEST-----"), "{csr}");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(house_dir.join("bridge.key")).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "the bridge key is not private");
    std::fs::write(house_dir.join("bridge.pem"), company.sign(&csr)).unwrap();
    section
}

/// Waits for a message on `topic`, skipping others; its payload as JSON (or a string).
async fn next_on(client: &mut Client, topic: &str) -> Value {
    loop {
        let p = client.recv(20).await;
        if p.topic == topic {
            return serde_json::from_slice(&p.payload)
                .unwrap_or_else(|_| Value::from(String::from_utf8_lossy(&p.payload).into_owned()));
        }
    }
}

/// Receives into `got` until a message matches `wanted`.
async fn until(client: &mut Client, got: &mut Vec<(String, Value)>, wanted: impl Fn(&(String, Value)) -> bool) {
    loop {
        let Ok(Some(p)) = tokio::time::timeout(Duration::from_secs(20), client.rx.recv()).await else {
            panic!("not received in 20 s; received: {got:#?}");
        };
        let v = serde_json::from_slice(&p.payload)
            .unwrap_or_else(|_| Value::from(String::from_utf8_lossy(&p.payload).into_owned()));
        got.push((p.topic.clone(), v));
        if got.last().is_some_and(&wanted) {
            return;
        }
    }
}

fn skip_without_mosquitto() -> bool {
    !have_tool("mosquitto")
}

#[tokio::test(flavor = "multi_thread")]
async fn states_alarm_events_and_alerts_reach_the_company_under_the_house_prefix() {
    if skip_without_mosquitto() {
        return;
    }
    let mut company = Company::new();
    company.start();
    let mut ops = company.service("company-ops", true, "houses/#").await;
    let house_dir = tempfile::tempdir().unwrap();
    let bridge = enrol(&company, house_dir.path());
    let hub = TestHub::start(&format!("{DOOR}{bridge}")).await;
    hub.add_cheap_user("alice", Role::Resident, "alice-password");

    // Everything the company receives, in order.
    let mut got: Vec<(String, Value)> = Vec::new();
    let topic = |suffix: &str| format!("houses/{HOUSE}/{suffix}");
    until(&mut ops, &mut got, |(t, v)| *t == topic("hub/status") && v == "online").await;
    let door = hub.device("front-door", &hub.device_creds("front-door", false)["password"]).await.unwrap();
    door.client
        .publish("dpi/front-door/state", QoS::AtLeastOnce, true, r#"{"contact":"open","battery":9}"#)
        .await
        .unwrap();
    until(&mut ops, &mut got, |(t, v)| *t == topic("front-door/state") && v["contact"] == "open").await;
    // The door coming online is a change: the health report follows within a second or so.
    until(&mut ops, &mut got, |(t, v)| *t == topic("hub/health") && v["devices_online"] == 1).await;
    let health = &got.last().unwrap().1;
    for key in
        ["version", "uptime_s", "devices", "alarm", "disk_free_mb", "store_commits", "slow_clients", "queue", "dropped"]
    {
        assert!(health.get(key).is_some(), "health without {key}: {health}");
    }

    // A panic: the alarm's state and event go up, and an alert for people.
    let alice = hub.client("alices-phone", "alice", "alice-password").await.unwrap();
    alice.client.publish("dpi/alarm/set", QoS::AtLeastOnce, false, r#"{"action":"panic"}"#).await.unwrap();
    until(&mut ops, &mut got, |(t, v)| *t == topic("alert") && v["alert"] == "alarm_triggered").await;
    assert!(got.iter().any(|(t, v)| *t == topic("alarm/state") && v["state"] == "triggered"), "{got:?}");
    assert!(got.iter().any(|(t, v)| *t == topic("alarm/event") && v["event"] == "triggered"), "{got:?}");
    assert!(got.iter().any(|(t, v)| *t == topic("front-door/availability") && v == "online"), "{got:?}");
    let states = got.iter().filter(|(t, v)| *t == topic("alarm/state") && v["state"] == "triggered").count();
    assert_eq!(states, 1, "the alarm's state sent twice: {got:?}");
    let alerts: Vec<&str> =
        got.iter().filter(|(t, _)| *t == topic("alert")).filter_map(|(_, v)| v["alert"].as_str()).collect();
    assert!(alerts.contains(&"hub_restarted") && alerts.contains(&"low_battery"), "{alerts:?}");
    assert!(got.iter().all(|(t, _)| t.starts_with(&format!("houses/{HOUSE}/"))), "{got:?}");
    hub.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn five_hundred_states_queued_while_the_upstream_is_down_all_arrive_in_order() {
    if skip_without_mosquitto() {
        return;
    }
    let mut company = Company::new();
    // The company's service keeps a session on its broker, so that it gets what arrives while it is away.
    company.start();
    company.leave_session("company-ops").await;
    company.stop();

    let house_dir = tempfile::tempdir().unwrap();
    let bridge = enrol(&company, house_dir.path());
    let hub = TestHub::start(&format!("[store]\ncommit_interval_ms = 200\n{DOOR}{bridge}")).await;
    let door = hub.device("front-door", &hub.device_creds("front-door", false)["password"]).await.unwrap();
    for seq in 0..500 {
        let payload = format!(r#"{{"contact":"{}","seq":{seq}}}"#, if seq % 2 == 0 { "open" } else { "closed" });
        door.client.publish("dpi/front-door/state", QoS::AtLeastOnce, true, payload).await.unwrap();
    }
    let queued = || hub.db().query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get::<_, i64>(0)).unwrap();
    eventually("500 states in the outbox", 20, || queued() >= 500).await;

    company.start();
    let mut ops = company.resume("company-ops").await;
    let mut seen: Vec<i64> = Vec::new();
    while seen.last() != Some(&499) {
        let state = next_on(&mut ops, &format!("houses/{HOUSE}/front-door/state")).await;
        let seq = state["seq"].as_i64().expect("a state without its seq");
        // At least once: a repeat of the last one is allowed, nothing out of order.
        if seen.last() != Some(&seq) {
            seen.push(seq);
        }
    }
    assert_eq!(seen, (0..500).collect::<Vec<i64>>(), "lost or out of order");
    eventually("the outbox emptied once acknowledged", 10, || queued() == 0).await;
    hub.stop().await.unwrap();
}

#[test]
fn the_company_sees_offline_when_the_hub_dies_and_status_shows_the_bridge() {
    if skip_without_mosquitto() {
        return;
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut company = Company::new();
    company.start();
    let mut ops = runtime.block_on(company.service("company-ops", true, "houses/+/hub/status"));
    let house_dir = tempfile::tempdir().unwrap();
    let bridge = enrol(&company, house_dir.path());
    let (_dir, config, _data) = process_config(&format!("{DOOR}{bridge}"));
    let hub = HubProcess::start(&config);
    let status_topic = format!("houses/{HOUSE}/hub/status");
    runtime.block_on(async {
        let mut got = Vec::new();
        until(&mut ops, &mut got, |(t, v)| *t == status_topic && v == "online").await;
    });
    let (code, out, _) = run_cli(&["--config", config.to_str().unwrap(), "status"], None);
    assert_eq!(code, 0);
    let line = out.lines().find(|l| l.starts_with("bridge: ")).unwrap_or_else(|| panic!("no bridge line: {out}"));
    assert!(line.starts_with("bridge: connected") && line.contains("queued") && line.contains("dropped"), "{line}");

    hub.signal("KILL");
    runtime.block_on(async {
        let mut got = Vec::new();
        until(&mut ops, &mut got, |(t, v)| *t == status_topic && v == "offline").await;
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_outbox_drops_the_oldest_states_first_and_keeps_the_alerts() {
    if skip_without_mosquitto() {
        return;
    }
    let mut company = Company::new();
    let house_dir = tempfile::tempdir().unwrap();
    let bridge = enrol(&company, house_dir.path());
    let bridge = bridge.replace("[bridge]\n", "[bridge]\nmax_queue = 40\n");
    let hub = TestHub::start(&format!("[store]\ncommit_interval_ms = 100\n{DOOR}{bridge}")).await;
    hub.add_cheap_user("alice", Role::Resident, "alice-password");
    let door = hub.device("front-door", &hub.device_creds("front-door", false)["password"]).await.unwrap();
    let alice = hub.client("alices-phone", "alice", "alice-password").await.unwrap();
    alice.client.publish("dpi/alarm/set", QoS::AtLeastOnce, false, r#"{"action":"panic"}"#).await.unwrap();
    for seq in 0..100 {
        let payload = format!(r#"{{"contact":"{}","seq":{seq}}}"#, if seq % 2 == 0 { "open" } else { "closed" });
        door.client.publish("dpi/front-door/state", QoS::AtLeastOnce, true, payload).await.unwrap();
    }
    let rows = |hub: &TestHub| -> Vec<(String, Vec<u8>)> {
        let db = hub.db();
        let mut stmt = db.prepare("SELECT topic, payload FROM outbox ORDER BY id").unwrap();
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().map(Result::unwrap).collect()
    };
    let last_seq = |rows: &[(String, Vec<u8>)]| {
        rows.iter()
            .rev()
            .find(|(t, _)| t.ends_with("/front-door/state"))
            .and_then(|(_, p)| serde_json::from_slice::<Value>(p).ok()?.get("seq")?.as_i64())
    };
    let alerts = |rows: &[(String, Vec<u8>)]| -> Vec<String> {
        rows.iter()
            .filter(|(t, _)| t.ends_with("/alert"))
            .filter_map(|(_, p)| Some(serde_json::from_slice::<Value>(p).ok()?.get("alert")?.as_str()?.to_owned()))
            .collect()
    };
    let both_alerts = |rows: &[(String, Vec<u8>)]| {
        let alerts = alerts(rows);
        alerts.contains(&"hub_restarted".to_owned()) && alerts.contains(&"alarm_triggered".to_owned())
    };
    // The alarm's alert comes from the alarm's task, the states from the door's session: either
    // may reach the outbox last.
    eventually("the last state and both alerts in the outbox", 20, || {
        let rows = rows(&hub);
        last_seq(&rows) == Some(99) && both_alerts(&rows)
    })
    .await;
    let kept = rows(&hub);
    assert_eq!(kept.len(), 40, "bounded by max_queue");
    let seqs: Vec<i64> = kept
        .iter()
        .filter(|(t, _)| t.ends_with("/front-door/state"))
        .filter_map(|(_, p)| serde_json::from_slice::<Value>(p).ok()?.get("seq")?.as_i64())
        .collect();
    assert_eq!(seqs, ((100 - seqs.len() as i64)..100).collect::<Vec<_>>(), "the newest states are kept, in order");
    assert!(both_alerts(&kept), "{:?}", alerts(&kept));
    // Every entry ever appended has an id (never reused, nothing sent yet): those not in the
    // outbox are exactly the ones counted as dropped.
    let dropped = domoticpi::store::outbox::dropped(&hub.db()).unwrap();
    let appended: i64 =
        hub.db().query_row("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'", [], |r| r.get(0)).unwrap();
    assert_eq!(dropped, appended - 40, "{appended} appended, 40 kept");
    assert!(dropped >= 60, "{dropped} dropped");

    // The upstream comes back: what was kept arrives, the alerts among it.
    company.start();
    let mut ops = company.service("company-ops", true, "houses/#").await;
    let mut got = Vec::new();
    until(&mut ops, &mut got, |(t, v)| t.ends_with("/front-door/state") && v["seq"] == 99).await;
    assert!(got.iter().any(|(t, v)| t.ends_with("/alert") && v["alert"] == "alarm_triggered"), "{got:?}");
    hub.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_house_cannot_publish_or_subscribe_under_another_house() {
    if skip_without_mosquitto() {
        return;
    }
    let mut company = Company::new();
    company.start();
    let mut ops = company.service("company-ops", true, "houses/#").await;
    // House A, with its own certificate, tries house B's topics.
    let mut a = company.service("house-a", true, "houses/#").await;
    a.client.publish("houses/house-b/alert", QoS::AtLeastOnce, false, "forged").await.unwrap();
    a.client.publish("houses/house-a/alert", QoS::AtLeastOnce, false, "own").await.unwrap();
    let mut got = Vec::new();
    until(&mut ops, &mut got, |(t, _)| t == "houses/house-a/alert").await;
    assert!(got.iter().all(|(t, _)| t != "houses/house-b/alert"), "house A published as house B: {got:?}");
    ops.client.publish("houses/house-b/cmd/alarm/set", QoS::AtLeastOnce, false, "for b").await.unwrap();
    ops.client.publish("houses/house-a/cmd/alarm/set", QoS::AtLeastOnce, false, "for a").await.unwrap();
    let mut seen_by_a = Vec::new();
    until(&mut a, &mut seen_by_a, |(t, _)| t == "houses/house-a/cmd/alarm/set").await;
    assert!(seen_by_a.iter().all(|(t, _)| !t.starts_with("houses/house-b/")), "house A read house B's: {seen_by_a:?}");
}

/// A hub bridged to `company` with remote control `allowed`, alice (code 4821) and a lamp listening
/// to its commands; returns once the upstream has the hub `online`.
async fn remote_house(company: &Company, allowed: bool, house_dir: &Path) -> (TestHub, Client, Client) {
    let bridge =
        enrol(company, house_dir).replace("[bridge]\n", &format!("[bridge]\nallow_remote_control = {allowed}\n"));
    let lamp = "[[device]]\nid = \"lamp\"\nkind = \"light\"\n";
    let hub = TestHub::start(&format!("[alarm]\nexit_delay_s = 0\n{DOOR}{lamp}{bridge}")).await;
    hub.add_cheap_user("alice", Role::Resident, "alice-password");
    let pin = domoticpi::auth::hash(&domoticpi::secret::Secret::new("4821"));
    domoticpi::store::users::set_pin(&hub.db(), "alice", &pin).unwrap();
    let lamp = hub.device("lamp", &hub.device_creds("lamp", false)["password"]).await.unwrap();
    lamp.subscribe("dpi/lamp/set", QOS1).await;
    let mut ops = company.service("company-ops", true, "houses/#").await;
    let mut got = Vec::new();
    until(&mut ops, &mut got, |(t, v)| *t == format!("houses/{HOUSE}/hub/status") && v == "online").await;
    (hub, ops, lamp)
}

#[tokio::test(flavor = "multi_thread")]
async fn remote_commands_run_under_a_residents_rights_and_a_disarm_needs_a_code() {
    if skip_without_mosquitto() {
        return;
    }
    let mut company = Company::new();
    company.start();
    let house_dir = tempfile::tempdir().unwrap();
    let (hub, mut ops, mut lamp) = remote_house(&company, true, house_dir.path()).await;
    let cmd = |suffix: &str| format!("houses/{HOUSE}/cmd/{suffix}");
    let publisher = ops.client.clone();
    let send = |topic: String, payload: &'static str| {
        let client = publisher.clone();
        async move { client.publish(topic, QoS::AtLeastOnce, false, payload).await.unwrap() }
    };

    send(cmd("lamp/set"), r#"{"on":true}"#).await;
    let p = lamp.recv(10).await;
    assert_eq!((p.topic.as_str(), &p.payload[..]), ("dpi/lamp/set", &br#"{"on":true}"#[..]));

    // Not a command: ignored, and nothing reaches the house.
    send(cmd("lamp/state"), r#"{"on":false}"#).await;
    send(cmd("alarm/set"), r#"{"action":"arm_away"}"#).await;
    let mut got = Vec::new();
    until(&mut ops, &mut got, |(t, v)| t.ends_with("/alarm/state") && v["state"] == "armed_away").await;
    assert!(got.iter().all(|(t, _)| *t != format!("houses/{HOUSE}/lamp/state")), "{got:?}");

    send(cmd("alarm/set"), r#"{"action":"disarm"}"#).await;
    until(&mut ops, &mut got, |(t, v)| t.ends_with("/alarm/event") && v["event"] == "code_rejected").await;
    assert_eq!(hub.alarm_status().await.state, "armed_away", "disarmed without a code");
    send(cmd("alarm/set"), r#"{"action":"disarm","code":"4821"}"#).await;
    until(&mut ops, &mut got, |(t, v)| t.ends_with("/alarm/state") && v["state"] == "disarmed").await;
    let disarmed = got.iter().rev().find(|(t, _)| t.ends_with("/alarm/state")).unwrap();
    assert_eq!(disarmed.1["by"], "alice", "the code's owner disarmed");
    hub.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn without_allow_remote_control_nothing_from_upstream_reaches_the_house() {
    if skip_without_mosquitto() {
        return;
    }
    let mut company = Company::new();
    company.start();
    let house_dir = tempfile::tempdir().unwrap();
    let (hub, ops, mut lamp) = remote_house(&company, false, house_dir.path()).await;
    let topic = format!("houses/{HOUSE}/cmd/lamp/set");
    ops.client.publish(topic, QoS::AtLeastOnce, false, r#"{"on":true}"#).await.unwrap();
    ops.client
        .publish(format!("houses/{HOUSE}/cmd/alarm/set"), QoS::AtLeastOnce, false, r#"{"action":"panic"}"#)
        .await
        .unwrap();
    // A resident's command, sent after them, is the first the lamp gets (with remote control on,
    // a remote command reaches it within milliseconds: see the test above).
    let alice = hub.client("alices-phone", "alice", "alice-password").await.unwrap();
    let mut ops = ops;
    let mut got = Vec::new();
    until(&mut ops, &mut got, |(t, _)| t.ends_with("/cmd/alarm/set")).await;
    alice.client.publish("dpi/lamp/set", QoS::AtLeastOnce, false, r#"{"on":false}"#).await.unwrap();
    let p = lamp.recv(10).await;
    assert_eq!(&p.payload[..], br#"{"on":false}"#, "a remote command reached the lamp");
    assert_eq!(hub.alarm_status().await.state, "disarmed");
    hub.stop().await.unwrap();
}

#[test]
fn states_and_alerts_queued_when_the_hub_is_killed_all_arrive_after_its_restart() {
    if skip_without_mosquitto() {
        return;
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut company = Company::new();
    company.start();
    runtime.block_on(company.leave_session("company-ops"));
    company.stop();
    let house_dir = tempfile::tempdir().unwrap();
    let bridge = enrol(&company, house_dir.path());
    let (_dir, config, data) = process_config(&format!("[store]\ncommit_interval_ms = 100\n{DOOR}{bridge}"));
    let cfg = config.to_str().unwrap();
    let hub = HubProcess::start(&config);
    let (code, creds, err) = run_cli(&["--config", cfg, "device", "creds", "front-door"], None);
    assert_eq!(code, 0, "{err}");
    let password = creds.lines().find_map(|l| l.strip_prefix("password: ")).unwrap().to_owned();
    let db = || domoticpi::store::open(&data.join("hub.db")).unwrap();
    runtime.block_on(async {
        let ca = data.join("certs/ca.pem");
        let door = Client::connect(hub.tls, &ca, "front-door", Some(("front-door", &password))).await.unwrap();
        for seq in 0..100 {
            let payload =
                format!(r#"{{"contact":"{}","battery":50,"seq":{seq}}}"#, if seq % 2 == 0 { "open" } else { "closed" });
            door.client.publish("dpi/front-door/state", QoS::AtLeastOnce, true, payload).await.unwrap();
        }
        door.client
            .publish("dpi/front-door/state", QoS::AtLeastOnce, true, r#"{"contact":"closed","battery":5}"#)
            .await
            .unwrap();
        let queued = || {
            db().query_row("SELECT COUNT(*) FROM outbox WHERE topic LIKE '%front-door/state'", [], |r| {
                r.get::<_, i64>(0)
            })
            .unwrap()
        };
        eventually("101 states in the outbox", 20, || queued() >= 101).await;
    });
    hub.signal("KILL");
    drop(hub);

    company.start();
    let _hub = HubProcess::start(&config);
    runtime.block_on(async {
        let mut ops = company.resume("company-ops").await;
        let mut got = Vec::new();
        until(&mut ops, &mut got, |(t, v)| t.ends_with("/front-door/state") && v["battery"] == 5).await;
        until(&mut ops, &mut got, |(t, v)| t.ends_with("/alert") && v["alert"] == "low_battery").await;
        let mut seqs: Vec<i64> = got
            .iter()
            .filter(|(t, _)| t.ends_with("/front-door/state"))
            .filter_map(|(_, v)| v["seq"].as_i64())
            .collect();
        seqs.dedup();
        assert_eq!(seqs, (0..100).collect::<Vec<i64>>(), "lost or out of order across the kill");
        let alerts: Vec<&str> =
            got.iter().filter(|(t, _)| t.ends_with("/alert")).filter_map(|(_, v)| v["alert"].as_str()).collect();
        assert_eq!(alerts.iter().filter(|a| **a == "hub_restarted").count(), 2, "{alerts:?}");
        assert!(alerts.contains(&"low_battery"), "{alerts:?}");
    });
}

/// A bridge section pointing at `port` on loopback, with files that need not be valid.
fn unreachable_bridge(port: u16, dir: &Path) -> String {
    std::fs::create_dir_all(dir).unwrap();
    let company = Company::new();
    let section = enrol(&company, dir);
    // The company's files go with it: the bridge keeps a copy of its CA, so that it really tries.
    let ca = dir.join("company-ca.pem");
    std::fs::copy(company.ca(), &ca).unwrap();
    section
        .replace(&format!("127.0.0.1:{}", company.port), &format!("127.0.0.1:{port}"))
        .replace(&company.ca().display().to_string(), &ca.display().to_string())
}

/// Motion → light on, off after 1 s; front door open while armed away → pending, triggered after
/// 2 s. Returns (light off after the motion, triggered after the door opened).
async fn rule_timings(bridge: &str) -> (Duration, Duration) {
    let config = format!(
        "[alarm]\nexit_delay_s = 0\nentry_delay_s = 2\n{DOOR}\
         [[device]]\nid = \"hall-motion\"\nkind = \"motion\"\n[[device]]\nid = \"hall-light\"\nkind = \"light\"\n\
         [[rule.motion_light]]\nsensors = [\"hall-motion\"]\nlights = [\"hall-light\"]\noff_after_s = 1\nwhen = \"always\"\n{bridge}"
    );
    let hub = TestHub::start(&config).await;
    hub.add_cheap_user("admin", Role::Admin, "admin-password");
    let mut watcher = hub.client("watcher", "admin", "admin-password").await.unwrap();
    watcher.subscribe("dpi/#", QOS1).await;
    let connect = |id: &'static str| {
        let hub = &hub;
        async move {
            hub.set_device_password(id, "secret");
            hub.device(id, "secret").await.unwrap()
        }
    };
    let (motion, mut light, door) =
        (connect("hall-motion").await, connect("hall-light").await, connect("front-door").await);
    light.subscribe("dpi/hall-light/set", QOS1).await;
    until_routed(&watcher.client, &mut light, "dpi/hall-light/set").await;

    motion.client.publish("dpi/hall-motion/state", QoS::AtLeastOnce, false, r#"{"motion":true}"#).await.unwrap();
    let moved = Instant::now();
    loop {
        if &light.recv(10).await.payload[..] == br#"{"on":false}"# {
            break;
        }
    }
    let light_off = moved.elapsed();

    let (code, _, err) = run_cli(&["--config", &hub.config_path(), "alarm", "arm", "away", "--force"], None);
    assert_eq!(code, 0, "{err}");
    door.client.publish("dpi/front-door/state", QoS::AtLeastOnce, false, "OPEN").await.unwrap();
    let opened = Instant::now();
    loop {
        let p = watcher.recv(10).await;
        if p.topic == "dpi/alarm/state" && serde_json::from_slice::<Value>(&p.payload).unwrap()["state"] == "triggered"
        {
            break;
        }
    }
    let triggered = opened.elapsed();
    hub.stop().await.unwrap();
    (light_off, triggered)
}

#[tokio::test(flavor = "multi_thread")]
async fn with_the_upstream_unreachable_or_stalled_the_rules_and_the_alarm_keep_their_time() {
    // A closed port, and a listener that accepts and never says a word.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let attempts = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = std::sync::Arc::clone(&attempts);
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in silent.incoming().flatten() {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(stream);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("no bridge", String::new()),
        ("closed port", unreachable_bridge(closed, &dir.path().join("a"))),
        ("silent listener", unreachable_bridge(silent_port, &dir.path().join("b"))),
    ];
    for (name, bridge) in cases {
        let (light_off, triggered) = rule_timings(&bridge).await;
        println!("{name}: light off {light_off:?} after the motion, triggered {triggered:?} after the door");
        // Not a speed test: only that neither waits on the bridge (an attempt takes up to 10 s).
        assert!(light_off >= Duration::from_millis(800) && light_off < Duration::from_secs(4), "{name}: {light_off:?}");
        assert!(
            triggered >= Duration::from_millis(1_800) && triggered < Duration::from_secs(5),
            "{name}: {triggered:?}"
        );
    }
    assert!(attempts.load(std::sync::atomic::Ordering::SeqCst) > 0, "the bridge never reached the silent listener");
}

#[tokio::test(flavor = "multi_thread")]
async fn alert_workers_share_one_subscription_and_each_alert_reaches_one_of_them() {
    if skip_without_mosquitto() {
        return;
    }
    let mut company = Company::new();
    company.start();
    let mut workers = Vec::new();
    for n in 0..2 {
        let worker = company.connect_as(&format!("alerts-{n}"), "company-alerts", true).await;
        worker.subscribe("$share/alerts/houses/+/alert", QoS::AtLeastOnce).await;
        workers.push(worker);
    }
    // Ten houses' alerts (published as the houses, with their own certificates).
    let mut houses = Vec::new();
    for n in 0..10 {
        houses.push(company.connect(&format!("house-{n}"), true).await);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut received: Vec<(usize, String)> = Vec::new();
    let mut round = 0;
    // Subscriptions go in asynchronously: publish rounds until every house's alert of a round is in.
    while received.iter().filter(|(_, t)| t.ends_with(&format!("#{round}"))).count() < 10 {
        assert!(Instant::now() < deadline, "alerts missing: {received:?}");
        round += 1;
        for (n, house) in houses.iter().enumerate() {
            let body = format!(r##"{{"alert":"tamper","device":"door","at":"x","round":"#{round}"}}"##);
            house.client.publish(format!("houses/house-{n}/alert"), QoS::AtLeastOnce, false, body).await.unwrap();
        }
        let wait = Instant::now() + Duration::from_millis(500);
        while Instant::now() < wait {
            for (w, worker) in workers.iter_mut().enumerate() {
                while let Ok(p) = worker.rx.try_recv() {
                    let v: Value = serde_json::from_slice(&p.payload).unwrap();
                    received.push((w, format!("{}{}", p.topic, v["round"].as_str().unwrap())));
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let last: Vec<&(usize, String)> = received.iter().filter(|(_, t)| t.ends_with(&format!("#{round}"))).collect();
    let mut topics: Vec<&str> = last.iter().map(|(_, t)| t.as_str()).collect();
    topics.sort();
    topics.dedup();
    assert_eq!(topics.len(), 10, "each alert exactly once: {last:?}");
    assert_eq!(last.len(), 10, "an alert reached both workers: {last:?}");
    assert!(
        last.iter().any(|(w, _)| *w == 0) && last.iter().any(|(w, _)| *w == 1),
        "one worker got them all: {last:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn twenty_hubs_bridged_to_one_upstream_each_under_its_own_prefix_only() {
    if skip_without_mosquitto() {
        return;
    }
    let mut company = Company::new();
    company.start();
    let mut ops = company.service("company-ops", true, "houses/+/front-door/state").await;
    let started = Instant::now();
    let mut hubs = Vec::new();
    for n in 0..20 {
        let dir = tempfile::tempdir().unwrap();
        let bridge = enrol(&company, dir.path()).replace(HOUSE, &format!("house-{n:02}"));
        // The request above was for HOUSE: sign one for this house's id instead.
        let (code, csr, err) =
            run_cli(&["--config", dir.path().join("enrol.toml").to_str().unwrap(), "bridge", "request"], None);
        assert_eq!(code, 0, "{err}");
        let mut params = CertificateSigningRequestParams::from_pem(&csr).unwrap();
        params.params.distinguished_name = rcgen::DistinguishedName::new();
        params.params.distinguished_name.push(DnType::CommonName, format!("house-{n:02}"));
        std::fs::write(dir.path().join("bridge.pem"), params.signed_by(&company.issuer).unwrap().pem()).unwrap();
        let hub = TestHub::start(&format!("{DOOR}{bridge}")).await;
        hub.set_device_password("front-door", "secret");
        hubs.push((dir, hub));
    }
    let mut doors = Vec::new();
    for (n, (_, hub)) in hubs.iter().enumerate() {
        let door = hub.device("front-door", "secret").await.unwrap();
        let payload = format!(r#"{{"contact":"open","house":"house-{n:02}"}}"#);
        door.client.publish("dpi/front-door/state", QoS::AtLeastOnce, true, payload).await.unwrap();
        doors.push(door);
    }
    let mut got = Vec::new();
    let mut houses = std::collections::BTreeSet::new();
    while houses.len() < 20 {
        until(&mut ops, &mut got, |(t, _)| t.ends_with("/front-door/state")).await;
        let (topic, state) = got.last().unwrap();
        // Each state under the prefix of the house that sent it, and no other.
        assert_eq!(*topic, format!("houses/{}/front-door/state", state["house"].as_str().unwrap()), "{got:?}");
        houses.insert(topic.clone());
    }
    println!("20 hubs bridged to one upstream: every house's state under its own prefix in {:?}", started.elapsed());
    for (_, hub) in hubs {
        hub.stop().await.unwrap();
    }
}

/// `DOMOTICPI_…` as a number, or `default`.
fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// p50 and p99 of `samples`, in milliseconds.
fn percentiles(samples: &mut [Duration]) -> (f64, f64) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize].as_secs_f64() * 1000.0;
    (at(0.5), at(0.99))
}

/// A measurement, not a check (run it in release; README, "Benchmarks"): N states (10,000 unless
/// `DOMOTICPI_BRIDGE_QUEUE`) queued while the upstream is down, the disk they take, and how fast
/// they reach a company service once it is back.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a measurement: cargo test --release --test integration bridge::measure -- --ignored --nocapture"]
async fn measure_catch_up_after_an_outage() {
    if skip_without_mosquitto() {
        return;
    }
    let n = env_or("DOMOTICPI_BRIDGE_QUEUE", 10_000);
    let mut company = Company::new();
    company.start();
    company.leave_session("company-ops").await;
    company.stop();
    let house_dir = tempfile::tempdir().unwrap();
    let bridge = enrol(&company, house_dir.path()).replace("[bridge]\n", &format!("[bridge]\nmax_queue = {}\n", n * 2));
    let hub = TestHub::start(&format!("{DOOR}{bridge}")).await;
    hub.set_device_password("front-door", "secret");
    let door = hub.device("front-door", "secret").await.unwrap();
    let pages = |hub: &TestHub| -> i64 {
        let db = hub.db();
        let count: i64 = db.query_row("PRAGMA page_count", [], |r| r.get(0)).unwrap();
        let size: i64 = db.query_row("PRAGMA page_size", [], |r| r.get(0)).unwrap();
        count * size
    };
    let queued = |hub: &TestHub| hub.db().query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get::<_, i64>(0)).unwrap();
    eventually("the start's entries queued", 10, || queued(&hub) > 0).await;
    let (before, before_rows) = (pages(&hub), queued(&hub));
    for seq in 0..n {
        let payload =
            format!(r#"{{"contact":"{}","battery":80,"seq":{seq}}}"#, if seq % 2 == 0 { "open" } else { "closed" });
        door.client.publish("dpi/front-door/state", QoS::AtLeastOnce, true, payload).await.unwrap();
    }
    let last = format!(r#""seq":{}"#, n - 1);
    let outbox_has_last = || {
        hub.db()
            .query_row("SELECT COUNT(*) FROM outbox WHERE CAST(payload AS TEXT) LIKE ?1", [format!("%{last}%")], |r| {
                r.get::<_, i64>(0)
            })
            .unwrap()
            > 0
    };
    eventually("every state queued", 120, outbox_has_last).await;
    let (after, rows) = (pages(&hub), queued(&hub));
    let per_entry = (after - before) as f64 / (rows - before_rows) as f64;

    company.start();
    let back = Instant::now();
    let mut ops = company.resume("company-ops").await;
    let mut received = 0;
    loop {
        let p = ops.recv(120).await;
        if p.topic.ends_with("/front-door/state") {
            received += 1;
            if String::from_utf8_lossy(&p.payload).contains(&last) {
                break;
            }
        }
    }
    let caught_up = back.elapsed();
    eventually("the outbox emptied", 120, || queued(&hub) == 0).await;
    let drained = back.elapsed();
    println!(
        "catch-up: {} entries queued ({rows} rows, {per_entry:.0} bytes of database each); the company had the last \
         {caught_up:?} after its broker came back ({:.0} msg/s, {received} states received), the outbox empty after {drained:?}",
        rows - before_rows,
        received as f64 / caught_up.as_secs_f64()
    );
    hub.stop().await.unwrap();
}

/// A measurement: door → siren (a perimeter door while armed away triggers at once) with the
/// upstream reachable, at a closed port, and at a listener that never speaks; N rounds each
/// (`DOMOTICPI_BRIDGE_ROUNDS`, 200).
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a measurement: cargo test --release --test integration bridge::measure -- --ignored --nocapture"]
async fn measure_door_to_siren_with_the_upstream_reachable_unreachable_and_stalled() {
    if skip_without_mosquitto() {
        return;
    }
    let rounds = env_or("DOMOTICPI_BRIDGE_ROUNDS", 200);
    let mut company = Company::new();
    company.start();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in silent.incoming().flatten() {
            held.push(stream);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let reachable = enrol(&company, dir.path());
    let cases = [
        ("no bridge", String::new()),
        ("upstream reachable", reachable),
        ("closed port", unreachable_bridge(closed, &dir.path().join("closed"))),
        ("silent listener", unreachable_bridge(silent_port, &dir.path().join("silent"))),
    ];
    let perimeter = "[[device]]\nid = \"back-door\"\nkind = \"contact\"\nzone = \"perimeter\"\n[[device]]\nid = \"siren\"\nkind = \"siren\"\n";
    for (name, bridge) in cases {
        let hub = TestHub::start(&format!("[alarm]\nexit_delay_s = 0\n{perimeter}{bridge}")).await;
        hub.add_cheap_user("alice", Role::Resident, "alice-password");
        let pin = domoticpi::auth::hash(&domoticpi::secret::Secret::new("4821"));
        domoticpi::store::users::set_pin(&hub.db(), "alice", &pin).unwrap();
        let alice = hub.client("alices-phone", "alice", "alice-password").await.unwrap();
        for id in ["back-door", "siren"] {
            hub.set_device_password(id, "secret");
        }
        let door = hub.device("back-door", "secret").await.unwrap();
        let mut siren = hub.device("siren", "secret").await.unwrap();
        siren.subscribe("dpi/siren/set", QOS1).await;
        until_routed(&alice.client, &mut siren, "dpi/siren/set").await;
        let mut samples = Vec::new();
        for _ in 0..rounds {
            alice.client.publish("dpi/alarm/set", QoS::AtLeastOnce, false, r#"{"action":"arm_away"}"#).await.unwrap();
            eventually("armed", 10, || {
                hub.db()
                    .query_row("SELECT snapshot FROM alarm", [], |r| r.get::<_, String>(0))
                    .unwrap()
                    .contains("armed_away")
            })
            .await;
            let opened = Instant::now();
            door.client.publish("dpi/back-door/state", QoS::AtLeastOnce, false, "OPEN").await.unwrap();
            loop {
                if &siren.recv(10).await.payload[..] == br#"{"on":true}"# {
                    break;
                }
            }
            samples.push(opened.elapsed());
            door.client.publish("dpi/back-door/state", QoS::AtLeastOnce, false, "CLOSED").await.unwrap();
            alice
                .client
                .publish("dpi/alarm/set", QoS::AtLeastOnce, false, r#"{"action":"disarm","code":"4821"}"#)
                .await
                .unwrap();
            loop {
                if &siren.recv(10).await.payload[..] == br#"{"on":false}"# {
                    break;
                }
            }
        }
        let (p50, p99) = percentiles(&mut samples);
        println!("door → siren, {name}: p50 {p50:.2} ms, p99 {p99:.2} ms ({rounds} rounds)");
        hub.stop().await.unwrap();
    }
}

/// A measurement: what the example house (`config/house.toml`, played by `domoticpi-house` for
/// `DOMOTICPI_BRIDGE_SECONDS`, 60) sends upstream. Needs `cargo build --release -p domoticpi-house`.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a measurement: cargo build --release -p domoticpi-house && cargo test --release --test integration bridge::measure -- --ignored --nocapture"]
async fn measure_what_one_house_sends_upstream() {
    if skip_without_mosquitto() {
        return;
    }
    let seconds = env_or("DOMOTICPI_BRIDGE_SECONDS", 60);
    let player = Path::new(bin()).with_file_name("domoticpi-house");
    assert!(player.exists(), "build it first: cargo build --release -p domoticpi-house");
    let mut company = Company::new();
    company.start();
    let mut ops = company.service("company-ops", true, "houses/#").await;
    let house_dir = tempfile::tempdir().unwrap();
    let bridge = enrol(&company, house_dir.path());
    let example = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/house.toml")).unwrap();
    let body = &example[example.find("[[room]]").unwrap()..];
    let hub = TestHub::start(&format!("{body}\n{bridge}")).await;
    hub.wait_ready().await;
    let mut play = Command::new(&player)
        .args(["--config", &hub.config_path(), "--duration", &seconds.to_string(), "--seed", "7"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let mut counts = std::collections::BTreeMap::<String, u64>::new();
    while started.elapsed() < Duration::from_secs(seconds as u64) {
        if let Ok(Some(p)) = tokio::time::timeout(Duration::from_millis(200), ops.rx.recv()).await {
            let kind = p.topic.rsplit('/').next().unwrap_or("").to_owned();
            *counts.entry(kind).or_default() += 1;
        }
    }
    let _ = play.wait();
    let total: u64 = counts.values().sum();
    println!(
        "one example house, {seconds} s: {total} messages upstream ({:.2}/s): {counts:?}",
        total as f64 / seconds as f64
    );
    hub.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bridge_key_other_users_can_read_is_refused_and_status_says_why() {
    let company = Company::new();
    let house_dir = tempfile::tempdir().unwrap();
    let bridge = enrol(&company, house_dir.path());
    let key = house_dir.path().join("bridge.key");
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let hub = TestHub::start(&format!("{DOOR}{bridge}")).await;
    hub.wait_ready().await;
    let status = || {
        let (_, out, _) = run_cli(&["--config", &hub.config_path(), "status"], None);
        out.lines().find(|l| l.starts_with("bridge: ")).unwrap_or_default().to_owned()
    };
    eventually("the bridge down for its key", 10, || status().contains("readable by other users")).await;
    hub.stop().await.unwrap();
}

#[test]
fn a_hub_bridged_to_a_silent_listener_still_stops_within_five_seconds() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let (accepted, attempt) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in silent.incoming().flatten() {
            let _ = accepted.send(());
            held.push(stream);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let bridge = unreachable_bridge(port, dir.path());
    let (_dir, config, _) = process_config(&format!("{DOOR}{bridge}"));
    let mut hub = HubProcess::start(&config);
    // Its first attempt is under way, waiting on a listener that never speaks.
    attempt.recv_timeout(Duration::from_secs(10)).expect("the bridge never tried");
    hub.signal("TERM");
    let (status, took) = hub.wait(Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
    assert!(took < Duration::from_secs(5), "stopped after {took:?}");
    let log: Vec<String> = hub.stderr.try_iter().collect();
    assert!(!log.iter().any(|l| l.contains("did not stop in time") || l.contains("did not close in time")), "{log:#?}");
}
