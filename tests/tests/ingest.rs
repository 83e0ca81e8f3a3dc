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
    assert_eq!((report.items, report.invalid_lines, report.chunks), (151, 2, 2));
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
    let kind = common::spec::JobKind::load(&sluice_tests::fixtures::jobs_dir().join("classify")).unwrap();
    let job_id = stack
        .client
        .create_job(&coordinator::model::NewJob { kind, input_name: None, review_below: None, allow_unpriced: false })
        .await
        .unwrap()
        .job_id;
    let body = || futures::stream::iter(vec![Ok(bytes::Bytes::from(sample_jsonl(1, 10)))]);
    stack.client.upload(job_id, body(), false).await.unwrap();
    let err = stack.client.upload(job_id, body(), false).await.unwrap_err();
    assert!(matches!(&err, coordinator::client::ClientError::Api { status, .. } if status.as_u16() == 409), "{err:?}");
    assert_eq!(count(&stack, "items", job_id).await, 10);
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
    let config = coordinator::ServeConfig::for_urls("postgres://sluice:pw@127.0.0.1:9/sluice", nats.url());
    let err = coordinator::Coordinator::bind(config).await.err().unwrap().to_string();
    assert!(err.contains("cannot connect to Postgres at postgres://sluice:***@127.0.0.1:9/sluice"), "{err}");

    let db = sluice_tests::fixtures::TestDb::create().await.unwrap();
    let config = coordinator::ServeConfig::for_urls(&db.url, "nats://127.0.0.1:9");
    let err = coordinator::Coordinator::bind(config).await.err().unwrap().to_string();
    assert!(err.contains("cannot reach NATS at nats://127.0.0.1:9"), "{err}");
}
