//! The control socket of a running `twinsum serve`: status, the online
//! scrub, and the signals as commands that answer.
//!
//! - [`protocol`]: the wire format — one JSON object per line each way —
//!   and the typed replies both ends share.
//! - [`server`]: the listening thread, one thread per client, bounded
//!   lines, the scrub slot.
//! - [`client`]: what `twinsum status` and `twinsum scrub` use.
//!
//! This module knows the protocol and the engine's public face
//! ([`Engine`]: stats, scrub reads); it does not know virtio or the serve
//! loop. The server reaches the daemon through [`Daemon`], which
//! `blk::server` implements with the same code its signals run.

pub mod client;
pub mod protocol;
pub mod server;

use std::sync::Arc;

use crate::integrity::Engine;

pub use client::{Client, ClientError};
pub use protocol::{PowerCut, Status};
pub use server::Server;

/// What the control server needs from the running daemon.
pub trait Daemon: Send + Sync + 'static {
    /// The engine serving now; `None` when nothing is served any more (a
    /// power cut or the reopen after it failed, and twinsum is stopping).
    fn engine(&self) -> Option<Arc<Engine>>;
    /// What the engine does not know: the front-end and the configuration.
    fn info(&self) -> DaemonInfo;
    /// What SIGUSR1 does. `Ok(false)`: a read-only disk, whose metadata is
    /// never written, so there is nothing to make current.
    fn enter_sync_mode(&self) -> Result<bool, CommandError>;
    /// What SIGUSR2 does under `--volatile-cache`.
    fn power_cut(&self) -> Result<PowerCut, CommandError>;
}

/// The daemon's side of a status report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DaemonInfo {
    pub frontend_connected: bool,
    pub queues: u16,
    pub readonly: bool,
    /// Power cuts so far; `None` without `--volatile-cache`.
    pub power_cuts: Option<u64>,
}

/// Why a command was refused or failed; its chain is the `error` of the
/// reply.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("{0}")]
    Refused(String),
    #[error("nothing is served any more (a power cut failed); twinsum is stopping")]
    NotServing,
    #[error("{what}")]
    Engine {
        what: &'static str,
        #[source]
        source: crate::integrity::EngineError,
    },
}
