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

/// Registers descriptions so `/metrics` explains each series.
pub fn describe() {
    metrics::describe_counter!(ITEMS_INGESTED, "Items accepted into Postgres at ingest");
    metrics::describe_counter!(LINES_REJECTED, "Input lines refused at ingest, by reason");
    metrics::describe_counter!(CHUNKS_PUBLISHED, "Chunk messages published to JetStream, by cause");
    metrics::describe_counter!(CHUNKS_REOPENED, "Chunks found missing from JetStream and reopened");
    metrics::describe_counter!(JOBS_FINISHED, "Jobs that reached a final state");
    metrics::describe_counter!(API_DENIED, "API requests refused: no valid token, a role without the right, another project's job, or too many failures from one address");
    metrics::describe_gauge!(LEADER, "1 while this coordinator is the leader: it publishes chunks and reconciles");
    metrics::describe_histogram!(INGEST_SECONDS, metrics::Unit::Seconds, "Time to ingest one job's input");
}
