//! The review queue: exporting doubtful results for humans (JSONL, CSV, Label Studio) and importing their decisions.
//!
//! Two kinds of item wait for a reviewer: results below their job's review
//! threshold (`needs_review`), and, in a multi-stage job, answers a stage's
//! gate holds (`held`, with the stage named). A decision on a held answer
//! approves it as it is, edits it (a new `answer`, or a whole new `output`,
//! checked against the stage's schema) or rejects it (`reject` with the
//! reason); approved and edited items go on to the next stage at once.

use common::db::Doing;
use common::spec::JobSpec;
use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use sqlx::PgPool;
use uuid::Uuid;

use crate::auth::Actor;
use crate::label_studio::{self, Names};
use crate::model::Format;
use crate::model::{DecisionError, ImportReport};
use crate::{store, Error};

/// A result waiting for review, with the input it was made from.
#[derive(Debug, Clone, serde::Serialize)]
pub struct QueueItem {
    pub id: String,
    pub input: Value,
    pub answer: Option<String>,
    pub output: Option<Value>,
    pub confidence: Option<f64>,
    pub confidence_detail: Option<Value>,
    pub model: Option<String>,
    pub state: String,
    /// For an answer held at a gate: the stage it waits after.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    #[serde(skip)]
    pub seq: i64,
}

/// The results to review: those flagged `needs_review`, or with `below`,
/// every answered result with a confidence under it (or none at all); and
/// every answer held at a gate.
pub async fn queue(pool: &PgPool, job_id: Uuid, below: Option<f64>) -> Result<Vec<QueueItem>, Error> {
    let rows = sqlx::query!(
        r#"SELECT r.seq AS "seq!", r.item_id AS "item_id!", i.payload AS "payload!", r.answer, r.output,
                  r.confidence, r.confidence_detail, r.model, r.state AS "state!", NULL::text AS stage
         FROM results r JOIN items i ON i.job_id = r.job_id AND i.seq = r.seq
         WHERE r.job_id = $1
           AND CASE WHEN $2::float8 IS NULL THEN r.state = 'needs_review'
                    ELSE r.state IN ('succeeded', 'needs_review') AND (r.confidence IS NULL OR r.confidence < $2) END
         UNION ALL
         SELECT s.seq, i.item_id, i.payload, s.answer, s.output, s.confidence, s.confidence_detail, s.model, s.state,
                j.spec->'stages'->(s.stage::int)->>'name'
         FROM stage_results s JOIN items i ON i.job_id = s.job_id AND i.seq = s.seq JOIN jobs j ON j.id = s.job_id
         WHERE s.job_id = $1 AND s.state = 'held'
         ORDER BY 6 NULLS FIRST, 1"#,
        job_id,
        below
    )
    .fetch_all(pool)
    .await
    .doing("reading the review queue")?;
    Ok(rows
        .into_iter()
        .map(|r| QueueItem {
            seq: r.seq,
            id: r.item_id,
            input: r.payload,
            answer: r.answer,
            output: r.output,
            confidence: r.confidence,
            confidence_detail: r.confidence_detail,
            model: r.model,
            state: r.state,
            stage: r.stage,
        })
        .collect())
}

/// Writes the queue in `format`: `jsonl`, `csv` or `label-studio` (a JSON
/// array of tasks whose prediction carries the model's answer and score,
/// for the labeling config `label_studio::config` writes with `names`).
pub fn render(items: &[QueueItem], format: Format, job_id: Uuid, spec: &JobSpec, names: &Names) -> Vec<u8> {
    match format {
        // The API offers review queues only as jsonl, csv and label-studio.
        Format::Jsonl | Format::OpenaiBatch => {
            let mut out = Vec::new();
            for i in items {
                serde_json::to_writer(&mut out, i).expect("queue item serialises");
                out.push(b'\n');
            }
            out
        }
        Format::Csv => {
            let mut w = csv::Writer::from_writer(Vec::new());
            w.write_record(["id", "answer", "confidence", "model", "input", "stage", "votes"])
                .expect("writing to memory");
            for i in items {
                w.write_record([
                    i.id.as_str(),
                    i.answer.as_deref().unwrap_or(""),
                    &i.confidence.map(|c| format!("{c:.4}")).unwrap_or_default(),
                    i.model.as_deref().unwrap_or(""),
                    &i.input.to_string(),
                    i.stage.as_deref().unwrap_or(""),
                    &votes(i.confidence_detail.as_ref()),
                ])
                .expect("writing to memory");
            }
            w.into_inner().expect("writing to memory")
        }
        Format::LabelStudio => label_studio::tasks(job_id, items, spec, names),
    }
}

/// Who said what in an ensemble's vote, for a CSV cell:
/// `model=answer (confidence)` joined with `; `, a member without an answer
/// as `model: why`. Empty for an answer of one model.
fn votes(detail: Option<&Value>) -> String {
    let Some(votes) = detail.and_then(|d| d["votes"].as_array()) else { return String::new() };
    votes
        .iter()
        .map(|v| {
            let model = v["model"].as_str().unwrap_or_default();
            match v["answer"].as_str() {
                Some(a) => match v["confidence"].as_f64() {
                    Some(c) => format!("{model}={a} ({c:.2})"),
                    None => format!("{model}={a}"),
                },
                None => format!("{model}: {}", v["error"].as_str().unwrap_or("no answer")),
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// One human decision.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub line: u64,
    pub id: String,
    pub answer: String,
    /// The reviewer the file names, if any: kept as a note beside the
    /// token's holder, who is recorded as the reviewer.
    pub reviewer: Option<String>,
    pub decided_at: DateTime<Utc>,
    /// For an answer held at a gate: the whole output as the reviewer edited
    /// it (else `answer`, if given, replaces the stage's answer field).
    pub output: Option<Value>,
    /// For an answer held at a gate: the item ends here, for this reason.
    pub reject: Option<String>,
}

/// The fields of one decision line, before they are checked.
struct RawDecision {
    id: String,
    answer: String,
    reviewer: String,
    at: Option<String>,
    output: Option<Value>,
    reject: Option<String>,
}

/// Parses a decisions file (JSONL, or CSV with a header
/// `id,answer[,reviewer][,decided_at][,reject][,output]`), collecting every
/// bad line.
pub fn parse_decisions(body: &[u8], csv_format: bool) -> (Vec<Decision>, Vec<DecisionError>) {
    let mut good = Vec::new();
    let mut bad = Vec::new();
    let mut push = |line: u64, r: Result<RawDecision, String>| match r.and_then(
        |RawDecision { id, answer, reviewer, at, output, reject }| {
            if id.trim().is_empty() {
                return Err("missing \"id\"".into());
            }
            let reject = reject.filter(|r| !r.trim().is_empty());
            if answer.trim().is_empty() && output.is_none() && reject.is_none() {
                return Err("missing \"answer\"".into());
            }
            if reject.is_some() && (output.is_some() || !answer.trim().is_empty()) {
                return Err("a decision either rejects (\"reject\") or gives an answer, not both".into());
            }
            if output.as_ref().is_some_and(|o| !o.is_object()) {
                return Err("\"output\" must be a JSON object".into());
            }
            let reviewer = Some(reviewer.trim().to_string()).filter(|r| !r.is_empty());
            let decided_at = match at.filter(|a| !a.trim().is_empty()) {
                Some(a) => DateTime::parse_from_rfc3339(a.trim())
                    .map(|t| t.with_timezone(&Utc))
                    .map_err(|e| format!("\"decided_at\" is not an RFC 3339 time: {e}"))?,
                None => Utc::now(),
            };
            Ok(Decision { line, id, answer, reviewer, decided_at, output, reject })
        },
    ) {
        Ok(d) => good.push(d),
        Err(reason) => bad.push(DecisionError { line, reason }),
    };
    if csv_format {
        let (header, rows) = csv_rows(body, true);
        let header = match header {
            Ok(h) => h,
            Err(reason) => {
                bad.push(DecisionError { line: 1, reason });
                return (good, bad);
            }
        };
        let col = |name: &str| header.iter().position(|h| h == name);
        let (Some(ci), Some(ca)) = (col("id"), col("answer")) else {
            bad.push(DecisionError { line: 1, reason: "the CSV header must name id and answer".into() });
            return (good, bad);
        };
        let cr = col("reviewer");
        let cd = col("decided_at");
        let (cj, co) = (col("reject"), col("output"));
        for (line, rec) in rows {
            push(
                line,
                rec.and_then(|r| {
                    let get = |i: usize| r.get(i).unwrap_or("").to_string();
                    let output = match co.map(get).filter(|o| !o.trim().is_empty()) {
                        Some(o) => Some(serde_json::from_str(&o).map_err(|e| format!("\"output\" is not JSON: {e}"))?),
                        None => None,
                    };
                    Ok(RawDecision {
                        id: get(ci),
                        answer: get(ca),
                        reviewer: cr.map(get).unwrap_or_default(),
                        at: cd.map(get),
                        output,
                        reject: cj.map(get),
                    })
                }),
            );
        }
    } else {
        for (n, raw) in body.split(|b| *b == b'\n').enumerate() {
            let line = n as u64 + 1;
            let text = match std::str::from_utf8(raw) {
                Ok(t) => t.trim(),
                Err(e) => {
                    push(line, Err(format!("invalid UTF-8 at byte {}", e.valid_up_to() + 1)));
                    continue;
                }
            };
            if text.is_empty() {
                continue;
            }
            let field = |v: &Value, k: &str| match &v[k] {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                _ => String::new(),
            };
            push(
                line,
                serde_json::from_str::<Value>(text).map_err(|e| format!("invalid JSON: {e}")).and_then(|v| {
                    if !v.is_object() {
                        return Err("expected a JSON object".into());
                    }
                    let text = |k: &str| v.get(k).and_then(Value::as_str).map(String::from);
                    Ok(RawDecision {
                        id: field(&v, "id"),
                        answer: field(&v, "answer"),
                        reviewer: field(&v, "reviewer"),
                        at: text("decided_at"),
                        output: v.get("output").cloned(),
                        reject: text("reject"),
                    })
                }),
            );
        }
    }
    (good, bad)
}

/// A CSV record and the line it starts on (a quoted cell may span lines).
pub(crate) type CsvRow = (u64, Result<csv::StringRecord, String>);

/// A CSV file's header (its cells trimmed) and records.
///
/// A quote left open would make the rest of the file one cell, and every
/// decision after it would vanish into it without a word. So a last record
/// that runs to the end of the file with an odd number of quotes is an
/// error naming the line it starts on, and the lines after that line are
/// read again as records: one stray quote costs one line. (A stray quote
/// with another quoted cell after it pairs with that cell's quote, as CSV
/// reads it; the record then has a cell spanning lines, which the import
/// refuses for a label kind as not one of its labels.)
pub(crate) fn csv_rows(body: &[u8], flexible: bool) -> (Result<Vec<String>, String>, Vec<CsvRow>) {
    let mut rows = Vec::new();
    read_csv_records(body, 1, flexible, &mut rows);
    if rows.is_empty() {
        return (Ok(Vec::new()), rows);
    }
    let header = match rows.remove(0) {
        (_, Ok(h)) => Ok(h.iter().map(|s| s.trim().to_string()).collect()),
        (_, Err(e)) => Err(format!("unreadable CSV header: {e}")),
    };
    (header, rows)
}

fn read_csv_records(body: &[u8], first_line: u64, flexible: bool, out: &mut Vec<CsvRow>) {
    let mut reader = csv::ReaderBuilder::new().has_headers(false).flexible(flexible).from_reader(body);
    let mut last = None;
    for rec in reader.records() {
        let pos = match &rec {
            Ok(r) => r.position().cloned(),
            Err(e) => e.position().cloned(),
        };
        let (line, byte) = pos.map_or((first_line, 0), |p| (p.line() + first_line - 1, p.byte() as usize));
        out.push((line, rec.map_err(|e| format!("invalid CSV: {e}"))));
        last = Some((line, byte));
    }
    let Some((line, byte)) = last else { return };
    let rest = &body[byte.min(body.len())..];
    let text = rest.strip_suffix(b"\n").unwrap_or(rest);
    let Some(end_of_line) = text.iter().position(|b| *b == b'\n') else { return };
    if text.iter().filter(|b| **b == b'"').count() % 2 == 1 {
        out.pop();
        let reason = "a quoted cell is never closed: its opening quote (\") makes the rest of the file one cell; \
                      close the quote, or double it (\"\") if it is part of the text";
        out.push((line, Err(reason.into())));
        read_csv_records(&rest[end_of_line + 1..], line + 1, flexible, out);
    }
}

/// Parses decisions in any format `import` takes: Sluice's JSON lines or
/// CSV, or Label Studio's JSON or CSV export of a queue (told apart by what
/// the body holds: an array of tasks, a `sluice_id` column).
pub fn parse_any(body: &[u8], csv_format: bool, job_id: Uuid, names: &Names) -> label_studio::Parsed {
    if csv_format {
        let header: Vec<String> = csv::Reader::from_reader(body)
            .headers()
            .map(|h| h.iter().map(|s| s.trim().to_string()).collect())
            .unwrap_or_default();
        if label_studio::is_csv_export(&header) {
            return label_studio::parse_csv_export(body, job_id, names);
        }
    } else if label_studio::is_json_export(body) {
        return label_studio::parse_json_export(body, job_id, names);
    }
    let (good, bad) = parse_decisions(body, csv_format);
    (good, bad, 0)
}

/// What a decision applies to.
enum Target {
    /// The item's final result.
    Result,
    /// An answer held at gate `stage`, with the stage's output.
    Held { stage: i16, output: Value },
}

/// A decision on an answer held at a gate, checked.
struct GateVerdict {
    seq: i64,
    stage: i16,
    decision: Decision,
    /// The output the item goes on with; `None` when rejected.
    output: Option<Value>,
    verdict: &'static str,
}

/// Applies decisions all together or not at all: every id must be an item of
/// the job with a result or an answer held at a gate; final answers must be
/// allowed labels when the kind has labels; edited gate answers must match
/// their stage's schema.
pub async fn import(
    pool: &PgPool,
    job_id: Uuid,
    body: &[u8],
    csv_format: bool,
    source: &str,
    actor: &Actor,
    names: &crate::model::LabelStudioNames,
) -> Result<ImportReport, Error> {
    let kind = store::job_kind_stages(pool, job_id).await?;
    let spec = &kind.spec;
    let names = Names::for_kind(spec, names).map_err(Error::Invalid)?;
    let (decisions, mut errors, skipped) = parse_any(body, csv_format, job_id, &names);
    let ids: Vec<String> = decisions.iter().map(|d| d.id.clone()).collect();
    let known: HashMap<String, (i64, Option<Target>)> = sqlx::query!(
        r#"SELECT i.item_id, i.seq, r.seq IS NOT NULL AS "has_result!", h.stage AS "held_stage?",
                  h.output AS "held_output?"
         FROM items i LEFT JOIN results r ON r.job_id = i.job_id AND r.seq = i.seq
              LEFT JOIN stage_results h ON h.job_id = i.job_id AND h.seq = i.seq AND h.state = 'held'
         WHERE i.job_id = $1 AND i.item_id = ANY($2)"#,
        job_id,
        &ids
    )
    .fetch_all(pool)
    .await
    .doing("applying review decisions")?
    .into_iter()
    .map(|r| {
        let target = match (r.has_result, r.held_stage, r.held_output) {
            (true, _, _) => Some(Target::Result),
            (false, Some(stage), Some(output)) => Some(Target::Held { stage, output }),
            _ => None,
        };
        (r.item_id, (r.seq, target))
    })
    .collect();
    let mut apply = Vec::new();
    let mut gates = Vec::new();
    for d in decisions {
        let line = d.line;
        let refuse = |reason: String| DecisionError { line, reason };
        match known.get(&d.id) {
            None => errors.push(refuse(format!("unknown item id \"{}\"", d.id))),
            Some((_, None)) => errors.push(refuse(format!("item \"{}\" has no result yet", d.id))),
            Some((_, Some(Target::Result))) if d.reject.is_some() || d.output.is_some() => {
                errors.push(refuse(format!(
                    "item \"{}\" has its final result: \"reject\" and \"output\" are for answers held at a gate; \
                     give the right \"answer\"",
                    d.id
                )))
            }
            Some((_, Some(Target::Result))) if !spec.labels.is_empty() && !spec.labels.contains(&d.answer) => errors
                .push(refuse(format!("answer \"{}\" is not one of the labels: {}", d.answer, spec.labels.join(", ")))),
            Some((seq, Some(Target::Result))) => apply.push((*seq, d)),
            Some((seq, Some(Target::Held { stage, output }))) => match gate_verdict(&kind, *stage, output, &d) {
                Ok((output, verdict)) => {
                    gates.push(GateVerdict { seq: *seq, stage: *stage, decision: d, output, verdict })
                }
                Err(reason) => errors.push(refuse(reason)),
            },
        }
    }
    if !errors.is_empty() {
        errors.sort_by_key(|e| e.line);
        return Ok(ImportReport { applied: 0, errors, skipped });
    }
    let mut tx = pool.begin().await.doing("applying review decisions")?;
    for (seq, d) in &apply {
        sqlx::query!(
            "INSERT INTO reviews (job_id, seq, answer, reviewer, decided_at, source, token_id, named_reviewer)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            job_id,
            seq,
            &d.answer,
            &actor.name,
            d.decided_at,
            source,
            actor.token_id,
            d.reviewer.as_deref()
        )
        .execute(&mut *tx)
        .await
        .doing("applying review decisions")?;
        sqlx::query!(
            "UPDATE results SET human_answer = $3, reviewer = $4, reviewed_at = $5, state = 'reviewed'
             WHERE job_id = $1 AND seq = $2",
            job_id,
            seq,
            &d.answer,
            &actor.name,
            d.decided_at
        )
        .execute(&mut *tx)
        .await
        .doing("applying review decisions")?;
    }
    let released = decide_gates(&mut tx, job_id, &kind, &gates, source, actor).await?;
    tx.commit().await.doing("applying review decisions")?;
    let rejected = gates.iter().filter(|g| g.output.is_none()).count();
    if rejected > 0 {
        // A rejection may have been the last thing the job waited for.
        common::db::complete_if_done(pool, job_id).await?;
    }
    let applied = (apply.len() + gates.len()) as u64;
    let detail = json!({"decisions": applied, "source": source, "released": released, "rejected": rejected,
                        "skipped": skipped});
    store::event(pool, job_id, "imported", actor, detail).await?;
    Ok(ImportReport { applied, errors, skipped })
}

/// What a decision on an answer held at gate `stage` (output `held`) does:
/// the output the item goes on with and the verdict, or `None` and
/// `rejected`; `Err` when an edit does not match the stage's schema.
fn gate_verdict(
    kind: &common::spec::JobKind,
    stage: i16,
    held: &Value,
    d: &Decision,
) -> Result<(Option<Value>, &'static str), String> {
    if d.reject.is_some() {
        return Ok((None, "rejected"));
    }
    let Some(stage_spec) = kind.spec.stages.get(stage as usize) else {
        return Err(format!("item \"{}\" is held at stage {stage}, which the job does not have", d.id));
    };
    let staged = kind.stage_kind(stage as usize);
    let mut output = d.output.clone().unwrap_or_else(|| held.clone());
    if !d.answer.trim().is_empty() {
        output[&staged.spec.answer_field] = Value::String(d.answer.clone());
    }
    let validator = staged.validator().map_err(|e| e.to_string())?;
    if let Some(e) = validator.iter_errors(&output).next() {
        return Err(format!(
            "the edited answer of item \"{}\" does not match stage {} ({})'s schema: {e} at {}",
            d.id,
            stage + 1,
            stage_spec.name,
            e.instance_path()
        ));
    }
    let verdict = if &output == held { "approved" } else { "edited" };
    Ok((Some(output), verdict))
}

/// Records the gate decisions and applies them: approved and edited answers
/// let their items go on (their chunks are published again), rejected ones
/// end their items with a failed result naming the reason. Returns how many
/// items were let go on.
async fn decide_gates(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    job_id: Uuid,
    kind: &common::spec::JobKind,
    gates: &[GateVerdict],
    source: &str,
    actor: &Actor,
) -> Result<usize, Error> {
    const DOING: &str = "applying decisions at the gates";
    let mut released = Vec::new();
    for g in gates {
        let d = &g.decision;
        let answer = g.output.as_ref().map(|o| match o.get(&kind.stage_kind(g.stage as usize).spec.answer_field) {
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => String::new(),
        });
        sqlx::query!(
            "INSERT INTO reviews (job_id, seq, answer, reviewer, decided_at, source, token_id, named_reviewer,
                                  stage, verdict, reason)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            job_id,
            g.seq,
            answer.as_deref().unwrap_or(""),
            &actor.name,
            d.decided_at,
            source,
            actor.token_id,
            d.reviewer.as_deref(),
            g.stage,
            g.verdict,
            d.reject.as_deref()
        )
        .execute(&mut **tx)
        .await
        .doing(DOING)?;
        match &g.output {
            Some(output) => {
                sqlx::query!(
                    "UPDATE stage_results SET state = 'approved', output = $4, answer = $5
                     WHERE job_id = $1 AND seq = $2 AND stage = $3 AND state = 'held'",
                    job_id,
                    g.seq,
                    g.stage,
                    output,
                    answer.as_deref()
                )
                .execute(&mut **tx)
                .await
                .doing(DOING)?;
                released.push(g.seq);
            }
            None => {
                let name = kind.spec.stages.get(g.stage as usize).map_or("?", |s| s.name.as_str());
                let why = format!(
                    "rejected at stage {} ({name}) by {}: {}",
                    g.stage + 1,
                    actor.name,
                    d.reject.as_deref().unwrap_or_default()
                );
                sqlx::query!(
                    "WITH rejected AS (
                         UPDATE stage_results SET state = 'rejected'
                         WHERE job_id = $1 AND seq = $2 AND stage = $3 AND state = 'held'
                         RETURNING seq, model, attempts)
                     INSERT INTO results (job_id, seq, item_id, state, error_class, error, model, template_hash,
                                          attempts, worker, stage, job_time)
                     SELECT $1, r.seq, i.item_id, 'failed', $4, $5, r.model, j.template_hash, r.attempts,
                            'coordinator', $3, job_time($1)
                     FROM rejected r JOIN items i ON i.job_id = $1 AND i.seq = r.seq JOIN jobs j ON j.id = $1
                     ON CONFLICT (job_id, seq, job_time) DO NOTHING",
                    job_id,
                    g.seq,
                    g.stage,
                    common::provider::ErrorClass::Rejected.as_str(),
                    why
                )
                .execute(&mut **tx)
                .await
                .doing(DOING)?;
            }
        }
    }
    if !released.is_empty() {
        // The chunks holding released items are published again; their new
        // delivery takes those items on from the next stage.
        sqlx::query!(
            "UPDATE chunks c SET state = 'pending', published_at = NULL, done_at = NULL, generation = generation + 1
             WHERE c.job_id = $1
               AND EXISTS (SELECT 1 FROM UNNEST($2::bigint[]) AS f(seq) WHERE f.seq BETWEEN c.first_seq AND c.last_seq)",
            job_id,
            &released
        )
        .execute(&mut **tx)
        .await
        .doing(DOING)?;
    }
    Ok(released.len())
}

/// Takes back `actor`'s latest decision on the final answer of item `id`
/// (the review page's undo): an `undone` row records it, and the decision
/// before it, if any, stands again; else the answer waits for review again.
/// Decisions at a gate are not taken back: their items have gone on.
pub async fn undo(pool: &PgPool, job_id: Uuid, id: &str, actor: &Actor) -> Result<(), Error> {
    const DOING: &str = "taking back a review decision";
    let mut tx = pool.begin().await.doing(DOING)?;
    let target = sqlx::query!(
        r#"SELECT r.id, r.seq, r.reviewer, r.answer FROM reviews r JOIN items i ON i.job_id = r.job_id AND i.seq = r.seq
           WHERE r.job_id = $1 AND i.item_id = $2 AND r.stage IS NULL AND r.verdict IS NULL
             AND NOT EXISTS (SELECT 1 FROM reviews u WHERE u.undoes = r.id)
           ORDER BY r.id DESC LIMIT 1
           FOR UPDATE OF r"#,
        job_id,
        id
    )
    .fetch_optional(&mut *tx)
    .await
    .doing(DOING)?
    .ok_or_else(|| Error::Invalid(format!("item \"{id}\" has no decision on its answer to take back")))?;
    if target.reviewer != actor.name {
        return Err(Error::Forbidden(format!(
            "the last decision on item \"{id}\" is {}'s: only they can take it back",
            target.reviewer
        )));
    }
    sqlx::query!(
        "INSERT INTO reviews (job_id, seq, answer, reviewer, decided_at, source, token_id, verdict, undoes)
         VALUES ($1, $2, $3, $4, now(), 'review-page', $5, 'undone', $6)",
        job_id,
        target.seq,
        target.answer,
        &actor.name,
        actor.token_id,
        target.id
    )
    .execute(&mut *tx)
    .await
    .doing(DOING)?;
    sqlx::query!(
        r#"WITH before AS (
               SELECT r.answer, r.reviewer, r.decided_at FROM reviews r
               WHERE r.job_id = $1 AND r.seq = $2 AND r.stage IS NULL AND r.verdict IS NULL AND r.id < $3
                 AND NOT EXISTS (SELECT 1 FROM reviews u WHERE u.undoes = r.id)
               ORDER BY r.id DESC LIMIT 1)
           UPDATE results r SET
               human_answer = (SELECT answer FROM before),
               reviewer = (SELECT reviewer FROM before),
               reviewed_at = (SELECT decided_at FROM before),
               state = CASE WHEN EXISTS (SELECT 1 FROM before) THEN 'reviewed'
                            WHEN r.confidence IS NULL
                                 OR r.confidence < (SELECT COALESCE(j.review_below, (j.spec->>'confidence_threshold')::float8)
                                                    FROM jobs j WHERE j.id = $1)
                            THEN 'needs_review' ELSE 'succeeded' END
           WHERE r.job_id = $1 AND r.seq = $2"#,
        job_id,
        target.seq,
        target.id
    )
    .execute(&mut *tx)
    .await
    .doing(DOING)?;
    tx.commit().await.doing(DOING)?;
    store::event(pool, job_id, "undone", actor, json!({"item": id})).await?;
    Ok(())
}

/// How far a job's review has come: decisions standing, and answers still
/// waiting (below the threshold, or held at a gate).
pub async fn progress(pool: &PgPool, job_id: Uuid) -> Result<(u64, u64), Error> {
    let r = sqlx::query!(
        r#"SELECT (SELECT count(*) FROM results WHERE job_id = $1 AND state = 'reviewed')
                + (SELECT count(*) FROM stage_results WHERE job_id = $1 AND state IN ('approved', 'rejected')) AS "done!",
                  (SELECT count(*) FROM results WHERE job_id = $1 AND state = 'needs_review')
                + (SELECT count(*) FROM stage_results WHERE job_id = $1 AND state = 'held') AS "waiting!""#,
        job_id
    )
    .fetch_one(pool)
    .await
    .doing("counting review progress")?;
    Ok((r.done as u64, r.waiting as u64))
}

/// One reviewed final answer: the model's confidence, whether the person
/// agreed, and who is recorded.
#[derive(Debug, Clone)]
pub struct Reviewed {
    pub confidence: Option<f64>,
    pub agreed: bool,
    pub reviewer: String,
}

/// Agreement between reviewers and the model, by confidence band and by
/// reviewer.
pub fn agreement(rows: &[Reviewed], threshold: f64) -> crate::model::ReviewStats {
    use crate::model::{AgreementBand, ReviewerAgreement};
    let band = |from: f64, to: f64| AgreementBand { from, to, reviewed: 0, agreed: 0 };
    let mut bands: Vec<AgreementBand> = (0..10).map(|i| band(i as f64 / 10.0, (i + 1) as f64 / 10.0)).collect();
    let mut unscored = band(0.0, 0.0);
    let mut reviewers: Vec<ReviewerAgreement> = Vec::new();
    for r in rows {
        let b = match r.confidence {
            // 1.0 belongs to the last band; the index is clamped for it.
            Some(c) => &mut bands[((c * 10.0).floor().max(0.0) as usize).min(9)],
            None => &mut unscored,
        };
        b.reviewed += 1;
        b.agreed += r.agreed as u64;
        let who = match reviewers.iter().position(|w| w.reviewer == r.reviewer) {
            Some(i) => &mut reviewers[i],
            None => {
                reviewers.push(ReviewerAgreement { reviewer: r.reviewer.clone(), reviewed: 0, agreed: 0 });
                reviewers.last_mut().expect("just pushed")
            }
        };
        who.reviewed += 1;
        who.agreed += r.agreed as u64;
    }
    reviewers.sort_by(|a, b| a.reviewer.cmp(&b.reviewer));
    crate::model::ReviewStats {
        reviewed: rows.len() as u64,
        agreed: rows.iter().filter(|r| r.agreed).count() as u64,
        threshold,
        bands,
        unscored,
        reviewers,
        suggestion: None,
    }
}

/// The lowest threshold whose reviewed answers at or above it were agreed
/// with at least `target` of the time: each reviewed confidence is a
/// candidate, and the answers above it are counted from the top. Returns
/// the threshold with its sample and precision, or `None` when none
/// reaches the target.
pub fn suggest_threshold(rows: &[Reviewed], target: f64) -> Option<(f64, u64, f64)> {
    let mut scored: Vec<(f64, bool)> = rows.iter().filter_map(|r| r.confidence.map(|c| (c, r.agreed))).collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0));
    let (mut n, mut agreed, mut best) = (0u64, 0u64, None);
    for (i, (c, ok)) in scored.iter().enumerate() {
        n += 1;
        agreed += *ok as u64;
        // Only where the next answer has a lower confidence: a threshold
        // takes every answer at its value.
        if scored.get(i + 1).is_some_and(|next| next.0 == *c) {
            continue;
        }
        let precision = agreed as f64 / n as f64;
        if precision >= target {
            best = Some((*c, n, precision));
        }
    }
    best
}

/// The review statistics of a job; with `target`, a threshold suggested
/// for that precision and what it would send to review.
pub async fn stats(pool: &PgPool, job_id: Uuid, target: Option<f64>) -> Result<crate::model::ReviewStats, Error> {
    const DOING: &str = "reading review statistics";
    let threshold = sqlx::query_scalar!(
        r#"SELECT COALESCE(review_below, (spec->>'confidence_threshold')::float8) FROM jobs WHERE id = $1"#,
        job_id
    )
    .fetch_optional(pool)
    .await
    .doing(DOING)?
    .ok_or(Error::JobNotFound(job_id))?
    .unwrap_or(0.0);
    let rows: Vec<Reviewed> = sqlx::query!(
        r#"SELECT confidence, COALESCE(answer = human_answer, false) AS "agreed!", COALESCE(reviewer, '') AS "reviewer!"
           FROM results WHERE job_id = $1 AND human_answer IS NOT NULL"#,
        job_id
    )
    .fetch_all(pool)
    .await
    .doing(DOING)?
    .into_iter()
    .map(|r| Reviewed { confidence: r.confidence, agreed: r.agreed, reviewer: r.reviewer })
    .collect();
    let mut stats = agreement(&rows, threshold);
    if let Some(target) = target {
        let found = suggest_threshold(&rows, target);
        let at = found.map(|(t, _, _)| t);
        let counts = sqlx::query!(
            r#"SELECT count(*) AS "items!", count(*) FILTER (WHERE confidence IS NULL OR confidence < $2) AS "below!"
               FROM results WHERE job_id = $1 AND answer IS NOT NULL"#,
            job_id,
            at.unwrap_or(0.0)
        )
        .fetch_one(pool)
        .await
        .doing(DOING)?;
        stats.suggestion = Some(crate::model::ThresholdSuggestion {
            target,
            threshold: at,
            sample: found.map_or(0, |(_, n, _)| n),
            precision: found.map(|(_, _, p)| p),
            items: counts.items as u64,
            below: if at.is_some() { counts.below as u64 } else { 0 },
        });
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_decisions_with_every_kind_of_bad_line() {
        let body = b"{\"id\":\"a\",\"answer\":\"sports\",\"reviewer\":\"ann\"}\n\nnot json\n{\"id\":\"b\",\"reviewer\":\"ann\"}\n{\"id\":\"c\",\"answer\":\"x\",\"reviewer\":\"ann\",\"decided_at\":\"yesterday\"}\n[1]\n";
        let (good, bad) = parse_decisions(body, false);
        assert_eq!(good.len(), 1);
        assert_eq!(good[0].id, "a");
        let lines: Vec<(u64, &str)> = bad.iter().map(|e| (e.line, e.reason.as_str())).collect();
        assert_eq!(lines.len(), 4, "{lines:?}");
        assert_eq!(lines[0].0, 3);
        assert!(lines[0].1.contains("invalid JSON"));
        assert_eq!(lines[1], (4, "missing \"answer\""));
        assert_eq!(lines[2].0, 5);
        assert!(lines[2].1.contains("RFC 3339"));
        assert_eq!(lines[3], (6, "expected a JSON object"));
    }

    #[test]
    fn csv_decisions() {
        let body = b"id,answer,reviewer,decided_at\na,sports,ann,2026-11-27T10:00:00Z\nb,,ann,\n";
        let (good, bad) = parse_decisions(body, true);
        assert_eq!(good.len(), 1);
        assert_eq!(good[0].decided_at.to_rfc3339(), "2026-11-27T10:00:00+00:00");
        assert_eq!(bad, vec![DecisionError { line: 3, reason: "missing \"answer\"".into() }]);
        let (_, bad) = parse_decisions(b"item,label\nx,y\n", true);
        assert!(bad[0].reason.contains("must name id and answer"));
        let (good, bad) = parse_decisions(b"id,answer\na,sports\n", true);
        assert!(bad.is_empty() && good[0].reviewer.is_none(), "the reviewer column is optional");
    }

    #[test]
    fn an_unclosed_quote_costs_its_line_not_the_rest_of_the_file() {
        let body = b"id,answer\na,sports\nb,\"politics\nc,health\nd,multi line\ne,business\n";
        let (good, bad) = parse_decisions(body, true);
        let ids: Vec<(u64, &str, &str)> = good.iter().map(|d| (d.line, d.id.as_str(), d.answer.as_str())).collect();
        assert_eq!(ids, vec![(2, "a", "sports"), (4, "c", "health"), (5, "d", "multi line"), (6, "e", "business")]);
        assert_eq!(bad.len(), 1, "{bad:?}");
        assert_eq!(bad[0].line, 3);
        assert!(bad[0].reason.contains("never closed"), "{}", bad[0].reason);
        // On the last line, with no newline after it.
        let (good, bad) = parse_decisions(b"id,answer\na,x\nb,\"y", true);
        assert_eq!((good.len(), bad.len()), (2, 0), "an open quote on the last line swallows nothing: {bad:?}");
        let (good, bad) = parse_decisions(b"id,answer\nb,\"y\nc,z", true);
        assert_eq!(good.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(), ["c"]);
        assert_eq!(bad.iter().map(|b| b.line).collect::<Vec<_>>(), [2]);
        // A closed multi-line cell at the end is no error.
        let (good, bad) = parse_decisions(b"id,answer\na,\"x\ny\"\n", true);
        assert!(bad.is_empty() && good[0].answer == "x\ny", "{bad:?}");
    }

    #[test]
    fn label_studio_tasks_carry_the_prediction_and_score() {
        let item = QueueItem {
            id: "doc-1".into(),
            input: json!({"id": "doc-1", "text": "hello"}),
            answer: Some("sports".into()),
            output: None,
            confidence: Some(0.42),
            confidence_detail: None,
            model: Some("sim-small".into()),
            state: "needs_review".into(),
            stage: None,
            seq: 7,
        };
        let spec: JobSpec = serde_json::from_value(json!({
            "kind": "classify", "model": "m", "max_tokens": 5, "answer_field": "label", "input_fields": ["text"],
            "labels": ["sports"]
        }))
        .unwrap();
        let names = Names::for_kind(&spec, &Default::default()).unwrap();
        let out: Value =
            serde_json::from_slice(&render(&[item], Format::LabelStudio, Uuid::nil(), &spec, &names)).unwrap();
        let task = &out[0];
        assert_eq!(task["data"]["text"], "hello");
        assert_eq!(task["data"]["sluice_id"], "doc-1");
        assert_eq!(task["predictions"][0]["score"], 0.42);
        assert_eq!(task["predictions"][0]["result"][0]["value"]["choices"][0], "sports");
    }

    fn reviewed(confidence: f64, agreed: bool, reviewer: &str) -> Reviewed {
        Reviewed { confidence: Some(confidence), agreed, reviewer: reviewer.into() }
    }

    #[test]
    fn agreement_is_counted_per_band_and_per_reviewer() {
        // Known agreement: band 0.3 has 1 of 4 agreed, band 0.9 has 3 of 3
        // (1.0 included), one answer has no confidence.
        let mut rows = vec![
            reviewed(0.30, true, "ann"),
            reviewed(0.31, false, "bo"),
            reviewed(0.35, false, "ann"),
            reviewed(0.399, false, "ann"),
            reviewed(0.9, true, "bo"),
            reviewed(0.95, true, "bo"),
            reviewed(1.0, true, "ann"),
        ];
        rows.push(Reviewed { confidence: None, agreed: false, reviewer: "ann".into() });
        let s = agreement(&rows, 0.65);
        assert_eq!((s.reviewed, s.agreed), (8, 4));
        assert_eq!((s.bands[3].reviewed, s.bands[3].agreed), (4, 1));
        assert_eq!((s.bands[9].reviewed, s.bands[9].agreed), (3, 3));
        assert_eq!(s.bands.iter().map(|b| b.reviewed).sum::<u64>(), 7);
        assert_eq!((s.unscored.reviewed, s.unscored.agreed), (1, 0));
        let who: Vec<(&str, u64, u64)> =
            s.reviewers.iter().map(|r| (r.reviewer.as_str(), r.reviewed, r.agreed)).collect();
        assert_eq!(who, [("ann", 5, 2), ("bo", 3, 2)]);
    }

    #[test]
    fn the_suggested_threshold_is_the_lowest_that_meets_the_precision() {
        // From the top: 0.95 ok, 0.9 ok, 0.8 wrong (2/3), 0.7 ok (3/4),
        // 0.6 ok (4/5), 0.5 wrong (4/6).
        let rows: Vec<Reviewed> = [(0.95, true), (0.9, true), (0.8, false), (0.7, true), (0.6, true), (0.5, false)]
            .iter()
            .map(|(c, a)| reviewed(*c, *a, "ann"))
            .collect();
        assert_eq!(suggest_threshold(&rows, 1.0), Some((0.9, 2, 1.0)));
        assert_eq!(suggest_threshold(&rows, 0.8), Some((0.6, 5, 0.8)));
        assert_eq!(suggest_threshold(&rows, 0.5), Some((0.5, 6, 4.0 / 6.0)));
        assert_eq!(suggest_threshold(&[reviewed(0.9, false, "a")], 0.9), None);
        // Answers of equal confidence stand or fall together.
        let tied = [reviewed(0.9, true, "a"), reviewed(0.8, true, "a"), reviewed(0.8, false, "a")];
        assert_eq!(suggest_threshold(&tied, 0.9), Some((0.9, 1, 1.0)));
    }

    #[test]
    fn formats_are_parsed_once_with_the_allowed_ones_named() {
        let all = [Format::Jsonl, Format::Csv, Format::LabelStudio];
        assert_eq!(Format::parse("label-studio", &all), Ok(Format::LabelStudio));
        assert_eq!(Format::parse("xml", &all).unwrap_err(), "unknown format \"xml\": use jsonl, csv or label-studio");
        let two = [Format::Jsonl, Format::Csv];
        assert_eq!(
            Format::parse("label-studio", &two).unwrap_err(),
            "unknown format \"label-studio\": use jsonl or csv"
        );
        assert_eq!(Format::parse("csv", &two).map(Format::content_type), Ok("text/csv"));
    }
}
