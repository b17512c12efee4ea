//! `make bench`, part 2: twinsum against qemu-storage-daemon over
//! vhost-user-blk.
//!
//! Both servers get a copy of the same 2 GiB image of random data (larger
//! than every cache twinsum keeps), both serve it buffered through the host
//! page cache, and one libblkio client (the library QEMU and fio use)
//! drives each with the same seeded workloads for 10 s each, on one queue
//! and on two: 4 KiB random read QD32, 128 KiB sequential read QD8, 4 KiB
//! random write QD32 plain and with a FLUSH in place of every 32nd
//! request, 128 KiB sequential write QD8, and 4 KiB reads and writes at QD1
//! for latency percentiles. The table gives IOPS, MB/s and server CPU per
//! I/O for both, and the twinsum/qsd ratio against the goals of issue 11.
//! A third server, twinsum on a disk formatted with `--key-file`, runs the
//! one-queue read workloads, to show what keyed checksums (BLAKE3) cost
//! against xxh3. A fourth, twinsum with `--log-writes` (issue 14), runs
//! the one-queue 4 KiB write workloads, to show what recording every write
//! costs (the 128 KiB sequential write is left out: its log alone would
//! take tens of GB).
//!
//! Every block read is checked (header: right block, known content), and
//! after the write workload a sample is read back and compared in full, so
//! a server that is fast because it is wrong does not pass.
//!
//! Environment:
//! - `TWINSUM_BENCH_SECS` (10): seconds per measured run.
//! - `TWINSUM_BENCH_ROUNDS` (1): repeat everything; the median is shown.
//! - `TWINSUM_BENCH_SIZE_MIB` (2048): image size.
//! - `TWINSUM_BENCH_ONLY` (`twinsum`, `twinsum-keyed`, `twinsum-logged`
//!   or `qsd`): measure one server (`twinsum` includes the keyed and the
//!   logged one).
//! - `TWINSUM_BENCH_WORKLOADS` (all): comma-separated parts of workload
//!   names to run, e.g. `randwrite` when profiling one of them.
//! - `TWINSUM_BENCH_SCALE` (`1G,64G,1T`): disk sizes of the scale curve
//!   (fresh sparse disks, 4k random I/O over the whole disk, one queue;
//!   `none` skips it). The largest gets a flush workload too, run first
//!   while both disks are fresh, and twinsum's peak RSS is reported. Each
//!   server's disks sit on a fresh ext4 of its own when the bench can
//!   make one (root, `mkfs.ext4`, `losetup`: `support::scratch`); the
//!   output says when they share one file system instead.
//! - `TWINSUM_BENCH_OWN_FS=0`: put both servers' scale disks in the run
//!   directory's file system. The loop device makes a sync cost more (on
//!   the 64 GiB random write row twinsum, which syncs during the run, ran
//!   23.9k IOPS on its own file system and 42.2k here; qsd 55.2k and
//!   62.5k), while a shared file system makes a row depend on which
//!   server wrote first.
//!
//! After every write run without flushes (2 GiB image and scale curve) a
//! FLUSH is timed, and a "durable rate" table divides the run's writes by
//! the run plus that flush: a server that left its writes in the host page
//! cache pays for them there (on a sparse 1 TiB file, mostly in the file
//! system's block allocator), not in the next workload's first flush. A
//! server that wrote more in one row is not charged for it in the next.
//! - `TWINSUM_BENCH_STRICT=1`: exit 1 when a goal is missed.
//! - `TWINSUM_BENCH_KEEP=1`: keep the run directory (images, logs).
//! - `TWINSUM_BENCH_QSD_AIO` (`threads`): qsd's file `aio=` mode.
//! - `TWINSUM_BIN`, `QSD_BIN`: the server binaries.
//!
//! Exit status: 0 when both servers ran and every check passed, 1 when a
//! server is unavailable or a data check failed (or, strict, a goal was
//! missed).

mod support;

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use std::os::unix::fs::PermissionsExt;

use anyhow::{bail, Context, Result};

use support::image;
use support::load::{Bitmap, Client, Goal, Kind, Stats, Workload};
use support::scratch::ScratchFs;
use support::server::{self, Server};

const SEED: u64 = 0x7477_696e_7375_6d31;
/// The side serving a disk with keyed checksums.
const KEYED: &str = "twinsum-keyed";
/// The side serving with `--log-writes`.
const LOGGED: &str = "twinsum-logged";
/// Blocks read back in full after the write workload.
const VERIFY_SAMPLES: u64 = 8192;

/// Queues every server offers; each workload uses one or two of them.
const SERVER_QUEUES: usize = 2;

const fn wl(
    name: &'static str,
    kind: Kind,
    size: usize,
    depth: usize,
    queues: usize,
    flush_every: u32,
    goal: Goal,
) -> Workload {
    Workload {
        name,
        kind,
        size,
        depth,
        queues,
        flush_every,
        latency: depth == 1,
        goal,
    }
}

/// In the order the table shows them.
const WORKLOADS: [Workload; 11] = [
    wl(
        "4k randread QD32 1q",
        Kind::RandRead,
        4096,
        32,
        1,
        0,
        Goal::Ratio(2.0),
    ),
    wl(
        "4k randread QD32 2q",
        Kind::RandRead,
        4096,
        32,
        2,
        0,
        Goal::Ratio(2.0),
    ),
    wl(
        "128k seqread QD8 1q",
        Kind::SeqRead,
        128 << 10,
        8,
        1,
        0,
        Goal::Ratio(1.3),
    ),
    wl(
        "128k seqread QD8 2q",
        Kind::SeqRead,
        128 << 10,
        8,
        2,
        0,
        Goal::Ratio(1.3),
    ),
    wl(
        "4k randwrite QD32 1q",
        Kind::RandWrite,
        4096,
        32,
        1,
        0,
        Goal::Ratio(1.3),
    ),
    wl(
        "4k randwrite QD32 2q",
        Kind::RandWrite,
        4096,
        32,
        2,
        0,
        Goal::Ratio(1.3),
    ),
    wl(
        "4k randwrite+flush/32 1q",
        Kind::RandWrite,
        4096,
        32,
        1,
        32,
        Goal::Ratio(1.0),
    ),
    wl(
        "4k randwrite+flush/32 2q",
        Kind::RandWrite,
        4096,
        32,
        2,
        32,
        Goal::Ratio(1.2),
    ),
    wl(
        "128k seqwrite QD8 1q",
        Kind::SeqWrite,
        128 << 10,
        8,
        1,
        0,
        Goal::Ratio(1.0),
    ),
    wl("4k read QD1", Kind::RandRead, 4096, 1, 1, 0, Goal::P99),
    wl("4k write QD1", Kind::RandWrite, 4096, 1, 1, 0, Goal::P99),
];
/// Reads first, so they measure the base image in the first round; runs
/// that share a queue count are adjacent (each change reconnects).
const RUN_ORDER: [usize; 11] = [0, 2, 9, 1, 3, 5, 7, 4, 6, 8, 10];

struct Config {
    secs: f64,
    rounds: usize,
    size: u64,
    only: Option<String>,
    /// Substrings of workload names to run (all when empty).
    workloads: Vec<String>,
    strict: bool,
    keep: bool,
    twinsum: PathBuf,
    qsd: PathBuf,
    qsd_aio: String,
    target: PathBuf,
    /// Disk sizes of the scale curve.
    scale: Vec<u64>,
    /// Give each server's scale disks a file system of its own.
    own_fs: bool,
}

fn env_num<T: std::str::FromStr>(name: &str, default: T) -> Result<T> {
    match env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .ok()
            .with_context(|| format!("{name}={v:?} is not a number")),
        Err(_) => Ok(default),
    }
}

impl Config {
    fn from_env() -> Result<Self> {
        let target = env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
        let target = fs::canonicalize(&target).unwrap_or(target);
        let secs: f64 = env_num("TWINSUM_BENCH_SECS", 10.0)?;
        let size_mib: u64 = env_num("TWINSUM_BENCH_SIZE_MIB", 2048)?;
        // Written to reject NaN too.
        if secs.is_nan() || secs <= 0.0 || size_mib < 16 {
            bail!("TWINSUM_BENCH_SECS must be > 0 and TWINSUM_BENCH_SIZE_MIB >= 16");
        }
        Ok(Config {
            secs,
            rounds: env_num("TWINSUM_BENCH_ROUNDS", 1usize)?.max(1),
            size: size_mib << 20,
            only: env::var("TWINSUM_BENCH_ONLY")
                .ok()
                .filter(|s| !s.is_empty()),
            workloads: env::var("TWINSUM_BENCH_WORKLOADS")
                .unwrap_or_default()
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
            strict: env::var("TWINSUM_BENCH_STRICT").is_ok_and(|v| v == "1"),
            keep: env::var("TWINSUM_BENCH_KEEP").is_ok_and(|v| v == "1"),
            own_fs: env::var("TWINSUM_BENCH_OWN_FS").map_or(true, |v| v != "0"),
            twinsum: env::var_os("TWINSUM_BIN")
                .map(PathBuf::from)
                .unwrap_or_else(|| target.join("release/twinsum")),
            qsd: env::var_os("QSD_BIN")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("qemu-storage-daemon")),
            qsd_aio: env::var("TWINSUM_BENCH_QSD_AIO").unwrap_or_else(|_| "threads".into()),
            scale: parse_scale(
                &env::var("TWINSUM_BENCH_SCALE").unwrap_or_else(|_| "1G,64G,1T".into()),
            )?,
            target,
        })
    }

    fn runs(&self, w: &Workload) -> bool {
        self.workloads.is_empty() || self.workloads.iter().any(|s| w.name.contains(s.as_str()))
    }

    fn wants(&self, side: &str) -> bool {
        self.only.as_deref().is_none_or(|o| o == side)
    }
}

/// One measured run: throughput and what it cost the server in CPU.
#[derive(Clone)]
struct Run {
    stats: Stats,
    server_cpu: Duration,
    /// CPU of this process (the load generator) during the run: on a
    /// small machine the client competes with the server for cores.
    client_cpu: Duration,
    /// How long a FLUSH issued right after the run took (write workloads
    /// without flushes): the writes the run left to a cache, paid for.
    final_flush: Option<Duration>,
}

impl Run {
    fn client_cpu_percent(&self) -> f64 {
        100.0 * self.client_cpu.as_secs_f64() / self.stats.elapsed.as_secs_f64()
    }

    /// Server CPU per request, in microseconds.
    fn cpu_per_io_us(&self) -> f64 {
        let ops = (self.stats.ops + self.stats.flushes).max(1);
        self.server_cpu.as_secs_f64() * 1e6 / ops as f64
    }
}

/// One server under test and everything measured on it.
struct Side {
    name: &'static str,
    img: PathBuf,
    // Field order is drop order: disconnect before stopping the server.
    client: Option<Client>,
    server: Option<Server>,
    /// Blocks written, across every connection.
    written: Option<std::sync::Arc<Bitmap>>,
    /// The image is sparse: unwritten blocks read as zeros.
    sparse: bool,
    /// Why this side has no figures, if it has none.
    unavailable: Option<String>,
    /// Per workload (index into WORKLOADS), one entry per round.
    runs: Vec<Vec<Run>>,
}

impl Side {
    fn new(name: &'static str, img: PathBuf) -> Self {
        Side {
            name,
            img,
            client: None,
            server: None,
            written: None,
            sparse: false,
            unavailable: None,
            runs: vec![Vec::new(); WORKLOADS.len()],
        }
    }

    fn fail(&mut self, why: String) {
        eprintln!("bench: {} unavailable: {why}", self.name);
        self.client = None;
        self.server = None;
        self.unavailable.get_or_insert(why);
    }

    fn ready(&self) -> bool {
        self.unavailable.is_none() && self.client.is_some()
    }

    /// Connect with `queues` queues unless already connected so (a new
    /// connection drops the old one first: one front-end at a time).
    fn connect(&mut self, queues: usize) {
        if self.unavailable.is_some() {
            return;
        }
        if self.client.as_ref().is_some_and(|c| c.queues() == queues) {
            return;
        }
        self.client = None;
        let socket = match &self.server {
            Some(s) => s.socket.clone(),
            None => return,
        };
        match Client::connect(&socket, queues, SEED, self.written.clone(), self.sparse) {
            Ok(c) => {
                self.written = Some(c.written.clone());
                self.client = Some(c);
            }
            Err(e) => self.fail(format!("connect with {queues} queue(s): {e:#}")),
        }
    }

    fn measure(&mut self, w: &Workload, dur: Duration) -> Result<Run> {
        let server = self.server.as_mut().unwrap();
        let cpu0 = server.cpu_time().unwrap_or_default();
        let me0 = server::cpu_time_of(std::process::id()).unwrap_or_default();
        let stats = self.client.as_mut().unwrap().run(w, dur);
        let server = self.server.as_mut().unwrap();
        if !server.alive() {
            bail!("server died during {}: {}", w.name, server.log_tail());
        }
        let stats = stats?;
        let cpu1 = server.cpu_time().unwrap_or_default();
        let me1 = server::cpu_time_of(std::process::id()).unwrap_or_default();
        Ok(Run {
            stats,
            server_cpu: cpu1.saturating_sub(cpu0),
            client_cpu: me1.saturating_sub(me0),
            final_flush: None,
        })
    }

    /// Median of the rounds by IOPS, so one round disturbed by a
    /// neighbour's compile does not decide the result.
    fn median(&self, w: usize) -> Option<Run> {
        let mut runs = self.runs[w].clone();
        if runs.is_empty() {
            return None;
        }
        runs.sort_by(|a, b| a.stats.iops().total_cmp(&b.stats.iops()));
        Some(runs[runs.len() / 2].clone())
    }
}

/// Removes the per-run directory (two image copies) however the bench ends.
struct RunDir {
    path: PathBuf,
    keep: bool,
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("bench: kept {}", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Returns whether everything that should have run ran and passed.
fn run() -> Result<bool> {
    let cfg = Config::from_env()?;
    let data = cfg.target.join("bench-data");
    let base = image::cached_base(&data, SEED, cfg.size)?;
    let dir = RunDir {
        path: data.join(format!("run-{}", std::process::id())),
        keep: cfg.keep,
    };
    fs::create_dir_all(&dir.path)?;

    let mut tw = Side::new("twinsum", dir.path.join("twinsum.img"));
    let mut qsd = Side::new("qsd", dir.path.join("qsd.img"));
    let mut keyed = Side::new(KEYED, dir.path.join("keyed.img"));
    let mut logged = Side::new(LOGGED, dir.path.join("logged.img"));
    let meta = dir.path.join("twinsum.meta");
    let keyed_meta = dir.path.join("keyed.meta");
    let logged_meta = dir.path.join("logged.meta");
    let write_log = dir.path.join("logged.log");
    let key = dir.path.join("key");
    for side in [&mut tw, &mut qsd] {
        if !cfg.wants(side.name) {
            side.unavailable = Some("skipped (TWINSUM_BENCH_ONLY)".into());
        }
    }
    let keyed_runs = WORKLOADS.iter().any(|w| cfg.runs(w) && keyed_workload(w));
    if (!cfg.wants(KEYED) && !cfg.wants("twinsum")) || !keyed_runs {
        keyed.unavailable = Some("skipped (TWINSUM_BENCH_ONLY)".into());
    }
    let logged_runs = WORKLOADS.iter().any(|w| cfg.runs(w) && logged_workload(w));
    if (!cfg.wants(LOGGED) && !cfg.wants("twinsum")) || !logged_runs {
        logged.unavailable = Some("skipped (TWINSUM_BENCH_ONLY)".into());
    }

    // Images: identical copies, made durable, then each read once so every
    // server starts with its whole image in the page cache.
    for side in [&mut tw, &mut qsd, &mut keyed, &mut logged] {
        if side.unavailable.is_none() {
            image::copy_image(&base, &side.img)?;
        }
    }
    if tw.unavailable.is_none() {
        if let Err(e) = format_twinsum(&cfg, &tw.img, &meta, None) {
            tw.fail(format!("{e:#}"));
        }
    }
    if keyed.unavailable.is_none() {
        let made =
            make_key(&key).and_then(|()| format_twinsum(&cfg, &keyed.img, &keyed_meta, Some(&key)));
        if let Err(e) = made {
            keyed.fail(format!("{e:#}"));
        }
    }
    if logged.unavailable.is_none() {
        if let Err(e) = format_twinsum(&cfg, &logged.img, &logged_meta, None) {
            logged.fail(format!("{e:#}"));
        }
    }
    for side in [&tw, &qsd, &keyed, &logged] {
        if side.unavailable.is_none() {
            image::warm(&side.img)?;
        }
    }

    if tw.unavailable.is_none() {
        let cmd = serve_twinsum(&cfg, &dir.path, &tw, &meta, None, None);
        start(&cfg, &mut tw, cmd, &dir.path);
    }
    if keyed.unavailable.is_none() {
        let cmd = serve_twinsum(&cfg, &dir.path, &keyed, &keyed_meta, Some(&key), None);
        start(&cfg, &mut keyed, cmd, &dir.path);
    }
    if logged.unavailable.is_none() {
        let cmd = serve_twinsum(
            &cfg,
            &dir.path,
            &logged,
            &logged_meta,
            None,
            Some(&write_log),
        );
        start(&cfg, &mut logged, cmd, &dir.path);
    }
    if qsd.unavailable.is_none() {
        let cmd = qsd_command(&cfg, &qsd.img, &dir.path);
        start(&cfg, &mut qsd, cmd, &dir.path);
    }

    println!();
    println!(
        "vhost-user-blk bench: {} MiB image of random data, {:.1} s per run, {} round(s)",
        cfg.size >> 20,
        cfg.secs,
        cfg.rounds
    );
    println!(
        "QD = requests in flight summed over the client's queues (1q/2q), split evenly; \
         both servers offer {SERVER_QUEUES} queues"
    );
    println!(
        "cache: both servers buffered through the host page cache (qsd cache.direct=off aio={}, \
         twinsum pread/pwrite), both images copied, synced and read once before the start",
        cfg.qsd_aio
    );
    println!(
        "machine: {} CPUs, load average {} at start{}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        server::loadavg(),
        for_pids(&[&tw, &qsd, &keyed, &logged])
    );

    // Untimed warm-up on the live connection: first-touch costs (page
    // faults on the shared buffers, server-side caches) stay out of the
    // first measured run.
    let warmup = Duration::from_secs_f64(cfg.secs.min(1.0));
    for side in [&mut tw, &mut qsd, &mut keyed, &mut logged] {
        side.connect(WORKLOADS[0].queues);
        if side.ready() {
            if let Err(e) = side.measure(&WORKLOADS[0], warmup) {
                side.fail(format!("warm-up: {e:#}"));
            }
        }
    }

    let dur = Duration::from_secs_f64(cfg.secs);
    let mut data_ok = true;
    // The logged disk runs after all the others: its write log dirties
    // gigabytes of page cache, which would push the other images out of
    // the cache and slow whichever runs came next.
    for pass in [Pass::Compared, Pass::Logged] {
        for round in 0..cfg.rounds {
            run_pass(
                &cfg,
                pass,
                round,
                [&mut tw, &mut qsd, &mut keyed, &mut logged],
                dur,
                &mut data_ok,
            );
        }
    }

    // Read-back after a flush: the written blocks must hold what was
    // written, the others the base image.
    for side in [&mut tw, &mut qsd, &mut keyed, &mut logged] {
        if !side.ready() {
            continue;
        }
        let client = side.client.as_mut().unwrap();
        let written = client.written.count();
        let res = client
            .flush()
            .and_then(|()| client.verify_sample(VERIFY_SAMPLES, SEED ^ 0x5eed));
        match res {
            Ok(()) => println!(
                "read-back {}: {VERIFY_SAMPLES} random blocks match ({written} of {} blocks were written)",
                side.name,
                client.blocks()
            ),
            Err(e) => {
                data_ok = false;
                side.fail(format!("read-back: {e:#}"));
            }
        }
    }
    println!("machine: load average {} at end", server::loadavg());

    // Orderly stop; twinsum then gets an offline check of data against
    // metadata, which catches a server that answered reads right but left
    // its checksums behind.
    for side in [&mut tw, &mut qsd, &mut keyed, &mut logged] {
        side.client = None;
        if let Some(mut s) = side.server.take() {
            match s.stop(Duration::from_secs(30)) {
                Some(st) if st.success() => {}
                st => println!(
                    "note: {} did not exit cleanly on SIGTERM ({})",
                    side.name,
                    st.map_or("killed after 30 s".into(), |s| s.to_string())
                ),
            }
            if let Some(summary) = s.exit_summary() {
                println!("{} {summary}", side.name);
            }
        }
    }
    let wrote = WORKLOADS
        .iter()
        .enumerate()
        .any(|(i, w)| w.kind.writes() && !tw.runs[i].is_empty());
    if tw.unavailable.is_none() && wrote {
        data_ok &= check_twinsum(&cfg, &tw.img, &meta);
    }
    if logged.unavailable.is_none() && !logged.runs.iter().all(Vec::is_empty) {
        data_ok &= check_twinsum(&cfg, &logged.img, &logged_meta);
        if let Ok(m) = fs::metadata(&write_log) {
            println!("write log of {LOGGED}: {} MiB", m.len() >> 20);
        }
    }

    let goals_met = print_table(&tw, &qsd, cfg.size);
    print_keyed_table(&tw, &keyed);
    print_logged_table(&tw, &logged);
    let mut ok = data_ok;
    for side in [&tw, &qsd, &keyed, &logged] {
        match &side.unavailable {
            // Asked for: measuring one side alone is not a failure.
            Some(why) if why.contains("TWINSUM_BENCH_ONLY") => {
                println!("{}: skipped (TWINSUM_BENCH_ONLY)", side.name)
            }
            Some(why) => {
                println!("{} unavailable: {why}", side.name);
                ok = false;
            }
            None => {}
        }
    }
    if !data_ok {
        println!("FAILED: a data check failed (see above)");
    }
    if cfg.strict && !goals_met {
        ok = false;
    }
    drop(dir);
    if !cfg.scale.is_empty() {
        let (scale_ok, scale_goals) = run_scale(&cfg, &data)?;
        ok &= scale_ok;
        if cfg.strict && !scale_goals {
            ok = false;
        }
    }
    Ok(ok)
}

/// `1G,64G,1T` → bytes; `none` or empty → no scale curve.
fn parse_scale(v: &str) -> Result<Vec<u64>> {
    v.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty() && *p != "none")
        .map(|p| {
            let (num, shift) = match p.chars().last() {
                Some('G') => (&p[..p.len() - 1], 30),
                Some('T') => (&p[..p.len() - 1], 40),
                Some('M') => (&p[..p.len() - 1], 20),
                _ => (p, 0),
            };
            num.parse::<u64>()
                .map(|n| n << shift)
                .ok()
                .filter(|&n| n >= 16 << 20)
                .with_context(|| format!("TWINSUM_BENCH_SCALE: bad size {p:?}"))
        })
        .collect()
}

/// The scale curve: random 4 KiB I/O over the whole of a fresh sparse disk.
///
/// The flush workload runs first, while both disks are fresh. After the
/// plain random writes it measured each server's history instead: a sparse
/// file's blocks are allocated when they are synced, and ext4 reserves room
/// around each (per-file preallocation), so qsd, whose plain run left
/// ~500k writes for its final FLUSH to allocate, then found most of its
/// file preallocated and flushed 8x faster (6.0k IOPS on a fresh 1 TiB
/// disk, 47.5k after its plain run).
const SCALE_WORKLOADS: [Workload; 3] = [
    wl(
        "4k randwrite+flush/32",
        Kind::RandWrite,
        4096,
        32,
        1,
        32,
        Goal::Ratio(0.8),
    ),
    wl(
        "4k randwrite QD32",
        Kind::RandWrite,
        4096,
        32,
        1,
        0,
        Goal::Ratio(0.8),
    ),
    wl(
        "4k randread QD32",
        Kind::RandRead,
        4096,
        32,
        1,
        0,
        Goal::Ratio(1.0),
    ),
];
/// Peak RSS twinsum may reach while serving the largest disk.
const RSS_GOAL: u64 = 256 << 20;

/// Run the scale curve; (every data check passed, every goal met).
fn run_scale(cfg: &Config, data: &Path) -> Result<(bool, bool)> {
    let largest = cfg.scale.iter().copied().max().unwrap_or(0);
    let mut ok = true;
    let mut rows = Vec::new();
    let mut peak_rss = None;
    for &size in &cfg.scale {
        let dir = RunDir {
            path: data.join(format!("scale-{}-{}", size >> 30, std::process::id())),
            keep: cfg.keep,
        };
        fs::create_dir_all(&dir.path)?;
        // Declared after `dir`, so unmounted before it is removed.
        let made = cfg.own_fs.then(|| {
            (
                ScratchFs::make(&dir.path, "twinsum"),
                ScratchFs::make(&dir.path, "qsd"),
            )
        });
        let own = match made {
            None => None,
            Some((Ok(a), Ok(b))) => Some((a, b)),
            Some((Err(e), _) | (_, Err(e))) => {
                if size == largest {
                    println!(
                        "scale: both servers' disks on one file system (no file system of their own: {e:#})"
                    );
                }
                None
            }
        };
        let (tw_dir, qsd_dir) = match &own {
            Some((a, b)) => (a.mnt.clone(), b.mnt.clone()),
            None => (dir.path.clone(), dir.path.clone()),
        };
        let mut tw = Side::new("twinsum", tw_dir.join("twinsum.img"));
        let mut qsd = Side::new("qsd", qsd_dir.join("qsd.img"));
        let meta = tw_dir.join("twinsum.meta");
        for side in [&mut tw, &mut qsd] {
            side.sparse = true;
            if !cfg.wants(side.name) {
                side.unavailable = Some("skipped (TWINSUM_BENCH_ONLY)".into());
                continue;
            }
            fs::File::create(&side.img)
                .and_then(|f| f.set_len(size))
                .with_context(|| format!("create {}", side.img.display()))?;
        }
        if tw.unavailable.is_none() {
            match format_twinsum(cfg, &tw.img, &meta, None) {
                Ok(()) => {
                    let cmd = serve_twinsum(cfg, &dir.path, &tw, &meta, None, None);
                    start_sized(&mut tw, cmd, &dir.path, size);
                }
                Err(e) => tw.fail(format!("{e:#}")),
            }
        }
        if qsd.unavailable.is_none() {
            let cmd = qsd_command(cfg, &qsd.img, &dir.path);
            start_sized(&mut qsd, cmd, &dir.path, size);
        }
        let dur = Duration::from_secs_f64(cfg.secs);
        for (i, w) in SCALE_WORKLOADS.iter().enumerate() {
            // The flush workload only on the largest disk: the curve is
            // about size, the flush row about the 1 TiB goal.
            if !cfg.runs(w) || (w.flush_every > 0 && size != largest) {
                continue;
            }
            let sides: [&mut Side; 2] = if i % 2 == 0 {
                [&mut tw, &mut qsd]
            } else {
                [&mut qsd, &mut tw]
            };
            for side in sides {
                if !side.ready() {
                    continue;
                }
                match measure_settled(side, w, dur) {
                    Ok(r) => side.runs[i].push(r),
                    Err(e) => {
                        ok = false;
                        side.fail(format!("{e:#}"));
                    }
                }
            }
        }
        for side in [&mut tw, &mut qsd] {
            if !side.ready() {
                continue;
            }
            let client = side.client.as_mut().unwrap();
            let res = client
                .flush()
                .and_then(|()| client.verify_sample(VERIFY_SAMPLES, SEED ^ size));
            if let Err(e) = res {
                ok = false;
                side.fail(format!("read-back: {e:#}"));
            }
        }
        if size == largest {
            peak_rss = tw
                .server
                .as_ref()
                .and_then(Server::pid)
                .and_then(server::peak_rss_of);
        }
        for side in [&mut tw, &mut qsd] {
            side.client = None;
            if let Some(mut s) = side.server.take() {
                s.stop(Duration::from_secs(60));
                if let Some(summary) = s.exit_summary() {
                    println!("scale {} GiB: {} {summary}", size >> 30, side.name);
                }
            }
        }
        if tw.unavailable.is_none() {
            ok &= check_twinsum(cfg, &tw.img, &meta);
        }
        for (i, w) in SCALE_WORKLOADS.iter().enumerate() {
            rows.push((size, w, tw.median(i), qsd.median(i)));
        }
        for side in [&tw, &qsd] {
            if let Some(why) = side
                .unavailable
                .as_ref()
                .filter(|w| !w.contains("TWINSUM_BENCH_ONLY"))
            {
                println!("scale {} GiB: {} unavailable: {why}", size >> 30, side.name);
                ok = false;
            }
        }
    }

    println!();
    println!("scale curve: fresh sparse disks, 4k random I/O over the whole disk, 1 queue QD32");
    println!(
        "{:>8} {:<22} {:>9} {:>7}   {:>9} {:>7}   {:>6} {:>6}  result",
        "disk", "workload", "twinsum", "cpu/io", "qsd", "cpu/io", "ratio", "goal"
    );
    let mut goals = true;
    for (size, w, a, b) in &rows {
        let (Some(a), Some(b)) = (a, b) else {
            // One server measured alone (TWINSUM_BENCH_ONLY): its figure,
            // no ratio.
            let cell = |r: &Option<Run>| match r {
                Some(r) => format!(
                    "{:>9.0} {:>7.1}{}",
                    r.stats.iops(),
                    r.cpu_per_io_us(),
                    r.final_flush
                        .map(|f| format!(" (then a {:.2} s FLUSH)", f.as_secs_f64()))
                        .unwrap_or_default()
                ),
                None => format!("{:>9} {:>7}", "-", "-"),
            };
            if a.is_some() || b.is_some() {
                println!(
                    "{:>7}G {:<22} {}   {}",
                    size >> 30,
                    w.name,
                    cell(a),
                    cell(b)
                );
            }
            continue;
        };
        let ratio = a.stats.iops() / b.stats.iops();
        let Goal::Ratio(g) = w.goal else { continue };
        // The goals are for the 1 TiB disk; smaller ones show the curve.
        let judged = *size == largest;
        let met = ratio >= g;
        if judged {
            goals &= met;
        }
        println!(
            "{:>7}G {:<22} {:>9.0} {:>7.1}   {:>9.0} {:>7.1}   {:>5.2}x {:>5}  {}",
            size >> 30,
            w.name,
            a.stats.iops(),
            a.cpu_per_io_us(),
            b.stats.iops(),
            b.cpu_per_io_us(),
            ratio,
            if judged {
                format!("{g:.1}x")
            } else {
                "-".into()
            },
            match (judged, met) {
                (false, _) => "",
                (true, true) => "met",
                (true, false) => "MISSED",
            }
        );
    }
    print_durable(rows.iter().filter_map(|(size, w, a, b)| {
        Some((format!("{}G", size >> 30), w.name, a.as_ref()?, b.as_ref()?))
    }));
    match peak_rss {
        Some(rss) => {
            let met = rss <= RSS_GOAL;
            goals &= met;
            println!(
                "twinsum peak RSS serving the {} GiB disk: {} MiB (goal <= {} MiB) {}",
                largest >> 30,
                rss >> 20,
                RSS_GOAL >> 20,
                if met { "met" } else { "MISSED" }
            );
        }
        None => println!("twinsum peak RSS: not measured"),
    }
    Ok((ok, goals))
}

fn for_pids(sides: &[&Side]) -> String {
    let pids: Vec<String> = sides
        .iter()
        .filter_map(|s| Some(format!("{} pid {}", s.name, s.server.as_ref()?.pid()?)))
        .collect();
    if pids.is_empty() {
        String::new()
    } else {
        format!("; {}", pids.join(", "))
    }
}

fn start(cfg: &Config, side: &mut Side, cmd: Command, dir: &Path) {
    start_sized(side, cmd, dir, cfg.size);
}

/// Start `side`'s server and connect to it with one queue, expecting a
/// disk of `size` bytes.
fn start_sized(side: &mut Side, cmd: Command, dir: &Path, size: u64) {
    let socket = dir.join(format!("{}.sock", side.name));
    let log = dir.join(format!("{}.log", side.name));
    let res = Server::spawn(side.name, cmd, &socket, &log).and_then(|s| {
        side.server = Some(s);
        Client::connect(&socket, 1, SEED, None, side.sparse)
    });
    match res {
        Ok(c) if c.capacity == size => {
            side.written = Some(c.written.clone());
            side.client = Some(c);
        }
        Ok(c) => side.fail(format!(
            "device capacity {} differs from the image size {size}",
            c.capacity
        )),
        Err(e) => {
            let tail = side
                .server
                .as_ref()
                .map(Server::log_tail)
                .unwrap_or_default();
            side.fail(format!("{e:#} {tail}"));
        }
    }
}

/// qemu-storage-daemon exporting `img` on `dir`/qsd.sock.
fn qsd_command(cfg: &Config, img: &Path, dir: &Path) -> Command {
    // cache.direct=off: buffered I/O through the host page cache, as
    // twinsum does with positioned read/write; aio=threads is the default
    // and the closest match to twinsum's blocking syscalls
    // (TWINSUM_BENCH_QSD_AIO=io_uring to see how much qsd gains).
    let mut cmd = Command::new(&cfg.qsd);
    cmd.arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=f,filename={},cache.direct=off,aio={}",
            img.display(),
            cfg.qsd_aio
        ))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable=on,num-queues={}",
            dir.join("qsd.sock").display(),
            SERVER_QUEUES
        ));
    cmd
}

/// The measured runs are made in two passes; see [`run_pass`].
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// twinsum, qsd and the keyed twinsum, interleaved.
    Compared,
    /// The twinsum recording a write log, alone.
    Logged,
}

/// One round of every selected workload on the sides of `pass`.
fn run_pass(
    cfg: &Config,
    pass: Pass,
    round: usize,
    sides: [&mut Side; 4],
    dur: Duration,
    data_ok: &mut bool,
) {
    for (k, &w) in RUN_ORDER.iter().enumerate() {
        if !cfg.runs(&WORKLOADS[w]) {
            continue;
        }
        // Alternate which server goes first, so a slow drift in machine
        // load (a neighbour starting a build) is not charged to one side.
        let n = sides.len();
        for j in 0..n {
            let side = &mut *sides[(j + round + k) % n];
            if (side.name == LOGGED) != (pass == Pass::Logged) {
                continue;
            }
            // The keyed disk is there for the cost of verifying reads.
            if side.name == KEYED && !keyed_workload(&WORKLOADS[w]) {
                continue;
            }
            // The logged disk, for the cost of recording writes.
            if side.name == LOGGED && !logged_workload(&WORKLOADS[w]) {
                continue;
            }
            side.connect(WORKLOADS[w].queues);
            if !side.ready() {
                continue;
            }
            match measure_settled(side, &WORKLOADS[w], dur) {
                Ok(r) => side.runs[w].push(r),
                Err(e) => {
                    *data_ok = false;
                    side.fail(format!("{e:#}"));
                }
            }
        }
    }
}

/// Measure `w` on `side`; after a write workload without flushes, time a
/// FLUSH. What the run left in a cache is paid there (and shown in the
/// durable-rate table), not in the next workload's first flush: a server
/// that was faster in one row would otherwise be charged for it in the
/// next.
fn measure_settled(side: &mut Side, w: &Workload, dur: Duration) -> Result<Run> {
    let mut r = side.measure(w, dur)?;
    if w.kind.writes() && w.flush_every == 0 {
        let t = std::time::Instant::now();
        side.client.as_mut().unwrap().flush()?;
        r.final_flush = Some(t.elapsed());
    }
    Ok(r)
}

/// The durable-rate table: per row, the writes of a run without flushes
/// over the run plus the FLUSH issued right after it.
fn print_durable<'a>(rows: impl Iterator<Item = (String, &'a str, &'a Run, &'a Run)>) {
    println!(
        "durable rate: the writes of a run without flushes over the run plus the FLUSH issued right after it"
    );
    println!(
        "{:>8} {:<25} {:>9} {:>7}   {:>9} {:>7}   {:>6}",
        "disk", "workload", "twinsum", "flush", "qsd", "flush", "ratio"
    );
    let durable = |r: &Run, f: Duration| r.stats.ops as f64 / (r.stats.elapsed + f).as_secs_f64();
    for (disk, name, a, b) in rows {
        let (Some(fa), Some(fb)) = (a.final_flush, b.final_flush) else {
            continue;
        };
        let (da, db) = (durable(a, fa), durable(b, fb));
        println!(
            "{:>8} {:<25} {:>9.0} {:>6.2}s   {:>9.0} {:>6.2}s   {:>5.2}x",
            disk,
            name,
            da,
            fa.as_secs_f64(),
            db,
            fb.as_secs_f64(),
            da / db
        );
    }
}

/// The workloads the keyed disk runs: one-queue reads at depth.
fn keyed_workload(w: &Workload) -> bool {
    !w.kind.writes() && w.queues == 1 && !w.latency
}

/// The workloads the logged disk runs: one-queue 4 KiB writes.
fn logged_workload(w: &Workload) -> bool {
    w.kind.writes() && w.queues == 1 && w.name.starts_with("4k")
}

/// The `twinsum serve` command of `side`, keyed with `key` and recording
/// into `log` if given.
fn serve_twinsum(
    cfg: &Config,
    dir: &Path,
    side: &Side,
    meta: &Path,
    key: Option<&Path>,
    log: Option<&Path>,
) -> Command {
    let mut cmd = Command::new(&cfg.twinsum);
    cmd.arg("serve")
        .arg("--socket")
        .arg(dir.join(format!("{}.sock", side.name)))
        .arg("--data")
        .arg(&side.img)
        .arg("--meta")
        .arg(meta)
        .arg("--queues")
        .arg(SERVER_QUEUES.to_string())
        .env(
            "RUST_LOG",
            // info: start-up and the final counters (syncs, mismatches),
            // nothing per request.
            env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        );
    if let Some(k) = key {
        cmd.arg("--key-file").arg(k);
    }
    if let Some(l) = log {
        cmd.arg("--log-writes").arg(l);
    }
    cmd
}

/// A fresh 32-byte key file, private as `--key-file` requires.
fn make_key(path: &Path) -> Result<()> {
    let bytes: [u8; 32] = std::array::from_fn(|i| (i as u8).wrapping_mul(97) ^ 0x3c);
    fs::write(path, bytes).with_context(|| format!("write {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod {}", path.display()))
}

fn format_twinsum(cfg: &Config, img: &Path, meta: &Path, key: Option<&Path>) -> Result<()> {
    if !cfg.twinsum.exists() {
        bail!(
            "{} not found (run `cargo build --release` first)",
            cfg.twinsum.display()
        );
    }
    let out = Command::new(&cfg.twinsum)
        .arg("format")
        .arg("--data")
        .arg(img)
        .arg("--meta")
        .arg(meta)
        .args(["--block-size", "4096"])
        .args(key.iter().flat_map(|k| [Path::new("--key-file"), k]))
        .output()
        .context("run twinsum format")?;
    if !out.status.success() {
        bail!(
            "`twinsum format` failed ({}): {}",
            out.status,
            one_line(&out.stderr)
        );
    }
    Ok(())
}

/// A command's output as one line, for "unavailable: why" messages.
fn one_line(out: &[u8]) -> String {
    let text = String::from_utf8_lossy(out);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    lines.join(" | ")
}

/// `twinsum check` after the run: exit 0 clean, 1 mismatch, anything else
/// is reported but not held against the data.
fn check_twinsum(cfg: &Config, img: &Path, meta: &Path) -> bool {
    let out = Command::new(&cfg.twinsum)
        .arg("check")
        .arg("--data")
        .arg(img)
        .arg("--meta")
        .arg(meta)
        .output();
    match out {
        Ok(o) if o.status.success() => {
            println!("twinsum check after the run: clean");
            true
        }
        Ok(o) if o.status.code() == Some(1) => {
            println!(
                "twinsum check after the run: MISMATCHES: {}",
                one_line(&o.stdout)
            );
            false
        }
        Ok(o) => {
            println!(
                "note: twinsum check could not run ({}): {}",
                o.status,
                one_line(&o.stderr)
            );
            true
        }
        Err(e) => {
            println!("note: twinsum check could not run: {e}");
            true
        }
    }
}

/// Print the comparison; returns whether every goal with figures on both
/// sides was met.
fn print_table(tw: &Side, qsd: &Side, size: u64) -> bool {
    println!();
    println!(
        "{:<25} {:>9} {:>8} {:>7}   {:>9} {:>8} {:>7}   {:>6} {:>6}  result",
        "workload", "twinsum", "MB/s", "cpu/io", "qsd", "MB/s", "cpu/io", "ratio", "goal"
    );
    println!(
        "{:<25} {:>9} {:>8} {:>7}   {:>9} {:>8} {:>7}",
        "", "IOPS", "", "us", "IOPS", "", "us"
    );
    let cell = |r: &Option<Run>| match r {
        Some(r) => format!(
            "{:>9.0} {:>8.1} {:>7.1}",
            r.stats.iops(),
            r.stats.mb_per_s(),
            r.cpu_per_io_us()
        ),
        None => format!("{:>9} {:>8} {:>7}", "-", "-", "-"),
    };
    let us = |d: Option<Duration>| d.map_or(f64::NAN, |d| d.as_secs_f64() * 1e6);
    let medians: Vec<_> = (0..WORKLOADS.len())
        .map(|i| (tw.median(i), qsd.median(i)))
        .collect();
    let mut all_met = true;
    let mut latency_rows = Vec::new();
    for (w, (a, b)) in WORKLOADS.iter().zip(&medians) {
        let (ratio, goal, verdict) = match (&a, &b, w.goal) {
            (Some(a), Some(b), Goal::Ratio(g)) => {
                let ratio = a.stats.iops() / b.stats.iops();
                let met = ratio >= g;
                all_met &= met;
                (
                    format!("{ratio:.2}x"),
                    format!("{g:.2}x"),
                    if met { "met" } else { "MISSED" },
                )
            }
            (Some(a), Some(b), Goal::P99) => {
                let (pa, pb) = (a.stats.percentile(99.0), b.stats.percentile(99.0));
                let met = pa <= pb;
                all_met &= met;
                latency_rows.push((w.name, a.clone(), b.clone(), met));
                (
                    format!("{:.2}x", a.stats.iops() / b.stats.iops()),
                    "p99".into(),
                    if met { "met" } else { "MISSED" },
                )
            }
            (_, _, Goal::Ratio(g)) => ("-".into(), format!("{g:.2}x"), "n/a"),
            (_, _, Goal::P99) => ("-".into(), "p99".into(), "n/a"),
        };
        println!(
            "{:<25} {}   {}   {:>6} {:>6}  {}",
            w.name,
            cell(a),
            cell(b),
            ratio,
            goal,
            verdict
        );
    }
    println!(
        "cpu/io = server CPU time per request (flushes included); ratio = twinsum/qsd IOPS; \
         1q/2q = client queues"
    );
    println!();
    print_durable(WORKLOADS.iter().zip(&medians).filter_map(|(w, (a, b))| {
        Some((format!("{}M", size >> 20), w.name, a.as_ref()?, b.as_ref()?))
    }));
    if !latency_rows.is_empty() {
        println!();
        println!(
            "{:<25} {:>9} {:>9} {:>9}   {:>9} {:>9} {:>9}  goal: twinsum p99 <= qsd p99",
            "latency (us)", "tw p50", "tw p99", "tw p99.9", "qsd p50", "qsd p99", "qsd p99.9"
        );
        for (name, a, b, met) in latency_rows {
            println!(
                "{:<25} {:>9.1} {:>9.1} {:>9.1}   {:>9.1} {:>9.1} {:>9.1}  {}",
                name,
                us(a.stats.percentile(50.0)),
                us(a.stats.percentile(99.0)),
                us(a.stats.percentile(99.9)),
                us(b.stats.percentile(50.0)),
                us(b.stats.percentile(99.0)),
                us(b.stats.percentile(99.9)),
                if met { "met" } else { "MISSED" }
            );
        }
    }
    let client: Vec<String> = WORKLOADS
        .iter()
        .enumerate()
        .filter(|(i, _)| tw.median(*i).is_some() || qsd.median(*i).is_some())
        .map(|(i, w)| {
            let pct = |s: &Side| {
                s.median(i)
                    .map_or("-".into(), |r| format!("{:.0}%", r.client_cpu_percent()))
            };
            format!("{} {}/{}", w.name, pct(tw), pct(qsd))
        })
        .collect();
    println!(
        "load generator CPU (twinsum/qsd runs): {}",
        client.join(", ")
    );
    all_met
}

/// Keyed against unkeyed twinsum, on the workloads both ran.
fn print_keyed_table(tw: &Side, keyed: &Side) {
    if keyed.runs.iter().all(Vec::is_empty) {
        return;
    }
    println!();
    println!("keyed checksums (blake3-keyed) against unkeyed (xxh3-64), both twinsum:");
    println!(
        "{:<25} {:>9} {:>8} {:>7}   {:>9} {:>8} {:>7}   {:>6}",
        "workload", "unkeyed", "MB/s", "cpu/io", "keyed", "MB/s", "cpu/io", "ratio"
    );
    for (i, w) in WORKLOADS.iter().enumerate() {
        let (Some(a), Some(b)) = (tw.median(i), keyed.median(i)) else {
            continue;
        };
        println!(
            "{:<25} {:>9.0} {:>8.1} {:>7.1}   {:>9.0} {:>8.1} {:>7.1}   {:>5.2}x",
            w.name,
            a.stats.iops(),
            a.stats.mb_per_s(),
            a.cpu_per_io_us(),
            b.stats.iops(),
            b.stats.mb_per_s(),
            b.cpu_per_io_us(),
            b.stats.iops() / a.stats.iops()
        );
    }
    println!("ratio = keyed/unkeyed IOPS");
}

/// twinsum with `--log-writes` against without, on the workloads both ran.
fn print_logged_table(tw: &Side, logged: &Side) {
    if logged.runs.iter().all(Vec::is_empty) {
        return;
    }
    println!();
    println!("write log (serve --log-writes) against none, both twinsum:");
    println!(
        "{:<25} {:>9} {:>8} {:>7}   {:>9} {:>8} {:>7}   {:>6}",
        "workload", "no log", "MB/s", "cpu/io", "logged", "MB/s", "cpu/io", "ratio"
    );
    for (i, w) in WORKLOADS.iter().enumerate() {
        let (Some(a), Some(b)) = (tw.median(i), logged.median(i)) else {
            continue;
        };
        println!(
            "{:<25} {:>9.0} {:>8.1} {:>7.1}   {:>9.0} {:>8.1} {:>7.1}   {:>5.2}x",
            w.name,
            a.stats.iops(),
            a.stats.mb_per_s(),
            a.cpu_per_io_us(),
            b.stats.iops(),
            b.stats.mb_per_s(),
            b.cpu_per_io_us(),
            b.stats.iops() / a.stats.iops()
        );
    }
    println!("ratio = logged/unlogged IOPS");
}
