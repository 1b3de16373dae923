//! The device pipeline: payload checks at ingress, coalesced writes, crash safety, backups.

use std::time::{Duration, Instant};

use domoticpi::store::users::Role;
use rumqttc::QoS;

use crate::util::*;

const DEVICES: &str = "[[device]]\nid = \"front-door\"\nkind = \"contact\"\nzone = \"entry\"\n\
[[device]]\nid = \"kitchen-temp\"\nkind = \"temperature\"\n";

fn stored_state(hub_db: &rusqlite::Connection, id: &str) -> Option<String> {
    hub_db.query_row("SELECT state FROM device_state WHERE id = ?1", [id], |r| r.get(0)).ok().flatten()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invalid_state_is_reported_and_changes_nothing() {
    let hub = TestHub::start(&format!("[store]\ncommit_interval_ms = 100\n{DEVICES}")).await;
    hub.add_user("admin", Role::Admin, "admin-password");
    let mut watcher = hub.client("watcher", "admin", "admin-password").await.unwrap();
    watcher.subscribe("dpi/#", QOS1).await;
    let door = hub.device("front-door", &hub.device_creds("front-door", false)["password"]).await.unwrap();
    door.client.publish("dpi/front-door/state", QoS::AtLeastOnce, true, "OPEN").await.unwrap();
    watcher.expect("dpi/front-door/state", b"OPEN").await;
    for bad in ["{\"contact\":", "{\"contact\":true}", "ON-ISH", "{\"contact\":\"ajar\"}"] {
        door.client.publish("dpi/front-door/state", QoS::AtLeastOnce, true, bad).await.unwrap();
        loop {
            let p = watcher.recv(10).await;
            assert_ne!(p.topic, "dpi/front-door/state", "invalid payload {bad:?} was delivered");
            if p.topic == "dpi/hub/error" {
                let body: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
                assert_eq!(body["topic"], "dpi/front-door/state");
                assert_eq!(body["client"], "front-door");
                assert!(!body["error"].as_str().unwrap().is_empty());
                break;
            }
        }
    }
    // The device and the hub carry on; the stored state is still the valid one.
    door.client
        .publish("dpi/front-door/state", QoS::AtLeastOnce, true, r#"{"contact":"closed","battery":90,"rssi":-60}"#)
        .await
        .unwrap();
    watcher.expect("dpi/front-door/state", br#"{"contact":"closed","battery":90,"rssi":-60}"#).await;
    let stored = || stored_state(&hub.db(), "front-door").is_some_and(|s| s.contains("-60"));
    eventually("the last valid state stored", 10, stored).await;
    let state = stored_state(&hub.db(), "front-door").expect("no stored state");
    let v: serde_json::Value = serde_json::from_str(&state).unwrap();
    assert_eq!((v["contact"].as_str(), v["rssi"].as_i64()), (Some("closed"), Some(-60)), "{state}");
    let (code, out, _) = run_cli(&["--config", &hub.config_path(), "device", "list"], None);
    assert_eq!(code, 0);
    assert!(out.lines().any(|l| l.starts_with("front-door\tcontact\tonline") && l.contains("closed")), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn messages_about_undeclared_devices_are_rejected_and_listed_by_status() {
    let hub = TestHub::start(&format!("[store]\ncommit_interval_ms = 100\n{DEVICES}")).await;
    hub.add_user("admin", Role::Admin, "admin-password");
    let mut watcher = hub.client("watcher", "admin", "admin-password").await.unwrap();
    watcher.subscribe("dpi/#", QOS1).await;
    let admin = hub.client("admin", "admin", "admin-password").await.unwrap();
    for _ in 0..3 {
        admin.client.publish("dpi/garage-door/state", QoS::AtLeastOnce, false, "OPEN").await.unwrap();
    }
    for _ in 0..3 {
        loop {
            let p = watcher.recv(10).await;
            assert_ne!(p.topic, "dpi/garage-door/state");
            if p.topic == "dpi/hub/error" {
                break;
            }
        }
    }
    let counted = || {
        hub.db()
            .query_row("SELECT count FROM rejected_devices WHERE id = 'garage-door'", [], |r| r.get::<_, i64>(0))
            .ok()
            == Some(3)
    };
    eventually("three rejections counted", 10, counted).await;
    let (code, out, _) = run_cli(&["--config", &hub.config_path(), "status"], None);
    assert_eq!(code, 0);
    assert!(out.contains("garage-door: 3 messages"), "{out}");
    // The running hub's own count of its SQLite commits.
    assert!(out.lines().any(|l| l.starts_with("store: ") && l.contains(" write transactions in ")), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_thousand_retained_states_cost_at_most_one_transaction_per_commit_interval() {
    let interval = Duration::from_millis(250);
    let hub = TestHub::start(&format!("[store]\ncommit_interval_ms = 250\n{DEVICES}")).await;
    hub.add_user("admin", Role::Admin, "admin-password");
    let creds = hub.device_creds("kitchen-temp", false);
    let sensor = hub.device("kitchen-temp", &creds["password"]).await.unwrap();
    // The connection's own write (its availability) is done before counting.
    let online = || {
        hub.db()
            .query_row("SELECT online FROM device_state WHERE id = 'kitchen-temp'", [], |r| r.get::<_, Option<bool>>(0))
            .ok()
            .flatten()
            == Some(true)
    };
    eventually("the sensor's availability stored", 10, online).await;
    // Every write transaction of the hub, as the running hub counts them (SQLite's commit hook).
    let data_dir = hub.data_dir.clone();
    let counter = move || {
        let data_dir = data_dir.clone();
        async move {
            let answer = tokio::task::spawn_blocking(move || {
                domoticpi::control::request(&data_dir, &domoticpi::control::Request::Stats)
            });
            answer.await.unwrap().unwrap().stats.unwrap().store_commits
        }
    };
    let before = counter().await;
    let start = Instant::now();
    // Retained, as devices publish states: each one changes a device state, its history and a
    // retained message, all written in the same transaction.
    for i in 0..10_000u32 {
        let payload = format!("{{\"temperature\":{}.{}}}", 15 + i % 10, i % 10);
        sensor.client.publish("dpi/kitchen-temp/state", QoS::AtMostOnce, true, payload).await.unwrap();
    }
    sensor.client.publish("dpi/kitchen-temp/state", QoS::AtLeastOnce, true, r#"{"temperature":42.5}"#).await.unwrap();
    // Wait until the last state is on disk.
    let deadline = Instant::now() + Duration::from_secs(30);
    while stored_state(&hub.db(), "kitchen-temp").as_deref() != Some(r#"{"temperature":42.5}"#) {
        assert!(Instant::now() < deadline, "last state never stored");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let elapsed = start.elapsed();
    let commits = counter().await - before;
    let bound = (elapsed.as_millis() / interval.as_millis()) as u64 + 1;
    assert!(commits <= bound, "{commits} transactions in {elapsed:?} (bound {bound})");
    assert!(commits >= 1);
}

#[test]
fn kill_9_during_a_burst_leaves_a_sound_database_with_every_older_state() {
    let (_dir, config, data) = process_config(&format!("[store]\ncommit_interval_ms = 200\n{DEVICES}"));
    let mut hub = HubProcess::start(&config);
    let creds: std::collections::HashMap<String, String> = {
        let (code, out, err) =
            run_cli(&["--config", config.to_str().unwrap(), "device", "creds", "kitchen-temp"], None);
        assert_eq!(code, 0, "{err}");
        out.lines().filter_map(|l| l.split_once(": ")).map(|(k, v)| (k.to_owned(), v.to_owned())).collect()
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let published = rt.block_on(async {
        let ca = data.join("certs/ca.pem");
        let sensor =
            Client::connect(hub.tls, &ca, "kitchen-temp", Some(("kitchen-temp", &creds["password"]))).await.unwrap();
        let mut published: Vec<(Instant, u32)> = Vec::new();
        let start = Instant::now();
        let mut i = 0u32;
        while start.elapsed() < Duration::from_millis(1500) {
            let payload = format!("{{\"temperature\":{}}}", i % 100);
            sensor.client.publish("dpi/kitchen-temp/state", QoS::AtLeastOnce, false, payload).await.unwrap();
            published.push((Instant::now(), i % 100));
            i += 1;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        published
    });
    hub.child.kill().unwrap();
    let killed_at = Instant::now();
    hub.child.wait().unwrap();
    let conn = rusqlite::Connection::open(data.join("hub.db")).unwrap();
    let check: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    assert_eq!(check, "ok");
    // The burst is far over the sensor's write budget (domoticpi::wear): what the budget let
    // through, more than one interval (plus margin) before the kill, is on disk, in order.
    let old_enough = killed_at - Duration::from_millis(200 + 500);
    assert!(published.iter().any(|(t, _)| *t >= old_enough), "burst too short");
    let budget = domoticpi::wear::BURST as usize;
    let history: Vec<String> = {
        let mut stmt = conn
            .prepare("SELECT value FROM history WHERE device = 'kitchen-temp' AND kind = 'state' ORDER BY id")
            .unwrap();
        stmt.query_map([], |r| r.get(0)).unwrap().map(Result::unwrap).collect()
    };
    let first: Vec<String> = published.iter().take(budget).map(|(_, v)| format!("{{\"temperature\":{v}}}")).collect();
    assert!(published[budget].0 < old_enough, "the budget's worth was published too late to be sure of");
    assert_eq!(history.get(..budget), Some(&first[..]), "the states within budget are not all on disk, in order");
    assert!(history.len() <= budget + 1, "{} rows: the budget did not hold", history.len());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backup_taken_under_load_opens_and_matches() {
    let hub = TestHub::start(&format!("[store]\ncommit_interval_ms = 50\n{DEVICES}")).await;
    let creds = hub.device_creds("kitchen-temp", false);
    let sensor = hub.device("kitchen-temp", &creds["password"]).await.unwrap();
    let load = tokio::spawn(async move {
        for i in 0..2000u32 {
            let _ = sensor
                .client
                .publish("dpi/kitchen-temp/state", QoS::AtMostOnce, false, format!("{{\"temperature\":{}}}", i % 50))
                .await;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        sensor
    });
    // The backup is taken while the load runs, once some of it is on disk.
    let history = || {
        hub.db()
            .query_row("SELECT COUNT(*) FROM history WHERE device = 'kitchen-temp'", [], |r| r.get::<_, i64>(0))
            .unwrap_or(0)
            > 0
    };
    eventually("history written", 10, history).await;
    let backup = hub.dir.path().join("backup.tar");
    let (code, out, err) = run_cli(&["--config", &hub.config_path(), "backup", backup.to_str().unwrap()], None);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("backup written"));
    let _sensor = load.await.unwrap();
    // Its database, put back elsewhere by `restore`.
    let elsewhere = hub.dir.path().join("elsewhere");
    let (code, out, err) =
        run_cli(&["--data-dir", elsewhere.to_str().unwrap(), "restore", backup.to_str().unwrap()], None);
    assert_eq!(code, 0, "{out}{err}");
    let copy = rusqlite::Connection::open(elsewhere.join("hub.db")).unwrap();
    let check: String = copy.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    assert_eq!(check, "ok");
    let users_tables: i64 =
        copy.query_row("SELECT COUNT(*) FROM device_credentials WHERE id = 'kitchen-temp'", [], |r| r.get(0)).unwrap();
    assert_eq!(users_tables, 1);
    let rows: i64 =
        copy.query_row("SELECT COUNT(*) FROM history WHERE device = 'kitchen-temp'", [], |r| r.get(0)).unwrap();
    assert!(rows > 0, "the backup holds no history");
    let version: i64 = copy.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
    assert_eq!(version, domoticpi::store::SCHEMA_VERSION);
    // It holds password hashes: created owner-only, and never over an existing file.
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&backup).unwrap().permissions().mode() & 0o777, 0o600);
    let before = std::fs::read(&backup).unwrap();
    let (code, _, err) = run_cli(&["--config", &hub.config_path(), "backup", backup.to_str().unwrap()], None);
    assert_eq!(code, 1);
    assert!(err.contains("exists already") && !err.contains("panicked"), "{err}");
    assert_eq!(std::fs::read(&backup).unwrap(), before);
}

/// A small tmpfs mounted for the test's lifetime (root only).
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(at: &std::path::Path, size: &str) -> Option<SmallDisk> {
        std::fs::create_dir_all(at).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs", at.to_str().unwrap()])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // Skipped where tmpfs cannot be mounted (not root), unless CI requires it.
            if std::env::var("DOMOTICPI_REQUIRE_TOOLS").is_ok_and(|v| v == "1") {
                panic!("mounting a tmpfs is required here (run as root)");
            }
            eprintln!("SKIPPED: mounting a tmpfs needs root");
        }
        ok.then(|| SmallDisk(at.to_owned()))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_fails_writes_loudly_while_routing_goes_on_and_writes_resume_after() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let Some(_disk) = SmallDisk::mount(&data, "4m") else { return };
    let config = dir.path().join("domoticpi.toml");
    std::fs::write(&config, config_text(&data, &format!("[store]\ncommit_interval_ms = 100\n{DEVICES}"))).unwrap();
    let cfg = config.to_str().unwrap();
    assert_eq!(
        run_cli(
            &["--config", cfg, "user", "add", "admin", "--role", "admin", "--password-stdin"],
            Some("admin-password\n")
        )
        .0,
        0
    );
    let mut hub = HubProcess::start(&config);
    let (code, out, _) = run_cli(&["--config", cfg, "device", "creds", "kitchen-temp"], None);
    assert_eq!(code, 0);
    let password = out.lines().find_map(|l| l.strip_prefix("password: ")).unwrap().to_owned();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let db = data.join("hub.db");
    let stored = || rusqlite::Connection::open(&db).ok().and_then(|c| stored_state(&c, "kitchen-temp"));
    rt.block_on(async {
        let ca = data.join("certs/ca.pem");
        let mut watcher = Client::connect(hub.tls, &ca, "watcher", Some(("admin", "admin-password"))).await.unwrap();
        watcher.subscribe("dpi/kitchen-temp/state", QOS1).await;
        let sensor = Client::connect(hub.tls, &ca, "kitchen-temp", Some(("kitchen-temp", &password))).await.unwrap();
        // Make sure the subscription is in place before measuring anything.
        let mut ready = false;
        for _ in 0..50 {
            sensor
                .client
                .publish("dpi/kitchen-temp/state", QoS::AtLeastOnce, false, r#"{"temperature":-1}"#)
                .await
                .unwrap();
            if let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(200), watcher.rx.recv()).await {
                ready = true;
                break;
            }
        }
        assert!(ready, "the watcher never received anything");
        while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(300), watcher.rx.recv()).await {}
        // Fill the disk.
        let filler = data.join("filler");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&filler).unwrap();
            let block = vec![0u8; 64 * 1024];
            while f.write_all(&block).and_then(|_| f.sync_all()).is_ok() {}
        }
        // Routing goes on while the store cannot write.
        for i in 0..50 {
            let payload = format!("{{\"temperature\":{i}}}");
            sensor.client.publish("dpi/kitchen-temp/state", QoS::AtLeastOnce, false, payload.clone()).await.unwrap();
            watcher.expect("dpi/kitchen-temp/state", payload.as_bytes()).await;
        }
        // A clear log line says the states are not saved.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let line = hub
                .stderr
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("no disk-full log line");
            if line.contains("device states not saved") {
                break;
            }
        }
        // Space returns: the latest state is written.
        std::fs::remove_file(&filler).unwrap();
        sensor
            .client
            .publish("dpi/kitchen-temp/state", QoS::AtLeastOnce, false, r#"{"temperature":99}"#)
            .await
            .unwrap();
        // Within the sensor's write budget's refill (domoticpi::wear::REFILL), which the 50
        // states above may have spent.
        let deadline = Instant::now() + domoticpi::wear::REFILL + Duration::from_secs(10);
        while stored().as_deref() != Some(r#"{"temperature":99}"#) {
            assert!(Instant::now() < deadline, "writes did not resume: {:?}", stored());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    hub.signal("TERM");
    let (status, _) = hub.wait(Duration::from_secs(5));
    assert!(status.success());
}

#[test]
fn a_full_disk_at_start_is_one_clear_line_and_a_failed_start() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk");
    let Some(_disk) = SmallDisk::mount(&disk, "256k") else { return };
    let config = dir.path().join("domoticpi.toml");
    std::fs::write(&config, config_text(&disk.join("data"), DEVICES)).unwrap();
    // Full before the hub ever started: not even the database fits.
    {
        use std::io::Write;
        let mut f = std::fs::File::create(disk.join("filler")).unwrap();
        let block = vec![0u8; 4096];
        while f.write_all(&block).and_then(|_| f.sync_all()).is_ok() {}
    }
    let (code, out, err) = run_cli(&["--config", config.to_str().unwrap(), "run"], None);
    assert_eq!(code, 1, "{out}{err}");
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{err}");
    // Said once, whichever file found it first (a certificate, the database).
    let full = ["the disk is full", "No space left on device"];
    assert!(full.iter().map(|f| errors[0].matches(f).count()).sum::<usize>() == 1, "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
