//! The providers a worker serves: one HTTP client and key ring per configured endpoint, and the routes of a job's models.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::provider::{ChatClient, Endpoint as ClientEndpoint};
use common::providers::{Catalog, ModelConfig, ProviderKind};
use secrecy::SecretString;

use crate::keys::KeyRing;
use crate::Error;

/// One configured provider.
pub struct Endpoint {
    pub name: String,
    pub client: ChatClient,
    pub keys: KeyRing,
}

/// Every provider of the catalog, ready to call.
pub struct Endpoints {
    catalog: Catalog,
    by_name: HashMap<String, Arc<Endpoint>>,
}

/// A job's model at its provider: where a call goes and the rules it follows.
#[derive(Clone)]
pub struct Route {
    pub endpoint: Arc<Endpoint>,
    /// The model as the provider names it.
    pub model: String,
    /// What the request's `model` (or Azure's deployment in the URL) says.
    pub wire_model: String,
    pub config: ModelConfig,
}

impl Route {
    /// `provider/model`.
    pub fn reference(&self) -> String {
        format!("{}/{}", self.endpoint.name, self.model)
    }
}

impl Endpoints {
    /// Builds a client per provider and reads its keys, once, at start-up.
    pub fn new(catalog: Catalog, timeout: Duration, pool_size: usize) -> Result<Self, Error> {
        Self::build(catalog, None, timeout, pool_size)
    }

    /// The one-provider shorthand, whose keys come from the worker's own settings.
    pub fn with_shorthand_keys(
        catalog: Catalog,
        keys: Vec<SecretString>,
        timeout: Duration,
        pool_size: usize,
    ) -> Result<Self, Error> {
        Self::build(catalog, Some(keys), timeout, pool_size)
    }

    fn build(
        catalog: Catalog,
        mut given: Option<Vec<SecretString>>,
        timeout: Duration,
        pool_size: usize,
    ) -> Result<Self, Error> {
        let mut by_name = HashMap::new();
        for (name, p) in &catalog.providers {
            let keys = match given.take() {
                Some(k) => k,
                None => catalog.keys(name).map_err(|e| Error::Config(common::error_chain(&e)))?,
            };
            let client = ChatClient::new(ClientEndpoint {
                kind: p.kind,
                base_url: p.base_url().to_string(),
                api_version: p.api_version.clone(),
                anthropic_version: p.anthropic_version.clone(),
                timeout: p.timeout_ms.map_or(timeout, Duration::from_millis),
                pool_size,
            })
            .map_err(Error::Http)?;
            by_name.insert(
                name.clone(),
                Arc::new(Endpoint { name: name.clone(), client, keys: KeyRing::new(keys, name) }),
            );
        }
        Ok(Endpoints { catalog, by_name })
    }

    /// Resolves a job's model reference (`provider/model` or a bare model).
    pub fn route(&self, reference: &str) -> Result<Route, String> {
        let t = self.catalog.resolve(reference)?;
        let endpoint = self.by_name[t.provider].clone();
        let wire_model = match endpoint.client.kind() {
            ProviderKind::AzureOpenai => t.config.deployment.clone().unwrap_or_else(|| t.model.to_string()),
            _ => t.model.to_string(),
        };
        Ok(Route { endpoint, model: t.model.to_string(), wire_model, config: t.config.clone() })
    }

    pub fn describe(&self) -> String {
        self.catalog.describe()
    }
}
