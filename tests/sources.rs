//! Off-the-shelf devices end to end (SPEC §11): Tasmota, Zigbee2MQTT and ESPHome clients speaking
//! their own firmware's topics, with the payloads each project documents
//! (`tests/fixtures/sources.toml`, each with its source), drive a motion-light rule and a perimeter
//! alarm on the real daemon; each speaker is confined to its devices' topics.

use std::time::Duration;

use domoticpi::store::users::Role;
use rumqttc::{LastWill, MqttOptions, QoS, TlsConfiguration, Transport};
use serde_json::Value;

use crate::util::*;

/// The Tasmota plug's `%topic%`.
const PLUG: &str = "tasmota_5A3F10";

/// A house of off-the-shelf devices: Zigbee sensors and a bulb behind Zigbee2MQTT, a Tasmota plug
/// as a lamp, an ESPHome node with a motion sensor, a light and a siren.
const HOUSE: &str = r#"
[alarm]
exit_delay_s = 0
entry_delay_s = 0
[[device]]
id = "zigbee2mqtt"
kind = "bridge"
[[device]]
id = "hall-pir"
kind = "motion"
source = { zigbee2mqtt = "Hall PIR" }
[[device]]
id = "back-door"
kind = "contact"
zone = "perimeter"
source = { zigbee2mqtt = "Back door" }
[[device]]
id = "bulb"
kind = "light"
source = { zigbee2mqtt = "Living bulb" }
[[device]]
id = "plug"
kind = "light"
source = { tasmota = "tasmota_5A3F10" }
[[device]]
id = "desk"
kind = "bridge"
[[device]]
id = "desk-pir"
kind = "motion"
source = { esphome = "desk/binary_sensor/pir" }
[[device]]
id = "desk-lamp"
kind = "light"
source = { esphome = "desk/light/lamp" }
[[device]]
id = "siren"
kind = "siren"
source = { esphome = "desk/switch/siren" }
[[device]]
id = "desk-window"
kind = "contact"
zone = "perimeter"
source = { esphome = "desk/binary_sensor/window" }
[[device]]
id = "hall-light"
kind = "light"
[[rule.motion_light]]
sensors = ["hall-pir"]
lights = ["plug", "bulb"]
off_after_s = 600
when = "always"
[[rule.motion_light]]
sensors = ["desk-pir"]
lights = ["desk-lamp"]
off_after_s = 600
when = "always"
"#;

/// The payload of a documented message in `tests/fixtures/sources.toml`.
pub fn fixture(name: &str) -> String {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/sources.toml")).unwrap();
    let file: toml::Value = toml::from_str(&text).unwrap();
    let message = file["message"].as_array().unwrap().iter().find(|m| m["name"].as_str() == Some(name));
    message.unwrap_or_else(|| panic!("no fixture {name}"))["payload"].as_str().unwrap().to_owned()
}

/// A firmware's client: logs in as device `id` (client id = username = id) with `will`.
async fn firmware(hub: &TestHub, id: &str, will: Option<(&str, &str)>) -> Client {
    hub.set_device_password(id, &format!("{id}-password"));
    let mut opts = MqttOptions::new(id, hub.tls.ip().to_string(), hub.tls.port());
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_credentials(id, format!("{id}-password"));
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls_config(&hub.ca()))));
    if let Some((topic, payload)) = will {
        opts.set_last_will(LastWill::new(topic, payload.to_owned(), QoS::AtLeastOnce, true));
    }
    Client::connect_with(opts).await.unwrap_or_else(|e| panic!("{id} refused: {e:?}"))
}

/// A hub with the house, an admin (who probes subscriptions) and a resident watching `dpi/#`.
async fn house() -> (TestHub, Client, Client) {
    let hub = TestHub::start(HOUSE).await;
    hub.add_cheap_user("admin", Role::Admin, "admin-password");
    hub.add_cheap_user("alice", Role::Resident, "alice-password");
    let admin = hub.client("admin-tool", "admin", "admin-password").await.unwrap();
    let mut alice = hub.client("alice-phone", "alice", "alice-password").await.unwrap();
    alice.subscribe("dpi/#", QOS1).await;
    until_routed(&admin.client, &mut alice, "dpi/hall-light/set").await;
    (hub, admin, alice)
}

/// Subscribes `c` to `filter` and waits until the admin's probe on `probe` reaches it.
async fn listen(c: &mut Client, admin: &Client, filter: &str, probe: &str) {
    c.subscribe(filter, QOS1).await;
    until_routed(&admin.client, c, probe).await;
}

async fn publish(c: &Client, topic: &str, payload: &str) {
    c.client.publish(topic, QoS::AtLeastOnce, false, payload.to_owned()).await.unwrap();
}

/// Receives until `want`, skipping others, within 10 s.
async fn until(c: &mut Client, what: &str, want: impl Fn(&str, &[u8]) -> bool) -> Vec<u8> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    loop {
        let p = tokio::time::timeout_at(deadline, c.rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no {what} within 10 s; saw {seen:?}"))
            .expect("client ended");
        if want(&p.topic, &p.payload) {
            return p.payload.to_vec();
        }
        seen.push(format!("{} {}", p.topic, String::from_utf8_lossy(&p.payload)));
    }
}

fn json(payload: &[u8]) -> Value {
    serde_json::from_slice(payload).unwrap_or(Value::Null)
}

/// The state the hub publishes for `id`, as JSON, once `want` holds.
async fn state_of(alice: &mut Client, id: &str, want: impl Fn(&Value) -> bool) -> Value {
    let topic = format!("dpi/{id}/state");
    json(&until(alice, &topic, |t, p| t == topic && want(&json(p))).await)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_zigbee_motion_sensor_switches_a_tasmota_plug_and_a_zigbee_bulb() {
    let (hub, admin, mut alice) = house().await;
    let lwt = format!("tele/{PLUG}/LWT");
    let mut plug = firmware(&hub, "plug", Some((&lwt, "Offline"))).await;
    listen(&mut plug, &admin, &format!("cmnd/{PLUG}/#"), &format!("cmnd/{PLUG}/probe")).await;
    // Tasmota's first words: its LWT, then its status; the hub makes them the plug's own.
    plug.client.publish(&lwt, QoS::AtLeastOnce, true, fixture("tasmota_lwt_online")).await.unwrap();
    publish(&plug, &format!("tele/{PLUG}/STATE"), &fixture("tasmota_state_power_off_vcc")).await;
    assert_eq!(state_of(&mut alice, "plug", |_| true).await, serde_json::json!({"on": false}));

    let mut z2m = firmware(&hub, "zigbee2mqtt", Some(("zigbee2mqtt/bridge/state", r#"{"state":"offline"}"#))).await;
    // Zigbee2MQTT subscribes to its whole base topic.
    listen(&mut z2m, &admin, "zigbee2mqtt/#", "zigbee2mqtt/probe").await;
    publish(&z2m, "zigbee2mqtt/bridge/state", r#"{"state":"online"}"#).await;
    publish(&z2m, "zigbee2mqtt/Hall PIR", &fixture("z2m_motion_rtcgq11lm_occupied")).await;

    // The rule switches both lamps on, each in its firmware's words.
    let power = format!("cmnd/{PLUG}/POWER");
    until(&mut plug, "the plug's POWER ON", |t, p| t == power && p == b"ON").await;
    let set = until(&mut z2m, "the bulb's /set", |t, _| t == "zigbee2mqtt/Living bulb/set").await;
    assert_eq!(json(&set), serde_json::json!({"state": "ON"}));
    let pir = state_of(&mut alice, "hall-pir", |_| true).await;
    assert_eq!(pir, serde_json::json!({"motion": true, "battery": 100}));

    // The devices answer as their firmware does, and the hub records what they say.
    publish(&plug, &format!("stat/{PLUG}/POWER"), &fixture("tasmota_power_on")).await;
    state_of(&mut alice, "plug", |s| s["on"] == true).await;
    publish(&z2m, "zigbee2mqtt/Living bulb", &fixture("z2m_bulb_state_docs")).await;
    let bulb = state_of(&mut alice, "bulb", |_| true).await;
    assert_eq!(bulb, serde_json::json!({"on": true, "brightness": 216}));
    let stored = |id: &str| -> Option<String> {
        hub.db().query_row("SELECT state FROM device_state WHERE id = ?1", [id], |r| r.get(0)).ok()
    };
    eventually("the bulb's state stored", 10, || stored("bulb").is_some_and(|s| s.contains("216"))).await;

    // A resident dims the plug: Tasmota gets POWER then Dimmer on its own 0–100 scale.
    publish(&alice, "dpi/plug/set", r#"{"on":true,"brightness":128}"#).await;
    until(&mut plug, "the plug's POWER ON", |t, p| t == power && p == b"ON").await;
    let dimmer = until(&mut plug, "the plug's Dimmer", |t, _| t == format!("cmnd/{PLUG}/Dimmer")).await;
    assert_eq!(dimmer, b"50");

    // The plug drops off: its will, then the hub's own word.
    drop(plug);
    until(&mut alice, "the plug offline", |t, p| t == "dpi/plug/availability" && p == b"offline").await;
    hub.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_zigbee_door_opened_triggers_the_alarm_and_sounds_an_esphome_siren() {
    let (hub, admin, mut alice) = house().await;
    let mut desk = firmware(&hub, "desk", Some(("desk/status", "offline"))).await;
    listen(&mut desk, &admin, "desk/+/+/command", "desk/switch/probe/command").await;
    desk.client.publish("desk/status", QoS::AtLeastOnce, true, fixture("esphome_status_online")).await.unwrap();
    let z2m = firmware(&hub, "zigbee2mqtt", None).await;
    publish(&z2m, "zigbee2mqtt/Back door", &fixture("z2m_contact_mccgq11lm")).await;
    state_of(&mut alice, "back-door", |s| s["contact"] == "closed").await;

    publish(&alice, "dpi/alarm/set", r#"{"action":"arm_away"}"#).await;
    until(&mut alice, "armed_away", |t, p| t == "dpi/alarm/state" && json(p)["state"] == "armed_away").await;
    // The documented message of an Aqara door sensor opening (contact false) and tampered with.
    publish(&z2m, "zigbee2mqtt/Back door", r#"{"contact":false,"tamper":false,"battery":97}"#).await;
    until(&mut alice, "triggered", |t, p| t == "dpi/alarm/state" && json(p)["state"] == "triggered").await;
    let on = fixture("esphome_switch_command_on");
    until(&mut desk, "the siren's ON", |t, p| t == "desk/switch/siren/command" && p == on.as_bytes()).await;
    assert_eq!(hub.alarm_status().await.state, "triggered");
    hub.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn esphome_sensors_switch_an_esphome_light_and_trip_the_alarm_and_the_node_brings_its_devices() {
    let (hub, admin, mut alice) = house().await;
    let mut desk = firmware(&hub, "desk", Some(("desk/status", "offline"))).await;
    // The node comes online, and with it the devices it speaks for.
    until(&mut alice, "desk-lamp online", |t, p| t == "dpi/desk-lamp/availability" && p == b"online").await;
    listen(&mut desk, &admin, "desk/light/lamp/command", "desk/light/lamp/command").await;
    publish(&desk, "desk/binary_sensor/pir/state", &fixture("esphome_binary_sensor_state_on")).await;
    let command = until(&mut desk, "the lamp's command", |t, p| t == "desk/light/lamp/command" && p != b"probe").await;
    assert_eq!(json(&command), json(fixture("esphome_light_command_on").as_bytes()));
    publish(&desk, "desk/light/lamp/state", &fixture("esphome_light_state_pre_2021_8").replace("OFF", "ON")).await;
    state_of(&mut alice, "desk-lamp", |s| s["on"] == true && s["brightness"] == 255).await;
    // Sensors the hub does not know on the node's own prefix are its own business: routed as sent.
    publish(&desk, "desk/sensor/uptime/state", "1234").await;
    // Its window sensor guards the perimeter: closed when armed, then opened.
    publish(&desk, "desk/binary_sensor/window/state", &fixture("esphome_binary_sensor_state_off")).await;
    state_of(&mut alice, "desk-window", |s| s["contact"] == "closed").await;
    publish(&alice, "dpi/alarm/set", r#"{"action":"arm_away"}"#).await;
    until(&mut alice, "armed_away", |t, p| t == "dpi/alarm/state" && json(p)["state"] == "armed_away").await;
    publish(&desk, "desk/binary_sensor/window/state", &fixture("esphome_binary_sensor_state_on")).await;
    until(&mut alice, "triggered", |t, p| t == "dpi/alarm/state" && json(p)["state"] == "triggered").await;
    // The node says it goes offline (as its will would): all its devices do.
    publish(&desk, "desk/status", &fixture("esphome_status_offline")).await;
    until(&mut alice, "desk-pir offline", |t, p| t == "dpi/desk-pir/availability" && p == b"offline").await;
    hub.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn speakers_are_confined_and_payloads_that_do_not_fit_are_refused() {
    let (hub, _admin, mut alice) = house().await;
    alice.subscribe("dpi/hub/error", QOS1).await;
    let plug = firmware(&hub, "plug", None).await;
    let z2m = firmware(&hub, "zigbee2mqtt", None).await;
    let refused = |topic: &'static str| move |t: &str, p: &[u8]| t == "dpi/hub/error" && json(p)["topic"] == topic;
    // Outside its own topics: another Tasmota's, a native device's, the alarm.
    for topic in ["tele/tasmota_OTHER/STATE", "dpi/hall-light/state", "dpi/alarm/set"] {
        publish(&plug, topic, r#"{"POWER":"ON","action":"panic"}"#).await;
    }
    until(&mut alice, "the refusal", refused("tele/tasmota_OTHER/STATE")).await;
    until(&mut alice, "the refusal", refused("dpi/hall-light/state")).await;
    until(&mut alice, "the refusal", refused("dpi/alarm/set")).await;
    // Zigbee2MQTT may not speak for an undeclared Zigbee device, nor as the hub.
    publish(&z2m, "zigbee2mqtt/Kitchen PIR", r#"{"occupancy":true}"#).await;
    until(&mut alice, "the refusal", refused("zigbee2mqtt/Kitchen PIR")).await;
    // A declared device's payload that does not fit: refused with the reason, nothing recorded.
    publish(&z2m, "zigbee2mqtt/Hall PIR", r#"{"occupancy":"yes"}"#).await;
    let error = until(&mut alice, "the refusal", refused("zigbee2mqtt/Hall PIR")).await;
    assert!(json(&error)["error"].as_str().unwrap().contains("occupancy"), "{}", String::from_utf8_lossy(&error));
    assert_eq!(json(&error)["client"], "zigbee2mqtt");
    // A command a Tasmota plug cannot take.
    publish(&alice, "dpi/plug/set", r#"{"on":"maybe"}"#).await;
    until(&mut alice, "the refusal", refused("dpi/plug/set")).await;

    // Subscriptions: its own command topics only.
    let mut raw = RawClient::connect(hub.tls, &hub.ca()).await;
    hub.set_device_password("plug", "plug-password");
    drop(plug);
    let ack = raw.login("plug", Some(("plug", "plug-password")), true, None).await.unwrap();
    assert_eq!(ack.code, rumqttd::protocol::ConnectReturnCode::Success);
    use rumqttd::protocol::QoS::AtLeastOnce;
    let filters = [
        (format!("cmnd/{PLUG}/#"), 1),
        ("cmnd/tasmotas/#".to_owned(), 0x80),
        ("cmnd/+/POWER".to_owned(), 0x80),
        ("dpi/plug/set".to_owned(), 0x80),
        ("#".to_owned(), 0x80),
    ];
    let asked: Vec<(&str, _)> = filters.iter().map(|(f, _)| (f.as_str(), AtLeastOnce)).collect();
    raw.send(raw_subscribe(7, &asked)).await;
    let codes = loop {
        match raw.recv(Duration::from_secs(10)).await {
            Some(rumqttd::protocol::Packet::SubAck(ack, _)) if ack.pkid == 7 => break suback_codes(&ack.return_codes),
            Some(_) => continue,
            None => panic!("closed before the SUBACK"),
        }
    };
    assert_eq!(codes, filters.iter().map(|(_, c)| *c).collect::<Vec<u8>>());
    hub.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn zigbee2mqtt_going_away_takes_its_devices_offline_and_its_availability_counts() {
    let (hub, _admin, mut alice) = house().await;
    let z2m = firmware(&hub, "zigbee2mqtt", None).await;
    until(&mut alice, "hall-pir online", |t, p| t == "dpi/hall-pir/availability" && p == b"online").await;
    // Zigbee2MQTT 2.x says a device is gone in JSON; 1.x in a plain word.
    publish(&z2m, "zigbee2mqtt/Hall PIR/availability", &fixture("z2m_availability_json_offline")).await;
    until(&mut alice, "hall-pir offline", |t, p| t == "dpi/hall-pir/availability" && p == b"offline").await;
    publish(&z2m, "zigbee2mqtt/Hall PIR/availability", &fixture("z2m_availability_legacy")).await;
    until(&mut alice, "hall-pir online", |t, p| t == "dpi/hall-pir/availability" && p == b"online").await;
    drop(z2m);
    until(&mut alice, "back-door offline", |t, p| t == "dpi/back-door/availability" && p == b"offline").await;
    hub.stop().await.unwrap();
}

/// Zigbee2MQTT's messages as a client nobody here wrote sends them: `mosquitto_pub`.
#[tokio::test(flavor = "multi_thread")]
async fn mosquitto_pub_as_zigbee2mqtt_drives_the_rule() {
    if !have_tool("mosquitto_pub") {
        return;
    }
    let (hub, admin, _alice) = house().await;
    let mut plug = firmware(&hub, "plug", None).await;
    listen(&mut plug, &admin, &format!("cmnd/{PLUG}/#"), &format!("cmnd/{PLUG}/probe")).await;
    hub.set_device_password("zigbee2mqtt", "z2m-password");
    let (port, ca) = (hub.tls.port().to_string(), hub.ca().display().to_string());
    let status = std::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port, "--cafile", &ca, "-i", "zigbee2mqtt", "-u", "zigbee2mqtt"])
        .args(["-P", "z2m-password", "-q", "1", "-t", "zigbee2mqtt/Hall PIR"])
        .args(["-m", &fixture("z2m_motion_tamper_osram")])
        .status()
        .unwrap();
    assert!(status.success(), "mosquitto_pub failed");
    let power = format!("cmnd/{PLUG}/POWER");
    until(&mut plug, "the plug's POWER ON", |t, p| t == power && p == b"ON").await;
    hub.stop().await.unwrap();
}

/// A measurement, not a check (run it in release; README, "Benchmarks"): the time from a
/// Zigbee2MQTT-format motion message to the Tasmota plug's `cmnd/…/POWER`, against a native
/// sensor's `dpi/ID/state` to a native light's `dpi/ID/set`, through the same motion-light rule
/// kind on the same hub, interleaved. N rounds each (`DOMOTICPI_SOURCE_ROUNDS`, 1,000).
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a measurement: cargo test --release --test integration sources::measure -- --ignored --nocapture"]
async fn measure_zigbee_motion_to_tasmota_power_against_native() {
    let rounds: usize = std::env::var("DOMOTICPI_SOURCE_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    let native = "[[device]]\nid = \"pir\"\nkind = \"motion\"\n[[device]]\nid = \"lamp\"\nkind = \"light\"\n\
                  [[rule.motion_light]]\nsensors = [\"pir\"]\nlights = [\"lamp\"]\noff_after_s = 600\nwhen = \"always\"\n";
    let hub = TestHub::start(&format!("{HOUSE}{native}")).await;
    hub.add_cheap_user("admin", Role::Admin, "admin-password");
    let admin = hub.client("admin-tool", "admin", "admin-password").await.unwrap();
    let mut plug = firmware(&hub, "plug", None).await;
    listen(&mut plug, &admin, &format!("cmnd/{PLUG}/#"), &format!("cmnd/{PLUG}/probe")).await;
    let mut z2m = firmware(&hub, "zigbee2mqtt", None).await;
    listen(&mut z2m, &admin, "zigbee2mqtt/#", "zigbee2mqtt/probe").await;
    let pir = firmware(&hub, "pir", None).await;
    let mut lamp = firmware(&hub, "lamp", None).await;
    listen(&mut lamp, &admin, "dpi/lamp/set", "dpi/lamp/set").await;
    let (power, motion) = (format!("cmnd/{PLUG}/POWER"), fixture("z2m_motion_rtcgq11lm_occupied"));
    let still = motion.replace("\"occupancy\":true", "\"occupancy\":false");
    let (mut adopted, mut own) = (Vec::with_capacity(rounds), Vec::with_capacity(rounds));
    for _ in 0..rounds {
        // The lamps report off and the sensors still; then motion, timed to the lamp's command.
        publish(&plug, &format!("stat/{PLUG}/POWER"), "OFF").await;
        publish(&z2m, "zigbee2mqtt/Hall PIR", &still).await;
        publish(&lamp, "dpi/lamp/state", r#"{"on":false}"#).await;
        publish(&pir, "dpi/pir/state", r#"{"motion":false}"#).await;
        until_routed(&admin.client, &mut plug, &format!("cmnd/{PLUG}/probe")).await;
        until_routed(&admin.client, &mut lamp, "dpi/lamp/set").await;
        while z2m.rx.try_recv().is_ok() {}
        let t = std::time::Instant::now();
        publish(&z2m, "zigbee2mqtt/Hall PIR", &motion).await;
        until(&mut plug, "POWER ON", |topic, p| topic == power && p == b"ON").await;
        adopted.push(t.elapsed());
        // Each lamp confirms, as its firmware would, before a person switches it off again.
        publish(&plug, &format!("stat/{PLUG}/POWER"), "ON").await;
        let t = std::time::Instant::now();
        publish(&pir, "dpi/pir/state", r#"{"motion":true}"#).await;
        until(&mut lamp, "dpi/lamp/set", |topic, p| topic == "dpi/lamp/set" && p != b"probe").await;
        own.push(t.elapsed());
        publish(&lamp, "dpi/lamp/state", r#"{"on":true}"#).await;
    }
    let pct = |v: &mut Vec<Duration>, q: f64| {
        v.sort();
        v[((v.len() as f64 * q) as usize).min(v.len() - 1)].as_secs_f64() * 1e3
    };
    println!("| path | rounds | p50 ms | p99 ms |\n| --- | --- | --- | --- |");
    for (name, v) in
        [("Zigbee2MQTT motion → Tasmota cmnd/…/POWER", &mut adopted), ("native dpi/ID/state → dpi/ID/set", &mut own)]
    {
        println!("| {name} | {rounds} | {:.3} | {:.3} |", pct(v, 0.5), pct(v, 0.99));
    }
    hub.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_that_moves_a_device_to_other_topics_closes_its_speakers_connection() {
    let (hub, admin, mut alice) = house().await;
    let mut plug = firmware(&hub, "plug", None).await;
    let z2m = firmware(&hub, "zigbee2mqtt", None).await;
    listen(&mut plug, &admin, &format!("cmnd/{PLUG}/#"), &format!("cmnd/{PLUG}/probe")).await;
    // The plug was re-flashed with another topic; Zigbee2MQTT's devices are unchanged.
    hub.rewrite_config(&HOUSE.replace(PLUG, "kitchen_plug"));
    let (code, out, err) = run_cli(&["--config", &hub.config_path(), "reload"], None);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("closed: the connection of device plug"), "{out}");
    let ended = tokio::time::timeout(Duration::from_secs(5), &mut plug.task).await;
    assert!(ended.is_ok(), "the plug kept its old topics' connection");
    assert!(!z2m.task.is_finished(), "Zigbee2MQTT, whose topics did not change, was disconnected");
    // Logged in again, it speaks its new topics; its old ones are refused.
    let plug = firmware(&hub, "plug", None).await;
    publish(&plug, "stat/kitchen_plug/POWER", "ON").await;
    state_of(&mut alice, "plug", |s| s["on"] == true).await;
    alice.subscribe("dpi/hub/error", QOS1).await;
    publish(&plug, &format!("stat/{PLUG}/POWER"), "OFF").await;
    let old = format!("stat/{PLUG}/POWER");
    until(&mut alice, "the refusal", |t, p| t == "dpi/hub/error" && json(p)["topic"] == old.as_str()).await;
    hub.stop().await.unwrap();
}
