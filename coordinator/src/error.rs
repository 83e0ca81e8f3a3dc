//! The coordinator library's error type.

use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Db(#[from] common::db::DbError),
    #[error("cannot apply database migrations")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    #[error(transparent)]
    Nats(#[from] common::nats::NatsError),
    #[error("cannot listen on {addr}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to publish chunk {chunk_no} of job {job_id}")]
    Publish {
        job_id: Uuid,
        chunk_no: i32,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("no job {0}")]
    JobNotFound(Uuid),
    #[error("no token {0}")]
    TokenNotFound(Uuid),
    /// The token's role or project does not allow this.
    #[error("{0}")]
    Forbidden(String),
    /// A handler that needs the caller ran on a route the guard does not cover.
    #[error("this route is not behind the API's authentication")]
    Unguarded,
    #[error("job {job_id} is {state}, expected {expected}")]
    JobState { job_id: Uuid, state: String, expected: &'static str },
    #[error("invalid job kind")]
    Spec(#[from] common::spec::SpecError),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    TooLarge(String),
    /// A project has as many jobs uploading or running as it may.
    #[error("{0}")]
    TooManyJobs(String),
    /// A prune would remove jobs that are still needed.
    #[error("{}", crate::history::describe_needed(boundary, jobs))]
    StillNeeded { boundary: chrono::DateTime<chrono::Utc>, jobs: Vec<crate::model::NeededJob> },
    #[error("reading the uploaded input failed")]
    Upload(#[source] axum::Error),
}
