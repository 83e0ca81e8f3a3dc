//! How many workers are worth running: enough for the backlog, no more than the provider limits can keep busy. KEDA scales the workers on this figure.
//!
//! For each model with work waiting:
//!
//! ```text
//! per_worker   = min(worker_concurrency / latency_s, worker_calls_per_s)   calls/s one worker makes
//! allowed      = min(rpm / 60, tpm / 60 / tokens_per_call)                  calls/s the limits allow
//! backlog_need = backlog / drain_s / per_worker                             workers to finish in drain_s
//! limit_cap    = allowed / per_worker                                       workers the limits keep busy
//! wanted       = ceil(sum over models of min(backlog_need, limit_cap)), at least 1 while work waits
//! db_cap       = (max_connections - reserved - db_reserve) / worker_db_connections
//! wanted       = min(wanted, db_cap), at least 1 while work waits
//! ```
//!
//! `db_cap` keeps the fleet within Postgres's connection slots: each worker
//! holds up to `worker_db_connections` (its `SLUICE_DB_POOL_SIZE`, 2 by
//! default) and `db_reserve` slots stay for coordinators, migrations and
//! operators. With the workers behind a pooler (`worker_db_connections` 0)
//! the pooler bounds the server's connections and there is no such cap.
//!
//! A model without limits (a self-hosted server) has no `limit_cap`: only
//! the backlog counts, and the ScaledObject's `maxReplicaCount` bounds it.
//! Example: 100,000 items on a 600 requests/min key, 1 s calls, 64 calls per
//! worker: one worker makes 64 calls/s, the key allows 10, so one worker is
//! wanted, not the 27 that would drain the backlog in 60 s only to wait.

/// What the coordinator knows of one model's waiting work.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelDemand {
    /// `provider/model`, for the gauge's label.
    pub model: String,
    /// Items not yet done in running jobs whose model this is.
    pub backlog: u64,
    /// The model's limit per key (0: none).
    pub rpm: f64,
    pub tpm: f64,
    /// Mean latency of its recent calls, in seconds (None: no call yet).
    pub latency_s: Option<f64>,
    /// Mean tokens (in and out) per call so far (None: no call yet).
    pub tokens_per_call: Option<f64>,
}

/// What is assumed of the workers (settings of `sluice serve`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Assumptions {
    /// Calls one worker keeps in flight: the workers' `SLUICE_CONCURRENCY`.
    pub worker_concurrency: f64,
    /// Calls per second one worker manages at most, whatever the latency (its CPU).
    pub worker_calls_per_s: f64,
    /// The backlog should be done within this many seconds.
    pub drain_s: f64,
    /// Latency assumed before a model has answered anything.
    pub default_latency_s: f64,
    /// Postgres connections one worker holds at most (its `SLUICE_DB_POOL_SIZE`);
    /// 0: the workers reach Postgres through a pooler, which bounds them.
    pub worker_db_connections: f64,
    /// Connection slots kept for everything but the workers.
    pub db_reserve: f64,
}

impl Default for Assumptions {
    fn default() -> Self {
        Assumptions {
            worker_concurrency: 64.0,
            worker_calls_per_s: 1_000.0,
            drain_s: 300.0,
            default_latency_s: 1.0,
            worker_db_connections: 2.0,
            db_reserve: 20.0,
        }
    }
}

/// The figures for one model and in all.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Workers wanted in all: what KEDA scales to.
    pub wanted: u32,
    /// Per model: (model, workers for the backlog, workers the limits keep busy; None: no limit).
    pub models: Vec<(String, f64, Option<f64>)>,
    /// Workers Postgres's connection slots allow (None: not known, or a pooler in between).
    pub db_cap: Option<u32>,
}

/// Workers Postgres's slots allow, given its `max_connections` and reserved
/// slots (None: the workers are behind a pooler).
pub fn db_cap(max_connections: u32, reserved: u32, a: &Assumptions) -> Option<u32> {
    if a.worker_db_connections <= 0.0 {
        return None;
    }
    let room = (max_connections as f64 - reserved as f64 - a.db_reserve).max(0.0);
    Some((room / a.worker_db_connections).floor() as u32)
}

/// Calls per second the limits of a model allow (None: no limit).
pub fn allowed_calls_per_s(d: &ModelDemand) -> Option<f64> {
    let by_requests = (d.rpm > 0.0).then(|| d.rpm / 60.0);
    let by_tokens = match d.tokens_per_call {
        Some(t) if d.tpm > 0.0 && t > 0.0 => Some(d.tpm / 60.0 / t),
        _ => None,
    };
    match (by_requests, by_tokens) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Works out how many workers are worth running for `demand`, within
/// `db_cap` (see [`db_cap`]).
pub fn plan(demand: &[ModelDemand], a: &Assumptions, db_cap: Option<u32>) -> Plan {
    let mut total = 0.0;
    let mut models = Vec::new();
    for d in demand.iter().filter(|d| d.backlog > 0) {
        let latency = d.latency_s.filter(|l| *l > 0.0).unwrap_or(a.default_latency_s);
        let per_worker = (a.worker_concurrency / latency).min(a.worker_calls_per_s);
        let backlog_need = d.backlog as f64 / a.drain_s / per_worker;
        let limit_cap = allowed_calls_per_s(d).map(|allowed| allowed / per_worker);
        total += limit_cap.map_or(backlog_need, |cap| backlog_need.min(cap));
        models.push((d.model.clone(), backlog_need, limit_cap));
    }
    let wanted = if models.is_empty() { 0 } else { (total.ceil() as u32).min(db_cap.unwrap_or(u32::MAX)).max(1) };
    Plan { wanted, models, db_cap }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demand(backlog: u64, rpm: f64, latency_s: f64) -> ModelDemand {
        ModelDemand {
            model: "openai/gpt-4o-mini".into(),
            backlog,
            rpm,
            tpm: 0.0,
            latency_s: Some(latency_s),
            tokens_per_call: None,
        }
    }

    #[test]
    fn a_big_job_on_a_small_key_wants_what_the_key_can_feed() {
        // 100k items, 600 requests/min, 1 s calls: 10 calls/s, a sixth of one worker.
        let p = plan(&[demand(100_000, 600.0, 1.0)], &Assumptions::default(), None);
        assert_eq!(p.wanted, 1);
        let (_, need, cap) = &p.models[0];
        assert!((need - 100_000.0 / 300.0 / 64.0).abs() < 1e-9);
        assert!((cap.unwrap() - 10.0 / 64.0).abs() < 1e-9);
    }

    #[test]
    fn a_big_key_lets_the_backlog_decide() {
        // 30,000 requests/min = 500 calls/s; 2 s calls: 32 calls/s per worker.
        let p = plan(&[demand(100_000, 30_000.0, 2.0)], &Assumptions::default(), None);
        // The backlog wants 100k / 300 s / 32 = 10.4 workers; the key could feed 15.6.
        assert_eq!(p.wanted, 11);
        // A larger backlog is capped by the key.
        let p = plan(&[demand(1_000_000, 30_000.0, 2.0)], &Assumptions::default(), None);
        assert_eq!(p.wanted, 16);
    }

    #[test]
    fn no_backlog_wants_no_worker_and_a_little_wants_one() {
        assert_eq!(plan(&[demand(0, 600.0, 1.0)], &Assumptions::default(), None).wanted, 0);
        assert_eq!(plan(&[], &Assumptions::default(), None).wanted, 0);
        assert_eq!(plan(&[demand(3, 600.0, 1.0)], &Assumptions::default(), None).wanted, 1);
    }

    #[test]
    fn tokens_per_minute_can_be_the_tighter_limit() {
        // 10,000 requests/min but 600,000 tokens/min at 1,000 tokens a call: 10 calls/s.
        let d = ModelDemand { tpm: 600_000.0, tokens_per_call: Some(1_000.0), ..demand(1_000_000, 10_000.0, 0.5) };
        assert!((allowed_calls_per_s(&d).unwrap() - 10.0).abs() < 1e-9);
        assert_eq!(plan(&[d], &Assumptions::default(), None).wanted, 1);
    }

    #[test]
    fn an_unlimited_model_is_bounded_by_the_backlog_and_the_workers_cpu() {
        // A local server answering in 10 ms: 6,400 calls/s by concurrency, 1,000 by CPU.
        let d = ModelDemand { rpm: 0.0, ..demand(3_000_000, 0.0, 0.01) };
        assert_eq!(plan(&[d], &Assumptions::default(), None).wanted, 10);
    }

    #[test]
    fn models_add_up_and_unknown_latency_is_assumed() {
        let a = demand(100_000, 600.0, 1.0);
        let b = ModelDemand { model: "anthropic/claude".into(), latency_s: None, ..demand(100_000, 30_000.0, 0.0) };
        // a: 0.16 (its key); b: 1 s assumed, 64 calls/s per worker, backlog 5.2, key 7.8.
        let p = plan(&[a, b], &Assumptions::default(), None);
        assert_eq!(p.wanted, 6);
        assert_eq!(p.models.len(), 2);
    }

    #[test]
    fn the_database_caps_the_fleet_unless_a_pooler_is_in_between() {
        // (max_connections, reserved, worker connections) -> workers allowed
        let table = [
            // Postgres's defaults: (100 - 3 - 20) / 2.
            (100, 3, 2.0, Some(38)),
            (400, 3, 2.0, Some(188)),
            (500, 3, 4.0, Some(119)),
            // Too small for any worker beside the reserve.
            (20, 3, 2.0, Some(0)),
            // Behind a pooler: no cap from here.
            (100, 3, 0.0, None),
        ];
        for (max, reserved, per_worker, want) in table {
            let a = Assumptions { worker_db_connections: per_worker, ..Assumptions::default() };
            assert_eq!(db_cap(max, reserved, &a), want, "{max} {reserved} {per_worker}");
        }
        // 1,000,000 items on a 30,000 requests/min key want 16 workers; a small database allows 10.
        let d = demand(1_000_000, 30_000.0, 2.0);
        assert_eq!(plan(std::slice::from_ref(&d), &Assumptions::default(), Some(10)).wanted, 10);
        assert_eq!(plan(std::slice::from_ref(&d), &Assumptions::default(), None).wanted, 16);
        // Work waiting still gets one worker, even where the database has no room to spare.
        assert_eq!(plan(&[d], &Assumptions::default(), Some(0)).wanted, 1);
    }
}
