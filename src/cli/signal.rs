//! `twinsum sync-mode` and `twinsum power-cut`: what SIGUSR1 and SIGUSR2
//! do, through the control socket, answering with the result.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use serde::Deserialize;
use twinsum::control::protocol::Request;
use twinsum::control::{Client, PowerCut};

/// Arguments of `twinsum sync-mode` and `twinsum power-cut`.
#[derive(Debug, clap::Args)]
pub struct SignalArgs {
    /// The control socket of `twinsum serve --control PATH`.
    #[arg(long, value_name = "PATH")]
    control: PathBuf,
    /// Print the daemon's reply as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Deserialize, serde::Serialize)]
struct SyncMode {
    sync_mode: bool,
    readonly: bool,
}

#[derive(Debug, Deserialize, serde::Serialize)]
struct Cut {
    power_cut: PowerCut,
}

pub fn sync_mode(args: SignalArgs) -> anyhow::Result<ExitCode> {
    let r: SyncMode = Client::connect(&args.control)?
        .call(&Request::SyncMode)
        .with_context(|| format!("sync-mode through {}", args.control.display()))?;
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
    } else if r.readonly {
        println!("read-only disk: its metadata is never written");
    } else {
        println!("metadata is current; every write now completes with its metadata durable");
    }
    Ok(ExitCode::SUCCESS)
}

pub fn power_cut(args: SignalArgs) -> anyhow::Result<ExitCode> {
    let r: Cut = Client::connect(&args.control)?
        .call(&Request::PowerCut)
        .with_context(|| format!("power-cut through {}", args.control.display()))?;
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        let c = &r.power_cut;
        println!(
            "power cut #{}: seed {}, kept {} of {} un-synced {}-byte blocks (data), kept {} of {} un-synced 512-byte sectors (metadata)",
            c.number, c.seed, c.data_kept, c.data_unsynced, c.data_unit, c.meta_kept, c.meta_unsynced
        );
    }
    Ok(ExitCode::SUCCESS)
}
