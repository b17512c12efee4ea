//! What a run counted, the line it prints, and the least it must have
//! reached: a model that never crashes, never tears a block or never
//! replays a stage would otherwise pass without having tested anything.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

#[derive(Default)]
pub struct Figures {
    pub cases: AtomicU64,
    /// Power cuts (the host lost power).
    pub crashes: AtomicU64,
    pub mid_op_crashes: AtomicU64,
    pub blocks_checked: AtomicU64,
    pub reads_checked: AtomicU64,
    pub false_mismatches: AtomicU64,
    pub torn_detected: AtomicU64,
    pub damaged_detected: AtomicU64,
    pub keyed_cases: AtomicU64,
    pub failed_cases: AtomicU64,
    /// Deaths of the process (not the host): the devices' caches and the
    /// write-back stage survive.
    pub process_deaths: AtomicU64,
    /// ... of which during the replay of an earlier death's stage.
    pub deaths_in_replay: AtomicU64,
    /// Completed writes that a restarted engine replayed from the stage.
    pub replayed_writes: AtomicU64,
    pub blocks_checked_after_death: AtomicU64,
    /// Cases on metadata with a log (format version 2).
    pub logged_cases: AtomicU64,
    /// Metadata log records an engine replayed over the pair table at open.
    pub log_records_replayed: AtomicU64,
    /// Power cuts whose surviving metadata starts replay from a later
    /// checkpoint than the one the engine was opened on: a checkpoint
    /// taken while running (log half full, a full log committing a round,
    /// a write-back or clean stop) was durable, and replay after it starts
    /// from the moved tail.
    pub checkpoints_survived: AtomicU64,
}

impl Figures {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Print the run's line (`label` names the suite).
    pub fn report(&self, label: &str, elapsed: Duration) {
        let f = self;
        eprintln!(
            "{label}crash model: {} cases ({} keyed, {} with a metadata log, {} failed), {} crashes ({} power cuts, {} process deaths of which {} during replay; {} mid-operation), {} writes replayed from the stage, {} metadata log records replayed, {} power cuts after a checkpoint taken while running, {} blocks checked after power cuts, {} after process deaths, {} reads checked live, {} false mismatches, {} torn blocks detected, {} damaged blocks still detected, {:.1} s",
            Self::get(&f.cases),
            Self::get(&f.keyed_cases),
            Self::get(&f.logged_cases),
            Self::get(&f.failed_cases),
            Self::get(&f.crashes) + Self::get(&f.process_deaths),
            Self::get(&f.crashes),
            Self::get(&f.process_deaths),
            Self::get(&f.deaths_in_replay),
            Self::get(&f.mid_op_crashes),
            Self::get(&f.replayed_writes),
            Self::get(&f.log_records_replayed),
            Self::get(&f.checkpoints_survived),
            Self::get(&f.blocks_checked),
            Self::get(&f.blocks_checked_after_death),
            Self::get(&f.reads_checked),
            Self::get(&f.false_mismatches),
            Self::get(&f.torn_detected),
            Self::get(&f.damaged_detected),
            elapsed.as_secs_f64()
        );
    }

    /// Every one of `cases` ran to its end and passed: none skipped by the
    /// runner, none counted twice, and no false mismatch anywhere.
    pub fn require_every_case_ran(&self, cases: u64) {
        let passed = Self::get(&self.cases);
        assert_eq!(passed, cases, "{passed} cases passed of {cases} run");
        assert_eq!(Self::get(&self.false_mismatches), 0, "false mismatches");
    }

    /// Require each `(what, counter, least)`, where `least` is what `per`
    /// cases must reach at the least; `cases` ran. The figures sit well
    /// below what the seeds reach and far above what a device that never
    /// loses a write (or an engine that never tears) could produce.
    pub fn require_at_least(&self, cases: u64, per: u64, minimums: &[(&str, &AtomicU64, u64)]) {
        for &(what, have, least) in minimums {
            let have = Self::get(have);
            let need = least * cases / per;
            assert!(
                have >= need,
                "only {have} {what} in {cases} cases (at least {need} expected)"
            );
        }
    }
}
