//! Sluice behind a real PgBouncer in transaction mode: a job runs end to end with its coordinator and workers sharing two server connections per role.

use std::process::Command;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sluice_tests::fixtures::{sample_jsonl, Pooler, Stack, TestDb};
use sluice_tests::sim::SimConfig;

/// PgBouncer's admin console's `SHOW STATS`: transactions it carried to `db`.
fn transactions_carried(pooler: &Pooler, db: &str) -> i64 {
    let url: sqlx::postgres::PgConnectOptions = sluice_tests::fixtures::admin_url().parse().unwrap();
    let out = Command::new("psql")
        .args(["-h", "127.0.0.1", "-p", &pooler.port().to_string(), "-U", url.get_username(), "-d", "pgbouncer"])
        .args(["-A", "-F", "|", "-c", "SHOW STATS"])
        .env("PGPASSWORD", "sluice")
        .output()
        .expect("psql runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().split('|').collect();
    let col = header.iter().position(|h| *h == "total_xact_count").expect("SHOW STATS has total_xact_count");
    lines
        .map(|l| l.split('|').collect::<Vec<_>>())
        .find(|f| f.first() == Some(&db))
        .and_then(|f| f.get(col).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_runs_end_to_end_through_pgbouncer_in_transaction_mode() {
    // Two server connections per database and role for the coordinator and
    // three workers (whose pools hold 8 + 3 x 2 client connections): every
    // transaction may land on another server connection than the last.
    let pooler = Pooler::start(2, 200).await.unwrap();
    let db = TestDb::create().await.unwrap();
    let coordinator_url = pooler.url_for(&db.app_url("sluice_coordinator"));
    let worker_url = pooler.url_for(&db.app_url("sluice_worker"));
    assert_ne!(coordinator_url, db.app_url("sluice_coordinator"), "the URL points at PgBouncer");
    let sim = SimConfig { latency_ms: 5, ..Default::default() };
    let mut stack = Stack::start_on_tuned(db, sim, |c| c.database_url = coordinator_url).await.unwrap();
    for _ in 0..3 {
        let url = worker_url.clone();
        stack.add_worker(move |c| c.database_url = url);
    }
    // 1,000 documents and 100 repeats of them under other ids: the repeats
    // share their originals' answers (the write that copies them runs unprepared).
    let docs = sample_jsonl(17, 1_000);
    let text = String::from_utf8(docs).unwrap();
    let repeats: String =
        text.lines().take(100).map(|l| l.replacen("\"id\":\"", "\"id\":\"again-", 1) + "\n").collect();
    let input = format!("{text}{repeats}").into_bytes();

    // The workers' server connections, sampled while the job runs.
    let peak = Arc::new(AtomicI64::new(0));
    let sampler = {
        let (peak, pool, name) = (peak.clone(), stack.db.pool.clone(), stack.db.name().to_string());
        tokio::spawn(async move {
            loop {
                let n: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND usename = 'sluice_worker'",
                )
                .bind(&name)
                .fetch_one(&pool)
                .await
                .unwrap_or(0);
                peak.fetch_max(n, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let report = stack.submit("classify", input, false).await.unwrap();
    assert_eq!(report.items, 1_100);
    stack.wait_completed(report.job_id, Duration::from_secs(180)).await.unwrap();
    sampler.abort();

    // Every figure the status gives agrees with the rows themselves.
    let status = stack.status(report.job_id).await.unwrap();
    assert_eq!((status.succeeded, status.failed, status.pending), (1_100, 0, 0));
    let (results, audited, shared): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM results WHERE job_id = $1),
                (SELECT count(*) FROM audit_attempts WHERE job_id = $1 AND outcome = 'ok'),
                (SELECT count(*) FROM results WHERE job_id = $1 AND source = 'shared')",
    )
    .bind(report.job_id)
    .fetch_one(&stack.db.pool)
    .await
    .unwrap();
    assert_eq!(results, 1_100, "one result per item");
    assert_eq!(shared, 100, "the repeats shared their originals' answers");
    assert_eq!(audited, 1_000, "one audited call per distinct document");
    assert_eq!(stack.sim.sim.stats().requests, 1_000, "no document was called twice");

    // It went through PgBouncer, on no more server connections than its pool.
    let carried = transactions_carried(&pooler, stack.db.name());
    assert!(carried > 100, "PgBouncer carried {carried} transactions to the job's database\n{}", pooler.log());
    let peak = peak.load(Ordering::Relaxed);
    assert!((1..=2).contains(&peak), "the workers held {peak} server connections; PgBouncer allows 2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooler_that_loses_prepared_statements_is_named_with_the_fix() {
    // PgBouncer's default: named statements are not carried from one server
    // connection to the next, and sqlx prepares every statement by name.
    let pooler = Pooler::start(1, 0).await.unwrap();
    let db = TestDb::create().await.unwrap();
    let url = pooler.url_for(&db.app_url("sluice_coordinator"));
    let mut found = None;
    // Two connections share one server connection: one of them soon finds
    // the other's statement there, or misses its own.
    for _ in 0..20 {
        let pool = common::db::connect(&url, 2).await.unwrap();
        let (a, b) = tokio::join!(common::db::slots(&pool), common::db::slots(&pool));
        if let Some(e) = [a.err(), b.err()].into_iter().flatten().next() {
            found = Some(e);
            break;
        }
    }
    let e = found.expect("transaction pooling without max_prepared_statements breaks sqlx's named statements");
    let text = e.to_string();
    assert!(matches!(e, common::db::DbError::Pooler { .. }), "{text}");
    assert!(text.contains("max_prepared_statements") && text.contains("deploy/README.md"), "{text}");
}
