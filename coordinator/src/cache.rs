//! The response cache seen from the coordinator: which prompts of a file are cached, what earlier jobs of a kind used, stats and purge.

use common::cache::KeyBase;
use common::db::Doing;
use common::providers::Catalog;
use common::spec::JobKind;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use crate::Error;

/// What `sluice estimate` asks the coordinator: the kind and the digests of
/// the distinct prompts of a file (`common::cache::prompt_digest`), never
/// the documents.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LookupRequest {
    pub kind: JobKind,
    /// Whose cache (an admin may name another project than its own).
    #[serde(default)]
    pub project: Option<String>,
    pub digests: Vec<String>,
    /// Entries older than this are not counted (default 30 days, as a job's).
    #[serde(default)]
    pub cache_ttl_s: Option<u64>,
}

/// What earlier jobs of the same kind and model used per item that called a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct History {
    /// Completed jobs counted (the latest few).
    pub jobs: u64,
    /// Items of those jobs that called a model.
    pub items: u64,
    pub tokens_in_per_item: f64,
    pub tokens_out_per_item: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LookupReport {
    /// Of the digests sent, how many have a cached answer, and which (their positions).
    pub cache_hits: u64,
    pub cached: Vec<u32>,
    pub history: Option<History>,
}

/// The cache key base of a kind in `project`, with its models resolved as workers resolve them.
pub fn key_base(catalog: &Catalog, project: &str, kind: &JobKind) -> Result<KeyBase, Error> {
    let models = kind
        .spec
        .models()
        .map(|m| catalog.resolve(m).map(|t| t.reference()).map_err(Error::Invalid))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(KeyBase::new(project, &kind.spec, &kind.schema, &models))
}

/// Answers a lookup for `project`.
pub async fn lookup(
    pool: &PgPool,
    catalog: &Catalog,
    project: &str,
    req: &LookupRequest,
) -> Result<LookupReport, Error> {
    const DOING: &str = "looking up the response cache";
    let base = key_base(catalog, project, &req.kind)?;
    let keys: Vec<String> = req.digests.iter().map(|d| base.key(d)).collect();
    let ttl = req.cache_ttl_s.unwrap_or(crate::model::DEFAULT_CACHE_TTL_S) as f64;
    let cached: Vec<u32> = sqlx::query_scalar!(
        r#"SELECT (k.n - 1)::int AS "n!" FROM UNNEST($2::text[]) WITH ORDINALITY AS k(key, n)
           WHERE EXISTS (SELECT 1 FROM response_cache c WHERE c.project = $1 AND c.key = decode(k.key, 'hex')
                           AND c.created_at > now() - make_interval(secs => $3))
           ORDER BY 1"#,
        project,
        &keys,
        ttl
    )
    .fetch_all(pool)
    .await
    .doing(DOING)?
    .into_iter()
    .map(|n| n as u32)
    .collect();
    // The latest completed jobs of the kind and model: their usage per item
    // that called a model (answers reused cost nothing).
    let h = sqlx::query!(
        r#"WITH recent AS (
               SELECT id, total_items FROM jobs
               WHERE project = $1 AND kind = $2 AND spec->>'model' = $3 AND template_hash = $4
                 AND state = 'completed'
               ORDER BY finished_at DESC LIMIT 5)
           SELECT count(DISTINCT r.id) AS "jobs!",
                  coalesce(sum(t.tokens_in), 0)::float8 AS "tokens_in!",
                  coalesce(sum(t.tokens_out), 0)::float8 AS "tokens_out!",
                  coalesce(sum(t.cache_hits + t.shared), 0)::bigint AS "reused!",
                  (SELECT coalesce(sum(total_items), 0) FROM recent)::bigint AS "items!"
           FROM recent r LEFT JOIN job_tallies t ON t.job_id = r.id"#,
        project,
        &req.kind.spec.kind,
        &req.kind.spec.model,
        req.kind.template_hash()
    )
    .fetch_one(pool)
    .await
    .doing(DOING)?;
    let called = (h.items - h.reused).max(0);
    let history = (h.jobs > 0 && called > 0).then(|| History {
        jobs: h.jobs as u64,
        items: called as u64,
        tokens_in_per_item: h.tokens_in / called as f64,
        tokens_out_per_item: h.tokens_out / called as f64,
    });
    Ok(LookupReport { cache_hits: cached.len() as u64, cached, history })
}

/// The cache of one project, as `sluice cache stats` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub project: String,
    pub entries: u64,
    pub oldest: Option<chrono::DateTime<chrono::Utc>>,
    pub newest: Option<chrono::DateTime<chrono::Utc>>,
    /// Items of the project's jobs answered from the cache, and from an identical item.
    pub hits: u64,
    pub shared: u64,
}

pub async fn stats(pool: &PgPool, project: &str) -> Result<Stats, Error> {
    const DOING: &str = "reading the cache's figures";
    let e = sqlx::query!(
        r#"SELECT count(*) AS "n!", min(created_at) AS oldest, max(created_at) AS newest
           FROM response_cache WHERE project = $1"#,
        project
    )
    .fetch_one(pool)
    .await
    .doing(DOING)?;
    let r = sqlx::query!(
        r#"SELECT coalesce(sum(t.cache_hits), 0)::bigint AS "hits!", coalesce(sum(t.shared), 0)::bigint AS "shared!"
           FROM jobs j JOIN job_tallies t ON t.job_id = j.id WHERE j.project = $1"#,
        project
    )
    .fetch_one(pool)
    .await
    .doing(DOING)?;
    Ok(Stats {
        project: project.to_string(),
        entries: e.n as u64,
        oldest: e.oldest,
        newest: e.newest,
        hits: r.hits as u64,
        shared: r.shared as u64,
    })
}

/// Deletes the project's entries older than `older_than_s` (all without it).
pub async fn purge(pool: &PgPool, project: &str, older_than_s: Option<u64>) -> Result<u64, Error> {
    Ok(sqlx::query!(
        "DELETE FROM response_cache WHERE project = $1
           AND ($2::float8 IS NULL OR created_at < now() - make_interval(secs => $2))",
        project,
        older_than_s.map(|s| s as f64)
    )
    .execute(pool)
    .await
    .doing("purging the response cache")?
    .rows_affected())
}
