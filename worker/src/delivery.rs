//! Whether a chunk delivery is still the one to work on: its job running and the chunk not published again since.
//!
//! A job can be cancelled and resumed (or a chunk reopened by the reconciler)
//! while a worker still holds an older delivery of one of its chunks, with
//! items waiting for a call slot or backing off after a provider error. Their
//! calls must not be made: the newer delivery makes them, and both would be
//! answered and paid for. [`Delivery`] cancels its token as soon as it sees
//! the delivery is stale: checked every [`CHECK_EVERY`] while the chunk is
//! held, and right before every retry (the moment a provider outage ends is
//! when a cancelled-and-resumed job's old retries would all fire).
//!
//! The items of a chunk that a burst of 429s sent to sleep together ask
//! together when they wake: one query answers all who asked before it
//! started, and it runs as a task of its own, so an item that stops being
//! polled never holds one of the worker's few database connections.

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::state::JobState;
use common::wire::ChunkMsg;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::store;

/// How often a held delivery is checked without a retry asking.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);

/// One delivery of a chunk, and the token its items stop on.
pub struct Delivery {
    pool: PgPool,
    chunk: ChunkMsg,
    stop: CancellationToken,
    /// The last answer, and when the query that gave it started.
    last: tokio::sync::Mutex<Option<(Instant, bool)>>,
}

impl Delivery {
    /// Starts watching `chunk`; the token is a child of `shutdown`, so it is
    /// also cancelled when the worker stops.
    pub fn watch(pool: PgPool, chunk: ChunkMsg, shutdown: &CancellationToken) -> Arc<Self> {
        let delivery = Arc::new(Delivery { pool, chunk, stop: shutdown.child_token(), last: Default::default() });
        // The watch ends with the delivery: when the chunk's work drops it.
        let (watched, stop) = (Arc::downgrade(&delivery), delivery.stop.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(CHECK_EVERY) => {}
                }
                let Some(delivery) = watched.upgrade() else { return };
                if !delivery.is_current().await {
                    return;
                }
            }
        });
        delivery
    }

    /// Cancelled when the worker shuts down or the delivery is stale: items
    /// not yet under way are held back and the chunk's finished results written.
    pub fn stop(&self) -> &CancellationToken {
        &self.stop
    }

    /// Asks Postgres whether the job is still running and the chunk still
    /// at this delivery's generation; if not, cancels the token. When
    /// Postgres cannot answer, the delivery is taken as current (the audit
    /// writer holds calls back while the database is away).
    pub async fn is_current(&self) -> bool {
        if self.stop.is_cancelled() {
            return false;
        }
        let asked = Instant::now();
        let mut last = self.last.lock().await;
        if let Some((at, current)) = *last {
            if at >= asked {
                return current && !self.stop.is_cancelled();
            }
        }
        let started = Instant::now();
        let (pool, chunk) = (self.pool.clone(), self.chunk);
        let state = tokio::spawn(async move { store::chunk_state(&pool, &chunk).await }).await;
        let current = match state {
            Ok(Ok(Some(s))) => s.job == JobState::Running && s.generation == self.chunk.generation,
            Ok(Ok(None)) => false,
            Ok(Err(_)) | Err(_) => true,
        };
        *last = Some((started, current));
        if !current {
            tracing::debug!(job_id = %self.chunk.job_id, chunk = self.chunk.chunk_no, "delivery is stale: its calls stop");
            self.stop.cancel();
        }
        current
    }
}
