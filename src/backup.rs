//! The whole hub in one file (SPEC §2, `backup` and `restore`): what a dead SD card would take.
//!
//! An archive is a tar file holding `MANIFEST` (what it is, the schema, when), `hub.db` (a
//! consistent copy taken with SQLite's backup API while the hub runs), the whole `certs/` folder
//! (the CA key included, so every device keeps trusting a restored hub and keeps its certificate)
//! and `domoticpi.toml`, the config in use, when there is one. It is created new (never over an
//! existing file) with mode 0600 before any byte is written: it holds the CA key and password
//! hashes.
//!
//! Restoring refuses to run beside a running hub, and into a data dir that holds anything unless
//! forced. Only those names are taken from an archive (regular files, no links, no `..`), and the
//! modes are the hub's own, whatever the archive says: the data dir and `certs/` 0700, keys and the
//! database 0600. The database must pass `integrity_check` before the hub would use it.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Component, Path, PathBuf};

use crate::config::Config;
use crate::store;

/// The first line of every archive's manifest.
const MAGIC: &str = "domoticpi backup 1";
/// The config's name inside an archive.
const CONFIG: &str = "domoticpi.toml";
/// Where `restore` writes the config an archive held, in the data dir.
pub const RESTORED_CONFIG: &str = "domoticpi.toml.restored";

/// Why a backup or a restore failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{0} exists already; a backup never replaces a file")]
    Exists(PathBuf),
    #[error("no database at {0}; nothing to back up")]
    NoDatabase(PathBuf),
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: io::Error },
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("{0} is not a DomoticPi backup ({1})")]
    NotABackup(PathBuf, String),
    #[error("the hub is running on {0}; stop it (systemctl stop domoticpi) before restoring")]
    Running(PathBuf),
    #[error(
        "{0} is not empty; restore into an empty data dir, or pass --force to replace its database and certificates"
    )]
    NotEmpty(PathBuf),
    #[error("the database in {0} is damaged: {1}")]
    Damaged(PathBuf, String),
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> BackupError + '_ {
    move |error| BackupError::Io { path: path.to_owned(), error }
}

/// What went into an archive.
#[derive(Debug)]
pub struct Written {
    /// Files in it, the manifest included.
    pub files: usize,
    /// Its size in bytes.
    pub bytes: u64,
}

/// Writes the hub of `config` into a new archive at `dest`.
pub fn create(config: &Config, dest: &Path) -> Result<Written, BackupError> {
    let db = crate::hub::db_path(&config.data_dir);
    if !db.exists() {
        return Err(BackupError::NoDatabase(db));
    }
    let file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(dest).map_err(|e| match e.kind() {
        io::ErrorKind::AlreadyExists => BackupError::Exists(dest.to_owned()),
        _ => BackupError::Io { path: dest.to_owned(), error: e },
    })?;
    let result = write_archive(config, &db, file, dest);
    if result.is_err() {
        // A half-written archive is worse than none: it would look like a backup.
        let _ = fs::remove_file(dest);
    }
    result
}

fn write_archive(config: &Config, db: &Path, file: File, dest: &Path) -> Result<Written, BackupError> {
    // The database copy goes through a file of its own (SQLite's backup API writes a database),
    // beside the archive, owner-only, removed whatever happens.
    let copy = dest.with_file_name(format!(
        ".{}.hub-db.{}",
        dest.file_name().map_or_else(|| "backup".into(), |n| n.to_string_lossy()),
        std::process::id()
    ));
    let conn = store::open(db)?;
    let _ = fs::remove_file(&copy);
    let taken = store::backup(&conn, &copy);
    drop(conn);
    let written = taken.map_err(BackupError::from).and_then(|()| {
        let mut tar = tar::Builder::new(io::BufWriter::new(file));
        tar.mode(tar::HeaderMode::Deterministic);
        let mut files = 0;
        let manifest = format!(
            "{MAGIC}\nschema: {}\ncreated: {}\nconfig: {}\n",
            store::SCHEMA_VERSION,
            store::rfc3339(crate::wall::now_utc()),
            config.source.as_ref().map_or_else(|| "built-in defaults".to_owned(), |p| p.display().to_string())
        );
        append_bytes(&mut tar, "MANIFEST", manifest.as_bytes(), 0o600, dest)?;
        files += 1;
        tar.append_path_with_name(&copy, "hub.db").map_err(io_at(dest))?;
        files += 1;
        files += append_dir(&mut tar, &config.data_dir.join("certs"), Path::new("certs"), dest)?;
        if let Some(source) = &config.source {
            let text = fs::read(source).map_err(io_at(source))?;
            append_bytes(&mut tar, CONFIG, &text, 0o600, dest)?;
            files += 1;
        }
        let mut out = tar.into_inner().map_err(io_at(dest))?;
        out.flush().map_err(io_at(dest))?;
        let file = out.into_inner().map_err(|e| BackupError::Io { path: dest.to_owned(), error: e.into_error() })?;
        file.sync_all().map_err(io_at(dest))?;
        let bytes = file.metadata().map_err(io_at(dest))?.len();
        Ok(Written { files, bytes })
    });
    let _ = fs::remove_file(&copy);
    written
}

fn append_bytes<W: Write>(
    tar: &mut tar::Builder<W>,
    name: &str,
    bytes: &[u8],
    mode: u32,
    dest: &Path,
) -> Result<(), BackupError> {
    let mut header = tar::Header::new_gnu();
    header.set_size(bytes.len() as u64);
    header.set_mode(mode);
    header.set_entry_type(tar::EntryType::Regular);
    tar.append_data(&mut header, name, bytes).map_err(io_at(dest))
}

/// Appends the regular files under `dir` (recursively) as `name/…`; returns how many.
fn append_dir<W: Write>(tar: &mut tar::Builder<W>, dir: &Path, name: &Path, dest: &Path) -> Result<usize, BackupError> {
    let mut files = 0;
    let mut entries: Vec<_> = fs::read_dir(dir).map_err(io_at(dir))?.collect::<Result<_, _>>().map_err(io_at(dir))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let (path, kind) = (entry.path(), entry.file_type().map_err(io_at(dir))?);
        let inner = name.join(entry.file_name());
        if kind.is_dir() {
            files += append_dir(tar, &path, &inner, dest)?;
        } else if kind.is_file() {
            tar.append_path_with_name(&path, &inner).map_err(io_at(dest))?;
            files += 1;
        }
    }
    Ok(files)
}

/// What a restore put back.
#[derive(Debug)]
pub struct Restored {
    /// Files written into the data dir.
    pub files: usize,
    /// Where the config the archive held was written, if it held one.
    pub config: Option<PathBuf>,
    /// The manifest's lines after the first.
    pub manifest: String,
}

/// Puts the archive at `archive` back into `data_dir`.
pub fn restore(archive: &Path, data_dir: &Path, force: bool) -> Result<Restored, BackupError> {
    if crate::control::request(data_dir, &crate::control::Request::Stats).is_ok() {
        return Err(BackupError::Running(data_dir.to_owned()));
    }
    let not_a_backup = |why: &str| BackupError::NotABackup(archive.to_owned(), why.to_owned());
    let mut entries = read_archive(archive)?;
    let manifest = match entries.iter().position(|(name, _)| name == Path::new("MANIFEST")) {
        Some(i) => String::from_utf8_lossy(&entries.remove(i).1).into_owned(),
        None => return Err(not_a_backup("no MANIFEST")),
    };
    if manifest.lines().next() != Some(MAGIC) {
        return Err(not_a_backup("its MANIFEST is not one"));
    }
    if !entries.iter().any(|(name, _)| name == Path::new("hub.db")) {
        return Err(not_a_backup("no hub.db"));
    }
    let occupied = fs::read_dir(data_dir).map(|mut d| d.next().is_some()).unwrap_or(false);
    if occupied && !force {
        return Err(BackupError::NotEmpty(data_dir.to_owned()));
    }
    fs::create_dir_all(data_dir).map_err(io_at(data_dir))?;
    fs::set_permissions(data_dir, fs::Permissions::from_mode(0o700)).map_err(io_at(data_dir))?;
    // The database is checked before anything in the data dir is replaced.
    let checking = data_dir.join("hub.db.restoring");
    let _ = fs::remove_file(&checking);
    if let Some((_, bytes)) = entries.iter().find(|(name, _)| name == Path::new("hub.db")) {
        write_new(&checking, bytes, 0o600)?;
    }
    if let Err(e) = integrity(&checking) {
        let _ = fs::remove_file(&checking);
        return Err(e);
    }
    // Forced: what the archive replaces goes first (the WAL of another database must not be
    // replayed into this one; another CA's certificates must not linger).
    for stale in ["hub.db", "hub.db-wal", "hub.db-shm", RESTORED_CONFIG] {
        let _ = fs::remove_file(data_dir.join(stale));
    }
    let certs = data_dir.join("certs");
    if certs.exists() {
        fs::remove_dir_all(&certs).map_err(io_at(&certs))?;
    }
    let mut config = None;
    let mut files = 0;
    for (name, bytes) in entries {
        let target = if name == Path::new(CONFIG) {
            let at = data_dir.join(RESTORED_CONFIG);
            config = Some(at.clone());
            at
        } else {
            data_dir.join(&name)
        };
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent).map_err(io_at(parent))?;
            fs::set_permissions(parent, fs::Permissions::from_mode(0o700)).map_err(io_at(parent))?;
        }
        if name == Path::new("hub.db") {
            fs::rename(&checking, &target).map_err(io_at(&target))?;
        } else {
            let public = name.extension().is_some_and(|e| e == "pem");
            write_new(&target, &bytes, if public { 0o644 } else { 0o600 })?;
        }
        files += 1;
    }
    let manifest = manifest.lines().skip(1).collect::<Vec<_>>().join(", ");
    Ok(Restored { files, config, manifest })
}

/// Writes `bytes` to a new file at `path` with `mode`, synced.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), BackupError> {
    let mut file = OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(io_at(path))?;
    file.write_all(bytes).and_then(|()| file.sync_all()).map_err(io_at(path))
}

/// Whether the database at `db` passes `integrity_check`.
fn integrity(db: &Path) -> Result<(), BackupError> {
    let damaged = |why: String| BackupError::Damaged(db.to_owned(), why);
    let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY;
    let conn = rusqlite::Connection::open_with_flags(db, flags).map_err(|e| damaged(e.to_string()))?;
    match conn.query_row("PRAGMA integrity_check", [], |r| r.get::<_, String>(0)) {
        Ok(ok) if ok == "ok" => Ok(()),
        Ok(problem) => Err(damaged(problem)),
        Err(e) => Err(damaged(e.to_string())),
    }
}

/// The allowed entries of an archive: (relative path, bytes).
fn read_archive(archive: &Path) -> Result<Vec<(PathBuf, Vec<u8>)>, BackupError> {
    let not_a_backup = |why: String| BackupError::NotABackup(archive.to_owned(), why);
    let file = File::open(archive).map_err(io_at(archive))?;
    let mut tar = tar::Archive::new(io::BufReader::new(file));
    let mut out = Vec::new();
    for entry in tar.entries().map_err(|e| not_a_backup(e.to_string()))? {
        let mut entry = entry.map_err(|e| not_a_backup(e.to_string()))?;
        let name = entry.path().map_err(|e| not_a_backup(e.to_string()))?.into_owned();
        let plain = name.components().all(|c| matches!(c, Component::Normal(_)));
        let known = name == Path::new("MANIFEST")
            || name == Path::new("hub.db")
            || name == Path::new(CONFIG)
            || name.starts_with("certs");
        if !plain || !known {
            return Err(not_a_backup(format!("it holds {}", name.display())));
        }
        match entry.header().entry_type() {
            tar::EntryType::Regular => {
                let mut bytes = Vec::with_capacity(usize::try_from(entry.size()).unwrap_or(0));
                entry.read_to_end(&mut bytes).map_err(|e| not_a_backup(e.to_string()))?;
                out.push((name, bytes));
            }
            tar::EntryType::Directory => {}
            other => return Err(not_a_backup(format!("{} is a {other:?}, not a file", name.display()))),
        }
    }
    Ok(out)
}
