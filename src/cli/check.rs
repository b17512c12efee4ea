//! `twinsum check` (stub until implemented).

use std::process::ExitCode;

/// Arguments of `twinsum check`.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {}

pub fn run(_args: CheckArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("check is not implemented yet")
}
