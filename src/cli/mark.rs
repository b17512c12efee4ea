//! `twinsum mark`: a named mark in the write log of a running
//! `serve --log-writes`, through its control socket, for
//! `crash-states --at marks`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use serde::Deserialize;
use twinsum::control::protocol::Request;
use twinsum::control::{Client, Mark};

/// Arguments of `twinsum mark`.
#[derive(Debug, clap::Args)]
pub struct MarkArgs {
    /// The control socket of `twinsum serve --control PATH --log-writes LOG`.
    #[arg(long, value_name = "PATH")]
    control: PathBuf,
    /// The mark's name (1 to 255 bytes).
    #[arg(value_name = "NAME")]
    name: String,
    /// Print the daemon's reply as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Deserialize, serde::Serialize)]
struct Marked {
    mark: Mark,
}

pub fn run(args: MarkArgs) -> anyhow::Result<ExitCode> {
    let r: Marked = Client::connect(&args.control)?
        .call(&Request::Mark {
            name: args.name.clone(),
        })
        .with_context(|| format!("mark through {}", args.control.display()))?;
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!("mark {:?} at entry {}", r.mark.name, r.mark.position);
    }
    Ok(ExitCode::SUCCESS)
}
