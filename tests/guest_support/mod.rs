//! Support for the guest tests: a backend process serving a fresh disk on a
//! vhost-user socket, and QEMU guests booted against it from the image that
//! `images/build.sh` builds. Both are watched through their output: the
//! guest's serial console (markers `@@TWINSUM ...@@` printed by
//! `images/guest/init` and the guest test scripts) and the backend's stderr.
//!
//! Nothing here sleeps for a fixed time: every wait polls a condition (a
//! marker on the console, a line in the log, a listening socket) against a
//! deadline, and every child process is killed when its owner is dropped, so
//! a failing assertion never leaves a QEMU behind.

use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

/// Size of the disk each test formats.
const DISK_SIZE: &str = "256M";
const DISK_BYTES: u64 = 256 << 20;
/// Longest a single guest step may take (boot, one test script, power-off).
/// TCG on two busy cores is slow; the usual step takes 5–15 s.
const STEP_TIMEOUT: Duration = Duration::from_secs(150);
/// Longest the backend may take to listen, or to exit after SIGTERM.
const BACKEND_TIMEOUT: Duration = Duration::from_secs(30);
/// Lines of console and log shown when a test fails.
const TAIL_LINES: usize = 40;

const QEMU: &str = "qemu-system-x86_64";
const STORAGE_DAEMON: &str = "qemu-storage-daemon";

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn find_in_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Build (or reuse) the guest kernel and initramfs once per test process,
/// so that `cargo test` alone works too; `make test` has already built them.
fn guest_images() -> Result<(PathBuf, PathBuf), String> {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let root = repo_root();
    BUILT
        .get_or_init(|| {
            let out = Command::new(root.join("images/build.sh"))
                .output()
                .map_err(|e| format!("cannot run images/build.sh: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "images/build.sh failed ({}):\n{}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                ))
            }
        })
        .clone()?;
    let build = root.join("images/build");
    Ok((build.join("vmlinuz"), build.join("initramfs.cpio")))
}

/// Text read from a child's pipe by a background thread, with a condition
/// variable so that waiters wake up as soon as new output arrives.
struct Captured {
    state: Mutex<CapturedState>,
    grew: Condvar,
}

#[derive(Default)]
struct CapturedState {
    text: String,
    /// The pipe reached end of file: the child exited or closed it.
    closed: bool,
}

impl Captured {
    fn spawn(mut pipe: impl Read + Send + 'static) -> Arc<Self> {
        let captured = Arc::new(Captured {
            state: Mutex::new(CapturedState::default()),
            grew: Condvar::new(),
        });
        let writer = Arc::clone(&captured);
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                let n = pipe.read(&mut buf).unwrap_or(0);
                let mut state = writer.state.lock().unwrap_or_else(|e| e.into_inner());
                if n == 0 {
                    state.closed = true;
                } else {
                    state.text.push_str(&String::from_utf8_lossy(&buf[..n]));
                }
                writer.grew.notify_all();
                if n == 0 {
                    break;
                }
            }
        });
        captured
    }

    fn has_closed(&self) -> bool {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).closed
    }

    fn text(&self) -> String {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .text
            .clone()
    }

    /// Call `check(text, closed)` whenever the text grows (and at least
    /// every 250 ms, so that it can also watch other processes), until it
    /// returns `Some` or `timeout` passes (then the error names `what`).
    fn wait<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&str, bool) -> Option<Result<T, String>>,
    ) -> Result<T, String> {
        let deadline = Instant::now() + timeout;
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(result) = check(&state.text, state.closed) {
                return result;
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(format!("timed out after {timeout:?} waiting for {what}"));
            }
            state = self
                .grew
                .wait_timeout(state, (deadline - now).min(Duration::from_millis(250)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// Which program serves the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    Twinsum,
    /// qemu-storage-daemon's vhost-user-blk export: a plain backend without
    /// checksums, to develop the harness against (`TWINSUM_GUEST_BACKEND=qsd`).
    StorageDaemon,
}

impl BackendKind {
    fn from_env() -> Self {
        match std::env::var("TWINSUM_GUEST_BACKEND").as_deref() {
            Ok("qsd" | "qemu-storage-daemon") => BackendKind::StorageDaemon,
            _ => BackendKind::Twinsum,
        }
    }
}

/// What a test does to a formatted IMG and META before twinsum serves them.
pub type BeforeServe = Box<dyn FnOnce(&Path, &Path) -> Result<(), String>>;

/// A backend process serving a fresh, formatted disk on a socket in its own
/// temporary directory.
pub struct Backend {
    pub kind: BackendKind,
    /// Holds IMG, META and the socket; removed when the backend is dropped.
    _dir: tempfile::TempDir,
    /// Holds twinsum's write-back stage (tmpfs), removed with it even if
    /// the backend was killed.
    _shm: tempfile::TempDir,
    pub stage: PathBuf,
    pub img: PathBuf,
    pub meta: PathBuf,
    pub socket: PathBuf,
    child: Child,
    log: Arc<Captured>,
    /// How to start it again (see `restart`).
    program: String,
    args: Vec<String>,
    /// What earlier processes of this backend logged.
    past_logs: String,
}

/// Start a backend process with its stderr captured.
fn spawn_backend(
    kind: BackendKind,
    program: &str,
    args: &[String],
) -> Result<(Child, Arc<Captured>), String> {
    let mut cmd = Command::new(program);
    cmd.args(args);
    if kind == BackendKind::Twinsum && std::env::var_os("RUST_LOG").is_none() {
        // The tests read the info-level lines (synchronous mode).
        cmd.env("RUST_LOG", "info");
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {kind:?}: {e}"))?;
    let log = Captured::spawn(child.stderr.take().ok_or("no stderr pipe")?);
    Ok((child, log))
}

impl Backend {
    /// Format a fresh disk (twinsum: with `block_size` bytes per block),
    /// run `before_serve` on IMG and META, and serve it; `serve_args` are
    /// added to `twinsum serve`.
    fn start(
        kind: BackendKind,
        block_size: u32,
        serve_args: &[&str],
        before_serve: BeforeServe,
    ) -> Result<Self, String> {
        let dir = tempfile::Builder::new()
            .prefix("twinsum-guest-")
            .tempdir()
            .map_err(|e| format!("cannot create a temporary directory: {e}"))?;
        let img = dir.path().join("disk.img");
        let meta = dir.path().join("disk.meta");
        let socket = dir.path().join("vhost.sock");
        let shm = tempfile::Builder::new()
            .prefix("twinsum-guest-")
            .tempdir_in(if Path::new("/dev/shm").is_dir() {
                Path::new("/dev/shm")
            } else {
                dir.path()
            })
            .map_err(|e| format!("cannot create a directory for the stage: {e}"))?;
        let stage = shm.path().join("disk.stage");
        let (program, args): (String, Vec<String>) = match kind {
            BackendKind::Twinsum => {
                run_twinsum(&[
                    "format",
                    "--data",
                    path_str(&img)?,
                    "--meta",
                    path_str(&meta)?,
                    "--size",
                    DISK_SIZE,
                    "--block-size",
                    &block_size.to_string(),
                ])?;
                let mut args: Vec<String> = [
                    "serve",
                    "--socket",
                    path_str(&socket)?,
                    "--data",
                    path_str(&img)?,
                    "--meta",
                    path_str(&meta)?,
                    "--stage",
                    path_str(&stage)?,
                ]
                .iter()
                .map(|a| a.to_string())
                .collect();
                args.extend(serve_args.iter().map(|a| a.to_string()));
                before_serve(&img, &meta)?;
                (env!("CARGO_BIN_EXE_twinsum").to_owned(), args)
            }
            BackendKind::StorageDaemon => {
                File::create(&img)
                    .and_then(|f| f.set_len(DISK_BYTES))
                    .map_err(|e| format!("cannot create {}: {e}", img.display()))?;
                let args = vec![
                    "--blockdev".to_owned(),
                    format!("driver=file,node-name=f,filename={}", path_str(&img)?),
                    "--export".to_owned(),
                    format!(
                        "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},\
                         writable=on,num-queues=2",
                        path_str(&socket)?
                    ),
                ];
                (STORAGE_DAEMON.to_owned(), args)
            }
        };
        let (child, log) = spawn_backend(kind, &program, &args)?;
        let mut backend = Backend {
            kind,
            _dir: dir,
            _shm: shm,
            stage,
            img,
            meta,
            socket,
            child,
            log,
            program,
            args,
            past_logs: String::new(),
        };
        backend.wait_listening()?;
        Ok(backend)
    }

    pub fn is_twinsum(&self) -> bool {
        self.kind == BackendKind::Twinsum
    }

    /// Poll until the socket is in the listening state. Connecting to find
    /// out would look like a front-end that came and went (which twinsum
    /// treats as a shutdown signal), so read /proc/net/unix instead.
    fn wait_listening(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + BACKEND_TIMEOUT;
        let want = self.socket.to_string_lossy().into_owned();
        loop {
            let table = fs::read_to_string("/proc/net/unix").unwrap_or_default();
            // Columns: Num RefCount Protocol Flags Type St Inode Path;
            // flag 0x10000 is __SO_ACCEPTCON, set by listen().
            let listening = table.lines().any(|line| {
                let cols: Vec<&str> = line.split_whitespace().collect();
                cols.len() >= 8 && cols[7] == want && cols[3] == "00010000"
            });
            if listening {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("backend exited before listening: {status}"));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "backend did not listen on {want} in {BACKEND_TIMEOUT:?}"
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        self.log.text()
    }

    /// Wait until a line of the log at or after byte `from` satisfies
    /// `pred`; return the end of that line (to search after it next time).
    pub fn wait_log_line(
        &self,
        what: &str,
        from: usize,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<usize, String> {
        self.log.wait(what, timeout, |text, closed| {
            let mut pos = from.min(text.len());
            for line in text[pos..].split_inclusive('\n') {
                pos += line.len();
                if line.ends_with('\n') && pred(line) {
                    return Some(Ok(pos));
                }
            }
            closed.then(|| Err(format!("backend exited while waiting for {what}")))
        })
    }

    /// The backend process has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Send `sig` to the backend.
    pub fn signal(&mut self, sig: libc::c_int) -> Result<(), String> {
        if !self.is_running() {
            return Err(format!("cannot send signal {sig}: the backend has exited"));
        }
        let pid = libc::pid_t::try_from(self.child.id()).map_err(|e| e.to_string())?;
        // SAFETY: kill(2) takes plain integers; `pid` is our own child, which
        // has not been reaped yet (we hold its `Child`), so it names no
        // other process.
        let rc = unsafe { libc::kill(pid, sig) };
        if rc != 0 {
            return Err(format!("kill({sig}): {}", std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// SIGTERM, then wait for the exit.
    pub fn terminate(&mut self) -> Result<ExitStatus, String> {
        self.signal(libc::SIGTERM)?;
        wait_child(&mut self.child, BACKEND_TIMEOUT)
            .ok_or_else(|| format!("backend still running {BACKEND_TIMEOUT:?} after SIGTERM"))
    }

    /// Stop the backend with `sig` (SIGKILL: it dies at once; SIGTERM: an
    /// orderly stop, as for an upgrade), start it again on the same disk
    /// and stage, and wait until it listens. Its log starts afresh; the old
    /// one is kept for the transcript.
    pub fn restart(&mut self, sig: libc::c_int) -> Result<ExitStatus, String> {
        self.signal(sig)?;
        let status = wait_child(&mut self.child, BACKEND_TIMEOUT).ok_or_else(|| {
            format!("backend still running {BACKEND_TIMEOUT:?} after signal {sig}")
        })?;
        let _ = write!(
            self.past_logs,
            "{}\n[ended with {status}; restarted]\n",
            self.log()
        );
        let (child, log) = spawn_backend(self.kind, &self.program, &self.args)?;
        self.child = child;
        self.log = log;
        self.wait_listening()?;
        Ok(status)
    }

    /// Flip every bit of the byte at `offset` of the data image, behind the
    /// backend's back (it reads with pread, so it sees the change at once).
    pub fn corrupt_byte(&self, offset: u64) -> Result<(), String> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.img)
            .map_err(|e| format!("open {}: {e}", self.img.display()))?;
        let mut byte = [0u8; 1];
        file.read_exact_at(&mut byte, offset)
            .and_then(|()| file.write_all_at(&[!byte[0]], offset))
            .and_then(|()| file.sync_data())
            .map_err(|e| format!("corrupting byte {offset}: {e}"))
    }

    /// Write the console and the backend log to
    /// `target/tmp/guest-logs/NAME.log`; return that path.
    fn save_logs(&self, name: &str, console: &str) -> PathBuf {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("guest-logs");
        let _ = fs::create_dir_all(&dir);
        let path = dir.join(format!("{name}.log"));
        let mut text = format!(
            "== console ==\n{console}\n== backend ({:?}) ==\n",
            self.kind
        );
        text.push_str(&self.past_logs);
        text.push_str(&self.log());
        let _ = fs::write(&path, text);
        path
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn path_str(p: &Path) -> Result<&str, String> {
    p.to_str()
        .ok_or_else(|| format!("non-UTF-8 path {}", p.display()))
}

/// Run a short `twinsum` subcommand; its stdout, or an error with stderr.
pub fn run_twinsum(args: &[&str]) -> Result<String, String> {
    let out = Command::new(env!("CARGO_BIN_EXE_twinsum"))
        .args(args)
        .output()
        .map_err(|e| format!("cannot run twinsum: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "twinsum {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Poll a child until it exits or `timeout` passes.
fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// A QEMU guest whose serial console is piped to us, both ways.
struct Guest {
    child: Child,
    stdin: Option<ChildStdin>,
    console: Arc<Captured>,
}

impl Guest {
    /// Boot the test image with `twinsum.test=TEST` against `socket`. With
    /// `allow_reboot`, a guest reboot resets the machine (and the device)
    /// instead of ending QEMU.
    /// With `reconnect`, QEMU reconnects to the socket (every second) when
    /// the backend goes away, as one runs a back-end that may restart.
    fn boot(
        socket: &Path,
        test: &str,
        allow_reboot: bool,
        reconnect: bool,
    ) -> Result<Self, String> {
        let (kernel, initrd) = guest_images()?;
        let mut cmd = Command::new(QEMU);
        cmd.args(["-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "512M"])
            // vhost-user needs guest RAM that the backend can map.
            .args(["-object", "memory-backend-memfd,id=mem,size=512M,share=on"])
            .args(["-numa", "node,memdev=mem"])
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .args(["-serial", "stdio", "-monitor", "none"])
            .arg("-kernel")
            .arg(&kernel)
            .arg("-initrd")
            .arg(&initrd)
            // quiet keeps the console short but still shows kernel errors;
            // panic=-1 turns a guest panic into an immediate reset.
            .arg("-append")
            .arg(format!("console=ttyS0 quiet panic=-1 twinsum.test={test}"))
            .arg("-chardev")
            .arg(format!(
                "socket,id=disk,path={}{}",
                path_str(socket)?,
                if reconnect { ",reconnect=1" } else { "" }
            ))
            .args(["-device", "vhost-user-blk-pci,chardev=disk,num-queues=2"]);
        if !allow_reboot {
            cmd.arg("-no-reboot");
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {QEMU}: {e}"))?;
        let stdin = child.stdin.take();
        let console = Captured::spawn(child.stdout.take().ok_or("no stdout pipe")?);
        // QEMU's own errors (socket refused, bad option) go to stderr; keep
        // them in the same transcript.
        let stderr = child.stderr.take().ok_or("no stderr pipe")?;
        let sink = Arc::clone(&console);
        thread::spawn(move || {
            let mut text = String::new();
            let mut stderr = stderr;
            let _ = stderr.read_to_string(&mut text);
            if !text.is_empty() {
                let mut state = sink.state.lock().unwrap_or_else(|e| e.into_inner());
                let _ = write!(state.text, "\n[qemu stderr] {text}");
                sink.grew.notify_all();
            }
        });
        Ok(Guest {
            child,
            stdin,
            console,
        })
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One guest test: a backend, the guest(s) booted against it, and a failure
/// path that dumps both transcripts.
pub struct Session {
    name: String,
    pub backend: Backend,
    guest: Option<Guest>,
    /// Console text of guests that already exited, for the failure dump.
    old_consoles: String,
    /// Where in the console the next marker search starts.
    cursor: usize,
}

impl Session {
    /// Start the backend for test `name` on a disk of 4 KiB blocks, or
    /// return `None` (after saying so) when QEMU is not installed.
    pub fn start(name: &str) -> Option<Self> {
        Self::start_with_block_size(name, 4096)
    }

    /// `start`, with twinsum's block size (and so the guest's logical block
    /// size) set to `block_size`.
    pub fn start_with_block_size(name: &str, block_size: u32) -> Option<Self> {
        Self::start_with(name, block_size, &[])
    }

    /// `start_with_block_size`, with `serve_args` added to `twinsum serve`
    /// (ignored for qemu-storage-daemon).
    pub fn start_with(name: &str, block_size: u32, serve_args: &[&str]) -> Option<Self> {
        Self::start_prepared(name, block_size, serve_args, Box::new(|_, _| Ok(())))
    }

    /// `start_with`, running `before_serve` on the formatted IMG and META
    /// before twinsum serves them (twinsum only).
    pub fn start_prepared(
        name: &str,
        block_size: u32,
        serve_args: &[&str],
        before_serve: BeforeServe,
    ) -> Option<Self> {
        if find_in_path(QEMU).is_none() {
            eprintln!(
                "SKIPPED guest test {name}: {QEMU} is not installed \
                 (apt-get install qemu-system-x86)"
            );
            return None;
        }
        let kind = BackendKind::from_env();
        let backend = Backend::start(kind, block_size, serve_args, before_serve)
            .unwrap_or_else(|e| panic!("guest test {name}: backend failed to start: {e}"));
        if kind != BackendKind::Twinsum {
            eprintln!(
                "note: guest test {name} runs against {STORAGE_DAEMON}; \
                 twinsum-specific checks are skipped"
            );
        }
        Some(Session {
            name: name.to_owned(),
            backend,
            guest: None,
            old_consoles: String::new(),
            cursor: 0,
        })
    }

    /// Print both transcripts and fail the test.
    pub fn fail(&self, msg: impl std::fmt::Display) -> ! {
        let console = self.console();
        let saved = self.backend.save_logs(&self.name, &console);
        panic!(
            "guest test {}: {msg}\n--- console (last {TAIL_LINES} lines) ---\n{}\n\
             --- backend log (last {TAIL_LINES} lines) ---\n{}\n--- full transcripts: {} ---",
            self.name,
            tail(&console, TAIL_LINES),
            tail(&self.backend.log(), TAIL_LINES),
            saved.display()
        );
    }

    /// Unwrap a step's result, or fail with both transcripts.
    pub fn check<T>(&self, result: Result<T, String>) -> T {
        result.unwrap_or_else(|e| self.fail(e))
    }

    fn console(&self) -> String {
        let current = self
            .guest
            .as_ref()
            .map(|g| g.console.text())
            .unwrap_or_default();
        format!("{}{current}", self.old_consoles)
    }

    fn guest(&self) -> &Guest {
        self.guest
            .as_ref()
            .unwrap_or_else(|| self.fail("no guest is running"))
    }

    /// Boot a guest running `test` (see `Guest::boot`) and wait for it to
    /// start the test.
    pub fn boot(&mut self, test: &str, allow_reboot: bool) {
        self.boot_with(test, allow_reboot, false);
    }

    /// `boot`, with QEMU reconnecting to a restarted backend (`reconnect=1`).
    pub fn boot_reconnecting(&mut self, test: &str) {
        self.boot_with(test, false, true);
    }

    fn boot_with(&mut self, test: &str, allow_reboot: bool, reconnect: bool) {
        if let Some(old) = self.guest.take() {
            self.old_consoles.push_str(&old.console.text());
        }
        let guest = Guest::boot(&self.backend.socket, test, allow_reboot, reconnect);
        self.guest = Some(self.check(guest));
        self.cursor = 0;
        self.wait_marker(&format!("START {test}"));
    }

    /// Wait for `@@TWINSUM MARKER@@` after the previous marker. A FAIL
    /// marker, a kernel panic or QEMU exiting first fail the test at once.
    pub fn wait_marker(&mut self, marker: &str) {
        let needle = format!("@@TWINSUM {marker}@@");
        let from = self.cursor;
        let backend_log = &self.backend.log;
        let result = self
            .guest()
            .console
            .wait(&needle, STEP_TIMEOUT, |text, closed| {
                let rest = &text[from.min(text.len())..];
                if let Some(at) = rest.find(&needle) {
                    return Some(Ok(from + at + needle.len()));
                }
                if let Some(at) = rest.find("@@TWINSUM FAIL") {
                    // Report the whole marker, once its closing @@ arrived.
                    let fail = &rest[at..];
                    if let Some(end) = fail[2..].find("@@") {
                        let marker = &fail[..end + 4];
                        return Some(Err(format!(
                            "guest reported {marker} (waiting for {needle})"
                        )));
                    }
                }
                if rest.contains("Kernel panic") {
                    return Some(Err(format!("guest kernel panicked (waiting for {needle})")));
                }
                if closed {
                    return Some(Err(format!("QEMU exited while waiting for {needle}")));
                }
                // A dead backend leaves the guest hanging in I/O: say so now
                // rather than at the timeout.
                backend_log
                    .has_closed()
                    .then(|| Err(format!("the backend exited while waiting for {needle}")))
            });
        self.cursor = self.check(result);
    }

    /// Answer the guest's `wait_host WHAT` (after its `WAIT WHAT` marker)
    /// with the console line `host:WHAT ARGS`.
    pub fn reply(&mut self, what: &str, args: &str) {
        let line = format!("host:{what} {args}\n");
        let sent = match self.guest.as_mut().and_then(|g| g.stdin.as_mut()) {
            Some(stdin) => stdin
                .write_all(line.as_bytes())
                .and_then(|()| stdin.flush())
                .map_err(|e| format!("writing to the guest console: {e}")),
            None => Err("no guest console to write to".to_owned()),
        };
        self.check(sent);
    }

    /// Pull the plug: SIGKILL the running QEMU (no shutdown of any kind
    /// reaches the guest or the backend) and wait for it to go.
    pub fn kill_guest(&mut self) {
        let Some(mut guest) = self.guest.take() else {
            self.fail("no guest to kill");
        };
        let _ = guest.child.kill();
        let _ = guest.child.wait();
        self.old_consoles.push_str(&guest.console.text());
    }

    /// Every complete `@@TWINSUM WHAT ARGS@@` marker the running guest (or,
    /// after `kill_guest`, the guests so far) printed: the ARGS of each.
    pub fn markers(&self, what: &str) -> Vec<String> {
        let start = format!("@@TWINSUM {what} ");
        let console = self.console();
        console
            .match_indices(&start)
            .filter_map(|(at, m)| {
                let rest = &console[at + m.len()..];
                let end = rest.find("@@")?;
                // A marker cut short by the kill has no closing @@ before
                // the next line.
                let args = &rest[..end];
                (!args.contains('\n')).then(|| args.to_owned())
            })
            .collect()
    }

    /// Wait for the test's PASS marker and for QEMU to exit on its own
    /// (the guest powers off after every test).
    pub fn expect_pass_and_poweroff(&mut self, test: &str) {
        self.wait_marker(&format!("PASS {test}"));
        let exited = self
            .guest
            .as_mut()
            .and_then(|g| wait_child(&mut g.child, STEP_TIMEOUT));
        match exited {
            Some(status) if status.success() => {}
            Some(status) => self.fail(format!(
                "QEMU exited with {status} after the guest powered off"
            )),
            None => self.fail(format!("QEMU still running {STEP_TIMEOUT:?} after PASS")),
        }
    }

    /// Log line wait with the session's failure dump.
    pub fn wait_log_line(&self, what: &str, from: usize, pred: impl Fn(&str) -> bool) -> usize {
        let found = self.backend.wait_log_line(what, from, STEP_TIMEOUT, pred);
        self.check(found)
    }
}

impl Drop for Session {
    /// Keep both transcripts of every run (passed or not) for inspection.
    fn drop(&mut self) {
        self.backend.save_logs(&self.name, &self.console());
    }
}

impl Session {
    /// Stop the backend with SIGTERM; for twinsum, also require that it
    /// exits 0, that `info` calls the metadata clean, that no write-back
    /// stage is left behind, and that `check` finds
    /// every block of IMG matching its metadata (what the guest left behind
    /// is consistent, not just readable).
    pub fn stop_and_verify_metadata(&mut self) {
        let terminated = self.backend.terminate();
        let status = self.check(terminated);
        if !self.backend.is_twinsum() {
            return;
        }
        if !status.success() {
            self.fail(format!("twinsum exited with {status} after SIGTERM"));
        }
        let info = self.check(twinsum_info(&self.backend.meta));
        if info.get("clean") != Some(&serde_json::Value::Bool(true)) {
            self.fail(format!("metadata not clean after SIGTERM: {info}"));
        }
        if self.backend.stage.exists() {
            self.fail(format!(
                "SIGTERM left the write-back stage {} behind",
                self.backend.stage.display()
            ));
        }
        let (img, meta) = (&self.backend.img, &self.backend.meta);
        let checked = path_str(img).and_then(|img| {
            run_twinsum(&["check", "--data", img, "--meta", path_str(meta)?, "--json"])
        });
        let report = self.check(checked);
        if !report.contains("\"mismatches\":[]") {
            self.fail(format!("twinsum check after the guest run: {report}"));
        }
    }
}

impl Session {
    /// `e2fsck -fn IMG` on the host, after the backend stopped; skipped with
    /// a note if the host has no e2fsck.
    pub fn host_fsck(&self) -> Result<(), String> {
        let Some(e2fsck) = find_in_path("e2fsck").or_else(|| {
            let sbin = PathBuf::from("/sbin/e2fsck");
            sbin.is_file().then_some(sbin)
        }) else {
            eprintln!("note: no e2fsck on the host; image not checked from the host side");
            return Ok(());
        };
        let out = Command::new(e2fsck)
            .arg("-fn")
            .arg(&self.backend.img)
            .output()
            .map_err(|e| format!("cannot run e2fsck: {e}"))?;
        if out.status.success() {
            return Ok(());
        }
        Err(format!(
            "host e2fsck -fn of the image failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The block size twinsum formatted the disk with (`info --json`).
pub fn twinsum_block_size(meta: &Path) -> Result<u64, String> {
    let info = twinsum_info(meta)?;
    info.get("block_size")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| format!("no block_size in info output {info}"))
}

/// `twinsum info --meta META --json`, parsed.
pub fn twinsum_info(meta: &Path) -> Result<serde_json::Value, String> {
    let out = run_twinsum(&["info", "--meta", path_str(meta)?, "--json"])?;
    serde_json::from_str(&out).map_err(|e| format!("info --json printed no JSON ({e}): {out}"))
}

/// `line` names block `block` as a whole number (not as part of another).
pub fn mentions_number(line: &str, block: u64) -> bool {
    let want = block.to_string();
    line.split(|c: char| !c.is_ascii_digit())
        .any(|word| word == want)
}
