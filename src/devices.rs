//! The device pipeline: every state and availability a device publishes is checked where it enters
//! (in the client's session, before the router sees it), then kept as the device's latest state
//! and written to SQLite coalesced with the retained messages, at most one transaction per
//! `store.commit_interval_ms`, so that a chatty sensor does not wear out the Pi's SD card.
//!
//! A payload that is not valid for the device's kind, or a message about a device the config does
//! not declare, is rejected: it never reaches another client, the stored state is unchanged, and
//! the session reports it on `dpi/hub/error`. A state equal to the one stored is not a change
//! (a sensor that reconnects, or a retained message replayed, does not count twice).
//!
//! Valid states and availability of the devices the alarm watches are also handed to the alarm
//! driver as they arrive, each state flagged when it is the first since the device (re)connected;
//! valid states of the devices the light rules use go to the lights driver the same way.
//!
//! This module must not decode payload grammar (that is [`crate::decode`]) nor run rules.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::config::DeviceKind;
use crate::decode::{self, DeviceState, Leaf};
use crate::store::{self, device_state::Change, Store};

/// What the pipeline learns from a session.
#[derive(Debug, Clone)]
pub enum DeviceEvent {
    /// A declared device reported a valid state.
    State { id: String, state: DeviceState },
    /// A declared device came online or went offline.
    Availability { id: String, online: bool },
    /// A message about an undeclared device was rejected.
    Rejected { id: String },
}

/// What a session should do with a PUBLISH, as far as devices are concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Not a device's state or availability topic, or a valid one: route it.
    Accept,
    /// Reject it, for this reason.
    Reject(String),
}

/// The sessions' handle on the pipeline.
#[derive(Debug, Clone)]
pub struct Pipeline {
    /// To the pipeline task.
    events: mpsc::UnboundedSender<DeviceEvent>,
    /// Declared devices and their kinds.
    kinds: Arc<HashMap<String, DeviceKind>>,
    /// Largest payload accepted.
    max_payload: usize,
    /// Gets the states and availability of the devices the alarm watches.
    alarm: crate::alarm::AlarmHandle,
    /// Gets the states of the devices the light rules use.
    lights: crate::lights::LightsHandle,
    /// Devices that came online and have not reported a state since: their next one is the first
    /// after connecting (SPEC §7: a sensor that reconnects is not a trip).
    reconnected: Arc<Mutex<HashSet<String>>>,
}

impl Pipeline {
    /// A pipeline for the declared devices; returns the handle and the task's input.
    pub fn new(
        kinds: HashMap<String, DeviceKind>,
        max_payload: usize,
        alarm: crate::alarm::AlarmHandle,
        lights: crate::lights::LightsHandle,
    ) -> (Pipeline, mpsc::UnboundedReceiver<DeviceEvent>) {
        let (events, rx) = mpsc::unbounded_channel();
        let reconnected = Arc::default();
        (Pipeline { events, kinds: Arc::new(kinds), max_payload, alarm, lights, reconnected }, rx)
    }

    /// Notes a device coming online or going offline, and tells the alarm.
    fn connection(&self, id: &str, online: bool) {
        let mut reconnected = self.reconnected.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if online {
            reconnected.insert(id.to_owned());
        } else {
            reconnected.remove(id);
        }
        drop(reconnected);
        self.alarm.availability(id, online);
    }

    /// What [`Pipeline::check`] would say of a PUBLISH, without acting on it (for a will at CONNECT).
    pub fn validate(&self, topic: &str, payload: &[u8]) -> Verdict {
        match self.judge(topic, payload) {
            Judged::Other | Judged::State(..) | Judged::Availability(..) => Verdict::Accept,
            Judged::Undeclared(id) => Verdict::Reject(format!("{id:?} is not a declared device")),
            Judged::Invalid(reason) => Verdict::Reject(reason),
        }
    }

    /// Checks a PUBLISH on `topic`; a valid device state or availability goes to the pipeline.
    pub fn check(&self, topic: &str, payload: &[u8]) -> Verdict {
        match self.judge(topic, payload) {
            Judged::Other => Verdict::Accept,
            Judged::Undeclared(id) => {
                let _ = self.events.send(DeviceEvent::Rejected { id: id.to_owned() });
                Verdict::Reject(format!("{id:?} is not a declared device"))
            }
            Judged::Invalid(reason) => Verdict::Reject(reason),
            Judged::State(id, state) => {
                let first = self.reconnected.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(id);
                self.alarm.device_state(id, &state, first);
                self.lights.device_state(id, &state);
                let _ = self.events.send(DeviceEvent::State { id: id.to_owned(), state });
                Verdict::Accept
            }
            Judged::Availability(id, online) => {
                self.connection(id, online);
                let _ = self.events.send(DeviceEvent::Availability { id: id.to_owned(), online });
                Verdict::Accept
            }
        }
    }

    /// What a PUBLISH is, as far as devices are concerned; acts on nothing.
    fn judge<'a>(&self, topic: &'a str, payload: &[u8]) -> Judged<'a> {
        let Some((id, leaf)) = decode::topic_parts(topic) else {
            return Judged::Other;
        };
        let Some(kind) = self.kinds.get(id) else {
            return Judged::Undeclared(id);
        };
        match leaf {
            Leaf::Set => Judged::Other,
            // An empty payload clears a retained message; it is no state.
            Leaf::State if payload.is_empty() => Judged::Other,
            Leaf::State => match decode::decode_state(*kind, payload, self.max_payload) {
                Ok(state) => Judged::State(id, state),
                Err(e) => Judged::Invalid(e.to_string()),
            },
            Leaf::Availability => match decode::decode_availability(payload) {
                Ok(online) => Judged::Availability(id, online),
                Err(e) => Judged::Invalid(e.to_string()),
            },
        }
    }

    /// Records a device's connection coming up or going down (the hub announces these itself).
    pub fn availability(&self, id: &str, online: bool) {
        self.connection(id, online);
        let _ = self.events.send(DeviceEvent::Availability { id: id.to_owned(), online });
    }
}

/// A PUBLISH as the pipeline sees it.
enum Judged<'a> {
    /// Not a device's state or availability (or an empty state, which clears a retained one).
    Other,
    /// About a device the config does not declare.
    Undeclared(&'a str),
    /// Not valid for the device's kind, for this reason.
    Invalid(String),
    /// A valid state of a declared device.
    State(&'a str, DeviceState),
    /// A valid availability of a declared device.
    Availability(&'a str, bool),
}

/// What the pipeline remembers of a device between writes.
#[derive(Debug, Default, Clone)]
struct Known {
    state: Option<String>,
    online: Option<bool>,
}

/// A change to a retained message: a payload sets the topic, `None` clears it.
pub type RetainedChange = (String, Option<bytes::Bytes>);

/// What the writer is fed, each on its own channel.
pub struct WriterInputs {
    /// Device states and availability from the pipeline.
    pub events: mpsc::UnboundedReceiver<DeviceEvent>,
    /// Retained messages set or cleared, from the sessions and the hub link.
    pub retained: mpsc::UnboundedReceiver<RetainedChange>,
    /// The alarm's checkpoints while a delay runs.
    pub alarm: mpsc::UnboundedReceiver<store::alarm::Checkpoint>,
}

/// One input, or why there is none.
enum Next {
    Event(DeviceEvent),
    Retained(RetainedChange),
    Alarm(store::alarm::Checkpoint),
    /// The deadline passed, or every channel is closed.
    Done,
}

/// The writer's channels and which of them are still open.
struct Inputs {
    inputs: WriterInputs,
    open: [bool; 3],
}

impl Inputs {
    fn any_open(&self) -> bool {
        self.open.iter().any(|o| *o)
    }

    /// The next input, waiting at most until `deadline` (forever with `None`).
    async fn next(&mut self, deadline: Option<tokio::time::Instant>) -> Next {
        let far = tokio::time::Instant::now() + Duration::from_secs(365 * 24 * 3600);
        while self.any_open() {
            let [events_open, retained_open, alarm_open] = self.open;
            let i = &mut self.inputs;
            tokio::select! {
                event = i.events.recv(), if events_open => match event {
                    Some(event) => return Next::Event(event),
                    None => self.open[0] = false,
                },
                change = i.retained.recv(), if retained_open => match change {
                    Some(change) => return Next::Retained(change),
                    None => self.open[1] = false,
                },
                checkpoint = i.alarm.recv(), if alarm_open => match checkpoint {
                    Some(checkpoint) => return Next::Alarm(checkpoint),
                    None => self.open[2] = false,
                },
                () = tokio::time::sleep_until(deadline.unwrap_or(far)) => return Next::Done,
            }
        }
        Next::Done
    }
}

/// Keeps devices' latest state and writes changes, coalesced, until every sender of every input
/// is gone; then writes what is left and returns.
///
/// This is the hub's one periodic writer: device states, their history, the retained messages
/// and the alarm's checkpoint changed during an interval go to SQLite together, in one
/// transaction, so the SD card sees at most one commit per `interval` whatever the load (history
/// is pruned in that same transaction, hourly). A write that fails (a full disk) is kept in
/// memory, bounded, and retried an interval later.
pub async fn run(store: Store, inputs: WriterInputs, interval: Duration, history_days: u32) {
    let mut known: HashMap<String, Known> = match store.call(|c| store::device_state::all(c)).await {
        Ok(rows) => rows.into_iter().map(|r| (r.id, Known { state: r.state, online: r.online })).collect(),
        Err(e) => {
            warn!(error = %e, "could not read stored device states; starting empty");
            HashMap::new()
        }
    };
    let mut inputs = Inputs { inputs, open: [true; 3] };
    let mut pending = Pending::default();
    let mut failing = false;
    let mut refused_logged = false;
    let mut last_prune = tokio::time::Instant::now() - Duration::from_secs(3600);
    while inputs.any_open() {
        // Wait for something to write (unless a failed write is waiting), then gather for one interval.
        if pending.is_empty() {
            let next = inputs.next(None).await;
            pending.take(next, &mut known);
        }
        let deadline = tokio::time::Instant::now() + interval;
        while pending.take(inputs.next(Some(deadline)).await, &mut known) {}
        if pending.is_empty() {
            continue;
        }
        let prune_before = (last_prune.elapsed() > Duration::from_secs(3600)).then(|| {
            let before = time::OffsetDateTime::now_utc() - time::Duration::days(i64::from(history_days));
            before.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
        });
        let batch = store::Batch {
            states: std::mem::take(&mut pending.states),
            retained: pending.retained.iter().map(|(t, p)| (t.clone(), p.as_ref().map(|b| b.to_vec()))).collect(),
            alarm: pending.checkpoint.clone(),
            prune_before,
        };
        let retry = batch.states.clone();
        let pruning = batch.prune_before.is_some();
        match store.call(move |c| store::write_batch(c, &batch)).await {
            Ok(refused) => {
                pending.retained.clear();
                pending.checkpoint = None;
                if pruning {
                    last_prune = tokio::time::Instant::now();
                }
                if failing {
                    info!("device states are being saved again");
                    failing = false;
                }
                if let (Some(first), false) = (refused.first(), refused_logged) {
                    refused_logged = true;
                    warn!(max = store::retained::MAX_TOPICS, %first, "too many retained topics: new ones are kept until restart only");
                }
            }
            Err(e) => {
                if !failing {
                    warn!(error = %e, "device states not saved (disk full?); kept in memory, retrying at the next interval");
                    failing = true;
                }
                // Keep what failed, bounded: the latest state per device is what matters.
                pending.states = compact(retry);
            }
        }
    }
}

/// What waits for the next write.
#[derive(Default)]
struct Pending {
    /// Device changes, in order.
    states: Vec<Change>,
    /// Latest payload per retained topic: a map, so a backlog stays bounded by the topics.
    retained: HashMap<String, Option<bytes::Bytes>>,
    /// The alarm's latest checkpoint.
    checkpoint: Option<store::alarm::Checkpoint>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.states.is_empty() && self.retained.is_empty() && self.checkpoint.is_none()
    }

    /// Adds an input; false when there was none (deadline passed or inputs closed).
    fn take(&mut self, next: Next, known: &mut HashMap<String, Known>) -> bool {
        match next {
            Next::Event(event) => absorb(event, known, &mut self.states),
            Next::Retained((topic, payload)) => drop(self.retained.insert(topic, payload)),
            Next::Alarm(newer) => self.checkpoint = Some(newer),
            Next::Done => return false,
        }
        true
    }
}

fn absorb(event: DeviceEvent, known: &mut HashMap<String, Known>, pending: &mut Vec<Change>) {
    let at = store::now_rfc3339();
    match event {
        DeviceEvent::State { id, state } => {
            let json = state.to_json();
            let entry = known.entry(id.clone()).or_default();
            if entry.state.as_deref() != Some(json.as_str()) {
                entry.state = Some(json.clone());
                pending.push(Change::State { id, json, at });
            }
        }
        DeviceEvent::Availability { id, online } => {
            let entry = known.entry(id.clone()).or_default();
            if entry.online != Some(online) {
                entry.online = Some(online);
                pending.push(Change::Availability { id, online, at });
            }
        }
        DeviceEvent::Rejected { id } => {
            let rejected = pending.iter().filter(|c| matches!(c, Change::Rejected { .. })).count();
            match pending.iter_mut().find_map(|c| match c {
                Change::Rejected { id: other, n } if *other == id => Some(n),
                _ => None,
            }) {
                Some(n) => *n += 1,
                // Bounded like the table: a client inventing ids costs nothing more past it.
                None if rejected >= store::device_state::MAX_REJECTED as usize => {}
                None => pending.push(Change::Rejected { id, n: 1 }),
            }
        }
    }
}

/// Shrinks a backlog that could not be written to the latest change per device and kind.
fn compact(changes: Vec<Change>) -> Vec<Change> {
    let mut seen = HashSet::new();
    let mut out: Vec<Change> = changes
        .into_iter()
        .rev()
        .filter(|c| {
            let key = match c {
                Change::State { id, .. } => (id.clone(), 0),
                Change::Availability { id, .. } => (id.clone(), 1),
                Change::Rejected { id, .. } => (id.clone(), 2),
            };
            seen.insert(key)
        })
        .collect();
    out.reverse();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipeline() -> (Pipeline, mpsc::UnboundedReceiver<DeviceEvent>) {
        let config = crate::config::Config::from_toml("[[device]]\nid = \"door\"\nkind = \"contact\"\n", None).unwrap();
        let (alarm, _inbox) = crate::alarm::channel(&config);
        let (lights, _inbox) = crate::lights::channel(&config);
        Pipeline::new(HashMap::from([("door".to_owned(), DeviceKind::Contact)]), 1024, alarm, lights)
    }

    #[test]
    fn checks_device_topics_and_passes_others() {
        let (p, mut rx) = pipeline();
        assert_eq!(p.check("house/note", b"anything"), Verdict::Accept);
        assert_eq!(p.check("dpi/door/state", b"OPEN"), Verdict::Accept);
        assert!(matches!(rx.try_recv(), Ok(DeviceEvent::State { .. })));
        assert!(matches!(p.check("dpi/door/state", b"{\"on\":true}"), Verdict::Reject(_)));
        assert!(
            matches!(p.check("dpi/ghost/state", b"OPEN"), Verdict::Reject(r) if r.contains("not a declared device"))
        );
        assert!(matches!(rx.try_recv(), Ok(DeviceEvent::Rejected { id }) if id == "ghost"));
        assert_eq!(p.check("dpi/door/set", b"{}"), Verdict::Accept);
        assert_eq!(p.check("dpi/door/state", b""), Verdict::Accept);
        assert!(matches!(p.check("dpi/door/availability", b"maybe"), Verdict::Reject(_)));
    }

    #[test]
    fn validating_a_will_acts_on_nothing() {
        let (p, mut rx) = pipeline();
        assert!(matches!(p.validate("dpi/ghost/state", b"OPEN"), Verdict::Reject(_)));
        assert!(matches!(p.validate("dpi/door/state", b"maybe"), Verdict::Reject(_)));
        assert_eq!(p.validate("dpi/door/state", b"OPEN"), Verdict::Accept);
        assert!(rx.try_recv().is_err(), "validate counted or recorded something");
    }

    #[test]
    fn an_unchanged_state_is_not_written_again() {
        let (p, mut rx) = pipeline();
        let mut known = HashMap::new();
        let mut pending = Vec::new();
        for payload in [&b"OPEN"[..], b"{\"contact\":\"open\"}", b"CLOSED"] {
            p.check("dpi/door/state", payload);
            absorb(rx.try_recv().unwrap(), &mut known, &mut pending);
        }
        assert_eq!(pending.len(), 2, "{pending:?}");
    }

    #[test]
    fn a_failed_backlog_keeps_the_latest_change_per_device() {
        let at = String::new();
        let s = |json: &str| Change::State { id: "d".into(), json: json.into(), at: at.clone() };
        assert_eq!(compact(vec![s("1"), s("2"), s("3")]), vec![s("3")]);
    }
}
