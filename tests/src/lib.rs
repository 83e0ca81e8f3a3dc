//! Test support for Sluice: the model simulator and fixtures that start real NATS, Postgres and Sluice services.

pub mod fixtures;
pub mod sim;
pub mod tools;
