//! The review queue: exporting doubtful results for humans (JSONL, CSV, Label Studio) and importing their decisions.

use common::db::Doing;
use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use sqlx::PgPool;
use uuid::Uuid;

use crate::auth::Actor;
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
    #[serde(skip)]
    pub seq: i64,
}

/// The results to review: those flagged `needs_review`, or with `below`,
/// every answered result with a confidence under it (or none at all).
pub async fn queue(pool: &PgPool, job_id: Uuid, below: Option<f64>) -> Result<Vec<QueueItem>, Error> {
    let rows = sqlx::query!(
        "SELECT r.seq, r.item_id, i.payload, r.answer, r.output, r.confidence, r.confidence_detail, r.model, r.state
         FROM results r JOIN items i ON i.job_id = r.job_id AND i.seq = r.seq
         WHERE r.job_id = $1
           AND CASE WHEN $2::float8 IS NULL THEN r.state = 'needs_review'
                    ELSE r.state IN ('succeeded', 'needs_review') AND (r.confidence IS NULL OR r.confidence < $2) END
         ORDER BY r.confidence NULLS FIRST, r.seq",
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
        })
        .collect())
}

/// Writes the queue in `format`: `jsonl`, `csv` or `label-studio` (a JSON
/// array of tasks whose prediction carries the model's answer and score).
pub fn render(items: &[QueueItem], format: Format, labels: &[String]) -> Vec<u8> {
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
            w.write_record(["id", "answer", "confidence", "model", "input"]).expect("writing to memory");
            for i in items {
                w.write_record([
                    i.id.as_str(),
                    i.answer.as_deref().unwrap_or(""),
                    &i.confidence.map(|c| format!("{c:.4}")).unwrap_or_default(),
                    i.model.as_deref().unwrap_or(""),
                    &i.input.to_string(),
                ])
                .expect("writing to memory");
            }
            w.into_inner().expect("writing to memory")
        }
        Format::LabelStudio => {
            let tasks: Vec<Value> = items
                .iter()
                .map(|i| {
                    let mut data = match &i.input {
                        Value::Object(m) => m.clone(),
                        other => serde_json::Map::from_iter([("input".to_string(), other.clone())]),
                    };
                    data.insert("sluice_id".into(), json!(i.id));
                    let answer = i.answer.clone().unwrap_or_default();
                    let result = if labels.is_empty() {
                        json!({"from_name": "answer", "to_name": "text", "type": "textarea", "value": {"text": [answer]}})
                    } else {
                        json!({"from_name": "label", "to_name": "text", "type": "choices", "value": {"choices": [answer]}})
                    };
                    json!({
                        "id": i.seq,
                        "data": data,
                        "predictions": [{
                            "model_version": i.model.clone().unwrap_or_default(),
                            "score": i.confidence,
                            "result": [result]
                        }]
                    })
                })
                .collect();
            serde_json::to_vec_pretty(&tasks).expect("tasks serialise")
        }
    }
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
}

/// Parses a decisions file (JSONL, or CSV with a header `id,answer[,reviewer][,decided_at]`),
/// collecting every bad line.
pub fn parse_decisions(body: &[u8], csv_format: bool) -> (Vec<Decision>, Vec<DecisionError>) {
    let mut good = Vec::new();
    let mut bad = Vec::new();
    let mut push = |line: u64, r: Result<(String, String, String, Option<String>), String>| match r.and_then(
        |(id, answer, reviewer, at)| {
            if id.trim().is_empty() {
                return Err("missing \"id\"".into());
            }
            if answer.trim().is_empty() {
                return Err("missing \"answer\"".into());
            }
            let reviewer = Some(reviewer.trim().to_string()).filter(|r| !r.is_empty());
            let decided_at = match at.filter(|a| !a.trim().is_empty()) {
                Some(a) => DateTime::parse_from_rfc3339(a.trim())
                    .map(|t| t.with_timezone(&Utc))
                    .map_err(|e| format!("\"decided_at\" is not an RFC 3339 time: {e}"))?,
                None => Utc::now(),
            };
            Ok(Decision { line, id, answer, reviewer, decided_at })
        },
    ) {
        Ok(d) => good.push(d),
        Err(reason) => bad.push(DecisionError { line, reason }),
    };
    if csv_format {
        let mut reader = csv::ReaderBuilder::new().flexible(true).from_reader(body);
        let header: Vec<String> = match reader.headers() {
            Ok(h) => h.iter().map(|s| s.trim().to_string()).collect(),
            Err(e) => {
                bad.push(DecisionError { line: 1, reason: format!("unreadable CSV header: {e}") });
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
        for (n, rec) in reader.records().enumerate() {
            let line = n as u64 + 2;
            push(
                line,
                rec.map_err(|e| format!("invalid CSV: {e}")).map(|r| {
                    let get = |i: usize| r.get(i).unwrap_or("").to_string();
                    (get(ci), get(ca), cr.map(get).unwrap_or_default(), cd.map(get))
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
                    let at = v.get("decided_at").and_then(Value::as_str).map(String::from);
                    Ok((field(&v, "id"), field(&v, "answer"), field(&v, "reviewer"), at))
                }),
            );
        }
    }
    (good, bad)
}

/// Applies decisions all together or not at all: every id must be an item of
/// the job with a result, and answers must be allowed labels when the kind has labels.
pub async fn import(
    pool: &PgPool,
    job_id: Uuid,
    body: &[u8],
    csv_format: bool,
    source: &str,
    actor: &Actor,
) -> Result<ImportReport, Error> {
    let spec = store::job_spec(pool, job_id).await?;
    let (decisions, mut errors) = parse_decisions(body, csv_format);
    let ids: Vec<String> = decisions.iter().map(|d| d.id.clone()).collect();
    let known: HashMap<String, (i64, bool)> = sqlx::query!(
        r#"SELECT i.item_id, i.seq, r.seq IS NOT NULL AS "has_result!"
         FROM items i LEFT JOIN results r ON r.job_id = i.job_id AND r.seq = i.seq
         WHERE i.job_id = $1 AND i.item_id = ANY($2)"#,
        job_id,
        &ids
    )
    .fetch_all(pool)
    .await
    .doing("applying review decisions")?
    .into_iter()
    .map(|r| (r.item_id, (r.seq, r.has_result)))
    .collect();
    let mut apply = Vec::new();
    for d in decisions {
        match known.get(&d.id) {
            None => errors.push(DecisionError { line: d.line, reason: format!("unknown item id \"{}\"", d.id) }),
            Some((_, false)) => {
                errors.push(DecisionError { line: d.line, reason: format!("item \"{}\" has no result yet", d.id) })
            }
            Some(_) if !spec.labels.is_empty() && !spec.labels.contains(&d.answer) => errors.push(DecisionError {
                line: d.line,
                reason: format!("answer \"{}\" is not one of the labels: {}", d.answer, spec.labels.join(", ")),
            }),
            Some((seq, true)) => apply.push((*seq, d)),
        }
    }
    if !errors.is_empty() {
        errors.sort_by_key(|e| e.line);
        return Ok(ImportReport { applied: 0, errors });
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
    tx.commit().await.doing("applying review decisions")?;
    let applied = apply.len() as u64;
    store::event(pool, job_id, "imported", actor, json!({"decisions": applied, "source": source})).await?;
    Ok(ImportReport { applied, errors })
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
            seq: 7,
        };
        let out: Value = serde_json::from_slice(&render(&[item], Format::LabelStudio, &["sports".into()])).unwrap();
        let task = &out[0];
        assert_eq!(task["data"]["text"], "hello");
        assert_eq!(task["data"]["sluice_id"], "doc-1");
        assert_eq!(task["predictions"][0]["score"], 0.42);
        assert_eq!(task["predictions"][0]["result"][0]["value"]["choices"][0], "sports");
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
