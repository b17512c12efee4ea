//! A disk with a simulated volatile write cache, for crash testing.
//!
//! Real disks (and the host page cache in front of an image file)
//! acknowledge a write once it sits in a volatile cache; only a flush
//! (`sync`) promises that it reached stable media. Until then the disk may
//! destage any sector at any time, in any order, and may destage an
//! *intermediate* version of a sector that was written several times. A
//! power cut therefore leaves every un-synced 512-byte sector holding either
//! its last durable content or any one of the versions written to it since.
//! Sectors are atomic (the guarantee storage actually gives); anything
//! larger — a 4096-byte block, a metadata page — can tear.
//!
//! [`VolatileDevice`] models exactly that: an inner [`Device`] holds the
//! durable image, and an in-memory cache ([`cache`](self::cache)) keeps,
//! per sector, the list of versions written since the last
//! [`Device::sync`]. Reads see the newest version.
//! [`VolatileDevice::power_cut`] picks, per un-synced sector and
//! independently (seeded, so reproducible), which state survives, writes
//! that to the durable store and empties the cache: the device then goes on
//! from the surviving state, like a disk after power returns.
//!
//! The inner device is any [`Device`]: a [`MemDevice`] in tests, a file
//! when serving with a simulated cache. An optional cache limit bounds the
//! memory a long-running server spends on the cache; past it the device
//! destages everything, which a real disk is free to do at any time.
//!
//! The atomic unit is 512 bytes unless [`VolatileDevice::with_atomic_unit`]
//! says otherwise: a disk that reports 4096-byte logical blocks promises to
//! write each one whole, so simulating it must not tear inside one.
//!
//! [`power`]: the [`PowerSupply`] that devices hang off, and the
//! [`VolatileDisk`] (data and metadata devices on one supply) that
//! `serve --volatile-cache` cuts.
//!
//! Fault injection — a fuse that cuts the power in the middle of an
//! operation, bit flips and misdirected writes, going back to the instant
//! a process died — is test support, in [`testing`] (built with the
//! `testing` feature only, which the crate's tests turn on).

mod cache;
mod power;
#[cfg(feature = "testing")]
pub mod testing;
#[cfg(test)]
mod tests;

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use self::cache::{State, Version};
pub use self::power::{CutSummary, PowerSupply, VolatileCacheConfig, VolatileDisk};
use super::{check_range, Device, MemDevice};

/// The unit a power cut keeps or drops atomically, unless a device is
/// built [`with_atomic_unit`](VolatileDevice::with_atomic_unit).
pub const SECTOR_SIZE: u64 = 512;

/// Counters of a [`VolatileDevice`], read with [`VolatileDevice::stats`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VolatileStats {
    pub reads: u64,
    pub writes: u64,
    pub zero_ranges: u64,
    pub syncs: u64,
    /// Mutating calls made after a test's fuse tripped (`testing::Fuse`):
    /// visible to reads, lost at the next power cut. Always 0 outside tests.
    pub after_cut: u64,
    /// Times the cache limit forced a full destage.
    pub destages: u64,
    pub power_cuts: u64,
}

/// What survived in one un-synced sector at a power cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// The content it had at the last sync (every cached version lost).
    Durable,
    /// Cached version `index` (0 = oldest) of `of` written since the sync.
    Version { index: usize, of: usize },
}

/// What a power cut did, atomic unit by atomic unit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PowerCutReport {
    /// `(unit number, fate)` of every atomic unit (512-byte sector unless
    /// the device has a larger unit) that was un-synced, in ascending order.
    pub sectors: Vec<(u64, Fate)>,
}

impl PowerCutReport {
    /// Units that kept one of their cached versions.
    pub fn kept(&self) -> usize {
        self.sectors.len() - self.reverted()
    }

    /// Sectors that lost every write since the last sync.
    pub fn reverted(&self) -> usize {
        self.count(|f| f == Fate::Durable)
    }

    /// Sectors that kept their newest version.
    pub fn kept_latest(&self) -> usize {
        self.count(|f| matches!(f, Fate::Version { index, of } if index + 1 == of))
    }

    /// Sectors that kept a version older than their newest one.
    pub fn kept_older(&self) -> usize {
        self.count(|f| matches!(f, Fate::Version { index, of } if index + 1 < of))
    }

    fn count(&self, pred: impl Fn(Fate) -> bool) -> usize {
        self.sectors.iter().filter(|(_, f)| pred(*f)).count()
    }
}

/// A [`Device`] whose writes sit in a volatile cache until `sync`.
///
/// See the [module documentation](self) for the model. All methods take
/// `&self`; one internal lock serialises them (this is a test and
/// simulation device, not a fast path).
pub struct VolatileDevice {
    inner: Arc<dyn Device>,
    size: u64,
    /// Bytes a power cut keeps or drops as one: a power of two.
    unit: u64,
    #[cfg(feature = "testing")]
    fuse: Option<Arc<testing::Fuse>>,
    supply: Option<Arc<PowerSupply>>,
    /// Most cached versions before a forced destage; `None`: unbounded.
    limit: Option<usize>,
    state: Mutex<State>,
}

impl std::fmt::Debug for VolatileDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolatileDevice")
            .field("size", &self.size)
            .field("unit", &self.unit)
            .field("limit", &self.limit)
            .field("cached_sectors", &self.cached_sectors())
            .finish_non_exhaustive()
    }
}

impl VolatileDevice {
    /// A cache in front of `inner`, which holds the durable image. The
    /// cache starts empty; `inner`'s current content counts as durable.
    pub fn new(inner: Arc<dyn Device>) -> Self {
        Self {
            size: inner.size(),
            inner,
            unit: SECTOR_SIZE,
            #[cfg(feature = "testing")]
            fuse: None,
            supply: None,
            limit: None,
            state: Mutex::new(State::default()),
        }
    }

    /// A cache in front of a [`MemDevice`] holding `bytes` as durable image.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self::new(Arc::new(MemDevice::from_vec(bytes)))
    }

    /// A cache in front of a zeroed [`MemDevice`] of `size` bytes.
    pub fn zeroed(size: u64) -> Self {
        Self::new(Arc::new(MemDevice::new(size)))
    }

    /// Keep or drop `bytes` at a time at a power cut instead of 512: the
    /// logical block size a disk promises to write atomically. It must be a
    /// power of two that divides the device size, and the cache must still
    /// be empty.
    pub fn with_atomic_unit(mut self, bytes: u64) -> io::Result<Self> {
        if !bytes.is_power_of_two() || !self.size.is_multiple_of(bytes) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "atomic unit {bytes} is not a power of two dividing the device size {}",
                    self.size
                ),
            ));
        }
        if self.cached_sectors() != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the atomic unit of a device with cached writes cannot change",
            ));
        }
        self.unit = bytes;
        Ok(self)
    }

    /// Refuse every call once `supply` is switched off (see [`PowerSupply`]).
    pub fn with_power_supply(mut self, supply: Arc<PowerSupply>) -> Self {
        self.supply = Some(supply);
        self
    }

    /// Bytes a power cut keeps or drops as one.
    pub fn atomic_unit(&self) -> u64 {
        self.unit
    }

    /// Destage the whole cache whenever it would hold more than `versions`
    /// sector versions, and write larger requests straight through. This
    /// only narrows what a power cut can produce (a disk may destage at any
    /// time); it bounds memory for long runs.
    pub fn with_cache_limit(mut self, versions: usize) -> Self {
        self.limit = Some(versions.max(1));
        self
    }

    /// The durable store.
    pub fn inner(&self) -> &Arc<dyn Device> {
        &self.inner
    }

    /// Counters since creation.
    pub fn stats(&self) -> VolatileStats {
        self.lock().stats.clone()
    }

    /// Sectors with un-synced versions.
    pub fn cached_sectors(&self) -> usize {
        self.lock().cache.len()
    }

    /// Cut the power: every un-synced sector independently keeps its
    /// durable content or one of its cached versions, chosen uniformly by
    /// an RNG seeded with `seed` (same seed and same history, same result).
    /// The survivors are written to the inner device and synced; the cache
    /// is then empty and the device usable again (unless its
    /// [`PowerSupply`] is off: then it only keeps the survivors).
    pub fn power_cut(&self, seed: u64) -> io::Result<PowerCutReport> {
        let mut rng = StdRng::seed_from_u64(seed);
        self.cut_with(|_, versions| rng.gen_range(0..=versions))
    }

    /// [`power_cut`](Self::power_cut) with the choice made by
    /// `choose(sector, versions)`: 0 keeps the durable content, `k` in
    /// `1..=versions` keeps cached version `k - 1` (oldest first). Larger
    /// answers are clamped to the newest version. Sectors are visited in
    /// ascending order.
    fn cut_with(&self, mut choose: impl FnMut(u64, usize) -> usize) -> io::Result<PowerCutReport> {
        let mut state = self.lock();
        state.stats.power_cuts += 1;
        let mut report = PowerCutReport::default();
        let cache = std::mem::take(&mut state.cache);
        state.versions = 0;
        // After a test's fuse tripped, the cut starts from the instant of
        // the failure instead.
        #[cfg(feature = "testing")]
        let cache = self.unfreeze(&mut state, cache)?;
        for (sector, versions) in cache {
            let of = versions.len();
            let fate = match choose(sector, of).min(of) {
                0 => Fate::Durable,
                k => {
                    let at = sector * self.unit;
                    match &versions[k - 1] {
                        Version::Zero => self.inner.zero_range(at, self.unit)?,
                        Version::Data(d) => self.inner.write_at(d, at)?,
                    }
                    Fate::Version { index: k - 1, of }
                }
            };
            report.sectors.push((sector, fate));
        }
        self.inner.sync()?;
        Ok(report)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update leaves the state consistent between statements that
        // could panic, so a poisoned lock still guards a usable cache.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Fail any call once the shared supply is off. Checked under the
    /// state lock, so a cut (which takes the lock) sees every call either
    /// finished or refused.
    fn supplied(&self) -> io::Result<()> {
        match &self.supply {
            Some(s) if !s.is_on() => Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the disk has lost power (simulated power cut)",
            )),
            _ => Ok(()),
        }
    }
}

impl Device for VolatileDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(self.size, offset, buf.len() as u64)?;
        let mut state = self.lock();
        self.supplied()?;
        state.stats.reads += 1;
        self.inner.read_at(buf, offset)?;
        if buf.is_empty() {
            return Ok(());
        }
        // Overlay the newest cached version of every unit in range.
        let end = offset + buf.len() as u64;
        let first = offset / self.unit;
        let last = (end - 1) / self.unit;
        for (&unit, versions) in state.cache.range(first..=last) {
            let (Some(v), start) = (versions.last(), unit * self.unit) else {
                continue;
            };
            let lo = start.max(offset);
            let hi = (start + self.unit).min(end);
            let out = &mut buf[(lo - offset) as usize..(hi - offset) as usize];
            v.copy_to(out, (lo - start) as usize);
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        check_range(self.size, offset, buf.len() as u64)?;
        let mut state = self.lock();
        self.supplied()?;
        #[cfg(feature = "testing")]
        self.count_call(&mut state)?;
        state.stats.writes += 1;
        let len = buf.len() as u64;
        if !self.make_room(&mut state, self.units(offset, len))? {
            self.forget_range(&mut state, offset, len);
            return self.inner.write_at(buf, offset);
        }
        self.cache_range(
            &mut state,
            offset,
            len,
            |range| Version::from_sector(&buf[range]),
            |out, range| out.copy_from_slice(&buf[range]),
        )
    }

    fn sync(&self) -> io::Result<()> {
        let mut state = self.lock();
        self.supplied()?;
        #[cfg(feature = "testing")]
        self.count_call(&mut state)?;
        state.stats.syncs += 1;
        self.destage(&mut state)?;
        self.inner.sync()
    }

    fn write_durable(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_at(buf, offset)?;
        // The range sync is a call of its own: a power cut may fall
        // between the write and it.
        let mut state = self.lock();
        self.supplied()?;
        #[cfg(feature = "testing")]
        self.count_call(&mut state)?;
        state.stats.syncs += 1;
        self.destage_range(&mut state, offset, buf.len() as u64)?;
        self.inner.sync()
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        check_range(self.size, offset, len)?;
        let mut state = self.lock();
        self.supplied()?;
        #[cfg(feature = "testing")]
        self.count_call(&mut state)?;
        state.stats.zero_ranges += 1;
        if !self.make_room(&mut state, self.units(offset, len))? {
            self.forget_range(&mut state, offset, len);
            return self.inner.zero_range(offset, len);
        }
        self.cache_range(
            &mut state,
            offset,
            len,
            |_| Version::Zero,
            |out, _| out.fill(0),
        )
    }

    /// Reserving changes no content: nothing for the cache to hold.
    fn reserve(&self, offset: u64, len: u64) -> io::Result<()> {
        self.supplied()?;
        self.inner.reserve(offset, len)
    }

    /// The inner device's data regions, widened by cached units: a cached
    /// unit may hold data where the durable image has a hole.
    fn next_data(&self, offset: u64) -> io::Result<Option<(u64, u64)>> {
        let state = self.lock();
        self.supplied()?;
        let durable = self.inner.next_data(offset)?;
        let cached = state
            .cache
            .range(offset / self.unit..)
            .next()
            .map(|(&unit, _)| {
                let start = unit * self.unit;
                (start.max(offset), start + self.unit)
            });
        Ok(match (durable, cached) {
            (Some(d), Some(c)) if c.0 < d.0 => Some((c.0, c.1.min(d.0))),
            (Some(d), _) => Some(d),
            (None, c) => c,
        })
    }
}
