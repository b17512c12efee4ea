//! virtio-blk over vhost-user: request parsing and the backend.
//!
//! - [`request`]: parse and validate one descriptor chain (no I/O).
//! - [`execute`]: run a drained ring as one engine batch, with owned buffers.
//! - [`config`]: feature bits and the config space.
//! - [`backend`]: the vhost-user backend of one front-end connection.
//! - [`server`]: socket, connection loop, signals, periodic write-back.

pub mod backend;
pub mod config;
pub mod execute;
mod ratelimit;
pub mod request;
pub mod server;
#[cfg(test)]
mod testutil;

pub use server::{serve, ServeConfig, ServeError};
