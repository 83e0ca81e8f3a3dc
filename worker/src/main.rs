//! `sluice-worker`: parses configuration, starts telemetry, runs the worker until a signal.

/// mimalloc rather than the system allocator: the call path allocates many small,
/// short-lived buffers (requests, responses, JSON), and glibc's malloc spent a
/// fifth of the worker's CPU on them in `scripts/bench`.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;

/// A Sluice worker: pulls chunks of work from NATS JetStream, calls the model
/// for each item and writes results to Postgres. Run as many as you like.
#[derive(Debug, Parser)]
#[command(name = "sluice-worker", version)]
struct Args {
    #[command(flatten)]
    worker: worker::WorkerConfig,
    #[command(flatten)]
    telemetry: common::telemetry::TelemetryConfig,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    common::telemetry::init(&args.telemetry)?;
    worker::run(args.worker, common::shutdown::on_signals()).await?;
    Ok(())
}
