//! The leader's gauges of the cluster's state, read from Postgres: backlog by job state, the review queue, cost by project, and the workers worth running.
//!
//! Only the leader exports them (once for the cluster); a replica that stops
//! leading sets them to 0, so `max()` over the replicas is the leader's figure.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::providers::Catalog;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::autoscale::{self, Assumptions, ModelDemand};
use crate::{metrics as m, store, Error};

/// How often the gauges are read.
pub const EVERY: Duration = Duration::from_secs(5);

/// Job states whose jobs hold items not yet done.
const BACKLOG_STATES: [&str; 4] = ["uploading", "running", "paused", "cancelled"];

/// Reads and exports the gauges every [`EVERY`] until `leading` is cancelled.
pub async fn run(pool: PgPool, catalog: Arc<Catalog>, assumptions: Assumptions, leading: CancellationToken) {
    let mut health = common::telemetry::Health::default();
    let mut models = Vec::new();
    loop {
        match export(&pool, &catalog, &assumptions, &mut models).await {
            Ok(()) => health.ok("reading the cluster's gauges"),
            Err(e) => health.failed("reading the cluster's gauges", &e),
        }
        tokio::select! {
            _ = leading.cancelled() => break,
            _ = tokio::time::sleep(EVERY) => {}
        }
    }
    for state in BACKLOG_STATES {
        metrics::gauge!(m::BACKLOG_ITEMS, "job_state" => state).set(0.0);
    }
    metrics::gauge!(m::REVIEW_QUEUE).set(0.0);
    metrics::gauge!(m::WORKERS_WANTED).set(0.0);
    metrics::gauge!(m::JOBS_PAUSED).set(0.0);
    for model in models {
        set_model(&model, 0.0, Some(0.0));
    }
}

/// One reading. `models` holds the models exported last time, to zero those gone.
async fn export(
    pool: &PgPool,
    catalog: &Catalog,
    assumptions: &Assumptions,
    models: &mut Vec<String>,
) -> Result<(), Error> {
    let backlog = store::backlog_by_job_state(pool).await?;
    for state in BACKLOG_STATES {
        let n = backlog.iter().find(|(s, _)| s == state).map_or(0, |(_, n)| *n);
        metrics::gauge!(m::BACKLOG_ITEMS, "job_state" => state).set(n as f64);
    }
    metrics::gauge!(m::REVIEW_QUEUE).set(store::review_queue_size(pool).await? as f64);
    for a in store::budget_alerts(pool).await? {
        tracing::warn!(job_id = %a.job_id, percent = a.percent, spent_usd = a.spent, cap_usd = a.cap,
            "budget alert: the job has spent {}% of its cap", a.percent);
        metrics::counter!(m::BUDGET_ALERTS, "percent" => a.percent.to_string()).increment(1);
    }
    metrics::gauge!(m::JOBS_PAUSED).set(store::paused_at_cap(pool).await? as f64);
    for (project, dollars) in store::cost_by_project(pool).await? {
        metrics::gauge!(m::COST, "project" => project).set(dollars);
    }
    let demand = demand(&store::running_job_demand(pool).await?, catalog);
    let slots = common::db::slots(pool).await?;
    let plan = autoscale::plan(&demand, assumptions, autoscale::db_cap(slots.max, slots.reserved, assumptions));
    metrics::gauge!(m::WORKERS_WANTED).set(plan.wanted as f64);
    if let Some(cap) = plan.db_cap {
        metrics::gauge!(m::WORKERS_DB_CAP).set(cap as f64);
    }
    for gone in models.iter().filter(|m| !plan.models.iter().any(|(p, _, _)| p == *m)) {
        set_model(gone, 0.0, Some(0.0));
    }
    for (model, backlog, limits) in &plan.models {
        set_model(model, *backlog, *limits);
    }
    *models = plan.models.into_iter().map(|(m, _, _)| m).collect();
    Ok(())
}

fn set_model(model: &str, backlog: f64, limits: Option<f64>) {
    metrics::gauge!(m::WORKERS_FOR, "model" => model.to_string(), "bound" => "backlog").set(backlog);
    // A model without limits has no such series (Prometheus's text format
    // would need +Inf, which the exporter does not write).
    if let Some(limits) = limits {
        metrics::gauge!(m::WORKERS_FOR, "model" => model.to_string(), "bound" => "limits").set(limits);
    }
}

/// The running jobs' demand, summed by model (as the providers file names it).
pub fn demand(jobs: &[store::JobDemand], catalog: &Catalog) -> Vec<ModelDemand> {
    let mut by_model: BTreeMap<String, (ModelDemand, f64, f64)> = BTreeMap::new();
    for j in jobs {
        let (reference, rpm, tpm) = match catalog.resolve(&j.model) {
            Ok(t) if !catalog.providers.is_empty() => (t.reference(), t.config.rpm, t.config.tpm),
            _ => (j.model.clone(), 0.0, 0.0),
        };
        let entry = by_model.entry(reference.clone()).or_insert_with(|| {
            let d = ModelDemand { model: reference, backlog: 0, rpm, tpm, latency_s: None, tokens_per_call: None };
            (d, 0.0, 0.0)
        });
        entry.0.backlog += j.backlog;
        // Latency and tokens per call weighted by each job's calls.
        if let Some(latency) = j.recent_latency_s {
            entry.1 += latency * j.calls.max(1) as f64;
            entry.2 += j.calls.max(1) as f64;
        }
        if j.calls > 0 {
            // The largest of the jobs': the limit is then not overestimated.
            let tokens = j.tokens as f64 / j.calls as f64;
            entry.0.tokens_per_call = Some(entry.0.tokens_per_call.map_or(tokens, |t| t.max(tokens)));
        }
    }
    by_model
        .into_values()
        .map(|(mut d, weighted, weight)| {
            if weight > 0.0 {
                d.latency_s = Some(weighted / weight);
            }
            d
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::providers::{ModelConfig, ProviderConfig, ProviderKind};

    #[test]
    fn jobs_on_one_model_share_its_limits_and_their_figures_are_combined() {
        let model = ModelConfig { rpm: 600.0, tpm: 100_000.0, ..Default::default() };
        let provider = ProviderConfig {
            kind: ProviderKind::Openai,
            base_url: None,
            api_key_env: None,
            api_key_file: None,
            api_version: None,
            anthropic_version: None,
            timeout_ms: None,
            models: [("gpt-4o-mini".to_string(), model)].into(),
        };
        let catalog = Catalog { providers: [("openai".to_string(), provider)].into(), source: "test".into() };
        let job = |model: &str, backlog, calls, tokens, latency| store::JobDemand {
            model: model.into(),
            backlog,
            calls,
            tokens,
            recent_latency_s: latency,
        };
        // The same model named bare and in full; a job without answers yet.
        let jobs = [
            job("gpt-4o-mini", 1_000, 100, 50_000, Some(2.0)),
            job("openai/gpt-4o-mini", 500, 300, 60_000, Some(1.0)),
            job("gpt-4o-mini", 250, 0, 0, None),
        ];
        let d = demand(&jobs, &catalog);
        assert_eq!(d.len(), 1);
        let d = &d[0];
        assert_eq!((d.model.as_str(), d.backlog, d.rpm, d.tpm), ("openai/gpt-4o-mini", 1_750, 600.0, 100_000.0));
        // Latency weighted by calls: (2 x 100 + 1 x 300) / 400.
        assert_eq!(d.latency_s, Some(1.25));
        // The larger tokens per call of the two jobs (500 and 200).
        assert_eq!(d.tokens_per_call, Some(500.0));
    }

    #[test]
    fn a_model_the_providers_file_does_not_list_has_no_limits() {
        let jobs = [store::JobDemand {
            model: "local-llama".into(),
            backlog: 10,
            calls: 0,
            tokens: 0,
            recent_latency_s: None,
        }];
        let d = demand(&jobs, &Catalog::default());
        assert_eq!((d[0].model.as_str(), d[0].rpm, d[0].tpm, d[0].latency_s), ("local-llama", 0.0, 0.0, None));
    }
}
