//! A scratch disk formatted by `twinsum format`, `twinsum` runs on it,
//! and `twinsum serve` children. Needs `common::run`.

use std::fs::{self, File};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};

use super::run::{bin, poll, s};

/// tmpfs for stages: /dev/shm where it exists.
pub fn shm_dir() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_owned()
    } else {
        std::env::temp_dir()
    }
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
    /// default), removed with the disk even when a daemon was killed: held
    /// for its drop.
    _shm: tempfile::TempDir,
    /// The stage every daemon of this disk uses (`--stage`).
    pub stage: PathBuf,
    pub data: PathBuf,
    pub meta: PathBuf,
    pub socket: PathBuf,
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
    #[allow(dead_code)] // tests/control.rs only
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
            _shm: shm,
            stage,
            data,
            meta,
            socket,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Flip one byte of the image behind the daemon's back.
    #[allow(dead_code)] // tests/serve.rs and tests/control.rs
    pub fn flip_byte(&self, offset: u64) {
        use std::os::unix::fs::FileExt;
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

    /// `twinsum info --json` as a JSON value, with the stage this disk's
    /// daemons use (`stage_writes`). The front-end tests judge a disk by
    /// `check` alone.
    #[allow(dead_code)]
    pub fn info(&self) -> serde_json::Value {
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

    /// `twinsum check` of this disk, with the stage its daemons use and
    /// `extra` arguments.
    pub fn check(&self, extra: &[&str]) -> Output {
        let mut args = vec![
            "check",
            "--data",
            s(&self.data),
            "--meta",
            s(&self.meta),
            "--stage",
            s(&self.stage),
        ];
        args.extend(extra);
        twinsum(&args)
    }

    /// Start `twinsum serve` on this disk with `extra` arguments.
    pub fn serve(&self, extra: &[&str]) -> Daemon {
        Daemon::start(self, &self.socket, extra)
    }
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

    /// Wait for the daemon to exit by itself.
    pub fn wait_exit(&mut self) -> ExitStatus {
        poll("the daemon to exit", || {
            self.child.try_wait().ok().flatten()
        })
    }

    /// SIGTERM and wait for the exit.
    #[allow(dead_code)] // not tests/orderly_stop.rs
    pub fn terminate(mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait_exit()
    }
}

// Not every binary that declares this module watches the log, or whether
// the daemon is still running, while it runs.
#[allow(dead_code)]
impl Daemon {
    /// The exit status, if the daemon has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
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
