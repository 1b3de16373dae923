//! Backup and restore (SPEC §2): a hub backed up while it runs, its SD card lost, restored on
//! another machine: devices and users log in with their old credentials, the alarm is as it was.

use domoticpi::store::users::Role;
use rumqttc::QoS;

use crate::util::*;

const HOUSE: &str =
    "[alarm]\nexit_delay_s = 0\n[[device]]\nid = \"front-door\"\nkind = \"contact\"\nzone = \"entry\"\n";

fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hub_restored_on_a_fresh_machine_keeps_its_devices_users_and_alarm() {
    let hub = TestHub::start(HOUSE).await;
    let creds = hub.device_creds("front-door", false);
    hub.add_user("alice", Role::Resident, "alice-password");
    let door = hub.device("front-door", &creds["password"]).await.unwrap();
    door.client.publish("dpi/front-door/state", QoS::AtLeastOnce, true, "CLOSED").await.unwrap();
    let mut alice = hub.client("alice-phone", "alice", "alice-password").await.unwrap();
    alice.subscribe("dpi/alarm/state", QOS1).await;
    alice.client.publish("dpi/alarm/set", QoS::AtLeastOnce, false, r#"{"action":"arm_away"}"#).await.unwrap();
    loop {
        let p = alice.recv(10).await;
        if String::from_utf8_lossy(&p.payload).contains("armed_away") {
            break;
        }
    }
    let ca = std::fs::read(hub.ca()).unwrap();

    // Backed up while it runs, to a USB stick, say.
    let stick = tempfile::tempdir().unwrap();
    let archive = stick.path().join("house.backup");
    let (code, out, err) = run_cli(&["--config", &hub.config_path(), "backup", archive.to_str().unwrap()], None);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(mode(&archive), 0o600, "the archive holds the CA key");
    let config_before = std::fs::read_to_string(hub.config_path()).unwrap();
    drop((door, alice));
    hub.stop().await.unwrap();

    // Another machine: an empty place, the archive copied over.
    let fresh = tempfile::tempdir().unwrap();
    let data_dir = fresh.path().join("data");
    let (code, out, err) =
        run_cli(&["--data-dir", data_dir.to_str().unwrap(), "restore", archive.to_str().unwrap()], None);
    assert_eq!(code, 0, "{out}{err}");
    let restored_config = data_dir.join(domoticpi::backup::RESTORED_CONFIG);
    assert!(out.contains(&restored_config.display().to_string()), "{out}");
    assert_eq!(std::fs::read_to_string(&restored_config).unwrap(), config_before);
    assert_eq!(
        (mode(&data_dir), mode(&data_dir.join("certs/ca.key")), mode(&data_dir.join("hub.db"))),
        (0o700, 0o600, 0o600)
    );

    let hub = TestHub::start_in(fresh, data_dir, HOUSE).await;
    assert_eq!(
        std::fs::read(hub.ca()).unwrap(),
        ca,
        "the restored hub has another CA: every device would need re-flashing"
    );
    let _door = hub.device("front-door", &creds["password"]).await.expect("the device's old password");
    let _alice = hub.client("alice-phone", "alice", "alice-password").await.expect("the user's old password");
    assert_eq!(hub.alarm_status().await.state, "armed_away");
    hub.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn restore_refuses_a_running_hub_a_full_data_dir_and_what_is_not_a_backup() {
    let hub = TestHub::start(HOUSE).await;
    let archive = hub.dir.path().join("house.backup");
    let config = hub.config_path();
    let (code, _, err) = run_cli(&["--config", &config, "backup", archive.to_str().unwrap()], None);
    assert_eq!(code, 0, "{err}");
    // Never over an existing file.
    let (code, _, err) = run_cli(&["--config", &config, "backup", archive.to_str().unwrap()], None);
    assert!(code == 1 && err.contains("exists already"), "{err}");

    let (code, _, err) = run_cli(&["--config", &config, "restore", archive.to_str().unwrap()], None);
    assert!(code == 1 && err.contains("is running"), "{err}");
    let db = std::fs::read(hub.data_dir.join("hub.db")).unwrap();
    hub.token.cancel();
    let (dir, data_dir) = (tempfile::tempdir().unwrap(), hub.data_dir.clone());
    let mut hub = hub;
    hub.task.take().unwrap().await.unwrap().unwrap();
    let (code, _, err) = run_cli(&["--config", &config, "restore", archive.to_str().unwrap()], None);
    assert!(code == 1 && err.contains("not empty") && err.contains("--force"), "{err}");
    let (code, out, err) = run_cli(&["--config", &config, "restore", "--force", archive.to_str().unwrap()], None);
    assert_eq!(code, 0, "{out}{err}");
    // A damaged database is found before anything of the data dir is replaced, even forced.
    let damaged = dir.path().join("damaged.tar");
    let mut tar = tar::Builder::new(std::fs::File::create(&damaged).unwrap());
    for (name, body) in [("MANIFEST", &b"domoticpi backup 1\n"[..]), ("hub.db", &b"SQLite format 3\0 but no more"[..])]
    {
        let mut header = tar::Header::new_gnu();
        header.set_size(body.len() as u64);
        header.set_mode(0o600);
        header.set_cksum();
        tar.append_data(&mut header, name, body).unwrap();
    }
    tar.finish().unwrap();
    let kept = std::fs::read(data_dir.join("hub.db")).unwrap();
    let (code, _, err) = run_cli(&["--config", &config, "restore", "--force", damaged.to_str().unwrap()], None);
    assert!(code == 1 && err.contains("damaged"), "{err}");
    assert_eq!(std::fs::read(data_dir.join("hub.db")).unwrap(), kept, "a damaged backup replaced the database");
    assert!(data_dir.join("certs/ca.key").exists(), "a damaged backup removed the certificates");
    assert!(!data_dir.join("hub.db.restoring").exists());

    // Not a backup: any file, and an archive naming a path outside the data dir.
    let other = dir.path().join("other");
    std::fs::write(dir.path().join("notes.txt"), "hello").unwrap();
    let (code, _, err) = run_cli(
        &["--data-dir", other.to_str().unwrap(), "restore", dir.path().join("notes.txt").to_str().unwrap()],
        None,
    );
    assert!(code == 1 && err.contains("not a DomoticPi backup"), "{err}");
    let evil = dir.path().join("evil.tar");
    let mut tar = tar::Builder::new(std::fs::File::create(&evil).unwrap());
    for (name, body) in [("MANIFEST", &b"domoticpi backup 1\n"[..]), ("hub.db", &db[..]), ("certs/../../escaped", b"x")]
    {
        let mut header = tar::Header::new_gnu();
        header.set_size(body.len() as u64);
        header.set_mode(0o644);
        // `set_path` refuses `..`; written as raw bytes, as a hostile archive would be.
        let bytes = name.as_bytes();
        header.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
        header.set_cksum();
        tar.append(&header, body).unwrap();
    }
    tar.finish().unwrap();
    let (code, _, err) = run_cli(&["--data-dir", other.to_str().unwrap(), "restore", evil.to_str().unwrap()], None);
    assert!(code == 1 && err.contains("not a DomoticPi backup"), "{err}");
    assert!(
        !dir.path().join("escaped").exists() && !other.join("hub.db").exists(),
        "a refused archive wrote something"
    );
}
