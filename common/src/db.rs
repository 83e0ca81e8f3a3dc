//! Postgres pieces both sides share: opening a pool, the database error that says what was being done, and job completion.

use std::time::Duration;

use sqlx::postgres::{PgPool, PgPoolOptions};
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error(
        "cannot connect to Postgres at {url}: is it running, does the database exist and is it migrated? (`scripts/demo` starts it, `sluice migrate` migrates it)"
    )]
    Connect {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("database error while {doing}")]
    Query {
        doing: &'static str,
        #[source]
        source: sqlx::Error,
    },
}

impl DbError {
    /// Whether Postgres could not be reached (down, restarting, network):
    /// worth waiting for, unlike an error in what was asked of it.
    pub fn is_unavailable(&self) -> bool {
        let (DbError::Connect { source, .. } | DbError::Query { source, .. }) = self;
        match source {
            sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::Tls(_) | sqlx::Error::Protocol(_) => true,
            // Class 08: connection exception; 57P01-57P03: shut down or starting.
            sqlx::Error::Database(d) => d.code().is_some_and(|c| c.starts_with("08") || c.starts_with("57P")),
            _ => false,
        }
    }

    /// The database's own error, if the statement reached it.
    pub fn database(&self) -> Option<&dyn sqlx::error::DatabaseError> {
        let (DbError::Connect { source, .. } | DbError::Query { source, .. }) = self;
        source.as_database_error()
    }
}

/// Says what was being done when a database call failed.
pub trait Doing<T> {
    fn doing(self, what: &'static str) -> Result<T, DbError>;
}

impl<T> Doing<T> for Result<T, sqlx::Error> {
    fn doing(self, what: &'static str) -> Result<T, DbError> {
        self.map_err(|source| DbError::Query { doing: what, source })
    }
}

/// Opens a pool of at most `max` connections, naming the address (without
/// its password) when it cannot.
pub async fn connect(url: &str, max: u32) -> Result<PgPool, DbError> {
    PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(10))
        .connect(url)
        .await
        .map_err(|source| DbError::Connect { url: crate::redact::url_password(url), source })
}

/// Marks a running job completed if none of its chunks is pending; true if
/// it did. The rule lives in the database (migration 0003): workers run it
/// after each chunk's commit, the coordinator's reconciler repeats it.
pub async fn complete_if_done(pool: &PgPool, job_id: Uuid) -> Result<bool, DbError> {
    sqlx::query_scalar("SELECT complete_job_if_done($1)")
        .bind(job_id)
        .fetch_one(pool)
        .await
        .doing("checking whether the job is complete")
}
