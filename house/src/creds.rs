//! A device's MQTT credentials, as `domoticpi device creds ID` prints them: one `key: value` per line
//! (`host`, `port`, `ca`, `client_id`, `username`, `password`, then informational lines).
//!
//! [`issue_creds`] runs the hub's CLI, which issues a fresh password each time and revokes the previous
//! one: fine for a simulated house, wrong for a real device that already has its password.
//! [`read_creds_file`] reads saved output instead. Nothing here logs or prints a password.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::config::Device;
use crate::mqtt::{Endpoint, Login};
use crate::Error;

/// What a device needs to connect, parsed from `device creds` output.
#[derive(Clone, PartialEq, Eq)]
pub struct Creds {
    /// The address to reach the hub at (an IP first: devices need no DNS).
    pub host: String,
    /// The TLS port.
    pub port: u16,
    /// The hub's CA certificate, to verify the server.
    pub ca: PathBuf,
    /// The MQTT client id (the device id).
    pub client_id: String,
    /// The MQTT username (the device id).
    pub username: String,
    /// The device's password; never printed by `Debug`.
    pub password: String,
}

impl fmt::Debug for Creds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Creds")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("ca", &self.ca)
            .field("client_id", &self.client_id)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl Creds {
    /// Where these credentials say the hub is.
    pub fn endpoint(&self) -> Endpoint {
        Endpoint { host: self.host.clone(), port: self.port, ca: self.ca.clone() }
    }

    /// The login of `device` with these credentials.
    pub fn login(&self, device: &Device) -> Login {
        Login {
            client_id: self.client_id.clone(),
            username: self.username.clone(),
            password: self.password.clone(),
            device: device.id.clone(),
            kind: device.kind,
        }
    }
}

/// Parses `device creds` output; lines that are not `key: value` or name other keys are ignored.
pub fn parse_creds(text: &str) -> Result<Creds, Error> {
    let value = |field: &'static str| -> Result<String, Error> {
        text.lines()
            .filter_map(|line| line.split_once(':'))
            .find(|(key, _)| key.trim() == field)
            .map(|(_, v)| v.trim().to_owned())
            .filter(|v| !v.is_empty())
            .ok_or(Error::CredsMissing { field })
    };
    let port_text = value("port")?;
    let port = port_text.parse().map_err(|_| Error::CredsInvalid { field: "port", value: port_text })?;
    Ok(Creds {
        host: value("host")?,
        port,
        ca: PathBuf::from(value("ca")?),
        client_id: value("client_id")?,
        username: value("username")?,
        password: value("password")?,
    })
}

/// Issues fresh credentials for `id` by running `HUB_BIN --config CONFIG device creds ID`. This revokes
/// the device's previous password.
pub fn issue_creds(hub_bin: &Path, config: &Path, id: &str) -> Result<Creds, Error> {
    let output = Command::new(hub_bin)
        .arg("--config")
        .arg(config)
        .args(["device", "creds", id])
        .stdin(Stdio::null())
        .output()
        .map_err(|error| match error.kind() {
            std::io::ErrorKind::NotFound => Error::HubBinNotFound { path: hub_bin.to_owned() },
            _ => Error::RunHub { path: hub_bin.to_owned(), error },
        })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let message = stderr.lines().map(str::trim).rfind(|l| !l.is_empty()).unwrap_or("no message").to_owned();
        return Err(Error::CredsFailed { id: id.to_owned(), status: output.status.to_string(), message });
    }
    parse_creds(&String::from_utf8_lossy(&output.stdout))
}

/// Reads saved `device creds` output from `DIR/ID.txt`.
pub fn read_creds_file(dir: &Path, id: &str) -> Result<Creds, Error> {
    let path = dir.join(format!("{id}.txt"));
    let text = std::fs::read_to_string(&path).map_err(|error| Error::ReadCreds { path, error })?;
    parse_creds(&text)
}

/// The hub binary to run: `domoticpi` next to this executable (as in `target/release/`), else the
/// one on `PATH`.
pub fn default_hub_bin() -> PathBuf {
    let sibling = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(format!("domoticpi{}", std::env::consts::EXE_SUFFIX))));
    match sibling {
        Some(path) if path.is_file() => path,
        _ => PathBuf::from("domoticpi"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "host: 127.0.0.1\nport: 8883\nca: /home/me/domoticpi-data/certs/ca.pem\nclient_id: hall-motion\n\
        username: hall-motion\npassword: 9ec21a585633921aff83c223f2f8d5af\n\
        publish: dpi/hall-motion/state, dpi/hall-motion/availability\nsubscribe: dpi/hall-motion/set, dpi/alarm/state\n";

    /// `case!(name, text, expected)`: parsing `text` gives `expected` (`Ok(())` or the error's Display).
    macro_rules! case {
        ($name:ident, $text:expr, $expected:expr) => {
            #[test]
            fn $name() {
                let got = parse_creds(&$text).map(|_| ()).map_err(|e| e.to_string());
                let expected: Result<(), &str> = $expected;
                assert_eq!(got.as_ref().map_err(String::as_str), expected.as_ref().map_err(|e| *e));
            }
        };
    }

    #[test]
    fn good_output_parses_every_field() {
        let c = parse_creds(GOOD).expect("parses");
        assert_eq!(c.host, "127.0.0.1");
        assert_eq!(c.port, 8883);
        assert_eq!(c.ca, PathBuf::from("/home/me/domoticpi-data/certs/ca.pem"));
        assert_eq!((c.client_id.as_str(), c.username.as_str()), ("hall-motion", "hall-motion"));
        assert_eq!(c.password, "9ec21a585633921aff83c223f2f8d5af");
    }

    #[test]
    fn debug_hides_the_password() {
        let shown = format!("{:?}", parse_creds(GOOD).expect("parses"));
        assert!(!shown.contains("9ec21a58") && shown.contains("<redacted>"), "{shown}");
    }

    #[test]
    fn a_path_with_colons_and_a_cert_line_are_fine() {
        let text =
            GOOD.replace("ca: /home/me", "ca: /mnt/c:/x") + "cert: /x/hall-motion.pem\nkey: /x/hall-motion.key\n";
        assert_eq!(parse_creds(&text).expect("parses").ca, PathBuf::from("/mnt/c:/x/domoticpi-data/certs/ca.pem"));
    }

    case!(good, GOOD, Ok(()));
    case!(crlf_and_spaces, GOOD.replace('\n', "  \r\n"), Ok(()));
    case!(
        missing_password,
        GOOD.replace("password: 9ec21a585633921aff83c223f2f8d5af\n", ""),
        Err("the credentials have no `password:` line (expected the output of `domoticpi device creds ID`)")
    );
    case!(
        empty_password,
        GOOD.replace("9ec21a585633921aff83c223f2f8d5af", ""),
        Err("the credentials have no `password:` line (expected the output of `domoticpi device creds ID`)")
    );
    case!(bad_port, GOOD.replace("8883", "eighty"), Err("the credentials' `port:` value \"eighty\" is not valid"));
    case!(
        garbage,
        "\u{1b}[31merror: no such thing\nrandom words\n",
        Err("the credentials have no `port:` line (expected the output of `domoticpi device creds ID`)")
    );
    case!(empty, "", Err("the credentials have no `port:` line (expected the output of `domoticpi device creds ID`)"));

    #[test]
    fn saved_files_are_read_by_id() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("hall-motion.txt"), GOOD).expect("write");
        assert_eq!(read_creds_file(dir.path(), "hall-motion").expect("reads").port, 8883);
        let err = read_creds_file(dir.path(), "front-door").expect_err("no file").to_string();
        assert!(err.contains("front-door.txt"), "{err}");
    }

    #[test]
    fn a_missing_hub_binary_says_how_to_build_it() {
        let err = issue_creds(Path::new("/nonexistent/domoticpi"), Path::new("x.toml"), "a").expect_err("no binary");
        assert!(matches!(err, Error::HubBinNotFound { .. }), "{err}");
    }
}
