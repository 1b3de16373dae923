//! The DomoticPi hub: a TLS MQTT broker, a SQLite state store and the house's rules, in one process.
//!
//! `main` parses the command line and calls into [`cli`] or [`hub::run`]; everything else is here so
//! that integration tests can start a whole hub in-process. See `ARCHITECTURE.md` for the event flow.

pub mod alarm;
pub mod auth;
pub mod backup;
pub mod bridge;
pub mod broker;
pub mod certs;
pub mod cli;
pub mod config;
pub mod control;
pub mod decode;
pub mod devices;
pub mod dispatcher;
pub mod hass;
pub mod health;
pub mod hub;
pub mod lights;
pub mod logging;
pub mod reload;
pub mod secret;
pub mod snippets;
pub mod sources;
pub mod store;
pub mod topics;
pub mod wall;
pub mod wear;
pub mod web;
