//! `twinsum check`: verify every block of IMG against both checksum slots,
//! with [`twinsum::integrity::verify`]; this file opens, calls and prints.
//!
//! Read-only and under shared locks, so it can run next to another check
//! but never next to `serve` or `format`.
//!
//! Also home of the helpers `format` and `scrub` share: the progress bar
//! and the chunked data scan.

use std::io::{self, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{mpsc, Arc};
use std::thread;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use twinsum::integrity::verify::{self, DataRegions};
use twinsum::io::{Device, FileDevice, OpenFlags, PageBuf};
use twinsum::meta::Metadata;

/// Arguments of `twinsum check`.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// The data image (file or block device).
    #[arg(long, value_name = "IMG")]
    data: PathBuf,
    /// The metadata file or device written by `twinsum format`.
    #[arg(long, value_name = "META")]
    meta: PathBuf,
    #[command(flatten)]
    stage: super::stage::StageArg,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// The key file of a disk formatted with --key-file (required for
    /// such a disk, refused for any other).
    #[arg(long, value_name = "FILE")]
    key_file: Option<PathBuf>,
}

/// Bytes per data read of `scan_data`. Large enough that syscalls are
/// cheap, small enough that the buffers in flight stay in the CPU cache
/// between read and hash.
const CHUNK_BYTES: usize = 1 << 20;
/// Chunks read ahead of the hashing thread.
const READ_AHEAD: usize = 2;

pub fn run(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let key = super::load_key(args.key_file.as_ref())?;
    // Shared locks: read-only, so a second check may run, a serve may not.
    let shared = OpenFlags {
        writable: false,
        lock: true,
    };
    let meta_dev = FileDevice::open(&args.meta, shared)
        .with_context(|| format!("cannot open metadata {}", args.meta.display()))?;
    let mut meta = Metadata::open_with(Arc::new(meta_dev), 64, key.as_ref())
        .with_context(|| format!("cannot use metadata {}", args.meta.display()))?;
    let data = FileDevice::open(&args.data, shared)
        .with_context(|| format!("cannot open image {}", args.data.display()))?;
    meta.check_image(data.size()).with_context(|| {
        format!(
            "cannot use metadata {} with image {}",
            args.meta.display(),
            args.data.display()
        )
    })?;
    let stage = super::stage::inspect(&args.stage.path(&args.meta)?, meta.superblock())?;
    if let Some(st) = &stage {
        eprintln!(
            "twinsum check: {} completed writes ({} bytes) {} the write-back stage {}; {}",
            st.writes,
            st.bytes,
            if st.in_use { "are in" } else { "wait in" },
            st.path.display(),
            if st.in_use {
                "a running serve holds them"
            } else {
                "serve replays them before it serves; this check sees the image without them"
            }
        );
    }
    let out = Output {
        json: args.json,
        progress: progress_bar(data.size(), "checking"),
    };
    let verified = verify::verify_all(&mut meta, &data, &|n| out.progress.inc(n))
        .with_context(|| format!("checking {}", args.data.display()))?;
    let report = Report { verified, stage };
    out.progress.finish_and_clear();
    out.finish(&report)?;
    Ok(if report.verified.mismatches.count == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// What `check --json` prints: the verifier's report and the stage.
#[derive(Debug, Serialize)]
struct Report {
    #[serde(flatten)]
    verified: verify::Report,
    /// Completed writes not yet in the image, if any.
    stage: Option<super::stage::StageReport>,
}

/// Text or JSON output of the final report.
struct Output {
    json: bool,
    progress: ProgressBar,
}

impl Output {
    fn finish(&self, report: &Report) -> anyhow::Result<()> {
        let mut stdout = io::BufWriter::new(io::stdout().lock());
        if self.json {
            serde_json::to_writer(&mut stdout, report)?;
            writeln!(stdout)?;
        } else {
            let report = &report.verified;
            for b in &report.mismatches.listed {
                writeln!(stdout, "block {b}: data matches neither checksum")?;
            }
            let unlisted = report.mismatches.unlisted();
            if unlisted > 0 {
                writeln!(stdout, "... and {unlisted} more mismatched blocks")?;
            }
            writeln!(
                stdout,
                "{} of {} blocks checked: {} mismatched, {} pending, metadata {}",
                report.checked,
                report.blocks,
                report.mismatches.count,
                report.pending,
                if report.clean { "clean" } else { "not clean" }
            )?;
        }
        stdout.flush()?;
        Ok(())
    }
}

/// A progress bar on stderr, hidden unless stderr is a terminal.
pub(super) fn progress_bar(total_bytes: u64, what: &'static str) -> ProgressBar {
    if !io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let style = ProgressStyle::with_template(
        "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    ProgressBar::new(total_bytes)
        .with_style(style)
        .with_message(what)
}

/// One chunk of data read from the device: `len` valid bytes at `offset`.
struct Chunk {
    offset: u64,
    buf: PageBuf,
    len: usize,
}

/// Call `visit(offset, bytes)` for every data region of `dev` in order, in
/// block-aligned chunks of up to [`CHUNK_BYTES`], skipping holes.
///
/// A helper thread reads ahead so that the device read of the next chunk
/// overlaps `visit` on this one; buffers are recycled, so memory stays at a
/// few chunks whatever the device size.
pub(super) fn scan_data<D, F>(dev: &D, block_size: u64, mut visit: F) -> anyhow::Result<()>
where
    D: Device + ?Sized,
    F: FnMut(u64, &[u8]) -> anyhow::Result<()>,
{
    let (full_tx, full_rx) = mpsc::sync_channel::<io::Result<Chunk>>(READ_AHEAD);
    let (free_tx, free_rx) = mpsc::channel::<PageBuf>();
    thread::scope(|s| {
        s.spawn(move || read_ahead(dev, block_size, &full_tx, &free_rx));
        // Moved in so that an early return drops the receiver, which stops
        // the reader before the scope joins it.
        let full_rx = full_rx;
        for msg in full_rx.iter() {
            let chunk = msg.context("reading the image")?;
            visit(chunk.offset, &chunk.buf[..chunk.len])?;
            // The reader may be gone already; then the buffer is just freed.
            let _ = free_tx.send(chunk.buf);
        }
        Ok(())
    })
}

/// The reader thread of [`scan_data`]: send filled chunks of every data
/// region until the end of the device or the receiver is gone.
fn read_ahead<D: Device + ?Sized>(
    dev: &D,
    bs: u64,
    tx: &mpsc::SyncSender<io::Result<Chunk>>,
    free: &mpsc::Receiver<PageBuf>,
) {
    for region in DataRegions::new(dev, bs) {
        let (start, end) = match region {
            Ok(r) => r,
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        let mut off = start;
        while off < end {
            let len = (end - off).min(CHUNK_BYTES as u64) as usize;
            let mut buf = free
                .try_recv()
                .unwrap_or_else(|_| PageBuf::zeroed(CHUNK_BYTES));
            let msg = dev.read_at(&mut buf[..len], off).map(|()| Chunk {
                offset: off,
                buf,
                len,
            });
            let failed = msg.is_err();
            if tx.send(msg).is_err() || failed {
                return;
            }
            off += len as u64;
        }
    }
}
