//! The online scrub: every block of a served disk verified in the
//! background, at a bounded rate, while the guest keeps running.
//!
//! It reads through [`Engine::scrub_read`], the verification a guest read
//! gets, so a block the guest rewrites meanwhile is judged as that read
//! would judge it (queued writes first, looked at again while pairs
//! change) and never counts as a false mismatch. It skips only holes of the
//! image ([`Engine::data_regions`]): they read as zeros and no misdirected
//! write has landed there; an allocated block is read whatever its pair.
//!
//! The rate is paced against the scrub's own clock — bytes read so far
//! against time since it began — so that per-read costs never add up to a
//! drift; after a stall it catches up by at most [`MAX_CATCH_UP`].
//! Progress lives in memory only: a restarted twinsum scrubs from the
//! start.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::verify::Mismatches;
use super::{Engine, EngineError};
use crate::io::PageBuf;

/// Bytes per scrub read: large enough that syscalls and locks are cheap,
/// small enough that the engine's state lock is held only briefly and the
/// pacing stays smooth.
const CHUNK_BYTES: u64 = 1 << 20;
/// How far behind its rate a stalled scrub may catch up at full speed.
pub const MAX_CATCH_UP: Duration = Duration::from_secs(1);
/// The default rate: unnoticeable next to a guest's own I/O.
pub const DEFAULT_RATE_MIB: u64 = 64;

/// Where a scrub is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScrubState {
    Running,
    /// Every block verified.
    Done,
    /// Asked to stop before the end.
    Stopped,
    /// A read failed (I/O error, the disk went away).
    Failed,
}

/// A scrub's progress, and at the end its report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// 1 for the first scrub of this process.
    pub id: u64,
    pub state: ScrubState,
    /// MiB/s; 0 = unlimited.
    pub rate_mib: u64,
    pub blocks: u64,
    pub block_size: u32,
    /// Blocks behind the scrub (verified, or skipped as holes).
    pub position: u64,
    /// Bytes actually read and verified (holes cost nothing).
    pub bytes_read: u64,
    /// Since the scrub began, on its own clock, when `position` and
    /// `bytes_read` were last updated.
    pub elapsed_ms: u64,
    /// Blocks found matching neither checksum, in the order found.
    #[serde(flatten)]
    pub mismatches: Mismatches,
    pub error: Option<String>,
}

impl Progress {
    /// Percent of the disk behind the scrub.
    pub fn percent(&self) -> f64 {
        if self.blocks == 0 {
            return 100.0;
        }
        self.position as f64 * 100.0 / self.blocks as f64
    }
}

/// A running (or finished) scrub of one engine, on its own thread.
pub struct Scrub {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    progress: Mutex<Progress>,
    stop: Mutex<bool>,
    wake: Condvar,
}

impl Shared {
    fn progress(&self) -> MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn stopping(&self) -> bool {
        *self.stop.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sleep for `d` unless asked to stop first; `true` when stopping.
    fn sleep(&self, d: Duration) -> bool {
        let stop = self.stop.lock().unwrap_or_else(PoisonError::into_inner);
        let (stop, _) = self
            .wake
            .wait_timeout_while(stop, d, |s| !*s)
            .unwrap_or_else(PoisonError::into_inner);
        *stop
    }
}

impl Scrub {
    /// Start scrub number `id` of `engine` at `rate_mib` MiB/s (0 =
    /// unlimited).
    pub fn start(engine: Arc<Engine>, id: u64, rate_mib: u64) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            progress: Mutex::new(Progress {
                id,
                state: ScrubState::Running,
                rate_mib,
                blocks: engine.blocks(),
                block_size: engine.block_size(),
                position: 0,
                bytes_read: 0,
                elapsed_ms: 0,
                mismatches: Mismatches::default(),
                error: None,
            }),
            stop: Mutex::new(false),
            wake: Condvar::new(),
        });
        let s = shared.clone();
        let thread = thread::Builder::new()
            .name(format!("scrub-{id}"))
            .spawn(move || run(&engine, &s, rate_mib))?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// The whole progress, with the list of mismatched blocks.
    pub fn progress(&self) -> Progress {
        self.shared.progress().clone()
    }

    /// `f` of the progress, without copying the list.
    pub fn with_progress<T>(&self, f: impl FnOnce(&Progress) -> T) -> T {
        f(&self.shared.progress())
    }

    pub fn running(&self) -> bool {
        self.shared.progress().state == ScrubState::Running
    }

    /// Ask it to stop after the current read and wait until it has.
    pub fn stop(&mut self) -> Progress {
        *self
            .shared
            .stop
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = true;
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("the scrub thread panicked");
            }
        }
        self.progress()
    }
}

impl Drop for Scrub {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop();
        }
    }
}

/// Reading `done` bytes should take `done / rate` seconds from `origin`.
struct Pacer {
    /// Bytes per second; 0 = unlimited.
    rate: u64,
    origin: Instant,
}

impl Pacer {
    /// How long to wait before reading on, after `done` bytes.
    fn pause(&mut self, done: u64, now: Instant) -> Option<Duration> {
        if self.rate == 0 {
            return None;
        }
        let due = self.origin + Duration::from_secs_f64(done as f64 / self.rate as f64);
        if now < due {
            return Some(due - now);
        }
        // Behind (the guest kept the disk busy): catch up by at most
        // MAX_CATCH_UP, not by a burst as long as the stall.
        if now - due > MAX_CATCH_UP {
            self.origin += now - due - MAX_CATCH_UP;
        }
        None
    }
}

fn run(engine: &Engine, shared: &Shared, rate_mib: u64) {
    let id = shared.progress().id;
    log::info!(
        "scrub #{id} started: {} blocks at {}",
        engine.blocks(),
        match rate_mib {
            0 => "full speed".to_owned(),
            r => format!("{r} MiB/s"),
        }
    );
    let start = Instant::now();
    let end = match scan(engine, shared, rate_mib, start) {
        Ok(true) => ScrubState::Done,
        Ok(false) => ScrubState::Stopped,
        Err(e) => {
            log::error!("scrub #{id} failed: {}", crate::error::Chain(&e));
            shared.progress().error = Some(crate::error::Chain(&e).to_string());
            ScrubState::Failed
        }
    };
    let mut p = shared.progress();
    p.elapsed_ms = start.elapsed().as_millis() as u64;
    if end == ScrubState::Done {
        p.position = p.blocks;
    }
    p.state = end;
    let verb = match end {
        ScrubState::Done => "done",
        ScrubState::Stopped => "stopped",
        _ => "ended",
    };
    log::info!(
        "scrub #{id} {verb}: {} of {} blocks behind it, {} MiB read in {:.1} s, {} mismatched blocks",
        p.position,
        p.blocks,
        p.bytes_read >> 20,
        p.elapsed_ms as f64 / 1000.0,
        p.mismatches.count,
    );
}

/// Read every data region; `Ok(false)` when stopped early.
fn scan(
    engine: &Engine,
    shared: &Shared,
    rate_mib: u64,
    start: Instant,
) -> Result<bool, EngineError> {
    let bs = u64::from(engine.block_size());
    let chunk_blocks = (CHUNK_BYTES / bs).max(1);
    let mut buf = PageBuf::zeroed((chunk_blocks * bs) as usize);
    let mut pacer = Pacer {
        rate: rate_mib.saturating_mul(1 << 20),
        origin: start,
    };
    let mut read = 0u64;
    for region in engine.data_regions() {
        let (first, end) = region.map_err(|e| EngineError::Io {
            what: "finding the data regions",
            source: Arc::new(e),
        })?;
        let (first, end) = (first / bs, end.div_ceil(bs).min(engine.blocks()));
        // The hole before this region is behind the scrub now.
        shared.progress().position = first;
        let mut b = first;
        while b < end {
            if shared.stopping() {
                return Ok(false);
            }
            let n = chunk_blocks.min(end - b);
            let len = (n * bs) as usize;
            let bad = engine.scrub_read(b, &mut buf[..len])?;
            b += n;
            read += n * bs;
            {
                let mut p = shared.progress();
                for blk in bad {
                    p.mismatches.add(blk);
                }
                p.position = b;
                p.bytes_read = read;
                p.elapsed_ms = start.elapsed().as_millis() as u64;
            }
            if let Some(d) = pacer.pause(read, Instant::now()) {
                if shared.sleep(d) {
                    return Ok(false);
                }
            }
        }
    }
    Ok(!shared.stopping())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::integrity::EngineOptions;
    use crate::io::Device;
    use crate::io::MemDevice;
    use crate::meta::{meta_len, DeviceRef, Metadata, Superblock};

    const BS: u64 = 4096;

    fn engine(blocks: u64) -> (Arc<MemDevice>, Arc<Engine>) {
        let data = Arc::new(MemDevice::new(blocks * BS));
        let meta: DeviceRef = Arc::new(MemDevice::new(meta_len(blocks)));
        let sb = Superblock::new(BS as u32, blocks * BS, 3).unwrap();
        Metadata::create(meta.clone(), sb, 16).unwrap();
        let e = Engine::open(data.clone(), meta, EngineOptions::default()).unwrap();
        (data, Arc::new(e))
    }

    fn finish(s: &Scrub) -> Progress {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let p = s.progress();
            if p.state != ScrubState::Running {
                return p;
            }
            assert!(Instant::now() < deadline, "scrub did not finish");
            thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn a_scrub_finds_exactly_the_damaged_blocks() {
        let (data, e) = engine(600);
        for b in (0..600).step_by(7) {
            e.write(b, &vec![b as u8 | 1; BS as usize]).unwrap();
        }
        e.flush().unwrap();
        e.drain();
        for b in [14u64, 301, 599] {
            let mut x = [0u8];
            data.read_at(&mut x, b * BS + 9).unwrap();
            data.write_at(&[x[0] ^ 4], b * BS + 9).unwrap();
        }
        // A block that was never written, damaged: its zero pair does not
        // excuse it.
        data.write_at(&[1], 5 * BS).unwrap();
        let s = Scrub::start(e.clone(), 1, 0).unwrap();
        let p = finish(&s);
        assert_eq!(p.state, ScrubState::Done);
        assert_eq!(p.position, 600);
        assert_eq!(p.bytes_read, 600 * BS, "a memory device has no holes");
        assert_eq!(p.mismatches.listed, vec![5, 14, 301, 599]);
        assert_eq!(e.stats().mismatches, 4);
        assert_eq!(e.recent_mismatches(), vec![599, 301, 14, 5]);
    }

    #[test]
    fn a_slow_scrub_stops_promptly_when_asked() {
        let (_data, e) = engine(4096);
        // 1 MiB/s over 16 MiB would take 16 s.
        let mut s = Scrub::start(e, 2, 1).unwrap();
        let t = Instant::now();
        while s.progress().bytes_read == 0 {
            assert!(t.elapsed() < Duration::from_secs(60));
            thread::sleep(Duration::from_millis(1));
        }
        let p = s.stop();
        assert_eq!(p.state, ScrubState::Stopped);
        assert!(p.position < 4096);
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "stop waited out the pace"
        );
    }

    #[test]
    fn the_pacer_holds_the_rate_and_forgives_long_stalls() {
        let t0 = Instant::now();
        let mut p = Pacer {
            rate: 1 << 20,
            origin: t0,
        };
        // 1 MiB read at once: wait until a second has passed.
        assert_eq!(p.pause(1 << 20, t0), Some(Duration::from_secs(1)));
        // Half a MiB late by 0.5 s: no wait, origin kept.
        assert_eq!(p.pause(1 << 19, t0 + Duration::from_secs(1)), None);
        assert_eq!(p.origin, t0);
        // A 10 s stall: the origin moves so only 1 s of catch-up remains.
        let now = t0 + Duration::from_secs(11);
        assert_eq!(p.pause(1 << 20, now), None);
        assert_eq!(p.origin, t0 + Duration::from_secs(9));
        assert_eq!(
            p.pause(3 << 20, now),
            Some(Duration::from_secs(1)),
            "2 MiB ahead of the shifted origin + 1 s"
        );
        let mut free = Pacer {
            rate: 0,
            origin: t0,
        };
        assert_eq!(free.pause(u64::MAX, t0), None);
    }
}
