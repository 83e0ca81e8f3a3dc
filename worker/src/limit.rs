//! The cluster-wide rate limit: a token bucket per provider key and model, kept in NATS KV and leased out in small slices.
//!
//! Every worker draws from the same bucket with compare-and-set, so the
//! cluster as a whole never exceeds the limit however many workers come and
//! go, and a lone worker can use all of it. To keep KV traffic low a worker
//! leases a tenth of a second's budget at a time and spends it locally; an
//! unused lease expires instead of being spent late, so no window can exceed
//! the limit by more than the bucket's small burst.
//!
//! The bucket also learns: a 429 pauses the key for the whole cluster until
//! its `Retry-After`, and the provider's `x-ratelimit-limit-*` headers lower
//! the effective limit when the configured one is too high. Without headers a
//! 429 cuts the effective limit by a fifth, and it recovers slowly.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use common::provider::RateInfo;
use serde::{Deserialize, Serialize};

use crate::Error;

/// Seconds of budget the shared bucket may hold (its burst).
const BURST_S: f64 = 0.2;
/// Seconds of budget leased to a worker at a time.
const LEASE_S: f64 = 0.1;
/// After a 429 cuts the limit, further 429s within this many ms do not cut
/// it again: they are answers to calls already under way.
const CUT_INTERVAL_MS: u64 = 250;
/// How long a lease may be spent.
const LEASE_TTL: Duration = Duration::from_millis(500);

/// The shared bucket as stored in KV.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Bucket {
    /// Time of the last refill, ms since the epoch.
    pub at_ms: u64,
    pub req: f64,
    pub tok: f64,
    /// No worker may call before this time (a 429's Retry-After).
    pub paused_until_ms: u64,
    /// Effective limits per minute (the configured ones, or less once learned).
    pub rpm: f64,
    pub tpm: f64,
    /// The provider told us its limits: do not drift back up.
    pub from_headers: bool,
    /// When the limit was last cut after a 429: a burst of 429s from one
    /// overload cuts it once, not once per answer (see [`CUT_INTERVAL_MS`]).
    #[serde(default)]
    pub last_cut_ms: u64,
}

/// Configured limits per minute; 0 means no limit of that kind.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub rpm: f64,
    pub tpm: f64,
}

impl Bucket {
    fn full(now: u64, l: Limits) -> Self {
        Bucket {
            at_ms: now,
            req: (l.rpm / 60.0 * BURST_S).max(1.0),
            tok: l.tpm / 60.0 * BURST_S,
            paused_until_ms: 0,
            rpm: l.rpm,
            tpm: l.tpm,
            from_headers: false,
            last_cut_ms: 0,
        }
    }

    /// Adds what accrued since `at_ms`, up to the burst, and lets a learned
    /// (lowered) limit recover by 1% of the configured one per second.
    pub fn refill(&mut self, now: u64, l: Limits) {
        let dt = now.saturating_sub(self.at_ms) as f64 / 1000.0;
        if !self.from_headers {
            self.rpm = (self.rpm + l.rpm * 0.01 * dt).min(l.rpm);
            self.tpm = (self.tpm + l.tpm * 0.01 * dt).min(l.tpm);
        }
        self.rpm = self.rpm.min(l.rpm);
        self.tpm = self.tpm.min(l.tpm);
        self.req = (self.req + self.rpm / 60.0 * dt).min((self.rpm / 60.0 * BURST_S).max(1.0));
        self.tok = (self.tok + self.tpm / 60.0 * dt).min((self.tpm / 60.0 * BURST_S).max(1.0));
        self.at_ms = self.at_ms.max(now);
    }

    /// Takes a lease of up to [`LEASE_S`] of budget if at least one request
    /// costing `est` tokens fits; otherwise says how long to wait.
    pub fn take(&mut self, now: u64, est: f64, l: Limits) -> Result<(f64, f64), Duration> {
        if self.paused_until_ms > now {
            return Err(Duration::from_millis(self.paused_until_ms - now));
        }
        let tokens_limited = l.tpm > 0.0;
        // A request bigger than the whole burst must still get through: it
        // waits for a full bucket and drives it negative.
        let need_tok = if tokens_limited { est.min((self.tpm / 60.0 * BURST_S).max(1.0)) } else { 0.0 };
        if self.req < 1.0 || (tokens_limited && self.tok < need_tok) {
            let wait_req = if self.req < 1.0 { (1.0 - self.req) / (self.rpm / 60.0).max(1e-9) } else { 0.0 };
            let wait_tok = if tokens_limited && self.tok < need_tok {
                (need_tok - self.tok) / (self.tpm / 60.0).max(1e-9)
            } else {
                0.0
            };
            return Err(Duration::from_secs_f64(wait_req.max(wait_tok).clamp(0.002, 60.0)));
        }
        let want_req = (self.rpm / 60.0 * LEASE_S).max(1.0);
        let grant_req = want_req.min(self.req.floor()).max(1.0);
        self.req -= grant_req;
        let grant_tok = if tokens_limited {
            let want_tok = (self.tpm / 60.0 * LEASE_S).max(est);
            let g = want_tok.min(self.tok).max(est);
            self.tok -= g;
            g
        } else {
            f64::INFINITY
        };
        Ok((grant_req, grant_tok))
    }

    /// Reacts to a 429: pause everyone, and lower the limit.
    pub fn rate_limited(&mut self, now: u64, pause: Duration, rate: &RateInfo, l: Limits) {
        self.paused_until_ms = self.paused_until_ms.max(now + pause.as_millis() as u64);
        self.req = self.req.min(0.0);
        self.tok = self.tok.min(0.0);
        if !self.learn(rate, l) && (self.last_cut_ms == 0 || now >= self.last_cut_ms + CUT_INTERVAL_MS) {
            self.last_cut_ms = now;
            self.rpm = (self.rpm * 0.8).max(1.0);
            if l.tpm > 0.0 {
                self.tpm = (self.tpm * 0.8).max(1.0);
            }
        }
    }

    /// Lowers the effective limits to what the provider announces; true if it announced any.
    pub fn learn(&mut self, rate: &RateInfo, l: Limits) -> bool {
        let mut learned = false;
        if let Some(limit) = rate.limit_requests.filter(|v| *v > 0.0) {
            self.rpm = limit.min(l.rpm);
            learned = true;
        }
        if let (Some(limit), true) = (rate.limit_tokens.filter(|v| *v > 0.0), l.tpm > 0.0) {
            self.tpm = limit.min(l.tpm);
            learned = true;
        }
        self.from_headers |= learned;
        learned
    }
}

/// Budget leased to this worker.
struct Pool {
    req: f64,
    tok: f64,
    expires: Instant,
}

/// One key-and-model's limiter, as seen by one worker.
pub struct Limiter {
    kv: kv::Store,
    key: String,
    limits: Limits,
    pool: Mutex<Pool>,
    /// Only one task of this worker leases or waits at a time; the others
    /// queue behind it in order (tokio's mutex is fair).
    leasing: tokio::sync::Mutex<()>,
}

/// Tokens reserved for one call, settled against the real usage afterwards.
pub struct Reservation {
    pub tokens: f64,
}

impl Limiter {
    pub fn new(kv: kv::Store, key_id: &str, model: &str, limits: Limits) -> Self {
        Limiter {
            kv,
            key: format!("rl.{}.{}", common::nats::key_part(key_id), common::nats::key_part(model)),
            limits,
            pool: Mutex::new(Pool { req: 0.0, tok: 0.0, expires: Instant::now() }),
            leasing: tokio::sync::Mutex::new(()),
        }
    }

    /// Waits until one request costing about `est_tokens` may be sent.
    pub async fn acquire(&self, est_tokens: u32) -> Result<Reservation, Error> {
        let est = est_tokens as f64;
        let _turn = self.leasing.lock().await;
        loop {
            {
                let mut p = self.pool.lock().expect("pool lock");
                if Instant::now() < p.expires && p.req >= 1.0 && p.tok >= est {
                    p.req -= 1.0;
                    p.tok -= est;
                    return Ok(Reservation { tokens: est });
                }
            }
            match self.lease(est).await? {
                Ok((req, tok)) => {
                    let mut p = self.pool.lock().expect("pool lock");
                    let expired = Instant::now() >= p.expires;
                    p.req = if expired { req } else { p.req + req };
                    p.tok = if expired { tok } else { p.tok + tok };
                    p.expires = Instant::now() + LEASE_TTL;
                }
                Err(wait) => tokio::time::sleep(wait).await,
            }
        }
    }

    /// Corrects the reservation with the tokens really used.
    pub fn settle(&self, r: Reservation, used: u32) {
        let mut p = self.pool.lock().expect("pool lock");
        p.tok += r.tokens - used as f64;
    }

    /// A 429: pause the key for the whole cluster and lower its limit.
    pub async fn rate_limited(&self, retry_after: Option<Duration>, rate: &RateInfo) -> Result<(), Error> {
        {
            let mut p = self.pool.lock().expect("pool lock");
            p.req = 0.0;
            p.tok = p.tok.min(0.0);
        }
        let pause = retry_after.unwrap_or(Duration::from_secs(1));
        let limits = self.limits;
        self.modify(|b, now| {
            b.rate_limited(now, pause, rate, limits);
            true
        })
        .await
    }

    /// Headers of a successful call: adopt announced limits, and pause when
    /// the provider says its budget is spent.
    pub async fn observe(&self, rate: &RateInfo) -> Result<(), Error> {
        let limits = self.limits;
        let lower_rpm = rate.limit_requests.is_some_and(|v| v > 0.0 && v < limits.rpm);
        let lower_tpm = limits.tpm > 0.0 && rate.limit_tokens.is_some_and(|v| v > 0.0 && v < limits.tpm);
        let spent = rate.remaining_requests.is_some_and(|r| r < 1.0) || rate.remaining_tokens.is_some_and(|r| r < 1.0);
        if !(lower_rpm || lower_tpm || spent) {
            return Ok(());
        }
        let reset = rate.reset_requests.max(rate.reset_tokens).unwrap_or(Duration::from_millis(200));
        self.modify(|b, now| {
            let changed =
                (lower_rpm && rate.limit_requests != Some(b.rpm)) || (lower_tpm && rate.limit_tokens != Some(b.tpm));
            b.learn(rate, limits);
            if spent {
                b.paused_until_ms = b.paused_until_ms.max(now + reset.as_millis() as u64);
                return true;
            }
            changed
        })
        .await
    }

    async fn lease(&self, est: f64) -> Result<Result<(f64, f64), Duration>, Error> {
        let limits = self.limits;
        let mut grant = Err(Duration::ZERO);
        self.modify(|b, now| {
            b.refill(now, limits);
            grant = b.take(now, est, limits);
            grant.is_ok()
        })
        .await?;
        Ok(grant)
    }

    async fn modify(&self, f: impl FnMut(&mut Bucket, u64) -> bool) -> Result<(), Error> {
        let limits = self.limits;
        crate::kvstate::modify(&self.kv, &self.key, |now| Bucket::full(now, limits), f).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Limits = Limits { rpm: 6000.0, tpm: 0.0 };

    #[test]
    fn a_full_bucket_leases_a_tenth_of_a_second() {
        let mut b = Bucket::full(0, L);
        assert_eq!(b.req, 20.0);
        let (req, tok) = b.take(0, 10.0, L).unwrap();
        assert_eq!(req, 10.0);
        assert!(tok.is_infinite());
        assert_eq!(b.req, 10.0);
    }

    #[test]
    fn an_empty_bucket_says_how_long_to_wait() {
        let mut b = Bucket::full(0, L);
        b.req = 0.0;
        let wait = b.take(0, 1.0, L).unwrap_err();
        assert_eq!(wait, Duration::from_millis(10)); // 100 requests/s
        b.refill(10, L);
        assert!(b.take(10, 1.0, L).is_ok());
    }

    #[test]
    fn refill_is_capped_at_the_burst() {
        let mut b = Bucket::full(0, L);
        b.refill(60_000, L);
        assert_eq!(b.req, 20.0);
    }

    #[test]
    fn no_more_than_the_limit_is_leased_over_a_minute() {
        // Lease as fast as possible for 60 simulated seconds, in 1 ms steps.
        let mut b = Bucket::full(0, L);
        let mut granted = 0.0;
        for now in 0..60_000u64 {
            b.refill(now, L);
            while let Ok((r, _)) = b.take(now, 1.0, L) {
                granted += r;
            }
        }
        assert!((6000.0..=6000.0 + 20.0).contains(&granted), "{granted}");
    }

    #[test]
    fn a_429_pauses_and_lowers_the_limit_unless_headers_say_more() {
        let mut b = Bucket::full(1000, L);
        b.rate_limited(1000, Duration::from_secs(2), &RateInfo::default(), L);
        assert_eq!(b.take(2000, 1.0, L).unwrap_err(), Duration::from_secs(1));
        assert_eq!(b.rpm, 4800.0);
        b.rate_limited(1100, Duration::ZERO, &RateInfo::default(), L);
        assert_eq!(b.rpm, 4800.0, "a second 429 right after the first does not cut again");
        let rate = RateInfo { limit_requests: Some(3000.0), ..Default::default() };
        b.rate_limited(0, Duration::from_secs(1), &rate, L);
        assert_eq!(b.rpm, 3000.0);
        assert!(b.from_headers);
        b.refill(100_000, L);
        assert_eq!(b.rpm, 3000.0, "a limit the provider announced does not drift back up");
    }

    #[test]
    fn a_lowered_limit_recovers_slowly_without_headers() {
        let mut b = Bucket::full(0, L);
        b.rate_limited(0, Duration::ZERO, &RateInfo::default(), L);
        b.refill(10_000, L);
        assert_eq!(b.rpm, 4800.0 + 600.0);
        b.refill(100_000, L);
        assert_eq!(b.rpm, 6000.0);
    }

    #[test]
    fn token_limits_bind_too() {
        let l = Limits { rpm: 60_000.0, tpm: 60_000.0 };
        let mut b = Bucket::full(0, l);
        assert_eq!(b.tok, 200.0);
        let (_, tok) = b.take(0, 150.0, l).unwrap();
        assert_eq!(tok, 150.0);
        assert!(b.take(0, 150.0, l).is_err(), "50 tokens left, 150 needed");
    }
}
