//! `twinsum crash-states`: the states a power cut could leave at chosen
//! instants of a recorded run (`serve --log-writes`), each a servable,
//! checkable image with its metadata, and `manifest.json`.

use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use twinsum::writelog::states::{self, At, Options};

/// Arguments of `twinsum crash-states`.
#[derive(Debug, clap::Args)]
pub struct CrashStatesArgs {
    /// The write log of the run.
    #[arg(long, value_name = "LOG")]
    log: PathBuf,
    /// A copy of the image as it was when the log began
    /// (`cp --sparse=always` before `serve --log-writes`).
    #[arg(long, value_name = "IMG")]
    base: PathBuf,
    /// A copy of the metadata taken with the base image. Each state's
    /// metadata is this plus the recorded metadata writes a power cut
    /// could have left.
    #[arg(long, value_name = "META")]
    base_meta: PathBuf,
    /// Directory for the states (NNNN.img, NNNN.meta) and manifest.json;
    /// created if missing.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// At most N states [default: every flush or mark; 10 random instants].
    #[arg(long, value_name = "N")]
    count: Option<usize>,
    /// Seed of the random instants and of which later writes are kept,
    /// dropped or torn [default: random, printed].
    #[arg(long, value_name = "S")]
    seed: Option<u64>,
    /// Where to cut: right after each guest flush, at each mark, or at
    /// random instants.
    #[arg(long, value_enum, default_value_t = AtArg::Flushes)]
    at: AtArg,
    /// The key file of a disk formatted with --key-file (required for
    /// such a disk: the base and every state are checked).
    #[arg(long, value_name = "FILE")]
    key_file: Option<PathBuf>,
    /// Print manifest.json instead of a line per state.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum AtArg {
    Flushes,
    Marks,
    Random,
}

/// Most states one run makes: each is a copy of the base.
const MAX_COUNT: usize = 100_000;

pub fn run(args: CrashStatesArgs) -> anyhow::Result<ExitCode> {
    if args.count.is_some_and(|n| n == 0 || n > MAX_COUNT) {
        bail!("--count must be between 1 and {MAX_COUNT}");
    }
    let seed = args.seed.unwrap_or_else(rand::random);
    let opts = Options {
        key: super::load_key(args.key_file.as_ref())?,
        log: args.log,
        base: args.base,
        base_meta: args.base_meta,
        out: args.out,
        at: match args.at {
            AtArg::Flushes => At::Flushes,
            AtArg::Marks => At::Marks,
            AtArg::Random => At::Random,
        },
        count: args.count,
        seed,
    };
    let manifest = states::generate(&opts).with_context(|| {
        format!(
            "crash states of {} into {}",
            opts.log.display(),
            opts.out.display()
        )
    })?;
    let bad: Vec<_> = manifest.states.iter().filter(|s| !s.ok()).collect();
    let mut out = io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &manifest)?;
        writeln!(out)?;
    } else {
        for s in &manifest.states {
            writeln!(
                out,
                "{}: cut at entry {} ({}{}), last flush {}, kept {} dropped {} torn {} of the un-synced writes, {} durable; {}",
                s.image,
                s.cut,
                s.at.name(),
                s.mark.as_ref().map_or(String::new(), |m| format!(" {m:?}")),
                s.last_flush.map_or("none".to_owned(), |f| format!("at {f}")),
                s.kept,
                s.dropped,
                s.torn,
                s.durable,
                if s.ok() { "checks clean" } else { "FAILS" }
            )?;
        }
        writeln!(
            out,
            "{} states in {} (seed {seed}; manifest.json lists them)",
            manifest.states.len(),
            opts.out.display()
        )?;
    }
    for s in &bad {
        eprintln!(
            "twinsum crash-states: {} (cut at entry {}): {} block(s) match neither checksum {:?}, {} block(s) lost what a completed flush promised {:?}",
            s.image,
            s.cut,
            s.mismatches.len(),
            &s.mismatches[..s.mismatches.len().min(8)],
            s.broken_promises.len(),
            &s.broken_promises[..s.broken_promises.len().min(8)],
        );
    }
    if manifest.states.is_empty() {
        eprintln!(
            "twinsum crash-states: the log has no instant to cut at with --at {}",
            opts.at.name()
        );
    }
    Ok(if bad.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
