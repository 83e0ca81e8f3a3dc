//! Resilient model calls: each error class handled as it deserves, the shared breaker, fallbacks, resume and fair sharing.

use std::collections::HashMap;
use std::time::Duration;

use secrecy::SecretString;
use sluice_tests::fixtures::{jobs_dir, sample_jsonl, wait_for, Stack};
use sluice_tests::sim::SimConfig;
use sqlx::Row;
use uuid::Uuid;

/// Results by (state, error class, model). Answers flagged for review count
/// as succeeded here: these tests are about getting an answer at all.
async fn outcome(stack: &Stack, job: Uuid) -> Vec<(String, Option<String>, Option<String>, i64)> {
    sqlx::query(
        "SELECT CASE WHEN state = 'needs_review' THEN 'succeeded' ELSE state END AS state, error_class, model,
                count(*) AS n
         FROM results WHERE job_id = $1 GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
    )
    .bind(job)
    .fetch_all(&stack.db.pool)
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get("state"), r.get("error_class"), r.get("model"), r.get("n")))
    .collect()
}

/// Results whose confidence carries the penalty `reason`.
async fn penalised(stack: &Stack, job: Uuid, reason: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM results WHERE job_id = $1
           AND confidence_detail->'penalties' @> jsonb_build_array(jsonb_build_object('reason', $2::text))",
    )
    .bind(job)
    .bind(reason)
    .fetch_one(&stack.db.pool)
    .await
    .unwrap()
}

fn row(state: &str, class: Option<&str>, model: &str, n: i64) -> (String, Option<String>, Option<String>, i64) {
    (state.into(), class.map(Into::into), Some(model.into()), n)
}

fn classify_with_fallback() -> common::spec::JobKind {
    let mut kind = common::spec::JobKind::load(&jobs_dir().join("classify")).unwrap();
    kind.spec.fallback_models = vec!["sim-large".into()];
    kind
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_is_retried_no_earlier_than_retry_after() {
    let sim = SimConfig { error_429: 0.3, retry_after_s: 0.4, log_requests: true, seed: 5, ..Default::default() };
    let mut stack = Stack::start(sim, |_| {}).await.unwrap();
    // A limit far above what the test uses, so the shared limiter is active.
    stack.add_worker(|c| c.rpm = 1_000_000.0);
    let report = stack.submit("classify", sample_jsonl(21, 60), false).await.unwrap();
    stack.wait_completed(report.job_id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(outcome(&stack, report.job_id).await, [row("succeeded", None, "sim-small", 60)]);

    let log = stack.sim.sim.log();
    let mut by_item: HashMap<u64, Vec<(u64, u16)>> = HashMap::new();
    for e in &log {
        by_item.entry(e.item).or_default().push((e.t_ms, e.status));
    }
    let mut checked = 0;
    for attempts in by_item.values() {
        for pair in attempts.windows(2) {
            if pair[0].1 == 429 {
                checked += 1;
                let gap = pair[1].0 - pair[0].0;
                assert!(gap >= 390, "retried {gap} ms after a 429 with Retry-After: 0.4");
            }
        }
    }
    assert!(checked > 5, "the test must see retried 429s, saw {checked}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quota_429_fails_the_item_without_retry() {
    let mut stack = Stack::start(SimConfig { quota: 1.0, ..Default::default() }, |_| {}).await.unwrap();
    stack.add_worker(|_| {});
    let report = stack.submit("classify", sample_jsonl(22, 30), false).await.unwrap();
    stack.wait_completed(report.job_id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(outcome(&stack, report.job_id).await, [row("failed", Some("quota_exceeded"), "sim-small", 30)]);
    assert_eq!(stack.sim.sim.stats().requests, 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_api_key_fails_fast_or_moves_to_the_next_key() {
    let sim = SimConfig { api_key: Some("the-right-key".into()), ..Default::default() };
    let mut stack = Stack::start(sim, |_| {}).await.unwrap();
    stack.add_worker(|c| c.api_keys = vec![SecretString::from("a-wrong-key")]);
    let report = stack.submit("classify", sample_jsonl(23, 30), false).await.unwrap();
    stack.wait_completed(report.job_id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(outcome(&stack, report.job_id).await, [row("failed", Some("auth"), "sim-small", 30)]);
    let calls = stack.sim.sim.stats().requests;
    assert!((1..=30).contains(&calls), "never retried with the same key: {calls} calls for 30 items");

    // The right key works, and is sent as a bearer token.
    let sim = SimConfig { api_key: Some("the-right-key".into()), log_requests: true, ..Default::default() };
    let mut stack = Stack::start(sim, |_| {}).await.unwrap();
    // With a refused key first and a good one second, the worker moves on.
    stack.add_worker(|c| {
        c.concurrency = 4;
        c.api_keys = vec![SecretString::from("a-wrong-key"), SecretString::from("the-right-key")];
    });
    let report = stack.submit("classify", sample_jsonl(23, 30), false).await.unwrap();
    stack.wait_completed(report.job_id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(outcome(&stack, report.job_id).await, [row("succeeded", None, "sim-small", 30)]);
    let refused = stack.sim.sim.log().iter().filter(|e| e.status == 401).count();
    assert!((1..=4).contains(&refused), "the wrong key is dropped after the calls already under way: {refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_request_goes_to_the_fallback_model() {
    let sim = SimConfig { reject_models: vec!["sim-small".into()], ..Default::default() };
    let mut stack = Stack::start(sim, |_| {}).await.unwrap();
    stack.add_worker(|_| {});
    let report = stack.submit_kind(classify_with_fallback(), sample_jsonl(24, 40), false).await.unwrap();
    stack.wait_completed(report.job_id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(outcome(&stack, report.job_id).await, [row("succeeded", None, "sim-large", 40)]);
    assert_eq!(stack.sim.sim.stats().requests, 80, "one refused call and one fallback call per item");
    assert_eq!(penalised(&stack, report.job_id, "fallback_model").await, 40, "a fallback answer is trusted less");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_is_down_falls_back_to_the_next_one() {
    let sim = SimConfig { down_models: vec!["sim-small".into()], ..Default::default() };
    let mut stack = Stack::start(sim, |_| {}).await.unwrap();
    stack.add_worker(|c| c.max_attempts = 2);
    let report = stack.submit_kind(classify_with_fallback(), sample_jsonl(25, 100), false).await.unwrap();
    stack.wait_completed(report.job_id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(outcome(&stack, report.job_id).await, [row("succeeded", None, "sim-large", 100)]);
    // Once the breaker of sim-small opened, items went straight to sim-large.
    let stats = stack.sim.sim.stats();
    assert!(stats.status_503 < 100, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_failing_validation_is_asked_again_with_the_error() {
    let sim = SimConfig { bad_output: 0.5, seed: 9, ..Default::default() };
    let mut stack = Stack::start(sim, |_| {}).await.unwrap();
    stack.add_worker(|c| c.max_repairs = 20); // 21 bad answers in a row: about 1 in 2 million
    let report = stack.submit("classify", sample_jsonl(26, 100), false).await.unwrap();
    stack.wait_completed(report.job_id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(outcome(&stack, report.job_id).await, [row("succeeded", None, "sim-small", 100)]);
    let stats = stack.sim.sim.stats();
    assert!(stats.bad_output > 20 && stats.requests == 100 + stats.bad_output, "{stats:?}");
    let repaired = penalised(&stack, report.job_id, "repaired").await;
    assert!(repaired > 10 && repaired < 100, "repaired answers are trusted less: {repaired}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_opens_the_shared_breaker_and_the_job_completes_after_recovery() {
    let sim = SimConfig { error_503: 1.0, retry_after_s: 0.05, log_requests: true, ..Default::default() };
    let mut stack = Stack::start(sim, |_| {}).await.unwrap();
    let interval = Duration::from_millis(500);
    for _ in 0..2 {
        stack.add_worker(|c| {
            c.concurrency = 2;
            c.breaker_threshold = 5;
            c.breaker_interval_ms = interval.as_millis() as u64;
            c.max_attempts = 20;
        });
    }
    let report = stack.submit("classify", sample_jsonl(27, 200), false).await.unwrap();

    let js = async_nats::jetstream::new(async_nats::connect(stack.nats.url()).await.unwrap());
    let kv = common::nats::ensure_state_bucket(&js).await.unwrap();
    let key = worker::breaker::key(&stack.sim.base_url(), "sim-small");
    let read = || {
        let (kv, key) = (kv.clone(), key.clone());
        async move {
            let v = kv.get(key).await?;
            Ok::<_, anyhow::Error>(v.map(|b| serde_json::from_slice::<worker::breaker::BreakerState>(&b).unwrap()))
        }
    };
    wait_for("the breaker to open", Duration::from_secs(30), || async { Ok(read().await?.is_some_and(|s| s.open)) })
        .await
        .unwrap();
    let opened_at = read().await.unwrap().unwrap().opened_at_ms;
    // Let the outage last a few probe intervals: until calls have been seen
    // well past them, or none come at all (then there were no probes either).
    let until = opened_at + 300 + 3 * interval.as_millis() as u64;
    let _ = wait_for("calls after a few probe intervals", Duration::from_secs(5), || async {
        Ok(stack.sim.sim.log().last().is_some_and(|e| e.wall_ms > until))
    })
    .await;
    let log = stack.sim.sim.log();
    let failed_before_open = log.iter().filter(|e| e.status == 503 && e.wall_ms <= opened_at).count();
    assert!(failed_before_open <= 10, "the breaker opened after {failed_before_open} failed calls");
    // Calls in flight when it opened may still land just after; then only probes.
    let settle = opened_at + 300;
    let now = log.last().map_or(settle, |e| e.wall_ms.max(settle));
    let probes = log.iter().filter(|e| e.wall_ms > settle).count() as u64;
    let allowed = (now - settle) / interval.as_millis() as u64 + 1;
    assert!(probes <= allowed, "{probes} calls while open over {} ms; at most {allowed} probes", now - settle);

    // Recovery: the next probe succeeds, the breaker closes, the job completes.
    stack.sim.sim.set_config(SimConfig { log_requests: true, ..Default::default() });
    wait_for("the breaker to close", Duration::from_secs(30), || async { Ok(read().await?.is_some_and(|s| !s.open)) })
        .await
        .unwrap();
    stack.wait_completed(report.job_id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(outcome(&stack, report.job_id).await, [row("succeeded", None, "sim-small", 200)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_redelivered_too_often_fail_their_items_with_a_reason() {
    let sim = SimConfig { error_503: 1.0, retry_after_s: 0.01, ..Default::default() };
    let mut stack = Stack::start(sim, |_| {}).await.unwrap();
    stack.add_worker(|c| {
        c.breaker_threshold = 1;
        c.breaker_interval_ms = 300;
        c.max_deliveries = 3;
    });
    let report = stack.submit("classify", sample_jsonl(28, 20), false).await.unwrap();
    stack.wait_completed(report.job_id, Duration::from_secs(60)).await.unwrap();
    let rows = outcome(&stack, report.job_id).await;
    let total: i64 = rows.iter().map(|r| r.3).sum();
    assert_eq!(total, 20, "every item has a result: {rows:?}");
    assert!(rows.iter().all(|r| r.0 == "failed"), "{rows:?}");
    assert!(rows.iter().any(|r| r.1.as_deref() == Some("redeliveries_exhausted")), "{rows:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_reruns_only_unfinished_items() {
    let sim = SimConfig { bad_output: 0.3, seed: 4, ..Default::default() };
    let mut stack = Stack::start(sim, |_| {}).await.unwrap();
    stack.add_worker(|c| c.max_repairs = 0);
    let report = stack.submit("classify", sample_jsonl(29, 300), false).await.unwrap();
    let job = report.job_id;
    stack.wait_completed(job, Duration::from_secs(60)).await.unwrap();
    let status = stack.status(job).await.unwrap();
    assert!(status.failed > 30 && status.failed < 150, "{status:?}");
    assert_eq!(stack.sim.sim.stats().requests, 300);

    // A running job cannot be resumed; a completed one can.
    stack.sim.sim.set_config(SimConfig::default());
    let resumed = stack.client.resume(job, false).await.unwrap();
    assert_eq!(resumed.failed_reset, status.failed);
    stack.wait_completed(job, Duration::from_secs(60)).await.unwrap();
    let after = stack.status(job).await.unwrap();
    assert_eq!((after.succeeded, after.failed), (300, 0));
    assert_eq!(stack.sim.sim.stats().requests, 300 + status.failed, "only the failed items were called again");

    let again = stack.client.resume(job, false).await.unwrap();
    assert_eq!((again.failed_reset, again.chunks), (0, 0), "nothing left to do");
    assert_eq!(stack.client.status(job).await.unwrap().state, "completed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_continues_a_cancelled_job_and_refuses_a_running_one() {
    let sim = SimConfig { latency_ms: 30, ..Default::default() };
    let mut stack = Stack::start(sim, |_| {}).await.unwrap();
    stack.add_worker(|c| c.concurrency = 4);
    let report = stack.submit("classify", sample_jsonl(30, 1_000), false).await.unwrap();
    let job = report.job_id;
    wait_for("some results", Duration::from_secs(60), || async { Ok(stack.client.status(job).await?.succeeded > 0) })
        .await
        .unwrap();
    let err = stack.client.resume(job, false).await.unwrap_err();
    assert!(err.to_string().contains("is running"), "{err}");
    stack.client.cancel(job).await.unwrap();
    stack.client.resume(job, false).await.unwrap();
    stack.wait_completed(job, Duration::from_secs(120)).await.unwrap();
    let st = stack.status(job).await.unwrap();
    assert_eq!((st.succeeded, st.failed), (1_000, 0));
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM results WHERE job_id = $1")
        .bind(job)
        .fetch_one(&stack.db.pool)
        .await
        .unwrap();
    assert_eq!(rows, 1_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_job_is_not_starved_by_a_big_one() {
    // Default settings throughout: one worker, a model answering in 100 ms.
    let (big, small) = big_then_small(|_| {}).await;
    assert_eq!(small, 100);
    assert!(big < 1_200, "the big job did {big} items while the small one ran");
}

/// The control for the test above: with ten minutes of work allowed to queue
/// ahead, every chunk of the big job is queued before the small job's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_long_queue_ahead_a_small_job_waits_for_the_big_one() {
    let (big, _) = big_then_small(|c| c.queue_ahead_ms = 600_000).await;
    assert!(big > 1_400, "the big job did only {big} items while the small one ran");
}

/// Submits a 2,000-item job and, once 300 of its items are done, a 100-item
/// one; returns how many items of the big job were done while the small one
/// ran, and how many of the small one.
async fn big_then_small(configure: impl FnOnce(&mut coordinator::ServeConfig)) -> (u64, u64) {
    let sim = SimConfig { latency_ms: 100, ..Default::default() };
    let mut stack = Stack::start(sim, configure).await.unwrap();
    stack.add_worker(|_| {});
    let big = stack.submit("classify", sample_jsonl(31, 2_000), false).await.unwrap();
    wait_for("the big job under way", Duration::from_secs(60), || async {
        Ok(stack.client.status(big.job_id).await?.done() >= 300)
    })
    .await
    .unwrap();
    let before = stack.client.status(big.job_id).await.unwrap().done();
    let small = stack.submit("classify", sample_jsonl(32, 100), false).await.unwrap();
    stack.wait_completed(small.job_id, Duration::from_secs(120)).await.unwrap();
    let big_done = stack.client.status(big.job_id).await.unwrap().done() - before;
    eprintln!("while the small job ran, the big one did {big_done} items");
    let small_done = stack.client.status(small.job_id).await.unwrap().done();
    stack.wait_completed(big.job_id, Duration::from_secs(120)).await.unwrap();
    (big_done, small_done)
}

/// Projects share the workers equally, whatever their number of jobs: with
/// three big jobs of one project running, another project's job gets about
/// half the calls, not a quarter (as sharing by job gave). Default settings,
/// one worker, a model answering in 100 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_project_with_one_job_gets_as_much_as_one_with_three() {
    let sim = SimConfig { latency_ms: 100, ..Default::default() };
    let mut stack = Stack::start(sim, |_| {}).await.unwrap();
    stack.add_worker(|_| {});
    let as_project = |project: &str| coordinator::model::NewJob {
        project: Some(project.into()),
        ..sluice_tests::fixtures::new_job("classify")
    };
    let mut big = Vec::new();
    for seed in 0..3 {
        let job = stack.client.create_job(&as_project("many")).await.unwrap().job_id;
        let input = futures::stream::iter([Ok(bytes::Bytes::from(sample_jsonl(40 + seed, 3_000)))]);
        stack.client.upload(job, input, false).await.unwrap();
        big.push(job);
    }
    let done = |jobs: Vec<uuid::Uuid>| {
        let client = stack.client.clone();
        async move {
            let mut n = 0;
            for j in jobs {
                n += client.status(j).await?.done();
            }
            anyhow::Ok(n)
        }
    };
    wait_for("the big jobs under way", Duration::from_secs(60), || async { Ok(done(big.clone()).await? >= 300) })
        .await
        .unwrap();
    let before = done(big.clone()).await.unwrap();
    let small = stack.client.create_job(&as_project("one")).await.unwrap().job_id;
    let input = futures::stream::iter([Ok(bytes::Bytes::from(sample_jsonl(49, 2_000)))]);
    stack.client.upload(small, input, false).await.unwrap();
    stack.wait_completed(small, Duration::from_secs(120)).await.unwrap();
    let many = done(big.clone()).await.unwrap() - before;
    eprintln!("while project one's 2,000 items ran, project many did {many}");
    // Equal shares give project many about 2,000 plus what was already queued
    // when project one's job came (about a second of work); shares by job
    // gave it three times project one's, about 6,000.
    assert!(many < 4_000, "project many did {many} items while project one did 2,000");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_together_stay_within_the_shared_limit() {
    let mut stack = Stack::start(SimConfig::default(), |_| {}).await.unwrap();
    for _ in 0..3 {
        stack.add_worker(|c| c.rpm = 1_200.0); // 20 requests per second for the whole cluster
    }
    let mut kind = common::spec::JobKind::load(&jobs_dir().join("classify")).unwrap();
    kind.spec.chunk_size = 10; // enough chunks for every worker to hold some
    let report = stack.submit_kind(kind, sample_jsonl(33, 160), false).await.unwrap();
    stack.wait_completed(report.job_id, Duration::from_secs(60)).await.unwrap();
    let timeline = stack.sim.sim.timeline();
    let per_second: Vec<u32> = timeline.iter().map(|s| s.requests).collect();
    // Any 3 whole seconds may hold 60 requests plus the bucket's small burst.
    for w in per_second.windows(3) {
        let n: u32 = w.iter().sum();
        assert!(n <= 60 + 5, "{n} requests in 3 s with a 20/s limit: {per_second:?}");
    }
    let workers: i64 = sqlx::query_scalar("SELECT count(DISTINCT worker) FROM results WHERE job_id = $1")
        .bind(report.job_id)
        .fetch_one(&stack.db.pool)
        .await
        .unwrap();
    assert!(workers >= 2, "the work was shared");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopping_gracefully_hands_back_its_chunks_without_wasting_a_call() {
    let sim = SimConfig { latency_ms: 20, ..Default::default() };
    let mut stack = Stack::start(sim, |_| {}).await.unwrap();
    let leaving = stack.add_worker(|c| c.concurrency = 8);
    stack.add_worker(|c| c.concurrency = 8);
    let report = stack.submit("classify", sample_jsonl(34, 1_000), false).await.unwrap();
    let job = report.job_id;
    wait_for("some results", Duration::from_secs(60), || async { Ok(stack.client.status(job).await?.done() >= 200) })
        .await
        .unwrap();
    leaving.cancel();
    stack.wait_completed(job, Duration::from_secs(120)).await.unwrap();
    let st = stack.client.status(job).await.unwrap();
    assert_eq!((st.succeeded, st.failed), (1_000, 0));
    // Calls under way finished and were written; nothing was called twice.
    assert_eq!(stack.sim.sim.stats().requests, 1_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_outage_resume_calls_only_the_unfinished_items() {
    let sim = SimConfig { latency_ms: 10, ..Default::default() };
    let mut stack = Stack::start(sim, |_| {}).await.unwrap();
    stack.add_worker(|c| {
        c.concurrency = 8;
        c.breaker_threshold = 3;
        c.breaker_interval_ms = 200;
    });
    let report = stack.submit("classify", sample_jsonl(35, 600), false).await.unwrap();
    let job = report.job_id;
    wait_for("some results", Duration::from_secs(60), || async { Ok(stack.client.status(job).await?.done() >= 100) })
        .await
        .unwrap();
    // The provider goes down; the user gives up on the job for now.
    stack.sim.sim.set_config(SimConfig { error_503: 1.0, retry_after_s: 0.01, ..Default::default() });
    wait_for("the outage seen by the worker", Duration::from_secs(30), || async {
        Ok(stack.sim.sim.stats().status_503 > 0)
    })
    .await
    .unwrap();
    stack.client.cancel(job).await.unwrap();
    let before = stack.client.status(job).await.unwrap();
    assert!(before.done() < 600, "{before:?}");
    // Answers are written within a fraction of a second of coming; one that
    // came a moment ago may still be on its way to Postgres.
    wait_for("every answer given so far saved", Duration::from_secs(10), || async {
        Ok(stack.client.status(job).await?.succeeded == stack.sim.sim.stats().ok)
    })
    .await
    .unwrap();
    // "For now": the user resumes once the cancelled deliveries are over (no
    // chunk delivered and not yet acked). A resume within a second of the
    // cancel can meet a delivery that has not yet seen the cancel, whose
    // items still waiting for a call slot may call once more.
    let js = async_nats::jetstream::new(async_nats::connect(stack.nats.url()).await.unwrap());
    wait_for("the cancelled job's deliveries over", Duration::from_secs(30), || async {
        let stream = js.get_stream(common::wire::STREAM).await?;
        let mut consumer: async_nats::jetstream::consumer::PullConsumer =
            stream.get_consumer(common::wire::CONSUMER).await.map_err(|e| anyhow::anyhow!(e))?;
        Ok(consumer.info().await?.num_ack_pending == 0)
    })
    .await
    .unwrap();

    // Back up: resume runs the rest, and no item that had an answer is called again.
    stack.sim.sim.set_config(SimConfig::default());
    stack.client.resume(job, false).await.unwrap();
    stack.wait_completed(job, Duration::from_secs(120)).await.unwrap();
    let after = stack.status(job).await.unwrap();
    assert_eq!((after.succeeded, after.failed), (600, 0));
    assert_eq!(stack.sim.sim.stats().ok, 600, "exactly one answered call per item");
}

/// An answer is written while other items of its chunk still wait on the
/// provider: kept in memory it would be lost to a crash, and a resumed job's
/// new delivery would call its item again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_are_saved_while_the_rest_of_their_chunk_still_waits() {
    let sim = SimConfig { hang: 0.3, hang_ms: 60_000, seed: 3, ..Default::default() };
    let mut stack = Stack::start(sim, |_| {}).await.unwrap();
    stack.add_worker(|_| {});
    let report = stack.submit("classify", sample_jsonl(38, 50), false).await.unwrap();
    wait_for("the answered items saved while the hanging ones wait", Duration::from_secs(20), || async {
        let stats = stack.sim.sim.stats();
        let saved = stack.client.status(report.job_id).await?.succeeded;
        Ok(stats.hangs > 0 && stats.ok >= 3 && saved == stats.ok)
    })
    .await
    .unwrap();
    let st = stack.client.status(report.job_id).await.unwrap();
    assert!(st.done() < 50, "the hanging calls were still under way: {st:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_concurrency_cap_holds_across_workers_and_a_lone_worker_uses_all_of_it() {
    let sim = SimConfig { latency_ms: 100, ..Default::default() };
    let mut stack = Stack::start(sim, |_| {}).await.unwrap();
    let mut kind = common::spec::JobKind::load(&jobs_dir().join("classify")).unwrap();
    kind.spec.chunk_size = 10;

    // Alone, one worker fills the whole cap.
    let lone = stack.add_worker(|c| c.max_in_flight = 6);
    let report = stack.submit_kind(kind.clone(), sample_jsonl(36, 120), false).await.unwrap();
    stack.wait_completed(report.job_id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(stack.sim.sim.stats().max_in_flight, 6);
    lone.cancel();

    // Three workers, each able to run 16 calls, together never exceed it.
    let mut stack = Stack::start(SimConfig { latency_ms: 100, ..Default::default() }, |_| {}).await.unwrap();
    for _ in 0..3 {
        stack.add_worker(|c| {
            c.concurrency = 16;
            c.max_in_flight = 6;
        });
    }
    let report = stack.submit_kind(kind, sample_jsonl(37, 300), false).await.unwrap();
    stack.wait_completed(report.job_id, Duration::from_secs(120)).await.unwrap();
    let stats = stack.sim.sim.stats();
    assert!(stats.max_in_flight <= 6, "{stats:?}");
    assert_eq!(stats.ok, 300);
    let workers: i64 = sqlx::query_scalar("SELECT count(DISTINCT worker) FROM results WHERE job_id = $1")
        .bind(report.job_id)
        .fetch_one(&stack.db.pool)
        .await
        .unwrap();
    assert!(workers >= 2, "the slots were shared");
}

/// One item on a model answering in 4 s, past an ack wait of 3 s, and two
/// workers: one works on the chunk, the other waits for work. Returns how
/// many calls the simulator answered.
async fn a_long_chunk(heartbeat: bool) -> u64 {
    let sim = SimConfig { latency_ms: 4_000, ..Default::default() };
    let mut stack = Stack::start(sim, |_| {}).await.unwrap();
    for _ in 0..2 {
        stack.add_worker(|c| {
            c.ack_wait_s = 3;
            c.heartbeat = heartbeat;
        });
    }
    let report = stack.submit("classify", sample_jsonl(36, 1), false).await.unwrap();
    stack.wait_completed(report.job_id, Duration::from_secs(60)).await.unwrap();
    stack.sim.sim.stats().requests
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_that_runs_past_ack_wait_stays_with_its_worker() {
    assert_eq!(a_long_chunk(true).await, 1, "the chunk was not handed to the other worker");
}

/// The control for the test above: without progress acks JetStream hands a
/// long chunk to the other worker, which calls its unfinished items again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_heartbeat_a_long_chunk_is_redelivered_and_called_twice() {
    assert_eq!(a_long_chunk(false).await, 2, "the waiting worker called the item again");
}
