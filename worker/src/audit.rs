//! The audit writer: every model call is recorded in Postgres before it is made, and its outcome as soon as it is known, in batches.
//!
//! Rows go through one task per worker that writes whatever has gathered
//! while its previous write was under way (group commit), so recording costs
//! a call a millisecond or two and the pipeline keeps its speed. A call
//! starts only once its `audit_calls` row is committed: a worker killed with
//! SIGKILL loses at most the outcomes of calls in flight, which then show as
//! calls without an attempt row. While Postgres cannot be written, no new call
//! starts: this is the worker's breaker on the database.

use common::db::Doing;
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::store::AttemptRecord;
use crate::Error;

/// What every row of one item's calls shares.
#[derive(Debug, Clone)]
pub struct ItemRef {
    pub job_id: Uuid,
    pub seq: i64,
    pub item_id: String,
    pub template_hash: String,
    /// The stage of a multi-stage job the calls belong to (0 otherwise).
    pub stage: i16,
}

/// A call about to be made.
#[derive(Debug, Clone)]
pub struct CallStart {
    pub call_id: Uuid,
    pub attempt: i32,
    pub provider: String,
    pub model: String,
    pub request_hash: String,
}

enum Row {
    /// A call about to be made; the sender hears once its row is committed.
    Call(Arc<ItemRef>, CallStart, oneshot::Sender<()>),
    Attempt(Arc<ItemRef>, Uuid, AttemptRecord),
    /// No row: answered once everything sent before it is committed.
    Flush(oneshot::Sender<()>),
}

/// The handle calls use; cheap to clone.
#[derive(Clone)]
pub struct Audit {
    tx: mpsc::UnboundedSender<Row>,
}

impl Audit {
    /// Starts the writer task for `worker` on `pool`.
    pub fn start(pool: PgPool, worker: String) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(writer(pool, worker, rx));
        Audit { tx }
    }

    /// Records a call about to be made and returns once it is committed.
    pub async fn begin(&self, item: &Arc<ItemRef>, call: CallStart) -> Result<(), Error> {
        let (done, committed) = oneshot::channel();
        self.tx.send(Row::Call(item.clone(), call, done)).map_err(|_| Error::AuditStopped)?;
        committed.await.map_err(|_| Error::AuditStopped)
    }

    /// Records the outcome of call `call_id`; committed with the next batch.
    pub fn finished(&self, item: &Arc<ItemRef>, call_id: Uuid, attempt: AttemptRecord) {
        let _ = self.tx.send(Row::Attempt(item.clone(), call_id, attempt));
    }

    /// Returns once every row recorded so far is committed.
    pub async fn flush(&self) -> Result<(), Error> {
        let (done, committed) = oneshot::channel();
        self.tx.send(Row::Flush(done)).map_err(|_| Error::AuditStopped)?;
        committed.await.map_err(|_| Error::AuditStopped)
    }
}

/// Most rows in one write.
const BATCH: usize = 2_000;

async fn writer(pool: PgPool, worker: String, mut rx: mpsc::UnboundedReceiver<Row>) {
    let mut health = common::telemetry::Health::default();
    let mut batch: Vec<Row> = Vec::new();
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let mut wait = Duration::from_millis(100);
        loop {
            match write(&pool, &worker, &batch).await {
                Ok(()) => {
                    health.ok("writing the audit trail");
                    break;
                }
                Err(e) => {
                    health.failed("writing the audit trail (no new model call starts meanwhile)", &e);
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(2));
                }
            }
        }
        for row in batch.drain(..) {
            match row {
                Row::Call(_, _, done) | Row::Flush(done) => {
                    let _ = done.send(());
                }
                Row::Attempt(..) => {}
            }
        }
    }
}

/// Writes a batch in one statement (atomic without a transaction of its own).
async fn write(pool: &PgPool, worker: &str, batch: &[Row]) -> Result<(), Error> {
    let calls: Vec<(&ItemRef, &CallStart)> = batch
        .iter()
        .filter_map(|r| match r {
            Row::Call(i, c, _) => Some((&**i, c)),
            _ => None,
        })
        .collect();
    let attempts: Vec<(&ItemRef, Uuid, &AttemptRecord)> = batch
        .iter()
        .filter_map(|r| match r {
            Row::Attempt(i, id, a) => Some((&**i, *id, a)),
            _ => None,
        })
        .collect();
    if calls.is_empty() && attempts.is_empty() {
        return Ok(());
    }
    let v = |f: fn(&AttemptRecord) -> Option<&str>| -> Vec<Option<&str>> {
        attempts.iter().map(|(_, _, a)| f(a)).collect()
    };
    let i = |f: fn(&AttemptRecord) -> i32| -> Vec<i32> { attempts.iter().map(|(_, _, a)| f(a)).collect() };
    sqlx::query!(
        "WITH calls AS (
             INSERT INTO audit_calls (call_id, job_id, seq, item_id, attempt, worker, provider, model, request_hash,
                                      job_time)
             SELECT u.call_id, u.job_id, u.seq, u.item_id, u.attempt, $1, u.provider, u.model, u.request_hash,
                    job_time(u.job_id)
             FROM UNNEST($2::uuid[], $3::uuid[], $4::bigint[], $5::text[], $6::int[], $7::text[], $8::text[], $9::text[])
                  AS u(call_id, job_id, seq, item_id, attempt, provider, model, request_hash)
             ON CONFLICT (call_id, job_time) DO NOTHING)
         INSERT INTO audit_attempts (worker, job_id, template_hash, seq, item_id, call_id, attempt, model, fallback,
                                     request_hash, outcome, error_class, http_status, latency_ms, tokens_in,
                                     tokens_out, cost_usd, api_key_id, prompt, output, provider, output_mode,
                                     tokens_cached, tokens_reasoning, stage, job_time)
         SELECT $1, u.*, job_time(u.job_id)
         FROM UNNEST($10::uuid[], $11::text[], $12::bigint[], $13::text[], $14::uuid[], $15::int[], $16::text[],
                     $17::bool[], $18::text[], $19::text[], $20::text[], $21::int[], $22::int[], $23::int[],
                     $24::int[], $25::float8[], $26::text[], $27::text[], $28::text[], $29::text[], $30::text[],
                     $31::int[], $32::int[], $33::smallint[])
              AS u(job_id, template_hash, seq, item_id, call_id, attempt, model, fallback, request_hash, outcome,
                   error_class, http_status, latency_ms, tokens_in, tokens_out, cost_usd, api_key_id, prompt,
                   output, provider, output_mode, tokens_cached, tokens_reasoning, stage)",
        worker,
        calls.iter().map(|(_, c)| c.call_id).collect::<Vec<_>>() as _,
        calls.iter().map(|(i, _)| i.job_id).collect::<Vec<_>>() as _,
        calls.iter().map(|(i, _)| i.seq).collect::<Vec<_>>() as _,
        calls.iter().map(|(i, _)| i.item_id.as_str()).collect::<Vec<_>>() as _,
        calls.iter().map(|(_, c)| c.attempt).collect::<Vec<_>>() as _,
        calls.iter().map(|(_, c)| c.provider.as_str()).collect::<Vec<_>>() as _,
        calls.iter().map(|(_, c)| c.model.as_str()).collect::<Vec<_>>() as _,
        calls.iter().map(|(_, c)| c.request_hash.as_str()).collect::<Vec<_>>() as _,
        attempts.iter().map(|(r, _, _)| r.job_id).collect::<Vec<_>>() as _,
        attempts.iter().map(|(r, _, _)| r.template_hash.as_str()).collect::<Vec<_>>() as _,
        attempts.iter().map(|(r, _, _)| r.seq).collect::<Vec<_>>() as _,
        attempts.iter().map(|(r, _, _)| r.item_id.as_str()).collect::<Vec<_>>() as _,
        attempts.iter().map(|(_, id, _)| *id).collect::<Vec<_>>() as _,
        i(|a| a.attempt) as _,
        v(|a| Some(a.model.as_str())) as _,
        attempts.iter().map(|(_, _, a)| a.fallback).collect::<Vec<bool>>() as _,
        v(|a| Some(a.request_hash.as_str())) as _,
        v(|a| Some(a.outcome.as_str())) as _,
        v(|a| a.error_class.map(|c| c.as_str())) as _,
        attempts.iter().map(|(_, _, a)| a.http_status).collect::<Vec<Option<i32>>>() as _,
        i(|a| a.latency_ms) as _,
        i(|a| a.tokens_in) as _,
        i(|a| a.tokens_out) as _,
        attempts.iter().map(|(_, _, a)| a.cost_usd).collect::<Vec<Option<f64>>>() as _,
        v(|a| Some(a.api_key_id.as_str())) as _,
        v(|a| Some(a.prompt.as_str())) as _,
        v(|a| a.output.as_deref()) as _,
        v(|a| Some(a.provider.as_str())) as _,
        v(|a| Some(a.output_mode.as_str())) as _,
        i(|a| a.tokens_cached) as _,
        i(|a| a.tokens_reasoning) as _,
        attempts.iter().map(|(r, _, _)| r.stage).collect::<Vec<i16>>() as _
    )
    .execute(pool)
    .await
    .doing("writing the audit trail")?;
    Ok(())
}
