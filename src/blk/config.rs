//! Feature bits and the virtio-blk configuration space (virtio 1.2 §5.2.4).

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use vm_memory::{ByteValued, Le16, Le32, Le64};

use super::request::{Limits, SECTOR_SIZE};

/// Largest single guest buffer we advertise (`size_max`).
pub const SIZE_MAX: u32 = 1 << 20;
/// Largest number of data buffers per request we advertise (`seg_max`).
pub const SEG_MAX: u32 = 126;
/// Segments per DISCARD / WRITE_ZEROES request.
pub const MAX_ZERO_SEGMENTS: u32 = 32;
/// Sectors per DISCARD / WRITE_ZEROES segment (1 GiB): bounds the work of
/// one segment while costing a guest almost nothing in splitting.
pub const MAX_ZERO_SECTORS: u32 = 1 << 21;
/// The config space we answer for; bytes past our struct read as zero
/// (the features that give them meaning are not offered).
const CONFIG_SPACE_MAX: usize = 256;

/// The virtio features twinsum offers.
pub fn features(readonly: bool) -> u64 {
    let bits = [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_TOPOLOGY,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_CONFIG_WCE,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
        VIRTIO_BLK_F_MQ,
    ];
    let mut f = bits.iter().fold(0u64, |f, b| f | (1u64 << b));
    if readonly {
        f |= 1 << VIRTIO_BLK_F_RO;
    }
    f
}

/// The parser limits that go with what [`ConfigSpace`] advertises.
pub fn limits(block_size: u32, blocks: u64) -> Limits {
    Limits {
        block_size,
        blocks,
        max_data_bytes: u64::from(SEG_MAX) * u64::from(SIZE_MAX),
        max_zero_segments: MAX_ZERO_SEGMENTS,
        max_zero_sectors: MAX_ZERO_SECTORS,
    }
}

/// `struct virtio_blk_config` up to the secure-erase fields, little endian.
/// Every field is naturally aligned, so there is no padding.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConfigSpace {
    pub capacity: Le64,
    pub size_max: Le32,
    pub seg_max: Le32,
    pub cylinders: Le16,
    pub heads: u8,
    pub sectors: u8,
    pub blk_size: Le32,
    pub physical_block_exp: u8,
    pub alignment_offset: u8,
    pub min_io_size: Le16,
    pub opt_io_size: Le32,
    pub writeback: u8,
    pub unused0: u8,
    pub num_queues: Le16,
    pub max_discard_sectors: Le32,
    pub max_discard_seg: Le32,
    pub discard_sector_alignment: Le32,
    pub max_write_zeroes_sectors: Le32,
    pub max_write_zeroes_seg: Le32,
    pub write_zeroes_may_unmap: u8,
    pub unused1: [u8; 3],
    pub max_secure_erase_sectors: Le32,
    pub max_secure_erase_seg: Le32,
    pub secure_erase_sector_alignment: Le32,
}

// The layout is the spec's; a mistake here would be silent on the wire.
const _: () = assert!(std::mem::size_of::<ConfigSpace>() == 72);
const _: () = assert!(std::mem::offset_of!(ConfigSpace, blk_size) == 20);
const _: () = assert!(std::mem::offset_of!(ConfigSpace, writeback) == 32);
const _: () = assert!(std::mem::offset_of!(ConfigSpace, num_queues) == 34);
const _: () = assert!(std::mem::offset_of!(ConfigSpace, max_discard_sectors) == 36);
const _: () = assert!(std::mem::offset_of!(ConfigSpace, write_zeroes_may_unmap) == 56);

// SAFETY: ConfigSpace is repr(C), made only of integer fields (Le* are
// transparent wrappers over integers) with no padding (size asserted above),
// so every byte pattern is a valid value.
unsafe impl ByteValued for ConfigSpace {}

impl ConfigSpace {
    /// The config space for a disk of `blocks` blocks of `block_size` bytes.
    pub fn new(block_size: u32, blocks: u64, num_queues: u16, writeback: bool) -> Self {
        let block_sectors = (u64::from(block_size) / SECTOR_SIZE) as u32;
        let l = limits(block_size, blocks);
        Self {
            capacity: l.capacity_sectors().into(),
            size_max: SIZE_MAX.into(),
            seg_max: SEG_MAX.into(),
            blk_size: block_size.into(),
            // Physical block = logical block; one block is the minimum and
            // the natural I/O unit.
            physical_block_exp: 0,
            alignment_offset: 0,
            min_io_size: 1.into(),
            opt_io_size: 0.into(),
            writeback: u8::from(writeback),
            num_queues: num_queues.into(),
            max_discard_sectors: MAX_ZERO_SECTORS.into(),
            max_discard_seg: MAX_ZERO_SEGMENTS.into(),
            discard_sector_alignment: block_sectors.into(),
            max_write_zeroes_sectors: MAX_ZERO_SECTORS.into(),
            max_write_zeroes_seg: MAX_ZERO_SEGMENTS.into(),
            write_zeroes_may_unmap: 1,
            ..Self::default()
        }
    }

    /// `size` bytes at `offset`, as GET_CONFIG answers; `None` when the
    /// range is outside the config space (the front-end then sees an error).
    pub fn read(&self, offset: u32, size: u32) -> Option<Vec<u8>> {
        let start = offset as usize;
        let end = start.checked_add(size as usize)?;
        if end > CONFIG_SPACE_MAX {
            return None;
        }
        let bytes = self.as_slice();
        let mut out = vec![0u8; end - start];
        if let Some(have) = bytes.get(start..end.min(bytes.len())) {
            out[..have.len()].copy_from_slice(have);
        }
        Some(out)
    }

    /// The one writable field is `writeback` (CONFIG_WCE). Returns the new
    /// value when `buf` at `offset` covers it.
    pub fn writeback_from(offset: u32, buf: &[u8]) -> Option<bool> {
        let at = std::mem::offset_of!(ConfigSpace, writeback);
        let idx = at.checked_sub(offset as usize)?;
        buf.get(idx).map(|b| *b != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_space_is_little_endian_at_spec_offsets() {
        let c = ConfigSpace::new(4096, 1000, 2, true);
        let b = c.read(0, 60).unwrap();
        assert_eq!(&b[0..8], &(8000u64).to_le_bytes());
        assert_eq!(&b[8..12], &SIZE_MAX.to_le_bytes());
        assert_eq!(&b[12..16], &SEG_MAX.to_le_bytes());
        assert_eq!(&b[20..24], &4096u32.to_le_bytes());
        assert_eq!(b[32], 1);
        assert_eq!(&b[34..36], &2u16.to_le_bytes());
        assert_eq!(&b[44..48], &8u32.to_le_bytes());
        assert_eq!(b[56], 1);
    }

    #[test]
    fn reads_are_sliced_and_bounded() {
        let c = ConfigSpace::new(512, 16, 1, true);
        assert_eq!(c.read(20, 4).unwrap(), 512u32.to_le_bytes());
        // Past our struct but inside the space: zeros.
        assert_eq!(c.read(90, 6).unwrap(), vec![0; 6]);
        assert!(c.read(250, 10).is_none());
        assert!(c.read(u32::MAX, 2).is_none());
    }

    #[test]
    fn writeback_is_found_in_set_config() {
        assert_eq!(ConfigSpace::writeback_from(32, &[0]), Some(false));
        assert_eq!(ConfigSpace::writeback_from(0, &[0; 40]), Some(false));
        assert_eq!(ConfigSpace::writeback_from(30, &[0, 0, 1]), Some(true));
        assert_eq!(ConfigSpace::writeback_from(33, &[1]), None);
        assert_eq!(ConfigSpace::writeback_from(0, &[0; 10]), None);
    }

    #[test]
    fn readonly_adds_ro() {
        assert_eq!(features(true) & !features(false), 1 << VIRTIO_BLK_F_RO);
    }
}
