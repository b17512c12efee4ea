//! Appending to a write log, and the [`Recorded`] device that does it.
//!
//! One lock orders every record: the position of a record in the file is
//! the instant it describes. Each record goes to the file with one
//! `write` while the lock is held, before the call it records returns to
//! its caller, so it is in the kernel — and survives a kill -9 — before
//! anything could depend on what it records. A host crash may still lose
//! the log's tail; the log is a test tool, and a run cut short by the host
//! is recorded again. An orderly stop syncs the log.
//!
//! If appending fails (a full disk), the log stops recording for good and
//! says so once: a log with a gap would describe states that never
//! existed, and the guest must not notice the log at all.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use xxhash_rust::xxh3::xxh3_64;

use super::format::{self, kind, Dev, Header, LogFile, HEADER_LEN};
use super::{digest, WriteLogError};
use crate::io::Device;
use crate::meta::{DeviceRef, Metadata};

/// An open write log (see the module documentation).
#[derive(Debug)]
pub struct WriteLog {
    path: PathBuf,
    state: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    file: File,
    /// Where the next record goes.
    pos: u64,
    /// The next record's number.
    seq: u64,
    /// Reused for each record: header and payload in one write.
    buf: Vec<u8>,
    /// An append failed: nothing more is recorded.
    broken: bool,
}

impl WriteLog {
    /// Open the log at `path` for the disk whose metadata is `meta`:
    /// create it (with the metadata's identity in its header) if it does
    /// not exist or is empty, else check that it belongs to this disk and
    /// append after its last good record. Either way a start record is
    /// appended. The file is locked against a second twinsum.
    pub fn open(path: &Path, meta: &DeviceRef) -> Result<Arc<Self>, WriteLogError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(WriteLogError::io("opening", path))?;
        // SAFETY: flock on a descriptor we own; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(WriteLogError::io("locking", path)(
                io::Error::last_os_error(),
            ));
        }
        // Only the geometry and identity: the engine checks the key.
        let m = Metadata::open_unverified(meta.clone(), 1).map_err(WriteLogError::Superblock)?;
        let sb = m.superblock();
        let len = file
            .metadata()
            .map_err(WriteLogError::io("reading", path))?
            .len();
        let (pos, seq) = if len == 0 {
            let header = Header {
                block_size: sb.block_size,
                hash_id: sb.hash_id,
                data_size: sb.data_size,
                meta_size: meta.size(),
                salt: sb.salt,
                generation: sb.generation,
                meta_digest: digest(&**meta)
                    .map_err(WriteLogError::io("hashing META for", path))?,
                created_ms: unix_ms(),
            };
            file.write_all_at(&header.encode(), 0)
                .map_err(WriteLogError::io("writing", path))?;
            (HEADER_LEN, 0)
        } else {
            let f = file
                .try_clone()
                .map_err(WriteLogError::io("opening", path))?;
            let old = LogFile::from_file(f, path)?;
            let h = &old.header;
            for (what, log, disk) in [
                (
                    "block size",
                    u64::from(h.block_size),
                    u64::from(sb.block_size),
                ),
                ("size", h.data_size, sb.data_size),
                ("metadata size", h.meta_size, meta.size()),
                ("salt", h.salt, sb.salt),
                (
                    "checksum algorithm",
                    u64::from(h.hash_id),
                    u64::from(sb.hash_id),
                ),
            ] {
                if log != disk {
                    return Err(WriteLogError::OtherDisk { what, log, disk });
                }
            }
            if old.torn_bytes > 0 {
                log::warn!(
                    "write log {}: dropping {} bytes after the last whole record (a twinsum \
                     killed while appending)",
                    path.display(),
                    old.torn_bytes
                );
                file.set_len(old.end)
                    .map_err(WriteLogError::io("truncating", path))?;
            }
            (old.end, old.entries.len() as u64)
        };
        let log = Arc::new(Self {
            path: path.to_owned(),
            state: Mutex::new(Inner {
                file,
                pos,
                seq,
                buf: Vec::new(),
                broken: false,
            }),
        });
        let mut start = [0u8; 16];
        start[..8].copy_from_slice(&u64::from(std::process::id()).to_le_bytes());
        start[8..].copy_from_slice(&unix_ms().to_le_bytes());
        log.append(kind::START, None, &start, &[])?;
        log::info!(
            "recording every write to {} ({})",
            path.display(),
            if seq == 0 {
                "a new log".to_owned()
            } else {
                format!("appending after {seq} records")
            }
        );
        Ok(log)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The number the next record will get: an instant in the log.
    pub fn position(&self) -> u64 {
        self.lock().seq
    }

    /// Append one record, `fixed` then `data` as its payload; its number.
    fn append(
        &self,
        kind: u8,
        dev: Option<Dev>,
        fixed: &[u8],
        data: &[u8],
    ) -> Result<u64, WriteLogError> {
        let total = fixed.len() + data.len();
        let Ok(len) = u32::try_from(total) else {
            return self.fail(io::Error::other(format!(
                "a {total}-byte record is too large"
            )));
        };
        // The payload's hash needs no lock.
        let payload_hash = if data.is_empty() {
            xxh3_64(fixed)
        } else {
            let mut h = xxhash_rust::xxh3::Xxh3::new();
            h.update(fixed);
            h.update(data);
            h.digest()
        };
        let mut g = self.lock();
        if g.broken {
            return Err(WriteLogError::Broken);
        }
        let seq = g.seq;
        let head = format::record_header(kind, dev, seq, len, payload_hash);
        let Inner { file, pos, buf, .. } = &mut *g;
        buf.clear();
        buf.extend_from_slice(&head);
        buf.extend_from_slice(fixed);
        buf.extend_from_slice(data);
        if let Err(e) = file.write_all_at(buf, *pos) {
            g.broken = true;
            drop(g);
            return self.fail(e);
        }
        g.pos += buf_len(&head, total);
        g.seq += 1;
        if g.buf.capacity() > 4 << 20 {
            g.buf = Vec::new();
        }
        Ok(seq)
    }

    fn fail(&self, e: io::Error) -> Result<u64, WriteLogError> {
        self.lock().broken = true;
        log::error!(
            "write log {}: cannot append ({e}); recording stops here, the disk goes on",
            self.path.display()
        );
        Err(WriteLogError::Broken)
    }

    /// Device records: a failed append is logged once by `append` and
    /// ends the log, and must not fail the device call.
    fn device(&self, kind: u8, dev: Dev, fixed: &[u8], data: &[u8]) {
        let _ = self.append(kind, Some(dev), fixed, data);
    }

    /// A guest write of `data` at `block` completed (`block_size` bytes
    /// per block); it was handed to the engine at log position `began`.
    /// One hash per block: the data itself is in the device records.
    pub fn guest_write(&self, block: u64, data: &[u8], block_size: usize, began: u64) {
        let mut p = Vec::with_capacity(16 + 8 * data.len() / block_size.max(1));
        p.extend_from_slice(&block.to_le_bytes());
        p.extend_from_slice(&began.to_le_bytes());
        for b in data.chunks(block_size.max(1)) {
            p.extend_from_slice(&xxh3_64(b).to_le_bytes());
        }
        let _ = self.append(kind::GUEST_WRITE, None, &p, &[]);
    }

    /// A guest discard or write-zeroes of `count` blocks at `block`,
    /// handed to the engine at `began`, completed.
    pub fn guest_zero(&self, block: u64, count: u64, began: u64) {
        let _ = self.append(kind::GUEST_ZERO, None, &words(&[block, count, began]), &[]);
    }

    /// A guest FLUSH completed; it began at log position `began`, so it
    /// covers every guest write recorded before that.
    pub fn guest_flush(&self, began: u64) {
        let _ = self.append(kind::GUEST_FLUSH, None, &began.to_le_bytes(), &[]);
    }

    /// Put a named mark into the log now; its position.
    pub fn mark(&self, name: &str) -> Result<u64, WriteLogError> {
        if name.is_empty() || name.len() > format::MAX_MARK {
            return Err(WriteLogError::MarkName(name.len()));
        }
        let seq = self.append(kind::MARK, None, name.as_bytes(), &[])?;
        log::info!("write log: mark {name:?} at entry {seq}");
        Ok(seq)
    }

    /// An orderly stop: a stop record, and the log made durable.
    pub fn stop(&self) {
        if self.append(kind::STOP, None, &[], &[]).is_ok() {
            if let Err(e) = self.lock().file.sync_data() {
                log::warn!("write log {}: cannot sync it: {e}", self.path.display());
            }
        }
    }

    /// Wrap `inner` so that whatever reaches it is recorded as `dev`.
    pub fn recording(self: &Arc<Self>, dev: Dev, inner: DeviceRef) -> DeviceRef {
        Arc::new(Recorded {
            inner,
            log: self.clone(),
            dev,
        })
    }
}

fn buf_len(head: &[u8], payload: usize) -> u64 {
    (head.len() + payload) as u64
}

fn words(w: &[u64]) -> Vec<u8> {
    w.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A [`Device`] that records in a [`WriteLog`] each write, zeroing and
/// sync once it returned. A failed call is not recorded: it promised
/// nothing. Reads pass through.
pub struct Recorded {
    inner: DeviceRef,
    log: Arc<WriteLog>,
    dev: Dev,
}

impl Device for Recorded {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_at(buf, offset)?;
        self.log
            .device(kind::WRITE, self.dev, &offset.to_le_bytes(), buf);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        // Every write recorded before this instant completed before the
        // sync began, so the sync covers it; a write recorded while the
        // sync runs may or may not be covered, and counts as not.
        let began = self.log.position();
        self.inner.sync()?;
        self.log
            .device(kind::SYNC, self.dev, &began.to_le_bytes(), &[]);
        Ok(())
    }

    fn write_durable(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_durable(buf, offset)?;
        self.log
            .device(kind::WRITE_DURABLE, self.dev, &offset.to_le_bytes(), buf);
        Ok(())
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.zero_range(offset, len)?;
        self.log
            .device(kind::ZERO, self.dev, &words(&[offset, len]), &[]);
        Ok(())
    }

    fn reserve(&self, offset: u64, len: u64) -> io::Result<()> {
        // Nothing to record: what the device reads as does not change.
        self.inner.reserve(offset, len)
    }

    fn next_data(&self, offset: u64) -> io::Result<Option<(u64, u64)>> {
        self.inner.next_data(offset)
    }
}
