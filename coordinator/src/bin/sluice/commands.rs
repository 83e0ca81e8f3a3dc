//! The `sluice` subcommands: what each does, its flags, and how it prints.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use coordinator::client::{Client, ClientError};
use coordinator::model::{parse_dollars, IngestReport, JobStatus, LabelStudioNames, NewJob};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use uuid::Uuid;

/// Sluice pushes large batches of documents through language models within
/// the provider's limits, losing nothing.
///
/// Every command that talks to the coordinator sends an API token: from
/// SLUICE_TOKEN, or the file `sluice login` saves (~/.config/sluice/token).
///
/// Typical use:
///   sluice login < my-token
///   sluice sample classify --count 10000 > docs.jsonl
///   sluice submit jobs/classify --input docs.jsonl --watch
///   sluice results JOB_ID --format csv > results.csv
///
/// Exit codes (of commands that wait for a job: submit --wait, status
/// --watch, resume --watch; the others exit 0 or 1):
///   0  done: the job completed and every item succeeded
///   1  error: the command failed (network, token, a file)
///   2  refused: the input or the decisions file had invalid lines, or
///      a job kind is unsound (`sluice kind check`)
///   3  the job completed with failed items (see `sluice results`)
///   4  the job was cancelled
///   5  the job never ran: rejected, or its upload abandoned
///   6  the job paused at its spending cap (resume it with --max-cost)
///  64  usage: the command line was wrong (an unknown option, a JOB that is
///      not a job id); the message says which
#[derive(Debug, Parser)]
#[command(name = "sluice", version, verbatim_doc_comment)]
pub struct Cli {
    /// URL of the coordinator's API.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "SLUICE_COORDINATOR",
        default_value = "http://127.0.0.1:7700"
    )]
    coordinator: String,
    /// CA certificate(s) (PEM) to trust for an https:// coordinator, besides
    /// the usual roots.
    #[arg(long, global = true, help_heading = "Global options", env = "SLUICE_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// File holding your API token, readable only by you [default:
    /// ~/.config/sluice/token]. SLUICE_TOKEN, if set, is used instead.
    #[arg(long, global = true, help_heading = "Global options", env = "SLUICE_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// A note on who is acting (default: $USER), kept beside the token's
    /// holder in the audit trail; the token's holder is the actor.
    #[arg(long, global = true, help_heading = "Global options", env = "SLUICE_ACTOR")]
    actor: Option<String>,
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size of the `serve` variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Run the coordinator service (API, chunk publishing, reconciler).
    Serve {
        #[command(flatten)]
        config: coordinator::ServeConfig,
        #[command(flatten)]
        telemetry: common::telemetry::TelemetryConfig,
    },
    /// Apply the database migrations, as the role that owns the tables.
    ///
    /// The coordinator and workers then connect as roles that own nothing
    /// (deploy/roles.sql), so they cannot rewrite the audit trail.
    Migrate {
        /// Postgres URL of the owner role.
        #[arg(
            long,
            env = "SLUICE_MIGRATE_DATABASE_URL",
            default_value = "postgres://sluice:sluice@127.0.0.1:5432/sluice"
        )]
        database_url: String,
        /// Do not migrate: wait until someone has (up to this many seconds),
        /// reading the schema version with any role's URL. A coordinator pod's
        /// init container runs this while the migration Job works.
        #[arg(long, value_name = "SECONDS")]
        wait: Option<u64>,
    },
    /// Submit a job: a job-kind folder (e.g. jobs/classify) and a JSONL input file.
    ///
    /// Each input line is a JSON object with a unique "id" (or "custom_id") and
    /// the fields the kind's template uses. By default a file with any bad line
    /// is rejected with nothing ingested; every bad line is listed with its number.
    Submit(SubmitArgs),
    /// Show a job's progress: counts by state, items/s and ETA.
    Status {
        /// The job id (`sluice jobs` lists them; `submit` prints it).
        job: Uuid,
        /// Show a live progress bar until the job finishes, then exit with the
        /// job's outcome (see the exit codes above).
        #[arg(long, visible_alias = "wait")]
        watch: bool,
        /// Print JSON (the API's body) instead of text, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// List recent jobs, newest first.
    Jobs {
        /// How many jobs to list at most.
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Only this project's jobs (an admin token sees every project's;
        /// any other token only its own).
        #[arg(long)]
        project: Option<String>,
        /// Print JSON (the API's body) instead of text, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Export a job's results in input order.
    Results {
        /// The job id (`sluice jobs` lists them; `submit` prints it).
        job: Uuid,
        /// `openai-batch` writes the OpenAI Batch API's output file format
        /// (`{"id", "custom_id", "response": {"status_code", "request_id",
        /// "body"}, "error"}` a line), for tools written for that API.
        #[arg(long, default_value = "jsonl", value_parser = ["jsonl", "csv", "openai-batch"])]
        format: String,
        /// Write to this file instead of standard output.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Cancel a job: no new work starts; results so far are kept.
    Cancel {
        /// The job id (`sluice jobs` lists them; `submit` prints it).
        job: Uuid,
        /// Print JSON (the API's body) instead of text, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Re-run a completed, cancelled or paused job's unfinished items: those
    /// without a result and those that failed. Items with an answer are never
    /// sent to the model again.
    Resume {
        /// The job id (`sluice jobs` lists them; `submit` prints it).
        job: Uuid,
        /// Only re-run failed items (and items without a result in the same chunks).
        #[arg(long)]
        failed_only: bool,
        /// Set or raise the job's spending cap, in dollars: a job paused at
        /// its cap goes on only with a higher one.
        #[arg(long, value_name = "DOLLARS", value_parser = parse_dollars, allow_negative_numbers = true)]
        max_cost: Option<f64>,
        /// Show a live progress bar until the job finishes, then exit with the
        /// job's outcome (see the exit codes above).
        #[arg(long, visible_alias = "wait")]
        watch: bool,
        /// Print JSON (the API's body) instead of text, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// The review queue: export doubtful results for people, import their decisions.
    #[command(subcommand)]
    Review(ReviewCommand),
    /// The response cache: answers already paid for, reused by identical
    /// requests of later jobs (temperature 0 jobs, unless --no-cache).
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Notifications: webhooks told when a job completes, fails, pauses,
    /// waits for review, or a model it uses stays unavailable. Deliveries
    /// are signed as Standard Webhooks (verify them with `webhooks
    /// secret`), retried with back-off, and recorded (`webhooks log JOB`).
    /// A single job's webhooks are given at submit (--notify).
    #[command(subcommand)]
    Webhooks(WebhooksCommand),
    /// Save your API token (read from standard input) for later commands,
    /// after checking it with the coordinator.
    Login,
    /// Show whom your token belongs to: name, project and role.
    Whoami {
        /// Print JSON (the API's body) instead of text, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Installation and tokens: the token secret, the first admin token,
    /// making, listing and revoking tokens.
    #[command(subcommand)]
    Admin(AdminCommand),
    /// Estimate a job before running it: validates the input as `submit`
    /// does, renders every prompt and counts its tokens (exactly for OpenAI
    /// models, with their tokenizer; approximately for others, and says
    /// which), and prints the cost at live and Batch API prices, at most,
    /// and the time the model's rate limits imply. No model is called.
    ///
    /// With a token, the coordinator is asked which prompts its response
    /// cache already answers (it is sent the prompts' digests, never the
    /// documents) and what earlier jobs of the kind used per item; the
    /// expected figures count those. --offline skips that.
    ///
    /// Exits 2 when the input has invalid lines (listed with their numbers),
    /// as `submit` would refuse the file.
    Estimate {
        /// The job-kind folder (e.g. jobs/classify).
        job_dir: PathBuf,
        /// The JSONL input.
        #[arg(long, short)]
        input: PathBuf,
        /// Model to use instead of the one in job.toml.
        #[arg(long, env = "SLUICE_MODEL")]
        model: Option<String>,
        /// The providers file (for the model's rate limits); without it the
        /// kind's model is taken as named, without limits.
        #[arg(long, env = "SLUICE_PROVIDERS_FILE")]
        providers_file: Option<PathBuf>,
        /// The price table.
        #[arg(long, env = "SLUICE_PRICES_FILE", default_value = "deploy/prices.toml")]
        prices_file: PathBuf,
        /// Estimate as for `submit --no-cache`: every item calls the model.
        #[arg(long)]
        no_cache: bool,
        /// Do not ask the coordinator (no cache hits, no history).
        #[arg(long)]
        offline: bool,
        /// Print JSON (the API's body) instead of text, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Check job kinds without running them.
    #[command(subcommand)]
    Kind(KindCommand),
    /// Print deterministic synthetic documents with known answers as JSONL.
    Sample {
        /// Job kind the inputs are for: classify and summarize take topic
        /// documents, article takes briefs, contract-review takes contracts
        /// (each with its known answer: `expected`, `risky_clauses`).
        #[arg(value_parser = ["classify", "summarize", "article", "contract-review"])]
        kind: String,
        /// How many documents.
        #[arg(long, default_value_t = 1000)]
        count: u64,
        /// Different seeds give different documents.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

#[derive(Debug, Subcommand)]
enum KindCommand {
    /// Check job-kind folders as `submit` and `estimate` do before any call:
    /// job.toml's fields, the template against input_fields, answer_field
    /// and labels against the output schema, the stages. Every problem is
    /// named with its file and field. Exits 0 when every kind is sound, 2
    /// when one is not.
    Check {
        /// Job-kind folders (e.g. jobs/classify).
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum CacheCommand {
    /// Entries, their age, and the items answered from the cache.
    Stats {
        /// Another project's cache (admin tokens only).
        #[arg(long)]
        project: Option<String>,
        /// Print JSON (the API's body) instead of text, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Delete cached answers, so later jobs call the model again.
    Purge {
        /// Only entries older than this (90d, 12h, 30m, 3600s).
        #[arg(long, value_parser = parse_duration)]
        older_than: Option<u64>,
        /// Only this project's entries (an admin may name any; others only
        /// their own).
        #[arg(long)]
        project: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum WebhooksCommand {
    /// Tell URL of every job of the project (events: job.completed,
    /// job.failed, job.paused, review.ready, breaker.open).
    Add {
        /// The receiver's URL (https:// outside a test).
        url: String,
        /// Send Slack's `{"text": ...}` instead of the JSON envelope (for a
        /// Slack incoming webhook).
        #[arg(long)]
        slack: bool,
        /// The project (default: your token's; only an admin may name another).
        #[arg(long)]
        project: Option<String>,
    },
    /// The webhooks of the project and of its jobs.
    List {
        /// The project (default: your token's; only an admin may name another).
        #[arg(long)]
        project: Option<String>,
        /// Print JSON (the API's body) instead of text, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Stop telling a webhook (by the id `list` shows).
    Remove {
        /// The webhook's id, as `webhooks list` shows it.
        id: i64,
    },
    /// The project's signing secret (whsec_...): a receiver checks the
    /// webhook-signature header with it, e.g. with a Standard Webhooks library.
    Secret {
        /// The project (default: your token's; only an admin may name another).
        #[arg(long)]
        project: Option<String>,
    },
    /// Every notification of a job: event, receiver, attempts, outcome.
    Log {
        /// The job id (`sluice jobs` lists them; `submit` prints it).
        job: Uuid,
        /// Print JSON (the API's body) instead of text, for scripts.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ReviewCommand {
    /// Write the results that need review: those below the job's threshold
    /// (or below --below), least confident first, and the answers a stage's
    /// gate holds (with `stage` named). An ensemble's answers carry every
    /// model's vote.
    Export {
        /// The job id (`sluice jobs` lists them; `submit` prints it).
        job: Uuid,
        /// Include every answer with a confidence under this instead.
        #[arg(long)]
        below: Option<f64>,
        /// jsonl, csv, or label-studio: tasks with the model's answer as a
        /// prediction and its confidence as the score, and the labeling
        /// config they validate against (written beside --output as
        /// NAME.label-config.xml; --config prints it alone).
        #[arg(long, default_value = "jsonl", value_parser = ["jsonl", "csv", "label-studio"])]
        format: String,
        /// Write to this file instead of standard output.
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Print only the Label Studio labeling config (XML) for the queue.
        #[arg(long)]
        config: bool,
        #[command(flatten)]
        names: LabelStudioArgs,
    },
    /// Record people's decisions from a file: JSONL lines {"id", "answer",
    /// "reviewer"?, "decided_at"?} or CSV with the header
    /// id,answer[,reviewer][,decided_at]. For an answer held at a gate, the
    /// same answer approves it, another edits it ("output" may give the
    /// whole edited output), and "reject" with a reason (instead of an
    /// answer) ends the item; approved items go on at once. The reviewer
    /// recorded is your token's holder; a reviewer named in the file is kept
    /// as a note. Any bad line (named by number) rejects the whole file.
    ///
    /// Label Studio's own JSON and CSV exports of a queue exported with
    /// --format label-studio are read as they come: each task maps back to
    /// its item through data.sluice_id, the latest annotation of a task
    /// counts, skipped annotations and tasks nobody annotated are left out,
    /// and the annotator is kept as the reviewer the file names.
    Import {
        /// The job id (`sluice jobs` lists them; `submit` prints it).
        job: Uuid,
        /// The decisions file: .jsonl, .json (also Label Studio's JSON
        /// export) or .csv (also Label Studio's CSV export).
        file: PathBuf,
        /// The Label Studio control holding the answer, if the project's
        /// config names it otherwise than the kind's answer field.
        #[arg(long)]
        ls_control: Option<String>,
    },
    /// How often reviewers agreed with the model, by the model's confidence
    /// (0.0–0.1 up to 0.9–1.0) and by reviewer: evidence for the review
    /// threshold. Only answers a person decided count, so review a sample
    /// above the threshold too (`review export JOB --below 1`) to measure
    /// the answers that would not go to review.
    Stats {
        /// The job id (`sluice jobs` lists them; `submit` prints it).
        job: Uuid,
        /// Also propose the lowest threshold whose answers at or above it
        /// reviewers agreed with at least this often (default 0.95).
        #[arg(long, num_args = 0..=1, default_missing_value = "0.95", value_name = "PRECISION")]
        suggest_threshold: Option<f64>,
        /// Print JSON (the API's body) instead of text, for scripts.
        #[arg(long)]
        json: bool,
    },
}

/// Names in the Label Studio labeling config, for a project whose config
/// is already set up (e.g. from a Label Studio template).
#[derive(Debug, clap::Args)]
struct LabelStudioArgs {
    /// Name of the control that holds the answer (default: the kind's
    /// answer field, e.g. `label`).
    #[arg(long)]
    ls_control: Option<String>,
    /// Name of the object that shows the document (default: the kind's
    /// first input field, e.g. `text`).
    #[arg(long)]
    ls_object: Option<String>,
}

#[derive(Debug, Subcommand)]
enum AdminCommand {
    /// Write a new token secret for the coordinator (SLUICE_TOKEN_SECRET_FILE),
    /// readable only by you. Every coordinator needs the same one; replacing
    /// it invalidates every token.
    Secret {
        /// The file to write.
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Make the first admin token of an installation, straight in Postgres:
    /// run where the database and the token secret are at hand.
    Bootstrap {
        /// Postgres URL of the coordinator's role.
        #[arg(
            long,
            env = "SLUICE_DATABASE_URL",
            default_value = "postgres://sluice_coordinator:sluice@127.0.0.1:5432/sluice"
        )]
        database_url: String,
        /// The coordinator's token secret.
        #[arg(long, env = "SLUICE_TOKEN_SECRET_FILE")]
        token_secret_file: PathBuf,
        /// Whom the token is for, recorded as the actor of what it does.
        #[arg(long, default_value = "admin")]
        name: String,
        /// Save the token in your token file (see --token-file) instead of printing it.
        #[arg(long)]
        save: bool,
        /// Make one even though an admin token exists (when all are lost).
        #[arg(long)]
        force: bool,
    },
    /// API tokens: create, list, revoke (needs an admin token).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Remove old jobs with their items, results and audit trail (needs an
    /// admin token). Results and the audit trail are kept in one partition
    /// per month of job creation: this drops the months that end by the
    /// start of DATE's month (UTC) and deletes their jobs. Refused, with the
    /// jobs named, while any of them is unfinished or has answers waiting for
    /// review. Each prune is recorded in the audit table `audit_prunes`.
    Prune {
        /// YYYY-MM-DD or an RFC 3339 time: jobs created before the start of
        /// its month go. Must not be in the future.
        #[arg(long, value_parser = parse_date)]
        before: chrono::DateTime<chrono::Utc>,
        /// Only say what would go.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON (the API's body) instead of text, for scripts.
        #[arg(long)]
        json: bool,
    },
}

/// `2026-11-15` (midnight UTC) or an RFC 3339 time.
fn parse_date(text: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    if let Ok(day) = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Ok(day.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc());
    }
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|_| format!("{text:?} is not a date: write YYYY-MM-DD (e.g. 2026-11-15) or an RFC 3339 time"))
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Make a token and print it, once: Sluice keeps only its hash.
    Create {
        /// Whom it is for (a person or a system), recorded as the actor of what it does.
        #[arg(long)]
        name: String,
        /// The project whose jobs it may see.
        #[arg(long, default_value = coordinator::auth::DEFAULT_PROJECT)]
        project: String,
        /// reader (status, results, jobs), submitter (+ submit, cancel,
        /// resume), reviewer (+ review export and import), admin (+ tokens,
        /// every project).
        #[arg(long, value_parser = ["reader", "submitter", "reviewer", "admin"])]
        role: String,
        /// Expire after this long: 90d, 12h, 30m or 3600s (default: never).
        #[arg(long, value_parser = parse_duration)]
        expires: Option<u64>,
        /// Print JSON (the API's body) instead of text, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// List tokens (never their values): who, project, role, expiry, last use.
    List {
        /// Print JSON (the API's body) instead of text, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token at once.
    Revoke {
        /// The token's id, as `admin token list` shows it.
        id: Uuid,
    },
}

/// Seconds in `90d`, `12h`, `30m` or `3600s`.
fn parse_duration(text: &str) -> Result<u64, String> {
    let (number, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
    let n: u64 = number.parse().map_err(|_| format!("{text:?} is not a duration like 90d, 12h, 30m or 3600s"))?;
    let scale = match unit {
        "d" => 86_400,
        "h" => 3_600,
        "m" => 60,
        "s" | "" => 1,
        _ => return Err(format!("unknown unit {unit:?} in {text:?}: use d, h, m or s")),
    };
    match n.checked_mul(scale) {
        Some(0) | None => Err(format!("{text:?} is not a usable duration")),
        Some(s) => Ok(s),
    }
}

#[derive(Debug, clap::Args)]
struct SubmitArgs {
    /// Folder holding job.toml, the prompt template and the output schema.
    job_dir: PathBuf,
    /// JSONL input file.
    #[arg(long, short)]
    input: PathBuf,
    /// Ingest the good lines and record the bad ones instead of rejecting the file.
    #[arg(long)]
    skip_invalid: bool,
    /// Send results with a confidence below this to the review queue (instead
    /// of the kind's confidence_threshold).
    #[arg(long)]
    review_below: Option<f64>,
    /// Model to use instead of the one in job.toml (e.g. when pointing
    /// workers at a real provider). For an OpenAI batch file (jobs/openai-batch)
    /// the default is the model its lines name.
    #[arg(long, env = "SLUICE_MODEL")]
    model: Option<String>,
    /// Keep watching the job's progress until it finishes, then exit with the
    /// job's outcome (see the exit codes of `sluice --help`).
    #[arg(long, visible_alias = "wait")]
    watch: bool,
    /// Print machine-readable JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Run a model that has no price in the price table (its cost is then
    /// shown as unknown instead of the job being refused).
    #[arg(long)]
    allow_unpriced: bool,
    /// The project the job belongs to (default: your token's; only an
    /// admin token may name another).
    #[arg(long)]
    project: Option<String>,
    /// Spending cap in dollars: the job pauses (`paused: budget`) before a
    /// call would pass it; `sluice resume JOB --max-cost N` raises it.
    /// Calls already in flight may add at most their reserved worst case,
    /// which `status` shows.
    #[arg(long, value_name = "DOLLARS", value_parser = parse_dollars, allow_negative_numbers = true)]
    max_cost: Option<f64>,
    /// Neither read nor write the response cache, and call the model for
    /// identical items too (by default answers are reused at temperature 0).
    #[arg(long)]
    no_cache: bool,
    /// Use cached answers no older than this (90d, 12h, 30m, 3600s) [default: 30d].
    #[arg(long, value_parser = parse_duration)]
    cache_ttl: Option<u64>,
    /// Tell this URL of the job's events (completed, failed, paused, review
    /// ready, model unavailable) with a signed JSON POST; repeat for more.
    #[arg(long, value_name = "URL")]
    notify: Vec<String>,
    /// As --notify, with the body Slack's incoming webhooks take.
    #[arg(long, value_name = "URL")]
    notify_slack: Vec<String>,
    /// Estimate first (as `sluice estimate`) and ask before submitting.
    #[arg(long)]
    estimate: bool,
    /// With --estimate: submit without asking (needed when not on a terminal).
    #[arg(long)]
    yes: bool,
    /// The providers file, for --estimate's rate limits.
    #[arg(long, env = "SLUICE_PROVIDERS_FILE")]
    providers_file: Option<PathBuf>,
    /// `live`: one call per item under the shared rate limit. `batch`: each
    /// chunk's items go to the provider's batch API (OpenAI's Batch API,
    /// Anthropic's Message Batches) at half the price, answered within the
    /// provider's window (up to 24 hours); items a batch does not answer go
    /// in the chunk's next batch. `auto`: batch for the bulk, live for what
    /// a batch did not answer, for chunks of fewer than 5 items, and for
    /// whatever is left near the --deadline. [default: the kind's `mode` in
    /// job.toml, else live]
    #[arg(long, value_parser = parse_mode)]
    mode: Option<common::state::JobMode>,
    /// With --mode auto: when the job should be done (90d, 12h, 30m,
    /// 3600s) [default: 24h]. Batches give way to live calls a tenth of the
    /// time before it (at least 30 s).
    #[arg(long, value_parser = parse_duration)]
    deadline: Option<u64>,
    /// The price table, for --estimate.
    #[arg(long, env = "SLUICE_PRICES_FILE", default_value = "deploy/prices.toml")]
    prices_file: PathBuf,
}

fn parse_mode(text: &str) -> Result<common::state::JobMode, String> {
    text.parse().map_err(|_| format!("unknown mode {text:?}: use live, batch or auto"))
}

/// The exit code of a wrong command line (`EX_USAGE` of sysexits.h).
pub const USAGE: u8 = 64;

/// Runs one command and returns the process exit code.
pub async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let token_file = cli.token_file.clone().unwrap_or_else(coordinator::client::default_token_file);
    let actor = cli.actor.clone().or_else(|| std::env::var("USER").ok());
    // A client with the user's token, made only by commands that talk to the coordinator.
    let unauthenticated = || -> anyhow::Result<Client> {
        let client = Client::new(&cli.coordinator);
        Ok(match &cli.ca_file {
            Some(ca) => client.with_ca_file(ca)?,
            None => client,
        })
    };
    let api = || -> anyhow::Result<Client> {
        let token = coordinator::client::load_token(&token_file)?;
        let client = unauthenticated()?.with_token(&token);
        Ok(match &actor {
            Some(a) => client.with_actor(a),
            None => client,
        })
    };
    match cli.command {
        Command::Serve { config, telemetry } => {
            common::telemetry::init(&telemetry)?;
            coordinator::run(config, common::shutdown::on_signals()).await?;
        }
        Command::Migrate { database_url, wait: None } => {
            coordinator::store::migrate(&database_url).await?;
            eprintln!("database schema is up to date");
        }
        Command::Migrate { database_url, wait: Some(seconds) } => {
            let deadline = std::time::Instant::now() + Duration::from_secs(seconds);
            let mut said = None;
            loop {
                let version = match common::db::connect(&database_url, 1).await {
                    Ok(pool) => coordinator::store::schema_version(&pool).await.map_err(anyhow::Error::from),
                    Err(e) => Err(e.into()),
                };
                match version {
                    Ok((applied, latest)) if applied >= latest => break,
                    Ok((applied, latest)) if said != Some(applied) => {
                        eprintln!(
                            "the schema is at version {applied}, Sluice needs {latest}: waiting for `sluice migrate`"
                        );
                        said = Some(applied);
                    }
                    Err(e) if std::time::Instant::now() >= deadline => return Err(e),
                    _ => {}
                }
                if std::time::Instant::now() >= deadline {
                    anyhow::bail!("the schema was not migrated within {seconds} s: has the migration Job run?");
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            eprintln!("database schema is up to date");
        }
        Command::Estimate { job_dir, input, model, providers_file, prices_file, no_cache, offline, json } => {
            let client = if offline { None } else { api().ok() };
            let kind = load_kind(&job_dir, model, &input)?;
            if refuse_empty(&input)? {
                return Ok(ExitCode::from(2));
            }
            let e = estimate(client.as_ref(), &kind, &input, providers_file, &prices_file, no_cache).await?;
            print_estimate(&e, json);
            if e.invalid_lines > 0 {
                eprintln!(
                    "submit would refuse this file: fix the lines above, or pass --skip-invalid to submit the good ones"
                );
                return Ok(ExitCode::from(2));
            }
        }
        Command::Kind(KindCommand::Check { dirs }) => {
            let mut sound = true;
            for dir in dirs {
                match common::spec::JobKind::load(&dir) {
                    Ok(kind) => println!("{}: ok ({})", dir.display(), kind_summary(&kind)),
                    Err(e) => {
                        sound = false;
                        eprintln!("{}: {}", dir.display(), render_error(&anyhow::Error::from(e)));
                    }
                }
            }
            if !sound {
                return Ok(ExitCode::from(2));
            }
        }
        Command::Sample { kind, count, seed } => {
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            let make = match kind.as_str() {
                "article" => common::sample::brief,
                "contract-review" => common::sample::contract,
                _ => common::sample::document,
            };
            for i in 0..count {
                serde_json::to_writer(&mut out, &make(seed, i))?;
                out.write_all(b"\n")?;
            }
            out.flush()?;
        }
        Command::Login => {
            let mut token = String::new();
            if std::io::stdin().is_terminal() {
                eprint!("paste your API token and press Enter: ");
            }
            std::io::stdin().read_line(&mut token).context("cannot read the token from standard input")?;
            let token = token.trim();
            anyhow::ensure!(!token.is_empty(), "no token on standard input");
            let me = unauthenticated()?.with_token(token).whoami().await?;
            common::private_file::write(&token_file, token)
                .with_context(|| format!("cannot write {}", token_file.display()))?;
            eprintln!(
                "logged in as {} (role {}, project {}); token saved to {}",
                me.name,
                me.role,
                me.project,
                token_file.display()
            );
        }
        Command::Whoami { json } => {
            let me = api()?.whoami().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&me)?);
            } else {
                println!("{} (role {}, project {}, token {})", me.name, me.role, me.project, me.token_id);
            }
        }
        Command::Admin(command) => return admin(command, &token_file, api).await,
        _ => return jobs_command(cli.command, api()?).await,
    }
    Ok(ExitCode::SUCCESS)
}

async fn admin(
    command: AdminCommand,
    token_file: &std::path::Path,
    api: impl Fn() -> anyhow::Result<Client>,
) -> anyhow::Result<ExitCode> {
    match command {
        AdminCommand::Secret { out, force } => {
            anyhow::ensure!(
                force || !out.exists(),
                "{} exists: replacing the secret invalidates every token; pass --force to do it",
                out.display()
            );
            common::private_file::write(&out, &coordinator::auth::TokenSecret::generate())
                .with_context(|| format!("cannot write {}", out.display()))?;
            eprintln!("token secret written to {} (mode 600); set SLUICE_TOKEN_SECRET_FILE to it", out.display());
        }
        AdminCommand::Bootstrap { database_url, token_secret_file, name, save, force } => {
            let secret = coordinator::auth::TokenSecret::load(&token_secret_file)?;
            let pool = common::db::connect(&database_url, 1).await?;
            let created = coordinator::auth::bootstrap(&pool, &secret, &name, force).await?;
            if save {
                common::private_file::write(token_file, &created.token)
                    .with_context(|| format!("cannot write {}", token_file.display()))?;
                eprintln!("admin token {} saved to {}", created.info.id, token_file.display());
            } else {
                println!("{}", created.token);
                eprintln!("admin token {}: shown once; save it with `sluice login`", created.info.id);
            }
        }
        AdminCommand::Token(TokenCommand::Create { name, project, role, expires, json }) => {
            let role = role.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
            let new = coordinator::auth::NewToken { name, project, role, expires_in_s: expires };
            let created = api()?.create_token(&new).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&created)?);
            } else {
                println!("{}", created.token);
                let expiry = created.info.expires_at.map(|t| format!(", expires {}", t.format("%Y-%m-%d %H:%M UTC")));
                eprintln!(
                    "token {} for {} (role {}, project {}{}): shown once, Sluice keeps only its hash",
                    created.info.id,
                    created.info.name,
                    created.info.role,
                    created.info.project,
                    expiry.unwrap_or_default()
                );
            }
        }
        AdminCommand::Token(TokenCommand::List { json }) => {
            let tokens = api()?.tokens().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&tokens)?);
            } else {
                let when = |t: Option<chrono::DateTime<chrono::Utc>>| {
                    t.map(|t| t.format("%Y-%m-%d %H:%M").to_string()).unwrap_or_else(|| "-".into())
                };
                println!(
                    "{:<36}  {:<20}  {:<16}  {:<9}  {:<16}  {:<16}  state",
                    "token", "name", "project", "role", "expires", "last used"
                );
                for t in tokens {
                    let state = match (t.revoked_at, t.expires_at) {
                        (Some(_), _) => "revoked",
                        (None, Some(e)) if e <= chrono::Utc::now() => "expired",
                        _ => "active",
                    };
                    println!(
                        "{:<36}  {:<20}  {:<16}  {:<9}  {:<16}  {:<16}  {state}",
                        t.id,
                        t.name,
                        t.project,
                        t.role.as_str(),
                        when(t.expires_at),
                        when(t.last_used_at)
                    );
                }
            }
        }
        AdminCommand::Token(TokenCommand::Revoke { id }) => {
            let t = api()?.revoke_token(id).await?;
            eprintln!("token {} ({}) revoked", t.id, t.name);
        }
        AdminCommand::Prune { before, dry_run, json } => {
            let pruned = api()?.prune(before, dry_run).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&pruned)?);
            } else {
                let rows: Vec<String> = pruned.rows.iter().map(|(t, n)| format!("{n} {t}")).collect();
                println!(
                    "{} {} job(s) created before {}: {} partition(s){}",
                    if pruned.dry_run { "would remove" } else { "removed" },
                    pruned.jobs,
                    pruned.boundary.format("%Y-%m-%d"),
                    pruned.partitions.len(),
                    if rows.is_empty() { String::new() } else { format!(" ({} rows)", rows.join(", ")) }
                );
                for p in &pruned.partitions {
                    println!("  {p}");
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The commands that work on jobs through the coordinator's API.
async fn jobs_command(command: Command, client: Client) -> anyhow::Result<ExitCode> {
    match command {
        Command::Submit(args) => return submit(&client, args).await,
        Command::Status { job, watch, json } => {
            if watch {
                let status = watch_job(&client, job, json).await?;
                print_status(&status, json, &client);
                return Ok(outcome(&status));
            }
            print_status(&client.status(job).await?, json, &client);
        }
        Command::Jobs { limit, project, json } => {
            let mut jobs = client.jobs_of(limit, project.as_deref()).await?;
            // A token of one project is shown only its own, whatever it asks.
            if let Some(p) = &project {
                jobs.retain(|j| &j.project == p);
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&jobs)?);
            } else if jobs.is_empty() {
                println!("no jobs yet: submit one with `sluice submit jobs/classify --input docs.jsonl`");
            } else {
                let rows: Vec<[String; 8]> = jobs
                    .iter()
                    .map(|j| {
                        [
                            j.job_id.to_string(),
                            j.project.clone(),
                            j.kind.clone(),
                            shown_state(&j.state, j.failed),
                            j.total.to_string(),
                            j.done().to_string(),
                            j.failed.to_string(),
                            j.created_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                        ]
                    })
                    .collect();
                print!("{}", table(&JOBS_COLUMNS, &rows));
            }
        }
        Command::Results { job, format, output } => {
            let mut stream = client.results(job, &format).await?;
            let mut out: Box<dyn Write> = match &output {
                Some(p) => Box::new(std::io::BufWriter::new(
                    std::fs::File::create(p).with_context(|| format!("cannot create {}", p.display()))?,
                )),
                None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
            };
            // A reader that has seen enough (`sluice results JOB | head`) is not an error.
            let written = async {
                while let Some(piece) = stream.next().await {
                    out.write_all(&piece?)?;
                }
                out.flush()?;
                anyhow::Ok(())
            };
            match written.await {
                Err(e) if is_broken_pipe(&e) => return Ok(ExitCode::SUCCESS),
                r => r?,
            }
            if let Some(p) = output {
                eprintln!("results written to {}", p.display());
            }
        }
        Command::Resume { job, failed_only, max_cost, watch, json } => {
            let resumed = client.resume_with(job, failed_only, max_cost).await?;
            if json && !watch {
                println!("{}", serde_json::to_string(&resumed)?);
            } else {
                eprintln!(
                    "resumed: {} failed item(s) reset, {} chunk(s) reopened",
                    resumed.failed_reset, resumed.chunks
                );
            }
            if watch {
                let status = watch_job(&client, job, json).await?;
                print_status(&status, json, &client);
                return Ok(outcome(&status));
            }
        }
        Command::Review(ReviewCommand::Export { job, below, format, output, config, names }) => {
            let names = LabelStudioNames { control: names.ls_control, object: names.ls_object };
            let label_studio = format == "label-studio";
            anyhow::ensure!(!config || label_studio, "--config is for --format label-studio");
            if config {
                let xml = client.label_studio_config(job, &names).await?;
                match &output {
                    Some(p) => std::fs::write(p, xml).with_context(|| format!("cannot write {}", p.display()))?,
                    None => print!("{xml}"),
                }
                return Ok(ExitCode::SUCCESS);
            }
            let body = client.review_export_with(job, below, &format, &names).await?;
            match &output {
                Some(p) => {
                    std::fs::write(p, &body).with_context(|| format!("cannot write {}", p.display()))?;
                    eprintln!("review queue written to {}", p.display());
                    if label_studio {
                        let xml = client.label_studio_config(job, &names).await?;
                        let c = p.with_extension("label-config.xml");
                        std::fs::write(&c, xml).with_context(|| format!("cannot write {}", c.display()))?;
                        eprintln!(
                            "labeling config written to {} (paste it in the project's Labeling Interface)",
                            c.display()
                        );
                    }
                }
                None => {
                    std::io::stdout().write_all(&body)?;
                    if label_studio {
                        eprintln!("the labeling config these tasks need: sluice review export {job} --format label-studio --config");
                    }
                }
            }
        }
        Command::Review(ReviewCommand::Import { job, file, ls_control }) => {
            let format = match file.extension().and_then(|e| e.to_str()) {
                Some("csv") => "csv",
                Some("jsonl" | "json" | "ndjson") => "jsonl",
                _ => anyhow::bail!("{}: name the file .jsonl or .csv so its format is known", file.display()),
            };
            let body = std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let source = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            match client.review_import_with(job, body, format, &source, ls_control.as_deref()).await {
                Ok(report) if report.skipped > 0 => eprintln!(
                    "{} decision(s) recorded; {} task(s) without an annotation left as they were",
                    report.applied, report.skipped
                ),
                Ok(report) => eprintln!("{} decision(s) recorded", report.applied),
                Err(ClientError::Decisions { message, errors }) => {
                    for e in &errors {
                        eprintln!("line {}: {}", e.line, e.reason);
                    }
                    eprintln!("error: {message}");
                    return Ok(ExitCode::from(2));
                }
                Err(e) => return Err(e.into()),
            }
        }
        Command::Review(ReviewCommand::Stats { job, suggest_threshold, json }) => {
            let stats = client.review_stats(job, suggest_threshold).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&stats)?);
            } else {
                print_review_stats(job, &stats);
            }
        }
        Command::Webhooks(w) => webhooks(&client, w).await?,
        Command::Cancel { job, json } => {
            let status = client.cancel(job).await?;
            print_status(&status, json, &client);
        }
        Command::Cache(CacheCommand::Stats { project, json }) => {
            let s = client.cache_stats(project.as_deref()).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!("project  {}", s.project);
                let age = match (s.oldest, s.newest) {
                    (Some(a), Some(b)) => format!(", written {} to {}", a.format("%F %T"), b.format("%F %T")),
                    _ => String::new(),
                };
                println!("entries  {}{age}", s.entries);
                println!("reused   {} items answered from the cache, {} from an identical item", s.hits, s.shared);
            }
        }
        Command::Cache(CacheCommand::Purge { older_than, project }) => {
            let n = client.cache_purge(project.as_deref(), older_than).await?;
            eprintln!("{n} cached answer(s) deleted");
        }
        Command::Serve { .. }
        | Command::Migrate { .. }
        | Command::Sample { .. }
        | Command::Kind(_)
        | Command::Estimate { .. }
        | Command::Login
        | Command::Whoami { .. }
        | Command::Admin(_) => unreachable!("run by dispatch without a client"),
    }
    Ok(ExitCode::SUCCESS)
}

async fn submit(client: &Client, args: SubmitArgs) -> anyhow::Result<ExitCode> {
    let SubmitArgs {
        job_dir,
        input,
        skip_invalid,
        model,
        watch,
        json,
        review_below,
        allow_unpriced,
        project,
        max_cost,
        no_cache,
        cache_ttl,
        estimate: ask,
        yes,
        providers_file,
        prices_file,
        mode,
        deadline,
        notify,
        notify_slack,
    } = args;
    let notify: Vec<coordinator::model::NewWebhook> = notify
        .into_iter()
        .map(|url| (url, coordinator::model::WebhookFormat::Json))
        .chain(notify_slack.into_iter().map(|url| (url, coordinator::model::WebhookFormat::Slack)))
        .map(|(url, format)| coordinator::model::NewWebhook { url, format, project: None })
        .collect();
    let kind = load_kind(&job_dir, model, &input)?;
    if refuse_empty(&input)? {
        return Ok(ExitCode::from(2));
    }
    if ask {
        let e = estimate(Some(client), &kind, &input, providers_file, &prices_file, no_cache).await?;
        print_estimate(&e, json);
        if e.invalid_lines > 0 && !skip_invalid {
            eprintln!("submit would refuse this file: fix the lines above, or pass --skip-invalid");
            return Ok(ExitCode::from(2));
        }
        if let (Some(cap), Some(cost)) = (max_cost, e.cost_usd_expected) {
            if cost > cap {
                eprintln!("note: the expected cost (${cost:.4}) is over the cap (${cap:.4}): the job will pause there");
            }
        }
        if !yes {
            if !std::io::stdin().is_terminal() {
                eprintln!("not submitted: pass --yes to submit after an estimate without a terminal to confirm on");
                return Ok(ExitCode::from(1));
            }
            eprint!("submit this job? [y/N] ");
            let mut answer = String::new();
            std::io::stdin().read_line(&mut answer).context("cannot read the answer")?;
            if !matches!(answer.trim(), "y" | "Y" | "yes") {
                eprintln!("not submitted");
                return Ok(ExitCode::SUCCESS);
            }
        }
    }
    let size = std::fs::metadata(&input).with_context(|| format!("cannot read input {}", input.display()))?.len();
    let input_name = input.file_name().map(|n| n.to_string_lossy().into_owned());
    let created = client
        .create_job(&NewJob {
            input_name,
            review_below,
            allow_unpriced,
            project,
            max_cost_usd: max_cost,
            cache: no_cache.then_some(false),
            cache_ttl_s: cache_ttl,
            mode,
            deadline_s: deadline,
            notify,
            ..NewJob::new(kind)
        })
        .await?;
    for w in &created.warnings {
        eprintln!("warning: {w}");
    }
    let job_id = created.job_id;
    let bar = progress_bar(size, "{spinner} uploading [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec})", json);
    let b = bar.clone();
    let result = client.upload_file(job_id, &input, skip_invalid, move |sent| b.set_position(sent)).await;
    bar.finish_and_clear();
    let report = match result {
        Ok(r) => r,
        Err(ClientError::Api { message, report: Some(report), .. }) => {
            print_report(&report, json);
            eprintln!("error: {message}");
            eprintln!("fix the lines above, or pass --skip-invalid to ingest the good lines and record the bad ones");
            return Ok(ExitCode::from(2));
        }
        Err(e) => return Err(e.into()),
    };
    print_report(&report, json);
    if watch {
        let status = watch_job(client, job_id, json).await?;
        print_status(&status, json, client);
        return Ok(outcome(&status));
    } else if !json {
        eprintln!("watch it with: sluice status {job_id} --watch");
    }
    Ok(ExitCode::SUCCESS)
}

fn print_report(r: &IngestReport, json: bool) {
    if json {
        println!("{}", serde_json::to_string(r).expect("report serialises"));
        return;
    }
    for e in &r.errors {
        eprintln!("line {}: {}", e.line, e.reason);
    }
    if r.invalid_lines as usize > r.errors.len() {
        eprintln!("... and {} more invalid lines", r.invalid_lines as usize - r.errors.len());
    }
    if r.state == "rejected" {
        eprintln!("job {} rejected: {} invalid line(s), nothing ingested", r.job_id, r.invalid_lines);
    } else {
        println!("{}", r.job_id);
        eprintln!(
            "submitted: {} items in {} chunks ({} invalid lines skipped), ingested in {:.2}s",
            r.items, r.chunks, r.invalid_lines, r.ingest_seconds
        );
        if r.copies > 0 {
            eprintln!("{} items repeat an earlier item's prompt: they share its answer, one call for each", r.copies);
        }
    }
}

fn progress_bar(len: u64, template: &str, quiet: bool) -> ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(ProgressStyle::with_template(template).expect("valid template").progress_chars("=> "));
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// Polls a job until it reaches a final state, with a progress bar on a terminal
/// and a line every few seconds otherwise.
async fn watch_job(client: &Client, job: Uuid, quiet: bool) -> anyhow::Result<JobStatus> {
    let first = client.status(job).await?;
    let bar = progress_bar(first.total, "{spinner} [{elapsed_precise}] [{bar:30}] {pos}/{len} {msg}", quiet);
    let plain = !quiet && bar.is_hidden();
    let mut last_print = std::time::Instant::now();
    let mut status = first;
    loop {
        bar.set_length(status.total);
        bar.set_position(status.done());
        // Items held at a gate wait for people: say so, and how to decide them.
        let waiting: u64 = status.stages.iter().map(|s| s.waiting).sum();
        let gates = if waiting > 0 {
            format!(", {waiting} waiting at a gate (sluice review export {job})")
        } else {
            String::new()
        };
        bar.set_message(format!("{:.0} items/s, {} failed{}{gates}", status.items_per_s, status.failed, eta(&status)));
        if plain && last_print.elapsed() >= Duration::from_secs(5) {
            eprintln!(
                "{}: {}/{} done, {} failed, {:.0} items/s{}{gates}",
                status.state,
                status.done(),
                status.total,
                status.failed,
                status.items_per_s,
                eta(&status)
            );
            last_print = std::time::Instant::now();
        }
        if status.is_final() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        status = client.status(job).await?;
    }
    bar.finish_and_clear();
    Ok(status)
}

fn eta(s: &JobStatus) -> String {
    s.eta_s.map(|e| format!(", ETA {}s", e.ceil() as u64)).unwrap_or_default()
}

async fn webhooks(client: &Client, command: WebhooksCommand) -> anyhow::Result<()> {
    use coordinator::model::{NewWebhook, WebhookFormat};
    match command {
        WebhooksCommand::Add { url, slack, project } => {
            let format = if slack { WebhookFormat::Slack } else { WebhookFormat::Json };
            let added = client.add_webhook(&NewWebhook { url, format, project }).await?;
            eprintln!(
                "webhook {} added for every job of project {}; verify its deliveries with `sluice webhooks secret`",
                added.id,
                added.project.unwrap_or_default()
            );
        }
        WebhooksCommand::List { project, json } => {
            let hooks = client.webhooks(project.as_deref()).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&hooks)?);
            } else if hooks.is_empty() {
                println!("no webhooks: add one with `sluice webhooks add URL` or `submit --notify URL`");
            } else {
                for h in hooks {
                    let scope = match (&h.project, h.job_id) {
                        (Some(p), _) => format!("project {p}"),
                        (None, Some(j)) => format!("job {j}"),
                        _ => String::new(),
                    };
                    println!("{:>5}  {:<5}  {scope:<44}  {}", h.id, h.format.as_str(), h.url);
                }
            }
        }
        WebhooksCommand::Remove { id } => {
            client.remove_webhook(id).await?;
            eprintln!("webhook {id} removed");
        }
        WebhooksCommand::Secret { project } => {
            let s = client.webhook_secret(project.as_deref()).await?;
            println!("{}", s.secret);
            eprintln!("the signing secret of project {}: keep it with the receivers only", s.project);
        }
        WebhooksCommand::Log { job, json } => {
            let log = client.notifications(job).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&log)?);
            } else if log.is_empty() {
                println!("no notifications for job {job} yet");
            } else {
                for d in log {
                    let outcome = match (&d.last_status, &d.last_error) {
                        (_, Some(e)) => e.clone(),
                        (Some(s), None) => format!("HTTP {s}"),
                        _ => String::new(),
                    };
                    println!(
                        "{}  {:<13} {:<9} attempts {}  {}  {outcome}",
                        d.created_at.format("%F %T"),
                        d.event,
                        d.state,
                        d.attempts,
                        d.url
                    );
                }
            }
        }
    }
    Ok(())
}

fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        "-".into()
    } else {
        format!("{:.1}%", 100.0 * part as f64 / whole as f64)
    }
}

fn print_review_stats(job: Uuid, s: &coordinator::model::ReviewStats) {
    println!("job {job}: review threshold {}", s.threshold);
    println!(
        "reviewed {} answer(s); the reviewers gave the model's answer for {} ({})",
        s.reviewed,
        s.agreed,
        percent(s.agreed, s.reviewed)
    );
    println!();
    println!("{:<13} {:>8} {:>7} {:>9}", "confidence", "reviewed", "agreed", "agreement");
    for b in s.bands.iter().chain(std::iter::once(&s.unscored)).filter(|b| b.reviewed > 0) {
        let band = if b.to == 0.0 { "none".to_string() } else { format!("{:.1}-{:.1}", b.from, b.to) };
        let bar = "#".repeat((20 * b.agreed / b.reviewed.max(1)) as usize);
        println!("{band:<13} {:>8} {:>7} {:>9}  {bar}", b.reviewed, b.agreed, percent(b.agreed, b.reviewed));
    }
    if !s.reviewers.is_empty() {
        println!();
        println!("{:<24} {:>8} {:>7} {:>9}", "reviewer", "reviewed", "agreed", "agreement");
        for r in &s.reviewers {
            println!("{:<24} {:>8} {:>7} {:>9}", r.reviewer, r.reviewed, r.agreed, percent(r.agreed, r.reviewed));
        }
    }
    let Some(g) = &s.suggestion else { return };
    println!();
    match (g.threshold, g.precision) {
        (Some(t), Some(p)) => {
            println!("suggested threshold for {:.0}% precision: {t:.4}", 100.0 * g.target);
            println!(
                "  reviewed answers at or above it: {}, {:.1}% of them agreed with",
                g.sample,
                100.0 * p
            );
            println!(
                "  {} of the job's {} answers ({}) are below it and would go to review (now: below {})",
                g.below,
                g.items,
                percent(g.below, g.items),
                s.threshold
            );
            if g.sample < 30 {
                println!(
                    "  only {} reviewed answer(s) back this: review a sample above the threshold (sluice review export {job} --below 1) for firmer evidence",
                    g.sample
                );
            }
        }
        _ => println!(
            "no threshold reaches {:.0}% precision on the reviewed answers: review a sample above the threshold (sluice review export {job} --below 1) to measure more",
            100.0 * g.target
        ),
    }
}

fn print_status(s: &JobStatus, json: bool, client: &Client) {
    if json {
        println!("{}", serde_json::to_string_pretty(s).expect("status serialises"));
        return;
    }
    let state = match &s.paused_reason {
        Some(r) if s.state == "paused" => format!("paused: {r}"),
        _ => s.state.clone(),
    };
    println!("job      {}  ({}, {state}, project {})", s.job_id, s.kind, s.project);
    if let Some(name) = &s.input_name {
        println!("input    {name}");
    }
    println!(
        "items    {} total: {} succeeded, {} failed, {} pending{}",
        s.total,
        s.succeeded,
        s.failed,
        s.pending,
        if s.invalid_lines > 0 { format!(" ({} invalid lines)", s.invalid_lines) } else { String::new() }
    );
    if s.needs_review > 0 || s.reviewed > 0 {
        let threshold = s.review_below.map(|t| format!(" (confidence below {t})")).unwrap_or_default();
        println!("review   {} waiting{threshold}, {} decided", s.needs_review, s.reviewed);
        if s.needs_review > 0 {
            println!("         review them at {}", client.review_page_url(s.job_id));
            println!("         or export them: sluice review export {} --output review.jsonl", s.job_id);
        }
    }
    println!("chunks   {}/{} done", s.chunks_done, s.chunks_total);
    for (i, st) in s.stages.iter().enumerate() {
        let mut parts = vec![format!("{} passed", st.passed)];
        if st.answers > st.passed {
            parts[0].push_str(&format!(" ({} segment answers)", st.answers));
        }
        if st.needs_review > 0 {
            parts.push(format!("{} answers below its review threshold", st.needs_review));
        }
        if st.waiting > 0 {
            parts.push(format!("{} waiting at its gate (sluice review export)", st.waiting));
        }
        if st.failed > 0 {
            parts.push(format!("{} failed here", st.failed));
        }
        println!("stage {}  {}: {}; {} calls, ${:.4}", i + 1, st.name, parts.join(", "), st.attempts, st.cost_usd);
    }
    if let Some(b) = &s.budget {
        let paused = if s.state == "paused" { " (paused: raise it with `sluice resume JOB --max-cost N`)" } else { "" };
        println!(
            "budget   ${:.4} spent of ${:.4} cap, at most ${:.4} more from calls in flight{paused}",
            b.spent_usd, b.cap_usd, b.in_flight_usd
        );
    }
    if s.reuse && (s.cache_hits > 0 || s.shared > 0) {
        println!(
            "reuse    {} items answered from the cache, {} from an identical item, at no cost",
            s.cache_hits, s.shared
        );
    }
    if s.unpriced_attempts > 0 {
        println!(
            "usage    {} tokens in, {} out, cost unknown: {} attempts used models without a price",
            s.tokens_in, s.tokens_out, s.unpriced_attempts
        );
    } else {
        let projected = s.projected_cost_usd.map(|p| format!(", about ${p:.4} for the whole job")).unwrap_or_default();
        println!("usage    {} tokens in, {} out, ${:.4}{projected}", s.tokens_in, s.tokens_out, s.cost_usd);
    }
    for c in &s.confidence_sources {
        let note = c.note.as_deref().map(|n| format!(" ({n})")).unwrap_or_default();
        println!("trust    {} results scored by {}{note}", c.results, c.strategy);
    }
    if s.batches_pending > 0 || s.batch_items_done > 0 {
        let reused = s.cache_hits + s.shared;
        let live = s.succeeded.saturating_sub(s.batch_items_done + reused);
        let mut paths = vec![format!("{} items answered through provider batches", s.batch_items_done)];
        if s.batches_pending > 0 {
            paths.push(format!("{} waiting in {} batches", s.batch_items_pending, s.batches_pending));
        }
        paths.push(format!("{live} answered live"));
        if reused > 0 {
            paths.push(format!("{reused} reused"));
        }
        println!("batches  {}", paths.join(", "));
        println!("saved    ${:.4} against live prices", s.batch_saved_usd);
    }
    for m in &s.output_modes {
        match m.mode.strip_prefix("batch:") {
            Some(mode) => println!(
                "output   {}/{} asked for {mode} through provider batches ({} attempts)",
                m.provider, m.model, m.attempts
            ),
            None => println!("output   {}/{} asked for {} ({} attempts)", m.provider, m.model, m.mode, m.attempts),
        }
    }
    let elapsed = match (s.started_at, s.finished_at) {
        (Some(a), Some(b)) => format!(" in {:.1}s", (b - a).num_milliseconds() as f64 / 1000.0),
        _ => String::new(),
    };
    println!("rate     {:.1} items/s{}{}", s.items_per_s, eta(s), elapsed);
}

/// Says so, once, when `input` holds no JSONL line (nothing, or blank
/// lines only), before any job is made of it: true then. Reads up to the
/// first byte that is not white space.
fn refuse_empty(input: &std::path::Path) -> anyhow::Result<bool> {
    use std::io::Read as _;
    let file = std::fs::File::open(input).with_context(|| format!("cannot read input {}", input.display()))?;
    for byte in std::io::BufReader::new(file).bytes() {
        let byte = byte.with_context(|| format!("cannot read input {}", input.display()))?;
        if !byte.is_ascii_whitespace() {
            return Ok(false);
        }
    }
    eprintln!(
        "error: the input is empty: no JSONL lines found in {}: nothing was submitted (one JSON object a line)",
        input.display()
    );
    Ok(true)
}

/// What `sluice kind check` says of a sound kind.
fn kind_summary(kind: &common::spec::JobKind) -> String {
    let s = &kind.spec;
    let mut parts = vec![format!("kind {}", s.kind), format!("model {}", s.model)];
    if !s.stages.is_empty() {
        parts.push(format!("{} stages", s.stages.len()));
    }
    parts.push(format!("answer field {:?}", s.answer_field));
    if !s.labels.is_empty() {
        parts.push(format!("{} labels", s.labels.len()));
    }
    let confidence: Vec<String> = s
        .strategies()
        .map(|c| serde_json::to_value(c).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default())
        .collect();
    parts.push(format!("confidence {}", if confidence.is_empty() { "none".into() } else { confidence.join(" then ") }));
    parts.join(", ")
}

/// A job kind from its folder, with `model` instead of its own if given.
/// An OpenAI batch file names its model in every line (one model a file):
/// without `model`, the first line's is the job's.
fn load_kind(
    job_dir: &std::path::Path,
    model: Option<String>,
    input: &std::path::Path,
) -> anyhow::Result<common::spec::JobKind> {
    let mut kind = common::spec::JobKind::load(job_dir)
        .with_context(|| format!("cannot load the job kind in {}", job_dir.display()))?;
    let named = match (&model, kind.spec.request) {
        (None, common::spec::RequestSource::OpenaiBatch) => batch_file_model(input),
        _ => None,
    };
    if let Some(model) = model.or(named) {
        kind.spec.model = model;
    }
    Ok(kind)
}

/// `body.model` of the first non-blank line of an OpenAI batch file, if it
/// names one (a bad line is reported with its number at upload).
fn batch_file_model(input: &std::path::Path) -> Option<String> {
    use std::io::BufRead;
    let file = std::io::BufReader::new(std::fs::File::open(input).ok()?);
    let line = file.lines().map_while(Result::ok).find(|l| !l.trim().is_empty())?;
    let value: serde_json::Value = serde_json::from_str(&line).ok()?;
    value["body"]["model"].as_str().map(str::to_string)
}

/// Estimates a job: reads the input once, locally; with a client, asks the
/// coordinator which prompts are cached (by digest) and what earlier jobs used.
async fn estimate(
    client: Option<&Client>,
    kind: &common::spec::JobKind,
    input: &std::path::Path,
    providers_file: Option<PathBuf>,
    prices_file: &std::path::Path,
    no_cache: bool,
) -> anyhow::Result<coordinator::estimate::Estimate> {
    let catalog = match &providers_file {
        Some(p) => common::providers::Catalog::load(p)?,
        None => common::providers::Catalog::default(),
    };
    let found = common::prices::PriceTable::locate(prices_file)?;
    let prices = match found.table {
        Some((table, path)) => {
            let (provider, model) = kind.spec.model.rsplit_once('/').unwrap_or(("", &kind.spec.model));
            if table.get(provider, model).is_none() {
                let near = table.closest(&kind.spec.model);
                let hint =
                    if near.is_empty() { String::new() } else { format!(" (did you mean {}?)", near.join(", ")) };
                eprintln!(
                    "note: model {:?} has no price in {}{hint}: its cost is unknown",
                    kind.spec.model,
                    path.display()
                );
            }
            table
        }
        None => {
            let looked: Vec<String> = found.looked.iter().map(|p| p.display().to_string()).collect();
            eprintln!(
                "note: no price table found (looked in {}): costs are unknown; name one with --prices-file or \
                 SLUICE_PRICES_FILE",
                looked.join(", ")
            );
            common::prices::PriceTable::default()
        }
    };
    let file = std::fs::File::open(input).with_context(|| format!("cannot read input {}", input.display()))?;
    let reuse = !no_cache && kind.spec.reuses_answers();
    let mut e = coordinator::estimate::estimate(kind, std::io::BufReader::new(file), &catalog, &prices, reuse)?;
    if let Some(client) = client {
        let req = coordinator::cache::LookupRequest {
            kind: kind.clone(),
            project: None,
            digests: if reuse { e.prompts.iter().map(|(d, _)| d.clone()).collect() } else { Vec::new() },
            cache_ttl_s: None,
        };
        match client.estimate_lookup(&req).await {
            Ok(report) => e.expect(Some(&report), &prices, kind.spec.max_tokens),
            Err(err) => eprintln!("note: the coordinator was not asked about cached answers: {err}"),
        }
    }
    Ok(e)
}

fn print_estimate(e: &coordinator::estimate::Estimate, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(e).expect("an estimate serializes"));
    } else {
        for err in &e.errors {
            eprintln!("line {}: {}", err.line, err.reason);
        }
        if e.invalid_lines as usize > e.errors.len() {
            eprintln!("... and {} more invalid lines", e.invalid_lines as usize - e.errors.len());
        }
        let dollars = |c: Option<f64>| c.map_or_else(|| "unknown (no price)".to_string(), |c| format!("${c:.4}"));
        println!("model    {}", e.model);
        println!(
            "items    {}{}",
            e.items,
            if e.invalid_lines > 0 { format!(" ({} invalid lines)", e.invalid_lines) } else { String::new() }
        );
        println!(
            "tokens   {} in ({}), {} out at most (max_tokens per item)",
            e.input_tokens, e.tokenizer, e.output_tokens_at_most
        );
        let as_of = e.prices_as_of.as_deref().map(|d| format!(" (prices as of {d})")).unwrap_or_default();
        println!(
            "cost     at most {} live, {} through the Batch API{as_of}",
            dollars(e.cost_usd_at_most),
            dollars(e.batch_cost_usd_at_most)
        );
        if e.reuse {
            let cached = match e.cache_hits {
                Some(n) => format!("{n} already in the response cache"),
                None => "the cache was not asked".to_string(),
            };
            println!(
                "reuse    {} distinct prompts of {} items ({} identical items share a call); {cached}",
                e.distinct,
                e.items,
                e.items - e.distinct
            );
        } else {
            println!("reuse    off: every item calls the model (temperature above 0, or --no-cache)");
        }
        use coordinator::estimate::OutputBasis;
        let basis = match (&e.history, e.output_basis) {
            (Some(h), _) => {
                format!("{:.1} output tokens per call, measured over {} earlier job(s)", h.tokens_out_per_item, h.jobs)
            }
            (None, OutputBasis::Labels) => {
                "output as one label's JSON answer: no earlier job of this kind to measure".to_string()
            }
            (None, _) => "output at max_tokens: no earlier job of this kind to measure".to_string(),
        };
        println!(
            "expected {} calls, {} tokens in, {} out ({basis}): {} live, {} batch",
            e.calls,
            e.input_tokens_expected,
            e.output_tokens_expected,
            dollars(e.cost_usd_expected),
            dollars(e.batch_cost_usd_expected)
        );
        match e.duration_s_at_least {
            Some(s) => println!("time     at least {s:.0} s at {} requests/min, {} tokens/min", e.rpm, e.tpm),
            None => println!("time     no rate limit configured for the model"),
        }
    }
}

/// The columns of `sluice jobs`: name, and whether right-aligned (numbers).
const JOBS_COLUMNS: [(&str, bool); 8] = [
    ("job", false),
    ("project", false),
    ("kind", false),
    ("state", false),
    ("total", true),
    ("done", true),
    ("failed", true),
    ("created", false),
];

/// A job's state as `sluice jobs` shows it: a job that completed with
/// failed items says so, not plain `completed` (exit code 3 of a waiting
/// command).
fn shown_state(state: &str, failed: u64) -> String {
    if state == "completed" && failed > 0 {
        format!("completed, {failed} failed")
    } else {
        state.to_string()
    }
}

/// A plain-text table: each column as wide as its widest cell, two spaces
/// apart, numbers right-aligned, no trailing spaces.
fn table<const N: usize>(columns: &[(&str, bool); N], rows: &[[String; N]]) -> String {
    let widths: [usize; N] = std::array::from_fn(|i| {
        rows.iter().map(|r| r[i].chars().count()).chain([columns[i].0.len()]).max().unwrap_or(0)
    });
    let line = |cells: [&str; N]| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            let pad = " ".repeat(widths[i] - cell.chars().count());
            let cell = if columns[i].1 { format!("{pad}{cell}") } else { format!("{cell}{pad}") };
            out.push_str(&cell);
            out.push_str("  ");
        }
        out.truncate(out.trim_end().len());
        out.push('\n');
        out
    };
    let mut out = line(std::array::from_fn(|i| columns[i].0));
    for r in rows {
        out.push_str(&line(std::array::from_fn(|i| r[i].as_str())));
    }
    out
}

/// The exit code of a command that waited for a job to finish.
fn outcome(s: &JobStatus) -> ExitCode {
    match s.state.as_str() {
        "completed" if s.failed == 0 => ExitCode::SUCCESS,
        "completed" => ExitCode::from(3),
        "cancelled" => ExitCode::from(4),
        "paused" => ExitCode::from(6),
        _ => ExitCode::from(5),
    }
}

/// Whether `err` is a write to a pipe whose reader has gone.
pub fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe))
}

/// The error with its causes, each once.
pub fn render_error(err: &anyhow::Error) -> String {
    let mut s = err.to_string();
    for cause in err.chain().skip(1) {
        s.push_str("\n  caused by: ");
        s.push_str(&cause.to_string());
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--help` explains every argument and option of every command.
    #[test]
    fn every_argument_has_help_text() {
        use clap::CommandFactory;
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id != "help" && id != "version" && arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "sluice", &mut missing);
        assert!(missing.is_empty(), "arguments without help text: {missing:#?}");
    }

    #[test]
    fn a_job_completed_with_failures_says_so() {
        for (state, failed, shown) in [
            ("completed", 0, "completed"),
            ("completed", 20, "completed, 20 failed"),
            ("cancelled", 3, "cancelled"),
            ("running", 2, "running"),
        ] {
            assert_eq!(shown_state(state, failed), shown, "{state} {failed}");
        }
    }

    #[test]
    fn table_columns_stay_aligned_whatever_their_content() {
        let cols = [("kind", false), ("state", false), ("failed", true)];
        let rows = [
            ["openai-batch-of-many-words".to_string(), shown_state("completed", 20), "20".to_string()],
            ["classify".to_string(), "running".to_string(), "0".to_string()],
        ];
        let t = table(&cols, &rows);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "kind                        state                 failed");
        assert_eq!(lines[1], "openai-batch-of-many-words  completed, 20 failed      20");
        assert_eq!(lines[2], "classify                    running                    0");
    }
}
