//! Who may connect and what each identity may do (SPEC §6), and the MQTT 3.1.1 behaviour the
//! hub's connection layer guarantees.

use std::time::Duration;

use domoticpi::store::users::Role;
use rumqttc::{ConnectReturnCode, ConnectionError, MqttOptions, QoS, TlsConfiguration, Transport};
use rumqttd::protocol::{Filter, Packet, RetainForwardRule, Subscribe, SubscribeReasonCode};

use crate::util::*;

const DEVICES: &str = "[[device]]\nid = \"hall-motion\"\nkind = \"motion\"\nzone = \"interior\"\n\
[[device]]\nid = \"hall-light\"\nkind = \"light\"\n\
[[device]]\nid = \"keypad\"\nkind = \"keypad\"\n\
[[device]]\nid = \"siren\"\nkind = \"siren\"\n";

/// A hub with the test devices and an admin watching `#`.
async fn hub_with_watcher(extra: &str) -> (TestHub, Client) {
    let hub = TestHub::start(&format!("{extra}{DEVICES}")).await;
    hub.add_user("admin", Role::Admin, "admin-password");
    let watcher = hub.client("watcher", "admin", "admin-password").await.unwrap();
    watcher.subscribe("#", QOS1).await;
    (hub, watcher)
}

/// Asserts that `watcher` sees the hub reject a publish on `topic`, and nothing on `topic` itself.
async fn expect_rejected(watcher: &mut Client, topic: &str) {
    loop {
        let p = watcher.recv(10).await;
        assert_ne!(p.topic, topic, "a refused publish was delivered");
        if p.topic == "dpi/hub/error" {
            let body: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
            if body["topic"] == topic {
                return;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_device_connects_with_its_issued_password_and_a_reissue_revokes_the_old_one() {
    let (hub, mut watcher) = hub_with_watcher("").await;
    let creds = hub.device_creds("hall-motion", false);
    assert_eq!(creds["client_id"], "hall-motion");
    assert_eq!(creds["username"], "hall-motion");
    assert_eq!(creds["port"], hub.tls.port().to_string());
    assert_eq!(creds["publish"], "dpi/hall-motion/state, dpi/hall-motion/availability");
    assert_eq!(creds["subscribe"], "dpi/hall-motion/set, dpi/alarm/state");
    assert_eq!(creds["ca"], std::fs::canonicalize(hub.ca()).unwrap().display().to_string());
    let device = hub.device("hall-motion", &creds["password"]).await.unwrap();
    // The hub announces the device itself.
    watcher.expect("dpi/hall-motion/availability", b"online").await;
    drop(device);
    watcher.expect("dpi/hall-motion/availability", b"offline").await;

    let new = hub.device_creds("hall-motion", false);
    assert_ne!(new["password"], creds["password"]);
    let err = hub.device("hall-motion", &creds["password"]).await.err().expect("revoked password accepted");
    assert!(matches!(err, ConnectionError::ConnectionRefused(ConnectReturnCode::BadUserNamePassword)), "{err:?}");
    hub.device("hall-motion", &new["password"]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn devices_and_unknown_ids_are_refused_without_their_own_credentials() {
    let (hub, _watcher) = hub_with_watcher("").await;
    let creds = hub.device_creds("hall-light", false);
    // Another device's password, an undeclared id, a device id as a user's client id.
    let cases = [
        ("hall-motion", "hall-motion", creds["password"].as_str(), ConnectReturnCode::BadUserNamePassword),
        ("ghost", "ghost", creds["password"].as_str(), ConnectReturnCode::BadUserNamePassword),
        ("hall-light", "admin", "admin-password", ConnectReturnCode::BadClientId),
        ("not-its-id", "hall-light", creds["password"].as_str(), ConnectReturnCode::BadClientId),
    ];
    for (id, user, pass, code) in cases {
        let err = hub.client(id, user, pass).await.err().unwrap_or_else(|| panic!("{user} as {id} accepted"));
        assert!(matches!(err, ConnectionError::ConnectionRefused(c) if c == code), "{user} as {id}: {err:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_device_cannot_publish_outside_its_own_topics() {
    let (hub, mut watcher) = hub_with_watcher("").await;
    let motion = hub.device("hall-motion", &hub.device_creds("hall-motion", false)["password"]).await.unwrap();
    for topic in ["dpi/hall-light/set", "dpi/alarm/set", "dpi/siren/set", "dpi/hall-light/state", "dpi/hub/status"] {
        motion.client.publish(topic, QoS::AtLeastOnce, false, r#"{"on":true}"#).await.unwrap();
        expect_rejected(&mut watcher, topic).await;
    }
    // Its own state goes through, and the connection survived the refusals.
    motion.client.publish("dpi/hall-motion/state", QoS::AtLeastOnce, false, r#"{"motion":true}"#).await.unwrap();
    watcher.expect("dpi/hall-motion/state", br#"{"motion":true}"#).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_keypad_may_set_the_alarm() {
    let (hub, mut watcher) = hub_with_watcher("").await;
    let keypad = hub.device("keypad", &hub.device_creds("keypad", false)["password"]).await.unwrap();
    keypad.client.publish("dpi/alarm/set", QoS::AtLeastOnce, false, r#"{"action":"panic"}"#).await.unwrap();
    watcher.expect("dpi/alarm/set", br#"{"action":"panic"}"#).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_resident_commands_devices_but_cannot_fake_their_state() {
    let (hub, mut watcher) = hub_with_watcher("").await;
    hub.add_user("bob", Role::Resident, "bob-password");
    let bob = hub.client("bobs-phone", "bob", "bob-password").await.unwrap();
    bob.client.publish("dpi/hall-motion/state", QoS::AtLeastOnce, false, r#"{"motion":true}"#).await.unwrap();
    expect_rejected(&mut watcher, "dpi/hall-motion/state").await;
    bob.client.publish("dpi/hall-light/set", QoS::AtLeastOnce, false, r#"{"on":true}"#).await.unwrap();
    watcher.expect("dpi/hall-light/set", br#"{"on":true}"#).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_subscriptions_get_0x80_and_allowed_ones_their_qos() {
    let hub = TestHub::start(DEVICES).await;
    let creds = hub.device_creds("hall-motion", false);
    let mut raw = RawClient::connect(hub.tls, &hub.ca()).await;
    raw.connect_packet("hall-motion", "hall-motion", &creds["password"], 30).await;
    assert!(matches!(raw.recv(Duration::from_secs(10)).await, Some(Packet::ConnAck(..))));
    let filter = |path: &str, qos| Filter {
        path: path.into(),
        qos,
        nolocal: false,
        preserve_retain: false,
        retain_forward_rule: RetainForwardRule::OnEverySubscribe,
    };
    use rumqttd::protocol::QoS as Q;
    let filters = vec![
        filter("#", Q::AtLeastOnce),
        filter("dpi/hall-motion/set", Q::AtLeastOnce),
        filter("dpi/+/set", Q::AtMostOnce),
        filter("dpi/alarm/state", Q::AtMostOnce),
    ];
    raw.send(Packet::Subscribe(Subscribe { pkid: 7, filters }, None)).await;
    let Some(Packet::SubAck(ack, _)) = raw.recv(Duration::from_secs(10)).await else { panic!("no SUBACK") };
    assert_eq!(ack.pkid, 7);
    let codes: Vec<_> = ack.return_codes.iter().map(|c| matches!(c, SubscribeReasonCode::Failure)).collect();
    assert_eq!(codes, [true, false, true, false], "{:?}", ack.return_codes);
    // All refused: answered by the hub alone.
    raw.send(Packet::Subscribe(Subscribe { pkid: 8, filters: vec![filter("dpi/#", Q::AtMostOnce)] }, None)).await;
    // The retained `dpi/alarm/state` granted above may arrive first.
    let ack = loop {
        match raw.recv(Duration::from_secs(10)).await {
            Some(Packet::SubAck(ack, _)) => break ack,
            Some(Packet::Publish(p, _)) if p.topic == "dpi/alarm/state" => continue,
            other => panic!("no SUBACK: {other:?}"),
        }
    };
    assert_eq!((ack.pkid, ack.return_codes.as_slice()), (8, &[SubscribeReasonCode::Failure][..]));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_oversize_payload_closes_the_connection() {
    let (hub, mut watcher) = hub_with_watcher("max_payload_bytes = 1024\n").await;
    let creds = hub.device_creds("hall-motion", false);
    let device = hub.device("hall-motion", &creds["password"]).await.unwrap();
    device.client.publish("dpi/hall-motion/state", QoS::AtLeastOnce, false, vec![b'x'; 4096]).await.unwrap();
    let mut device = device;
    let ended =
        tokio::time::timeout(Duration::from_secs(10), &mut device.task).await.expect("still connected").unwrap();
    assert!(ended.is_some(), "the eventloop should end with an error");
    // The hub noticed the device go.
    watcher.expect("dpi/hall-motion/availability", b"offline").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_device_certificate_authenticates_and_a_foreign_ca_does_not() {
    let (hub, mut watcher) = hub_with_watcher("require_client_cert = true\n").await;
    let creds = hub.device_creds("hall-light", true);
    let (cert, key) = (std::path::PathBuf::from(&creds["cert"]), std::path::PathBuf::from(&creds["key"]));
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    // With require_client_cert, a password alone is not enough.
    let err = hub.device("hall-light", &creds["password"]).await.err().expect("password-only device accepted");
    assert!(matches!(err, ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized)), "{err:?}");
    let mut opts = MqttOptions::new("hall-light", "127.0.0.1", hub.tls.port());
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls_config_with_cert(
        &hub.ca(),
        &cert,
        &key,
    ))));
    let light = Client::connect_with(opts).await.unwrap();
    light.client.publish("dpi/hall-light/state", QoS::AtLeastOnce, true, r#"{"on":false}"#).await.unwrap();
    watcher.expect("dpi/hall-light/state", br#"{"on":false}"#).await;

    // A certificate with CN hall-light from another CA fails the TLS handshake.
    let other = tempfile::tempdir().unwrap();
    let paths = domoticpi::certs::CertPaths::new(other.path());
    domoticpi::certs::ensure(&paths, &Default::default()).unwrap();
    let (fcert, fkey) = domoticpi::certs::issue_device(&paths, "hall-light").unwrap();
    let mut opts = MqttOptions::new("hall-light", "127.0.0.1", hub.tls.port());
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls_config_with_cert(
        &hub.ca(),
        &fcert,
        &fkey,
    ))));
    let err = Client::connect_with(opts).await.err().expect("foreign certificate accepted");
    assert!(!matches!(err, ConnectionError::ConnectionRefused(_)), "expected a TLS failure, got {err:?}");
}

use std::os::unix::fs::PermissionsExt;

#[tokio::test(flavor = "multi_thread")]
async fn a_will_fires_once_for_the_connection_that_died_and_never_for_a_takeover() {
    let (hub, mut watcher) = hub_with_watcher("").await;
    let with_will = |msg: &str| {
        let mut o = MqttOptions::new("node-red", "127.0.0.1", hub.tls.port());
        o.set_credentials("admin", "admin-password");
        o.set_last_will(rumqttc::LastWill::new("house/node-red", msg.to_owned(), QoS::AtLeastOnce, false));
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls_config(&hub.ca()))));
        o
    };
    let first = Client::connect_with(with_will("will-of-first")).await.unwrap();
    // The second CONNACK comes once the first connection is closed.
    let second = Client::connect_with(with_will("will-of-second")).await.unwrap();
    // The second connection dies without DISCONNECT: its will, once; never the first's.
    drop(second);
    let mut wills = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while let Ok(Some(p)) = tokio::time::timeout_at(deadline, watcher.rx.recv()).await {
        if p.topic == "house/node-red" {
            wills.push(String::from_utf8_lossy(&p.payload).into_owned());
        }
    }
    assert_eq!(wills, ["will-of-second"]);
    drop(first);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_subscriber_is_timed_out_even_while_it_receives_traffic() {
    let hub = TestHub::start("").await;
    hub.add_user("admin", Role::Admin, "admin-password");
    let mut raw = RawClient::connect(hub.tls, &hub.ca()).await;
    raw.connect_packet("silent", "admin", "admin-password", 1).await;
    assert!(matches!(raw.recv(Duration::from_secs(10)).await, Some(Packet::ConnAck(..))));
    raw.send(Packet::Subscribe(
        Subscribe {
            pkid: 1,
            filters: vec![Filter {
                path: "load/#".into(),
                qos: rumqttd::protocol::QoS::AtMostOnce,
                nolocal: false,
                preserve_retain: false,
                retain_forward_rule: RetainForwardRule::Never,
            }],
        },
        None,
    ))
    .await;
    let publisher = hub.client("loader", "admin", "admin-password").await.unwrap();
    let load = tokio::spawn(async move {
        for i in 0..200 {
            let _ = publisher.client.publish("load/x", QoS::AtMostOnce, false, format!("{i}")).await;
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    });
    // Keepalive 1 s: the hub must close within 1.5 s of silence, despite the outgoing traffic.
    let start = std::time::Instant::now();
    while raw.recv(Duration::from_secs(10)).await.is_some() {}
    assert!(start.elapsed() < Duration::from_secs(4), "closed after {:?}", start.elapsed());
    load.abort();
}

#[tokio::test(flavor = "multi_thread")]
async fn keepalive_zero_is_accepted_and_a_second_connect_closes_the_connection() {
    let hub = TestHub::start("").await;
    hub.add_user("admin", Role::Admin, "admin-password");
    let mut raw = RawClient::connect(hub.tls, &hub.ca()).await;
    raw.connect_packet("zero", "admin", "admin-password", 0).await;
    let Some(Packet::ConnAck(ack, _)) = raw.recv(Duration::from_secs(10)).await else { panic!("no CONNACK") };
    assert_eq!(ack.code, rumqttd::protocol::ConnectReturnCode::Success);
    raw.send(Packet::PingReq(rumqttd::protocol::PingReq)).await;
    assert!(matches!(raw.recv(Duration::from_secs(10)).await, Some(Packet::PingResp(_))));
    raw.connect_packet("zero", "admin", "admin-password", 0).await;
    assert!(raw.recv(Duration::from_secs(10)).await.is_none(), "second CONNECT did not close the connection");
}

#[tokio::test(flavor = "multi_thread")]
async fn delivered_qos_is_the_lower_of_publish_and_subscription() {
    let hub = TestHub::start("").await;
    hub.add_user("admin", Role::Admin, "admin-password");
    let mut sub = hub.client("sub", "admin", "admin-password").await.unwrap();
    sub.subscribe("q/#", QoS::ExactlyOnce).await;
    let publisher = hub.client("pub", "admin", "admin-password").await.unwrap();
    until_routed(&publisher.client, &mut sub, "q/probe").await;
    for (qos, expected) in
        [(QoS::AtMostOnce, QoS::AtMostOnce), (QoS::AtLeastOnce, QoS::AtLeastOnce), (QoS::ExactlyOnce, QoS::ExactlyOnce)]
    {
        for round in 0..3 {
            let topic = format!("q/{}/{round}", qos as u8);
            publisher.client.publish(topic.clone(), qos, false, "x").await.unwrap();
            let p = loop {
                let p = sub.recv(10).await;
                if p.topic == topic {
                    break p;
                }
            };
            assert_eq!(p.qos, expected, "published at {qos:?}");
        }
    }
    // And the other way: a QoS 0 subscription gets QoS 0 whatever was published.
    let mut low = hub.client("low", "admin", "admin-password").await.unwrap();
    low.subscribe("low/#", QoS::AtMostOnce).await;
    until_routed(&publisher.client, &mut low, "low/probe").await;
    publisher.client.publish("low/x", QoS::ExactlyOnce, false, "y").await.unwrap();
    assert_eq!(low.recv(10).await.qos, QoS::AtMostOnce);
}

#[tokio::test(flavor = "multi_thread")]
async fn max_connections_is_a_refusal_not_a_silent_drop() {
    let hub = TestHub::start("max_connections = 2\n").await;
    hub.add_user("admin", Role::Admin, "admin-password");
    let a = hub.client("a", "admin", "admin-password").await.unwrap();
    let b = hub.client("b", "admin", "admin-password").await.unwrap();
    let err = hub.client("c", "admin", "admin-password").await.err().expect("third client accepted");
    assert!(matches!(err, ConnectionError::ConnectionRefused(ConnectReturnCode::ServiceUnavailable)), "{err:?}");
    drop(a);
    // Its place is free once its session has ended on the hub's side.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let _c = loop {
        match hub.client("c", "admin", "admin-password").await {
            Ok(c) => break c,
            Err(e) => {
                assert!(std::time::Instant::now() < deadline, "the closed connection's place was not freed: {e:?}")
            }
        }
    };
    drop(b);
}

#[tokio::test(flavor = "multi_thread")]
async fn retained_messages_survive_a_restart() {
    let hub = TestHub::start(DEVICES).await;
    hub.add_user("admin", Role::Admin, "admin-password");
    let mut admin = hub.client("a", "admin", "admin-password").await.unwrap();
    admin.subscribe("sync/#", QOS1).await;
    admin.client.publish("dpi/hall-light/state", QoS::AtLeastOnce, true, r#"{"on":true}"#).await.unwrap();
    admin.client.publish("house/note", QoS::AtLeastOnce, true, "keep me").await.unwrap();
    admin.client.publish("house/gone", QoS::AtLeastOnce, true, "soon cleared").await.unwrap();
    admin.client.publish("house/gone", QoS::AtLeastOnce, true, "").await.unwrap();
    // In order on one connection: once the probe is back, the hub has taken the four above.
    let own = admin.client.clone();
    until_routed(&own, &mut admin, "sync/probe").await;
    drop(admin);
    let hub = hub.restart(DEVICES).await;
    let mut sub = hub.client("s", "admin", "admin-password").await.unwrap();
    sub.subscribe("#", QOS1).await;
    let mut seen = std::collections::HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while let Ok(Some(p)) = tokio::time::timeout_at(deadline, sub.rx.recv()).await {
        seen.insert(p.topic.clone(), String::from_utf8_lossy(&p.payload).into_owned());
    }
    assert_eq!(seen.get("dpi/hall-light/state").map(String::as_str), Some(r#"{"on":true}"#));
    assert_eq!(seen.get("house/note").map(String::as_str), Some("keep me"));
    assert!(!seen.contains_key("house/gone"), "{seen:?}");
    // Devices are offline until they connect again, whatever was retained before.
    assert_eq!(seen.get("dpi/hall-light/availability").map(String::as_str), Some("offline"));
    assert_eq!(seen.get("dpi/hub/status").map(String::as_str), Some("online"));
}

#[tokio::test(flavor = "multi_thread")]
async fn mosquitto_clients_work_with_a_device_password_and_with_its_certificate() {
    if !have_tool("mosquitto_pub") || !have_tool("mosquitto_sub") {
        return;
    }
    let (hub, mut watcher) = hub_with_watcher("").await;
    let pw = hub.device_creds("hall-motion", false);
    let cert = hub.device_creds("hall-light", true);
    let port = hub.tls.port().to_string();
    let ca = hub.ca().display().to_string();
    let run = |args: &[&str]| {
        std::process::Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &port, "--cafile", &ca, "-q", "1"])
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&[
        "-i",
        "hall-motion",
        "-u",
        "hall-motion",
        "-P",
        &pw["password"],
        "-t",
        "dpi/hall-motion/state",
        "-m",
        r#"{"motion":true}"#,
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    watcher.expect("dpi/hall-motion/state", br#"{"motion":true}"#).await;
    let out = run(&[
        "-i",
        "hall-light",
        "--cert",
        &cert["cert"],
        "--key",
        &cert["key"],
        "-t",
        "dpi/hall-light/state",
        "-m",
        r#"{"on":true}"#,
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    watcher.expect("dpi/hall-light/state", br#"{"on":true}"#).await;
    // A wrong password: mosquitto_pub reports the refusal and exits non-zero.
    let out = run(&["-i", "hall-motion", "-u", "hall-motion", "-P", "wrong", "-t", "dpi/hall-motion/state", "-m", "1"]);
    assert!(!out.status.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_will_on_a_topic_the_device_may_not_publish_is_refused_at_connect() {
    let (hub, _watcher) = hub_with_watcher("").await;
    let password = hub.device_creds("hall-motion", false)["password"].clone();
    let mut o = MqttOptions::new("hall-motion", "127.0.0.1", hub.tls.port());
    o.set_credentials("hall-motion", password);
    o.set_last_will(rumqttc::LastWill::new("dpi/alarm/set", r#"{"action":"disarm"}"#, QoS::AtLeastOnce, false));
    o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls_config(&hub.ca()))));
    let err = Client::connect_with(o).await.err().expect("a forbidden will was accepted");
    assert!(matches!(err, ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized)), "{err:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_overlong_topic_closes_the_connection() {
    let hub = TestHub::start("").await;
    hub.add_user("admin", Role::Admin, "admin-password");
    let mut raw = RawClient::connect(hub.tls, &hub.ca()).await;
    raw.connect_packet("long", "admin", "admin-password", 30).await;
    assert!(matches!(raw.recv(Duration::from_secs(10)).await, Some(Packet::ConnAck(..))));
    let topic = "a/".repeat(400);
    raw.send(Packet::Publish(rumqttd::protocol::Publish::new(topic, "x".to_owned(), false), None)).await;
    assert!(raw.recv(Duration::from_secs(10)).await.is_none(), "an overlong topic was accepted");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_hub_picks_aes_128_gcm_over_sha_256_whatever_the_client_prefers() {
    let hub = TestHub::start("").await;
    // A rustls client asks for AES-256-GCM with SHA-384 first.
    let raw = RawClient::connect(hub.tls, &hub.ca()).await;
    assert_eq!(raw.cipher_suite(), Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256));
}
