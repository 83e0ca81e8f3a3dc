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

/// The chunk's items that have no result yet, less those identical to an
/// earlier item (they get its result when it is written). With `earlier_attempts` (a
/// redelivery, a reopened chunk) each item's attempts already in the audit
/// trail are counted, so numbering goes on; a first delivery has none.
///
/// The results side names the chunk's range too: while a job's tables grow
/// faster than autovacuum analyses them, the planner may pick a merge anti
/// join that would otherwise read every result of the job for each chunk.
/// Both name the job's month (`job_time`), so only its partition is read
/// (migration 0020).
pub async fn items(pool: &PgPool, c: &ChunkMsg, earlier_attempts: bool) -> Result<Vec<Item>, Error> {
    Ok(sqlx::query_as!(
        Item,
        r#"SELECT i.seq, i.item_id AS id, i.payload,
                  CASE WHEN $4 THEN (SELECT count(*) FROM audit_attempts a
                                     WHERE a.job_id = i.job_id AND a.seq = i.seq AND a.job_time = job_time($1))::int
                       ELSE 0 END AS "prior!"
           FROM items i
           WHERE i.job_id = $1 AND i.seq BETWEEN $2 AND $3
             AND NOT EXISTS (SELECT 1 FROM results r
                             WHERE r.job_id = $1 AND r.seq BETWEEN $2 AND $3 AND r.seq = i.seq
                               AND r.job_time = job_time($1))
             AND NOT EXISTS (SELECT 1 FROM item_copies d WHERE d.job_id = $1 AND d.seq = i.seq)
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
    /// Where the answer came from: `model`, or `cache` (see `reused`).
    pub source: &'static str,
    /// The call whose answer this is (the item's own, or the cached one's).
    pub answered_by: Option<uuid::Uuid>,
    /// The response cache key of the item's request, when the job reuses answers.
    pub cache_key: Option<String>,
    /// For an answer from the cache: what its audit row records.
    pub reused: Option<Box<Reused>>,
    /// For a multi-stage job: the stage this result is of.
    pub stage: Option<i16>,
    /// The accepted answer of a stage before the last: the item goes on, and
    /// this is written to `stage_results`, not `results`.
    pub goes_on: bool,
    /// With `goes_on`: a gate holds the item at this stage for a reviewer.
    pub held: bool,
    /// With `goes_on`: the segment of the item this answer is of (stages
    /// between a split and its reduce), else 0.
    pub seg: i32,
}

/// The audit facts of an answer taken from the response cache.
#[derive(Debug, Clone)]
pub struct Reused {
    pub attempt: i32,
    pub provider: String,
    /// The prompt, redacted.
    pub prompt: String,
}

/// An answer in the response cache.
pub struct Cached {
    pub key: String,
    pub call_id: uuid::Uuid,
    pub model: Option<String>,
    pub output: Value,
    pub answer: Option<String>,
    pub confidence: Option<f64>,
    pub confidence_detail: Option<Value>,
}

/// The cached answers of `keys` (hex digests) in `project` no older than
/// `ttl_s`, read from the results their entries name.
pub async fn cached(pool: &PgPool, project: &str, keys: &[String], ttl_s: i64) -> Result<Vec<Cached>, Error> {
    let digests: Vec<Vec<u8>> = keys.iter().map(|k| hex::decode(k).expect("a cache key is hex")).collect();
    Ok(sqlx::query_as!(
        Cached,
        r#"SELECT encode(c.key, 'hex') AS "key!", r.answered_by AS "call_id!", r.model, r.output AS "output!",
                  r.answer, r.confidence, r.confidence_detail
           FROM response_cache c
           JOIN results r ON r.job_id = c.job_id AND r.seq = c.seq AND r.job_time = job_time(c.job_id)
           WHERE c.project = $1 AND c.key = ANY($2)
             AND c.created_at > now() - make_interval(secs => $3::float8)
             AND r.output IS NOT NULL AND r.answered_by IS NOT NULL"#,
        project,
        &digests,
        ttl_s as f64
    )
    .fetch_all(pool)
    .await
    .doing("reading the response cache")?)
}

/// Reserves `usd` of a capped job's budget; false when the job is paused at its cap.
pub async fn reserve_budget(pool: &PgPool, job_id: uuid::Uuid, usd: f64) -> Result<bool, Error> {
    Ok(sqlx::query_scalar!(r#"SELECT reserve_budget($1, $2) AS "ok!""#, job_id, usd)
        .fetch_one(pool)
        .await
        .doing("reserving the job's budget")?)
}

/// Returns a reservation of `reserved` dollars and adds `spent`.
pub async fn settle_budget(pool: &PgPool, job_id: uuid::Uuid, reserved: f64, spent: f64) -> Result<(), Error> {
    // `execute`, not `fetch_one`: the function returns void, a type whose
    // value the client is not asked to decode.
    sqlx::query!("SELECT settle_budget($1, $2, $3)", job_id, reserved, spent)
        .execute(pool)
        .await
        .doing("settling the job's budget")?;
    Ok(())
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
            source: "model",
            answered_by: None,
            cache_key: None,
            reused: None,
            stage: None,
            goes_on: false,
            held: false,
            seg: 0,
        }
    }
}

/// Where a chunk's results go: the chunk, its job's template and project.
pub struct Target<'a> {
    pub chunk: &'a ChunkMsg,
    pub template_hash: &'a str,
    pub project: &'a str,
    pub worker: &'a str,
    /// The job has identical items to fill in (`item_copies`).
    pub copies: bool,
}

/// Writes results of a chunk and, when `done`, marks it done, in one transaction.
///
/// Results are upserted on (job, seq) and never overwritten, so a redelivered
/// chunk processed twice leaves exactly one row per item. The caller has made
/// sure the items' attempts are in the audit trail; `attempts` counts them
/// over every delivery. In the same transaction: the audit rows of answers
/// taken from the cache, the cache entries of new answers, and the results
/// of the items identical to these (`item_copies`).
pub async fn write_chunk(pool: &PgPool, t: &Target<'_>, results: &[ItemResult], done: bool) -> Result<(), Error> {
    Ok(write_chunk_tx(pool, t, results, done).await.doing("writing the chunk's results")?)
}

async fn write_chunk_tx(pool: &PgPool, t: &Target<'_>, results: &[ItemResult], done: bool) -> Result<(), sqlx::Error> {
    let (c, template_hash, worker) = (t.chunk, t.template_hash, t.worker);
    let mut tx = pool.begin().await?;
    fn col<T>(results: &[&ItemResult], f: impl Fn(&ItemResult) -> T) -> Vec<T> {
        results.iter().map(|r| f(r)).collect()
    }
    let (all, staged): (Vec<&ItemResult>, Vec<&ItemResult>) = results.iter().partition(|r| !r.goes_on);
    if !staged.is_empty() {
        write_stages(&mut tx, c.job_id, worker, &staged).await?;
    }
    let results = &all[..];
    if !results.is_empty() {
        // The answers worth caching, one per key (a statement may not upsert
        // one row twice): each model answer of a job that reuses answers.
        let mut keys = std::collections::HashSet::new();
        let fresh: Vec<&ItemResult> = results
            .iter()
            .copied()
            .filter(|r| r.succeeded && r.source == "model" && r.answered_by.is_some())
            .filter(|r| r.cache_key.as_ref().is_some_and(|k| keys.insert(k.clone())))
            .collect();
        // One statement writes the results and the cache entries naming
        // them. A newer answer replaces an entry, which may have outlived its TTL.
        sqlx::query!(
            "WITH written AS (
                 INSERT INTO results (job_id, seq, item_id, state, output, answer, confidence, error_class, error,
                                      model, template_hash, attempts, tokens_in, tokens_out, latency_ms, worker,
                                      confidence_detail, source, answered_by, stage, job_time)
                 SELECT $1, u.seq, u.item_id, u.state, u.output, u.answer, u.confidence, u.error_class, u.error,
                        u.model, $2, u.attempts, u.tokens_in, u.tokens_out, u.latency_ms, $3, u.detail, u.source,
                        u.answered_by, u.stage, job_time($1)
                 FROM UNNEST($4::bigint[], $5::text[], $6::text[], $7::jsonb[], $8::text[], $9::float8[],
                             $10::text[], $11::text[], $12::text[], $13::int[], $14::int[], $15::int[], $16::int[],
                             $17::jsonb[], $18::text[], $19::uuid[], $23::smallint[])
                      AS u(seq, item_id, state, output, answer, confidence, error_class, error, model,
                           attempts, tokens_in, tokens_out, latency_ms, detail, source, answered_by, stage)
                 ON CONFLICT (job_id, seq, job_time) DO NOTHING
                 RETURNING seq)
             INSERT INTO response_cache (project, key, job_id, seq)
             SELECT $20, decode(k.key, 'hex'), $1, w.seq
             FROM written w JOIN UNNEST($21::bigint[], $22::text[]) AS k(seq, key) ON k.seq = w.seq
             ON CONFLICT (key) DO UPDATE SET created_at = now(), job_id = EXCLUDED.job_id, seq = EXCLUDED.seq",
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
            &col(results, |r| r.source.to_string()),
            &col(results, |r| r.answered_by) as _,
            t.project,
            &col(&fresh, |r| r.seq),
            &col(&fresh, |r| r.cache_key.clone().unwrap_or_default()),
            &col(results, |r| r.stage) as _,
        )
        .execute(&mut *tx)
        .await?;
        let hits: Vec<&ItemResult> = results.iter().copied().filter(|r| r.reused.is_some()).collect();
        if !hits.is_empty() {
            let reused = |f: fn(&Reused) -> String| -> Vec<String> {
                hits.iter().map(|r| f(r.reused.as_deref().expect("a cache hit"))).collect()
            };
            sqlx::query!(
                "INSERT INTO audit_attempts (worker, job_id, template_hash, seq, item_id, call_id, attempt, model,
                                             fallback, request_hash, outcome, latency_ms, tokens_in, tokens_out,
                                             cost_usd, api_key_id, prompt, output, provider, reused_call, job_time)
                 SELECT $1, $2, $3, u.seq, u.item_id, gen_random_uuid(), u.attempt, coalesce(u.model, ''), false,
                        u.key, 'cache', 0, 0, 0, 0, '', u.prompt, NULL, u.provider, u.reused_call, job_time($2)
                 FROM UNNEST($4::bigint[], $5::text[], $6::int[], $7::text[], $8::text[], $9::text[], $10::text[],
                             $11::uuid[]) AS u(seq, item_id, attempt, model, key, prompt, provider, reused_call)",
                worker,
                c.job_id,
                template_hash,
                &col(&hits, |r| r.seq),
                &col(&hits, |r| r.item_id.clone()),
                &col(&hits, |r| r.reused.as_ref().map_or(0, |u| u.attempt)),
                &col(&hits, |r| r.model.clone()) as _,
                &col(&hits, |r| r.cache_key.as_deref().map_or(String::new(), |k| k[..16].to_string())),
                &reused(|u| u.prompt.clone()),
                &reused(|u| u.provider.clone()),
                &col(&hits, |r| r.answered_by) as _,
            )
            .execute(&mut *tx)
            .await?;
        }
    }
    if t.copies && !results.is_empty() {
        let seqs: Vec<i64> = results.iter().map(|r| r.seq).collect();
        // Items identical to these share their result; answered ones get an
        // audit row naming the call they share.
        sqlx::query!(
            "WITH copied AS (
                 INSERT INTO results (job_id, seq, item_id, state, output, answer, confidence, error_class, error,
                                      model, template_hash, attempts, tokens_in, tokens_out, latency_ms, worker,
                                      confidence_detail, source, answered_by, job_time)
                 SELECT $1, d.seq, i.item_id, r.state, r.output, r.answer, r.confidence, r.error_class, r.error,
                        r.model, r.template_hash, 0, 0, 0, 0, $2, r.confidence_detail, 'shared', r.answered_by,
                        job_time($1)
                 FROM item_copies d
                 JOIN results r ON r.job_id = d.job_id AND r.seq = d.original_seq AND r.job_time = job_time($1)
                 JOIN items i ON i.job_id = d.job_id AND i.seq = d.seq
                 WHERE d.job_id = $1 AND d.original_seq = ANY($3)
                 ON CONFLICT (job_id, seq, job_time) DO NOTHING
                 RETURNING seq, item_id, model, answered_by, state)
             INSERT INTO audit_attempts (worker, job_id, template_hash, seq, item_id, call_id, attempt, model,
                                         fallback, request_hash, outcome, latency_ms, tokens_in, tokens_out,
                                         cost_usd, api_key_id, prompt, output, reused_call, job_time)
             SELECT $2, $1, $4, seq, item_id, gen_random_uuid(), 1, coalesce(model, ''), false, '', 'shared', 0,
                    0, 0, 0, '', '', NULL, answered_by, job_time($1)
             FROM copied WHERE state <> 'failed'",
            c.job_id,
            worker,
            &seqs,
            template_hash
        )
        // Planned for this job's copies at each run (see common::db::connect).
        .persistent(false)
        .execute(&mut *tx)
        .await?;
    }
    if done {
        sqlx::query!(
            // Not if the chunk was published again meanwhile (a gate's
            // decision, a resume): that newer delivery finishes it.
            "UPDATE chunks SET state = 'done', done_at = now()
             WHERE job_id = $1 AND chunk_no = $2 AND state = 'pending' AND generation = $3",
            c.job_id,
            c.chunk_no,
            c.generation
        )
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await
}

/// Writes the accepted answers of stages before the last (`stage_results`),
/// once each: a redelivered chunk's repeat is ignored.
async fn write_stages(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    job_id: uuid::Uuid,
    worker: &str,
    rows: &[&ItemResult],
) -> Result<(), sqlx::Error> {
    let col = |f: fn(&ItemResult) -> Option<String>| -> Vec<Option<String>> { rows.iter().map(|r| f(r)).collect() };
    sqlx::query!(
        "INSERT INTO stage_results (job_id, seq, stage, seg, state, output, answer, confidence, confidence_detail,
                                    model, attempts, tokens_in, tokens_out, latency_ms, answered_by, worker)
         SELECT $1, u.seq, u.stage, u.seg, u.state, u.output, u.answer, u.confidence, u.detail, u.model, u.attempts,
                u.tokens_in, u.tokens_out, u.latency_ms, u.answered_by, $2
         FROM UNNEST($3::bigint[], $4::smallint[], $5::text[], $6::jsonb[], $7::text[], $8::float8[], $9::jsonb[],
                     $10::text[], $11::int[], $12::int[], $13::int[], $14::int[], $15::uuid[], $16::int[])
              AS u(seq, stage, state, output, answer, confidence, detail, model, attempts, tokens_in, tokens_out,
                   latency_ms, answered_by, seg)
         ON CONFLICT (job_id, seq, stage, seg) DO NOTHING",
        job_id,
        worker,
        &rows.iter().map(|r| r.seq).collect::<Vec<_>>(),
        &rows.iter().map(|r| r.stage.unwrap_or(0)).collect::<Vec<_>>(),
        &rows.iter().map(|r| if r.held { "held" } else { r.state().as_str() }.to_string()).collect::<Vec<_>>(),
        &rows.iter().map(|r| r.output.clone().unwrap_or(Value::Null)).collect::<Vec<_>>(),
        &col(|r| r.answer.clone()) as _,
        &rows.iter().map(|r| r.confidence).collect::<Vec<_>>() as _,
        &rows.iter().map(|r| r.confidence_detail.clone()).collect::<Vec<_>>() as _,
        &col(|r| r.model.clone()) as _,
        &rows.iter().map(|r| r.attempts).collect::<Vec<_>>(),
        &rows.iter().map(|r| r.tokens_in).collect::<Vec<_>>(),
        &rows.iter().map(|r| r.tokens_out).collect::<Vec<_>>(),
        &rows.iter().map(|r| r.latency_ms).collect::<Vec<_>>(),
        &rows.iter().map(|r| r.answered_by).collect::<Vec<_>>() as _,
        &rows.iter().map(|r| r.seg).collect::<Vec<_>>(),
    )
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// A stage a multi-stage item has reached: its output, and whether the
/// item waits there for a reviewer (held, or rejected: then the item has
/// its result already).
pub struct StageOutput {
    pub seq: i64,
    pub stage: i16,
    pub seg: i32,
    pub output: Value,
    pub confidence: Option<f64>,
    pub waiting: bool,
}

/// The stages a multi-stage chunk's items have reached, by seq and stage.
pub async fn stage_outputs(pool: &PgPool, c: &ChunkMsg) -> Result<Vec<StageOutput>, Error> {
    Ok(sqlx::query_as!(
        StageOutput,
        r#"SELECT seq, stage, seg, output, confidence, state IN ('held', 'rejected') AS "waiting!" FROM stage_results
         WHERE job_id = $1 AND seq BETWEEN $2 AND $3"#,
        c.job_id,
        c.first_seq,
        c.last_seq
    )
    .fetch_all(pool)
    .await
    .doing("reading the stages the chunk's items have passed")?)
}

/// How many jobs are running.
pub async fn running_jobs(pool: &PgPool) -> Result<usize, Error> {
    let n = sqlx::query_scalar!(r#"SELECT count(*) AS "n!" FROM jobs WHERE state = 'running'"#)
        .fetch_one(pool)
        .await
        .doing("counting running jobs")?;
    Ok(n as usize)
}

/// The latest provider batch of a chunk, of any generation: a batch sent
/// before a job was paused or resumed is collected, not sent again.
pub struct BatchRow {
    pub generation: i32,
    pub round: i32,
    pub provider: String,
    pub model: String,
    pub batch_id: Option<String>,
    pub state: String,
    pub seqs: Vec<i64>,
    pub error: Option<String>,
    pub reserved_usd: f64,
    /// Seconds since the row was written.
    pub age_s: f64,
    /// The chunk's batches of the delivery's generation that counted as a
    /// round: all but those the provider refused for a full queue.
    pub rounds: i64,
}

pub async fn last_batch(pool: &PgPool, c: &ChunkMsg) -> Result<Option<BatchRow>, Error> {
    Ok(sqlx::query_as!(
        BatchRow,
        r#"SELECT generation, round, provider, model, batch_id, state, seqs, error, reserved_usd,
                  extract(epoch FROM now() - created_at)::float8 AS "age_s!",
                  (SELECT count(*) FROM provider_batches r
                   WHERE r.job_id = $1 AND r.chunk_no = $2 AND r.generation = $3 AND r.state <> 'refused') AS "rounds!"
           FROM provider_batches WHERE job_id = $1 AND chunk_no = $2
           ORDER BY generation DESC, round DESC LIMIT 1"#,
        c.job_id,
        c.chunk_no,
        c.generation
    )
    .fetch_optional(pool)
    .await
    .doing("reading the chunk's provider batch")?)
}

/// A batch about to be created.
pub struct NewBatch<'a> {
    pub round: i32,
    pub provider: &'a str,
    pub model: &'a str,
    pub seqs: &'a [i64],
    pub requests: i32,
    /// Its prompt tokens, estimated.
    pub queued_tokens: i64,
    pub reserved_usd: f64,
    /// The provider's batch queue limits for the model (0: none).
    pub queue_tokens: f64,
    pub queue_requests: f64,
}

/// What recording a batch about to be created came to.
#[derive(Debug, PartialEq)]
pub enum Opened {
    Opened,
    /// Another worker recorded this round first.
    Taken,
    /// The provider's queue for the model is too full to take the batch:
    /// what the cluster has sent and not yet collected.
    QueueFull {
        tokens: i64,
        requests: i64,
    },
}

/// Records a batch about to be created, if the provider's batch queue for
/// its model has room for it. The queue is what the cluster's batches of
/// that model still `submitting` or `pending` hold (batches older than the
/// providers' 24-hour window are left out: they have ended at the provider,
/// collected or not); an advisory lock per provider and model makes the
/// check and the insert one step across workers.
pub async fn open_batch(pool: &PgPool, c: &ChunkMsg, b: &NewBatch<'_>) -> Result<Opened, Error> {
    const DOING: &str = "recording a provider batch";
    let mut tx = pool.begin().await.doing(DOING)?;
    if b.queue_tokens > 0.0 || b.queue_requests > 0.0 {
        let lock = format!("sluice.batch_queue/{}/{}", b.provider, b.model);
        sqlx::query!("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", lock)
            .fetch_one(&mut *tx)
            .await
            .doing(DOING)?;
        let q = sqlx::query!(
            r#"SELECT coalesce(sum(queued_tokens), 0)::bigint AS "tokens!", coalesce(sum(requests), 0)::bigint AS "requests!"
               FROM provider_batches
               WHERE provider = $1 AND model = $2 AND state IN ('submitting', 'pending')
                 AND created_at > now() - interval '24 hours'"#,
            b.provider,
            b.model
        )
        .fetch_one(&mut *tx)
        .await
        .doing(DOING)?;
        let over = |queued: i64, adding: i64, limit: f64| limit > 0.0 && (queued + adding) as f64 > limit;
        if over(q.tokens, b.queued_tokens, b.queue_tokens) || over(q.requests, b.requests as i64, b.queue_requests) {
            return Ok(Opened::QueueFull { tokens: q.tokens, requests: q.requests });
        }
    }
    // Its time is when it joined the queue (after the lock), not when the transaction began.
    let inserted = sqlx::query!(
        "INSERT INTO provider_batches
             (job_id, chunk_no, generation, round, provider, model, seqs, reserved_usd, queued_tokens, requests,
              created_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, clock_timestamp()) ON CONFLICT DO NOTHING",
        c.job_id,
        c.chunk_no,
        c.generation,
        b.round,
        b.provider,
        b.model,
        b.seqs,
        b.reserved_usd,
        b.queued_tokens,
        b.requests
    )
    .execute(&mut *tx)
    .await
    .doing(DOING)?
    .rows_affected()
        == 1;
    tx.commit().await.doing(DOING)?;
    Ok(if inserted { Opened::Opened } else { Opened::Taken })
}

/// What a collected batch came to: recorded on its row for `status`.
pub struct Collected<'a> {
    pub answered: i32,
    pub cost_usd: f64,
    /// The same tokens at live prices.
    pub live_cost_usd: f64,
    /// The last failure of its requests, if any.
    pub error: Option<&'a str>,
}

/// Marks a chunk's batch collected; `false` if another worker did first.
pub async fn collected_batch(
    pool: &PgPool,
    c: &ChunkMsg,
    generation: i32,
    round: i32,
    k: &Collected<'_>,
) -> Result<bool, Error> {
    Ok(sqlx::query!(
        "UPDATE provider_batches
         SET state = 'collected', error = coalesce($5, error), ended_at = now(),
             answered = $6, cost_usd = $7, live_cost_usd = $8
         WHERE job_id = $1 AND chunk_no = $2 AND generation = $3 AND round = $4 AND state <> 'collected'",
        c.job_id,
        c.chunk_no,
        generation,
        round,
        k.error,
        k.answered,
        k.cost_usd,
        k.live_cost_usd
    )
    .execute(pool)
    .await
    .doing("updating a provider batch")?
    .rows_affected()
        == 1)
}

/// Moves a chunk's batch of `generation` and `round` to `state` (`pending` with the
/// provider's id, `failed` or `refused` with why); `false` when it was in
/// that state already (another worker moved it). Only a `submitting` batch
/// becomes `pending`: one given up meanwhile (cancelled, the deadline near)
/// stays given up, its budget already released.
pub async fn set_batch(
    pool: &PgPool,
    c: &ChunkMsg,
    generation: i32,
    round: i32,
    state: &str,
    batch_id: Option<&str>,
    error: Option<&str>,
) -> Result<bool, Error> {
    Ok(sqlx::query!(
        "UPDATE provider_batches
         SET state = $5, batch_id = coalesce($6, batch_id), error = coalesce($7, error),
             ended_at = CASE WHEN $5 IN ('collected', 'failed', 'refused') THEN now() END
         WHERE job_id = $1 AND chunk_no = $2 AND generation = $3 AND round = $4 AND state <> $5
           AND (state = 'submitting' OR $5 <> 'pending')",
        c.job_id,
        c.chunk_no,
        generation,
        round,
        state,
        batch_id,
        error
    )
    .execute(pool)
    .await
    .doing("updating a provider batch")?
    .rows_affected()
        == 1)
}
