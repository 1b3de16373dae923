//! The watchdog that sees (SPEC §9): systemd's pings stop when the router, the store or the alarm
//! stops answering. The real binary runs with a notify socket of the test's own, as systemd would
//! give it, and the test-only fault switch stalls one part for good.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use domoticpi::control::{self, Request};
use domoticpi::health::Fault;

use crate::util::*;

/// The next notification the hub sends, within `within`.
fn next(socket: &UnixDatagram, within: Duration) -> Option<String> {
    socket.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 512];
    socket.recv(&mut buf).ok().map(|n| String::from_utf8_lossy(&buf[..n]).trim().to_owned())
}

/// Waits for a line of the hub's log containing `text`.
fn log_line(hub: &HubProcess, text: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let line = hub
            .stderr
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("no log line with {text:?}"));
        if line.contains(text) {
            return line;
        }
    }
}

#[test]
fn the_watchdog_stops_when_the_router_the_store_or_the_alarm_stalls() {
    for (part, name) in [(Fault::Store, "store"), (Fault::Alarm, "alarm"), (Fault::Router, "router")] {
        let (dir, config, data_dir) = process_config("");
        let notify = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&notify).unwrap();
        let env = [
            ("NOTIFY_SOCKET", notify.to_str().unwrap()),
            ("WATCHDOG_USEC", "400000"),
            (domoticpi::health::FAULTS_ENV, "1"),
        ];
        let hub = HubProcess::start_as_service(&config, &env);
        assert_eq!(next(&socket, Duration::from_secs(10)).as_deref(), Some("READY=1"));
        // Pinged every 200 ms while everything answers.
        for _ in 0..3 {
            assert_eq!(next(&socket, Duration::from_secs(5)).as_deref(), Some("WATCHDOG=1"), "{name}");
        }
        let answer = control::request(&data_dir, &Request::Fault { part }).unwrap();
        assert!(answer.error.is_none(), "{:?}", answer.error);
        let line = log_line(&hub, "watchdog not pinged");
        assert!(line.contains(name), "{line}");
        // Pings sent before that failed round may still wait in the socket: they are older.
        while next(&socket, Duration::from_millis(1)).is_some() {}
        // From then on, no ping: systemd would restart the hub after WatchdogSec.
        while let Some(message) = next(&socket, Duration::from_millis(1500)) {
            assert_ne!(message, "WATCHDOG=1", "pinged after the {name} stalled");
        }
        drop(hub);
    }
}

#[test]
fn the_fault_switch_is_off_unless_armed() {
    let (_dir, config, data_dir) = process_config("");
    let _hub = HubProcess::start(&config);
    let answer = control::request(&data_dir, &Request::Fault { part: Fault::Store }).unwrap();
    assert!(answer.error.is_some_and(|e| e.contains("fault switch is off")));
    // The store still answers.
    let stats = control::request(&data_dir, &Request::Stats).unwrap();
    assert!(stats.stats.is_some());
}
