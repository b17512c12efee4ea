//! Several threads submit batches to one engine at once, on a handful of
//! shared blocks (so rewrites race with in-flight writes and flushes of
//! other threads), and the power fails at a random device call while they
//! run. Judged from a [`History`] of logical issue and completion times.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use twinsum::integrity::{Engine, EngineError, EngineOptions};
use twinsum::io::volatile::testing::{FaultInjection, Fuse};

use crate::device::TestDevice;
use crate::figures::Figures;
use crate::model::{FlushRec, History, Possible, WriteRec};
use crate::support::{
    catching, env_u64, formatted_meta, fresh_content, key_for, log_for, log_start, spec_writes,
    submit, tag, Content, Outcome, Spec, DEFAULT_SEEDS,
};

/// The interleaving is up to the scheduler, so a failing seed may need
/// several replays (`TWINSUM_CONCURRENT_SEED=<seed>` replays it 200 times).
#[test]
fn concurrent_crash_model() {
    let figures = Figures::default();
    let (seeds, repeat, verbose): (Vec<u64>, usize, bool) = match env_u64("TWINSUM_CONCURRENT_SEED")
    {
        Some(seed) => (vec![seed], 200, true),
        None => {
            let n = env_u64("TWINSUM_CRASH_SEEDS").unwrap_or(DEFAULT_SEEDS) / 5;
            (
                (0..n.max(1))
                    .map(|s| s + env_u64("TWINSUM_CRASH_FIRST_SEED").unwrap_or(0))
                    .collect(),
                1,
                false,
            )
        }
    };
    let started = Instant::now();
    let mut failures = Vec::new();
    for &seed in &seeds {
        for _ in 0..repeat {
            let r = catching(|| ConcurrentCase::new(seed, verbose, &figures)?.run());
            if let Err(msg) = r {
                Figures::add(&figures.failed_cases, 1);
                eprintln!(
                    "concurrent seed {seed} FAILED: {msg}\n  replay with TWINSUM_CONCURRENT_SEED={seed}"
                );
                failures.push((seed, msg));
                break;
            }
        }
    }
    figures.report("concurrent ", started.elapsed());
    if let Some((seed, msg)) = failures.first() {
        panic!(
            "{} concurrent seeds failed; first: seed {seed}: {msg}\n  replay with TWINSUM_CONCURRENT_SEED={seed}",
            failures.len()
        );
    }
    let cases = (seeds.len() * repeat) as u64;
    figures.require_every_case_ran(cases);
    // Per 1,000 cases; from half to four fifths of what the seeds reach
    // (the counts of crashes, keyed cases and cases with a metadata log
    // hardly vary: the last two are chosen from the seed, so nine tenths). A replay
    // of one seed is judged by its checks alone.
    if repeat == 1 && cases >= 200 {
        let f = &figures;
        figures.require_at_least(
            cases,
            1_000,
            &[
                ("crash states", &f.crashes, 2_000),
                ("mid-operation crashes", &f.mid_op_crashes, 600),
                ("torn blocks detected", &f.torn_detected, 450),
                (
                    "blocks checked after a power cut",
                    &f.blocks_checked,
                    12_000,
                ),
                ("reads checked live", &f.reads_checked, 20_000),
                ("keyed cases", &f.keyed_cases, 200),
                ("cases with a metadata log", &f.logged_cases, 600),
                ("replayed log records", &f.log_records_replayed, 2_000),
                (
                    "power cuts after a checkpoint taken while running",
                    &f.checkpoints_survived,
                    700,
                ),
            ],
        );
    }
}

/// One concurrent seed: a disk, its engine options, and the rounds of
/// concurrent work each ended by a power cut.
struct ConcurrentCase<'f> {
    seed: u64,
    verbose: bool,
    rng: StdRng,
    bs: usize,
    blocks: u64,
    threads: usize,
    rounds: usize,
    opts: EngineOptions,
    zeros: Content,
    /// The durable data and metadata images the next round starts from.
    images: (Vec<u8>, Vec<u8>),
    /// Per block: the round's starting content and whether it verifies.
    start: Vec<(Content, bool)>,
    next_id: AtomicU64,
    figures: &'f Figures,
}

impl<'f> ConcurrentCase<'f> {
    fn new(seed: u64, verbose: bool, figures: &'f Figures) -> Result<Self, String> {
        let mut rng = StdRng::seed_from_u64(seed ^ 0xC0C0_C0C0_C0C0_C0C0);
        let bs: usize = if rng.gen_bool(0.5) { 512 } else { 4096 };
        let blocks: u64 = rng.gen_range(4..=16);
        let threads = rng.gen_range(2..=3);
        let mut opts = EngineOptions {
            key: key_for(seed),
            ..EngineOptions::default()
        };
        if rng.gen_ratio(1, 3) {
            opts.pending_limit = rng.gen_range(0..=3);
        }
        opts.write_cache = !rng.gen_ratio(1, 4);
        let salt = rng.gen();
        let meta_img = formatted_meta(bs, blocks, salt, false, opts.key.as_ref(), log_for(seed))?;
        let zeros: Content = vec![0u8; bs].into();
        let rounds = rng.gen_range(1..=4);
        if verbose {
            eprintln!("[concurrent {seed}] {blocks} blocks of {bs}, metadata log {:?}, {threads} threads, {rounds} rounds, pending_limit {}", log_for(seed), opts.pending_limit);
        }
        Ok(Self {
            seed,
            verbose,
            rng,
            bs,
            blocks,
            threads,
            rounds,
            opts,
            images: (vec![0u8; blocks as usize * bs], meta_img),
            start: vec![(zeros.clone(), true); blocks as usize],
            zeros,
            next_id: AtomicU64::new(1),
            figures,
        })
    }

    fn run(mut self) -> Outcome {
        for round in 0..self.rounds {
            self.round(round)?;
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

    /// Submitters at work until the power fails (at a random device call,
    /// or after they finish), then the survivors judged.
    fn round(&mut self, round: usize) -> Outcome {
        let fuse = Arc::new(Fuse::new());
        let (data_img, meta_img) = std::mem::take(&mut self.images);
        let data = TestDevice::image(data_img, Some(&fuse));
        let meta = TestDevice::image(meta_img, Some(&fuse));
        let engine = Engine::open(data.clone(), meta.clone(), self.opts.clone())
            .map_err(|e| format!("open in round {round}: {e}"))?;
        Figures::add(
            &self.figures.log_records_replayed,
            engine.replayed().log_records,
        );
        let opened_log_start = meta.log_start()?;
        if self.rng.gen_bool(0.6) {
            fuse.arm(self.rng.gen_range(0..150));
        }
        let history = History::default();
        let thread_seeds: Vec<u64> = (0..self.threads).map(|_| self.rng.gen()).collect();
        self.submit_concurrently(&engine, &fuse, &history, &thread_seeds)
            .map_err(|msg| format!("round {round}: {msg}"))?;
        if fuse.tripped() {
            Figures::add(&self.figures.mid_op_crashes, 1);
        }
        fuse.arm(0);
        data.power_cut(self.rng.gen()).map_err(|e| e.to_string())?;
        meta.power_cut(self.rng.gen()).map_err(|e| e.to_string())?;
        Figures::add(&self.figures.crashes, 1);
        drop(engine);
        self.images = (
            data.durable_snapshot().map_err(|e| e.to_string())?,
            meta.durable_snapshot().map_err(|e| e.to_string())?,
        );
        let survived = log_start(&self.images.1)?;
        if matches!((survived, opened_log_start), (Some(s), Some(o)) if s > o) {
            Figures::add(&self.figures.checkpoints_survived, 1);
        }
        self.judge_round(round, history)
    }

    /// One thread per seed in `thread_seeds`, each running its own steps;
    /// the first failure of any.
    fn submit_concurrently(
        &self,
        engine: &Engine,
        fuse: &Fuse,
        history: &History,
        thread_seeds: &[u64],
    ) -> Outcome {
        let failure: Mutex<Option<String>> = Mutex::new(None);
        let shared = Submitters {
            engine,
            fuse,
            history,
            start: &self.start,
            zeros: &self.zeros,
            next_id: &self.next_id,
            figures: self.figures,
            seed: self.seed,
            bs: self.bs,
            blocks: self.blocks,
            verbose: self.verbose,
        };
        std::thread::scope(|scope| {
            for &tseed in thread_seeds {
                let (shared, failure) = (&shared, &failure);
                scope.spawn(move || {
                    let mut rng = StdRng::seed_from_u64(tseed);
                    let steps = rng.gen_range(5..=30);
                    for _ in 0..steps {
                        if shared.fuse.tripped() || failure.lock().unwrap().is_some() {
                            return;
                        }
                        if let Err(msg) = shared.step(&mut rng) {
                            failure.lock().unwrap().get_or_insert(msg);
                            return;
                        }
                    }
                });
            }
        });
        match failure.into_inner().unwrap() {
            Some(msg) => Err(msg),
            None => Ok(()),
        }
    }

    /// Reopen on the survivors and judge every block against the round's
    /// history.
    fn judge_round(&mut self, round: usize, history: History) -> Outcome {
        let data = TestDevice::image(self.images.0.clone(), None);
        let meta = TestDevice::image(self.images.1.clone(), None);
        let engine = Engine::open(data, meta, self.opts.clone())
            .map_err(|e| format!("reopen after round {round}: {e}"))?;
        let writes = history.writes.into_inner().unwrap();
        let flushes = history.flushes.into_inner().unwrap();
        let bs = self.bs;
        let figures = self.figures;
        let mut buf = vec![0u8; bs];
        for b in 0..self.blocks {
            let s = &self.images.0[b as usize * bs..(b as usize + 1) * bs];
            let possible = Possible::new(b, &writes, &flushes, &self.start[b as usize]);
            let v = possible.judge(s);
            if !v.legit && !v.damaged && !v.known {
                return Err(format!(
                    "round {round}: block {b} holds {} which is neither a possible content nor a tear of possible contents: {}",
                    tag(s),
                    possible.describe()
                ));
            }
            let r = engine.read(b, &mut buf);
            Figures::add(&figures.blocks_checked, 1);
            match (v.legit, r) {
                (true, Ok(())) => {}
                (true, Err(EngineError::Mismatch { .. })) => {
                    Figures::add(&figures.false_mismatches, 1);
                    return Err(format!(
                        "FALSE MISMATCH after crash in round {round}: block {b} holds {}: {}",
                        tag(s),
                        possible.describe()
                    ));
                }
                (false, Err(EngineError::Mismatch { .. })) => {
                    Figures::add(
                        if v.damaged {
                            &figures.damaged_detected
                        } else {
                            &figures.torn_detected
                        },
                        1,
                    );
                }
                (false, Ok(())) => {
                    return Err(format!(
                        "round {round}: block {b}: torn or damaged content {} read back without error: {}",
                        tag(s),
                        possible.describe()
                    ))
                }
                (_, Err(e)) => return Err(format!("block {b}: read failed: {e}")),
            }
            self.start[b as usize] = (s.into(), v.legit);
        }
        Ok(())
    }
}

/// What the concurrent submitters of one round share.
struct Submitters<'a> {
    engine: &'a Engine,
    fuse: &'a Fuse,
    history: &'a History,
    /// Per block: the round's starting content and whether it verifies.
    start: &'a [(Content, bool)],
    zeros: &'a Content,
    next_id: &'a AtomicU64,
    figures: &'a Figures,
    seed: u64,
    bs: usize,
    blocks: u64,
    verbose: bool,
}

impl Submitters<'_> {
    /// One batch (or whole-engine action) of one submitter thread.
    fn step(&self, rng: &mut StdRng) -> Outcome {
        if rng.gen_ratio(1, 8) {
            return self.engine_action(rng);
        }
        let specs = self.gen_specs(rng);
        let history = self.history;
        let batch = history.next_batch.fetch_add(1, Ordering::SeqCst);
        let issued = history.tick();
        self.record(batch, &specs);
        let (results, reads) = submit(self.engine, &specs, self.bs);
        if self.fuse.tripped() {
            // Whatever this batch did may have been cut short: in flight.
            return Ok(());
        }
        let done = history.tick();
        if self.verbose {
            eprintln!("[batch {batch} @{issued}..{done}] {specs:?}");
        }
        self.completed((batch, issued, done), &specs, &results, &reads)
    }

    /// A whole-engine action racing the batches of the other threads. None
    /// adds a durability promise to the history (a flush record would need
    /// its start time relative to every write), so they can only add
    /// failures, never hide one.
    fn engine_action(&self, rng: &mut StdRng) -> Outcome {
        let engine = self.engine;
        let (what, r) = match rng.gen_range(0..10) {
            0..=5 => ("writeback", engine.writeback()),
            6 => ("enter_sync_mode", engine.enter_sync_mode()),
            7 => ("leave_sync_mode", engine.leave_sync_mode()),
            _ => ("make_clean", engine.make_clean().map(|_| ())),
        };
        if !self.fuse.tripped() {
            r.map_err(|e| format!("{what} failed: {e}"))?;
        }
        Ok(())
    }

    /// A batch of one to four requests on random blocks.
    fn gen_specs(&self, rng: &mut StdRng) -> Vec<Spec> {
        let blocks = self.blocks;
        let n = rng.gen_range(1..=4);
        let mut specs = Vec::new();
        for _ in 0..n {
            let block = rng.gen_range(0..blocks);
            // Mostly single blocks; sometimes a range that overlaps other
            // requests partially.
            let count = if rng.gen_ratio(1, 4) {
                rng.gen_range(1..=3).min(blocks - block)
            } else {
                1
            };
            specs.push(match rng.gen_range(0..100) {
                0..=49 => {
                    let contents = (0..count)
                        .map(|_| {
                            if rng.gen_ratio(1, 20) {
                                return self.zeros.clone();
                            }
                            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                            fresh_content(self.seed, id, self.bs)
                        })
                        .collect();
                    Spec::Write { block, contents }
                }
                50..=59 => Spec::Zero { block, count },
                60..=84 => Spec::Read { block, count },
                _ => Spec::Flush,
            });
        }
        specs
    }

    /// Record the writes of `specs` before submitting them: from now on
    /// they may land.
    fn record(&self, batch: u64, specs: &[Spec]) {
        let mut writes = self.history.writes.lock().unwrap();
        for (block, content) in spec_writes(specs, self.zeros) {
            writes.push(WriteRec {
                block,
                content,
                issue: self.history.tick(),
                complete: None,
                batch,
            });
        }
    }

    /// The batch returned before the power failed: its writes completed,
    /// its reads are judged, its flush is a promise.
    fn completed(
        &self,
        (batch, issued, done): (u64, u64, u64),
        specs: &[Spec],
        results: &[Result<(), EngineError>],
        reads: &[Vec<u8>],
    ) -> Outcome {
        {
            let mut writes = self.history.writes.lock().unwrap();
            for w in writes.iter_mut().filter(|w| w.batch == batch) {
                w.complete = Some(done);
            }
            for ((s, r), buf) in specs.iter().zip(results).zip(reads) {
                match (s, r) {
                    (Spec::Read { block, count }, r) => {
                        self.check_read(&writes, *block, *count, r, buf, (batch, issued, done))?;
                    }
                    (_, Ok(())) => {}
                    (s, Err(e)) => return Err(format!("{s:?} in batch {batch} failed: {e}")),
                }
            }
        }
        if specs.iter().any(|s| matches!(s, Spec::Flush)) {
            self.history.flushes.lock().unwrap().push(FlushRec {
                start: issued,
                batch,
            });
        }
        Ok(())
    }

    /// A read of a completed batch (`when`: batch, issue and completion
    /// time) returns only contents written to each block before it
    /// completed, or the round's verifying start content; it fails only on
    /// a block that was damaged at the start and not rewritten since.
    fn check_read(
        &self,
        writes: &[WriteRec],
        block: u64,
        count: u64,
        r: &Result<(), EngineError>,
        buf: &[u8],
        (batch, issued, done): (u64, u64, u64),
    ) -> Outcome {
        Figures::add(&self.figures.reads_checked, 1);
        let history_of = |b: u64| {
            let (s0, s0_ok) = &self.start[b as usize];
            let w: Vec<String> = writes
                .iter()
                .filter(|w| w.block == b)
                .map(|w| {
                    format!(
                        "{} (batch {}) @{}..{}",
                        tag(&w.content),
                        w.batch,
                        w.issue,
                        w.complete.map_or("inflight".into(), |c| c.to_string())
                    )
                })
                .collect();
            format!(
                "round start {}{}, writes [{}]",
                tag(s0),
                if *s0_ok { "" } else { " (damaged)" },
                w.join(", ")
            )
        };
        match r {
            Ok(()) => {
                for (b, got) in (block..).zip(buf.chunks(self.bs)) {
                    let (s0, s0_ok) = &self.start[b as usize];
                    let ok = (*s0_ok && **s0 == *got)
                        || writes
                            .iter()
                            .any(|w| w.block == b && w.issue < done && *w.content == *got);
                    if !ok {
                        return Err(format!(
                            "read of block {b} in batch {batch} @{issued}..{done} returned {}, which was never written there (or is damaged); {}",
                            tag(got),
                            history_of(b)
                        ));
                    }
                }
                Ok(())
            }
            Err(EngineError::Mismatch { block: bad }) => {
                let bad = *bad;
                let damaged = self.start.get(bad as usize).is_some_and(|s| !s.1);
                let rewritten = writes
                    .iter()
                    .any(|w| w.block == bad && w.complete.is_some_and(|c| c < issued));
                if (block..block + count).contains(&bad) && damaged && !rewritten {
                    return Ok(());
                }
                Figures::add(&self.figures.false_mismatches, 1);
                // On a mismatch the buffer still holds what the engine read.
                let seen = buf
                    .chunks(self.bs)
                    .nth(bad.saturating_sub(block) as usize)
                    .map_or("?".to_string(), tag);
                Err(format!(
                    "FALSE MISMATCH: concurrent read of {block}+{count} in batch {batch} @{issued}..{done} failed on block {bad} holding {seen}; {}",
                    history_of(bad)
                ))
            }
            Err(e) => Err(format!("read of {block}+{count} failed: {e}")),
        }
    }
}
