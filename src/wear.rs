//! SD-card wear bounded whatever a device sends: each device (its states and availability) and each
//! retained topic may write a burst of [`BURST`] rows, then one per [`REFILL`]. What comes faster is
//! held in memory, the latest per device and kind (or per topic) only, and written when its budget
//! allows; what a newer change replaced while held is counted as thinned, never written.
//!
//! A device that flaps at 100 Hz, broken or hostile, therefore costs the disk no more than one that
//! changes every 15 s: at most 5,760 state rows a day, and no commit of its own in between. The live
//! state is unaffected: the rules, the alarm, the web app and subscribers see every message; only
//! what is stored (the latest state, its history, the retained copy) lags, by at most [`REFILL`].
//! At shutdown everything held is written.
//!
//! A device's states and its availability have a budget each. Pure: the writer ([`crate::devices::run`]) gives it the time.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use crate::store::device_state::Change;

/// Rows a device or a retained topic may write at once.
pub const BURST: f64 = 60.0;
/// Then one row per this long.
pub const REFILL: Duration = Duration::from_secs(15);
/// Budgets kept before full ones are forgotten (a client inventing retained topics).
const MAX_BUCKETS: usize = 4096;

/// A token bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn refill(&mut self, now: Instant) {
        let earned = now.saturating_duration_since(self.at).as_secs_f64() / REFILL.as_secs_f64();
        self.tokens = (self.tokens + earned).min(BURST);
        self.at = now;
    }

    /// When it holds a whole token again.
    fn ready_at(&self) -> Instant {
        self.at + REFILL.mul_f64((1.0 - self.tokens).max(0.0))
    }
}

/// What a held change is keyed by: a device and its kind of change, or a retained topic.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    State(String),
    Availability(String),
}

/// The budgets, and what waits for them.
#[derive(Debug, Default)]
pub struct Thinner {
    /// Per device id, and per retained topic (prefixed so the two never meet).
    buckets: HashMap<String, Bucket>,
    /// Device changes waiting for their device's budget: the latest per device and kind.
    held: HashMap<Key, Change>,
    /// Retained changes waiting for their topic's budget: the latest per topic.
    held_retained: HashMap<String, Option<Bytes>>,
    /// Changes replaced while held (never written), since [`Thinner::take_thinned`].
    thinned: u64,
}

impl Thinner {
    /// Takes one token of `key`'s budget, if it has one.
    fn take(&mut self, key: &str, now: Instant) -> bool {
        if self.buckets.len() >= MAX_BUCKETS && !self.buckets.contains_key(key) {
            // Full budgets hold nothing worth keeping; past the bound still (a client inventing
            // topics faster than they refill), only the budgets of held changes are kept.
            self.buckets.retain(|_, b| {
                b.refill(now);
                b.tokens < BURST
            });
            if self.buckets.len() >= MAX_BUCKETS {
                let held: std::collections::HashSet<String> =
                    self.held.keys().map(key_of).chain(self.held_retained.keys().map(|t| retained_key(t))).collect();
                self.buckets.retain(|k, _| held.contains(k));
            }
        }
        let bucket = self.buckets.entry(key.to_owned()).or_insert(Bucket { tokens: BURST, at: now });
        bucket.refill(now);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// What of `changes` (in order, with what was held and may go now) to write now; the rest
    /// is held.
    pub fn states(&mut self, changes: Vec<Change>, now: Instant) -> Vec<Change> {
        let mut out = Vec::with_capacity(changes.len());
        let ready: Vec<Key> = self.held.keys().filter(|k| self.ready(&key_of(k), now)).cloned().collect();
        for key in ready {
            if self.take(&key_of(&key), now) {
                out.extend(self.held.remove(&key));
            }
        }
        for change in changes {
            let key = match &change {
                Change::State { id, .. } => Key::State(id.clone()),
                Change::Availability { id, .. } => Key::Availability(id.clone()),
                Change::Rejected { .. } => {
                    out.push(change);
                    continue;
                }
            };
            if let Some(older) = self.held.get_mut(&key) {
                *older = change;
                self.thinned += 1;
            } else if self.take(&key_of(&key), now) {
                out.push(change);
            } else {
                self.held.insert(key, change);
            }
        }
        out
    }

    /// What of the retained `changes` to write now (with what was held and may go now); the
    /// rest is held.
    pub fn retained(
        &mut self,
        changes: HashMap<String, Option<Bytes>>,
        now: Instant,
    ) -> HashMap<String, Option<Bytes>> {
        let mut out = HashMap::with_capacity(changes.len());
        let ready: Vec<String> =
            self.held_retained.keys().filter(|t| self.ready(&retained_key(t), now)).cloned().collect();
        for topic in ready {
            if self.take(&retained_key(&topic), now) {
                if let Some(payload) = self.held_retained.remove(&topic) {
                    out.insert(topic, payload);
                }
            }
        }
        for (topic, payload) in changes {
            if let Some(older) = self.held_retained.get_mut(&topic) {
                *older = payload;
                self.thinned += 1;
            } else if out.contains_key(&topic) || self.take(&retained_key(&topic), now) {
                out.insert(topic, payload);
            } else {
                self.held_retained.insert(topic, payload);
            }
        }
        out
    }

    /// Whether `key`'s budget has a token at `now` (without taking it).
    fn ready(&self, key: &str, now: Instant) -> bool {
        self.buckets.get(key).is_none_or(|b| {
            let mut b = *b;
            b.refill(now);
            b.tokens >= 1.0
        })
    }

    /// When the first held change may be written; `None` when nothing is held.
    pub fn next_release(&self) -> Option<Instant> {
        let keys =
            self.held.keys().map(|k| key_of(k).to_owned()).chain(self.held_retained.keys().map(|t| retained_key(t)));
        keys.filter_map(|k| self.buckets.get(&k).map(Bucket::ready_at)).min()
    }

    /// Everything held, budget or not (at shutdown).
    pub fn drain(&mut self) -> (Vec<Change>, HashMap<String, Option<Bytes>>) {
        (self.held.drain().map(|(_, c)| c).collect(), std::mem::take(&mut self.held_retained))
    }

    /// How many changes were replaced while held since the last call.
    pub fn take_thinned(&mut self) -> u64 {
        std::mem::take(&mut self.thinned)
    }
}

/// The budget a held change draws on: a device's states and its availability have one each.
fn key_of(key: &Key) -> String {
    match key {
        Key::State(id) => format!("s\0{id}"),
        Key::Availability(id) => format!("a\0{id}"),
    }
}

fn retained_key(topic: &str) -> String {
    format!("\0{topic}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(id: &str, n: u32) -> Change {
        Change::State { id: id.into(), json: format!("{{\"n\":{n}}}"), at: String::new() }
    }

    /// A device flapping at 100 Hz for an hour, fed to the writer once a second: the rows it
    /// writes are its burst plus one per 15 s, and the last state is written in the end.
    #[tokio::test(start_paused = true)]
    async fn a_flapping_device_writes_its_budget_and_its_last_state() {
        let mut t = Thinner::default();
        let (mut written, mut n) = (Vec::new(), 0);
        let start = Instant::now();
        for _ in 0..3600 {
            let batch: Vec<Change> = (0..100)
                .map(|_| {
                    n += 1;
                    state("pir", n)
                })
                .collect();
            written.extend(t.states(batch, Instant::now()));
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        let budget = BURST + start.elapsed().as_secs_f64() / REFILL.as_secs_f64();
        assert!(written.len() as f64 <= budget + 1.0, "{} rows, budget {budget}", written.len());
        assert!(written.len() as f64 >= budget - 2.0, "{} rows, budget {budget}", written.len());
        // Nothing newer is lost: the latest state is written once the budget allows, or at shutdown.
        let (held, _) = t.drain();
        let last = held.last().or(written.last()).cloned();
        assert_eq!(last, Some(state("pir", n)));
        assert_eq!(t.take_thinned() + written.len() as u64 + 1, u64::from(n));
    }

    #[tokio::test(start_paused = true)]
    async fn an_honest_device_and_its_neighbours_are_untouched() {
        let mut t = Thinner::default();
        for i in 0..500 {
            // A flapping neighbour does not eat the door's budget.
            let mut batch: Vec<Change> = (0..50).map(|k| state("pir", i * 50 + k)).collect();
            batch.push(state("door", i));
            let written = t.states(batch, Instant::now());
            assert!(written.contains(&state("door", i)), "the door's change {i} was held");
            tokio::time::advance(REFILL).await;
        }
        assert!(t.next_release().is_some(), "the flapping sensor's latest is held");
    }

    #[tokio::test(start_paused = true)]
    async fn held_changes_go_in_order_when_the_budget_returns() {
        let mut t = Thinner::default();
        let burst: Vec<Change> = (0..BURST as u32 + 3).map(|n| state("pir", n)).collect();
        assert_eq!(t.states(burst, Instant::now()).len(), BURST as usize);
        let release = t.next_release().expect("the rest is held");
        assert_eq!(release, Instant::now() + REFILL);
        tokio::time::advance(REFILL).await;
        // The held one (the latest of the three) goes first, before a newer change waits again.
        let written = t.states(vec![state("pir", 100)], Instant::now());
        assert_eq!(written, vec![state("pir", BURST as u32 + 2)]);
        assert_eq!(t.take_thinned(), 2);
        let (held, _) = t.drain();
        assert_eq!(held, vec![state("pir", 100)]);
    }

    /// A client inventing retained topics cannot grow the budgets past their bound.
    #[tokio::test(start_paused = true)]
    async fn budgets_stay_bounded_whatever_the_topics() {
        let mut t = Thinner::default();
        for n in 0..3 * MAX_BUCKETS {
            let one = HashMap::from([(format!("x/{n}"), Some(Bytes::from_static(b"1")))]);
            assert_eq!(t.retained(one, Instant::now()).len(), 1, "a new topic's first change is written");
        }
        assert!(t.buckets.len() <= MAX_BUCKETS, "{} budgets", t.buckets.len());
    }

    #[tokio::test(start_paused = true)]
    async fn retained_topics_have_budgets_of_their_own() {
        let mut t = Thinner::default();
        let one = |n: u32| HashMap::from([("dpi/pir/state".to_owned(), Some(Bytes::from(n.to_string())))]);
        let mut written = 0;
        for n in 0..100 {
            written += t.retained(one(n), Instant::now()).len();
        }
        assert_eq!(written, BURST as usize);
        let (_, held) = t.drain();
        assert_eq!(held["dpi/pir/state"], Some(Bytes::from("99")));
    }
}
