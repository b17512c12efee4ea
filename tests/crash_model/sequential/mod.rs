//! The seeded cases: one submitter, random batches and actions, and
//! between them power cuts (every un-synced sector kept or dropped, the
//! stage lost or kept stale) and deaths of the process (caches and stage
//! survive, the engine replays the stage), often in the middle of a call.
//! After each, every block is judged against its [`BlockModel`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use twinsum::integrity::hash::Checksum;
use twinsum::integrity::{Engine, EngineError, EngineOptions, StageConfig};
use twinsum::io::volatile::testing::{FaultInjection, Fuse, FusedRegion};
use twinsum::io::volatile::{PowerCutReport, VolatileDevice};
use twinsum::io::Region;
use twinsum::stage::{MIN_CAPACITY, RING_START};

use crate::device::TestDevice;
use crate::figures::Figures;
use crate::model::BlockModel;
use crate::support::{
    catching, env_u64, fill_sector, formatted_meta, fresh_content, key_for, log_for, log_start,
    spec_writes, submit, Content, Outcome, Spec, DEFAULT_SEEDS, SECTOR,
};

/// A non-batch step.
#[derive(Debug, Clone, Copy)]
enum Action {
    Flush,
    Writeback,
    EnterSyncMode,
    LeaveSyncMode,
    MakeClean,
}

/// How a round ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Crash {
    /// The host lost power: every un-synced sector kept or dropped, the
    /// stage (tmpfs) gone.
    PowerCut,
    /// The twinsum process died; the host and its caches live on.
    ProcessDeath,
}

/// Bytes of the write-back stage region (the smallest ring allowed).
const STAGE_LEN: u64 = RING_START + MIN_CAPACITY;

macro_rules! trace {
    ($case:expr, $($arg:tt)*) => {
        if $case.verbose {
            eprintln!("[seed {}] {}", $case.seed, format!($($arg)*));
        }
    };
}

mod checks;

/// The simulated host of one case: both devices and the stage behind one
/// power switch, and the boot they are in.
struct Host {
    fuse: Arc<Fuse>,
    data: Arc<TestDevice>,
    meta: Arc<TestDevice>,
    stage: Arc<FusedRegion>,
    boot: u8,
}

impl Host {
    fn new(data_img: Vec<u8>, meta_img: Vec<u8>) -> Self {
        let fuse = Arc::new(Fuse::new());
        Self {
            data: TestDevice::image(data_img, Some(&fuse)),
            meta: TestDevice::image(meta_img, Some(&fuse)),
            stage: Arc::new(FusedRegion::new(STAGE_LEN, fuse.clone())),
            fuse,
            boot: 1,
        }
    }

    fn open(&self, opts: &EngineOptions) -> Result<Engine, EngineError> {
        Engine::open_with_stage(
            self.data.clone(),
            self.meta.clone(),
            StageConfig {
                region: self.stage.clone(),
                boot: [self.boot; 16],
            },
            opts.clone(),
        )
    }

    /// Back to the instant the process died: devices and stage as they were.
    fn revive(&self) -> Outcome {
        self.data.revive().map_err(|e| e.to_string())?;
        self.meta.revive().map_err(|e| e.to_string())?;
        self.stage.revive();
        self.fuse.disarm();
        Ok(())
    }

    /// Power back after a cut: devices holding what survived, and a fresh
    /// stage, unless `keep_stage` (a stage on a disk-backed file system
    /// outlives the host; the next boot must drop it, not replay it).
    fn reboot(&mut self, data_img: Vec<u8>, meta_img: Vec<u8>, keep_stage: bool) -> Outcome {
        self.fuse = Arc::new(Fuse::new());
        self.data = TestDevice::image(data_img, Some(&self.fuse));
        self.meta = TestDevice::image(meta_img, Some(&self.fuse));
        let fresh = FusedRegion::new(STAGE_LEN, self.fuse.clone());
        if keep_stage {
            self.stage.revive();
            let mut old = vec![0u8; STAGE_LEN as usize];
            self.stage.read_at(&mut old, 0).map_err(|e| e.to_string())?;
            fresh.write_at(&old, 0).map_err(|e| e.to_string())?;
            self.fuse.disarm();
        }
        self.stage = Arc::new(fresh);
        self.boot += 1;
        Ok(())
    }
}

struct Case<'f> {
    seed: u64,
    verbose: bool,
    rng: StdRng,
    bs: usize,
    blocks: u64,
    salt: u64,
    opts: EngineOptions,
    /// Blocks most requests go to, so that rewrites and same-block batches
    /// are common.
    hot: Vec<u64>,
    model: Vec<BlockModel>,
    zeros: Content,
    sync_mode: bool,
    next_id: u64,
    /// The metadata device of the current round, to check what is durable.
    meta: Option<Arc<TestDevice>>,
    /// What the batch running when the process died wrote, per block: a
    /// read after the restart may see any of it.
    dying: Vec<(u64, Content)>,
    /// Where log replay started when the engine of this round opened.
    opened_log_start: Option<u64>,
    figures: &'f Figures,
}

impl<'f> Case<'f> {
    fn new(seed: u64, verbose: bool, figures: &'f Figures) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let bs: usize = if rng.gen_bool(0.5) { 512 } else { 4096 };
        // Mostly tiny disks (dense collisions); sometimes a pair table of
        // several pages, and rarely one of more pages than the engine's
        // smallest metadata cache (16 pages) with hot blocks spread over
        // all of them, so that dirty pages are evicted between commits.
        let shape = if bs == 512 { rng.gen_range(0..50) } else { 49 };
        let blocks = match shape {
            0 => rng.gen_range(4400..=5000),
            1..=6 => rng.gen_range(600..=1100),
            _ => rng.gen_range(8..=64),
        };
        let mut opts = EngineOptions {
            key: key_for(seed),
            ..EngineOptions::default()
        };
        if rng.gen_ratio(1, 4) {
            // The engine's own data sync kicks in all the time.
            opts.pending_limit = rng.gen_range(0..=4);
        }
        if shape == 0 || rng.gen_ratio(1, 3) {
            opts.cache_pages = rng.gen_range(1..=16);
        }
        // Both write paths: through the write-back stage (serve's) and
        // completing each write only once its data is written.
        opts.write_cache = !rng.gen_ratio(1, 4);
        let hot = if shape == 0 {
            let stride = blocks / 24;
            (0..24)
                .map(|i| i * stride + rng.gen_range(0..stride))
                .collect()
        } else {
            (0..rng.gen_range(2..=4))
                .map(|_| rng.gen_range(0..blocks))
                .collect()
        };
        let zeros: Content = vec![0u8; bs].into();
        Self {
            seed,
            verbose,
            salt: rng.gen(),
            bs,
            blocks,
            opts,
            hot,
            model: vec![BlockModel::new(&zeros); blocks as usize],
            zeros,
            sync_mode: false,
            next_id: 1,
            meta: None,
            dying: Vec::new(),
            opened_log_start: None,
            figures,
            rng,
        }
    }

    /// Rounds of work, each ended by a crash, each crash judged after the
    /// reopen.
    fn run(&mut self) -> Outcome {
        let crashes = self.rng.gen_range(1..=5);
        trace!(
            self,
            "geometry: {} blocks of {} bytes, {}, metadata log {:?}, pending_limit {}, cache_pages {}, write_cache {}, hot {:?}, {} crashes",
            self.blocks,
            self.bs,
            self.checksum().name(),
            log_for(self.seed),
            self.opts.pending_limit,
            self.opts.cache_pages,
            self.opts.write_cache,
            self.hot,
            crashes
        );
        let (data_img, meta_img) = self.format()?;
        let mut host = Host::new(data_img, meta_img);
        let mut last = None;
        for round in 0..=crashes {
            let engine = self.open(&host, last, round)?;
            self.sync_mode = false;
            self.meta = Some(host.meta.clone());
            match last {
                Some(Crash::PowerCut) => self.check_survivors(&engine, &host.data)?,
                Some(Crash::ProcessDeath) => self.check_after_death(&engine)?,
                None => {}
            }
            if round == crashes {
                break;
            }
            let crash = self.work_until_crash(engine, &host)?;
            self.recover(&mut host, crash)?;
            last = Some(crash);
        }
        Figures::add(&self.figures.cases, 1);
        if self.opts.key.is_some() {
            Figures::add(&self.figures.keyed_cases, 1);
        }
        if log_for(self.seed).is_some() {
            Figures::add(&self.figures.logged_cases, 1);
        }
        Ok(())
    }

    /// Random steps, then a crash: often in the middle of one more step.
    fn work_until_crash(&mut self, engine: Engine, host: &Host) -> Result<Crash, String> {
        let steps = self.rng.gen_range(1..=30);
        for _ in 0..steps {
            self.step(&engine, None)?;
        }
        let crash = if self.rng.gen_ratio(1, 3) {
            Crash::ProcessDeath
        } else {
            Crash::PowerCut
        };
        self.dying.clear();
        if self.rng.gen_ratio(1, 2) {
            let allowed = self.rng.gen_range(0..=12);
            host.fuse.arm(allowed);
            trace!(self, "{crash:?} after {allowed} more device writes/syncs");
            self.step(&engine, Some(&host.fuse))?;
        }
        // The instant of the crash: nothing the engine does from here
        // on (a background thread, its drop) may count.
        host.fuse.arm(0);
        drop(engine);
        Ok(crash)
    }

    /// Bring the host back from `crash`.
    fn recover(&mut self, host: &mut Host, crash: Crash) -> Outcome {
        match crash {
            Crash::ProcessDeath => {
                trace!(self, "PROCESS DEATH");
                Figures::add(&self.figures.process_deaths, 1);
                host.revive()
            }
            Crash::PowerCut => {
                let (d, m) = self.power_cut(&host.data, &host.meta)?;
                let survived = log_start(&m)?;
                trace!(
                    self,
                    "log replay starts at record {survived:?} (at open: {:?})",
                    self.opened_log_start
                );
                if matches!((survived, self.opened_log_start), (Some(s), Some(o)) if s > o) {
                    Figures::add(&self.figures.checkpoints_survived, 1);
                }
                let keep_stage = self.rng.gen_bool(0.5);
                host.reboot(d, m, keep_stage)
            }
        }
    }

    /// Open the engine on the host. After a process death, sometimes die
    /// again while the stage is replayed, then open once more.
    fn open(&mut self, host: &Host, last: Option<Crash>, round: usize) -> Result<Engine, String> {
        while last == Some(Crash::ProcessDeath) && self.rng.gen_ratio(1, 3) {
            let allowed = self.rng.gen_range(0..=20);
            host.fuse.arm(allowed);
            let r = host.open(&self.opts);
            let tripped = host.fuse.tripped();
            host.fuse.arm(0);
            drop(r);
            if !tripped {
                host.fuse.disarm();
                break;
            }
            trace!(
                self,
                "PROCESS DEATH while opening (after {allowed} device calls)"
            );
            Figures::add(&self.figures.deaths_in_replay, 1);
            Figures::add(&self.figures.process_deaths, 1);
            host.revive()?;
        }
        let engine = host.open(&self.opts).map_err(|e| {
            format!(
                "reopen after crash {round} failed: {}",
                twinsum::error::Chain(&e)
            )
        })?;
        Figures::add(&self.figures.replayed_writes, engine.replayed().writes);
        Figures::add(
            &self.figures.log_records_replayed,
            engine.replayed().log_records,
        );
        self.opened_log_start = host.meta.log_start()?;
        trace!(
            self,
            "opened; replayed {:?}; log replay from {:?}",
            engine.replayed(),
            self.opened_log_start
        );
        Ok(engine)
    }

    /// The checksum the engine uses on this case's disk.
    fn checksum(&self) -> Checksum {
        match &self.opts.key {
            Some(k) => Checksum::keyed(self.salt, k),
            None => Checksum::xxh3(self.salt),
        }
    }

    /// A formatted, synced pair of images.
    fn format(&mut self) -> Result<(Vec<u8>, Vec<u8>), String> {
        let size = self.blocks * self.bs as u64;
        let clean = self.rng.gen_bool(0.5);
        let meta_img = formatted_meta(
            self.bs,
            self.blocks,
            self.salt,
            clean,
            self.opts.key.as_ref(),
            log_for(self.seed),
        )?;
        Ok((vec![0; size as usize], meta_img))
    }

    /// Cut the power on both devices (independent choices) and return the
    /// surviving images.
    fn power_cut(
        &mut self,
        data: &VolatileDevice,
        meta: &VolatileDevice,
    ) -> Result<(Vec<u8>, Vec<u8>), String> {
        let cut = |dev: &VolatileDevice, rng: &mut StdRng| -> Result<PowerCutReport, String> {
            // Mostly independent per sector; sometimes every cached sector
            // lost or every one kept, the extremes a random choice rarely
            // produces on many sectors.
            let r = match rng.gen_range(0..10) {
                0 => dev.power_cut_with(|_, _| 0),
                1 => dev.power_cut_with(|_, n| n),
                _ => dev.power_cut(rng.gen()),
            };
            r.map_err(|e| format!("power cut: {e}"))
        };
        let d = cut(data, &mut self.rng)?;
        let m = cut(meta, &mut self.rng)?;
        trace!(
            self,
            "CRASH: data sectors {} un-synced ({} reverted, {} latest, {} older); meta sectors {} un-synced ({} reverted, {} latest, {} older)",
            d.sectors.len(),
            d.reverted(),
            d.kept_latest(),
            d.kept_older(),
            m.sectors.len(),
            m.reverted(),
            m.kept_latest(),
            m.kept_older()
        );
        if self.verbose {
            for (s, fate) in &d.sectors {
                trace!(
                    self,
                    "  data sector {s} (block {}): {fate:?}",
                    *s as usize * SECTOR / self.bs
                );
            }
            for (s, fate) in &m.sectors {
                trace!(self, "  meta sector {s}: {fate:?}");
            }
        }
        Figures::add(&self.figures.crashes, 1);
        let d = data.durable_snapshot().map_err(|e| e.to_string())?;
        let m = meta.durable_snapshot().map_err(|e| e.to_string())?;
        Ok((d, m))
    }

    /// One random step; with `fuse`, the power may fail during it.
    fn step(&mut self, engine: &Engine, fuse: Option<&Fuse>) -> Outcome {
        let r = self.rng.gen_range(0..100);
        match r {
            // A pair table larger than the metadata cache: one batch that
            // writes a block on every page, so the commit itself has to
            // evict dirty pages.
            0..=14 if self.hot.len() > 16 => {
                let hot = self.hot.clone();
                let specs = hot
                    .into_iter()
                    .map(|b| Spec::Write {
                        block: b,
                        contents: vec![self.gen_content(b)],
                    })
                    .collect();
                self.run_batch(engine, specs, fuse)
            }
            0..=69 => {
                let specs = self.gen_batch();
                self.run_batch(engine, specs, fuse)
            }
            70..=81 => self.action(engine, Action::Flush, fuse),
            82..=89 => self.action(engine, Action::Writeback, fuse),
            90..=92 => self.action(engine, Action::EnterSyncMode, fuse),
            93..=95 => self.action(engine, Action::LeaveSyncMode, fuse),
            _ => self.action(engine, Action::MakeClean, fuse),
        }
    }

    fn pick_block(&mut self) -> u64 {
        if self.rng.gen_bool(0.5) {
            self.hot[self.rng.gen_range(0..self.hot.len())]
        } else {
            self.rng.gen_range(0..self.blocks)
        }
    }

    fn pick_count(&mut self, block: u64, max: u64) -> u64 {
        let count = if self.rng.gen_bool(0.7) {
            1
        } else {
            self.rng.gen_range(1..=max)
        };
        count.min(self.blocks - block)
    }

    fn gen_batch(&mut self) -> Vec<Spec> {
        let n = self.rng.gen_range(1..=6);
        (0..n)
            .map(|_| {
                let block = self.pick_block();
                match self.rng.gen_range(0..100) {
                    0..=49 => {
                        let count = self.pick_count(block, 3);
                        let contents = (block..block + count)
                            .map(|b| self.gen_content(b))
                            .collect();
                        Spec::Write { block, contents }
                    }
                    50..=64 => Spec::Zero {
                        block,
                        count: self.pick_count(block, 4),
                    },
                    65..=91 => Spec::Read {
                        block,
                        count: self.pick_count(block, 2),
                    },
                    _ => Spec::Flush,
                }
            })
            .collect()
    }

    /// A content to write to block `b`: mostly fresh (every sector stamped
    /// with a new write id, so any tear is visible); sometimes zeros, the
    /// block's current content again, or the current content with only one
    /// or two sectors changed (so that some tears equal a written content).
    fn gen_content(&mut self, b: u64) -> Content {
        let current = self.model[b as usize].current.clone();
        match self.rng.gen_range(0..100) {
            0..=4 => return self.zeros.clone(),
            // Not the bytes of a damaged block: a write of those that never
            // reached the media would be indistinguishable from the damage.
            5..=9 if self.model[b as usize].current_ok => return current,
            10..=14 if self.bs > SECTOR => {
                let id = self.next_id;
                self.next_id += 1;
                let mut v = current.to_vec();
                let s = self.rng.gen_range(0..self.bs / SECTOR);
                fill_sector(&mut v[s * SECTOR..(s + 1) * SECTOR], self.seed, id, s);
                // Stamp the new id into sector 0 too, so that the content has
                // its own name in traces (sector 0 may change as well).
                v[0..8].copy_from_slice(&self.seed.to_le_bytes());
                v[8..16].copy_from_slice(&id.to_le_bytes());
                return v.into();
            }
            _ => {}
        }
        let id = self.next_id;
        self.next_id += 1;
        fresh_content(self.seed, id, self.bs)
    }

    fn run_batch(&mut self, engine: &Engine, specs: Vec<Spec>, fuse: Option<&Fuse>) -> Outcome {
        trace!(
            self,
            "batch {:?}{}",
            specs,
            if self.sync_mode { " (sync mode)" } else { "" }
        );
        let (results, reads) = submit(engine, &specs, self.bs);
        // Every content this batch writes, per block: the batch is
        // unordered, so a read in it may see any of them.
        let batch_writes = spec_writes(&specs, &self.zeros);

        if fuse.is_some_and(|f| f.tripped()) {
            // The power failed during the batch: nothing completed, every
            // write in it may or may not have reached the media.
            trace!(self, "  (power failed during the batch)");
            Figures::add(&self.figures.mid_op_crashes, 1);
            for (b, c) in &batch_writes {
                self.model[*b as usize].since.push(c.clone());
            }
            self.dying = batch_writes;
            return Ok(());
        }

        for ((s, r), buf) in specs.iter().zip(&results).zip(&reads) {
            match (s, r) {
                (Spec::Read { block, count }, r) => {
                    self.check_read(*block, *count, r, buf, &batch_writes)?;
                }
                (_, Ok(())) => {}
                (s, Err(e)) => return Err(format!("{s:?} failed: {e}")),
            }
        }
        self.batch_completed(&specs, &batch_writes)
    }

    /// Apply a completed batch to the model, in op order (the engine keeps
    /// the order of updates to one block; the guest cannot rely on it, but
    /// the media and the model must agree on which came last).
    fn batch_completed(&mut self, specs: &[Spec], batch_writes: &[(u64, Content)]) -> Outcome {
        let mut written = Vec::new();
        for (b, c) in batch_writes {
            self.model[*b as usize].written(c);
            written.push(*b);
        }
        if specs.iter().any(|s| matches!(s, Spec::Flush)) {
            self.all_durable();
        } else if self.sync_mode {
            // Synchronous mode: a completed write is durable.
            for &b in &written {
                self.model[b as usize].made_durable();
            }
        }
        if self.sync_mode {
            self.check_metadata_current(&written)?;
        }
        Ok(())
    }

    fn action(&mut self, engine: &Engine, action: Action, fuse: Option<&Fuse>) -> Outcome {
        trace!(self, "{action:?}");
        let r = match action {
            Action::Flush => engine.flush(),
            Action::Writeback => engine.writeback(),
            Action::EnterSyncMode => engine.enter_sync_mode(),
            Action::LeaveSyncMode => engine.leave_sync_mode(),
            Action::MakeClean => engine.make_clean().map(|_| ()),
        };
        if fuse.is_some_and(|f| f.tripped()) {
            trace!(self, "  (power failed during {action:?})");
            Figures::add(&self.figures.mid_op_crashes, 1);
            return Ok(());
        }
        r.map_err(|e| format!("{action:?} failed: {e}"))?;
        match action {
            Action::Flush | Action::MakeClean => self.all_durable(),
            Action::EnterSyncMode => self.sync_mode = true,
            Action::LeaveSyncMode => self.sync_mode = false,
            Action::Writeback => {}
        }
        Ok(())
    }

    fn all_durable(&mut self) {
        for m in &mut self.model {
            m.made_durable();
        }
    }
}

// ---- the runner ------------------------------------------------------------

fn run_seed(seed: u64, verbose: bool, figures: &Figures) -> Outcome {
    catching(|| Case::new(seed, verbose, figures).run())
}

/// How long no case may finish before the run is declared hung.
const HANG: Duration = Duration::from_secs(120);

/// Run `seeds` on several threads; the failures, by seed.
fn run_seeds(seeds: std::ops::Range<u64>, figures: &Figures) -> Vec<(u64, String)> {
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(8);
    let next = AtomicU64::new(seeds.start);
    let failures: Mutex<Vec<(u64, String)>> = Mutex::new(Vec::new());
    let done = AtomicBool::new(false);
    // Seeds in progress per worker, for the hang report.
    let current: Vec<AtomicU64> = (0..threads).map(|_| AtomicU64::new(u64::MAX)).collect();

    std::thread::scope(|scope| {
        for slot in &current {
            scope.spawn(|| loop {
                let seed = next.fetch_add(1, Ordering::Relaxed);
                if seed >= seeds.end {
                    slot.store(u64::MAX, Ordering::Relaxed);
                    break;
                }
                slot.store(seed, Ordering::Relaxed);
                if let Err(msg) = run_seed(seed, false, figures) {
                    Figures::add(&figures.failed_cases, 1);
                    eprintln!("seed {seed} FAILED: {msg}\n  replay with TWINSUM_CRASH_SEED={seed}");
                    failures.lock().unwrap().push((seed, msg));
                }
            });
        }
        scope.spawn(|| watchdog(&current, &next, seeds.end, figures, &done));
    });
    done.store(true, Ordering::Relaxed);
    failures.into_inner().unwrap()
}

/// An engine that deadlocks must not hang the suite silently: name the
/// seeds that stopped making progress and end the process.
fn watchdog(
    current: &[AtomicU64],
    next: &AtomicU64,
    end: u64,
    figures: &Figures,
    done: &AtomicBool,
) {
    let mut last = (Figures::get(&figures.cases), Instant::now());
    while !done.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(200));
        if current
            .iter()
            .all(|c| c.load(Ordering::Relaxed) == u64::MAX)
            && next.load(Ordering::Relaxed) >= end
        {
            break;
        }
        let now = (
            Figures::get(&figures.cases) + Figures::get(&figures.failed_cases),
            Instant::now(),
        );
        if now.0 != last.0 {
            last = now;
        } else if last.1.elapsed() > HANG {
            let stuck: Vec<u64> = current
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .filter(|&s| s != u64::MAX)
                .collect();
            eprintln!(
                "no case finished for 120 s; stuck seeds {stuck:?} (replay with TWINSUM_CRASH_SEED=<seed>)"
            );
            std::process::exit(101);
        }
    }
}

/// Seeds that once found a bug, run on every test run whatever the seed
/// range; each says what it caught.
const ONCE_FAILED: &[u64] = &[
    // A table page evicted while a round set its pairs carried a
    // rewritten Pending block's pair, which drops a version that only the
    // round's log record names, before that record was durable.
    129_496,
    // A checkpoint begun between a round's record reservation and its
    // write moved replay past that record while the pairs it carried were
    // not yet in the cache (the first fix of the bug above).
    129_890,
];

#[test]
fn seeds_that_once_failed() {
    let figures = Figures::default();
    for &seed in ONCE_FAILED {
        if let Err(msg) = run_seed(seed, false, &figures) {
            panic!("seed {seed} failed: {msg}\n  replay with TWINSUM_CRASH_SEED={seed}");
        }
    }
}

#[test]
fn crash_model() {
    let figures = Figures::default();
    if let Some(seed) = env_u64("TWINSUM_CRASH_SEED") {
        eprintln!("replaying seed {seed}");
        let r = run_seed(seed, true, &figures);
        figures.report("", Duration::ZERO);
        if let Err(msg) = r {
            panic!("seed {seed} failed: {msg}");
        }
        return;
    }

    let seeds = env_u64("TWINSUM_CRASH_SEEDS").unwrap_or(DEFAULT_SEEDS);
    let first = env_u64("TWINSUM_CRASH_FIRST_SEED").unwrap_or(0);
    let started = Instant::now();
    let failures = run_seeds(first..first + seeds, &figures);
    figures.report("", started.elapsed());
    if !failures.is_empty() {
        let mut seeds: Vec<u64> = failures.iter().map(|(s, _)| *s).collect();
        seeds.sort_unstable();
        let (seed, msg) = failures.iter().min_by_key(|(s, _)| *s).unwrap();
        panic!(
            "{} of {} seeds failed (first few: {:?}); first: seed {seed}: {msg}\n  replay with TWINSUM_CRASH_SEED={seed}",
            failures.len(),
            seeds.len().max(1),
            &seeds[..seeds.len().min(20)]
        );
    }
    figures.require_every_case_ran(seeds);
    // Per 10,000 seeds; from half to four fifths of what the seeds reach
    // (the counts of crashes, keyed cases and cases with a metadata log
    // hardly vary: the last two are chosen from the seed, so nine tenths).
    if seeds >= 1000 {
        let f = &figures;
        figures.require_at_least(
            seeds,
            10_000,
            &[
                ("crash states", &f.crashes, 15_000),
                ("mid-operation crashes", &f.mid_op_crashes, 5_000),
                ("torn blocks detected", &f.torn_detected, 2_000),
                ("damaged blocks still detected", &f.damaged_detected, 400),
                ("process deaths", &f.process_deaths, 5_000),
                ("deaths during replay", &f.deaths_in_replay, 300),
                ("replayed writes", &f.replayed_writes, 2_000),
                ("replayed log records", &f.log_records_replayed, 30_000),
                (
                    "power cuts after a checkpoint taken while running",
                    &f.checkpoints_survived,
                    0,
                ),
                (
                    "blocks checked after a power cut",
                    &f.blocks_checked,
                    1_000_000,
                ),
                (
                    "blocks checked after a process death",
                    &f.blocks_checked_after_death,
                    500_000,
                ),
                ("reads checked live", &f.reads_checked, 150_000),
                ("keyed cases", &f.keyed_cases, 2_000),
                ("cases with a metadata log", &f.logged_cases, 6_000),
            ],
        );
    }
}
