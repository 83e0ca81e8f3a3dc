//! The shared guards of model calls, one per model: its cluster-wide rate limiter and circuit breaker.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::kv;

use crate::breaker::Breaker;
use crate::cap::Cap;
use crate::limit::{Limiter, Limits};
use crate::Error;

/// Settings of the guards, from the worker's configuration.
#[derive(Debug, Clone)]
pub struct GuardConfig {
    /// The provider endpoint the breakers are for.
    pub endpoint: String,
    pub limits: Limits,
    pub breaker_threshold: u32,
    pub breaker_interval: Duration,
    /// Calls in flight allowed across the cluster per API key and model (0: no cap).
    pub max_in_flight: u32,
    /// This worker's name, under which it holds cap slots.
    pub worker: String,
}

/// Limiters and breakers by model, created on first use.
pub struct Guards {
    kv: kv::Store,
    config: GuardConfig,
    /// By (key id, model): a limit belongs to an API key and a model.
    limiters: Mutex<HashMap<(String, String), Arc<Limiter>>>,
    breakers: tokio::sync::Mutex<HashMap<String, Arc<Breaker>>>,
    caps: Mutex<HashMap<(String, String), Arc<Cap>>>,
}

impl Guards {
    pub fn new(kv: kv::Store, config: GuardConfig) -> Self {
        Guards {
            kv,
            config,
            limiters: Mutex::default(),
            breakers: tokio::sync::Mutex::default(),
            caps: Mutex::default(),
        }
    }

    /// The limiter of an API key (by id) and model, or `None` when no limit is configured.
    pub fn limiter(&self, key_id: &str, model: &str) -> Option<Arc<Limiter>> {
        let l = self.config.limits;
        if l.rpm <= 0.0 && l.tpm <= 0.0 {
            return None;
        }
        // A token-only limit still needs some request rate: make it unbounded in practice.
        let limits = Limits { rpm: if l.rpm > 0.0 { l.rpm } else { 1e9 }, tpm: l.tpm };
        let mut map = self.limiters.lock().expect("limiters lock");
        Some(
            map.entry((key_id.to_string(), model.to_string()))
                .or_insert_with(|| Arc::new(Limiter::new(self.kv.clone(), key_id, model, limits)))
                .clone(),
        )
    }

    /// The cluster-wide cap on calls in flight for a key and model, or `None` when not configured.
    pub fn cap(&self, key_id: &str, model: &str) -> Option<Arc<Cap>> {
        let c = &self.config;
        if c.max_in_flight == 0 {
            return None;
        }
        let mut map = self.caps.lock().expect("caps lock");
        Some(
            map.entry((key_id.to_string(), model.to_string()))
                .or_insert_with(|| Cap::start(self.kv.clone(), key_id, model, &c.worker, c.max_in_flight))
                .clone(),
        )
    }

    pub async fn breaker(&self, model: &str) -> Result<Arc<Breaker>, Error> {
        let mut map = self.breakers.lock().await;
        if let Some(b) = map.get(model) {
            return Ok(b.clone());
        }
        let c = &self.config;
        let b =
            Arc::new(Breaker::new(self.kv.clone(), &c.endpoint, model, c.breaker_threshold, c.breaker_interval).await?);
        map.insert(model.to_string(), b.clone());
        Ok(b)
    }
}
