//! Publishes chunk messages to JetStream, one per chunk, deduplicated by `Nats-Msg-Id`.

use async_nats::jetstream::{self, message::PublishMessage};
use futures::future::try_join_all;
use sqlx::PgPool;

use crate::store::{self, ChunkRow};
use crate::{metrics as m, Error};

/// How many publishes may await their acks at once.
const WINDOW: usize = 512;

/// Publishes `chunks` and records them as published in Postgres. `cause`
/// labels the metric (`submit` or `reconcile`).
pub async fn publish_chunks(
    js: &jetstream::Context,
    pool: &PgPool,
    chunks: &[ChunkRow],
    cause: &'static str,
) -> Result<(), Error> {
    for window in chunks.chunks(WINDOW) {
        let mut acks = Vec::with_capacity(window.len());
        for c in window {
            let payload = serde_json::to_vec(&c.msg).expect("chunk message serialises");
            let publish = PublishMessage::build()
                .payload(payload.into())
                .message_id(c.msg.msg_id(c.generation));
            let ack = js
                .send_publish(common::wire::chunk_subject(c.msg.job_id), publish)
                .await
                .map_err(|e| publish_error(c, e))?;
            acks.push(async move { ack.await.map_err(|e| publish_error(c, e)) });
        }
        try_join_all(acks).await?;
        if let Some(first) = window.first() {
            let nos: Vec<i32> = window.iter().map(|c| c.msg.chunk_no).collect();
            store::mark_published(pool, first.msg.job_id, &nos).await?;
        }
        metrics::counter!(m::CHUNKS_PUBLISHED, "cause" => cause).increment(window.len() as u64);
    }
    Ok(())
}

fn publish_error(c: &ChunkRow, e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::Publish {
        job_id: c.msg.job_id,
        chunk_no: c.msg.chunk_no,
        source: Box::new(e),
    }
}
