//! Engine behaviour over in-memory devices. The crash-model test
//! (tests/crash_model/) covers power cuts; these cover the transitions.

use std::io;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use super::*;
use crate::integrity::hash::ZERO;
use crate::io::{Device, MemDevice};
use crate::meta::{MetaError, Metadata, Pair, Superblock};

/// An in-memory device whose writes are immediately durable, which counts
/// syncs and can be told to fail writes.
struct Mem {
    inner: MemDevice,
    syncs: AtomicU64,
    fail_writes: AtomicBool,
}

impl Mem {
    fn new(size: usize) -> Arc<Self> {
        Arc::new(Self {
            inner: MemDevice::new(size as u64),
            syncs: AtomicU64::new(0),
            fail_writes: AtomicBool::new(false),
        })
    }
    fn poke(&self, offset: usize, f: impl FnOnce(&mut u8)) {
        let mut b = [0u8];
        self.inner.read_at(&mut b, offset as u64).unwrap();
        f(&mut b[0]);
        self.inner.write_at(&b, offset as u64).unwrap();
    }
    fn copy(&self, from: usize, to: usize, len: usize) {
        let mut buf = vec![0u8; len];
        self.inner.read_at(&mut buf, from as u64).unwrap();
        self.inner.write_at(&buf, to as u64).unwrap();
    }
}

impl Device for Mem {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.fail_writes.load(Ordering::SeqCst) {
            return Err(io::Error::other("injected write failure"));
        }
        self.inner.write_at(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        self.syncs.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.zero_range(offset, len)
    }
}

struct Disk {
    data: Arc<Mem>,
    meta: Arc<Mem>,
}

impl Disk {
    fn new(bs: u32, blocks: u64) -> Self {
        Self::formatted(bs, blocks, None)
    }
    /// Format version 3: with a metadata log whose records carry versions.
    fn logged(bs: u32, blocks: u64) -> Self {
        Self::formatted(bs, blocks, Some(64 << 10))
    }
    fn formatted(bs: u32, blocks: u64, log: Option<u64>) -> Self {
        let size = bs as u64 * blocks;
        let data = Mem::new(size as usize);
        let mut sb = Superblock::new(bs, size, 0x5eed).unwrap();
        if let Some(log) = log {
            sb = sb.with_log(log);
        }
        let meta = Mem::new(sb.meta_len() as usize);
        // As `twinsum format` leaves it: clean.
        sb.clean = true;
        Metadata::create(meta.clone(), sb, 64).unwrap();
        Self { data, meta }
    }
    fn open(&self, opts: EngineOptions) -> Engine {
        Engine::open(self.data.clone(), self.meta.clone(), opts).unwrap()
    }
    fn engine(&self) -> Engine {
        self.open(EngineOptions::default())
    }
    /// Without the write-back stage: a completed write is on the device.
    fn write_through(&self) -> Engine {
        self.open(EngineOptions {
            write_cache: false,
            ..Default::default()
        })
    }
}

fn pattern(bs: usize, blocks: usize, seed: u8) -> Vec<u8> {
    // Different in every byte position of every block, never all zero.
    (0..bs * blocks)
        .map(|i| {
            let x = (i as u64 ^ u64::from(seed) << 40).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            (x >> 56) as u8 | 1
        })
        .collect()
}

#[test]
fn writes_read_back_at_both_block_sizes() {
    for bs in [512u32, 4096] {
        let disk = Disk::new(bs, 32);
        let e = disk.engine();
        let data = pattern(bs as usize, 5, 7);
        e.write(3, &data).unwrap();
        let mut back = vec![0; data.len()];
        e.read(3, &mut back).unwrap();
        assert_eq!(back, data);
        // Untouched blocks read as zeros.
        let mut z = vec![1; bs as usize];
        e.read(20, &mut z).unwrap();
        assert!(z.iter().all(|&b| b == 0));
    }
}

#[test]
fn a_flipped_byte_fails_exactly_its_block() {
    let disk = Disk::new(512, 16);
    let e = disk.engine();
    e.write(0, &pattern(512, 16, 1)).unwrap();
    e.flush().unwrap();
    disk.data.poke(5 * 512 + 100, |b| *b ^= 0x10);
    let mut buf = vec![0; 512];
    for b in 0..16 {
        let r = e.read(b, &mut buf);
        if b == 5 {
            assert!(
                matches!(r, Err(EngineError::Mismatch { block: 5 })),
                "{r:?}"
            );
        } else {
            r.unwrap();
        }
    }
    assert_eq!(e.stats().mismatches, 1);
    let mut all = vec![0; 16 * 512];
    assert!(matches!(
        e.read(0, &mut all),
        Err(EngineError::Mismatch { block: 5 })
    ));
}

#[test]
fn on_mismatch_log_returns_the_data() {
    let disk = Disk::new(512, 4);
    let e = disk.open(EngineOptions {
        on_mismatch: OnMismatch::Log,
        ..Default::default()
    });
    e.write(1, &pattern(512, 1, 3)).unwrap();
    e.drain();
    disk.data.poke(512, |b| *b ^= 1);
    let mut buf = vec![0; 512];
    e.read(1, &mut buf).unwrap();
    assert_eq!(e.stats().mismatches, 1);
}

#[test]
fn a_try_read_reports_a_mismatch_without_counting_it_whatever_on_mismatch_says() {
    let disk = Disk::new(512, 4);
    let e = disk.open(EngineOptions {
        on_mismatch: OnMismatch::Log,
        ..Default::default()
    });
    e.write(0, &pattern(512, 4, 3)).unwrap();
    e.drain();
    let reads = e.stats().reads;
    let mut buf = vec![0; 4 * 512];
    let r = e.submit(&mut [Op::TryRead {
        block: 0,
        buf: &mut buf,
    }]);
    assert!(r[0].is_ok(), "{r:?}");
    assert_eq!(buf, pattern(512, 4, 3));
    disk.data.poke(2 * 512 + 7, |b| *b ^= 1);
    let r = e.submit(&mut [Op::TryRead {
        block: 0,
        buf: &mut buf,
    }]);
    assert!(
        matches!(r[0], Err(EngineError::Mismatch { block: 2 })),
        "{r:?}"
    );
    assert!(buf.iter().all(|&b| b == 0), "nothing unverified is left");
    let s = e.stats();
    assert_eq!((s.mismatches, s.reads), (0, reads), "{s:?}");
    assert!(e.recent_mismatches().is_empty());
    // The real read that follows is the one that tells.
    e.read(0, &mut buf).unwrap();
    assert_eq!(e.stats().mismatches, 1);
}

#[test]
fn a_block_written_at_another_place_does_not_verify() {
    let disk = Disk::new(4096, 8);
    let e = disk.engine();
    e.write(0, &pattern(4096, 8, 9)).unwrap();
    e.flush().unwrap();
    disk.data.copy(2 * 4096, 6 * 4096, 4096);
    let mut buf = vec![0; 4096];
    assert!(matches!(
        e.read(6, &mut buf),
        Err(EngineError::Mismatch { block: 6 })
    ));
    e.read(2, &mut buf).unwrap();
}

#[test]
fn content_older_than_a_written_back_flush_is_caught() {
    let disk = Disk::new(512, 4);
    let e = disk.engine();
    let v1 = pattern(512, 1, 1);
    let v2 = pattern(512, 1, 2);
    e.write(2, &v1).unwrap();
    e.flush().unwrap();
    e.write(2, &v2).unwrap();
    e.flush().unwrap();
    e.writeback().unwrap();
    // The disk "loses" the second write.
    disk.data.write_at(&v1, 2 * 512).unwrap();
    let mut buf = vec![0; 512];
    assert!(e.read(2, &mut buf).is_err());
    // Before the flush was written back, both would have verified; a fresh
    // engine on the written-back metadata still refuses it.
    drop(e);
    assert!(disk.engine().read(2, &mut buf).is_err());
}

/// Rewrite blocks 1 and 3 in one batch and wait until it is written;
/// returns their new contents.
fn rewrite_blocks_1_and_3(e: &Engine) -> (Vec<u8>, Vec<u8>) {
    let (a, b) = (pattern(512, 1, 2), pattern(512, 1, 3));
    let r = e.submit(&mut [
        Op::Write { block: 1, data: &a },
        Op::Write { block: 3, data: &b },
    ]);
    assert!(r.iter().all(Result::is_ok));
    e.drain();
    (a, b)
}

#[test]
fn rewriting_a_pending_block_syncs_data_once_per_batch() {
    // Without the write-back stage: the batch's own sync.
    let disk = Disk::new(512, 8);
    let e = disk.write_through();
    e.write(0, &pattern(512, 4, 1)).unwrap();
    e.drain();
    let before = disk.data.syncs.load(Ordering::SeqCst);
    // Blocks 0..4 are Pending: rewriting two of them needs one sync.
    let (a, _) = rewrite_blocks_1_and_3(&e);
    assert_eq!(disk.data.syncs.load(Ordering::SeqCst), before + 1);
    // Writing a Clean block needs none.
    e.write(6, &a).unwrap();
    e.drain();
    assert_eq!(disk.data.syncs.load(Ordering::SeqCst), before + 1);
}

#[test]
fn version_3_rewrites_without_a_sync_and_a_crash_leaves_every_version_readable() {
    let disk = Disk::logged(512, 8);
    let e = disk.write_through();
    let v: Vec<Vec<u8>> = (1..=4).map(|s| pattern(512, 1, s)).collect();
    e.write(2, &v[0]).unwrap();
    let before = disk.data.syncs.load(Ordering::SeqCst);
    // Pending block 2 rewritten three times: no data sync, its log records
    // carry the versions its pair cannot.
    for x in &v[1..] {
        e.write(2, x).unwrap();
    }
    assert_eq!(disk.data.syncs.load(Ordering::SeqCst), before);
    let mut buf = vec![0u8; 512];
    e.read(2, &mut buf).unwrap();
    assert_eq!(buf, v[3]);
    // The process dies and a power cut keeps the first version only (the
    // memory devices hold what was written: put it back by hand).
    std::mem::forget(e);
    disk.data.inner.write_at(&v[0], 2 * 512).unwrap();

    // `check` judges it against the versions the log carries.
    let mut meta = Metadata::open(disk.meta.clone(), 16).unwrap();
    assert_eq!(
        meta.extra_versions(2).len(),
        3,
        "zeros, v1 and v2 beyond the pair"
    );
    let report = crate::integrity::verify::verify_all(&mut meta, &*disk.data, &|_| ()).unwrap();
    assert_eq!(report.mismatches.count, 0);
    // So does a read-only engine, without writing...
    let ro = disk.open(EngineOptions {
        readonly: true,
        ..Default::default()
    });
    ro.read(2, &mut buf).unwrap();
    assert_eq!(buf, v[0]);
    drop(ro);
    // ... and a writer resolves it from the data, for good.
    let e = disk.engine();
    e.read(2, &mut buf).unwrap();
    assert_eq!(buf, v[0]);
    drop(e);
    let mut meta = Metadata::open(disk.meta.clone(), 16).unwrap();
    assert!(meta.extra_versions(2).is_empty());
    assert_eq!(meta.get(2).unwrap().new, meta.get(2).unwrap().old);
    // Content the log never named still fails.
    disk.data
        .inner
        .write_at(&pattern(512, 1, 9), 2 * 512)
        .unwrap();
    let e = disk.engine();
    assert!(e.read(2, &mut buf).is_err());
}

#[test]
fn a_version_2_disk_still_syncs_before_a_rewrite() {
    let disk = Disk::logged(512, 8);
    // Rewrite the superblock as version 2, whose records carry pairs only.
    let mut sb = Metadata::open(disk.meta.clone(), 16)
        .unwrap()
        .superblock()
        .clone();
    sb.version = crate::meta::VERSION_LOG;
    Metadata::create(disk.meta.clone(), sb, 16).unwrap();
    let e = disk.write_through();
    e.write(2, &pattern(512, 1, 1)).unwrap();
    let before = disk.data.syncs.load(Ordering::SeqCst);
    e.write(2, &pattern(512, 1, 2)).unwrap();
    assert_eq!(disk.data.syncs.load(Ordering::SeqCst), before + 1);
}

#[test]
fn a_few_rewrites_through_the_stage_settle_just_their_blocks() {
    let disk = Disk::new(512, 8);
    let e = disk.engine();
    e.write(0, &pattern(512, 4, 1)).unwrap();
    e.drain();
    assert_eq!(e.stats().pending, 4);
    let before = disk.data.syncs.load(Ordering::SeqCst);
    let (a, b) = rewrite_blocks_1_and_3(&e);
    // One range sync per rewritten block (1 and 3 are not adjacent), and
    // blocks 0 and 2, which no sync of the whole device covered, are
    // still Pending beside the two rewrites.
    assert_eq!(disk.data.syncs.load(Ordering::SeqCst), before + 2);
    assert_eq!(e.stats().pending, 4);
    let mut buf = vec![0; 4 * 512];
    e.read(0, &mut buf).unwrap();
    let old = pattern(512, 4, 1);
    assert_eq!(buf[..512], old[..512]);
    assert_eq!(buf[512..1024], a[..]);
    assert_eq!(buf[1024..1536], old[1024..1536]);
    assert_eq!(buf[1536..], b[..]);
}

#[test]
fn the_same_block_twice_in_a_batch_ends_with_the_later_write() {
    let disk = Disk::new(512, 8);
    let e = disk.engine();
    let (a, b) = (pattern(512, 2, 2), pattern(512, 1, 3));
    let r = e.submit(&mut [
        Op::Write { block: 0, data: &a },
        Op::Write { block: 1, data: &b },
    ]);
    assert!(r.iter().all(Result::is_ok));
    let mut buf = vec![0; 1024];
    e.read(0, &mut buf).unwrap();
    assert_eq!(&buf[..512], &a[..512]);
    assert_eq!(&buf[512..], &b[..]);
}

#[test]
fn flush_forgets_old_checksums_lazily() {
    let disk = Disk::new(512, 8);
    let e = disk.engine();
    let v = pattern(512, 1, 4);
    e.write(1, &v).unwrap();
    e.drain();
    let h = Checksum::xxh3(0x5eed).block_hash(1, &v);
    let pair = |e: &Engine| e.lock().meta.get(1).unwrap();
    assert_eq!(pair(&e), Pair { new: h, old: ZERO });
    e.flush().unwrap();
    assert_eq!(pair(&e), Pair { new: h, old: h });
    assert_eq!(e.stats().pending, 0);
    // On disk the old slot is still there until write-back.
    let on_disk = |disk: &Disk| {
        let mut raw = [0u8; 16];
        disk.meta
            .read_at(&mut raw, crate::meta::TABLE_OFFSET + 16)
            .unwrap();
        (
            u64::from_le_bytes(raw[..8].try_into().unwrap()),
            u64::from_le_bytes(raw[8..].try_into().unwrap()),
        )
    };
    assert_eq!(on_disk(&disk), (h, ZERO));
    e.writeback().unwrap();
    assert_eq!(on_disk(&disk), (h, h));
}

#[test]
fn zeroing_reads_back_zeros_and_costs_no_pairs_on_a_fresh_disk() {
    let disk = Disk::new(4096, 16);
    let e = disk.engine();
    e.write(4, &pattern(4096, 4, 5)).unwrap();
    e.zero(0, 16).unwrap();
    let mut buf = vec![1; 16 * 4096];
    e.read(0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    // Only the four written blocks were Pending.
    assert_eq!(e.stats().pending, 4);
}

#[test]
fn readonly_refuses_writes_and_out_of_range_is_refused() {
    let disk = Disk::new(512, 8);
    let e = disk.open(EngineOptions {
        readonly: true,
        ..Default::default()
    });
    assert!(matches!(e.write(0, &[1; 512]), Err(EngineError::ReadOnly)));
    assert!(matches!(e.zero(0, 1), Err(EngineError::ReadOnly)));
    let e = disk.engine();
    let mut buf = vec![0; 1024];
    assert!(matches!(
        e.read(7, &mut buf),
        Err(EngineError::OutOfRange {
            block: 7,
            count: 2,
            ..
        })
    ));
    assert!(matches!(
        e.read(u64::MAX, &mut buf),
        Err(EngineError::OutOfRange { .. })
    ));
    assert!(matches!(
        e.write(0, &[1; 100]),
        Err(EngineError::Unaligned { len: 100, .. })
    ));
}

#[test]
fn the_pending_set_is_bounded() {
    let disk = Disk::new(512, 64);
    let e = disk.open(EngineOptions {
        pending_limit: 8,
        ..Default::default()
    });
    for b in 0..64 {
        e.write(b, &pattern(512, 1, b as u8)).unwrap();
        e.drain();
        assert!(e.stats().pending <= 8, "pending {}", e.stats().pending);
    }
    assert!(e.stats().data_syncs >= 7);
}

#[test]
fn sync_mode_leaves_metadata_current_after_every_write() {
    let disk = Disk::new(512, 8);
    let e = disk.engine();
    e.enter_sync_mode().unwrap();
    assert!(e.sync_mode());
    let v = pattern(512, 1, 6);
    e.write(3, &v).unwrap();
    // No flush, no write-back: the metadata device already has (h, h).
    let fresh = Metadata::open(disk.meta.clone(), 16);
    let mut fresh = fresh.unwrap();
    let h = Checksum::xxh3(0x5eed).block_hash(3, &v);
    assert_eq!(fresh.get(3).unwrap(), Pair { new: h, old: h });
    assert!(fresh.superblock().sync_mode);
    e.leave_sync_mode().unwrap();
    assert!(!e.sync_mode());
}

#[test]
fn make_clean_marks_the_superblock_and_the_next_write_dirties_it() {
    let disk = Disk::new(512, 8);
    let e = disk.engine();
    assert!(e.was_clean());
    e.write(0, &pattern(512, 1, 1)).unwrap();
    e.drain();
    assert!(
        !Metadata::open(disk.meta.clone(), 16)
            .unwrap()
            .superblock()
            .clean
    );
    e.make_clean().unwrap();
    assert!(
        Metadata::open(disk.meta.clone(), 16)
            .unwrap()
            .superblock()
            .clean
    );
    e.write(1, &pattern(512, 1, 2)).unwrap();
    e.drain();
    drop(e);
    assert!(!disk.engine().was_clean());
}

#[test]
fn a_pair_left_by_a_crash_is_resolved_before_the_next_write() {
    let disk = Disk::new(512, 4);
    let e = disk.engine();
    let (v1, v2, v3) = (pattern(512, 1, 1), pattern(512, 1, 2), pattern(512, 1, 3));
    e.write(0, &v1).unwrap();
    e.flush().unwrap();
    e.write(0, &v2).unwrap();
    // "Crash": the pair on disk is (c(v2), c(v1)); the data device lost v2.
    e.writeback().unwrap();
    drop(e);
    disk.data.write_at(&v1, 0).unwrap();
    let e = disk.engine();
    assert!(!e.was_clean());
    let mut buf = vec![0; 512];
    e.read(0, &mut buf).unwrap();
    assert_eq!(buf, v1);
    // A new write must keep c(v1) as old: the disk holds v1, not v2.
    e.write(0, &v3).unwrap();
    let h1 = Checksum::xxh3(0x5eed).block_hash(0, &v1);
    assert_eq!(e.lock().meta.get(0).unwrap().old, h1);
}

#[test]
fn concurrent_writers_and_readers_see_no_false_mismatch() {
    let disk = Disk::new(512, 16);
    let e = Arc::new(disk.engine());
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let e = e.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0; 4 * 512];
                for i in 0..200u32 {
                    let block = u64::from((i * 7 + u32::from(t) * 3) % 13);
                    e.write(block, &pattern(512, 4, t.wrapping_add(i as u8)))
                        .unwrap();
                    e.read((block + 2) % 13, &mut buf).unwrap();
                    if i % 17 == 0 {
                        e.flush().unwrap();
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let mut all = vec![0; 16 * 512];
    e.read(0, &mut all).unwrap();
    assert_eq!(e.stats().mismatches, 0);
}

#[test]
fn a_write_back_failure_fails_the_next_flush() {
    let disk = Disk::new(512, 8);
    let e = disk.engine();
    disk.data.fail_writes.store(true, Ordering::SeqCst);
    // Completes: the data is held by the write-back stage.
    e.write(2, &pattern(512, 1, 1)).unwrap();
    let err = e.flush().unwrap_err();
    let text = crate::error::Chain(&err).to_string();
    assert!(text.contains("injected write failure"), "{text}");
    // Reported once; the block's pair still covers what the disk holds.
    disk.data.fail_writes.store(false, Ordering::SeqCst);
    e.flush().unwrap();
    let mut buf = vec![0; 512];
    e.read(2, &mut buf).unwrap();
}

/// A round that fails part-way through setting its pairs (a dirty table
/// page that cannot be written back to make room) leaves no block of it
/// marked in flight: a later write of those blocks would wait for that
/// write forever.
#[test]
fn a_round_failing_while_it_sets_its_pairs_leaves_nothing_in_flight() {
    // 256 pairs per table page: one write over 17 pages, through a cache
    // of 16, must write back a page it dirtied itself.
    let disk = Disk::new(512, 4400);
    let e = Arc::new(disk.open(EngineOptions {
        write_cache: false,
        cache_pages: 16,
        ..Default::default()
    }));
    // The superblock is marked dirty by the first write, not this one.
    e.write(4399, &pattern(512, 1, 3)).unwrap();
    disk.meta.fail_writes.store(true, Ordering::SeqCst);
    assert!(e.write(0, &pattern(512, 17 * 256, 1)).is_err());
    disk.meta.fail_writes.store(false, Ordering::SeqCst);

    // On another thread, so that a hang fails the test instead of
    // stalling it.
    let one = pattern(512, 1, 2);
    let (tx, rx) = std::sync::mpsc::channel();
    let (writer, data) = (e.clone(), one.clone());
    std::thread::spawn(move || tx.send(writer.write(0, &data).is_ok()));
    let done = rx.recv_timeout(std::time::Duration::from_secs(30));
    assert_eq!(done, Ok(true), "the rewrite completes");
    e.flush().unwrap();
    let mut back = vec![0; 512];
    e.read(0, &mut back).unwrap();
    assert_eq!(back, one);
    assert_eq!(e.stats().mismatches, 0);
}

/// A round whose checksums could not be made durable never wrote its
/// data: the next data sync must not forget the old checksum in favour of
/// one whose content never reached the disk.
#[test]
fn a_failed_metadata_commit_is_no_false_mismatch_after_the_next_flush() {
    let disk = Disk::new(512, 8);
    let e = disk.write_through();
    let first = pattern(512, 1, 1);
    e.write(2, &first).unwrap();
    e.flush().unwrap();

    disk.meta.fail_writes.store(true, Ordering::SeqCst);
    assert!(e.write(2, &pattern(512, 1, 2)).is_err());
    disk.meta.fail_writes.store(false, Ordering::SeqCst);
    e.flush().unwrap();

    let mut back = vec![0; 512];
    e.read(2, &mut back).unwrap();
    assert_eq!(back, first);
    assert_eq!(e.stats().mismatches, 0);
}

#[test]
fn a_queued_write_is_read_back_before_it_reaches_the_disk() {
    let disk = Disk::new(4096, 64);
    let e = disk.engine();
    let mut buf = vec![0; 4096];
    for round in 0..50u8 {
        let v = pattern(4096, 1, round);
        e.write(u64::from(round % 7), &v).unwrap();
        e.read(u64::from(round % 7), &mut buf).unwrap();
        assert_eq!(buf, v, "round {round}");
    }
}

/// A long read over a few queued blocks takes those from the stage and the
/// rest from the disk, each in its place.
#[test]
fn a_long_read_mixes_queued_blocks_with_the_disk() {
    let disk = Disk::new(4096, 64);
    let e = disk.engine();
    let mut expect = vec![0; 8 * 4096];
    for b in 0..8u64 {
        let v = pattern(4096, 1, b as u8);
        e.write(b, &v).unwrap();
        expect[b as usize * 4096..(b as usize + 1) * 4096].copy_from_slice(&v);
    }
    e.flush().unwrap();
    let mut buf = vec![0; 8 * 4096];
    for round in 0..50u8 {
        let b = u64::from(round % 8);
        let v = pattern(4096, 1, round.wrapping_add(100));
        e.write(b, &v).unwrap();
        expect[b as usize * 4096..(b as usize + 1) * 4096].copy_from_slice(&v);
        e.read(0, &mut buf).unwrap();
        assert!(buf == expect, "round {round}");
    }
}

#[test]
fn without_the_write_cache_a_completed_write_is_on_the_disk() {
    let disk = Disk::new(512, 8);
    let e = disk.write_through();
    let v = pattern(512, 1, 9);
    e.write(3, &v).unwrap();
    let mut raw = vec![0; 512];
    disk.data.read_at(&mut raw, 3 * 512).unwrap();
    assert_eq!(raw, v);
    assert_eq!(e.stats().queued, 0);
}

// ---- keyed checksums --------------------------------------------------

fn test_key(byte: u8) -> Key {
    Key::from_bytes(&[byte; 32]).unwrap()
}

impl Disk {
    /// As `twinsum format --key-file` leaves it.
    fn keyed(bs: u32, blocks: u64, key: &Key) -> Self {
        let size = bs as u64 * blocks;
        let data = Mem::new(size as usize);
        let meta = Mem::new(crate::meta::meta_len(blocks) as usize);
        let mut sb = Superblock::new(bs, size, 0x5eed).unwrap();
        sb.hash_id = crate::meta::HASH_BLAKE3_KEYED;
        sb.clean = true;
        Metadata::create_with(meta.clone(), sb, 64, Some(key)).unwrap();
        Self { data, meta }
    }

    fn keyed_engine(&self, key: Option<&Key>) -> Result<Engine, EngineError> {
        let opts = EngineOptions {
            key: key.cloned(),
            ..EngineOptions::default()
        };
        Engine::open(self.data.clone(), self.meta.clone(), opts)
    }
}

#[test]
fn keyed_disk_stores_keyed_checksums_and_reads_back() {
    let key = test_key(1);
    let disk = Disk::keyed(512, 8, &key);
    let e = disk.keyed_engine(Some(&key)).unwrap();
    let v = pattern(512, 2, 3);
    e.write(4, &v).unwrap();
    e.flush().unwrap();
    let c = Checksum::keyed(0x5eed, &key);
    let h = c.block_hash(4, &v[..512]);
    assert_eq!(e.lock().meta.get(4).unwrap(), Pair { new: h, old: h });
    assert_ne!(h, Checksum::xxh3(0x5eed).block_hash(4, &v[..512]));
    e.make_clean().unwrap();
    drop(e);
    let e = disk.keyed_engine(Some(&key)).unwrap();
    let mut buf = vec![0; 1024];
    e.read(4, &mut buf).unwrap();
    assert_eq!(buf, v);
}

#[test]
fn block_rewritten_with_an_unkeyed_pair_is_caught() {
    let key = test_key(1);
    let disk = Disk::keyed(512, 8, &key);
    let e = disk.keyed_engine(Some(&key)).unwrap();
    e.write(2, &pattern(512, 1, 1)).unwrap();
    e.make_clean().unwrap();
    drop(e);
    // Someone with write access to both files but not the key: new data,
    // and its pair computed the way an unkeyed disk's would be, with the
    // salt read from the superblock.
    let forged = pattern(512, 1, 2);
    disk.data.inner.write_at(&forged, 2 * 512).unwrap();
    let h = Checksum::xxh3(0x5eed).block_hash(2, &forged);
    let mut pair = [0u8; 16];
    pair[..8].copy_from_slice(&h.to_le_bytes());
    pair[8..].copy_from_slice(&h.to_le_bytes());
    disk.meta
        .inner
        .write_at(&pair, crate::meta::TABLE_OFFSET + 2 * 16)
        .unwrap();
    let e = disk.keyed_engine(Some(&key)).unwrap();
    let mut buf = vec![0; 512];
    assert!(matches!(
        e.read(2, &mut buf),
        Err(EngineError::Mismatch { block: 2 })
    ));
}

#[test]
fn keyed_disk_refuses_no_key_and_a_wrong_key_and_unkeyed_refuses_a_key() {
    use crate::meta::SuperblockError as S;
    let refusal = |r: Result<Engine, EngineError>| match r {
        Err(EngineError::Meta(MetaError::Superblock(s))) => s,
        Err(e) => panic!("refused for another reason: {e}"),
        Ok(_) => panic!("opened"),
    };
    let key = test_key(1);
    let keyed = Disk::keyed(512, 8, &key);
    assert_eq!(refusal(keyed.keyed_engine(None)), S::KeyRequired);
    assert_eq!(refusal(keyed.keyed_engine(Some(&test_key(2)))), S::BadMac);
    let plain = Disk::new(512, 8);
    assert_eq!(refusal(plain.keyed_engine(Some(&key))), S::UnexpectedKey);
    // The refusals wrote nothing: both still open as they should.
    assert!(keyed.keyed_engine(Some(&key)).is_ok());
    assert!(plain.keyed_engine(None).is_ok());
}

#[test]
fn a_scrub_read_reports_every_bad_block_and_status_remembers_them() {
    let disk = Disk::new(512, 16);
    let e = disk.engine();
    e.write(0, &pattern(512, 16, 2)).unwrap();
    e.flush().unwrap();
    disk.data.poke(3 * 512, |b| *b ^= 1);
    disk.data.poke(9 * 512 + 7, |b| *b ^= 1);
    let reads = e.stats().reads;
    let mut buf = vec![0; 16 * 512];
    // A guest read fails on the first; a scrub read names both.
    assert_eq!(e.scrub_read(0, &mut buf).unwrap(), vec![3, 9]);
    assert_eq!(e.stats().reads, reads, "a scrub read is not a guest read");
    assert_eq!(e.stats().mismatches, 2);
    assert!(matches!(
        e.read(9, &mut buf[..512]),
        Err(EngineError::Mismatch { block: 9 })
    ));
    assert_eq!(
        e.recent_mismatches(),
        vec![9, 3],
        "newest first, no repeats"
    );
    assert!(e.scrub_read(15, &mut buf[..1024]).is_err(), "past the end");
}

#[test]
fn a_scrub_read_takes_queued_writes_as_the_content() {
    let disk = Disk::new(512, 8);
    let e = disk.engine();
    e.write(0, &pattern(512, 8, 4)).unwrap();
    e.flush().unwrap();
    // Just completed: in the stage or already written by the commit
    // thread; either way the scrub judges (and returns) the write.
    e.write(2, &pattern(512, 1, 5)).unwrap();
    let mut buf = vec![0; 8 * 512];
    assert_eq!(e.scrub_read(0, &mut buf).unwrap(), Vec::<u64>::new());
    assert_eq!(&buf[1024..1536], &pattern(512, 1, 5)[..]);
}

#[test]
fn stats_count_flushes_and_tell_whether_the_superblock_is_clean() {
    let disk = Disk::new(512, 8);
    let e = disk.engine();
    assert!(e.stats().clean, "opened clean");
    e.write(1, &pattern(512, 1, 1)).unwrap();
    e.submit(&mut [Op::Flush, Op::Flush]);
    e.flush().unwrap();
    let s = e.stats();
    assert_eq!(s.flushes, 3);
    assert!(!s.clean, "a write marks it dirty");
    assert!(e.make_clean().unwrap());
    assert!(e.stats().clean);
}

#[test]
fn a_batch_of_writes_and_its_flush_commit_in_one_round() {
    // The commit thread hears of a batch once it is all in the stage: woken
    // at its first record, it committed a prefix, and the FLUSH at the end
    // paid a second metadata sync.
    let disk = Disk::new(4096, 256);
    let e = disk.engine();
    for trial in 0..20u8 {
        let data: Vec<Vec<u8>> = (0..31).map(|i| pattern(4096, 1, trial ^ i)).collect();
        let mut ops: Vec<Op<'_>> = data
            .iter()
            .enumerate()
            .map(|(i, d)| Op::Write {
                block: (i * 8 + usize::from(trial % 8)) as u64,
                data: d,
            })
            .collect();
        ops.push(Op::Flush);
        let before = e.stats().rounds;
        let r = e.submit(&mut ops);
        assert!(r.iter().all(Result::is_ok));
        assert_eq!(e.stats().rounds, before + 1, "trial {trial}");
    }
}

#[test]
fn a_large_round_of_scattered_blocks_lands_every_block() {
    // Hundreds of scattered single blocks in one batch (one round): every
    // block must land where its op said, and only there.
    let blocks = 1024u64;
    let disk = Disk::new(4096, blocks);
    let e = disk.open(EngineOptions {
        write_cache: false,
        ..EngineOptions::default()
    });
    let targets: Vec<u64> = (0..300).map(|i| (i * 7 + 3) % blocks).collect();
    let datas: Vec<Vec<u8>> = (0..targets.len())
        .map(|i| pattern(4096, 1, i as u8))
        .collect();
    let mut ops: Vec<Op<'_>> = targets
        .iter()
        .zip(&datas)
        .map(|(&block, data)| Op::Write { block, data })
        .collect();
    assert!(e.submit(&mut ops).iter().all(Result::is_ok));
    let mut written = vec![None; blocks as usize];
    for (&b, d) in targets.iter().zip(&datas) {
        written[b as usize] = Some(d);
    }
    for (b, want) in written.iter().enumerate() {
        let mut back = vec![0xffu8; 4096];
        e.read(b as u64, &mut back).unwrap();
        match want {
            Some(d) => assert_eq!(&back, *d, "block {b}"),
            None => assert!(back.iter().all(|&x| x == 0), "block {b} was never written"),
        }
        // What the device holds, not only what the engine says.
        let mut raw = vec![0u8; 4096];
        disk.data.read_at(&mut raw, b as u64 * 4096).unwrap();
        assert_eq!(raw, back, "device block {b}");
    }
}

#[test]
fn the_default_pending_limit_never_doubles_the_pending_set() {
    // As many Pending blocks as the limit allows, plus one round of a
    // full stage of 4 KiB writes past it (checked only after a round).
    let most = DEFAULT_PENDING_LIMIT + (DEFAULT_STAGE_BYTES / 4096) as usize;
    let mut pending: crate::intmap::IntMap<pairs::PendingBlock> = Default::default();
    for b in 0..most as u64 {
        pending.insert(
            b,
            pairs::PendingBlock {
                inflight: 0,
                completed: b,
            },
        );
    }
    // std's table holds 7/8 of its buckets: past 917,504 entries it moves
    // to 2^21 buckets.
    assert!(
        pending.capacity() <= (1 << 20) / 8 * 7,
        "{most} Pending blocks grew the set to room for {}",
        pending.capacity()
    );
}
