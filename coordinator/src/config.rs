//! Configuration of `sluice serve`, from flags or `SLUICE_*` environment variables.

use crate::Error;

/// Settings of the coordinator service.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeConfig {
    /// Postgres connection URL, as a role that owns nothing (see deploy/roles.sql):
    /// it can append to the audit trail but never rewrite it.
    #[arg(
        long,
        env = "SLUICE_DATABASE_URL",
        default_value = "postgres://sluice_coordinator:sluice@127.0.0.1:5432/sluice"
    )]
    pub database_url: String,
    /// Postgres URL of the role that owns the tables, used only to apply
    /// migrations at start-up. Without it the schema must be up to date
    /// already (`sluice migrate`), unless SLUICE_DATABASE_URL may apply them.
    #[arg(long, env = "SLUICE_MIGRATE_DATABASE_URL")]
    pub migrate_database_url: Option<String>,
    /// Most connections the coordinator keeps open to Postgres.
    #[arg(long, env = "SLUICE_DB_POOL_SIZE", default_value_t = 8)]
    pub db_pool_size: u32,
    /// NATS server URL (JetStream must be enabled).
    #[arg(long, env = "SLUICE_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    #[command(flatten)]
    pub nats_auth: common::nats::NatsAuth,
    /// Address the control API listens on.
    #[arg(long, env = "SLUICE_LISTEN", default_value = "127.0.0.1:7700")]
    pub listen: String,
    /// Certificate chain (PEM) to serve the API over HTTPS with; needs
    /// --tls-key-file. Without both, the API is plain HTTP: keep it on
    /// loopback, or behind a proxy that terminates TLS.
    #[arg(long, env = "SLUICE_TLS_CERT_FILE", requires = "tls_key_file")]
    pub tls_cert_file: Option<std::path::PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, env = "SLUICE_TLS_KEY_FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<std::path::PathBuf>,
    /// How much work may wait in the queue, in milliseconds at the pace
    /// workers take chunks (beyond one chunk per worker asking for one). A
    /// newly submitted job waits behind no more than this, plus what the
    /// workers hold, and then shares the workers and the rate limit equally.
    #[arg(long, env = "SLUICE_QUEUE_AHEAD_MS", default_value_t = 1_000)]
    pub queue_ahead_ms: u64,
    /// How often the publisher tops jobs up, in milliseconds.
    #[arg(long, env = "SLUICE_PUBLISH_INTERVAL_MS", default_value_t = 100)]
    pub publish_interval_ms: u64,
    /// How often the reconciler looks for lost chunks and finished jobs, in milliseconds (0 disables it).
    #[arg(long, env = "SLUICE_RECONCILE_INTERVAL_MS", default_value_t = 10_000)]
    pub reconcile_interval_ms: u64,
    /// How long a pending chunk must have been published before the reconciler
    /// may republish it when its job has no message left in the stream, in milliseconds.
    #[arg(long, env = "SLUICE_REPUBLISH_AFTER_MS", default_value_t = 30_000)]
    pub republish_after_ms: u64,
    /// Calls one worker keeps in flight (the workers' SLUICE_CONCURRENCY), for
    /// the autoscaling figure `sluice_autoscale_workers_wanted`.
    #[arg(long, env = "SLUICE_AUTOSCALE_WORKER_CONCURRENCY", default_value_t = 64)]
    pub autoscale_worker_concurrency: u32,
    /// Calls per second one worker manages at most whatever the latency (its
    /// CPU), for the autoscaling figure.
    #[arg(long, env = "SLUICE_AUTOSCALE_WORKER_CALLS_PER_S", default_value_t = 1_000)]
    pub autoscale_worker_calls_per_s: u32,
    /// Seconds within which the backlog should be done, for the autoscaling figure.
    #[arg(long, env = "SLUICE_AUTOSCALE_DRAIN_S", default_value_t = 300)]
    pub autoscale_drain_s: u32,
    /// Postgres connections one worker holds at most (the workers'
    /// SLUICE_DB_POOL_SIZE): the autoscaling figure keeps the fleet within
    /// Postgres's max_connections. 0: the workers reach Postgres through a
    /// pooler such as PgBouncer, which bounds the server's connections itself.
    #[arg(long, env = "SLUICE_AUTOSCALE_WORKER_DB_CONNECTIONS", default_value_t = 2)]
    pub autoscale_worker_db_connections: u32,
    /// Postgres connection slots the autoscaling figure leaves to everything
    /// but the workers: coordinators (SLUICE_DB_POOL_SIZE each), migrations, operators.
    #[arg(long, env = "SLUICE_AUTOSCALE_DB_RESERVE", default_value_t = 20)]
    pub autoscale_db_reserve: u32,
    /// The providers file the workers use (see deploy/providers.example.toml):
    /// a job naming a provider or model it does not list is refused at submit.
    /// Without it, any model is taken (the workers' one-provider shorthand).
    #[arg(long, env = "SLUICE_PROVIDERS_FILE")]
    pub providers_file: Option<std::path::PathBuf>,
    /// Price table (TOML, dollars per million tokens by model): a job whose
    /// model has no price is refused unless submitted with --allow-unpriced.
    #[arg(long, env = "SLUICE_PRICES_FILE", default_value = "deploy/prices.toml")]
    pub prices_file: std::path::PathBuf,
    /// Largest accepted input file, in bytes; a larger upload is refused and nothing is ingested.
    #[arg(long, env = "SLUICE_MAX_UPLOAD_BYTES", default_value_t = 8 << 30)]
    pub max_upload_bytes: u64,
    /// Most lines of one job's input; a longer file is refused and nothing is ingested.
    #[arg(long, env = "SLUICE_MAX_JOB_LINES", default_value_t = 20_000_000)]
    pub max_job_lines: u64,
    /// File holding the secret that API tokens are hashed with (HMAC-SHA256):
    /// at least 32 characters, readable only by its owner. Make one with
    /// `sluice admin secret --out FILE`. Every coordinator of an installation
    /// needs the same secret; a new one invalidates every token.
    #[arg(long, env = "SLUICE_TOKEN_SECRET_FILE")]
    pub token_secret_file: Option<std::path::PathBuf>,
    /// Most jobs of one project uploading or running at once; a submit or
    /// resume beyond it is refused until one finishes or is cancelled.
    #[arg(long, env = "SLUICE_MAX_ACTIVE_JOBS_PER_PROJECT", default_value_t = 50)]
    pub max_active_jobs_per_project: u32,
    /// Spending caps for jobs submitted without `--max-cost`, as
    /// PROJECT=DOLLARS (repeat the flag, or separate entries with commas);
    /// `*=DOLLARS` covers every project without an entry of its own. A
    /// submit's own `--max-cost`, higher or lower, takes its place.
    #[arg(long = "project-max-cost", env = "SLUICE_PROJECT_MAX_COST", value_name = "PROJECT=DOLLARS",
          value_delimiter = ',', value_parser = parse_project_cap)]
    pub project_max_cost: Vec<(String, f64)>,
    /// A job whose input has not finished uploading this many seconds after it
    /// was created (the client died, the upload was cut off) is marked `abandoned`.
    #[arg(long, env = "SLUICE_UPLOAD_TIMEOUT_S", default_value_t = 3_600)]
    pub upload_timeout_s: u64,
    /// How long a webhook receiver has to answer, in milliseconds.
    #[arg(long, env = "SLUICE_WEBHOOK_TIMEOUT_MS", default_value_t = 10_000)]
    pub webhook_timeout_ms: u64,
    /// Attempts at a notification before it is recorded as failed; the
    /// waits between them double from --webhook-retry-min-ms up to 10
    /// minutes (10 attempts span about 17 minutes).
    #[arg(long, env = "SLUICE_WEBHOOK_MAX_ATTEMPTS", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub webhook_max_attempts: u32,
    /// The first wait before a notification is sent again, in milliseconds.
    #[arg(long, env = "SLUICE_WEBHOOK_RETRY_MIN_MS", default_value_t = 1_000)]
    pub webhook_retry_min_ms: u64,
    /// A model's circuit breaker open this many seconds is told to the
    /// webhooks of the running jobs that use it (`breaker.open`).
    #[arg(long, env = "SLUICE_NOTIFY_BREAKER_AFTER_S", default_value_t = 300)]
    pub notify_breaker_after_s: u64,
}

/// One `PROJECT=DOLLARS` entry of `--project-max-cost`.
fn parse_project_cap(text: &str) -> Result<(String, f64), String> {
    let (project, dollars) =
        text.split_once('=').ok_or_else(|| format!("{text:?} is not PROJECT=DOLLARS, like team-a=25.00 or *=100"))?;
    let project = project.trim();
    if project != "*" {
        crate::auth::check_project(project).map_err(|e| e.to_string())?;
    }
    Ok((project.to_string(), crate::model::parse_dollars(dollars)?))
}

/// The spending cap a job gets when it is submitted without one.
#[derive(Debug, Clone, Default)]
pub struct DefaultCaps(Vec<(String, f64)>);

impl DefaultCaps {
    /// The cap of `project`: its own entry, else the `*` entry, else none.
    pub fn of(&self, project: &str) -> Option<f64> {
        let find = |p: &str| self.0.iter().rev().find(|(q, _)| q == p).map(|(_, c)| *c);
        find(project).or_else(|| find("*"))
    }
}

impl ServeConfig {
    /// The default spending caps (`--project-max-cost`).
    pub fn default_caps(&self) -> DefaultCaps {
        DefaultCaps(self.project_max_cost.clone())
    }

    /// The providers the workers serve, read once at start-up.
    pub fn catalog(&self) -> Result<common::providers::Catalog, Error> {
        match &self.providers_file {
            Some(path) => common::providers::Catalog::load(path).map_err(|e| Error::Config(common::error_chain(&e))),
            // The workers' one-provider shorthand: any model, at a URL only they know.
            None => Ok(common::providers::Catalog::shorthand("http://127.0.0.1/v1", Default::default())),
        }
    }

    /// The price table, read once at start-up. A missing default file is an
    /// empty table: every model is then unpriced.
    pub fn prices(&self) -> Result<common::prices::PriceTable, Error> {
        common::prices::PriceTable::load_or_empty(&self.prices_file).map_err(|e| Error::Config(common::error_chain(&e)))
    }

    /// The key of the API tokens' HMACs, read once at start-up.
    pub fn token_secret(&self) -> Result<crate::auth::TokenSecret, Error> {
        let path = self.token_secret_file.as_deref().ok_or_else(|| {
            Error::Config(
                "SLUICE_TOKEN_SECRET_FILE is not set: the API checks tokens against HMACs keyed by that secret; make one with `sluice admin secret --out FILE`".into(),
            )
        })?;
        crate::auth::TokenSecret::load(path)
    }

    /// The API's TLS settings, if it serves HTTPS; read once at start-up.
    pub fn tls(&self) -> Result<Option<std::sync::Arc<tokio_rustls::rustls::ServerConfig>>, Error> {
        match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(cert), Some(key)) => crate::tls::server_config(cert, key).map(Some),
            (None, None) => Ok(None),
            _ => Err(Error::Config(
                "SLUICE_TLS_CERT_FILE and SLUICE_TLS_KEY_FILE go together: set both or neither".into(),
            )),
        }
    }

    /// The limits on what a client can make the coordinator take on.
    pub fn limits(&self) -> crate::ingest::Limits {
        crate::ingest::Limits {
            max_bytes: self.max_upload_bytes,
            max_lines: self.max_job_lines,
            max_active_jobs: self.max_active_jobs_per_project,
        }
    }

    /// Checks the settings once, at start-up.
    pub fn validate(&self) -> Result<(), Error> {
        if !self.database_url.starts_with("postgres://") && !self.database_url.starts_with("postgresql://") {
            return Err(Error::Config(format!(
                "SLUICE_DATABASE_URL must start with postgres://, got {:?}",
                self.database_url
            )));
        }
        if !self.nats_url.contains("://") && !self.nats_url.contains(':') {
            return Err(Error::Config(format!("SLUICE_NATS_URL is not a URL: {:?}", self.nats_url)));
        }
        if self.max_active_jobs_per_project == 0 {
            return Err(Error::Config("SLUICE_MAX_ACTIVE_JOBS_PER_PROJECT must be at least 1".into()));
        }
        if self.db_pool_size == 0 {
            return Err(Error::Config("SLUICE_DB_POOL_SIZE must be at least 1".into()));
        }
        for (name, v) in [
            ("SLUICE_AUTOSCALE_WORKER_CONCURRENCY", self.autoscale_worker_concurrency),
            ("SLUICE_AUTOSCALE_WORKER_CALLS_PER_S", self.autoscale_worker_calls_per_s),
            ("SLUICE_AUTOSCALE_DRAIN_S", self.autoscale_drain_s),
        ] {
            if v == 0 {
                return Err(Error::Config(format!("{name} must be at least 1")));
            }
        }
        Ok(())
    }

    /// What the autoscaling figure assumes of the workers.
    pub fn autoscale(&self) -> crate::autoscale::Assumptions {
        crate::autoscale::Assumptions {
            worker_concurrency: self.autoscale_worker_concurrency as f64,
            worker_calls_per_s: self.autoscale_worker_calls_per_s as f64,
            drain_s: self.autoscale_drain_s as f64,
            worker_db_connections: self.autoscale_worker_db_connections as f64,
            db_reserve: self.autoscale_db_reserve as f64,
            ..Default::default()
        }
    }

    /// The configuration a user gets with no flag and no environment
    /// variable, connected to the given services and listening on a port the
    /// OS picks: what tests and embedders start from. Prices come from the
    /// repository's `deploy/prices.toml`.
    pub fn for_urls(database_url: &str, nats_url: &str) -> Self {
        let mut config: Self = common::declared_defaults();
        config.database_url = database_url.into();
        config.nats_url = nats_url.into();
        config.listen = "127.0.0.1:0".into();
        config.prices_file = std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/prices.toml"));
        config
    }
}

#[cfg(test)]
mod default_cap_tests {
    use super::*;

    #[test]
    fn a_project_gets_its_own_cap_else_the_catch_all() {
        let caps =
            DefaultCaps(["team-a=25", "*=$100", "team-b=0.5"].iter().map(|t| parse_project_cap(t).unwrap()).collect());
        assert_eq!(caps.of("team-a"), Some(25.0));
        assert_eq!(caps.of("team-b"), Some(0.5));
        assert_eq!(caps.of("other"), Some(100.0));
        assert_eq!(DefaultCaps::default().of("team-a"), None);
    }

    #[test]
    fn a_bad_entry_says_what_is_wrong() {
        for (text, says) in [
            ("team-a", "is not PROJECT=DOLLARS"),
            ("team-a=lots", "is not an amount of dollars"),
            ("team-a=-5", "more than 0 dollars"),
            ("Team A=5", "is not a valid name"),
        ] {
            let e = parse_project_cap(text).unwrap_err();
            assert!(e.contains(says), "{text}: {e}");
        }
    }
}
