//! `make run` prints a QEMU and a cloud-hypervisor line for the disk it
//! serves. These tests run `scripts/run-demo.sh` itself (in a scratch
//! directory) and use what it printed, so the lines cannot drift from what
//! is tested: QEMU must accept every option of its line and connect to the
//! twinsum the script started; the cloud-hypervisor line (cloud-hypervisor
//! is not installed here) must ask for as many boot vCPUs as queues.

mod common {
    pub mod run;
}

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use common::run::{bin, poll, s};

const QEMU: &str = "qemu-system-x86_64";
/// QEMU takes well under a second to parse its options and connect.
const QEMU_TIMEOUT: Duration = Duration::from_secs(20);

/// `scripts/run-demo.sh` running in a scratch directory: the twinsum it
/// exec'd, with the script's stdout and the daemon's log in files.
struct Demo {
    dir: tempfile::TempDir,
    child: Child,
    stdout: PathBuf,
    log: PathBuf,
}

impl Demo {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let stdout = dir.path().join("stdout");
        let log = dir.path().join("serve.log");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/run-demo.sh");
        let child = Command::new(script)
            .env("TWINSUM_BIN", bin())
            .env("DEMO_DIR", dir.path().join("demo"))
            .env("SOCKET", dir.path().join("twinsum.sock"))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(File::create(&stdout).expect("stdout file"))
            .stderr(File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn scripts/run-demo.sh");
        let mut demo = Self {
            dir,
            child,
            stdout,
            log,
        };
        // The "serving" line comes after the socket listens: a front-end
        // started from then on connects.
        poll("twinsum serve to listen", || {
            if let Ok(Some(st)) = demo.child.try_wait() {
                panic!("run-demo.sh exited with {st}: {}", demo.log());
            }
            demo.log().contains(" serving ").then_some(())
        });
        demo
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn printed(&self) -> String {
        fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    /// The arguments of the command the script printed after the line
    /// starting with `heading`, up to its `...`.
    fn command(&self, heading: &str) -> Vec<String> {
        let printed = self.printed();
        let mut lines = printed.lines().skip_while(|l| !l.starts_with(heading));
        assert!(lines.next().is_some(), "no {heading:?} in:\n{printed}");
        let words: Vec<String> = lines
            .map(str::trim)
            .take_while(|l| *l != "...")
            .flat_map(|l| l.trim_end_matches('\\').split_whitespace())
            .map(str::to_owned)
            .collect();
        assert!(
            !words.is_empty(),
            "empty {heading:?} command in:\n{printed}"
        );
        words
    }

    /// SIGTERM the daemon (the script exec'd it) and expect a clean exit.
    fn stop(mut self) {
        // SAFETY: kill has no memory effects; the pid is our own child,
        // which we have not yet waited for.
        let rc = unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill failed");
        let st = poll("twinsum serve to exit", || {
            self.child.try_wait().ok().flatten()
        });
        assert!(
            st.success(),
            "twinsum serve exited with {st}: {}",
            self.log()
        );
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A child killed if the test fails while it runs.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn have_qemu() -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(QEMU).is_file()))
}

/// The value of `key=` in a comma-separated option list.
fn sub_option<'a>(list: &'a str, key: &str) -> Option<&'a str> {
    list.split(',')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

/// The word after `flag` in `words`.
fn arg_of<'a>(words: &'a [String], flag: &str) -> Option<&'a str> {
    let i = words.iter().position(|w| w == flag)?;
    words.get(i + 1).map(String::as_str)
}

#[test]
fn printed_qemu_line_is_accepted_and_connects() {
    if !have_qemu() {
        eprintln!("SKIPPED: {QEMU} is not installed (apt-get install qemu-system-x86)");
        return;
    }
    let demo = Demo::start();
    let words = demo.command("QEMU:");
    assert_eq!(words[0], QEMU, "the QEMU line runs {}", words[0]);
    let qemu_log = demo.dir.path().join("qemu.log");
    // -S: the vCPUs never start, but every option is parsed and every
    // device created (vhost-user-blk-pci does its vhost-user handshake
    // then) before QEMU's main loop answers QMP on stdio.
    let mut qemu = Reaped(
        Command::new(QEMU)
            .args(&words[1..])
            .args(["-S", "-display", "none", "-nodefaults", "-no-user-config"])
            .args(["-monitor", "none", "-serial", "none", "-qmp", "stdio"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(File::create(&qemu_log).expect("qemu log"))
            .spawn()
            .expect("spawn qemu"),
    );
    let mut to_qemu = qemu.0.stdin.take().expect("qemu stdin");
    let from_qemu = BufReader::new(qemu.0.stdout.take().expect("qemu stdout"));
    let (tx, rx) = mpsc::channel();
    // A thread, so that a QEMU that neither answers nor exits times out.
    thread::spawn(move || {
        for line in from_qemu.lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let _ = to_qemu
        .write_all(b"{\"execute\": \"qmp_capabilities\"}\n{\"execute\": \"query-status\"}\n");
    let deadline = Instant::now() + QEMU_TIMEOUT;
    let status = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains("\"status\"") => break Ok(line),
            Ok(_) => continue,
            Err(e) => break Err(e),
        }
    };
    let mut refused = |why: String| -> ! {
        let _ = qemu.0.kill();
        let st = qemu.0.wait();
        let said = fs::read_to_string(&qemu_log).unwrap_or_default();
        panic!(
            "QEMU did not start with the line run-demo.sh prints ({why}, {st:?}):\n{said}\n\
             line: {}",
            words.join(" ")
        );
    };
    match status {
        Ok(line) if line.contains("prelaunch") => {}
        Ok(line) => refused(format!("status {line}")),
        Err(RecvTimeoutError::Timeout) => refused(format!("no answer in {QEMU_TIMEOUT:?}")),
        Err(RecvTimeoutError::Disconnected) => refused("it exited".into()),
    }
    assert!(
        demo.log().contains("front-end connected"),
        "QEMU started but twinsum saw no front-end:\n{}",
        demo.log()
    );
    let _ = to_qemu.write_all(b"{\"execute\": \"quit\"}\n");
    let st = poll("QEMU to quit", || qemu.0.try_wait().ok().flatten());
    assert!(st.success(), "QEMU quit with {st}");
    demo.stop();
}

#[test]
fn printed_cloud_hypervisor_line_boots_a_vcpu_per_queue() {
    let demo = Demo::start();
    let words = demo.command("cloud-hypervisor");
    assert_eq!(words[0], "cloud-hypervisor");
    // What the daemon says it serves, and the ring limit it was started
    // with (the script exec'd it: same pid), not what the script meant.
    let log = demo.log();
    let served: u32 = log
        .split(" queue(s)")
        .next()
        .and_then(|head| head.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no queue count in the log:\n{log}"));
    let cmdline = fs::read(format!("/proc/{}/cmdline", demo.child.id())).expect("cmdline");
    let serve_args: Vec<String> = cmdline
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let limit: u32 = arg_of(&serve_args, "--queue-size")
        .map_or(Some(1024), |v| v.parse().ok())
        .expect("serve --queue-size is a number");

    let num = |list: &str, key: &str| -> u32 {
        sub_option(list, key)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key}= in {list}"))
    };
    let cpus = arg_of(&words, "--cpus").expect("the cloud-hypervisor line has --cpus");
    let disk = arg_of(&words, "--disk").expect("the cloud-hypervisor line has --disk");
    assert_eq!(
        num(disk, "num_queues"),
        served,
        "num_queues vs served queues"
    );
    assert_eq!(
        num(cpus, "boot"),
        served,
        "cloud-hypervisor needs a boot vCPU per queue"
    );
    let ring = num(disk, "queue_size");
    assert!(
        ring.is_power_of_two() && ring <= limit,
        "queue_size={ring}, serve --queue-size {limit}"
    );
    let socket = demo.dir.path().join("twinsum.sock");
    assert_eq!(sub_option(disk, "socket"), Some(s(&socket)));
    demo.stop();
}
