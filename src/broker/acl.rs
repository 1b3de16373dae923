//! Who may publish and subscribe to what (SPEC §6), decided on every PUBLISH, SUBSCRIBE and will.
//!
//! Pure functions of an identity and a topic or filter; the session enforces the answer.
//!
//! | identity  | may publish                                                   | may subscribe                    |
//! |-----------|---------------------------------------------------------------|----------------------------------|
//! | device ID | `dpi/ID/state`, `dpi/ID/availability`; a keypad `dpi/alarm/set` | `dpi/ID/set`, `dpi/alarm/state` |
//! | resident  | `dpi/+/set`, `dpi/alarm/set`, `dpi/scene/set`                 | `dpi/#` and anything under it    |
//! | admin     | anything                                                      | anything                         |
//!
//! A device that speaks its own firmware's topics (SPEC §11) carries a [`Scope`](crate::auth::Scope) instead: it may
//! publish where one of its filters matches, and subscribe within one of them, and nothing of `dpi/`.

use crate::auth::Identity;
use crate::config::DeviceKind;
use crate::store::users::Role;
use crate::topics::{self, Leaf, Topic};

/// Whether `who` may publish on `topic` (a topic name, never a filter).
pub fn may_publish(who: &Identity, topic: &str) -> bool {
    // `$…` topics are the server's (MQTT 3.1.1 §4.7.2), and the hub has none to share.
    if topic.starts_with('$') {
        return false;
    }
    match who {
        Identity::User { role: Role::Admin, .. } => true,
        Identity::User { role: Role::Resident, .. } => matches!(
            topics::parse(topic),
            Some(Topic::Device { leaf: Leaf::Set, .. } | Topic::AlarmSet | Topic::SceneSet)
        ),
        Identity::Device { scope: Some(scope), .. } => scope.publish.iter().any(|f| matches(f, topic)),
        Identity::Device { id, kind, scope: None } => match topics::parse(topic) {
            Some(Topic::Device { id: to, leaf: Leaf::State | Leaf::Availability }) => to == id,
            Some(Topic::AlarmSet) => *kind == DeviceKind::Keypad,
            _ => false,
        },
    }
}

/// Whether `who` may subscribe to `filter` (which may hold wildcards). A filter the router
/// boundary refuses ([`super::guard::filter`]: shared subscriptions, `$…`, bad wildcards) is
/// refused to everyone.
pub fn may_subscribe(who: &Identity, filter: &str) -> bool {
    if super::guard::filter(filter).is_err() {
        return false;
    }
    match who {
        Identity::User { role: Role::Admin, .. } => true,
        Identity::User { role: Role::Resident, .. } => topics::is_hub_filter(filter),
        Identity::Device { scope: Some(scope), .. } => scope.subscribe.iter().any(|f| covers(f, filter)),
        // A device's filters are its own command topic and the alarm's state, without wildcards.
        Identity::Device { id, scope: None, .. } => match topics::parse(filter) {
            Some(Topic::Device { id: to, leaf: Leaf::Set }) => to == id,
            Some(Topic::AlarmState) => true,
            _ => false,
        },
    }
}

/// Whether the (valid) `filter` matches the topic name `topic`.
pub fn matches(filter: &str, topic: &str) -> bool {
    let mut levels = topic.split('/');
    for part in filter.split('/') {
        match (part, levels.next()) {
            ("#", _) => return true,
            ("+", Some(_)) => {}
            (literal, Some(level)) if literal == level => {}
            _ => return false,
        }
    }
    levels.next().is_none()
}

/// Whether every topic the (valid) `filter` matches is matched by `allowed` too.
fn covers(allowed: &str, filter: &str) -> bool {
    let mut levels = filter.split('/');
    for part in allowed.split('/') {
        match (part, levels.next()) {
            ("#", _) => return true,
            // `+` stands for any one level, but not for `#`, which may be several.
            ("+", Some(level)) if level != "#" => {}
            (literal, Some(level)) if literal == level && level != "+" && level != "#" => {}
            _ => return false,
        }
    }
    levels.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Scope;

    fn device(id: &str, kind: DeviceKind) -> Identity {
        Identity::Device { id: id.into(), kind, scope: None }
    }
    fn speaker(publish: &[&str], subscribe: &[&str]) -> Identity {
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        let scope = Scope { publish: strings(publish), subscribe: strings(subscribe) };
        Identity::Device { id: "plug".into(), kind: DeviceKind::Light, scope: Some(std::sync::Arc::new(scope)) }
    }
    fn tasmota() -> Identity {
        speaker(&["tele/plug_1/#", "stat/plug_1/#"], &["cmnd/plug_1/#"])
    }
    fn user(role: Role) -> Identity {
        Identity::User { name: "u".into(), role }
    }

    /// One line per case: who, topic, allowed.
    macro_rules! publish {
        ($($name:ident: $who:expr, $topic:expr => $ok:expr;)*) => {$(
            #[test]
            fn $name() { assert_eq!(may_publish(&$who, $topic), $ok, "{:?} publish {}", $who, $topic); }
        )*};
    }
    macro_rules! subscribe {
        ($($name:ident: $who:expr, $filter:expr => $ok:expr;)*) => {$(
            #[test]
            fn $name() { assert_eq!(may_subscribe(&$who, $filter), $ok, "{:?} subscribe {}", $who, $filter); }
        )*};
    }

    publish! {
        device_own_state: device("door", DeviceKind::Contact), "dpi/door/state" => true;
        device_own_availability: device("door", DeviceKind::Contact), "dpi/door/availability" => true;
        device_other_state: device("door", DeviceKind::Contact), "dpi/window/state" => false;
        device_prefix_of_other_id: device("door", DeviceKind::Contact), "dpi/door2/state" => false;
        device_other_set: device("motion", DeviceKind::Motion), "dpi/siren/set" => false;
        device_own_set: device("motion", DeviceKind::Motion), "dpi/motion/set" => false;
        motion_alarm_set: device("motion", DeviceKind::Motion), "dpi/alarm/set" => false;
        keypad_alarm_set: device("keypad", DeviceKind::Keypad), "dpi/alarm/set" => true;
        keypad_alarm_state: device("keypad", DeviceKind::Keypad), "dpi/alarm/state" => false;
        device_hub_status: device("door", DeviceKind::Contact), "dpi/hub/status" => false;
        resident_device_set: user(Role::Resident), "dpi/hall-light/set" => true;
        resident_alarm_set: user(Role::Resident), "dpi/alarm/set" => true;
        resident_scene_set: user(Role::Resident), "dpi/scene/set" => true;
        resident_device_state: user(Role::Resident), "dpi/door/state" => false;
        resident_alarm_state: user(Role::Resident), "dpi/alarm/state" => false;
        resident_deep_set: user(Role::Resident), "dpi/a/b/set" => false;
        resident_outside_dpi: user(Role::Resident), "other/x/set" => false;
        admin_anything: user(Role::Admin), "anything/at/all" => true;
        admin_dollar_topic: user(Role::Admin), "$SYS/broker/x" => false;
        tasmota_tele: tasmota(), "tele/plug_1/STATE" => true;
        tasmota_stat: tasmota(), "stat/plug_1/POWER" => true;
        tasmota_other_device: tasmota(), "tele/plug_2/STATE" => false;
        tasmota_prefix_of_other: tasmota(), "tele/plug_10/STATE" => false;
        tasmota_own_command: tasmota(), "cmnd/plug_1/POWER" => false;
        tasmota_dpi_state: tasmota(), "dpi/plug/state" => false;
        tasmota_alarm: tasmota(), "dpi/alarm/set" => false;
        tasmota_discovery: tasmota(), "tasmota/discovery/A1B2C3/config" => false;
        exact_scope: speaker(&["zigbee2mqtt/hall motion"], &[]), "zigbee2mqtt/hall motion" => true;
        exact_scope_deeper: speaker(&["zigbee2mqtt/hall motion"], &[]), "zigbee2mqtt/hall motion/x" => false;
        plus_scope: speaker(&["n/+/state"], &[]), "n/a/state" => true;
        plus_scope_two_levels: speaker(&["n/+/state"], &[]), "n/a/b/state" => false;
    }

    subscribe! {
        device_own_set_filter: device("light", DeviceKind::Light), "dpi/light/set" => true;
        device_alarm_state_filter: device("siren", DeviceKind::Siren), "dpi/alarm/state" => true;
        device_everything: device("motion", DeviceKind::Motion), "#" => false;
        device_all_sets: device("motion", DeviceKind::Motion), "dpi/+/set" => false;
        device_other_set_filter: device("motion", DeviceKind::Motion), "dpi/light/set" => false;
        device_shared_own: device("light", DeviceKind::Light), "$share/g/dpi/light/set" => false;
        resident_dpi_all: user(Role::Resident), "dpi/#" => true;
        resident_dpi_states: user(Role::Resident), "dpi/+/state" => true;
        resident_everything: user(Role::Resident), "#" => false;
        resident_sys: user(Role::Resident), "$SYS/#" => false;
        admin_everything: user(Role::Admin), "#" => true;
        admin_sys: user(Role::Admin), "$SYS/broker" => false;
        invalid_hash_middle: user(Role::Admin), "a/#/b" => false;
        invalid_plus_in_level: user(Role::Admin), "a/b+" => false;
        empty_filter: user(Role::Admin), "" => false;
        tasmota_own_commands: tasmota(), "cmnd/plug_1/#" => true;
        tasmota_one_command: tasmota(), "cmnd/plug_1/POWER" => true;
        tasmota_group_topic: tasmota(), "cmnd/tasmotas/#" => false;
        tasmota_all_commands: tasmota(), "cmnd/+/POWER" => false;
        tasmota_everything: tasmota(), "#" => false;
        tasmota_own_dpi_set: tasmota(), "dpi/plug/set" => false;
        tasmota_shared: tasmota(), "$share/g/cmnd/plug_1/#" => false;
        plus_covers_level: speaker(&[], &["n/+/command"]), "n/a/command" => true;
        plus_covers_plus: speaker(&[], &["n/+/command"]), "n/+/command" => true;
        plus_not_hash: speaker(&[], &["n/+/command"]), "n/#" => false;
        literal_not_plus: speaker(&[], &["n/a/command"]), "n/+/command" => false;
    }

    #[test]
    fn a_filter_covers_what_it_matches_and_no_more() {
        // For random filters over a small alphabet: if `allowed` covers `filter`, every topic
        // `filter` matches is matched by `allowed`.
        let levels = ["a", "b", "+", "#"];
        let mut filters = Vec::new();
        for n in 1..=3 {
            let mut idx = vec![0usize; n];
            loop {
                let parts: Vec<&str> = idx.iter().map(|&i| levels[i]).collect();
                if parts.iter().position(|p| *p == "#").is_none_or(|i| i == n - 1) {
                    filters.push(parts.join("/"));
                }
                let Some(k) = (0..n).rev().find(|&k| idx[k] + 1 < levels.len()) else { break };
                idx[k] += 1;
                idx[k + 1..].iter_mut().for_each(|i| *i = 0);
            }
        }
        let topics: Vec<String> = filters
            .iter()
            .filter(|f| !f.contains(['+', '#']))
            .cloned()
            .chain(["a/b/a/b".into(), "c".into(), "a/c".into()])
            .collect();
        for allowed in &filters {
            for filter in &filters {
                let every = topics.iter().filter(|t| matches(filter, t)).all(|t| matches(allowed, t));
                if covers(allowed, filter) {
                    assert!(every, "{allowed} covers {filter}, yet some topic of it is not allowed");
                }
                if filter == allowed {
                    assert!(covers(allowed, filter), "{allowed} does not cover itself");
                }
            }
        }
    }
}
