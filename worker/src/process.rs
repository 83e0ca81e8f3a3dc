//! Runs one item through the model: render the prompt, call with bounded retries, validate the output.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use common::provider::{CallError, ChatClient, ChatRequest, Completion, Message};
use serde_json::Value;

use crate::jobs::CompiledJob;
use crate::metrics;
use crate::store::{Item, ItemResult};

/// Why an item failed, as recorded in its result.
#[derive(Debug, thiserror::Error)]
pub enum ItemError {
    #[error(transparent)]
    Call(#[from] CallError),
    #[error("output does not match the schema: {0}")]
    BadOutput(String),
}

impl ItemError {
    pub fn class(&self) -> &'static str {
        match self {
            ItemError::Call(e) => e.class(),
            ItemError::BadOutput(_) => "bad_output",
        }
    }
    fn is_retryable(&self) -> bool {
        match self {
            ItemError::Call(e) => e.is_retryable(),
            ItemError::BadOutput(_) => true,
        }
    }
    fn retry_after(&self) -> Option<Duration> {
        match self {
            ItemError::Call(e) => e.retry_after(),
            ItemError::BadOutput(_) => None,
        }
    }
}

/// Retry policy for one item.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub max_attempts: usize,
    pub base: Duration,
}

/// Parses and validates model output, returning the value and its short answer.
pub fn validate_output(job: &CompiledJob, content: &str) -> Result<(Value, String), String> {
    let value: Value =
        serde_json::from_str(content.trim()).map_err(|e| format!("not JSON: {e}"))?;
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

/// Processes one item to a result; never fails: failures become failed results.
pub async fn run_item(
    client: &ChatClient,
    job: &CompiledJob,
    item: &Item,
    policy: RetryPolicy,
) -> ItemResult {
    let started = Instant::now();
    let mut result = ItemResult {
        seq: item.seq,
        item_id: item.id.clone(),
        succeeded: false,
        output: None,
        answer: None,
        confidence: None,
        error_class: None,
        error: None,
        model: None,
        attempts: 0,
        tokens_in: 0,
        tokens_out: 0,
        latency_ms: 0,
    };
    let prompt = match job.prompt.render(&item.payload) {
        Ok(p) => p,
        Err(e) => {
            result.error_class = Some("template".into());
            result.error = Some(format!("cannot render the prompt: {e}"));
            return result;
        }
    };
    let spec = &job.kind.spec;
    let mut messages = Vec::with_capacity(2);
    if let Some(system) = &spec.system {
        messages.push(Message {
            role: "system".into(),
            content: system.clone(),
        });
    }
    messages.push(Message {
        role: "user".into(),
        content: prompt,
    });
    let request = ChatRequest {
        model: spec.model.clone(),
        messages,
        temperature: spec.temperature,
        max_tokens: spec.max_tokens,
        response_format: Some(job.response_format.clone()),
        logprobs: spec.logprobs,
    };
    let attempts = AtomicU32::new(0);
    let tokens = (AtomicU32::new(0), AtomicU32::new(0));
    let call = || async {
        attempts.fetch_add(1, Ordering::Relaxed);
        let t = Instant::now();
        let completion: Result<Completion, CallError> = client.complete(&request).await;
        match completion {
            Err(e) => {
                metrics::model_call(&request.model, e.class(), t.elapsed(), None);
                Err(ItemError::Call(e))
            }
            Ok(c) => {
                metrics::model_call(
                    &request.model,
                    "ok",
                    t.elapsed(),
                    Some((c.tokens_in, c.tokens_out)),
                );
                tokens.0.fetch_add(c.tokens_in, Ordering::Relaxed);
                tokens.1.fetch_add(c.tokens_out, Ordering::Relaxed);
                match validate_output(job, &c.content) {
                    Ok((value, answer)) => Ok((c, value, answer)),
                    Err(msg) => Err(ItemError::BadOutput(msg)),
                }
            }
        }
    };
    let backoff = ExponentialBuilder::default()
        .with_min_delay(policy.base)
        .with_max_delay(Duration::from_secs(30))
        .with_max_times(policy.max_attempts.saturating_sub(1))
        .with_jitter();
    let outcome = call
        .retry(backoff)
        .when(|e: &ItemError| e.is_retryable())
        // Never retry earlier than the provider asked.
        .adjust(|e: &ItemError, next| next.map(|d| e.retry_after().map_or(d, |ra| d.max(ra))))
        .await;
    result.attempts = attempts.load(Ordering::Relaxed) as i32;
    result.tokens_in = tokens.0.load(Ordering::Relaxed) as i32;
    result.tokens_out = tokens.1.load(Ordering::Relaxed) as i32;
    result.latency_ms = started.elapsed().as_millis().min(i32::MAX as u128) as i32;
    match outcome {
        Ok((c, value, answer)) => {
            result.succeeded = true;
            result.model = Some(if c.model.is_empty() {
                request.model.clone()
            } else {
                c.model
            });
            result.confidence = c.logprob_sum.map(|s| s.exp().clamp(0.0, 1.0));
            result.output = Some(value);
            result.answer = Some(answer);
        }
        Err(e) => {
            result.model = Some(request.model.clone());
            result.error_class = Some(e.class().to_string());
            result.error = Some(e.to_string());
        }
    }
    result
}
