//! The Sluice worker: pulls chunks from JetStream, calls the model for each item, writes results to Postgres, then acks.

pub mod audit;
pub mod breaker;
pub mod cap;
pub mod confidence;
pub mod config;
pub mod delivery;
pub mod endpoints;
pub mod error;
pub mod fair;
pub mod guard;
pub mod jobs;
pub mod keys;
pub mod kvstate;
pub mod learned;
pub mod limit;
pub mod metrics;
pub mod passthrough;
pub mod process;
pub mod pull;
pub mod store;
pub mod watchdog;

pub use config::WorkerConfig;
pub use error::Error;
pub use pull::Worker;

/// Runs a worker with `config` until `shutdown` is cancelled.
pub async fn run(config: WorkerConfig, shutdown: tokio_util::sync::CancellationToken) -> Result<(), Error> {
    Worker::connect(config).await?.run(shutdown).await
}
