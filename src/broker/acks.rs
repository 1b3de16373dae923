//! Acknowledgements between one client and the router, put in the order the router needs.
//!
//! MQTT 3.1.1 orders acknowledgements only within a QoS level: a client may answer a QoS 2
//! delivery's PUBREC before an earlier QoS 1 delivery's PUBACK, may complete QoS 2 flows in any
//! order, and may repeat or invent packet ids. rumqttd's router takes PUBACK and PUBREC strictly in
//! the order it sent the publishes, PUBCOMP in the order it got the PUBRECs, and PUBREL in the order
//! it recorded the client's QoS 2 publishes; anything else disconnects the client (or, for a
//! repeated QoS 2 publish, delivers it twice). [`Acks`] sits between the two: the session tells it
//! what happened and sends what it returns, so the router only ever sees the sequence it expects.
//!
//! It also owns the lowered QoS of deliveries (MQTT 3.1.1 §3.8.4: a message is delivered at the
//! lower of its publish QoS and the subscription's, while the router uses the subscription's): the
//! router's side of a flow the client does not take part in is settled here.
//!
//! Pure: no I/O and no clock, so every order can be tested.

use std::collections::{HashSet, VecDeque};

use super::guard::MAX_AWAITING_RELEASE;

/// Most QoS 2 deliveries kept awaiting the client's PUBCOMP; past it the oldest is completed for
/// the client (it had the message: it sent PUBREC), so a client that never completes costs nothing.
pub const MAX_RELEASING: usize = 1_000;

/// An acknowledgement packet, by packet id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    PubAck(u16),
    PubRec(u16),
    PubRel(u16),
    PubComp(u16),
}

/// What an event asks the session to send, in order.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Sends {
    /// To the router.
    pub router: Vec<Ack>,
    /// To the client.
    pub client: Vec<Ack>,
}

/// What to do with a QoS 2 PUBLISH from the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Incoming {
    /// Pass it to the router (which answers PUBREC).
    Pass,
    /// Already recorded and not yet released: answer PUBREC here, never pass it twice.
    Duplicate,
    /// Too many awaiting their PUBREL: close the connection.
    Overflow,
}

/// The router acknowledgement a delivery owes, once the client has done its part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owed {
    PubAck,
    PubRec,
}

#[derive(Debug)]
enum Delivered {
    /// Awaits the client's PUBACK (delivered at QoS 1).
    AwaitPuback(Owed),
    /// Awaits the client's PUBREC (delivered at QoS 2).
    AwaitPubrec,
    /// Settled; the router gets it once every earlier delivery is settled.
    Ready(Owed),
}

#[derive(Debug)]
struct Delivery {
    pkid: u16,
    /// The client takes part in the release only when delivered at QoS 2.
    client_qos: u8,
    state: Delivered,
}

#[derive(Debug, PartialEq, Eq)]
enum Released {
    /// The router's PUBREL has not come; `mine`: the session answers it (delivered below QoS 2).
    AwaitPubrel { mine: bool },
    /// PUBREL passed to the client, which owes PUBCOMP.
    AwaitPubcomp,
    /// Complete; the router gets PUBCOMP once every earlier release did.
    Ready,
}

#[derive(Debug)]
struct Release {
    pkid: u16,
    state: Released,
}

#[derive(Debug)]
struct Recorded {
    pkid: u16,
    released: bool,
}

/// One session's acknowledgement state (see the module docs).
#[derive(Debug, Default)]
pub struct Acks {
    /// QoS 1 and 2 deliveries the router awaits PUBACK or PUBREC for, in its order.
    deliveries: VecDeque<Delivery>,
    /// QoS 2 deliveries whose PUBREC the router has, awaiting PUBCOMP, in its order.
    releases: VecDeque<Release>,
    /// The client's QoS 2 publishes the router recorded, awaiting the client's PUBREL, in order.
    recorded: VecDeque<Recorded>,
    /// The client's QoS 2 publishes the hub refused: their PUBREL is answered here.
    refused: HashSet<u16>,
}

impl Acks {
    /// The session wrote a router delivery to the client: `router_qos` is the QoS the router sent
    /// it at (its packet id is `pkid`), `client_qos` the QoS the client got (no higher).
    pub fn delivered(&mut self, pkid: u16, router_qos: u8, client_qos: u8) -> Sends {
        let owed = match router_qos {
            1 => Owed::PubAck,
            2 => Owed::PubRec,
            _ => return Sends::default(),
        };
        let client_qos = client_qos.min(router_qos);
        let state = match client_qos {
            0 => Delivered::Ready(owed),
            1 => Delivered::AwaitPuback(owed),
            _ => Delivered::AwaitPubrec,
        };
        self.deliveries.push_back(Delivery { pkid, client_qos, state });
        self.settle()
    }

    /// The client sent PUBACK.
    pub fn puback(&mut self, pkid: u16) -> Sends {
        self.client_ack(pkid, |state| match state {
            Delivered::AwaitPuback(owed) => Some(*owed),
            _ => None,
        })
    }

    /// The client sent PUBREC.
    pub fn pubrec(&mut self, pkid: u16) -> Sends {
        self.client_ack(pkid, |state| matches!(state, Delivered::AwaitPubrec).then_some(Owed::PubRec))
    }

    /// Marks the oldest delivery with `pkid` that `settles` accepts; an unknown or repeated ack is dropped.
    fn client_ack(&mut self, pkid: u16, settles: impl Fn(&Delivered) -> Option<Owed>) -> Sends {
        if let Some((d, owed)) =
            self.deliveries.iter_mut().filter(|d| d.pkid == pkid).find_map(|d| settles(&d.state).map(|o| (d, o)))
        {
            d.state = Delivered::Ready(owed);
        }
        self.settle()
    }

    /// Passes settled deliveries to the router, oldest first, stopping at the first unsettled one.
    fn settle(&mut self) -> Sends {
        let mut sends = Sends::default();
        while let Some(Delivery { state: Delivered::Ready(owed), .. }) = self.deliveries.front() {
            let (owed, Some(d)) = (*owed, self.deliveries.pop_front()) else { break };
            match owed {
                Owed::PubAck => sends.router.push(Ack::PubAck(d.pkid)),
                Owed::PubRec => {
                    sends.router.push(Ack::PubRec(d.pkid));
                    self.releases
                        .push_back(Release { pkid: d.pkid, state: Released::AwaitPubrel { mine: d.client_qos < 2 } });
                }
            }
        }
        self.complete(&mut sends);
        sends
    }

    /// The router sent PUBREL for a delivery: answered here, or passed to the client.
    pub fn router_pubrel(&mut self, pkid: u16) -> Sends {
        let mut sends = Sends::default();
        match self.releases.iter_mut().find(|r| r.pkid == pkid && matches!(r.state, Released::AwaitPubrel { .. })) {
            Some(r) if r.state == (Released::AwaitPubrel { mine: true }) => r.state = Released::Ready,
            Some(r) => {
                r.state = Released::AwaitPubcomp;
                sends.client.push(Ack::PubRel(pkid));
            }
            // Restored with a persistent session: the client had the message in an earlier connection.
            None => {
                self.releases.push_back(Release { pkid, state: Released::AwaitPubcomp });
                sends.client.push(Ack::PubRel(pkid));
            }
        }
        self.complete(&mut sends);
        sends
    }

    /// The client sent PUBCOMP.
    pub fn pubcomp(&mut self, pkid: u16) -> Sends {
        if let Some(r) = self.releases.iter_mut().find(|r| r.pkid == pkid && r.state == Released::AwaitPubcomp) {
            r.state = Released::Ready;
        }
        let mut sends = Sends::default();
        self.complete(&mut sends);
        sends
    }

    /// Sends the router PUBCOMP for releases complete at the front of the queue. Past
    /// [`MAX_RELEASING`], the oldest the client still owes PUBCOMP for are completed for it.
    fn complete(&mut self, sends: &mut Sends) {
        let excess = self.releases.len().saturating_sub(MAX_RELEASING);
        for r in self.releases.iter_mut().take(excess) {
            if r.state == Released::AwaitPubcomp {
                r.state = Released::Ready;
            }
        }
        while self.releases.front().is_some_and(|r| r.state == Released::Ready) {
            if let Some(r) = self.releases.pop_front() {
                sends.router.push(Ack::PubComp(r.pkid));
            }
        }
    }

    /// Whether a QoS 2 PUBLISH with `pkid` from the client is still awaiting its PUBREL (a
    /// repeat of it must be answered, never handled again).
    pub fn awaiting_release(&self, pkid: u16) -> bool {
        self.recorded.iter().any(|r| r.pkid == pkid && !r.released) || self.refused.contains(&pkid)
    }

    /// The client sent a QoS 2 PUBLISH the hub lets through.
    pub fn incoming_qos2(&mut self, pkid: u16) -> Incoming {
        if self.awaiting_release(pkid) {
            return Incoming::Duplicate;
        }
        if self.recorded.len() + self.refused.len() >= MAX_AWAITING_RELEASE {
            return Incoming::Overflow;
        }
        self.recorded.push_back(Recorded { pkid, released: false });
        Incoming::Pass
    }

    /// The client sent a QoS 2 PUBLISH the router never sees (the hub refused it, or a clean
    /// session delivered it): answered PUBREC and PUBCOMP here; false on overflow.
    pub fn answered_qos2(&mut self, pkid: u16) -> bool {
        if self.recorded.len() + self.refused.len() >= MAX_AWAITING_RELEASE && !self.refused.contains(&pkid) {
            return false;
        }
        self.refused.insert(pkid);
        true
    }

    /// The client sent PUBREL.
    pub fn pubrel(&mut self, pkid: u16) -> Sends {
        let mut sends = Sends::default();
        if self.refused.remove(&pkid) {
            sends.client.push(Ack::PubComp(pkid));
            return sends;
        }
        match self.recorded.iter_mut().find(|r| r.pkid == pkid && !r.released) {
            Some(r) => r.released = true,
            // Unknown (a session the router did not keep, or a repeat): MQTT still wants PUBCOMP.
            None => sends.client.push(Ack::PubComp(pkid)),
        }
        while self.recorded.front().is_some_and(|r| r.released) {
            if let Some(r) = self.recorded.pop_front() {
                sends.router.push(Ack::PubRel(r.pkid));
            }
        }
        sends
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Ack::*;

    fn sends(router: &[Ack], client: &[Ack]) -> Sends {
        Sends { router: router.to_vec(), client: client.to_vec() }
    }

    #[test]
    fn interleaved_qos1_and_qos2_acks_reach_the_router_in_its_order() {
        let mut a = Acks::default();
        assert_eq!(a.delivered(1, 1, 1), Sends::default());
        assert_eq!(a.delivered(2, 2, 2), Sends::default());
        // MQTT allows PUBREC 2 before PUBACK 1; the router needs PUBACK 1 first.
        assert_eq!(a.pubrec(2), Sends::default());
        assert_eq!(a.puback(1), sends(&[PubAck(1), PubRec(2)], &[]));
        assert_eq!(a.router_pubrel(2), sends(&[], &[PubRel(2)]));
        assert_eq!(a.pubcomp(2), sends(&[PubComp(2)], &[]));
    }

    #[test]
    fn pubcomps_in_any_order_reach_the_router_in_pubrec_order() {
        let mut a = Acks::default();
        for id in 1..=3 {
            a.delivered(id, 2, 2);
        }
        let mut router = Vec::new();
        for id in 1..=3 {
            router.extend(a.pubrec(id).router);
            assert_eq!(a.router_pubrel(id).client, [PubRel(id)]);
        }
        assert_eq!(router, [PubRec(1), PubRec(2), PubRec(3)]);
        assert_eq!(a.pubcomp(3), Sends::default());
        assert_eq!(a.pubcomp(2), Sends::default());
        assert_eq!(a.pubcomp(1), sends(&[PubComp(1), PubComp(2), PubComp(3)], &[]));
    }

    #[test]
    fn unknown_and_repeated_acks_are_dropped() {
        let mut a = Acks::default();
        assert_eq!(a.puback(9), Sends::default());
        assert_eq!(a.pubrec(9), Sends::default());
        assert_eq!(a.pubcomp(9), Sends::default());
        a.delivered(1, 1, 1);
        assert_eq!(a.puback(1), sends(&[PubAck(1)], &[]));
        assert_eq!(a.puback(1), Sends::default());
        // The wrong kind of ack for a delivery settles nothing.
        a.delivered(2, 2, 2);
        assert_eq!(a.puback(2), Sends::default());
        assert_eq!(a.pubrec(2), sends(&[PubRec(2)], &[]));
    }

    #[test]
    fn lowered_deliveries_are_settled_by_the_session() {
        let mut a = Acks::default();
        // QoS 1 delivered at 0: acknowledged at once.
        assert_eq!(a.delivered(1, 1, 0), sends(&[PubAck(1)], &[]));
        // QoS 2 delivered at 0: PUBREC at once, the router's PUBREL answered here.
        assert_eq!(a.delivered(2, 2, 0), sends(&[PubRec(2)], &[]));
        assert_eq!(a.router_pubrel(2), sends(&[PubComp(2)], &[]));
        // QoS 2 delivered at 1: the client's PUBACK becomes PUBREC; PUBREL answered here.
        assert_eq!(a.delivered(3, 2, 1), Sends::default());
        assert_eq!(a.puback(3), sends(&[PubRec(3)], &[]));
        assert_eq!(a.router_pubrel(3), sends(&[PubComp(3)], &[]));
    }

    #[test]
    fn a_lowered_delivery_waits_behind_an_unacknowledged_one() {
        let mut a = Acks::default();
        a.delivered(1, 1, 1);
        assert_eq!(a.delivered(2, 1, 0), Sends::default());
        assert_eq!(a.puback(1), sends(&[PubAck(1), PubAck(2)], &[]));
    }

    #[test]
    fn repeated_packet_ids_in_flight_are_matched_oldest_first() {
        let mut a = Acks::default();
        a.delivered(5, 1, 1);
        a.delivered(5, 1, 1);
        assert_eq!(a.puback(5), sends(&[PubAck(5)], &[]));
        assert_eq!(a.puback(5), sends(&[PubAck(5)], &[]));
    }

    #[test]
    fn a_pubrel_restored_with_a_session_goes_to_the_client_and_back() {
        let mut a = Acks::default();
        assert_eq!(a.router_pubrel(4), sends(&[], &[PubRel(4)]));
        assert_eq!(a.pubcomp(4), sends(&[PubComp(4)], &[]));
    }

    #[test]
    fn a_client_that_never_completes_costs_a_bounded_queue() {
        let mut a = Acks::default();
        let mut completed = 0;
        for n in 0..(MAX_RELEASING as u32 + 10) {
            let id = (n % 60_000) as u16 + 1;
            a.delivered(id, 2, 2);
            let router = [a.pubrec(id).router, a.router_pubrel(id).router].concat();
            completed += router.iter().filter(|a| matches!(a, PubComp(_))).count();
        }
        assert!(a.releases.len() <= MAX_RELEASING);
        assert_eq!(completed, 10);
    }

    #[test]
    fn incoming_qos2_is_released_in_order_once_and_unknown_releases_are_answered() {
        let mut a = Acks::default();
        assert_eq!(a.incoming_qos2(1), Incoming::Pass);
        assert_eq!(a.incoming_qos2(2), Incoming::Pass);
        assert_eq!(a.incoming_qos2(1), Incoming::Duplicate);
        // Released out of order: the router gets PUBREL 1 then 2.
        assert_eq!(a.pubrel(2), Sends::default());
        assert_eq!(a.pubrel(1), sends(&[PubRel(1), PubRel(2)], &[]));
        // A repeated or unknown PUBREL is answered here.
        assert_eq!(a.pubrel(1), sends(&[], &[PubComp(1)]));
        assert!(a.answered_qos2(3));
        assert_eq!(a.incoming_qos2(3), Incoming::Duplicate);
        assert_eq!(a.pubrel(3), sends(&[], &[PubComp(3)]));
    }

    #[test]
    fn too_many_unreleased_qos2_publishes_overflow() {
        let mut a = Acks::default();
        for id in 1..=MAX_AWAITING_RELEASE as u16 {
            assert_eq!(a.incoming_qos2(id), Incoming::Pass);
        }
        assert_eq!(a.incoming_qos2(999), Incoming::Overflow);
        assert!(!a.answered_qos2(999));
    }

    /// Every order a client may answer three mixed deliveries in reaches the router in its order.
    #[test]
    fn every_answer_order_of_three_deliveries_is_put_back_in_order() {
        let qos = [(1, 1), (2, 2), (2, 1)];
        let answers: [fn(&mut Acks, u16) -> Sends; 3] = [Acks::puback, Acks::pubrec, Acks::puback];
        for order in [[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]] {
            let mut a = Acks::default();
            for (i, (r, c)) in qos.iter().enumerate() {
                a.delivered(i as u16 + 1, *r, *c);
            }
            let mut router = Vec::new();
            for i in order {
                router.extend(answers[i](&mut a, i as u16 + 1).router);
            }
            assert_eq!(router, [PubAck(1), PubRec(2), PubRec(3)], "{order:?}");
        }
    }
}
