//! Integration tests: real hubs on loopback ephemeral ports with temporary data dirs, real TLS,
//! real MQTT clients (rumqttc, and mosquitto's tools where installed), the real SQLite file.

mod util;

mod alarm;
mod attacks;
mod backup;
mod bridge;
mod browser;
mod cli;
mod clock;
mod foundation;
mod fuzz;
mod hass;
mod house;
mod lights;
mod pipeline;
mod powercut;
mod reload;
mod security;
mod sources;
mod watchdog;
mod web;
