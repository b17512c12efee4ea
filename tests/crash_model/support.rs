//! What every suite of the crash model shares: contents that name
//! themselves, formatted disks, batches of requests, the environment.

use std::env;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;

use twinsum::integrity::{Engine, EngineError, Op};
use twinsum::io::volatile::testing::FaultInjection;
use twinsum::io::volatile::{VolatileDevice, SECTOR_SIZE};
use twinsum::key::Key;
use twinsum::meta::{Metadata, Superblock, HASH_BLAKE3_KEYED, MIN_LOG_SIZE, SUPERBLOCK_SIZE};

pub const SECTOR: usize = SECTOR_SIZE as usize;
/// Seeds of `crash_model` unless `TWINSUM_CRASH_SEEDS` says otherwise.
pub const DEFAULT_SEEDS: u64 = 10_000;

/// One block's bytes, shared between the model and the requests.
pub type Content = Arc<[u8]>;

/// A case's verdict: the first thing that was wrong.
pub type Outcome = Result<(), String>;

/// The key of seed `seed`'s disk: keyed checksums for one seed in four.
/// Chosen from the seed, not drawn from its RNG, so every other seed
/// replays exactly as it did before keyed checksums existed.
pub fn key_for(seed: u64) -> Option<Key> {
    (seed % 4 == 1).then(|| Key::from_bytes(&seed.to_le_bytes().repeat(4)).unwrap())
}

/// The metadata log of seed `seed`'s disk: two seeds in three have one
/// (format version 2), small so that it wraps and fills (a checkpoint then
/// commits the round); the third has version 1 metadata, without a log.
/// Chosen from the seed, like the key, so the seeds' draws stay as they
/// were.
pub fn log_for(seed: u64) -> Option<u64> {
    match seed % 3 {
        0 => None,
        1 => Some(MIN_LOG_SIZE),
        _ => Some(4 * MIN_LOG_SIZE),
    }
}

/// The durable image of metadata formatted for `blocks` blocks of `bs`
/// bytes, keyed if `key` is, with a metadata log of `log` bytes if given
/// (version 2) or none (version 1).
pub fn formatted_meta(
    bs: usize,
    blocks: u64,
    salt: u64,
    clean: bool,
    key: Option<&Key>,
    log: Option<u64>,
) -> Result<Vec<u8>, String> {
    let mut sb = Superblock::new(bs as u32, blocks * bs as u64, salt).map_err(|e| e.to_string())?;
    if let Some(size) = log {
        sb = sb.with_log(size);
    }
    sb.clean = clean;
    if key.is_some() {
        sb.hash_id = HASH_BLAKE3_KEYED;
    }
    let meta = Arc::new(VolatileDevice::zeroed(sb.meta_len()));
    // `create` syncs: the durable image is the formatted metadata.
    Metadata::create_with(meta.clone(), sb, 4, key).map_err(|e| format!("format: {e}"))?;
    meta.durable_snapshot().map_err(|e| e.to_string())
}

/// The sequence number replay of the metadata log starts from in the
/// metadata image `meta` (each checkpoint that covers new records moves
/// it on), or `None` for metadata without a log.
pub fn log_start(meta: &[u8]) -> Result<Option<u64>, String> {
    let sector = meta
        .get(..SUPERBLOCK_SIZE)
        .ok_or("metadata shorter than a superblock")?;
    let sb = Superblock::decode_unverified(sector).map_err(|e| format!("superblock: {e}"))?;
    Ok(sb.has_log().then_some(sb.log_seq))
}

/// Fill one sector of a fresh content: the case seed and write id in the
/// first 16 bytes (so traces can name it), then a stream that differs per
/// sector.
pub fn fill_sector(sector: &mut [u8], seed: u64, id: u64, index: usize) {
    sector[0..8].copy_from_slice(&seed.to_le_bytes());
    sector[8..16].copy_from_slice(&id.to_le_bytes());
    let mut x = seed
        ^ id.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (index as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9)
        | 1;
    for w in sector[16..].chunks_mut(8) {
        // xorshift64: cheap and good enough to make every sector distinct.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes()[..w.len()]);
    }
}

/// A block of `bs` bytes written as write `id` of seed `seed`: every sector
/// stamped, so any tear of it shows.
pub fn fresh_content(seed: u64, id: u64, bs: usize) -> Content {
    let mut v = vec![0u8; bs];
    for (s, sector) in v.chunks_mut(SECTOR).enumerate() {
        fill_sector(sector, seed, id, s);
    }
    v.into()
}

/// A short name for a content in traces: the write id stamped into its
/// first sector, or "zeros".
pub fn tag(c: &[u8]) -> String {
    if c.iter().all(|&b| b == 0) {
        return "zeros".into();
    }
    let id = u64::from_le_bytes(c[8..16].try_into().unwrap());
    format!("w{id}")
}

/// Tags of several contents, for messages.
pub fn tags<'a>(cs: impl IntoIterator<Item = &'a Content>) -> String {
    cs.into_iter()
        .map(|c| tag(c))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A number from the environment; a malformed one stops the run.
pub fn env_u64(name: &str) -> Option<u64> {
    let v = env::var(name).ok()?;
    match v.trim().parse() {
        Ok(n) => Some(n),
        Err(_) => panic!("{name}={v} is not a number"),
    }
}

/// Run one case; a panic in it is that case's failure, not the run's.
pub fn catching(case: impl FnOnce() -> Outcome) -> Outcome {
    match panic::catch_unwind(AssertUnwindSafe(case)) {
        Ok(r) => r,
        Err(p) => Err(format!(
            "panicked: {}",
            p.downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| p.downcast_ref::<&str>().copied())
                .unwrap_or("?")
        )),
    }
}

/// One request of a generated batch.
#[derive(Clone)]
pub enum Spec {
    Read { block: u64, count: u64 },
    Write { block: u64, contents: Vec<Content> },
    Zero { block: u64, count: u64 },
    Flush,
}

impl std::fmt::Debug for Spec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Spec::Read { block, count } => write!(f, "Read({block}+{count})"),
            Spec::Write { block, contents } => {
                let tags: Vec<String> = contents.iter().map(|c| tag(c)).collect();
                write!(f, "Write({block}: {})", tags.join(","))
            }
            Spec::Zero { block, count } => write!(f, "Zero({block}+{count})"),
            Spec::Flush => write!(f, "Flush"),
        }
    }
}

/// Every content `specs` write, per block, in op order (zeroing writes
/// `zeros`).
pub fn spec_writes(specs: &[Spec], zeros: &Content) -> Vec<(u64, Content)> {
    let mut out = Vec::new();
    for s in specs {
        match s {
            Spec::Write { block, contents } => out.extend((*block..).zip(contents.iter().cloned())),
            Spec::Zero { block, count } => {
                out.extend((*block..block + count).map(|b| (b, zeros.clone())));
            }
            _ => {}
        }
    }
    out
}

/// Submit `specs` as one batch; the results per op, and per op the bytes a
/// read returned (empty for the others).
pub fn submit(
    engine: &Engine,
    specs: &[Spec],
    bs: usize,
) -> (Vec<Result<(), EngineError>>, Vec<Vec<u8>>) {
    let writes: Vec<Vec<u8>> = specs
        .iter()
        .map(|s| match s {
            Spec::Write { contents, .. } => contents.concat(),
            _ => Vec::new(),
        })
        .collect();
    let mut reads: Vec<Vec<u8>> = specs
        .iter()
        .map(|s| match s {
            Spec::Read { count, .. } => vec![0u8; *count as usize * bs],
            _ => Vec::new(),
        })
        .collect();
    let results = {
        let mut ops: Vec<Op<'_>> = specs
            .iter()
            .zip(&writes)
            .zip(reads.iter_mut())
            .map(|((s, w), r)| match s {
                Spec::Read { block, .. } => Op::Read {
                    block: *block,
                    buf: r,
                },
                Spec::Write { block, .. } => Op::Write {
                    block: *block,
                    data: w,
                },
                Spec::Zero { block, count } => Op::Zero {
                    block: *block,
                    count: *count,
                },
                Spec::Flush => Op::Flush,
            })
            .collect();
        engine.submit(&mut ops)
    };
    (results, reads)
}
