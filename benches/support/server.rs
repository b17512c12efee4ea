//! Spawning, watching and stopping the vhost-user-blk servers under test.

use std::fs::{self, File};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A running server. Dropping it stops the process (SIGTERM, then SIGKILL
/// after a grace period), so servers never outlive a failed or panicking
/// bench.
pub struct Server {
    pub name: &'static str,
    pub socket: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Server {
    /// Start `cmd` with its output in `log`, and wait until it has created
    /// `socket`.
    ///
    /// Readiness is the socket file existing, deliberately not a probing
    /// connect: a vhost-user backend may serve only one front-end, and may
    /// treat a disconnect as "the guest went away" (twinsum switches to
    /// synchronous metadata then), which would skew what we measure.
    pub fn spawn(name: &'static str, mut cmd: Command, socket: &Path, log: &Path) -> Result<Self> {
        let _ = fs::remove_file(socket);
        let out = File::create(log).with_context(|| format!("create {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        // SAFETY: the closure runs in the child between fork and exec and
        // only calls prctl(2), which is async-signal-safe. It makes the
        // kernel kill the server if the bench dies without running Drop
        // (SIGKILL, Ctrl-C with the default handler).
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("{name}: cannot start {:?}", cmd.get_program()))?;
        let mut server = Server {
            name,
            socket: socket.to_path_buf(),
            log: log.to_path_buf(),
            child: Some(child),
        };
        server.wait_for_socket(Duration::from_secs(20))?;
        Ok(server)
    }

    fn wait_for_socket(&mut self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        let mut pause = Duration::from_millis(1);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait()? {
                self.child = None;
                bail!(
                    "{} exited ({status}) before creating its socket: {}",
                    self.name,
                    self.log_tail()
                );
            }
            if fs::metadata(&self.socket)
                .map(|m| m.file_type().is_socket())
                .unwrap_or(false)
            {
                return Ok(());
            }
            if start.elapsed() > timeout {
                bail!(
                    "{} did not create {} within {timeout:?}: {}",
                    self.name,
                    self.socket.display(),
                    self.log_tail()
                );
            }
            thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is still running (a crash mid-run must be
    /// reported as such, not as a slow server).
    pub fn alive(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The last lines of the server's log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().rev().take(5).collect();
        if lines.is_empty() {
            format!("(log {} is empty)", self.log.display())
        } else {
            let mut lines = lines;
            lines.reverse();
            format!("log {}: {}", self.log.display(), lines.join(" | "))
        }
    }

    /// CPU time (user + system, all threads) the server has used so far.
    pub fn cpu_time(&self) -> Option<Duration> {
        self.pid().and_then(cpu_time_of)
    }

    /// Orderly stop: SIGTERM (twinsum writes back its metadata and marks it
    /// clean), SIGKILL if it takes longer than `grace`. Returns the exit
    /// status if the process exited on its own accord.
    pub fn stop(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        // SAFETY: kill(2) on the pid of our own child, which we have not
        // reaped yet, so the pid cannot have been reused.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let start = Instant::now();
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if start.elapsed() < grace => thread::sleep(Duration::from_millis(10)),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return None;
                }
            }
        }
    }
}

impl Server {
    /// twinsum's exit summary (`stopped: ... data syncs ...`) from the log
    /// of a stopped server: the first thing to look at when writes are slow.
    pub fn exit_summary(&self) -> Option<String> {
        let log = fs::read_to_string(&self.log).ok()?;
        let line = log.lines().rev().find(|l| l.contains("stopped:"))?;
        let at = line.find("stopped:").unwrap_or(0);
        Some(line[at..].to_string())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
        let _ = fs::remove_file(&self.socket);
    }
}

/// utime + stime of a process from /proc/PID/stat.
/// Peak resident set size of process `pid` (VmHWM), in bytes.
pub fn peak_rss_of(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib << 10)
}

pub fn cpu_time_of(pid: u32) -> Option<Duration> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; fields after the
    // closing parenthesis are plain. utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(Duration::from_micros((utime + stime) * 1_000_000 / hz))
}

/// The 1-minute load average, to print next to the figures: the machine is
/// shared, and a busy neighbour makes every number here meaningless.
pub fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}
