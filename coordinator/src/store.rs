//! Postgres queries of the coordinator: jobs, chunks, progress and results.

use common::db::Doing;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use common::wire::ChunkMsg;

use crate::auth::Actor;
use crate::model::{ConfidenceSource, JobStatus, OutputModeUse, StageStatus};
use crate::Error;

/// Applies the migrations as the owner of the tables (`owner_url`).
pub async fn migrate(owner_url: &str) -> Result<(), Error> {
    let pool = common::db::connect(owner_url, 1).await?;
    let r = migrations::MIGRATOR.run(&pool).await.map_err(Error::Migrate);
    pool.close().await;
    r
}

/// The latest migration applied to the database (0: none) and the latest this build has.
pub async fn schema_version(pool: &PgPool) -> Result<(i64, i64), Error> {
    let latest = migrations::MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0);
    let applied: Option<i64> = sqlx::query_scalar!("SELECT max(version) FROM _sqlx_migrations WHERE success")
        .fetch_one(pool)
        .await
        .or_else(|e| match &e {
            sqlx::Error::Database(d) if d.code().as_deref() == Some("42P01") => Ok(None),
            _ => Err(e),
        })
        .doing("checking the schema version")?;
    Ok((applied.unwrap_or(0), latest))
}

/// Makes sure the schema is up to date before anything else runs: applies
/// the migrations with `owner_url` if given; else checks the schema, and
/// applies them with `pool` only if it is behind (a role that may not gets a
/// clear error). Warns when `pool`'s role owns the audit trail, which it
/// could then rewrite.
pub async fn ensure_schema(pool: &PgPool, owner_url: Option<&str>) -> Result<(), Error> {
    if let Some(url) = owner_url {
        migrate(url).await?;
    } else {
        let (applied, latest) = schema_version(pool).await?;
        let applied = (applied > 0).then_some(applied);
        if applied.unwrap_or(0) < latest {
            // On a connection of its own, closed if the migration fails: the
            // migrator's advisory lock must not outlive the attempt.
            let mut conn = pool.acquire().await.doing("checking the schema version")?;
            let migrated = migrations::MIGRATOR.run(&mut *conn).await;
            if migrated.is_err() {
                sqlx::Connection::close(conn.detach()).await.ok();
            }
            migrated.map_err(|e| {
                Error::Config(format!(
                    "the database schema is at version {} and Sluice needs {latest}, and SLUICE_DATABASE_URL's role cannot migrate it ({}): run `sluice migrate --database-url <owner's URL>`, or set SLUICE_MIGRATE_DATABASE_URL",
                    applied.unwrap_or(0),
                    common::error_chain(&e)
                ))
            })?;
        }
    }
    let owns_audit: bool =
        sqlx::query_scalar!(r#"SELECT coalesce(pg_has_role(current_user, tableowner, 'MEMBER'), false) AS "owns!" FROM pg_tables WHERE tablename = 'audit_attempts'"#)
            .fetch_optional(pool)
            .await.doing("checking the schema version")?
            .unwrap_or(false);
    if owns_audit {
        tracing::warn!(
            "SLUICE_DATABASE_URL connects as the owner of the audit trail, which could rewrite it: connect as an application role (deploy/roles.sql)"
        );
    }
    // The coordinator's rights beyond a worker's come with sluice_control
    // (migrations 0009 and 0010); a role made before them lacks it.
    let controls = sqlx::query_scalar!(
        r#"SELECT has_table_privilege(current_user, 'api_tokens', 'SELECT')
                  AND has_table_privilege(current_user, 'jobs', 'INSERT') AS "ok!""#
    )
    .fetch_one(pool)
    .await
    .doing("checking the coordinator's rights")?;
    if !controls {
        return Err(Error::Config(
            "SLUICE_DATABASE_URL's role may not manage jobs and tokens: as a Postgres superuser, run `GRANT sluice_control TO <that role>` (deploy/roles.sql)".into(),
        ));
    }
    Ok(())
}

/// Stores a new job of `project` in state `uploading`, unless the project
/// already has `max_active` jobs uploading or running.
pub async fn create_job(
    pool: &PgPool,
    job: &crate::model::NewJob,
    project: &str,
    max_active: u32,
    actor: &Actor,
) -> Result<Uuid, Error> {
    let id = Uuid::now_v7();
    let mut tx = pool.begin().await.doing("creating the job")?;
    check_active_jobs(&mut tx, project, max_active).await?;
    let ttl = job.cache_ttl_s.unwrap_or(crate::model::DEFAULT_CACHE_TTL_S).min(i64::MAX as u64) as i64;
    let mode = job.mode();
    let deadline_s = (mode == common::state::JobMode::Auto)
        .then(|| job.deadline_s.unwrap_or(crate::model::DEFAULT_DEADLINE_S).min(i32::MAX as u64) as f64);
    sqlx::query!("INSERT INTO jobs (id, kind, spec, template, template_hash, output_schema, input_name, review_below, submitted_by, project, reuse, cache_ttl_s, mode, deadline, stage_files)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, now() + make_interval(secs => $14), $15)", id, &job.kind.spec.kind, sqlx::types::Json(&job.kind.spec) as _, &job.kind.template, job.kind.template_hash(), &job.kind.schema, job.input_name.as_deref(), job.review_below, &actor.name, project, job.reuses(), ttl, mode.as_str(), deadline_s, sqlx::types::Json(&job.kind.stage_files) as _)
    .execute(&mut *tx)
    .await.doing("creating the job")?;
    if let Some(cap) = job.max_cost_usd {
        sqlx::query!("INSERT INTO job_budgets (job_id, cap_usd) VALUES ($1, $2)", id, cap)
            .execute(&mut *tx)
            .await
            .doing("creating the job")?;
    }
    crate::notify::add_job_webhooks(&mut tx, id, &job.notify, actor).await?;
    tx.commit().await.doing("creating the job")?;
    let detail = serde_json::json!({"kind": job.kind.spec.kind, "input": job.input_name, "project": project,
                                    "max_cost_usd": job.max_cost_usd, "reuse": job.reuses(), "mode": mode,
                                    "deadline_s": deadline_s, "notify": job.notify.len()});
    event(pool, id, "submitted", actor, detail).await?;
    Ok(id)
}

/// Refuses a job more for `project` when it has `max_active` uploading or
/// running. Holds a lock on the project until the transaction ends, so two
/// submits at once cannot both take the last place.
async fn check_active_jobs(tx: &mut Transaction<'_, Postgres>, project: &str, max_active: u32) -> Result<(), Error> {
    sqlx::query!("SELECT pg_advisory_xact_lock(hashtext('sluice.project.' || $1))", project)
        .fetch_one(&mut **tx)
        .await
        .doing("counting the project's jobs")?;
    let active = sqlx::query_scalar!(
        r#"SELECT count(*) AS "n!" FROM jobs WHERE project = $1 AND state IN ('uploading', 'running')"#,
        project
    )
    .fetch_one(&mut **tx)
    .await
    .doing("counting the project's jobs")?;
    if active >= i64::from(max_active) {
        return Err(Error::TooManyJobs(format!(
            "project {project} has {active} jobs uploading or running, the most it may (SLUICE_MAX_ACTIVE_JOBS_PER_PROJECT on the coordinator): wait for one to finish, cancel one, or raise that limit"
        )));
    }
    Ok(())
}

/// The project a job belongs to; `None` if there is no such job.
pub async fn job_project(pool: &PgPool, job_id: Uuid) -> Result<Option<String>, Error> {
    Ok(sqlx::query_scalar!("SELECT project FROM jobs WHERE id = $1", job_id)
        .fetch_optional(pool)
        .await
        .doing("reading the job's project")?)
}

/// Appends a job event to the audit trail, under the actor's name and token;
/// what the client claimed about who is acting goes in the detail as
/// `claimed_actor`.
pub async fn event(pool: &PgPool, job_id: Uuid, event: &str, actor: &Actor, mut detail: Value) -> Result<(), Error> {
    if let (Some(claimed), Some(map)) = (&actor.claimed, detail.as_object_mut()) {
        map.insert("claimed_actor".into(), Value::String(claimed.clone()));
    }
    sqlx::query!(
        "INSERT INTO audit_events (job_id, event, actor, detail, token_id, job_time)
         VALUES ($1, $2, $3, $4, $5, job_time($1))",
        job_id,
        event,
        &actor.name,
        detail,
        actor.token_id
    )
    .execute(pool)
    .await
    .doing("writing an audit event")?;
    Ok(())
}

/// The spec of a job, as stored at submission.
pub async fn job_spec(pool: &PgPool, job_id: Uuid) -> Result<common::spec::JobSpec, Error> {
    let spec: Option<sqlx::types::Json<common::spec::JobSpec>> = sqlx::query_scalar!(
        r#"SELECT spec AS "spec: sqlx::types::Json<common::spec::JobSpec>" FROM jobs WHERE id = $1"#,
        job_id
    )
    .fetch_optional(pool)
    .await
    .doing("reading the job's kind")?;
    spec.map(|s| s.0).ok_or(Error::JobNotFound(job_id))
}

/// A job's kind as far as its stages go: the spec and each stage's template
/// and schema (not the kind's own template and schema).
pub async fn job_kind_stages(pool: &PgPool, job_id: Uuid) -> Result<common::spec::JobKind, Error> {
    let row = sqlx::query!(
        r#"SELECT spec AS "spec: sqlx::types::Json<common::spec::JobSpec>",
                  stage_files AS "stage_files: sqlx::types::Json<Vec<common::stages::StageFiles>>"
           FROM jobs WHERE id = $1"#,
        job_id
    )
    .fetch_optional(pool)
    .await
    .doing("reading the job's kind")?
    .ok_or(Error::JobNotFound(job_id))?;
    Ok(common::spec::JobKind {
        spec: row.spec.0,
        template: String::new(),
        schema: serde_json::Value::Null,
        stage_files: row.stage_files.0,
    })
}

/// Whether a job reuses answers (cache and identical items).
pub async fn job_reuses(pool: &PgPool, job_id: Uuid) -> Result<bool, Error> {
    sqlx::query_scalar!("SELECT reuse FROM jobs WHERE id = $1", job_id)
        .fetch_optional(pool)
        .await
        .doing("reading the job's settings")?
        .ok_or(Error::JobNotFound(job_id))
}

/// Splits `total` items into chunks of `size`, returning how many were made.
pub async fn create_chunks(
    tx: &mut Transaction<'_, Postgres>,
    job_id: Uuid,
    total: i64,
    size: i64,
) -> Result<u64, Error> {
    let n = sqlx::query!(
        "INSERT INTO chunks (job_id, chunk_no, first_seq, last_seq)
         SELECT $1, g, g * $2 + 1, LEAST((g + 1) * $2, $3)
         FROM generate_series(0, (($3::bigint + $2::bigint - 1) / $2::bigint) - 1) AS g",
        job_id,
        size,
        total
    )
    .execute(&mut **tx)
    .await
    .doing("creating chunks")?
    .rows_affected();
    Ok(n)
}

/// Up to `limit` unpublished pending chunks of every running job, the
/// oldest job first and each job's chunks in order.
pub async fn unpublished_chunks(pool: &PgPool, limit: i64) -> Result<Vec<ChunkMsg>, Error> {
    let chunks = sqlx::query_as!(
        ChunkMsg,
        "SELECT c.job_id, c.chunk_no, c.first_seq, c.last_seq, c.generation
         FROM jobs j CROSS JOIN LATERAL (
             SELECT * FROM chunks c
             WHERE c.job_id = j.id AND c.state = 'pending' AND c.published_at IS NULL
             ORDER BY c.chunk_no LIMIT $1) c
         WHERE j.state = 'running'
         ORDER BY j.created_at, j.id, c.chunk_no",
        limit
    )
    .fetch_all(pool)
    .await
    .doing("reading chunks to publish")?;
    Ok(chunks)
}

/// Marks pending chunks of a job that were last published before `before` as
/// unpublished again, with their generation bumped so the new message gets a
/// fresh `Nats-Msg-Id`. Returns how many.
pub async fn reopen_lost_chunks(pool: &PgPool, job_id: Uuid, before: DateTime<Utc>) -> Result<u64, Error> {
    Ok(sqlx::query!(
        "UPDATE chunks SET generation = generation + 1, published_at = NULL
         WHERE job_id = $1 AND state = 'pending' AND published_at < $2",
        job_id,
        before
    )
    .execute(pool)
    .await
    .doing("reopening lost chunks")?
    .rows_affected())
}

/// Reopens every published chunk still pending of every running job, after
/// the stream they were published to was lost. Returns how many.
pub async fn reopen_published_chunks(pool: &PgPool) -> Result<u64, Error> {
    Ok(sqlx::query!(
        "UPDATE chunks c SET generation = generation + 1, published_at = NULL
         FROM jobs j WHERE j.id = c.job_id AND j.state = 'running'
           AND c.state = 'pending' AND c.published_at IS NOT NULL"
    )
    .execute(pool)
    .await
    .doing("reopening published chunks")?
    .rows_affected())
}

/// Items not yet done (no result) by job state, for the jobs that can still
/// have some: uploading, running, cancelled.
pub async fn backlog_by_job_state(pool: &PgPool) -> Result<Vec<(String, i64)>, Error> {
    Ok(sqlx::query!(
        r#"SELECT j.state, coalesce(sum(greatest(j.total_items - t.done, 0)), 0)::bigint AS "backlog!"
           FROM jobs j
           CROSS JOIN LATERAL (SELECT coalesce(sum(succeeded + failed), 0) AS done
                               FROM job_tallies WHERE job_id = j.id) t
           WHERE j.state IN ('uploading', 'running', 'paused', 'cancelled')
           GROUP BY j.state"#
    )
    .fetch_all(pool)
    .await
    .doing("reading the backlog")?
    .into_iter()
    .map(|r| (r.state, r.backlog))
    .collect())
}

/// Dollars spent by every job of each project, at the price table's prices.
pub async fn cost_by_project(pool: &PgPool) -> Result<Vec<(String, f64)>, Error> {
    Ok(sqlx::query!(
        r#"SELECT j.project, coalesce(sum(t.cost_usd), 0)::float8 AS "cost!"
           FROM job_tallies t JOIN jobs j ON j.id = t.job_id GROUP BY j.project"#
    )
    .fetch_all(pool)
    .await
    .doing("reading the cost by project")?
    .into_iter()
    .map(|r| (r.project, r.cost))
    .collect())
}

/// A capped job's spending crossing one of the alert levels.
pub struct BudgetAlert {
    pub job_id: Uuid,
    pub percent: i32,
    pub spent: f64,
    pub cap: f64,
}

/// Records the budget alerts not yet recorded (a job event each) and returns
/// them: 50, 80 and 100 percent of the cap spent; a job paused at its cap
/// counts as 100 (its next call would have passed it).
pub async fn budget_alerts(pool: &PgPool) -> Result<Vec<BudgetAlert>, Error> {
    Ok(sqlx::query_as!(
        BudgetAlert,
        r#"WITH levels AS (
               SELECT b.job_id, b.spent, b.cap_usd, b.alerted,
                      CASE WHEN b.spent >= b.cap_usd OR (j.state = 'paused' AND j.paused_reason = 'budget') THEN 100
                           WHEN b.spent >= 0.8 * b.cap_usd THEN 80
                           WHEN b.spent >= 0.5 * b.cap_usd THEN 50 ELSE 0 END AS level
               FROM job_budgets b JOIN jobs j ON j.id = b.job_id
               WHERE j.state IN ('running', 'paused')),
           raised AS (
               UPDATE job_budgets b SET alerted = l.level FROM levels l
               WHERE b.job_id = l.job_id AND l.level > b.alerted
               RETURNING b.job_id, l.alerted AS was, l.level, l.spent, l.cap_usd),
           crossed AS (
               SELECT r.job_id, p.percent, r.spent, r.cap_usd FROM raised r
               CROSS JOIN UNNEST(ARRAY[50, 80, 100]) AS p(percent)
               WHERE p.percent > r.was AND p.percent <= r.level),
           recorded AS (
               INSERT INTO audit_events (job_id, event, actor, detail, job_time)
               SELECT job_id, 'budget_alert', 'sluice',
                      jsonb_build_object('percent', percent, 'spent_usd', spent, 'cap_usd', cap_usd), job_time(job_id)
               FROM crossed)
           SELECT job_id AS "job_id!", percent AS "percent!", spent AS "spent!", cap_usd AS "cap!" FROM crossed"#
    )
    .fetch_all(pool)
    .await
    .doing("recording budget alerts")?)
}

/// Jobs paused at their spending cap.
pub async fn paused_at_cap(pool: &PgPool) -> Result<i64, Error> {
    Ok(sqlx::query_scalar!(r#"SELECT count(*) AS "n!" FROM jobs WHERE state = 'paused' AND paused_reason = 'budget'"#)
        .fetch_one(pool)
        .await
        .doing("counting paused jobs")?)
}

/// Results waiting for a reviewer, in every job.
pub async fn review_queue_size(pool: &PgPool) -> Result<i64, Error> {
    Ok(sqlx::query_scalar!(r#"SELECT coalesce(sum(needs_review), 0)::bigint AS "n!" FROM job_tallies"#)
        .fetch_one(pool)
        .await
        .doing("reading the review queue's size")?)
}

/// What a running job asks of the workers, for the autoscaling figure.
#[derive(Debug, Clone, PartialEq)]
pub struct JobDemand {
    /// The job's model, as its kind names it.
    pub model: String,
    /// Items without a result.
    pub backlog: u64,
    /// Results so far, and the tokens their attempts used.
    pub calls: u64,
    pub tokens: u64,
    /// Mean latency of its latest results, in seconds.
    pub recent_latency_s: Option<f64>,
}

/// The demand of every running job.
pub async fn running_job_demand(pool: &PgPool) -> Result<Vec<JobDemand>, Error> {
    let rows = sqlx::query!(
        r#"SELECT j.spec->>'model' AS "model!",
                  greatest(j.total_items - t.done, 0)::bigint AS "backlog!",
                  t.done::bigint AS "calls!", t.tokens::bigint AS "tokens!",
                  (SELECT avg(r.latency_ms)::float8 / 1000.0
                   FROM (SELECT latency_ms FROM results WHERE job_id = j.id ORDER BY seq DESC LIMIT 200) r)
                   AS recent_latency_s
           FROM jobs j
           CROSS JOIN LATERAL (SELECT coalesce(sum(succeeded + failed), 0) AS done,
                                      coalesce(sum(tokens_in + tokens_out), 0) AS tokens
                               FROM job_tallies WHERE job_id = j.id) t
           WHERE j.state = 'running'"#
    )
    .fetch_all(pool)
    .await
    .doing("reading the running jobs' demand")?;
    Ok(rows
        .into_iter()
        .map(|r| JobDemand {
            model: r.model,
            backlog: r.backlog as u64,
            calls: r.calls as u64,
            tokens: r.tokens as u64,
            recent_latency_s: r.recent_latency_s,
        })
        .collect())
}

/// How many jobs completed after `after`, and the latest completion time among them.
pub async fn jobs_completed_after(pool: &PgPool, after: DateTime<Utc>) -> Result<(u64, Option<DateTime<Utc>>), Error> {
    let row = sqlx::query!(
        r#"SELECT count(*) AS "count!", max(finished_at) AS latest FROM jobs
           WHERE state = 'completed' AND finished_at > $1"#,
        after
    )
    .fetch_one(pool)
    .await
    .doing("counting completed jobs")?;
    Ok((row.count as u64, row.latest))
}

/// Records that chunks were published.
pub async fn mark_published(pool: &PgPool, job_id: Uuid, chunk_nos: &[i32]) -> Result<(), Error> {
    sqlx::query!("UPDATE chunks SET published_at = now() WHERE job_id = $1 AND chunk_no = ANY($2)", job_id, chunk_nos)
        .execute(pool)
        .await
        .doing("marking chunks published")?;
    Ok(())
}

/// The running jobs and their projects, oldest first.
pub async fn running_job_projects(pool: &PgPool) -> Result<Vec<(Uuid, String)>, Error> {
    Ok(sqlx::query!("SELECT id, project FROM jobs WHERE state = 'running' ORDER BY created_at, id")
        .fetch_all(pool)
        .await
        .doing("listing running jobs' projects")?
        .into_iter()
        .map(|r| (r.id, r.project))
        .collect())
}

/// Progress of one job, computed from Postgres.
pub async fn status(pool: &PgPool, job_id: Uuid) -> Result<JobStatus, Error> {
    statuses(pool, &[job_id]).await?.pop().ok_or(Error::JobNotFound(job_id))
}

/// The status of each of `ids` that exists, in the order given. The figures
/// come from the running tallies that triggers keep as results and attempts
/// are written (migration `0008_tallies.sql`), so a read costs the same
/// whatever the size of the jobs.
async fn statuses(pool: &PgPool, ids: &[Uuid]) -> Result<Vec<JobStatus>, Error> {
    const DOING: &str = "reading job status";
    let rows = sqlx::query_as!(
        StatusRow,
        r#"SELECT j.id, j.kind, j.project, j.state, j.input_name, j.total_items, j.invalid_lines,
                j.created_at, j.started_at, j.finished_at,
                j.review_below, j.spec->>'confidence_threshold' AS kind_threshold,
                j.paused_reason, j.reuse, b.cap_usd AS "cap_usd?", b.spent AS "spent?", b.reserved AS "reserved?",
                t.cache_hits AS "cache_hits!", t.shared AS "shared!",
                t.succeeded AS "succeeded!", t.needs_review AS "needs_review!", t.reviewed AS "reviewed!",
                t.failed AS "failed!", t.last_result_at,
                t.tokens_in AS "tokens_in!", t.tokens_out AS "tokens_out!", t.cost_usd AS "cost_usd!",
                t.unpriced AS "unpriced!", t.chunks_total AS "chunks_total!", t.chunks_done AS "chunks_done!",
                jsonb_path_query_array(j.spec, '$.stages[*].name') AS "stage_names!: sqlx::types::Json<Vec<String>>"
         FROM UNNEST($1::uuid[]) WITH ORDINALITY AS wanted(id, n)
         JOIN jobs j ON j.id = wanted.id
         CROSS JOIN LATERAL (
             SELECT coalesce(sum(succeeded), 0)::bigint AS succeeded,
                    coalesce(sum(needs_review), 0)::bigint AS needs_review,
                    coalesce(sum(reviewed), 0)::bigint AS reviewed,
                    coalesce(sum(failed), 0)::bigint AS failed,
                    max(last_result_at) AS last_result_at,
                    coalesce(sum(tokens_in), 0)::bigint AS tokens_in,
                    coalesce(sum(tokens_out), 0)::bigint AS tokens_out,
                    coalesce(sum(cost_usd), 0)::float8 AS cost_usd,
                    coalesce(sum(unpriced), 0)::bigint AS unpriced,
                    coalesce(sum(cache_hits), 0)::bigint AS cache_hits,
                    coalesce(sum(shared), 0)::bigint AS shared,
                    coalesce(sum(chunks_total), 0)::bigint AS chunks_total,
                    coalesce(sum(chunks_done), 0)::bigint AS chunks_done
             FROM job_tallies WHERE job_id = j.id) t
         LEFT JOIN job_budgets b ON b.job_id = j.id
         ORDER BY wanted.n"#,
        ids
    )
    .fetch_all(pool)
    .await
    .doing(DOING)?;
    let staged: Vec<(Uuid, Vec<String>)> =
        rows.iter().filter(|r| !r.stage_names.0.is_empty()).map(|r| (r.id, r.stage_names.0.clone())).collect();
    let mut out: Vec<JobStatus> = rows.into_iter().map(status_from_row).collect();
    for (id, names) in staged {
        let stages = stage_statuses(pool, id, names).await?;
        if let Some(s) = out.iter_mut().find(|s| s.job_id == id) {
            s.stages = stages;
        }
    }
    let sources = sqlx::query!(
        r#"SELECT job_id, strategy, sum(n)::bigint AS "n!", max(note) AS note
         FROM job_confidence_sources WHERE job_id = ANY($1)
         GROUP BY 1, 2 HAVING sum(n) > 0 ORDER BY 1, 3 DESC, 2"#,
        ids
    )
    .fetch_all(pool)
    .await
    .doing(DOING)?;
    let modes = sqlx::query!(
        r#"SELECT job_id, provider, model, output_mode, sum(n)::bigint AS "n!" FROM job_output_modes
         WHERE job_id = ANY($1) GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4"#,
        ids
    )
    .fetch_all(pool)
    .await
    .doing(DOING)?;
    // Provider batches: those not yet collected and the items they hold;
    // the items the others answered and what that saved.
    let batches = sqlx::query!(
        r#"SELECT job_id, count(*) FILTER (WHERE state IN ('submitting', 'pending')) AS "batches!",
                  coalesce(sum(cardinality(seqs)) FILTER (WHERE state IN ('submitting', 'pending')), 0)::bigint AS "items!",
                  coalesce(sum(answered), 0)::bigint AS "answered!",
                  coalesce(sum(live_cost_usd - cost_usd), 0)::float8 AS "saved!"
         FROM provider_batches WHERE job_id = ANY($1) GROUP BY 1"#,
        ids
    )
    .fetch_all(pool)
    .await
    .doing(DOING)?;
    for status in &mut out {
        let id = status.job_id;
        if let Some(b) = batches.iter().find(|b| b.job_id == id) {
            status.batches_pending = b.batches as u64;
            status.batch_items_pending = b.items as u64;
            status.batch_items_done = b.answered as u64;
            status.batch_saved_usd = b.saved;
        }
        status.confidence_sources = sources
            .iter()
            .filter(|r| r.job_id == id)
            .map(|r| ConfidenceSource { strategy: r.strategy.clone(), results: r.n as u64, note: r.note.clone() })
            .collect();
        status.output_modes = modes
            .iter()
            .filter(|r| r.job_id == id)
            .map(|r| OutputModeUse {
                provider: r.provider.clone(),
                model: r.model.clone(),
                mode: r.output_mode.clone(),
                attempts: r.n as u64,
            })
            .collect();
    }
    Ok(out)
}

/// Where a multi-stage job's items stand at each of its stages `names`,
/// from the running tallies (migration 0019): a fixed number of rows
/// whatever the job's size.
async fn stage_statuses(pool: &PgPool, job_id: Uuid, names: Vec<String>) -> Result<Vec<StageStatus>, Error> {
    let rows = sqlx::query!(
        r#"SELECT stage AS "stage!", sum(passed)::bigint AS "passed!", sum(answers)::bigint AS "answers!",
                  sum(needs_review)::bigint AS "needs_review!", sum(failed)::bigint AS "failed!",
                  sum(waiting)::bigint AS "waiting!", sum(attempts)::bigint AS "attempts!", sum(cost_usd)::float8 AS "cost!"
           FROM job_stage_tallies WHERE job_id = $1
           GROUP BY stage ORDER BY stage"#,
        job_id
    )
    .fetch_all(pool)
    .await
    .doing("reading the job's stages")?;
    Ok(names
        .into_iter()
        .enumerate()
        .map(|(i, name)| {
            let r = rows.iter().find(|r| r.stage as usize == i);
            StageStatus {
                name,
                passed: r.map_or(0, |r| r.passed as u64),
                answers: r.map_or(0, |r| r.answers as u64),
                needs_review: r.map_or(0, |r| r.needs_review as u64),
                failed: r.map_or(0, |r| r.failed as u64),
                waiting: r.map_or(0, |r| r.waiting as u64),
                attempts: r.map_or(0, |r| r.attempts as u64),
                cost_usd: r.map_or(0.0, |r| r.cost),
            }
        })
        .collect())
}

/// The figures of one job, as the status query reads them.
struct StatusRow {
    id: Uuid,
    kind: String,
    project: String,
    state: String,
    input_name: Option<String>,
    total_items: i64,
    invalid_lines: i64,
    created_at: DateTime<Utc>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    review_below: Option<f64>,
    kind_threshold: Option<String>,
    succeeded: i64,
    needs_review: i64,
    reviewed: i64,
    failed: i64,
    last_result_at: Option<DateTime<Utc>>,
    tokens_in: i64,
    tokens_out: i64,
    cost_usd: f64,
    unpriced: i64,
    chunks_total: i64,
    chunks_done: i64,
    paused_reason: Option<String>,
    reuse: bool,
    cap_usd: Option<f64>,
    spent: Option<f64>,
    reserved: Option<f64>,
    cache_hits: i64,
    shared: i64,
    stage_names: sqlx::types::Json<Vec<String>>,
}

fn status_from_row(row: StatusRow) -> JobStatus {
    let total: i64 = row.total_items;
    let succeeded: i64 = row.succeeded;
    let failed: i64 = row.failed;
    let done = succeeded + failed;
    let started_at: Option<DateTime<Utc>> = row.started_at;
    let finished_at: Option<DateTime<Utc>> = row.finished_at;
    let last_result_at: Option<DateTime<Utc>> = row.last_result_at;
    // Rate over the time the job has been running: until now, or until its
    // last result once it is finished.
    let end = finished_at.max(last_result_at).filter(|_| finished_at.is_some()).unwrap_or_else(Utc::now);
    let items_per_s = match started_at {
        Some(s) if done > 0 => {
            let secs = (end - s).num_milliseconds().max(1) as f64 / 1000.0;
            done as f64 / secs
        }
        _ => 0.0,
    };
    let pending = (total - done).max(0);
    let state: String = row.state;
    let eta_s = (state == "running" && items_per_s > 0.0).then(|| pending as f64 / items_per_s);
    let cost_usd: f64 = row.cost_usd;
    let projected_cost_usd = (done > 0).then(|| cost_usd / done as f64 * total as f64);
    let review_below: Option<f64> = row.review_below;
    let kind_threshold: Option<String> = row.kind_threshold;
    JobStatus {
        job_id: row.id,
        kind: row.kind,
        project: row.project,
        state,
        input_name: row.input_name,
        total: total as u64,
        succeeded: succeeded as u64,
        needs_review: row.needs_review as u64,
        reviewed: row.reviewed as u64,
        tokens_in: row.tokens_in as u64,
        tokens_out: row.tokens_out as u64,
        cost_usd,
        projected_cost_usd,
        unpriced_attempts: row.unpriced as u64,
        confidence_sources: Vec::new(),
        output_modes: Vec::new(),
        batches_pending: 0,
        batch_items_pending: 0,
        batch_items_done: 0,
        batch_saved_usd: 0.0,
        stages: Vec::new(),
        review_below: review_below.or_else(|| kind_threshold.and_then(|t| t.parse().ok())),
        failed: failed as u64,
        pending: pending as u64,
        invalid_lines: row.invalid_lines as u64,
        chunks_total: row.chunks_total as u64,
        chunks_done: row.chunks_done as u64,
        created_at: row.created_at,
        started_at,
        finished_at,
        paused_reason: row.paused_reason,
        budget: row.cap_usd.map(|cap_usd| crate::model::Budget {
            cap_usd,
            spent_usd: row.spent.unwrap_or(0.0),
            in_flight_usd: row.reserved.unwrap_or(0.0),
        }),
        reuse: row.reuse,
        cache_hits: row.cache_hits as u64,
        shared: row.shared as u64,
        items_per_s,
        eta_s,
    }
}

/// The most recent jobs, newest first: those of `project`, or of every project.
pub async fn list_jobs(pool: &PgPool, project: Option<&str>, limit: i64) -> Result<Vec<JobStatus>, Error> {
    let ids: Vec<Uuid> = sqlx::query_scalar!(
        "SELECT id FROM jobs WHERE $1::text IS NULL OR project = $1 ORDER BY created_at DESC LIMIT $2",
        project,
        limit
    )
    .fetch_all(pool)
    .await
    .doing("listing jobs")?;
    statuses(pool, &ids).await
}

/// Stops a job: no new chunk is started; finished results stay.
pub async fn cancel(pool: &PgPool, job_id: Uuid, actor: &Actor) -> Result<(), Error> {
    let n = sqlx::query!(
        "UPDATE jobs SET state = 'cancelled', finished_at = now() WHERE id = $1 AND state IN ('uploading', 'running', 'paused')",
        job_id
    )
    .execute(pool)
    .await
    .doing("cancelling the job")?
    .rows_affected();
    if n == 0 {
        let st = status(pool, job_id).await?;
        return Err(Error::JobState { job_id, state: st.state, expected: "uploading, running or paused" });
    }
    event(pool, job_id, "cancelled", actor, serde_json::json!({})).await
}

/// Marks jobs `abandoned` whose input has not finished uploading within
/// `timeout` of their creation, and records it in the audit trail in the
/// same statement: a job is never abandoned without its event, and whoever
/// sees the state sees the event. A job being uploaded right now holds its
/// row lock and is skipped.
pub async fn abandon_stale_uploads(pool: &PgPool, timeout: Duration) -> Result<Vec<Uuid>, Error> {
    let detail = serde_json::json!({"reason": "the input never finished uploading", "timeout_s": timeout.as_secs()});
    Ok(sqlx::query_scalar!(
        "WITH abandoned AS (
             UPDATE jobs SET state = 'abandoned', finished_at = now()
             WHERE id IN (SELECT id FROM jobs
                          WHERE state = 'uploading' AND created_at < now() - make_interval(secs => $1::float8)
                          FOR UPDATE SKIP LOCKED)
             RETURNING id),
         recorded AS (
             INSERT INTO audit_events (job_id, event, actor, detail, job_time)
             SELECT id, 'abandoned', 'sluice', $2, job_time(id) FROM abandoned)
         SELECT id AS \"id!\" FROM abandoned",
        timeout.as_secs_f64(),
        detail
    )
    .fetch_all(pool)
    .await
    .doing("abandoning stale uploads")?)
}

/// Locks a job's row for the rest of the transaction and checks that it is in
/// one of the `allowed` states (`expected` says which, for the error).
pub async fn lock_job(
    tx: &mut Transaction<'_, Postgres>,
    job_id: Uuid,
    allowed: &[&str],
    expected: &'static str,
) -> Result<(), Error> {
    let state: Option<String> = sqlx::query_scalar!("SELECT state FROM jobs WHERE id = $1 FOR UPDATE", job_id)
        .fetch_optional(&mut **tx)
        .await
        .doing("locking the job")?;
    match state {
        None => Err(Error::JobNotFound(job_id)),
        Some(s) if allowed.contains(&s.as_str()) => Ok(()),
        Some(state) => Err(Error::JobState { job_id, state, expected }),
    }
}

/// What `resume` reopened.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Resumed {
    /// Failed results removed so their items run again.
    pub failed_reset: u64,
    /// Chunks reopened.
    pub chunks: u64,
}

/// Re-runs the unfinished items of a completed, cancelled or paused job:
/// items without a result, and failed ones (only failed ones with
/// `failed_only`). Items with a successful result are never sent to the
/// model again. `max_cost` sets or raises the job's spending cap; a job
/// paused at its cap needs one above what it has spent.
pub async fn resume(
    pool: &PgPool,
    job_id: Uuid,
    failed_only: bool,
    max_cost: Option<f64>,
    max_active: u32,
    actor: &Actor,
) -> Result<Resumed, Error> {
    let mut tx = pool.begin().await.doing("resuming the job")?;
    if let Some(project) = job_project(pool, job_id).await? {
        check_active_jobs(&mut tx, &project, max_active).await?;
    }
    lock_job(&mut tx, job_id, &["completed", "cancelled", "paused"], "completed, cancelled or paused").await?;
    let paused = budget_for_resume(&mut tx, job_id, max_cost).await?;
    if paused {
        // Workers dropped the paused job's deliveries: publish its pending
        // chunks again, under a new generation so a late old delivery stays idle.
        sqlx::query!(
            "UPDATE chunks SET published_at = NULL, generation = generation + 1 WHERE job_id = $1 AND state = 'pending'",
            job_id
        )
        .execute(&mut *tx)
        .await
        .doing("resuming the job")?;
        sqlx::query!("UPDATE jobs SET state = 'running', paused_reason = NULL WHERE id = $1", job_id)
            .execute(&mut *tx)
            .await
            .doing("resuming the job")?;
    }
    let failed: Vec<i64> =
        sqlx::query_scalar!("DELETE FROM results WHERE job_id = $1 AND state = 'failed' RETURNING seq", job_id)
            .fetch_all(&mut *tx)
            .await
            .doing("resuming the job")?;
    // Reopen every chunk with an item lacking a result (or, with failed_only,
    // every chunk that held a failed item).
    let chunks = sqlx::query!(
        "UPDATE chunks c SET state = 'pending', published_at = NULL, done_at = NULL, generation = generation + 1
         WHERE c.job_id = $1
           AND CASE WHEN $2 THEN EXISTS (SELECT 1 FROM UNNEST($3::bigint[]) AS f(seq)
                                         WHERE f.seq BETWEEN c.first_seq AND c.last_seq)
               ELSE EXISTS (SELECT 1 FROM items i WHERE i.job_id = c.job_id
                              AND i.seq BETWEEN c.first_seq AND c.last_seq
                              AND NOT EXISTS (SELECT 1 FROM results r WHERE r.job_id = i.job_id AND r.seq = i.seq))
               END",
        job_id,
        failed_only,
        &failed
    )
    .execute(&mut *tx)
    .await
    .doing("resuming the job")?
    .rows_affected();
    if chunks > 0 {
        sqlx::query!("UPDATE jobs SET state = 'running', finished_at = NULL WHERE id = $1", job_id)
            .execute(&mut *tx)
            .await
            .doing("resuming the job")?;
    }
    tx.commit().await.doing("resuming the job")?;
    let detail = serde_json::json!({"failed_only": failed_only, "failed_reset": failed.len(), "chunks": chunks,
                                    "max_cost_usd": max_cost});
    event(pool, job_id, "resumed", actor, detail).await?;
    Ok(Resumed { failed_reset: failed.len() as u64, chunks })
}

/// Sets or raises the cap of a job being resumed and counts its spending
/// anew from the audit trail (reservations of calls cut off are dropped).
/// Returns whether the job is paused.
async fn budget_for_resume(
    tx: &mut Transaction<'_, Postgres>,
    job_id: Uuid,
    max_cost: Option<f64>,
) -> Result<bool, Error> {
    const DOING: &str = "resuming the job";
    let row = sqlx::query!(
        r#"SELECT j.state, b.cap_usd AS "cap_usd?",
                  (SELECT coalesce(sum(cost_usd), 0) FROM job_tallies t WHERE t.job_id = j.id)::float8 AS "spent!"
           FROM jobs j LEFT JOIN job_budgets b ON b.job_id = j.id WHERE j.id = $1"#,
        job_id
    )
    .fetch_one(&mut **tx)
    .await
    .doing(DOING)?;
    let paused = row.state == "paused";
    let cap = match (max_cost, row.cap_usd) {
        (Some(c), _) if c <= row.spent => {
            return Err(Error::Invalid(format!(
                "the job has spent ${:.4}: a cap of ${c:.4} would stop it at once; pass a higher --max-cost",
                row.spent
            )))
        }
        (Some(c), _) => Some(c),
        (None, Some(c)) if paused => {
            return Err(Error::Invalid(format!(
                "the job is paused at its cap (${c:.4}, ${:.4} spent): pass --max-cost with a higher cap to go on",
                row.spent
            )))
        }
        (None, c) => c,
    };
    if let Some(cap) = cap {
        sqlx::query!(
            "INSERT INTO job_budgets (job_id, cap_usd, spent, reserved, alerted) VALUES ($1, $2::float8, $3::float8, 0,
                 CASE WHEN $3::float8 >= $2::float8 THEN 100 WHEN $3::float8 >= 0.8 * $2::float8 THEN 80
                      WHEN $3::float8 >= 0.5 * $2::float8 THEN 50 ELSE 0 END)
             ON CONFLICT (job_id) DO UPDATE SET cap_usd = EXCLUDED.cap_usd, spent = EXCLUDED.spent, reserved = 0,
                 alerted = EXCLUDED.alerted",
            job_id,
            cap,
            row.spent
        )
        .execute(&mut **tx)
        .await
        .doing(DOING)?;
    }
    Ok(paused)
}

/// One exported result.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ResultRow {
    pub id: String,
    pub state: String,
    /// The final answer: the reviewer's if there is one, else the model's.
    pub answer: Option<String>,
    /// `model`, or `human:<reviewer>` when a reviewer decided.
    pub answer_source: Option<String>,
    pub model_answer: Option<String>,
    pub reviewed_at: Option<DateTime<Utc>>,
    pub output: Option<Value>,
    pub confidence: Option<f64>,
    pub error_class: Option<String>,
    pub error: Option<String>,
    pub model: Option<String>,
    pub attempts: i32,
    pub template_hash: String,
    pub tokens_in: i32,
    pub tokens_out: i32,
    /// Dollars spent on the item: every attempt ever made for it (earlier
    /// runs of a resumed job included), at the price table's prices; `None`
    /// when an attempt used a model without a price.
    #[serde(default)]
    pub cost_usd: Option<f64>,
    /// The call that gave the answer (its audit trail id).
    #[serde(skip)]
    pub answered_by: Option<Uuid>,
    /// When the result was written.
    #[serde(skip)]
    pub created_at: Option<DateTime<Utc>>,
}

/// Up to `limit` results of a job with `seq > after`, in input order.
pub async fn results_page(pool: &PgPool, job_id: Uuid, after: i64, limit: i64) -> Result<Vec<(i64, ResultRow)>, Error> {
    let rows = sqlx::query!(
        r#"SELECT r.seq, r.item_id, r.state, r.answer, r.output, r.confidence, r.error_class, r.error, r.model,
                r.attempts, r.template_hash, r.tokens_in, r.tokens_out, r.human_answer, r.reviewer, r.reviewed_at,
                r.answered_by, r.created_at,
                CASE WHEN c.unpriced THEN NULL ELSE c.cost END AS cost_usd
         FROM results r
         CROSS JOIN LATERAL (SELECT coalesce(sum(a.cost_usd), 0)::float8 AS cost,
                                    coalesce(bool_or(a.cost_usd IS NULL), false) AS unpriced
                             FROM audit_attempts a WHERE a.job_id = r.job_id AND a.seq = r.seq) c
         WHERE r.job_id = $1 AND r.seq > $2 ORDER BY r.seq LIMIT $3"#,
        job_id,
        after,
        limit
    )
    .fetch_all(pool)
    .await
    .doing("reading a page of results")?;
    Ok(rows
        .into_iter()
        .map(|row| {
            (
                row.seq,
                ResultRow {
                    id: row.item_id,
                    state: row.state,
                    answer: row.human_answer.or_else(|| row.answer.clone()),
                    answer_source: match row.reviewer {
                        Some(r) => Some(format!("human:{r}")),
                        None => row.answer.as_ref().map(|_| "model".to_string()),
                    },
                    model_answer: row.answer,
                    reviewed_at: row.reviewed_at,
                    output: row.output,
                    confidence: row.confidence,
                    error_class: row.error_class,
                    error: row.error,
                    model: row.model,
                    attempts: row.attempts,
                    template_hash: row.template_hash,
                    tokens_in: row.tokens_in,
                    tokens_out: row.tokens_out,
                    cost_usd: row.cost_usd,
                    answered_by: row.answered_by,
                    created_at: Some(row.created_at),
                },
            )
        })
        .collect())
}
