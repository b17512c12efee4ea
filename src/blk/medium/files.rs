//! The real files: the image, the metadata, and the write-back stage in a
//! file that outlives the process (tmpfs). A restarted twinsum replays what
//! the dead one left in the stage before it serves; an orderly stop that
//! emptied the stage removes the file.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::Medium;
use crate::blk::execute::Disk;
use crate::blk::server::{ServeConfig, ServeError};
use crate::integrity::{Engine, EngineError, EngineOptions, StageConfig};
use crate::io::{FileRegion, MappedFile, Region};
use crate::meta::DeviceRef;
use crate::stage::{self, Stage};

/// The image and metadata files, and where their stage lives.
pub(in crate::blk) struct Files {
    data: DeviceRef,
    meta: DeviceRef,
    /// A read-only disk never writes a stage; it refuses to start over one
    /// that holds writes.
    readonly: bool,
    stage: PathBuf,
    /// The size a stage is created with.
    stage_bytes: u64,
}

impl Files {
    pub(super) fn new(data: DeviceRef, meta: DeviceRef, cfg: &ServeConfig) -> Self {
        Self {
            data,
            meta,
            readonly: cfg.readonly,
            stage: cfg.stage.clone(),
            stage_bytes: cfg.stage_bytes,
        }
    }

    /// Open with the stage file: replay what a dead twinsum left in it,
    /// then serve with a fresh stage of the configured size.
    fn open_staged(&self, opts: &EngineOptions) -> Result<Engine, ServeError> {
        let path = &self.stage;
        let (data, meta) = (self.data.clone(), self.meta.clone());
        let stage_err = |source| ServeError::Stage {
            path: path.to_owned(),
            source,
        };
        // Only a stage failure is said to be the stage's: bad metadata is
        // reported as such.
        let engine_err = |source| match source {
            EngineError::Stage(_) | EngineError::StageNeedsReplay(_) => ServeError::StageEngine {
                path: path.to_owned(),
                source,
            },
            other => ServeError::Engine(other),
        };
        let boot = stage::boot_id().map_err(stage_err)?;
        let len = stage::RING_START + self.stage_bytes;
        let existing = match fs::metadata(path) {
            Ok(m) => m.len() > 0,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(stage_err(e)),
        };
        if existing {
            let region = Arc::new(MappedFile::open(path, None).map_err(stage_err)?);
            if region.len() != len {
                // Replay on the old stage, write everything out, then start
                // over at the new size.
                let engine = Engine::open_with_stage(
                    data.clone(),
                    meta.clone(),
                    StageConfig {
                        region: region.clone(),
                        boot,
                    },
                    opts.clone(),
                )
                .map_err(engine_err)?;
                if !engine.make_clean().map_err(engine_err)? {
                    return Err(engine_err(EngineError::Stopping));
                }
                drop(engine);
                drop(region);
            } else {
                return Engine::open_with_stage(
                    data,
                    meta,
                    StageConfig { region, boot },
                    opts.clone(),
                )
                .map_err(engine_err);
            }
        }
        let region = Arc::new(MappedFile::open(path, Some(len)).map_err(stage_err)?);
        let opened =
            Engine::open_with_stage(data, meta, StageConfig { region, boot }, opts.clone());
        if opened.is_err() {
            // This start made the file and nothing was staged in it: do not
            // leave tmpfs memory behind for a disk that cannot be served.
            if let Err(e) = fs::remove_file(path) {
                log::warn!("cannot remove the unused stage {}: {e}", path.display());
            }
        }
        opened.map_err(engine_err)
    }
}

impl Medium for Files {
    fn open(&mut self, opts: &EngineOptions) -> Result<Engine, ServeError> {
        if self.readonly {
            refuse_waiting_stage(&self.stage)?;
            Engine::open(self.data.clone(), self.meta.clone(), opts.clone())
                .map_err(ServeError::Engine)
        } else {
            self.open_staged(opts)
        }
    }

    /// Remove the stage file once an orderly stop emptied it.
    fn stopped(&self, disk: &Disk, emptied: bool) {
        if self.readonly {
            return;
        }
        let path = &self.stage;
        if emptied {
            if let Err(e) = fs::remove_file(path) {
                log::warn!(
                    "cannot remove the empty write-back stage {}: {e}",
                    path.display()
                );
            }
        } else {
            log::warn!(
                "the write-back stage {} still holds {} completed writes; the next start replays them",
                path.display(),
                disk.engine().stats().queued
            );
        }
    }
}

/// A read-only server cannot replay a stage: refuse to hide the writes it
/// holds.
fn refuse_waiting_stage(path: &Path) -> Result<(), ServeError> {
    let region = match FileRegion::open_readonly(path) {
        Ok(r) => r,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ServeError::Stage {
                path: path.to_owned(),
                source,
            })
        }
    };
    match Stage::inspect(&region) {
        Ok(Some(i)) if i.records > 0 => Err(ServeError::StageEngine {
            path: path.to_owned(),
            source: EngineError::StageNeedsReplay(i.records as usize),
        }),
        Ok(_) => Ok(()),
        Err(e) => Err(ServeError::StageEngine {
            path: path.to_owned(),
            source: e.into(),
        }),
    }
}
