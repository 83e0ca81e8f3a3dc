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
    assert_one_result_each(&stack, report.job_id, 3_000).await;
    assert_eq!(stack.client.status(report.job_id).await.unwrap().succeeded, 3_000);
    // Failures are logged once per change of state, not on every retry.
    for log in &logs {
        let text = std::fs::read_to_string(log).unwrap();
        let failures = text.lines().filter(|l| l.contains("retrying until it works")).count();
        assert!(failures <= 6, "{failures} failure lines in {}:\n{text}", log.display());
        let warnings = text.lines().filter(|l| l.contains("WARN")).count();
        eprintln!("{}: {failures} failure lines, {warnings} warnings", log.display());
        assert!(warnings <= 20, "{warnings} warnings in {}:\n{text}", log.display());
    }
}

/// Checks that the job has exactly one result per item.
async fn assert_one_result_each(stack: &Stack, job: Uuid, total: u64) {
    let (n, distinct): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(DISTINCT seq) FROM results WHERE job_id = $1")
            .bind(job)
            .fetch_one(&stack.db.pool)
            .await
            .unwrap();
    assert_eq!((n, distinct), (total as i64, total as i64));
}

/// Calls the simulator answered that have no row in `audit_calls`, matched by request hash.
async fn unaudited_answers(stack: &Stack, job: Uuid) -> i64 {
    let calls: Vec<String> = sqlx::query_scalar("SELECT request_hash FROM audit_calls WHERE job_id = $1")
        .bind(job)
        .fetch_all(&stack.db.pool)
        .await
        .unwrap();
    let log = stack.sim.sim.log();
    let answered = tally(log.iter().filter(|e| e.status == 200).map(|e| e.request_hash.as_str()));
    let audited = tally(calls.iter().map(String::as_str));
    answered.iter().map(|(h, n)| (n - audited.get(h).copied().unwrap_or(0)).max(0)).sum()
}

/// Request hashes and how often each occurs.
fn tally<'a>(hashes: impl Iterator<Item = &'a str>) -> std::collections::HashMap<&'a str, i64> {
    let mut m = std::collections::HashMap::new();
    for h in hashes {
        *m.entry(h).or_insert(0) += 1;
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_killed_mid_chunk_leave_every_answered_call_audited() {
    let sim = SimConfig { latency_ms: 40, latency_jitter_ms: 20, log_requests: true, ..Default::default() };
    let stack = Stack::start(sim, |_| {}).await.unwrap();
    let config = {
        let mut c = stack.worker_config();
        c.concurrency = 4;
        // Killed workers' chunks come back quickly; the default is 30 s.
        c.ack_wait_s = 3;
        c
    };
    let mut workers: Vec<WorkerProcess> =
        (0..3).map(|i| WorkerProcess::spawn(&config, &format!("w{i}")).unwrap()).collect();
    let total = 1_200;
    let report = stack.submit("classify", sample_jsonl(82, total), false).await.unwrap();
    for kill in 0..4 {
        let target = (kill + 1) * 150;
        wait_for("progress", Duration::from_secs(60), || async { Ok(results(&stack, report.job_id).await >= target) })
            .await
            .unwrap();
        workers[kill as usize % 3].kill9();
        workers[kill as usize % 3] = WorkerProcess::spawn(&config, &format!("w{kill}-b")).unwrap();
    }
    stack.wait_completed(report.job_id, Duration::from_secs(120)).await.unwrap();

    let pool = &stack.db.pool;
    assert_one_result_each(&stack, report.job_id, total).await;
    // Every call the simulator answered was recorded before it was made.
    assert_eq!(unaudited_answers(&stack, report.job_id).await, 0, "answered calls without an audit row");
    let log = stack.sim.sim.log();
    // Outcomes are attached to their calls; calls cut off by a kill have none.
    let (attempts, orphans, unfinished): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM audit_attempts WHERE job_id = $1),
                (SELECT count(*) FROM audit_attempts a WHERE job_id = $1
                   AND NOT EXISTS (SELECT 1 FROM audit_calls c WHERE c.call_id = a.call_id)),
                (SELECT count(*) FROM audit_calls c WHERE job_id = $1
                   AND NOT EXISTS (SELECT 1 FROM audit_attempts a WHERE a.call_id = c.call_id))",
    )
    .bind(report.job_id)
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(orphans, 0);
    assert!(unfinished <= 4 * 4 * 2, "{unfinished} unfinished calls after 4 kills of workers with 4 calls in flight");
    assert!(attempts >= total as i64);
    // results.attempts counts the item's attempts in the audit trail, over every delivery.
    let off: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM results r WHERE r.job_id = $1
           AND r.attempts <> (SELECT count(*) FROM audit_attempts a WHERE a.job_id = r.job_id AND a.seq = r.seq)",
    )
    .bind(report.job_id)
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(off, 0);
    // Results are written in small batches: a kill repeats few calls.
    let repeated = log.iter().filter(|e| e.status == 200).count() as i64 - total as i64;
    assert!(repeated <= total as i64 / 10, "{repeated} calls repeated after 4 kills");
    eprintln!("repeated calls: {repeated}, unfinished: {unfinished}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_model_call_is_made_while_postgres_is_down_and_the_job_completes_after() {
    let cluster = sluice_tests::fixtures::PgCluster::start().await.unwrap();
    let db = sluice_tests::fixtures::TestDb::create_on(&cluster.admin_url()).await.unwrap();
    let sim = SimConfig { latency_ms: 30, latency_jitter_ms: 20, log_requests: true, ..Default::default() };
    let stack = Stack::start_on(db, sim).await.unwrap();
    let config = {
        let mut c = stack.worker_config();
        c.concurrency = 4;
        // The watchdog speaks up well within the outage.
        c.stall_warn_s = 5;
        c
    };
    let logs = tempfile::tempdir().unwrap();
    let log_of = |i: usize| logs.path().join(format!("w{i}.log"));
    let _workers: Vec<WorkerProcess> = (0..2)
        .map(|i| WorkerProcess::spawn_logged(&config, &format!("w{i}"), &[], Some(&log_of(i))).unwrap())
        .collect();
    let total = 2_000;
    let report = stack.submit("classify", sample_jsonl(83, total), false).await.unwrap();
    wait_for("some results", Duration::from_secs(60), || async { Ok(results(&stack, report.job_id).await >= 300) })
        .await
        .unwrap();

    cluster.stop_server().unwrap();
    let stopped = now_ms();
    // The outage itself: Postgres stays away for 20 s.
    tokio::time::sleep(Duration::from_secs(20)).await;
    let restarted = now_ms();
    cluster.start_server().unwrap();

    // Calls in flight when it stopped end within a second; none may start after.
    let log = stack.sim.sim.log();
    let during: Vec<_> = log.iter().filter(|e| e.wall_ms > stopped + 1_000 && e.wall_ms < restarted).collect();
    assert!(
        during.is_empty(),
        "{} model calls while Postgres was down, first at +{} ms",
        during.len(),
        during[0].wall_ms - stopped
    );

    stack.wait_completed(report.job_id, Duration::from_secs(120)).await.unwrap();
    assert_one_result_each(&stack, report.job_id, total).await;
    assert_eq!(unaudited_answers(&stack, report.job_id).await, 0, "answered calls without an audit row");
    // A worker holding chunks with no call made for 5 s said what its tasks
    // were waiting on: their calls' rows in the audit trail.
    let said: Vec<String> = (0..2)
        .flat_map(|i| std::fs::read_to_string(log_of(i)).unwrap().lines().map(str::to_string).collect::<Vec<_>>())
        .filter(|l| l.contains("no progress for"))
        .collect();
    assert!(!said.is_empty(), "no worker logged the stall");
    eprintln!("the watchdog said: {}", said[0]);
    assert!(said.iter().all(|l| l.contains("audit=") && l.contains("db_connections")), "{said:?}");
    assert!(said.iter().any(|l| !l.contains("audit=0")), "nothing waited on the audit trail: {said:?}");
    // Answers that arrived during the outage were kept, not asked again.
    let repeated = log.iter().filter(|e| e.status == 200).count() as i64 - total as i64;
    assert!(repeated <= 8, "{repeated} calls repeated");
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

/// A state the cluster shares changes once, so it is logged once for the
/// cluster, by the worker whose write changed it, not once per worker or per
/// compare-and-set retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_breaker_opening_is_logged_once_for_the_cluster() {
    let sim = SimConfig { error_503: 1.0, retry_after_s: 0.01, ..Default::default() };
    let stack = Stack::start(sim, |_| {}).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = stack.worker_config();
    let logs: Vec<_> = (0..3).map(|i| dir.path().join(format!("worker-{i}.log"))).collect();
    let _workers: Vec<WorkerProcess> = logs
        .iter()
        .enumerate()
        .map(|(i, log)| {
            WorkerProcess::spawn_logged(&config, &format!("w{i}"), &[("SLUICE_LOG", "info")], Some(log)).unwrap()
        })
        .collect();
    let report = stack.submit("classify", sample_jsonl(82, 2_000), false).await.unwrap();
    let lines = |what: &'static str| {
        let logs = logs.clone();
        move || logs.iter().map(|l| std::fs::read_to_string(l).unwrap_or_default().matches(what).count()).sum::<usize>()
    };
    let opened = lines("circuit breaker opened");
    wait_for("the breaker opened", Duration::from_secs(60), || async { Ok(opened() > 0) }).await.unwrap();
    stack.sim.sim.set_config(SimConfig::default());
    stack.wait_completed(report.job_id, Duration::from_secs(120)).await.unwrap();
    let closed = lines("circuit breaker closed");
    assert_eq!((opened(), closed()), (1, 1), "one outage: the breaker opened once and closed once");
    // Logs in files are JSON by default, without colour codes.
    let text = std::fs::read_to_string(&logs[0]).unwrap();
    assert!(!text.contains('\u{1b}'), "ANSI escapes in a log file");
    assert!(text.lines().all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()), "{text}");
}
