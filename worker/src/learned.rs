//! What the cluster has learned about a model at an endpoint: which structured-output mode it accepts and whether it sends log-probabilities.
//!
//! Kept in NATS KV (`lm.<endpoint>.<model>`) so one worker's discovery serves
//! every worker, and logged once: by the worker whose compare-and-set wrote it.
//! A fact is trusted for [`RELEARN_AFTER_MS`]; then the strongest mode (and
//! log-probabilities) are tried again, so an upgraded server is noticed.

use std::collections::HashMap;
use std::sync::Mutex;

use async_nats::jetstream::kv;
use common::providers::OutputMode;
use serde::{Deserialize, Serialize};

use crate::Error;

/// How long a learned fact holds before it is tried again.
pub const RELEARN_AFTER_MS: u64 = 3_600_000;

/// The shared entry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Facts {
    /// The strongest structured-output mode the server accepted; `None` until it refused one.
    pub output: Option<OutputMode>,
    /// The server answered a request for log-probabilities without them.
    #[serde(default)]
    pub no_logprobs: bool,
    /// When the facts were last learned, ms since the epoch.
    #[serde(default)]
    pub at_ms: u64,
}

impl Facts {
    /// The facts still in force at `now`: none once they are too old.
    pub fn in_force(self, now: u64) -> Facts {
        if now.saturating_sub(self.at_ms) > RELEARN_AFTER_MS {
            Facts::default()
        } else {
            self
        }
    }
}

/// This worker's view of the facts, read from KV once per endpoint and model.
pub struct Learned {
    kv: kv::Store,
    cache: Mutex<HashMap<String, Facts>>,
    /// One read at a time fills the cache: a worker's first calls to a model
    /// (as many as its concurrency) wait for one read instead of each making one.
    filling: tokio::sync::Mutex<()>,
}

fn key(endpoint: &str, model: &str) -> String {
    format!("lm.{}.{}", common::nats::key_part(endpoint), common::nats::key_part(model))
}

impl Learned {
    pub fn new(kv: kv::Store) -> Self {
        Learned { kv, cache: Mutex::default(), filling: tokio::sync::Mutex::new(()) }
    }

    /// The facts of `model` at `endpoint`.
    pub async fn get(&self, endpoint: &str, model: &str) -> Result<Facts, Error> {
        let k = key(endpoint, model);
        let cached = |now| {
            let cache = self.cache.lock().expect("learned lock");
            cache.get(&k).copied().filter(|f| f.in_force(now) == *f)
        };
        if let Some(f) = cached(crate::kvstate::now_ms()) {
            return Ok(f);
        }
        let _filling = self.filling.lock().await;
        let now = crate::kvstate::now_ms();
        if let Some(f) = cached(now) {
            return Ok(f);
        }
        crate::metrics::state_request("learned", "read");
        let facts = match self.kv.get(k.clone()).await.map_err(|e| Error::Kv(Box::new(e)))? {
            Some(bytes) => serde_json::from_slice::<Facts>(&bytes).unwrap_or_default().in_force(now),
            None => Facts::default(),
        };
        self.cache.lock().expect("learned lock").insert(k, facts);
        Ok(facts)
    }

    /// Records a change for the cluster; `what` describes it for the one log line.
    async fn update(
        &self,
        endpoint: &str,
        model: &str,
        what: &str,
        f: impl Fn(&mut Facts) -> bool,
    ) -> Result<Facts, Error> {
        let k = key(endpoint, model);
        let written = crate::kvstate::modify(
            &self.kv,
            "learned",
            &k,
            |_| Facts::default(),
            |facts, now| {
                *facts = facts.in_force(now);
                let changed = f(facts);
                if changed {
                    facts.at_ms = now;
                }
                changed
            },
        )
        .await?;
        if written.is_some() {
            tracing::warn!(endpoint, model, "{what}");
        }
        // Whoever wrote it, read the result back into the cache.
        self.cache.lock().expect("learned lock").remove(&k);
        self.get(endpoint, model).await
    }

    /// The server refused `refused`: use the next weaker mode from now on.
    pub async fn refuse_output(&self, endpoint: &str, model: &str, refused: OutputMode) -> Result<OutputMode, Error> {
        let Some(next) = refused.weaker() else { return Ok(refused) };
        let what = format!(
            "the server refused structured output as {}; asking for {} from now on (schema in the prompt, answers still validated)",
            refused.as_str(),
            next.as_str()
        );
        let facts = self
            .update(endpoint, model, &what, |f| {
                if f.output.is_some_and(|m| m >= next) {
                    return false;
                }
                f.output = Some(next);
                true
            })
            .await?;
        Ok(facts.output.unwrap_or(next))
    }

    /// The server sent no log-probabilities though they were asked for.
    pub async fn no_logprobs(&self, endpoint: &str, model: &str) -> Result<(), Error> {
        let what = "the server sends no log-probabilities; confidence uses the kind's next strategy";
        self.update(endpoint, model, what, |f| !std::mem::replace(&mut f.no_logprobs, true)).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facts_are_tried_again_after_an_hour() {
        let f = Facts { output: Some(OutputMode::JsonObject), no_logprobs: true, at_ms: 1_000 };
        assert_eq!(f.in_force(1_000 + RELEARN_AFTER_MS), f);
        assert_eq!(f.in_force(1_001 + RELEARN_AFTER_MS), Facts::default());
    }
}
