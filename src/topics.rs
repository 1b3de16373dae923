//! Every `dpi/…` topic of SPEC §5, parsed and formatted here and nowhere else, and the body of
//! `dpi/hub/error`. The broker's ACL, the house side and the CLI all speak through this module, so
//! that a topic is spelled once.
//!
//! Pure: no I/O, no config. Whether an id is a declared device is the house side's question.

/// The hub's own `online`/`offline` status, retained.
pub const HUB_STATUS: &str = "dpi/hub/status";
/// Where the hub reports every message it rejected.
pub const HUB_ERROR: &str = "dpi/hub/error";
/// Alarm commands from residents and keypads.
pub const ALARM_SET: &str = "dpi/alarm/set";
/// The alarm's state, retained.
pub const ALARM_STATE: &str = "dpi/alarm/state";
/// The alarm's events.
pub const ALARM_EVENT: &str = "dpi/alarm/event";
/// Scene requests from residents.
pub const SCENE_SET: &str = "dpi/scene/set";
/// Every topic of the hub's, as a filter.
pub const ALL: &str = "dpi/#";

/// Ids that are the hub's own (`dpi/alarm/…`, `dpi/scene/…`, `dpi/hub/…`) or kept for the bridge's
/// name: never a device's id, and never a user's name.
pub const RESERVED_IDS: &[&str] = &["alarm", "scene", "hub", "bridge"];

/// The last level of a device topic `dpi/ID/LEAF`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Leaf {
    /// `dpi/ID/state`: the device's state, retained.
    State,
    /// `dpi/ID/availability`: `online` / `offline`, retained.
    Availability,
    /// `dpi/ID/set`: a command to the device.
    Set,
}

impl Leaf {
    /// The level as spelled in the topic.
    pub fn as_str(self) -> &'static str {
        match self {
            Leaf::State => "state",
            Leaf::Availability => "availability",
            Leaf::Set => "set",
        }
    }
}

/// A topic of the hub's, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topic<'a> {
    /// `dpi/ID/state|availability|set`; the id is not looked up.
    Device { id: &'a str, leaf: Leaf },
    /// `dpi/alarm/set`.
    AlarmSet,
    /// `dpi/alarm/state`.
    AlarmState,
    /// `dpi/alarm/event`.
    AlarmEvent,
    /// `dpi/scene/set`.
    SceneSet,
    /// `dpi/hub/status`.
    HubStatus,
    /// `dpi/hub/error`.
    HubError,
}

/// Parses a topic name; `None` for anything that is not one of SPEC §5's (other prefixes, other
/// depths, unknown leaves, an empty id, or a reserved id with a device's leaf).
pub fn parse(topic: &str) -> Option<Topic<'_>> {
    // Every message a client publishes is parsed here: most are told apart by their first bytes.
    let (id, leaf) = topic.strip_prefix("dpi/")?.split_once('/')?;
    if id.is_empty() || leaf.contains('/') {
        return None;
    }
    Some(match (id, leaf) {
        ("alarm", "set") => Topic::AlarmSet,
        ("alarm", "state") => Topic::AlarmState,
        ("alarm", "event") => Topic::AlarmEvent,
        ("scene", "set") => Topic::SceneSet,
        ("hub", "status") => Topic::HubStatus,
        ("hub", "error") => Topic::HubError,
        (id, _) if RESERVED_IDS.contains(&id) => return None,
        (id, "state") => Topic::Device { id, leaf: Leaf::State },
        (id, "availability") => Topic::Device { id, leaf: Leaf::Availability },
        (id, "set") => Topic::Device { id, leaf: Leaf::Set },
        _ => return None,
    })
}

/// The device topic `dpi/ID/LEAF`.
pub fn device(id: &str, leaf: Leaf) -> String {
    format!("dpi/{id}/{}", leaf.as_str())
}

/// Whether `filter` only reaches the hub's topics (`dpi/` and below).
pub fn is_hub_filter(filter: &str) -> bool {
    filter.starts_with("dpi/")
}

/// The payload of `dpi/hub/error` for a message the hub rejected.
pub fn error_body(topic: &str, client: &str, error: &str) -> String {
    serde_json::json!({ "topic": topic, "client": client, "error": error }).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One line per case: topic, what it parses to.
    macro_rules! parse {
        ($($name:ident: $topic:expr => $parsed:expr;)*) => {$(
            #[test]
            fn $name() { assert_eq!(parse($topic), $parsed, "{}", $topic); }
        )*};
    }

    fn dev(id: &str, leaf: Leaf) -> Option<Topic<'_>> {
        Some(Topic::Device { id, leaf })
    }

    parse! {
        state: "dpi/front-door/state" => dev("front-door", Leaf::State);
        availability: "dpi/hall-motion/availability" => dev("hall-motion", Leaf::Availability);
        set: "dpi/hall-light/set" => dev("hall-light", Leaf::Set);
        alarm_state: "dpi/alarm/state" => Some(Topic::AlarmState);
        alarm_set: "dpi/alarm/set" => Some(Topic::AlarmSet);
        alarm_event: "dpi/alarm/event" => Some(Topic::AlarmEvent);
        scene: "dpi/scene/set" => Some(Topic::SceneSet);
        hub_status: "dpi/hub/status" => Some(Topic::HubStatus);
        hub_error: "dpi/hub/error" => Some(Topic::HubError);
        hub_availability: "dpi/hub/availability" => None;
        bridge_state: "dpi/bridge/state" => None;
        alarm_availability: "dpi/alarm/availability" => None;
        unknown_leaf: "dpi/front-door/event" => None;
        too_deep: "dpi/front-door/state/extra" => None;
        too_short: "dpi/front-door" => None;
        empty_id: "dpi//state" => None;
        other_prefix: "home/front-door/state" => None;
        leading_slash: "/dpi/front-door/state" => None;
        trailing_slash: "dpi/front-door/state/" => None;
    }

    #[test]
    fn a_formatted_device_topic_parses_back() {
        for leaf in [Leaf::State, Leaf::Availability, Leaf::Set] {
            assert_eq!(parse(&device("porch", leaf)), dev("porch", leaf));
        }
    }

    #[test]
    fn the_error_body_is_one_json_object() {
        let body: serde_json::Value = serde_json::from_str(&error_body("dpi/x/state", "x", "bad \"json\"")).unwrap();
        assert_eq!(body["error"], "bad \"json\"");
        assert_eq!(body.as_object().unwrap().len(), 3);
    }
}
