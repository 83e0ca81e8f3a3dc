//! The cluster-wide window of calls in flight for one API key and model, shared out between workers through NATS KV.
//!
//! The window adapts like TCP's congestion window: it starts at
//! [`INITIAL_WINDOW`] calls, doubles with each window's worth of successful
//! calls (slow start), then grows by about one call per window (additive
//! increase), and halves when calls fail with server errors or timeouts
//! (multiplicative decrease, once per [`CUT_INTERVAL_MS`]). It starts small
//! again after the model sat idle, so a job's first calls to a dead model, or
//! the calls after an outage, are a handful rather than every slot at once.
//! It never exceeds the configured `max_in_flight`, nor grows far beyond the
//! demand it serves.
//!
//! Each worker records in one KV entry how many slots it holds and how many
//! it would like (calls under way plus calls waiting). A worker grows only
//! into slots nobody holds, so the sum of holdings never exceeds the cap; it
//! gives slots back, as its calls finish, when it holds more than its share of
//! the demand. A worker that dies stops renewing and its slots return to the
//! pool when its entry expires. A lone worker's share is the whole cap.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::Error;

/// How often a worker renews its holding.
const RENEW: Duration = Duration::from_millis(300);
/// Least time between two renewals, however many calls finish.
const RENEW_MIN: Duration = Duration::from_millis(20);
/// Calls in flight across the cluster when a model is first used (or after it sat idle).
pub const INITIAL_WINDOW: f64 = 4.0;
/// A model with no demand for this long starts from the initial window again.
const IDLE_RESET_MS: u64 = 10_000;
/// Failures within this many ms of a cut do not cut again: they answer calls
/// sent before it.
const CUT_INTERVAL_MS: u64 = 500;
/// A holding not renewed for this long is reclaimed.
const EXPIRE_MS: u64 = 3_000;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Holder {
    pub held: u32,
    pub want: u32,
    pub expires_ms: u64,
}

/// The shared entry: the window and the holdings by worker name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CapState {
    pub holders: BTreeMap<String, Holder>,
    /// The adaptive window (0: not started).
    #[serde(default)]
    pub window: f64,
    /// Slow start ends here (set by the last cut).
    #[serde(default)]
    pub ssthresh: f64,
    #[serde(default)]
    pub last_cut_ms: u64,
    /// When some worker last wanted a slot.
    #[serde(default)]
    pub demand_ms: u64,
}

/// Calls that finished since a worker's last renewal.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Feedback {
    pub ok: u32,
    pub failed: u32,
}

impl CapState {
    /// Grows or shrinks the window by the calls that finished.
    pub fn adapt(&mut self, fb: Feedback, now: u64, want: u32) {
        let idle = now.saturating_sub(self.demand_ms) > IDLE_RESET_MS;
        if self.window < 1.0 || (idle && want > 0) {
            self.window = INITIAL_WINDOW;
            self.ssthresh = f64::MAX;
        }
        if want > 0 || self.holders.values().any(|h| h.want > 0) {
            self.demand_ms = now;
        }
        if fb.failed > 0 {
            if self.last_cut_ms == 0 || now >= self.last_cut_ms + CUT_INTERVAL_MS {
                self.last_cut_ms = now;
                self.ssthresh = (self.window / 2.0).max(1.0);
                self.window = self.ssthresh;
            }
            return;
        }
        if fb.ok > 0 {
            // Not far beyond the demand, so the window means something when it
            // is cut; but a dip in demand between chunks does not shrink it.
            let demand: u32 = self.holders.values().map(|h| h.want.max(h.held)).sum::<u32>().max(want);
            let ceiling = ((2 * demand) as f64).max(INITIAL_WINDOW);
            if self.window < ceiling {
                self.window +=
                    if self.window < self.ssthresh { fb.ok as f64 } else { fb.ok as f64 / self.window.max(1.0) };
                self.window = self.window.min(ceiling);
            }
        }
    }

    /// The calls in flight allowed now: the window, within the configured cap (0: none).
    pub fn limit(&self, configured: u32) -> u32 {
        let w = self.window.floor().max(1.0) as u32;
        if configured > 0 {
            w.min(configured)
        } else {
            w
        }
    }

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
        // Another worker is short of slots: share out. Otherwise keep what is
        // held (demand comes and goes between chunks) within the cap, and grow.
        let others_short = self.holders.iter().any(|(n, h)| *n != me && h.want > h.held);
        let held = if others_short {
            if target > current {
                current + free.min(target - current)
            } else {
                target.max(in_use)
            }
        } else {
            want.max(current).min(cap.saturating_sub(others_held)).max(in_use)
        };
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
    ok: AtomicU32,
    failed: AtomicU32,
    wake: Notify,
}

impl Cap {
    /// Starts the renewal task of the window for `key_id` and `model`, within `cap` (0: no fixed cap).
    pub fn start(store: kv::Store, key_id: &str, model: &str, worker: &str, cap: u32) -> Arc<Self> {
        let this = Arc::new(Cap {
            sem: Arc::new(Semaphore::new(0)),
            held: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            ok: AtomicU32::new(0),
            failed: AtomicU32::new(0),
            wake: Notify::new(),
        });
        let key = format!("cc.{}.{}", common::nats::key_part(key_id), common::nats::key_part(model));
        let (me, weak) = (worker.to_string(), Arc::downgrade(&this));
        tokio::spawn(async move {
            let mut health = common::telemetry::Health::default();
            while let Some(cap_ref) = weak.upgrade() {
                match cap_ref.renew(&store, &key, &me, cap).await {
                    Ok(()) => health.ok("renewing the concurrency cap"),
                    Err(err) => health.failed("renewing the concurrency cap", &err),
                }
                tokio::select! {
                    _ = cap_ref.wake.notified() => {}
                    _ = tokio::time::sleep(RENEW) => {}
                }
                drop(cap_ref);
                tokio::time::sleep(RENEW_MIN).await;
            }
        });
        this
    }

    async fn renew(&self, store: &kv::Store, key: &str, me: &str, cap: u32) -> Result<(), Error> {
        let held_before = self.held.load(Ordering::Acquire) as u32;
        let available = self.sem.available_permits() as u32;
        let in_use = held_before.saturating_sub(available);
        let want = in_use + self.waiting.load(Ordering::Acquire) as u32;
        let fb = Feedback { ok: self.ok.swap(0, Ordering::AcqRel), failed: self.failed.swap(0, Ordering::AcqRel) };
        let mut new_held = held_before;
        let result = crate::kvstate::modify(
            store,
            "window",
            key,
            |_| CapState::default(),
            |s, now| {
                s.adapt(fb, now, want);
                new_held = s.rebalance(me, s.limit(cap), want, in_use, now);
                true
            },
        )
        .await;
        if let Err(e) = result {
            // Not counted: keep the feedback for the next renewal.
            self.ok.fetch_add(fb.ok, Ordering::AcqRel);
            self.failed.fetch_add(fb.failed, Ordering::AcqRel);
            return Err(e);
        }
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

    /// Reports a finished call: successes grow the window, server errors and
    /// timeouts shrink it (at once).
    pub fn record(&self, ok: bool) {
        if ok {
            let n = self.ok.fetch_add(1, Ordering::AcqRel) + 1;
            if n as usize >= (self.held.load(Ordering::Acquire) / 2).max(1) {
                self.wake.notify_one();
            }
        } else {
            self.failed.fetch_add(1, Ordering::AcqRel);
            self.wake.notify_one();
        }
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
    fn the_window_starts_small_grows_with_successes_and_halves_on_failures() {
        let mut s = CapState::default();
        s.adapt(Feedback::default(), 0, 100);
        assert_eq!(s.limit(0), 4);
        assert_eq!(s.rebalance("a", s.limit(0), 100, 0, 0), 4);
        // Slow start: a window's worth of successes doubles it.
        s.adapt(Feedback { ok: 4, failed: 0 }, 100, 100);
        assert_eq!(s.limit(0), 8);
        s.adapt(Feedback { ok: 8, failed: 0 }, 200, 100);
        assert_eq!(s.limit(0), 16);
        assert_eq!(s.limit(10), 10, "never above the configured cap");
        // A wave of failures halves it once, not once per failure.
        s.adapt(Feedback { ok: 0, failed: 5 }, 300, 100);
        assert_eq!(s.limit(0), 8);
        s.adapt(Feedback { ok: 0, failed: 5 }, 400, 100);
        assert_eq!(s.limit(0), 8);
        // Then additive increase: about one call per window of successes.
        s.adapt(Feedback { ok: 8, failed: 0 }, 1000, 100);
        assert_eq!(s.limit(0), 9);
        // An outage drives it to one call; the next job or recovery starts small.
        for t in 0..10 {
            s.adapt(Feedback { ok: 0, failed: 1 }, 2_000 + t * 1_000, 100);
        }
        assert_eq!(s.limit(0), 1);
        s.adapt(Feedback::default(), 100_000, 100);
        assert_eq!(s.limit(0), 4, "idle for long: the initial window again");
    }

    #[test]
    fn the_window_does_not_grow_far_beyond_the_demand() {
        let mut s = CapState::default();
        s.adapt(Feedback::default(), 0, 3);
        s.rebalance("a", s.limit(0), 3, 0, 0);
        for t in 1..100 {
            s.adapt(Feedback { ok: 3, failed: 0 }, t, 3);
        }
        assert!(s.limit(0) <= 6, "{}", s.limit(0));
    }

    #[test]
    fn idle_workers_give_their_slots_back_when_another_needs_them() {
        let mut s = CapState::default();
        assert_eq!(s.rebalance("a", 4, 4, 0, 0), 4);
        // Between chunks a wants nothing, but nobody else is short: it keeps them.
        assert_eq!(s.rebalance("a", 4, 0, 0, 1), 4);
        assert_eq!(s.rebalance("b", 4, 8, 0, 2), 0);
        // b is short now: a gives back at its next renewal, and b takes them.
        assert_eq!(s.rebalance("a", 4, 0, 0, 3), 0);
        assert_eq!(s.rebalance("b", 4, 8, 0, 4), 4);
    }

    #[test]
    fn a_cut_window_takes_back_idle_slots() {
        let mut s = CapState::default();
        assert_eq!(s.rebalance("a", 8, 8, 0, 0), 8);
        assert_eq!(s.rebalance("a", 2, 8, 3, 1), 3, "calls under way keep their slots");
        assert_eq!(s.rebalance("a", 2, 8, 0, 2), 2);
    }
}
