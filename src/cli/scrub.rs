//! `twinsum scrub`: start, follow or stop the online scrub of a running
//! serve, through its control socket.
//!
//! Exit status: 0 clean (or started, or stopped without mismatches), 1
//! mismatches found, 2 error (refused, failed, or stopped under `--wait`).

use std::io::{self, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::thread;
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Deserialize;
use twinsum::control::protocol::Request;
use twinsum::control::{Client, Status};
use twinsum::integrity::scrub::{Progress, ScrubState, DEFAULT_RATE_MIB};

/// Arguments of `twinsum scrub`.
#[derive(Debug, clap::Args)]
pub struct ScrubArgs {
    /// The control socket of `twinsum serve --control PATH`.
    #[arg(long, value_name = "PATH")]
    control: PathBuf,
    /// MiB read per second (0 = as fast as the disk goes).
    #[arg(long, value_name = "MIB_PER_S", default_value_t = DEFAULT_RATE_MIB, conflicts_with = "stop")]
    rate: u64,
    /// Follow the scrub to its end (a progress bar on a terminal, a line
    /// per 10 % otherwise) and print its summary.
    #[arg(long, conflicts_with = "stop")]
    wait: bool,
    /// Stop the running scrub.
    #[arg(long)]
    stop: bool,
    /// Print the scrub's report as one JSON object.
    #[arg(long)]
    json: bool,
}

/// How often `--wait` asks for progress: soon at first (a sparse disk
/// scrubs in milliseconds), then every quarter second.
const FIRST_POLL: Duration = Duration::from_millis(5);
const POLL: Duration = Duration::from_millis(250);

#[derive(Deserialize)]
struct Scrubbed {
    scrub: Option<Progress>,
}

pub fn run(args: ScrubArgs) -> anyhow::Result<ExitCode> {
    let what = || format!("scrub through {}", args.control.display());
    let mut client = Client::connect(&args.control)?;
    if args.stop {
        let p = client
            .call::<Scrubbed>(&Request::ScrubStop)
            .with_context(what)?
            .scrub
            .context("the daemon stopped no scrub")?;
        print_report(&p, args.json)?;
        return Ok(if p.mismatches.count > 0 {
            ExitCode::from(1)
        } else {
            ExitCode::SUCCESS
        });
    }
    let started = client
        .call::<Scrubbed>(&Request::Scrub {
            rate_mib: Some(args.rate),
        })
        .with_context(what)?
        .scrub
        .context("the daemon started no scrub")?;
    if !args.wait {
        if args.json {
            println!("{}", serde_json::to_string(&started)?);
        } else {
            println!(
                "scrub #{} started: {} blocks at {}; `twinsum status` shows its progress",
                started.id,
                started.blocks,
                rate_text(started.rate_mib)
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let done = follow(&mut client, &started).with_context(what)?;
    print_report(&done, args.json)?;
    if done.mismatches.count > 0 {
        return Ok(ExitCode::from(1));
    }
    match done.state {
        ScrubState::Done => Ok(ExitCode::SUCCESS),
        ScrubState::Failed => bail!(
            "scrub #{} failed: {}",
            done.id,
            done.error.as_deref().unwrap_or("see the daemon's log")
        ),
        _ => bail!(
            "scrub #{} was stopped at {:.1}% before it found anything",
            done.id,
            done.percent()
        ),
    }
}

/// Poll until scrub `started` ends; return its full report.
fn follow(client: &mut Client, started: &Progress) -> anyhow::Result<Progress> {
    let total = started.blocks * u64::from(started.block_size);
    let bar = super::check::progress_bar(total, "scrubbing");
    let lines = !io::stderr().is_terminal();
    let mut next_tenth = 1;
    let mut pause = FIRST_POLL;
    loop {
        let status: Status = client.call(&Request::Status)?;
        let Some(sc) = status.scrub.filter(|s| s.id == started.id) else {
            bail!("scrub #{} was replaced by another", started.id);
        };
        bar.set_position(sc.position * u64::from(started.block_size));
        while lines && next_tenth <= 10 && sc.percent >= f64::from(next_tenth) * 10.0 {
            eprintln!(
                "scrub #{}: {}% ({} MiB read, {} mismatched)",
                sc.id,
                next_tenth * 10,
                sc.bytes_read >> 20,
                sc.mismatch_count
            );
            next_tenth += 1;
        }
        if sc.state != ScrubState::Running {
            break;
        }
        thread::sleep(pause);
        pause = (pause * 2).min(POLL);
    }
    bar.finish_and_clear();
    let p = client
        .call::<Scrubbed>(&Request::ScrubStatus)?
        .scrub
        .filter(|p| p.id == started.id)
        .with_context(|| format!("scrub #{}'s report is gone", started.id))?;
    Ok(p)
}

fn rate_text(rate_mib: u64) -> String {
    match rate_mib {
        0 => "full speed".into(),
        r => format!("{r} MiB/s"),
    }
}

fn print_report(p: &Progress, json: bool) -> anyhow::Result<()> {
    let mut out = io::BufWriter::new(io::stdout().lock());
    if json {
        serde_json::to_writer(&mut out, p)?;
        writeln!(out)?;
    } else {
        for b in &p.mismatches.listed {
            writeln!(out, "block {b}: data matches neither checksum")?;
        }
        if p.mismatches.unlisted() > 0 {
            writeln!(
                out,
                "... and {} more mismatched blocks",
                p.mismatches.unlisted()
            )?;
        }
        let secs = p.elapsed_ms as f64 / 1000.0;
        writeln!(
            out,
            "scrub #{} {}: {} of {} blocks behind it ({:.1}%), {} MiB read in {:.1} s{}: {} mismatched",
            p.id,
            super::status::state_name(p.state),
            p.position,
            p.blocks,
            p.percent(),
            p.bytes_read >> 20,
            secs,
            if secs > 0.0 {
                format!(" ({:.1} MiB/s)", p.bytes_read as f64 / f64::from(1 << 20) / secs)
            } else {
                String::new()
            },
            p.mismatches.count
        )?;
        if let Some(e) = &p.error {
            writeln!(out, "error: {e}")?;
        }
    }
    out.flush()?;
    Ok(())
}
