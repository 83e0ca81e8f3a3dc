//! TLS where Sluice crosses a network: the coordinator's API over HTTPS, checked by the client and the CLI against the CA the user names, and refused under any other.

use std::process::Command;

use sluice_tests::fixtures::{workspace_bin, NatsServer, Stack, TestCa};
use sluice_tests::sim::SimConfig;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_serves_https_and_clients_refuse_a_certificate_of_another_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("Sluice test CA").unwrap();
    let (ca_pem, cert, key) = ca.write_server_files(dir.path(), &["localhost", "127.0.0.1"]).unwrap();
    let other_pem = dir.path().join("other-ca.pem");
    std::fs::write(&other_pem, TestCa::new("Another CA").unwrap().pem()).unwrap();
    let stack = Stack::start(SimConfig::default(), |c| {
        c.tls_cert_file = Some(cert.clone());
        c.tls_key_file = Some(key.clone());
    })
    .await
    .unwrap();
    let port = stack.coordinator_addr.port();
    let url = format!("https://localhost:{port}");

    // Trusting the CA that signed the coordinator's certificate: it works.
    let client = coordinator::client::Client::new(&url).with_ca_file(&ca_pem).unwrap().with_token(&stack.admin_token);
    assert_eq!(client.whoami().await.unwrap().name, "test-admin");
    // Any other CA, or only the usual roots: refused before a byte of the request is sent.
    for client in [
        coordinator::client::Client::new(&url).with_ca_file(&other_pem).unwrap(),
        coordinator::client::Client::new(&url),
    ] {
        let err = common::error_chain(&client.with_token(&stack.admin_token).whoami().await.unwrap_err());
        assert!(err.to_lowercase().contains("certificate"), "{err}");
    }
    // Nothing is served in the clear on that port.
    let plain = reqwest::get(format!("http://127.0.0.1:{port}/healthz")).await;
    assert!(plain.is_err(), "plain HTTP got an answer: {plain:?}");

    // The CLI, with --ca-file and without.
    let cli = |ca: Option<&std::path::Path>| {
        let mut cmd = Command::new(workspace_bin("sluice").unwrap());
        cmd.args(["whoami", "--coordinator", &url]).env("SLUICE_TOKEN", &stack.admin_token);
        if let Some(ca) = ca {
            cmd.arg("--ca-file").arg(ca);
        }
        cmd.output().unwrap()
    };
    let out = cli(Some(&ca_pem));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("test-admin"));
    let out = cli(Some(&other_pem));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).to_lowercase().contains("certificate"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn a_certificate_without_its_key_or_a_bad_one_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("Sluice test CA").unwrap();
    let (ca_pem, cert, _) = ca.write_server_files(dir.path(), &["localhost"]).unwrap();
    let mut config = sluice_tests::fixtures::serve_config("postgres://127.0.0.1:9/none", "nats://127.0.0.1:9");
    config.tls_cert_file = Some(cert.clone());
    let err = coordinator::Coordinator::bind(config.clone()).await.err().unwrap().to_string();
    assert!(err.contains("SLUICE_TLS_CERT_FILE and SLUICE_TLS_KEY_FILE go together"), "{err}");
    // A key that is not the certificate's.
    let elsewhere = dir.path().join("x");
    std::fs::create_dir(&elsewhere).unwrap();
    let (_, _, other_key) = TestCa::new("x").unwrap().write_server_files(&elsewhere, &["x"]).unwrap();
    config.tls_key_file = Some(other_key);
    let err = coordinator::Coordinator::bind(config.clone()).await.err().unwrap().to_string();
    assert!(err.contains("do not go together"), "{err}");
    config.tls_key_file = Some(ca_pem);
    let err = coordinator::Coordinator::bind(config).await.err().unwrap().to_string();
    assert!(err.contains("cannot read the TLS private key"), "{err}");
}

/// NATS with TLS and a user per component, with the permissions of
/// deploy/nats/permissions.conf: the coordinator with a password, the worker
/// with an nkey. A job runs through it, nothing it does is refused, and what
/// a component does not need is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_with_tls_and_a_user_per_component_runs_a_job_and_refuses_the_rest() {
    use common::nats::NatsAuth;
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("Sluice test CA").unwrap();
    let (ca_pem, cert, key) = ca.write_server_files(dir.path(), &["localhost", "127.0.0.1"]).unwrap();
    let worker_key = nkeys::KeyPair::new_user();
    let permissions =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/nats/permissions.conf")).unwrap();
    let config = format!(
        r#"{permissions}
tls {{
  cert_file: "{}"
  key_file: "{}"
}}
authorization {{
  users: [
    {{ user: coordinator, password: "coordinator-pw", permissions: $COORDINATOR_PERMISSIONS }}
    {{ nkey: "{}", permissions: $WORKER_PERMISSIONS }}
  ]
}}
"#,
        cert.display(),
        key.display(),
        worker_key.public_key()
    );
    let nats = NatsServer::start_with_config(&config).unwrap();
    let auth = |user: &str| {
        let password = dir.path().join(format!("{user}.pw"));
        common::private_file::write(&password, &format!("{user}-pw")).unwrap();
        NatsAuth {
            nats_ca_file: Some(ca_pem.clone()),
            nats_user: Some(user.into()),
            nats_password_file: Some(password),
            nats_nkey_file: None,
            nats_creds_file: None,
        }
    };
    let coordinator_auth = auth("coordinator");
    let seed = dir.path().join("worker.nk");
    common::private_file::write(&seed, &worker_key.seed().unwrap()).unwrap();
    let worker_auth = NatsAuth {
        nats_ca_file: Some(ca_pem.clone()),
        nats_user: None,
        nats_password_file: None,
        nats_nkey_file: Some(seed),
        nats_creds_file: None,
    };
    let mut stack =
        Stack::start_on_nats(nats, SimConfig::default(), |c| c.nats_auth = coordinator_auth.clone()).await.unwrap();
    stack.add_worker(|c| c.nats_auth = worker_auth.clone());
    let report = stack.submit("classify", sluice_tests::fixtures::sample_jsonl(3, 300), false).await.unwrap();
    if let Err(e) = stack.wait_completed(report.job_id, std::time::Duration::from_secs(60)).await {
        let log = stack.nats.log();
        let refused: Vec<&str> = log.lines().filter(|l| l.contains("Violation")).collect();
        panic!("{e}; the server refused:\n{}", refused.join("\n"));
    }
    let log = stack.nats.log();
    assert!(!log.contains("Violation"), "the job needed something refused:\n{log}");

    // What each does not need is refused.
    let url = stack.nats.url().to_string();
    let worker = async_nats::jetstream::new(common::nats::connect(&url, &worker_auth).await.unwrap());
    let coordinator = async_nats::jetstream::new(common::nats::connect(&url, &coordinator_auth).await.unwrap());
    assert!(worker.delete_stream(common::wire::STREAM).await.is_err(), "a worker deleted the chunk stream");
    assert!(
        coordinator.get_key_value(common::nats::STATE_BUCKET).await.is_err(),
        "the coordinator opened the state bucket"
    );
    let forged = worker.publish(format!("{}.forged", common::wire::SUBJECT_PREFIX), "{}".into()).await;
    assert!(forged.is_err() || forged.unwrap().await.is_err(), "a worker published a chunk");
    sluice_tests::fixtures::wait_for(
        "the refusals in the server's log",
        std::time::Duration::from_secs(10),
        || async {
            let log = stack.nats.log();
            Ok(log.contains("Publish Violation - Subject \"$JS.API.STREAM.DELETE.SLUICE_CHUNKS\"")
                && log.contains("Publish Violation - Subject \"sluice.chunks.forged\""))
        },
    )
    .await
    .unwrap();
    assert!(stack.client.status(report.job_id).await.is_ok());

    // Without the CA, with another CA, or without the right key or password: no connection.
    let other = dir.path().join("other.pem");
    std::fs::write(&other, TestCa::new("Another CA").unwrap().pem()).unwrap();
    let stranger = dir.path().join("stranger.nk");
    common::private_file::write(&stranger, &nkeys::KeyPair::new_user().seed().unwrap()).unwrap();
    let wrong_pw = dir.path().join("wrong.pw");
    common::private_file::write(&wrong_pw, "guess").unwrap();
    for (what, auth) in [
        ("the public roots only", NatsAuth { nats_ca_file: None, ..worker_auth.clone() }),
        ("another CA", NatsAuth { nats_ca_file: Some(other), ..worker_auth.clone() }),
        ("no nkey", NatsAuth { nats_nkey_file: None, ..worker_auth.clone() }),
        ("another nkey", NatsAuth { nats_nkey_file: Some(stranger), ..worker_auth.clone() }),
        ("a wrong password", NatsAuth { nats_password_file: Some(wrong_pw), ..coordinator_auth.clone() }),
    ] {
        assert!(common::nats::connect(&url, &auth).await.is_err(), "connected with {what}");
    }
}

/// Postgres with TLS: the coordinator and a worker connect with
/// `sslmode=verify-full` and the CA's certificate, their sessions are
/// encrypted, and another CA or a connection without TLS is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_connections_are_encrypted_and_checked_against_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("Sluice test CA").unwrap();
    let (ca_pem, cert, key) = ca.write_server_files(dir.path(), &["localhost"]).unwrap();
    let other = dir.path().join("other.pem");
    std::fs::write(&other, TestCa::new("Another CA").unwrap().pem()).unwrap();
    let mut cluster = sluice_tests::fixtures::PgCluster::start().await.unwrap();
    let db = sluice_tests::fixtures::TestDb::create_on(&cluster.admin_url()).await.unwrap();
    let port =
        cluster.listen_tls(&std::fs::read_to_string(&cert).unwrap(), &std::fs::read_to_string(&key).unwrap()).unwrap();
    let url = |role: &str, mode: &str, ca: &std::path::Path| {
        format!("postgres://{role}@localhost:{port}/{}?sslmode={mode}&sslrootcert={}", db.name(), ca.display())
    };
    let nats = NatsServer::start().unwrap();

    let coordinator = coordinator::Coordinator::bind(sluice_tests::fixtures::serve_config(
        &url("sluice_coordinator", "verify-full", &ca_pem),
        nats.url(),
    ))
    .await
    .unwrap();
    let worker = worker::Worker::connect(worker::WorkerConfig::for_urls(
        &url("sluice_worker", "verify-full", &ca_pem),
        nats.url(),
        "http://127.0.0.1:9/v1",
    ))
    .await
    .unwrap();
    // Over the socket, which has moved with the port.
    let mut superuser = <sqlx::PgConnection as sqlx::Connection>::connect(&cluster.admin_url()).await.unwrap();
    let sessions: Vec<(String, bool)> = sqlx::query_as(
        "SELECT a.usename::text, s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
         WHERE a.usename IN ('sluice_coordinator', 'sluice_worker')",
    )
    .fetch_all(&mut superuser)
    .await
    .unwrap();
    for role in ["sluice_coordinator", "sluice_worker"] {
        assert!(sessions.iter().any(|(r, _)| r == role), "{role} has no session: {sessions:?}");
    }
    assert!(sessions.iter().all(|(_, ssl)| *ssl), "a session is not encrypted: {sessions:?}");

    let err = coordinator::Coordinator::bind(sluice_tests::fixtures::serve_config(
        &url("sluice_coordinator", "verify-full", &other),
        nats.url(),
    ))
    .await
    .err()
    .unwrap();
    let err = common::error_chain(&err).to_lowercase();
    assert!(err.contains("certificate"), "{err}");
    let err = worker::Worker::connect(worker::WorkerConfig::for_urls(
        &url("sluice_worker", "disable", &ca_pem),
        nats.url(),
        "http://127.0.0.1:9/v1",
    ))
    .await
    .err()
    .unwrap();
    let err = common::error_chain(&err);
    assert!(err.contains("pg_hba.conf") && err.contains("no encryption"), "{err}");
    drop((coordinator, worker));
}
