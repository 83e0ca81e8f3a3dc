//! The Sluice coordinator: ingests jobs into Postgres, splits them into chunks on JetStream, reconciles lost chunks and serves the control API.

pub mod api;
pub mod auth;
pub mod autoscale;
pub mod cache;
pub mod client;
pub mod config;
pub mod error;
pub mod estimate;
pub mod gauges;
pub mod history;
pub mod ingest;
pub mod label_studio;
pub mod leader;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod openai_batch;
pub mod publish;
pub mod reconcile;
pub mod review;
pub mod review_page;
pub mod store;
pub mod tls;

pub use config::ServeConfig;
pub use error::Error;

use std::net::SocketAddr;

use tokio_util::sync::CancellationToken;

/// A coordinator bound to its listening address, ready to run.
pub struct Coordinator {
    listener: tokio::net::TcpListener,
    /// Set when the API serves HTTPS.
    tls: Option<std::sync::Arc<tokio_rustls::rustls::ServerConfig>>,
    state: api::AppState,
    config: ServeConfig,
    /// The bucket of the leader lease.
    lease: async_nats::jetstream::kv::Store,
}

impl Coordinator {
    /// Connects to Postgres and NATS, applies migrations, declares the stream
    /// and binds the API listener. Every failure names the address it tried.
    pub async fn bind(config: ServeConfig) -> Result<Self, Error> {
        config.validate()?;
        let secret = config.token_secret()?;
        let tls = config.tls()?;
        let pool = common::db::connect(&config.database_url, config.db_pool_size).await?;
        store::ensure_schema(&pool, config.migrate_database_url.as_deref()).await?;
        common::db::check_slots(&pool, &config.database_url, config.db_pool_size, "coordinator").await;
        let nats = common::nats::connect(&config.nats_url, &config.nats_auth).await?;
        let js = async_nats::jetstream::new(nats);
        common::nats::ensure_stream(&js, &config.nats_url).await?;
        let lease = common::nats::ensure_leader_bucket(&js, leader::LEASE_TTL).await?;
        let listener = tokio::net::TcpListener::bind(&config.listen)
            .await
            .map_err(|source| Error::Bind { addr: config.listen.clone(), source })?;
        let catalog = config.catalog()?;
        let prices = config.prices()?;
        let state = api::AppState::new(pool, js, catalog, prices, &config, secret);
        Ok(Coordinator { listener, tls, state, config, lease })
    }

    /// The address the API listens on (useful when binding port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listener has an address")
    }

    /// Serves the API and runs the reconciler until `shutdown` is cancelled.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        let addr = self.local_addr();
        tracing::info!(%addr, https = self.tls.is_some(), "coordinator listening");
        let probe = self.state.clone();
        common::telemetry::set_readiness(std::sync::Arc::new(move || {
            let state = probe.clone();
            Box::pin(async move {
                let r = api::readiness(&state).await;
                (r.ready, serde_json::to_value(&r).unwrap_or_default())
            })
        }));
        // Every replica serves the API; the leader alone publishes and reconciles.
        let lead = {
            let (state, config) = (self.state.clone(), self.config.clone());
            move |leading: CancellationToken| lead(&state, &config, leading)
        };
        let leader = tokio::spawn(leader::run(
            self.state.js.clone(),
            self.lease,
            self.state.leader.clone(),
            lead,
            shutdown.clone(),
        ));
        // The peer's address, for the audit of refused requests and the throttle.
        let app = api::router(self.state).into_make_service_with_connect_info::<SocketAddr>();
        let stop = shutdown.clone();
        let stopped = async move { stop.cancelled().await };
        let served = match self.tls {
            Some(tls) => {
                let listener = tls::TlsListener::new(self.listener, tls)
                    .map_err(|source| Error::Bind { addr: addr.to_string(), source })?;
                // `tap_io` only so axum hands the peer's address to ConnectInfo, as it does for a TcpListener.
                let listener = axum::serve::ListenerExt::tap_io(listener, |_| {});
                axum::serve(listener, app).with_graceful_shutdown(stopped).await
            }
            None => axum::serve(self.listener, app).with_graceful_shutdown(stopped).await,
        };
        served.map_err(|source| Error::Bind { addr: addr.to_string(), source })?;
        let _ = leader.await;
        Ok(())
    }
}

/// Starts what the leader runs, until `leading` is cancelled: the publisher
/// and, unless disabled, the reconciler.
fn lead(state: &api::AppState, config: &ServeConfig, leading: CancellationToken) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    let publisher = publish::Publisher::new(
        state.js.clone(),
        state.pool.clone(),
        state.stream.clone(),
        std::time::Duration::from_millis(config.queue_ahead_ms),
    );
    tasks.push(tokio::spawn(publish::run(
        publisher,
        std::time::Duration::from_millis(config.publish_interval_ms),
        state.wake.clone(),
        state.leader.clone(),
        leading.clone(),
    )));
    tasks.push(tokio::spawn(gauges::run(
        state.pool.clone(),
        state.catalog.clone(),
        config.autoscale(),
        leading.clone(),
    )));
    tasks.push(tokio::spawn(history::run(state.pool.clone(), leading.clone())));
    tasks.push(tokio::spawn(notify::run(
        notify::Context {
            pool: state.pool.clone(),
            js: state.js.clone(),
            catalog: state.catalog.clone(),
            signer: notify::Signer::new(state.secret.clone()),
            http: reqwest::Client::new(),
        },
        notify::Settings::from(config),
        leading.clone(),
    )));
    if config.reconcile_interval_ms > 0 {
        let context = reconcile::Context {
            pool: state.pool.clone(),
            js: state.js.clone(),
            stream: state.stream.clone(),
            wake: state.wake.clone(),
            leader: state.leader.clone(),
        };
        tasks.push(tokio::spawn(reconcile::run(context, reconcile::Settings::from(config), leading)));
    }
    tasks
}

/// Runs a coordinator with `config` until `shutdown` is cancelled.
pub async fn run(config: ServeConfig, shutdown: CancellationToken) -> Result<(), Error> {
    Coordinator::bind(config).await?.run(shutdown).await
}
