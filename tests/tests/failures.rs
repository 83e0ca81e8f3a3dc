//! Model failures injected by the simulator: every item still ends with exactly one result, failed ones with their error class.

use std::time::Duration;

use sluice_tests::fixtures::{sample_jsonl, Stack};
use sluice_tests::sim::SimConfig;
use sqlx::Row;

async fn outcome(stack: &Stack, job: uuid::Uuid) -> Vec<(String, Option<String>, i64)> {
    sqlx::query("SELECT state, error_class, count(*) AS n FROM results WHERE job_id = $1 GROUP BY 1, 2 ORDER BY 1, 2")
        .bind(job)
        .fetch_all(&stack.db.pool)
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get("state"), r.get("error_class"), r.get("n")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_server_errors_are_retried_until_every_item_succeeds() {
    let sim = SimConfig {
        error_500: 0.2,
        error_503: 0.1,
        retry_after_s: 0.05,
        malformed: 0.05,
        seed: 3,
        ..Default::default()
    };
    let mut stack = Stack::start(sim, |_| {}).await.unwrap();
    stack.add_worker(|c| {
        c.max_attempts = 8;
        // This test is about per-item retries: keep the breaker out of it.
        c.breaker_threshold = 1_000;
    });
    let report = stack.submit("classify", sample_jsonl(8, 300), false).await.unwrap();
    stack.wait_completed(report.job_id, Duration::from_secs(120)).await.unwrap();
    assert_eq!(outcome(&stack, report.job_id).await, [("succeeded".to_string(), None, 300)]);
    let stats = stack.sim.sim.stats();
    assert!(stats.status_500 > 0 && stats.status_503 > 0 && stats.malformed > 0, "{stats:?}");
    // Retried items record their attempts; the total matches the simulator's count.
    let attempts: i64 = sqlx::query_scalar("SELECT sum(attempts)::bigint FROM results WHERE job_id = $1")
        .bind(report.job_id)
        .fetch_one(&stack.db.pool)
        .await
        .unwrap();
    assert_eq!(attempts as u64, stats.requests);
    assert!(attempts > 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_that_violates_the_schema_fails_the_item_after_bounded_attempts() {
    let sim = SimConfig { bad_output: 1.0, ..Default::default() };
    let mut stack = Stack::start(sim, |_| {}).await.unwrap();
    stack.add_worker(|c| c.max_repairs = 2);
    let report = stack.submit("classify", sample_jsonl(8, 50), false).await.unwrap();
    stack.wait_completed(report.job_id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(
        outcome(&stack, report.job_id).await,
        [("failed".to_string(), Some("failed_validation".to_string()), 50)]
    );
    assert_eq!(stack.sim.sim.stats().requests, 150, "one call and two re-asks per item, no more");
    let error: String = sqlx::query_scalar("SELECT error FROM results WHERE job_id = $1 LIMIT 1")
        .bind(report.job_id)
        .fetch_one(&stack.db.pool)
        .await
        .unwrap();
    assert!(error.contains("does not match the schema"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_calls_time_out_and_are_retried() {
    let sim = SimConfig { hang: 0.2, hang_ms: 60_000, seed: 1, ..Default::default() };
    let mut stack = Stack::start(sim, |_| {}).await.unwrap();
    stack.add_worker(|c| {
        c.request_timeout_ms = 300;
        c.max_attempts = 10;
    });
    let report = stack.submit("classify", sample_jsonl(8, 100), false).await.unwrap();
    stack.wait_completed(report.job_id, Duration::from_secs(120)).await.unwrap();
    assert_eq!(outcome(&stack, report.job_id).await, [("succeeded".to_string(), None, 100)]);
    assert!(stack.sim.sim.stats().hangs > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_request_is_not_retried() {
    let mut stack = Stack::start(SimConfig::default(), |_| {}).await.unwrap();
    stack.add_worker(|_| {});
    // The simulator answers 400 to a request that alone exceeds its
    // tokens-per-minute limit, as providers do: retrying cannot help.
    stack.sim.sim.set_config(SimConfig { tpm: 10, ..Default::default() });
    let report = stack.submit("classify", sample_jsonl(8, 20), false).await.unwrap();
    stack.wait_completed(report.job_id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(outcome(&stack, report.job_id).await, [("failed".to_string(), Some("invalid_request".to_string()), 20)]);
    assert_eq!(stack.sim.sim.stats().requests, 20, "one attempt per item");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_job_stops_and_keeps_its_results() {
    let sim = SimConfig { latency_ms: 50, ..Default::default() };
    let mut stack = Stack::start(sim, |_| {}).await.unwrap();
    stack.add_worker(|c| c.concurrency = 4);
    let report = stack.submit("classify", sample_jsonl(8, 2_000), false).await.unwrap();
    sluice_tests::fixtures::wait_for("some results", Duration::from_secs(60), || async {
        Ok(stack.client.status(report.job_id).await?.succeeded > 0)
    })
    .await
    .unwrap();
    let st = stack.client.cancel(report.job_id).await.unwrap();
    assert_eq!(st.state, "cancelled");
    // Chunks in hand finish; no new chunk starts. Wait until the stream is drained.
    sluice_tests::fixtures::wait_for("the stream to drain", Duration::from_secs(60), || async {
        let js = async_nats::jetstream::new(async_nats::connect(stack.nats.url()).await?);
        Ok(js.get_stream(common::wire::STREAM).await?.info().await?.state.messages == 0)
    })
    .await
    .unwrap();
    let st = stack.client.status(report.job_id).await.unwrap();
    assert_eq!(st.state, "cancelled");
    assert!(st.succeeded > 0 && st.succeeded < 2_000, "{st:?}");
    assert!(stack.client.cancel(report.job_id).await.is_err(), "cancelling twice is refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_over_the_size_limit_fails_its_item_before_any_call() {
    let mut stack = Stack::start(SimConfig::default(), |_| {}).await.unwrap();
    stack.add_worker(|_| {});
    // A template that repeats the document, as a few-shot or multi-view
    // prompt might: a 200 KB document (under the 256 KiB line limit) renders
    // to more than the default max_prompt_bytes (512 KiB).
    let mut kind = common::spec::JobKind::load(&sluice_tests::fixtures::jobs_dir().join("classify")).unwrap();
    kind.template.push_str("\n{% for view in range(2) %}Again: {{ text }}\n{% endfor %}");
    let limit = kind.spec.max_prompt_bytes;
    // Pad the template so that the limit is reachable in steps of three bytes.
    let system = kind.spec.system.as_deref().map_or(0, str::len);
    let empty = common::spec::Prompt::new(&kind).unwrap().render(&serde_json::json!({"text": ""})).unwrap().len();
    kind.template.push_str(&".".repeat((limit - empty - system) % 3));
    // Documents whose prompts (with the system prompt) come to just below the
    // limit, exactly to it, and just above: one character of text either way,
    // three bytes, since the text appears three times.
    let prompt = common::spec::Prompt::new(&kind).unwrap();
    let size = |text: &str| prompt.render(&serde_json::json!({"id": "x", "text": text})).unwrap().len() + system;
    let base = size("");
    let text_for = |target: usize| {
        // Each character of the text appears three times in the prompt.
        let mut text = "w".repeat((target - base) / 3);
        while size(&text) < target {
            text.push('w');
        }
        assert_eq!(size(&text), target, "a text renders to exactly {target} bytes");
        text
    };
    let mut input = sample_jsonl(12, 20);
    for (id, target) in [("below", limit - 3), ("at", limit), ("big", limit + 3)] {
        let doc = serde_json::json!({"id": id, "text": text_for(target)});
        input.extend(serde_json::to_vec(&doc).unwrap());
        input.push(b'\n');
    }
    let report = stack.submit_kind(kind, input, false).await.unwrap();
    stack.wait_completed(report.job_id, Duration::from_secs(60)).await.unwrap();
    // The two at or under the limit are answered (the simulator is unsure of
    // a page of "w", so they go to review); only the one over it fails.
    assert_eq!(
        outcome(&stack, report.job_id).await,
        [
            ("failed".to_string(), Some("prompt_too_large".to_string()), 1),
            ("needs_review".to_string(), None, 2),
            ("succeeded".to_string(), None, 20)
        ]
    );
    assert_eq!(stack.sim.sim.stats().requests, 22, "the oversized prompt was never sent");
    let (id, error): (String, String) =
        sqlx::query_as("SELECT item_id, error FROM results WHERE job_id = $1 AND state = 'failed'")
            .bind(report.job_id)
            .fetch_one(&stack.db.pool)
            .await
            .unwrap();
    assert_eq!(id, "big");
    assert!(error.contains("over this kind's max_prompt_bytes (524288)"), "{error}");
    let audited: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_attempts WHERE job_id = $1 AND item_id = 'big'")
        .bind(report.job_id)
        .fetch_one(&stack.db.pool)
        .await
        .unwrap();
    assert_eq!(audited, 0, "nothing of it reached the audit trail");
}
