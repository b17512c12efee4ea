//! The metadata log of format version 2: one sequential record per commit
//! round, in a region after the pair table.
//!
//! A commit round appends one record of every `(block, new, old)` it
//! changes and makes just that record durable; the table pages it dirtied
//! are written back lazily, by eviction or at a checkpoint. So the
//! metadata cost of a round is one sequential write, not one random page
//! per block. Opening replays the records from the checkpoint on over the
//! table.
//!
//! Record layout (all little endian), at a 512-byte aligned position of
//! the log region, never straddling its end (a record that would is
//! written at the start of the region instead):
//!
//! ```text
//!  0  magic "TLOG"          u32
//!  4  version 1             u32
//!  8  sequence number       u64
//! 16  entries               u32
//! 20  reserved, 0           u32
//! 24  salt of the metadata  u64
//! 32  length in bytes       u32   (a multiple of 512)
//! 36  reserved, 0           u32
//! 40  xxh3-64 of the record with this field zero, seeded by the salt
//! 48  reserved, 0           16 bytes
//! 64  entries: (block u64, new u64, old u64) each, then zeros to the length
//! ```
//!
//! Replay stops at the first position that holds no valid record with the
//! next sequence number (after also looking at the start of the region,
//! where a record that did not fit went): a torn record — its round's data
//! was never written, because data moves only after its record is durable
//! — ends the log, and a stale record from an earlier lap or an earlier
//! format (another salt) can never pass for the next one.
//!
//! Records are written in sequence order, one at a time (the engine keeps
//! that order), so a durable record means every earlier one is durable.

use std::collections::BTreeMap;

use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::{DeviceRef, MetaError, Pair};
use crate::le::{get32, get64, put32, put64};

const MAGIC: u32 = 0x474f_4c54; // "TLOG"
const RECORD_VERSION: u32 = 1;
/// Header bytes before the entries.
pub const RECORD_HEADER: usize = 64;
/// Bytes per entry.
pub const ENTRY: usize = 24;
/// Records start on, and are padded to, this boundary.
pub const ALIGN: usize = 512;

/// A record ready to be written: the engine writes `bytes` at `offset`
/// of the metadata device, durably, in `seq` order.
#[derive(Debug)]
pub struct LogWrite {
    pub seq: u64,
    pub offset: u64,
    pub bytes: Vec<u8>,
}

/// Where a checkpoint puts the start of replay: every record before it
/// is covered by the table pages written when it was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    pub seq: u64,
    /// Logical position (see [`Log`]).
    pub pos: u64,
}

/// What `reserve` could do.
#[derive(Debug)]
pub enum Reserve {
    Write(LogWrite),
    /// Not enough room until a checkpoint moves the tail.
    Full,
    /// More entries than one record may hold (a quarter of the log):
    /// commit by checkpoint instead.
    TooLarge,
}

/// The log's bookkeeping. Positions are logical byte counts that only
/// grow; the region offset of a logical position is `pos % size`.
#[derive(Debug)]
pub struct Log {
    offset: u64,
    size: u64,
    salt: u64,
    head: u64,
    next_seq: u64,
    tail: u64,
}

/// What replay found.
#[derive(Debug, Default)]
pub struct Replayed {
    /// Every entry of every valid record from the checkpoint on, the last
    /// one for each block winning.
    pub pairs: BTreeMap<u64, Pair>,
    /// Version 3: the checksums the last record naming a block carried
    /// beyond its pair (entries `(block, v, v)` ahead of its pair entry).
    /// The block's data may match any of them; only blocks that have
    /// some.
    pub versions: BTreeMap<u64, Vec<u64>>,
    pub records: u64,
    pub entries: u64,
}

impl Log {
    /// Walk the log of metadata with `salt` from `(seq, pos)` (the
    /// superblock's checkpoint) and return it positioned after the last
    /// valid record, with what the records say.
    pub fn open(
        dev: &DeviceRef,
        offset: u64,
        size: u64,
        salt: u64,
        seq: u64,
        pos: u64,
    ) -> Result<(Self, Replayed), MetaError> {
        let mut log = Self {
            offset,
            size,
            salt,
            head: pos,
            next_seq: seq,
            tail: pos,
        };
        let mut replayed = Replayed::default();
        let mut buf = Vec::new();
        loop {
            let found = log.read_at(dev, log.head, &mut buf)?.map(|n| (log.head, n));
            let found = match found {
                Some(f) => Some(f),
                None if !log.head.is_multiple_of(size) => {
                    let wrapped = log.head + (size - log.head % size);
                    log.read_at(dev, wrapped, &mut buf)?.map(|n| (wrapped, n))
                }
                None => None,
            };
            let Some((at, len)) = found else { break };
            // One lap at most: a log never holds more.
            if at + len as u64 - log.tail > size {
                break;
            }
            // A block's candidates are those of the last record naming it:
            // that record carried every version its data could still hold.
            let mut named: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
            for e in buf[RECORD_HEADER..]
                .chunks_exact(ENTRY)
                .take(entries_of(&buf))
            {
                let (block, pair) = decode_entry(e);
                replayed.pairs.insert(block, pair);
                named.entry(block).or_default().extend([pair.new, pair.old]);
                replayed.entries += 1;
            }
            for (block, mut all) in named {
                let pair = replayed.pairs[&block];
                all.retain(|&v| v != pair.new && v != pair.old);
                all.sort_unstable();
                all.dedup();
                if all.is_empty() {
                    replayed.versions.remove(&block);
                } else {
                    replayed.versions.insert(block, all);
                }
            }
            replayed.records += 1;
            log.head = at + len as u64;
            log.next_seq += 1;
        }
        Ok((log, replayed))
    }

    /// Read the record with the next sequence number at logical `pos`
    /// into `buf`; its length if it is there and valid.
    fn read_at(
        &self,
        dev: &DeviceRef,
        pos: u64,
        buf: &mut Vec<u8>,
    ) -> Result<Option<usize>, MetaError> {
        let phys = pos % self.size;
        if phys + ALIGN as u64 > self.size {
            return Ok(None);
        }
        buf.resize(ALIGN, 0);
        dev.read_at(&mut buf[..ALIGN], self.offset + phys)
            .map_err(io_err("reading the metadata log"))?;
        let len = get32(buf, 32) as usize;
        let plausible = get32(buf, 0) == MAGIC
            && get32(buf, 4) == RECORD_VERSION
            && get64(buf, 8) == self.next_seq
            && get64(buf, 24) == self.salt
            && len >= ALIGN
            && len.is_multiple_of(ALIGN)
            && phys + len as u64 <= self.size
            && RECORD_HEADER + entries_of(buf) * ENTRY <= len;
        if !plausible {
            return Ok(None);
        }
        buf.resize(len, 0);
        if len > ALIGN {
            dev.read_at(&mut buf[ALIGN..], self.offset + phys + ALIGN as u64)
                .map_err(io_err("reading the metadata log"))?;
        }
        let stored = get64(buf, 40);
        buf[40..48].fill(0);
        let ok = xxh3_64_with_seed(buf, self.salt) == stored;
        buf[40..48].copy_from_slice(&stored.to_le_bytes());
        Ok(ok.then_some(len))
    }

    /// Most entries one record may carry.
    pub fn max_entries(&self) -> usize {
        ((self.size / 4) as usize).saturating_sub(RECORD_HEADER) / ENTRY
    }

    /// Bytes between the checkpoint and the head.
    pub fn used(&self) -> u64 {
        self.head - self.tail
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether a record of `entries` entries would be given a place now.
    pub fn has_room(&self, entries: usize) -> bool {
        self.place(entries).is_ok()
    }

    /// Logical position and length of the next record of `entries`
    /// entries, or why it has none.
    fn place(&self, entries: usize) -> Result<(u64, usize), Reserve> {
        if entries > self.max_entries() {
            return Err(Reserve::TooLarge);
        }
        let len = (RECORD_HEADER + entries * ENTRY).div_ceil(ALIGN) * ALIGN;
        let mut at = self.head;
        if at % self.size + len as u64 > self.size {
            at += self.size - at % self.size;
        }
        if at + len as u64 - self.tail > self.size {
            return Err(Reserve::Full);
        }
        Ok((at, len))
    }

    /// Encode the next record for `entries` and claim its place.
    pub fn reserve(&mut self, entries: &[(u64, Pair)]) -> Reserve {
        let (at, len) = match self.place(entries.len()) {
            Ok(p) => p,
            Err(why) => return why,
        };
        let mut bytes = vec![0u8; len];
        put32(&mut bytes, 0, MAGIC);
        put32(&mut bytes, 4, RECORD_VERSION);
        put64(&mut bytes, 8, self.next_seq);
        put32(&mut bytes, 16, entries.len() as u32);
        put64(&mut bytes, 24, self.salt);
        put32(&mut bytes, 32, len as u32);
        for (e, (block, pair)) in bytes[RECORD_HEADER..].chunks_exact_mut(ENTRY).zip(entries) {
            put64(e, 0, *block);
            put64(e, 8, pair.new);
            put64(e, 16, pair.old);
        }
        let sum = xxh3_64_with_seed(&bytes, self.salt);
        put64(&mut bytes, 40, sum);
        let w = LogWrite {
            seq: self.next_seq,
            offset: self.offset + at % self.size,
            bytes,
        };
        self.next_seq += 1;
        self.head = at + len as u64;
        Reserve::Write(w)
    }

    /// Give back the last reservation: its record was never written.
    pub fn unreserve(&mut self, w: &LogWrite) {
        if w.seq + 1 == self.next_seq {
            self.next_seq = w.seq;
            self.head -= w.bytes.len() as u64;
            // A wrap skipped before it stays skipped: harmless.
        }
    }

    /// Where replay would start if a checkpoint were taken now.
    pub fn mark(&self) -> Mark {
        Mark {
            seq: self.next_seq,
            pos: self.head,
        }
    }

    /// Region position of a mark, as the superblock stores it.
    pub fn position_of(&self, mark: Mark) -> u64 {
        mark.pos % self.size
    }

    /// A checkpoint at `mark` is durable: its space may be reused.
    pub fn checkpointed(&mut self, mark: Mark) {
        if mark.pos > self.tail {
            self.tail = mark.pos;
        }
    }
}

fn entries_of(buf: &[u8]) -> usize {
    get32(buf, 16) as usize
}

fn decode_entry(e: &[u8]) -> (u64, Pair) {
    (
        get64(e, 0),
        Pair {
            new: get64(e, 8),
            old: get64(e, 16),
        },
    )
}

fn io_err(what: &'static str) -> impl Fn(std::io::Error) -> MetaError {
    move |source| MetaError::Io {
        what,
        source: std::sync::Arc::new(source),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::io::MemDevice;

    const OFF: u64 = 4096;
    const SIZE: u64 = 16 << 10;

    fn dev() -> DeviceRef {
        Arc::new(MemDevice::new(OFF + SIZE))
    }

    fn pair(n: u64) -> Pair {
        Pair { new: n, old: n + 1 }
    }

    fn write(dev: &DeviceRef, log: &mut Log, entries: &[(u64, Pair)]) -> LogWrite {
        let Reserve::Write(w) = log.reserve(entries) else {
            panic!("no room")
        };
        dev.write_at(&w.bytes, w.offset).unwrap();
        w
    }

    #[test]
    fn records_replay_in_order_the_last_pair_of_a_block_winning() {
        let d = dev();
        let (mut log, r) = Log::open(&d, OFF, SIZE, 7, 1, 0).unwrap();
        assert_eq!(r.records, 0);
        write(&d, &mut log, &[(3, pair(10)), (4, pair(20))]);
        write(&d, &mut log, &[(3, pair(30))]);
        let (log2, r) = Log::open(&d, OFF, SIZE, 7, 1, 0).unwrap();
        assert_eq!((r.records, r.entries), (2, 3));
        assert_eq!(r.pairs[&3], pair(30));
        assert_eq!(r.pairs[&4], pair(20));
        assert_eq!(log2.mark(), log.mark());
        // Another salt (an earlier format of this file) sees nothing.
        let (_, r) = Log::open(&d, OFF, SIZE, 8, 1, 0).unwrap();
        assert_eq!(r.records, 0);
    }

    #[test]
    fn a_block_s_versions_are_those_of_the_last_record_naming_it() {
        let d = dev();
        let (mut log, _) = Log::open(&d, OFF, SIZE, 7, 1, 0).unwrap();
        let v = |n| Pair { new: n, old: n };
        // Block 3 rewritten twice without a sync: its record carries the
        // version before its pair.
        write(&d, &mut log, &[(3, Pair { new: 2, old: 1 }), (5, pair(50))]);
        write(&d, &mut log, &[(3, v(1)), (3, Pair { new: 3, old: 2 })]);
        let (_, r) = Log::open(&d, OFF, SIZE, 7, 1, 0).unwrap();
        assert_eq!(r.pairs[&3], Pair { new: 3, old: 2 });
        assert_eq!(r.versions.get(&3), Some(&vec![1]));
        assert!(!r.versions.contains_key(&5));
        // After a sync the next record names just the pair: the earlier
        // versions are gone.
        write(&d, &mut log, &[(3, Pair { new: 4, old: 3 })]);
        let (_, r) = Log::open(&d, OFF, SIZE, 7, 1, 0).unwrap();
        assert!(r.versions.is_empty(), "{:?}", r.versions);
        assert!(log.has_room(1));
        assert!(!log.has_room(log.max_entries() + 1));
    }

    #[test]
    fn a_torn_record_ends_the_log() {
        let d = dev();
        let (mut log, _) = Log::open(&d, OFF, SIZE, 7, 1, 0).unwrap();
        write(&d, &mut log, &[(1, pair(1))]);
        let w = write(&d, &mut log, &[(2, pair(2))]);
        write(&d, &mut log, &[(3, pair(3))]);
        d.write_at(&[0xff], w.offset + RECORD_HEADER as u64 + 3)
            .unwrap();
        let (_, r) = Log::open(&d, OFF, SIZE, 7, 1, 0).unwrap();
        assert_eq!(r.records, 1);
        assert!(!r.pairs.contains_key(&3));
    }

    #[test]
    fn the_log_wraps_and_a_checkpoint_frees_its_space() {
        let d = dev();
        let (mut log, _) = Log::open(&d, OFF, SIZE, 7, 1, 0).unwrap();
        let big: Vec<(u64, Pair)> = (0..150).map(|b| (b, pair(b))).collect();
        assert!(log.max_entries() >= big.len());
        let mut n = 0;
        while let Reserve::Write(w) = log.reserve(&big) {
            d.write_at(&w.bytes, w.offset).unwrap();
            n += 1;
        }
        assert!(n >= 3, "{n} records fit");
        // Checkpoint after the second record, then the log has room again,
        // and the next record goes to the start of the region.
        let (mut replay_log, r) = Log::open(&d, OFF, SIZE, 7, 1, 0).unwrap();
        assert_eq!(r.records, n);
        let _ = &mut replay_log;
        let mark = Mark {
            seq: 3,
            pos: 2 * (RECORD_HEADER as u64 + 150 * ENTRY as u64).div_ceil(512) * 512,
        };
        log.checkpointed(mark);
        let w = write(&d, &mut log, &[(9, pair(99))]);
        assert_eq!(w.offset, OFF, "wrapped to the start of the region");
        let (_, r) = Log::open(&d, OFF, SIZE, 7, mark.seq, log.position_of(mark)).unwrap();
        assert_eq!(r.records, n - 2 + 1);
        assert_eq!(r.pairs[&9], pair(99));
        // A record larger than a quarter of the log is refused.
        let huge: Vec<(u64, Pair)> = (0..log.max_entries() as u64 + 1)
            .map(|b| (b, pair(b)))
            .collect();
        assert!(matches!(log.reserve(&huge), Reserve::TooLarge));
    }

    #[test]
    fn an_unwritten_reservation_can_be_given_back() {
        let d = dev();
        let (mut log, _) = Log::open(&d, OFF, SIZE, 7, 1, 0).unwrap();
        let Reserve::Write(w) = log.reserve(&[(1, pair(1))]) else {
            panic!()
        };
        log.unreserve(&w);
        let w2 = write(&d, &mut log, &[(2, pair(2))]);
        assert_eq!((w2.seq, w2.offset), (w.seq, w.offset));
        let (_, r) = Log::open(&d, OFF, SIZE, 7, 1, 0).unwrap();
        assert_eq!(r.pairs.get(&2), Some(&pair(2)));
    }
}
