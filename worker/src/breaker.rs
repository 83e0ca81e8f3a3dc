//! Circuit breakers shared by all workers: one per provider endpoint and model, kept in NATS KV.
//!
//! The breaker opens after `threshold` consecutive failed calls anywhere in
//! the cluster (server errors, timeouts, malformed answers; not rate limits or
//! refused requests). While open, one call per `interval` is let through as a
//! probe, claimed with compare-and-set so only one worker makes it; a success
//! closes the breaker. Each worker follows the state through a KV watch, so
//! checking the breaker before a call costs no network round trip.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::kvstate::now_ms;

use async_nats::jetstream::kv;
use futures::StreamExt;

use crate::Error;

pub use common::nats::{breaker_key as key, BreakerState};

/// What a caller may do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    Closed,
    /// The breaker is open and this caller won the right to send one probe.
    Probe,
    /// The breaker is open: hold the work back for about this long.
    Open(Duration),
}

pub struct Breaker {
    kv: kv::Store,
    key: String,
    threshold: u32,
    interval: Duration,
    /// The latest state seen through the watch; shared with the watch task.
    cache: Arc<RwLock<BreakerState>>,
    watcher: tokio::task::JoinHandle<()>,
}

impl Drop for Breaker {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

/// Keeps `cache` equal to the breaker's state in KV. A watch ends when NATS
/// goes away or loses the bucket; it is then started again (once a second
/// until it works), from the state as it is then, so the breaker never stays stale.
async fn follow(
    kv: kv::Store,
    key: String,
    mut watch: kv::Watch,
    cache: Arc<RwLock<BreakerState>>,
    gauge: metrics::Gauge,
) {
    loop {
        while let Some(Ok(entry)) = watch.next().await {
            let state: BreakerState = match entry.operation {
                kv::Operation::Put => serde_json::from_slice(&entry.value).unwrap_or_default(),
                _ => BreakerState::default(),
            };
            gauge.set(if state.open { 1.0 } else { 0.0 });
            *cache.write().expect("breaker cache lock") = state;
        }
        tracing::warn!(breaker = %key, "the breaker's watch ended (NATS away?); following it again");
        watch = loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if let Ok(w) = kv.watch_with_history(&key).await {
                break w;
            }
        };
        tracing::info!(breaker = %key, "following the breaker again");
        // A bucket that came back empty holds no breaker: closed, unless the
        // new watch says otherwise.
        *cache.write().expect("breaker cache lock") = BreakerState::default();
    }
}

impl Breaker {
    pub async fn new(
        kv: kv::Store,
        endpoint: &str,
        model: &str,
        threshold: u32,
        interval: Duration,
    ) -> Result<Self, Error> {
        let key = key(endpoint, model);
        let cache = Arc::new(RwLock::new(BreakerState::default()));
        let watch = kv.watch_with_history(&key).await.map_err(|e| Error::Kv(Box::new(e)))?;
        let gauge = metrics::gauge!(crate::metrics::BREAKER_OPEN, "endpoint" => endpoint.to_string(), "model" => model.to_string());
        let watcher = tokio::spawn(follow(kv.clone(), key.clone(), watch, cache.clone(), gauge));
        Ok(Breaker { kv, key, threshold, interval, cache, watcher })
    }

    pub fn state(&self) -> BreakerState {
        self.cache.read().expect("breaker cache lock").clone()
    }

    /// Decides whether a call may go out now.
    pub async fn gate(&self) -> Result<Gate, Error> {
        let state = self.state();
        if !state.open {
            return Ok(Gate::Closed);
        }
        let now = now_ms();
        if now < state.probe_at_ms {
            return Ok(Gate::Open(Duration::from_millis(state.probe_at_ms - now)));
        }
        let interval = self.interval.as_millis() as u64;
        let mut won = false;
        self.modify(|s, now| {
            won = false;
            if !s.open {
                return false;
            }
            if now < s.probe_at_ms {
                return false;
            }
            s.probe_at_ms = now + interval;
            won = true;
            true
        })
        .await?;
        Ok(if won {
            Gate::Probe
        } else if self.state().open {
            Gate::Open(self.interval)
        } else {
            Gate::Closed
        })
    }

    /// Records the outcome of a call that went out. Opening and closing are
    /// logged once for the cluster: by the worker whose write made the change
    /// (the closure runs again on every compare-and-set conflict).
    pub async fn record(&self, ok: bool) -> Result<(), Error> {
        if ok {
            let s = self.state();
            if !s.open && s.failures == 0 {
                return Ok(());
            }
            let mut closed = false;
            let written = self
                .modify(|s, _| {
                    let changed = s.open || s.failures > 0;
                    closed = s.open;
                    *s = BreakerState::default();
                    changed
                })
                .await?;
            if written && closed {
                tracing::info!(breaker = %self.key, "circuit breaker closed");
            }
            return Ok(());
        }
        let (threshold, interval) = (self.threshold, self.interval.as_millis() as u64);
        let mut opened = None;
        let written = self
            .modify(|s, now| {
                s.failures += 1;
                opened = None;
                if !s.open && s.failures >= threshold {
                    s.open = true;
                    s.opened_at_ms = now;
                    s.probe_at_ms = now + interval;
                    opened = Some(s.failures);
                }
                true
            })
            .await?;
        if let (true, Some(failures)) = (written, opened) {
            tracing::warn!(breaker = %self.key, failures, "circuit breaker opened");
        }
        Ok(())
    }

    /// Applies `f` with compare-and-set; whether something was written.
    async fn modify(&self, f: impl FnMut(&mut BreakerState, u64) -> bool) -> Result<bool, Error> {
        match crate::kvstate::modify(&self.kv, "breaker", &self.key, |_| BreakerState::default(), f).await? {
            Some(state) => {
                // Reflect our own write at once rather than waiting for the watch.
                *self.cache.write().expect("breaker cache lock") = state;
                Ok(true)
            }
            None => Ok(false),
        }
    }
}
