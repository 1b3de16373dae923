//! The `domoticpi-house` binary itself, without a hub: what a newcomer sees when the hub is not
//! running, and when an option is wrong. Loopback only; nothing listens on the port used.

use std::process::Command;

/// A config whose hub would listen on a loopback port that nothing listens on.
fn config_without_hub() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    // Bind then drop: the port was free a moment ago and nothing listens on it now.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = dir.path().join("house.toml");
    let text = format!(
        "data_dir = {:?}\n[broker]\ntls_listen = \"127.0.0.1:{port}\"\n\
         [[device]]\nid = \"hall-motion\"\nkind = \"motion\"\n",
        dir.path().join("data").display().to_string()
    );
    std::fs::write(&config, text).unwrap();
    (dir, config)
}

fn house(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_domoticpi-house")).args(args).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn without_a_running_hub_it_says_so_and_how_to_start_one_and_issues_nothing() {
    let (dir, config) = config_without_hub();
    let (code, err) = house(&["--config", config.to_str().unwrap(), "--duration", "5"]);
    assert_ne!(code, 0);
    assert!(err.contains("is the hub running?") && err.contains("run"), "{err}");
    // It stopped before asking the hub's CLI for credentials: no database was created.
    assert!(!dir.path().join("data").exists());
}

#[test]
fn a_rate_without_devices_is_refused_with_a_clear_message() {
    let (_dir, config) = config_without_hub();
    let (code, err) = house(&["--config", config.to_str().unwrap(), "--rate", "100"]);
    assert_ne!(code, 0);
    assert!(err.contains("--devices"), "{err}");
}
