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
    #[error("the audit writer stopped")]
    AuditStopped,
    #[error("job {job_id} has an invalid stored kind")]
    Spec {
        job_id: uuid::Uuid,
        #[source]
        source: Box<common::spec::SpecError>,
    },
}

impl Error {
    /// Whether Postgres could not be reached (down, restarting, network):
    /// worth waiting for, unlike an error in what was asked of it.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Error::Db(e) => match e {
                sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::Tls(_) | sqlx::Error::Protocol(_) => true,
                // Class 08: connection exception; 57P01-57P03: shut down or starting.
                sqlx::Error::Database(d) => d.code().is_some_and(|c| c.starts_with("08") || c.starts_with("57P")),
                _ => false,
            },
            _ => false,
        }
    }
}
