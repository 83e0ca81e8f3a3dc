//! A cache of compiled job kinds (prompt template, output schema), loaded from Postgres once per job.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use common::spec::{JobKind, Prompt};
use serde_json::Value;
use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::Error;

/// Everything needed to run a job's items, compiled once.
pub struct CompiledJob {
    pub kind: JobKind,
    pub prompt: Prompt,
    pub validator: jsonschema::Validator,
    pub template_hash: String,
    /// `response_format` sent with every request, built from the output schema.
    pub response_format: Value,
    /// Results with a confidence below this go to the review queue.
    pub review_below: f64,
}

impl CompiledJob {
    /// Compiles a kind's template and schema; `review_below` overrides its threshold.
    pub fn compile(
        kind: JobKind,
        template_hash: String,
        review_below: Option<f64>,
    ) -> Result<Self, common::spec::SpecError> {
        let prompt = Prompt::new(&kind)?;
        let validator = kind.validator()?;
        let response_format = serde_json::json!({
            "type": "json_schema",
            "json_schema": { "name": kind.spec.kind, "schema": kind.schema, "strict": true }
        });
        let review_below = review_below.unwrap_or(kind.spec.confidence_threshold);
        Ok(CompiledJob { template_hash, kind, prompt, validator, response_format, review_below })
    }
}

/// Compiled jobs by id. Jobs are immutable once submitted, so entries never go stale.
#[derive(Default, Clone)]
pub struct JobCache {
    jobs: Arc<Mutex<HashMap<Uuid, Arc<CompiledJob>>>>,
}

impl JobCache {
    pub async fn get(&self, pool: &PgPool, job_id: Uuid) -> Result<Option<Arc<CompiledJob>>, Error> {
        if let Some(j) = self.jobs.lock().expect("job cache lock").get(&job_id) {
            return Ok(Some(j.clone()));
        }
        let Some(row) =
            sqlx::query("SELECT spec, template, template_hash, output_schema, review_below FROM jobs WHERE id = $1")
                .bind(job_id)
                .fetch_optional(pool)
                .await?
        else {
            return Ok(None);
        };
        let spec: sqlx::types::Json<common::spec::JobSpec> = row.get("spec");
        let kind = JobKind { spec: spec.0, template: row.get("template"), schema: row.get("output_schema") };
        let compiled = Arc::new(
            CompiledJob::compile(kind, row.get("template_hash"), row.get("review_below"))
                .map_err(|source| Error::Spec { job_id, source })?,
        );
        let mut jobs = self.jobs.lock().expect("job cache lock");
        // Bound memory on long-lived workers; reloading a job is cheap.
        if jobs.len() > 1_000 {
            jobs.clear();
        }
        jobs.insert(job_id, compiled.clone());
        Ok(Some(compiled))
    }
}
