//! `sluice`: the command-line interface of Sluice, and `sluice serve`, the coordinator service.

/// mimalloc rather than the system allocator: the call path allocates many small,
/// short-lived buffers (requests, responses, JSON), and glibc's malloc spent a
/// fifth of the worker's CPU on them in `scripts/bench`.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `println!`, `print!`, `eprintln!` and `eprint!` for the commands below
/// (declared before them, so they stand in for std's): what cannot be
/// written to a reader that went away (`sluice status JOB | head -1`, `2>&1 |
/// head -3`) is dropped, and the command ends with its own exit code; std's
/// panic ("failed printing to stdout"), exit 101. Commands that stream much
/// (`results`, `sample`) stop at a closed pipe and exit 0 (`is_broken_pipe`).
macro_rules! println {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}
macro_rules! print {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut out = std::io::stdout();
        let _ = write!(out, $($arg)*).and_then(|_| out.flush());
    }};
}
macro_rules! eprintln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}
macro_rules! eprint {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stderr(), $($arg)*);
    }};
}

mod commands;

use clap::Parser as _;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = match commands::Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version print and succeed; a wrong command line has
        // its own exit code, not clap's 2, which means refused input here.
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                std::process::ExitCode::from(commands::USAGE)
            } else {
                std::process::ExitCode::SUCCESS
            };
        }
    };
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
