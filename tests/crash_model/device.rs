//! The one device every suite here runs the engine on.
//!
//! A [`TestDevice`] is a [`VolatileDevice`] (volatile cache, power cuts, a
//! shared [`Fuse`] to cut the power mid-call, injected damage; all reached
//! through `Deref`) that can also hold one chosen kind of call until the
//! test releases it, to force one interleaving of two submitters. The
//! suites differ only in how they configure it, never in a device of their
//! own.

use std::io;
use std::ops::Deref;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use twinsum::io::volatile::testing::{FaultInjection, Fuse};
use twinsum::io::volatile::VolatileDevice;
use twinsum::io::Device;
use twinsum::meta::SUPERBLOCK_SIZE;

use crate::support::log_start;

/// A call [`TestDevice::hold_next`] can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Call {
    Sync = 1,
    ZeroRange = 2,
}

/// No call armed.
const NONE: u8 = 0;

/// How long a held call waits for [`TestDevice::release`] before it goes on
/// by itself, so that a test that forgets to release fails instead of
/// hanging.
const HOLD_LIMIT: Duration = Duration::from_secs(30);

pub struct TestDevice {
    volatile: VolatileDevice,
    /// The [`Call`] to hold next, or [`NONE`]: checked on every call, so an
    /// atomic rather than the lock.
    armed: AtomicU8,
    /// (a held call started, released)
    hold: Mutex<(bool, bool)>,
    changed: Condvar,
}

impl TestDevice {
    pub fn new(volatile: VolatileDevice) -> Arc<Self> {
        Arc::new(Self {
            volatile,
            armed: AtomicU8::new(NONE),
            hold: Mutex::new((false, false)),
            changed: Condvar::new(),
        })
    }

    /// A device whose durable image is `bytes`, behind `fuse` if given.
    pub fn image(bytes: Vec<u8>, fuse: Option<&Arc<Fuse>>) -> Arc<Self> {
        let v = VolatileDevice::from_bytes(bytes);
        Self::new(match fuse {
            Some(f) => v.with_fuse(f.clone()),
            None => v,
        })
    }

    /// A zeroed device of `size` bytes, behind `fuse` if given.
    pub fn zeroed(size: u64, fuse: Option<&Arc<Fuse>>) -> Arc<Self> {
        Self::image(vec![0; size as usize], fuse)
    }

    /// A fresh device holding what a power cut would leave of this one
    /// now: its durable image.
    pub fn survivor(&self, fuse: Option<&Arc<Fuse>>) -> io::Result<Arc<Self>> {
        Ok(Self::image(self.durable_snapshot()?, fuse))
    }

    /// Where replay of the metadata log starts now on this metadata
    /// device (`None`: no log).
    pub fn log_start(&self) -> Result<Option<u64>, String> {
        let mut sb = vec![0u8; SUPERBLOCK_SIZE];
        self.volatile
            .read_at(&mut sb, 0)
            .map_err(|e| e.to_string())?;
        log_start(&sb)
    }

    /// Hold the next call of kind `call` until [`release`](Self::release).
    pub fn hold_next(&self, call: Call) {
        *self.hold.lock().unwrap() = (false, false);
        self.armed.store(call as u8, Ordering::SeqCst);
    }

    /// Wait until the armed call has started and is held.
    pub fn wait_held(&self, timeout: Duration) -> bool {
        self.wait(|s| s.0, timeout)
    }

    /// Let the held call (and any later one) go on.
    pub fn release(&self) {
        self.hold.lock().unwrap().1 = true;
        self.changed.notify_all();
    }

    /// Poll until `want` is what the device holds at `offset`: an engine
    /// may complete a write before it issues it (the write-back stage).
    pub fn wait_until_holds(&self, offset: u64, want: &[u8], timeout: Duration) -> bool {
        let mut buf = vec![0u8; want.len()];
        let t = Instant::now();
        while t.elapsed() < timeout {
            self.volatile.read_at(&mut buf, offset).unwrap();
            if buf == want {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    fn wait(&self, what: impl Fn(&(bool, bool)) -> bool, timeout: Duration) -> bool {
        let st = self.hold.lock().unwrap();
        let (st, _) = self
            .changed
            .wait_timeout_while(st, timeout, |s| !what(s))
            .unwrap();
        what(&st)
    }

    fn maybe_hold(&self, call: Call) {
        if self.armed.load(Ordering::SeqCst) == call as u8
            && self
                .armed
                .compare_exchange(call as u8, NONE, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        {
            self.hold.lock().unwrap().0 = true;
            self.changed.notify_all();
            self.wait(|s| s.1, HOLD_LIMIT);
        }
    }
}

impl Deref for TestDevice {
    type Target = VolatileDevice;

    fn deref(&self) -> &VolatileDevice {
        &self.volatile
    }
}

impl Device for TestDevice {
    fn size(&self) -> u64 {
        self.volatile.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.volatile.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.volatile.write_at(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        self.maybe_hold(Call::Sync);
        self.volatile.sync()
    }
    // The volatile device's own: it makes only this range durable (the
    // default would sync everything), and a power cut may fall between
    // its write and its range sync.
    fn write_durable(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.volatile.write_durable(buf, offset)
    }
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.maybe_hold(Call::ZeroRange);
        self.volatile.zero_range(offset, len)
    }
    fn next_data(&self, offset: u64) -> io::Result<Option<(u64, u64)>> {
        self.volatile.next_data(offset)
    }
}
