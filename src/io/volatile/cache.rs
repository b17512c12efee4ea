//! The cache of a [`VolatileDevice`]: per atomic unit, every version
//! written since the last sync, and how they reach the inner device (a
//! destage at a sync or at the cache limit, coalesced into runs).

use std::collections::BTreeMap;
use std::io;

use super::{VolatileDevice, VolatileStats};

/// Unit number → versions written since the last sync, oldest first.
pub(super) type Cache = BTreeMap<u64, Vec<Version>>;

/// One version of a cached sector. Zeros get their own variant so that a
/// large discard costs no sector buffers.
#[derive(Debug, Clone)]
pub(super) enum Version {
    Zero,
    Data(Box<[u8]>),
}

impl Version {
    pub(super) fn from_sector(bytes: &[u8]) -> Self {
        if bytes.iter().all(|&b| b == 0) {
            Version::Zero
        } else {
            Version::Data(bytes.into())
        }
    }

    pub(super) fn copy_to(&self, out: &mut [u8], from: usize) {
        match self {
            Version::Zero => out.fill(0),
            Version::Data(d) => out.copy_from_slice(&d[from..from + out.len()]),
        }
    }

    pub(super) fn to_sector(&self, unit: usize) -> Vec<u8> {
        match self {
            Version::Zero => vec![0; unit],
            Version::Data(d) => d.to_vec(),
        }
    }
}

/// What the device's lock guards.
#[derive(Debug, Default)]
pub(super) struct State {
    /// Never holds an empty list.
    pub(super) cache: Cache,
    /// Total versions in `cache`, checked against the limit.
    pub(super) versions: usize,
    /// The device as it was when a test's fuse tripped, if it has since
    /// been changed: what the next power cut starts from.
    #[cfg(feature = "testing")]
    pub(super) frozen: Option<super::testing::Frozen>,
    pub(super) stats: VolatileStats,
}

impl VolatileDevice {
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
    pub(super) fn destage(&self, state: &mut State) -> io::Result<()> {
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

    /// Write the newest version of the cached units `len` bytes at
    /// `offset` touch to the inner device and drop them from the cache,
    /// leaving every other unit un-synced: what a write with FUA, or a
    /// range sync, does on a real disk.
    pub(super) fn destage_range(&self, state: &mut State, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let first = offset / self.unit;
        let last = (offset + len - 1) / self.unit;
        let units: Vec<u64> = state.cache.range(first..=last).map(|(&u, _)| u).collect();
        let mut run = Run::default();
        for u in &units {
            if let Some(v) = state.cache.get(u).and_then(|v| v.last()) {
                run.push(self, *u, v)?;
            }
        }
        run.flush(self)?;
        for u in units {
            if let Some(v) = state.cache.remove(&u) {
                state.versions -= v.len();
            }
        }
        Ok(())
    }

    /// Make room for `incoming` new versions under the cache limit.
    /// Returns `false` if the request is larger than the whole cache and
    /// must be written through.
    pub(super) fn make_room(&self, state: &mut State, incoming: u64) -> io::Result<bool> {
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
    pub(super) fn forget_range(&self, state: &mut State, offset: u64, len: u64) {
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

    /// Cache one write or zero-out of `len` bytes at `offset`, unit by
    /// unit; `fill(unit, within, range)` makes the new version of a unit
    /// that the request covers only in part, from its current content.
    pub(super) fn cache_range(
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
    pub(super) fn units(&self, offset: u64, len: u64) -> u64 {
        (offset % self.unit + len).div_ceil(self.unit)
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
pub(super) fn for_each_sector(
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
