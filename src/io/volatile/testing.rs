//! Test support: fault injection for crash tests. Not part of the serving
//! API — `serve` never uses it, and it is built only with the `testing`
//! feature, which the crate's dev-dependency on itself turns on for its
//! unit tests, integration tests and benches (`cargo build --release` has
//! none of it).
//!
//! - A [`Fuse`] shared by devices (and a [`FusedRegion`] for the stage)
//!   cuts the power *in the middle* of an operation: it lets a fixed
//!   number of further mutating calls (writes, zero-outs, syncs) through,
//!   across every device sharing it, and then marks the instant the power
//!   failed. Each device freezes its state (durable image and cache) at
//!   that instant; the code under test runs on unaware against a device
//!   that still behaves consistently (reads see its later writes, as they
//!   would on a disk that has power), and the next power cut starts from
//!   the frozen state, so nothing done after the instant survives.
//!   [`FaultInjection::revive`] goes back to that instant instead, for a
//!   process death that the host survives.
//! - [`FaultInjection`] adds to a [`VolatileDevice`] a power cut whose
//!   every choice the test makes, a look at the durable image, and bit
//!   flips and misdirected writes that reach the durable image and every
//!   cached version alike.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::cache::{for_each_sector, Cache, State, Version};
use super::{PowerCutReport, VolatileDevice};
use crate::io::{check_range, Region};

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

    /// Account for one mutating call; `false`: it comes after the failure.
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

/// A copy of the durable image and the cache at the instant of a power
/// failure.
#[derive(Debug)]
pub(super) struct Frozen {
    durable: Vec<u8>,
    cache: Cache,
}

/// Fault injection on a [`VolatileDevice`] (see the module documentation).
pub trait FaultInjection: Sized {
    /// Route every mutating call through `fuse` (see [`Fuse`]). The first
    /// call after it trips copies the whole device once, so this is for
    /// test-sized images.
    fn with_fuse(self, fuse: Arc<Fuse>) -> Self;

    /// The durable image (what a power cut that loses every cached write
    /// would leave), read from the inner device. While the fuse is tripped
    /// it is the image as of the failure: calls made since (say a sync by
    /// a thread of the dead process right after a power cut) do not count.
    fn durable_snapshot(&self) -> io::Result<Vec<u8>>;

    /// Like [`VolatileDevice::power_cut`], with the choice made by
    /// `choose(sector, versions)`: 0 keeps the durable content, `k` in
    /// `1..=versions` keeps cached version `k - 1` (oldest first). Larger
    /// answers are clamped to the newest version. Sectors are visited in
    /// ascending order.
    fn power_cut_with(&self, choose: impl FnMut(u64, usize) -> usize)
        -> io::Result<PowerCutReport>;

    /// The process that used this device died at the fuse's instant, but
    /// the host lives on: go back to the state frozen then — durable image
    /// *and* cache, which is the host's page cache and survives a process
    /// death — forgetting every call made since. A device whose fuse never
    /// tripped is unchanged.
    fn revive(&self) -> io::Result<()>;

    /// Flip bit `bit` (0–7) of the byte at `offset`, in the durable image
    /// and in every cached version of its sector: whatever a later read or
    /// power cut yields carries the flip. Bypasses the fuse and counters
    /// (and does not reach a state frozen by a tripped fuse).
    fn corrupt_flip_bit(&self, offset: u64, bit: u8) -> io::Result<()>;

    /// Overwrite `data.len()` bytes at `offset` in the durable image and in
    /// every cached version of the sectors it touches (misdirected or lost
    /// writes). Bypasses the fuse and counters (and does not reach a state
    /// frozen by a tripped fuse).
    fn corrupt_write(&self, offset: u64, data: &[u8]) -> io::Result<()>;
}

impl FaultInjection for VolatileDevice {
    fn with_fuse(mut self, fuse: Arc<Fuse>) -> Self {
        self.fuse = Some(fuse);
        self
    }

    fn durable_snapshot(&self) -> io::Result<Vec<u8>> {
        let state = self.lock();
        if let Some(frozen) = &state.frozen {
            return Ok(frozen.durable.clone());
        }
        let mut buf = vec![0; self.size as usize];
        self.inner.read_at(&mut buf, 0)?;
        Ok(buf)
    }

    fn power_cut_with(
        &self,
        choose: impl FnMut(u64, usize) -> usize,
    ) -> io::Result<PowerCutReport> {
        self.cut_with(choose)
    }

    fn revive(&self) -> io::Result<()> {
        let mut state = self.lock();
        if let Some(frozen) = state.frozen.take() {
            self.inner.write_at(&frozen.durable, 0)?;
            state.versions = frozen.cache.values().map(Vec::len).sum();
            state.cache = frozen.cache;
        }
        Ok(())
    }

    fn corrupt_flip_bit(&self, offset: u64, bit: u8) -> io::Result<()> {
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

    fn corrupt_write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
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
}

/// The hooks of the fuse in the device's own calls.
impl VolatileDevice {
    /// Account for a mutating call with the fuse. The first one after the
    /// power failed freezes the device as it was at the failure (nothing
    /// changed it between the failure and this call: every change passes
    /// here first). The call itself then proceeds on the live state.
    pub(super) fn count_call(&self, state: &mut State) -> io::Result<()> {
        if self.fuse.as_ref().is_none_or(|f| f.pass()) {
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

    /// At a power cut, the cache to cut: after a fuse trip, the one frozen
    /// at the instant of the failure (with the durable image put back as it
    /// was then: everything done since never happened as far as the media
    /// know); else `live`.
    pub(super) fn unfreeze(&self, state: &mut State, live: Cache) -> io::Result<Cache> {
        match state.frozen.take() {
            Some(frozen) => {
                self.inner.write_at(&frozen.durable, 0)?;
                Ok(frozen.cache)
            }
            None => Ok(live),
        }
    }
}

/// A [`Region`] in process memory behind a [`Fuse`], for
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

impl Region for FusedRegion {
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
