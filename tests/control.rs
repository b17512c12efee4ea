//! The control socket of a running `twinsum serve --control PATH`: status,
//! the online scrub, and the signals as commands, over the real sockets
//! with a libblkio client doing I/O at the same time.

mod common {
    pub mod client;
    pub mod content;
    pub mod disk;
    pub mod run;
}

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::client::Client;
use common::content::pattern;
use common::disk::{twinsum, Daemon, Disk};
use common::run::{poll, s};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
const BS: u64 = 4096;

/// A raw control connection: one JSON line out, one in.
struct Ctl {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Ctl {
    fn connect(path: &Path) -> Self {
        let stream = UnixStream::connect(path).expect("connect to the control socket");
        stream
            .set_read_timeout(Some(common::run::DEADLINE))
            .expect("timeout");
        Self {
            writer: stream.try_clone().expect("clone"),
            reader: BufReader::new(stream),
        }
    }

    /// Send raw bytes, read one reply line.
    fn raw(&mut self, bytes: &[u8]) -> Value {
        self.writer.write_all(bytes).expect("send");
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("reply");
        assert!(line.ends_with('\n'), "a whole reply line: {line:?}");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"))
    }

    fn call(&mut self, req: Value) -> Value {
        self.raw(format!("{req}\n").as_bytes())
    }

    fn ok(&mut self, req: Value) -> Value {
        let r = self.call(req.clone());
        assert_eq!(r["ok"], true, "{req} -> {r}");
        r
    }
}

fn control_path(disk: &Disk) -> PathBuf {
    disk.path("control.sock")
}

fn serve(disk: &Disk, extra: &[&str]) -> Daemon {
    let ctl = control_path(disk);
    let mut args = vec!["--control", s(&ctl)];
    args.extend_from_slice(extra);
    disk.serve(&args)
}

fn cli(disk: &Disk, args: &[&str]) -> Output {
    let ctl = control_path(disk);
    let mut all = args.to_vec();
    all.extend_from_slice(&["--control", s(&ctl)]);
    twinsum(&all)
}

fn json_of(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: stdout {:?}, stderr {:?}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    })
}

fn status(disk: &Disk) -> Value {
    let o = cli(disk, &["status", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    json_of(&o)
}

fn n(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} is not a count in {v}"))
}

/// Content `k` of `len` bytes at `off`: different for every `k` (the seed
/// of `pattern` only shows above bit 28).
fn content(off: u64, len: usize, k: u64) -> Vec<u8> {
    pattern(off, len, k.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// Write `len` bytes of pattern `seed` at `off` in 1 MiB requests.
fn fill(q: &mut common::client::Queue<'_>, off: u64, len: u64, seed: u64) {
    let mut at = off;
    while at < off + len {
        let n = MIB.min(off + len - at);
        q.write(at, &pattern(at, n as usize, seed)).expect("write");
        at += n;
    }
}

#[test]
fn status_fields_move_as_io_happens() {
    let disk = Disk::new(16 * MIB, BS);
    let d = serve(&disk, &["--queues", "2"]);
    let ctl = control_path(&disk);
    let mode = std::fs::metadata(&ctl)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the control socket is private");

    let mut c = Client::connect(&disk.socket, 2);
    let before = poll("the front-end in status", || {
        let st = status(&disk);
        (st["frontend_connected"] == true).then_some(st)
    });
    assert_eq!(before["queues"], 2);
    assert_eq!(before["clean"], true);
    assert_eq!(before["scrub"], Value::Null);
    for key in ["uptime_s", "pending", "queued", "data_syncs", "meta_syncs"] {
        n(&before, key);
    }

    let mut q = c.q0();
    for i in 0..10 {
        q.write(i * BS, &pattern(i * BS, BS as usize, 1))
            .expect("write");
    }
    // A write counts once the commit thread has moved it out of the
    // write-back stage, which may be just after it completed.
    let mid = poll("the writes in status", || {
        let st = status(&disk);
        (n(&st, "writes") == n(&before, "writes") + 10).then_some(st)
    });
    assert_eq!(mid["clean"], false, "a write marks the metadata dirty");
    q.flush().expect("flush");
    for i in 0..4 {
        q.read(i * BS, BS as usize).expect("read");
    }
    let after = status(&disk);
    assert_eq!(n(&after, "reads"), n(&before, "reads") + 4);
    assert_eq!(n(&after, "flushes"), n(&before, "flushes") + 1);
    assert_eq!(n(&after, "queued"), 0, "a flush drains the stage");
    assert!(n(&after, "data_syncs") > n(&before, "data_syncs"));
    assert!(n(&after, "meta_syncs") > n(&before, "meta_syncs"));
    assert_eq!(after["mismatches"], 0);
    assert_eq!(after["mismatched_blocks"], json!([]));

    // The plain table and the Prometheus text say the same.
    let o = cli(&disk, &["status"]);
    let table = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success());
    assert!(
        table.contains("front-end      connected (2 queues)"),
        "{table}"
    );
    assert!(
        table.contains(&format!("reads          {}\n", n(&after, "reads"))),
        "{table}"
    );
    let o = cli(&disk, &["status", "--prometheus"]);
    let prom = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success());
    assert!(
        prom.contains("# TYPE twinsum_writes_total counter\n"),
        "{prom}"
    );
    assert!(prom.contains(&format!("\ntwinsum_writes_total {}\n", n(&after, "writes"))));
    assert!(prom.contains("\ntwinsum_frontend_connected 1\n"), "{prom}");

    // The front-end goes: the orderly steps show.
    drop(c);
    let gone = poll("the disconnect in status", || {
        let st = status(&disk);
        (st["frontend_connected"] == false && st["clean"] == true).then_some(st)
    });
    assert_eq!(gone["sync_mode"], true);
    assert!(d.terminate().success());
    assert!(!ctl.exists(), "the control socket is removed at exit");
}

#[test]
fn a_scrub_finds_a_flipped_byte_while_the_guest_writes_elsewhere() {
    let disk = Disk::new(64 * MIB, BS);
    let d = serve(&disk, &[]);
    let mut c = Client::connect(&disk.socket, 2);
    let mut queues = c.queues();
    let mut other = queues.pop().expect("queue 1");
    let mut q = queues.pop().expect("queue 0");
    fill(&mut q, 0, 16 * MIB, 3);
    q.flush().expect("flush");
    // In IMG, not only in the stage, before we damage it.
    poll("an empty stage", || {
        (n(&status(&disk), "queued") == 0).then_some(())
    });
    const BAD: u64 = 1234;
    disk.flip_byte(BAD * BS + 77);

    let stop = AtomicBool::new(false);
    let written = AtomicU64::new(0);
    let o = thread::scope(|sc| {
        sc.spawn(|| {
            // The guest keeps writing (and reading back) far from the damage.
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) || k < 8 {
                let off = 32 * MIB + (k % 64) * 64 * 1024;
                let data = content(off, 64 * 1024, k);
                other.write(off, &data).expect("write during the scrub");
                assert_eq!(other.read(off, data.len()).expect("read"), data);
                written.fetch_add(1, Ordering::Relaxed);
                k += 1;
            }
            other.flush().expect("flush");
        });
        let o = cli(&disk, &["scrub", "--rate", "0", "--wait", "--json"]);
        stop.store(true, Ordering::Relaxed);
        o
    });
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let r = json_of(&o);
    assert_eq!(r["state"], "done", "{r}");
    assert_eq!(r["mismatches"], json!([BAD]), "{r}");
    assert_eq!(r["mismatch_count"], 1);
    assert_eq!(r["position"], r["blocks"]);
    assert!(written.load(Ordering::Relaxed) >= 8);
    let st = status(&disk);
    assert_eq!(st["mismatched_blocks"], json!([BAD]));
    assert_eq!(st["mismatches"], 1);
    assert_eq!(st["scrub"]["state"], "done");
    assert_eq!(st["scrub"]["mismatch_count"], 1);
    assert!(
        d.log()
            .contains(&format!("checksum mismatch in block {BAD} ")),
        "logged like a failed read"
    );
    // The guest's own read of that block fails, as it always did.
    assert_eq!(q.read(BAD * BS, BS as usize), Err(-libc::EIO));

    // Text output names the block too.
    let o = cli(&disk, &["scrub", "--rate", "0", "--wait"]);
    assert_eq!(o.status.code(), Some(1));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.starts_with(&format!("block {BAD}: data matches neither checksum\n")),
        "{text}"
    );
    assert!(text.contains(": 1 mismatched"), "{text}");
}

#[test]
fn a_scrub_racing_a_rewriter_finds_nothing_and_check_is_clean_after() {
    // Two queues rewrite every block of the last 2 MiB of the disk over and
    // over, one block per request, each followed by a flush (a data sync,
    // which forgets the old checksums): those blocks' contents and pairs
    // change all the time, while scrubs run back to back. The range comes
    // last, so a scrub that read the pairs of the disk before its data
    // (as an offline check does) would be long out of date there.
    const HALF: u64 = 256;
    const BLOCKS: u64 = 8192;
    const HOT: u64 = BLOCKS - 2 * HALF;
    // On tmpfs, so that flushes are cheap and the rewrites fast.
    let disk = Disk::new_on_tmpfs(BLOCKS * BS, BS);
    let d = serve(&disk, &["--queues", "2"]);
    let mut c = Client::connect(&disk.socket, 2);
    {
        let mut q = c.q0();
        fill(&mut q, 0, BLOCKS * BS, 1);
        q.flush().expect("flush");
    }
    let stop = AtomicBool::new(false);
    let writes = AtomicU64::new(0);
    let mut ctl = Ctl::connect(&control_path(&disk));
    let scrubs = thread::scope(|sc| {
        for (i, mut q) in c.queues().into_iter().enumerate() {
            let (stop, writes) = (&stop, &writes);
            sc.spawn(move || {
                let mut k = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let off = (HOT + i as u64 * HALF + k % HALF) * BS;
                    q.write(off, &content(off, BS as usize, k))
                        .expect("rewrite");
                    q.flush().expect("flush");
                    writes.fetch_add(1, Ordering::Relaxed);
                    k += 1;
                }
            });
        }
        let mut reports = Vec::new();
        let t = Instant::now();
        while reports.len() < 10 || t.elapsed() < Duration::from_secs(2) {
            ctl.ok(json!({"cmd": "scrub", "rate_mib": 0}));
            let p = loop {
                let p = ctl.ok(json!({"cmd": "scrub-status"}))["scrub"].clone();
                if p["state"] != "running" {
                    break p;
                }
                // Leave the CPUs to the scrub and the rewriters.
                thread::sleep(Duration::from_millis(1));
            };
            reports.push(p);
        }
        stop.store(true, Ordering::Relaxed);
        reports
    });
    let writes = writes.load(Ordering::Relaxed);
    assert!(
        writes >= 2 * HALF,
        "only {writes} rewrites beside the scrubs"
    );
    for r in &scrubs {
        assert_eq!(r["state"], "done", "{r}");
        assert_eq!(r["mismatch_count"], 0, "a false mismatch: {r}");
    }
    let st = status(&disk);
    assert_eq!(st["mismatches"], 0);
    // And the product's way of saying it.
    let o = cli(&disk, &["scrub", "--rate", "0", "--wait"]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    drop(c);
    assert!(d.terminate().success());
    let o = disk.check(&[]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn the_rate_holds_over_seconds() {
    const RATE: u64 = 12;
    let disk = Disk::new(48 * MIB, BS);
    let _d = serve(&disk, &[]);
    let mut c = Client::connect(&disk.socket, 1);
    let mut q = c.q0();
    fill(&mut q, 0, 40 * MIB, 5);
    q.flush().expect("flush");

    let mut ctl = Ctl::connect(&control_path(&disk));
    // The test's own clock, from just before the scrub starts.
    let t0 = Instant::now();
    let started = ctl.ok(json!({"cmd": "scrub", "rate_mib": RATE}));
    assert_eq!(started["scrub"]["rate_mib"], RATE);
    // A second scrub while one runs is refused, with one line.
    let o = cli(&disk, &["scrub"]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("scrub #1 is running"), "{err}");

    // Samples of the scrub's progress against that clock: (time since the
    // scrub was started, bytes it had read by then).
    let mut samples = Vec::new();
    let done = loop {
        let p = ctl.ok(json!({"cmd": "scrub-status"}))["scrub"].clone();
        let at = t0.elapsed();
        if p["state"] != "running" {
            break p;
        }
        samples.push((at, n(&p, "bytes_read")));
        thread::sleep(Duration::from_millis(50));
    };
    let total = t0.elapsed();
    assert_eq!(done["state"], "done", "{done}");
    assert_eq!(n(&done, "bytes_read"), 40 * MIB, "only the data, no holes");
    let mib_per_s = |bytes: u64, d: Duration| bytes as f64 / MIB as f64 / d.as_secs_f64();
    // 40 MiB at 12 MiB/s take 3.3 s (the first 1 MiB chunk goes at once);
    // without a throttle they take a few milliseconds.
    let overall = mib_per_s(40 * MIB, total);
    assert!(
        (overall - RATE as f64).abs() <= RATE as f64 * 0.25,
        "{overall:.2} MiB/s overall at --rate {RATE}"
    );
    // And over a window of at least two seconds, after the first half
    // second.
    let first = samples
        .iter()
        .find(|s| s.0 >= Duration::from_millis(500))
        .expect("samples after 0.5 s");
    let last = samples.last().expect("samples");
    let span = last.0 - first.0;
    assert!(span >= Duration::from_secs(2), "only {span:?} measured");
    let window = mib_per_s(last.1 - first.1, span);
    assert!(
        (window - RATE as f64).abs() <= RATE as f64 * 0.25,
        "{window:.2} MiB/s over {span:?} at --rate {RATE}"
    );
}

#[test]
fn scrub_stop_ends_a_running_scrub() {
    let disk = Disk::new(16 * MIB, BS);
    let _d = serve(&disk, &[]);
    let mut c = Client::connect(&disk.socket, 1);
    let mut q = c.q0();
    fill(&mut q, 0, 8 * MIB, 6);
    q.flush().expect("flush");
    let o = cli(&disk, &["scrub", "--rate", "1"]);
    assert!(o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stdout).starts_with("scrub #1 started: 4096 blocks at 1 MiB/s")
    );
    poll("the scrub under way", || {
        (n(&status(&disk)["scrub"], "bytes_read") > 0).then_some(())
    });
    let t = Instant::now();
    let o = cli(&disk, &["scrub", "--stop", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "stopping waited out the pace"
    );
    let r = json_of(&o);
    assert_eq!(r["state"], "stopped");
    assert!(n(&r, "position") < 4096);
    assert_eq!(status(&disk)["scrub"]["state"], "stopped");
    let o = cli(&disk, &["scrub", "--stop"]);
    assert_eq!(o.status.code(), Some(2), "nothing to stop");
    assert!(String::from_utf8_lossy(&o.stderr).contains("no scrub is running"));
}

#[test]
fn a_terabyte_sparse_image_scrubs_reading_only_its_data() {
    let disk = Disk::new(1 << 40, BS);
    let _d = serve(&disk, &[]);
    let mut c = Client::connect(&disk.socket, 1);
    let mut q = c.q0();
    for off in [0, 1 << 39, (1 << 40) - BS] {
        q.write(off, &pattern(off, BS as usize, 7)).expect("write");
    }
    q.flush().expect("flush");
    let o = cli(&disk, &["scrub", "--rate", "0", "--wait", "--json"]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let r = json_of(&o);
    assert_eq!(r["position"], 1u64 << 28, "every block is behind it");
    // Three blocks of data, each in an extent of at most 1 MiB, whatever
    // the filesystem allocates; the 1 TiB of holes cost nothing.
    // (`make bench` times it: well under a second.)
    assert!(n(&r, "bytes_read") >= 3 * BS, "{r}");
    assert!(n(&r, "bytes_read") <= 3 * MIB, "holes are not read: {r}");
}

#[test]
fn garbage_on_the_control_socket_leaves_the_daemon_serving() {
    let disk = Disk::new(4 * MIB, BS);
    let d = serve(&disk, &[]);
    let path = control_path(&disk);
    let mut c = Client::connect(&disk.socket, 1);
    let mut q = c.q0();

    // One connection, many kinds of bad input; each answered, none fatal.
    let mut ctl = Ctl::connect(&path);
    for bad in [
        &b"hello\n"[..],
        b"{\"cmd\":\"format-everything\"}\n",
        b"{\"cmd\":\"scrub\",\"rate_mib\":\"fast\"}\n",
        b"{\"cmd\":\"scrub\",\"rate_mib\":99999999999}\n",
        b"\xff\xfe\x00\x01\n",
        b"{\"cmd\":\"status\"\n",
        b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\n",
        b"{\"cmd\":\"power-cut\"}\n",
        b"{\"cmd\":\"scrub-stop\"}\n",
    ] {
        let r = ctl.raw(bad);
        assert_eq!(r["ok"], false, "{:?} -> {r}", String::from_utf8_lossy(bad));
        assert!(r["error"].as_str().is_some_and(|e| !e.is_empty()), "{r}");
    }
    assert_eq!(ctl.ok(json!({"cmd": "status"}))["frontend_connected"], true);

    // A client that sends nothing, and one that half-sends a megabyte
    // line, hold up neither the others nor the guest.
    let silent = UnixStream::connect(&path).expect("connect");
    let mut long = UnixStream::connect(&path).expect("connect");
    let pid = d.pid();
    let rss = || -> u64 {
        let st = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        let line = st.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS");
        line.split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<u64>()
            .unwrap()
            * 1024
    };
    let rss_before = rss();
    let junk = vec![b'x'; MIB as usize];
    for _ in 0..64 {
        long.write_all(&junk).expect("the daemon keeps reading");
    }
    assert!(
        rss() < rss_before + 16 * MIB,
        "64 MiB without a newline grew the daemon from {} to {} bytes",
        rss_before,
        rss()
    );
    q.write(0, &pattern(0, BS as usize, 9))
        .expect("the guest is served");
    assert_eq!(
        q.read(0, BS as usize).expect("read"),
        pattern(0, BS as usize, 9)
    );
    ctl.ok(json!({"cmd": "status"}));
    // The end of the long line is refused; the same connection goes on.
    let mut long_reader = BufReader::new(long.try_clone().expect("clone"));
    long.write_all(b"\n{\"cmd\":\"status\"}\n").expect("send");
    let mut line = String::new();
    long_reader.read_line(&mut line).expect("reply");
    assert!(line.contains("longer than"), "{line}");
    line.clear();
    long_reader.read_line(&mut line).expect("reply");
    assert!(line.starts_with("{\"ok\":true,"), "{line}");

    // Clients are bounded: the one past the limit is told and closed.
    let mut many: Vec<UnixStream> = Vec::new();
    let refused = loop {
        let mut s = UnixStream::connect(&path).expect("connect");
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .expect("timeout");
        let mut buf = String::new();
        match s.read_to_string(&mut buf) {
            Ok(_) => break buf,
            Err(_) => many.push(s),
        }
        assert!(many.len() < 64, "no limit on clients");
    };
    assert!(refused.contains("too many control clients"), "{refused}");
    drop(many);
    drop(silent);
    // Until the daemon has seen the closes, a new client may still be
    // refused and closed, even before its request is sent: try again.
    poll("a client slot again", || {
        let mut s = UnixStream::connect(&path).ok()?;
        s.write_all(b"{\"cmd\":\"status\"}\n").ok()?;
        let mut line = String::new();
        BufReader::new(&mut s).read_line(&mut line).ok()?;
        line.starts_with("{\"ok\":true,").then_some(())
    });
    q.flush().expect("flush");
    drop(c);
    let log = d.log();
    assert!(d.terminate().success(), "{log}");
}

#[test]
fn sync_mode_and_power_cut_answer_and_the_signals_still_work() {
    let disk = Disk::new(4 * MIB, BS);
    let ctl = control_path(&disk);
    // A stale control socket from a dead twinsum is replaced.
    drop(UnixListener::bind(&ctl).expect("bind"));
    let d = serve(&disk, &["--volatile-cache", "--power-cut-seed", "7"]);
    let mut c = Client::connect(&disk.socket, 1);
    c.q0().write(0, &pattern(0, BS as usize, 1)).expect("write");

    let o = cli(&disk, &["sync-mode", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(json_of(&o), json!({"sync_mode": true, "readonly": false}));
    assert_eq!(status(&disk)["sync_mode"], true);
    d.wait_for_log("control socket: metadata is now written synchronously");

    let o = cli(&disk, &["power-cut", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cut = &json_of(&o)["power_cut"];
    assert_eq!(cut["number"], 1);
    assert_eq!(cut["seed"], 7);
    assert_eq!(cut["data_unit"], BS);
    d.wait_for_log("power cut #1: seed 7, ");
    let st = status(&disk);
    assert_eq!(st["power_cuts"], 1);
    assert_eq!(st["writes"], 0, "a fresh engine after the cut");
    // The front-end of the cut disk gets errors; SIGUSR2 still cuts.
    assert!(c.q0().read(0, BS as usize).is_err());
    drop(c);
    d.signal(libc::SIGUSR2);
    d.wait_for_log("power cut #2: seed 8, ");
    assert_eq!(status(&disk)["power_cuts"], 2);
    let o = cli(&disk, &["power-cut"]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("power cut #3: seed 9, kept "));
    let mut c = Client::connect(&disk.socket, 1);
    c.q0()
        .read(0, BS as usize)
        .expect("the next front-end is served");
    drop(c);
    assert!(d.terminate().success());
    assert!(!ctl.exists());
}

#[test]
fn without_volatile_cache_power_cut_is_refused_and_control_must_differ_from_socket() {
    let disk = Disk::new(MIB, BS);
    let d = serve(&disk, &["--readonly"]);
    let o = cli(&disk, &["power-cut"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("needs serve --volatile-cache"));
    let o = cli(&disk, &["sync-mode", "--json"]);
    assert_eq!(json_of(&o), json!({"sync_mode": false, "readonly": true}));
    assert!(d.terminate().success());
    let o = twinsum(&[
        "serve",
        "--socket",
        s(&disk.socket),
        "--control",
        s(&disk.socket),
        "--data",
        s(&disk.data),
        "--meta",
        s(&disk.meta),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--control must name another path"));
    let o = twinsum(&["status", "--control", s(&control_path(&disk))]);
    assert_eq!(o.status.code(), Some(2), "no daemon there");
}
