//! The model simulator: a model server speaking OpenAI's, Azure OpenAI's and Anthropic's dialects, with deterministic answers, latency, rate limits and faults on demand.
//!
//! Answers are derived from the request: for a JSON-schema response format the
//! simulator fills in the schema, choosing enum labels with
//! [`common::sample::best_label`], so documents from `sluice sample` always get
//! their known answer. Faults are drawn from a hash of the request and how
//! often the same request was seen, so a retried request may succeed and a
//! run is reproducible for a given seed.

use sha2::Digest;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use governor::middleware::StateInformationMiddleware;
use governor::{clock::DefaultClock, state::InMemoryState, state::NotKeyed, Quota, RateLimiter};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

pub mod batch;

/// Behaviour of the simulator; every field can be changed at run time with
/// `POST /admin/config`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default)]
pub struct SimConfig {
    /// Base latency of every answer, in milliseconds.
    #[arg(long, env = "SIM_LATENCY_MS", default_value_t = 0)]
    pub latency_ms: u64,
    /// Extra latency drawn uniformly from 0..=jitter, in milliseconds.
    #[arg(long, env = "SIM_LATENCY_JITTER_MS", default_value_t = 0)]
    pub latency_jitter_ms: u64,
    /// Server-side limit in requests per minute (0: none); excess gets 429 with Retry-After.
    #[arg(long, env = "SIM_RPM", default_value_t = 0)]
    pub rpm: u32,
    /// Server-side limit in tokens per minute, prompt plus max_tokens (0: none).
    #[arg(long, env = "SIM_TPM", default_value_t = 0)]
    pub tpm: u32,
    /// Share of requests answered with HTTP 500.
    #[arg(long, default_value_t = 0.0)]
    pub error_500: f64,
    /// Share of requests answered with HTTP 503.
    #[arg(long, default_value_t = 0.0)]
    pub error_503: f64,
    /// Share of requests answered with HTTP 429 regardless of the limits.
    #[arg(long, default_value_t = 0.0)]
    pub error_429: f64,
    /// Retry-After, in seconds, sent with injected 429s and 503s.
    #[arg(long, default_value_t = 1.0)]
    pub retry_after_s: f64,
    /// Share of requests that hang for `hang_ms` (clients should time out).
    #[arg(long, default_value_t = 0.0)]
    pub hang: f64,
    #[arg(long, default_value_t = 120_000)]
    pub hang_ms: u64,
    /// Share of requests answered 200 with a body that is not JSON.
    #[arg(long, default_value_t = 0.0)]
    pub malformed: f64,
    /// Share of requests whose answer violates the requested schema.
    #[arg(long, default_value_t = 0.0)]
    pub bad_output: f64,
    /// Share of requests answered 429 with an `insufficient_quota` error (a spending cap).
    #[arg(long, default_value_t = 0.0)]
    pub quota: f64,
    /// Models that are down: every request for them gets 503.
    #[arg(long = "down-model")]
    pub down_models: Vec<String>,
    /// The models' context window in tokens (0: none): a request whose
    /// prompt plus `max_tokens` is larger gets OpenAI's 400
    /// `context_length_exceeded` (Anthropic's dialect: 400
    /// `invalid_request_error`).
    #[arg(long, default_value_t = 0)]
    pub context_tokens: u32,
    /// Models that refuse every request with 400 `context_length_exceeded`.
    #[arg(long = "reject-model")]
    pub reject_models: Vec<String>,
    /// If set, requests must carry `Authorization: Bearer <api_key>` or get 401.
    #[arg(long)]
    pub api_key: Option<String>,
    /// Share of documents the simulated model gets wrong (decided per document):
    /// it picks another label and, as real models tend to, is less sure of it.
    #[arg(long, default_value_t = 0.0)]
    pub wrong: f64,
    /// Models wrong on their own share of documents, as `model=share`
    /// (`--wrong-model sim-b=0.1`, repeatable): each listed model's wrong
    /// documents are drawn independently of the other models'.
    #[arg(long = "wrong-model")]
    pub wrong_models: Vec<String>,
    /// Send no `x-ratelimit-*` headers (only 429 and Retry-After), as some providers do.
    #[arg(long)]
    pub no_limit_headers: bool,
    /// Rate-limit buckets hold a whole minute's budget and start full, as real
    /// providers' do (otherwise they hold one second's), with `remaining` and
    /// `reset` (time until full) headers on every answer.
    #[arg(long)]
    pub full_bucket: bool,
    /// How a limit's budget comes back: `bucket` (refilled continuously at
    /// the rate; with `--full-bucket` it holds a minute's worth) or `rolling`
    /// (a minute's budget that starts unspent; what was spent comes back 60 s
    /// later, as a sliding-window limit does).
    #[arg(long, value_enum, default_value_t = Window::Bucket)]
    pub window: Window,
    /// Input tokens per minute (0: none), counted apart as Anthropic does.
    #[arg(long, default_value_t = 0)]
    pub input_tpm: u32,
    /// Output tokens per minute (0: none), counted at max_tokens when the request arrives.
    #[arg(long, default_value_t = 0)]
    pub output_tpm: u32,
    /// Answer the next N requests with 429 (before any other check).
    #[arg(long, default_value_t = 0)]
    pub inject_429: u32,
    /// With injected 429s: the `x-ratelimit-limit-requests` they carry (a bogus figure, say).
    #[arg(long)]
    pub limit_header_on_429: Option<u32>,
    /// Refuse `response_format: json_schema` with a 400, as llama.cpp's server
    /// and older vLLM do; the schema must then come in the prompt.
    #[arg(long)]
    pub no_json_schema: bool,
    /// Never send log-probabilities, even when asked (Anthropic, most local servers).
    #[arg(long)]
    pub no_logprobs: bool,
    /// Models that follow OpenAI's reasoning-model rules: 400 to `max_tokens`,
    /// to a temperature other than 1 and to `logprobs`; reasoning tokens in usage.
    #[arg(long = "reasoning-model")]
    pub reasoning_models: Vec<String>,
    /// Keep a log of every request (time, item, model, status) at `GET /log`.
    #[arg(long)]
    pub log_requests: bool,
    /// With `log_requests`: keep every request body in the log too.
    #[arg(long)]
    pub log_bodies: bool,
    /// Seed of the fault draws.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Batch APIs: seconds from a batch's creation until it ends (the
    /// providers' 24 hours, accelerated).
    #[arg(long, env = "SIM_BATCH_SECONDS", default_value_t = 0.0)]
    pub batch_seconds: f64,
    /// Batch APIs: share of a batch's requests that fail (500 in OpenAI's
    /// error file, `errored` for Anthropic).
    #[arg(long, env = "SIM_BATCH_FAIL", default_value_t = 0.0)]
    pub batch_fail: f64,
    /// Batch APIs: share of a batch's requests still unprocessed when it
    /// ends; above 0, every batch ends `expired`.
    #[arg(long, env = "SIM_BATCH_EXPIRE", default_value_t = 0.0)]
    pub batch_expire: f64,
    /// Batch APIs, OpenAI: prompt tokens of a model's batches in progress
    /// at most (the "batch queue limit"; 0: none). A batch past it is
    /// created, then fails with `token_limit_exceeded`.
    #[arg(long, env = "SIM_BATCH_QUEUE_TOKENS", default_value_t = 0)]
    pub batch_queue_tokens: u64,
    /// Batch APIs, Anthropic: requests of a model's batches in progress at
    /// most (0: none). A batch past it is refused with a 429.
    #[arg(long, env = "SIM_BATCH_QUEUE_REQUESTS", default_value_t = 0)]
    pub batch_queue_requests: u64,
    /// Batch APIs, OpenAI: milliseconds a batch create waits, after the
    /// batch exists, before it answers (a client stopped meanwhile never
    /// learns the batch's id).
    #[arg(long, default_value_t = 0)]
    pub batch_create_delay_ms: u64,
}

impl SimConfig {
    /// How often `model` is wrong, and whether its draws are its own.
    fn wrong_for(&self, model: &str) -> (f64, Option<String>) {
        let own = self.wrong_models.iter().find_map(|w| {
            let (m, share) = w.split_once('=')?;
            (m == model).then(|| share.parse::<f64>().ok()).flatten()
        });
        match own {
            Some(share) => (share, Some(model.to_string())),
            None => (self.wrong, None),
        }
    }

    fn any_fault(&self) -> bool {
        // (injected 429s are counted separately)
        self.error_500 + self.error_503 + self.error_429 + self.hang + self.malformed + self.bad_output > 0.0
    }
}

/// How a limit's budget comes back (`--window`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Window {
    /// A bucket refilled continuously at the rate.
    #[default]
    Bucket,
    /// A sliding minute: a unit spent at t comes back at t + 60 s.
    Rolling,
}

type Bucket = RateLimiter<NotKeyed, InMemoryState, DefaultClock, StateInformationMiddleware>;

/// One server-side limit.
enum Limiter {
    Bucket(Bucket),
    Rolling(Mutex<Rolling>),
}

/// A sliding minute: what was spent in the last 60 s, oldest first.
struct Rolling {
    per_minute: u32,
    spent: std::collections::VecDeque<(std::time::Instant, u32)>,
    used: u32,
}

const MINUTE: Duration = Duration::from_secs(60);

impl Rolling {
    /// Spends `cost` if it fits: the budget left, and the time until the
    /// window is unspent again; otherwise the time until enough comes back.
    fn take(&mut self, cost: u32) -> Result<(u32, Duration), Duration> {
        let now = std::time::Instant::now();
        while let Some((t, n)) = self.spent.front().copied() {
            if now.duration_since(t) < MINUTE {
                break;
            }
            self.spent.pop_front();
            self.used -= n;
        }
        if self.used + cost <= self.per_minute {
            self.spent.push_back((now, cost));
            self.used += cost;
            return Ok((self.per_minute - self.used, MINUTE));
        }
        let mut freed = self.per_minute - self.used;
        for (t, n) in &self.spent {
            freed += n;
            if freed >= cost {
                return Err((*t + MINUTE).saturating_duration_since(now));
            }
        }
        Err(MINUTE)
    }
}

impl Limiter {
    /// Spends `cost`: the budget left and the time until it is all back, or
    /// the time to wait; `Err(None)` when `cost` exceeds the whole limit.
    fn check(&self, cost: NonZeroU32, per_minute: u32, full: bool) -> Result<(u32, Duration), Option<Duration>> {
        match self {
            Limiter::Bucket(l) => match l.check_n(cost) {
                Ok(Ok(snap)) => {
                    let remaining = snap.remaining_burst_capacity();
                    let capacity = if full { per_minute } else { (per_minute / 60).max(1) };
                    let period_ms = 60_000.0 / per_minute.max(1) as f64;
                    let until_full = (capacity.saturating_sub(remaining) as f64 * period_ms).ceil() as u64;
                    Ok((remaining, Duration::from_millis(until_full)))
                }
                Ok(Err(not_until)) => {
                    Err(Some(not_until.wait_time_from(governor::clock::Clock::now(&DefaultClock::default()))))
                }
                Err(_) => Err(None),
            },
            Limiter::Rolling(r) => {
                let mut r = r.lock().expect("rolling lock");
                if cost.get() > r.per_minute {
                    return Err(None);
                }
                r.take(cost.get()).map_err(Some)
            }
        }
    }
}

/// Builds a limiter allowing `per_minute` units per minute. A bucket is
/// smooth unless `full`: its burst is one second's worth, so no window of a
/// few seconds sees more than the limit.
fn limiter(per_minute: u32, full: bool, window: Window) -> Option<Limiter> {
    let per_minute = NonZeroU32::new(per_minute)?;
    if window == Window::Rolling {
        let spent = std::collections::VecDeque::new();
        return Some(Limiter::Rolling(Mutex::new(Rolling { per_minute: per_minute.get(), spent, used: 0 })));
    }
    let burst = if full { per_minute } else { NonZeroU32::new((per_minute.get() / 60).max(1)).expect("at least 1") };
    let quota =
        Quota::with_period(Duration::from_secs(60) / per_minute.get()).expect("positive period").allow_burst(burst);
    Some(Limiter::Bucket(RateLimiter::direct(quota).with_middleware::<StateInformationMiddleware>()))
}

/// Counters served at `GET /stats`.
#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    ok: AtomicU64,
    status_429: AtomicU64,
    status_500: AtomicU64,
    status_503: AtomicU64,
    hangs: AtomicU64,
    malformed: AtomicU64,
    bad_output: AtomicU64,
    tokens_in: AtomicU64,
    tokens_out: AtomicU64,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
}

/// One logged request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// Milliseconds since the simulator started.
    pub t_ms: u64,
    /// Wall-clock milliseconds since the epoch, to compare with other processes' clocks.
    pub wall_ms: u64,
    /// The document the request is about (hash of the first user message),
    /// the same for every attempt at one item.
    pub item: u64,
    pub model: String,
    pub status: u16,
    /// The first 8 bytes of the SHA-256 of the request body, in hex: what
    /// the worker's audit trail records as `request_hash`.
    #[serde(default)]
    pub request_hash: String,
    /// The request body as sent, with `log_bodies`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<Value>,
}

/// Requests counted in one second of the simulator's life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Second {
    pub requests: u32,
    pub ok: u32,
    pub status_429: u32,
}

/// A snapshot of the counters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub requests: u64,
    pub ok: u64,
    pub status_429: u64,
    pub status_500: u64,
    pub status_503: u64,
    pub hangs: u64,
    pub malformed: u64,
    pub bad_output: u64,
    pub tokens_in: u64,
    pub tokens_out: u64,
    /// Most requests the simulator was answering at once.
    pub max_in_flight: u64,
    pub uptime_s: f64,
}

struct Limits {
    requests: Option<Limiter>,
    tokens: Option<Limiter>,
    input: Option<Limiter>,
    output: Option<Limiter>,
    rpm: u32,
    tpm: u32,
    input_tpm: u32,
    output_tpm: u32,
}

impl Limits {
    fn new(c: &SimConfig) -> Self {
        Limits {
            requests: limiter(c.rpm, c.full_bucket, c.window),
            tokens: limiter(c.tpm, c.full_bucket, c.window),
            input: limiter(c.input_tpm, c.full_bucket, c.window),
            output: limiter(c.output_tpm, c.full_bucket, c.window),
            rpm: c.rpm,
            tpm: c.tpm,
            input_tpm: c.input_tpm,
            output_tpm: c.output_tpm,
        }
    }
}

/// The simulator's shared state.
pub struct Sim {
    config: RwLock<SimConfig>,
    limits: RwLock<Arc<Limits>>,
    counters: Counters,
    /// How often each distinct request was seen, so faults can differ between attempts.
    attempts: Mutex<HashMap<u64, u32>>,
    /// How often each distinct request was answered at a temperature above 0:
    /// asked again, the model samples again.
    sampled: Mutex<HashMap<u64, u32>>,
    /// Counts per second since start, for rate-limit benchmarks.
    timeline: Mutex<Vec<Second>>,
    log: Mutex<Vec<LogEntry>>,
    started: Instant,
    /// 429s still to inject.
    injected: AtomicU64,
    /// Files and batches of the batch APIs.
    pub batches: batch::Store,
}

impl Sim {
    pub fn new(config: SimConfig) -> Arc<Self> {
        let limits = Arc::new(Limits::new(&config));
        let injected = AtomicU64::new(config.inject_429 as u64);
        Arc::new(Sim {
            injected,
            config: RwLock::new(config),
            limits: RwLock::new(limits),
            counters: Counters::default(),
            attempts: Mutex::new(HashMap::new()),
            sampled: Mutex::new(HashMap::new()),
            timeline: Mutex::new(Vec::new()),
            log: Mutex::new(Vec::new()),
            started: Instant::now(),
            batches: batch::Store::default(),
        })
    }

    pub fn set_config(&self, config: SimConfig) {
        *self.limits.write().expect("limits lock") = Arc::new(Limits::new(&config));
        self.injected.store(config.inject_429 as u64, Ordering::Relaxed);
        *self.config.write().expect("config lock") = config;
    }

    /// Requests per second since start.
    pub fn timeline(&self) -> Vec<Second> {
        self.timeline.lock().expect("timeline lock").clone()
    }

    /// Every request seen while `log_requests` was on.
    pub fn log(&self) -> Vec<LogEntry> {
        self.log.lock().expect("log lock").clone()
    }

    /// Counts a finished request in the timeline and, if enabled, the log.
    fn record(&self, status: StatusCode, item: u64, model: &str, log: Option<(String, Option<Value>)>) {
        let t = self.started.elapsed();
        {
            let mut tl = self.timeline.lock().expect("timeline lock");
            let sec = t.as_secs() as usize;
            if tl.len() <= sec {
                tl.resize(sec + 1, Second::default());
            }
            let s = &mut tl[sec];
            s.requests += 1;
            s.ok += (status == StatusCode::OK) as u32;
            s.status_429 += (status == StatusCode::TOO_MANY_REQUESTS) as u32;
        }
        if let Some((request_hash, body)) = log {
            self.log.lock().expect("log lock").push(LogEntry {
                t_ms: t.as_millis() as u64,
                wall_ms: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64),
                item,
                model: model.to_string(),
                status: status.as_u16(),
                request_hash,
                body,
            });
        }
    }

    pub fn stats(&self) -> Stats {
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            requests: l(&c.requests),
            ok: l(&c.ok),
            status_429: l(&c.status_429),
            status_500: l(&c.status_500),
            status_503: l(&c.status_503),
            hangs: l(&c.hangs),
            malformed: l(&c.malformed),
            bad_output: l(&c.bad_output),
            tokens_in: l(&c.tokens_in),
            tokens_out: l(&c.tokens_out),
            max_in_flight: l(&c.max_in_flight),
            uptime_s: self.started.elapsed().as_secs_f64(),
        }
    }
}

pub fn router(sim: Arc<Sim>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/messages", post(messages))
        .route("/openai/deployments/{deployment}/chat/completions", post(azure_chat))
        .route("/v1/models", get(models))
        .merge(batch::routes())
        .route("/stats", get(|State(s): State<Arc<Sim>>| async move { Json(s.stats()) }))
        .route("/stats/timeline", get(|State(s): State<Arc<Sim>>| async move { Json(s.timeline()) }))
        .route("/log", get(|State(s): State<Arc<Sim>>| async move { Json(s.log()) }))
        .route("/admin/config", get(get_config).post(set_config))
        .with_state(sim)
}

/// Serves the simulator on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    sim: Arc<Sim>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(sim)).with_graceful_shutdown(async move { shutdown.cancelled().await }).await
}

async fn models() -> Json<Value> {
    Json(json!({"object": "list", "data": [
        {"id": "sim-small", "object": "model", "owned_by": "sluice-sim"},
        {"id": "sim-large", "object": "model", "owned_by": "sluice-sim"}
    ]}))
}

async fn get_config(State(sim): State<Arc<Sim>>) -> Json<SimConfig> {
    Json(sim.config.read().expect("config lock").clone())
}

async fn set_config(State(sim): State<Arc<Sim>>, Json(config): Json<SimConfig>) -> Json<SimConfig> {
    sim.set_config(config.clone());
    Json(config)
}

fn hash_of(parts: impl Hash) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parts.hash(&mut h);
    h.finish()
}

/// A uniform draw in [0, 1) from a hash.
fn unit(h: u64) -> f64 {
    (h >> 11) as f64 / (1u64 << 53) as f64
}

fn error(status: StatusCode, kind: &str, message: &str) -> Response {
    (status, Json(json!({"error": {"message": message, "type": kind}}))).into_response()
}

fn with_retry_after(mut resp: Response, secs: f64) -> Response {
    let value = if secs.fract() == 0.0 { format!("{}", secs as u64) } else { format!("{secs:.3}") };
    resp.headers_mut().insert("retry-after", HeaderValue::from_str(&value).expect("number"));
    resp
}

pub(crate) fn approx_tokens(chars: usize) -> u32 {
    (chars / 4 + 1) as u32
}

/// `POST /v1/chat/completions`: OpenAI and OpenAI-compatible servers.
async fn chat(State(sim): State<Arc<Sim>>, headers: HeaderMap, body: Bytes) -> Response {
    let request: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_request_error", &format!("body is not JSON: {e}")),
    };
    respond(&sim, &headers, &request, &body).await
}

/// `POST /openai/deployments/{deployment}/chat/completions?api-version=...`:
/// Azure OpenAI, with its `api-key` header; the deployment names the model.
async fn azure_chat(
    State(sim): State<Arc<Sim>>,
    Path(deployment): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !query.contains_key("api-version") {
        return error(StatusCode::NOT_FOUND, "404", "Resource not found (missing api-version)");
    }
    let mut request: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_request_error", &format!("body is not JSON: {e}")),
    };
    request["model"] = json!(deployment);
    let mut auth = HeaderMap::new();
    if let Some(key) = headers.get("api-key").and_then(|v| v.to_str().ok()) {
        auth.insert("authorization", HeaderValue::from_str(&format!("Bearer {key}")).expect("ascii"));
    }
    respond(&sim, &auth, &request, &body).await
}

/// `POST /v1/messages`: Anthropic's Messages API, translated to and from the
/// simulator's own (OpenAI-shaped) handling: `x-api-key` and
/// `anthropic-version` headers, a forced tool for structured output, its
/// error types and `anthropic-ratelimit-*` headers with RFC 3339 resets.
async fn messages(State(sim): State<Arc<Sim>>, headers: HeaderMap, body: Bytes) -> Response {
    let anthropic_error = |status: StatusCode, kind: &str, message: &str| {
        (status, Json(json!({"type": "error", "error": {"type": kind, "message": message}}))).into_response()
    };
    let request: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return anthropic_error(StatusCode::BAD_REQUEST, "invalid_request_error", &format!("body is not JSON: {e}"))
        }
    };
    if headers.get("anthropic-version").is_none() {
        return anthropic_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "anthropic-version: header is required",
        );
    }
    let known =
        ["model", "max_tokens", "system", "messages", "temperature", "tools", "tool_choice", "top_p", "metadata"];
    if let Some(extra) = request.as_object().and_then(|o| o.keys().find(|k| !known.contains(&k.as_str()))) {
        return anthropic_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            &format!("{extra}: Extra inputs are not permitted"),
        );
    }
    if request["max_tokens"].as_u64().is_none() {
        return anthropic_error(StatusCode::BAD_REQUEST, "invalid_request_error", "max_tokens: Field required");
    }
    let mut messages = Vec::new();
    if let Some(system) = request["system"].as_str() {
        messages.push(json!({"role": "system", "content": system}));
    }
    messages.extend(request["messages"].as_array().cloned().unwrap_or_default());
    let mut inner = json!({"model": request["model"], "max_tokens": request["max_tokens"], "messages": messages});
    if let Some(t) = request.get("temperature") {
        inner["temperature"] = t.clone();
    }
    let tool = request["tool_choice"]["name"]
        .as_str()
        .and_then(|name| request["tools"].as_array()?.iter().find(|t| t["name"] == name).cloned());
    if let Some(tool) = &tool {
        inner["response_format"] =
            json!({"type": "json_schema", "json_schema": {"name": tool["name"], "schema": tool["input_schema"]}});
    }
    let mut auth = HeaderMap::new();
    if let Some(key) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
        auth.insert("authorization", HeaderValue::from_str(&format!("Bearer {key}")).expect("ascii"));
    }
    let response = respond(&sim, &auth, &inner, &body).await;
    let (parts, body) = response.into_parts();
    let mut out = HeaderMap::new();
    for (name, value) in &parts.headers {
        let n = name.as_str();
        let Some(rest) = n.strip_prefix("x-ratelimit-") else {
            out.insert(name.clone(), value.clone());
            continue;
        };
        // x-ratelimit-{limit,remaining,reset}-{what} -> anthropic-ratelimit-{what}-{field}
        let Some((field, what)) = rest.split_once('-') else { continue };
        let value = if field == "reset" {
            let ms = value.to_str().ok().and_then(|v| v.trim_end_matches("ms").parse::<i64>().ok()).unwrap_or(0);
            let at = chrono::Utc::now() + chrono::Duration::milliseconds(ms);
            HeaderValue::from_str(&at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)).expect("ascii")
        } else {
            value.clone()
        };
        out.insert(HeaderName::try_from(format!("anthropic-ratelimit-{what}-{field}")).expect("name"), value);
    }
    let bytes = axum::body::to_bytes(body, 16 << 20).await.unwrap_or_default();
    let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    if parts.status != StatusCode::OK {
        let (status, kind) = match parts.status.as_u16() {
            503 => (StatusCode::from_u16(529).expect("529"), "overloaded_error"),
            500 => (parts.status, "api_error"),
            429 => (parts.status, "rate_limit_error"),
            401 => (parts.status, "authentication_error"),
            403 => (parts.status, "permission_error"),
            404 => (parts.status, "not_found_error"),
            _ => (parts.status, "invalid_request_error"),
        };
        let message = v["error"]["message"].as_str().unwrap_or("error").to_string();
        let mut e = json!({"type": "error", "error": {"type": kind, "message": message}});
        if v["error"]["type"] == "insufficient_quota" {
            e["error"]["message"] = json!("This request would exceed your organization's spend limit.");
            e["error"]["details"] = json!({"error_code": "enforced_spend_limit_reached"});
        }
        return (status, out, Json(e)).into_response();
    }
    if v.is_null() {
        return (parts.status, out, bytes).into_response(); // a malformed answer stays malformed
    }
    let text = v["choices"][0]["message"]["content"].as_str().unwrap_or_default().to_string();
    let content = match &tool {
        Some(t) => json!([{"type": "tool_use", "id": "toolu_sim", "name": t["name"],
                           "input": serde_json::from_str::<Value>(&text).unwrap_or(json!({}))}]),
        None => json!([{"type": "text", "text": text}]),
    };
    let body = json!({
        "id": format!("msg_sim_{}", v["id"].as_str().unwrap_or_default()),
        "type": "message",
        "role": "assistant",
        "model": v["model"],
        "content": content,
        "stop_reason": if tool.is_some() { "tool_use" } else { "end_turn" },
        "usage": {"input_tokens": v["usage"]["prompt_tokens"], "output_tokens": v["usage"]["completion_tokens"],
                  "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
    });
    (StatusCode::OK, out, Json(body)).into_response()
}

/// Counts, answers and records one request in the simulator's own dialect.
async fn respond(sim: &Sim, headers: &HeaderMap, request: &Value, body: &[u8]) -> Response {
    sim.counters.requests.fetch_add(1, Ordering::Relaxed);
    let now = sim.counters.in_flight.fetch_add(1, Ordering::AcqRel) + 1;
    sim.counters.max_in_flight.fetch_max(now, Ordering::AcqRel);
    let _leaving = InFlight(&sim.counters.in_flight);
    let config = sim.config.read().expect("config lock").clone();
    let item = request["messages"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["role"] == "user"))
        .map_or(0, |m| hash_of(m["content"].as_str().unwrap_or("")));
    let model = request["model"].as_str().unwrap_or("sim-small").to_string();
    let mut response = answer(sim, &config, headers, request, body).await;
    if config.no_limit_headers {
        let names: Vec<_> =
            response.headers().keys().filter(|k| k.as_str().starts_with("x-ratelimit-")).cloned().collect();
        for name in names {
            response.headers_mut().remove(name);
        }
    }
    let hash = if config.log_requests { hex::encode(&sha2::Sha256::digest(body)[..8]) } else { String::new() };
    let logged = config.log_bodies.then(|| request.clone());
    sim.record(response.status(), item, &model, config.log_requests.then_some((hash, logged)));
    response
}

/// Counts a request out of the in-flight gauge however its handler ends.
struct InFlight<'a>(&'a AtomicU64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn answer(sim: &Sim, config: &SimConfig, auth: &HeaderMap, request: &Value, body: &[u8]) -> Response {
    let c = &sim.counters;
    if let Some(key) = &config.api_key {
        let expected = format!("Bearer {key}");
        if auth.get("authorization").and_then(|v| v.to_str().ok()) != Some(expected.as_str()) {
            return error(StatusCode::UNAUTHORIZED, "invalid_api_key", "Incorrect API key provided");
        }
    }
    let Some(messages) = request["messages"].as_array() else {
        return error(StatusCode::BAD_REQUEST, "invalid_request_error", "missing messages");
    };
    let prompt_chars: usize = messages.iter().map(|m| m["content"].as_str().map_or(0, str::len)).sum();
    let text = messages.iter().rev().find(|m| m["role"] == "user").and_then(|m| m["content"].as_str()).unwrap_or("");
    let tokens_in = approx_tokens(prompt_chars);
    let live = !batch::answering();

    if live && sim.injected.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1)).is_ok() {
        c.status_429.fetch_add(1, Ordering::Relaxed);
        let mut resp = error(StatusCode::TOO_MANY_REQUESTS, "rate_limit_exceeded", "simulated rate limit");
        if let Some(limit) = config.limit_header_on_429 {
            resp.headers_mut().insert("x-ratelimit-limit-requests", limit.into());
        }
        return with_retry_after(resp, config.retry_after_s);
    }
    // Server-side limits, checked before anything else as a provider would.
    let limits = sim.limits.read().expect("limits lock").clone();
    let mut headers = HeaderMap::new();
    let model_name = request["model"].as_str().unwrap_or("sim-small");
    let reasoning = config.reasoning_models.iter().any(|m| m == model_name);
    let max_tokens = request["max_tokens"].as_u64().or(request["max_completion_tokens"].as_u64()).unwrap_or(256) as u32;
    let checks = [
        (&limits.requests, 1, limits.rpm, "requests"),
        (&limits.tokens, tokens_in + max_tokens, limits.tpm, "tokens"),
        (&limits.input, tokens_in, limits.input_tpm, "input-tokens"),
        (&limits.output, max_tokens, limits.output_tpm, "output-tokens"),
    ];
    for (l, cost, per_minute, name) in checks {
        // Batch requests have limits of their own (the enqueued tokens).
        let Some(l) = l.as_ref().filter(|_| live) else { continue };
        let Some(cost) = NonZeroU32::new(cost.max(1)) else { continue };
        // `reset`: the time until the budget is whole again, as OpenAI's
        // `x-ratelimit-reset-*` ("until the rate limit resets to its initial state").
        let set = |h: &mut HeaderMap, remaining: u32, reset: Duration| {
            h.insert(HeaderName::try_from(format!("x-ratelimit-limit-{name}")).expect("name"), per_minute.into());
            h.insert(HeaderName::try_from(format!("x-ratelimit-remaining-{name}")).expect("name"), remaining.into());
            h.insert(
                HeaderName::try_from(format!("x-ratelimit-reset-{name}")).expect("name"),
                HeaderValue::from_str(&format!("{}ms", reset.as_millis())).expect("ascii"),
            );
        };
        match l.check(cost, per_minute, config.full_bucket) {
            Ok((remaining, reset)) => set(&mut headers, remaining, reset),
            Err(Some(wait)) => {
                c.status_429.fetch_add(1, Ordering::Relaxed);
                let mut resp = error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limit_exceeded",
                    &format!("Rate limit reached for {name}"),
                );
                let capacity = if config.full_bucket { per_minute } else { (per_minute / 60).max(1) };
                let whole = Duration::from_secs_f64(capacity as f64 * 60.0 / per_minute.max(1) as f64);
                set(resp.headers_mut(), 0, whole);
                return with_retry_after(resp, (wait.as_secs_f64() * 1000.0).ceil() / 1000.0);
            }
            Err(None) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    &format!("request exceeds the {name}-per-minute limit on its own"),
                );
            }
        }
    }
    // OpenAI's reasoning-model rules, with its error texts.
    if reasoning {
        let unsupported = |param: &str, message: String| {
            (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": {"message": message, "type": "invalid_request_error", "param": param, "code": "unsupported_parameter"}})),
            )
                .into_response()
        };
        if request.get("max_tokens").is_some() {
            return unsupported("max_tokens", "Unsupported parameter: 'max_tokens' is not supported with this model. Use 'max_completion_tokens' instead.".into());
        }
        if request["temperature"].as_f64().is_some_and(|t| t != 1.0) {
            return unsupported("temperature", format!("Unsupported value: 'temperature' does not support {} with this model. Only the default (1) value is supported.", request["temperature"]));
        }
        if request.get("logprobs").is_some() {
            return unsupported(
                "logprobs",
                "Unsupported parameter: 'logprobs' is not supported with this model.".into(),
            );
        }
    }
    if config.no_json_schema && request["response_format"]["type"] == "json_schema" {
        // As llama.cpp's server answers it.
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "response_format type json_schema is not supported",
        );
    }
    let model = request["model"].as_str().unwrap_or("sim-small");
    if config.down_models.iter().any(|m| m == model) {
        c.status_503.fetch_add(1, Ordering::Relaxed);
        return error(StatusCode::SERVICE_UNAVAILABLE, "server_error", "the model is down");
    }
    if config.reject_models.iter().any(|m| m == model) {
        return error(
            StatusCode::BAD_REQUEST,
            "context_length_exceeded",
            "This model's maximum context length is exceeded",
        );
    }
    if config.context_tokens > 0 {
        let out = request["max_completion_tokens"].as_u64().or(request["max_tokens"].as_u64()).unwrap_or(0) as u32;
        if tokens_in + out > config.context_tokens {
            // OpenAI's body and wording, as users report them verbatim
            // (chathub-dev/chathub#126, The-Vibe-Company/quivr#505).
            let message = format!(
                "This model's maximum context length is {} tokens. However, you requested {} tokens ({tokens_in} in \
                 the messages, {out} in the completion). Please reduce the length of the messages or completion.",
                config.context_tokens,
                tokens_in + out
            );
            let body = json!({"error": {"message": message, "type": "invalid_request_error", "param": "messages",
                "code": "context_length_exceeded"}});
            return (StatusCode::BAD_REQUEST, Json(body)).into_response();
        }
    }
    let request_hash = hash_of(body);
    let attempt = if live && config.any_fault() {
        let mut seen = sim.attempts.lock().expect("attempts lock");
        let n = seen.entry(request_hash).or_insert(0);
        *n += 1;
        *n
    } else {
        1
    };
    let draw = unit(hash_of((config.seed, request_hash, attempt)));
    let latency = config.latency_ms
        + if config.latency_jitter_ms > 0 {
            hash_of((request_hash, attempt, 1u8)) % (config.latency_jitter_ms + 1)
        } else {
            0
        };

    // Faults, in a fixed order over [0, 1).
    let mut edge = 0.0;
    let mut hit = |share: f64| {
        let lo = edge;
        edge += share;
        draw >= lo && draw < edge
    };
    let fault = if !live {
        None // batch failures are drawn per batch request (`batch_fail`)
    } else if hit(config.error_500) {
        Some("500")
    } else if hit(config.error_503) {
        Some("503")
    } else if hit(config.error_429) {
        Some("429")
    } else if hit(config.hang) {
        Some("hang")
    } else if hit(config.malformed) {
        Some("malformed")
    } else if hit(config.bad_output) {
        Some("bad_output")
    } else if hit(config.quota) {
        Some("quota")
    } else {
        None
    };
    if live && latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    match fault {
        Some("500") => {
            c.status_500.fetch_add(1, Ordering::Relaxed);
            return error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "simulated internal error");
        }
        Some("503") => {
            c.status_503.fetch_add(1, Ordering::Relaxed);
            let resp = error(StatusCode::SERVICE_UNAVAILABLE, "server_error", "simulated overload");
            return with_retry_after(resp, config.retry_after_s);
        }
        Some("429") => {
            c.status_429.fetch_add(1, Ordering::Relaxed);
            let resp = error(StatusCode::TOO_MANY_REQUESTS, "rate_limit_exceeded", "simulated rate limit");
            return with_retry_after(resp, config.retry_after_s);
        }
        Some("hang") => {
            c.hangs.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(config.hang_ms)).await;
            return error(StatusCode::GATEWAY_TIMEOUT, "timeout", "simulated hang ended");
        }
        Some("quota") => {
            c.status_429.fetch_add(1, Ordering::Relaxed);
            return (
                StatusCode::TOO_MANY_REQUESTS,
                Json(json!({"error": {"message": "You exceeded your current quota", "type": "insufficient_quota", "code": "insufficient_quota"}})),
            )
                .into_response();
        }
        Some("malformed") => {
            c.malformed.fetch_add(1, Ordering::Relaxed);
            return (StatusCode::OK, [("content-type", "application/json")], "{\"choices\": [{\"message\": ")
                .into_response();
        }
        _ => {}
    }

    let prompt_schema = schema_in_prompt(messages);
    let schema = match &request["response_format"]["json_schema"]["schema"] {
        Value::Null => prompt_schema.as_ref().unwrap_or(&Value::Null),
        s => s,
    };
    let n = request["n"].as_u64().unwrap_or(1).clamp(1, 20) as usize;
    let temperature = request["temperature"].as_f64().unwrap_or(1.0);
    let (wrong, salt) = config.wrong_for(model);
    let model_cfg = Answering { wrong, seed: config.seed, salt };
    let mut choices = Vec::with_capacity(n);
    let mut tokens_out = 0u32;
    // The same request asked again at a temperature above 0 is sampled again.
    let asked = if temperature > 0.0 {
        let mut seen = sim.sampled.lock().expect("sampled lock");
        let k = seen.entry(request_hash).or_insert(0);
        *k += 1;
        *k
    } else {
        1
    };
    for i in 0..n {
        // The first answer to a request is the model's best; further samples
        // (and the answers when it is asked again) are drawn from its
        // distribution when the temperature allows.
        let draw = if i > 0 && temperature > 0.0 {
            Some(unit(hash_of((request_hash, i as u64, 7u8))))
        } else if asked > 1 {
            Some(unit(hash_of((request_hash, asked as u64, 8u8))))
        } else {
            None
        };
        let mut pick = Pick::default();
        let content = if fault == Some("bad_output") {
            json!({"sim_bad_output": true}).to_string()
        } else if schema.is_object() {
            fill(schema, text, &model_cfg, draw, &mut pick).to_string()
        } else if request["response_format"]["type"] == "json_object" {
            // JSON mode without a schema: some JSON object.
            json!({"answer": summary(text, 200)}).to_string()
        } else {
            summary(text, 200)
        };
        tokens_out += approx_tokens(content.len()).min(max_tokens.max(1));
        let logprobs = if request["logprobs"].as_bool() == Some(true) && !config.no_logprobs {
            token_logprobs(&content, &pick)
        } else {
            Value::Null
        };
        choices.push(json!({
            "index": i,
            "message": {"role": "assistant", "content": content},
            "logprobs": logprobs,
            "finish_reason": "stop"
        }));
    }
    if fault == Some("bad_output") {
        c.bad_output.fetch_add(1, Ordering::Relaxed);
    }
    // A reasoning model thinks before it answers: those tokens are output too.
    let reasoning_tokens = if reasoning { 3 * tokens_out } else { 0 };
    let tokens_out = tokens_out + reasoning_tokens;
    c.ok.fetch_add(1, Ordering::Relaxed);
    c.tokens_in.fetch_add(tokens_in as u64, Ordering::Relaxed);
    c.tokens_out.fetch_add(tokens_out as u64, Ordering::Relaxed);
    let body = json!({
        "id": format!("chatcmpl-sim-{request_hash:016x}"),
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": choices,
        "usage": {"prompt_tokens": tokens_in, "completion_tokens": tokens_out, "total_tokens": tokens_in + tokens_out,
                  "completion_tokens_details": {"reasoning_tokens": reasoning_tokens}}
    });
    (StatusCode::OK, headers, Json(body)).into_response()
}

/// How the simulated model answers.
struct Answering {
    wrong: f64,
    seed: u64,
    /// A model wrong on its own documents draws them with its name.
    salt: Option<String>,
}

/// The label chosen for an enum and the probabilities the model gave every label.
#[derive(Debug, Default)]
struct Pick {
    label: Option<String>,
    probs: Vec<(String, f64)>,
}

/// Tokens of `content` as a provider would return them with `logprobs`: the
/// chosen label is one token carrying its probability and the alternatives
/// (`top_logprobs`); the JSON around it is certain.
fn token_logprobs(content: &str, pick: &Pick) -> Value {
    let certain = |t: &str| json!({"token": t, "logprob": 0.0, "top_logprobs": []});
    let Some(label) = &pick.label else {
        return json!({"content": [certain(content)]});
    };
    let quoted = format!("\"{label}\"");
    let Some(at) = content.find(&quoted) else {
        return json!({"content": [certain(content)]});
    };
    let (before, after) = (&content[..at + 1], &content[at + 1 + label.len()..]);
    let p = pick.probs.iter().find(|(l, _)| l == label).map_or(1.0, |(_, p)| *p);
    let mut top: Vec<&(String, f64)> = pick.probs.iter().collect();
    top.sort_by(|a, b| b.1.total_cmp(&a.1));
    let top: Vec<Value> = top.iter().map(|(l, p)| json!({"token": l, "logprob": p.max(1e-12).ln()})).collect();
    json!({"content": [
        certain(before),
        {"token": label, "logprob": p.max(1e-12).ln(), "top_logprobs": top},
        certain(after)
    ]})
}

/// A JSON schema spelled out in the system message (when the response format
/// cannot carry it): what follows "JSON schema:" there.
fn schema_in_prompt(messages: &[Value]) -> Option<Value> {
    let system = messages.iter().find(|m| m["role"] == "system")?["content"].as_str()?;
    let (_, rest) = system.rsplit_once("JSON schema:")?;
    serde_json::from_str(rest.trim()).ok()
}

/// The document part of a prompt: what follows the last "Document:" marker, or all of it.
fn document(text: &str) -> &str {
    text.rsplit_once("Document:").map_or(text, |(_, d)| d).trim()
}

/// The first words of the document, at most `max` characters.
fn summary(text: &str, max: usize) -> String {
    let mut out = String::new();
    for word in document(text).split_whitespace() {
        if out.len() + word.len() + 1 > max {
            break;
        }
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(word);
    }
    if out.is_empty() {
        out.push_str("Empty document.");
    }
    out
}

/// The probability the model gives each label: topic words plus smoothing,
/// so every label has some.
fn label_probs(text: &str, labels: &[String]) -> Vec<(String, f64)> {
    let scores: Vec<f64> = common::sample::scores(text, labels).into_iter().map(|s| s as f64 + 0.05).collect();
    let total: f64 = scores.iter().sum();
    labels.iter().cloned().zip(scores.iter().map(|s| s / total)).collect()
}

/// A value satisfying `schema`, derived from `text`. Enum labels are chosen by
/// the label probabilities: the most likely one, or one drawn with `draw`.
fn fill(schema: &Value, text: &str, how: &Answering, draw: Option<f64>, pick: &mut Pick) -> Value {
    if let Some(options) = schema["enum"].as_array() {
        let labels: Vec<String> = options.iter().filter_map(|o| o.as_str().map(String::from)).collect();
        if labels.is_empty() {
            return options.first().cloned().unwrap_or(Value::Null);
        }
        let doc = document(text);
        let mut probs = label_probs(doc, &labels);
        // A document the model gets wrong: it prefers the runner-up label,
        // without much conviction.
        let h = match &how.salt {
            None => hash_of((how.seed, doc, 11u8)),
            Some(model) => hash_of((how.seed, doc, 11u8, model)),
        };
        if labels.len() > 1 && unit(h) < how.wrong {
            let mut order: Vec<usize> = (0..probs.len()).collect();
            order.sort_by(|a, b| probs[*b].1.total_cmp(&probs[*a].1));
            let (best, second) = (order[0], order[1]);
            let p_wrong = 0.40 + 0.2 * unit(hash_of((h, 1u8)));
            let p_right = (1.0 - p_wrong) * 0.6;
            let rest = (1.0 - p_wrong - p_right) / (probs.len() - 2).max(1) as f64;
            for (i, p) in probs.iter_mut().enumerate() {
                p.1 = if i == second {
                    p_wrong
                } else if i == best {
                    p_right
                } else {
                    rest
                };
            }
        }
        let chosen = match draw {
            Some(u) => {
                let mut acc = 0.0;
                probs
                    .iter()
                    .find(|(_, p)| {
                        acc += p;
                        u < acc
                    })
                    .unwrap_or(&probs[probs.len() - 1])
                    .0
                    .clone()
            }
            None => probs.iter().max_by(|a, b| a.1.total_cmp(&b.1)).map(|(l, _)| l.clone()).unwrap_or_default(),
        };
        if pick.label.is_none() {
            pick.label = Some(chosen.clone());
            pick.probs = probs;
        }
        return Value::String(chosen);
    }
    match schema["type"].as_str() {
        Some("object") => {
            let mut out = serde_json::Map::new();
            if let Some(props) = schema["properties"].as_object() {
                for (name, sub) in props {
                    out.insert(name.clone(), fill(sub, text, how, draw, pick));
                }
            }
            Value::Object(out)
        }
        Some("string") => {
            let max = schema["maxLength"].as_u64().unwrap_or(200) as usize;
            Value::String(summary(text, max))
        }
        Some("number") => json!(0.9),
        Some("integer") => json!(1),
        Some("boolean") => json!(true),
        Some("array") => json!([]),
        _ => Value::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rolling_window_starts_unspent_and_gives_back_only_what_aged_out() {
        let l = limiter(6, true, Window::Rolling).unwrap();
        let one = NonZeroU32::new(1).unwrap();
        for left in (0..6).rev() {
            let (remaining, reset) = l.check(one, 6, true).unwrap();
            assert_eq!((remaining, reset), (left, MINUTE));
        }
        // Spent: nothing comes back before the first unit is a minute old.
        let wait = l.check(one, 6, true).unwrap_err().unwrap();
        assert!(wait > Duration::from_secs(59) && wait <= MINUTE, "{wait:?}");
        assert_eq!(l.check(NonZeroU32::new(7).unwrap(), 6, true), Err(None), "more than the whole limit");
        // A minute on (moved back in time), the oldest unit is back.
        if let Limiter::Rolling(r) = &l {
            let mut r = r.lock().unwrap();
            let t = r.spent[0].0;
            r.spent[0].0 = t.checked_sub(MINUTE).expect("the machine is up for a minute");
        }
        assert_eq!(l.check(one, 6, true).unwrap().0, 0);
    }

    #[test]
    fn fills_enums_with_the_known_label() {
        let schema =
            json!({"type": "object", "properties": {"label": {"type": "string", "enum": common::sample::labels()}}});
        let how = Answering { wrong: 0.0, seed: 0, salt: None };
        for i in 0..200 {
            let doc = common::sample::document(9, i);
            let prompt = format!("Classify.\n\nDocument:\n{}", doc["text"].as_str().unwrap());
            let mut pick = Pick::default();
            let v = fill(&schema, &prompt, &how, None, &mut pick);
            assert_eq!(v["label"], doc["expected"]);
            let p = pick.probs.iter().find(|(l, _)| *l == doc["expected"]).unwrap().1;
            assert!(p > 0.6, "{p}");
            assert!((pick.probs.iter().map(|(_, p)| p).sum::<f64>() - 1.0).abs() < 1e-9);
        }
    }

    #[test]
    fn summaries_respect_max_length() {
        let schema = json!({"type": "string", "maxLength": 20});
        let how = Answering { wrong: 0.0, seed: 0, salt: None };
        let v = fill(&schema, "Document: one two three four five six seven eight", &how, None, &mut Pick::default());
        assert!(v.as_str().unwrap().len() <= 20, "{v}");
        assert_eq!(v, "one two three four");
    }

    #[test]
    fn wrong_answers_are_the_runner_up_with_less_probability() {
        let schema = json!({"type": "string", "enum": common::sample::labels()});
        let how = Answering { wrong: 1.0, seed: 0, salt: None };
        for i in 0..100 {
            let doc = common::sample::document(10, i);
            let mut pick = Pick::default();
            let v = fill(&schema, doc["text"].as_str().unwrap(), &how, None, &mut pick);
            assert_ne!(v, doc["expected"]);
            let p = pick.probs.iter().find(|(l, _)| *l == v).unwrap().1;
            assert!((0.4..0.6).contains(&p), "{p}");
        }
    }

    #[test]
    fn logprobs_single_out_the_label_token() {
        let pick = Pick { label: Some("sports".into()), probs: vec![("sports".into(), 0.8), ("health".into(), 0.2)] };
        let v = token_logprobs(r#"{"label":"sports"}"#, &pick);
        let tokens = v["content"].as_array().unwrap();
        let text: String = tokens.iter().map(|t| t["token"].as_str().unwrap()).collect();
        assert_eq!(text, r#"{"label":"sports"}"#);
        assert_eq!(tokens[1]["token"], "sports");
        assert!((tokens[1]["logprob"].as_f64().unwrap() - 0.8f64.ln()).abs() < 1e-12);
        assert_eq!(tokens[1]["top_logprobs"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn draws_are_uniformish_and_deterministic() {
        let draws: Vec<f64> = (0..10_000u64).map(|i| unit(hash_of((1u64, i, 1u32)))).collect();
        assert!(draws.iter().all(|d| (0.0..1.0).contains(d)));
        let below = draws.iter().filter(|d| **d < 0.3).count();
        assert!((2_700..3_300).contains(&below), "{below}");
        assert_eq!(unit(hash_of((1u64, 5u64, 1u32))), draws[5]);
    }
}
