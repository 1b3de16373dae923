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
//! What a message means for the alarm and the light rules is not decided here: the house's
//! dispatcher ([`crate::dispatcher`]) judges each message with [`judge`], hands valid states on, and
//! records them here.
//!
//! This module must not decode payload grammar (that is [`crate::decode`]) nor run rules.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::config::DeviceKind;
use crate::decode::{self, DeviceState};
use crate::store::{self, device_state::Change, Store};
use crate::topics::{self, Leaf, Topic};

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

/// The dispatcher's handle on the pipeline: what it records goes to the writer.
#[derive(Debug, Clone)]
pub struct Pipeline {
    /// To the writer.
    events: mpsc::UnboundedSender<DeviceEvent>,
    /// Devices that came online and have not reported a state since: their next one is the first
    /// after connecting (SPEC §7: a sensor that reconnects is not a trip).
    reconnected: Arc<Mutex<HashSet<String>>>,
}

impl Pipeline {
    /// A pipeline; returns the handle and the writer's input.
    pub fn new() -> (Pipeline, mpsc::UnboundedReceiver<DeviceEvent>) {
        let (events, rx) = mpsc::unbounded_channel();
        (Pipeline { events, reconnected: Arc::default() }, rx)
    }

    /// Records a declared device coming online or going offline.
    pub fn availability(&self, id: &str, online: bool) {
        let mut reconnected = self.reconnected.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if online {
            reconnected.insert(id.to_owned());
        } else {
            reconnected.remove(id);
        }
        drop(reconnected);
        let _ = self.events.send(DeviceEvent::Availability { id: id.to_owned(), online });
    }

    /// Records a declared device's valid state; true when it is the first since it (re)connected.
    pub fn state(&self, id: &str, state: DeviceState) -> bool {
        let first = self.reconnected.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(id);
        let _ = self.events.send(DeviceEvent::State { id: id.to_owned(), state });
        first
    }

    /// Counts a message about an undeclared device.
    pub fn rejected(&self, id: &str) {
        let _ = self.events.send(DeviceEvent::Rejected { id: id.to_owned() });
    }
}

/// What a PUBLISH on `topic` is, as far as devices are concerned: `kinds` are the declared
/// devices, `max_payload` the largest state accepted. Acts on nothing.
pub fn judge<'a>(
    kinds: &HashMap<String, DeviceKind>,
    max_payload: usize,
    topic: &'a str,
    payload: &[u8],
) -> Judged<'a> {
    let Some(Topic::Device { id, leaf }) = topics::parse(topic) else {
        return Judged::Other;
    };
    let Some(kind) = kinds.get(id) else {
        return Judged::Undeclared(id);
    };
    match leaf {
        Leaf::Set => Judged::Other,
        // An empty payload clears a retained message; it is no state.
        Leaf::State if payload.is_empty() => Judged::Other,
        Leaf::State => match decode::decode_state(*kind, payload, max_payload) {
            Ok(state) => Judged::State(id, state),
            Err(e) => Judged::Invalid(e.to_string()),
        },
        Leaf::Availability => match decode::decode_availability(payload) {
            Ok(online) => Judged::Availability(id, online),
            Err(e) => Judged::Invalid(e.to_string()),
        },
    }
}

/// A PUBLISH as the pipeline sees it.
#[derive(Debug)]
pub enum Judged<'a> {
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
    /// States for the bridge's outbox.
    pub outbox: OutboxInput,
}

/// What the bridge gives the writer to append to its outbox in the writer's transactions.
#[derive(Debug)]
pub struct OutboxInput {
    /// The entries, in order (a closed channel when there is no bridge).
    pub entries: mpsc::UnboundedReceiver<store::outbox::Entry>,
    /// The outbox's bound (`bridge.max_queue`).
    pub max: usize,
    /// Woken once entries are written.
    pub written: Arc<tokio::sync::Notify>,
}

impl OutboxInput {
    /// The input of a hub without a bridge.
    pub fn none() -> OutboxInput {
        let (_, entries) = mpsc::unbounded_channel();
        OutboxInput { entries, max: 0, written: Arc::default() }
    }
}

/// One input, or why there is none.
enum Next {
    Event(DeviceEvent),
    Retained(RetainedChange),
    Alarm(store::alarm::Checkpoint),
    Outbox(store::outbox::Entry),
    /// The deadline passed, or every channel is closed.
    Done,
}

/// The writer's channels and which of them are still open.
struct Inputs {
    inputs: WriterInputs,
    open: [bool; 4],
}

impl Inputs {
    fn any_open(&self) -> bool {
        self.open.iter().any(|o| *o)
    }

    /// The next input, waiting at most until `deadline` (forever with `None`).
    async fn next(&mut self, deadline: Option<tokio::time::Instant>) -> Next {
        let far = tokio::time::Instant::now() + Duration::from_secs(365 * 24 * 3600);
        while self.any_open() {
            let [events_open, retained_open, alarm_open, outbox_open] = self.open;
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
                entry = i.outbox.entries.recv(), if outbox_open => match entry {
                    Some(entry) => return Next::Outbox(entry),
                    None => self.open[3] = false,
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
/// is pruned in that same transaction, hourly); each device and retained topic writes within its
/// budget ([`crate::wear`]). A write that fails (a full disk) is kept in
/// memory, bounded, and retried an interval later. `settings` (`[store]`) may change at a reload:
/// a new interval applies to the one being gathered, counted from its start.
pub async fn run(store: Store, inputs: WriterInputs, mut settings: watch::Receiver<crate::config::Store>) {
    let mut known: HashMap<String, Known> = match store.call(|c| store::device_state::all(c)).await {
        Ok(rows) => rows.into_iter().map(|r| (r.id, Known { state: r.state, online: r.online })).collect(),
        Err(e) => {
            warn!(error = %e, "could not read stored device states; starting empty");
            HashMap::new()
        }
    };
    let outbox_max = inputs.outbox.max;
    let outbox_written = Arc::clone(&inputs.outbox.written);
    let mut inputs = Inputs { inputs, open: [true; 4] };
    let mut pending = Pending::default();
    let mut failing = false;
    let mut refused_logged = false;
    let mut last_prune = tokio::time::Instant::now() - Duration::from_secs(3600);
    let mut thinner = crate::wear::Thinner::default();
    while inputs.any_open() {
        // Wait for something to write (unless a failed write is waiting, or a held change's
        // budget returns), then gather for one interval.
        if pending.is_empty() {
            let next = inputs.next(thinner.next_release()).await;
            pending.take(next, &mut known);
        }
        // A reload that changes the interval moves the end of the one being gathered.
        let gathering = tokio::time::Instant::now();
        loop {
            let deadline = gathering + settings.borrow_and_update().commit_interval;
            let next = tokio::select! {
                next = inputs.next(Some(deadline)) => next,
                Ok(()) = settings.changed() => continue,
            };
            if !pending.take(next, &mut known) {
                break;
            }
        }
        let history_days = settings.borrow().history_days;
        // What each device and retained topic may write now; the rest waits for its budget.
        let now = tokio::time::Instant::now();
        pending.states = thinner.states(std::mem::take(&mut pending.states), now);
        pending.retained = thinner.retained(std::mem::take(&mut pending.retained), now);
        if pending.is_empty() {
            continue;
        }
        let prune_before = (last_prune.elapsed() > Duration::from_secs(3600)).then(|| {
            let before = crate::wall::now_utc() - time::Duration::days(i64::from(history_days));
            store::rfc3339(before)
        });
        let batch = store::Batch {
            states: std::mem::take(&mut pending.states),
            retained: pending.retained.iter().map(|(t, p)| (t.clone(), p.as_ref().map(|b| b.to_vec()))).collect(),
            alarm: pending.checkpoint.clone(),
            prune_before,
            outbox: std::mem::take(&mut pending.outbox),
            outbox_max,
            thinned: thinner.take_thinned(),
        };
        let retry_outbox = batch.outbox.clone();
        let retry = batch.states.clone();
        let pruning = batch.prune_before.is_some();
        match store.call(move |c| store::write_batch(c, &batch)).await {
            Ok(refused) => {
                if !retry_outbox.is_empty() {
                    outbox_written.notify_one();
                }
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
                // Keep what failed, bounded: the latest state per device is what matters; the
                // outbox keeps its newest entries up to its bound.
                pending.states = compact(retry);
                let keep = retry_outbox.len().min(outbox_max);
                pending.outbox = retry_outbox[retry_outbox.len() - keep..].to_vec();
            }
        }
    }
    // Stopping: what waited for its budget is written now.
    let (states, retained) = thinner.drain();
    if !states.is_empty() || !retained.is_empty() {
        let batch = store::Batch {
            states,
            retained: retained.into_iter().map(|(t, p)| (t, p.map(|b| b.to_vec()))).collect(),
            alarm: None,
            prune_before: None,
            outbox: Vec::new(),
            outbox_max,
            thinned: thinner.take_thinned(),
        };
        if let Err(e) = store.call(move |c| store::write_batch(c, &batch)).await {
            warn!(error = %e, "device states held for the disk's sake not saved at shutdown");
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
    /// States for the bridge, in order.
    outbox: Vec<store::outbox::Entry>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.states.is_empty() && self.retained.is_empty() && self.checkpoint.is_none() && self.outbox.is_empty()
    }

    /// Adds an input; false when there was none (deadline passed or inputs closed).
    fn take(&mut self, next: Next, known: &mut HashMap<String, Known>) -> bool {
        match next {
            Next::Event(event) => absorb(event, known, &mut self.states),
            Next::Retained((topic, payload)) => drop(self.retained.insert(topic, payload)),
            Next::Alarm(newer) => self.checkpoint = Some(newer),
            Next::Outbox(entry) => self.outbox.push(entry),
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

    fn kinds() -> HashMap<String, DeviceKind> {
        HashMap::from([("door".to_owned(), DeviceKind::Contact)])
    }

    #[test]
    fn judges_device_topics_and_passes_others() {
        let k = kinds();
        let judge = |topic, payload: &[u8]| judge(&k, 1024, topic, payload);
        assert!(matches!(judge("house/note", b"anything"), Judged::Other));
        assert!(matches!(judge("dpi/door/state", b"OPEN"), Judged::State("door", _)));
        assert!(matches!(judge("dpi/door/state", b"{\"on\":true}"), Judged::Invalid(_)));
        assert!(matches!(judge("dpi/ghost/state", b"OPEN"), Judged::Undeclared("ghost")));
        assert!(matches!(judge("dpi/door/set", b"{}"), Judged::Other));
        assert!(matches!(judge("dpi/door/state", b""), Judged::Other));
        assert!(matches!(judge("dpi/door/availability", b"maybe"), Judged::Invalid(_)));
        assert!(matches!(judge("dpi/door/availability", b"online"), Judged::Availability("door", true)));
    }

    #[test]
    fn the_first_state_after_a_reconnect_is_flagged_once() {
        let (p, _rx) = Pipeline::new();
        let state = || decode::decode_state(DeviceKind::Contact, b"OPEN", 64).unwrap();
        p.availability("door", true);
        assert!(p.state("door", state()));
        assert!(!p.state("door", state()));
    }

    #[test]
    fn an_unchanged_state_is_not_written_again() {
        let (p, mut rx) = Pipeline::new();
        let mut known = HashMap::new();
        let mut pending = Vec::new();
        for payload in [&b"OPEN"[..], b"{\"contact\":\"open\"}", b"CLOSED"] {
            p.state("door", decode::decode_state(DeviceKind::Contact, payload, 64).unwrap());
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
