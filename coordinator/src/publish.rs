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

/// How many messages of `job_id` are in the stream (queued or being worked on).
pub async fn messages_in_stream(js: &jetstream::Context, job_id: Uuid) -> Result<usize, Error> {
    let nats_err = |e: Box<dyn std::error::Error + Send + Sync>| {
        Error::Nats(common::nats::NatsError::Stream { url: String::new(), stream: common::wire::STREAM, source: e })
    };
    let stream = js.get_stream(common::wire::STREAM).await.map_err(|e| nats_err(Box::new(e)))?;
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
pub async fn top_up(js: &jetstream::Context, pool: &PgPool, window: usize) -> Result<(), Error> {
    for job_id in store::running_jobs(pool).await? {
        let queued = messages_in_stream(js, job_id).await?;
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
pub async fn run(
    js: jetstream::Context,
    pool: PgPool,
    window: usize,
    interval: Duration,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) {
    loop {
        if let Err(err) = top_up(&js, &pool, window).await {
            tracing::warn!(error = &err as &dyn std::error::Error, "publishing chunks failed; retrying");
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
