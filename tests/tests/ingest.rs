//! Bad input through the real API and Postgres: each case names its line, and a rejected job leaves nothing behind.

use sluice_tests::fixtures::{sample_jsonl, Stack};
use sluice_tests::sim::SimConfig;
use uuid::Uuid;

async fn count(stack: &Stack, table: &'static str, job: Uuid) -> i64 {
    let sql = match table {
        "items" => "SELECT count(*) FROM items WHERE job_id = $1",
        "chunks" => "SELECT count(*) FROM chunks WHERE job_id = $1",
        "rejected_lines" => "SELECT count(*) FROM rejected_lines WHERE job_id = $1",
        _ => unreachable!(),
    };
    sqlx::query_scalar(sql).bind(job).fetch_one(&stack.db.pool).await.unwrap()
}

/// Three good lines around `bad` (as line 3); the strict upload must be
/// rejected naming line 3 with `reason`, with nothing ingested.
async fn check_rejected(stack: &Stack, bad: &[u8], reason: &str) {
    let mut input = sample_jsonl(1, 2);
    input.extend_from_slice(bad);
    input.push(b'\n');
    input.extend_from_slice(b"{\"id\":\"last\",\"text\":\"fine\"}\n");
    let err = stack.submit("classify", input, false).await.unwrap_err();
    let coordinator::client::ClientError::Api { status, report: Some(report), message } = err else {
        panic!("expected a rejection report, got {err:?}");
    };
    assert_eq!(status.as_u16(), 422);
    assert!(message.contains("nothing was ingested"), "{message}");
    assert_eq!(report.state, "rejected");
    assert_eq!(report.invalid_lines, 1);
    assert_eq!(report.errors.len(), 1);
    assert_eq!(report.errors[0].line, 3, "{:?}", report.errors);
    assert!(report.errors[0].reason.contains(reason), "{:?} should mention {reason:?}", report.errors[0].reason);
    assert_eq!(count(stack, "items", report.job_id).await, 0, "nothing half-ingested");
    assert_eq!(count(stack, "chunks", report.job_id).await, 0);
    let st = stack.client.status(report.job_id).await.unwrap();
    assert_eq!(st.state, "rejected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_kind_of_bad_line_is_rejected_with_its_line_number() {
    let stack = Stack::start(SimConfig::default(), |_| {}).await.unwrap();
    check_rejected(&stack, b"{\"id\": \"x\", \"text\": ", "invalid JSON").await;
    check_rejected(&stack, b"{\"id\":\"x\",\"text\":\"caf\xe9\"}", "invalid UTF-8").await;
    check_rejected(&stack, b"{\"id\":\"x\"}", "missing field \"text\"").await;
    check_rejected(&stack, b"{\"text\":\"no id\"}", "missing field \"id\"").await;
    check_rejected(&stack, b"{\"id\":\"doc-0000001\",\"text\":\"again\"}", "duplicate id \"doc-0000001\"").await;
    let mut long = b"{\"id\":\"big\",\"text\":\"".to_vec();
    long.extend(std::iter::repeat_n(b'a', 300 * 1024));
    long.extend_from_slice(b"\"}");
    check_rejected(&stack, &long, "longer than 256 KiB").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_file_is_rejected() {
    let stack = Stack::start(SimConfig::default(), |_| {}).await.unwrap();
    for input in [&b""[..], b"\n\n  \n"] {
        let err = stack.submit("classify", input.to_vec(), false).await.unwrap_err();
        let coordinator::client::ClientError::Api { report: Some(report), .. } = err else { panic!("{err:?}") };
        assert_eq!(report.state, "rejected");
        assert!(report.errors[0].reason.contains("input is empty"), "{:?}", report.errors);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skip_invalid_ingests_the_good_lines_and_records_the_bad_ones() {
    let mut stack = Stack::start(SimConfig::default(), |_| {}).await.unwrap();
    let mut input = sample_jsonl(2, 150);
    input.extend_from_slice(b"not json\n{\"id\":\"doc-0000001\",\"text\":\"dup\"}\n");
    input.extend_from_slice(b"{\"custom_id\":\"batch-1\",\"text\":\"The striker scored a goal in the match.\"}\n");
    let report = stack.submit("classify", input, true).await.unwrap();
    assert_eq!(report.state, "running");
    assert_eq!((report.items, report.invalid_lines, report.chunks), (151, 2, 8));
    let lines: Vec<u64> = report.errors.iter().map(|e| e.line).collect();
    assert_eq!(lines, [151, 152]);
    assert_eq!(count(&stack, "items", report.job_id).await, 151);
    assert_eq!(count(&stack, "rejected_lines", report.job_id).await, 2);

    stack.add_worker(|_| {});
    stack.wait_completed(report.job_id, std::time::Duration::from_secs(60)).await.unwrap();
    let st = stack.client.status(report.job_id).await.unwrap();
    assert_eq!((st.succeeded, st.invalid_lines), (151, 2));
    let answer: String = sqlx::query_scalar("SELECT answer FROM results WHERE job_id = $1 AND item_id = 'batch-1'")
        .bind(report.job_id)
        .fetch_one(&stack.db.pool)
        .await
        .unwrap();
    assert_eq!(answer, "sports");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_upload_to_the_same_job_is_refused() {
    let stack = Stack::start(SimConfig::default(), |_| {}).await.unwrap();
    let job_id = stack.client.create_job(&sluice_tests::fixtures::new_job("classify")).await.unwrap().job_id;
    let body = || futures::stream::iter(vec![Ok(bytes::Bytes::from(sample_jsonl(1, 10)))]);
    stack.client.upload(job_id, body(), false).await.unwrap();
    let err = stack.client.upload(job_id, body(), false).await.unwrap_err();
    assert!(matches!(&err, coordinator::client::ClientError::Api { status, .. } if status.as_u16() == 409), "{err:?}");
    assert_eq!(count(&stack, "items", job_id).await, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_using_an_undeclared_field_is_refused_at_submit() {
    let stack = Stack::start(SimConfig::default(), |_| {}).await.unwrap();
    let mut kind = common::spec::JobKind::load(&sluice_tests::fixtures::jobs_dir().join("classify")).unwrap();
    kind.template.push_str("\nTitle: {{ title }}");
    let new = coordinator::model::NewJob::new(kind);
    let err = stack.client.create_job(&new).await.unwrap_err();
    assert!(matches!(&err, coordinator::client::ClientError::Api { status, .. } if status.as_u16() == 400), "{err:?}");
    assert!(err.to_string().contains("uses title but input_fields declares only [text]"), "{err}");
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs").fetch_one(&stack.db.pool).await.unwrap();
    assert_eq!(jobs, 0, "nothing was created");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_jobs_and_unreachable_coordinators_give_clear_errors() {
    let stack = Stack::start(SimConfig::default(), |_| {}).await.unwrap();
    let err = stack.client.status(Uuid::nil()).await.unwrap_err();
    assert!(err.to_string().contains("no job 00000000-0000-0000-0000-000000000000"), "{err}");

    let dead = coordinator::client::Client::new("http://127.0.0.1:9");
    let err = dead.jobs(1).await.unwrap_err().to_string();
    assert!(err.contains("cannot reach the Sluice coordinator at http://127.0.0.1:9"), "{err}");
}

#[tokio::test]
async fn unreachable_postgres_and_nats_are_named_in_the_error() {
    let nats = sluice_tests::fixtures::NatsServer::start().unwrap();
    let config = sluice_tests::fixtures::serve_config("postgres://sluice:pw@127.0.0.1:9/sluice", nats.url());
    let err = coordinator::Coordinator::bind(config).await.err().unwrap().to_string();
    assert!(err.contains("cannot connect to Postgres at postgres://sluice:***@127.0.0.1:9/sluice"), "{err}");

    let db = sluice_tests::fixtures::TestDb::create().await.unwrap();
    let config = sluice_tests::fixtures::serve_config(&db.url, "nats://127.0.0.1:9");
    let err = coordinator::Coordinator::bind(config).await.err().unwrap().to_string();
    assert!(err.contains("cannot reach NATS at nats://127.0.0.1:9"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nul_character_is_an_invalid_line_with_its_own_line_number() {
    let stack = Stack::start(SimConfig::default(), |_| {}).await.unwrap();
    // Enough lines before and after that the copy has sent data on both sides of it.
    let input = |n: u64| {
        let mut input = sample_jsonl(3, 3);
        input.extend_from_slice(b"{\"id\":\"nul\",\"text\":\"a\\u0000b\"}\n");
        input.extend_from_slice(&sample_jsonl(4, n));
        input
    };
    let err = stack.submit("classify", input(3_000), false).await.unwrap_err();
    let coordinator::client::ClientError::Api { report: Some(report), .. } = err else { panic!("{err:?}") };
    assert_eq!(report.state, "rejected");
    assert_eq!(report.errors.len(), 1, "{:?}", report.errors);
    assert_eq!(report.errors[0].line, 4);
    assert!(report.errors[0].reason.contains("NUL character"), "{:?}", report.errors);

    // The ids of the second part repeat none of the first (another seed, same
    // numbering would): give them their own prefix.
    let text = String::from_utf8(input(3_000)).unwrap();
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    for l in lines.iter_mut().skip(4) {
        *l = l.replacen("\"doc-", "\"b-doc-", 1);
    }
    let report = stack.submit("classify", (lines.join("\n") + "\n").into_bytes(), true).await.unwrap();
    assert_eq!(report.state, "running");
    assert_eq!((report.items, report.invalid_lines), (3_003, 1));
    assert_eq!(report.errors[0].line, 4);
    let reason: String = sqlx::query_scalar("SELECT reason FROM rejected_lines WHERE job_id = $1 AND line_no = 4")
        .bind(report.job_id)
        .fetch_one(&stack.db.pool)
        .await
        .unwrap();
    assert!(reason.contains("NUL"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_ids_are_found_by_the_database_and_the_rest_numbered_without_gaps() {
    let stack = Stack::start(SimConfig::default(), |_| {}).await.unwrap();
    let mut input = sample_jsonl(5, 500);
    input.extend_from_slice(&sample_jsonl(5, 3)); // lines 501-503 repeat lines 1-3
    input.extend_from_slice(b"{\"id\":\"last\",\"text\":\"x\"}\n");
    let report = stack.submit("classify", input.clone(), true).await.unwrap();
    assert_eq!((report.items, report.invalid_lines), (501, 3));
    let lines: Vec<u64> = report.errors.iter().map(|e| e.line).collect();
    assert_eq!(lines, [501, 502, 503]);
    let (min, max, n): (i64, i64, i64) =
        sqlx::query_as("SELECT min(seq), max(seq), count(*) FROM items WHERE job_id = $1")
            .bind(report.job_id)
            .fetch_one(&stack.db.pool)
            .await
            .unwrap();
    assert_eq!((min, max, n), (1, 501, 501));
    let last: (i64, i64) = sqlx::query_as("SELECT seq, line_no FROM items WHERE job_id = $1 AND item_id = 'last'")
        .bind(report.job_id)
        .fetch_one(&stack.db.pool)
        .await
        .unwrap();
    assert_eq!(last, (501, 504));
    assert_eq!(count(&stack, "rejected_lines", report.job_id).await, 3);

    let err = stack.submit("classify", input, false).await.unwrap_err();
    let coordinator::client::ClientError::Api { report: Some(report), .. } = err else { panic!("{err:?}") };
    assert_eq!((report.state.as_str(), report.invalid_lines), ("rejected", 3));
    assert!(report.errors[0].reason.contains("duplicate id"), "{:?}", report.errors);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_over_the_limits_are_refused_and_nothing_is_ingested() {
    const LINES: u64 = 100;
    const BYTES: usize = 64 * 1024;
    let stack = Stack::start(SimConfig::default(), |c| {
        c.max_job_lines = LINES;
        c.max_upload_bytes = BYTES as u64;
    })
    .await
    .unwrap();
    let refused = |result: Result<coordinator::model::IngestReport, coordinator::client::ClientError>,
                   setting: &str| {
        let err = result.unwrap_err();
        let coordinator::client::ClientError::Api { status, message, .. } = &err else { panic!("{err:?}") };
        assert_eq!(status.as_u16(), 413);
        assert!(
            message.contains(setting)
                && message.contains("nothing was ingested")
                && message.contains("raise that limit"),
            "{message}"
        );
    };
    // Lines: one below the limit, at it, one above.
    assert_eq!(stack.submit("classify", sample_jsonl(6, LINES - 1), false).await.unwrap().items, LINES - 1);
    assert_eq!(stack.submit("classify", sample_jsonl(5, LINES), false).await.unwrap().items, LINES);
    refused(stack.submit("classify", sample_jsonl(4, LINES + 1), false).await, "SLUICE_MAX_JOB_LINES");
    // Bytes: 50 documents padded with a blank last line to one byte below the limit, to it, and one above.
    let padded = |seed: u64, size: usize| {
        let mut body = sample_jsonl(seed, 50);
        body.resize(size, b' ');
        body
    };
    assert_eq!(stack.submit("classify", padded(7, BYTES - 1), false).await.unwrap().items, 50);
    assert_eq!(stack.submit("classify", padded(8, BYTES), false).await.unwrap().items, 50);
    refused(stack.submit("classify", padded(9, BYTES + 1), false).await, "SLUICE_MAX_UPLOAD_BYTES");
    let items: i64 = sqlx::query_scalar("SELECT count(*) FROM items").fetch_one(&stack.db.pool).await.unwrap();
    assert_eq!(items, 2 * LINES as i64 - 1 + 100, "only the uploads within the limits are stored");
}

#[tokio::test]
async fn a_project_may_have_only_so_many_jobs_uploading_or_running() {
    const MAX: u32 = 3;
    let stack = Stack::start(SimConfig::default(), |c| c.max_active_jobs_per_project = MAX).await.unwrap();
    let new = |project: &str| coordinator::model::NewJob {
        project: Some(project.into()),
        ..sluice_tests::fixtures::new_job("classify")
    };
    let mut jobs = Vec::new();
    for _ in 0..MAX {
        // One below the limit before each: allowed.
        jobs.push(stack.client.create_job(&new("alpha")).await.unwrap().job_id);
    }
    let err = stack.client.create_job(&new("alpha")).await.unwrap_err();
    let coordinator::client::ClientError::Api { status, message, .. } = &err else { panic!("{err:?}") };
    assert_eq!(status.as_u16(), 429);
    assert!(message.contains("SLUICE_MAX_ACTIVE_JOBS_PER_PROJECT") && message.contains("project alpha"), "{message}");
    // Another project is not held back; a cancelled job frees a place, and resuming it needs one.
    stack.client.create_job(&new("beta")).await.unwrap();
    stack.client.cancel(jobs[0]).await.unwrap();
    let again = stack.client.create_job(&new("alpha")).await.unwrap().job_id;
    let err = stack.client.resume(jobs[0], false).await.unwrap_err().to_string();
    assert!(err.contains("SLUICE_MAX_ACTIVE_JOBS_PER_PROJECT"), "{err}");
    stack.client.cancel(again).await.unwrap();
    stack.client.resume(jobs[0], false).await.unwrap();
    let active: i64 =
        sqlx::query_scalar("SELECT count(*) FROM jobs WHERE project = 'alpha' AND state IN ('uploading', 'running')")
            .fetch_one(&stack.db.pool)
            .await
            .unwrap();
    assert!(active <= i64::from(MAX), "{active}");
}

/// Sends the head of an upload by hand and hangs up half-way, as a killed client does.
async fn upload_cut_off(stack: &Stack) -> Uuid {
    use tokio::io::AsyncWriteExt;
    let job_id = stack.client.create_job(&sluice_tests::fixtures::new_job("classify")).await.unwrap().job_id;
    let body = sample_jsonl(8, 60_000);
    let mut sock = tokio::net::TcpStream::connect(stack.coordinator_addr).await.unwrap();
    let head = format!(
        "PUT /v1/jobs/{job_id}/input HTTP/1.1\r\nhost: sluice\r\nauthorization: Bearer {}\r\ncontent-type: application/x-ndjson\r\ncontent-length: {}\r\n\r\n",
        stack.admin_token,
        body.len()
    );
    sock.write_all(head.as_bytes()).await.unwrap();
    // Most of the body is sent at once, so the coordinator is still copying it when the client vanishes.
    sock.write_all(&body[..body.len() * 9 / 10]).await.unwrap();
    sock.flush().await.unwrap();
    // Wait until the coordinator holds the job (its COPY opens right after), then vanish.
    sluice_tests::fixtures::wait_for("the upload to start", std::time::Duration::from_secs(10), || async {
        let mut tx = stack.db.pool.begin().await?;
        let free: Option<i32> = sqlx::query_scalar("SELECT 1 FROM jobs WHERE id = $1 FOR UPDATE SKIP LOCKED")
            .bind(job_id)
            .fetch_optional(&mut *tx)
            .await?;
        Ok(free.is_none())
    })
    .await
    .unwrap();
    // An abrupt reset, as a killed process or a dropped network gives.
    // Deprecated because a non-zero linger blocks on drop; zero resets at once.
    #[allow(deprecated)]
    sock.set_linger(Some(std::time::Duration::ZERO)).unwrap();
    drop(sock);
    job_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cut_off_mid_upload_poisons_nothing_and_its_job_is_abandoned() {
    let stack = Stack::start(SimConfig::default(), |c| c.upload_timeout_s = 3).await.unwrap();
    let mut cut = Vec::new();
    for _ in 0..5 {
        cut.push(upload_cut_off(&stack).await);
    }
    for i in 0..20 {
        let report = stack.submit("classify", sample_jsonl(100 + i, 300), false).await;
        assert_eq!(report.unwrap_or_else(|e| panic!("submission {i} after the cut-off: {e}")).items, 300);
    }
    for job_id in &cut {
        assert_eq!(count(&stack, "items", *job_id).await, 0, "nothing of a cut-off upload is kept");
    }
    sluice_tests::fixtures::wait_for(
        "the cut-off jobs to be abandoned",
        std::time::Duration::from_secs(20),
        || async {
            let jobs = stack.client.jobs(100).await?;
            Ok(cut.iter().all(|id| jobs.iter().any(|j| j.job_id == *id && j.state == "abandoned")))
        },
    )
    .await
    .unwrap();
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_events WHERE event = 'abandoned'")
        .fetch_one(&stack.db.pool)
        .await
        .unwrap();
    assert_eq!(events, 5);
}
