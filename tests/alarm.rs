//! The alarm end to end (SPEC §7 "Alarm", §5 `dpi/alarm/*`): residents, keypads and sensors over MQTT
//! with TLS, a siren that receives its commands on its own connection, the CLI through the control
//! socket, and a kill -9 in the middle of the entry delay.
//!
//! Delays are a few seconds; assertions on time are only "not before the delay" and generous upper
//! bounds, never speed.

use std::time::{Duration, Instant};

use domoticpi::store::users::Role;
use rumqttc::{Publish, QoS};
use serde_json::Value;

use crate::util::*;

/// Alice's alarm code.
const PIN: &str = "4821";
/// A code nobody has.
const WRONG: &str = "0000";

const DEVICES: &str = "[[device]]\nid = \"front-door\"\nkind = \"contact\"\nzone = \"entry\"\n\
[[device]]\nid = \"hall-motion\"\nkind = \"motion\"\nzone = \"interior\"\n\
[[device]]\nid = \"keypad\"\nkind = \"keypad\"\n\
[[device]]\nid = \"siren\"\nkind = \"siren\"\n\
[[device]]\nid = \"hall-light\"\nkind = \"light\"\n";

/// The test devices with these delays, in seconds.
fn config(exit: u64, entry: u64, siren: u64) -> String {
    format!("[alarm]\nexit_delay_s = {exit}\nentry_delay_s = {entry}\nsiren_s = {siren}\n{DEVICES}")
}

/// A hub with resident alice (password and alarm code) watching `dpi/#`.
async fn house(config: &str) -> (TestHub, Client) {
    let hub = TestHub::start(config).await;
    hub.add_user("alice", Role::Resident, "alice-password");
    let pin = domoticpi::auth::hash(&domoticpi::secret::Secret::new(PIN));
    domoticpi::store::users::set_pin(&hub.db(), "alice", &pin).unwrap();
    let mut alice = hub.client("alices-phone", "alice", "alice-password").await.unwrap();
    alice.subscribe("dpi/#", QOS1).await;
    expect_state(&mut alice, "disarmed").await;
    (hub, alice)
}

/// Connects a declared device with freshly issued credentials.
async fn device(hub: &TestHub, id: &str) -> Client {
    hub.device(id, &hub.device_creds(id, false)["password"]).await.unwrap()
}

/// The siren, subscribed to its commands (and the SUBACK seen, through a round trip).
async fn siren(hub: &TestHub) -> Client {
    let siren = device(hub, "siren").await;
    siren.subscribe("dpi/siren/set", QOS1).await;
    siren
}

async fn publish(c: &Client, topic: &str, payload: &str) {
    c.client.publish(topic, QoS::AtLeastOnce, false, payload.to_owned()).await.unwrap();
}

fn json(p: &Publish) -> Value {
    serde_json::from_slice(&p.payload).unwrap_or(Value::Null)
}

/// The next publish matching `want` within `secs`; returns it and everything skipped before it.
async fn until(c: &mut Client, secs: u64, what: &str, want: impl Fn(&Publish) -> bool) -> (Publish, Vec<Publish>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    let mut skipped = Vec::new();
    loop {
        let p = tokio::time::timeout_at(deadline, c.rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no {what} within {secs} s; saw {:?}", topics(&skipped)))
            .expect("client ended");
        if want(&p) {
            return (p, skipped);
        }
        skipped.push(p);
    }
}

fn topics(ps: &[Publish]) -> Vec<String> {
    ps.iter().map(|p| format!("{} {}", p.topic, String::from_utf8_lossy(&p.payload))).collect()
}

/// Waits for `dpi/alarm/state` to say `state`; returns the payload and what came before.
async fn expect_state(c: &mut Client, state: &str) -> (Value, Vec<Publish>) {
    let what = format!("alarm state {state}");
    let (p, skipped) = until(c, 15, &what, |p| p.topic == "dpi/alarm/state" && json(p)["state"] == state).await;
    (json(&p), skipped)
}

/// Waits for a `dpi/alarm/event` of `kind`; returns the payload and what came before.
async fn expect_event(c: &mut Client, kind: &str) -> (Value, Vec<Publish>) {
    let what = format!("alarm event {kind}");
    let (p, skipped) = until(c, 15, &what, |p| p.topic == "dpi/alarm/event" && json(p)["event"] == kind).await;
    (json(&p), skipped)
}

/// Waits for an `armed` event saying the alarm already was in that state (a round trip through the
/// driver after everything sent before it); returns what came before.
async fn expect_already(c: &mut Client, state: &str) -> Vec<Publish> {
    let what = format!("armed event \"already {state}\"");
    let want = format!("already {state}");
    let (_, skipped) = until(c, 15, &what, |p| {
        p.topic == "dpi/alarm/event" && json(p)["event"] == "armed" && json(p)["reason"].as_str() == Some(&want)
    })
    .await;
    skipped
}

/// Waits for the siren's `{"on": on}`.
async fn expect_siren(siren: &mut Client, on: bool, secs: u64) {
    let want = serde_json::json!({ "on": on });
    until(siren, secs, &format!("siren {want}"), |p| p.topic == "dpi/siren/set" && json(p) == want).await;
}

/// Asserts that no state change and no trigger happened among `seen`.
fn assert_unchanged(seen: &[Publish]) {
    for p in seen {
        assert_ne!(p.topic, "dpi/alarm/state", "the alarm changed state: {:?}", topics(seen));
        assert!(json(p)["event"] != "triggered" && json(p)["event"] != "pending", "{:?}", topics(seen));
    }
}

async fn arm(alice: &mut Client, action: &str, armed: &str) {
    publish(alice, "dpi/alarm/set", &format!(r#"{{"action":"{action}"}}"#)).await;
    expect_state(alice, armed).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn armed_away_the_door_opens_and_the_right_code_within_the_entry_delay_sounds_no_siren() {
    let (hub, mut alice) = house(&config(1, 5, 2)).await;
    let door = device(&hub, "front-door").await;
    let mut siren = siren(&hub).await;

    publish(&alice, "dpi/alarm/set", r#"{"action":"arm_away"}"#).await;
    let (arming, _) = expect_state(&mut alice, "arming").await;
    assert_eq!(arming["by"], "alice");
    expect_state(&mut alice, "armed_away").await;

    let opened = Instant::now();
    publish(&door, "dpi/front-door/state", "OPEN").await;
    let (pending, _) = expect_state(&mut alice, "pending").await;
    assert_eq!(pending["by"], "front-door");
    publish(&alice, "dpi/alarm/set", &format!(r#"{{"action":"disarm","code":"{PIN}"}}"#)).await;
    let (disarmed, _) = expect_state(&mut alice, "disarmed").await;
    assert_eq!(disarmed["by"], "alice");
    let (event, _) = expect_event(&mut alice, "disarmed").await;
    assert_eq!(event["user"], "alice");
    assert!(event["at"].as_str().is_some_and(|at| at.contains('T')), "{event}");

    // Nothing is left to run out: no delay, so no siren and no trigger later.
    let status = hub.alarm_status().await;
    assert_eq!((status.state.as_str(), status.remaining_ms), ("disarmed", None), "{status:?}");
    assert!(opened.elapsed() < Duration::from_secs(5), "disarmed only after the entry delay");
    while let Ok(p) = siren.rx.try_recv() {
        assert_ne!(json(&p), serde_json::json!({"on": true}), "the siren sounded");
    }
    while let Ok(p) = alice.rx.try_recv() {
        assert!(json(&p)["event"] != "triggered" && json(&p)["state"] != "triggered", "{p:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn nobody_disarms_so_the_siren_sounds_when_the_entry_delay_ends_then_stops() {
    let (hub, mut alice) = house(&config(1, 2, 2)).await;
    let door = device(&hub, "front-door").await;
    let mut siren = siren(&hub).await;
    let mut light = device(&hub, "hall-light").await;
    light.subscribe("dpi/hall-light/set", QOS1).await;
    arm(&mut alice, "arm_away", "armed_away").await;

    let opened = Instant::now();
    publish(&door, "dpi/front-door/state", r#"{"contact":"open"}"#).await;
    expect_siren(&mut siren, true, 20).await;
    let took = opened.elapsed();
    assert!(
        took >= Duration::from_millis(1_900),
        "the siren sounded {took:?} after the door opened, before the entry delay"
    );
    light.expect("dpi/hall-light/set", br#"{"on":true}"#).await;
    let (triggered, _) = expect_state(&mut alice, "triggered").await;
    assert_eq!(triggered["by"], "front-door");
    let (event, _) = expect_event(&mut alice, "triggered").await;
    assert_eq!(event["device"], "front-door");

    // After siren_s: sirens off and back to the armed mode, armed by the same person.
    expect_siren(&mut siren, false, 20).await;
    let (back, _) = expect_state(&mut alice, "armed_away").await;
    assert_eq!(back["by"], "alice");
}

#[tokio::test(flavor = "multi_thread")]
async fn five_wrong_codes_lock_code_entry_and_no_code_is_ever_shown() {
    let (hub, mut alice) = house(&config(1, 2, 2)).await;
    let mut seen = Vec::new();
    for n in 1..=5 {
        publish(&alice, "dpi/alarm/set", &format!(r#"{{"action":"disarm","code":"{WRONG}"}}"#)).await;
        let (event, skipped) = expect_event(&mut alice, "code_rejected").await;
        assert_eq!(event["user"], "alice", "{event}");
        assert!(event["reason"].as_str().unwrap().contains(&format!("{n} in")), "{event}");
        seen.extend(skipped);
    }
    let (event, skipped) = expect_event(&mut alice, "code_lockout").await;
    assert_eq!(event["user"], "alice");
    seen.extend(skipped);
    // Locked: even the right code is refused now.
    publish(&alice, "dpi/alarm/set", &format!(r#"{{"action":"disarm","code":"{PIN}"}}"#)).await;
    let (event, skipped) = expect_event(&mut alice, "code_lockout").await;
    assert!(event["reason"].as_str().unwrap().contains("locked"), "{event}");
    seen.extend(skipped);
    // Subscribers saw the commands, without their codes.
    let commands: Vec<&Publish> = seen.iter().filter(|p| p.topic == "dpi/alarm/set").collect();
    assert!(!commands.is_empty());
    for p in &seen {
        let text = String::from_utf8_lossy(&p.payload);
        assert!(!text.contains(WRONG) && !text.contains(PIN), "a code was published on {}: {text}", p.topic);
    }
    let (code, out, _) = run_cli(&["--config", &hub.config_path(), "alarm", "status"], None);
    assert_eq!(code, 0);
    assert!(out.contains("alarm: disarmed") && out.contains("code_entry: locked"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn motion_while_armed_home_is_ignored() {
    let (hub, mut alice) = house(&config(1, 2, 2)).await;
    let motion = device(&hub, "hall-motion").await;
    arm(&mut alice, "arm_home", "armed_home").await;
    publish(&motion, "dpi/hall-motion/state", r#"{"motion":true}"#).await;
    let (_, before) = until(&mut alice, 15, "the motion", |p| p.topic == "dpi/hall-motion/state").await;
    assert_unchanged(&before);
    // The motion went to the alarm before it was routed; a later command is answered after it.
    publish(&alice, "dpi/alarm/set", r#"{"action":"arm_home"}"#).await;
    assert_unchanged(&expect_already(&mut alice, "armed_home").await);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_keypads_panic_triggers_and_a_siren_that_reconnects_sounds_again() {
    let (hub, mut alice) = house(&config(1, 2, 30)).await;
    let keypad = device(&hub, "keypad").await;
    let mut siren_client = siren(&hub).await;
    publish(&keypad, "dpi/alarm/set", r#"{"action":"panic"}"#).await;
    let (triggered, _) = expect_state(&mut alice, "triggered").await;
    assert_eq!(triggered["by"], "keypad");
    let (event, _) = expect_event(&mut alice, "triggered").await;
    assert_eq!(event["device"], "keypad");
    expect_siren(&mut siren_client, true, 15).await;

    // The siren loses its connection and comes back: it is told to sound again.
    drop(siren_client);
    alice.expect("dpi/siren/availability", b"offline").await;
    let mut siren_client = siren(&hub).await;
    expect_siren(&mut siren_client, true, 15).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_motion_sensors_publish_to_alarm_set_never_reaches_the_alarm() {
    let (hub, mut alice) = house(&config(1, 2, 2)).await;
    let motion = device(&hub, "hall-motion").await;
    for payload in [r#"{"action":"panic"}"#, r#"{"action":"arm_away"}"#] {
        publish(&motion, "dpi/alarm/set", payload).await;
        let (error, seen) = until(&mut alice, 15, "the refusal", |p| p.topic == "dpi/hub/error").await;
        assert_eq!(
            (json(&error)["topic"].as_str(), json(&error)["client"].as_str()),
            (Some("dpi/alarm/set"), Some("hall-motion"))
        );
        assert_unchanged(&seen);
        assert!(seen.iter().all(|p| p.topic != "dpi/alarm/set"), "the refused command was delivered");
    }
    // A command after them is answered; nothing happened in between.
    publish(&alice, "dpi/alarm/set", r#"{"action":"disarm"}"#).await;
    let (event, seen) = expect_event(&mut alice, "code_rejected").await;
    assert_eq!(event["reason"], "code required");
    assert_unchanged(&seen);
    let (code, out, _) = run_cli(&["--config", &hub.config_path(), "alarm", "status"], None);
    assert_eq!(code, 0);
    assert!(out.contains("alarm: disarmed"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_alarm_command_is_reported_and_not_delivered() {
    let (_hub, mut alice) = house(&config(1, 2, 2)).await;
    publish(&alice, "dpi/alarm/set", r#"{"action":"disarm","code":98765}"#).await;
    let (error, seen) = until(&mut alice, 15, "the refusal", |p| p.topic == "dpi/hub/error").await;
    let error = json(&error);
    assert_eq!(error["topic"], "dpi/alarm/set");
    assert!(error["error"].as_str().unwrap().contains("code must be a string"), "{error}");
    assert!(!error.to_string().contains("98765"), "{error}");
    assert!(seen.iter().all(|p| p.topic != "dpi/alarm/set"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_motion_sensor_reconnecting_is_not_a_trip_but_its_next_motion_is() {
    let (hub, mut alice) = house(&config(1, 2, 2)).await;
    let password = hub.device_creds("hall-motion", false)["password"].clone();
    let motion = hub.device("hall-motion", &password).await.unwrap();
    publish(&motion, "dpi/hall-motion/state", r#"{"motion":true}"#).await;
    until(&mut alice, 15, "the motion", |p| p.topic == "dpi/hall-motion/state").await;
    drop(motion);
    alice.expect("dpi/hall-motion/availability", b"offline").await;
    arm(&mut alice, "arm_away", "armed_away").await;

    // Back online, it reports the state it had: not a trip.
    let motion = hub.device("hall-motion", &password).await.unwrap();
    publish(&motion, "dpi/hall-motion/state", r#"{"motion":true}"#).await;
    let (_, seen) = until(&mut alice, 15, "the motion", |p| p.topic == "dpi/hall-motion/state").await;
    assert_unchanged(&seen);
    publish(&alice, "dpi/alarm/set", r#"{"action":"arm_away"}"#).await;
    assert_unchanged(&expect_already(&mut alice, "armed_away").await);
    // A live motion after that is one.
    publish(&motion, "dpi/hall-motion/state", r#"{"motion":true}"#).await;
    let (triggered, _) = expect_state(&mut alice, "triggered").await;
    assert_eq!(triggered["by"], "hall-motion");
}

/// Runs a CLI command against a config file; returns (exit code, stdout, stderr).
fn cli(config: &std::path::Path, args: &[&str], stdin: Option<&str>) -> (i32, String, String) {
    let mut all = vec!["--config", config.to_str().unwrap()];
    all.extend_from_slice(args);
    run_cli(&all, stdin)
}

/// A process hub's data dir with alice (resident, PIN) and the test devices; returns the devices' passwords.
fn prepare_process_hub(config: &std::path::Path) -> std::collections::HashMap<String, String> {
    assert_eq!(cli(config, &["init"], None).0, 0);
    let (code, _, err) =
        cli(config, &["user", "add", "alice", "--role", "resident", "--password-stdin"], Some("alice-password\n"));
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = cli(config, &["user", "pin", "alice", "--password-stdin"], Some(&format!("{PIN}\n")));
    assert_eq!(code, 0, "{err}");
    ["front-door", "siren"]
        .into_iter()
        .map(|id| {
            let (code, out, err) = cli(config, &["device", "creds", id], None);
            assert_eq!(code, 0, "{err}");
            let password = out.lines().find_map(|l| l.strip_prefix("password: ")).unwrap().to_owned();
            (id.to_owned(), password)
        })
        .collect()
}

#[test]
fn kill_9_while_pending_then_restart_triggers_when_the_rest_of_the_entry_delay_ends() {
    let (_dir, config, data) = process_config(&config(0, 4, 30));
    let passwords = prepare_process_hub(&config);
    let ca = data.join("certs/ca.pem");
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();

    let mut hub = HubProcess::start(&config);
    rt.block_on(async {
        let mut alice = Client::connect(hub.tls, &ca, "alices-phone", Some(("alice", "alice-password"))).await.unwrap();
        alice.subscribe("dpi/#", QOS1).await;
        expect_state(&mut alice, "disarmed").await;
        let door =
            Client::connect(hub.tls, &ca, "front-door", Some(("front-door", &passwords["front-door"]))).await.unwrap();
        arm(&mut alice, "arm_away", "armed_away").await;
        publish(&door, "dpi/front-door/state", "OPEN").await;
        expect_state(&mut alice, "pending").await;
        // Part of the 4 s entry delay runs out before the power cut.
        tokio::time::sleep(Duration::from_millis(1_500)).await;
    });
    hub.signal("KILL");
    hub.wait(Duration::from_secs(10));

    let restarted = HubProcess::start(&config);
    let ready = Instant::now();
    rt.block_on(async {
        let mut siren =
            Client::connect(restarted.tls, &ca, "siren", Some(("siren", &passwords["siren"]))).await.unwrap();
        siren.subscribe("dpi/siren/set", QOS1).await;
        let mut alice =
            Client::connect(restarted.tls, &ca, "alices-phone", Some(("alice", "alice-password"))).await.unwrap();
        alice.subscribe("dpi/alarm/#", QOS1).await;
        // The state says where it was (the restored retained message, then the driver's own).
        expect_state(&mut alice, "pending").await;
        // At least 2.5 s of the delay were left: not before, and not never.
        expect_siren(&mut siren, true, 30).await;
        let took = ready.elapsed();
        assert!(took >= Duration::from_secs(1), "triggered {took:?} after the restart, before the rest of the delay");
        let (triggered, _) = expect_state(&mut alice, "triggered").await;
        assert_eq!(triggered["by"], "front-door");
    });
    drop(restarted);
}

#[test]
fn the_cli_reads_arms_and_disarms_a_running_hub() {
    let (_dir, config, data) = process_config(&config(1, 2, 2));
    prepare_process_hub(&config);
    let (code, _, err) = cli(&config, &["alarm", "status"], None);
    assert_eq!(code, 1);
    assert!(err.contains("the hub is not running"), "{err}");

    let mut hub = HubProcess::start(&config);
    let socket = data.join("hub.sock");
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777, 0o600);

    let (code, out, err) = cli(&config, &["alarm", "status"], None);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("alarm: disarmed"), "{out}");

    let (code, out, err) = cli(&config, &["alarm", "arm", "away"], None);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("event: armed") && out.contains("alarm: arming") && out.contains("by: cli"), "{out}");

    let (code, _, err) = cli(&config, &["alarm", "disarm"], None);
    assert_eq!(code, 1);
    assert!(err.contains("code_rejected: code required"), "{err}");
    let (code, out, err) = cli(&config, &["alarm", "disarm", "--code", WRONG], None);
    assert_eq!(code, 1);
    assert!(err.contains("code_rejected") && !err.contains(WRONG) && !out.contains(WRONG), "{out}{err}");
    let (code, out, err) = cli(&config, &["alarm", "disarm", "--code", PIN], None);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("alarm: disarmed") && out.contains("by: alice") && !out.contains(PIN), "{out}");

    let (code, out, _) = cli(&config, &["status"], None);
    assert_eq!(code, 0);
    assert!(out.contains("alarm: disarmed (since"), "{out}");

    hub.signal("TERM");
    let (status, _) = hub.wait(Duration::from_secs(10));
    assert!(status.success());
    assert!(!socket.exists(), "the control socket was left behind");
    let (code, _, err) = cli(&config, &["alarm", "status"], None);
    assert_eq!(code, 1);
    assert!(err.contains("the hub is not running"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn during_an_entry_delay_under_load_checkpoints_share_the_writers_one_commit_per_interval() {
    let extra = "[[device]]\nid = \"kitchen-temp\"\nkind = \"temperature\"\n[store]\ncommit_interval_ms = 500\n";
    let (hub, mut alice) = house(&format!("{}{extra}", config(0, 6, 30))).await;
    let door = device(&hub, "front-door").await;
    let sensor = device(&hub, "kitchen-temp").await;
    arm(&mut alice, "arm_away", "armed_away").await;
    publish(&door, "dpi/front-door/state", r#"{"contact":"open"}"#).await;
    expect_state(&mut alice, "pending").await;

    // Every commit of the hub, as it counts them, and the stored alarm snapshot.
    let data_dir = hub.data_dir.clone();
    let commits = move || {
        let data_dir = data_dir.clone();
        async move {
            let answer = tokio::task::spawn_blocking(move || {
                domoticpi::control::request(&data_dir, &domoticpi::control::Request::Stats)
            });
            answer.await.unwrap().unwrap().stats.unwrap().store_commits
        }
    };
    let snapshot = |hub: &TestHub| domoticpi::store::alarm::load(&hub.db()).unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (before, first_snapshot, start) = (commits().await, snapshot(&hub), Instant::now());
    // 20 distinct retained states a second: device states, history and retained messages to write.
    for i in 0..50u32 {
        let payload = format!("{{\"temperature\":{}.{}}}", 15 + i % 10, i % 10);
        sensor.client.publish("dpi/kitchen-temp/state", QoS::AtLeastOnce, true, payload).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (after, elapsed) = (commits().await, start.elapsed());
    assert!(elapsed < Duration::from_millis(5_500), "the window left the entry delay: {elapsed:?}");
    let bound = elapsed.as_millis() as u64 / 500 + 1;
    assert!(after - before <= bound, "{} commits in {elapsed:?} (bound {bound})", after - before);
    // The time left was checkpointed meanwhile, in those commits.
    assert_ne!(snapshot(&hub), first_snapshot, "no checkpoint during the delay");
    expect_state(&mut alice, "triggered").await;
}
