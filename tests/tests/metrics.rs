//! The Prometheus endpoints of real `sluice serve` and `sluice-worker` processes.

use std::process::Command;
use std::time::Duration;

use serde_json::json;

use sluice_tests::fixtures::SimServer;
use sluice_tests::fixtures::{
    logged_addr, make_token, sample_jsonl, wait_for, workspace_bin, NatsServer, ServeProcess, TestDb, WorkerProcess,
};
use sluice_tests::sim::SimConfig;

async fn metrics(addr: std::net::SocketAddr) -> String {
    reqwest::get(format!("http://{addr}/metrics")).await.unwrap().text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_and_worker_processes_export_metrics() {
    let db = TestDb::create().await.unwrap();
    let nats = NatsServer::start().unwrap();
    let sim = SimServer::start(SimConfig::default()).await.unwrap();
    // Every port is picked by the OS (port 0); each process logs what it bound.
    let logs = tempfile::tempdir().unwrap();
    let coord_log = logs.path().join("coordinator.log");
    // A fresh install's first steps: a token secret, then the first admin token.
    let secret = logs.path().join("token-secret");
    let run = |args: &[&str]| {
        let out = Command::new(workspace_bin("sluice").unwrap()).args(args).output().unwrap();
        assert!(out.status.success(), "sluice {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    run(&["admin", "secret", "--out", secret.to_str().unwrap()]);
    let coordinator_url = db.app_url("sluice_coordinator");
    let bootstrap =
        ["admin", "bootstrap", "--database-url", &coordinator_url, "--token-secret-file", secret.to_str().unwrap()];
    let token = run(&bootstrap).trim().to_string();
    assert!(token.starts_with("sluice_"), "{token}");
    let coordinator =
        ServeProcess::start(&db, &nats, &coord_log, &[("SLUICE_TOKEN_SECRET_FILE", secret.to_str().unwrap())])
            .await
            .unwrap();
    let (api, coord_metrics) = (coordinator.api, coordinator.metrics);
    let client = coordinator::client::Client::new(&format!("http://{api}")).with_token(&token);
    let config = worker::WorkerConfig::for_urls(&db.app_url("sluice_worker"), nats.url(), &sim.base_url());
    let worker_log = logs.path().join("worker.log");
    let env = [("SLUICE_METRICS_ADDR", "127.0.0.1:0"), ("SLUICE_LOG", "info"), ("SLUICE_LOG_FORMAT", "json")];
    let _worker = WorkerProcess::spawn_logged(&config, "metrics-worker", &env, Some(&worker_log)).unwrap();
    let worker_metrics = logged_addr(&worker_log, "metrics endpoint listening").await.unwrap();

    let job = client.create_job(&sluice_tests::fixtures::new_job("classify")).await.unwrap().job_id;
    let input = vec![Ok(bytes::Bytes::from(sample_jsonl(6, 120)))];
    client.upload(job, futures::stream::iter(input), false).await.unwrap();
    wait_for("completion", Duration::from_secs(60), || async { Ok(client.status(job).await?.state == "completed") })
        .await
        .unwrap();

    let w = metrics(worker_metrics).await;
    assert!(w.contains("sluice_items_total{outcome=\"succeeded\"} 120"), "{w}");
    assert!(w.contains("sluice_model_calls_total{model=\"sim-small\",outcome=\"ok\"} 120"), "{w}");
    assert!(w.contains("sluice_model_call_duration_seconds_bucket{model=\"sim-small\",outcome=\"ok\""), "{w}");
    assert!(w.contains("sluice_tokens_total{model=\"sim-small\",direction=\"out\"}"), "{w}");
    let stranger = coordinator::client::Client::new(&format!("http://{api}")).with_token("sluice_not-a-token");
    assert!(stranger.status(job).await.is_err());
    let c = metrics(coord_metrics).await;
    assert!(c.contains("sluice_api_denied_total{outcome=\"unauthenticated\"} 1"), "{c}");
    assert!(c.contains("sluice_items_ingested_total 120"), "{c}");
    // 120 items make 8 chunks: a job has at least 8.
    assert!(c.contains("sluice_chunks_published_total{cause=\"publish\"} 8"), "{c}");
    assert!(c.contains("sluice_coordinator_leader 1"), "{c}");
    assert!(c.contains("sluice_build_info{version=\""), "{c}");
    assert!(w.contains("sluice_build_info{version=\""), "{w}");
    // The process's own figures, on both.
    for (who, text) in [("worker", &w), ("coordinator", &c)] {
        for name in [
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_open_fds ",
            "process_start_time_seconds ",
        ] {
            assert!(text.contains(name), "{who} lacks {name}: {text}");
        }
    }
    // Nothing under way any more in the worker.
    assert!(w.contains("sluice_chunks_in_flight 0") && w.contains("sluice_calls_in_flight 0"), "{w}");
    assert!(w.contains("sluice_breaker_open{endpoint=\""), "{w}");
    // The worker completed the job; the leader counts it, and its cost.
    wait_for("the completion counted", Duration::from_secs(30), || async {
        let c = metrics(coord_metrics).await;
        Ok(c.contains("sluice_jobs_finished_total{state=\"completed\"} 1")
            && c.contains("sluice_cost_dollars{project=\"default\"} 0.0")
            && c.contains("sluice_backlog_items{job_state=\"running\"} 0"))
    })
    .await
    .unwrap();

    // Both processes answer the probes beside their metrics.
    for (who, addr) in [("worker", worker_metrics), ("coordinator", coord_metrics)] {
        let live = reqwest::get(format!("http://{addr}/healthz")).await.unwrap();
        assert_eq!(live.status(), reqwest::StatusCode::OK, "{who}");
        let ready = reqwest::get(format!("http://{addr}/readyz")).await.unwrap();
        assert_eq!(ready.status(), reqwest::StatusCode::OK, "{who}");
        let detail: serde_json::Value = ready.json().await.unwrap();
        assert_eq!(
            (&detail["ready"], &detail["postgres"], &detail["nats"]),
            (&json!(true), &json!("ok"), &json!("ok"))
        );
    }

    // An answer that fails the kind's schema is a failed_validation call,
    // not an ok one: the call-error alert sees a job whose every answer is
    // refused.
    sim.sim.set_config(SimConfig { bad_output: 1.0, ..Default::default() });
    let refused = client.create_job(&sluice_tests::fixtures::new_job("classify")).await.unwrap().job_id;
    let input = vec![Ok(bytes::Bytes::from(sample_jsonl(7, 2)))];
    client.upload(refused, futures::stream::iter(input), false).await.unwrap();
    wait_for("the refused answers' job", Duration::from_secs(60), || async {
        Ok(client.status(refused).await?.state == "completed")
    })
    .await
    .unwrap();
    let bad = sim.sim.stats().bad_output;
    assert!(bad >= 2, "{bad}");
    let w = metrics(worker_metrics).await;
    let failed = format!("sluice_model_calls_total{{model=\"sim-small\",outcome=\"failed_validation\"}} {bad}");
    assert!(w.contains(&failed), "{failed}: {w}");
    assert!(w.contains("sluice_model_calls_total{model=\"sim-small\",outcome=\"ok\"} 120"), "{w}");

    // Lines refused at ingest are counted by why, as the dashboard's panel
    // sums them.
    let bad = client.create_job(&sluice_tests::fixtures::new_job("classify")).await.unwrap().job_id;
    let lines = "{\"id\":\"a\",\"text\":\"x\"}\nnot json\n{\"id\":\"b\"}\n{\"id\":\"a\",\"text\":\"again\"}\n";
    let report = client.upload(bad, futures::stream::iter(vec![Ok(bytes::Bytes::from(lines))]), true).await.unwrap();
    assert_eq!(report.invalid_lines, 3, "{report:?}");
    let c = metrics(coord_metrics).await;
    for reason in ["invalid_json", "missing_field", "duplicate_id"] {
        assert!(c.contains(&format!("sluice_lines_rejected_total{{reason=\"{reason}\"}} 1")), "{reason}: {c}");
    }
}

/// The leader's gauges follow a job with no worker yet: its backlog, and the
/// workers worth starting for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_exports_the_backlog_and_the_workers_worth_running() {
    let db = TestDb::create().await.unwrap();
    let nats = NatsServer::start().unwrap();
    let logs = tempfile::tempdir().unwrap();
    // The backlog should be done within a second: 3,000 items at 64 calls a
    // second per worker (1 s calls assumed before any answer) want 47 workers.
    let env = [("SLUICE_AUTOSCALE_DRAIN_S", "1")];
    let coordinator = ServeProcess::start(&db, &nats, &logs.path().join("c.log"), &env).await.unwrap();
    let token = make_token(&db.pool, "ops", "default", coordinator::auth::Role::Admin).await.unwrap();
    let client = coordinator.client(&token.token);
    let new = coordinator::model::NewJob { max_cost_usd: Some(1.0), ..sluice_tests::fixtures::new_job("classify") };
    let job = client.create_job(&new).await.unwrap().job_id;
    let input = vec![Ok(bytes::Bytes::from(sample_jsonl(7, 3_000)))];
    client.upload(job, futures::stream::iter(input), false).await.unwrap();
    let seen = |wanted: &[&str]| {
        let addr = coordinator.metrics;
        let wanted: Vec<String> = wanted.iter().map(|w| w.to_string()).collect();
        move || {
            let wanted = wanted.clone();
            async move {
                let c = metrics(addr).await;
                Ok(wanted.iter().all(|w| c.contains(w.as_str())))
            }
        }
    };
    // Capped by what Postgres's connection slots allow at 2 per worker, 20 kept
    // for the rest: 38 with Postgres's default max_connections of 100.
    let slots: i32 = sqlx::query_scalar(
        "SELECT current_setting('max_connections')::int - current_setting('superuser_reserved_connections')::int",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let db_cap = (slots - 20) / 2;
    let wanted = format!("sluice_autoscale_workers_wanted {}", db_cap.min(47));
    let cap = format!("sluice_autoscale_workers_db_cap {db_cap}");
    let running = ["sluice_backlog_items{job_state=\"running\"} 3000", wanted.as_str(), cap.as_str()];
    wait_for("the backlog and the workers wanted", Duration::from_secs(30), seen(&running)).await.unwrap();
    let c = metrics(coordinator.metrics).await;
    // The parts: 46.9 workers for the backlog, no bound from limits (none configured).
    assert!(c.contains("sluice_autoscale_workers{model=\"default/sim-small\",bound=\"backlog\"} 46.875"), "{c}");
    assert!(!c.contains("bound=\"limits\""), "{c}");
    // A call that would cross the cap pauses the job (the reservation a
    // worker makes): its items are still owed, but not work to scale for.
    let reserved: bool =
        sqlx::query_scalar("SELECT reserve_budget($1, 2.0)").bind(job).fetch_one(&db.pool).await.unwrap();
    assert!(!reserved);
    let paused = &[
        "sluice_backlog_items{job_state=\"paused\"} 3000",
        "sluice_backlog_items{job_state=\"running\"} 0",
        "sluice_jobs_paused_at_cap 1",
        "sluice_autoscale_workers_wanted 0",
    ];
    wait_for("the backlog of a job paused at its cap", Duration::from_secs(30), seen(paused)).await.unwrap();
    // Cancelled, its items are no longer work to scale for.
    client.cancel(job).await.unwrap();
    let cancelled = &[
        "sluice_backlog_items{job_state=\"cancelled\"} 3000",
        "sluice_backlog_items{job_state=\"paused\"} 0",
        "sluice_jobs_paused_at_cap 0",
        "sluice_autoscale_workers_wanted 0",
    ];
    wait_for("the backlog of a cancelled job", Duration::from_secs(30), seen(cancelled)).await.unwrap();
}
