//! Multi-stage kinds end to end: items move through stages without a barrier, each stage with its own model, results and attempts; a failed stage resumes where it stopped.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{json, Value};
use sluice_tests::fixtures::{wait_for, Stack};
use sluice_tests::sim::SimConfig;
use sqlx::Row;
use uuid::Uuid;

/// A three-stage kind as a user writes it: an outline from the brief, a
/// draft from the outline on another model, a check of the draft.
fn three_stage_kind() -> (tempfile::TempDir, common::spec::JobKind) {
    kind_with("")
}

/// The three-stage kind with `outline` settings added to its first stage.
fn kind_with(outline: &str) -> (tempfile::TempDir, common::spec::JobKind) {
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
    file(
        "job.toml",
        &r#"
kind = "brief-to-draft"
model = "sim-small"
max_tokens = 200
answer_field = "title"
input_fields = ["text"]
chunk_size = 10

[[stages]]
name = "outline"
template = "outline.j2"
schema = "outline.json"
OUTLINE

[[stages]]
name = "draft"
template = "draft.j2"
schema = "draft.json"
model = "sim-large"
answer_field = "body"

[[stages]]
name = "check"
template = "check.j2"
schema = "check.json"
answer_field = "verdict"
"#
        .replace("OUTLINE", outline),
    );
    // The simulator answers a string field with the first words of the text
    // after "Document:", so each stage's answer shows what its prompt held.
    file("outline.j2", "Outline an article for this brief.\nDocument: {{ text }}");
    file("draft.j2", "Draft the article the outline titles.\nDocument: {{ stages.outline.title }}");
    file("check.j2", "Check the draft.\nDocument: {{ stages.draft.body }} {{ stages.outline.title }}");
    let schema = |field: &str, len: u32| {
        serde_json::json!({"type": "object", "properties": {field: {"type": "string", "maxLength": len}},
                           "required": [field], "additionalProperties": false})
        .to_string()
    };
    file("outline.json", &schema("title", 40));
    file("draft.json", &schema("body", 30));
    file("check.json", &schema("verdict", 60));
    let kind = common::spec::JobKind::load(dir.path()).expect("the three-stage kind loads");
    (dir, kind)
}

fn briefs(n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| {
            format!("{{\"id\": \"b{i}\", \"text\": \"brief number {i} about rivers and the towns along them\"}}\n")
        })
        .collect::<String>()
        .into_bytes()
}

/// (stage, model) -> calls made, from the audit trail.
async fn calls(stack: &Stack, job: Uuid) -> HashMap<(i16, String), i64> {
    sqlx::query("SELECT stage, model, count(*) AS n FROM audit_attempts WHERE job_id = $1 GROUP BY 1, 2")
        .bind(job)
        .fetch_all(&stack.db.pool)
        .await
        .unwrap()
        .iter()
        .map(|r| ((r.get("stage"), r.get("model")), r.get("n")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_stage_kind_takes_every_item_through_each_stage_on_its_own_model() {
    let mut stack = Stack::start(SimConfig { latency_ms: 5, ..Default::default() }, |_| {}).await.unwrap();
    stack.add_worker(|_| {});
    let (_dir, kind) = three_stage_kind();
    let report = stack.submit_kind(kind, briefs(40), false).await.unwrap();
    assert_eq!(report.items, 40);
    stack.wait_completed(report.job_id, Duration::from_secs(90)).await.unwrap();

    // One call per item and stage, each on its stage's model.
    let calls = calls(&stack, report.job_id).await;
    let want: HashMap<(i16, String), i64> =
        [((0, "sim-small".into()), 40), ((1, "sim-large".into()), 40), ((2, "sim-small".into()), 40)].into();
    assert_eq!(calls, want);
    assert_eq!(stack.sim.sim.stats().requests, 120);

    // Each stage read the one before: the draft starts with the outline's
    // title, the check with the draft; the item's result is the last stage's.
    let rows = sqlx::query(
        "SELECT r.item_id, r.state, r.stage, r.answer, o.output->>'title' AS title, d.output->>'body' AS body
         FROM results r
         JOIN stage_results o ON o.job_id = r.job_id AND o.seq = r.seq AND o.stage = 0
         JOIN stage_results d ON d.job_id = r.job_id AND d.seq = r.seq AND d.stage = 1
         WHERE r.job_id = $1",
    )
    .bind(report.job_id)
    .fetch_all(&stack.db.pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 40, "every item has both earlier stages' answers and a result");
    for r in &rows {
        let (id, state, stage): (String, String, Option<i16>) = (r.get("item_id"), r.get("state"), r.get("stage"));
        let (title, body, answer): (String, String, String) = (r.get("title"), r.get("body"), r.get("answer"));
        let n = id.trim_start_matches('b');
        assert_eq!((state.as_str(), stage), ("succeeded", Some(2)), "{id}");
        assert!(title.starts_with(&format!("brief number {n} ")), "{id}: outline {title:?}");
        assert!(!body.is_empty() && title.starts_with(&body), "{id}: draft {body:?} from outline {title:?}");
        assert!(answer.starts_with(&body), "{id}: check {answer:?} of draft {body:?}");
    }

    // status shows each stage.
    let st = stack.status(report.job_id).await.unwrap();
    assert_eq!(st.succeeded, 40);
    let stages: Vec<(&str, u64, u64, u64)> =
        st.stages.iter().map(|s| (s.name.as_str(), s.passed, s.failed, s.attempts)).collect();
    assert_eq!(stages, [("outline", 40, 0, 40), ("draft", 40, 0, 40), ("check", 40, 0, 40)]);
    let stage_cost: f64 = st.stages.iter().map(|s| s.cost_usd).sum();
    assert!(st.cost_usd > 0.0 && (stage_cost - st.cost_usd).abs() < 1e-9, "{stage_cost} vs {}", st.cost_usd);
    let out = stack.sluice(&["status", &report.job_id.to_string()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("stage 2  draft: 40 passed; 40 calls"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_item_failing_stage_two_does_not_run_stage_three_and_resumes_from_stage_two() {
    // The draft's model refuses every request (400): every item fails there.
    let sim = SimConfig { reject_models: vec!["sim-large".into()], ..Default::default() };
    let mut stack = Stack::start(sim, |_| {}).await.unwrap();
    stack.add_worker(|_| {});
    let (_dir, kind) = three_stage_kind();
    let report = stack.submit_kind(kind, briefs(20), false).await.unwrap();
    let job = report.job_id;
    wait_for("every item failed", Duration::from_secs(60), || async {
        let st = stack.client.status(job).await?;
        Ok(st.failed == 20 && st.state == "completed")
    })
    .await
    .unwrap();
    let st = stack.status(job).await.unwrap();
    let at: Vec<(u64, u64)> = st.stages.iter().map(|s| (s.passed, s.failed)).collect();
    assert_eq!(at, [(20, 0), (0, 20), (0, 0)], "passed and failed per stage");
    let failed: Vec<(Option<i16>, String)> = sqlx::query("SELECT stage, error FROM results WHERE job_id = $1")
        .bind(job)
        .fetch_all(&stack.db.pool)
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get("stage"), r.get("error")))
        .collect();
    for (stage, error) in &failed {
        assert_eq!(*stage, Some(1));
        assert!(error.starts_with("stage 2 (draft): "), "{error}");
    }
    let before = calls(&stack, job).await;
    assert!(!before.keys().any(|(stage, _)| *stage == 2), "no check call after a failed draft: {before:?}");
    assert_eq!(before[&(0, "sim-small".to_string())], 20);

    // The model is back; resume runs the drafts and checks, not the outlines.
    stack.sim.sim.set_config(SimConfig::default());
    stack.client.resume(job, false).await.unwrap();
    stack.wait_completed(job, Duration::from_secs(60)).await.unwrap();
    let st = stack.status(job).await.unwrap();
    assert_eq!((st.succeeded, st.failed), (20, 0));
    let after = calls(&stack, job).await;
    assert_eq!(after[&(0, "sim-small".to_string())], 20, "outlines were not asked again");
    assert_eq!(after[&(2, "sim-small".to_string())], 20);
    assert!(after[&(1, "sim-large".to_string())] > before[&(1, "sim-large".to_string())]);
    // Attempt numbers go on across stages and deliveries: none repeats.
    let repeated: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT seq, attempt FROM audit_attempts WHERE job_id = $1
                               GROUP BY 1, 2 HAVING count(*) > 1) d",
    )
    .bind(job)
    .fetch_one(&stack.db.pool)
    .await
    .unwrap();
    assert_eq!(repeated, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kinds_with_stages_that_cannot_run_are_refused_at_submit_with_the_field_named() {
    let stack = Stack::start(SimConfig::default(), |_| {}).await.unwrap();
    let (_dir, kind) = three_stage_kind();
    // A stage reading a stage that runs after it (a cycle).
    let mut cyclic = kind.clone();
    cyclic.stage_files[0].template = "Document: {{ stages.check.verdict }}".into();
    // A model no provider serves.
    let mut unknown = kind.clone();
    unknown.spec.stages[1].model = Some("no-such-model".into());
    // A stage reading one that does not exist.
    let mut misnamed = kind.clone();
    misnamed.stage_files[1].template = "Document: {{ stages.outlne.title }}".into();
    // An ensemble of one model.
    let mut alone = kind.clone();
    alone.spec.stages[1].model = None;
    alone.spec.stages[1].ensemble = vec!["sim-large".into()];
    // A gate on the last stage.
    let mut gated_last = kind.clone();
    gated_last.spec.stages[2].gate = Some(common::stages::Gate::ApproveAll);
    // Batch mode.
    let batch = coordinator::model::NewJob { mode: Some(common::state::JobMode::Batch), ..sluice_tests_new(kind) };
    for (job, want) in [
        (sluice_tests_new(cyclic), "stages[0].template (outline): reads stages.check, which does not run before it"),
        (sluice_tests_new(misnamed), "stages[1].template (draft): reads stages.outlne, but no stage is named outlne"),
        (sluice_tests_new(alone), "stages[1].ensemble (draft): an ensemble of one model is no ensemble"),
        (sluice_tests_new(gated_last), "stages[2].gate (check): the last stage has no stage after it"),
        (sluice_tests_new(unknown), "stages[1] (draft): model \"no-such-model\""),
        (batch, "a multi-stage job runs its calls live"),
    ] {
        let err = stack.client.create_job(&job).await.unwrap_err().to_string();
        assert!(err.contains(want), "{err}");
    }
}

fn sluice_tests_new(kind: common::spec::JobKind) -> coordinator::model::NewJob {
    coordinator::model::NewJob { input_name: Some("briefs.jsonl".into()), ..coordinator::model::NewJob::new(kind) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_gate_holds_every_item_until_a_reviewer_approves_edits_or_rejects_it() {
    let mut stack = Stack::start(SimConfig::default(), |_| {}).await.unwrap();
    stack.add_worker(|_| {});
    let (_dir, kind) = kind_with("gate = \"approve_all\"");
    let report = stack.submit_kind(kind, briefs(6), false).await.unwrap();
    let job = report.job_id;
    // Every outline is written, then every item waits: the chunks are done,
    // the job is not, and no draft is asked for.
    wait_for("every item waiting at the gate", Duration::from_secs(60), || async {
        let st = stack.client.status(job).await?;
        Ok(st.stages.first().is_some_and(|s| s.waiting == 6) && st.chunks_done == st.chunks_total)
    })
    .await
    .unwrap();
    assert_eq!(stack.client.status(job).await.unwrap().state, "running");
    assert_eq!(calls(&stack, job).await.len(), 1, "only outlines were asked for");

    // The review queue lists the held outlines, their stage named.
    let queue = stack.client.review_export(job, None, "jsonl").await.unwrap();
    let queue: Vec<Value> = String::from_utf8_lossy(&queue).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(queue.len(), 6);
    assert!(queue.iter().all(|q| q["stage"] == "outline" && q["state"] == "held"), "{queue:?}");
    let title = |id: &str| queue.iter().find(|q| q["id"] == id).unwrap()["answer"].as_str().unwrap().to_string();

    // Bad decisions are refused with their line, and nothing is applied: an
    // edit the stage's schema refuses (a title over 40 characters), a
    // decision that both answers and rejects.
    let long = "x".repeat(41);
    let bad =
        format!("{}\n{}\n", json!({"id": "b0", "answer": long}), json!({"id": "b1", "answer": "fine", "reject": "no"}));
    let err = stack.client.review_import(job, bad.into_bytes(), "jsonl", "test").await.unwrap_err();
    let coordinator::client::ClientError::Decisions { errors, .. } = err else { panic!("{err}") };
    let lines: Vec<u64> = errors.iter().map(|e| e.line).collect();
    assert_eq!(lines, [1, 2], "{errors:?}");
    assert!(errors[0].reason.contains("does not match stage 1 (outline)'s schema"), "{errors:?}");
    assert_eq!(stack.client.status(job).await.unwrap().stages[0].waiting, 6, "nothing was applied");

    // b0 approved as it is, b1 with its title edited, b2 with its whole
    // output edited, b3 rejected; b4 and b5 stay held.
    let decisions = [
        json!({"id": "b0", "answer": title("b0"), "reviewer": "ann"}),
        json!({"id": "b1", "answer": "rivers retold"}),
        json!({"id": "b2", "output": {"title": "towns along the water"}}),
        json!({"id": "b3", "reject": "off brief"}),
    ];
    let body: String = decisions.iter().map(|d| format!("{d}\n")).collect();
    let r = stack.client.review_import(job, body.into_bytes(), "jsonl", "test").await.unwrap();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(r.applied, 4);
    wait_for("the approved items finished", Duration::from_secs(60), || async {
        let st = stack.client.status(job).await?;
        Ok(st.succeeded == 3 && st.failed == 1)
    })
    .await
    .unwrap();
    let st = stack.status(job).await.unwrap();
    assert_eq!(st.state, "running", "b4 and b5 still wait");
    let at: Vec<(u64, u64, u64)> = st.stages.iter().map(|s| (s.passed, s.waiting, s.failed)).collect();
    assert_eq!(at, [(3, 2, 1), (3, 0, 0), (3, 0, 0)], "passed, waiting, failed per stage");

    // The drafts were written from the outlines as decided.
    let drafts: HashMap<String, String> = sqlx::query(
        "SELECT i.item_id, s.output->>'body' AS body FROM stage_results s
         JOIN items i ON i.job_id = s.job_id AND i.seq = s.seq WHERE s.job_id = $1 AND s.stage = 1",
    )
    .bind(job)
    .fetch_all(&stack.db.pool)
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get("item_id"), r.get("body")))
    .collect();
    assert!(title("b0").starts_with(&drafts["b0"]), "{drafts:?}");
    assert_eq!(drafts["b1"], "rivers retold");
    assert_eq!(drafts["b2"], "towns along the water");
    let (state, error): (String, String) =
        sqlx::query_as("SELECT r.state, r.error FROM results r JOIN items i USING (job_id, seq) WHERE r.job_id = $1 AND i.item_id = 'b3'")
            .bind(job)
            .fetch_one(&stack.db.pool)
            .await
            .unwrap();
    assert_eq!(state, "failed");
    assert!(error.starts_with("rejected at stage 1 (outline) by ") && error.ends_with(": off brief"), "{error}");
    // Each decision is kept with its verdict.
    let verdicts: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT verdict, reason FROM reviews WHERE job_id = $1 ORDER BY seq")
            .bind(job)
            .fetch_all(&stack.db.pool)
            .await
            .unwrap();
    let want: Vec<(String, Option<String>)> = vec![
        ("approved".into(), None),
        ("edited".into(), None),
        ("edited".into(), None),
        ("rejected".into(), Some("off brief".into())),
    ];
    assert_eq!(verdicts, want);

    // The last two approved: the job completes, each outline asked for once.
    let body = format!("id,answer\nb4,{}\nb5,{}\n", title("b4"), title("b5"));
    let r = stack.client.review_import(job, body.into_bytes(), "csv", "test").await.unwrap();
    assert_eq!((r.applied, r.errors.len()), (2, 0), "{:?}", r.errors);
    stack.wait_completed(job, Duration::from_secs(60)).await.unwrap();
    let st = stack.status(job).await.unwrap();
    assert_eq!((st.succeeded, st.failed), (5, 1));
    let calls = calls(&stack, job).await;
    assert_eq!(calls[&(0, "sim-small".to_string())], 6);
    assert_eq!(calls[&(1, "sim-large".to_string())], 5);
}

/// A kind reading long documents: cut into segments of `segment_tokens`,
/// each segment's clauses classified, then one verdict per document over
/// the segments' labels, on another model.
fn clauses_kind(segment_tokens: u32) -> (tempfile::TempDir, common::spec::JobKind) {
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
    file(
        "job.toml",
        &format!(
            r#"
kind = "clauses"
model = "sim-small"
max_tokens = 60
answer_field = "label"
input_fields = ["text"]
chunk_size = 5

[[stages]]
name = "cut"
type = "split"
segment_tokens = {segment_tokens}
overlap_tokens = 20

[[stages]]
name = "classify"
template = "classify.j2"
schema = "classify.json"

[[stages]]
name = "verdict"
type = "reduce"
template = "verdict.j2"
schema = "verdict.json"
model = "sim-large"
answer_field = "verdict"
"#
        ),
    );
    file("classify.j2", "Classify the clauses of this part.\nDocument: {{ segment.text }}");
    file(
        "verdict.j2",
        "Combine the parts' labels.\nDocument: {% for s in segments %}{{ s.number }}:{{ s.classify.label }} {% endfor %}",
    );
    file(
        "classify.json",
        r#"{"type": "object", "properties": {"label": {"type": "string", "maxLength": 12}}, "required": ["label"]}"#,
    );
    file(
        "verdict.json",
        r#"{"type": "object", "properties": {"verdict": {"type": "string", "maxLength": 200}}, "required": ["verdict"]}"#,
    );
    let kind = common::spec::JobKind::load(dir.path()).expect("the clauses kind loads");
    (dir, kind)
}

/// Documents of about 5,000 bytes in paragraphs: over 1,000 tokens each.
fn contracts(n: usize) -> (Vec<u8>, Vec<String>) {
    let texts: Vec<String> = (0..n)
        .map(|d| {
            (0..20)
                .map(|p| {
                    format!("clause{p} of contract{d} binds the parties to terms that run on for some words here ")
                        .repeat(3)
                })
                .collect::<Vec<_>>()
                .join("\n\n")
        })
        .collect();
    let lines = texts
        .iter()
        .enumerate()
        .map(|(d, t)| format!("{}\n", json!({"id": format!("c{d}"), "text": t})))
        .collect::<String>();
    (lines.into_bytes(), texts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_and_reduce_read_documents_longer_than_the_models_context_and_resume_by_segment() {
    // The models' context is 400 tokens; each document is over 1,000. The
    // reduce stage's model refuses everything at first.
    let sim = SimConfig { context_tokens: 400, reject_models: vec!["sim-large".into()], ..Default::default() };
    let mut stack = Stack::start(sim, |_| {}).await.unwrap();
    stack.add_worker(|_| {});
    let (input, texts) = contracts(6);
    assert!(texts.iter().all(|t| t.len() / 4 > 1_000));

    // Without cutting (one segment as large as the document), the model refuses it.
    let (_whole_dir, whole) = clauses_kind(100_000);
    let report = stack.submit_kind(whole, input.clone(), false).await.unwrap();
    wait_for("the uncut documents failed", Duration::from_secs(60), || async {
        Ok(stack.client.status(report.job_id).await?.failed == 6)
    })
    .await
    .unwrap();
    let error: String = sqlx::query_scalar("SELECT error FROM results WHERE job_id = $1 LIMIT 1")
        .bind(report.job_id)
        .fetch_one(&stack.db.pool)
        .await
        .unwrap();
    assert!(error.starts_with("stage 2 (classify), segment 1 of 1: "), "{error}");
    assert!(error.contains("maximum context length is 400 tokens"), "{error}");

    // Cut into segments of 250 tokens, every segment fits; the verdicts fail
    // on the refusing model, and resume from there.
    let (_dir, kind) = clauses_kind(250);
    let report = stack.submit_kind(kind, input, false).await.unwrap();
    let job = report.job_id;
    wait_for("every verdict failed", Duration::from_secs(60), || async {
        Ok(stack.client.status(job).await?.failed == 6)
    })
    .await
    .unwrap();
    let expected: Vec<usize> = texts.iter().map(|t| common::segment::split(t, 250, 20).len()).collect();
    let segments: usize = expected.iter().sum();
    assert!(expected.iter().all(|&n| n >= 4), "{expected:?}");
    let before = calls(&stack, job).await;
    assert_eq!(before[&(1, "sim-small".to_string())], segments as i64, "one call per segment");
    stack.sim.sim.set_config(SimConfig { context_tokens: 400, ..Default::default() });
    stack.client.resume(job, false).await.unwrap();
    stack.wait_completed(job, Duration::from_secs(60)).await.unwrap();
    let after = calls(&stack, job).await;
    assert_eq!(after[&(1, "sim-small".to_string())], segments as i64, "no segment was classified twice");

    // Each document's split is recorded, each segment's label kept, and the
    // verdict read every segment's label in order.
    let st = stack.status(job).await.unwrap();
    assert_eq!((st.succeeded, st.failed), (6, 0));
    for (d, n) in expected.iter().enumerate() {
        let id = format!("c{d}");
        let rows: Vec<(i16, i32, Value)> = sqlx::query_as(
            "SELECT s.stage, s.seg, s.output FROM stage_results s JOIN items i USING (job_id, seq)
             WHERE s.job_id = $1 AND i.item_id = $2 ORDER BY s.stage, s.seg",
        )
        .bind(job)
        .bind(&id)
        .fetch_all(&stack.db.pool)
        .await
        .unwrap();
        assert_eq!(rows[0], (0, 0, json!({"segments": n})), "{id}");
        let labels: Vec<String> = rows[1..].iter().map(|(_, _, o)| o["label"].as_str().unwrap().to_string()).collect();
        assert_eq!(rows.len(), 1 + n, "{id}: {rows:?}");
        let verdict: String = sqlx::query_scalar(
            "SELECT r.answer FROM results r JOIN items i USING (job_id, seq) WHERE r.job_id = $1 AND i.item_id = $2",
        )
        .bind(job)
        .bind(&id)
        .fetch_one(&stack.db.pool)
        .await
        .unwrap();
        let read: String = labels.iter().enumerate().map(|(s, l)| format!("{}:{l} ", s + 1)).collect();
        assert!(read.trim_end().starts_with(verdict.trim_end()), "{id}: verdict {verdict:?} from {read:?}");
        assert!(verdict.contains(&format!("{n}:")), "{id}: the verdict saw all {n} segments: {verdict:?}");
    }
}

/// A providers file serving three models of the simulator.
const THREE_MODELS: &str = r#"
[providers.sim]
kind = "openai"
base_url = "http://{sim0}/v1"
[providers.sim.models.sim-small]
rpm = 60000
[providers.sim.models.sim-large]
rpm = 60000
[providers.sim.models.sim-reasoner]
rpm = 60000
"#;

/// The shipped `classify` kind as one stage answered by three models.
fn ensemble_kind() -> common::spec::JobKind {
    ensemble_kind_with(json!({"ensemble": ["sim-small", "sim-large", "sim-reasoner"]}))
}

/// The shipped `classify` kind as one stage with `ensemble` settings.
fn ensemble_kind_with(ensemble: Value) -> common::spec::JobKind {
    let dir = sluice_tests::fixtures::jobs_dir().join("classify");
    let mut kind = common::spec::JobKind::load(&dir).unwrap();
    let mut stage = json!({"name": "label", "template": "prompt.j2", "schema": "schema.json",
                           "confidence_threshold": 0.7});
    stage.as_object_mut().unwrap().extend(ensemble.as_object().unwrap().clone());
    kind.spec.stages = vec![serde_json::from_value(stage).unwrap()];
    kind.stage_files =
        vec![common::stages::StageFiles { template: kind.template.clone(), schema: kind.schema.clone() }];
    kind.validate().unwrap();
    kind
}

/// The known label of each sample document of `seed`, by id.
fn expected_labels(seed: u64, n: u64) -> HashMap<String, String> {
    (0..n)
        .map(|i| {
            let d = common::sample::document(seed, i);
            (d["id"].as_str().unwrap().to_string(), d["expected"].as_str().unwrap().to_string())
        })
        .collect()
}

/// Each result's answer, confidence, review state and the ensemble's votes.
async fn verdicts(stack: &Stack, job: Uuid) -> Vec<(String, String, f64, String, Value)> {
    sqlx::query_as(
        "SELECT item_id, answer, confidence, state, confidence_detail FROM results WHERE job_id = $1 ORDER BY seq",
    )
    .bind(job)
    .fetch_all(&stack.db.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ensemble_votes_and_sends_disagreements_and_missing_members_to_review() {
    // sim-large is wrong on a third of the documents, on its own draw.
    let sim = SimConfig { wrong_models: vec!["sim-large=0.35".into()], ..Default::default() };
    let mut stack = Stack::start_with_providers(vec![sim], THREE_MODELS).await.unwrap();
    stack.add_worker(|_| {});
    let n = 40;
    let report = stack.submit_kind(ensemble_kind(), sluice_tests::fixtures::sample_jsonl(5, n), false).await.unwrap();
    stack.wait_completed(report.job_id, Duration::from_secs(90)).await.unwrap();
    let expected = expected_labels(5, n);
    let (mut split, mut flagged_unanimous) = (0, 0);
    for (id, answer, confidence, state, detail) in verdicts(&stack, report.job_id).await {
        // The majority is right even where sim-large is not.
        assert_eq!(answer, expected[&id], "{id}: {detail}");
        let votes = detail["votes"].as_array().unwrap();
        assert_eq!(votes.len(), 3, "every member's answer is kept: {detail}");
        let own = |m: usize| votes[m]["confidence"].as_f64().unwrap();
        let agree: Vec<usize> = (0..3).filter(|&m| votes[m]["answer"] == answer.as_str()).collect();
        // Agreement across models times the agreeing models' own confidence.
        let want = agree.iter().map(|&m| own(m)).sum::<f64>() / 3.0;
        assert!((confidence - want).abs() < 1e-9, "{id}: {confidence} vs {want}: {detail}");
        assert_eq!(state == "needs_review", confidence < 0.7, "{id}: routed by the stage's threshold");
        if agree.len() == 2 {
            split += 1;
            assert_eq!(votes[1]["model"], "sim-large");
            assert!((detail["agreement"].as_f64().unwrap() - 2.0 / 3.0).abs() < 1e-9);
            assert_eq!(state, "needs_review", "{id}: a disagreement is reviewed");
        } else if state == "needs_review" {
            flagged_unanimous += 1;
        }
    }
    assert!(split >= 5, "sim-large disagreed on {split} of {n}");
    assert!(flagged_unanimous < n / 4, "{flagged_unanimous} unanimous answers flagged");
    // The review queue shows who said what.
    let csv = stack.client.review_export(report.job_id, None, "csv").await.unwrap();
    let csv = String::from_utf8_lossy(&csv);
    assert!(csv.lines().next().unwrap().ends_with(",stage,votes"), "{csv}");
    assert!(csv.contains("sim-small=") && csv.contains("; sim-large="), "{csv}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ensemble_with_a_model_down_answers_without_it_and_says_so() {
    let sim = SimConfig { down_models: vec!["sim-reasoner".into()], ..Default::default() };
    let mut stack = Stack::start_with_providers(vec![sim], THREE_MODELS).await.unwrap();
    stack.add_worker(|_| {});
    let n = 20;
    let report = stack.submit_kind(ensemble_kind(), sluice_tests::fixtures::sample_jsonl(6, n), false).await.unwrap();
    stack.wait_completed(report.job_id, Duration::from_secs(120)).await.unwrap();
    let st = stack.status(report.job_id).await.unwrap();
    assert_eq!((st.succeeded, st.failed), (n, 0), "answered by the two models up");
    for (id, _, confidence, state, detail) in verdicts(&stack, report.job_id).await {
        let votes = detail["votes"].as_array().unwrap();
        assert_eq!(votes[2]["model"], "sim-reasoner");
        assert!(votes[2]["error"].is_string() && votes[2]["answer"].is_null(), "{id}: {detail}");
        assert_eq!(detail["answered"], 2);
        // Two of three at most: below the threshold, so every answer is reviewed.
        assert!(confidence <= 2.0 / 3.0 + 1e-9, "{id}: {confidence}");
        assert_eq!(state, "needs_review", "{id}");
    }
}

/// Runs `sluice sample KIND --count N` and returns its lines.
fn sample(stack: &Stack, kind: &str, count: usize) -> (Vec<u8>, Vec<Value>) {
    let out = stack.sluice(&["sample", kind, "--count", &count.to_string(), "--seed", "3"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines = String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    (out.stdout, lines)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contract_review_catches_the_wrong_verdicts_of_three_independently_wrong_models() {
    let wrong = ["sim-small=0.1", "sim-large=0.1", "sim-reasoner=0.1"].map(String::from).to_vec();
    let mut stack =
        Stack::start_with_providers(vec![SimConfig { wrong_models: wrong, ..Default::default() }], THREE_MODELS)
            .await
            .unwrap();
    stack.add_worker(|_| {});
    let (input, contracts) = sample(&stack, "contract-review", 60);
    let report = stack.submit("contract-review", input, false).await.unwrap();
    stack.wait_completed(report.job_id, Duration::from_secs(120)).await.unwrap();
    let st = stack.status(report.job_id).await.unwrap();
    assert_eq!((st.succeeded, st.failed), (60, 0));
    let names: Vec<&str> = st.stages.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["parts", "clauses", "verdict"]);
    assert_eq!(st.stages[1].passed, 60);
    assert!(st.stages[1].answers >= 120, "about three parts a contract: {:?}", st.stages[1]);
    let expected: HashMap<String, String> = contracts
        .iter()
        .map(|c| (c["id"].as_str().unwrap().to_string(), c["expected"].as_str().unwrap().to_string()))
        .collect();
    let (mut wrong, mut caught, mut flagged) = (0, 0, 0);
    for (id, answer, _, state, detail) in verdicts(&stack, report.job_id).await {
        let review = state == "needs_review";
        flagged += usize::from(review);
        if answer != expected[&id] {
            wrong += 1;
            caught += usize::from(review);
            assert!(review, "{id}: the wrong verdict {answer} went unflagged: {detail}");
        }
        if answer == "risky" && !review {
            assert!(detail["votes"][0]["answer"] == "risky", "{detail}");
        }
    }
    // The models disagree somewhere, and not every contract is flagged.
    assert!(flagged > 0 && flagged < 60 / 4, "{flagged} of 60 flagged, {wrong} wrong, {caught} caught");

    // A reviewer decides the flagged contracts from the review queue.
    let queue = stack.client.review_export(report.job_id, None, "jsonl").await.unwrap();
    let decisions: String = String::from_utf8_lossy(&queue)
        .lines()
        .map(|l| {
            let q: Value = serde_json::from_str(l).unwrap();
            assert_eq!(q["confidence_detail"]["votes"].as_array().unwrap().len(), 3, "who said what: {q}");
            let id = q["id"].as_str().unwrap();
            format!("{}\n", json!({"id": id, "answer": expected[id], "reviewer": "legal"}))
        })
        .collect();
    let r = stack.client.review_import(report.job_id, decisions.into_bytes(), "jsonl", "test").await.unwrap();
    assert_eq!(r.applied as usize, flagged);
    assert_eq!(stack.client.status(report.job_id).await.unwrap().reviewed as usize, flagged);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn article_goes_from_brief_through_an_approved_outline_to_a_checked_draft() {
    let mut stack = Stack::start_with_providers(vec![SimConfig::default()], THREE_MODELS).await.unwrap();
    stack.add_worker(|_| {});
    let (input, briefs) = sample(&stack, "article", 5);
    let report = stack.submit("article", input, false).await.unwrap();
    let job = report.job_id;
    wait_for("every outline waiting for approval", Duration::from_secs(60), || async {
        Ok(stack.client.status(job).await?.stages.first().is_some_and(|s| s.waiting == 5))
    })
    .await
    .unwrap();
    // The editor approves four outlines and rejects one.
    let queue = stack.client.review_export(job, None, "jsonl").await.unwrap();
    let titles: HashMap<String, String> = String::from_utf8_lossy(&queue)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .map(|q| (q["id"].as_str().unwrap().to_string(), q["answer"].as_str().unwrap().to_string()))
        .collect();
    let mut decisions = String::from("id,answer,reject\n");
    for b in &briefs[..4] {
        let id = b["id"].as_str().unwrap();
        decisions.push_str(&format!("{id},\"{}\",\n", titles[id].replace('"', "\"\"")));
    }
    decisions.push_str(&format!("{},,not our beat\n", briefs[4]["id"].as_str().unwrap()));
    let r = stack.client.review_import(job, decisions.into_bytes(), "csv", "test").await.unwrap();
    assert_eq!(r.applied, 5, "{:?}", r.errors);
    stack.wait_completed(job, Duration::from_secs(60)).await.unwrap();
    let st = stack.status(job).await.unwrap();
    assert_eq!((st.succeeded, st.failed), (4, 1));
    let at: Vec<(u64, u64)> = st.stages.iter().map(|s| (s.passed, s.failed)).collect();
    assert_eq!(at, [(4, 1), (4, 0), (4, 0)]);
    // Each draft cites from its brief and is checked; the check's answer is
    // the item's result.
    let rows: Vec<(String, Value, Value)> = sqlx::query_as(
        "SELECT i.item_id, d.output, r.output FROM results r JOIN items i USING (job_id, seq)
         JOIN stage_results d ON d.job_id = r.job_id AND d.seq = r.seq AND d.stage = 1 WHERE r.job_id = $1",
    )
    .bind(job)
    .fetch_all(&stack.db.pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 4);
    for (id, draft, check) in rows {
        assert!(draft["headline"].is_string() && draft["body"].is_string(), "{id}: {draft}");
        assert!(["publish", "revise"].contains(&check["verdict"].as_str().unwrap()), "{id}: {check}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adjudicator_settles_the_ensembles_disagreements_and_only_those() {
    // Two members, sim-large wrong on half the documents; sim-reasoner judges.
    let sim = SimConfig { wrong_models: vec!["sim-large=0.5".into()], ..Default::default() };
    let mut stack = Stack::start_with_providers(vec![sim], THREE_MODELS).await.unwrap();
    stack.add_worker(|_| {});
    let kind = ensemble_kind_with(json!({"ensemble": ["sim-small", "sim-large"], "adjudicator": "sim-reasoner"}));
    let n = 30;
    let report = stack.submit_kind(kind, sluice_tests::fixtures::sample_jsonl(8, n), false).await.unwrap();
    stack.wait_completed(report.job_id, Duration::from_secs(90)).await.unwrap();
    let expected = expected_labels(8, n);
    let mut split = 0;
    for (id, answer, confidence, _, detail) in verdicts(&stack, report.job_id).await {
        let votes = detail["votes"].as_array().unwrap();
        if votes[0]["answer"] == votes[1]["answer"] {
            assert!(detail.get("adjudicator").is_none(), "{id}: a unanimous vote is not judged: {detail}");
            continue;
        }
        split += 1;
        // The judge (right) decides; it and the member it sides with count.
        assert_eq!(answer, expected[&id], "{id}: {detail}");
        assert_eq!(detail["adjudicator"]["model"], "sim-reasoner");
        let judge = detail["adjudicator"]["confidence"].as_f64().unwrap();
        let ally = votes.iter().find(|v| v["answer"] == answer.as_str()).unwrap()["confidence"].as_f64().unwrap();
        assert!((confidence - (judge + ally) / 3.0).abs() < 1e-9, "{id}: {confidence}: {detail}");
    }
    let judged: i64 =
        sqlx::query_scalar("SELECT count(*) FROM audit_attempts WHERE job_id = $1 AND model = 'sim-reasoner'")
            .bind(report.job_id)
            .fetch_one(&stack.db.pool)
            .await
            .unwrap();
    assert!(split >= 5, "sim-large disagreed on {split} of {n}");
    assert_eq!(judged, split as i64, "the judge was asked about disagreements only");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_given_up_on_leaves_the_items_waiting_at_its_gate_waiting() {
    let mut stack = Stack::start_with_providers(vec![SimConfig::default()], THREE_MODELS).await.unwrap();
    // The settings under test: a chunk not acknowledged within 3 s is
    // delivered again, and a second delivery is given up on.
    stack.add_worker(|c| {
        c.ack_wait_s = 3;
        c.heartbeat = false;
        c.max_deliveries = 1;
    });
    // 16 items: a small job is spread over 8 chunks, two items each.
    let (input, briefs) = sample(&stack, "article", 16);
    let job = stack.submit("article", input, false).await.unwrap().job_id;
    let chunk: (i64, i64) = sqlx::query_as("SELECT first_seq, last_seq FROM chunks WHERE job_id = $1 AND chunk_no = 0")
        .bind(job)
        .fetch_one(&stack.db.pool)
        .await
        .unwrap();
    assert_eq!(chunk.1 - chunk.0, 1, "the first two items share a chunk");
    wait_for("every outline waiting for approval", Duration::from_secs(60), || async {
        Ok(stack.client.status(job).await?.stages.first().is_some_and(|s| s.waiting == 16))
    })
    .await
    .unwrap();
    // The model now answers in 4 s, past the ack wait; the first outline is
    // approved. Its chunk is delivered again, and given up on.
    stack.sim.sim.set_config(SimConfig { latency_ms: 4_000, ..Default::default() });
    let queue = stack.client.review_export(job, None, "jsonl").await.unwrap();
    let held: HashMap<String, String> = String::from_utf8_lossy(&queue)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .map(|q| (q["id"].as_str().unwrap().to_string(), q["answer"].as_str().unwrap().to_string()))
        .collect();
    let (first, second) = (briefs[0]["id"].as_str().unwrap(), briefs[1]["id"].as_str().unwrap());
    let approve = |id: &str| serde_json::to_vec(&json!({"id": id, "answer": held[id]})).unwrap();
    stack.client.review_import(job, approve(first), "jsonl", "first.jsonl").await.unwrap();
    let results = || async {
        let rows: Vec<(String, String, Option<String>)> = sqlx::query_as(
            "SELECT i.item_id, r.state, r.error_class FROM results r JOIN items i USING (job_id, seq) WHERE r.job_id = $1",
        )
        .bind(job)
        .fetch_all(&stack.db.pool)
        .await
        .unwrap();
        rows
    };
    wait_for("the approved item given up on", Duration::from_secs(60), || async {
        Ok(results()
            .await
            .iter()
            .any(|(id, _, class)| id == first && class.as_deref() == Some("redeliveries_exhausted")))
    })
    .await
    .unwrap();
    // The other outline of that chunk still waits for its decision: no
    // result, still held.
    assert!(results().await.iter().all(|(id, _, _)| id == first), "{:?}", results().await);
    let st = stack.status(job).await.unwrap();
    assert_eq!((st.state.as_str(), st.stages[0].waiting), ("running", 15), "{st:?}");
    // The model is quick again; the decisions come; the job completes.
    stack.sim.sim.set_config(SimConfig::default());
    let rest: Vec<u8> =
        briefs[1..].iter().flat_map(|b| [approve(b["id"].as_str().unwrap()), b"\n".to_vec()].concat()).collect();
    stack.client.review_import(job, rest, "jsonl", "rest.jsonl").await.unwrap();
    stack.wait_completed(job, Duration::from_secs(60)).await.unwrap();
    let done = results().await;
    assert_eq!(done.iter().filter(|(_, state, _)| state != "failed").count(), 15, "{done:?}");
    assert!(done.iter().any(|(id, state, _)| id == second && state != "failed"), "{done:?}");
}
