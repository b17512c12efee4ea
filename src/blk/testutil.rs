//! Test fixtures: an engine on memory devices and virtio-blk requests
//! placed in guest memory.

use std::sync::Arc;

use virtio_bindings::bindings::virtio_blk::{VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::chain::DescTable;
use super::config;
use super::execute::Disk;
use super::request::{Limits, ParseError, Request};
use crate::integrity::{Engine, EngineOptions};
use crate::io::MemDevice;
use crate::meta::{meta_len, DeviceRef, Metadata, Superblock};

pub const BS: u32 = 4096;
pub const BLOCKS: u64 = 64;

/// A clean, formatted 4 KiB-block disk on memory devices.
pub fn mem_disk(readonly: bool) -> (Arc<MemDevice>, Disk) {
    let data = Arc::new(MemDevice::new(u64::from(BS) * BLOCKS));
    (data.clone(), disk_over(data, readonly))
}

/// The disk of [`mem_disk`] over a data device of the caller's, of
/// `BS * BLOCKS` bytes.
pub fn disk_over(data: DeviceRef, readonly: bool) -> Disk {
    let opts = EngineOptions {
        readonly,
        ..EngineOptions::default()
    };
    disk_with(data, opts)
}

/// [`disk_over`] with engine options of the caller's.
pub fn disk_with(data: DeviceRef, opts: EngineOptions) -> Disk {
    let readonly = opts.readonly;
    let meta: DeviceRef = Arc::new(MemDevice::new(meta_len(BLOCKS)));
    let mut sb = Superblock::new(BS, u64::from(BS) * BLOCKS, 0xfeed).unwrap();
    sb.clean = true;
    Metadata::create(meta.clone(), sb, 16).unwrap();
    let engine = Engine::open(data, meta, opts).unwrap();
    Disk::new(
        Arc::new(engine),
        config::limits(BS, BLOCKS),
        readonly,
        "serial-123",
    )
}

/// 16 MiB of guest memory; queues live at 0, requests from 1 MiB up.
pub fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap()
}

/// Guest addresses of request `k`'s header, data and status.
pub fn hdr(k: u64) -> u64 {
    0x10_0000 + k * 0x100
}
pub fn buf(k: u64) -> u64 {
    0x20_0000 + k * 0x1_0000
}
pub fn status(k: u64) -> u64 {
    0x30_0000 + k
}

/// One request: header type and sector, data length and direction.
pub struct Req {
    pub ty: u32,
    pub sector: u64,
    pub len: u32,
    pub data_writable: bool,
    pub with_status: bool,
}

pub fn req(ty: u32, sector: u64, len: u32) -> Req {
    Req {
        ty,
        sector,
        len,
        data_writable: ty == VIRTIO_BLK_T_IN || ty == VIRTIO_BLK_T_GET_ID,
        with_status: true,
    }
}

/// Write the headers of `reqs` (and a 0xff status) into guest memory and
/// return their descriptor chains, laid out one after the other from index 0.
pub fn descriptors(mem: &GuestMemoryMmap, reqs: &[Req]) -> Vec<RawDescriptor> {
    let mut descs = Vec::new();
    for (k, r) in reqs.iter().enumerate() {
        let k = k as u64;
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&r.ty.to_le_bytes());
        h[8..].copy_from_slice(&r.sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(hdr(k))).unwrap();
        mem.write_slice(&[0xff], GuestAddress(status(k))).unwrap();
        let mut chain = vec![(hdr(k), 16, 0)];
        if r.len > 0 {
            let flags = if r.data_writable {
                VRING_DESC_F_WRITE
            } else {
                0
            };
            chain.push((buf(k), r.len, flags));
        }
        if r.with_status {
            chain.push((status(k), 1, VRING_DESC_F_WRITE));
        }
        let base = descs.len() as u16;
        let n = chain.len();
        for (i, (addr, len, flags)) in chain.into_iter().enumerate() {
            let (flags, next) = if i + 1 < n {
                (flags | VRING_DESC_F_NEXT, base + i as u16 + 1)
            } else {
                (flags, 0)
            };
            descs.push(RawDescriptor::from(SplitDescriptor::new(
                addr,
                len,
                flags as u16,
                next,
            )));
        }
    }
    descs
}

pub fn status_byte(mem: &GuestMemoryMmap, k: u64) -> u8 {
    let mut s = [0u8];
    mem.read_slice(&mut s, GuestAddress(status(k))).unwrap();
    s[0]
}

pub fn fill_buf(mem: &GuestMemoryMmap, k: u64, byte: u8, len: usize) {
    mem.write_slice(&vec![byte; len], GuestAddress(buf(k)))
        .unwrap();
}

pub fn read_buf(mem: &GuestMemoryMmap, k: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    mem.read_slice(&mut v, GuestAddress(buf(k))).unwrap();
    v
}

/// Drain the mock queue's available ring and parse every chain on it.
pub fn parse_ring(
    mem: &GuestMemoryMmap,
    vq: &MockSplitQueue<GuestMemoryMmap>,
    limits: &Limits,
) -> Vec<Result<Request, ParseError>> {
    let mut q: Queue = vq.create_queue().unwrap();
    let table = DescTable {
        addr: GuestAddress(q.desc_table()),
        size: q.size(),
    };
    let heads: Vec<u16> = q.iter(mem).unwrap().map(|c| c.head_index()).collect();
    heads
        .into_iter()
        .map(|h| Request::parse(mem, table, h, limits))
        .collect()
}
