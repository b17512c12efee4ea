//! `twinsum info`: print the metadata superblock.
//!
//! Takes no lock, so it works while `serve` holds the disk; it reads only
//! sector 0, which is always written whole.

use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use serde::Serialize;
use twinsum::io::FileDevice;
use twinsum::meta::{hash_name, Metadata, Superblock, HASH_BLAKE3_KEYED};

/// Arguments of `twinsum info`.
#[derive(Debug, clap::Args)]
pub struct InfoArgs {
    /// The metadata file or device written by `twinsum format`.
    #[arg(long, value_name = "META")]
    meta: PathBuf,
    #[command(flatten)]
    stage: super::stage::StageArg,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// What `info --json` prints.
#[derive(Debug, Serialize)]
struct Info {
    version: u32,
    block_size: u32,
    blocks: u64,
    data_size: u64,
    clean: bool,
    sync_mode: bool,
    /// Hex string: JSON numbers lose precision past 2^53.
    salt: String,
    generation: u64,
    /// "xxh3-64", or "blake3-keyed" for a disk formatted with a key.
    hash: &'static str,
    /// Bytes of metadata log (format versions 2 and 3; 0 for version 1).
    log_size: u64,
    /// Log records since the last checkpoint: what a crash left to replay
    /// (the next serve folds them into the table).
    log_records: u64,
    /// Completed writes waiting in the write-back stage (0: none).
    stage_writes: u64,
    /// Why the stage cannot be read, if so.
    #[serde(skip_serializing_if = "Option::is_none")]
    stage_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stage: Option<super::stage::StageReport>,
}

impl From<&Superblock> for Info {
    fn from(sb: &Superblock) -> Self {
        Self {
            version: sb.version,
            block_size: sb.block_size,
            blocks: sb.blocks,
            data_size: sb.data_size,
            clean: sb.clean,
            sync_mode: sb.sync_mode,
            salt: format!("{:#018x}", sb.salt),
            log_size: sb.log_size,
            log_records: 0,
            generation: sb.generation,
            hash: hash_name(sb.hash_id),
            stage_writes: 0,
            stage_error: None,
            stage: None,
        }
    }
}

pub fn run(args: InfoArgs) -> anyhow::Result<ExitCode> {
    let dev = FileDevice::open(&args.meta, Default::default())
        .with_context(|| format!("cannot open metadata {}", args.meta.display()))?;
    // Opening also checks that the table is as long as the superblock says.
    // info takes no key, so a keyed superblock's MAC goes unchecked: what
    // it shows is what the sector says, not proof it is untouched.
    let meta = Metadata::open_unverified(Arc::new(dev), 1)
        .with_context(|| format!("cannot use metadata {}", args.meta.display()))?;
    let mut info = Info::from(meta.superblock());
    info.log_records = meta.log_replay().records;
    // The stage is extra: metadata without a readable one is still shown.
    match args
        .stage
        .path(&args.meta)
        .and_then(|p| super::stage::inspect(&p, meta.superblock()))
    {
        Ok(st) => {
            info.stage_writes = st.as_ref().map_or(0, |s| s.writes);
            info.stage = st;
        }
        Err(e) => info.stage_error = Some(format!("{e:#}")),
    }
    let mut out = io::stdout().lock();
    if args.json {
        serde_json::to_writer(&mut out, &info)?;
        writeln!(out)?;
    } else {
        print_text(&mut out, &info)?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

fn print_text(out: &mut impl Write, i: &Info) -> io::Result<()> {
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    writeln!(out, "version:     {}", i.version)?;
    writeln!(out, "block size:  {}", i.block_size)?;
    writeln!(out, "blocks:      {}", i.blocks)?;
    writeln!(out, "data size:   {} bytes", i.data_size)?;
    let unchecked = if i.hash == hash_name(HASH_BLAKE3_KEYED) {
        " (superblock MAC not checked: info takes no key)"
    } else {
        ""
    };
    writeln!(out, "hash:        {}{unchecked}", i.hash)?;
    writeln!(out, "salt:        {}", i.salt)?;
    writeln!(out, "generation:  {}", i.generation)?;
    writeln!(out, "clean:       {}", yes_no(i.clean))?;
    writeln!(out, "sync mode:   {}", yes_no(i.sync_mode))?;
    if i.log_size > 0 {
        writeln!(
            out,
            "log:         {} KiB, {} records since the last checkpoint",
            i.log_size >> 10,
            i.log_records
        )?;
    } else {
        writeln!(out, "log:         none (version 1 metadata)")?;
    }
    match (&i.stage, &i.stage_error) {
        (_, Some(e)) => writeln!(out, "stage:       unusable: {e}"),
        (Some(s), None) => writeln!(
            out,
            "stage:       {} completed writes ({} bytes) in {}{}",
            s.writes,
            s.bytes,
            s.path.display(),
            if s.in_use {
                " (in use by a running serve)"
            } else {
                ", replayed at the next serve"
            }
        ),
        (None, None) => writeln!(out, "stage:       empty"),
    }
}
