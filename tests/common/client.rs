//! A libblkio virtio-blk-vhost-user client, the front-end of the socket
//! tests, and the content they write. Needs `common::run`.

use std::mem::MaybeUninit;
use std::path::Path;

use blkio::{Blkio, Blkioq, MemoryRegion, ReqFlags};

use super::run::s;

/// A libblkio virtio-blk-vhost-user client with one buffer per queue.
pub struct Client {
    // Field order is drop order: queues before the driver.
    queues: Vec<Blkioq>,
    region: MemoryRegion,
    per_queue: usize,
    blkio: Blkio,
}

/// Bytes of buffer each queue gets.
pub const QUEUE_BUF: usize = 1 << 20;

impl Client {
    pub fn try_connect(socket: &Path, queues: usize, readonly: bool) -> Result<Self, blkio::Error> {
        let mut blkio = Blkio::new("virtio-blk-vhost-user")?;
        blkio.set_str("path", s(socket))?;
        blkio.set_bool("read-only", readonly)?;
        blkio.connect()?;
        blkio.set_i32("num-queues", queues as i32)?;
        let started = blkio.start()?;
        let region = blkio.alloc_mem_region(QUEUE_BUF * queues)?;
        blkio.map_mem_region(&region)?;
        Ok(Self {
            queues: started.queues,
            region,
            per_queue: QUEUE_BUF,
            blkio,
        })
    }

    pub fn connect(socket: &Path, queues: usize) -> Self {
        match Self::try_connect(socket, queues, false) {
            Ok(c) => c,
            Err(e) => panic!("cannot connect to {}: {e}", socket.display()),
        }
    }

    // Not every binary that declares this module asks.
    #[allow(dead_code)]
    pub fn capacity(&self) -> u64 {
        self.blkio.get_u64("capacity").expect("capacity")
    }

    /// Every queue with its own slice of the buffer, for use on threads.
    pub fn queues(&mut self) -> Vec<Queue<'_>> {
        // SAFETY: the region was allocated by blkio with `len` bytes, stays
        // mapped until `self.blkio` is dropped, and is borrowed mutably
        // through `self` for as long as the slices live.
        let all =
            unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, self.region.len) };
        self.queues
            .iter_mut()
            .zip(all.chunks_mut(self.per_queue))
            .map(|(q, buf)| Queue { q, buf })
            .collect()
    }

    /// The first queue.
    pub fn q0(&mut self) -> Queue<'_> {
        self.queues().swap_remove(0)
    }
}

/// One virtqueue and its buffer.
pub struct Queue<'a> {
    // common::load submits through these directly, several requests at
    // once, and a binary may add the requests only it issues.
    pub(crate) q: &'a mut Blkioq,
    pub(crate) buf: &'a mut [u8],
}

/// A failed request: the negative errno libblkio reports.
pub type Errno = i32;

impl Queue<'_> {
    /// Wait for the one request in flight.
    pub(crate) fn complete(&mut self) -> Result<(), Errno> {
        let mut c = [const { MaybeUninit::uninit() }];
        let n = self.q.do_io(&mut c, 1, None, None).expect("do_io");
        assert_eq!(n, 1, "one completion");
        // SAFETY: do_io initialised the first `n` (= 1) completions.
        let c = unsafe { c[0].assume_init_read() };
        if c.ret == 0 {
            Ok(())
        } else {
            Err(c.ret)
        }
    }

    pub fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, Errno> {
        self.buf[..len].fill(0xee);
        self.q
            .read(offset, self.buf.as_mut_ptr(), len, 0, ReqFlags::empty());
        self.complete()?;
        Ok(self.buf[..len].to_vec())
    }
}

// kill9 submits its writes and flushes through common::load instead.
#[allow(dead_code)]
impl Queue<'_> {
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), Errno> {
        self.buf[..data.len()].copy_from_slice(data);
        self.q
            .write(offset, self.buf.as_ptr(), data.len(), 0, ReqFlags::empty());
        self.complete()
    }

    pub fn flush(&mut self) -> Result<(), Errno> {
        self.q.flush(0, ReqFlags::empty());
        self.complete()
    }
}
