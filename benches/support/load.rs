//! The load generator: a libblkio virtio-blk-vhost-user client that keeps a
//! fixed number of requests in flight on each of its queues, one thread
//! per queue.

use std::ffi::CStr;
use std::mem::MaybeUninit;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

use super::image::{self, SplitMix, BLOCK};

/// What one measured run does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    RandRead,
    RandWrite,
    SeqRead,
    SeqWrite,
}

impl Kind {
    pub fn writes(self) -> bool {
        matches!(self, Kind::RandWrite | Kind::SeqWrite)
    }
}

/// What a workload is judged by.
#[derive(Clone, Copy, Debug)]
pub enum Goal {
    /// twinsum/qsd IOPS at least this.
    Ratio(f64),
    /// twinsum's p99 latency no worse than qsd's.
    P99,
}

#[derive(Clone, Copy, Debug)]
pub struct Workload {
    pub name: &'static str,
    pub kind: Kind,
    /// Request size in bytes, a multiple of `BLOCK`.
    pub size: usize,
    /// Requests in flight, summed over all queues.
    pub depth: usize,
    /// Queues (client threads) the run uses.
    pub queues: usize,
    /// Every Nth request of a queue is a FLUSH instead (0: none).
    pub flush_every: u32,
    /// Record each request's latency.
    pub latency: bool,
    pub goal: Goal,
}

/// Result of one run.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub ops: u64,
    pub bytes: u64,
    pub flushes: u64,
    pub elapsed: Duration,
    /// Per-request latencies in nanoseconds, sorted (latency runs only).
    pub latencies: Vec<u64>,
}

impl Stats {
    /// The `p`th percentile latency (0..=100), if recorded.
    pub fn percentile(&self, p: f64) -> Option<Duration> {
        if self.latencies.is_empty() {
            return None;
        }
        let i = ((self.latencies.len() - 1) as f64 * p / 100.0).round() as usize;
        Some(Duration::from_nanos(self.latencies[i]))
    }
}

impl Stats {
    pub fn iops(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }

    pub fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64() / 1e6
    }
}

/// One bit per block: has the write workload written it? Shared by the
/// writer threads, read by the read-back check.
pub struct Bitmap(Vec<AtomicU64>);

impl Bitmap {
    pub fn new(bits: u64) -> Self {
        Self((0..bits.div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
    }

    fn set(&self, bit: u64) {
        self.0[(bit / 64) as usize].fetch_or(1 << (bit % 64), Ordering::Relaxed);
    }

    pub fn get(&self, bit: u64) -> bool {
        self.0[(bit / 64) as usize].load(Ordering::Relaxed) & (1 << (bit % 64)) != 0
    }

    pub fn count(&self) -> u64 {
        self.0
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }
}

/// Largest request any workload issues; every slot buffer is this big.
pub const MAX_REQ: usize = 128 << 10;
/// Most requests one queue keeps in flight.
pub const MAX_SLOTS_PER_QUEUE: usize = 32;

/// A connection to one server: the libblkio instance, its queues and the
/// shared-memory buffers the server reads and writes.
pub struct Client {
    // Field order is drop order: queues before the instance that owns the
    // memory regions and the connection.
    queues: Vec<Blkioq>,
    _region: MemoryRegion,
    _blkio: Blkio,
    base: usize,
    pub capacity: u64,
    /// Which blocks the write workloads wrote: shared by every connection
    /// to one server, for the read-back at the end.
    pub written: Arc<Bitmap>,
    seed: u64,
    /// The image is sparse: unwritten blocks read as zeros.
    sparse: bool,
}

impl Client {
    /// Connect to `socket` with `nqueues` queues. Retries briefly: the
    /// socket file appears at bind(2), a moment before listen(2).
    pub fn connect(
        socket: &Path,
        nqueues: usize,
        seed: u64,
        written: Option<Arc<Bitmap>>,
        sparse: bool,
    ) -> Result<Self> {
        let path = socket.to_str().context("socket path is not UTF-8")?;
        let start = Instant::now();
        let mut blkio = loop {
            let mut b = Blkio::new("virtio-blk-vhost-user").map_err(blk_err)?;
            b.set_str("path", path).map_err(blk_err)?;
            match b.connect() {
                Ok(()) => break b,
                Err(_) if start.elapsed() < Duration::from_secs(5) => {
                    thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(blk_err(e)).context("connect"),
            }
        };
        blkio
            .set_i32("num-queues", nqueues as i32)
            .map_err(blk_err)?;
        let out = blkio.start().map_err(blk_err).context("start")?;
        // The driver learns the size from the device config; read it only
        // once the device is started.
        let capacity = blkio.get_u64("capacity").map_err(blk_err)?;
        if capacity < (MAX_REQ * 4) as u64 {
            bail!("device capacity {capacity} is too small");
        }
        // libblkio can only hand the server memory it allocated itself
        // (a memfd the server maps); plain Vec buffers would be rejected.
        let align = blkio.get_u64("mem-region-alignment").map_err(blk_err)? as usize;
        let len = (nqueues * MAX_SLOTS_PER_QUEUE * MAX_REQ).next_multiple_of(align.max(1));
        let region = blkio.alloc_mem_region(len).map_err(blk_err)?;
        blkio.map_mem_region(&region).map_err(blk_err)?;
        Ok(Client {
            queues: out.queues,
            _region: region,
            _blkio: blkio,
            base: region.addr,
            written: written.unwrap_or_else(|| Arc::new(Bitmap::new(capacity / BLOCK as u64))),
            capacity,
            seed,
            sparse,
        })
    }

    pub fn blocks(&self) -> u64 {
        self.capacity / BLOCK as u64
    }

    /// Queues of this connection.
    pub fn queues(&self) -> usize {
        self.queues.len()
    }

    /// Run `w` for `dur` on all queues at once and return the totals.
    pub fn run(&mut self, w: &Workload, dur: Duration) -> Result<Stats> {
        let nq = self.queues.len();
        let per_queue = (w.depth / nq).clamp(1, MAX_SLOTS_PER_QUEUE);
        let blocks = self.blocks();
        let (base, seed, written, sparse) = (self.base, self.seed, &*self.written, self.sparse);
        let start = Instant::now();
        let deadline = start + dur;
        let results: Vec<Result<Stats>> = thread::scope(|s| {
            let handles: Vec<_> = self
                .queues
                .iter_mut()
                .enumerate()
                .map(|(i, q)| {
                    let job = QueueJob {
                        w: *w,
                        queue_index: i,
                        nqueues: nq,
                        slots: per_queue,
                        buf_base: base + i * MAX_SLOTS_PER_QUEUE * MAX_REQ,
                        blocks,
                        seed,
                        written,
                        sparse,
                        deadline,
                    };
                    s.spawn(move || job.run(q))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(anyhow!("worker panicked"))))
                .collect()
        });
        let mut total = Stats {
            elapsed: start.elapsed(),
            ..Stats::default()
        };
        for r in results {
            let r = r?;
            total.ops += r.ops;
            total.bytes += r.bytes;
            total.flushes += r.flushes;
            total.latencies.extend(r.latencies);
        }
        total.latencies.sort_unstable();
        Ok(total)
    }

    /// Issue a FLUSH and wait for it, so the read-back sees what a guest
    /// would see after a flush.
    pub fn flush(&mut self) -> Result<()> {
        let q = &mut self.queues[0];
        q.flush(0, ReqFlags::empty());
        let mut c = completion_buf(1);
        let n = q.do_io(&mut c, 1, None, None).map_err(blk_err)?;
        if n != 1 {
            bail!("flush: expected one completion, got {n}");
        }
        // SAFETY: do_io initialised the first `n` (= 1) completions.
        let c = unsafe { c[0].assume_init_read() };
        if c.ret != 0 {
            bail!("flush failed: {}", completion_error(&c));
        }
        Ok(())
    }

    /// Read `samples` random blocks and compare each with its expected full
    /// content: the base image, or the written pattern for blocks the write
    /// workload wrote. This catches lost and torn writes, which the header
    /// checks during the timed runs cannot.
    pub fn verify_sample(&mut self, samples: u64, seed: u64) -> Result<()> {
        let q = &mut self.queues[0];
        let blocks = self.capacity / BLOCK as u64;
        let mut rng = SplitMix::new(seed);
        let mut free: Vec<usize> = (0..MAX_SLOTS_PER_QUEUE).collect();
        let mut offsets = vec![0u64; MAX_SLOTS_PER_QUEUE];
        let mut expect = vec![0u8; BLOCK];
        let mut completions = completion_buf(MAX_SLOTS_PER_QUEUE);
        let (mut issued, mut done) = (0u64, 0u64);
        while done < samples {
            while issued < samples {
                let Some(slot) = free.pop() else { break };
                offsets[slot] = rng.below(blocks) * BLOCK as u64;
                q.read(
                    offsets[slot],
                    slot_ptr(self.base, slot),
                    BLOCK,
                    slot,
                    ReqFlags::empty(),
                );
                issued += 1;
            }
            let n = q.do_io(&mut completions, 1, None, None).map_err(blk_err)?;
            for c in &completions[..n] {
                // SAFETY: do_io initialised the first `n` completions.
                let c = unsafe { c.assume_init_read() };
                if c.ret != 0 {
                    bail!("read-back failed: {}", completion_error(&c));
                }
                let (slot, off) = (c.user_data, offsets[c.user_data]);
                let b = off / BLOCK as u64;
                let written = self.written.get(b);
                if self.sparse && !written {
                    expect.fill(0);
                } else {
                    image::expected_block(self.seed, b, written, &mut expect);
                }
                // SAFETY: the request on this slot has completed, so the
                // device no longer writes its buffer.
                let got = unsafe { slot_slice(self.base, slot, BLOCK) };
                if got != expect.as_slice() {
                    let what = if written {
                        "the written pattern"
                    } else {
                        "the base image"
                    };
                    let why = image::check_headers(got, off)
                        .err()
                        .unwrap_or_else(|| "header right, body differs".into());
                    bail!("read-back of block {b} does not match {what}: {why}");
                }
                free.push(slot);
                done += 1;
            }
        }
        Ok(())
    }
}

/// Address of the buffer of `slot` in a queue's buffer area.
fn slot_ptr(base: usize, slot: usize) -> *mut u8 {
    (base + slot * MAX_REQ) as *mut u8
}

/// # Safety
/// `base` is a queue's buffer area inside the mapped region, `slot` is
/// below `MAX_SLOTS_PER_QUEUE`, `len` at most `MAX_REQ`, and no request is
/// in flight on the slot (the device would be writing it).
unsafe fn slot_slice<'a>(base: usize, slot: usize, len: usize) -> &'a mut [u8] {
    // SAFETY: guaranteed by the caller, see above.
    unsafe { std::slice::from_raw_parts_mut(slot_ptr(base, slot), len) }
}

/// Everything one queue's thread needs for one run.
struct QueueJob<'a> {
    w: Workload,
    queue_index: usize,
    nqueues: usize,
    slots: usize,
    buf_base: usize,
    blocks: u64,
    seed: u64,
    written: &'a Bitmap,
    sparse: bool,
    deadline: Instant,
}

impl QueueJob<'_> {
    fn run(self, q: &mut Blkioq) -> Result<Stats> {
        let w = self.w;
        let mut gen = OffsetGen::new(&self);
        if w.kind.writes() {
            for slot in 0..self.slots {
                // SAFETY: nothing is in flight yet.
                let buf = unsafe { slot_slice(self.buf_base, slot, w.size) };
                for blk in buf.chunks_mut(BLOCK) {
                    image::written_body(self.seed, blk);
                }
            }
        }

        let mut issued = 0u64;
        let mut offsets = vec![None; self.slots];
        let mut started = vec![Instant::now(); self.slots];
        for slot in 0..self.slots {
            offsets[slot] = self.submit(q, slot, &mut gen, &mut issued);
            started[slot] = Instant::now();
        }
        let mut inflight = self.slots;
        let mut stats = Stats::default();
        let mut completions = completion_buf(self.slots);
        let mut stopping = false;
        while inflight > 0 {
            let n = q.do_io(&mut completions, 1, None, None).map_err(blk_err)?;
            let now = Instant::now();
            stopping = stopping || now >= self.deadline;
            for c in &completions[..n] {
                // SAFETY: do_io initialised the first `n` completions.
                let c = unsafe { c.assume_init_read() };
                let slot = c.user_data;
                if c.ret != 0 {
                    bail!(
                        "{} at offset {:?} failed: {}",
                        w.name,
                        offsets[slot],
                        completion_error(&c)
                    );
                }
                if w.latency {
                    stats
                        .latencies
                        .push((now - started[slot]).as_nanos() as u64);
                }
                match offsets[slot] {
                    None => stats.flushes += 1,
                    Some(off) => {
                        if !w.kind.writes() {
                            // SAFETY: the request on this slot has completed.
                            let got = unsafe { slot_slice(self.buf_base, slot, w.size) };
                            self.check_read(got, off)
                                .map_err(|e| anyhow!("{}: wrong data: {e}", w.name))?;
                        }
                        // Requests still in flight at the deadline are
                        // counted: the elapsed time includes waiting for them.
                        stats.ops += 1;
                        stats.bytes += w.size as u64;
                    }
                }
                if stopping {
                    inflight -= 1;
                } else {
                    offsets[slot] = self.submit(q, slot, &mut gen, &mut issued);
                    started[slot] = Instant::now();
                }
            }
        }
        Ok(stats)
    }

    /// Every block read carries its own header, or is zeros where a sparse
    /// image was never written.
    fn check_read(&self, got: &[u8], off: u64) -> std::result::Result<(), String> {
        if !self.sparse {
            return image::check_headers(got, off);
        }
        for (i, blk) in got.chunks(BLOCK).enumerate() {
            let b = off / BLOCK as u64 + i as u64;
            if self.written.get(b) {
                image::check_headers(blk, b * BLOCK as u64)?;
            } else if blk.iter().any(|&x| x != 0) {
                return Err(format!("block {b} was never written but is not zeros"));
            }
        }
        Ok(())
    }

    /// Queue the next request on `slot`: a FLUSH in place of every
    /// `flush_every`th, else the next I/O. Returns its byte offset (None
    /// for a flush).
    fn submit(
        &self,
        q: &mut Blkioq,
        slot: usize,
        gen: &mut OffsetGen,
        issued: &mut u64,
    ) -> Option<u64> {
        let w = &self.w;
        *issued += 1;
        if w.flush_every > 0 && (*issued).is_multiple_of(u64::from(w.flush_every)) {
            q.flush(slot, ReqFlags::empty());
            return None;
        }
        let block = gen.next();
        let off = block * BLOCK as u64;
        let buf = slot_ptr(self.buf_base, slot);
        match w.kind {
            Kind::RandWrite | Kind::SeqWrite => {
                // SAFETY: this slot has no request in flight.
                let data = unsafe { slot_slice(self.buf_base, slot, w.size) };
                for (i, blk) in data.chunks_mut(BLOCK).enumerate() {
                    image::stamp_written(blk, block + i as u64);
                    // Mark before submitting: once a write is issued the
                    // block may hold either content until it completes,
                    // and every write completes before any read-back.
                    self.written.set(block + i as u64);
                }
                q.write(off, buf, w.size, slot, ReqFlags::empty());
            }
            Kind::RandRead | Kind::SeqRead => q.read(off, buf, w.size, slot, ReqFlags::empty()),
        }
        Some(off)
    }
}

/// The block numbers one queue visits.
struct OffsetGen {
    kind: Kind,
    rng: SplitMix,
    /// Request size in blocks; offsets are aligned to it.
    step: u64,
    /// Number of request-sized units on the disk.
    units: u64,
    /// Sequential runs: each queue streams through its own share of the
    /// disk (like one fio job per queue at its own offset), wrapping.
    seq_start: u64,
    seq_len: u64,
    seq_next: u64,
}

impl OffsetGen {
    fn new(job: &QueueJob<'_>) -> Self {
        let step = (job.w.size / BLOCK) as u64;
        let seq_len = job.blocks / job.nqueues as u64 / step * step;
        OffsetGen {
            kind: job.w.kind,
            // Each queue its own seeded stream: reproducible offsets, and
            // the queues do not all hit the same blocks.
            rng: SplitMix::new(
                job.seed ^ (job.queue_index as u64 + 1).wrapping_mul(0x2545_f491_4f6c_dd1d),
            ),
            step,
            units: job.blocks / step,
            seq_start: seq_len * job.queue_index as u64,
            seq_len,
            seq_next: 0,
        }
    }

    fn next(&mut self) -> u64 {
        match self.kind {
            Kind::RandRead | Kind::RandWrite => self.rng.below(self.units) * self.step,
            Kind::SeqRead | Kind::SeqWrite => {
                let b = self.seq_start + self.seq_next;
                self.seq_next = (self.seq_next + self.step) % self.seq_len;
                b
            }
        }
    }
}

fn completion_buf(n: usize) -> Vec<MaybeUninit<Completion>> {
    (0..n).map(|_| MaybeUninit::uninit()).collect()
}

fn completion_error(c: &Completion) -> String {
    let errno = std::io::Error::from_raw_os_error(-c.ret);
    if c.error_msg.is_null() {
        errno.to_string()
    } else {
        // SAFETY: libblkio sets error_msg to a static NUL-terminated string
        // or leaves it null.
        let msg = unsafe { CStr::from_ptr(c.error_msg) };
        format!("{errno}: {}", msg.to_string_lossy())
    }
}

fn blk_err(e: blkio::Error) -> anyhow::Error {
    anyhow!("libblkio: {} ({})", e.message(), e.errno())
}
