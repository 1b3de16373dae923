//! The hub's rules — the alarm and the lights — as sans-I/O state machines.
//!
//! Nothing here reads a clock, touches the disk or the network. Input goes in through
//! `handle_event(event, now)` and `handle_timeout(now)`; output comes out through `poll_action()`
//! and `poll_timeout()`. One task in the hub drives every machine and carries out the actions.
//! Tests drive the same machines with a fake clock that jumps straight to the next deadline.

pub mod alarm;
pub mod clock;
pub mod lights;
pub mod sun;

pub use clock::Instant;
