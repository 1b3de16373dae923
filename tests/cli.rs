//! The command line as an installer uses it: exit codes, messages, files.

use crate::util::*;

fn check_config(text: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("domoticpi.toml");
    std::fs::write(&path, text).unwrap();
    let (code, out, err) = run_cli(&["--config", path.to_str().unwrap(), "check-config"], None);
    (code, out, err.replace(path.to_str().unwrap(), "CONFIG"))
}

/// One line per kind of error: config text ⇒ the `CONFIG:line:column:` prefix and a phrase.
macro_rules! check_config_rejects {
    ($($name:ident: $text:expr => $at:expr, $needle:expr;)*) => {$(
        #[test]
        fn $name() {
            let (code, _, err) = check_config($text);
            assert_eq!(code, 1, "{err}");
            let prefix = format!("CONFIG:{}: ", $at);
            assert!(err.lines().any(|l| l.contains(&prefix) && l.contains($needle)), "expected {prefix}…{}…, got:\n{err}", $needle);
        }
    )*};
}

const DEVICES: &str =
    "[[device]]\nid = \"hall-motion\"\nkind = \"motion\"\n[[device]]\nid = \"hall-light\"\nkind = \"light\"\n";

check_config_rejects! {
    check_config_unknown_key: "[broker]\ntls_port = 8883\n" => "2:1", "unknown field `tls_port`";
    check_config_bad_value_type: "[broker]\nmax_connections = \"many\"\n" => "2:19", "invalid type";
    check_config_undeclared_device_in_rule: &format!("{DEVICES}[[rule.motion_light]]\nsensors = [\"ghost\"]\nlights = [\"hall-light\"]\n") => "8:12", "not a declared device";
    check_config_device_of_wrong_kind: &format!("{DEVICES}[[rule.switch]]\nswitch = \"hall-light\"\nlights = [\"hall-light\"]\n") => "8:10", "is a light device";
    check_config_duplicate_id: "[[device]]\nid = \"door\"\nkind = \"contact\"\n[[device]]\nid = \"door\"\nkind = \"contact\"\n" => "5:6", "duplicate device id";
    check_config_bad_time_expression: &format!("{DEVICES}[[rule.schedule]]\nlights = [\"hall-light\"]\non = \"sunset+1h\"\noff = \"23:30\"\n") => "9:6", "sunset+1h";
    check_config_latitude_out_of_range: "[house]\nlatitude = 123.0\nlongitude = 4.84\n" => "2:12", "latitude = 123 is out of range";
    check_config_unknown_timezone: "[house]\ntimezone = \"Europe/Lyon\"\n" => "2:12", "unknown timezone";
    check_config_plain_listener_on_lan: "[broker]\nplain_listen = \"0.0.0.0:1883\"\n" => "2:16", "allow_insecure_lan";
    check_config_toml_syntax: "[broker\n" => "1:8", "";
}

#[test]
fn check_config_reports_every_error_and_accepts_the_shipped_example() {
    let (code, _, err) = check_config("[house]\nlatitude = 100.0\nlongitude = 200.0\ntimezone = \"Nowhere\"\n");
    assert_eq!(code, 1);
    assert_eq!(err.lines().filter(|l| l.starts_with("error: ") || l.starts_with("CONFIG:")).count(), 3, "{err}");
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/domoticpi.toml");
    let (code, out, err) = run_cli(&["--config", example.to_str().unwrap(), "check-config"], None);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ok"), "{out}");
}

#[test]
fn a_missing_config_file_is_one_clear_line() {
    let (code, _, err) = run_cli(&["--config", "/nonexistent/domoticpi.toml", "check-config"], None);
    assert_eq!(code, 1);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("cannot read config file /nonexistent/domoticpi.toml"), "{err}");
}

#[test]
fn no_config_means_built_in_defaults() {
    let (code, out, _) = run_cli(&["check-config"], None);
    assert_eq!(code, 0);
    assert!(out.contains("built-in defaults: ok"), "{out}");
}

#[test]
fn help_explains_the_commands() {
    let (code, out, _) = run_cli(&["--help"], None);
    assert_eq!(code, 0);
    for word in ["run", "init", "check-config", "certs", "user", "status", "--config", "--data-dir"] {
        assert!(out.contains(word), "--help lacks {word}:\n{out}");
    }
    let (code, _, err) = run_cli(&["frobnicate"], None);
    assert_eq!(code, 2);
    assert!(err.contains("unrecognized subcommand"), "{err}");
}

#[test]
fn users_are_added_listed_given_a_pin_and_removed() {
    let (_dir, config, data) = process_config("[[device]]\nid = \"front-door\"\nkind = \"contact\"\n");
    let cfg = config.to_str().unwrap();
    let (code, out, err) = run_cli(
        &["--config", cfg, "user", "add", "alice", "--role", "admin", "--password-stdin"],
        Some("a-long-password\n"),
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("user alice added (admin)"));
    // The password is stored hashed, never in clear.
    let db = std::fs::read(data.join("hub.db")).unwrap();
    assert!(!db.windows(15).any(|w| w == b"a-long-password"));
    let (code, _, err) = run_cli(
        &["--config", cfg, "user", "add", "alice", "--role", "resident", "--password-stdin"],
        Some("another-password\n"),
    );
    assert_eq!(code, 1);
    assert!(err.contains("already exists"), "{err}");
    let (code, _, err) = run_cli(
        &["--config", cfg, "user", "add", "front-door", "--role", "resident", "--password-stdin"],
        Some("another-password\n"),
    );
    assert_eq!(code, 1);
    assert!(err.contains("device id"), "{err}");
    let (code, _, err) =
        run_cli(&["--config", cfg, "user", "add", "bob", "--role", "resident", "--password-stdin"], Some("short\n"));
    assert_eq!(code, 1);
    assert!(err.contains("at least 8"), "{err}");
    let (code, _, err) = run_cli(&["--config", cfg, "user", "pin", "alice", "--password-stdin"], Some("12ab\n"));
    assert_eq!(code, 1);
    assert!(err.contains("4 to 8 digits"), "{err}");
    let (code, _, err) = run_cli(&["--config", cfg, "user", "pin", "alice", "--password-stdin"], Some("4821\n"));
    assert_eq!(code, 0, "{err}");
    let (_, out, _) = run_cli(&["--config", cfg, "user", "list"], None);
    assert!(out.starts_with("alice\tadmin\tpin"), "{out}");
    let (code, _, _) = run_cli(&["--config", cfg, "user", "remove", "alice"], None);
    assert_eq!(code, 0);
    let (code, _, err) = run_cli(&["--config", cfg, "user", "remove", "alice"], None);
    assert_eq!(code, 1);
    assert!(err.contains("no user named \"alice\""), "{err}");
    // Without --password-stdin and no terminal: a clear refusal, not a hang.
    let (code, _, err) = run_cli(&["--config", cfg, "user", "add", "carol", "--role", "resident"], Some(""));
    assert_eq!(code, 1);
    assert!(err.contains("--password-stdin"), "{err}");
}

#[test]
fn init_is_idempotent_and_certs_show_prints_fingerprints() {
    let (_dir, config, data) = process_config("server_names = [\"domoticpi.local\"]\n");
    let cfg = config.to_str().unwrap();
    assert_eq!(run_cli(&["--config", cfg, "init"], None).0, 0);
    let ca = std::fs::read(data.join("certs/ca.pem")).unwrap();
    assert_eq!(run_cli(&["--config", cfg, "init"], None).0, 0);
    assert_eq!(std::fs::read(data.join("certs/ca.pem")).unwrap(), ca);
    let (code, out, _) = run_cli(&["--config", cfg, "certs", "show"], None);
    assert_eq!(code, 0);
    let field = |k: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}: ")))
            .unwrap_or_else(|| panic!("no {k} in\n{out}"))
            .to_owned()
    };
    assert!(field("server_names").contains("domoticpi.local"));
    assert!(field("server_names").contains("127.0.0.1"));
    assert_eq!(field("server_sha1").len(), 59);
    assert_eq!(field("server_sha256").len(), 95);
    assert!(field("ca").ends_with("certs/ca.pem"));
}

#[test]
fn data_dir_option_overrides_the_config() {
    let (dir, config, _) = process_config("");
    let other = dir.path().join("elsewhere");
    let (code, _, err) =
        run_cli(&["--config", config.to_str().unwrap(), "--data-dir", other.to_str().unwrap(), "init"], None);
    assert_eq!(code, 0, "{err}");
    assert!(other.join("certs/ca.pem").exists());
}

/// The test config with one motion sensor, and `device creds --format FORMAT` of it.
fn creds_in_format(format: &str) -> String {
    creds_of("hall-motion", format).1
}

/// Devices of the test config for `device creds`: a native motion sensor, an ESPHome node with a
/// component, a Tasmota plug, Zigbee2MQTT.
const CREDS_HOUSE: &str = "[[device]]\nid = \"hall-motion\"\nkind = \"motion\"\n\
    [[device]]\nid = \"desk\"\nkind = \"bridge\"\n\
    [[device]]\nid = \"desk-pir\"\nkind = \"motion\"\nsource = { esphome = \"desk/binary_sensor/pir\" }\n\
    [[device]]\nid = \"plug\"\nkind = \"light\"\nsource = { tasmota = \"plug_1\" }\n\
    [[device]]\nid = \"zigbee2mqtt\"\nkind = \"bridge\"\n";

/// `device creds ID --format FORMAT` on the test config: exit code, stdout, stderr.
fn creds_of(id: &str, format: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("domoticpi.toml");
    let data = dir.path().join("data").display().to_string();
    let text = format!(
        "data_dir = {data:?}\n[web]\nlisten = \"\"\n[broker]\ntls_listen = \"127.0.0.1:18883\"\n\
         server_names = [\"192.168.1.10\"]\n{CREDS_HOUSE}"
    );
    std::fs::write(&config, text).unwrap();
    let (code, out, err) =
        run_cli(&["--config", config.to_str().unwrap(), "device", "creds", id, "--format", format], None);
    if id == "hall-motion" {
        assert_eq!(code, 0, "{err}");
    }
    (code, out, err)
}

/// Runs `esphome config` on a node named `name` with `block`; its output, when ESPHome is installed.
fn esphome_config(name: &str, block: &str) -> Option<String> {
    if !have_tool("esphome") {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let node = dir.path().join(format!("{name}.yaml"));
    let head = format!("esphome:\n  name: {name}\nesp32:\n  board: esp32dev\n  framework:\n    type: esp-idf\nwifi:\n  ssid: \"house\"\n  password: \"wifi-password\"\n");
    std::fs::write(&node, format!("{head}{block}")).unwrap();
    let out = std::process::Command::new("esphome").arg("config").arg(&node).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && text.contains("Configuration is valid"), "{text}");
    Some(text)
}

#[test]
fn an_esphome_nodes_block_is_valid_and_keeps_to_the_nodes_topics() {
    let (code, block, err) = creds_of("desk", "esphome");
    assert_eq!(code, 0, "{err}");
    assert!(block.contains("topic_prefix: desk") && !block.contains("dpi/"), "{block}");
    // With a binary sensor as the hub's config declares it.
    let pir = "binary_sensor:\n  - platform: gpio\n    pin: GPIO4\n    name: pir\n    device_class: motion\n";
    let Some(text) = esphome_config("desk", &format!("{block}{pir}")) else { return };
    // Every topic ESPHome will use is under the node's own prefix, which the hub lets it use.
    for topic in text.lines().filter_map(|l| l.trim().strip_prefix("topic: ")) {
        assert!(topic.starts_with("desk/"), "{topic} in:\n{text}");
    }
    assert!(text.contains("desk/binary_sensor/pir/state") || !text.contains("state_topic"), "{text}");
}

#[test]
fn devices_that_take_no_snippet_say_where_their_credentials_go() {
    for (id, format, says) in [
        ("plug", "esphome", "Tasmota"),
        ("zigbee2mqtt", "arduino", "configuration.yaml"),
        ("desk-pir", "esphome", "device creds desk"),
        ("desk", "arduino", "--format esphome"),
    ] {
        let (code, out, err) = creds_of(id, format);
        assert_eq!(code, 1, "{id} --format {format}: {out}");
        assert!(err.contains(says), "{id}: {err}");
    }
    // As lines, each still gets its credentials.
    let (code, out, err) = creds_of("plug", "lines");
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("username: plug"), "{out}");
    assert!(out.contains("publish: tele/plug_1/#, stat/plug_1/#\nsubscribe: cmnd/plug_1/#"), "{out}");
}

#[test]
fn the_esphome_block_is_valid_for_esphome_itself() {
    let block = creds_in_format("esphome");
    assert!(block.contains("broker: 192.168.1.10") && block.contains("certificate_authority: |"), "{block}");
    // Validated by ESPHome (from PyPI), when installed.
    let Some(text) = esphome_config("hall-motion", &block) else { return };
    // ESPHome's defaults would publish elsewhere than the device may: every message goes to its availability.
    for topic in text.lines().filter_map(|l| l.trim().strip_prefix("topic: ")) {
        assert_eq!(topic, "dpi/hall-motion/availability", "{text}");
    }
}

#[test]
fn the_arduino_header_compiles_as_cpp() {
    let header = creds_in_format("arduino");
    assert!(header.contains("#define DPI_HOST \"192.168.1.10\"") && header.contains("DPI_FINGERPRINT"), "{header}");
    if !have_tool("g++") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("dpi_creds.h"), &header).unwrap();
    let sketch = "#define PROGMEM\n#include \"dpi_creds.h\"\n#include <cstring>\nint main() { return std::strlen(DPI_CA_CERT) > 100 && DPI_PORT == 18883 ? 0 : 1; }\n";
    std::fs::write(dir.path().join("sketch.cpp"), sketch).unwrap();
    let out = std::process::Command::new("g++")
        .args(["-std=c++11", "-Wall", "-Werror", "-o"])
        .arg(dir.path().join("sketch"))
        .arg(dir.path().join("sketch.cpp"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        std::process::Command::new(dir.path().join("sketch")).status().unwrap().success(),
        "the CA is not in the header"
    );
}
