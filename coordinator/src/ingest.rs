//! Streams a job's JSONL input into Postgres with COPY, validating each line without holding the file in memory.

use common::db::Doing;
use common::spec::{JobSpec, RequestSource};
use std::time::Instant;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use crate::model::{IngestReport, LineError};
use crate::{metrics as m, Error};

/// Longest accepted input line, in bytes (without the newline).
pub const MAX_LINE_BYTES: usize = 256 * 1024;
/// How many refused lines a report lists; the count covers all of them.
pub const MAX_REPORTED_ERRORS: usize = 100;
/// COPY data is sent to Postgres in pieces of about this size.
const COPY_BUFFER: usize = 256 * 1024;

/// What to do with bad lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Any bad line rejects the whole job; nothing is ingested.
    Strict,
    /// Good lines are ingested; bad ones are recorded in `rejected_lines`.
    SkipInvalid,
}

/// A line as the splitter hands it over.
#[derive(Debug, PartialEq, Eq)]
pub enum RawLine {
    Line(Vec<u8>),
    /// The line exceeded [`MAX_LINE_BYTES`]; its bytes were dropped as they came.
    TooLong,
}

/// Splits a byte stream into lines, never buffering more than one line of
/// [`MAX_LINE_BYTES`] + 1 bytes.
#[derive(Default)]
pub struct LineSplitter {
    buf: Vec<u8>,
    overflow: bool,
}

impl LineSplitter {
    /// Feeds a piece of input and hands every completed line to `out`.
    pub fn feed(&mut self, mut data: &[u8], out: &mut impl FnMut(RawLine)) {
        while !data.is_empty() {
            match memchr(b'\n', data) {
                Some(i) => {
                    self.push(&data[..i]);
                    out(self.take());
                    data = &data[i + 1..];
                }
                None => {
                    self.push(data);
                    data = &[];
                }
            }
        }
    }

    /// Hands over the last line if the input did not end with a newline.
    pub fn finish(&mut self, out: &mut impl FnMut(RawLine)) {
        if self.overflow || !self.buf.is_empty() {
            out(self.take());
        }
    }

    fn push(&mut self, part: &[u8]) {
        if self.overflow {
            return;
        }
        if self.buf.len() + part.len() > MAX_LINE_BYTES + 1 {
            // Keep counting the line as too long but stop storing it.
            self.overflow = true;
            self.buf = Vec::new();
        } else {
            self.buf.extend_from_slice(part);
        }
    }

    fn take(&mut self) -> RawLine {
        let overflow = std::mem::take(&mut self.overflow);
        let mut line = std::mem::take(&mut self.buf);
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        if overflow || line.len() > MAX_LINE_BYTES {
            RawLine::TooLong
        } else {
            line.shrink_to_fit();
            RawLine::Line(line)
        }
    }
}

fn memchr(needle: u8, hay: &[u8]) -> Option<usize> {
    hay.iter().position(|&b| b == needle)
}

/// A line that passed validation.
#[derive(Debug, PartialEq)]
pub struct GoodLine {
    pub id: String,
    pub payload: Value,
}

/// What became of one line.
#[derive(Debug, PartialEq)]
pub enum Checked {
    Good(GoodLine),
    /// Blank lines are allowed anywhere and ignored.
    Blank,
    Bad(Why, String),
}

/// Why a line was refused, for the `reason` label of
/// `sluice_lines_rejected_total` (the message says the rest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    TooLong,
    NotUtf8,
    InvalidJson,
    NotAnObject,
    NulCharacter,
    BadId,
    MissingField,
    BadBatchRequest,
    DuplicateId,
}

impl Why {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Why::TooLong => "too_long",
            Why::NotUtf8 => "not_utf8",
            Why::InvalidJson => "invalid_json",
            Why::NotAnObject => "not_an_object",
            Why::NulCharacter => "nul_character",
            Why::BadId => "bad_id",
            Why::MissingField => "missing_field",
            Why::BadBatchRequest => "bad_batch_request",
            Why::DuplicateId => "duplicate_id",
        }
    }
}

/// Validates lines one at a time. Duplicate ids are found by Postgres after
/// the copy, so memory does not grow with the number of lines.
pub struct Validator {
    required: Vec<String>,
    request: RequestSource,
    /// For OpenAI Batch lines: the model the first good line named, which
    /// every other line must name too.
    batch_model: Option<String>,
}

/// The only endpoint a batch line may name: Sluice makes chat completions.
/// <https://platform.openai.com/docs/api-reference/batch/request-input>
/// lists `/v1/chat/completions`, `/v1/embeddings`, `/v1/completions` and
/// `/v1/responses`.
pub const BATCH_CHAT_URL: &str = "/v1/chat/completions";

/// Whether a JSON value holds a NUL character (`\u0000`) in a key or string:
/// valid JSON, but Postgres text and jsonb cannot store it.
fn holds_nul(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(a) => a.iter().any(holds_nul),
        Value::Object(m) => m.iter().any(|(k, v)| k.contains('\0') || holds_nul(v)),
        _ => false,
    }
}

impl Validator {
    pub fn new(spec: &JobSpec) -> Self {
        Validator { required: spec.required_fields(), request: spec.request, batch_model: None }
    }

    /// Checks an OpenAI Batch API request line: `custom_id`, `method`, `url`
    /// and a chat completion `body` naming the file's one model.
    fn check_batch_line(&mut self, map: &serde_json::Map<String, Value>) -> Result<String, String> {
        let id = match map.get("custom_id") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(_) => return Err("field \"custom_id\" must be a non-empty string".into()),
            None => return Err("missing field \"custom_id\" (each request of a batch file names one)".into()),
        };
        match map.get("method") {
            Some(Value::String(m)) if m == "POST" => {}
            Some(other) => return Err(format!("field \"method\" must be \"POST\", got {other}")),
            None => return Err("missing field \"method\" (\"POST\")".into()),
        }
        match map.get("url") {
            Some(Value::String(u)) if u == BATCH_CHAT_URL => {}
            Some(Value::String(u)) => {
                return Err(format!("url {u:?} is not a chat endpoint: Sluice runs only {BATCH_CHAT_URL} requests"))
            }
            Some(other) => return Err(format!("field \"url\" must be a string, got {other}")),
            None => return Err(format!("missing field \"url\" ({BATCH_CHAT_URL:?})")),
        }
        let body = match map.get("body") {
            Some(Value::Object(b)) => b,
            Some(_) => return Err("field \"body\" must be a JSON object (the request body)".into()),
            None => return Err("missing field \"body\"".into()),
        };
        let model = match body.get("model") {
            Some(Value::String(m)) if !m.is_empty() => m,
            _ => return Err("body.model must name the model, as a string".into()),
        };
        match body.get("messages") {
            Some(Value::Array(m)) if !m.is_empty() => {}
            _ => return Err("body.messages must be a non-empty array of chat messages".into()),
        }
        if body.get("stream") == Some(&Value::Bool(true)) {
            return Err("body.stream is true: a batch request cannot stream".into());
        }
        match &self.batch_model {
            Some(first) if first != model => {
                return Err(format!(
                    "body.model is {model:?} but earlier lines name {first:?}: a batch file names one model"
                ))
            }
            Some(_) => {}
            None => self.batch_model = Some(model.clone()),
        }
        Ok(id)
    }

    /// Checks one line: size, UTF-8, JSON object, storable text, id (`id` or
    /// `custom_id`), required fields.
    pub fn check(&mut self, line: RawLine) -> Checked {
        let bytes = match line {
            RawLine::TooLong => {
                return Checked::Bad(Why::TooLong, format!("line is longer than {} KiB", MAX_LINE_BYTES / 1024))
            }
            RawLine::Line(b) => b,
        };
        let text = match std::str::from_utf8(&bytes) {
            Ok(t) => t,
            Err(e) => return Checked::Bad(Why::NotUtf8, format!("invalid UTF-8 at byte {}", e.valid_up_to() + 1)),
        };
        if text.trim().is_empty() {
            return Checked::Blank;
        }
        // serde_json refuses lone surrogates (\ud800) as invalid JSON.
        let value: Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => return Checked::Bad(Why::InvalidJson, format!("invalid JSON: {e}")),
        };
        let Value::Object(map) = &value else {
            return Checked::Bad(Why::NotAnObject, "expected a JSON object".into());
        };
        if holds_nul(&value) {
            return Checked::Bad(
                Why::NulCharacter,
                "holds a NUL character (\\u0000), which cannot be stored: remove it".into(),
            );
        }
        let id = if self.request == RequestSource::OpenaiBatch {
            match self.check_batch_line(map) {
                Ok(id) => id,
                Err(why) => return Checked::Bad(Why::BadBatchRequest, why),
            }
        } else {
            match map.get("id").or_else(|| map.get("custom_id")) {
                Some(Value::String(s)) if !s.is_empty() => s.clone(),
                Some(Value::Number(n)) => n.to_string(),
                Some(_) => {
                    return Checked::Bad(Why::BadId, "field \"id\" must be a non-empty string or a number".into())
                }
                None => return Checked::Bad(Why::BadId, "missing field \"id\" (or \"custom_id\")".into()),
            }
        };
        if let Some(missing) = self.required.iter().find(|f| !map.contains_key(f.as_str())) {
            return Checked::Bad(Why::MissingField, format!("missing field \"{missing}\""));
        }
        Checked::Good(GoodLine { id, payload: value })
    }
}

/// Appends one COPY text-format field, escaping what COPY treats specially.
fn copy_field(out: &mut Vec<u8>, s: &str) {
    for b in s.bytes() {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            _ => out.push(b),
        }
    }
}

/// Limits on what a client can make the coordinator take on.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most bytes of input.
    pub max_bytes: u64,
    /// Most lines of input (blank ones included).
    pub max_lines: u64,
    /// Jobs of one project uploading or running at once.
    pub max_active_jobs: u32,
}

/// Refused lines waiting to be written to `rejected_lines`; written whenever
/// this many have gathered, so memory stays bounded.
const REJECTED_BATCH: usize = 10_000;

const COPY_ITEMS: &str = "COPY items (job_id, seq, item_id, line_no, payload) FROM STDIN";

/// The running state of one upload: counters, the COPY buffer, refused lines.
struct Intake {
    job_field: String,
    mode: Mode,
    limits: Limits,
    validator: Validator,
    splitter: LineSplitter,
    errors: Vec<LineError>,
    invalid: u64,
    seq: u64,
    line_no: u64,
    bytes: u64,
    buf: Vec<u8>,
    /// Refused lines not yet written (`--skip-invalid` only).
    rejected: Vec<LineError>,
    /// Template fields seen so far, when the job shares answers between identical items.
    repeats: Option<Repeats>,
}

/// Whether two good lines may have equal template fields: a hash of each
/// line's fields, kept while reading. Most inputs have no repeat, and then
/// [`find_copies`] need not read the items back. A hash collision only
/// costs that query; equal fields always hash alike (`serde_json` maps are
/// sorted, so key order does not matter).
struct Repeats {
    fields: Vec<String>,
    seen: std::collections::HashSet<u64>,
    found: bool,
}

impl Repeats {
    fn see(&mut self, payload: &Value) {
        use std::hash::{BuildHasher, Hasher};
        if self.found {
            return;
        }
        let mut h = self.seen.hasher().build_hasher();
        for f in &self.fields {
            h.write(payload.get(f).map(Value::to_string).unwrap_or_default().as_bytes());
            h.write_u8(0xff); // not in UTF-8: separates fields
        }
        self.found = !self.seen.insert(h.finish());
    }
}

impl Intake {
    fn line(&mut self, raw: RawLine) {
        self.line_no += 1;
        match self.validator.check(raw) {
            Checked::Blank => {}
            Checked::Bad(why, reason) => {
                self.invalid += 1;
                metrics::counter!(m::LINES_REJECTED, "reason" => why.label()).increment(1);
                let e = LineError { line: self.line_no, reason };
                if self.errors.len() < MAX_REPORTED_ERRORS {
                    self.errors.push(e.clone());
                }
                if self.mode == Mode::SkipInvalid {
                    self.rejected.push(e);
                }
            }
            Checked::Good(good) => {
                // In strict mode, once a line is bad nothing more is copied:
                // the transaction will be rolled back anyway.
                if self.mode == Mode::Strict && self.invalid > 0 {
                    return;
                }
                self.seq += 1;
                if let Some(r) = &mut self.repeats {
                    r.see(&good.payload);
                }
                let buf = &mut self.buf;
                buf.extend_from_slice(self.job_field.as_bytes());
                buf.push(b'\t');
                buf.extend_from_slice(self.seq.to_string().as_bytes());
                buf.push(b'\t');
                copy_field(buf, &good.id);
                buf.push(b'\t');
                buf.extend_from_slice(self.line_no.to_string().as_bytes());
                buf.push(b'\t');
                copy_field(buf, &good.payload.to_string());
                buf.push(b'\n');
            }
        }
    }

    /// Takes one piece of the body; returns why the upload must be refused, if it must.
    fn feed(&mut self, piece: &[u8]) -> Option<String> {
        self.bytes += piece.len() as u64;
        if self.bytes > self.limits.max_bytes {
            return Some(format!(
                "the input is larger than {} bytes (SLUICE_MAX_UPLOAD_BYTES on the coordinator)",
                self.limits.max_bytes
            ));
        }
        let mut splitter = std::mem::take(&mut self.splitter);
        splitter.feed(piece, &mut |raw| self.line(raw));
        self.splitter = splitter;
        (self.line_no > self.limits.max_lines).then(|| {
            format!("the input has more than {} lines (SLUICE_MAX_JOB_LINES on the coordinator)", self.limits.max_lines)
        })
    }

    fn finish(&mut self) {
        let mut splitter = std::mem::take(&mut self.splitter);
        splitter.finish(&mut |raw| self.line(raw));
    }
}

/// How one COPY into `items` ended.
enum Segment {
    /// The body is read to its end.
    End,
    /// Refused lines gathered: write them, then go on with a new COPY.
    Flush,
    /// The upload is over a limit.
    TooLarge(String),
}

/// Copies lines from `body` into `items` until the body ends, refused lines
/// must be written, or a limit is passed. One COPY at a time: a connection
/// runs one statement at once.
async fn copy_segment<S, E>(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    intake: &mut Intake,
    body: &mut S,
) -> Result<Segment, Error>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: Into<axum::Error>,
{
    let mut copy = tx.copy_in_raw(COPY_ITEMS).await.doing("copying the input into Postgres")?;
    let end = loop {
        let Some(piece) = body.next().await else {
            intake.finish();
            break Segment::End;
        };
        let piece = piece.map_err(|e| Error::Upload(e.into()))?;
        if let Some(reason) = intake.feed(&piece) {
            copy.abort("input too large").await.ok();
            return Ok(Segment::TooLarge(reason));
        }
        if intake.buf.len() >= COPY_BUFFER {
            copy.send(std::mem::take(&mut intake.buf)).await.doing("copying the input into Postgres")?;
            intake.buf.reserve(COPY_BUFFER + MAX_LINE_BYTES);
        }
        if intake.rejected.len() >= REJECTED_BATCH {
            break Segment::Flush;
        }
    };
    if !intake.buf.is_empty() {
        copy.send(std::mem::take(&mut intake.buf)).await.doing("copying the input into Postgres")?;
    }
    copy.finish().await.doing("copying the input into Postgres")?;
    Ok(end)
}

/// Ingests the input of job `job_id` (state `uploading`) from `body`.
///
/// Items are copied inside one transaction together with the job's chunks, so
/// a rejected job leaves nothing behind and an accepted one is complete. The
/// upload runs on a connection of its own that is closed afterwards: an
/// upload cut off half-way (its COPY still open) never returns to the pool.
// The upload's settings come from three places (the kind, the job row, the
// coordinator's limits); a struct for them would be read once, here.
#[allow(clippy::too_many_arguments)]
pub async fn ingest<S, E>(
    pool: &PgPool,
    job_id: Uuid,
    spec: &JobSpec,
    reuse: bool,
    mode: Mode,
    limits: Limits,
    mut body: S,
) -> Result<IngestReport, Error>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: Into<axum::Error>,
{
    let started = Instant::now();
    let (required, chunk_size) = (spec.required_fields(), spec.chunk_size);
    let mut conn = pool.acquire().await.doing("ingesting the input")?;
    conn.close_on_drop();
    let mut tx = sqlx::Connection::begin(&mut *conn).await.doing("ingesting the input")?;
    crate::store::lock_job(&mut tx, job_id, &["uploading"], "uploading").await?;

    let mut intake = Intake {
        job_field: job_id.to_string(),
        mode,
        limits,
        validator: Validator::new(spec),
        splitter: LineSplitter::default(),
        errors: Vec::new(),
        invalid: 0,
        seq: 0,
        line_no: 0,
        bytes: 0,
        buf: Vec::with_capacity(COPY_BUFFER + MAX_LINE_BYTES),
        rejected: Vec::new(),
        repeats: reuse.then(|| Repeats { fields: required.clone(), seen: Default::default(), found: false }),
    };
    loop {
        let segment = copy_segment(&mut tx, &mut intake, &mut body).await?;
        write_rejected(&mut tx, job_id, std::mem::take(&mut intake.rejected)).await?;
        match segment {
            Segment::End => break,
            Segment::Flush => continue,
            Segment::TooLarge(reason) => {
                tx.rollback().await.ok();
                return Err(Error::TooLarge(format!(
                    "{reason}: nothing was ingested; split the input into several jobs, or raise that limit"
                )));
            }
        }
    }
    let Intake { mut errors, mut invalid, mut seq, repeats, .. } = intake;

    // Duplicate ids, found by Postgres: every line repeating an earlier line's id.
    if seq > 0 && (mode == Mode::SkipInvalid || invalid == 0) {
        let (dups, first) = duplicates(&mut tx, job_id, mode).await?;
        if dups > 0 {
            invalid += dups as u64;
            metrics::counter!(m::LINES_REJECTED, "reason" => Why::DuplicateId.label()).increment(dups as u64);
            errors.extend(first);
            errors.sort_by_key(|e| e.line);
            errors.truncate(MAX_REPORTED_ERRORS);
            if mode == Mode::SkipInvalid {
                seq -= dups as u64;
            }
        }
    }

    let empty = seq == 0 && invalid == 0;
    if empty {
        errors.push(LineError { line: 0, reason: "input is empty: no JSONL lines found".into() });
    }
    if empty || (mode == Mode::Strict && invalid > 0) || seq == 0 {
        tx.rollback().await.ok();
        sqlx::query!(
            "UPDATE jobs SET state = 'rejected', invalid_lines = $2, finished_at = now() WHERE id = $1",
            job_id,
            invalid as i64
        )
        .execute(pool)
        .await
        .doing("ingesting the input")?;
        metrics::counter!(m::JOBS_FINISHED, "state" => "rejected").increment(1);
        return Ok(IngestReport {
            job_id,
            state: "rejected".into(),
            items: 0,
            chunks: 0,
            invalid_lines: invalid,
            errors,
            ingest_seconds: started.elapsed().as_secs_f64(),
            copies: 0,
        });
    }
    let copies = if repeats.is_some_and(|r| r.found) { find_copies(&mut tx, job_id, &required).await? } else { 0 };
    let size = spread_chunk_size(chunk_size, seq);
    let chunks = crate::store::create_chunks(&mut tx, job_id, seq as i64, size).await?;
    sqlx::query!(
        "UPDATE jobs SET state = 'running', total_items = $2, invalid_lines = $3, started_at = now() WHERE id = $1",
        job_id,
        seq as i64,
        invalid as i64
    )
    .execute(&mut *tx)
    .await
    .doing("ingesting the input")?;
    tx.commit().await.doing("ingesting the input")?;
    metrics::counter!(m::ITEMS_INGESTED).increment(seq);
    let secs = started.elapsed().as_secs_f64();
    metrics::histogram!(m::INGEST_SECONDS).record(secs);
    Ok(IngestReport {
        job_id,
        state: "running".into(),
        items: seq,
        chunks,
        invalid_lines: invalid,
        errors,
        ingest_seconds: secs,
        copies,
    })
}

/// Records refused lines (`--skip-invalid`).
async fn write_rejected(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    job_id: Uuid,
    rejected: Vec<LineError>,
) -> Result<(), Error> {
    for batch in rejected.chunks(1000) {
        let lines: Vec<i64> = batch.iter().map(|e| e.line as i64).collect();
        let reasons: Vec<&str> = batch.iter().map(|e| e.reason.as_str()).collect();
        sqlx::query!(
            "INSERT INTO rejected_lines (job_id, line_no, reason) SELECT $1, * FROM UNNEST($2::bigint[], $3::text[])",
            job_id,
            &lines,
            &reasons as _
        )
        .execute(&mut **tx)
        .await
        .doing("recording refused lines")?;
    }
    Ok(())
}

/// Finds the lines whose id an earlier line already used: returns how many and
/// the first [`MAX_REPORTED_ERRORS`]. With `--skip-invalid` they are moved
/// to `rejected_lines` and the remaining items numbered again without gaps.
/// The uniqueness of ids is checked at commit (a deferred constraint), so the
/// copy itself never fails on a duplicate.
async fn duplicates(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    job_id: Uuid,
    mode: Mode,
) -> Result<(i64, Vec<LineError>), Error> {
    // `later`, in each query: every line whose id an earlier line used.
    let first = sqlx::query!(
        r#"WITH later AS (SELECT seq, line_no, item_id FROM (
               SELECT seq, line_no, item_id, row_number() OVER (PARTITION BY item_id ORDER BY seq) AS k
               FROM items WHERE job_id = $1) d WHERE k > 1)
           SELECT line_no AS "line_no!", item_id AS "item_id!" FROM later ORDER BY line_no LIMIT $2"#,
        job_id,
        MAX_REPORTED_ERRORS as i64
    )
    .fetch_all(&mut **tx)
    .await
    .doing("looking for duplicate ids")?;
    if first.is_empty() {
        return Ok((0, Vec::new()));
    }
    let first: Vec<LineError> = first
        .iter()
        .map(|r| LineError { line: r.line_no as u64, reason: format!("duplicate id \"{}\"", r.item_id) })
        .collect();
    if mode == Mode::Strict {
        let n = sqlx::query_scalar!(
            r#"WITH later AS (SELECT seq FROM (
                   SELECT seq, row_number() OVER (PARTITION BY item_id ORDER BY seq) AS k
                   FROM items WHERE job_id = $1) d WHERE k > 1)
               SELECT count(*) AS "n!" FROM later"#,
            job_id
        )
        .fetch_one(&mut **tx)
        .await
        .doing("looking for duplicate ids")?;
        return Ok((n, first));
    }
    let n = sqlx::query!(
        r#"WITH later AS (SELECT seq FROM (
               SELECT seq, row_number() OVER (PARTITION BY item_id ORDER BY seq) AS k
               FROM items WHERE job_id = $1) d WHERE k > 1),
           gone AS (DELETE FROM items i USING later l WHERE i.job_id = $1 AND i.seq = l.seq
                    RETURNING i.line_no, i.item_id)
           INSERT INTO rejected_lines (job_id, line_no, reason)
           SELECT $1, line_no, 'duplicate id "' || item_id || '"' FROM gone"#,
        job_id
    )
    .execute(&mut **tx)
    .await
    .doing("looking for duplicate ids")?
    .rows_affected() as i64;
    // Close the gaps in two steps: the primary key is checked row by row.
    sqlx::query!("UPDATE items i SET seq = -n.rn FROM (SELECT seq, row_number() OVER (ORDER BY seq) AS rn FROM items WHERE job_id = $1) n
         WHERE i.job_id = $1 AND i.seq = n.seq", job_id)
    .execute(&mut **tx)
    .await.doing("looking for duplicate ids")?;
    sqlx::query!("UPDATE items SET seq = -seq WHERE job_id = $1", job_id)
        .execute(&mut **tx)
        .await
        .doing("looking for duplicate ids")?;
    Ok((n, first))
}

/// Records each item whose template fields equal those of an earlier item
/// of the job: it renders the same prompt, so it is never sent to a model
/// and shares the earlier item's answer (`item_copies`). The template reads
/// only `fields` (checked at submit), so equal fields mean an equal prompt.
async fn find_copies(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    job_id: Uuid,
    fields: &[String],
) -> Result<u64, Error> {
    Ok(sqlx::query!(
        "INSERT INTO item_copies (job_id, seq, original_seq)
         SELECT $1, seq, original FROM (
             SELECT seq, first_value(seq) OVER (PARTITION BY k ORDER BY seq) AS original
             FROM (SELECT seq, md5((SELECT jsonb_agg(payload -> f ORDER BY o)
                                    FROM unnest($2::text[]) WITH ORDINALITY AS u(f, o))::text) AS k
                   FROM items WHERE job_id = $1) keyed) w
         WHERE seq <> original",
        job_id,
        fields
    )
    .execute(&mut **tx)
    .await
    .doing("looking for identical items")?
    .rows_affected())
}

/// A job is split into at least this many chunks (when it has that many
/// items), so that a small job submitted beside a big one spreads over the
/// workers and gets its share of each, rather than one worker's.
const MIN_CHUNKS: u64 = 8;

/// The chunk size of a job of `items` items whose kind asks for `size`.
fn spread_chunk_size(size: u32, items: u64) -> i64 {
    (size as u64).min(items.div_ceil(MIN_CHUNKS)).max(1) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_jobs_are_split_finer() {
        assert_eq!(spread_chunk_size(100, 100_000), 100);
        assert_eq!(spread_chunk_size(100, 800), 100);
        assert_eq!(spread_chunk_size(100, 100), 13); // 8 chunks
        assert_eq!(spread_chunk_size(100, 151), 19); // 8 chunks
        assert_eq!(spread_chunk_size(100, 5), 1);
        assert_eq!(spread_chunk_size(100, 0), 1);
    }

    fn shipped(kind: &str) -> JobSpec {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../jobs").join(kind);
        common::spec::JobKind::load(&dir).expect("a shipped kind loads").spec
    }

    /// Splits `input` and validates every line as the `classify` kind (which
    /// requires `text`), returning the verdicts in order.
    fn run(input: &[u8], piece: usize) -> Vec<Result<String, String>> {
        run_as(&shipped("classify"), input, piece)
    }

    fn run_as(spec: &JobSpec, input: &[u8], piece: usize) -> Vec<Result<String, String>> {
        let mut v = Validator::new(spec);
        let mut s = LineSplitter::default();
        let mut out = Vec::new();
        let mut push = |raw| match v.check(raw) {
            Checked::Good(g) => out.push(Ok(g.id)),
            Checked::Bad(_, r) => out.push(Err(r)),
            Checked::Blank => {}
        };
        for p in input.chunks(piece.max(1)) {
            s.feed(p, &mut push);
        }
        s.finish(&mut push);
        out
    }

    fn check(input: &[u8], expected: &[Result<&str, &str>]) {
        for piece in [1, 3, 7, 4096] {
            let got = run(input, piece);
            assert_eq!(got.len(), expected.len(), "piece {piece}: {got:?}");
            for (g, e) in got.iter().zip(expected) {
                match (g, e) {
                    (Ok(a), Ok(b)) => assert_eq!(a, b),
                    (Err(a), Err(b)) => assert!(a.contains(b), "{a:?} should contain {b:?}"),
                    _ => panic!("piece {piece}: got {g:?}, expected {e:?}"),
                }
            }
        }
    }

    #[test]
    fn good_lines() {
        check(b"{\"id\":\"a\",\"text\":\"x\"}\n{\"id\":2,\"text\":\"y\"}\n", &[Ok("a"), Ok("2")]);
        check(b"{\"custom_id\":\"req-1\",\"text\":\"x\"}", &[Ok("req-1")]);
        check(b"{\"id\":\"a\",\"text\":\"x\"}\r\n\n   \n{\"id\":\"b\",\"text\":\"y\"}\r\n", &[Ok("a"), Ok("b")]);
    }

    #[test]
    fn bad_lines() {
        check(b"{\"id\":\"a\",\"text\":\"x\"\n", &[Err("invalid JSON")]);
        check(b"[1,2]\n", &[Err("expected a JSON object")]);
        check(b"{\"text\":\"x\"}\n", &[Err("missing field \"id\"")]);
        check(b"{\"id\":\"\",\"text\":\"x\"}\n", &[Err("non-empty string")]);
        check(b"{\"id\":\"a\"}\n", &[Err("missing field \"text\"")]);
        check(b"{\"id\":\"a\",\"text\":\"\xff\"}\n", &[Err("invalid UTF-8 at byte 19")]);
        check(b"{\"id\":\"a\",\"text\":\"x\\u0000y\"}\n", &[Err("NUL character")]);
        check(b"{\"id\":\"a\",\"text\":\"x\",\"k\\u0000\":1}\n", &[Err("NUL character")]);
        check(b"{\"id\":\"a\",\"text\":\"\\ud800\"}\n", &[Err("invalid JSON")]);
    }

    #[test]
    fn long_lines_are_refused_without_being_stored() {
        let mut input = b"{\"id\":\"a\",\"text\":\"".to_vec();
        input.extend(std::iter::repeat_n(b'x', MAX_LINE_BYTES));
        input.extend_from_slice(b"\"}\n{\"id\":\"b\",\"text\":\"y\"}\n");
        check(&input, &[Err("longer than 256 KiB"), Ok("b")]);
        // A line of exactly the limit is fine.
        let mut exact = b"{\"id\":\"c\",\"text\":\"".to_vec();
        exact.extend(std::iter::repeat_n(b'x', MAX_LINE_BYTES - exact.len() - 2));
        exact.extend_from_slice(b"\"}");
        assert_eq!(exact.len(), MAX_LINE_BYTES);
        check(&exact, &[Ok("c")]);
    }

    #[test]
    fn copy_escaping() {
        let mut out = Vec::new();
        copy_field(&mut out, "a\\b\tc\nd\re");
        assert_eq!(out, b"a\\\\b\\tc\\nd\\re");
    }

    #[test]
    fn openai_batch_lines_are_checked_one_by_one() {
        let spec = shipped("openai-batch");
        let body = r#""body":{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
        let lines = [
            format!(r#"{{"custom_id":"a","method":"POST","url":"/v1/chat/completions",{body}}}"#),
            format!(r#"{{"id":"b","method":"POST","url":"/v1/chat/completions",{body}}}"#),
            format!(r#"{{"custom_id":"c","method":"GET","url":"/v1/chat/completions",{body}}}"#),
            format!(r#"{{"custom_id":"d","method":"POST","url":"/v1/embeddings",{body}}}"#),
            r#"{"custom_id":"e","method":"POST","url":"/v1/chat/completions","body":"hi"}"#.to_string(),
            r#"{"custom_id":"f","method":"POST","url":"/v1/chat/completions","body":{"model":"gpt-4o","messages":[{"role":"user","content":"x"}]}}"#.to_string(),
            r#"{"custom_id":"g","method":"POST","url":"/v1/chat/completions","body":{"model":"gpt-4o-mini","messages":[]}}"#.to_string(),
            format!(r#"{{"custom_id":"h","method":"POST","url":"/v1/chat/completions",{body}}}"#),
        ];
        let verdicts = run_as(&spec, lines.join("\n").as_bytes(), 7);
        let expect: [Result<&str, &str>; 8] = [
            Ok("a"),
            Err("missing field \"custom_id\""),
            Err("field \"method\" must be \"POST\""),
            Err("url \"/v1/embeddings\" is not a chat endpoint"),
            Err("field \"body\" must be a JSON object"),
            Err("body.model is \"gpt-4o\" but earlier lines name \"gpt-4o-mini\""),
            Err("body.messages must be a non-empty array"),
            Ok("h"),
        ];
        assert_eq!(verdicts.len(), expect.len(), "{verdicts:?}");
        for (i, (got, want)) in verdicts.iter().zip(expect).enumerate() {
            match (got, want) {
                (Ok(g), Ok(w)) => assert_eq!(g, w, "line {}", i + 1),
                (Err(g), Err(w)) => assert!(g.starts_with(w), "line {}: {g}", i + 1),
                _ => panic!("line {}: got {got:?}, expected {want:?}", i + 1),
            }
        }
    }
}
