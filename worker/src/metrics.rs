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

/// Pauses of a key and model after a 429, and the seconds announced (labels `key_id`, `model`).
pub const RATE_LIMIT_PAUSES: &str = "sluice_rate_limit_pauses_total";
pub const RATE_LIMIT_PAUSE_SECONDS: &str = "sluice_rate_limit_pause_seconds_total";
/// Chunks this worker holds now.
pub const CHUNKS_IN_FLIGHT: &str = "sluice_chunks_in_flight";
/// Model calls this worker has under way now.
pub const CALLS_IN_FLIGHT: &str = "sluice_calls_in_flight";
/// 1 while the circuit breaker of a model is open, as this worker sees it (labels `endpoint`, `model`).
pub const BREAKER_OPEN: &str = "sluice_breaker_open";
/// Always 1, with the build's version and the component as labels.
pub const BUILD_INFO: &str = "sluice_build_info";

/// Items answered from the response cache, without a call.
pub const CACHE_HITS: &str = "sluice_cache_hits_total";
/// Dollars this worker spent on model calls since it started, by model, at
/// the price table's prices: a gauge that only rises (the metrics crate's
/// counters hold whole numbers); read it with `increase()`.
pub const SPENT: &str = "sluice_spent_dollars";
/// Calls not made because their job reached its spending cap.
pub const BUDGET_STOPS: &str = "sluice_budget_stops_total";
/// Provider batches held back because the provider's batch queue for their
/// model was full, by model and by who said so (`sluice`: the providers
/// file's limits; `provider`: the provider refused the batch).
pub const BATCH_QUEUE_WAITS: &str = "sluice_batch_queue_waits_total";

/// Time to take a connection from the worker's Postgres pool, sampled
/// every second by the watchdog: high figures mean a pool too small for the work.
pub const DB_ACQUIRE_SECONDS: &str = "sluice_db_acquire_seconds";
/// The worker's Postgres connections (label `state`: busy, idle).
pub const DB_CONNECTIONS: &str = "sluice_db_connections";

/// Requests to the cluster's shared state in NATS KV (labels `state`:
/// limiter, window, breaker, learned; `op`: read, write, conflict): divided
/// by `sluice_model_calls_total`, the cluster-state traffic per model call.
pub const STATE_REQUESTS: &str = "sluice_cluster_state_requests_total";
/// Leases of a key and model's request budget taken from the shared
/// bucket (label `how`: now, or in_turn when granted ahead and due later).
pub const LEASES: &str = "sluice_rate_limit_leases_total";
/// Requests' budget those leases held: divided by the leases, the mean lease.
pub const LEASED_REQUESTS: &str = "sluice_rate_limit_leased_requests_total";
/// Requests' budget leased and let expire unspent (lost to the cluster
/// until the provider's next report).
pub const UNSPENT_REQUESTS: &str = "sluice_rate_limit_unspent_requests_total";

/// Every metric the worker exports (docs/metrics.md lists them).
pub const ALL: &[&str] = &[
    ITEMS,
    MODEL_CALLS,
    MODEL_CALL_SECONDS,
    TOKENS,
    CHUNKS,
    RATE_LIMIT,
    RATE_LIMIT_PAUSES,
    RATE_LIMIT_PAUSE_SECONDS,
    CHUNKS_IN_FLIGHT,
    CALLS_IN_FLIGHT,
    BREAKER_OPEN,
    BUILD_INFO,
    CACHE_HITS,
    SPENT,
    BUDGET_STOPS,
    BATCH_QUEUE_WAITS,
    DB_ACQUIRE_SECONDS,
    DB_CONNECTIONS,
    STATE_REQUESTS,
    LEASES,
    LEASED_REQUESTS,
    UNSPENT_REQUESTS,
];

/// Counts one request to the shared state `state` (`op`: read, write, conflict).
pub fn state_request(state: &'static str, op: &'static str) {
    metrics::counter!(STATE_REQUESTS, "state" => state, "op" => op).increment(1);
}

/// Records one sampled wait for a pooled connection, and the pool's state.
pub fn db_acquire(wait: Duration, size: u32, idle: usize) {
    metrics::histogram!(DB_ACQUIRE_SECONDS).record(wait.as_secs_f64());
    let busy = size.saturating_sub(idle as u32);
    metrics::gauge!(DB_CONNECTIONS, "state" => "busy").set(busy as f64);
    metrics::gauge!(DB_CONNECTIONS, "state" => "idle").set(idle as f64);
}

/// Counts a call not made because its job reached its cap.
pub fn budget_stop() {
    metrics::counter!(BUDGET_STOPS).increment(1);
}

/// Counts a provider batch held back for a full batch queue.
pub fn batch_queue_wait(model: &str, by: &'static str) {
    metrics::counter!(BATCH_QUEUE_WAITS, "model" => model.to_string(), "by" => by).increment(1);
}

/// Adds a call's cost to the dollars spent on `model`.
pub fn spent(model: &str, usd: f64) {
    metrics::gauge!(SPENT, "model" => model.to_string()).increment(usd);
}

/// Counts items answered from the cache.
pub fn cache_hits(n: u64) {
    metrics::counter!(CACHE_HITS).increment(n);
}

pub fn describe() {
    metrics::describe_counter!(LEASES, "Leases of a key and model's request budget, by how granted (now, in_turn)");
    metrics::describe_counter!(LEASED_REQUESTS, "Requests' budget leased, by how granted (now, in_turn)");
    metrics::describe_counter!(UNSPENT_REQUESTS, "Requests' budget leased and let expire unspent");
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION"), "component" => "worker").set(1.0);
    metrics::describe_counter!(RATE_LIMIT_PAUSES, "Pauses of a key and model for the whole cluster after a 429");
    metrics::describe_counter!(
        RATE_LIMIT_PAUSE_SECONDS,
        metrics::Unit::Seconds,
        "Seconds of pause announced after 429s"
    );
    metrics::describe_gauge!(CHUNKS_IN_FLIGHT, "Chunks this worker holds");
    metrics::describe_counter!(
        STATE_REQUESTS,
        "Requests to the cluster's shared state in NATS KV, by state and operation (a conflict is a write refused and retried)"
    );
    metrics::describe_counter!(CACHE_HITS, "Items answered from the response cache, without a call");
    metrics::describe_gauge!(SPENT, "Dollars spent on model calls since the worker started, by model");
    metrics::describe_counter!(BUDGET_STOPS, "Calls not made because their job reached its spending cap");
    metrics::describe_counter!(BATCH_QUEUE_WAITS, "Provider batches held back because the batch queue was full");
    metrics::describe_gauge!(CALLS_IN_FLIGHT, "Model calls this worker has under way");
    metrics::describe_gauge!(BREAKER_OPEN, "1 while a model's circuit breaker is open");
    metrics::describe_gauge!(BUILD_INFO, "Always 1; the version and component are labels");
    metrics::describe_gauge!(RATE_LIMIT, "Effective rate limit per minute, as learned from the provider");
    metrics::describe_counter!(ITEMS, "Items finished, by outcome");
    metrics::describe_counter!(MODEL_CALLS, "Model calls, by model and outcome");
    metrics::describe_histogram!(MODEL_CALL_SECONDS, metrics::Unit::Seconds, "Model call latency");
    metrics::describe_counter!(TOKENS, "Tokens used, by model and direction");
    metrics::describe_counter!(CHUNKS, "Chunks finished, by outcome");
    metrics::describe_histogram!(
        DB_ACQUIRE_SECONDS,
        metrics::Unit::Seconds,
        "Time to take a connection from the Postgres pool, sampled every second"
    );
    metrics::describe_gauge!(DB_CONNECTIONS, "Postgres connections of the worker's pool, busy or idle");
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

/// Records a lease of `requests` requests' budget (`how`: now, in_turn).
pub fn lease(key_id: &str, model: &str, how: &'static str, requests: f64) {
    let labels = [("key_id", key_id.to_string()), ("model", model.to_string()), ("how", how.to_string())];
    metrics::counter!(LEASES, &labels).increment(1);
    metrics::counter!(LEASED_REQUESTS, &labels).increment(requests.round() as u64);
}

/// Records `requests` requests' budget of a lease that expired unspent.
pub fn lease_unspent(key_id: &str, model: &str, requests: f64) {
    let labels = [("key_id", key_id.to_string()), ("model", model.to_string())];
    metrics::counter!(UNSPENT_REQUESTS, &labels).increment(requests.round() as u64);
}

/// Records a pause of a key and model after a 429.
pub fn rate_limit_pause(key_id: &str, model: &str, pause: Duration) {
    let labels = [("key_id", key_id.to_string()), ("model", model.to_string())];
    metrics::counter!(RATE_LIMIT_PAUSES, &labels).increment(1);
    metrics::counter!(RATE_LIMIT_PAUSE_SECONDS, &labels).increment(pause.as_secs());
}

/// Counts something under way (a chunk held, a call made) while the guard lives.
pub struct InFlight(&'static str);

impl InFlight {
    pub fn start(gauge: &'static str) -> Self {
        metrics::gauge!(gauge).increment(1.0);
        InFlight(gauge)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics::gauge!(self.0).decrement(1.0);
    }
}
