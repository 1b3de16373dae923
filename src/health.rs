//! The watchdog that sees (SPEC §9): systemd's watchdog is pinged only while the router, the store
//! and the alarm each answer within a second, so a stuck part gets the hub restarted rather than a
//! live process that does nothing.
//!
//! Each round asks all three: the router acknowledges the hub's link subscribing again to a filter
//! it has (`dpi/hub/status`: no message is sent to anyone, no retained one replayed); the store
//! thread runs a query; the alarm driver reports its state. A part that
//! does not answer within [`ANSWER_WITHIN`] is logged by name and the ping is skipped.
//!
//! A test-only fault switch ([`Fault`], through the control socket, honoured only when the daemon
//! was started with `DOMOTICPI_TEST_FAULTS=1`) stalls one part for good, to prove the pings stop.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Mutex};
use tracing::{error, info};

use crate::alarm::AlarmHandle;
use crate::broker::{HubLink, Message};
use crate::store::Store;

/// How long each part has to answer.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(1);

/// The environment variable that arms the fault switch.
pub const FAULTS_ENV: &str = "DOMOTICPI_TEST_FAULTS";

/// A part the fault switch can stall.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fault {
    /// rumqttd's router thread.
    Router,
    /// The store thread.
    Store,
    /// The alarm driver.
    Alarm,
}

/// What the probes ask.
#[derive(Debug, Clone)]
pub struct Probes {
    /// The hub's link, which publishes the router probe.
    pub link: HubLink,
    /// What the hub's link receives (shared with the hub's status announcements).
    pub echo: Arc<Mutex<mpsc::UnboundedReceiver<Message>>>,
    /// The store.
    pub store: Store,
    /// The alarm driver.
    pub alarm: AlarmHandle,
}

impl Probes {
    /// Asks each part once; the name of the first that did not answer in time.
    pub async fn check(&self) -> Result<(), &'static str> {
        let routed = async {
            let mut echo = self.echo.lock().await;
            // A SUBACK left over from a round that timed out is not this round's answer.
            while echo.try_recv().is_ok() {}
            self.link.subscribe(crate::topics::HUB_STATUS);
            while let Some(m) = echo.recv().await {
                if m.topic == crate::broker::SUBACK {
                    return true;
                }
            }
            false
        };
        if !matches!(tokio::time::timeout(ANSWER_WITHIN, routed).await, Ok(true)) {
            return Err("router");
        }
        let query =
            self.store.call(|c| c.query_row("SELECT 1", [], |r| r.get::<_, i64>(0)).map_err(crate::store::sql_err(c)));
        if !matches!(tokio::time::timeout(ANSWER_WITHIN, query).await, Ok(Ok(1))) {
            return Err("store");
        }
        if !matches!(tokio::time::timeout(ANSWER_WITHIN, self.alarm.status()).await, Ok(Ok(_))) {
            return Err("alarm");
        }
        Ok(())
    }

    /// Stalls `part` for good (the fault switch).
    pub fn stall(&self, part: Fault) {
        error!(?part, "fault switch: stalling a part of the hub for good");
        match part {
            Fault::Router => crate::broker::lag::stall_router(),
            Fault::Store => {
                let store = self.store.clone();
                tokio::spawn(async move {
                    let _ = store
                        .call(|_| -> Result<(), crate::store::StoreError> {
                            loop {
                                std::thread::park();
                            }
                        })
                        .await;
                });
            }
            Fault::Alarm => self.alarm.stall(),
        }
    }
}

/// Pings systemd's watchdog every `period` while every part answers; runs until cancelled.
pub async fn run(probes: Probes, period: Duration) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = None;
    loop {
        tick.tick().await;
        match probes.check().await {
            Ok(()) => {
                if let Some(part) = failing.take() {
                    info!(part, "watchdog: every part answers again");
                }
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
            }
            Err(part) => {
                if failing.replace(part) != Some(part) {
                    error!(part, "watchdog not pinged: the {part} did not answer within 1 s (systemd restarts the hub if it lasts)");
                }
            }
        }
    }
}
