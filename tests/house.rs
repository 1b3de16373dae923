//! The house simulator (`domoticpi-house`) against a real hub: its devices get credentials from the
//! real `device creds`, connect over TLS, and the hub's rules and store see them as real devices.
//!
//! Nothing waits for a rule's delay or asserts a timing: the story runs fast and the tests wait (with
//! generous bounds) for what the hub did.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use domoticpi_house::{issue_creds, play, run_load, Endpoint, Error, House, LoadPlan, LoadStats, Login, PlayOptions};
use domoticpi_house::{What, Zone};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::util::*;

/// Issues credentials for `ids` with the real CLI; returns where to connect and each device's login.
async fn logins(hub: &TestHub, ids: &[&str]) -> (Endpoint, Vec<(Login, Zone)>) {
    hub.wait_ready().await;
    let config = PathBuf::from(hub.config_path());
    let house = House::from_path(&config).expect("the test config reads");
    let mut endpoint = None;
    let mut logins = Vec::new();
    for id in ids {
        let device = house.device(id).expect("declared").clone();
        let config = config.clone();
        let id = id.to_string();
        let creds = tokio::task::spawn_blocking(move || issue_creds(Path::new(bin()), &config, &id))
            .await
            .expect("creds task")
            .expect("device creds");
        endpoint.get_or_insert(creds.endpoint());
        logins.push((creds.login(&device), device.zone));
    }
    (endpoint.expect("at least one device"), logins)
}

/// The JSON states the hub recorded in its history for `device`.
fn history(hub: &TestHub, device: &str) -> Vec<Value> {
    let db = hub.db();
    let mut stmt = db
        .prepare("SELECT value FROM history WHERE device = ?1 AND kind = 'state' ORDER BY id")
        .expect("history query");
    let rows = stmt.query_map([device], |r| r.get::<_, String>(0)).expect("history rows");
    rows.map(|r| serde_json::from_str(&r.expect("row")).unwrap_or(Value::Null)).collect()
}

/// The JSON state the hub stored last for `device`.
fn stored_state(hub: &TestHub, device: &str) -> Option<Value> {
    let state: Option<String> =
        hub.db().query_row("SELECT state FROM device_state WHERE id = ?1", [device], |r| r.get(0)).ok().flatten();
    state.and_then(|s| serde_json::from_str(&s).ok())
}

/// Polls `check` until it holds, at most `secs` seconds (the store commits every 100 ms here).
async fn eventually(secs: u64, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !check() {
        assert!(Instant::now() < deadline, "{what} within {secs} s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const HALL: &str = "[store]\ncommit_interval_ms = 100\n\
[[device]]\nid = \"hall-motion\"\nkind = \"motion\"\n\
[[device]]\nid = \"hall-light\"\nkind = \"light\"\n\
[[rule.motion_light]]\nsensors = [\"hall-motion\"]\nlights = [\"hall-light\"]\noff_after_s = 1\nwhen = \"always\"\n";

#[tokio::test(flavor = "multi_thread")]
async fn the_simulated_light_obeys_the_motion_rule_and_the_hub_stores_it() {
    let hub = TestHub::start(HALL).await;
    let (endpoint, devices) = logins(&hub, &["hall-motion", "hall-light"]).await;
    let house = House::from_path(Path::new(&hub.config_path())).expect("reads");
    let opts = PlayOptions {
        speed: 20.0,
        seed: 7,
        duration: Some(Duration::from_secs(60)),
        alarm: house.alarm,
        causes: house.causes.clone(),
        ..PlayOptions::default()
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let game = tokio::spawn({
        let stop = stop.clone();
        async move { play(&endpoint, devices, opts, tx, stop).await }
    });

    let mut seen = Vec::new();
    let obeyed = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(h) = rx.recv().await {
            seen.push(h.text());
            if let What::Obeyed { state, after, .. } = &h.what {
                if h.device == "hall-light" && state.on {
                    return Some(after.clone());
                }
            }
        }
        None
    })
    .await
    .unwrap_or_else(|_| panic!("the light was never switched on; the house saw:\n{}", seen.join("\n")));
    let after = obeyed.unwrap_or_else(|| panic!("the house ended early:\n{}", seen.join("\n")));
    assert_eq!(after.map(|(cause, _)| cause).as_deref(), Some("hall-motion"), "{}", seen.join("\n"));
    assert!(seen.iter().any(|l| l.starts_with("hall-motion     → motion")), "{}", seen.join("\n"));

    stop.cancel();
    game.await.expect("play task").expect("play ends cleanly");
    // The hub stored the light's own report of being on, and the goodbye.
    eventually(10, "a stored {\"on\":true} from hall-light", || {
        history(&hub, "hall-light").iter().any(|v| v["on"] == Value::Bool(true))
    })
    .await;
    let (code, out, _) = run_cli(&["--config", &hub.config_path(), "device", "list"], None);
    assert_eq!(code, 0);
    assert!(out.lines().any(|l| l.starts_with("hall-light\tlight\t")), "{out}");
}

const SENSORS: &str = "[store]\ncommit_interval_ms = 100\n\
[[device]]\nid = \"m1\"\nkind = \"motion\"\n\
[[device]]\nid = \"d1\"\nkind = \"contact\"\n\
[[device]]\nid = \"l1\"\nkind = \"lux\"\n\
[[device]]\nid = \"t1\"\nkind = \"temperature\"\n\
[[device]]\nid = \"m2\"\nkind = \"motion\"\n";

#[tokio::test(flavor = "multi_thread")]
async fn load_mode_gets_every_publish_acknowledged_and_stored() {
    let hub = TestHub::start(SENSORS).await;
    let ids = ["m1", "d1", "l1", "t1", "m2"];
    let (endpoint, devices) = logins(&hub, &ids).await;
    let logins = devices.into_iter().map(|(login, _)| login).collect();
    let stats = Arc::new(LoadStats::default());
    let plan = LoadPlan { rate: 200.0, duration: Some(Duration::from_secs(1)) };
    run_load(&endpoint, logins, plan, Arc::clone(&stats), CancellationToken::new()).await.expect("load runs");

    let (sent, acked, errors) = stats.snapshot();
    assert_eq!((sent, acked, errors), (200, 200, 0), "200 msg/s for 1 s: every publish sent once and acknowledged");
    // 40 states each, evenly spread: each device's last stored state is its 40th.
    for id in ids {
        eventually(10, &format!("{id}'s 40th state stored"), || {
            stored_state(&hub, id).is_some_and(|v| v["seq"].as_u64() == Some(40) && v["t"].as_u64().is_some())
        })
        .await;
    }
    let door = stored_state(&hub, "d1").expect("stored");
    assert_eq!(door["contact"], "closed", "the 40th contact state is closed: {door}");
}

#[test]
fn the_example_house_config_passes_check_config() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/house.toml");
    let (code, out, err) = run_cli(&["--config", path, "check-config"], None);
    assert_eq!(code, 0, "{out}{err}");
    let house = House::from_path(Path::new(path)).expect("the simulator reads it too");
    assert_eq!(house.devices.len(), 13);
    assert_eq!(house.local_hub_addr(), Some("127.0.0.1:8883".parse().expect("addr")));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_house_says_the_hub_is_not_running_when_nothing_listens() {
    let mut hub = TestHub::start(SENSORS).await;
    let (endpoint, devices) = logins(&hub, &["m1"]).await;
    let addr = hub.tls;
    // Stopped, but its data dir (and CA) kept.
    hub.token.cancel();
    hub.task.take().expect("running").await.expect("hub task").expect("hub stops cleanly");

    // What the binary checks first, before issuing any password.
    let probed = domoticpi_house::probe(addr).await.expect_err("nothing listens");
    assert!(matches!(probed, Error::HubNotRunning { .. }), "{probed}");
    assert!(probed.to_string().contains("is the hub running?"), "{probed}");

    // And what a device meets if the hub went away after its credentials were issued.
    let logins = devices.into_iter().map(|(login, _)| login).collect();
    let plan = LoadPlan { rate: 10.0, duration: Some(Duration::from_millis(100)) };
    let stats = Arc::new(LoadStats::default());
    let err = run_load(&endpoint, logins, plan, stats, CancellationToken::new()).await.expect_err("no hub");
    assert!(
        matches!(err, Error::HubNotRunning { ref addr } if addr.ends_with(&format!(":{}", endpoint.port))),
        "{err}"
    );
}
