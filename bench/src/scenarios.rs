//! The measurements. Each one runs against one freshly started broker and returns labelled values
//! (and notes) for the table, except the paced load, whose slices the caller gives each broker in
//! turn; every wait in here is bounded.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use rumqttc::{AsyncClient, Event, Outgoing, Packet, Publish, QoS};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

use crate::broker::{device_id, rss_kib_of, rss_parts_kib_of, Broker};
use crate::client::{self, Target, Transport};
use crate::now_ns;

/// Payload size of the 1→1 cases, in bytes.
pub const PAYLOAD_BYTES: usize = 64;

/// Topic of the 1→1 cases.
const TOPIC: &str = "bench/one-to-one";

/// After the last publish, how long without a new message before the rest counts as lost.
const IDLE_AFTER_PUBLISH: Duration = Duration::from_secs(5);

/// Time given to a broker to settle before its RSS is read.
const SETTLE: Duration = Duration::from_secs(2);

/// When idle RSS is read a second time (after the broker reported ready).
const IDLE_LATER: Duration = Duration::from_secs(15);

/// Time given to a broker after clients left before its RSS is read: the hub gives freed memory
/// back to the kernel within 10 s of sessions ending.
const AFTER_DISCONNECT: Duration = Duration::from_secs(12);

/// One value for the table.
pub struct Metric {
    /// Row label, the same for both brokers.
    pub label: String,
    pub value: f64,
    /// Digits after the decimal point when printed.
    pub decimals: usize,
    /// Why this value is not what its label says (shown as `*` and a note).
    pub flag: Option<String>,
}

/// What one measurement against one broker produced.
#[derive(Default)]
pub struct Outcome {
    pub metrics: Vec<Metric>,
    /// Anything a reader should know (failed connects, duplicates, …).
    pub notes: Vec<String>,
}

impl Outcome {
    pub fn push(&mut self, label: impl Into<String>, value: f64, decimals: usize) {
        self.metrics.push(Metric { label: label.into(), value, decimals, flag: None });
    }

    /// Flags the last metric pushed.
    fn flag_last(&mut self, flag: Option<String>) {
        if let Some(m) = self.metrics.last_mut() {
            m.flag = flag;
        }
    }
}

/// Which messages arrived: per stream (one per publisher) a flag per sequence number, and latencies.
struct Tracker {
    seen: Vec<Vec<bool>>,
    distinct: u64,
    duplicates: u64,
    /// Messages that are not ours (the hub's retained status on `dpi/#`) or out of range.
    foreign: u64,
    /// Those messages counted by the last level of their topic (`availability`, `status`, `error`…).
    foreign_by_leaf: BTreeMap<String, u64>,
    latencies_ns: Vec<u64>,
    /// Messages with a lower sequence number (a warm-up) count for delivery but not for latency.
    latency_from: u64,
    last_at: Option<Instant>,
    /// Why the subscriber's connection ended early, if it did.
    error: Option<String>,
}

impl Tracker {
    fn new(expected_per_stream: &[usize]) -> Tracker {
        let total: usize = expected_per_stream.iter().sum();
        Tracker {
            seen: expected_per_stream.iter().map(|&n| vec![false; n]).collect(),
            distinct: 0,
            duplicates: 0,
            foreign: 0,
            foreign_by_leaf: BTreeMap::new(),
            latencies_ns: Vec::with_capacity(total),
            latency_from: 0,
            last_at: None,
            error: None,
        }
    }

    /// Records message `seq` of `stream`, sent at `sent_ns` and received at `now_ns` (both [`now_ns`]).
    fn record(&mut self, stream: usize, seq: u64, sent_ns: u64, received_ns: u64) {
        let Some(flag) = self.seen.get_mut(stream).and_then(|s| s.get_mut(seq as usize)) else {
            self.foreign += 1;
            return;
        };
        if *flag {
            self.duplicates += 1;
            return;
        }
        *flag = true;
        self.distinct += 1;
        if seq >= self.latency_from {
            self.latencies_ns.push(received_ns.saturating_sub(sent_ns));
        }
        self.last_at = Some(Instant::now());
    }
}

/// Reads (stream, sequence number, send time) from a received message; `None` if it is not ours.
type Decode = fn(&Publish) -> Option<(usize, u64, u64)>;

/// A connected subscriber whose messages are recorded by a background task.
struct Subscriber {
    client: AsyncClient,
    task: JoinHandle<()>,
    tracker: Arc<Mutex<Tracker>>,
}

impl Subscriber {
    /// Connects, subscribes to `filter` (SUBACK awaited), then records every message in the background.
    async fn start(
        target: &Target,
        id: &str,
        transport: Transport,
        filter: &str,
        qos: QoS,
        expected_per_stream: &[usize],
        decode: Decode,
    ) -> Result<Subscriber> {
        let (client, mut eventloop) = client::connect(target, id, transport).await?;
        client::subscribe(&client, &mut eventloop, filter, qos).await?;
        let tracker = Arc::new(Mutex::new(Tracker::new(expected_per_stream)));
        let shared = Arc::clone(&tracker);
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let received = now_ns();
                        let Ok(mut t) = shared.lock() else { return };
                        match decode(&p) {
                            Some((stream, seq, sent)) => t.record(stream, seq, sent, received),
                            None => {
                                t.foreign += 1;
                                let leaf = p.topic.rsplit('/').next().unwrap_or_default().to_owned();
                                *t.foreign_by_leaf.entry(leaf).or_default() += 1;
                            }
                        }
                    }
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
                    Ok(_) => {}
                    Err(e) => {
                        if let Ok(mut t) = shared.lock() {
                            t.error = Some(e.to_string());
                        }
                        return;
                    }
                }
            }
        });
        Ok(Subscriber { client, task, tracker })
    }

    /// Messages numbered below `seq` count for delivery, not for latency.
    fn latency_from(&self, seq: u64) {
        if let Ok(mut t) = self.tracker.lock() {
            t.latency_from = seq;
        }
    }

    /// Distinct messages received so far.
    fn distinct(&self) -> u64 {
        self.tracker.lock().map_or(0, |t| t.distinct)
    }

    /// Waits until `expected` distinct messages arrived, or nothing new came for
    /// [`IDLE_AFTER_PUBLISH`] after `published_at`, or `deadline` passed.
    async fn wait_for(&self, expected: u64, published_at: Instant, deadline: Instant) {
        loop {
            let (distinct, last_at) = match self.tracker.lock() {
                Ok(t) => (t.distinct, t.last_at),
                Err(_) => return,
            };
            let now = Instant::now();
            let quiet_since = last_at.map_or(published_at, |l| l.max(published_at));
            if distinct >= expected
                || now.duration_since(quiet_since) > IDLE_AFTER_PUBLISH
                || now > deadline
                || self.task.is_finished()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Disconnects and hands back what was recorded.
    async fn finish(self) -> Result<Tracker> {
        let _ = self.client.try_disconnect();
        let mut task = self.task;
        if tokio::time::timeout(Duration::from_secs(3), &mut task).await.is_err() {
            task.abort();
        }
        let mut shared = self.tracker.lock().map_err(|_| anyhow!("subscriber panicked"))?;
        Ok(std::mem::replace(&mut *shared, Tracker::new(&[])))
    }
}

/// Latency summary in milliseconds.
pub struct LatencyMs {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

/// p50, p99 and max of `samples` (nanoseconds), nearest-rank.
pub fn summarize(samples: &mut [u64]) -> Option<LatencyMs> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_unstable();
    let rank = |p: f64| {
        let idx = ((p / 100.0) * samples.len() as f64).ceil() as usize;
        samples[idx.clamp(1, samples.len()) - 1] as f64 / 1e6
    };
    Some(LatencyMs { p50: rank(50.0), p99: rank(99.0), max: samples[samples.len() - 1] as f64 / 1e6 })
}

/// Adds the delivery rows (msgs/s, p50, p99, max, lost) for `tracker` under `prefix`.
fn delivery_rows(out: &mut Outcome, prefix: &str, mut tracker: Tracker, expected: u64, started: Instant) -> Result<()> {
    let Some(last_at) = tracker.last_at else {
        bail!("no message delivered{}", tracker.error.map(|e| format!(" (subscriber: {e})")).unwrap_or_default());
    };
    let secs = last_at.duration_since(started).as_secs_f64().max(1e-6);
    let lat = summarize(&mut tracker.latencies_ns).context("no latency samples")?;
    out.push(format!("{prefix}: msgs/s delivered"), tracker.distinct as f64 / secs, 0);
    out.push(format!("{prefix}: latency p50 (ms)"), lat.p50, 2);
    out.push(format!("{prefix}: latency p99 (ms)"), lat.p99, 2);
    out.push(format!("{prefix}: latency max (ms)"), lat.max, 2);
    out.push(format!("{prefix}: messages lost"), expected.saturating_sub(tracker.distinct) as f64, 0);
    delivery_notes(out, prefix, &tracker);
    Ok(())
}

/// Notes on what a subscriber got besides the messages counted: duplicates, other traffic, an
/// early end.
fn delivery_notes(out: &mut Outcome, prefix: &str, tracker: &Tracker) {
    if tracker.duplicates > 0 {
        out.notes.push(format!("{prefix}: {} duplicate deliveries (allowed at QoS1)", tracker.duplicates));
    }
    // One retained `dpi/hub/status` is expected from the hub; more means other traffic reached the subscriber.
    if tracker.foreign > 1 {
        let by_leaf: Vec<String> = tracker.foreign_by_leaf.iter().map(|(leaf, n)| format!("{n} on …/{leaf}")).collect();
        out.notes.push(format!(
            "{prefix}: the subscriber also got {} other messages ({})",
            tracker.foreign,
            by_leaf.join(", ")
        ));
    }
    if let Some(e) = &tracker.error {
        out.notes.push(format!("{prefix}: the subscriber's connection ended early: {e}"));
    }
}

/// Decodes the 1→1 payload: sequence number and send time, little-endian, then padding.
fn decode_binary(p: &Publish) -> Option<(usize, u64, u64)> {
    if p.topic != TOPIC || p.payload.len() < 16 {
        return None;
    }
    let seq = u64::from_le_bytes(p.payload[..8].try_into().ok()?);
    let sent = u64::from_le_bytes(p.payload[8..16].try_into().ok()?);
    Some((0, seq, sent))
}

/// 1 publisher → 1 subscriber: `messages` payloads of 64 bytes published back to back (QoS1
/// bounded by rumqttc's inflight window of 100), subscribed at the same QoS.
pub async fn one_to_one(target: &Target, qos: QoS, transport: Transport, messages: u64) -> Result<Outcome> {
    let qos_name = if qos == QoS::AtMostOnce { "QoS0" } else { "QoS1" };
    let prefix = format!("{qos_name} {} 1→1", transport.name());
    let expected = usize::try_from(messages).context("--messages too large")?;
    let sub = Subscriber::start(target, "bench-sub", transport, TOPIC, qos, &[expected], decode_binary).await?;
    let (publisher, eventloop) = client::connect(target, "bench-pub", transport).await?;
    let driver = tokio::spawn(client::drive(eventloop));

    let started = Instant::now();
    let publish_all = async {
        let mut payload = [b'x'; PAYLOAD_BYTES];
        for seq in 0..messages {
            payload[..8].copy_from_slice(&seq.to_le_bytes());
            payload[8..16].copy_from_slice(&now_ns().to_le_bytes());
            publisher.publish(TOPIC, qos, false, payload.to_vec()).await.context("publishing")?;
        }
        anyhow::Ok(())
    };
    // Generous: at least 1,000 msg/s plus a minute.
    let limit = Duration::from_secs(60) + Duration::from_millis(messages);
    let published = tokio::time::timeout(limit, publish_all).await;
    let published_at = Instant::now();
    if let Ok(Ok(())) = published {
        sub.wait_for(messages, published_at, published_at + Duration::from_secs(120)).await;
    }
    let _ = publisher.try_disconnect();
    stop_task(driver).await;
    let tracker = sub.finish().await?;
    match published {
        Err(_) => bail!("publishing {messages} messages took longer than {limit:?}"),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(())) => {}
    }
    let mut out = Outcome::default();
    delivery_rows(&mut out, &prefix, tracker, messages, started)?;
    Ok(out)
}

/// Decodes a fleet message: `dpi/dev-N/state` with `{"motion":…,"seq":S,"t":T}`.
fn decode_fleet(p: &Publish) -> Option<(usize, u64, u64)> {
    let n: usize = p.topic.strip_prefix("dpi/dev-")?.strip_suffix("/state")?.parse().ok()?;
    let text = std::str::from_utf8(&p.payload).ok()?;
    Some((n.checked_sub(1)?, json_u64(text, "seq")?, json_u64(text, "t")?))
}

/// The unsigned integer after `"key":` in a flat JSON object (enough for our own payloads).
fn json_u64(text: &str, key: &str) -> Option<u64> {
    let rest = &text[text.find(&format!("\"{key}\":"))? + key.len() + 3..];
    let end = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// A probe of the hub's store: (SQLite commits so far, bytes written to storage so far).
pub type StoreProbe<'a> = &'a (dyn Fn() -> Result<(u64, u64)> + Sync);

/// `devices` publishers on `dpi/dev-N/state` at QoS1, together `rate` msg/s for `duration`, to one
/// subscriber on `dpi/#` (all over TLS). With `store`, also the store's commits and bytes written
/// per minute while it runs (every state differs from the last, the worst case for the store).
pub async fn fleet(
    target: &Target,
    devices: usize,
    rate: u32,
    duration: Duration,
    store: Option<StoreProbe<'_>>,
) -> Result<Outcome> {
    let prefix = format!("{devices} devices QoS1 TLS @ {rate} msg/s → dpi/#");
    let per_device = ((f64::from(rate) * duration.as_secs_f64()) / devices as f64).round().max(1.0) as usize;
    let expected = (per_device * devices) as u64;
    let sub = Subscriber::start(
        target,
        "bench-fleet-sub",
        Transport::Tls,
        "dpi/#",
        QoS::AtLeastOnce,
        &vec![per_device; devices],
        decode_fleet,
    )
    .await?;

    let ids = (1..=devices).map(device_id).collect();
    let mut publishers = Vec::with_capacity(devices);
    for (i, result) in client::connect_many(target, ids, Transport::Tls, 10).await.into_iter().enumerate() {
        let (client, eventloop) = result.with_context(|| format!("connecting device {}", i + 1))?;
        publishers.push((client, tokio::spawn(client::drive(eventloop))));
    }

    let store_before = match store {
        Some(probe) => Some((probe()?, Instant::now())),
        None => None,
    };
    // Each device publishes every `period`; their first ticks are spread evenly over one period.
    let period = Duration::from_secs_f64(devices as f64 / f64::from(rate));
    let started_tokio = tokio::time::Instant::now() + Duration::from_millis(100);
    let started = Instant::now() + Duration::from_millis(100);
    let mut set = JoinSet::new();
    for (i, (client, _)) in publishers.iter().enumerate() {
        let client = client.clone();
        let first = started_tokio + period.mul_f64(i as f64 / devices as f64);
        set.spawn(async move {
            let topic = format!("dpi/{}/state", device_id(i + 1));
            let mut tick = tokio::time::interval_at(first, period);
            for seq in 0..per_device {
                tick.tick().await;
                let payload = format!("{{\"motion\":{},\"seq\":{seq},\"t\":{}}}", seq % 2 == 0, now_ns());
                // Retained, as devices publish their state (SPEC §5).
                client.publish(&topic, QoS::AtLeastOnce, true, payload).await.context("publishing")?;
            }
            anyhow::Ok(())
        });
    }
    let failure = join_publishers(set, duration + Duration::from_secs(60), "the devices").await;
    let published_at = Instant::now();
    if failure.is_none() {
        sub.wait_for(expected, published_at, published_at + Duration::from_secs(60)).await;
    }
    let store_rows = match (store, store_before) {
        (Some(probe), Some(((commits_before, bytes_before), probed_at))) if failure.is_none() => {
            // The last states are written within one commit interval (1 s by default).
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let (commits, bytes) = probe()?;
            let minutes = probed_at.elapsed().as_secs_f64() / 60.0;
            Some((
                commits.saturating_sub(commits_before) as f64 / minutes,
                bytes.saturating_sub(bytes_before) as f64 / 1e6 / minutes,
            ))
        }
        _ => None,
    };
    for (client, driver) in publishers {
        let _ = client.try_disconnect();
        stop_task(driver).await;
    }
    let tracker = sub.finish().await?;
    if let Some(e) = failure {
        return Err(e);
    }
    let mut out = Outcome::default();
    delivery_rows(&mut out, &prefix, tracker, expected, started)?;
    if let Some((commits_per_minute, mb_per_minute)) = store_rows {
        out.push(format!("{prefix}: SQLite transactions per minute"), commits_per_minute, 0);
        out.push(format!("{prefix}: bytes written to disk (MB per minute)"), mb_per_minute, 2);
        if mb_per_minute == 0.0 {
            out.flag_last(Some("nothing reached the disk: is the temp dir on tmpfs? Set TMPDIR to a disk".to_owned()));
        }
    }
    Ok(out)
}

/// Waits (at most `limit`) for every publisher task; the first error, or why they did not finish.
async fn join_publishers(mut set: JoinSet<Result<()>>, limit: Duration, who: &str) -> Option<anyhow::Error> {
    let joined = tokio::time::timeout(limit, async {
        let mut first_error = None;
        while let Some(r) = set.join_next().await {
            if let Some(e) = match r {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e),
                Err(e) => Some(anyhow!("publisher task: {e}")),
            } {
                first_error.get_or_insert(e);
            }
        }
        first_error
    })
    .await;
    set.abort_all();
    match joined {
        Err(_) => Some(anyhow!("{who} did not finish publishing within {limit:?}")),
        Ok(e) => e,
    }
}

/// Keeps a broker's RSS under a limit while clients connect: a connect starts only if the broker's
/// RSS, plus what the connects in flight and this one may add, stays under the limit.
struct MemoryBudget {
    pid: u32,
    limit_kib: u64,
    start_kib: u64,
    /// Cost of one connect seen in an earlier round (KiB), used until this round shows more.
    hint_kib: u64,
    started: AtomicU64,
    finished: AtomicU64,
    /// The broker's RSS when a connect was first refused (0: none was).
    stopped_at_kib: AtomicU64,
}

impl MemoryBudget {
    fn new(pid: u32, limit_kib: u64, hint_kib: u64) -> MemoryBudget {
        MemoryBudget {
            pid,
            limit_kib,
            start_kib: rss_kib_of(pid).unwrap_or(0),
            hint_kib,
            started: AtomicU64::new(0),
            finished: AtomicU64::new(0),
            stopped_at_kib: AtomicU64::new(0),
        }
    }

    /// Whether one more connect may start now; once refused, always refused.
    fn admit(&self) -> bool {
        if self.stopped_at_kib.load(Ordering::Relaxed) > 0 {
            return false;
        }
        let Ok(kib) = rss_kib_of(self.pid) else { return false };
        let started = self.started.load(Ordering::Relaxed);
        let in_flight = started.saturating_sub(self.finished.load(Ordering::Relaxed));
        let per_connect = self.hint_kib.max(kib.saturating_sub(self.start_kib) / started.max(1));
        if kib + per_connect * (in_flight + 1) > self.limit_kib {
            self.stopped_at_kib.store(kib.max(1), Ordering::Relaxed);
            return false;
        }
        self.started.fetch_add(1, Ordering::Relaxed);
        true
    }
}

/// Clients kept connected and idle (their event loops only answer keepalive).
struct IdleClients {
    clients: Vec<AsyncClient>,
    tasks: Vec<JoinHandle<()>>,
    failed: usize,
    first_error: Option<String>,
    budget: Arc<MemoryBudget>,
}

/// How one idle client's connect went.
enum Attempt {
    Connected(AsyncClient),
    Failed(String),
    /// Not tried: the memory budget was spent.
    Skipped,
}

impl IdleClients {
    /// Opens `count` TLS clients with ids `PREFIX-i`, at most `concurrency` connecting at once and
    /// within `budget`. Each client's event loop runs from its CONNACK on.
    async fn open(
        target: &Target,
        prefix: &str,
        count: usize,
        concurrency: usize,
        budget: MemoryBudget,
    ) -> IdleClients {
        let budget = Arc::new(budget);
        let gate = Arc::new(Semaphore::new(concurrency.max(1)));
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut idle = IdleClients {
            clients: Vec::new(),
            tasks: Vec::new(),
            failed: 0,
            first_error: None,
            budget: Arc::clone(&budget),
        };
        for i in 0..count {
            let (target, gate, budget, tx) = (target.clone(), Arc::clone(&gate), Arc::clone(&budget), tx.clone());
            let id = format!("{prefix}-{i}");
            idle.tasks.push(tokio::spawn(async move {
                let Ok(permit) = gate.acquire().await else { return };
                if !budget.admit() {
                    let _ = tx.send(Attempt::Skipped);
                    return;
                }
                let result = client::connect(&target, &id, Transport::Tls).await;
                budget.finished.fetch_add(1, Ordering::Relaxed);
                drop(permit);
                match result {
                    Ok((client, eventloop)) => {
                        let _ = tx.send(Attempt::Connected(client));
                        client::drive(eventloop).await;
                    }
                    Err(e) => {
                        let _ = tx.send(Attempt::Failed(format!("{e:#}")));
                    }
                }
            }));
        }
        drop(tx);
        let rounds = u32::try_from(count / concurrency.max(1) + 2).unwrap_or(u32::MAX);
        let deadline = tokio::time::Instant::now() + client::CONNECT_TIMEOUT.saturating_mul(rounds);
        let mut answered = 0;
        while answered < count {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(attempt)) => {
                    answered += 1;
                    match attempt {
                        Attempt::Connected(c) => idle.clients.push(c),
                        Attempt::Failed(e) => {
                            idle.failed += 1;
                            idle.first_error.get_or_insert(e);
                        }
                        Attempt::Skipped => {}
                    }
                }
                Ok(None) => break,
                Err(_) => {
                    idle.failed += count - answered;
                    idle.first_error.get_or_insert("connects still pending at the deadline".to_owned());
                    break;
                }
            }
        }
        idle
    }

    /// What one connect cost the broker, in KiB of RSS, given its RSS now.
    fn cost_per_connect(&self, now_kib: u64) -> u64 {
        now_kib.saturating_sub(self.budget.start_kib) / (self.clients.len() as u64).max(1)
    }

    /// Sends DISCONNECT on every connection and waits (at most 15 s) for them to close.
    async fn close(self) {
        for c in &self.clients {
            let _ = c.try_disconnect();
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        for mut task in self.tasks {
            if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                task.abort();
            }
        }
    }

    /// Why fewer than `count` clients are connected, if they are.
    fn shortfall(&self, count: usize) -> Option<String> {
        let connected = self.clients.len();
        if connected == count {
            return None;
        }
        let mut why = format!("only {connected} of {count} connected");
        let stopped = self.budget.stopped_at_kib.load(Ordering::Relaxed);
        if stopped > 0 {
            why += &format!(
                "; connecting stopped at {:.0} MiB of broker RSS, to stay under {:.0} MiB (90% of --max-broker-rss)",
                stopped as f64 / 1024.0,
                self.budget.limit_kib as f64 / 1024.0
            );
        }
        if self.failed > 0 {
            why += &format!("; {} connects failed, first: {}", self.failed, self.first_error.as_deref().unwrap_or("?"));
        }
        Some(why)
    }
}

/// The broker's RSS idle, with `count` idle TLS clients, after they disconnect, and with a second
/// round of `count` clients under new ids. Connecting stops early (flagged in the table) before the
/// broker's RSS reaches 90% of the memory guard.
pub async fn idle_clients(broker: &mut Broker, target: &Target, count: usize, concurrency: usize) -> Result<Outcome> {
    let needed = 2 * count as u64 + 200;
    if let Some(limit) = own_nofile_limit() {
        if limit < needed {
            bail!("this process may open only {limit} files; {needed} are needed (raise `ulimit -n`)");
        }
    }
    let (pid, limit_kib) = (broker.pid(), broker.guard_kib() / 10 * 9);
    let mib = |kib: u64| kib as f64 / 1024.0;
    let mut out = Outcome::default();
    tokio::time::sleep(SETTLE).await;
    let idle = broker.rss_kib()?;
    out.push("RSS idle (MiB)", mib(idle), 1);
    let (anon, file) = rss_parts_kib_of(pid)?;
    out.push("RSS idle: anonymous, the memory it wrote (MiB)", mib(anon), 1);
    out.push("RSS idle: file pages, its binary and libraries (MiB)", mib(file), 1);
    // Some memory settles later: the hub unmaps its start-up code 10 s after it is ready.
    tokio::time::sleep(IDLE_LATER - SETTLE).await;
    // Per client below is counted from the first reading: the code a broker maps again to serve
    // clients is paid once, not per client.
    out.push(format!("RSS idle, {} s after ready (MiB)", IDLE_LATER.as_secs()), mib(broker.rss_kib()?), 1);
    let (anon, file) = rss_parts_kib_of(pid)?;
    out.push(format!("RSS idle, {} s after ready: anonymous (MiB)", IDLE_LATER.as_secs()), mib(anon), 1);
    out.push(format!("RSS idle, {} s after ready: file pages (MiB)", IDLE_LATER.as_secs()), mib(file), 1);

    let first = IdleClients::open(target, "idle-a", count, concurrency, MemoryBudget::new(pid, limit_kib, 0)).await;
    tokio::time::sleep(SETTLE).await;
    let with_clients = broker.rss_kib()?;
    let cost = first.cost_per_connect(with_clients);
    let (connected, shortfall) = (first.clients.len(), first.shortfall(count));
    first.close().await;
    out.push(format!("RSS with {count} idle TLS clients (MiB)"), mib(with_clients), 1);
    out.flag_last(shortfall.clone());
    out.push("RSS per idle TLS client (KiB)", with_clients.saturating_sub(idle) as f64 / connected.max(1) as f64, 1);
    out.flag_last(shortfall);
    if connected == 0 {
        bail!("no idle client could connect");
    }

    tokio::time::sleep(AFTER_DISCONNECT).await;
    out.push(
        format!("RSS {} s after those {count} disconnect (MiB)", AFTER_DISCONNECT.as_secs()),
        mib(broker.rss_kib()?),
        1,
    );
    if connected < count {
        out.flag_last(Some(format!("after {connected} clients, not {count}")));
    }

    let budget = MemoryBudget::new(pid, limit_kib, cost);
    let second = IdleClients::open(target, "idle-b", count, concurrency, budget).await;
    tokio::time::sleep(SETTLE).await;
    let second_round = broker.rss_kib()?;
    let shortfall = second.shortfall(count);
    second.close().await;
    out.push(format!("RSS with {count} more, new ids (MiB)"), mib(second_round), 1);
    out.flag_last(shortfall);
    Ok(out)
}

/// This process's soft limit on open files, from /proc/self/limits.
fn own_nofile_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// TLS connects per second: `workers` clients in parallel, each repeating TCP + TLS + CONNECT/CONNACK
/// + DISCONNECT with a new client id, for `duration`.
pub async fn connect_rate(target: &Target, workers: usize, duration: Duration) -> Result<Outcome> {
    let started = Instant::now();
    let end = started + duration;
    let mut set = JoinSet::new();
    for w in 0..workers {
        let target = target.clone();
        set.spawn(async move {
            let (mut done, mut failed, mut first_error) = (0u64, 0u64, None);
            while Instant::now() < end {
                // Devices reconnecting, as after a power cut: on the hub each logs in as itself.
                let id = crate::broker::device_id(w + 1);
                match tokio::time::timeout(Duration::from_secs(10), client::connect(&target, &id, Transport::Tls)).await
                {
                    Ok(Ok((client, eventloop))) => {
                        client::disconnect(&client, eventloop).await;
                        done += 1;
                    }
                    Ok(Err(e)) => {
                        failed += 1;
                        first_error.get_or_insert(format!("{e:#}"));
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    Err(_) => {
                        failed += 1;
                        first_error.get_or_insert("no CONNACK within 10 s".to_owned());
                    }
                }
            }
            (done, failed, first_error)
        });
    }
    let (mut done, mut failed, mut first_error) = (0u64, 0u64, None);
    let joined = tokio::time::timeout(duration + Duration::from_secs(30), async {
        while let Some(r) = set.join_next().await {
            if let Ok((d, f, e)) = r {
                done += d;
                failed += f;
                if first_error.is_none() {
                    first_error = e;
                }
            }
        }
    })
    .await;
    set.abort_all();
    if joined.is_err() {
        bail!("connect workers did not stop in time");
    }
    let secs = started.elapsed().as_secs_f64();
    if done == 0 {
        bail!("no connect succeeded: {}", first_error.unwrap_or_default());
    }
    let mut out = Outcome::default();
    out.push(format!("TLS connects/s ({workers} devices reconnecting)"), done as f64 / secs, 0);
    if failed > 0 {
        out.notes.push(format!("TLS connects: {failed} failed; first: {}", first_error.unwrap_or_default()));
    }
    Ok(out)
}

/// Waits up to 3 s for a client's event-loop task to end after its DISCONNECT, then aborts it.
async fn stop_task(mut task: JoinHandle<()>) {
    if tokio::time::timeout(Duration::from_secs(3), &mut task).await.is_err() {
        task.abort();
    }
}

/// CPU time process `pid` has used so far (user + system, every thread, the dead ones too), from
/// `/proc/PID/stat`, in seconds (the kernel counts in ticks of 1/CLK_TCK s, 10 ms here).
fn cpu_seconds_of(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The command name may hold spaces: the fields are counted after its closing parenthesis.
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).context("no ')' in /proc/PID/stat")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).context("short /proc/PID/stat");
    // utime and stime are the 14th and 15th fields; `after` starts at the 3rd.
    let total = ticks(11)? + ticks(12)?;
    Ok(total as f64 / CLK_TCK)
}

/// On-CPU time of each of the broker's threads so far, in ms with ns resolution
/// (`se.sum_exec_runtime` of `/proc/PID/task/*/sched`), by thread id; empty where the kernel does
/// not offer it.
fn cpu_ms_by_thread(pid: u32) -> HashMap<String, f64> {
    let dir = format!("/proc/{pid}/task");
    let Ok(tasks) = std::fs::read_dir(&dir) else { return HashMap::new() };
    tasks
        .filter_map(|task| {
            let task = task.ok()?;
            let sched = std::fs::read_to_string(task.path().join("sched")).ok()?;
            let ms = sched
                .lines()
                .find_map(|l| l.strip_prefix("se.sum_exec_runtime")?.split(':').nth(1)?.trim().parse().ok())?;
            Some((task.file_name().to_string_lossy().into_owned(), ms))
        })
        .collect()
}

/// The broker's CPU time between two readings, in seconds: per thread from the scheduler's
/// nanosecond counts (a thread that ended in between takes its time with it), or, where those are
/// missing, from the 10 ms ticks of `/proc/PID/stat`.
fn cpu_between(before: &(HashMap<String, f64>, f64), after: &(HashMap<String, f64>, f64)) -> f64 {
    if before.0.is_empty() || after.0.is_empty() {
        return after.1 - before.1;
    }
    after.0.iter().map(|(tid, ms)| ms - before.0.get(tid).copied().unwrap_or(0.0)).sum::<f64>() / 1000.0
}

/// Both readings [`cpu_between`] compares.
fn cpu_reading(pid: u32) -> Result<(HashMap<String, f64>, f64)> {
    Ok((cpu_ms_by_thread(pid), cpu_seconds_of(pid)?))
}

/// Times the broker's threads were switched in, all threads together (voluntary and not, from
/// `/proc/PID/task/*/status`): each is a wake-up the kernel paid for. A thread that ends
/// meanwhile takes its count with it, so a difference is at worst a little low.
fn switches_of(pid: u32) -> Result<u64> {
    let dir = format!("/proc/{pid}/task");
    let mut total = 0;
    for task in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let Ok(status) = std::fs::read_to_string(task?.path().join("status")) else { continue };
        total += status
            .lines()
            .filter(|l| l.starts_with("voluntary_ctxt_switches:") || l.starts_with("nonvoluntary_ctxt_switches:"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum::<u64>();
    }
    Ok(total)
}

/// The kernel's clock tick for /proc times (USER_HZ: 100 on every Linux the hub runs on).
const CLK_TCK: f64 = 100.0;

/// Decodes a paced message: `bench/pace/N` with the 1→1 binary payload.
fn decode_paced(p: &Publish) -> Option<(usize, u64, u64)> {
    let stream: usize = p.topic.strip_prefix("bench/pace/")?.parse().ok()?;
    if p.payload.len() < 16 {
        return None;
    }
    let seq = u64::from_le_bytes(p.payload[..8].try_into().ok()?);
    let sent = u64::from_le_bytes(p.payload[8..16].try_into().ok()?);
    Some((stream, seq, sent))
}

/// One broker's paced load: `publishers` clients on `bench/pace/N` (no rule reads these topics),
/// QoS1, together at a fixed rate, to one subscriber on `#`, connected once and loaded slice by
/// slice, so that the brokers can take turns. Besides delivery and latency, the broker's CPU time,
/// read from /proc around each slice's publishing and last deliveries (not around the logins).
pub struct PacedLoad {
    sub: Subscriber,
    publishers: Vec<(AsyncClient, JoinHandle<()>)>,
    /// Between two messages of one publisher.
    period: Duration,
    /// Messages per publisher in a slice.
    per_slice: u64,
    /// Messages per publisher sent so far.
    sent: u64,
    broker_pid: u32,
    cpu_s: f64,
    switches: u64,
    /// Messages delivered during the measured slices.
    measured: u64,
}

impl PacedLoad {
    /// Connects the subscriber and the publishers, then runs a warm-up of a quarter slice, which
    /// no figure counts but the losses.
    pub async fn connect(
        target: &Target,
        transport: Transport,
        publishers: usize,
        rate: u32,
        (slice, slices): (Duration, u32),
        broker_pid: u32,
    ) -> Result<PacedLoad> {
        let per_slice = ((f64::from(rate) * slice.as_secs_f64()) / publishers as f64).round().max(4.0) as u64;
        let warm_up = per_slice / 4;
        let per_publisher = usize::try_from(warm_up + per_slice * u64::from(slices)).context("too many messages")?;
        let sub = Subscriber::start(
            target,
            "bench-pace-sub",
            transport,
            "#",
            QoS::AtLeastOnce,
            &vec![per_publisher; publishers],
            decode_paced,
        )
        .await?;
        sub.latency_from(warm_up);
        let mut clients = Vec::with_capacity(publishers);
        for i in 0..publishers {
            let (client, eventloop) = client::connect(target, &format!("bench-pace-{i}"), transport).await?;
            clients.push((client, tokio::spawn(client::drive(eventloop))));
        }
        let period = Duration::from_secs_f64(publishers as f64 / f64::from(rate));
        let mut load = PacedLoad {
            sub,
            publishers: clients,
            period,
            per_slice,
            sent: 0,
            broker_pid,
            cpu_s: 0.0,
            switches: 0,
            measured: 0,
        };
        load.publish(warm_up).await?;
        Ok(load)
    }

    /// One measured slice; returns its CPU µs per message.
    pub async fn slice(&mut self) -> Result<f64> {
        let delivered_before = self.sub.distinct();
        let cpu_before = cpu_reading(self.broker_pid)?;
        let switches_before = switches_of(self.broker_pid)?;
        self.publish(self.per_slice).await?;
        let cpu = cpu_between(&cpu_before, &cpu_reading(self.broker_pid)?);
        let switches = switches_of(self.broker_pid)?.saturating_sub(switches_before);
        let delivered = self.sub.distinct().saturating_sub(delivered_before);
        self.cpu_s += cpu;
        self.switches += switches;
        self.measured += delivered;
        Ok(cpu * 1e6 / (delivered.max(1) as f64))
    }

    /// Each publisher sends its next `count` messages at the pace, and the subscriber is waited for.
    async fn publish(&mut self, count: u64) -> Result<()> {
        let started = tokio::time::Instant::now() + Duration::from_millis(100);
        let publishers = self.publishers.len();
        let (first_seq, period) = (self.sent, self.period);
        let mut set = JoinSet::new();
        for (i, (client, _)) in self.publishers.iter().enumerate() {
            let client = client.clone();
            let first = started + period.mul_f64(i as f64 / publishers as f64);
            set.spawn(async move {
                let topic = format!("bench/pace/{i}");
                let mut tick = tokio::time::interval_at(first, period);
                let mut payload = [b'x'; PAYLOAD_BYTES];
                for seq in first_seq..first_seq + count {
                    tick.tick().await;
                    payload[..8].copy_from_slice(&seq.to_le_bytes());
                    payload[8..16].copy_from_slice(&now_ns().to_le_bytes());
                    client.publish(&topic, QoS::AtLeastOnce, false, payload.to_vec()).await.context("publishing")?;
                }
                anyhow::Ok(())
            });
        }
        let limit = period.mul_f64(count as f64) + Duration::from_secs(60);
        if let Some(e) = join_publishers(set, limit, "the publishers").await {
            return Err(e);
        }
        self.sent += count;
        let published_at = Instant::now();
        let expected = self.sent * publishers as u64;
        self.sub.wait_for(expected, published_at, published_at + Duration::from_secs(60)).await;
        Ok(())
    }

    /// Disconnects; the rows of the measured slices: CPU and wake-ups per message, latency, and
    /// the messages lost over the whole load.
    pub async fn finish(self, prefix: &str) -> Result<Outcome> {
        for (client, driver) in self.publishers {
            let _ = client.try_disconnect();
            stop_task(driver).await;
        }
        let mut tracker = self.sub.finish().await?;
        let per_message = |total: f64| total / (self.measured.max(1) as f64);
        let mut out = Outcome::default();
        out.push(format!("{prefix}: broker CPU per message (µs)"), per_message(self.cpu_s * 1e6), 1);
        out.push(format!("{prefix}: broker thread wake-ups per message"), per_message(self.switches as f64), 2);
        let lat = summarize(&mut tracker.latencies_ns).context("no message delivered")?;
        out.push(format!("{prefix}: latency p50 (ms)"), lat.p50, 2);
        out.push(format!("{prefix}: latency p99 (ms)"), lat.p99, 2);
        out.push(format!("{prefix}: latency max (ms)"), lat.max, 2);
        let expected = self.sent * tracker.seen.len() as u64;
        out.push(format!("{prefix}: messages lost"), expected.saturating_sub(tracker.distinct) as f64, 0);
        delivery_notes(&mut out, prefix, &tracker);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_warm_up_counts_for_delivery_but_not_for_latency() {
        let mut tracker = Tracker::new(&[4, 4]);
        tracker.latency_from = 2;
        for seq in 0..4 {
            tracker.record(0, seq, 1_000, 1_000 + seq * 10);
        }
        tracker.record(1, 3, 0, 7);
        tracker.record(1, 3, 0, 9);
        tracker.record(1, 4, 0, 1);
        assert_eq!((tracker.distinct, tracker.duplicates, tracker.foreign), (5, 1, 1));
        assert_eq!(tracker.latencies_ns, [20, 30, 7]);
    }
}
