//! Notifications: webhooks signed as Standard Webhooks, retried with back-off, every attempt recorded, and a receiver that is down holding nothing up.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use base64::Engine;
use coordinator::model::{NewJob, NewWebhook, WebhookFormat};
use hmac::{Hmac, KeyInit, Mac};
use sluice_tests::fixtures::{jobs_dir, sample_jsonl, wait_for, Stack};
use sluice_tests::sim::SimConfig;
use sluice_tests::tools::{output, repo, tool};
use uuid::Uuid;

/// One request a receiver got.
#[derive(Debug, Clone)]
struct Received {
    id: String,
    timestamp: String,
    signature: String,
    body: Vec<u8>,
    answered: u16,
}

/// A webhook receiver on a port of the OS's choosing: it answers 503 to the
/// first `fail_first` requests of each message, then 204, and keeps every
/// request.
#[derive(Clone)]
struct Receiver {
    addr: SocketAddr,
    got: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    async fn start(fail_first: usize) -> Self {
        let got: Arc<Mutex<Vec<Received>>> = Arc::default();
        let seen = got.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
                let seen = seen.clone();
                async move {
                    let header = |k: &str| headers.get(k).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
                    let mut seen = seen.lock().unwrap();
                    let id = header("webhook-id");
                    let before = seen.iter().filter(|r| r.id == id).count();
                    let status =
                        if before < fail_first { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::NO_CONTENT };
                    seen.push(Received {
                        id,
                        timestamp: header("webhook-timestamp"),
                        signature: header("webhook-signature"),
                        body: body.to_vec(),
                        answered: status.as_u16(),
                    });
                    status
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Receiver { addr, got }
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    fn received(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }

    /// The bodies it accepted.
    fn accepted(&self) -> Vec<serde_json::Value> {
        self.received().iter().filter(|r| r.answered < 300).map(|r| serde_json::from_slice(&r.body).unwrap()).collect()
    }
}

/// A Standard Webhooks check, written here from the specification: the
/// HMAC-SHA256 of `id.timestamp.body` under the base64 key after `whsec_`.
fn verify(secret: &str, r: &Received) -> bool {
    let key = base64::engine::general_purpose::STANDARD.decode(secret.strip_prefix("whsec_").unwrap()).unwrap();
    let mut mac = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(&key).unwrap();
    mac.update(format!("{}.{}.", r.id, r.timestamp).as_bytes());
    mac.update(&r.body);
    let want = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    r.signature.split(' ').any(|s| s.strip_prefix("v1,") == Some(want.as_str()))
}

/// Runs scripts/review-check/verify_webhooks.py (the PyPI package
/// standardwebhooks, which scripts/test installs) on the requests, their
/// bodies changed by a byte if `tamper`.
fn reference_check(secret: &str, got: &[Received], tamper: bool) -> (bool, String) {
    let deliveries: Vec<serde_json::Value> = got
        .iter()
        .map(|r| {
            let mut body = String::from_utf8(r.body.clone()).unwrap();
            if tamper {
                body.push(' ');
            }
            serde_json::json!({"body": body, "headers": {
                "webhook-id": r.id, "webhook-timestamp": r.timestamp, "webhook-signature": r.signature}})
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("deliveries.json");
    std::fs::write(&file, serde_json::to_vec(&deliveries).unwrap()).unwrap();
    output(
        std::process::Command::new("python3")
            .arg(repo().join("scripts/review-check/verify_webhooks.py"))
            .arg(secret)
            .arg(&file)
            .env("PYTHONPATH", tool("SLUICE_WEBHOOKS_PYTHONPATH")),
    )
}

fn hook(url: String, format: WebhookFormat) -> NewWebhook {
    NewWebhook { url, format, project: None }
}

async fn submit(stack: &Stack, job: NewJob, input: Vec<u8>) -> Uuid {
    let id = stack.client.create_job(&job).await.unwrap().job_id;
    stack.client.upload(id, futures::stream::iter([Ok(bytes::Bytes::from(input))]), false).await.unwrap();
    id
}

fn classify() -> common::spec::JobKind {
    common::spec::JobKind::load(&jobs_dir().join("classify")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_are_signed_retried_and_recorded_and_a_dead_receiver_blocks_nothing() {
    let mut stack = Stack::start(SimConfig { wrong: 0.3, ..Default::default() }, |_| {}).await.unwrap();
    stack.add_worker(|_| {});
    let project = Receiver::start(0).await;
    let flaky = Receiver::start(2).await;
    let slack = Receiver::start(0).await;
    // A receiver that is down: a port that was open, then closed.
    let down = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/hook", l.local_addr().unwrap())
    };
    let added = stack.client.add_webhook(&hook(project.url(), WebhookFormat::Json)).await.unwrap();
    assert_eq!(added.project.as_deref(), Some("default"));
    let secret = stack.client.webhook_secret(None).await.unwrap().secret;
    assert!(secret.starts_with("whsec_"), "{secret}");

    let notify = vec![
        hook(flaky.url(), WebhookFormat::Json),
        hook(down.clone(), WebhookFormat::Json),
        hook(slack.url(), WebhookFormat::Slack),
    ];
    let job = submit(&stack, NewJob { notify, ..NewJob::new(classify()) }, sample_jsonl(61, 60)).await;
    // The receiver that is down does not hold the job up.
    stack.wait_completed(job, Duration::from_secs(60)).await.unwrap();
    let status = stack.status(job).await.unwrap();
    assert!(status.needs_review > 0, "{status:?}");

    // Each live receiver gets job.completed and review.ready; the flaky one
    // after two refusals.
    wait_for("every live receiver told twice", Duration::from_secs(30), || async {
        Ok([&project, &flaky, &slack].iter().all(|r| r.accepted().len() == 2))
    })
    .await
    .unwrap();
    for r in [&project, &flaky] {
        let mut types: Vec<String> = r.accepted().iter().map(|b| b["type"].as_str().unwrap().to_string()).collect();
        types.sort();
        assert_eq!(types, ["job.completed", "review.ready"]);
        for b in r.accepted() {
            assert_eq!(b["data"]["job"]["job_id"], job.to_string());
            assert_eq!(b["data"]["job"]["state"], "completed");
            assert_eq!(b["data"]["job"]["needs_review"], status.needs_review);
        }
        for got in r.received() {
            assert!(verify(&secret, &got), "a signature that does not verify: {got:?}");
            let mut tampered = got.clone();
            tampered.body.push(b' ');
            assert!(!verify(&secret, &tampered), "the check must fail on a changed body");
        }
    }
    // And with the Standard Webhooks reference library, as a receiver would.
    let (ok, report) = reference_check(&secret, &project.received(), false);
    assert!(ok && report.contains("verified=2 refused=0"), "{report}");
    let (_, report) = reference_check(&secret, &project.received(), true);
    assert!(report.contains("verified=0 refused=2"), "a changed body is refused: {report}");
    let texts: Vec<String> = slack.accepted().iter().map(|b| b["text"].as_str().unwrap().to_string()).collect();
    assert!(texts.iter().any(|t| t.contains("completed: ") && t.contains(&job.to_string())), "{texts:?}");
    assert!(texts.iter().any(|t| t.contains("waiting for review")), "{texts:?}");

    // The flaky receiver saw each message three times: the same id, the
    // same body.
    let got = flaky.received();
    assert_eq!(got.len(), 6, "{got:?}");
    for r in got.iter().filter(|r| r.answered == 204) {
        let same: Vec<&Received> = got.iter().filter(|o| o.id == r.id).collect();
        assert_eq!(same.len(), 3, "two refusals and the delivery share the message id");
        assert!(same.windows(2).all(|w| w[0].body == w[1].body));
    }

    // Every attempt is recorded; the dead receiver's failures too.
    wait_for("the dead receiver's failures recorded", Duration::from_secs(30), || async {
        let log = stack.client.notifications(job).await?;
        Ok(log.iter().filter(|d| d.url == down).all(|d| d.attempts >= 2))
    })
    .await
    .unwrap();
    let log = stack.client.notifications(job).await.unwrap();
    assert_eq!(log.len(), 8, "two events for four receivers: {log:?}");
    for d in &log {
        if d.url == down {
            assert_eq!(d.state, "pending", "retried until its attempts run out: {d:?}");
            assert!(d.last_error.as_deref().is_some_and(|e| e.contains("connect")), "{d:?}");
        } else {
            assert_eq!(d.state, "delivered", "{d:?}");
        }
    }
    let flaky_attempts: Vec<(i32, Option<i32>)> = sqlx::query_as(
        "SELECT a.attempt, a.status FROM webhook_attempts a JOIN webhook_deliveries d ON d.id = a.delivery_id
         JOIN webhooks w ON w.id = d.webhook_id WHERE w.url = $1 ORDER BY a.at, a.attempt",
    )
    .bind(flaky.url())
    .fetch_all(&stack.db.pool)
    .await
    .unwrap();
    assert_eq!(flaky_attempts.iter().filter(|(_, s)| *s == Some(503)).count(), 4, "{flaky_attempts:?}");
    assert_eq!(flaky_attempts.iter().filter(|(_, s)| *s == Some(204)).count(), 2, "{flaky_attempts:?}");

    let out = stack.sluice(&["webhooks", "log", &job.to_string()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("review.ready") && text.contains("delivered"), "{text}");

    // A URL that is not one is refused at submit, before anything is stored.
    let bad = NewJob { notify: vec![hook("hooks.example.com".into(), WebhookFormat::Json)], ..NewJob::new(classify()) };
    let err = stack.client.create_job(&bad).await.unwrap_err();
    assert!(err.to_string().contains("is not a URL"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_job_and_a_breaker_left_open_are_told() {
    // The setting under test: a breaker open for a second is worth telling.
    let sim = SimConfig { error_503: 1.0, retry_after_s: 0.05, ..Default::default() };
    let mut stack = Stack::start(sim, |c| c.notify_breaker_after_s = 1).await.unwrap();
    stack.add_worker(|c| {
        c.breaker_threshold = 3;
        c.max_attempts = 50;
    });
    let receiver = Receiver::start(0).await;
    stack.client.add_webhook(&hook(receiver.url(), WebhookFormat::Json)).await.unwrap();
    let job = submit(&stack, NewJob::new(classify()), sample_jsonl(62, 30)).await;
    wait_for("breaker.open told", Duration::from_secs(60), || async {
        Ok(receiver.accepted().iter().any(|b| b["type"] == "breaker.open"))
    })
    .await
    .unwrap();
    let told = receiver.accepted().into_iter().find(|b| b["type"] == "breaker.open").unwrap();
    assert_eq!(told["data"]["job"]["job_id"], job.to_string());
    assert_eq!(told["data"]["detail"]["model"], "sim-small");
    // Once per opening, however often the notifier looks.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let n = receiver.accepted().iter().filter(|b| b["type"] == "breaker.open").count();
    assert_eq!(n, 1, "told once per opening");
    stack.client.cancel(job).await.unwrap();

    // A budget cap reached pauses the job: job.paused, with the reason.
    let stack = Stack::start(SimConfig::default(), |_| {}).await.unwrap();
    let mut stack = stack;
    stack.add_worker(|_| {});
    let receiver = Receiver::start(0).await;
    let input = sample_jsonl(63, 400);
    let notify = vec![hook(receiver.url(), WebhookFormat::Json)];
    let job = submit(&stack, NewJob { max_cost_usd: Some(0.0001), notify, ..NewJob::new(classify()) }, input).await;
    wait_for("job.paused told", Duration::from_secs(60), || async {
        Ok(receiver.accepted().iter().any(|b| b["type"] == "job.paused"))
    })
    .await
    .unwrap();
    let told = receiver.accepted().into_iter().find(|b| b["type"] == "job.paused").unwrap();
    assert_eq!(told["data"]["detail"]["reason"], "budget");
    assert_eq!(told["data"]["job"]["job_id"], job.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_items_all_wait_at_a_gate_tells_that_review_is_ready() {
    let mut stack = Stack::start(SimConfig::default(), |_| {}).await.unwrap();
    stack.add_worker(|_| {});
    let receiver = Receiver::start(0).await;
    let out = stack.sluice(&["sample", "article", "--count", "6", "--seed", "4"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let article = common::spec::JobKind::load(&jobs_dir().join("article")).unwrap();
    let notify = vec![hook(receiver.url(), WebhookFormat::Json)];
    let job = submit(&stack, NewJob { notify, ..NewJob::new(article) }, out.stdout).await;
    wait_for("review.ready told", Duration::from_secs(60), || async {
        Ok(receiver.accepted().iter().any(|b| b["type"] == "review.ready"))
    })
    .await
    .unwrap();
    let told = receiver.accepted().into_iter().find(|b| b["type"] == "review.ready").unwrap();
    // Told only once every outline waits at the gate, not at the first.
    assert_eq!(told["data"]["detail"]["held"], 6, "{told}");
    assert_eq!(told["data"]["job"]["state"], "running");
    assert_eq!(stack.status(job).await.unwrap().state, "running", "the job waits for the decisions");
}
