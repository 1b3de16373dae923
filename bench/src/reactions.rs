//! Sensor → rule → actuator latency on the hub: a motion sensor's state to the light command the
//! light rule sends, and an armed house's door opening to the siren command the alarm sends, each
//! idle and under background device traffic from the house simulator's load mode.
//!
//! Every client is a real device of the hub (its own login from `domoticpi device creds`) over TLS;
//! the light and the siren obey and report their state as a device would. Latency runs from the
//! sensor's `publish()` call to the command's arrival at the actuator, on one clock. Mosquitto has
//! no rules: this measurement is the hub's alone.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use domoticpi_house::{Endpoint, Kind as DeviceKind, LoadPlan, LoadStats, Login};
use rumqttc::{AsyncClient, Event, Outgoing, Packet, Publish, QoS};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::broker::{device_id, ALARM_CODE, DOOR, LIGHT, MOTION, SIREN};
use crate::client::{self, Target, Transport};
use crate::now_ns;
use crate::scenarios::{summarize, Outcome};

/// Longest wait for one command or state.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// One connected client whose incoming messages are stamped on arrival and queued.
struct Peer {
    client: AsyncClient,
    inbox: mpsc::UnboundedReceiver<(Publish, u64)>,
    task: JoinHandle<()>,
}

impl Peer {
    /// Connects `id` (a device logs in as itself), subscribes to `filter` if any.
    async fn connect(target: &Target, id: &str, filter: Option<&str>) -> Result<Peer> {
        let (client, mut eventloop) = client::connect(target, id, Transport::Tls).await?;
        if let Some(filter) = filter {
            client::subscribe(&client, &mut eventloop, filter, QoS::AtLeastOnce).await?;
        }
        let (tx, inbox) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if tx.send((p, now_ns())).is_err() {
                            return;
                        }
                    }
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        });
        Ok(Peer { client, inbox, task })
    }

    /// Publishes a retained QoS1 message and returns the time of the call.
    async fn publish(&self, topic: &str, payload: &str) -> Result<u64> {
        let at = now_ns();
        self.client.publish(topic, QoS::AtLeastOnce, true, payload.to_owned()).await.context("publishing")?;
        Ok(at)
    }

    /// Waits for a message on `topic` whose payload satisfies `want`; returns its arrival time.
    async fn expect(&mut self, topic: &str, what: &str, want: impl Fn(&serde_json::Value) -> bool) -> Result<u64> {
        let wait = async {
            while let Some((p, at)) = self.inbox.recv().await {
                if p.topic == topic && serde_json::from_slice(&p.payload).is_ok_and(|v| want(&v)) {
                    return Ok(at);
                }
            }
            Err(anyhow!("connection closed while waiting for {what} on {topic}"))
        };
        tokio::time::timeout(STEP_TIMEOUT, wait)
            .await
            .map_err(|_| anyhow!("no {what} on {topic} within {STEP_TIMEOUT:?}"))?
    }

    async fn close(self) {
        let _ = self.client.try_disconnect();
        let mut task = self.task;
        if tokio::time::timeout(Duration::from_secs(2), &mut task).await.is_err() {
            task.abort();
        }
    }
}

/// `{"on": on}` (or a bare ON/OFF, read as the same by the hub's devices).
fn is_on(v: &serde_json::Value, on: bool) -> bool {
    v.get("on").and_then(serde_json::Value::as_bool) == Some(on)
}

/// `cycles` motion → light and door → siren cycles idle, then again while `load_devices` fleet
/// sensors publish `load_rate` msg/s in all through the house simulator's load generator.
pub async fn reactions(target: &Target, cycles: usize, load_devices: usize, load_rate: f64) -> Result<Outcome> {
    let mut out = Outcome::default();
    let mut motion = Peer::connect(target, MOTION, None).await?;
    let mut light = Peer::connect(target, LIGHT, Some(&format!("dpi/{LIGHT}/set"))).await?;
    let door = Peer::connect(target, DOOR, None).await?;
    let mut siren = Peer::connect(target, SIREN, Some(&format!("dpi/{SIREN}/set"))).await?;
    let mut resident = Peer::connect(target, "bench-resident", Some("dpi/alarm/state")).await?;
    // Start from a known state: light off, door closed, siren off, alarm disarmed.
    light.publish(&format!("dpi/{LIGHT}/state"), r#"{"on":false}"#).await?;
    siren.publish(&format!("dpi/{SIREN}/state"), r#"{"on":false}"#).await?;
    door.publish(&format!("dpi/{DOOR}/state"), r#"{"contact":"closed"}"#).await?;
    resident.expect("dpi/alarm/state", "the alarm state", |v| v.get("state").is_some()).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;

    for loaded in [false, true] {
        let load = if loaded { Some(Load::start(target, load_devices, load_rate).await?) } else { None };
        let run = async {
            let mut light_ns = Vec::with_capacity(cycles);
            let mut siren_ns = Vec::with_capacity(cycles);
            for _ in 0..cycles {
                light_ns.push(motion_cycle(&mut motion, &mut light).await?);
            }
            for _ in 0..cycles {
                siren_ns.push(door_cycle(&door, &mut siren, &mut resident).await?);
            }
            anyhow::Ok((light_ns, siren_ns))
        };
        let result = run.await;
        let load_report = match load {
            Some(load) => Some(load.stop().await?),
            None => None,
        };
        let (mut light_ns, mut siren_ns) = result?;
        let condition = if loaded { format!("under {load_rate:.0} msg/s") } else { "idle".to_owned() };
        for (what, samples) in [("motion → light command", &mut light_ns), ("door → siren command", &mut siren_ns)]
        {
            let lat = summarize(samples).context("no samples")?;
            let prefix = format!("{what}, {condition}");
            out.push(format!("{prefix}: p50 (ms)"), lat.p50, 2);
            out.push(format!("{prefix}: p99 (ms)"), lat.p99, 2);
            out.push(format!("{prefix}: max (ms)"), lat.max, 2);
        }
        if let Some((sent, acked, errors, secs)) = load_report {
            out.notes.push(format!(
                "reactions {condition}: {load_devices} simulated sensors sent {sent} states in {secs:.1} s \
                 ({:.0} msg/s), {acked} acknowledged, {errors} errors",
                sent as f64 / secs.max(1e-6)
            ));
        }
    }
    out.notes.push(format!(
        "reactions: {cycles} cycles each; latency from the sensor's publish to the command's arrival at the \
         actuator, both TLS devices; the door → siren path includes the alarm's fsynced write"
    ));
    for peer in [motion, light, door, siren, resident] {
        peer.close().await;
    }
    Ok(out)
}

/// Motion → light on (measured), the light reports on; no more motion → light off after the
/// rule's delay, the light reports off.
async fn motion_cycle(motion: &mut Peer, light: &mut Peer) -> Result<u64> {
    let sent = motion.publish(&format!("dpi/{MOTION}/state"), r#"{"motion":true}"#).await?;
    let arrived = light.expect(&format!("dpi/{LIGHT}/set"), "an on command", |v| is_on(v, true)).await?;
    light.publish(&format!("dpi/{LIGHT}/state"), r#"{"on":true}"#).await?;
    motion.publish(&format!("dpi/{MOTION}/state"), r#"{"motion":false}"#).await?;
    light.expect(&format!("dpi/{LIGHT}/set"), "an off command", |v| is_on(v, false)).await?;
    light.publish(&format!("dpi/{LIGHT}/state"), r#"{"on":false}"#).await?;
    // Let the light's report reach the hub before the next motion.
    tokio::time::sleep(Duration::from_millis(50)).await;
    Ok(arrived.saturating_sub(sent))
}

/// Arm away, open the door → siren on (measured), disarm with the code → siren off, close the door.
async fn door_cycle(door: &Peer, siren: &mut Peer, resident: &mut Peer) -> Result<u64> {
    let state = |want: &'static str| move |v: &serde_json::Value| v.get("state").and_then(|s| s.as_str()) == Some(want);
    resident.publish("dpi/alarm/set", r#"{"action":"arm_away"}"#).await?;
    resident.expect("dpi/alarm/state", "armed_away", state("armed_away")).await?;
    let sent = door.publish(&format!("dpi/{DOOR}/state"), r#"{"contact":"open"}"#).await?;
    let arrived = siren.expect(&format!("dpi/{SIREN}/set"), "an on command", |v| is_on(v, true)).await?;
    siren.publish(&format!("dpi/{SIREN}/state"), r#"{"on":true}"#).await?;
    resident.publish("dpi/alarm/set", &format!(r#"{{"action":"disarm","code":"{ALARM_CODE}"}}"#)).await?;
    siren.expect(&format!("dpi/{SIREN}/set"), "an off command", |v| is_on(v, false)).await?;
    siren.publish(&format!("dpi/{SIREN}/state"), r#"{"on":false}"#).await?;
    resident.expect("dpi/alarm/state", "disarmed", state("disarmed")).await?;
    door.publish(&format!("dpi/{DOOR}/state"), r#"{"contact":"closed"}"#).await?;
    // Arming with the door still open would be refused: let its report reach the hub first.
    tokio::time::sleep(Duration::from_millis(50)).await;
    Ok(arrived.saturating_sub(sent))
}

/// Background traffic: the house simulator's load generator with the fleet's sensors.
struct Load {
    stats: Arc<LoadStats>,
    stop: CancellationToken,
    task: JoinHandle<Result<(), domoticpi_house::Error>>,
    started: std::time::Instant,
}

impl Load {
    /// Connects `devices` fleet sensors and starts publishing `rate` msg/s in all; returns once
    /// the first states are acknowledged.
    async fn start(target: &Target, devices: usize, rate: f64) -> Result<Load> {
        let endpoint = Endpoint { host: target.tls.ip().to_string(), port: target.tls.port(), ca: target.ca.clone() };
        let logins = (1..=devices)
            .map(|n| {
                let id = device_id(n);
                let password =
                    target.logins.get(&id).cloned().with_context(|| format!("no password for device {id}"))?;
                Ok(Login {
                    client_id: id.clone(),
                    username: id.clone(),
                    password,
                    device: id,
                    kind: DeviceKind::Motion,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let stats = Arc::new(LoadStats::default());
        let stop = CancellationToken::new();
        let plan = LoadPlan { rate, duration: None };
        let task = {
            let (stats, stop) = (Arc::clone(&stats), stop.clone());
            tokio::spawn(async move { domoticpi_house::run_load(&endpoint, logins, plan, stats, stop).await })
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while stats.acked.load(Ordering::Relaxed) < devices as u64 {
            if task.is_finished() {
                return match task.await {
                    Ok(Err(e)) => Err(anyhow!("load generator: {e}")),
                    _ => Err(anyhow!("load generator ended early")),
                };
            }
            if tokio::time::Instant::now() > deadline {
                stop.cancel();
                bail!("the load generator's devices did not get going within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Load { stats, stop, task, started: std::time::Instant::now() })
    }

    /// Stops the traffic: (sent, acknowledged, errors, seconds).
    async fn stop(self) -> Result<(u64, u64, u64, f64)> {
        let secs = self.started.elapsed().as_secs_f64();
        self.stop.cancel();
        match tokio::time::timeout(Duration::from_secs(10), self.task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => bail!("load generator: {e}"),
            Ok(Err(e)) => bail!("load generator task: {e}"),
            Err(_) => bail!("the load generator did not stop within 10 s"),
        }
        let s = &self.stats;
        Ok((s.sent.load(Ordering::Relaxed), s.acked.load(Ordering::Relaxed), s.errors.load(Ordering::Relaxed), secs))
    }
}
