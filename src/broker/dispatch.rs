//! The one interface between the broker and the house: the broker hands over what clients do, and
//! takes back what to publish.
//!
//! The broker decides who a client is, what it may do (the ACL) and what may reach the router (the
//! guard). Everything a message *means* is the house side's: it implements [`Dispatch`], which the
//! session calls for each PUBLISH that passed the guard and the ACL, for each will at CONNECT, and
//! when a client's connection comes up or goes down. The house side publishes through an
//! [`Outbox`], the hub's own in-process client. Nothing else crosses: the house side imports this
//! module and no other of `broker/`, and `broker/` imports nothing of the house side.

use bytes::Bytes;

use super::HubLink;
use crate::auth::Identity;
use crate::topics;

/// Who sent a message.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    /// The client's identity, as authenticated at CONNECT.
    pub identity: &'a Identity,
    /// Its MQTT client id (what `dpi/hub/error` and the logs name).
    pub client_id: &'a str,
}

/// What the house says of a PUBLISH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Route it as it is.
    Route,
    /// Route this payload in its place (an alarm command without its code).
    RouteInstead(Bytes),
    /// Refuse it, for this reason (reported on `dpi/hub/error` and logged by the broker).
    Refuse(String),
}

/// The house side, as the broker sees it. Calls come from sessions on runtime workers: each must
/// return at once (hand work to a task, never wait on it).
pub trait Dispatch: Send + Sync + 'static {
    /// A PUBLISH that passed the guard and the ACL: its meaning is acted on here.
    fn publish(&self, from: Origin<'_>, topic: &str, payload: &Bytes) -> Verdict;

    /// Whether a will would be accepted if published now; acts on nothing.
    fn check_will(&self, from: Origin<'_>, topic: &str, payload: &[u8]) -> Result<(), String>;

    /// A client's connection is up (after its CONNACK) or down (after its will, if any). A
    /// connection taken over by another with the same client id is neither.
    fn connection(&self, identity: &Identity, up: bool);
}

/// The hub's way to publish: cheap to clone, never blocks (see [`HubLink`]).
#[derive(Debug, Clone)]
pub struct Outbox {
    link: HubLink,
}

impl Outbox {
    /// The outbox of the hub's link.
    pub fn new(link: HubLink) -> Outbox {
        Outbox { link }
    }

    /// Publishes at QoS 0 from the hub; a retained message is also kept on disk.
    pub fn publish(&self, topic: impl Into<String>, payload: impl Into<Bytes>, retain: bool) {
        self.link.publish(topic, payload, retain);
    }

    /// Tells `dpi/hub/error` subscribers about a message the hub rejected.
    pub fn report_error(&self, topic: &str, client: &str, error: &str) {
        self.link.publish(topics::HUB_ERROR, topics::error_body(topic, client, error), false);
    }
}
