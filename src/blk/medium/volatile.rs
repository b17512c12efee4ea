//! `serve --volatile-cache`: the files behind simulated volatile write
//! caches ([`VolatileDisk`]), so that a power cut can be pulled on the
//! disk a guest is using. Each engine has an in-process stage, lost at a
//! cut like the caches' un-synced writes.

use super::Medium;
use crate::blk::execute::Disk;
use crate::blk::server::ServeError;
use crate::integrity::{Engine, EngineOptions};
use crate::io::volatile::{CutSummary, VolatileCacheConfig, VolatileDisk, SECTOR_SIZE};
use crate::meta::{DeviceRef, Metadata};

/// The simulated disk and its power.
pub(in crate::blk) struct Volatile {
    disk: VolatileDisk,
}

impl Volatile {
    /// Put caches in front of the opened files. The data device tears at
    /// the block size the metadata records; if that cannot be read, 512 is
    /// used and opening the engine reports the real problem.
    pub(super) fn new(
        data: DeviceRef,
        meta: DeviceRef,
        cfg: &VolatileCacheConfig,
    ) -> Result<Self, ServeError> {
        // Only the geometry: the engine checks the key when it opens.
        let unit = Metadata::open_unverified(meta.clone(), 1)
            .map_or(SECTOR_SIZE, |m| u64::from(m.superblock().block_size));
        let disk = VolatileDisk::new(data, meta, unit, cfg).map_err(ServeError::Open)?;
        Ok(Self { disk })
    }
}

impl Medium for Volatile {
    fn open(&mut self, opts: &EngineOptions) -> Result<Engine, ServeError> {
        let (data, meta) = self.disk.devices();
        Engine::open(data, meta, opts.clone()).map_err(ServeError::Engine)
    }

    fn power_cuts(&self) -> Option<u64> {
        Some(self.disk.cuts())
    }

    fn power_cut(&mut self, disk: &Disk) -> Result<CutSummary, ServeError> {
        // Writes the engine completed but still holds in its own write-back
        // stage go to the simulated cache first, so that the cut keeps or
        // loses each of them at random like any other un-synced write
        // rather than losing them all.
        disk.engine().drain();
        // The engine completes some requests without its devices (writes
        // held in its stage, reads served from it), but a disk without
        // power answers nothing.
        disk.halt("its power was cut");
        self.disk.cut().map_err(ServeError::PowerCut)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::blk::config;
    use crate::io::MemDevice;
    use crate::meta::{meta_len, Superblock};

    const BS: u64 = 4096;
    const BLOCKS: u64 = 64;

    fn files() -> (DeviceRef, DeviceRef) {
        let data: DeviceRef = Arc::new(MemDevice::new(BLOCKS * BS));
        let meta: DeviceRef = Arc::new(MemDevice::new(meta_len(BLOCKS)));
        let sb = Superblock::new(BS as u32, BLOCKS * BS, 7).unwrap();
        Metadata::create(meta.clone(), sb, 16).unwrap();
        (data, meta)
    }

    fn disk(engine: Engine) -> Disk {
        let limits = config::limits(engine.block_size(), engine.blocks());
        Disk::new(Arc::new(engine), limits, false, "volatile")
    }

    #[test]
    fn a_cut_keeps_flushed_data_halts_the_old_disk_and_reopens_cleanly() {
        let (data_file, meta_file) = files();
        let cfg = VolatileCacheConfig {
            limit_bytes: 1 << 20,
            seed: Some(11),
        };
        let mut medium = Volatile::new(data_file, meta_file, &cfg).unwrap();
        assert_eq!(medium.disk.data_unit(), BS, "tears at the block size");
        assert_eq!(medium.power_cuts(), Some(0));
        let opts = EngineOptions {
            write_cache: false,
            ..EngineOptions::default()
        };
        let old = disk(medium.open(&opts).unwrap());
        old.engine().write(1, &[1; BS as usize]).unwrap();
        old.engine().flush().unwrap();
        for b in 2..BLOCKS {
            old.engine().write(b, &[b as u8; BS as usize]).unwrap();
        }
        let old_data = medium.disk.devices().0;
        let cut = medium.power_cut(&old).unwrap();
        assert_eq!((cut.number, cut.seed), (1, 11));
        assert!(cut.data.1 > 0, "un-synced data blocks were cached");
        assert!(old.halted(), "the old disk answers nothing");
        assert!(
            old_data.write_at(&[0; 512], 0).is_err(),
            "the old devices have no power"
        );
        assert!(old.engine().write(1, &[9; BS as usize]).is_err());
        assert!(cut.to_string().starts_with("power cut #1: seed 11, kept "));

        let fresh = medium.open(&opts).unwrap();
        let mut buf = vec![0; BS as usize];
        fresh.read(1, &mut buf).unwrap();
        assert_eq!(buf, vec![1; BS as usize], "flushed data survives");
        for b in 2..BLOCKS {
            fresh
                .read(b, &mut buf)
                .expect("every block verifies after the cut");
        }
        let next = medium.power_cut(&disk(fresh)).unwrap();
        assert_eq!(next.seed, 12, "the next cut uses the next seed");
        assert_eq!(medium.power_cuts(), Some(2));
    }
}
