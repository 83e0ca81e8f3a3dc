//! HTTP client of the coordinator's control API, used by the CLI and tests.

use std::path::{Path, PathBuf};

use futures::{Stream, TryStreamExt};
use reqwest::StatusCode;
use uuid::Uuid;

use secrecy::{ExposeSecret, SecretString};

use crate::auth::{CreatedToken, NewToken, Principal, TokenInfo};
use crate::model::{ApiError, Created, ImportReport, IngestReport, JobStatus, LabelStudioNames, NewJob, ReviewStats};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the Sluice coordinator at {url}: is `sluice serve` running? (`scripts/demo` starts one; set SLUICE_COORDINATOR to use another)")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{message}")]
    Api { status: StatusCode, message: String, report: Option<Box<IngestReport>> },
    #[error("{message}")]
    Decisions { message: String, errors: Vec<crate::model::DecisionError> },
    #[error("request to {url} failed")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("no API token: set SLUICE_TOKEN, or save one in {path} with `sluice login` (an admin makes tokens with `sluice admin token create`)")]
    NoToken { path: String },
    #[error(transparent)]
    TokenFile(#[from] common::private_file::PrivateFileError),
    #[error("{path} holds no usable CA certificate (PEM)")]
    Ca {
        path: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Where the CLI keeps the user's API token: `$XDG_CONFIG_HOME/sluice/token`,
/// or `~/.config/sluice/token`.
pub fn default_token_file() -> PathBuf {
    let config = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from("."));
    config.join("sluice").join("token")
}

/// The API token: `SLUICE_TOKEN` if set, else the content of `file` (which
/// only its owner may read). Never an argument: those show in `ps`.
pub fn load_token(file: &Path) -> Result<String, ClientError> {
    if let Some(token) = std::env::var("SLUICE_TOKEN").ok().filter(|t| !t.trim().is_empty()) {
        return Ok(token.trim().to_string());
    }
    if !file.exists() {
        return Err(ClientError::NoToken { path: file.display().to_string() });
    }
    Ok(common::private_file::read(file)?)
}

/// A client of one coordinator.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    /// The API token sent with every request.
    token: Option<SecretString>,
    /// Who the user says is acting: the audit trail records the token's
    /// holder, and this beside it as a note.
    actor: Option<String>,
}

impl Client {
    pub fn new(base: &str) -> Self {
        Client { http: reqwest::Client::new(), base: base.trim_end_matches('/').to_string(), token: None, actor: None }
    }

    /// Trusts the CA certificates (PEM) in `path` for an `https://`
    /// coordinator, besides the usual roots.
    pub fn with_ca_file(mut self, path: &Path) -> Result<Self, ClientError> {
        let pem =
            std::fs::read(path).map_err(|source| ClientError::Read { path: path.display().to_string(), source })?;
        let ca = |source| ClientError::Ca { path: path.display().to_string(), source };
        let mut builder = reqwest::Client::builder();
        for cert in reqwest::Certificate::from_pem_bundle(&pem).map_err(ca)? {
            builder = builder.add_root_certificate(cert);
        }
        self.http = builder.build().map_err(ca)?;
        Ok(self)
    }

    /// Sends `token` as the bearer of every request.
    pub fn with_token(mut self, token: &str) -> Self {
        self.token = Some(SecretString::from(token.to_string()));
        self
    }

    /// Names the person or system acting, kept as a note in the audit trail.
    pub fn with_actor(mut self, actor: &str) -> Self {
        self.actor = Some(actor.to_string());
        self
    }

    /// The built-in review page of a job, for a reviewer's browser.
    pub fn review_page_url(&self, job: Uuid) -> String {
        self.url(&format!("/review/{job}"))
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    async fn send(&self, req: reqwest::RequestBuilder, url: &str) -> Result<reqwest::Response, ClientError> {
        let mut req = req;
        if let Some(token) = &self.token {
            req = req.bearer_auth(token.expose_secret());
        }
        if let Some(actor) = &self.actor {
            req = req.header("x-sluice-actor", actor);
        }
        let resp = req.send().await.map_err(|source| {
            if source.is_connect() {
                ClientError::Unreachable { url: self.base.clone(), source }
            } else {
                ClientError::Http { url: url.to_string(), source }
            }
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
            if let Ok(import) = serde_json::from_value::<ImportReport>(v["import"].clone()) {
                return Err(ClientError::Decisions {
                    message: v["error"].as_str().unwrap_or_default().to_string(),
                    errors: import.errors,
                });
            }
        }
        Err(match serde_json::from_str::<ApiError>(&text) {
            Ok(e) => ClientError::Api { status, message: e.error, report: e.report.map(Box::new) },
            Err(_) => ClientError::Api { status, message: format!("HTTP {status}: {text}"), report: None },
        })
    }

    async fn json<T: serde::de::DeserializeOwned>(&self, resp: reqwest::Response, url: &str) -> Result<T, ClientError> {
        resp.json().await.map_err(|source| ClientError::Http { url: url.to_string(), source })
    }

    /// Creates a job; the answer carries its id and any warnings.
    pub async fn create_job(&self, job: &NewJob) -> Result<Created, ClientError> {
        let url = self.url("/v1/jobs");
        let resp = self.send(self.http.post(&url).json(job), &url).await?;
        self.json::<Created>(resp, &url).await
    }

    /// Uploads a job's input from any byte stream.
    pub async fn upload<S>(&self, job_id: Uuid, body: S, skip_invalid: bool) -> Result<IngestReport, ClientError>
    where
        S: Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send + Sync + 'static,
    {
        let url = self.url(&format!("/v1/jobs/{job_id}/input?skip_invalid={skip_invalid}"));
        let resp = self.send(self.http.put(&url).body(reqwest::Body::wrap_stream(body)), &url).await?;
        self.json(resp, &url).await
    }

    /// Uploads a job's input from a file, calling `progress` with the bytes sent so far.
    pub async fn upload_file(
        &self,
        job_id: Uuid,
        path: &Path,
        skip_invalid: bool,
        progress: impl Fn(u64) + Send + Sync + 'static,
    ) -> Result<IngestReport, ClientError> {
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|source| ClientError::Read { path: path.display().to_string(), source })?;
        let mut sent = 0u64;
        let stream = tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024).inspect_ok(move |b| {
            sent += b.len() as u64;
            progress(sent);
        });
        self.upload(job_id, stream, skip_invalid).await
    }

    pub async fn status(&self, job_id: Uuid) -> Result<JobStatus, ClientError> {
        let url = self.url(&format!("/v1/jobs/{job_id}"));
        let resp = self.send(self.http.get(&url), &url).await?;
        self.json(resp, &url).await
    }

    /// The most recent jobs the token may see, newest first.
    pub async fn jobs(&self, limit: u32) -> Result<Vec<JobStatus>, ClientError> {
        self.jobs_of(limit, None).await
    }

    /// Like [`Client::jobs`], only `project`'s when given (for an admin token).
    pub async fn jobs_of(&self, limit: u32, project: Option<&str>) -> Result<Vec<JobStatus>, ClientError> {
        let url = self.url("/v1/jobs");
        let mut query = vec![("limit", limit.to_string())];
        query.extend(project.map(|p| ("project", p.to_string())));
        let resp = self.send(self.http.get(&url).query(&query), &url).await?;
        self.json(resp, &url).await
    }

    pub async fn cancel(&self, job_id: Uuid) -> Result<JobStatus, ClientError> {
        let url = self.url(&format!("/v1/jobs/{job_id}/cancel"));
        let resp = self.send(self.http.post(&url), &url).await?;
        self.json(resp, &url).await
    }

    pub async fn resume(&self, job_id: Uuid, failed_only: bool) -> Result<crate::store::Resumed, ClientError> {
        self.resume_with(job_id, failed_only, None).await
    }

    /// Resumes a job, setting or raising its spending cap to `max_cost` dollars.
    pub async fn resume_with(
        &self,
        job_id: Uuid,
        failed_only: bool,
        max_cost: Option<f64>,
    ) -> Result<crate::store::Resumed, ClientError> {
        let url = self.url(&format!("/v1/jobs/{job_id}/resume"));
        let mut query = vec![("failed_only", failed_only.to_string())];
        query.extend(max_cost.map(|c| ("max_cost", c.to_string())));
        let resp = self.send(self.http.post(&url).query(&query), &url).await?;
        self.json(resp, &url).await
    }

    /// Removes the jobs created before the start of `before`'s month with
    /// their results and audit trail (admin tokens only); with `dry_run`,
    /// only says what would go.
    pub async fn prune(
        &self,
        before: chrono::DateTime<chrono::Utc>,
        dry_run: bool,
    ) -> Result<crate::model::Pruned, ClientError> {
        let url = self.url("/v1/admin/prune");
        let body = crate::model::PruneRequest { before, dry_run };
        let resp = self.send(self.http.post(&url).json(&body), &url).await?;
        self.json(resp, &url).await
    }

    /// How many of a file's distinct prompts are cached, and what earlier jobs of the kind used.
    pub async fn estimate_lookup(
        &self,
        req: &crate::cache::LookupRequest,
    ) -> Result<crate::cache::LookupReport, ClientError> {
        let url = self.url("/v1/estimate");
        let resp = self.send(self.http.post(&url).json(req), &url).await?;
        self.json(resp, &url).await
    }

    /// The response cache's figures for the token's project (or `project`, for an admin).
    pub async fn cache_stats(&self, project: Option<&str>) -> Result<crate::cache::Stats, ClientError> {
        let url = self.url("/v1/cache");
        let query: Vec<(&str, &str)> = project.map(|p| ("project", p)).into_iter().collect();
        let resp = self.send(self.http.get(&url).query(&query), &url).await?;
        self.json(resp, &url).await
    }

    /// Adds a webhook for every job of a project.
    pub async fn add_webhook(&self, hook: &crate::model::NewWebhook) -> Result<crate::model::Webhook, ClientError> {
        let url = self.url("/v1/webhooks");
        let resp = self.send(self.http.post(&url).json(hook), &url).await?;
        self.json(resp, &url).await
    }

    /// The webhooks of a project and its jobs (the token's project by default).
    pub async fn webhooks(&self, project: Option<&str>) -> Result<Vec<crate::model::Webhook>, ClientError> {
        self.get_in_project("/v1/webhooks", project).await
    }

    /// GET `path`, for `project` when given (else the token's own).
    async fn get_in_project<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        project: Option<&str>,
    ) -> Result<T, ClientError> {
        let url = self.url(path);
        let query: Vec<(&str, &str)> = project.map(|p| ("project", p)).into_iter().collect();
        let resp = self.send(self.http.get(&url).query(&query), &url).await?;
        self.json(resp, &url).await
    }

    /// Deletes webhook `id`.
    pub async fn remove_webhook(&self, id: i64) -> Result<(), ClientError> {
        let url = self.url(&format!("/v1/webhooks/{id}"));
        self.send(self.http.delete(&url), &url).await?;
        Ok(())
    }

    /// The project's webhook signing secret.
    pub async fn webhook_secret(&self, project: Option<&str>) -> Result<crate::model::WebhookSecret, ClientError> {
        self.get_in_project("/v1/webhooks/secret", project).await
    }

    /// Every notification of a job and how its delivery went.
    pub async fn notifications(&self, job_id: Uuid) -> Result<Vec<crate::model::WebhookDelivery>, ClientError> {
        let url = self.url(&format!("/v1/jobs/{job_id}/notifications"));
        let resp = self.send(self.http.get(&url), &url).await?;
        self.json(resp, &url).await
    }

    /// Deletes cache entries (only those older than `older_than_s` when given); returns how many.
    pub async fn cache_purge(&self, project: Option<&str>, older_than_s: Option<u64>) -> Result<u64, ClientError> {
        let url = self.url("/v1/cache");
        let mut query: Vec<(&str, String)> = project.map(|p| ("project", p.to_string())).into_iter().collect();
        query.extend(older_than_s.map(|s| ("older_than_s", s.to_string())));
        let resp = self.send(self.http.delete(&url).query(&query), &url).await?;
        let v: serde_json::Value = self.json(resp, &url).await?;
        Ok(v["deleted"].as_u64().unwrap_or(0))
    }

    /// The review queue in `format` (`jsonl`, `csv` or `label-studio`).
    pub async fn review_export(
        &self,
        job_id: Uuid,
        below: Option<f64>,
        format: &str,
    ) -> Result<bytes::Bytes, ClientError> {
        self.review_export_with(job_id, below, format, &LabelStudioNames::default()).await
    }

    /// The review queue in `format`, Label Studio tasks naming the control
    /// and object `names` gives.
    pub async fn review_export_with(
        &self,
        job_id: Uuid,
        below: Option<f64>,
        format: &str,
        names: &LabelStudioNames,
    ) -> Result<bytes::Bytes, ClientError> {
        let url = self.url(&format!("/v1/jobs/{job_id}/review"));
        let mut query = vec![("format", format.to_string())];
        query.extend(below.map(|b| ("below", b.to_string())));
        query.extend(names.control.clone().map(|c| ("control", c)));
        query.extend(names.object.clone().map(|o| ("object", o)));
        let resp = self.send(self.http.get(&url).query(&query), &url).await?;
        resp.bytes().await.map_err(|source| ClientError::Http { url, source })
    }

    /// Agreement between reviewers and the model by confidence band; with
    /// `precision`, the threshold suggested for it.
    pub async fn review_stats(&self, job_id: Uuid, precision: Option<f64>) -> Result<ReviewStats, ClientError> {
        let url = self.url(&format!("/v1/jobs/{job_id}/review/stats"));
        let query: Vec<(&str, String)> = precision.map(|p| ("precision", p.to_string())).into_iter().collect();
        let resp = self.send(self.http.get(&url).query(&query), &url).await?;
        self.json(resp, &url).await
    }

    /// The Label Studio labeling config (XML) for a job's review queue.
    pub async fn label_studio_config(&self, job_id: Uuid, names: &LabelStudioNames) -> Result<String, ClientError> {
        let url = self.url(&format!("/v1/jobs/{job_id}/review/label-studio-config"));
        let resp = self.send(self.http.get(&url).query(names), &url).await?;
        resp.text().await.map_err(|source| ClientError::Http { url, source })
    }

    /// Imports review decisions (`jsonl` or `csv`); all or nothing.
    pub async fn review_import(
        &self,
        job_id: Uuid,
        body: Vec<u8>,
        format: &str,
        source: &str,
    ) -> Result<ImportReport, ClientError> {
        self.review_import_with(job_id, body, format, source, None).await
    }

    /// Imports review decisions: Sluice's `jsonl` or `csv`, or Label
    /// Studio's JSON or CSV export (sent as `jsonl` or `csv`), whose answers
    /// are read from the control named `control` (by default the kind's
    /// answer field).
    pub async fn review_import_with(
        &self,
        job_id: Uuid,
        body: Vec<u8>,
        format: &str,
        source: &str,
        control: Option<&str>,
    ) -> Result<ImportReport, ClientError> {
        let url = self.url(&format!("/v1/jobs/{job_id}/review"));
        let mut query = vec![("format", format), ("source", source)];
        query.extend(control.map(|c| ("control", c)));
        let req = self.http.post(&url).query(&query).body(body);
        let resp = self.send(req, &url).await?;
        self.json(resp, &url).await
    }

    /// The holder of the client's token.
    pub async fn whoami(&self) -> Result<Principal, ClientError> {
        let url = self.url("/v1/whoami");
        let resp = self.send(self.http.get(&url), &url).await?;
        self.json(resp, &url).await
    }

    /// Makes a token (admin only); the answer is the only place its value appears.
    pub async fn create_token(&self, new: &NewToken) -> Result<CreatedToken, ClientError> {
        let url = self.url("/v1/tokens");
        let resp = self.send(self.http.post(&url).json(new), &url).await?;
        self.json(resp, &url).await
    }

    /// Every token (admin only), without their values.
    pub async fn tokens(&self) -> Result<Vec<TokenInfo>, ClientError> {
        let url = self.url("/v1/tokens");
        let resp = self.send(self.http.get(&url), &url).await?;
        self.json(resp, &url).await
    }

    /// Revokes a token at once (admin only).
    pub async fn revoke_token(&self, id: Uuid) -> Result<TokenInfo, ClientError> {
        let url = self.url(&format!("/v1/tokens/{id}/revoke"));
        let resp = self.send(self.http.post(&url), &url).await?;
        self.json(resp, &url).await
    }

    /// Streams a job's results in `format` (`jsonl` or `csv`).
    pub async fn results(
        &self,
        job_id: Uuid,
        format: &str,
    ) -> Result<impl Stream<Item = Result<bytes::Bytes, ClientError>>, ClientError> {
        let url = self.url(&format!("/v1/jobs/{job_id}/results?format={format}"));
        let resp = self.send(self.http.get(&url), &url).await?;
        Ok(resp.bytes_stream().map_err(move |source| ClientError::Http { url: url.clone(), source }))
    }
}
