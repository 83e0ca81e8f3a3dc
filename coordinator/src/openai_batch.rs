//! Results in the OpenAI Batch API's output file format, so that tools written for that API read a Sluice job's results unchanged.
//!
//! One request output object a line
//! (<https://platform.openai.com/docs/api-reference/batch/request-output>):
//!
//! ```json
//! {"id": "batch_req_…", "custom_id": "request-1",
//!  "response": {"status_code": 200, "request_id": "…", "body": {chat completion}},
//!  "error": null}
//! ```
//!
//! The body is a chat completion
//! (<https://platform.openai.com/docs/api-reference/chat/object>) rebuilt
//! from the stored result: the answer as the message content (a reviewer's
//! answer where there is one), the model that gave it, and the item's
//! tokens (every call it took, re-asks included). `request_id` is the id of
//! the call in Sluice's audit trail. An item that failed has `"response":
//! null` and `"error": {"code", "message"}`, the code being Sluice's error
//! class (`rate_limited`, `failed_validation`, …).

use serde_json::{json, Value};
use uuid::Uuid;

use crate::store::ResultRow;

/// Appends the output line of one result; `answer_field` is the kind's,
/// where a reviewer's answer replaces the model's.
pub fn write_output_line(out: &mut Vec<u8>, job_id: Uuid, seq: i64, row: &ResultRow, answer_field: &str) {
    let id = format!("batch_req_{}_{seq}", job_id.simple());
    let line = match (&row.output, row.state.as_str()) {
        (Some(output), state) if state != "failed" => {
            let content = match output {
                Value::String(text) => row.answer.clone().unwrap_or_else(|| text.clone()),
                Value::Object(fields) => {
                    let mut fields = fields.clone();
                    let by_human = row.answer_source.as_deref().is_some_and(|s| s.starts_with("human:"));
                    if let (true, Some(answer)) = (by_human, &row.answer) {
                        fields.insert(answer_field.to_string(), Value::String(answer.clone()));
                    }
                    Value::Object(fields).to_string()
                }
                other => other.to_string(),
            };
            let call = row.answered_by.map(|c| c.simple().to_string()).unwrap_or_else(|| id.clone());
            let body = json!({
                "id": format!("chatcmpl-{call}"),
                "object": "chat.completion",
                "created": row.created_at.map_or(0, |t| t.timestamp()),
                "model": row.model,
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": content, "refusal": null},
                    "logprobs": null,
                    "finish_reason": "stop"
                }],
                "usage": {
                    "prompt_tokens": row.tokens_in,
                    "completion_tokens": row.tokens_out,
                    "total_tokens": row.tokens_in + row.tokens_out
                }
            });
            json!({
                "id": id,
                "custom_id": row.id,
                "response": {"status_code": 200, "request_id": call, "body": body},
                "error": null
            })
        }
        _ => json!({
            "id": id,
            "custom_id": row.id,
            "response": null,
            "error": {
                "code": row.error_class.as_deref().unwrap_or("failed"),
                "message": row.error.as_deref().unwrap_or("the item failed")
            }
        }),
    };
    serde_json::to_writer(&mut *out, &line).expect("a JSON value serialises");
    out.push(b'\n');
}
