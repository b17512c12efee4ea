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
//! durable image, and an in-memory cache keeps, per sector, the list of
//! versions written since the last [`Device::sync`]. Reads see the newest
//! version. [`VolatileDevice::power_cut`] picks, per un-synced sector and
//! independently (seeded, so reproducible), which state survives, writes
//! that to the durable store and empties the cache: the device then goes on
//! from the surviving state, like a disk after power returns.
//!
//! Crash tests usually also want to cut power *in the middle* of an
//! operation: a shared [`Fuse`] lets a fixed number of further mutating
//! calls (writes, zero-outs, syncs) through, across every device sharing it,
//! and silently drops all later ones — the state of both devices at the
//! instant the power failed, while the code under test runs on unaware.
//!
//! The inner device is any [`Device`]: a [`MemDevice`] in tests, a file
//! when serving with a simulated cache. An optional cache limit bounds the
//! memory a long-running server spends on the cache; past it the device
//! destages everything, which a real disk is free to do at any time.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{check_range, Device};

/// The unit a power cut keeps or drops atomically.
pub const SECTOR_SIZE: u64 = 512;
const SECTOR: usize = SECTOR_SIZE as usize;

/// A byte vector behind a lock: the simplest durable store.
///
/// `sync` is a no-op because every write is already "durable" here; wrap it
/// in a [`VolatileDevice`] to get a cache that can lose writes.
#[derive(Debug, Default)]
pub struct MemDevice {
    bytes: Mutex<Vec<u8>>,
}

impl MemDevice {
    /// A device of `size` zero bytes.
    pub fn new(size: u64) -> Self {
        Self::from_vec(vec![0; size as usize])
    }

    /// A device holding exactly `bytes`.
    pub fn from_vec(bytes: Vec<u8>) -> Self {
        Self {
            bytes: Mutex::new(bytes),
        }
    }

    /// A copy of the whole content.
    pub fn to_vec(&self) -> Vec<u8> {
        self.lock().clone()
    }

    fn lock(&self) -> MutexGuard<'_, Vec<u8>> {
        // A panic while holding the lock leaves plain bytes behind, which
        // are still a valid device image: ignore the poisoning.
        self.bytes.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Device for MemDevice {
    fn size(&self) -> u64 {
        self.lock().len() as u64
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let bytes = self.lock();
        check_range(bytes.len() as u64, offset, buf.len() as u64)?;
        let start = offset as usize;
        buf.copy_from_slice(&bytes[start..start + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut bytes = self.lock();
        check_range(bytes.len() as u64, offset, buf.len() as u64)?;
        let start = offset as usize;
        bytes[start..start + buf.len()].copy_from_slice(buf);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        Ok(())
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut bytes = self.lock();
        check_range(bytes.len() as u64, offset, len)?;
        let start = offset as usize;
        bytes[start..start + len as usize].fill(0);
        Ok(())
    }
}

/// A power switch shared by several devices, to cut power mid-operation.
///
/// Disarmed it lets everything through. Armed with `n`, it lets the next
/// `n` mutating calls (write, zero-out, sync — counted across every device
/// holding it) take effect and drops every later one silently, reporting
/// success: the caller cannot tell, exactly as it could not tell at a real
/// power failure. Reads are never affected.
#[derive(Debug)]
pub struct Fuse {
    // u64::MAX: disarmed; 0: tripped; otherwise calls left before the cut.
    remaining: AtomicU64,
}

const DISARMED: u64 = u64::MAX;

impl Default for Fuse {
    fn default() -> Self {
        Self::new()
    }
}

impl Fuse {
    /// A disarmed fuse.
    pub fn new() -> Self {
        Self {
            remaining: AtomicU64::new(DISARMED),
        }
    }

    /// Let `n` more mutating calls through, then cut the power.
    pub fn arm(&self, n: u64) {
        self.remaining.store(n.min(DISARMED - 1), Ordering::SeqCst);
    }

    /// Restore power: let everything through again.
    pub fn disarm(&self) {
        self.remaining.store(DISARMED, Ordering::SeqCst);
    }

    /// Whether the power has been cut (some call was, or would be, dropped).
    pub fn tripped(&self) -> bool {
        self.remaining.load(Ordering::SeqCst) == 0
    }

    /// Account for one mutating call; `false` means drop it.
    fn pass(&self) -> bool {
        self.remaining
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |r| match r {
                DISARMED => Some(DISARMED),
                0 => None,
                r => Some(r - 1),
            })
            .is_ok()
    }
}

/// Counters of a [`VolatileDevice`], read with [`VolatileDevice::stats`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VolatileStats {
    pub reads: u64,
    pub writes: u64,
    pub zero_ranges: u64,
    pub syncs: u64,
    /// Mutating calls dropped because the [`Fuse`] had tripped.
    pub dropped: u64,
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

/// What a power cut did, sector by sector.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PowerCutReport {
    /// `(sector number, fate)` of every sector that was un-synced, in
    /// ascending sector order.
    pub sectors: Vec<(u64, Fate)>,
}

impl PowerCutReport {
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

/// One version of a cached sector. Zeros get their own variant so that a
/// large discard costs no sector buffers.
#[derive(Debug, Clone)]
enum Version {
    Zero,
    Data(Box<[u8]>),
}

impl Version {
    fn from_sector(bytes: &[u8]) -> Self {
        debug_assert_eq!(bytes.len(), SECTOR);
        if bytes.iter().all(|&b| b == 0) {
            Version::Zero
        } else {
            Version::Data(bytes.into())
        }
    }

    fn copy_to(&self, out: &mut [u8], from: usize) {
        match self {
            Version::Zero => out.fill(0),
            Version::Data(d) => out.copy_from_slice(&d[from..from + out.len()]),
        }
    }

    fn to_sector(&self) -> Vec<u8> {
        match self {
            Version::Zero => vec![0; SECTOR],
            Version::Data(d) => d.to_vec(),
        }
    }
}

#[derive(Debug, Default)]
struct State {
    /// Sector number → versions written since the last sync, oldest first.
    /// Never holds an empty list.
    cache: BTreeMap<u64, Vec<Version>>,
    /// Total versions in `cache`, checked against the limit.
    versions: usize,
    stats: VolatileStats,
}

/// A [`Device`] whose writes sit in a volatile cache until `sync`.
///
/// See the [module documentation](self) for the model. All methods take
/// `&self`; one internal lock serialises them (this is a test and
/// simulation device, not a fast path).
pub struct VolatileDevice {
    inner: Arc<dyn Device>,
    size: u64,
    fuse: Option<Arc<Fuse>>,
    /// Most cached versions before a forced destage; `None`: unbounded.
    limit: Option<usize>,
    state: Mutex<State>,
}

impl std::fmt::Debug for VolatileDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolatileDevice")
            .field("size", &self.size)
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
            fuse: None,
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

    /// Route every mutating call through `fuse` (see [`Fuse`]).
    pub fn with_fuse(mut self, fuse: Arc<Fuse>) -> Self {
        self.fuse = Some(fuse);
        self
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

    /// The durable image (what a power cut that loses every cached write
    /// would leave), read from the inner device.
    pub fn durable_snapshot(&self) -> io::Result<Vec<u8>> {
        let _state = self.lock();
        let mut buf = vec![0; self.size as usize];
        self.inner.read_at(&mut buf, 0)?;
        Ok(buf)
    }

    /// Cut the power: every un-synced sector independently keeps its
    /// durable content or one of its cached versions, chosen uniformly by
    /// an RNG seeded with `seed` (same seed and same history, same result).
    /// The survivors are written to the inner device and synced; the cache
    /// is then empty and the device usable again.
    pub fn power_cut(&self, seed: u64) -> io::Result<PowerCutReport> {
        let mut rng = StdRng::seed_from_u64(seed);
        self.power_cut_with(|_, versions| rng.gen_range(0..=versions))
    }

    /// Like [`power_cut`](Self::power_cut), with the choice made by
    /// `choose(sector, versions)`: 0 keeps the durable content, `k` in
    /// `1..=versions` keeps cached version `k - 1` (oldest first). Larger
    /// answers are clamped to the newest version. Sectors are visited in
    /// ascending order.
    pub fn power_cut_with(
        &self,
        mut choose: impl FnMut(u64, usize) -> usize,
    ) -> io::Result<PowerCutReport> {
        let mut state = self.lock();
        state.stats.power_cuts += 1;
        let mut report = PowerCutReport::default();
        let cache = std::mem::take(&mut state.cache);
        state.versions = 0;
        for (sector, versions) in cache {
            let of = versions.len();
            let fate = match choose(sector, of).min(of) {
                0 => Fate::Durable,
                k => {
                    let v = &versions[k - 1];
                    self.inner.write_at(&v.to_sector(), sector * SECTOR_SIZE)?;
                    Fate::Version { index: k - 1, of }
                }
            };
            report.sectors.push((sector, fate));
        }
        self.inner.sync()?;
        Ok(report)
    }

    /// Flip bit `bit` (0–7) of the byte at `offset`, in the durable image
    /// and in every cached version of its sector: whatever a later read or
    /// power cut yields carries the flip. Bypasses the fuse and counters.
    pub fn corrupt_flip_bit(&self, offset: u64, bit: u8) -> io::Result<()> {
        check_range(self.size, offset, 1)?;
        let mask = 1u8 << (bit & 7);
        let mut state = self.lock();
        let mut byte = [0u8];
        self.inner.read_at(&mut byte, offset)?;
        byte[0] ^= mask;
        self.inner.write_at(&byte, offset)?;
        let at = (offset % SECTOR_SIZE) as usize;
        if let Some(versions) = state.cache.get_mut(&(offset / SECTOR_SIZE)) {
            for v in versions {
                let mut sector = v.to_sector();
                sector[at] ^= mask;
                *v = Version::Data(sector.into());
            }
        }
        Ok(())
    }

    /// Overwrite `data.len()` bytes at `offset` in the durable image and in
    /// every cached version of the sectors it touches (fault injection:
    /// misdirected or lost writes). Bypasses the fuse and counters.
    pub fn corrupt_write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        check_range(self.size, offset, data.len() as u64)?;
        let mut state = self.lock();
        self.inner.write_at(data, offset)?;
        for_each_sector(offset, data.len() as u64, |sector, within, range| {
            if let Some(versions) = state.cache.get_mut(&sector) {
                for v in versions {
                    let mut bytes = v.to_sector();
                    bytes[within..within + range.len()].copy_from_slice(&data[range.clone()]);
                    *v = Version::from_sector(&bytes);
                }
            }
        });
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update leaves the state consistent between statements that
        // could panic, so a poisoned lock still guards a usable cache.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a mutating call may take effect (power is on).
    fn powered(&self, state: &mut State) -> bool {
        let on = self.fuse.as_ref().map_or(true, |f| f.pass());
        if !on {
            state.stats.dropped += 1;
        }
        on
    }

    /// The newest content of `sector`: cached, else durable.
    fn current_sector(&self, state: &State, sector: u64) -> io::Result<Vec<u8>> {
        match state.cache.get(&sector).and_then(|v| v.last()) {
            Some(v) => Ok(v.to_sector()),
            None => {
                let mut buf = vec![0; SECTOR];
                self.inner.read_at(&mut buf, sector * SECTOR_SIZE)?;
                Ok(buf)
            }
        }
    }

    /// Write the newest version of every cached sector to the inner
    /// device, coalescing adjacent sectors, then empty the cache. On error
    /// the cache is kept: what was already written is also still cached,
    /// which a later power cut handles correctly.
    fn destage(&self, state: &mut State) -> io::Result<()> {
        let mut run: Vec<u8> = Vec::new();
        let mut run_start = 0u64;
        for (&sector, versions) in &state.cache {
            let end = run_start + (run.len() / SECTOR) as u64;
            if !run.is_empty() && sector != end {
                self.inner.write_at(&run, run_start * SECTOR_SIZE)?;
                run.clear();
            }
            if run.is_empty() {
                run_start = sector;
            }
            if let Some(v) = versions.last() {
                run.extend_from_slice(&v.to_sector());
            }
        }
        if !run.is_empty() {
            self.inner.write_at(&run, run_start * SECTOR_SIZE)?;
        }
        state.cache.clear();
        state.versions = 0;
        Ok(())
    }

    /// Make room for `incoming` new versions under the cache limit.
    /// Returns `false` if the request is larger than the whole cache and
    /// must be written through.
    fn make_room(&self, state: &mut State, incoming: u64) -> io::Result<bool> {
        let Some(limit) = self.limit else {
            return Ok(true);
        };
        if incoming > limit as u64 {
            return Ok(false);
        }
        if state.versions + incoming as usize > limit {
            self.destage(state)?;
            state.stats.destages += 1;
        }
        Ok(true)
    }

    /// Drop the cached versions of sectors a write-through overwrites, so
    /// that a power cut cannot resurrect them over the newer durable data.
    fn forget_range(state: &mut State, offset: u64, len: u64) {
        for_each_sector(offset, len, |sector, _, _| {
            if let Some(v) = state.cache.remove(&sector) {
                state.versions -= v.len();
            }
        });
    }

    fn push(state: &mut State, sector: u64, v: Version) {
        state.cache.entry(sector).or_default().push(v);
        state.versions += 1;
    }
}

/// Call `f(sector, offset within sector, range within the request)` for
/// every sector that `len` bytes at `offset` touch.
fn for_each_sector(offset: u64, len: u64, mut f: impl FnMut(u64, usize, std::ops::Range<usize>)) {
    let end = offset + len;
    let mut pos = offset;
    while pos < end {
        let sector = pos / SECTOR_SIZE;
        let within = (pos % SECTOR_SIZE) as usize;
        let n = (SECTOR_SIZE - within as u64).min(end - pos);
        let from = (pos - offset) as usize;
        f(sector, within, from..from + n as usize);
        pos += n;
    }
}

impl Device for VolatileDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(self.size, offset, buf.len() as u64)?;
        let mut state = self.lock();
        state.stats.reads += 1;
        self.inner.read_at(buf, offset)?;
        if buf.is_empty() {
            return Ok(());
        }
        // Overlay the newest cached version of every sector in range.
        let end = offset + buf.len() as u64;
        let first = offset / SECTOR_SIZE;
        let last = (end - 1) / SECTOR_SIZE;
        for (&sector, versions) in state.cache.range(first..=last) {
            let (Some(v), start) = (versions.last(), sector * SECTOR_SIZE) else {
                continue;
            };
            let lo = start.max(offset);
            let hi = (start + SECTOR_SIZE).min(end);
            let out = &mut buf[(lo - offset) as usize..(hi - offset) as usize];
            v.copy_to(out, (lo - start) as usize);
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        check_range(self.size, offset, buf.len() as u64)?;
        let mut state = self.lock();
        if !self.powered(&mut state) {
            return Ok(());
        }
        state.stats.writes += 1;
        let len = buf.len() as u64;
        let sectors = (offset % SECTOR_SIZE + len).div_ceil(SECTOR_SIZE);
        if !self.make_room(&mut state, sectors)? {
            Self::forget_range(&mut state, offset, len);
            return self.inner.write_at(buf, offset);
        }
        let mut result = Ok(());
        for_each_sector(offset, len, |sector, within, range| {
            if result.is_err() {
                return;
            }
            let v = if range.len() == SECTOR {
                Version::from_sector(&buf[range])
            } else {
                // A partial sector: the disk reads, modifies and caches the
                // whole sector, which is still the unit a power cut keeps.
                match self.current_sector(&state, sector) {
                    Ok(mut bytes) => {
                        bytes[within..within + range.len()].copy_from_slice(&buf[range]);
                        Version::from_sector(&bytes)
                    }
                    Err(e) => {
                        result = Err(e);
                        return;
                    }
                }
            };
            Self::push(&mut state, sector, v);
        });
        result
    }

    fn sync(&self) -> io::Result<()> {
        let mut state = self.lock();
        if !self.powered(&mut state) {
            return Ok(());
        }
        state.stats.syncs += 1;
        self.destage(&mut state)?;
        self.inner.sync()
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        check_range(self.size, offset, len)?;
        let mut state = self.lock();
        if !self.powered(&mut state) {
            return Ok(());
        }
        state.stats.zero_ranges += 1;
        let sectors = (offset % SECTOR_SIZE + len).div_ceil(SECTOR_SIZE);
        if !self.make_room(&mut state, sectors)? {
            Self::forget_range(&mut state, offset, len);
            return self.inner.zero_range(offset, len);
        }
        let mut result = Ok(());
        for_each_sector(offset, len, |sector, within, range| {
            if result.is_err() {
                return;
            }
            let v = if range.len() == SECTOR {
                Version::Zero
            } else {
                match self.current_sector(&state, sector) {
                    Ok(mut bytes) => {
                        bytes[within..within + range.len()].fill(0);
                        Version::from_sector(&bytes)
                    }
                    Err(e) => {
                        result = Err(e);
                        return;
                    }
                }
            };
            Self::push(&mut state, sector, v);
        });
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: usize = SECTOR;

    fn read(dev: &dyn Device, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        dev.read_at(&mut buf, offset).unwrap();
        buf
    }

    fn sector_of(durable: &[u8], sector: usize) -> Vec<u8> {
        durable[sector * S..(sector + 1) * S].to_vec()
    }

    #[test]
    fn reads_see_cached_writes_but_durable_image_does_not() {
        let dev = VolatileDevice::zeroed(8 * SECTOR_SIZE);
        dev.write_at(&[7; 2 * S], SECTOR_SIZE).unwrap();
        assert_eq!(read(&dev, SECTOR_SIZE, 2 * S), vec![7; 2 * S]);
        assert!(dev.durable_snapshot().unwrap().iter().all(|&b| b == 0));
        assert_eq!(dev.cached_sectors(), 2);
    }

    #[test]
    fn sync_makes_the_newest_version_durable() {
        let dev = VolatileDevice::zeroed(8 * SECTOR_SIZE);
        dev.write_at(&[1; S], 0).unwrap();
        dev.write_at(&[2; S], 0).unwrap();
        dev.write_at(&[3; S], 3 * SECTOR_SIZE).unwrap();
        dev.sync().unwrap();
        assert_eq!(dev.cached_sectors(), 0);
        let durable = dev.durable_snapshot().unwrap();
        assert_eq!(sector_of(&durable, 0), vec![2; S]);
        assert_eq!(sector_of(&durable, 3), vec![3; S]);
        // Nothing is left for a power cut to lose.
        let report = dev.power_cut(1).unwrap();
        assert!(report.sectors.is_empty());
        assert_eq!(dev.durable_snapshot().unwrap(), durable);
        assert_eq!(dev.stats().syncs, 1);
        assert_eq!(dev.stats().writes, 3);
    }

    #[test]
    fn power_cut_keeps_or_loses_each_sector_independently() {
        // 64 sectors, each written once: a power cut must keep some and
        // lose some (for a fixed seed), and each sector must be whole.
        let dev = VolatileDevice::zeroed(64 * SECTOR_SIZE);
        dev.write_at(&[9; 64 * S], 0).unwrap();
        let report = dev.power_cut(42).unwrap();
        assert_eq!(report.sectors.len(), 64);
        let durable = dev.durable_snapshot().unwrap();
        let mut kept = 0;
        for (sector, fate) in &report.sectors {
            let bytes = sector_of(&durable, *sector as usize);
            match fate {
                Fate::Durable => assert_eq!(bytes, vec![0; S]),
                Fate::Version { index: 0, of: 1 } => {
                    assert_eq!(bytes, vec![9; S]);
                    kept += 1;
                }
                other => panic!("impossible fate {other:?}"),
            }
        }
        assert!(kept > 0 && kept < 64, "kept {kept} of 64");
        assert_eq!(report.kept_latest(), kept);
        assert_eq!(report.reverted(), 64 - kept);
        // The device goes on from the survivors with an empty cache.
        assert_eq!(dev.cached_sectors(), 0);
        assert_eq!(read(&dev, 0, 64 * S), durable);
    }

    #[test]
    fn power_cut_can_keep_an_intermediate_version() {
        let dev = VolatileDevice::zeroed(SECTOR_SIZE);
        for v in 1..=3u8 {
            dev.write_at(&[v; S], 0).unwrap();
        }
        let report = dev.power_cut_with(|_, n| n - 1).unwrap();
        assert_eq!(report.sectors, vec![(0, Fate::Version { index: 1, of: 3 })]);
        assert_eq!(report.kept_older(), 1);
        assert_eq!(read(&dev, 0, S), vec![2; S]);
    }

    #[test]
    fn power_cut_is_deterministic_per_seed() {
        let run = |seed| {
            let dev = VolatileDevice::zeroed(128 * SECTOR_SIZE);
            for i in 0..128u64 {
                dev.write_at(&[i as u8 + 1; S], i * SECTOR_SIZE).unwrap();
                dev.write_at(&[i as u8 + 100; S], i * SECTOR_SIZE).unwrap();
            }
            let report = dev.power_cut(seed).unwrap();
            (report, dev.durable_snapshot().unwrap())
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7).1, run(8).1);
    }

    #[test]
    fn zero_range_is_a_write_of_zero_sectors() {
        let dev = VolatileDevice::zeroed(4 * SECTOR_SIZE);
        dev.write_at(&[5; 4 * S], 0).unwrap();
        dev.sync().unwrap();
        dev.zero_range(SECTOR_SIZE, 2 * SECTOR_SIZE).unwrap();
        assert_eq!(read(&dev, 0, 4 * S)[S..3 * S], vec![0; 2 * S]);
        // Lost on a power cut that keeps nothing.
        dev.power_cut_with(|_, _| 0).unwrap();
        assert_eq!(read(&dev, 0, 4 * S), vec![5; 4 * S]);
        assert_eq!(dev.stats().zero_ranges, 1);
    }

    #[test]
    fn partial_sector_writes_modify_the_whole_sector() {
        let dev = VolatileDevice::zeroed(2 * SECTOR_SIZE);
        dev.write_at(&[1; 2 * S], 0).unwrap();
        dev.sync().unwrap();
        dev.write_at(&[2; 10], 500).unwrap();
        let mut want = vec![1; 2 * S];
        want[500..510].fill(2);
        assert_eq!(read(&dev, 0, 2 * S), want);
        dev.power_cut_with(|_, n| n).unwrap();
        assert_eq!(dev.durable_snapshot().unwrap(), want);
    }

    #[test]
    fn fuse_drops_everything_after_the_cut_across_devices() {
        let fuse = Arc::new(Fuse::new());
        let a = VolatileDevice::zeroed(4 * SECTOR_SIZE).with_fuse(fuse.clone());
        let b = VolatileDevice::zeroed(4 * SECTOR_SIZE).with_fuse(fuse.clone());
        fuse.arm(2);
        a.write_at(&[1; S], 0).unwrap();
        b.sync().unwrap();
        // Both allowed calls used: the power is off from here on.
        assert!(fuse.tripped());
        a.write_at(&[2; S], SECTOR_SIZE).unwrap(); // dropped
        b.write_at(&[3; S], 0).unwrap(); // dropped
        assert!(fuse.tripped());
        assert_eq!(read(&a, 0, 2 * S), [vec![1; S], vec![0; S]].concat());
        assert_eq!(read(&b, 0, S), vec![0; S]);
        assert_eq!(a.stats().dropped + b.stats().dropped, 2);
        fuse.disarm();
        b.write_at(&[4; S], 0).unwrap();
        assert_eq!(read(&b, 0, S), vec![4; S]);
    }

    #[test]
    fn corruption_reaches_durable_and_cached_versions() {
        let dev = VolatileDevice::zeroed(2 * SECTOR_SIZE);
        dev.write_at(&[1; S], 0).unwrap();
        dev.sync().unwrap();
        dev.write_at(&[2; S], 0).unwrap();
        dev.corrupt_flip_bit(3, 0).unwrap();
        let mut want = vec![2; S];
        want[3] ^= 1;
        assert_eq!(read(&dev, 0, S), want);
        dev.power_cut_with(|_, _| 0).unwrap();
        let mut want = vec![1; S];
        want[3] ^= 1;
        assert_eq!(read(&dev, 0, S), want);

        dev.write_at(&[6; S], SECTOR_SIZE).unwrap();
        dev.corrupt_write(SECTOR_SIZE + 4, &[8; 4]).unwrap();
        assert_eq!(read(&dev, SECTOR_SIZE + 2, 4), vec![6, 6, 8, 8]);
        dev.power_cut_with(|_, _| 0).unwrap();
        assert_eq!(read(&dev, SECTOR_SIZE + 2, 4), vec![0, 0, 8, 8]);
    }

    #[test]
    fn cache_limit_destages_and_writes_large_requests_through() {
        let dev = VolatileDevice::zeroed(16 * SECTOR_SIZE).with_cache_limit(4);
        dev.write_at(&[1; 3 * S], 0).unwrap();
        dev.write_at(&[2; 2 * S], 8 * SECTOR_SIZE).unwrap(); // forces a destage
        assert_eq!(dev.stats().destages, 1);
        assert_eq!(dev.cached_sectors(), 2);
        dev.write_at(&[3; S], 8 * SECTOR_SIZE).unwrap();
        dev.write_at(&[4; 8 * S], 8 * SECTOR_SIZE).unwrap(); // through
        assert_eq!(dev.cached_sectors(), 0);
        dev.power_cut_with(|_, _| 0).unwrap();
        assert_eq!(read(&dev, 0, 3 * S), vec![1; 3 * S]);
        assert_eq!(read(&dev, 8 * SECTOR_SIZE, 8 * S), vec![4; 8 * S]);
    }

    #[test]
    fn out_of_range_is_an_error() {
        let dev = VolatileDevice::zeroed(SECTOR_SIZE);
        assert!(dev.write_at(&[0; 2], SECTOR_SIZE - 1).is_err());
        assert!(dev.read_at(&mut [0; 1], SECTOR_SIZE).is_err());
        assert!(dev.zero_range(1, SECTOR_SIZE).is_err());
        assert!(dev.corrupt_flip_bit(SECTOR_SIZE, 0).is_err());
    }
}
