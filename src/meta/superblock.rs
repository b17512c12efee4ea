//! The 512-byte superblock (stub: see issue 2).

/// Size of the superblock on disk.
pub const SUPERBLOCK_SIZE: usize = 512;
/// The format version this build writes.
pub const VERSION: u32 = 1;
/// Hash id of xxh3-64 seeded by salt and block number.
pub const HASH_XXH3: u32 = 1;

/// Decoded superblock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub version: u32,
    /// 512 or 4096; the logical block size the guest sees.
    pub block_size: u32,
    pub blocks: u64,
    pub hash_id: u32,
    pub salt: u64,
    /// Size of the data image in bytes (`blocks * block_size`).
    pub data_size: u64,
    /// Shut down in order: every pair on disk is current.
    pub clean: bool,
    /// The backend was in synchronous mode when it last wrote this.
    pub sync_mode: bool,
    /// Bumped on every superblock write.
    pub generation: u64,
}

/// Why a superblock was refused.
#[derive(Debug, thiserror::Error)]
pub enum SuperblockError {
    #[error("not twinsum metadata (magic {0:#018x})")]
    Magic(u64),
}
