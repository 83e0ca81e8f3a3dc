//! End-to-end tests of the job pipeline on real NATS JetStream and Postgres, with the simulator as the model.

use futures::StreamExt;
use std::collections::HashMap;
use std::time::Duration;

use sluice_tests::fixtures::{sample_jsonl, wait_for, Stack, WorkerProcess};
use sluice_tests::sim::SimConfig;
use sqlx::Row;
use uuid::Uuid;

/// Every item's result row, by user id: (state, answer).
async fn results(stack: &Stack, job: Uuid) -> HashMap<String, (String, Option<String>)> {
    sqlx::query("SELECT item_id, state, answer FROM results WHERE job_id = $1")
        .bind(job)
        .fetch_all(&stack.db.pool)
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get("item_id"), (r.get("state"), r.get("answer"))))
        .collect()
}

async fn result_rows(stack: &Stack, job: Uuid) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM results WHERE job_id = $1")
        .bind(job)
        .fetch_one(&stack.db.pool)
        .await
        .unwrap()
}

fn expected_labels(seed: u64, count: u64) -> HashMap<String, String> {
    (0..count)
        .map(|i| {
            let d = common::sample::document(seed, i);
            (d["id"].as_str().unwrap().to_string(), d["expected"].as_str().unwrap().to_string())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_classify_2000_documents_exactly_once_and_correctly() {
    let mut stack = Stack::start(SimConfig::default(), |_| {}).await.unwrap();
    stack.add_worker(|_| {});
    stack.add_worker(|_| {});
    let report = stack.submit("classify", sample_jsonl(11, 2_000), false).await.unwrap();
    assert_eq!((report.items, report.chunks, report.invalid_lines), (2_000, 20, 0));
    stack.wait_completed(report.job_id, Duration::from_secs(120)).await.unwrap();

    let got = results(&stack, report.job_id).await;
    assert_eq!(result_rows(&stack, report.job_id).await, 2_000, "one row per item");
    // The job list reports the job as its own status does.
    let status = serde_json::to_value(stack.client.status(report.job_id).await.unwrap()).unwrap();
    let listed = stack.client.jobs(10).await.unwrap();
    assert_eq!(serde_json::to_value(&listed[0]).unwrap(), status);
    assert_eq!(status["succeeded"], 2_000);
    let expected = expected_labels(11, 2_000);
    assert_eq!(got.len(), expected.len());
    for (id, label) in &expected {
        let (state, answer) = &got[id];
        assert_eq!(state, "succeeded", "{id}");
        assert_eq!(answer.as_deref(), Some(label.as_str()), "{id}");
    }
    // Both workers took part: the work was really shared.
    let workers: i64 = sqlx::query_scalar("SELECT count(DISTINCT worker) FROM results WHERE job_id = $1")
        .bind(report.job_id)
        .fetch_one(&stack.db.pool)
        .await
        .unwrap();
    assert_eq!(workers, 2);
    let status = stack.client.status(report.job_id).await.unwrap();
    assert_eq!((status.succeeded, status.failed, status.pending), (2_000, 0, 0));
    // The simulator saw one call per item: no item was called twice.
    assert_eq!(stack.sim.sim.stats().requests, 2_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_with_sigkill_mid_job_loses_nothing() {
    let sim = SimConfig { latency_ms: 20, ..Default::default() };
    let stack = Stack::start(sim, |_| {}).await.unwrap();
    let mut config = stack.worker_config();
    config.concurrency = 16;
    config.ack_wait_s = 3;
    let mut victim = WorkerProcess::spawn(&config, "victim").unwrap();
    let report = stack.submit("classify", sample_jsonl(5, 1_500), false).await.unwrap();
    let job = report.job_id;

    // Kill the worker once it has written some results, mid-job.
    wait_for("first results", Duration::from_secs(60), || async { Ok(result_rows(&stack, job).await >= 200) })
        .await
        .unwrap();
    victim.kill9();
    let at_kill = result_rows(&stack, job).await;
    assert!(at_kill < 1_500, "the job must still be running when the worker dies");

    let survivor = WorkerProcess::spawn(&config, "survivor").unwrap();
    stack.wait_completed(job, Duration::from_secs(120)).await.unwrap();
    drop(survivor);

    assert_eq!(result_rows(&stack, job).await, 1_500);
    let expected = expected_labels(5, 1_500);
    let got = results(&stack, job).await;
    assert!(expected.iter().all(|(id, l)| got[id].1.as_deref() == Some(l.as_str())));
    let by_worker: Vec<(String, i64)> =
        sqlx::query("SELECT worker, count(*) AS n FROM results WHERE job_id = $1 GROUP BY worker ORDER BY worker")
            .bind(job)
            .fetch_all(&stack.db.pool)
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get("worker"), r.get("n")))
            .collect();
    assert_eq!(by_worker.len(), 2, "both workers wrote results: {by_worker:?}");
    // Every item was called at least once, and whatever the victim had in
    // flight was redone, yet there is exactly one row per item.
    assert!(stack.sim.sim.stats().requests >= 1_500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_lost_by_jetstream_are_republished_by_the_reconciler() {
    let mut stack = Stack::start(SimConfig::default(), |_| {}).await.unwrap();
    let report = stack.submit("classify", sample_jsonl(3, 500), false).await.unwrap();
    // Chunks are published as workers ask for them: ask for one, as a
    // worker would, then lose it (and anything else in the stream) before
    // it is acked.
    let js = async_nats::jetstream::new(async_nats::connect(stack.nats.url()).await.unwrap());
    let mut stream = common::nats::ensure_stream(&js, stack.nats.url()).await.unwrap();
    let consumer = common::nats::ensure_consumer(&stream, Duration::from_secs(30)).await.unwrap();
    let mut batch = consumer.batch().max_messages(1).expires(Duration::from_secs(30)).messages().await.unwrap();
    let taken = tokio::time::timeout(Duration::from_secs(30), batch.next()).await.unwrap().unwrap().unwrap();
    assert!(taken.subject.ends_with(&report.job_id.to_string()));
    let published = || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM chunks WHERE job_id = $1 AND published_at IS NOT NULL")
            .bind(report.job_id)
            .fetch_one(&stack.db.pool)
            .await?;
        Ok::<_, anyhow::Error>(n)
    };
    wait_for("the chunk marked published", Duration::from_secs(10), || async { Ok(published().await? >= 1) })
        .await
        .unwrap();
    // The publisher may refill the stream while it is purged: purge until
    // nothing was published meanwhile and the stream is empty, so that
    // every chunk marked published is lost.
    let lost = loop {
        let before = published().await.unwrap();
        stream.purge().await.unwrap();
        let after = published().await.unwrap();
        if before == after && stream.info().await.unwrap().state.messages == 0 {
            break after;
        }
    };

    stack.add_worker(|_| {});
    stack.wait_completed(report.job_id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(result_rows(&stack, report.job_id).await, 500);
    let republished: i64 = sqlx::query_scalar("SELECT count(*) FROM chunks WHERE job_id = $1 AND generation > 0")
        .bind(report.job_id)
        .fetch_one(&stack.db.pool)
        .await
        .unwrap();
    assert_eq!(republished, lost, "every lost chunk was republished once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_chunk_message_costs_no_second_model_call() {
    let mut stack = Stack::start(SimConfig::default(), |c| c.reconcile_interval_ms = 0).await.unwrap();
    let report = stack.submit("classify", sample_jsonl(4, 100), false).await.unwrap();
    stack.add_worker(|_| {});
    stack.wait_completed(report.job_id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(stack.sim.sim.stats().requests, 100);

    // Publish the (only) chunk again under another message id, as a
    // redelivery racing a slow worker might: the worker finds it done and acks it.
    let js = async_nats::jetstream::new(async_nats::connect(stack.nats.url()).await.unwrap());
    let msg = common::wire::ChunkMsg { job_id: report.job_id, chunk_no: 0, first_seq: 1, last_seq: 100, generation: 0 };
    js.send_publish(
        common::wire::chunk_subject(report.job_id),
        async_nats::jetstream::message::PublishMessage::build()
            .payload(serde_json::to_vec(&msg).unwrap().into())
            .message_id("a-second-copy"),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    wait_for("the duplicate to be consumed", Duration::from_secs(30), || {
        let js = js.clone();
        async move {
            let mut s = js.get_stream(common::wire::STREAM).await?;
            Ok(s.info().await?.state.messages == 0)
        }
    })
    .await
    .unwrap();
    assert_eq!(stack.sim.sim.stats().requests, 100);
    assert_eq!(result_rows(&stack, report.job_id).await, 100);
}
