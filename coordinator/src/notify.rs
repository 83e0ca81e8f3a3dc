//! Notifications: webhooks per project or job, signed as Standard Webhooks, retried with back-off, every attempt recorded.
//!
//! Events (`webhook_deliveries.event`):
//! - `job.completed`, `job.paused` (a budget cap), `job.failed` (rejected or
//!   abandoned input, or every item failed), and `review.ready` when a job
//!   completes with answers to review: queued by a trigger on `jobs.state`
//!   (migration 0017) in the transaction that changes the state;
//! - `review.ready` when every item still to do waits at a gate, and
//!   `breaker.open` when a model a running job uses has had its circuit
//!   breaker open longer than `--notify-breaker-after-s`: queued here, by the
//!   leader, which looks every few seconds.
//!
//! A delivery is a POST of `{"type", "timestamp", "data": {"job": <status>,
//! "detail": ...}}` (or, for a Slack incoming webhook, `{"text": ...}`, as
//! api.slack.com/messaging/webhooks takes it), signed as the Standard
//! Webhooks specification says (github.com/standard-webhooks/standard-webhooks,
//! spec/standard-webhooks.md): headers `webhook-id` (the same on every
//! retry), `webhook-timestamp` (Unix seconds) and `webhook-signature`
//! (`v1,` and the base64 HMAC-SHA256 of `id.timestamp.body`), keyed by the
//! project's signing secret `whsec_<base64>` (`sluice webhooks secret`),
//! which every coordinator derives from the token secret. The body is
//! written once, at the first attempt, and sent unchanged on every retry.
//! A receiver that answers other than 2xx, or not within the timeout, is
//! tried again after an exponential back-off (backon) until the attempts
//! run out; nothing waits on a receiver but its own delivery.

use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::BackoffBuilder;
use base64::Engine;
use common::db::Doing;
use futures::StreamExt;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::auth::{Actor, TokenSecret};
use crate::model::{NewWebhook, Webhook, WebhookDelivery, WebhookFormat};
use crate::{store, Error};

/// Checks a receiver's URL: http or https, with a host.
pub fn check_url(url: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("webhook URL {url:?} is not a URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none_or(str::is_empty) {
        return Err(format!("webhook URL {url:?} must be http:// or https:// with a host"));
    }
    Ok(())
}

/// The signing keys of webhook deliveries, one per project.
#[derive(Clone)]
pub struct Signer(Arc<TokenSecret>);

impl Signer {
    pub fn new(secret: Arc<TokenSecret>) -> Self {
        Signer(secret)
    }

    fn key(&self, project: &str) -> Vec<u8> {
        self.0.derive("webhook-signing-key-v1", project)
    }

    /// The project's signing secret as receivers configure it: `whsec_`
    /// and the key in base64.
    pub fn secret(&self, project: &str) -> String {
        format!("whsec_{}", base64::engine::general_purpose::STANDARD.encode(self.key(project)))
    }

    /// The `webhook-signature` header of `body` sent as message `id` at
    /// `timestamp`.
    pub fn sign(&self, project: &str, id: &str, timestamp: i64, body: &[u8]) -> String {
        signature(&self.key(project), id, timestamp, body)
    }
}

/// `v1,` and the base64 HMAC-SHA256 of `id.timestamp.body` under `key`.
pub fn signature(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()))
}

/// Records webhooks for a new job (`submit --notify`).
pub async fn add_job_webhooks(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    job_id: Uuid,
    hooks: &[NewWebhook],
    actor: &Actor,
) -> Result<(), Error> {
    for h in hooks {
        sqlx::query!(
            "INSERT INTO webhooks (job_id, url, format, created_by) VALUES ($1, $2, $3, $4)",
            job_id,
            &h.url,
            h.format.as_str(),
            &actor.name
        )
        .execute(&mut **tx)
        .await
        .doing("recording the job's webhooks")?;
    }
    Ok(())
}

/// Records a webhook for every job of `project`.
pub async fn add_project_webhook(
    pool: &PgPool,
    project: &str,
    hook: &NewWebhook,
    actor: &Actor,
) -> Result<Webhook, Error> {
    let r = sqlx::query!(
        "INSERT INTO webhooks (project, url, format, created_by) VALUES ($1, $2, $3, $4) RETURNING id, created_at",
        project,
        &hook.url,
        hook.format.as_str(),
        &actor.name
    )
    .fetch_one(pool)
    .await
    .doing("adding a webhook")?;
    Ok(Webhook {
        id: r.id,
        project: Some(project.to_string()),
        job_id: None,
        url: hook.url.clone(),
        format: hook.format,
        created_by: actor.name.clone(),
        created_at: r.created_at,
    })
}

/// The webhooks of `project`'s jobs and of the project itself (every
/// project's with `None`).
pub async fn list(pool: &PgPool, project: Option<&str>) -> Result<Vec<Webhook>, Error> {
    let rows = sqlx::query!(
        r#"SELECT w.id, w.project, w.job_id, w.url, w.format, w.created_by, w.created_at
           FROM webhooks w LEFT JOIN jobs j ON j.id = w.job_id
           WHERE $1::text IS NULL OR COALESCE(w.project, j.project) = $1
           ORDER BY w.id"#,
        project
    )
    .fetch_all(pool)
    .await
    .doing("listing webhooks")?;
    Ok(rows
        .into_iter()
        .map(|r| Webhook {
            id: r.id,
            project: r.project,
            job_id: r.job_id,
            url: r.url,
            format: WebhookFormat::parse(&r.format),
            created_by: r.created_by,
            created_at: r.created_at,
        })
        .collect())
}

/// Deletes webhook `id` if it belongs to `project` (any with `None`);
/// whether it did.
pub async fn remove(pool: &PgPool, id: i64, project: Option<&str>) -> Result<bool, Error> {
    let n = sqlx::query!(
        "DELETE FROM webhooks w WHERE w.id = $1
           AND ($2::text IS NULL OR COALESCE(w.project, (SELECT project FROM jobs WHERE id = w.job_id)) = $2)",
        id,
        project
    )
    .execute(pool)
    .await
    .doing("removing a webhook")?
    .rows_affected();
    Ok(n > 0)
}

/// Every delivery of a job's notifications, oldest first.
pub async fn deliveries(pool: &PgPool, job_id: Uuid) -> Result<Vec<WebhookDelivery>, Error> {
    let rows = sqlx::query!(
        r#"SELECT d.id, d.event, w.url, d.state, d.attempts, d.last_status, d.last_error, d.created_at, d.delivered_at
           FROM webhook_deliveries d JOIN webhooks w ON w.id = d.webhook_id
           WHERE d.job_id = $1 ORDER BY d.id"#,
        job_id
    )
    .fetch_all(pool)
    .await
    .doing("reading the job's notifications")?;
    Ok(rows
        .into_iter()
        .map(|r| WebhookDelivery {
            id: r.id,
            event: r.event,
            url: r.url,
            state: r.state,
            attempts: r.attempts,
            last_status: r.last_status,
            last_error: r.last_error,
            created_at: r.created_at,
            delivered_at: r.delivered_at,
        })
        .collect())
}

/// How the notifier runs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// How often it looks for due deliveries.
    pub every: Duration,
    /// How long a receiver has to answer.
    pub timeout: Duration,
    /// Attempts before a delivery is given up as `failed`.
    pub max_attempts: u32,
    /// The first wait before a retry; it doubles up to `retry_max`.
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// A breaker open longer than this is told (`breaker.open`).
    pub breaker_after: Duration,
}

impl From<&crate::ServeConfig> for Settings {
    fn from(c: &crate::ServeConfig) -> Self {
        Settings {
            every: Duration::from_millis(500),
            timeout: Duration::from_millis(c.webhook_timeout_ms),
            max_attempts: c.webhook_max_attempts,
            retry_min: Duration::from_millis(c.webhook_retry_min_ms),
            retry_max: Duration::from_secs(600),
            breaker_after: Duration::from_secs(c.notify_breaker_after_s),
        }
    }
}

impl Settings {
    /// The wait after failed attempt `attempt` (1-based): exponential with
    /// jitter, from `retry_min` up to `retry_max`.
    fn retry_delay(&self, attempt: u32) -> Duration {
        backon::ExponentialBuilder::default()
            .with_min_delay(self.retry_min)
            .with_max_delay(self.retry_max)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times()
            .build()
            .nth(attempt.saturating_sub(1) as usize)
            .unwrap_or(self.retry_max)
    }
}

/// What the notifier needs.
#[derive(Clone)]
pub struct Context {
    pub pool: PgPool,
    pub js: async_nats::jetstream::Context,
    pub catalog: Arc<common::providers::Catalog>,
    pub signer: Signer,
    pub http: reqwest::Client,
}

/// How often the notifier looks for gates waiting and breakers left open.
const LOOK_EVERY: Duration = Duration::from_secs(5);

/// Queues and sends notifications until `leading` is cancelled.
pub async fn run(ctx: Context, settings: Settings, leading: CancellationToken) {
    let mut health = common::telemetry::Health::default();
    // Gates and breakers are looked at every few seconds; due deliveries
    // (job events the trigger queued, retries) at every turn.
    let mut looked = Instant::now() - LOOK_EVERY;
    loop {
        let look = looked.elapsed() >= LOOK_EVERY;
        if look {
            looked = Instant::now();
        }
        let step = async {
            if look {
                queue_gates(&ctx.pool).await?;
                queue_breakers(&ctx, settings.breaker_after).await?;
            }
            deliver_due(&ctx, &settings).await
        };
        match step.await {
            Ok(()) => health.ok("sending notifications"),
            Err(e) => health.failed("sending notifications", &e),
        }
        tokio::select! {
            _ = leading.cancelled() => break,
            _ = tokio::time::sleep(settings.every) => {}
        }
    }
}

/// `review.ready` for running jobs whose every item still to do waits at a
/// gate: no chunk is left to run and some answer is held.
async fn queue_gates(pool: &PgPool) -> Result<(), Error> {
    sqlx::query!(
        "SELECT queue_job_webhooks(j.id, 'review.ready', 'gate',
                                   jsonb_build_object('held', (SELECT count(*) FROM stage_results s
                                                               WHERE s.job_id = j.id AND s.state = 'held')))
         FROM jobs j
         WHERE j.state = 'running'
           AND EXISTS (SELECT 1 FROM webhooks w WHERE w.job_id = j.id OR w.project = j.project)
           AND EXISTS (SELECT 1 FROM stage_results s WHERE s.job_id = j.id AND s.state = 'held')
           AND NOT EXISTS (SELECT 1 FROM chunks c WHERE c.job_id = j.id AND c.state = 'pending')
           AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.job_id = j.id AND d.occurrence = 'gate')"
    )
    .fetch_all(pool)
    .await
    .doing("queueing review notifications")?;
    Ok(())
}

/// `breaker.open` for running jobs with webhooks whose models have a
/// breaker open longer than `after`, once per opening.
async fn queue_breakers(ctx: &Context, after: Duration) -> Result<(), Error> {
    let jobs = sqlx::query!(
        r#"SELECT j.id, j.spec AS "spec: sqlx::types::Json<common::spec::JobSpec>",
                  j.stage_files AS "stage_files: sqlx::types::Json<Vec<common::stages::StageFiles>>"
           FROM jobs j
           WHERE j.state = 'running'
             AND EXISTS (SELECT 1 FROM webhooks w WHERE w.job_id = j.id OR w.project = j.project)"#
    )
    .fetch_all(&ctx.pool)
    .await
    .doing("reading running jobs for breaker notifications")?;
    if jobs.is_empty() {
        return Ok(());
    }
    let kv = common::nats::ensure_state_bucket(&ctx.js).await?;
    let mut open = Vec::new();
    let mut keys = kv.keys().await.map_err(|e| {
        Error::Nats(common::nats::NatsError::Kv { bucket: common::nats::STATE_BUCKET, source: Box::new(e) })
    })?;
    while let Some(key) = keys.next().await {
        let Ok(key) = key else { continue };
        let Some(model) = common::nats::breaker_model(&key).map(str::to_string) else { continue };
        let Ok(Some(bytes)) = kv.get(&key).await else { continue };
        let Ok(state) = serde_json::from_slice::<common::nats::BreakerState>(&bytes) else { continue };
        let now_ms = chrono::Utc::now().timestamp_millis().max(0) as u64;
        if state.open && now_ms.saturating_sub(state.opened_at_ms) >= after.as_millis() as u64 {
            open.push((key, model, state));
        }
    }
    for job in jobs {
        let kind = common::spec::JobKind {
            spec: job.spec.0,
            template: String::new(),
            schema: Value::Null,
            stage_files: job.stage_files.0,
        };
        let models: Vec<String> = kind
            .models()
            .iter()
            .filter_map(|m| ctx.catalog.resolve(m).ok().map(|t| common::nats::key_part(t.model)))
            .collect();
        for (key, model, state) in open.iter().filter(|(_, m, _)| models.contains(m)) {
            let since = chrono::DateTime::from_timestamp_millis(state.opened_at_ms as i64).unwrap_or_default();
            let detail = json!({"breaker": key, "model": model, "open_since": since, "failures": state.failures});
            sqlx::query!(
                "SELECT queue_job_webhooks($1, 'breaker.open', $2, $3)",
                job.id,
                format!("breaker:{key}@{}", state.opened_at_ms),
                detail
            )
            .fetch_one(&ctx.pool)
            .await
            .doing("queueing breaker notifications")?;
        }
    }
    Ok(())
}

/// One delivery claimed for an attempt.
struct Due {
    id: i64,
    message_id: Uuid,
    job_id: Uuid,
    project: String,
    event: String,
    detail: Value,
    payload: Option<Value>,
    attempts: i32,
    url: String,
    format: WebhookFormat,
}

/// Claims the due deliveries (for a minute, so another coordinator does not
/// take them meanwhile) and makes one attempt at each.
async fn deliver_due(ctx: &Context, settings: &Settings) -> Result<(), Error> {
    let claim_s = (settings.timeout.as_secs_f64() * 2.0).max(60.0);
    let due: Vec<Due> = sqlx::query!(
        r#"WITH due AS (
               SELECT id FROM webhook_deliveries WHERE state = 'pending' AND next_at <= now()
               ORDER BY next_at LIMIT 32 FOR UPDATE SKIP LOCKED)
           UPDATE webhook_deliveries d SET next_at = now() + make_interval(secs => $1)
           FROM due, webhooks w, jobs j
           WHERE d.id = due.id AND w.id = d.webhook_id AND j.id = d.job_id
           RETURNING d.id, d.message_id, d.job_id, j.project, d.event, d.detail, d.payload, d.attempts, w.url, w.format"#,
        claim_s
    )
    .fetch_all(&ctx.pool)
    .await
    .doing("claiming due notifications")?
    .into_iter()
    .map(|r| Due {
        id: r.id,
        message_id: r.message_id,
        job_id: r.job_id,
        project: r.project,
        event: r.event,
        detail: r.detail,
        payload: r.payload,
        attempts: r.attempts,
        url: r.url,
        format: WebhookFormat::parse(&r.format),
    })
    .collect();
    let results = futures::future::join_all(due.into_iter().map(|d| attempt(ctx, settings, d))).await;
    results.into_iter().collect()
}

/// The body of a delivery: Standard Webhooks' envelope around the job's
/// status, or a line of text for Slack.
async fn payload(pool: &PgPool, d: &Due) -> Result<Value, Error> {
    let status = store::status(pool, d.job_id).await?;
    Ok(match d.format {
        WebhookFormat::Json => json!({
            "type": d.event,
            "timestamp": chrono::Utc::now(),
            "data": {"job": status, "detail": d.detail},
        }),
        WebhookFormat::Slack => json!({"text": slack_text(&d.event, &status, &d.detail)}),
    })
}

fn slack_text(event: &str, s: &crate::model::JobStatus, detail: &Value) -> String {
    let job = format!("Sluice job {} ({})", s.job_id, s.kind);
    let counts = format!("{} answered, {} failed, {} to review", s.succeeded, s.failed, s.needs_review);
    match event {
        "job.completed" => format!("{job} completed: {counts}."),
        "job.failed" => format!("{job} failed ({}): {counts}.", detail["reason"].as_str().unwrap_or("?")),
        "job.paused" => format!(
            "{job} paused ({}): {counts}. Resume it with `sluice resume {}`.",
            detail["reason"].as_str().unwrap_or("?"),
            s.job_id
        ),
        "review.ready" => format!(
            "{job} is waiting for review: `sluice review export {}` (or the review page /review/{}).",
            s.job_id, s.job_id
        ),
        "breaker.open" => format!(
            "{job}: the circuit breaker of {} has been open since {}; its items wait.",
            detail["model"].as_str().unwrap_or("?"),
            detail["open_since"].as_str().unwrap_or("?")
        ),
        other => format!("{job}: {other}"),
    }
}

/// One attempt at a delivery, recorded whatever happens.
async fn attempt(ctx: &Context, settings: &Settings, d: Due) -> Result<(), Error> {
    const DOING: &str = "recording a notification attempt";
    let body = match &d.payload {
        Some(p) => p.clone(),
        None => {
            let p = payload(&ctx.pool, &d).await?;
            sqlx::query!("UPDATE webhook_deliveries SET payload = $2 WHERE id = $1 AND payload IS NULL", d.id, &p)
                .execute(&ctx.pool)
                .await
                .doing(DOING)?;
            p
        }
    };
    let body = serde_json::to_vec(&body).expect("a JSON value serialises");
    let id = format!("msg_{}", d.message_id.simple());
    let timestamp = chrono::Utc::now().timestamp();
    let started = Instant::now();
    let sent = ctx
        .http
        .post(&d.url)
        .timeout(settings.timeout)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header("webhook-id", &id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", ctx.signer.sign(&d.project, &id, timestamp, &body))
        .body(body)
        .send()
        .await;
    let (status, error) = match sent {
        Ok(r) if r.status().is_success() => (Some(r.status().as_u16() as i32), None),
        Ok(r) => {
            let code = r.status();
            let text = r.text().await.unwrap_or_default();
            let text: String = text.chars().take(200).collect();
            (Some(code.as_u16() as i32), Some(format!("the receiver answered {code}: {text}")))
        }
        Err(e) => (None, Some(common::error_chain(&e))),
    };
    let took = started.elapsed().as_millis().min(i32::MAX as u128) as i32;
    let attempt = d.attempts + 1;
    let (state, next) = match &error {
        None => ("delivered", 0.0),
        Some(_) if attempt as u32 >= settings.max_attempts => ("failed", 0.0),
        Some(_) => ("pending", settings.retry_delay(attempt as u32).as_secs_f64()),
    };
    if let Some(e) = &error {
        tracing::info!(delivery = d.id, job_id = %d.job_id, event = %d.event, url = %d.url, attempt, state, error = %e,
                       "webhook not delivered");
    }
    let mut tx = ctx.pool.begin().await.doing(DOING)?;
    sqlx::query!(
        "INSERT INTO webhook_attempts (delivery_id, attempt, status, error, duration_ms) VALUES ($1, $2, $3, $4, $5)",
        d.id,
        attempt,
        status,
        error.as_deref(),
        took
    )
    .execute(&mut *tx)
    .await
    .doing(DOING)?;
    sqlx::query!(
        "UPDATE webhook_deliveries SET attempts = $2, state = $3, last_status = $4, last_error = $5,
                next_at = now() + make_interval(secs => $6),
                delivered_at = CASE WHEN $3 = 'delivered' THEN now() END
         WHERE id = $1",
        d.id,
        attempt,
        state,
        status,
        error.as_deref(),
        next
    )
    .execute(&mut *tx)
    .await
    .doing(DOING)?;
    tx.commit().await.doing(DOING)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_follow_standard_webhooks() {
        // The example of the Standard Webhooks specification: secret
        // whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw, id msg_p5jXN8AQM9LWM0D4loKWxJek,
        // timestamp 1614265330, body {"test": 2432232314}.
        let key = base64::engine::general_purpose::STANDARD.decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(
            signature(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, br#"{"test": 2432232314}"#),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn urls_are_checked() {
        assert!(check_url("https://hooks.example.com/x").is_ok());
        assert!(check_url("http://127.0.0.1:9/").is_ok());
        assert!(check_url("ftp://example.com").unwrap_err().contains("http:// or https://"));
        assert!(check_url("example.com/hook").unwrap_err().contains("not a URL"));
    }

    #[test]
    fn retries_back_off_from_the_minimum() {
        let s = Settings {
            every: Duration::from_millis(500),
            timeout: Duration::from_secs(10),
            max_attempts: 10,
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(600),
            breaker_after: Duration::from_secs(300),
        };
        let first = s.retry_delay(1);
        assert!(first >= Duration::from_secs(1) && first <= Duration::from_secs(2), "{first:?}");
        let fifth = s.retry_delay(5);
        assert!(fifth >= Duration::from_secs(16) && fifth <= Duration::from_secs(32), "{fifth:?}");
        assert!(s.retry_delay(40) <= Duration::from_secs(1200));
    }
}
