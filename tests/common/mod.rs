//! Helpers for socket tests: formatted images, a `twinsum serve` child
//! process, and a libblkio virtio-blk-vhost-user client.
//!
//! Nothing here sleeps for synchronisation: readiness and log lines are
//! polled with a deadline.

#![allow(dead_code)]

pub mod frontend;
pub mod load;

use std::fs::{self, File};
use std::mem::MaybeUninit;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, MemoryRegion, ReqFlags};

/// How long anything may take before a test gives up.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// Poll `f` until it returns `Some`, or panic after [`DEADLINE`].
pub fn poll<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        // Back-off between polls, not synchronisation: the condition is
        // re-checked every time.
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// tmpfs for stages: /dev/shm where it exists.
pub fn shm_dir() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_owned()
    } else {
        std::env::temp_dir()
    }
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_twinsum")
}

pub fn twinsum(args: &[&str]) -> Output {
    match Command::new(bin()).args(args).output() {
        Ok(o) => o,
        Err(e) => panic!("cannot run twinsum: {e}"),
    }
}

/// A scratch directory with a formatted image.
pub struct Disk {
    pub dir: tempfile::TempDir,
    /// A tmpfs directory for the write-back stage (as /dev/shm is by
    /// default), removed with the disk even when a daemon was killed.
    pub shm: tempfile::TempDir,
    /// The stage every daemon of this disk uses (`--stage`).
    pub stage: PathBuf,
    pub data: PathBuf,
    pub meta: PathBuf,
    pub socket: PathBuf,
    pub block_size: u64,
    pub size: u64,
}

impl Disk {
    /// A sparse image of `size` bytes formatted with `block_size`.
    pub fn new(size: u64, block_size: u64) -> Self {
        Self::new_with(size, block_size, |_| Vec::new())
    }

    /// [`new`](Self::new) with more `format` arguments, made from the
    /// scratch directory (for files that must live in it).
    pub fn new_with(size: u64, block_size: u64, extra: impl FnOnce(&Path) -> Vec<String>) -> Self {
        Self::new_in(
            tempfile::tempdir().expect("tempdir"),
            size,
            block_size,
            extra,
        )
    }

    /// [`new`](Self::new) with IMG and META on tmpfs, where a sync costs
    /// next to nothing: for races that need many flushes a second.
    pub fn new_on_tmpfs(size: u64, block_size: u64) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("twinsum-test-")
            .tempdir_in(shm_dir())
            .expect("tempdir on tmpfs");
        Self::new_in(dir, size, block_size, |_| Vec::new())
    }

    fn new_in(
        dir: tempfile::TempDir,
        size: u64,
        block_size: u64,
        extra: impl FnOnce(&Path) -> Vec<String>,
    ) -> Self {
        let extra = extra(dir.path());
        let data = dir.path().join("disk.img");
        let meta = dir.path().join("disk.meta");
        let socket = dir.path().join("twinsum.sock");
        let args = [
            "format",
            "--data",
            s(&data),
            "--meta",
            s(&meta),
            "--size",
            &size.to_string(),
            "--block-size",
            &block_size.to_string(),
        ]
        .into_iter()
        .map(str::to_owned)
        .chain(extra)
        .collect::<Vec<_>>();
        let o = twinsum(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(
            o.status.success(),
            "format failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let shm = tempfile::Builder::new()
            .prefix("twinsum-test-")
            .tempdir_in(shm_dir())
            .expect("tempdir for the stage");
        let stage = shm.path().join("disk.stage");
        Self {
            dir,
            shm,
            stage,
            data,
            meta,
            socket,
            block_size,
            size,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `twinsum info --json` as a JSON value.
    pub fn info(&self) -> serde_json::Value {
        let o = twinsum(&["info", "--meta", s(&self.meta), "--json"]);
        assert!(
            o.status.success(),
            "info failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        serde_json::from_slice(&o.stdout).expect("info --json prints JSON")
    }

    /// `twinsum info --json` with this disk's stage.
    pub fn info_with_stage(&self) -> serde_json::Value {
        let o = twinsum(&[
            "info",
            "--meta",
            s(&self.meta),
            "--stage",
            s(&self.stage),
            "--json",
        ]);
        assert!(
            o.status.success(),
            "info failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        serde_json::from_slice(&o.stdout).expect("info --json prints JSON")
    }

    /// Flip one byte of the image behind the daemon's back.
    pub fn flip_byte(&self, offset: u64) {
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.data)
            .expect("open image");
        let mut b = [0u8];
        f.read_exact_at(&mut b, offset).expect("read image");
        b[0] ^= 0x5a;
        f.write_all_at(&b, offset).expect("write image");
    }

    /// Start `twinsum serve` on this disk with `extra` arguments.
    pub fn serve(&self, extra: &[&str]) -> Daemon {
        Daemon::start(self, &self.socket, extra)
    }
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A `twinsum serve` child; killed if still running when dropped.
pub struct Daemon {
    child: Child,
    pub socket: PathBuf,
    log: PathBuf,
}

impl Daemon {
    /// Spawn without waiting for readiness.
    pub fn spawn(disk: &Disk, socket: &Path, extra: &[&str]) -> Self {
        let n = fs::read_dir(disk.dir.path())
            .map(|d| d.count())
            .unwrap_or(0);
        let log = disk.path(&format!("serve-{n}.log"));
        let err = File::create(&log).expect("log file");
        let mut cmd = Command::new(bin());
        cmd.args(["serve", "--socket", s(socket)]).args([
            "--data",
            s(&disk.data),
            "--meta",
            s(&disk.meta),
        ]);
        if !extra.contains(&"--stage") {
            cmd.args(["--stage", s(&disk.stage)]);
        }
        let child = cmd
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("spawn twinsum serve");
        Self {
            child,
            socket: socket.to_owned(),
            log,
        }
    }

    /// Spawn and wait until the socket accepts connections.
    pub fn start(disk: &Disk, socket: &Path, extra: &[&str]) -> Self {
        let mut d = Self::spawn(disk, socket, extra);
        d.wait_ready();
        d
    }

    /// Poll connect() until the daemon listens (or fail if it died).
    pub fn wait_ready(&mut self) {
        let socket = self.socket.clone();
        poll("the daemon's socket", || {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("twinsum serve exited with {st}: {}", self.log());
            }
            UnixStream::connect(&socket).ok().map(|_| ())
        });
    }

    /// The exit status, if the daemon has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill has no memory effects; the pid is our own child,
        // which we have not yet waited for.
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(rc, 0, "kill failed");
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Poll the log until it contains `needle`.
    pub fn wait_for_log(&self, needle: &str) {
        self.wait_for_log_count(needle, 1);
    }

    /// How many lines of the log contain `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log().lines().filter(|l| l.contains(needle)).count()
    }

    /// Poll the log until `needle` appears on at least `n` lines.
    pub fn wait_for_log_count(&self, needle: &str, n: usize) {
        poll(&format!("{n} x {needle:?} in the daemon log"), || {
            (self.log_count(needle) >= n).then_some(())
        });
    }

    /// Wait for the daemon to exit by itself.
    pub fn wait_exit(&mut self) -> ExitStatus {
        poll("the daemon to exit", || {
            self.child.try_wait().ok().flatten()
        })
    }

    /// SIGTERM and wait for the exit.
    pub fn terminate(mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait_exit()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // TWINSUM_TEST_LOGS=1 shows what the daemon said (with --nocapture).
        if std::env::var_os("TWINSUM_TEST_LOGS").is_some() {
            eprintln!("--- {} ---\n{}", self.log.display(), self.log());
        }
    }
}

/// A libblkio virtio-blk-vhost-user client with one buffer per queue.
pub struct Client {
    // Field order is drop order: queues before the driver.
    queues: Vec<Blkioq>,
    region: MemoryRegion,
    per_queue: usize,
    blkio: Blkio,
}

/// Bytes of buffer each queue gets.
pub const QUEUE_BUF: usize = 1 << 20;

impl Client {
    pub fn try_connect(socket: &Path, queues: usize, readonly: bool) -> Result<Self, blkio::Error> {
        let mut blkio = Blkio::new("virtio-blk-vhost-user")?;
        blkio.set_str("path", s(socket))?;
        blkio.set_bool("read-only", readonly)?;
        blkio.connect()?;
        blkio.set_i32("num-queues", queues as i32)?;
        let started = blkio.start()?;
        let region = blkio.alloc_mem_region(QUEUE_BUF * queues)?;
        blkio.map_mem_region(&region)?;
        Ok(Self {
            queues: started.queues,
            region,
            per_queue: QUEUE_BUF,
            blkio,
        })
    }

    pub fn connect(socket: &Path, queues: usize) -> Self {
        match Self::try_connect(socket, queues, false) {
            Ok(c) => c,
            Err(e) => panic!("cannot connect to {}: {e}", socket.display()),
        }
    }

    pub fn capacity(&self) -> u64 {
        self.blkio.get_u64("capacity").expect("capacity")
    }

    /// Every queue with its own slice of the buffer, for use on threads.
    pub fn queues(&mut self) -> Vec<Queue<'_>> {
        // SAFETY: the region was allocated by blkio with `len` bytes, stays
        // mapped until `self.blkio` is dropped, and is borrowed mutably
        // through `self` for as long as the slices live.
        let all =
            unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, self.region.len) };
        self.queues
            .iter_mut()
            .zip(all.chunks_mut(self.per_queue))
            .map(|(q, buf)| Queue { q, buf })
            .collect()
    }

    /// The first queue.
    pub fn q0(&mut self) -> Queue<'_> {
        self.queues().swap_remove(0)
    }
}

/// One virtqueue and its buffer.
pub struct Queue<'a> {
    q: &'a mut Blkioq,
    buf: &'a mut [u8],
}

/// A failed request: the negative errno libblkio reports.
pub type Errno = i32;

impl Queue<'_> {
    fn complete(&mut self) -> Result<(), Errno> {
        let mut c = [const { MaybeUninit::uninit() }];
        let n = self.q.do_io(&mut c, 1, None, None).expect("do_io");
        assert_eq!(n, 1, "one completion");
        // SAFETY: do_io initialised the first `n` (= 1) completions.
        let c = unsafe { c[0].assume_init_read() };
        if c.ret == 0 {
            Ok(())
        } else {
            Err(c.ret)
        }
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), Errno> {
        self.buf[..data.len()].copy_from_slice(data);
        self.q
            .write(offset, self.buf.as_ptr(), data.len(), 0, ReqFlags::empty());
        self.complete()
    }

    pub fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, Errno> {
        self.buf[..len].fill(0xee);
        self.q
            .read(offset, self.buf.as_mut_ptr(), len, 0, ReqFlags::empty());
        self.complete()?;
        Ok(self.buf[..len].to_vec())
    }

    pub fn flush(&mut self) -> Result<(), Errno> {
        self.q.flush(0, ReqFlags::empty());
        self.complete()
    }

    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), Errno> {
        self.q.write_zeroes(offset, len, 0, ReqFlags::empty());
        self.complete()
    }

    pub fn discard(&mut self, offset: u64, len: u64) -> Result<(), Errno> {
        self.q.discard(offset, len, 0, ReqFlags::empty());
        self.complete()
    }
}

/// Deterministic, position-dependent content: a misplaced block shows.
pub fn pattern(offset: u64, len: usize, seed: u64) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            let x = (offset + i).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed;
            (x >> 29) as u8
        })
        .collect()
}
