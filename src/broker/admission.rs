//! Admission: how many connections the hub serves at once, counted from the moment a socket is
//! accepted (an unauthenticated connection holds resources too), and how many of them one address
//! may hold before they are logged in.
//!
//! Past `max_connections`, a few more sockets are still answered, with CONNACK 3 (server
//! unavailable), so that a device can tell a full hub from a network fault; past those, and past an
//! address's share of logins in progress, a socket is closed at once, as Mosquitto does.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Sockets past `max_connections` still answered with CONNACK 3 rather than closed.
pub const OVERFLOW_ANSWERS: usize = 16;

/// Why a socket is closed as soon as it is accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Turned {
    /// Even the sockets answered with CONNACK 3 are all taken.
    #[error("too many connections")]
    Full,
    /// This address already has its share of logins in progress.
    #[error("too many logins in progress from this address")]
    AddressBusy,
}

/// The counts (see the module docs).
#[derive(Debug)]
pub struct Admission {
    max_connections: usize,
    /// Logins in progress one address may have.
    per_address: usize,
    /// Sockets open now, logged in or not.
    sockets: AtomicUsize,
    /// Logins in progress, per address.
    logins: Mutex<HashMap<IpAddr, usize>>,
    /// Sockets closed at accept, for the log.
    turned: AtomicU64,
}

/// A socket's place, from accept until it closes.
#[derive(Debug)]
pub struct Ticket {
    admission: Arc<Admission>,
    ip: IpAddr,
    /// Past `max_connections`: to be answered with CONNACK 3.
    over: bool,
    /// Still counted as a login in progress for its address.
    logging_in: bool,
}

impl Admission {
    /// Counts for a hub serving `max_connections` clients.
    pub fn new(max_connections: usize) -> Arc<Admission> {
        Arc::new(Admission {
            max_connections,
            per_address: (max_connections / 4).max(16),
            sockets: AtomicUsize::new(0),
            logins: Mutex::default(),
            turned: AtomicU64::new(0),
        })
    }

    /// Takes a place for a socket just accepted from `ip`, or says why it is closed at once.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Ticket, Turned> {
        let turned = |why| {
            let n = self.turned.fetch_add(1, Ordering::Relaxed);
            if n.is_power_of_two() || n == 0 {
                tracing::warn!(%ip, reason = %why, closed_so_far = n + 1, "connection closed at once");
            }
            Err(why)
        };
        {
            let mut logins = self.logins.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let pending = logins.entry(ip).or_default();
            if *pending >= self.per_address {
                return turned(Turned::AddressBusy);
            }
            *pending += 1;
        }
        let sockets = self.sockets.fetch_add(1, Ordering::AcqRel) + 1;
        let ticket = Ticket { admission: Arc::clone(self), ip, over: sockets > self.max_connections, logging_in: true };
        if sockets > self.max_connections + OVERFLOW_ANSWERS {
            drop(ticket);
            return turned(Turned::Full);
        }
        Ok(ticket)
    }

    /// Sockets open now.
    pub fn sockets(&self) -> usize {
        self.sockets.load(Ordering::Relaxed)
    }

    fn login_over(&self, ip: IpAddr) {
        let mut logins = self.logins.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = logins.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                logins.remove(&ip);
            }
        }
    }
}

impl Ticket {
    /// Whether the socket came past `max_connections` (answer CONNACK 3).
    pub fn over_limit(&self) -> bool {
        self.over
    }

    /// The login is answered: the address may start another.
    pub fn logged_in(&mut self) {
        if std::mem::take(&mut self.logging_in) {
            self.admission.login_over(self.ip);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.logged_in();
        self.admission.sockets.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_count_from_accept_and_overflow_is_answered_then_closed() {
        let a = Admission::new(2);
        let ip: IpAddr = [127, 0, 0, 1].into();
        let mut held: Vec<Ticket> = (0..2).map(|_| a.admit(ip).unwrap()).collect();
        assert!(held.iter().all(|t| !t.over_limit()));
        for t in &mut held {
            t.logged_in();
        }
        let over: Vec<Ticket> = (0..OVERFLOW_ANSWERS).map(|_| a.admit([10, 0, 0, 1].into()).unwrap()).collect();
        assert!(over.iter().all(Ticket::over_limit));
        assert_eq!(a.admit([10, 0, 0, 2].into()).unwrap_err(), Turned::Full);
        drop(over);
        drop(held.pop());
        assert!(!a.admit(ip).unwrap().over_limit());
        assert_eq!(a.sockets(), 1);
    }

    #[test]
    fn one_address_gets_a_share_of_logins_in_progress() {
        let a = Admission::new(100);
        let ip: IpAddr = [127, 0, 0, 2].into();
        let mut pending: Vec<Ticket> = (0..25).map(|_| a.admit(ip).unwrap()).collect();
        assert_eq!(a.admit(ip).unwrap_err(), Turned::AddressBusy);
        assert!(a.admit([127, 0, 0, 1].into()).is_ok(), "another address is not held back");
        // Once logged in, a connection no longer counts against its address.
        pending[0].logged_in();
        assert!(a.admit(ip).is_ok());
    }
}
