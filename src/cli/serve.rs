//! `twinsum serve`: arguments → validated [`ServeConfig`] → serve.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use twinsum::blk::backend::MAX_QUEUES;
use twinsum::blk::request::ID_LEN;
use twinsum::blk::server::VolatileCacheConfig;
use twinsum::blk::{serve, ServeConfig};
use twinsum::integrity::OnMismatch;

/// Arguments of `twinsum serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Unix socket to listen on (created with mode 0600; a stale one is replaced).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// The data image (file or block device).
    #[arg(long, value_name = "IMG")]
    data: PathBuf,
    /// The metadata file or device written by `twinsum format`.
    #[arg(long, value_name = "META")]
    meta: PathBuf,
    /// Number of virtqueues, each served by its own thread (1-64).
    #[arg(long, value_name = "N", default_value_t = 2)]
    queues: u16,
    /// Largest virtqueue size a front-end may set (a power of two, 2-32768).
    #[arg(long, value_name = "N", default_value_t = 1024)]
    queue_size: u16,
    /// Offer a read-only disk; writes fail with an I/O error.
    #[arg(long)]
    readonly: bool,
    /// Serial number the guest reads (GET_ID), at most 20 bytes
    /// [default: derived from the image file].
    #[arg(long, value_name = "ID")]
    serial: Option<String>,
    /// Seconds between write-backs of dirty metadata pages.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    writeback_interval: u64,
    /// What a read that matches neither checksum does.
    #[arg(long, value_enum, default_value_t = MismatchArg::Error)]
    on_mismatch: MismatchArg,
    /// Crash testing: simulate a disk with a volatile write cache.
    ///
    /// Every write that no flush has made durable (data and metadata alike)
    /// stays in this process's memory; a guest FLUSH really syncs the
    /// files. SIGUSR2 cuts the power: each un-synced data block (at the
    /// logical block size the guest sees, which the disk writes atomically)
    /// and each un-synced 512-byte metadata sector is kept or lost at
    /// random, the connected front-end gets an I/O error for every request
    /// from then on, and the next front-end finds the disk as it would be
    /// after the power came back. The seed of each cut is logged.
    #[arg(long, conflicts_with = "readonly")]
    volatile_cache: bool,
    /// With --volatile-cache: MiB of un-synced writes each cache (data,
    /// metadata) holds before it writes them all out, as a disk may.
    #[arg(
        long,
        value_name = "MIB",
        default_value_t = 256,
        requires = "volatile_cache"
    )]
    volatile_cache_limit: u64,
    /// With --volatile-cache: the seed of the first power cut (cut k uses
    /// N + k - 1), to replay a logged cut [default: random, logged].
    #[arg(long, value_name = "N", requires = "volatile_cache")]
    power_cut_seed: Option<u64>,
    /// The write-back stage: completed writes not yet in IMG live in this
    /// file, in memory that outlives the process but not the host (tmpfs),
    /// and a restarted twinsum replays them before it serves
    /// [default: twinsum-<META name>-<hash>.stage in $XDG_RUNTIME_DIR, else /dev/shm].
    #[arg(long, value_name = "PATH")]
    stage: Option<PathBuf>,
    /// MiB of completed writes the stage holds before writers wait for the
    /// image to catch up.
    #[arg(long, value_name = "MIB", default_value_t = twinsum::integrity::DEFAULT_STAGE_BYTES >> 20)]
    stage_size: u64,
    /// The key file of a disk formatted with --key-file (required for
    /// such a disk, refused for any other).
    #[arg(long, value_name = "FILE")]
    key_file: Option<PathBuf>,
    /// Crash testing: record every write, zeroing and flush that reaches
    /// the image and the metadata, in order, with data, and what the guest
    /// was told completed, in LOG (appended to if it exists; see
    /// `twinsum crash-states`).
    #[arg(long, value_name = "LOG", conflicts_with = "volatile_cache")]
    log_writes: Option<PathBuf>,
    /// A control socket for `twinsum status`, `scrub`, `sync-mode` and
    /// `power-cut` (mode 0600; a stale one is replaced; one JSON object per
    /// line each way).
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
}

/// Largest `--volatile-cache-limit`: 1 TiB, far past any test machine's
/// memory, and small enough that the byte count cannot overflow.
const MAX_CACHE_MIB: u64 = 1 << 20;
/// Largest `--stage-size`: the stage is memory, 64 GiB is plenty.
const MAX_STAGE_MIB: u64 = 1 << 16;

/// `--on-mismatch` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum MismatchArg {
    /// Fail the read with an I/O error.
    Error,
    /// Log and count, but return the data.
    Log,
}

impl TryFrom<ServeArgs> for ServeConfig {
    type Error = anyhow::Error;

    fn try_from(a: ServeArgs) -> anyhow::Result<Self> {
        if a.queues == 0 || a.queues > MAX_QUEUES {
            bail!(
                "--queues must be between 1 and {MAX_QUEUES}, not {}",
                a.queues
            );
        }
        if a.queue_size < 2 || !a.queue_size.is_power_of_two() {
            bail!(
                "--queue-size must be a power of two between 2 and 32768, not {}",
                a.queue_size
            );
        }
        if let Some(s) = &a.serial {
            if s.len() > ID_LEN {
                bail!("--serial is {} bytes; at most {ID_LEN} fit", s.len());
            }
        }
        if a.writeback_interval == 0 {
            bail!("--writeback-interval must be at least 1 second");
        }
        if a.volatile_cache_limit == 0 || a.volatile_cache_limit > MAX_CACHE_MIB {
            bail!(
                "--volatile-cache-limit must be between 1 and {MAX_CACHE_MIB} MiB, not {}",
                a.volatile_cache_limit
            );
        }
        if a.stage_size == 0 || a.stage_size > MAX_STAGE_MIB {
            bail!(
                "--stage-size must be between 1 and {MAX_STAGE_MIB} MiB, not {}",
                a.stage_size
            );
        }
        if a.control.as_ref() == Some(&a.socket) {
            bail!("--control must name another path than --socket");
        }
        let stage = match a.stage {
            Some(p) => p,
            None => twinsum::stage::default_path(&a.meta)
                .context("cannot choose a write-back stage path (name one with --stage)")?,
        };
        Ok(ServeConfig {
            stage,
            stage_bytes: a.stage_size << 20,
            socket: a.socket,
            data: a.data,
            meta: a.meta,
            queues: a.queues,
            queue_size: a.queue_size,
            readonly: a.readonly,
            serial: a.serial,
            writeback_interval: Duration::from_secs(a.writeback_interval),
            on_mismatch: match a.on_mismatch {
                MismatchArg::Error => OnMismatch::Error,
                MismatchArg::Log => OnMismatch::Log,
            },
            volatile_cache: a.volatile_cache.then_some(VolatileCacheConfig {
                limit_bytes: a.volatile_cache_limit << 20,
                seed: a.power_cut_seed,
            }),
            key: super::load_key(a.key_file.as_ref())?,
            log_writes: a.log_writes,
            control: a.control,
        })
    }
}

pub fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let cfg = ServeConfig::try_from(args)?;
    let socket = cfg.socket.clone();
    serve(cfg).with_context(|| format!("serve on {}", socket.display()))?;
    Ok(ExitCode::SUCCESS)
}
