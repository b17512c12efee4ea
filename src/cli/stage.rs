//! What `check` and `info` say about the write-back stage of a disk.

use std::io;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Serialize;
use twinsum::io::FileRegion;
use twinsum::meta::Superblock;
use twinsum::stage::{default_path, Stage};

/// `--stage`, shared by the commands that look at a stage.
#[derive(Debug, clap::Args)]
pub struct StageArg {
    /// The write-back stage `serve` uses for this disk [default: the one
    /// `serve` picks: twinsum-<META name>-<hash>.stage in $XDG_RUNTIME_DIR,
    /// else /dev/shm].
    #[arg(long, value_name = "PATH")]
    pub stage: Option<PathBuf>,
}

impl StageArg {
    pub fn path(&self, meta: &Path) -> anyhow::Result<PathBuf> {
        match &self.stage {
            Some(p) => Ok(p.clone()),
            None => default_path(meta).context("cannot find the write-back stage path"),
        }
    }
}

/// A stage that holds something.
#[derive(Debug, Serialize)]
pub struct StageReport {
    pub path: PathBuf,
    /// Completed writes waiting to be replayed, and their bytes.
    pub writes: u64,
    pub bytes: u64,
    /// A running `serve` holds it (the writes are live, not left over).
    pub in_use: bool,
}

/// Look at the stage at `path`: `None` if there is none or it is empty.
pub fn inspect(path: &Path, sb: &Superblock) -> anyhow::Result<Option<StageReport>> {
    let region = match FileRegion::open_readonly(path) {
        Ok(r) => r,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(e)
                .with_context(|| format!("cannot read the write-back stage {}", path.display()))
        }
    };
    let Some(i) = Stage::inspect(&region)
        .with_context(|| format!("bad write-back stage {}", path.display()))?
    else {
        return Ok(None);
    };
    if i.records == 0 {
        return Ok(None);
    }
    if i.salt != sb.salt || i.blocks != sb.blocks {
        anyhow::bail!(
            "the write-back stage {} holds {} writes of other metadata (salt {:#018x}, not {:#018x}); `serve` refuses it",
            path.display(),
            i.records,
            i.salt,
            sb.salt
        );
    }
    Ok(Some(StageReport {
        path: path.to_owned(),
        writes: i.records,
        bytes: i.bytes,
        in_use: region.is_locked(),
    }))
}
