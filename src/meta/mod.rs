//! The on-disk metadata format: a superblock and a table of checksum pairs,
//! read and written through a bounded page cache.
//!
//! Layout (DESIGN §3): offset 0 holds the 512-byte superblock; the pair table
//! starts at [`TABLE_OFFSET`], 16 bytes per block (`new`, `old`, little
//! endian). 4096-byte pages never split a pair across a 512-byte sector.
//!
//! This module knows nothing of the state machine: it stores pairs.

mod cache;
pub mod log;
mod superblock;

use std::io;
use std::sync::Arc;

pub use cache::{LogReplay, Metadata, Pair};
pub use superblock::{
    hash_name, Superblock, SuperblockError, HASH_BLAKE3_KEYED, HASH_XXH3, MAGIC, MIN_LOG_SIZE,
    SUPERBLOCK_SIZE, VERSION, VERSION_LOG, VERSION_NO_LOG,
};

/// Byte offset of the pair table.
pub const TABLE_OFFSET: u64 = 4096;
/// Bytes per pair.
pub const PAIR_SIZE: u64 = 16;
/// Bytes per metadata cache page.
pub const PAGE_SIZE: u64 = 4096;
/// Pairs per cache page.
pub const PAIRS_PER_PAGE: u64 = PAGE_SIZE / PAIR_SIZE;

/// Bytes a metadata device needs for `blocks` blocks.
pub fn meta_len(blocks: u64) -> u64 {
    TABLE_OFFSET + (blocks * PAIR_SIZE).div_ceil(PAGE_SIZE) * PAGE_SIZE
}

/// Why metadata cannot be opened or used. Messages say what failed; the
/// cause is the `source`, printed once by whoever prints the chain.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MetaError {
    #[error("bad superblock")]
    Superblock(#[from] SuperblockError),
    #[error("metadata is truncated: {have} bytes, it needs {need}")]
    Truncated { have: u64, need: u64 },
    #[error("metadata belongs to another image: it describes {meta_size} bytes, the image has {data_size}")]
    WrongImage { meta_size: u64, data_size: u64 },
    #[error("block {block} is past the end of the pair table ({blocks} blocks)")]
    OutOfRange { block: u64, blocks: u64 },
    #[error("metadata I/O failed while {what}")]
    Io {
        what: &'static str,
        #[source]
        source: Arc<io::Error>,
    },
}

/// Shorthand used by the cache and the engine for a device reference.
pub type DeviceRef = Arc<dyn crate::io::Device>;
