//! The worker library's error type.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("cannot connect to Postgres at {url}: is it running and migrated? (`sluice serve` applies migrations)")]
    DbConnect {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("database error")]
    Db(#[from] sqlx::Error),
    #[error(transparent)]
    Nats(#[from] common::nats::NatsError),
    #[error("cannot build the HTTP client for the model provider")]
    Http(#[source] reqwest::Error),
    #[error("shared state in NATS KV is unavailable")]
    Kv(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("pulling chunks from JetStream failed")]
    Pull(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("job {job_id} has an invalid stored kind")]
    Spec {
        job_id: uuid::Uuid,
        #[source]
        source: Box<common::spec::SpecError>,
    },
}
