//! Write-back stages made by hand, as a twinsum that died would leave them.
//! Needs `common::disk`.

use std::sync::Arc;

use twinsum::io::{FileDevice, MappedFile};
use twinsum::meta::Metadata;
use twinsum::stage::{boot_id, Identity, Stage, RING_START};

use super::disk::Disk;

/// A stage holding `writes` (block, data) for `disk`, as a twinsum killed
/// before writing them to the image would leave it.
pub fn craft_stage(disk: &Disk, writes: &[(u64, Vec<u8>)]) {
    let dev = FileDevice::open(&disk.meta, Default::default()).expect("open meta");
    let meta = Metadata::open(Arc::new(dev), 1).expect("read meta");
    let sb = meta.superblock();
    let ident = Identity {
        salt: sb.salt,
        generation: sb.generation,
        block_size: sb.block_size,
        blocks: sb.blocks,
        data_size: sb.data_size,
    };
    let region = Arc::new(MappedFile::open(&disk.stage, Some(RING_START + (64 << 20))).unwrap());
    let mut stage = Stage::create(region, ident, boot_id().unwrap(), 77).unwrap();
    for (block, data) in writes {
        let slot = stage.reserve(*block, data.len()).unwrap().unwrap();
        stage.filler().fill(&slot, data).unwrap();
    }
}
