//! Label Studio's formats: the labeling config and tasks Sluice exports for a review queue, and Label Studio's own JSON and CSV exports read back as decisions.
//!
//! What this follows, and where it was checked:
//! - The labeling config: `<View>` with one `<Text>` object per input field
//!   and one control, `<Choices>` (one `<Choice>` per label of the kind) or
//!   `<TextArea>` for free-text kinds (labelstud.io/tags/choices,
//!   labelstud.io/tags/textarea). `tests/tests/label_studio.rs` parses it
//!   with label-studio-sdk's `LabelInterface` and validates every exported
//!   prediction with `LabelInterface.validate_prediction`.
//! - Tasks: `{"data": {...}, "predictions": [{"model_version", "score",
//!   "result": [{"from_name", "to_name", "type", "value"}]}]}`
//!   (labelstud.io/guide/task_format). Label Studio gives imported tasks ids
//!   of its own, so the Sluice item id travels in the data (`sluice_id`,
//!   with `sluice_job` and, for a gate, `sluice_stage`).
//! - The JSON export: the same tasks with `annotations`, each with
//!   `result`, `was_cancelled`, `created_at`, `updated_at` and
//!   `completed_by`, a user id or, expanded, `{id, email, first_name,
//!   last_name}` (label-studio `data_export/serializers.py`).
//! - The CSV export: one row per annotation that was not cancelled, newest
//!   first; a column per data field and per control (a single choice or a
//!   single text as the plain string, else JSON), and `annotator`,
//!   `annotation_id`, `created_at`, `updated_at`, `lead_time` (label-studio-sdk
//!   `converter/exports/csv2.py`, which Label Studio's export runs).
//!
//! Reading an export back: tasks map to items through `data.sluice_id`; the
//! latest annotation of a task counts (by `updated_at`, else `created_at`);
//! cancelled (skipped) annotations and tasks nobody annotated are left out;
//! the annotator is kept as the reviewer the file names.

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use uuid::Uuid;

use common::spec::JobSpec;

use crate::model::{DecisionError, LabelStudioNames};
use crate::review::{Decision, QueueItem};

/// The names the config gives its control (the answer) and its object (the
/// document), as checked for one kind.
#[derive(Debug, Clone, PartialEq)]
pub struct Names {
    pub control: String,
    pub object: String,
    /// The data field the object shows.
    field: String,
}

impl Names {
    /// The kind's names: `control` defaults to the kind's answer field,
    /// `object` to its first input field (`text` when it names none).
    pub fn for_kind(spec: &JobSpec, asked: &LabelStudioNames) -> Result<Names, String> {
        let field = spec.input_fields.first().cloned().unwrap_or_else(|| "text".into());
        let control = asked.control.clone().unwrap_or_else(|| spec.answer_field.clone());
        let object = asked.object.clone().unwrap_or_else(|| field.clone());
        for (what, name) in [("control", &control), ("object", &object)] {
            let usable = !name.is_empty()
                && name.len() <= 64
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            if !usable {
                return Err(format!(
                    "the Label Studio {what} name {name:?} must be 1 to 64 letters, digits, '_' or '-'"
                ));
            }
        }
        if control == object {
            return Err(format!("the Label Studio control and object cannot both be named {control:?}"));
        }
        Ok(Names { control, object, field })
    }
}

/// The labeling config for `spec`'s review queue: the document, and a
/// choice of the kind's labels (or a text box when it has none).
pub fn config(spec: &JobSpec, names: &Names) -> String {
    let mut xml = String::from("<View>\n");
    xml.push_str(&format!("  <Text name=\"{}\" value=\"${}\"/>\n", attr(&names.object), attr(&names.field)));
    for extra in spec.input_fields.iter().skip(1) {
        if extra != &names.control && extra != &names.object {
            xml.push_str(&format!("  <Text name=\"{}\" value=\"${}\"/>\n", attr(extra), attr(extra)));
        }
    }
    if spec.labels.is_empty() {
        xml.push_str(&format!(
            "  <TextArea name=\"{}\" toName=\"{}\" editable=\"true\" maxSubmissions=\"1\" required=\"true\"/>\n",
            attr(&names.control),
            attr(&names.object)
        ));
    } else {
        xml.push_str(&format!(
            "  <Choices name=\"{}\" toName=\"{}\" choice=\"single-radio\" showInline=\"true\" required=\"true\">\n",
            attr(&names.control),
            attr(&names.object)
        ));
        for label in &spec.labels {
            xml.push_str(&format!("    <Choice value=\"{}\"/>\n", attr(label)));
        }
        xml.push_str("  </Choices>\n");
    }
    xml.push_str("</View>\n");
    xml
}

/// The queue as Label Studio tasks (a JSON array): the input's fields and
/// the Sluice ids in `data`, the model's answer as a prediction scored with
/// its confidence. An answer the config cannot show (none, or not one of
/// the labels) is left without a prediction.
pub fn tasks(job_id: Uuid, items: &[QueueItem], spec: &JobSpec, names: &Names) -> Vec<u8> {
    let tasks: Vec<Value> = items
        .iter()
        .map(|i| {
            let mut data = match &i.input {
                Value::Object(m) => m.clone(),
                other => Map::from_iter([(names.field.clone(), other.clone())]),
            };
            data.insert("sluice_id".into(), json!(i.id));
            data.insert("sluice_job".into(), json!(job_id));
            if let Some(stage) = &i.stage {
                data.insert("sluice_stage".into(), json!(stage));
            }
            let (kind, value) = match &i.answer {
                Some(a) if spec.labels.is_empty() => ("textarea", json!({"text": [a]})),
                Some(a) if spec.labels.contains(a) => ("choices", json!({"choices": [a]})),
                _ => return json!({"data": data}),
            };
            let mut prediction = json!({
                "model_version": i.model.clone().unwrap_or_default(),
                "result": [{"from_name": names.control, "to_name": names.object, "type": kind, "value": value}]
            });
            if let Some(c) = i.confidence {
                prediction["score"] = json!(c);
            }
            json!({"data": data, "predictions": [prediction]})
        })
        .collect();
    serde_json::to_vec_pretty(&tasks).expect("tasks serialise")
}

/// Whether a decisions body is Label Studio's JSON export (an array of
/// tasks) rather than Sluice's JSON lines.
pub fn is_json_export(body: &[u8]) -> bool {
    body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[')
}

/// Whether a CSV header is that of Label Studio's CSV export of a Sluice
/// queue: it carries the `sluice_id` data field.
pub fn is_csv_export(header: &[String]) -> bool {
    header.iter().any(|h| h == "sluice_id")
}

/// Parsing results: decisions, bad places (by line), and how many tasks had
/// no annotation.
pub type Parsed = (Vec<Decision>, Vec<DecisionError>, u64);

#[derive(Deserialize)]
struct Task {
    #[serde(default)]
    id: Option<Value>,
    #[serde(default)]
    data: Map<String, Value>,
    #[serde(default)]
    annotations: Option<Vec<Annotation>>,
}

#[derive(Deserialize)]
struct Annotation {
    #[serde(default)]
    result: Option<Vec<Region>>,
    #[serde(default)]
    was_cancelled: Option<bool>,
    #[serde(default)]
    completed_by: Option<Value>,
    #[serde(default)]
    created_at: Option<String>,
    #[serde(default)]
    updated_at: Option<String>,
}

#[derive(Deserialize)]
struct Region {
    #[serde(default)]
    from_name: String,
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    value: Value,
}

/// Reads Label Studio's JSON export: one decision per annotated task, from
/// its latest annotation; a bad task is named by the line it starts on.
pub fn parse_json_export(body: &[u8], job_id: Uuid, names: &Names) -> Parsed {
    let (mut good, mut bad, mut skipped) = (Vec::new(), Vec::new(), 0);
    let raws: Vec<&serde_json::value::RawValue> = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            let reason = format!("not a Label Studio JSON export (an array of tasks): {e}");
            bad.push(DecisionError { line: e.line() as u64, reason });
            return (good, bad, skipped);
        }
    };
    for raw in raws {
        let offset = raw.get().as_ptr() as usize - body.as_ptr() as usize;
        let line = 1 + body[..offset].iter().filter(|b| **b == b'\n').count() as u64;
        let task: Task = match serde_json::from_str(raw.get()) {
            Ok(t) => t,
            Err(e) => {
                bad.push(DecisionError { line, reason: format!("not a Label Studio task: {e}") });
                continue;
            }
        };
        let named = task.id.as_ref().map(|i| format!("Label Studio task {i}: ")).unwrap_or_default();
        let annotations = task.annotations.unwrap_or_default();
        let latest = annotations
            .iter()
            .enumerate()
            .filter(|(_, a)| a.was_cancelled != Some(true))
            .max_by_key(|(n, a)| (when(a.updated_at.as_deref().or(a.created_at.as_deref())), *n))
            .map(|(_, a)| a);
        let Some(a) = latest else {
            skipped += 1;
            continue;
        };
        let decided = item_id(&task.data, job_id).and_then(|id| {
            let regions = a.result.as_deref().unwrap_or_default();
            let answer = answer_of(regions, names)?;
            let reviewer = a.completed_by.as_ref().and_then(annotator);
            let at = when(a.updated_at.as_deref().or(a.created_at.as_deref()));
            Ok(decision(line, id, answer, reviewer, at))
        });
        match decided {
            Ok(d) => good.push(d),
            Err(reason) => bad.push(DecisionError { line, reason: format!("{named}{reason}") }),
        }
    }
    (good, bad, skipped)
}

/// Reads Label Studio's CSV export: the rows of one task are its
/// annotations, and the latest counts; rows with an empty answer column are
/// tasks nobody annotated.
pub fn parse_csv_export(body: &[u8], job_id: Uuid, names: &Names) -> Parsed {
    let (mut bad, mut skipped) = (Vec::new(), 0);
    let (header, rows) = crate::review::csv_rows(body, false);
    let header = match header {
        Ok(h) => h,
        Err(reason) => {
            bad.push(DecisionError { line: 1, reason });
            return (Vec::new(), bad, skipped);
        }
    };
    let col = |name: &str| header.iter().position(|h| h == name);
    let (Some(ci), Some(ca)) = (col("sluice_id"), col(&names.control)) else {
        let reason = format!(
            "the Label Studio export has no column \"{}\" for the answer (its columns: {}); name the control with --ls-control",
            names.control,
            header.join(", ")
        );
        bad.push(DecisionError { line: 1, reason });
        return (Vec::new(), bad, skipped);
    };
    let (cj, cw) = (col("sluice_job"), col("annotator"));
    let (cu, cc) = (col("updated_at"), col("created_at"));
    // The latest decision per item, with when it was made.
    let mut latest: std::collections::HashMap<String, (Option<DateTime<Utc>>, Decision)> = Default::default();
    let mut order = Vec::new();
    for (line, rec) in rows {
        let rec = match rec {
            Ok(r) => r,
            Err(reason) => {
                bad.push(DecisionError { line, reason });
                continue;
            }
        };
        let get = |i: Option<usize>| i.and_then(|i| rec.get(i)).unwrap_or("").trim().to_string();
        let cell = get(Some(ca));
        if cell.is_empty() {
            skipped += 1;
            continue;
        }
        let mut data = Map::new();
        data.insert("sluice_id".into(), json!(get(Some(ci))));
        if let Some(j) = Some(get(cj)).filter(|j| !j.is_empty()) {
            data.insert("sluice_job".into(), json!(j));
        }
        let decided = item_id(&data, job_id).and_then(|id| {
            let answer = csv_answer(&cell, &names.control)?;
            let reviewer = Some(get(cw)).filter(|w| !w.is_empty()).map(|w| match w.parse::<u64>() {
                Ok(n) => format!("label-studio user {n}"),
                Err(_) => w,
            });
            let at = [get(cu), get(cc)].into_iter().find(|t| !t.is_empty()).and_then(|t| when(Some(&t)));
            Ok((at, decision(line, id, answer, reviewer, at)))
        });
        match decided {
            Ok((at, d)) => match latest.get(&d.id) {
                Some((seen, _)) if *seen >= at => {}
                seen => {
                    if seen.is_none() {
                        order.push(d.id.clone());
                    }
                    latest.insert(d.id.clone(), (at, d));
                }
            },
            Err(reason) => bad.push(DecisionError { line, reason }),
        }
    }
    let good = order.into_iter().filter_map(|id| latest.remove(&id)).map(|(_, d)| d).collect();
    (good, bad, skipped)
}

fn decision(line: u64, id: String, answer: String, reviewer: Option<String>, at: Option<DateTime<Utc>>) -> Decision {
    Decision { line, id, answer, reviewer, decided_at: at.unwrap_or_else(Utc::now), output: None, reject: None }
}

/// The Sluice item a task stands for, refusing a task of another job.
fn item_id(data: &Map<String, Value>, job_id: Uuid) -> Result<String, String> {
    let id = match data.get("sluice_id") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
        _ => {
            return Err(
                "the task has no data.sluice_id: only tasks exported by `sluice review export --format label-studio` can be read back"
                    .into(),
            )
        }
    };
    match data.get("sluice_job").and_then(Value::as_str) {
        Some(j) if j != job_id.to_string() => Err(format!("item \"{id}\" was exported from job {j}, not {job_id}")),
        _ => Ok(id),
    }
}

/// The answer an annotation gives: the region of the control named (or the
/// only choice or text region), holding one choice or some text.
fn answer_of(regions: &[Region], names: &Names) -> Result<String, String> {
    let answers: Vec<&Region> = regions.iter().filter(|r| matches!(r.kind.as_str(), "choices" | "textarea")).collect();
    let region = match regions.iter().find(|r| r.from_name == names.control) {
        Some(r) => r,
        None if answers.len() == 1 => answers[0],
        None => {
            let found: Vec<&str> = regions.iter().map(|r| r.from_name.as_str()).collect();
            return Err(format!(
                "the annotation has no answer in control \"{}\" (it has: {}); name the control with --ls-control",
                names.control,
                if found.is_empty() { "nothing".to_string() } else { found.join(", ") }
            ));
        }
    };
    let strings = |k: &str| -> Vec<String> {
        region.value[k].as_array().into_iter().flatten().filter_map(|v| v.as_str().map(String::from)).collect()
    };
    match region.kind.as_str() {
        "choices" => match strings("choices").as_slice() {
            [one] => Ok(one.clone()),
            many => {
                Err(format!("{} choices picked in \"{}\": a decision takes exactly one", many.len(), region.from_name))
            }
        },
        "textarea" => {
            let text = strings("text").join("\n");
            if text.trim().is_empty() {
                Err(format!("the text in \"{}\" is empty", region.from_name))
            } else {
                Ok(text)
            }
        }
        other => Err(format!("control \"{}\" is a {other}; Sluice reads choices and textarea", region.from_name)),
    }
}

/// A CSV answer cell: a single choice or text as is; several as JSON.
fn csv_answer(cell: &str, control: &str) -> Result<String, String> {
    if !cell.starts_with('{') && !cell.starts_with('[') {
        return Ok(cell.to_string());
    }
    match serde_json::from_str::<Value>(cell) {
        Ok(v) if v["choices"].is_array() => Err(format!(
            "{} choices picked in \"{control}\": a decision takes exactly one",
            v["choices"].as_array().map_or(0, Vec::len)
        )),
        Ok(v) if v["text"].is_array() => {
            Ok(v["text"].as_array().into_iter().flatten().filter_map(Value::as_str).collect::<Vec<_>>().join("\n"))
        }
        // An answer that merely looks like JSON.
        _ => Ok(cell.to_string()),
    }
}

/// The annotator as Label Studio names them: the email of an expanded
/// user, else the user id.
fn annotator(by: &Value) -> Option<String> {
    match by {
        Value::Number(n) => Some(format!("label-studio user {n}")),
        Value::Object(u) => match (u.get("email").and_then(Value::as_str), u.get("id")) {
            (Some(e), _) if !e.is_empty() => Some(e.to_string()),
            (_, Some(id)) => Some(format!("label-studio user {id}")),
            _ => None,
        },
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        _ => None,
    }
}

fn when(t: Option<&str>) -> Option<DateTime<Utc>> {
    t.and_then(|t| DateTime::parse_from_rfc3339(t.trim()).ok()).map(|t| t.with_timezone(&Utc))
}

/// Escapes an XML attribute value.
fn attr(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&apos;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(labels: &[&str]) -> JobSpec {
        let mut s: JobSpec = serde_json::from_value(json!({
            "kind": "k", "model": "m", "max_tokens": 5, "answer_field": "label", "input_fields": ["text"]
        }))
        .unwrap();
        s.labels = labels.iter().map(|l| l.to_string()).collect();
        s
    }

    #[test]
    fn names_default_to_the_kind_and_are_checked() {
        let s = spec(&["a"]);
        let n = Names::for_kind(&s, &LabelStudioNames::default()).unwrap();
        assert_eq!((n.control.as_str(), n.object.as_str()), ("label", "text"));
        let asked = LabelStudioNames { control: Some("sentiment".into()), object: None };
        assert_eq!(Names::for_kind(&s, &asked).unwrap().control, "sentiment");
        let bad = LabelStudioNames { control: Some("a\"b".into()), object: None };
        assert!(Names::for_kind(&s, &bad).unwrap_err().contains("letters, digits"));
        let same = LabelStudioNames { control: Some("text".into()), object: None };
        assert!(Names::for_kind(&s, &same).unwrap_err().contains("both be named"));
    }

    #[test]
    fn configs_escape_labels_and_pick_the_control() {
        let s = spec(&["R&D", "sports"]);
        let n = Names::for_kind(&s, &LabelStudioNames::default()).unwrap();
        let xml = config(&s, &n);
        assert!(xml.contains("<Choice value=\"R&amp;D\"/>"), "{xml}");
        assert!(xml.contains("<Choices name=\"label\" toName=\"text\""), "{xml}");
        assert!(config(&spec(&[]), &n).contains("<TextArea name=\"label\" toName=\"text\""));
    }

    const JOB: &str = "00000000-0000-0000-0000-000000000001";

    #[test]
    fn the_latest_annotation_counts_and_skips_are_left_out() {
        let job: Uuid = JOB.parse().unwrap();
        let n = Names::for_kind(&spec(&["a", "b"]), &LabelStudioNames::default()).unwrap();
        let body = format!(
            r#"[
  {{"id": 1, "data": {{"sluice_id": "x", "sluice_job": "{JOB}"}}, "annotations": [
    {{"result": [{{"from_name": "label", "to_name": "text", "type": "choices", "value": {{"choices": ["b"]}}}}],
      "completed_by": {{"id": 3, "email": "bo@example.com"}}, "created_at": "2026-01-02T00:00:00Z"}},
    {{"result": [{{"from_name": "label", "to_name": "text", "type": "choices", "value": {{"choices": ["a"]}}}}],
      "completed_by": 2, "created_at": "2026-01-01T00:00:00Z"}},
    {{"result": [], "was_cancelled": true, "completed_by": 4, "created_at": "2026-01-03T00:00:00Z"}}]}},
  {{"id": 2, "data": {{"sluice_id": "y"}}, "annotations": []}},
  {{"id": 3, "data": {{"sluice_id": "z", "sluice_job": "other"}}, "annotations": [{{"result": [], "completed_by": 1}}]}}
]"#
        );
        let (good, bad, skipped) = parse_json_export(body.as_bytes(), job, &n);
        assert_eq!(good.len(), 1);
        assert_eq!((good[0].id.as_str(), good[0].answer.as_str()), ("x", "b"));
        assert_eq!(good[0].reviewer.as_deref(), Some("bo@example.com"));
        assert_eq!(good[0].line, 2);
        assert_eq!(skipped, 1);
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].line, 9);
        assert!(bad[0].reason.starts_with("Label Studio task 3: item \"z\" was exported from job other"), "{bad:?}");
    }

    #[test]
    fn csv_rows_of_one_task_keep_the_latest() {
        let job: Uuid = JOB.parse().unwrap();
        let n = Names::for_kind(&spec(&["a", "b"]), &LabelStudioNames::default()).unwrap();
        let body = "annotation_id,annotator,created_at,id,label,lead_time,sluice_id,text,updated_at\n\
                    7,\"ann@example.com\",\"2026-01-02T00:00:00Z\",1,\"b\",1.5,\"x\",\"two\nlines\",\"2026-01-02T00:00:00Z\"\n\
                    6,2,\"2026-01-01T00:00:00Z\",1,\"a\",1.0,\"x\",\"two\nlines\",\"2026-01-01T00:00:00Z\"\n\
                    ,,,2,,,\"y\",\"unseen\",\n\
                    8,2,\"2026-01-01T00:00:00Z\",3,\"{\"\"choices\"\": [\"\"a\"\", \"\"b\"\"]}\",1.0,\"w\",\"t\",\"2026-01-01T00:00:00Z\"\n";
        let (good, bad, skipped) = parse_csv_export(body.as_bytes(), job, &n);
        assert_eq!(good.len(), 1);
        assert_eq!((good[0].answer.as_str(), good[0].reviewer.as_deref()), ("b", Some("ann@example.com")));
        assert_eq!(skipped, 1);
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].line, 7, "a row is named by the line it starts on");
        assert!(bad[0].reason.contains("2 choices picked"), "{bad:?}");
        let (_, bad, _) = parse_csv_export(b"id,sluice_id,sentiment\n1,x,a\n", job, &n);
        assert!(bad[0].reason.contains("no column \"label\""), "{bad:?}");
    }
}
