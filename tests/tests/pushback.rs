//! When the provider or the cluster pushes back (429s to a user who told Sluice no limit, a worker killed mid-chunk), the job still finishes with every answer, soon.

use std::time::{Duration, Instant};

use sluice_tests::fixtures::{sample_jsonl, wait_for, Stack, WorkerProcess};
use sluice_tests::sim::SimConfig;

/// Results by state and error class.
async fn outcome(stack: &Stack, job: uuid::Uuid) -> Vec<(String, Option<String>, i64)> {
    sqlx::query_as(
        "SELECT CASE WHEN state = 'needs_review' THEN 'succeeded' ELSE state END, error_class, count(*)
         FROM results WHERE job_id = $1 GROUP BY 1, 2 ORDER BY 1, 2",
    )
    .bind(job)
    .fetch_all(&stack.db.pool)
    .await
    .unwrap()
}

/// Runs 1,500 items through two workers with default settings (no
/// `SLUICE_RPM`) against `sim`: every item must succeed, and within two
/// minutes (10 s at the provider's limit; a stalled job never completes).
/// Returns the simulator's counts.
async fn untold(sim: SimConfig) -> sluice_tests::sim::Stats {
    let mut stack = Stack::start(sim, |_| {}).await.unwrap();
    stack.add_worker(|_| {});
    stack.add_worker(|_| {});
    let report = stack.submit("classify", sample_jsonl(30, 1_500), false).await.unwrap();
    stack.wait_completed(report.job_id, Duration::from_secs(120)).await.unwrap();
    assert_eq!(outcome(&stack, report.job_id).await, [("succeeded".to_string(), None, 1_500)]);
    stack.sim.sim.stats()
}

/// A provider that allows 9,000 requests a minute and says nothing of its
/// limit but 429s: the first half-second draws hundreds of them. A worker
/// whose database connections were all held by calls waiting out those
/// 429s used to stall for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_429s_does_not_stall_a_job_with_default_settings() {
    let stats = untold(SimConfig { rpm: 9_000, no_limit_headers: true, ..Default::default() }).await;
    assert!(stats.status_429 > 0, "the provider must have pushed back: {stats:?}");
}

/// The same provider announcing its limit in `x-ratelimit-*` headers, as
/// OpenAI's does: Sluice, told nothing, keeps to the announced limit from
/// the first answer on instead of learning it from a storm of 429s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_limit_configured_the_providers_announced_limit_paces_the_calls() {
    let stats = untold(SimConfig { rpm: 9_000, ..Default::default() }).await;
    assert!(stats.status_429 * 20 <= stats.requests, "more than 5% of calls answered 429: {stats:?}");
}

/// A worker killed with SIGKILL acks nothing: its chunks come back to
/// another worker within about 10 s (the default ack wait), not 30.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_workers_chunks_are_retried_within_15_seconds() {
    // Slow answers, so every chunk is mid-way when the worker dies.
    let sim = SimConfig { latency_ms: 3_000, ..Default::default() };
    let stack = Stack::start(sim, |_| {}).await.unwrap();
    let mut config = stack.worker_config();
    // The first worker takes every chunk of the job (8 of 25 items), so the
    // second has nothing to do but what the first left.
    config.max_chunks = 8;
    let mut first = WorkerProcess::spawn(&config, "first").unwrap();
    let report = stack.submit("classify", sample_jsonl(31, 200), false).await.unwrap();
    let calls_by = |worker: &'static str| {
        let pool = stack.db.pool.clone();
        async move {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_calls WHERE job_id = $1 AND worker = $2")
                .bind(report.job_id)
                .bind(worker)
                .fetch_one(&pool)
                .await?;
            Ok::<_, anyhow::Error>(n)
        }
    };
    wait_for("the first worker's calls", Duration::from_secs(30), || async { Ok(calls_by("first").await? >= 64) })
        .await
        .unwrap();
    first.kill9();
    let killed = Instant::now();
    let _second = WorkerProcess::spawn(&stack.worker_config(), "second").unwrap();
    wait_for("a call by the second worker", Duration::from_secs(15), || async { Ok(calls_by("second").await? > 0) })
        .await
        .unwrap();
    eprintln!("the killed worker's chunks came back after {:?}", killed.elapsed());
    stack.wait_completed(report.job_id, Duration::from_secs(120)).await.unwrap();
    assert_eq!(outcome(&stack, report.job_id).await, [("succeeded".to_string(), None, 200)]);
}
