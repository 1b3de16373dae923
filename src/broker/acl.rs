//! Who may publish and subscribe to what (SPEC §6), decided on every PUBLISH, SUBSCRIBE and will.
//!
//! Pure functions of an identity and a topic or filter; the session enforces the answer.
//!
//! | identity  | may publish                                                   | may subscribe                    |
//! |-----------|---------------------------------------------------------------|----------------------------------|
//! | device ID | `dpi/ID/state`, `dpi/ID/availability`; a keypad `dpi/alarm/set` | `dpi/ID/set`, `dpi/alarm/state` |
//! | resident  | `dpi/+/set`, `dpi/alarm/set`, `dpi/scene/set`                 | `dpi/#` and anything under it    |
//! | admin     | anything                                                      | anything                         |

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
        Identity::Device { id, kind } => match topics::parse(topic) {
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
        // A device's filters are its own command topic and the alarm's state, without wildcards.
        Identity::Device { id, .. } => match topics::parse(filter) {
            Some(Topic::Device { id: to, leaf: Leaf::Set }) => to == id,
            Some(Topic::AlarmState) => true,
            _ => false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(id: &str, kind: DeviceKind) -> Identity {
        Identity::Device { id: id.into(), kind }
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
    }
}
