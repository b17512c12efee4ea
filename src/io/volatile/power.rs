//! Power: the [`PowerSupply`] that volatile devices hang off, and the
//! [`VolatileDisk`] that `serve --volatile-cache` cuts.
//!
//! A disk is two files (data and metadata), each behind its own
//! [`VolatileDevice`], both on one supply. A cut switches the supply off —
//! from that instant no call of the running engine reaches either file,
//! whatever was in flight — then lets each cache keep or lose every
//! un-synced unit at random, and builds new devices (on a new supply) over
//! the same files for the engine that serves next.

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::{PowerCutReport, VolatileDevice, SECTOR_SIZE};
use crate::io::Device;

/// Power shared by several devices, switched off for good at a power cut.
///
/// A switched-off supply makes every call of every device on it fail with
/// an I/O error, reads included: a server keeps answering its front-end,
/// but nothing of the old process state can reach the durable image any
/// more. A call that was already running when the supply went off finishes
/// (it holds the device's lock), so it counts as done before the cut.
#[derive(Debug)]
pub struct PowerSupply {
    on: AtomicBool,
}

impl Default for PowerSupply {
    fn default() -> Self {
        Self::new()
    }
}

impl PowerSupply {
    /// A supply that is on.
    pub fn new() -> Self {
        Self {
            on: AtomicBool::new(true),
        }
    }

    /// Cut the power; there is no switching back (build new devices on a
    /// new supply over the same durable stores instead).
    pub fn switch_off(&self) {
        self.on.store(false, Ordering::SeqCst);
    }

    pub fn is_on(&self) -> bool {
        self.on.load(Ordering::SeqCst)
    }
}

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

type DeviceRef = Arc<dyn Device>;

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
    /// Put caches in front of the opened files; the data device keeps or
    /// loses `data_unit` bytes at a time (the block size the guest sees).
    pub fn new(
        data_file: DeviceRef,
        meta_file: DeviceRef,
        data_unit: u64,
        cfg: &VolatileCacheConfig,
    ) -> io::Result<Self> {
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

    /// Bytes the data device keeps or loses as one.
    pub fn data_unit(&self) -> u64 {
        self.data_unit
    }

    /// Power cuts so far.
    pub fn cuts(&self) -> u64 {
        self.cuts
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
