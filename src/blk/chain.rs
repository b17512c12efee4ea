//! Walking a split-ring descriptor chain without trusting any link of it
//! (virtio 1.2 §2.7.5).
//!
//! virtio-queue's `DescriptorChain` iterator simply stops at a bad link —
//! a `next` past the table, a loop that exhausts its budget, a nested
//! indirect table, a descriptor it cannot read — and its caller sees a
//! shorter chain that may well be a valid request. [`walk`] reads the
//! chain itself and refuses it instead, as QEMU (`virtqueue_split_pop`,
//! "Looped descriptor") and Linux (`vhost_get_vq_desc`) do: a chain is
//! either read to a descriptor without `NEXT`, or it is malformed.
//!
//! Each descriptor is read from guest memory exactly once, so a guest that
//! rewrites its table meanwhile cannot make the walk see two versions.

use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

use super::guestmem;

/// Bytes of one split-ring descriptor.
const DESC_LEN: u64 = 16;
/// Entries an indirect table may have: `next` is 16 bits, and Linux's
/// vhost refuses bigger tables too.
const MAX_INDIRECT: u64 = 1 << 16;

/// Where a queue's descriptor table is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DescTable {
    pub addr: GuestAddress,
    /// Entries, i.e. the queue size.
    pub size: u16,
}

/// One descriptor as read from guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    pub addr: GuestAddress,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

impl Desc {
    pub fn is_write_only(&self) -> bool {
        self.flags & VRING_DESC_F_WRITE as u16 != 0
    }

    fn has_next(&self) -> bool {
        self.flags & VRING_DESC_F_NEXT as u16 != 0
    }

    fn is_indirect(&self) -> bool {
        self.flags & VRING_DESC_F_INDIRECT as u16 != 0
    }
}

/// Why a chain is malformed. Every variant is the guest's doing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("head {head} is past the {size}-entry descriptor table")]
    HeadOutOfRange { head: u16, size: u16 },
    #[error("{table} entry {index} links to {next}, past its {size} entries")]
    NextOutOfRange {
        table: &'static str,
        index: u16,
        next: u16,
        size: u64,
    },
    #[error("the chain has more links than its {size}-entry {table} (a loop)")]
    TooLong { table: &'static str, size: u64 },
    #[error("{table} entry {index} at {addr:#x} is outside guest memory")]
    TableOutsideMemory {
        table: &'static str,
        index: u16,
        addr: u64,
    },
    #[error("indirect table {addr:#x}+{len} is not inside guest memory")]
    IndirectOutsideMemory { addr: u64, len: u32 },
    #[error("indirect table of {len} bytes (a multiple of 16 up to 1 MiB is needed)")]
    IndirectLength { len: u32 },
    #[error("an indirect table holds another indirect descriptor")]
    NestedIndirect,
    #[error("an indirect descriptor also has NEXT set")]
    IndirectWithNext,
    #[error("the chain's buffers add up to more than 4 GiB")]
    TooManyBytes,
    #[error("reading {table} entry {index} faulted (the file behind guest memory shrank?)")]
    Fault { table: &'static str, index: u16 },
}

/// A chain that could not be walked to its end, and what was read of it
/// before the bad link (to find a status byte to report the error in).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed {
    pub error: ChainError,
    pub prefix: Vec<Desc>,
}

/// The descriptor table being walked: the queue's, or an indirect one.
struct Table {
    addr: GuestAddress,
    size: u64,
    name: &'static str,
}

/// Read every descriptor of the chain at `head`, following one level of
/// indirection, and check every link. Descriptors with the indirect flag
/// are consumed, not returned.
pub fn walk<M: GuestMemory + ?Sized>(
    mem: &M,
    table: DescTable,
    head: u16,
) -> Result<Vec<Desc>, Malformed> {
    let mut descs = Vec::new();
    match walk_into(mem, table, head, &mut descs) {
        Ok(()) => Ok(descs),
        Err(error) => Err(Malformed {
            error,
            prefix: descs,
        }),
    }
}

fn walk_into<M: GuestMemory + ?Sized>(
    mem: &M,
    table: DescTable,
    head: u16,
    descs: &mut Vec<Desc>,
) -> Result<(), ChainError> {
    if head >= table.size {
        return Err(ChainError::HeadOutOfRange {
            head,
            size: table.size,
        });
    }
    let mut t = Table {
        addr: table.addr,
        size: u64::from(table.size),
        name: "descriptor table",
    };
    let mut indirect = false;
    let mut index = head;
    // A chain without loops visits each entry of a table at most once, so
    // more links than entries is a loop (or a driver bug of the same
    // effect); each table gets its own budget.
    let mut budget = t.size;
    let mut bytes: u32 = 0;
    loop {
        if budget == 0 {
            return Err(ChainError::TooLong {
                table: t.name,
                size: t.size,
            });
        }
        budget -= 1;
        let d = read_desc(mem, &t, index)?;
        if d.is_indirect() {
            if indirect {
                return Err(ChainError::NestedIndirect);
            }
            // The spec forbids both flags; Linux would follow NEXT after
            // the table, QEMU would drop it. Neither reading is safe.
            if d.has_next() {
                return Err(ChainError::IndirectWithNext);
            }
            let entries = u64::from(d.len) / DESC_LEN;
            if d.len == 0 || u64::from(d.len) % DESC_LEN != 0 || entries > MAX_INDIRECT {
                return Err(ChainError::IndirectLength { len: d.len });
            }
            // The whole table must be guest memory, not just the entries
            // this chain happens to use (QEMU and Linux map it whole).
            if !mem.check_range(d.addr, d.len as usize, Permissions::Read) {
                return Err(ChainError::IndirectOutsideMemory {
                    addr: d.addr.raw_value(),
                    len: d.len,
                });
            }
            t = Table {
                addr: d.addr,
                size: entries,
                name: "indirect table",
            };
            indirect = true;
            index = 0;
            budget = entries;
            continue;
        }
        bytes = bytes.checked_add(d.len).ok_or(ChainError::TooManyBytes)?;
        descs.push(d);
        if !d.has_next() {
            return Ok(());
        }
        if u64::from(d.next) >= t.size {
            return Err(ChainError::NextOutOfRange {
                table: t.name,
                index,
                next: d.next,
                size: t.size,
            });
        }
        index = d.next;
    }
}

fn read_desc<M: GuestMemory + ?Sized>(mem: &M, t: &Table, index: u16) -> Result<Desc, ChainError> {
    let outside = || ChainError::TableOutsideMemory {
        table: t.name,
        index,
        addr: t.addr.raw_value().wrapping_add(u64::from(index) * DESC_LEN),
    };
    let addr = t
        .addr
        .checked_add(u64::from(index) * DESC_LEN)
        .ok_or_else(outside)?;
    let mut raw = [0u8; DESC_LEN as usize];
    match guestmem::guarded(|| mem.read_slice(&mut raw, addr)) {
        Ok(Ok(())) => {}
        Ok(Err(_)) => return Err(outside()),
        Err(guestmem::Fault) => {
            return Err(ChainError::Fault {
                table: t.name,
                index,
            })
        }
    }
    let le64 = |b: &[u8]| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
    Ok(Desc {
        addr: GuestAddress(le64(&raw[0..8])),
        len: u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]),
        flags: u16::from_le_bytes([raw[12], raw[13]]),
        next: u16::from_le_bytes([raw[14], raw[15]]),
    })
}

#[cfg(test)]
mod tests {
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::desc::RawDescriptor;
    use vm_memory::GuestMemoryMmap;

    use super::*;

    const MEM: u64 = 0x10_0000;
    const TABLE: GuestAddress = GuestAddress(0x1000);
    const IND: u64 = 0x8000;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap()
    }

    fn put(m: &GuestMemoryMmap, at: u64, addr: u64, len: u32, flags: u32, next: u16) {
        let d = RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next));
        m.write_obj(d, GuestAddress(at)).unwrap();
    }

    fn entry(i: u16) -> u64 {
        TABLE.0 + 16 * u64::from(i)
    }

    fn table(size: u16) -> DescTable {
        DescTable { addr: TABLE, size }
    }

    fn err(m: &GuestMemoryMmap, size: u16, head: u16) -> ChainError {
        walk(m, table(size), head).unwrap_err().error
    }

    #[test]
    fn walks_direct_and_indirect_chains_to_their_end() {
        let m = mem();
        put(&m, entry(3), 0x100, 16, VRING_DESC_F_NEXT, 7);
        put(&m, entry(7), 0x200, 512, VRING_DESC_F_WRITE, 0);
        let d = walk(&m, table(8), 3).unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!((d[1].addr, d[1].len), (GuestAddress(0x200), 512));
        assert!(d[1].is_write_only());
        // A direct descriptor, then an indirect table of three.
        put(&m, entry(0), 0x100, 16, VRING_DESC_F_NEXT, 1);
        put(&m, entry(1), IND, 48, VRING_DESC_F_INDIRECT, 0);
        put(&m, IND, 0x300, 1, VRING_DESC_F_NEXT, 2);
        put(&m, IND + 32, 0x400, 2, VRING_DESC_F_NEXT, 1);
        put(&m, IND + 16, 0x500, 3, VRING_DESC_F_WRITE, 0);
        let lens: Vec<_> = walk(&m, table(8), 0)
            .unwrap()
            .iter()
            .map(|d| d.len)
            .collect();
        assert_eq!(lens, [16, 1, 2, 3]);
    }

    #[test]
    fn every_bad_link_is_its_own_error_with_the_prefix_read_so_far() {
        let m = mem();
        assert_eq!(
            err(&m, 8, 8),
            ChainError::HeadOutOfRange { head: 8, size: 8 }
        );
        put(&m, entry(0), 0x100, 16, VRING_DESC_F_NEXT, 1);
        put(
            &m,
            entry(1),
            0x200,
            1,
            VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
            8,
        );
        let bad = walk(&m, table(8), 0).unwrap_err();
        assert!(matches!(
            bad.error,
            ChainError::NextOutOfRange { next: 8, .. }
        ));
        assert_eq!(bad.prefix.len(), 2, "both descriptors before the bad link");
        // A self-loop and a loop through the whole table.
        put(
            &m,
            entry(1),
            0x200,
            1,
            VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
            1,
        );
        assert!(matches!(err(&m, 8, 0), ChainError::TooLong { size: 8, .. }));
        assert_eq!(walk(&m, table(8), 0).unwrap_err().prefix.len(), 8);
        // The chain's bytes overflow 32 bits.
        put(&m, entry(1), 0x200, u32::MAX, VRING_DESC_F_WRITE, 0);
        assert_eq!(err(&m, 8, 0), ChainError::TooManyBytes);
        // The table itself past the end of memory.
        let far = DescTable {
            addr: GuestAddress(MEM - 16),
            size: 4,
        };
        put(&m, MEM - 16, 0x100, 16, VRING_DESC_F_NEXT, 1);
        assert!(matches!(
            walk(&m, far, 0).unwrap_err().error,
            ChainError::TableOutsideMemory { index: 1, .. }
        ));
    }

    #[test]
    fn indirect_tables_are_checked_whole() {
        let m = mem();
        put(&m, IND, 0x300, 1, 0, 0);
        for (len, flags, want) in [
            (
                0,
                VRING_DESC_F_INDIRECT,
                ChainError::IndirectLength { len: 0 },
            ),
            (
                24,
                VRING_DESC_F_INDIRECT,
                ChainError::IndirectLength { len: 24 },
            ),
            (
                16 << 17,
                VRING_DESC_F_INDIRECT,
                ChainError::IndirectLength { len: 16 << 17 },
            ),
            (
                16,
                VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT,
                ChainError::IndirectWithNext,
            ),
        ] {
            put(&m, entry(0), IND, len, flags, 1);
            assert_eq!(err(&m, 8, 0), want, "len {len} flags {flags:#x}");
        }
        // Straddling the end of memory.
        put(&m, entry(0), MEM - 16, 32, VRING_DESC_F_INDIRECT, 0);
        put(&m, MEM - 16, 0x300, 1, 0, 0);
        assert!(matches!(
            err(&m, 8, 0),
            ChainError::IndirectOutsideMemory { .. }
        ));
        // Nested.
        put(&m, entry(0), IND, 32, VRING_DESC_F_INDIRECT, 0);
        put(&m, IND, 0x300, 1, VRING_DESC_F_NEXT, 1);
        put(&m, IND + 16, IND, 16, VRING_DESC_F_INDIRECT, 0);
        assert_eq!(err(&m, 8, 0), ChainError::NestedIndirect);
        // A loop inside the indirect table, within the main table's budget.
        put(&m, IND + 16, 0x300, 0, VRING_DESC_F_NEXT, 1);
        assert!(matches!(
            err(&m, 8, 0),
            ChainError::TooLong {
                table: "indirect table",
                size: 2
            }
        ));
    }
}
