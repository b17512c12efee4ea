//! What the served disk is made of. The server holds one [`Medium`]: it
//! opens every engine the server runs, and it says whether the disk can
//! lose its power. Nothing else in the serving path knows which one it is.
//!
//! - [`Files`]: the image and metadata files, with the write-back stage in
//!   a file that outlives the process. They never lose power.
//! - [`Volatile`] (`serve --volatile-cache`): the same files behind
//!   simulated volatile write caches ([`crate::io::volatile`]). A power cut
//!   keeps or loses each un-synced write at random, and the next engine
//!   opens on what survived, as a freshly started twinsum would.

mod files;
mod volatile;

use std::io;
use std::sync::Arc;

pub(super) use self::files::Files;
pub(super) use self::volatile::Volatile;
use super::execute::Disk;
use super::server::{ServeConfig, ServeError};
use crate::integrity::{Engine, EngineOptions};
use crate::io::volatile::CutSummary;
use crate::io::{FileDevice, OpenFlags};
use crate::meta::DeviceRef;

/// Where the engines of the served disk come from (see the module
/// documentation). The defaults are a medium that never loses power.
pub(super) trait Medium: Send {
    /// Open an engine on what the devices hold now: at start, and after
    /// each power cut.
    fn open(&mut self, opts: &EngineOptions) -> Result<Engine, ServeError>;

    /// Power cuts so far; `None`: this medium has no power to cut.
    fn power_cuts(&self) -> Option<u64> {
        None
    }

    /// Cut the power under `disk`, which serves this medium's last engine:
    /// `disk` is halted at the instant of the cut (it fails every request
    /// from then on), whatever its engine did not make durable is kept or
    /// lost as the medium decides, and the next [`open`](Self::open) finds
    /// what survived. Only asked of a medium with
    /// [`power_cuts`](Self::power_cuts).
    fn power_cut(&mut self, disk: &Disk) -> Result<CutSummary, ServeError> {
        let _ = disk;
        Err(ServeError::PowerCut(io::Error::new(
            io::ErrorKind::Unsupported,
            "this disk has no power to cut",
        )))
    }

    /// The orderly stop of `disk` is done; `emptied`: nothing is left in
    /// its engine's write-back stage.
    fn stopped(&self, disk: &Disk, emptied: bool) {
        let _ = (disk, emptied);
    }
}

/// The medium `cfg` asks for.
pub(super) fn open(cfg: &ServeConfig) -> Result<Box<dyn Medium>, ServeError> {
    let flags = OpenFlags {
        writable: !cfg.readonly,
        lock: true,
    };
    let data: DeviceRef = Arc::new(FileDevice::open(&cfg.data, flags).map_err(ServeError::Open)?);
    let meta: DeviceRef = Arc::new(FileDevice::open(&cfg.meta, flags).map_err(ServeError::Open)?);
    Ok(match &cfg.volatile_cache {
        None => Box::new(Files::new(data, meta, cfg)),
        Some(v) => Box::new(Volatile::new(data, meta, v)?),
    })
}
