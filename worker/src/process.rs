//! Runs one item through the model: render the prompt, pass the shared guards, call, and act on each error class.
//!
//! | class | action |
//! |---|---|
//! | rate limited (429) | pause the key cluster-wide until Retry-After, then retry (bounded separately) |
//! | quota exceeded (429 with a quota error) | fail the item, no retry |
//! | auth (401/403) | set the key aside and use the next configured key; with none left, fail the item |
//! | invalid request (400) | try the next fallback model (e.g. larger context), else fail |
//! | server (5xx), transient (timeout, reset), malformed body | count against the breaker, retry with back-off (never before Retry-After), then the next fallback model |
//! | invalid request naming `response_format` | the next weaker structured-output mode (json_schema, json_object, prompt), learned for the cluster |
//! | bad output (not JSON, schema violation) | re-ask with the validation error, bounded, then `failed_validation` |
//! | breaker open | hold the item back: the chunk is redelivered later |

use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use common::prices::Usage;
use common::provider::{Call, CallError, Message};
use common::providers::{ModelConfig, Param};
use serde_json::{json, Value};

use crate::audit::{Audit, CallStart, ItemRef};
use crate::breaker::Gate;
use crate::confidence;
use crate::guard::Guards;
use crate::jobs::CompiledJob;
use crate::learned::{Facts, Learned};
use crate::limit::Cost;
use crate::metrics;
use crate::store::{AttemptRecord, Item, ItemResult};
use crate::Error;
use common::spec::ConfidenceStrategy;
use sha2::{Digest, Sha256};

/// Retry budgets of one item.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts per model for server and transient errors.
    pub max_attempts: usize,
    pub base: Duration,
    /// 429s tolerated per item before it fails as `rate_limited`.
    pub max_rate_limited: usize,
    /// Re-asks after output that fails validation.
    pub max_repairs: usize,
}

/// What became of an item.
#[derive(Debug)]
pub enum Outcome {
    Done(Box<ItemResult>),
    /// Not attempted to the end because the breaker is open (retry after this
    /// long) or the worker is shutting down (zero). The attempts made so far
    /// are in the audit trail already.
    Held(Duration),
}

/// Parses and validates model output, returning the value and its short answer.
pub fn validate_output(job: &CompiledJob, content: &str) -> Result<(Value, String), String> {
    let limit = job.kind.spec.max_output_bytes;
    if content.len() > limit {
        return Err(format!("output is {} bytes, over the limit of {limit}", content.len()));
    }
    let value: Value = serde_json::from_str(content.trim()).map_err(|e| format!("not JSON: {e}"))?;
    if let Some(err) = job.validator.iter_errors(&value).next() {
        return Err(format!("{} at {}", err, err.instance_path()));
    }
    let answer = match value.get(&job.kind.spec.answer_field) {
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => return Err(format!("missing field {:?}", job.kind.spec.answer_field)),
    };
    Ok((value, answer))
}

/// Rough prompt size in tokens (4 characters each).
fn estimate_prompt_tokens(system: Option<&str>, messages: &[Message]) -> u32 {
    let chars: usize = messages.iter().map(|m| m.content.len()).sum::<usize>() + system.map_or(0, str::len);
    (chars / 4 + 1) as u32
}

/// Everything an item needs from its worker.
pub struct ItemContext<'a> {
    pub job_id: uuid::Uuid,
    /// Every call is recorded here before it is made, and its outcome after.
    pub audit: &'a Audit,
    pub guards: &'a Guards,
    pub learned: &'a Learned,
    pub policy: RetryPolicy,
    /// Cancelled when the worker shuts down: items not yet under way are held
    /// back so the chunk's finished results can be written at once.
    pub stop: &'a tokio_util::sync::CancellationToken,
    pub prices: &'a common::prices::PriceTable,
    pub redaction: common::redact::Redaction,
}

/// The confidence strategy to ask for, given what the model can give, and
/// those passed over with the reason.
struct StrategyChoice {
    current: Option<ConfidenceStrategy>,
    rest: Vec<ConfidenceStrategy>,
    skipped: Vec<Value>,
}

impl StrategyChoice {
    fn new(spec: &common::spec::JobSpec, config: &ModelConfig, facts: Facts) -> Self {
        let mut c = StrategyChoice { current: None, rest: spec.strategies().collect(), skipped: Vec::new() };
        c.advance(config, facts, None);
        c
    }

    /// Moves to the next strategy this model can serve; `why` is recorded for the current one.
    fn advance(&mut self, config: &ModelConfig, facts: Facts, why: Option<&str>) {
        if let (Some(s), Some(why)) = (self.current.take(), why) {
            self.skipped.push(json!({"strategy": s, "reason": why}));
        }
        while !self.rest.is_empty() {
            let s = self.rest.remove(0);
            let unusable = match s {
                ConfidenceStrategy::Logprobs if !config.supports(Param::Logprobs) => {
                    Some("the providers file says the model gives no log-probabilities")
                }
                ConfidenceStrategy::Logprobs if facts.no_logprobs => {
                    Some("the server sent no log-probabilities when asked")
                }
                _ => None,
            };
            match unusable {
                Some(why) => self.skipped.push(json!({"strategy": s, "reason": why})),
                None => {
                    self.current = Some(s);
                    return;
                }
            }
        }
    }
}

/// Processes one item. Guard failures (KV unreachable) are errors; every
/// model failure becomes a failed result or a hold.
pub async fn run_item(ctx: &ItemContext<'_>, job: &CompiledJob, item: &Item) -> Result<Outcome, Error> {
    let started = Instant::now();
    let prompt = match job.prompt.render(&item.payload) {
        Ok(p) => p,
        Err(e) => {
            return Ok(Outcome::Done(Box::new(ItemResult::failed(
                item,
                "template",
                format!("cannot render the prompt: {e}"),
            ))))
        }
    };
    let routes = match &job.routes {
        Ok(r) => r,
        Err(msg) => return Ok(Outcome::Done(Box::new(ItemResult::failed(item, "unknown_model", msg.clone())))),
    };
    let mut result = ItemResult::failed(item, "unknown", String::new());
    let iref = std::sync::Arc::new(ItemRef {
        job_id: ctx.job_id,
        seq: item.seq,
        item_id: item.id.clone(),
        template_hash: job.template_hash.clone(),
    });
    let spec = &job.kind.spec;
    let base = vec![Message { role: "user".into(), content: prompt }];

    let mut last: Option<(&'static str, String)> = None;
    let mut held: Option<Duration> = None;
    let held_now = || Ok(Outcome::Held(Duration::ZERO));
    'models: for (model_index, route) in routes.iter().enumerate() {
        let ep = &route.endpoint;
        let base_url = ep.client.base_url();
        let breaker = ctx.guards.breaker(base_url, &route.model).await?;
        let facts = ctx.learned.get(base_url, &route.model).await?;
        let mut output = facts.output.unwrap_or(route.config.first_output_mode()).max(route.config.first_output_mode());
        let mut strategy = StrategyChoice::new(spec, &route.config, facts);
        let mut backoff = ExponentialBuilder::default()
            .with_min_delay(ctx.policy.base)
            .with_max_delay(Duration::from_secs(30))
            .with_max_times(ctx.policy.max_attempts.saturating_sub(1))
            .with_jitter()
            .build();
        let mut messages = base.clone();
        let (mut repairs, mut rate_limited) = (0, 0);
        // Answers collected for agreement by separate calls.
        let mut drawn: Vec<String> = Vec::new();
        loop {
            if ctx.stop.is_cancelled() {
                return held_now();
            }
            let Some(key) = ep.keys.current() else {
                last = Some(("auth", "the provider refused every configured API key".into()));
                break 'models;
            };
            // A slot under the cluster-wide window first, then the breaker, then
            // the rate budget: a reservation must not wait for a slot and be spent late.
            let cap = ctx.guards.cap(key.id, &route.model, route.config.max_in_flight);
            let _slot = tokio::select! {
                p = cap.acquire() => p,
                _ = ctx.stop.cancelled() => return held_now(),
            };
            match breaker.gate().await? {
                Gate::Closed | Gate::Probe => {}
                Gate::Open(wait) => {
                    // Try the next model; if none is left, hold the item.
                    held = Some(held.map_or(wait, |h| h.min(wait)));
                    continue 'models;
                }
            }
            // What the cluster learned meanwhile (a local read): items started
            // before a refusal was learned must not repeat it.
            let facts = ctx.learned.get(base_url, &route.model).await?;
            output = output.max(facts.output.unwrap_or(output));
            if facts.no_logprobs && strategy.current == Some(ConfidenceStrategy::Logprobs) {
                strategy.advance(&route.config, facts, Some("the server sent no log-probabilities when asked"));
            }
            let limiter = ctx.guards.limiter(key.id, &route.model, &route.config);
            // Agreement asks for `samples` answers in one call where the model
            // can sample several (n), else makes one call per answer.
            let agreement = strategy.current == Some(ConfidenceStrategy::Agreement);
            let samples = (agreement && route.config.supports(Param::N)).then_some(spec.samples);
            let call = Call {
                model: &route.wire_model,
                system: spec.system.as_deref(),
                messages: &messages,
                temperature: route.config.supports(Param::Temperature).then_some(spec.temperature),
                max_tokens: spec.max_tokens,
                max_tokens_param: route.config.max_tokens_param,
                output,
                schema_name: &spec.kind,
                schema: &job.kind.schema,
                logprobs: strategy.current == Some(ConfidenceStrategy::Logprobs),
                n: samples,
                reasoning_effort: if route.config.reasoning { spec.reasoning_effort.as_deref() } else { None },
            };
            let body = ep.client.body(&call);
            // Recorded before the call: a crash from here on leaves an
            // unfinished attempt in the audit trail, never an unknown call.
            result.attempts += 1;
            let request_hash = hex::encode(&Sha256::digest(&body)[..8]);
            let call_id = uuid::Uuid::now_v7();
            let start = CallStart {
                call_id,
                attempt: result.attempts,
                provider: ep.name.clone(),
                model: route.model.clone(),
                request_hash: request_hash.clone(),
            };
            tokio::select! {
                r = ctx.audit.begin(&iref, start) => r?,
                _ = ctx.stop.cancelled() => return held_now(),
            }
            let cost_estimate = Cost {
                prompt: estimate_prompt_tokens(call.system, &messages) as f64,
                max_output: spec.max_tokens as f64 * samples.unwrap_or(1) as f64,
            };
            let reservation = match &limiter {
                Some(l) => tokio::select! {
                    r = l.acquire(cost_estimate) => Some(r?),
                    _ = ctx.stop.cancelled() => return held_now(),
                },
                None => None,
            };
            let t = Instant::now();
            let response = ep.client.complete(&route.wire_model, body, key.secret).await;
            let outcome = match &response {
                Ok(_) => "ok",
                Err(e) => e.class(),
            };
            let usage = response.as_ref().map_or(Usage::default(), |c| Usage {
                input: c.tokens_in,
                output: c.tokens_out,
                cached: c.tokens_cached,
                cache_write: c.tokens_cache_write,
            });
            let record = AttemptRecord {
                attempt: result.attempts,
                model: route.model.clone(),
                fallback: model_index > 0,
                request_hash,
                outcome: outcome.to_string(),
                error_class: response.as_ref().err().map(|e| e.class().to_string()),
                http_status: match &response {
                    Ok(_) => Some(200),
                    Err(e) => e.http_status().map(i32::from),
                },
                latency_ms: t.elapsed().as_millis().min(i32::MAX as u128) as i32,
                tokens_in: usage.input as i32,
                tokens_out: usage.output as i32,
                tokens_cached: usage.cached as i32,
                tokens_reasoning: response.as_ref().map_or(0, |c| c.tokens_reasoning as i32),
                cost_usd: ctx.prices.cost(&ep.name, &route.model, usage),
                api_key_id: key.id.to_string(),
                provider: ep.name.clone(),
                output_mode: output.as_str().to_string(),
                prompt: ctx.redaction.apply(messages.last().map(|m| m.content.as_str()).unwrap_or("")),
                output: response.as_ref().ok().map(|c| ctx.redaction.apply(&c.content)),
            };
            ctx.audit.finished(&iref, call_id, record);
            match &response {
                Ok(_) => cap.record(true),
                Err(e) if is_breaker_class(e.class()) => cap.record(false),
                Err(_) => {}
            }
            match response {
                Ok(c) => {
                    metrics::model_call(&route.model, outcome, t.elapsed(), Some((c.tokens_in, c.tokens_out)));
                    // The answer is paid for: shared state that cannot be updated
                    // (NATS away) must not cost the item its result.
                    soft(breaker.record(true).await);
                    if let (Some(l), Some(r)) = (&limiter, reservation) {
                        // Providers charge the token limit with the prompt and max_tokens,
                        // whatever the answer's length: correct the prompt estimate with
                        // the real (uncached) count.
                        let uncached = (c.tokens_in - c.tokens_cached.min(c.tokens_in)) as f64;
                        soft(l.observe(&c.rate, &r).await);
                        l.settle(r, Cost { prompt: uncached, max_output: cost_estimate.max_output });
                    }
                    result.tokens_in += c.tokens_in as i32;
                    result.tokens_out += c.tokens_out as i32;
                    if strategy.current == Some(ConfidenceStrategy::Logprobs) && c.tokens.is_empty() {
                        // The server ignores logprobs: remember it for the cluster, and
                        // score this item with the next strategy.
                        ctx.learned.no_logprobs(base_url, &route.model).await?;
                        let facts = ctx.learned.get(base_url, &route.model).await?;
                        strategy.advance(&route.config, facts, Some("the server sent no log-probabilities when asked"));
                        if strategy.current == Some(ConfidenceStrategy::Agreement) && route.config.supports(Param::N) {
                            continue; // agreement needs its own call with n samples
                        }
                    }
                    let by_calls =
                        strategy.current == Some(ConfidenceStrategy::Agreement) && !route.config.supports(Param::N);
                    if by_calls {
                        drawn.push(c.content.clone());
                        if drawn.len() < spec.samples as usize {
                            continue; // the next sample, another call
                        }
                    }
                    // With agreement several answers come back: the majority wins.
                    let contents: Vec<&String> = if by_calls {
                        drawn.iter().collect()
                    } else {
                        std::iter::once(&c.content).chain(c.others.iter()).collect()
                    };
                    let checked: Vec<Result<(Value, String), String>> =
                        contents.iter().map(|content| validate_output(job, content)).collect();
                    let verdict = if strategy.current == Some(ConfidenceStrategy::Agreement) {
                        let answers: Vec<Option<String>> =
                            checked.iter().map(|r| r.as_ref().ok().map(|(_, a)| a.clone())).collect();
                        match confidence::agreement(&answers) {
                            // A server that ignores n sends one answer: no agreement to speak of.
                            Some(_) if answers.len() < 2 => {
                                checked.into_iter().next().expect("one answer at least").map(|va| {
                                    (
                                        va,
                                        Err("the server returned one answer where several were asked for".to_string()),
                                        Value::Null,
                                    )
                                })
                            }
                            Some((majority, share)) => {
                                let chosen = checked
                                    .iter()
                                    .flatten()
                                    .find(|(_, a)| *a == majority)
                                    .cloned()
                                    .expect("the majority answer comes from a valid sample");
                                Ok((chosen, Ok(share), json!({"samples": answers.len(), "agreeing": share})))
                            }
                            None => Err(checked.into_iter().find_map(Result::err).unwrap_or_default()),
                        }
                    } else {
                        checked.into_iter().next().expect("one answer at least").map(|(value, answer)| {
                            let raw = match strategy.current {
                                Some(ConfidenceStrategy::Logprobs) => {
                                    confidence::label_probability(&c.tokens, &answer, &spec.labels)
                                        .map(|(n, _)| n)
                                        .ok_or_else(|| {
                                            "the provider sent no log-probabilities for the answer".to_string()
                                        })
                                }
                                Some(ConfidenceStrategy::SelfReported) => {
                                    confidence::self_reported(value.get(&spec.confidence_field))
                                        .map(|v| v * confidence::SELF_REPORT_DISCOUNT)
                                        .map_err(|e| format!("self-reported confidence unusable: {e}"))
                                }
                                Some(_) => Ok(1.0),
                                None => Err("no confidence strategy of the kind can be computed for this model".into()),
                            };
                            ((value, answer), raw, Value::Null)
                        })
                    };
                    match verdict {
                        Ok(((value, answer), raw, mut components)) => {
                            if by_calls {
                                components["calls"] = json!(drawn.len());
                            }
                            let mut scored = confidence::score(
                                strategy.current.unwrap_or(ConfidenceStrategy::None),
                                raw,
                                repairs > 0,
                                model_index > 0,
                                components,
                            );
                            if !strategy.skipped.is_empty() {
                                scored.detail["skipped"] = Value::Array(std::mem::take(&mut strategy.skipped));
                            }
                            if strategy.current.is_none() && spec.scores_confidence() {
                                scored.detail["error"] =
                                    json!("no confidence strategy of the kind can be computed for this model");
                            }
                            result.succeeded = true;
                            result.needs_review =
                                spec.scores_confidence() && scored.value.is_none_or(|v| v < job.review_below);
                            result.error_class = None;
                            result.error = None;
                            result.model = Some(if c.model.is_empty() { route.model.clone() } else { c.model });
                            result.confidence = scored.value;
                            result.confidence_detail = Some(scored.detail);
                            result.output = Some(value);
                            result.answer = Some(answer);
                            return Ok(Outcome::Done(Box::new(finish(result, started))));
                        }
                        Err(msg) if repairs < ctx.policy.max_repairs => {
                            repairs += 1;
                            drawn.clear();
                            messages.push(Message { role: "assistant".into(), content: c.content });
                            messages.push(Message {
                                role: "user".into(),
                                content: format!(
                                    "Your answer does not match the required JSON schema: {msg}. Reply again with JSON only."
                                ),
                            });
                        }
                        Err(msg) => {
                            last = Some(("failed_validation", format!("output does not match the schema: {msg}")));
                            break 'models;
                        }
                    }
                }
                Err(e) => {
                    metrics::model_call(&route.model, outcome, t.elapsed(), None);
                    if let (Some(l), Some(r)) = (&limiter, reservation) {
                        l.settle(r, Cost::default());
                    }
                    if e.refuses_output_format() && output.weaker().is_some() {
                        // Negotiation: a weaker mode, at once, without spending a retry.
                        output = ctx.learned.refuse_output(base_url, &route.model, output).await?;
                        continue;
                    }
                    let class = e.class();
                    let message = e.to_string();
                    match e {
                        CallError::RateLimited { retry_after, rate } => {
                            rate_limited += 1;
                            let shared = match &limiter {
                                Some(l) => soft(l.rate_limited(retry_after, &rate).await),
                                None => false,
                            };
                            if !shared {
                                tokio::time::sleep(retry_after.unwrap_or(Duration::from_secs(1))).await;
                            }
                            if rate_limited > ctx.policy.max_rate_limited {
                                last = Some((class, message));
                                break 'models;
                            }
                        }
                        CallError::Auth { .. } => {
                            if ep.keys.refuse(key.index) {
                                continue; // the next key, at once
                            }
                            last = Some((class, message));
                            break 'models;
                        }
                        CallError::QuotaExceeded { .. } => {
                            last = Some((class, message));
                            break 'models;
                        }
                        CallError::InvalidRequest { .. } => {
                            last = Some((class, message));
                            continue 'models;
                        }
                        CallError::Server { .. } | CallError::Transient(_) | CallError::Malformed(_) => {
                            soft(breaker.record(false).await);
                            let retry_after = e.retry_after();
                            last = Some((class, message));
                            match backoff.next() {
                                Some(d) => tokio::time::sleep(retry_after.map_or(d, |ra| d.max(ra))).await,
                                None => continue 'models,
                            }
                        }
                    }
                }
            }
        }
    }
    // Every model was tried, or the item failed permanently.
    if let (Some(wait), true) =
        (held, last.is_none() || result.attempts == 0 || last.as_ref().is_some_and(|(c, _)| is_breaker_class(c)))
    {
        return Ok(Outcome::Held(wait));
    }
    let (class, message) = last.unwrap_or(("unknown", "no attempt was made".into()));
    result.model = Some(routes.first().map_or_else(|| spec.model.clone(), |r| r.model.clone()));
    result.error_class = Some(class.to_string());
    result.error = Some(message);
    Ok(Outcome::Done(Box::new(finish(result, started))))
}

/// Logs a failed update of shared state that the item can do without;
/// returns whether it was made.
fn soft(r: Result<(), Error>) -> bool {
    if let Err(e) = &r {
        tracing::debug!(error = e as &dyn std::error::Error, "shared state not updated");
    }
    r.is_ok()
}

/// Classes that count against the breaker: an item that last failed with one
/// of them while a breaker is open is held, not failed.
fn is_breaker_class(class: &str) -> bool {
    matches!(class, "server" | "transient" | "malformed")
}

fn finish(mut r: ItemResult, started: Instant) -> ItemResult {
    r.latency_ms = started.elapsed().as_millis().min(i32::MAX as u128) as i32;
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(content: &str, expected: Result<&str, &str>) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../jobs/classify");
        let kind = common::spec::JobKind::load(&dir).unwrap();
        let endpoints = crate::endpoints::Endpoints::new(
            common::providers::Catalog::shorthand("http://127.0.0.1:1/v1", Default::default()),
            Duration::from_secs(1),
            1,
        )
        .unwrap();
        let job = CompiledJob::compile(kind, "h".into(), None, &endpoints).unwrap();
        match (validate_output(&job, content), expected) {
            (Ok((_, answer)), Ok(e)) => assert_eq!(answer, e),
            (Err(msg), Err(e)) => assert!(msg.contains(e), "{msg:?} should mention {e:?}"),
            (got, e) => panic!("{content:?}: got {got:?}, expected {e:?}"),
        }
    }

    #[test]
    fn model_output_is_validated() {
        check(r#"{"label":"sports"}"#, Ok("sports"));
        check(" {\"label\": \"health\"}\n", Ok("health"));
        check(r#"{"label":"cooking"}"#, Err("/label"));
        check(r#"{"label":"sports","why":"x"}"#, Err("Additional properties"));
        check(r#"{}"#, Err("required"));
        check("Sure! The label is sports.", Err("not JSON"));
        check(r#"{"label":"spo"#, Err("not JSON"));
        check(&format!(r#"{{"label":"sports","pad":"{}"}}"#, "x".repeat(20_000)), Err("over the limit of 16384"));
    }
}
