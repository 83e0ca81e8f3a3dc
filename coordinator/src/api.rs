//! The coordinator's HTTP control API, used by the `sluice` CLI.

use std::sync::Arc;

use async_nats::jetstream;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tokio::sync::Notify;
use uuid::Uuid;

use crate::auth::{self, Actor, Principal, Role, Throttle, TokenSecret};
use crate::ingest::{self, Mode};
use crate::model::{ApiError, Created, Format, LabelStudioNames, NewJob};
use crate::{cache, label_studio, metrics as m, review, store, Error};
use common::prices::PriceTable;
use common::providers::{Catalog, Param, ProviderKind};
use common::spec::{ConfidenceStrategy, RequestSource};

/// Shared handles of the API handlers, the publisher and the reconciler.
#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub js: jetstream::Context,
    /// Wakes the publisher when a job has new chunks to publish.
    pub wake: Arc<Notify>,
    /// The providers and models the workers serve.
    pub catalog: Arc<Catalog>,
    pub prices: Arc<PriceTable>,
    /// Limits of one upload.
    pub limits: ingest::Limits,
    /// The chunk stream, declared again if JetStream loses it.
    pub stream: Arc<tokio::sync::Mutex<crate::publish::StreamWatch>>,
    /// The key of the API tokens' HMACs.
    pub secret: Arc<TokenSecret>,
    /// Failed authentications per address.
    pub throttle: Arc<Throttle>,
    /// Whether this replica is the leader, and its publisher's pulse.
    pub leader: Arc<crate::leader::Status>,
    /// Caps of jobs submitted without one (`--project-max-cost`).
    pub default_caps: Arc<crate::config::DefaultCaps>,
    /// Whether the API serves HTTPS (the review page's cookie is then `Secure`).
    pub https: bool,
}

impl AppState {
    pub fn new(
        pool: PgPool,
        js: jetstream::Context,
        catalog: Catalog,
        prices: PriceTable,
        config: &crate::ServeConfig,
        secret: TokenSecret,
    ) -> Self {
        m::describe();
        AppState {
            pool,
            js,
            wake: Arc::new(Notify::new()),
            catalog: Arc::new(catalog),
            prices: Arc::new(prices),
            limits: config.limits(),
            stream: Arc::new(tokio::sync::Mutex::new(crate::publish::StreamWatch::new(&config.nats_url))),
            secret: Arc::new(secret),
            throttle: Arc::new(Throttle::default()),
            leader: Arc::new(crate::leader::Status::new()),
            default_caps: Arc::new(config.default_caps()),
            https: config.tls_cert_file.is_some(),
        }
    }
}

/// The highest `temperature` the Anthropic Messages API accepts.
const ANTHROPIC_MAX_TEMPERATURE: f32 = 1.0;

/// Checks a job's models against the providers and the price table. Returns
/// warnings the user should see before anything runs.
pub fn check_models(catalog: &Catalog, prices: &PriceTable, job: &NewJob) -> Result<Vec<String>, Error> {
    let stages = &job.kind.spec.stages;
    if !stages.is_empty() {
        if job.mode().batches() {
            return Err(Error::Invalid(
                "a multi-stage job runs its calls live: provider batches do not take stages yet; submit with \
                 --mode live"
                    .into(),
            ));
        }
        // Each stage is checked as the kind of one stage it runs as.
        let mut warnings = Vec::new();
        for (i, stage) in stages.iter().enumerate() {
            let named = |m: String| format!("stages[{i}] ({}): {m}", stage.name);
            for member in job.kind.stage_callers(i) {
                let staged = NewJob { kind: member, ..job.clone() };
                match check_models(catalog, prices, &staged) {
                    Ok(w) => warnings.extend(w.into_iter().map(named)),
                    Err(Error::Invalid(m)) => return Err(Error::Invalid(named(m))),
                    Err(e) => return Err(e),
                }
            }
        }
        return Ok(warnings);
    }
    let spec = &job.kind.spec;
    let mut warnings = Vec::new();
    for (i, reference) in spec.models().enumerate() {
        let target = catalog.resolve(reference).map_err(|msg| {
            Error::Invalid(format!("{} {reference:?}: {msg}", if i == 0 { "model" } else { "fallback model" }))
        })?;
        let provider_kind = catalog.providers.get(target.provider).map(|p| p.kind);
        let anthropic = provider_kind == Some(ProviderKind::Anthropic);
        if job.mode().batches() && i == 0 && provider_kind == Some(ProviderKind::AzureOpenai) {
            return Err(Error::Invalid(format!(
                "model {reference:?} is served by {}, an Azure OpenAI provider, whose batches Sluice does not use: \
                 submit with --mode live, or pick a model of an OpenAI, OpenAI-compatible or Anthropic provider",
                target.provider
            )));
        }
        // Anthropic's Messages API: "Defaults to 1.0. Ranges from 0.0 to 1.0"
        // (its API reference and SDKs); OpenAI's reaches 2 (checked with the kind).
        if anthropic && spec.temperature > ANTHROPIC_MAX_TEMPERATURE {
            return Err(Error::Invalid(format!(
                "temperature = {} is over {ANTHROPIC_MAX_TEMPERATURE}, the most the Anthropic Messages API accepts, \
                 and {} {reference:?} is served by {}, an Anthropic provider: lower temperature in job.toml",
                spec.temperature,
                if i == 0 { "model" } else { "fallback model" },
                target.provider
            )));
        }
        if spec.request == RequestSource::OpenaiBatch && anthropic {
            return Err(Error::Invalid(format!(
                "model {reference:?} is served by {}, an Anthropic provider: an OpenAI batch file's bodies go only to \
                 an OpenAI-dialect provider; pick another model with --model",
                target.provider
            )));
        }
        if prices.get(target.provider, target.model).is_none() {
            if !job.allow_unpriced {
                let mut priced: Vec<&str> = prices.models.keys().map(String::as_str).collect();
                priced.sort_unstable();
                let near = prices.closest(target.model);
                let hint = if near.is_empty() { String::new() } else { format!(" Did you mean {}?", near.join(", ")) };
                return Err(Error::Invalid(format!(
                    "model {reference:?} has no price in the price table (priced: {}); add it to SLUICE_PRICES_FILE, or submit with --allow-unpriced and its cost will show as unknown.{hint}",
                    if priced.is_empty() { "none".to_string() } else { priced.join(", ") }
                )));
            }
            warnings.push(format!("model {reference:?} has no price: the job's cost will be unknown"));
        }
        if i == 0 && spec.scores_confidence() {
            let first = spec.strategies().find(|s| match s {
                ConfidenceStrategy::Logprobs => target.config.supports(Param::Logprobs),
                _ => true,
            });
            if first == Some(ConfidenceStrategy::Agreement) && !target.config.supports(Param::N) {
                warnings.push(format!(
                    "{} cannot sample several answers in one call: agreement makes {} calls per item, with {}× the cost",
                    target.reference(),
                    spec.samples,
                    spec.samples
                ));
            }
            let usable = first.is_some();
            if !usable {
                warnings.push(format!(
                    "every item would go to review: {} cannot give what the kind's confidence strategies ({}) need; add \"agreement\", or \"self_reported\" with a confidence field in the schema",
                    target.reference(),
                    spec.strategies().map(|s| format!("{s:?}").to_lowercase()).collect::<Vec<_>>().join(", ")
                ));
            }
        }
    }
    Ok(warnings)
}

/// The API: every `/v1` route behind [`auth::guard`], which checks the
/// caller's token against `auth::ENDPOINTS`.
pub fn router(state: AppState) -> Router {
    let v1 = Router::new()
        .route("/v1/whoami", get(whoami))
        .route("/v1/tokens", get(list_tokens).post(create_token))
        .route("/v1/tokens/{id}/revoke", post(revoke_token))
        .route("/v1/admin/prune", post(prune))
        .route("/v1/jobs", post(create_job).get(list_jobs))
        .route("/v1/jobs/{id}", get(job_status))
        .route("/v1/jobs/{id}/input", put(upload_input))
        .route("/v1/jobs/{id}/cancel", post(cancel_job))
        .route("/v1/jobs/{id}/resume", post(resume_job))
        .route("/v1/jobs/{id}/results", get(results))
        .route("/v1/jobs/{id}/review", get(review_export).post(review_import))
        .route("/v1/jobs/{id}/review/label-studio-config", get(label_studio_config))
        .route("/v1/jobs/{id}/review/stats", get(review_stats))
        .route("/v1/jobs/{id}/notifications", get(job_notifications))
        .route("/v1/webhooks", get(list_webhooks).post(add_webhook))
        .route("/v1/webhooks/{id}", axum::routing::delete(remove_webhook))
        .route("/v1/webhooks/secret", get(webhook_secret))
        .route("/v1/estimate", post(estimate_lookup))
        .route("/v1/cache", get(cache_stats).delete(cache_purge))
        .merge(crate::review_page::routes())
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth::guard));
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/review/login", post(crate::review_page::login))
        .route("/readyz", get(readyz))
        .merge(v1)
        // Decision files are read whole (they are validated before anything is applied).
        .layer(axum::extract::DefaultBodyLimit::max(256 * 1024 * 1024))
        .with_state(state)
}

/// What `/readyz` reports: each dependency, and this replica's part.
#[derive(Debug, Serialize, Deserialize)]
pub struct Readiness {
    pub ready: bool,
    /// `ok`, or why Postgres did not answer.
    pub postgres: String,
    /// `ok`, or the state of the NATS connection.
    pub nats: String,
    /// Whether this replica holds the leader lease.
    pub leader: bool,
    /// `running` or `stuck` on the leader; `elsewhere` on the other replicas.
    pub publisher: String,
}

/// Ready when Postgres and NATS answer and, on the leader, the publisher
/// turns: 200 with the details, else 503 with them. `/healthz` is the
/// liveness check: it answers while the process serves at all.
async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Readiness>) {
    let r = readiness(&state).await;
    (if r.ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, Json(r))
}

/// This replica's readiness (served on `/readyz` of the API and of the metrics address).
pub async fn readiness(state: &AppState) -> Readiness {
    let (postgres, nats) = common::telemetry::dependencies(&state.pool, &state.js.client()).await;
    let leader = state.leader.is_leader();
    let publisher = match (leader, state.leader.publisher_running()) {
        (false, _) => "elsewhere",
        (true, true) => "running",
        (true, false) => "stuck",
    };
    let ready = postgres == "ok" && nats == "ok" && publisher != "stuck";
    Readiness { ready, postgres, nats, leader, publisher: publisher.into() }
}

impl Error {
    /// The HTTP status an API client gets for this error.
    pub fn status(&self) -> StatusCode {
        match self {
            Error::JobNotFound(_) | Error::TokenNotFound(_) => StatusCode::NOT_FOUND,
            Error::Forbidden(_) => StatusCode::FORBIDDEN,
            Error::JobState { .. } | Error::StillNeeded { .. } => StatusCode::CONFLICT,
            Error::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Error::TooManyJobs(_) => StatusCode::TOO_MANY_REQUESTS,
            Error::Spec(_) | Error::Upload(_) | Error::Invalid(_) => StatusCode::BAD_REQUEST,
            Error::Db(e) if e.is_unavailable() => StatusCode::SERVICE_UNAVAILABLE,
            Error::Nats(_) | Error::Publish { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Error::Db(_) | Error::Config(_) | Error::Migrate(_) | Error::Bind { .. } | Error::Unguarded => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }
}

impl IntoResponse for Error {
    /// A client error says what was wrong with the request. A server error
    /// says only what kind of trouble it is and a request id: the details
    /// (addresses, SQL, the error chain) go to the coordinator's log under
    /// that id.
    fn into_response(self) -> Response {
        let status = self.status();
        let body = if status.is_server_error() {
            let request_id = uuid::Uuid::now_v7();
            tracing::error!(%request_id, error = &self as &dyn std::error::Error, "request failed");
            let what = if status == StatusCode::SERVICE_UNAVAILABLE {
                "the coordinator cannot reach Postgres or NATS right now; try again shortly"
            } else {
                "internal error"
            };
            ApiError {
                error: format!("{what} (request id {request_id}: the coordinator's log has the details)"),
                report: None,
                request_id: Some(request_id),
            }
        } else {
            ApiError { error: common::error_chain(&self), report: None, request_id: None }
        };
        (status, Json(body)).into_response()
    }
}

async fn whoami(principal: Principal) -> Json<Principal> {
    Json(principal)
}

async fn list_tokens(State(st): State<AppState>) -> Result<impl IntoResponse, Error> {
    Ok(Json(auth::list(&st.pool).await?))
}

async fn create_token(
    State(st): State<AppState>,
    actor: Actor,
    Json(new): Json<auth::NewToken>,
) -> Result<impl IntoResponse, Error> {
    Ok((StatusCode::CREATED, Json(auth::create(&st.pool, &st.secret, &new, &actor.name).await?)))
}

async fn revoke_token(
    State(st): State<AppState>,
    actor: Actor,
    Path(token_id): Path<Uuid>,
) -> Result<impl IntoResponse, Error> {
    Ok(Json(auth::revoke(&st.pool, token_id, &actor.name).await?))
}

async fn prune(
    State(st): State<AppState>,
    actor: Actor,
    Json(req): Json<crate::model::PruneRequest>,
) -> Result<impl IntoResponse, Error> {
    let pruned = crate::history::prune(&st.pool, req.before, &actor.name, req.dry_run).await?;
    if !pruned.dry_run {
        tracing::info!(before = %req.before, boundary = %pruned.boundary, jobs = pruned.jobs,
                       partitions = pruned.partitions.len(), by = %actor.name, "history pruned");
    }
    Ok(Json(pruned))
}

async fn create_job(
    State(st): State<AppState>,
    principal: Principal,
    actor: Actor,
    Json(mut job): Json<NewJob>,
) -> Result<impl IntoResponse, Error> {
    let project = job.project.clone().unwrap_or_else(|| principal.project.clone());
    auth::check_project(&project)?;
    if !principal.sees(&project) {
        return Err(Error::Forbidden(format!(
            "your token (project {}) may not submit jobs to project {project}: only an admin token may",
            principal.project
        )));
    }
    job.kind.validate()?;
    for hook in &job.notify {
        crate::notify::check_url(&hook.url).map_err(Error::Invalid)?;
    }
    if let Some(t) = job.review_below {
        if !(0.0..=1.0).contains(&t) {
            return Err(Error::Invalid(format!("review_below must be within 0..=1, got {t}")));
        }
    }
    if let Some(c) = job.max_cost_usd {
        check_cap(c)?;
    }
    // The project's default cap, when the job brings none.
    let default_cap = job.max_cost_usd.is_none().then(|| st.default_caps.of(&project)).flatten();
    job.max_cost_usd = job.max_cost_usd.or(default_cap);
    if job.cache_ttl_s == Some(0) {
        return Err(Error::Invalid("cache_ttl_s must be at least 1 second".into()));
    }
    match (job.mode(), job.deadline_s) {
        (common::state::JobMode::Auto, Some(0)) => {
            return Err(Error::Invalid("a deadline must be at least 1 second away".into()))
        }
        (common::state::JobMode::Live | common::state::JobMode::Batch, Some(_)) => {
            return Err(Error::Invalid(
                "a deadline is for --mode auto, which goes live near it; batch mode waits for the provider, live mode \
                 does not wait"
                    .into(),
            ))
        }
        _ => {}
    }
    let warnings = check_models(&st.catalog, &st.prices, &job)?;
    if job.max_cost_usd.is_some() {
        let unpriced = job
            .kind
            .models()
            .into_iter()
            .find(|m| st.catalog.resolve(m).map_or(true, |t| st.prices.get(t.provider, t.model).is_none()));
        if let Some(m) = unpriced {
            let whose = match default_cap {
                Some(c) => {
                    format!("project {project} caps its jobs at ${c:.2} by default (SLUICE_PROJECT_MAX_COST), and")
                }
                None => "a spending cap needs every model priced, and".to_string(),
            };
            return Err(Error::Invalid(format!("{whose} {m:?} has no price: add it to SLUICE_PRICES_FILE")));
        }
    }
    let job_id = store::create_job(&st.pool, &job, &project, st.limits.max_active_jobs, &actor).await?;
    tracing::info!(%job_id, kind = %job.kind.spec.kind, "job created");
    Ok((StatusCode::CREATED, Json(Created { job_id, warnings })))
}

/// Refuses a spending cap that is not a positive number of dollars.
fn check_cap(c: f64) -> Result<(), Error> {
    if c.is_finite() && c > 0.0 {
        Ok(())
    } else {
        Err(Error::Invalid(format!("a spending cap must be a positive number of dollars, got {c}")))
    }
}

/// The project a request names, if the token may act on it (its own by default).
fn project_of(principal: &Principal, named: Option<String>) -> Result<String, Error> {
    let project = named.unwrap_or_else(|| principal.project.clone());
    if !principal.sees(&project) {
        return Err(Error::Forbidden(format!(
            "your token (project {}) may not use project {project}'s cache: only an admin token may",
            principal.project
        )));
    }
    Ok(project)
}

async fn estimate_lookup(
    State(st): State<AppState>,
    principal: Principal,
    Json(req): Json<cache::LookupRequest>,
) -> Result<impl IntoResponse, Error> {
    let project = project_of(&principal, req.project.clone())?;
    Ok(Json(cache::lookup(&st.pool, &st.catalog, &project, &req).await?))
}

#[derive(Deserialize)]
struct CacheParams {
    project: Option<String>,
    /// Purge only entries older than this many seconds.
    older_than_s: Option<u64>,
}

async fn cache_stats(
    State(st): State<AppState>,
    principal: Principal,
    Query(p): Query<CacheParams>,
) -> Result<impl IntoResponse, Error> {
    let project = project_of(&principal, p.project)?;
    Ok(Json(cache::stats(&st.pool, &project).await?))
}

async fn cache_purge(
    State(st): State<AppState>,
    principal: Principal,
    Query(p): Query<CacheParams>,
) -> Result<impl IntoResponse, Error> {
    let project = project_of(&principal, p.project)?;
    let deleted = cache::purge(&st.pool, &project, p.older_than_s).await?;
    tracing::info!(%project, deleted, by = %principal.name, "response cache purged");
    Ok(Json(serde_json::json!({"project": project, "deleted": deleted})))
}

#[derive(Deserialize)]
struct InputParams {
    #[serde(default)]
    skip_invalid: bool,
}

async fn upload_input(
    State(st): State<AppState>,
    actor: Actor,
    Path(job_id): Path<Uuid>,
    Query(p): Query<InputParams>,
    body: Body,
) -> Result<Response, Error> {
    let spec = store::job_spec(&st.pool, job_id).await?;
    let mode = if p.skip_invalid { Mode::SkipInvalid } else { Mode::Strict };
    let reuse = store::job_reuses(&st.pool, job_id).await?;
    let body = body.into_data_stream();
    let report = ingest::ingest(&st.pool, job_id, &spec, reuse, mode, st.limits, body).await?;
    if report.state == "rejected" {
        tracing::info!(%job_id, invalid = report.invalid_lines, "input rejected");
        let error = format!("input rejected: {} invalid line(s); nothing was ingested", report.invalid_lines);
        return Ok((
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(ApiError { error, report: Some(report), request_id: None }),
        )
            .into_response());
    }
    tracing::info!(%job_id, items = report.items, chunks = report.chunks, secs = report.ingest_seconds, "input ingested");
    let detail =
        serde_json::json!({"items": report.items, "chunks": report.chunks, "invalid_lines": report.invalid_lines});
    store::event(&st.pool, job_id, "chunked", &actor, detail).await?;
    // The publisher sends the chunks; Postgres already holds everything.
    st.wake.notify_one();
    Ok(Json(report).into_response())
}

async fn job_status(State(st): State<AppState>, Path(job_id): Path<Uuid>) -> Result<impl IntoResponse, Error> {
    Ok(Json(store::status(&st.pool, job_id).await?))
}

#[derive(Deserialize)]
struct ListParams {
    #[serde(default = "default_limit")]
    limit: i64,
    /// For an admin token: only this project's jobs (otherwise every project's).
    project: Option<String>,
}
fn default_limit() -> i64 {
    20
}

async fn list_jobs(
    State(st): State<AppState>,
    principal: Principal,
    Query(p): Query<ListParams>,
) -> Result<impl IntoResponse, Error> {
    let project = if principal.role == Role::Admin { p.project } else { Some(principal.project) };
    Ok(Json(store::list_jobs(&st.pool, project.as_deref(), p.limit.clamp(1, 1000)).await?))
}

async fn cancel_job(
    State(st): State<AppState>,
    actor: Actor,
    Path(job_id): Path<Uuid>,
) -> Result<impl IntoResponse, Error> {
    store::cancel(&st.pool, job_id, &actor).await?;
    metrics::counter!(m::JOBS_FINISHED, "state" => "cancelled").increment(1);
    Ok(Json(store::status(&st.pool, job_id).await?))
}

#[derive(Deserialize)]
struct ResumeParams {
    #[serde(default)]
    failed_only: bool,
    /// A new spending cap in dollars.
    max_cost: Option<f64>,
}

async fn resume_job(
    State(st): State<AppState>,
    actor: Actor,
    Path(job_id): Path<Uuid>,
    Query(p): Query<ResumeParams>,
) -> Result<impl IntoResponse, Error> {
    if let Some(c) = p.max_cost {
        check_cap(c)?;
    }
    let resumed = store::resume(&st.pool, job_id, p.failed_only, p.max_cost, st.limits.max_active_jobs, &actor).await?;
    tracing::info!(%job_id, failed_reset = resumed.failed_reset, chunks = resumed.chunks, "job resumed");
    st.wake.notify_one();
    Ok(Json(resumed))
}

#[derive(Deserialize)]
struct ResultParams {
    #[serde(default = "default_format")]
    format: String,
}
fn default_format() -> String {
    "jsonl".into()
}

/// CSV columns of a result export.
pub const CSV_HEADER: &str =
    "id,state,answer,answer_source,model_answer,confidence,error_class,error,model,attempts,template_hash,cost_usd\n";

#[derive(Deserialize)]
struct ReviewParams {
    below: Option<f64>,
    #[serde(default = "default_format")]
    format: String,
    /// Label Studio's control name (`format=label-studio`).
    control: Option<String>,
    /// Label Studio's object name (`format=label-studio`).
    object: Option<String>,
}

async fn review_export(
    State(st): State<AppState>,
    actor: Actor,
    Path(job_id): Path<Uuid>,
    Query(p): Query<ReviewParams>,
) -> Result<Response, Error> {
    let format =
        Format::parse(&p.format, &[Format::Jsonl, Format::Csv, Format::LabelStudio]).map_err(Error::Invalid)?;
    let spec = store::job_spec(&st.pool, job_id).await?;
    let names = LabelStudioNames { control: p.control, object: p.object };
    let names = label_studio::Names::for_kind(&spec, &names).map_err(Error::Invalid)?;
    let items = review::queue(&st.pool, job_id, p.below).await?;
    let body = review::render(&items, format, job_id, &spec, &names);
    let detail = serde_json::json!({"what": "review", "format": p.format, "below": p.below, "items": items.len()});
    store::event(&st.pool, job_id, "exported", &actor, detail).await?;
    Ok(([(header::CONTENT_TYPE, format.content_type())], body).into_response())
}

#[derive(Deserialize)]
struct ImportParams {
    #[serde(default = "default_format")]
    format: String,
    #[serde(default)]
    source: Option<String>,
    /// Label Studio's control name, to read an export of its own.
    control: Option<String>,
}

/// The project a webhook call is about: the one named (an admin may name
/// any), else the token's.
fn webhook_project(principal: &Principal, named: Option<String>) -> Result<String, Error> {
    let project = named.unwrap_or_else(|| principal.project.clone());
    auth::check_project(&project)?;
    if !principal.sees(&project) {
        return Err(Error::Forbidden(format!(
            "your token (project {}) may not manage the webhooks of project {project}: only an admin token may",
            principal.project
        )));
    }
    Ok(project)
}

async fn add_webhook(
    State(st): State<AppState>,
    principal: Principal,
    actor: Actor,
    Json(hook): Json<crate::model::NewWebhook>,
) -> Result<(StatusCode, Json<crate::model::Webhook>), Error> {
    crate::notify::check_url(&hook.url).map_err(Error::Invalid)?;
    let project = webhook_project(&principal, hook.project.clone())?;
    let added = crate::notify::add_project_webhook(&st.pool, &project, &hook, &actor).await?;
    tracing::info!(id = added.id, %project, "webhook added");
    Ok((StatusCode::CREATED, Json(added)))
}

#[derive(Deserialize)]
struct ProjectParams {
    project: Option<String>,
}

async fn list_webhooks(
    State(st): State<AppState>,
    principal: Principal,
    Query(p): Query<ProjectParams>,
) -> Result<Json<Vec<crate::model::Webhook>>, Error> {
    // An admin without a project named sees every project's.
    let project = match (&p.project, principal.role) {
        (None, Role::Admin) => None,
        _ => Some(webhook_project(&principal, p.project)?),
    };
    Ok(Json(crate::notify::list(&st.pool, project.as_deref()).await?))
}

async fn remove_webhook(
    State(st): State<AppState>,
    principal: Principal,
    Path(id): Path<i64>,
) -> Result<StatusCode, Error> {
    let project = (principal.role != Role::Admin).then(|| principal.project.clone());
    if crate::notify::remove(&st.pool, id, project.as_deref()).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(Error::Invalid(format!("no webhook {id} in your project: `sluice webhooks list` shows them")))
    }
}

async fn webhook_secret(
    State(st): State<AppState>,
    principal: Principal,
    Query(p): Query<ProjectParams>,
) -> Result<Json<crate::model::WebhookSecret>, Error> {
    let project = webhook_project(&principal, p.project)?;
    let secret = crate::notify::Signer::new(st.secret.clone()).secret(&project);
    Ok(Json(crate::model::WebhookSecret { project, secret }))
}

async fn job_notifications(
    State(st): State<AppState>,
    Path(job_id): Path<Uuid>,
) -> Result<Json<Vec<crate::model::WebhookDelivery>>, Error> {
    store::job_spec(&st.pool, job_id).await?;
    Ok(Json(crate::notify::deliveries(&st.pool, job_id).await?))
}

#[derive(Deserialize)]
struct StatsParams {
    /// Suggest the threshold that meets this precision.
    precision: Option<f64>,
}

/// Agreement between reviewers and the model by confidence band.
async fn review_stats(
    State(st): State<AppState>,
    _actor: Actor,
    Path(job_id): Path<Uuid>,
    Query(p): Query<StatsParams>,
) -> Result<Json<crate::model::ReviewStats>, Error> {
    if let Some(t) = p.precision.filter(|t| !(0.0..=1.0).contains(t)) {
        return Err(Error::Invalid(format!("precision must be within 0..=1, got {t}")));
    }
    Ok(Json(review::stats(&st.pool, job_id, p.precision).await?))
}

/// The Label Studio labeling config for a job's review queue (XML).
async fn label_studio_config(
    State(st): State<AppState>,
    _actor: Actor,
    Path(job_id): Path<Uuid>,
    Query(names): Query<LabelStudioNames>,
) -> Result<Response, Error> {
    let spec = store::job_spec(&st.pool, job_id).await?;
    let names = label_studio::Names::for_kind(&spec, &names).map_err(Error::Invalid)?;
    Ok(([(header::CONTENT_TYPE, "application/xml")], label_studio::config(&spec, &names)).into_response())
}

async fn review_import(
    State(st): State<AppState>,
    actor: Actor,
    Path(job_id): Path<Uuid>,
    Query(p): Query<ImportParams>,
    body: axum::body::Bytes,
) -> Result<Response, Error> {
    let format = Format::parse(&p.format, &[Format::Jsonl, Format::Csv]).map_err(Error::Invalid)?;
    let csv_format = format == Format::Csv;
    let source = p.source.unwrap_or_else(|| format!("upload.{}", p.format));
    let names = LabelStudioNames { control: p.control, object: None };
    let report = review::import(&st.pool, job_id, &body, csv_format, &source, &actor, &names).await?;
    if !report.errors.is_empty() {
        let error = format!("{} bad line(s) in the decisions; nothing was applied", report.errors.len());
        let body = serde_json::json!({"error": error, "import": report});
        return Ok((StatusCode::UNPROCESSABLE_ENTITY, Json(body)).into_response());
    }
    Ok(Json(report).into_response())
}

async fn results(
    State(st): State<AppState>,
    actor: Actor,
    Path(job_id): Path<Uuid>,
    Query(p): Query<ResultParams>,
) -> Result<Response, Error> {
    let format =
        Format::parse(&p.format, &[Format::Jsonl, Format::Csv, Format::OpenaiBatch]).map_err(Error::Invalid)?;
    // Fails with 404 before streaming if the job does not exist.
    let answer_field = store::job_spec(&st.pool, job_id).await?.answer_field;
    store::event(&st.pool, job_id, "exported", &actor, serde_json::json!({"what": "results", "format": p.format}))
        .await?;
    let pool = st.pool.clone();
    let rows = async_stream_rows(pool, job_id, format, answer_field);
    Ok(([(header::CONTENT_TYPE, format.content_type())], Body::from_stream(rows)).into_response())
}

fn async_stream_rows(
    pool: PgPool,
    job_id: Uuid,
    format: Format,
    answer_field: String,
) -> impl futures::Stream<Item = Result<Vec<u8>, Error>> + Send + 'static {
    let header = (format == Format::Csv).then(|| Ok(CSV_HEADER.as_bytes().to_vec()));
    // Keyset pagination keeps memory bounded whatever the job's size.
    let pages = futures::stream::try_unfold(Some(0i64), move |after| {
        let (pool, answer_field) = (pool.clone(), answer_field.clone());
        async move {
            let Some(after) = after else { return Ok(None) };
            let page = store::results_page(&pool, job_id, after, 2_000).await?;
            if page.is_empty() {
                return Ok(None);
            }
            let last = page.last().map(|(seq, _)| *seq);
            let mut out = Vec::with_capacity(page.len() * 200);
            for (seq, row) in &page {
                match format {
                    Format::Csv => write_csv_row(&mut out, row),
                    Format::OpenaiBatch => {
                        crate::openai_batch::write_output_line(&mut out, job_id, *seq, row, &answer_field)
                    }
                    _ => {
                        serde_json::to_writer(&mut out, row).expect("result row serialises");
                        out.push(b'\n');
                    }
                }
            }
            Ok(Some((out, last)))
        }
    });
    futures::stream::iter(header).chain(pages)
}

fn write_csv_row(out: &mut Vec<u8>, r: &store::ResultRow) {
    let mut w = csv::WriterBuilder::new().has_headers(false).from_writer(Vec::new());
    let confidence = r.confidence.map(|c| format!("{c:.4}")).unwrap_or_default();
    let attempts = r.attempts.to_string();
    let cost = r.cost_usd.map(|c| format!("{c:.8}")).unwrap_or_default();
    w.write_record([
        r.id.as_str(),
        r.state.as_str(),
        r.answer.as_deref().unwrap_or(""),
        r.answer_source.as_deref().unwrap_or(""),
        r.model_answer.as_deref().unwrap_or(""),
        confidence.as_str(),
        r.error_class.as_deref().unwrap_or(""),
        r.error.as_deref().unwrap_or(""),
        r.model.as_deref().unwrap_or(""),
        attempts.as_str(),
        r.template_hash.as_str(),
        cost.as_str(),
    ])
    .expect("writing to memory");
    out.extend_from_slice(&w.into_inner().expect("writing to memory"));
}
