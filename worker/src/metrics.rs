//! Names of the worker's metrics, and the one place each is recorded with its log line.

use std::time::Duration;

/// Items finished (label `outcome`: succeeded, failed).
pub const ITEMS: &str = "sluice_items_total";
/// Model calls (labels `model`, `outcome`: ok or an error class).
pub const MODEL_CALLS: &str = "sluice_model_calls_total";
/// Latency of model calls in seconds (labels `model`, `outcome`).
pub const MODEL_CALL_SECONDS: &str = "sluice_model_call_duration_seconds";
/// Tokens used (labels `model`, `direction`: in, out).
pub const TOKENS: &str = "sluice_tokens_total";
/// Chunk deliveries handled by this worker (label `outcome`: written, partial, duplicate, stale, cancelled, exhausted, unknown).
pub const CHUNKS: &str = "sluice_chunks_total";

/// The effective rate limit per minute (labels `key_id`, `model`, `limit`: requests, tokens, input_tokens, output_tokens).
pub const RATE_LIMIT: &str = "sluice_rate_limit_effective_per_minute";

pub fn describe() {
    metrics::describe_gauge!(RATE_LIMIT, "Effective rate limit per minute, as learned from the provider");
    metrics::describe_counter!(ITEMS, "Items finished, by outcome");
    metrics::describe_counter!(MODEL_CALLS, "Model calls, by model and outcome");
    metrics::describe_histogram!(MODEL_CALL_SECONDS, metrics::Unit::Seconds, "Model call latency");
    metrics::describe_counter!(TOKENS, "Tokens used, by model and direction");
    metrics::describe_counter!(CHUNKS, "Chunks finished, by outcome");
}

/// Records one model call.
pub fn model_call(model: &str, outcome: &'static str, latency: Duration, tokens: Option<(u32, u32)>) {
    let model = model.to_string();
    metrics::counter!(MODEL_CALLS, "model" => model.clone(), "outcome" => outcome).increment(1);
    metrics::histogram!(MODEL_CALL_SECONDS, "model" => model.clone(), "outcome" => outcome)
        .record(latency.as_secs_f64());
    if let Some((tin, tout)) = tokens {
        metrics::counter!(TOKENS, "model" => model.clone(), "direction" => "in").increment(tin as u64);
        metrics::counter!(TOKENS, "model" => model, "direction" => "out").increment(tout as u64);
    }
    if outcome != "ok" {
        tracing::debug!(outcome, latency_ms = latency.as_millis() as u64, "model call failed");
    }
}

/// Records a finished chunk and its items.
pub fn chunk(outcome: &'static str, succeeded: u64, failed: u64) {
    metrics::counter!(CHUNKS, "outcome" => outcome).increment(1);
    metrics::counter!(ITEMS, "outcome" => "succeeded").increment(succeeded);
    metrics::counter!(ITEMS, "outcome" => "failed").increment(failed);
}

/// Exports the effective rate limit of a key and model.
pub fn rate_limit(key_id: &str, model: &str, limit: &'static str, per_minute: f64) {
    metrics::gauge!(RATE_LIMIT, "key_id" => key_id.to_string(), "model" => model.to_string(), "limit" => limit)
        .set(per_minute);
}
