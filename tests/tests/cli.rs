//! The `sluice` command line as scripts use it: the exit codes of commands that wait for a job, and output cut short by its reader.

use std::process::{Command, Output};
use std::time::Duration;

use sluice_tests::fixtures::{jobs_dir, sample_jsonl, workspace_bin, Stack};
use sluice_tests::sim::SimConfig;

/// Runs `sluice` against the stack's coordinator with its admin token.
fn sluice(stack: &Stack, args: &[&str]) -> Output {
    stack.sluice(args)
}

fn input(dir: &tempfile::TempDir, seed: u64, count: u64) -> String {
    let path = dir.path().join(format!("input-{seed}.jsonl"));
    std::fs::write(&path, sample_jsonl(seed, count)).unwrap();
    path.display().to_string()
}

fn code(out: &Output) -> Option<i32> {
    out.status.code()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_command_exits_with_the_jobs_outcome() {
    let mut stack = Stack::start(SimConfig::default(), |_| {}).await.unwrap();
    stack.add_worker(|_| {});
    let dir = tempfile::tempdir().unwrap();
    let kind = jobs_dir().join("classify").display().to_string();

    // Every item answered: 0, and the job id on stdout.
    let ok = sluice(&stack, &["submit", &kind, "--input", &input(&dir, 51, 200), "--wait"]);
    assert_eq!(code(&ok), Some(0), "{}", String::from_utf8_lossy(&ok.stderr));
    let job = String::from_utf8_lossy(&ok.stdout).lines().next().unwrap().to_string();
    assert_eq!(code(&sluice(&stack, &["status", &job, "--watch"])), Some(0));
    // Answers waiting for review: status says where to review them.
    let all_doubted = ["submit", &kind, "--input", &input(&dir, 50, 20), "--wait", "--review-below", "1"];
    let doubted = sluice(&stack, &all_doubted);
    assert_eq!(code(&doubted), Some(0), "{}", String::from_utf8_lossy(&doubted.stderr));
    let job = String::from_utf8_lossy(&doubted.stdout).lines().next().unwrap().to_string();
    let st = stack.client.status(job.parse().unwrap()).await.unwrap();
    assert!(st.needs_review > 0, "the simulator doubts some answers: {st:?}");
    let shown = String::from_utf8_lossy(&sluice(&stack, &["status", &job]).stdout).to_string();
    let page = format!("review them at http://{}/review/{job}", stack.coordinator_addr);
    assert!(shown.contains(&page) && shown.contains(&format!("sluice review export {job}")), "{shown}");

    // Some items failed: 3.
    stack.sim.sim.set_config(SimConfig { bad_output: 0.5, seed: 5, ..Default::default() });
    let some_failed = sluice(&stack, &["submit", &kind, "--input", &input(&dir, 52, 200), "--wait"]);
    assert_eq!(code(&some_failed), Some(3), "{}", String::from_utf8_lossy(&some_failed.stderr));
    let job = String::from_utf8_lossy(&some_failed.stdout).lines().next().unwrap().to_string();
    assert_eq!(code(&sluice(&stack, &["status", &job, "--watch", "--json"])), Some(3));
    // A plain status reports and succeeds, whatever the job's outcome.
    assert_eq!(code(&sluice(&stack, &["status", &job])), Some(0));

    // Cancelled: 4.
    stack.sim.sim.set_config(SimConfig { latency_ms: 2_000, ..Default::default() });
    let running = sluice(&stack, &["submit", &kind, "--input", &input(&dir, 53, 200)]);
    let job = String::from_utf8_lossy(&running.stdout).lines().next().unwrap().to_string();
    assert_eq!(code(&sluice(&stack, &["cancel", &job])), Some(0));
    assert_eq!(code(&sluice(&stack, &["status", &job, "--watch"])), Some(4));

    // Refused input: 2, and a failed command (an unknown job): 1.
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"id\": \"a\", \"text\": \"fine\"}\nnot json\n").unwrap();
    let refused = sluice(&stack, &["submit", &kind, "--input", bad.to_str().unwrap(), "--wait"]);
    assert_eq!(code(&refused), Some(2), "{}", String::from_utf8_lossy(&refused.stderr));
    let unknown = sluice(&stack, &["status", &uuid::Uuid::now_v7().to_string(), "--watch"]);
    assert_eq!(code(&unknown), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_piped_into_head_end_quietly() {
    let mut stack = Stack::start(SimConfig::default(), |_| {}).await.unwrap();
    stack.add_worker(|_| {});
    let report = stack.submit("classify", sample_jsonl(54, 3_000), false).await.unwrap();
    stack.wait_completed(report.job_id, Duration::from_secs(120)).await.unwrap();
    // Far more than a pipe holds, so the writer meets the closed pipe.
    let script = format!(
        "set -o pipefail; '{}' results {} | head -n 2",
        workspace_bin("sluice").unwrap().display(),
        report.job_id
    );
    let out = Command::new("bash")
        .args(["-c", &script])
        .env("SLUICE_COORDINATOR", format!("http://{}", stack.coordinator_addr))
        .env("SLUICE_TOKEN", &stack.admin_token)
        .output()
        .unwrap();
    assert_eq!(code(&out), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 2);
    assert_eq!(String::from_utf8_lossy(&out.stderr), "", "nothing said about the closed pipe");
}

/// A command whose stdout and stderr go to a pipe nobody reads any more
/// (`sluice estimate ... 2>&1 | head -3` once head is done) still exits with
/// its own code: 2 for refused lines, not a panic's 101.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_output_pipe_is_not_a_panic() {
    let stack = Stack::start(SimConfig::default(), |_| {}).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.jsonl");
    let lines: String = (0..200).map(|i| format!("not json {i}\n")).collect();
    std::fs::write(&bad, lines).unwrap();
    let kind = jobs_dir().join("classify");
    for args in [
        vec!["estimate", kind.to_str().unwrap(), "--input", bad.to_str().unwrap()],
        vec!["submit", kind.to_str().unwrap(), "--input", bad.to_str().unwrap()],
    ] {
        // The reading end is closed before the command starts: every write fails.
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = Command::new(workspace_bin("sluice").unwrap())
            .args(&args)
            .current_dir(jobs_dir().parent().unwrap())
            .env("OPENAI_API_KEY", "unused")
            .env("SLUICE_COORDINATOR", format!("http://{}", stack.coordinator_addr))
            .env("SLUICE_TOKEN", &stack.admin_token)
            .stdout(writer.try_clone().unwrap())
            .stderr(writer)
            .status()
            .unwrap();
        assert_eq!(out.code(), Some(2), "{args:?}");
    }
}

/// A copy of the shipped `classify` kind in `dir/name`, its schema changed by `edit`.
fn classify_with_schema(dir: &tempfile::TempDir, name: &str, edit: impl Fn(&str) -> String) -> String {
    let to = dir.path().join(name);
    std::fs::create_dir_all(&to).unwrap();
    for file in ["job.toml", "prompt.j2", "schema.json"] {
        let text = std::fs::read_to_string(jobs_dir().join("classify").join(file)).unwrap();
        std::fs::write(to.join(file), if file == "schema.json" { edit(&text) } else { text }).unwrap();
    }
    to.display().to_string()
}

/// A kind whose schema spells its labels otherwise (every answer would
/// score 1.0 and none go to review), or lacks its answer field (every item
/// would fail after it was paid for), is refused by `sluice kind check` and
/// by `submit` before any model call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kind_at_odds_with_its_schema_is_refused_before_any_call() {
    let mut stack = Stack::start(SimConfig::default(), |_| {}).await.unwrap();
    stack.add_worker(|_| {});
    let dir = tempfile::tempdir().unwrap();
    let cased = classify_with_schema(&dir, "cased", |s| {
        s.replace(
            r#""business", "sports", "technology", "politics", "health""#,
            r#""Business", "Sports", "Technology", "Politics", "Health""#,
        )
    });
    let renamed = classify_with_schema(&dir, "renamed", |s| s.replace("\"label\"", "\"category\""));
    let file = input(&dir, 7, 20);

    let shipped = jobs_dir().join("classify").display().to_string();
    let out = sluice(&stack, &["kind", "check", &shipped]);
    assert_eq!(code(&out), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("classify: ok (kind classify, model sim-small"));
    let out = sluice(&stack, &["kind", "check", &cased, &renamed]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(code(&out), Some(2), "{err}");
    assert!(err.contains("cased: ") && err.contains("differ only in case"), "{err}");
    assert!(err.contains("labels = [\"Business\", \"Sports\""), "the fix is spelled out: {err}");
    assert!(
        err.contains("renamed: ")
            && err
                .contains("answer_field = \"label\" (job.toml) is not among the properties of schema.json (category)"),
        "{err}"
    );

    for kind in [&cased, &renamed] {
        let out = sluice(&stack, &["submit", kind, "--input", &file, "--wait"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(code(&out), Some(1), "{err}");
        assert!(err.contains("cannot load the job kind"), "{err}");
    }
    assert_eq!(stack.sim.sim.stats().requests, 0, "no call was made");
    assert!(stack.client.jobs_of(10, None).await.unwrap().is_empty(), "no job was created");
}

/// `estimate` run away from a checkout says where it looked for the price
/// table instead of printing "unknown" silently, and a misspelt model gets
/// the priced names closest to it.
#[test]
fn estimate_says_where_it_looked_for_prices_and_what_a_model_may_have_meant() {
    let dir = tempfile::tempdir().unwrap();
    let file = input(&dir, 3, 5);
    let kind = jobs_dir().join("classify").display().to_string();
    let run = |cwd: &std::path::Path, args: &[&str]| {
        Command::new(workspace_bin("sluice").unwrap())
            .args(args)
            .current_dir(cwd)
            .env_remove("SLUICE_PRICES_FILE")
            .env("HOME", dir.path())
            .env_remove("XDG_CONFIG_HOME")
            .output()
            .unwrap()
    };
    let out = run(dir.path(), &["estimate", &kind, "-i", &file, "--offline"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(code(&out), Some(0), "{err}");
    let home_table = dir.path().join(".config/sluice/prices.toml");
    assert!(err.contains("no price table found (looked in deploy/prices.toml, "), "{err}");
    assert!(err.contains(&home_table.display().to_string()) && err.contains("/etc/sluice/prices.toml"), "{err}");

    // A table in the user's config directory is found from anywhere.
    std::fs::create_dir_all(home_table.parent().unwrap()).unwrap();
    std::fs::copy(jobs_dir().join("../deploy/prices.toml"), &home_table).unwrap();
    let out = run(dir.path(), &["estimate", &kind, "-i", &file, "--offline", "--model", "gpt-4o-mni"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("model \"gpt-4o-mni\" has no price in") && err.contains("did you mean gpt-4o-mini"), "{err}");
    let out = run(dir.path(), &["estimate", &kind, "-i", &file, "--offline", "--model", "gpt-4o-mini"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("unknown") && text.contains("cost     at most $"), "{text}");
}

/// An empty input file gets one clear message, with or without
/// --skip-invalid, and nothing runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_input_file_is_refused_with_one_message_in_both_modes() {
    let stack = Stack::start(SimConfig::default(), |_| {}).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("docs.jsonl");
    std::fs::write(&empty, "\n\n").unwrap();
    let kind = jobs_dir().join("classify").display().to_string();
    for extra in [None, Some("--skip-invalid")] {
        let mut args = vec!["submit", &kind, "--input", empty.to_str().unwrap()];
        args.extend(extra);
        let out = sluice(&stack, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(code(&out), Some(2), "{extra:?}: {err}");
        assert_eq!(err.matches("empty").count(), 1, "{extra:?}: one message: {err}");
        assert!(err.contains("the input is empty: no JSONL lines found in"), "{extra:?}: {err}");
    }
    assert!(stack.client.jobs_of(10, None).await.unwrap().is_empty(), "no job was made");
}

/// A wrong command line exits 64, apart from refused input (2); the codes
/// are listed in the top-level help.
#[test]
fn a_wrong_command_line_has_its_own_exit_code() {
    let run = |args: &[&str]| Command::new(workspace_bin("sluice").unwrap()).args(args).output().unwrap();
    let out = run(&["status", "nonexistent"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("invalid value 'nonexistent'"), "{err}");
    let out = run(&["submit", "--no-such-option"]);
    assert_eq!(out.status.code(), Some(64));
    let out = run(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("  2  refused") && help.contains(" 64  usage"), "{help}");
}

/// Each exported result carries what its item cost: every attempt made for
/// it, retries included, at the price table's prices; they add up to the
/// job's cost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_carry_each_items_cost() {
    let sim = SimConfig { error_500: 0.3, seed: 9, ..Default::default() };
    let mut stack = Stack::start(sim, |_| {}).await.unwrap();
    stack.add_worker(|c| {
        c.retry_base_ms = 10;
        c.breaker_threshold = 1_000;
    });
    let report = stack.submit("classify", sample_jsonl(55, 300), false).await.unwrap();
    stack.wait_completed(report.job_id, Duration::from_secs(120)).await.unwrap();
    let status = stack.client.status(report.job_id).await.unwrap();
    assert!(status.cost_usd > 0.0);

    let out = sluice(&stack, &["results", &report.job_id.to_string()]);
    assert_eq!(code(&out), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 300);
    // Each item's cost, computed apart from the audit trail.
    let expected: std::collections::HashMap<String, f64> = sqlx::query_as::<_, (String, f64)>(
        "SELECT i.item_id, sum(a.cost_usd) FROM audit_attempts a JOIN items i ON i.job_id = a.job_id AND i.seq = a.seq
         WHERE a.job_id = $1 GROUP BY i.item_id",
    )
    .bind(report.job_id)
    .fetch_all(&stack.db.pool)
    .await
    .unwrap()
    .into_iter()
    .collect();
    let mut total = 0.0;
    let mut retried = 0;
    for r in &rows {
        let cost = r["cost_usd"].as_f64().unwrap();
        let id = r["id"].as_str().unwrap();
        assert!((cost - expected[id]).abs() < 1e-12, "{id}: {cost} against {}", expected[id]);
        retried += (r["attempts"].as_i64().unwrap() > 1) as usize;
        total += cost;
    }
    assert!(retried > 0, "some items needed a retry");
    assert!((total - status.cost_usd).abs() < 1e-9, "{total} against the job's {}", status.cost_usd);

    let csv = sluice(&stack, &["results", &report.job_id.to_string(), "--format", "csv"]);
    let text = String::from_utf8_lossy(&csv.stdout);
    assert!(text.lines().next().unwrap().ends_with(",cost_usd"), "{text}");
    let first = text.lines().nth(1).unwrap();
    let id = first.split(',').next().unwrap();
    let cost: f64 = first.rsplit(',').next().unwrap().parse().unwrap();
    assert!((cost - expected[id]).abs() < 1e-8, "{first}");
}

/// `sluice estimate` counts, before the job, the input tokens the simulator
/// then reports for it; an OpenAI model is counted with its tokenizer; bad
/// lines are named and give exit code 2; bad arguments are clear errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn estimate_counts_before_the_job_what_the_model_is_then_sent() {
    let mut stack = Stack::start(SimConfig::default(), |_| {}).await.unwrap();
    stack.add_worker(|_| {});
    let dir = tempfile::tempdir().unwrap();
    let kind = jobs_dir().join("classify").display().to_string();
    let file = input(&dir, 56, 400);
    let prices = jobs_dir().join("../deploy/prices.toml").display().to_string();
    let out = sluice(&stack, &["estimate", &kind, "--input", &file, "--prices-file", &prices, "--json"]);
    assert_eq!(code(&out), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let e: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((e["items"].as_u64(), e["invalid_lines"].as_u64()), (Some(400), Some(0)));
    assert_eq!(e["tokenizer"], "approximation: 4 bytes a token");
    assert_eq!(e["output_tokens_at_most"].as_u64(), Some(400 * 20), "max_tokens 20 per item");

    // The job then runs; the simulator reports exactly the tokens estimated.
    let report = stack.submit("classify", std::fs::read(&file).unwrap(), false).await.unwrap();
    stack.wait_completed(report.job_id, Duration::from_secs(60)).await.unwrap();
    let st = stack.client.status(report.job_id).await.unwrap();
    assert_eq!(Some(st.tokens_in), e["input_tokens"].as_u64(), "estimated and reported input tokens");
    assert!(st.tokens_out <= e["output_tokens_at_most"].as_u64().unwrap());
    // No earlier job: the output is expected as one label's JSON answer, and
    // the labels' answers differ by a token at most (5 or 6 tokens).
    assert_eq!(e["output_basis"], "labels");
    let expected = e["output_tokens_expected"].as_u64().unwrap() as f64;
    let off = (expected - st.tokens_out as f64).abs() / st.tokens_out as f64;
    assert!(off < 0.12, "expected {expected} output tokens, used {}", st.tokens_out);
    assert!(st.cost_usd <= e["cost_usd_at_most"].as_f64().unwrap());

    // An OpenAI model: its own tokenizer, its price, its limits.
    let providers = jobs_dir().join("../deploy/providers.example.toml").display().to_string();
    let args = [
        "estimate",
        &kind,
        "--input",
        &file,
        "--model",
        "openai/gpt-4o-mini",
        "--providers-file",
        &providers,
        "--prices-file",
        &prices,
    ];
    let out =
        Command::new(workspace_bin("sluice").unwrap()).args(args).env("OPENAI_API_KEY", "unused").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("(o200k_base, exact)") && text.contains("at least 5 s at 5000 requests/min"), "{text}");
    assert!(text.contains("through the Batch API") && !text.contains("unknown"), "{text}");

    // Bad lines are named, and the file would be refused.
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"id\": \"a\", \"text\": \"fine\"}\nnot json\n{\"id\": \"b\"}\n").unwrap();
    let out = sluice(&stack, &["estimate", &kind, "--input", bad.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(code(&out), Some(2), "{err}");
    assert!(err.contains("line 2: invalid JSON") && err.contains("line 3: missing field \"text\""), "{err}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("items    1 (2 invalid lines)"));

    // An unknown kind and a missing file: clear errors.
    let out = sluice(&stack, &["estimate", "jobs/nope", "--input", &file]);
    assert_eq!(code(&out), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot load the job kind in jobs/nope"));
    let out = sluice(&stack, &["estimate", &kind, "--input", "/nonexistent.jsonl"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read input /nonexistent.jsonl"));
}
