//! Requests sent as the user wrote them: the `body` of an OpenAI Batch API input line, with its answers checked against the body's own `response_format`.
//!
//! The line format is the Batch API's request input object
//! (<https://platform.openai.com/docs/api-reference/batch/request-input>);
//! the body is a Chat Completions request
//! (<https://platform.openai.com/docs/api-reference/chat/create>). Only
//! `model` is rewritten, to the name the job's provider gives the job's model
//! (the same name unless the job was submitted with `--model`). A re-ask
//! after an answer that does not match the body's `json_schema` appends the
//! answer and the complaint to the body's messages, as for any other kind.

use serde_json::{Map, Value};

use common::provider::Message;

/// One item's request body and what its answers must be.
pub struct Passthrough {
    body: Map<String, Value>,
    /// The body asks for JSON (`response_format` `json_object` or `json_schema`).
    json: bool,
    /// The body's `response_format.json_schema.schema`, compiled.
    schema: Option<jsonschema::Validator>,
}

impl Passthrough {
    /// Reads the body the kind's prompt rendered (its JSON text).
    pub fn parse(rendered: &str) -> Result<Self, String> {
        let body: Map<String, Value> =
            serde_json::from_str(rendered).map_err(|e| format!("the request body is not a JSON object: {e}"))?;
        let format = &body.get("response_format").cloned().unwrap_or(Value::Null);
        let json = matches!(format["type"].as_str(), Some("json_object" | "json_schema"));
        let schema = match &format["json_schema"]["schema"] {
            s @ Value::Object(_) => Some(
                jsonschema::validator_for(s)
                    .map_err(|e| format!("response_format.json_schema.schema is not a valid JSON schema: {e}"))?,
            ),
            _ => None,
        };
        Ok(Passthrough { body, json, schema })
    }

    /// The most output tokens a call may bring back: the body's
    /// `max_completion_tokens` or `max_tokens` (times `n`), else `default`.
    pub fn max_output(&self, default: u32) -> f64 {
        let get = |k: &str| self.body.get(k).and_then(Value::as_u64);
        let per_answer = get("max_completion_tokens").or_else(|| get("max_tokens")).unwrap_or(default as u64);
        (per_answer * get("n").unwrap_or(1).max(1)) as f64
    }

    /// The body to send: the user's, with `model` as the provider names it
    /// and `turns` (re-asks) after its messages.
    pub fn body(&self, wire_model: &str, turns: &[Message]) -> Vec<u8> {
        let mut body = self.body.clone();
        body.insert("model".into(), Value::String(wire_model.to_string()));
        if !turns.is_empty() {
            if let Some(Value::Array(messages)) = body.get_mut("messages") {
                messages.extend(turns.iter().map(|m| serde_json::json!({"role": m.role, "content": m.content})));
            }
        }
        serde_json::to_vec(&body).expect("a JSON object serialises")
    }

    /// Checks an answer against the body's `response_format`: the value
    /// stored as the item's output (the parsed JSON, or the text as a JSON
    /// string) and its answer (the text).
    pub fn check(&self, content: &str, max_bytes: usize) -> Result<(Value, String), String> {
        if content.len() > max_bytes {
            return Err(format!("output is {} bytes, over the limit of {max_bytes}", content.len()));
        }
        if !self.json {
            return Ok((Value::String(content.to_string()), content.to_string()));
        }
        let value: Value = serde_json::from_str(content.trim()).map_err(|e| format!("not JSON: {e}"))?;
        if let Some(err) = self.schema.as_ref().and_then(|s| s.iter_errors(&value).next()) {
            return Err(format!("{} at {}", err, err.instance_path()));
        }
        Ok((value, content.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_body_is_sent_as_written_but_for_the_model_and_re_asks() {
        let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
                          "max_tokens": 50, "temperature": 0.2, "seed": 7});
        let p = Passthrough::parse(&body.to_string()).unwrap();
        let sent: Value = serde_json::from_slice(&p.body("gpt-4o-mini", &[])).unwrap();
        assert_eq!(sent, body);
        let turns = [Message { role: "assistant".into(), content: "a".into() }];
        let sent: Value = serde_json::from_slice(&p.body("deployment-1", &turns)).unwrap();
        assert_eq!(sent["model"], "deployment-1");
        assert_eq!(sent["messages"][2], json!({"role": "assistant", "content": "a"}));
        assert_eq!((sent["seed"].as_u64(), p.max_output(4096)), (Some(7), 50.0));
    }

    #[test]
    fn answers_are_checked_against_the_bodys_response_format() {
        let text = Passthrough::parse(r#"{"model":"m","messages":[]}"#).unwrap();
        assert_eq!(text.check("not json", 100).unwrap(), (json!("not json"), "not json".to_string()));
        assert!(text.check("long", 3).unwrap_err().contains("over the limit"));
        assert_eq!(text.max_output(4096), 4096.0);

        let object =
            Passthrough::parse(r#"{"model":"m","messages":[],"response_format":{"type":"json_object"}}"#).unwrap();
        assert!(object.check("nope", 100).unwrap_err().starts_with("not JSON"));
        assert_eq!(object.check(r#"{"x":1}"#, 100).unwrap().0, json!({"x": 1}));

        let schema = json!({"model": "m", "messages": [], "max_completion_tokens": 10, "n": 3, "response_format": {"type": "json_schema",
            "json_schema": {"name": "t", "schema": {"type": "object", "required": ["label"]}}}});
        let schema = Passthrough::parse(&schema.to_string()).unwrap();
        assert!(schema.check(r#"{"x":1}"#, 100).unwrap_err().contains("label"));
        assert!(schema.check(r#"{"label":"a"}"#, 100).is_ok());
        assert_eq!(schema.max_output(4096), 30.0);
    }
}
