//! `twinsum serve`: the socket, the connection loop, signals and the
//! periodic write-back thread.
//!
//! One front-end at a time. When it goes away we stop its workers, put the
//! metadata in synchronous mode, mark it clean, and wait for the next one
//! (a restarted VM reattaches). SIGTERM/SIGINT end the process after the
//! same orderly stop; SIGUSR1 switches to synchronous metadata (DESIGN §4).
//!
//! SIGUSR2 asks the disk being served ([`Served`]) for a power cut, which
//! only a `--volatile-cache` disk can do.
//!
//! With `--control PATH`, [`crate::control`] serves a second socket on the
//! same [`Served`]: its `sync-mode` and `power-cut` run what SIGUSR1 and
//! SIGUSR2 run, and answer with the result.

pub use crate::io::volatile::VolatileCacheConfig;

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread;
use std::time::Duration;

use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::backend::BlkBackend;
use super::guestmem;
use super::served::{PowerCut, Served};
use crate::integrity::{EngineError, OnMismatch};
use crate::key::Key;

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
    /// `--log-writes`: record every write, zeroing and flush here.
    pub log_writes: Option<PathBuf>,
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
    #[error("cannot use the write log")]
    WriteLog(#[source] crate::writelog::WriteLogError),
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
    let limits = *served.disk().limits();

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
        served.serial(),
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
    let control_server = match control_listener {
        None => None,
        Some(l) => {
            let c = control.clone();
            match crate::control::Server::start(l, served.clone(), move || c.request_stop()) {
                Ok(s) => Some(s),
                Err(e) => {
                    if let Err(stop) = served.stop() {
                        log::error!("{}", crate::error::Chain(&stop));
                    }
                    remove_sockets(&cfg);
                    return Err(ServeError::Control(e));
                }
            }
        }
    };
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

    let result = serve_connections(&cfg, &served, &control, listener);

    writeback.stop();
    // Before the final stop: a scrub reads the disk the stop cleans.
    drop(control_server);
    let result = result.and(served.stop());
    remove_sockets(&cfg);
    if result.is_ok() {
        // It has seen SIGTERM/SIGINT, or we would not be here.
        let _ = sig_thread.join();
    }
    result
}

/// What the signal thread shares with the connection loop.
struct Control {
    stop: AtomicBool,
    /// Wakes the connection loop out of its wait for a front-end.
    wake: EventFd,
    /// The live connection, to cut it on SIGTERM.
    conn: Mutex<Option<Live>>,
    socket: PathBuf,
}

/// A connection being served: what an orderly stop needs to end it.
struct Live {
    shutdown: ShutdownHandle,
    backend: Arc<BlkBackend>,
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
            Some(live) => {
                // Finish and complete what the workers took before the
                // front-end sees us go: QEMU resumes a reconnecting guest
                // at the used index it reads then, so a completion written
                // later would run that request again over a descriptor the
                // guest has reused, and its driver gives up on the queue.
                live.backend.close();
                live.shutdown.shutdown();
            }
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
        let disk = served.disk();
        let backend = Arc::new(BlkBackend::new(disk.clone(), cfg.queues, cfg.queue_size));
        let mut daemon = VhostUserDaemon::new("twinsum".into(), backend.clone(), mem)
            .map_err(|e| ServeError::Vhost(e.to_string()))?;
        daemon
            .start(&mut listener)
            .map_err(|e| ServeError::Vhost(e.to_string()))?;
        log::info!("front-end connected");
        served.frontend_came();
        *control.conn.lock().unwrap_or_else(PoisonError::into_inner) =
            daemon.shutdown_handle().map(|shutdown| Live {
                shutdown,
                backend: backend.clone(),
            });
        if control.stopping() {
            backend.close();
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
        served.frontend_gone(&disk);
        // Unmap the front-end's memory now rather than at the next memory
        // table: a guest's RAM stays allocated while anyone maps it.
        drop(backend);
        guestmem::forget_unused();
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

fn remove_socket(path: &Path) {
    if let Err(e) = fs::remove_file(path) {
        log::warn!("cannot remove {}: {e}", path.display());
    }
}

/// Remove the sockets we created, at exit.
fn remove_sockets(cfg: &ServeConfig) {
    remove_socket(&cfg.socket);
    if let Some(p) = &cfg.control {
        remove_socket(p);
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
            // A failed cut leaves nothing to serve.
            libc::SIGUSR2 => {
                if let PowerCut::Failed = served.power_cut("SIGUSR2") {
                    control.request_stop();
                    return;
                }
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
