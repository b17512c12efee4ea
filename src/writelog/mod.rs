//! `serve --log-writes`: a record of everything that reached the data and
//! metadata devices, and of what the guest was told, in one total order;
//! and the crash states a power cut could leave at any instant of it.
//!
//! - [`format`]: the file's byte layout and the walk that reads it.
//! - [`WriteLog`] (`writer.rs`): appends records; [`Recorded`] wraps a
//!   [`Device`](crate::io::Device) so that each write, zeroing and sync
//!   that returned is recorded.
//! - [`states`]: the crash-state generator behind `twinsum crash-states`.
//!
//! Two streams share the log. The *device* records say what each device
//! was asked to hold and when a sync returned (and which writes it
//! covered); a crash state is built from them alone, per device, with the
//! volatile-cache rule of the crash model: every write a completed sync
//! covered is kept, every later one is kept, dropped or torn. The *guest*
//! records (write, zero, flush completed; marks) give the instants worth
//! cutting at and what the guest was promised, which the generator checks
//! each state against.

pub mod format;
pub mod states;
mod writer;

#[cfg(test)]
mod tests;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use format::{Dev, Entry, Header, LogFile, Record};
pub use writer::{Recorded, WriteLog};

use crate::io::Device;

/// Why a log cannot be written or read. The cause is a `#[source]`.
#[derive(Debug, thiserror::Error)]
pub enum WriteLogError {
    #[error("not a twinsum write log")]
    NotALog,
    #[error("write log version {0} is not supported")]
    Version(u32),
    #[error("the write log header is damaged")]
    BadHeader,
    #[error(
        "the write log was started on another disk: its {what} is {log}, this disk's is {disk}"
    )]
    OtherDisk {
        what: &'static str,
        log: u64,
        disk: u64,
    },
    #[error("cannot read the superblock of the metadata")]
    Superblock(#[source] crate::meta::MetaError),
    #[error("a mark name must be 1 to 255 bytes of UTF-8, not {0} bytes")]
    MarkName(usize),
    #[error("the write log stopped recording after an earlier error")]
    Broken,
    #[error("{what} write log {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: Arc<io::Error>,
    },
}

impl WriteLogError {
    fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Self + 'a {
        move |e| WriteLogError::Io {
            what,
            path: path.to_owned(),
            source: Arc::new(e),
        }
    }
}

/// xxh3 over every region of `dev` that may hold data, with its offset:
/// the identity of a metadata file. Holes cost nothing, so a sparse table
/// of a huge disk is quick.
pub fn digest(dev: &dyn Device) -> io::Result<u64> {
    const UNIT: u64 = 4096;
    let size = dev.size();
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0;
    while let Some((start, end)) = dev.next_data(at)? {
        // Whole 4 KiB units at absolute offsets, so that a copy whose holes
        // lie elsewhere (cp --sparse=always) hashes the same.
        let mut pos = (start / UNIT * UNIT).max(at);
        let end = end.div_ceil(UNIT).saturating_mul(UNIT).min(size);
        while pos < end {
            let n = (end - pos).min(buf.len() as u64) as usize;
            dev.read_at(&mut buf[..n], pos)?;
            // Zeros hash like a hole.
            for (i, chunk) in buf[..n].chunks(UNIT as usize).enumerate() {
                if chunk.iter().any(|&b| b != 0) {
                    h.update(&(pos + i as u64 * UNIT).to_le_bytes());
                    h.update(chunk);
                }
            }
            pos += n as u64;
        }
        at = end.max(at + 1);
        if at >= size {
            break;
        }
    }
    h.update(&size.to_le_bytes());
    Ok(h.digest())
}
