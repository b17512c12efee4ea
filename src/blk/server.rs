//! `twinsum serve`: the socket, the connection loop, signals and the
//! periodic write-back thread.
//!
//! One front-end at a time. When it goes away we stop its workers, put the
//! metadata in synchronous mode, mark it clean, and wait for the next one
//! (a restarted VM reattaches). SIGTERM/SIGINT end the process after the
//! same orderly stop; SIGUSR1 switches to synchronous metadata (DESIGN §4).
//!
//! With `--volatile-cache` ([`power`]), SIGUSR2 cuts the simulated power:
//! the connected front-end's disk goes dead (every request fails), and a
//! fresh engine on what survived serves the next front-end, as a freshly
//! started twinsum would.
//!
//! With `--control PATH`, [`crate::control`] serves a second socket whose
//! `sync-mode` and `power-cut` commands run the code of SIGUSR1 and SIGUSR2
//! ([`Served::enter_sync_mode`], [`Served::power_cut`]) and answer with
//! its result.

mod power;

pub use power::VolatileCacheConfig;

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::Duration;

use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use self::power::{CutSummary, VolatileDisk};
use super::backend::BlkBackend;
use super::config;
use super::execute::Disk;
use super::guestmem;
use super::request::ID_LEN;
use crate::control::CommandError;
use crate::integrity::{Engine, EngineError, EngineOptions, OnMismatch, StageConfig};
use crate::io::volatile::PowerSupply;
use crate::io::{FileDevice, MappedFile, OpenFlags, Region};
use crate::key::Key;
use crate::meta::DeviceRef;

/// A validated `serve` configuration.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub socket: PathBuf,
    pub data: PathBuf,
    pub meta: PathBuf,
    pub queues: u16,
    pub queue_size: u16,
    pub readonly: bool,
    /// GET_ID string; `None` derives one from the image.
    pub serial: Option<String>,
    pub writeback_interval: Duration,
    pub on_mismatch: OnMismatch,
    /// Simulate a disk with a volatile write cache that SIGUSR2 power-cuts.
    pub volatile_cache: Option<VolatileCacheConfig>,
    /// The write-back stage: a file in memory that outlives the process
    /// (tmpfs), replayed at start.
    pub stage: PathBuf,
    /// Bytes of completed writes the stage holds before writers wait.
    pub stage_bytes: u64,
    /// The key of a disk with keyed checksums.
    pub key: Option<Key>,
    /// The control socket (mode 0600), if any.
    pub control: Option<PathBuf>,
}

/// Why `serve` stopped with an error. Causes are `#[source]`s, not part of
/// the message: `main` prints the whole chain once.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{} is in use by another twinsum", socket.display())]
    SocketLocked { socket: PathBuf },
    #[error("{} is in use by a live process", .0.display())]
    SocketLive(PathBuf),
    #[error("{} exists and is not a socket; not replacing it", .0.display())]
    NotASocket(PathBuf),
    #[error("cannot set up socket {}", path.display())]
    Socket {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Open(io::Error),
    #[error("cannot open the disk")]
    Engine(#[source] EngineError),
    #[error("cannot use the write-back stage {}", path.display())]
    Stage {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot use the write-back stage {}", path.display())]
    StageEngine {
        path: PathBuf,
        #[source]
        source: EngineError,
    },
    #[error("cannot set up signals")]
    Signals(#[source] io::Error),
    #[error("the simulated power cut failed")]
    PowerCut(#[source] io::Error),
    #[error("cannot start the control socket")]
    Control(#[source] io::Error),
    #[error("vhost-user: {0}")]
    Vhost(String),
}

/// Serve until SIGTERM/SIGINT; `Ok` after an orderly stop.
pub fn serve(cfg: ServeConfig) -> Result<(), ServeError> {
    // Before any thread exists, so that every thread inherits the mask and
    // only the signal thread ever sees these signals (via sigwait): no
    // asynchronous handler runs at all.
    let signals = block_signals().map_err(ServeError::Signals)?;
    // A front-end's memory file that shrinks must fail requests, not kill
    // the process: the SIGBUS handler, before any guest memory is mapped.
    guestmem::install().map_err(|e| ServeError::Signals(io::Error::other(e)))?;

    let _socket_lock = lock_socket(&cfg.socket)?;
    let served = Arc::new(Served::open(&cfg)?);
    let limits = *served.current().disk.limits();

    let listener = bind_socket(&cfg.socket)?;
    let control_listener = match cfg.control.as_deref().map(bind_socket).transpose() {
        Ok(l) => l,
        Err(e) => {
            remove_socket(&cfg.socket);
            return Err(e);
        }
    };
    log::info!(
        "serving {} ({} blocks of {} bytes{}{}) on {}, {} queue(s), serial {:?}{}",
        cfg.data.display(),
        limits.blocks,
        limits.block_size,
        if cfg.key.is_some() {
            ", keyed checksums"
        } else {
            ""
        },
        if cfg.readonly { ", read-only" } else { "" },
        cfg.socket.display(),
        cfg.queues,
        served.spec.serial,
        if cfg.volatile_cache.is_some() {
            ", volatile write cache"
        } else {
            ""
        },
    );

    let control = Arc::new(Control {
        stop: AtomicBool::new(false),
        wake: EventFd::new(EFD_NONBLOCK).map_err(ServeError::Signals)?,
        conn: Mutex::new(None),
        socket: cfg.socket.clone(),
    });
    let writeback = {
        let served = served.clone();
        Periodic::start(cfg.writeback_interval, move || served.writeback())
    };
    let sig_thread = {
        let (control, served) = (control.clone(), served.clone());
        thread::Builder::new()
            .name("signals".into())
            .spawn(move || signal_loop(signals, &control, &served))
            .map_err(ServeError::Signals)?
    };
    let control_server = match control_listener {
        Some(l) => {
            let daemon = Arc::new(ControlDaemon {
                served: served.clone(),
                control: control.clone(),
                queues: cfg.queues,
                readonly: cfg.readonly,
            });
            match crate::control::Server::start(l, daemon) {
                Ok(s) => {
                    if let Some(p) = &cfg.control {
                        log::info!("control socket on {}", p.display());
                    }
                    Some(s)
                }
                Err(e) => {
                    log::error!("cannot start the control socket: {e}; stopping");
                    control.request_stop();
                    None
                }
            }
        }
        None => None,
    };

    let result = serve_connections(&cfg, &served, &control, listener);

    writeback.stop();
    // Before the final stop: the scrub reads the disk the stop cleans.
    if let Some(c) = control_server {
        c.stop();
    }
    let result = result.and(served.stop());
    remove_socket(&cfg.socket);
    if let Some(p) = &cfg.control {
        remove_socket(p);
    }
    if result.is_ok() {
        // It has seen SIGTERM/SIGINT, or we would not be here.
        let _ = sig_thread.join();
    }
    result
}

/// The disk a front-end gets: the engine, and with `--volatile-cache` the
/// power supply its devices hang off.
#[derive(Clone)]
struct Current {
    disk: Arc<Disk>,
    /// The disk's engine, for the control socket's status and scrub.
    engine: Arc<Engine>,
    power: Option<Arc<PowerSupply>>,
}

impl Current {
    /// The simulated power of this disk was cut.
    fn lost_power(&self) -> bool {
        self.power.as_ref().is_some_and(|p| !p.is_on())
    }
}

/// How to open the engine, at start and again after each power cut.
struct DiskSpec {
    opts: EngineOptions,
    readonly: bool,
    serial: String,
}

impl DiskSpec {
    fn open(
        &self,
        (data, meta): (DeviceRef, DeviceRef),
        power: Option<Arc<PowerSupply>>,
    ) -> Result<Current, ServeError> {
        let engine = Engine::open(data, meta, self.opts.clone()).map_err(ServeError::Engine)?;
        self.current(engine, power)
    }

    /// Open on the real files with the stage at `path`: replay what a dead
    /// twinsum left in it, then serve with a fresh stage of the configured
    /// size.
    fn open_staged(
        &self,
        (data, meta): (DeviceRef, DeviceRef),
        path: &Path,
        bytes: u64,
    ) -> Result<Current, ServeError> {
        let boot = crate::stage::boot_id().map_err(|source| ServeError::Stage {
            path: path.to_owned(),
            source,
        })?;
        let len = crate::stage::RING_START + bytes;
        let stage_err = |source| ServeError::Stage {
            path: path.to_owned(),
            source,
        };
        let engine_err = |source| ServeError::StageEngine {
            path: path.to_owned(),
            source,
        };
        let existing = match fs::metadata(path) {
            Ok(m) => m.len() > 0,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(stage_err(e)),
        };
        if existing {
            let region = Arc::new(MappedFile::open(path, None).map_err(stage_err)?);
            if region.len() != len {
                // Replay on the old stage, write everything out, then start
                // over at the new size.
                let engine = Engine::open_with_stage(
                    data.clone(),
                    meta.clone(),
                    StageConfig {
                        region: region.clone(),
                        boot,
                    },
                    self.opts.clone(),
                )
                .map_err(engine_err)?;
                if !engine.make_clean().map_err(engine_err)? {
                    return Err(engine_err(EngineError::Stopping));
                }
                drop(engine);
                drop(region);
            } else {
                let engine = Engine::open_with_stage(
                    data,
                    meta,
                    StageConfig { region, boot },
                    self.opts.clone(),
                )
                .map_err(engine_err)?;
                return self.current(engine, None);
            }
        }
        let region = Arc::new(MappedFile::open(path, Some(len)).map_err(stage_err)?);
        let engine =
            Engine::open_with_stage(data, meta, StageConfig { region, boot }, self.opts.clone())
                .map_err(engine_err)?;
        self.current(engine, None)
    }

    fn current(
        &self,
        engine: Engine,
        power: Option<Arc<PowerSupply>>,
    ) -> Result<Current, ServeError> {
        let limits = config::limits(engine.block_size(), engine.blocks());
        let engine = Arc::new(engine);
        let disk = Disk::new(engine.clone(), limits, self.readonly, &self.serial);
        Ok(Current {
            disk: Arc::new(disk),
            engine,
            power,
        })
    }
}

/// The disk being served. A power cut replaces it by a fresh one opened on
/// what survived; everything that outlives one front-end (the write-back
/// thread, signals, the final stop) reaches the disk through here.
struct Served {
    spec: DiskSpec,
    state: Mutex<ServedState>,
    /// The stage file, removed after an orderly stop that emptied it.
    stage: Option<PathBuf>,
}

struct ServedState {
    current: Current,
    volatile: Option<VolatileDisk>,
    /// A power cut or the reopen after it failed: nothing is served any
    /// more, and `serve` returns this once it has stopped.
    failed: Option<ServeError>,
}

impl Served {
    fn open(cfg: &ServeConfig) -> Result<Self, ServeError> {
        let flags = OpenFlags {
            writable: !cfg.readonly,
            lock: true,
        };
        let data: DeviceRef =
            Arc::new(FileDevice::open(&cfg.data, flags).map_err(ServeError::Open)?);
        let meta: DeviceRef =
            Arc::new(FileDevice::open(&cfg.meta, flags).map_err(ServeError::Open)?);
        let spec = DiskSpec {
            opts: EngineOptions {
                on_mismatch: cfg.on_mismatch,
                readonly: cfg.readonly,
                stage_bytes: cfg.stage_bytes,
                key: cfg.key.clone(),
                ..EngineOptions::default()
            },
            readonly: cfg.readonly,
            serial: match &cfg.serial {
                Some(s) => s.clone(),
                None => default_serial(&cfg.data),
            },
        };
        let (current, volatile) = match &cfg.volatile_cache {
            None if cfg.readonly => {
                refuse_waiting_stage(&cfg.stage)?;
                (spec.open((data, meta), None)?, None)
            }
            None => (
                spec.open_staged((data, meta), &cfg.stage, cfg.stage_bytes)?,
                None,
            ),
            Some(v) => {
                let v = VolatileDisk::new(data, meta, v).map_err(ServeError::Open)?;
                (spec.open(v.devices(), Some(v.supply().clone()))?, Some(v))
            }
        };
        let stage = (cfg.volatile_cache.is_none() && !cfg.readonly).then(|| cfg.stage.clone());
        Ok(Self {
            spec,
            state: Mutex::new(ServedState {
                current,
                volatile,
                failed: None,
            }),
            stage,
        })
    }

    fn lock(&self) -> MutexGuard<'_, ServedState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The disk a front-end connecting now gets.
    fn current(&self) -> Current {
        self.lock().current.clone()
    }

    /// Run `f` on the current disk unless its power was cut (a dead disk
    /// writes nothing, and trying only logs errors): `None` then. The lock
    /// is held, so no cut happens while `f` runs.
    fn with_powered<T>(&self, f: impl FnOnce(&Disk) -> T) -> Option<T> {
        let st = self.lock();
        (st.failed.is_none() && !st.current.lost_power()).then(|| f(&st.current.disk))
    }

    fn writeback(&self) {
        self.with_powered(|d| d.writeback());
    }

    /// SIGUSR1 and the control socket's `sync-mode`: `Ok(true)` once the
    /// metadata is current and kept so, `Ok(false)` on a read-only disk;
    /// `None` when nothing is served.
    fn enter_sync_mode(&self, why: &str) -> Option<Result<bool, EngineError>> {
        self.with_powered(|d| d.try_enter_sync_mode(why))
    }

    /// The engine serving now, unless a power cut failed.
    fn engine(&self) -> Option<Arc<Engine>> {
        let st = self.lock();
        st.failed.is_none().then(|| st.current.engine.clone())
    }

    fn power_cuts(&self) -> Option<u64> {
        self.lock().volatile.as_ref().map(VolatileDisk::cuts)
    }

    /// The front-end that had `conn` went away: the orderly steps of
    /// DESIGN §4, unless that disk lost its power meanwhile — then its
    /// engine is dropped without writing anything, as a crashed one.
    fn frontend_gone(&self, conn: &Current) {
        let st = self.lock();
        if st.failed.is_some() || conn.lost_power() {
            log::info!(
                "the front-end of the powered-off disk went away; its engine is dropped \
                 without writing anything"
            );
            return;
        }
        conn.disk.enter_sync_mode("front-end disconnected");
        conn.disk.make_clean("front-end disconnected");
    }

    /// SIGUSR2 and the control socket's `power-cut`: cut the power, then
    /// open a fresh engine on what survived. [`CutRefused::Failed`]: that
    /// failed and the server must stop.
    fn power_cut(&self, why: &str) -> Result<CutSummary, CutRefused> {
        let mut st = self.lock();
        let ServedState {
            current,
            volatile,
            failed,
        } = &mut *st;
        let Some(v) = volatile.as_mut() else {
            log::warn!("{why}: a power cut needs serve --volatile-cache; ignoring it");
            return Err(CutRefused::NotVolatile);
        };
        if failed.is_some() {
            return Err(CutRefused::Failed);
        }
        log::info!("{why}: cutting the power");
        // Writes the engine completed but still holds in its own write-back
        // stage go to the simulated cache first, so that the cut keeps or
        // loses each of them at random like any other un-synced write
        // rather than losing them all.
        current.disk.engine().drain();
        let summary = match v.cut() {
            Ok(s) => s,
            Err(e) => {
                log::error!("the power cut failed: {e}; stopping");
                *failed = Some(ServeError::PowerCut(e));
                return Err(CutRefused::Failed);
            }
        };
        log::info!("{summary}");
        log::info!(
            "the connected front-end (if any) now gets an I/O error for every request; \
             power is back for the next one"
        );
        match self.spec.open(v.devices(), Some(v.supply().clone())) {
            Ok(c) => {
                *current = c;
                log::info!(
                    "reopened the disk on what survived the cut, as a freshly started twinsum would"
                );
                Ok(summary)
            }
            Err(e) => {
                log::error!("cannot reopen the disk after the power cut: {e}; stopping");
                *failed = Some(e);
                Err(CutRefused::Failed)
            }
        }
    }

    /// Orderly stop of the current disk; the error of a failed power cut.
    fn stop(&self) -> Result<(), ServeError> {
        let mut st = self.lock();
        if let Some(e) = st.failed.take() {
            return Err(e);
        }
        let disk = &st.current.disk;
        let emptied = disk.make_clean("stopping");
        if let Some(path) = &self.stage {
            if emptied {
                if let Err(e) = fs::remove_file(path) {
                    log::warn!(
                        "cannot remove the empty write-back stage {}: {e}",
                        path.display()
                    );
                }
            } else {
                log::warn!(
                    "the write-back stage {} still holds {} completed writes; the next start replays them",
                    path.display(),
                    disk.engine().stats().queued
                );
            }
        }
        let s = disk.engine().stats();
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
            match st.volatile.as_ref().map_or(0, VolatileDisk::cuts) {
                0 => String::new(),
                n => format!(" since power cut #{n}"),
            },
        );
        Ok(())
    }
}

/// Why [`Served::power_cut`] did not cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CutRefused {
    /// Not `--volatile-cache`: there is no simulated power to cut.
    NotVolatile,
    /// The cut or the reopen after it failed: nothing is served any more.
    Failed,
}

/// The daemon as the control socket sees it: every command runs the code
/// its signal runs.
struct ControlDaemon {
    served: Arc<Served>,
    control: Arc<Control>,
    queues: u16,
    readonly: bool,
}

impl crate::control::Daemon for ControlDaemon {
    fn engine(&self) -> Option<Arc<Engine>> {
        self.served.engine()
    }

    fn info(&self) -> crate::control::DaemonInfo {
        crate::control::DaemonInfo {
            frontend_connected: self
                .control
                .conn
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_some(),
            queues: self.queues,
            readonly: self.readonly,
            power_cuts: self.served.power_cuts(),
        }
    }

    fn enter_sync_mode(&self) -> Result<bool, CommandError> {
        match self.served.enter_sync_mode("control socket") {
            Some(Ok(written)) => Ok(written),
            Some(Err(source)) => Err(CommandError::Engine {
                what: "cannot switch to synchronous metadata",
                source,
            }),
            None => Err(CommandError::NotServing),
        }
    }

    fn power_cut(&self) -> Result<crate::control::PowerCut, CommandError> {
        match self.served.power_cut("control socket") {
            Ok(c) => Ok(crate::control::PowerCut {
                number: c.number,
                seed: c.seed,
                data_unit: c.data_unit,
                data_kept: c.data.0 as u64,
                data_unsynced: c.data.1 as u64,
                meta_kept: c.meta.0 as u64,
                meta_unsynced: c.meta.1 as u64,
                destages: c.destages,
            }),
            Err(CutRefused::NotVolatile) => Err(CommandError::Refused(
                "a power cut needs serve --volatile-cache".into(),
            )),
            Err(CutRefused::Failed) => {
                // As after SIGUSR2: nothing is left to serve.
                self.control.request_stop();
                Err(CommandError::Refused(
                    "the power cut failed; twinsum is stopping (its log says why)".into(),
                ))
            }
        }
    }
}

/// What the signal thread shares with the connection loop.
struct Control {
    stop: AtomicBool,
    /// Wakes the connection loop out of its wait for a front-end.
    wake: EventFd,
    /// The live connection, to cut it on SIGTERM.
    conn: Mutex<Option<ShutdownHandle>>,
    socket: PathBuf,
}

impl Control {
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    fn request_stop(&self) {
        self.stop.store(true, Ordering::Release);
        if let Err(e) = self.wake.write(1) {
            log::warn!("cannot wake the connection loop: {e}");
        }
        match self
            .conn
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
        {
            Some(h) => h.shutdown(),
            // The loop may be blocked in accept() (poll saw a front-end
            // that hung up before we accepted it): a connection of our own
            // gets it out, and it then sees the stop request.
            None => drop(UnixStream::connect(&self.socket)),
        }
    }
}

fn serve_connections(
    cfg: &ServeConfig,
    served: &Served,
    control: &Control,
    listener: UnixListener,
) -> Result<(), ServeError> {
    let mut listener = Listener::from(listener);
    loop {
        if !wait_for_frontend(&listener, control)? || control.stopping() {
            return Ok(());
        }
        // The handler's memory: the backend checks each table put there
        // before its workers see it (BlkBackend::update_memory).
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let conn = served.current();
        let mut backend = BlkBackend::new(conn.disk.clone(), cfg.queues, cfg.queue_size);
        if let Some(p) = &conn.power {
            backend = backend.with_power(p.clone());
        }
        let backend = Arc::new(backend);
        let mut daemon = VhostUserDaemon::new("twinsum".into(), backend.clone(), mem)
            .map_err(|e| ServeError::Vhost(e.to_string()))?;
        daemon
            .start(&mut listener)
            .map_err(|e| ServeError::Vhost(e.to_string()))?;
        log::info!("front-end connected");
        *control.conn.lock().unwrap_or_else(PoisonError::into_inner) = daemon.shutdown_handle();
        if control.stopping() {
            daemon.request_shutdown();
        }
        let ended = daemon.wait();
        *control.conn.lock().unwrap_or_else(PoisonError::into_inner) = None;
        match ended {
            Ok(()) => log::info!("front-end disconnected"),
            Err(vhost_user_backend::Error::HandleRequest(
                VhostUserError::Disconnected | VhostUserError::PartialMessage,
            )) => log::info!("front-end disconnected"),
            Err(_) if control.stopping() => log::info!("closed the front-end connection"),
            Err(e) => log::warn!("front-end connection ended: {e}"),
        }
        // Finish what the workers are running, then nothing touches this
        // connection's rings again.
        backend.close();
        drop(daemon);
        served.frontend_gone(&conn);
        // Unmap the front-end's memory now rather than at the next memory
        // table: a guest's RAM stays allocated while anyone maps it.
        drop(backend);
        guestmem::forget_unused();
    }
}

/// A read-only server cannot replay a stage: refuse to hide the writes it
/// holds.
fn refuse_waiting_stage(path: &Path) -> Result<(), ServeError> {
    let region = match crate::io::FileRegion::open_readonly(path) {
        Ok(r) => r,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ServeError::Stage {
                path: path.to_owned(),
                source,
            })
        }
    };
    match crate::stage::Stage::inspect(&region) {
        Ok(Some(i)) if i.records > 0 => Err(ServeError::StageEngine {
            path: path.to_owned(),
            source: EngineError::StageNeedsReplay(i.records as usize),
        }),
        Ok(_) => Ok(()),
        Err(e) => Err(ServeError::StageEngine {
            path: path.to_owned(),
            source: e.into(),
        }),
    }
}

/// Block until a front-end connects (`true`) or we are asked to stop.
fn wait_for_frontend(listener: &Listener, control: &Control) -> Result<bool, ServeError> {
    let mut fds = [
        libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: control.wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        if control.stopping() {
            return Ok(false);
        }
        // SAFETY: `fds` is a live array of two initialised pollfd structs and
        // its length is passed alongside.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(ServeError::Socket {
                path: control.socket.clone(),
                source: e,
            });
        }
        if fds[1].revents != 0 {
            return Ok(false);
        }
        if fds[0].revents != 0 {
            return Ok(true);
        }
    }
}

/// A lock on the socket path, held for the life of the process: a second
/// twinsum on the same socket stops here instead of probing (and so
/// disturbing) ours. The lock is an abstract Unix socket named after the
/// canonical path: the kernel drops it when the process dies, however it
/// dies, and it leaves no file behind.
fn lock_socket(socket: &Path) -> Result<UnixListener, ServeError> {
    let err = |source| ServeError::Socket {
        path: socket.to_owned(),
        source,
    };
    let dir = match socket.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let dir = fs::canonicalize(dir).map_err(err)?;
    let name = socket.file_name().unwrap_or_default();
    let key = [
        dir.as_os_str().as_encoded_bytes(),
        b"/",
        name.as_encoded_bytes(),
    ]
    .concat();
    let lock = format!("twinsum-lock-{:016x}", xxhash_rust::xxh3::xxh3_64(&key));
    let addr = SocketAddr::from_abstract_name(lock.as_bytes()).map_err(err)?;
    match UnixListener::bind_addr(&addr) {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(ServeError::SocketLocked {
            socket: socket.to_owned(),
        }),
        Err(e) => Err(err(e)),
    }
}

/// Remove a socket file we created, at exit.
fn remove_socket(path: &Path) {
    if let Err(e) = fs::remove_file(path) {
        log::warn!("cannot remove {}: {e}", path.display());
    }
}

/// Create the listening socket with mode 0600, replacing a stale one.
fn bind_socket(path: &Path) -> Result<UnixListener, ServeError> {
    let err = |source| ServeError::Socket {
        path: path.to_owned(),
        source,
    };
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => return Err(ServeError::SocketLive(path.to_owned())),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                log::info!("replacing stale socket {}", path.display());
                fs::remove_file(path).map_err(err)?;
            }
            Err(e) => return Err(err(e)),
        },
        Ok(_) => return Err(ServeError::NotASocket(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    // The socket is created with the process umask; make it 0600 from the
    // start rather than chmod it after a window. No other thread runs yet.
    // SAFETY: umask only swaps the process file-creation mask.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    bound.map_err(err)
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

/// The signals we handle, blocked in every thread.
fn block_signals() -> io::Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it fully.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; these calls only modify it and the
    // calling thread's signal mask.
    let rc = unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        libc::sigaddset(&mut set, libc::SIGUSR2);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(set)
}

/// Synchronous signal handling: sigwait in an ordinary thread, so the
/// work a signal triggers is ordinary code, not a signal handler.
fn signal_loop(set: libc::sigset_t, control: &Control, served: &Served) {
    loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: `set` is an initialised sigset_t and `sig` a live c_int.
        let rc = unsafe { libc::sigwait(&set, &mut sig) };
        if rc != 0 {
            log::error!("sigwait failed: {}", io::Error::from_raw_os_error(rc));
            return;
        }
        match sig {
            libc::SIGUSR1 => {
                // Logged by the disk; a signal has no one to answer.
                let _ = served.enter_sync_mode("SIGUSR1");
            }
            // The guard runs the cut; a failed one leaves nothing to serve.
            libc::SIGUSR2 if served.power_cut("SIGUSR2") == Err(CutRefused::Failed) => {
                control.request_stop();
                return;
            }
            libc::SIGTERM | libc::SIGINT => {
                let name = if sig == libc::SIGTERM {
                    "SIGTERM"
                } else {
                    "SIGINT"
                };
                log::info!("{name}: finishing requests in flight and stopping");
                control.request_stop();
                return;
            }
            _ => {}
        }
    }
}

/// The periodic metadata write-back thread.
struct Periodic {
    state: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Periodic {
    /// Call `tick` every `interval` until stopped.
    fn start(interval: Duration, tick: impl Fn() + Send + 'static) -> Self {
        let state = Arc::new((Mutex::new(false), Condvar::new()));
        let st = state.clone();
        let thread = thread::Builder::new()
            .name("writeback".into())
            .spawn(move || loop {
                let (lock, cv) = &*st;
                let stopped = lock.lock().unwrap_or_else(PoisonError::into_inner);
                let (stopped, _) = cv
                    .wait_timeout_while(stopped, interval, |s| !*s)
                    .unwrap_or_else(PoisonError::into_inner);
                if *stopped {
                    return;
                }
                drop(stopped);
                tick();
            });
        let thread = match thread {
            Ok(t) => Some(t),
            Err(e) => {
                log::error!("cannot start the write-back thread: {e}");
                None
            }
        };
        Self { state, thread }
    }

    fn stop(mut self) {
        let (lock, cv) = &*self.state;
        *lock.lock().unwrap_or_else(PoisonError::into_inner) = true;
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::blk::testutil::mem_disk;

    #[test]
    fn periodic_writeback_writes_dirty_metadata_and_stops_promptly() {
        let (_data, disk) = mem_disk(false);
        let disk = Arc::new(disk);
        // A flush forgets old checksums in memory only: dirty pages that
        // only the write-back makes durable.
        disk.engine().write(3, &[7u8; 4096]).unwrap();
        disk.engine().flush().unwrap();
        let before = disk.engine().stats().meta_syncs;
        let d = disk.clone();
        let p = Periodic::start(Duration::from_millis(5), move || d.writeback());
        let deadline = Instant::now() + Duration::from_secs(30);
        while disk.engine().stats().meta_syncs == before {
            assert!(Instant::now() < deadline, "no write-back happened");
            thread::yield_now();
        }
        // Stopping does not wait out an interval.
        let p2 = Periodic::start(Duration::from_secs(3600), move || disk.writeback());
        let t = Instant::now();
        p2.stop();
        p.stop();
        assert!(t.elapsed() < Duration::from_secs(10));
    }

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

    #[test]
    fn a_stale_socket_is_replaced_but_a_live_one_or_a_file_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        drop(UnixListener::bind(&path).unwrap());
        let live = bind_socket(&path).expect("stale socket replaced");
        assert!(matches!(bind_socket(&path), Err(ServeError::SocketLive(_))));
        drop(live);
        fs::remove_file(&path).unwrap();
        fs::write(&path, b"data").unwrap();
        assert!(matches!(bind_socket(&path), Err(ServeError::NotASocket(_))));
        let _lock = lock_socket(&path).unwrap();
        assert!(matches!(
            lock_socket(&dir.path().join(".").join("s.sock")),
            Err(ServeError::SocketLocked { .. })
        ));
    }
}
