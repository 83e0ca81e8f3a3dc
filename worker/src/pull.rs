//! The pull loop: fetch only as many chunks as there are free slots, work on each, ack after the Postgres commit.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::PullConsumer, AckKind, Message};
use common::wire::ChunkMsg;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use sqlx::PgPool;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::endpoints::Endpoints;
use crate::guard::Guards;
use crate::jobs::{CompiledJob, JobCache};
use crate::learned::Learned;
use crate::process::{run_item, ItemContext, Outcome, RetryPolicy};
use crate::store::ItemResult;
use crate::{metrics, store, Error, WorkerConfig};

/// How long a pull request waits for chunks before it is asked again. A
/// waiting request costs nothing until a chunk comes, which it gets at once
/// (the coordinator publishes for the requests it sees waiting); asking again
/// every second cost 64 idle workers 64 NATS requests a second, a fifth of
/// a job's traffic at 20,000 calls a minute (`scripts/bench scale
/// --workers 64`).
const PULL_EXPIRES: Duration = Duration::from_secs(5);

mod batch;
mod stages;

/// State shared by the tasks of one worker.
struct Shared {
    pool: PgPool,
    endpoints: Endpoints,
    guards: Guards,
    learned: Learned,
    prices: common::prices::PriceTable,
    redaction: common::redact::Redaction,
    jobs: JobCache,
    /// Bounds model calls in flight across all chunks this worker holds,
    /// handing freed permits to jobs in turn.
    calls: crate::fair::FairSemaphore,
    audit: crate::audit::Audit,
    policy: RetryPolicy,
    ack_wait: Duration,
    heartbeat: bool,
    max_deliveries: i64,
    name: String,
    /// Chunks held, by job.
    held: std::sync::Mutex<std::collections::HashMap<uuid::Uuid, usize>>,
    /// What the worker's tasks wait on, for the watchdog.
    watch: Arc<crate::watchdog::Watch>,
}

/// A worker connected to Postgres and NATS, its stream and consumer
/// declared, ready to run.
pub struct Worker {
    shared: Arc<Shared>,
    topology: Topology,
    consumer: PullConsumer,
    slots: usize,
    grace: Duration,
    stall_warn: Duration,
}

impl Worker {
    /// Resolves the configuration (keys, providers, prices), connects to
    /// Postgres and NATS and declares the stream, consumer and state bucket.
    /// Every failure names what it tried.
    pub async fn connect(config: WorkerConfig) -> Result<Self, Error> {
        let config = config.resolve()?;
        metrics::describe();
        let pool = common::db::connect(&config.database_url, config.db_pool_size).await?;
        common::db::check_slots(&pool, &config.database_url, config.db_pool_size, "worker").await;
        let nats = common::nats::connect(&config.nats_url, &config.nats_auth).await?;
        let js = jetstream::new(nats);
        let ack_wait = Duration::from_secs(config.ack_wait_s);
        let topology = Topology { js, url: config.nats_url.clone(), ack_wait };
        let (consumer, state) = topology.declare().await?;
        let endpoints = config.endpoints()?;
        common::telemetry::set_readiness(readiness(pool.clone(), topology.js.client()));
        let name = config.name.clone().unwrap_or_default();
        tracing::info!(worker = %name, models = %endpoints.describe(), concurrency = config.concurrency, "worker started");
        let shared = Arc::new(Shared {
            pool: pool.clone(),
            endpoints,
            guards: Guards::new(state.clone(), config.guards()),
            learned: Learned::new(state),
            prices: config.prices()?,
            redaction: config.redaction()?,
            jobs: JobCache::default(),
            audit: crate::audit::Audit::start(pool.clone(), name.clone()),
            calls: crate::fair::FairSemaphore::new(config.concurrency),
            policy: RetryPolicy {
                max_attempts: config.max_attempts,
                base: Duration::from_millis(config.retry_base_ms),
                max_rate_limited: config.max_rate_limited,
                max_repairs: config.max_repairs,
            },
            ack_wait,
            heartbeat: config.heartbeat,
            max_deliveries: config.max_deliveries,
            name,
            held: Default::default(),
            watch: Default::default(),
        });
        Ok(Worker {
            shared,
            topology,
            consumer,
            // Slots are sized for the default chunk size; a job with larger
            // chunks simply keeps fewer of them in hand.
            slots: config.chunk_slots(100),
            grace: Duration::from_secs(config.shutdown_grace_s),
            stall_warn: Duration::from_secs(config.stall_warn_s),
        })
    }

    /// Runs until `shutdown` is cancelled. Then no new chunk is fetched and
    /// no new call starts; calls under way finish within the grace period,
    /// their results are written, and the chunks are handed back (Nak) so
    /// another worker does the rest. Chunks not written by then are
    /// redelivered after ack_wait.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        let Worker { shared, topology, consumer, slots, grace, stall_warn } = self;
        let slots = Arc::new(Semaphore::new(slots));
        tokio::spawn(crate::watchdog::run(shared.watch.clone(), shared.pool.clone(), stall_warn, shutdown.clone()));
        let tracker = TaskTracker::new();
        tokio::spawn(newcomer_slots(shared.clone(), slots.clone(), shutdown.clone()));
        let result = pull_loop(&topology, consumer, &shared, &slots, &tracker, &shutdown).await;
        tracker.close();
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            tracing::warn!("in-flight chunks did not finish within the grace period; JetStream will redeliver them");
        }
        if tokio::time::timeout(Duration::from_secs(5), shared.audit.flush()).await.is_err() {
            tracing::warn!("the last attempts could not be written to the audit trail (Postgres unreachable)");
        }
        tracing::info!(worker = %shared.name, "worker stopped");
        result
    }
}

/// How often a worker looks for running jobs it holds no chunk of.
const NEWCOMERS_EVERY: Duration = Duration::from_secs(1);

/// Gives the worker one more chunk slot for each running job it holds no
/// chunk of (at most [`MAX_NEWCOMER_SLOTS`]). All its slots may be taken by a
/// big job whose chunks last many seconds on a rate-limited model; the
/// publisher gives the next chunk to the job with the fewest in the stream,
/// so the extra slot takes the new job's chunk at once rather than when one
/// of the big job's chunks is finished.
async fn newcomer_slots(shared: Arc<Shared>, slots: Arc<Semaphore>, stop: CancellationToken) {
    let mut extra = 0usize;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(NEWCOMERS_EVERY) => {}
        }
        let Ok(running) = store::running_jobs(&shared.pool).await else { continue };
        let held = shared.held.lock().expect("held lock").len();
        let want = running.saturating_sub(held).min(MAX_NEWCOMER_SLOTS);
        if want > extra {
            slots.add_permits(want - extra);
            extra = want;
        } else if want < extra {
            // Slots in use are given up as they come back.
            extra -= slots.forget_permits(extra - want);
        }
    }
}

/// Most extra slots a worker opens for jobs it holds no chunk of.
const MAX_NEWCOMER_SLOTS: usize = 2;

/// What a worker needs of JetStream: the chunk stream, its consumer and the
/// shared state bucket. Declared at start and again whenever fetching fails,
/// so a NATS server that comes back with an empty store is set up anew
/// without restarting anything.
struct Topology {
    js: jetstream::Context,
    url: String,
    ack_wait: Duration,
}

impl Topology {
    async fn declare(&self) -> Result<(PullConsumer, async_nats::jetstream::kv::Store), Error> {
        let stream = common::nats::ensure_stream(&self.js, &self.url).await?;
        let consumer = common::nats::ensure_consumer(&stream, self.ack_wait).await?;
        let state = common::nats::ensure_state_bucket(&self.js).await?;
        Ok((consumer, state))
    }
}

/// Waits before the next fetch after a failed one: 250 ms, doubling to 4 s.
fn fetch_backoff(failures: u32) -> Duration {
    Duration::from_millis(250 << failures.min(4))
}

async fn pull_loop(
    topology: &Topology,
    mut consumer: PullConsumer,
    shared: &Arc<Shared>,
    slots: &Arc<Semaphore>,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) -> Result<(), Error> {
    let mut failures = 0u32;
    let mut health = common::telemetry::Health::default();
    loop {
        if failures > 0 {
            // Fetching failed: wait, then declare everything again (a no-op
            // when it all still exists).
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(fetch_backoff(failures)) => {}
            }
            match topology.declare().await {
                Ok((c, _)) => consumer = c,
                Err(e) => {
                    health.failed("declaring the chunk stream and consumer", &e);
                    failures += 1;
                    continue;
                }
            }
        }
        // Wait for a free slot, then take every other free one: the fetch asks
        // for exactly that many messages, so nothing waits unacked in a buffer.
        let first = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            p = slots.clone().acquire_owned() => p.expect("semaphore never closed"),
        };
        let mut permits = vec![first];
        while let Ok(p) = slots.clone().try_acquire_owned() {
            permits.push(p);
        }
        let batch = consumer.batch().max_messages(permits.len()).expires(PULL_EXPIRES).messages().await;
        let mut batch = match batch {
            Ok(b) => b,
            Err(e) => {
                failures += 1;
                health.failed("fetching chunks", &e);
                continue;
            }
        };
        let mut fetched = true;
        loop {
            let next = tokio::select! {
                // Messages already delivered but not started are redelivered after ack_wait.
                _ = shutdown.cancelled() => return Ok(()),
                m = batch.next() => m,
            };
            match next {
                None => break,
                Some(Err(e)) => {
                    // The consumer or stream is gone, NATS is away, ...
                    fetched = false;
                    failures += 1;
                    health.failed("fetching chunks", &*e);
                    break;
                }
                Some(Ok(msg)) => {
                    let permit = permits.pop().expect("never more messages than permits");
                    let shared = shared.clone();
                    tracker.spawn(handle(shared, msg, permit, shutdown.clone()));
                }
            }
        }
        if fetched {
            failures = 0;
            health.ok("fetching chunks");
        }
    }
}

/// The worker's readiness for `/readyz` on its metrics address: Postgres
/// answers and the NATS connection is up.
fn readiness(pool: PgPool, nats: async_nats::Client) -> common::telemetry::ReadinessCheck {
    std::sync::Arc::new(move || {
        let (pool, nats) = (pool.clone(), nats.clone());
        Box::pin(async move {
            let (postgres, nats) = common::telemetry::dependencies(&pool, &nats).await;
            let ready = postgres == "ok" && nats == "ok";
            (ready, serde_json::json!({"ready": ready, "postgres": postgres, "nats": nats}))
        })
    })
}

/// Works on one chunk message, holding its slot until done.
async fn handle(shared: Arc<Shared>, msg: Message, _slot: OwnedSemaphorePermit, stop: CancellationToken) {
    let chunk: ChunkMsg = match serde_json::from_slice(&msg.payload) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, subject = %msg.subject, "undecodable chunk message; terminating it");
            let _ = msg.ack_with(AckKind::Term).await;
            return;
        }
    };
    // Tell JetStream the chunk is being worked on, well within ack_wait, so a
    // slow chunk is not handed to another worker.
    let heartbeat = shared.heartbeat.then(|| {
        let msg_ack = msg.clone();
        let every = shared.ack_wait / 3;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                if msg_ack.ack_with(AckKind::Progress).await.is_err() {
                    return;
                }
            }
        })
    });
    let delivered = msg.info().map(|i| i.delivered).unwrap_or(1);
    *shared.held.lock().expect("held lock").entry(chunk.job_id).or_default() += 1;
    let held = crate::metrics::InFlight::start(crate::metrics::CHUNKS_IN_FLIGHT);
    let holding = shared.watch.holding();
    let outcome = work(&shared, &chunk, delivered, &stop).await;
    drop((held, holding));
    {
        let mut held = shared.held.lock().expect("held lock");
        if let Some(n) = held.get_mut(&chunk.job_id) {
            *n -= 1;
            if *n == 0 {
                held.remove(&chunk.job_id);
            }
        }
    }
    if let Some(h) = heartbeat {
        h.abort();
    }
    match outcome {
        Ok(ChunkOutcome::Finished) => {
            if let Err(e) = msg.ack().await {
                // The results are committed: a redelivery finds the chunk done.
                tracing::warn!(error = &*e as &dyn std::error::Error, job_id = %chunk.job_id, chunk = chunk.chunk_no, "ack failed");
            }
        }
        Ok(ChunkOutcome::Held(wait)) => {
            tracing::debug!(job_id = %chunk.job_id, chunk = chunk.chunk_no, ?wait, "chunk held back: circuit breaker open");
            let _ = msg.ack_with(AckKind::Nak(Some(wait.max(Duration::from_millis(500))))).await;
        }
        Err(err) => {
            tracing::warn!(error = &err as &dyn std::error::Error, job_id = %chunk.job_id, chunk = chunk.chunk_no, "chunk failed; it will be retried");
            let _ = msg.ack_with(AckKind::Nak(Some(Duration::from_secs(2)))).await;
        }
    }
}

/// Results are written when this many have gathered, or when the oldest
/// waited this long: a worker killed with SIGKILL repeats at most the calls
/// in flight and those of the last fraction of a second.
const COMMIT_ITEMS: usize = 100;
const COMMIT_EVERY: Duration = Duration::from_millis(100);

/// Writes results once their attempts are in the audit trail. While Postgres
/// cannot be reached this waits and tries again (the chunk stays this
/// worker's: its heartbeat goes on), so answers already paid for are not
/// thrown away; other errors, and shutdown, end it.
async fn save(
    shared: &Shared,
    chunk: &ChunkMsg,
    job: &CompiledJob,
    results: &[ItemResult],
    done: bool,
    stop: &CancellationToken,
) -> Result<(), Error> {
    // On shutdown the flush still gets a few seconds: the answers are paid for.
    let given_up = async {
        stop.cancelled().await;
        tokio::time::sleep(Duration::from_secs(5)).await;
    };
    tokio::select! {
        biased;
        r = shared.audit.flush() => r?,
        _ = given_up => return Err(Error::AuditStopped),
    }
    let mut wait = Duration::from_millis(100);
    loop {
        let target = store::Target {
            chunk,
            template_hash: &job.template_hash,
            project: &job.project,
            worker: &shared.name,
            copies: job.has_copies,
        };
        let writing = shared.watch.waiting(crate::watchdog::Wait::Write);
        let written = store::write_chunk(&shared.pool, &target, results, done).await;
        drop(writing);
        match written {
            Ok(()) => {
                shared.watch.progressed();
                return Ok(());
            }
            Err(e) if e.is_unavailable() && !stop.is_cancelled() => {
                tracing::debug!(error = &e as &dyn std::error::Error, "results not written yet; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.cancelled() => return Err(e),
                }
                wait = (wait * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Splits a chunk's items into answers from the response cache and the
/// items to call, each with its cache key and rendered prompt. A job that does not reuse
/// answers has no keys and no hits.
async fn from_cache(
    shared: &Shared,
    job: &CompiledJob,
    items: Vec<store::Item>,
) -> Result<(Vec<ItemResult>, Vec<(store::Item, Option<(String, String)>)>), Error> {
    let Some(base) = &job.reuse else {
        return Ok((Vec::new(), items.into_iter().map(|i| (i, None)).collect()));
    };
    let system = job.kind.spec.system.as_deref();
    // An item whose prompt cannot be rendered fails in run_item, without a key.
    let keyed: Vec<(store::Item, Option<(String, String)>)> = items
        .into_iter()
        .map(|item| {
            let key = job.prompt.render(&item.payload).ok().map(|p| {
                let key = base.key(&common::cache::prompt_digest(system, &p));
                (key, p)
            });
            (item, key)
        })
        .collect();
    let keys: Vec<String> = keyed.iter().filter_map(|(_, k)| k.as_ref().map(|(k, _)| k.clone())).collect();
    let found = store::cached(&shared.pool, &job.project, &keys, job.cache_ttl_s).await?;
    let mut found: HashMap<String, store::Cached> = found.into_iter().map(|c| (c.key.clone(), c)).collect();
    let provider = job.routes.as_ref().ok().and_then(|r| r.first()).map(|r| r.endpoint.name.clone());
    let (mut hits, mut rest) = (Vec::new(), Vec::new());
    for (item, key) in keyed {
        match key {
            Some((key, prompt)) => match found.remove(&key) {
                Some(c) => hits.push(cached_result(job, &item, c, key, &prompt, provider.clone(), shared.redaction)),
                // A key seen once per chunk: identical items are copies, never in a chunk.
                None => rest.push((item, Some((key, prompt)))),
            },
            None => rest.push((item, None)),
        }
    }
    if !hits.is_empty() {
        metrics::cache_hits(hits.len() as u64);
    }
    Ok((hits, rest))
}

/// The result of an item answered from the cache: the cached answer, judged
/// against this job's review threshold.
fn cached_result(
    job: &CompiledJob,
    item: &store::Item,
    c: store::Cached,
    key: String,
    prompt: &str,
    provider: Option<String>,
    redaction: common::redact::Redaction,
) -> ItemResult {
    let spec = &job.kind.spec;
    let mut r = ItemResult::pending(item);
    r.succeeded = true;
    r.needs_review = spec.scores_confidence() && c.confidence.is_none_or(|v| v < job.review_below);
    r.model = c.model;
    r.output = Some(c.output);
    r.answer = c.answer;
    r.confidence = c.confidence;
    r.confidence_detail = c.confidence_detail;
    r.source = "cache";
    r.answered_by = Some(c.call_id);
    r.cache_key = Some(key);
    r.reused = Some(Box::new(store::Reused {
        attempt: item.prior + 1,
        provider: provider.unwrap_or_default(),
        prompt: redaction.apply(prompt),
    }));
    r
}

/// What the items of a chunk delivery need from the worker.
fn item_context<'a>(
    shared: &'a Shared,
    chunk: &ChunkMsg,
    job: &'a CompiledJob,
    delivery: &'a crate::delivery::Delivery,
) -> ItemContext<'a> {
    ItemContext {
        job_id: chunk.job_id,
        project: &job.project,
        audit: &shared.audit,
        guards: &shared.guards,
        learned: &shared.learned,
        policy: shared.policy,
        stop: delivery.stop(),
        delivery,
        prices: &shared.prices,
        redaction: shared.redaction,
        pool: &shared.pool,
        stage: 0,
        watch: &shared.watch,
    }
}

/// How a chunk delivery ended.
enum ChunkOutcome {
    /// Its outcome is in Postgres (or there was nothing to do): ack.
    Finished,
    /// Some items were held back by an open breaker: redeliver after this long.
    Held(Duration),
}

/// Processes a chunk delivery. Results of finished items are written even
/// when others are held back, so a redelivery only redoes the rest.
async fn work(
    shared: &Arc<Shared>,
    chunk: &ChunkMsg,
    delivered: i64,
    stop: &CancellationToken,
) -> Result<ChunkOutcome, Error> {
    let Some(state) = store::chunk_state(&shared.pool, chunk).await? else {
        tracing::warn!(job_id = %chunk.job_id, chunk = chunk.chunk_no, "chunk unknown to Postgres; dropping the message");
        metrics::chunk("unknown", 0, 0);
        return Ok(ChunkOutcome::Finished);
    };
    if state.chunk == common::state::ChunkState::Done {
        metrics::chunk("duplicate", 0, 0);
        return Ok(ChunkOutcome::Finished);
    }
    if chunk.generation < state.generation {
        // The chunk was reopened and published again; that newer message does the work.
        metrics::chunk("stale", 0, 0);
        return Ok(ChunkOutcome::Finished);
    }
    if state.job != common::state::JobState::Running {
        if state.job == common::state::JobState::Cancelled {
            if let Some(job) = shared.jobs.get(&shared.pool, chunk.job_id, chunk.generation, &shared.endpoints).await? {
                if job.batch {
                    batch::abandon(shared, chunk, &job, "the job was cancelled").await?;
                }
            }
        }
        metrics::chunk("cancelled", 0, 0);
        return Ok(ChunkOutcome::Finished);
    }
    let Some(job) = shared.jobs.get(&shared.pool, chunk.job_id, chunk.generation, &shared.endpoints).await? else {
        return Ok(ChunkOutcome::Finished);
    };
    // A first delivery of a chunk never reopened has no earlier attempts to count.
    let items = store::items(&shared.pool, chunk, delivered > 1 || chunk.generation > 0).await?;
    // A batch-mode chunk comes back once per poll of its provider batch; its
    // rounds are bounded instead (see `batch`).
    if delivered > shared.max_deliveries && !job.batch {
        // Give up on this chunk rather than let its items vanish silently;
        // but an item waiting at a gate waits for a person, not for this
        // delivery: it stays held, and a decision publishes the chunk again.
        let waiting: std::collections::HashSet<i64> = if job.stages.is_empty() {
            Default::default()
        } else {
            stages::passed(shared, chunk).await?.into_iter().filter(|(_, p)| p.waiting).map(|(seq, _)| seq).collect()
        };
        let results: Vec<ItemResult> = items
            .iter()
            .filter(|item| !waiting.contains(&item.seq))
            .map(|item| {
                ItemResult::failed(
                    item,
                    common::provider::ErrorClass::RedeliveriesExhausted,
                    format!("chunk was delivered {delivered} times without finishing"),
                )
            })
            .collect();
        save(shared, chunk, &job, &results, true, stop).await?;
        metrics::chunk("exhausted", 0, results.len() as u64);
        common::db::complete_if_done(&shared.pool, chunk.job_id).await?;
        return Ok(ChunkOutcome::Finished);
    }
    // Items whose request the response cache answers are done without a call.
    let (hits, items) = from_cache(shared, &job, items).await?;
    let (hits, items) = if job.batch {
        match batch::work(shared, chunk, &job, hits, items, stop).await? {
            batch::Step::Done(outcome) => return Ok(outcome),
            batch::Step::Live(done, items) => (done, items),
        }
    } else {
        (hits, items)
    };
    // Every item is started at once; the shared call semaphore decides how
    // many actually talk to the model. Results are written as they come, in
    // small batches, so a worker that dies costs few repeated calls. Items
    // stop on the delivery's token: shutdown, or the delivery gone stale.
    let delivery = crate::delivery::Delivery::watch(shared.pool.clone(), *chunk, stop);
    // A multi-stage item's accepted answers before its last stage come here,
    // to be written with the chunk's results.
    let (stage_tx, mut stage_rx) = tokio::sync::mpsc::unbounded_channel::<ItemResult>();
    let mut passed = if job.stages.is_empty() { HashMap::new() } else { stages::passed(shared, chunk).await? };
    // Items waiting at a gate have nothing to do until a reviewer decides.
    let items: Vec<_> =
        items.into_iter().filter(|(item, _)| !passed.get(&item.seq).is_some_and(|p| p.waiting)).collect();
    let mut running: FuturesUnordered<_> = items
        .into_iter()
        .map(|(item, key)| {
            let shared = shared.clone();
            let job = job.clone();
            let delivery = &delivery;
            let stage_tx = stage_tx.clone();
            let passed = passed.remove(&item.seq).unwrap_or_default();
            async move {
                if !job.stages.is_empty() {
                    return stages::run(&shared, chunk, &job, delivery, item, passed, &stage_tx).await;
                }
                let waiting = shared.watch.waiting(crate::watchdog::Wait::CallPermit);
                let _call = tokio::select! {
                    permit = shared.calls.acquire(&job.project, chunk.job_id) => permit,
                    _ = delivery.stop().cancelled() => return Ok(Outcome::Held(Duration::ZERO)),
                };
                drop(waiting);
                let ctx = item_context(&shared, chunk, &job, delivery);
                let (key, prompt) = key.unzip();
                let mut outcome = run_item(&ctx, &job, &item, prompt).await;
                if let Ok(Outcome::Done(r)) = &mut outcome {
                    r.cache_key = key;
                }
                outcome
            }
        })
        .collect();
    drop(stage_tx);
    let mut batch: Vec<ItemResult> = hits;
    let mut held: Option<Duration> = None;
    let mut failure = None;
    let (mut ok, mut written) = (0u64, 0u64);
    let mut last_write = Instant::now();
    // A write of the answers so far runs as a task of its own while this loop
    // goes on polling the items: an item between two awaits of a query holds
    // a pooled connection, and a write that waited for a connection while
    // the items holding them were not polled would wait for ever.
    let mut writing: Option<tokio::task::JoinHandle<Result<(u64, u64), Error>>> = None;
    loop {
        // Answers are written at most COMMIT_EVERY after they come, even
        // while the chunk's other items wait out a provider's back-off: an
        // answer kept in memory is lost to a crash, and a resumed job's new
        // delivery would call its item again.
        let flush_at = tokio::time::Instant::from_std(last_write + COMMIT_EVERY);
        tokio::select! {
            o = running.next() => match o {
                Some(Ok(Outcome::Done(r))) => batch.push(*r),
                Some(Ok(Outcome::Held(d))) => held = Some(held.map_or(d, |h| h.min(d))),
                Some(Err(e)) => failure = Some(e),
                None => break,
            },
            Some(r) = stage_rx.recv() => batch.push(r),
            w = async { writing.as_mut().expect("guarded").await }, if writing.is_some() => {
                writing = None;
                let (o, w) = w.map_err(|source| Error::Task { doing: "writing a chunk's results", source })??;
                (ok, written) = (ok + o, written + w);
            }
            _ = tokio::time::sleep_until(flush_at), if !batch.is_empty() && writing.is_none() => {}
        }
        let due = batch.len() >= COMMIT_ITEMS || last_write.elapsed() >= COMMIT_EVERY;
        if due && !batch.is_empty() && !running.is_empty() && writing.is_none() {
            let (shared, chunk, job, stop) = (shared.clone(), *chunk, job.clone(), stop.clone());
            let results = std::mem::take(&mut batch);
            writing = Some(tokio::spawn(async move {
                save(&shared, &chunk, &job, &results, false, &stop).await?;
                Ok(tally(&results))
            }));
            last_write = Instant::now();
        }
    }
    if let Some(w) = writing {
        let (o, w) = w.await.map_err(|source| Error::Task { doing: "writing a chunk's results", source })??;
        (ok, written) = (ok + o, written + w);
    }
    // Every item's future has ended, so every stage answer has been sent.
    while let Ok(r) = stage_rx.try_recv() {
        batch.push(r);
    }
    let finished = held.is_none() && failure.is_none();
    save(shared, chunk, &job, &batch, finished, stop).await?;
    let (o, w) = tally(&batch);
    (ok, written) = (ok + o, written + w);
    metrics::chunk(if finished { "written" } else { "partial" }, ok, written - ok);
    if let Some(e) = failure {
        return Err(e);
    }
    if let Some(wait) = held {
        return Ok(ChunkOutcome::Held(wait));
    }
    if common::db::complete_if_done(&shared.pool, chunk.job_id).await? {
        tracing::info!(job_id = %chunk.job_id, "job completed");
    }
    Ok(ChunkOutcome::Finished)
}

/// Items succeeded and written among `results`: the answers of stages
/// before the last are not items' results and are not counted.
fn tally(results: &[ItemResult]) -> (u64, u64) {
    let items = results.iter().filter(|r| !r.goes_on);
    (items.clone().filter(|r| r.succeeded).count() as u64, items.count() as u64)
}
