//! Session identity: which connection holds which client id, and the ids the router sees.
//!
//! The router never sees a client's own id. Each client id in use is an entry here, owned by the
//! identity (user or device) that made it, with a router-facing id of the hub's making (`~N`):
//!
//! - another identity asking for a client id that is connected or keeps a persistent session is
//!   refused (CONNACK 2), so nobody inherits someone else's subscriptions or queued messages;
//! - the same identity takes its client id over: the old connection is closed, and its link to
//!   the router is closed before the new one opens (the router is never asked to drop a link);
//! - a clean session's entry ends with its connection and its router id goes back to the pool, so
//!   the router's memory per client id (rumqttd keeps an entry per id forever) is bounded by the
//!   connections and persistent sessions at once, not by every id ever seen;
//! - persistent sessions are bounded ([`MAX_PERSISTENT_PER_IDENTITY`] per identity, and as many as
//!   `max_connections` in all); past either bound the least recently used one is dropped, and its
//!   router id is purged (opened clean once) before a persistent session uses it again.
//!
//! The entry also holds the session's filters, for the per-connection limit and across reconnects
//! of a persistent session, and the registry keeps the filters the router has ever been given:
//! rumqttd never frees a filter's log, so each identity may bring at most
//! [`MAX_NEW_FILTERS_PER_IDENTITY`] new ones, and the router holds at most [`MAX_ROUTER_FILTERS`].
//! A clean session's filters are not counted there: they live in `broker::local` and leave with it.
//! Sessions and filters live in memory only, as in the router.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::guard::MAX_SUBSCRIPTIONS;
use crate::auth::Identity;

/// Persistent sessions one identity may keep; past it its least recently used one is dropped.
pub const MAX_PERSISTENT_PER_IDENTITY: usize = 8;

/// New filters one identity may bring to the router while the hub runs.
pub const MAX_NEW_FILTERS_PER_IDENTITY: usize = 256;

/// Distinct filters the router may hold while the hub runs.
pub const MAX_ROUTER_FILTERS: usize = 4_096;

/// How long a connection taking over a client id waits for the previous one to let go.
pub const TAKEOVER_WAIT: Duration = Duration::from_secs(5);

/// Why a client id cannot be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClaimError {
    /// Another identity's connection or persistent session holds it (CONNACK 2).
    #[error("client id held by another user or device")]
    Taken,
    /// The previous connection with this id did not close in time (CONNACK 3).
    #[error("the previous connection with this client id is still closing")]
    StillClosing,
    /// No persistent session could be made room for (CONNACK 3).
    #[error("too many persistent sessions")]
    Full,
}

/// What a SUBSCRIBE's filter may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterVerdict {
    /// Already subscribed in this session, or newly recorded.
    Granted,
    /// The connection holds [`MAX_SUBSCRIPTIONS`] already.
    TooMany,
    /// A new filter past the identity's or the router's budget.
    OverBudget,
}

/// A router-facing client id.
pub fn router_id(n: u32) -> String {
    format!("~{n}")
}

/// The registry (see the module docs).
#[derive(Debug)]
pub struct Sessions {
    inner: Arc<Mutex<Inner>>,
    /// Persistent sessions kept in all.
    max_persistent: usize,
    /// Links the router dropped on its own (it disconnected a client, or it died). The guard
    /// exists so that this stays 0 while the router runs.
    router_drops: std::sync::atomic::AtomicU64,
    /// The hub's closing: it kicks every claim, those made after it at once.
    closing: CancellationToken,
}

/// What closes one connection: a takeover of its client id, its rights revoked, or the hub
/// closing. A flag and one waker, because the session looks at it at every wake-up; a
/// `CancellationToken` takes two locks each time it is polled.
#[derive(Debug, Clone, Default)]
pub struct Kick(Arc<KickState>);

#[derive(Debug, Default)]
struct KickState {
    fired: AtomicBool,
    /// The one task that waits on it: the session's.
    waker: AtomicWaker,
}

impl Kick {
    /// Closes the connection.
    pub fn fire(&self) {
        self.0.fired.store(true, Ordering::Release);
        self.0.waker.wake();
    }

    /// Whether the connection is to close.
    pub fn is_fired(&self) -> bool {
        self.0.fired.load(Ordering::Acquire)
    }

    /// Ready once fired; only the last task to poll it is woken.
    pub fn poll_fired(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.is_fired() {
            return Poll::Ready(());
        }
        // Registered before looking again, so that a kick in between wakes it.
        self.0.waker.register(cx.waker());
        match self.is_fired() {
            true => Poll::Ready(()),
            false => Poll::Pending,
        }
    }

    /// Resolves once fired.
    pub async fn fired(&self) {
        std::future::poll_fn(|cx| self.poll_fired(cx)).await;
    }
}

#[derive(Debug, Default)]
struct Inner {
    /// Client ids in use or keeping a persistent session.
    clients: HashMap<String, Entry>,
    /// Router ids not in use; `true`: the router may still hold a persistent session's state for it.
    free: Vec<(u32, bool)>,
    /// The next router id never used.
    next: u32,
    /// Router id → client id, for the entries above.
    by_router: HashMap<u32, String>,
    /// Claims not yet dropped, per router id: a link may still be open under it, so the pool
    /// never hands it out (a connection stuck closing keeps its id to itself until it is gone).
    busy: HashMap<u32, usize>,
    /// Filters the router has been given.
    filters: HashSet<String>,
    /// New filters each identity brought, by [`principal`].
    brought: HashMap<String, usize>,
    /// Increases at every claim and release: the order sessions were last used in.
    clock: u64,
}

#[derive(Debug)]
struct Entry {
    owner: Identity,
    /// The router id this client id uses, now or for its persistent session.
    router: u32,
    /// Filters subscribed in the router under `router`.
    subscriptions: BTreeSet<String>,
    /// The router keeps the session when the connection ends.
    persistent: bool,
    /// The router may hold a session's state under `router`: a persistent session had it, and a
    /// clean session (which never opens a router link) does not clear it.
    dirty: bool,
    /// The connection holding it, if any.
    live: Option<Live>,
    /// `clock` when last claimed or released.
    last_used: u64,
}

#[derive(Debug)]
struct Live {
    generation: u64,
    /// Fired to close the connection.
    kick: Kick,
    /// Ends when that connection has closed its router link.
    done: oneshot::Receiver<()>,
}

/// A connection's hold on its client id. Dropping it (after the router link is closed) lets a
/// connection waiting to take the id over go on.
#[derive(Debug)]
pub struct Claim {
    /// The client id.
    pub client_id: String,
    /// The id to open the router link with.
    pub router_id: String,
    /// Open the link with clean session once and close it before the real one: the router may
    /// hold another session's state under this id.
    pub purge: bool,
    /// Fired when another connection takes the client id over, the identity is revoked, or the
    /// hub closes ([`Sessions::under`]): a session waits on this one kick for all three.
    pub kick: Kick,
    generation: u64,
    router: u32,
    registry: Arc<Mutex<Inner>>,
    _done: oneshot::Sender<()>,
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut inner = self.registry.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = inner.busy.get_mut(&self.router) {
            *n -= 1;
            if *n == 0 {
                inner.busy.remove(&self.router);
            }
        }
    }
}

/// Who an entry belongs to: users and devices share one namespace of names.
fn principal(identity: &Identity) -> String {
    identity.name().to_owned()
}

impl Sessions {
    /// A registry keeping at most `max_persistent` persistent sessions.
    pub fn new(max_persistent: usize) -> Sessions {
        Sessions {
            inner: Arc::default(),
            max_persistent: max_persistent.max(1),
            router_drops: Default::default(),
            closing: CancellationToken::new(),
        }
    }

    /// Makes `closing` kick every claim, those made after it at once. Spawns the task that waits
    /// for it, which ends then.
    pub fn under(mut self, closing: &CancellationToken) -> Arc<Sessions> {
        self.closing = closing.clone();
        let sessions = Arc::new(self);
        let (closing, watched) = (closing.clone(), Arc::downgrade(&sessions));
        tokio::spawn(async move {
            closing.cancelled().await;
            if let Some(sessions) = watched.upgrade() {
                sessions.kick_all();
            }
        });
        sessions
    }

    /// Closes every connection.
    fn kick_all(&self) {
        for live in self.lock().clients.values().filter_map(|e| e.live.as_ref()) {
            live.kick.fire();
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes `client_id` for a connection of `identity` asking for clean session `clean`; closes
    /// the connection holding it before (waiting at most [`TAKEOVER_WAIT`]).
    pub async fn claim(&self, client_id: &str, identity: &Identity, clean: bool) -> Result<Claim, ClaimError> {
        let (claim, previous) =
            self.lock().claim(client_id, identity, clean, (self.max_persistent, &self.closing), &self.inner)?;
        if let Some(done) = previous {
            // The previous connection drops its claim once its router link is closed.
            if tokio::time::timeout(TAKEOVER_WAIT, done).await.is_err() {
                self.release(&claim);
                return Err(ClaimError::StillClosing);
            }
        }
        Ok(claim)
    }

    /// Ends a connection's hold: a persistent session stays, a clean one is forgotten.
    pub fn release(&self, claim: &Claim) {
        let mut inner = self.lock();
        inner.clock += 1;
        let now = inner.clock;
        let Some(entry) = inner.clients.get_mut(&claim.client_id) else { return };
        if entry.live.as_ref().is_none_or(|l| l.generation != claim.generation) {
            // Taken over: the entry is the successor's now.
            return;
        }
        entry.live = None;
        entry.last_used = now;
        if !entry.persistent {
            inner.forget(&claim.client_id);
        }
    }

    /// Whether another connection has taken the claim's client id over.
    pub fn is_replaced(&self, claim: &Claim) -> bool {
        self.lock()
            .clients
            .get(&claim.client_id)
            .and_then(|e| e.live.as_ref())
            .is_some_and(|live| live.generation != claim.generation)
    }

    /// Records a filter a SUBSCRIBE asks for (the ACL and the guard already allowed it).
    pub fn subscribe(&self, claim: &Claim, identity: &Identity, filter: &str) -> FilterVerdict {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let Some(entry) = inner.clients.get_mut(&claim.client_id) else { return FilterVerdict::TooMany };
        if entry.subscriptions.contains(filter) {
            return FilterVerdict::Granted;
        }
        if entry.subscriptions.len() >= MAX_SUBSCRIPTIONS {
            return FilterVerdict::TooMany;
        }
        // Only the router keeps filters until restart: a clean session's leave with it.
        if entry.persistent && !inner.filters.contains(filter) {
            let brought = inner.brought.entry(principal(identity)).or_default();
            if *brought >= MAX_NEW_FILTERS_PER_IDENTITY || inner.filters.len() >= MAX_ROUTER_FILTERS {
                return FilterVerdict::OverBudget;
            }
            *brought += 1;
            inner.filters.insert(filter.to_owned());
        }
        entry.subscriptions.insert(filter.to_owned());
        FilterVerdict::Granted
    }

    /// Forgets a filter an UNSUBSCRIBE names; true if the session held it.
    pub fn unsubscribe(&self, claim: &Claim, filter: &str) -> bool {
        self.lock().clients.get_mut(&claim.client_id).is_some_and(|e| e.subscriptions.remove(filter))
    }

    /// Closes the connection holding `client_id`, if any; true if there was one.
    pub fn kick(&self, client_id: &str) -> bool {
        let inner = self.lock();
        match inner.clients.get(client_id).and_then(|e| e.live.as_ref()) {
            Some(live) => {
                live.kick.fire();
                true
            }
            None => false,
        }
    }

    /// The client id behind a router-facing id, for log lines and the slow-client table.
    pub fn client_of(&self, router_id: &str) -> Option<String> {
        let n = router_id.strip_prefix('~')?.parse().ok()?;
        self.lock().by_router.get(&n).cloned()
    }

    /// Router ids handed out so far (the router keeps an entry for each).
    pub fn router_ids(&self) -> u32 {
        self.lock().next
    }

    /// Counts a link the router dropped on its own.
    pub fn router_dropped(&self) {
        self.router_drops.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Links the router dropped on its own since the start.
    pub fn router_drops(&self) -> u64 {
        self.router_drops.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Client ids connected now.
    pub fn connected(&self) -> usize {
        self.lock().clients.values().filter(|e| e.live.is_some()).count()
    }

    /// Client ids held now (connected or keeping a persistent session).
    pub fn held(&self) -> usize {
        self.lock().clients.len()
    }
}

impl Inner {
    fn claim(
        &mut self,
        client_id: &str,
        identity: &Identity,
        clean: bool,
        (max_persistent, closing): (usize, &CancellationToken),
        registry: &Arc<Mutex<Inner>>,
    ) -> Result<(Claim, Option<oneshot::Receiver<()>>), ClaimError> {
        self.clock += 1;
        let now = self.clock;
        let mut purge = false;
        let previous = match self.clients.get_mut(client_id) {
            Some(entry) if principal(&entry.owner) != principal(identity) => return Err(ClaimError::Taken),
            Some(entry) => {
                let previous = entry.live.take().map(|live| {
                    live.kick.fire();
                    live.done
                });
                // A clean session, one after a clean session (whose filters never reached the
                // router's budget), or rights that changed since (a user re-added with another
                // role), start afresh: nothing made under the old session carries over.
                if clean || !entry.persistent || entry.owner != *identity {
                    entry.subscriptions.clear();
                    entry.persistent = false;
                }
                entry.owner = identity.clone();
                previous
            }
            None => {
                if !clean {
                    self.make_room(client_id, identity, max_persistent)?;
                }
                let (router, dirty) = self.free_id(clean);
                self.by_router.insert(router, client_id.to_owned());
                self.clients.insert(
                    client_id.to_owned(),
                    Entry {
                        owner: identity.clone(),
                        router,
                        subscriptions: BTreeSet::new(),
                        persistent: false,
                        dirty,
                        live: None,
                        last_used: now,
                    },
                );
                None
            }
        };
        if !clean && !self.clients.get(client_id).is_some_and(|e| e.persistent) {
            // Room counts persistent entries only: this one is not one yet.
            self.make_room(client_id, identity, max_persistent)?;
        }
        let Some(entry) = self.clients.get_mut(client_id) else { return Err(ClaimError::Full) };
        if !clean {
            // Another session's state under the id is cleared before this one's link opens.
            purge = entry.dirty && !entry.persistent;
            entry.dirty = true;
        }
        entry.persistent = !clean;
        entry.last_used = now;
        let (done_tx, done_rx) = oneshot::channel();
        let kick = Kick::default();
        // Read under the registry's lock, which `kick_all` takes after the hub's closing: a claim
        // made as the hub closes is kicked once, by one or the other.
        if closing.is_cancelled() {
            kick.fire();
        }
        entry.live = Some(Live { generation: now, kick: kick.clone(), done: done_rx });
        let router = entry.router;
        *self.busy.entry(router).or_default() += 1;
        let claim = Claim {
            client_id: client_id.to_owned(),
            router_id: router_id(router),
            purge,
            kick,
            generation: now,
            router,
            registry: Arc::clone(registry),
            _done: done_tx,
        };
        Ok((claim, previous))
    }

    /// A router id from the pool: for a clean session preferably one that may hold old state (a
    /// clean connect discards it), for a persistent one preferably one that holds none.
    fn free_id(&mut self, clean: bool) -> (u32, bool) {
        let idle = |id: &u32| !self.busy.contains_key(id);
        let pick = self
            .free
            .iter()
            .rposition(|(id, dirty)| idle(id) && *dirty == clean)
            .or_else(|| self.free.iter().rposition(|(id, _)| idle(id)));
        match pick {
            Some(i) => self.free.swap_remove(i),
            None => {
                self.next += 1;
                (self.next, false)
            }
        }
    }

    /// Drops persistent sessions until `client_id` may keep one more.
    fn make_room(&mut self, client_id: &str, identity: &Identity, max_persistent: usize) -> Result<(), ClaimError> {
        let who = principal(identity);
        loop {
            let offline = |e: &Entry| e.persistent && e.live.is_none();
            let own = self.clients.values().filter(|e| e.persistent && principal(&e.owner) == who).count();
            let all = self.clients.values().filter(|e| e.persistent).count();
            let victim = if own >= MAX_PERSISTENT_PER_IDENTITY {
                self.oldest(|id, e| id != client_id && offline(e) && principal(&e.owner) == who)
            } else if all >= max_persistent {
                self.oldest(|id, e| id != client_id && offline(e))
            } else {
                return Ok(());
            };
            match victim {
                Some(id) => {
                    tracing::info!(client = %id, "persistent session dropped to make room for another");
                    self.forget(&id);
                }
                None => return Err(ClaimError::Full),
            }
        }
    }

    fn oldest(&self, eligible: impl Fn(&str, &Entry) -> bool) -> Option<String> {
        self.clients.iter().filter(|(id, e)| eligible(id, e)).min_by_key(|(_, e)| e.last_used).map(|(id, _)| id.clone())
    }

    /// Removes an entry and returns its router id to the pool.
    fn forget(&mut self, client_id: &str) {
        if let Some(entry) = self.clients.remove(client_id) {
            self.by_router.remove(&entry.router);
            self.free.push((entry.router, entry.dirty));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::users::Role;

    fn user(name: &str, role: Role) -> Identity {
        Identity::User { name: name.into(), role }
    }

    fn claim_now(s: &Sessions, id: &str, who: &Identity, clean: bool) -> Result<Claim, ClaimError> {
        let (claim, previous) = s.lock().claim(id, who, clean, (s.max_persistent, &s.closing), &s.inner)?;
        assert!(previous.is_none());
        Ok(claim)
    }

    #[test]
    fn clean_sessions_recycle_router_ids() {
        let s = Sessions::new(10);
        let alice = user("alice", Role::Admin);
        for n in 0..1_000 {
            let c = claim_now(&s, &format!("random-{n}"), &alice, true).unwrap();
            s.release(&c);
            drop(c);
        }
        assert_eq!(s.router_ids(), 1);
        assert_eq!(s.held(), 0);
    }

    #[tokio::test]
    async fn closing_the_hub_kicks_every_claim_and_a_kick_only_its_own() {
        let closing = CancellationToken::new();
        let s = Sessions::new(10).under(&closing);
        let alice = user("alice", Role::Admin);
        let (a, b) = (claim_now(&s, "a", &alice, true).unwrap(), claim_now(&s, "b", &alice, false).unwrap());
        assert!(s.kick("a"));
        assert!(a.kick.is_fired() && !b.kick.is_fired() && !closing.is_cancelled());
        closing.cancel();
        b.kick.fired().await;
        // A claim made once the hub is closing is kicked from the start.
        let late = claim_now(&s, "late", &alice, true).unwrap();
        assert!(late.kick.is_fired());
    }

    #[test]
    fn another_identity_cannot_have_a_held_client_id() {
        let s = Sessions::new(10);
        let (admin, bob) = (user("admin", Role::Admin), user("bob", Role::Resident));
        let c = claim_now(&s, "dashboard", &admin, false).unwrap();
        assert_eq!(claim_now(&s, "dashboard", &bob, true).unwrap_err(), ClaimError::Taken);
        s.release(&c);
        // Still held: the persistent session is the admin's.
        assert_eq!(claim_now(&s, "dashboard", &bob, false).unwrap_err(), ClaimError::Taken);
        assert_eq!(s.client_of(&c.router_id).as_deref(), Some("dashboard"));
    }

    #[tokio::test]
    async fn a_takeover_closes_the_previous_connection_and_waits_for_it() {
        let s = std::sync::Arc::new(Sessions::new(10));
        let admin = user("admin", Role::Admin);
        let first = s.claim("phone", &admin, false).await.unwrap();
        let waiter = {
            let (s, admin) = (s.clone(), admin.clone());
            tokio::spawn(async move { s.claim("phone", &admin, false).await })
        };
        first.kick.fired().await;
        let router_id = first.router_id.clone();
        s.release(&first);
        drop(first);
        let second = waiter.await.unwrap().unwrap();
        assert_eq!(second.router_id, router_id, "a persistent session keeps its router id");
        assert!(!second.purge);
    }

    #[tokio::test(start_paused = true)]
    async fn a_previous_connection_that_does_not_let_go_fails_the_takeover_and_keeps_its_router_id() {
        let s = Sessions::new(10);
        let admin = user("admin", Role::Admin);
        let stuck = s.claim("phone", &admin, true).await.unwrap();
        assert_eq!(s.claim("phone", &admin, true).await.unwrap_err(), ClaimError::StillClosing);
        // The id is free for the taking, but its router id is not, while the stuck link may be open.
        let other = s.claim("tablet", &admin, true).await.unwrap();
        assert_ne!(other.router_id, stuck.router_id);
        drop(stuck);
        let next = s.claim("laptop", &admin, true).await.unwrap();
        assert_eq!(next.router_id, "~1");
    }

    #[test]
    fn persistent_sessions_are_bounded_per_identity_and_in_all() {
        let s = Sessions::new(12);
        let alice = user("alice", Role::Admin);
        for n in 0..50 {
            let c = claim_now(&s, &format!("a-{n}"), &alice, false).unwrap();
            s.release(&c);
            drop(c);
        }
        assert_eq!(s.held(), MAX_PERSISTENT_PER_IDENTITY);
        let bob = user("bob", Role::Admin);
        for n in 0..50 {
            let c = claim_now(&s, &format!("b-{n}"), &bob, false).unwrap();
            s.release(&c);
            drop(c);
        }
        assert_eq!(s.held(), 12);
        // Ids are reused: at most one per session held, plus the one being purged.
        assert!(s.router_ids() <= 13, "{}", s.router_ids());
    }

    #[test]
    fn a_reused_router_id_is_purged_before_a_persistent_session_uses_it() {
        let s = Sessions::new(1);
        let alice = user("alice", Role::Admin);
        let a = claim_now(&s, "a", &alice, false).unwrap();
        s.release(&a);
        let a_router = a.router_id.clone();
        drop(a);
        let b = claim_now(&s, "b", &alice, false).unwrap();
        assert_eq!(b.router_id, a_router);
        assert!(b.purge);
    }

    #[test]
    fn a_persistent_session_is_purged_after_a_clean_one_held_its_client_id_or_its_router_id() {
        let s = Sessions::new(10);
        let alice = user("alice", Role::Admin);
        let a = claim_now(&s, "a", &alice, false).unwrap();
        s.release(&a);
        drop(a);
        // A clean session takes the id over: it opens no router link, so the router still holds
        // the persistent session, and the next persistent one under the id must not inherit it.
        let clean = claim_now(&s, "a", &alice, true).unwrap();
        assert!(!clean.purge);
        s.release(&clean);
        drop(clean);
        let again = claim_now(&s, "a", &alice, false).unwrap();
        assert!(again.purge, "the router id carried the old session's state");
        s.release(&again);
        drop(again);
        // Resuming one's own persistent session purges nothing.
        let resumed = claim_now(&s, "a", &alice, false).unwrap();
        assert!(!resumed.purge);
        // Taken over live by a clean connection, then by a persistent one.
        s.release(&resumed);
        drop(resumed);
        let clean = claim_now(&s, "a", &alice, true).unwrap();
        let (persistent, previous) =
            s.lock().claim("a", &alice, false, (s.max_persistent, &s.closing), &s.inner).unwrap();
        assert!(previous.is_some() && clean.kick.is_fired());
        assert!(persistent.purge);
    }

    #[test]
    fn subscriptions_are_bounded_per_connection_and_new_filters_per_identity() {
        let s = Sessions::new(10);
        let bob = user("bob", Role::Resident);
        let c = claim_now(&s, "c", &bob, true).unwrap();
        for n in 0..MAX_SUBSCRIPTIONS {
            assert_eq!(s.subscribe(&c, &bob, &format!("dpi/{n}")), FilterVerdict::Granted);
        }
        assert_eq!(s.subscribe(&c, &bob, "dpi/0"), FilterVerdict::Granted);
        assert_eq!(s.subscribe(&c, &bob, "dpi/x"), FilterVerdict::TooMany);
        assert!(s.unsubscribe(&c, "dpi/0"));
        assert!(!s.unsubscribe(&c, "dpi/0"));
        s.release(&c);
        // Clean sessions' filters never reach the router: no budget.
        for round in 0..10 {
            let c = claim_now(&s, "c", &bob, true).unwrap();
            for n in 0..MAX_SUBSCRIPTIONS {
                assert_eq!(s.subscribe(&c, &bob, &format!("clean/{round}/{n}")), FilterVerdict::Granted);
            }
            s.release(&c);
        }
        let mut over = 0;
        for round in 0..10 {
            let c = claim_now(&s, &format!("p{round}"), &bob, false).unwrap();
            for n in 0..MAX_SUBSCRIPTIONS {
                if s.subscribe(&c, &bob, &format!("dpi/{round}/{n}")) == FilterVerdict::OverBudget {
                    over += 1;
                }
            }
            s.release(&c);
        }
        assert_eq!(over, 10 * MAX_SUBSCRIPTIONS - MAX_NEW_FILTERS_PER_IDENTITY);
        // Filters the router already has cost nothing.
        let c = claim_now(&s, "p", &bob, false).unwrap();
        assert_eq!(s.subscribe(&c, &bob, "dpi/0/1"), FilterVerdict::Granted);
    }

    #[test]
    fn a_persistent_session_taking_over_a_clean_one_brings_its_filters_to_the_budget() {
        let s = Sessions::new(10);
        let bob = user("bob", Role::Resident);
        // Past the budget with persistent sessions' filters.
        for round in 0..3 {
            let c = claim_now(&s, &format!("p{round}"), &bob, false).unwrap();
            for n in 0..MAX_SUBSCRIPTIONS {
                s.subscribe(&c, &bob, &format!("dpi/{round}/{n}"));
            }
            s.release(&c);
        }
        // A clean session's filters cost nothing; a persistent one taking its id over starts
        // without them, so they cannot reach the router unbudgeted.
        let clean = claim_now(&s, "phone", &bob, true).unwrap();
        assert_eq!(s.subscribe(&clean, &bob, "dpi/new"), FilterVerdict::Granted);
        let (persistent, previous) =
            s.lock().claim("phone", &bob, false, (s.max_persistent, &s.closing), &s.inner).unwrap();
        assert!(previous.is_some() && clean.kick.is_fired());
        assert_eq!(s.subscribe(&persistent, &bob, "dpi/new"), FilterVerdict::OverBudget);
    }

    #[test]
    fn a_user_with_new_rights_starts_afresh() {
        let s = Sessions::new(10);
        let c = claim_now(&s, "phone", &user("bob", Role::Admin), false).unwrap();
        s.subscribe(&c, &user("bob", Role::Admin), "#");
        s.release(&c);
        let c = claim_now(&s, "phone", &user("bob", Role::Resident), false).unwrap();
        assert!(c.purge, "the admin's session must not carry over");
        assert!(!s.unsubscribe(&c, "#"));
    }
}
