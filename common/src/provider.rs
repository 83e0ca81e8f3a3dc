//! Client for OpenAI-compatible `/v1/chat/completions` endpoints, with errors sorted into the classes retries act on.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One chat message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// What a worker asks of the model for one item.
#[derive(Debug, Clone, Serialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<Message>,
    pub temperature: f32,
    pub max_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_format: Option<Value>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub logprobs: bool,
    /// Alternatives per token to return with `logprobs`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_logprobs: Option<u8>,
    /// Answers to sample (more than one for agreement).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub n: Option<u32>,
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
#[derive(Debug, Clone)]
pub struct Completion {
    pub content: String,
    pub model: String,
    pub tokens_in: u32,
    pub tokens_out: u32,
    /// The first answer's tokens with log-probabilities, when asked for and sent.
    pub tokens: Vec<TokenLogprob>,
    /// Further sampled answers (with `n` > 1), after `content`.
    pub others: Vec<String>,
    /// What the provider said about its limits in the response headers.
    pub rate: RateInfo,
}

/// The provider's `x-ratelimit-*` headers: its real limits and what is left.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RateInfo {
    /// Requests per minute allowed (`x-ratelimit-limit-requests`).
    pub limit_requests: Option<f64>,
    pub remaining_requests: Option<f64>,
    /// Tokens per minute allowed (`x-ratelimit-limit-tokens`).
    pub limit_tokens: Option<f64>,
    pub remaining_tokens: Option<f64>,
    /// When the request budget is full again (`x-ratelimit-reset-requests`).
    pub reset_requests: Option<Duration>,
    pub reset_tokens: Option<Duration>,
}

impl RateInfo {
    pub fn from_headers(h: &reqwest::header::HeaderMap) -> Self {
        let num =
            |name: &str| h.get(name)?.to_str().ok()?.trim().parse::<f64>().ok().filter(|v| v.is_finite() && *v >= 0.0);
        let dur = |name: &str| parse_reset(h.get(name)?.to_str().ok()?);
        RateInfo {
            limit_requests: num("x-ratelimit-limit-requests"),
            remaining_requests: num("x-ratelimit-remaining-requests"),
            limit_tokens: num("x-ratelimit-limit-tokens"),
            remaining_tokens: num("x-ratelimit-remaining-tokens"),
            reset_requests: dur("x-ratelimit-reset-requests"),
            reset_tokens: dur("x-ratelimit-reset-tokens"),
        }
    }
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

/// Why a call failed, by what should be done about it.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("rate limited by the provider (HTTP 429)")]
    RateLimited { retry_after: Option<Duration>, rate: RateInfo },
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
    /// Short, bounded name used in results and metric labels.
    pub fn class(&self) -> &'static str {
        match self {
            CallError::RateLimited { .. } => "rate_limited",
            CallError::QuotaExceeded { .. } => "quota_exceeded",
            CallError::Transient(_) => "transient",
            CallError::Auth { .. } => "auth",
            CallError::InvalidRequest { .. } => "invalid_request",
            CallError::Server { .. } => "server",
            CallError::Malformed(_) => "malformed",
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

/// Where the model lives and how to reach it.
#[derive(Debug, Clone)]
pub struct ProviderConfig {
    /// Base URL including `/v1`, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    pub timeout: Duration,
    /// Most idle pooled connections kept per host.
    pub pool_size: usize,
}

/// A pooled HTTP client for one provider endpoint.
#[derive(Clone)]
pub struct ChatClient {
    http: reqwest::Client,
    url: String,
}

impl ChatClient {
    pub fn new(config: &ProviderConfig) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(Duration::from_secs(5))
            .pool_max_idle_per_host(config.pool_size)
            .tcp_nodelay(true)
            .build()?;
        let url = format!("{}/chat/completions", config.base_url.trim_end_matches('/'));
        Ok(ChatClient { http, url })
    }

    /// The endpoint this client calls.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Sends one chat completion request, with `api_key` as the bearer token if given.
    pub async fn complete(
        &self,
        request: &ChatRequest,
        api_key: Option<&SecretString>,
    ) -> Result<Completion, CallError> {
        let mut builder = self.http.post(&self.url).json(request);
        if let Some(key) = api_key {
            builder = builder.bearer_auth(key.expose_secret());
        }
        let response = builder.send().await.map_err(transport_error)?;
        let status = response.status().as_u16();
        let retry_after = retry_after(response.headers());
        let rate = RateInfo::from_headers(response.headers());
        if status != 200 {
            let body = response.text().await.unwrap_or_default();
            return Err(match status {
                // A spending cap or exhausted quota answers 429 too, but waiting does not help.
                429 if body.contains("insufficient_quota") || body.contains("quota_exceeded") => {
                    CallError::QuotaExceeded { message: truncate(&body, 300) }
                }
                429 => CallError::RateLimited { retry_after, rate },
                401 | 403 => CallError::Auth { status },
                408 => CallError::Transient(format!("HTTP {status}")),
                400..=499 => CallError::InvalidRequest { status, message: truncate(&body, 300) },
                _ => CallError::Server { status, retry_after },
            });
        }
        let bytes = response.bytes().await.map_err(transport_error)?;
        let mut completion = parse_completion(&bytes)?;
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

fn truncate(s: &str, max: usize) -> String {
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

#[derive(Deserialize)]
struct RawCompletion {
    #[serde(default)]
    model: String,
    choices: Vec<RawChoice>,
    #[serde(default)]
    usage: Option<RawUsage>,
}
#[derive(Deserialize)]
struct RawChoice {
    message: RawMessage,
    #[serde(default)]
    logprobs: Option<RawLogprobs>,
}
#[derive(Deserialize)]
struct RawMessage {
    #[serde(default)]
    content: Option<String>,
}
#[derive(Deserialize)]
struct RawUsage {
    #[serde(default)]
    prompt_tokens: u32,
    #[serde(default)]
    completion_tokens: u32,
}
#[derive(Deserialize)]
struct RawLogprobs {
    #[serde(default)]
    content: Option<Vec<TokenLogprob>>,
}

/// Parses a chat completion body; anything unexpected is `Malformed`.
pub fn parse_completion(body: &[u8]) -> Result<Completion, CallError> {
    let raw: RawCompletion = serde_json::from_slice(body)
        .map_err(|e| CallError::Malformed(format!("body is not a chat completion: {e}")))?;
    let mut choices = raw.choices.into_iter();
    let choice = choices.next().ok_or_else(|| CallError::Malformed("no choices".into()))?;
    let content = choice.message.content.ok_or_else(|| CallError::Malformed("no message content".into()))?;
    let tokens = choice.logprobs.and_then(|l| l.content).unwrap_or_default();
    let others = choices.filter_map(|c| c.message.content).collect();
    let usage = raw.usage.unwrap_or(RawUsage { prompt_tokens: 0, completion_tokens: 0 });
    Ok(Completion {
        content,
        model: raw.model,
        tokens_in: usage.prompt_tokens,
        tokens_out: usage.completion_tokens,
        tokens,
        others,
        rate: RateInfo::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_completion_with_logprobs() {
        let body = br#"{"model":"m","choices":[{"message":{"role":"assistant","content":"hi"},
            "logprobs":{"content":[{"token":"h","logprob":-0.5},{"token":"i","logprob":-0.25}]}}],
            "usage":{"prompt_tokens":7,"completion_tokens":2}}"#;
        let c = parse_completion(body).unwrap();
        assert_eq!(c.content, "hi");
        assert_eq!((c.tokens_in, c.tokens_out), (7, 2));
        assert_eq!(c.tokens.len(), 2);
        assert_eq!(c.tokens[1].logprob, -0.25);
        assert!(c.others.is_empty());
    }

    #[test]
    fn malformed_bodies_are_classified() {
        for body in [&b"not json"[..], br#"{"choices":[]}"#, br#"{"choices":[{"message":{}}]}"#] {
            let err = parse_completion(body).unwrap_err();
            assert_eq!(err.class(), "malformed", "{}", String::from_utf8_lossy(body));
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
