//! Connecting to NATS and declaring the JetStream stream and consumer every Sluice process relies on.

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

/// Connects to NATS, naming the address in the error when it cannot.
pub async fn connect(url: &str) -> Result<async_nats::Client, NatsError> {
    async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .name("sluice")
        .connect(url)
        .await
        .map_err(|source| NatsError::Connect { url: url.to_string(), source })
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
    stream
        .get_or_create_consumer(
            wire::CONSUMER,
            consumer::pull::Config {
                durable_name: Some(wire::CONSUMER.to_string()),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait,
                // Postgres, not the delivery count, decides when a chunk is
                // finished, so JetStream keeps redelivering until it is acked.
                max_deliver: -1,
                max_ack_pending: 10_000,
                ..Default::default()
            },
        )
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

/// Turns any text into a valid key-value key part (letters, digits, `-`, `_`).
pub fn key_part(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect()
}
