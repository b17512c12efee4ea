//! `twinsum format` (stub until implemented).

use std::process::ExitCode;

/// Arguments of `twinsum format`.
#[derive(Debug, clap::Args)]
pub struct FormatArgs {}

pub fn run(_args: FormatArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("format is not implemented yet")
}
