//! The disk being served: one engine at a time on a [`Medium`], the
//! [`Disk`] every front-end connection gets, and what outlives one
//! front-end — the periodic write-back, synchronous mode, power cuts, the
//! final stop. The signal thread and the control socket
//! ([`crate::control`]) reach the disk only through [`Served`].
//!
//! A power cut halts the connected front-end's [`Disk`] and replaces it by
//! a fresh one, opened on what survived. If the cut or that reopen fails,
//! nothing is served any more and [`Served::stop`] returns why.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::config;
use super::execute::Disk;
use super::medium::{self, Medium};
use super::request::ID_LEN;
use super::server::{ServeConfig, ServeError};
use crate::integrity::{Engine, EngineError, EngineOptions, Stats};
use crate::io::volatile::CutSummary;

/// The disk being served (see the module documentation).
pub struct Served {
    /// How each engine is opened, at start and after each power cut.
    opts: EngineOptions,
    serial: String,
    queues: u16,
    started: Instant,
    /// A front-end is connected (whichever disk it has).
    frontend: AtomicBool,
    state: Mutex<Guarded>,
}

/// What [`Served`]'s lock guards.
struct Guarded {
    medium: Box<dyn Medium>,
    /// The disk a front-end connecting now gets.
    disk: Arc<Disk>,
    /// A power cut or the reopen after it failed: nothing is served any
    /// more, and `serve` returns this once it has stopped.
    failed: Option<ServeError>,
}

/// What [`Served::power_cut`] did.
#[derive(Debug)]
pub enum PowerCut {
    /// The disk has no power to cut (not `--volatile-cache`): nothing.
    Unsupported,
    /// Cut (the summary is logged), and a fresh engine serves what
    /// survived.
    Done(CutSummary),
    /// The cut or the reopen failed: the server must stop.
    Failed,
}

impl Served {
    /// Open the medium `cfg` names and the first engine on it.
    pub(super) fn open(cfg: &ServeConfig) -> Result<Self, ServeError> {
        let serial = match &cfg.serial {
            Some(s) => s.clone(),
            None => default_serial(&cfg.data),
        };
        let opts = EngineOptions {
            on_mismatch: cfg.on_mismatch,
            readonly: cfg.readonly,
            stage_bytes: cfg.stage_bytes,
            key: cfg.key.clone(),
            ..EngineOptions::default()
        };
        let mut medium = medium::open(cfg)?;
        let disk = Self::disk_on(&mut *medium, &opts, &serial)?;
        Ok(Self {
            opts,
            serial,
            queues: cfg.queues,
            started: Instant::now(),
            frontend: AtomicBool::new(false),
            state: Mutex::new(Guarded {
                medium,
                disk,
                failed: None,
            }),
        })
    }

    fn disk_on(
        medium: &mut dyn Medium,
        opts: &EngineOptions,
        serial: &str,
    ) -> Result<Arc<Disk>, ServeError> {
        let engine = medium.open(opts)?;
        let limits = config::limits(engine.block_size(), engine.blocks());
        Ok(Arc::new(
            Disk::new(Arc::new(engine), limits, opts.readonly, serial).with_log(medium.write_log()),
        ))
    }

    fn lock(&self) -> MutexGuard<'_, Guarded> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The GET_ID string.
    pub(super) fn serial(&self) -> &str {
        &self.serial
    }

    /// The disk a front-end connecting now gets.
    pub(super) fn disk(&self) -> Arc<Disk> {
        self.lock().disk.clone()
    }

    /// The counters of the engine serving now.
    pub fn stats(&self) -> Stats {
        self.lock().disk.engine().stats()
    }

    /// The engine serving now; `None` once a power cut (or the reopen
    /// after it) failed and nothing is served any more.
    pub fn engine(&self) -> Option<Arc<Engine>> {
        let g = self.lock();
        g.failed.is_none().then(|| g.disk.engine().clone())
    }

    pub fn readonly(&self) -> bool {
        self.opts.readonly
    }

    /// Virtqueues offered to each front-end.
    pub fn queues(&self) -> u16 {
        self.queues
    }

    /// Since the disk was first opened.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Power cuts so far; `None`: the disk has no power to cut.
    pub fn power_cuts(&self) -> Option<u64> {
        self.lock().medium.power_cuts()
    }

    pub fn frontend_connected(&self) -> bool {
        self.frontend.load(Ordering::Acquire)
    }

    /// A front-end connected and got [`disk`](Self::disk).
    pub(super) fn frontend_came(&self) {
        self.frontend.store(true, Ordering::Release);
    }

    /// Run `f` on the current disk unless it stopped answering (a dead
    /// disk writes nothing, and trying only logs errors): `None` then. The
    /// lock is held, so no power cut happens while `f` runs.
    fn with_live<T>(&self, f: impl FnOnce(&Disk) -> T) -> Option<T> {
        let g = self.lock();
        (g.failed.is_none() && !g.disk.halted()).then(|| f(&g.disk))
    }

    /// The periodic metadata write-back.
    pub(super) fn writeback(&self) {
        self.with_live(|d| d.writeback());
    }

    /// Shutdown signal (DESIGN §4): metadata written synchronously from
    /// now (`why`: who asked). `Ok(true)` once the metadata is current,
    /// `Ok(false)` for a read-only disk, whose metadata is never written.
    /// Logged either way.
    pub fn enter_sync_mode(&self, why: &str) -> Result<bool, SyncModeError> {
        self.with_live(|d| d.try_enter_sync_mode(why))
            .ok_or(SyncModeError::NotServing)?
            .map_err(SyncModeError::Engine)
    }

    /// Put a mark named `name` into the `--log-writes` log now; its
    /// position there.
    pub fn mark(&self, name: &str) -> Result<u64, MarkError> {
        let log = self.lock().medium.write_log().ok_or(MarkError::NoLog)?;
        Ok(log.mark(name)?)
    }

    /// The front-end that had `disk` went away: the orderly steps of
    /// DESIGN §4, unless that disk was halted meanwhile — then its engine
    /// is dropped without writing anything, as a crashed one.
    pub(super) fn frontend_gone(&self, disk: &Disk) {
        self.frontend.store(false, Ordering::Release);
        let g = self.lock();
        if g.failed.is_some() || disk.halted() {
            log::info!(
                "the front-end of the powered-off disk went away; its engine is dropped \
                 without writing anything"
            );
            return;
        }
        disk.enter_sync_mode("front-end disconnected");
        disk.make_clean("front-end disconnected");
    }

    /// Cut the power (`why`: who asked), then open a fresh engine on what
    /// survived, for the next front-end.
    pub fn power_cut(&self, why: &str) -> PowerCut {
        let mut g = self.lock();
        let Guarded {
            medium,
            disk,
            failed,
        } = &mut *g;
        if medium.power_cuts().is_none() {
            log::warn!("{why}: a power cut needs serve --volatile-cache; ignoring it");
            return PowerCut::Unsupported;
        }
        if failed.is_some() {
            return PowerCut::Failed;
        }
        log::info!("{why}: cutting the power");
        let summary = match medium.power_cut(disk) {
            Ok(s) => s,
            Err(e) => {
                log::error!(
                    "the power cut failed: {}; stopping",
                    crate::error::Chain(&e)
                );
                *failed = Some(e);
                return PowerCut::Failed;
            }
        };
        log::info!("{summary}");
        log::info!(
            "the connected front-end (if any) now gets an I/O error for every request; \
             power is back for the next one"
        );
        match Self::disk_on(&mut **medium, &self.opts, &self.serial) {
            Ok(d) => {
                *disk = d;
                log::info!(
                    "reopened the disk on what survived the cut, as a freshly started twinsum would"
                );
                PowerCut::Done(summary)
            }
            Err(e) => {
                log::error!(
                    "cannot reopen the disk after the power cut: {}; stopping",
                    crate::error::Chain(&e)
                );
                *failed = Some(e);
                PowerCut::Failed
            }
        }
    }

    /// Orderly stop of the current disk; the error of a failed power cut.
    pub(super) fn stop(&self) -> Result<(), ServeError> {
        let mut g = self.lock();
        if let Some(e) = g.failed.take() {
            return Err(e);
        }
        let emptied = g.disk.make_clean("stopping");
        g.medium.stopped(&g.disk, emptied);
        let cuts = g.medium.power_cuts().unwrap_or(0);
        drop(g);
        let s = self.stats();
        log::info!(
            "stopped: {} reads, {} writes, {} checksum mismatches, {} data syncs ({} ms), {} metadata syncs ({} ms), {} commit rounds{}",
            s.reads,
            s.writes,
            s.mismatches,
            s.data_syncs,
            s.data_sync_us / 1000,
            s.meta_syncs,
            s.meta_sync_us / 1000,
            s.rounds,
            match cuts {
                0 => String::new(),
                n => format!(" since power cut #{n}"),
            },
        );
        Ok(())
    }
}

/// Why [`Served::mark`] put no mark into the write log.
#[derive(Debug, thiserror::Error)]
pub enum MarkError {
    #[error("no write log: serve was started without --log-writes")]
    NoLog,
    #[error(transparent)]
    Log(#[from] crate::writelog::WriteLogError),
}

/// Why [`Served::enter_sync_mode`] did not make the metadata current.
#[derive(Debug, thiserror::Error)]
pub enum SyncModeError {
    #[error("nothing is served any more (a power cut failed); twinsum is stopping")]
    NotServing,
    #[error("cannot switch to synchronous metadata")]
    Engine(#[source] EngineError),
}

/// A GET_ID serial that stays the same while the image file does: a hash
/// of its device and inode numbers.
fn default_serial(data: &Path) -> String {
    let key = match fs::metadata(data) {
        Ok(m) => [m.dev().to_le_bytes(), m.ino().to_le_bytes()].concat(),
        Err(_) => data.as_os_str().as_encoded_bytes().to_vec(),
    };
    let mut s = format!("ts{:016x}", xxhash_rust::xxh3::xxh3_64(&key));
    s.truncate(ID_LEN);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_serial_is_stable_and_fits() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.img");
        let b = dir.path().join("b.img");
        fs::write(&a, b"x").unwrap();
        fs::write(&b, b"y").unwrap();
        let sa = default_serial(&a);
        assert!(sa.len() <= ID_LEN);
        assert_eq!(sa, default_serial(&a));
        assert_ne!(sa, default_serial(&b));
    }
}
