//! `twinsum check`: verify every block of IMG against both checksum slots.
//!
//! Read-only and under shared locks, so it can run next to another check
//! but never next to `serve` or `format`. The main thread walks the pair
//! table and the data regions in order and hands chunks of data to one
//! worker per CPU, each of which reads its chunk and verifies it while it
//! is still in cache: hashing is slower than the kernel's copy, so one
//! thread could not keep up with a plain sequential read. Holes are not
//! read at all; only their pairs are checked against the all-zero block.
//!
//! Also home of the helpers `format` shares: the progress bar and the
//! chunked data scan.

use std::io::{self, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{mpsc, Arc, Mutex};
use std::thread;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use twinsum::integrity::hash::{self, Checksum, Verdict};
use twinsum::io::{Device, FileDevice, OpenFlags};
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

/// Pairs fetched from the table at a time (1 MiB of table).
const PAIR_WINDOW: usize = 65536;
/// Bytes per data read of `scan_data`. Large enough that syscalls are
/// cheap, small enough that the buffers in flight stay in the CPU cache
/// between read and hash.
const CHUNK_BYTES: usize = 1 << 20;
/// Chunks read ahead of the hashing thread.
const READ_AHEAD: usize = 2;
/// Bytes one check worker reads and verifies at a time: they are hashed
/// right after the read, while still in the worker's L2 cache.
const JOB_BYTES: usize = 512 << 10;
/// Upper bound on check workers, whatever the CPU count.
const MAX_WORKERS: usize = 8;
/// Jobs queued or running per worker: enough to keep each busy.
const JOBS_PER_WORKER: usize = 4;
/// Mismatched block numbers kept for the list; the count is exact.
const MAX_LISTED: usize = 1 << 20;

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
    let mut report = verify_all(&mut meta, &data, &out)
        .with_context(|| format!("checking {}", args.data.display()))?;
    report.stage = stage;
    out.progress.finish_and_clear();
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
    /// Block numbers that match neither slot, sorted (at most
    /// `MAX_LISTED`; `mismatch_count` is exact).
    mismatches: Vec<u64>,
    mismatch_count: u64,
    /// Pairs whose slots differ: written since the last data sync.
    pending: u64,
    /// The superblock says the last stop was orderly.
    clean: bool,
    generation: u64,
    /// Completed writes not yet in the image, if any.
    stage: Option<super::stage::StageReport>,
}

/// Verify every block: data regions on the workers, holes inline, both in
/// ascending block order as far as the table is concerned.
fn verify_all(meta: &mut Metadata, data: &FileDevice, out: &Output) -> anyhow::Result<Report> {
    let sb = meta.superblock().clone();
    let sum = Checksum::of(&sb, meta.key())?;
    let bs = u64::from(sb.block_size);
    let mut tally = Tally {
        sum,
        zeros: vec![0u8; sb.block_size as usize],
        progress: out.progress.clone(),
        bs,
        report: Report {
            blocks: sb.blocks,
            block_size: sb.block_size,
            clean: sb.clean,
            generation: sb.generation,
            ..Report::default()
        },
    };
    let mut window = PairWindow::new(sb.blocks);
    let workers = thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, MAX_WORKERS);
    let job_blocks = JOB_BYTES as u64 / bs;
    thread::scope(|s| -> anyhow::Result<()> {
        let mut pool = Pool::start(s, workers, data, sum, bs);
        let mut next_block = 0;
        for region in DataRegions::new(data, bs) {
            let (start, end) = region.context("finding the data regions of the image")?;
            window.holes(meta, &mut tally, next_block, start / bs)?;
            let mut b = start / bs;
            while b < end / bs {
                let n = job_blocks.min(end / bs - b);
                let pairs = window.copy(meta, b, n)?;
                tally.count(&pairs);
                pool.submit(Job { first: b, pairs }, &mut tally)?;
                b += n;
            }
            next_block = end / bs;
        }
        window.holes(meta, &mut tally, next_block, sb.blocks)?;
        pool.finish(&mut tally)
    })?;
    let mut report = tally.report;
    report.mismatches.sort_unstable();
    Ok(report)
}

/// A chunk of consecutive blocks for a worker, with their pairs.
struct Job {
    first: u64,
    pairs: Vec<Pair>,
}

/// What a worker found in one job.
struct Done {
    blocks: u64,
    bad: Vec<u64>,
}

/// The check workers and the bounded queue in front of them.
struct Pool {
    jobs: mpsc::Sender<Job>,
    done: mpsc::Receiver<io::Result<Done>>,
    in_flight: usize,
    limit: usize,
}

impl Pool {
    /// Spawn `workers` threads in scope `s`. They stop when the pool (its
    /// job sender) is dropped, also on an early error return.
    fn start<'scope>(
        s: &'scope thread::Scope<'scope, '_>,
        workers: usize,
        dev: &'scope FileDevice,
        sum: Checksum,
        bs: u64,
    ) -> Self {
        let (job_tx, job_rx) = mpsc::channel::<Job>();
        let job_rx = Arc::new(Mutex::new(job_rx));
        let (done_tx, done_rx) = mpsc::channel();
        for _ in 0..workers {
            let (jobs, done) = (Arc::clone(&job_rx), done_tx.clone());
            s.spawn(move || work(dev, sum, bs, &jobs, &done));
        }
        Self {
            jobs: job_tx,
            done: done_rx,
            in_flight: 0,
            limit: workers * JOBS_PER_WORKER,
        }
    }

    fn submit(&mut self, job: Job, tally: &mut Tally) -> anyhow::Result<()> {
        if self.in_flight >= self.limit {
            self.collect_one(tally)?;
        }
        self.jobs
            .send(job)
            .map_err(|_| anyhow::anyhow!("the check workers stopped"))?;
        self.in_flight += 1;
        Ok(())
    }

    fn finish(mut self, tally: &mut Tally) -> anyhow::Result<()> {
        while self.in_flight > 0 {
            self.collect_one(tally)?;
        }
        Ok(())
    }

    fn collect_one(&mut self, tally: &mut Tally) -> anyhow::Result<()> {
        let done = self
            .done
            .recv()
            .map_err(|_| anyhow::anyhow!("the check workers stopped"))?
            .context("reading the image")?;
        self.in_flight -= 1;
        tally.absorb(done);
        Ok(())
    }
}

/// A check worker: read each job's blocks into a private buffer and verify
/// them, until the job queue closes.
fn work(
    dev: &FileDevice,
    sum: Checksum,
    bs: u64,
    jobs: &Mutex<mpsc::Receiver<Job>>,
    done: &mpsc::Sender<io::Result<Done>>,
) {
    let mut buf = vec![0u8; JOB_BYTES];
    loop {
        // The guard is a temporary: the lock is released before the work.
        let job = match jobs.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok(job) = job else { return };
        if done.send(verify_job(dev, sum, bs, &job, &mut buf)).is_err() {
            return;
        }
    }
}

fn verify_job(
    dev: &FileDevice,
    sum: Checksum,
    bs: u64,
    job: &Job,
    buf: &mut Vec<u8>,
) -> io::Result<Done> {
    let len = job.pairs.len() * bs as usize;
    if buf.len() < len {
        buf.resize(len, 0);
    }
    let data = &mut buf[..len];
    dev.read_at(data, job.first * bs).map_err(|e| {
        let last = job.first + job.pairs.len() as u64 - 1;
        io::Error::new(e.kind(), format!("blocks {}..={last}: {e}", job.first))
    })?;
    let bad = data
        .chunks_exact(bs as usize)
        .zip(&job.pairs)
        .zip(job.first..)
        .filter(|((content, p), b)| sum.verify(*b, content, p.new, p.old) == Verdict::Neither)
        .map(|(_, b)| b)
        .collect();
    Ok(Done {
        blocks: job.pairs.len() as u64,
        bad,
    })
}

/// The verdicts so far.
struct Tally {
    sum: Checksum,
    /// One all-zero block: what a hole reads as.
    zeros: Vec<u8>,
    progress: ProgressBar,
    bs: u64,
    report: Report,
}

impl Tally {
    /// Count blocks as checked and pending when their pairs are fetched.
    fn count(&mut self, pairs: &[Pair]) {
        self.report.checked += pairs.len() as u64;
        self.report.pending += pairs.iter().filter(|p| p.new != p.old).count() as u64;
    }

    fn absorb(&mut self, done: Done) {
        for b in done.bad {
            self.mismatch(b);
        }
        self.progress.inc(done.blocks * self.bs);
    }

    /// Judge a block that lies in a hole, so reads as zeros.
    fn judge_zeros(&mut self, block: u64, pair: Pair) {
        if self.sum.verify(block, &self.zeros, pair.new, pair.old) == Verdict::Neither {
            self.mismatch(block);
        }
    }

    fn mismatch(&mut self, block: u64) {
        self.report.mismatch_count += 1;
        if self.report.mismatches.len() < MAX_LISTED {
            self.report.mismatches.push(block);
        }
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

    fn covers(&self, block: u64) -> bool {
        block >= self.first && block < self.first + self.pairs.len() as u64
    }

    /// The pairs of blocks `block..end`, or of a non-empty prefix of them
    /// (up to the end of the window).
    fn slice(&mut self, meta: &mut Metadata, block: u64, end: u64) -> anyhow::Result<&[Pair]> {
        if !self.covers(block) {
            let n = (self.blocks.saturating_sub(block)).min(PAIR_WINDOW as u64) as usize;
            if n == 0 {
                anyhow::bail!("block {block} is past the end of the table");
            }
            self.pairs.resize(n, Pair::ZERO);
            meta.get_range(block, &mut self.pairs)?;
            self.first = block;
        }
        let start = (block - self.first) as usize;
        let stop = ((end - self.first) as usize).min(self.pairs.len());
        Ok(&self.pairs[start..stop])
    }

    /// The pairs of blocks `block..block + n`, copied out for a worker.
    fn copy(&mut self, meta: &mut Metadata, block: u64, n: u64) -> anyhow::Result<Vec<Pair>> {
        let mut out = Vec::with_capacity(n as usize);
        let end = block + n;
        while (out.len() as u64) < n {
            let b = block + out.len() as u64;
            out.extend_from_slice(self.slice(meta, b, end)?);
        }
        Ok(out)
    }

    /// Check blocks `first..end`, which lie in a hole and so read as
    /// zeros. A zero slot accepts that without looking at bytes, so most
    /// cost one compare.
    fn holes(
        &mut self,
        meta: &mut Metadata,
        tally: &mut Tally,
        first: u64,
        end: u64,
    ) -> anyhow::Result<()> {
        let mut b = first;
        while b < end {
            if !self.covers(b) {
                // Where the table is a hole too, every pair is zero and
                // accepts the zeros: nothing to read at all.
                let skip = meta.zero_run(b, end - b)?;
                if skip > 0 {
                    tally.report.checked += skip;
                    tally.progress.inc(skip * tally.bs);
                    b += skip;
                    continue;
                }
            }
            let pairs = self.slice(meta, b, end)?;
            tally.count(pairs);
            for (i, pair) in pairs.iter().enumerate() {
                if pair.new != hash::ZERO && pair.old != hash::ZERO {
                    // A real checksum may still be that of zeros (the
                    // guest wrote a zero block): hash it.
                    tally.judge_zeros(b + i as u64, *pair);
                }
            }
            b += pairs.len() as u64;
            tally.progress.inc(pairs.len() as u64 * tally.bs);
        }
        Ok(())
    }
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
            for b in &report.mismatches {
                writeln!(stdout, "block {b}: data matches neither checksum")?;
            }
            let unlisted = report.mismatch_count - report.mismatches.len() as u64;
            if unlisted > 0 {
                writeln!(stdout, "... and {unlisted} more mismatched blocks")?;
            }
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

/// The reader thread of [`scan_data`]: send filled chunks of every data
/// region until the end of the device or the receiver is gone.
fn read_ahead<D: Device + ?Sized>(
    dev: &D,
    bs: u64,
    tx: &mpsc::SyncSender<io::Result<Chunk>>,
    free: &mpsc::Receiver<Vec<u8>>,
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
    }
}

/// The regions of a device that may hold data, in order, widened to whole
/// blocks and never overlapping (holes come in filesystem blocks, which
/// need not match ours).
struct DataRegions<'a, D: ?Sized> {
    dev: &'a D,
    bs: u64,
    pos: u64,
    done: bool,
}

impl<'a, D: Device + ?Sized> DataRegions<'a, D> {
    fn new(dev: &'a D, bs: u64) -> Self {
        Self {
            dev,
            bs,
            pos: 0,
            done: false,
        }
    }
}

impl<D: Device + ?Sized> Iterator for DataRegions<'_, D> {
    type Item = io::Result<(u64, u64)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let (start, end) = match self.dev.next_data(self.pos) {
            Ok(Some(region)) => region,
            Ok(None) => {
                self.done = true;
                return None;
            }
            Err(e) => {
                self.done = true;
                return Some(Err(e));
            }
        };
        let start = (start / self.bs * self.bs).max(self.pos);
        let end = end
            .div_ceil(self.bs)
            .saturating_mul(self.bs)
            .min(self.dev.size());
        if end <= start {
            // Cannot happen for a sane device; stop rather than spin.
            self.done = true;
            return None;
        }
        self.pos = end;
        Some(Ok((start, end)))
    }
}
