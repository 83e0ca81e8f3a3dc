//! Logging and the Prometheus endpoint, set up once per process.

use std::net::SocketAddr;

/// How a process logs and where it serves `/metrics`.
#[derive(Debug, Clone, clap::Args)]
pub struct TelemetryConfig {
    /// Log format: `text` for people, `json` for log collectors.
    #[arg(long, env = "SLUICE_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
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
    #[error("could not start the Prometheus endpoint on {addr}")]
    Exporter {
        addr: SocketAddr,
        #[source]
        source: metrics_exporter_prometheus::BuildError,
    },
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
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    // A second init (tests start several services in one process) is harmless.
    let _ = if config.log_format == "json" { builder.json().try_init() } else { builder.try_init() };
    install_metrics(&config.metrics_addr)
}

/// Starts the Prometheus exporter on `addr` (no-op when empty).
pub fn install_metrics(addr: &str) -> Result<(), TelemetryError> {
    if addr.is_empty() {
        return Ok(());
    }
    let addr: SocketAddr =
        addr.parse().map_err(|source| TelemetryError::MetricsAddr { addr: addr.to_string(), source })?;
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets(&[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0])
        .expect("static bucket list is non-empty")
        .install()
        .map_err(|source| TelemetryError::Exporter { addr, source })
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
