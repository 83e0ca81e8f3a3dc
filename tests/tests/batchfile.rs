//! OpenAI Batch API files through Sluice: a real input file's bodies sent unchanged, results written back in the Batch API's output format, and bad request lines refused with their numbers.

use std::collections::{BTreeSet, HashMap};
use std::process::Output;
use std::time::Duration;

use serde_json::{json, Value};
use sluice_tests::fixtures::{jobs_dir, Stack};
use sluice_tests::sim::SimConfig;
use sqlx::Row;

/// Runs `sluice` against the stack's coordinator with its admin token.
fn sluice(stack: &Stack, args: &[&str]) -> Output {
    stack.sluice(args)
}

fn line(custom_id: &str, body: Value) -> Value {
    json!({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body})
}

/// Requests as users write them for the Batch API: system messages,
/// `max_tokens` and `max_completion_tokens`, structured output, sampling
/// parameters the worker knows nothing of. The model is not the kind's
/// default: `sluice submit` takes it from the file.
fn batch_file() -> Vec<Value> {
    let schema = json!({
        "type": "json_schema",
        "json_schema": {"name": "topic", "strict": true, "schema": {
            "type": "object",
            "properties": {"label": {"type": "string", "enum": ["sports", "business", "health"]}},
            "required": ["label"], "additionalProperties": false}}
    });
    vec![
        line(
            "request-1",
            json!({"model": "gpt-4.1-mini", "temperature": 0, "max_tokens": 20, "response_format": schema,
                   "messages": [{"role": "system", "content": "Classify the document."},
                                {"role": "user", "content": "The striker scored twice in the final."}]}),
        ),
        line(
            "request-2",
            json!({"model": "gpt-4.1-mini", "max_completion_tokens": 200, "seed": 42, "top_p": 0.9,
                   "messages": [{"role": "user", "content": "Summarise: quarterly revenue rose by 12%."}]}),
        ),
        line(
            "request-3",
            json!({"model": "gpt-4.1-mini", "max_tokens": 100, "response_format": {"type": "json_object"},
                   "messages": [{"role": "system", "content": "Reply in JSON."},
                                {"role": "user", "content": "Name one benefit of sleep."}]}),
        ),
        // An answer the model cannot give: the body's schema wants a longer
        // label than it writes, so the item fails after its re-asks.
        line(
            "request-4",
            json!({"model": "gpt-4.1-mini", "max_tokens": 20,
                   "response_format": {"type": "json_schema", "json_schema": {"name": "long", "schema": {
                       "type": "object", "properties": {"label": {"type": "string", "minLength": 1000}},
                       "required": ["label"]}}},
                   "messages": [{"role": "user", "content": "Say hello."}]}),
        ),
    ]
}

/// The output line of the OpenAI Batch guide
/// (<https://platform.openai.com/docs/guides/batch>, "Retrieve the
/// results"), less `system_fingerprint`, which the chat completion object
/// documents as optional.
const DOCUMENTED_OUTPUT_LINE: &str = r#"{"id": "batch_req_123", "custom_id": "request-2", "response": {"status_code": 200, "request_id": "req_123", "body": {"id": "chatcmpl-123", "object": "chat.completion", "created": 1711652795, "model": "gpt-3.5-turbo-0125", "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello."}, "logprobs": null, "finish_reason": "stop"}], "usage": {"prompt_tokens": 22, "completion_tokens": 2, "total_tokens": 24}}}, "error": null}"#;

/// Checks that `ours` has every field of `documented`, with the same JSON
/// type, recursively (arrays by their first element).
fn same_shape(path: &str, documented: &Value, ours: &Value) {
    match (documented, ours) {
        (Value::Object(d), Value::Object(o)) => {
            for (k, dv) in d {
                let ov = o.get(k).unwrap_or_else(|| panic!("{path}.{k} is missing from {ours}"));
                same_shape(&format!("{path}.{k}"), dv, ov);
            }
        }
        (Value::Array(d), Value::Array(o)) => {
            assert!(!o.is_empty(), "{path} is empty");
            same_shape(&format!("{path}[0]"), &d[0], &o[0]);
        }
        (Value::Number(d), Value::Number(o)) => assert_eq!(d.is_u64(), o.is_u64(), "{path}: {d} vs {o}"),
        (d, o) => assert_eq!(std::mem::discriminant(d), std::mem::discriminant(o), "{path}: {d} vs {o}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_batch_file_is_sent_unchanged_and_comes_back_in_the_batch_output_format() {
    let sim = SimConfig { log_requests: true, log_bodies: true, ..Default::default() };
    let mut stack = Stack::start(sim, |_| {}).await.unwrap();
    stack.add_worker(|_| {});
    let dir = tempfile::tempdir().unwrap();
    let lines = batch_file();
    let input = dir.path().join("batch.jsonl");
    let text: Vec<String> = lines.iter().map(Value::to_string).collect();
    std::fs::write(&input, text.join("\n") + "\n").unwrap();
    let kind = jobs_dir().join("openai-batch").display().to_string();

    // One item fails: the job's exit code says so (3).
    let out = sluice(&stack, &["submit", &kind, "--input", input.to_str().unwrap(), "--wait"]);
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    let job: uuid::Uuid = String::from_utf8_lossy(&out.stdout).lines().next().unwrap().parse().unwrap();

    // Each body reached the model exactly as written.
    let sent: Vec<Value> = stack.sim.sim.log().into_iter().filter_map(|e| e.body).collect();
    for l in &lines[..3] {
        let n = sent.iter().filter(|b| **b == l["body"]).count();
        assert_eq!(n, 1, "{} was sent {n} times as written; sent: {sent:#?}", l["custom_id"]);
    }
    // The failing one was re-asked: its messages, then the answer and the complaint.
    let reasked: Vec<&Value> = sent.iter().filter(|b| b["response_format"]["json_schema"]["name"] == "long").collect();
    assert!(reasked.len() >= 2, "{reasked:#?}");
    assert_eq!(reasked[0], &lines[3]["body"]);
    let turns = reasked[1]["messages"].as_array().unwrap();
    assert_eq!((turns.len(), turns[1]["role"].as_str()), (3, Some("assistant")));

    // Results in the Batch API's output format.
    let path = dir.path().join("output.jsonl");
    let out = sluice(&stack, &["results", &job.to_string(), "--format", "openai-batch", "-o", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let output: Vec<Value> =
        std::fs::read_to_string(&path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let by_id: HashMap<&str, &Value> = output.iter().map(|o| (o["custom_id"].as_str().unwrap(), o)).collect();
    assert_eq!(
        by_id.keys().copied().collect::<BTreeSet<_>>(),
        BTreeSet::from(["request-1", "request-2", "request-3", "request-4"])
    );
    let documented: Value = serde_json::from_str(DOCUMENTED_OUTPUT_LINE).unwrap();
    let answered_by: HashMap<String, String> =
        sqlx::query("SELECT item_id, answered_by::text AS call FROM results WHERE job_id = $1 AND state <> 'failed'")
            .bind(job)
            .fetch_all(&stack.db.pool)
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get("item_id"), r.get::<String, _>("call").replace('-', "")))
            .collect();
    for id in ["request-1", "request-2", "request-3"] {
        let o = by_id[id];
        same_shape("", &documented, o);
        assert_eq!(o.as_object().unwrap().len(), 4, "only the documented top-level fields: {o}");
        assert!(o["id"].as_str().unwrap().starts_with("batch_req_"));
        assert_eq!(o["error"], Value::Null);
        let response = &o["response"];
        assert_eq!(response["status_code"], 200);
        // request_id names the call in the audit trail.
        assert_eq!(response["request_id"].as_str(), Some(answered_by[id].as_str()));
        let body = &response["body"];
        assert_eq!((body["object"].as_str(), body["model"].as_str()), (Some("chat.completion"), Some("gpt-4.1-mini")));
        let usage = &body["usage"];
        assert!(usage["prompt_tokens"].as_u64().unwrap() > 0);
        assert_eq!(
            usage["total_tokens"].as_u64(),
            Some(usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap())
        );
    }
    let content =
        |id: &str| by_id[id]["response"]["body"]["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    let topic: Value = serde_json::from_str(&content("request-1")).unwrap();
    assert_eq!(topic, json!({"label": "sports"}));
    assert!(serde_json::from_str::<Value>(&content("request-2")).is_err(), "plain text stays text");
    assert!(serde_json::from_str::<Value>(&content("request-3")).unwrap().is_object());
    // The failed request: no response, an error with Sluice's class.
    let failed = by_id["request-4"];
    assert_eq!(failed["response"], Value::Null);
    assert_eq!(failed["error"]["code"], "failed_validation");
    assert!(
        failed["error"]["message"].as_str().unwrap().contains("minLength")
            || failed["error"]["message"].as_str().unwrap().contains("shorter"),
        "{failed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_batch_lines_are_refused_with_their_line_numbers() {
    let mut stack = Stack::start(SimConfig::default(), |_| {}).await.unwrap();
    stack.add_worker(|_| {});
    let good = |id: &str| line(id, json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": id}]}));
    let mut missing_id = good("x");
    missing_id.as_object_mut().unwrap().remove("custom_id");
    let mut embeddings = good("e");
    embeddings["url"] = json!("/v1/embeddings");
    let mut not_object = good("n");
    not_object["body"] = json!("[{\"role\": \"user\"}]");
    let input: Vec<String> =
        [good("a"), missing_id, good("a"), embeddings, not_object, good("b")].iter().map(Value::to_string).collect();
    let input = (input.join("\n") + "\n").into_bytes();

    let expect = |got: &[coordinator::model::LineError], expected: &[(u64, &str)]| {
        let got: Vec<(u64, &str)> = got.iter().map(|e| (e.line, e.reason.as_str())).collect();
        assert_eq!(got.len(), expected.len(), "{got:?}");
        for ((line, reason), (want_line, want)) in got.iter().zip(expected) {
            assert_eq!(line, want_line, "{got:?}");
            assert!(reason.starts_with(want), "line {line}: {reason}");
        }
    };
    let shape = [
        (2, "missing field \"custom_id\""),
        (4, "url \"/v1/embeddings\" is not a chat endpoint"),
        (5, "field \"body\" must be a JSON object"),
    ];

    // Strict (the default): nothing is ingested, every malformed line is named.
    let err = stack.submit("openai-batch", input.clone(), false).await.unwrap_err();
    let coordinator::client::ClientError::Api { status, report: Some(report), .. } = err else {
        panic!("expected a rejection report, got {err:?}");
    };
    assert_eq!((status.as_u16(), report.state.as_str()), (422, "rejected"));
    expect(&report.errors, &shape);

    // With --skip-invalid the good lines run, and the repeated custom_id is
    // refused too (found once the lines are in Postgres).
    let report = stack.submit("openai-batch", input, true).await.unwrap();
    let mut all = shape.to_vec();
    all.insert(1, (3, "duplicate id \"a\""));
    expect(&report.errors, &all);
    assert_eq!((report.items, report.invalid_lines), (2, 4));
    stack.wait_completed(report.job_id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(stack.status(report.job_id).await.unwrap().succeeded, 2);
}
