//! Connecting to NATS and declaring the JetStream stream and consumer every Sluice process relies on.

use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, stream};

use crate::wire;

#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("cannot reach NATS at {url}: is nats-server running with JetStream (-js)? Start it with `scripts/demo` or set SLUICE_NATS_URL")]
    Connect {
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
    #[error("cannot create or open the JetStream stream {stream} at {url}: is JetStream enabled (nats-server -js)?")]
    Stream {
        url: String,
        stream: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{0}")]
    Auth(String),
    #[error("a JetStream request failed")]
    Request(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("cannot create or open the key-value bucket {bucket}")]
    Kv {
        bucket: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot create or open the JetStream consumer {consumer}")]
    Consumer {
        consumer: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// How a process proves itself to NATS and checks the server: TLS with a
/// CA of your own, and a user and password or a credentials file. The same
/// settings, with the same variables, for the coordinator and the workers.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct NatsAuth {
    /// CA certificate(s) (PEM) that signed the NATS server's certificate.
    /// When set, the connection must be TLS (also with a nats:// URL).
    #[arg(long, env = "SLUICE_NATS_CA_FILE")]
    pub nats_ca_file: Option<PathBuf>,
    /// NATS user name; its password comes from --nats-password-file.
    #[arg(long, env = "SLUICE_NATS_USER", requires = "nats_password_file")]
    pub nats_user: Option<String>,
    /// File holding the NATS user's password, readable only by its owner.
    #[arg(long, env = "SLUICE_NATS_PASSWORD_FILE", requires = "nats_user")]
    pub nats_password_file: Option<PathBuf>,
    /// File holding an nkey seed (`SU...`, as `nk -gen user` writes it),
    /// readable only by its owner: for a server that lists the user by its
    /// public nkey (deploy/nats-server.conf).
    #[arg(long, env = "SLUICE_NATS_NKEY_FILE")]
    pub nats_nkey_file: Option<PathBuf>,
    /// NATS credentials file (a user JWT and nkey seed, as `nsc` writes it),
    /// instead of a user and password.
    #[arg(long, env = "SLUICE_NATS_CREDS_FILE")]
    pub nats_creds_file: Option<PathBuf>,
}

impl NatsAuth {
    /// The settings as the environment variables that set them, for a child process.
    pub fn to_env(&self) -> Vec<(&'static str, String)> {
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
        let mut env = Vec::new();
        env.extend(path(&self.nats_ca_file).map(|p| ("SLUICE_NATS_CA_FILE", p)));
        env.extend(self.nats_user.clone().map(|u| ("SLUICE_NATS_USER", u)));
        env.extend(path(&self.nats_password_file).map(|p| ("SLUICE_NATS_PASSWORD_FILE", p)));
        env.extend(path(&self.nats_nkey_file).map(|p| ("SLUICE_NATS_NKEY_FILE", p)));
        env.extend(path(&self.nats_creds_file).map(|p| ("SLUICE_NATS_CREDS_FILE", p)));
        env
    }
}

/// Connects to NATS, naming the address in the error when it cannot.
pub async fn connect(url: &str, auth: &NatsAuth) -> Result<async_nats::Client, NatsError> {
    let mut options = async_nats::ConnectOptions::new().connection_timeout(Duration::from_secs(5)).name("sluice");
    if let Some(ca) = &auth.nats_ca_file {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let (Some(user), Some(file)) = (&auth.nats_user, &auth.nats_password_file) {
        let password = crate::private_file::read(file)
            .map_err(|e| NatsError::Auth(format!("NATS password: {}", crate::error_chain(&e))))?;
        options = options.user_and_password(user.clone(), password);
    }
    if let Some(file) = &auth.nats_nkey_file {
        let seed = crate::private_file::read(file)
            .map_err(|e| NatsError::Auth(format!("NATS nkey seed: {}", crate::error_chain(&e))))?;
        options = options.nkey(seed);
    }
    if let Some(creds) = &auth.nats_creds_file {
        options = options
            .credentials_file(creds)
            .await
            .map_err(|e| NatsError::Auth(format!("cannot read the NATS credentials file {}: {e}", creds.display())))?;
    }
    options.connect(url).await.map_err(|source| NatsError::Connect { url: url.to_string(), source })
}

/// Creates the chunk stream if it does not exist. Work-queue retention removes
/// a message once a worker acks it, so the per-subject message count tells the
/// reconciler whether a job still has chunks in flight.
pub async fn ensure_stream(js: &jetstream::Context, url: &str) -> Result<stream::Stream, NatsError> {
    js.get_or_create_stream(stream::Config {
        name: wire::STREAM.to_string(),
        subjects: vec![format!("{}.>", wire::SUBJECT_PREFIX)],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .map_err(|e| NatsError::Stream { url: url.to_string(), stream: wire::STREAM, source: Box::new(e) })
}

/// Creates (or opens) the durable pull consumer that all workers share.
pub async fn ensure_consumer(stream: &stream::Stream, ack_wait: Duration) -> Result<consumer::PullConsumer, NatsError> {
    // Created, or updated to this configuration: a changed ack wait (a new
    // default) takes effect on a consumer made by older workers.
    stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(wire::CONSUMER.to_string()),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait,
            // Postgres, not the delivery count, decides when a chunk is
            // finished, so JetStream keeps redelivering until it is acked.
            max_deliver: -1,
            max_ack_pending: 10_000,
            ..Default::default()
        })
        .await
        .map_err(|e| NatsError::Consumer { consumer: wire::CONSUMER, source: Box::new(e) })
}

/// Key-value bucket holding state shared by all workers: rate-limit buckets
/// and circuit breakers, updated with compare-and-set.
pub const STATE_BUCKET: &str = "sluice_state";

/// Creates (or opens) the shared state bucket.
pub async fn ensure_state_bucket(js: &jetstream::Context) -> Result<kv::Store, NatsError> {
    if let Ok(store) = js.get_key_value(STATE_BUCKET).await {
        return Ok(store);
    }
    js.create_key_value(kv::Config {
        bucket: STATE_BUCKET.to_string(),
        history: 1,
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .map_err(|e| NatsError::Kv { bucket: STATE_BUCKET, source: Box::new(e) })
}

/// Key-value bucket holding the coordinators' leader lease.
pub const LEADER_BUCKET: &str = "sluice_leader";

/// Creates (or opens) the leader bucket, whose entries expire `ttl` after
/// they were written: a lease not renewed lapses.
pub async fn ensure_leader_bucket(js: &jetstream::Context, ttl: Duration) -> Result<kv::Store, NatsError> {
    if let Ok(store) = js.get_key_value(LEADER_BUCKET).await {
        return Ok(store);
    }
    js.create_key_value(kv::Config {
        bucket: LEADER_BUCKET.to_string(),
        history: 1,
        max_age: ttl,
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .map_err(|e| NatsError::Kv { bucket: LEADER_BUCKET, source: Box::new(e) })
}

/// A circuit breaker as stored in the state bucket, one per provider
/// endpoint and model: written by workers, read by the coordinator's
/// notifier. A wire boundary like `wire`: add optional fields only.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BreakerState {
    pub open: bool,
    /// Consecutive failures seen by the cluster.
    pub failures: u32,
    pub opened_at_ms: u64,
    /// The next probe may be sent at this time.
    pub probe_at_ms: u64,
}

/// Prefix of the breakers' keys in the state bucket.
pub const BREAKER_PREFIX: &str = "cb.";

/// The state-bucket key of the breaker for `model` at `endpoint`.
pub fn breaker_key(endpoint: &str, model: &str) -> String {
    format!("{BREAKER_PREFIX}{}.{}", key_part(endpoint), key_part(model))
}

/// The model part of a breaker's key (as `key_part` wrote it).
pub fn breaker_model(key: &str) -> Option<&str> {
    key.strip_prefix(BREAKER_PREFIX)?.split_once('.').map(|(_, model)| model)
}

/// Turns any text into a valid key-value key part (letters, digits, `-`, `_`).
pub fn key_part(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect()
}
