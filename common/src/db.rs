//! Postgres pieces both sides share: opening a pool, the database error that says what was being done, and job completion.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgSslMode};
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

/// Whether Postgres answers, within `timeout`: `Ok(())` or why not, for readiness checks.
pub async fn ping(pool: &PgPool, timeout: Duration) -> Result<(), String> {
    use sqlx::Connection;
    let answer = async {
        let mut conn = pool.acquire().await?;
        conn.ping().await
    };
    match tokio::time::timeout(timeout, answer).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(crate::error_chain(&e)),
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
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
///
/// TLS is used when the URL asks for it (`sslmode=require`, `verify-ca`,
/// `verify-full`, or `PGSSLMODE`); a URL that says nothing gets none, rather
/// than libpq's `prefer`, which encrypts without checking the server and so
/// protects against no one in the middle. It also costs: sqlx 0.9.0 leaves
/// Nagle's algorithm on (transact-rs/sqlx#4335), and over TLS each query then
/// waits on delayed ACKs: `scripts/bench` ran at 1,592 items/s against 5,848
/// without TLS on the same machine (docs/benchmarks.md).
///
/// Statements are prepared once per connection and run on Postgres's plan
/// cache. One whose best plan changes as a job fills the tables (the copy
/// of shared answers) is sent unprepared instead (`.persistent(false)`), so
/// it is planned for its parameters and the tables' sizes at each run: a
/// generic plan made while the tables were empty kept scanning every copy of
/// the job (107 ms a batch, seen with `auto_explain` during `scripts/bench
/// cost`). Asking for that on every statement (`plan_cache_mode =
/// force_custom_plan`) cost 2.4 s of Postgres's CPU in `scripts/bench e2e`,
/// more than the response cache itself.
pub async fn connect(url: &str, max: u32) -> Result<PgPool, DbError> {
    let err = |source| DbError::Connect { url: crate::redact::url_password(url), source };
    let mut options: PgConnectOptions = url.parse::<PgConnectOptions>().map_err(err)?;
    if !asks_for_ssl_mode(url) {
        options = options.ssl_mode(PgSslMode::Disable);
    }
    PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
        .map_err(err)
}

/// Whether the URL or the environment chooses an `sslmode`.
fn asks_for_ssl_mode(url: &str) -> bool {
    let in_url = url.split_once('?').is_some_and(|(_, query)| {
        query.split('&').any(|p| p.split_once('=').map_or(p, |(k, _)| k).eq_ignore_ascii_case("sslmode"))
    });
    in_url || std::env::var_os("PGSSLMODE").is_some()
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

#[cfg(test)]
mod tests {
    #[test]
    fn only_a_url_that_names_an_sslmode_chooses_one() {
        assert!(super::asks_for_ssl_mode("postgres://u@h/db?sslmode=verify-full&sslrootcert=/ca.pem"));
        assert!(super::asks_for_ssl_mode("postgres://u@h/db?application_name=x&SSLMODE=require"));
        if std::env::var_os("PGSSLMODE").is_none() {
            assert!(!super::asks_for_ssl_mode("postgres://u@h/db"));
            assert!(!super::asks_for_ssl_mode("postgres://u@h/db?application_name=sslmode"));
        }
    }
}
