//! The Label Studio round trip, checked with Label Studio's own library: the exported config and tasks validate, and Label Studio's JSON and CSV exports come back as decisions.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use coordinator::client::ClientError;
use coordinator::model::LabelStudioNames;
use sluice_tests::fixtures::{sample_jsonl, Stack};
use sluice_tests::sim::SimConfig;
use sluice_tests::tools::{output, repo, tool};
use uuid::Uuid;

/// Runs scripts/review-check/label_studio.py with label-studio-sdk (which
/// scripts/test installs); returns whether it succeeded, and what it printed.
fn label_studio(args: &[&Path]) -> (bool, String) {
    output(
        Command::new("python3")
            .arg(repo().join("scripts/review-check/label_studio.py"))
            .args(args)
            .env("PYTHONPATH", tool("SLUICE_LABEL_STUDIO_PYTHONPATH")),
    )
}

fn validate(config: &Path, tasks: &Path) -> (bool, String) {
    label_studio(&[Path::new("validate"), config, tasks])
}

/// Label Studio's stock "Text Classification" template
/// (label_studio/annotation_templates/natural-language-processing/text-classification/config.yml),
/// its sentiment choices replaced by the kind's labels, as a user adapts it.
fn stock_template(labels: &[String]) -> String {
    let choices: String = labels.iter().map(|l| format!("      <Choice value=\"{l}\"/>\n")).collect();
    format!(
        "<View>\n  <Text name=\"text\" value=\"$text\"/>\n  <View style=\"box-shadow: 2px 2px 5px #999; padding: 20px; margin-top: 2em; border-radius: 5px;\">\n    <Header value=\"Choose text sentiment\"/>\n    <Choices name=\"sentiment\" toName=\"text\" choice=\"single\" showInLine=\"true\">\n{choices}    </Choices>\n  </View>\n</View>\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exported_tasks_validate_with_label_studios_own_parser() {
    let sim = SimConfig { wrong: 0.2, seed: 3, ..Default::default() };
    let mut stack = Stack::start(sim, |_| {}).await.unwrap();
    stack.add_worker(|_| {});
    let job = stack.submit("classify", sample_jsonl(40, 300), false).await.unwrap().job_id;
    let summaries = stack.submit("summarize", sample_jsonl(41, 20), false).await.unwrap().job_id;
    stack.wait_completed(job, Duration::from_secs(60)).await.unwrap();
    stack.wait_completed(summaries, Duration::from_secs(60)).await.unwrap();
    let needs_review = stack.status(job).await.unwrap().needs_review;
    assert!(needs_review > 20, "{needs_review} to review");

    // What a user runs: the tasks and, beside them, their labeling config.
    let dir = tempfile::tempdir().unwrap();
    let tasks = dir.path().join("queue.json");
    let out = stack.sluice(&[
        "review",
        "export",
        &job.to_string(),
        "--format",
        "label-studio",
        "-o",
        tasks.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let config = dir.path().join("queue.label-config.xml");
    let xml = std::fs::read_to_string(&config).expect("the config is written beside the tasks");
    assert!(xml.contains("<Choices name=\"label\" toName=\"text\""), "{xml}");
    let (ok, report) = validate(&config, &tasks);
    assert!(ok, "{report}");
    assert!(report.contains(&format!("tasks={needs_review} predictions={needs_review} invalid=0")), "{report}");
    let exported: serde_json::Value = serde_json::from_slice(&std::fs::read(&tasks).unwrap()).unwrap();
    assert_eq!(exported[0]["data"]["sluice_job"], job.to_string());
    assert!(exported[0]["data"]["sluice_id"].as_str().unwrap().starts_with("doc-"));
    let printed = stack.sluice(&["review", "export", &job.to_string(), "--format", "label-studio", "--config"]);
    assert_eq!(String::from_utf8_lossy(&printed.stdout), xml, "--config prints the same config");

    // A project set up from Label Studio's own template names its control
    // `sentiment`: tasks exported with the default names are all invalid
    // there (the validation can fail), and with --ls-control all valid.
    let labels = common::sample::labels();
    let stock = dir.path().join("stock.xml");
    std::fs::write(&stock, stock_template(&labels)).unwrap();
    let (ok, report) = validate(&stock, &tasks);
    assert!(!ok && report.contains(&format!("invalid={needs_review}")), "{report}");
    assert!(report.contains("'from_name' 'label' not found"), "{report}");
    let named = LabelStudioNames { control: Some("sentiment".into()), object: None };
    let body = stack.client.review_export_with(job, None, "label-studio", &named).await.unwrap();
    let renamed = dir.path().join("renamed.json");
    std::fs::write(&renamed, &body).unwrap();
    let (ok, report) = validate(&stock, &renamed);
    assert!(ok, "{report}");

    // A free-text kind gets a text area; everything below 1.0 is exported.
    let body =
        stack.client.review_export_with(summaries, Some(1.0), "label-studio", &Default::default()).await.unwrap();
    let (text_tasks, text_config) = (dir.path().join("summaries.json"), dir.path().join("summaries.xml"));
    std::fs::write(&text_tasks, &body).unwrap();
    let xml = stack.client.label_studio_config(summaries, &Default::default()).await.unwrap();
    assert!(xml.contains("<TextArea name=\"summary\" toName=\"text\""), "{xml}");
    std::fs::write(&text_config, xml).unwrap();
    let (ok, report) = validate(&text_config, &text_tasks);
    assert!(ok && report.contains("tasks=20 predictions=20 invalid=0"), "{report}");

    // Names Label Studio could not use are refused before anything is written.
    let bad = LabelStudioNames { control: Some("my label".into()), object: None };
    match stack.client.review_export_with(job, None, "label-studio", &bad).await {
        Err(ClientError::Api { status, message, .. }) if status.as_u16() == 400 => {
            assert!(message.contains("letters, digits"), "{message}")
        }
        other => panic!("expected 400, got {other:?}"),
    }
}

/// The fixture, made for `job`: Label Studio's JSON export of a queue
/// Sluice exported (its tasks carry the job's id).
fn fixture(name: &str, job: Uuid, dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(repo().join("tests/fixtures/label-studio").join(name)).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text.replace("{{JOB}}", &job.to_string())).unwrap();
    path
}

/// The line where the task holding `needle` starts (a task is `  {` at the
/// top of the array).
fn task_line(text: &str, needle: &str) -> u64 {
    let at = text.lines().position(|l| l.contains(needle)).unwrap();
    let start = text.lines().take(at).collect::<Vec<_>>().iter().rposition(|l| *l == "  {").unwrap();
    start as u64 + 1
}

async fn reviews(stack: &Stack, job: Uuid, source: &str) -> Vec<(String, String, String, Option<String>)> {
    sqlx::query_as(
        "SELECT i.item_id, r.answer, r.reviewer, r.named_reviewer FROM reviews r
         JOIN items i ON i.job_id = r.job_id AND i.seq = r.seq
         WHERE r.job_id = $1 AND r.source = $2 ORDER BY i.item_id",
    )
    .bind(job)
    .bind(source)
    .fetch_all(&stack.db.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn label_studios_json_and_csv_exports_are_read_back_as_decisions() {
    let mut stack = Stack::start(SimConfig { wrong: 0.2, ..Default::default() }, |_| {}).await.unwrap();
    stack.add_worker(|_| {});
    let job = stack.submit("classify", sample_jsonl(40, 50), false).await.unwrap().job_id;
    stack.wait_completed(job, Duration::from_secs(60)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ann = stack.client_as("ann-importer", "default", coordinator::auth::Role::Reviewer).await.unwrap();

    // An unknown id and a label the kind does not have: refused whole, each
    // named by the line its task starts on.
    let bad = fixture("export-with-errors.json", job, dir.path());
    let text = std::fs::read_to_string(&bad).unwrap();
    let body = std::fs::read(&bad).unwrap();
    match ann.review_import(job, body, "jsonl", "export-with-errors.json").await {
        Err(ClientError::Decisions { errors, .. }) => {
            let got: Vec<(u64, &str)> = errors.iter().map(|e| (e.line, e.reason.as_str())).collect();
            assert_eq!(got.len(), 2, "{got:?}");
            assert_eq!(got[0].0, task_line(&text, "\"sluice_id\": \"doc-9999999\""));
            assert!(got[0].1.contains("unknown item id \"doc-9999999\""), "{got:?}");
            assert_eq!(got[1].0, task_line(&text, "\"sluice_id\": \"doc-0000007\""));
            assert!(got[1].1.contains("answer \"weather\" is not one of the labels"), "{got:?}");
        }
        other => panic!("expected the file refused, got {other:?}"),
    }
    assert!(reviews(&stack, job, "export-with-errors.json").await.is_empty(), "nothing of a refused file is applied");

    // The JSON export as it comes: the latest of two annotations counts,
    // a skipped annotation and a task nobody annotated are left out, the
    // annotator is kept beside the token's holder.
    let good = fixture("export.json", job, dir.path());
    let out = Command::new(sluice_tests::fixtures::workspace_bin("sluice").unwrap())
        .args(["review", "import", &job.to_string(), good.to_str().unwrap()])
        .env("SLUICE_COORDINATOR", ann_url(&stack))
        .env("SLUICE_TOKEN", stack_token(&stack, "ann-cli").await)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("3 decision(s) recorded; 2 task(s) without an annotation left as they were"), "{said}");
    let got = reviews(&stack, job, "export.json").await;
    let want = [
        ("doc-0000001", "sports", "ann@example.com"),
        ("doc-0000002", "health", "ann@example.com"),
        ("doc-0000005", "politics", "label-studio user 7"),
    ];
    assert_eq!(got.len(), 3, "{got:?}");
    for ((id, answer, reviewer, named), (wid, wanswer, wnamed)) in got.iter().zip(want) {
        assert_eq!((id.as_str(), answer.as_str(), named.as_deref()), (wid, wanswer, Some(wnamed)));
        assert_eq!(reviewer, "ann-cli", "the token's holder is the reviewer of record");
    }
    let human: Option<String> = sqlx::query_scalar(
        "SELECT r.human_answer FROM results r JOIN items i ON i.job_id = r.job_id AND i.seq = r.seq
         WHERE r.job_id = $1 AND i.item_id = 'doc-0000002'",
    )
    .bind(job)
    .fetch_one(&stack.db.pool)
    .await
    .unwrap();
    assert_eq!(human.as_deref(), Some("health"));

    // The CSV export Label Studio makes of the same annotations (by the
    // SDK's converter, which Label Studio's export runs): the same decisions.
    let config = dir.path().join("config.xml");
    std::fs::write(&config, stack.client.label_studio_config(job, &Default::default()).await.unwrap()).unwrap();
    for (json, csv) in [(&good, "export.csv"), (&bad, "export-with-errors.csv")] {
        let (ok, report) = label_studio(&[Path::new("csv"), &config, json, &dir.path().join(csv)]);
        assert!(ok, "{report}");
    }
    let csv = std::fs::read(dir.path().join("export.csv")).unwrap();
    let header = String::from_utf8_lossy(&csv).lines().next().unwrap().to_string();
    assert!(
        header.contains("\"annotator\"") && header.contains("\"sluice_id\"") && header.contains("\"label\""),
        "{header}"
    );
    let report = ann.review_import(job, csv, "csv", "export.csv").await.unwrap();
    // Label Studio's CSV leaves out a task whose every annotation was
    // skipped; the task nobody annotated is a row with an empty answer.
    assert_eq!((report.applied, report.skipped), (3, 1), "{report:?}");
    let got: Vec<_> = reviews(&stack, job, "export.csv").await.into_iter().map(|(i, a, _, n)| (i, a, n)).collect();
    let want: Vec<_> = want.iter().map(|(i, a, n)| (i.to_string(), a.to_string(), Some(n.to_string()))).collect();
    assert_eq!(got, want);
    let bad_csv = std::fs::read(dir.path().join("export-with-errors.csv")).unwrap();
    match ann.review_import(job, bad_csv, "csv", "export-with-errors.csv").await {
        Err(ClientError::Decisions { errors, .. }) => {
            let reasons: Vec<&str> = errors.iter().map(|e| e.reason.as_str()).collect();
            assert_eq!(reasons.len(), 2, "{reasons:?}");
            assert!(reasons.iter().any(|r| r.contains("unknown item id \"doc-9999999\"")), "{reasons:?}");
            assert!(reasons.iter().any(|r| r.contains("\"weather\" is not one of the labels")), "{reasons:?}");
        }
        other => panic!("expected the CSV refused, got {other:?}"),
    }

    // A task exported from another job is refused, not applied to this one.
    let other = text.replace(&job.to_string(), &Uuid::new_v4().to_string());
    match ann.review_import(job, other.into_bytes(), "jsonl", "other.json").await {
        Err(ClientError::Decisions { errors, .. }) => {
            assert!(errors.iter().all(|e| e.reason.contains("was exported from job")), "{errors:?}")
        }
        other => panic!("expected refusal, got {other:?}"),
    }
}

fn ann_url(stack: &Stack) -> String {
    format!("http://{}", stack.coordinator_addr)
}

async fn stack_token(stack: &Stack, name: &str) -> String {
    sluice_tests::fixtures::make_token(&stack.db.pool, name, "default", coordinator::auth::Role::Reviewer)
        .await
        .unwrap()
        .token
}
