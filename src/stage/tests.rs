use std::sync::Arc;

use super::*;
use crate::io::MemRegion;

const BOOT: BootId = [7; 16];
const LEN: u64 = RING_START + MIN_CAPACITY;

fn ident() -> Identity {
    Identity {
        salt: 0x1234,
        generation: 5,
        block_size: 4096,
        blocks: 1000,
        data_size: 4096 * 1000,
    }
}

fn region() -> Arc<MemRegion> {
    Arc::new(MemRegion::new(LEN))
}

fn data(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| seed.wrapping_add(i as u8)).collect()
}

/// Reserve and fill one record.
fn put(stage: &mut Stage, block: u64, d: &[u8]) -> Slot {
    let slot = stage.reserve(block, d.len()).unwrap().expect("room");
    stage.filler().fill(&slot, d).unwrap();
    slot
}

fn reopen(r: &Arc<MemRegion>) -> (Stage, Recovered) {
    Stage::open(r.clone(), ident(), BOOT, 99).unwrap()
}

fn read(r: &Arc<MemRegion>, rec: &Record) -> Vec<u8> {
    let mut buf = vec![0; rec.len as usize];
    r.read_at(&mut buf, rec.data_offset).unwrap();
    buf
}

#[test]
fn complete_records_come_back_in_order_and_a_torn_one_is_skipped() {
    let r = region();
    let mut s = Stage::create(r.clone(), ident(), BOOT, 42).unwrap();
    put(&mut s, 3, &data(1, 4096));
    // Reserved, data half written, checksum never stored: a write that
    // never completed.
    let torn = s.reserve(4, 4096).unwrap().unwrap();
    r.write_at(&data(2, 2048), torn.data_offset).unwrap();
    put(&mut s, 5, &data(3, 512));
    drop(s);

    let (mut s, rec) = reopen(&r);
    assert_eq!(rec.torn, 1);
    let blocks: Vec<u64> = rec.records.iter().map(|r| r.block).collect();
    assert_eq!(blocks, [3, 5]);
    assert_eq!(read(&r, &rec.records[0]), data(1, 4096));
    assert_eq!(read(&r, &rec.records[1]), data(3, 512));
    // New records go after the old ones, so the old stay readable until
    // released.
    put(&mut s, 6, &data(4, 4096));
    s.release_all().unwrap();
    drop(s);
    let (_, rec) = reopen(&r);
    assert!(rec.records.is_empty(), "released records are not replayed");
}

#[test]
fn a_record_whose_data_changed_after_its_checksum_is_skipped() {
    let r = region();
    let mut s = Stage::create(r.clone(), ident(), BOOT, 42).unwrap();
    let slot = put(&mut s, 3, &data(1, 4096));
    put(&mut s, 4, &data(2, 4096));
    r.write_at(&[0xff], slot.data_offset + 100).unwrap();
    let (_, rec) = reopen(&r);
    assert_eq!(rec.torn, 1);
    assert_eq!(rec.records.len(), 1);
    assert_eq!(rec.records[0].block, 4);
}

#[test]
fn a_corrupt_header_ends_the_log_there() {
    let r = region();
    let mut s = Stage::create(r.clone(), ident(), BOOT, 42).unwrap();
    put(&mut s, 1, &data(1, 4096));
    let second = put(&mut s, 2, &data(2, 4096));
    put(&mut s, 3, &data(3, 4096));
    // A torn header: the reservation that wrote it was the last one.
    r.write_at(&[0xee], second.data_offset - RECORD_HEADER + 9)
        .unwrap();
    let (_, rec) = reopen(&r);
    let blocks: Vec<u64> = rec.records.iter().map(|r| r.block).collect();
    assert_eq!(blocks, [1]);
}

#[test]
fn the_ring_wraps_with_a_pad_and_refuses_a_record_it_has_no_room_for() {
    let r = region();
    let mut s = Stage::create(r.clone(), ident(), BOOT, 42).unwrap();
    let big = 300 << 10;
    assert!(s.fits(big));
    assert!(!s.fits(MIN_CAPACITY as usize));
    let a = put(&mut s, 1, &data(1, big));
    let b = put(&mut s, 2, &data(2, big));
    put(&mut s, 3, &data(3, big));
    assert!(s.reserve(4, big).unwrap().is_none(), "the ring is full");
    // Release the first two: the next record does not fit before the end
    // of the lap, so it starts the next one.
    s.release(b.end, b.seq + 1).unwrap();
    let d = put(&mut s, 4, &data(4, big));
    assert_eq!(d.data_offset, RING_START + RECORD_HEADER, "after the pad");
    assert!(d.pos > a.pos);
    drop(s);
    let (mut s, rec) = reopen(&r);
    let blocks: Vec<u64> = rec.records.iter().map(|r| r.block).collect();
    assert_eq!(blocks, [3, 4]);
    assert_eq!(read(&r, &rec.records[1]), data(4, big));
    // The reopened ring goes on where it was.
    s.release_all().unwrap();
    put(&mut s, 5, &data(5, 4096));
    drop(s);
    let (_, rec) = reopen(&r);
    assert_eq!(rec.records.len(), 1);
    assert_eq!(rec.records[0].block, 5);
}

#[test]
fn a_stage_of_other_metadata_with_records_is_refused() {
    let r = region();
    let mut s = Stage::create(r.clone(), ident(), BOOT, 42).unwrap();
    put(&mut s, 1, &data(1, 4096));
    let other = Identity {
        salt: 0x9999,
        ..ident()
    };
    let e = Stage::open(r.clone(), other, BOOT, 1).unwrap_err();
    assert!(
        matches!(
            e,
            StageError::Foreign {
                stage_salt: 0x1234,
                meta_salt: 0x9999,
                ..
            }
        ),
        "{e}"
    );
    let older = Identity {
        generation: 3,
        ..ident()
    };
    let e = Stage::open(r.clone(), older, BOOT, 1).unwrap_err();
    assert!(
        matches!(e, StageError::Generation { stage: 5, meta: 3 }),
        "{e}"
    );
    // One ahead: the superblock store after the marker never happened.
    let behind = Identity {
        generation: 4,
        ..ident()
    };
    assert_eq!(
        Stage::open(r.clone(), behind, BOOT, 1)
            .unwrap()
            .1
            .records
            .len(),
        1
    );
}

#[test]
fn an_empty_stage_of_other_metadata_is_simply_replaced() {
    let r = region();
    let s = Stage::create(r.clone(), ident(), BOOT, 42).unwrap();
    drop(s);
    let other = Identity {
        salt: 0x9999,
        ..ident()
    };
    let (_, rec) = Stage::open(r.clone(), other, BOOT, 1).unwrap();
    assert!(rec.records.is_empty());
    assert_eq!(Stage::inspect(&*r).unwrap().unwrap().salt, 0x9999);
}

#[test]
fn a_stage_from_an_earlier_boot_is_dropped_and_counted() {
    let r = region();
    let mut s = Stage::create(r.clone(), ident(), BOOT, 42).unwrap();
    put(&mut s, 1, &data(1, 4096));
    put(&mut s, 2, &data(1, 4096));
    let (_, rec) = Stage::open(r.clone(), ident(), [8; 16], 1).unwrap();
    assert_eq!(rec.earlier_boot, Some(2));
    assert!(rec.records.is_empty());
    let (_, rec) = Stage::open(r.clone(), ident(), [8; 16], 1).unwrap();
    assert_eq!(rec.earlier_boot, None, "the fresh stage is of this boot");
}

#[test]
fn bad_stage_files_get_their_own_error() {
    // A region of zeros is a stage that was created but never written.
    let (_, rec) = reopen(&region());
    assert!(rec.records.is_empty());

    let r = region();
    Stage::create(r.clone(), ident(), BOOT, 42).unwrap();
    let good = r.to_vec();

    let mut bytes = good.clone();
    bytes[0] = b'X';
    let e = Stage::open(Arc::new(MemRegion::from_vec(bytes)), ident(), BOOT, 1).unwrap_err();
    assert!(matches!(e, StageError::Magic(m) if m[0] == b'X'), "{e}");

    let mut bytes = good.clone();
    bytes[20] ^= 1;
    let e = Stage::open(Arc::new(MemRegion::from_vec(bytes)), ident(), BOOT, 1).unwrap_err();
    assert!(matches!(e, StageError::HeaderChecksum { .. }), "{e}");

    let mut bytes = good.clone();
    bytes[8] = 9;
    let sum = xxh3_64_with_seed(&bytes[..504], 0);
    bytes[504..512].copy_from_slice(&sum.to_le_bytes());
    let e = Stage::open(Arc::new(MemRegion::from_vec(bytes)), ident(), BOOT, 1).unwrap_err();
    assert!(matches!(e, StageError::Version(9)), "{e}");

    let mut bytes = good.clone();
    bytes.truncate(8192);
    let e = Stage::open(Arc::new(MemRegion::from_vec(bytes)), ident(), BOOT, 1).unwrap_err();
    assert!(matches!(e, StageError::Truncated { have: 8192, .. }), "{e}");

    let mut bytes = good.clone();
    bytes[512..1088].fill(0);
    let e = Stage::open(Arc::new(MemRegion::from_vec(bytes)), ident(), BOOT, 1).unwrap_err();
    assert!(matches!(e, StageError::Marker), "{e}");

    let e = Stage::create(Arc::new(MemRegion::new(8192)), ident(), BOOT, 1).unwrap_err();
    assert!(matches!(e, StageError::TooSmall(8192)), "{e}");
}

#[test]
fn a_torn_marker_slot_falls_back_to_the_other() {
    let r = region();
    let mut s = Stage::create(r.clone(), ident(), BOOT, 42).unwrap();
    let a = put(&mut s, 1, &data(1, 4096));
    put(&mut s, 2, &data(2, 4096));
    s.release(a.end, a.seq + 1).unwrap();
    // The newest marker is damaged: the previous one (before the release)
    // still says where to start, so block 1 is replayed again — harmless,
    // it is the same write.
    let newest = if s.marker_counter.is_multiple_of(2) {
        512
    } else {
        1024
    };
    r.write_at(&[0xaa; 8], newest + 16).unwrap();
    let (_, rec) = reopen(&r);
    let blocks: Vec<u64> = rec.records.iter().map(|r| r.block).collect();
    assert_eq!(blocks, [1, 2]);
}

#[test]
fn inspect_counts_what_is_waiting() {
    let r = region();
    assert_eq!(Stage::inspect(&*r).unwrap(), None);
    let mut s = Stage::create(r.clone(), ident(), BOOT, 42).unwrap();
    put(&mut s, 1, &data(1, 4096));
    put(&mut s, 2, &data(1, 512));
    let i = Stage::inspect(&*r).unwrap().unwrap();
    assert_eq!((i.records, i.bytes, i.salt), (2, 4608, 0x1234));
}
