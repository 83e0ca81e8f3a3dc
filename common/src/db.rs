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
    /// A prepared statement went missing or appeared twice: a pooler in
    /// transaction mode hands each transaction another server connection and
    /// does not carry the statements sqlx prepares along.
    #[error(
        "database error while {doing}: a connection pooler in transaction mode lost a prepared statement. \
         Behind PgBouncer, use version 1.21 or later with max_prepared_statements set (200, say), or its session \
         mode (deploy/README.md, \"Postgres connections\")"
    )]
    Pooler {
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
    /// The error sqlx gave, whatever the variant.
    fn sqlx_error(&self) -> &sqlx::Error {
        let (DbError::Connect { source, .. } | DbError::Query { source, .. } | DbError::Pooler { source, .. }) = self;
        source
    }

    /// Whether Postgres could not be reached (down, restarting, network):
    /// worth waiting for, unlike an error in what was asked of it.
    pub fn is_unavailable(&self) -> bool {
        let source = self.sqlx_error();
        match source {
            sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::Tls(_) | sqlx::Error::Protocol(_) => true,
            // Class 08: connection exception; 57P01-57P03: shut down or starting.
            sqlx::Error::Database(d) => d.code().is_some_and(|c| c.starts_with("08") || c.starts_with("57P")),
            _ => false,
        }
    }

    /// The database's own error, if the statement reached it.
    pub fn database(&self) -> Option<&dyn sqlx::error::DatabaseError> {
        let source = self.sqlx_error();
        source.as_database_error()
    }
}

/// Says what was being done when a database call failed.
pub trait Doing<T> {
    fn doing(self, what: &'static str) -> Result<T, DbError>;
}

impl<T> Doing<T> for Result<T, sqlx::Error> {
    fn doing(self, what: &'static str) -> Result<T, DbError> {
        self.map_err(|source| {
            // 42P05: duplicate_prepared_statement; 26000: invalid_sql_statement_name.
            let code = source.as_database_error().and_then(|d| d.code().map(|c| c.into_owned()));
            match code.as_deref() {
                Some("42P05" | "26000") => DbError::Pooler { doing: what, source },
                _ => DbError::Query { doing: what, source },
            }
        })
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

/// Postgres's connection slots, as the server reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slots {
    /// `max_connections`.
    pub max: u32,
    /// Slots only superusers (and, from Postgres 16, `pg_use_reserved_connections`) may take.
    pub reserved: u32,
    /// Connections open now, in every database (this process's among them).
    pub open: u32,
    /// The port the server listens on; another than the URL's means a pooler
    /// or proxy is in between.
    pub server_port: Option<u16>,
}

/// Reads the server's connection slots.
pub async fn slots(pool: &PgPool) -> Result<Slots, DbError> {
    let row = sqlx::query!(
        r#"SELECT current_setting('max_connections')::int AS "max!",
                  current_setting('superuser_reserved_connections')::int
                    + coalesce(current_setting('reserved_connections', true)::int, 0) AS "reserved!",
                  (SELECT coalesce(sum(numbackends), 0) FROM pg_stat_database)::bigint AS "open!",
                  inet_server_port() AS port"#
    )
    .fetch_one(pool)
    .await
    .doing("reading Postgres's connection slots")?;
    let (max, reserved, open, port) = (row.max, row.reserved, row.open, row.port);
    Ok(Slots {
        max: max.max(0) as u32,
        reserved: reserved.max(0) as u32,
        open: open.max(0) as u32,
        server_port: port.and_then(|p| u16::try_from(p).ok()),
    })
}

/// What a process starting with a pool of `pool_size` connections, of which
/// `own_open` are open already, should be told of the server's slots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Room {
    /// Enough slots for this process at its busiest, and for `more` like it.
    Enough { free: u32, more: u32 },
    /// Fewer free slots than this process may still open.
    Short { free: u32, needs: u32 },
    /// A pooler or proxy in between: the server's slots bound its server
    /// connections, not this process's.
    Pooled { url_port: u16, server_port: u16 },
}

/// Decides [`Room`]: a pure function of the figures.
pub fn room(s: Slots, url_port: u16, pool_size: u32, own_open: u32) -> Room {
    if let Some(server_port) = s.server_port.filter(|p| *p != url_port) {
        return Room::Pooled { url_port, server_port };
    }
    let free = s.max.saturating_sub(s.reserved).saturating_sub(s.open);
    let needs = pool_size.saturating_sub(own_open);
    if free < needs {
        Room::Short { free, needs }
    } else {
        Room::Enough { free, more: (free - needs) / pool_size.max(1) }
    }
}

/// Says at start-up whether Postgres has connection slots for this process
/// (`what`: "worker" or "coordinator") at its busiest: a fleet that outgrows
/// `max_connections` fails with refused connections, and the sooner an
/// operator reads why, the better. A failure to ask is only logged.
pub async fn check_slots(pool: &PgPool, url: &str, pool_size: u32, what: &str) {
    let url_port = url.parse::<PgConnectOptions>().map(|o| o.get_port()).unwrap_or(5432);
    let s = match slots(pool).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %crate::error_chain(&e), "cannot read Postgres's connection slots; carrying on");
            return;
        }
    };
    let own_open = pool.size();
    match room(s, url_port, pool_size, own_open) {
        Room::Enough { free, more } => tracing::info!(
            max_connections = s.max, reserved = s.reserved, open = s.open, free, pool_size,
            "Postgres has connection slots for this {what} and about {more} more like it (deploy/README.md, \"Postgres connections\")"
        ),
        Room::Short { free, needs } => tracing::warn!(
            max_connections = s.max, reserved = s.reserved, open = s.open, free, pool_size,
            "Postgres has {free} free connection slots but this {what} may open {needs} more: its queries will be refused \
             when it is busy. Raise max_connections, lower SLUICE_DB_POOL_SIZE or put PgBouncer in front of Postgres \
             (deploy/README.md, \"Postgres connections\")"
        ),
        Room::Pooled { url_port, server_port } => tracing::info!(
            max_connections = s.max, open = s.open, pool_size,
            "Postgres listens on port {server_port}, not {url_port} as SLUICE_DATABASE_URL says: a pooler is in between \
             and bounds the server's connections (deploy/README.md, \"Postgres connections\")"
        ),
    }
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
    use super::{room, Room, Slots};

    #[test]
    fn room_for_a_process_is_what_the_server_has_left_after_its_pool() {
        let s = |max, reserved, open| Slots { max, reserved, open, server_port: Some(5432) };
        // (slots, pool size, own connections open) -> verdict
        let table = [
            // Postgres's defaults, 6 other connections and this worker's first: 90 free, room for 44 more.
            (s(100, 3, 7), 2, 1, Room::Enough { free: 90, more: 44 }),
            // Exactly enough for this one.
            (s(100, 3, 96), 2, 1, Room::Enough { free: 1, more: 0 }),
            // Full: the second connection will be refused.
            (s(100, 3, 97), 2, 1, Room::Short { free: 0, needs: 1 }),
            // A coordinator's pool of 8 with 4 slots left.
            (s(100, 3, 93), 8, 1, Room::Short { free: 4, needs: 7 }),
            // No connection of its own open yet.
            (s(20, 3, 0), 2, 0, Room::Enough { free: 17, more: 7 }),
        ];
        for (slots, pool, own, want) in table {
            assert_eq!(room(slots, 5432, pool, own), want, "{slots:?} pool {pool} own {own}");
        }
        // Through a pooler on 6432: the server's figures say nothing of this process.
        assert_eq!(room(s(100, 3, 97), 6432, 2, 1), Room::Pooled { url_port: 6432, server_port: 5432 });
        // A server that does not say its port (a Unix socket) is taken as reached directly.
        let unix = Slots { server_port: None, ..s(100, 3, 7) };
        assert_eq!(room(unix, 6432, 2, 1), Room::Enough { free: 90, more: 44 });
    }

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
