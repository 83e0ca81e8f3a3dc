//! A cache of compiled job kinds (prompt template, output schema), loaded from Postgres once per job.

use common::db::Doing;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use common::spec::{JobKind, Prompt};
use sqlx::PgPool;
use uuid::Uuid;

use crate::endpoints::{Endpoints, Route};
use crate::Error;

/// Everything needed to run a job's items, compiled once.
pub struct CompiledJob {
    pub kind: JobKind,
    pub prompt: Prompt,
    pub validator: jsonschema::Validator,
    pub template_hash: String,
    /// Results with a confidence below this go to the review queue.
    pub review_below: f64,
    /// The main model and the fallbacks at their providers, or why they cannot be reached.
    pub routes: Result<Vec<Route>, String>,
    /// The project the job belongs to: call permits and the limiter's turns
    /// go to projects in turn, then to their jobs.
    pub project: String,
    /// With answers reused (cache and identical items): the cache key base
    /// of the job's requests, and how old a cached answer may be.
    pub reuse: Option<common::cache::KeyBase>,
    pub cache_ttl_s: i64,
    /// Some items repeat an earlier one's fields (`item_copies`, written at
    /// ingest, before any chunk): they take their original's result.
    pub has_copies: bool,
    /// The job has a spending cap: each call reserves its worst case first.
    pub capped: bool,
    /// The job's calls go through the provider's batch API (`jobs.mode`
    /// batch or auto).
    pub batch: bool,
    /// In auto mode: when batches give way to live calls (seconds since the
    /// epoch): a tenth of the time to the deadline before it, at least 30 s.
    pub live_from: Option<f64>,
    /// A multi-stage kind's stages, each compiled as a kind of its own
    /// (`JobKind::stage_kind`); empty for a kind of one prompt per item.
    pub stages: Vec<CompiledStage>,
}

/// One stage of a multi-stage job.
pub struct CompiledStage {
    /// How later stages' templates name its output (`stages.NAME`).
    pub name: String,
    pub job: CompiledJob,
    /// What holds an item after this stage until a reviewer decides.
    pub gate: Option<common::stages::Gate>,
    /// The stage as the kind declares it (its type, a split's sizes).
    pub spec: common::stages::StageSpec,
    /// An ensemble stage's members, each the stage with one member's model,
    /// and their weights; empty for a stage of one model (`job`).
    pub members: Vec<(CompiledJob, f64)>,
    /// The model that settles the members' disagreements, if any.
    pub adjudicator: Option<CompiledJob>,
}

impl CompiledJob {
    /// In auto mode, whether items should now go live.
    pub fn past_live_from(&self) -> bool {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        self.live_from.is_some_and(|t| now >= t)
    }
}

impl CompiledJob {
    /// Compiles a kind's template and schema and routes its models;
    /// `review_below` overrides its threshold.
    pub fn compile(
        kind: JobKind,
        template_hash: String,
        review_below: Option<f64>,
        endpoints: &Endpoints,
    ) -> Result<Self, common::spec::SpecError> {
        let prompt = Prompt::new(&kind)?;
        let validator = kind.validator()?;
        let review_below = review_below.unwrap_or(kind.spec.confidence_threshold);
        let routes = kind.spec.models().map(|m| endpoints.route(m)).collect();
        Ok(CompiledJob {
            template_hash,
            kind,
            prompt,
            validator,
            review_below,
            routes,
            project: String::new(),
            reuse: None,
            cache_ttl_s: 0,
            has_copies: false,
            capped: false,
            batch: false,
            live_from: None,
            stages: Vec::new(),
        })
    }
}

/// A job as a chunk of one generation sees it.
type JobAt = (Uuid, i32);

/// Compiled jobs by id and chunk generation. A job's kind never changes
/// once submitted; its cap may be set on resume, which publishes its chunks
/// under a new generation, so an entry is never used past a resume.
#[derive(Default, Clone)]
pub struct JobCache {
    jobs: Arc<Mutex<HashMap<JobAt, Arc<CompiledJob>>>>,
}

impl JobCache {
    pub async fn get(
        &self,
        pool: &PgPool,
        job_id: Uuid,
        generation: i32,
        endpoints: &Endpoints,
    ) -> Result<Option<Arc<CompiledJob>>, Error> {
        if let Some(j) = self.jobs.lock().expect("job cache lock").get(&(job_id, generation)) {
            return Ok(Some(j.clone()));
        }
        let Some(row) = sqlx::query!(
            r#"SELECT spec AS "spec: sqlx::types::Json<common::spec::JobSpec>", template, template_hash,
                      output_schema, review_below, project, reuse, cache_ttl_s, mode AS "mode: common::state::JobMode",
                      extract(epoch FROM deadline - greatest((deadline - created_at) / 10, interval '30 seconds'))::float8
                          AS live_from,
                      EXISTS (SELECT 1 FROM job_budgets b WHERE b.job_id = jobs.id) AS "capped!",
                      EXISTS (SELECT 1 FROM item_copies c WHERE c.job_id = jobs.id) AS "has_copies!",
                      stage_files AS "stage_files: sqlx::types::Json<Vec<common::stages::StageFiles>>"
               FROM jobs WHERE id = $1"#,
            job_id
        )
        .fetch_optional(pool)
        .await
        .doing("reading the job's kind")?
        else {
            return Ok(None);
        };
        let kind = JobKind {
            spec: row.spec.0,
            template: row.template,
            schema: row.output_schema,
            stage_files: row.stage_files.0,
        };
        let spec_error = |source| Error::Spec { job_id, source: Box::new(source) };
        let stages = (0..kind.spec.stages.len())
            .map(|i| {
                let stage = &kind.spec.stages[i];
                // A stage's own threshold wins; else the job's (`--review-below`), else the kind's.
                let below = stage.confidence_threshold.or(row.review_below);
                let compile = |kind| -> Result<CompiledJob, common::spec::SpecError> {
                    let mut job = CompiledJob::compile(kind, row.template_hash.clone(), below, endpoints)?;
                    job.project = row.project.clone();
                    job.capped = row.capped;
                    Ok(job)
                };
                let job = compile(kind.stage_kind(i))?;
                let members = match stage.ensemble.is_empty() {
                    true => Vec::new(),
                    false => kind
                        .stage_members(i)
                        .into_iter()
                        .enumerate()
                        .map(|(m, member)| Ok((compile(member)?, stage.weights.get(m).copied().unwrap_or(1.0))))
                        .collect::<Result<_, common::spec::SpecError>>()?,
                };
                let adjudicator = kind.stage_adjudicator(i).map(compile).transpose()?;
                Ok(CompiledStage {
                    name: stage.name.clone(),
                    job,
                    gate: stage.gate,
                    spec: stage.clone(),
                    members,
                    adjudicator,
                })
            })
            .collect::<Result<Vec<_>, common::spec::SpecError>>()
            .map_err(spec_error)?;
        let mut compiled =
            CompiledJob::compile(kind, row.template_hash, row.review_below, endpoints).map_err(spec_error)?;
        compiled.stages = stages;
        compiled.project = row.project;
        compiled.cache_ttl_s = row.cache_ttl_s;
        compiled.capped = row.capped;
        compiled.has_copies = row.has_copies;
        compiled.batch = row.mode.batches();
        compiled.live_from = row.live_from.filter(|_| row.mode == common::state::JobMode::Auto);
        if row.reuse {
            if let Ok(routes) = &compiled.routes {
                let models: Vec<String> = routes.iter().map(|r| format!("{}/{}", r.endpoint.name, r.model)).collect();
                compiled.reuse = Some(common::cache::KeyBase::new(
                    &compiled.project,
                    &compiled.kind.spec,
                    &compiled.kind.schema,
                    &models,
                ));
            }
        }
        let compiled = Arc::new(compiled);
        let mut jobs = self.jobs.lock().expect("job cache lock");
        // Bound memory on long-lived workers; reloading a job is cheap.
        if jobs.len() > 1_000 {
            jobs.clear();
        }
        jobs.insert((job_id, generation), compiled.clone());
        Ok(Some(compiled))
    }
}
