//! Names of the coordinator's metrics, defined in one place.

/// Items accepted into Postgres at ingest.
pub const ITEMS_INGESTED: &str = "sluice_items_ingested_total";
/// Input lines refused at ingest (label `reason`).
pub const LINES_REJECTED: &str = "sluice_lines_rejected_total";
/// Chunk messages published (label `cause`: `publish`).
pub const CHUNKS_PUBLISHED: &str = "sluice_chunks_published_total";
/// Chunks found missing from JetStream and reopened for publishing.
pub const CHUNKS_REOPENED: &str = "sluice_chunks_reopened_total";
/// Jobs that reached a final state (label `state`).
pub const JOBS_FINISHED: &str = "sluice_jobs_finished_total";
/// Seconds spent ingesting one job's input.
pub const INGEST_SECONDS: &str = "sluice_ingest_duration_seconds";
/// Requests the API refused, by outcome (unauthenticated, forbidden, hidden, throttled).
pub const API_DENIED: &str = "sluice_api_denied_total";
/// 1 while this coordinator holds the leader lease (runs the publisher and reconciler), else 0.
pub const LEADER: &str = "sluice_coordinator_leader";
/// Items not yet done, by job state (uploading, running, cancelled); leader only.
pub const BACKLOG_ITEMS: &str = "sluice_backlog_items";
/// Results waiting for a reviewer in every job; leader only.
pub const REVIEW_QUEUE: &str = "sluice_review_queue_items";
/// Workers worth running: what KEDA scales on (docs/metrics.md has the formula); leader only.
pub const WORKERS_WANTED: &str = "sluice_autoscale_workers_wanted";
/// Its parts per model (labels `model`, `bound`: backlog, limits).
pub const WORKERS_FOR: &str = "sluice_autoscale_workers";
/// Workers Postgres's connection slots allow (not exported behind a pooler); leader only.
pub const WORKERS_DB_CAP: &str = "sluice_autoscale_workers_db_cap";
/// Dollars spent on model calls by every job of a project so far, at the price table's prices (label `project`); leader only.
pub const COST: &str = "sluice_cost_dollars";
/// Budget alerts: a capped job's spending crossed 50, 80 or 100 percent of its cap.
pub const BUDGET_ALERTS: &str = "sluice_budget_alerts_total";
/// Jobs paused at their spending cap (exported by the leader).
pub const JOBS_PAUSED: &str = "sluice_jobs_paused_at_cap";
/// Always 1, with the build's version and the component as labels.
pub const BUILD_INFO: &str = "sluice_build_info";

/// Every metric the coordinator exports (docs/metrics.md lists them).
pub const ALL: &[&str] = &[
    ITEMS_INGESTED,
    LINES_REJECTED,
    CHUNKS_PUBLISHED,
    CHUNKS_REOPENED,
    JOBS_FINISHED,
    INGEST_SECONDS,
    API_DENIED,
    LEADER,
    BACKLOG_ITEMS,
    REVIEW_QUEUE,
    WORKERS_WANTED,
    WORKERS_FOR,
    WORKERS_DB_CAP,
    COST,
    BUDGET_ALERTS,
    JOBS_PAUSED,
    BUILD_INFO,
];

/// Registers descriptions so `/metrics` explains each series.
pub fn describe() {
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION"), "component" => "coordinator").set(1.0);
    metrics::describe_counter!(ITEMS_INGESTED, "Items accepted into Postgres at ingest");
    metrics::describe_counter!(LINES_REJECTED, "Input lines refused at ingest, by reason");
    metrics::describe_counter!(CHUNKS_PUBLISHED, "Chunk messages published to JetStream, by cause");
    metrics::describe_counter!(CHUNKS_REOPENED, "Chunks found missing from JetStream and reopened");
    metrics::describe_counter!(JOBS_FINISHED, "Jobs that reached a final state");
    metrics::describe_counter!(API_DENIED, "API requests refused: no valid token, a role without the right, another project's job, or too many failures from one address");
    metrics::describe_gauge!(LEADER, "1 while this coordinator is the leader: it publishes chunks and reconciles");
    metrics::describe_gauge!(BACKLOG_ITEMS, "Items not yet done, by job state (exported by the leader)");
    metrics::describe_gauge!(REVIEW_QUEUE, "Results waiting for a reviewer (exported by the leader)");
    metrics::describe_gauge!(
        WORKERS_WANTED,
        "Workers worth running: enough for the backlog, no more than the provider limits keep busy or Postgres's connections allow"
    );
    metrics::describe_gauge!(WORKERS_FOR, "Workers the backlog needs and the provider limits keep busy, by model");
    metrics::describe_gauge!(
        WORKERS_DB_CAP,
        "Workers Postgres's max_connections allows at SLUICE_AUTOSCALE_WORKER_DB_CONNECTIONS each (exported by the leader)"
    );
    metrics::describe_gauge!(COST, "Dollars spent on model calls by every job of a project (exported by the leader)");
    metrics::describe_counter!(BUDGET_ALERTS, "Capped jobs whose spending crossed 50, 80 or 100 percent of the cap");
    metrics::describe_gauge!(JOBS_PAUSED, "Jobs paused at their spending cap (exported by the leader)");
    metrics::describe_gauge!(BUILD_INFO, "Always 1; the version and component are labels");
    metrics::describe_histogram!(INGEST_SECONDS, metrics::Unit::Seconds, "Time to ingest one job's input");
}
