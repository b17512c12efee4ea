//! `twinsum format`: write fresh metadata for IMG.
//!
//! The files are checked and opened here; the format itself is
//! [`Formatter`]'s, fed only the image's data regions (holes cost nothing).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use twinsum::integrity::format::Formatter;
use twinsum::integrity::hash;
use twinsum::io::{Device, FileDevice, OpenFlags};
use twinsum::key::Key;
use twinsum::meta::{meta_len, Superblock, SUPERBLOCK_SIZE};

use super::check::{progress_bar, scan_data};

/// Arguments of `twinsum format`.
#[derive(Debug, clap::Args)]
pub struct FormatArgs {
    /// The data image (file or block device). Created sparse with --size if
    /// it does not exist.
    #[arg(long, value_name = "IMG")]
    data: PathBuf,
    /// Where to write the metadata (file or block device).
    #[arg(long, value_name = "META")]
    meta: PathBuf,
    /// Size of IMG in bytes, with an optional binary suffix (K, M, G, T, P;
    /// e.g. 10G = 10 GiB). Required if IMG does not exist; must match IMG
    /// if it does.
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    size: Option<u64>,
    /// Block size the guest sees: 512 or 4096.
    #[arg(long, value_name = "BYTES", default_value_t = 4096)]
    block_size: u32,
    /// Overwrite META even if it already holds metadata or other data.
    #[arg(long)]
    force: bool,
    /// Keyed checksums: FILE holds the key, 32 random bytes or more (make
    /// one with `head -c 32 /dev/urandom > FILE; chmod 600 FILE`). Refused
    /// if group or others may read or write FILE.
    #[arg(long, value_name = "FILE")]
    key_file: Option<PathBuf>,
    /// MiB of metadata log after the pair table (format version 3): each
    /// commit then appends one sequential record instead of writing a
    /// table page per block. 0 writes version 1 metadata, without a log
    /// [default: four times the table's size, between 1 and 32 MiB].
    #[arg(long, value_name = "MIB")]
    meta_log: Option<u64>,
}

/// Largest `--meta-log`.
const MAX_LOG_MIB: u64 = 4096;

/// Validated `format` arguments.
#[derive(Debug)]
struct FormatConfig {
    data: PathBuf,
    meta: PathBuf,
    size: Option<u64>,
    block_size: u32,
    force: bool,
    key: Option<Key>,
    /// Bytes of metadata log (0: version 1); `None`: sized from the table.
    log_size: Option<u64>,
}

impl TryFrom<FormatArgs> for FormatConfig {
    type Error = anyhow::Error;

    fn try_from(a: FormatArgs) -> anyhow::Result<Self> {
        if a.block_size != 512 && a.block_size != 4096 {
            bail!("--block-size must be 512 or 4096, not {}", a.block_size);
        }
        if let Some(size) = a.size {
            check_size(size, a.block_size).context("bad --size")?;
        }
        if let Some(mib) = a.meta_log.filter(|&m| m > MAX_LOG_MIB) {
            bail!("--meta-log must be at most {MAX_LOG_MIB} MiB, not {mib}");
        }
        Ok(Self {
            data: a.data,
            meta: a.meta,
            size: a.size,
            block_size: a.block_size,
            force: a.force,
            key: super::load_key(a.key_file.as_ref())?,
            log_size: a.meta_log.map(|m| m << 20),
        })
    }
}

pub fn run(args: FormatArgs) -> anyhow::Result<ExitCode> {
    let cfg = FormatConfig::try_from(args)?;
    // Before IMG is touched, so a refusal creates nothing.
    refuse_to_overwrite(&cfg)?;
    let data = open_data(&cfg)?;
    let data_size = data.size();
    check_size(data_size, cfg.block_size)
        .with_context(|| format!("cannot format {}", cfg.data.display()))?;
    let blocks = data_size / u64::from(cfg.block_size);
    // Four times the table it serves, within 1..=32 MiB: room for seconds
    // of commit rounds between checkpoints on any disk, and for the block
    // versions a checkpoint carries (format version 3) when a guest
    // rewrites blocks between FLUSHes. 2 GiB of 4k random writes without
    // FLUSH: 8 MiB syncs the image at most checkpoints, 32 MiB at none.
    let log_size = cfg.log_size.unwrap_or_else(|| {
        (blocks * 64)
            .next_multiple_of(1 << 20)
            .clamp(1 << 20, 32 << 20)
    });
    let meta_dev = create_meta(&cfg.meta, meta_len(blocks) + log_size)?;
    let mut f = Formatter::create(
        Arc::new(meta_dev),
        cfg.block_size,
        data_size,
        cfg.key.as_ref(),
        log_size,
    )
    .with_context(|| format!("cannot write metadata {}", cfg.meta.display()))?;
    let progress = progress_bar(data_size, "formatting");
    scan_data(&data, f.block_size(), |offset, chunk| {
        f.add(offset, chunk)?;
        progress.set_position(offset + chunk.len() as u64);
        Ok(())
    })
    .with_context(|| format!("formatting {}", cfg.data.display()))?;
    progress.finish_and_clear();
    // On an error, the unfinished format wiped its superblock.
    let done = f
        .finish()
        .with_context(|| format!("cannot finish {}", cfg.meta.display()))?;
    let sb = &done.superblock;
    writeln!(
        std::io::stdout(),
        "formatted {} for {}: {} blocks of {} bytes, {} hashed, the rest read as zeros{}",
        cfg.meta.display(),
        cfg.data.display(),
        sb.blocks,
        sb.block_size,
        done.hashed,
        if cfg.key.is_some() {
            "; keyed checksums (blake3-keyed)"
        } else {
            ""
        }
    )?;
    Ok(ExitCode::SUCCESS)
}

/// Open IMG, or create it sparse when it does not exist and --size was
/// given. Either way under an exclusive lock, so no `serve` or `check`
/// runs on it meanwhile; `FileDevice` takes that lock only on a writable
/// open, so IMG is opened for writing although format only reads it.
fn open_data(cfg: &FormatConfig) -> anyhow::Result<FileDevice> {
    let path = &cfg.data;
    if !path.exists() {
        let Some(size) = cfg.size else {
            bail!(
                "{} does not exist; give --size to create it",
                path.display()
            );
        };
        let dev = FileDevice::create(path, size, false, true)
            .with_context(|| format!("cannot create image {}", path.display()))?;
        log::info!("created sparse image {} of {size} bytes", path.display());
        return Ok(dev);
    }
    let flags = OpenFlags {
        writable: true,
        lock: true,
    };
    let dev = FileDevice::open(path, flags)
        .with_context(|| format!("cannot open image {}", path.display()))?;
    if let Some(size) = cfg.size {
        if size != dev.size() {
            bail!(
                "{} is {} bytes, not the {size} that --size asks for",
                path.display(),
                dev.size()
            );
        }
    }
    Ok(dev)
}

/// Refuse an existing META that holds metadata or anything else, unless
/// --force: formatting throws the old checksums away.
fn refuse_to_overwrite(cfg: &FormatConfig) -> anyhow::Result<()> {
    // Not even with --force: that would truncate the image itself.
    if same_file(&cfg.data, &cfg.meta) {
        bail!(
            "{} and {} are the same file; the metadata needs its own",
            cfg.data.display(),
            cfg.meta.display()
        );
    }
    if cfg.force || !cfg.meta.exists() {
        return Ok(());
    }
    let dev = FileDevice::open(&cfg.meta, Default::default())
        .with_context(|| format!("cannot open metadata {}", cfg.meta.display()))?;
    let mut sector = vec![0u8; SUPERBLOCK_SIZE.min(dev.size() as usize)];
    dev.read_at(&mut sector, 0)
        .with_context(|| format!("cannot read {}", cfg.meta.display()))?;
    // Keyed metadata too, whose MAC we cannot check without its key.
    if let Ok(sb) = Superblock::decode_unverified(&sector) {
        bail!(
            "{} already holds twinsum metadata (for {} bytes of data); use --force to overwrite it",
            cfg.meta.display(),
            sb.data_size
        );
    }
    // A regular file counts as in use if it has any bytes; a block device
    // always has a size, so look at its first sector instead.
    let in_use = if dev.is_block_device() {
        !hash::is_zero(&sector)
    } else {
        dev.size() > 0
    };
    if in_use {
        bail!(
            "{} is not empty; use --force to overwrite it",
            cfg.meta.display()
        );
    }
    Ok(())
}

/// Whether both paths exist and name the same file or device.
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let (Ok(a), Ok(b)) = (std::fs::metadata(a), std::fs::metadata(b)) else {
        return false;
    };
    let block = |m: &std::fs::Metadata| m.file_type().is_block_device();
    // Two device nodes can name one disk: compare the device number.
    (a.dev(), a.ino()) == (b.dev(), b.ino()) || (block(&a) && block(&b) && a.rdev() == b.rdev())
}

/// Create (or truncate) META at `len` bytes, exclusively locked.
fn create_meta(path: &Path, len: u64) -> anyhow::Result<FileDevice> {
    if path.exists() {
        // A block device keeps its size: make sure the table fits before
        // FileDevice::create takes the requested size on trust.
        let existing = FileDevice::open(path, Default::default())
            .with_context(|| format!("cannot open metadata {}", path.display()))?;
        if existing.is_block_device() && existing.size() < len {
            bail!(
                "{} holds {} bytes, the metadata needs {len}",
                path.display(),
                existing.size()
            );
        }
    }
    FileDevice::create(path, len, path.exists(), true)
        .with_context(|| format!("cannot create metadata {}", path.display()))
}

/// A size must be a positive whole number of blocks.
fn check_size(size: u64, block_size: u32) -> anyhow::Result<()> {
    if size == 0 {
        bail!("the image size must not be zero");
    }
    if !size.is_multiple_of(u64::from(block_size)) {
        bail!("{size} bytes is not a whole number of {block_size}-byte blocks");
    }
    Ok(())
}

/// Parse a whole number of bytes with an optional binary suffix: `4096`,
/// `512K`, `10G`, `1T`, `2GiB` (case-insensitive; `B`, `iB` optional).
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, suffix) = t.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 4096, 512K, 10G, 1T)"))?;
    let unit = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 1u64,
        "k" | "kib" | "kb" => 1 << 10,
        "m" | "mib" | "mb" => 1 << 20,
        "g" | "gib" | "gb" => 1 << 30,
        "t" | "tib" | "tb" => 1 << 40,
        "p" | "pib" | "pb" => 1 << 50,
        other => return Err(format!("unknown size suffix {other:?} in {s:?}")),
    };
    n.checked_mul(unit)
        .ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_take_binary_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("10g"), Ok(10 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert!(parse_size("").is_err());
        assert!(parse_size("1.5G").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("20000000P").is_err());
    }
}
