//! Delivery to clean sessions on the publisher's own thread, without a router link each.
//!
//! A clean session (clean_session 1) keeps nothing once its connection ends, so it needs nothing
//! a router link holds: not the router's queues for it (tens of KiB per connection), nor the hop
//! through the router's thread, which costs every message two hand-overs between threads. Its
//! subscriptions live in this table instead, and a message published by any client or by the hub
//! is put at once into the [`Mailbox`] of each clean session it matches, which wakes that
//! session's task; the session numbers the deliveries and keeps them in flight ([`Outgoing`]).
//!
//! The router still serves what only it can: persistent sessions (it queues for them while they
//! are away) and the hub's own links (the bridge, the web app, the status echo). A message from a
//! clean session goes to the router, through one link all clean sessions share, only when one of
//! those links' filters matches it ([`Local::want`]), or when it is retained: the router keeps the
//! retained messages its subscribers get at SUBSCRIBE, as this table keeps them for clean sessions.
//!
//! The rules are MQTT 3.1.1's: wildcards never match a topic starting with `$`; a message goes
//! once to a session however many of its filters match, at the highest of their QoS (lowered to
//! the publish QoS); the RETAIN flag is set only on the retained messages a SUBSCRIBE brings.
//! A session that does not read is given at most [`MAX_QUEUED_BYTES`]; past that its messages
//! are dropped, and the hub told, once per episode, as it is of the router's skips ([`super::lag`]).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::task::AtomicWaker;
use tokio::sync::mpsc;

/// A table keyed by numbers of the hub's own making (sessions' seats, packet ids), looked up at
/// every message: foldhash, seeded per process, where std's SipHash took a twentieth of the
/// instructions the hub ran per message. Tables keyed by what clients choose (filters, topics)
/// keep SipHash: foldhash does not claim to hold against a client that probes it.
type OwnMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Bytes (topics and payloads) waiting for one session that does not read, beyond which its
/// messages are dropped: what the router keeps for one filter (5 segments of 256 KiB).
pub const MAX_QUEUED_BYTES: usize = 5 * 256 * 1024;

/// Counted per queued message beyond its topic and payload.
const QUEUED_OVERHEAD: usize = 64;

/// Deliveries at QoS 1 and 2 awaiting the client's answer, per session (as the router's).
pub const MAX_INFLIGHT: usize = 100;

/// The QoS of the hub's own messages: delivered at the subscription's, as the router does.
pub const AT_SUBSCRIPTION_QOS: u8 = 2;

/// One message for one session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub topic: Bytes,
    pub payload: Bytes,
    /// The lower of the publish QoS and the subscription's.
    pub qos: u8,
    /// Set only for a retained message sent because of a new subscription.
    pub retain: bool,
}

impl Delivery {
    /// Appends the PUBLISH that carries this delivery with packet id `pkid` (unused at QoS 0).
    pub fn encode(&self, pkid: u16, out: &mut BytesMut) {
        let mut remaining = 2 + self.topic.len() + self.payload.len();
        if self.qos > 0 {
            remaining += 2;
        }
        out.reserve(5 + remaining);
        out.put_u8(0b0011_0000 | (self.qos.min(2) << 1) | u8::from(self.retain));
        // The remaining length, 7 bits at a time (MQTT 3.1.1 §2.2.3).
        loop {
            let byte = (remaining % 128) as u8;
            remaining /= 128;
            if remaining == 0 {
                out.put_u8(byte);
                break;
            }
            out.put_u8(byte | 0x80);
        }
        // Topics are at most `guard::MAX_TOPIC_BYTES` long.
        out.put_u16(u16::try_from(self.topic.len()).unwrap_or(u16::MAX));
        out.extend_from_slice(&self.topic);
        if self.qos > 0 {
            out.put_u16(pkid);
        }
        out.extend_from_slice(&self.payload);
    }
}

/// A clean session's queue of deliveries, filled by publishers and emptied by its task.
#[derive(Debug)]
pub struct Mailbox {
    queue: Mutex<Queue>,
    /// Set when a delivery is queued, cleared when the session's task sees it: a flag and a
    /// waker rather than a `Notify`, whose wait takes a lock each time it is polled.
    rung: AtomicBool,
    waker: AtomicWaker,
    /// Deliveries wait: set and cleared under the queue's lock, read without it.
    filled: AtomicBool,
    /// Named to [`super::lag`] when messages are dropped.
    name: String,
}

#[derive(Debug, Default)]
struct Queue {
    items: VecDeque<Delivery>,
    bytes: usize,
    /// Dropping since the queue was last emptied (reported once per episode).
    lagging: bool,
}

impl Mailbox {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues a delivery, or drops it past the bound; true if that began an episode of drops.
    fn push(&self, delivery: Delivery) -> bool {
        let size = delivery.topic.len() + delivery.payload.len() + QUEUED_OVERHEAD;
        {
            let mut q = self.lock();
            if q.bytes + size > MAX_QUEUED_BYTES {
                return !std::mem::replace(&mut q.lagging, true);
            }
            q.bytes += size;
            q.items.push_back(delivery);
            self.filled.store(true, Ordering::Release);
        }
        self.rung.store(true, Ordering::Release);
        self.waker.wake();
        false
    }

    /// Moves at most `most` deliveries, oldest first, to `into`; true if none is left.
    pub fn take(&self, most: usize, into: &mut Vec<Delivery>) -> bool {
        // Most calls find it empty: they take no lock.
        if !self.filled.load(Ordering::Acquire) {
            return true;
        }
        let mut q = self.lock();
        let q = &mut *q;
        let n = most.min(q.items.len());
        for d in q.items.drain(..n) {
            q.bytes -= d.topic.len() + d.payload.len() + QUEUED_OVERHEAD;
            into.push(d);
        }
        if q.items.is_empty() {
            q.lagging = false;
            self.filled.store(false, Ordering::Release);
        }
        q.items.is_empty()
    }

    /// Whether deliveries wait.
    pub fn is_empty(&self) -> bool {
        self.lock().items.is_empty()
    }

    /// Ready once something was put in the mailbox since it was last ready (or was created).
    pub fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.rung.swap(false, Ordering::Acquire) {
            return Poll::Ready(());
        }
        // Registered before looking again, so that a delivery queued in between wakes it.
        self.waker.register(cx.waker());
        match self.rung.swap(false, Ordering::Acquire) {
            true => Poll::Ready(()),
            false => Poll::Pending,
        }
    }

    /// Resolves once something was put in the mailbox since it last resolved (or was created).
    pub async fn ready(&self) {
        std::future::poll_fn(|cx| self.poll_ready(cx)).await;
    }
}

/// Whom a message reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reach {
    /// Clean sessions it was put in the mailbox of.
    pub sessions: usize,
    /// The router must have it too.
    pub router: bool,
}

/// A session's place in the table; [`Local::leave`] it when the connection ends.
#[derive(Debug)]
pub struct Seat {
    id: u64,
    pub mailbox: Arc<Mailbox>,
}

/// Subscriptions of clean sessions, retained messages, and the filters of the router's own
/// subscribers; shared by every session and the hub's links.
#[derive(Debug, Default)]
pub struct Local {
    table: Mutex<Table>,
    /// Told the name of each session that begins losing messages.
    lagging: Option<mpsc::UnboundedSender<String>>,
}

#[derive(Debug, Default)]
struct Table {
    next: u64,
    seats: OwnMap<u64, Seated>,
    /// Filters without wildcards, by topic: most of a house's (a device's own command topic).
    exact: HashMap<String, Exact>,
    /// Filters with wildcards.
    wild: Vec<(Wild, u64, u8)>,
    /// Retained messages by topic, with their publish QoS.
    retained: HashMap<String, (Bytes, u8)>,
    /// Wildcard filters of the router's subscribers (persistent sessions, the hub's links); their
    /// exact ones are marked in `exact`. Kept until the hub restarts, as the router keeps them;
    /// bounded by the sessions' filter budget.
    router_wild: Vec<Wild>,
    /// The sessions one message goes to: kept between messages, so that publishing allocates nothing.
    targets: Vec<(u64, u8)>,
}

/// Who holds one exact filter: one lookup per message finds both.
#[derive(Debug, Default)]
struct Exact {
    /// Clean sessions, with their QoS.
    sessions: Vec<(u64, u8)>,
    /// A subscriber of the router.
    router: bool,
}

#[derive(Debug)]
struct Seated {
    mailbox: Arc<Mailbox>,
    filters: Vec<String>,
}

impl Local {
    /// A table that tells `lagging` of sessions losing messages.
    pub fn new(lagging: mpsc::UnboundedSender<String>) -> Local {
        Local { table: Mutex::default(), lagging: Some(lagging) }
    }

    fn deliver(&self, mailbox: &Mailbox, delivery: Delivery) {
        if mailbox.push(delivery) {
            if let Some(lagging) = &self.lagging {
                let _ = lagging.send(mailbox.name.clone());
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Gives a clean session a mailbox; `name` is how lag reports name it.
    pub fn join(&self, name: &str) -> Seat {
        let mailbox = Arc::new(Mailbox {
            queue: Mutex::default(),
            rung: AtomicBool::new(false),
            waker: AtomicWaker::new(),
            filled: AtomicBool::new(false),
            name: name.to_owned(),
        });
        let mut t = self.lock();
        t.next += 1;
        let id = t.next;
        t.seats.insert(id, Seated { mailbox: Arc::clone(&mailbox), filters: Vec::new() });
        Seat { id, mailbox }
    }

    /// Removes a session and its subscriptions.
    pub fn leave(&self, seat: &Seat) {
        let mut t = self.lock();
        if let Some(seated) = t.seats.remove(&seat.id) {
            for filter in seated.filters {
                t.remove(seat.id, &filter);
            }
        }
    }

    /// Subscribes a session to a filter (the guard and the ACL passed it) at `qos`, replacing a
    /// subscription it held to the same filter, and puts the retained messages it matches in the
    /// session's mailbox.
    pub fn subscribe(&self, seat: &Seat, filter: &str, qos: u8) {
        let mut t = self.lock();
        t.remove(seat.id, filter);
        match is_wild(filter) {
            true => t.wild.push((Wild::new(filter), seat.id, qos)),
            false => t.exact.entry(filter.to_owned()).or_default().sessions.push((seat.id, qos)),
        }
        if let Some(seated) = t.seats.get_mut(&seat.id) {
            if !seated.filters.iter().any(|f| f == filter) {
                seated.filters.push(filter.to_owned());
            }
        }
        for (topic, (payload, published)) in &t.retained {
            if matches(filter, topic) {
                let topic = Bytes::copy_from_slice(topic.as_bytes());
                let qos = qos.min(*published);
                self.deliver(&seat.mailbox, Delivery { topic, payload: payload.clone(), qos, retain: true });
            }
        }
    }

    /// Removes a session's subscription to a filter, if it held one.
    pub fn unsubscribe(&self, seat: &Seat, filter: &str) {
        let mut t = self.lock();
        t.remove(seat.id, filter);
        if let Some(seated) = t.seats.get_mut(&seat.id) {
            seated.filters.retain(|f| f != filter);
        }
    }

    /// Records a filter the router's subscribers hold: messages it matches go to the router too.
    pub fn want(&self, filter: &str) {
        let mut t = self.lock();
        match is_wild(filter) {
            true if !t.router_wild.iter().any(|f| f.filter == filter) => t.router_wild.push(Wild::new(filter)),
            true => {}
            false => t.exact.entry(filter.to_owned()).or_default().router = true,
        }
    }

    /// Delivers a message that passed every check to the clean sessions it matches (`qos`: its
    /// publish QoS), keeps it if retained (an empty payload clears), and says whom it reached and
    /// whether the router must have it too. `topic` passed the guard; its bytes are shared by
    /// every delivery.
    pub fn publish(&self, topic: &Bytes, payload: &Bytes, qos: u8, retain: bool) -> Reach {
        match std::str::from_utf8(topic) {
            Ok(name) => self.publish_named(topic, name, payload, qos, retain),
            Err(_) => Reach { sessions: 0, router: false },
        }
    }

    /// [`Local::publish`] for a topic the guard has read as `name` already.
    pub fn publish_named(&self, topic: &Bytes, name: &str, payload: &Bytes, qos: u8, retain: bool) -> Reach {
        debug_assert_eq!(topic.as_ref(), name.as_bytes());
        let mut t = self.lock();
        let t = &mut *t;
        if retain {
            match payload.is_empty() {
                true => drop(t.retained.remove(name)),
                false => drop(t.retained.insert(name.to_owned(), (payload.clone(), qos))),
            }
        }
        let exact = t.exact.get(name);
        let targets = &mut t.targets;
        targets.clear();
        targets.extend(exact.into_iter().flat_map(|e| e.sessions.iter()).copied());
        targets.extend(t.wild.iter().filter(|(f, _, _)| f.matches(name)).map(|(_, id, q)| (*id, *q)));
        if targets.len() > 1 {
            // Once per session, at the highest QoS of its matching filters.
            targets.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
            targets.dedup_by_key(|(id, _)| *id);
        }
        let mut sessions = 0;
        for &(id, sub_qos) in targets.iter() {
            if let Some(seated) = t.seats.get(&id) {
                let delivery =
                    Delivery { topic: topic.clone(), payload: payload.clone(), qos: qos.min(sub_qos), retain: false };
                self.deliver(&seated.mailbox, delivery);
                sessions += 1;
            }
        }
        let router = retain || exact.is_some_and(|e| e.router) || t.router_wild.iter().any(|f| f.matches(name));
        Reach { sessions, router }
    }

    /// Clean sessions seated now.
    pub fn seated(&self) -> usize {
        self.lock().seats.len()
    }
}

impl Table {
    fn remove(&mut self, id: u64, filter: &str) {
        match is_wild(filter) {
            true => self.wild.retain(|(f, i, _)| !(*i == id && f.filter == filter)),
            false => {
                if let Some(exact) = self.exact.get_mut(filter) {
                    exact.sessions.retain(|(i, _)| *i != id);
                    if exact.sessions.is_empty() && !exact.router {
                        self.exact.remove(filter);
                    }
                }
            }
        }
    }
}

fn is_wild(filter: &str) -> bool {
    filter.contains(['+', '#'])
}

/// Whether a topic name matches a subscription filter (MQTT 3.1.1 §4.7): `+` is one level, `#`
/// (last) the rest including none, and a topic starting with `$` matches no wildcard first level.
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    topic.starts_with(literal(filter)) && levels_match(filter, topic)
}

/// The filter's text before its first wildcard, which starts every topic it matches (less the
/// `/` before a last `#`, which also matches the level above it): most filters are told apart there.
fn literal(filter: &str) -> &str {
    match filter.bytes().position(|b| b == b'+' || b == b'#') {
        Some(at) if filter[at..].starts_with('#') => filter[..at].strip_suffix('/').unwrap_or(&filter[..at]),
        Some(at) => &filter[..at],
        None => filter,
    }
}

/// Whether the topic's levels match the filter's (the `$` rule aside).
fn levels_match(filter: &str, topic: &str) -> bool {
    // Levels as bytes: `/` is one byte in UTF-8 and in no other character's encoding.
    let mut levels = topic.as_bytes().split(|&b| b == b'/');
    for f in filter.as_bytes().split(|&b| b == b'/') {
        if f == b"#" {
            return true;
        }
        match levels.next() {
            Some(level) if f == b"+" || f == level => {}
            _ => return false,
        }
    }
    levels.next().is_none()
}

/// A filter with wildcards, read once when subscribed, matched at every message.
#[derive(Debug)]
struct Wild {
    filter: String,
    shape: Shape,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// `#`: every topic but the `$` ones.
    All,
    /// `P/#` with no `+`: `P` (this many bytes) and every topic under it.
    Under(usize),
    /// Any other: topics start with its first this many bytes ([`literal`]), then levels decide.
    Levels(usize),
}

impl Wild {
    fn new(filter: &str) -> Wild {
        let shape = match filter.strip_suffix("#") {
            Some("") => Shape::All,
            Some(under) if under.ends_with('/') && !under.contains(['+', '#']) => Shape::Under(under.len() - 1),
            _ => Shape::Levels(literal(filter).len()),
        };
        Wild { filter: filter.to_owned(), shape }
    }

    /// [`matches`], for this filter.
    fn matches(&self, topic: &str) -> bool {
        match self.shape {
            Shape::All => !topic.starts_with('$'),
            Shape::Under(len) => {
                let under = &self.filter.as_bytes()[..len];
                topic.as_bytes().starts_with(under) && topic.as_bytes().get(len).is_none_or(|&b| b == b'/')
            }
            Shape::Levels(len) => {
                // A `$` topic matches no filter that starts with a wildcard.
                let dollar = topic.starts_with('$') && len == 0;
                !dollar
                    && topic.as_bytes().starts_with(&self.filter.as_bytes()[..len])
                    && levels_match(&self.filter, topic)
            }
        }
    }
}

/// The deliveries at QoS 1 and 2 a clean session has in flight: packet ids, and the client's
/// part of each flow. Pure, like [`super::acks`]: the session says what happened and acts on the
/// answer. A clean session resends nothing (MQTT 3.1.1 §4.4: only on reconnection, and it keeps
/// nothing across one), so an unknown or repeated acknowledgement is dropped.
#[derive(Debug, Default)]
pub struct Outgoing {
    last: u16,
    inflight: OwnMap<u16, Stage>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
/// What the client owes a delivery next.
enum Stage {
    Puback,
    Pubrec,
    Pubcomp,
}

impl Outgoing {
    /// How many more deliveries may be sent before some are acknowledged.
    pub fn room(&self) -> usize {
        MAX_INFLIGHT.saturating_sub(self.inflight.len())
    }

    /// How many PUBACKs the client owes, if that is all it owes: `None` while a QoS 2 delivery is
    /// in flight.
    pub fn owed_pubacks(&self) -> Option<usize> {
        self.inflight.values().try_fold(0, |n, stage| (*stage == Stage::Puback).then_some(n + 1))
    }

    /// The packet id for a delivery at `qos` (0 for QoS 0, which is not kept). Call only with room.
    pub fn send(&mut self, qos: u8) -> u16 {
        if qos == 0 {
            return 0;
        }
        loop {
            self.last = self.last.checked_add(1).unwrap_or(1);
            if !self.inflight.contains_key(&self.last) {
                break;
            }
        }
        self.inflight.insert(self.last, if qos == 1 { Stage::Puback } else { Stage::Pubrec });
        self.last
    }

    /// The client sent PUBACK.
    pub fn puback(&mut self, pkid: u16) {
        if self.inflight.get(&pkid) == Some(&Stage::Puback) {
            self.inflight.remove(&pkid);
        }
    }

    /// The client sent PUBREC: true if PUBREL is to be sent (once: a repeat is dropped, as the
    /// router drops it).
    pub fn pubrec(&mut self, pkid: u16) -> bool {
        match self.inflight.get_mut(&pkid) {
            Some(stage @ Stage::Pubrec) => {
                *stage = Stage::Pubcomp;
                true
            }
            _ => false,
        }
    }

    /// The client sent PUBCOMP.
    pub fn pubcomp(&mut self, pkid: u16) {
        if self.inflight.get(&pkid) == Some(&Stage::Pubcomp) {
            self.inflight.remove(&pkid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn drain(seat: &Seat) -> Vec<Delivery> {
        let mut out = Vec::new();
        seat.mailbox.take(usize::MAX, &mut out);
        out
    }

    fn topics(seat: &Seat) -> Vec<(String, u8, bool)> {
        drain(seat).into_iter().map(|d| (String::from_utf8_lossy(&d.topic).into_owned(), d.qos, d.retain)).collect()
    }

    #[test]
    fn wildcards_match_as_mqtt_says() {
        let cases = [
            ("#", "a", true),
            ("#", "a/b/c", true),
            ("#", "/", true),
            ("a/#", "a", true),
            ("a/#", "a/b", true),
            ("a/#", "ab", false),
            ("a/+", "a/b", true),
            ("a/+", "a/", true),
            ("a/+", "a", false),
            ("a/+", "a/b/c", false),
            ("+/+", "/", true),
            ("+", "/a", false),
            ("a/b", "a/b", true),
            ("a/b", "a/b/", false),
            ("a/b/", "a/b", false),
            ("+/b/#", "x/b", true),
            ("#", "$SYS/x", false),
            ("+/x", "$SYS/x", false),
            ("$SYS/#", "$SYS/x", true),
            ("dpi/+/set", "dpi/lamp/set", true),
            ("dpi/+/set", "dpi/lamp/state", false),
        ];
        for (filter, topic, expected) in cases {
            assert_eq!(matches(filter, topic), expected, "{filter} against {topic}");
            if is_wild(filter) {
                assert_eq!(Wild::new(filter).matches(topic), expected, "{filter} against {topic}, read once");
            }
        }
    }

    #[test]
    fn matching_agrees_with_the_router_on_random_filters_and_topics() {
        // Levels from a small alphabet, so that matches are frequent; the router's own function
        // is the reference for what sessions on the router get.
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let level = |r: u64| ["a", "b", "", "ab"][r as usize];
        for _ in 0..20_000 {
            let topic: Vec<&str> = (0..=next(3)).map(|_| level(next(4))).collect();
            let topic = topic.join("/");
            let count = 1 + next(4);
            let filter: Vec<&str> = (0..count)
                .map(|i| match next(6) {
                    0 => "+",
                    1 if i == count - 1 => "#",
                    r => level(r % 4),
                })
                .collect();
            let filter = filter.join("/");
            if crate::broker::guard::filter(&filter).is_err() || topic.is_empty() {
                continue;
            }
            let router = rumqttd::protocol::matches(&topic, &filter);
            assert_eq!(matches(&filter, &topic), router, "{filter} against {topic}");
            if is_wild(&filter) {
                assert_eq!(Wild::new(&filter).matches(&topic), router, "{filter} against {topic}, read once");
            }
        }
    }

    #[test]
    fn a_message_reaches_each_matching_session_once_at_the_highest_qos() {
        let local = Local::default();
        let (a, b, c) = (local.join("a"), local.join("b"), local.join("c"));
        local.subscribe(&a, "dpi/#", 0);
        local.subscribe(&a, "dpi/lamp/set", 1);
        local.subscribe(&b, "dpi/+/set", 2);
        local.subscribe(&c, "dpi/other/set", 1);
        let payload = Bytes::from_static(b"{}");
        let reach = local.publish(&Bytes::from_static(b"dpi/lamp/set"), &payload, 2, false);
        assert_eq!(reach, Reach { sessions: 2, router: false });
        assert_eq!(topics(&a), [("dpi/lamp/set".to_owned(), 1, false)]);
        assert_eq!(topics(&b), [("dpi/lamp/set".to_owned(), 2, false)]);
        assert!(topics(&c).is_empty());
        // Lowered to the publish QoS.
        local.publish(&Bytes::from_static(b"dpi/lamp/set"), &payload, 0, false);
        assert_eq!(topics(&b), [("dpi/lamp/set".to_owned(), 0, false)]);
    }

    #[tokio::test]
    async fn a_mailbox_wakes_its_session_once_per_batch_of_deliveries() {
        use std::future::Future;
        let local = Arc::new(Local::default());
        let a = local.join("a");
        local.subscribe(&a, "t", 0);
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        // Filled before the session waits: ready at once; then nothing more, so it waits.
        local.publish(&Bytes::from_static(b"t"), &Bytes::new(), 0, false);
        local.publish(&Bytes::from_static(b"t"), &Bytes::new(), 0, false);
        assert!(std::pin::pin!(a.mailbox.ready()).poll(&mut cx).is_ready());
        assert!(std::pin::pin!(a.mailbox.ready()).poll(&mut cx).is_pending());
        // A delivery from another thread wakes a session waiting on this runtime.
        let mailbox = Arc::clone(&a.mailbox);
        let waiting = tokio::spawn(async move { mailbox.ready().await });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        let other = Arc::clone(&local);
        std::thread::spawn(move || other.publish(&Bytes::from_static(b"t"), &Bytes::new(), 0, false)).join().unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(10), waiting).await.expect("woken").unwrap();
        assert_eq!(topics(&a).len(), 3);
    }

    #[test]
    fn retained_messages_come_with_a_new_subscription_and_are_cleared_by_an_empty_one() {
        let local = Local::default();
        let live = local.join("live");
        local.subscribe(&live, "dpi/#", 1);
        local.publish(&Bytes::from_static(b"dpi/door/state"), &Bytes::from_static(b"{\"contact\":\"open\"}"), 1, true);
        local.publish(
            &Bytes::from_static(b"dpi/hub/status"),
            &Bytes::from_static(b"online"),
            AT_SUBSCRIPTION_QOS,
            true,
        );
        // Live subscribers get the message without the flag.
        assert_eq!(topics(&live).iter().filter(|(_, _, retain)| *retain).count(), 0);
        let late = local.join("late");
        local.subscribe(&late, "dpi/+/state", 2);
        assert_eq!(topics(&late), [("dpi/door/state".to_owned(), 1, true)]);
        // The clearing message itself reaches subscribers, live.
        local.publish(&Bytes::from_static(b"dpi/door/state"), &Bytes::new(), 1, true);
        assert_eq!(topics(&late), [("dpi/door/state".to_owned(), 1, false)]);
        local.subscribe(&late, "dpi/#", 0);
        assert_eq!(topics(&late), [("dpi/hub/status".to_owned(), 0, true)]);
    }

    #[test]
    fn unsubscribing_and_leaving_stop_deliveries() {
        let local = Local::default();
        let (a, b) = (local.join("a"), local.join("b"));
        local.subscribe(&a, "x/+", 1);
        local.subscribe(&a, "x/y", 1);
        local.subscribe(&b, "x/y", 1);
        local.unsubscribe(&a, "x/+");
        local.publish(&Bytes::from_static(b"x/y"), &Bytes::new(), 1, false);
        assert_eq!(drain(&a).len(), 1);
        local.leave(&a);
        local.publish(&Bytes::from_static(b"x/y"), &Bytes::new(), 1, false);
        assert!(drain(&a).is_empty());
        assert_eq!(drain(&b).len(), 2);
        local.leave(&b);
        assert_eq!(local.seated(), 0);
        let t = local.lock();
        assert!(t.exact.is_empty() && t.wild.is_empty());
    }

    #[test]
    fn the_router_gets_what_its_subscribers_match_and_every_retained_message() {
        let local = Local::default();
        let none = Bytes::new();
        assert!(!local.publish(&Bytes::from_static(b"bench/pace/1"), &none, 1, false).router);
        assert!(local.publish(&Bytes::from_static(b"bench/pace/1"), &none, 1, true).router);
        local.want("dpi/+/state");
        local.want("dpi/hub/status");
        assert!(local.publish(&Bytes::from_static(b"dpi/door/state"), &none, 1, false).router);
        assert!(local.publish(&Bytes::from_static(b"dpi/hub/status"), &none, 0, false).router);
        assert!(!local.publish(&Bytes::from_static(b"dpi/door/set"), &none, 1, false).router);
        // A clean session on a filter the router's subscribers hold too: both get the message,
        // and the router still does once the session has left.
        let a = local.join("a");
        local.subscribe(&a, "dpi/hub/status", 1);
        let status = Bytes::from_static(b"dpi/hub/status");
        assert_eq!(local.publish(&status, &none, 1, false), Reach { sessions: 1, router: true });
        local.leave(&a);
        assert_eq!(local.publish(&status, &none, 1, false), Reach { sessions: 0, router: true });
        // And the other way round: a router filter given after a session's, kept after it leaves.
        let b = local.join("b");
        local.subscribe(&b, "dpi/lamp/set", 1);
        local.want("dpi/lamp/set");
        local.leave(&b);
        assert!(local.publish(&Bytes::from_static(b"dpi/lamp/set"), &none, 1, false).router);
    }

    #[test]
    fn a_session_that_does_not_read_loses_messages_past_its_bound_not_the_others() {
        let (lagging, mut told) = mpsc::unbounded_channel();
        let local = Local::new(lagging);
        let (slow, fine) = (local.join("slow"), local.join("fine"));
        local.subscribe(&slow, "#", 1);
        local.subscribe(&fine, "#", 1);
        let payload = Bytes::from(vec![b'x'; 1000]);
        let sent = 2 * MAX_QUEUED_BYTES / 1000;
        for n in 0..sent {
            local.publish(&Bytes::from_static(b"t"), &payload, 1, false);
            if n % 10 == 0 {
                drain(&fine);
            }
        }
        let kept = drain(&slow).len();
        assert!(kept < sent && kept >= MAX_QUEUED_BYTES / (1000 + 1 + QUEUED_OVERHEAD), "{kept}");
        assert!(slow.mailbox.is_empty());
        assert_eq!(told.try_recv().ok().as_deref(), Some("slow"));
        assert!(told.try_recv().is_err(), "told more than once, or of the reader");
        // Room again once read; a second episode is told again.
        local.publish(&Bytes::from_static(b"t"), &payload, 1, false);
        assert_eq!(drain(&slow).len(), 1);
        for _ in 0..sent {
            local.publish(&Bytes::from_static(b"t"), &payload, 1, false);
            drain(&fine);
        }
        assert_eq!(told.try_recv().ok().as_deref(), Some("slow"));
    }

    #[test]
    fn a_delivery_is_encoded_as_the_router_decodes_a_publish() {
        use rumqttd::protocol::{v4::V4, Packet, Protocol};
        for (qos, retain, size) in
            [(0, false, 0), (1, true, 100), (2, false, 200), (1, false, 20_000), (0, true, 2_000_000)]
        {
            let topic = Bytes::from_static(b"dpi/lamp/set");
            let payload = Bytes::from(vec![b'p'; size]);
            let d = Delivery { topic: topic.clone(), payload: payload.clone(), qos, retain };
            let mut buf = BytesMut::new();
            d.encode(7, &mut buf);
            let len = buf.len();
            let Ok(Packet::Publish(p, _)) = V4.read_mut(&mut buf, usize::MAX) else { panic!("not a PUBLISH") };
            assert!(buf.is_empty(), "{len} bytes, some left");
            assert_eq!((&p.topic, &p.payload, p.retain), (&topic, &payload, retain));
            let mut again = BytesMut::new();
            V4.write(Packet::Publish(p, None), &mut again).unwrap();
            let mut mine = BytesMut::new();
            d.encode(7, &mut mine);
            assert_eq!(again, mine, "qos {qos}");
        }
    }

    #[test]
    fn packet_ids_stay_unique_in_flight_and_flows_complete() {
        let mut out = Outgoing::default();
        let ids: Vec<u16> = (0..MAX_INFLIGHT).map(|n| out.send(1 + (n % 2) as u8)).collect();
        assert_eq!(out.room(), 0);
        assert_eq!(ids.iter().collect::<HashSet<_>>().len(), MAX_INFLIGHT);
        assert!(ids.iter().all(|&id| id != 0));
        assert_eq!(out.send(0), 0);
        // A PUBACK for a QoS 2 delivery, or a PUBCOMP before PUBREC, settles nothing.
        out.puback(ids[1]);
        out.pubcomp(ids[1]);
        assert_eq!(out.room(), 0);
        out.puback(ids[0]);
        assert!(out.pubrec(ids[1]));
        assert!(!out.pubrec(ids[1]), "a repeated PUBREC is dropped");
        assert!(!out.pubrec(ids[2]), "PUBREC for a QoS 1 delivery");
        out.pubcomp(ids[1]);
        assert_eq!(out.room(), 2);
        // Ids wrap past 65535 and skip those still in flight.
        for _ in 0..70_000 {
            let id = out.send(1);
            assert_ne!(id, 0);
            out.puback(id);
        }
        assert_eq!(out.room(), 2);
    }
}
