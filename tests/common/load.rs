//! A crash-test load: queues that keep several writes, write-zeroes, reads
//! and flushes in flight over a small hot set of blocks, and a model of
//! what each block may hold after the backend dies.
//!
//! Every written block carries its identity in the header of each 512-byte
//! sector (magic, seed, block number, write id, sector index) and a payload
//! derived from them, so a block read back names the write it holds, and a
//! misplaced, torn or garbage block shows.
//!
//! The model (per block): `durable` is the content of the last write that a
//! completed FLUSH covered (a write covers only if it completed before the
//! flush was submitted); `since` lists every write issued after it, in
//! order. After a crash the block may hold `durable` or any of `since`.
//! Two writes to one block are never in flight at once, so the order of
//! writes to a block is well defined.

use std::collections::BTreeMap;
use std::fmt;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use blkio::ReqFlags;

use super::client::Queue;
use super::run::DEADLINE;

/// SplitMix64: small, seedable, and the same everywhere, so a printed seed
/// replays the same workload.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }

    /// True with probability `pct` percent.
    pub fn pct(&mut self, pct: u64) -> bool {
        self.next_u64() % 100 < pct
    }

    /// An independent generator for a sub-task.
    pub fn fork(&mut self) -> Self {
        Self(self.next_u64())
    }
}

/// The SplitMix64 finaliser.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The seed from `var` (decimal or 0x-hex), else a fresh one from the clock.
pub fn seed_from_env(var: &str) -> u64 {
    match std::env::var(var) {
        Ok(v) => {
            let v = v.trim();
            let parsed = match v.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => v.parse(),
            };
            parsed.unwrap_or_else(|e| panic!("{var}={v:?}: {e}"))
        }
        Err(_) => {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock after 1970");
            mix(t.as_nanos() as u64 ^ u64::from(std::process::id()))
        }
    }
}

/// What a block holds, as far as the test can tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Content {
    /// All zeros: never written, or write-zeroes.
    Zero,
    /// Exactly the content of this write.
    Write(u64),
}

impl fmt::Display for Content {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Content::Zero => write!(f, "zeros"),
            Content::Write(id) => write!(f, "write #{id}"),
        }
    }
}

const MAGIC: u64 = u64::from_le_bytes(*b"TWKILL9\0");
const SECTOR: usize = 512;
const HEADER: usize = 40;

fn put(buf: &mut [u8], at: usize, v: u64) {
    buf[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn get(buf: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(buf[at..at + 8].try_into().expect("8 bytes"))
}

/// Fill `buf` (one block) with the content of write `id` to `block`.
pub fn fill_block(buf: &mut [u8], seed: u64, block: u64, id: u64) {
    for (i, sector) in buf.chunks_mut(SECTOR).enumerate() {
        put(sector, 0, MAGIC);
        put(sector, 8, seed);
        put(sector, 16, block);
        put(sector, 24, id);
        put(sector, 32, i as u64);
        let mut r = Rng::new(mix(seed
            ^ block.rotate_left(17)
            ^ id.rotate_left(40)
            ^ i as u64));
        for word in sector[HEADER..].chunks_mut(8) {
            let v = r.next_u64().to_le_bytes();
            word.copy_from_slice(&v[..word.len()]);
        }
    }
}

/// What `buf` (one block read from `block`) holds: `Ok(content)`, or
/// `Err(description)` for anything that is neither zeros nor exactly one
/// write of this test to this block (torn, misplaced, garbage).
pub fn parse_block(buf: &[u8], seed: u64, block: u64) -> Result<Content, String> {
    if buf.iter().all(|&b| b == 0) {
        return Ok(Content::Zero);
    }
    let id = get(buf, 24);
    if get(buf, 0) == MAGIC && get(buf, 8) == seed && get(buf, 16) == block {
        let mut want = vec![0u8; buf.len()];
        fill_block(&mut want, seed, block, id);
        if want == buf {
            return Ok(Content::Write(id));
        }
    }
    // Describe each sector so a torn or misplaced write is easy to read.
    let sectors: Vec<String> = buf
        .chunks(SECTOR)
        .map(|s| {
            if s.iter().all(|&b| b == 0) {
                "zeros".to_owned()
            } else if get(s, 0) == MAGIC {
                format!(
                    "block {} write #{} sector {}{}",
                    get(s, 16),
                    get(s, 24),
                    get(s, 32),
                    if get(s, 8) == seed {
                        ""
                    } else {
                        " (other seed)"
                    }
                )
            } else {
                "garbage".to_owned()
            }
        })
        .collect();
    Err(format!(
        "not one whole write: sectors [{}]",
        sectors.join("; ")
    ))
}

#[derive(Clone, Debug)]
struct Issued {
    content: Content,
    /// Issued while the backend was known to be in synchronous mode: once
    /// completed, it is durable (DESIGN §4).
    synchronous: bool,
    /// Completion stamp, once the completion was seen.
    done: Option<u64>,
}

#[derive(Clone, Debug)]
struct BlockState {
    durable: Content,
    since: Vec<Issued>,
    busy: bool,
}

/// Counters for the summary line.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    pub writes_issued: u64,
    pub writes_done: u64,
    pub zeroes_done: u64,
    pub reads_done: u64,
    pub flushes_done: u64,
    /// Blocks written again while an earlier write to them was unflushed.
    pub rewrites_unflushed: u64,
    /// Writes (and write-zeroes) completed in known synchronous mode.
    pub synchronous_done: u64,
}

/// The model of the hot set; blocks outside it must always read as zeros.
pub struct Model {
    pub seed: u64,
    pub block_size: u64,
    /// Hot blocks, in ranges of contiguous blocks (start, len).
    pub clusters: Vec<(u64, u64)>,
    blocks: BTreeMap<u64, BlockState>,
    stamp: u64,
    next_id: u64,
    /// The backend is in synchronous mode: writes issued now are durable
    /// once completed.
    synchronous: bool,
    pub stats: Stats,
}

/// What a block read after a crash showed, judged by the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The last content a flush made durable, and nothing newer was issued.
    Durable,
    /// The last completed write (newer than the durable one).
    LatestCompleted,
    /// A write that was still in flight when the backend died.
    InFlight,
    /// Allowed by the flush contract, but older than a write that had
    /// completed: a completed unflushed write was lost. Legal for a
    /// volatile write cache; after kill -9 of a backend that writes through
    /// the host page cache it is not expected.
    OlderThanCompleted,
}

impl Model {
    pub fn new(seed: u64, block_size: u64, clusters: Vec<(u64, u64)>) -> Self {
        let mut blocks = BTreeMap::new();
        for &(start, len) in &clusters {
            for b in start..start + len {
                blocks.insert(
                    b,
                    BlockState {
                        durable: Content::Zero,
                        since: Vec::new(),
                        busy: false,
                    },
                );
            }
        }
        Self {
            seed,
            block_size,
            clusters,
            blocks,
            stamp: 0,
            // Start ids away from 0 so an id never looks like zeros.
            next_id: 1,
            synchronous: false,
            stats: Stats::default(),
        }
    }

    /// From now on (until `set_synchronous(false)`), writes are issued to a
    /// backend known to be in synchronous mode.
    pub fn set_synchronous(&mut self, on: bool) {
        self.synchronous = on;
    }

    fn range_free(&self, start: u64, len: u64) -> bool {
        (start..start + len).all(|b| !self.blocks[&b].busy)
    }

    /// Claim `start..start+len` for a write of `content` (None: a fresh
    /// write id). Returns the content, or None if a block is busy.
    fn begin_write(&mut self, start: u64, len: u64, zero: bool) -> Option<Content> {
        if !self.range_free(start, len) {
            return None;
        }
        let content = if zero {
            Content::Zero
        } else {
            self.next_id += 1;
            Content::Write(self.next_id)
        };
        for b in start..start + len {
            let st = self.blocks.get_mut(&b).expect("hot block");
            st.busy = true;
            if !st.since.is_empty() {
                self.stats.rewrites_unflushed += 1;
            }
            st.since.push(Issued {
                content,
                synchronous: self.synchronous,
                done: None,
            });
        }
        self.stats.writes_issued += 1;
        Some(content)
    }

    fn end_write(&mut self, start: u64, len: u64, zero: bool) {
        self.stamp += 1;
        let mut synchronous = false;
        for b in start..start + len {
            let st = self.blocks.get_mut(&b).expect("hot block");
            st.busy = false;
            let w = st.since.last_mut().expect("issued write");
            w.done = Some(self.stamp);
            synchronous = w.synchronous;
        }
        self.stats.synchronous_done += u64::from(synchronous);
        if zero {
            self.stats.zeroes_done += 1;
        } else {
            self.stats.writes_done += 1;
        }
    }

    /// Claim a range for a read; the expected content of each block.
    fn begin_read(&mut self, start: u64, len: u64) -> Option<Vec<Content>> {
        if !self.range_free(start, len) {
            return None;
        }
        let mut want = Vec::new();
        for b in start..start + len {
            let st = self.blocks.get_mut(&b).expect("hot block");
            st.busy = true;
            want.push(st.since.last().map_or(st.durable, |w| w.content));
        }
        Some(want)
    }

    fn end_read(&mut self, start: u64, len: u64) {
        for b in start..start + len {
            self.blocks.get_mut(&b).expect("hot block").busy = false;
        }
        self.stats.reads_done += 1;
    }

    /// A flush is about to be submitted: every write whose completion was
    /// seen so far is covered by it.
    fn begin_flush(&self) -> u64 {
        self.stamp
    }

    fn end_flush(&mut self, covers: u64) {
        for st in self.blocks.values_mut() {
            if let Some(i) = st
                .since
                .iter()
                .rposition(|w| w.done.is_some_and(|s| s <= covers))
            {
                st.durable = st.since[i].content;
                st.since.drain(..=i);
            }
        }
        self.stats.flushes_done += 1;
    }

    /// Judge what `block` holds after a crash; Err if the flush contract
    /// does not allow it.
    pub fn judge(&self, block: u64, got: Content) -> Result<Verdict, String> {
        let Some(st) = self.blocks.get(&block) else {
            return if got == Content::Zero {
                Ok(Verdict::Durable)
            } else {
                Err(format!(
                    "block {block} is outside the hot set but holds {got}"
                ))
            };
        };
        // Positions: -1 is the durable content, i is since[i].
        let latest_done = st
            .since
            .iter()
            .rposition(|w| w.done.is_some())
            .map_or(-1, |i| i as i64);
        // The newest match decides (ids are unique, zeros may repeat, and
        // equal contents cannot be told apart anyway).
        let found = match st.since.iter().rposition(|w| w.content == got) {
            Some(i) => i as i64,
            None if got == st.durable => -1,
            None => {
                let mut allowed = vec![format!("{} (flushed)", st.durable)];
                allowed.extend(st.since.iter().map(|w| {
                    let state = if w.done.is_some() {
                        "completed"
                    } else {
                        "in flight"
                    };
                    format!("{} ({state})", w.content)
                }));
                return Err(format!(
                    "block {block} holds {got}; allowed: {}",
                    allowed.join(", ")
                ));
            }
        };
        // A completed write issued in synchronous mode is durable: the
        // block may not hold anything older.
        let first = usize::try_from(found + 1).expect("found >= -1");
        if let Some(w) = st.since[first..]
            .iter()
            .find(|w| w.synchronous && w.done.is_some())
        {
            return Err(format!(
                "block {block} holds {got}, older than {} which completed in synchronous mode",
                w.content
            ));
        }
        Ok(match found.cmp(&latest_done) {
            std::cmp::Ordering::Less => Verdict::OlderThanCompleted,
            std::cmp::Ordering::Equal if found == -1 => Verdict::Durable,
            std::cmp::Ordering::Equal => Verdict::LatestCompleted,
            std::cmp::Ordering::Greater => Verdict::InFlight,
        })
    }

    /// [`Self::judge`] after the death of the backend process (not of the
    /// host): a completed write may not be lost, flushed or not.
    pub fn judge_process_death(&self, block: u64, got: Content) -> Result<Verdict, String> {
        match self.judge(block, got)? {
            Verdict::OlderThanCompleted => {
                let st = &self.blocks[&block];
                let newest = st
                    .since
                    .iter()
                    .rev()
                    .find(|w| w.done.is_some())
                    .map_or("?".to_string(), |w| w.content.to_string());
                Err(format!(
                    "block {block} holds {got}: the completed write {newest} was lost with the process"
                ))
            }
            v => Ok(v),
        }
    }

    /// After a verified restart: the block holds `got` for certain.
    pub fn settle(&mut self, block: u64, got: Content) {
        if let Some(st) = self.blocks.get_mut(&block) {
            st.durable = got;
            st.since.clear();
            st.busy = false;
        }
    }

    /// Hot blocks with writes newer than the last flush.
    pub fn unflushed_blocks(&self) -> usize {
        self.blocks.values().filter(|s| !s.since.is_empty()).count()
    }
}

/// Shared between the queue workers and whoever kills the backend.
#[derive(Default)]
pub struct Ctl {
    /// Completed requests of any kind.
    pub ops: AtomicU64,
    /// Completed writes (not write-zeroes).
    pub writes: AtomicU64,
    /// Set after the backend was killed: stop quietly.
    pub stop: AtomicBool,
    /// Set just before the backend is killed: from then on a failed
    /// request may be the kill's doing and ends the worker quietly.
    pub killing: AtomicBool,
    /// Set when a worker ended (done or failed).
    pub ended: AtomicU64,
}

/// Shape of the load.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    /// Requests in flight per queue.
    pub depth: usize,
    /// Largest write or read, in blocks.
    pub max_blocks: u64,
    /// A queue flushes after 1..=flush_every writes; 0: never.
    pub flush_every: u64,
    /// Percent of writes that are write-zeroes.
    pub zero_pct: u64,
    /// Percent of requests that are reads.
    pub read_pct: u64,
}

#[derive(Clone, Copy, Debug)]
enum Slot {
    Free,
    Write { start: u64, len: u64, zero: bool },
    Read { start: u64, len: u64 },
    Flush { covers: u64 },
}

/// Sets `Ctl::stop` when dropped: a panicking controller must not leave
/// the workers running (a scope would wait for them forever).
pub struct StopGuard<'a>(pub &'a Ctl);

impl Drop for StopGuard<'_> {
    fn drop(&mut self) {
        self.0.stop.store(true, Ordering::SeqCst);
    }
}

/// Bumps `Ctl::ended` when dropped: a worker (or the thread that runs
/// them) returned or panicked, so nobody waits for its progress.
pub struct EndGuard<'a>(pub &'a Ctl);

impl Drop for EndGuard<'_> {
    fn drop(&mut self) {
        self.0.ended.fetch_add(1, Ordering::SeqCst);
    }
}

/// Drive one queue until `ctl.stop`. Err on any failed request or any read
/// that does not return the content the model expects.
pub fn drive(
    q: Queue<'_>,
    model: &Mutex<Model>,
    ctl: &Ctl,
    shape: Shape,
    mut rng: Rng,
) -> Result<(), String> {
    let _guard = EndGuard(ctl);
    let (bs, seed, clusters) = {
        let m = model.lock().expect("model");
        (m.block_size, m.seed, m.clusters.clone())
    };
    let slot_bytes = (shape.max_blocks * bs) as usize;
    assert!(
        slot_bytes * shape.depth <= q.buf.len(),
        "queue buffer too small"
    );
    let mut slots = vec![Slot::Free; shape.depth];
    let mut reads_want: Vec<Vec<Content>> = vec![Vec::new(); shape.depth];
    // flush_every 0: never flush.
    let next_flush = |rng: &mut Rng| match shape.flush_every {
        0 => u64::MAX,
        n => rng.range(1, n),
    };
    let mut until_flush = next_flush(&mut rng);
    let mut flushing = false;
    let mut completions: Vec<MaybeUninit<blkio::Completion>> =
        (0..shape.depth).map(|_| MaybeUninit::uninit()).collect();
    let mut last_progress = std::time::Instant::now();

    loop {
        if ctl.stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        // Fill free slots.
        for (i, slot) in slots.iter_mut().enumerate() {
            if !matches!(slot, Slot::Free) {
                continue;
            }
            let buf = &mut q.buf[i * slot_bytes..(i + 1) * slot_bytes];
            if until_flush == 0 && !flushing {
                let covers = model.lock().expect("model").begin_flush();
                q.q.flush(i, ReqFlags::empty());
                *slot = Slot::Flush { covers };
                flushing = true;
                until_flush = next_flush(&mut rng);
                continue;
            }
            let (cstart, clen) = clusters[rng.next_u64() as usize % clusters.len()];
            let len = rng.range(1, shape.max_blocks.min(clen));
            let start = cstart + rng.range(0, clen - len);
            let off = start * bs;
            let bytes = (len * bs) as usize;
            if rng.pct(shape.read_pct) {
                let Some(want) = model.lock().expect("model").begin_read(start, len) else {
                    continue;
                };
                reads_want[i] = want;
                buf[..bytes].fill(0xee);
                q.q.read(off, buf.as_mut_ptr(), bytes, i, ReqFlags::empty());
                *slot = Slot::Read { start, len };
                continue;
            }
            let zero = rng.pct(shape.zero_pct);
            let Some(content) = model.lock().expect("model").begin_write(start, len, zero) else {
                continue;
            };
            if zero {
                q.q.write_zeroes(off, len * bs, i, ReqFlags::empty());
            } else {
                let Content::Write(id) = content else {
                    unreachable!()
                };
                for (k, blk) in buf[..bytes].chunks_mut(bs as usize).enumerate() {
                    fill_block(blk, seed, start + k as u64, id);
                }
                q.q.write(off, buf.as_ptr(), bytes, i, ReqFlags::empty());
            }
            *slot = Slot::Write { start, len, zero };
            until_flush = until_flush.saturating_sub(1);
        }

        if slots.iter().all(|s| matches!(s, Slot::Free)) {
            // Every range we picked was busy on the other queue: pick again.
            continue;
        }
        let mut timeout = Duration::from_millis(20);
        let n = match q.q.do_io(&mut completions, 1, Some(&mut timeout), None) {
            Ok(n) => n,
            Err(e) if e.errno() == blkio::Errno::TIME => {
                // Nothing completed: the backend may be dead (stop comes
                // next) or slow; give up only after the test deadline.
                if last_progress.elapsed() > DEADLINE {
                    return Err("no completion within the deadline".into());
                }
                continue;
            }
            Err(e) => {
                if ctl.killing.load(Ordering::SeqCst) {
                    return Ok(());
                }
                return Err(format!("do_io: {e}"));
            }
        };
        last_progress = std::time::Instant::now();
        for c in &completions[..n] {
            // SAFETY: do_io initialised the first `n` completions.
            let c = unsafe { c.assume_init_read() };
            let i = c.user_data;
            let slot = std::mem::replace(&mut slots[i], Slot::Free);
            if c.ret != 0 {
                if ctl.killing.load(Ordering::SeqCst) {
                    return Ok(());
                }
                return Err(format!("{slot:?} failed with errno {}", -c.ret));
            }
            let mut m = model.lock().expect("model");
            match slot {
                Slot::Free => unreachable!("completion for a free slot"),
                Slot::Write { start, len, zero } => {
                    m.end_write(start, len, zero);
                    if !zero {
                        ctl.writes.fetch_add(1, Ordering::SeqCst);
                    }
                }
                Slot::Read { start, len } => {
                    let buf = &q.buf[i * slot_bytes..];
                    for (k, want) in reads_want[i].iter().enumerate() {
                        let b = start + k as u64;
                        let got = &buf[k * bs as usize..(k + 1) * bs as usize];
                        match parse_block(got, seed, b) {
                            Ok(c) if c == *want => {}
                            Ok(c) => {
                                return Err(format!("live read of block {b}: {c}, want {want}"))
                            }
                            Err(e) => return Err(format!("live read of block {b}: {e}")),
                        }
                    }
                    m.end_read(start, len);
                }
                Slot::Flush { covers } => {
                    m.end_flush(covers);
                    flushing = false;
                }
            }
            ctl.ops.fetch_add(1, Ordering::SeqCst);
        }
    }
}
