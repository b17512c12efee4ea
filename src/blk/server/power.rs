//! `serve --volatile-cache`: the data and metadata files behind simulated
//! volatile write caches, and the power cut that SIGUSR2 triggers.
//!
//! Each file gets its own [`VolatileDevice`]; both hang off one
//! [`PowerSupply`]. A cut switches the supply off — from that instant no
//! call of the running engine reaches either file, whatever was in flight —
//! then lets each cache keep or lose every un-synced unit at random, and
//! builds new devices (on a new supply) over the same files for the engine
//! that serves next.

use std::fmt;
use std::io;
use std::sync::Arc;

use crate::io::volatile::{PowerCutReport, PowerSupply, VolatileDevice, SECTOR_SIZE};
use crate::meta::{DeviceRef, Superblock, SUPERBLOCK_SIZE};

/// `serve --volatile-cache` settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VolatileCacheConfig {
    /// Un-synced bytes each of the two caches holds before it destages
    /// everything (a real disk may destage at any time).
    pub limit_bytes: u64,
    /// Seed of the first cut; later cuts use the following numbers.
    /// `None`: a random one, logged.
    pub seed: Option<u64>,
}

/// Mixed into a cut's seed for the metadata cache, so that the data and
/// metadata choices are independent but both follow from the one logged
/// seed.
const META_SEED_SALT: u64 = 0x6d65_7461_6461_7461;

/// The two files behind their caches, and the cut counter.
pub struct VolatileDisk {
    data_file: DeviceRef,
    meta_file: DeviceRef,
    /// The data device tears at the logical block size the guest sees.
    data_unit: u64,
    limit_bytes: u64,
    first_seed: u64,
    cuts: u64,
    supply: Arc<PowerSupply>,
    data: Arc<VolatileDevice>,
    meta: Arc<VolatileDevice>,
}

/// What one power cut did, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CutSummary {
    /// 1 for the first cut of this process.
    pub number: u64,
    pub seed: u64,
    pub data_unit: u64,
    /// Un-synced units kept, and un-synced units in all.
    pub data: (usize, usize),
    pub meta: (usize, usize),
    /// Times a cache hit its limit and destaged everything since the
    /// previous cut: each one narrows what this cut could lose.
    pub destages: u64,
}

impl fmt::Display for CutSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "power cut #{}: seed {}, kept {} of {} un-synced {}-byte blocks (data), \
             kept {} of {} un-synced {SECTOR_SIZE}-byte sectors (metadata)",
            self.number,
            self.seed,
            self.data.0,
            self.data.1,
            self.data_unit,
            self.meta.0,
            self.meta.1
        )?;
        if self.destages > 0 {
            write!(
                f,
                "; before it, the cache limit forced {} full destage(s)",
                self.destages
            )?;
        }
        Ok(())
    }
}

impl VolatileDisk {
    /// Put caches in front of the opened files. The data unit comes from
    /// the metadata superblock; if that does not decode, 512 is used and
    /// opening the engine reports the real problem.
    pub fn new(
        data_file: DeviceRef,
        meta_file: DeviceRef,
        cfg: &VolatileCacheConfig,
    ) -> io::Result<Self> {
        let data_unit = block_size(&*meta_file).unwrap_or(SECTOR_SIZE);
        let first_seed = cfg.seed.unwrap_or_else(rand::random);
        let supply = Arc::new(PowerSupply::new());
        let (data, meta) =
            Self::devices_over(&data_file, &meta_file, data_unit, cfg.limit_bytes, &supply)?;
        log::info!(
            "volatile write cache: un-synced writes stay in memory (at most {} MiB per cache, \
             data and metadata) until a flush; SIGUSR2 cuts the power, tearing data at \
             {data_unit}-byte blocks and metadata at {SECTOR_SIZE}-byte sectors; \
             first cut uses seed {first_seed}",
            cfg.limit_bytes >> 20,
        );
        Ok(Self {
            data_file,
            meta_file,
            data_unit,
            limit_bytes: cfg.limit_bytes,
            first_seed,
            cuts: 0,
            supply,
            data,
            meta,
        })
    }

    /// The devices the engine should use now.
    pub fn devices(&self) -> (DeviceRef, DeviceRef) {
        (self.data.clone(), self.meta.clone())
    }

    /// Power cuts so far.
    pub fn cuts(&self) -> u64 {
        self.cuts
    }

    /// The supply the current devices hang off.
    pub fn supply(&self) -> &Arc<PowerSupply> {
        &self.supply
    }

    /// Cut the power (see the module documentation). Afterwards
    /// [`devices`](Self::devices) returns fresh devices with empty caches
    /// over what survived. On an error the old devices stay without power.
    pub fn cut(&mut self) -> io::Result<CutSummary> {
        // The instant of the cut: after this, any call of the old engine
        // fails (a call already running holds its device's lock and counts
        // as done before the cut, which the power_cut below waits for).
        self.supply.switch_off();
        self.cuts += 1;
        let seed = self.first_seed.wrapping_add(self.cuts - 1);
        let destages = self.data.stats().destages + self.meta.stats().destages;
        let data = self.data.power_cut(seed)?;
        let meta = self.meta.power_cut(seed ^ META_SEED_SALT)?;
        let supply = Arc::new(PowerSupply::new());
        let (d, m) = Self::devices_over(
            &self.data_file,
            &self.meta_file,
            self.data_unit,
            self.limit_bytes,
            &supply,
        )?;
        (self.supply, self.data, self.meta) = (supply, d, m);
        Ok(CutSummary {
            number: self.cuts,
            seed,
            data_unit: self.data_unit,
            data: kept_of(&data),
            meta: kept_of(&meta),
            destages,
        })
    }

    fn devices_over(
        data_file: &DeviceRef,
        meta_file: &DeviceRef,
        data_unit: u64,
        limit_bytes: u64,
        supply: &Arc<PowerSupply>,
    ) -> io::Result<(Arc<VolatileDevice>, Arc<VolatileDevice>)> {
        let versions = |unit: u64| usize::try_from(limit_bytes / unit).unwrap_or(usize::MAX);
        let data = VolatileDevice::new(data_file.clone())
            .with_atomic_unit(data_unit)?
            .with_cache_limit(versions(data_unit))
            .with_power_supply(supply.clone());
        let meta = VolatileDevice::new(meta_file.clone())
            .with_cache_limit(versions(SECTOR_SIZE))
            .with_power_supply(supply.clone());
        Ok((Arc::new(data), Arc::new(meta)))
    }
}

fn kept_of(report: &PowerCutReport) -> (usize, usize) {
    (report.kept(), report.sectors.len())
}

/// The block size recorded in the metadata superblock, if it decodes.
fn block_size(meta: &dyn crate::io::Device) -> Option<u64> {
    let mut sector = [0u8; SUPERBLOCK_SIZE];
    meta.read_at(&mut sector, 0).ok()?;
    // Only the geometry: the engine checks the key when it opens the disk.
    let sb = Superblock::decode_unverified(&sector).ok()?;
    Some(u64::from(sb.block_size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::integrity::{Engine, EngineOptions};
    use crate::io::MemDevice;
    use crate::meta::{meta_len, Metadata};

    const BS: u64 = 4096;
    const BLOCKS: u64 = 64;

    fn files() -> (DeviceRef, DeviceRef) {
        let data: DeviceRef = Arc::new(MemDevice::new(BLOCKS * BS));
        let meta: DeviceRef = Arc::new(MemDevice::new(meta_len(BLOCKS)));
        let sb = Superblock::new(BS as u32, BLOCKS * BS, 7).unwrap();
        Metadata::create(meta.clone(), sb, 16).unwrap();
        (data, meta)
    }

    #[test]
    fn a_cut_keeps_flushed_data_refuses_the_old_devices_and_reopens_cleanly() {
        let (data_file, meta_file) = files();
        let cfg = VolatileCacheConfig {
            limit_bytes: 1 << 20,
            seed: Some(11),
        };
        let mut vd = VolatileDisk::new(data_file.clone(), meta_file, &cfg).unwrap();
        assert_eq!(vd.data_unit, BS);
        let (d, m) = vd.devices();
        let opts = EngineOptions {
            write_cache: false,
            ..EngineOptions::default()
        };
        let engine = Engine::open(d, m, opts.clone()).unwrap();
        engine.write(1, &[1; BS as usize]).unwrap();
        engine.flush().unwrap();
        for b in 2..BLOCKS {
            engine.write(b, &[b as u8; BS as usize]).unwrap();
        }
        let old = vd.devices().0;
        let cut = vd.cut().unwrap();
        assert_eq!((cut.number, cut.seed), (1, 11));
        assert!(cut.data.1 > 0, "un-synced data blocks were cached");
        assert!(
            old.write_at(&[0; 512], 0).is_err(),
            "the old devices have no power"
        );
        assert!(engine.write(1, &[9; BS as usize]).is_err());
        assert!(cut.to_string().starts_with("power cut #1: seed 11, kept "));

        let (d, m) = vd.devices();
        let fresh = Engine::open(d, m, opts).unwrap();
        let mut buf = vec![0; BS as usize];
        fresh.read(1, &mut buf).unwrap();
        assert_eq!(buf, vec![1; BS as usize], "flushed data survives");
        for b in 2..BLOCKS {
            fresh
                .read(b, &mut buf)
                .expect("every block verifies after the cut");
        }
        assert_eq!(
            vd.cut().unwrap().seed,
            12,
            "the next cut uses the next seed"
        );
    }
}
