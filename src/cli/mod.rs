//! Subcommands. Each turns its clap arguments into a validated config and
//! runs; errors come back as `anyhow` chains printed once by `main`.

mod check;
mod crash_states;
mod format;
mod info;
mod log_info;
mod mark;
mod scrub;
mod serve;
mod signal;
mod stage;
mod status;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use twinsum::key::Key;

/// A vhost-user-blk backend that guards a virtual disk with two checksums
/// per block.
#[derive(Debug, Parser)]
#[command(name = "twinsum", version, about, long_about = None)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve IMG as a vhost-user-blk disk on a Unix socket.
    Serve(serve::ServeArgs),
    /// Write fresh metadata for IMG (creating a sparse IMG with --size).
    Format(format::FormatArgs),
    /// Verify every block of IMG against its metadata.
    Check(check::CheckArgs),
    /// Print the metadata superblock.
    Info(info::InfoArgs),
    /// What a write log (serve --log-writes) holds.
    LogInfo(log_info::LogInfoArgs),
    /// Write the crash states of a recorded run: images a power cut could
    /// leave, with their metadata, and manifest.json.
    CrashStates(crash_states::CrashStatesArgs),
    /// Ask a running serve for its counters and state (its --control socket).
    Status(status::StatusArgs),
    /// Verify every block of a running serve's disk in the background.
    Scrub(scrub::ScrubArgs),
    /// What SIGUSR1 does: metadata written out, then kept current.
    SyncMode(signal::SignalArgs),
    /// What SIGUSR2 does under serve --volatile-cache: a simulated power cut.
    PowerCut(signal::SignalArgs),
    /// Put a named mark into a running serve's --log-writes log now.
    Mark(mark::MarkArgs),
}

/// Load `--key-file`, if given; its refusals (too short, too open) are
/// errors.
fn load_key(path: Option<&PathBuf>) -> anyhow::Result<Option<Key>> {
    Ok(path.map(|p| Key::load(p)).transpose()?)
}

/// Run the chosen subcommand and return the process exit code.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    match args.command {
        Command::Serve(a) => serve::run(a),
        Command::Format(a) => format::run(a),
        Command::Check(a) => check::run(a),
        Command::Info(a) => info::run(a),
        Command::LogInfo(a) => log_info::run(a),
        Command::CrashStates(a) => crash_states::run(a),
        Command::Status(a) => status::run(a),
        Command::Scrub(a) => scrub::run(a),
        Command::SyncMode(a) => signal::sync_mode(a),
        Command::PowerCut(a) => signal::power_cut(a),
        Command::Mark(a) => mark::run(a),
    }
}
