//! Postgres reads and writes of the worker: a chunk's items in, its results out in one transaction.

use serde_json::Value;
use sqlx::PgPool;

use common::db::Doing;
use common::provider::ErrorClass;
use common::state::{ChunkState, JobState};
use common::wire::ChunkMsg;

use crate::Error;

/// The state of a chunk and of its job, read before any work is done.
pub struct ChunkStatus {
    pub chunk: ChunkState,
    pub job: JobState,
    pub generation: i32,
}

pub async fn chunk_state(pool: &PgPool, c: &ChunkMsg) -> Result<Option<ChunkStatus>, Error> {
    Ok(sqlx::query_as!(
        ChunkStatus,
        r#"SELECT c.state AS "chunk: ChunkState", j.state AS "job: JobState", c.generation
           FROM chunks c JOIN jobs j ON j.id = c.job_id
           WHERE c.job_id = $1 AND c.chunk_no = $2"#,
        c.job_id,
        c.chunk_no
    )
    .fetch_optional(pool)
    .await
    .doing("reading the chunk's state")?)
}

/// An item to process.
pub struct Item {
    pub seq: i64,
    pub id: String,
    pub payload: Value,
    /// Attempts already in the audit trail (earlier deliveries), so numbering goes on.
    pub prior: i32,
}

/// The chunk's items that have no result yet. With `earlier_attempts` (a
/// redelivery, a reopened chunk) each item's attempts already in the audit
/// trail are counted, so numbering goes on; a first delivery has none.
///
/// The results side names the chunk's range too: while a job's tables grow
/// faster than autovacuum analyses them, the planner may pick a merge anti
/// join that would otherwise read every result of the job for each chunk.
pub async fn items(pool: &PgPool, c: &ChunkMsg, earlier_attempts: bool) -> Result<Vec<Item>, Error> {
    Ok(sqlx::query_as!(
        Item,
        r#"SELECT i.seq, i.item_id AS id, i.payload,
                  CASE WHEN $4 THEN (SELECT count(*) FROM audit_attempts a WHERE a.job_id = i.job_id AND a.seq = i.seq)::int
                       ELSE 0 END AS "prior!"
           FROM items i
           WHERE i.job_id = $1 AND i.seq BETWEEN $2 AND $3
             AND NOT EXISTS (SELECT 1 FROM results r
                             WHERE r.job_id = $1 AND r.seq BETWEEN $2 AND $3 AND r.seq = i.seq)
           ORDER BY i.seq"#,
        c.job_id,
        c.first_seq,
        c.last_seq,
        earlier_attempts
    )
    .fetch_all(pool)
    .await
    .doing("reading the chunk's items")?)
}

/// One call to the model, as the audit trail keeps it.
#[derive(Debug, Clone)]
pub struct AttemptRecord {
    pub attempt: i32,
    pub model: String,
    pub fallback: bool,
    pub request_hash: String,
    pub outcome: String,
    pub error_class: Option<ErrorClass>,
    pub http_status: Option<i32>,
    pub latency_ms: i32,
    pub tokens_in: i32,
    pub tokens_out: i32,
    /// Of the input, tokens read from the provider's cache; of the output, reasoning tokens.
    pub tokens_cached: i32,
    pub tokens_reasoning: i32,
    /// `None` when the model has no price.
    pub cost_usd: Option<f64>,
    pub api_key_id: String,
    pub provider: String,
    /// How structured output was asked for (json_schema, json_object, prompt).
    pub output_mode: String,
    /// The prompt and output with personal data redacted.
    pub prompt: String,
    pub output: Option<String>,
}

/// The outcome of one item.
#[derive(Debug, Clone)]
pub struct ItemResult {
    pub seq: i64,
    pub item_id: String,
    pub succeeded: bool,
    /// Succeeded, but its confidence is below the job's review threshold.
    pub needs_review: bool,
    pub confidence_detail: Option<Value>,
    pub output: Option<Value>,
    pub answer: Option<String>,
    pub confidence: Option<f64>,
    pub error_class: Option<ErrorClass>,
    pub error: Option<String>,
    pub model: Option<String>,
    pub attempts: i32,
    pub tokens_in: i32,
    pub tokens_out: i32,
    pub latency_ms: i32,
}

impl ItemResult {
    /// The state stored in `results.state`.
    pub fn state(&self) -> common::state::ResultState {
        use common::state::ResultState;
        match (self.succeeded, self.needs_review) {
            (true, false) => ResultState::Succeeded,
            (true, true) => ResultState::NeedsReview,
            (false, _) => ResultState::Failed,
        }
    }

    /// A failed result that never reached the model.
    pub fn failed(item: &Item, class: ErrorClass, error: String) -> Self {
        ItemResult { error_class: Some(class), error: Some(error), ..ItemResult::pending(item) }
    }

    /// The result of an item before its first call: not succeeded, no error yet.
    pub fn pending(item: &Item) -> Self {
        ItemResult {
            seq: item.seq,
            item_id: item.id.clone(),
            succeeded: false,
            needs_review: false,
            confidence_detail: None,
            output: None,
            answer: None,
            confidence: None,
            error_class: None,
            error: None,
            model: None,
            attempts: item.prior,
            tokens_in: 0,
            tokens_out: 0,
            latency_ms: 0,
        }
    }
}

/// Writes results of a chunk and, when `done`, marks it done, in one transaction.
///
/// Results are upserted on (job, seq) and never overwritten, so a redelivered
/// chunk processed twice leaves exactly one row per item. The caller has made
/// sure the items' attempts are in the audit trail; `attempts` counts them
/// over every delivery.
pub async fn write_chunk(
    pool: &PgPool,
    c: &ChunkMsg,
    template_hash: &str,
    worker: &str,
    results: &[ItemResult],
    done: bool,
) -> Result<(), Error> {
    Ok(write_chunk_tx(pool, c, template_hash, worker, results, done).await.doing("writing the chunk's results")?)
}

async fn write_chunk_tx(
    pool: &PgPool,
    c: &ChunkMsg,
    template_hash: &str,
    worker: &str,
    results: &[ItemResult],
    done: bool,
) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    if !results.is_empty() {
        fn col<T>(results: &[ItemResult], f: impl Fn(&ItemResult) -> T) -> Vec<T> {
            results.iter().map(f).collect()
        }
        sqlx::query!(
            "INSERT INTO results (job_id, seq, item_id, state, output, answer, confidence, error_class, error,
                                  model, template_hash, attempts, tokens_in, tokens_out, latency_ms, worker,
                                  confidence_detail)
             SELECT $1, u.seq, u.item_id, u.state, u.output, u.answer, u.confidence, u.error_class, u.error,
                    u.model, $2, u.attempts, u.tokens_in, u.tokens_out, u.latency_ms, $3, u.detail
             FROM UNNEST($4::bigint[], $5::text[], $6::text[], $7::jsonb[], $8::text[], $9::float8[],
                         $10::text[], $11::text[], $12::text[], $13::int[], $14::int[], $15::int[], $16::int[],
                         $17::jsonb[])
                  AS u(seq, item_id, state, output, answer, confidence, error_class, error, model,
                       attempts, tokens_in, tokens_out, latency_ms, detail)
             ON CONFLICT (job_id, seq) DO NOTHING",
            c.job_id,
            template_hash,
            worker,
            &col(results, |r| r.seq),
            &col(results, |r| r.item_id.clone()),
            &col(results, |r| r.state().as_str().to_string()),
            &col(results, |r| r.output.clone()) as _,
            &col(results, |r| r.answer.clone()) as _,
            &col(results, |r| r.confidence) as _,
            &col(results, |r| r.error_class.map(|c| c.as_str().to_string())) as _,
            &col(results, |r| r.error.clone()) as _,
            &col(results, |r| r.model.clone()) as _,
            &col(results, |r| r.attempts),
            &col(results, |r| r.tokens_in),
            &col(results, |r| r.tokens_out),
            &col(results, |r| r.latency_ms),
            &col(results, |r| r.confidence_detail.clone()) as _,
        )
        .execute(&mut *tx)
        .await?;
    }
    if done {
        sqlx::query!(
            "UPDATE chunks SET state = 'done', done_at = now() WHERE job_id = $1 AND chunk_no = $2 AND state = 'pending'",
            c.job_id,
            c.chunk_no
        )
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await
}

/// How many jobs are running.
pub async fn running_jobs(pool: &PgPool) -> Result<usize, Error> {
    let n = sqlx::query_scalar!(r#"SELECT count(*) AS "n!" FROM jobs WHERE state = 'running'"#)
        .fetch_one(pool)
        .await
        .doing("counting running jobs")?;
    Ok(n as usize)
}
