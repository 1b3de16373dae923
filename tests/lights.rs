//! The light rules end to end (SPEC §7 "Lights", `dpi/scene/set`): simulated lights on their own TLS
//! connections that obey `dpi/ID/set` and report their state, a motion sensor, a wall button and a
//! resident asking for scenes.
//!
//! Delays are a second; assertions on time are only "not (much) before the delay" and generous
//! upper bounds, never speed.

use std::time::{Duration, Instant};

use domoticpi::store::users::Role;
use rumqttc::{Publish, QoS};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::util::*;

const CONFIG: &str = "[[device]]\nid = \"hall-motion\"\nkind = \"motion\"\n\
[[device]]\nid = \"hall-light\"\nkind = \"light\"\n\
[[device]]\nid = \"lamp-a\"\nkind = \"light\"\n\
[[device]]\nid = \"lamp-b\"\nkind = \"light\"\n\
[[device]]\nid = \"wall-button\"\nkind = \"button\"\n\
[[rule.motion_light]]\nsensors = [\"hall-motion\"]\nlights = [\"hall-light\"]\noff_after_s = 1\nwhen = \"always\"\n\
[[rule.switch]]\nswitch = \"wall-button\"\nlights = [\"lamp-a\", \"lamp-b\"]\naction = \"toggle\"\n\
[[scene]]\nid = \"evening\"\nset = { lamp-a = { on = true, brightness = 40 }, lamp-b = { on = false } }\n";

/// A hub with resident alice watching `dpi/#`.
async fn house() -> (TestHub, Client) {
    let hub = TestHub::start(CONFIG).await;
    hub.add_user("alice", Role::Resident, "alice-password");
    let alice = hub.client("alices-phone", "alice", "alice-password").await.unwrap();
    alice.subscribe("dpi/#", QOS1).await;
    (hub, alice)
}

/// Connects a declared device with freshly issued credentials.
async fn device(hub: &TestHub, id: &str) -> Client {
    hub.device(id, &hub.device_creds(id, false)["password"]).await.unwrap()
}

async fn publish(c: &Client, topic: &str, payload: &str) {
    c.client.publish(topic, QoS::AtLeastOnce, false, payload.to_owned()).await.unwrap();
}

fn json(p: &Publish) -> Value {
    serde_json::from_slice(&p.payload).unwrap_or(Value::Null)
}

/// The next publish on `c` matching `want` within `secs`.
async fn until(c: &mut Client, secs: u64, what: &str, want: impl Fn(&Publish) -> bool) -> Publish {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let p = tokio::time::timeout_at(deadline, c.rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no {what} within {secs} s"))
            .expect("client ended");
        if want(&p) {
            return p;
        }
    }
}

/// A simulated light: obeys `dpi/ID/set`, reports `{"on", "brightness"}` on `dpi/ID/state`, and
/// passes every command it got (as JSON) to the returned receiver. It reports "off" first, and
/// returns once `watcher` (subscribed to `dpi/#`) has seen that report, so its subscription is in
/// place (the broker handles one connection's packets in order). Also returns the light's client,
/// for reports a person's hand causes.
async fn light(
    hub: &TestHub,
    id: &str,
    watcher: &mut Client,
) -> (mpsc::UnboundedReceiver<Value>, rumqttc::AsyncClient) {
    let mut light = device(hub, id).await;
    let (set, state) = (format!("dpi/{id}/set"), format!("dpi/{id}/state"));
    light.subscribe(&set, QOS1).await;
    publish(&light, &state, r#"{"on":false}"#).await;
    until(watcher, 10, &format!("{id}'s first state"), |p| p.topic == state).await;
    let (tx, rx) = mpsc::unbounded_channel();
    let hand = light.client.clone();
    tokio::spawn(async move {
        let (mut on, mut brightness) = (false, None::<u64>);
        while let Some(p) = light.rx.recv().await {
            if p.topic != set {
                continue;
            }
            let command = json(&p);
            on = command["on"].as_bool().unwrap_or(on);
            brightness = command["brightness"].as_u64().or(brightness);
            let mut report = serde_json::json!({ "on": on });
            if let Some(b) = brightness {
                report["brightness"] = b.into();
            }
            publish(&light, &state, &report.to_string()).await;
            if tx.send(command).is_err() {
                return;
            }
        }
    });
    (rx, hand)
}

/// The next command a simulated light got, within `secs`.
async fn command(light: &mut mpsc::UnboundedReceiver<Value>, secs: u64) -> Value {
    tokio::time::timeout(Duration::from_secs(secs), light.recv())
        .await
        .expect("no light command in time")
        .expect("light ended")
}

/// Asserts that the light gets no command within `ms` milliseconds.
async fn no_command(light: &mut mpsc::UnboundedReceiver<Value>, ms: u64) {
    if let Ok(got) = tokio::time::timeout(Duration::from_millis(ms), light.recv()).await {
        panic!("unexpected light command {got:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn motion_switches_the_light_on_then_off_after_the_delay() {
    let (hub, mut alice) = house().await;
    let (mut hall, _) = light(&hub, "hall-light", &mut alice).await;
    let motion = device(&hub, "hall-motion").await;

    publish(&motion, "dpi/hall-motion/state", r#"{"motion":true}"#).await;
    assert_eq!(command(&mut hall, 10).await, serde_json::json!({ "on": true }));
    let on_at = Instant::now();
    assert_eq!(command(&mut hall, 15).await, serde_json::json!({ "on": false }));
    // The delay is 1 s from the motion, which came just before the "on".
    assert!(on_at.elapsed() >= Duration::from_millis(700), "off after {:?}", on_at.elapsed());

    // Motion again while on re-arms the timer rather than commanding again.
    publish(&motion, "dpi/hall-motion/state", r#"{"motion":true}"#).await;
    assert_eq!(command(&mut hall, 10).await, serde_json::json!({ "on": true }));
    publish(&motion, "dpi/hall-motion/state", r#"{"motion":false}"#).await;
    publish(&motion, "dpi/hall-motion/state", r#"{"motion":true}"#).await;
    assert_eq!(command(&mut hall, 15).await, serde_json::json!({ "on": false }));
    hub.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_light_switched_on_by_hand_is_not_switched_off_by_motion() {
    let (hub, mut alice) = house().await;
    let (mut hall, hand) = light(&hub, "hall-light", &mut alice).await;
    let motion = device(&hub, "hall-motion").await;
    // No hub command is pending: a report "on" after "off" is a person's doing.
    hand.publish("dpi/hall-light/state", QoS::AtLeastOnce, false, r#"{"on":true}"#).await.unwrap();
    until(&mut alice, 10, "the hand-switched state", |p| p.topic == "dpi/hall-light/state" && json(p)["on"] == true)
        .await;
    publish(&motion, "dpi/hall-motion/state", r#"{"motion":true}"#).await;
    no_command(&mut hall, 2_500).await;
    hub.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_button_toggles_a_group_of_lights() {
    let (hub, mut alice) = house().await;
    let (mut a, _) = light(&hub, "lamp-a", &mut alice).await;
    let (mut b, _) = light(&hub, "lamp-b", &mut alice).await;
    let button = device(&hub, "wall-button").await;

    publish(&button, "dpi/wall-button/state", r#"{"action":"single"}"#).await;
    assert_eq!(command(&mut a, 10).await, serde_json::json!({ "on": true }));
    assert_eq!(command(&mut b, 10).await, serde_json::json!({ "on": true }));
    // Both report "on" (confirming the command) before the second press.
    let mut waiting: std::collections::HashSet<&str> = ["dpi/lamp-a/state", "dpi/lamp-b/state"].into();
    while !waiting.is_empty() {
        let p = until(&mut alice, 10, "both lamps on", |p| waiting.contains(p.topic.as_str()) && json(p)["on"] == true)
            .await;
        waiting.remove(p.topic.as_str());
    }
    publish(&button, "dpi/wall-button/state", r#"{"action":"single"}"#).await;
    assert_eq!(command(&mut a, 10).await, serde_json::json!({ "on": false }));
    assert_eq!(command(&mut b, 10).await, serde_json::json!({ "on": false }));
    hub.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_scene_applies_and_an_unknown_one_is_reported() {
    let (hub, mut alice) = house().await;
    let (mut a, _) = light(&hub, "lamp-a", &mut alice).await;
    let (mut b, _) = light(&hub, "lamp-b", &mut alice).await;

    publish(&alice, "dpi/scene/set", r#"{"scene":"evening"}"#).await;
    assert_eq!(command(&mut a, 10).await, serde_json::json!({ "on": true, "brightness": 40 }));
    assert_eq!(command(&mut b, 10).await, serde_json::json!({ "on": false }));
    until(&mut alice, 10, "lamp-a's new state", |p| {
        p.topic == "dpi/lamp-a/state" && json(p) == serde_json::json!({ "on": true, "brightness": 40 })
    })
    .await;

    publish(&alice, "dpi/scene/set", r#"{"scene":"party"}"#).await;
    let error = until(&mut alice, 10, "an error for the unknown scene", |p| p.topic == "dpi/hub/error").await;
    let error = json(&error);
    assert_eq!(error["topic"], "dpi/scene/set");
    assert!(error["error"].as_str().unwrap_or_default().contains("party"), "{error}");
    publish(&alice, "dpi/scene/set", "evening").await;
    let error = until(&mut alice, 10, "an error for the bad payload", |p| p.topic == "dpi/hub/error").await;
    assert!(json(&error)["error"].as_str().unwrap_or_default().contains("JSON"), "{}", json(&error));
    no_command(&mut a, 300).await;
    hub.stop().await.unwrap();
}
