//! Publishes chunk messages to JetStream, deduplicated by `Nats-Msg-Id`, keeping no more work queued than workers take in about a second.
//!
//! Workers receive chunks in stream order, so whatever is queued when a job
//! is submitted runs before it. The publisher therefore keeps the queue short
//! and shares it out:
//!
//! - **How much is queued.** The stream's count of acked messages gives the pace at
//!   which workers finish chunks ([`Pace`]); the publisher keeps about
//!   `SLUICE_QUEUE_AHEAD_MS` of work at that pace undelivered, plus one chunk
//!   for every worker's pull request that is waiting. On a model limited to 20
//!   requests a second that is no chunk at all beyond what the workers ask
//!   for; on an unlimited one it is as many as the workers get through in that
//!   time. A new job's first chunk therefore waits behind at most that much
//!   work, plus what the workers already hold.
//! - **Whose chunks.** Each chunk published goes to the project with the
//!   fewest messages in the stream, and in it to the running job with the
//!   fewest, the oldest on a tie ([`share`]), so projects interleave and
//!   each gets an equal part of the workers and the rate limit, shared
//!   equally among its jobs.
//!
//! One stream request (messages per subject), one consumer request and one
//! query make a turn when nothing needs publishing.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, message::PublishMessage};
use futures::future::try_join_all;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use common::nats::NatsError;
use common::wire::ChunkMsg;

use crate::store;
use crate::{metrics as m, Error};

/// How many publishes may await their acks at once.
const WINDOW: usize = 512;

/// Publishes `chunks` (in this order, of any jobs) and records them as
/// published in Postgres. `cause` labels the metric.
pub async fn publish_chunks(
    js: &jetstream::Context,
    pool: &PgPool,
    chunks: &[ChunkMsg],
    cause: &'static str,
) -> Result<(), Error> {
    for window in chunks.chunks(WINDOW) {
        let mut acks = Vec::with_capacity(window.len());
        for c in window {
            let payload = serde_json::to_vec(c).expect("chunk message serialises");
            let publish = PublishMessage::build().payload(payload.into()).message_id(c.msg_id());
            let ack = js
                .send_publish(common::wire::chunk_subject(c.job_id), publish)
                .await
                .map_err(|e| publish_error(c, e))?;
            acks.push(async move { ack.await.map_err(|e| publish_error(c, e)) });
        }
        try_join_all(acks).await?;
        let mut by_job: HashMap<Uuid, Vec<i32>> = HashMap::new();
        for c in window {
            by_job.entry(c.job_id).or_default().push(c.chunk_no);
        }
        for (job_id, nos) in by_job {
            store::mark_published(pool, job_id, &nos).await?;
        }
        metrics::counter!(m::CHUNKS_PUBLISHED, "cause" => cause).increment(window.len() as u64);
    }
    Ok(())
}

/// Follows the chunk stream. JetStream may lose it (a new volume, a purge,
/// disaster recovery): it is declared again when missing, and when the stream
/// turns out to be a new one (created by this process or by a worker), every
/// message that was in the old one is lost, so every published chunk still
/// pending is reopened to be published again.
pub struct StreamWatch {
    url: String,
    created: Option<String>,
    /// The stream as last declared: counted by name, declared again only
    /// when counting it fails.
    stream: Option<jetstream::stream::Stream>,
}

impl StreamWatch {
    pub fn new(url: &str) -> Self {
        StreamWatch { url: url.to_string(), created: None, stream: None }
    }

    /// The stream (declared again if it is missing) and what it holds. A
    /// turn asks the stream once: declaring it on every turn as well was
    /// another request ten times a second from every coordinator.
    pub async fn counts(
        &mut self,
        js: &jetstream::Context,
        pool: &PgPool,
    ) -> Result<(jetstream::stream::Stream, StreamCounts), Error> {
        let counted = match self.stream.take() {
            Some(stream) => stream_counts(js).await.map(|c| (stream, c)).ok(),
            None => None,
        };
        let (stream, counts) = match counted {
            Some(known) => known,
            None => {
                let stream = common::nats::ensure_stream(js, &self.url).await?;
                let counts = stream_counts(js).await?;
                (stream, counts)
            }
        };
        if self.created.as_ref().is_some_and(|seen| *seen != counts.created) {
            let n = store::reopen_published_chunks(pool).await?;
            tracing::warn!(
                chunks = n,
                "the chunk stream is new (JetStream lost its state): republishing every pending chunk"
            );
            metrics::counter!(m::CHUNKS_REOPENED).increment(n);
        }
        self.created = Some(counts.created.clone());
        self.stream = Some(stream.clone());
        Ok((stream, counts))
    }
}

fn request_error(e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::Nats(NatsError::Request(Box::new(e)))
}

/// What the stream holds: how many messages each job has (queued or being
/// worked on; a job with none is absent), and how many messages were ever
/// removed from it, which in a work-queue stream means acked: finished.
pub struct StreamCounts {
    pub by_job: HashMap<Uuid, usize>,
    pub finished: u64,
    /// When the stream was created (RFC 3339, as the server sends it): a new
    /// one means JetStream lost the old.
    pub created: String,
}

/// One page of a `STREAM.INFO` answer with messages per subject, as the
/// server sends it: the stream's state and, for a request with a
/// `subjects_filter`, the paging fields `offset`, `limit` and `total`
/// (JetStream API schema `io.nats.jetstream.api.v1.stream_info_response`;
/// async-nats 0.51 reads them as its private `PagedInfo`). An error answer
/// has an `error` and nothing else.
#[derive(Debug, serde::Deserialize)]
struct InfoPage {
    #[serde(default)]
    error: Option<serde_json::Value>,
    #[serde(default)]
    created: String,
    #[serde(default)]
    state: PageState,
    #[serde(default)]
    total: usize,
}

#[derive(Debug, Default, serde::Deserialize)]
struct PageState {
    messages: u64,
    last_seq: u64,
    #[serde(default)]
    subjects: HashMap<String, usize>,
}

/// Whether another page of subjects is to be asked for after one that
/// brought `got` of them, `so_far` in all, of the server's `total`.
fn more_pages(got: usize, so_far: usize, total: usize) -> bool {
    got > 0 && so_far < total
}

/// Counts the stream's messages by job: one request while the stream holds
/// fewer subjects than a page (the server's limit is 100,000). async-nats's
/// `info_with_subjects` asked for a second, empty page every time, which
/// was half the coordinator's requests to NATS (`scripts/bench scale
/// --by-subject`).
pub async fn stream_counts(js: &jetstream::Context) -> Result<StreamCounts, Error> {
    let prefix = format!("{}.", common::wire::SUBJECT_PREFIX);
    let subject = format!("STREAM.INFO.{}", common::wire::STREAM);
    let mut by_subject: HashMap<String, usize> = HashMap::new();
    let mut first: Option<InfoPage> = None;
    loop {
        let body = serde_json::json!({ "subjects_filter": format!("{prefix}*"), "offset": by_subject.len() });
        let mut page: InfoPage = js.request(subject.clone(), &body).await.map_err(request_error)?;
        if let Some(error) = page.error.take() {
            return Err(Error::Nats(NatsError::Request(format!("{subject}: {error}").into())));
        }
        let got = page.state.subjects.len();
        by_subject.extend(page.state.subjects.drain());
        let total = page.total;
        first.get_or_insert(page);
        if !more_pages(got, by_subject.len(), total) {
            break;
        }
    }
    let first = first.expect("one page was read");
    let finished = first.state.last_seq.saturating_sub(first.state.messages);
    let by_job = by_subject
        .into_iter()
        .filter_map(|(subject, n)| Some((subject.strip_prefix(&prefix)?.parse().ok()?, n)))
        .collect();
    Ok(StreamCounts { by_job, finished, created: first.created })
}

/// What the workers' consumer reports: chunks not yet delivered and pull
/// requests waiting for chunks. Before any worker has started there is no
/// consumer: everything in the stream is undelivered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Demand {
    pub undelivered: u64,
    pub waiting: usize,
}

async fn demand(stream: &jetstream::stream::Stream, in_stream: u64) -> Result<Demand, Error> {
    use async_nats::jetstream::context::ConsumerInfoErrorKind;
    match stream.consumer_info(common::wire::CONSUMER).await {
        Ok(info) => Ok(Demand { undelivered: info.num_pending, waiting: info.num_waiting }),
        Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => Ok(Demand { undelivered: in_stream, waiting: 0 }),
        Err(e) => Err(request_error(e)),
    }
}

/// The pace at which workers finish chunks, in chunks per second, over the
/// last few seconds. (Deliveries would overstate it: filling the workers'
/// slots at the start is not a pace.)
#[derive(Debug, Default)]
pub struct Pace {
    samples: VecDeque<(Instant, u64)>,
}

/// How far back [`Pace`] looks.
const PACE_SPAN: Duration = Duration::from_secs(3);
/// The shortest span [`Pace`] divides by: a handful of deliveries in the
/// first tenth of a second is not a pace of fifty a second.
const PACE_MIN_SPAN: Duration = Duration::from_secs(1);

impl Pace {
    /// Records the count of finished chunks at `now` and returns the pace.
    pub fn observe(&mut self, now: Instant, finished: u64) -> f64 {
        if self.samples.back().is_some_and(|&(_, last)| finished < last) {
            // A new stream (JetStream lost its state): start again.
            self.samples.clear();
        }
        self.samples.push_back((now, finished));
        while self.samples.len() > 2 && now.duration_since(self.samples[1].0) >= PACE_SPAN {
            self.samples.pop_front();
        }
        let (since, first) = self.samples[0];
        let span = now.duration_since(since).max(PACE_MIN_SPAN).as_secs_f64();
        (finished - first) as f64 / span
    }
}

/// How many chunks to publish now: enough that `ahead` of work at `pace`
/// waits undelivered, and at least one for every waiting pull request.
pub fn chunks_wanted(demand: Demand, pace: f64, ahead: Duration) -> usize {
    let queue = (pace * ahead.as_secs_f64()).floor() as u64;
    let wanted = queue.max(demand.waiting as u64);
    wanted.saturating_sub(demand.undelivered) as usize
}

/// A job with chunks to publish, as [`share`] sees it.
#[derive(Debug, Clone, Copy)]
pub struct Candidate {
    /// Index of its project in the projects' counts.
    pub project: usize,
    /// Its messages in the stream.
    pub in_stream: usize,
    /// Chunks it could publish now.
    pub left: usize,
}

/// Shares `wanted` chunks out among jobs (oldest first), given how many
/// messages each project has in the stream (all its running jobs, those with
/// nothing to publish too): each chunk goes to the project with the fewest in
/// the stream, and in it to the job with the fewest, the oldest on a tie.
/// Returns the job index of each chunk, in publishing order.
pub fn share(wanted: usize, jobs: &[Candidate], projects: &[usize]) -> Vec<usize> {
    let mut jobs = jobs.to_vec();
    let mut projects = projects.to_vec();
    let mut order = Vec::with_capacity(wanted);
    while order.len() < wanted {
        let ready = || (0..jobs.len()).filter(|&i| jobs[i].left > 0);
        let Some(project) = ready().map(|i| jobs[i].project).min_by_key(|&p| (projects[p], p)) else {
            break;
        };
        let next = ready()
            .filter(|&i| jobs[i].project == project)
            .min_by_key(|&i| (jobs[i].in_stream, i))
            .expect("the project has a job with chunks left");
        jobs[next].in_stream += 1;
        jobs[next].left -= 1;
        projects[project] += 1;
        order.push(next);
    }
    order
}

/// The publisher's state between turns.
pub struct Publisher {
    js: jetstream::Context,
    pool: PgPool,
    watch: Arc<tokio::sync::Mutex<StreamWatch>>,
    ahead: Duration,
    pace: Pace,
}

impl Publisher {
    pub fn new(
        js: jetstream::Context,
        pool: PgPool,
        watch: Arc<tokio::sync::Mutex<StreamWatch>>,
        ahead: Duration,
    ) -> Self {
        Publisher { js, pool, watch, ahead, pace: Pace::default() }
    }

    /// One turn: measures the demand and publishes what it calls for.
    /// Returns true when workers were waiting with nothing queued (the pace
    /// is still being learned): the next turn should come soon.
    pub async fn turn(&mut self) -> Result<bool, Error> {
        let (stream, counts) = self.watch.lock().await.counts(&self.js, &self.pool).await?;
        let in_stream = counts.by_job;
        let demand = demand(&stream, in_stream.values().sum::<usize>() as u64).await?;
        let pace = self.pace.observe(Instant::now(), counts.finished);
        let wanted = chunks_wanted(demand, pace, self.ahead);
        let starving = demand.waiting > 0 && demand.undelivered == 0;
        if wanted == 0 {
            return Ok(starving);
        }
        let candidates = store::unpublished_chunks(&self.pool, wanted as i64).await?;
        // Running jobs with chunks to publish, oldest first, as the query orders them.
        let mut jobs: Vec<(Uuid, VecDeque<ChunkMsg>)> = Vec::new();
        for c in candidates {
            match jobs.last_mut() {
                Some((id, chunks)) if *id == c.job_id => chunks.push_back(c),
                _ => jobs.push((c.job_id, VecDeque::from([c]))),
            }
        }
        // Each project's messages in the stream over all its running jobs,
        // projects in the order of their oldest running job.
        let running = store::running_job_projects(&self.pool).await?;
        let mut names: HashMap<&str, usize> = HashMap::new();
        let mut projects: Vec<usize> = Vec::new();
        let mut project_of: HashMap<Uuid, usize> = HashMap::new();
        for (id, project) in &running {
            let p = *names.entry(project.as_str()).or_insert_with(|| {
                projects.push(0);
                projects.len() - 1
            });
            projects[p] += in_stream.get(id).copied().unwrap_or(0);
            project_of.insert(*id, p);
        }
        let candidates: Vec<Candidate> = jobs
            .iter()
            .map(|(id, chunks)| {
                let in_stream = in_stream.get(id).copied().unwrap_or(0);
                // A job that stopped running since that query: a project of its own.
                let project = *project_of.entry(*id).or_insert_with(|| {
                    projects.push(in_stream);
                    projects.len() - 1
                });
                Candidate { project, in_stream, left: chunks.len() }
            })
            .collect();
        let order: Vec<ChunkMsg> = share(wanted, &candidates, &projects)
            .into_iter()
            .map(|i| jobs[i].1.pop_front().expect("share stays within each job's chunks"))
            .collect();
        publish_chunks(&self.js, &self.pool, &order, "publish").await?;
        Ok(starving && !order.is_empty())
    }
}

/// The next turn's delay while workers wait with nothing queued.
const STARVING_TURN: Duration = Duration::from_millis(10);

/// Runs the publisher until shutdown: a turn every `interval`, and at once
/// when woken (a job was submitted, resumed or lost chunks were found).
/// Failures (NATS or Postgres away) are logged once and retried each turn.
pub async fn run(
    mut publisher: Publisher,
    interval: Duration,
    wake: Arc<Notify>,
    status: Arc<crate::leader::Status>,
    shutdown: CancellationToken,
) {
    let mut health = common::telemetry::Health::default();
    loop {
        // The lease is asked right before each round: a leader that was
        // frozen wakes with this loop's timer due, and must not publish on a
        // lease that ran out meanwhile.
        if !status.is_leader() {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(interval) => continue,
            }
        }
        let turn = publisher.turn().await;
        status.publisher_turned();
        let next = match turn {
            Ok(starving) => {
                health.ok("publishing chunks");
                if starving {
                    STARVING_TURN
                } else {
                    interval
                }
            }
            Err(err) => {
                health.failed("publishing chunks", &err);
                interval
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = wake.notified() => {}
            _ = tokio::time::sleep(next) => {}
        }
    }
}

fn publish_error(c: &ChunkMsg, e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::Publish { job_id: c.job_id, chunk_no: c.chunk_no, source: Box::new(e) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn another_page_of_subjects_only_while_the_server_has_more() {
        // got on this page, got so far, the server's total: ask again
        for (got, so_far, total, again) in
            [(3, 3, 3, false), (0, 0, 0, false), (100_000, 100_000, 100_002, true), (2, 100_002, 100_002, false)]
        {
            assert_eq!(more_pages(got, so_far, total), again, "{got} {so_far} {total}");
        }
    }

    #[test]
    fn a_stream_info_page_reads_as_the_server_writes_it() {
        let page: InfoPage = serde_json::from_str(
            r#"{"type":"io.nats.jetstream.api.v1.stream_info_response","total":2,"offset":0,"limit":100000,
                "config":{"name":"SLUICE_CHUNKS"},"created":"2026-12-08T01:02:03.456789Z",
                "state":{"messages":5,"bytes":10,"first_seq":8,"last_seq":12,"consumer_count":1,
                         "subjects":{"sluice.chunks.a":3,"sluice.chunks.b":2}}}"#,
        )
        .unwrap();
        assert!(page.error.is_none());
        assert_eq!((page.total, page.state.messages, page.state.last_seq, page.state.subjects.len()), (2, 5, 12, 2));
        assert_eq!(page.created, "2026-12-08T01:02:03.456789Z");
        let err: InfoPage = serde_json::from_str(
            r#"{"type":"x","error":{"code":404,"err_code":10059,"description":"stream not found"}}"#,
        )
        .unwrap();
        assert!(err.error.is_some());
    }

    #[test]
    fn pace_is_chunks_finished_per_second_over_the_last_seconds() {
        let t0 = Instant::now();
        let mut pace = Pace::default();
        assert_eq!(pace.observe(t0, 0), 0.0);
        // The first deliveries are spread over a second at least.
        assert_eq!(pace.observe(t0 + Duration::from_millis(100), 4), 4.0);
        assert_eq!(pace.observe(t0 + Duration::from_secs(1), 50), 50.0);
        assert_eq!(pace.observe(t0 + Duration::from_secs(2), 100), 50.0);
        // Older samples fall out: the pace follows a slowdown.
        for s in 3..=8 {
            pace.observe(t0 + Duration::from_secs(s), 100 + (s - 2) * 2);
        }
        let p = pace.observe(t0 + Duration::from_secs(9), 114);
        assert!((p - 2.0).abs() < 0.01, "{p}");
        // A counter that goes back (a new consumer) starts afresh.
        assert_eq!(pace.observe(t0 + Duration::from_secs(10), 3), 0.0);
    }

    #[test]
    fn the_queue_holds_about_the_work_ahead_and_answers_waiting_workers() {
        let ahead = Duration::from_secs(1);
        let d = |undelivered, waiting| Demand { undelivered, waiting };
        // 150 chunks a second: 150 queued.
        assert_eq!(chunks_wanted(d(0, 0), 150.0, ahead), 150);
        assert_eq!(chunks_wanted(d(140, 2), 150.0, ahead), 10);
        // A chunk takes 5 s (a rate-limited model): only what workers ask for.
        assert_eq!(chunks_wanted(d(0, 0), 0.2, ahead), 0);
        assert_eq!(chunks_wanted(d(0, 2), 0.2, ahead), 2);
        assert_eq!(chunks_wanted(d(1, 2), 0.2, ahead), 1);
        assert_eq!(chunks_wanted(d(3, 2), 0.2, ahead), 0);
    }

    /// Jobs each in a project of its own, given as (in the stream, left).
    fn alone(jobs: &[(usize, usize)]) -> (Vec<Candidate>, Vec<usize>) {
        let c = jobs.iter().enumerate().map(|(p, &(n, left))| Candidate { project: p, in_stream: n, left }).collect();
        (c, jobs.iter().map(|&(n, _)| n).collect())
    }

    #[test]
    fn chunks_go_to_the_job_with_the_fewest_in_the_stream() {
        let share_alone = |wanted, jobs: &[(usize, usize)]| {
            let (c, p) = alone(jobs);
            share(wanted, &c, &p)
        };
        // A big job with 4 in the stream, a new one with none.
        assert_eq!(share_alone(3, &[(4, 100), (0, 1)]), vec![1, 0, 0]);
        // Equal jobs alternate, the oldest first.
        assert_eq!(share_alone(4, &[(0, 10), (0, 10)]), vec![0, 1, 0, 1]);
        // The new job catches up first.
        assert_eq!(share_alone(5, &[(3, 10), (0, 10)]), vec![1, 1, 1, 0, 1]);
        // Nothing beyond what each job has.
        assert_eq!(share_alone(9, &[(0, 1), (0, 2)]), vec![0, 1, 1]);
        assert!(share(5, &[], &[]).is_empty());
    }

    #[test]
    fn projects_share_equally_whatever_their_number_of_jobs() {
        let c = |project, in_stream, left| Candidate { project, in_stream, left };
        // Project 0 runs three jobs, project 1 one: half the chunks go to project 1.
        let jobs = [c(0, 0, 10), c(0, 0, 10), c(0, 0, 10), c(1, 0, 10)];
        assert_eq!(share(6, &jobs, &[0, 0]), vec![0, 3, 1, 3, 2, 3]);
        // Messages of a project's job with nothing left to publish count for the project.
        assert_eq!(share(3, &[c(0, 0, 10), c(1, 0, 10)], &[5, 0]), vec![1, 1, 1]);
    }
}
