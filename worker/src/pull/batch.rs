//! Batch mode: a chunk's items sent as one provider batch, polled at each redelivery of the chunk, and its answers judged, audited, priced and written as live answers are.
//!
//! Postgres holds the batch (`provider_batches`, migration 0014): a row is
//! written before the provider's batch is created and given the provider's
//! id after, so whichever worker gets the chunk next polls that batch rather
//! than creating another. The chunk message is the polling timer: while the
//! batch is pending it is held back (a nak with a delay growing with the
//! batch's age), and JetStream hands it to some worker again.
//!
//! Items a batch does not answer (a failed request, an expired or cancelled
//! batch) go in the chunk's next round, up to `SLUICE_MAX_ATTEMPTS` rounds;
//! then they fail with the last failure. An answer that does not pass
//! validation is run live at once, where it is re-asked as any live answer.
//!
//! In auto mode (`jobs.mode = 'auto'`) those items go live instead of in
//! another round, as do chunks with fewer than [`AUTO_LIVE_BELOW`] items to
//! send, and, from a tenth of the time to the deadline before it, every item
//! a batch has not answered yet: its pending batch is cancelled at the
//! provider and the chunk runs as a live one.
//! Each answer is recorded in the audit trail as one attempt, at the
//! provider's batch prices, with the batch's age as its latency; the batch's
//! row keeps how many it answered and what they would have cost live.
//!
//! Batch queues: with `batch_queue_tokens` or `batch_queue_requests` in the
//! providers file, a batch is recorded only if what the cluster's batches of
//! the model hold (sent, not yet collected) leaves room for it
//! ([`store::open_batch`]); otherwise the chunk waits. A batch the provider
//! turns away for a full queue all the same (OpenAI's `token_limit_exceeded`,
//! Anthropic's 429) is `refused`: it never ran, and does not count as a
//! round. These limits are apart from the live ones: batch requests take
//! nothing from the live rate limits, and live calls nothing from the queue.

use std::sync::Arc;
use std::time::Duration;

use common::provider::batch::{max_bytes, max_requests, BatchItem, BatchState};
use common::provider::{CallError, ErrorClass};
use common::wire::ChunkMsg;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use super::{save, ChunkOutcome, Shared};
use crate::audit::{CallStart, ItemRef};
use crate::endpoints::Route;
use crate::jobs::CompiledJob;
use crate::process::{self, Outcome};
use crate::store::{self, AttemptRecord, Item, ItemResult};
use crate::Error;

/// An item still to be answered, with its cache key and rendered prompt.
type Pending = (Item, Option<String>, String);

/// What a batch-mode delivery comes to.
pub(super) enum Step {
    Done(ChunkOutcome),
    /// Auto mode: run these items live, as a live chunk would, with the
    /// results gathered so far.
    Live(Vec<ItemResult>, Vec<(Item, Option<(String, String)>)>),
}

/// In auto mode a chunk with fewer items than this left to send goes live:
/// a batch's wait is not worth so few.
const AUTO_LIVE_BELOW: usize = 5;

const NEAR_DEADLINE: &str = "the job's deadline is near: its items went live";

fn live(done: Vec<ItemResult>, pending: Vec<Pending>) -> Step {
    Step::Live(done, pending.into_iter().map(|(item, key, prompt)| (item, key.map(|k| (k, prompt)))).collect())
}

/// How long to wait before asking about a batch `age_s` seconds old again:
/// a tenth of its age, between 1 s and a minute.
fn poll_after(age_s: f64) -> Duration {
    Duration::from_secs_f64((age_s / 10.0).clamp(1.0, 60.0))
}

/// A batch still `submitting` after this long may never get its provider id
/// from the worker creating it (it stopped between the two writes): the
/// provider's batches are searched for its label.
const LOOK_AFTER_S: f64 = 10.0;

/// A batch still `submitting` after this long, and not found at the
/// provider, was not created: it is marked failed and its items go in a new
/// round. (Anthropic's batches carry no label: one created by a worker that
/// stopped before recording it is left uncollected, paid for and unused.)
const SUBMIT_TIMEOUT_S: f64 = 120.0;

/// What a batch is called at the provider (OpenAI's metadata): its row's key.
fn label(chunk: &ChunkMsg, generation: i32, round: i32) -> String {
    format!("{}/{}/{generation}/{round}", chunk.job_id, chunk.chunk_no)
}

/// Deals with a batch recorded but without the provider's id yet: adopts the
/// provider's batch of its label if there is one, waits for the worker
/// creating it while that may still be under way, else marks it failed.
async fn adopt(shared: &Shared, chunk: &ChunkMsg, route: &Route, b: store::BatchRow) -> Result<ChunkOutcome, Error> {
    if b.age_s < LOOK_AFTER_S {
        return Ok(ChunkOutcome::Held(poll_after(b.age_s)));
    }
    let ep = &route.endpoint;
    let key = ep.keys.current();
    match ep.client.find_batch(&label(chunk, b.generation, b.round), key.as_ref().and_then(|k| k.secret)).await {
        Ok(Some(id)) => {
            if store::set_batch(&shared.pool, chunk, b.generation, b.round, "pending", Some(&id), None).await? {
                tracing::info!(job_id = %chunk.job_id, chunk = chunk.chunk_no, round = b.round, batch = %id,
                    "provider batch found by its label: its id had not been recorded");
            }
            Ok(ChunkOutcome::Held(Duration::from_millis(500)))
        }
        Ok(None) if b.age_s >= SUBMIT_TIMEOUT_S => {
            let why = "the batch was not known to have been created";
            store::set_batch(&shared.pool, chunk, b.generation, b.round, "failed", None, Some(why)).await?;
            Ok(ChunkOutcome::Held(Duration::from_millis(500)))
        }
        Ok(None) => Ok(ChunkOutcome::Held(poll_after(b.age_s))),
        Err(e) => {
            tracing::warn!(error = %e, "cannot look for a provider batch; looking again later");
            Ok(ChunkOutcome::Held(poll_after(b.age_s).max(backoff(&e))))
        }
    }
}

/// Works on a delivery of a batch-mode chunk: `items` are those without a
/// result, less the cache's answers (`hits`).
pub(super) async fn work(
    shared: &Arc<Shared>,
    chunk: &ChunkMsg,
    job: &Arc<CompiledJob>,
    hits: Vec<ItemResult>,
    items: Vec<(Item, Option<(String, String)>)>,
    stop: &CancellationToken,
) -> Result<Step, Error> {
    let mut done = hits;
    let mut pending: Vec<Pending> = Vec::with_capacity(items.len());
    for (item, key) in items {
        let (key, prompt) = key.unzip();
        match process::prepare(job, &item, prompt) {
            Ok(p) => pending.push((item, key, p)),
            Err(failed) => done.push(*failed),
        }
    }
    let route = match &job.routes {
        Ok(routes) if !routes.is_empty() => &routes[0],
        Ok(_) | Err(_) => {
            let why = job.routes.as_ref().err().cloned().unwrap_or_else(|| "the job names no model".into());
            done.extend(pending.iter().map(|(i, _, _)| ItemResult::failed(i, ErrorClass::UnknownModel, why.clone())));
            return finish(shared, chunk, job, done, stop).await.map(Step::Done);
        }
    };
    let auto = job.live_from.is_some();
    // Near an auto job's deadline, what a batch has not answered goes live.
    let near = auto && job.past_live_from();
    let last = store::last_batch(&shared.pool, chunk).await?;
    match last {
        Some(b) if b.state == "pending" => collect(shared, chunk, job, route, b, done, pending, near, stop).await,
        _ if near => {
            abandon(shared, chunk, job, NEAR_DEADLINE).await?;
            Ok(live(done, pending))
        }
        Some(b) if b.state == "submitting" => adopt(shared, chunk, route, b).await.map(Step::Done),
        last => {
            // Rounds count within a generation: a resumed job's chunk tries again from round 0.
            // A batch the provider refused for a full queue never ran: it is not a round.
            let (round, rounds, why) = match last {
                Some(b) if b.generation == chunk.generation => (b.round + 1, b.rounds, b.error),
                _ => (0, 0, None),
            };
            if rounds >= shared.policy.max_attempts as i64 && !pending.is_empty() {
                let why = format!(
                    "not answered in {rounds} provider batches: {}",
                    why.as_deref().unwrap_or("the requests failed")
                );
                done.extend(pending.iter().map(|(i, _, _)| ItemResult::failed(i, ErrorClass::Server, why.clone())));
                pending.clear();
            }
            if pending.is_empty() {
                return finish(shared, chunk, job, done, stop).await.map(Step::Done);
            }
            if auto && pending.len() < AUTO_LIVE_BELOW {
                return Ok(live(done, pending));
            }
            if !done.is_empty() {
                save(shared, chunk, job, &done, false, stop).await?;
            }
            match send(shared, chunk, job, route, round, &pending).await? {
                Some(outcome) => Ok(Step::Done(outcome)),
                None if auto => Ok(live(Vec::new(), pending)),
                None => {
                    let why = format!(
                        "the prompts are larger than the provider's whole batch queue for {} \
                         (batch_queue_tokens or batch_queue_requests in the providers file): \
                         run the job in live or auto mode",
                        route.model
                    );
                    let failed =
                        pending.iter().map(|(i, _, _)| ItemResult::failed(i, ErrorClass::PromptTooLarge, why.clone()));
                    finish(shared, chunk, job, failed.collect(), stop).await.map(Step::Done)
                }
            }
        }
    }
}

/// Writes the last results of a chunk and marks it done.
async fn finish(
    shared: &Arc<Shared>,
    chunk: &ChunkMsg,
    job: &CompiledJob,
    done: Vec<ItemResult>,
    stop: &CancellationToken,
) -> Result<ChunkOutcome, Error> {
    save(shared, chunk, job, &done, true, stop).await?;
    let ok = done.iter().filter(|r| r.succeeded).count() as u64;
    crate::metrics::chunk("written", ok, done.len() as u64 - ok);
    if common::db::complete_if_done(&shared.pool, chunk.job_id).await? {
        tracing::info!(job_id = %chunk.job_id, "job completed");
    }
    Ok(ChunkOutcome::Finished)
}

/// How long a chunk waits when the provider's batch queue has no room for
/// its batch: batches ahead of it must end first.
const QUEUE_FULL_WAIT: Duration = Duration::from_secs(5);

/// Sends round `round` of a chunk's items as one provider batch; `None` if
/// even the first of them is larger than the provider's whole batch queue.
async fn send(
    shared: &Arc<Shared>,
    chunk: &ChunkMsg,
    job: &CompiledJob,
    route: &Route,
    round: i32,
    pending: &[Pending],
) -> Result<Option<ChunkOutcome>, Error> {
    let ep = &route.endpoint;
    // Within the provider's caps, and within its batch queue's limits for the
    // model: what does not fit waits for the next round.
    let (cap_bytes, cap_requests) = (max_bytes(ep.client.kind()), max_requests(ep.client.kind()));
    let (queue_tokens, queue_requests) = (route.config.batch_queue_tokens, route.config.batch_queue_requests);
    let (mut requests, mut seqs, mut bytes) = (Vec::with_capacity(pending.len()), Vec::new(), 0usize);
    let mut tokens = 0i64;
    // A capped job holds the batch's worst case (each prompt at 4 bytes a
    // token plus a margin, each answer at its most tokens, at batch prices)
    // until the batch is collected; at the cap the job pauses instead.
    let mut usd = 0.0;
    for (item, _, prompt) in pending {
        // A body that cannot be built fails its item when collected (not sent).
        if let Ok((body, max_output)) = process::batch_request(job, route, prompt) {
            // Prompt tokens at 4 bytes a token of the whole body, plus a margin: more than any count of the messages.
            let input = (body.len() as f64 / 4.0 * process::PROMPT_MARGIN).ceil() as u32;
            let full = bytes + body.len() > cap_bytes
                || requests.len() == cap_requests
                || (queue_tokens > 0.0 && (tokens + i64::from(input)) as f64 > queue_tokens)
                || (queue_requests > 0.0 && (requests.len() + 1) as f64 > queue_requests);
            if full && !requests.is_empty() {
                break;
            }
            let worst = common::prices::Usage { input, output: max_output as u32, ..Default::default() };
            usd += shared.prices.batch_cost(&ep.name, &route.model, worst).unwrap_or(0.0);
            tokens += i64::from(input);
            bytes += body.len();
            requests.push((item.seq.to_string(), body));
        }
        seqs.push(item.seq);
    }
    let reserved = if job.capped {
        if !store::reserve_budget(&shared.pool, chunk.job_id, usd).await? {
            crate::metrics::budget_stop();
            return Ok(Some(ChunkOutcome::Held(Duration::from_secs(1)))); // the job is paused
        }
        usd
    } else {
        0.0
    };
    let new = store::NewBatch {
        round,
        provider: &ep.name,
        model: &route.model,
        seqs: &seqs,
        requests: requests.len() as i32,
        queued_tokens: tokens,
        reserved_usd: reserved,
        queue_tokens,
        queue_requests,
    };
    let opened = store::open_batch(&shared.pool, chunk, &new).await?;
    if opened != store::Opened::Opened {
        store::settle_budget(&shared.pool, chunk.job_id, reserved, 0.0).await?;
    }
    match opened {
        store::Opened::Opened => {}
        store::Opened::Taken => return Ok(Some(ChunkOutcome::Held(Duration::from_secs(1)))), // another worker is sending it
        store::Opened::QueueFull { tokens: 0, requests: 0 } => return Ok(None),              // it would never fit
        store::Opened::QueueFull { tokens: queued, requests: n } => {
            tracing::debug!(job_id = %chunk.job_id, chunk = chunk.chunk_no, queued_tokens = queued, queued_requests = n,
                "the provider's batch queue is full; waiting");
            crate::metrics::batch_queue_wait(&route.model, "sluice");
            return Ok(Some(ChunkOutcome::Held(QUEUE_FULL_WAIT)));
        }
    }
    let key = ep.keys.current();
    let label = label(chunk, chunk.generation, round);
    match ep.client.submit_batch(&requests, Some(&label), key.as_ref().and_then(|k| k.secret)).await {
        Ok(id) => {
            if !store::set_batch(&shared.pool, chunk, chunk.generation, round, "pending", Some(&id), None).await? {
                let given_up = store::last_batch(&shared.pool, chunk)
                    .await?
                    .is_some_and(|b| b.round == round && b.generation == chunk.generation && b.state != "pending");
                if given_up {
                    // Cancelled, or the deadline came, while it was being created: not wanted.
                    if let Err(e) = ep.client.cancel_batch(&id, key.as_ref().and_then(|k| k.secret)).await {
                        tracing::warn!(error = %e, batch = %id, "cannot cancel a provider batch");
                    }
                }
                return Ok(Some(ChunkOutcome::Held(Duration::from_millis(500))));
            }
            tracing::info!(job_id = %chunk.job_id, chunk = chunk.chunk_no, round, batch = %id, requests = requests.len(), "provider batch created");
            Ok(Some(ChunkOutcome::Held(poll_after(0.0))))
        }
        Err(e) => {
            tracing::warn!(error = %e, job_id = %chunk.job_id, chunk = chunk.chunk_no, round, "provider batch not created");
            // A 429 (Anthropic's answer to a full batch queue, or too many
            // batch API calls) costs the chunk no round.
            let state = if e.class() == ErrorClass::RateLimited {
                crate::metrics::batch_queue_wait(&route.model, "provider");
                "refused"
            } else {
                "failed"
            };
            if store::set_batch(&shared.pool, chunk, chunk.generation, round, state, None, Some(&e.to_string())).await?
            {
                store::settle_budget(&shared.pool, chunk.job_id, reserved, 0.0).await?;
            }
            Ok(Some(ChunkOutcome::Held(backoff(&e))))
        }
    }
}

fn backoff(e: &CallError) -> Duration {
    e.retry_after().unwrap_or(Duration::from_secs(2)).max(Duration::from_millis(500))
}

/// Asks the provider to cancel the chunk's pending batch, if it has one, and
/// marks it failed with `why`: its requests not yet run are never paid for
/// (the job was cancelled, or its deadline is near and its items go live).
pub(super) async fn abandon(shared: &Shared, chunk: &ChunkMsg, job: &CompiledJob, why: &str) -> Result<(), Error> {
    let (Some(b), Ok(routes)) = (store::last_batch(&shared.pool, chunk).await?, &job.routes) else { return Ok(()) };
    if !matches!(b.state.as_str(), "pending" | "submitting") {
        return Ok(());
    }
    if let (Some(id), Some(route)) = (b.batch_id.as_deref(), routes.first()) {
        let ep = &route.endpoint;
        let key = ep.keys.current();
        match ep.client.cancel_batch(id, key.as_ref().and_then(|k| k.secret)).await {
            Ok(()) => {
                tracing::info!(job_id = %chunk.job_id, chunk = chunk.chunk_no, batch = %id, why, "provider batch cancelled")
            }
            Err(e) => tracing::warn!(error = %e, batch = %id, "cannot cancel a provider batch"),
        }
    }
    if store::set_batch(&shared.pool, chunk, b.generation, b.round, "failed", None, Some(why)).await? {
        store::settle_budget(&shared.pool, chunk.job_id, b.reserved_usd, 0.0).await?;
    }
    Ok(())
}

/// Polls the chunk's pending batch and, once it has ended, takes its answers.
#[allow(clippy::too_many_arguments)]
async fn collect(
    shared: &Arc<Shared>,
    chunk: &ChunkMsg,
    job: &Arc<CompiledJob>,
    route: &Route,
    batch: store::BatchRow,
    mut done: Vec<ItemResult>,
    pending: Vec<Pending>,
    near_deadline: bool,
    stop: &CancellationToken,
) -> Result<Step, Error> {
    let held = |d: Duration| Ok(Step::Done(ChunkOutcome::Held(d)));
    let ep = &route.endpoint;
    let key = ep.keys.current();
    let secret = key.as_ref().and_then(|k| k.secret);
    let id = batch.batch_id.as_deref().unwrap_or_default();
    let status = match ep.client.batch_status(id, secret).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, batch = %id, "cannot ask about a provider batch; asking again later");
            return held(poll_after(batch.age_s).max(backoff(&e)));
        }
    };
    let results = match &status.state {
        BatchState::Pending if near_deadline => {
            abandon(shared, chunk, job, NEAR_DEADLINE).await?;
            return Ok(live(done, pending));
        }
        BatchState::Pending => return held(poll_after(batch.age_s)),
        BatchState::Failed { errors } | BatchState::QueueFull { errors } => {
            let queue_full = matches!(status.state, BatchState::QueueFull { .. });
            let (state, wait) = if queue_full {
                crate::metrics::batch_queue_wait(&route.model, "provider");
                ("refused", QUEUE_FULL_WAIT)
            } else {
                ("failed", Duration::from_millis(500))
            };
            let why = format!("the provider refused the batch: {errors}");
            if store::set_batch(&shared.pool, chunk, batch.generation, batch.round, state, None, Some(&why)).await? {
                store::settle_budget(&shared.pool, chunk.job_id, batch.reserved_usd, 0.0).await?;
            }
            return held(wait);
        }
        BatchState::Ended { .. } => match ep.client.batch_results(&status, secret).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, batch = %id, "cannot read a provider batch's results; reading again later");
                return held(backoff(&e));
            }
        },
    };
    let mut results = results;
    let in_batch: std::collections::HashSet<i64> = batch.seqs.iter().copied().collect();
    let auto = job.live_from.is_some();
    // Items not answered here: the chunk's next round takes them (auto: live).
    let (mut reask, mut left, mut last_error) = (Vec::new(), Vec::new(), None);
    // What the batch's answers cost, what they would have cost live, and how many were accepted.
    let (mut spent, mut live_cost, mut answered) = (0.0, 0.0, 0);
    let key_id = key.as_ref().map(|k| k.id.to_string()).unwrap_or_default();
    for (item, cache_key, prompt) in pending {
        if !in_batch.contains(&item.seq) {
            left.push((item, cache_key, prompt)); // came after the batch was sent (a resumed job)
            continue;
        }
        let outcome = results.remove(&item.seq.to_string());
        let iref = Arc::new(ItemRef {
            job_id: chunk.job_id,
            seq: item.seq,
            item_id: item.id.clone(),
            template_hash: job.template_hash.clone(),
            stage: 0,
        });
        let request = process::batch_request(job, route, &prompt);
        let request_hash = match &request {
            Ok((body, _)) => hex::encode(&Sha256::digest(body)[..8]),
            Err(_) => String::new(),
        };
        let outcome = match (request, outcome) {
            (Err(why), _) => {
                done.push(ItemResult::failed(&item, ErrorClass::Template, why));
                continue;
            }
            (Ok(_), Some(o)) => o,
            (Ok(_), None) => BatchItem::NotRun("missing from the batch's results".into()),
        };
        let failure = match &outcome {
            BatchItem::Answered(_) => None,
            BatchItem::Failed(e) => Some(e.to_string()),
            BatchItem::NotRun(why) => Some(format!("not run: {why}")),
        };
        if let BatchItem::NotRun(_) = outcome {
            // Never sent to the model: nothing to audit.
            last_error = failure;
            left.push((item, cache_key, prompt));
            continue;
        }
        let call_id = uuid::Uuid::now_v7();
        let attempt = item.prior + 1;
        let start = CallStart {
            call_id,
            attempt,
            provider: ep.name.clone(),
            model: route.model.clone(),
            request_hash: request_hash.clone(),
        };
        shared.audit.begin(&iref, start).await?;
        let answer = match &outcome {
            BatchItem::Answered(c) => Ok(c.as_ref()),
            BatchItem::Failed(e) => Err(e),
            BatchItem::NotRun(_) => unreachable!("skipped above"),
        };
        let usage = answer.map_or(common::prices::Usage::default(), |c| c.usage());
        let record = AttemptRecord {
            attempt,
            model: route.model.clone(),
            fallback: false,
            request_hash,
            outcome: answer.map_or_else(|e| e.class().as_str(), |_| "ok").to_string(),
            error_class: answer.err().map(|e| e.class()),
            http_status: match answer {
                Ok(_) => Some(200),
                Err(e) => e.http_status().map(i32::from),
            },
            latency_ms: (batch.age_s * 1000.0).min(i32::MAX as f64) as i32,
            tokens_in: usage.input as i32,
            tokens_out: usage.output as i32,
            tokens_cached: usage.cached as i32,
            tokens_reasoning: answer.map_or(0, |c| c.tokens_reasoning as i32),
            cost_usd: shared.prices.batch_cost(&ep.name, &route.model, usage),
            api_key_id: key_id.clone(),
            provider: ep.name.clone(),
            output_mode: format!("batch:{}", route.config.first_output_mode().as_str()),
            prompt: shared.redaction.apply(&prompt),
            output: answer.ok().map(|c| shared.redaction.apply(&c.content)),
        };
        spent += record.cost_usd.unwrap_or(0.0);
        live_cost += shared.prices.cost(&ep.name, &route.model, usage).unwrap_or(0.0);
        shared.audit.finished(&iref, call_id, record);
        match answer {
            Ok(c) => {
                let mut r = ItemResult::pending(&item);
                r.attempts = attempt;
                r.tokens_in = c.tokens_in as i32;
                r.tokens_out = c.tokens_out as i32;
                r.latency_ms = (batch.age_s * 1000.0).min(i32::MAX as f64) as i32;
                r.cache_key = cache_key.clone();
                match process::batch_answer(job, route, &prompt, c, call_id, &mut r) {
                    Ok(()) => {
                        answered += 1;
                        done.push(r);
                    }
                    // Re-asked live, with the live path's budgets.
                    Err(_) => reask.push((Item { prior: attempt, ..item }, cache_key, prompt)),
                }
            }
            Err(_) => {
                last_error = failure;
                left.push((Item { prior: attempt, ..item }, cache_key, prompt));
            }
        }
    }
    let mut held_back = 0;
    if auto {
        left.append(&mut reask);
    } else if !reask.is_empty() {
        let (answered, held) = run_live(shared, chunk, job, reask, stop).await?;
        done.extend(answered);
        held_back = held;
    }
    // Results first: a worker stopped after this and before the batch is
    // marked collected leaves only the unanswered items to collect again.
    let finished = left.is_empty() && held_back == 0;
    save(shared, chunk, job, &done, finished, stop).await?;
    let collected =
        store::Collected { answered, cost_usd: spent, live_cost_usd: live_cost, error: last_error.as_deref() };
    if store::collected_batch(&shared.pool, chunk, batch.generation, batch.round, &collected).await?
        && batch.reserved_usd > 0.0
    {
        store::settle_budget(&shared.pool, chunk.job_id, batch.reserved_usd, spent).await?;
    }
    let ok = done.iter().filter(|r| r.succeeded).count() as u64;
    crate::metrics::chunk(if finished { "written" } else { "partial" }, ok, done.len() as u64 - ok);
    if auto && !left.is_empty() {
        return Ok(live(Vec::new(), left));
    }
    if !finished {
        // The rest go in the chunk's next round.
        return held(Duration::from_millis(500));
    }
    if common::db::complete_if_done(&shared.pool, chunk.job_id).await? {
        tracing::info!(job_id = %chunk.job_id, "job completed");
    }
    Ok(Step::Done(ChunkOutcome::Finished))
}

/// Runs items live, one after another: answers a batch sent back that did
/// not pass validation. Returns their results and how many were held back.
async fn run_live(
    shared: &Arc<Shared>,
    chunk: &ChunkMsg,
    job: &Arc<CompiledJob>,
    items: Vec<Pending>,
    stop: &CancellationToken,
) -> Result<(Vec<ItemResult>, usize), Error> {
    // Stops as the chunk's live items do: at shutdown, or once the delivery is stale.
    let delivery = crate::delivery::Delivery::watch(shared.pool.clone(), *chunk, stop);
    let ctx = super::item_context(shared, chunk, job, &delivery);
    let (mut out, mut held) = (Vec::new(), 0);
    let _calls = shared.calls.acquire(&job.project, chunk.job_id).await;
    for (item, key, prompt) in items {
        match process::run_item(&ctx, job, &item, Some(prompt)).await? {
            Outcome::Done(mut r) => {
                r.cache_key = key;
                out.push(*r);
            }
            Outcome::Held(_) => held += 1,
        }
    }
    Ok((out, held))
}
