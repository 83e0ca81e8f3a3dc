//! History that stays small: results and the audit trail land in the partition of their job's month, and `sluice admin prune` drops old months whole, refusing while resume or review still needs a job in them, and recording what it did.

use std::time::Duration;

use chrono::{Datelike, TimeZone, Utc};
use sluice_tests::fixtures::{new_job, sample_jsonl, Stack};
use sluice_tests::sim::SimConfig;
use uuid::Uuid;

/// A UUIDv7 made at `at`, as the coordinator would have made it then.
fn id_at(at: chrono::DateTime<Utc>) -> Uuid {
    Uuid::new_v7(uuid::Timestamp::from_unix(uuid::NoContext, at.timestamp() as u64, at.timestamp_subsec_nanos()))
}

/// Copies job `from` (its row, items, chunks and copies) as job `to`, made at
/// `at` and in `state`, its chunks pending and unpublished: the publisher and
/// workers run it as any job. With `results`, its results come along too,
/// the first one waiting for review.
async fn copy_job(stack: &Stack, from: Uuid, to: Uuid, at: chrono::DateTime<Utc>, state: &str, results: bool) {
    let mut sql = format!(
        "CREATE TEMP TABLE j AS SELECT * FROM jobs WHERE id = '{from}';
         UPDATE j SET id = '{to}', state = '{state}', finished_at = NULL, created_at = '{at}';
         INSERT INTO jobs SELECT * FROM j; DROP TABLE j;
         CREATE TEMP TABLE i AS SELECT * FROM items WHERE job_id = '{from}';
         UPDATE i SET job_id = '{to}'; INSERT INTO items SELECT * FROM i; DROP TABLE i;
         CREATE TEMP TABLE d AS SELECT * FROM item_copies WHERE job_id = '{from}';
         UPDATE d SET job_id = '{to}'; INSERT INTO item_copies SELECT * FROM d; DROP TABLE d;
         CREATE TEMP TABLE c AS SELECT * FROM chunks WHERE job_id = '{from}';
         UPDATE c SET job_id = '{to}', state = 'pending', published_at = NULL, done_at = NULL, generation = 0;
         INSERT INTO chunks SELECT * FROM c; DROP TABLE c;"
    );
    if results {
        sql.push_str(&format!(
            "CREATE TEMP TABLE r AS SELECT * FROM results WHERE job_id = '{from}';
             UPDATE r SET job_id = '{to}', job_time = job_time('{to}');
             UPDATE r SET state = 'needs_review' WHERE seq = (SELECT min(seq) FROM r);
             INSERT INTO results SELECT * FROM r; DROP TABLE r;
             UPDATE chunks SET state = 'done', done_at = now() WHERE job_id = '{to}';"
        ));
    }
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&stack.db.pool).await.unwrap();
}

async fn count(stack: &Stack, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string())).fetch_one(&stack.db.pool).await.unwrap()
}

async fn exists(stack: &Stack, table: &str) -> bool {
    sqlx::query_scalar::<_, bool>("SELECT to_regclass($1) IS NOT NULL")
        .bind(table)
        .fetch_one(&stack.db.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_drops_old_months_whole_refuses_what_is_still_needed_and_is_audited() {
    let mut stack = Stack::start(SimConfig { latency_ms: 5, ..Default::default() }, |_| {}).await.unwrap();
    stack.add_worker(|_| {});
    // A job of this month: nothing below a threshold of 0 goes to review,
    // and its copies below call the model again rather than reuse answers.
    let job = coordinator::model::NewJob { review_below: Some(0.0), cache: Some(false), ..new_job("classify") };
    let recent = stack.client.create_job(&job).await.unwrap().job_id;
    let body = futures::stream::iter([Ok(bytes::Bytes::from(sample_jsonl(5, 30)))]);
    stack.client.upload(recent, body, false).await.unwrap();
    stack.wait_completed(recent, Duration::from_secs(60)).await.unwrap();

    // The same job made about 100 days ago, run by the workers: its results
    // and audit rows land in that month's partitions.
    let then = Utc::now() - chrono::Duration::days(100);
    let month = then.format("%Y%m").to_string();
    sqlx::query("SELECT create_history_month($1)").bind(then).execute(&stack.db.pool).await.unwrap();
    let old = id_at(then);
    copy_job(&stack, recent, old, then, "running", false).await;
    stack.wait_completed(old, Duration::from_secs(60)).await.unwrap();
    assert_eq!(count(&stack, &format!("SELECT count(*) FROM results_p{month}")).await, 30);
    assert!(count(&stack, &format!("SELECT count(*) FROM audit_calls_p{month}")).await >= 30);
    assert!(count(&stack, &format!("SELECT count(*) FROM audit_attempts_p{month} WHERE job_id = '{old}'")).await >= 30);
    let recent_results = count(&stack, &format!("SELECT count(*) FROM results WHERE job_id = '{recent}'")).await;
    assert_eq!(recent_results, 30);

    // Two more jobs of that month, still needed: one paused (resume needs
    // it), one completed with an answer waiting for a reviewer.
    let paused = id_at(then + chrono::Duration::seconds(1));
    copy_job(&stack, recent, paused, then, "paused", false).await;
    let reviewing = id_at(then + chrono::Duration::seconds(2));
    copy_job(&stack, recent, reviewing, then, "completed", true).await;

    // Prune before the 2nd of the month after: that month's jobs go.
    let next = Utc.with_ymd_and_hms(then.year(), then.month(), 1, 0, 0, 0).unwrap() + chrono::Months::new(1);
    let before = (next + chrono::Duration::days(1)).format("%Y-%m-%d").to_string();
    let refused = stack.sluice(&["admin", "prune", "--before", &before]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{err}");
    for want in [
        format!("nothing pruned: 2 job(s) created before {}", next.format("%Y-%m-%d")),
        format!("{paused} is paused"),
        format!("{reviewing} has 1 answer(s) waiting for review"),
        "sluice cancel".into(),
    ] {
        assert!(err.contains(&want), "{want:?} in {err}");
    }
    assert!(exists(&stack, &format!("results_p{month}")).await, "nothing dropped");
    assert_eq!(count(&stack, "SELECT count(*) FROM audit_prunes").await, 0, "nothing recorded");

    // Resolved as a user would: cancel the paused job, review the answer.
    stack.client.cancel(paused).await.unwrap();
    let item: String = sqlx::query_scalar("SELECT item_id FROM results WHERE job_id = $1 AND state = 'needs_review'")
        .bind(reviewing)
        .fetch_one(&stack.db.pool)
        .await
        .unwrap();
    let decision = format!("{{\"id\":\"{item}\",\"answer\":\"sports\",\"reviewer\":\"rita\"}}\n");
    stack.client.review_import(reviewing, decision.into_bytes(), "jsonl", "decisions.jsonl").await.unwrap();

    // A dry run says what would go and changes nothing.
    let dry = stack.sluice(&["admin", "prune", "--before", &before, "--dry-run", "--json"]);
    assert!(dry.status.success(), "{}", String::from_utf8_lossy(&dry.stderr));
    let dry: coordinator::model::Pruned = serde_json::from_slice(&dry.stdout).unwrap();
    assert!(dry.dry_run);
    assert_eq!(dry.jobs, 3);
    assert_eq!(dry.rows["results"], 60, "the job run then and the reviewed one; the paused one has none");
    for table in ["results", "audit_calls", "audit_attempts", "audit_events"] {
        assert!(dry.partitions.contains(&format!("{table}_p{month}")), "{:?}", dry.partitions);
    }
    assert!(exists(&stack, &format!("results_p{month}")).await);

    let done = stack.sluice(&["admin", "prune", "--before", &before]);
    let out = String::from_utf8_lossy(&done.stdout);
    assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
    assert!(out.contains(&format!("removed 3 job(s) created before {}", next.format("%Y-%m-%d"))), "{out}");
    for table in ["results", "audit_calls", "audit_attempts", "audit_events"] {
        assert!(!exists(&stack, &format!("{table}_p{month}")).await, "{table}_p{month} dropped");
    }
    let gone =
        count(&stack, &format!("SELECT count(*) FROM jobs WHERE id IN ('{old}', '{paused}', '{reviewing}')")).await;
    assert_eq!(gone, 0);
    let items =
        count(&stack, &format!("SELECT count(*) FROM items WHERE job_id IN ('{old}', '{paused}', '{reviewing}')"))
            .await;
    assert_eq!(items, 0, "their items went with them");
    // This month's job is untouched and its figures still add up.
    let status = stack.status(recent).await.unwrap();
    assert_eq!((status.state.as_str(), status.succeeded), ("completed", 30));

    // Recorded, append-only like the rest of the audit trail.
    let (actor, jobs, results): (String, i64, i64) =
        sqlx::query_as("SELECT actor, jobs, (rows->>'results')::bigint FROM audit_prunes")
            .fetch_one(&stack.db.pool)
            .await
            .unwrap();
    assert_eq!((actor.as_str(), jobs, results), ("test-admin", 3, 60));
    let rewrite = sqlx::query("DELETE FROM audit_prunes").execute(&stack.db.pool).await.unwrap_err().to_string();
    assert!(rewrite.contains("append-only") || rewrite.contains("permission denied"), "{rewrite}");

    // A future date, a date that is not one, and a token that is not an admin's are refused.
    let future = stack.sluice(&["admin", "prune", "--before", "2999-01-01"]);
    assert!(String::from_utf8_lossy(&future.stderr).contains("is in the future"));
    let typo = stack.sluice(&["admin", "prune", "--before", "last month"]);
    assert!(String::from_utf8_lossy(&typo.stderr).contains("write YYYY-MM-DD"));
    let reader = stack.client_as("rob", "default", coordinator::auth::Role::Reader).await.unwrap();
    let denied = reader.prune(then, true).await.unwrap_err().to_string();
    assert!(denied.contains("prune old jobs' history"), "{denied}");

    // The leader keeps the months ahead: one dropped is made again.
    let ahead = (Utc::now() + chrono::Months::new(3)).format("%Y%m").to_string();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP TABLE results_p{ahead}"))).execute(&stack.db.pool).await.unwrap();
    let made = coordinator::history::ensure_partitions(&stack.db.pool).await.unwrap();
    assert_eq!(made, 1);
    assert!(exists(&stack, &format!("results_p{ahead}")).await);
}

/// A database made before partitioning keeps every row and every figure
/// when migration 0020 partitions it: a job with a UUIDv7 id moves to its
/// month, one with an older random id to the first partition, and the audit
/// ids go on from where they were.
#[tokio::test]
async fn partitioning_an_existing_database_keeps_every_row_and_figure() {
    use migrations::MIGRATOR;
    let db = sluice_tests::fixtures::TestDb::create_empty(&sluice_tests::fixtures::admin_url()).await.unwrap();
    // The schema as it was before 0020.
    let before = sqlx::migrate::Migrator {
        migrations: std::borrow::Cow::Owned(MIGRATOR.iter().filter(|m| m.version < 20).cloned().collect()),
        ..sqlx::migrate::Migrator::DEFAULT
    };
    before.run(&db.pool).await.unwrap();
    let then = Utc::now() - chrono::Duration::days(70);
    let (v7, v4) = (id_at(then), Uuid::new_v4());
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "INSERT INTO jobs (id, kind, spec, template, template_hash, output_schema, state, created_at)
         VALUES ('{v7}', 'k', '{{}}', 't', 'h', '{{}}', 'completed', '{then}'),
                ('{v4}', 'k', '{{}}', 't', 'h', '{{}}', 'completed', '{then}');
         INSERT INTO items (job_id, seq, item_id, line_no, payload)
         SELECT j, s, 'i' || s, s, '{{}}' FROM (VALUES ('{v7}'::uuid), ('{v4}'::uuid)) v(j), generate_series(1, 5) s;
         INSERT INTO results (job_id, seq, item_id, state, template_hash, attempts, worker)
         SELECT job_id, seq, item_id, CASE WHEN seq = 1 THEN 'needs_review' ELSE 'succeeded' END, 'h', 1, 'w' FROM items;
         INSERT INTO audit_calls (call_id, job_id, seq, item_id, attempt, worker, provider, model, request_hash)
         SELECT gen_random_uuid(), job_id, seq, item_id, 1, 'w', 'p', 'm', 'r' FROM items;
         INSERT INTO audit_attempts (job_id, seq, item_id, attempt, worker, model, fallback, template_hash, request_hash,
                                     outcome, latency_ms, tokens_in, tokens_out, cost_usd, api_key_id, prompt)
         SELECT job_id, seq, item_id, 1, 'w', 'm', false, 'h', 'r', 'ok', 1, 10, 2, 0.01, 'k', 'p' FROM items;
         INSERT INTO audit_events (job_id, event, actor) SELECT id, 'created', 'me' FROM jobs;"
    )))
    .execute(&db.pool)
    .await
    .unwrap();
    let figures = "SELECT job_id::text, sum(succeeded)::bigint, sum(needs_review)::bigint, sum(tokens_in)::bigint
                   FROM job_tallies GROUP BY 1 ORDER BY 1";
    let counts = "SELECT (SELECT count(*) FROM results), (SELECT count(*) FROM audit_calls),
                         (SELECT count(*) FROM audit_attempts), (SELECT count(*) FROM audit_events),
                         (SELECT max(id) FROM audit_attempts)";
    type Figures = Vec<(String, i64, i64, i64)>;
    let tallies: Figures = sqlx::query_as(figures).fetch_all(&db.pool).await.unwrap();
    let rows: (i64, i64, i64, i64, i64) = sqlx::query_as(counts).fetch_one(&db.pool).await.unwrap();
    assert_eq!(rows.0, 10);

    MIGRATOR.run(&db.pool).await.unwrap();
    assert_eq!(sqlx::query_as::<_, (String, i64, i64, i64)>(figures).fetch_all(&db.pool).await.unwrap(), tallies);
    assert_eq!(sqlx::query_as::<_, (i64, i64, i64, i64, i64)>(counts).fetch_one(&db.pool).await.unwrap(), rows);
    let month = then.format("%Y%m").to_string();
    for (table, job) in [(format!("results_p{month}"), v7), ("results_p0".to_string(), v4)] {
        let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table} WHERE job_id = $1")))
            .bind(job)
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!(n, 5, "{table}");
    }
    let next: i64 = sqlx::query_scalar("SELECT nextval('audit_attempts_id_seq')").fetch_one(&db.pool).await.unwrap();
    assert!(next > rows.4, "audit ids go on: {next} after {}", rows.4);
    // Still append-only, and a result is still written once.
    let rewrite =
        sqlx::query("UPDATE audit_attempts SET outcome = 'x'").execute(&db.pool).await.unwrap_err().to_string();
    assert!(rewrite.contains("append-only") || rewrite.contains("permission denied"), "{rewrite}");
    let again = sqlx::query(
        "INSERT INTO results (job_id, seq, item_id, state, template_hash, attempts, worker, job_time)
         VALUES ($1, 2, 'i2', 'failed', 'h', 1, 'w', job_time($1)) ON CONFLICT (job_id, seq, job_time) DO NOTHING",
    )
    .bind(v7)
    .execute(&db.pool)
    .await
    .unwrap();
    assert_eq!(again.rows_affected(), 0);
}
