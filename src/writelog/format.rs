//! The byte layout of a write log, and the walk that reads it back.
//!
//! ```text
//! offset 0     header, 512 bytes, self-checksummed (see `Header`)
//! offset 512   records, back to back:
//!              32-byte record header | payload (payload_len bytes)
//! ```
//!
//! Record header, little endian:
//!
//! ```text
//!  0  u32 magic "TWSR"      12 u32 reserved (0)
//!  4  u8  kind              16 u64 seq: the record's number, from 0, no gaps
//!  5  u8  device            24 u64 checksum: xxh3 of bytes 0..24, seeded
//!  6  u16 reserved (0)             with the xxh3 of the payload
//!  8  u32 payload_len
//! ```
//!
//! Payloads by kind (all integers u64 little endian):
//!
//! | kind | device | payload |
//! |---|---|---|
//! | 1 start | - | pid, unix time in ms |
//! | 2 stop | - | nothing: an orderly stop |
//! | 3 write | data/meta | offset, then the bytes written |
//! | 4 durable write | data/meta | offset, then the bytes (`write_durable`: durable when it returned) |
//! | 5 zero | data/meta | offset, length |
//! | 6 sync | data/meta | `covers`: every write of that device whose seq is below it is durable |
//! | 7 guest write | - | first block, `began`, then one xxh3 per block of the guest's data |
//! | 8 guest zero | - | first block, block count, `began` (discard and write-zeroes: reads as zeros) |
//! | 9 guest flush | - | `covers`: every guest write and zero whose seq is below it is durable |
//! | 10 mark | - | the mark's name (UTF-8) |
//!
//! `began` is the log position when the guest request was handed to the
//! engine: two requests whose spans overlap were in flight together, and
//! either may have reached the disk last.
//!
//! A record is written whole by one syscall after what it records
//! returned; a walk stops at the first record that does not verify (a
//! process killed in the middle of that syscall), so a torn tail is never
//! read as a record.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::Path;

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use super::WriteLogError;
use crate::le::{get32, get64};

/// `b"TWSWLOG1"`.
pub const MAGIC: [u8; 8] = *b"TWSWLOG1";
pub const VERSION: u32 = 1;
/// Bytes of the header; records start here.
pub const HEADER_LEN: u64 = 512;
/// Bytes of a record header.
pub const RECORD_HEADER: usize = 32;
const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"TWSR");
/// Largest payload a walk accepts: far above any write twinsum issues
/// (the engine's batches are bounded), small enough that a corrupt length
/// is not believed.
pub const MAX_PAYLOAD: u32 = 1 << 30;
/// Longest mark name.
pub const MAX_MARK: usize = 255;

/// Which device a device record is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Dev {
    Data,
    Meta,
}

impl Dev {
    fn code(self) -> u8 {
        match self {
            Dev::Data => 1,
            Dev::Meta => 2,
        }
    }

    fn from_code(c: u8) -> Option<Self> {
        match c {
            1 => Some(Dev::Data),
            2 => Some(Dev::Meta),
            _ => None,
        }
    }
}

pub(super) mod kind {
    pub const START: u8 = 1;
    pub const STOP: u8 = 2;
    pub const WRITE: u8 = 3;
    pub const WRITE_DURABLE: u8 = 4;
    pub const ZERO: u8 = 5;
    pub const SYNC: u8 = 6;
    pub const GUEST_WRITE: u8 = 7;
    pub const GUEST_ZERO: u8 = 8;
    pub const GUEST_FLUSH: u8 = 9;
    pub const MARK: u8 = 10;
}

/// The disk a log was started on. Everything but `generation`,
/// `meta_digest` and `created_ms` must still match when a restarted
/// twinsum appends to the log.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Header {
    pub block_size: u32,
    pub hash_id: u32,
    pub data_size: u64,
    pub meta_size: u64,
    pub salt: u64,
    /// The superblock generation when the log began.
    pub generation: u64,
    /// xxh3 over every data region of the metadata when the log began
    /// ([`digest`](super::digest)): the identity of the base metadata.
    pub meta_digest: u64,
    pub created_ms: u64,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN as usize] {
        let mut b = [0u8; HEADER_LEN as usize];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        b[16..20].copy_from_slice(&self.block_size.to_le_bytes());
        b[20..24].copy_from_slice(&self.hash_id.to_le_bytes());
        for (i, v) in [
            self.data_size,
            self.meta_size,
            self.salt,
            self.generation,
            self.meta_digest,
            self.created_ms,
        ]
        .into_iter()
        .enumerate()
        {
            b[24 + 8 * i..32 + 8 * i].copy_from_slice(&v.to_le_bytes());
        }
        let sum = xxh3_64(&b[..504]);
        b[504..].copy_from_slice(&sum.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self, WriteLogError> {
        if b.len() < HEADER_LEN as usize || b[0..8] != MAGIC {
            return Err(WriteLogError::NotALog);
        }
        let version = get32(b, 8);
        if version != VERSION {
            return Err(WriteLogError::Version(version));
        }
        if get64(b, 504) != xxh3_64(&b[..504]) {
            return Err(WriteLogError::BadHeader);
        }
        Ok(Self {
            block_size: get32(b, 16),
            hash_id: get32(b, 20),
            data_size: get64(b, 24),
            meta_size: get64(b, 32),
            salt: get64(b, 40),
            generation: get64(b, 48),
            meta_digest: get64(b, 56),
            created_ms: get64(b, 64),
        })
    }
}

/// One record as read back. Write data stays in the file: `data_pos` is
/// where it starts, for [`LogFile::read_data`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Start {
        pid: u64,
        unix_ms: u64,
    },
    Stop,
    Write {
        dev: Dev,
        durable: bool,
        offset: u64,
        len: u64,
        data_pos: u64,
    },
    Zero {
        dev: Dev,
        offset: u64,
        len: u64,
    },
    Sync {
        dev: Dev,
        covers: u64,
    },
    GuestWrite {
        block: u64,
        began: u64,
        hashes: Vec<u64>,
    },
    GuestZero {
        block: u64,
        count: u64,
        began: u64,
    },
    GuestFlush {
        covers: u64,
    },
    Mark {
        name: String,
    },
}

/// A record and its number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub seq: u64,
    pub record: Record,
}

/// Encode a record header for `payload` (whose xxh3 is `payload_hash`).
pub(super) fn record_header(
    kind: u8,
    dev: Option<Dev>,
    seq: u64,
    payload_len: u32,
    payload_hash: u64,
) -> [u8; RECORD_HEADER] {
    let mut h = [0u8; RECORD_HEADER];
    h[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
    h[4] = kind;
    h[5] = dev.map_or(0, Dev::code);
    h[8..12].copy_from_slice(&payload_len.to_le_bytes());
    h[16..24].copy_from_slice(&seq.to_le_bytes());
    let sum = xxh3_64_with_seed(&h[..24], payload_hash);
    h[24..32].copy_from_slice(&sum.to_le_bytes());
    h
}

/// A log opened for reading: its header, every record that verifies, and
/// what followed the last of them.
#[derive(Debug)]
pub struct LogFile {
    file: File,
    pub header: Header,
    pub entries: Vec<Entry>,
    /// Byte offset just past the last good record.
    pub end: u64,
    /// Bytes after `end` that are not a whole, verified record (a torn
    /// tail, left by a process killed while appending).
    pub torn_bytes: u64,
}

impl LogFile {
    /// Read the header and walk every record.
    pub fn open(path: &Path) -> Result<Self, WriteLogError> {
        let file = File::open(path).map_err(WriteLogError::io("opening", path))?;
        Self::from_file(file, path)
    }

    pub(super) fn from_file(file: File, path: &Path) -> Result<Self, WriteLogError> {
        let len = file
            .metadata()
            .map_err(WriteLogError::io("reading", path))?
            .len();
        let mut r = BufReader::with_capacity(1 << 20, &file);
        let mut hb = [0u8; HEADER_LEN as usize];
        match r.read_exact(&mut hb) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(WriteLogError::NotALog)
            }
            Err(e) => return Err(WriteLogError::io("reading", path)(e)),
        }
        let header = Header::decode(&hb)?;
        let mut entries = Vec::new();
        let mut pos = HEADER_LEN;
        let mut payload = Vec::new();
        loop {
            match read_record(&mut r, pos, entries.len() as u64, &mut payload) {
                Ok(Some((entry, size))) => {
                    entries.push(entry);
                    pos += size;
                }
                Ok(None) => break,
                Err(e) => return Err(WriteLogError::io("reading", path)(e)),
            }
        }
        drop(r);
        Ok(Self {
            file,
            header,
            entries,
            end: pos,
            torn_bytes: len.saturating_sub(pos),
        })
    }

    /// The bytes of a write record.
    pub fn read_data(&self, data_pos: u64, len: u64, buf: &mut Vec<u8>) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let n = usize::try_from(len).map_err(|_| io::Error::other("write too large"))?;
        buf.resize(n, 0);
        self.file.read_exact_at(buf, data_pos)
    }
}

/// The record at `pos`, if a whole one that verifies is there; its size.
fn read_record(
    r: &mut impl Read,
    pos: u64,
    want_seq: u64,
    payload: &mut Vec<u8>,
) -> io::Result<Option<(Entry, u64)>> {
    let mut h = [0u8; RECORD_HEADER];
    if !read_full(r, &mut h)? {
        return Ok(None);
    }
    let len = get32(&h, 8);
    if get32(&h, 0) != RECORD_MAGIC || len > MAX_PAYLOAD || get64(&h, 16) != want_seq {
        return Ok(None);
    }
    payload.resize(len as usize, 0);
    if !read_full(r, payload)? {
        return Ok(None);
    }
    if get64(&h, 24) != xxh3_64_with_seed(&h[..24], xxh3_64(payload)) {
        return Ok(None);
    }
    let data_pos = pos + RECORD_HEADER as u64 + 8;
    let Some(record) = decode_payload(h[4], h[5], payload, data_pos) else {
        return Ok(None);
    };
    Ok(Some((
        Entry {
            seq: want_seq,
            record,
        },
        RECORD_HEADER as u64 + u64::from(len),
    )))
}

/// Fill `buf`; `false` at a clean or partial end of file.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<bool> {
    let mut done = 0;
    while done < buf.len() {
        match r.read(&mut buf[done..]) {
            Ok(0) => return Ok(false),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

fn decode_payload(kind: u8, dev: u8, p: &[u8], data_pos: u64) -> Option<Record> {
    let word = |i: usize| p.get(8 * i..8 * i + 8).map(|b| get64(b, 0));
    let dev = Dev::from_code(dev);
    Some(match kind {
        kind::START if p.len() == 16 => Record::Start {
            pid: word(0)?,
            unix_ms: word(1)?,
        },
        kind::STOP if p.is_empty() => Record::Stop,
        kind::WRITE | kind::WRITE_DURABLE if p.len() >= 8 => Record::Write {
            dev: dev?,
            durable: kind == kind::WRITE_DURABLE,
            offset: word(0)?,
            len: p.len() as u64 - 8,
            data_pos,
        },
        kind::ZERO if p.len() == 16 => Record::Zero {
            dev: dev?,
            offset: word(0)?,
            len: word(1)?,
        },
        kind::SYNC if p.len() == 8 => Record::Sync {
            dev: dev?,
            covers: word(0)?,
        },
        kind::GUEST_WRITE if p.len() >= 24 && p.len().is_multiple_of(8) => Record::GuestWrite {
            block: word(0)?,
            began: word(1)?,
            hashes: p[16..].chunks_exact(8).map(|c| get64(c, 0)).collect(),
        },
        kind::GUEST_ZERO if p.len() == 24 => Record::GuestZero {
            block: word(0)?,
            count: word(1)?,
            began: word(2)?,
        },
        kind::GUEST_FLUSH if p.len() == 8 => Record::GuestFlush { covers: word(0)? },
        kind::MARK if p.len() <= MAX_MARK => Record::Mark {
            name: String::from_utf8(p.to_vec()).ok()?,
        },
        _ => return None,
    })
}

/// Counts of one device's records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct DeviceSummary {
    pub writes: u64,
    pub write_bytes: u64,
    /// Of `writes`, durable writes (`write_durable`).
    pub durable_writes: u64,
    pub zeroes: u64,
    pub syncs: u64,
}

/// A mark and where it is.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MarkAt {
    pub name: String,
    pub position: u64,
}

/// What `log-info` reports.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Summary {
    pub block_size: u32,
    pub data_size: u64,
    pub entries: u64,
    /// Bytes of good records and header.
    pub bytes: u64,
    pub torn_bytes: u64,
    /// twinsum processes that recorded (one per `serve`, restarts included).
    pub starts: u64,
    /// Orderly stops.
    pub stops: u64,
    /// Guest requests completed.
    pub writes: u64,
    pub write_blocks: u64,
    pub zeroes: u64,
    pub flushes: u64,
    pub marks: Vec<MarkAt>,
    pub data: DeviceSummary,
    pub meta: DeviceSummary,
}

impl LogFile {
    pub fn summary(&self) -> Summary {
        let mut s = Summary {
            block_size: self.header.block_size,
            data_size: self.header.data_size,
            entries: self.entries.len() as u64,
            bytes: self.end,
            torn_bytes: self.torn_bytes,
            starts: 0,
            stops: 0,
            writes: 0,
            write_blocks: 0,
            zeroes: 0,
            flushes: 0,
            marks: Vec::new(),
            data: DeviceSummary::default(),
            meta: DeviceSummary::default(),
        };
        for e in &self.entries {
            match &e.record {
                Record::Start { .. } => s.starts += 1,
                Record::Stop => s.stops += 1,
                Record::Write {
                    dev: d,
                    durable,
                    len,
                    ..
                } => {
                    let ds = device_summary(&mut s, *d);
                    ds.writes += 1;
                    ds.write_bytes += len;
                    ds.durable_writes += u64::from(*durable);
                }
                Record::Zero { dev: d, .. } => device_summary(&mut s, *d).zeroes += 1,
                Record::Sync { dev: d, .. } => device_summary(&mut s, *d).syncs += 1,
                Record::GuestWrite { hashes, .. } => {
                    s.writes += 1;
                    s.write_blocks += hashes.len() as u64;
                }
                Record::GuestZero { .. } => s.zeroes += 1,
                Record::GuestFlush { .. } => s.flushes += 1,
                Record::Mark { name } => s.marks.push(MarkAt {
                    name: name.clone(),
                    position: e.seq,
                }),
            }
        }
        s
    }
}

fn device_summary(s: &mut Summary, d: Dev) -> &mut DeviceSummary {
    match d {
        Dev::Data => &mut s.data,
        Dev::Meta => &mut s.meta,
    }
}
