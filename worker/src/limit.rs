//! The cluster-wide rate limit: a token bucket per provider key and model, kept in NATS KV and leased out in small slices.
//!
//! Every worker draws from the same bucket with compare-and-set, so the
//! cluster as a whole never exceeds the limit however many workers come and
//! go, and a lone worker can use all of it. To keep KV traffic low a worker
//! leases a tenth of a second's budget at a time and spends it locally; an
//! unused lease expires instead of being spent late. With more than a few
//! workers, each spends its share of the rate, so leases live longer and
//! take more of the provider's burst at a time, though never more than the
//! worker showed it can spend nor more than its share of what is left
//! ([`lease_ttl`], [`burst_lease`]): NATS requests then follow the calls,
//! not the workers. Where the bucket is
//! short, a lease is granted in turn: at once, but due when the bucket will
//! have accrued it ([`Bucket::take_in_turn`]), so a waiting worker asks once
//! per lease rather than polling, and the shared state's traffic follows the
//! calls, not the number of workers.
//!
//! A bucket has four dimensions: requests, tokens (prompt plus max output),
//! input tokens and output tokens (Anthropic limits the last two apart);
//! a dimension with no configured limit is not tracked.
//!
//! What the provider says is used, never trusted blindly:
//! - **Its burst.** Providers' buckets hold a minute's budget and start full;
//!   `*-remaining` headers say what is left. The bucket keeps an estimate of
//!   the provider's remaining budget (the figure reported, plus a bucket's
//!   refill since the answer, less what was leased since the reporting call
//!   was leased). Where the provider's bucket
//!   proved large (over 2 s of budget reported at once) that estimate is spent
//!   down to 0.2 s' worth beyond the steady rate; otherwise, or without a
//!   fresh report, the bucket paces at the steady rate with a burst of 0.2 s,
//!   and never sends when the provider says its budget is spent.
//! - **Its limits are hypotheses.** A `*-limit` header at least 5% below the
//!   configured figure lowers the effective limit, by at most half per
//!   response; a 429 without headers cuts it by a fifth, once per 250 ms.
//!   Either holds while the provider confirms it (a 429, or a header announcing
//!   the same limit, within the last 5 s) and otherwise recovers toward the
//!   configured figure by 2.5% of it per second. Retry-After pauses the key
//!   for every worker. Each change of 5% or more, and each return to the
//!   configured figure, is logged once for the cluster, by the worker whose
//!   write made it; the effective limit is exported as a gauge.
//! - **How its budget comes back.** A bucket refills at the steady rate; a
//!   window (a sliding minute) gives back what was spent a minute earlier,
//!   and nothing before. Reports at least 1.5 s apart tell them apart: if
//!   the budget the provider reports, plus what was leased between the two
//!   reporting calls, came back at under a quarter of the steady rate while
//!   the bucket had room, the dimension is a window from then on. Leases
//!   taken before a reporting call and spent after it blur that sum, by up
//!   to a lease per worker calling the model: the two reports must be far
//!   enough apart that a quarter of the refill exceeds it (5 s with 4
//!   workers at 6,000 a minute; with 64 workers at 20,000 never within a
//!   burst, which is what made them stall on a window that was not there).
//!   The bucket
//!   then keeps what it leased by half-second over the last minute, and the
//!   provider's budget is credited as each half-second's leases age out
//!   (late by one lease's lifetime, to be safe), never by the steady rate.
//! - **Nothing configured is not "no limit".** Where the user gave no figure
//!   for a dimension, the provider's `*-limit` header is the limit (adopted
//!   at once, and again when it changes by 5% or more), so a user who does
//!   not know their key's limit still gets paced calls instead of a storm of
//!   429s. A worker creates such a limiter on the first answer that carries
//!   limit headers or is a 429 ([`crate::guard::Guards`]).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use common::provider::RateInfo;
use serde::{Deserialize, Serialize};

use crate::Error;

/// Seconds of budget the shared bucket may hold when pacing (its burst).
const BURST_S: f64 = 0.2;
/// Seconds of budget leased to a worker at a time.
const LEASE_S: f64 = 0.1;
/// The provider's reported budget is spent beyond the steady rate only when
/// its bucket holds more than this many seconds' worth (real providers' hold a
/// minute; a bucket of a second or so is a smooth limit, not a burst).
const BIG_BUCKET_S: f64 = 2.0;
/// ...and then down to this many seconds' worth.
const PROVIDER_RESERVE_S: f64 = 0.2;
/// At most this many requests' worth is leased at once out of the provider's
/// burst by one of up to [`FEW_WORKERS`] workers (more: see [`burst_lease`]).
const BURST_LEASE: f64 = 32.0;
/// Up to this many workers, leases keep their base size and lifetime.
const FEW_WORKERS: f64 = 16.0;
/// The longest a lease lives (see [`lease_ttl`]).
const LEASE_TTL_MAX: Duration = Duration::from_secs(4);
/// A report of the provider's remaining budget is used for this long.
const REPORT_TTL_MS: u64 = 5_000;
/// After a 429 cuts the limit, further 429s within this many ms do not cut
/// it again: they are answers to calls already under way.
const CUT_INTERVAL_MS: u64 = 250;
/// A 429 within this many ms holds a header-learned limit where it is.
const CONFIRM_MS: u64 = 5_000;
/// Recovery per second, as a share of the configured limit.
const RECOVER: f64 = 0.025;
/// A limit changes only by at least this share: smaller differences (a
/// provider rounding, a figure read twice) are noise, not news.
const MEANINGFUL: f64 = 0.05;
/// How long a lease may be spent, with up to [`FEW_WORKERS`] / 2 workers.
const LEASE_TTL: Duration = Duration::from_millis(500);
/// What a window gives back is kept by slots of this many ms.
const SLOT_MS: u64 = 500;
/// A window's length.
const WINDOW_MS: u64 = 60_000;
/// Two reports at least this far apart tell a window from a bucket (two
/// such checks in a row say "window").
const REFILL_CHECK_MS: u64 = 1_500;
/// Leases are granted in turn at most this many seconds of budget ahead;
/// a worker further back asks again when its turn is within reach.
const AHEAD_S: f64 = 10.0;

/// When what was leased in `slot` is surely back in a window: a minute after
/// the slot's end, plus the time a lease may wait before it is spent
/// ([`LEASE_TTL`]; a longer-lived lease is noted in a later slot).
fn frees_at(slot: u64) -> u64 {
    (slot + 1) * SLOT_MS + WINDOW_MS + LEASE_TTL.as_millis() as u64
}

/// The most a window check in dimension `d` can be misled by leases taken
/// before a reporting call and spent after it: one lease in flight per
/// worker calling the model, of at most [`BURST_LEASE`] requests (or a
/// paced lease, if larger), at what a request has cost on average in that
/// dimension (all leased in it over all leased requests).
fn blur(workers: usize, requests_leased: f64, d: &Dim) -> f64 {
    let per_request = if requests_leased > 0.0 { d.leased / requests_leased } else { 1.0 };
    workers as f64 * (burst_lease(workers) * per_request).max(d.rate / 60.0 * LEASE_S)
}

/// The most requests one lease takes out of the provider's burst when
/// `workers` workers call the model: [`BURST_LEASE`], and from
/// [`FEW_WORKERS`] on in proportion to them, up to four times it. Each lease
/// is a compare-and-set on one shared key, and the more workers lease at
/// once, the likelier two meet there: with 64 workers spending a burst in
/// leases of 32, each lease met about four conflicts (each a read and a
/// write) and the limiter cost 0.34 NATS requests per call; in leases of
/// 128, 0.09 (`scripts/bench scale --workers 64`).
fn burst_lease(workers: usize) -> f64 {
    BURST_LEASE * (workers as f64 / FEW_WORKERS).clamp(1.0, 4.0)
}

/// How long a lease may be spent when `workers` workers call the model:
/// [`LEASE_TTL`], and with more than [`FEW_WORKERS`] / 2 in proportion to
/// them, up to [`LEASE_TTL_MAX`]. A worker spends its share of the rate, so
/// the more workers, the longer a lease takes to spend: with 64 workers a
/// lease of a tenth of a second's budget (33 requests at 20,000 a minute)
/// took seconds, and one living 0.5 s left 10,000 requests' budget unspent
/// in a 30,000-call job, each expired lease another compare-and-set. A
/// lease spent late is still within what the bucket granted: it was counted
/// when taken, and a window's give-back waits for the lease's whole life
/// ([`Dim::note_spent`]).
fn lease_ttl(workers: usize) -> Duration {
    let n = workers.max(1) as u32;
    (LEASE_TTL * n / (FEW_WORKERS as u32 / 2)).clamp(LEASE_TTL, LEASE_TTL_MAX)
}

/// A lease in dimension `i` at `per_s` a second: a tenth of a second's
/// budget, at least one call's `need`, at most `most`; whole requests.
fn lease_size(i: usize, per_s: f64, need: f64, most: f64) -> f64 {
    let g = (per_s * LEASE_S).max(need).min(most);
    if i == 0 {
        g.floor().max(1.0)
    } else {
        g
    }
}

/// The dimensions, in the order of [`Bucket::dims`].
pub const DIM_NAMES: [&str; 4] = ["requests", "tokens", "input_tokens", "output_tokens"];

/// Configured limits per minute; 0 means no limit of that kind.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Limits {
    pub rpm: f64,
    pub tpm: f64,
    pub input_tpm: f64,
    pub output_tpm: f64,
}

/// The request rate tracked where none is known: unbounded in practice.
const UNBOUNDED_RPM: f64 = 1e9;

impl Limits {
    fn configured(&self) -> [f64; 4] {
        [self.rpm, self.tpm, self.input_tpm, self.output_tpm]
    }

    fn per_minute(&self) -> [f64; 4] {
        // Token-only limits still track requests: unbounded in practice.
        let rpm = if self.rpm > 0.0 { self.rpm } else { UNBOUNDED_RPM };
        [rpm, self.tpm, self.input_tpm, self.output_tpm]
    }

    pub fn any(&self) -> bool {
        self.rpm > 0.0 || self.tpm > 0.0 || self.input_tpm > 0.0 || self.output_tpm > 0.0
    }
}

/// What one call is expected to use.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Cost {
    /// Prompt tokens (estimated before the call, counted after).
    pub prompt: f64,
    /// The output token limit of the call.
    pub max_output: f64,
}

impl Cost {
    /// Per dimension: one request; prompt plus max output (providers charge the
    /// token limit with max_tokens); the prompt; the output.
    fn amounts(&self, output: f64) -> [f64; 4] {
        [1.0, self.prompt + self.max_output, self.prompt, output]
    }
}

/// One dimension of the shared bucket.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Dim {
    /// The pacing bucket's level.
    pub level: f64,
    /// Effective limit per minute (the configured one, or less once learned).
    pub rate: f64,
    /// The rate was lowered by a provider header (a hypothesis that decays).
    pub learned: bool,
    /// Estimate of the provider's remaining budget, from its last report.
    pub provider: Option<f64>,
    /// The provider reported more than [`BIG_BUCKET_S`] of budget at once:
    /// its bucket holds a burst worth spending.
    #[serde(default)]
    pub big_bucket: bool,
    /// Everything leased so far: a call's lease mark against it tells how much
    /// was sent after that call (see [`Limiter::observe`]).
    pub leased: f64,
    /// The provider's budget comes back a minute after it is spent (a
    /// window), not at the steady rate.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rolling: bool,
    /// What was leased, by [`SLOT_MS`] slot, until a window would give it back;
    /// kept while the provider's budget is worth spending (or not yet known).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub spent: Vec<(u64, f64)>,
    /// The report the next refill check compares with: when it came, the
    /// budget reported, and its call's lease mark.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<(u64, f64, f64)>,
    /// Two reports showed the provider's budget coming back at the rate (a
    /// bucket, not a window): a late report may be credited the refill since.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub refills: bool,
}

impl Dim {
    /// Keeps what a lease spends from `at` by [`SLOT_MS`] slot, for a window
    /// to give back, while the provider's budget is worth spending (or not
    /// yet known). A lease living longer than [`LEASE_TTL`] counts from
    /// `at` that much later: the window gives back what it spent last only
    /// a minute after its end ([`frees_at`]).
    fn note_spent(&mut self, at: u64, g: f64, unknown: bool) {
        if !(self.big_bucket || unknown) {
            return;
        }
        let slot = at / SLOT_MS;
        match self.spent.iter_mut().rev().find(|(s, _)| *s == slot) {
            Some((_, a)) => *a += g,
            None => {
                self.spent.push((slot, g));
                self.spent.sort_by_key(|(s, _)| *s);
            }
        }
    }

    /// Compares a report (budget `r`, by a call leased at `mark`) with the
    /// baseline: true if the budget came back at under a quarter of the
    /// steady rate while a bucket would have had room for it. `blur` is the
    /// most that leases taken before the baseline's call and spent after it
    /// can hide (one lease per worker, see [`blur`]): a check over too short
    /// a time to see past it waits for a later report.
    fn window_seen(&mut self, now: u64, r: f64, mark: f64, blur: f64) -> bool {
        let Some((t1, r1, m1)) = self.baseline else {
            self.baseline = Some((now, r, mark));
            return false;
        };
        if now < t1 + REFILL_CHECK_MS {
            return false;
        }
        // A report whose call was leased before the baseline's says nothing
        // of what came back since: reports reach the bucket out of order
        // (each worker brings its own with its next lease).
        if mark < m1 {
            return false;
        }
        let expected = self.rate / 60.0 * (now - t1) as f64 / 1000.0;
        if r1 + expected >= self.rate * 0.95 {
            // A bucket this full could not have taken the refill: the
            // baseline tells nothing; this report may.
            self.baseline = Some((now, r, mark));
            return false;
        }
        if blur > expected * 0.25 {
            // What the leases in flight can hide is more than a window's
            // sign: with 64 workers, 64 leases of 32 at a burst's end looked
            // like a window and stalled the cluster for 40 s. Compare with a
            // later report, over a longer time.
            return false;
        }
        self.baseline = Some((now, r, mark));
        let came_back = r - r1 + (mark - m1);
        if came_back >= expected * 0.75 {
            // Clearly a bucket.
            self.refills = true;
            return false;
        }
        // Under a quarter, over a time long enough to see past the leases
        // in flight: a window. (Between a quarter and three quarters: neither.)
        came_back < expected * 0.25
    }
}

/// The shared bucket as stored in KV.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Bucket {
    /// Time of the last refill, ms since the epoch.
    pub at_ms: u64,
    pub dims: [Dim; 4],
    /// No worker may call before this time (a 429's Retry-After).
    pub paused_until_ms: u64,
    /// When the provider last reported its remaining budget.
    pub reported_ms: u64,
    /// When the last 429 arrived.
    pub confirmed_ms: u64,
    /// When the limit was last cut after a 429 without headers.
    pub last_cut_ms: u64,
    /// Per dimension with no configured limit, the limit the provider
    /// announced (0: none yet); it stands in for the configured figure.
    #[serde(default)]
    pub announced: [f64; 4],
}

/// Who asks for a lease: the workers calling the model (this one included),
/// and how many requests this one can spend in a lease's life, as far as
/// it knows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Asker {
    pub workers: usize,
    pub spends: f64,
}

impl Asker {
    /// A lone worker that could spend any lease.
    pub const ONE: Asker = Asker { workers: 1, spends: f64::INFINITY };
}

/// Budget granted by the bucket, and where the lease stood in each dimension.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Grant {
    pub amounts: [f64; 4],
    pub marks: [f64; 4],
    /// When the lease may be spent (ms since the epoch): now, or later for a
    /// lease granted in turn ([`Bucket::take_in_turn`]).
    pub due_ms: u64,
}

/// A change of the effective limit, to log and export.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub dim: &'static str,
    pub from: f64,
    pub to: f64,
    pub why: &'static str,
}

impl Bucket {
    fn full(now: u64, l: Limits) -> Self {
        let mut b = Bucket { at_ms: now, ..Default::default() };
        for (d, conf) in b.dims.iter_mut().zip(l.per_minute()) {
            d.rate = conf;
            d.level = (conf / 60.0 * BURST_S).max(1.0);
        }
        b
    }

    /// Per dimension, the limit the bucket keeps to and recovers toward: the
    /// configured figure, or the provider's announced one where none is
    /// configured (0: not tracked; requests: unbounded).
    pub fn ceilings(&self, l: Limits) -> [f64; 4] {
        let (conf, per_minute) = (l.configured(), l.per_minute());
        std::array::from_fn(|i| match (conf[i] > 0.0, self.announced[i] > 0.0) {
            (false, true) => self.announced[i],
            _ => per_minute[i],
        })
    }

    fn active(&self, l: Limits) -> [bool; 4] {
        let c = self.ceilings(l);
        [true, c[1] > 0.0, c[2] > 0.0, c[3] > 0.0]
    }

    /// Adds what accrued since `at_ms`, lets lowered limits recover, and
    /// forgets a report of the provider's budget that is too old.
    pub fn refill(&mut self, now: u64, l: Limits, changes: &mut Vec<Change>) {
        let dt = now.saturating_sub(self.at_ms) as f64 / 1000.0;
        let stale = now.saturating_sub(self.reported_ms) > REPORT_TTL_MS;
        let confirmed = self.confirmed_ms > 0 && now.saturating_sub(self.confirmed_ms) < CONFIRM_MS;
        let ceilings = self.ceilings(l);
        let since = self.at_ms;
        for (i, (d, conf)) in self.dims.iter_mut().zip(ceilings).enumerate() {
            if conf <= 0.0 {
                continue;
            }
            // What a window gives back between the last refill and now.
            let back: f64 =
                d.spent.iter().filter(|(slot, _)| (since + 1..=now).contains(&frees_at(*slot))).map(|(_, a)| a).sum();
            d.spent.retain(|(slot, _)| frees_at(*slot) > now);
            if d.rate < conf {
                if !confirmed {
                    d.rate = (d.rate + conf * RECOVER * dt).min(conf);
                }
                if d.rate >= conf {
                    changes.push(Change { dim: DIM_NAMES[i], from: d.rate, to: conf, why: "back to the known limit" });
                    d.learned = false;
                }
            }
            d.rate = d.rate.min(conf);
            let per_s = d.rate / 60.0;
            d.level = (d.level + per_s * dt).min((per_s * BURST_S).max(1.0));
            d.provider = if d.rolling {
                // A window's budget is what ages out: known without a fresh report.
                d.provider.map(|p| (p + back).min(d.rate))
            } else if stale {
                None
            } else {
                d.provider.map(|p| (p + per_s * dt).min(d.rate))
            };
        }
        self.at_ms = self.at_ms.max(now);
    }

    /// Takes a lease if one request costing `cost` fits; otherwise says how long to wait.
    /// `asker`: the workers calling the model, which sets how much a lease
    /// out of the provider's burst may take ([`burst_lease`]) and how long
    /// it lives ([`lease_ttl`]), and what the asking worker can spend.
    pub fn take(&mut self, now: u64, cost: &[f64; 4], l: Limits, asker: Asker) -> Result<Grant, Duration> {
        let workers = asker.workers;
        if self.paused_until_ms > now {
            return Err(Duration::from_millis(self.paused_until_ms - now));
        }
        let active = self.active(l);
        let mut wait = 0.0f64;
        // How many requests the provider's reported burst would allow now.
        let mut burst = f64::INFINITY;
        for i in 0..4 {
            if !active[i] || self.dims[i].rate >= UNBOUNDED_RPM {
                // Requests with no known limit are counted, never waited for.
                continue;
            }
            let d = &self.dims[i];
            let per_s = (d.rate / 60.0).max(1e-9);
            let need = cost[i];
            let pace_burst = (per_s * BURST_S).max(1.0);
            let paced = d.level >= need.min(pace_burst);
            match d.provider {
                Some(p) => {
                    let spare = if d.big_bucket { p - per_s * PROVIDER_RESERVE_S } else { 0.0 };
                    burst = burst.min(if need > 0.0 { (spare / need).floor() } else { f64::INFINITY });
                    if p < need {
                        // The provider's budget is spent: wait for it to come back.
                        let back = d.spent.iter().map(|(slot, _)| frees_at(*slot)).filter(|t| *t > now).min();
                        wait = wait.max(match (d.rolling, back) {
                            (true, Some(t)) => (t - now) as f64 / 1000.0,
                            _ => (need - p) / per_s,
                        });
                    } else if !paced && spare < need {
                        wait = wait.max((need.min(pace_burst) - d.level) / per_s);
                    }
                }
                None => {
                    burst = 0.0;
                    if !paced {
                        wait = wait.max((need.min(pace_burst) - d.level) / per_s);
                    }
                }
            }
        }
        if wait > 0.0 {
            return Err(Duration::from_secs_f64(wait.clamp(0.002, 60.0)));
        }
        // Out of the provider's burst, at most a share of what is left per
        // worker (or a few workers' lease, if more): a lease taken before a
        // reporting call and spent after it is counted twice (in the report,
        // and as leased), by as much as every worker's lease; sized so, that
        // error shrinks with the burst instead of overspending its end (with
        // 64 workers in leases of 128 living 4 s: 59 429s). Shares smaller
        // than a few workers' lease made the burst's end a storm of leases of
        // a handful of requests.
        let per_worker = (burst / workers.max(1) as f64).floor().max(BURST_LEASE);
        let requests =
            if burst >= 1.0 { burst.min(burst_lease(workers)).min(per_worker).min(asker.spends.max(1.0)) } else { 0.0 };
        let late = (lease_ttl(workers) - LEASE_TTL).as_millis() as u64;
        let mut grant = Grant { amounts: [f64::INFINITY; 4], marks: [0.0; 4], due_ms: now };
        for i in 0..4 {
            if !active[i] {
                continue;
            }
            let d = &mut self.dims[i];
            let per_s = d.rate / 60.0;
            let g = lease_size(i, per_s, cost[i], d.level.max(cost[i])).max(requests * cost[i]);
            grant.amounts[i] = g;
            grant.marks[i] = d.leased;
            d.leased += g;
            // A grant out of the provider's burst takes the level at most a
            // burst below zero; a debt of leases granted in turn stays whole.
            let floor = (-(per_s * BURST_S).max(1.0)).min(d.level);
            d.level = (d.level - g).max(floor);
            if let Some(p) = &mut d.provider {
                *p -= g;
            }
            d.note_spent(now + late, g, self.reported_ms == 0);
        }
        Ok(grant)
    }

    /// [`Bucket::take`], except that where the bucket is short only because
    /// it paces (no pause, no window's budget to wait for), the lease is
    /// granted now and due when the bucket will have accrued it: the level
    /// (and the provider's estimated budget) go into debt by it, and the next
    /// asker's lease is due after this one's. A worker then asks once per
    /// lease instead of polling a short bucket, whatever the number of
    /// workers: with 16 workers sharing 20,000 requests a minute, polling
    /// cost 2.9 requests to the shared state per call (`scripts/bench scale`).
    /// A lease more than [`AHEAD_S`] ahead is refused with the wait until it
    /// would be within reach.
    pub fn take_in_turn(&mut self, now: u64, cost: &[f64; 4], l: Limits, asker: Asker) -> Result<Grant, Duration> {
        let workers = asker.workers;
        let wait = match self.take(now, cost, l, asker) {
            Ok(g) => return Ok(g),
            Err(wait) => wait,
        };
        // While the limit is in doubt (lowered from the configured one, by a
        // header or a 429 without one) leases granted ahead at today's rate
        // would be spent at it after the next cut (`scripts/bench rate
        // --blind`: 73 and 82 429s against 26). The bucket is asked again,
        // as before leases in turn.
        let doubt = self.dims.iter().any(|d| d.learned);
        if self.paused_until_ms > now || doubt {
            return Err(wait);
        }
        let active = self.active(l);
        let mut due = 0.0f64;
        let mut amounts = [f64::INFINITY; 4];
        for i in 0..4 {
            if !active[i] {
                continue;
            }
            let d = &self.dims[i];
            let per_s = (d.rate / 60.0).max(1e-9);
            let need = cost[i];
            let g = lease_size(i, per_s, need, f64::INFINITY);
            amounts[i] = g;
            if d.rate >= UNBOUNDED_RPM {
                continue;
            }
            if d.rolling && d.provider.is_some_and(|p| p < g) {
                // A window's budget comes back when a slot ages out, not by
                // the rate: nothing to schedule by.
                let back = d.spent.iter().map(|(slot, _)| frees_at(*slot)).filter(|t| *t > now).min();
                let back = back.map_or(wait, |t| Duration::from_millis(t - now));
                return Err(wait.max(back).min(Duration::from_secs(60)));
            }
            due = due.max((g - d.level) / per_s);
            if let Some(p) = d.provider {
                due = due.max((g - p) / per_s);
            }
        }
        if due > AHEAD_S {
            return Err(Duration::from_secs_f64((due - AHEAD_S).clamp(0.002, 60.0)));
        }
        let due_ms = now + (due.max(0.0) * 1000.0).ceil() as u64;
        let late = (lease_ttl(workers) - LEASE_TTL).as_millis() as u64;
        let mut grant = Grant { amounts, marks: [0.0; 4], due_ms };
        for i in 0..4 {
            if !active[i] {
                continue;
            }
            let d = &mut self.dims[i];
            let g = amounts[i];
            grant.marks[i] = d.leased;
            d.leased += g;
            d.level -= g;
            if let Some(p) = &mut d.provider {
                *p -= g;
            }
            d.note_spent(due_ms + late, g, self.reported_ms == 0);
        }
        Ok(grant)
    }

    /// Takes in a report of the provider's budget and limits, made by a call
    /// leased at `marks` and answered just now.
    pub fn report(&mut self, now: u64, rate: &RateInfo, marks: &[f64; 4], l: Limits, changes: &mut Vec<Change>) {
        self.report_answered(now, now, rate, marks, 1, l, changes);
    }

    /// [`Bucket::report`] of a call answered at `answered_ms`: a worker
    /// brings its latest report with its next lease, which with many workers
    /// may be seconds later. The window check compares reports by when they
    /// were answered: by when they reached the bucket, a report that waited
    /// made the budget look as if it had not come back, and 64 workers then
    /// stalled for 40 s on a window that was not there (`scripts/bench scale`).
    /// `workers`: the workers calling the model (each may hold a lease).
    #[allow(clippy::too_many_arguments)]
    pub fn report_answered(
        &mut self,
        now: u64,
        answered_ms: u64,
        rate: &RateInfo,
        marks: &[f64; 4],
        workers: usize,
        l: Limits,
        changes: &mut Vec<Change>,
    ) {
        // Limits first: a dimension the provider names for the first time
        // becomes tracked, and its remaining budget then counts.
        self.learn(now, rate, l, changes);
        let remaining =
            [rate.remaining_requests, rate.remaining_tokens, rate.remaining_input_tokens, rate.remaining_output_tokens];
        let active = self.active(l);
        let requests_leased = self.dims[0].leased;
        for i in 0..4 {
            if let (true, Some(r)) = (active[i], remaining[i]) {
                let d = &mut self.dims[i];
                let blur = blur(workers, requests_leased, d);
                // What was leased after the reporting call is not in the
                // figure yet; what a bucket refilled since the answer is.
                // (A worker brings its report with its next lease: with many
                // workers taking turns, seconds after the answer.)
                let since = now.saturating_sub(answered_ms) as f64 / 1000.0;
                let bucket = !d.rolling && (d.refills || !d.big_bucket);
                let refilled = if bucket { d.rate / 60.0 * since } else { 0.0 };
                // Below zero by no more than the leases granted in turn and
                // not yet due (the level's debt): a lease the provider never
                // saw spent (a limit not known when it was taken) is no debt.
                let floor = d.level.min(0.0);
                d.provider = Some(((r + refilled).min(d.rate) - (d.leased - marks[i])).max(floor));
                d.big_bucket |= r > d.rate / 60.0 * BIG_BUCKET_S;
                self.reported_ms = now;
                if d.big_bucket && !d.rolling && d.window_seen(answered_ms.min(now), r, marks[i], blur) {
                    d.rolling = true;
                    d.refills = false;
                    changes.push(Change {
                        dim: DIM_NAMES[i],
                        from: d.rate,
                        to: d.rate,
                        why: "the provider's budget comes back a minute after it is spent (a window), not at the steady rate",
                    });
                }
            }
        }
    }

    /// Adopts the provider's announced limits. Where a limit is configured,
    /// a lower one lowers the effective limit by at most half at a time, a
    /// higher one lifts a lowered limit (up to the configured figure) at once,
    /// and one announced as it stands confirms it. Where none is configured,
    /// the announced limit is the limit. Differences under 5% change nothing.
    /// True if the provider announced any limit.
    fn learn(&mut self, now: u64, rate: &RateInfo, l: Limits, changes: &mut Vec<Change>) -> bool {
        let limits = [rate.limit_requests, rate.limit_tokens, rate.limit_input_tokens, rate.limit_output_tokens];
        let conf = l.configured();
        let mut any = false;
        for i in 0..4 {
            let Some(limit) = limits[i].filter(|v| *v > 0.0) else { continue };
            any = true;
            let d = &mut self.dims[i];
            let before = d.rate;
            if conf[i] <= 0.0 {
                // Nothing configured: the provider's word is the limit.
                let known = self.announced[i];
                if known > 0.0 && (limit - known).abs() < known * MEANINGFUL {
                    continue;
                }
                self.announced[i] = limit;
                d.rate = limit;
                d.learned = false;
                d.level = d.level.min((limit / 60.0 * BURST_S).max(1.0));
                changes.push(Change {
                    dim: DIM_NAMES[i],
                    from: known,
                    to: limit,
                    why: "the provider announced its limit (none configured)",
                });
                continue;
            }
            if limit < d.rate * (1.0 - MEANINGFUL) {
                d.rate = limit.max(d.rate / 2.0);
                d.learned = true;
                self.confirmed_ms = now;
                changes.push(Change {
                    dim: DIM_NAMES[i],
                    from: before,
                    to: d.rate,
                    why: "the provider announced a lower limit",
                });
            } else if d.learned && limit > d.rate * (1.0 + MEANINGFUL) {
                d.rate = limit.min(conf[i]);
                d.learned = d.rate < conf[i];
                changes.push(Change {
                    dim: DIM_NAMES[i],
                    from: before,
                    to: d.rate,
                    why: "the provider announced a higher limit",
                });
            } else if d.learned {
                // The limit as it stands, said again: it holds.
                self.confirmed_ms = now;
            }
        }
        any
    }

    /// Reacts to a 429: pause everyone, and lower the limit.
    pub fn rate_limited(&mut self, now: u64, pause: Duration, rate: &RateInfo, l: Limits, changes: &mut Vec<Change>) {
        self.paused_until_ms = self.paused_until_ms.max(now + pause.as_millis() as u64);
        // A 429 holds a lowered limit where it is for CONFIRM_MS: it is what
        // the provider takes now.
        self.confirmed_ms = now;
        for d in &mut self.dims {
            d.level = d.level.min(0.0);
            d.provider = d.provider.map(|_| 0.0);
        }
        if !self.learn(now, rate, l, changes) && now >= self.last_cut_ms + CUT_INTERVAL_MS {
            self.last_cut_ms = now;
            let conf = l.configured();
            for (i, d) in self.dims.iter_mut().enumerate() {
                // A limit known (configured or announced) is cut; an unknown
                // one is left to the window of calls in flight.
                if conf[i] > 0.0 || self.announced[i] > 0.0 {
                    let before = d.rate;
                    d.rate = (d.rate * 0.8).max(1.0);
                    d.learned = true;
                    changes.push(Change {
                        dim: DIM_NAMES[i],
                        from: before,
                        to: d.rate,
                        why: "429 without limit headers",
                    });
                }
            }
        }
    }
}

/// Budget leased to this worker.
struct Pool {
    amounts: [f64; 4],
    marks: [f64; 4],
    expires: Instant,
    /// Until when a 429 seen by this worker pauses it. Kept here as well as
    /// in the shared bucket: a lease granted from the bucket just before the
    /// pause was written there would otherwise refill the pool, and a retry
    /// could start at once, before Retry-After.
    paused_until: Instant,
    /// Requests the pool held when last refilled.
    granted: f64,
}

impl Pool {
    /// How many requests this worker can spend in a lease's life, as far as
    /// the lease it is done with tells (at `now`): what it spent of one that
    /// expired, twice one it used up. A worker that can spend few (its
    /// share of the window of calls in flight is small) leases few out of
    /// the provider's burst, and the rest is there for the others, not
    /// expiring unspent.
    fn spends(&self, now: Instant) -> f64 {
        if self.granted <= 0.0 {
            return f64::INFINITY;
        }
        if now >= self.expires {
            (self.granted - self.amounts[0].max(0.0).floor()).max(1.0)
        } else {
            2.0 * self.granted
        }
    }
}

/// A report waiting to be taken to the shared bucket with the next lease.
struct Pending {
    rate: RateInfo,
    marks: [f64; 4],
    /// When the call was answered (ms since the epoch).
    answered_ms: u64,
}

/// One key-and-model's limiter, as seen by one worker.
pub struct Limiter {
    kv: kv::Store,
    key: String,
    labels: (String, String),
    limits: Limits,
    pool: Mutex<Pool>,
    pending: Mutex<Option<Pending>>,
    /// The effective request rate seen at the last lease.
    seen_rate: Mutex<[f64; 4]>,
    /// Workers calling this key and model (as the window of calls in flight
    /// last counted them): each may hold a lease, which blurs what a report
    /// says ([`blur`]).
    workers: std::sync::atomic::AtomicUsize,
    /// One caller at a time takes from the pool or leases more; callers
    /// take turns by job, so a new job's items do not queue behind every
    /// item of an earlier one.
    leasing: crate::fair::FairSemaphore,
}

/// What one call reserved, settled against the real usage afterwards.
pub struct Reservation {
    amounts: [f64; 4],
    marks: [f64; 4],
    /// The call waited for budget (the limit, not the window of calls in
    /// flight, held it back).
    pub waited: bool,
}

impl Reservation {
    /// A call made before its limiter existed: it reserved nothing, and the
    /// bucket had leased nothing when it was sent.
    pub fn none() -> Self {
        Reservation { amounts: [0.0; 4], marks: [0.0; 4], waited: false }
    }
}

impl Limiter {
    pub fn new(kv: kv::Store, key_id: &str, model: &str, limits: Limits) -> Self {
        Limiter {
            kv,
            key: format!("rl.{}.{}", common::nats::key_part(key_id), common::nats::key_part(model)),
            labels: (key_id.to_string(), model.to_string()),
            limits,
            pool: Mutex::new(Pool {
                amounts: [0.0; 4],
                marks: [0.0; 4],
                expires: Instant::now(),
                paused_until: Instant::now(),
                granted: 0.0,
            }),
            pending: Mutex::new(None),
            seen_rate: Mutex::new(limits.per_minute()),
            workers: std::sync::atomic::AtomicUsize::new(1),
            leasing: crate::fair::FairSemaphore::new(1),
        }
    }

    /// Waits until one request of `job` of `project` costing about `cost` may be sent.
    /// `workers`: the workers calling this key and model, this one included.
    pub async fn acquire(
        &self,
        project: &str,
        job: uuid::Uuid,
        cost: Cost,
        workers: usize,
    ) -> Result<Reservation, Error> {
        self.workers.store(workers.max(1), std::sync::atomic::Ordering::Relaxed);
        let need = cost.amounts(cost.max_output);
        let _turn = self.leasing.acquire(project, job).await;
        let mut waited = false;
        loop {
            let paused = self.pool.lock().expect("pool lock").paused_until;
            if Instant::now() < paused {
                waited = true;
                tokio::time::sleep_until(paused.into()).await;
                continue;
            }
            {
                let mut p = self.pool.lock().expect("pool lock");
                if Instant::now() < p.expires && (0..4).all(|i| p.amounts[i] >= need[i]) {
                    for (a, n) in p.amounts.iter_mut().zip(need) {
                        *a -= n;
                    }
                    return Ok(Reservation { amounts: need, marks: p.marks, waited });
                }
            }
            let spends = self.pool.lock().expect("pool lock").spends(Instant::now());
            match self.lease(&need, spends).await? {
                Ok(g) => {
                    let wait = Duration::from_millis(g.due_ms.saturating_sub(crate::kvstate::now_ms()));
                    let counted = self.knows_request_limit();
                    if counted {
                        let how = if wait.is_zero() { "now" } else { "in_turn" };
                        crate::metrics::lease(&self.labels.0, &self.labels.1, how, g.amounts[0]);
                    }
                    if !wait.is_zero() {
                        waited = true;
                        tokio::time::sleep(wait).await;
                    }
                    // A lease granted long before it is due is checked once
                    // against a pause some other worker's 429 set meanwhile.
                    if wait > LEASE_TTL {
                        if let Some(until) = self.paused_until().await? {
                            let mut p = self.pool.lock().expect("pool lock");
                            p.paused_until = p.paused_until.max(until);
                            continue;
                        }
                    }
                    let mut p = self.pool.lock().expect("pool lock");
                    let expired = Instant::now() >= p.expires;
                    if expired && counted && p.amounts[0] >= 1.0 {
                        crate::metrics::lease_unspent(&self.labels.0, &self.labels.1, p.amounts[0].floor());
                        tracing::debug!(
                            unspent = p.amounts[0].floor(),
                            of = p.granted,
                            granted = g.amounts[0],
                            asked = spends,
                            waited_ms = wait.as_millis() as u64,
                            "lease expired unspent"
                        );
                    }
                    for i in 0..4 {
                        p.amounts[i] = if expired { g.amounts[i] } else { p.amounts[i] + g.amounts[i] };
                    }
                    p.granted = p.amounts[0];
                    p.marks = g.marks;
                    p.expires = Instant::now() + lease_ttl(workers);
                }
                Err(wait) => {
                    waited = true;
                    tokio::time::sleep(wait).await
                }
            }
        }
    }

    /// Corrects the reservation with what the call really used: the real
    /// prompt, and the output limit as providers count it when the call
    /// arrives (a failed call: nothing). Counting output at its limit keeps
    /// an output-token budget on the safe side where the provider adjusts later.
    pub fn settle(&self, r: Reservation, used: Cost) {
        let used = used.amounts(used.max_output);
        let mut p = self.pool.lock().expect("pool lock");
        for ((a, reserved), used) in p.amounts.iter_mut().zip(r.amounts).zip(used).skip(1) {
            *a += reserved - used;
        }
    }

    /// The response headers of a successful call leased as `r`: its report of
    /// the provider's budget goes with the next lease, unless it lowers the
    /// limit or says the budget is nearly spent, which is shared at once.
    pub async fn observe(&self, rate: &RateInfo, r: &Reservation) -> Result<(), Error> {
        if rate.is_empty() {
            return Ok(());
        }
        let seen = *self.seen_rate.lock().expect("seen lock");
        let limits = [rate.limit_requests, rate.limit_tokens, rate.limit_input_tokens, rate.limit_output_tokens];
        let remaining =
            [rate.remaining_requests, rate.remaining_tokens, rate.remaining_input_tokens, rate.remaining_output_tokens];
        // A limit announced for the first time, or lower than the one in force.
        let urgent = (0..4).any(|i| {
            limits[i].is_some_and(|v| v > 0.0 && (seen[i] <= 0.0 || v < seen[i] * (1.0 - MEANINGFUL)))
                || remaining[i].is_some_and(|v| v < seen[i] / 60.0 * PROVIDER_RESERVE_S)
        });
        if !urgent {
            let answered_ms = crate::kvstate::now_ms();
            *self.pending.lock().expect("pending lock") = Some(Pending { rate: *rate, marks: r.marks, answered_ms });
            return Ok(());
        }
        let (rate, marks, limits) = (*rate, r.marks, self.limits);
        let workers = self.workers.load(std::sync::atomic::Ordering::Relaxed);
        self.modify(|b, now, changes| {
            b.refill(now, limits, changes);
            b.report_answered(now, now, &rate, &marks, workers, limits, changes);
            true
        })
        .await
    }

    /// A 429: pause the key for the whole cluster and lower its limit.
    pub async fn rate_limited(&self, retry_after: Option<Duration>, rate: &RateInfo) -> Result<(), Error> {
        let pause = retry_after.unwrap_or(Duration::from_secs(1));
        {
            let mut p = self.pool.lock().expect("pool lock");
            for a in &mut p.amounts {
                *a = a.min(0.0);
            }
            p.paused_until = p.paused_until.max(Instant::now() + pause);
        }
        crate::metrics::rate_limit_pause(&self.labels.0, &self.labels.1, pause);
        let (rate, limits) = (*rate, self.limits);
        self.modify(|b, now, changes| {
            b.refill(now, limits, changes);
            b.rate_limited(now, pause, &rate, limits, changes);
            true
        })
        .await
    }

    /// Whether the request limit is known (configured, or announced by the
    /// provider): where it is not, the window of calls in flight is what a
    /// 429 can slow down.
    pub fn knows_request_limit(&self) -> bool {
        self.seen_rate.lock().expect("seen lock")[0] < UNBOUNDED_RPM
    }

    /// Until when the shared bucket pauses the key, if it does: one read.
    async fn paused_until(&self) -> Result<Option<Instant>, Error> {
        let limits = self.limits;
        let mut until = None;
        crate::kvstate::modify(
            &self.kv,
            "limiter",
            &self.key,
            |now| Bucket::full(now, limits),
            |b: &mut Bucket, now| {
                if b.paused_until_ms > now {
                    until = Some(Instant::now() + Duration::from_millis(b.paused_until_ms - now));
                }
                false
            },
        )
        .await?;
        Ok(until)
    }

    async fn lease(&self, need: &[f64; 4], spends: f64) -> Result<Result<Grant, Duration>, Error> {
        let limits = self.limits;
        let asker = Asker { workers: self.workers.load(std::sync::atomic::Ordering::Relaxed), spends };
        let pending = self.pending.lock().expect("pending lock").take();
        let mut grant = Err(Duration::ZERO);
        self.modify(|b, now, changes| {
            b.refill(now, limits, changes);
            if let Some(p) = &pending {
                b.report_answered(now, p.answered_ms, &p.rate, &p.marks, asker.workers, limits, changes);
            }
            grant = b.take_in_turn(now, need, limits, asker);
            grant.is_ok() || pending.is_some()
        })
        .await?;
        Ok(grant)
    }

    async fn modify(&self, mut f: impl FnMut(&mut Bucket, u64, &mut Vec<Change>) -> bool) -> Result<(), Error> {
        let limits = self.limits;
        let mut changes = Vec::new();
        let written = crate::kvstate::modify(
            &self.kv,
            "limiter",
            &self.key,
            |now| Bucket::full(now, limits),
            |b, now| {
                changes.clear();
                f(b, now, &mut changes)
            },
        )
        .await?;
        let Some(b) = written else { return Ok(()) };
        let ceilings = b.ceilings(limits);
        let rates: [f64; 4] = std::array::from_fn(|i| if ceilings[i] > 0.0 { b.dims[i].rate } else { 0.0 });
        *self.seen_rate.lock().expect("seen lock") = rates;
        let (key_id, model) = (&self.labels.0, &self.labels.1);
        for (i, ceiling) in ceilings.into_iter().enumerate() {
            if ceiling > 0.0 && ceiling < UNBOUNDED_RPM {
                crate::metrics::rate_limit(key_id, model, DIM_NAMES[i], rates[i]);
            }
        }
        // Logged once for the cluster: only the write that made the change logs it.
        for c in changes {
            if c.from == c.to {
                tracing::info!(key_id = %key_id, model = %model, limit = c.dim, "{}", c.why);
            } else {
                tracing::warn!(key_id = %key_id, model = %model, limit = c.dim, from = c.from.round(), to = c.to.round(), "effective rate limit changed: {}", c.why);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Limits = Limits { rpm: 6000.0, tpm: 0.0, input_tpm: 0.0, output_tpm: 0.0 };
    const ONE: [f64; 4] = [1.0, 10.0, 10.0, 0.0];

    fn no_changes() -> Vec<Change> {
        Vec::new()
    }

    #[test]
    fn leases_grow_and_live_longer_with_the_workers() {
        // workers: most requests out of the provider's burst, life in ms
        for (workers, burst, life) in [
            (1, 32.0, 500),
            (8, 32.0, 500),
            (16, 32.0, 1_000),
            (32, 64.0, 2_000),
            (64, 128.0, 4_000),
            (500, 128.0, 4_000),
        ] {
            assert_eq!((burst_lease(workers), lease_ttl(workers).as_millis()), (burst, life), "{workers}");
        }
    }

    #[test]
    fn a_lease_out_of_the_burst_is_what_the_worker_can_spend_and_its_share() {
        // 20,000 a minute, the provider reporting 12,800 left: out of its
        // burst, (workers, what the worker can spend) -> requests leased.
        let l = Limits { rpm: 20_000.0, ..Default::default() };
        let rate = RateInfo { remaining_requests: Some(12_800.0), ..Default::default() };
        for (workers, spends, leased) in [
            (1, f64::INFINITY, 33.0), // a few workers: the paced lease is more than 32
            (64, f64::INFINITY, 128.0),
            (64, 10.0, 33.0), // a tenth of a second's budget, the paced lease, is more
            (64, 50.0, 50.0),
            (200, f64::INFINITY, 63.0), // a share of what is left: 12,733 spare / 200
        ] {
            let mut b = Bucket::full(0, l);
            b.report(0, &rate, &[0.0; 4], l, &mut no_changes());
            let g = b.take(0, &ONE, l, Asker { workers, spends }).unwrap();
            assert_eq!(g.amounts[0], leased, "{workers} {spends}");
        } // Near the burst's end a share per worker of what is left is small:
          // still a few workers' lease (6,000 a minute, 1,000 left, 64 workers:
          // 15 each, leased 32).
        let mut b = Bucket::full(0, L);
        let rate = RateInfo { remaining_requests: Some(1_000.0), ..Default::default() };
        b.report(0, &rate, &[0.0; 4], L, &mut no_changes());
        b.dims[0].big_bucket = true;
        let g = b.take(0, &ONE, L, Asker { workers: 64, spends: f64::INFINITY }).unwrap();
        assert_eq!(g.amounts[0], 32.0);
    }

    #[test]
    fn a_worker_asks_for_what_its_last_lease_showed_it_can_spend() {
        let now = Instant::now();
        let pool = |granted: f64, left: f64, expired: bool| Pool {
            amounts: [left, 0.0, 0.0, 0.0],
            marks: [0.0; 4],
            expires: if expired { now - Duration::from_millis(1) } else { now + Duration::from_millis(100) },
            paused_until: now,
            granted,
        };
        // granted, left, expired: what it can spend
        for (granted, left, expired, spends) in [
            (0.0, 0.0, true, f64::INFINITY), // no lease yet: unknown
            (128.0, 81.0, true, 47.0),       // spent 47 in a lease's life
            (33.0, 33.0, true, 1.0),         // spent nothing: one
            (33.0, 0.0, false, 66.0),        // used up before its end: twice as many
        ] {
            assert_eq!(pool(granted, left, expired).spends(now), spends, "{granted} {left} {expired}");
        }
    }

    #[test]
    fn a_full_bucket_leases_a_tenth_of_a_second() {
        let mut b = Bucket::full(0, L);
        assert_eq!(b.dims[0].level, 20.0);
        let g = b.take(0, &ONE, L, Asker::ONE).unwrap();
        assert_eq!(g.amounts[0], 10.0);
        assert!(g.amounts[1].is_infinite());
        assert_eq!(b.dims[0].level, 10.0);
    }

    #[test]
    fn an_empty_bucket_says_how_long_to_wait() {
        let mut b = Bucket::full(0, L);
        b.dims[0].level = 0.0;
        let wait = b.take(0, &ONE, L, Asker::ONE).unwrap_err();
        assert_eq!(wait, Duration::from_millis(10)); // 100 requests/s
        b.refill(10, L, &mut no_changes());
        assert!(b.take(10, &ONE, L, Asker::ONE).is_ok());
    }

    #[test]
    fn no_more_than_the_limit_is_leased_over_a_minute() {
        let mut b = Bucket::full(0, L);
        let mut granted = 0.0;
        for now in 0..60_000u64 {
            b.refill(now, L, &mut no_changes());
            while let Ok(g) = b.take(now, &ONE, L, Asker::ONE) {
                granted += g.amounts[0];
            }
        }
        assert!((6000.0..=6000.0 + 20.0).contains(&granted), "{granted}");
    }

    #[test]
    fn the_providers_reported_burst_is_spent_down_to_a_second_of_rate() {
        // A provider whose bucket starts full: 6,000 requests, reported on the first answer.
        let mut b = Bucket::full(0, L);
        let first = b.take(0, &ONE, L, Asker::ONE).unwrap();
        let rate = RateInfo { remaining_requests: Some(5_999.0), limit_requests: Some(6000.0), ..Default::default() };
        b.report(300, &rate, &first.marks, L, &mut no_changes());
        let mut granted = first.amounts[0];
        let mut now = 300;
        while now < 10_300 {
            b.refill(now, L, &mut no_changes());
            while let Ok(g) = b.take(now, &ONE, L, Asker::ONE) {
                granted += g.amounts[0];
            }
            now += 1;
        }
        // In 10 s: the 6,000 it held plus 10 s of refill, less the reserve, and never more.
        assert!(granted <= 6_000.0 + 1_000.0, "{granted}");
        assert!(granted >= 6_000.0 + 1_000.0 - 60.0, "{granted}");
    }

    #[test]
    fn a_small_provider_bucket_is_not_spent_beyond_the_steady_rate() {
        // A smooth limit with one second of burst reports at most 100 remaining at 6,000/min.
        let mut b = Bucket::full(0, L);
        let first = b.take(0, &ONE, L, Asker::ONE).unwrap();
        let rate = RateInfo { remaining_requests: Some(99.0), ..Default::default() };
        b.report(10, &rate, &first.marks, L, &mut no_changes());
        let mut granted = first.amounts[0];
        for now in 10..10_010u64 {
            b.refill(now, L, &mut no_changes());
            while let Ok(g) = b.take(now, &ONE, L, Asker::ONE) {
                granted += g.amounts[0];
            }
        }
        assert!(granted <= 1_000.0 + 20.0 + 10.0, "{granted}");
    }

    #[test]
    fn a_report_older_than_the_baseline_does_not_make_a_bucket_a_window() {
        let mut d = Dim { rate: 6000.0, ..Default::default() };
        // Baseline: 3,000 left, reported by a call leased at mark 5,000.
        assert!(!d.window_seen(0, 3_000.0, 5_000.0, 0.0));
        // 4 s later a report from a call leased earlier (mark 4,000), made
        // before the baseline's: its figure is lower, yet nothing was spent late.
        assert!(!d.window_seen(4_000, 2_500.0, 4_000.0, 0.0));
        // A later call's report that shows nothing came back while the
        // bucket had room: a window.
        assert!(d.window_seen(8_000, 1_000.0, 6_000.0, 0.0));
    }

    #[test]
    fn a_report_that_waited_for_its_workers_next_lease_does_not_make_a_bucket_a_window() {
        // A bucket refilling at 100/s, spent down: 64 workers each bring their
        // latest report with their next lease, seconds after the answer.
        let mut b = Bucket::full(0, L);
        let report = |left| RateInfo { remaining_requests: Some(left), ..Default::default() };
        b.report_answered(1_000, 1_000, &report(3_000.0), &[5_000.0; 4], 1, L, &mut no_changes());
        assert!(b.dims[0].big_bucket);
        // Answered 0.5 s later (50 back, 40 leased since), taken in 3.5 s later:
        // by arrival, 350 should have come back and 10 did. Not a window.
        b.report_answered(4_500, 1_500, &report(2_970.0), &[5_040.0; 4], 1, L, &mut no_changes());
        assert!(!b.dims[0].rolling);
        // Reports answered 3 s after the baseline and 1.6 s after that, with
        // nothing back: a window.
        b.report_answered(4_600, 4_000, &report(2_900.0), &[5_100.0; 4], 1, L, &mut no_changes());
        b.report_answered(5_700, 5_600, &report(2_880.0), &[5_120.0; 4], 1, L, &mut no_changes());
        assert!(b.dims[0].rolling);
    }

    #[test]
    fn what_the_workers_leases_can_hide_is_not_taken_for_a_window() {
        // 100 a second. Reports: when answered, the budget left, the
        // reporting call's lease mark. A burst ends: 400 fewer left, 300
        // leased between the two calls, so by the marks 100 went missing
        // instead of 350 coming back.
        let (baseline, burst_end) = ((10_000, 500.0, 5_000.0), (13_500, 100.0, 5_300.0));
        let dim = || Dim { rate: 6000.0, big_bucket: true, ..Default::default() };
        // From one worker, whose leases are spent in order: a window.
        let mut d = dim();
        assert!(!d.window_seen(baseline.0, baseline.1, baseline.2, blur(1, 0.0, &d)));
        assert!(d.window_seen(burst_end.0, burst_end.1, burst_end.2, blur(1, 0.0, &d)));
        // From 64 workers, each of which may hold a lease of 128 (four times
        // a few workers' 32) taken before the first call and spent after it
        // (8,192 requests): no sign at all.
        // Every later check is as blurred, and the baseline stays, until the
        // refill over the whole time shows a bucket.
        let mut d = dim();
        let blur64 = blur(64, 0.0, &d);
        assert_eq!(blur64, 8_192.0);
        assert!(!d.window_seen(baseline.0, baseline.1, baseline.2, blur64));
        assert!(!d.window_seen(burst_end.0, burst_end.1, burst_end.2, blur64));
        assert!(!d.window_seen(17_000, 300.0, 5_600.0, blur64));
        assert_eq!(d.baseline, Some(baseline), "a blurred check keeps its baseline");
        assert!(!d.rolling && !d.refills);
        // With 4 workers (128 hidden at most) the check waits until a
        // quarter of the refill is past what leases can hide: 5.12 s.
        let mut d = dim();
        let blur4 = blur(4, 0.0, &d);
        assert!(!d.window_seen(baseline.0, baseline.1, baseline.2, blur4));
        assert!(!d.window_seen(13_500, 100.0, 5_300.0, blur4));
        assert!(!d.window_seen(17_000, 450.0, 5_600.0, blur4), "7 s: 600 sent, 450 left: a bucket");
        assert!(d.refills);
        // A window seen over as long: nothing came back.
        let mut d = dim();
        assert!(!d.window_seen(baseline.0, baseline.1, baseline.2, blur4));
        assert!(!d.window_seen(13_500, 100.0, 5_300.0, blur4));
        assert!(d.window_seen(17_000, 0.0, 5_500.0, blur4));
        // A baseline from a bucket too full to take the refill is replaced.
        let mut d = dim();
        assert!(!d.window_seen(0, 5_900.0, 100.0, blur4));
        assert!(!d.window_seen(6_000, 5_000.0, 1_000.0, blur4));
        assert_eq!(d.baseline, Some((6_000, 5_000.0, 1_000.0)));
    }

    #[test]
    fn a_report_discounts_what_was_leased_after_the_reporting_call() {
        let mut b = Bucket::full(0, L);
        let g = b.take(0, &ONE, L, Asker::ONE).unwrap();
        b.dims[0].leased += 40.0; // other calls leased since
        let rate = RateInfo { remaining_requests: Some(100.0), ..Default::default() };
        b.report(0, &rate, &g.marks, L, &mut no_changes());
        assert_eq!(b.dims[0].provider, Some(100.0 - 40.0 - g.amounts[0]));
    }

    #[test]
    fn a_bogus_low_limit_cuts_by_half_at_most_and_decays_back() {
        let mut b = Bucket::full(1_000, L);
        let mut changes = Vec::new();
        let bogus = RateInfo { limit_requests: Some(60.0), ..Default::default() };
        b.rate_limited(1_000, Duration::from_secs(1), &bogus, L, &mut changes);
        assert_eq!(b.dims[0].rate, 3000.0, "one response cuts by half at most");
        assert_eq!(changes.len(), 1);
        // Held while 429s confirm it (5 s), then back by 2.5% of 6,000 per second.
        for t in (2..=5).map(|s| s * 1_000) {
            b.refill(t, L, &mut no_changes());
        }
        assert_eq!(b.dims[0].rate, 3000.0);
        for t in (6..=13).map(|s| s * 1_000) {
            b.refill(t, L, &mut no_changes());
        }
        assert!((b.dims[0].rate - 3000.0 - 1200.0).abs() < 1.0, "{}", b.dims[0].rate);
        let mut changes = Vec::new();
        b.refill(61_000, L, &mut changes);
        assert_eq!(b.dims[0].rate, 6000.0);
        assert!(!b.dims[0].learned);
        assert_eq!(changes.len(), 1, "the return is logged once");
    }

    #[test]
    fn a_higher_announced_limit_lifts_a_learned_one() {
        let mut b = Bucket::full(0, Limits { rpm: 12_000.0, ..L });
        let l = Limits { rpm: 12_000.0, ..L };
        let r = |v| RateInfo { limit_requests: Some(v), ..Default::default() };
        b.report(0, &r(6000.0), &[0.0; 4], l, &mut no_changes());
        assert_eq!(b.dims[0].rate, 6000.0);
        b.report(0, &r(3000.0), &[0.0; 4], l, &mut no_changes());
        assert_eq!(b.dims[0].rate, 3000.0);
        b.report(0, &r(6000.0), &[0.0; 4], l, &mut no_changes());
        assert_eq!(b.dims[0].rate, 6000.0);
    }

    #[test]
    fn a_429_without_headers_cuts_by_a_fifth_once_per_burst_holds_a_while_then_recovers() {
        let mut b = Bucket::full(1000, L);
        let mut changes = Vec::new();
        b.rate_limited(1000, Duration::from_secs(2), &RateInfo::default(), L, &mut changes);
        assert_eq!(b.take(2000, &ONE, L, Asker::ONE).unwrap_err(), Duration::from_secs(1));
        assert_eq!(b.dims[0].rate, 4800.0);
        b.rate_limited(1100, Duration::ZERO, &RateInfo::default(), L, &mut changes);
        assert_eq!(b.dims[0].rate, 4800.0, "a second 429 right after the first does not cut again");
        assert_eq!(changes.len(), 1, "one cut, logged once");
        // Held for 5 s after the last 429, then back by 2.5% of 6,000 per second.
        for t in (2..=6).map(|s| s * 1_000) {
            b.refill(t, L, &mut changes);
        }
        assert_eq!(b.dims[0].rate, 4800.0);
        b.refill(7_000, L, &mut changes);
        assert_eq!(b.dims[0].rate, 4800.0 + 150.0);
        for t in (8..=14).map(|s| s * 1_000) {
            b.refill(t, L, &mut changes);
        }
        assert_eq!(b.dims[0].rate, 6000.0, "within 13 s of the 429 the configured limit is back");
        assert_eq!(changes.len(), 2, "the return is logged once: {changes:?}");
    }

    #[test]
    fn with_no_limit_configured_the_providers_announced_limit_is_the_limit() {
        let untold = Limits::default();
        let mut b = Bucket::full(0, untold);
        let mut changes = Vec::new();
        assert!(b.take(0, &ONE, untold, Asker::ONE).unwrap().amounts[0] > 1e6, "no limit known: nothing paces");
        let announce =
            |limit| RateInfo { limit_requests: Some(limit), remaining_requests: Some(100.0), ..Default::default() };
        b.report(10, &announce(6000.0), &[0.0; 4], untold, &mut changes);
        assert_eq!((b.dims[0].rate, b.announced[0]), (6000.0, 6000.0));
        assert_eq!(changes.len(), 1, "{changes:?}");
        // Paced at the announced rate from now on: no more than 6,000 a minute.
        let mut granted = 0.0;
        for now in 10..60_010u64 {
            b.refill(now, untold, &mut changes);
            while let Ok(g) = b.take(now, &ONE, untold, Asker::ONE) {
                granted += g.amounts[0];
            }
        }
        assert!(granted <= 6000.0 + 100.0, "{granted}");
        assert!(granted >= 6000.0 - 100.0, "{granted}");
        // The same figure again, or one within 5%, changes nothing and logs nothing.
        for limit in [6000.0, 5900.0, 6200.0] {
            b.report(60_010, &announce(limit), &[0.0; 4], untold, &mut changes);
        }
        assert_eq!((b.dims[0].rate, changes.len()), (6000.0, 1));
        // A new tier: adopted at once, both ways.
        b.report(60_020, &announce(9000.0), &[0.0; 4], untold, &mut changes);
        assert_eq!(b.dims[0].rate, 9000.0);
        b.report(60_030, &announce(3000.0), &[0.0; 4], untold, &mut changes);
        assert_eq!((b.dims[0].rate, changes.len()), (3000.0, 3));
        // A token limit announced for the first time becomes tracked.
        let tokens = RateInfo { limit_tokens: Some(60_000.0), ..Default::default() };
        b.report(60_040, &tokens, &[0.0; 4], untold, &mut changes);
        assert!(b.active(untold)[1]);
        assert_eq!(b.dims[1].rate, 60_000.0);
    }

    #[test]
    fn a_learned_limit_said_again_holds_quietly() {
        // Told twice the real limit: the first header halves it, the same
        // header on every answer after confirms it without a word.
        let told = Limits { rpm: 12_000.0, ..L };
        let mut b = Bucket::full(1_000, told);
        let mut changes = Vec::new();
        for t in (1..60).map(|s| s * 1_000) {
            b.refill(t, told, &mut changes);
            for limit in [6000.0, 5999.5, 6000.0] {
                let r = RateInfo { limit_requests: Some(limit), ..Default::default() };
                b.report(t, &r, &[0.0; 4], told, &mut changes);
            }
        }
        assert_eq!(b.dims[0].rate, 6000.0);
        assert_eq!(changes.len(), 1, "{changes:?}");
    }

    /// A provider limiting to 6,000 requests a minute whose budget starts
    /// whole: a bucket refilled at the rate, or a sliding minute.
    struct Provider {
        rolling: bool,
        level: f64,
        at: u64,
        spent: std::collections::VecDeque<u64>,
    }

    impl Provider {
        fn new(rolling: bool) -> Self {
            Provider { rolling, level: 6000.0, at: 0, spent: Default::default() }
        }

        fn remaining(&mut self, now: u64) -> f64 {
            if self.rolling {
                while self.spent.front().is_some_and(|t| now >= t + 60_000) {
                    self.spent.pop_front();
                }
                6000.0 - self.spent.len() as f64
            } else {
                self.level = (self.level + (now - self.at) as f64 * 0.1).min(6000.0);
                self.at = now;
                self.level
            }
        }

        /// One request arriving at `now`: answered, or 429.
        fn call(&mut self, now: u64) -> bool {
            if self.remaining(now) < 1.0 {
                return false;
            }
            self.spent.push_back(now);
            self.level -= 1.0;
            true
        }
    }

    /// Sends `items` requests through a bucket to `provider`, answers taking
    /// 300 ms; returns when the last was answered and how many got a 429.
    fn run(provider: &mut Provider, items: usize) -> (u64, usize) {
        let mut b = Bucket::full(1, L);
        let mut changes = Vec::new();
        let (mut done, mut refused) = (0usize, 0usize);
        // Answers on their way: when they arrive, the budget they report, the lease mark.
        let mut answers: std::collections::VecDeque<(u64, f64, [f64; 4])> = Default::default();
        let mut left = items;
        let mut leased = (0.0, [0.0; 4]);
        let mut now = 1u64;
        while done < items {
            assert!(now < 600_000, "not done in 10 minutes: {done} of {items}");
            b.refill(now, L, &mut changes);
            while answers.front().is_some_and(|a| a.0 <= now) {
                let (_, remaining, marks) = answers.pop_front().expect("an answer");
                let rate = RateInfo {
                    remaining_requests: Some(remaining),
                    limit_requests: Some(6000.0),
                    ..Default::default()
                };
                b.report(now, &rate, &marks, L, &mut changes);
            }
            // The client sends a request a millisecond at most (as 4 workers
            // of 64 calls at 300 ms would), from leases of the bucket.
            if left > 0 && leased.0 < 1.0 {
                if let Ok(g) = b.take(now, &ONE, L, Asker::ONE) {
                    leased = (g.amounts[0], g.marks);
                }
            }
            if left > 0 && leased.0 >= 1.0 {
                leased.0 -= 1.0;
                if provider.call(now) {
                    left -= 1;
                    done += 1;
                    answers.push_back((now + 300, provider.remaining(now), leased.1));
                } else {
                    refused += 1;
                    leased.0 = 0.0;
                    let rate = RateInfo { remaining_requests: Some(0.0), ..Default::default() };
                    b.rate_limited(now, Duration::from_secs(1), &rate, L, &mut changes);
                }
            }
            now += 1;
        }
        (now + 300, refused)
    }

    #[test]
    fn a_window_is_told_from_a_bucket_and_each_burst_is_spent_without_a_429() {
        // A bucket: 6,000 at once, the other 3,000 at 100 a second.
        let (bucket_done, refused) = run(&mut Provider::new(false), 9_000);
        assert_eq!(refused, 0);
        assert!((30_000..=31_500).contains(&bucket_done), "{bucket_done} ms");
        // A window gives nothing back for a minute: the other 3,000 go as
        // the first burst ages out (its first 3,000 were sent in 3 s), not at
        // the steady rate into 429s. Ideal: 63.3 s; what ages out is credited
        // up to a second late.
        let mut window = Provider::new(true);
        let (window_done, refused) = run(&mut window, 9_000);
        assert_eq!(refused, 0, "429s from a window, done at {window_done} ms");
        assert!((63_300..=64_500).contains(&window_done), "{window_done} ms");
    }

    /// `workers` workers of 64 calls in flight, each sending a request a millisecond at most from
    /// leases taken in turn ([`Bucket::take_in_turn`], as [`Limiter::acquire`]
    /// does) and bringing its latest report with its next lease; answers take
    /// 300 ms. Returns when the last was answered, the 429s, and the bucket
    /// operations (reads) per request.
    fn run_in_turn(provider: &mut Provider, items: usize, workers: usize) -> (u64, usize, f64) {
        #[derive(Default)]
        struct W {
            amount: f64,
            marks: [f64; 4],
            due: u64,
            asks_at: u64,
            report: Option<(u64, f64, [f64; 4])>,
            in_flight: usize,
        }
        let mut b = Bucket::full(1, L);
        let mut changes = Vec::new();
        let mut ws: Vec<W> = (0..workers).map(|_| W::default()).collect();
        let mut answers: std::collections::VecDeque<(u64, usize, f64, [f64; 4])> = Default::default();
        let (mut sent, mut done, mut refused, mut asks) = (0usize, 0usize, 0usize, 0usize);
        let mut now = 1u64;
        while done < items {
            assert!(now < 600_000, "not done in 10 minutes: {done} of {items}");
            while answers.front().is_some_and(|a| a.0 <= now) {
                let (at, w, remaining, marks) = answers.pop_front().expect("an answer");
                ws[w].report = Some((at, remaining, marks));
                ws[w].in_flight -= 1;
                done += 1;
            }
            for (i, w) in ws.iter_mut().enumerate() {
                if sent == items {
                    break;
                }
                if w.amount < 1.0 && now >= w.asks_at {
                    asks += 1;
                    b.refill(now, L, &mut changes);
                    if let Some((at, remaining, marks)) = w.report.take() {
                        let rate = RateInfo {
                            remaining_requests: Some(remaining),
                            limit_requests: Some(6000.0),
                            ..Default::default()
                        };
                        b.report_answered(now, at, &rate, &marks, workers, L, &mut changes);
                    }
                    match b.take_in_turn(now, &ONE, L, Asker::ONE) {
                        Ok(g) => (w.amount, w.marks, w.due, w.asks_at) = (g.amounts[0], g.marks, g.due_ms, g.due_ms),
                        Err(wait) => w.asks_at = now + wait.as_millis() as u64,
                    }
                }
                if w.amount >= 1.0 && now >= w.due && w.in_flight < 64 {
                    w.amount -= 1.0;
                    if provider.call(now) {
                        sent += 1;
                        w.in_flight += 1;
                        answers.push_back((now + 300, i, provider.remaining(now), w.marks));
                    } else {
                        refused += 1;
                        w.amount = 0.0;
                        let rate = RateInfo {
                            remaining_requests: Some(0.0),
                            limit_requests: Some(6000.0),
                            ..Default::default()
                        };
                        b.refill(now, L, &mut changes);
                        b.rate_limited(now, Duration::from_secs(1), &rate, L, &mut changes);
                    }
                }
            }
            now += 1;
        }
        (now, refused, asks as f64 / items as f64)
    }

    #[test]
    fn workers_taking_leases_in_turn_ask_once_a_lease_and_keep_to_the_limit() {
        // workers: (done by, in ms; bucket operations per request at most).
        // A provider bucket of 6,000 that starts full, 100 a second after:
        // 6,000 at once, the other 3,000 in 30 s, plus a latency. Asking in
        // turn, a worker's lease is 10 requests (0.1 s): a tenth of an
        // operation per request whatever the number of workers; the burst's
        // leases of 32 cost less.
        for (workers, by, ops) in [(4, 31_500, 0.1), (16, 31_500, 0.1), (64, 32_000, 0.1)] {
            let (done_at, refused, per_request) = run_in_turn(&mut Provider::new(false), 9_000, workers);
            // The burst's last leases of 32 per worker, granted before a
            // report and spent after it, can meet a spent budget: a few 429s
            // where it ends (polling the bucket met as many).
            assert!(refused <= 9_000 / 200, "{workers} workers: {refused} 429s");
            assert!((30_000..=by).contains(&done_at), "{workers} workers: done at {done_at} ms");
            assert!(per_request <= ops, "{workers} workers: {per_request:.3} operations per request");
        }
        // A window: the rest goes as the first burst ages out, in turn too.
        // (With 16 workers the burst is gone in 2 s, before two checks of
        // reports 1.5 s apart can tell a window: polling fared no better.)
        let workers = 4;
        let (done_at, refused, per_request) = run_in_turn(&mut Provider::new(true), 9_000, workers);
        assert!(refused <= 9_000 / 200, "{workers} workers: {refused} 429s from a window, done at {done_at} ms");
        assert!((63_300..=65_000).contains(&done_at), "{workers} workers: {done_at} ms");
        assert!(per_request <= 0.2, "{workers} workers: {per_request:.3} operations per request");
    }

    #[test]
    fn token_limits_alone_still_spend_the_providers_burst() {
        // Anthropic's: input and output tokens per minute, no request limit
        // known. The provider's buckets start full (about 6,000 calls of 20
        // output tokens); in the first second nearly all of it is leased,
        // not a second's steady rate (100 calls). Requests with no known
        // limit once ran into debt by leases in turn and paced everything.
        let l = Limits { input_tpm: 600_000.0, output_tpm: 120_000.0, ..Default::default() };
        let cost = [1.0, 0.0, 100.0, 20.0];
        let mut b = Bucket::full(0, l);
        let first = b.take_in_turn(0, &cost, l, Asker::ONE).unwrap();
        let rate = RateInfo {
            remaining_input_tokens: Some(599_900.0),
            limit_input_tokens: Some(600_000.0),
            remaining_output_tokens: Some(119_980.0),
            limit_output_tokens: Some(120_000.0),
            ..Default::default()
        };
        b.report_answered(300, 300, &rate, &first.marks, 1, l, &mut no_changes());
        let mut calls = 0.0;
        for now in 300..1_300u64 {
            b.refill(now, l, &mut no_changes());
            while let Ok(g) = b.take_in_turn(now, &cost, l, Asker::ONE) {
                if g.due_ms > now {
                    break;
                }
                calls += g.amounts[3] / 20.0;
            }
        }
        assert!(calls >= 5_500.0, "{calls} calls leased in the first second");
    }

    #[test]
    fn a_short_bucket_grants_the_next_lease_in_turn() {
        let mut b = Bucket::full(0, L);
        b.dims[0].level = 0.0;
        // 100 requests a second, leases of 10: each due 0.1 s after the one before.
        for due in [100, 200, 300] {
            let g = b.take_in_turn(0, &ONE, L, Asker::ONE).unwrap();
            assert_eq!((g.amounts[0], g.due_ms), (10.0, due));
        }
        assert_eq!(b.dims[0].level, -30.0);
        // A limit lowered from the configured one is in doubt: nothing is granted ahead.
        b.dims[0].learned = true;
        assert_eq!(b.take_in_turn(0, &ONE, L, Asker::ONE).unwrap_err(), Duration::from_millis(310));
        b.dims[0].learned = false;
        // No further than 10 s ahead: the next asks again when its turn is near.
        b.dims[0].level = -995.0;
        assert_eq!(b.take_in_turn(0, &ONE, L, Asker::ONE).unwrap_err(), Duration::from_millis(50));
        // A pause (a 429's Retry-After) is waited out, not scheduled around.
        let mut b = Bucket::full(0, L);
        b.paused_until_ms = 2_000;
        assert_eq!(b.take_in_turn(0, &ONE, L, Asker::ONE).unwrap_err(), Duration::from_secs(2));
        // A window's spent budget comes back when its slot ages out: that wait stands.
        let mut b = Bucket::full(0, L);
        b.dims[0].level = 0.0;
        b.dims[0].rolling = true;
        b.dims[0].provider = Some(0.0);
        b.dims[0].spent = vec![(4, 50.0)];
        assert_eq!(b.take_in_turn(5_000, &ONE, L, Asker::ONE).unwrap_err(), Duration::from_millis(58_000));
        // A burst granted from the provider's budget leaves a debt in turn whole.
        let mut b = Bucket::full(0, L);
        b.dims[0].level = -300.0;
        b.dims[0].big_bucket = true;
        b.dims[0].provider = Some(3_000.0);
        b.reported_ms = 1;
        let g = b.take_in_turn(0, &ONE, L, Asker::ONE).unwrap();
        assert_eq!((g.amounts[0], g.due_ms), (32.0, 0));
        assert_eq!(b.dims[0].level, -300.0);
    }

    #[test]
    fn token_limits_bind_too() {
        let l = Limits { rpm: 60_000.0, tpm: 60_000.0, ..Default::default() };
        let mut b = Bucket::full(0, l);
        assert_eq!(b.dims[1].level, 200.0);
        let g = b.take(0, &[1.0, 150.0, 0.0, 0.0], l, Asker::ONE).unwrap();
        assert_eq!(g.amounts[1], 150.0);
        assert!(b.take(0, &[1.0, 150.0, 0.0, 0.0], l, Asker::ONE).is_err(), "50 tokens left, 150 needed");
    }

    #[test]
    fn input_and_output_limits_are_separate() {
        let l = Limits { rpm: 600.0, input_tpm: 6_000.0, output_tpm: 600.0, ..Default::default() };
        let mut b = Bucket::full(0, l);
        // 20 output tokens of burst (0.2 s of 100/s): a call with max 30 output waits.
        let g = b.take(0, &[1.0, 0.0, 10.0, 15.0], l, Asker::ONE).unwrap();
        assert_eq!(g.amounts[3], 15.0);
        assert!(b.take(0, &[1.0, 0.0, 10.0, 15.0], l, Asker::ONE).is_err());
    }
}
