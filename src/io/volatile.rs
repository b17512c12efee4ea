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
//! and then marks the instant the power failed. Each device freezes its
//! state (durable image and cache) at that instant; the code under test
//! runs on unaware against a device that still behaves consistently (reads
//! see its later writes, as they would on a disk that has power), and the
//! next [`VolatileDevice::power_cut`] starts from the frozen state, so
//! nothing done after the instant survives.
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
//! A server that simulates a power failure (`serve --volatile-cache`) must
//! also make sure that nothing reaches the durable image *after* the
//! instant of the cut, whatever requests were still in flight: a shared
//! [`PowerSupply`], once switched off, makes every call of every device on
//! it fail, reads included, as a disk without power answers nothing.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{check_range, Device, MemDevice};

/// The unit a power cut keeps or drops atomically, unless a device is
/// built [`with_atomic_unit`](VolatileDevice::with_atomic_unit).
pub const SECTOR_SIZE: u64 = 512;

/// A power switch shared by several devices, to cut power mid-operation.
///
/// Disarmed it lets everything through. Armed with `n`, it lets the next
/// `n` mutating calls (write, zero-out, sync — counted across every device
/// holding it) count, and every later one happens after the power failed:
/// it still takes effect for the running code (which cannot tell, as it
/// could not at a real power failure), but not for the next power cut,
/// which starts from each device's state at the failure.
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

    /// Whether the power has failed (the next mutating call, if any, comes
    /// after the failure).
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

/// Power shared by several devices, switched off for good at a power cut.
///
/// Unlike a [`Fuse`], which lets the code under test run on unaware, a
/// switched-off supply makes every call of every device on it fail with an
/// I/O error, reads included: a server keeps answering its front-end, but
/// nothing of the old process state can reach the durable image any more.
/// A call that was already running when the supply went off finishes (it
/// holds the device's lock), so it counts as done before the cut.
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

/// Counters of a [`VolatileDevice`], read with [`VolatileDevice::stats`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VolatileStats {
    pub reads: u64,
    pub writes: u64,
    pub zero_ranges: u64,
    pub syncs: u64,
    /// Mutating calls made after the [`Fuse`] tripped: visible to reads,
    /// lost at the next power cut.
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

/// One version of a cached sector. Zeros get their own variant so that a
/// large discard costs no sector buffers.
#[derive(Debug, Clone)]
enum Version {
    Zero,
    Data(Box<[u8]>),
}

impl Version {
    fn from_sector(bytes: &[u8]) -> Self {
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

    fn to_sector(&self, unit: usize) -> Vec<u8> {
        match self {
            Version::Zero => vec![0; unit],
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
    /// The device as it was when the fuse tripped, if it has since been
    /// changed: what the next power cut starts from.
    frozen: Option<Frozen>,
    stats: VolatileStats,
}

/// A copy of the durable image and the cache at the instant of a power
/// failure.
#[derive(Debug)]
struct Frozen {
    durable: Vec<u8>,
    cache: BTreeMap<u64, Vec<Version>>,
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
    fuse: Option<Arc<Fuse>>,
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

    /// Route every mutating call through `fuse` (see [`Fuse`]). The first
    /// call after it trips copies the whole device once, so this is for
    /// test-sized images.
    pub fn with_fuse(mut self, fuse: Arc<Fuse>) -> Self {
        self.fuse = Some(fuse);
        self
    }

    /// Keep or drop `bytes` at a time at a power cut instead of 512: the
    /// logical block size a disk promises to write atomically. It must be a
    /// power of two that divides the device size, and the cache must still
    /// be empty.
    pub fn with_atomic_unit(mut self, bytes: u64) -> io::Result<Self> {
        if !bytes.is_power_of_two() || self.size % bytes != 0 {
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

    /// The durable image (what a power cut that loses every cached write
    /// would leave), read from the inner device. While the fuse is tripped
    /// it is the image as of the failure: calls made since (say a sync by
    /// a thread of the dead process right after a power cut) do not count.
    pub fn durable_snapshot(&self) -> io::Result<Vec<u8>> {
        let state = self.lock();
        if let Some(frozen) = &state.frozen {
            return Ok(frozen.durable.clone());
        }
        let mut buf = vec![0; self.size as usize];
        self.inner.read_at(&mut buf, 0)?;
        Ok(buf)
    }

    /// Cut the power: every un-synced sector independently keeps its
    /// durable content or one of its cached versions, chosen uniformly by
    /// an RNG seeded with `seed` (same seed and same history, same result).
    /// The survivors are written to the inner device and synced; the cache
    /// is then empty and the device usable again (unless its
    /// [`PowerSupply`] is off: then it only keeps the survivors).
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
        let live = std::mem::take(&mut state.cache);
        state.versions = 0;
        // After a fuse trip, go back to the instant of the failure:
        // everything done since never happened as far as the media know.
        let cache = match state.frozen.take() {
            Some(frozen) => {
                self.inner.write_at(&frozen.durable, 0)?;
                frozen.cache
            }
            None => live,
        };
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

    /// The process that used this device died at the fuse's instant, but
    /// the host lives on: go back to the state frozen then — durable image
    /// *and* cache, which is the host's page cache and survives a process
    /// death — forgetting every call made since. A device whose fuse never
    /// tripped is unchanged.
    pub fn revive(&self) -> io::Result<()> {
        let mut state = self.lock();
        if let Some(frozen) = state.frozen.take() {
            self.inner.write_at(&frozen.durable, 0)?;
            state.versions = frozen.cache.values().map(Vec::len).sum();
            state.cache = frozen.cache;
        }
        Ok(())
    }

    /// Flip bit `bit` (0–7) of the byte at `offset`, in the durable image
    /// and in every cached version of its sector: whatever a later read or
    /// power cut yields carries the flip. Bypasses the fuse and counters
    /// (and does not reach a state frozen by a tripped fuse).
    pub fn corrupt_flip_bit(&self, offset: u64, bit: u8) -> io::Result<()> {
        check_range(self.size, offset, 1)?;
        let mask = 1u8 << (bit & 7);
        let mut state = self.lock();
        let mut byte = [0u8];
        self.inner.read_at(&mut byte, offset)?;
        byte[0] ^= mask;
        self.inner.write_at(&byte, offset)?;
        let at = (offset % self.unit) as usize;
        if let Some(versions) = state.cache.get_mut(&(offset / self.unit)) {
            for v in versions {
                let mut sector = v.to_sector(self.unit as usize);
                sector[at] ^= mask;
                *v = Version::Data(sector.into());
            }
        }
        Ok(())
    }

    /// Overwrite `data.len()` bytes at `offset` in the durable image and in
    /// every cached version of the sectors it touches (fault injection:
    /// misdirected or lost writes). Bypasses the fuse and counters (and
    /// does not reach a state frozen by a tripped fuse).
    pub fn corrupt_write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        check_range(self.size, offset, data.len() as u64)?;
        let mut state = self.lock();
        self.inner.write_at(data, offset)?;
        for_each_sector(
            self.unit,
            offset,
            data.len() as u64,
            |sector, within, range| {
                if let Some(versions) = state.cache.get_mut(&sector) {
                    for v in versions {
                        let mut bytes = v.to_sector(self.unit as usize);
                        bytes[within..within + range.len()].copy_from_slice(&data[range.clone()]);
                        *v = Version::from_sector(&bytes);
                    }
                }
            },
        );
        Ok(())
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

    /// Account for a mutating call with the fuse. The first one after the
    /// power failed freezes the device as it was at the failure (nothing
    /// changed it between the failure and this call: every change passes
    /// here first). The call itself then proceeds on the live state.
    fn count_call(&self, state: &mut State) -> io::Result<()> {
        if self.fuse.as_ref().map_or(true, |f| f.pass()) {
            return Ok(());
        }
        state.stats.after_cut += 1;
        if state.frozen.is_none() {
            let mut durable = vec![0; self.size as usize];
            self.inner.read_at(&mut durable, 0)?;
            state.frozen = Some(Frozen {
                durable,
                cache: state.cache.clone(),
            });
        }
        Ok(())
    }

    /// The newest content of `sector`: cached, else durable.
    fn current_sector(&self, state: &State, sector: u64) -> io::Result<Vec<u8>> {
        match state.cache.get(&sector).and_then(|v| v.last()) {
            Some(v) => Ok(v.to_sector(self.unit as usize)),
            None => {
                let mut buf = vec![0; self.unit as usize];
                self.inner.read_at(&mut buf, sector * self.unit)?;
                Ok(buf)
            }
        }
    }

    /// Write the newest version of every cached unit to the inner device,
    /// coalescing adjacent units (runs of zeros become one zero-out, so a
    /// discarded range stays a hole in a sparse image), then empty the
    /// cache. On error the cache is kept: what was already written is also
    /// still cached, which a later power cut handles correctly.
    fn destage(&self, state: &mut State) -> io::Result<()> {
        let mut run = Run::default();
        for (&unit, versions) in &state.cache {
            if let Some(v) = versions.last() {
                run.push(self, unit, v)?;
            }
        }
        run.flush(self)?;
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
    fn forget_range(&self, state: &mut State, offset: u64, len: u64) {
        for_each_sector(self.unit, offset, len, |sector, _, _| {
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

/// A run of adjacent units being destaged: data to write in one call, or
/// zeros to write as one zero-out.
#[derive(Default)]
struct Run {
    start: u64,
    units: u64,
    /// Empty for a run of zeros.
    bytes: Vec<u8>,
    zeros: bool,
}

impl Run {
    fn push(&mut self, dev: &VolatileDevice, unit: u64, v: &Version) -> io::Result<()> {
        let zeros = matches!(v, Version::Zero);
        if self.units > 0 && (unit != self.start + self.units || zeros != self.zeros) {
            self.flush(dev)?;
        }
        if self.units == 0 {
            self.start = unit;
            self.zeros = zeros;
        }
        if let Version::Data(d) = v {
            self.bytes.extend_from_slice(d);
        }
        self.units += 1;
        Ok(())
    }

    fn flush(&mut self, dev: &VolatileDevice) -> io::Result<()> {
        if self.units == 0 {
            return Ok(());
        }
        let at = self.start * dev.unit;
        if self.zeros {
            dev.inner.zero_range(at, self.units * dev.unit)?;
        } else {
            dev.inner.write_at(&self.bytes, at)?;
        }
        self.bytes.clear();
        self.units = 0;
        Ok(())
    }
}

/// Call `f(unit number, offset within the unit, range within the request)`
/// for every `unit`-byte unit that `len` bytes at `offset` touch.
fn for_each_sector(
    unit: u64,
    offset: u64,
    len: u64,
    mut f: impl FnMut(u64, usize, std::ops::Range<usize>),
) {
    let end = offset + len;
    let mut pos = offset;
    while pos < end {
        let sector = pos / unit;
        let within = (pos % unit) as usize;
        let n = (unit - within as u64).min(end - pos);
        let from = (pos - offset) as usize;
        f(sector, within, from..from + n as usize);
        pos += n;
    }
}

impl VolatileDevice {
    /// Cache one write or zero-out of `len` bytes at `offset`, unit by
    /// unit; `fill(unit, within, range)` makes the new version of a unit
    /// that the request covers only in part, from its current content.
    fn cache_range(
        &self,
        state: &mut State,
        offset: u64,
        len: u64,
        whole: impl Fn(std::ops::Range<usize>) -> Version,
        part: impl Fn(&mut [u8], std::ops::Range<usize>),
    ) -> io::Result<()> {
        let mut result = Ok(());
        for_each_sector(self.unit, offset, len, |unit, within, range| {
            if result.is_err() {
                return;
            }
            let v = if range.len() as u64 == self.unit {
                whole(range)
            } else {
                // A partial unit: the disk reads, modifies and caches the
                // whole unit, which is still what a power cut keeps.
                match self.current_sector(state, unit) {
                    Ok(mut bytes) => {
                        part(&mut bytes[within..within + range.len()], range);
                        Version::from_sector(&bytes)
                    }
                    Err(e) => {
                        result = Err(e);
                        return;
                    }
                }
            };
            Self::push(state, unit, v);
        });
        result
    }

    /// Units `len` bytes at `offset` touch.
    fn units(&self, offset: u64, len: u64) -> u64 {
        (offset % self.unit + len).div_ceil(self.unit)
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
        self.count_call(&mut state)?;
        state.stats.syncs += 1;
        self.destage(&mut state)?;
        self.inner.sync()
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        check_range(self.size, offset, len)?;
        let mut state = self.lock();
        self.supplied()?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::MemDevice;

    const S: usize = SECTOR_SIZE as usize;

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
    fn fuse_marks_the_instant_of_failure_across_devices() {
        let fuse = Arc::new(Fuse::new());
        let a = VolatileDevice::zeroed(4 * SECTOR_SIZE).with_fuse(fuse.clone());
        let b = VolatileDevice::zeroed(4 * SECTOR_SIZE).with_fuse(fuse.clone());
        fuse.arm(2);
        a.write_at(&[1; S], 0).unwrap();
        b.sync().unwrap();
        // Both allowed calls used: the power is off from here on.
        assert!(fuse.tripped());
        a.write_at(&[2; S], SECTOR_SIZE).unwrap();
        b.write_at(&[3; S], 0).unwrap();
        b.sync().unwrap();
        // The running code still sees a consistent device...
        assert_eq!(read(&a, 0, 2 * S), [vec![1; S], vec![2; S]].concat());
        assert_eq!(read(&b, 0, S), vec![3; S]);
        assert_eq!(a.stats().after_cut + b.stats().after_cut, 3);
        // ...but a power cut starts from the instant of the failure, even
        // when it keeps every cached write and the later sync "happened".
        a.power_cut_with(|_, n| n).unwrap();
        b.power_cut_with(|_, n| n).unwrap();
        assert_eq!(read(&a, 0, 2 * S), [vec![1; S], vec![0; S]].concat());
        assert_eq!(read(&b, 0, S), vec![0; S]);
        // The dead process may still be running: what it does after the
        // cut does not reach the snapshot of the survivors.
        a.write_at(&[5; S], 0).unwrap();
        a.sync().unwrap();
        assert_eq!(
            a.durable_snapshot().unwrap(),
            [vec![1; S], vec![0; 3 * S]].concat()
        );
        fuse.disarm();
        b.write_at(&[4; S], 0).unwrap();
        assert_eq!(read(&b, 0, S), vec![4; S]);
        b.power_cut_with(|_, n| n).unwrap();
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
    fn a_larger_atomic_unit_is_kept_or_lost_whole() {
        const U: usize = 4096;
        let dev = VolatileDevice::zeroed(64 * U as u64)
            .with_atomic_unit(U as u64)
            .unwrap();
        for b in 0..64u64 {
            dev.write_at(&[b as u8 + 1; U], b * U as u64).unwrap();
        }
        // A partial write is a read-modify-write of its unit.
        dev.write_at(&[0xaa; 10], 5 * U as u64 + 100).unwrap();
        let report = dev.power_cut(3).unwrap();
        assert_eq!(report.sectors.len(), 64, "one fate per 4096-byte unit");
        assert!(report.kept() > 0 && report.reverted() > 0);
        let durable = dev.durable_snapshot().unwrap();
        for (b, chunk) in durable.chunks(U).enumerate() {
            let first = chunk[0];
            let torn = chunk.iter().enumerate().any(|(i, &x)| {
                let patched = b == 5 && (100..110).contains(&i) && x == 0xaa;
                x != first && !patched
            });
            assert!(!torn, "unit {b} was torn");
        }
        assert!(VolatileDevice::zeroed(3 * 512)
            .with_atomic_unit(1024)
            .is_err());
        assert!(VolatileDevice::zeroed(4096).with_atomic_unit(3000).is_err());
    }

    #[test]
    fn a_switched_off_supply_refuses_everything_until_devices_are_rebuilt() {
        let supply = Arc::new(PowerSupply::new());
        let inner: Arc<dyn Device> = Arc::new(MemDevice::new(8 * SECTOR_SIZE));
        let dev = VolatileDevice::new(inner.clone()).with_power_supply(supply.clone());
        dev.write_at(&[1; S], 0).unwrap();
        dev.sync().unwrap();
        dev.write_at(&[2; S], SECTOR_SIZE).unwrap();
        supply.switch_off();
        assert!(dev.write_at(&[3; S], 0).is_err());
        assert!(dev.zero_range(0, SECTOR_SIZE).is_err());
        assert!(dev.sync().is_err());
        assert!(dev.read_at(&mut [0; S], 0).is_err());
        // The cut still drops the cache into the durable store.
        let report = dev.power_cut_with(|_, n| n).unwrap();
        assert_eq!(report.kept(), 1);
        assert!(dev.write_at(&[4; S], 0).is_err(), "still without power");
        let fresh = VolatileDevice::new(inner);
        assert_eq!(read(&fresh, 0, 2 * S), [vec![1; S], vec![2; S]].concat());
    }

    #[test]
    fn destaged_zeros_stay_zeros_and_next_data_sees_cached_units() {
        let dev = VolatileDevice::zeroed(16 * SECTOR_SIZE);
        // MemDevice reports everything as data; that is the upper bound.
        dev.write_at(&[5; 16 * S], 0).unwrap();
        dev.sync().unwrap();
        dev.zero_range(2 * SECTOR_SIZE, 4 * SECTOR_SIZE).unwrap();
        dev.write_at(&[6; S], 6 * SECTOR_SIZE).unwrap();
        dev.sync().unwrap();
        let durable = dev.durable_snapshot().unwrap();
        assert_eq!(&durable[2 * S..6 * S], &vec![0; 4 * S][..]);
        assert_eq!(&durable[6 * S..7 * S], &vec![6; S][..]);

        // A sparse-looking inner device: no data anywhere.
        struct Holes(MemDevice);
        impl Device for Holes {
            fn size(&self) -> u64 {
                self.0.size()
            }
            fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
                self.0.read_at(buf, offset)
            }
            fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
                self.0.write_at(buf, offset)
            }
            fn sync(&self) -> io::Result<()> {
                Ok(())
            }
            fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
                self.0.zero_range(offset, len)
            }
            fn next_data(&self, _: u64) -> io::Result<Option<(u64, u64)>> {
                Ok(None)
            }
        }
        let dev = VolatileDevice::new(Arc::new(Holes(MemDevice::new(8 * SECTOR_SIZE))));
        assert_eq!(dev.next_data(0).unwrap(), None);
        dev.write_at(&[1; 10], 3 * SECTOR_SIZE + 7).unwrap();
        assert_eq!(
            dev.next_data(SECTOR_SIZE).unwrap(),
            Some((3 * SECTOR_SIZE, 4 * SECTOR_SIZE))
        );
        assert_eq!(
            dev.next_data(3 * SECTOR_SIZE + 9).unwrap(),
            Some((3 * SECTOR_SIZE + 9, 4 * SECTOR_SIZE))
        );
        assert_eq!(dev.next_data(4 * SECTOR_SIZE).unwrap(), None);
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

/// A [`Region`](super::Region) in process memory behind a [`Fuse`], for
/// crash tests of the write-back stage: a region that outlives the process
/// (tmpfs) keeps everything stored before the instant the process died;
/// [`FusedRegion::revive`] goes back to that instant.
#[derive(Debug)]
pub struct FusedRegion {
    fuse: Arc<Fuse>,
    state: Mutex<RegionState>,
}

#[derive(Debug)]
struct RegionState {
    bytes: Vec<u8>,
    frozen: Option<Vec<u8>>,
}

impl FusedRegion {
    pub fn new(len: u64, fuse: Arc<Fuse>) -> Self {
        Self {
            fuse,
            state: Mutex::new(RegionState {
                bytes: vec![0; len as usize],
                frozen: None,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, RegionState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Back to the content at the instant the fuse tripped, if it did.
    pub fn revive(&self) {
        let mut st = self.lock();
        if let Some(frozen) = st.frozen.take() {
            st.bytes = frozen;
        }
    }

    /// Lose everything, as a host crash loses tmpfs.
    pub fn wipe(&self) {
        let mut st = self.lock();
        st.bytes.fill(0);
        st.frozen = None;
    }
}

impl super::Region for FusedRegion {
    fn len(&self) -> u64 {
        self.lock().bytes.len() as u64
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut st = self.lock();
        check_range(st.bytes.len() as u64, offset, buf.len() as u64)?;
        if !self.fuse.pass() && st.frozen.is_none() {
            st.frozen = Some(st.bytes.clone());
        }
        let at = offset as usize;
        st.bytes[at..at + buf.len()].copy_from_slice(buf);
        Ok(())
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let st = self.lock();
        check_range(st.bytes.len() as u64, offset, buf.len() as u64)?;
        let at = offset as usize;
        buf.copy_from_slice(&st.bytes[at..at + buf.len()]);
        Ok(())
    }
}
