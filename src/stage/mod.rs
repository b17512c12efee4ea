//! The persistent write-back stage: a log of completed writes that are not
//! yet in the image, in a [`Region`] that outlives the process.
//!
//! A virtio-blk device with a volatile write cache may complete a write
//! before it is durable, but only a host power cut may lose it, never the
//! death of the server. So each write the engine completes ahead of its
//! data write is first recorded here, and a restarted twinsum replays the
//! records before it serves anybody. This module knows the byte layout and
//! the ring; what a record *means* is the engine's business.
//!
//! Layout (all little endian):
//!
//! ```text
//! 0      identity header, 512 bytes: magic "TWSTAGE1", version, the
//!        metadata it belongs to (salt, block size, blocks, data size),
//!        ring capacity, instance id, boot id; self-checksummed
//! 512    marker slot A  } where replay starts: the next record not yet
//! 1024   marker slot B  } in the image; written alternately, the valid
//!                         slot with the higher counter wins
//! 4096   the ring: records at 64-byte aligned positions
//! ```
//!
//! A record is a 64-byte header followed by its data. The header is written
//! when the record's place is reserved, in sequence order under the
//! caller's lock, with an empty data checksum; the data follows, outside
//! the lock (several queues fill records at once), and the data checksum
//! last. Replay walks headers from the marker: a header that does not
//! verify, or carries the wrong sequence number, ends the log (nothing was
//! reserved after it); a record whose data checksum does not match was
//! never completed and is skipped, never applied. A record that does not
//! fit before the end of the ring leaves a pad header and starts the next
//! lap.
//!
//! The stage names its boot: a stage from an earlier boot of the host held
//! writes that a host crash lost with the rest of memory (it can only
//! exist at all if it lives on a disk-backed file system), so it is dropped
//! as a power cut drops a volatile cache, with a warning.

use std::io;
use std::sync::Arc;

use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::io::Region;
use crate::le::{get32, get64, put32, put64};

mod path;

pub use path::{boot_id, default_path};

/// An identifier of one boot of the host.
pub type BootId = [u8; 16];

const MAGIC: &[u8; 8] = b"TWSTAGE1";
pub const VERSION: u32 = 1;
const MARKER_MAGIC: u32 = 0x4b52_4d54; // "TMRK"
const RECORD_MAGIC: u32 = 0x3152_5354; // "TSR1"
const KIND_WRITE: u32 = 1;
const KIND_PAD: u32 = 2;

/// Bytes before the ring.
pub const RING_START: u64 = 4096;
/// A record header, and the alignment of every record.
pub const RECORD_HEADER: u64 = 64;
const MARKER_SLOTS: [u64; 2] = [512, 1024];

/// The smallest ring a stage may have.
pub const MIN_CAPACITY: u64 = 1 << 20;

/// What a stage belongs to: the metadata of one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub salt: u64,
    /// The superblock generation; the marker tracks it.
    pub generation: u64,
    pub block_size: u32,
    pub blocks: u64,
    pub data_size: u64,
}

/// Why a stage cannot be used. Each says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("not a twinsum stage file (magic {0:02x?})")]
    Magic([u8; 8]),
    #[error("stage header checksum mismatch (stored {stored:#018x}, computed {computed:#018x})")]
    HeaderChecksum { stored: u64, computed: u64 },
    #[error(
        "stage version {0} is {age} than this twinsum understands ({VERSION})",
        age = if *.0 > VERSION { "newer" } else { "older" }
    )]
    Version(u32),
    #[error("the stage is truncated: {have} bytes, its header needs {need}")]
    Truncated { have: u64, need: u64 },
    #[error(
        "the stage belongs to other metadata (salt {stage_salt:#018x}, {stage_blocks} blocks of {stage_block_size} bytes; this metadata has salt {meta_salt:#018x}, {meta_blocks} blocks of {meta_block_size} bytes)"
    )]
    Foreign {
        stage_salt: u64,
        stage_blocks: u64,
        stage_block_size: u32,
        meta_salt: u64,
        meta_blocks: u64,
        meta_block_size: u32,
    },
    #[error(
        "the stage was written against metadata generation {stage}, but the metadata is at generation {meta}: it belongs to another copy of this metadata"
    )]
    Generation { stage: u64, meta: u64 },
    #[error("no valid marker slot in the stage")]
    Marker,
    #[error("a stage of {0} bytes is too small: at least {min} bytes", min = RING_START + MIN_CAPACITY)]
    TooSmall(u64),
    #[error("stage I/O failed while {what}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> StageError {
    move |source| StageError::Io { what, source }
}

/// One complete record found by replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub block: u64,
    /// Data bytes.
    pub len: u32,
    /// Where its data is in the region.
    pub data_offset: u64,
}

/// What opening an existing stage found.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Complete records to replay, in sequence order.
    pub records: Vec<Record>,
    /// Records reserved but never completed (their write never returned).
    pub torn: u64,
    /// Set when the stage came from an earlier boot and was dropped; the
    /// number of complete records it held.
    pub earlier_boot: Option<u64>,
}

/// A reserved record: the caller fills its data with [`Filler::fill`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub seq: u64,
    /// Logical ring position of the header (monotonic; the region offset is
    /// `RING_START + pos % capacity`).
    pub pos: u64,
    /// Logical position just past the record.
    pub end: u64,
    pub len: u32,
    /// Region offset of the data.
    pub data_offset: u64,
}

/// Writes the data of reserved records; cheap to clone, used outside the
/// lock that guards the [`Stage`].
#[derive(Clone)]
pub struct Filler {
    region: Arc<dyn Region>,
    instance: u64,
}

impl Filler {
    /// Store the data of `slot`, then its checksum: from the checksum's
    /// store on, the record is complete and will be replayed.
    pub fn fill(&self, slot: &Slot, data: &[u8]) -> io::Result<()> {
        debug_assert_eq!(data.len(), slot.len as usize);
        self.region.write_at(data, slot.data_offset)?;
        let sum = data_sum(self.instance, slot.seq, data);
        self.region
            .write_at(&sum.to_le_bytes(), slot.data_offset - RECORD_HEADER + 48)
    }

    /// Call `f` with the data of a filled record.
    pub fn with_data(
        &self,
        data_offset: u64,
        len: usize,
        f: &mut dyn FnMut(&[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        self.region.with_slice(data_offset, len, f)
    }

    /// Copy `buf.len()` bytes of a filled record's data from `offset`.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.region.read_at(buf, offset)
    }
}

/// An open stage: the ring's bookkeeping. Not `Sync`; the engine keeps it
/// under the lock that orders its queue.
pub struct Stage {
    region: Arc<dyn Region>,
    ident: Identity,
    capacity: u64,
    instance: u64,
    boot: BootId,
    /// Logical position and sequence number of the next reservation.
    head: u64,
    next_seq: u64,
    /// Logical position and sequence number of the oldest record not yet
    /// released (in the image): the marker on the region says the same.
    tail: u64,
    tail_seq: u64,
    marker_counter: u64,
}

impl std::fmt::Debug for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stage")
            .field("capacity", &self.capacity)
            .field("head", &self.head)
            .field("tail", &self.tail)
            .field("next_seq", &self.next_seq)
            .finish_non_exhaustive()
    }
}

impl Stage {
    /// Start an empty stage on `region` (its whole length), overwriting
    /// whatever it held.
    pub fn create(
        region: Arc<dyn Region>,
        ident: Identity,
        boot: BootId,
        instance: u64,
    ) -> Result<Self, StageError> {
        let len = region.len();
        if len < RING_START + MIN_CAPACITY {
            return Err(StageError::TooSmall(len));
        }
        let capacity = (len - RING_START) / RECORD_HEADER * RECORD_HEADER;
        let mut stage = Self {
            region,
            ident,
            capacity,
            // Never 0, so that a zeroed region cannot look like ours.
            instance: instance | 1,
            boot,
            head: 0,
            next_seq: 1,
            tail: 0,
            tail_seq: 1,
            marker_counter: 0,
        };
        // Both marker slots first, so that no header of this instance can
        // exist next to a stale marker; then the header.
        stage.write_marker()?;
        stage.write_marker()?;
        stage
            .region
            .write_at(&stage.encode_header(), 0)
            .map_err(io_err("writing the stage header"))?;
        Ok(stage)
    }

    /// Open the stage `region` holds for the metadata `ident`, returning
    /// it with the records still to replay. A region of all zeros (created,
    /// never written) is an empty stage. The caller replays the records,
    /// then calls [`Stage::release`] past them.
    pub fn open(
        region: Arc<dyn Region>,
        ident: Identity,
        boot: BootId,
        fresh_instance: u64,
    ) -> Result<(Self, Recovered), StageError> {
        let len = region.len();
        let mut header = [0u8; 512];
        if len >= 512 {
            region
                .read_at(&mut header, 0)
                .map_err(io_err("reading the stage header"))?;
        }
        if header.iter().all(|&b| b == 0) {
            let stage = Self::create(region, ident, boot, fresh_instance)?;
            return Ok((stage, Recovered::default()));
        }
        let h = decode_header(&header)?;
        let need = RING_START + h.capacity;
        if len < need {
            return Err(StageError::Truncated { have: len, need });
        }
        let mut stage = Self {
            region,
            ident,
            capacity: h.capacity,
            instance: h.instance,
            boot,
            head: 0,
            next_seq: 1,
            tail: 0,
            tail_seq: 1,
            marker_counter: 0,
        };
        let marker = stage.read_marker()?;
        stage.marker_counter = marker.counter;
        let walk = stage.walk(marker.seq, marker.pos)?;
        if h.boot != boot {
            let n = walk.records.len() as u64;
            let stage = Self::create(stage.region, ident, boot, fresh_instance)?;
            return Ok((
                stage,
                Recovered {
                    earlier_boot: Some(n),
                    ..Recovered::default()
                },
            ));
        }
        if h.salt != ident.salt || h.blocks != ident.blocks || h.block_size != ident.block_size {
            if walk.records.is_empty() {
                // Nothing to lose: start afresh for this metadata.
                let stage = Self::create(stage.region, ident, boot, fresh_instance)?;
                return Ok((stage, Recovered::default()));
            }
            return Err(StageError::Foreign {
                stage_salt: h.salt,
                stage_blocks: h.blocks,
                stage_block_size: h.block_size,
                meta_salt: ident.salt,
                meta_blocks: ident.blocks,
                meta_block_size: ident.block_size,
            });
        }
        // The marker learns of a new generation before the superblock is
        // stored, so it may be one ahead after a death in between.
        if !walk.records.is_empty()
            && marker.generation != ident.generation
            && marker.generation != ident.generation + 1
        {
            return Err(StageError::Generation {
                stage: marker.generation,
                meta: ident.generation,
            });
        }
        let (head, next_seq) = walk.end.unwrap_or((marker.pos, marker.seq));
        stage.head = head;
        stage.next_seq = next_seq;
        stage.tail = marker.pos;
        stage.tail_seq = marker.seq;
        Ok((stage, walk.into()))
    }

    /// Count the complete records of a stage without taking it over (for
    /// `check` and `info`). `None` for an empty (all-zero) stage.
    pub fn inspect(region: &dyn Region) -> Result<Option<Inspection>, StageError> {
        let len = region.len();
        let mut header = [0u8; 512];
        if len >= 512 {
            region
                .read_at(&mut header, 0)
                .map_err(io_err("reading the stage header"))?;
        }
        if header.iter().all(|&b| b == 0) {
            return Ok(None);
        }
        let h = decode_header(&header)?;
        let need = RING_START + h.capacity;
        if len < need {
            return Err(StageError::Truncated { have: len, need });
        }
        let marker = read_marker_of(region)?;
        let rec = walk_region(region, h.capacity, h.instance, marker.seq, marker.pos)?;
        Ok(Some(Inspection {
            salt: h.salt,
            blocks: h.blocks,
            block_size: h.block_size,
            boot: h.boot,
            records: rec.records.len() as u64,
            bytes: rec.records.iter().map(|r| u64::from(r.len)).sum(),
            torn: rec.torn,
        }))
    }

    /// The writer of record data for this stage.
    pub fn filler(&self) -> Filler {
        Filler {
            region: self.region.clone(),
            instance: self.instance,
        }
    }

    /// Ring bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Whether a record of `len` data bytes can ever be reserved: at most
    /// half the ring, so that a full record never waits on its own lap.
    pub fn fits(&self, len: usize) -> bool {
        record_span(len as u64) <= self.capacity / 2
    }

    /// Ring bytes in use (reserved and not yet released).
    pub fn used(&self) -> u64 {
        self.head - self.tail
    }

    /// Reserve a record of `len` bytes for `block`: write its header (and a
    /// pad before it at the end of a lap). `Ok(None)` when the ring has no
    /// room until records are released.
    pub fn reserve(&mut self, block: u64, len: usize) -> Result<Option<Slot>, StageError> {
        let span = record_span(len as u64);
        let offset = self.head % self.capacity;
        let pad = if offset + span > self.capacity {
            self.capacity - offset
        } else {
            0
        };
        if self.head + pad + span - self.tail > self.capacity {
            return Ok(None);
        }
        if pad > 0 {
            let h = encode_record(self.instance, KIND_PAD, self.next_seq, 0, 0);
            self.region
                .write_at(&h, RING_START + offset)
                .map_err(io_err("writing a stage pad"))?;
            self.next_seq += 1;
            self.head += pad;
        }
        let at = RING_START + self.head % self.capacity;
        let seq = self.next_seq;
        let h = encode_record(self.instance, KIND_WRITE, seq, block, len as u32);
        self.region
            .write_at(&h, at)
            .map_err(io_err("writing a stage record header"))?;
        let slot = Slot {
            seq,
            pos: self.head,
            end: self.head + span,
            len: len as u32,
            data_offset: at + RECORD_HEADER,
        };
        self.next_seq += 1;
        self.head += span;
        Ok(Some(slot))
    }

    /// Every record before `(pos, seq)` is in the image: record that on
    /// the region, and reuse their space.
    pub fn release(&mut self, pos: u64, seq: u64) -> Result<(), StageError> {
        debug_assert!(pos >= self.tail && pos <= self.head);
        let (old_pos, old_seq) = (self.tail, self.tail_seq);
        self.tail = pos;
        self.tail_seq = seq;
        if let Err(e) = self.write_marker() {
            self.tail = old_pos;
            self.tail_seq = old_seq;
            return Err(e);
        }
        Ok(())
    }

    /// Release everything reserved so far (the caller has applied it all).
    pub fn release_all(&mut self) -> Result<(), StageError> {
        self.release(self.head, self.next_seq)
    }

    /// The superblock is about to be stored with `generation`.
    pub fn set_generation(&mut self, generation: u64) -> Result<(), StageError> {
        let old = self.ident.generation;
        self.ident.generation = generation;
        if let Err(e) = self.write_marker() {
            self.ident.generation = old;
            return Err(e);
        }
        Ok(())
    }

    fn encode_header(&self) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[0..8].copy_from_slice(MAGIC);
        put32(&mut b, 8, VERSION);
        put64(&mut b, 16, self.ident.salt);
        put32(&mut b, 24, self.ident.block_size);
        put64(&mut b, 32, self.ident.blocks);
        put64(&mut b, 40, self.ident.data_size);
        put64(&mut b, 48, self.capacity);
        put64(&mut b, 56, self.instance);
        b[64..80].copy_from_slice(&self.boot);
        let sum = xxh3_64_with_seed(&b[..504], 0);
        put64(&mut b, 504, sum);
        b
    }

    fn write_marker(&mut self) -> Result<(), StageError> {
        self.marker_counter += 1;
        let slot = MARKER_SLOTS[(self.marker_counter % 2) as usize];
        let mut b = [0u8; 64];
        put32(&mut b, 0, MARKER_MAGIC);
        put64(&mut b, 8, self.marker_counter);
        put64(&mut b, 16, self.tail_seq);
        put64(&mut b, 24, self.tail);
        put64(&mut b, 32, self.ident.generation);
        put64(&mut b, 40, self.instance);
        let sum = xxh3_64_with_seed(&b[..56], self.instance);
        put64(&mut b, 56, sum);
        self.region
            .write_at(&b, slot)
            .map_err(io_err("writing the stage marker"))
    }

    fn read_marker(&self) -> Result<Marker, StageError> {
        read_marker_of(&*self.region)
    }

    fn walk(&self, seq: u64, pos: u64) -> Result<Walk, StageError> {
        walk_region(&*self.region, self.capacity, self.instance, seq, pos)
    }
}

/// A stage seen from outside (see [`Stage::inspect`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inspection {
    pub salt: u64,
    pub blocks: u64,
    pub block_size: u32,
    pub boot: BootId,
    /// Complete records waiting to be replayed, and their data bytes.
    pub records: u64,
    pub bytes: u64,
    pub torn: u64,
}

struct Header {
    salt: u64,
    block_size: u32,
    blocks: u64,
    capacity: u64,
    instance: u64,
    boot: BootId,
}

fn decode_header(b: &[u8; 512]) -> Result<Header, StageError> {
    let magic: [u8; 8] = b[0..8].try_into().unwrap_or_default();
    if &magic != MAGIC {
        return Err(StageError::Magic(magic));
    }
    let stored = get64(b, 504);
    let computed = xxh3_64_with_seed(&b[..504], 0);
    if stored != computed {
        return Err(StageError::HeaderChecksum { stored, computed });
    }
    let version = get32(b, 8);
    if version != VERSION {
        return Err(StageError::Version(version));
    }
    let capacity = get64(b, 48);
    if capacity < MIN_CAPACITY || !capacity.is_multiple_of(RECORD_HEADER) {
        return Err(StageError::TooSmall(RING_START + capacity));
    }
    let mut boot = [0u8; 16];
    boot.copy_from_slice(&b[64..80]);
    Ok(Header {
        salt: get64(b, 16),
        block_size: get32(b, 24),
        blocks: get64(b, 32),
        capacity,
        instance: get64(b, 56),
        boot,
    })
}

#[derive(Debug, Clone, Copy)]
struct Marker {
    counter: u64,
    seq: u64,
    pos: u64,
    generation: u64,
}

fn read_marker_of(region: &dyn Region) -> Result<Marker, StageError> {
    let mut best: Option<Marker> = None;
    for at in MARKER_SLOTS {
        let mut b = [0u8; 64];
        region
            .read_at(&mut b, at)
            .map_err(io_err("reading the stage marker"))?;
        let instance = get64(&b, 40);
        if get32(&b, 0) != MARKER_MAGIC || get64(&b, 56) != xxh3_64_with_seed(&b[..56], instance) {
            continue;
        }
        let m = Marker {
            counter: get64(&b, 8),
            seq: get64(&b, 16),
            pos: get64(&b, 24),
            generation: get64(&b, 32),
        };
        if best.is_none_or(|b| m.counter > b.counter) {
            best = Some(m);
        }
    }
    best.ok_or(StageError::Marker)
}

struct Walk {
    records: Vec<Record>,
    torn: u64,
    /// Position and sequence number after the last reserved record.
    end: Option<(u64, u64)>,
}

impl From<Walk> for Recovered {
    fn from(w: Walk) -> Self {
        Recovered {
            records: w.records,
            torn: w.torn,
            earlier_boot: None,
        }
    }
}

fn walk_region(
    region: &dyn Region,
    capacity: u64,
    instance: u64,
    mut seq: u64,
    mut pos: u64,
) -> Result<Walk, StageError> {
    let start = pos;
    let mut walk = Walk {
        records: Vec::new(),
        torn: 0,
        end: None,
    };
    // At most one lap: a ring never holds more.
    while pos - start < capacity {
        let at = RING_START + pos % capacity;
        let mut h = [0u8; RECORD_HEADER as usize];
        region
            .read_at(&mut h, at)
            .map_err(io_err("reading a stage record"))?;
        let Some((kind, block, len)) = decode_record(&h, instance, seq) else {
            break;
        };
        if kind == KIND_PAD {
            pos += capacity - pos % capacity;
            seq += 1;
            continue;
        }
        let span = record_span(u64::from(len));
        if pos % capacity + span > capacity {
            // A header that verifies cannot say this; stop rather than
            // read across the end of the ring.
            break;
        }
        let data_offset = at + RECORD_HEADER;
        let stored = get64(&h, 48);
        let mut complete = false;
        if stored != 0 {
            region
                .with_slice(data_offset, len as usize, &mut |data| {
                    complete = data_sum(instance, seq, data) == stored;
                    Ok(())
                })
                .map_err(io_err("reading a stage record"))?;
        }
        if complete {
            walk.records.push(Record {
                seq,
                block,
                len,
                data_offset,
            });
        } else {
            walk.torn += 1;
        }
        pos += span;
        seq += 1;
    }
    walk.end = Some((pos, seq));
    Ok(walk)
}

fn record_span(len: u64) -> u64 {
    (RECORD_HEADER + len).div_ceil(RECORD_HEADER) * RECORD_HEADER
}

fn encode_record(instance: u64, kind: u32, seq: u64, block: u64, len: u32) -> [u8; 64] {
    let mut b = [0u8; 64];
    put32(&mut b, 0, RECORD_MAGIC);
    put32(&mut b, 4, kind);
    put64(&mut b, 8, seq);
    put64(&mut b, 16, block);
    put32(&mut b, 24, len);
    put64(&mut b, 32, instance);
    let sum = xxh3_64_with_seed(&b[..40], instance);
    put64(&mut b, 40, sum);
    // Bytes 48..56: the data checksum, stored once the data is.
    b
}

/// `(kind, block, len)` of a header that verifies and carries `seq`.
fn decode_record(b: &[u8; 64], instance: u64, seq: u64) -> Option<(u32, u64, u32)> {
    let ok = get32(b, 0) == RECORD_MAGIC
        && get64(b, 32) == instance
        && get64(b, 40) == xxh3_64_with_seed(&b[..40], instance)
        && get64(b, 8) == seq;
    let kind = get32(b, 4);
    (ok && (kind == KIND_WRITE || kind == KIND_PAD)).then(|| (kind, get64(b, 16), get32(b, 24)))
}

fn data_sum(instance: u64, seq: u64, data: &[u8]) -> u64 {
    match xxh3_64_with_seed(data, instance ^ seq.wrapping_mul(0x9E37_79B9_7F4A_7C15)) {
        0 => 1,
        s => s,
    }
}

#[cfg(test)]
mod tests;
