//! `twinsum info` (stub until implemented).

use std::process::ExitCode;

/// Arguments of `twinsum info`.
#[derive(Debug, clap::Args)]
pub struct InfoArgs {}

pub fn run(_args: InfoArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("info is not implemented yet")
}
