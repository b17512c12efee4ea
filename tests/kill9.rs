//! `kill -9` of `twinsum serve` at random moments while a libblkio client
//! writes (rewriting the same blocks, before and after flushes), reads and
//! flushes on two queues; then, every round:
//!
//! - `twinsum info` reports the metadata unclean (or, if it is clean, no
//!   write of the round reached the image: the daemon still held them all);
//! - `twinsum check` exits 0: a kill -9 is not a power cut, the host page
//!   cache keeps every write the process made, so no block may mismatch;
//! - after a restart (which replays the write-back stage the dead daemon
//!   left in tmpfs) every block of the disk reads without error and holds
//!   the last write whose completion the client saw, or one still in
//!   flight at the kill (zeros if never written): a process death loses no
//!   completed write, flushed or not. Half the rounds never flush at all;
//!
//! and the next round writes on. The seed is printed; replay a failure
//! with `TWINSUM_KILL9_SEED=<seed>` (the kill moment is an operation count,
//! so a replay runs the same workload and kills near the same point; the
//! interleaving of the two queues still varies).
//! `TWINSUM_KILL9_ROUNDS` sets the rounds per block size (default 20).

mod common {
    pub mod client;
    pub mod disk;
    pub mod load;
    pub mod run;
}

use std::os::unix::process::ExitStatusExt;
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::thread;
use std::time::Instant;

use common::client::{Client, QUEUE_BUF};
use common::disk::{Daemon, Disk};
use common::load::{self, Ctl, EndGuard, Model, Rng, Shape, StopGuard, Verdict};
use common::run::poll;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;

fn rounds() -> usize {
    std::env::var("TWINSUM_KILL9_ROUNDS")
        .ok()
        .map(|v| v.parse().expect("TWINSUM_KILL9_ROUNDS is a number"))
        .unwrap_or(20)
}

#[derive(Default)]
struct Tally {
    rounds: usize,
    ops_at_kill: u64,
    unflushed_at_kill: usize,
    /// Kills that left the superblock clean: no write had reached the
    /// image yet.
    clean_kills: usize,
    /// Rounds with a SIGUSR1 (synchronous mode) before the kill.
    usr1_rounds: usize,
    /// ... of which waited for synchronous mode before writing on.
    strict_rounds: usize,
    blocks_verified: u64,
    /// Completed writes the killed daemon left in its stage (replayed by
    /// the restart), and the rounds that left any.
    staged_at_kill: u64,
    rounds_with_staged: usize,
    /// Indexed like `verdict_index`.
    verdicts: [u64; 4],
}

fn verdict_index(v: Verdict) -> usize {
    match v {
        Verdict::Durable => 0,
        Verdict::LatestCompleted => 1,
        Verdict::InFlight => 2,
        Verdict::OlderThanCompleted => 3,
    }
}

/// Hot clusters of contiguous blocks: the first blocks, the last blocks,
/// one straddling a metadata page boundary (a 4 KiB page holds 256 pairs)
/// and one anywhere.
fn hot_clusters(rng: &mut Rng, blocks: u64, len: u64) -> Vec<(u64, u64)> {
    let pages = blocks / 256;
    let straddle = 256 * rng.range(1, pages - 1) - len / 2;
    let mut anywhere = rng.range(len, blocks - 2 * len);
    // Keep clusters disjoint.
    while [0, straddle, blocks - len]
        .iter()
        .any(|&c| anywhere + len > c && c + len > anywhere)
    {
        anywhere = rng.range(len, blocks - 2 * len);
    }
    vec![
        (0, len),
        (straddle, len),
        (anywhere, len),
        (blocks - len, len),
    ]
}

fn serve_args(rng: &mut Rng) -> Vec<&'static str> {
    let mut a = vec!["--queues", "2"];
    if rng.pct(30) {
        // Let the lazy metadata write-back run within a round now and then.
        a.extend(["--writeback-interval", "1"]);
    }
    a
}

/// The tail of a daemon log, for failure messages.
fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// A guest shutdown signal before the kill.
#[derive(Clone, Copy)]
struct Usr1 {
    at: u64,
    then: u64,
    strict: bool,
}

/// Run the load on two queues until `target` requests completed, SIGKILL
/// the daemon, stop the client. Returns the completed request count.
/// With `usr1: Some(u)`, send SIGUSR1 (guest shutdown: write out all
/// metadata, then synchronous mode) once `u.at` requests completed, and
/// kill `u.then` requests later; if `u.strict`, count those from when the
/// daemon says it is in synchronous mode, from which on a completed write
/// must survive the kill.
#[allow(clippy::too_many_arguments)]
fn run_until_killed(
    disk: &Disk,
    daemon: &mut Daemon,
    model: &Mutex<Model>,
    shape: Shape,
    usr1: Option<Usr1>,
    target: u64,
    rng: &mut Rng,
    ctx: &str,
    sig: i32,
) -> u64 {
    let ctl = Ctl::default();
    let rngs = [rng.fork(), rng.fork()];
    let results = thread::scope(|scope| {
        let client = scope.spawn(|| {
            let _guard = EndGuard(&ctl);
            let mut c = Client::connect(&disk.socket, 2);
            let queues = c.queues();
            assert_eq!(queues.len(), 2);
            thread::scope(|scope| {
                let workers: Vec<_> = queues
                    .into_iter()
                    .zip(rngs)
                    .map(|(q, r)| scope.spawn(|| load::drive(q, model, &ctl, shape, r)))
                    .collect();
                workers
                    .into_iter()
                    .map(|w| w.join().unwrap_or_else(|_| Err("worker panicked".into())))
                    .collect::<Vec<_>>()
            })
            // The client is dropped here, after its backend died.
        });
        // Whatever happens below, the workers stop.
        let _stop = StopGuard(&ctl);
        let reached = |n: u64| {
            let ops = ctl.ops.load(Ordering::SeqCst);
            let writes = ctl.writes.load(Ordering::SeqCst);
            let ended = ctl.ended.load(Ordering::SeqCst) > 0;
            ((ops >= n && writes >= 1) || ended).then_some(())
        };
        let mut target = target;
        if let Some(u) = usr1 {
            poll("the client to reach the SIGUSR1 point", || reached(u.at));
            daemon.signal(libc::SIGUSR1);
            if u.strict {
                daemon.wait_for_log("SIGUSR1: metadata is now written synchronously");
                model.lock().expect("model").set_synchronous(true);
            }
            target = ctl.ops.load(Ordering::SeqCst) + u.then;
        }
        poll("the client to reach the kill point", || reached(target));
        ctl.killing.store(true, Ordering::SeqCst);
        daemon.signal(sig);
        ctl.stop.store(true, Ordering::SeqCst);
        client
            .join()
            .unwrap_or_else(|_| vec![Err("client thread panicked".into())])
    });
    model.lock().expect("model").set_synchronous(false);
    let status = daemon.wait_exit();
    for r in results {
        if let Err(e) = r {
            panic!(
                "{ctx}: load failed before the kill: {e}\n{}",
                tail(&daemon.log())
            );
        }
    }
    if sig == libc::SIGKILL {
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "{ctx}: the daemon ended with {status} before the kill\n{}",
            tail(&daemon.log())
        );
    } else {
        assert!(
            status.success(),
            "{ctx}: the daemon ended with {status} after signal {sig}\n{}",
            tail(&daemon.log())
        );
    }
    ctl.ops.load(Ordering::SeqCst)
}

/// `twinsum check` must find every block matching one of its slots.
fn check_exits_0(disk: &Disk, ctx: &str, log: &str) {
    let o = disk.check(&["--json"]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{ctx}: twinsum check failed\nstdout: {}\nstderr: {}\nkilled daemon's log tail:\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
        tail(log)
    );
}

/// Read every block of the disk through a fresh client and judge it by the
/// model; then the model takes what was read as durable.
///
fn verify_every_block(disk: &Disk, model: &Mutex<Model>, tally: &mut Tally, ctx: &str) {
    let mut c = Client::connect(&disk.socket, 1);
    assert_eq!(c.capacity(), SIZE);
    let mut q = c.q0();
    let mut m = model.lock().expect("model");
    let bs = m.block_size;
    let seed = m.seed;
    let mut problems = Vec::new();
    let chunk = QUEUE_BUF as u64;
    for off in (0..SIZE).step_by(chunk as usize) {
        let len = chunk.min(SIZE - off);
        let data = match q.read(off, len as usize) {
            Ok(d) => d,
            Err(e) => {
                // Name the blocks that fail.
                for b in off / bs..(off + len) / bs {
                    if let Err(e) = q.read(b * bs, bs as usize) {
                        problems.push(format!("block {b}: read failed, errno {}", -e));
                    }
                }
                problems.push(format!("read of {len} bytes at {off} failed, errno {}", -e));
                continue;
            }
        };
        for (k, blk) in data.chunks(bs as usize).enumerate() {
            let b = off / bs + k as u64;
            let got = match load::parse_block(blk, seed, b) {
                Ok(got) => got,
                Err(e) => {
                    problems.push(format!("block {b}: {e}"));
                    continue;
                }
            };
            match m.judge_process_death(b, got) {
                Ok(v) => tally.verdicts[verdict_index(v)] += 1,
                Err(e) => problems.push(e),
            }
            m.settle(b, got);
            tally.blocks_verified += 1;
        }
    }
    assert!(
        problems.is_empty(),
        "{ctx}: {} problem(s) after restart:\n{}",
        problems.len(),
        problems
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

fn kill9_rounds(bs: u64) {
    let start = Instant::now();
    let base = load::seed_from_env("TWINSUM_KILL9_SEED");
    eprintln!("kill9 bs={bs}: seed {base:#x} (replay: TWINSUM_KILL9_SEED={base:#x})");
    let mut rng = Rng::new(load::mix(base ^ bs));
    let disk = Disk::new(SIZE, bs);
    let blocks = SIZE / bs;
    let cluster = if bs == 512 { 128 } else { 64 };
    let clusters = hot_clusters(&mut rng, blocks, cluster);
    let model = Mutex::new(Model::new(rng.next_u64(), bs, clusters.clone()));
    let mut tally = Tally::default();
    let mut daemon = disk.serve(&serve_args(&mut rng));

    for round in 0..rounds() {
        let ctx = format!("bs={bs} round {round} (TWINSUM_KILL9_SEED={base:#x})");
        let shape = Shape {
            depth: rng.range(1, 8) as usize,
            max_blocks: rng.range(1, if bs == 512 { 16 } else { 8 }),
            flush_every: if rng.pct(50) { 0 } else { rng.range(1, 16) },
            zero_pct: if rng.pct(50) { 5 } else { 0 },
            read_pct: rng.range(0, 15),
        };
        // Mostly a few hundred requests in; sometimes right at the start.
        let target = if rng.pct(15) {
            rng.range(1, 8)
        } else {
            rng.range(8, 4000)
        };
        // Now and then a guest shutdown signal first, and the kill while
        // the metadata is written out or in synchronous mode (slow: keep
        // that part short).
        let usr1 = rng.pct(20).then(|| Usr1 {
            at: target,
            then: rng.range(0, 200),
            strict: rng.pct(50),
        });
        let ctx = format!(
            "{ctx}, kill after {target} requests{}, {shape:?}",
            match usr1 {
                Some(u) => format!(
                    " (SIGUSR1 after {}, kill {} later{})",
                    u.at,
                    u.then,
                    if u.strict {
                        ", synchronous mode awaited"
                    } else {
                        ""
                    }
                ),
                None => String::new(),
            }
        );
        let flushes_before = model.lock().expect("model").stats.flushes_done;
        let ops = run_until_killed(
            &disk,
            &mut daemon,
            &model,
            shape,
            usr1,
            target,
            &mut rng,
            &ctx,
            libc::SIGKILL,
        );
        tally.usr1_rounds += usize::from(usr1.is_some());
        tally.strict_rounds += usize::from(usr1.is_some_and(|u| u.strict));
        let killed_log = daemon.log();
        tally.ops_at_kill += ops;
        tally.unflushed_at_kill += model.lock().expect("model").unflushed_blocks();

        // Writes completed, so the superblock must be dirty -- unless the
        // daemon still held every one in its write-back stage: then nothing
        // reached the image and no flush can have completed (the restart
        // replays the stage).
        let info = disk.info();
        let staged = info["stage_writes"]
            .as_u64()
            .expect("info reports stage_writes");
        tally.staged_at_kill += staged;
        tally.rounds_with_staged += usize::from(staged > 0);
        let clean = info["clean"] == true;
        if clean {
            let flushes = model.lock().expect("model").stats.flushes_done - flushes_before;
            assert_eq!(
                flushes, 0,
                "{ctx}: the killed daemon left the superblock clean after {flushes} flushes"
            );
            tally.clean_kills += 1;
        }
        check_exits_0(&disk, &ctx, &killed_log);

        daemon = disk.serve(&serve_args(&mut rng));
        let ctx = format!("{ctx}\nkilled daemon's log tail:\n{}", tail(&killed_log));
        verify_every_block(&disk, &model, &mut tally, &ctx);
        tally.rounds += 1;
    }

    // An orderly stop after all that leaves clean, verifiable metadata.
    let log = daemon.log();
    assert!(daemon.terminate().success(), "SIGTERM after the rounds");
    assert_eq!(disk.info()["clean"], true, "SIGTERM leaves clean metadata");
    check_exits_0(&disk, &format!("bs={bs} after SIGTERM"), &log);

    let st = model.lock().expect("model").stats;
    let v = tally.verdicts;
    eprintln!(
        "kill9 bs={bs} seed {base:#x}: {} rounds ({} with SIGUSR1 first, {} of them \
         checked for synchronous durability) in {:.1}s, \
         hot set {} blocks; \
         {} writes issued ({} completed, {} write-zeroes, {} completed in synchronous mode), \
         {} rewrites of unflushed blocks, \
         {} flushes, {} live reads, {} requests before the kills \
         ({} kills before any write reached the image), {} hot blocks unflushed at a kill, \
         {} completed writes left in the stage ({} rounds) and replayed; \
         {} blocks verified: {} as last flushed (or never written), {} last completed, \
         {} in flight, {} older than a completed write",
        tally.rounds,
        tally.usr1_rounds,
        tally.strict_rounds,
        start.elapsed().as_secs_f64(),
        clusters.iter().map(|c| c.1).sum::<u64>(),
        st.writes_issued,
        st.writes_done,
        st.zeroes_done,
        st.synchronous_done,
        st.rewrites_unflushed,
        st.flushes_done,
        st.reads_done,
        tally.ops_at_kill,
        tally.clean_kills,
        tally.unflushed_at_kill,
        tally.staged_at_kill,
        tally.rounds_with_staged,
        tally.blocks_verified,
        v[0],
        v[1],
        v[2],
        v[3],
    );
    assert_eq!(v[3], 0, "judge_process_death lets no lost write through");
    assert!(
        tally.rounds_with_staged > 0,
        "no kill left a write in the stage: the replay was never tested"
    );
    assert!(
        tally.rounds >= 20 || rounds() < 20,
        "at least 20 rounds per block size"
    );
    assert!(
        v[1] > 0,
        "no round found a completed write to check: the test checks nothing"
    );
}

/// SIGTERM in the middle of the same load: the daemon finishes what runs,
/// writes everything out, marks the metadata clean, exits 0 and leaves no
/// stage behind; a restart reads back every completed write.
#[test]
fn sigterm_under_load_drains_marks_clean_and_leaves_no_stage() {
    let base = load::seed_from_env("TWINSUM_KILL9_SEED");
    eprintln!("sigterm: seed {base:#x} (replay: TWINSUM_KILL9_SEED={base:#x})");
    let mut rng = Rng::new(load::mix(base ^ 0x5151));
    let bs = 4096;
    let disk = Disk::new(SIZE, bs);
    let clusters = hot_clusters(&mut rng, SIZE / bs, 64);
    let model = Mutex::new(Model::new(rng.next_u64(), bs, clusters));
    let mut tally = Tally::default();
    for round in 0..4 {
        let ctx = format!("sigterm round {round} (TWINSUM_KILL9_SEED={base:#x})");
        let mut daemon = disk.serve(&["--queues", "2"]);
        let shape = Shape {
            depth: 8,
            max_blocks: 8,
            flush_every: 0,
            zero_pct: 5,
            read_pct: 5,
        };
        let target = rng.range(200, 3000);
        run_until_killed(
            &disk,
            &mut daemon,
            &model,
            shape,
            None,
            target,
            &mut rng,
            &ctx,
            libc::SIGTERM,
        );
        assert_eq!(
            disk.info()["clean"],
            true,
            "{ctx}: SIGTERM leaves clean metadata"
        );
        assert!(
            !disk.stage.exists(),
            "{ctx}: SIGTERM left the stage {} behind",
            disk.stage.display()
        );
        check_exits_0(&disk, &ctx, &daemon.log());
        let _daemon = disk.serve(&[]);
        verify_every_block(&disk, &model, &mut tally, &ctx);
    }
    assert!(tally.verdicts[1] > 0, "no completed write was checked");
    assert_eq!(tally.verdicts[3], 0);
}

#[test]
fn kill9_under_load_4096() {
    kill9_rounds(4096);
}

#[test]
fn kill9_under_load_512() {
    kill9_rounds(512);
}
