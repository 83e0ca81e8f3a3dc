//! The watchdog: says what every task waits on when a worker holds chunks but makes no progress, and samples the database pool.
//!
//! Each wait of an item's way to its answer (a call permit, a slot in the
//! cluster's window, the audit trail, the rate limit, the call itself, a
//! back-off) is counted while it lasts, and every finished call or committed
//! write counts as progress. A worker that holds chunks, has no call in
//! flight and has made no progress for [`WorkerConfig::stall_warn_s`]
//! seconds logs those counts with the pool's state, once per stall: the
//! stall a user would otherwise see only as a job that stopped moving.
//!
//! Every second the watchdog also times taking a connection from the pool
//! (`sluice_db_acquire_seconds`) and exports the connections in use, so a
//! pool too small for the work shows before it stalls anything.
//!
//! [`WorkerConfig::stall_warn_s`]: crate::WorkerConfig::stall_warn_s

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::metrics;

/// What a task of the worker can be waiting on; its value indexes [`WAITS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// One of the worker's `SLUICE_CONCURRENCY` call permits.
    CallPermit,
    /// A slot in the cluster-wide window of calls in flight.
    Window,
    /// The commit of its call's row in the audit trail.
    Audit,
    /// Budget under the cluster-wide rate limit.
    RateLimit,
    /// The model's answer.
    Call,
    /// A back-off or a provider's pause before retrying.
    Backoff,
    /// A chunk's results being written.
    Write,
}

/// The waits' names in the log, in [`Wait`]'s order.
const WAITS: [&str; 7] = ["call_permit", "window", "audit", "rate_limit", "call", "backoff", "write"];

/// One worker's counts of waits, chunks held and progress.
#[derive(Debug, Default)]
pub struct Watch {
    waiting: [AtomicI64; 7],
    chunks: AtomicI64,
    progress: AtomicU64,
}

/// Counts a wait while it lives.
#[must_use]
pub struct Waiting<'a>(&'a AtomicI64);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts a chunk held while it lives.
#[must_use]
pub struct Holding<'a>(&'a AtomicI64);

impl Drop for Holding<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Watch {
    fn slot(&self, w: Wait) -> &AtomicI64 {
        &self.waiting[w as usize]
    }

    /// Counts a wait of kind `w` until the guard is dropped.
    pub fn waiting(&self, w: Wait) -> Waiting<'_> {
        let slot = self.slot(w);
        slot.fetch_add(1, Ordering::Relaxed);
        Waiting(slot)
    }

    /// Counts a chunk held until the guard is dropped.
    pub fn holding(&self) -> Holding<'_> {
        self.chunks.fetch_add(1, Ordering::Relaxed);
        Holding(&self.chunks)
    }

    /// A call finished or a write committed.
    pub fn progressed(&self) {
        self.progress.fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            chunks: self.chunks.load(Ordering::Relaxed),
            calls: self.slot(Wait::Call).load(Ordering::Relaxed),
            progress: self.progress.load(Ordering::Relaxed),
        }
    }

    /// The waits, as `name=count` pairs, for the log.
    fn describe(&self) -> String {
        WAITS
            .iter()
            .zip(&self.waiting)
            .map(|(name, n)| format!("{name}={}", n.load(Ordering::Relaxed)))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// What the watchdog looks at each turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Snapshot {
    chunks: i64,
    calls: i64,
    progress: u64,
}

/// Whether the worker is stalled: it holds chunks, has no call in flight,
/// and nothing progressed for at least `after` since `last_progress`.
fn stalled(now: Snapshot, since_progress: Duration, after: Duration) -> bool {
    now.chunks > 0 && now.calls == 0 && since_progress >= after
}

/// How often the watchdog looks, and samples the pool.
const EVERY: Duration = Duration::from_secs(1);

/// Runs until `stop`: samples the pool every second and warns, once per
/// stall, when [`stalled`] holds for `after`.
pub async fn run(watch: std::sync::Arc<Watch>, pool: PgPool, after: Duration, stop: CancellationToken) {
    let mut last = watch.snapshot();
    let mut moved_at = Instant::now();
    let mut warned = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(EVERY) => {}
        }
        let t = Instant::now();
        let acquired = tokio::time::timeout(EVERY, pool.acquire()).await;
        metrics::db_acquire(t.elapsed(), pool.size(), pool.num_idle());
        drop(acquired);
        let now = watch.snapshot();
        if now.progress != last.progress || now.calls > 0 || now.chunks == 0 {
            moved_at = Instant::now();
            warned = false;
        }
        last = now;
        if !warned && stalled(now, moved_at.elapsed(), after) {
            warned = true;
            tracing::warn!(
                chunks = now.chunks,
                waiting = %watch.describe(),
                db_connections = pool.size(),
                db_idle = pool.num_idle(),
                "no progress for {} s while holding chunks with no model call in flight; tasks are waiting as listed",
                moved_at.elapsed().as_secs()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stalled_only_holding_chunks_with_no_call_and_no_progress() {
        let s = |chunks, calls| Snapshot { chunks, calls, progress: 0 };
        let (after, long, short) = (Duration::from_secs(60), Duration::from_secs(61), Duration::from_secs(5));
        for (snapshot, since, want) in
            [(s(2, 0), long, true), (s(2, 0), short, false), (s(2, 1), long, false), (s(0, 0), long, false)]
        {
            assert_eq!(stalled(snapshot, since, after), want, "{snapshot:?} after {since:?}");
        }
    }

    #[test]
    fn a_wait_is_counted_while_its_guard_lives() {
        let w = Watch::default();
        {
            let _a = w.waiting(Wait::Audit);
            let _b = w.waiting(Wait::Audit);
            let _c = w.waiting(Wait::Call);
            assert!(w.describe().contains("audit=2"), "{}", w.describe());
            assert_eq!(w.snapshot().calls, 1);
        }
        assert!(w.describe().contains("audit=0"));
        assert_eq!(w.snapshot().calls, 0);
    }
}
