//! Pair table behind a bounded page cache (stub: see issue 2).

use super::{DeviceRef, MetaError, Superblock};

/// The two checksums of one block. 0 is the reserved "reads as zeros" value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pair {
    pub new: u64,
    pub old: u64,
}

/// Open metadata: the superblock plus a bounded cache of pair-table pages.
///
/// Not `Sync`: the engine holds it behind its own lock. Page writes happen
/// only inside `&mut self` calls, so callers serialise them; syncing the
/// device (`device().sync()`) can happen outside that lock.
pub struct Metadata {
    _p: (),
}

impl Metadata {
    /// Write a fresh superblock and an all-zero pair table (a hole in a
    /// sparse file), sync, and open it with at most `cache_pages` pages.
    pub fn create(_dev: DeviceRef, _sb: Superblock, _cache_pages: usize) -> Result<Self, MetaError> {
        todo!()
    }
    /// Read and validate the superblock and the table length.
    pub fn open(_dev: DeviceRef, _cache_pages: usize) -> Result<Self, MetaError> {
        todo!()
    }
    /// Refuse metadata that does not describe a data image of `data_size` bytes.
    pub fn check_image(&self, _data_size: u64) -> Result<(), MetaError> {
        todo!()
    }
    pub fn superblock(&self) -> &Superblock {
        todo!()
    }
    /// Write `sb` (generation bumped) to sector 0 and sync the device.
    pub fn store_superblock(&mut self, _sb: Superblock) -> Result<(), MetaError> {
        todo!()
    }
    pub fn get(&mut self, _block: u64) -> Result<Pair, MetaError> {
        todo!()
    }
    pub fn set(&mut self, _block: u64, _pair: Pair) -> Result<(), MetaError> {
        todo!()
    }
    /// Write every dirty page to the device (no sync). Returns pages written.
    pub fn write_dirty(&mut self) -> Result<usize, MetaError> {
        todo!()
    }
    pub fn dirty_pages(&self) -> usize {
        todo!()
    }
    pub fn device(&self) -> &DeviceRef {
        todo!()
    }
}
