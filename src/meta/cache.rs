//! The pair table behind a bounded page cache (the role dm-bufio plays in
//! the kernel).
//!
//! Pages are 4096 bytes of the table (256 pairs). At most `cache_pages`
//! are in memory at once. Resident pages sit on one of two LRU lists, clean
//! or dirty, so that eviction prefers a clean page in O(1) and falls back to
//! writing the least recently used dirty page. Writing any page is always
//! safe: the engine keeps every in-memory pair safe to persist at any
//! instant; the caller's lock around `&mut self` orders page writes.

use std::collections::{BTreeMap, HashMap};

use super::log::{Log, LogWrite, Mark, Reserve};
use super::{
    meta_len, DeviceRef, MetaError, Superblock, SuperblockError, HASH_BLAKE3_KEYED, HASH_XXH3,
    PAGE_SIZE, PAIRS_PER_PAGE, PAIR_SIZE, SUPERBLOCK_SIZE, TABLE_OFFSET,
};
use crate::intmap::IntMap;
use crate::key::Key;

/// The two checksums of one block. 0 is the reserved "reads as zeros" value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pair {
    pub new: u64,
    pub old: u64,
}

impl Pair {
    /// The pair of a block that reads as zeros.
    pub const ZERO: Pair = Pair { new: 0, old: 0 };

    fn decode(bytes: &[u8]) -> Pair {
        // Callers pass 16-byte chunks; a short chunk reads as zeros rather
        // than panicking.
        let word = |c: Option<&[u8; 8]>| c.map_or(0, |w| u64::from_le_bytes(*w));
        Pair {
            new: word(bytes.first_chunk::<8>()),
            old: word(bytes.get(8..).and_then(|b| b.first_chunk::<8>())),
        }
    }

    fn encode(self, out: &mut [u8]) {
        if let Some(w) = out.get_mut(0..8) {
            w.copy_from_slice(&self.new.to_le_bytes());
        }
        if let Some(w) = out.get_mut(8..16) {
            w.copy_from_slice(&self.old.to_le_bytes());
        }
    }
}

/// Largest single device transfer of bulk reads and write-back (1 MiB).
const MAX_RUN_PAGES: u64 = 256;

/// Open metadata: the superblock plus a bounded cache of pair-table pages.
///
/// Not `Sync`: the engine holds it behind its own lock. Page writes happen
/// only inside `&mut self` calls, so callers serialise them; syncing the
/// device (`device().sync()`) can happen outside that lock.
pub struct Metadata {
    dev: DeviceRef,
    sb: Superblock,
    /// Seals the superblock of a keyed disk on every write; `None` for an
    /// unkeyed one (and for a keyed one opened only to look at it).
    key: Option<Key>,
    cache: PageCache,
    /// Reused buffer for bulk reads and coalesced write-back.
    scratch: Vec<u8>,
    /// Version 2: the metadata log, a region after the table.
    log: Option<Log>,
    /// Pairs the log holds that the table may not: read before the table
    /// until [`Metadata::recover`] folds them into it (read-only users
    /// never do, and never write).
    overlay: BTreeMap<u64, Pair>,
    /// Version 3: checksums beyond its pair that the log replay found for
    /// a block (its data may match any of them), until the engine resolves
    /// them from the data ([`Metadata::take_versions`]).
    versions: BTreeMap<u64, Vec<u64>>,
    replayed: LogReplay,
    /// One bit per table page: set if the page may hold data on the
    /// device. A clear bit is a page known to be a hole (it reads as the
    /// zero pair), answered without a read: on a huge sparse disk almost
    /// every miss is one.
    allocated: PageBits,
}

/// A bit per table page.
struct PageBits(Vec<u64>);

impl PageBits {
    fn get(&self, page: u64) -> bool {
        self.0
            .get((page / 64) as usize)
            .is_none_or(|w| w & (1 << (page % 64)) != 0)
    }

    fn set(&mut self, page: u64) {
        if let Some(w) = self.0.get_mut((page / 64) as usize) {
            *w |= 1 << (page % 64);
        }
    }

    /// Where the table's data regions are, from the device; a device that
    /// cannot tell reports all of it as data.
    fn of(dev: &DeviceRef, pages: u64) -> Result<Self, MetaError> {
        let mut bits = PageBits(vec![0; pages.div_ceil(64) as usize]);
        let table_end = TABLE_OFFSET + pages * PAGE_SIZE;
        let mut at = TABLE_OFFSET;
        while at < table_end {
            let Some((start, end)) = dev
                .next_data(at)
                .map_err(io_err("looking for holes in the pair table"))?
            else {
                break;
            };
            if start >= table_end {
                break;
            }
            let first = (start - TABLE_OFFSET) / PAGE_SIZE;
            let last = (end.min(table_end) - TABLE_OFFSET).div_ceil(PAGE_SIZE);
            if last - first == pages {
                bits.0.fill(u64::MAX);
                break;
            }
            for p in first..last {
                bits.set(p);
            }
            at = end.max(start + 1);
        }
        Ok(bits)
    }
}

/// What the log replay found at open.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogReplay {
    pub records: u64,
    pub entries: u64,
}

impl Metadata {
    /// Write a fresh superblock and an all-zero pair table (a hole in a
    /// sparse file), sync, and open it with at most `cache_pages` pages.
    pub fn create(dev: DeviceRef, sb: Superblock, cache_pages: usize) -> Result<Self, MetaError> {
        Self::create_with(dev, sb, cache_pages, None)
    }

    /// [`create`](Self::create) for a caller holding `key`: a keyed `sb`
    /// needs one, an unkeyed one refuses it.
    pub fn create_with(
        dev: DeviceRef,
        sb: Superblock,
        cache_pages: usize,
        key: Option<&Key>,
    ) -> Result<Self, MetaError> {
        match (sb.hash_id, key) {
            (HASH_XXH3, Some(_)) => return Err(SuperblockError::UnexpectedKey.into()),
            (HASH_BLAKE3_KEYED, None) => return Err(SuperblockError::KeyRequired.into()),
            _ => {}
        }
        let table_end = meta_len(sb.blocks);
        check_len(&dev, sb.meta_len())?;
        // Zero the table and make that durable before a valid superblock
        // can exist, so a crash mid-format never leaves a superblock over a
        // table of stale pairs.
        dev.zero_range(TABLE_OFFSET, table_end - TABLE_OFFSET)
            .map_err(io_err("zeroing the pair table"))?;
        reserve_table(&dev, sb.blocks)?;
        if sb.has_log() {
            // Written, not punched: a log in allocated, initialised blocks
            // makes each record's durable write a plain data write, with no
            // file system metadata to commit along with it. (The salt keeps
            // stale records of an earlier format from being replayed.)
            let zeros = vec![0u8; (1 << 20).min(sb.log_size as usize)];
            let mut at = 0;
            while at < sb.log_size {
                let n = (sb.log_size - at).min(zeros.len() as u64) as usize;
                dev.write_at(&zeros[..n], sb.log_offset + at)
                    .map_err(io_err("initialising the metadata log"))?;
                at += n as u64;
            }
        }
        dev.sync().map_err(io_err("syncing the pair table"))?;
        dev.write_at(&sb.encode_with(key), 0)
            .map_err(io_err("writing the superblock"))?;
        dev.sync().map_err(io_err("syncing the superblock"))?;
        Self::with_superblock(dev, sb, key, cache_pages)
    }

    /// Set aside the storage of the whole pair table (see
    /// [`reserve_table`]); for a writer opening metadata that an older
    /// format left sparse.
    pub fn reserve_table(&self) -> Result<(), MetaError> {
        reserve_table(&self.dev, self.sb.blocks)
    }

    /// Read and validate the superblock and the table length of an
    /// unkeyed disk.
    pub fn open(dev: DeviceRef, cache_pages: usize) -> Result<Self, MetaError> {
        Self::open_with(dev, cache_pages, None)
    }

    /// [`open`](Self::open) for a caller holding `key`: a keyed disk's
    /// superblock MAC is checked against it before anything else is read.
    pub fn open_with(
        dev: DeviceRef,
        cache_pages: usize,
        key: Option<&Key>,
    ) -> Result<Self, MetaError> {
        let sb = Superblock::decode_with(&read_superblock(&dev)?, key)?;
        check_len(&dev, sb.meta_len())?;
        Self::with_superblock(dev, sb, key, cache_pages)
    }

    /// Open without the key a keyed disk needs, only to look at it
    /// (`info`): its superblock MAC is not checked, and storing a
    /// superblock fails.
    pub fn open_unverified(dev: DeviceRef, cache_pages: usize) -> Result<Self, MetaError> {
        let sb = Superblock::decode_unverified(&read_superblock(&dev)?)?;
        check_len(&dev, sb.meta_len())?;
        Self::with_superblock(dev, sb, None, cache_pages)
    }

    /// Open with the log (if any) replayed into the overlay: what the pairs
    /// are, without writing anything.
    fn with_superblock(
        dev: DeviceRef,
        sb: Superblock,
        key: Option<&Key>,
        cache_pages: usize,
    ) -> Result<Self, MetaError> {
        let (log, overlay, versions, replay) = if sb.has_log() {
            let (log, r) = Log::open(
                &dev,
                sb.log_offset,
                sb.log_size,
                sb.salt,
                sb.log_seq,
                sb.log_pos,
            )?;
            let replay = LogReplay {
                records: r.records,
                entries: r.entries,
            };
            let versions = if sb.log_versions() {
                r.versions
            } else {
                BTreeMap::new()
            };
            (Some(log), r.pairs, versions, replay)
        } else {
            (None, BTreeMap::new(), BTreeMap::new(), LogReplay::default())
        };
        let pages = (meta_len(sb.blocks) - TABLE_OFFSET) / PAGE_SIZE;
        let allocated = PageBits::of(&dev, pages)?;
        Ok(Self {
            dev,
            sb,
            key: key.cloned(),
            cache: PageCache::new(cache_pages.max(1)),
            scratch: Vec::new(),
            log,
            overlay,
            versions,
            replayed: replay,
            allocated,
        })
    }

    /// What opening found in the log.
    pub fn log_replay(&self) -> LogReplay {
        self.replayed
    }

    /// Fold what the log replay found into the table (in the cache, dirty):
    /// for a writer, before anything else changes. A checkpoint then makes
    /// it durable and empties the log.
    pub fn recover(&mut self) -> Result<(), MetaError> {
        let overlay = std::mem::take(&mut self.overlay);
        for (&block, &pair) in &overlay {
            if let Err(e) = self.set(block, pair) {
                self.overlay = overlay;
                return Err(e);
            }
        }
        Ok(())
    }

    /// Whether the metadata has a log (format version 2).
    pub fn has_log(&self) -> bool {
        self.log.is_some()
    }

    /// Whether a log record may carry a block's versions beyond its pair
    /// (format version 3), so a block may be rewritten before a data sync.
    pub fn log_versions(&self) -> bool {
        self.log.is_some() && self.sb.log_versions()
    }

    /// Whether a record of `entries` entries fits in the log now.
    pub fn log_has_room(&self, entries: usize) -> bool {
        self.log.as_ref().is_some_and(|l| l.has_room(entries))
    }

    /// Checksums beyond its pair that block `block`'s data may match, as
    /// the log replay found them (`check`, which does not resolve them).
    pub fn extra_versions(&self, block: u64) -> &[u64] {
        self.versions.get(&block).map_or(&[], Vec::as_slice)
    }

    /// Every block with replayed extra versions.
    pub fn versions(&self) -> &BTreeMap<u64, Vec<u64>> {
        &self.versions
    }

    /// Hand the replayed extra versions to the caller that resolves them.
    pub fn take_versions(&mut self) -> BTreeMap<u64, Vec<u64>> {
        std::mem::take(&mut self.versions)
    }

    /// Set a pair where a read-only opener keeps it: in the overlay, never
    /// written.
    pub fn set_in_memory(&mut self, block: u64, pair: Pair) -> Result<(), MetaError> {
        self.check_block(block, 1)?;
        self.overlay.insert(block, pair);
        Ok(())
    }

    /// Where the next log record goes.
    pub fn log_mark(&self) -> Option<Mark> {
        self.log.as_ref().map(Log::mark)
    }

    /// Log bytes in use since the last checkpoint, and the log's size.
    pub fn log_usage(&self) -> Option<(u64, u64)> {
        self.log.as_ref().map(|l| (l.used(), l.size()))
    }

    /// Claim the next log record for `entries` (the pairs a commit round
    /// just set). The caller writes it durably, in sequence order, before
    /// the round's data moves.
    pub fn log_reserve(&mut self, entries: &[(u64, Pair)]) -> Option<Reserve> {
        self.log.as_mut().map(|l| l.reserve(entries))
    }

    /// A reserved record could not be written: give its place back if it
    /// was the last one claimed.
    pub fn log_unreserve(&mut self, w: &LogWrite) {
        if let Some(l) = self.log.as_mut() {
            l.unreserve(w);
        }
    }

    /// First half of a checkpoint: write every dirty page (no sync) and
    /// return where replay may start once the device is synced. `None`
    /// without a log.
    pub fn checkpoint_begin(&mut self) -> Result<Option<Mark>, MetaError> {
        self.write_dirty()?;
        Ok(self.log.as_ref().map(Log::mark))
    }

    /// The superblock a checkpoint at `mark` stores once the pages written
    /// by [`checkpoint_begin`](Self::checkpoint_begin) are durable.
    pub fn checkpoint_superblock(&self, mark: Mark) -> Superblock {
        let mut sb = self.sb.clone();
        if let Some(l) = &self.log {
            sb.log_seq = mark.seq;
            sb.log_pos = l.position_of(mark);
        }
        sb
    }

    /// The checkpoint's superblock is stored: its log space may be reused.
    pub fn checkpoint_done(&mut self, mark: Mark) {
        if let Some(l) = self.log.as_mut() {
            l.checkpointed(mark);
        }
    }

    /// Refuse metadata that does not describe a data image of `data_size` bytes.
    pub fn check_image(&self, data_size: u64) -> Result<(), MetaError> {
        if self.sb.data_size != data_size {
            return Err(MetaError::WrongImage {
                meta_size: self.sb.data_size,
                data_size,
            });
        }
        Ok(())
    }

    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }

    /// The key the superblock was verified with, if any.
    pub fn key(&self) -> Option<&Key> {
        self.key.as_ref()
    }

    /// Number of blocks the table describes.
    pub fn blocks(&self) -> u64 {
        self.sb.blocks
    }

    /// Write `sb` (generation bumped) to sector 0 and sync the device.
    pub fn store_superblock(&mut self, mut sb: Superblock) -> Result<(), MetaError> {
        debug_assert_eq!(
            (sb.block_size, sb.blocks, sb.salt, sb.hash_id),
            (
                self.sb.block_size,
                self.sb.blocks,
                self.sb.salt,
                self.sb.hash_id
            ),
            "the geometry of open metadata cannot change"
        );
        if sb.hash_id == HASH_BLAKE3_KEYED && self.key.is_none() {
            // Opened unverified: a superblock without its MAC would lock
            // the disk's owner out.
            return Err(SuperblockError::KeyRequired.into());
        }
        sb.generation = sb.generation.max(self.sb.generation) + 1;
        self.dev
            .write_durable(&sb.encode_with(self.key.as_ref()), 0)
            .map_err(io_err("writing the superblock"))?;
        self.sb = sb;
        Ok(())
    }

    pub fn get(&mut self, block: u64) -> Result<Pair, MetaError> {
        self.check_block(block, 1)?;
        if let Some(p) = self.overlay.get(&block) {
            return Ok(*p);
        }
        let slot = self.page_in(block / PAIRS_PER_PAGE)?;
        Ok(Pair::decode(self.cache.pair_bytes(slot, block)))
    }

    pub fn set(&mut self, block: u64, pair: Pair) -> Result<(), MetaError> {
        self.check_block(block, 1)?;
        if !self.overlay.is_empty() {
            self.overlay.remove(&block);
        }
        let slot = self.page_in(block / PAIRS_PER_PAGE)?;
        pair.encode(self.cache.pair_bytes_mut(slot, block));
        self.cache.mark_dirty(slot);
        Ok(())
    }

    /// Read the pairs of `out.len()` blocks from `first_block` on.
    ///
    /// Cached pages (dirty ones included) are served from memory. Runs of
    /// uncached pages are read with one device read each; a run that would
    /// fill more than a quarter of the cache is not cached, so a full-table
    /// scan (`check`) cannot flush the working set.
    pub fn get_range(&mut self, first_block: u64, out: &mut [Pair]) -> Result<(), MetaError> {
        self.check_block(first_block, out.len() as u64)?;
        let mut done = 0usize;
        while done < out.len() {
            let block = first_block + done as u64;
            let page = block / PAIRS_PER_PAGE;
            let last_page = (first_block + out.len() as u64 - 1) / PAIRS_PER_PAGE;
            let n = if let Some(slot) = self.cache.lookup(page) {
                self.copy_cached(slot, block, &mut out[done..])
            } else {
                let run = self.uncached_run(page, last_page);
                self.read_run(page, run, block, &mut out[done..])?
            };
            done += n;
        }
        let end = first_block + out.len() as u64;
        for (&b, &p) in self.overlay.range(first_block..end) {
            out[(b - first_block) as usize] = p;
        }
        Ok(())
    }

    /// Store the pairs of `pairs.len()` blocks from `first_block` on.
    pub fn set_range(&mut self, first_block: u64, pairs: &[Pair]) -> Result<(), MetaError> {
        self.check_block(first_block, pairs.len() as u64)?;
        let mut done = 0usize;
        while done < pairs.len() {
            let block = first_block + done as u64;
            let slot = self.page_in(block / PAIRS_PER_PAGE)?;
            let in_page = (PAIRS_PER_PAGE - block % PAIRS_PER_PAGE) as usize;
            let n = in_page.min(pairs.len() - done);
            let start = (block % PAIRS_PER_PAGE * PAIR_SIZE) as usize;
            let bytes = &mut self.cache.data_mut(slot)[start..start + n * PAIR_SIZE as usize];
            for (p, chunk) in pairs[done..done + n]
                .iter()
                .zip(bytes.chunks_exact_mut(PAIR_SIZE as usize))
            {
                p.encode(chunk);
            }
            self.cache.mark_dirty(slot);
            done += n;
        }
        Ok(())
    }

    /// Write every dirty page to the device (no sync). Returns pages written.
    ///
    /// Adjacent dirty pages go out in one write of up to 1 MiB.
    pub fn write_dirty(&mut self) -> Result<usize, MetaError> {
        let mut keyed: Vec<(u64, usize)> = self
            .cache
            .dirty_slots()
            .into_iter()
            .map(|s| (self.cache.page_of(s), s))
            .collect();
        keyed.sort_unstable();
        let mut written = 0;
        for run in keyed.chunk_by(|a, b| a.0 + 1 == b.0) {
            for chunk in run.chunks(MAX_RUN_PAGES as usize) {
                let slots: Vec<usize> = chunk.iter().map(|&(_, s)| s).collect();
                self.write_run(&slots)?;
                written += slots.len();
            }
        }
        Ok(written)
    }

    /// How many blocks from `first_block` on (at most `max`) are known to
    /// hold the zero pair without reading them: their table pages are a
    /// hole on the device and not in the cache. 0 when that is not known,
    /// e.g. on a device that cannot report holes. Lets a scan of a huge
    /// sparse table skip the hole instead of reading zeros.
    pub fn zero_run(&mut self, first_block: u64, max: u64) -> Result<u64, MetaError> {
        self.check_block(first_block, max.min(1))?;
        let max = max.min(self.sb.blocks - first_block);
        let page = first_block / PAIRS_PER_PAGE;
        if max == 0 || self.cache.contains(page) {
            return Ok(0);
        }
        let offset = page_offset(page);
        let hole_end = match self
            .dev
            .next_data(offset)
            .map_err(io_err("looking for holes in the pair table"))?
        {
            Some((data, _)) => data,
            None => self.dev.size(),
        };
        // Whole pages of hole only, and none that the cache holds (a
        // cached page may carry pairs not yet written back).
        let mut hole_pages = hole_end.saturating_sub(offset) / PAGE_SIZE;
        if let Some(cached) = self.cache.first_resident_after(page) {
            hole_pages = hole_pages.min(cached - page);
        }
        let mut run = (hole_pages * PAIRS_PER_PAGE)
            .saturating_sub(first_block % PAIRS_PER_PAGE)
            .min(max);
        // A pair the log replay holds is not in the hole.
        if let Some((&b, _)) = self.overlay.range(first_block..first_block + run).next() {
            run = b - first_block;
        }
        Ok(run)
    }

    pub fn dirty_pages(&self) -> usize {
        self.cache.dirty.len
    }

    /// Pages currently held in memory (never more than `cache_pages`).
    pub fn cached_pages(&self) -> usize {
        self.cache.index.len()
    }

    pub fn device(&self) -> &DeviceRef {
        &self.dev
    }

    fn check_block(&self, first: u64, count: u64) -> Result<(), MetaError> {
        match first.checked_add(count) {
            Some(end) if end <= self.sb.blocks => Ok(()),
            _ => Err(MetaError::OutOfRange {
                block: first.saturating_add(count.saturating_sub(1)),
                blocks: self.sb.blocks,
            }),
        }
    }

    /// The slot holding `page`, reading it from the device if needed.
    fn page_in(&mut self, page: u64) -> Result<usize, MetaError> {
        if let Some(slot) = self.cache.lookup(page) {
            return Ok(slot);
        }
        let slot = self.free_slot()?;
        if !self.allocated.get(page) {
            // Known to be a hole: it reads as zeros (Pair::ZERO) anyway.
            self.cache.data_mut(slot).fill(0);
        } else if let Err(e) = self
            .dev
            .read_at(self.cache.data_mut(slot), page_offset(page))
        {
            self.cache.release(slot);
            return Err(io_err("reading a pair-table page")(e));
        }
        self.cache.install(slot, page);
        Ok(slot)
    }

    /// A slot not holding any page: a new one while under capacity, else
    /// the evicted least recently used page, clean ones first.
    fn free_slot(&mut self) -> Result<usize, MetaError> {
        if let Some(slot) = self.cache.spare() {
            return Ok(slot);
        }
        let slot = self.cache.victim();
        if self.cache.is_dirty(slot) {
            self.write_run(&[slot])?;
        }
        self.cache.evict(slot);
        Ok(slot)
    }

    /// Write the dirty pages in `slots` (consecutive page numbers) in one
    /// device write, then mark them clean.
    fn write_run(&mut self, slots: &[usize]) -> Result<(), MetaError> {
        let Some(&first) = slots.first() else {
            return Ok(());
        };
        let offset = page_offset(self.cache.page_of(first));
        for &s in slots {
            let page = self.cache.page_of(s);
            self.allocated.set(page);
        }
        if let [only] = slots {
            self.dev
                .write_at(self.cache.data(*only), offset)
                .map_err(io_err("writing a pair-table page"))?;
        } else {
            self.scratch.clear();
            for &s in slots {
                self.scratch.extend_from_slice(self.cache.data(s));
            }
            self.dev
                .write_at(&self.scratch, offset)
                .map_err(io_err("writing pair-table pages"))?;
        }
        for &s in slots {
            self.cache.mark_clean(s);
        }
        Ok(())
    }

    /// Copy pairs from the cached page in `slot`, starting at `block`.
    /// Returns how many were copied (up to the end of the page).
    fn copy_cached(&mut self, slot: usize, block: u64, out: &mut [Pair]) -> usize {
        self.cache.touch(slot);
        let start = (block % PAIRS_PER_PAGE * PAIR_SIZE) as usize;
        let n = ((PAIRS_PER_PAGE - block % PAIRS_PER_PAGE) as usize).min(out.len());
        let bytes = &self.cache.data(slot)[start..start + n * PAIR_SIZE as usize];
        decode_into(bytes, &mut out[..n]);
        n
    }

    /// Number of consecutive uncached pages from `page` on, up to
    /// `last_page` and at most one maximal transfer.
    /// Pages in such a run are either all known holes or all possibly
    /// data, so that a run of holes costs no read.
    fn uncached_run(&self, page: u64, last_page: u64) -> u64 {
        let limit = (last_page - page + 1).min(MAX_RUN_PAGES);
        let hole = !self.allocated.get(page);
        (1..limit)
            .find(|&i| self.cache.contains(page + i) || self.allocated.get(page + i) == hole)
            .unwrap_or(limit)
    }

    /// Read `run` uncached pages from `page` in one device read and decode
    /// the pairs from `block` on. Returns how many pairs were decoded.
    fn read_run(
        &mut self,
        page: u64,
        run: u64,
        block: u64,
        out: &mut [Pair],
    ) -> Result<usize, MetaError> {
        let len = (run * PAGE_SIZE) as usize;
        let start = (block % PAIRS_PER_PAGE * PAIR_SIZE) as usize;
        if !self.allocated.get(page) {
            // Known holes: zero pairs, with no read and nothing cached (a
            // page that is written later is paged in then).
            let n = ((len - start) / PAIR_SIZE as usize).min(out.len());
            out[..n].fill(Pair::ZERO);
            return Ok(n);
        }
        self.scratch.clear();
        self.scratch.resize(len, 0);
        self.dev
            .read_at(&mut self.scratch, page_offset(page))
            .map_err(io_err("reading pair-table pages"))?;
        let n = ((len - start) / PAIR_SIZE as usize).min(out.len());
        decode_into(
            &self.scratch[start..start + n * PAIR_SIZE as usize],
            &mut out[..n],
        );
        if run as usize <= self.cache.capacity / 4 {
            self.cache_run(page, run)?;
        }
        Ok(n)
    }

    /// Insert the pages just read into `scratch` into the cache.
    fn cache_run(&mut self, page: u64, run: u64) -> Result<(), MetaError> {
        let mut bytes = std::mem::take(&mut self.scratch);
        let result = (0..run).try_for_each(|i| {
            let slot = self.free_slot()?;
            let at = (i * PAGE_SIZE) as usize;
            self.cache
                .data_mut(slot)
                .copy_from_slice(&bytes[at..at + PAGE_SIZE as usize]);
            self.cache.install(slot, page + i);
            Ok(())
        });
        // free_slot may have used scratch for write-back; keep the larger.
        if bytes.capacity() >= self.scratch.capacity() {
            bytes.clear();
            self.scratch = bytes;
        }
        result
    }
}

fn decode_into(bytes: &[u8], out: &mut [Pair]) {
    for (p, chunk) in out.iter_mut().zip(bytes.chunks_exact(PAIR_SIZE as usize)) {
        *p = Pair::decode(chunk);
    }
}

fn page_offset(page: u64) -> u64 {
    TABLE_OFFSET + page * PAGE_SIZE
}

/// Sector 0 of `dev`.
fn read_superblock(dev: &DeviceRef) -> Result<[u8; SUPERBLOCK_SIZE], MetaError> {
    // A device shorter than a sector is read as far as it goes: garbage
    // then fails on the magic, which names the problem better than a
    // length would; a cut-off superblock fails the caller's length check.
    let mut sector = [0u8; SUPERBLOCK_SIZE];
    let have = dev.size().min(SUPERBLOCK_SIZE as u64) as usize;
    dev.read_at(&mut sector[..have], 0)
        .map_err(io_err("reading the superblock"))?;
    Ok(sector)
}

/// Set aside the storage of the pair table of `blocks` blocks. A sparse
/// table allocates a block for every page it writes, at the next sync: on
/// a file system with little room that sync can fail (ENOSPC) long after
/// the write was accepted, and on a 1 TiB disk a checkpoint spends seconds
/// in the allocator. The table still reads as zeros and as holes.
fn reserve_table(dev: &DeviceRef, blocks: u64) -> Result<(), MetaError> {
    dev.reserve(TABLE_OFFSET, meta_len(blocks) - TABLE_OFFSET)
        .map_err(io_err("reserving space for the pair table"))
}

fn check_len(dev: &DeviceRef, need: u64) -> Result<(), MetaError> {
    let have = dev.size();
    if have < need {
        return Err(MetaError::Truncated { have, need });
    }
    Ok(())
}

fn io_err(what: &'static str) -> impl Fn(std::io::Error) -> MetaError {
    move |source| MetaError::Io {
        what,
        source: std::sync::Arc::new(source),
    }
}

/// "No slot" in the intrusive lists.
const NIL: usize = usize::MAX;

struct Slot {
    page: u64,
    data: Box<[u8]>,
    dirty: bool,
    /// Whether the slot holds a page (is on a list and in the index).
    resident: bool,
    prev: usize,
    next: usize,
}

/// An intrusive doubly linked list over slot indices: head is the least
/// recently used end.
#[derive(Clone, Copy)]
struct List {
    head: usize,
    tail: usize,
    len: usize,
}

impl List {
    const EMPTY: List = List {
        head: NIL,
        tail: NIL,
        len: 0,
    };
}

/// Slots, the page index and the two LRU lists. Knows nothing of devices.
struct PageCache {
    capacity: usize,
    slots: Vec<Slot>,
    index: IntMap<usize>,
    clean: List,
    dirty: List,
    /// Slots allocated but not resident (after a failed page-in).
    spare: Vec<usize>,
    /// The last page looked up: sequential get/set skip the hash lookup.
    last: Option<(u64, usize)>,
}

impl PageCache {
    fn new(capacity: usize) -> Self {
        Self {
            capacity,
            slots: Vec::new(),
            index: HashMap::default(),
            clean: List::EMPTY,
            dirty: List::EMPTY,
            spare: Vec::new(),
            last: None,
        }
    }

    fn contains(&self, page: u64) -> bool {
        self.index.contains_key(&page)
    }

    /// The lowest resident page above `page`. O(resident pages): meant for
    /// scans, which use a small cache.
    fn first_resident_after(&self, page: u64) -> Option<u64> {
        self.index.keys().copied().filter(|&p| p > page).min()
    }

    /// The slot of a resident page, marked most recently used.
    fn lookup(&mut self, page: u64) -> Option<usize> {
        let slot = match self.last {
            Some((p, s)) if p == page => s,
            _ => *self.index.get(&page)?,
        };
        self.last = Some((page, slot));
        self.touch(slot);
        Some(slot)
    }

    /// A non-resident slot if the cache is not full.
    fn spare(&mut self) -> Option<usize> {
        if let Some(slot) = self.spare.pop() {
            return Some(slot);
        }
        if self.slots.len() >= self.capacity {
            return None;
        }
        self.slots.push(Slot {
            page: 0,
            data: vec![0u8; PAGE_SIZE as usize].into_boxed_slice(),
            dirty: false,
            resident: false,
            prev: NIL,
            next: NIL,
        });
        Some(self.slots.len() - 1)
    }

    /// The page to evict: the least recently used clean page, else the
    /// least recently used dirty one. Only called when the cache is full.
    fn victim(&self) -> usize {
        if self.clean.head != NIL {
            self.clean.head
        } else {
            self.dirty.head
        }
    }

    fn evict(&mut self, slot: usize) {
        self.unlink(slot);
        let page = self.slots[slot].page;
        self.index.remove(&page);
        self.slots[slot].resident = false;
        if self.last.is_some_and(|(_, s)| s == slot) {
            self.last = None;
        }
    }

    /// Give back a slot that never became resident.
    fn release(&mut self, slot: usize) {
        self.spare.push(slot);
    }

    /// Make `slot` (filled with `page`'s bytes) resident and clean.
    fn install(&mut self, slot: usize, page: u64) {
        let s = &mut self.slots[slot];
        s.page = page;
        s.dirty = false;
        s.resident = true;
        self.index.insert(page, slot);
        self.push_mru(slot);
    }

    fn touch(&mut self, slot: usize) {
        let list = self.list(slot);
        if list.tail != slot {
            self.unlink(slot);
            self.push_mru(slot);
        }
    }

    fn mark_dirty(&mut self, slot: usize) {
        if !self.slots[slot].dirty {
            self.unlink(slot);
            self.slots[slot].dirty = true;
            self.push_mru(slot);
        }
    }

    fn mark_clean(&mut self, slot: usize) {
        if self.slots[slot].dirty {
            self.unlink(slot);
            self.slots[slot].dirty = false;
            self.push_mru(slot);
        }
    }

    fn is_dirty(&self, slot: usize) -> bool {
        self.slots[slot].dirty
    }

    fn page_of(&self, slot: usize) -> u64 {
        self.slots[slot].page
    }

    fn dirty_slots(&self) -> Vec<usize> {
        let mut out = Vec::with_capacity(self.dirty.len);
        let mut s = self.dirty.head;
        while s != NIL {
            out.push(s);
            s = self.slots[s].next;
        }
        out
    }

    fn data(&self, slot: usize) -> &[u8] {
        &self.slots[slot].data
    }

    fn data_mut(&mut self, slot: usize) -> &mut [u8] {
        &mut self.slots[slot].data
    }

    fn pair_bytes(&self, slot: usize, block: u64) -> &[u8] {
        let at = (block % PAIRS_PER_PAGE * PAIR_SIZE) as usize;
        &self.slots[slot].data[at..at + PAIR_SIZE as usize]
    }

    fn pair_bytes_mut(&mut self, slot: usize, block: u64) -> &mut [u8] {
        let at = (block % PAIRS_PER_PAGE * PAIR_SIZE) as usize;
        &mut self.slots[slot].data[at..at + PAIR_SIZE as usize]
    }

    fn list(&self, slot: usize) -> List {
        if self.slots[slot].dirty {
            self.dirty
        } else {
            self.clean
        }
    }

    fn list_mut(&mut self, slot: usize) -> &mut List {
        if self.slots[slot].dirty {
            &mut self.dirty
        } else {
            &mut self.clean
        }
    }

    fn unlink(&mut self, slot: usize) {
        let (prev, next) = (self.slots[slot].prev, self.slots[slot].next);
        if prev != NIL {
            self.slots[prev].next = next;
        }
        if next != NIL {
            self.slots[next].prev = prev;
        }
        let list = self.list_mut(slot);
        if list.head == slot {
            list.head = next;
        }
        if list.tail == slot {
            list.tail = prev;
        }
        list.len -= 1;
        self.slots[slot].prev = NIL;
        self.slots[slot].next = NIL;
    }

    fn push_mru(&mut self, slot: usize) {
        let list = self.list_mut(slot);
        let old_tail = list.tail;
        list.tail = slot;
        if list.head == NIL {
            list.head = slot;
        }
        list.len += 1;
        self.slots[slot].prev = old_tail;
        self.slots[slot].next = NIL;
        if old_tail != NIL {
            self.slots[old_tail].next = slot;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::io::Device;

    /// An in-memory device that records writes and counts syncs.
    struct RecordingDevice {
        inner: crate::io::MemDevice,
        writes: Mutex<Vec<(u64, usize)>>,
        syncs: Mutex<usize>,
    }

    impl RecordingDevice {
        fn new(size: u64) -> Arc<Self> {
            Arc::new(Self {
                inner: crate::io::MemDevice::new(size),
                writes: Mutex::new(Vec::new()),
                syncs: Mutex::new(0),
            })
        }

        fn bytes(&self) -> Vec<u8> {
            self.inner.to_vec()
        }

        fn writes(&self) -> Vec<(u64, usize)> {
            self.writes.lock().unwrap().clone()
        }

        /// The pair of `block` as stored on the device (not the cache).
        fn stored_pair(&self, block: u64) -> Pair {
            let at = (TABLE_OFFSET + block * PAIR_SIZE) as usize;
            Pair::decode(&self.bytes()[at..at + 16])
        }
    }

    impl Device for RecordingDevice {
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.inner.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            self.inner.write_at(buf, offset)?;
            self.writes.lock().unwrap().push((offset, buf.len()));
            Ok(())
        }
        fn sync(&self) -> io::Result<()> {
            *self.syncs.lock().unwrap() += 1;
            Ok(())
        }
        fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
            self.inner.zero_range(offset, len)
        }
    }

    const BLOCKS: u64 = 10 * PAIRS_PER_PAGE + 17;

    fn fresh(cache_pages: usize) -> (Arc<RecordingDevice>, Metadata) {
        let dev = RecordingDevice::new(meta_len(BLOCKS));
        let sb = Superblock::new(4096, BLOCKS * 4096, 42).unwrap();
        let meta = Metadata::create(dev.clone(), sb, cache_pages).unwrap();
        (dev, meta)
    }

    fn pair_for(block: u64) -> Pair {
        Pair {
            new: block * 3 + 1,
            old: block ^ 0xabcd,
        }
    }

    #[test]
    fn create_writes_a_superblock_that_open_accepts() {
        let (dev, meta) = fresh(4);
        assert!(*dev.syncs.lock().unwrap() >= 1);
        let reopened = Metadata::open(dev, 4).unwrap();
        assert_eq!(reopened.superblock(), meta.superblock());
        assert_eq!(reopened.blocks(), BLOCKS);
    }

    #[test]
    fn create_zeroes_a_stale_table() {
        let dev = RecordingDevice::new(meta_len(BLOCKS));
        dev.write_at(&[0xff; 64], TABLE_OFFSET).unwrap();
        let sb = Superblock::new(4096, BLOCKS * 4096, 1).unwrap();
        let mut meta = Metadata::create(dev, sb, 2).unwrap();
        assert_eq!(meta.get(0).unwrap(), Pair::ZERO);
        assert_eq!(meta.get(3).unwrap(), Pair::ZERO);
    }

    #[test]
    fn tiny_cache_keeps_every_value_through_eviction() {
        let (_dev, mut meta) = fresh(2);
        for b in (0..BLOCKS).step_by(7) {
            meta.set(b, pair_for(b)).unwrap();
            assert!(meta.cached_pages() <= 2);
        }
        for b in (0..BLOCKS).rev() {
            let want = if b % 7 == 0 { pair_for(b) } else { Pair::ZERO };
            assert_eq!(meta.get(b).unwrap(), want, "block {b}");
            assert!(meta.cached_pages() <= 2);
        }
    }

    #[test]
    fn dirty_page_is_written_when_evicted() {
        let (dev, mut meta) = fresh(1);
        meta.set(5, pair_for(5)).unwrap();
        assert_eq!(dev.stored_pair(5), Pair::ZERO, "set must not write through");
        // Touching another page evicts the only (dirty) one.
        meta.get(PAIRS_PER_PAGE * 3).unwrap();
        assert_eq!(dev.stored_pair(5), pair_for(5));
        assert_eq!(meta.dirty_pages(), 0);
    }

    #[test]
    fn eviction_prefers_clean_pages() {
        let (dev, mut meta) = fresh(3);
        meta.set(0, pair_for(0)).unwrap(); // page 0 dirty, oldest
        meta.get(PAIRS_PER_PAGE).unwrap(); // page 1 clean
        meta.get(2 * PAIRS_PER_PAGE).unwrap(); // page 2 clean
        let before = dev.writes().len();
        meta.get(3 * PAIRS_PER_PAGE).unwrap(); // evicts page 1, not page 0
        assert_eq!(dev.writes().len(), before, "no write-back needed");
        assert_eq!(meta.dirty_pages(), 1);
        assert_eq!(dev.stored_pair(0), Pair::ZERO);
    }

    #[test]
    fn write_dirty_persists_and_clears_dirty_bits() {
        let (dev, mut meta) = fresh(8);
        for b in [1, PAIRS_PER_PAGE + 2, 5 * PAIRS_PER_PAGE] {
            meta.set(b, pair_for(b)).unwrap();
        }
        assert_eq!(meta.dirty_pages(), 3);
        let before = dev.writes().len();
        assert_eq!(meta.write_dirty().unwrap(), 3);
        assert_eq!(meta.dirty_pages(), 0);
        // Pages 0 and 1 are adjacent: two writes, not three.
        let new_writes = &dev.writes()[before..];
        assert_eq!(
            new_writes,
            &[(TABLE_OFFSET, 8192), (TABLE_OFFSET + 5 * 4096, 4096)]
        );
        for b in [1, PAIRS_PER_PAGE + 2, 5 * PAIRS_PER_PAGE] {
            assert_eq!(dev.stored_pair(b), pair_for(b));
        }
        assert_eq!(meta.write_dirty().unwrap(), 0);
    }

    #[test]
    fn values_survive_reopen_after_write_dirty() {
        let (dev, mut meta) = fresh(3);
        let pairs: Vec<Pair> = (0..BLOCKS).map(pair_for).collect();
        meta.set_range(0, &pairs).unwrap();
        meta.write_dirty().unwrap();
        let mut again = Metadata::open(dev, 5).unwrap();
        let mut out = vec![Pair::ZERO; BLOCKS as usize];
        again.get_range(0, &mut out).unwrap();
        assert_eq!(out, pairs);
    }

    #[test]
    fn get_range_sees_dirty_cached_pages_and_device_pages() {
        let (dev, mut meta) = fresh(16);
        let pairs: Vec<Pair> = (0..BLOCKS).map(pair_for).collect();
        meta.set_range(0, &pairs).unwrap();
        meta.write_dirty().unwrap();
        // A new value only in the cache, in the middle of a bulk range.
        let changed = Pair { new: 9, old: 9 };
        meta.set(4 * PAIRS_PER_PAGE + 3, changed).unwrap();
        let mut fresh_view = Metadata::open(dev, 16).unwrap();
        let mut out = vec![Pair::ZERO; 1000];
        meta.get_range(100, &mut out).unwrap();
        for (i, p) in out.iter().enumerate() {
            let b = 100 + i as u64;
            let want = if b == 4 * PAIRS_PER_PAGE + 3 {
                changed
            } else {
                pair_for(b)
            };
            assert_eq!(*p, want, "block {b}");
        }
        fresh_view.get_range(100, &mut out).unwrap();
        assert_eq!(out[0], pair_for(100));
    }

    #[test]
    fn bulk_scan_does_not_flush_the_cache() {
        let (_dev, mut meta) = fresh(4);
        meta.set(0, pair_for(0)).unwrap();
        let mut out = vec![Pair::ZERO; (BLOCKS - PAIRS_PER_PAGE) as usize];
        meta.get_range(PAIRS_PER_PAGE, &mut out).unwrap();
        assert_eq!(meta.cached_pages(), 1);
        assert_eq!(meta.dirty_pages(), 1);
    }

    #[test]
    fn truncated_table_is_refused() {
        let (dev, _meta) = fresh(2);
        let short = RecordingDevice::new(meta_len(BLOCKS) - 4096);
        short
            .write_at(&dev.bytes()[..(meta_len(BLOCKS) - 4096) as usize], 0)
            .unwrap();
        match Metadata::open(short, 2) {
            Err(MetaError::Truncated { have, need }) => {
                assert_eq!((have, need), (meta_len(BLOCKS) - 4096, meta_len(BLOCKS)));
            }
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("opened a truncated table"),
        }
    }

    #[test]
    fn tiny_garbage_file_is_bad_magic_not_truncated() {
        let dev = RecordingDevice::new(8);
        dev.write_at(b"garbage\n", 0).unwrap();
        assert!(matches!(
            Metadata::open(dev, 1),
            Err(MetaError::Superblock(crate::meta::SuperblockError::Magic(
                _
            )))
        ));
    }

    #[test]
    fn cut_off_superblock_is_truncated() {
        let (dev, _meta) = fresh(1);
        let short = RecordingDevice::new(100);
        short.write_at(&dev.bytes()[..100], 0).unwrap();
        assert!(matches!(
            Metadata::open(short, 1),
            Err(MetaError::Truncated { have: 100, .. })
        ));
    }

    #[test]
    fn create_on_a_short_device_is_refused() {
        let dev = RecordingDevice::new(4096);
        let sb = Superblock::new(512, 512 * 1000, 1).unwrap();
        assert!(matches!(
            Metadata::create(dev, sb, 1),
            Err(MetaError::Truncated { .. })
        ));
    }

    #[test]
    fn garbage_superblock_is_bad_magic() {
        let dev = RecordingDevice::new(meta_len(4));
        dev.write_at(b"garbage!", 0).unwrap();
        assert!(matches!(
            Metadata::open(dev, 1),
            Err(MetaError::Superblock(crate::meta::SuperblockError::Magic(
                _
            )))
        ));
    }

    #[test]
    fn check_image_refuses_another_size() {
        let (_dev, meta) = fresh(1);
        assert!(meta.check_image(BLOCKS * 4096).is_ok());
        assert!(matches!(
            meta.check_image(BLOCKS * 4096 + 4096),
            Err(MetaError::WrongImage { .. })
        ));
    }

    #[test]
    fn store_superblock_bumps_generation_and_syncs() {
        let (dev, mut meta) = fresh(1);
        let syncs = *dev.syncs.lock().unwrap();
        let mut sb = meta.superblock().clone();
        sb.clean = true;
        meta.store_superblock(sb).unwrap();
        assert_eq!(meta.superblock().generation, 1);
        assert_eq!(*dev.syncs.lock().unwrap(), syncs + 1);
        let reopened = Metadata::open(dev, 1).unwrap();
        assert!(reopened.superblock().clean);
        assert_eq!(reopened.superblock().generation, 1);
    }

    #[test]
    fn blocks_past_the_end_are_refused() {
        let (_dev, mut meta) = fresh(1);
        assert!(matches!(
            meta.get(BLOCKS),
            Err(MetaError::OutOfRange { .. })
        ));
        assert!(meta.set(BLOCKS - 1, pair_for(1)).is_ok());
        let mut out = [Pair::ZERO; 2];
        assert!(matches!(
            meta.get_range(BLOCKS - 1, &mut out),
            Err(MetaError::OutOfRange { .. })
        ));
    }

    #[test]
    fn random_operations_match_a_model() {
        let (dev, meta) = fresh(3);
        let model = run_model(meta);
        for (b, p) in model {
            assert_eq!(dev.stored_pair(b), p);
        }
    }

    #[test]
    fn random_operations_match_a_model_on_a_sparse_file() {
        // A real file reports holes, so zero_run has something to skip.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta");
        let dev = crate::io::FileDevice::create(&path, meta_len(BLOCKS), false, false).unwrap();
        let sb = Superblock::new(4096, BLOCKS * 4096, 42).unwrap();
        let meta = Metadata::create(Arc::new(dev), sb, 3).unwrap();
        let model = run_model(meta);
        let dev = crate::io::FileDevice::open(&path, Default::default()).unwrap();
        let mut reopened = Metadata::open(Arc::new(dev), 3).unwrap();
        for (b, p) in model {
            assert_eq!(reopened.get(b).unwrap(), p);
        }
    }

    /// Mixed get/set/ranges/write_dirty/zero_run against a plain map, with
    /// a cache much smaller than the table so every path gets exercised.
    /// Ends with everything written back; returns the model.
    fn run_model(mut meta: Metadata) -> std::collections::HashMap<u64, Pair> {
        let mut model = std::collections::HashMap::new();
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20_000 {
            let b = next() % BLOCKS;
            match next() % 11 {
                0..=3 => {
                    let p = Pair {
                        new: next(),
                        old: next(),
                    };
                    meta.set(b, p).unwrap();
                    model.insert(b, p);
                }
                4..=6 => {
                    let want = model.get(&b).copied().unwrap_or_default();
                    assert_eq!(meta.get(b).unwrap(), want, "block {b}");
                }
                7 => {
                    let n = (next() % 600).min(BLOCKS - b) as usize;
                    let pairs: Vec<Pair> = (0..n)
                        .map(|_| Pair {
                            new: next(),
                            old: next(),
                        })
                        .collect();
                    meta.set_range(b, &pairs).unwrap();
                    for (i, p) in pairs.into_iter().enumerate() {
                        model.insert(b + i as u64, p);
                    }
                }
                8 => {
                    let n = (next() % 600).min(BLOCKS - b) as usize;
                    let mut out = vec![Pair::ZERO; n];
                    meta.get_range(b, &mut out).unwrap();
                    for (i, p) in out.iter().enumerate() {
                        let k = b + i as u64;
                        assert_eq!(*p, model.get(&k).copied().unwrap_or_default());
                    }
                }
                9 => {
                    meta.write_dirty().unwrap();
                }
                _ => {
                    // Never claims a block with a stored pair is zero.
                    let n = meta.zero_run(b, BLOCKS - b).unwrap();
                    assert!((b..b + n)
                        .all(|k| model.get(&k).copied().unwrap_or_default() == Pair::ZERO));
                }
            }
            assert!(meta.cached_pages() <= 3);
            assert!(meta.dirty_pages() <= meta.cached_pages());
        }
        meta.write_dirty().unwrap();
        model
    }

    #[test]
    fn zero_run_skips_table_holes_but_not_cached_pages() {
        use crate::io::FileDevice;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta");
        let blocks = 1000 * PAIRS_PER_PAGE;
        let dev = FileDevice::create(&path, meta_len(blocks), false, false).unwrap();
        let sb = Superblock::new(512, blocks * 512, 7).unwrap();
        let mut meta = Metadata::create(Arc::new(dev), sb, 8).unwrap();
        // Page 500 holds data on the device; page 700 only in the cache.
        meta.set(500 * PAIRS_PER_PAGE + 1, pair_for(1)).unwrap();
        meta.write_dirty().unwrap();
        meta.set(700 * PAIRS_PER_PAGE + 2, pair_for(2)).unwrap();
        assert_eq!(meta.zero_run(3, blocks).unwrap(), 500 * PAIRS_PER_PAGE - 3);
        assert_eq!(meta.zero_run(500 * PAIRS_PER_PAGE, blocks).unwrap(), 0);
        let after = 501 * PAIRS_PER_PAGE;
        assert_eq!(meta.zero_run(after, blocks).unwrap(), 199 * PAIRS_PER_PAGE);
        assert_eq!(meta.zero_run(after, 10).unwrap(), 10);
        assert_eq!(meta.zero_run(700 * PAIRS_PER_PAGE, blocks).unwrap(), 0);
        let tail = 701 * PAIRS_PER_PAGE;
        assert_eq!(meta.zero_run(tail, blocks).unwrap(), blocks - tail);
    }

    #[test]
    fn zero_run_is_zero_where_holes_are_unknown() {
        let (_dev, mut meta) = fresh(2);
        assert_eq!(meta.zero_run(0, BLOCKS).unwrap(), 0);
    }

    #[test]
    fn terabyte_table_on_a_sparse_file_uses_bounded_memory() {
        use crate::io::FileDevice;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta");
        let blocks = (1u64 << 40) / 4096;
        let dev = FileDevice::create(&path, meta_len(blocks), false, false).unwrap();
        let sb = Superblock::new(4096, 1 << 40, 7).unwrap();
        let mut meta = Metadata::create(Arc::new(dev), sb, 8).unwrap();
        let far = [0, blocks / 3, blocks / 2 + 5, blocks - 1];
        for &b in &far {
            assert_eq!(meta.get(b).unwrap(), Pair::ZERO, "a hole reads as zeros");
            meta.set(b, pair_for(b)).unwrap();
        }
        meta.write_dirty().unwrap();
        drop(meta);
        let dev = FileDevice::open(&path, Default::default()).unwrap();
        let mut meta = Metadata::open(Arc::new(dev), 2).unwrap();
        for &b in &far {
            assert_eq!(meta.get(b).unwrap(), pair_for(b));
        }
        assert!(meta.cached_pages() <= 2);
    }
}
