//! Several coordinators: every replica serves the API, one leader at a time publishes and reconciles, a leader killed outright is replaced with nothing lost or called twice, and `/readyz` tells.

use std::time::{Duration, Instant};

use sluice_tests::fixtures::{logged_addr, readiness, sample_jsonl, wait_for, ServeProcess, Stack, WorkerProcess};
use sluice_tests::sim::SimConfig;

/// The indexes of the replicas that say they lead; every answer must be ready.
async fn leaders(coordinators: &[ServeProcess], alive: &[bool]) -> anyhow::Result<Vec<usize>> {
    let mut leading = Vec::new();
    for (i, c) in coordinators.iter().enumerate().filter(|(i, _)| alive[*i]) {
        let r = c.readiness().await.ok_or_else(|| anyhow::anyhow!("coordinator {i} does not answer /readyz"))?;
        if r.leader {
            if r.ready {
                leading.push(i);
            }
        } else {
            anyhow::ensure!(r.ready && r.publisher == "elsewhere", "coordinator {i}: {r:?}");
        }
    }
    anyhow::ensure!(leading.len() <= 1, "two leaders at once: {leading:?}");
    Ok(leading)
}

/// Waits until exactly one live replica leads (and never two); returns it.
async fn one_leader(coordinators: &[ServeProcess], alive: &[bool]) -> usize {
    let found = std::sync::Mutex::new(None);
    wait_for("one leader among the coordinators", Duration::from_secs(10), || async {
        let l = leaders(coordinators, alive).await?;
        *found.lock().unwrap() = l.first().copied();
        Ok(!l.is_empty())
    })
    .await
    .unwrap();
    found.into_inner().unwrap().unwrap()
}

/// Starts `n` coordinator processes on the stack's Postgres and NATS (its
/// own coordinator stopped), two workers, and a job of `items` items.
async fn cluster(n: usize, items: u64) -> (Stack, Vec<ServeProcess>, uuid::Uuid, tempfile::TempDir) {
    let sim = SimConfig { latency_ms: 20, ..Default::default() };
    let mut stack = Stack::start(sim, |_| {}).await.unwrap();
    stack.stop_coordinator().await.unwrap();
    let logs = tempfile::tempdir().unwrap();
    let mut coordinators = Vec::new();
    for i in 0..n {
        let log = logs.path().join(format!("coordinator-{i}.log"));
        coordinators.push(ServeProcess::start(&stack.db, &stack.nats, &log, &[]).await.unwrap());
    }
    for _ in 0..2 {
        stack.add_worker(|c| c.concurrency = 16);
    }
    let leader = one_leader(&coordinators, &vec![true; n]).await;
    // Submitted through a replica that does not lead: every replica serves the API.
    let follower = &coordinators[(leader + 1) % n];
    let client = follower.client(&stack.admin_token);
    let created = client.create_job(&sluice_tests::fixtures::new_job("classify")).await.unwrap();
    let input = futures::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from(sample_jsonl(41, items)))]);
    client.upload(created.job_id, input, false).await.unwrap();
    (stack, coordinators, created.job_id, logs)
}

/// Kills the leader while the job runs and waits for another to lead; returns
/// the new leader and how long the cluster went without one.
async fn kill_the_leader(
    stack: &Stack,
    coordinators: &mut [ServeProcess],
    alive: &mut [bool],
    job: uuid::Uuid,
) -> usize {
    let leader = one_leader(coordinators, alive).await;
    let survivor = alive.iter().enumerate().position(|(i, a)| *a && i != leader).unwrap();
    let client = coordinators[survivor].client(&stack.admin_token);
    let before = client.status(job).await.unwrap().done();
    wait_for("progress under this leader", Duration::from_secs(60), || async {
        Ok(client.status(job).await?.done() >= before + 200)
    })
    .await
    .unwrap();
    coordinators[leader].kill9();
    alive[leader] = false;
    let killed = Instant::now();
    let next = one_leader(coordinators, alive).await;
    println!("failover: coordinator {next} leads {:.1} s after the leader was killed", killed.elapsed().as_secs_f64());
    next
}

/// Waits for the job through a live replica and checks that every item was
/// answered once: nothing lost, nothing published and called twice.
async fn completes_exactly_once(stack: &Stack, coordinator: &ServeProcess, job: uuid::Uuid, items: u64) {
    let client = coordinator.client(&stack.admin_token);
    wait_for("the job completed", Duration::from_secs(120), || async {
        Ok(client.status(job).await?.state == "completed")
    })
    .await
    .unwrap();
    let st = client.status(job).await.unwrap();
    assert_eq!((st.succeeded, st.failed), (items, 0), "{st:?}");
    assert_eq!(stack.sim.sim.stats().ok, items, "one answered call per item");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_coordinators_a_killed_leader_is_replaced_and_the_job_completes_once() {
    let items = 3_000;
    let (stack, mut coordinators, job, _logs) = cluster(2, items).await;
    let mut alive = vec![true; 2];
    let next = kill_the_leader(&stack, &mut coordinators, &mut alive, job).await;
    completes_exactly_once(&stack, &coordinators[next], job, items).await;

    // Stopped the way Kubernetes stops a pod, the leader hands its lease
    // back: the lease key is gone once the process has exited.
    let status = coordinators[next].terminate().unwrap();
    assert!(status.success(), "{status:?}");
    let js = async_nats::jetstream::new(async_nats::connect(stack.nats.url()).await.unwrap());
    let kv = js.get_key_value(common::nats::LEADER_BUCKET).await.unwrap();
    let entry = kv.entry(coordinator::leader::KEY).await.unwrap();
    assert!(
        entry.is_none_or(|e| e.operation != async_nats::jetstream::kv::Operation::Put),
        "the lease was not released"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_coordinators_survive_two_leaders_killed_in_turn() {
    let items = 4_000;
    let (stack, mut coordinators, job, _logs) = cluster(3, items).await;
    let mut alive = vec![true; 3];
    kill_the_leader(&stack, &mut coordinators, &mut alive, job).await;
    let last = kill_the_leader(&stack, &mut coordinators, &mut alive, job).await;
    completes_exactly_once(&stack, &coordinators[last], job, items).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_ready_only_while_postgres_and_nats_answer() {
    let mut stack = Stack::start(SimConfig::default(), |_| {}).await.unwrap();
    let url = format!("http://{}", stack.coordinator_addr);
    wait_for("the coordinator ready and leading", Duration::from_secs(10), || async {
        Ok(readiness(&url).await.is_some_and(|r| r.ready && r.leader && r.publisher == "running"))
    })
    .await
    .unwrap();
    let status = reqwest::get(format!("{url}/readyz")).await.unwrap().status();
    assert_eq!(status, reqwest::StatusCode::OK);
    // A worker answers beside its metrics.
    let logs = tempfile::tempdir().unwrap();
    let worker_log = logs.path().join("worker.log");
    let env = [("SLUICE_METRICS_ADDR", "127.0.0.1:0"), ("SLUICE_LOG", "info")];
    let _worker = WorkerProcess::spawn_logged(&stack.worker_config(), "probed", &env, Some(&worker_log)).unwrap();
    let worker_url = format!("http://{}", logged_addr(&worker_log, "metrics endpoint listening").await.unwrap());
    wait_for("the worker ready", Duration::from_secs(30), || async {
        Ok(reqwest::get(format!("{worker_url}/readyz")).await?.status() == reqwest::StatusCode::OK)
    })
    .await
    .unwrap();

    stack.nats.kill();
    wait_for("the worker not ready without NATS", Duration::from_secs(30), || async {
        let response = reqwest::get(format!("{worker_url}/readyz")).await?;
        let code = response.status();
        let r: serde_json::Value = response.json().await?;
        Ok(code == reqwest::StatusCode::SERVICE_UNAVAILABLE && r["nats"] != "ok" && r["postgres"] == "ok")
    })
    .await
    .unwrap();
    wait_for("the coordinator not ready without NATS", Duration::from_secs(30), || async {
        let response = reqwest::get(format!("{url}/readyz")).await?;
        let code = response.status();
        let r: coordinator::api::Readiness = response.json().await?;
        Ok(code == reqwest::StatusCode::SERVICE_UNAVAILABLE && !r.ready && r.nats != "ok" && r.postgres == "ok")
    })
    .await
    .unwrap();
    // Liveness is another matter: the process is fine.
    let live = reqwest::get(format!("{url}/healthz")).await.unwrap();
    assert_eq!(live.status(), reqwest::StatusCode::OK);
}

/// A leader frozen past its lease (SIGSTOP) wakes with every timer due. It
/// must not answer as leader, nor publish, on the lease its successor holds:
/// it knows the lease ran out while it was not running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_frozen_past_its_lease_does_not_lead_when_it_wakes() {
    let (stack, coordinators, job, _logs) = cluster(2, 2_000).await;
    let frozen = one_leader(&coordinators, &[true, true]).await;
    let other = 1 - frozen;
    coordinators[frozen].freeze().unwrap();
    let mut alive = vec![true; 2];
    alive[frozen] = false;
    assert_eq!(one_leader(&coordinators, &alive).await, other);
    // Asked while frozen: the question waits in the socket and is the first
    // thing answered on waking, before a renewal could fail.
    let url = coordinators[frozen].url();
    let asked = tokio::spawn(async move { readiness(&url).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    coordinators[frozen].thaw().unwrap();
    let woken = asked.await.unwrap().expect("the thawed coordinator answers");
    assert!(!woken.leader, "the thawed coordinator answered as leader: {woken:?}");
    // Never two leaders after that either, and the job finishes once.
    for _ in 0..20 {
        leaders(&coordinators, &[true, true]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    completes_exactly_once(&stack, &coordinators[other], job, 2_000).await;
}
