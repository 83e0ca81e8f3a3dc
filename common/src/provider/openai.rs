//! The Chat Completions dialect: OpenAI, Azure OpenAI and OpenAI-compatible servers (vLLM, Ollama, llama.cpp, LiteLLM).
//!
//! Request and response fields follow the API reference
//! (<https://platform.openai.com/docs/api-reference/chat/create>): reasoning
//! models take `max_completion_tokens` and `reasoning_effort` and report
//! `usage.completion_tokens_details.reasoning_tokens`; cached prompt tokens
//! are `usage.prompt_tokens_details.cached_tokens`. Errors are
//! `{"error": {"message", "type", "code"}}`; a 429 whose code or type is
//! `insufficient_quota` is an exhausted quota, not a rate limit.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{truncate, Call, CallError, Completion, MaxTokensParam, OutputMode, RateInfo, TokenLogprob};

#[derive(Serialize)]
struct Body<'a> {
    model: &'a str,
    messages: Vec<Msg<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_completion_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_format: Option<ResponseFormat<'a>>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    logprobs: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_logprobs: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    n: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning_effort: Option<&'a str>,
}

#[derive(Serialize)]
pub(crate) struct Msg<'a> {
    pub role: &'a str,
    pub content: &'a str,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ResponseFormat<'a> {
    JsonSchema { json_schema: JsonSchema<'a> },
    JsonObject,
}

#[derive(Serialize)]
struct JsonSchema<'a> {
    name: &'a str,
    schema: &'a Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    strict: Option<bool>,
}

/// The request body, serialized once: it is hashed for the audit trail and
/// sent as it is. `strict` asks for strict schema adherence (OpenAI and
/// compatible servers; Azure takes it too, but older API versions refuse it).
pub fn body(call: &Call<'_>, strict: bool) -> Vec<u8> {
    let system = call.system_text();
    let mut messages = Vec::with_capacity(call.messages.len() + 1);
    if let Some(system) = system.as_deref() {
        messages.push(Msg { role: "system", content: system });
    }
    messages.extend(call.messages.iter().map(|m| Msg { role: &m.role, content: &m.content }));
    let (max_tokens, max_completion_tokens) = match call.max_tokens_param {
        MaxTokensParam::MaxTokens => (Some(call.max_tokens), None),
        MaxTokensParam::MaxCompletionTokens => (None, Some(call.max_tokens)),
    };
    let response_format = match call.output {
        OutputMode::JsonSchema => Some(ResponseFormat::JsonSchema {
            json_schema: JsonSchema { name: call.schema_name, schema: call.schema, strict: strict.then_some(true) },
        }),
        OutputMode::JsonObject => Some(ResponseFormat::JsonObject),
        OutputMode::Prompt => None,
    };
    let body = Body {
        model: call.model,
        messages,
        max_tokens,
        max_completion_tokens,
        temperature: call.temperature,
        response_format,
        logprobs: call.logprobs,
        top_logprobs: call.logprobs.then_some(5),
        n: call.n,
        reasoning_effort: call.reasoning_effort,
    };
    serde_json::to_vec(&body).expect("a request body serialises")
}

/// Sorts an error answer into its class.
pub fn error(status: u16, body: &str, retry_after: Option<Duration>, rate: RateInfo) -> CallError {
    let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    let code = |f: &str| v["error"][f].as_str().unwrap_or_default().to_string();
    let quota = ["insufficient_quota", "quota_exceeded"];
    match status {
        // A spending cap or exhausted quota answers 429 too, but waiting does not help.
        429 if quota.contains(&code("code").as_str()) || quota.contains(&code("type").as_str()) => {
            CallError::QuotaExceeded { message: truncate(body, 300) }
        }
        429 => CallError::RateLimited { retry_after, rate: Box::new(rate) },
        401 | 403 => CallError::Auth { status },
        408 => CallError::Transient(format!("HTTP {status}")),
        400..=499 => CallError::InvalidRequest { status, message: truncate(body, 300) },
        _ => CallError::Server { status, retry_after },
    }
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
#[derive(Deserialize, Default)]
struct RawUsage {
    #[serde(default)]
    prompt_tokens: u32,
    #[serde(default)]
    completion_tokens: u32,
    #[serde(default)]
    prompt_tokens_details: Option<Details>,
    #[serde(default)]
    completion_tokens_details: Option<Details>,
}
#[derive(Deserialize, Default)]
struct Details {
    #[serde(default)]
    cached_tokens: Option<u32>,
    #[serde(default)]
    reasoning_tokens: Option<u32>,
}
#[derive(Deserialize)]
struct RawLogprobs {
    #[serde(default)]
    content: Option<Vec<TokenLogprob>>,
}

/// Parses a chat completion body; anything unexpected is `Malformed`.
pub fn parse(body: &[u8]) -> Result<Completion, CallError> {
    let raw: RawCompletion = serde_json::from_slice(body)
        .map_err(|e| CallError::Malformed(format!("body is not a chat completion: {e}")))?;
    let mut choices = raw.choices.into_iter();
    let choice = choices.next().ok_or_else(|| CallError::Malformed("no choices".into()))?;
    let content = choice.message.content.ok_or_else(|| CallError::Malformed("no message content".into()))?;
    let tokens = choice.logprobs.and_then(|l| l.content).unwrap_or_default();
    let others = choices.filter_map(|c| c.message.content).collect();
    let usage = raw.usage.unwrap_or_default();
    Ok(Completion {
        content,
        model: raw.model,
        tokens_in: usage.prompt_tokens,
        tokens_out: usage.completion_tokens,
        tokens_cached: usage.prompt_tokens_details.and_then(|d| d.cached_tokens).unwrap_or(0),
        tokens_cache_write: 0,
        tokens_reasoning: usage.completion_tokens_details.and_then(|d| d.reasoning_tokens).unwrap_or(0),
        tokens,
        others,
        rate: RateInfo::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::Message;
    use serde_json::json;

    fn body(call: &Call<'_>, strict: bool) -> Value {
        serde_json::from_slice(&super::body(call, strict)).unwrap()
    }

    fn call<'a>(messages: &'a [Message], schema: &'a Value) -> Call<'a> {
        Call {
            model: "m",
            system: Some("Be brief."),
            messages,
            temperature: Some(0.0),
            max_tokens: 20,
            max_tokens_param: MaxTokensParam::MaxTokens,
            output: OutputMode::JsonSchema,
            schema_name: "classify",
            schema,
            logprobs: true,
            n: None,
            reasoning_effort: None,
        }
    }

    #[test]
    fn reasoning_rules_change_the_body() {
        let messages = [Message { role: "user".into(), content: "hi".into() }];
        let schema = json!({"type": "object"});
        let b = body(&call(&messages, &schema), true);
        assert_eq!(b["max_tokens"], 20);
        assert_eq!(b["response_format"]["json_schema"]["strict"], true);
        assert_eq!(b["messages"][0]["content"], "Be brief.");
        let mut c = call(&messages, &schema);
        c.max_tokens_param = MaxTokensParam::MaxCompletionTokens;
        c.temperature = None;
        c.logprobs = false;
        c.reasoning_effort = Some("low");
        let b = body(&c, true);
        assert!(b.get("max_tokens").is_none() && b.get("temperature").is_none() && b.get("logprobs").is_none());
        assert_eq!((b["max_completion_tokens"].as_u64(), b["reasoning_effort"].as_str()), (Some(20), Some("low")));
    }

    #[test]
    fn weaker_output_modes_put_the_schema_in_the_prompt() {
        let messages = [Message { role: "user".into(), content: "hi".into() }];
        let schema = json!({"type": "object", "required": ["label"]});
        let mut c = call(&messages, &schema);
        c.output = OutputMode::JsonObject;
        let b = body(&c, true);
        assert_eq!(b["response_format"], json!({"type": "json_object"}));
        assert!(b["messages"][0]["content"].as_str().unwrap().contains("\"required\":[\"label\"]"));
        c.output = OutputMode::Prompt;
        assert!(body(&c, true).get("response_format").is_none());
    }

    #[test]
    fn usage_details_are_read() {
        let b = br#"{"model":"o4-mini","choices":[{"message":{"content":"{}"}}],
            "usage":{"prompt_tokens":100,"completion_tokens":50,
              "prompt_tokens_details":{"cached_tokens":64},"completion_tokens_details":{"reasoning_tokens":40}}}"#;
        let c = parse(b).unwrap();
        assert_eq!((c.tokens_in, c.tokens_out, c.tokens_cached, c.tokens_reasoning), (100, 50, 64, 40));
    }

    #[test]
    fn quota_429s_are_told_from_rate_limits() {
        let quota = r#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","code":"insufficient_quota"}}"#;
        assert_eq!(error(429, quota, None, RateInfo::default()).class().as_str(), "quota_exceeded");
        let rate = r#"{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}"#;
        assert_eq!(error(429, rate, None, RateInfo::default()).class().as_str(), "rate_limited");
        let refused = r#"{"error":{"message":"response_format json_schema is not supported by this model"}}"#;
        assert!(error(400, refused, None, RateInfo::default()).refuses_output_format());
    }
}
