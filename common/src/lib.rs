//! Types and helpers shared by the Sluice coordinator, workers and tests: wire messages, job kinds, the model client, telemetry and shutdown.

pub mod nats;
pub mod prices;
pub mod provider;
pub mod redact;
pub mod sample;
pub mod shutdown;
pub mod spec;
pub mod telemetry;
pub mod wire;
