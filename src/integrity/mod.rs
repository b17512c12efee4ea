//! The dual-checksum state machine (DESIGN §2). Pure: it sees two
//! [`Device`](crate::io::Device)s and knows nothing of virtio.

mod engine;
pub mod format;
mod gate;
pub mod hash;
pub mod scrub;
pub mod verify;

pub use engine::{
    Engine, EngineError, EngineOptions, OnMismatch, Op, Replayed, StageConfig, Stats,
    DEFAULT_STAGE_BYTES, RECENT_MISMATCHES,
};
