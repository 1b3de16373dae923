//! Live reload end to end (SPEC §2 `domoticpi reload`, §4): the config file rewritten under a
//! running hub, applied through the real CLI and control socket, with real devices connected over
//! TLS. No connection may drop unless its device is gone.

use std::time::{Duration, Instant};

use domoticpi::store::users::Role;
use rumqttc::{ConnectionError, QoS};
use serde_json::Value;

use crate::util::*;

const DOOR: &str = "[[device]]\nid = \"front-door\"\nkind = \"contact\"\nzone = \"entry\"\n";
const PORCH: &str = "[[device]]\nid = \"porch-motion\"\nkind = \"motion\"\n";

/// `domoticpi reload` against the hub's own config file: (exit code, stdout, stderr).
fn reload(hub: &TestHub) -> (i32, String, String) {
    run_cli(&["--config", &hub.config_path(), "reload"], None)
}

/// A hub with an admin watching `dpi/#`.
async fn hub_with_watcher(extra: &str) -> (TestHub, Client) {
    let hub = TestHub::start(extra).await;
    hub.add_cheap_user("admin", Role::Admin, "admin-password");
    let watcher = hub.client("watcher", "admin", "admin-password").await.unwrap();
    watcher.subscribe("dpi/#", QOS1).await;
    (hub, watcher)
}

/// A declared device connected with a cheap password.
async fn device(hub: &TestHub, id: &str) -> Client {
    hub.set_device_password(id, &format!("{id}-secret"));
    hub.device(id, &format!("{id}-secret")).await.unwrap()
}

async fn publish(c: &Client, topic: &str, payload: &str) {
    c.client.publish(topic, QoS::AtLeastOnce, false, payload.to_owned()).await.unwrap();
}

/// Whether the client's connection is still up (its event loop has not ended).
fn connected(c: &Client) -> bool {
    !c.task.is_finished()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_adds_a_device_that_connects_at_once_and_drops_no_connection() {
    let (hub, mut watcher) = hub_with_watcher(DOOR).await;
    let door = device(&hub, "front-door").await;
    watcher.expect("dpi/front-door/availability", b"online").await;

    hub.rewrite_config(&format!("{DOOR}{PORCH}"));
    let (code, out, err) = reload(&hub);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("applied: devices added: porch-motion"), "{out}");
    watcher.expect("dpi/porch-motion/availability", b"offline").await;

    // As an installer would: credentials from the CLI, which reads the same file.
    let password = hub.device_creds("porch-motion", false)["password"].clone();
    let porch = hub.device("porch-motion", &password).await.unwrap();
    publish(&porch, "dpi/porch-motion/state", r#"{"motion":true}"#).await;
    watcher.expect("dpi/porch-motion/state", br#"{"motion":true}"#).await;
    publish(&door, "dpi/front-door/state", "OPEN").await;
    watcher.expect("dpi/front-door/state", b"OPEN").await;
    assert!(connected(&door) && connected(&watcher), "a connection dropped at the reload");

    // Nothing changed: nothing applied, nothing closed.
    let (code, out, _) = reload(&hub);
    assert_eq!((code, out.trim()), (0, "reloaded: no change"));
    hub.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_closes_a_removed_devices_connection_and_its_password_is_refused() {
    let (hub, mut watcher) = hub_with_watcher(&format!("{DOOR}{PORCH}")).await;
    let door = device(&hub, "front-door").await;
    let mut porch = device(&hub, "porch-motion").await;
    watcher.expect("dpi/porch-motion/availability", b"online").await;

    hub.rewrite_config(DOOR);
    let (code, out, err) = reload(&hub);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("applied: devices removed: porch-motion"), "{out}");
    assert!(out.contains("closed: the connection of device porch-motion"), "{out}");
    let ended = tokio::time::timeout(Duration::from_secs(5), &mut porch.task).await;
    assert!(ended.is_ok(), "the removed device is still connected");
    watcher.expect("dpi/porch-motion/availability", b"offline").await;

    let refused = hub.device("porch-motion", "porch-motion-secret").await.err().expect("a removed device logged in");
    assert!(matches!(refused, ConnectionError::ConnectionRefused(_)), "{refused:?}");
    publish(&door, "dpi/front-door/state", "CLOSED").await;
    watcher.expect("dpi/front-door/state", b"CLOSED").await;
    assert!(connected(&door), "the remaining device was disconnected");
    hub.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_file_changes_nothing_and_reload_exits_1_with_every_error() {
    let (hub, mut watcher) = hub_with_watcher(DOOR).await;
    hub.add_cheap_user("alice", Role::Resident, "alice-password");
    let door = device(&hub, "front-door").await;

    // Two mistakes the CLI finds itself, each at its line and column.
    hub.rewrite_config(&format!(
        "{DOOR}{DOOR}[[rule.motion_light]]\nsensors = [\"ghost\"]\nlights = [\"front-door\"]\noff_after_s = 5\n"
    ));
    let (code, _, err) = reload(&hub);
    assert_eq!(code, 1);
    let path = hub.config_path();
    let lines: Vec<&str> = err.lines().filter(|l| l.contains(&format!("{path}:"))).collect();
    assert!(lines.len() >= 3, "every error with its line and column: {err}");
    assert!(err.contains("duplicate device id") && err.contains("ghost"), "{err}");

    // One only the hub finds (it reads the users): a device id that is a user's name.
    hub.rewrite_config(&format!("{DOOR}[[device]]\nid = \"alice\"\nkind = \"motion\"\n"));
    let (code, _, err) = reload(&hub);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&format!("{path}:11:6:")) && err.contains("is a user's name"), "{err}");
    let (code, _, err) = run_cli(&["--config", &path, "check-config"], None);
    assert_eq!(code, 1, "check-config let the user's name through: {err}");
    assert!(err.contains("is a user's name"), "{err}");

    // The running config is the old one: alice is still a user, the door still a device.
    hub.client("alices-phone", "alice", "alice-password").await.unwrap();
    publish(&door, "dpi/front-door/state", "OPEN").await;
    watcher.expect("dpi/front-door/state", b"OPEN").await;
    assert!(connected(&door));
    hub.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_changed_listener_is_reported_as_needing_a_restart() {
    let (hub, _watcher) = hub_with_watcher(DOOR).await;
    let text = std::fs::read_to_string(hub.config_path()).unwrap();
    let moved = text.replace("tls_listen = \"127.0.0.1:0\"", "tls_listen = \"127.0.0.1:18883\"");
    std::fs::write(hub.config_path(), format!("{moved}[alarm]\nentry_delay_s = 45\n")).unwrap();
    let (code, out, err) = reload(&hub);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("needs a restart: broker.tls_listen"), "{out}");
    assert!(out.contains("applied: [alarm]"), "{out}");
    // The listener it runs on is still the one it was started with.
    hub.client("x", "nobody", "wrong").await.err().expect("anonymous login");
    hub.stop().await.unwrap();
}

const HALL: &str =
    "[[device]]\nid = \"hall-motion\"\nkind = \"motion\"\n[[device]]\nid = \"hall-light\"\nkind = \"light\"\n";

fn motion_rule(off_after_s: u64) -> String {
    format!("{HALL}[[rule.motion_light]]\nsensors = [\"hall-motion\"]\nlights = [\"hall-light\"]\noff_after_s = {off_after_s}\nwhen = \"always\"\n")
}

/// The next command the light receives, as JSON.
async fn command(light: &mut Client) -> Value {
    let p = light.recv(15).await;
    assert_eq!(p.topic, "dpi/hall-light/set");
    serde_json::from_slice(&p.payload).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_motion_rules_new_delay_applies_from_the_next_motion_and_a_running_timer_keeps_its_deadline() {
    let (hub, _watcher) = hub_with_watcher(&motion_rule(1)).await;
    let mut light = device(&hub, "hall-light").await;
    light.subscribe("dpi/hall-light/set", QOS1).await;
    let motion = device(&hub, "hall-motion").await;

    publish(&motion, "dpi/hall-motion/state", r#"{"motion":true}"#).await;
    assert_eq!(command(&mut light).await, serde_json::json!({ "on": true }));
    // The rule's delay becomes 3 s while its 1 s timer runs: the timer keeps its deadline.
    hub.rewrite_config(&motion_rule(3));
    let (code, out, err) = reload(&hub);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("applied: [rule]"), "{out}");
    let since = Instant::now();
    assert_eq!(command(&mut light).await, serde_json::json!({ "on": false }));
    assert!(
        since.elapsed() < Duration::from_millis(2_500),
        "the running timer took the new delay: {:?}",
        since.elapsed()
    );

    // The next motion runs on the new delay.
    publish(&motion, "dpi/hall-motion/state", r#"{"motion":true}"#).await;
    assert_eq!(command(&mut light).await, serde_json::json!({ "on": true }));
    let on_at = Instant::now();
    assert_eq!(command(&mut light).await, serde_json::json!({ "on": false }));
    assert!(on_at.elapsed() >= Duration::from_millis(2_500), "off after {:?}, not the new 3 s", on_at.elapsed());
    hub.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_during_the_entry_delay_keeps_the_alarm_pending_with_the_same_deadline() {
    let alarm = |entry: u64| format!("[alarm]\nexit_delay_s = 0\nentry_delay_s = {entry}\n{DOOR}");
    let (hub, mut watcher) = hub_with_watcher(&alarm(3)).await;
    let door = device(&hub, "front-door").await;
    let state = |p: &rumqttc::Publish| -> Option<String> {
        (p.topic == "dpi/alarm/state")
            .then(|| serde_json::from_slice::<Value>(&p.payload).unwrap()["state"].to_string())
    };
    let (code, _, err) = run_cli(&["--config", &hub.config_path(), "alarm", "arm", "away", "--force"], None);
    assert_eq!(code, 0, "{err}");
    publish(&door, "dpi/front-door/state", "OPEN").await;
    loop {
        if state(&watcher.recv(10).await).as_deref() == Some("\"pending\"") {
            break;
        }
    }
    let opened = Instant::now();
    let before = hub.alarm_status().await;

    hub.rewrite_config(&alarm(60));
    let (code, out, err) = reload(&hub);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("applied: [alarm]"), "{out}");
    let after = hub.alarm_status().await;
    assert_eq!((before.state.as_str(), after.state.as_str()), ("pending", "pending"));
    let (left_before, left_after) = (before.remaining_ms.unwrap(), after.remaining_ms.unwrap());
    assert!(left_after <= left_before && left_before <= 3_000, "{left_before} ms left, then {left_after} ms");
    let (code, out, _) = run_cli(&["--config", &hub.config_path(), "alarm", "status"], None);
    assert_eq!(code, 0);
    assert!(out.contains("alarm: pending") && out.contains("time_left: "), "{out}");
    // The alarm triggers at the old deadline, 3 s after the door opened, not 60 s.
    loop {
        let p = watcher.recv(15).await;
        match state(&p).as_deref() {
            Some("\"triggered\"") => break,
            Some(other) => panic!("the reload moved the alarm to {other}"),
            None => {}
        }
    }
    assert!(opened.elapsed() < Duration::from_secs(10), "triggered after {:?}", opened.elapsed());
    hub.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_devices_stay_connected_through_a_reload() {
    let ids: Vec<String> = (0..50).map(|n| format!("sensor-{n:02}")).collect();
    let declared = |ids: &[String]| -> String {
        ids.iter().map(|id| format!("[[device]]\nid = \"{id}\"\nkind = \"contact\"\n")).collect()
    };
    let (hub, mut watcher) = hub_with_watcher(&declared(&ids)).await;
    let mut devices = Vec::new();
    for id in &ids {
        devices.push(device(&hub, id).await);
    }
    // One more device and a changed zone: the reload has work to do.
    let mut more = ids.clone();
    more.push("sensor-new".to_owned());
    hub.rewrite_config(&format!("{}[alarm]\nentry_delay_s = 20\n", declared(&more)));
    let asked = Instant::now();
    let (code, out, err) = reload(&hub);
    let answered = asked.elapsed();
    assert_eq!(code, 0, "{out}{err}");
    // In force: the new device connects and its state is taken.
    let added = device(&hub, "sensor-new").await;
    publish(&added, "dpi/sensor-new/state", "OPEN").await;
    watcher.expect("dpi/sensor-new/state", b"OPEN").await;
    let in_force = asked.elapsed();
    for (id, d) in ids.iter().zip(&devices) {
        publish(d, &format!("dpi/{id}/state"), "OPEN").await;
        watcher.expect(&format!("dpi/{id}/state"), b"OPEN").await;
    }
    let dropped = devices.iter().filter(|d| !connected(d)).count();
    println!("reload with 50 devices connected: answered in {answered:?} (CLI process included), new device publishing in {in_force:?}, connections dropped: {dropped}");
    assert_eq!(dropped, 0);
    hub.stop().await.unwrap();
}

/// Waits for a line of the hub's log containing `what`; returns the lines up to it.
fn log_until(hub: &HubProcess, what: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    loop {
        let line = hub.stderr.recv_timeout(deadline.saturating_duration_since(Instant::now()));
        let line = line.unwrap_or_else(|_| panic!("no {what:?} in the hub's log: {seen:#?}"));
        let found = line.contains(what);
        seen.push(line);
        if found {
            return seen;
        }
    }
}

#[test]
fn sighup_applies_the_config_file_as_reload_does() {
    let (_dir, path, data) = process_config(DOOR);
    let hub = HubProcess::start(&path);
    std::fs::write(&path, config_text(&data, &format!("{DOOR}{PORCH}"))).unwrap();
    hub.signal("HUP");
    let log = log_until(&hub, "config reloaded");
    assert!(log.iter().any(|l| l.contains("devices added: porch-motion")), "{log:#?}");

    std::fs::write(&path, config_text(&data, "[[device]]\nid = \"Bad Id\"\nkind = \"motion\"\n")).unwrap();
    hub.signal("HUP");
    let log = log_until(&hub, "reload refused");
    assert!(log.last().is_some_and(|l| l.contains(":7:6:")), "the error's line and column: {log:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_shorter_commit_interval_applies_to_the_states_already_waiting() {
    let slow = format!("[store]\ncommit_interval_ms = 3600000\n{DOOR}");
    let (hub, mut watcher) = hub_with_watcher(&slow).await;
    let door = device(&hub, "front-door").await;
    publish(&door, "dpi/front-door/state", "OPEN").await;
    watcher.expect("dpi/front-door/state", b"OPEN").await;
    let stored = || {
        hub.db()
            .query_row("SELECT state FROM device_state WHERE id = 'front-door'", [], |r| r.get::<_, Option<String>>(0))
            .ok()
            .flatten()
            .is_some()
    };
    assert!(!stored(), "written before the hour-long interval ended");
    hub.rewrite_config(&format!("[store]\ncommit_interval_ms = 50\n{DOOR}"));
    let (code, out, err) = reload(&hub);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("applied: [store]"), "{out}");
    eventually("the waiting state written on the new interval", 10, stored).await;
    hub.stop().await.unwrap();
}
