//! Write-back stages made by hand, as a twinsum that died would leave them.
//! Needs `common::disk`.

use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;

use twinsum::io::{FileDevice, MemRegion};
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
    // Built in memory and written out as plain bytes: a stage file mapped
    // here would be `flock`ed, and a daemon that another test thread forks
    // meanwhile would hold that lock until its exec, so this test's own
    // daemon could find its stage "in use".
    let region = Arc::new(MemRegion::new(RING_START + (64 << 20)));
    let mut stage = Stage::create(region.clone(), ident, boot_id().unwrap(), 77).unwrap();
    for (block, data) in writes {
        let slot = stage.reserve(*block, data.len()).unwrap().unwrap();
        stage.filler().fill(&slot, data).unwrap();
    }
    drop(stage);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&disk.stage)
        .expect("create the stage file");
    std::io::Write::write_all(&mut file, &region.to_vec()).expect("write the stage file");
}
