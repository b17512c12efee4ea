//! The write log and the crash-state generator on a real engine over real
//! files: every state of a recorded run checks clean and keeps what every
//! completed flush promised; one made illegal on purpose does not.

use std::fs;
use std::path::PathBuf;
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::states::{self, At, Cut, Fate, GuestCheck, Options, StatesError};
use super::*;
use crate::integrity::{Engine, EngineOptions};
use crate::io::{FileDevice, OpenFlags};
use crate::meta::{DeviceRef, Metadata, Superblock, MIN_LOG_SIZE};

const BLOCKS: u64 = 96;

struct Disk {
    dir: tempfile::TempDir,
    bs: u32,
}

impl Disk {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A formatted disk, with copies of it as the base.
    fn new(bs: u32, with_log: bool, seed: u64) -> Self {
        let d = Disk {
            dir: tempfile::tempdir().unwrap(),
            bs,
        };
        let size = BLOCKS * u64::from(bs);
        let data = FileDevice::create(&d.path("disk.img"), size, false, false).unwrap();
        // Some data before the log begins, so the base is not all holes.
        let mut rng = StdRng::seed_from_u64(seed);
        let mut sb = Superblock::new(bs, size, rng.gen()).unwrap();
        if with_log {
            sb = sb.with_log(MIN_LOG_SIZE);
        }
        let meta = FileDevice::create(&d.path("disk.meta"), sb.meta_len(), false, false).unwrap();
        drop(data);
        Metadata::create(Arc::new(meta), sb, 4).unwrap();
        states::sparse_copy(&d.path("disk.img"), &d.path("base.img")).unwrap();
        states::sparse_copy(&d.path("disk.meta"), &d.path("base.meta")).unwrap();
        d
    }

    fn open(&self, name: &str) -> DeviceRef {
        Arc::new(
            FileDevice::open(
                &self.path(name),
                OpenFlags {
                    writable: true,
                    lock: false,
                },
            )
            .unwrap(),
        )
    }

    fn options(&self, at: At, out: &str, seed: u64) -> Options {
        Options {
            log: self.path("run.log"),
            base: self.path("base.img"),
            base_meta: self.path("base.meta"),
            out: self.path(out),
            at,
            count: None,
            seed,
            key: None,
        }
    }
}

/// Serve one recorded session: `threads` writers doing writes, zeroes,
/// flushes and marks, with the guest records `blk::execute` makes, and a
/// write-back thread. The engine is small-cached so that metadata pages
/// are written outside any sync.
fn session(d: &Disk, seed: u64, threads: usize, ops: usize, clean_stop: bool) {
    let (data, meta) = (d.open("disk.img"), d.open("disk.meta"));
    let log = WriteLog::open(&d.path("run.log"), &meta).unwrap();
    let opts = EngineOptions {
        cache_pages: 2,
        pending_limit: 8,
        stage_bytes: 1 << 20,
        ..EngineOptions::default()
    };
    let engine = Arc::new(
        Engine::open(
            log.recording(Dev::Data, data),
            log.recording(Dev::Meta, meta),
            opts,
        )
        .unwrap(),
    );
    let bs = d.bs as usize;
    std::thread::scope(|s| {
        for t in 0..threads {
            let (engine, log) = (engine.clone(), log.clone());
            s.spawn(move || {
                let mut rng = StdRng::seed_from_u64(seed * 31 + t as u64);
                for i in 0..ops {
                    match rng.gen_range(0..20) {
                        0..=12 => {
                            let n = rng.gen_range(1..4u64);
                            let block = rng.gen_range(0..BLOCKS - n);
                            let mut buf = vec![0u8; n as usize * bs];
                            rng.fill(&mut buf[..]);
                            let began = log.position();
                            engine.write(block, &buf).unwrap();
                            log.guest_write(block, &buf, bs, began);
                        }
                        13 => {
                            let block = rng.gen_range(0..BLOCKS - 4);
                            let began = log.position();
                            engine.zero(block, 4).unwrap();
                            log.guest_zero(block, 4, began);
                        }
                        14..=17 => {
                            let began = log.position();
                            engine.flush().unwrap();
                            log.guest_flush(began);
                        }
                        18 => {
                            engine.writeback().unwrap();
                        }
                        _ => {
                            log.mark(&format!("t{t}-{i}")).unwrap();
                        }
                    }
                }
            });
        }
    });
    if clean_stop {
        engine.make_clean().unwrap();
        log.stop();
    } else {
        // A killed serve's stage outlives it and the next one replays it;
        // this engine's stage is in process memory, so write it out as
        // that replay would (a later flush covers these writes).
        engine.drain();
    }
}

/// Records of devices up to `cut`.
fn device_records(log: &LogFile, cut: u64) -> u64 {
    log.entries
        .iter()
        .filter(|e| e.seq <= cut)
        .filter(|e| matches!(e.record, Record::Write { .. } | Record::Zero { .. }))
        .count() as u64
}

fn generate_all(d: &Disk, seed: u64) -> (usize, usize) {
    let log = LogFile::open(&d.path("run.log")).unwrap();
    assert_eq!(log.torn_bytes, 0);
    let (mut states, mut promised) = (0, 0);
    for (at, out) in [(At::Flushes, "f"), (At::Marks, "m"), (At::Random, "r")] {
        let m = states::generate(&d.options(at, out, seed)).unwrap();
        for s in &m.states {
            assert!(
                s.ok(),
                "seed {seed} bs {}: {} at {} fails: mismatches {:?}, broken promises {:?}",
                d.bs,
                s.image,
                s.cut,
                s.mismatches,
                s.broken_promises
            );
            assert_eq!(
                s.kept + s.dropped + s.torn + s.durable,
                device_records(&log, s.cut),
                "every device record up to the cut has one fate"
            );
            assert_eq!(s.checked, BLOCKS);
            assert!(d.path(out).join(&s.image).exists() && d.path(out).join(&s.meta).exists());
            promised += s.promised as usize;
        }
        assert!(d.path(out).join("manifest.json").exists());
        let sum = log.summary();
        let want = match at {
            At::Flushes => sum.flushes as usize,
            At::Marks => sum.marks.len(),
            At::Random => 10.min(log.entries.len()),
        };
        assert_eq!(m.states.len(), want, "{at:?}: one state per instant");
        if at == At::Marks {
            let names: Vec<_> = m.states.iter().map(|s| s.mark.clone().unwrap()).collect();
            let marks: Vec<_> = sum.marks.iter().map(|k| k.name.clone()).collect();
            assert_eq!(names, marks);
        }
        states += m.states.len();
    }
    (states, promised)
}

#[test]
fn every_state_of_a_recorded_run_checks_clean_and_keeps_what_flushes_promised() {
    let mut total = (0, 0, 0u64);
    for seed in 0..12u64 {
        let bs = if seed % 2 == 0 { 4096 } else { 512 };
        let d = Disk::new(bs, seed % 3 != 0, seed);
        session(&d, seed, 1 + (seed % 3) as usize, 60, seed % 4 != 3);
        let (states, promised) = generate_all(&d, seed);
        let log = LogFile::open(&d.path("run.log")).unwrap();
        let t = states::cuts(&log, At::Random, Some(1000), seed)
            .iter()
            .map(|c| states::plan(&log, c).total())
            .fold((0, 0), |a, t| (a.0 + t.dropped, a.1 + t.torn));
        total = (total.0 + states, total.1 + promised, total.2 + t.0 + t.1);
    }
    let (states, promised, dropped_or_torn) = total;
    assert!(states > 300, "{states} states");
    assert!(promised > 1000, "{promised} promised blocks checked");
    assert!(dropped_or_torn > 100, "the states do drop and tear writes");
}

/// The same run recorded by two twinsum processes: the second appends.
#[test]
fn a_restarted_recorder_appends_after_the_last_good_record() {
    let d = Disk::new(4096, true, 7);
    session(&d, 7, 2, 40, false);
    let first = LogFile::open(&d.path("run.log")).unwrap();
    // A process killed in the middle of an append leaves a torn record.
    let mut bytes = fs::read(d.path("run.log")).unwrap();
    bytes.extend_from_slice(&[0x54, 0x57, 0x53, 0x52, 3, 1, 0, 0, 40]);
    fs::write(d.path("run.log"), &bytes).unwrap();
    assert_eq!(LogFile::open(&d.path("run.log")).unwrap().torn_bytes, 9);
    session(&d, 8, 2, 40, true);
    let both = LogFile::open(&d.path("run.log")).unwrap();
    assert_eq!(both.torn_bytes, 0);
    assert_eq!(both.entries[..first.entries.len()], first.entries[..]);
    let s = both.summary();
    assert_eq!((s.starts, s.stops), (2, 1));
    assert!(both.entries.len() > first.entries.len() + 10);
    let (states, _) = generate_all(&d, 7);
    assert!(states > 10);
}

#[test]
fn a_log_of_another_disk_is_refused_on_restart() {
    let d = Disk::new(4096, true, 1);
    session(&d, 1, 1, 10, true);
    let other = Disk::new(4096, true, 2);
    let meta = other.open("disk.meta");
    let e = WriteLog::open(&d.path("run.log"), &meta).unwrap_err();
    assert!(
        matches!(e, WriteLogError::OtherDisk { what: "salt", .. }),
        "{e}"
    );
}

#[test]
fn a_wrong_base_is_refused() {
    let d = Disk::new(4096, true, 3);
    session(&d, 3, 1, 40, true);
    // The metadata as it is now, not as it was when the log began.
    let mut o = d.options(At::Flushes, "x", 1);
    o.base_meta = d.path("disk.meta");
    let e = states::generate(&o).unwrap_err();
    assert!(matches!(e, StatesError::BaseMeta { .. }), "{e}");
    // The right metadata with the image as it is now.
    let mut o = d.options(At::Flushes, "x", 1);
    o.base = d.path("disk.img");
    let e = states::generate(&o).unwrap_err();
    assert!(matches!(e, StatesError::BaseImage { .. }), "{e}");
    let e = format!("{}", e);
    assert!(e.contains("not the image this log began with"), "{e}");
}

/// Build the state of `cut` with `plan` into fresh copies of the base;
/// return the data copy and what the checks find.
fn build_with(d: &Disk, log: &LogFile, cut: &Cut, plan: &states::Plan) -> (Vec<u64>, Vec<u64>) {
    let (img, meta) = (d.path("illegal.img"), d.path("illegal.meta"));
    let data = states::sparse_copy(&d.path("base.img"), &img).unwrap();
    let m = states::sparse_copy(&d.path("base.meta"), &meta).unwrap();
    states::apply(log, plan, &data, &m).unwrap();
    let broken = GuestCheck::at(log, cut).broken(&data, d.bs).unwrap();
    let v = states::verify(&data, Arc::new(m), None).unwrap();
    (broken, v.mismatches)
}

#[test]
fn a_state_that_drops_a_flushed_write_is_caught() {
    let d = Disk::new(4096, true, 5);
    session(&d, 5, 1, 80, true);
    let log = LogFile::open(&d.path("run.log")).unwrap();
    let cuts = states::cuts(&log, At::Flushes, None, 5);
    let cut = cuts.last().unwrap();
    let mut plan = states::plan(&log, cut);
    assert_eq!(build_with(&d, &log, cut, &plan), (vec![], vec![]));
    // The last durable data write: a flush covered it, and nothing later
    // overwrote it.
    let (k, _) = plan
        .fates
        .iter()
        .enumerate()
        .rfind(|(_, (i, f))| {
            *f == Fate::Durable
                && matches!(log.entries[*i].record, Record::Write { dev: Dev::Data, .. })
        })
        .unwrap();
    plan.fates[k].1 = Fate::Dropped;
    let (broken, _mismatches) = build_with(&d, &log, cut, &plan);
    let Record::Write { offset, len, .. } = log.entries[plan.fates[k].0].record else {
        unreachable!()
    };
    let first = offset / 4096;
    assert!(
        !broken.is_empty()
            && broken
                .iter()
                .all(|b| (first..first + len / 4096).contains(b)),
        "the dropped write's blocks break their promise: {broken:?}"
    );
}

#[test]
fn log_info_counts_what_was_recorded() {
    let d = Disk::new(512, false, 9);
    let meta = d.open("disk.meta");
    let data = d.open("disk.img");
    let log = WriteLog::open(&d.path("run.log"), &meta).unwrap();
    let data = log.recording(Dev::Data, data);
    data.write_at(&[1; 1024], 512).unwrap();
    data.sync().unwrap();
    log.guest_write(1, &[1; 1024], 512, 2);
    log.guest_flush(0);
    assert_eq!(log.mark("after-first").unwrap(), 5);
    assert!(matches!(log.mark(""), Err(WriteLogError::MarkName(0))));
    data.zero_range(0, 512).unwrap();
    log.guest_zero(0, 1, 6);
    log.stop();
    let f = LogFile::open(&d.path("run.log")).unwrap();
    let s = f.summary();
    assert_eq!(s.entries, 9);
    assert_eq!(
        (s.writes, s.write_blocks, s.zeroes, s.flushes),
        (1, 2, 1, 1)
    );
    assert_eq!(
        s.marks,
        vec![format::MarkAt {
            name: "after-first".into(),
            position: 5
        }]
    );
    assert_eq!(
        (
            s.data.writes,
            s.data.write_bytes,
            s.data.syncs,
            s.data.zeroes
        ),
        (1, 1024, 1, 1)
    );
    assert_eq!(s.meta, format::DeviceSummary::default());
    let mut buf = Vec::new();
    let Record::Write { data_pos, len, .. } = f.entries[1].record else {
        panic!("{:?}", f.entries[1])
    };
    f.read_data(data_pos, len, &mut buf).unwrap();
    assert_eq!(buf, vec![1; 1024]);
    // Flipping any byte of a record ends the log there.
    let mut bytes = fs::read(d.path("run.log")).unwrap();
    bytes[format::HEADER_LEN as usize + 32 + 8 + 16 + 100] ^= 1;
    fs::write(d.path("run.log"), &bytes).unwrap();
    let f = LogFile::open(&d.path("run.log")).unwrap();
    assert_eq!(f.entries.len(), 1);
    assert!(f.torn_bytes > 1024);
}
