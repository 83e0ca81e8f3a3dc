//! The reconciler: republishes chunks JetStream lost and marks finished jobs complete, using Postgres as the truth.
//!
//! A job's chunk messages live on their own subject in a work-queue stream, so
//! a message disappears exactly when a worker acks it after committing the
//! chunk's results. If Postgres still has pending chunks for a job whose
//! subject holds no message at all, those chunks were lost (stream purged,
//! publish failed after commit, coordinator crashed mid-publish) and are
//! published again under a new generation.

use std::time::Duration;

use futures::TryStreamExt;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::api::AppState;
use crate::{metrics as m, publish, store, Error, ServeConfig};

#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub interval: Duration,
    pub republish_after: Duration,
}

impl From<&ServeConfig> for Settings {
    fn from(c: &ServeConfig) -> Self {
        Settings {
            interval: Duration::from_millis(c.reconcile_interval_ms),
            republish_after: Duration::from_millis(c.republish_after_ms),
        }
    }
}

/// Runs a reconciliation pass every `interval` until shutdown.
pub async fn run(state: AppState, settings: Settings, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(settings.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(err) = pass(&state, settings).await {
            tracing::warn!(
                error = &err as &dyn std::error::Error,
                "reconciliation pass failed"
            );
        }
    }
}

/// One reconciliation pass over all running jobs.
pub async fn pass(state: &AppState, settings: Settings) -> Result<(), Error> {
    for job_id in store::running_jobs(&state.pool).await? {
        if store::complete_if_done(&state.pool, job_id).await? {
            metrics::counter!(m::JOBS_FINISHED, "state" => "completed").increment(1);
            tracing::info!(%job_id, "job completed (seen by reconciler)");
            continue;
        }
        if messages_in_stream(state, job_id).await? > 0 {
            continue;
        }
        let before = chrono::Utc::now()
            - chrono::Duration::from_std(settings.republish_after).unwrap_or_default();
        let chunks = store::claim_stale_chunks(&state.pool, job_id, before).await?;
        if chunks.is_empty() {
            continue;
        }
        tracing::warn!(%job_id, chunks = chunks.len(), "republishing chunks missing from JetStream");
        publish::publish_chunks(&state.js, &state.pool, &chunks, "reconcile").await?;
    }
    Ok(())
}

async fn messages_in_stream(state: &AppState, job_id: Uuid) -> Result<usize, Error> {
    let nats_err = |e: Box<dyn std::error::Error + Send + Sync>| {
        Error::Nats(common::nats::NatsError::Stream {
            url: String::new(),
            stream: common::wire::STREAM,
            source: e,
        })
    };
    let stream = state
        .js
        .get_stream(common::wire::STREAM)
        .await
        .map_err(|e| nats_err(Box::new(e)))?;
    let subject = common::wire::chunk_subject(job_id);
    let counts: Vec<(String, usize)> = stream
        .info_with_subjects(&subject)
        .await
        .map_err(|e| nats_err(Box::new(e)))?
        .try_collect()
        .await
        .map_err(|e| nats_err(Box::new(e)))?;
    Ok(counts
        .iter()
        .filter(|(s, _)| *s == subject)
        .map(|(_, n)| n)
        .sum())
}
