//! Engine API (stub while the implementation lands).

use std::io;

use crate::meta::{DeviceRef, MetaError};

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
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            on_mismatch: OnMismatch::Error,
            readonly: false,
            pending_limit: 65536,
            cache_pages: 16384,
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
}

/// The dual-checksum engine over one data and one metadata device.
pub struct Engine {
    _p: (),
}

impl Engine {
    /// Open formatted metadata for `data`; refuses metadata of another image.
    /// An unclean superblock is logged; no repair is needed.
    pub fn open(_data: DeviceRef, _meta: DeviceRef, _opts: EngineOptions) -> Result<Self, EngineError> {
        todo!()
    }
    pub fn block_size(&self) -> u32 {
        todo!()
    }
    pub fn blocks(&self) -> u64 {
        todo!()
    }
    /// The metadata was clean when opened (orderly shutdown before).
    pub fn was_clean(&self) -> bool {
        todo!()
    }
    /// Run a batch; one result per op, in order.
    pub fn submit(&self, _ops: &mut [Op<'_>]) -> Vec<Result<(), EngineError>> {
        todo!()
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
    /// Periodic write-back: write dirty metadata pages and sync the metadata.
    pub fn writeback(&self) -> Result<(), EngineError> {
        todo!()
    }
    /// Guest shutdown: write everything out, then complete each later write
    /// only once its metadata is durable (DESIGN §4). Idempotent.
    pub fn enter_sync_mode(&self) -> Result<(), EngineError> {
        todo!()
    }
    /// The guest's driver started the device again.
    pub fn leave_sync_mode(&self) -> Result<(), EngineError> {
        todo!()
    }
    pub fn sync_mode(&self) -> bool {
        todo!()
    }
    /// Orderly stop: sync data, forget old checksums, write back, mark the
    /// superblock clean. The engine stays usable; the next write marks it
    /// dirty again.
    pub fn make_clean(&self) -> Result<(), EngineError> {
        todo!()
    }
    pub fn stats(&self) -> Stats {
        todo!()
    }
}

fn single(mut r: Vec<Result<(), EngineError>>) -> Result<(), EngineError> {
    r.pop().unwrap_or(Ok(()))
}
