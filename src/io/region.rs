//! Byte regions that outlive the process: where the write-back stage keeps
//! completed writes until they are in the image.
//!
//! A [`Region`] is plain memory addressed by offset. [`MappedFile`] maps a
//! file (on tmpfs: `/dev/shm` or `$XDG_RUNTIME_DIR`) shared, so every store
//! is in the kernel's page cache the moment it is made: a `kill -9`, a panic
//! or the OOM killer cannot lose it, while a host crash loses it with the
//! rest of memory — the volatile-cache contract a virtio disk advertises.
//! [`FileRegion`] reads the same file with `pread`, for tools that inspect a
//! stage another process may be using. [`MemRegion`](super::MemRegion) (in
//! `mem.rs`) is process memory, for an engine whose stage need not outlive
//! it (and for tests).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use super::check_range;

/// Memory addressed by offset, shared by threads that touch disjoint ranges.
///
/// Callers never write a range while another thread reads or writes it:
/// the write-back stage hands out disjoint records and reads a record only
/// once it is complete.
pub trait Region: Send + Sync {
    /// Size in bytes.
    fn len(&self) -> u64;

    /// Whether the region has no bytes at all.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copy `buf` to `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;

    /// Copy `buf.len()` bytes from `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Call `f` with `len` bytes at `offset`, without a copy where the
    /// region is mapped memory.
    fn with_slice(
        &self,
        offset: u64,
        len: usize,
        f: &mut dyn FnMut(&[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        let mut buf = vec![0u8; len];
        self.read_at(&mut buf, offset)?;
        f(&buf)
    }
}

/// A file mapped shared into memory, locked against a second process.
///
/// Its pages are allocated when it is sized (`fallocate`), so a full tmpfs
/// is an error at start, never a `SIGBUS` on a later store.
pub struct MappedFile {
    path: PathBuf,
    // Kept open for the lock; the mapping stays valid without it.
    _file: File,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; `MappedFile` hands out copies
// and short-lived borrows under the `Region` rule that no range is written
// while another thread uses it, so sharing it between threads is sound.
unsafe impl Send for MappedFile {}
// SAFETY: as above.
unsafe impl Sync for MappedFile {}

impl std::fmt::Debug for MappedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedFile")
            .field("path", &self.path)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl MappedFile {
    /// Open `path` (creating it with mode 0600 if missing), take an
    /// exclusive lock, make it `len` bytes if `len` is given (else keep its
    /// size), and map it.
    pub fn open(path: &Path, len: Option<u64>) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| with_path(e, path, "cannot open"))?;
        // SAFETY: flock on a descriptor we own; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!("{} is in use by another process (locked)", path.display()),
                ));
            }
            return Err(with_path(e, path, "cannot lock"));
        }
        if let Some(len) = len {
            file.set_len(0)
                .and_then(|()| file.set_len(len))
                .map_err(|e| with_path(e, path, "cannot size"))?;
            // SAFETY: fallocate on a descriptor we own with in-range values.
            let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len as libc::off_t) };
            if rc != 0 {
                let e = io::Error::last_os_error();
                // A file system without fallocate still works; a full one
                // must fail now rather than SIGBUS on a later store.
                if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
                    return Err(with_path(e, path, "cannot allocate"));
                }
            }
        }
        let size = file
            .metadata()
            .map_err(|e| with_path(e, path, "cannot stat"))?
            .len();
        let len = usize::try_from(size)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file too large to map"))?;
        let ptr = if len == 0 {
            std::ptr::NonNull::<u8>::dangling().as_ptr()
        } else {
            // SAFETY: a fresh shared mapping of a descriptor we own, of the
            // file's current size; the kernel picks the address.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    file.as_raw_fd(),
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(with_path(io::Error::last_os_error(), path, "cannot map"));
            }
            p.cast::<u8>()
        };
        Ok(Self {
            path: path.to_owned(),
            _file: file,
            ptr,
            len,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn check(&self, offset: u64, len: usize) -> io::Result<usize> {
        check_range(self.len as u64, offset, len as u64)?;
        Ok(offset as usize)
    }
}

impl Drop for MappedFile {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: unmapping exactly the mapping made in `open`; no
            // borrow of it outlives `&self` methods.
            unsafe { libc::munmap(self.ptr.cast(), self.len) };
        }
    }
}

impl Region for MappedFile {
    fn len(&self) -> u64 {
        self.len as u64
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let at = self.check(offset, buf.len())?;
        // SAFETY: the range is inside the mapping (checked), `buf` cannot
        // overlap it (it is a Rust borrow of other memory or of a disjoint
        // range), and no other thread uses this range (the Region rule).
        unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), self.ptr.add(at), buf.len()) };
        Ok(())
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let at = self.check(offset, buf.len())?;
        // SAFETY: as in `write_at`, with the copy going the other way.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(at), buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    fn with_slice(
        &self,
        offset: u64,
        len: usize,
        f: &mut dyn FnMut(&[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        let at = self.check(offset, len)?;
        // SAFETY: the range is inside the mapping (checked) and, by the
        // Region rule, nobody writes it while this borrow lives (it ends
        // when `f` returns).
        let bytes = unsafe { std::slice::from_raw_parts(self.ptr.add(at), len) };
        f(bytes)
    }
}

/// A file read and written with positioned syscalls: for inspecting a
/// stage that a running server may have mapped (no shared mapping, so no
/// torn view can alias our own memory).
#[derive(Debug)]
pub struct FileRegion {
    file: File,
    len: u64,
}

impl FileRegion {
    /// Open `path` read-only.
    pub fn open_readonly(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| with_path(e, path, "cannot open"))?;
        let len = file
            .metadata()
            .map_err(|e| with_path(e, path, "cannot stat"))?
            .len();
        Ok(Self { file, len })
    }

    /// Whether another process holds the file's lock (a live server).
    pub fn is_locked(&self) -> bool {
        // SAFETY: flock on a descriptor we own.
        let rc = unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) };
        if rc == 0 {
            // SAFETY: as above, releasing the lock just taken.
            unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_UN) };
            false
        } else {
            true
        }
    }
}

impl Region for FileRegion {
    fn len(&self) -> u64 {
        self.len
    }

    fn write_at(&self, _buf: &[u8], _offset: u64) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "the stage is open read-only",
        ))
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(self.len, offset, buf.len() as u64)?;
        self.file.read_exact_at(buf, offset)
    }
}

fn with_path(e: io::Error, path: &Path, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mapped_file_keeps_what_was_stored_after_it_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stage");
        let r = MappedFile::open(&path, Some(8192)).unwrap();
        r.write_at(b"twinsum", 4000).unwrap();
        let mut buf = [0u8; 7];
        r.read_at(&mut buf, 4000).unwrap();
        assert_eq!(&buf, b"twinsum");
        assert!(r.write_at(b"x", 8192).is_err(), "past the end");
        // A second opener is refused while the first holds the lock...
        assert!(MappedFile::open(&path, None).is_err());
        // ...and a reader can tell.
        let ro = FileRegion::open_readonly(&path).unwrap();
        assert!(ro.is_locked());
        drop(r);
        assert!(!ro.is_locked());
        let mut buf = [0u8; 7];
        ro.read_at(&mut buf, 4000).unwrap();
        assert_eq!(&buf, b"twinsum", "the stores reached the file");
        let again = MappedFile::open(&path, None).unwrap();
        assert_eq!(again.len(), 8192);
        let mut seen = Vec::new();
        again
            .with_slice(4000, 7, &mut |s| {
                seen.extend_from_slice(s);
                Ok(())
            })
            .unwrap();
        assert_eq!(seen, b"twinsum");
    }
}
