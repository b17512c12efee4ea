//! Regular files and block devices through positioned syscalls.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use super::{check_range, Device};

// From <linux/fs.h>; libc does not export these ioctl numbers.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKZEROOUT: libc::c_ulong = 0x127f;

/// A file or block device opened for twinsum.
#[derive(Debug)]
pub struct FileDevice {
    file: File,
    path: PathBuf,
    size: u64,
    is_block: bool,
}

/// How to open a [`FileDevice`].
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenFlags {
    /// Open for writing.
    pub writable: bool,
    /// Take an exclusive `flock` so that a second twinsum cannot open it.
    pub lock: bool,
}

impl FileDevice {
    /// Open an existing file or block device.
    pub fn open(path: &Path, flags: OpenFlags) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(flags.writable)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| with_path(e, path, "cannot open"))?;
        Self::from_file(file, path, flags)
    }

    /// Create a regular file of `size` bytes (sparse), failing if it exists
    /// unless `truncate` is set.
    pub fn create(path: &Path, size: u64, truncate: bool, lock: bool) -> io::Result<Self> {
        let mut opts = OpenOptions::new();
        opts.read(true).write(true).custom_flags(libc::O_CLOEXEC);
        if truncate {
            opts.create(true);
        } else {
            opts.create_new(true);
        }
        let file = opts
            .open(path)
            .map_err(|e| with_path(e, path, "cannot create"))?;
        let dev = Self::from_file(
            file,
            path,
            OpenFlags {
                writable: true,
                lock,
            },
        )?;
        if !dev.is_block {
            // Drop the old contents so the new table starts as one hole.
            dev.file.set_len(0)?;
            dev.file.set_len(size)?;
        }
        Ok(Self { size, ..dev })
    }

    fn from_file(file: File, path: &Path, flags: OpenFlags) -> io::Result<Self> {
        if flags.lock {
            let op = if flags.writable {
                libc::LOCK_EX
            } else {
                libc::LOCK_SH
            };
            // SAFETY: flock on a file descriptor we own; no memory is involved.
            let rc = unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) };
            if rc != 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::WouldBlock {
                    return Err(io::Error::new(
                        io::ErrorKind::WouldBlock,
                        format!("{} is in use by another process (locked)", path.display()),
                    ));
                }
                return Err(with_path(e, path, "cannot lock"));
            }
        }
        let meta = file.metadata()?;
        let is_block = meta.file_type().is_block_device();
        let size = if is_block {
            let mut size: u64 = 0;
            // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which
            // points at a live local.
            let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size) };
            if rc != 0 {
                return Err(with_path(io::Error::last_os_error(), path, "cannot size"));
            }
            size
        } else if meta.is_file() {
            meta.len()
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is neither a regular file nor a block device",
                    path.display()
                ),
            ));
        };
        Ok(Self {
            file,
            path: path.to_owned(),
            size,
            is_block,
        })
    }

    /// The path this device was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether this is a block device rather than a regular file.
    pub fn is_block_device(&self) -> bool {
        self.is_block
    }

    /// Grow or shrink a regular file.
    pub fn set_size(&mut self, size: u64) -> io::Result<()> {
        if self.is_block {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "a block device cannot be resized",
            ));
        }
        self.file.set_len(size)?;
        self.size = size;
        Ok(())
    }

    fn seek(&self, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
        // SAFETY: lseek on a descriptor we own; it only moves the file offset,
        // which nothing else here relies on (all I/O is positioned).
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), off, whence) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                return Ok(None);
            }
            return Err(e);
        }
        Ok(Some(r as u64))
    }
}

impl FileDevice {
    /// Whether the file lives in memory (tmpfs, ramfs).
    fn in_memory(&self) -> io::Result<bool> {
        // SAFETY: statfs is plain integers, for which all zeros is valid.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: fstatfs fills the struct it is given, from a descriptor
        // we own.
        if unsafe { libc::fstatfs(self.file.as_raw_fd(), &mut st) } != 0 {
            return Err(io::Error::last_os_error());
        }
        const TMPFS_MAGIC: u32 = 0x0102_1994;
        const RAMFS_MAGIC: u32 = 0x8584_58f6;
        // f_type's width differs between targets; the magics fit in 32 bits.
        let kind = st.f_type as u32;
        Ok(kind == TMPFS_MAGIC || kind == RAMFS_MAGIC)
    }
}

impl Device for FileDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(self.size, offset, buf.len() as u64)?;
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        check_range(self.size, offset, buf.len() as u64)?;
        self.file.write_all_at(buf, offset)
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn write_durable(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        check_range(self.size, offset, buf.len() as u64)?;
        // RWF_DSYNC makes the kernel write back and flush just this range
        // (file_write_and_wait_range, then a cache flush), where fdatasync
        // would write back every dirty page of the file first.
        let mut done = 0usize;
        while done < buf.len() {
            let rest = &buf[done..];
            let iov = libc::iovec {
                iov_base: rest.as_ptr() as *mut libc::c_void,
                iov_len: rest.len(),
            };
            // SAFETY: one iovec pointing at `rest`, which stays borrowed for
            // the call; the kernel only reads from it.
            let n = unsafe {
                libc::pwritev2(
                    self.file.as_raw_fd(),
                    &iov,
                    1,
                    (offset + done as u64) as libc::off_t,
                    libc::RWF_DSYNC,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    // An old kernel: the same promise, at the price of a
                    // whole-file sync.
                    Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) | Some(libc::ENOSYS) => {
                        self.file.write_all_at(rest, offset + done as u64)?;
                        return self.file.sync_data();
                    }
                    _ => return Err(e),
                }
            }
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "pwritev2 wrote nothing",
                ));
            }
            done += n as usize;
        }
        Ok(())
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        check_range(self.size, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if self.is_block {
            let range: [u64; 2] = [offset, len];
            // SAFETY: BLKZEROOUT reads two u64 from the pointer, which points
            // at a live local array of two u64.
            let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), BLKZEROOUT, &range) };
            if rc == 0 {
                return Ok(());
            }
        } else {
            // SAFETY: fallocate on a descriptor we own with in-range values.
            let rc = unsafe {
                libc::fallocate(
                    self.file.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    offset as libc::off_t,
                    len as libc::off_t,
                )
            };
            if rc == 0 {
                return Ok(());
            }
        }
        // The filesystem or device cannot do it natively: write zeros.
        let chunk = vec![0u8; (1 << 20).min(len as usize)];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(chunk.len() as u64) as usize;
            self.file.write_all_at(&chunk[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    fn reserve(&self, offset: u64, len: u64) -> io::Result<()> {
        check_range(self.size, offset, len)?;
        if self.is_block || len == 0 || self.in_memory()? {
            // A block device has its storage already; on tmpfs a reserved
            // page is memory taken for good.
            return Ok(());
        }
        // Mode 0 allocates only the holes of the range, as unwritten
        // extents: they still read as zeros and SEEK_DATA still skips
        // them, so a fresh table keeps costing no reads.
        // SAFETY: fallocate on a descriptor we own with in-range values.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                0,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            // The file system cannot reserve: writes allocate as before.
            Some(libc::EOPNOTSUPP) => Ok(()),
            _ => Err(e),
        }
    }

    fn next_data(&self, offset: u64) -> io::Result<Option<(u64, u64)>> {
        if offset >= self.size {
            return Ok(None);
        }
        if self.is_block {
            return Ok(Some((offset, self.size)));
        }
        let start = match self.seek(offset, libc::SEEK_DATA) {
            Ok(Some(s)) if s < self.size => s,
            Ok(_) => return Ok(None),
            // No SEEK_DATA support: all of it is data.
            Err(_) => return Ok(Some((offset, self.size))),
        };
        let end = match self.seek(start, libc::SEEK_HOLE)? {
            Some(e) => e.min(self.size),
            None => self.size,
        };
        Ok(Some((start, end)))
    }
}

fn with_path(e: io::Error, path: &Path, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}
