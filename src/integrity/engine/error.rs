//! Why a request failed.

use std::io;
use std::sync::Arc;

use crate::meta::MetaError;
use crate::stage::StageError;

/// Why a request failed. Cloneable, so one failure (a sync shared by a
/// whole batch) reaches every request it failed, each with its kind and
/// cause intact. Messages say what failed; causes are `source`s.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    #[error("checksum mismatch in block {block}")]
    Mismatch { block: u64 },
    #[error("blocks {block}+{count} are past the end of the disk ({blocks} blocks)")]
    OutOfRange { block: u64, count: u64, blocks: u64 },
    #[error("buffer of {len} bytes is not a whole number of {block_size}-byte blocks")]
    Unaligned { len: usize, block_size: u32 },
    #[error("the disk is read-only")]
    ReadOnly,
    #[error("data device I/O failed while {what}")]
    Io {
        what: &'static str,
        #[source]
        source: Arc<io::Error>,
    },
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error(transparent)]
    Stage(Arc<StageError>),
    #[error("{0} completed writes wait in the write-back stage; they can only be replayed read-write (serve without --readonly once)")]
    StageNeedsReplay(usize),
    #[error("the engine is stopping")]
    Stopping,
}

impl EngineError {
    pub(super) fn io(what: &'static str) -> impl FnOnce(io::Error) -> Self {
        move |source| Self::Io {
            what,
            source: Arc::new(source),
        }
    }

    pub(super) fn meta_io(what: &'static str) -> impl FnOnce(io::Error) -> Self {
        move |source| {
            Self::Meta(MetaError::Io {
                what,
                source: Arc::new(source),
            })
        }
    }
}

impl From<StageError> for EngineError {
    fn from(e: StageError) -> Self {
        Self::Stage(Arc::new(e))
    }
}
