//! The Prometheus endpoints of real `sluice serve` and `sluice-worker` processes.

use std::process::{Command, Stdio};
use std::time::Duration;

use sluice_tests::fixtures::SimServer;
use sluice_tests::fixtures::{logged_addr, sample_jsonl, wait_for, workspace_bin, NatsServer, TestDb, WorkerProcess};
use sluice_tests::sim::SimConfig;

struct Killed(std::process::Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

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
    let _coordinator = Killed(
        Command::new(workspace_bin("sluice").unwrap())
            .args(["serve", "--listen", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0"])
            .env("SLUICE_DATABASE_URL", db.app_url("sluice_coordinator"))
            .env("SLUICE_NATS_URL", nats.url())
            .env("SLUICE_PRICES_FILE", concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/prices.toml"))
            .env("SLUICE_LOG", "info")
            .env("SLUICE_LOG_FORMAT", "json")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&coord_log).unwrap())
            .spawn()
            .unwrap(),
    );
    let api = logged_addr(&coord_log, "coordinator listening").await.unwrap();
    let coord_metrics = logged_addr(&coord_log, "metrics endpoint listening").await.unwrap();
    let client = coordinator::client::Client::new(&format!("http://{api}"));
    let config = worker::WorkerConfig::for_urls(&db.app_url("sluice_worker"), nats.url(), &sim.base_url());
    let worker_log = logs.path().join("worker.log");
    let env = [("SLUICE_METRICS_ADDR", "127.0.0.1:0"), ("SLUICE_LOG", "info"), ("SLUICE_LOG_FORMAT", "json")];
    let _worker = WorkerProcess::spawn_logged(&config, "metrics-worker", &env, Some(&worker_log)).unwrap();
    let worker_metrics = logged_addr(&worker_log, "metrics endpoint listening").await.unwrap();

    let kind = common::spec::JobKind::load(&sluice_tests::fixtures::jobs_dir().join("classify")).unwrap();
    let job = client
        .create_job(&coordinator::model::NewJob { kind, input_name: None, review_below: None, allow_unpriced: false })
        .await
        .unwrap()
        .job_id;
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
    let c = metrics(coord_metrics).await;
    assert!(c.contains("sluice_items_ingested_total 120"), "{c}");
    // 120 items make 8 chunks: a job has at least 8.
    assert!(c.contains("sluice_chunks_published_total{cause=\"publish\"} 8"), "{c}");
}
