//! The dual-checksum engine (DESIGN §2).
//!
//! Every block has a pair `(new, old)` of checksums. The one rule that makes
//! the whole thing crash safe: **the pair held in memory always covers every
//! content the data device could hold for that block**. Each transition
//! keeps that true at every instant, so the metadata cache may write any
//! page back at any time (eviction, periodic write-back, a commit for an
//! unrelated block) without ever breaking the on-disk invariant.
//!
//! The parts, one idea each:
//!
//! - [`pairs`]: the Clean/Pending state machine — making blocks writable
//!   (a data sync before a rewrite), resolving pairs a crash left, data
//!   syncs that forget old checksums.
//! - [`rounds`]: committing a batch of updates — split into rounds in which
//!   no block repeats, each round's checksums made durable with one
//!   metadata sync shared across threads before its data moves.
//! - [`writeback`]: the write-back stage — writes complete once recorded in
//!   a stage that outlives the process; a commit thread runs them as
//!   rounds; a restarted engine replays what its predecessor left.
//! - [`open`]: opening — flags, log recovery, stage replay.
//! - [`read`]: verified reads, with queued writes taking precedence.
//! - [`recent`]: the blocks found mismatched most recently, for status.
//!
//! This file keeps what the parts share: the public [`Engine`] API, its
//! options and stats, the batch entry point and the mode switches. It is
//! a little over 600 lines because each public call is documented where
//! the caller looks for it; the logic lives in the parts.
//!
//! Locking: `state` (in [`pairs`]) guards the metadata cache and the
//! Pending set; page writes happen under it, so they reach the device in
//! the order the pairs changed. The stage has its own lock, always taken
//! after `state` when both are held. Device syncs happen outside both,
//! through [`SyncGate`]s.

mod error;
mod open;
mod pairs;
mod read;
mod recent;
mod rounds;
mod wakeup;
mod writeback;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use log::{error, info, warn};

pub use self::error::EngineError;
use self::pairs::State;
use self::recent::Recent;
pub use self::recent::RECENT_MISMATCHES;
use self::rounds::{zero_chunks, Source, Update};
use self::wakeup::Wakeup;
use self::writeback::Writeback;
use super::gate::SyncGate;
use super::hash::Checksum;
use super::verify::DataRegions;
use crate::io::{Device, MemRegion, Region};
use crate::key::Key;
use crate::meta::{DeviceRef, Metadata, Superblock};
use crate::stage::{BootId, Identity, Stage};

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
    /// Past this many Pending blocks the engine syncs the data device
    /// itself. It bounds the window of weakened detection and the memory
    /// the Pending set takes. See [`DEFAULT_PENDING_LIMIT`].
    pub pending_limit: usize,
    /// Metadata cache size in 4 KiB pages.
    pub cache_pages: usize,
    /// Complete a write once it is hashed and recorded in the write-back
    /// stage, as a disk with a volatile write cache does; a commit thread
    /// then makes its checksum durable and writes the data, batching
    /// everything that queued meanwhile into one metadata sync. FLUSH,
    /// zeroing, synchronous mode and shutdown drain the stage first.
    /// Off: every write completes only once its data is written.
    pub write_cache: bool,
    /// Bytes of the in-process stage an engine opened without one of its
    /// own ([`Engine::open`]) uses.
    pub stage_bytes: u64,
    /// The key of a disk with keyed checksums; `None` for an unkeyed disk.
    pub key: Option<Key>,
}

/// Default bound of the write-back stage.
pub const DEFAULT_STAGE_BYTES: u64 = 128 << 20;

/// Default [`EngineOptions::pending_limit`]: 3 GiB of 4 KiB blocks, so a
/// guest writing at random over a large sparse image for many seconds
/// meets no sync of the whole device (each one allocates everything
/// written since the last) before its own FLUSH.
///
/// Also kept below what a hash table of 2^20 buckets holds (7/8 of them)
/// less a full stage of 4 KiB writes, by which one round may overshoot
/// the limit: the Pending set then never doubles to 2^21 buckets (about
/// 50 MiB more, and 75 MiB while it moves), which would take serving a
/// 1 TiB disk past its 256 MiB memory bound. 2^20 itself did, in a long
/// enough run of random writes.
pub const DEFAULT_PENDING_LIMIT: usize = 3 << 18;

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            on_mismatch: OnMismatch::Error,
            readonly: false,
            pending_limit: DEFAULT_PENDING_LIMIT,
            cache_pages: 16384,
            write_cache: true,
            stage_bytes: DEFAULT_STAGE_BYTES,
            key: None,
        }
    }
}

/// A stage that outlives the process, for [`Engine::open_with_stage`].
pub struct StageConfig {
    pub region: Arc<dyn Region>,
    /// This boot of the host ([`crate::stage::boot_id`]).
    pub boot: BootId,
}

/// What opening found in the stage and replayed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replayed {
    /// Completed writes the last process left, now committed and written.
    pub writes: u64,
    pub bytes: u64,
    /// Records reserved but never completed (their writes never returned).
    pub torn: u64,
    /// Writes of a stage from an earlier boot of the host, dropped.
    pub earlier_boot: Option<u64>,
    /// Metadata log records found since the last checkpoint and replayed
    /// over the pair table.
    pub log_records: u64,
}

/// One request of a batch. Requests in one batch have no order among them
/// (as in virtio), except that a `Flush` covers every write of the batch.
#[derive(Debug)]
pub enum Op<'a> {
    /// Read whole blocks from `block` into `buf` (a multiple of the block size).
    Read { block: u64, buf: &'a mut [u8] },
    /// [`Op::Read`] into memory its owner may write meanwhile (a guest's
    /// own read buffer). Verified the same way, but a block that matches
    /// neither checksum only fails the op with [`EngineError::Mismatch`]
    /// and zeros in `buf`: it is not logged, counted or remembered, and
    /// `on_mismatch` does not apply, because the owner may have changed
    /// the bytes under the hash. The caller then reads again into memory
    /// of its own with [`Op::Read`], which tells a real mismatch. A
    /// `TryRead` is not counted as a read ([`Engine::count_read`]).
    TryRead { block: u64, buf: &'a mut [u8] },
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
    /// FLUSH requests (each op of a batch counts).
    pub flushes: u64,
    /// Blocks found matching neither checksum, by guest reads and scrubs.
    pub mismatches: u64,
    pub data_syncs: u64,
    pub meta_syncs: u64,
    /// Time spent in data and metadata syncs, summed (microseconds).
    pub data_sync_us: u64,
    pub meta_sync_us: u64,
    /// Commit rounds run, and the writes they committed.
    pub rounds: u64,
    pub pending: u64,
    /// Writes completed but still in the write-back stage.
    pub queued: u64,
    /// The superblock on the device says the last stop was orderly: no
    /// write since the last `make_clean` (or since opening clean).
    pub clean: bool,
}

#[derive(Debug, Default)]
struct Counters {
    reads: AtomicU64,
    writes: AtomicU64,
    flushes: AtomicU64,
    mismatches: AtomicU64,
    data_syncs: AtomicU64,
    meta_syncs: AtomicU64,
    data_sync_us: AtomicU64,
    meta_sync_us: AtomicU64,
    rounds: AtomicU64,
}

impl Counters {
    /// Run `f`, adding its duration to `total`.
    fn timed<T>(total: &AtomicU64, f: impl FnOnce() -> T) -> T {
        let start = std::time::Instant::now();
        let r = f();
        total.fetch_add(start.elapsed().as_micros() as u64, Ordering::Relaxed);
        r
    }
}

/// The dual-checksum engine over one data and one metadata device.
pub struct Engine {
    core: Arc<Core>,
    committer: Option<JoinHandle<()>>,
    checkpointer: Option<JoinHandle<()>>,
    syncer: Option<JoinHandle<()>>,
    replayed: Replayed,
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
    /// Signalled whenever a block's in-flight count drops to zero.
    completed: Condvar,
    /// The write-back stage (write_cache and not read-only).
    wb: Option<Writeback>,
    data_gate: SyncGate,
    meta_gate: SyncGate,
    sync_mode: AtomicBool,
    /// Log records are written in sequence order (see `rounds::write_log`).
    log_order: Mutex<rounds::LogOrder>,
    log_turn: Condvar,
    /// One checkpoint at a time.
    checkpointing: Mutex<()>,
    /// Wakes the checkpoint thread (a log half full).
    ckpt: Wakeup,
    /// Wakes the sync thread: the commit thread holds writes back until
    /// their blocks' earlier writes are synced, or many blocks are Pending.
    syncer: Wakeup,
    /// Bumped on every pair change and every completed data write, so a
    /// read that raced a write or a flush can tell and look again instead
    /// of reporting a false mismatch.
    pair_changes: AtomicU64,
    counters: Counters,
    recent: Recent,
}

impl Engine {
    /// Open formatted metadata for `data`, with a write-back stage in this
    /// process's memory (lost with it). Refuses metadata of another image.
    /// An unclean superblock is logged; no repair is needed.
    pub fn open(
        data: DeviceRef,
        meta: DeviceRef,
        opts: EngineOptions,
    ) -> Result<Self, EngineError> {
        let len = crate::stage::RING_START
            + opts
                .stage_bytes
                .max(crate::stage::MIN_CAPACITY)
                .div_ceil(crate::stage::RECORD_HEADER)
                * crate::stage::RECORD_HEADER;
        let stage = StageConfig {
            region: Arc::new(MemRegion::new(len)),
            boot: [0; 16],
        };
        Self::open_with_stage(data, meta, stage, opts)
    }

    /// Open with a write-back stage in `stage`, which outlives the
    /// process: first replay the completed writes it holds (committing
    /// their checksums, then writing their data, in order), then serve.
    pub fn open_with_stage(
        data: DeviceRef,
        meta: DeviceRef,
        stage: StageConfig,
        opts: EngineOptions,
    ) -> Result<Self, EngineError> {
        let (core, replayed) = Core::open(data, meta, stage, opts)?;
        let core = Arc::new(core);
        let (committer, syncer) = if core.wb.is_some() {
            let c = core.clone();
            let commit = std::thread::Builder::new()
                .name("twinsum-commit".into())
                .spawn(move || c.run_committer())
                .map_err(EngineError::io("starting the commit thread"))?;
            let c = core.clone();
            let sync = std::thread::Builder::new()
                .name("twinsum-sync".into())
                .spawn(move || c.run_syncer())
                .map_err(EngineError::io("starting the sync thread"))?;
            (Some(commit), Some(sync))
        } else {
            (None, None)
        };
        let checkpointer = if core.lock().meta.has_log() && !core.opts.readonly {
            let c = core.clone();
            let handle = std::thread::Builder::new()
                .name("twinsum-checkpoint".into())
                .spawn(move || c.run_checkpointer())
                .map_err(EngineError::io("starting the checkpoint thread"))?;
            Some(handle)
        } else {
            None
        };
        Ok(Self {
            core,
            committer,
            checkpointer,
            syncer,
            replayed,
        })
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

    /// What opening replayed from the stage.
    pub fn replayed(&self) -> &Replayed {
        &self.replayed
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

    /// Count a guest read that completed through [`Op::TryRead`]s, which
    /// do not count themselves (a request may take several, or fall back
    /// to an [`Op::Read`], which does).
    pub fn count_read(&self) {
        self.core.counters.reads.fetch_add(1, Ordering::Relaxed);
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
    /// marks it dirty again. `Ok(true)` when the superblock is clean and
    /// the stage empty.
    pub fn make_clean(&self) -> Result<bool, EngineError> {
        self.core.make_clean()
    }

    pub fn stats(&self) -> Stats {
        self.core.stats()
    }

    /// The blocks found mismatched most recently, newest first (at most
    /// [`RECENT_MISMATCHES`]).
    pub fn recent_mismatches(&self) -> Vec<u64> {
        self.core.recent.list()
    }

    /// A scrub's read of whole blocks: verified exactly as a guest read
    /// (queued writes first, looked at again while pairs change), each
    /// mismatch counted and logged, but all of them returned instead of an
    /// error, and not counted in [`Stats::reads`].
    pub fn scrub_read(&self, block: u64, buf: &mut [u8]) -> Result<Vec<u64>, EngineError> {
        self.core.scrub_blocks(block, buf)
    }

    /// The byte ranges of the data device that may hold data (holes
    /// skipped), widened to whole blocks: where a scrub must read.
    pub fn data_regions(&self) -> DataRegions<'_, dyn Device> {
        DataRegions::new(&*self.core.data, u64::from(self.core.block_size))
    }

    #[cfg(test)]
    fn lock(&self) -> MutexGuard<'_, State> {
        self.core.lock()
    }
}

impl Drop for Engine {
    /// Stops the commit thread after its current round. Writes still in the
    /// stage stay there: a stage that outlives the process is replayed by
    /// the next engine, an in-process one is lost, as a volatile cache is
    /// at a crash. Callers that want them written call `make_clean` (or
    /// `flush`) first.
    fn drop(&mut self) {
        if let Some(wb) = &self.core.wb {
            wb.stop();
        }
        self.core.completed.notify_all();
        if let Some(h) = self.committer.take() {
            if h.join().is_err() {
                error!("the commit thread panicked");
            }
        }
        self.core.ckpt.stop();
        self.core.syncer.stop();
        for (h, name) in [
            (self.checkpointer.take(), "checkpoint"),
            (self.syncer.take(), "sync"),
        ] {
            if h.is_some_and(|h| h.join().is_err()) {
                error!("the {name} thread panicked");
            }
        }
    }
}

impl Core {
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
                Op::TryRead { block, buf } => {
                    results[i] = self.try_read_blocks(*block, buf);
                }
                Op::Write { block, data } => match self.check_write(*block, data.len()) {
                    Ok(count) => updates.push(Update {
                        op: i,
                        block: *block,
                        count,
                        source: Source::Mem(data),
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
        self.counters
            .flushes
            .fetch_add(flushes.len() as u64, Ordering::Relaxed);
        if !updates.is_empty() {
            self.write_updates(updates, &mut results);
        }
        if !flushes.is_empty() {
            let r = self.flush_all();
            for i in flushes {
                results[i] = r.clone();
            }
        }
        results
    }

    /// Periodic write-back: write dirty metadata pages, sync the
    /// metadata, and with a log move replay past everything written.
    fn writeback(&self) -> Result<(), EngineError> {
        {
            let st = self.lock();
            let log_used = st.meta.log_usage().map_or(0, |(used, _)| used);
            if st.meta.dirty_pages() == 0 && log_used == 0 {
                return Ok(());
            }
        }
        self.checkpoint()
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
    fn make_clean(&self) -> Result<bool, EngineError> {
        if self.opts.readonly {
            return Ok(true);
        }
        self.settle()?;
        let mut st = self.lock();
        // A write that slipped in after settle() keeps the superblock dirty.
        if !st.pending.is_empty()
            || st.meta.dirty_pages() != 0
            || st.meta.log_usage().is_some_and(|(used, _)| used > 0)
            || self.wb.as_ref().is_some_and(|wb| wb.queued() > 0)
        {
            return Ok(false);
        }
        if st.marked_dirty {
            let mut sb = st.meta.superblock().clone();
            sb.clean = true;
            self.store_superblock(&mut st, sb)?;
            st.marked_dirty = false;
        }
        Ok(true)
    }

    fn stats(&self) -> Stats {
        let (pending, clean) = {
            let st = self.lock();
            (st.pending.len() as u64, !st.marked_dirty)
        };
        let queued = self.wb.as_ref().map_or(0, Writeback::queued);
        let c = &self.counters;
        Stats {
            reads: c.reads.load(Ordering::Relaxed),
            writes: c.writes.load(Ordering::Relaxed),
            flushes: c.flushes.load(Ordering::Relaxed),
            mismatches: c.mismatches.load(Ordering::Relaxed),
            data_syncs: c.data_syncs.load(Ordering::Relaxed),
            meta_syncs: c.meta_syncs.load(Ordering::Relaxed),
            data_sync_us: c.data_sync_us.load(Ordering::Relaxed),
            meta_sync_us: c.meta_sync_us.load(Ordering::Relaxed),
            rounds: c.rounds.load(Ordering::Relaxed),
            pending,
            queued,
            clean,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Store `sb` (generation bumped) durably. The stage learns of the new
    /// generation first, so that it never names one the metadata has not
    /// reached yet by more than one.
    fn store_superblock(&self, st: &mut State, sb: Superblock) -> Result<(), EngineError> {
        if let Some(wb) = &self.wb {
            wb.set_generation(st.meta.superblock().generation + 1)?;
        }
        st.meta.store_superblock(sb)?;
        self.counters.meta_syncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn store_flags(&self, f: impl FnOnce(&mut Superblock)) -> Result<(), EngineError> {
        let mut st = self.lock();
        let mut sb = st.meta.superblock().clone();
        f(&mut sb);
        self.store_superblock(&mut st, sb)
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
        if !len.is_multiple_of(bs) {
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

    /// Checksums of each block of `data`, the content of `block`, `block+1`, ...
    fn sums_of(&self, block: u64, data: &[u8]) -> Vec<u64> {
        data.chunks_exact(self.block_size as usize)
            .enumerate()
            .map(|(i, blk)| self.sum.block_hash(block + i as u64, blk))
            .collect()
    }
}

fn single(mut r: Vec<Result<(), EngineError>>) -> Result<(), EngineError> {
    r.pop().unwrap_or(Ok(()))
}

#[cfg(test)]
mod tests;
