//! The audit trail against the roles Sluice runs as (they may append to it and read it, never rewrite it), what a client is told when the database refuses the coordinator, and the states the schema allows.

use sluice_tests::fixtures::TestDb;
use sqlx::Connection;

/// Runs `sql` as `role` and returns the error Postgres gave, if any.
async fn attempt(db: &TestDb, role: &str, sql: &str) -> Option<String> {
    let mut conn = sqlx::PgConnection::connect(&db.app_url(role)).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string())).execute(&mut conn).await.err().map(|e| e.to_string())
}

#[tokio::test]
async fn the_application_roles_cannot_rewrite_the_audit_trail() {
    let db = TestDb::create().await.unwrap();
    let job = uuid::Uuid::now_v7();
    for role in ["sluice_coordinator", "sluice_worker"] {
        // What they need: append and read.
        let append = format!(
            "INSERT INTO audit_events (job_id, event, actor, job_time) VALUES ('{job}', 'test', '{role}', job_time('{job}'));
             SELECT count(*) FROM audit_events; SELECT count(*) FROM audit_attempts; SELECT count(*) FROM audit_calls"
        );
        assert_eq!(attempt(&db, role, &append).await, None, "{role} appends and reads");
        for table in audit_tables(&db).await {
            // A partition's row triggers are its parent's, by name.
            let parent = table
                .rsplit_once("_p")
                .filter(|(_, n)| n.chars().all(|c| c.is_ascii_digit()))
                .map_or(table.as_str(), |(p, _)| p);
            for sql in [
                format!("ALTER TABLE {table} DISABLE TRIGGER USER"),
                format!("ALTER TABLE {table} DISABLE TRIGGER ALL"),
                format!("GRANT DELETE, UPDATE, TRUNCATE ON {table} TO {role}"),
                format!("GRANT DELETE ON {table} TO sluice_app"),
                format!("ALTER TABLE {table} OWNER TO {role}"),
                format!("UPDATE {table} SET job_id = job_id"),
                format!("DELETE FROM {table}"),
                format!("TRUNCATE {table}"),
                format!("DROP TABLE {table}"),
                format!("DROP TRIGGER {parent}_append_only ON {table}"),
                format!("DROP TRIGGER {table}_no_truncate ON {table}"),
                format!("ALTER TABLE {table} DETACH PARTITION {table}_p0"),
            ] {
                let err = attempt(&db, role, &sql).await;
                if sql.starts_with("GRANT") {
                    // A role without the grant option gets a warning, not an error: nothing is granted.
                    let granted: bool = sqlx::query_scalar(
                        "SELECT has_table_privilege($1, $2, 'DELETE') OR has_table_privilege($1, $2, 'UPDATE')
                             OR has_table_privilege($1, $2, 'TRUNCATE')",
                    )
                    .bind(role)
                    .bind(&table)
                    .fetch_one(&db.pool)
                    .await
                    .unwrap();
                    assert!(!granted, "{role}: {sql:?} granted something");
                    continue;
                }
                // (DETACH PARTITION of a partition: not a partitioned table,
                // so refused as well, for another reason.)
                assert!(
                    err.as_deref().is_some_and(|e| {
                        e.contains("permission denied")
                            || e.contains("must be owner")
                            || e.contains("is not partitioned")
                    }),
                    "{role}: {sql:?} was not refused: {err:?}"
                );
            }
        }
        // Nor replace the function the triggers call, or create objects.
        let sql = "CREATE OR REPLACE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN OLD; END $$";
        assert!(attempt(&db, role, sql).await.is_some(), "{role} replaced the trigger function");
        assert!(attempt(&db, role, "CREATE TABLE mine (x int)").await.is_some(), "{role} created a table");
    }
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_events").fetch_one(&db.pool).await.unwrap();
    assert_eq!(events, 2, "both rows are still there");
    // Their owner, who may drop them (to prune), may not rewrite them either:
    // the triggers refuse, on the parents and on every partition.
    let mut owner = sqlx::PgConnection::connect(&db.url).await.unwrap();
    for table in audit_tables(&db).await {
        for sql in
            [format!("UPDATE {table} SET job_id = job_id"), format!("DELETE FROM {table}"), format!("TRUNCATE {table}")]
        {
            let err = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone())).execute(&mut owner).await.err();
            assert!(
                err.as_ref().is_some_and(|e| {
                    let e = e.to_string();
                    e.contains("append-only") || e.contains("permission denied")
                }),
                "owner: {sql:?} was not refused: {err:?}"
            );
        }
    }
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_events").fetch_one(&db.pool).await.unwrap();
    assert_eq!(events, 2, "both rows are still there");
}

/// The audit tables and every partition of theirs (migration 0020), one month
/// made in the past as a prune would find it.
async fn audit_tables(db: &TestDb) -> Vec<String> {
    sqlx::query("SELECT create_history_month(now() - interval '3 months')").execute(&db.pool).await.unwrap();
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_class c
         WHERE c.relname IN ('audit_events', 'audit_attempts', 'audit_calls')
            OR c.oid IN (SELECT i.inhrelid FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent
                         WHERE p.relname IN ('audit_events', 'audit_attempts', 'audit_calls'))
         ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert!(
        tables.len() >= 3 * 5,
        "three tables, each with a first partition, this month, three ahead and one past: {tables:?}"
    );
    tables
}

#[tokio::test]
async fn a_coordinator_that_may_not_migrate_names_the_fix_and_sluice_migrate_applies_it() {
    let db = TestDb::create_empty(&sluice_tests::fixtures::admin_url()).await.unwrap();
    let nats = sluice_tests::fixtures::NatsServer::start().unwrap();
    let app = db.app_url("sluice_coordinator");
    let err =
        coordinator::Coordinator::bind(sluice_tests::fixtures::serve_config(&app, nats.url())).await.err().unwrap();
    let msg = common::error_chain(&err);
    assert!(msg.contains("sluice migrate") && msg.contains("SLUICE_MIGRATE_DATABASE_URL"), "{msg}");

    // A coordinator pod's init container waits, with the coordinator's own
    // role, for the migration Job: it gives up with a clear error, or ends
    // once the schema is current.
    let sluice = || std::process::Command::new(sluice_tests::fixtures::workspace_bin("sluice").unwrap());
    let gave_up = sluice().args(["migrate", "--wait", "1", "--database-url", &app]).output().unwrap();
    assert!(!gave_up.status.success());
    assert!(String::from_utf8_lossy(&gave_up.stderr).contains("has the migration Job run?"));
    let waiting = sluice()
        .args(["migrate", "--wait", "120", "--database-url", &app])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();

    let out = sluice().args(["migrate", "--database-url", &db.url]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("up to date"));
    let waited = waiting.wait_with_output().unwrap();
    assert!(waited.status.success(), "{}", String::from_utf8_lossy(&waited.stderr));
    assert!(String::from_utf8_lossy(&waited.stderr).contains("up to date"));
    coordinator::Coordinator::bind(sluice_tests::fixtures::serve_config(&app, nats.url())).await.unwrap();

    // Or at start-up, with the owner's URL given apart.
    let fresh = TestDb::create_empty(&sluice_tests::fixtures::admin_url()).await.unwrap();
    let mut config = sluice_tests::fixtures::serve_config(&fresh.app_url("sluice_coordinator"), nats.url());
    config.migrate_database_url = Some(fresh.url.clone());
    coordinator::Coordinator::bind(config).await.unwrap();
    let tables: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_tables WHERE tablename = 'audit_calls'")
        .fetch_one(&fresh.pool)
        .await
        .unwrap();
    assert_eq!(tables, 1);
}

/// A worker's credentials do what a worker does and nothing else: no tokens,
/// no job settings, no rewriting or deleting results; the coordinator's do more.
#[tokio::test]
async fn a_workers_role_may_do_only_what_a_worker_does() {
    let db = TestDb::create().await.unwrap();
    let job = uuid::Uuid::now_v7();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "INSERT INTO jobs (id, kind, spec, template, template_hash, output_schema, state)
             VALUES ('{job}', 'k', '{{}}', 't', 'h', '{{}}', 'running');
         INSERT INTO items (job_id, seq, item_id, line_no, payload) VALUES ('{job}', 1, 'a', 1, '{{}}');
         INSERT INTO chunks (job_id, chunk_no, first_seq, last_seq) VALUES ('{job}', 0, 1, 1);"
    )))
    .execute(&db.pool)
    .await
    .unwrap();
    let refused = [
        "SELECT count(*) FROM api_tokens".to_string(),
        "SELECT count(*) FROM audit_access".into(),
        format!("INSERT INTO jobs (id) VALUES ('{}')", uuid::Uuid::now_v7()),
        "UPDATE jobs SET spec = '{}'".into(),
        "UPDATE jobs SET state = 'cancelled'".into(),
        "DELETE FROM jobs".into(),
        format!("INSERT INTO items (job_id, seq, item_id, line_no, payload) VALUES ('{job}', 2, 'b', 2, '{{}}')"),
        "UPDATE chunks SET first_seq = 0".into(),
        "UPDATE chunks SET generation = generation + 1".into(),
        "DELETE FROM chunks".into(),
        format!("INSERT INTO reviews (job_id, seq, answer, reviewer, decided_at, source) VALUES ('{job}', 1, 'x', 'w', now(), 's')"),
        "SELECT prune_history(now(), 'w', true)".into(),
        "SELECT ensure_history_partitions(1)".into(),
        "SELECT create_history_month(now())".into(),
    ];
    for sql in &refused {
        let err = attempt(&db, "sluice_worker", sql).await;
        assert!(err.as_deref().is_some_and(|e| e.contains("permission denied")), "worker: {sql:?} gave {err:?}");
    }
    // What a worker does: read, write a result once, mark its chunk done, complete the job.
    let work = format!(
        "SELECT count(*) FROM jobs j JOIN items i ON i.job_id = j.id JOIN chunks c ON c.job_id = j.id;
         INSERT INTO results (job_id, seq, item_id, state, template_hash, attempts, tokens_in, tokens_out, latency_ms, worker,
                              job_time)
             VALUES ('{job}', 1, 'a', 'succeeded', 'h', 1, 0, 0, 0, 'w', job_time('{job}'))
             ON CONFLICT (job_id, seq, job_time) DO NOTHING;
         UPDATE chunks SET state = 'done', done_at = now() WHERE job_id = '{job}';
         SELECT complete_job_if_done('{job}');"
    );
    assert_eq!(attempt(&db, "sluice_worker", &work).await, None);
    for sql in ["UPDATE results SET answer = 'x'", "DELETE FROM results"] {
        let err = attempt(&db, "sluice_worker", sql).await;
        assert!(err.as_deref().is_some_and(|e| e.contains("permission denied")), "worker: {sql:?} gave {err:?}");
    }
    let state: String = sqlx::query_scalar("SELECT state FROM jobs").fetch_one(&db.pool).await.unwrap();
    assert_eq!(state, "completed", "the worker completed the job through the function");
    // The coordinator may do what the worker may not.
    for sql in refused[..4].iter().chain(&refused[refused.len() - 3..refused.len() - 1]) {
        assert_eq!(
            attempt(&db, "sluice_coordinator", sql).await.filter(|e| e.contains("permission")),
            None,
            "coordinator: {sql:?}"
        );
    }
}

/// A coordinator whose role was made before sluice_control existed (an
/// upgrade) stops at start-up and names the grant to run.
#[tokio::test]
async fn a_coordinator_role_without_sluice_control_is_told_the_grant_to_run() {
    let cluster = sluice_tests::fixtures::PgCluster::start().await.unwrap();
    let db = TestDb::create_on(&cluster.admin_url()).await.unwrap();
    sqlx::query("CREATE ROLE old_coordinator LOGIN IN ROLE sluice_app").execute(&db.pool).await.unwrap();
    let nats = sluice_tests::fixtures::NatsServer::start().unwrap();
    let config = sluice_tests::fixtures::serve_config(&db.app_url("old_coordinator"), nats.url());
    let err = coordinator::Coordinator::bind(config.clone()).await.err().unwrap().to_string();
    assert!(err.contains("GRANT sluice_control TO"), "{err}");
    sqlx::query("GRANT sluice_control TO old_coordinator").execute(&db.pool).await.unwrap();
    coordinator::Coordinator::bind(config).await.unwrap();
}

/// A server error tells the client a request id, not the SQL error: the
/// details (tables, roles, addresses) stay in the coordinator's log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_error_gives_the_client_a_request_id_and_no_details() {
    let stack = sluice_tests::fixtures::Stack::start(sluice_tests::sim::SimConfig::default(), |_| {}).await.unwrap();
    // A client error says what was wrong.
    let missing = stack.client.status(uuid::Uuid::now_v7()).await.unwrap_err();
    assert!(missing.to_string().contains("no job"), "{missing}");
    // The coordinator's role loses the right to read jobs in this database only.
    sqlx::query("REVOKE SELECT ON jobs FROM sluice_app, sluice_control").execute(&stack.db.pool).await.unwrap();
    let err = stack.client.jobs(10).await.unwrap_err();
    let coordinator::client::ClientError::Api { status, message, .. } = err else { panic!("{err}") };
    assert_eq!(status.as_u16(), 500);
    assert!(message.contains("request id"), "{message}");
    for detail in ["permission", "jobs", "sluice_", "SELECT"] {
        assert!(!message.contains(detail), "{detail:?} leaked: {message}");
    }
}

/// The states the CHECK constraints allow are exactly those `common::state` knows.
#[tokio::test]
async fn the_schema_allows_exactly_the_states_sluice_knows() {
    let db = TestDb::create().await.unwrap();
    let allowed = |constraint: &'static str| {
        let pool = db.pool.clone();
        async move {
            let def: String =
                sqlx::query_scalar("SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = $1")
                    .bind(constraint)
                    .fetch_one(&pool)
                    .await
                    .unwrap();
            let mut states: Vec<String> = def.split('\'').skip(1).step_by(2).map(str::to_string).collect::<Vec<_>>();
            states.sort();
            states
        }
    };
    let known = |all: Vec<&str>| {
        let mut v: Vec<String> = all.into_iter().map(str::to_string).collect();
        v.sort();
        v
    };
    use common::state::{ChunkState, JobState, ResultState};
    assert_eq!(allowed("jobs_state_known").await, known(JobState::ALL.iter().map(|s| s.as_str()).collect()));
    assert_eq!(allowed("chunks_state_known").await, known(ChunkState::ALL.iter().map(|s| s.as_str()).collect()));
    assert_eq!(allowed("results_state_known").await, known(ResultState::ALL.iter().map(|s| s.as_str()).collect()));
}
