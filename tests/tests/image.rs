//! The OCI image's root filesystem (built by scripts/image, which scripts/test runs) works on its own: both binaries run from it with chroot, as the image's non-root user, and a worker from it finishes a job.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use sluice_tests::fixtures::{sample_jsonl, Stack};
use sluice_tests::sim::SimConfig;

fn rootfs() -> PathBuf {
    let dir = std::env::var("SLUICE_IMAGE_ROOTFS")
        .expect("SLUICE_IMAGE_ROOTFS is not set: run the tests with scripts/test, which builds the image");
    PathBuf::from(dir)
}

/// `chroot --userspec=10001:10001 ROOTFS cmd...`, with nothing of the host's environment.
fn in_image(args: &[&str]) -> Command {
    // By its path: the cleared environment has no PATH to look it up in.
    let mut cmd = Command::new("/usr/sbin/chroot");
    cmd.arg("--userspec=10001:10001").arg(rootfs()).args(args).env_clear();
    cmd
}

#[test]
fn the_image_holds_exactly_the_binaries_and_what_they_need() {
    let root = rootfs();
    for f in ["usr/local/bin/sluice", "usr/local/bin/sluice-worker", "etc/ssl/certs/ca-certificates.crt", "etc/passwd"]
    {
        assert!(root.join(f).is_file(), "{f} is missing");
    }
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
    assert!(passwd.contains("sluice:x:10001:10001"), "{passwd}");
    // No shell, no package manager: nothing but what runs Sluice.
    assert!(!root.join("bin/sh").exists() && !root.join("usr/bin").exists());
    for bin in ["sluice", "sluice-worker"] {
        let out = in_image(&[&format!("/usr/local/bin/{bin}"), "--version"]).output().unwrap();
        assert!(out.status.success(), "{bin}: {}", String::from_utf8_lossy(&out.stderr));
        let version = String::from_utf8_lossy(&out.stdout);
        assert_eq!(version.trim(), format!("{bin} {}", env!("CARGO_PKG_VERSION")));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_from_the_image_finishes_a_job() {
    let stack = Stack::start(SimConfig::default(), |_| {}).await.unwrap();
    let config = stack.worker_config();
    let mut worker = in_image(&["/usr/local/bin/sluice-worker"])
        .envs(config.to_env())
        .env("SLUICE_WORKER_NAME", "from-the-image")
        .env("SLUICE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let report = stack.submit("classify", sample_jsonl(91, 200), false).await.unwrap();
    let done = stack.wait_completed(report.job_id, Duration::from_secs(60)).await;
    let _ = worker.kill();
    let out = worker.wait_with_output().unwrap();
    done.unwrap_or_else(|e| panic!("{e}; the worker said:\n{}", String::from_utf8_lossy(&out.stderr)));
    let st = stack.client.status(report.job_id).await.unwrap();
    assert_eq!((st.succeeded, st.failed), (200, 0));
    let workers: Vec<String> = sqlx::query_scalar("SELECT DISTINCT worker FROM results WHERE job_id = $1")
        .bind(report.job_id)
        .fetch_all(&stack.db.pool)
        .await
        .unwrap();
    assert_eq!(workers, ["from-the-image"]);
}
