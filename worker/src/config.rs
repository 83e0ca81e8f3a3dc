//! Configuration of `sluice-worker`, from flags or `SLUICE_*` environment variables.

use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;

use crate::Error;

/// Settings of one worker process.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerConfig {
    /// Postgres connection URL.
    #[arg(long, env = "SLUICE_DATABASE_URL", default_value = "postgres://sluice_worker:sluice@127.0.0.1:5432/sluice")]
    pub database_url: String,
    /// Most connections this worker keeps open to Postgres, whatever its
    /// concurrency: by default two, one the audit writer uses (calls wait on
    /// it) and one for everything else. Every query runs in a task of its own
    /// and no connection is held across a model call, a rate-limit wait or a
    /// back-off, so queries queue for a connection, never stall; a fleet of N
    /// workers needs 2N of Postgres's `max_connections` (deploy/README.md,
    /// "Postgres connections"). More only help a worker writing thousands of
    /// results a second.
    #[arg(long, env = "SLUICE_DB_POOL_SIZE", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub db_pool_size: u32,
    /// NATS server URL (JetStream must be enabled).
    #[arg(long, env = "SLUICE_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    #[command(flatten)]
    pub nats_auth: common::nats::NatsAuth,
    /// The providers file (TOML): endpoints, keys, limits and parameter rules
    /// per model; see deploy/providers.example.toml. Without it, the
    /// SLUICE_MODEL_BASE_URL, SLUICE_MODEL_API_KEY*, SLUICE_RPM, SLUICE_TPM and
    /// SLUICE_MAX_IN_FLIGHT settings describe one OpenAI-compatible provider
    /// named "default" that serves any model.
    #[arg(long, env = "SLUICE_PROVIDERS_FILE")]
    pub providers_file: Option<PathBuf>,
    /// The providers, read once at start-up by [`WorkerConfig::resolve`].
    #[arg(skip)]
    pub catalog: Option<common::providers::Catalog>,
    /// Base URL of an OpenAI-compatible API, including `/v1` (without a
    /// providers file). The default is the Sluice model simulator started by `scripts/demo`.
    #[arg(long, env = "SLUICE_MODEL_BASE_URL", default_value = "http://127.0.0.1:7800/v1")]
    pub model_base_url: String,
    /// Without a providers file: file holding the provider API key, or several keys one per line (used
    /// in order: when the provider refuses one, the next is tried). The keys
    /// may instead be given in the environment variable SLUICE_MODEL_API_KEY,
    /// separated by commas; they are never taken from the command line.
    #[arg(long, env = "SLUICE_MODEL_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
    /// The API keys, resolved once at start-up by [`WorkerConfig::resolve`].
    #[arg(skip)]
    pub api_keys: Vec<SecretString>,
    /// Model calls in flight at once in this worker.
    #[arg(long, env = "SLUICE_CONCURRENCY", default_value_t = 64)]
    pub concurrency: usize,
    /// Chunks held at once (0: enough to keep `concurrency` calls busy, plus one).
    #[arg(long, env = "SLUICE_MAX_CHUNKS", default_value_t = 0)]
    pub max_chunks: usize,
    /// Timeout of one model call, in milliseconds.
    #[arg(long, env = "SLUICE_REQUEST_TIMEOUT_MS", default_value_t = 60_000)]
    pub request_timeout_ms: u64,
    /// Attempts per item before it is recorded as failed.
    #[arg(long, env = "SLUICE_MAX_ATTEMPTS", default_value_t = 4)]
    pub max_attempts: usize,
    /// First retry delay in milliseconds (doubles each retry, with jitter).
    #[arg(long, env = "SLUICE_RETRY_BASE_MS", default_value_t = 200)]
    pub retry_base_ms: u64,
    /// 429 answers tolerated per item before it fails as rate_limited.
    #[arg(long, env = "SLUICE_MAX_RATE_LIMITED", default_value_t = 50)]
    pub max_rate_limited: usize,
    /// Re-asks with the validation error after output that fails the schema.
    #[arg(long, env = "SLUICE_MAX_REPAIRS", default_value_t = 2)]
    pub max_repairs: usize,
    /// Without a providers file: cluster-wide requests per minute for each
    /// model of this provider key (0: no limit). Every worker must be given
    /// the same value.
    #[arg(long, env = "SLUICE_RPM", default_value_t = 0.0)]
    pub rpm: f64,
    /// Without a providers file: cluster-wide tokens per minute (prompt +
    /// max_tokens) for each model of this provider key (0: no limit).
    #[arg(long, env = "SLUICE_TPM", default_value_t = 0.0)]
    pub tpm: f64,
    /// Without a providers file: calls in flight allowed across the whole
    /// cluster for each model of this provider key (0: only the adaptive
    /// window, which starts at 4 and grows with successes).
    #[arg(long, env = "SLUICE_MAX_IN_FLIGHT", default_value_t = 0)]
    pub max_in_flight: u32,
    /// Consecutive failed calls (server errors, timeouts) across the cluster
    /// that open a model's circuit breaker.
    #[arg(long, env = "SLUICE_BREAKER_THRESHOLD", default_value_t = 5)]
    pub breaker_threshold: u32,
    /// While a breaker is open, one probe call is let through per this many milliseconds.
    #[arg(long, env = "SLUICE_BREAKER_INTERVAL_MS", default_value_t = 5_000)]
    pub breaker_interval_ms: u64,
    /// Deliveries of a chunk after which its unfinished items are recorded as
    /// failed (redeliveries_exhausted) instead of being tried again.
    #[arg(long, env = "SLUICE_MAX_DELIVERIES", default_value_t = 50)]
    pub max_deliveries: i64,
    /// JetStream ack wait in seconds: an unacked chunk is redelivered after
    /// this, so a worker that died hands its chunks on within it. The worker
    /// signals progress every third of it while a chunk is being worked on.
    /// Every worker must be given the same value.
    #[arg(long, env = "SLUICE_ACK_WAIT_S", default_value_t = 10)]
    pub ack_wait_s: u64,
    /// On shutdown, how long in-flight chunks may take to finish, in seconds.
    #[arg(long, env = "SLUICE_SHUTDOWN_GRACE_S", default_value_t = 20)]
    pub shutdown_grace_s: u64,
    /// Price table (TOML, dollars per million tokens by model) for the cost of
    /// each attempt. The default is used only if it exists.
    #[arg(long, env = "SLUICE_PRICES_FILE", default_value = "deploy/prices.toml")]
    pub prices_file: PathBuf,
    /// Personal data redacted from prompts and outputs kept in the audit
    /// trail: a comma-separated list of email, phone, card, iban, or all / none.
    #[arg(long, env = "SLUICE_REDACT", default_value = "all")]
    pub redact: String,
    /// Seconds without progress (no call finished, no result written) while
    /// holding chunks with no call in flight, after which the worker logs
    /// what each of its tasks waits on.
    #[arg(long, env = "SLUICE_STALL_WARN_S", default_value_t = 60)]
    pub stall_warn_s: u64,
    /// Name recorded with every result (default: host name and process id).
    #[arg(long, env = "SLUICE_WORKER_NAME")]
    pub name: Option<String>,
    /// Whether a chunk being worked on is kept this worker's with progress
    /// acks. Always on; off only in the test that shows what it prevents.
    #[arg(skip = true)]
    pub heartbeat: bool,
}

impl WorkerConfig {
    /// The configuration a user gets with no flag and no environment
    /// variable, connected to the given services: what tests and embedders
    /// start from, so a test exercises the defaults unless it sets what it is
    /// about. Prices come from the repository's `deploy/prices.toml`.
    pub fn for_urls(database_url: &str, nats_url: &str, model_base_url: &str) -> Self {
        let mut config: Self = common::declared_defaults();
        config.database_url = database_url.into();
        config.nats_url = nats_url.into();
        config.model_base_url = model_base_url.into();
        config.prices_file = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/prices.toml"));
        config
    }

    /// Every setting as the environment variable that sets it, for starting
    /// a worker process with this configuration. (What is not a setting, the
    /// resolved keys and catalog, is read again by the process.)
    pub fn to_env(&self) -> Vec<(&'static str, String)> {
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
        let mut env = vec![
            ("SLUICE_DATABASE_URL", self.database_url.clone()),
            ("SLUICE_DB_POOL_SIZE", self.db_pool_size.to_string()),
            ("SLUICE_STALL_WARN_S", self.stall_warn_s.to_string()),
            ("SLUICE_NATS_URL", self.nats_url.clone()),
            ("SLUICE_MODEL_BASE_URL", self.model_base_url.clone()),
            ("SLUICE_CONCURRENCY", self.concurrency.to_string()),
            ("SLUICE_MAX_CHUNKS", self.max_chunks.to_string()),
            ("SLUICE_REQUEST_TIMEOUT_MS", self.request_timeout_ms.to_string()),
            ("SLUICE_MAX_ATTEMPTS", self.max_attempts.to_string()),
            ("SLUICE_RETRY_BASE_MS", self.retry_base_ms.to_string()),
            ("SLUICE_MAX_RATE_LIMITED", self.max_rate_limited.to_string()),
            ("SLUICE_MAX_REPAIRS", self.max_repairs.to_string()),
            ("SLUICE_RPM", self.rpm.to_string()),
            ("SLUICE_TPM", self.tpm.to_string()),
            ("SLUICE_MAX_IN_FLIGHT", self.max_in_flight.to_string()),
            ("SLUICE_BREAKER_THRESHOLD", self.breaker_threshold.to_string()),
            ("SLUICE_BREAKER_INTERVAL_MS", self.breaker_interval_ms.to_string()),
            ("SLUICE_MAX_DELIVERIES", self.max_deliveries.to_string()),
            ("SLUICE_ACK_WAIT_S", self.ack_wait_s.to_string()),
            ("SLUICE_SHUTDOWN_GRACE_S", self.shutdown_grace_s.to_string()),
            ("SLUICE_PRICES_FILE", self.prices_file.display().to_string()),
            ("SLUICE_REDACT", self.redact.clone()),
        ];
        env.extend(path(&self.providers_file).map(|p| ("SLUICE_PROVIDERS_FILE", p)));
        env.extend(path(&self.api_key_file).map(|p| ("SLUICE_MODEL_API_KEY_FILE", p)));
        env.extend(self.name.clone().map(|n| ("SLUICE_WORKER_NAME", n)));
        env.extend(self.nats_auth.to_env());
        env
    }

    /// Validates the settings and reads the API key, once, at start-up.
    pub fn resolve(mut self) -> Result<Self, Error> {
        if self.concurrency == 0 {
            return Err(Error::Config("SLUICE_CONCURRENCY must be at least 1".into()));
        }
        if self.max_attempts == 0 {
            return Err(Error::Config("SLUICE_MAX_ATTEMPTS must be at least 1".into()));
        }
        if self.rpm < 0.0 || self.tpm < 0.0 || !self.rpm.is_finite() || !self.tpm.is_finite() {
            return Err(Error::Config("SLUICE_RPM and SLUICE_TPM must be 0 (no limit) or positive".into()));
        }
        if self.breaker_threshold == 0 {
            return Err(Error::Config("SLUICE_BREAKER_THRESHOLD must be at least 1".into()));
        }
        if self.max_deliveries < 1 {
            return Err(Error::Config("SLUICE_MAX_DELIVERIES must be at least 1".into()));
        }
        if self.ack_wait_s < 3 {
            return Err(Error::Config("SLUICE_ACK_WAIT_S must be at least 3".into()));
        }
        if let Some(path) = &self.providers_file {
            if self.catalog.is_none() {
                let catalog =
                    common::providers::Catalog::load(path).map_err(|e| Error::Config(common::error_chain(&e)))?;
                // Read every key now, so a missing key file stops the worker at start.
                for name in catalog.providers.keys() {
                    catalog.keys(name).map_err(|e| Error::Config(common::error_chain(&e)))?;
                }
                self.catalog = Some(catalog);
            }
        }
        if self.catalog.is_none()
            && !self.model_base_url.starts_with("http://")
            && !self.model_base_url.starts_with("https://")
        {
            return Err(Error::Config(format!(
                "SLUICE_MODEL_BASE_URL must be an http(s) URL, got {:?}",
                self.model_base_url
            )));
        }
        if self.api_keys.is_empty() {
            let text = if let Some(path) = &self.api_key_file {
                std::fs::read_to_string(path).map_err(|e| {
                    Error::Config(format!("cannot read SLUICE_MODEL_API_KEY_FILE {}: {e}", path.display()))
                })?
            } else {
                std::env::var("SLUICE_MODEL_API_KEY").unwrap_or_default().replace(',', "\n")
            };
            self.api_keys = text
                .lines()
                .map(str::trim)
                .filter(|k| !k.is_empty())
                .map(|k| SecretString::from(k.to_string()))
                .collect();
        }
        if self.name.is_none() {
            let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
            let host = host.trim();
            self.name = Some(format!("{}-{}", if host.is_empty() { "worker" } else { host }, std::process::id()));
        }
        Ok(self)
    }

    /// Chunks to hold at once.
    pub fn chunk_slots(&self, chunk_size: usize) -> usize {
        if self.max_chunks > 0 {
            self.max_chunks
        } else {
            self.concurrency.div_ceil(chunk_size.max(1)) + 1
        }
    }

    /// The price table; a missing default file means no prices.
    pub fn prices(&self) -> Result<common::prices::PriceTable, Error> {
        common::prices::PriceTable::load_or_empty(&self.prices_file).map_err(|e| Error::Config(common::error_chain(&e)))
    }

    pub fn redaction(&self) -> Result<common::redact::Redaction, Error> {
        common::redact::Redaction::parse(&self.redact).map_err(|e| Error::Config(format!("SLUICE_REDACT: {e}")))
    }

    pub fn guards(&self) -> crate::guard::GuardConfig {
        crate::guard::GuardConfig {
            breaker_threshold: self.breaker_threshold,
            breaker_interval: Duration::from_millis(self.breaker_interval_ms),
            worker: self.name.clone().unwrap_or_default(),
        }
    }

    /// The providers this worker serves, with their keys read: the providers
    /// file's, or the one-provider shorthand.
    pub fn endpoints(&self) -> Result<crate::endpoints::Endpoints, Error> {
        let catalog = match &self.catalog {
            Some(c) => c.clone(),
            None => {
                let limits = common::providers::ModelConfig {
                    rpm: self.rpm,
                    tpm: self.tpm,
                    max_in_flight: self.max_in_flight,
                    ..Default::default()
                };
                return crate::endpoints::Endpoints::with_shorthand_keys(
                    common::providers::Catalog::shorthand(&self.model_base_url, limits),
                    self.api_keys.clone(),
                    Duration::from_millis(self.request_timeout_ms),
                    self.concurrency,
                );
            }
        };
        crate::endpoints::Endpoints::new(catalog, Duration::from_millis(self.request_timeout_ms), self.concurrency)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every setting the command line knows goes into `to_env`, and reading
    /// them back gives the same configuration.
    #[test]
    fn to_env_forwards_every_setting() {
        use clap::{Args, FromArgMatches};
        let cmd = WorkerConfig::augment_args(clap::Command::new("w"));
        let mut config = WorkerConfig::for_urls("postgres://a/b", "nats://c:1", "http://d/v1");
        config.providers_file = Some("p.toml".into());
        config.api_key_file = Some("k".into());
        config.name = Some("n".into());
        config.nats_auth.nats_ca_file = Some("ca.pem".into());
        config.nats_auth.nats_creds_file = Some("w.creds".into());
        config.nats_auth.nats_nkey_file = Some("w.nk".into());
        config.nats_auth.nats_user = Some("u".into());
        config.nats_auth.nats_password_file = Some("pw".into());
        config.concurrency = 7;
        config.rpm = 1.5;
        let env = config.to_env();
        let known: Vec<&str> = cmd.get_arguments().filter_map(|a| a.get_env()?.to_str()).collect();
        for name in &known {
            assert!(env.iter().any(|(e, _)| e == name), "{name} is not forwarded");
        }
        let flag = |e: &str| {
            let arg = cmd.get_arguments().find(|a| a.get_env().is_some_and(|v| v == e)).expect("a known variable");
            format!("--{}", arg.get_long().expect("a long flag"))
        };
        let args: Vec<String> =
            std::iter::once("w".to_string()).chain(env.iter().flat_map(|(e, v)| [flag(e), v.clone()])).collect();
        let parsed = WorkerConfig::from_arg_matches(&cmd.try_get_matches_from(args).unwrap()).unwrap();
        assert_eq!(format!("{parsed:?}"), format!("{config:?}"));
    }
}
