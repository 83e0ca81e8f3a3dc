//! Infrastructure faults against a running job, with real processes: NATS losing its store, workers killed mid-chunk, Postgres going away.

use std::time::Duration;

use sluice_tests::fixtures::{sample_jsonl, wait_for, Stack, WorkerProcess};
use sluice_tests::sim::SimConfig;
use uuid::Uuid;

async fn results(stack: &Stack, job: Uuid) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM results WHERE job_id = $1")
        .bind(job)
        .fetch_one(&stack.db.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_survives_nats_coming_back_with_an_empty_store_without_restarts() {
    let sim = SimConfig { latency_ms: 20, ..Default::default() };
    // The reconciler at its defaults: recovery must not wait for its 30 s rule.
    let mut stack = Stack::start(sim, |c| {
        c.reconcile_interval_ms = 10_000;
        c.republish_after_ms = 30_000;
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = {
        let mut c = stack.worker_config();
        c.concurrency = 8;
        c
    };
    let logs: Vec<_> = (0..2).map(|i| dir.path().join(format!("worker-{i}.log"))).collect();
    let _workers: Vec<WorkerProcess> = logs
        .iter()
        .enumerate()
        .map(|(i, log)| WorkerProcess::spawn_logged(&config, &format!("w{i}"), &[], Some(log)).unwrap())
        .collect();
    let report = stack.submit("classify", sample_jsonl(81, 3_000), false).await.unwrap();
    wait_for("some results", Duration::from_secs(60), || async { Ok(results(&stack, report.job_id).await >= 300) })
        .await
        .unwrap();

    stack.nats.restart_empty().unwrap();
    let at_restart = results(&stack, report.job_id).await;
    // Progress again within 30 s of NATS coming back: every chunk in flight was lost with the store.
    wait_for("progress after the restart", Duration::from_secs(30), || async {
        Ok(results(&stack, report.job_id).await >= at_restart + 300)
    })
    .await
    .unwrap();
    stack.wait_completed(report.job_id, Duration::from_secs(120)).await.unwrap();
    let (n, distinct): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(DISTINCT seq) FROM results WHERE job_id = $1 AND state = 'succeeded'")
            .bind(report.job_id)
            .fetch_one(&stack.db.pool)
            .await
            .unwrap();
    assert_eq!((n, distinct), (3_000, 3_000));
    // Failures are logged once per change of state, not on every retry.
    for log in &logs {
        let text = std::fs::read_to_string(log).unwrap();
        let failures = text.lines().filter(|l| l.contains("retrying until it works")).count();
        assert!(failures <= 4, "{failures} failure lines in {}:\n{text}", log.display());
    }
}
