//! The state store: one SQLite file (`hub.db`, WAL) shared by the daemon and the CLI.
//!
//! The schema is versioned with `PRAGMA user_version` and migrated forward at open; a file written
//! by a newer hub is refused before anything touches it. The daemon keeps its connection on a
//! thread of its own behind [`Store`], an async handle, so no runtime worker ever waits on the
//! disk; the CLI uses the same domain functions ([`users`], [`runtime`], [`events`]) on a plain
//! connection. This module must not know about MQTT or the rules.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};
use tokio::sync::oneshot;

/// The file name of the database inside the data dir.
pub const DB_FILE: &str = "hub.db";

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite reported an error.
    #[error("database {path}: {source}")]
    Sqlite { path: PathBuf, source: rusqlite::Error },
    /// The file was written by a newer version of the hub; it is left untouched.
    #[error("database {path} has schema version {found}, newer than this hub understands ({supported}); upgrade domoticpi or restore a backup")]
    TooNew { path: PathBuf, found: i64, supported: i64 },
    /// No such user.
    #[error("no user named {0:?}")]
    NoSuchUser(String),
    /// The user name is taken.
    #[error("a user named {0:?} already exists")]
    UserExists(String),
    /// The store thread is gone (the hub is shutting down or it crashed).
    #[error("the store is closed")]
    Closed,
    /// The disk holding the database has no room left.
    #[error("database {path}: the disk is full ({free} bytes free); free some space and start again")]
    DiskFull { path: PathBuf, free: u64 },
    /// A file that must be created new exists already.
    #[error("{0} exists already; choose another name (a backup never replaces a file)")]
    Exists(PathBuf),
}

/// Free space under which a failure to open the database is reported as a full disk.
const LOW_SPACE: u64 = 1024 * 1024;

/// Bytes free for an unprivileged user on the file system holding `path` (or its directory).
pub fn free_bytes(path: &Path) -> Option<u64> {
    let dir = if path.is_dir() { path } else { path.parent()? };
    let dir = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).ok()?;
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `dir` is a NUL-terminated path and `stat` a valid out-parameter for the call.
    if unsafe { libc::statvfs(dir.as_ptr(), &mut stat) } != 0 {
        return None;
    }
    // Narrower than u64 on 32-bit ARM (an armv7 Pi): the conversions are not useless there.
    #[allow(clippy::useless_conversion)]
    Some(u64::from(stat.f_bavail).saturating_mul(u64::from(stat.f_frsize)))
}

/// A short alias used throughout the module.
type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Schema migrations; entry `i` takes the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: users, the running hub, the event log.
    "CREATE TABLE users (
        name TEXT PRIMARY KEY,
        role TEXT NOT NULL CHECK (role IN ('admin', 'resident')),
        password_hash TEXT NOT NULL,
        pin_hash TEXT,
        created_at TEXT NOT NULL
    );
    CREATE TABLE hub_runtime (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        pid INTEGER NOT NULL,
        started_at TEXT NOT NULL,
        stopped_at TEXT,
        tls_listen TEXT NOT NULL,
        plain_listen TEXT
    );
    CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        at TEXT NOT NULL,
        kind TEXT NOT NULL,
        detail TEXT NOT NULL
    );",
    // 2: device credentials, durable retained messages, clients the router had to skip ahead.
    "CREATE TABLE device_credentials (
        id TEXT PRIMARY KEY,
        password_hash TEXT NOT NULL,
        issued_at TEXT NOT NULL
    );
    CREATE TABLE retained (
        topic TEXT PRIMARY KEY,
        payload BLOB NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE TABLE client_lag (
        client TEXT PRIMARY KEY,
        jumps INTEGER NOT NULL,
        last_at TEXT NOT NULL
    );",
    // 3: device state and history, rejected device ids, counters.
    "CREATE TABLE device_state (
        id TEXT PRIMARY KEY,
        state TEXT,
        state_at TEXT,
        online INTEGER,
        seen_at TEXT
    );
    CREATE TABLE history (
        id INTEGER PRIMARY KEY,
        device TEXT NOT NULL,
        at TEXT NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('state', 'availability')),
        value TEXT NOT NULL
    );
    CREATE INDEX history_at ON history (at);
    CREATE TABLE rejected_devices (
        id TEXT PRIMARY KEY,
        count INTEGER NOT NULL,
        last_at TEXT NOT NULL
    );
    CREATE TABLE counters (
        name TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    );",
    // 4: the alarm's state, bypass list and deadlines, as one JSON snapshot.
    "CREATE TABLE alarm (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        snapshot TEXT NOT NULL,
        saved_at TEXT NOT NULL
    );",
    // 5: the one client certificate each device may use (the last issued); others are revoked.
    "CREATE TABLE device_certs (
        id TEXT PRIMARY KEY,
        sha256 TEXT NOT NULL,
        issued_at TEXT NOT NULL
    );",
    // 6: what the bridge has yet to send upstream, in order (ids are never reused).
    "CREATE TABLE outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        topic TEXT NOT NULL,
        payload BLOB NOT NULL,
        retain INTEGER NOT NULL,
        class INTEGER NOT NULL
    );",
];

/// The newest schema version this build knows.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Opens (creating if needed) and migrates the database at `path`.
pub fn open(path: &Path) -> Result<Connection> {
    open_or_create(path).map_err(|e| match free_bytes(path) {
        // SQLite says "disk I/O error" (or worse) on a full disk: say what it is.
        Some(free) if free < LOW_SPACE => StoreError::DiskFull { path: path.to_owned(), free },
        _ => e,
    })
}

/// [`open`], without looking at the disk when it fails.
fn open_or_create(path: &Path) -> Result<Connection> {
    let sql = |source| StoreError::Sqlite { path: path.to_owned(), source };
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sql)?;
    conn.busy_timeout(Duration::from_secs(5)).map_err(sql)?;
    // It holds password hashes: owner only. SQLite gives the -wal and -shm files the same mode.
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(|e| sql(rusqlite::Error::ToSqlConversionFailure(Box::new(e))))?;
    // Check the version before anything writes to the file.
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(sql)?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::TooNew { path: path.to_owned(), found: version, supported: SCHEMA_VERSION });
    }
    if version == 0 {
        // Small pages: each coalesced state write touches a few pages, and every byte written
        // wears the SD card (measured at 10 states/s: 4 KiB pages wrote 2.3 times the bytes of 1 KiB pages).
        conn.pragma_update(None, "page_size", 1024).map_err(sql)?;
    }
    conn.pragma_update(None, "journal_mode", "WAL").map_err(sql)?;
    conn.pragma_update(None, "synchronous", "NORMAL").map_err(sql)?;
    conn.pragma_update(None, "foreign_keys", "ON").map_err(sql)?;
    migrate(&conn, version).map_err(sql)?;
    Ok(conn)
}

fn migrate(conn: &Connection, from: i64) -> rusqlite::Result<()> {
    for (i, step) in MIGRATIONS.iter().enumerate().skip(usize::try_from(from).unwrap_or(0)) {
        let tx = conn.unchecked_transaction()?;
        tx.execute_batch(step)?;
        tx.pragma_update(None, "user_version", i as i64 + 1)?;
        tx.commit()?;
    }
    Ok(())
}

/// The current time as RFC 3339 text, the form every timestamp in the database takes.
pub fn now_rfc3339() -> String {
    rfc3339(crate::wall::now_utc())
}

/// Bytes SQLite has allocated in this process (every connection's page cache, schemas, statements).
pub fn memory_used() -> u64 {
    // SAFETY: sqlite3_memory_used only reads SQLite's own counter, under its mutex.
    let used = unsafe { rusqlite::ffi::sqlite3_memory_used() };
    u64::try_from(used).unwrap_or(0)
}

/// A time as RFC 3339, as every stored and published timestamp is written.
pub fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

/// A job for the store thread.
type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// The daemon's async handle on the database, which lives on a thread of its own.
///
/// Cloning is cheap; every clone talks to the same thread. Jobs run one at a time in the order
/// they were sent.
#[derive(Clone)]
pub struct Store {
    /// Sends jobs to the store thread. A std channel: sending never blocks or awaits.
    jobs: mpsc::Sender<Job>,
    /// The database path, for messages.
    path: PathBuf,
    /// Write transactions committed since the store started (SQLite's commit hook counts them all,
    /// including single statements outside an explicit transaction): the SD card's wear, shown by
    /// `domoticpi status`.
    commits: Arc<AtomicU64>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

/// Joins the store thread; the daemon waits on it at shutdown so that nothing is lost.
pub struct StoreThread(thread::JoinHandle<()>);

impl StoreThread {
    /// Waits until every job sent before the last [`Store`] handle was dropped has run and the
    /// database is closed (WAL checkpointed).
    pub fn join(self) {
        let _ = self.0.join();
    }
}

impl Store {
    /// Opens the database and starts its thread.
    pub fn start(path: &Path) -> Result<(Store, StoreThread)> {
        let mut conn = open(path)?;
        let commits = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&commits);
        conn.commit_hook(Some(move || {
            counter.fetch_add(1, Ordering::Relaxed);
            false
        }));
        let (jobs, rx) = mpsc::channel::<Job>();
        let thread = thread::Builder::new()
            .name("store".to_owned())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job(&mut conn);
                }
                // Every handle is gone: checkpoint so the main file is complete on its own.
                if let Err(e) = conn.pragma_update(None, "wal_checkpoint", "TRUNCATE") {
                    tracing::warn!(error = %e, "store: final checkpoint failed");
                }
            })
            .map_err(|e| StoreError::Sqlite {
                path: path.to_owned(),
                source: rusqlite::Error::ToSqlConversionFailure(Box::new(e)),
            })?;
        Ok((Store { jobs, path: path.to_owned(), commits }, StoreThread(thread)))
    }

    /// Runs `f` on the store thread and returns its result.
    pub async fn call<R, F>(&self, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<R> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Box::new(move |conn| {
                let _ = tx.send(f(conn));
            }))
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Runs `f` in a transaction that is on disk (fsynced) before this returns: for what must never
    /// be lost, such as the alarm's state. Other writes use WAL with `synchronous = NORMAL`.
    pub async fn durable<R, F>(&self, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&rusqlite::Transaction<'_>) -> Result<R> + Send + 'static,
    {
        self.call(move |conn| {
            let path = PathBuf::from(conn.path().unwrap_or_default());
            let err = |source| StoreError::Sqlite { path: path.clone(), source };
            conn.pragma_update(None, "synchronous", "FULL").map_err(err)?;
            let result = (|| {
                let tx = conn.transaction().map_err(err)?;
                let r = f(&tx)?;
                tx.commit().map_err(err)?;
                Ok(r)
            })();
            let _ = conn.pragma_update(None, "synchronous", "NORMAL");
            result
        })
        .await
    }

    /// The database path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Write transactions committed since the store started.
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }
}

/// One interval's writes: device changes, retained messages, the alarm's checkpoint.
#[derive(Debug, Default)]
pub struct Batch {
    /// Device states, availability, rejected ids.
    pub states: Vec<device_state::Change>,
    /// Retained messages set (`Some`) or cleared (`None`).
    pub retained: Vec<(String, Option<Vec<u8>>)>,
    /// The alarm's latest snapshot while a delay runs.
    pub alarm: Option<alarm::Checkpoint>,
    /// Deletes the history older than this (RFC 3339), hourly.
    pub prune_before: Option<String>,
    /// States for the bridge to send upstream, and the outbox's bound.
    pub outbox: Vec<outbox::Entry>,
    /// The outbox's bound (`bridge.max_queue`).
    pub outbox_max: usize,
    /// Changes replaced while they waited for their device's write budget (counted as
    /// `history_thinned`).
    pub thinned: u64,
}

/// Writes one interval's batch in a single transaction, so that the SD card sees at most one
/// commit per interval whatever the load. Returns the retained topics not stored because the
/// table is full.
pub fn write_batch(conn: &mut Connection, batch: &Batch) -> Result<Vec<String>> {
    let Batch { states, retained, alarm, prune_before, outbox: queued, outbox_max, thinned } = batch;
    let path = PathBuf::from(conn.path().unwrap_or_default());
    let tx = conn.transaction().map_err(|source| StoreError::Sqlite { path, source })?;
    if !states.is_empty() {
        device_state::write(&tx, states)?;
    }
    if let Some(checkpoint) = alarm {
        alarm::save_checkpoint(&tx, checkpoint)?;
    }
    if let Some(before) = prune_before {
        device_state::prune(&tx, before)?;
    }
    if !queued.is_empty() {
        outbox::append(&tx, queued, *outbox_max)?;
    }
    let refused = if retained.is_empty() { Vec::new() } else { retained::write(&tx, retained)? };
    if *thinned > 0 {
        tx.execute(
            "INSERT INTO counters (name, value) VALUES (?1, ?2)
             ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
            rusqlite::params![device_state::THINNED, *thinned as i64],
        )
        .map_err(sql_err(&tx))?;
    }
    tx.commit().map_err(sql_err(conn))?;
    Ok(refused)
}

/// What the bridge has yet to send upstream: appended in order, sent in order, deleted once the
/// upstream acknowledged it. Bounded: past the bound the oldest states go first, then the oldest
/// alarm events, and alerts last; what is dropped is counted.
pub mod outbox {
    use super::*;
    use rusqlite::params;

    /// The counter (in `counters`) of entries dropped because the outbox was full.
    pub const DROPPED: &str = "bridge_dropped";

    /// What an entry is, which decides what is dropped first.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
    pub enum Class {
        /// A state, an availability or a health report: dropped first.
        State = 0,
        /// An alarm state or event.
        Event = 1,
        /// An alert for people: dropped last.
        Alert = 2,
    }

    /// One message to send upstream.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Entry {
        /// The upstream topic.
        pub topic: String,
        /// Its payload.
        pub payload: Vec<u8>,
        /// Whether the upstream keeps it as retained.
        pub retain: bool,
        /// What it is.
        pub class: Class,
    }

    /// An entry and its place in the order.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Row {
        /// Its place: later entries have larger ids.
        pub id: i64,
        /// The entry.
        pub entry: Entry,
    }

    /// Appends `entries` in order, then trims to `max` entries; returns how many were dropped.
    pub fn append(tx: &Connection, entries: &[Entry], max: usize) -> Result<u64> {
        let mut insert = tx
            .prepare_cached("INSERT INTO outbox (topic, payload, retain, class) VALUES (?1, ?2, ?3, ?4)")
            .map_err(sql_err(tx))?;
        for e in entries {
            insert.execute(params![e.topic, e.payload, e.retain, e.class as i64]).map_err(sql_err(tx))?;
        }
        let mut over = depth(tx)?.saturating_sub(i64::try_from(max).unwrap_or(i64::MAX));
        let mut dropped = 0;
        for class in [Class::State, Class::Event, Class::Alert] {
            if over <= 0 {
                break;
            }
            let n = tx
                .execute(
                    "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE class = ?1 ORDER BY id LIMIT ?2)",
                    params![class as i64, over],
                )
                .map_err(sql_err(tx))?;
            over -= n as i64;
            dropped += n as u64;
        }
        if dropped > 0 {
            tx.execute(
                "INSERT INTO counters (name, value) VALUES (?1, ?2)
                 ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
                params![DROPPED, dropped as i64],
            )
            .map_err(sql_err(tx))?;
        }
        Ok(dropped)
    }

    /// Up to `limit` entries after `after` (0: from the oldest), in order.
    pub fn after(conn: &Connection, after: i64, limit: usize) -> Result<Vec<Row>> {
        let mut stmt = conn
            .prepare_cached("SELECT id, topic, payload, retain, class FROM outbox WHERE id > ?1 ORDER BY id LIMIT ?2")
            .map_err(sql_err(conn))?;
        let rows = stmt
            .query_map(params![after, i64::try_from(limit).unwrap_or(i64::MAX)], |r| {
                let class = match r.get::<_, i64>(4)? {
                    2 => Class::Alert,
                    1 => Class::Event,
                    _ => Class::State,
                };
                let entry = Entry { topic: r.get(1)?, payload: r.get(2)?, retain: r.get(3)?, class };
                Ok(Row { id: r.get(0)?, entry })
            })
            .map_err(sql_err(conn))?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(sql_err(conn))
    }

    /// Deletes the entries the upstream acknowledged.
    pub fn delete(conn: &Connection, ids: &[i64]) -> Result<()> {
        let tx = conn.unchecked_transaction().map_err(sql_err(conn))?;
        {
            let mut stmt = tx.prepare_cached("DELETE FROM outbox WHERE id = ?1").map_err(sql_err(conn))?;
            for id in ids {
                stmt.execute([id]).map_err(sql_err(conn))?;
            }
        }
        tx.commit().map_err(sql_err(conn))
    }

    /// Entries waiting.
    pub fn depth(conn: &Connection) -> Result<i64> {
        conn.query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0)).map_err(sql_err(conn))
    }

    /// Entries dropped since the database was made.
    pub fn dropped(conn: &Connection) -> Result<i64> {
        device_state::counter(conn, DROPPED)
    }
}

/// Maps a rusqlite error to a [`StoreError`] for `conn`'s file.
pub(crate) fn sql_err(conn: &Connection) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
    move |source| StoreError::Sqlite { path: PathBuf::from(conn.path().unwrap_or_default()), source }
}

/// Users: residents and admins who log in with a name and a password.
pub mod users {
    use super::*;
    use rusqlite::{params, OptionalExtension};

    /// What a user may do (SPEC §6).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Role {
        /// Anything.
        Admin,
        /// Commands and reading `dpi/#`.
        Resident,
    }

    impl Role {
        /// The name stored and printed.
        pub fn as_str(self) -> &'static str {
            match self {
                Role::Admin => "admin",
                Role::Resident => "resident",
            }
        }

        fn parse(s: &str) -> Role {
            if s == "admin" {
                Role::Admin
            } else {
                Role::Resident
            }
        }
    }

    /// A user as listed.
    #[derive(Debug, Clone)]
    pub struct User {
        pub name: String,
        pub role: Role,
        pub has_pin: bool,
        pub created_at: String,
    }

    /// A user's credentials, for authentication.
    #[derive(Clone)]
    pub struct Credentials {
        pub role: Role,
        /// PHC string of the argon2 password hash.
        pub password_hash: String,
    }

    /// Adds a user with an already hashed password.
    pub fn add(conn: &Connection, name: &str, role: Role, password_hash: &str) -> Result<()> {
        let res = conn.execute(
            "INSERT INTO users (name, role, password_hash, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![name, role.as_str(), password_hash, now_rfc3339()],
        );
        match res {
            Ok(_) => Ok(()),
            Err(rusqlite::Error::SqliteFailure(e, _)) if e.code == rusqlite::ErrorCode::ConstraintViolation => {
                Err(StoreError::UserExists(name.to_owned()))
            }
            Err(e) => Err(sql_err(conn)(e)),
        }
    }

    /// Sets a user's alarm code hash.
    pub fn set_pin(conn: &Connection, name: &str, pin_hash: &str) -> Result<()> {
        let n = conn
            .execute("UPDATE users SET pin_hash = ?2 WHERE name = ?1", params![name, pin_hash])
            .map_err(sql_err(conn))?;
        if n == 0 {
            return Err(StoreError::NoSuchUser(name.to_owned()));
        }
        Ok(())
    }

    /// Removes a user.
    pub fn remove(conn: &Connection, name: &str) -> Result<()> {
        let n = conn.execute("DELETE FROM users WHERE name = ?1", [name]).map_err(sql_err(conn))?;
        if n == 0 {
            return Err(StoreError::NoSuchUser(name.to_owned()));
        }
        Ok(())
    }

    /// Every user, by name.
    pub fn list(conn: &Connection) -> Result<Vec<User>> {
        let mut stmt = conn
            .prepare("SELECT name, role, pin_hash IS NOT NULL, created_at FROM users ORDER BY name")
            .map_err(sql_err(conn))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(User {
                    name: r.get(0)?,
                    role: Role::parse(&r.get::<_, String>(1)?),
                    has_pin: r.get(2)?,
                    created_at: r.get(3)?,
                })
            })
            .map_err(sql_err(conn))?;
        rows.collect::<rusqlite::Result<_>>().map_err(sql_err(conn))
    }

    /// A user's credentials, if the user exists.
    pub fn credentials(conn: &Connection, name: &str) -> Result<Option<Credentials>> {
        conn.query_row("SELECT role, password_hash FROM users WHERE name = ?1", [name], |r| {
            Ok(Credentials { role: Role::parse(&r.get::<_, String>(0)?), password_hash: r.get(1)? })
        })
        .optional()
        .map_err(sql_err(conn))
    }
}

/// The running hub's record: which process, which listeners; read by `domoticpi status`.
pub mod runtime {
    use super::*;
    use rusqlite::{params, OptionalExtension};

    /// The hub's last start, as recorded.
    #[derive(Debug, Clone)]
    pub struct Record {
        pub pid: u32,
        pub started_at: String,
        pub stopped_at: Option<String>,
        pub tls_listen: String,
        pub plain_listen: Option<String>,
    }

    /// Records a start.
    pub fn started(conn: &Connection, tls_listen: &str, plain_listen: Option<&str>) -> Result<()> {
        conn.execute(
            "INSERT OR REPLACE INTO hub_runtime (id, pid, started_at, stopped_at, tls_listen, plain_listen)
             VALUES (1, ?1, ?2, NULL, ?3, ?4)",
            params![std::process::id(), now_rfc3339(), tls_listen, plain_listen],
        )
        .map_err(sql_err(conn))?;
        Ok(())
    }

    /// Records a clean stop.
    pub fn stopped(conn: &Connection) -> Result<()> {
        conn.execute("UPDATE hub_runtime SET stopped_at = ?1 WHERE id = 1", [now_rfc3339()]).map_err(sql_err(conn))?;
        Ok(())
    }

    /// The last recorded start, if any.
    pub fn get(conn: &Connection) -> Result<Option<Record>> {
        conn.query_row(
            "SELECT pid, started_at, stopped_at, tls_listen, plain_listen FROM hub_runtime WHERE id = 1",
            [],
            |r| {
                Ok(Record {
                    pid: r.get(0)?,
                    started_at: r.get(1)?,
                    stopped_at: r.get(2)?,
                    tls_listen: r.get(3)?,
                    plain_listen: r.get(4)?,
                })
            },
        )
        .optional()
        .map_err(sql_err(conn))
    }
}

/// Device MQTT passwords, issued by `domoticpi device creds`.
pub mod devices {
    use super::*;
    use rusqlite::{params, OptionalExtension};

    /// Stores a device's password hash, replacing (revoking) any earlier one.
    pub fn set_password(conn: &Connection, id: &str, password_hash: &str) -> Result<()> {
        conn.execute(
            "INSERT INTO device_credentials (id, password_hash, issued_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (id) DO UPDATE SET password_hash = excluded.password_hash, issued_at = excluded.issued_at",
            params![id, password_hash, now_rfc3339()],
        )
        .map_err(sql_err(conn))?;
        Ok(())
    }

    /// The device's password hash, if credentials were issued.
    pub fn password_hash(conn: &Connection, id: &str) -> Result<Option<String>> {
        conn.query_row("SELECT password_hash FROM device_credentials WHERE id = ?1", [id], |r| r.get(0))
            .optional()
            .map_err(sql_err(conn))
    }

    /// Records the client certificate just issued to a device (its SHA-256), revoking any earlier one.
    pub fn set_cert(conn: &Connection, id: &str, sha256: &str) -> Result<()> {
        conn.execute(
            "INSERT INTO device_certs (id, sha256, issued_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (id) DO UPDATE SET sha256 = excluded.sha256, issued_at = excluded.issued_at",
            params![id, sha256, now_rfc3339()],
        )
        .map_err(sql_err(conn))?;
        Ok(())
    }

    /// The SHA-256 of the one client certificate the device may use, if one was issued.
    pub fn cert_sha256(conn: &Connection, id: &str) -> Result<Option<String>> {
        conn.query_row("SELECT sha256 FROM device_certs WHERE id = ?1", [id], |r| r.get(0))
            .optional()
            .map_err(sql_err(conn))
    }

    /// Revokes the device's password and client certificate; false if it had neither.
    pub fn revoke(conn: &Connection, id: &str) -> Result<bool> {
        let tx = conn.unchecked_transaction().map_err(sql_err(conn))?;
        let n = tx.execute("DELETE FROM device_credentials WHERE id = ?1", [id]).map_err(sql_err(conn))?
            + tx.execute("DELETE FROM device_certs WHERE id = ?1", [id]).map_err(sql_err(conn))?;
        tx.commit().map_err(sql_err(conn))?;
        Ok(n > 0)
    }
}

/// Retained messages, kept across restarts.
pub mod retained {
    use super::*;
    use rusqlite::params;

    /// Most retained topics kept on disk; beyond it new topics are kept in memory only.
    pub const MAX_TOPICS: i64 = 10_000;

    /// Applies changes inside the caller's transaction ([`super::write_batch`]): a payload sets a
    /// topic, `None` (an empty retained publish) clears it. Returns the topics that were not stored
    /// because the table is full.
    pub fn write(tx: &Connection, changes: &[(String, Option<Vec<u8>>)]) -> Result<Vec<String>> {
        let mut refused = Vec::new();
        {
            let err = sql_err(tx);
            let mut count: i64 = tx.query_row("SELECT COUNT(*) FROM retained", [], |r| r.get(0)).map_err(&err)?;
            for (topic, payload) in changes {
                match payload {
                    None => count -= tx.execute("DELETE FROM retained WHERE topic = ?1", [topic]).map_err(&err)? as i64,
                    Some(p) => {
                        let updated = tx
                            .execute(
                                "UPDATE retained SET payload = ?2, updated_at = ?3 WHERE topic = ?1",
                                params![topic, p, now_rfc3339()],
                            )
                            .map_err(&err)?;
                        if updated == 0 {
                            if count >= MAX_TOPICS {
                                refused.push(topic.clone());
                                continue;
                            }
                            tx.execute(
                                "INSERT INTO retained (topic, payload, updated_at) VALUES (?1, ?2, ?3)",
                                params![topic, p, now_rfc3339()],
                            )
                            .map_err(&err)?;
                            count += 1;
                        }
                    }
                }
            }
        }
        Ok(refused)
    }

    /// Every retained message as stored: (topic bytes, payload). A row of the wrong type comes
    /// back as it is; the caller decides what it can use (a bad row must never stop a start).
    pub fn all(conn: &Connection) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        use rusqlite::types::ValueRef;
        let bytes = |v: ValueRef<'_>| match v {
            ValueRef::Text(b) | ValueRef::Blob(b) => b.to_vec(),
            _ => Vec::new(),
        };
        let mut stmt = conn.prepare("SELECT topic, payload FROM retained ORDER BY topic").map_err(sql_err(conn))?;
        let rows = stmt.query_map([], |r| Ok((bytes(r.get_ref(0)?), bytes(r.get_ref(1)?)))).map_err(sql_err(conn))?;
        rows.collect::<rusqlite::Result<_>>().map_err(sql_err(conn))
    }
}

/// Clients that lost messages because they read too slowly (the router skipped ahead, or their
/// mailbox was full).
pub mod lag {
    use super::*;
    use rusqlite::params;

    /// Clients kept in the table; the least recently seen are dropped past it.
    pub const MAX_CLIENTS: i64 = 100;

    /// Adds `jumps` skip-aheads to a client's count.
    pub fn add(conn: &Connection, client: &str, jumps: u64) -> Result<()> {
        let tx = conn.unchecked_transaction().map_err(sql_err(conn))?;
        tx.execute(
            "INSERT INTO client_lag (client, jumps, last_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (client) DO UPDATE SET jumps = jumps + excluded.jumps, last_at = excluded.last_at",
            params![client, jumps as i64, now_rfc3339()],
        )
        .map_err(sql_err(conn))?;
        tx.execute(
            "DELETE FROM client_lag WHERE client NOT IN (SELECT client FROM client_lag ORDER BY last_at DESC LIMIT ?1)",
            [MAX_CLIENTS],
        )
        .map_err(sql_err(conn))?;
        tx.commit().map_err(sql_err(conn))
    }

    /// Every client with skip-aheads: (client, jumps, last time).
    pub fn all(conn: &Connection) -> Result<Vec<(String, i64, String)>> {
        let mut stmt = conn
            .prepare("SELECT client, jumps, last_at FROM client_lag ORDER BY last_at DESC")
            .map_err(sql_err(conn))?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).map_err(sql_err(conn))?;
        rows.collect::<rusqlite::Result<_>>().map_err(sql_err(conn))
    }
}

/// The latest state of each device, its history, and ids of undeclared devices that published.
pub mod device_state {
    use super::*;
    use rusqlite::{params, OptionalExtension};

    /// What the store knows of one device.
    #[derive(Debug, Clone, Default, PartialEq)]
    pub struct Row {
        pub id: String,
        /// Canonical JSON of the last state, if any.
        pub state: Option<String>,
        pub state_at: Option<String>,
        /// Last availability, if ever seen.
        pub online: Option<bool>,
        pub seen_at: Option<String>,
    }

    /// The counter of states replaced while they waited for their device's write budget.
    pub const THINNED: &str = "history_thinned";

    /// Undeclared ids kept in `rejected_devices`; the least recently seen are dropped past it.
    pub const MAX_REJECTED: i64 = 100;

    /// One change to write.
    #[derive(Debug, Clone, PartialEq)]
    pub enum Change {
        /// A new state (canonical JSON) at a time.
        State { id: String, json: String, at: String },
        /// The device came online or went offline.
        Availability { id: String, online: bool, at: String },
        /// An undeclared device published `n` times.
        Rejected { id: String, n: u64 },
    }

    /// Writes changes inside the caller's transaction ([`super::write_batch`]): latest rows,
    /// history, rejected counts. (Commits are counted in memory, [`super::Store::commits`]: a
    /// counter row rewritten at every commit would be one more page on the SD card each time.)
    pub fn write(tx: &Connection, changes: &[Change]) -> Result<()> {
        let e = sql_err(tx);
        for change in changes {
            match change {
                Change::State { id, json, at } => {
                    tx.execute(
                        "INSERT INTO device_state (id, state, state_at) VALUES (?1, ?2, ?3)
                         ON CONFLICT (id) DO UPDATE SET state = excluded.state, state_at = excluded.state_at",
                        params![id, json, at],
                    )
                    .map_err(&e)?;
                    tx.execute(
                        "INSERT INTO history (device, at, kind, value) VALUES (?1, ?2, 'state', ?3)",
                        params![id, at, json],
                    )
                    .map_err(&e)?;
                }
                Change::Availability { id, online, at } => {
                    tx.execute(
                        "INSERT INTO device_state (id, online, seen_at) VALUES (?1, ?2, ?3)
                         ON CONFLICT (id) DO UPDATE SET online = excluded.online, seen_at = excluded.seen_at",
                        params![id, online, at],
                    )
                    .map_err(&e)?;
                    let value = if *online { "online" } else { "offline" };
                    tx.execute(
                        "INSERT INTO history (device, at, kind, value) VALUES (?1, ?2, 'availability', ?3)",
                        params![id, at, value],
                    )
                    .map_err(&e)?;
                }
                Change::Rejected { id, n } => {
                    tx.execute(
                        "INSERT INTO rejected_devices (id, count, last_at) VALUES (?1, ?2, ?3)
                         ON CONFLICT (id) DO UPDATE SET count = count + excluded.count, last_at = excluded.last_at",
                        params![id, *n as i64, now_rfc3339()],
                    )
                    .map_err(&e)?;
                }
            }
        }
        if changes.iter().any(|c| matches!(c, Change::Rejected { .. })) {
            tx.execute(
                "DELETE FROM rejected_devices WHERE id NOT IN
                 (SELECT id FROM rejected_devices ORDER BY last_at DESC, count DESC LIMIT ?1)",
                [MAX_REJECTED],
            )
            .map_err(&e)?;
        }
        Ok(())
    }

    /// Deletes history older than `before` (RFC 3339).
    pub fn prune(conn: &Connection, before: &str) -> Result<usize> {
        conn.execute("DELETE FROM history WHERE at < ?1", [before]).map_err(sql_err(conn))
    }

    /// Every device row.
    pub fn all(conn: &Connection) -> Result<Vec<Row>> {
        let mut stmt = conn
            .prepare("SELECT id, state, state_at, online, seen_at FROM device_state ORDER BY id")
            .map_err(sql_err(conn))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(Row { id: r.get(0)?, state: r.get(1)?, state_at: r.get(2)?, online: r.get(3)?, seen_at: r.get(4)? })
            })
            .map_err(sql_err(conn))?;
        rows.collect::<rusqlite::Result<_>>().map_err(sql_err(conn))
    }

    /// Undeclared ids that published: (id, count, last time).
    pub fn rejected(conn: &Connection) -> Result<Vec<(String, i64, String)>> {
        let mut stmt =
            conn.prepare("SELECT id, count, last_at FROM rejected_devices ORDER BY id").map_err(sql_err(conn))?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).map_err(sql_err(conn))?;
        rows.collect::<rusqlite::Result<_>>().map_err(sql_err(conn))
    }

    /// One device's history since `since` (RFC 3339), oldest first: (at, `state` or
    /// `availability`, the value).
    pub fn history(conn: &Connection, device: &str, since: &str) -> Result<Vec<(String, String, String)>> {
        let mut stmt = conn
            .prepare("SELECT at, kind, value FROM history WHERE device = ?1 AND at >= ?2 ORDER BY id LIMIT 10000")
            .map_err(sql_err(conn))?;
        let rows = stmt.query_map([device, since], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).map_err(sql_err(conn))?;
        rows.collect::<rusqlite::Result<_>>().map_err(sql_err(conn))
    }

    /// A counter's value (0 if never counted).
    pub fn counter(conn: &Connection, name: &str) -> Result<i64> {
        conn.query_row("SELECT value FROM counters WHERE name = ?1", [name], |r| r.get(0))
            .optional()
            .map(Option::unwrap_or_default)
            .map_err(sql_err(conn))
    }
}

/// Copies the database to `dest` with SQLite's online backup API: consistent while the hub runs.
///
/// `dest` is created new, mode 0600, before a byte is written (it holds password hashes): an
/// existing file is never overwritten, and no other user can open it in between.
pub fn backup(conn: &Connection, dest: &Path) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let e = |source| StoreError::Sqlite { path: dest.to_owned(), source };
    let created = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(dest);
    match created {
        Ok(file) => drop(file),
        Err(io) if io.kind() == std::io::ErrorKind::AlreadyExists => return Err(StoreError::Exists(dest.to_owned())),
        Err(io) => return Err(e(rusqlite::Error::ToSqlConversionFailure(Box::new(io)))),
    }
    conn.backup(rusqlite::MAIN_DB, dest, None).map_err(e)
}

/// The alarm: its snapshot (written with [`Store::durable`]) and the users' alarm codes.
pub mod alarm {
    use super::*;
    use rusqlite::{params, OptionalExtension};

    /// A snapshot rewritten while a delay runs (the time left), handed to the periodic writer
    /// ([`crate::devices::run`]) rather than written on its own: it shares the writer's transaction,
    /// which is not fsynced. A state change is saved durably instead, with [`save_durable`]; a
    /// checkpoint taken before the last durable save is stale and never written over it.
    #[derive(Debug, Clone)]
    pub struct Checkpoint {
        /// How many durable saves the driver had made when it took this checkpoint.
        pub generation: u64,
        /// The snapshot (JSON).
        pub json: String,
        /// The generation of the last durable save, shared with the driver.
        pub saved: Arc<AtomicU64>,
    }

    /// Saves a state change (inside [`Store::durable`]) as generation `generation`.
    pub fn save_durable(conn: &Connection, snapshot_json: &str, generation: u64, saved: &AtomicU64) -> Result<()> {
        save(conn, snapshot_json)?;
        saved.fetch_max(generation, Ordering::SeqCst);
        Ok(())
    }

    /// Writes `checkpoint` unless a newer durable save came after it; returns whether it wrote.
    pub fn save_checkpoint(conn: &Connection, checkpoint: &Checkpoint) -> Result<bool> {
        if checkpoint.generation < checkpoint.saved.load(Ordering::SeqCst) {
            return Ok(false);
        }
        save(conn, &checkpoint.json)?;
        Ok(true)
    }

    /// Replaces the stored snapshot (JSON); call it inside [`Store::durable`].
    pub fn save(conn: &Connection, snapshot_json: &str) -> Result<()> {
        conn.execute(
            "INSERT INTO alarm (id, snapshot, saved_at) VALUES (1, ?1, ?2)
             ON CONFLICT (id) DO UPDATE SET snapshot = excluded.snapshot, saved_at = excluded.saved_at",
            params![snapshot_json, now_rfc3339()],
        )
        .map_err(sql_err(conn))?;
        Ok(())
    }

    /// The stored snapshot (JSON), if the alarm ever saved one.
    pub fn load(conn: &Connection) -> Result<Option<String>> {
        conn.query_row("SELECT snapshot FROM alarm WHERE id = 1", [], |r| r.get(0)).optional().map_err(sql_err(conn))
    }

    /// Every user with an alarm code: (name, PHC string of the code's argon2 hash), by name.
    pub fn pin_hashes(conn: &Connection) -> Result<Vec<(String, String)>> {
        let mut stmt = conn
            .prepare("SELECT name, pin_hash FROM users WHERE pin_hash IS NOT NULL ORDER BY name")
            .map_err(sql_err(conn))?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).map_err(sql_err(conn))?;
        rows.collect::<rusqlite::Result<_>>().map_err(sql_err(conn))
    }
}

/// The event log shown by `domoticpi status`.
pub mod events {
    use super::*;

    /// How many events are kept; older ones are pruned as new ones arrive.
    const KEEP: i64 = 10_000;

    /// Appends an event (one transaction, pruning included).
    pub fn record(conn: &Connection, kind: &str, detail: &str) -> Result<()> {
        let tx = conn.unchecked_transaction().map_err(sql_err(conn))?;
        tx.execute("INSERT INTO events (at, kind, detail) VALUES (?1, ?2, ?3)", [&now_rfc3339(), kind, detail])
            .map_err(sql_err(conn))?;
        tx.execute("DELETE FROM events WHERE id <= (SELECT MAX(id) FROM events) - ?1", [KEEP])
            .map_err(sql_err(conn))?;
        tx.commit().map_err(sql_err(conn))
    }

    /// The `n` newest events, newest first: (at, kind, detail).
    pub fn latest(conn: &Connection, n: usize) -> Result<Vec<(String, String, String)>> {
        let mut stmt =
            conn.prepare("SELECT at, kind, detail FROM events ORDER BY id DESC LIMIT ?1").map_err(sql_err(conn))?;
        let rows = stmt.query_map([n as i64], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).map_err(sql_err(conn))?;
        rows.collect::<rusqlite::Result<_>>().map_err(sql_err(conn))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_outbox_keeps_order_and_drops_states_first_then_events_then_alerts() {
        use outbox::{Class, Entry};
        let dir = tempfile::tempdir().unwrap();
        let conn = open(&dir.path().join(DB_FILE)).unwrap();
        let e = |topic: &str, class| Entry { topic: topic.into(), payload: b"x".to_vec(), retain: false, class };
        let topics = |conn: &Connection| -> Vec<String> {
            outbox::after(conn, 0, 100).unwrap().into_iter().map(|r| r.entry.topic).collect()
        };
        let first = [e("s1", Class::State), e("a1", Class::Alert), e("v1", Class::Event), e("s2", Class::State)];
        assert_eq!(outbox::append(&conn, &first, 5).unwrap(), 0);
        assert_eq!(topics(&conn), ["s1", "a1", "v1", "s2"]);
        // Three more past a bound of 5: the two states go, then the oldest event.
        let more = [e("a2", Class::Alert), e("v2", Class::Event), e("a3", Class::Alert)];
        assert_eq!(outbox::append(&conn, &more, 5).unwrap(), 2);
        assert_eq!(topics(&conn), ["a1", "v1", "a2", "v2", "a3"]);
        assert_eq!(outbox::append(&conn, &[e("a4", Class::Alert)], 5).unwrap(), 1);
        assert_eq!(topics(&conn), ["a1", "a2", "v2", "a3", "a4"]);
        assert_eq!(outbox::dropped(&conn).unwrap(), 3);
        // Sent in order from a cursor; deleted once acknowledged; ids never reused.
        let rows = outbox::after(&conn, 0, 2).unwrap();
        outbox::delete(&conn, &rows.iter().map(|r| r.id).collect::<Vec<_>>()).unwrap();
        assert_eq!(topics(&conn), ["v2", "a3", "a4"]);
        let last = outbox::after(&conn, 0, 10).unwrap().last().unwrap().id;
        outbox::append(&conn, &[e("s3", Class::State)], 5).unwrap();
        assert!(outbox::after(&conn, last, 10).unwrap()[0].id > last);
        assert_eq!(outbox::depth(&conn).unwrap(), 4);
    }

    #[test]
    fn a_checkpoint_taken_before_the_last_durable_save_is_not_written_over_it() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open(&dir.path().join(DB_FILE)).unwrap();
        let saved = Arc::new(AtomicU64::new(0));
        let checkpoint =
            |generation, json: &str| alarm::Checkpoint { generation, json: json.into(), saved: saved.clone() };
        assert!(alarm::save_checkpoint(&conn, &checkpoint(0, "pending, 20 s left")).unwrap());
        alarm::save_durable(&conn, "triggered", 1, &saved).unwrap();
        // Taken while pending, reaching the store after the state changed: stale.
        assert!(!alarm::save_checkpoint(&conn, &checkpoint(0, "pending, 19 s left")).unwrap());
        assert_eq!(alarm::load(&conn).unwrap().as_deref(), Some("triggered"));
        assert!(alarm::save_checkpoint(&conn, &checkpoint(1, "triggered, 170 s left")).unwrap());
        assert_eq!(alarm::load(&conn).unwrap().as_deref(), Some("triggered, 170 s left"));
    }

    #[tokio::test]
    async fn one_batch_of_states_and_retained_messages_is_one_commit_and_reads_are_none() {
        let dir = tempfile::tempdir().unwrap();
        let (store, thread) = Store::start(&dir.path().join(DB_FILE)).unwrap();
        assert_eq!(store.commits(), 0);
        store.call(|c| device_state::all(c)).await.unwrap();
        store.call(|c| retained::all(c)).await.unwrap();
        assert_eq!(store.commits(), 0, "reads commit nothing");
        let at = now_rfc3339();
        let states: Vec<device_state::Change> = (0..50)
            .map(|n| device_state::Change::State {
                id: format!("dev-{n}"),
                json: "{\"motion\":true}".into(),
                at: at.clone(),
            })
            .collect();
        let retained: Vec<(String, Option<Vec<u8>>)> =
            (0..50).map(|n| (format!("dpi/dev-{n}/state"), Some(b"{\"motion\":true}".to_vec()))).collect();
        let saved = Arc::new(AtomicU64::new(0));
        let batch = Batch {
            states,
            retained,
            alarm: Some(alarm::Checkpoint { generation: 0, json: "{}".into(), saved }),
            prune_before: Some("2000-01-01T00:00:00Z".into()),
            outbox: vec![outbox::Entry {
                topic: "houses/h/dev-0/state".into(),
                payload: b"{}".to_vec(),
                retain: true,
                class: outbox::Class::State,
            }],
            outbox_max: 10,
            thinned: 0,
        };
        let refused = store.call(move |c| write_batch(c, &batch)).await.unwrap();
        assert!(refused.is_empty());
        assert_eq!(store.commits(), 1);
        assert_eq!(store.call(|c| device_state::all(c)).await.unwrap().len(), 50);
        assert_eq!(store.call(|c| retained::all(c)).await.unwrap().len(), 50);
        // Every other write is counted too.
        store.call(|c| events::record(c, "hub", "test")).await.unwrap();
        assert_eq!(store.commits(), 2);
        store.call(|c| lag::add(c, "slow-client", 1)).await.unwrap();
        assert_eq!(store.commits(), 3);
        drop(store);
        thread.join();
    }

    #[test]
    fn migrates_a_new_file_to_the_latest_version_in_wal_mode() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open(&dir.path().join(DB_FILE)).unwrap();
        let v: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
        assert_eq!(mode, "wal");
    }

    #[test]
    fn a_newer_database_is_refused_and_left_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DB_FILE);
        {
            let conn = Connection::open(&path).unwrap();
            conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1).unwrap();
        }
        let before = std::fs::read(&path).unwrap();
        let err = open(&path).unwrap_err();
        assert!(matches!(err, StoreError::TooNew { .. }), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), before);
        assert!(!dir.path().join("hub.db-wal").exists());
    }

    #[test]
    fn users_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open(&dir.path().join(DB_FILE)).unwrap();
        users::add(&conn, "alice", users::Role::Admin, "$argon2id$x").unwrap();
        assert!(matches!(users::add(&conn, "alice", users::Role::Resident, "h"), Err(StoreError::UserExists(_))));
        users::set_pin(&conn, "alice", "$argon2id$p").unwrap();
        let list = users::list(&conn).unwrap();
        assert_eq!(list.len(), 1);
        assert!(list[0].has_pin);
        assert_eq!(users::credentials(&conn, "alice").unwrap().unwrap().role, users::Role::Admin);
        users::remove(&conn, "alice").unwrap();
        assert!(matches!(users::remove(&conn, "alice"), Err(StoreError::NoSuchUser(_))));
    }

    #[test]
    fn the_alarm_snapshot_is_replaced_and_pins_are_listed() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open(&dir.path().join(DB_FILE)).unwrap();
        assert_eq!(alarm::load(&conn).unwrap(), None);
        alarm::save(&conn, "{\"state\":\"disarmed\"}").unwrap();
        alarm::save(&conn, "{\"state\":\"armed_away\"}").unwrap();
        assert_eq!(alarm::load(&conn).unwrap().as_deref(), Some("{\"state\":\"armed_away\"}"));
        users::add(&conn, "bob", users::Role::Resident, "$argon2id$x").unwrap();
        users::add(&conn, "alice", users::Role::Resident, "$argon2id$y").unwrap();
        users::set_pin(&conn, "alice", "$argon2id$p").unwrap();
        assert_eq!(alarm::pin_hashes(&conn).unwrap(), vec![("alice".to_owned(), "$argon2id$p".to_owned())]);
    }

    #[tokio::test]
    async fn the_async_handle_runs_jobs_on_its_thread() {
        let dir = tempfile::tempdir().unwrap();
        let (store, thread) = Store::start(&dir.path().join(DB_FILE)).unwrap();
        store.call(|c| events::record(c, "test", "hello")).await.unwrap();
        let latest = store.call(|c| events::latest(c, 5)).await.unwrap();
        assert_eq!(latest[0].2, "hello");
        drop(store);
        thread.join();
    }
}
