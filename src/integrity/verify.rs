//! The verifier: every block of a disk judged against its pair, offline.
//!
//! `twinsum check` is a thin front for [`verify_all`]; the online scrub
//! ([`super::scrub`]) shares the hole walk ([`DataRegions`]) and the way
//! mismatches are tallied ([`Mismatches`]), but reads through the engine,
//! so that writes racing it are judged as a guest read judges them.
//!
//! [`verify_all`] runs read-only on files no server holds. The calling
//! thread walks the pair table and the data regions in order and hands
//! chunks of data to one worker per CPU, each of which reads its chunk and
//! verifies it while it is still in cache: hashing is slower than the
//! kernel's copy, so one thread could not keep up with a plain sequential
//! read. Holes are not read at all; only their pairs are checked against
//! the all-zero block.

use std::io;
use std::sync::{mpsc, Arc, Mutex};
use std::thread;

use serde::{Deserialize, Serialize};

use super::hash::{self, Checksum};
use crate::io::{Device, PageBuf};
use crate::meta::{MetaError, Metadata, Pair, SuperblockError};

/// Pairs fetched from the table at a time (1 MiB of table).
const PAIR_WINDOW: usize = 65536;
/// Bytes one worker reads and verifies at a time: they are hashed right
/// after the read, while still in the worker's L2 cache.
const JOB_BYTES: usize = 512 << 10;
/// Upper bound on workers, whatever the CPU count.
const MAX_WORKERS: usize = 8;
/// Jobs queued or running per worker: enough to keep each busy.
const JOBS_PER_WORKER: usize = 4;
/// Mismatched block numbers a report lists; its count is exact.
pub const MAX_LISTED: usize = 1 << 20;

/// Why a verification could not finish. Messages say what failed; causes
/// are sources.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error(transparent)]
    Checksum(#[from] SuperblockError),
    #[error("finding the data regions of the image")]
    Regions(#[source] io::Error),
    #[error("reading the image")]
    Read(#[source] io::Error),
    #[error("block {0} is past the end of the table")]
    PastTable(u64),
    #[error("the check workers stopped")]
    WorkersStopped,
}

/// Blocks found matching neither slot: an exact count, and the block
/// numbers of the first [`MAX_LISTED`] (serialized as a report's
/// `mismatches` list and `mismatch_count`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mismatches {
    #[serde(rename = "mismatches")]
    pub listed: Vec<u64>,
    #[serde(rename = "mismatch_count")]
    pub count: u64,
}

impl Mismatches {
    pub fn add(&mut self, block: u64) {
        self.count += 1;
        if self.listed.len() < MAX_LISTED {
            self.listed.push(block);
        }
    }

    /// Counted but not listed.
    pub fn unlisted(&self) -> u64 {
        self.count - self.listed.len() as u64
    }
}

/// What [`verify_all`] found (`check --json` prints it).
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub blocks: u64,
    pub block_size: u32,
    pub checked: u64,
    /// Sorted by block number.
    #[serde(flatten)]
    pub mismatches: Mismatches,
    /// Pairs whose slots differ: written since the last data sync.
    pub pending: u64,
    /// The superblock says the last stop was orderly.
    pub clean: bool,
    pub generation: u64,
}

/// Verify every block of `data` against `meta`: data regions on the
/// workers, holes inline, both in ascending block order as far as the
/// table is concerned. `progress` is told of every byte judged.
pub fn verify_all<D: Device + ?Sized>(
    meta: &mut Metadata,
    data: &D,
    progress: &dyn Fn(u64),
) -> Result<Report, VerifyError> {
    let sb = meta.superblock().clone();
    let sum = Checksum::of(&sb, meta.key())?;
    let bs = u64::from(sb.block_size);
    let mut tally = Tally {
        versions: meta.versions().clone(),
        sum,
        zeros: vec![0u8; sb.block_size as usize],
        progress,
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
    thread::scope(|s| -> Result<(), VerifyError> {
        let mut pool = Pool::start(s, workers, data, sum, bs);
        let mut next_block = 0;
        for region in DataRegions::new(data, bs) {
            let (start, end) = region.map_err(VerifyError::Regions)?;
            window.holes(meta, &mut tally, next_block, start / bs)?;
            let mut b = start / bs;
            while b < end / bs {
                let n = job_blocks.min(end / bs - b);
                let pairs = window.copy(meta, b, n)?;
                tally.count(&pairs);
                let extras = tally
                    .versions
                    .range(b..b + n)
                    .map(|(&b, v)| (b, v.clone()))
                    .collect();
                pool.submit(
                    Job {
                        first: b,
                        pairs,
                        extras,
                    },
                    &mut tally,
                )?;
                b += n;
            }
            next_block = end / bs;
        }
        window.holes(meta, &mut tally, next_block, sb.blocks)?;
        pool.finish(&mut tally)
    })?;
    let mut report = tally.report;
    report.mismatches.listed.sort_unstable();
    Ok(report)
}

/// A chunk of consecutive blocks for a worker, with their pairs.
struct Job {
    first: u64,
    pairs: Vec<Pair>,
    /// Format version 3: the blocks of the job with more versions than
    /// their pair (from the metadata log), and those versions.
    extras: Vec<(u64, Vec<u64>)>,
}

/// What a worker found in one job.
struct Done {
    blocks: u64,
    bad: Vec<u64>,
}

/// The workers and the bounded queue in front of them.
struct Pool {
    jobs: mpsc::Sender<Job>,
    done: mpsc::Receiver<io::Result<Done>>,
    in_flight: usize,
    limit: usize,
}

impl Pool {
    /// Spawn `workers` threads in scope `s`. They stop when the pool (its
    /// job sender) is dropped, also on an early error return.
    fn start<'scope, D: Device + ?Sized>(
        s: &'scope thread::Scope<'scope, '_>,
        workers: usize,
        dev: &'scope D,
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

    fn submit(&mut self, job: Job, tally: &mut Tally) -> Result<(), VerifyError> {
        if self.in_flight >= self.limit {
            self.collect_one(tally)?;
        }
        self.jobs
            .send(job)
            .map_err(|_| VerifyError::WorkersStopped)?;
        self.in_flight += 1;
        Ok(())
    }

    fn finish(mut self, tally: &mut Tally) -> Result<(), VerifyError> {
        while self.in_flight > 0 {
            self.collect_one(tally)?;
        }
        Ok(())
    }

    fn collect_one(&mut self, tally: &mut Tally) -> Result<(), VerifyError> {
        let done = self
            .done
            .recv()
            .map_err(|_| VerifyError::WorkersStopped)?
            .map_err(VerifyError::Read)?;
        self.in_flight -= 1;
        tally.absorb(done);
        Ok(())
    }
}

/// A worker: read each job's blocks into a private buffer and verify
/// them, until the job queue closes.
fn work<D: Device + ?Sized>(
    dev: &D,
    sum: Checksum,
    bs: u64,
    jobs: &Mutex<mpsc::Receiver<Job>>,
    done: &mpsc::Sender<io::Result<Done>>,
) {
    let mut buf = PageBuf::zeroed(JOB_BYTES);
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

fn verify_job<D: Device + ?Sized>(
    dev: &D,
    sum: Checksum,
    bs: u64,
    job: &Job,
    buf: &mut PageBuf,
) -> io::Result<Done> {
    let len = job.pairs.len() * bs as usize;
    if buf.len() < len {
        *buf = PageBuf::zeroed(len);
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
        .filter(|((content, p), b)| !matches_any(sum, *b, content, **p, extras_of(&job.extras, *b)))
        .map(|(_, b)| b)
        .collect();
    Ok(Done {
        blocks: job.pairs.len() as u64,
        bad,
    })
}

/// Whether `content` of block `b` matches its pair or one of `extras`.
fn matches_any(sum: Checksum, b: u64, content: &[u8], p: Pair, extras: &[u64]) -> bool {
    sum.find_version(b, content, p, extras).is_some()
}

fn extras_of(extras: &[(u64, Vec<u64>)], b: u64) -> &[u64] {
    extras
        .binary_search_by_key(&b, |(x, _)| *x)
        .map_or(&[], |i| extras[i].1.as_slice())
}

/// The verdicts so far.
struct Tally<'p> {
    /// Format version 3: blocks the metadata log gives more versions than
    /// their pair.
    versions: std::collections::BTreeMap<u64, Vec<u64>>,
    sum: Checksum,
    /// One all-zero block: what a hole reads as.
    zeros: Vec<u8>,
    progress: &'p dyn Fn(u64),
    bs: u64,
    report: Report,
}

impl Tally<'_> {
    /// Count blocks as checked and pending when their pairs are fetched.
    fn count(&mut self, pairs: &[Pair]) {
        self.report.checked += pairs.len() as u64;
        self.report.pending += pairs.iter().filter(|p| p.new != p.old).count() as u64;
    }

    fn absorb(&mut self, done: Done) {
        for b in done.bad {
            self.report.mismatches.add(b);
        }
        (self.progress)(done.blocks * self.bs);
    }

    /// Judge a block that lies in a hole, so reads as zeros.
    fn judge_zeros(&mut self, block: u64, pair: Pair) {
        let extras = self.versions.get(&block).map_or(&[][..], Vec::as_slice);
        if !matches_any(self.sum, block, &self.zeros, pair, extras) {
            self.report.mismatches.add(block);
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
    fn slice(&mut self, meta: &mut Metadata, block: u64, end: u64) -> Result<&[Pair], VerifyError> {
        if !self.covers(block) {
            let n = (self.blocks.saturating_sub(block)).min(PAIR_WINDOW as u64) as usize;
            if n == 0 {
                return Err(VerifyError::PastTable(block));
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
    fn copy(&mut self, meta: &mut Metadata, block: u64, n: u64) -> Result<Vec<Pair>, VerifyError> {
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
    ) -> Result<(), VerifyError> {
        let mut b = first;
        while b < end {
            if !self.covers(b) {
                // Where the table is a hole too, every pair is zero and
                // accepts the zeros: nothing to read at all.
                let skip = meta.zero_run(b, end - b)?;
                if skip > 0 {
                    tally.report.checked += skip;
                    (tally.progress)(skip * tally.bs);
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
            (tally.progress)(pairs.len() as u64 * tally.bs);
        }
        Ok(())
    }
}

/// The regions of a device that may hold data, in order, widened to whole
/// blocks and never overlapping (holes come in filesystem blocks, which
/// need not match ours).
pub struct DataRegions<'a, D: ?Sized> {
    dev: &'a D,
    bs: u64,
    pos: u64,
    done: bool,
}

impl<'a, D: Device + ?Sized> DataRegions<'a, D> {
    pub fn new(dev: &'a D, bs: u64) -> Self {
        Self {
            dev,
            bs,
            pos: 0,
            done: false,
        }
    }
}

impl<D: Device + ?Sized> Iterator for DataRegions<'_, D> {
    /// `(start, end)` in bytes, both multiples of the block size (or the
    /// device size).
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
