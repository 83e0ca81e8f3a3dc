//! The providers' batch APIs, simulated with accelerated time: OpenAI's Files and Batch API, and Anthropic's Message Batches.
//!
//! What is simulated, and where it is documented:
//! - OpenAI: `POST /v1/files` (multipart, `purpose=batch`), `GET
//!   /v1/files/{id}/content`, `POST /v1/batches`, `GET /v1/batches/{id}`,
//!   `POST /v1/batches/{id}/cancel`, `GET /v1/batches` (newest first,
//!   `limit`, `after`)
//!   (<https://platform.openai.com/docs/api-reference/batch>,
//!   <https://platform.openai.com/docs/guides/batch>). Statuses `validating`,
//!   `in_progress`, `completed`, `expired`, `cancelling`, `cancelled` and
//!   `failed` (a file that breaks the rules: over 50,000 requests, a repeated
//!   `custom_id`, a line for another endpoint); an output file of the
//!   requests answered and an error file of those that failed, with
//!   `batch_expired` and `batch_cancelled` for requests never run.
//! - Anthropic: `POST /v1/messages/batches` (`requests: [{custom_id,
//!   params}]`, at most 100,000), `GET /v1/messages/batches/{id}` (statuses
//!   `in_progress`, `canceling`, `ended`; `request_counts`; `results_url`),
//!   `GET /v1/messages/batches/{id}/results` (JSONL of `{custom_id, result:
//!   {type: succeeded|errored|canceled|expired}}`), `POST
//!   /v1/messages/batches/{id}/cancel`
//!   (<https://docs.anthropic.com/en/api/creating-message-batches>).
//!
//! A batch ends `batch_seconds` after it is created. Its requests are then
//! answered as live requests would be, but outside the live rate limits and
//! live faults: `batch_fail` of them fail and, with `batch_expire` above 0,
//! that share is never run and the batch ends expired. Cancelled, a batch
//! keeps the requests it had run by then (in order, in proportion to the
//! time elapsed). Draws depend on the seed, the `custom_id` and the batch, so
//! a request that failed in one batch may succeed in the next.
//!
//! Batch queues: a model's batches in progress (created, not yet past their
//! time, not cancelled) hold places in its queue. With `batch_queue_tokens`
//! an OpenAI batch that would take the queue's prompt tokens past it fails
//! at once with `token_limit_exceeded` ("Enqueued token limit reached for
//! MODEL in organization ORG. Limit: N enqueued tokens. Please try again
//! once some in_progress batches have been completed.", as in
//! openai/openai-python#2084); with `batch_queue_requests` an Anthropic batch
//! that would take the queue's requests past it is refused with a 429
//! `rate_limit_error`. Prompt tokens are counted as live answers count them.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Multipart, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use super::{hash_of, unit, Sim};

/// The most requests in one batch: OpenAI's input file and Anthropic's batch.
pub const OPENAI_MAX_REQUESTS: usize = 50_000;
pub const ANTHROPIC_MAX_REQUESTS: usize = 100_000;

tokio::task_local! {
    static BATCH: ();
}

/// Whether the request being answered is part of a batch (outside the live
/// rate limits, faults and latency).
pub(crate) fn answering() -> bool {
    BATCH.try_with(|_| ()).is_ok()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dialect {
    OpenAi,
    Anthropic,
}

/// How a batch ended.
#[derive(Debug, Clone, Copy, PartialEq)]
enum End {
    Completed,
    Expired,
    /// Cancelled with this share of its requests run.
    Cancelled(f64),
}

/// What became of one request of an ended batch.
enum Outcome {
    Answered {
        status: StatusCode,
        body: Value,
    },
    /// Failed inside the provider (`batch_fail`).
    Failed,
    NotRun(End),
}

struct SimBatch {
    dialect: Dialect,
    serial: u64,
    created: Instant,
    created_at: i64,
    endpoint: String,
    input_file_id: Option<String>,
    metadata: Value,
    /// `custom_id` and the request (OpenAI: the body; Anthropic: params).
    requests: Vec<(String, Value)>,
    /// The requests' model (the first request's) and prompt tokens.
    model: String,
    tokens: u64,
    /// Validation errors: the batch failed without running.
    errors: Vec<Value>,
    cancel_requested: Option<Instant>,
    ended: Option<(End, i64, Vec<Outcome>)>,
    output_file_id: Option<String>,
    error_file_id: Option<String>,
}

/// The simulator's files and batches.
#[derive(Default)]
pub struct Store {
    files: Mutex<HashMap<String, Arc<Vec<u8>>>>,
    batches: tokio::sync::Mutex<HashMap<String, SimBatch>>,
    next: AtomicU64,
    /// Batches created, for tests that count submissions.
    pub created: AtomicU64,
    /// Batches turned away because their model's queue was full.
    pub refused: AtomicU64,
    /// The most prompt tokens and requests a model's queue held at once.
    pub max_queued_tokens: AtomicU64,
    pub max_queued_requests: AtomicU64,
}

impl SimBatch {
    /// Whether the batch holds places in its model's queue.
    fn queued(&self, batch_seconds: f64) -> bool {
        self.errors.is_empty()
            && self.ended.is_none()
            && self.cancel_requested.is_none()
            && self.created.elapsed().as_secs_f64() < batch_seconds
    }
}

/// A batch's model and prompt tokens.
fn measure(requests: &[(String, Value)]) -> (String, u64) {
    let model = requests.first().and_then(|(_, r)| r["model"].as_str()).unwrap_or_default().to_string();
    let tokens = requests
        .iter()
        .map(|(_, r)| {
            let text = |v: &Value| v.as_str().map_or(0, str::len);
            let chars: usize = r["messages"].as_array().map_or(0, |m| m.iter().map(|m| text(&m["content"])).sum());
            u64::from(super::approx_tokens(chars + text(&r["system"])))
        })
        .sum();
    (model, tokens)
}

/// What `model`'s queue holds now: (prompt tokens, requests).
fn queue(batches: &HashMap<String, SimBatch>, model: &str, batch_seconds: f64) -> (u64, u64) {
    batches
        .values()
        .filter(|b| b.model == model && b.queued(batch_seconds))
        .fold((0, 0), |(t, r), b| (t + b.tokens, r + b.requests.len() as u64))
}

/// Records that `model`'s queue holds `(tokens, requests)` with a batch just taken.
fn note_queue(store: &Store, (tokens, requests): (u64, u64)) {
    store.max_queued_tokens.fetch_max(tokens, Ordering::Relaxed);
    store.max_queued_requests.fetch_max(requests, Ordering::Relaxed);
}

impl Store {
    fn id(&self, prefix: &str) -> (String, u64) {
        let n = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        (format!("{prefix}{n:012}"), n)
    }

    fn add_file(&self, bytes: Vec<u8>) -> String {
        let (id, _) = self.id("file-sim");
        self.files.lock().expect("files lock").insert(id.clone(), Arc::new(bytes));
        id
    }
}

pub(crate) fn routes() -> Router<Arc<Sim>> {
    Router::new()
        .route("/v1/files", post(upload))
        .route("/v1/files/{id}/content", get(file_content))
        .route("/v1/batches", post(create_openai).get(list_openai))
        .route("/v1/batches/{id}", get(retrieve_openai))
        .route("/v1/batches/{id}/cancel", post(cancel_openai))
        .route("/v1/messages/batches", post(create_anthropic))
        .route("/v1/messages/batches/{id}", get(retrieve_anthropic))
        .route("/v1/messages/batches/{id}/cancel", post(cancel_anthropic))
        .route("/v1/messages/batches/{id}/results", get(results_anthropic))
}

fn now_unix() -> i64 {
    chrono::Utc::now().timestamp()
}

fn openai_error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({"error": {"message": message, "type": "invalid_request_error"}}))).into_response()
}

fn anthropic_error(status: StatusCode, kind: &str, message: &str) -> Response {
    (status, Json(json!({"type": "error", "error": {"type": kind, "message": message}}))).into_response()
}

/// Checks the API key as the live endpoints do; `None` when it is accepted.
fn refused(sim: &Sim, headers: &HeaderMap, dialect: Dialect) -> Option<Response> {
    let key = sim.config.read().expect("config lock").api_key.clone()?;
    let given = match dialect {
        Dialect::OpenAi => headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_string),
        Dialect::Anthropic => headers.get("x-api-key").and_then(|v| v.to_str().ok()).map(str::to_string),
    };
    (given.as_deref() != Some(key.as_str())).then(|| match dialect {
        Dialect::OpenAi => openai_error(StatusCode::UNAUTHORIZED, "Incorrect API key provided"),
        Dialect::Anthropic => anthropic_error(StatusCode::UNAUTHORIZED, "authentication_error", "invalid x-api-key"),
    })
}

/// `POST /v1/files`: a multipart upload with `purpose` and `file`.
async fn upload(State(sim): State<Arc<Sim>>, headers: HeaderMap, mut form: Multipart) -> Response {
    if let Some(r) = refused(&sim, &headers, Dialect::OpenAi) {
        return r;
    }
    let (mut purpose, mut file, mut filename) = (None, None, String::from("upload.jsonl"));
    while let Ok(Some(field)) = form.next_field().await {
        match field.name() {
            Some("purpose") => purpose = field.text().await.ok(),
            Some("file") => {
                filename = field.file_name().unwrap_or("upload.jsonl").to_string();
                file = field.bytes().await.ok().map(|b| b.to_vec());
            }
            _ => {}
        }
    }
    let Some(file) = file else { return openai_error(StatusCode::BAD_REQUEST, "'file' is a required property") };
    if purpose.as_deref() != Some("batch") {
        return openai_error(StatusCode::BAD_REQUEST, "this simulator takes purpose 'batch' only");
    }
    let bytes = file.len();
    let id = sim.batches.add_file(file);
    Json(json!({"id": id, "object": "file", "bytes": bytes, "created_at": now_unix(), "filename": filename,
                "purpose": "batch"}))
    .into_response()
}

/// `GET /v1/files/{id}/content`.
async fn file_content(State(sim): State<Arc<Sim>>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if let Some(r) = refused(&sim, &headers, Dialect::OpenAi) {
        return r;
    }
    match sim.batches.files.lock().expect("files lock").get(&id) {
        Some(bytes) => {
            (StatusCode::OK, [("content-type", "application/octet-stream")], bytes.as_ref().clone()).into_response()
        }
        None => openai_error(StatusCode::NOT_FOUND, &format!("No such File object: {id}")),
    }
}

/// `POST /v1/batches`.
async fn create_openai(State(sim): State<Arc<Sim>>, headers: HeaderMap, Json(req): Json<Value>) -> Response {
    if let Some(r) = refused(&sim, &headers, Dialect::OpenAi) {
        return r;
    }
    let endpoint = req["endpoint"].as_str().unwrap_or_default().to_string();
    if endpoint != "/v1/chat/completions" {
        return openai_error(StatusCode::BAD_REQUEST, "this simulator batches /v1/chat/completions only");
    }
    if req["completion_window"] != "24h" {
        return openai_error(StatusCode::BAD_REQUEST, "completion_window must be '24h'");
    }
    let input_file_id = req["input_file_id"].as_str().unwrap_or_default().to_string();
    let Some(file) = sim.batches.files.lock().expect("files lock").get(&input_file_id).cloned() else {
        return openai_error(StatusCode::NOT_FOUND, &format!("No such File object: {input_file_id}"));
    };
    let (mut requests, mut errors, mut seen) = (Vec::new(), Vec::new(), HashSet::new());
    let error = |line: usize, code: &str, message: String| json!({"code": code, "line": line, "message": message, "param": null});
    for (i, text) in String::from_utf8_lossy(&file).lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let line = i + 1;
        let Ok(v) = serde_json::from_str::<Value>(text) else {
            errors.push(error(line, "invalid_json_line", "This line is not parseable as valid JSON.".into()));
            continue;
        };
        let custom_id = v["custom_id"].as_str().unwrap_or_default().to_string();
        if v["url"] != endpoint.as_str() {
            errors.push(error(
                line,
                "mismatched_endpoint",
                format!("The url must match the batch's endpoint {endpoint}."),
            ));
        } else if !seen.insert(custom_id.clone()) {
            errors.push(error(line, "duplicate_custom_id", "The custom_id for this request is a duplicate.".into()));
        } else {
            requests.push((custom_id, v["body"].clone()));
        }
    }
    if requests.len() > OPENAI_MAX_REQUESTS {
        errors.push(error(0, "too_many_requests", format!("A batch may hold at most {OPENAI_MAX_REQUESTS} requests.")));
    }
    let (model, tokens) = measure(&requests);
    let config = sim.config.read().expect("config lock").clone();
    let mut batches = sim.batches.batches.lock().await;
    if errors.is_empty() {
        let (queued, n) = queue(&batches, &model, config.batch_seconds);
        let limit = config.batch_queue_tokens;
        if limit > 0 && queued + tokens > limit {
            sim.batches.refused.fetch_add(1, Ordering::Relaxed);
            let message = format!(
                "Enqueued token limit reached for {model} in organization org-sim. Limit: {limit} enqueued tokens. \
                 Please try again once some in_progress batches have been completed."
            );
            errors.push(json!({"code": "token_limit_exceeded", "line": null, "message": message, "param": null}));
        } else {
            note_queue(&sim.batches, (queued + tokens, n + requests.len() as u64));
        }
    }
    let (id, serial) = sim.batches.id("batch_sim");
    sim.batches.created.fetch_add(1, Ordering::Relaxed);
    let batch = SimBatch {
        dialect: Dialect::OpenAi,
        serial,
        created: Instant::now(),
        created_at: now_unix(),
        endpoint,
        input_file_id: Some(input_file_id),
        metadata: req.get("metadata").cloned().unwrap_or(Value::Null),
        requests,
        model,
        tokens,
        errors,
        cancel_requested: None,
        ended: None,
        output_file_id: None,
        error_file_id: None,
    };
    let body = openai_object(&id, &batch, Some("validating"));
    batches.insert(id, batch);
    drop(batches);
    if config.batch_create_delay_ms > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(config.batch_create_delay_ms)).await;
    }
    Json(body).into_response()
}

/// `GET /v1/batches?limit=&after=`: newest first.
async fn list_openai(
    State(sim): State<Arc<Sim>>,
    headers: HeaderMap,
    axum::extract::Query(q): axum::extract::Query<HashMap<String, String>>,
) -> Response {
    if let Some(r) = refused(&sim, &headers, Dialect::OpenAi) {
        return r;
    }
    let limit = q.get("limit").and_then(|l| l.parse::<usize>().ok()).unwrap_or(20).clamp(1, 100);
    let mut batches = sim.batches.batches.lock().await;
    let mut ids: Vec<(u64, String)> =
        batches.iter().filter(|(_, b)| b.dialect == Dialect::OpenAi).map(|(id, b)| (b.serial, id.clone())).collect();
    ids.sort_unstable_by(|a, b| b.cmp(a));
    if let Some(after) = q.get("after") {
        if let Some(at) = ids.iter().position(|(_, id)| id == after) {
            ids.drain(..=at);
        }
    }
    let has_more = ids.len() > limit;
    ids.truncate(limit);
    let mut data = Vec::with_capacity(ids.len());
    for (_, id) in &ids {
        if let Ok(b) = advanced(&sim, &mut batches, id, Dialect::OpenAi).await {
            data.push(openai_object(id, b, None));
        }
    }
    Json(json!({
        "object": "list",
        "data": data,
        "first_id": ids.first().map(|(_, id)| id),
        "last_id": ids.last().map(|(_, id)| id),
        "has_more": has_more,
    }))
    .into_response()
}

/// Ends `batch` if its time has come (or it was cancelled), answering its requests.
async fn advance(sim: &Arc<Sim>, batch: &mut SimBatch) {
    if batch.ended.is_some() || !batch.errors.is_empty() {
        return;
    }
    let config = sim.config.read().expect("config lock").clone();
    let elapsed = batch.created.elapsed().as_secs_f64();
    let end = match batch.cancel_requested {
        Some(at) => {
            let run = at.duration_since(batch.created).as_secs_f64() / config.batch_seconds.max(f64::MIN_POSITIVE);
            End::Cancelled(run.min(1.0))
        }
        None if elapsed < config.batch_seconds => return,
        None if config.batch_expire > 0.0 => End::Expired,
        None => End::Completed,
    };
    let n = batch.requests.len();
    let mut outcomes = Vec::with_capacity(n);
    for (i, (custom_id, request)) in batch.requests.iter().enumerate() {
        let draw = |what: u8| unit(hash_of((config.seed, custom_id.as_str(), batch.serial, what)));
        let run = match end {
            End::Completed => true,
            End::Expired => draw(1) >= config.batch_expire,
            End::Cancelled(share) => ((i + 1) as f64) <= share * n as f64,
        };
        if !run {
            outcomes.push(Outcome::NotRun(end));
        } else if draw(2) < config.batch_fail {
            outcomes.push(Outcome::Failed);
        } else {
            outcomes.push(answer(sim, batch.dialect, request).await);
        }
    }
    batch.ended = Some((end, now_unix(), outcomes));
    if batch.dialect == Dialect::OpenAi {
        let (output, errors) = openai_files(batch);
        batch.output_file_id = (!output.is_empty()).then(|| sim.batches.add_file(output));
        batch.error_file_id = (!errors.is_empty()).then(|| sim.batches.add_file(errors));
    }
}

/// Answers one request of a batch through the live handler, outside the
/// live limits, faults and latency.
async fn answer(sim: &Arc<Sim>, dialect: Dialect, request: &Value) -> Outcome {
    let body = Bytes::from(serde_json::to_vec(request).expect("a JSON value serialises"));
    let key = sim.config.read().expect("config lock").api_key.clone();
    let mut headers = HeaderMap::new();
    let response = match dialect {
        Dialect::OpenAi => {
            if let Some(k) = key {
                headers.insert("authorization", HeaderValue::from_str(&format!("Bearer {k}")).expect("ascii"));
            }
            BATCH.scope((), super::chat(State(sim.clone()), headers, body)).await
        }
        Dialect::Anthropic => {
            headers.insert("anthropic-version", HeaderValue::from_static("2023-06-01"));
            if let Some(k) = key {
                headers.insert("x-api-key", HeaderValue::from_str(&k).expect("ascii"));
            }
            BATCH.scope((), super::messages(State(sim.clone()), headers, body)).await
        }
    };
    let (parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, 16 << 20).await.unwrap_or_default();
    let body = serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
    Outcome::Answered { status: parts.status, body }
}

fn request_id(batch: &SimBatch, i: usize) -> String {
    format!("req_sim_{}_{i}", batch.serial)
}

/// The output and error files of an ended OpenAI batch.
fn openai_files(batch: &SimBatch) -> (Vec<u8>, Vec<u8>) {
    let (mut output, mut errors) = (Vec::new(), Vec::new());
    let Some((_, _, outcomes)) = &batch.ended else { return (output, errors) };
    for (i, ((custom_id, _), outcome)) in batch.requests.iter().zip(outcomes).enumerate() {
        let id = format!("batch_req_sim_{}_{i}", batch.serial);
        let response = |status: StatusCode, body: &Value| json!({"status_code": status.as_u16(), "request_id": request_id(batch, i), "body": body});
        let (line, ok) = match outcome {
            Outcome::Answered { status, body } => (
                json!({"id": id, "custom_id": custom_id, "response": response(*status, body), "error": null}),
                *status == StatusCode::OK,
            ),
            Outcome::Failed => {
                let body = json!({"error": {"message": "simulated batch request failure", "type": "server_error",
                                            "param": null, "code": null}});
                let status = StatusCode::INTERNAL_SERVER_ERROR;
                (json!({"id": id, "custom_id": custom_id, "response": response(status, &body), "error": null}), false)
            }
            Outcome::NotRun(end) => {
                let (code, message) = match end {
                    End::Cancelled(_) => {
                        ("batch_cancelled", "This request was not executed because the batch was cancelled.")
                    }
                    _ => ("batch_expired", "This request could not be executed before the completion window expired."),
                };
                (
                    json!({"id": id, "custom_id": custom_id, "response": null, "error": {"code": code, "message": message}}),
                    false,
                )
            }
        };
        let out = if ok { &mut output } else { &mut errors };
        serde_json::to_writer(&mut *out, &line).expect("a JSON value serialises");
        out.push(b'\n');
    }
    (output, errors)
}

/// An OpenAI batch object; `status` overrides the one its state gives.
fn openai_object(id: &str, batch: &SimBatch, status: Option<&str>) -> Value {
    let total = batch.requests.len();
    let (state, completed, failed, ended_at) = match &batch.ended {
        _ if !batch.errors.is_empty() => ("failed", 0, 0, Some(batch.created_at)),
        None if batch.cancel_requested.is_some() => ("cancelling", 0, 0, None),
        None => ("in_progress", 0, 0, None),
        Some((end, at, outcomes)) => {
            let ok = outcomes
                .iter()
                .filter(|o| matches!(o, Outcome::Answered { status, .. } if *status == StatusCode::OK))
                .count();
            let run = outcomes.iter().filter(|o| !matches!(o, Outcome::NotRun(_))).count();
            let state = match end {
                End::Completed => "completed",
                End::Expired => "expired",
                End::Cancelled(_) => "cancelled",
            };
            (state, ok, run - ok, Some(*at))
        }
    };
    let status = status.unwrap_or(state);
    let at = |s: &str| if status == s { json!(ended_at) } else { Value::Null };
    json!({
        "id": id,
        "object": "batch",
        "endpoint": batch.endpoint,
        "errors": if batch.errors.is_empty() { Value::Null } else { json!({"object": "list", "data": batch.errors}) },
        "input_file_id": batch.input_file_id,
        "completion_window": "24h",
        "status": status,
        "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
        "created_at": batch.created_at,
        "in_progress_at": batch.created_at,
        "expires_at": batch.created_at + 86_400,
        "completed_at": at("completed"),
        "failed_at": at("failed"),
        "expired_at": at("expired"),
        "cancelled_at": at("cancelled"),
        "request_counts": {"total": total, "completed": completed, "failed": failed},
        "metadata": batch.metadata,
    })
}

/// Batch `id` of `dialect`, advanced to now, or the dialect's 404.
async fn advanced<'a>(
    sim: &Arc<Sim>,
    batches: &'a mut HashMap<String, SimBatch>,
    id: &str,
    dialect: Dialect,
) -> Result<&'a mut SimBatch, Response> {
    let Some(batch) = batches.get_mut(id).filter(|b| b.dialect == dialect) else {
        return Err(match dialect {
            Dialect::OpenAi => openai_error(StatusCode::NOT_FOUND, &format!("No batch found with id '{id}'")),
            Dialect::Anthropic => {
                anthropic_error(StatusCode::NOT_FOUND, "not_found_error", &format!("no message batch {id}"))
            }
        });
    };
    advance(sim, batch).await;
    Ok(batch)
}

/// `GET /v1/batches/{id}`.
async fn retrieve_openai(State(sim): State<Arc<Sim>>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if let Some(r) = refused(&sim, &headers, Dialect::OpenAi) {
        return r;
    }
    let mut batches = sim.batches.batches.lock().await;
    let batch = match advanced(&sim, &mut batches, &id, Dialect::OpenAi).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    Json(openai_object(&id, batch, None)).into_response()
}

/// `POST /v1/batches/{id}/cancel`: `cancelling` now, `cancelled` at the next retrieve.
async fn cancel_openai(State(sim): State<Arc<Sim>>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if let Some(r) = refused(&sim, &headers, Dialect::OpenAi) {
        return r;
    }
    let mut batches = sim.batches.batches.lock().await;
    let batch = match advanced(&sim, &mut batches, &id, Dialect::OpenAi).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    if batch.ended.is_some() {
        return openai_error(StatusCode::CONFLICT, "Cannot cancel a batch that has already ended.");
    }
    batch.cancel_requested.get_or_insert_with(Instant::now);
    Json(openai_object(&id, batch, None)).into_response()
}

/// `POST /v1/messages/batches`.
async fn create_anthropic(State(sim): State<Arc<Sim>>, headers: HeaderMap, Json(req): Json<Value>) -> Response {
    if let Some(r) = refused(&sim, &headers, Dialect::Anthropic) {
        return r;
    }
    if headers.get("anthropic-version").is_none() {
        return anthropic_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "anthropic-version: header is required",
        );
    }
    let Some(list) = req["requests"].as_array().filter(|l| !l.is_empty()) else {
        return anthropic_error(StatusCode::BAD_REQUEST, "invalid_request_error", "requests: Field required");
    };
    if list.len() > ANTHROPIC_MAX_REQUESTS {
        let message = format!("requests: at most {ANTHROPIC_MAX_REQUESTS} requests a batch");
        return anthropic_error(StatusCode::BAD_REQUEST, "invalid_request_error", &message);
    }
    let mut seen = HashSet::new();
    let mut requests = Vec::with_capacity(list.len());
    for r in list {
        let custom_id = r["custom_id"].as_str().unwrap_or_default().to_string();
        if custom_id.is_empty() || !seen.insert(custom_id.clone()) {
            let message = format!("requests: custom_id {custom_id:?} is missing or not unique");
            return anthropic_error(StatusCode::BAD_REQUEST, "invalid_request_error", &message);
        }
        requests.push((custom_id, r["params"].clone()));
    }
    let (model, tokens) = measure(&requests);
    let config = sim.config.read().expect("config lock").clone();
    let mut batches = sim.batches.batches.lock().await;
    let (queued, n) = queue(&batches, &model, config.batch_seconds);
    let limit = config.batch_queue_requests;
    if limit > 0 && n + requests.len() as u64 > limit {
        sim.batches.refused.fetch_add(1, Ordering::Relaxed);
        let message = format!(
            "Number of requests in your batch processing queue for {model} would exceed the limit of {limit}; \
             try again once batches in progress have ended"
        );
        let mut r = anthropic_error(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", &message);
        r.headers_mut().insert("retry-after", HeaderValue::from_static("1"));
        return r;
    }
    note_queue(&sim.batches, (queued + tokens, n + requests.len() as u64));
    let (id, serial) = sim.batches.id("msgbatch_sim");
    sim.batches.created.fetch_add(1, Ordering::Relaxed);
    let batch = SimBatch {
        dialect: Dialect::Anthropic,
        serial,
        created: Instant::now(),
        created_at: now_unix(),
        endpoint: "/v1/messages".into(),
        input_file_id: None,
        metadata: Value::Null,
        requests,
        model,
        tokens,
        errors: Vec::new(),
        cancel_requested: None,
        ended: None,
        output_file_id: None,
        error_file_id: None,
    };
    let body = anthropic_object(&id, &batch, &headers);
    batches.insert(id, batch);
    Json(body).into_response()
}

fn rfc3339(unix: i64) -> String {
    chrono::DateTime::from_timestamp(unix, 0).unwrap_or_default().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// An Anthropic message batch object.
fn anthropic_object(id: &str, batch: &SimBatch, headers: &HeaderMap) -> Value {
    let total = batch.requests.len();
    let mut counts = json!({"processing": total, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0});
    let (status, ended_at) = match &batch.ended {
        None if batch.cancel_requested.is_some() => ("canceling", None),
        None => ("in_progress", None),
        Some((_, at, outcomes)) => {
            counts["processing"] = json!(0);
            for o in outcomes {
                let k = match o {
                    Outcome::Answered { status, .. } if *status == StatusCode::OK => "succeeded",
                    Outcome::Answered { .. } | Outcome::Failed => "errored",
                    Outcome::NotRun(End::Cancelled(_)) => "canceled",
                    Outcome::NotRun(_) => "expired",
                };
                counts[k] = json!(counts[k].as_u64().unwrap_or(0) + 1);
            }
            ("ended", Some(*at))
        }
    };
    let host = headers.get("host").and_then(|h| h.to_str().ok()).unwrap_or("127.0.0.1");
    json!({
        "id": id,
        "type": "message_batch",
        "processing_status": status,
        "request_counts": counts,
        "ended_at": ended_at.map(rfc3339),
        "created_at": rfc3339(batch.created_at),
        "expires_at": rfc3339(batch.created_at + 86_400),
        "archived_at": null,
        "cancel_initiated_at": batch.cancel_requested.map(|_| rfc3339(now_unix())),
        "results_url": ended_at.map(|_| format!("http://{host}/v1/messages/batches/{id}/results")),
    })
}

/// `GET /v1/messages/batches/{id}`.
async fn retrieve_anthropic(State(sim): State<Arc<Sim>>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if let Some(r) = refused(&sim, &headers, Dialect::Anthropic) {
        return r;
    }
    let mut batches = sim.batches.batches.lock().await;
    let batch = match advanced(&sim, &mut batches, &id, Dialect::Anthropic).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    Json(anthropic_object(&id, batch, &headers)).into_response()
}

/// `POST /v1/messages/batches/{id}/cancel`.
async fn cancel_anthropic(State(sim): State<Arc<Sim>>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if let Some(r) = refused(&sim, &headers, Dialect::Anthropic) {
        return r;
    }
    let mut batches = sim.batches.batches.lock().await;
    let batch = match advanced(&sim, &mut batches, &id, Dialect::Anthropic).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    if batch.ended.is_none() {
        batch.cancel_requested.get_or_insert_with(Instant::now);
    }
    Json(anthropic_object(&id, batch, &headers)).into_response()
}

/// `GET /v1/messages/batches/{id}/results`: one result a line, once the batch has ended.
async fn results_anthropic(State(sim): State<Arc<Sim>>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if let Some(r) = refused(&sim, &headers, Dialect::Anthropic) {
        return r;
    }
    let batches = sim.batches.batches.lock().await;
    let Some(batch) = batches.get(&id).filter(|b| b.dialect == Dialect::Anthropic) else {
        return anthropic_error(StatusCode::NOT_FOUND, "not_found_error", &format!("no message batch {id}"));
    };
    let Some((_, _, outcomes)) = &batch.ended else {
        return anthropic_error(StatusCode::BAD_REQUEST, "invalid_request_error", "the batch is still processing");
    };
    let mut out = Vec::new();
    for ((custom_id, _), outcome) in batch.requests.iter().zip(outcomes) {
        let result = match outcome {
            Outcome::Answered { status, body } if *status == StatusCode::OK => {
                json!({"type": "succeeded", "message": body})
            }
            Outcome::Answered { body, .. } => json!({"type": "errored", "error": body}),
            Outcome::Failed => json!({"type": "errored", "error": {"type": "error",
                "error": {"type": "api_error", "message": "simulated batch request failure"}}}),
            Outcome::NotRun(End::Cancelled(_)) => json!({"type": "canceled"}),
            Outcome::NotRun(_) => json!({"type": "expired"}),
        };
        serde_json::to_writer(&mut out, &json!({"custom_id": custom_id, "result": result})).expect("serialises");
        out.push(b'\n');
    }
    (StatusCode::OK, [("content-type", "application/binary")], out).into_response()
}
