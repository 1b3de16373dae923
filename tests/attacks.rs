//! Nothing a client sends can stop the hub or reach another identity's data (SPEC §6): the attacks
//! once found against it, done as they were, and each refusal of the hub's own connection layer.

use std::time::Duration;

use domoticpi::store::users::Role;
use rumqttd::protocol::{ConnectReturnCode, Packet, QoS};

use crate::util::*;

const DEVICES: &str = "[[device]]\nid = \"hall-light\"\nkind = \"light\"\n\
[[device]]\nid = \"hall-motion\"\nkind = \"motion\"\nzone = \"interior\"\n\
[[device]]\nid = \"keypad\"\nkind = \"keypad\"\n";

const ADMIN: (&str, &str) = ("admin", "admin-password");
const SECOND: Duration = Duration::from_secs(1);
const TEN_SECONDS: Duration = Duration::from_secs(10);

/// A hub with the test devices, an admin and a resident.
async fn hub() -> TestHub {
    let hub = TestHub::start(DEVICES).await;
    hub.add_user("admin", Role::Admin, "admin-password");
    hub.add_user("bob", Role::Resident, "bob-password");
    hub
}

/// Logs a raw TLS client in and asserts the CONNACK's code.
async fn raw(hub: &TestHub, id: &str, login: (&str, &str), clean: bool) -> (RawClient, bool) {
    let mut c = RawClient::connect(hub.tls, &hub.ca()).await;
    let ack = c.login(id, Some(login), clean, None).await.expect("closed without CONNACK");
    assert_eq!(ack.code, ConnectReturnCode::Success, "{id} as {}", login.0);
    (c, ack.session_present)
}

/// Reads until a SUBACK with `pkid`; returns its codes (publishes before it are dropped).
async fn suback(c: &mut RawClient, pkid: u16) -> Vec<u8> {
    loop {
        match c.recv(TEN_SECONDS).await {
            Some(Packet::SubAck(ack, _)) if ack.pkid == pkid => return suback_codes(&ack.return_codes),
            Some(_) => continue,
            None => panic!("closed before the SUBACK"),
        }
    }
}

/// Reads until a PUBLISH on `topic`; returns its payload, QoS and packet id.
async fn publish_on(c: &mut RawClient, topic: &str) -> (Vec<u8>, u8, u16) {
    loop {
        match c.recv(TEN_SECONDS).await {
            Some(Packet::Publish(p, _)) if p.topic == topic => {
                return (p.payload.to_vec(), c.last_meta.0, c.last_meta.1)
            }
            Some(_) => continue,
            None => panic!("closed before a publish on {topic}"),
        }
    }
}

/// Proves the hub runs and its router routes: a fresh subscriber gets a fresh publish.
pub async fn assert_routes(hub: &TestHub) {
    assert!(!hub.task.as_ref().is_some_and(|t| t.is_finished()), "the hub stopped");
    let n = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let (mut sub, _) = raw(hub, &format!("probe-sub-{n}"), ADMIN, true).await;
    sub.send(raw_subscribe(1, &[("probe/#", QoS::AtMostOnce)])).await;
    assert_eq!(suback(&mut sub, 1).await, [0]);
    let (mut publisher, _) = raw(hub, &format!("probe-pub-{n}"), ADMIN, true).await;
    publisher.send(raw_publish("probe/x", format!("{n}").as_bytes(), 0, 0, false)).await;
    assert_eq!(publish_on(&mut sub, "probe/x").await.0, format!("{n}").as_bytes());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_device_with_a_shared_subscription_and_an_unacknowledged_command_cannot_stop_the_hub() {
    let hub = hub().await;
    let password = hub.device_creds("hall-light", false)["password"].clone();
    let (mut admin, _) = raw(&hub, "commander", ADMIN, true).await;
    // Done twice: the device could repeat it after every restart.
    for round in 0..2 {
        let (mut device, _) = raw(&hub, "hall-light", ("hall-light", &password), false).await;
        device.send(raw_subscribe(1, &[("$share/g/dpi/hall-light/set", QoS::AtLeastOnce)])).await;
        let codes = suback(&mut device, 1).await;
        admin.send(raw_publish("dpi/hall-light/set", br#"{"on":true}"#, 1, 1 + round, false)).await;
        // Whatever arrives is never acknowledged; then the TCP connection drops.
        let _ = device.read(Duration::from_millis(300)).await;
        drop(device);
        assert_routes(&hub).await;
        assert_eq!(codes, [0x80], "a shared subscription was granted");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_accented_topic_is_refused_and_one_restored_from_disk_is_skipped() {
    let hub = hub().await;
    let mut watcher = hub.client("watcher", "admin", "admin-password").await.unwrap();
    watcher.subscribe("dpi/hub/error", QOS1).await;
    // The subscription is in place once the retained status of a second filter arrives.
    watcher.subscribe("dpi/hub/status", QOS1).await;
    watcher.expect("dpi/hub/status", b"online").await;
    let (mut ha, _) = raw(&hub, "home-assistant", ADMIN, true).await;
    ha.send(raw_publish("éclairage/salon", br#"{"on":true}"#, 1, 7, true)).await;
    assert!(ha.closed_within(TEN_SECONDS).await, "the publish was not refused");
    let error = watcher.recv(10).await;
    assert_eq!(error.topic, "dpi/hub/error");
    let body: serde_json::Value = serde_json::from_slice(&error.payload).unwrap();
    assert_eq!((body["topic"].as_str(), body["client"].as_str()), (Some("éclairage/salon"), Some("home-assistant")));
    assert_routes(&hub).await;
    // A filter starting with a multi-byte character is refused; one with it further on is not.
    let (mut ha, _) = raw(&hub, "home-assistant", ADMIN, true).await;
    ha.send(raw_subscribe(2, &[("é/#", QoS::AtMostOnce), ("maison/é", QoS::AtMostOnce)])).await;
    assert_eq!(suback(&mut ha, 2).await, [0x80, 0]);
    drop((ha, watcher));

    // Such a row in the database (written by an older hub) is skipped at start, and so is an
    // unreadable one: the hub starts, and never loops on a restart.
    let db = hub.db();
    db.execute("INSERT INTO retained (topic, payload, updated_at) VALUES ('éclairage/salon', x'7b7d', '')", [])
        .unwrap();
    db.execute("INSERT INTO retained (topic, payload, updated_at) VALUES (x'ff00', x'7b7d', '')", []).unwrap();
    db.execute("INSERT INTO retained (topic, payload, updated_at) VALUES ('maison/salon', 'kept', '')", []).unwrap();
    drop(db);
    let hub = hub.restart(DEVICES).await;
    assert_routes(&hub).await;
    let mut sub = hub.client("after", "admin", "admin-password").await.unwrap();
    sub.subscribe("maison/#", QOS1).await;
    sub.expect("maison/salon", b"kept").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_resident_cannot_take_over_an_admins_persistent_session() {
    let hub = hub().await;
    let (mut admin, present) = raw(&hub, "dashboard", ADMIN, false).await;
    assert!(!present);
    admin.send(raw_subscribe(1, &[("#", QoS::AtLeastOnce)])).await;
    assert_eq!(suback(&mut admin, 1).await, [1]);
    admin
        .send(Packet::Disconnect(
            rumqttd::protocol::Disconnect { reason_code: rumqttd::protocol::DisconnectReasonCode::NormalDisconnection },
            None,
        ))
        .await;
    assert!(admin.closed_within(TEN_SECONDS).await);
    // Something the admin's session queues while it is away.
    let (mut other, _) = raw(&hub, "other", ADMIN, true).await;
    other.send(raw_publish("house/secret", b"for admins", 1, 1, false)).await;
    let _ = other.recv(TEN_SECONDS).await; // PUBACK

    // The resident asks for the admin's client id, with and without clean session.
    for clean in [false, true] {
        let mut bob = RawClient::connect(hub.tls, &hub.ca()).await;
        let ack = bob.login("dashboard", Some(("bob", "bob-password")), clean, None).await;
        assert_eq!(ack.map(|a| a.code), Some(ConnectReturnCode::ClientIdentifierNotValid), "clean = {clean}");
        assert!(bob.closed_within(TEN_SECONDS).await);
    }
    // The admin gets its session back, with what was queued.
    let (mut admin, present) = raw(&hub, "dashboard", ADMIN, false).await;
    assert!(present, "the admin's session was lost");
    assert_eq!(publish_on(&mut admin, "house/secret").await.0, b"for admins");
    assert_routes(&hub).await;
    let _ = SECOND;
}
