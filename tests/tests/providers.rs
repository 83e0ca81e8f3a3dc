//! Real provider dialects end to end: OpenAI (a reasoning model too), Anthropic, Azure OpenAI and an OpenAI-compatible server without json_schema or logprobs, routing across providers, and what submit refuses.

use std::time::Duration;

use sluice_tests::fixtures::{jobs_dir, sample_jsonl, SimServer, Stack};
use sluice_tests::sim::SimConfig;
use sqlx::Row;
use uuid::Uuid;

/// Results by (state, confidence strategy).
async fn results(stack: &Stack, job: Uuid) -> Vec<(String, String, i64)> {
    sqlx::query(
        "SELECT state, coalesce(confidence_detail->>'strategy', '-') AS strategy, count(*) AS n
         FROM results WHERE job_id = $1 GROUP BY 1, 2 ORDER BY 1, 2",
    )
    .bind(job)
    .fetch_all(&stack.db.pool)
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get("state"), r.get("strategy"), r.get("n")))
    .collect()
}

/// Asserts that all `n` items were answered (flagged for review or not) with
/// their confidence from `strategy`.
async fn assert_answered_by(stack: &Stack, job: Uuid, n: i64, strategy: &str) {
    let r = results(stack, job).await;
    assert_eq!(r.iter().map(|x| x.2).sum::<i64>(), n, "{r:?}");
    assert!(r.iter().all(|(state, s, _)| state != "failed" && s == strategy), "{r:?}");
}

/// What the audit trail says of a job's calls, by provider and output mode.
#[derive(Debug, PartialEq)]
struct Audit {
    provider: String,
    output_mode: String,
    ok: i64,
    failed: i64,
    tokens_in: i64,
    tokens_out: i64,
    tokens_reasoning: i64,
    cost: Option<f64>,
}

async fn audit(stack: &Stack, job: Uuid) -> Vec<Audit> {
    sqlx::query(
        "SELECT provider, output_mode, count(*) FILTER (WHERE outcome = 'ok') AS ok,
                count(*) FILTER (WHERE outcome <> 'ok') AS failed, sum(tokens_in)::bigint AS tin,
                sum(tokens_out)::bigint AS tout, sum(tokens_reasoning)::bigint AS treason, sum(cost_usd) AS cost
         FROM audit_attempts WHERE job_id = $1 GROUP BY 1, 2 ORDER BY 1, 2",
    )
    .bind(job)
    .fetch_all(&stack.db.pool)
    .await
    .unwrap()
    .iter()
    .map(|r| Audit {
        provider: r.get("provider"),
        output_mode: r.get("output_mode"),
        ok: r.get("ok"),
        failed: r.get("failed"),
        tokens_in: r.get("tin"),
        tokens_out: r.get("tout"),
        tokens_reasoning: r.get("treason"),
        cost: r.get("cost"),
    })
    .collect()
}

fn kind(name: &str, model: &str) -> common::spec::JobKind {
    let mut kind = common::spec::JobKind::load(&jobs_dir().join(name)).unwrap();
    kind.spec.model = model.into();
    kind
}

async fn run(stack: &mut Stack, kind: common::spec::JobKind, count: u64) -> Uuid {
    stack.add_worker(|_| {});
    let report = stack.submit_kind(kind, sample_jsonl(41, count), false).await.unwrap();
    stack.wait_completed(report.job_id, Duration::from_secs(60)).await.unwrap();
    report.job_id
}

fn write_key(stack: &Stack, name: &str, key: &str) {
    std::fs::write(stack.files_dir().unwrap().join(name), format!("{key}\n")).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_with_a_reasoning_model_follows_its_parameter_rules() {
    let sim = SimConfig {
        api_key: Some("sk-test".into()),
        reasoning_models: vec!["sim-reasoner".into()],
        ..Default::default()
    };
    let providers = r#"
[providers.openai]
kind = "openai"
base_url = "http://{sim0}/v1"
api_key_file = "{dir}/openai.key"
[providers.openai.models.sim-small]
rpm = 60000
[providers.openai.models.sim-reasoner]
max_tokens_param = "max_completion_tokens"
unsupported = ["temperature", "logprobs"]
reasoning = true
"#;
    let mut stack = Stack::start_with_providers(vec![sim], providers).await.unwrap();
    write_key(&stack, "openai.key", "sk-test");

    // An ordinary model: logprobs give the confidence.
    let job = run(&mut stack, kind("classify", "openai/sim-small"), 30).await;
    assert_eq!(results(&stack, job).await, [("succeeded".into(), "logprobs".into(), 30)]);
    let a = audit(&stack, job).await;
    assert_eq!(
        (a.len(), a[0].provider.as_str(), a[0].output_mode.as_str(), a[0].ok, a[0].failed),
        (1, "openai", "json_schema", 30, 0)
    );
    assert!(a[0].tokens_in > 0 && a[0].tokens_out > 0 && a[0].cost.unwrap() > 0.0, "{a:?}");

    // A reasoning model: no max_tokens, temperature or logprobs sent (the
    // simulator answers 400 to each), so confidence comes from agreement.
    let mut k = kind("classify", "openai/sim-reasoner");
    k.spec.confidence = vec![common::spec::ConfidenceStrategy::Logprobs, common::spec::ConfidenceStrategy::Agreement];
    k.spec.samples = 3;
    k.spec.temperature = 0.7;
    k.spec.reasoning_effort = Some("low".into());
    let job = run(&mut stack, k, 30).await;
    assert_answered_by(&stack, job, 30, "agreement").await;
    let a = audit(&stack, job).await;
    assert_eq!((a[0].ok, a[0].failed), (30, 0), "no call was refused: {a:?}");
    assert!(a[0].tokens_reasoning > 0, "reasoning tokens are counted: {a:?}");
    assert!(a[0].cost.unwrap() > 0.0);
    let skipped: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM results WHERE job_id = $1 AND confidence_detail->'skipped'->0->>'strategy' = 'logprobs'",
    )
    .bind(job)
    .fetch_one(&stack.db.pool)
    .await
    .unwrap();
    assert_eq!(skipped, 30, "confidence_detail says why logprobs were not used");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_messages_api_end_to_end() {
    let sim = SimConfig { api_key: Some("sk-ant-test".into()), ..Default::default() };
    let providers = r#"
[providers.claude]
kind = "anthropic"
base_url = "http://{sim0}/v1"
api_key_file = "{dir}/anthropic.key"
[providers.claude.models.sim-small]
rpm = 60000
input_tpm = 10000000
output_tpm = 1000000
"#;
    let mut stack = Stack::start_with_providers(vec![sim], providers).await.unwrap();
    write_key(&stack, "anthropic.key", "sk-ant-test");
    // Anthropic sends no log-probabilities: summarize's self-reported confidence works.
    let job = run(&mut stack, kind("summarize", "claude/sim-small"), 30).await;
    assert_answered_by(&stack, job, 30, "self_reported").await;
    let a = audit(&stack, job).await;
    assert_eq!(
        (a.len(), a[0].provider.as_str(), a[0].output_mode.as_str(), a[0].ok, a[0].failed),
        (1, "claude", "json_schema", 30, 0)
    );
    assert!(a[0].tokens_in > 0 && a[0].tokens_out > 0 && a[0].cost.unwrap() > 0.0, "{a:?}");
    let answers: Vec<serde_json::Value> = sqlx::query_scalar("SELECT output FROM results WHERE job_id = $1")
        .bind(job)
        .fetch_all(&stack.db.pool)
        .await
        .unwrap();
    assert!(answers.iter().all(|o| o["summary"].as_str().is_some_and(|s| !s.is_empty())), "tool input is the answer");

    // Classification: no logprobs and no n, so agreement takes one call per sample.
    let mut k = kind("classify", "claude/sim-small");
    k.spec.confidence = vec![common::spec::ConfidenceStrategy::Logprobs, common::spec::ConfidenceStrategy::Agreement];
    k.spec.samples = 3;
    k.spec.temperature = 0.7;
    let report = stack.submit_kind(k, sample_jsonl(43, 40), false).await.unwrap();
    stack.wait_completed(report.job_id, Duration::from_secs(60)).await.unwrap();
    assert_answered_by(&stack, report.job_id, 40, "agreement").await;
    let a = audit(&stack, report.job_id).await;
    assert_eq!((a[0].ok, a[0].failed), (120, 0), "three calls per item: {a:?}");
    let disagreeing: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM results WHERE job_id = $1 AND (confidence_detail->'components'->>'agreeing')::float8 < 1",
    )
    .bind(report.job_id)
    .fetch_one(&stack.db.pool)
    .await
    .unwrap();
    assert!(disagreeing > 0, "samples drawn at temperature 0.7 do not all agree");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_openai_deployments_and_api_key_header() {
    let sim = SimConfig { api_key: Some("azure-key".into()), ..Default::default() };
    let providers = r#"
[providers.azure]
kind = "azure_openai"
base_url = "http://{sim0}/openai"
api_version = "2024-10-21"
api_key_file = "{dir}/azure.key"
[providers.azure.models.sim-small]
deployment = "classifier-prod"
"#;
    let mut stack = Stack::start_with_providers(vec![sim], providers).await.unwrap();
    write_key(&stack, "azure.key", "azure-key");
    let job = run(&mut stack, kind("classify", "azure/sim-small"), 30).await;
    assert_eq!(results(&stack, job).await, [("succeeded".into(), "logprobs".into(), 30)]);
    let a = audit(&stack, job).await;
    assert_eq!((a[0].provider.as_str(), a[0].ok, a[0].failed), ("azure", 30, 0));
    assert!(a[0].cost.unwrap() > 0.0, "priced by the model, not the deployment name: {a:?}");
    let models: Vec<String> = sqlx::query_scalar("SELECT DISTINCT model FROM results WHERE job_id = $1")
        .bind(job)
        .fetch_all(&stack.db.pool)
        .await
        .unwrap();
    assert_eq!(models, ["classifier-prod"], "the deployment answered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_server_without_json_schema_or_logprobs_is_negotiated_with() {
    let sim = SimConfig { no_json_schema: true, no_logprobs: true, ..Default::default() };
    let providers = r#"
[providers.local]
kind = "openai_compatible"
base_url = "http://{sim0}/v1"
[providers.local.models.sim-small]
"#;
    let mut stack = Stack::start_with_providers(vec![sim], providers).await.unwrap();
    let mut k = kind("classify", "local/sim-small");
    k.spec.confidence = vec![common::spec::ConfidenceStrategy::Logprobs, common::spec::ConfidenceStrategy::Agreement];
    k.spec.samples = 3;
    k.spec.temperature = 0.7;
    let job = run(&mut stack, k, 200).await;
    assert_answered_by(&stack, job, 200, "agreement").await;
    let a = audit(&stack, job).await;
    // Only the first calls, before the cluster learned, asked for json_schema.
    let schema = a.iter().find(|x| x.output_mode == "json_schema").map_or(0, |x| x.ok + x.failed);
    assert!(schema <= 8, "{a:?}");
    let object = a.iter().find(|x| x.output_mode == "json_object").expect("json_object was used");
    assert!(object.ok >= 200 && object.failed == 0, "{a:?}");
    // The learned mode is shown by status.
    let st = stack.status(job).await.unwrap();
    assert!(st.output_modes.iter().any(|m| m.mode == "json_object" && m.model == "sim-small"), "{st:?}");
    assert!(st.confidence_sources.iter().any(|c| c.strategy == "agreement" && c.results == 200), "{st:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fallback_model_on_another_provider_takes_over() {
    let down = SimConfig { reject_models: vec!["sim-small".into()], ..Default::default() };
    let providers = r#"
[providers.local]
kind = "openai_compatible"
base_url = "http://{sim0}/v1"
[providers.local.models.sim-small]

[providers.claude]
kind = "anthropic"
base_url = "http://{sim1}/v1"
[providers.claude.models.sim-large]
"#;
    let mut stack = Stack::start_with_providers(vec![down, SimConfig::default()], providers).await.unwrap();
    let mut k = kind("summarize", "local/sim-small");
    k.spec.fallback_models = vec!["claude/sim-large".into()];
    let job = run(&mut stack, k, 20).await;
    let models: Vec<(String, i64)> =
        sqlx::query("SELECT model, count(*) AS n FROM results WHERE job_id = $1 AND state <> 'failed' GROUP BY 1")
            .bind(job)
            .fetch_all(&stack.db.pool)
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get("model"), r.get("n")))
            .collect();
    assert_eq!(models, [("sim-large".to_string(), 20)]);
    let a = audit(&stack, job).await;
    let claude = a.iter().find(|x| x.provider == "claude").unwrap();
    let local = a.iter().find(|x| x.provider == "local").unwrap();
    assert_eq!((claude.ok, local.ok, local.failed), (20, 0, 20), "{a:?}");
    assert_eq!(stack.others[0].sim.stats().ok, 20, "the second provider's server answered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_refuses_unknown_models_and_unpriced_ones_naming_what_is_configured() {
    let providers = r#"
[providers.openai]
kind = "openai"
base_url = "http://{sim0}/v1"
[providers.openai.models.sim-small]
[providers.openai.models.gpt-unpriced]

[providers.claude]
kind = "anthropic"
base_url = "http://{sim0}/v1"
[providers.claude.models.sim-large]
"#;
    let stack = Stack::start_with_providers(vec![SimConfig::default()], providers).await.unwrap();
    let create = |k: common::spec::JobKind, allow_unpriced: bool| {
        let client = stack.client.clone();
        async move {
            client
                .create_job(&coordinator::model::NewJob { allow_unpriced, ..coordinator::model::NewJob::new(k) })
                .await
        }
    };
    let err = create(kind("classify", "mistral/large"), false).await.unwrap_err().to_string();
    assert!(
        err.contains("mistral/large") && err.contains("openai/sim-small") && err.contains("claude/sim-large"),
        "{err}"
    );
    let err = create(kind("classify", "openai/gpt-9"), false).await.unwrap_err().to_string();
    assert!(err.contains("has no model \"gpt-9\"") && err.contains("openai/gpt-unpriced"), "{err}");
    let mut fallback = kind("classify", "openai/sim-small");
    fallback.spec.fallback_models = vec!["claude/nope".into()];
    let err = create(fallback, false).await.unwrap_err().to_string();
    assert!(err.contains("fallback model \"claude/nope\""), "{err}");

    let err = create(kind("classify", "openai/gpt-unpriced"), false).await.unwrap_err().to_string();
    assert!(err.contains("no price") && err.contains("sim-small") && err.contains("--allow-unpriced"), "{err}");
    let created = create(kind("classify", "openai/gpt-unpriced"), true).await.unwrap();
    assert!(created.warnings.iter().any(|w| w.contains("cost will be unknown")), "{:?}", created.warnings);

    // Anthropic gives no logprobs: say so before anything runs.
    let mut k = kind("classify", "claude/sim-large");
    k.spec.confidence = vec![common::spec::ConfidenceStrategy::Logprobs];
    let created = create(k, false).await.unwrap();
    assert!(created.warnings.iter().any(|w| w.contains("every item would go to review")), "{:?}", created.warnings);
    // Nor several answers per call: agreement then costs one call per sample.
    let mut k = kind("classify", "claude/sim-large");
    k.spec.confidence = vec![common::spec::ConfidenceStrategy::Logprobs, common::spec::ConfidenceStrategy::Agreement];
    let created = create(k, false).await.unwrap();
    assert!(created.warnings.iter().any(|w| w.contains("agreement makes 5 calls per item")), "{:?}", created.warnings);
    assert!(!created.warnings.iter().any(|w| w.contains("every item would go to review")), "{:?}", created.warnings);

    // Parameters a provider would refuse on every call are refused at submit,
    // naming the field: a reasoning effort outside OpenAI's enum, and a
    // temperature over Anthropic's 1.0 (fine for OpenAI's models).
    let mut k = kind("classify", "openai/sim-small");
    k.spec.reasoning_effort = Some("extreme".into());
    let err = create(k, false).await.unwrap_err().to_string();
    assert!(err.contains("reasoning_effort = \"extreme\"") && err.contains("xhigh"), "{err}");
    let mut k = kind("classify", "openai/sim-small");
    k.spec.temperature = 1.5;
    create(k.clone(), false).await.unwrap();
    k.spec.fallback_models = vec!["claude/sim-large".into()];
    let err = create(k, false).await.unwrap_err().to_string();
    assert!(err.contains("temperature = 1.5") && err.contains("fallback model \"claude/sim-large\""), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unpriced_model_runs_with_its_cost_shown_as_unknown() {
    let providers = r#"
[providers.local]
kind = "openai_compatible"
base_url = "http://{sim0}/v1"
[providers.local.models.my-finetune]
"#;
    let mut stack = Stack::start_with_providers(vec![SimConfig::default()], providers).await.unwrap();
    stack.add_worker(|_| {});
    let job = stack
        .client
        .create_job(&coordinator::model::NewJob {
            allow_unpriced: true,
            ..coordinator::model::NewJob::new(kind("classify", "local/my-finetune"))
        })
        .await
        .unwrap()
        .job_id;
    let input = futures::stream::iter(vec![Ok(bytes::Bytes::from(sample_jsonl(42, 10)))]);
    stack.client.upload(job, input, false).await.unwrap();
    stack.wait_completed(job, Duration::from_secs(60)).await.unwrap();
    let st = stack.status(job).await.unwrap();
    assert_eq!((st.succeeded, st.unpriced_attempts), (10, 10), "{st:?}");
    assert_eq!(audit(&stack, job).await[0].cost, None, "unknown, not $0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_providers_file_stops_the_worker_at_start_naming_file_and_field() {
    let stack = Stack::start(SimConfig::default(), |_| {}).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "typo.toml",
            "[providers.p]\nkind = \"openai\"\nbase_ulr = \"http://x/v1\"\n[providers.p.models.m]\n",
            "base_ulr",
        ),
        ("kind.toml", "[providers.p]\nkind = \"gemini\"\n[providers.p.models.m]\n", "gemini"),
        (
            "key.toml",
            "[providers.p]\nkind = \"openai\"\napi_key_file = \"/nonexistent/openai.key\"\n[providers.p.models.m]\n",
            "providers.p.api_key_file",
        ),
    ];
    for (file, text, field) in cases {
        let path = dir.path().join(file);
        std::fs::write(&path, text).unwrap();
        let mut config = stack.worker_config();
        config.providers_file = Some(path.clone());
        let err = worker::run(config, tokio_util::sync::CancellationToken::new()).await.unwrap_err();
        let msg = common::error_chain(&err);
        assert!(msg.contains(&path.display().to_string()) && msg.contains(field), "{msg}");
    }
}

#[tokio::test]
async fn the_simulator_refuses_prompts_beyond_its_context_window_as_each_provider_does() {
    let sim = SimServer::start(SimConfig { context_tokens: 100, ..Default::default() }).await.unwrap();
    let http = reqwest::Client::new();
    let ask = |path: &str, text: String| {
        http.post(format!("{}{path}", sim.base_url()))
            .header("anthropic-version", "2023-06-01")
            .json(&serde_json::json!({"model": "sim-small", "max_tokens": 50,
                "messages": [{"role": "user", "content": text}]}))
            .send()
    };
    assert_eq!(ask("/chat/completions", "short".into()).await.unwrap().status(), 200);
    // 500 characters: 126 tokens in the simulator's count, with 50 to answer.
    let long = ask("/chat/completions", "word ".repeat(100)).await.unwrap();
    assert_eq!(long.status(), 400);
    let body: serde_json::Value = long.json().await.unwrap();
    assert_eq!(
        (body["error"]["type"].as_str(), body["error"]["code"].as_str()),
        (Some("invalid_request_error"), Some("context_length_exceeded"))
    );
    assert!(
        body["error"]["message"].as_str().unwrap().starts_with(
            "This model's maximum context length is 100 tokens. However, you requested 176 tokens (126 in the messages, 50 in the completion)."
        ),
        "{body}"
    );
    assert_eq!(ask("/messages", "short".into()).await.unwrap().status(), 200);
    let long = ask("/messages", "word ".repeat(100)).await.unwrap();
    assert_eq!(long.status(), 400);
    let body: serde_json::Value = long.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
}
