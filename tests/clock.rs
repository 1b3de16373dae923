//! A Pi has no real-time clock: it boots years in the past and NTP steps the clock forward. The
//! real daemon is started with its wall clock five years back (the test-only fault switch sets the
//! offset of the one clock every part of the hub reads), then stepped to a few seconds before a
//! schedule's edge, in the middle of the alarm's exit delay.
//!
//! Assertions on time are "not before" and generous upper bounds, never speed.

use std::time::{Duration, Instant};

use domoticpi::control::{self, Request};
use rumqttc::Publish;

use crate::util::*;

const HOUSE: &str = r#"
[house]
timezone = "Europe/Paris"
[alarm]
exit_delay_s = 3
entry_delay_s = 30
siren_s = 60
[[device]]
id = "porch"
kind = "light"
[[device]]
id = "front-door"
kind = "contact"
zone = "entry"
[[rule.schedule]]
lights = ["porch"]
on = "18:00"
off = "22:00"
"#;

/// A subscriber's messages, kept in order, so that waiting for one topic loses no other.
struct Watch {
    client: Client,
    /// Messages not asked for yet, with when they arrived.
    kept: std::collections::VecDeque<(Instant, Publish)>,
}

impl Watch {
    /// The next message on `topic` within `secs` (kept ones first), and when it arrived; the
    /// others stay kept.
    async fn arrival_on(&mut self, topic: &str, secs: u64) -> Option<(Instant, Publish)> {
        if let Some(i) = self.kept.iter().position(|(_, p)| p.topic == topic) {
            return self.kept.remove(i);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        while let Ok(Some(p)) = tokio::time::timeout_at(deadline, self.client.rx.recv()).await {
            if p.topic == topic {
                return Some((Instant::now(), p));
            }
            self.kept.push_back((Instant::now(), p));
        }
        None
    }

    async fn next_on(&mut self, topic: &str, secs: u64) -> Option<Publish> {
        self.arrival_on(topic, secs).await.map(|(_, p)| p)
    }
}

/// Seconds between an RFC 3339 time and `2026-06-01T16:00:00Z` (18:00 in Paris).
fn from_six_pm(at: &str) -> i64 {
    let at: jiff::Timestamp = at.parse().unwrap();
    let six: jiff::Timestamp = "2026-06-01T16:00:00Z".parse().unwrap();
    at.as_second() - six.as_second()
}

fn json(p: &Publish) -> serde_json::Value {
    serde_json::from_slice(&p.payload).unwrap()
}

#[test]
fn a_clock_stepped_forward_by_years_keeps_delays_and_fires_each_schedule_once_at_its_local_time() {
    let (_dir, config, data) = process_config(HOUSE);
    let (code, out, err) = run_cli(
        &["--config", config.to_str().unwrap(), "user", "add", "admin", "--role", "admin", "--password-stdin"],
        Some("admin-password\n"),
    );
    assert_eq!(code, 0, "{out}{err}");
    let env = [(domoticpi::health::FAULTS_ENV, "1"), (domoticpi::wall::TEST_CLOCK_ENV, "2021-03-01T12:00:00+01:00")];
    let hub = HubProcess::start_as_service(&config, &env);
    let ca = data.join("certs/ca.pem");
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let client = Client::connect(hub.tls, &ca, "admin-watch", Some(("admin", "admin-password"))).await.unwrap();
        client.subscribe("dpi/#", QOS1).await;
        let mut admin = Watch { client, kept: Default::default() };
        let state = admin.next_on("dpi/alarm/state", 10).await.expect("no alarm state");
        assert_eq!(json(&state)["state"], "disarmed");

        // The hub lives in 2021: outside the porch's window, the schedule switches nothing at start.
        let armed = control::request(&data, &Request::Alarm { command: serde_json::json!({"action": "arm_away"}) });
        let armed_at = Instant::now();
        assert!(armed.unwrap().error.is_none());
        let arming = admin.next_on("dpi/alarm/state", 5).await.expect("no arming state");
        assert_eq!(json(&arming)["state"], "arming");
        assert!(json(&arming)["since"].as_str().unwrap().starts_with("2021-03-01T11:00"), "{:?}", json(&arming));

        // NTP steps the clock over five years, to three seconds before the porch's 18:00 (summer time).
        let stepped =
            control::request(&data, &Request::SetClock { at: "2026-06-01T17:59:57+02:00".to_owned() }).unwrap();
        let stepped_at = Instant::now();
        assert!(stepped.error.is_none(), "{:?}", stepped.error);

        // The skipped years collapse into the state they end in (off since 22:00 the day before), applied once.
        let off = admin.next_on("dpi/porch/set", 2).await.expect("the schedule's state was not applied");
        assert_eq!(json(&off)["on"], false);

        // The exit delay keeps its length on the monotonic clock: not cut short by five years.
        let (arrived, armed_state) = admin.arrival_on("dpi/alarm/state", 10).await.expect("never armed");
        let took = arrived.duration_since(armed_at);
        assert_eq!(json(&armed_state)["state"], "armed_away");
        assert!(took >= Duration::from_millis(2_900), "armed after {took:?}, before the 3 s exit delay");
        assert!(took < Duration::from_secs(8), "armed after {took:?}");
        // Armed on the stepped clock: three seconds before 18:00, plus what is left of the delay.
        let since = from_six_pm(json(&armed_state)["since"].as_str().unwrap());
        assert!((-3..=5).contains(&since), "armed {since} s from 18:00: {:?}", json(&armed_state));

        // The porch goes on at 18:00 local, once: not before the hub's clock reaches it.
        let (arrived, on) = admin.arrival_on("dpi/porch/set", 10).await.expect("the porch never went on");
        let at = arrived.duration_since(stepped_at);
        assert_eq!(json(&on)["on"], true);
        assert!(at >= Duration::from_millis(2_990), "on {at:?} after the step, before 18:00");
        assert!(at < Duration::from_secs(8), "on {at:?} after the step");
        // Nothing else: no edge of the skipped years fires late, none twice.
        assert!(admin.next_on("dpi/porch/set", 2).await.is_none(), "a second porch command");
        assert!(admin.kept.iter().all(|(_, p)| p.topic != "dpi/porch/set"));
    });
    let log: Vec<String> = hub.stderr.try_iter().collect();
    assert!(log.iter().any(|l| l.contains("the wall clock stepped forward")), "{log:#?}");
}

#[test]
fn the_clock_cannot_be_set_without_the_fault_switch() {
    let (_dir, config, data) = process_config("");
    let _hub = HubProcess::start(&config);
    let answer = control::request(&data, &Request::SetClock { at: "2030-01-01T00:00:00Z".to_owned() }).unwrap();
    assert!(answer.error.unwrap().contains("fault switch is off"));
}
