//! The reconciler: republishes chunks JetStream lost and marks finished jobs complete, using Postgres as the truth.
//!
//! A job's chunk messages live on their own subject in a work-queue stream, so
//! a message disappears exactly when a worker acks it after committing the
//! chunk's results. If Postgres still has chunks that were published a while
//! ago and are still pending, but the job's subject holds no message at all,
//! those messages were lost (stream purged, a message dropped): the chunks are
//! marked unpublished under a new generation and the publisher sends them again.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::publish::StreamWatch;
use crate::{metrics as m, store, Error, ServeConfig};

/// What the reconciler works with: Postgres, the chunk stream, and the
/// publisher to wake when chunks are reopened.
#[derive(Clone)]
pub struct Context {
    pub pool: PgPool,
    pub js: jetstream::Context,
    pub stream: Arc<tokio::sync::Mutex<StreamWatch>>,
    pub wake: Arc<Notify>,
    /// Asked before each pass: a leader woken past its lease does nothing.
    pub leader: Arc<crate::leader::Status>,
}

#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub interval: Duration,
    pub republish_after: Duration,
    /// Uploads older than this that never finished are abandoned.
    pub upload_timeout: Duration,
}

impl From<&ServeConfig> for Settings {
    fn from(c: &ServeConfig) -> Self {
        Settings {
            interval: Duration::from_millis(c.reconcile_interval_ms),
            republish_after: Duration::from_millis(c.republish_after_ms),
            upload_timeout: Duration::from_secs(c.upload_timeout_s),
        }
    }
}

/// Runs a reconciliation pass every `interval` until shutdown.
pub async fn run(state: Context, settings: Settings, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(settings.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut health = common::telemetry::Health::default();
    // Jobs completed from here on are counted by this leader, whoever completed them.
    let mut completed_after = chrono::Utc::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if !state.leader.is_leader() {
            continue;
        }
        match pass(&state, settings, &mut completed_after).await {
            Ok(()) => health.ok("reconciling"),
            Err(err) => health.failed("reconciling", &err),
        }
    }
}

/// One reconciliation pass over all running jobs. Jobs completed after
/// `completed_after` (by a worker or by this pass) are counted in
/// `sluice_jobs_finished_total`, and it moves on.
pub async fn pass(
    state: &Context,
    settings: Settings,
    completed_after: &mut chrono::DateTime<chrono::Utc>,
) -> Result<(), Error> {
    for job_id in store::abandon_stale_uploads(&state.pool, settings.upload_timeout).await? {
        tracing::warn!(%job_id, "job abandoned: its input never finished uploading");
        metrics::counter!(m::JOBS_FINISHED, "state" => "abandoned").increment(1);
    }
    let in_stream = state.stream.lock().await.counts(&state.js, &state.pool).await?.1.by_job;
    for (job_id, _) in store::running_job_projects(&state.pool).await? {
        if common::db::complete_if_done(&state.pool, job_id).await? {
            tracing::info!(%job_id, "job completed (seen by reconciler)");
            continue;
        }
        if in_stream.get(&job_id).is_some_and(|&n| n > 0) {
            continue;
        }
        let before = chrono::Utc::now() - chrono::Duration::from_std(settings.republish_after).unwrap_or_default();
        let lost = store::reopen_lost_chunks(&state.pool, job_id, before).await?;
        if lost > 0 {
            // The publisher sends them again, under their new generation.
            tracing::warn!(%job_id, chunks = lost, "chunks missing from JetStream will be republished");
            metrics::counter!(m::CHUNKS_REOPENED).increment(lost);
            state.wake.notify_one();
        }
    }
    // Workers complete most jobs; the count of completions is kept here, by
    // the leader alone, so that it is counted once in the cluster.
    let (completed, latest) = store::jobs_completed_after(&state.pool, *completed_after).await?;
    if let Some(latest) = latest {
        metrics::counter!(m::JOBS_FINISHED, "state" => "completed").increment(completed);
        *completed_after = latest;
    }
    Ok(())
}
