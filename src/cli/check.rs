//! `twinsum check`: verify every block of IMG against both checksum slots.
//!
//! Read-only and under shared locks, so it can run next to another check
//! but never next to `serve` or `format`. Data regions are read
//! sequentially in large chunks on a helper thread, so reading overlaps
//! hashing; holes are not read at all, only their pairs are checked
//! against the all-zero block.
//!
//! Also home of the helpers `format` shares: the locked open and the
//! chunked data scan.

use std::fs::File;
use std::io::{self, IsTerminal, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{mpsc, Arc};
use std::thread;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use twinsum::integrity::hash::{self, Verdict};
use twinsum::io::{Device, FileDevice};
use twinsum::meta::{Metadata, Pair};

/// Arguments of `twinsum check`.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// The data image (file or block device).
    #[arg(long, value_name = "IMG")]
    data: PathBuf,
    /// The metadata file or device written by `twinsum format`.
    #[arg(long, value_name = "META")]
    meta: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// Pairs fetched from the table at a time (1 MiB of table).
const PAIR_WINDOW: usize = 65536;
/// Bytes per data read. Large enough that syscalls are cheap, small enough
/// that the buffers in flight stay in the CPU cache between read and hash.
const CHUNK_BYTES: usize = 1 << 20;
/// Chunks read ahead of the hashing thread.
const READ_AHEAD: usize = 2;
/// Mismatched block numbers kept for the JSON list; the count is exact.
const MAX_LISTED: usize = 1 << 20;

pub fn run(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let _meta_lock = lock(&args.meta, false)?;
    let _data_lock = lock(&args.data, false)?;
    let meta_dev = FileDevice::open(&args.meta, Default::default())
        .with_context(|| format!("cannot open metadata {}", args.meta.display()))?;
    let mut meta = Metadata::open(Arc::new(meta_dev), 64)
        .with_context(|| format!("cannot use metadata {}", args.meta.display()))?;
    let data = FileDevice::open(&args.data, Default::default())
        .with_context(|| format!("cannot open image {}", args.data.display()))?;
    meta.check_image(data.size()).with_context(|| {
        format!(
            "metadata {} does not belong to {}",
            args.meta.display(),
            args.data.display()
        )
    })?;
    let progress = progress_bar(data.size(), "checking");
    let mut out = Output::new(args.json, progress.clone());
    let report = verify_all(&mut meta, &data, &mut out)
        .with_context(|| format!("checking {}", args.data.display()))?;
    progress.finish_and_clear();
    out.finish(&report)?;
    Ok(if report.mismatch_count == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// What `check --json` prints.
#[derive(Debug, Default, Serialize)]
struct Report {
    blocks: u64,
    block_size: u32,
    checked: u64,
    /// Block numbers that match neither slot (the first `MAX_LISTED`).
    mismatches: Vec<u64>,
    mismatch_count: u64,
    /// Pairs whose slots differ: written since the last data sync.
    pending: u64,
    /// The superblock says the last stop was orderly.
    clean: bool,
    generation: u64,
}

/// Verify every block: data chunks as they arrive, holes in between.
fn verify_all(meta: &mut Metadata, data: &FileDevice, out: &mut Output) -> anyhow::Result<Report> {
    let sb = meta.superblock().clone();
    let bs = u64::from(sb.block_size);
    let progress = out.progress.clone();
    let mut v = Verifier {
        salt: sb.salt,
        meta,
        pairs: PairWindow::new(sb.blocks),
        zeros: vec![0u8; sb.block_size as usize],
        out,
        report: Report {
            blocks: sb.blocks,
            block_size: sb.block_size,
            clean: sb.clean,
            generation: sb.generation,
            ..Report::default()
        },
    };
    let mut next_block = 0;
    scan_data(data, bs, |offset, chunk| {
        let first = offset / bs;
        for b in next_block..first {
            v.hole(b)?;
        }
        for (i, block_data) in chunk.chunks_exact(bs as usize).enumerate() {
            v.block(first + i as u64, block_data)?;
        }
        next_block = first + (chunk.len() as u64) / bs;
        progress.set_position(next_block * bs);
        Ok(())
    })?;
    for b in next_block..sb.blocks {
        v.hole(b)?;
    }
    Ok(v.report)
}

/// Checks blocks one by one in ascending order and keeps the tally.
struct Verifier<'a> {
    salt: u64,
    meta: &'a mut Metadata,
    pairs: PairWindow,
    /// One all-zero block: what a hole reads as.
    zeros: Vec<u8>,
    out: &'a mut Output,
    report: Report,
}

impl Verifier<'_> {
    /// A block whose content was read.
    fn block(&mut self, block: u64, data: &[u8]) -> anyhow::Result<()> {
        let pair = self.pair(block)?;
        self.judge(block, data, pair)
    }

    /// A block inside a hole: it reads as zeros, which a zero slot accepts
    /// without looking at the bytes.
    fn hole(&mut self, block: u64) -> anyhow::Result<()> {
        let pair = self.pair(block)?;
        if pair.new == hash::ZERO || pair.old == hash::ZERO {
            return Ok(());
        }
        // A real checksum may still be that of a zero block (the guest
        // wrote zeros): hash it.
        let zeros = std::mem::take(&mut self.zeros);
        let result = self.judge(block, &zeros, pair);
        self.zeros = zeros;
        result
    }

    fn pair(&mut self, block: u64) -> anyhow::Result<Pair> {
        let pair = self.pairs.get(self.meta, block)?;
        self.report.checked += 1;
        if pair.new != pair.old {
            self.report.pending += 1;
        }
        Ok(pair)
    }

    fn judge(&mut self, block: u64, data: &[u8], pair: Pair) -> anyhow::Result<()> {
        if hash::verify(self.salt, block, data, pair.new, pair.old) != Verdict::Neither {
            return Ok(());
        }
        self.report.mismatch_count += 1;
        if self.report.mismatches.len() < MAX_LISTED {
            self.report.mismatches.push(block);
        }
        self.out.mismatch(block)
    }
}

/// A sliding window over the pair table for a sequential scan.
struct PairWindow {
    blocks: u64,
    first: u64,
    pairs: Vec<Pair>,
}

impl PairWindow {
    fn new(blocks: u64) -> Self {
        Self {
            blocks,
            first: 0,
            pairs: Vec::new(),
        }
    }

    fn get(&mut self, meta: &mut Metadata, block: u64) -> anyhow::Result<Pair> {
        let i = block.wrapping_sub(self.first) as usize;
        if let Some(p) = self.pairs.get(i) {
            return Ok(*p);
        }
        let n = (self.blocks - block).min(PAIR_WINDOW as u64) as usize;
        self.pairs.resize(n, Pair::ZERO);
        meta.get_range(block, &mut self.pairs)?;
        self.first = block;
        self.pairs
            .first()
            .copied()
            .with_context(|| format!("block {block} is past the end of the table"))
    }
}

/// Text or JSON output; text names bad blocks as they are found.
struct Output {
    json: bool,
    progress: ProgressBar,
}

impl Output {
    fn new(json: bool, progress: ProgressBar) -> Self {
        Self { json, progress }
    }

    fn mismatch(&mut self, block: u64) -> anyhow::Result<()> {
        if !self.json {
            self.progress.suspend(|| {
                writeln!(io::stdout(), "block {block}: data matches neither checksum")
            })?;
        }
        Ok(())
    }

    fn finish(&mut self, report: &Report) -> anyhow::Result<()> {
        let mut stdout = io::stdout().lock();
        if self.json {
            serde_json::to_writer(&mut stdout, report)?;
            writeln!(stdout)?;
        } else {
            writeln!(
                stdout,
                "{} of {} blocks checked: {} mismatched, {} pending, metadata {}",
                report.checked,
                report.blocks,
                report.mismatch_count,
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

/// Take an advisory `flock` on `path` for the life of the returned file, so
/// that `check` (shared) and `format` (exclusive) cannot run against a disk
/// that `serve` holds.
///
/// Our own descriptor rather than `FileDevice`'s lock because `io` does not
/// export `OpenFlags`; the lock conflicts all the same, as flock locks
/// belong to the open file and conflict across descriptors.
pub(super) fn lock(path: &Path, exclusive: bool) -> anyhow::Result<File> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let op = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    };
    // SAFETY: flock on a descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::WouldBlock {
            anyhow::bail!("{} is in use by another process (locked)", path.display());
        }
        return Err(e).with_context(|| format!("cannot lock {}", path.display()));
    }
    Ok(file)
}

/// One chunk of data read from the device: `len` valid bytes at `offset`.
struct Chunk {
    offset: u64,
    buf: Vec<u8>,
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
    let (free_tx, free_rx) = mpsc::channel::<Vec<u8>>();
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

/// The reader thread of [`scan_data`]: walk the data regions and send
/// filled chunks until the end of the device or the receiver is gone.
fn read_ahead<D: Device + ?Sized>(
    dev: &D,
    bs: u64,
    tx: &mpsc::SyncSender<io::Result<Chunk>>,
    free: &mpsc::Receiver<Vec<u8>>,
) {
    let size = dev.size();
    let mut pos = 0;
    loop {
        let (start, end) = match dev.next_data(pos) {
            Ok(Some(region)) => region,
            Ok(None) => return,
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        // Regions come in filesystem blocks; widen them to whole blocks.
        let start = (start / bs * bs).max(pos);
        let end = end.div_ceil(bs).saturating_mul(bs).min(size);
        let mut off = start;
        while off < end {
            let len = (end - off).min(CHUNK_BYTES as u64) as usize;
            let mut buf = free.try_recv().unwrap_or_else(|_| vec![0u8; CHUNK_BYTES]);
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
        if end <= pos {
            return;
        }
        pos = end;
    }
}
