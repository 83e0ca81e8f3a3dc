//! Types and helpers shared by the Sluice coordinator, workers and tests: wire messages, job kinds, the model client, telemetry and shutdown.

pub mod db;
pub mod nats;
pub mod prices;
pub mod provider;
pub mod providers;
pub mod redact;
pub mod sample;
pub mod shutdown;
pub mod spec;
pub mod state;
pub mod telemetry;
pub mod wire;

/// An error and its sources on one line (`a: b: c`), for messages that
/// cross a process boundary.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
