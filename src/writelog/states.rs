//! Crash states from a write log: what the data and metadata devices could
//! hold after a power cut at a chosen instant of a recorded run.
//!
//! A state at cut `c` (every record numbered `c` or lower has happened,
//! nothing later has) is built per device from its own records, with the
//! volatile-cache rule the crash model proves the engine against
//! (`io::volatile`, `tests/crash_model.rs`):
//!
//! - a write (or zeroing) that a sync of its device covered — the sync
//!   returned by `c`, and the write's record precedes the sync's start —
//!   and a durable write that returned by `c` are *durable*: kept whole;
//! - every later write is *kept*, *dropped* or *torn* (some of its atomic
//!   units kept, the rest dropped), drawn from the state's seed. The atomic
//!   unit is 512 bytes on the metadata device and the disk's block size on
//!   the data device: a disk that reports 4096-byte blocks writes each
//!   whole, and twinsum rightly fails a read of a block torn inside.
//!
//! Applying the kept units in log order leaves each unit holding its last
//! durable content or any one version written since, which is exactly
//! what the crash model allows. The metadata of a state is therefore what
//! twinsum's metadata device could hold at that instant, not metadata made
//! afresh from the data: `check` of a state tests the engine on a real run.
//!
//! Each state is also checked against what the guest was promised: every
//! block whose last guest write (or zeroing) before the start of the last
//! completed FLUSH holds that content, or the content of a later guest
//! write to it ([`GuestCheck`]).

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::Path;
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use xxhash_rust::xxh3::xxh3_64;

use super::format::{Dev, LogFile, Record};
use crate::integrity::hash::Checksum;
use crate::io::{Device, FileDevice, OpenFlags};
use crate::key::Key;
use crate::meta::{MetaError, Metadata};

/// The metadata device's atomic unit.
pub const META_UNIT: u64 = 512;
/// Guest zeroings of more blocks than this are checked only where the
/// guest also wrote (a discard of a whole disk would otherwise cost a map
/// entry per block).
const MAX_TRACKED_ZERO: u64 = 1 << 16;

/// Where `crash-states` cuts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum At {
    /// Right after each guest FLUSH completed.
    Flushes,
    /// At each mark.
    Marks,
    /// At seeded random instants.
    Random,
}

impl At {
    pub fn name(self) -> &'static str {
        match self {
            At::Flushes => "flushes",
            At::Marks => "marks",
            At::Random => "random",
        }
    }
}

/// One instant to cut at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cut {
    pub at: At,
    /// The last record that happened.
    pub cut: u64,
    /// The last guest FLUSH completed by then.
    pub last_flush: Option<u64>,
    pub mark: Option<String>,
    /// Seed of the kept/dropped/torn choices.
    pub seed: u64,
}

/// The instants `at` names, at most `count` of them (spread evenly over
/// the candidates when there are more; random instants are drawn from
/// `seed`). Random cuts default to 10.
pub fn cuts(log: &LogFile, at: At, count: Option<usize>, seed: u64) -> Vec<Cut> {
    let mut rng = StdRng::seed_from_u64(seed);
    let points: Vec<(u64, Option<String>)> = match at {
        At::Flushes => log
            .entries
            .iter()
            .filter(|e| matches!(e.record, Record::GuestFlush { .. }))
            .map(|e| (e.seq, None))
            .collect(),
        At::Marks => log
            .entries
            .iter()
            .filter_map(|e| match &e.record {
                Record::Mark { name } => Some((e.seq, Some(name.clone()))),
                _ => None,
            })
            .collect(),
        At::Random => {
            let n = log.entries.len() as u64;
            let want = count.unwrap_or(10) as u64;
            let mut seqs: Vec<u64> = if n <= want {
                (0..n).collect()
            } else {
                let mut s = std::collections::BTreeSet::new();
                while (s.len() as u64) < want {
                    s.insert(rng.gen_range(0..n));
                }
                s.into_iter().collect()
            };
            seqs.sort_unstable();
            seqs.into_iter().map(|s| (s, None)).collect()
        }
    };
    let chosen = spread(points, count);
    let flushes: Vec<u64> = log
        .entries
        .iter()
        .filter(|e| matches!(e.record, Record::GuestFlush { .. }))
        .map(|e| e.seq)
        .collect();
    chosen
        .into_iter()
        .enumerate()
        .map(|(i, (cut, mark))| Cut {
            at,
            cut,
            last_flush: flushes
                .partition_point(|&f| f <= cut)
                .checked_sub(1)
                .map(|i| flushes[i]),
            mark,
            seed: seed ^ (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15),
        })
        .collect()
}

/// At most `count` of `points`, evenly spread, first and last included.
fn spread<T>(points: Vec<T>, count: Option<usize>) -> Vec<T> {
    let n = points.len();
    let Some(k) = count.filter(|&k| k < n) else {
        return points;
    };
    if k == 0 {
        return Vec::new();
    }
    let pick: Vec<usize> = if k == 1 {
        vec![n - 1]
    } else {
        (0..k).map(|i| i * (n - 1) / (k - 1)).collect()
    };
    points
        .into_iter()
        .enumerate()
        .filter(|(i, _)| pick.binary_search(i).is_ok())
        .map(|(_, p)| p)
        .collect()
}

/// What became of one device write in a state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fate {
    /// Covered by a completed sync (or itself durable): kept whole.
    Durable,
    Kept,
    Dropped,
    /// Atomic unit `i` of the write is kept iff `units[i]`.
    Torn(Vec<bool>),
}

/// Counts of fates, over both devices or one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    pub durable: u64,
    pub kept: u64,
    pub dropped: u64,
    pub torn: u64,
}

impl Counts {
    fn add(&mut self, f: &Fate) {
        match f {
            Fate::Durable => self.durable += 1,
            Fate::Kept => self.kept += 1,
            Fate::Dropped => self.dropped += 1,
            Fate::Torn(_) => self.torn += 1,
        }
    }
}

/// The fate of every device record up to a cut, by entry index.
#[derive(Debug, Clone)]
pub struct Plan {
    pub fates: Vec<(usize, Fate)>,
    pub data: Counts,
    pub meta: Counts,
}

impl Plan {
    /// Both devices' counts together.
    pub fn total(&self) -> Counts {
        Counts {
            durable: self.data.durable + self.meta.durable,
            kept: self.data.kept + self.meta.kept,
            dropped: self.data.dropped + self.meta.dropped,
            torn: self.data.torn + self.meta.torn,
        }
    }
}

/// Bytes a device keeps or drops as one.
fn unit_of(dev: Dev, block_size: u32) -> u64 {
    match dev {
        Dev::Data => u64::from(block_size).max(META_UNIT),
        Dev::Meta => META_UNIT,
    }
}

/// Atomic units `[offset, offset + len)` touches.
fn units(offset: u64, len: u64, unit: u64) -> u64 {
    if len == 0 {
        return 0;
    }
    (offset + len - 1) / unit - offset / unit + 1
}

/// Decide the fate of every device record up to `cut`.
pub fn plan(log: &LogFile, cut: &Cut) -> Plan {
    let upto = log.entries.partition_point(|e| e.seq <= cut.cut);
    let entries = &log.entries[..upto];
    // Per device, records below this number are covered by a sync that
    // returned by the cut.
    let (mut covered_data, mut covered_meta) = (0u64, 0u64);
    for e in entries {
        if let Record::Sync { dev, covers } = e.record {
            let c = match dev {
                Dev::Data => &mut covered_data,
                Dev::Meta => &mut covered_meta,
            };
            *c = (*c).max(covers);
        }
    }
    let mut rng = StdRng::seed_from_u64(cut.seed);
    let mut p = Plan {
        fates: Vec::new(),
        data: Counts::default(),
        meta: Counts::default(),
    };
    for (i, e) in entries.iter().enumerate() {
        let (dev, offset, len, durable) = match e.record {
            Record::Write {
                dev,
                durable,
                offset,
                len,
                ..
            } => (dev, offset, len, durable),
            Record::Zero { dev, offset, len } => (dev, offset, len, false),
            _ => continue,
        };
        let covered = match dev {
            Dev::Data => covered_data,
            Dev::Meta => covered_meta,
        };
        let fate = if durable || e.seq < covered {
            Fate::Durable
        } else {
            let n = units(offset, len, unit_of(dev, log.header.block_size));
            match rng.gen_range(0..if n > 1 { 3 } else { 2 }) {
                0 => Fate::Kept,
                1 => Fate::Dropped,
                _ => {
                    // At least one unit kept and one dropped.
                    let mut mask: Vec<bool> = (0..n).map(|_| rng.gen()).collect();
                    let k = rng.gen_range(0..n as usize);
                    let d = (k + 1 + rng.gen_range(0..n as usize - 1)) % n as usize;
                    mask[k] = true;
                    mask[d] = false;
                    Fate::Torn(mask)
                }
            }
        };
        match dev {
            Dev::Data => p.data.add(&fate),
            Dev::Meta => p.meta.add(&fate),
        }
        p.fates.push((i, fate));
    }
    p
}

/// A sparse copy of `from` at `to` (replaced if it exists).
pub fn sparse_copy(from: &Path, to: &Path) -> io::Result<FileDevice> {
    let src = FileDevice::open(
        from,
        OpenFlags {
            writable: false,
            lock: false,
        },
    )?;
    let dst = FileDevice::create(to, src.size(), true, false)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0;
    while let Some((start, end)) = src.next_data(at)? {
        let mut pos = start;
        while pos < end {
            let n = (end - pos).min(buf.len() as u64) as usize;
            src.read_at(&mut buf[..n], pos)?;
            // Zeros stay a hole.
            if buf[..n].iter().any(|&b| b != 0) {
                dst.write_at(&buf[..n], pos)?;
            }
            pos += n as u64;
        }
        at = end;
    }
    Ok(dst)
}

/// Apply `plan` to `data` and `meta` (copies of the base): every durable
/// and kept record whole, every torn one unit by unit, in log order.
pub fn apply(log: &LogFile, plan: &Plan, data: &dyn Device, meta: &dyn Device) -> io::Result<()> {
    let mut buf = Vec::new();
    for (i, fate) in &plan.fates {
        if *fate == Fate::Dropped {
            continue;
        }
        let Some(e) = log.entries.get(*i) else {
            continue;
        };
        let (dev, offset, len, data_pos) = match e.record {
            Record::Write {
                dev,
                offset,
                len,
                data_pos,
                ..
            } => (dev, offset, len, Some(data_pos)),
            Record::Zero { dev, offset, len } => (dev, offset, len, None),
            _ => continue,
        };
        let target = match dev {
            Dev::Data => data,
            Dev::Meta => meta,
        };
        if let Some(pos) = data_pos {
            log.read_data(pos, len, &mut buf)?;
        }
        let unit = unit_of(dev, log.header.block_size);
        // The pieces to keep: the whole range, or the kept units of it.
        let mut pieces = Vec::new();
        match fate {
            Fate::Torn(mask) => {
                let first = offset / unit;
                for (k, keep) in mask.iter().enumerate() {
                    if !keep {
                        continue;
                    }
                    let s = ((first + k as u64) * unit).max(offset);
                    let t = ((first + k as u64 + 1) * unit).min(offset + len);
                    pieces.push((s, t));
                }
            }
            _ => pieces.push((offset, offset + len)),
        }
        for (s, t) in pieces {
            match data_pos {
                Some(_) => {
                    target.write_at(&buf[(s - offset) as usize..(t - offset) as usize], s)?
                }
                None => target.zero_range(s, t - s)?,
            }
        }
    }
    Ok(())
}

/// What the guest was promised at a cut, block by block. A guest write
/// or zeroing is *covered* when a FLUSH completed by the cut began after
/// it was recorded. A block's last covered request `w` promises its
/// content — or that of any request to the block that completed after `w`
/// began: one in flight together with `w` (whose order against `w` the
/// guest cannot know), or a later one, covered or not.
#[derive(Debug, Default)]
pub struct GuestCheck {
    /// Per block: the hashes it may hold.
    blocks: HashMap<u64, Vec<u64>>,
}

/// A guest request to one block: completed at `seq`, began at `began`.
#[derive(Debug, Clone, Copy)]
struct Req {
    seq: u64,
    began: u64,
    hash: u64,
}

impl GuestCheck {
    pub fn at(log: &LogFile, cut: &Cut) -> Self {
        let upto = log.entries.partition_point(|e| e.seq <= cut.cut);
        let covers = log.entries[..upto]
            .iter()
            .filter_map(|e| match e.record {
                Record::GuestFlush { covers } => Some(covers),
                _ => None,
            })
            .max()
            .unwrap_or(0);
        let zero = xxh3_64(&vec![0u8; log.header.block_size as usize]);
        let mut reqs: HashMap<u64, Vec<Req>> = HashMap::new();
        // Requests anywhere in the log count: in synchronous mode (or
        // write-through) the data reaches the device before the guest is
        // told, so the device may hold a write recorded after the cut.
        for e in &log.entries {
            let span = |began, hash| Req {
                seq: e.seq,
                began,
                hash,
            };
            match &e.record {
                Record::GuestWrite {
                    block,
                    began,
                    hashes,
                } => {
                    for (k, h) in hashes.iter().enumerate() {
                        reqs.entry(block + k as u64)
                            .or_default()
                            .push(span(*began, *h));
                    }
                }
                Record::GuestZero {
                    block,
                    count,
                    began,
                } => {
                    let range = *block..block.saturating_add(*count);
                    if *count <= MAX_TRACKED_ZERO {
                        for b in range {
                            reqs.entry(b).or_default().push(span(*began, zero));
                        }
                    } else {
                        for (_, r) in reqs.iter_mut().filter(|(b, _)| range.contains(b)) {
                            r.push(span(*began, zero));
                        }
                    }
                }
                _ => {}
            }
        }
        let blocks = reqs
            .into_iter()
            .filter_map(|(b, r)| {
                let last = r.iter().rfind(|q| q.seq < covers)?;
                let mut ok: Vec<u64> = r
                    .iter()
                    // `began` is the number the next record was to get: a
                    // record numbered that or later came after.
                    .filter(|q| q.seq >= last.began)
                    .map(|q| q.hash)
                    .collect();
                ok.sort_unstable();
                ok.dedup();
                Some((b, ok))
            })
            .collect();
        Self { blocks }
    }

    /// Blocks with a promise.
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// Blocks of `data` that break their promise, sorted.
    pub fn broken(&self, data: &dyn Device, block_size: u32) -> io::Result<Vec<u64>> {
        let bs = u64::from(block_size);
        let mut buf = vec![0u8; block_size as usize];
        let mut bad = Vec::new();
        for (&b, ok) in &self.blocks {
            data.read_at(&mut buf, b * bs)?;
            if ok.binary_search(&xxh3_64(&buf)).is_err() {
                bad.push(b);
            }
        }
        bad.sort_unstable();
        Ok(bad)
    }
}

/// What [`verify`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Verified {
    pub checked: u64,
    /// Blocks that match neither slot, sorted.
    pub mismatches: Vec<u64>,
}

/// Verify every block of `data` against the pairs in `meta`, as `twinsum
/// check` does (holes with zero pairs are skipped unread).
pub fn verify(
    data: &dyn Device,
    meta: Arc<dyn Device>,
    key: Option<&Key>,
) -> Result<Verified, MetaError> {
    const CHUNK: u64 = 256;
    let mut m = Metadata::open_with(meta, 64, key)?;
    m.check_image(data.size())?;
    let sb = m.superblock().clone();
    let sum = Checksum::of(&sb, key)?;
    let bs = u64::from(sb.block_size);
    let io = |what| {
        move |e| MetaError::Io {
            what,
            source: Arc::new(e),
        }
    };
    let mut out = Verified::default();
    let mut buf = vec![0u8; (CHUNK * bs) as usize];
    let mut pairs = vec![Default::default(); CHUNK as usize];
    let mut b = 0;
    while b < sb.blocks {
        let zero_pairs = m.zero_run(b, sb.blocks - b)?;
        if zero_pairs > 0 {
            let next = data
                .next_data(b * bs)
                .map_err(io("looking for holes in the image"))?
                .map_or(data.size(), |(s, _)| s);
            let hole = (next / bs).saturating_sub(b).min(zero_pairs);
            if hole > 0 {
                out.checked += hole;
                b += hole;
                continue;
            }
        }
        let n = CHUNK.min(sb.blocks - b);
        let chunk = &mut buf[..(n * bs) as usize];
        data.read_at(chunk, b * bs)
            .map_err(io("reading the image"))?;
        m.get_range(b, &mut pairs[..n as usize])?;
        for (k, (content, p)) in chunk.chunks_exact(bs as usize).zip(&pairs).enumerate() {
            let extras = m.extra_versions(b + k as u64);
            if sum
                .find_version(b + k as u64, content, *p, extras)
                .is_none()
            {
                out.mismatches.push(b + k as u64);
            }
        }
        out.checked += n;
        b += n;
    }
    Ok(out)
}

/// Open `path` read-only, unlocked: crash-states reads copies.
pub fn open_readonly(path: &Path) -> io::Result<FileDevice> {
    FileDevice::open(
        path,
        OpenFlags {
            writable: false,
            lock: false,
        },
    )
}

/// Remove a state's files after a failed build.
pub fn remove_state(img: &Path, meta: &Path) {
    let _ = fs::remove_file(img);
    let _ = fs::remove_file(meta);
}

/// What `crash-states` is asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    pub log: std::path::PathBuf,
    pub base: std::path::PathBuf,
    pub base_meta: std::path::PathBuf,
    pub out: std::path::PathBuf,
    pub at: At,
    pub count: Option<usize>,
    pub seed: u64,
    /// The key of a disk with keyed checksums: needed to check the base
    /// and the states.
    pub key: Option<Key>,
}

/// Why no states were made.
#[derive(Debug, thiserror::Error)]
pub enum StatesError {
    #[error("cannot read write log {}", path.display())]
    Log {
        path: std::path::PathBuf,
        #[source]
        source: super::WriteLogError,
    },
    #[error("base image {} is {have} bytes; the log's disk has {want}", path.display())]
    BaseSize {
        path: std::path::PathBuf,
        have: u64,
        want: u64,
    },
    #[error(
        "base metadata {} is not the metadata this log began with (digest {have:016x}, the log's is {want:016x})",
        path.display()
    )]
    BaseMeta {
        path: std::path::PathBuf,
        have: u64,
        want: u64,
    },
    #[error(
        "base image {} does not match the base metadata: {count} block(s) match neither checksum, the first is block {first}; it is not the image this log began with",
        path.display()
    )]
    BaseImage {
        path: std::path::PathBuf,
        count: usize,
        first: u64,
    },
    #[error("cannot use {}", path.display())]
    Meta {
        path: std::path::PathBuf,
        #[source]
        source: MetaError,
    },
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_at<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StatesError + 'a {
    move |source| StatesError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// `manifest.json`.
#[derive(Debug, serde::Serialize)]
pub struct Manifest {
    pub log: String,
    pub base: String,
    pub base_meta: String,
    pub at: At,
    pub seed: u64,
    pub block_size: u32,
    /// Records in the log.
    pub entries: u64,
    /// "device": the metadata of each state is what the metadata device
    /// could hold at the cut, from the recorded metadata writes.
    pub metadata: &'static str,
    pub states: Vec<StateReport>,
}

/// One state in `manifest.json`. Paths are relative to the output
/// directory.
#[derive(Debug, serde::Serialize)]
pub struct StateReport {
    pub image: String,
    pub meta: String,
    pub at: At,
    pub cut: u64,
    pub last_flush: Option<u64>,
    pub mark: Option<String>,
    /// Device writes after the last sync that covered them, over both
    /// devices: kept whole, dropped, torn.
    pub kept: u64,
    pub dropped: u64,
    pub torn: u64,
    /// Device writes a completed sync covered (kept whole).
    pub durable: u64,
    pub data: Counts,
    pub metadata: Counts,
    pub seed: u64,
    /// Blocks whose content a completed FLUSH promised, checked.
    pub promised: u64,
    /// Of those, blocks without the promised content (must be empty).
    pub broken_promises: Vec<u64>,
    /// Blocks checked against the state's own metadata.
    pub checked: u64,
    /// Of those, blocks that match neither checksum (must be empty).
    pub mismatches: Vec<u64>,
}

impl StateReport {
    /// Whether the state is what a legal power cut leaves and twinsum's
    /// metadata covers it.
    pub fn ok(&self) -> bool {
        self.broken_promises.is_empty() && self.mismatches.is_empty()
    }
}

/// Read the log, check the base against it, and write the states and
/// `manifest.json` into `opts.out`. States that fail their checks are
/// still written and reported (see [`StateReport::ok`]).
pub fn generate(opts: &Options) -> Result<Manifest, StatesError> {
    let log = LogFile::open(&opts.log).map_err(|source| StatesError::Log {
        path: opts.log.clone(),
        source,
    })?;
    check_base(&log, opts)?;
    fs::create_dir_all(&opts.out).map_err(io_at("cannot create", &opts.out))?;
    let mut states = Vec::new();
    for (i, cut) in cuts(&log, opts.at, opts.count, opts.seed)
        .iter()
        .enumerate()
    {
        let (img_name, meta_name) = (format!("{:04}.img", i + 1), format!("{:04}.meta", i + 1));
        let (img, meta) = (opts.out.join(&img_name), opts.out.join(&meta_name));
        let plan = plan(&log, cut);
        let built = build(&log, &plan, opts, &img, &meta);
        let (data_dev, meta_dev) = match built {
            Ok(d) => d,
            Err(e) => {
                remove_state(&img, &meta);
                return Err(e);
            }
        };
        let promise = GuestCheck::at(&log, cut);
        let broken = promise
            .broken(&data_dev, log.header.block_size)
            .map_err(io_at("cannot read", &img))?;
        let v =
            verify(&data_dev, meta_dev, opts.key.as_ref()).map_err(|source| StatesError::Meta {
                path: meta.clone(),
                source,
            })?;
        let t = plan.total();
        states.push(StateReport {
            image: img_name,
            meta: meta_name,
            at: cut.at,
            cut: cut.cut,
            last_flush: cut.last_flush,
            mark: cut.mark.clone(),
            kept: t.kept,
            dropped: t.dropped,
            torn: t.torn,
            durable: t.durable,
            data: plan.data,
            metadata: plan.meta,
            seed: cut.seed,
            promised: promise.len() as u64,
            broken_promises: broken,
            checked: v.checked,
            mismatches: v.mismatches,
        });
    }
    let manifest = Manifest {
        log: opts.log.display().to_string(),
        base: opts.base.display().to_string(),
        base_meta: opts.base_meta.display().to_string(),
        at: opts.at,
        seed: opts.seed,
        block_size: log.header.block_size,
        entries: log.entries.len() as u64,
        metadata: "device",
        states,
    };
    let path = opts.out.join("manifest.json");
    let mut text = serde_json::to_string_pretty(&manifest)
        .map_err(io::Error::other)
        .map_err(io_at("cannot write", &path))?;
    text.push('\n');
    fs::write(&path, text).map_err(io_at("cannot write", &path))?;
    Ok(manifest)
}

/// Refuse a base that is not what the log began with.
fn check_base(log: &LogFile, opts: &Options) -> Result<(), StatesError> {
    let h = &log.header;
    let img = open_readonly(&opts.base).map_err(io_at("cannot open", &opts.base))?;
    if img.size() != h.data_size {
        return Err(StatesError::BaseSize {
            path: opts.base.clone(),
            have: img.size(),
            want: h.data_size,
        });
    }
    let meta: Arc<dyn Device> =
        Arc::new(open_readonly(&opts.base_meta).map_err(io_at("cannot open", &opts.base_meta))?);
    let have = super::digest(&*meta).map_err(io_at("cannot read", &opts.base_meta))?;
    if have != h.meta_digest {
        return Err(StatesError::BaseMeta {
            path: opts.base_meta.clone(),
            have,
            want: h.meta_digest,
        });
    }
    let v = verify(&img, meta, opts.key.as_ref()).map_err(|source| StatesError::Meta {
        path: opts.base_meta.clone(),
        source,
    })?;
    if let Some(&first) = v.mismatches.first() {
        return Err(StatesError::BaseImage {
            path: opts.base.clone(),
            count: v.mismatches.len(),
            first,
        });
    }
    Ok(())
}

/// Copy the base and apply `plan`: the state's devices, open for reading.
fn build(
    log: &LogFile,
    plan: &Plan,
    opts: &Options,
    img: &Path,
    meta: &Path,
) -> Result<(FileDevice, Arc<dyn Device>), StatesError> {
    let d = sparse_copy(&opts.base, img).map_err(io_at("cannot copy the base to", img))?;
    let m = sparse_copy(&opts.base_meta, meta)
        .map_err(io_at("cannot copy the base metadata to", meta))?;
    apply(log, plan, &d, &m).map_err(io_at("cannot build", img))?;
    Ok((d, Arc::new(m)))
}
