//! The cluster-wide window of calls in flight for one API key and model, shared out between workers through NATS KV.
//!
//! The window adapts like TCP's congestion window: it starts at
//! [`INITIAL_WINDOW`] calls (or one per worker wanting slots, if more, until
//! its first cut), doubles with each window's worth of successful
//! calls (slow start), then grows by about one call per window (additive
//! increase), and halves when calls fail with server errors or timeouts
//! (multiplicative decrease, once per [`CUT_INTERVAL_MS`]). It starts small
//! again after the model sat idle, so a job's first calls to a dead model, or
//! the calls after an outage, are a handful rather than every slot at once.
//! It never exceeds the configured `max_in_flight`, nor grows far beyond the
//! demand it serves, nor grows while the rate limit, not the window, holds
//! the calls back.
//!
//! Each worker records in one KV entry how many slots it holds and how many
//! it would like (calls under way plus calls waiting). A worker grows only
//! into slots nobody holds, so the sum of holdings never exceeds the cap; it
//! gives slots back, as its calls finish, when it holds more than its share of
//! the demand. A worker that dies stops renewing and its slots return to the
//! pool when its entry expires. A lone worker's share is the whole cap.
//!
//! The entry's traffic follows the calls, not the workers ([`pacing`]): a
//! worker renews after a batch of finished calls, keeps its holding alive at
//! an interval that grows with the number of holders (so the cluster renews
//! about as often whatever its size), writes only when something another
//! worker would see has changed or its keep-alive is due, and a worker that
//! holds and wants nothing leaves the entry and waits until it has calls.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::kvstate::Modified;
use crate::Error;

/// A holding's keep-alive, per worker holding a share: with N holders each
/// renews every N x this, so the cluster renews about every 60 ms.
const KEEPALIVE_PER_HOLDER: Duration = Duration::from_millis(60);
/// The keep-alive of a lone worker or a few, and the longest.
const RENEW: Duration = Duration::from_millis(300);
const KEEPALIVE_MAX: Duration = Duration::from_secs(5);
/// Least time between two renewals of a worker, per holder (and at least
/// 20 ms, at most a second), however many calls finish.
const GAP_PER_HOLDER: Duration = Duration::from_millis(20);
const RENEW_MIN: Duration = Duration::from_millis(20);
const GAP_MAX: Duration = Duration::from_secs(1);
/// Finished calls after which a worker renews early: a sixteenth of the
/// window, at most this (or half its holding, if more). The window learns
/// from batches: about 16 renewals per latency for the cluster, whatever
/// its size, and every call's news while the window is small and growing.
const OK_BATCH: u32 = 16;

/// Finished calls after which to renew early, for a window of `window` calls.
pub fn ok_batch(window: u32) -> u32 {
    (window / 16).clamp(1, OK_BATCH)
}
/// Calls in flight across the cluster when a model is first used (or after it sat idle).
pub const INITIAL_WINDOW: f64 = 4.0;
/// An idle worker looks again this often even unasked (a lost wake-up costs no more).
const IDLE_RECHECK: Duration = Duration::from_secs(10);
/// A model with no demand for this long starts from the initial window again.
const IDLE_RESET_MS: u64 = 10_000;
/// Failures within this many ms of a cut do not cut again: they answer calls
/// sent before it.
const CUT_INTERVAL_MS: u64 = 500;
/// A holding not renewed for this long is reclaimed (or for three
/// keep-alives, if longer).
const EXPIRE_MS: u64 = 3_000;

/// How a worker renews when `holders` workers (itself included) hold or
/// want a share of the window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pacing {
    /// Renew at least this often while holding or wanting slots.
    pub keepalive: Duration,
    /// Never renew sooner than this after the last renewal.
    pub gap: Duration,
    /// The holding expires this long after a renewal writes it.
    pub expire_ms: u64,
}

/// The renewal pace for `holders` holders.
pub fn pacing(holders: usize) -> Pacing {
    let n = holders.max(1) as u32;
    let keepalive = (KEEPALIVE_PER_HOLDER * n).clamp(RENEW, KEEPALIVE_MAX);
    Pacing {
        keepalive,
        gap: (GAP_PER_HOLDER * n).clamp(RENEW_MIN, GAP_MAX),
        expire_ms: EXPIRE_MS.max(3 * keepalive.as_millis() as u64),
    }
}

/// Whether a renewal that turned `before` into `after` needs writing: it
/// changed something another worker sees (a holding, a demand, the window),
/// or `me`'s keep-alive is due. The demand's timestamp alone is news only
/// when it is old.
pub fn worth_writing(before: &CapState, after: &CapState, me: &str, now: u64, p: Pacing) -> bool {
    let Some(mine) = before.holders.get(me) else { return after.holders.contains_key(me) };
    // Written last at expires_ms - expire_ms: due a keep-alive after that.
    if now + p.expire_ms >= mine.expires_ms + p.keepalive.as_millis() as u64 {
        return true;
    }
    let mut a = after.clone();
    if let Some(h) = a.holders.get_mut(me) {
        h.expires_ms = mine.expires_ms;
    }
    if a.demand_ms.saturating_sub(before.demand_ms) < IDLE_RESET_MS / 2 {
        a.demand_ms = before.demand_ms;
    }
    a != *before
}

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
    /// Some call waited for the rate limit's budget while holding a slot:
    /// the limit, not the window, held the calls back.
    pub rate_bound: bool,
}

impl Feedback {
    /// Whether a renewal carrying this news may give way to another
    /// worker's write and come back after its gap: only good news, from a
    /// worker already holding slots (failures cut the window at once, and a
    /// worker holding none needs its first).
    fn patient(&self, held: u32, idle: bool) -> bool {
        held > 0 && self.failed == 0 && !idle
    }
}

impl CapState {
    /// Grows or shrinks the window by the calls that finished. Successes
    /// of calls that waited for the rate limit's budget do not grow it:
    /// the limit held them back, not the window (as TCP's window grows only
    /// while it limits the sender, RFC 7661), and a window grown past what
    /// the limit lets through would only make the workers short of slots
    /// they cannot use, renewing every gap for them.
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
        if fb.ok > 0 && !fb.rate_bound {
            let ceiling = self.ceiling(want);
            if self.window < ceiling {
                self.window +=
                    if self.window < self.ssthresh { fb.ok as f64 } else { fb.ok as f64 / self.window.max(1.0) };
                self.window = self.window.min(ceiling);
            }
        }
    }

    /// Until the window is first cut, one slot at least for every worker
    /// wanting one (`me` wanting `want`): a cluster of 64 workers starting
    /// from 4 slots spent its first 5 s mostly renewing for them (its
    /// window grows by renewals a gap apart, and a gap grows with the
    /// workers: [`pacing`]). A model that is down when a job starts then
    /// sees one call per worker before the first failure halves the window.
    pub fn one_each(&mut self, me: &str, want: u32, now: u64) {
        if self.ssthresh < f64::MAX {
            return;
        }
        let others = self.holders.iter().filter(|(n, h)| *n != me && h.want > 0 && h.expires_ms > now).count();
        self.window = self.window.max((others + usize::from(want > 0)) as f64);
    }

    /// How far successes may grow the window: not far beyond the demand (twice
    /// it), so the window means something when it is cut; but a dip in demand
    /// between chunks does not shrink it.
    fn ceiling(&self, want: u32) -> f64 {
        let demand: u32 = self.holders.values().map(|h| h.want.max(h.held)).sum::<u32>().max(want);
        ((2 * demand) as f64).max(INITIAL_WINDOW)
    }

    /// Whether successes can still grow the window (below its ceiling and
    /// the configured cap, 0: none): only then is their news worth an early
    /// renewal.
    pub fn can_grow(&self, want: u32, configured: u32) -> bool {
        self.window < self.ceiling(want) && (configured == 0 || self.window < configured as f64)
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
        self.rebalance_for(me, cap, want, in_use, now, EXPIRE_MS)
    }

    /// [`CapState::rebalance`], the holding expiring `expire_ms` from now.
    pub fn rebalance_for(&mut self, me: &str, cap: u32, want: u32, in_use: u32, now: u64, expire_ms: u64) -> u32 {
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
        self.holders.insert(me.to_string(), Holder { held, want, expires_ms: now + expire_ms });
        held
    }

    /// Workers holding or wanting a share, unexpired at `now`.
    pub fn live_holders(&self, now: u64) -> usize {
        self.holders.values().filter(|h| h.expires_ms > now && (h.held > 0 || h.want > 0)).count()
    }
}

/// Where a worker stands after a renewal, which sets when it renews next.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Standing {
    /// Holds and wants nothing, and has left the entry.
    Idle,
    /// Its calls want more slots than it holds.
    Short,
    /// Holds what it wants.
    Holding,
}

impl Standing {
    /// Where a worker that wants `want` slots and holds `held` stands. Its
    /// calls waited for the rate limit's budget (`rate_bound`): more slots
    /// would only wait longer, so one holding any is not short of them.
    fn after(idle: bool, want: u32, held: u32, rate_bound: bool) -> Standing {
        if idle {
            Standing::Idle
        } else if want > held && !(rate_bound && held > 0) {
            Standing::Short
        } else {
            Standing::Holding
        }
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
    /// Holders seen at the last renewal: sets the pace.
    holders: AtomicUsize,
    /// The window at the last renewal: sets the batch of finished calls.
    window: AtomicU32,
    /// The window could still grow at the last renewal: finished calls
    /// wake an early renewal only then.
    growing: AtomicBool,
    /// A call waited for the rate limit's budget since the last renewal.
    rate_bound: AtomicBool,
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
            holders: AtomicUsize::new(1),
            window: AtomicU32::new(INITIAL_WINDOW as u32),
            growing: AtomicBool::new(true),
            rate_bound: AtomicBool::new(false),
        });
        let key = format!("cc.{}.{}", common::nats::key_part(key_id), common::nats::key_part(model));
        let (me, weak) = (worker.to_string(), Arc::downgrade(&this));
        tokio::spawn(async move {
            let mut health = common::telemetry::Health::default();
            while let Some(cap_ref) = weak.upgrade() {
                let standing = match cap_ref.renew(&store, &key, &me, cap).await {
                    Ok(standing) => {
                        health.ok("renewing the concurrency cap");
                        standing
                    }
                    Err(err) => {
                        health.failed("renewing the concurrency cap", &err);
                        Standing::Short
                    }
                };
                let p = pacing(cap_ref.holders.load(Ordering::Acquire));
                let wait = match standing {
                    // Nothing held or wanted: until a call asks for a slot (or
                    // a long while, should a wake-up go astray).
                    Standing::Idle => IDLE_RECHECK,
                    // Calls wait for slots: look again after the gap alone.
                    Standing::Short => Duration::ZERO,
                    Standing::Holding => p.keepalive,
                };
                tokio::select! {
                    _ = cap_ref.wake.notified() => {}
                    _ = tokio::time::sleep(wait) => {}
                }
                drop(cap_ref);
                tokio::time::sleep(p.gap).await;
            }
        });
        this
    }

    /// Renews this worker's holding; returns where it stands.
    async fn renew(&self, store: &kv::Store, key: &str, me: &str, cap: u32) -> Result<Standing, Error> {
        let held_before = self.held.load(Ordering::Acquire) as u32;
        let available = self.sem.available_permits() as u32;
        let in_use = held_before.saturating_sub(available);
        let want = in_use + self.waiting.load(Ordering::Acquire) as u32;
        let fb = Feedback {
            ok: self.ok.swap(0, Ordering::AcqRel),
            failed: self.failed.swap(0, Ordering::AcqRel),
            rate_bound: self.rate_bound.swap(false, Ordering::AcqRel),
        };
        let idle = want == 0 && held_before == 0 && fb == Feedback::default();
        let mut new_held = held_before;
        let mut holders = 1;
        let mut window = INITIAL_WINDOW as u32;
        let mut growing = true;
        // A worker holding slots, with only good news, gives way to another
        // worker's renewal and comes back after its gap: with 64 workers in
        // slow start, trying again at once cost 0.09 NATS requests per call.
        let patient = fb.patient(held_before, idle);
        let renewal = |s: &mut CapState, now: u64| {
            let before = s.clone();
            let p = pacing(s.live_holders(now).max(1));
            s.adapt(fb, now, want);
            s.one_each(me, want, now);
            new_held = s.rebalance_for(me, s.limit(cap), want, in_use, now, p.expire_ms);
            if idle {
                s.holders.remove(me);
            }
            holders = s.live_holders(now).max(1);
            window = s.limit(cap);
            growing = s.can_grow(want, cap) && !fb.rate_bound;
            worth_writing(&before, s, me, now, p)
        };
        let result = if patient {
            crate::kvstate::modify_or_yield(store, "window", key, |_| CapState::default(), renewal).await
        } else {
            crate::kvstate::modify(store, "window", key, |_| CapState::default(), renewal)
                .await
                .map(|w| w.map_or(Modified::Unchanged, Modified::Written))
        };
        let keep = |fb: Feedback| {
            // Not counted: keep the feedback for the next renewal.
            self.ok.fetch_add(fb.ok, Ordering::AcqRel);
            self.failed.fetch_add(fb.failed, Ordering::AcqRel);
            if fb.rate_bound {
                self.rate_bound.store(true, Ordering::Release);
            }
        };
        match result {
            Err(e) => {
                keep(fb);
                return Err(e);
            }
            Ok(Modified::Yielded) => {
                keep(fb);
                return Ok(Standing::after(false, want, held_before, fb.rate_bound));
            }
            Ok(_) => {}
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
        self.holders.store(holders, Ordering::Release);
        self.window.store(window, Ordering::Release);
        self.growing.store(growing, Ordering::Release);
        tracing::debug!(want, held_before, new_held, in_use, window, holders, growing, ok = fb.ok, "window renewed");
        Ok(Standing::after(idle, want, new_held, fb.rate_bound))
    }

    /// Reports a finished call: successes grow the window, server errors and
    /// timeouts shrink it (at once). A window that cannot grow (at its
    /// ceiling or the configured cap) hears of successes at the next
    /// keep-alive: with 64 workers, renewing early for news nobody could use
    /// cost 0.3 cluster-state requests per call (`scripts/bench scale`).
    pub fn record(&self, ok: bool) {
        if ok {
            let n = self.ok.fetch_add(1, Ordering::AcqRel) + 1;
            let batch = ok_batch(self.window.load(Ordering::Acquire)) as usize;
            if self.growing.load(Ordering::Acquire) && n as usize >= (self.held.load(Ordering::Acquire) / 2).max(batch)
            {
                self.wake.notify_one();
            }
        } else {
            self.failed.fetch_add(1, Ordering::AcqRel);
            self.wake.notify_one();
        }
    }

    /// Says that a call holding a slot waited for the rate limit's budget.
    pub fn rate_bound(&self) {
        self.rate_bound.store(true, Ordering::Release);
    }

    /// Workers holding or wanting a share of this window at the last renewal
    /// (this one included): the workers calling this key and model.
    pub fn holders(&self) -> usize {
        self.holders.load(Ordering::Acquire)
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
    fn the_cluster_renews_about_as_often_whatever_its_size() {
        let ms = |d: Duration| d.as_millis() as u64;
        // holders: keep-alive, gap, expiry
        for (holders, keepalive, gap, expire) in [
            (0, 300, 20, 3_000),
            (1, 300, 20, 3_000),
            (4, 300, 80, 3_000),
            (16, 960, 320, 3_000),
            (64, 3_840, 1_000, 11_520),
            (1_000, 5_000, 1_000, 15_000),
        ] {
            let p = pacing(holders);
            assert_eq!((ms(p.keepalive), ms(p.gap), p.expire_ms), (keepalive, gap, expire), "{holders}");
            assert!(p.expire_ms >= 3 * ms(p.keepalive), "a holding outlives three keep-alives");
        }
        // Keep-alives of the whole cluster per second, from 16 holders on: about 16.
        for n in [16, 32, 64] {
            let per_s = n as f64 / pacing(n).keepalive.as_secs_f64();
            assert!((16.0..=17.0).contains(&per_s), "{n}: {per_s}");
        }
    }

    #[test]
    fn the_batch_of_finished_calls_grows_with_the_window() {
        // While the window is small every call's news counts (slow start is
        // fast); a large one learns in sixteenths of itself, at most 16 calls.
        for (window, batch) in [(0, 1), (4, 1), (31, 1), (32, 2), (64, 4), (256, 16), (4_096, 16)] {
            assert_eq!(ok_batch(window), batch, "{window}");
        }
    }

    #[test]
    fn a_renewal_is_written_only_when_others_would_see_a_change_or_its_keepalive_is_due() {
        let p = pacing(16);
        let mut before = CapState { window: 40.0, demand_ms: 1_000, ..Default::default() };
        before.rebalance_for("a", 40, 4, 2, 1_000, p.expire_ms);
        before.rebalance_for("b", 40, 4, 2, 1_000, p.expire_ms);
        let renewed = |want: u32, window: f64, now: u64| {
            let mut s = before.clone();
            s.window = window;
            s.demand_ms = now;
            s.rebalance_for("a", 40, want, 2, now, p.expire_ms);
            s
        };
        // now, a's want, the window: written?
        for (now, want, window, written) in [
            (1_100, 4, 40.0, false),      // only the expiry and the demand's time moved
            (1_100, 5, 40.0, true),       // a wants more: others see it
            (1_100, 4, 41.0, true),       // the window grew
            (1_000 + 960, 4, 40.0, true), // the keep-alive is due
            (1_000 + 959, 4, 40.0, false),
        ] {
            let after = renewed(want, window, now);
            assert_eq!(worth_writing(&before, &after, "a", now, p), written, "{now} {want} {window}");
        }
        // A worker not in the entry writes only to enter it; one leaving writes once.
        let mut left = before.clone();
        left.holders.remove("a");
        assert!(worth_writing(&before, &left, "a", 1_100, p));
        assert!(!worth_writing(&left, &left, "a", 1_100, p));
    }

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
        s.adapt(Feedback { ok: 4, failed: 0, ..Default::default() }, 100, 100);
        assert_eq!(s.limit(0), 8);
        s.adapt(Feedback { ok: 8, failed: 0, ..Default::default() }, 200, 100);
        assert_eq!(s.limit(0), 16);
        assert_eq!(s.limit(10), 10, "never above the configured cap");
        // A wave of failures halves it once, not once per failure.
        s.adapt(Feedback { ok: 0, failed: 5, ..Default::default() }, 300, 100);
        assert_eq!(s.limit(0), 8);
        s.adapt(Feedback { ok: 0, failed: 5, ..Default::default() }, 400, 100);
        assert_eq!(s.limit(0), 8);
        // Then additive increase: about one call per window of successes.
        s.adapt(Feedback { ok: 8, failed: 0, ..Default::default() }, 1000, 100);
        assert_eq!(s.limit(0), 9);
        // An outage drives it to one call; the next job or recovery starts small.
        for t in 0..10 {
            s.adapt(Feedback { ok: 0, failed: 1, ..Default::default() }, 2_000 + t * 1_000, 100);
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
            s.adapt(Feedback { ok: 3, failed: 0, ..Default::default() }, t, 3);
        }
        assert!(s.limit(0) <= 6, "{}", s.limit(0));
    }

    #[test]
    fn successes_are_news_only_while_the_window_can_grow() {
        // window, this worker's want, others' (want, held), configured cap: can grow?
        for (window, want, others, cap, grows) in [
            (4.0, 10, (0, 0), 0, true),        // slow start
            (19.0, 10, (0, 0), 0, true),       // below twice the demand
            (20.0, 10, (0, 0), 0, false),      // at twice the demand
            (20.0, 10, (30, 10), 0, true),     // another worker wants more (want, calls under way)
            (20.0, 10, (30, 10), 20, false),   // at the configured cap
            (8_192.0, 64, (64, 64), 0, false), // 64 workers' steady state, as measured
        ] {
            let mut s = CapState { window, ..Default::default() };
            s.rebalance_for("b", 100, others.0, others.1, 0, 1_000);
            assert_eq!(s.can_grow(want, cap), grows, "{window} {want} {others:?} {cap}");
        }
    }

    #[test]
    fn successes_held_back_by_the_rate_limit_do_not_grow_the_window() {
        // ok, held back by the limit: the window after one renewal from 40
        // (congestion avoidance, demand 100)
        for (ok, rate_bound, window) in [(40, false, 41.0), (40, true, 40.0), (0, false, 40.0)] {
            let mut s = CapState { window: 40.0, ssthresh: 20.0, demand_ms: 1_000, ..Default::default() };
            s.adapt(Feedback { ok, failed: 0, rate_bound }, 1_000, 100);
            assert_eq!(s.window, window, "{ok} {rate_bound}");
        }
        // Failures cut it whatever held the calls back.
        let mut s = CapState { window: 40.0, ssthresh: 20.0, demand_ms: 1_000, ..Default::default() };
        s.adapt(Feedback { ok: 0, failed: 1, rate_bound: true }, 1_000, 100);
        assert_eq!(s.window, 20.0);
    }

    #[test]
    fn until_its_first_cut_the_window_has_a_slot_for_every_worker_wanting_one() {
        // workers wanting slots besides "me", me wanting, cut before: window (from 4)
        for (others, want, cut, window) in
            [(0, 8, false, 4.0), (10, 8, false, 11.0), (10, 0, false, 10.0), (63, 64, false, 64.0), (63, 64, true, 4.0)]
        {
            let mut s = CapState { window: 4.0, ssthresh: if cut { 4.0 } else { f64::MAX }, ..Default::default() };
            for i in 0..others {
                s.holders.insert(format!("w{i}"), Holder { held: 0, want: 4, expires_ms: 10_000 });
            }
            s.holders.insert("idle".into(), Holder { held: 0, want: 0, expires_ms: 10_000 });
            s.holders.insert("gone".into(), Holder { held: 0, want: 4, expires_ms: 500 });
            s.one_each("me", want, 1_000);
            assert_eq!(s.window, window, "{others} {want} {cut}");
        }
    }

    #[test]
    fn a_worker_short_of_slots_is_one_the_window_holds_back() {
        use Standing::*;
        // idle, want, held, calls waited for the rate limit: standing
        for (idle, want, held, rate_bound, standing) in [
            (true, 0, 0, false, Idle),
            (false, 8, 4, false, Short),
            (false, 8, 4, true, Holding), // the limit holds its calls back: more slots would wait too
            (false, 8, 0, true, Short),   // but it needs one to call at all
            (false, 4, 4, false, Holding),
        ] {
            assert_eq!(Standing::after(idle, want, held, rate_bound), standing, "{idle} {want} {held} {rate_bound}");
        }
    }

    #[test]
    fn only_good_news_from_a_worker_holding_slots_gives_way_on_a_conflict() {
        let ok = Feedback { ok: 5, ..Default::default() };
        let failed = Feedback { ok: 5, failed: 1, ..Default::default() };
        // feedback, held, idle: may give way?
        for (fb, held, idle, patient) in [
            (ok, 4, false, true),
            (ok, 0, false, false),
            (failed, 4, false, false),
            (Feedback::default(), 0, true, false),
        ] {
            assert_eq!(fb.patient(held, idle), patient, "{fb:?} {held} {idle}");
        }
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
