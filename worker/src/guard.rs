//! The shared guards of model calls: per API key and model a cluster-wide rate limiter and window of calls in flight, per endpoint and model a circuit breaker.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::kv;

use crate::breaker::Breaker;
use crate::cap::Cap;
use crate::limit::{Limiter, Limits};
use crate::Error;
use common::providers::ModelConfig;

/// Settings of the guards, from the worker's configuration.
#[derive(Debug, Clone)]
pub struct GuardConfig {
    pub breaker_threshold: u32,
    pub breaker_interval: Duration,
    /// This worker's name, under which it holds cap slots.
    pub worker: String,
}

/// The limits configured for a model (all 0 where the user gave none).
fn limits(config: &ModelConfig) -> Limits {
    Limits { rpm: config.rpm, tpm: config.tpm, input_tpm: config.input_tpm, output_tpm: config.output_tpm }
}

/// Limiters and breakers by model, created on first use.
pub struct Guards {
    kv: kv::Store,
    config: GuardConfig,
    /// By (key id, model): a limit belongs to an API key and a model.
    limiters: Mutex<HashMap<(String, String), Arc<Limiter>>>,
    /// By (endpoint, model).
    breakers: tokio::sync::Mutex<HashMap<(String, String), Arc<Breaker>>>,
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

    /// The limiter of an API key (by id) and model: where a limit is
    /// configured, or once the provider has shown it limits this key (see
    /// [`Guards::provider_limits`]); otherwise `None`.
    pub fn limiter(&self, key_id: &str, model: &str, config: &ModelConfig) -> Option<Arc<Limiter>> {
        if limits(config).any() {
            return Some(self.provider_limits(key_id, model, config));
        }
        self.limiters.lock().expect("limiters lock").get(&(key_id.to_string(), model.to_string())).cloned()
    }

    /// The provider has shown that it limits this key and model (an answer
    /// announcing a limit, or a 429): the limiter, created if none was, so a
    /// user who configured no limit gets the provider's.
    pub fn provider_limits(&self, key_id: &str, model: &str, config: &ModelConfig) -> Arc<Limiter> {
        let mut map = self.limiters.lock().expect("limiters lock");
        map.entry((key_id.to_string(), model.to_string()))
            .or_insert_with(|| Arc::new(Limiter::new(self.kv.clone(), key_id, model, limits(config))))
            .clone()
    }

    /// The cluster-wide window of calls in flight for a key and model, within
    /// `max_in_flight` (0: the adaptive window alone).
    pub fn cap(&self, key_id: &str, model: &str, max_in_flight: u32) -> Arc<Cap> {
        let mut map = self.caps.lock().expect("caps lock");
        map.entry((key_id.to_string(), model.to_string()))
            .or_insert_with(|| Cap::start(self.kv.clone(), key_id, model, &self.config.worker, max_in_flight))
            .clone()
    }

    /// The circuit breaker of `model` at the endpoint `base_url`.
    pub async fn breaker(&self, base_url: &str, model: &str) -> Result<Arc<Breaker>, Error> {
        let mut map = self.breakers.lock().await;
        let k = (base_url.to_string(), model.to_string());
        if let Some(b) = map.get(&k) {
            return Ok(b.clone());
        }
        let c = &self.config;
        let b =
            Arc::new(Breaker::new(self.kv.clone(), base_url, model, c.breaker_threshold, c.breaker_interval).await?);
        map.insert(k, b.clone());
        Ok(b)
    }
}
