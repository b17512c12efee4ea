//! Building blocks of the vhost-user-blk load bench (benches/vhost.rs).

pub mod image;
pub mod load;
pub mod scratch;
pub mod server;
