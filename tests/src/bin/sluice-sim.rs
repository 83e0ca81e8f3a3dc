//! `sluice-sim`: the OpenAI-compatible model simulator used by Sluice's demo, tests and benchmarks.

/// mimalloc rather than the system allocator: the call path allocates many small,
/// short-lived buffers (requests, responses, JSON), and glibc's malloc spent a
/// fifth of the worker's CPU on them in `scripts/bench`.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;

/// Serves /v1/chat/completions with deterministic answers, configurable
/// latency, rate limits and faults. Change behaviour at run time with
/// `POST /admin/config`; read counters at `GET /stats`.
#[derive(Debug, Parser)]
#[command(name = "sluice-sim", version)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "SIM_LISTEN", default_value = "127.0.0.1:7800")]
    listen: String,
    #[command(flatten)]
    config: sluice_tests::sim::SimConfig,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
    eprintln!("sluice-sim listening on http://{}", listener.local_addr()?);
    let sim = sluice_tests::sim::Sim::new(args.config);
    sluice_tests::sim::serve(listener, sim, common::shutdown::on_signals()).await?;
    Ok(())
}
