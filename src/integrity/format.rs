//! Formatting: fresh metadata for a data image, each block's pair set
//! from its content.
//!
//! A [`Formatter`] writes a superblock and an all-zero table, is handed the
//! image's data regions in block-aligned chunks ([`Formatter::add`]), and
//! [`finish`](Formatter::finish)es by making the table durable and marking
//! the superblock clean, the state an orderly stop of the engine leaves.
//! Blocks it is never given, and all-zero ones, keep the zero pair of the
//! fresh table (which verifies the all-zero block), so a caller skips the
//! holes of a sparse image: they cost no hashing and no table writes.
//! Every other block gets `(c, c)`.
//!
//! A format that does not finish — an error, a chunk never given — must
//! not leave a valid superblock over a table of blocks that were never
//! hashed, which would fail to verify: dropping an unfinished `Formatter`
//! wipes the superblock, so nothing opens the metadata.

use std::io;

use super::hash::{self, Checksum};
use crate::key::Key;
use crate::meta::{
    DeviceRef, MetaError, Metadata, Pair, Superblock, SuperblockError, HASH_BLAKE3_KEYED,
    SUPERBLOCK_SIZE,
};

/// Metadata pages cached while formatting: pairs are set in block order, so
/// a few pages suffice; write-back happens per chunk.
const CACHE_PAGES: usize = 64;

/// Why a format failed. Messages say what failed; causes are sources.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error(transparent)]
    Superblock(#[from] SuperblockError),
    #[error("{len} bytes at {offset} are not whole {block_size}-byte blocks")]
    Unaligned {
        offset: u64,
        len: usize,
        block_size: u64,
    },
    #[error("syncing the pair table")]
    Sync(#[source] io::Error),
}

/// A format in progress (see the module documentation).
pub struct Formatter {
    meta: Metadata,
    sum: Checksum,
    block_size: u64,
    hashed: u64,
    finished: bool,
}

/// What a finished format wrote.
#[derive(Debug, Clone)]
pub struct Formatted {
    pub superblock: Superblock,
    /// Blocks given a pair of their own (the others read as zeros).
    pub hashed: u64,
}

impl Formatter {
    /// Write a fresh superblock (a new random salt; keyed checksums if
    /// `key` is given) and an all-zero table on `dev`, for `data_size`
    /// bytes of data in `block_size`-byte blocks, with a metadata log of
    /// `log_size` bytes after the table (format version 2; 0: version 1,
    /// no log).
    pub fn create(
        dev: DeviceRef,
        block_size: u32,
        data_size: u64,
        key: Option<&Key>,
        log_size: u64,
    ) -> Result<Self, FormatError> {
        let mut sb = Superblock::new(block_size, data_size, rand::random())?;
        if log_size > 0 {
            sb = sb.with_log(log_size);
        }
        if key.is_some() {
            sb.hash_id = HASH_BLAKE3_KEYED;
        }
        let meta = Metadata::create_with(dev, sb, CACHE_PAGES, key)?;
        let sum = match Checksum::of(meta.superblock(), meta.key()) {
            Ok(sum) => sum,
            Err(e) => {
                wipe_superblock(meta.device());
                return Err(e.into());
            }
        };
        Ok(Self {
            meta,
            sum,
            block_size: u64::from(block_size),
            hashed: 0,
            finished: false,
        })
    }

    /// Bytes per block: every chunk given to [`add`](Self::add) is whole
    /// blocks at a block boundary.
    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// Record the content `data` at byte `offset`: `(c, c)` for each of
    /// its blocks that is not all zeros. Chunks in ascending order finish
    /// table pages in order, which are then written in large runs.
    pub fn add(&mut self, offset: u64, data: &[u8]) -> Result<(), FormatError> {
        let bs = self.block_size;
        if !offset.is_multiple_of(bs) || !(data.len() as u64).is_multiple_of(bs) {
            return Err(FormatError::Unaligned {
                offset,
                len: data.len(),
                block_size: bs,
            });
        }
        let first = offset / bs;
        for (i, block_data) in data.chunks_exact(bs as usize).enumerate() {
            if hash::is_zero(block_data) {
                continue;
            }
            let block = first + i as u64;
            let c = self.sum.block_hash(block, block_data);
            self.meta.set(block, Pair { new: c, old: c })?;
            self.hashed += 1;
        }
        // Write the pages now rather than one at a time on eviction.
        self.meta.write_dirty()?;
        Ok(())
    }

    /// Make the table durable, then mark the superblock clean.
    pub fn finish(mut self) -> Result<Formatted, FormatError> {
        self.meta.write_dirty()?;
        self.meta.device().sync().map_err(FormatError::Sync)?;
        let mut sb = self.meta.superblock().clone();
        sb.clean = true;
        self.meta.store_superblock(sb)?;
        self.finished = true;
        Ok(Formatted {
            superblock: self.meta.superblock().clone(),
            hashed: self.hashed,
        })
    }
}

impl Drop for Formatter {
    fn drop(&mut self) {
        if !self.finished {
            wipe_superblock(self.meta.device());
        }
    }
}

/// Make the metadata unopenable after a failed format; best effort, as
/// the format is failing already.
fn wipe_superblock(dev: &DeviceRef) {
    let wiped = dev
        .write_at(&[0u8; SUPERBLOCK_SIZE], 0)
        .and_then(|()| dev.sync());
    if let Err(e) = wiped {
        log::warn!("cannot wipe the superblock of the failed format: {e}");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::integrity::{Engine, EngineOptions};
    use crate::io::{Device, MemDevice};
    use crate::meta::meta_len;

    const BS: u32 = 4096;
    const BLOCKS: u64 = 40;

    fn devices() -> (Arc<MemDevice>, Arc<MemDevice>) {
        let data = Arc::new(MemDevice::new(BLOCKS * u64::from(BS)));
        let meta = Arc::new(MemDevice::new(meta_len(BLOCKS)));
        (data, meta)
    }

    #[test]
    fn a_format_pairs_every_written_block_and_leaves_zeros_to_the_zero_pair() {
        let (data, meta) = devices();
        let bs = u64::from(BS);
        for b in [1, 2, 17, BLOCKS - 1] {
            data.write_at(&vec![b as u8 + 1; BS as usize], b * bs)
                .unwrap();
        }
        let mut f = Formatter::create(meta.clone(), BS, data.size(), None, 0).unwrap();
        let image = data.to_vec();
        // Two chunks, the second one starting with an all-zero block.
        f.add(0, &image[..8 * bs as usize]).unwrap();
        f.add(8 * bs, &image[8 * bs as usize..]).unwrap();
        let done = f.finish().unwrap();
        assert_eq!(done.hashed, 4);
        assert!(done.superblock.clean);

        let mut m = Metadata::open(meta.clone(), 16).unwrap();
        assert!(m.superblock().clean, "marked clean on the device");
        let sum = Checksum::of(m.superblock(), None).unwrap();
        for b in 0..BLOCKS {
            let p = m.get(b).unwrap();
            let block = &image[(b * bs) as usize..((b + 1) * bs) as usize];
            if hash::is_zero(block) {
                assert_eq!(p, Pair::default(), "block {b} keeps the zero pair");
            } else {
                let c = sum.block_hash(b, block);
                assert_eq!(p, Pair { new: c, old: c }, "block {b}");
            }
        }
        let engine = Engine::open(data, meta, EngineOptions::default()).unwrap();
        assert!(engine.was_clean());
        let mut buf = vec![0; BS as usize];
        for b in 0..BLOCKS {
            engine.read(b, &mut buf).expect("every block verifies");
        }
    }

    #[test]
    fn an_unfinished_format_leaves_no_superblock() {
        let (data, meta) = devices();
        data.write_at(&[5; BS as usize], 0).unwrap();
        let mut f = Formatter::create(meta.clone(), BS, data.size(), None, 0).unwrap();
        f.add(0, &data.to_vec()[..BS as usize]).unwrap();
        assert!(
            f.add(100, &[0; 4096]).is_err(),
            "a chunk off the block grid is refused"
        );
        drop(f);
        assert!(matches!(
            Metadata::open(meta, 16),
            Err(MetaError::Superblock(SuperblockError::Magic(0)))
        ));
    }
}
