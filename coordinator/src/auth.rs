//! Who is calling the API and what they may do: API tokens (stored as HMACs), the role × endpoint table, projects, and the slow-down of repeated failed authentication.
//!
//! Every `/v1` request passes [`guard`] before its handler runs:
//!
//! 1. an address with too many recent failures waits (429, `Retry-After`);
//! 2. `Authorization: Bearer <token>` must name a token that is neither
//!    expired nor revoked (401 otherwise);
//! 3. the token's role must reach the endpoint's least role in [`ENDPOINTS`]
//!    (403 otherwise);
//! 4. a job of another project answers exactly as a job that does not exist
//!    (404), unless the token is an admin's.
//!
//! Refusals are written to `audit_access` (never the token) and counted in
//! `sluice_api_denied_total`. The handler then finds the [`Principal`] in the
//! request, and records it, not what the client claims, as the [`Actor`].

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, FromRequestParts, MatchedPath, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use sqlx::PgPool;
use uuid::Uuid;

use common::db::Doing;
pub use common::state::Role;

use crate::api::AppState;
use crate::model::ApiError;
use crate::{metrics as m, store, Error};

/// Every token starts with this, so a leaked one is easy to recognise and to scan for.
pub const TOKEN_PREFIX: &str = "sluice_";

/// The project of jobs and tokens when none is named.
pub const DEFAULT_PROJECT: &str = "default";

/// What a request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    WhoAmI,
    ListJobs,
    ReadJob,
    ReadResults,
    Submit,
    Cancel,
    Resume,
    ExportReview,
    ImportReview,
    ManageTokens,
    ReadCache,
    PurgeCache,
    ManageWebhooks,
    PruneHistory,
}

impl Action {
    /// What the action does, as an error message says it.
    pub fn describe(self) -> &'static str {
        match self {
            Action::WhoAmI => "ask whom it belongs to",
            Action::ListJobs => "list jobs",
            Action::ReadJob => "read a job's status",
            Action::ReadResults => "export results",
            Action::Submit => "submit jobs",
            Action::Cancel => "cancel jobs",
            Action::Resume => "resume jobs",
            Action::ExportReview => "export review queues",
            Action::ImportReview => "import review decisions",
            Action::ManageTokens => "manage tokens",
            Action::ReadCache => "read the response cache's figures",
            Action::PurgeCache => "purge the response cache",
            Action::ManageWebhooks => "manage webhooks and their signing secret",
            Action::PruneHistory => "prune old jobs' history",
        }
    }
}

/// One endpoint of the API and the least role that may call it.
#[derive(Debug, Clone, Copy)]
pub struct Endpoint {
    pub method: &'static str,
    /// The route as the router declares it.
    pub path: &'static str,
    pub action: Action,
    pub least: Role,
}

const fn ep(method: &'static str, path: &'static str, action: Action, least: Role) -> Endpoint {
    Endpoint { method, path, action, least }
}

/// The role × endpoint table: who may call what. A route of `/v1` missing
/// here is refused to every token.
pub const ENDPOINTS: &[Endpoint] = &[
    ep("GET", "/v1/whoami", Action::WhoAmI, Role::Reader),
    ep("GET", "/v1/jobs", Action::ListJobs, Role::Reader),
    ep("GET", "/v1/jobs/{id}", Action::ReadJob, Role::Reader),
    ep("GET", "/v1/jobs/{id}/results", Action::ReadResults, Role::Reader),
    ep("POST", "/v1/jobs", Action::Submit, Role::Submitter),
    ep("PUT", "/v1/jobs/{id}/input", Action::Submit, Role::Submitter),
    ep("POST", "/v1/jobs/{id}/cancel", Action::Cancel, Role::Submitter),
    ep("POST", "/v1/jobs/{id}/resume", Action::Resume, Role::Submitter),
    ep("GET", "/v1/jobs/{id}/review", Action::ExportReview, Role::Reviewer),
    ep("POST", "/v1/jobs/{id}/review", Action::ImportReview, Role::Reviewer),
    ep("GET", "/v1/jobs/{id}/review/label-studio-config", Action::ExportReview, Role::Reviewer),
    ep("GET", "/v1/jobs/{id}/review/stats", Action::ReadResults, Role::Reader),
    ep("GET", "/v1/jobs/{id}/notifications", Action::ManageWebhooks, Role::Submitter),
    ep("GET", "/review/{id}", Action::ExportReview, Role::Reviewer),
    ep("POST", "/review/{id}/decide", Action::ImportReview, Role::Reviewer),
    ep("POST", "/review/{id}/undo", Action::ImportReview, Role::Reviewer),
    ep("GET", "/v1/webhooks", Action::ManageWebhooks, Role::Submitter),
    ep("POST", "/v1/webhooks", Action::ManageWebhooks, Role::Submitter),
    ep("DELETE", "/v1/webhooks/{id}", Action::ManageWebhooks, Role::Submitter),
    ep("GET", "/v1/webhooks/secret", Action::ManageWebhooks, Role::Submitter),
    ep("POST", "/v1/estimate", Action::ReadCache, Role::Reader),
    ep("GET", "/v1/cache", Action::ReadCache, Role::Reader),
    ep("DELETE", "/v1/cache", Action::PurgeCache, Role::Submitter),
    ep("GET", "/v1/tokens", Action::ManageTokens, Role::Admin),
    ep("POST", "/v1/tokens", Action::ManageTokens, Role::Admin),
    ep("POST", "/v1/tokens/{id}/revoke", Action::ManageTokens, Role::Admin),
    ep("POST", "/v1/admin/prune", Action::PruneHistory, Role::Admin),
];

/// The entry of `ENDPOINTS` for a method and a declared route.
pub fn endpoint(method: &str, route: &str) -> Option<&'static Endpoint> {
    ENDPOINTS.iter().find(|e| e.method == method && e.path == route)
}

/// The holder of a valid token, as the guard found it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Principal {
    pub token_id: Uuid,
    /// Whom the token was made for (`--name` at creation).
    pub name: String,
    pub project: String,
    pub role: Role,
}

impl Principal {
    /// Whether the token may see the jobs of `project`.
    pub fn sees(&self, project: &str) -> bool {
        self.role == Role::Admin || self.project == project
    }

    /// Whether the token's role reaches `least`.
    pub fn has(&self, least: Role) -> bool {
        self.role.rank() >= least.rank()
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Principal {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Error> {
        parts.extensions.get::<Principal>().cloned().ok_or(Error::Unguarded)
    }
}

/// Who did something, as job events and review decisions record it.
#[derive(Debug, Clone)]
pub struct Actor {
    pub name: String,
    pub token_id: Option<Uuid>,
    /// What the client said about who is acting (`x-sluice-actor`): kept
    /// as a note beside the principal, never in its place.
    pub claimed: Option<String>,
}

impl<S: Send + Sync> FromRequestParts<S> for Actor {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Error> {
        let principal = Principal::from_request_parts(parts, state).await?;
        let claimed = parts
            .headers
            .get("x-sluice-actor")
            .and_then(|v| v.to_str().ok())
            .map(|s| s.chars().filter(|c| !c.is_control()).take(100).collect::<String>())
            .filter(|s| !s.is_empty() && *s != principal.name);
        Ok(Actor { name: principal.name, token_id: Some(principal.token_id), claimed })
    }
}

/// The key of the tokens' HMACs. Without it a copy of `api_tokens` is no use
/// to anyone; with a new one every token stops working.
pub struct TokenSecret(Vec<u8>);

impl std::fmt::Debug for TokenSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenSecret(..)")
    }
}

impl TokenSecret {
    /// Fewest characters a secret file may hold.
    pub const MIN_LEN: usize = 32;

    /// Reads the secret from a file only its owner may read.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = common::private_file::read(path)
            .map_err(|e| Error::Config(format!("token secret: {}", common::error_chain(&e))))?;
        if text.len() < Self::MIN_LEN {
            return Err(Error::Config(format!(
                "the token secret in {} has {} characters; at least {} are needed: make one with `sluice admin secret --out {}`",
                path.display(),
                text.len(),
                Self::MIN_LEN,
                path.display()
            )));
        }
        Ok(TokenSecret(text.into_bytes()))
    }

    /// A new random secret (64 hexadecimal characters).
    pub fn generate() -> String {
        hex::encode(random_bytes())
    }

    /// A key for another purpose, derived from the secret (HMAC-SHA256 of a
    /// label holding a NUL byte, which no token holds): every coordinator of
    /// the installation derives the same one.
    pub fn derive(&self, purpose: &str, subject: &str) -> Vec<u8> {
        self.digest(&format!("\0{purpose}\0{subject}"))
    }

    fn digest(&self, token: &str) -> Vec<u8> {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        mac.update(token.as_bytes());
        mac.finalize().into_bytes().to_vec()
    }
}

fn random_bytes() -> [u8; 32] {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the operating system provides random bytes");
    bytes
}

/// A token as `sluice admin token list` shows it: everything but the token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenInfo {
    pub id: Uuid,
    pub name: String,
    pub project: String,
    pub role: Role,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub revoked_by: Option<String>,
    pub last_used_at: Option<DateTime<Utc>>,
}

/// What to make a token for.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewToken {
    pub name: String,
    pub project: String,
    pub role: Role,
    /// Seconds until it expires; none: it never does.
    #[serde(default)]
    pub expires_in_s: Option<u64>,
}

/// A token just made: the only time its value is shown.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreatedToken {
    pub token: String,
    #[serde(flatten)]
    pub info: TokenInfo,
}

/// Checks a project name: lowercase letters, digits, `-` and `_`, at most 63.
pub fn check_project(project: &str) -> Result<(), Error> {
    let ok = !project.is_empty()
        && project.len() <= 63
        && project.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && project.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "project {project:?} is not a valid name: use 1 to 63 lowercase letters, digits, '-' and '_', starting with a letter or digit"
        )))
    }
}

impl NewToken {
    fn validate(&self) -> Result<(), Error> {
        let name = self.name.trim();
        if name.is_empty() || name.len() > 100 || name.chars().any(char::is_control) {
            return Err(Error::Invalid(
                "a token's name (whom it is for, recorded as the actor of everything done with it) must be 1 to 100 printable characters".into(),
            ));
        }
        check_project(&self.project)?;
        if self.expires_in_s == Some(0) {
            return Err(Error::Invalid("a token cannot expire in 0 seconds".into()));
        }
        Ok(())
    }
}

/// Makes a token; its value is returned once and only its HMAC is stored.
pub async fn create(
    pool: &PgPool,
    secret: &TokenSecret,
    new: &NewToken,
    created_by: &str,
) -> Result<CreatedToken, Error> {
    new.validate()?;
    let token = format!("{TOKEN_PREFIX}{}", hex::encode(random_bytes()));
    let expires_at = new.expires_in_s.map(|s| Utc::now() + chrono::Duration::seconds(s.min(100 * 365 * 86_400) as i64));
    let info = sqlx::query_as!(
        TokenInfo,
        r#"INSERT INTO api_tokens (id, name, project, role, hash, created_by, expires_at)
           VALUES ($1, $2, $3, $4, $5, $6, $7)
           RETURNING id, name, project, role AS "role: Role", created_by, created_at, expires_at, revoked_at,
                     revoked_by, last_used_at"#,
        Uuid::now_v7(),
        new.name.trim(),
        &new.project,
        new.role.as_str(),
        secret.digest(&token),
        created_by,
        expires_at
    )
    .fetch_one(pool)
    .await
    .doing("creating a token")?;
    tracing::info!(token_id = %info.id, name = %info.name, project = %info.project, role = %info.role, %created_by, "token created");
    Ok(CreatedToken { token, info })
}

/// Every token, newest first.
pub async fn list(pool: &PgPool) -> Result<Vec<TokenInfo>, Error> {
    Ok(sqlx::query_as!(
        TokenInfo,
        r#"SELECT id, name, project, role AS "role: Role", created_by, created_at, expires_at, revoked_at,
                  revoked_by, last_used_at
           FROM api_tokens ORDER BY created_at DESC"#
    )
    .fetch_all(pool)
    .await
    .doing("listing tokens")?)
}

/// Revokes a token at once; revoking it again changes nothing.
pub async fn revoke(pool: &PgPool, id: Uuid, by: &str) -> Result<TokenInfo, Error> {
    let info = sqlx::query_as!(
        TokenInfo,
        r#"UPDATE api_tokens SET revoked_at = coalesce(revoked_at, now()), revoked_by = coalesce(revoked_by, $2)
           WHERE id = $1
           RETURNING id, name, project, role AS "role: Role", created_by, created_at, expires_at, revoked_at,
                     revoked_by, last_used_at"#,
        id,
        by
    )
    .fetch_optional(pool)
    .await
    .doing("revoking a token")?
    .ok_or(Error::TokenNotFound(id))?;
    tracing::info!(token_id = %id, %by, "token revoked");
    Ok(info)
}

/// The first admin token of an installation, made by someone with access to
/// the database and the secret. Refused while a usable admin token exists,
/// unless `force` (a lost token).
pub async fn bootstrap(pool: &PgPool, secret: &TokenSecret, name: &str, force: bool) -> Result<CreatedToken, Error> {
    let admins = sqlx::query_scalar!(
        r#"SELECT count(*) AS "n!" FROM api_tokens
           WHERE role = 'admin' AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now())"#
    )
    .fetch_one(pool)
    .await
    .doing("looking for admin tokens")?;
    if admins > 0 && !force {
        return Err(Error::Invalid(format!(
            "{admins} admin token(s) exist already: make more with `sluice admin token create`, or pass --force if every admin token is lost"
        )));
    }
    let new =
        NewToken { name: name.to_string(), project: DEFAULT_PROJECT.into(), role: Role::Admin, expires_in_s: None };
    create(pool, secret, &new, "bootstrap").await
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Unauthenticated,
    Forbidden,
    Hidden,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Unauthenticated => "unauthenticated",
            Outcome::Forbidden => "forbidden",
            Outcome::Hidden => "hidden",
        }
    }
}

/// The token's holder, or why the token is refused.
pub(crate) async fn authenticate(
    pool: &PgPool,
    secret: &TokenSecret,
    token: &str,
) -> Result<Result<Principal, String>, Error> {
    if !token.starts_with(TOKEN_PREFIX) {
        return Ok(Err(format!("that is not a Sluice API token (they start with {TOKEN_PREFIX:?})")));
    }
    // Marks the token used at most once a minute, so `status --watch` does not rewrite its row twice a second.
    let row = sqlx::query!(
        r#"WITH used AS (
               UPDATE api_tokens SET last_used_at = now()
               WHERE hash = $1 AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now())
                 AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute'))
           SELECT id, name, project, role AS "role: Role", expires_at, revoked_at,
                  (expires_at IS NOT NULL AND expires_at <= now()) AS "expired!"
           FROM api_tokens WHERE hash = $1"#,
        secret.digest(token)
    )
    .fetch_optional(pool)
    .await
    .doing("checking an API token")?;
    Ok(match row {
        None => Err("unknown API token: it may have been mistyped, or made for another installation".into()),
        Some(r) if r.revoked_at.is_some() => Err(format!(
            "this API token was revoked on {}: ask an admin for a new one",
            r.revoked_at.expect("checked").format("%Y-%m-%d %H:%M UTC")
        )),
        Some(r) if r.expired => Err(format!(
            "this API token expired on {}: ask an admin for a new one",
            r.expires_at.map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string()).unwrap_or_default()
        )),
        Some(r) => Ok(Principal { token_id: r.id, name: r.name, project: r.project, role: r.role }),
    })
}

/// The token in `Authorization: Bearer ...`, if any.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}

/// Failed authentications per address. The first few are answered at once;
/// after that each address waits twice as long after every further failure
/// (up to a minute) before its next request is even checked.
#[derive(Default)]
pub struct Throttle {
    strikes: Mutex<HashMap<IpAddr, Strikes>>,
}

#[derive(Debug, Clone, Copy)]
struct Strikes {
    failures: u32,
    last: Instant,
    until: Instant,
}

impl Throttle {
    /// Failures an address may have before it is slowed down.
    pub const FREE_FAILURES: u32 = 5;
    /// A quiet address's failures are forgotten after this long.
    pub const FORGET_AFTER: Duration = Duration::from_secs(15 * 60);
    /// The longest wait.
    pub const MAX_WAIT: Duration = Duration::from_secs(60);

    /// The wait after `failures` failures.
    pub fn penalty(failures: u32) -> Duration {
        match failures.checked_sub(Self::FREE_FAILURES + 1) {
            None => Duration::ZERO,
            Some(n) => Duration::from_secs(1u64 << n.min(6)).min(Self::MAX_WAIT),
        }
    }

    /// How long `ip` must still wait, if it must.
    pub fn wait(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        let strikes = self.strikes.lock().expect("throttle lock");
        strikes.get(&ip).and_then(|s| s.until.checked_duration_since(now)).filter(|d| !d.is_zero())
    }

    /// Records a failure of `ip`; returns the wait it now has.
    pub fn failed(&self, ip: IpAddr, now: Instant) -> Duration {
        let mut strikes = self.strikes.lock().expect("throttle lock");
        if strikes.len() > 10_000 {
            strikes.retain(|_, s| now.duration_since(s.last) < Self::FORGET_AFTER);
        }
        let s = strikes.entry(ip).or_insert(Strikes { failures: 0, last: now, until: now });
        if now.duration_since(s.last) >= Self::FORGET_AFTER {
            s.failures = 0;
        }
        s.failures += 1;
        s.last = now;
        let wait = Self::penalty(s.failures);
        s.until = now + wait;
        wait
    }
}

/// Counts, logs and records (in `audit_access`) a refused request.
async fn record_refusal(
    pool: &PgPool,
    ip: IpAddr,
    method: &str,
    path: &str,
    outcome: Outcome,
    reason: &str,
    principal: Option<&Principal>,
) {
    metrics::counter!(m::API_DENIED, "outcome" => outcome.as_str()).increment(1);
    tracing::info!(%ip, %method, %path, outcome = outcome.as_str(), %reason, "request refused");
    let recorded = sqlx::query!(
        "INSERT INTO audit_access (address, method, path, outcome, reason, token_id, actor)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        ip.to_string(),
        method,
        path,
        outcome.as_str(),
        reason,
        principal.map(|p| p.token_id),
        principal.map(|p| p.name.as_str())
    )
    .execute(pool)
    .await;
    if let Err(e) = recorded {
        tracing::warn!(error = %e, "cannot record a refused request in audit_access");
    }
}

/// A sign-in with `token` from `ip` (the review page's login form), under
/// the same throttle and audit as the API's: the holder, or why not.
pub(crate) async fn sign_in(
    st: &AppState,
    ip: IpAddr,
    path: &str,
    token: &str,
) -> Result<Result<Principal, String>, Error> {
    if let Some(wait) = st.throttle.wait(ip, Instant::now()) {
        let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
        return Ok(Err(format!("too many failed sign-ins from {ip}: try again in {secs} s")));
    }
    let found = authenticate(&st.pool, &st.secret, token).await?;
    if let Err(reason) = &found {
        st.throttle.failed(ip, Instant::now());
        record_refusal(&st.pool, ip, "POST", path, Outcome::Unauthenticated, reason, None).await;
    }
    Ok(found)
}

/// The check every `/v1` request passes; see the module's documentation.
pub async fn guard(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    route: MatchedPath,
    mut req: Request,
    next: Next,
) -> Response {
    let ip = peer.ip();
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let refuse = |outcome: Outcome, reason: String, principal: Option<Principal>| {
        let (pool, method, path) = (st.pool.clone(), method.clone(), path.clone());
        async move {
            record_refusal(&pool, ip, &method, &path, outcome, &reason, principal.as_ref()).await;
            reason
        }
    };
    if let Some(wait) = st.throttle.wait(ip, Instant::now()) {
        metrics::counter!(m::API_DENIED, "outcome" => "throttled").increment(1);
        let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
        let error = format!("too many failed authentications from {ip}: try again in {secs} s");
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, secs.to_string())],
            Json(ApiError { error, report: None, request_id: None }),
        )
            .into_response();
    }
    // The review page's browser sends its token in a cookie (set by its
    // login form); every other client in the Authorization header.
    let page = route.as_str().starts_with(crate::review_page::PREFIX);
    let (token, from_cookie) = match bearer(req.headers()) {
        Some(t) => (Some(t.to_string()), false),
        None if page => (crate::review_page::cookie_token(req.headers()), true),
        None => (None, false),
    };
    let principal = match token.as_deref() {
        None => Err("no API token: the CLI reads it from SLUICE_TOKEN or ~/.config/sluice/token (`sluice login` saves one); an admin makes tokens with `sluice admin token create`".to_string()),
        Some(token) => match authenticate(&st.pool, &st.secret, token).await {
            Ok(found) => found,
            Err(e) => return e.into_response(),
        },
    };
    let principal = match principal {
        Ok(p) => p,
        Err(reason) if page && method == "GET" => {
            // A browser without a (valid) cookie gets the login form.
            if token.is_some() {
                st.throttle.failed(ip, Instant::now());
                refuse(Outcome::Unauthenticated, reason.clone(), None).await;
            }
            let shown = token.is_some().then_some(reason.as_str());
            return crate::review_page::login_page(StatusCode::UNAUTHORIZED, &path, shown);
        }
        Err(reason) => {
            st.throttle.failed(ip, Instant::now());
            let error = refuse(Outcome::Unauthenticated, reason, None).await;
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                Json(ApiError { error, report: None, request_id: None }),
            )
                .into_response();
        }
    };
    if from_cookie && method != "GET" && !req.headers().contains_key(crate::review_page::CSRF_HEADER) {
        // A cookie goes with any request the browser makes, a form posted
        // by another site's page included; only the page's own script sets
        // this header (another origin cannot without CORS, which Sluice
        // does not allow).
        let reason = format!(
            "a decision sent with the review page's cookie must carry the {} header",
            crate::review_page::CSRF_HEADER
        );
        return Error::Forbidden(refuse(Outcome::Forbidden, reason, Some(principal)).await).into_response();
    }
    let Some(endpoint) = endpoint(&method, route.as_str()) else {
        let reason = format!("no role may call {method} {}", route.as_str());
        return Error::Forbidden(refuse(Outcome::Forbidden, reason, Some(principal)).await).into_response();
    };
    if !principal.has(endpoint.least) {
        let reason = format!(
            "your token ({}, role {} in project {}) may not {}: that needs the {} role; ask an admin for a token with it",
            principal.name,
            principal.role,
            principal.project,
            endpoint.action.describe(),
            endpoint.least
        );
        return Error::Forbidden(refuse(Outcome::Forbidden, reason, Some(principal)).await).into_response();
    }
    let about_job = route.as_str().starts_with("/v1/jobs/{id}") || route.as_str().starts_with("/review/{id}");
    if let Some(job_id) = about_job.then(|| job_in(&path)).flatten() {
        match store::job_project(&st.pool, job_id).await {
            Ok(Some(project)) if !principal.sees(&project) => {
                let reason = format!("job {job_id} belongs to project {project}");
                refuse(Outcome::Hidden, reason, Some(principal)).await;
                // Word for word what a job that does not exist answers.
                return Error::JobNotFound(job_id).into_response();
            }
            // Before the body is read, so a job that does not exist answers
            // alike on every route (and another project's job like it).
            Ok(None) => return Error::JobNotFound(job_id).into_response(),
            Ok(Some(_)) => {}
            Err(e) => return e.into_response(),
        }
    }
    req.extensions_mut().insert(principal);
    next.run(req).await
}

/// The job id in `/v1/jobs/{id}/...` or `/review/{id}/...`, if it is one.
fn job_in(path: &str) -> Option<Uuid> {
    path.strip_prefix("/v1/jobs/").or_else(|| path.strip_prefix("/review/"))?.split('/').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_endpoint_is_declared_once_and_the_roles_form_a_ladder() {
        for (i, e) in ENDPOINTS.iter().enumerate() {
            assert!(
                ENDPOINTS[..i].iter().all(|o| (o.method, o.path) != (e.method, e.path)),
                "{} {} twice",
                e.method,
                e.path
            );
        }
        let p = |role| Principal { token_id: Uuid::nil(), name: "n".into(), project: "p".into(), role };
        assert!(p(Role::Admin).has(Role::Reviewer) && !p(Role::Reader).has(Role::Submitter));
        assert!(p(Role::Admin).sees("other") && !p(Role::Reviewer).sees("other") && p(Role::Reader).sees("p"));
    }

    #[test]
    fn failures_are_free_at_first_then_each_doubles_the_wait_up_to_a_minute() {
        assert_eq!(Throttle::penalty(Throttle::FREE_FAILURES), Duration::ZERO);
        assert_eq!(Throttle::penalty(Throttle::FREE_FAILURES + 1), Duration::from_secs(1));
        assert_eq!(Throttle::penalty(Throttle::FREE_FAILURES + 2), Duration::from_secs(2));
        assert_eq!(Throttle::penalty(Throttle::FREE_FAILURES + 40), Throttle::MAX_WAIT);

        let t = Throttle::default();
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let now = Instant::now();
        for _ in 0..Throttle::FREE_FAILURES {
            assert_eq!(t.failed(a, now), Duration::ZERO);
        }
        assert_eq!(t.wait(a, now), None);
        assert_eq!(t.failed(a, now), Duration::from_secs(1));
        assert_eq!(t.wait(a, now), Some(Duration::from_secs(1)));
        assert_eq!(t.wait(b, now), None, "another address is not slowed down");
        assert_eq!(t.wait(a, now + Duration::from_secs(1)), None, "the wait ends");
        let later = now + Throttle::FORGET_AFTER;
        assert_eq!(t.failed(a, later), Duration::ZERO, "a quiet address starts afresh");
    }

    #[test]
    fn the_bearer_token_and_the_job_are_read_from_the_request() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, "Bearer sluice_abc".parse().unwrap());
        assert_eq!(bearer(&h), Some("sluice_abc"));
        h.insert(header::AUTHORIZATION, "Basic c2x1aWNl".parse().unwrap());
        assert_eq!(bearer(&h), None);
        let id = Uuid::now_v7();
        assert_eq!(job_in(&format!("/v1/jobs/{id}/cancel")), Some(id));
        assert_eq!(job_in(&format!("/v1/jobs/{id}")), Some(id));
        assert_eq!(job_in("/v1/jobs/nope"), None);
    }

    #[test]
    fn projects_are_plain_names() {
        for ok in ["default", "team-a", "x_1", "9"] {
            assert!(check_project(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Team", "-a", "a b", "a/b", &"x".repeat(64)] {
            assert!(check_project(bad).is_err(), "{bad}");
        }
    }
}
