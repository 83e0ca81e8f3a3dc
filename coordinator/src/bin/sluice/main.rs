//! `sluice`: the command-line interface of Sluice, and `sluice serve`, the coordinator service.

mod commands;

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = commands::Cli::parse();
    match commands::dispatch(cli).await {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {}", commands::render_error(&err));
            std::process::ExitCode::from(1)
        }
    }
}
