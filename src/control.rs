//! The control channel: a Unix socket, `DATA_DIR/hub.sock` (mode 0600), through which `domoticpi`
//! commands act on the running hub (`domoticpi alarm …`, `status`, `reload` and SIGHUP, and closing
//! a device's connection when `device revoke` or `device creds` changes its credentials).
//!
//! The protocol is one JSON object per line each way, one response per request, several requests per
//! connection allowed:
//!
//! ```text
//! → {"request":"alarm_status"}
//! ← {"ok":true,"alarm":{"state":"disarmed","since":"…","by":"hub","bypassed":[],"code_locked_out":false},"events":[]}
//! → {"request":"alarm","command":{"action":"disarm","code":"1234"}}
//! ← {"ok":true,"alarm":{…},"events":[{"event":"disarmed","device":null,"reason":"…","at":"…","user":"alice"}]}
//! → {"request":"stats"}
//! ← {"ok":true,"stats":{"uptime_s":3600,"store_commits":3598,"connected":12,"client_ids":14,"router_ids":15,"router_drops":0},"events":[]}
//! → {"request":"close_device","id":"hall-motion"}   (after `device revoke` or `device creds`)
//! ← {"ok":true,"events":[]}
//! → {"request":"reload"}
//! ← {"ok":true,"events":[],"reload":{"applied":["devices added: porch"],"restart":[],"closed":[]}}
//! ← {"ok":false,"error":"…"}                      (a request the hub could not carry out)
//! ```
//!
//! `command` is exactly a `dpi/alarm/set` payload, checked by the same parser. Only the hub's own
//! user can open the socket (the data dir is 0700 and the socket 0600), so a request is trusted like
//! the CLI; a disarm still needs a valid code. This module must not decide anything about the alarm
//! or a reload: it passes requests to the driver ([`crate::alarm`]) or to [`crate::reload`] and
//! answers with what they say.

use std::io::{BufRead as _, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::alarm::{self, AlarmHandle, EventRecord, Status};
use crate::store::Store;

/// The socket's file name inside the data dir.
pub const SOCKET_FILE: &str = "hub.sock";

/// Longest request line accepted, in bytes.
const MAX_LINE: u64 = 16 * 1024;

/// How long a connection may stay silent before the hub closes it.
const IDLE: Duration = Duration::from_secs(60);

/// How long the CLI waits for an answer (checking a code with argon2 is slow on a Pi).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the control socket could not be opened or used.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Another process answers on the socket: a hub already runs on this data dir.
    #[error("{0} is in use: another hub runs on this data dir")]
    InUse(PathBuf),
    /// The socket could not be created or set to mode 0600.
    #[error("cannot create the control socket {path}: {source}")]
    Bind { path: PathBuf, source: std::io::Error },
    /// No hub listens on the socket.
    #[error("the hub is not running (no control socket at {0}); start it with `domoticpi run`")]
    NotRunning(PathBuf),
    /// The socket exists but this user may not open it.
    #[error("cannot open {0}: permission denied (run this as the hub's user)")]
    PermissionDenied(PathBuf),
    /// Talking to the hub failed midway.
    #[error("talking to the hub over {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// The hub's answer is not one this CLI understands.
    #[error("the hub sent an answer this CLI does not understand ({0}); are the CLI and the daemon the same version?")]
    BadAnswer(String),
}

/// The control socket of a data dir.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET_FILE)
}

/// What the control socket answers from: the alarm driver and the hub's figures.
#[derive(Clone)]
pub struct Handles {
    /// Carries out alarm requests.
    pub alarm: AlarmHandle,
    /// Counts the store's commits for `stats`.
    pub store: Store,
    /// Closes the connection of a device whose credentials were revoked.
    pub sessions: std::sync::Arc<crate::broker::sessions::Sessions>,
    /// When the hub started, for `stats`.
    pub started: std::time::Instant,
    /// Applies the config file again, for `reload`.
    pub reloader: std::sync::Arc<crate::reload::Reloader>,
    /// The bridge's connection, when there is one.
    pub bridge: Option<crate::bridge::SharedStatus>,
    /// The health probes, when the fault switch is armed (`DOMOTICPI_TEST_FAULTS=1`).
    pub faults: Option<crate::health::Probes>,
}

/// Figures of the running hub, for `domoticpi status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Seconds since the hub started.
    pub uptime_s: u64,
    /// SQLite write transactions committed since the hub started (the SD card's wear).
    pub store_commits: u64,
    /// Clients connected now.
    #[serde(default)]
    pub connected: usize,
    /// Client ids held now: connected, or keeping a persistent session.
    #[serde(default)]
    pub client_ids: usize,
    /// Router-facing ids handed out since the start (the router keeps a little memory for each).
    #[serde(default)]
    pub router_ids: u32,
    /// Connections the router closed on its own since the start (0 unless a guard failed).
    #[serde(default)]
    pub router_drops: u64,
    /// Memory SQLite holds now, in KiB: its page cache, schema and prepared statements.
    #[serde(default)]
    pub store_memory_kib: u64,
    /// The allocator's heap, in KiB: in use, and freed but still held (glibc only; 0 elsewhere).
    #[serde(default)]
    pub heap_kib: (u64, u64),
    /// The bridge's connection and last successful send, when there is a bridge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<crate::bridge::Status>,
}

/// A request, one line of JSON. Its `Debug` leaves the command's code out.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// The alarm's state.
    AlarmStatus,
    /// The hub's figures.
    Stats,
    /// A device's credentials were revoked or re-issued: close its connection.
    CloseDevice {
        /// The device id (its client id).
        id: String,
    },
    /// Apply the config file to the running hub (as SIGHUP does).
    Reload,
    /// An alarm command: a `dpi/alarm/set` payload (kept as JSON so that the code is parsed into a
    /// redacted type in one place, [`alarm::parse_set`]).
    Alarm {
        /// The command object.
        command: Value,
    },
    /// Stall a part of the hub for good, to test the watchdog; refused unless the daemon was
    /// started with `DOMOTICPI_TEST_FAULTS=1`.
    Fault {
        /// Which part.
        part: crate::health::Fault,
    },
    /// Set the hub's wall clock to `at` (RFC 3339), to test a clock stepped at boot; refused unless
    /// the daemon was started with `DOMOTICPI_TEST_FAULTS=1`.
    SetClock {
        /// The new wall time.
        at: String,
    },
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Request::AlarmStatus => f.write_str("AlarmStatus"),
            Request::Stats => f.write_str("Stats"),
            Request::Reload => f.write_str("Reload"),
            Request::Fault { part } => f.debug_struct("Fault").field("part", part).finish(),
            Request::SetClock { at } => f.debug_struct("SetClock").field("at", at).finish(),
            Request::CloseDevice { id } => f.debug_struct("CloseDevice").field("id", id).finish(),
            Request::Alarm { command } => {
                f.debug_struct("Alarm").field("action", &command.get("action")).finish_non_exhaustive()
            }
        }
    }
}

/// A response, one line of JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// Whether the request was carried out (a refused code is carried out: see `events`).
    pub ok: bool,
    /// Why not, when `ok` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The alarm afterwards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alarm: Option<Status>,
    /// The alarm events the request caused, in order.
    #[serde(default)]
    pub events: Vec<EventRecord>,
    /// The hub's figures, for `stats`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<Stats>,
    /// What a `reload` did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reload: Option<crate::reload::Report>,
}

impl Response {
    fn error(error: impl Into<String>) -> Response {
        Response { error: Some(error.into()), ..Response::ok() }.failed()
    }

    fn ok() -> Response {
        Response { ok: true, error: None, alarm: None, events: Vec::new(), stats: None, reload: None }
    }

    fn failed(self) -> Response {
        Response { ok: false, ..self }
    }
}

/// Creates the socket, mode 0600, replacing a stale one a killed hub left behind.
pub fn bind(data_dir: &Path) -> Result<(UnixListener, PathBuf), ControlError> {
    let path = socket_path(data_dir);
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(&path).is_ok() {
            return Err(ControlError::InUse(path));
        }
        let _ = std::fs::remove_file(&path);
    }
    let bind_err = |source| ControlError::Bind { path: path.clone(), source };
    let listener = UnixListener::bind(&path).map_err(bind_err)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
    Ok((listener, path))
}

/// Answers requests until `shutdown` is cancelled, then removes the socket file.
pub async fn serve(listener: UnixListener, path: PathBuf, handles: Handles, shutdown: CancellationToken) {
    info!(path = %path.display(), "control socket ready");
    loop {
        let stream = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    warn!(error = %e, "control socket: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (handles, shutdown) = (handles.clone(), shutdown.clone());
        tokio::spawn(async move {
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = connection(stream, handles) => {}
            }
        });
    }
    let _ = std::fs::remove_file(&path);
}

/// One client: a response per request line until it hangs up, goes quiet or sends an overlong line.
async fn connection(stream: UnixStream, handles: Handles) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    loop {
        let mut line = String::new();
        let read = tokio::time::timeout(IDLE, (&mut reader).take(MAX_LINE).read_line(&mut line)).await;
        match read {
            Ok(Ok(0)) | Err(_) => return,
            Ok(Err(e)) => {
                debug!(error = %e, "control socket: read failed");
                return;
            }
            Ok(Ok(_)) => {}
        }
        // Without its newline the line was cut at MAX_LINE (or the client hung up mid-line):
        // answer, then close, as the rest of the stream cannot be framed.
        let complete = line.ends_with('\n');
        let response = if complete {
            match serde_json::from_str::<Request>(&line) {
                Ok(request) => answer(request, &handles).await,
                Err(e) => Response::error(format!("bad request: {e}")),
            }
        } else {
            Response::error(format!("request longer than {MAX_LINE} bytes or not ended by a newline"))
        };
        let mut out = serde_json::to_vec(&response).unwrap_or_else(|_| br#"{"ok":false}"#.to_vec());
        out.push(b'\n');
        if write.write_all(&out).await.is_err() || !complete {
            return;
        }
    }
}

/// Carries out one request.
async fn answer(request: Request, handles: &Handles) -> Response {
    let alarm = &handles.alarm;
    let ok = Response::ok();
    match request {
        Request::Reload => match handles.reloader.reload().await {
            Ok(report) => Response { reload: Some(report), ..ok },
            Err(e) => Response::error(e.to_string()),
        },
        Request::Stats => Response {
            stats: Some(Stats {
                uptime_s: handles.started.elapsed().as_secs(),
                store_commits: handles.store.commits(),
                connected: handles.sessions.connected(),
                client_ids: handles.sessions.held(),
                router_ids: handles.sessions.router_ids(),
                router_drops: handles.sessions.router_drops(),
                store_memory_kib: crate::store::memory_used() / 1024,
                heap_kib: crate::hub::heap_kib(),
                bridge: handles
                    .bridge
                    .as_ref()
                    .map(|b| b.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()),
            }),
            ..ok
        },
        Request::CloseDevice { id } => {
            if handles.sessions.kick(&id) {
                info!(device = %id, "closing the device's connection: its credentials changed");
            }
            ok
        }
        Request::Fault { part } => match &handles.faults {
            Some(probes) => {
                probes.stall(part);
                ok
            }
            None => {
                Response::error(format!("the fault switch is off (start the hub with {}=1)", crate::health::FAULTS_ENV))
            }
        },
        Request::SetClock { at } => match (&handles.faults, at.parse::<jiff::Timestamp>()) {
            (None, _) => {
                Response::error(format!("the fault switch is off (start the hub with {}=1)", crate::health::FAULTS_ENV))
            }
            (Some(_), Err(e)) => Response::error(format!("not an RFC 3339 time: {e}")),
            (Some(_), Ok(at)) => {
                warn!(%at, "test fault: the wall clock is set");
                crate::wall::set(at);
                ok
            }
        },
        Request::AlarmStatus => match alarm.status().await {
            Ok(status) => Response { alarm: Some(status), ..ok },
            Err(e) => Response::error(e.to_string()),
        },
        Request::Alarm { command } => {
            let command = match serde_json::to_vec(&command).map(|bytes| alarm::parse_set(&bytes)) {
                Ok(Ok(command)) => command,
                Ok(Err(e)) => return Response::error(e.to_string()),
                Err(e) => return Response::error(e.to_string()),
            };
            match alarm.cli_command(command).await {
                Ok(outcome) => Response { alarm: Some(outcome.status), events: outcome.events, ..ok },
                Err(e) => Response::error(e.to_string()),
            }
        }
    }
}

/// Sends one request to the hub of `data_dir` and returns its answer (blocking: for the CLI).
pub fn request(data_dir: &Path, request: &Request) -> Result<Response, ControlError> {
    request_within(data_dir, request, CLIENT_TIMEOUT)
}

/// [`request`], waiting at most `timeout` for the answer.
pub fn request_within(data_dir: &Path, request: &Request, timeout: Duration) -> Result<Response, ControlError> {
    let path = socket_path(data_dir);
    let stream = std::os::unix::net::UnixStream::connect(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => ControlError::NotRunning(path.clone()),
        std::io::ErrorKind::PermissionDenied => ControlError::PermissionDenied(path.clone()),
        _ => ControlError::Io { path: path.clone(), source: e },
    })?;
    let io = |source| ControlError::Io { path: path.clone(), source };
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut line = serde_json::to_vec(request).map_err(|e| ControlError::BadAnswer(e.to_string()))?;
    line.push(b'\n');
    (&stream).write_all(&line).map_err(io)?;
    let mut answer = String::new();
    std::io::BufReader::new(&stream).read_line(&mut answer).map_err(io)?;
    if answer.is_empty() {
        return Err(ControlError::BadAnswer("the hub closed the connection".to_owned()));
    }
    serde_json::from_str(&answer).map_err(|e| ControlError::BadAnswer(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_responses_are_one_json_line_each() {
        let r = Request::Alarm { command: serde_json::json!({"action": "arm_away"}) };
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(text, r#"{"request":"alarm","command":{"action":"arm_away"}}"#);
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), r);
        let secret = Request::Alarm { command: serde_json::json!({"action": "disarm", "code": "4821"}) };
        assert!(!format!("{secret:?}").contains("4821"));
        assert_eq!(serde_json::to_string(&Request::AlarmStatus).unwrap(), r#"{"request":"alarm_status"}"#);
        assert_eq!(serde_json::to_string(&Request::Stats).unwrap(), r#"{"request":"stats"}"#);
        assert!(serde_json::from_str::<Request>(r#"{"request":"reboot"}"#).is_err());
        let e = Response::error("nope");
        assert_eq!(serde_json::to_string(&e).unwrap(), r#"{"ok":false,"error":"nope","events":[]}"#);
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced_and_a_live_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (listener, path) = bind(dir.path()).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(bind(dir.path()), Err(ControlError::InUse(_))));
        drop(listener);
        // The file stays behind, as after a kill -9.
        assert!(path.exists());
        let (_listener, _) = bind(dir.path()).unwrap();
        let other = tempfile::tempdir().unwrap();
        assert!(matches!(request(other.path(), &Request::AlarmStatus), Err(ControlError::NotRunning(_))));
    }
}
