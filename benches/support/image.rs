//! The benchmark disk image: deterministic content that every read can be
//! checked against cheaply.
//!
//! Each 4 KiB block starts with a 16-byte header `(magic, block number)`
//! and continues with pseudo-random bytes. The header lets the hot path
//! check every block it reads with two integer compares (a misdirected,
//! stale or garbage block is noticed without slowing the load generator),
//! while the body keeps the image free of holes and zero pages, so servers
//! really read and checksum data. The full content of any block can be
//! recomputed from the seed, which the read-back check uses.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Block size of the image and of the checks.
pub const BLOCK: usize = 4096;
/// Header of a block as generated in the base image.
pub const MAGIC_BASE: u64 = u64::from_le_bytes(*b"TWSBASE0");
/// Header of a block written by the random-write workload.
pub const MAGIC_WRITTEN: u64 = u64::from_le_bytes(*b"TWSWRIT0");
const HEADER: usize = 16;

/// SplitMix64: tiny, fast and good enough for test data and offsets; the
/// bench needs reproducibility, not cryptographic quality.
#[derive(Clone)]
pub struct SplitMix(u64);

impl SplitMix {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (Lemire's multiply-shift; the bias is far below
    /// what a benchmark could notice).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

fn fill_random(rng: &mut SplitMix, out: &mut [u8]) {
    for chunk in out.chunks_mut(8) {
        let v = rng.next_u64().to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

fn put_header(out: &mut [u8], magic: u64, block: u64) {
    out[..8].copy_from_slice(&magic.to_le_bytes());
    out[8..HEADER].copy_from_slice(&block.to_le_bytes());
}

/// Content of block `block` of the base image.
pub fn base_block(seed: u64, block: u64, out: &mut [u8]) {
    put_header(out, MAGIC_BASE, block);
    // Mix the block number into the stream so blocks differ from each
    // other (a misdirected write of a neighbour would not verify).
    let mut rng = SplitMix::new(seed ^ block.wrapping_mul(0xa076_1d64_78bd_642f));
    fill_random(&mut rng, &mut out[HEADER..BLOCK]);
}

/// Body shared by every block the write workload writes. One body for all
/// writes keeps the load generator from spending CPU per write on
/// generating data, and still lets the read-back check the whole block.
pub fn written_body(seed: u64, out: &mut [u8]) {
    let mut rng = SplitMix::new(!seed);
    fill_random(&mut rng, &mut out[HEADER..BLOCK]);
}

/// Stamp the header of a written block into a buffer already holding
/// `written_body`.
pub fn stamp_written(out: &mut [u8], block: u64) {
    put_header(out, MAGIC_WRITTEN, block);
}

/// Expected content of `block` given whether the write workload wrote it.
pub fn expected_block(seed: u64, block: u64, written: bool, out: &mut [u8]) {
    if written {
        written_body(seed, out);
        stamp_written(out, block);
    } else {
        base_block(seed, block, out);
    }
}

/// Hot-path check: every 4 KiB block in `buf`, read from byte offset
/// `offset`, carries a header naming its own block number. Returns the
/// first bad block.
pub fn check_headers(buf: &[u8], offset: u64) -> std::result::Result<(), String> {
    for (i, blk) in buf.chunks(BLOCK).enumerate() {
        let want = offset / BLOCK as u64 + i as u64;
        let magic = u64::from_le_bytes(blk[..8].try_into().unwrap());
        let num = u64::from_le_bytes(blk[8..HEADER].try_into().unwrap());
        if (magic != MAGIC_BASE && magic != MAGIC_WRITTEN) || num != want {
            return Err(format!(
                "block {want}: header magic {magic:#018x} block {num} (not this block's data)"
            ));
        }
    }
    Ok(())
}

/// Return the path of the cached base image for `seed` and `size`,
/// generating it first if needed. Generated into a temporary name and
/// renamed, so an interrupted run never leaves a half-written cache.
pub fn cached_base(dir: &Path, seed: u64, size: u64) -> Result<PathBuf> {
    fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let path = dir.join(format!("base-{seed:x}-{size}.img"));
    if fs::metadata(&path)
        .map(|m| m.len() == size)
        .unwrap_or(false)
    {
        return Ok(path);
    }
    let tmp = dir.join(format!(
        "base-{seed:x}-{size}.img.tmp{}",
        std::process::id()
    ));
    eprintln!(
        "bench: generating {} MiB base image {}",
        size >> 20,
        path.display()
    );
    let mut w = BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
    let mut blk = vec![0u8; BLOCK];
    for b in 0..size / BLOCK as u64 {
        base_block(seed, b, &mut blk);
        w.write_all(&blk)?;
    }
    let f = w.into_inner().map_err(|e| e.into_error())?;
    f.sync_all()?;
    fs::rename(&tmp, &path)?;
    Ok(path)
}

/// Copy the base image for one server and make the copy durable, so both
/// copies start from the same state: clean pages, nothing left for
/// writeback to do in the middle of a measurement.
pub fn copy_image(base: &Path, to: &Path) -> Result<()> {
    fs::copy(base, to).with_context(|| format!("copy {} to {}", base.display(), to.display()))?;
    OpenOptions::new().write(true).open(to)?.sync_all()?;
    Ok(())
}

/// Read a whole file once, so it is resident in the host page cache. Done
/// identically for every server's image right before the servers start.
pub fn warm(path: &Path) -> Result<()> {
    let mut f = File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match f.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => bail!("read {}: {e}", path.display()),
        }
    }
}
