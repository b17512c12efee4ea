//! twinsum: a vhost-user-blk backend that keeps two checksums per block.
//!
//! Layering (see ARCHITECTURE.md): `io` knows devices; `meta` knows the
//! on-disk format and nothing of the state machine; `integrity` is the
//! state machine and knows nothing of virtio; `key` knows key files; `blk`
//! is virtio-blk and vhost-user and knows nothing of the on-disk format;
//! `control` is the control socket of a running server.

pub mod blk;
pub mod control;
pub mod error;
pub mod integrity;
pub mod intmap;
pub mod io;
pub mod key;
mod le;
pub mod meta;
pub mod stage;
pub mod writelog;
