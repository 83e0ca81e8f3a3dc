//! Types and helpers shared by the Sluice coordinator, workers and tests: wire messages, job kinds, the model client, telemetry and shutdown.

pub mod cache;
pub mod db;
pub mod nats;
pub mod prices;
pub mod private_file;
pub mod provider;
pub mod providers;
pub mod redact;
pub mod sample;
pub mod segment;
pub mod shutdown;
pub mod spec;
pub mod stages;
pub mod state;
pub mod telemetry;
pub mod wire;

/// An error and its sources on one line (`a: b: c`), for messages that
/// cross a process boundary.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// A settings struct with every field at its declared default, whatever
/// flags and `SLUICE_*` variables the process has: the configuration a user
/// gets by setting nothing, for tests and embedders to start from.
pub fn declared_defaults<T: clap::Args + clap::FromArgMatches>() -> T {
    let cmd = T::augment_args(clap::Command::new("defaults")).mut_args(|a| a.env(None::<&str>));
    let matches = cmd.try_get_matches_from(["defaults"]).expect("every setting has a default");
    T::from_arg_matches(&matches).expect("the declared defaults parse")
}
