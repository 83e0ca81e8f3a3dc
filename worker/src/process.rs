//! Runs one item through the model: render the prompt, pass the shared guards, call, and act on each error class.
//!
//! What a failed call leads to is decided by [`next_action`], a pure function
//! tested row by row against this table:
//!
//! | class | action |
//! |---|---|
//! | rate limited (429) | pause the key cluster-wide until Retry-After, then retry; past `max_rate_limited` 429s, fail |
//! | quota exceeded (429 with a quota error) | fail the item, no retry |
//! | auth (401/403) | set the key aside and use the next configured key; with none left, fail the item |
//! | invalid request (400) | try the next fallback model (e.g. larger context), else fail |
//! | server (5xx), transient (timeout, reset), malformed body | count against the breaker, retry with back-off (never before Retry-After) up to `max_attempts` per model, then the next fallback model |
//! | invalid request naming `response_format` | the next weaker structured-output mode (json_schema, json_object, prompt), learned for the cluster; with none left, as invalid request |
//!
//! And outside the call:
//!
//! | event | action |
//! |---|---|
//! | rendered prompt over the kind's `max_prompt_bytes` | fail the item (`prompt_too_large`) before any call |
//! | bad output (not JSON, schema violation) | re-ask with the validation error, bounded, then `failed_validation` |
//! | breaker open | hold the item back: the chunk is redelivered later |

use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use common::prices::Usage;
use common::provider::{Call, CallError, Completion, ErrorClass, Message};
use common::providers::{ModelConfig, Param};
use serde_json::{json, Value};

use crate::audit::{Audit, CallStart, ItemRef};
use crate::breaker::Gate;
use crate::confidence;
use crate::endpoints::Route;
use crate::guard::Guards;
use crate::jobs::CompiledJob;
use crate::learned::{Facts, Learned};
use crate::limit::Cost;
use crate::metrics;
use crate::store::{AttemptRecord, Item, ItemResult};
use crate::watchdog::Wait;
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
    /// The job's project, for the limiter's turns.
    pub project: &'a str,
    /// Every call is recorded here before it is made, and its outcome after.
    pub audit: &'a Audit,
    pub guards: &'a Guards,
    pub learned: &'a Learned,
    pub policy: RetryPolicy,
    /// Cancelled when the worker shuts down or the delivery goes stale (the
    /// job cancelled, the chunk published again): items not yet under way are
    /// held back so the chunk's finished results can be written at once.
    pub stop: &'a tokio_util::sync::CancellationToken,
    /// The chunk delivery, asked again before every retry.
    pub delivery: &'a crate::delivery::Delivery,
    pub prices: &'a common::prices::PriceTable,
    pub redaction: common::redact::Redaction,
    /// For the budgets of capped jobs.
    pub pool: &'a sqlx::PgPool,
    /// The stage of a multi-stage job the item is at (0 otherwise).
    pub stage: i16,
    /// Where the item waits, for the watchdog.
    pub watch: &'a crate::watchdog::Watch,
}

/// A call's worst-case cost, reserved from its job's budget until the call
/// is settled; dropped unsettled (the item stopped before the call), it is
/// returned in the background.
///
/// Its queries run in tasks of their own: an item's future is not polled
/// while its chunk writes results, and a pooled connection held by a frozen
/// future would starve that write (the pool is small).
struct BudgetHold {
    pool: sqlx::PgPool,
    job_id: uuid::Uuid,
    usd: f64,
    settled: bool,
}

impl BudgetHold {
    /// Reserves `usd`; `None` when the job has reached its cap (it is paused).
    async fn reserve(pool: &sqlx::PgPool, job_id: uuid::Uuid, usd: f64) -> Result<Option<Self>, Error> {
        let p = pool.clone();
        let reserved = tokio::spawn(async move { crate::store::reserve_budget(&p, job_id, usd).await })
            .await
            .map_err(|source| Error::Task { doing: "reserving a job's budget", source })??;
        Ok(reserved.then(|| BudgetHold { pool: pool.clone(), job_id, usd, settled: false }))
    }

    /// Returns the reservation and adds what the call cost.
    async fn settle(mut self, spent: f64) {
        self.settled = true;
        let (pool, job_id, usd) = (self.pool.clone(), self.job_id, self.usd);
        let _ = tokio::spawn(async move { soft(crate::store::settle_budget(&pool, job_id, usd, spent).await) }).await;
    }
}

impl Drop for BudgetHold {
    fn drop(&mut self) {
        if !self.settled {
            let (pool, job_id, usd) = (self.pool.clone(), self.job_id, self.usd);
            tokio::spawn(async move { soft(crate::store::settle_budget(&pool, job_id, usd, 0.0).await) });
        }
    }
}

/// The share added to a prompt's estimated tokens when reserving budget:
/// the estimate counts 4 bytes a token, and tokenizers differ.
pub(crate) const PROMPT_MARGIN: f64 = 1.1;

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

/// What to do after a failed call: the table at the top of this module, for
/// errors the provider returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Ask again at once in the next weaker structured-output mode, learned
    /// for the cluster; no retry is spent.
    WeakerOutput,
    /// Call again once the key's cluster-wide pause (Retry-After) is over.
    RetryAfterPause,
    /// Call again after a back-off, never before Retry-After.
    RetryAfterBackoff,
    /// Call again at once with the next configured API key.
    NextKey,
    /// Try the next fallback model; with none left, the item fails.
    NextModel,
    /// The item fails now.
    Fail,
}

/// What is left of an item's budgets when a call fails.
#[derive(Debug, Clone, Copy)]
pub struct Budgets {
    /// 429s the item has had, this one included, and how many it may have.
    pub rate_limited: usize,
    pub max_rate_limited: usize,
    /// Server, transient and malformed failures on this model, this one
    /// included, and the attempts each model gets.
    pub failures: usize,
    pub max_attempts: usize,
    /// Another configured API key is left once this one is set aside.
    pub other_key: bool,
    /// There is a weaker structured-output mode than the one just refused.
    pub weaker_output: bool,
}

/// Decides what a failed call leads to. Pure: the caller applies it.
pub fn next_action(e: &CallError, b: &Budgets) -> Action {
    use common::provider::ErrorClass as C;
    if e.refuses_output_format() && b.weaker_output {
        return Action::WeakerOutput;
    }
    match e.class() {
        C::RateLimited if b.rate_limited > b.max_rate_limited => Action::Fail,
        C::RateLimited => Action::RetryAfterPause,
        C::QuotaExceeded => Action::Fail,
        C::Auth if b.other_key => Action::NextKey,
        C::Auth => Action::Fail,
        C::InvalidRequest => Action::NextModel,
        C::Server | C::Transient | C::Malformed if b.failures < b.max_attempts => Action::RetryAfterBackoff,
        C::Server | C::Transient | C::Malformed => Action::NextModel,
        // Not classes of a call.
        C::FailedValidation
        | C::Template
        | C::PromptTooLarge
        | C::UnknownModel
        | C::RedeliveriesExhausted
        | C::Rejected => Action::Fail,
    }
}

/// Where an item stands after the calls to one model.
enum ModelEnd {
    /// The answer, scored: the item is done.
    Answered,
    /// Try the next model (its last failure is in `ItemRun::last`).
    Next,
    /// The item fails with its last failure.
    Fail,
    /// The worker is stopping: hold the item back at once.
    Stopping,
}

/// An item on its way through its models.
struct ItemRun<'a> {
    ctx: &'a ItemContext<'a>,
    job: &'a CompiledJob,
    iref: std::sync::Arc<ItemRef>,
    result: ItemResult,
    /// The last failure, what the item fails with if nothing better comes.
    last: Option<(ErrorClass, String)>,
    /// Set when a model's breaker was open: how long until it may be tried.
    held: Option<Duration>,
    /// The request as the input line wrote it (`request = "openai_batch"`).
    pass: Option<crate::passthrough::Passthrough>,
}

/// An item's prompt, rendered unless it was already, and within the kind's
/// `max_prompt_bytes`; otherwise the item's failed result.
pub fn prepare(job: &CompiledJob, item: &Item, rendered: Option<String>) -> Result<String, Box<ItemResult>> {
    let prompt = match rendered.map_or_else(|| job.prompt.render(&item.payload), Ok) {
        Ok(p) => p,
        Err(e) => {
            let why = format!("cannot render the prompt: {e}");
            return Err(Box::new(ItemResult::failed(item, ErrorClass::Template, why)));
        }
    };
    let (size, limit) =
        (prompt.len() + job.kind.spec.system.as_deref().map_or(0, str::len), job.kind.spec.max_prompt_bytes);
    if size > limit {
        let why = format!(
            "the prompt is {size} bytes, over this kind's max_prompt_bytes ({limit}): shorten the input, \
             or raise max_prompt_bytes in job.toml if the model's context takes it"
        );
        return Err(Box::new(ItemResult::failed(item, ErrorClass::PromptTooLarge, why)));
    }
    Ok(prompt)
}

/// Processes one item, whose prompt may be rendered already. Guard failures
/// (KV unreachable) are errors; every model failure becomes a failed result
/// or a hold.
pub async fn run_item(
    ctx: &ItemContext<'_>,
    job: &CompiledJob,
    item: &Item,
    rendered: Option<String>,
) -> Result<Outcome, Error> {
    let started = Instant::now();
    let prompt = match prepare(job, item, rendered) {
        Ok(p) => p,
        Err(failed) => return Ok(Outcome::Done(failed)),
    };
    let routes = match &job.routes {
        Ok(r) => r,
        Err(msg) => {
            return Ok(Outcome::Done(Box::new(ItemResult::failed(item, ErrorClass::UnknownModel, msg.clone()))))
        }
    };
    let iref = std::sync::Arc::new(ItemRef {
        job_id: ctx.job_id,
        seq: item.seq,
        item_id: item.id.clone(),
        template_hash: job.template_hash.clone(),
        stage: ctx.stage,
    });
    let pass = match job.kind.spec.request {
        common::spec::RequestSource::OpenaiBatch => match crate::passthrough::Passthrough::parse(&prompt) {
            Ok(p) => Some(p),
            Err(why) => return Ok(Outcome::Done(Box::new(ItemResult::failed(item, ErrorClass::Template, why)))),
        },
        common::spec::RequestSource::Template => None,
    };
    let mut run = ItemRun { ctx, job, iref, result: ItemResult::pending(item), last: None, held: None, pass };
    let base = vec![Message { role: "user".into(), content: prompt }];
    for (model_index, route) in routes.iter().enumerate() {
        match run.on_model(route, model_index, &base).await? {
            ModelEnd::Answered => return Ok(Outcome::Done(Box::new(finish(run.result, started)))),
            ModelEnd::Next => continue,
            ModelEnd::Fail => break,
            ModelEnd::Stopping => return Ok(Outcome::Held(Duration::ZERO)),
        }
    }
    // Every model was tried, or the item failed for good. A model skipped
    // for an open breaker holds the item back, unless it failed otherwise.
    let held_back = run.last.as_ref().is_none_or(|(c, _)| c.counts_against_breaker()) || run.result.attempts == 0;
    if let (Some(wait), true) = (run.held, held_back) {
        return Ok(Outcome::Held(wait));
    }
    let (class, message) = run.last.unwrap_or((ErrorClass::UnknownModel, "no model was tried".into()));
    let mut result = run.result;
    result.model = Some(routes.first().map_or_else(|| job.kind.spec.model.clone(), |r| r.model.clone()));
    result.error_class = Some(class);
    result.error = Some(message);
    Ok(Outcome::Done(Box::new(finish(result, started))))
}

impl ItemRun<'_> {
    /// Calls one model until it answers, the item fails, or the next model is due.
    async fn on_model(&mut self, route: &Route, model_index: usize, base: &[Message]) -> Result<ModelEnd, Error> {
        let ctx = self.ctx;
        let spec = &self.job.kind.spec;
        let ep = &route.endpoint;
        let base_url = ep.client.base_url();
        if self.pass.is_some() && ep.client.kind() == common::provider::ProviderKind::Anthropic {
            let why = format!(
                "{} is served by {}, an Anthropic provider: an OpenAI batch body can go only to an OpenAI-dialect provider",
                route.model, ep.name
            );
            self.last = Some((ErrorClass::InvalidRequest, why));
            return Ok(ModelEnd::Next);
        }
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
        let mut messages = base.to_vec();
        let (mut repairs, mut rate_limited, mut failures) = (0, 0, 0);
        // Answers collected for agreement by separate calls.
        let mut drawn: Vec<String> = Vec::new();
        loop {
            if ctx.stop.is_cancelled() {
                return Ok(ModelEnd::Stopping);
            }
            let Some(key) = ep.keys.current() else {
                self.last = Some((ErrorClass::Auth, "the provider refused every configured API key".into()));
                return Ok(ModelEnd::Fail);
            };
            // A slot under the cluster-wide window first, then the breaker, then
            // the rate budget: a reservation must not wait for a slot and be spent late.
            let cap = ctx.guards.cap(key.id, &route.model, route.config.max_in_flight);
            let waiting = ctx.watch.waiting(Wait::Window);
            let _slot = tokio::select! {
                p = cap.acquire() => p,
                _ = ctx.stop.cancelled() => return Ok(ModelEnd::Stopping),
            };
            drop(waiting);
            if let Gate::Open(wait) = breaker.gate().await? {
                // Try the next model; if none is left, hold the item.
                self.held = Some(self.held.map_or(wait, |h| h.min(wait)));
                return Ok(ModelEnd::Next);
            }
            // What the cluster learned meanwhile (a local read): items started
            // before a refusal was learned must not repeat it.
            let facts = ctx.learned.get(base_url, &route.model).await?;
            output = output.max(facts.output.unwrap_or(output));
            if facts.no_logprobs && strategy.current == Some(ConfidenceStrategy::Logprobs) {
                strategy.advance(&route.config, facts, Some("the server sent no log-probabilities when asked"));
            }
            let limiter = ctx.guards.limiter(key.id, &route.model, &route.config);
            let call = call(self.job, route, &messages, output, strategy.current);
            let samples = call.n;
            let (body, max_output) = match &self.pass {
                // The line's body, with the re-asks after its own messages.
                Some(p) => (p.body(&route.wire_model, &messages[1..]), p.max_output(spec.max_tokens)),
                None => (ep.client.body(&call), spec.max_tokens as f64 * samples.unwrap_or(1) as f64),
            };
            // A capped job's budget is reserved first, at the call's worst
            // case: a call that would pass the cap is never made.
            let budget = if self.job.capped {
                let worst = Usage {
                    input: (estimate_prompt_tokens(call.system, &messages) as f64 * PROMPT_MARGIN).ceil() as u32,
                    output: max_output as u32,
                    ..Usage::default()
                };
                let usd = ctx.prices.cost(&ep.name, &route.model, worst).unwrap_or(0.0);
                match BudgetHold::reserve(ctx.pool, ctx.job_id, usd).await? {
                    Some(hold) => Some(hold),
                    None => {
                        metrics::budget_stop();
                        return Ok(ModelEnd::Stopping);
                    }
                }
            } else {
                None
            };
            // Recorded before the call: a crash from here on leaves an
            // unfinished attempt in the audit trail, never an unknown call.
            self.result.attempts += 1;
            let request_hash = hex::encode(&Sha256::digest(&body)[..8]);
            let call_id = uuid::Uuid::now_v7();
            let start = CallStart {
                call_id,
                attempt: self.result.attempts,
                provider: ep.name.clone(),
                model: route.model.clone(),
                request_hash: request_hash.clone(),
            };
            let waiting = ctx.watch.waiting(Wait::Audit);
            tokio::select! {
                r = ctx.audit.begin(&self.iref, start) => r?,
                _ = ctx.stop.cancelled() => return Ok(ModelEnd::Stopping),
            }
            drop(waiting);
            let cost_estimate = Cost { prompt: estimate_prompt_tokens(call.system, &messages) as f64, max_output };
            let waiting = ctx.watch.waiting(Wait::RateLimit);
            let reservation = match &limiter {
                Some(l) => tokio::select! {
                    r = l.acquire(ctx.project, ctx.job_id, cost_estimate, cap.holders()) => Some(r?),
                    _ = ctx.stop.cancelled() => return Ok(ModelEnd::Stopping),
                },
                None => None,
            };
            drop(waiting);
            if reservation.as_ref().is_some_and(|r| r.waited) {
                cap.rate_bound();
            }
            let t = Instant::now();
            let in_flight =
                (crate::metrics::InFlight::start(crate::metrics::CALLS_IN_FLIGHT), ctx.watch.waiting(Wait::Call));
            let response = ep.client.complete(&route.wire_model, body, key.secret).await;
            drop(in_flight);
            ctx.watch.progressed();
            let attempt = AttemptFacts {
                number: self.result.attempts,
                route,
                fallback: model_index > 0,
                request_hash,
                latency: t.elapsed(),
                key_id: key.id,
                output,
                prompt: messages.last().map(|m| m.content.as_str()).unwrap_or(""),
            };
            let record = attempt.record(ctx, &response);
            let spent = record.cost_usd.unwrap_or(0.0);
            if spent > 0.0 {
                metrics::spent(&route.model, spent);
            }
            ctx.audit.finished(&self.iref, call_id, record);
            if let Some(hold) = budget {
                // Settled once the attempt is in the audit trail (and so in the
                // job's tallies): while money is reserved the call is in flight,
                // afterwards it is spent, never neither.
                let committed = ctx.audit.flush().await;
                hold.settle(spent).await;
                committed?;
            }
            match &response {
                Ok(_) => cap.record(true),
                Err(e) if e.class().counts_against_breaker() => cap.record(false),
                Err(_) => {}
            }
            let e = match response {
                Ok(c) => {
                    // Counted once its answer is judged: one that fails the
                    // kind's schema is a `failed_validation` call, not `ok`.
                    let (latency, tokens) = (t.elapsed(), Some((c.tokens_in, c.tokens_out)));
                    let counted = |outcome| metrics::model_call(&route.model, outcome, latency, tokens);
                    // The answer is paid for: shared state that cannot be updated
                    // (NATS away) must not cost the item its result.
                    soft(breaker.record(true).await);
                    match (&limiter, reservation) {
                        (Some(l), Some(r)) => {
                            // Providers charge the token limit with the prompt and max_tokens,
                            // whatever the answer's length: correct the prompt estimate with
                            // the real (uncached) count.
                            let uncached = (c.tokens_in - c.tokens_cached.min(c.tokens_in)) as f64;
                            soft(l.observe(&c.rate, &r).await);
                            l.settle(r, Cost { prompt: uncached, max_output: cost_estimate.max_output });
                        }
                        (None, _) if c.rate.announces_limit() => {
                            // No limit configured, but the provider has one: keep to it from now on.
                            let l = ctx.guards.provider_limits(key.id, &route.model, &route.config);
                            soft(l.observe(&c.rate, &crate::limit::Reservation::none()).await);
                        }
                        _ => {}
                    }
                    self.result.tokens_in += c.tokens_in as i32;
                    self.result.tokens_out += c.tokens_out as i32;
                    if strategy.current == Some(ConfidenceStrategy::Logprobs) && c.tokens.is_empty() {
                        // The server ignores logprobs: remember it for the cluster, and
                        // score this item with the next strategy.
                        ctx.learned.no_logprobs(base_url, &route.model).await?;
                        let facts = ctx.learned.get(base_url, &route.model).await?;
                        strategy.advance(&route.config, facts, Some("the server sent no log-probabilities when asked"));
                        if strategy.current == Some(ConfidenceStrategy::Agreement) && route.config.supports(Param::N) {
                            counted("ok");
                            continue; // agreement needs its own call with n samples
                        }
                    }
                    let by_calls =
                        strategy.current == Some(ConfidenceStrategy::Agreement) && !route.config.supports(Param::N);
                    if by_calls {
                        drawn.push(c.content.clone());
                        if drawn.len() < spec.samples as usize {
                            counted("ok");
                            continue; // the next sample, another call
                        }
                    }
                    match verdict(self.job, self.pass.as_ref(), strategy.current, &c, by_calls.then_some(&drawn[..])) {
                        Ok(((value, answer), raw, mut components)) => {
                            counted("ok");
                            if by_calls {
                                components["calls"] = json!(drawn.len());
                            }
                            let how = Accepted {
                                strategy: strategy.current,
                                skipped: std::mem::take(&mut strategy.skipped),
                                repaired: repairs > 0,
                                fallback: model_index > 0,
                                model: if c.model.is_empty() { route.model.clone() } else { c.model },
                                call_id,
                            };
                            accept(self.job, &mut self.result, ((value, answer), raw, components), how);
                            return Ok(ModelEnd::Answered);
                        }
                        Err(msg) if repairs < ctx.policy.max_repairs => {
                            counted(ErrorClass::FailedValidation.as_str());
                            repairs += 1;
                            drawn.clear();
                            messages.push(Message { role: "assistant".into(), content: c.content });
                            messages.push(Message {
                                role: "user".into(),
                                content: format!(
                                    "Your answer does not match the required JSON schema: {msg}. Reply again with JSON only."
                                ),
                            });
                            continue;
                        }
                        Err(msg) => {
                            counted(ErrorClass::FailedValidation.as_str());
                            let why = format!("output does not match the schema: {msg}");
                            self.last = Some((ErrorClass::FailedValidation, why));
                            return Ok(ModelEnd::Fail);
                        }
                    }
                }
                Err(e) => e,
            };
            metrics::model_call(&route.model, e.class().as_str(), t.elapsed(), None);
            if let (Some(l), Some(r)) = (&limiter, reservation) {
                l.settle(r, Cost::default());
            }
            let class = e.class();
            // What the failure says about shared state is recorded whatever
            // comes next: a 429's pause holds for every worker even when this
            // item gives up.
            let (mut pause_shared, mut pause) = (false, Duration::from_secs(1));
            if let CallError::RateLimited { retry_after, rate } = &e {
                rate_limited += 1;
                pause = retry_after.unwrap_or(pause);
                // With no limit configured, the first 429 makes one: its pause
                // then holds for the whole cluster instead of each item waiting
                // alone and all retrying at once.
                let l =
                    limiter.clone().unwrap_or_else(|| ctx.guards.provider_limits(key.id, &route.model, &route.config));
                pause_shared = soft(l.rate_limited(*retry_after, rate).await);
                // Nor, without a known request limit, can the limiter pace the
                // calls: the window of calls in flight shrinks instead.
                if !l.knows_request_limit() {
                    cap.record(false);
                }
            }
            if class.counts_against_breaker() {
                failures += 1;
                soft(breaker.record(false).await);
            }
            let budgets = Budgets {
                rate_limited,
                max_rate_limited: ctx.policy.max_rate_limited,
                failures,
                max_attempts: ctx.policy.max_attempts,
                // Setting the key aside is done whatever comes next.
                other_key: class == ErrorClass::Auth && ep.keys.refuse(key.index),
                weaker_output: output.weaker().is_some(),
            };
            let action = next_action(&e, &budgets);
            if action != Action::WeakerOutput {
                self.last = Some((class, e.to_string()));
            }
            match action {
                Action::WeakerOutput => {
                    output = ctx.learned.refuse_output(base_url, &route.model, output).await?;
                }
                Action::RetryAfterPause => {
                    // Without the shared limiter, this item waits out the pause itself.
                    if !pause_shared {
                        let _waiting = ctx.watch.waiting(Wait::Backoff);
                        tokio::time::sleep(pause).await;
                    }
                    if !ctx.delivery.is_current().await {
                        return Ok(ModelEnd::Stopping);
                    }
                }
                Action::RetryAfterBackoff => {
                    let d = backoff.next().unwrap_or(ctx.policy.base);
                    let waiting = ctx.watch.waiting(Wait::Backoff);
                    tokio::time::sleep(e.retry_after().map_or(d, |ra| d.max(ra))).await;
                    drop(waiting);
                    if !ctx.delivery.is_current().await {
                        return Ok(ModelEnd::Stopping);
                    }
                }
                Action::NextKey => {}
                Action::NextModel => return Ok(ModelEnd::Next),
                Action::Fail => return Ok(ModelEnd::Fail),
            }
        }
    }
}

/// What the audit trail records of one call besides its response.
struct AttemptFacts<'a> {
    number: i32,
    route: &'a Route,
    fallback: bool,
    request_hash: String,
    latency: Duration,
    key_id: &'a str,
    output: common::provider::OutputMode,
    prompt: &'a str,
}

impl AttemptFacts<'_> {
    fn record(self, ctx: &ItemContext<'_>, response: &Result<Completion, CallError>) -> AttemptRecord {
        let usage = response.as_ref().map_or(Usage::default(), Completion::usage);
        let provider = &self.route.endpoint.name;
        let cost_usd = ctx.prices.cost(provider, &self.route.model, usage);
        AttemptRecord {
            attempt: self.number,
            model: self.route.model.clone(),
            fallback: self.fallback,
            request_hash: self.request_hash,
            outcome: response.as_ref().map_or_else(|e| e.class().as_str(), |_| "ok").to_string(),
            error_class: response.as_ref().err().map(|e| e.class()),
            http_status: match response {
                Ok(_) => Some(200),
                Err(e) => e.http_status().map(i32::from),
            },
            latency_ms: self.latency.as_millis().min(i32::MAX as u128) as i32,
            tokens_in: usage.input as i32,
            tokens_out: usage.output as i32,
            tokens_cached: usage.cached as i32,
            tokens_reasoning: response.as_ref().map_or(0, |c| c.tokens_reasoning as i32),
            cost_usd,
            api_key_id: self.key_id.to_string(),
            provider: provider.clone(),
            output_mode: self.output.as_str().to_string(),
            prompt: ctx.redaction.apply(self.prompt),
            output: response.as_ref().ok().map(|c| ctx.redaction.apply(&c.content)),
        }
    }
}

/// A validated answer, its raw confidence, and the detail of how it was reached.
type Verdict = Result<Valid, String>;
type Valid = ((Value, String), Result<f64, String>, Value);

/// How an answer that passed validation was reached.
struct Accepted {
    strategy: Option<ConfidenceStrategy>,
    /// Strategies passed over, with the reason.
    skipped: Vec<Value>,
    repaired: bool,
    fallback: bool,
    model: String,
    call_id: uuid::Uuid,
}

/// Fills `r` with a valid answer, scored: the item succeeded.
fn accept(job: &CompiledJob, r: &mut ItemResult, valid: Valid, how: Accepted) {
    let spec = &job.kind.spec;
    let ((value, answer), raw, components) = valid;
    let mut scored = confidence::score(
        how.strategy.unwrap_or(ConfidenceStrategy::None),
        raw,
        how.repaired,
        how.fallback,
        components,
    );
    if !how.skipped.is_empty() {
        scored.detail["skipped"] = Value::Array(how.skipped);
    }
    if how.strategy.is_none() && spec.scores_confidence() {
        scored.detail["error"] = json!("no confidence strategy of the kind can be computed for this model");
    }
    r.succeeded = true;
    r.needs_review = spec.scores_confidence() && scored.value.is_none_or(|v| v < job.review_below);
    r.error_class = None;
    r.error = None;
    r.model = Some(how.model);
    r.confidence = scored.value;
    r.confidence_detail = Some(scored.detail);
    r.output = Some(value);
    r.answer = Some(answer);
    r.answered_by = Some(how.call_id);
}

/// One item's request as a provider batch sends it: the body in the
/// route's dialect (as the first live attempt would send it: the model's
/// first structured-output mode, the kind's first usable confidence
/// strategy), and the most output tokens it may bring back.
pub fn batch_request(job: &CompiledJob, route: &Route, prompt: &str) -> Result<(Vec<u8>, f64), String> {
    let spec = &job.kind.spec;
    if spec.request == common::spec::RequestSource::OpenaiBatch {
        let pass = crate::passthrough::Passthrough::parse(prompt)?;
        return Ok((pass.body(&route.wire_model, &[]), pass.max_output(spec.max_tokens)));
    }
    let strategy = StrategyChoice::new(spec, &route.config, Facts::default()).current;
    let messages = [Message { role: "user".into(), content: prompt.to_string() }];
    let call = call(job, route, &messages, route.config.first_output_mode(), strategy);
    Ok((route.endpoint.client.body(&call), spec.max_tokens as f64 * call.n.unwrap_or(1) as f64))
}

/// The call of one item's `messages` to `route`'s model, asking for
/// `output` and what `strategy` needs: agreement asks for `samples` answers
/// in one call where the model can sample several (n), else one per call.
fn call<'a>(
    job: &'a CompiledJob,
    route: &'a Route,
    messages: &'a [Message],
    output: common::provider::OutputMode,
    strategy: Option<ConfidenceStrategy>,
) -> Call<'a> {
    let spec = &job.kind.spec;
    let agreement = strategy == Some(ConfidenceStrategy::Agreement);
    Call {
        model: &route.wire_model,
        system: spec.system.as_deref(),
        messages,
        temperature: route.config.supports(Param::Temperature).then_some(spec.temperature),
        max_tokens: spec.max_tokens,
        max_tokens_param: route.config.max_tokens_param,
        output,
        schema_name: &spec.kind,
        schema: &job.kind.schema,
        logprobs: strategy == Some(ConfidenceStrategy::Logprobs),
        n: (agreement && route.config.supports(Param::N)).then_some(spec.samples),
        reasoning_effort: if route.config.reasoning { spec.reasoning_effort.as_deref() } else { None },
    }
}

/// Judges an answer that came back from a provider batch exactly as a live
/// answer is judged, filling `r`; `Err` with what is wrong when it does not
/// pass (the item is then run live, where it is re-asked).
pub fn batch_answer(
    job: &CompiledJob,
    route: &Route,
    prompt: &str,
    c: &Completion,
    call_id: uuid::Uuid,
    r: &mut ItemResult,
) -> Result<(), String> {
    let pass = match job.kind.spec.request {
        common::spec::RequestSource::OpenaiBatch => Some(crate::passthrough::Passthrough::parse(prompt)?),
        common::spec::RequestSource::Template => None,
    };
    let strategy = StrategyChoice::new(&job.kind.spec, &route.config, Facts::default());
    let valid = verdict(job, pass.as_ref(), strategy.current, c, None)?;
    let how = Accepted {
        strategy: strategy.current,
        skipped: strategy.skipped,
        repaired: false,
        fallback: false,
        model: if c.model.is_empty() { route.model.clone() } else { c.model.clone() },
        call_id,
    };
    accept(job, r, valid, how);
    Ok(())
}

/// Validates the answer(s) of a completion and computes the raw confidence
/// the strategy asks for. With agreement, `drawn` holds answers collected by
/// separate calls; otherwise the completion's own samples are used.
fn verdict(
    job: &CompiledJob,
    pass: Option<&crate::passthrough::Passthrough>,
    strategy: Option<ConfidenceStrategy>,
    c: &Completion,
    drawn: Option<&[String]>,
) -> Verdict {
    let spec = &job.kind.spec;
    let contents: Vec<&String> = match drawn {
        Some(d) => d.iter().collect(),
        None => std::iter::once(&c.content).chain(c.others.iter()).collect(),
    };
    let checked = contents.iter().map(|content| match pass {
        Some(p) => p.check(content, spec.max_output_bytes),
        None => validate_output(job, content),
    });
    let checked: Vec<Result<(Value, String), String>> = checked.collect();
    if strategy == Some(ConfidenceStrategy::Agreement) {
        // Several answers came back: the majority wins.
        let answers: Vec<Option<String>> = checked.iter().map(|r| r.as_ref().ok().map(|(_, a)| a.clone())).collect();
        return match confidence::agreement(&answers) {
            // A server that ignores n sends one answer: no agreement to speak of.
            Some(_) if answers.len() < 2 => checked.into_iter().next().expect("one answer at least").map(|va| {
                (va, Err("the server returned one answer where several were asked for".to_string()), Value::Null)
            }),
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
        };
    }
    checked.into_iter().next().expect("one answer at least").map(|(value, answer)| {
        let raw = match strategy {
            Some(ConfidenceStrategy::Logprobs) => confidence::label_probability(&c.tokens, &answer, &spec.labels)
                .map(|(n, _)| n)
                .ok_or_else(|| "the provider sent no log-probabilities for the answer".to_string()),
            Some(ConfidenceStrategy::SelfReported) => confidence::self_reported(value.get(&spec.confidence_field))
                .map(|v| v * confidence::SELF_REPORT_DISCOUNT)
                .map_err(|e| format!("self-reported confidence unusable: {e}")),
            Some(_) => Ok(1.0),
            None => Err("no confidence strategy of the kind can be computed for this model".into()),
        };
        ((value, answer), raw, Value::Null)
    })
}

/// Logs a failed update of shared state that the item can do without;
/// returns whether it was made.
fn soft(r: Result<(), Error>) -> bool {
    if let Err(e) = &r {
        tracing::debug!(error = e as &dyn std::error::Error, "shared state not updated");
    }
    r.is_ok()
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

    /// The table at the top of this module, row by row.
    #[test]
    fn each_error_class_leads_to_its_action() {
        use common::provider::RateInfo;
        let fresh = Budgets {
            rate_limited: 0,
            max_rate_limited: 5,
            failures: 0,
            max_attempts: 4,
            other_key: false,
            weaker_output: true,
        };
        let rate_limited = || CallError::RateLimited { retry_after: None, rate: Box::new(RateInfo::default()) };
        let server = || CallError::Server { status: 503, retry_after: None };
        let invalid = |m: &str| CallError::InvalidRequest { status: 400, message: m.into() };
        let rows: Vec<(&str, CallError, Budgets, Action)> = vec![
            ("429", rate_limited(), Budgets { rate_limited: 1, ..fresh }, Action::RetryAfterPause),
            ("429 at the budget", rate_limited(), Budgets { rate_limited: 5, ..fresh }, Action::RetryAfterPause),
            ("429 past the budget", rate_limited(), Budgets { rate_limited: 6, ..fresh }, Action::Fail),
            ("quota", CallError::QuotaExceeded { message: "cap".into() }, fresh, Action::Fail),
            (
                "auth, another key",
                CallError::Auth { status: 401 },
                Budgets { other_key: true, ..fresh },
                Action::NextKey,
            ),
            ("auth, no key left", CallError::Auth { status: 403 }, fresh, Action::Fail),
            ("invalid request", invalid("context length exceeded"), fresh, Action::NextModel),
            ("5xx", server(), Budgets { failures: 1, ..fresh }, Action::RetryAfterBackoff),
            (
                "transient",
                CallError::Transient("reset".into()),
                Budgets { failures: 3, ..fresh },
                Action::RetryAfterBackoff,
            ),
            (
                "malformed",
                CallError::Malformed("not JSON".into()),
                Budgets { failures: 2, ..fresh },
                Action::RetryAfterBackoff,
            ),
            ("5xx, attempts spent", server(), Budgets { failures: 4, ..fresh }, Action::NextModel),
            (
                "transient, attempts spent",
                CallError::Transient("t".into()),
                Budgets { failures: 4, ..fresh },
                Action::NextModel,
            ),
            (
                "response_format refused",
                invalid("response_format json_schema is not supported"),
                fresh,
                Action::WeakerOutput,
            ),
            (
                "response_format refused, no weaker mode",
                invalid("response_format is not supported"),
                Budgets { weaker_output: false, ..fresh },
                Action::NextModel,
            ),
        ];
        for (row, error, budgets, expected) in rows {
            assert_eq!(next_action(&error, &budgets), expected, "row {row:?}");
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
