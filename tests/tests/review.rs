//! Results a reviewer can trust: confidence strategies, the review round trip, the audit trail and what must never be stored.

use std::collections::HashMap;
use std::time::Duration;

use coordinator::client::ClientError;
use sluice_tests::fixtures::{jobs_dir, sample_jsonl, Stack, WorkerProcess};
use sluice_tests::sim::SimConfig;
use sqlx::Row;
use uuid::Uuid;

fn expected(seed: u64, count: u64) -> HashMap<String, String> {
    (0..count)
        .map(|i| {
            let d = common::sample::document(seed, i);
            (d["id"].as_str().unwrap().to_string(), d["expected"].as_str().unwrap().to_string())
        })
        .collect()
}

async fn rows(stack: &Stack, job: Uuid) -> Vec<(String, String, Option<String>, Option<f64>)> {
    sqlx::query("SELECT item_id, state, answer, confidence FROM results WHERE job_id = $1 ORDER BY seq")
        .bind(job)
        .fetch_all(&stack.db.pool)
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get("item_id"), r.get("state"), r.get("answer"), r.get("confidence")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprob_confidence_flags_the_wrong_answers_and_the_review_round_trip_fixes_them() {
    let sim = SimConfig { wrong: 0.2, seed: 3, ..Default::default() };
    let mut stack = Stack::start(sim, |_| {}).await.unwrap();
    stack.add_worker(|_| {});
    let report = stack.submit("classify", sample_jsonl(40, 300), false).await.unwrap();
    let job = report.job_id;
    stack.wait_completed(job, Duration::from_secs(60)).await.unwrap();

    // Confidence is the label's probability normalised over the labels: for
    // a right answer the simulator's share of topic words, smoothed.
    let truth = expected(40, 300);
    let labels = common::sample::labels();
    let results = rows(&stack, job).await;
    let mut wrong = 0;
    for (i, (id, state, answer, confidence)) in results.iter().enumerate() {
        let c = confidence.expect("every answer has a confidence");
        assert!((0.0..=1.0).contains(&c));
        if answer.as_deref() == Some(truth[id].as_str()) {
            let text = common::sample::document(40, i as u64)["text"].as_str().unwrap().to_string();
            let scores: Vec<f64> = labels.iter().map(|l| common::sample::score(&text, l) as f64 + 0.05).collect();
            let p = (common::sample::score(&text, &truth[id]) as f64 + 0.05) / scores.iter().sum::<f64>();
            assert!((c - p).abs() < 1e-6, "{id}: confidence {c}, model probability {p}");
        } else {
            wrong += 1;
            assert_eq!(state, "needs_review", "{id}: a wrong answer with confidence {c} was not flagged");
        }
    }
    assert!(wrong > 20, "the simulator got {wrong} wrong");
    let status = stack.status(job).await.unwrap();
    assert_eq!(status.succeeded, 300);
    assert!(status.needs_review >= wrong, "{status:?}");
    assert_eq!(status.review_below, Some(0.65));

    // Export the queue in each format.
    let queue = stack.client.review_export(job, None, "jsonl").await.unwrap();
    let queued: Vec<serde_json::Value> =
        queue.split(|b| *b == b'\n').filter(|l| !l.is_empty()).map(|l| serde_json::from_slice(l).unwrap()).collect();
    assert_eq!(queued.len() as u64, status.needs_review);
    assert!(queued.windows(2).all(|w| w[0]["confidence"].as_f64() <= w[1]["confidence"].as_f64()), "least sure first");
    assert!(queued[0]["input"]["text"].is_string());
    let ls: serde_json::Value =
        serde_json::from_slice(&stack.client.review_export(job, None, "label-studio").await.unwrap()).unwrap();
    assert_eq!(ls.as_array().unwrap().len(), queued.len());
    assert_eq!(ls[0]["predictions"][0]["score"], queued[0]["confidence"]);
    let csv = stack.client.review_export(job, None, "csv").await.unwrap();
    assert_eq!(csv.split(|b| *b == b'\n').filter(|l| !l.is_empty()).count(), queued.len() + 1);
    let all_below = stack.client.review_export(job, Some(0.99), "jsonl").await.unwrap();
    assert!(all_below.split(|b| *b == b'\n').filter(|l| !l.is_empty()).count() > queued.len());

    // A reviewer decides every queued item with a token of her own; the
    // exports then carry the human answer, under her name.
    let ann = stack.client_as("ann", "default", coordinator::auth::Role::Reviewer).await.unwrap();
    let mut decisions = Vec::new();
    for q in &queued {
        let id = q["id"].as_str().unwrap();
        decisions.extend(
            serde_json::to_vec(&serde_json::json!({"id": id, "answer": truth[id], "reviewer": "ann"})).unwrap(),
        );
        decisions.push(b'\n');
    }
    let imported = ann.review_import(job, decisions, "jsonl", "decisions.jsonl").await.unwrap();
    assert_eq!(imported.applied as usize, queued.len());
    let status = stack.status(job).await.unwrap();
    assert_eq!((status.needs_review, status.reviewed), (0, queued.len() as u64));
    let mut export = stack.client.results(job, "jsonl").await.unwrap();
    let mut body = Vec::new();
    while let Some(piece) = futures::StreamExt::next(&mut export).await {
        body.extend_from_slice(&piece.unwrap());
    }
    let mut right = 0;
    for line in body.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let r: serde_json::Value = serde_json::from_slice(line).unwrap();
        let id = r["id"].as_str().unwrap();
        right += (r["answer"] == truth[id].as_str()) as usize;
        if queued.iter().any(|q| q["id"] == id) {
            assert_eq!(r["answer_source"], "human:ann");
            assert_eq!(r["state"], "reviewed");
        } else {
            assert_eq!(r["answer_source"], "model");
        }
    }
    assert_eq!(right, 300, "after review every answer is right");
    let events: Vec<(String, String)> =
        sqlx::query("SELECT event, actor FROM audit_events WHERE job_id = $1 ORDER BY id")
            .bind(job)
            .fetch_all(&stack.db.pool)
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get("event"), r.get("actor")))
            .collect();
    let names: Vec<&str> = events.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(names, ["submitted", "chunked", "exported", "exported", "exported", "exported", "imported", "exported"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_decision_files_are_refused_whole_with_line_numbers() {
    let sim = SimConfig { wrong: 0.3, ..Default::default() };
    let mut stack = Stack::start(sim, |_| {}).await.unwrap();
    stack.add_worker(|_| {});
    let report = stack.submit("classify", sample_jsonl(41, 50), false).await.unwrap();
    stack.wait_completed(report.job_id, Duration::from_secs(60)).await.unwrap();
    let before = rows(&stack, report.job_id).await;
    let body = b"{\"id\":\"doc-0000001\",\"answer\":\"sports\",\"reviewer\":\"ann\"}\n\
{\"id\":\"no-such-doc\",\"answer\":\"sports\",\"reviewer\":\"ann\"}\n\
{\"id\":\"doc-0000002\",\"answer\":\"cooking\",\"reviewer\":\"ann\"}\n\
{\"id\": \"doc-0000003\", \n\
{\"id\":\"doc-0000004\"}\n"
        .to_vec();
    let err = stack.client.review_import(report.job_id, body, "jsonl", "bad.jsonl").await.unwrap_err();
    let ClientError::Decisions { errors, message } = err else { panic!("{err:?}") };
    assert!(message.contains("nothing was applied"), "{message}");
    let lines: Vec<u64> = errors.iter().map(|e| e.line).collect();
    assert_eq!(lines, [2, 3, 4, 5], "{errors:?}");
    assert!(errors[0].reason.contains("unknown item id \"no-such-doc\""));
    assert!(errors[1].reason.contains("not one of the labels"));
    assert!(errors[2].reason.contains("invalid JSON"));
    assert!(errors[3].reason.contains("missing \"answer\""));
    assert_eq!(rows(&stack, report.job_id).await, before, "nothing half-applied");
    let reviews: i64 = sqlx::query_scalar("SELECT count(*) FROM reviews").fetch_one(&stack.db.pool).await.unwrap();
    assert_eq!(reviews, 0);

    // CSV decisions work the same way.
    let csv = b"id,answer,reviewer,decided_at\ndoc-0000001,sports,bob,2026-11-27T09:00:00Z\n".to_vec();
    let ok = stack.client.review_import(report.job_id, csv, "csv", "ok.csv").await.unwrap();
    assert_eq!(ok.applied, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_stats_show_agreement_by_band_and_suggest_a_threshold() {
    let sim = SimConfig { wrong: 0.25, seed: 5, ..Default::default() };
    let mut stack = Stack::start(sim, |_| {}).await.unwrap();
    stack.add_worker(|_| {});
    let job = stack.submit("classify", sample_jsonl(43, 400), false).await.unwrap().job_id;
    stack.wait_completed(job, Duration::from_secs(60)).await.unwrap();

    // Every answer is reviewed (a sample of the whole range, as the docs
    // advise), with the known right answer.
    let truth = expected(43, 400);
    let queue = stack.client.review_export(job, Some(1.01), "jsonl").await.unwrap();
    let mut decisions = Vec::new();
    for line in queue.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let id = serde_json::from_slice::<serde_json::Value>(line).unwrap()["id"].as_str().unwrap().to_string();
        decisions.extend(serde_json::to_vec(&serde_json::json!({"id": id, "answer": truth[&id]})).unwrap());
        decisions.push(b'\n');
    }
    let ann = stack.client_as("ann", "default", coordinator::auth::Role::Reviewer).await.unwrap();
    assert_eq!(ann.review_import(job, decisions, "jsonl", "all.jsonl").await.unwrap().applied, 400);

    // The known agreement per band, from the model's answers and the truth.
    let results = rows(&stack, job).await;
    let scored: Vec<(f64, bool)> =
        results.iter().map(|(id, _, answer, c)| (c.unwrap(), answer.as_deref() == Some(truth[id].as_str()))).collect();
    let stats = stack.client.review_stats(job, Some(0.95)).await.unwrap();
    assert_eq!(stats.reviewed, 400);
    assert_eq!(stats.agreed, scored.iter().filter(|(_, ok)| *ok).count() as u64);
    assert!(stats.agreed < 380 && stats.agreed > 200, "the simulator is wrong a quarter of the time: {stats:?}");
    for (i, band) in stats.bands.iter().enumerate() {
        let inside: Vec<bool> =
            scored.iter().filter(|(c, _)| ((c * 10.0).floor() as usize).min(9) == i).map(|(_, ok)| *ok).collect();
        assert_eq!(band.reviewed, inside.len() as u64, "band {i}");
        assert_eq!(band.agreed, inside.iter().filter(|ok| **ok).count() as u64, "band {i}");
    }
    assert_eq!(stats.reviewers.len(), 1);
    assert_eq!((stats.reviewers[0].reviewer.as_str(), stats.reviewers[0].reviewed), ("ann", 400));

    // The suggestion: at or above it, at least 95% right; at every lower
    // confidence, less.
    let g = stats.suggestion.clone().expect("asked for");
    let t = g.threshold.expect("some threshold reaches 95% here");
    let precision_at = |t: f64| {
        let above: Vec<bool> = scored.iter().filter(|(c, _)| *c >= t).map(|(_, ok)| *ok).collect();
        (above.iter().filter(|ok| **ok).count() as f64 / above.len() as f64, above.len() as u64)
    };
    let (p, n) = precision_at(t);
    assert!(p >= 0.95 && (p - g.precision.unwrap()).abs() < 1e-9 && n == g.sample, "{g:?}");
    assert!(scored.iter().filter(|(c, _)| *c < t).all(|(c, _)| precision_at(*c).0 < 0.95), "{t} is not the lowest");
    assert_eq!(g.below, scored.iter().filter(|(c, _)| *c < t).count() as u64);
    assert_eq!(g.items, 400);

    let out = stack.sluice(&["review", "stats", &job.to_string(), "--suggest-threshold"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains(&format!("suggested threshold for 95% precision: {t:.4}")), "{text}");
    assert!(text.contains("confidence    reviewed  agreed agreement"), "{text}");
    let bad = stack.client.review_stats(job, Some(1.5)).await.unwrap_err();
    assert!(bad.to_string().contains("precision must be within 0..=1"), "{bad}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_reported_and_agreement_confidence() {
    let mut stack = Stack::start(SimConfig::default(), |_| {}).await.unwrap();
    stack.add_worker(|_| {});
    // summarize: the simulator reports 0.9; Sluice discounts it.
    let report = stack.submit("summarize", sample_jsonl(42, 30), false).await.unwrap();
    stack.wait_completed(report.job_id, Duration::from_secs(60)).await.unwrap();
    for (_, state, answer, c) in rows(&stack, report.job_id).await {
        assert_eq!(state, "succeeded");
        assert!(answer.unwrap().len() <= 200);
        assert!((c.unwrap() - 0.81).abs() < 1e-9);
    }
    // Agreement: five sampled answers; the confidence is the majority's share.
    let mut kind = common::spec::JobKind::load(&jobs_dir().join("classify")).unwrap();
    kind.spec.confidence = vec![common::spec::ConfidenceStrategy::Agreement];
    kind.spec.samples = 5;
    kind.spec.temperature = 0.8;
    let report = stack.submit_kind(kind, sample_jsonl(43, 100), false).await.unwrap();
    stack.wait_completed(report.job_id, Duration::from_secs(60)).await.unwrap();
    let results = rows(&stack, report.job_id).await;
    let mut shares = std::collections::BTreeSet::new();
    for (_, _, _, c) in &results {
        let c = c.unwrap();
        assert!(((c * 5.0).round() - c * 5.0).abs() < 1e-9 && c >= 0.4, "{c} is not a share of 5 samples");
        shares.insert((c * 5.0).round() as i64);
    }
    assert!(shares.len() > 1, "sampling gives varied agreement: {shares:?}");
    let detail: serde_json::Value =
        sqlx::query_scalar("SELECT confidence_detail FROM results WHERE job_id = $1 LIMIT 1")
            .bind(report.job_id)
            .fetch_one(&stack.db.pool)
            .await
            .unwrap();
    assert_eq!(detail["strategy"], "agreement");
    assert_eq!(detail["components"]["samples"], 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_attempt_is_audited_and_the_audit_trail_cannot_be_changed() {
    let sim = SimConfig { error_500: 0.3, seed: 2, ..Default::default() };
    let mut stack = Stack::start(sim, |_| {}).await.unwrap();
    stack.add_worker(|c| {
        c.max_attempts = 10;
        c.breaker_threshold = 1_000;
    });
    let report = stack.submit("classify", sample_jsonl(44, 100), false).await.unwrap();
    stack.wait_completed(report.job_id, Duration::from_secs(60)).await.unwrap();
    let pool = &stack.db.pool;
    let audited: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_attempts WHERE job_id = $1")
        .bind(report.job_id)
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(audited as u64, stack.sim.sim.stats().requests, "one audit row per call");
    let failed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_attempts WHERE job_id = $1 AND http_status = 500 AND error_class = 'server'",
    )
    .bind(report.job_id)
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(failed as u64, stack.sim.sim.stats().status_500);
    let cost: f64 = sqlx::query_scalar("SELECT sum(cost_usd) FROM audit_attempts WHERE job_id = $1")
        .bind(report.job_id)
        .fetch_one(pool)
        .await
        .unwrap();
    let status = stack.client.status(report.job_id).await.unwrap();
    assert!(cost > 0.0 && (status.cost_usd - cost).abs() < 1e-12, "{status:?}");
    assert!((status.projected_cost_usd.unwrap() - cost).abs() < 1e-12, "all items done: projection = cost");

    for (sql, what) in [
        ("UPDATE audit_attempts SET model = 'forged'", "update"),
        ("DELETE FROM audit_attempts", "delete"),
        ("TRUNCATE audit_attempts", "truncate"),
        ("UPDATE audit_events SET actor = 'someone else'", "update"),
        ("DELETE FROM audit_events", "delete"),
        ("TRUNCATE audit_events", "truncate"),
    ] {
        let err = sqlx::query(sql).execute(pool).await.unwrap_err().to_string();
        assert!(err.contains("permission denied"), "{what}: {err}");
    }
    // Even with the privileges granted back, the trigger refuses.
    sqlx::query("GRANT UPDATE, DELETE, TRUNCATE ON audit_attempts, audit_events TO CURRENT_USER")
        .execute(pool)
        .await
        .unwrap();
    for sql in ["UPDATE audit_attempts SET model = 'forged'", "DELETE FROM audit_events", "TRUNCATE audit_attempts"] {
        let err = sqlx::query(sql).execute(pool).await.unwrap_err().to_string();
        assert!(err.contains("append-only"), "{sql}: {err}");
    }
    let still: i64 =
        sqlx::query_scalar("SELECT count(*) FROM audit_attempts WHERE model = 'forged'").fetch_one(pool).await.unwrap();
    assert_eq!(still, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_and_personal_data_reach_neither_logs_nor_the_audit_trail() {
    const KEY: &str = "sk-test-FAKEKEY-5d7e2c91a0";
    const PII: [&str; 4] =
        ["jane.doe@example.com", "+44 20 7946 0958", "4111 1111 1111 1111", "DE89370400440532013000"];
    let sim = SimConfig { api_key: Some(KEY.into()), ..Default::default() };
    let stack = Stack::start(sim, |_| {}).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("worker.log");
    let config = stack.worker_config();
    let _worker = WorkerProcess::spawn_logged(
        &config,
        "pii-worker",
        &[("SLUICE_MODEL_API_KEY", KEY), ("SLUICE_LOG", "debug")],
        Some(&log),
    )
    .unwrap();
    let mut input = Vec::new();
    for (i, pii) in PII.iter().enumerate() {
        let line =
            serde_json::json!({"id": format!("p{i}"), "text": format!("Contact {pii} about the match and the goal.")});
        input.extend(serde_json::to_vec(&line).unwrap());
        input.push(b'\n');
    }
    let report = stack.submit("classify", input, false).await.unwrap();
    stack.wait_completed(report.job_id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(stack.client.status(report.job_id).await.unwrap().succeeded, 4, "the key worked");

    // The audit trail keeps redacted prompts, the whole database keeps no key.
    let audit: Vec<String> =
        sqlx::query_scalar("SELECT t::text FROM audit_attempts t").fetch_all(&stack.db.pool).await.unwrap();
    assert_eq!(audit.len(), 4);
    let all_audit = audit.join("\n");
    for pii in PII {
        assert!(!all_audit.contains(pii), "{pii} in the audit trail");
    }
    assert!(all_audit.contains("[email:") && all_audit.contains("[card:") && all_audit.contains("[iban:"));
    let tables: Vec<String> = sqlx::query_scalar("SELECT tablename::text FROM pg_tables WHERE schemaname = 'public'")
        .fetch_all(&stack.db.pool)
        .await
        .unwrap();
    for table in tables {
        let text: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT t::text FROM {table} t")))
            .fetch_all(&stack.db.pool)
            .await
            .unwrap();
        assert!(!text.join("\n").contains(KEY), "the API key is in table {table}");
    }
    // Nor the worker's debug log, nor anything NATS stored.
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(!logged.is_empty(), "the worker logged at debug level");
    assert!(!logged.contains(KEY), "the API key is in the worker log");
    for pii in PII {
        assert!(!logged.contains(pii), "{pii} in the worker log");
    }
    for entry in walk(&stack.nats.store_dir()) {
        let bytes = std::fs::read(&entry).unwrap();
        assert!(!bytes.windows(KEY.len()).any(|w| w == KEY.as_bytes()), "the API key is in {}", entry.display());
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
