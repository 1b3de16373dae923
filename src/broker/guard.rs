//! The router boundary: what may reach rumqttd's router, decided in one place.
//!
//! The router runs on a thread of its own, and when that thread dies every link closes and the
//! hub exits. It was written for clients that behave, so the hub lets through only inputs it is
//! known to handle: topics, filters and client ids from this module's allow-lists, packets from
//! the session layer, acknowledgements in the order [`super::acks`] puts them in, and router-facing
//! client ids of the hub's own making ([`super::sessions`]). Whatever fails here gets its MQTT
//! answer and a log line from the session; what is restored at start goes through the same checks.
//!
//! Each way rumqttd 0.20's router fails, what stands in its way, and the test that covers it
//! (integration tests in `tests/`, unit tests in the named module):
//!
//! | router failure | guard | test |
//! | --- | --- | --- |
//! | a topic or filter whose first character is multi-byte panics in `protocol::matches` (`topic[..1]`), on a publish, a subscribe, a will or a retained message restored at start | [`topic`], [`filter`]: first character ASCII, everywhere | `attacks::an_accented_topic_is_refused_…`, `attacks::wills_are_checked_…`, `guard::tests` |
//! | a persistent session with an unacknowledged delivery through a shared subscription panics at disconnect (`expect("group must exists")`) | [`filter`]: no `$share/…` | `attacks::a_device_with_a_shared_subscription_…` |
//! | a `$…` filter disconnects the client | [`filter`]: no `$` first | `guard::tests` |
//! | an acknowledgement out of the router's order (QoS 1 and 2 interleaved), unknown or repeated disconnects the client; so does a PUBREL it cannot match; a repeated QoS 2 PUBLISH is recorded twice | [`super::acks`]: reordered, answered or dropped | `acks::tests`, `attacks::interleaved_qos1_and_qos2_…`, `attacks::a_repeated_qos2_publish_…` |
//! | a wake-up (`Event::Ready`) for a link the router already removed panics (`scheduler.reschedule`) | the router never removes a link on its own (the rows above), and a router id is opened only once every link under it is closed ([`super::sessions`]) | `fuzz::random_sequences_never_stop_the_router` (it also fails on any connection the router closes on its own), `sessions::tests::a_previous_connection_that_does_not_let_go_…` |
//! | persistent sessions are found by client id alone: another identity with that id inherits subscriptions and queue, with no ACL check | router ids qualified by identity ([`super::sessions`]) | `attacks::a_resident_cannot_take_over_…` |
//! | an entry per client id ever seen is kept forever (`graveyard`), and every filter ever subscribed keeps its log | router ids recycled; [`MAX_SUBSCRIPTIONS`] per connection and a budget of new filters ([`super::sessions`]) | `attacks::ten_thousand_fresh_client_ids_…`, `attacks::five_hundred_filters_…` |
//! | an UNSUBSCRIBE of a filter not subscribed gets no UNSUBACK; one of several gets one per filter | the session answers UNSUBSCRIBE itself | `attacks::unsubscribe_is_answered_once_…` |
//! | a QoS 2 PUBLISH never released stays recorded for the connection's life | at most [`MAX_AWAITING_RELEASE`] per connection | `acks::tests::too_many_unreleased_qos2_publishes_overflow` |
//!
//! QoS values are the codec's: rumqttd's decoder refuses QoS 3 and packet id 0, and the session
//! closes the connection on any packet it cannot decode.

use std::fmt;

/// Longest topic name or filter accepted, in bytes.
pub const MAX_TOPIC_BYTES: usize = 512;

/// Longest client id accepted, in bytes (SPEC §6: longer ones get CONNACK 2).
pub const MAX_CLIENT_ID_BYTES: usize = 128;

/// Most subscriptions one connection may hold; past it a SUBSCRIBE's new filters get 0x80.
pub const MAX_SUBSCRIPTIONS: usize = 100;

/// Most QoS 2 publishes a client may have awaiting its PUBREL; one more closes the connection.
pub const MAX_AWAITING_RELEASE: usize = 128;

/// Why a topic, filter or client id may not reach the router.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// Empty.
    Empty,
    /// Longer than its limit.
    TooLong(usize),
    /// Not UTF-8.
    NotUtf8,
    /// Starts with a character outside ASCII.
    NonAsciiStart,
    /// Holds U+0000, or a control character where one is not allowed.
    Control,
    /// A topic name with `+` or `#`.
    WildcardInTopic,
    /// A filter starting with `$` (reserved for the server; shared subscriptions are not offered).
    Reserved,
    /// `#` not alone and last, or `+` not alone in its level.
    BadWildcard,
    /// A client id holding `+ # / $`.
    ClientIdCharacter,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refused::Empty => f.write_str("empty"),
            Refused::TooLong(max) => write!(f, "longer than {max} bytes"),
            Refused::NotUtf8 => f.write_str("not UTF-8"),
            Refused::NonAsciiStart => f.write_str("its first character is not ASCII"),
            Refused::Control => f.write_str("holds a control character"),
            Refused::WildcardInTopic => f.write_str("a topic name may not hold + or #"),
            Refused::Reserved => f.write_str("starts with $ (reserved; shared subscriptions are not offered)"),
            Refused::BadWildcard => f.write_str("# must be alone and last, + alone in its level"),
            Refused::ClientIdCharacter => f.write_str("a client id may not hold + # / $"),
        }
    }
}

/// Checks a topic name (PUBLISH, will, retained message) and returns it as text. A `$` topic
/// passes: the router never delivers one (no filter may start with `$`), and the ACL refuses
/// them all as the server's own.
pub fn topic(bytes: &[u8]) -> Result<&str, Refused> {
    // Most topics are ASCII without a NUL or a wildcard: one pass over the bytes tells.
    let plain = |b: &u8| b.is_ascii() && !matches!(b, 0 | b'+' | b'#');
    if !bytes.is_empty() && bytes.len() <= MAX_TOPIC_BYTES && bytes.iter().all(plain) {
        // SAFETY: ASCII bytes are UTF-8.
        return Ok(unsafe { std::str::from_utf8_unchecked(bytes) });
    }
    topic_in_full(bytes)
}

/// [`topic`], each rule in turn: what a topic the quick pass does not clear gets.
fn topic_in_full(bytes: &[u8]) -> Result<&str, Refused> {
    let topic = std::str::from_utf8(bytes).map_err(|_| Refused::NotUtf8)?;
    common(topic)?;
    if bytes.iter().any(|&b| b == b'+' || b == b'#') {
        return Err(Refused::WildcardInTopic);
    }
    Ok(topic)
}

/// Checks a subscription filter (MQTT 3.1.1 §4.7 wildcards, and the router's limits).
pub fn filter(filter: &str) -> Result<(), Refused> {
    common(filter)?;
    if filter.starts_with('$') {
        return Err(Refused::Reserved);
    }
    let levels: Vec<&str> = filter.split('/').collect();
    let wildcards_ok = levels.iter().enumerate().all(|(i, level)| match *level {
        "#" => i == levels.len() - 1,
        "+" => true,
        l => !l.contains(['+', '#']),
    });
    if !wildcards_ok {
        return Err(Refused::BadWildcard);
    }
    Ok(())
}

/// What topics and filters share: not empty, bounded, no NUL, an ASCII start.
fn common(s: &str) -> Result<(), Refused> {
    let first = s.chars().next().ok_or(Refused::Empty)?;
    if s.len() > MAX_TOPIC_BYTES {
        return Err(Refused::TooLong(MAX_TOPIC_BYTES));
    }
    if !first.is_ascii() {
        return Err(Refused::NonAsciiStart);
    }
    if s.contains('\0') {
        return Err(Refused::Control);
    }
    Ok(())
}

/// Checks a client id asked for at CONNECT. It never reaches the router (which sees ids of the
/// hub's making), but it is logged and reported, so it is bounded and printable.
pub fn client_id(id: &str, clean_session: bool) -> Result<(), String> {
    if id.is_empty() && !clean_session {
        return Err("an empty client id needs clean session".into());
    }
    if id.len() > MAX_CLIENT_ID_BYTES {
        return Err(format!("client id longer than {MAX_CLIENT_ID_BYTES} bytes"));
    }
    if id.chars().any(char::is_control) {
        return Err(format!("client id {}", Refused::Control));
    }
    if id.contains(['+', '#', '/', '$']) {
        return Err(Refused::ClientIdCharacter.to_string());
    }
    Ok(())
}

/// A topic or filter shortened for a log line (at most 80 characters).
pub fn shown(s: &str) -> String {
    s.chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One line per case: input, expected verdict.
    macro_rules! cases {
        ($check:expr, $($name:ident: $input:expr => $want:expr;)*) => {$(
            #[test]
            fn $name() { assert_eq!($check($input), $want, "{:?}", $input); }
        )*};
    }

    fn t(s: &str) -> Result<(), Refused> {
        topic(s.as_bytes()).map(drop)
    }

    cases! { t,
        topic_plain: "dpi/door/state" => Ok(());
        topic_accent_later: "maison/éclairage" => Ok(());
        topic_accent_first: "éclairage/salon" => Err(Refused::NonAsciiStart);
        topic_emoji_first: "💡/on" => Err(Refused::NonAsciiStart);
        topic_empty: "" => Err(Refused::Empty);
        topic_empty_levels: "//a//" => Ok(());
        topic_dollar: "$SYS/x" => Ok(());
        topic_plus: "a/+/b" => Err(Refused::WildcardInTopic);
        topic_hash: "a/#" => Err(Refused::WildcardInTopic);
        topic_nul: "a\0b" => Err(Refused::Control);
    }

    cases! { filter,
        filter_all: "#" => Ok(());
        filter_plus: "+/+/state" => Ok(());
        filter_accent_first: "é/#" => Err(Refused::NonAsciiStart);
        filter_accent_later: "maison/é/#" => Ok(());
        filter_share: "$share/g/dpi/x/set" => Err(Refused::Reserved);
        filter_sys: "$SYS/#" => Err(Refused::Reserved);
        filter_hash_middle: "a/#/b" => Err(Refused::BadWildcard);
        filter_plus_in_level: "a/b+" => Err(Refused::BadWildcard);
        filter_empty: "" => Err(Refused::Empty);
        filter_empty_levels: "a//+/" => Ok(());
    }

    #[test]
    fn lengths_are_bounded() {
        assert_eq!(t(&"a".repeat(MAX_TOPIC_BYTES)), Ok(()));
        assert_eq!(t(&"a".repeat(MAX_TOPIC_BYTES + 1)), Err(Refused::TooLong(MAX_TOPIC_BYTES)));
        assert_eq!(topic(&[0xff, 0x00]), Err(Refused::NotUtf8));
        assert!(client_id(&"c".repeat(MAX_CLIENT_ID_BYTES), true).is_ok());
        assert!(client_id(&"c".repeat(MAX_CLIENT_ID_BYTES + 1), true).is_err());
        assert!(client_id("", false).is_err() && client_id("", true).is_ok());
        assert!(client_id("a\nb", true).is_err() && client_id("a/b", true).is_err());
        assert!(client_id("téléphone", true).is_ok());
    }

    /// Whatever the guard lets through, the router's matcher takes without panicking; the quick
    /// pass over a topic agrees with the rules in full.
    #[test]
    fn the_routers_matcher_takes_whatever_passes() {
        let mut seed = 0x1234_5678_9abc_def0_u64;
        let alphabet = ["a", "b", "/", "+", "#", "$", "é", "💡", "", "\0", "s"];
        for _ in 0..20_000 {
            let mut s = String::new();
            for _ in 0..(seed % 7) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                s.push_str(alphabet[(seed % alphabet.len() as u64) as usize]);
            }
            assert_eq!(topic(s.as_bytes()), topic_in_full(s.as_bytes()), "{s:?}");
            let as_topic = topic(s.as_bytes()).is_ok();
            let as_filter = filter(&s).is_ok();
            for other in ["#", "a/+", "é/x", "x/é", "+"] {
                if as_topic {
                    let _ = rumqttd::protocol::matches(&s, other);
                }
                if as_filter {
                    let _ = rumqttd::protocol::matches("a/b", &s);
                    let _ = rumqttd::protocol::matches(&s, &s);
                }
            }
        }
    }
}
