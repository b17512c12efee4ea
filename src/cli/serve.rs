//! `twinsum serve` (stub until implemented).

use std::process::ExitCode;

/// Arguments of `twinsum serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {}

pub fn run(_args: ServeArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("serve is not implemented yet")
}
