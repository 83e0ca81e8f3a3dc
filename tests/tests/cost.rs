//! Spending less and never by surprise: the response cache, one call for identical items, budget caps, and the CLI's refusals of bad settings.

use std::process::{Command, Output};
use std::time::Duration;

use coordinator::model::NewJob;
use sluice_tests::fixtures::{jobs_dir, sample_jsonl, wait_for, workspace_bin, Stack};
use sluice_tests::sim::SimConfig;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(90);

/// Calls the simulator answered.
fn answered(stack: &Stack) -> u64 {
    stack.sim.sim.stats().ok
}

async fn submit(stack: &Stack, job: NewJob, input: &[u8]) -> Uuid {
    let id = stack.client.create_job(&job).await.unwrap().job_id;
    stack.client.upload(id, futures::stream::iter([Ok(bytes::Bytes::from(input.to_vec()))]), false).await.unwrap();
    id
}

fn classify() -> common::spec::JobKind {
    common::spec::JobKind::load(&jobs_dir().join("classify")).unwrap()
}

fn sluice(stack: &Stack, args: &[&str]) -> Output {
    Command::new(workspace_bin("sluice").unwrap())
        .args(args)
        .env("SLUICE_COORDINATOR", format!("http://{}", stack.coordinator_addr))
        .env("SLUICE_TOKEN", &stack.admin_token)
        .env("SLUICE_PRICES_FILE", jobs_dir().join("../deploy/prices.toml"))
        .output()
        .unwrap()
}

async fn count(stack: &Stack, sql: &'static str, a: Uuid, b: Uuid) -> i64 {
    sqlx::query_scalar(sql).bind(a).bind(b).fetch_one(&stack.db.pool).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_identical_job_makes_no_call_and_a_changed_request_misses() {
    let mut stack = Stack::start(SimConfig::default(), |_| {}).await.unwrap();
    stack.add_worker(|_| {});
    let input = sample_jsonl(71, 300);
    let first = submit(&stack, NewJob::new(classify()), &input).await;
    stack.wait_completed(first, WAIT).await.unwrap();
    assert_eq!(answered(&stack), 300);
    let st = stack.status(first).await.unwrap();
    assert!(st.reuse && st.cost_usd > 0.0 && st.cache_hits == 0, "{st:?}");

    // The estimate knows every prompt is cached now, and what the job used.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("in.jsonl");
    std::fs::write(&file, &input).unwrap();
    let kind = jobs_dir().join("classify").display().to_string();
    let out = sluice(&stack, &["estimate", &kind, "--input", file.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let e: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((e["cache_hits"].as_u64(), e["calls"].as_u64()), (Some(300), Some(0)), "{e}");
    assert_eq!(e["history"]["jobs"].as_u64(), Some(1), "{e}");
    assert_eq!(e["cost_usd_expected"].as_f64(), Some(0.0));

    let second = submit(&stack, NewJob::new(classify()), &input).await;
    stack.wait_completed(second, WAIT).await.unwrap();
    assert_eq!(answered(&stack), 300, "no call: every answer came from the cache");
    let st = stack.status(second).await.unwrap();
    assert_eq!((st.cache_hits, st.cost_usd, st.succeeded + st.failed), (300, 0.0, 300), "{st:?}");
    let same = count(
        &stack,
        "SELECT count(*) FROM results a JOIN results b ON a.item_id = b.item_id
         WHERE a.job_id = $1 AND b.job_id = $2 AND b.source = 'cache' AND a.source = 'model'
           AND b.answer IS NOT DISTINCT FROM a.answer AND b.answered_by = a.answered_by",
        first,
        second,
    )
    .await;
    assert_eq!(same, 300, "each answer is the first job's, naming its call");
    let audited = count(
        &stack,
        "SELECT count(*) FROM audit_attempts c JOIN audit_attempts o ON o.call_id = c.reused_call
         WHERE o.job_id = $1 AND o.outcome = 'ok' AND c.job_id = $2 AND c.outcome = 'cache' AND c.cost_usd = 0",
        first,
        second,
    )
    .await;
    assert_eq!(audited, 300, "each reuse has an audit row naming the original attempt");

    // Whatever shapes the answer is in the key: each change calls every item again.
    let mut template = classify();
    template.template = format!("Read this document.\n{}", template.template);
    let mut model = classify();
    model.spec.model = "sim-large".into();
    let mut temperature = classify();
    temperature.spec.temperature = 0.5;
    let changes = [
        ("template", NewJob::new(template)),
        ("model", NewJob::new(model)),
        ("temperature (cache asked for)", NewJob { cache: Some(true), ..NewJob::new(temperature) }),
        ("--no-cache", NewJob { cache: Some(false), ..NewJob::new(classify()) }),
    ];
    for (what, job) in changes {
        let before = answered(&stack);
        let id = submit(&stack, job, &input).await;
        stack.wait_completed(id, WAIT).await.unwrap();
        assert_eq!(answered(&stack) - before, 300, "{what}: every item called");
        assert_eq!(stack.status(id).await.unwrap().cache_hits, 0, "{what}");
    }
    // Purged, the cache answers nothing more.
    let out = sluice(&stack, &["cache", "purge"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("cached answer(s) deleted"));
    let out = sluice(&stack, &["cache", "stats", "--json"]);
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((s["entries"].as_u64(), s["hits"].as_u64()), (Some(0), Some(300)), "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_items_in_one_job_make_one_call_each() {
    let mut stack = Stack::start(SimConfig::default(), |_| {}).await.unwrap();
    stack.add_worker(|_| {});
    // 200 distinct documents and 86 repeats under new ids (30% of 286),
    // some before the document they repeat.
    let docs: Vec<serde_json::Value> = (0..200).map(|i| common::sample::document(72, i)).collect();
    let mut lines: Vec<serde_json::Value> = Vec::new();
    for (i, d) in docs.iter().enumerate() {
        if i % 7 == 3 && lines.len() < 400 {
            let mut copy = docs[(i * 13) % 200].clone();
            copy["id"] = format!("repeat-{i}").into();
            lines.push(copy);
        }
        lines.push(d.clone());
    }
    let mut k = 0;
    while lines.len() < 286 {
        let mut copy = docs[(k * 7) % 200].clone();
        copy["id"] = format!("again-{k}").into();
        lines.push(copy);
        k += 1;
    }
    let input: Vec<u8> = lines.iter().flat_map(|l| format!("{l}\n").into_bytes()).collect();
    let id = submit(&stack, NewJob::new(classify()), &input).await;
    stack.wait_completed(id, WAIT).await.unwrap();
    assert_eq!(answered(&stack), 200, "one call per distinct document");
    let st = stack.status(id).await.unwrap();
    assert_eq!((st.shared, st.succeeded + st.failed), (86, 286), "{st:?}");
    let differing = count(
        &stack,
        "SELECT count(*) FROM item_copies c
         JOIN results o ON o.job_id = c.job_id AND o.seq = c.original_seq
         JOIN results r ON r.job_id = c.job_id AND r.seq = c.seq
         WHERE c.job_id = $1 AND $2 = $2
           AND (r.answer IS DISTINCT FROM o.answer OR r.source <> 'shared' OR r.answered_by <> o.answered_by)",
        id,
        id,
    )
    .await;
    assert_eq!(differing, 0, "every repeat carries its original's answer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_pauses_at_its_cap_and_goes_on_when_it_is_raised() {
    let mut stack = Stack::start(SimConfig::default(), |_| {}).await.unwrap();
    stack.add_worker(|_| {});
    let input = sample_jsonl(73, 400);
    let prices = common::prices::PriceTable::load_or_empty(&jobs_dir().join("../deploy/prices.toml")).unwrap();
    let e = coordinator::estimate::estimate(&classify(), &input[..], &Default::default(), &prices, true).unwrap();
    let cap = e.cost_usd_at_most.unwrap() / 4.0;
    let id = submit(&stack, NewJob { max_cost_usd: Some(cap), ..NewJob::new(classify()) }, &input).await;
    wait_for("the job to pause at its cap", WAIT, || async { Ok(stack.client.status(id).await?.state == "paused") })
        .await
        .unwrap();
    wait_for("calls in flight to settle", WAIT, || async {
        Ok(stack.client.status(id).await?.budget.is_some_and(|b| b.in_flight_usd < 1e-12))
    })
    .await
    .unwrap();
    // Answers paid for before the pause are still written: wait for the last.
    wait_for("answers already paid for to be written", WAIT, || async {
        let unwritten: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM audit_attempts a WHERE a.job_id = $1 AND a.outcome = 'ok'
               AND NOT EXISTS (SELECT 1 FROM results r WHERE r.job_id = a.job_id AND r.seq = a.seq)",
        )
        .bind(id)
        .fetch_one(&stack.db.pool)
        .await?;
        Ok(unwritten == 0)
    })
    .await
    .unwrap();
    let st = stack.status(id).await.unwrap();
    let b = st.budget.clone().unwrap();
    assert_eq!(st.paused_reason.as_deref(), Some("budget"));
    assert!(st.cost_usd <= cap + 1e-12, "spent {} of a cap of {cap}", st.cost_usd);
    assert!((b.spent_usd - st.cost_usd).abs() < 1e-9, "{b:?} against {}", st.cost_usd);
    assert!(st.done() < 400 && st.done() > 0, "{st:?}");
    let paused = count(
        &stack,
        "SELECT count(*) FROM audit_events WHERE job_id = $1 AND $2 = $2 AND event = 'paused'
           AND detail->>'reason' = 'budget' AND actor = 'sluice'",
        id,
        id,
    )
    .await;
    assert_eq!(paused, 1);
    wait_for("the 50, 80 and 100 percent alerts", WAIT, || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(DISTINCT detail->>'percent') FROM audit_events WHERE job_id = $1 AND event = 'budget_alert'",
        )
        .bind(id)
        .fetch_one(&stack.db.pool)
        .await?;
        Ok(n == 3)
    })
    .await
    .unwrap();
    // Watching a paused job ends at once with its own exit code.
    let out = sluice(&stack, &["status", &id.to_string(), "--watch"]);
    assert_eq!(out.status.code(), Some(6), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("paused: budget"));
    // A cap that does not cover what is spent is refused; a higher one goes on.
    let err = stack.client.resume_with(id, false, Some(st.cost_usd / 2.0)).await.unwrap_err().to_string();
    assert!(err.contains("pass a higher --max-cost"), "{err}");
    let err = stack.client.resume(id, false).await.unwrap_err().to_string();
    assert!(err.contains("paused at its cap"), "{err}");
    stack.client.resume_with(id, false, Some(cap * 100.0)).await.unwrap();
    stack.wait_completed(id, WAIT).await.unwrap();
    let st = stack.status(id).await.unwrap();
    assert_eq!(st.succeeded + st.failed, 400);
    assert_eq!(answered(&stack), 400, "no item was called twice across the pause");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_settings_are_refused_with_a_clear_error() {
    let stack = Stack::start(SimConfig::default(), |_| {}).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("in.jsonl");
    std::fs::write(&file, sample_jsonl(74, 3)).unwrap();
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let (f, kind) = (file.to_str().unwrap(), jobs_dir().join("classify").display().to_string());
    for (args, says) in [
        (vec!["submit", &kind, "--input", f, "--max-cost", "-5"], "more than 0 dollars"),
        (vec!["submit", &kind, "--input", f, "--max-cost", "lots"], "is not an amount of dollars"),
        (vec!["submit", &kind, "--input", f, "--max-cost", "0"], "more than 0 dollars"),
        (vec!["submit", &kind, "--input", f, "--cache-ttl", "3 weeks"], "unknown unit"),
        (vec!["resume", "0190a2d2-0000-7000-8000-000000000000", "--max-cost", "x"], "is not an amount"),
        (vec!["estimate", "jobs/nope", "--input", f], "cannot load the job kind in jobs/nope"),
        (vec!["estimate", &kind, "--input", empty.to_str().unwrap()], "the input is empty"),
        (vec!["submit", &kind, "--input", f, "--estimate"], "pass --yes"),
        (vec!["cache", "purge", "--older-than", "5x"], "unknown unit"),
    ] {
        let out = sluice(&stack, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    // The API refuses what the CLI would not send.
    let err = stack
        .client
        .create_job(&NewJob { max_cost_usd: Some(-1.0), ..NewJob::new(classify()) })
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("positive number of dollars"), "{err}");
    assert!(stack.client.jobs(10).await.unwrap().is_empty(), "nothing was submitted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_project_default_caps_the_jobs_submitted_without_one() {
    let input = sample_jsonl(75, 200);
    let prices = common::prices::PriceTable::load_or_empty(&jobs_dir().join("../deploy/prices.toml")).unwrap();
    let e = coordinator::estimate::estimate(&classify(), &input[..], &Default::default(), &prices, true).unwrap();
    let tight = e.cost_usd_at_most.unwrap() / 4.0;
    let mut stack = Stack::start(SimConfig::default(), |c| {
        c.project_max_cost = vec![("*".into(), 50.0), ("tight".into(), tight)];
    })
    .await
    .unwrap();
    stack.add_worker(|_| {});
    let cap = |id| {
        let client = &stack.client;
        async move { client.status(id).await.unwrap().budget.map(|b| b.cap_usd) }
    };
    // A project without an entry of its own gets the catch-all; a job's own cap wins.
    let any = submit(&stack, NewJob::new(classify()), &input).await;
    assert_eq!(cap(any).await, Some(50.0));
    let own = submit(&stack, NewJob { max_cost_usd: Some(75.0), ..NewJob::new(classify()) }, &input).await;
    assert_eq!(cap(own).await, Some(75.0));
    // A project's own default applies and stops its job like any cap.
    let job = NewJob { project: Some("tight".into()), ..NewJob::new(classify()) };
    let id = submit(&stack, job, &input).await;
    assert_eq!(cap(id).await, Some(tight));
    wait_for("the tight project's job to pause at its cap", WAIT, || async {
        Ok(stack.client.status(id).await?.state == "paused")
    })
    .await
    .unwrap();
    stack.wait_completed(any, WAIT).await.unwrap();
}
