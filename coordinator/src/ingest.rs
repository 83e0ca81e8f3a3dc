//! Streams a job's JSONL input into Postgres with COPY, validating each line without holding the file in memory.

use std::collections::HashSet;
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
    Bad(String),
}

/// Validates lines one at a time, remembering ids to find duplicates.
pub struct Validator {
    required: Vec<String>,
    seen: HashSet<String>,
}

impl Validator {
    pub fn new(required: Vec<String>) -> Self {
        Validator { required, seen: HashSet::new() }
    }

    /// Checks one line: size, UTF-8, JSON object, id (`id` or `custom_id`),
    /// required fields, duplicate ids.
    pub fn check(&mut self, line: RawLine) -> Checked {
        let bytes = match line {
            RawLine::TooLong => return Checked::Bad(format!("line is longer than {} KiB", MAX_LINE_BYTES / 1024)),
            RawLine::Line(b) => b,
        };
        let text = match std::str::from_utf8(&bytes) {
            Ok(t) => t,
            Err(e) => return Checked::Bad(format!("invalid UTF-8 at byte {}", e.valid_up_to() + 1)),
        };
        if text.trim().is_empty() {
            return Checked::Blank;
        }
        let value: Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => return Checked::Bad(format!("invalid JSON: {e}")),
        };
        let Value::Object(map) = &value else {
            return Checked::Bad("expected a JSON object".into());
        };
        let id = match map.get("id").or_else(|| map.get("custom_id")) {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            Some(_) => return Checked::Bad("field \"id\" must be a non-empty string or a number".into()),
            None => return Checked::Bad("missing field \"id\" (or \"custom_id\")".into()),
        };
        if let Some(missing) = self.required.iter().find(|f| !map.contains_key(f.as_str())) {
            return Checked::Bad(format!("missing field \"{missing}\""));
        }
        if !self.seen.insert(id.clone()) {
            return Checked::Bad(format!("duplicate id \"{id}\""));
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

/// Ingests the input of job `job_id` (state `uploading`) from `body`.
///
/// Items are copied inside one transaction together with the job's chunks, so
/// a rejected job leaves nothing behind and an accepted one is complete.
pub async fn ingest<S, E>(
    pool: &PgPool,
    job_id: Uuid,
    required: Vec<String>,
    chunk_size: u32,
    mode: Mode,
    mut body: S,
) -> Result<IngestReport, Error>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: Into<axum::Error>,
{
    let started = Instant::now();
    let mut tx = pool.begin().await?;
    crate::store::lock_job(&mut tx, job_id, &["uploading"], "uploading").await?;

    let mut copy = tx.copy_in_raw("COPY items (job_id, seq, item_id, line_no, payload) FROM STDIN").await?;
    let job_field = job_id.to_string();
    let mut validator = Validator::new(required);
    let mut splitter = LineSplitter::default();
    let mut errors: Vec<LineError> = Vec::new();
    let mut invalid: u64 = 0;
    let mut seq: u64 = 0;
    let mut line_no: u64 = 0;
    let mut buf: Vec<u8> = Vec::with_capacity(COPY_BUFFER + MAX_LINE_BYTES);
    let mut rejected_all: Vec<LineError> = Vec::new();

    let mut handle = |raw: RawLine, buf: &mut Vec<u8>| {
        line_no += 1;
        match validator.check(raw) {
            Checked::Blank => {}
            Checked::Bad(reason) => {
                invalid += 1;
                metrics::counter!(m::LINES_REJECTED).increment(1);
                let e = LineError { line: line_no, reason };
                if errors.len() < MAX_REPORTED_ERRORS {
                    errors.push(e.clone());
                }
                if mode == Mode::SkipInvalid {
                    rejected_all.push(e);
                }
            }
            Checked::Good(good) => {
                // In strict mode, once a line is bad nothing more is copied:
                // the transaction will be rolled back anyway.
                if mode == Mode::Strict && invalid > 0 {
                    return;
                }
                seq += 1;
                buf.extend_from_slice(job_field.as_bytes());
                buf.push(b'\t');
                buf.extend_from_slice(seq.to_string().as_bytes());
                buf.push(b'\t');
                copy_field(buf, &good.id);
                buf.push(b'\t');
                buf.extend_from_slice(line_no.to_string().as_bytes());
                buf.push(b'\t');
                copy_field(buf, &good.payload.to_string());
                buf.push(b'\n');
            }
        }
    };

    while let Some(piece) = body.next().await {
        let piece = piece.map_err(|e| Error::Upload(e.into()))?;
        splitter.feed(&piece, &mut |raw| handle(raw, &mut buf));
        if buf.len() >= COPY_BUFFER {
            copy.send(std::mem::take(&mut buf)).await?;
            buf.reserve(COPY_BUFFER + MAX_LINE_BYTES);
        }
    }
    splitter.finish(&mut |raw| handle(raw, &mut buf));
    drop(handle);

    let empty = seq == 0 && invalid == 0;
    if empty {
        errors.push(LineError { line: 0, reason: "input is empty: no JSONL lines found".into() });
    }
    let rejected = empty || (mode == Mode::Strict && invalid > 0) || seq == 0;
    if rejected {
        copy.abort("input rejected").await.ok();
        tx.rollback().await.ok();
        sqlx::query("UPDATE jobs SET state = 'rejected', invalid_lines = $2, finished_at = now() WHERE id = $1")
            .bind(job_id)
            .bind(invalid as i64)
            .execute(pool)
            .await?;
        metrics::counter!(m::JOBS_FINISHED, "state" => "rejected").increment(1);
        return Ok(IngestReport {
            job_id,
            state: "rejected".into(),
            items: 0,
            chunks: 0,
            invalid_lines: invalid,
            errors,
            ingest_seconds: started.elapsed().as_secs_f64(),
        });
    }
    if !buf.is_empty() {
        copy.send(buf).await?;
    }
    copy.finish().await?;

    for batch in rejected_all.chunks(1000) {
        let lines: Vec<i64> = batch.iter().map(|e| e.line as i64).collect();
        let reasons: Vec<String> = batch.iter().map(|e| e.reason.clone()).collect();
        sqlx::query(
            "INSERT INTO rejected_lines (job_id, line_no, reason) SELECT $1, * FROM UNNEST($2::bigint[], $3::text[])",
        )
        .bind(job_id)
        .bind(&lines)
        .bind(&reasons)
        .execute(&mut *tx)
        .await?;
    }
    let chunks = crate::store::create_chunks(&mut tx, job_id, seq as i64, chunk_size as i64).await?;
    sqlx::query(
        "UPDATE jobs SET state = 'running', total_items = $2, invalid_lines = $3, started_at = now() WHERE id = $1",
    )
    .bind(job_id)
    .bind(seq as i64)
    .bind(invalid as i64)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
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
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Splits `input` and validates every line, returning the verdicts in order.
    fn run(input: &[u8], piece: usize) -> Vec<Result<String, String>> {
        let mut v = Validator::new(vec!["text".into()]);
        let mut s = LineSplitter::default();
        let mut out = Vec::new();
        let mut push = |raw| match v.check(raw) {
            Checked::Good(g) => out.push(Ok(g.id)),
            Checked::Bad(r) => out.push(Err(r)),
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
        check(b"{\"id\":\"a\",\"text\":\"x\"}\n{\"id\":\"a\",\"text\":\"y\"}\n", &[Ok("a"), Err("duplicate id \"a\"")]);
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
}
