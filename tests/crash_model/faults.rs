//! Injected faults: bit flips in data and in stored checksums, misdirected
//! and lost writes, a block moved with its pair, a forgery without the
//! key. Each lands on a fully written-back disk, and exactly the damaged
//! block must fail to read, live and after a reopen from the durable state.

use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use twinsum::integrity::hash::Checksum;
use twinsum::integrity::{Engine, EngineError, EngineOptions};
use twinsum::io::volatile::testing::{FaultInjection, Fuse};
use twinsum::io::Device;
use twinsum::meta::{Superblock, PAIR_SIZE, TABLE_OFFSET};

use crate::device::TestDevice;
use crate::support::{formatted_meta, fresh_content, key_for, log_for, tag, Content, SECTOR};

/// A formatted disk with every block written (some with zeros), flushed
/// and its metadata written back: every pair on disk is current, so every
/// fault below must be caught both by the running engine and after a
/// reopen from the durable state.
struct Rig {
    rng: StdRng,
    bs: usize,
    blocks: u64,
    data: Arc<TestDevice>,
    meta: Arc<TestDevice>,
    /// The power switch of both devices.
    fuse: Arc<Fuse>,
    engine: Engine,
    opts: EngineOptions,
    /// What each block holds.
    contents: Vec<Content>,
    next_id: u64,
    seed: u64,
}

impl Rig {
    fn new(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let bs: usize = if rng.gen_bool(0.5) { 512 } else { 4096 };
        let blocks = rng.gen_range(8..=64u64);
        let salt = rng.gen();
        let opts = EngineOptions {
            key: key_for(seed),
            ..EngineOptions::default()
        };
        let meta_img =
            formatted_meta(bs, blocks, salt, false, opts.key.as_ref(), log_for(seed)).unwrap();
        let fuse = Arc::new(Fuse::new());
        let meta = TestDevice::image(meta_img, Some(&fuse));
        let data = TestDevice::zeroed(blocks * bs as u64, Some(&fuse));
        let engine = Engine::open(data.clone(), meta.clone(), opts.clone()).unwrap();
        let zeros: Content = vec![0u8; bs].into();
        let mut rig = Self {
            rng,
            bs,
            blocks,
            data,
            meta,
            fuse,
            engine,
            opts,
            contents: vec![zeros; blocks as usize],
            next_id: 1,
            seed,
        };
        for b in 0..blocks {
            if !rig.rng.gen_ratio(1, 10) {
                let c = rig.fresh();
                rig.write(b, c);
            }
        }
        rig.settle();
        rig
    }

    fn fresh(&mut self) -> Content {
        let id = self.next_id;
        self.next_id += 1;
        fresh_content(self.seed, id, self.bs)
    }

    fn write(&mut self, b: u64, c: Content) {
        self.engine.write(b, &c).unwrap();
        self.contents[b as usize] = c;
    }

    /// Flush and write the metadata back: all pairs on disk current.
    fn settle(&self) {
        self.engine.flush().unwrap();
        self.engine.writeback().unwrap();
    }

    /// Two distinct blocks with different contents.
    fn two_blocks(&mut self) -> (u64, u64) {
        loop {
            let i = self.rng.gen_range(0..self.blocks);
            let j = self.rng.gen_range(0..self.blocks);
            if i != j && self.contents[i as usize] != self.contents[j as usize] {
                return (i, j);
            }
        }
    }

    /// Crash (losing whatever is un-synced, chosen by the RNG) and reopen
    /// from the surviving state.
    fn crash_and_reopen(&mut self) {
        self.fuse.arm(0);
        self.data.power_cut(self.rng.gen()).unwrap();
        self.meta.power_cut(self.rng.gen()).unwrap();
        self.fuse = Arc::new(Fuse::new());
        let data = self.data.survivor(Some(&self.fuse)).unwrap();
        let meta = self.meta.survivor(Some(&self.fuse)).unwrap();
        self.engine = Engine::open(data.clone(), meta.clone(), self.opts.clone()).unwrap();
        self.data = data;
        self.meta = meta;
    }

    /// Wait until block `b` holds its content on the data device: an
    /// engine may complete a write before issuing it (a write-back stage),
    /// and damage injected before that would simply be overwritten.
    fn landed(&self, b: u64) {
        // Out of the stage too: a read serves a staged write from there,
        // and would not see damage done to the device under it.
        self.engine.drain();
        assert!(
            self.data.wait_until_holds(
                b * self.bs as u64,
                &self.contents[b as usize],
                Duration::from_secs(10)
            ),
            "seed {}: the write of block {b} never reached the data device",
            self.seed
        );
    }

    /// Read every block: exactly the blocks in `bad` must fail with a
    /// mismatch naming them; every other block must return its content.
    fn expect(&self, bad: &[u64], what: &str) {
        let mut buf = vec![0u8; self.bs];
        for b in 0..self.blocks {
            let r = self.engine.read(b, &mut buf);
            if bad.contains(&b) {
                match r {
                    Err(EngineError::Mismatch { block }) if block == b => {}
                    Ok(()) => panic!(
                        "seed {}: {what}: the read of block {b} returned the damaged data without error",
                        self.seed
                    ),
                    Err(e) => panic!("seed {}: {what}: block {b}: unexpected error {e}", self.seed),
                }
            } else {
                match r {
                    Ok(()) => assert!(
                        buf[..] == self.contents[b as usize][..],
                        "seed {}: {what}: block {b} returned {} instead of {}",
                        self.seed,
                        tag(&buf),
                        tag(&self.contents[b as usize])
                    ),
                    Err(e) => panic!(
                        "seed {}: {what}: block {b} is intact but its read failed: {e}",
                        self.seed
                    ),
                }
            }
        }
    }
}

const FAULT_SEEDS: u64 = 300;

#[test]
fn bit_flip_in_a_data_block_is_caught() {
    for seed in 0..FAULT_SEEDS {
        let mut rig = Rig::new(seed);
        let k = rig.rng.gen_range(0..rig.blocks);
        let offset = k * rig.bs as u64 + rig.rng.gen_range(0..rig.bs as u64);
        let bit = rig.rng.gen_range(0..8);
        rig.data.corrupt_flip_bit(offset, bit).unwrap();
        rig.expect(&[k], "bit flip");
        rig.crash_and_reopen();
        rig.expect(&[k], "bit flip, after reopen");
    }
}

#[test]
fn bit_flip_in_a_pending_block_is_caught() {
    // The block was rewritten since the last flush: it has two valid
    // checksums, and a flipped bit in either content matches neither.
    for seed in 0..FAULT_SEEDS {
        let mut rig = Rig::new(seed);
        let k = rig.rng.gen_range(0..rig.blocks);
        let c = rig.fresh();
        rig.write(k, c);
        rig.landed(k);
        let offset = k * rig.bs as u64 + rig.rng.gen_range(0..rig.bs as u64);
        rig.data
            .corrupt_flip_bit(offset, rig.rng.gen_range(0..8))
            .unwrap();
        rig.expect(&[k], "bit flip in a pending block");
        // Whichever version survives the crash, it carries the flip.
        rig.crash_and_reopen();
        rig.expect(&[k], "bit flip in a pending block, after reopen");
    }
}

#[test]
fn misdirected_write_is_caught() {
    // Block i's content lands at block j: the checksum is seeded by the
    // block number, so it does not verify at j even though it is a valid
    // content of i.
    for seed in 0..FAULT_SEEDS {
        let mut rig = Rig::new(seed);
        let (i, j) = rig.two_blocks();
        let misplaced = rig.contents[i as usize].clone();
        rig.data
            .corrupt_write(j * rig.bs as u64, &misplaced)
            .unwrap();
        rig.expect(&[j], "misdirected write");
        rig.crash_and_reopen();
        rig.expect(&[j], "misdirected write, after reopen");
    }
}

#[test]
fn block_and_checksum_moved_together_are_caught() {
    // A block's data *and* its pair land at another block number (say a
    // whole region copied to the wrong offset): the pair matches the bytes,
    // but it was computed for the other block number. Only the block number
    // in the hash seed can catch this.
    for seed in 0..FAULT_SEEDS {
        let mut rig = Rig::new(seed);
        let (i, j) = rig.two_blocks();
        if rig.contents[i as usize].iter().all(|&b| b == 0) {
            // Zeros with the "reads as zeros" pair are right anywhere.
            continue;
        }
        let moved = rig.contents[i as usize].clone();
        rig.data.corrupt_write(j * rig.bs as u64, &moved).unwrap();
        let pair_of = |b: u64| TABLE_OFFSET + b * PAIR_SIZE;
        let mut pair = [0u8; PAIR_SIZE as usize];
        rig.meta.read_at(&mut pair, pair_of(i)).unwrap();
        rig.meta.corrupt_write(pair_of(j), &pair).unwrap();
        // Reopen so the engine reads the moved pair from the device.
        rig.crash_and_reopen();
        rig.expect(&[j], "block and checksum moved together");
    }
}

#[test]
fn block_reverted_past_a_flush_is_caught_once_metadata_is_written_back() {
    // A lost write: the media goes back to a content older than the last
    // flush. Once the flush's forgotten old checksums are written back,
    // neither slot covers the old content any more.
    for seed in 0..FAULT_SEEDS {
        let mut rig = Rig::new(seed);
        let n = rig.rng.gen_range(1..=3);
        let mut reverted = Vec::new();
        for _ in 0..n {
            let b = rig.rng.gen_range(0..rig.blocks);
            if reverted.iter().any(|(r, _)| *r == b) {
                continue;
            }
            let older = rig.contents[b as usize].clone();
            let c = rig.fresh();
            rig.write(b, c);
            reverted.push((b, older));
        }
        rig.settle();
        for (b, older) in &reverted {
            rig.data.corrupt_write(b * rig.bs as u64, older).unwrap();
        }
        let bad: Vec<u64> = reverted.iter().map(|(b, _)| *b).collect();
        rig.expect(&bad, "revert past a flush");
        rig.crash_and_reopen();
        rig.expect(&bad, "revert past a flush, after reopen");
    }
}

#[test]
fn bit_flip_in_a_stored_checksum_is_caught() {
    // Damage in the pair table: the block no longer matches its stored
    // checksums, which must also surface as a mismatch (after a reopen,
    // when the pair is read from the device). This holds for a zero pair
    // too: flipped, it is no longer the "reads as zeros" value.
    for seed in 0..FAULT_SEEDS {
        let mut rig = Rig::new(seed);
        let k = rig.rng.gen_range(0..rig.blocks);
        // Flip a bit in both slots, so neither still matches.
        let pair = TABLE_OFFSET + k * PAIR_SIZE;
        let byte = rig.rng.gen_range(0..8);
        let bit = rig.rng.gen_range(0..8);
        rig.meta.corrupt_flip_bit(pair + byte, bit).unwrap();
        rig.meta.corrupt_flip_bit(pair + 8 + byte, bit).unwrap();
        rig.crash_and_reopen();
        rig.expect(&[k], "bit flip in a stored checksum");
    }
}

#[test]
fn block_forged_with_an_unkeyed_pair_is_caught_only_on_a_keyed_disk() {
    // Someone who can write both devices but holds no key replaces a block
    // and recomputes its pair as an unkeyed disk's, with the salt read from
    // the superblock. On an unkeyed disk that is a valid block (checksums
    // catch accidents, not this); on a keyed disk it must fail to read.
    for seed in 0..FAULT_SEEDS / 4 {
        let mut rig = Rig::new(seed);
        let k = rig.rng.gen_range(0..rig.blocks);
        let forged = rig.fresh();
        rig.data.corrupt_write(k * rig.bs as u64, &forged).unwrap();
        let mut sector = [0u8; SECTOR];
        rig.meta.read_at(&mut sector, 0).unwrap();
        let salt = Superblock::decode_unverified(&sector).unwrap().salt;
        let h = Checksum::xxh3(salt).block_hash(k, &forged);
        let mut pair = [0u8; PAIR_SIZE as usize];
        pair[..8].copy_from_slice(&h.to_le_bytes());
        pair[8..].copy_from_slice(&h.to_le_bytes());
        rig.meta
            .corrupt_write(TABLE_OFFSET + k * PAIR_SIZE, &pair)
            .unwrap();
        rig.crash_and_reopen();
        if rig.opts.key.is_some() {
            rig.expect(&[k], "block forged with an unkeyed pair, keyed disk");
        } else {
            rig.contents[k as usize] = forged;
            rig.expect(&[], "block forged with an unkeyed pair, unkeyed disk");
        }
    }
}
