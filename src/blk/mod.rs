//! virtio-blk over vhost-user: request parsing and the backend.
//!
//! - [`chain`]: walk a descriptor chain, checking every link.
//! - [`request`]: parse and validate one descriptor chain (no I/O).
//! - [`execute`]: run a group of requests as one engine batch, with
//!   owned buffers ([`execute::Disk`], the disk as one connection sees it).
//! - `inplace`: reads verified in the guest's own buffer, with a fallback
//!   through owned buffers for a block that does not verify there.
//! - [`config`]: feature bits and the config space.
//! - [`backend`]: the vhost-user backend of one front-end connection;
//!   it drains a ring and completes it a group (about 256 KiB) at a time.
//! - `fanout`: a helper thread that runs half of a pass of large reads
//!   while a core is idle, so one queue can use two cores.
//! - [`guestmem`]: memory tables checked against their files, and a
//!   SIGBUS handler for a file that shrinks later.
//! - [`served`]: the disk being served across connections (write-back,
//!   synchronous mode, power cuts, the final stop).
//! - `medium`: what that disk is made of — the real files with their
//!   stage, or the same files behind simulated volatile caches.
//! - [`server`]: socket, connection loop, signals, periodic write-back.

pub mod backend;
pub mod chain;
pub mod config;
pub mod execute;
mod fanout;
pub mod guestmem;
mod inplace;
mod medium;
pub(crate) mod ratelimit;
pub mod request;
pub mod served;
pub mod server;
#[cfg(test)]
mod testutil;

pub use server::{serve, ServeConfig, ServeError};
