//! Model API clients: one dialect-neutral call, sent in the dialect of each provider kind, with errors sorted into the classes retries act on.
//!
//! The dialects live beside this file: [`openai`] (OpenAI, Azure OpenAI and
//! OpenAI-compatible servers) and [`anthropic`] (the Messages API). A new
//! dialect is a module with a `body` and a `parse` function and an arm in
//! [`ChatClient::complete`].

pub mod anthropic;
pub mod batch;
pub mod openai;

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use crate::providers::{MaxTokensParam, OutputMode, ProviderKind};

/// One chat message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// One answer token with its log-probability and the alternatives the model considered.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f64,
    #[serde(default)]
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f64,
}

/// A successful answer.
#[derive(Debug, Clone, Default)]
pub struct Completion {
    pub content: String,
    pub model: String,
    /// Input tokens, all of them (cached ones included).
    pub tokens_in: u32,
    /// Output tokens, reasoning tokens included: OpenAI's `completion_tokens`
    /// counts `completion_tokens_details.reasoning_tokens`
    /// (<https://platform.openai.com/docs/guides/reasoning>), and Anthropic's
    /// `output_tokens` counts extended thinking, billed as output
    /// (<https://docs.anthropic.com/en/docs/build-with-claude/extended-thinking>).
    pub tokens_out: u32,
    /// Of the input, tokens read from the provider's prompt cache.
    pub tokens_cached: u32,
    /// Of the input, tokens written to the provider's prompt cache (Anthropic).
    pub tokens_cache_write: u32,
    /// Of the output, tokens spent on reasoning, where the provider says
    /// (OpenAI reasoning models; Anthropic reports none apart). Recorded in
    /// the audit trail, never priced again.
    pub tokens_reasoning: u32,
    /// The first answer's tokens with log-probabilities, when asked for and sent.
    pub tokens: Vec<TokenLogprob>,
    /// Further sampled answers (with `n` > 1), after `content`.
    pub others: Vec<String>,
    /// What the provider said about its limits in the response headers.
    pub rate: RateInfo,
}

impl Completion {
    /// The tokens of this answer as they are priced.
    pub fn usage(&self) -> crate::prices::Usage {
        crate::prices::Usage {
            input: self.tokens_in,
            output: self.tokens_out,
            cached: self.tokens_cached,
            cache_write: self.tokens_cache_write,
        }
    }
}

/// What the provider said about its limits: OpenAI's and Azure's
/// `x-ratelimit-*` headers, or Anthropic's `anthropic-ratelimit-*`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RateInfo {
    /// Requests per minute allowed (`x-ratelimit-limit-requests`).
    pub limit_requests: Option<f64>,
    pub remaining_requests: Option<f64>,
    /// Tokens per minute allowed (`x-ratelimit-limit-tokens`).
    pub limit_tokens: Option<f64>,
    pub remaining_tokens: Option<f64>,
    /// Input and output tokens per minute, where limited apart (Anthropic).
    pub limit_input_tokens: Option<f64>,
    pub remaining_input_tokens: Option<f64>,
    pub limit_output_tokens: Option<f64>,
    pub remaining_output_tokens: Option<f64>,
    /// When the request budget is full again (`x-ratelimit-reset-requests`).
    pub reset_requests: Option<Duration>,
    pub reset_tokens: Option<Duration>,
}

impl RateInfo {
    /// OpenAI's headers: reset times are durations such as `6m0s` or `250ms`.
    /// <https://platform.openai.com/docs/guides/rate-limits> ("Rate limits in headers").
    /// Azure OpenAI sends the same names (often only `remaining-*`).
    pub fn from_headers(h: &reqwest::header::HeaderMap) -> Self {
        let dur = |name: &str| parse_reset(h.get(name)?.to_str().ok()?);
        RateInfo {
            limit_requests: header_num(h, "x-ratelimit-limit-requests"),
            remaining_requests: header_num(h, "x-ratelimit-remaining-requests"),
            limit_tokens: header_num(h, "x-ratelimit-limit-tokens"),
            remaining_tokens: header_num(h, "x-ratelimit-remaining-tokens"),
            reset_requests: dur("x-ratelimit-reset-requests"),
            reset_tokens: dur("x-ratelimit-reset-tokens"),
            ..Default::default()
        }
    }

    /// True when the provider said anything about its budget.
    pub fn is_empty(&self) -> bool {
        *self == RateInfo::default()
    }

    /// True when the provider announced a limit of any kind.
    pub fn announces_limit(&self) -> bool {
        [self.limit_requests, self.limit_tokens, self.limit_input_tokens, self.limit_output_tokens]
            .iter()
            .any(|l| l.is_some_and(|v| v > 0.0))
    }
}

/// A header holding a finite number that is not negative.
pub(crate) fn header_num(h: &reqwest::header::HeaderMap, name: &str) -> Option<f64> {
    h.get(name)?.to_str().ok()?.trim().parse::<f64>().ok().filter(|v| v.is_finite() && *v >= 0.0)
}

/// Parses OpenAI-style reset durations: `1s`, `250ms`, `6m0s`, `1m30.5s`, or plain seconds.
pub fn parse_reset(s: &str) -> Option<Duration> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(3600.0)));
    }
    let mut total = 0.0;
    let mut num = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() || c == '.' {
            num.push(c);
            continue;
        }
        let value: f64 = num.parse().ok()?;
        num.clear();
        total += match c {
            'h' => value * 3600.0,
            'm' if chars.peek() == Some(&'s') => {
                chars.next();
                value / 1000.0
            }
            'm' => value * 60.0,
            's' => value,
            _ => return None,
        };
    }
    if !num.is_empty() {
        return None;
    }
    (total.is_finite()).then(|| Duration::from_secs_f64(total.min(3600.0)))
}

/// Why an item failed or a call went wrong, as stored in
/// `results.error_class` and `audit_attempts.error_class` and used as a
/// metric label. The first seven are the classes of [`CallError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    RateLimited,
    QuotaExceeded,
    Transient,
    Auth,
    InvalidRequest,
    Server,
    Malformed,
    /// The answers did not match the output schema, re-asks included.
    FailedValidation,
    /// The prompt template could not be rendered for the item.
    Template,
    /// The rendered prompt is longer than the kind's `max_prompt_bytes`.
    PromptTooLarge,
    /// The job names a model no provider of the worker serves.
    UnknownModel,
    /// The chunk was delivered more than `SLUICE_MAX_DELIVERIES` times.
    RedeliveriesExhausted,
    /// A reviewer rejected the item's answer at a stage's gate.
    Rejected,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::RateLimited => "rate_limited",
            ErrorClass::QuotaExceeded => "quota_exceeded",
            ErrorClass::Transient => "transient",
            ErrorClass::Auth => "auth",
            ErrorClass::InvalidRequest => "invalid_request",
            ErrorClass::Server => "server",
            ErrorClass::Malformed => "malformed",
            ErrorClass::FailedValidation => "failed_validation",
            ErrorClass::Template => "template",
            ErrorClass::PromptTooLarge => "prompt_too_large",
            ErrorClass::UnknownModel => "unknown_model",
            ErrorClass::RedeliveriesExhausted => "redeliveries_exhausted",
            ErrorClass::Rejected => "rejected",
        }
    }

    /// Failures that say the provider is unwell: they count against the
    /// circuit breaker, and an item that last failed with one while the
    /// breaker is open is held back rather than failed.
    pub fn counts_against_breaker(self) -> bool {
        matches!(self, ErrorClass::Server | ErrorClass::Transient | ErrorClass::Malformed)
    }
}

impl std::fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a call failed, by what should be done about it.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("rate limited by the provider (HTTP 429)")]
    RateLimited { retry_after: Option<Duration>, rate: Box<RateInfo> },
    #[error("the provider's quota or spending cap is exhausted (HTTP 429): {message}")]
    QuotaExceeded { message: String },
    #[error("transient transport failure: {0}")]
    Transient(String),
    #[error("the provider refused the API key (HTTP {status})")]
    Auth { status: u16 },
    #[error("the provider rejected the request (HTTP {status}): {message}")]
    InvalidRequest { status: u16, message: String },
    #[error("provider server error (HTTP {status})")]
    Server { status: u16, retry_after: Option<Duration> },
    #[error("the provider's response is not a valid chat completion: {0}")]
    Malformed(String),
}

impl CallError {
    /// The class, used in results and metric labels.
    pub fn class(&self) -> ErrorClass {
        match self {
            CallError::RateLimited { .. } => ErrorClass::RateLimited,
            CallError::QuotaExceeded { .. } => ErrorClass::QuotaExceeded,
            CallError::Transient(_) => ErrorClass::Transient,
            CallError::Auth { .. } => ErrorClass::Auth,
            CallError::InvalidRequest { .. } => ErrorClass::InvalidRequest,
            CallError::Server { .. } => ErrorClass::Server,
            CallError::Malformed(_) => ErrorClass::Malformed,
        }
    }

    /// A 400 that refuses the requested structured-output format (a server
    /// without `json_schema` support): try a weaker mode rather than another model.
    pub fn refuses_output_format(&self) -> bool {
        match self {
            CallError::InvalidRequest { status: 400 | 422, message } => {
                let m = message.to_ascii_lowercase();
                m.contains("response_format") || m.contains("json_schema") || m.contains("json_object")
            }
            _ => false,
        }
    }

    /// Whether the same call may succeed if tried again.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, CallError::Auth { .. } | CallError::InvalidRequest { .. } | CallError::QuotaExceeded { .. })
    }

    /// The HTTP status the provider answered with, if it answered.
    pub fn http_status(&self) -> Option<u16> {
        match self {
            CallError::RateLimited { .. } | CallError::QuotaExceeded { .. } => Some(429),
            CallError::Auth { status }
            | CallError::InvalidRequest { status, .. }
            | CallError::Server { status, .. } => Some(*status),
            CallError::Malformed(_) => Some(200),
            CallError::Transient(_) => None,
        }
    }

    /// The earliest time the provider asked us to come back, if it said.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            CallError::RateLimited { retry_after, rate } => {
                retry_after.or(rate.reset_requests.max(rate.reset_tokens).filter(|d| !d.is_zero()))
            }
            CallError::Server { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// Names an API key in shared state, logs and results without revealing it:
/// the first 12 hex digits of its SHA-256.
pub fn key_id(key: &SecretString) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(key.expose_secret().as_bytes()))[..12].to_string()
}

/// One call, whatever the dialect: what a worker asks of the model for one item.
#[derive(Debug, Clone)]
pub struct Call<'a> {
    /// The model as the provider names it (Azure: the deployment).
    pub model: &'a str,
    pub system: Option<&'a str>,
    /// User and assistant turns, in order.
    pub messages: &'a [Message],
    /// `None` where the model refuses the parameter.
    pub temperature: Option<f32>,
    pub max_tokens: u32,
    pub max_tokens_param: MaxTokensParam,
    /// How structured output is asked for.
    pub output: OutputMode,
    /// The kind's name and output schema.
    pub schema_name: &'a str,
    pub schema: &'a Value,
    pub logprobs: bool,
    /// Answers to sample (more than one for agreement).
    pub n: Option<u32>,
    pub reasoning_effort: Option<&'a str>,
}

impl Call<'_> {
    /// The system message, with the schema spelled out when the response
    /// format cannot carry it.
    pub fn system_text(&self) -> Option<std::borrow::Cow<'_, str>> {
        if self.output == OutputMode::JsonSchema {
            return self.system.map(std::borrow::Cow::Borrowed);
        }
        let schema =
            format!("Reply with one JSON object only, no other text, matching this JSON schema:\n{}", self.schema);
        Some(std::borrow::Cow::Owned(match self.system {
            Some(s) => format!("{s}\n\n{schema}"),
            None => schema,
        }))
    }
}

/// How to reach one provider endpoint.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub kind: ProviderKind,
    /// Base URL, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    /// Azure's `api-version`.
    pub api_version: Option<String>,
    /// Anthropic's `anthropic-version` (default `2023-06-01`).
    pub anthropic_version: Option<String>,
    pub timeout: Duration,
    /// Most idle pooled connections kept per host.
    pub pool_size: usize,
}

/// A pooled HTTP client for one provider endpoint.
#[derive(Clone)]
pub struct ChatClient {
    http: reqwest::Client,
    endpoint: Endpoint,
}

impl ChatClient {
    pub fn new(endpoint: Endpoint) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(endpoint.timeout)
            .connect_timeout(Duration::from_secs(5))
            .pool_max_idle_per_host(endpoint.pool_size)
            .tcp_nodelay(true)
            .build()?;
        Ok(ChatClient { http, endpoint })
    }

    /// The endpoint's base URL (breakers are kept per endpoint and model).
    pub fn base_url(&self) -> &str {
        &self.endpoint.base_url
    }

    pub fn kind(&self) -> ProviderKind {
        self.endpoint.kind
    }

    /// The URL a call for `model` goes to.
    pub fn url(&self, model: &str) -> String {
        let base = self.endpoint.base_url.trim_end_matches('/');
        match self.endpoint.kind {
            ProviderKind::Anthropic => format!("{base}/messages"),
            // https://learn.microsoft.com/azure/ai-services/openai/reference#chat-completions
            ProviderKind::AzureOpenai => format!(
                "{base}/deployments/{model}/chat/completions?api-version={}",
                self.endpoint.api_version.as_deref().unwrap_or_default()
            ),
            ProviderKind::Openai | ProviderKind::OpenaiCompatible => format!("{base}/chat/completions"),
        }
    }

    /// The request body of `call` in this endpoint's dialect, as JSON bytes.
    pub fn body(&self, call: &Call<'_>) -> Vec<u8> {
        match self.endpoint.kind {
            ProviderKind::Anthropic => anthropic::body(call),
            ProviderKind::AzureOpenai => openai::body(call, false),
            ProviderKind::Openai | ProviderKind::OpenaiCompatible => openai::body(call, true),
        }
    }

    /// Sends `body` (from [`ChatClient::body`]) for `model`, authenticated with `api_key` if given.
    pub async fn complete(
        &self,
        model: &str,
        body: Vec<u8>,
        api_key: Option<&SecretString>,
    ) -> Result<Completion, CallError> {
        let mut builder =
            self.http.post(self.url(model)).header(reqwest::header::CONTENT_TYPE, "application/json").body(body);
        if let Some(key) = api_key {
            let key = key.expose_secret();
            builder = match self.endpoint.kind {
                // https://docs.anthropic.com/en/api/overview: x-api-key and anthropic-version headers.
                ProviderKind::Anthropic => builder.header("x-api-key", key),
                ProviderKind::AzureOpenai => builder.header("api-key", key),
                _ => builder.bearer_auth(key),
            };
        }
        if self.endpoint.kind == ProviderKind::Anthropic {
            let version = self.endpoint.anthropic_version.as_deref().unwrap_or(anthropic::DEFAULT_VERSION);
            builder = builder.header("anthropic-version", version);
        }
        let response = builder.send().await.map_err(transport_error)?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let (retry_after, rate) = match self.endpoint.kind {
            ProviderKind::Anthropic => (retry_after(&headers), anthropic::rate_info(&headers)),
            _ => (retry_after(&headers), RateInfo::from_headers(&headers)),
        };
        if status != 200 {
            let body = response.text().await.unwrap_or_default();
            return Err(match self.endpoint.kind {
                ProviderKind::Anthropic => anthropic::error(status, &body, retry_after, rate),
                _ => openai::error(status, &body, retry_after, rate),
            });
        }
        let bytes = response.bytes().await.map_err(transport_error)?;
        let mut completion = match self.endpoint.kind {
            ProviderKind::Anthropic => anthropic::parse(&bytes)?,
            _ => openai::parse(&bytes)?,
        };
        completion.rate = rate;
        Ok(completion)
    }
}

fn transport_error(e: reqwest::Error) -> CallError {
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else {
        "transport"
    };
    CallError::Transient(format!(
        "{kind}: {}",
        std::error::Error::source(&e).map(|s| s.to_string()).unwrap_or_else(|| e.to_string())
    ))
}

pub(crate) fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// Reads `Retry-After` as seconds (integer or decimal).
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let v = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    let secs: f64 = v.trim().parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(3600.0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_completion_with_logprobs() {
        let body = br#"{"model":"m","choices":[{"message":{"role":"assistant","content":"hi"},
            "logprobs":{"content":[{"token":"h","logprob":-0.5},{"token":"i","logprob":-0.25}]}}],
            "usage":{"prompt_tokens":7,"completion_tokens":2}}"#;
        let c = openai::parse(body).unwrap();
        assert_eq!(c.content, "hi");
        assert_eq!((c.tokens_in, c.tokens_out), (7, 2));
        assert_eq!(c.tokens.len(), 2);
        assert_eq!(c.tokens[1].logprob, -0.25);
        assert!(c.others.is_empty());
    }

    #[test]
    fn malformed_bodies_are_classified() {
        for body in [&b"not json"[..], br#"{"choices":[]}"#, br#"{"choices":[{"message":{}}]}"#] {
            let err = openai::parse(body).unwrap_err();
            assert_eq!(err.class(), ErrorClass::Malformed, "{}", String::from_utf8_lossy(body));
            assert!(err.is_retryable());
        }
    }

    #[test]
    fn reset_durations() {
        let check = |s: &str, ms: Option<u64>| assert_eq!(parse_reset(s).map(|d| d.as_millis() as u64), ms, "{s}");
        check("1s", Some(1000));
        check("250ms", Some(250));
        check("6m0s", Some(360_000));
        check("1m30.5s", Some(90_500));
        check("0.75", Some(750));
        check("soon", None);
        check("5x", None);
    }

    #[test]
    fn retry_after_seconds() {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert(reqwest::header::RETRY_AFTER, "1.5".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_millis(1500)));
        h.insert(reqwest::header::RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(retry_after(&h), None);
    }
}
