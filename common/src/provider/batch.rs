//! The providers' batch APIs: many calls submitted at once, answered within hours at half the price, each answer parsed as a live call's would be.
//!
//! - OpenAI (and OpenAI-compatible servers that offer it): the JSONL input
//!   file is uploaded to `POST /files` (multipart, `purpose=batch`), the batch
//!   created with `POST /batches` (`input_file_id`, `endpoint:
//!   /v1/chat/completions`, `completion_window: 24h`), polled with `GET
//!   /batches/{id}` until `completed`, `expired`, `cancelled` or `failed`,
//!   and its `output_file_id` and `error_file_id` read with `GET
//!   /files/{id}/content`. At most 50,000 requests and 200 MB a file
//!   (<https://platform.openai.com/docs/guides/batch>,
//!   <https://platform.openai.com/docs/api-reference/batch>).
//! - Anthropic: `POST /messages/batches` with `requests: [{custom_id,
//!   params}]`, polled with `GET /messages/batches/{id}` until
//!   `processing_status` is `ended`, results read from its `results_url`
//!   (one `{custom_id, result: {type: succeeded|errored|canceled|expired}}` a
//!   line). At most 100,000 requests and 256 MB a batch
//!   (<https://docs.anthropic.com/en/docs/build-with-claude/batch-processing>).
//!
//! Azure OpenAI's batches use other paths and deployments of their own and
//! are not offered.

use std::collections::HashMap;

use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Value};

use super::{anthropic, openai, CallError, ChatClient, Completion, ProviderKind, RateInfo};

/// The most requests one batch may hold, by dialect.
pub fn max_requests(kind: ProviderKind) -> usize {
    match kind {
        ProviderKind::Anthropic => 100_000,
        _ => 50_000,
    }
}

/// The most bytes of request bodies one batch should carry: OpenAI's input
/// file may be 200 MB and Anthropic's batch 256 MB; room is left for the
/// lines' framing.
pub fn max_bytes(kind: ProviderKind) -> usize {
    match kind {
        ProviderKind::Anthropic => 240_000_000,
        _ => 190_000_000,
    }
}

/// A batch's state at the provider.
#[derive(Debug, Clone, PartialEq)]
pub enum BatchState {
    /// Validating, in progress, finalizing or being cancelled.
    Pending,
    /// Ended (completed, expired or cancelled): its results can be read.
    Ended { status: String },
    /// Refused as a whole (OpenAI's `failed`: the file broke a rule).
    Failed { errors: String },
    /// Refused because the provider's batch queue for the model was full
    /// (OpenAI's `failed` with `token_limit_exceeded`): it never ran, and
    /// may be sent again once batches ahead of it end.
    QueueFull { errors: String },
}

/// What a batch said of itself when last asked.
#[derive(Debug, Clone)]
pub struct BatchStatus {
    pub id: String,
    pub state: BatchState,
    /// OpenAI: the output and error files; Anthropic: the results URL.
    results: Vec<String>,
}

/// What became of one request of an ended batch.
#[derive(Debug)]
pub enum BatchItem {
    Answered(Box<Completion>),
    Failed(CallError),
    /// Never run: the batch expired or was cancelled first (`expired`,
    /// `canceled`, `batch_expired`, `batch_cancelled`).
    NotRun(String),
}

/// The metadata key of a batch's label (OpenAI).
const LABEL_KEY: &str = "sluice_batch";

/// Why a batch operation failed: the provider's answer, sorted as a call's.
pub type BatchError = CallError;

impl ChatClient {
    fn authed(&self, builder: reqwest::RequestBuilder, api_key: Option<&SecretString>) -> reqwest::RequestBuilder {
        let mut builder = builder;
        if let Some(key) = api_key {
            let key = key.expose_secret();
            builder = match self.endpoint.kind {
                ProviderKind::Anthropic => builder.header("x-api-key", key),
                _ => builder.bearer_auth(key),
            };
        }
        if self.endpoint.kind == ProviderKind::Anthropic {
            let version = self.endpoint.anthropic_version.as_deref().unwrap_or(anthropic::DEFAULT_VERSION);
            builder = builder.header("anthropic-version", version);
        }
        builder
    }

    fn base(&self) -> &str {
        self.endpoint.base_url.trim_end_matches('/')
    }

    /// Sends a request of the batch API and reads a JSON answer.
    async fn batch_json(
        &self,
        builder: reqwest::RequestBuilder,
        api_key: Option<&SecretString>,
    ) -> Result<Value, BatchError> {
        let bytes = self.batch_bytes(builder, api_key).await?;
        serde_json::from_slice(&bytes).map_err(|e| CallError::Malformed(format!("batch API answer is not JSON: {e}")))
    }

    async fn batch_bytes(
        &self,
        builder: reqwest::RequestBuilder,
        api_key: Option<&SecretString>,
    ) -> Result<Vec<u8>, BatchError> {
        let response = self.authed(builder, api_key).send().await.map_err(super::transport_error)?;
        let status = response.status().as_u16();
        let retry_after = super::retry_after(response.headers());
        let bytes = response.bytes().await.map_err(super::transport_error)?;
        if status != 200 {
            let body = String::from_utf8_lossy(&bytes);
            return Err(match self.endpoint.kind {
                ProviderKind::Anthropic => anthropic::error(status, &body, retry_after, RateInfo::default()),
                _ => openai::error(status, &body, retry_after, RateInfo::default()),
            });
        }
        Ok(bytes.to_vec())
    }

    /// Submits one batch of `(custom_id, body)` requests, each body from
    /// [`ChatClient::body`]; returns the provider's batch id. OpenAI batches
    /// carry `label` in their metadata (as `sluice_batch`), so
    /// [`ChatClient::find_batch`] can find one whose id was never recorded.
    pub async fn submit_batch(
        &self,
        requests: &[(String, Vec<u8>)],
        label: Option<&str>,
        api_key: Option<&SecretString>,
    ) -> Result<String, BatchError> {
        let invalid = |message: String| CallError::InvalidRequest { status: 400, message };
        if requests.is_empty() || requests.len() > max_requests(self.endpoint.kind) {
            return Err(invalid(format!(
                "a batch holds 1 to {} requests, not {}",
                max_requests(self.endpoint.kind),
                requests.len()
            )));
        }
        let body = |b: &[u8]| {
            serde_json::from_slice::<Value>(b).map_err(|e| invalid(format!("a request body is not JSON: {e}")))
        };
        let answer = match self.endpoint.kind {
            ProviderKind::Anthropic => {
                let list = requests
                    .iter()
                    .map(|(id, b)| Ok(json!({"custom_id": id, "params": body(b)?})))
                    .collect::<Result<Vec<Value>, CallError>>()?;
                let url = format!("{}/messages/batches", self.base());
                self.batch_json(self.http.post(url).json(&json!({"requests": list})), api_key).await?
            }
            ProviderKind::AzureOpenai => {
                return Err(invalid("Azure OpenAI batches are not supported: use live calls".into()));
            }
            ProviderKind::Openai | ProviderKind::OpenaiCompatible => {
                let mut file = Vec::new();
                for (id, b) in requests {
                    let line =
                        json!({"custom_id": id, "method": "POST", "url": "/v1/chat/completions", "body": body(b)?});
                    serde_json::to_writer(&mut file, &line).expect("a JSON value serialises");
                    file.push(b'\n');
                }
                let part = reqwest::multipart::Part::bytes(file).file_name("sluice-batch.jsonl");
                let form = reqwest::multipart::Form::new().text("purpose", "batch").part("file", part);
                let uploaded =
                    self.batch_json(self.http.post(format!("{}/files", self.base())).multipart(form), api_key).await?;
                let file_id =
                    uploaded["id"].as_str().ok_or_else(|| CallError::Malformed("file upload without an id".into()))?;
                let mut create =
                    json!({"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"});
                if let Some(label) = label {
                    create["metadata"] = json!({ LABEL_KEY: label });
                }
                self.batch_json(self.http.post(format!("{}/batches", self.base())).json(&create), api_key).await?
            }
        };
        answer["id"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| CallError::Malformed("batch created without an id".into()))
    }

    /// The id of the most recent batch created with `label`, looking through
    /// the provider's latest batches (OpenAI: `GET /batches`, newest first,
    /// up to 300). Anthropic's batches carry no metadata: always `None`.
    pub async fn find_batch(&self, label: &str, api_key: Option<&SecretString>) -> Result<Option<String>, BatchError> {
        if self.endpoint.kind == ProviderKind::Anthropic {
            return Ok(None);
        }
        let mut after: Option<String> = None;
        for _ in 0..3 {
            let mut url = format!("{}/batches?limit=100", self.base());
            if let Some(a) = &after {
                url.push_str(&format!("&after={a}"));
            }
            let page = self.batch_json(self.http.get(url), api_key).await?;
            let data = page["data"].as_array().cloned().unwrap_or_default();
            if let Some(b) = data.iter().find(|b| b["metadata"][LABEL_KEY] == label) {
                return Ok(b["id"].as_str().map(str::to_string));
            }
            match (page["has_more"].as_bool(), page["last_id"].as_str()) {
                (Some(true), Some(last)) => after = Some(last.to_string()),
                _ => break,
            }
        }
        Ok(None)
    }

    /// Asks where batch `id` stands.
    pub async fn batch_status(&self, id: &str, api_key: Option<&SecretString>) -> Result<BatchStatus, BatchError> {
        let strings = |v: &[&Value]| v.iter().filter_map(|f| f.as_str().map(str::to_string)).collect::<Vec<_>>();
        let (state, results) = match self.endpoint.kind {
            ProviderKind::Anthropic => {
                let b =
                    self.batch_json(self.http.get(format!("{}/messages/batches/{id}", self.base())), api_key).await?;
                match b["processing_status"].as_str() {
                    Some("ended") => (BatchState::Ended { status: "ended".into() }, strings(&[&b["results_url"]])),
                    _ => (BatchState::Pending, Vec::new()),
                }
            }
            _ => {
                let b = self.batch_json(self.http.get(format!("{}/batches/{id}", self.base())), api_key).await?;
                let status = b["status"].as_str().unwrap_or_default().to_string();
                match status.as_str() {
                    "completed" | "expired" | "cancelled" => {
                        (BatchState::Ended { status }, strings(&[&b["output_file_id"], &b["error_file_id"]]))
                    }
                    "failed" => {
                        // {"errors": {"data": [{"code": "token_limit_exceeded", "message":
                        // "Enqueued token limit reached for MODEL ..."}]}} (openai/openai-python#2084)
                        let errors = b["errors"].to_string();
                        let codes: Vec<&str> = b["errors"]["data"]
                            .as_array()
                            .map(|d| d.iter().filter_map(|e| e["code"].as_str()).collect())
                            .unwrap_or_default();
                        let state = if !codes.is_empty() && codes.iter().all(|c| *c == "token_limit_exceeded") {
                            BatchState::QueueFull { errors }
                        } else {
                            BatchState::Failed { errors }
                        };
                        (state, Vec::new())
                    }
                    _ => (BatchState::Pending, Vec::new()),
                }
            }
        };
        Ok(BatchStatus { id: id.to_string(), state, results })
    }

    /// Asks the provider to cancel batch `id`; requests already run keep their answers.
    pub async fn cancel_batch(&self, id: &str, api_key: Option<&SecretString>) -> Result<(), BatchError> {
        let url = match self.endpoint.kind {
            ProviderKind::Anthropic => format!("{}/messages/batches/{id}/cancel", self.base()),
            _ => format!("{}/batches/{id}/cancel", self.base()),
        };
        self.batch_json(self.http.post(url), api_key).await.map(|_| ())
    }

    /// The outcome of every request of an ended batch, by `custom_id`.
    pub async fn batch_results(
        &self,
        status: &BatchStatus,
        api_key: Option<&SecretString>,
    ) -> Result<HashMap<String, BatchItem>, BatchError> {
        let mut out = HashMap::new();
        for source in &status.results {
            let url = match self.endpoint.kind {
                ProviderKind::Anthropic => source.clone(),
                _ => format!("{}/files/{source}/content", self.base()),
            };
            let bytes = self.batch_bytes(self.http.get(url), api_key).await?;
            for line in bytes.split(|b| *b == b'\n').filter(|l| !l.iter().all(u8::is_ascii_whitespace)) {
                let v: Value = serde_json::from_slice(line)
                    .map_err(|e| CallError::Malformed(format!("a batch result line is not JSON: {e}")))?;
                let Some(id) = v["custom_id"].as_str() else { continue };
                let item = match self.endpoint.kind {
                    ProviderKind::Anthropic => anthropic_item(&v["result"]),
                    _ => openai_item(&v),
                };
                out.insert(id.to_string(), item);
            }
        }
        Ok(out)
    }
}

/// One line of an OpenAI output or error file.
fn openai_item(v: &Value) -> BatchItem {
    let response = &v["response"];
    if response.is_object() {
        let status = response["status_code"].as_u64().unwrap_or(0) as u16;
        let body = serde_json::to_vec(&response["body"]).expect("a JSON value serialises");
        return match status {
            200 => match openai::parse(&body) {
                Ok(c) => BatchItem::Answered(Box::new(c)),
                Err(e) => BatchItem::Failed(e),
            },
            _ => BatchItem::Failed(openai::error(status, &String::from_utf8_lossy(&body), None, RateInfo::default())),
        };
    }
    let code = v["error"]["code"].as_str().unwrap_or_default();
    match code {
        "batch_expired" | "batch_cancelled" => BatchItem::NotRun(code.to_string()),
        _ => BatchItem::Failed(CallError::Server { status: 500, retry_after: None }),
    }
}

/// One `result` of an Anthropic batch.
fn anthropic_item(result: &Value) -> BatchItem {
    match result["type"].as_str() {
        Some("succeeded") => {
            let body = serde_json::to_vec(&result["message"]).expect("a JSON value serialises");
            match anthropic::parse(&body) {
                Ok(c) => BatchItem::Answered(Box::new(c)),
                Err(e) => BatchItem::Failed(e),
            }
        }
        Some(kind @ ("expired" | "canceled")) => BatchItem::NotRun(kind.to_string()),
        _ => {
            // {"type": "errored", "error": {"type": "error", "error": {"type", "message"}}}
            let error = &result["error"];
            let status = match error["error"]["type"].as_str().unwrap_or_default() {
                "invalid_request_error" => 400,
                "authentication_error" => 401,
                "permission_error" => 403,
                "not_found_error" => 404,
                "request_too_large" => 413,
                "rate_limit_error" => 429,
                "overloaded_error" => 529,
                _ => 500,
            };
            BatchItem::Failed(anthropic::error(status, &error.to_string(), None, RateInfo::default()))
        }
    }
}
