//! Batch mode end to end: jobs whose calls go through the providers' batch APIs (simulated), on each dialect, with failed requests retried in later batches and a coordinator and worker killed while their batches are pending.

use std::time::Duration;

use common::state::JobMode;
use sluice_tests::fixtures::{jobs_dir, sample_jsonl, wait_for, ServeProcess, Stack, WorkerProcess};
use sluice_tests::sim::SimConfig;
use sqlx::Row;
use uuid::Uuid;

/// A providers file serving the simulator in Anthropic's dialect as `claude`.
const CLAUDE: &str = r#"
[providers.claude]
kind = "anthropic"
base_url = "http://{sim0}/v1"
[providers.claude.models.sim-small]
rpm = 60000
"#;

/// Submits `count` sample documents as a `classify` job in batch mode, on `model`.
async fn submit_batch_job(stack: &Stack, model: Option<&str>, seed: u64, count: u64) -> Uuid {
    submit_capped(stack, model, seed, count, None).await
}

async fn submit_capped(stack: &Stack, model: Option<&str>, seed: u64, count: u64, cap: Option<f64>) -> Uuid {
    let job = coordinator::model::NewJob { max_cost_usd: cap, ..new_job(model, JobMode::Batch) };
    submit(stack, job, seed, count).await
}

fn new_job(model: Option<&str>, mode: JobMode) -> coordinator::model::NewJob {
    let mut kind = common::spec::JobKind::load(&jobs_dir().join("classify")).unwrap();
    if let Some(m) = model {
        kind.spec.model = m.into();
    }
    coordinator::model::NewJob { mode: Some(mode), ..coordinator::model::NewJob::new(kind) }
}

async fn submit(stack: &Stack, job: coordinator::model::NewJob, seed: u64, count: u64) -> Uuid {
    let job_id = stack.client.create_job(&job).await.unwrap().job_id;
    let body = futures::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from(sample_jsonl(seed, count)))]);
    stack.client.upload(job_id, body, false).await.unwrap();
    job_id
}

/// Checks every item got its known label from a batch answer, each attempt
/// priced at the batch price of sim-small, and returns (answered attempts,
/// failed attempts, provider batches, most rounds of a chunk).
async fn check_answered_by_batches(stack: &Stack, job: Uuid, seed: u64, count: u64) -> (i64, i64, i64, i32) {
    let rows = sqlx::query("SELECT item_id, state, answer FROM results WHERE job_id = $1")
        .bind(job)
        .fetch_all(&stack.db.pool)
        .await
        .unwrap();
    assert_eq!(rows.len() as u64, count);
    let expected: std::collections::HashMap<String, String> = (0..count)
        .map(|i| {
            let d = common::sample::document(seed, i);
            (d["id"].as_str().unwrap().to_string(), d["expected"].as_str().unwrap().to_string())
        })
        .collect();
    for r in &rows {
        let id: String = r.get("item_id");
        assert_eq!(r.get::<Option<String>, _>("answer").as_ref(), Some(&expected[&id]), "{id}");
        assert_ne!(r.get::<String, _>("state"), "failed", "{id}");
    }
    let a = sqlx::query(
        "SELECT count(*) FILTER (WHERE outcome = 'ok') AS ok, count(*) FILTER (WHERE outcome <> 'ok') AS failed,
                count(*) FILTER (WHERE output_mode NOT LIKE 'batch:%') AS live,
                count(*) FILTER (WHERE abs(cost_usd - (tokens_in * 0.075 + tokens_out * 0.30) / 1e6) > 1e-12) AS mispriced
         FROM audit_attempts WHERE job_id = $1",
    )
    .bind(job)
    .fetch_one(&stack.db.pool)
    .await
    .unwrap();
    let (ok, failed, live, mispriced): (i64, i64, i64, i64) =
        (a.get("ok"), a.get("failed"), a.get("live"), a.get("mispriced"));
    assert_eq!((ok, live, mispriced), (count as i64, 0, 0), "one batch answer per item, at batch prices");
    let b = sqlx::query(
        "SELECT count(*) AS n, max(round) AS rounds, count(*) FILTER (WHERE state <> 'collected') AS open
         FROM provider_batches WHERE job_id = $1",
    )
    .bind(job)
    .fetch_one(&stack.db.pool)
    .await
    .unwrap();
    assert_eq!(b.get::<i64, _>("open"), 0, "every batch collected");
    (ok, failed, b.get("n"), b.get::<i32, _>("rounds"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_mode_job_is_answered_through_provider_batches_in_each_dialect() {
    let sim = || SimConfig { batch_seconds: 1.0, batch_fail: 0.05, seed: 9, ..Default::default() };
    // OpenAI's dialect (the default provider) ...
    let mut stack = Stack::start(sim(), |_| {}).await.unwrap();
    stack.add_worker(|_| {});
    let job = submit_batch_job(&stack, None, 61, 300).await;
    stack.wait_completed(job, Duration::from_secs(120)).await.unwrap();
    let (_, failed, batches, rounds) = check_answered_by_batches(&stack, job, 61, 300).await;
    assert!(failed > 0 && rounds >= 1, "5% of batch requests fail and go in a later round: {failed} failed");
    assert_eq!(stack.sim.sim.batches.created.load(std::sync::atomic::Ordering::Relaxed) as i64, batches);
    drop(stack);

    // ... and Anthropic's.
    let mut stack = Stack::start_with_providers(vec![sim()], CLAUDE).await.unwrap();
    stack.add_worker(|_| {});
    let job = submit_batch_job(&stack, Some("claude/sim-small"), 62, 200).await;
    stack.wait_completed(job, Duration::from_secs(120)).await.unwrap();
    let (_, failed, _, _) = check_answered_by_batches(&stack, job, 62, 200).await;
    assert!(failed > 0, "errored requests were retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_and_worker_killed_while_batches_are_pending_send_nothing_twice() {
    let sim = SimConfig { batch_seconds: 4.0, seed: 10, ..Default::default() };
    let stack = Stack::start(sim, |_| {}).await.unwrap();
    stack.stop_coordinator().await.unwrap();
    let logs = tempfile::tempdir().unwrap();
    let mut coordinator = ServeProcess::start(&stack.db, &stack.nats, &logs.path().join("c1.log"), &[]).await.unwrap();
    let config = stack.worker_config();
    let mut worker = WorkerProcess::spawn(&config, "first").unwrap();
    let client = coordinator.client(&stack.admin_token);
    let job_id = client.create_job(&new_job(None, JobMode::Batch)).await.unwrap().job_id;
    let body = futures::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from(sample_jsonl(63, 200)))]);
    client.upload(job_id, body, false).await.unwrap();
    let chunks = chunk_count(&stack, job_id).await;
    wait_for("every chunk's batch to be pending", Duration::from_secs(60), || async {
        Ok(batch_rows(&stack, job_id, "pending").await == chunks)
    })
    .await
    .unwrap();
    worker.kill9();
    coordinator.kill9();
    let coordinator = ServeProcess::start(&stack.db, &stack.nats, &logs.path().join("c2.log"), &[]).await.unwrap();
    let _worker = WorkerProcess::spawn(&config, "second").unwrap();
    let client = coordinator.client(&stack.admin_token);
    wait_for("job completion", Duration::from_secs(120), || async {
        Ok(client.status(job_id).await?.state == "completed")
    })
    .await
    .unwrap();
    let (_, failed, batches, rounds) = check_answered_by_batches(&stack, job_id, 63, 200).await;
    assert_eq!((failed, batches, rounds), (0, chunks, 0), "one batch per chunk, polled after the restart");
    assert_eq!(stack.sim.sim.batches.created.load(std::sync::atomic::Ordering::Relaxed) as i64, chunks);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_batch_mode_job_cancels_its_provider_batches() {
    let sim = SimConfig { batch_seconds: 600.0, ..Default::default() };
    let mut stack = Stack::start(sim, |_| {}).await.unwrap();
    stack.add_worker(|_| {});
    let job = submit_batch_job(&stack, None, 64, 100).await;
    let chunks = chunk_count(&stack, job).await;
    wait_for("every chunk's batch to be pending", Duration::from_secs(60), || async {
        Ok(batch_rows(&stack, job, "pending").await == chunks)
    })
    .await
    .unwrap();
    // status tells what waits in provider batches.
    let status = stack.client.status(job).await.unwrap();
    assert_eq!((status.batches_pending as i64, status.batch_items_pending), (chunks, 100));
    stack.client.cancel(job).await.unwrap();
    wait_for("every batch to be cancelled", Duration::from_secs(60), || async {
        Ok(batch_rows(&stack, job, "failed").await == chunks)
    })
    .await
    .unwrap();
    // The provider was told: each of its batches is cancelled.
    let ids: Vec<String> = sqlx::query_scalar("SELECT batch_id FROM provider_batches WHERE job_id = $1")
        .bind(job)
        .fetch_all(&stack.db.pool)
        .await
        .unwrap();
    let http = reqwest::Client::new();
    for id in ids {
        let b: serde_json::Value =
            http.get(format!("{}/batches/{id}", stack.sim.base_url())).send().await.unwrap().json().await.unwrap();
        assert_eq!(b["status"], "cancelled", "{b}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capped_batch_job_pauses_at_its_cap_and_its_batches_are_collected_after_resume() {
    let sim = SimConfig { batch_seconds: 1.0, ..Default::default() };
    let mut stack = Stack::start(sim, |_| {}).await.unwrap();
    stack.add_worker(|_| {});
    // Room for some chunks' worst case, not all.
    let job = submit_capped(&stack, None, 65, 300, Some(0.004)).await;
    wait_for("the job to pause at its cap", Duration::from_secs(60), || async {
        Ok(stack.client.status(job).await?.state == "paused")
    })
    .await
    .unwrap();
    let sent = batch_rows(&stack, job, "pending").await + batch_rows(&stack, job, "collected").await;
    let chunks = chunk_count(&stack, job).await;
    assert!(sent > 0 && sent < chunks, "{sent} of {chunks} chunks sent before the cap");
    stack.client.resume_with(job, false, Some(1.0)).await.unwrap();
    stack.wait_completed(job, Duration::from_secs(120)).await.unwrap();
    let (_, _, batches, _) = check_answered_by_batches(&stack, job, 65, 300).await;
    // Batches sent before the pause were collected, not sent again.
    assert_eq!(batches, chunks);
    assert_eq!(stack.sim.sim.batches.created.load(std::sync::atomic::Ordering::Relaxed) as i64, chunks);
    let (spent, reserved): (f64, f64) = sqlx::query_as("SELECT spent, reserved FROM job_budgets WHERE job_id = $1")
        .bind(job)
        .fetch_one(&stack.db.pool)
        .await
        .unwrap();
    assert!(spent > 0.0 && reserved.abs() < 1e-12, "spent {spent}, still reserved {reserved}");
}

/// Attempts of a job by path: (through batches, live).
async fn attempts_by_path(stack: &Stack, job: Uuid) -> (i64, i64) {
    sqlx::query_as(
        "SELECT count(*) FILTER (WHERE output_mode LIKE 'batch:%'), count(*) FILTER (WHERE output_mode NOT LIKE 'batch:%')
         FROM audit_attempts WHERE job_id = $1",
    )
    .bind(job)
    .fetch_one(&stack.db.pool)
    .await
    .unwrap()
}

/// Checks every item has its known label and no result failed.
async fn all_answered(stack: &Stack, job: Uuid, seed: u64, count: u64) {
    let got: std::collections::HashMap<String, (String, Option<String>)> =
        sqlx::query_as("SELECT item_id, state, answer FROM results WHERE job_id = $1")
            .bind(job)
            .fetch_all(&stack.db.pool)
            .await
            .unwrap()
            .into_iter()
            .map(|(id, state, answer): (String, String, Option<String>)| (id, (state, answer)))
            .collect();
    assert_eq!(got.len() as u64, count);
    for i in 0..count {
        let d = common::sample::document(seed, i);
        let (state, answer) = &got[d["id"].as_str().unwrap()];
        assert_ne!(state, "failed");
        assert_eq!(answer.as_deref(), d["expected"].as_str());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_auto_mode_what_batches_do_not_answer_goes_live() {
    // Failed requests and an expired share of every batch.
    let sim = SimConfig { batch_seconds: 1.0, batch_fail: 0.05, batch_expire: 0.2, seed: 11, ..Default::default() };
    let mut stack = Stack::start(sim, |_| {}).await.unwrap();
    stack.add_worker(|_| {});
    let job = submit(&stack, new_job(None, JobMode::Auto), 66, 300).await;
    stack.wait_completed(job, Duration::from_secs(120)).await.unwrap();
    all_answered(&stack, job, 66, 300).await;
    let (batch, live) = attempts_by_path(&stack, job).await;
    let not_answered: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_attempts WHERE job_id = $1 AND output_mode LIKE 'batch:%' AND outcome <> 'ok'",
    )
    .bind(job)
    .fetch_one(&stack.db.pool)
    .await
    .unwrap();
    // Expired requests are never run (nothing to audit); failed ones are audited.
    let expired = 300 - batch;
    assert!(expired > 20 && not_answered > 0, "{expired} expired, {not_answered} failed in batches");
    assert_eq!(live, expired + not_answered, "each unanswered item went live once");
    // No second round of batches: one batch per chunk.
    let rounds: i32 = sqlx::query_scalar("SELECT max(round) FROM provider_batches WHERE job_id = $1")
        .bind(job)
        .fetch_one(&stack.db.pool)
        .await
        .unwrap();
    assert_eq!(rounds, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_its_deadline_an_auto_job_cancels_its_batches_and_goes_live() {
    // Batches that would take ten minutes; a deadline in 40 s: live from 10 s.
    let sim = SimConfig { batch_seconds: 600.0, ..Default::default() };
    let mut stack = Stack::start(sim, |_| {}).await.unwrap();
    stack.add_worker(|_| {});
    let job =
        submit(&stack, coordinator::model::NewJob { deadline_s: Some(40), ..new_job(None, JobMode::Auto) }, 67, 200)
            .await;
    stack.wait_completed(job, Duration::from_secs(60)).await.unwrap();
    all_answered(&stack, job, 67, 200).await;
    assert_eq!(attempts_by_path(&stack, job).await, (0, 200), "every item answered live");
    let (late, cancelled, batches): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM results r JOIN jobs j ON j.id = r.job_id WHERE r.job_id = $1 AND r.created_at > j.deadline),
                (SELECT count(*) FROM provider_batches WHERE job_id = $1 AND state = 'failed' AND error LIKE '%deadline%'),
                (SELECT count(*) FROM provider_batches WHERE job_id = $1)",
    )
    .bind(job)
    .fetch_one(&stack.db.pool)
    .await
    .unwrap();
    assert_eq!((late, cancelled), (0, batches));
    assert!(batches > 0);
}

async fn chunk_count(stack: &Stack, job: Uuid) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM chunks WHERE job_id = $1")
        .bind(job)
        .fetch_one(&stack.db.pool)
        .await
        .unwrap()
}

async fn batch_rows(stack: &Stack, job: Uuid, state: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM provider_batches WHERE job_id = $1 AND state = $2")
        .bind(job)
        .bind(state)
        .fetch_one(&stack.db.pool)
        .await
        .unwrap()
}

/// The most prompt tokens a job's batches held in the provider's queue at
/// once, by Sluice's own count (each batch from when it was recorded until
/// it was collected), and the tokens of all its batches.
async fn queued_tokens(stack: &Stack, job: Uuid) -> (i64, i64) {
    sqlx::query_as(
        "SELECT coalesce(max(q), 0)::bigint, (SELECT coalesce(sum(queued_tokens), 0)::bigint FROM provider_batches
                                              WHERE job_id = $1 AND state <> 'refused')
         FROM (SELECT (SELECT sum(o.queued_tokens) FROM provider_batches o
                       WHERE o.job_id = b.job_id AND o.state <> 'refused' AND o.created_at <= b.created_at
                         AND (o.ended_at IS NULL OR o.ended_at > b.created_at)) AS q
               FROM provider_batches b WHERE b.job_id = $1) x",
    )
    .bind(job)
    .fetch_one(&stack.db.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_stay_within_the_providers_batch_queue_and_apart_from_the_live_limits() {
    // The provider's queue holds about two of the job's eight batches; the
    // providers file says so. One live request a minute: were batch
    // requests counted against the live limits, the job would take hours.
    const QUEUE: u64 = 40_000;
    let sim = SimConfig { batch_seconds: 1.0, batch_queue_tokens: QUEUE, seed: 12, ..Default::default() };
    let providers = format!(
        r#"
[providers.oa]
kind = "openai"
base_url = "http://{{sim0}}/v1"
[providers.oa.models.sim-small]
rpm = 1
tpm = 100
batch_queue_tokens = {QUEUE}
"#
    );
    let mut stack = Stack::start_with_providers(vec![sim], &providers).await.unwrap();
    stack.add_worker(|_| {});
    let job = submit_batch_job(&stack, Some("oa/sim-small"), 67, 600).await;
    stack.wait_completed(job, Duration::from_secs(120)).await.unwrap();
    all_answered(&stack, job, 67, 600).await;
    assert_eq!(attempts_by_path(&stack, job).await, (600, 0), "every item answered by a batch");
    let (most, all) = queued_tokens(&stack, job).await;
    assert!(all > 2 * QUEUE as i64, "the job needs more than two queues' worth: {all} tokens");
    assert!(most > 0 && most <= QUEUE as i64, "Sluice's count of the queue went to {most} of {QUEUE}");
    let batches = &stack.sim.sim.batches;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(load(&batches.refused), 0, "the provider never had to turn a batch away");
    assert!(load(&batches.max_queued_tokens) <= QUEUE, "{} queued at most", load(&batches.max_queued_tokens));
    // status tells the paths and what the batches saved: batch prices are
    // half the live ones, so the saving equals what was spent.
    let status = stack.client.status(job).await.unwrap();
    assert_eq!((status.batch_items_done, status.batch_items_pending), (600, 0));
    assert!(status.cost_usd > 0.0 && (status.batch_saved_usd - status.cost_usd).abs() < 1e-9, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_a_full_provider_queue_turns_away_are_sent_again_without_using_up_rounds() {
    // Sluice is not told the limits; one round per chunk is all it may use.
    let one_round = |c: &mut worker::WorkerConfig| c.max_attempts = 1;
    // OpenAI: a batch past the queue's tokens fails with token_limit_exceeded ...
    let sim = SimConfig { batch_seconds: 1.0, batch_queue_tokens: 40_000, seed: 13, ..Default::default() };
    let mut stack = Stack::start(sim, |_| {}).await.unwrap();
    stack.add_worker(one_round);
    let job = submit_batch_job(&stack, None, 68, 600).await;
    stack.wait_completed(job, Duration::from_secs(180)).await.unwrap();
    all_answered(&stack, job, 68, 600).await;
    let refused = batch_rows(&stack, job, "refused").await;
    assert!(refused > 0, "some batches met a full queue");
    assert_eq!(stack.sim.sim.batches.refused.load(std::sync::atomic::Ordering::Relaxed) as i64, refused);
    drop(stack);

    // ... and Anthropic's queue answers 429.
    let sim = SimConfig { batch_seconds: 1.0, batch_queue_requests: 80, seed: 14, ..Default::default() };
    let mut stack = Stack::start_with_providers(vec![sim], CLAUDE).await.unwrap();
    stack.add_worker(one_round);
    let job = submit_batch_job(&stack, Some("claude/sim-small"), 69, 300).await;
    stack.wait_completed(job, Duration::from_secs(180)).await.unwrap();
    all_answered(&stack, job, 69, 300).await;
    assert!(batch_rows(&stack, job, "refused").await > 0, "some batches met a full queue");
    assert!(stack.sim.sim.batches.max_queued_requests.load(std::sync::atomic::Ordering::Relaxed) <= 80);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompts_larger_than_the_whole_batch_queue_fail_with_a_reason_in_batch_mode() {
    let providers = r#"
[providers.oa]
kind = "openai"
base_url = "http://{sim0}/v1"
[providers.oa.models.sim-small]
batch_queue_tokens = 10
"#;
    let mut stack = Stack::start_with_providers(vec![SimConfig::default()], providers).await.unwrap();
    stack.add_worker(|_| {});
    let job = submit_batch_job(&stack, Some("oa/sim-small"), 70, 20).await;
    stack.wait_completed(job, Duration::from_secs(60)).await.unwrap();
    let errors: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT DISTINCT error_class, error FROM results WHERE job_id = $1")
            .bind(job)
            .fetch_all(&stack.db.pool)
            .await
            .unwrap();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].0, "prompt_too_large");
    assert!(errors[0].1.as_deref().unwrap_or_default().contains("batch_queue_tokens"), "{errors:?}");
    assert_eq!(stack.sim.sim.batches.created.load(std::sync::atomic::Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_while_creating_batches_has_them_found_not_sent_again() {
    // A create answers 30 s after the batch exists: the worker is killed
    // before it learns the ids of the batches it created.
    let sim = SimConfig { batch_seconds: 1.0, batch_create_delay_ms: 30_000, seed: 15, ..Default::default() };
    let stack = Stack::start(sim.clone(), |_| {}).await.unwrap();
    let config = stack.worker_config();
    // One chunk at a time: the worker is killed with exactly one batch created, its id unknown.
    let mut worker = WorkerProcess::spawn(&worker::WorkerConfig { max_chunks: 1, ..config.clone() }, "first").unwrap();
    let job = submit_batch_job(&stack, None, 71, 100).await;
    let created = || stack.sim.sim.batches.created.load(std::sync::atomic::Ordering::Relaxed) as i64;
    wait_for("a batch to exist at the provider", Duration::from_secs(60), || async { Ok(created() > 0) })
        .await
        .unwrap();
    worker.kill9();
    assert_eq!((created(), batch_rows(&stack, job, "submitting").await), (1, 1), "its id is not recorded");
    stack.sim.sim.set_config(SimConfig { batch_create_delay_ms: 0, ..sim });
    let _worker = WorkerProcess::spawn(&config, "second").unwrap();
    stack.wait_completed(job, Duration::from_secs(100)).await.unwrap();
    all_answered(&stack, job, 71, 100).await;
    // One batch per chunk: those created before the kill were found by their
    // label and collected, none sent again (nor given up after two minutes).
    let chunks = chunk_count(&stack, job).await;
    assert_eq!((created(), batch_rows(&stack, job, "collected").await), (chunks, chunks));
}
