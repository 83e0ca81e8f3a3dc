//! The worker library's error type.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Db(#[from] common::db::DbError),
    #[error(transparent)]
    Nats(#[from] common::nats::NatsError),
    #[error("cannot build the HTTP client for the model provider")]
    Http(#[source] reqwest::Error),
    #[error("shared state in NATS KV is unavailable")]
    Kv(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("the audit writer stopped")]
    AuditStopped,
    /// A task of the worker's own (a write, a query run apart from the item
    /// that needs it) ended without an answer: it panicked or was aborted.
    #[error("the task {doing} ended without an answer")]
    Task {
        doing: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
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
        matches!(self, Error::Db(e) if e.is_unavailable())
    }
}
