//! A randomized hostile front-end against the real `twinsum serve`.
//!
//! Each case connects with random options and does one of: a batch of
//! random requests (valid ones, invalid ones, malformed descriptor chains,
//! completely random chains), garbage ring indices, random vhost-user
//! messages of random sizes, or a disconnect at a random point of the
//! set-up. After every case the daemon must be alive and serve a good
//! write and read-back on a fresh connection, and the whole disk is read
//! back and compared with what the case was allowed to change:
//!
//! - a request that completed OK changed exactly its range;
//! - a request that failed, or that the fuzzer built to be refused (a
//!   malformed chain, a bad header), changed nothing;
//! - a request that was not seen to complete (disconnect, garbage ring
//!   indices) left each block old or new;
//! - nothing outside the requested ranges changed.
//!
//! Reading through the daemon verifies every checksum too, and at the end
//! `twinsum check` must be clean.
//!
//! `TWINSUM_FUZZ_SEED` and `TWINSUM_FUZZ_CASES` set the run (`make fuzz`
//! runs a long one); a failure prints both, which replay it.

mod common;

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::panic::{self, AssertUnwindSafe};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use common::frontend::*;
use common::{pattern, Daemon, Disk};

const MIB: u64 = 1 << 20;
const BS: u64 = 4096;
const DISK: u64 = 4 * MIB;
/// Each request of a case gets a lane of its own, so requests of one case
/// never overlap and every outcome can be checked exactly.
const LANE: u64 = 128 << 10;
/// The last lane is the health check's.
const LANES: u64 = DISK / LANE - 1;
const PROBE: u64 = DISK - LANE;
const MAX_REQS: usize = 12;
/// Bytes of data one request carries at most (one data slot).
const MAX_DATA: u64 = 64 << 10;
const MEM_LEN: usize = 16 << 20;

/// Request `k`'s data buffer (room for MAX_DATA + 1 bytes) and a second
/// one for other layouts of the same request.
fn buf(k: u64) -> u64 {
    DATA_BASE + k * 0x4_0000
}
fn alt(k: u64) -> u64 {
    buf(k) + 0x2_0000
}

const DEFAULT_SEED: u64 = 0x7715_0009;
const DEFAULT_CASES: u64 = 80;

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => v.parse().ok(),
    }
}

#[test]
fn random_front_ends_never_get_a_bad_request_through() {
    let seed = env_u64("TWINSUM_FUZZ_SEED").unwrap_or(DEFAULT_SEED);
    let cases = env_u64("TWINSUM_FUZZ_CASES").unwrap_or(DEFAULT_CASES);
    eprintln!("front-end fuzz: TWINSUM_FUZZ_SEED={seed:#x} TWINSUM_FUZZ_CASES={cases}");
    let disk = Disk::new(DISK, BS);
    let mut d = disk.serve(&["--queues", "2"]);
    let mut shadow = vec![0u8; DISK as usize];
    let mut stats = Stats::default();
    for case in 0..cases {
        let r = panic::catch_unwind(AssertUnwindSafe(|| {
            let mut rng = StdRng::seed_from_u64(seed ^ case.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            run_case(&disk, &mut d, &mut shadow, &mut rng, case, &mut stats);
        }));
        if let Err(e) = r {
            eprintln!(
                "front-end fuzz case {case} failed; replay with \
                 TWINSUM_FUZZ_SEED={seed:#x} TWINSUM_FUZZ_CASES={} \
                 cargo test --release --test frontend_fuzz -- --nocapture\n--- daemon log (tail) ---\n{}",
                case + 1,
                tail(&d.log(), 40)
            );
            panic::resume_unwind(e);
        }
    }
    eprintln!("front-end fuzz: {cases} cases, {stats:?}");
    let log = d.log();
    assert!(d.terminate().success(), "orderly stop:\n{}", tail(&log, 40));
    let o = common::twinsum(&[
        "check",
        "--data",
        common::s(&disk.data),
        "--meta",
        common::s(&disk.meta),
    ]);
    assert!(
        o.status.success(),
        "twinsum check after the fuzz (TWINSUM_FUZZ_SEED={seed:#x} TWINSUM_FUZZ_CASES={cases}): {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    // The run did exercise what it is meant to.
    assert!(stats.ok > 0 && stats.refused > 0 && stats.malformed > 0);
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<_> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[derive(Debug, Default)]
struct Stats {
    ok: u64,
    refused: u64,
    malformed: u64,
    unseen: u64,
    messages: u64,
    disconnects: u64,
}

/// What the disk may hold after a case, block by block; blocks not named
/// must be unchanged.
#[derive(Default)]
struct Allowed {
    blocks: HashMap<u64, Vec<Vec<u8>>>,
    wild: Vec<u64>,
}

impl Allowed {
    /// `offset..offset + data.len()` holds exactly `data` (`maybe`: or
    /// what it held before).
    fn set(&mut self, offset: u64, data: &[u8], maybe: bool, shadow: &[u8]) {
        for (i, chunk) in data.chunks(BS as usize).enumerate() {
            let b = offset / BS + i as u64;
            let mut c = vec![chunk.to_vec()];
            if maybe {
                let o = (b * BS) as usize;
                c.push(shadow[o..o + BS as usize].to_vec());
            }
            self.blocks.insert(b, c);
        }
    }

    /// A lane the fuzzer cannot predict (a random chain may write it).
    fn wild(&mut self, lane: u64) {
        self.wild.push(lane);
    }
}

/// The kind of damage done to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Damage {
    None,
    /// Refused by the request checks: bad header, range, direction.
    Invalid,
    /// A malformed chain: refused before anything is parsed.
    Malformed,
    /// Head past the table: never completed at all.
    BogusHead,
    /// A random chain: anything may happen in its lane, it must not crash.
    Random,
}

/// One request of a batch and what it must do.
struct Planned {
    head: u16,
    queue: usize,
    damage: Damage,
    /// Where its status byte is, when it has a well-formed one.
    status_at: Option<u64>,
    effect: Effect,
    /// Expected used length for a request that completes OK.
    used_len: Option<u32>,
    what: String,
}

enum Effect {
    None,
    Write {
        offset: u64,
        data: Vec<u8>,
    },
    Zero {
        ranges: Vec<(u64, u64)>,
    },
    /// A read: the guest ranges its data went to, compared with the disk.
    Read {
        offset: u64,
        segs: Vec<(u64, u32)>,
    },
}

fn run_case(
    disk: &Disk,
    d: &mut Daemon,
    shadow: &mut [u8],
    rng: &mut StdRng,
    case: u64,
    stats: &mut Stats,
) {
    let mut allowed = Allowed::default();
    let opts = Options {
        queues: rng.gen_range(1..=2),
        queue_size: [4, 16, 64, 256][rng.gen_range(0..4)],
        event_idx: rng.gen_bool(0.5),
        mem_len: MEM_LEN,
        ..Options::default()
    };
    let pick = rng.gen_range(0..100);
    if std::env::var_os("TWINSUM_FUZZ_VERBOSE").is_some() {
        eprintln!("case {case}: kind {pick}, {opts:?}");
    }
    match pick {
        0..=59 => requests_case(disk, shadow, rng, &opts, &mut allowed, false, stats),
        60..=69 => requests_case(disk, shadow, rng, &opts, &mut allowed, true, stats),
        70..=84 => messages_case(disk, rng, &opts, stats),
        _ => disconnect_case(disk, shadow, rng, &opts, &mut allowed, stats),
    }
    if let Some(st) = d.exited() {
        panic!("case {case}: twinsum serve died ({st})");
    }
    health_check(disk, shadow, &allowed, case);
}

/// A fresh front-end writes and reads back, and the disk holds what the
/// case allowed.
fn health_check(disk: &Disk, shadow: &mut [u8], allowed: &Allowed, case: u64) {
    let mut f = Front::connect(&disk.socket, &Options::default())
        .unwrap_or_else(|e| panic!("case {case}: cannot connect after the case: {e}"));
    let data = pattern(PROBE, 16384, case);
    assert_eq!(f.write(0, PROBE, &data), VIRTIO_BLK_S_OK, "probe write");
    assert_eq!(
        f.read(0, PROBE, 16384),
        (VIRTIO_BLK_S_OK, data),
        "probe read"
    );
    for off in (0..PROBE).step_by(LANE as usize) {
        let (st, got) = f.read(0, off, LANE as usize);
        assert_eq!(st, VIRTIO_BLK_S_OK, "case {case}: reading back {off:#x}");
        for (i, block) in got.chunks(BS as usize).enumerate() {
            let b = off / BS + i as u64;
            let at = (b * BS) as usize;
            let old = &shadow[at..at + BS as usize];
            if allowed.wild.contains(&(b * BS / LANE)) {
                // Unpredictable, but it verified.
            } else if let Some(c) = allowed.blocks.get(&b) {
                assert!(
                    c.iter().any(|x| x == block),
                    "case {case}: block {b} holds none of the {} allowed contents \
                     (old {}, got {:02x?}..)",
                    c.len(),
                    c.iter().any(|x| x == old),
                    &block[..8]
                );
            } else {
                assert!(
                    block == old,
                    "case {case}: block {b} changed, nothing asked it to (was {:02x?}.., is {:02x?}..)",
                    &old[..8],
                    &block[..8]
                );
            }
        }
        shadow[off as usize..off as usize + got.len()].copy_from_slice(&got);
    }
}

/// Descriptor and memory allocation within one case.
struct Alloc {
    /// Next free entry of each queue's table.
    next_desc: Vec<u16>,
    /// Next free byte of the indirect-table area.
    scratch: u64,
}

impl Alloc {
    fn table(&mut self, queue: usize, size: u16, n: usize) -> Option<u16> {
        let at = self.next_desc[queue];
        (usize::from(at) + n <= usize::from(size)).then(|| {
            self.next_desc[queue] += n as u16;
            at
        })
    }

    fn indirect(&mut self, n: usize) -> Option<u64> {
        let at = self.scratch;
        let end = at + 16 * n as u64;
        (end <= DATA_BASE).then(|| {
            self.scratch = end.next_multiple_of(16);
            at
        })
    }
}

/// A batch of random requests on random queues, completions checked.
/// `garbage`: then scribble over the ring indices too.
fn requests_case(
    disk: &Disk,
    shadow: &[u8],
    rng: &mut StdRng,
    opts: &Options,
    allowed: &mut Allowed,
    garbage: bool,
    stats: &mut Stats,
) {
    let mut f = Front::connect(&disk.socket, opts).expect("connect");
    let mut alloc = Alloc {
        next_desc: vec![0; opts.queues],
        scratch: SCRATCH_BASE,
    };
    let mut lanes: Vec<u64> = (0..LANES).collect();
    let n = rng.gen_range(1..=MAX_REQS.min(usize::from(opts.queue_size)));
    let mut plans = Vec::new();
    for k in 0..n {
        let lane = lanes.swap_remove(rng.gen_range(0..lanes.len()));
        let queue = rng.gen_range(0..opts.queues);
        if let Some(p) = plan(&f, rng, &mut alloc, queue, opts.queue_size, k as u64, lane) {
            if p.damage == Damage::Random {
                allowed.wild(lane);
            }
            plans.push(p);
        }
    }
    let mut expected = vec![0usize; opts.queues];
    for (q, exp) in expected.iter_mut().enumerate() {
        let heads: Vec<u16> = plans
            .iter()
            .filter(|p| p.queue == q)
            .map(|p| p.head)
            .collect();
        *exp = plans
            .iter()
            .filter(|p| p.queue == q && p.damage != Damage::BogusHead)
            .count();
        // Published in one or two goes, kicked after each.
        let split = rng.gen_range(0..=heads.len());
        for part in [&heads[..split], &heads[split..]] {
            if !part.is_empty() {
                f.vqs[q].publish(&f.mem, part);
                f.vqs[q].kick();
            }
        }
    }
    if garbage {
        for _ in 0..rng.gen_range(1..4) {
            let q = rng.gen_range(0..opts.queues);
            let vq = &mut f.vqs[q];
            match rng.gen_range(0..4) {
                0 => {
                    let idx = vq.avail_idx.wrapping_add(rng.gen_range(1..=3 * vq.size));
                    vq.set_avail_idx(&f.mem, idx);
                }
                1 => vq.set_avail_idx(&f.mem, rng.gen()),
                2 => f.mem.write_u16(vq.used + 2, rng.gen()),
                _ => {
                    // An avail entry naming a head of this case again, or
                    // one past the table (a random index could name the
                    // middle of a chain, whose bytes the fuzzer does not
                    // model as a request).
                    let heads: Vec<u16> = plans
                        .iter()
                        .filter(|p| p.queue == q)
                        .map(|p| p.head)
                        .collect();
                    let h = match heads.len() {
                        0 => vq.size + 1,
                        n => heads[rng.gen_range(0..n)],
                    };
                    let slot = u64::from(rng.gen_range(0..vq.size));
                    f.mem.write_u16(vq.avail + 4 + 2 * slot, h);
                }
            }
            vq.kick();
        }
    }
    // Sometimes hang up before looking at anything.
    let early = rng.gen_bool(0.15);
    let mut used: Vec<Vec<Used>> = vec![Vec::new(); opts.queues];
    if !early {
        for q in 0..opts.queues {
            // Garbage indices may complete more, fewer or other heads.
            let wait = if garbage {
                Duration::from_millis(20)
            } else {
                common::DEADLINE
            };
            used[q] = f.vqs[q].wait_used_for(&f.mem, expected[q], wait);
        }
    }
    let statuses: Vec<Option<u8>> = plans
        .iter()
        .map(|p| p.status_at.map(|a| f.mem.read(a, 1)[0]))
        .collect();
    let reads: Vec<Vec<u8>> = plans
        .iter()
        .map(|p| match &p.effect {
            Effect::Read { segs, .. } => segs
                .iter()
                .flat_map(|&(a, l)| f.mem.read(a, l as usize))
                .collect(),
            _ => Vec::new(),
        })
        .collect();
    drop(f);

    for (q, u) in used.iter().enumerate() {
        if garbage || early {
            continue;
        }
        assert_eq!(
            u.len(),
            expected[q],
            "queue {q}: every request completes: {u:?}"
        );
        let order: Vec<u32> = plans
            .iter()
            .filter(|p| p.queue == q && p.damage != Damage::BogusHead)
            .map(|p| u32::from(p.head))
            .collect();
        assert_eq!(
            u.iter().map(|x| x.id).collect::<Vec<_>>(),
            order,
            "queue {q}: completions in avail order"
        );
    }
    for ((p, st), read) in plans.iter().zip(&statuses).zip(&reads) {
        // With garbage indices a used entry may be stale or forged, and a
        // request may still run after we looked: nothing counts as seen.
        let seen = used[p.queue]
            .iter()
            .find(|u| u.id == u32::from(p.head))
            .filter(|_| !garbage);
        if std::env::var_os("TWINSUM_FUZZ_VERBOSE").is_some() {
            eprintln!(
                "  {} on queue {} head {}: {:?} status {st:?} used {seen:?}{}{}",
                p.what,
                p.queue,
                p.head,
                p.damage,
                if garbage { " (garbage indices)" } else { "" },
                if early { " (hung up early)" } else { "" },
            );
        }
        let ok = seen.is_some() && *st == Some(VIRTIO_BLK_S_OK);
        match p.damage {
            Damage::Invalid | Damage::Malformed => {
                // Seen or not: its status byte is its own.
                assert!(
                    !ok && *st != Some(VIRTIO_BLK_S_OK),
                    "{} completed OK",
                    p.what
                );
                if p.damage == Damage::Malformed {
                    stats.malformed += 1;
                } else {
                    stats.refused += 1;
                }
                continue;
            }
            Damage::BogusHead if !garbage => {
                assert!(
                    seen.is_none(),
                    "{}: a head past the table completed",
                    p.what
                );
                continue;
            }
            Damage::BogusHead => {
                // Its chain may be reached through a garbage avail entry.
                if let Effect::Write { offset, data } = &p.effect {
                    allowed.set(*offset, data, true, shadow);
                }
                if let Effect::Zero { ranges } = &p.effect {
                    for &(o, l) in ranges {
                        allowed.set(o, &vec![0; l as usize], true, shadow);
                    }
                }
                continue;
            }
            Damage::Random => continue,
            Damage::None => {}
        }
        if seen.is_none() {
            assert!(garbage || early, "{} did not complete", p.what);
            stats.unseen += 1;
            match &p.effect {
                Effect::Write { offset, data } => allowed.set(*offset, data, true, shadow),
                Effect::Zero { ranges } => {
                    for &(o, l) in ranges {
                        allowed.set(o, &vec![0; l as usize], true, shadow);
                    }
                }
                _ => {}
            }
            continue;
        }
        if !garbage {
            assert_eq!(*st, Some(VIRTIO_BLK_S_OK), "{} failed", p.what);
            if let (Some(want), Some(u)) = (p.used_len, seen) {
                assert_eq!(u.len, want, "{}: used length", p.what);
            }
        }
        if !ok {
            continue;
        }
        stats.ok += 1;
        match &p.effect {
            Effect::Write { offset, data } => allowed.set(*offset, data, garbage, shadow),
            Effect::Zero { ranges } => {
                for &(o, l) in ranges {
                    allowed.set(o, &vec![0; l as usize], garbage, shadow);
                }
            }
            Effect::Read { offset, .. } if !garbage => {
                let o = *offset as usize;
                assert!(
                    read.as_slice() == &shadow[o..o + read.len()],
                    "{}: read data differs from the disk",
                    p.what
                );
            }
            _ => {}
        }
    }
}

/// Build one request in lane `lane` with slot `k`'s buffers, put its chain
/// in queue `queue`'s table (or an indirect table), and say what it must
/// do. `None` if there is no room left for it.
#[allow(clippy::too_many_arguments)]
fn plan(
    f: &Front,
    rng: &mut StdRng,
    alloc: &mut Alloc,
    queue: usize,
    size: u16,
    k: u64,
    lane: u64,
) -> Option<Planned> {
    let m = &f.mem;
    let lane_off = lane * LANE;
    let mut damage = Damage::None;
    let mut what;
    let mut used_len = Some(1);
    let mut effect = Effect::None;
    let mut status_at = Some(status(k));
    m.write(status(k), &[0xff]);
    // readable, writable descriptors in chain order
    let mut rd: Vec<Desc> = Vec::new();
    let mut wr: Vec<Desc> = Vec::new();
    let mut random_chain = false;

    let ty_pick = rng.gen_range(0..100);
    let blocks = rng.gen_range(0..=MAX_DATA / BS);
    let start = lane_off + BS * rng.gen_range(0..=(LANE - MAX_DATA) / BS);
    let mut sector = start / 512;
    let mut len = (blocks * BS) as u32;
    // A bad header or range, now and then.
    let bad_range = rng.gen_bool(0.1);
    if bad_range {
        damage = Damage::Invalid;
        sector = match rng.gen_range(0..3) {
            0 => sector + rng.gen_range(1..8),
            1 => DISK / 512 - rng.gen_range(0..8),
            _ => rng.gen_range(DISK / 512..u64::MAX),
        };
        if len == 0 {
            len = BS as u32;
        }
    } else if rng.gen_bool(0.05) {
        damage = Damage::Invalid;
        len = rng.gen_range(1..MAX_DATA as u32);
        len += u32::from(len.is_multiple_of(BS as u32));
    }
    match ty_pick {
        0..=34 => {
            what = format!("write of {len} at sector {sector}");
            let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            m.write(buf(k), &data);
            let split = split_buffer(rng, buf(k), len, false);
            m.header(hdr(k), VIRTIO_BLK_T_OUT, sector);
            if damage == Damage::None && rng.gen_bool(0.1) {
                // ANY_LAYOUT: header and data in the same buffers.
                let at = alt(k);
                m.header(at, VIRTIO_BLK_T_OUT, sector);
                m.write(at + 16, &data);
                rd.extend(split_buffer(rng, at, 16 + len, false));
            } else {
                rd.push(Desc::rd(hdr(k), 16));
                rd.extend(split);
            }
            if rng.gen_bool(0.05) && len > 0 {
                // Data in the wrong direction.
                damage = Damage::Invalid;
                let d = rd.pop().unwrap_or(Desc::rd(buf(k), len));
                wr.push(Desc {
                    flags: VRING_DESC_F_WRITE,
                    ..d
                });
            }
            wr.push(Desc::wr(status(k), 1));
            if damage == Damage::None && len > 0 {
                effect = Effect::Write {
                    offset: sector * 512,
                    data,
                };
            }
        }
        35..=59 => {
            what = format!("read of {len} at sector {sector}");
            m.header(hdr(k), VIRTIO_BLK_T_IN, sector);
            m.fill(buf(k), len as usize + 1, 0xee);
            rd.push(Desc::rd(hdr(k), 16));
            if rng.gen_bool(0.1) {
                // The status byte at the end of the last data buffer.
                m.write(status(k), &[0]);
                wr.extend(split_buffer(rng, buf(k), len + 1, true));
                status_at = Some(buf(k) + u64::from(len));
            } else {
                wr.extend(split_buffer(rng, buf(k), len, true));
                wr.push(Desc::wr(status(k), 1));
            }
            if rng.gen_bool(0.05) && len > 0 {
                damage = Damage::Invalid;
                rd.push(Desc::rd(alt(k), 512));
            }
            used_len = Some(len + 1);
            if damage == Damage::None {
                effect = Effect::Read {
                    offset: sector * 512,
                    segs: vec![(buf(k), len)],
                };
            }
        }
        60..=67 => {
            what = "flush".into();
            m.header(hdr(k), VIRTIO_BLK_T_FLUSH, rng.gen());
            rd.push(Desc::rd(hdr(k), 16));
            wr.push(Desc::wr(status(k), 1));
            if damage == Damage::Invalid {
                damage = Damage::None; // a flush has no range to be wrong
            }
        }
        68..=81 => {
            let discard = rng.gen_bool(0.5);
            let ty = if discard {
                VIRTIO_BLK_T_DISCARD
            } else {
                VIRTIO_BLK_T_WRITE_ZEROES
            };
            let n = rng.gen_range(1..=3u64);
            let mut ranges = Vec::new();
            let seg_room = (LANE / BS) / n;
            for i in 0..n {
                let b0 = lane_off / BS + i * seg_room + rng.gen_range(0..seg_room);
                let cnt = rng.gen_range(0..=(lane_off / BS + (i + 1) * seg_room - b0));
                let mut s_sector = b0 * BS / 512;
                let mut s_count = (cnt * BS / 512) as u32;
                let mut flags = if !discard && rng.gen_bool(0.5) { 1 } else { 0 };
                if damage == Damage::Invalid {
                    s_sector += 1;
                    s_count = s_count.max(8);
                } else if rng.gen_bool(0.05) {
                    damage = Damage::Invalid;
                    flags |= 1 << rng.gen_range(1..32);
                }
                m.zero_segment(buf(k) + 16 * i, s_sector, s_count, flags);
                if cnt > 0 {
                    ranges.push((b0 * BS, cnt * BS));
                }
            }
            what = format!(
                "{} of {ranges:?}",
                if discard { "discard" } else { "write-zeroes" }
            );
            m.header(hdr(k), ty, 0);
            rd.push(Desc::rd(hdr(k), 16));
            rd.extend(split_buffer(rng, buf(k), 16 * n as u32, false));
            wr.push(Desc::wr(status(k), 1));
            if damage == Damage::None {
                effect = Effect::Zero { ranges };
            }
        }
        82..=86 => {
            what = "get-id".into();
            m.header(hdr(k), VIRTIO_BLK_T_GET_ID, 0);
            let l = rng.gen_range(0..64);
            rd.push(Desc::rd(hdr(k), 16));
            wr.extend(split_buffer(rng, buf(k), l, true));
            wr.push(Desc::wr(status(k), 1));
            used_len = Some(l.min(20) + 1);
            damage = Damage::None;
        }
        87..=92 => {
            let mut ty: u32 = rng.gen();
            if [0, 1, 4, 8, 11, 13].contains(&ty) {
                ty = 2;
            }
            what = format!("request of type {ty}");
            m.header(hdr(k), ty, sector);
            rd.push(Desc::rd(hdr(k), 16));
            wr.push(Desc::wr(status(k), 1));
            damage = Damage::Invalid;
        }
        _ => {
            // A chain of random descriptors over this slot's buffers, with
            // a plausible header somewhere in them. Whatever it turns out
            // to be, it stays in its lane: the header's sector is near the
            // lane's start, the buffers are small, and read as a discard
            // segment the header's ioprio makes the sector huge.
            what = "random chain".into();
            random_chain = true;
            let junk: Vec<u8> = (0..MAX_DATA).map(|_| rng.gen()).collect();
            m.write(buf(k), &junk);
            let at = alt(k);
            m.header(
                at,
                rng.gen_range(0..16),
                lane_off / 512 + rng.gen_range(0..64),
            );
            m.write(at + 4, &u32::MAX.to_le_bytes());
            for _ in 0..rng.gen_range(1..6) {
                let addr = match rng.gen_range(0..4) {
                    0 => at,
                    1 => buf(k) + rng.gen_range(0..MAX_DATA),
                    2 => MEM_LEN as u64 - rng.gen_range(0..64),
                    _ => rng.gen(),
                };
                let d = Desc {
                    addr,
                    len: [0, 1, 16, 17, 512, 4096, u32::MAX][rng.gen_range(0..7)],
                    flags: rng.gen::<u16>() & 0x7,
                    next: 0,
                };
                if rng.gen_bool(0.5) {
                    rd.push(d);
                } else {
                    wr.push(d);
                }
            }
            status_at = None;
            used_len = None;
            damage = Damage::Random;
        }
    }
    // Zero-length buffers where they do no harm.
    if damage != Damage::Random && rng.gen_bool(0.1) {
        let i = rng.gen_range(0..=rd.len());
        rd.insert(i, Desc::rd(buf(k), 0));
    }
    let mut chain: Vec<Desc> = rd.into_iter().chain(wr).collect();
    if !random_chain {
        for d in chain.iter_mut() {
            d.flags &= !VRING_DESC_F_NEXT;
        }
    }

    // Where the chain goes, and how it may be broken.
    let corrupt = damage != Damage::Random && rng.gen_bool(0.15);
    let kind = rng.gen_range(0..11);
    let want_indirect = rng.gen_bool(0.25) || (corrupt && kind >= 6);
    let n = chain.len();
    let direct_room = alloc.next_desc[queue] as usize + n <= usize::from(size);
    let indirect = want_indirect || !direct_room;
    let head;
    let mut entries: Vec<(u64, Desc)> = Vec::new(); // (address, descriptor)
    let table_entries: u16;
    let table_base: u64;
    let vq = &f.vqs[queue];
    if indirect {
        head = alloc.table(queue, size, 1)?;
        table_base = alloc.indirect(n + 2)?;
        table_entries = n as u16;
    } else {
        head = alloc.table(queue, size, n)?;
        table_base = vq.desc;
        table_entries = size;
    }
    let first = if indirect { 0 } else { head };
    // Table positions of the chain's descriptors: in order, or shuffled.
    let mut pos: Vec<u16> = (first..first + n as u16).collect();
    if !random_chain && rng.gen_bool(0.3) {
        let tail = &mut pos[1..];
        for i in (1..tail.len()).rev() {
            tail.swap(i, rng.gen_range(0..=i));
        }
    }
    for (i, d) in chain.iter().enumerate() {
        let mut d = *d;
        if random_chain {
            // Random links, but only among its own entries or past the
            // table: never into another request's chain.
            if d.flags & VRING_DESC_F_NEXT != 0 {
                d.next = if rng.gen_bool(0.8) {
                    pos[rng.gen_range(0..n)]
                } else {
                    table_entries.saturating_add(rng.gen_range(0..4))
                };
            }
        } else if i + 1 < n {
            d.flags |= VRING_DESC_F_NEXT;
            d.next = pos[i + 1];
        }
        entries.push((table_base + 16 * u64::from(pos[i]), d));
    }
    let mut indirect_desc = Desc::indirect(table_base, n as u32);
    if corrupt {
        damage = if kind == 5 {
            Damage::BogusHead
        } else {
            Damage::Malformed
        };
        let last = n - 1;
        let last_pos = pos[last];
        let mut link = |to: u16| {
            entries[last].1.flags |= VRING_DESC_F_NEXT;
            entries[last].1.next = to;
        };
        match kind {
            0 => {
                what += ", last descriptor linked to itself";
                link(last_pos);
            }
            1 => {
                what += ", looped back to the first descriptor";
                link(pos[0]);
            }
            2 | 3 => {
                what += ", next past the table";
                link(table_entries.saturating_add(rng.gen_range(0..100)));
            }
            4 => {
                what += ", looped back to an earlier descriptor";
                link(pos[rng.gen_range(0..=last)]);
            }
            5 => what += ", head past the table",
            6 => {
                what += ", indirect table holding an indirect descriptor";
                link(n as u16);
                entries.push((
                    table_base + 16 * n as u64,
                    Desc::indirect(table_base, n as u32),
                ));
                indirect_desc.len += 16;
            }
            7 => {
                what += ", indirect with NEXT";
                indirect_desc.flags |= VRING_DESC_F_NEXT;
                indirect_desc.next = rng.gen_range(0..size);
            }
            8 => {
                what += ", indirect table of a bad length";
                indirect_desc.len = if rng.gen_bool(0.2) {
                    0
                } else {
                    indirect_desc.len + rng.gen_range(1..16)
                };
            }
            _ => {
                what += ", indirect table running past the end of memory";
                // Moved so that its last entries lie past the end.
                let keep = rng.gen_range(0..n);
                let base = MEM_LEN as u64 - 16 * keep as u64;
                for (i, e) in entries.iter_mut().enumerate() {
                    e.0 = base + 16 * u64::from(pos[i]);
                }
                entries.retain(|e| e.0 + 16 <= MEM_LEN as u64);
                indirect_desc.addr = base;
            }
        }
        assert!(
            indirect || kind < 6,
            "indirect corruptions need an indirect table"
        );
    }
    for (at, d) in entries {
        m.desc(at, d);
    }
    if indirect {
        vq.set_desc(m, head, indirect_desc);
    }
    let head = if damage == Damage::BogusHead {
        size + rng.gen_range(0..1000)
    } else {
        head
    };
    match damage {
        // A chain that never completes still must not run: in a case with
        // garbage ring indices its table entries may be reached anyway,
        // which is why its effect is kept.
        Damage::BogusHead => used_len = None,
        Damage::None => {}
        _ => {
            used_len = None;
            effect = Effect::None;
        }
    }
    Some(Planned {
        head,
        queue,
        damage,
        status_at,
        effect,
        used_len,
        what: format!(
            "request {k} ({what}{})",
            if indirect { ", indirect" } else { "" }
        ),
    })
}

/// `len` bytes at `addr` as 1 to 4 descriptors split at random points.
fn split_buffer(rng: &mut StdRng, addr: u64, len: u32, writable: bool) -> Vec<Desc> {
    if len == 0 {
        return Vec::new();
    }
    let mut cuts: Vec<u32> = (0..rng.gen_range(0..4))
        .map(|_| rng.gen_range(0..len))
        .collect();
    cuts.push(0);
    cuts.push(len);
    cuts.sort_unstable();
    cuts.dedup();
    cuts.windows(2)
        .map(|w| {
            let d = Desc::rd(addr + u64::from(w[0]), w[1] - w[0]);
            if writable {
                Desc {
                    flags: VRING_DESC_F_WRITE,
                    ..d
                }
            } else {
                d
            }
        })
        .collect()
}

/// Set up part of the way, then random vhost-user messages of random
/// sizes, some with a file descriptor attached, then hang up.
fn messages_case(disk: &Disk, rng: &mut StdRng, opts: &Options, stats: &mut Stats) {
    let steps = rng.gen_range(0..=SETUP_STEPS);
    let Ok(f) = Front::connect_partial(&disk.socket, opts, steps) else {
        return;
    };
    let extra = GuestMem::new(1 << 20);
    let event = EventFd::new(0).expect("eventfd");
    for _ in 0..rng.gen_range(1..5) {
        stats.messages += 1;
        let code: u32 = if rng.gen_bool(0.9) {
            rng.gen_range(0..48)
        } else {
            rng.gen()
        };
        let flags: u32 = match rng.gen_range(0..4) {
            0 => rng.gen(),
            1 => 0x1 | 0x8, // version 1, need reply
            _ => 0x1,
        };
        let body_len = match rng.gen_range(0..6) {
            0 => 0,
            1 => 8,
            2 => 40,
            3 => rng.gen_range(0..300),
            4 => rng.gen_range(0..5000),
            _ => 16 + 32 * rng.gen_range(0..4),
        };
        let mut body: Vec<u8> = (0..body_len).map(|_| rng.gen()).collect();
        if code == 5 && body.len() >= 40 && rng.gen_bool(0.7) {
            // A memory table of one region that lies about its size.
            body[..8].copy_from_slice(&1u32.to_le_bytes().repeat(2));
            body[8..16].copy_from_slice(&0u64.to_le_bytes());
            let size = [1u64 << 20, 4 << 20, rng.gen_range(1..1 << 30)][rng.gen_range(0..3)];
            body[16..24].copy_from_slice(&size.to_le_bytes());
            body[24..32].copy_from_slice(&extra.host_addr().to_le_bytes());
            body[32..40].copy_from_slice(&[0; 8]);
        }
        // The size field usually tells the truth.
        let size = if rng.gen_bool(0.8) {
            body.len() as u32
        } else {
            rng.gen()
        };
        let mut msg = Vec::with_capacity(12 + body.len());
        msg.extend_from_slice(&code.to_le_bytes());
        msg.extend_from_slice(&flags.to_le_bytes());
        msg.extend_from_slice(&size.to_le_bytes());
        msg.extend_from_slice(&body);
        // Now and then cut short, even inside the header.
        if rng.gen_bool(0.1) {
            msg.truncate(rng.gen_range(1..msg.len()));
        }
        let fds = match rng.gen_range(0..4) {
            0 => vec![extra.fd()],
            1 => vec![event.as_raw_fd()],
            _ => Vec::new(),
        };
        if f.sock.send_with_fds(&[msg.as_slice()], &fds).is_err() {
            break; // the daemon hung up on us
        }
    }
    // Kick whatever rings exist, for good measure.
    for vq in &f.vqs {
        vq.kick();
    }
}

/// Hang up at a random point: during set-up, or with requests in flight.
fn disconnect_case(
    disk: &Disk,
    shadow: &[u8],
    rng: &mut StdRng,
    opts: &Options,
    allowed: &mut Allowed,
    stats: &mut Stats,
) {
    stats.disconnects += 1;
    let steps = rng.gen_range(0..=SETUP_STEPS);
    let Ok(mut f) = Front::connect_partial(&disk.socket, opts, steps) else {
        return;
    };
    if steps < SETUP_STEPS {
        return;
    }
    // Writes in flight, then gone.
    let mut heads = Vec::new();
    for k in 0..rng.gen_range(1..=4u64.min(u64::from(opts.queue_size) / 3)) {
        let lane = k * 3 + rng.gen_range(0..3);
        let offset = lane * LANE;
        let bytes: Vec<u8> = (0..BS * 4).map(|_| rng.gen()).collect();
        f.mem.write(data(k), &bytes);
        f.mem.header(hdr(k), VIRTIO_BLK_T_OUT, offset / 512);
        let h = f.vqs[0].set_chain(
            &f.mem,
            3 * k as u16,
            &[
                Desc::rd(hdr(k), 16),
                Desc::rd(data(k), bytes.len() as u32),
                Desc::wr(status(k), 1),
            ],
        );
        heads.push(h);
        allowed.set(offset, &bytes, true, shadow);
    }
    f.vqs[0].publish(&f.mem, &heads);
    f.vqs[0].kick();
}
