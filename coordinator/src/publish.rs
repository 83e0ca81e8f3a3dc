//! Publishes chunk messages to JetStream, one per chunk, deduplicated by `Nats-Msg-Id`, keeping a bounded window per job.
//!
//! Each running job has at most `window` messages in the stream at a time;
//! the publisher tops every job up in turn. Workers receive messages in
//! stream order, so jobs interleave: a 100-item job submitted after a
//! 100,000-item one waits for at most one window of the big job, not for all
//! of it, and both share the model's rate limit.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage};
use futures::future::try_join_all;
use futures::TryStreamExt;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use common::wire::ChunkMsg;

use crate::store;
use crate::{metrics as m, Error};

/// How many publishes may await their acks at once.
const WINDOW: usize = 512;

/// Publishes `chunks` and records them as published in Postgres. `cause`
/// labels the metric (`submit` or `reconcile`).
pub async fn publish_chunks(
    js: &jetstream::Context,
    pool: &PgPool,
    chunks: &[ChunkMsg],
    cause: &'static str,
) -> Result<(), Error> {
    for window in chunks.chunks(WINDOW) {
        let mut acks = Vec::with_capacity(window.len());
        for c in window {
            let payload = serde_json::to_vec(c).expect("chunk message serialises");
            let publish = PublishMessage::build().payload(payload.into()).message_id(c.msg_id());
            let ack = js
                .send_publish(common::wire::chunk_subject(c.job_id), publish)
                .await
                .map_err(|e| publish_error(c, e))?;
            acks.push(async move { ack.await.map_err(|e| publish_error(c, e)) });
        }
        try_join_all(acks).await?;
        if let Some(first) = window.first() {
            let nos: Vec<i32> = window.iter().map(|c| c.chunk_no).collect();
            store::mark_published(pool, first.job_id, &nos).await?;
        }
        metrics::counter!(m::CHUNKS_PUBLISHED, "cause" => cause).increment(window.len() as u64);
    }
    Ok(())
}

/// Follows the chunk stream. JetStream may lose it (a new volume, a purge,
/// disaster recovery): it is declared again when missing, and when the stream
/// turns out to be a new one (created by this process or by a worker), every
/// message that was in the old one is lost, so every published chunk still
/// pending is reopened to be published again.
pub struct StreamWatch {
    url: String,
    created: Option<async_nats::datetime::DateTime>,
}

impl StreamWatch {
    pub fn new(url: &str) -> Self {
        StreamWatch { url: url.to_string(), created: None }
    }

    /// The stream, declared again if it is missing.
    pub async fn stream(&mut self, js: &jetstream::Context, pool: &PgPool) -> Result<jetstream::stream::Stream, Error> {
        let stream = common::nats::ensure_stream(js, &self.url).await?;
        let created = stream.cached_info().created;
        if self.created.is_some_and(|seen| seen != created) {
            let n = store::reopen_published_chunks(pool).await?;
            tracing::warn!(
                chunks = n,
                "the chunk stream is new (JetStream lost its state): republishing every pending chunk"
            );
            metrics::counter!(m::CHUNKS_REOPENED).increment(n);
        }
        self.created = Some(created);
        Ok(stream)
    }
}

/// How many messages of `job_id` are in the stream (queued or being worked on).
pub async fn messages_in_stream(stream: &jetstream::stream::Stream, job_id: Uuid) -> Result<usize, Error> {
    let nats_err = |e: Box<dyn std::error::Error + Send + Sync>| Error::Nats(common::nats::NatsError::Request(e));
    let subject = common::wire::chunk_subject(job_id);
    let counts: Vec<(String, usize)> = stream
        .info_with_subjects(&subject)
        .await
        .map_err(|e| nats_err(Box::new(e)))?
        .try_collect()
        .await
        .map_err(|e| nats_err(Box::new(e)))?;
    Ok(counts.iter().filter(|(s, _)| *s == subject).map(|(_, n)| n).sum())
}

/// Tops every running job up to `window` messages in the stream, oldest job first.
pub async fn top_up(
    js: &jetstream::Context,
    pool: &PgPool,
    watch: &tokio::sync::Mutex<StreamWatch>,
    window: usize,
) -> Result<(), Error> {
    let stream = watch.lock().await.stream(js, pool).await?;
    for job_id in store::running_jobs(pool).await? {
        let queued = messages_in_stream(&stream, job_id).await?;
        if queued >= window {
            continue;
        }
        let chunks = store::unpublished_chunks(pool, job_id, (window - queued) as i64).await?;
        if !chunks.is_empty() {
            publish_chunks(js, pool, &chunks, "publish").await?;
        }
    }
    Ok(())
}

/// Runs the publisher until shutdown: a top-up every `interval`, and at once
/// when woken (a job was submitted, resumed or lost chunks were found).
/// Failures (NATS or Postgres away) are logged once and retried each turn.
pub async fn run(
    js: jetstream::Context,
    pool: PgPool,
    watch: Arc<tokio::sync::Mutex<StreamWatch>>,
    window: usize,
    interval: Duration,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let mut health = common::telemetry::Health::default();
    loop {
        match top_up(&js, &pool, &watch, window).await {
            Ok(()) => health.ok("publishing chunks"),
            Err(err) => health.failed("publishing chunks", &err),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = wake.notified() => {}
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

fn publish_error(c: &ChunkMsg, e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::Publish { job_id: c.job_id, chunk_no: c.chunk_no, source: Box::new(e) }
}
