//! Load mode: sensor devices publishing retained QoS 1 states at a fixed total rate, for benchmarks and
//! soak tests. Each state is valid for its kind and carries `"seq"` (the device's counter) and `"t"`
//! (Unix nanoseconds at publish), which the hub keeps as extra fields, so a subscriber can measure
//! latency and spot gaps.
//!
//! # Pacing
//!
//! The total rate R is spread evenly over the N devices and over time: device `i` publishes every
//! N/R seconds, its first tick at i/R, so the house as a whole publishes every 1/R seconds. With a
//! duration D, device `i` sends exactly the ticks scheduled before D, and the devices together send
//! R × D messages (rounded up) however slow the machine is.
//!
//! Missed ticks are sent in a burst ([`MissedTickBehavior::Burst`]), not skipped or pushed back
//! (`Delay`): this is an open-loop generator, the offered load must not drop when the hub (or this
//! process) falls behind, or a slow hub would be measured under less load than asked for.
//!
//! `sent` counts publishes handed to the MQTT client, `acked` the PUBACKs received, `errors` refused
//! publishes and connection drops. Before returning, [`run_load`] waits (boundedly) for the PUBACKs
//! of everything it sent.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rumqttc::{AsyncClient, Event, EventLoop, Outgoing, Packet, QoS};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::mqtt::{self, Endpoint, Login};
use crate::payload::load_state;
use crate::Error;

/// Lowest total rate: below it one device's period would be absurdly long.
pub const MIN_RATE: f64 = 0.001;

/// Connects made at once while connecting the devices.
const CONNECT_CONCURRENCY: usize = 8;

/// Request queue of each client: publishes wait here when the in-flight window (100) is full.
const REQUEST_CAPACITY: usize = 64;

/// How long to wait for the last PUBACKs after the last publish, and after a stop.
const ACK_GRACE: Duration = Duration::from_secs(10);
const ACK_GRACE_ON_STOP: Duration = Duration::from_secs(2);

/// Pause after a connection error before the client reconnects.
const RETRY_PAUSE: Duration = Duration::from_secs(1);

/// How much load to offer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadPlan {
    /// Messages per second, all devices together.
    pub rate: f64,
    /// How long to publish; `None` runs until the stop token is cancelled.
    pub duration: Option<Duration>,
}

/// Counters shared with the caller, who may read them while the load runs.
#[derive(Debug, Default)]
pub struct LoadStats {
    /// Publishes handed to the MQTT client.
    pub sent: AtomicU64,
    /// PUBACKs received from the hub.
    pub acked: AtomicU64,
    /// Publishes the client refused, and connection errors.
    pub errors: AtomicU64,
}

impl LoadStats {
    /// `(sent, acked, errors)` now.
    pub fn snapshot(&self) -> (u64, u64, u64) {
        (self.sent.load(Ordering::Relaxed), self.acked.load(Ordering::Relaxed), self.errors.load(Ordering::Relaxed))
    }
}

/// When one device publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pacing {
    /// Its first tick, after the start.
    pub first: Duration,
    /// Between two of its ticks.
    pub every: Duration,
    /// How many it sends in all; `None` without a duration.
    pub count: Option<u64>,
}

/// The pacing of device `index` of `devices` for a total `rate` (msgs/s) over `duration`.
pub fn pacing(index: usize, devices: usize, rate: f64, duration: Option<Duration>) -> Pacing {
    let devices = devices.max(1) as f64;
    let index = index as f64;
    let gap = 1.0 / rate;
    let count = duration.map(|d| {
        // Ticks k with (index + k·devices)·gap < d, i.e. k < (d·rate − index) / devices.
        let ticks = (d.as_secs_f64() * rate - index) / devices;
        // The small tolerance keeps a tick that lands exactly on d (200 msgs over 1 s) out.
        if ticks <= 0.0 {
            0
        } else {
            (ticks - 1e-9).ceil() as u64
        }
    });
    // Whole nanoseconds, rounded: 3 × 0.1 s must be 300 ms, not 299.999999 ms.
    let nanos = |secs: f64| Duration::from_nanos((secs * 1e9).round() as u64);
    Pacing { first: nanos(index * gap), every: nanos(devices * gap), count }
}

/// Connects every login and publishes at `plan.rate` in total until `plan.duration` has passed or `stop`
/// is cancelled, then waits for the outstanding PUBACKs and disconnects. Counts into `stats`.
pub async fn run_load(
    endpoint: &Endpoint,
    logins: Vec<Login>,
    plan: LoadPlan,
    stats: Arc<LoadStats>,
    stop: CancellationToken,
) -> Result<(), Error> {
    if !(plan.rate.is_finite() && plan.rate >= MIN_RATE) {
        return Err(Error::BadOption { name: "rate", value: plan.rate.to_string(), expected: "at least 0.001 msg/s" });
    }
    if logins.is_empty() {
        return Err(Error::NoDevices);
    }
    if let Some(l) = logins.iter().find(|l| !l.kind.is_load_sensor()) {
        return Err(Error::NotASensor { device: l.device.clone(), kind: l.kind.as_str() });
    }
    let tls = mqtt::tls_config(&endpoint.ca)?;
    let clients = connect_all(endpoint, &tls, &logins).await?;

    // Drivers outlive the publishers: they carry the last PUBACKs and the DISCONNECTs.
    let kill = CancellationToken::new();
    let mut drivers = JoinSet::new();
    let mut publishers = JoinSet::new();
    let start = Instant::now();
    let acked_before = stats.acked.load(Ordering::Relaxed);
    let queued = Arc::new(AtomicU64::new(0));
    let devices = logins.len();
    let mut handles = Vec::with_capacity(devices);
    for (index, (login, (client, eventloop))) in logins.into_iter().zip(clients).enumerate() {
        drivers.spawn(drive(eventloop, Arc::clone(&stats), kill.clone()));
        let pace = pacing(index, devices, plan.rate, plan.duration);
        let job =
            Publisher { client: client.clone(), login, pace, stats: Arc::clone(&stats), queued: Arc::clone(&queued) };
        publishers.spawn(job.run(start, stop.clone()));
        handles.push(client);
    }
    while publishers.join_next().await.is_some() {}

    let grace = if stop.is_cancelled() { ACK_GRACE_ON_STOP } else { ACK_GRACE };
    let deadline = Instant::now() + grace;
    let target = queued.load(Ordering::Relaxed);
    while stats.acked.load(Ordering::Relaxed).saturating_sub(acked_before) < target && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    for client in &handles {
        let _ = client.try_disconnect();
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), async { while drivers.join_next().await.is_some() {} }).await;
    kill.cancel();
    while drivers.join_next().await.is_some() {}
    Ok(())
}

/// Connects every login, [`CONNECT_CONCURRENCY`] at a time; on any failure, disconnects the others.
async fn connect_all(
    endpoint: &Endpoint,
    tls: &Arc<rustls::ClientConfig>,
    logins: &[Login],
) -> Result<Vec<(AsyncClient, EventLoop)>, Error> {
    let gate = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let mut set = JoinSet::new();
    for (i, login) in logins.iter().enumerate() {
        let (endpoint, tls, login, gate) = (endpoint.clone(), Arc::clone(tls), login.clone(), Arc::clone(&gate));
        set.spawn(async move {
            let _permit = gate.acquire_owned().await;
            (i, mqtt::connect(&endpoint, &tls, &login, REQUEST_CAPACITY).await)
        });
    }
    let mut slots: Vec<Option<(AsyncClient, EventLoop)>> = (0..logins.len()).map(|_| None).collect();
    let mut failure = None;
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok((i, Ok(pair))) => slots[i] = Some(pair),
            Ok((_, Err(e))) => failure = failure.or(Some(e)),
            Err(e) => {
                failure = failure.or(Some(Error::Connect {
                    device: "load".to_owned(),
                    addr: endpoint.addr(),
                    reason: format!("connect task failed: {e}"),
                }))
            }
        }
    }
    if let Some(e) = failure {
        for (client, _) in slots.iter().flatten() {
            let _ = client.try_disconnect();
        }
        return Err(e);
    }
    Ok(slots.into_iter().flatten().collect())
}

/// One device's publishing job.
struct Publisher {
    /// Its MQTT client (the driver polls the matching event loop).
    client: AsyncClient,
    /// Which device it is, for its topic and payload kind.
    login: Login,
    /// When it publishes.
    pace: Pacing,
    /// The caller's counters.
    stats: Arc<LoadStats>,
    /// Publishes of this run handed to the clients, to know how many PUBACKs to wait for.
    queued: Arc<AtomicU64>,
}

impl Publisher {
    /// Publishes on each tick until its count is reached or `stop` is cancelled.
    async fn run(self, start: Instant, stop: CancellationToken) {
        let topic = mqtt::state_topic(&self.login.device);
        let mut ticks = tokio::time::interval_at(start + self.pace.first, self.pace.every);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Burst);
        let mut seq = 0u64;
        while self.pace.count.is_none_or(|count| seq < count) {
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                _ = ticks.tick() => {}
            }
            seq += 1;
            let t = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
            let Some(payload) = load_state(self.login.kind, seq, t) else { return };
            let sent = tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                sent = self.client.publish(topic.clone(), QoS::AtLeastOnce, true, payload) => sent,
            };
            match sent {
                Ok(()) => {
                    self.stats.sent.fetch_add(1, Ordering::Relaxed);
                    self.queued.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => {
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// Polls one device's event loop: counts PUBACKs and errors, reconnects after a pause, ends after its
/// DISCONNECT is written or when `kill` is cancelled.
async fn drive(mut eventloop: EventLoop, stats: Arc<LoadStats>, kill: CancellationToken) {
    loop {
        let event = tokio::select! {
            _ = kill.cancelled() => return,
            event = eventloop.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::PubAck(_))) => {
                stats.acked.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
            Ok(_) => {}
            Err(_) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                tokio::select! {
                    _ = kill.cancelled() => return,
                    _ = tokio::time::sleep(RETRY_PAUSE) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn total(devices: usize, rate: f64, secs: f64) -> u64 {
        (0..devices).filter_map(|i| pacing(i, devices, rate, Some(Duration::from_secs_f64(secs))).count).sum()
    }

    /// `pace!(name, index, devices, rate, duration_ms, first_ms, every_ms, count)`.
    macro_rules! pace {
        ($name:ident, $i:expr, $n:expr, $rate:expr, $dur:expr, $first:expr, $every:expr, $count:expr) => {
            #[test]
            fn $name() {
                let p = pacing($i, $n, $rate, $dur.map(ms));
                assert_eq!((p.first, p.every, p.count), (ms($first), ms($every), $count));
            }
        };
    }

    pace!(first_of_five_at_200, 0, 5, 200.0, Some(1000), 0, 25, Some(40));
    pace!(last_of_five_at_200, 4, 5, 200.0, Some(1000), 20, 25, Some(40));
    pace!(one_device_ten_per_second, 0, 1, 10.0, Some(1000), 0, 100, Some(10));
    pace!(uneven_split_first, 0, 3, 10.0, Some(1000), 0, 300, Some(4));
    pace!(uneven_split_last, 2, 3, 10.0, Some(1000), 200, 300, Some(3));
    pace!(later_device_never_ticks, 3, 4, 2.0, Some(1000), 1500, 2000, Some(0));
    pace!(no_duration_no_count, 1, 2, 100.0, None::<u64>, 10, 20, None);

    #[test]
    fn totals_are_rate_times_duration() {
        assert_eq!(total(5, 200.0, 1.0), 200);
        assert_eq!(total(3, 10.0, 1.0), 10);
        assert_eq!(total(7, 1000.0, 2.5), 2500);
        assert_eq!(total(1, 3.0, 0.5), 2); // ticks at 0 and 1/3 s
        assert_eq!(total(16, 5000.0, 10.0), 50_000);
    }

    #[test]
    fn the_house_publishes_every_gap() {
        // Merged over all devices, the first ticks are 1/R apart.
        let firsts: Vec<Duration> = (0..4).map(|i| pacing(i, 4, 100.0, None).first).collect();
        assert_eq!(firsts, [ms(0), ms(10), ms(20), ms(30)]);
    }

    #[tokio::test]
    async fn bad_rates_and_non_sensors_are_refused_before_connecting() {
        let endpoint = Endpoint { host: "127.0.0.1".into(), port: 1, ca: "/nonexistent".into() };
        let login = |kind| Login {
            client_id: "x".into(),
            username: "x".into(),
            password: "p".into(),
            device: "x".into(),
            kind,
        };
        let plan = |rate| LoadPlan { rate, duration: Some(ms(10)) };
        let stats = Arc::new(LoadStats::default());
        let run = |logins, p| run_load(&endpoint, logins, p, Arc::clone(&stats), CancellationToken::new());
        assert!(matches!(run(vec![login(crate::Kind::Motion)], plan(0.0)).await, Err(Error::BadOption { .. })));
        assert!(matches!(run(vec![login(crate::Kind::Motion)], plan(f64::NAN)).await, Err(Error::BadOption { .. })));
        assert!(matches!(run(vec![], plan(10.0)).await, Err(Error::NoDevices)));
        assert!(matches!(run(vec![login(crate::Kind::Light)], plan(10.0)).await, Err(Error::NotASensor { .. })));
    }
}
