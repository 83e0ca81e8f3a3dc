//! Logging, the Prometheus endpoint and the probes beside it (`/healthz`, `/readyz`), set up once per process.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use futures::future::BoxFuture;

/// A readiness check: whether the process can do its work, and the details
/// (each dependency's state) to show.
pub type ReadinessCheck = Arc<dyn Fn() -> BoxFuture<'static, (bool, serde_json::Value)> + Send + Sync>;

/// The process's readiness check, once it has connected to what it needs.
static READINESS: RwLock<Option<ReadinessCheck>> = RwLock::new(None);

/// Sets what `/readyz` on the metrics address checks. Until it is set the
/// process is starting and not ready.
pub fn set_readiness(check: ReadinessCheck) {
    *READINESS.write().expect("readiness lock") = Some(check);
}

/// What readiness checks of both processes ask: whether Postgres answers
/// (within 2 s) and whether the NATS connection is up, each as `ok` or why not.
pub async fn dependencies(pool: &sqlx::PgPool, nats: &async_nats::Client) -> (String, String) {
    let postgres = match crate::db::ping(pool, std::time::Duration::from_secs(2)).await {
        Ok(()) => "ok".to_string(),
        Err(why) => why,
    };
    let nats = match nats.connection_state() {
        async_nats::connection::State::Connected => "ok".to_string(),
        other => other.to_string(),
    };
    (postgres, nats)
}

/// `/readyz`: 200 with the details when ready, else 503.
async fn readyz() -> (axum::http::StatusCode, axum::Json<serde_json::Value>) {
    let check = READINESS.read().expect("readiness lock").clone();
    let (ready, detail) = match check {
        Some(check) => check().await,
        None => (false, serde_json::json!({"ready": false, "starting": true})),
    };
    let code = if ready { axum::http::StatusCode::OK } else { axum::http::StatusCode::SERVICE_UNAVAILABLE };
    (code, axum::Json(detail))
}

/// How a process logs and where it serves `/metrics`.
#[derive(Debug, Clone, clap::Args)]
pub struct TelemetryConfig {
    /// Log format: `text` for people, `json` for log collectors, `auto`:
    /// text on a terminal, JSON otherwise (a container's log, a file).
    #[arg(long, env = "SLUICE_LOG_FORMAT", default_value = "auto", value_parser = ["auto", "text", "json"])]
    pub log_format: String,
    /// Log filter in `tracing` syntax, e.g. `info` or `worker=debug,info`.
    #[arg(long, env = "SLUICE_LOG", default_value = "info")]
    pub log: String,
    /// Address for the Prometheus `/metrics` endpoint; empty to disable.
    #[arg(long, env = "SLUICE_METRICS_ADDR", default_value = "")]
    pub metrics_addr: String,
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("invalid metrics address {addr:?} (expected host:port, e.g. 127.0.0.1:9100)")]
    MetricsAddr {
        addr: String,
        #[source]
        source: std::net::AddrParseError,
    },
    #[error("could not listen for Prometheus scrapes on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("could not install the metrics recorder")]
    Recorder(#[source] metrics_exporter_prometheus::BuildError),
    #[error("invalid log filter {filter:?}")]
    Filter {
        filter: String,
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
}

/// Installs the global log subscriber and, if configured, the metrics exporter.
/// Logs go to stderr so that stdout stays clean for command output.
pub fn init(config: &TelemetryConfig) -> Result<(), TelemetryError> {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log)
        .map_err(|source| TelemetryError::Filter { filter: config.log.clone(), source })?;
    use std::io::IsTerminal;
    let terminal = std::io::stderr().is_terminal();
    // Colour codes only for a terminal: in a file they are noise.
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(terminal);
    let json = match config.log_format.as_str() {
        "json" => true,
        "text" => false,
        _ => !terminal,
    };
    // A second init (tests start several services in one process) is harmless.
    let _ = if json { builder.json().try_init() } else { builder.try_init() };
    install_metrics(&config.metrics_addr).map(|_| ())
}

/// Serves Prometheus `/metrics`, `/healthz` and `/readyz` on `addr` (no-op when empty) and returns the
/// address bound: with port 0 the OS picks one, and it is logged ("metrics
/// endpoint listening"). Needs a Tokio runtime.
pub fn install_metrics(addr: &str) -> Result<Option<SocketAddr>, TelemetryError> {
    if addr.is_empty() {
        return Ok(None);
    }
    let addr: SocketAddr =
        addr.parse().map_err(|source| TelemetryError::MetricsAddr { addr: addr.to_string(), source })?;
    let bind = |source| TelemetryError::Bind { addr, source };
    let listener = std::net::TcpListener::bind(addr).map_err(bind)?;
    listener.set_nonblocking(true).map_err(bind)?;
    let bound = listener.local_addr().map_err(bind)?;
    let listener = tokio::net::TcpListener::from_std(listener).map_err(bind)?;
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0])
        .expect("static bucket list is non-empty")
        .install_recorder()
        .map_err(TelemetryError::Recorder)?;
    // Without the exporter's own listener, upkeep (draining histogram
    // buffers) is ours to run.
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    // The process's CPU, memory, open files, threads and start time, the
    // standard Prometheus process metrics (`process_*`, as client_golang
    // names them), read afresh at each scrape.
    let process = std::sync::Arc::new(metrics_process::Collector::default());
    process.describe();
    // Probes beside the metrics: `/healthz` answers while the process
    // serves at all (liveness), `/readyz` runs the readiness check.
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let (handle, process) = (handle.clone(), process.clone());
                async move {
                    process.collect();
                    handle.render()
                }
            }),
        )
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .route("/readyz", axum::routing::get(readyz));
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the metrics endpoint stopped");
        }
    });
    tracing::info!(addr = %bound, "metrics endpoint listening");
    Ok(Some(bound))
}

/// The health of a loop that retries: logs a failure once when it starts or
/// changes, and once when the loop works again, never on every turn.
#[derive(Debug, Default)]
pub struct Health {
    failing: Option<String>,
}

impl Health {
    /// Records a failed turn of `what`; logs it if it is news.
    pub fn failed(&mut self, what: &str, err: &dyn std::error::Error) {
        let msg = crate::error_chain(err);
        if self.failing.as_deref() != Some(msg.as_str()) {
            tracing::warn!(error = %msg, "{what} failed; retrying until it works");
            self.failing = Some(msg);
        }
    }

    /// Records a good turn; logs the recovery if `what` was failing.
    pub fn ok(&mut self, what: &str) {
        if self.failing.take().is_some() {
            tracing::info!("{what} works again");
        }
    }
}
