//! Who a client is: password hashing and the check made at every MQTT CONNECT.
//!
//! People's passwords and alarm codes are stored as argon2id PHC strings: they are guessable, so
//! checking one is deliberately slow and takes 19 MiB. Those checks run on a pool of
//! [`ARGON2_THREADS`] threads of their own, which bounds the memory and CPU a burst of connects
//! can take. Device passwords are 128 random bits issued by the hub: nobody can guess them, so a
//! salted SHA-256 is as strong and costs microseconds, which is what a fleet of devices
//! reconnecting after a power cut needs.
//!
//! Credentials are read from the database at every connect, so users added or removed with the
//! CLI while the hub runs take effect at the next connect. This module must not log a password, a
//! code or a hash.

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use sha2::Digest as _;

use crate::config::DeviceKind;
use crate::secret::Secret;
use crate::store::{devices, users, users::Role, Store, StoreError};

/// Hashes a password or alarm code into a PHC string.
pub fn hash(secret: &Secret) -> String {
    let salt = SaltString::generate(&mut OsRng);
    match Argon2::default().hash_password(secret.expose().as_bytes(), &salt) {
        Ok(hash) => hash.to_string(),
        // Only reachable with invalid parameters, and ours are the library's defaults.
        Err(e) => unreachable!("argon2 with default parameters failed: {e}"),
    }
}

/// A fresh random password for a device: 128 bits from the OS, as 32 hex digits (easy to paste
/// into an Arduino sketch).
pub fn random_secret() -> Secret {
    use argon2::password_hash::rand_core::RngCore;
    let mut bytes = [0u8; 16];
    OsRng.fill_bytes(&mut bytes);
    Secret::new(bytes.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

/// Prefix of a salted SHA-256 hash of a hub-issued random token.
const TOKEN_PREFIX: &str = "$dpi-sha256$";

/// Hashes a high-entropy token issued by the hub (a device password): salted SHA-256.
pub fn hash_token(secret: &Secret) -> String {
    use argon2::password_hash::rand_core::RngCore;
    let mut salt = [0u8; 16];
    OsRng.fill_bytes(&mut salt);
    format!("{TOKEN_PREFIX}{}${}", hex(&salt), hex(&token_digest(&salt, secret)))
}

fn token_digest(salt: &[u8], secret: &Secret) -> [u8; 32] {
    let mut h = sha2::Sha256::new();
    h.update(salt);
    h.update(secret.expose().as_bytes());
    h.finalize().into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `hash` is a token hash (fast to check) rather than an argon2 one.
fn is_token_hash(hash: &str) -> bool {
    hash.starts_with(TOKEN_PREFIX)
}

/// Whether `secret` matches `hash` (argon2 PHC string or token hash); a malformed hash never
/// matches. Argon2 is slow: call it off the runtime.
pub fn verify(hash: &str, secret: &Secret) -> bool {
    if let Some(rest) = hash.strip_prefix(TOKEN_PREFIX) {
        let Some((salt, digest)) = rest.split_once('$') else { return false };
        let Some(salt) = unhex(salt) else { return false };
        let computed = hex(&token_digest(&salt, secret));
        // Constant time: the comparison does not stop at the first difference.
        return computed.len() == digest.len()
            && computed.bytes().zip(digest.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
    }
    PasswordHash::new(hash)
        .is_ok_and(|parsed| Argon2::default().verify_password(secret.expose().as_bytes(), &parsed).is_ok())
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    (s.len() % 2 == 0).then_some(())?;
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// Threads that check argon2 hashes; each check holds 19 MiB while it runs.
pub const ARGON2_THREADS: usize = 2;

/// Password checks that may wait for those threads; more are refused at once (CONNACK 3). Two
/// threads get through a few hundred checks within a CONNECT's time, so a longer queue would
/// only hold sockets for clients that would time out anyway.
pub const PASSWORD_QUEUE: usize = 64;

type Argon2Job = Box<dyn FnOnce() + Send>;

/// The argon2 pool's queue, started on first use.
fn argon2_pool() -> &'static Mutex<mpsc::SyncSender<Argon2Job>> {
    static POOL: OnceLock<Mutex<mpsc::SyncSender<Argon2Job>>> = OnceLock::new();
    POOL.get_or_init(|| {
        let (tx, rx) = mpsc::sync_channel::<Argon2Job>(PASSWORD_QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..ARGON2_THREADS {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new().name(format!("argon2-{i}")).spawn(move || loop {
                let job = match rx.lock() {
                    Ok(rx) => rx.recv(),
                    Err(_) => return,
                };
                match job {
                    Ok(job) => job(),
                    Err(_) => return,
                }
            });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a password-checking thread");
            }
        }
        Mutex::new(tx)
    })
}

/// argon2 checks the pool has run since the process started.
static CHECKS_RUN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// argon2 checks the pool has run since the process started (cancelled ones are not run).
pub fn checks_run() -> u64 {
    CHECKS_RUN.load(std::sync::atomic::Ordering::Relaxed)
}

/// Why a password could not be checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CheckError {
    /// [`PASSWORD_QUEUE`] checks are already waiting.
    #[error("too many password checks waiting")]
    Busy,
    /// The pool's threads are gone.
    #[error("password checking is unavailable")]
    Gone,
}

/// Verifies on the argon2 pool (or at once for a token hash). Dropping the future before the
/// check starts cancels it: a client that left costs no argon2 work.
pub async fn verify_async(hash: String, secret: Secret) -> Result<bool, CheckError> {
    if is_token_hash(&hash) {
        return Ok(verify(&hash, &secret));
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job: Argon2Job = Box::new(move || {
        if !tx.is_closed() {
            CHECKS_RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let _ = tx.send(verify(&hash, &secret));
        }
    });
    match argon2_pool().lock().map_err(|_| CheckError::Gone)?.try_send(job) {
        Ok(()) => {}
        Err(mpsc::TrySendError::Full(_)) => return Err(CheckError::Busy),
        Err(mpsc::TrySendError::Disconnected(_)) => return Err(CheckError::Gone),
    }
    rx.await.map_err(|_| CheckError::Gone)
}

/// Why `name` cannot be a user's name: names become MQTT usernames and share one namespace with
/// the device ids (`is_device`) and the hub's own ids.
pub fn check_user_name(name: &str, is_device: impl Fn(&str) -> bool) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 64
        || name.chars().any(|c| c.is_control() || c.is_whitespace() || "+#/$".contains(c))
    {
        return Err(format!("user name {name:?} must be 1 to 64 characters without spaces or any of + # / $"));
    }
    if is_device(name) {
        return Err(format!("{name:?} is a device id; users and devices share one namespace"));
    }
    if crate::topics::RESERVED_IDS.contains(&name) {
        return Err(format!("{name:?} is reserved for the hub's own topics"));
    }
    Ok(())
}

/// Why `password` is too weak for a user: at least 8 characters.
pub fn check_password(password: &Secret) -> Result<(), String> {
    match password.expose().chars().count() >= 8 {
        true => Ok(()),
        false => Err("the password must be at least 8 characters".to_owned()),
    }
}

/// Why `code` is not an alarm code: 4 to 8 digits.
pub fn check_pin(code: &Secret) -> Result<(), String> {
    let digits = code.expose();
    match (4..=8).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()) {
        true => Ok(()),
        false => Err("the alarm code must be 4 to 8 digits".to_owned()),
    }
}

/// Failed logins per address; past [`Throttle::FREE_FAILURES`] in [`Throttle::WINDOW`], the
/// address waits before each answer, twice as long each time, up to [`Throttle::MAX_DELAY`].
///
/// Shared by every way in (MQTT, and the web app), so that one cannot be used to guess faster.
/// Bounded: at most [`Throttle::MAX_ADDRESSES`] addresses are remembered (the oldest forgotten).
#[derive(Debug, Default)]
pub struct Throttle {
    failures: Mutex<HashMap<IpAddr, VecDeque<Instant>>>,
    /// Each address's share of the argon2 queue.
    checks: Mutex<HashMap<IpAddr, Arc<tokio::sync::Semaphore>>>,
}

/// A password check's place in its address's share of the argon2 queue; given back on drop.
pub type CheckSlot = tokio::sync::OwnedSemaphorePermit;

impl Throttle {
    /// Failures allowed in a window before answers slow down.
    pub const FREE_FAILURES: usize = 5;
    /// The window failures are counted in.
    pub const WINDOW: Duration = Duration::from_secs(60);
    /// The longest wait before an answer.
    pub const MAX_DELAY: Duration = Duration::from_secs(30);
    /// Addresses remembered at most.
    pub const MAX_ADDRESSES: usize = 1024;
    /// Failures remembered per address (enough to reach the longest wait).
    const KEEP: usize = 16;
    /// Password checks one address may have queued or under way; its others wait their turn
    /// (under the CONNECT timeout), so a flood from one address leaves the rest of
    /// [`PASSWORD_QUEUE`] to everyone else.
    pub const CHECKS_PER_ADDRESS: usize = PASSWORD_QUEUE / 8;

    /// Waits for a place for a password check from `ip` in its address's share.
    pub async fn begin_check(&self, ip: IpAddr) -> CheckSlot {
        let share = {
            let mut checks = self.checks.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if checks.len() >= Self::MAX_ADDRESSES && !checks.contains_key(&ip) {
                // Shares nobody holds or waits for (the map's reference is the only one).
                checks.retain(|_, share| Arc::strong_count(share) > 1);
            }
            Arc::clone(
                checks.entry(ip).or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(Self::CHECKS_PER_ADDRESS))),
            )
        };
        // The semaphore is never closed.
        match share.acquire_owned().await {
            Ok(slot) => slot,
            Err(_) => unreachable!("a check share is never closed"),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, VecDeque<Instant>>> {
        self.failures.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// How long `ip` waits before its next answer, at `now`.
    pub fn delay(&self, ip: IpAddr, now: Instant) -> Duration {
        let recent =
            self.lock().get(&ip).map_or(0, |f| f.iter().filter(|t| now.duration_since(**t) < Self::WINDOW).count());
        match recent.checked_sub(Self::FREE_FAILURES) {
            None => Duration::ZERO,
            Some(over) => Duration::from_secs(1u64 << over.min(5)).min(Self::MAX_DELAY),
        }
    }

    /// Records a failed login from `ip` at `now`.
    pub fn failed(&self, ip: IpAddr, now: Instant) {
        let mut failures = self.lock();
        if !failures.contains_key(&ip) && failures.len() >= Self::MAX_ADDRESSES {
            failures.retain(|_, f| f.back().is_some_and(|t| now.duration_since(*t) < Self::WINDOW));
            if failures.len() >= Self::MAX_ADDRESSES {
                let oldest = failures.iter().min_by_key(|(_, f)| f.back().copied()).map(|(ip, _)| *ip);
                if let Some(oldest) = oldest {
                    failures.remove(&oldest);
                }
            }
        }
        let list = failures.entry(ip).or_default();
        list.push_back(now);
        while list.len() > Self::KEEP {
            list.pop_front();
        }
    }
}

/// Who an authenticated client is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// A person, with a role.
    User { name: String, role: Role },
    /// A declared device; its id is its client id and username. A device that speaks its own
    /// firmware's topics (SPEC §11) is confined to its `scope` instead of `dpi/ID/…`.
    Device { id: String, kind: DeviceKind, scope: Option<Arc<Scope>> },
}

/// The topics a client speaking for off-the-shelf devices may use (SPEC §11), as MQTT filters: it
/// may publish on a topic one of `publish` matches, and subscribe to a filter within one of
/// `subscribe`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Scope {
    /// Filters of the topics it may publish on.
    pub publish: Vec<String>,
    /// Filters it may subscribe within.
    pub subscribe: Vec<String>,
}

/// A declared device, as the authenticator sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Declared {
    /// What it is.
    pub kind: DeviceKind,
    /// The firmware topics it is confined to, if it speaks its own.
    pub scope: Option<Arc<Scope>>,
}

impl Identity {
    /// The name used in logs.
    pub fn name(&self) -> &str {
        match self {
            Identity::User { name, .. } => name,
            Identity::Device { id, .. } => id,
        }
    }
}

/// Why a CONNECT was refused; each maps to an MQTT 3.1.1 CONNACK return code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No username or password was given (CONNACK 5).
    #[error("no credentials (anonymous clients are not allowed)")]
    Anonymous,
    /// Unknown name or wrong password (CONNACK 4).
    #[error("bad username or password")]
    BadCredentials,
    /// The client id is not acceptable for this identity (CONNACK 2).
    #[error("client id not allowed: {0}")]
    ClientId(String),
    /// A device without the client certificate `require_client_cert` asks for (CONNACK 5).
    #[error("a hub-signed client certificate is required")]
    CertificateRequired,
    /// A client certificate whose CN is not a declared device (CONNACK 5).
    #[error("client certificate for {0:?}, which is not a declared device")]
    UnknownCertificate(String),
    /// A client certificate the hub no longer accepts: revoked, or replaced by a newer one (CONNACK 5).
    #[error("client certificate for {0:?} was revoked or replaced")]
    RevokedCertificate(String),
    /// The hub cannot check credentials right now (CONNACK 3).
    #[error("credentials could not be checked: {0}")]
    Unavailable(String),
}

/// A client certificate the TLS layer verified against the hub CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCert {
    /// Its subject's CN: the device id it was issued for.
    pub cn: String,
    /// SHA-256 of its DER form, as [`crate::certs::sha256_of`] prints it.
    pub sha256: String,
}

/// What a client presented at CONNECT.
#[derive(Debug, Default)]
pub struct Presented {
    /// The client id it asked for.
    pub client_id: String,
    /// Username, if any.
    pub username: Option<String>,
    /// Password, if any.
    pub password: Option<Secret>,
    /// The client certificate the TLS layer verified against the hub CA, if any.
    pub cert: Option<PeerCert>,
}

impl Presented {
    /// Whether checking these credentials takes an argon2 check (a user's password, or a name
    /// nobody has), rather than a certificate or a device token, which cost microseconds.
    pub fn is_password(&self, auth: &Authenticator) -> bool {
        self.cert.is_none() && self.username.as_ref().is_some_and(|name| (auth.devices)(name).is_none())
    }
}

/// A declared device, by id; `None` for any other name.
pub type DeviceLookup = Arc<dyn Fn(&str) -> Option<Declared> + Send + Sync>;

/// Checks the credentials of a connecting client against the config and the database.
#[derive(Clone)]
pub struct Authenticator {
    /// Where users and device passwords live.
    store: Store,
    /// The kind of a device declared now (the config may be reloaded while the hub runs).
    devices: DeviceLookup,
    /// Devices must authenticate with a client certificate.
    require_client_cert: bool,
    /// A valid hash to verify against when the name is unknown, so that a wrong name takes as
    /// long to refuse as a wrong password and names cannot be probed by timing.
    dummy_hash: String,
    /// The same for a declared device that has no credentials yet.
    dummy_token: String,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator").field("require_client_cert", &self.require_client_cert).finish_non_exhaustive()
    }
}

impl Authenticator {
    /// An authenticator for the devices `devices` finds, reading secrets from `store`.
    pub fn new(store: Store, devices: DeviceLookup, require_client_cert: bool) -> Authenticator {
        Authenticator {
            store,
            devices,
            require_client_cert,
            dummy_hash: hash(&Secret::new("not a real password")),
            dummy_token: hash_token(&Secret::new("not a real token")),
        }
    }

    /// Decides who a connecting client is, or why it is refused.
    pub async fn check(&self, p: Presented) -> Result<Identity, Refusal> {
        // A certificate signed by the hub CA (checked in the TLS handshake) names a device; the
        // hub accepts only the last one it issued for that device.
        if let Some(cert) = &p.cert {
            let cn = &cert.cn;
            let Some(Declared { kind, scope }) = (self.devices)(cn) else {
                return Err(Refusal::UnknownCertificate(cn.clone()));
            };
            let id = cn.clone();
            let current = self.lookup(move |c| devices::cert_sha256(c, &id)).await?;
            if current.as_deref() != Some(cert.sha256.as_str()) {
                return Err(Refusal::RevokedCertificate(cn.clone()));
            }
            if p.client_id != *cn || p.username.as_ref().is_some_and(|u| u != cn) {
                return Err(Refusal::ClientId(format!("a device's client id and username must be its id {cn:?}")));
            }
            return Ok(Identity::Device { id: cn.clone(), kind, scope });
        }
        let (Some(name), Some(password)) = (p.username, p.password) else {
            return Err(Refusal::Anonymous);
        };
        if let Some(Declared { kind, scope }) = (self.devices)(&name) {
            if self.require_client_cert {
                return Err(Refusal::CertificateRequired);
            }
            let id = name.clone();
            let stored = self.lookup(move |c| devices::password_hash(c, &id)).await?;
            let known = stored.is_some();
            self.verify(stored.unwrap_or_else(|| self.dummy_token.clone()), known, password).await?;
            if p.client_id != name {
                return Err(Refusal::ClientId(format!("a device's client id must be its id {name:?}")));
            }
            return Ok(Identity::Device { id: name, kind, scope });
        }
        let lookup = name.clone();
        let creds = self.lookup(move |c| users::credentials(c, &lookup)).await?;
        let role = creds.as_ref().map(|c| c.role);
        let known = creds.is_some();
        self.verify(creds.map_or_else(|| self.dummy_hash.clone(), |c| c.password_hash), known, password).await?;
        match role {
            Some(role) if (self.devices)(&p.client_id).is_none() => Ok(Identity::User { name, role }),
            Some(_) => Err(Refusal::ClientId(format!("{:?} is a device's id; users may not take it", p.client_id))),
            None => Err(Refusal::BadCredentials),
        }
    }

    async fn lookup<R, F>(&self, f: F) -> Result<Option<R>, Refusal>
    where
        R: Send + 'static,
        F: FnOnce(&rusqlite::Connection) -> Result<Option<R>, StoreError> + Send + 'static,
    {
        self.store.call(move |c| f(c)).await.map_err(|e| Refusal::Unavailable(e.to_string()))
    }

    /// Verifies `password` against `hash` off the runtime; `known` is false for a dummy hash.
    async fn verify(&self, hash: String, known: bool, password: Secret) -> Result<(), Refusal> {
        let ok = verify_async(hash, password).await.map_err(|e| Refusal::Unavailable(e.to_string()))?;
        if ok && known {
            Ok(())
        } else {
            Err(Refusal::BadCredentials)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_hashes_verify_and_differ_per_salt() {
        let t = Secret::new("0123456789abcdef0123456789abcdef");
        let (a, b) = (hash_token(&t), hash_token(&t));
        assert_ne!(a, b);
        assert!(verify(&a, &t) && verify(&b, &t));
        assert!(!verify(&a, &Secret::new("0123456789abcdef0123456789abcdee")));
        assert!(!verify("$dpi-sha256$zz$00", &t));
    }

    #[tokio::test(start_paused = true)]
    async fn one_address_waits_for_its_share_of_checks_and_another_does_not() {
        let t = Throttle::default();
        let (ip, other): (IpAddr, IpAddr) = ([10, 0, 0, 9].into(), [10, 0, 0, 8].into());
        let mut held = Vec::new();
        for _ in 0..Throttle::CHECKS_PER_ADDRESS {
            held.push(t.begin_check(ip).await);
        }
        let waits = tokio::time::timeout(Duration::from_secs(1), t.begin_check(ip)).await;
        assert!(waits.is_err(), "a ninth check from one address did not wait");
        let _other = t.begin_check(other).await;
        held.pop();
        let _next = t.begin_check(ip).await;
    }

    /// One test for the process-wide pool's queue: filled at once, or run alongside, the two
    /// halves would see each other's checks.
    #[tokio::test]
    async fn the_password_queue_is_bounded_and_forgets_clients_that_left() {
        // The pool answers.
        let h = hash(&Secret::new("pool test"));
        assert_eq!(verify_async(h.clone(), Secret::new("pool test")).await, Ok(true));
        assert_eq!(verify_async(h, Secret::new("nope")).await, Ok(false));
        // A full queue answers busy at once, and a token never waits.
        {
            let h = hash(&Secret::new("queue test"));
            let waiting: Vec<_> = (0..PASSWORD_QUEUE + ARGON2_THREADS + 8)
                .map(|_| tokio::spawn(verify_async(h.clone(), Secret::new("queue test"))))
                .collect();
            let token = Secret::new("0123456789abcdef0123456789abcdef");
            assert_eq!(verify_async(hash_token(&token), token).await, Ok(true));
            let mut busy = 0;
            for w in waiting {
                match w.await.unwrap() {
                    Err(CheckError::Busy) => busy += 1,
                    other => assert_eq!(other, Ok(true)),
                }
            }
            assert!(busy > 0, "a queue past {PASSWORD_QUEUE} was accepted");
        }
        // A check whose client left is not run.
        {
            let h = hash(&Secret::new("cancel test"));
            let before = checks_run();
            // Each check is queued (polled once), then its client leaves (the future is dropped).
            let mut left = Vec::new();
            for _ in 0..40 {
                let mut check = Box::pin(verify_async(h.clone(), Secret::new("cancel test")));
                let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
                assert!(std::future::Future::poll(check.as_mut(), &mut cx).is_pending());
                left.push(check);
            }
            drop(left);
            assert_eq!(verify_async(h, Secret::new("cancel test")).await, Ok(true));
            // The few already running when their clients left, this one, and other tests' checks.
            let run = checks_run() - before;
            assert!(run < 20, "{run} checks ran for 41 requests, 40 of them abandoned");
        }
    }

    #[test]
    fn failed_logins_slow_an_address_down_doubling_up_to_thirty_seconds() {
        let t = Throttle::default();
        let (ip, other): (IpAddr, IpAddr) = ([10, 0, 0, 9].into(), [10, 0, 0, 8].into());
        let start = Instant::now();
        let mut delays = Vec::new();
        for n in 0..12 {
            let now = start + Duration::from_secs(n);
            delays.push(t.delay(ip, now).as_secs());
            t.failed(ip, now);
        }
        assert_eq!(delays, [0, 0, 0, 0, 0, 1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(t.delay(other, start), Duration::ZERO);
        // A minute after the last failure, the address is forgiven.
        assert_eq!(t.delay(ip, start + Duration::from_secs(72)), Duration::ZERO);
        // Memory stays bounded whatever the number of addresses.
        for n in 0..(Throttle::MAX_ADDRESSES as u32 * 3) {
            t.failed(IpAddr::from(n.to_be_bytes()), start);
        }
        assert!(t.lock().len() <= Throttle::MAX_ADDRESSES);
    }

    #[test]
    fn hash_and_verify() {
        let h = hash(&Secret::new("correct horse"));
        assert!(h.starts_with("$argon2id$"));
        assert!(verify(&h, &Secret::new("correct horse")));
        assert!(!verify(&h, &Secret::new("wrong")));
        assert!(!verify("not a hash", &Secret::new("correct horse")));
    }
}
