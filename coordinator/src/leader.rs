//! Leader election among coordinator replicas: a lease in a NATS key-value bucket decides which one runs the publisher and the reconciler.
//!
//! Every replica serves the API; exactly one at a time publishes chunks and
//! reconciles. The lease is the key [`KEY`] of the bucket
//! [`common::nats::LEADER_BUCKET`], whose entries expire [`LEASE_TTL`] after
//! they were written. A replica becomes the leader by creating the key (which
//! succeeds only when it is absent, deleted or expired) and stays the leader
//! by rewriting it every [`RENEW_EVERY`] with compare-and-set on its
//! revision. It steps down, stopping its publisher and reconciler, when a
//! renewal is refused (another holds the key) or when it could not renew for
//! [`LEASE_TTL`] minus [`RENEW_EVERY`]: before the key can expire on the
//! server and another replica take it. A replica that shuts down deletes its
//! lease, so another takes over at its next try instead of after the TTL.
//!
//! A leader killed outright is replaced once its lease expires: within
//! `LEASE_TTL + RENEW_EVERY` (tests/tests/leader.rs). A leader frozen (a
//! stopped process, a paused VM) may wake after its lease expired and its
//! successor took over, with its timers all due at once: it acts on nothing
//! then. The lease is known valid only until one renewal before it could
//! expire, on the monotonic clock, which runs on while the process is
//! frozen; [`Status::is_leader`] says false past that instant, and the
//! publisher asks it before every round. Two leaders never act
//! at once on the same lease; even if they did, chunk messages carry a
//! `Nats-Msg-Id` that JetStream deduplicates, and workers skip chunks that
//! Postgres says are done or republished.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use tokio_util::sync::CancellationToken;

use crate::metrics as m;

/// The lease's key in the bucket.
pub const KEY: &str = "coordinator";
/// How long a lease lasts unless renewed.
pub const LEASE_TTL: Duration = Duration::from_secs(5);
/// How often the leader renews its lease, and a follower tries to take it.
pub const RENEW_EVERY: Duration = Duration::from_secs(1);
/// A leader's publisher that has not finished a turn for this long is stuck.
pub const PUBLISHER_STALE: Duration = Duration::from_secs(10);

/// What this replica knows about its part: for `/readyz`, the metrics and the logs.
#[derive(Debug)]
pub struct Status {
    /// This replica's name in the lease (host, process and a random part).
    pub holder: String,
    leading: AtomicBool,
    /// Until when the lease is known to be this replica's.
    valid_until: Mutex<Option<Instant>>,
    /// When the publisher last finished a turn, if it runs here.
    publisher_turn: Mutex<Option<Instant>>,
}

impl Status {
    pub fn new() -> Self {
        let host = std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()).unwrap_or_else(|| "coordinator".into());
        let holder = format!("{host}-{}-{}", std::process::id(), &uuid::Uuid::new_v4().simple().to_string()[..8]);
        Status {
            holder,
            leading: AtomicBool::new(false),
            valid_until: Mutex::new(None),
            publisher_turn: Mutex::new(None),
        }
    }

    /// Whether this replica holds the lease now: it won it, and the last
    /// renewal still holds. False as soon as a renewal is overdue, before the
    /// campaign notices and steps down.
    pub fn is_leader(&self) -> bool {
        self.leading.load(Ordering::SeqCst)
            && self.valid_until.lock().expect("lease lock").is_some_and(|t| Instant::now() < t)
    }

    fn renewed(&self, valid_until: Instant) {
        *self.valid_until.lock().expect("lease lock") = Some(valid_until);
    }

    /// Called by the publisher after every turn, successful or not.
    pub fn publisher_turned(&self) {
        *self.publisher_turn.lock().expect("publisher turn lock") = Some(Instant::now());
    }

    /// Whether the publisher finished a turn within [`PUBLISHER_STALE`].
    pub fn publisher_running(&self) -> bool {
        self.publisher_turn.lock().expect("publisher turn lock").is_some_and(|t| t.elapsed() < PUBLISHER_STALE)
    }

    fn set_leader(&self, leading: bool) {
        self.leading.store(leading, Ordering::SeqCst);
        if !leading {
            *self.publisher_turn.lock().expect("publisher turn lock") = None;
            *self.valid_until.lock().expect("lease lock") = None;
        }
        metrics::gauge!(m::LEADER).set(if leading { 1.0 } else { 0.0 });
    }
}

impl Default for Status {
    fn default() -> Self {
        Self::new()
    }
}

/// Campaigns for the lease until `shutdown`; while this replica holds it,
/// `lead` runs with a token cancelled when leadership ends, and its tasks are
/// awaited before another campaign.
///
/// NATS may come back without the bucket (a new volume): a failed campaign
/// declares it again before the next try.
pub async fn run<F>(
    js: async_nats::jetstream::Context,
    mut kv: kv::Store,
    status: Arc<Status>,
    lead: F,
    shutdown: CancellationToken,
) where
    F: Fn(CancellationToken) -> Vec<tokio::task::JoinHandle<()>>,
{
    let mut health = common::telemetry::Health::default();
    status.set_leader(false);
    loop {
        let revision = match kv.create(KEY, status.holder.clone().into()).await {
            Ok(revision) => {
                health.ok("campaigning for the coordinator lease");
                revision
            }
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                health.ok("campaigning for the coordinator lease");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(RENEW_EVERY) => continue,
                }
            }
            Err(e) => {
                health.failed("campaigning for the coordinator lease", &e);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(RENEW_EVERY) => {}
                }
                if let Ok(store) = common::nats::ensure_leader_bucket(&js, LEASE_TTL).await {
                    kv = store;
                }
                continue;
            }
        };
        let held_since = Instant::now();
        status.renewed(held_since + LEASE_TTL - RENEW_EVERY);
        tracing::info!(holder = %status.holder, "this coordinator is the leader: it publishes chunks and reconciles");
        status.set_leader(true);
        let leading = shutdown.child_token();
        let tasks = lead(leading.clone());
        let end = hold(&kv, &status, revision, held_since, &shutdown).await;
        leading.cancel();
        for task in tasks {
            let _ = task.await;
        }
        status.set_leader(false);
        match end {
            Held::Shutdown(revision) => {
                // Let another replica take over at its next try.
                let _ = kv.delete_expect_revision(KEY, Some(revision)).await;
                tracing::info!("leadership released on shutdown");
                return;
            }
            Held::Lost(why) => {
                tracing::warn!(reason = %why, "this coordinator is no longer the leader");
            }
        }
    }
}

/// How holding the lease ended.
enum Held {
    /// The replica stops; the lease's last revision, to delete it.
    Shutdown(u64),
    /// The lease is someone else's, or could not be renewed in time.
    Lost(String),
}

/// Renews the lease every [`RENEW_EVERY`] until shutdown or until it is lost.
async fn hold(
    kv: &kv::Store,
    status: &Status,
    mut revision: u64,
    since: Instant,
    shutdown: &CancellationToken,
) -> Held {
    let holder = &status.holder;
    // The lease is known valid until `LEASE_TTL` after the write that
    // renewed it was sent; stepping down one renewal earlier leaves room
    // for clocks and the server's expiry timer.
    let mut valid_until = since + LEASE_TTL - RENEW_EVERY;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Held::Shutdown(revision),
            _ = tokio::time::sleep(RENEW_EVERY) => {}
        }
        if Instant::now() >= valid_until {
            // Woken past the lease's end (the process was frozen): another
            // replica may hold it by now.
            return Held::Lost("the lease ran out while this coordinator was not running".into());
        }
        let sent = Instant::now();
        let renewed =
            tokio::time::timeout_at(valid_until.into(), kv.update(KEY, holder.to_string().into(), revision)).await;
        match renewed {
            Ok(Ok(r)) => {
                revision = r;
                valid_until = sent + LEASE_TTL - RENEW_EVERY;
                status.renewed(valid_until);
            }
            Ok(Err(e)) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                return Held::Lost("another coordinator holds the lease".into());
            }
            Ok(Err(e)) if Instant::now() >= valid_until => {
                return Held::Lost(format!("the lease could not be renewed in time: {}", common::error_chain(&e)));
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %common::error_chain(&e), "lease renewal failed; trying again");
            }
            Err(_) => return Held::Lost("the lease could not be renewed in time (NATS did not answer)".into()),
        }
    }
}
