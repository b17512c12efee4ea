//! Storage in process memory: [`MemDevice`], a [`Device`], and
//! [`MemRegion`], a [`Region`]. Both are a byte vector behind a lock.
//!
//! The engine keeps an in-process stage in a `MemRegion`; tests and the
//! simulated volatile cache ([`super::volatile`]) use a `MemDevice` as the
//! durable image.

use std::io;
use std::sync::{Mutex, MutexGuard};

use super::{check_range, Device, Region};

/// A byte vector behind a lock, and the range-checked accesses the two
/// memory types share.
#[derive(Debug, Default)]
struct Bytes(Mutex<Vec<u8>>);

impl Bytes {
    fn new(bytes: Vec<u8>) -> Self {
        Self(Mutex::new(bytes))
    }

    fn lock(&self) -> MutexGuard<'_, Vec<u8>> {
        // A panic while holding the lock leaves plain bytes behind, which
        // are still a valid image: ignore the poisoning.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn len(&self) -> u64 {
        self.lock().len() as u64
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let bytes = self.lock();
        check_range(bytes.len() as u64, offset, buf.len() as u64)?;
        let at = offset as usize;
        buf.copy_from_slice(&bytes[at..at + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut bytes = self.lock();
        check_range(bytes.len() as u64, offset, buf.len() as u64)?;
        let at = offset as usize;
        bytes[at..at + buf.len()].copy_from_slice(buf);
        Ok(())
    }
}

/// A [`Device`] in memory: the simplest durable store.
///
/// `sync` is a no-op because every write is already "durable" here; wrap it
/// in a [`VolatileDevice`](super::volatile::VolatileDevice) to get a cache
/// that can lose writes.
#[derive(Debug, Default)]
pub struct MemDevice {
    bytes: Bytes,
}

impl MemDevice {
    /// A device of `size` zero bytes.
    pub fn new(size: u64) -> Self {
        Self::from_vec(vec![0; size as usize])
    }

    /// A device holding exactly `bytes`.
    pub fn from_vec(bytes: Vec<u8>) -> Self {
        Self {
            bytes: Bytes::new(bytes),
        }
    }

    /// A copy of the whole content.
    pub fn to_vec(&self) -> Vec<u8> {
        self.bytes.lock().clone()
    }
}

impl Device for MemDevice {
    fn size(&self) -> u64 {
        self.bytes.len()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.bytes.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.bytes.write_at(buf, offset)
    }

    fn sync(&self) -> io::Result<()> {
        Ok(())
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut bytes = self.bytes.lock();
        check_range(bytes.len() as u64, offset, len)?;
        let start = offset as usize;
        bytes[start..start + len as usize].fill(0);
        Ok(())
    }
}

/// A [`Region`] in process memory: lost with the process.
#[derive(Debug, Default)]
pub struct MemRegion {
    bytes: Bytes,
}

impl MemRegion {
    pub fn new(len: u64) -> Self {
        Self::from_vec(vec![0; len as usize])
    }

    pub fn from_vec(bytes: Vec<u8>) -> Self {
        Self {
            bytes: Bytes::new(bytes),
        }
    }

    /// A copy of the whole content.
    pub fn to_vec(&self) -> Vec<u8> {
        self.bytes.lock().clone()
    }
}

impl Region for MemRegion {
    fn len(&self) -> u64 {
        self.bytes.len()
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.bytes.write_at(buf, offset)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.bytes.read_at(buf, offset)
    }
}
