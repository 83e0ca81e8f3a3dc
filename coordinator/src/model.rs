//! Request and response bodies of the control API, shared by the server and the CLI's client.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// `POST /v1/jobs`: a job kind to run, before its input is uploaded.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewJob {
    pub kind: common::spec::JobKind,
    /// Name of the input file, for the user's reference.
    #[serde(default)]
    pub input_name: Option<String>,
    /// Review threshold for this job instead of the kind's `confidence_threshold`.
    #[serde(default)]
    pub review_below: Option<f64>,
    /// Run a model that has no price (its cost is then unknown).
    #[serde(default)]
    pub allow_unpriced: bool,
    /// The project the job belongs to: the token's own unless an admin names another.
    #[serde(default)]
    pub project: Option<String>,
    /// Spending cap in dollars: the job pauses before a call would pass it.
    #[serde(default)]
    pub max_cost_usd: Option<f64>,
    /// Reuse answers (the response cache, and identical items of the job):
    /// by default on for temperature 0, off otherwise.
    #[serde(default)]
    pub cache: Option<bool>,
    /// Cache entries older than this are not used (default 30 days).
    #[serde(default)]
    pub cache_ttl_s: Option<u64>,
    /// Live calls, or the providers' batch APIs; default: the kind's `mode`,
    /// else live.
    #[serde(default)]
    pub mode: Option<common::state::JobMode>,
    /// In `auto` mode: seconds from submission until the job should be done
    /// (default a day).
    #[serde(default)]
    pub deadline_s: Option<u64>,
    /// Webhooks told of this job's events (`--notify URL`).
    #[serde(default)]
    pub notify: Vec<NewWebhook>,
}

/// How a webhook's body is written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WebhookFormat {
    /// Standard Webhooks' envelope around the job's status.
    #[default]
    Json,
    /// `{"text": ...}`, as a Slack incoming webhook takes it.
    Slack,
}

impl WebhookFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            WebhookFormat::Json => "json",
            WebhookFormat::Slack => "slack",
        }
    }

    /// The format stored in `webhooks.format` (checked by the schema).
    pub fn parse(s: &str) -> Self {
        if s == "slack" {
            WebhookFormat::Slack
        } else {
            WebhookFormat::Json
        }
    }
}

/// A webhook to add: for a job (`submit --notify`), or for every job of a
/// project (`sluice webhooks add`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewWebhook {
    pub url: String,
    #[serde(default)]
    pub format: WebhookFormat,
    /// For a project's webhook: the project (default: the token's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Webhook {
    pub id: i64,
    pub project: Option<String>,
    pub job_id: Option<Uuid>,
    pub url: String,
    pub format: WebhookFormat,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
}

/// One notification and how its delivery went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WebhookDelivery {
    pub id: i64,
    pub event: String,
    pub url: String,
    /// `pending`, `delivered` or `failed` (attempts used up).
    pub state: String,
    pub attempts: i32,
    pub last_status: Option<i32>,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub delivered_at: Option<DateTime<Utc>>,
}

/// A project's webhook signing secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WebhookSecret {
    pub project: String,
    /// `whsec_` and the key in base64, as Standard Webhooks libraries take it.
    pub secret: String,
}

/// An `auto` job's deadline when it names none: the providers' batch window.
pub const DEFAULT_DEADLINE_S: u64 = 24 * 3600;

/// A spending cap in dollars, as the CLI and the coordinator's settings take
/// it: `25`, `25.00` or `$25`, more than 0.
pub fn parse_dollars(text: &str) -> Result<f64, String> {
    let n: f64 = text
        .trim()
        .trim_start_matches('$')
        .parse()
        .map_err(|_| format!("{text:?} is not an amount of dollars like 25.00"))?;
    if n.is_finite() && n > 0.0 {
        Ok(n)
    } else {
        Err(format!("a spending cap must be more than 0 dollars, got {text}"))
    }
}

/// How long cached answers are used unless a job says otherwise: 30 days.
pub const DEFAULT_CACHE_TTL_S: u64 = 30 * 24 * 3600;

impl NewJob {
    /// A job of `kind` with every setting at its default.
    pub fn new(kind: common::spec::JobKind) -> Self {
        NewJob {
            kind,
            input_name: None,
            review_below: None,
            allow_unpriced: false,
            project: None,
            max_cost_usd: None,
            cache: None,
            cache_ttl_s: None,
            mode: None,
            deadline_s: None,
            notify: Vec::new(),
        }
    }

    /// How the job makes its calls: as asked, else as its kind says, else live.
    pub fn mode(&self) -> common::state::JobMode {
        self.mode.or(self.kind.spec.mode).unwrap_or_default()
    }

    /// Whether the job reuses answers: as asked, else for temperature 0 only
    /// (a sampled answer is not meant to repeat).
    pub fn reuses(&self) -> bool {
        // A multi-stage item's answer depends on every stage's prompt: the
        // response cache, keyed by one prompt, does not serve stages yet.
        self.kind.spec.stages.is_empty() && self.cache.unwrap_or(self.kind.spec.reuses_answers())
    }
}

/// A job's spending cap and what it has spent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Budget {
    pub cap_usd: f64,
    /// Dollars spent by finished calls.
    pub spent_usd: f64,
    /// Worst-case cost of the calls in flight: spending can pass `spent_usd`
    /// by at most this much, and `spent_usd + in_flight_usd` never passes the cap.
    pub in_flight_usd: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Created {
    pub job_id: Uuid,
    /// What the user should know before the job runs.
    #[serde(default)]
    pub warnings: Vec<String>,
}

/// How many results got their confidence from one strategy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfidenceSource {
    /// `logprobs`, `agreement`, `self_reported`, or `none` when none could be computed.
    pub strategy: String,
    pub results: u64,
    /// Why results have no confidence, or why an earlier strategy was passed over.
    pub note: Option<String>,
}

/// How structured output was asked of a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputModeUse {
    pub provider: String,
    pub model: String,
    /// `json_schema`, `json_object` or `prompt`.
    pub mode: String,
    pub attempts: u64,
}

/// Where the items of a multi-stage job stand at one stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageStatus {
    pub name: String,
    /// Items whose answer at this stage was accepted (for the last stage:
    /// items with a result; for a stage that runs per segment, items with
    /// at least one segment's answer).
    pub passed: u64,
    /// Answers accepted: one per item, or one per segment.
    #[serde(default)]
    pub answers: u64,
    /// Of those answers, the ones below the stage's review threshold.
    pub needs_review: u64,
    /// Items that failed at this stage and went no further (rejected at
    /// its gate included).
    pub failed: u64,
    /// Items its gate holds for a reviewer's decision.
    pub waiting: u64,
    /// Calls made at this stage and what they cost (from the audit trail).
    pub attempts: u64,
    pub cost_usd: f64,
}

/// One refused input line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineError {
    pub line: u64,
    pub reason: String,
}

/// The outcome of uploading a job's input.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IngestReport {
    pub job_id: Uuid,
    /// `running` when accepted, `rejected` when nothing was ingested.
    pub state: String,
    pub items: u64,
    pub chunks: u64,
    pub invalid_lines: u64,
    /// The first refused lines (at most 100), in input order.
    pub errors: Vec<LineError>,
    pub ingest_seconds: f64,
    /// Items identical (in the fields the template reads) to an earlier item:
    /// they share its answer and are never sent to a model.
    #[serde(default)]
    pub copies: u64,
}

/// A job and its progress, as `sluice status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobStatus {
    pub job_id: Uuid,
    pub kind: String,
    pub project: String,
    pub state: String,
    pub input_name: Option<String>,
    pub total: u64,
    /// Items with an answer (including those flagged for review).
    pub succeeded: u64,
    /// Answers below the review threshold, waiting for a human.
    pub needs_review: u64,
    /// Answers a human has decided.
    pub reviewed: u64,
    pub failed: u64,
    pub pending: u64,
    /// Tokens and cost of every attempt so far (from the audit trail).
    pub tokens_in: u64,
    pub tokens_out: u64,
    pub cost_usd: f64,
    /// Cost so far scaled to all items, once some are done.
    pub projected_cost_usd: Option<f64>,
    /// Attempts of models without a price: the cost is then unknown.
    #[serde(default)]
    pub unpriced_attempts: u64,
    /// Where the results' confidence came from (detail view only).
    #[serde(default)]
    pub confidence_sources: Vec<ConfidenceSource>,
    /// How structured output was asked for, per model (detail view only);
    /// attempts made through provider batches are named `batch:<mode>`.
    #[serde(default)]
    pub output_modes: Vec<OutputModeUse>,
    /// Provider batches sent and not yet collected, and the items they hold
    /// (detail view only).
    #[serde(default)]
    pub batches_pending: u64,
    #[serde(default)]
    pub batch_items_pending: u64,
    /// Items answered through provider batches (their answers accepted).
    #[serde(default)]
    pub batch_items_done: u64,
    /// What the batches' answers would have cost at live prices, less what
    /// they cost at batch prices.
    #[serde(default)]
    pub batch_saved_usd: f64,
    /// A multi-stage job's items per stage (detail view only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<StageStatus>,
    /// The job's review threshold.
    pub review_below: Option<f64>,
    pub invalid_lines: u64,
    pub chunks_total: u64,
    pub chunks_done: u64,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// Why a paused job is paused (`budget`).
    #[serde(default)]
    pub paused_reason: Option<String>,
    /// The spending cap, if the job has one.
    #[serde(default)]
    pub budget: Option<Budget>,
    /// Whether the job reuses answers (cache and identical items).
    #[serde(default)]
    pub reuse: bool,
    /// Items answered from the response cache, and from an identical item of
    /// the job, without a call.
    #[serde(default)]
    pub cache_hits: u64,
    #[serde(default)]
    pub shared: u64,
    /// Items finished per second since the job started.
    pub items_per_s: f64,
    /// Estimated seconds to completion at the current rate.
    pub eta_s: Option<f64>,
}

impl JobStatus {
    pub fn done(&self) -> u64 {
        self.succeeded + self.failed
    }

    /// True once the job can make no more progress (a paused job waits for `resume`).
    pub fn is_final(&self) -> bool {
        matches!(self.state.as_str(), "completed" | "cancelled" | "rejected" | "abandoned" | "paused")
    }
}

/// An API error body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<IngestReport>,
    /// On a server error: the id under which the coordinator logged the details.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<uuid::Uuid>,
}

/// One line of a review decisions file that could not be used.
pub type DecisionError = LineError;

/// The outcome of importing review decisions.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImportReport {
    pub applied: u64,
    /// The refused lines (nothing is applied when there are any).
    pub errors: Vec<DecisionError>,
    /// Tasks of a Label Studio export that nobody annotated (or whose every
    /// annotation was skipped): left as they were.
    #[serde(default)]
    pub skipped: u64,
}

/// How often reviewers agreed with the model, by the model's confidence:
/// the evidence for a job's review threshold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReviewStats {
    /// Final answers a person decided.
    pub reviewed: u64,
    /// Of those, the ones where the person gave the model's answer.
    pub agreed: u64,
    /// The job's review threshold.
    pub threshold: f64,
    /// Ten bands of confidence, 0.0–0.1 up to 0.9–1.0 (the last includes 1.0).
    pub bands: Vec<AgreementBand>,
    /// Reviewed answers without a confidence.
    pub unscored: AgreementBand,
    /// Agreement per reviewer of record.
    pub reviewers: Vec<ReviewerAgreement>,
    /// With `--suggest-threshold`: the lowest threshold whose answers at or
    /// above it were right at least as often as asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suggestion: Option<ThresholdSuggestion>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgreementBand {
    pub from: f64,
    pub to: f64,
    pub reviewed: u64,
    pub agreed: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReviewerAgreement {
    pub reviewer: String,
    pub reviewed: u64,
    pub agreed: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ThresholdSuggestion {
    /// The precision asked for.
    pub target: f64,
    /// The threshold; `None` when no threshold reaches the target on the
    /// reviewed answers.
    pub threshold: Option<f64>,
    /// The reviewed answers at or above it, and the share of them the
    /// reviewers agreed with.
    pub sample: u64,
    pub precision: Option<f64>,
    /// The job's answered items, and how many of them fall below it.
    pub items: u64,
    pub below: u64,
}

/// The names of the Label Studio control (the answer) and object (the
/// document) a review queue's labeling config uses; by default the kind's
/// answer field and its first input field.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LabelStudioNames {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<String>,
}

/// A format the API exports or imports, as named in `?format=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Jsonl,
    Csv,
    /// Label Studio tasks (a JSON array), for review queues.
    LabelStudio,
    /// The OpenAI Batch API's output file: one request output object a line.
    OpenaiBatch,
}

impl Format {
    fn name(self) -> &'static str {
        match self {
            Format::Jsonl => "jsonl",
            Format::Csv => "csv",
            Format::LabelStudio => "label-studio",
            Format::OpenaiBatch => "openai-batch",
        }
    }

    /// Parses `name`, accepting only the formats in `allowed`; the error lists them.
    pub fn parse(name: &str, allowed: &[Format]) -> Result<Format, String> {
        allowed.iter().copied().find(|f| f.name() == name).ok_or_else(|| {
            let names: Vec<&str> = allowed.iter().map(|f| f.name()).collect();
            let list = match names.split_last() {
                Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
                _ => names.join(""),
            };
            format!("unknown format {name:?}: use {list}")
        })
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Jsonl | Format::OpenaiBatch => "application/x-ndjson",
            Format::Csv => "text/csv",
            Format::LabelStudio => "application/json",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::state::JobMode;

    #[test]
    fn a_jobs_mode_is_the_submitted_one_else_its_kinds_else_live() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../jobs/classify");
        let mut kind = common::spec::JobKind::load(&dir).unwrap();
        assert_eq!(NewJob::new(kind.clone()).mode(), JobMode::Live);
        kind.spec.mode = Some(JobMode::Batch);
        assert_eq!(NewJob::new(kind.clone()).mode(), JobMode::Batch);
        assert_eq!(NewJob { mode: Some(JobMode::Auto), ..NewJob::new(kind) }.mode(), JobMode::Auto);
        let spec: common::spec::JobSpec = serde_json::from_value(
            serde_json::json!({"kind": "k", "model": "m", "max_tokens": 1, "answer_field": "a", "mode": "auto"}),
        )
        .unwrap();
        assert_eq!(spec.mode, Some(JobMode::Auto));
    }
}

/// `POST /v1/admin/prune`: remove the jobs created before the start of
/// `before`'s month (UTC), with their results and audit trail.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PruneRequest {
    pub before: DateTime<Utc>,
    /// Only say what would go.
    #[serde(default)]
    pub dry_run: bool,
}

/// What a prune removed (or, with `dry_run`, would remove).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pruned {
    /// Jobs created before this went: the start of `before`'s month.
    pub boundary: DateTime<Utc>,
    /// The partitions dropped, by name.
    pub partitions: Vec<String>,
    pub jobs: u64,
    /// Rows dropped, by table.
    pub rows: std::collections::BTreeMap<String, u64>,
    pub dry_run: bool,
}

/// A job a prune would remove that is still needed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NeededJob {
    pub job: Uuid,
    pub state: String,
    /// Answers waiting for a reviewer (below the threshold or held at a gate).
    pub waiting_review: i64,
}
