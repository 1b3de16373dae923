//! A device's credentials as firmware wants them (SPEC §11, `device creds --format`): an ESPHome
//! `mqtt:` block, or an Arduino header for PubSubClient (ESP8266 with the server certificate's
//! SHA-1 fingerprint, ESP32 with the hub's CA). Pure text: the CLI gathers the values.

use crate::topics::{self, Leaf};

/// What goes into a snippet.
#[derive(Debug, Clone)]
pub struct Creds<'a> {
    /// The device id: client id, username and topic level.
    pub id: &'a str,
    /// The address devices reach the hub at.
    pub host: &'a str,
    /// The TLS port.
    pub port: u16,
    /// The password, shown once.
    pub password: &'a str,
    /// The hub CA, PEM.
    pub ca_pem: &'a str,
    /// SHA-1 of the server certificate, colon-separated hex.
    pub server_sha1: &'a str,
    /// The device is an ESPHome node (a `bridge`) whose components speak their own topics under
    /// `ID/…` (SPEC §11), rather than firmware written for `dpi/ID/…`.
    pub node: bool,
}

/// The ESPHome `mqtt:` block: the hub's broker over TLS, the device's own topics, `online` as
/// the birth message and `offline` as the will on its availability topic. A node whose components
/// keep ESPHome's own topics ([`Creds::node`]) gets its id as prefix, ESPHome's own `ID/status`
/// birth and will, and no discovery (the hub announces to Home Assistant).
pub fn esphome(c: &Creds<'_>) -> String {
    let id = c.id;
    let (comment, topics) = if c.node {
        (
            format!(
                "# DomoticPi credentials for ESPHome node {id}: add to the node's YAML. Its components keep their\n\
                 # own topics ({id}/COMPONENT/OBJECT_ID/state and /command); declare each one in the hub's config\n\
                 # with source = {{ esphome = \"{id}/COMPONENT/OBJECT_ID\" }}.\n"
            ),
            format!("  discover_ip: false\n  topic_prefix: {id}\n  log_topic: null\n"),
        )
    } else {
        let availability = topics::device(id, Leaf::Availability);
        let message = |name: &str, payload: &str| {
            format!("  {name}:\n    topic: {availability}\n    payload: {payload}\n    retain: true\n")
        };
        (
            format!(
                "# DomoticPi credentials for device {id}: add to the node's YAML. Publish the device's state on\n\
                 # {} (state_topic on its component); its commands arrive on {}.\n",
                topics::device(id, Leaf::State),
                topics::device(id, Leaf::Set)
            ),
            format!(
                "  topic_prefix: dpi/{id}\n  log_topic: null\n{}{}{}",
                message("birth_message", "online"),
                message("will_message", "offline"),
                message("shutdown_message", "offline")
            ),
        )
    };
    let ca: String = c.ca_pem.trim_end().lines().map(|l| format!("    {l}\n")).collect();
    format!(
        "{comment}mqtt:\n  \
         broker: {host}\n  \
         port: {port}\n  \
         client_id: {id}\n  \
         username: {id}\n  \
         password: \"{password}\"\n  \
         discovery: false\n\
         {topics}  \
         certificate_authority: |\n{ca}",
        host = c.host,
        port = c.port,
        password = c.password.replace('\\', "\\\\").replace('"', "\\\""),
    )
}

/// An Arduino header for PubSubClient: the connection, the topics, the ESP8266 fingerprint and the
/// ESP32 CA certificate.
pub fn arduino(c: &Creds<'_>) -> String {
    let quoted = |s: &str| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""));
    let fingerprint = c.server_sha1.replace(':', " ");
    format!(
        "// DomoticPi credentials for device {id}, from `domoticpi device creds {id} --format arduino`.\n\
         // Keep this file out of version control: it holds the device's password.\n\
         #pragma once\n\n\
         #define DPI_HOST {host}\n\
         #define DPI_PORT {port}\n\
         #define DPI_CLIENT_ID {qid}\n\
         #define DPI_USERNAME {qid}\n\
         #define DPI_PASSWORD {password}\n\
         #define DPI_TOPIC_STATE {state}\n\
         #define DPI_TOPIC_AVAILABILITY {availability}\n\
         #define DPI_TOPIC_SET {set}\n\n\
         // ESP8266 (BearSSL::WiFiClientSecure::setFingerprint): the hub's server certificate, SHA-1.\n\
         #define DPI_FINGERPRINT {fingerprint}\n\n\
         // ESP32 (WiFiClientSecure::setCACert): the hub's CA.\n\
         static const char DPI_CA_CERT[] PROGMEM = R\"PEM(\n{ca})PEM\";\n",
        id = c.id,
        qid = quoted(c.id),
        host = quoted(c.host),
        port = c.port,
        password = quoted(c.password),
        state = quoted(&topics::device(c.id, Leaf::State)),
        availability = quoted(&topics::device(c.id, Leaf::Availability)),
        set = quoted(&topics::device(c.id, Leaf::Set)),
        fingerprint = quoted(&fingerprint),
        ca = c.ca_pem.trim_end().to_owned() + "\n",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds() -> Creds<'static> {
        Creds {
            id: "hall-motion",
            host: "192.168.1.10",
            port: 8883,
            password: "s3cr\"et",
            ca_pem: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
            server_sha1: "AB:CD:EF",
            node: false,
        }
    }

    #[test]
    fn a_nodes_block_keeps_esphomes_own_topics_under_its_id() {
        let block = esphome(&Creds { id: "desk", node: true, ..creds() });
        for line in ["  topic_prefix: desk", "  discovery: false", "  username: desk", "  password: \"s3cr\\\"et\""] {
            assert!(block.lines().any(|l| l == line), "no {line:?} in:\n{block}");
        }
        assert!(!block.contains("dpi/"), "{block}");
    }

    #[test]
    fn the_esphome_block_names_the_broker_the_topics_and_the_ca() {
        let block = esphome(&creds());
        for line in [
            "mqtt:",
            "  broker: 192.168.1.10",
            "  port: 8883",
            "  username: hall-motion",
            "  password: \"s3cr\\\"et\"",
            "    topic: dpi/hall-motion/availability",
            "  certificate_authority: |",
            "    -----BEGIN CERTIFICATE-----",
        ] {
            assert!(block.lines().any(|l| l == line), "no {line:?} in:\n{block}");
        }
    }

    #[test]
    fn the_arduino_header_quotes_every_string_and_keeps_the_ca_raw() {
        let header = arduino(&creds());
        assert!(header.contains("#define DPI_PASSWORD \"s3cr\\\"et\""), "{header}");
        assert!(header.contains("#define DPI_FINGERPRINT \"AB CD EF\""), "{header}");
        assert!(
            header.contains("R\"PEM(\n-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n)PEM\";"),
            "{header}"
        );
    }
}
