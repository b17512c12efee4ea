//! virtio-blk request parsing (virtio 1.2 §5.2.6).
//!
//! [`Request::parse`] checks everything a guest controls — every link of
//! the descriptor chain ([`chain::walk`]), descriptor directions, lengths,
//! the status byte, sector ranges, guest addresses — before any I/O
//! happens. A malformed chain is refused whole, never served as the part
//! of it that looked valid. Nothing here trusts the chain's layout: the
//! header is the first 16 device-readable bytes and the status is the last
//! device-writable byte, however the driver split them into descriptors
//! (VIRTIO_F_ANY_LAYOUT is implied by VERSION_1).
//!
//! [`status_of`] is the single place that maps a failure to the status byte
//! the guest sees.

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

use super::chain::{self, ChainError, Desc, DescTable};
use super::guestmem;
use crate::integrity::EngineError;

/// virtio-blk addresses the disk in 512-byte sectors whatever the block size.
pub const SECTOR_SIZE: u64 = 512;
/// `struct virtio_blk_outhdr`: type, ioprio, sector.
pub const HEADER_LEN: usize = 16;
/// `struct virtio_blk_discard_write_zeroes`: sector, num_sectors, flags.
pub const SEGMENT_LEN: usize = 16;
/// The GET_ID string is at most this long (NUL-padded when shorter).
pub const ID_LEN: usize = 20;

/// What the parser checks a request against; fixed for the life of a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Logical block size in bytes (512 or 4096).
    pub block_size: u32,
    /// Disk size in blocks.
    pub blocks: u64,
    /// Largest IN/OUT payload accepted (seg_max * size_max).
    pub max_data_bytes: u64,
    /// Largest number of segments in one DISCARD / WRITE_ZEROES.
    pub max_zero_segments: u32,
    /// Largest number of sectors in one DISCARD / WRITE_ZEROES segment.
    pub max_zero_sectors: u32,
}

impl Limits {
    fn sectors_per_block(&self) -> u64 {
        u64::from(self.block_size) / SECTOR_SIZE
    }

    /// Disk size in 512-byte sectors (the config space `capacity`).
    pub fn capacity_sectors(&self) -> u64 {
        self.blocks.saturating_mul(self.sectors_per_block())
    }

    /// Turn `count` sectors at `sector` into a block range, checking
    /// alignment, overflow and the end of the disk.
    fn block_range(&self, sector: u64, count: u64) -> Result<(u64, u64), RequestError> {
        let spb = self.sectors_per_block();
        if spb == 0 || !sector.is_multiple_of(spb) {
            return Err(RequestError::UnalignedSector {
                sector,
                block_size: self.block_size,
            });
        }
        if !count.is_multiple_of(spb) {
            return Err(RequestError::UnalignedLength {
                len: count.saturating_mul(SECTOR_SIZE),
                block_size: self.block_size,
            });
        }
        let capacity = self.capacity_sectors();
        match sector.checked_add(count) {
            Some(end) if end <= capacity => Ok((sector / spb, count / spb)),
            _ => Err(RequestError::OutOfRange {
                sector,
                count,
                capacity,
            }),
        }
    }
}

/// One guest buffer (a descriptor, or part of one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// Guest buffers in chain order.
pub type Segments = Vec<Segment>;

/// A parsed request. Blocks are in units of the disk's block size.
#[derive(Debug, PartialEq, Eq)]
pub enum Kind {
    /// Read `len` bytes at `block` into the guest's `data` buffers.
    Read {
        block: u64,
        len: usize,
        data: Segments,
    },
    /// Write the guest's `data` buffers (`len` bytes) at `block`.
    Write {
        block: u64,
        len: usize,
        data: Segments,
    },
    Flush,
    /// Copy the serial into `data` (`len` bytes of guest buffer).
    GetId {
        len: usize,
        data: Segments,
    },
    /// DISCARD or WRITE_ZEROES: every `(block, count)` range reads as zeros.
    Zero {
        ranges: Vec<(u64, u64)>,
    },
}

/// A request that passed every check.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    /// Head descriptor index, for `add_used`.
    pub head: u16,
    pub kind: Kind,
    /// Where the status byte goes (checked to be in guest memory).
    pub status: GuestAddress,
}

/// Why a request fails. [`status_of`] picks the status byte.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("descriptor chain has no device-writable status byte in guest memory")]
    NoStatus,
    #[error("request header is {0} bytes, 16 needed")]
    ShortHeader(usize),
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    #[error("{what} request carries {len} bytes of {direction} data")]
    WrongDirection {
        what: &'static str,
        direction: &'static str,
        len: u64,
    },
    #[error("guest range {addr:#x}+{len} is outside guest memory")]
    GuestMemory { addr: u64, len: u64 },
    #[error("length {len} is not a multiple of the {block_size}-byte block")]
    UnalignedLength { len: u64, block_size: u32 },
    #[error("sector {sector} is not aligned to the {block_size}-byte block")]
    UnalignedSector { sector: u64, block_size: u32 },
    #[error("sectors {sector}+{count} are past the end of the disk ({capacity} sectors)")]
    OutOfRange {
        sector: u64,
        count: u64,
        capacity: u64,
    },
    #[error("request of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: u64, max: u64 },
    #[error("{len} bytes of discard/write-zeroes segments (1..={max} segments of 16 bytes)")]
    BadSegments { len: u64, max: u32 },
    #[error("discard/write-zeroes segment of {count} sectors exceeds the {max}-sector limit")]
    SegmentTooLarge { count: u64, max: u32 },
    #[error("discard/write-zeroes flags {0:#x} are not supported")]
    UnsupportedFlags(u32),
    #[error("request type {0} is not supported")]
    UnsupportedType(u32),
    #[error("the disk is read-only")]
    ReadOnly,
    #[error("the disk has stopped: {0}")]
    Halted(&'static str),
    #[error("malformed descriptor chain: {0}")]
    Chain(#[from] ChainError),
    #[error(
        "guest memory {addr:#x}+{len} faulted: the file behind it shrank (requests touching \
         that memory fail until a new memory table)"
    )]
    GuestFault { addr: u64, len: u64 },
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl RequestError {
    fn wrong(what: &'static str, direction: &'static str, len: u64) -> Self {
        Self::WrongDirection {
            what,
            direction,
            len,
        }
    }
}

/// A request that cannot be served, and where (if anywhere) to say so.
#[derive(Debug)]
pub struct ParseError {
    pub head: u16,
    /// `None` when the chain has no usable status byte: it is completed with
    /// used length 0 and nothing is written.
    pub status: Option<GuestAddress>,
    pub error: RequestError,
}

/// The one mapping from failures to virtio-blk status bytes.
pub fn status_of(error: &RequestError) -> u8 {
    let status = match error {
        RequestError::UnsupportedType(_) | RequestError::UnsupportedFlags(_) => VIRTIO_BLK_S_UNSUPP,
        _ => VIRTIO_BLK_S_IOERR,
    };
    status as u8
}

impl Request {
    /// Bytes of guest data the request moves to or from the disk.
    pub fn data_len(&self) -> usize {
        match &self.kind {
            Kind::Read { len, .. } | Kind::Write { len, .. } => *len,
            _ => 0,
        }
    }

    /// Read, check and parse the descriptor chain at `head` of `table`.
    pub fn parse<M: GuestMemory + ?Sized>(
        mem: &M,
        table: DescTable,
        head: u16,
        limits: &Limits,
    ) -> Result<Request, ParseError> {
        let descs = chain::walk(mem, table, head).map_err(|bad| {
            // Report the error where the chain's status byte would be if
            // it ended here: the last device-writable byte read.
            let (_, mut writable, _) = split(&bad.prefix);
            ParseError {
                head,
                status: take_status(mem, &mut writable),
                error: bad.error.into(),
            }
        })?;
        let (readable, mut writable, misordered) = split(&descs);
        let status = take_status(mem, &mut writable).ok_or(ParseError {
            head,
            status: None,
            error: RequestError::NoStatus,
        })?;
        let fail = |error| ParseError {
            head,
            status: Some(status),
            error,
        };
        if misordered {
            return Err(fail(RequestError::ReadableAfterWritable));
        }
        check_memory(mem, &readable, Permissions::Read).map_err(fail)?;
        check_memory(mem, &writable, Permissions::Write).map_err(fail)?;
        let kind = parse_body(mem, limits, readable, writable).map_err(fail)?;
        Ok(Request { head, kind, status })
    }
}

/// Device-readable and device-writable buffers in chain order, and whether
/// a readable one came after a writable one.
fn split(descs: &[Desc]) -> (Segments, Segments, bool) {
    let mut readable = Segments::new();
    let mut writable = Segments::new();
    let mut misordered = false;
    for d in descs {
        let seg = Segment {
            addr: d.addr,
            len: d.len,
        };
        if d.is_write_only() {
            writable.push(seg);
        } else {
            misordered |= !writable.is_empty();
            readable.push(seg);
        }
    }
    (readable, writable, misordered)
}

/// Split the status byte off the end of the device-writable buffers.
fn take_status<M: GuestMemory + ?Sized>(mem: &M, writable: &mut Segments) -> Option<GuestAddress> {
    while writable.last().is_some_and(|s| s.len == 0) {
        writable.pop();
    }
    let last = writable.last_mut()?;
    let addr = last.addr.checked_add(u64::from(last.len) - 1)?;
    if !mem.check_range(addr, 1, Permissions::Write) {
        return None;
    }
    last.len -= 1;
    if last.len == 0 {
        writable.pop();
    }
    Some(addr)
}

fn check_memory<M: GuestMemory + ?Sized>(
    mem: &M,
    segs: &[Segment],
    access: Permissions,
) -> Result<(), RequestError> {
    for s in segs {
        if s.len > 0 && !mem.check_range(s.addr, s.len as usize, access) {
            return Err(RequestError::GuestMemory {
                addr: s.addr.raw_value(),
                len: u64::from(s.len),
            });
        }
    }
    Ok(())
}

/// Total bytes in `segs`.
pub fn total_len(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

/// Drop the first `n` bytes of `segs`.
fn skip_front(segs: &mut Segments, mut n: u64) {
    let mut drop = 0;
    for s in segs.iter_mut() {
        if n == 0 {
            break;
        }
        let take = n.min(u64::from(s.len));
        // `take` fits in u32: it is at most s.len. The range was checked
        // against guest memory, so the sum cannot wrap.
        s.addr = GuestAddress(s.addr.raw_value().wrapping_add(take));
        s.len -= take as u32;
        n -= take;
        if s.len == 0 {
            drop += 1;
        }
    }
    segs.drain(..drop);
}

/// Copy guest buffers into `out` (which must not be longer than `segs`).
pub fn gather<M: GuestMemory + ?Sized>(
    mem: &M,
    segs: &[Segment],
    out: &mut [u8],
) -> Result<(), RequestError> {
    let mut off = 0;
    for s in segs {
        if off == out.len() {
            break;
        }
        let n = (out.len() - off).min(s.len as usize);
        let buf = &mut out[off..off + n];
        guest_copy(mem, s.addr, n, || mem.read_slice(buf, s.addr))?;
        off += n;
    }
    Ok(())
}

/// Copy `data` into guest buffers (as much as fits).
pub fn scatter<M: GuestMemory + ?Sized>(
    mem: &M,
    segs: &[Segment],
    data: &[u8],
) -> Result<(), RequestError> {
    let mut off = 0;
    for s in segs {
        if off == data.len() {
            break;
        }
        let n = (data.len() - off).min(s.len as usize);
        let buf = &data[off..off + n];
        guest_copy(mem, s.addr, n, || mem.write_slice(buf, s.addr))?;
        off += n;
    }
    Ok(())
}

/// Write the status byte. Unlike data, it is written even into memory
/// that has faulted before: it costs nothing if it is lost, and the guest
/// may still see it if its page survived.
pub fn write_status<M: GuestMemory + ?Sized>(
    mem: &M,
    addr: GuestAddress,
    status: u8,
) -> Result<(), RequestError> {
    match guestmem::guarded(|| mem.write_slice(&[status], addr)) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(RequestError::GuestMemory {
            addr: addr.raw_value(),
            len: 1,
        }),
        Err(guestmem::Fault) => Err(RequestError::GuestFault {
            addr: addr.raw_value(),
            len: 1,
        }),
    }
}

/// One copy of `len` bytes at `addr` (`copy`), failed if guest memory
/// faults during it or had faulted before: either way, what it read or
/// wrote is not the guest's memory any more.
fn guest_copy<M: GuestMemory + ?Sized, E>(
    mem: &M,
    addr: GuestAddress,
    len: usize,
    copy: impl FnOnce() -> Result<(), E>,
) -> Result<(), RequestError> {
    let fault = RequestError::GuestFault {
        addr: addr.raw_value(),
        len: len as u64,
    };
    if guestmem::poisoned(mem, addr, len) {
        return Err(fault);
    }
    match guestmem::guarded(copy) {
        Ok(Ok(())) => {}
        Ok(Err(_)) => {
            return Err(RequestError::GuestMemory {
                addr: addr.raw_value(),
                len: len as u64,
            })
        }
        Err(guestmem::Fault) => return Err(fault),
    }
    // Another thread's fault may have replaced a page under this copy.
    if guestmem::poisoned(mem, addr, len) {
        return Err(fault);
    }
    Ok(())
}

fn parse_body<M: GuestMemory + ?Sized>(
    mem: &M,
    limits: &Limits,
    mut readable: Segments,
    writable: Segments,
) -> Result<Kind, RequestError> {
    let readable_len = total_len(&readable);
    if readable_len < HEADER_LEN as u64 {
        return Err(RequestError::ShortHeader(readable_len as usize));
    }
    let mut header = [0u8; HEADER_LEN];
    gather(mem, &readable, &mut header)?;
    skip_front(&mut readable, HEADER_LEN as u64);
    let (ty, sector) = split_header(&header);
    let out_len = total_len(&readable);
    let in_len = total_len(&writable);

    match ty {
        VIRTIO_BLK_T_IN => {
            if out_len != 0 {
                return Err(RequestError::wrong("read", "device-readable", out_len));
            }
            let (block, len) = data_range(limits, sector, in_len)?;
            Ok(Kind::Read {
                block,
                len,
                data: writable,
            })
        }
        VIRTIO_BLK_T_OUT => {
            if in_len != 0 {
                return Err(RequestError::wrong("write", "device-writable", in_len));
            }
            let (block, len) = data_range(limits, sector, out_len)?;
            Ok(Kind::Write {
                block,
                len,
                data: readable,
            })
        }
        // A flush carries no data; like QEMU, ignore any the driver added.
        VIRTIO_BLK_T_FLUSH => Ok(Kind::Flush),
        VIRTIO_BLK_T_GET_ID => {
            if out_len != 0 {
                return Err(RequestError::wrong("get-id", "device-readable", out_len));
            }
            Ok(Kind::GetId {
                len: (in_len as usize).min(ID_LEN),
                data: writable,
            })
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            if in_len != 0 {
                return Err(RequestError::wrong("discard", "device-writable", in_len));
            }
            let discard = ty == VIRTIO_BLK_T_DISCARD;
            let ranges = parse_segments(mem, limits, &readable, out_len, discard)?;
            Ok(Kind::Zero { ranges })
        }
        other => Err(RequestError::UnsupportedType(other)),
    }
}

/// `(type, sector)` from `struct virtio_blk_outhdr` (ioprio is ignored).
fn split_header(h: &[u8; HEADER_LEN]) -> (u32, u64) {
    let ty = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
    let sector = u64::from_le_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
    (ty, sector)
}

/// Check an IN/OUT payload of `len` bytes at `sector`; return `(block, len)`.
fn data_range(limits: &Limits, sector: u64, len: u64) -> Result<(u64, usize), RequestError> {
    if len > limits.max_data_bytes {
        return Err(RequestError::TooLarge {
            len,
            max: limits.max_data_bytes,
        });
    }
    if !len.is_multiple_of(u64::from(limits.block_size)) {
        return Err(RequestError::UnalignedLength {
            len,
            block_size: limits.block_size,
        });
    }
    let (block, _) = limits.block_range(sector, len / SECTOR_SIZE)?;
    // `len` is at most max_data_bytes, which the caller keeps addressable.
    let len = usize::try_from(len).map_err(|_| RequestError::TooLarge {
        len,
        max: limits.max_data_bytes,
    })?;
    Ok((block, len))
}

fn parse_segments<M: GuestMemory + ?Sized>(
    mem: &M,
    limits: &Limits,
    segs: &[Segment],
    len: u64,
    discard: bool,
) -> Result<Vec<(u64, u64)>, RequestError> {
    let max = limits.max_zero_segments;
    let n = len / SEGMENT_LEN as u64;
    if len == 0 || !len.is_multiple_of(SEGMENT_LEN as u64) || n > u64::from(max) {
        return Err(RequestError::BadSegments { len, max });
    }
    // Bounded by max_zero_segments above.
    let mut raw = vec![0u8; len as usize];
    gather(mem, segs, &mut raw)?;
    let mut ranges = Vec::with_capacity(n as usize);
    for seg in raw.chunks_exact(SEGMENT_LEN) {
        let sector = u64::from_le_bytes([
            seg[0], seg[1], seg[2], seg[3], seg[4], seg[5], seg[6], seg[7],
        ]);
        let count = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
        let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
        // The unmap hint is fine for WRITE_ZEROES (we always unmap); for
        // DISCARD the spec reserves it, and every other bit is reserved.
        let allowed = if discard {
            0
        } else {
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        };
        if flags & !allowed != 0 {
            return Err(RequestError::UnsupportedFlags(flags));
        }
        if count > limits.max_zero_sectors {
            return Err(RequestError::SegmentTooLarge {
                count: u64::from(count),
                max: limits.max_zero_sectors,
            });
        }
        let (block, blocks) = limits.block_range(sector, u64::from(count))?;
        if blocks > 0 {
            ranges.push((block, blocks));
        }
    }
    Ok(ranges)
}

#[cfg(test)]
mod tests {
    use virtio_bindings::bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryMmap;

    use super::*;

    const MEM_SIZE: u64 = 0x100_0000;
    const HDR: u64 = 0x10_0000;
    const DATA: u64 = 0x20_0000;
    const STATUS: u64 = 0x30_0000;

    fn limits(block_size: u32) -> Limits {
        Limits {
            block_size,
            blocks: 1024 * 512 / u64::from(block_size),
            max_data_bytes: 1 << 20,
            max_zero_segments: 4,
            max_zero_sectors: 1 << 16,
        }
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
    }

    fn header(m: &GuestMemoryMmap, ty: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&ty.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        m.write_slice(&h, GuestAddress(HDR)).unwrap();
    }

    fn rd(addr: u64, len: u32) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, 0, 0))
    }

    fn wr(addr: u64, len: u32) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(
            addr,
            len,
            VRING_DESC_F_WRITE as u16,
            0,
        ))
    }

    /// Parse `descs` as one chain at the start of a 16-entry table.
    fn parse(
        m: &GuestMemoryMmap,
        descs: &[RawDescriptor],
        l: &Limits,
    ) -> Result<Request, ParseError> {
        let vq = MockSplitQueue::new(m, 16);
        let chain = vq.build_desc_chain(descs).unwrap();
        Request::parse(m, table_of(&vq), chain.head_index(), l)
    }

    fn table_of(vq: &MockSplitQueue<GuestMemoryMmap>) -> DescTable {
        DescTable {
            addr: vq.desc_table_addr(),
            size: 16,
        }
    }

    fn parse_err(m: &GuestMemoryMmap, descs: &[RawDescriptor], l: &Limits) -> ParseError {
        match parse(m, descs, l) {
            Ok(r) => panic!("expected an error, parsed {r:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn parses_a_read_with_split_data() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 8);
        let r = parse(
            &m,
            &[
                rd(HDR, 16),
                wr(DATA, 512),
                wr(DATA + 4096, 512),
                wr(STATUS, 1),
            ],
            &limits(512),
        )
        .unwrap();
        assert_eq!(r.status, GuestAddress(STATUS));
        match r.kind {
            Kind::Read { block, len, data } => {
                assert_eq!((block, len), (8, 1024));
                assert_eq!(data.len(), 2);
            }
            k => panic!("parsed {k:?}"),
        }
    }

    #[test]
    fn parses_a_write_in_4k_blocks() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_OUT, 16);
        let r = parse(
            &m,
            &[rd(HDR, 16), rd(DATA, 8192), wr(STATUS, 1)],
            &limits(4096),
        )
        .unwrap();
        assert_eq!(
            r.kind,
            Kind::Write {
                block: 2,
                len: 8192,
                data: vec![Segment {
                    addr: GuestAddress(DATA),
                    len: 8192
                }]
            }
        );
    }

    #[test]
    fn header_and_status_may_share_descriptors_with_data() {
        // ANY_LAYOUT: header + data in one readable descriptor, status at
        // the end of the last writable one.
        let m = mem();
        header(&m, VIRTIO_BLK_T_OUT, 0);
        let r = parse(&m, &[rd(HDR, 16 + 512), wr(STATUS, 1)], &limits(512)).unwrap();
        assert_eq!(
            r.kind,
            Kind::Write {
                block: 0,
                len: 512,
                data: vec![Segment {
                    addr: GuestAddress(HDR + 16),
                    len: 512
                }]
            }
        );
        header(&m, VIRTIO_BLK_T_IN, 0);
        let r = parse(&m, &[rd(HDR, 16), wr(DATA, 513)], &limits(512)).unwrap();
        assert_eq!(r.status, GuestAddress(DATA + 512));
        assert!(matches!(r.kind, Kind::Read { len: 512, .. }));
    }

    #[test]
    fn chain_without_writable_descriptor_has_no_status() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_OUT, 0);
        let e = parse_err(&m, &[rd(HDR, 16), rd(DATA, 512)], &limits(512));
        assert!(e.status.is_none());
        assert!(matches!(e.error, RequestError::NoStatus));
    }

    #[test]
    fn status_outside_guest_memory_means_no_status() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_FLUSH, 0);
        let e = parse_err(&m, &[rd(HDR, 16), wr(MEM_SIZE + 10, 1)], &limits(512));
        assert!(e.status.is_none());
    }

    #[test]
    fn short_or_missing_header_is_ioerr() {
        let m = mem();
        let e = parse_err(&m, &[rd(HDR, 8), wr(STATUS, 1)], &limits(512));
        assert!(matches!(e.error, RequestError::ShortHeader(8)));
        assert_eq!(e.status, Some(GuestAddress(STATUS)));
        assert_eq!(status_of(&e.error), VIRTIO_BLK_S_IOERR as u8);
        let e = parse_err(&m, &[wr(STATUS, 1)], &limits(512));
        assert!(matches!(e.error, RequestError::ShortHeader(0)));
    }

    #[test]
    fn data_in_the_wrong_direction_is_ioerr() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 0);
        let e = parse_err(
            &m,
            &[rd(HDR, 16), rd(DATA, 512), wr(STATUS, 1)],
            &limits(512),
        );
        assert!(matches!(e.error, RequestError::WrongDirection { .. }));
        header(&m, VIRTIO_BLK_T_OUT, 0);
        let e = parse_err(
            &m,
            &[rd(HDR, 16), wr(DATA, 512), wr(STATUS, 1)],
            &limits(512),
        );
        assert!(matches!(e.error, RequestError::WrongDirection { .. }));
        assert_eq!(status_of(&e.error), VIRTIO_BLK_S_IOERR as u8);
    }

    #[test]
    fn readable_after_writable_is_ioerr() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_OUT, 0);
        let e = parse_err(
            &m,
            &[rd(HDR, 16), wr(DATA, 512), rd(DATA, 512), wr(STATUS, 1)],
            &limits(512),
        );
        assert!(matches!(e.error, RequestError::ReadableAfterWritable));
    }

    #[test]
    fn length_not_a_multiple_of_the_block_is_ioerr() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_OUT, 0);
        let e = parse_err(
            &m,
            &[rd(HDR, 16), rd(DATA, 500), wr(STATUS, 1)],
            &limits(512),
        );
        assert!(matches!(e.error, RequestError::UnalignedLength { .. }));
        let e = parse_err(
            &m,
            &[rd(HDR, 16), rd(DATA, 1024), wr(STATUS, 1)],
            &limits(4096),
        );
        assert!(matches!(e.error, RequestError::UnalignedLength { .. }));
        header(&m, VIRTIO_BLK_T_IN, 1);
        let e = parse_err(
            &m,
            &[rd(HDR, 16), wr(DATA, 4096), wr(STATUS, 1)],
            &limits(4096),
        );
        assert!(matches!(e.error, RequestError::UnalignedSector { .. }));
    }

    #[test]
    fn sector_past_the_end_or_overflowing_is_ioerr() {
        let m = mem();
        let l = limits(512);
        header(&m, VIRTIO_BLK_T_IN, l.capacity_sectors() - 1);
        let e = parse_err(&m, &[rd(HDR, 16), wr(DATA, 1024), wr(STATUS, 1)], &l);
        assert!(matches!(e.error, RequestError::OutOfRange { .. }));
        header(&m, VIRTIO_BLK_T_IN, u64::MAX);
        let e = parse_err(&m, &[rd(HDR, 16), wr(DATA, 512), wr(STATUS, 1)], &l);
        assert!(matches!(e.error, RequestError::OutOfRange { .. }));
        // The last sector itself is fine.
        header(&m, VIRTIO_BLK_T_IN, l.capacity_sectors() - 1);
        parse(&m, &[rd(HDR, 16), wr(DATA, 512), wr(STATUS, 1)], &l).unwrap();
    }

    #[test]
    fn data_outside_guest_memory_is_ioerr() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_OUT, 0);
        let e = parse_err(
            &m,
            &[rd(HDR, 16), rd(MEM_SIZE - 256, 512), wr(STATUS, 1)],
            &limits(512),
        );
        assert!(matches!(e.error, RequestError::GuestMemory { .. }));
        header(&m, VIRTIO_BLK_T_IN, 0);
        let e = parse_err(
            &m,
            &[rd(HDR, 16), wr(u64::MAX - 100, 512), wr(STATUS, 1)],
            &limits(512),
        );
        assert!(matches!(e.error, RequestError::GuestMemory { .. }));
    }

    #[test]
    fn oversized_request_is_ioerr() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 0);
        let e = parse_err(
            &m,
            &[rd(HDR, 16), wr(DATA, 2 << 20), wr(STATUS, 1)],
            &limits(512),
        );
        assert!(matches!(e.error, RequestError::TooLarge { .. }));
    }

    #[test]
    fn unknown_type_is_unsupp() {
        let m = mem();
        header(&m, 2, 0); // SCSI_CMD
        let e = parse_err(&m, &[rd(HDR, 16), wr(STATUS, 1)], &limits(512));
        assert!(matches!(e.error, RequestError::UnsupportedType(2)));
        assert_eq!(status_of(&e.error), VIRTIO_BLK_S_UNSUPP as u8);
    }

    #[test]
    fn get_id_and_flush_parse() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_GET_ID, 0);
        let r = parse(
            &m,
            &[rd(HDR, 16), wr(DATA, 64), wr(STATUS, 1)],
            &limits(512),
        )
        .unwrap();
        assert!(matches!(r.kind, Kind::GetId { len: 20, .. }));
        header(&m, VIRTIO_BLK_T_FLUSH, 0);
        let r = parse(&m, &[rd(HDR, 16), wr(STATUS, 1)], &limits(512)).unwrap();
        assert_eq!(r.kind, Kind::Flush);
    }

    fn zero_segment(m: &GuestMemoryMmap, at: u64, sector: u64, count: u32, flags: u32) {
        let mut s = [0u8; 16];
        s[..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&count.to_le_bytes());
        s[12..].copy_from_slice(&flags.to_le_bytes());
        m.write_slice(&s, GuestAddress(at)).unwrap();
    }

    #[test]
    fn parses_discard_and_write_zeroes_segments() {
        let m = mem();
        let l = limits(4096);
        header(&m, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        zero_segment(&m, DATA, 8, 16, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
        zero_segment(&m, DATA + 16, 64, 8, 0);
        let r = parse(&m, &[rd(HDR, 16), rd(DATA, 32), wr(STATUS, 1)], &l).unwrap();
        assert_eq!(
            r.kind,
            Kind::Zero {
                ranges: vec![(1, 2), (8, 1)]
            }
        );
        header(&m, VIRTIO_BLK_T_DISCARD, 0);
        zero_segment(&m, DATA, 8, 16, 0);
        let r = parse(&m, &[rd(HDR, 16), rd(DATA, 16), wr(STATUS, 1)], &l).unwrap();
        assert_eq!(
            r.kind,
            Kind::Zero {
                ranges: vec![(1, 2)]
            }
        );
    }

    #[test]
    fn bad_discard_segments_are_refused() {
        let m = mem();
        let l = limits(4096);
        header(&m, VIRTIO_BLK_T_DISCARD, 0);
        // Unmap is reserved for discard.
        zero_segment(&m, DATA, 8, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
        let e = parse_err(&m, &[rd(HDR, 16), rd(DATA, 16), wr(STATUS, 1)], &l);
        assert_eq!(status_of(&e.error), VIRTIO_BLK_S_UNSUPP as u8);
        // Misaligned to the 4 KiB block.
        zero_segment(&m, DATA, 9, 8, 0);
        let e = parse_err(&m, &[rd(HDR, 16), rd(DATA, 16), wr(STATUS, 1)], &l);
        assert!(matches!(e.error, RequestError::UnalignedSector { .. }));
        // Past the end.
        zero_segment(&m, DATA, l.capacity_sectors(), 8, 0);
        let e = parse_err(&m, &[rd(HDR, 16), rd(DATA, 16), wr(STATUS, 1)], &l);
        assert!(matches!(e.error, RequestError::OutOfRange { .. }));
        // Not a whole number of segments, none at all, too many.
        for len in [15, 0, 5 * 16] {
            let mut d = vec![rd(HDR, 16)];
            if len > 0 {
                d.push(rd(DATA, len));
            }
            d.push(wr(STATUS, 1));
            let e = parse_err(&m, &d, &l);
            assert!(
                matches!(e.error, RequestError::BadSegments { .. }),
                "{len}: {e:?}"
            );
        }
    }

    /// Put `table` entries in a 16-entry descriptor table, make `head` the
    /// only available chain, and parse it.
    fn parse_table(
        m: &GuestMemoryMmap,
        table: &[(u16, RawDescriptor)],
        head: u16,
    ) -> Result<Request, ParseError> {
        let vq = MockSplitQueue::new(m, 16);
        for &(i, d) in table {
            vq.desc_table().store(i, d).unwrap();
        }
        Request::parse(m, table_of(&vq), head, &limits(512))
    }

    /// `d` linked to `next`.
    fn link(d: RawDescriptor, next: u16) -> RawDescriptor {
        let d = SplitDescriptor::from(d);
        RawDescriptor::from(SplitDescriptor::new(
            d.addr().0,
            d.len(),
            d.flags() | VRING_DESC_F_NEXT as u16,
            next,
        ))
    }

    fn indirect(addr: u64, entries: u32) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(
            addr,
            entries * 16,
            VRING_DESC_F_INDIRECT as u16,
            0,
        ))
    }

    /// Write `entries` as an indirect table at `at`.
    fn indirect_table(m: &GuestMemoryMmap, at: u64, entries: &[RawDescriptor]) {
        for (i, d) in entries.iter().enumerate() {
            m.write_obj(*d, GuestAddress(at + 16 * i as u64)).unwrap();
        }
    }

    /// The chain was refused as malformed, never parsed as its prefix.
    fn assert_malformed(r: Result<Request, ParseError>, what: &str) -> ParseError {
        match r {
            Ok(r) => panic!("{what}: parsed as {r:?}"),
            Err(e) => {
                assert!(
                    matches!(e.error, RequestError::Chain(_)),
                    "{what}: refused for another reason: {e:?}"
                );
                assert_eq!(status_of(&e.error), VIRTIO_BLK_S_IOERR as u8);
                e
            }
        }
    }

    const TABLE: u64 = 0x40_0000;

    #[test]
    fn a_descriptor_that_links_to_itself_is_malformed() {
        // A valid write, then a zero-length descriptor looping on itself:
        // the prefix the ring iterator gives up on is a valid request.
        let m = mem();
        header(&m, VIRTIO_BLK_T_OUT, 0);
        let e = assert_malformed(
            parse_table(
                &m,
                &[
                    (0, link(rd(HDR, 16), 1)),
                    (1, link(rd(DATA, 512), 2)),
                    (2, link(wr(STATUS, 1), 3)),
                    (3, link(wr(STATUS, 0), 3)),
                ],
                0,
            ),
            "self loop",
        );
        assert_eq!(e.status, Some(GuestAddress(STATUS)), "IOERR can be written");
    }

    #[test]
    fn a_loop_back_to_an_earlier_descriptor_is_malformed() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_FLUSH, 0);
        assert_malformed(
            parse_table(
                &m,
                &[
                    (0, link(rd(HDR, 16), 1)),
                    (1, link(wr(STATUS, 1), 2)),
                    (2, link(wr(STATUS, 0), 1)),
                ],
                0,
            ),
            "loop to an earlier descriptor",
        );
    }

    #[test]
    fn a_loop_inside_an_indirect_table_is_malformed() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_OUT, 0);
        indirect_table(
            &m,
            TABLE,
            &[
                link(rd(HDR, 16), 1),
                link(rd(DATA, 512), 2),
                link(wr(STATUS, 1), 3),
                link(wr(STATUS, 0), 3),
            ],
        );
        assert_malformed(
            parse_table(&m, &[(5, indirect(TABLE, 4))], 5),
            "loop in an indirect table",
        );
    }

    #[test]
    fn a_chain_longer_than_the_queue_is_malformed() {
        // Every one of the 16 descriptors once, and the last still wants
        // more: a cycle through the whole table.
        let m = mem();
        header(&m, VIRTIO_BLK_T_FLUSH, 0);
        let mut table = vec![(0, link(rd(HDR, 16), 1)), (1, link(wr(STATUS, 1), 2))];
        for i in 2..16 {
            table.push((i, link(wr(STATUS, 0), if i == 15 { 2 } else { i + 1 })));
        }
        assert_malformed(parse_table(&m, &table, 0), "17 links in a 16-entry table");
    }

    #[test]
    fn a_next_past_the_table_is_malformed() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_OUT, 0);
        let e = assert_malformed(
            parse_table(
                &m,
                &[
                    (0, link(rd(HDR, 16), 1)),
                    (1, link(rd(DATA, 512), 2)),
                    (2, link(wr(STATUS, 1), 16)),
                ],
                0,
            ),
            "next = 16 in a 16-entry table",
        );
        assert_eq!(e.status, Some(GuestAddress(STATUS)));
        // The same inside an indirect table of 3 entries.
        indirect_table(
            &m,
            TABLE,
            &[
                link(rd(HDR, 16), 1),
                link(rd(DATA, 512), 2),
                link(wr(STATUS, 1), 3),
            ],
        );
        assert_malformed(
            parse_table(&m, &[(0, indirect(TABLE, 3))], 0),
            "next = 3 in a 3-entry indirect table",
        );
    }

    #[test]
    fn a_nested_indirect_descriptor_is_malformed() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_OUT, 0);
        indirect_table(&m, TABLE + 0x1000, &[wr(STATUS, 0)]);
        indirect_table(
            &m,
            TABLE,
            &[
                link(rd(HDR, 16), 1),
                link(rd(DATA, 512), 2),
                link(wr(STATUS, 1), 3),
                indirect(TABLE + 0x1000, 1),
            ],
        );
        assert_malformed(
            parse_table(&m, &[(0, indirect(TABLE, 4))], 0),
            "indirect inside indirect",
        );
    }

    #[test]
    fn an_indirect_table_past_the_end_of_memory_is_malformed() {
        // Four entries, the last one past the end of guest memory.
        let m = mem();
        header(&m, VIRTIO_BLK_T_OUT, 0);
        let at = MEM_SIZE - 48;
        indirect_table(
            &m,
            at,
            &[
                link(rd(HDR, 16), 1),
                link(rd(DATA, 512), 2),
                link(wr(STATUS, 1), 3),
            ],
        );
        assert_malformed(
            parse_table(&m, &[(0, indirect(at, 4))], 0),
            "a chain running off the end of memory",
        );
        // Even when the chain itself ends before the end of memory.
        indirect_table(
            &m,
            at,
            &[link(rd(HDR, 16), 1), link(rd(DATA, 512), 2), wr(STATUS, 1)],
        );
        assert_malformed(
            parse_table(&m, &[(0, indirect(at, 4))], 0),
            "a table straddling the end of memory",
        );
    }

    #[test]
    fn gather_and_scatter_follow_segments() {
        let m = mem();
        let segs = vec![
            Segment {
                addr: GuestAddress(DATA),
                len: 3,
            },
            Segment {
                addr: GuestAddress(DATA + 100),
                len: 5,
            },
        ];
        scatter(&m, &segs, b"abcdefgh").unwrap();
        let mut out = [0u8; 8];
        gather(&m, &segs, &mut out).unwrap();
        assert_eq!(&out, b"abcdefgh");
        let mut two = [0u8; 2];
        m.read_slice(&mut two, GuestAddress(DATA + 100)).unwrap();
        assert_eq!(&two, b"de");
    }
}
