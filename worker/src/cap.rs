//! The cluster-wide cap on calls in flight for one API key and model, shared out between workers through NATS KV.
//!
//! Each worker records in one KV entry how many slots it holds and how many
//! it would like (calls under way plus calls waiting). A worker grows only
//! into slots nobody holds, so the sum of holdings never exceeds the cap; it
//! gives slots back, as its calls finish, when it holds more than its share of
//! the demand. A worker that dies stops renewing and its slots return to the
//! pool when its entry expires. A lone worker's share is the whole cap.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::Error;

/// How often a worker renews its holding.
const RENEW: Duration = Duration::from_millis(300);
/// A holding not renewed for this long is reclaimed.
const EXPIRE_MS: u64 = 3_000;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Holder {
    pub held: u32,
    pub want: u32,
    pub expires_ms: u64,
}

/// The shared entry: holdings by worker name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CapState {
    pub holders: BTreeMap<String, Holder>,
}

impl CapState {
    /// Computes `me`'s new holding given its demand and how many slots it
    /// cannot give back yet (`in_use`), and records it. Returns the holding.
    pub fn rebalance(&mut self, me: &str, cap: u32, want: u32, in_use: u32, now: u64) -> u32 {
        self.holders.retain(|name, h| name == me || h.expires_ms > now);
        let current = self.holders.get(me).map_or(0, |h| h.held);
        let others_held: u32 = self.holders.iter().filter(|(n, _)| *n != me).map(|(_, h)| h.held).sum();
        let total_want: u32 = self.holders.iter().filter(|(n, _)| *n != me).map(|(_, h)| h.want).sum::<u32>() + want;
        // Share of the cap in proportion to demand, at least one slot for any demand.
        let share = if want == 0 {
            0
        } else {
            ((cap as u64 * want as u64).div_ceil(total_want.max(1) as u64) as u32).clamp(1, cap)
        };
        let target = share.min(want.max(in_use));
        let free = cap.saturating_sub(others_held + current);
        let held = if target > current { current + free.min(target - current) } else { target.max(in_use) };
        self.holders.insert(me.to_string(), Holder { held, want, expires_ms: now + EXPIRE_MS });
        held
    }
}

/// This worker's side of one cap.
pub struct Cap {
    /// Permits this worker may hand out: its holding minus calls under way.
    sem: Arc<Semaphore>,
    held: AtomicUsize,
    waiting: AtomicUsize,
    wake: Notify,
}

impl Cap {
    /// Starts the renewal task of the cap `cap` for `key_id` and `model`.
    pub fn start(store: kv::Store, key_id: &str, model: &str, worker: &str, cap: u32) -> Arc<Self> {
        let this = Arc::new(Cap {
            sem: Arc::new(Semaphore::new(0)),
            held: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            wake: Notify::new(),
        });
        let key = format!("cc.{}.{}", common::nats::key_part(key_id), common::nats::key_part(model));
        let (me, weak) = (worker.to_string(), Arc::downgrade(&this));
        tokio::spawn(async move {
            while let Some(cap_ref) = weak.upgrade() {
                if let Err(err) = cap_ref.renew(&store, &key, &me, cap).await {
                    tracing::warn!(error = &err as &dyn std::error::Error, "renewing the concurrency cap failed");
                }
                tokio::select! {
                    _ = cap_ref.wake.notified() => {}
                    _ = tokio::time::sleep(RENEW) => {}
                }
            }
        });
        this
    }

    async fn renew(&self, store: &kv::Store, key: &str, me: &str, cap: u32) -> Result<(), Error> {
        let held_before = self.held.load(Ordering::Acquire) as u32;
        let available = self.sem.available_permits() as u32;
        let in_use = held_before.saturating_sub(available);
        let want = in_use + self.waiting.load(Ordering::Acquire) as u32;
        let mut new_held = held_before;
        crate::kvstate::modify(
            store,
            key,
            |_| CapState::default(),
            |s, now| {
                new_held = s.rebalance(me, cap, want, in_use, now);
                true
            },
        )
        .await?;
        if new_held > held_before {
            self.sem.add_permits((new_held - held_before) as usize);
            self.held.store(new_held as usize, Ordering::Release);
        } else if new_held < held_before {
            // Only idle permits can be taken back; the KV entry may briefly
            // say less than we hold, and the next renewal corrects it.
            let gone = self.sem.forget_permits((held_before - new_held) as usize);
            self.held.store(held_before as usize - gone, Ordering::Release);
        }
        Ok(())
    }

    /// Waits for a slot; the call holds it until the permit is dropped.
    pub async fn acquire(&self) -> OwnedSemaphorePermit {
        if let Ok(p) = self.sem.clone().try_acquire_owned() {
            return p;
        }
        self.waiting.fetch_add(1, Ordering::AcqRel);
        self.wake.notify_one();
        let p = self.sem.clone().acquire_owned().await.expect("semaphore never closed");
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lone_worker_takes_the_whole_cap() {
        let mut s = CapState::default();
        assert_eq!(s.rebalance("a", 10, 50, 0, 0), 10);
    }

    #[test]
    fn holdings_never_exceed_the_cap_and_converge_to_shares() {
        let mut s = CapState::default();
        assert_eq!(s.rebalance("a", 10, 50, 0, 0), 10);
        // b joins: nothing is free yet.
        assert_eq!(s.rebalance("b", 10, 50, 0, 1), 0);
        // a still has 10 calls under way, so it keeps them; then they finish.
        assert_eq!(s.rebalance("a", 10, 50, 10, 2), 10);
        assert_eq!(s.rebalance("a", 10, 50, 3, 3), 5);
        assert_eq!(s.rebalance("b", 10, 50, 0, 4), 5);
        let total: u32 = s.holders.values().map(|h| h.held).sum();
        assert_eq!(total, 10);
    }

    #[test]
    fn a_dead_workers_slots_are_reclaimed() {
        let mut s = CapState::default();
        assert_eq!(s.rebalance("a", 4, 10, 0, 0), 4);
        assert_eq!(s.rebalance("b", 4, 10, 0, 1_000), 0);
        assert_eq!(s.rebalance("b", 4, 10, 0, EXPIRE_MS + 1), 4);
        assert!(!s.holders.contains_key("a"));
    }

    #[test]
    fn idle_workers_give_their_slots_back() {
        let mut s = CapState::default();
        assert_eq!(s.rebalance("a", 4, 4, 0, 0), 4);
        assert_eq!(s.rebalance("a", 4, 0, 0, 1), 0);
        assert_eq!(s.rebalance("b", 4, 8, 0, 2), 4);
    }
}
