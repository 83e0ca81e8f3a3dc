//! History that stays small: the monthly partitions of results and the audit trail, and the prune that drops old ones.
//!
//! Migration 0020 partitions `results`, `audit_calls`, `audit_attempts` and
//! `audit_events` by the month their job was created (`job_time(job_id)`,
//! read from the job's UUIDv7). The leader makes sure the partitions of this
//! month and the next [`MONTHS_AHEAD`] exist, at start and every hour, so a
//! write never finds its month missing; `prune` drops whole months through
//! the database's `prune_history`, which refuses while a job in them is still
//! needed and records every prune in `audit_prunes`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use common::db::Doing;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::model::{NeededJob, Pruned};
use crate::Error;

/// Months of partitions kept ready beyond the current one.
pub const MONTHS_AHEAD: i32 = 3;

/// How often the leader checks that the months ahead exist.
const EVERY: Duration = Duration::from_secs(3600);

/// Creates the partitions of this month and the next [`MONTHS_AHEAD`] that
/// are missing; returns how many tables it created.
pub async fn ensure_partitions(pool: &PgPool) -> Result<i32, Error> {
    Ok(sqlx::query_scalar!(r#"SELECT ensure_history_partitions($1) AS "made!""#, MONTHS_AHEAD)
        .fetch_one(pool)
        .await
        .doing("creating the partitions of the months ahead")?)
}

/// Keeps the months ahead ready while this coordinator leads.
pub async fn run(pool: PgPool, leading: CancellationToken) {
    let mut health = common::telemetry::Health::default();
    loop {
        match ensure_partitions(&pool).await {
            Ok(made) => {
                if made > 0 {
                    tracing::info!(tables = made, "history partitions created for the months ahead");
                }
                health.ok("creating history partitions");
            }
            Err(err) => health.failed("creating history partitions", &err),
        }
        tokio::select! {
            _ = leading.cancelled() => return,
            _ = tokio::time::sleep(EVERY) => {}
        }
    }
}

/// Removes the jobs created before the start of `before`'s month with their
/// results and audit trail, or with `dry_run` says what would go. Refused
/// with [`Error::StillNeeded`] while any of those jobs is unfinished or has
/// answers waiting for review, and with [`Error::Invalid`] for a future date.
pub async fn prune(pool: &PgPool, before: DateTime<Utc>, actor: &str, dry_run: bool) -> Result<Pruned, Error> {
    if before > Utc::now() {
        return Err(Error::Invalid(format!(
            "--before {} is in the future: a prune removes jobs created before a past date",
            before.format("%Y-%m-%d")
        )));
    }
    let report = sqlx::query_scalar!(r#"SELECT prune_history($1, $2, $3) AS "report!""#, before, actor, dry_run)
        .fetch_one(pool)
        .await
        .doing("pruning old jobs")?;
    outcome(report)
}

/// What `prune_history`'s report means: what was pruned, or who is still needed.
fn outcome(report: serde_json::Value) -> Result<Pruned, Error> {
    let malformed = |e: serde_json::Error| Error::Config(format!("prune_history gave an unreadable report: {e}"));
    if let Some(refused) = report.get("refused") {
        let jobs: Vec<NeededJob> = serde_json::from_value(refused.clone()).map_err(malformed)?;
        let boundary = serde_json::from_value(report["boundary"].clone()).map_err(malformed)?;
        return Err(Error::StillNeeded { boundary, jobs });
    }
    serde_json::from_value(report).map_err(malformed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reports_read_as_what_was_pruned_or_who_is_needed() {
        let pruned = outcome(json!({
            "boundary": "2026-11-01T00:00:00+00:00", "partitions": ["results_p202610"], "jobs": 2,
            "rows": {"results": 7}, "dry_run": false
        }))
        .unwrap();
        assert_eq!(pruned.jobs, 2);
        assert_eq!(pruned.rows["results"], 7);
        let job = uuid::Uuid::now_v7();
        let refused = outcome(json!({
            "boundary": "2026-11-01T00:00:00+00:00",
            "refused": [{"job": job, "state": "running", "waiting_review": 0},
                        {"job": job, "state": "completed", "waiting_review": 3}]
        }))
        .unwrap_err();
        let msg = refused.to_string();
        for want in ["2 job(s) created before 2026-11-01", "is running", "has 3 answer(s) waiting", "sluice cancel"] {
            assert!(msg.contains(want), "{want:?} in {msg}");
        }
        assert!(matches!(outcome(json!({"boundary": 1})), Err(Error::Config(_))));
    }
}
