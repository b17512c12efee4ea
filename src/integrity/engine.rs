//! The dual-checksum engine (DESIGN §2).
//!
//! Every block has a pair `(new, old)` of checksums. The one rule that makes
//! the whole thing crash safe: **the pair held in memory always covers every
//! content the data device could hold for that block**. Each transition
//! below keeps that true at every instant, so the metadata cache may write
//! any page back at any time (eviction, periodic write-back, a commit for an
//! unrelated block) without ever breaking the on-disk invariant.
//!
//! - A write to a Clean block sets `new := c(X)` (old still covers the
//!   durable content), commits the metadata (write + sync, shared by every
//!   thread committing at that moment), and only then issues the data write.
//! - A write to a Pending block first syncs the data device, which turns
//!   every Pending block whose writes completed before the sync began into
//!   Clean (`old := new`).
//! - FLUSH syncs the data device the same way; the forgotten old checksums
//!   reach the metadata device lazily.
//!
//! Locking: `state` guards the metadata cache and the Pending set. Page
//! writes happen under it, so they reach the device in the order the pairs
//! changed; device syncs happen outside it, through [`SyncGate`]s.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use log::{error, info, warn};

use super::gate::SyncGate;
use super::hash::{Checksum, Verdict, ZERO};
use crate::key::Key;
use crate::meta::{DeviceRef, MetaError, Metadata, Pair};

/// What a read does with a block that matches neither checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnMismatch {
    /// Fail the read (the default).
    #[default]
    Error,
    /// Log and count, but return the data.
    Log,
}

/// Tunables of an [`Engine`].
#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub on_mismatch: OnMismatch,
    /// Refuse writes; never mark the metadata dirty.
    pub readonly: bool,
    /// Past this many Pending blocks the engine syncs the data device itself.
    pub pending_limit: usize,
    /// Metadata cache size in 4 KiB pages.
    pub cache_pages: usize,
    /// Complete a write once it is hashed and held in the engine's own
    /// write-back stage, as a disk with a volatile write cache does; a
    /// commit thread then makes its checksum durable and writes the data,
    /// batching everything that queued meanwhile into one metadata sync.
    /// FLUSH, zeroing, synchronous mode and shutdown drain the stage first.
    /// Off: every write completes only once its data is written.
    pub write_cache: bool,
    /// The key of a disk with keyed checksums; `None` for an unkeyed disk.
    pub key: Option<Key>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            on_mismatch: OnMismatch::Error,
            readonly: false,
            pending_limit: 65536,
            cache_pages: 16384,
            write_cache: true,
            key: None,
        }
    }
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("checksum mismatch in block {block}")]
    Mismatch { block: u64 },
    #[error("blocks {block}+{count} are past the end of the disk ({blocks} blocks)")]
    OutOfRange { block: u64, count: u64, blocks: u64 },
    #[error("buffer of {len} bytes is not a whole number of {block_size}-byte blocks")]
    Unaligned { len: usize, block_size: u32 },
    #[error("the disk is read-only")]
    ReadOnly,
    #[error("data device I/O failed while {what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Meta(#[from] MetaError),
}

impl EngineError {
    fn io(what: &'static str) -> impl FnOnce(io::Error) -> Self {
        move |source| Self::Io { what, source }
    }

    fn meta_io(what: &'static str) -> impl FnOnce(io::Error) -> Self {
        move |source| Self::Meta(MetaError::Io { what, source })
    }

    /// A copy for fanning one failure out to every request that shared it.
    fn duplicate(&self) -> Self {
        match self {
            Self::Mismatch { block } => Self::Mismatch { block: *block },
            Self::OutOfRange {
                block,
                count,
                blocks,
            } => Self::OutOfRange {
                block: *block,
                count: *count,
                blocks: *blocks,
            },
            Self::Unaligned { len, block_size } => Self::Unaligned {
                len: *len,
                block_size: *block_size,
            },
            Self::ReadOnly => Self::ReadOnly,
            Self::Io { what, source } => Self::Io {
                what,
                source: io::Error::new(source.kind(), source.to_string()),
            },
            Self::Meta(e) => Self::Meta(MetaError::Io {
                what: "committing metadata",
                source: io::Error::other(e.to_string()),
            }),
        }
    }
}

/// One request of a batch. Requests in one batch have no order among them
/// (as in virtio), except that a `Flush` covers every write of the batch.
#[derive(Debug)]
pub enum Op<'a> {
    /// Read whole blocks from `block` into `buf` (a multiple of the block size).
    Read { block: u64, buf: &'a mut [u8] },
    /// Write whole blocks at `block`. `data` must be memory the backend owns
    /// (never guest memory): it is hashed and then written as is.
    Write { block: u64, data: &'a [u8] },
    /// Make `count` blocks at `block` read as zeros (DISCARD / WRITE_ZEROES).
    Zero { block: u64, count: u64 },
    /// Make every write completed before this batch (and in it) durable.
    Flush,
}

/// Counters, read with [`Engine::stats`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub reads: u64,
    pub writes: u64,
    pub mismatches: u64,
    pub data_syncs: u64,
    pub meta_syncs: u64,
    pub pending: u64,
    /// Writes completed but still in the write-back stage.
    pub queued: u64,
}

#[derive(Debug, Default)]
struct Counters {
    reads: AtomicU64,
    writes: AtomicU64,
    mismatches: AtomicU64,
    data_syncs: AtomicU64,
    meta_syncs: AtomicU64,
}

/// A block written since the last data sync.
#[derive(Debug, Clone, Copy)]
struct PendingBlock {
    /// Data writes to it issued and not yet completed.
    inflight: u32,
    /// Event number at which its last write completed.
    completed: u64,
}

struct State {
    meta: Metadata,
    pending: HashMap<u64, PendingBlock>,
    /// Counts write starts and completions, to tell which completed before
    /// a data sync began.
    events: u64,
    /// The on-disk superblock says "dirty" already.
    marked_dirty: bool,
    /// Zeroings issued and not completed. Their already-zero blocks do not
    /// enter the Pending set (nothing changes for them on a crash), but a
    /// write to such a block must not overtake the hole punch.
    zeroing: Vec<(u64, u64)>,
    /// The write-back stage: writes completed to the caller, in order,
    /// waiting for the commit thread.
    queue: Vec<Arc<Queued>>,
    /// Newest queued write per block, for reads.
    overlay: HashMap<u64, Arc<Queued>>,
    queued_bytes: usize,
    /// Sequence number of the last write queued, and of the last one whose
    /// data write has been issued and finished.
    enqueued: u64,
    committed: u64,
    /// A queued write that failed after its completion was reported; the
    /// next FLUSH returns it.
    deferred: Option<(io::ErrorKind, String)>,
    stopping: bool,
}

/// A write held in the write-back stage.
struct Queued {
    seq: u64,
    block: u64,
    count: u64,
    data: Box<[u8]>,
    sums: Vec<u64>,
}

/// The write-back stage holds at most this many bytes; writers wait beyond.
const QUEUE_BYTES: usize = 64 << 20;

/// The dual-checksum engine over one data and one metadata device.
pub struct Engine {
    core: Arc<Core>,
    committer: Option<JoinHandle<()>>,
}

/// Everything the engine and its commit thread share.
struct Core {
    data: DeviceRef,
    meta_dev: DeviceRef,
    block_size: u32,
    blocks: u64,
    sum: Checksum,
    opts: EngineOptions,
    was_clean: bool,
    state: Mutex<State>,
    /// Signalled whenever a block's in-flight count drops to zero, and
    /// whenever the commit thread finished a batch.
    completed: Condvar,
    /// Wakes the commit thread.
    work: Condvar,
    /// The write-back stage is in use (write_cache and not read-only).
    write_back: bool,
    data_gate: SyncGate,
    meta_gate: SyncGate,
    sync_mode: AtomicBool,
    /// Bumped on every pair change, so a read that raced a write or a flush
    /// can tell and look again instead of reporting a false mismatch.
    pair_changes: AtomicU64,
    counters: Counters,
}

/// Reads retry at most this often while pairs keep changing under them.
const READ_RETRIES: usize = 16;
/// A DISCARD of a huge range is committed in chunks of this many blocks, so
/// the Pending set and the dirty pages stay bounded.
const ZERO_CHUNK: u64 = 1 << 16;

/// One block-range update of a write batch.
struct Update<'a> {
    /// Index of the op in the caller's batch.
    op: usize,
    block: u64,
    count: u64,
    /// `None` for a range that becomes zeros.
    data: Option<&'a [u8]>,
    /// Checksum per block (ZERO for zeroed blocks).
    sums: Vec<u64>,
}

impl Engine {
    /// Open formatted metadata for `data`; refuses metadata of another image.
    /// An unclean superblock is logged; no repair is needed.
    pub fn open(
        data: DeviceRef,
        meta: DeviceRef,
        opts: EngineOptions,
    ) -> Result<Self, EngineError> {
        let core = Arc::new(Core::open(data, meta, opts)?);
        let committer = if core.write_back {
            let c = core.clone();
            let handle = std::thread::Builder::new()
                .name("twinsum-commit".into())
                .spawn(move || c.run_committer())
                .map_err(EngineError::io("starting the commit thread"))?;
            Some(handle)
        } else {
            None
        };
        Ok(Self { core, committer })
    }

    pub fn block_size(&self) -> u32 {
        self.core.block_size
    }

    pub fn blocks(&self) -> u64 {
        self.core.blocks
    }

    /// The metadata was clean when opened (orderly shutdown before).
    pub fn was_clean(&self) -> bool {
        self.core.was_clean
    }

    pub fn readonly(&self) -> bool {
        self.core.opts.readonly
    }

    /// Run a batch; one result per op, in order.
    ///
    /// Reads run first, then every write and zeroing of the batch in order,
    /// then the flushes under one data sync.
    pub fn submit(&self, ops: &mut [Op<'_>]) -> Vec<Result<(), EngineError>> {
        self.core.submit(ops)
    }

    pub fn read(&self, block: u64, buf: &mut [u8]) -> Result<(), EngineError> {
        single(self.submit(&mut [Op::Read { block, buf }]))
    }

    pub fn write(&self, block: u64, data: &[u8]) -> Result<(), EngineError> {
        single(self.submit(&mut [Op::Write { block, data }]))
    }

    pub fn zero(&self, block: u64, count: u64) -> Result<(), EngineError> {
        single(self.submit(&mut [Op::Zero { block, count }]))
    }

    pub fn flush(&self) -> Result<(), EngineError> {
        single(self.submit(&mut [Op::Flush]))
    }

    /// Wait until every write completed so far has left the write-back
    /// stage (its checksum durable, its data written; not synced).
    pub fn drain(&self) {
        self.core.drain();
    }

    /// Periodic write-back: write dirty metadata pages and sync the metadata.
    pub fn writeback(&self) -> Result<(), EngineError> {
        self.core.writeback()
    }

    /// Guest shutdown: write everything out, then complete each later write
    /// only once its metadata is durable (DESIGN §4). Idempotent.
    pub fn enter_sync_mode(&self) -> Result<(), EngineError> {
        self.core.enter_sync_mode()
    }

    /// The guest's driver started the device again.
    pub fn leave_sync_mode(&self) -> Result<(), EngineError> {
        self.core.leave_sync_mode()
    }

    pub fn sync_mode(&self) -> bool {
        self.core.sync_mode()
    }

    /// Orderly stop: drain, sync data, forget old checksums, write back,
    /// mark the superblock clean. The engine stays usable; the next write
    /// marks it dirty again.
    pub fn make_clean(&self) -> Result<(), EngineError> {
        self.core.make_clean()
    }

    pub fn stats(&self) -> Stats {
        self.core.stats()
    }

    #[cfg(test)]
    fn lock(&self) -> MutexGuard<'_, State> {
        self.core.lock()
    }
}

impl Drop for Engine {
    /// Stops the commit thread after its current batch. Writes still queued
    /// are lost, as a volatile cache's are at a crash: callers that want
    /// them kept call `make_clean` (or `flush`) first.
    fn drop(&mut self) {
        self.core.lock().stopping = true;
        self.core.work.notify_all();
        self.core.completed.notify_all();
        if let Some(h) = self.committer.take() {
            if h.join().is_err() {
                error!("the commit thread panicked");
            }
        }
    }
}

impl Core {
    fn open(data: DeviceRef, meta: DeviceRef, opts: EngineOptions) -> Result<Self, EngineError> {
        let metadata =
            Metadata::open_with(meta.clone(), opts.cache_pages.max(16), opts.key.as_ref())?;
        metadata.check_image(data.size())?;
        let sb = metadata.superblock().clone();
        if !sb.clean {
            warn!(
                "metadata was not shut down cleanly (generation {}); every block still verifies against one of its two checksums",
                sb.generation
            );
            if !opts.readonly {
                // Whatever the dead process left in the host's caches becomes
                // durable now, so that what we read from here on is what a
                // later power cut would leave.
                data.sync()
                    .map_err(EngineError::io("syncing the data device at open"))?;
                meta.sync()
                    .map_err(EngineError::meta_io("syncing the metadata at open"))?;
            }
        }
        Ok(Self {
            block_size: sb.block_size,
            blocks: sb.blocks,
            sum: Checksum::of(&sb, opts.key.as_ref()).map_err(MetaError::from)?,
            was_clean: sb.clean,
            state: Mutex::new(State {
                meta: metadata,
                pending: HashMap::new(),
                events: 0,
                marked_dirty: !sb.clean,
                zeroing: Vec::new(),
                queue: Vec::new(),
                overlay: HashMap::new(),
                queued_bytes: 0,
                enqueued: 0,
                committed: 0,
                deferred: None,
                stopping: false,
            }),
            completed: Condvar::new(),
            work: Condvar::new(),
            write_back: opts.write_cache && !opts.readonly,
            data_gate: SyncGate::default(),
            meta_gate: SyncGate::default(),
            sync_mode: AtomicBool::new(false),
            pair_changes: AtomicU64::new(0),
            counters: Counters::default(),
            data,
            meta_dev: meta,
            opts,
        })
    }

    /// Run a batch; one result per op, in order.
    ///
    /// Reads run first, then every write and zeroing of the batch under one
    /// metadata commit, then the flushes under one data sync.
    fn submit(&self, ops: &mut [Op<'_>]) -> Vec<Result<(), EngineError>> {
        let mut results: Vec<Result<(), EngineError>> = (0..ops.len()).map(|_| Ok(())).collect();
        let mut updates = Vec::new();
        let mut flushes = Vec::new();
        for (i, op) in ops.iter_mut().enumerate() {
            match op {
                Op::Read { block, buf } => {
                    results[i] = self.read_blocks(*block, buf);
                }
                Op::Write { block, data } => match self.check_write(*block, data.len()) {
                    Ok(count) => updates.push(Update {
                        op: i,
                        block: *block,
                        count,
                        data: Some(*data),
                        sums: Vec::new(),
                    }),
                    Err(e) => results[i] = Err(e),
                },
                Op::Zero { block, count } => match self.check_zero(*block, *count) {
                    Ok(()) => updates.extend(zero_chunks(i, *block, *count)),
                    Err(e) => results[i] = Err(e),
                },
                Op::Flush => flushes.push(i),
            }
        }
        if !updates.is_empty() {
            self.write_updates(updates, &mut results);
        }
        if !flushes.is_empty() {
            let r = self.flush_all();
            for i in flushes {
                results[i] = r.as_ref().map_err(EngineError::duplicate).copied();
            }
        }
        results
    }

    /// Periodic write-back: write dirty metadata pages and sync the metadata.
    fn writeback(&self) -> Result<(), EngineError> {
        let ticket = {
            let mut st = self.lock();
            if st.meta.dirty_pages() == 0 {
                return Ok(());
            }
            st.meta.write_dirty()?;
            self.meta_gate.ticket()
        };
        self.sync_meta(ticket)
    }

    /// Guest shutdown: write everything out, then complete each later write
    /// only once its metadata is durable (DESIGN §4). Idempotent.
    fn enter_sync_mode(&self) -> Result<(), EngineError> {
        if self.opts.readonly {
            return Ok(());
        }
        let was = self.sync_mode.swap(true, Ordering::SeqCst);
        self.settle()?;
        if !was {
            self.store_flags(|sb| sb.sync_mode = true)?;
            info!("entered synchronous metadata mode: every write now completes with its metadata durable");
        }
        Ok(())
    }

    /// The guest's driver started the device again.
    fn leave_sync_mode(&self) -> Result<(), EngineError> {
        if self.sync_mode.swap(false, Ordering::SeqCst) {
            self.store_flags(|sb| sb.sync_mode = false)?;
            info!("left synchronous metadata mode: metadata is written back every interval again");
        }
        Ok(())
    }

    fn sync_mode(&self) -> bool {
        self.sync_mode.load(Ordering::SeqCst)
    }

    /// Orderly stop: sync data, forget old checksums, write back, mark the
    /// superblock clean. The engine stays usable; the next write marks it
    /// dirty again.
    fn make_clean(&self) -> Result<(), EngineError> {
        if self.opts.readonly {
            return Ok(());
        }
        self.settle()?;
        let mut st = self.lock();
        // A write that slipped in after settle() keeps the superblock dirty.
        if !st.pending.is_empty() || st.meta.dirty_pages() != 0 {
            return Ok(());
        }
        if st.marked_dirty {
            let mut sb = st.meta.superblock().clone();
            sb.clean = true;
            st.meta.store_superblock(sb)?;
            st.marked_dirty = false;
            self.counters.meta_syncs.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    fn stats(&self) -> Stats {
        let (pending, queued) = {
            let st = self.lock();
            (st.pending.len() as u64, st.queue.len() as u64)
        };
        let c = &self.counters;
        Stats {
            reads: c.reads.load(Ordering::Relaxed),
            writes: c.writes.load(Ordering::Relaxed),
            mismatches: c.mismatches.load(Ordering::Relaxed),
            data_syncs: c.data_syncs.load(Ordering::Relaxed),
            meta_syncs: c.meta_syncs.load(Ordering::Relaxed),
            pending,
            queued,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn check_range(&self, block: u64, count: u64) -> Result<(), EngineError> {
        match block.checked_add(count) {
            Some(end) if end <= self.blocks => Ok(()),
            _ => Err(EngineError::OutOfRange {
                block,
                count,
                blocks: self.blocks,
            }),
        }
    }

    fn block_count(&self, len: usize) -> Result<u64, EngineError> {
        let bs = self.block_size as usize;
        if len % bs != 0 {
            return Err(EngineError::Unaligned {
                len,
                block_size: self.block_size,
            });
        }
        Ok((len / bs) as u64)
    }

    fn check_write(&self, block: u64, len: usize) -> Result<u64, EngineError> {
        if self.opts.readonly {
            return Err(EngineError::ReadOnly);
        }
        let count = self.block_count(len)?;
        self.check_range(block, count)?;
        Ok(count)
    }

    fn check_zero(&self, block: u64, count: u64) -> Result<(), EngineError> {
        if self.opts.readonly {
            return Err(EngineError::ReadOnly);
        }
        self.check_range(block, count)
    }

    fn offset(&self, block: u64) -> u64 {
        block * u64::from(self.block_size)
    }

    // ---- reads -----------------------------------------------------------

    fn read_blocks(&self, block: u64, buf: &mut [u8]) -> Result<(), EngineError> {
        let count = self.block_count(buf.len())?;
        self.check_range(block, count)?;
        self.counters.reads.fetch_add(1, Ordering::Relaxed);
        let bs = self.block_size as usize;
        let mut pairs = vec![Pair::default(); count as usize];
        for attempt in 0.. {
            // Writes still in the write-back stage are the newest content
            // of their blocks; take them before reading the device, so a
            // write that leaves the stage meanwhile is not missed.
            let queued = self.queued_in(block, count);
            // Pairs are read after the data: a write sets `new` before its
            // data is issued, so the pairs are never older than the data.
            let before = self.pair_changes.load(Ordering::SeqCst);
            self.data
                .read_at(buf, self.offset(block))
                .map_err(EngineError::io("reading data"))?;
            self.lock().meta.get_range(block, &mut pairs)?;
            let raced = self.pair_changes.load(Ordering::SeqCst) != before;

            let mut bad = Vec::new();
            for (i, (data, p)) in buf.chunks_exact_mut(bs).zip(&pairs).enumerate() {
                let b = block + i as u64;
                if let Some(q) = queued.get(i).and_then(Option::as_ref) {
                    let at = (b - q.block) as usize * bs;
                    data.copy_from_slice(&q.data[at..at + bs]);
                } else if self.sum.verify(b, data, p.new, p.old) == Verdict::Neither {
                    bad.push(b);
                }
            }
            if bad.is_empty() {
                return Ok(());
            }
            if raced && attempt < READ_RETRIES {
                continue;
            }
            self.counters
                .mismatches
                .fetch_add(bad.len() as u64, Ordering::Relaxed);
            for b in &bad {
                error!(
                    "checksum mismatch in block {b} (byte offset {}): its data matches neither stored checksum",
                    self.offset(*b)
                );
            }
            return match self.opts.on_mismatch {
                OnMismatch::Error => Err(EngineError::Mismatch { block: bad[0] }),
                OnMismatch::Log => Ok(()),
            };
        }
        unreachable!("the retry loop returns")
    }

    /// The queued write holding each block of a range, if any.
    fn queued_in(&self, block: u64, count: u64) -> Vec<Option<Arc<Queued>>> {
        if !self.write_back {
            return Vec::new();
        }
        let st = self.lock();
        if st.overlay.is_empty() {
            return Vec::new();
        }
        (block..block + count)
            .map(|b| st.overlay.get(&b).cloned())
            .collect()
    }

    // ---- writes ----------------------------------------------------------

    fn write_updates(&self, mut updates: Vec<Update<'_>>, results: &mut [Result<(), EngineError>]) {
        // Hash before taking any lock: the data is ours and does not change.
        let bs = self.block_size as usize;
        for u in &mut updates {
            u.sums = match u.data {
                Some(d) => d
                    .chunks_exact(bs)
                    .enumerate()
                    .map(|(i, blk)| self.sum.block_hash(u.block + i as u64, blk))
                    .collect(),
                None => vec![ZERO; u.count as usize],
            };
        }
        if !self.write_back || self.sync_mode() {
            self.drain();
            self.write_rounds(updates, results);
            return;
        }
        // Writes join the write-back stage in order; a zeroing waits for
        // what queued before it, so it cannot be overtaken by an older write.
        let mut zeros = Vec::new();
        for u in updates {
            match u.data {
                Some(data) => {
                    if !zeros.is_empty() {
                        self.drain();
                        self.write_rounds(std::mem::take(&mut zeros), results);
                    }
                    self.enqueue(u.block, u.count, data, u.sums);
                }
                None => zeros.push(u),
            }
        }
        if !zeros.is_empty() {
            self.drain();
            self.write_rounds(zeros, results);
        }
    }

    fn write_rounds(&self, updates: Vec<Update<'_>>, results: &mut [Result<(), EngineError>]) {
        for round in split_rounds(updates) {
            if let Err(e) = self.write_round(&round) {
                for u in &round {
                    if results[u.op].is_ok() {
                        results[u.op] = Err(e.duplicate());
                    }
                }
            }
        }
    }

    // ---- the write-back stage --------------------------------------------

    fn enqueue(&self, block: u64, count: u64, data: &[u8], sums: Vec<u64>) {
        let mut st = self.lock();
        while st.queued_bytes > 0 && st.queued_bytes + data.len() > QUEUE_BYTES && !st.stopping {
            st = self
                .completed
                .wait(st)
                .unwrap_or_else(PoisonError::into_inner);
        }
        st.enqueued += 1;
        let q = Arc::new(Queued {
            seq: st.enqueued,
            block,
            count,
            data: data.into(),
            sums,
        });
        for b in block..block + count {
            st.overlay.insert(b, q.clone());
        }
        st.queued_bytes += data.len();
        st.queue.push(q);
        drop(st);
        self.work.notify_one();
    }

    /// Wait until every write queued before this call has been committed.
    fn drain(&self) {
        if !self.write_back {
            return;
        }
        let mut st = self.lock();
        let target = st.enqueued;
        while st.committed < target && !st.stopping {
            st = self
                .completed
                .wait(st)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// The commit thread: take everything queued, commit it as one batch
    /// (one metadata sync for all of it), write the data, repeat.
    fn run_committer(&self) {
        loop {
            let batch = {
                let mut st = self.lock();
                while st.queue.is_empty() && !st.stopping {
                    st = self.work.wait(st).unwrap_or_else(PoisonError::into_inner);
                }
                if st.stopping {
                    return;
                }
                std::mem::take(&mut st.queue)
            };
            let live = not_superseded(&batch);
            let updates = batch
                .iter()
                .enumerate()
                .filter(|&(i, _)| live[i])
                .map(|(i, q)| Update {
                    op: i,
                    block: q.block,
                    count: q.count,
                    data: Some(&q.data),
                    sums: q.sums.clone(),
                })
                .collect();
            let mut results: Vec<Result<(), EngineError>> = batch.iter().map(|_| Ok(())).collect();
            self.write_rounds(updates, &mut results);

            let mut st = self.lock();
            for (q, r) in batch.iter().zip(&results) {
                for b in q.block..q.block + q.count {
                    if st.overlay.get(&b).is_some_and(|o| Arc::ptr_eq(o, q)) {
                        st.overlay.remove(&b);
                    }
                }
                st.queued_bytes -= q.data.len();
                if let Err(e) = r {
                    error!(
                        "write of blocks {}+{} failed after it completed: {e}; the next flush reports it",
                        q.block, q.count
                    );
                    st.deferred = Some((io::ErrorKind::Other, e.to_string()));
                }
            }
            if let Some(last) = batch.last() {
                st.committed = last.seq;
            }
            drop(st);
            self.completed.notify_all();
        }
    }

    /// FLUSH: everything completed so far reaches the data device and is
    /// synced; a write-back failure since the last flush fails this one.
    fn flush_all(&self) -> Result<(), EngineError> {
        self.drain();
        self.flush_data()?;
        match self.lock().deferred.take() {
            None => Ok(()),
            Some((kind, msg)) => Err(EngineError::Io {
                what: "writing back data",
                source: io::Error::new(kind, msg),
            }),
        }
    }

    /// Commit and write one round: no block appears twice in it.
    fn write_round(&self, round: &[Update<'_>]) -> Result<(), EngineError> {
        let mut st = self.make_writable(round)?;

        // The blocks are Clean (or zero) now: old covers the durable content.
        st.events += 1;
        for u in round {
            if u.data.is_none() {
                st.zeroing.push((u.block, u.block + u.count));
            }
            for (i, &sum) in u.sums.iter().enumerate() {
                let b = u.block + i as u64;
                let p = st.meta.get(b)?;
                if sum == ZERO && p == Pair::default() {
                    // Reads as zeros already, whatever the punch does.
                    continue;
                }
                st.meta.set(
                    b,
                    Pair {
                        new: sum,
                        old: p.old,
                    },
                )?;
                let e = st.pending.entry(b).or_insert(PendingBlock {
                    inflight: 0,
                    completed: 0,
                });
                e.inflight += 1;
            }
        }
        self.pair_changes.fetch_add(1, Ordering::SeqCst);
        let commit = self.commit_locked(&mut st);
        drop(st);
        let mut result = commit.and_then(|ticket| self.sync_meta(ticket));

        // Only now may the data move: its checksum is durable.
        let mut failed = vec![false; round.len()];
        if result.is_ok() {
            for (u, failed) in round.iter().zip(&mut failed) {
                let r = match u.data {
                    Some(d) => self.data.write_at(d, self.offset(u.block)),
                    None => self
                        .data
                        .zero_range(self.offset(u.block), self.offset(u.count)),
                };
                if let Err(e) = r {
                    error!(
                        "data write of blocks {}+{} failed: {e}; their checksums still cover the old and the new content",
                        u.block, u.count
                    );
                    *failed = true;
                    result = Err(EngineError::Io {
                        what: "writing data",
                        source: e,
                    });
                }
            }
        }
        self.complete(round, &failed);
        self.counters
            .writes
            .fetch_add(round.len() as u64, Ordering::Relaxed);
        result?;

        if self.sync_mode() {
            self.settle_issued()?;
        } else if self.lock().pending.len() > self.opts.pending_limit {
            // Bound the window of weakened detection for guests that never
            // flush.
            self.flush_data()?;
        }
        Ok(())
    }

    /// Wait until no block of `round` is Pending, syncing the data device
    /// once if needed, and return the state lock with all of them Clean.
    fn make_writable(&self, round: &[Update<'_>]) -> Result<MutexGuard<'_, State>, EngineError> {
        let mut st = self.lock();
        let mut resolves = 0;
        loop {
            if !st.marked_dirty {
                let mut sb = st.meta.superblock().clone();
                sb.clean = false;
                st.meta.store_superblock(sb)?;
                st.marked_dirty = true;
                self.counters.meta_syncs.fetch_add(1, Ordering::Relaxed);
            }
            let mut busy = false;
            let mut pending = false;
            let mut uncertain = Vec::new();
            for u in round {
                let end = u.block + u.count;
                busy |= st.zeroing.iter().any(|&(b, e)| b < end && u.block < e);
                for b in u.block..end {
                    if let Some(p) = st.pending.get(&b) {
                        pending = true;
                        busy |= p.inflight > 0;
                    } else {
                        let p = st.meta.get(b)?;
                        if p.new != p.old {
                            uncertain.push((b, p));
                        }
                    }
                }
            }
            if busy {
                // Rewrite of a block whose earlier write is still in flight:
                // the sync must begin after that write completed.
                st = self
                    .completed
                    .wait(st)
                    .unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            if pending {
                drop(st);
                self.flush_data()?;
                st = self.lock();
                continue;
            }
            if !uncertain.is_empty() {
                // A device that loses the pages we wrote (the simulated one
                // after a power cut, a lying disk) could keep us here
                // forever; fail the write instead.
                resolves += 1;
                if resolves > 3 {
                    return Err(EngineError::Meta(MetaError::Io {
                        what: "settling pairs left by a crash",
                        source: io::Error::other(format!(
                            "block {}: the metadata device does not keep what was written",
                            uncertain[0].0
                        )),
                    }));
                }
                drop(st);
                self.resolve(&uncertain)?;
                st = self.lock();
                continue;
            }
            return Ok(st);
        }
    }

    /// Blocks whose pair has two different checksums but are not Pending:
    /// left by a crash or a failed data write. Find which slot it matches so that `old`
    /// describes it before a new write makes it Pending again.
    fn resolve(&self, blocks: &[(u64, Pair)]) -> Result<(), EngineError> {
        // What we read must be what a power cut would leave.
        self.data
            .sync()
            .map_err(EngineError::io("syncing data before resolving blocks"))?;
        let mut buf = vec![0u8; self.block_size as usize];
        let mut settled = Vec::with_capacity(blocks.len());
        for &(b, p) in blocks {
            self.data
                .read_at(&mut buf, self.offset(b))
                .map_err(EngineError::io("reading a block left pending by a crash"))?;
            let sum = match self.sum.verify(b, &buf, p.new, p.old) {
                Verdict::New => p.new,
                Verdict::Old => p.old,
                // Damaged: keep both slots so the damage stays visible.
                Verdict::Neither => continue,
            };
            settled.push((b, p, sum));
        }
        let mut st = self.lock();
        for (b, p, sum) in settled {
            // Skip a block somebody else wrote meanwhile.
            if !st.pending.contains_key(&b) && st.meta.get(b)? == p {
                st.meta.set(b, Pair { new: sum, old: sum })?;
            }
        }
        // Blocks that matched neither: make them look settled to the write
        // path by collapsing onto `old`; reads of the damage still fail.
        for &(b, p) in blocks {
            if !st.pending.contains_key(&b) && st.meta.get(b)? == p {
                st.meta.set(
                    b,
                    Pair {
                        new: p.old,
                        old: p.old,
                    },
                )?;
            }
        }
        self.pair_changes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// Mark the round's data writes completed.
    ///
    /// A block whose write failed holds unknown content, so a later sync
    /// must not collapse its pair onto `new`: it leaves the Pending set with
    /// both slots kept, and the next write to it resolves it from the data
    /// (as after a crash).
    fn complete(&self, round: &[Update<'_>], failed: &[bool]) {
        let mut st = self.lock();
        st.events += 1;
        let now = st.events;
        for (u, &failed) in round.iter().zip(failed) {
            if u.data.is_none() {
                let range = (u.block, u.block + u.count);
                if let Some(i) = st.zeroing.iter().position(|&r| r == range) {
                    st.zeroing.swap_remove(i);
                }
            }
            for b in u.block..u.block + u.count {
                if let Some(p) = st.pending.get_mut(&b) {
                    p.inflight = p.inflight.saturating_sub(1);
                    p.completed = now;
                    if failed && p.inflight == 0 {
                        st.pending.remove(&b);
                    }
                }
            }
        }
        drop(st);
        self.completed.notify_all();
    }

    // ---- syncs -----------------------------------------------------------

    /// Write every dirty page now (under the state lock, so page writes
    /// land in the order pairs changed) and return the ticket a metadata
    /// sync must satisfy.
    fn commit_locked(&self, st: &mut State) -> Result<super::gate::Ticket, EngineError> {
        st.meta.write_dirty()?;
        Ok(self.meta_gate.ticket())
    }

    fn sync_meta(&self, ticket: super::gate::Ticket) -> Result<(), EngineError> {
        self.meta_gate
            .sync_after(ticket, || {
                self.counters.meta_syncs.fetch_add(1, Ordering::Relaxed);
                self.meta_dev.sync()
            })
            .map_err(EngineError::meta_io("syncing metadata"))
    }

    /// Sync the data device (shared with every thread that needs one now)
    /// and forget the old checksum of each block whose writes had all
    /// completed before the sync began.
    fn flush_data(&self) -> Result<(), EngineError> {
        let ticket = self.data_gate.ticket();
        self.data_gate
            .sync_after(ticket, || {
                let began = self.lock().events;
                self.counters.data_syncs.fetch_add(1, Ordering::Relaxed);
                self.data.sync()?;
                self.forget_old(began);
                Ok(())
            })
            .map_err(EngineError::io("syncing the data device"))
    }

    fn forget_old(&self, began: u64) {
        let mut st = self.lock();
        let settled: Vec<u64> = st
            .pending
            .iter()
            .filter(|(_, p)| p.inflight == 0 && p.completed <= began)
            .map(|(&b, _)| b)
            .collect();
        for b in settled {
            st.pending.remove(&b);
            match st.meta.get(b) {
                Ok(p) => {
                    if let Err(e) = st.meta.set(
                        b,
                        Pair {
                            new: p.new,
                            old: p.new,
                        },
                    ) {
                        // Keeping both slots is always safe; only detection
                        // of a stale old content is weaker.
                        warn!("cannot forget the old checksum of block {b}: {e}");
                    }
                }
                Err(e) => warn!("cannot forget the old checksum of block {b}: {e}"),
            }
        }
        // Inside the lock: a read that sees the new pairs must also see
        // the bump, or it would report the race as a mismatch.
        self.pair_changes.fetch_add(1, Ordering::SeqCst);
    }

    /// Make the metadata on disk fully current: sync data, forget every old
    /// checksum that can be forgotten, write back, sync metadata.
    fn settle(&self) -> Result<(), EngineError> {
        self.drain();
        self.settle_issued()
    }

    /// [`Self::settle`] for the writes already issued: what the commit
    /// thread runs after its own batch in synchronous mode (draining there
    /// would wait for itself).
    fn settle_issued(&self) -> Result<(), EngineError> {
        {
            // Writes in flight would stay Pending through the sync.
            let mut st = self.lock();
            while !st.zeroing.is_empty() || st.pending.values().any(|p| p.inflight > 0) {
                st = self
                    .completed
                    .wait(st)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        }
        self.flush_data()?;
        let ticket = {
            let mut st = self.lock();
            self.commit_locked(&mut st)?
        };
        self.sync_meta(ticket)
    }

    fn store_flags(&self, f: impl FnOnce(&mut crate::meta::Superblock)) -> Result<(), EngineError> {
        let mut st = self.lock();
        let mut sb = st.meta.superblock().clone();
        f(&mut sb);
        st.meta.store_superblock(sb)?;
        self.counters.meta_syncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Split a batch into rounds in which no block repeats, keeping the order
/// of updates that touch the same block (a later write must land later),
/// and no round covers much more than [`ZERO_CHUNK`] blocks.
///
/// Batches from the write-back stage hold thousands of updates, so small
/// updates are placed through a per-block map (linear); the few large
/// ranges (zeroings) are kept as intervals.
fn split_rounds(updates: Vec<Update<'_>>) -> Vec<Vec<Update<'_>>> {
    const SMALL: u64 = 64;
    let mut rounds: Vec<(u64, Vec<Update<'_>>)> = Vec::new();
    // The last round each block of a small update went to.
    let mut small: HashMap<u64, usize> = HashMap::new();
    let mut large: Vec<(u64, u64, usize)> = Vec::new();
    for u in updates {
        let end = u.block + u.count;
        let after_large = large
            .iter()
            .filter(|&&(b, e, _)| b < end && u.block < e)
            .map(|&(_, _, r)| r + 1)
            .max();
        let after_small = if u.count <= small.len() as u64 {
            (u.block..end)
                .filter_map(|b| small.get(&b))
                .map(|&r| r + 1)
                .max()
        } else {
            small
                .iter()
                .filter(|(&b, _)| u.block <= b && b < end)
                .map(|(_, &r)| r + 1)
                .max()
        };
        let mut round = after_large.max(after_small).unwrap_or(0);
        while rounds
            .get(round)
            .is_some_and(|(n, r)| !r.is_empty() && n + u.count > ZERO_CHUNK)
        {
            round += 1;
        }
        if u.count <= SMALL {
            for b in u.block..end {
                small.insert(b, round);
            }
        } else {
            large.push((u.block, end, round));
        }
        if rounds.len() <= round {
            rounds.resize_with(round + 1, || (0, Vec::new()));
        }
        rounds[round].0 += u.count;
        rounds[round].1.push(u);
    }
    rounds.into_iter().map(|(_, r)| r).collect()
}

/// Which queued writes still need writing: one whose every block a later
/// write of the same batch overwrites never has to reach the disk (neither
/// was flushed yet: a FLUSH drains the stage before it syncs), and
/// skipping it spares the data sync a rewrite round would cost.
fn not_superseded(batch: &[Arc<Queued>]) -> Vec<bool> {
    let mut last: HashMap<u64, usize> = HashMap::with_capacity(batch.len());
    for (i, q) in batch.iter().enumerate() {
        for b in q.block..q.block + q.count {
            last.insert(b, i);
        }
    }
    batch
        .iter()
        .enumerate()
        .map(|(i, q)| (q.block..q.block + q.count).any(|b| last.get(&b) == Some(&i)))
        .collect()
}

fn zero_chunks<'a>(op: usize, block: u64, count: u64) -> impl Iterator<Item = Update<'a>> {
    (0..count.div_ceil(ZERO_CHUNK)).map(move |i| {
        let start = block + i * ZERO_CHUNK;
        Update {
            op,
            block: start,
            count: ZERO_CHUNK.min(block + count - start),
            data: None,
            sums: Vec::new(),
        }
    })
}

fn single(mut r: Vec<Result<(), EngineError>>) -> Result<(), EngineError> {
    r.pop().unwrap_or(Ok(()))
}

#[cfg(test)]
mod tests;
