//! Home Assistant discovery end to end (SPEC §11): the retained announcements, announced again when
//! Home Assistant says `online`, withdrawn at a reload, and the alarm panel's command as Home
//! Assistant's template writes it.

use std::time::Duration;

use domoticpi::store::users::Role;
use rumqttc::QoS;
use serde_json::Value;

use crate::util::*;

const HOUSE: &str = "[homeassistant]\ndiscovery = true\n\
[[device]]\nid = \"hall-motion\"\nkind = \"motion\"\n\
[[device]]\nid = \"hall-light\"\nkind = \"light\"\n";

/// Receives until `topic`, skipping others; its payload.
async fn next_on(c: &mut Client, topic: &str) -> Vec<u8> {
    loop {
        let p = c.recv(10).await;
        if p.topic == topic {
            return p.payload.to_vec();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn home_assistant_finds_every_device_and_the_alarm_and_finds_them_again_when_it_restarts() {
    let hub = TestHub::start(HOUSE).await;
    hub.add_cheap_user("homeassistant", Role::Admin, "ha-password");
    let mut ha = hub.client("home-assistant", "homeassistant", "ha-password").await.unwrap();
    ha.subscribe("homeassistant/#", QOS1).await;
    let motion = "homeassistant/binary_sensor/domoticpi/hall_motion/config";
    let light = "homeassistant/light/domoticpi/hall_light/config";
    let alarm = "homeassistant/alarm_control_panel/domoticpi/alarm/config";
    // Retained, in whatever order the broker keeps them.
    let mut configs = std::collections::HashMap::new();
    while ![motion, light, alarm].iter().all(|t| configs.contains_key(*t)) {
        let p = ha.recv(10).await;
        configs.insert(p.topic.clone(), serde_json::from_slice::<Value>(&p.payload).unwrap_or(Value::Null));
    }
    let body = &configs[motion];
    assert_eq!(
        (body["state_topic"].as_str(), body["device_class"].as_str()),
        (Some("dpi/hall-motion/state"), Some("motion"))
    );
    assert_eq!(configs[light]["command_topic"], "dpi/hall-light/set");
    assert_eq!(configs[alarm]["code"], "REMOTE_CODE");

    // Home Assistant restarts: it says so, and gets the announcements again.
    ha.client.publish("homeassistant/status", QoS::AtLeastOnce, false, "online").await.unwrap();
    next_on(&mut ha, motion).await;

    // Its alarm panel arms with the command its template writes (no code needed to arm here).
    ha.subscribe("dpi/alarm/state", QOS1).await;
    ha.client.publish("dpi/alarm/set", QoS::AtLeastOnce, false, r#"{"action": "arm_away", "code": ""}"#).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let state: Value = serde_json::from_slice(&next_on(&mut ha, "dpi/alarm/state").await).unwrap();
        if state["state"] == "arming" || state["state"] == "armed_away" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "Home Assistant's arming did nothing");
    }

    // A device removed by a reload is withdrawn: an empty retained config.
    hub.rewrite_config("[homeassistant]\ndiscovery = true\n[[device]]\nid = \"hall-light\"\nkind = \"light\"\n");
    let (code, out, err) = run_cli(&["--config", &hub.config_path(), "reload"], None);
    assert_eq!(code, 0, "{out}{err}");
    assert!(next_on(&mut ha, motion).await.is_empty(), "the removed sensor's config was not withdrawn");
    hub.stop().await.unwrap();
}
