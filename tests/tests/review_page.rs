//! The built-in review page in a real headless Chromium: sign in, review by keyboard, undo, and the database agrees; requests without a valid sign-in are refused.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use coordinator::auth::Role;
use sluice_tests::fixtures::{make_token, sample_jsonl, Stack};
use sluice_tests::sim::SimConfig;
use sluice_tests::tools::{repo, tool};
use uuid::Uuid;

/// Runs scripts/review-check/review_page.cjs (Chromium through
/// playwright-core, which scripts/test installs); its JSON lines.
fn browse(stack: &Stack, job: Uuid, token: &str, keys: &str, screenshot: &Path) -> Vec<serde_json::Value> {
    let out = Command::new("node")
        .arg(repo().join("scripts/review-check/review_page.cjs"))
        .args([&format!("http://{}", stack.coordinator_addr), &job.to_string(), token, keys])
        .arg(screenshot)
        .env("SLUICE_CHROMIUM", tool("SLUICE_CHROMIUM"))
        .env("NODE_PATH", tool("SLUICE_REVIEW_NODE_PATH"))
        .output()
        .expect("node runs");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "the browser script failed:\n{text}\n{}", String::from_utf8_lossy(&out.stderr));
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

async fn result(stack: &Stack, job: Uuid, id: &str) -> (String, Option<String>, Option<String>, Option<String>) {
    sqlx::query_as(
        "SELECT r.state, r.answer, r.human_answer, r.reviewer FROM results r
         JOIN items i ON i.job_id = r.job_id AND i.seq = r.seq WHERE r.job_id = $1 AND i.item_id = $2",
    )
    .bind(job)
    .bind(id)
    .fetch_one(&stack.db.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reviewer_decides_three_items_by_keyboard_undoes_one_and_the_database_agrees() {
    let mut stack = Stack::start(SimConfig { wrong: 0.3, seed: 8, ..Default::default() }, |_| {}).await.unwrap();
    stack.add_worker(|_| {});
    let job = stack.submit("classify", sample_jsonl(81, 80), false).await.unwrap().job_id;
    stack.wait_completed(job, Duration::from_secs(60)).await.unwrap();
    let waiting = stack.status(job).await.unwrap().needs_review;
    assert!(waiting >= 5, "{waiting} to review");
    let rita = make_token(&stack.db.pool, "rita", "default", Role::Reviewer).await.unwrap().token;

    // Enter accepts the model's answer, 2 picks the second label, Enter
    // again, then u takes the last decision back.
    let dir = tempfile::tempdir().unwrap();
    let shot = dir.path().join("page.png");
    let mut steps = browse(&stack, job, &rita, "Enter,2,Enter,u", &shot);
    let phone = steps.pop().unwrap();
    assert_eq!(steps.len(), 4, "{steps:?}");
    // On a phone's screen the page is no wider than the screen and every
    // button of the item is on it.
    let phone = &phone["phone"];
    assert!(phone["scroll_width"].as_u64() <= phone["width"].as_u64(), "{phone}");
    assert!(phone["buttons"].as_u64() >= Some(7) && phone["buttons_inside"] == true, "{phone}");
    let labels = common::sample::labels();
    let (first, second, third) = (&steps[0], &steps[1], &steps[2]);
    assert_eq!(second["answer"], labels[1]);
    assert_eq!(steps[3]["id"], third["id"], "undo goes back to the item it took back");
    assert_eq!(first["progress"], format!("1 of {waiting} reviewed"));
    assert_eq!(steps[2]["progress"], format!("3 of {waiting} reviewed"));
    assert_eq!(steps[3]["progress"], format!("2 of {waiting} reviewed"));
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000, "a screenshot of the page");

    // The database: two decisions stand, under the signed-in reviewer; the
    // third is taken back and its answer waits again.
    let id = |s: &serde_json::Value| s["id"].as_str().unwrap().to_string();
    let (state, model, human, reviewer) = result(&stack, job, &id(first)).await;
    assert_eq!((state.as_str(), human.as_deref(), reviewer.as_deref()), ("reviewed", model.as_deref(), Some("rita")));
    let (state, _, human, _) = result(&stack, job, &id(second)).await;
    assert_eq!((state.as_str(), human.as_deref()), ("reviewed", Some(labels[1].as_str())));
    let (state, _, human, reviewer) = result(&stack, job, &id(third)).await;
    assert_eq!((state.as_str(), human, reviewer), ("needs_review", None, None));
    let rows: Vec<(String, String, Option<String>, bool)> = sqlx::query_as(
        "SELECT i.item_id, r.reviewer, r.verdict, r.undoes IS NOT NULL FROM reviews r
         JOIN items i ON i.job_id = r.job_id AND i.seq = r.seq WHERE r.job_id = $1 AND r.source = 'review-page' ORDER BY r.id",
    )
    .bind(job)
    .fetch_all(&stack.db.pool)
    .await
    .unwrap();
    let want = [
        (id(first), "rita".to_string(), None, false),
        (id(second), "rita".to_string(), None, false),
        (id(third), "rita".to_string(), None, false),
        (id(third), "rita".to_string(), Some("undone".to_string()), true),
    ];
    assert_eq!(rows, want);
    assert_eq!(stack.status(job).await.unwrap().needs_review, waiting - 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_and_its_decisions_need_a_reviewers_sign_in() {
    let mut stack = Stack::start(SimConfig { wrong: 0.3, ..Default::default() }, |_| {}).await.unwrap();
    stack.add_worker(|_| {});
    let job = stack.submit("classify", sample_jsonl(82, 30), false).await.unwrap().job_id;
    stack.wait_completed(job, Duration::from_secs(60)).await.unwrap();
    let base = format!("http://{}/review/{job}", stack.coordinator_addr);
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let decision = serde_json::json!({"id": "doc-0000001", "answer": "sports"});

    // No sign-in: the page is the login form, a decision is refused.
    let r = http.get(&base).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let body = r.text().await.unwrap();
    assert!(body.contains("name=\"token\"") && !body.contains("doc-0000"), "{body}");
    let r = http.post(format!("{base}/decide")).header("x-sluice-review", "1").json(&decision).send().await.unwrap();
    assert_eq!(r.status(), 401);

    // A wrong token at the form: the form again, saying why.
    let r = http
        .post(format!("http://{}/review/login", stack.coordinator_addr))
        .form(&[("token", "sluice_nonsense"), ("next", &format!("/review/{job}"))])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.text().await.unwrap().contains("unknown API token"));
    let refused: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_access WHERE path = '/review/login' AND outcome = 'unauthenticated'",
    )
    .fetch_one(&stack.db.pool)
    .await
    .unwrap();
    assert_eq!(refused, 1, "a failed sign-in is audited as the API's are");

    // A reviewer's sign-in sets the cookie; with it the page opens, but a
    // decision without the page's header (another site's form) is refused.
    let rita = make_token(&stack.db.pool, "rita", "default", Role::Reviewer).await.unwrap().token;
    let r = http
        .post(format!("http://{}/review/login", stack.coordinator_addr))
        .form(&[("token", rita.as_str()), ("next", &format!("/review/{job}"))])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict") && cookie.contains("Path=/review"));
    let cookie = cookie.split(';').next().unwrap().to_string();
    let r = http.get(&base).header("cookie", &cookie).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("reviewed</span>"));
    let r = http.post(format!("{base}/decide")).header("cookie", &cookie).json(&decision).send().await.unwrap();
    assert_eq!(r.status(), 403, "{}", r.text().await.unwrap());
    let reviews: i64 = sqlx::query_scalar("SELECT count(*) FROM reviews").fetch_one(&stack.db.pool).await.unwrap();
    assert_eq!(reviews, 0);

    // A reader may not review; another project's reviewer does not see the job.
    let reader = make_token(&stack.db.pool, "rob", "default", Role::Reader).await.unwrap().token;
    let r = http.get(&base).header("cookie", format!("sluice_review={reader}")).send().await.unwrap();
    assert_eq!(r.status(), 403);
    let other = make_token(&stack.db.pool, "olga", "elsewhere", Role::Reviewer).await.unwrap().token;
    let r = http.get(&base).header("cookie", format!("sluice_review={other}")).send().await.unwrap();
    assert_eq!(r.status(), 404);
}
