//! Limits learned from the provider but never pinned, and the adaptive window of calls in flight: an outage costs a handful of calls.

use std::time::Duration;

use sluice_tests::fixtures::{sample_jsonl, Stack, WorkerProcess};
use sluice_tests::sim::SimConfig;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_costs_a_handful_of_calls_and_the_job_completes_after_recovery() {
    let down =
        SimConfig { error_503: 1.0, retry_after_s: 0.05, latency_ms: 20, log_requests: true, ..Default::default() };
    let mut stack = Stack::start(down, |_| {}).await.unwrap();
    for _ in 0..2 {
        // The defaults a user gets: 64 slots per worker, a probe every 5 s.
        stack.add_worker(|c| {
            c.concurrency = 64;
            c.breaker_interval_ms = 5_000;
            c.retry_base_ms = 200;
            c.max_attempts = 4;
            c.ack_wait_s = 30;
        });
    }
    let report = stack.submit("classify", sample_jsonl(51, 1_000), false).await.unwrap();
    // The outage lasts 30 s; this sleep is the scenario, not a wait for a condition.
    let outage = Duration::from_secs(30);
    tokio::time::sleep(outage).await;
    let calls = stack.sim.sim.log().len() as u64;
    let probes = outage.as_secs() / 5 + 1;
    assert!(calls <= 10 + probes, "{calls} calls reached the dead model in 30 s; at most 10 plus {probes} probes");

    stack.sim.sim.set_config(SimConfig { latency_ms: 20, log_requests: true, ..Default::default() });
    stack.wait_completed(report.job_id, Duration::from_secs(30)).await.unwrap();
    let st = stack.client.status(report.job_id).await.unwrap();
    assert_eq!((st.succeeded, st.failed), (1_000, 0), "{st:?}");
    // The recovering model is not hit by every slot at once.
    let log = stack.sim.sim.log();
    let first_ok = log.iter().find(|e| e.status == 200).unwrap().t_ms;
    let early = log.iter().filter(|e| e.status == 200 && e.t_ms < first_ok + 20).count();
    assert!(early <= 8, "{early} answers within 20 ms of the first success");
    assert!(stack.sim.sim.stats().max_in_flight > 16, "and it did grow again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_announcing_a_bogus_low_limit_does_not_pin_the_rate() {
    // No server-side limit; the very first answer is a 429 claiming 60 requests/min.
    let sim = SimConfig {
        inject_429: 1,
        limit_header_on_429: Some(60),
        retry_after_s: 0.1,
        latency_ms: 10,
        ..Default::default()
    };
    let stack = Stack::start(sim, |_| {}).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = stack.worker_config();
    let logs = [dir.path().join("w1.log"), dir.path().join("w2.log")];
    let _workers: Vec<WorkerProcess> = logs
        .iter()
        .enumerate()
        .map(|(i, log)| {
            WorkerProcess::spawn_logged(&config, &format!("bogus-{i}"), &[("SLUICE_RPM", "1200")], Some(log)).unwrap()
        })
        .collect();
    let report = stack.submit("classify", sample_jsonl(52, 800), false).await.unwrap();
    stack.wait_completed(report.job_id, Duration::from_secs(120)).await.unwrap();
    let timeline = stack.sim.sim.timeline();
    let first = timeline.iter().position(|s| s.status_429 > 0).expect("the 429 was sent");
    // 1,200/min is 20/s: within 30 s of the 429 the rate is back to 90% of it.
    let window: u32 = timeline[first + 25..first + 30].iter().map(|s| s.requests).sum();
    let per_s: Vec<u32> = timeline.iter().map(|s| s.requests).collect();
    assert!(window >= 90, "{window} requests in seconds 25-30 after the 429 (want >= 90): {per_s:?}");
    let max_3s = per_s.windows(3).map(|w| w.iter().sum::<u32>()).max().unwrap();
    assert!(max_3s <= 60 + 5, "never above the configured rate: {per_s:?}");
    let text: String = logs.iter().map(|p| std::fs::read_to_string(p).unwrap_or_default()).collect();
    let cuts = text.lines().filter(|l| l.contains("effective rate limit changed") && l.contains("lower limit")).count();
    assert_eq!(cuts, 1, "the cut is logged once for the cluster:\n{text}");
}
