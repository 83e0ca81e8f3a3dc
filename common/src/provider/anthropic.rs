//! The Anthropic Messages API dialect.
//!
//! From Anthropic's API documentation: `POST /v1/messages` with `x-api-key`
//! and `anthropic-version` headers; `system` is a top-level field and
//! `max_tokens` is required; structured output is a forced tool whose
//! `input_schema` is the kind's schema (`tool_choice: {type: "tool"}`), and
//! the answer is that tool call's `input`. Usage is `input_tokens`,
//! `output_tokens`, `cache_creation_input_tokens`, `cache_read_input_tokens`.
//! Errors are `{"type": "error", "error": {"type", "message"}}` with the types
//! of <https://docs.anthropic.com/en/api/errors>; rate limits come in
//! `anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-{limit,remaining,reset}`
//! headers with RFC 3339 reset times (<https://docs.anthropic.com/en/api/rate-limits>).

use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use super::openai::Msg;

use super::{header_num, truncate, Call, CallError, Completion, OutputMode, RateInfo};

/// The API version sent when the providers file names none.
pub const DEFAULT_VERSION: &str = "2023-06-01";

#[derive(Serialize)]
struct Body<'a> {
    model: &'a str,
    max_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    system: Option<&'a str>,
    messages: Vec<Msg<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tools: Option<[Tool<'a>; 1]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<ToolChoice<'a>>,
}

#[derive(Serialize)]
struct Tool<'a> {
    name: &'a str,
    description: &'a str,
    input_schema: &'a Value,
}

#[derive(Serialize)]
struct ToolChoice<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    name: &'a str,
}

/// The request body, serialized once.
pub fn body(call: &Call<'_>) -> Vec<u8> {
    let system = call.system_text();
    let forced = call.output == OutputMode::JsonSchema;
    let body = Body {
        model: call.model,
        max_tokens: call.max_tokens,
        system: system.as_deref(),
        messages: call.messages.iter().map(|m| Msg { role: &m.role, content: &m.content }).collect(),
        temperature: call.temperature,
        tools: forced.then_some([Tool {
            name: call.schema_name,
            description: "Record the answer. Its input is the whole answer.",
            input_schema: call.schema,
        }]),
        tool_choice: forced.then_some(ToolChoice { kind: "tool", name: call.schema_name }),
    };
    serde_json::to_vec(&body).expect("a request body serialises")
}

/// Sorts an error answer into its class.
pub fn error(status: u16, body: &str, retry_after: Option<Duration>, rate: RateInfo) -> CallError {
    let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    let kind = v["error"]["type"].as_str().unwrap_or_default();
    let spend_cap = v["error"]["details"]["error_code"].as_str() == Some("enforced_spend_limit_reached")
        || v["error"]["message"].as_str().is_some_and(|m| m.contains("spend limit"));
    match (status, kind) {
        // A workspace's spend limit answers 429 too; waiting does not help.
        (429, _) if spend_cap => CallError::QuotaExceeded { message: truncate(body, 300) },
        (429, _) | (_, "rate_limit_error") => CallError::RateLimited { retry_after, rate: Box::new(rate) },
        (401 | 403, _) | (_, "authentication_error" | "permission_error") => CallError::Auth { status },
        (408, _) => CallError::Transient(format!("HTTP {status}")),
        // invalid_request_error, not_found_error (an unknown model), request_too_large (413).
        (400..=499, _) => CallError::InvalidRequest { status, message: truncate(body, 300) },
        // api_error (500) and overloaded_error (529): transient, retried with back-off.
        _ => CallError::Server { status, retry_after },
    }
}

/// Parses a Messages API answer: the forced tool's input, or the text.
pub fn parse(body: &[u8]) -> Result<Completion, CallError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| CallError::Malformed(format!("body is not a Messages API answer: {e}")))?;
    let blocks = v["content"].as_array().ok_or_else(|| CallError::Malformed("no content blocks".into()))?;
    let content = match blocks.iter().find(|b| b["type"] == "tool_use") {
        Some(tool) if tool["input"].is_object() => tool["input"].to_string(),
        Some(_) => return Err(CallError::Malformed("tool_use block without an input object".into())),
        None => {
            let text: String =
                blocks.iter().filter(|b| b["type"] == "text").filter_map(|b| b["text"].as_str()).collect();
            if text.is_empty() {
                return Err(CallError::Malformed("no text and no tool_use block".into()));
            }
            text
        }
    };
    let u = &v["usage"];
    let n = |f: &str| u[f].as_u64().unwrap_or(0).min(u32::MAX as u64) as u32;
    let (cache_read, cache_write) = (n("cache_read_input_tokens"), n("cache_creation_input_tokens"));
    Ok(Completion {
        content,
        model: v["model"].as_str().unwrap_or_default().to_string(),
        tokens_in: n("input_tokens") + cache_read + cache_write,
        tokens_out: n("output_tokens"),
        tokens_cached: cache_read,
        tokens_cache_write: cache_write,
        ..Default::default()
    })
}

/// Reads `anthropic-ratelimit-*` headers; reset times are RFC 3339 instants.
pub fn rate_info(h: &reqwest::header::HeaderMap) -> RateInfo {
    let g = |what: &str, field: &str| header_num(h, &format!("anthropic-ratelimit-{what}-{field}"));
    let reset = |what: &str| {
        let v = h.get(format!("anthropic-ratelimit-{what}-reset"))?.to_str().ok()?;
        let at = chrono::DateTime::parse_from_rfc3339(v.trim()).ok()?;
        let ms = (at.with_timezone(&chrono::Utc) - chrono::Utc::now()).num_milliseconds().clamp(0, 3_600_000);
        Some(Duration::from_millis(ms as u64))
    };
    RateInfo {
        limit_requests: g("requests", "limit"),
        remaining_requests: g("requests", "remaining"),
        limit_tokens: g("tokens", "limit"),
        remaining_tokens: g("tokens", "remaining"),
        limit_input_tokens: g("input-tokens", "limit"),
        remaining_input_tokens: g("input-tokens", "remaining"),
        limit_output_tokens: g("output-tokens", "limit"),
        remaining_output_tokens: g("output-tokens", "remaining"),
        reset_requests: reset("requests"),
        reset_tokens: reset("tokens").or_else(|| reset("input-tokens")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::{MaxTokensParam, Message};
    use serde_json::json;

    #[test]
    fn structured_output_is_a_forced_tool() {
        let messages = [Message { role: "user".into(), content: "Classify this.".into() }];
        let schema = json!({"type": "object", "properties": {"label": {"type": "string"}}});
        let call = Call {
            model: "claude-haiku-4-5",
            system: Some("Be careful."),
            messages: &messages,
            temperature: Some(0.0),
            max_tokens: 20,
            max_tokens_param: MaxTokensParam::MaxTokens,
            output: OutputMode::JsonSchema,
            schema_name: "classify",
            schema: &schema,
            logprobs: false,
            n: None,
            reasoning_effort: None,
        };
        let b: Value = serde_json::from_slice(&body(&call)).unwrap();
        assert_eq!(b["system"], "Be careful.");
        assert_eq!(b["max_tokens"], 20);
        assert_eq!(b["tools"][0]["input_schema"], schema);
        assert_eq!(b["tool_choice"], json!({"type": "tool", "name": "classify"}));
        assert_eq!(b["messages"][0]["role"], "user");
    }

    #[test]
    fn answers_usage_and_errors() {
        let ok = br#"{"id":"msg_1","type":"message","role":"assistant","model":"claude-haiku-4-5",
            "content":[{"type":"tool_use","id":"toolu_1","name":"classify","input":{"label":"sports"}}],
            "stop_reason":"tool_use","usage":{"input_tokens":50,"output_tokens":10,
            "cache_read_input_tokens":100,"cache_creation_input_tokens":0}}"#;
        let c = parse(ok).unwrap();
        assert_eq!(c.content, r#"{"label":"sports"}"#);
        assert_eq!((c.tokens_in, c.tokens_out, c.tokens_cached), (150, 10, 100));

        let e = |status, kind: &str| {
            let body = format!(r#"{{"type":"error","error":{{"type":"{kind}","message":"m"}}}}"#);
            error(status, &body, None, RateInfo::default()).class().as_str()
        };
        assert_eq!(e(429, "rate_limit_error"), "rate_limited");
        assert_eq!(e(529, "overloaded_error"), "server");
        assert_eq!(e(500, "api_error"), "server");
        assert_eq!(e(400, "invalid_request_error"), "invalid_request");
        assert_eq!(e(413, "request_too_large"), "invalid_request");
        assert_eq!(e(404, "not_found_error"), "invalid_request");
        assert_eq!(e(401, "authentication_error"), "auth");
        assert_eq!(e(403, "permission_error"), "auth");
        let spend = r#"{"type":"error","error":{"type":"rate_limit_error","message":"This request would exceed your spend limit","details":{"error_code":"enforced_spend_limit_reached"}}}"#;
        assert_eq!(error(429, spend, None, RateInfo::default()).class().as_str(), "quota_exceeded");
    }

    #[test]
    fn rate_headers_with_rfc3339_resets() {
        let mut h = reqwest::header::HeaderMap::new();
        let soon = (chrono::Utc::now() + chrono::Duration::seconds(30)).to_rfc3339();
        h.insert("anthropic-ratelimit-requests-limit", "1000".parse().unwrap());
        h.insert("anthropic-ratelimit-requests-remaining", "999".parse().unwrap());
        h.insert("anthropic-ratelimit-requests-reset", soon.parse().unwrap());
        h.insert("anthropic-ratelimit-output-tokens-remaining", "16000".parse().unwrap());
        let r = rate_info(&h);
        assert_eq!((r.limit_requests, r.remaining_requests), (Some(1000.0), Some(999.0)));
        assert_eq!(r.remaining_output_tokens, Some(16000.0));
        let reset = r.reset_requests.unwrap().as_secs_f64();
        assert!((28.0..=30.0).contains(&reset), "{reset}");
    }
}
