//! The `twinsum` command line: serve | format | check | info | status | scrub
//! | sync-mode | power-cut | mark | log-info | crash-states.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let args = cli::Args::parse();
    match cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            // One line naming the cause, with its chain.
            eprintln!("twinsum: {e:#}");
            ExitCode::from(2)
        }
    }
}
