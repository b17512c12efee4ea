//! The control socket of a running `twinsum serve`: status, the online
//! scrub, and the signals as commands that answer.
//!
//! - [`protocol`]: the wire format — one JSON object per line each way —
//!   and the typed replies both ends share.
//! - [`server`]: the listening thread, one thread per client, bounded
//!   lines, the scrub slot.
//! - [`client`]: what `twinsum status`, `scrub`, `sync-mode`,
//!   `power-cut` and `mark` use.
//!
//! This module knows the protocol, the engine's public face (stats, scrub
//! reads) and [`Served`](crate::blk::served::Served), the disk being served, through which it runs
//! what the signals run. The virtio layer knows only its entry point,
//! [`Server::start`].
//!
//! Adding a command: a variant of [`protocol::Request`] (its name on the
//! wire is the variant's, in kebab case), its arm in the server's
//! dispatch (`Shared::run`), a row in the protocol table of README.md, and
//! a subcommand in `src/cli` that sends it with [`Client::call`].

pub mod client;
pub mod protocol;
pub mod server;

pub use client::{Client, ClientError};
pub use protocol::{Mark, PowerCut, Status};
pub use server::Server;

/// Why a command was refused or failed; its chain is the `error` of the
/// reply.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("{0}")]
    Refused(String),
    #[error("nothing is served any more (a power cut failed); twinsum is stopping")]
    NotServing,
    #[error(transparent)]
    SyncMode(#[from] crate::blk::served::SyncModeError),
    #[error(transparent)]
    Mark(#[from] crate::blk::served::MarkError),
}
