//! Access to the data and metadata devices.
//!
//! Everything above this module sees a [`Device`]: positioned reads and
//! writes, a durability barrier, and a way to make a range read as zeros.
//! The same trait carries real files and block devices ([`FileDevice`]),
//! memory ([`MemDevice`]) and the simulated volatile-cache disk of
//! `serve --volatile-cache` and the crash tests ([`volatile`]).
//! [`Region`]s are the byte stores of the write-back stage.

mod file;
mod mem;
mod pagebuf;
mod region;
pub mod volatile;

use std::io;

pub use file::{FileDevice, OpenFlags};
pub use mem::{MemDevice, MemRegion};
pub use pagebuf::PageBuf;
pub use region::{FileRegion, MappedFile, Region};

/// A byte-addressed device with a volatile write cache.
///
/// Writes may sit in a cache until [`Device::sync`] returns; a power cut can
/// keep or drop each un-synced 512-byte sector independently. Callers that
/// need ordering must sync.
pub trait Device: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Fill `buf` from `offset`; a range past the end is an error.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Write all of `buf` at `offset`; a range past the end is an error.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Make every completed write durable.
    fn sync(&self) -> io::Result<()>;
    /// Write all of `buf` at `offset` and make just that range durable,
    /// without waiting for the device's other un-synced writes (a metadata
    /// log record must not pay for every table page written meanwhile).
    /// Only this range is promised durable when it returns.
    fn write_durable(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_at(buf, offset)?;
        self.sync()
    }
    /// Make `len` bytes at `offset` read as zeros (hole punch, zero-out).
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Set storage aside for `len` bytes at `offset` without changing what
    /// they read as, so later writes there cannot run out of space and
    /// cost no block allocation when synced. Devices with nothing to set
    /// aside do nothing.
    fn reserve(&self, offset: u64, len: u64) -> io::Result<()> {
        check_range(self.size(), offset, len)
    }
    /// The first region at or after `offset` that may hold non-zero data,
    /// as `(start, end)`. Devices that cannot tell report everything as data.
    fn next_data(&self, offset: u64) -> io::Result<Option<(u64, u64)>> {
        let size = self.size();
        Ok((offset < size).then_some((offset, size)))
    }
}

/// Check that `len` bytes at `offset` lie inside a device of `size` bytes.
pub(crate) fn check_range(size: u64, offset: u64, len: u64) -> io::Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("range {offset}+{len} is past the end of the device ({size} bytes)"),
        )),
    }
}
