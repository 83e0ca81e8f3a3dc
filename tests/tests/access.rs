//! Who may do what through the API: every role against every endpoint, projects that hide each other's jobs, tokens that are missing, wrong, expired or revoked, the actor the audit trail records, and token values that appear nowhere.

use std::time::Duration;

use coordinator::auth::Role;
use coordinator::model::NewWebhook;
use reqwest::{Method, StatusCode};
use sluice_tests::fixtures::{make_token, sample_jsonl, ServeProcess, Stack};
use sluice_tests::sim::SimConfig;
use uuid::Uuid;

/// A request as a client of any role would send it.
async fn call(
    stack: &Stack,
    token: Option<&str>,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
) -> (StatusCode, String) {
    let mut req = reqwest::Client::new().request(method, format!("http://{}{path}", stack.coordinator_addr));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.header("content-type", "application/json").body(b);
    }
    let resp = req.send().await.unwrap();
    (resp.status(), resp.text().await.unwrap())
}

/// What a request could have changed: jobs and their states, items, job
/// events and usable tokens. A refused request leaves all of it as it was.
async fn snapshot(stack: &Stack) -> String {
    sqlx::query_scalar(
        "SELECT concat_ws(' | ', (SELECT count(*) FROM jobs), (SELECT string_agg(state, ',' ORDER BY id) FROM jobs),
                (SELECT count(*) FROM items), (SELECT count(*) FROM audit_events),
                (SELECT count(*) FROM api_tokens WHERE revoked_at IS NULL))",
    )
    .fetch_one(&stack.db.pool)
    .await
    .unwrap()
}

async fn refusals(stack: &Stack, outcome: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM audit_access WHERE outcome = $1")
        .bind(outcome)
        .fetch_one(&stack.db.pool)
        .await
        .unwrap()
}

fn new_job(project: &str) -> coordinator::model::NewJob {
    coordinator::model::NewJob { project: Some(project.into()), ..sluice_tests::fixtures::new_job("classify") }
}

/// Every endpoint, and the least role the issue's table gives it, written
/// out here rather than read from `coordinator::auth::ENDPOINTS`.
const EXPECTED: &[(&str, &str, Role)] = &[
    ("GET", "/v1/whoami", Role::Reader),
    ("GET", "/v1/jobs", Role::Reader),
    ("GET", "/v1/jobs/{id}", Role::Reader),
    ("GET", "/v1/jobs/{id}/results", Role::Reader),
    ("POST", "/v1/jobs", Role::Submitter),
    ("PUT", "/v1/jobs/{id}/input", Role::Submitter),
    ("POST", "/v1/jobs/{id}/cancel", Role::Submitter),
    ("POST", "/v1/jobs/{id}/resume", Role::Submitter),
    ("GET", "/v1/jobs/{id}/review", Role::Reviewer),
    ("POST", "/v1/jobs/{id}/review", Role::Reviewer),
    ("GET", "/v1/jobs/{id}/review/label-studio-config", Role::Reviewer),
    ("GET", "/v1/jobs/{id}/review/stats", Role::Reader),
    ("GET", "/v1/jobs/{id}/notifications", Role::Submitter),
    ("GET", "/review/{id}", Role::Reviewer),
    ("POST", "/review/{id}/decide", Role::Reviewer),
    ("POST", "/review/{id}/undo", Role::Reviewer),
    ("GET", "/v1/webhooks", Role::Submitter),
    ("POST", "/v1/webhooks", Role::Submitter),
    ("DELETE", "/v1/webhooks/{id}", Role::Submitter),
    ("GET", "/v1/webhooks/secret", Role::Submitter),
    ("POST", "/v1/estimate", Role::Reader),
    ("GET", "/v1/cache", Role::Reader),
    ("DELETE", "/v1/cache", Role::Submitter),
    ("GET", "/v1/tokens", Role::Admin),
    ("POST", "/v1/tokens", Role::Admin),
    ("POST", "/v1/tokens/{id}/revoke", Role::Admin),
    ("POST", "/v1/admin/prune", Role::Admin),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_may_call_exactly_its_endpoints_and_a_refusal_changes_nothing() {
    let declared: Vec<(&str, &str)> = coordinator::auth::ENDPOINTS.iter().map(|e| (e.method, e.path)).collect();
    let tested: Vec<(&str, &str)> = EXPECTED.iter().map(|(m, p, _)| (*m, *p)).collect();
    assert_eq!(declared, tested, "every endpoint of the API has a row here");

    let stack = Stack::start(SimConfig::default(), |_| {}).await.unwrap();
    let admin = stack.client_as("alpha-admin", "alpha", Role::Admin).await.unwrap();
    let mut cells = 0;
    for role in Role::ALL {
        let holder = make_token(&stack.db.pool, &format!("{role}-holder"), "alpha", *role).await.unwrap();
        for (method, route, least) in EXPECTED {
            // What the request works on, made by an admin beforehand.
            let uploading = admin.create_job(&new_job("alpha")).await.unwrap().job_id;
            let job = match (*method, *route) {
                ("POST", "/v1/jobs/{id}/resume") => {
                    let cancelled = admin.create_job(&new_job("alpha")).await.unwrap().job_id;
                    admin.cancel(cancelled).await.unwrap();
                    cancelled
                }
                _ => uploading,
            };
            let spare = make_token(&stack.db.pool, "spare", "alpha", Role::Reader).await.unwrap();
            let path = if route.starts_with("/v1/tokens/") {
                route.replace("{id}", &spare.info.id.to_string())
            } else if route.starts_with("/v1/webhooks/") {
                let hook =
                    NewWebhook { url: "http://127.0.0.1:9/hook".into(), format: Default::default(), project: None };
                route.replace("{id}", &admin.add_webhook(&hook).await.unwrap().id.to_string())
            } else {
                route.replace("{id}", &job.to_string())
            };
            let body = match (*method, *route) {
                ("POST", "/v1/jobs") => Some(serde_json::to_vec(&new_job("alpha")).unwrap()),
                ("PUT", _) => Some(sample_jsonl(1, 3)),
                ("POST", "/v1/jobs/{id}/review") => Some(Vec::new()),
                ("POST", "/v1/estimate") => Some(
                    serde_json::to_vec(&serde_json::json!({"kind": new_job("alpha").kind, "digests": ["d"]})).unwrap(),
                ),
                ("POST", "/v1/tokens") => Some(br#"{"name":"made","project":"alpha","role":"reader"}"#.to_vec()),
                ("POST", "/v1/webhooks") => Some(br#"{"url":"http://127.0.0.1:9/hook"}"#.to_vec()),
                ("POST", "/v1/admin/prune") => Some(br#"{"before":"2020-01-01T00:00:00Z","dry_run":true}"#.to_vec()),
                ("POST", "/review/{id}/decide" | "/review/{id}/undo") => {
                    Some(br#"{"id":"doc-1","answer":"x"}"#.to_vec())
                }
                _ => None,
            };
            let before = snapshot(&stack).await;
            let forbidden_before = refusals(&stack, "forbidden").await;
            let (status, text) =
                call(&stack, Some(&holder.token), Method::from_bytes(method.as_bytes()).unwrap(), &path, body).await;
            let cell = format!("{role} {method} {route}");
            if role.rank() >= least.rank() && route.starts_with("/review/{id}/") {
                // Let through: the page's decision reaches the job, which has no such item.
                assert_eq!(status, StatusCode::BAD_REQUEST, "{cell}: allowed, got {status}: {text}");
                assert!(text.contains("doc-1"), "{cell}: {text}");
            } else if role.rank() >= least.rank() {
                assert!(status.is_success(), "{cell}: allowed, got {status}: {text}");
            } else {
                assert_eq!(status, StatusCode::FORBIDDEN, "{cell}: {text}");
                assert!(text.contains(&format!("needs the {least} role")), "{cell}: {text}");
                assert_eq!(snapshot(&stack).await, before, "{cell}: a refused request changed something");
                assert_eq!(refusals(&stack, "forbidden").await, forbidden_before + 1, "{cell}: refusal audited");
            }
            cells += 1;
            // Jobs left uploading would count against the project's limit of active jobs.
            for j in admin.jobs(1000).await.unwrap() {
                if j.state == "uploading" || j.state == "running" {
                    admin.cancel(j.job_id).await.unwrap();
                }
            }
        }
    }
    assert_eq!(cells, 4 * EXPECTED.len());
}

#[tokio::test]
async fn another_projects_job_answers_as_if_it_did_not_exist() {
    let stack = Stack::start(SimConfig::default(), |_| {}).await.unwrap();
    let alpha = stack.client_as("alice", "alpha", Role::Submitter).await.unwrap();
    let beta = make_token(&stack.db.pool, "bob", "beta", Role::Reviewer).await.unwrap();
    let job = alpha.create_job(&new_job("alpha")).await.unwrap().job_id;

    let about_a_job = |r: &str| r.starts_with("/v1/jobs/{id}") || r.starts_with("/review/{id}");
    for (method, route) in EXPECTED.iter().filter(|(_, r, _)| about_a_job(r)).map(|(m, r, _)| (m, r)) {
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let theirs =
            call(&stack, Some(&beta.token), method.clone(), &route.replace("{id}", &job.to_string()), None).await;
        let nobody = Uuid::now_v7();
        let missing = call(&stack, Some(&beta.token), method, &route.replace("{id}", &nobody.to_string()), None).await;
        assert_eq!(theirs.0, StatusCode::NOT_FOUND, "{route}: {}", theirs.1);
        assert_eq!(theirs.1.replace(&job.to_string(), "ID"), missing.1.replace(&nobody.to_string(), "ID"), "{route}");
    }
    assert_eq!(refusals(&stack, "hidden").await, 13, "each look at another project's job is audited");

    let beta_client =
        coordinator::client::Client::new(&format!("http://{}", stack.coordinator_addr)).with_token(&beta.token);
    assert!(beta_client.jobs(100).await.unwrap().is_empty(), "beta lists none of alpha's jobs");
    assert_eq!(alpha.jobs(100).await.unwrap().len(), 1);
    let err = beta_client.create_job(&new_job("alpha")).await.unwrap_err().to_string();
    assert!(err.contains("may not submit jobs to project alpha"), "{err}");
    // An admin sees every project, and its own project is the default.
    let all = stack.client.jobs(100).await.unwrap();
    assert_eq!(all.iter().map(|j| j.project.as_str()).collect::<Vec<_>>(), ["alpha"]);
    assert_eq!(stack.client.status(job).await.unwrap().project, "alpha");
    // An admin may narrow the list to one project; another token gets its own whatever it names.
    assert_eq!(stack.client.jobs_of(100, Some("alpha")).await.unwrap().len(), 1);
    assert!(stack.client.jobs_of(100, Some("beta")).await.unwrap().is_empty());
    assert!(beta_client.jobs_of(100, Some("alpha")).await.unwrap().is_empty());
}

#[tokio::test]
async fn no_token_a_wrong_one_an_expired_one_and_a_revoked_one_are_refused_and_nothing_is_done() {
    let stack = Stack::start(SimConfig::default(), |_| {}).await.unwrap();
    let expired = make_token(&stack.db.pool, "old", "default", Role::Admin).await.unwrap();
    sqlx::query("UPDATE api_tokens SET expires_at = now() - interval '1 second' WHERE id = $1")
        .bind(expired.info.id)
        .execute(&stack.db.pool)
        .await
        .unwrap();
    let revoked = make_token(&stack.db.pool, "gone", "default", Role::Admin).await.unwrap();
    stack.client.revoke_token(revoked.info.id).await.unwrap();
    let mistyped = format!("{}x", &revoked.token[..revoked.token.len() - 1]);

    let before = snapshot(&stack).await;
    let body = serde_json::to_vec(&new_job("default")).unwrap();
    for (token, says) in [
        (None, "no API token"),
        (Some("not-a-token"), "not a Sluice API token"),
        (Some(mistyped.as_str()), "unknown API token"),
        (Some(expired.token.as_str()), "expired"),
        (Some(revoked.token.as_str()), "revoked"),
    ] {
        let (status, text) = call(&stack, token, Method::POST, "/v1/jobs", Some(body.clone())).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{says}: {text}");
        assert!(text.contains(says), "{says}: {text}");
    }
    assert_eq!(snapshot(&stack).await, before, "nothing was done");
    assert_eq!(refusals(&stack, "unauthenticated").await, 5);
    let reasons: Vec<String> = sqlx::query_scalar("SELECT reason || coalesce(actor, '') FROM audit_access")
        .fetch_all(&stack.db.pool)
        .await
        .unwrap();
    for t in [&mistyped, &expired.token, &revoked.token] {
        assert!(reasons.iter().all(|r| !r.contains(t.as_str())), "the token is not in the audit");
    }

    // After a few failures an address must wait, even with a good token.
    let mut throttled = None;
    for _ in 0..10 {
        let (status, text) = call(&stack, Some("sluice_wrong"), Method::GET, "/v1/jobs", None).await;
        if status == StatusCode::TOO_MANY_REQUESTS {
            throttled = Some(text);
            break;
        }
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    let text = throttled.expect("repeated failures are slowed down");
    assert!(text.contains("too many failed authentications"), "{text}");
    let good = stack.client.jobs(10).await.unwrap_err().to_string();
    assert!(good.contains("too many failed authentications"), "{good}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_trail_records_the_token_holder_whatever_the_client_claims() {
    let mut stack = Stack::start(SimConfig::default(), |_| {}).await.unwrap();
    let ann = make_token(&stack.db.pool, "ann", "default", Role::Reviewer).await.unwrap();
    let client = coordinator::client::Client::new(&format!("http://{}", stack.coordinator_addr))
        .with_token(&ann.token)
        .with_actor("admin@example.com");
    stack.add_worker(|_| {});
    let job = client.create_job(&new_job("default")).await.unwrap().job_id;
    client.upload(job, futures::stream::iter([Ok(bytes::Bytes::from(sample_jsonl(3, 4)))]), false).await.unwrap();
    stack.wait_completed(job, Duration::from_secs(60)).await.unwrap();
    let first: String = sqlx::query_scalar("SELECT item_id FROM items WHERE job_id = $1 ORDER BY seq LIMIT 1")
        .bind(job)
        .fetch_one(&stack.db.pool)
        .await
        .unwrap();
    let decision = format!("{{\"id\":\"{first}\",\"answer\":\"sports\",\"reviewer\":\"mallory\"}}\n");
    client.review_import(job, decision.into_bytes(), "jsonl", "decisions.jsonl").await.unwrap();

    let events: Vec<(String, String, Option<Uuid>, serde_json::Value)> =
        sqlx::query_as("SELECT event, actor, token_id, detail FROM audit_events WHERE job_id = $1 ORDER BY id")
            .bind(job)
            .fetch_all(&stack.db.pool)
            .await
            .unwrap();
    let by_client: Vec<_> =
        events.iter().filter(|e| ["submitted", "chunked", "imported"].contains(&e.0.as_str())).collect();
    assert_eq!(by_client.len(), 3, "{events:?}");
    for (event, actor, token_id, detail) in by_client {
        assert_eq!(actor, "ann", "{event}");
        assert_eq!(*token_id, Some(ann.info.id), "{event}");
        assert_eq!(detail["claimed_actor"], "admin@example.com", "{event}: the claim is kept as a note");
    }
    let (reviewer, named, token_id): (String, Option<String>, Option<Uuid>) =
        sqlx::query_as("SELECT reviewer, named_reviewer, token_id FROM reviews WHERE job_id = $1")
            .bind(job)
            .fetch_one(&stack.db.pool)
            .await
            .unwrap();
    assert_eq!((reviewer.as_str(), named.as_deref(), token_id), ("ann", Some("mallory"), Some(ann.info.id)));
    let result_reviewer: String = sqlx::query_scalar("SELECT reviewer FROM results WHERE job_id = $1 AND item_id = $2")
        .bind(job)
        .bind(&first)
        .fetch_one(&stack.db.pool)
        .await
        .unwrap();
    assert_eq!(result_reviewer, "ann");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_values_appear_in_no_log_table_metric_or_error() {
    let stack = Stack::start(SimConfig::default(), |_| {}).await.unwrap();
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("coordinator.log");
    let serve = ServeProcess::start(&stack.db, &stack.nats, &log, &[("SLUICE_LOG", "debug")]).await.unwrap();
    let admin = make_token(&stack.db.pool, "root", "default", Role::Admin).await.unwrap();
    let client = coordinator::client::Client::new(&serve.url()).with_token(&admin.token);
    // A token made through the API, used, revoked, then used again; a mistyped one.
    let new = coordinator::auth::NewToken {
        name: "carl".into(),
        project: "default".into(),
        role: Role::Submitter,
        expires_in_s: Some(3600),
    };
    let made = client.create_token(&new).await.unwrap();
    let carl = coordinator::client::Client::new(&serve.url()).with_token(&made.token);
    let job = carl.create_job(&new_job("default")).await.unwrap().job_id;
    client.revoke_token(made.info.id).await.unwrap();
    assert!(carl.status(job).await.is_err());
    // Another last character, whatever the token's is.
    let last = if admin.token.ends_with('0') { '1' } else { '0' };
    let mistyped = format!("{}{last}", &admin.token[..admin.token.len() - 1]);
    let typo = coordinator::client::Client::new(&serve.url()).with_token(&mistyped);
    assert!(typo.jobs(5).await.is_err());
    // The CLI, with its token in the environment, failing and succeeding.
    for (token, ok) in [(&made.token, false), (&admin.token, true)] {
        let out = std::process::Command::new(sluice_tests::fixtures::workspace_bin("sluice").unwrap())
            .args(["status", &job.to_string(), "--coordinator", &serve.url()])
            .env("SLUICE_TOKEN", token)
            .output()
            .unwrap();
        assert_eq!(out.status.success(), ok, "{}", String::from_utf8_lossy(&out.stderr));
        for stream in [&out.stdout, &out.stderr] {
            assert!(!String::from_utf8_lossy(stream).contains(token.as_str()), "the CLI printed its token");
        }
    }

    let secrets = [&admin.token, &made.token, &mistyped];
    let log_text = std::fs::read_to_string(&serve.log).unwrap();
    assert!(log_text.contains("request refused"), "the log is the one written");
    let metrics = reqwest::get(format!("http://{}/metrics", serve.metrics)).await.unwrap().text().await.unwrap();
    let tables: Vec<String> = sqlx::query_scalar("SELECT tablename::text FROM pg_tables WHERE schemaname = 'public'")
        .fetch_all(&stack.db.pool)
        .await
        .unwrap();
    let mut database = String::new();
    for table in &tables {
        let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT t::text FROM {table} t")))
            .fetch_all(&stack.db.pool)
            .await
            .unwrap();
        database.push_str(&rows.join("\n"));
    }
    assert!(database.contains("carl"), "the tables are the ones written");
    for secret in secrets {
        let tail = &secret[coordinator::auth::TOKEN_PREFIX.len()..];
        for (place, text) in [("the log", &log_text), ("the metrics", &metrics), ("the database", &database)] {
            assert!(!text.contains(tail), "a token is in {place}");
        }
    }
}

#[tokio::test]
async fn a_coordinator_without_a_token_secret_says_how_to_make_one() {
    let mut config = coordinator::ServeConfig::for_urls("postgres://127.0.0.1:9/none", "nats://127.0.0.1:9");
    let err = coordinator::Coordinator::bind(config.clone()).await.err().unwrap().to_string();
    assert!(err.contains("SLUICE_TOKEN_SECRET_FILE") && err.contains("sluice admin secret"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let short = dir.path().join("short");
    common::private_file::write(&short, "too-short").unwrap();
    config.token_secret_file = Some(short);
    let err = coordinator::Coordinator::bind(config).await.err().unwrap().to_string();
    assert!(err.contains("at least 32"), "{err}");
}
