//! `twinsum log-info`: what a write log (`serve --log-writes`) holds.

use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use twinsum::writelog::LogFile;

/// Arguments of `twinsum log-info`.
#[derive(Debug, clap::Args)]
pub struct LogInfoArgs {
    /// The write log.
    #[arg(value_name = "LOG")]
    log: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: LogInfoArgs) -> anyhow::Result<ExitCode> {
    let log = LogFile::open(&args.log)
        .with_context(|| format!("cannot read write log {}", args.log.display()))?;
    let s = log.summary();
    let mut out = io::stdout().lock();
    if args.json {
        serde_json::to_writer(&mut out, &s)?;
        writeln!(out)?;
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(
        out,
        "write log {}: a disk of {} bytes in {}-byte blocks",
        args.log.display(),
        s.data_size,
        s.block_size
    )?;
    writeln!(
        out,
        "entries:  {} ({} bytes), {} start(s), {} orderly stop(s){}",
        s.entries,
        s.bytes,
        s.starts,
        s.stops,
        if s.torn_bytes > 0 {
            format!(", {} bytes of torn tail ignored", s.torn_bytes)
        } else {
            String::new()
        }
    )?;
    writeln!(
        out,
        "guest:    {} writes ({} blocks), {} zeroes, {} flushes, {} marks",
        s.writes,
        s.write_blocks,
        s.zeroes,
        s.flushes,
        s.marks.len()
    )?;
    for (name, d) in [("data:", &s.data), ("metadata:", &s.meta)] {
        writeln!(
            out,
            "{name:<9} {} writes ({} bytes, {} durable), {} zeroings, {} syncs",
            d.writes, d.write_bytes, d.durable_writes, d.zeroes, d.syncs
        )?;
    }
    for m in &s.marks {
        writeln!(out, "mark {:?} at entry {}", m.name, m.position)?;
    }
    Ok(ExitCode::SUCCESS)
}
