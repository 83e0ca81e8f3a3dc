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
    #[error("{}", describe_needed(boundary, jobs))]
    StillNeeded { boundary: chrono::DateTime<chrono::Utc>, jobs: Vec<crate::model::NeededJob> },
    #[error("reading the uploaded input failed")]
    Upload(#[source] axum::Error),
}

/// The message of a refused prune: the jobs, why, and what to do.
fn describe_needed(boundary: &chrono::DateTime<chrono::Utc>, jobs: &[crate::model::NeededJob]) -> String {
    let mut msg = format!(
        "nothing pruned: {}{} job(s) created before {} are still needed:",
        if jobs.len() >= 20 { "at least " } else { "" },
        jobs.len(),
        boundary.format("%Y-%m-%d")
    );
    for j in jobs {
        let why = match (j.state.as_str(), j.waiting_review) {
            ("uploading" | "running" | "paused", 0) => format!("is {}", j.state),
            ("uploading" | "running" | "paused", n) => {
                format!("is {} and has {n} answer(s) waiting for review", j.state)
            }
            (_, n) => format!("has {n} answer(s) waiting for review"),
        };
        msg.push_str(&format!("\n  {} {why}", j.job));
    }
    msg.push_str(
        "\nfinish or cancel them (`sluice cancel JOB`), finish their review (`sluice review export` / `import`), or prune an earlier month",
    );
    msg
}
