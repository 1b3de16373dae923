//! The supervisor: prepares the data dir, starts the store, the broker and its listeners, announces
//! the hub, and shuts everything down in order.
//!
//! [`run`] takes its config, already-bound listeners and a cancellation token, so a test starts a
//! whole hub in-process on port 0 with its own temp dir, and `main` passes SIGTERM/Ctrl-C.
//!
//! Start: data dir (0700), certificates (re-issued when names changed), database, TLS config, the
//! store thread, the router and the hub's link, the lag recorder; the stored retained messages are
//! republished (each through the router boundary's check; a row it refuses is skipped and logged);
//! the house side ([`Dispatcher::start`]: the light and alarm drivers, the alarm after the replay so
//! that its state is published last, the writer, every declared device `offline`); the control
//! socket; the listeners; `online` on `dpi/hub/status` (ready once the router routed it back); the
//! start recorded; `READY=1`; 10 s later, the start-up code unmapped (`unmap_start_up_code`).
//!
//! Everything runs on one [`TaskTracker`] and stops on one [`CancellationToken`], except the link
//! reader, whose end is the router's death. Shutdown, on SIGTERM or Ctrl-C (or when the router
//! dies), bounded so that the hub exits within 5 s: publish `offline` on `dpi/hub/status` and wait
//! up to 500 ms for the router to route it back (it is then queued for every subscriber); cancel the
//! token: the listeners stop, every session writes what the router queued for it (up to 250 ms),
//! announces its device `offline` and closes, the control socket and the background loops end; drop
//! the hub's link. The drivers and the writer hold no token: they end once the last handle on them
//! is gone (sessions, control socket, link), the writer after a last write. Wait up to 3 s for all
//! of it; record the stop; join the store thread, which runs the jobs still queued and checkpoints
//! the WAL.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::auth::Authenticator;
use crate::broker::dispatch::Outbox;
use crate::broker::{self, HubLink, Limits, Shared};
use crate::certs::{self, CertPaths};
use crate::config::Config;
use crate::dispatcher::{Dispatcher, House};
use crate::reload::Reloader;
use crate::store::{self, Store};
use crate::topics;

/// The writer's `[store]` settings, which a reload changes.
type StoreSettings = tokio::sync::watch::Sender<crate::config::Store>;

/// How long shutdown waits for sessions, drivers and the writer (SPEC: exit within 5 s).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// Why the hub could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The data dir or its certificates could not be prepared.
    #[error(transparent)]
    Certs(#[from] certs::CertError),
    /// The TLS configuration could not be built.
    #[error(transparent)]
    Tls(#[from] broker::tls::TlsError),
    /// The database could not be opened or written.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// A listener could not be bound.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind { addr: SocketAddr, what: &'static str, source: std::io::Error },
    /// The broker failed.
    #[error(transparent)]
    Broker(#[from] broker::BrokerError),
}

/// The hub's listeners, bound before [`run`] so that a port in use is reported at once.
#[derive(Debug)]
pub struct Listeners {
    /// The TLS listener.
    pub tls: TcpListener,
    /// The optional plain listener.
    pub plain: Option<TcpListener>,
    /// The web app's HTTPS listener, unless turned off.
    pub web: Option<TcpListener>,
}

impl Listeners {
    /// Binds the listeners the config asks for.
    pub async fn bind(config: &Config) -> Result<Listeners, HubError> {
        let bind = |addr: SocketAddr, what: &'static str| async move {
            TcpListener::bind(addr).await.map_err(|source| HubError::Bind { addr, what, source })
        };
        let tls = bind(config.broker.tls_listen, "TLS listener, broker.tls_listen").await?;
        let plain = match config.broker.plain_listen {
            Some(addr) => Some(bind(addr, "plain listener, broker.plain_listen").await?),
            None => None,
        };
        let web = match config.web {
            Some(addr) => Some(bind(addr, "web app, web.listen").await?),
            None => None,
        };
        Ok(Listeners { tls, plain, web })
    }
}

/// Creates the data dir (0700), the CA and server certificate, and the database; idempotent.
pub fn init(config: &Config) -> Result<(), HubError> {
    certs::create_private_dir(&config.data_dir)?;
    let paths = CertPaths::new(&config.data_dir);
    let names = certs::wanted_names(&config.broker.server_names, config.broker.tls_listen);
    let outcome = certs::ensure(&paths, &names)?;
    if outcome.created_ca {
        info!(path = %paths.ca_cert.display(), "created the hub CA");
    }
    if outcome.issued_server {
        let list: Vec<String> = names.iter().map(ToString::to_string).collect();
        info!(path = %paths.server_cert.display(), names = %list.join(", "), "issued the server certificate");
    }
    store::open(&db_path(&config.data_dir))?;
    Ok(())
}

/// The database file under a data dir.
pub fn db_path(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join(store::DB_FILE)
}

/// Runs the hub until `shutdown` is cancelled (or the router dies, which is an error).
pub async fn run(config: Config, listeners: Listeners, shutdown: CancellationToken) -> Result<(), HubError> {
    init(&config)?;
    let mut hub = Hub::start(config, listeners).await?;
    let failure = tokio::select! {
        () = shutdown.cancelled() => None,
        ended = &mut hub.router => {
            let reason = ended.map_or_else(|e| e.to_string(), |e| e.to_string());
            error!(%reason, "the MQTT router stopped; exiting so that the service manager restarts the hub");
            Some(HubError::Broker(broker::BrokerError::RouterGone))
        }
    };
    hub.stop().await;
    failure.map_or(Ok(()), Err)
}

/// What the broker's sessions share that the supervisor made first.
struct BrokerParts {
    router: broker::RouterHandle,
    retained: broker::RetainedSink,
    /// Failed logins per address, shared with the web app's sign-in.
    throttle: Arc<crate::auth::Throttle>,
}

/// The running hub, as the supervisor holds it: what it needs to stop, and nothing that keeps the
/// house running (the drivers end when every handle on them is gone).
struct Hub {
    /// Cancelled to stop: listeners, sessions, the control socket, the background loops.
    closing: CancellationToken,
    /// Every task of the hub but the link reader.
    tasks: TaskTracker,
    /// Reads what the router sends the hub's link; it ends only if the router dies.
    router: tokio::task::JoinHandle<broker::BrokerError>,
    /// The hub's own link, for its status.
    link: HubLink,
    /// What the router routes back to the hub's link: its own status, to know it was routed, and
    /// the health probe's messages.
    echo: Arc<tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<broker::Message>>>,
    /// Client ids and connections, for the shutdown log.
    sessions: Arc<broker::sessions::Sessions>,
    /// The database, and the thread to join once every handle is gone.
    store: Option<(Store, store::StoreThread)>,
}

impl Hub {
    /// Starts everything in the order of the module doc; returns once the hub is ready.
    async fn start(config: Config, mut listeners: Listeners) -> Result<Hub, HubError> {
        crate::wall::set_from_test_env();
        let paths = CertPaths::new(&config.data_dir);
        let acceptor = TlsAcceptor::from(broker::tls::server_config(&paths)?);
        let (store, store_thread) = Store::start(&db_path(&config.data_dir))?;
        let (closing, tasks) = (CancellationToken::new(), TaskTracker::new());

        // Clients that lost messages: clean sessions' full mailboxes, and the router's skips
        // (reported process-wide, to the first hub of the process).
        let (lagging, skipped) = tokio::sync::mpsc::unbounded_channel();
        if let Some(mut router_skipped) = broker::lag::skipped_clients() {
            let lagging = lagging.clone();
            tasks.spawn(closing.clone().run_until_cancelled_owned(async move {
                while let Some(client) = router_skipped.recv().await {
                    let _ = lagging.send(client);
                }
            }));
        }
        let router = broker::start_router(config.broker.max_connections, lagging)?;
        let (retained, retained_rx) = tokio::sync::mpsc::unbounded_channel();
        let (link, echo, reader) = HubLink::connect(&router, retained.clone())?;
        let echo = Arc::new(tokio::sync::Mutex::new(echo));
        let router_task = tokio::spawn(reader.run());
        let sessions = broker::sessions::Sessions::new(config.broker.max_connections).under(&closing);
        tasks.spawn(closing.clone().run_until_cancelled_owned(record_lag(
            store.clone(),
            skipped,
            Arc::clone(&sessions),
        )));
        restore_retained(&store, &link).await?;

        // The house side. The alarm starts after the retained replay above, so that its state
        // is published last.
        let house = House::new(config);
        let config = Arc::clone(&house.config);
        let (outbox, bridge, remote) = match &config.bridge {
            Some(bridge) => {
                let started = crate::bridge::start(bridge, &router, &store, &tasks, &closing)?;
                (started.outbox, Some(started.status), Some(started.commands))
            }
            None => (crate::devices::OutboxInput::none(), None, None),
        };
        let writer = (retained_rx, outbox);
        let (dispatcher, settings) = Dispatcher::start(house, &store, Outbox::new(link.clone()), writer, &tasks);
        if let Some(commands) = remote {
            tasks.spawn(commands.run(Arc::new(dispatcher.clone())));
        }
        let probes = crate::health::Probes {
            link: link.clone(),
            echo: Arc::clone(&echo),
            store: store.clone(),
            alarm: dispatcher.alarm(),
        };
        let mut hub = Hub { closing, tasks, router: router_task, link, echo, sessions, store: None };
        let faults = std::env::var(crate::health::FAULTS_ENV).is_ok_and(|v| v == "1").then(|| probes.clone());
        hub.serve_control(&config, &store, &dispatcher, (settings, bridge, faults));
        let throttle = Arc::new(crate::auth::Throttle::default());
        if let Some(web) = listeners.web.take() {
            let parts = crate::web::Parts {
                store: store.clone(),
                dispatcher: dispatcher.clone(),
                throttle: Arc::clone(&throttle),
                sessions: Arc::clone(&hub.sessions),
            };
            crate::web::start((web, acceptor.clone()), &router, parts, &hub.tasks, &hub.closing)?;
        }
        let parts = BrokerParts { router, retained, throttle };
        let (tls_addr, plain_addr) = hub.accept_clients(&config, (listeners, acceptor), parts, &store, dispatcher);
        hub.announce("online", Duration::from_secs(1)).await;
        let (tls_text, plain_text) = (tls_addr.to_string(), plain_addr.map(|a| a.to_string()));
        store
            .call(move |c| {
                store::runtime::started(c, &tls_text, plain_text.as_deref())?;
                store::events::record(c, "hub", "started")
            })
            .await?;
        hub.store = Some((store, store_thread));
        info!(tls = %tls_addr, plain = %plain_addr.map_or_else(|| "off".to_owned(), |a| a.to_string()), "hub ready: listeners accepting");
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
        hub.tasks.spawn(hub.closing.clone().run_until_cancelled_owned(async {
            tokio::time::sleep(START_UP_SETTLES).await;
            let unmapped = tokio::task::spawn_blocking(unmap_start_up_code).await;
            if let Ok(Some((before, after))) = unmapped {
                tracing::debug!(before_kib = before, after_kib = after, "start-up code unmapped");
            }
        }));
        if let Some(period) = watchdog_period() {
            info!(?period, "watchdog: pinged while the router, the store and the alarm answer");
            hub.tasks.spawn(hub.closing.clone().run_until_cancelled_owned(crate::health::run(probes, period)));
        }
        Ok(hub)
    }

    /// Opens the control socket (`domoticpi alarm`, `status`, `reload`, `device revoke`).
    fn serve_control(
        &self,
        config: &Config,
        store: &Store,
        dispatcher: &Dispatcher,
        (settings, bridge, faults): (StoreSettings, Option<crate::bridge::SharedStatus>, Option<crate::health::Probes>),
    ) {
        match crate::control::bind(&config.data_dir) {
            Ok((listener, path)) => {
                let sessions = Arc::clone(&self.sessions);
                let reloader = Reloader::new(dispatcher.clone(), Arc::clone(&sessions), store.clone(), settings);
                let handles = crate::control::Handles {
                    alarm: dispatcher.alarm(),
                    store: store.clone(),
                    sessions,
                    started: std::time::Instant::now(),
                    reloader: Arc::new(reloader),
                    bridge,
                    faults,
                };
                self.tasks.spawn(crate::control::serve(listener, path, handles, self.closing.clone()));
            }
            Err(e) => warn!(error = %e, "no control socket: `domoticpi alarm` and `reload` cannot reach this hub"),
        }
    }

    /// Starts accepting clients: the broker's shared state, with the dispatcher as the house behind
    /// it, and an accept loop per listener. Returns the listeners' addresses.
    fn accept_clients(
        &self,
        config: &Config,
        (listeners, acceptor): (Listeners, TlsAcceptor),
        BrokerParts { router, retained, throttle }: BrokerParts,
        store: &Store,
        dispatcher: Dispatcher,
    ) -> (SocketAddr, Option<SocketAddr>) {
        let lookup = dispatcher.clone();
        let devices: crate::auth::DeviceLookup = Arc::new(move |id| lookup.declared(id));
        let shared = Arc::new(Shared {
            router,
            auth: Authenticator::new(store.clone(), devices, config.broker.require_client_cert),
            throttle,
            admission: broker::admission::Admission::new(config.broker.max_connections),
            sessions: Arc::clone(&self.sessions),
            limits: Limits {
                max_connections: config.broker.max_connections,
                max_payload_bytes: config.broker.max_payload_bytes,
            },
            ended: AtomicUsize::new(0),
            hub: self.link.clone(),
            closing: self.closing.clone(),
            retained,
            house: Arc::new(dispatcher),
        });
        let (tasks, closing) = (&self.tasks, &self.closing);
        let addrs = (local_addr(&listeners.tls), listeners.plain.as_ref().map(local_addr));
        tasks.spawn(broker::serve(listeners.tls, Some(acceptor), Arc::clone(&shared), tasks.clone(), closing.clone()));
        if let Some(plain) = listeners.plain {
            tasks.spawn(broker::serve(plain, None, Arc::clone(&shared), tasks.clone(), closing.clone()));
        }
        let ended = move || shared.ended.load(Ordering::Relaxed);
        tasks.spawn(closing.clone().run_until_cancelled_owned(trim_memory(ended, TRIM_EVERY, release_free_memory)));
        addrs
    }

    /// Publishes the hub's status (retained) and waits, at most `wait`, for the router to route it
    /// back to the hub's own link: it is then in place for every subscriber.
    async fn announce(&mut self, status: &'static str, wait: Duration) {
        let link = &self.link;
        link.subscribe(topics::HUB_STATUS);
        link.publish(topics::HUB_STATUS, status, true);
        let routed = tokio::time::timeout(wait, async {
            let mut echo = self.echo.lock().await;
            while let Some(m) = echo.recv().await {
                if m.topic == topics::HUB_STATUS && m.payload == status.as_bytes() {
                    return;
                }
            }
        });
        if routed.await.is_err() {
            warn!(status, "hub status not confirmed by the router");
        }
    }

    /// Stops in the order of the module doc, within [`SHUTDOWN_GRACE`] and a little more.
    async fn stop(mut self) {
        info!("hub stopping");
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
        self.announce("offline", Duration::from_millis(500)).await;
        self.closing.cancel();
        // The drivers and the writer end once the sessions, the control socket and this link,
        // which hold the last handles on them, are gone.
        drop(self.link);
        self.tasks.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, self.tasks.wait()).await.is_err() {
            warn!(sessions = self.sessions.connected(), "the hub's tasks did not all stop in time");
        }
        self.router.abort();
        let Some((store, thread)) = self.store.take() else { return };
        let recorded = store
            .call(|c| {
                store::runtime::stopped(c)?;
                store::events::record(c, "hub", "stopped")
            })
            .await;
        if let Err(e) = recorded {
            warn!(error = %e, "could not record the stop");
        }
        let commits = store.commits();
        drop(store);
        // The store thread runs the jobs still queued and checkpoints the WAL once the last handle is gone.
        let joined = tokio::time::timeout(Duration::from_secs(1), tokio::task::spawn_blocking(move || thread.join()));
        if joined.await.is_err() {
            warn!("the store did not close in time");
        }
        info!(store_commits = commits, "hub stopped");
    }
}

/// Republishes the retained messages stored by the last run. Each goes through the router
/// boundary's check first: a row it refuses (written by an older hub, or damaged) is skipped and
/// logged, so that nothing stored can stop a start.
async fn restore_retained(store: &Store, hub: &HubLink) -> Result<(), HubError> {
    let rows = store.call(|c| store::retained::all(c)).await?;
    let (mut restored, mut skipped) = (0, 0);
    for (topic, payload) in rows {
        match broker::guard::topic(&topic) {
            Ok(topic) if !payload.is_empty() => {
                hub.restore(topic.to_owned(), payload.into());
                restored += 1;
            }
            Ok(topic) => warn!(topic = %broker::guard::shown(topic), "stored retained message skipped: empty payload"),
            Err(reason) => {
                skipped += 1;
                let shown = broker::guard::shown(&String::from_utf8_lossy(&topic));
                warn!(topic = %shown, %reason, "stored retained message skipped: the router cannot take its topic");
            }
        }
    }
    info!(count = restored, skipped, "restored retained messages");
    Ok(())
}

/// Logs the first skip-ahead per client and keeps counts for `domoticpi status`. The router names
/// clients by the ids the hub gave it; the log and the table use the clients' own.
async fn record_lag(
    store: Store,
    mut skipped: tokio::sync::mpsc::UnboundedReceiver<String>,
    sessions: Arc<broker::sessions::Sessions>,
) {
    let mut seen = std::collections::HashSet::new();
    let name = |router_id: String| sessions.client_of(&router_id).unwrap_or(router_id);
    while let Some(client) = skipped.recv().await {
        let mut counts: HashMap<String, u64> = HashMap::from([(name(client), 1)]);
        while let Ok(more) = skipped.try_recv() {
            *counts.entry(name(more)).or_default() += 1;
        }
        for (client, n) in counts {
            if seen.insert(client.clone()) {
                warn!(%client, "client reads too slowly: messages for it were dropped (see domoticpi status)");
            }
            if let Err(e) = store.call(move |c| store::lag::add(c, &client, n)).await {
                warn!(error = %e, "could not record a slow client");
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn local_addr(listener: &TcpListener) -> SocketAddr {
    listener.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
}

/// How often the memory trimmer looks whether clients went away.
const TRIM_EVERY: Duration = Duration::from_secs(10);

/// Gives freed heap memory back to the kernel, at most every 10 s and only after sessions ended.
///
/// glibc keeps freed memory in its per-thread arenas and returns on its own only what sits at the
/// top of a heap. Sessions end on any thread, so after 1,000 idle TLS clients had disconnected the
/// hub stayed at 63 MiB resident, and each new round of 1,000 client ids added about 13 MiB more.
/// `malloc_trim` releases the free pages inside the arenas (21 MiB after they left, and no growth
/// from round to round). It takes the arenas' locks for a few milliseconds, so it runs on the
/// blocking pool, and only when there is something to give back.
///
/// `ended` counts the sessions ended so far; `release` gives the memory back (every `period` at most).
async fn trim_memory(ended: impl Fn() -> usize, period: Duration, release: fn()) {
    let mut seen = ended();
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = ended();
        if now == seen {
            continue;
        }
        seen = now;
        let _ = tokio::task::spawn_blocking(release).await;
    }
}

/// Returns the free pages of every malloc arena to the kernel (glibc only; elsewhere nothing).
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let (before, started) = (resident_kib(), std::time::Instant::now());
        // SAFETY: malloc_trim only walks the allocator's own free lists, under its locks.
        unsafe {
            libc::malloc_trim(0);
        }
        tracing::debug!(before_kib = before, after_kib = resident_kib(), took = ?started.elapsed(), "freed memory returned to the kernel");
    }
}

/// The allocator's heap in KiB: (in use, freed but held in its arenas); zeros where unknown.
pub fn heap_kib() -> (u64, u64) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 only reads the allocator's counters, under its locks.
        let info = unsafe { libc::mallinfo2() };
        let kib = |bytes: usize| u64::try_from(bytes / 1024).unwrap_or(u64::MAX);
        (kib(info.uordblks + info.hblkhd), kib(info.fordblks))
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        (0, 0)
    }
}

/// This process's resident set in KiB (0 when unknown), for the trimmer's log line.
fn resident_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// How long after `READY=1` the start-up's last echoes (the first writes, the alarm's and the
/// devices' first announcements) are over, and its code is unmapped.
const START_UP_SETTLES: Duration = Duration::from_secs(10);

/// Drops the hub's page mappings of its own code once it has started; returns the code's resident
/// KiB before and after.
///
/// Starting touches code that never runs again (the command line, the config, certificates,
/// migrations, each part's set-up), and the kernel maps 64 KiB around every page first run: 4.8
/// of the binary's 5.3 MiB of code were resident at idle, most of the hub's RSS. The pages stay in
/// the page cache, shared and reclaimable; the next use of one maps it again with a minor fault, so
/// what stays resident is the code the hub runs. Nothing is done to code that was written to (a
/// debugger's breakpoints live in anonymous copies of its pages, which this would drop).
fn unmap_start_up_code() -> Option<(u64, u64)> {
    #[cfg(target_os = "linux")]
    {
        let here = unmap_start_up_code as *const () as usize;
        let (start, end, resident, written) = code_mapping(here)?;
        if written > 0 {
            return None;
        }
        // SAFETY: [start, end) is the executable mapping holding this function: a private,
        // read-only mapping of the binary that was never written (no anonymous pages), so dropping
        // its page mappings loses nothing; a page used again is mapped again from the file.
        let done = unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
        (done == 0).then(|| (resident, code_mapping(here).map_or(0, |m| m.2)))
    }
    #[cfg(not(target_os = "linux"))]
    None
}

/// The `r-xp` mapping holding address `at`, from `/proc/self/smaps`: start, end, resident KiB,
/// anonymous (written) KiB.
#[cfg(target_os = "linux")]
fn code_mapping(at: usize) -> Option<(usize, usize, u64, u64)> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let mut lines = smaps.lines();
    let header = |line: &str| -> Option<(usize, usize, bool)> {
        let (range, rest) = line.split_once(' ')?;
        let (start, end) = range.split_once('-')?;
        let (start, end) = (usize::from_str_radix(start, 16).ok()?, usize::from_str_radix(end, 16).ok()?);
        Some((start, end, rest.starts_with("r-xp")))
    };
    while let Some(line) = lines.next() {
        let Some((start, end, code)) = header(line) else { continue };
        if !(start <= at && at < end) {
            continue;
        }
        if !code {
            return None;
        }
        let field = |name: &str| -> u64 {
            lines
                .clone()
                .take_while(|l| header(l).is_none())
                .find_map(|l| l.strip_prefix(name)?.split_whitespace().next()?.parse().ok())
                .unwrap_or(0)
        };
        return Some((start, end, field("Rss:"), field("Anonymous:")));
    }
    None
}

/// How often to ping systemd's watchdog (half its interval), when the service has one.
fn watchdog_period() -> Option<Duration> {
    let mut usec = 0;
    (sd_notify::watchdog_enabled(false, &mut usec) && usec > 0).then(|| Duration::from_micros(usec / 2))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    static ENDED: AtomicUsize = AtomicUsize::new(0);
    static RELEASED: AtomicUsize = AtomicUsize::new(0);

    #[cfg(target_os = "linux")]
    #[test]
    fn start_up_code_is_unmapped_and_what_runs_comes_back() {
        let here = start_up_code_is_unmapped_and_what_runs_comes_back as *const () as usize;
        let (start, end, _, written) = code_mapping(here).expect("the test's code mapping");
        assert!(start <= here && here < end && written == 0);
        // The test binary has run plenty of its code by now (the harness, this test).
        let (before, after) = unmap_start_up_code().expect("unmapped");
        assert!(before >= 256 && after < before / 2, "{before} KiB resident before, {after} after");
        // Code that runs again is mapped again.
        let text = format!("{:?}", Config::from_toml("", Some(Path::new("hub.toml"))).map(|_| ()));
        assert!(!text.is_empty());
        let again = code_mapping(here).expect("the mapping").2;
        assert!(again > after, "{again} KiB after running more code, {after} right after");
    }

    fn count_release() {
        RELEASED.fetch_add(1, Ordering::SeqCst);
    }

    async fn released_becomes(n: usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while RELEASED.load(Ordering::SeqCst) != n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "released {} times, not {n}",
                RELEASED.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn memory_is_given_back_once_after_sessions_end_and_not_while_none_do() {
        let period = Duration::from_millis(20);
        let task = tokio::spawn(trim_memory(|| ENDED.load(Ordering::SeqCst), period, count_release));
        tokio::time::sleep(period * 5).await;
        assert_eq!(RELEASED.load(Ordering::SeqCst), 0, "nothing ended, nothing to give back");
        ENDED.fetch_add(3, Ordering::SeqCst);
        released_becomes(1).await;
        tokio::time::sleep(period * 5).await;
        assert_eq!(RELEASED.load(Ordering::SeqCst), 1, "once per batch of ended sessions");
        ENDED.fetch_add(1, Ordering::SeqCst);
        released_becomes(2).await;
        task.abort();
    }

    #[test]
    fn the_real_release_runs_and_the_resident_set_is_read() {
        release_free_memory();
        assert!(resident_kib() > 0);
    }
}
