//! `sluice`: the command-line interface of Sluice, and `sluice serve`, the coordinator service.

/// mimalloc rather than the system allocator: the call path allocates many small,
/// short-lived buffers (requests, responses, JSON), and glibc's malloc spent a
/// fifth of the worker's CPU on them in `scripts/bench`.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod commands;

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = commands::Cli::parse();
    match commands::dispatch(cli).await {
        Ok(code) => code,
        // Output cut short by its reader (`| head`) is what the user wanted.
        Err(err) if commands::is_broken_pipe(&err) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", commands::render_error(&err));
            std::process::ExitCode::from(1)
        }
    }
}
