//! A hand-made vhost-user front-end, for tests that need to send what no
//! well-behaved driver would.
//!
//! The protocol side is the `vhost` crate's `Frontend`; everything a guest
//! driver would do is done here by hand: guest memory is a memfd this
//! process maps and shares with the daemon (SET_MEM_TABLE), the split rings
//! are laid out in it at fixed addresses, descriptors and ring indices are
//! written with plain stores, the daemon is kicked through an eventfd and
//! completions are read off the used ring. Nothing stops a test from
//! writing garbage anywhere.
//!
//! Waiting for completions polls the used ring (woken by the call eventfd)
//! with a deadline; nothing sleeps for synchronisation.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::run::DEADLINE;

pub const VRING_DESC_F_NEXT: u16 = 1;
pub const VRING_DESC_F_WRITE: u16 = 2;
pub const VRING_DESC_F_INDIRECT: u16 = 4;

pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
// Of the request types and statuses below, tests/hostile.rs sends and
// expects only some, tests/frontend_fuzz.rs others: each binary that
// declares this module leaves some unused.
#[allow(dead_code)]
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
#[allow(dead_code)]
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
#[allow(dead_code)]
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;

pub const VIRTIO_BLK_S_OK: u8 = 0;
#[allow(dead_code)]
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
#[allow(dead_code)]
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;

/// Guest-physical layout. Queue `q`'s rings start at `q * QUEUE_STRIDE`.
pub const QUEUE_STRIDE: u64 = 0x4000;
pub const MAX_QUEUES: usize = 4;
/// Request `k`'s 16-byte header, status byte and default data buffer.
pub const HDR_BASE: u64 = 0x1_0000;
pub const STATUS_BASE: u64 = 0x2_0000;
/// Free space for indirect tables and such (the fuzz's).
#[allow(dead_code)]
pub const SCRATCH_BASE: u64 = 0x3_0000;
pub const DATA_BASE: u64 = 0x10_0000;
pub const DATA_SLOT: u64 = 0x1_0000;
/// Largest queue the layout has room for.
pub const MAX_QUEUE_SIZE: u16 = 256;

pub fn hdr(k: u64) -> u64 {
    HDR_BASE + 16 * k
}
pub fn status(k: u64) -> u64 {
    STATUS_BASE + k
}
pub fn data(k: u64) -> u64 {
    DATA_BASE + DATA_SLOT * k
}

/// Guest memory: a memfd mapped shared here and handed to the daemon.
///
/// Accesses are volatile: the daemon reads and writes the same pages
/// concurrently from another process.
pub struct GuestMem {
    fd: OwnedFd,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory, every access is a volatile
// load or store within bounds, and it is unmapped only on drop.
unsafe impl Send for GuestMem {}
// SAFETY: as above.
unsafe impl Sync for GuestMem {}

impl GuestMem {
    /// `len` bytes of zeroed memory at guest address 0.
    pub fn new(len: usize) -> Self {
        Self::with_file_len(len, len as u64)
    }

    /// A mapping of `len` bytes over a file of only `file_len` bytes: what
    /// lies past the end of the file raises SIGBUS in whoever touches it.
    pub fn with_file_len(len: usize, file_len: u64) -> Self {
        let name = CString::new("twinsum-test-guest").expect("no NUL");
        // SAFETY: `name` is a valid C string; the result is checked.
        let raw = unsafe {
            libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        assert!(raw >= 0, "memfd_create: {}", io::Error::last_os_error());
        // SAFETY: memfd_create returned a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        truncate(&fd, file_len);
        // SAFETY: a fresh shared mapping of our own memfd; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(
            ptr,
            libc::MAP_FAILED,
            "mmap: {}",
            io::Error::last_os_error()
        );
        Self {
            fd,
            ptr: ptr.cast(),
            len,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// This process's address of guest address 0 (the `user_addr` QEMU
    /// would send).
    pub fn host_addr(&self) -> u64 {
        self.ptr as u64
    }

    /// Change the size of the file behind the memory (not the mapping).
    /// Only tests/hostile.rs shrinks guest memory.
    #[allow(dead_code)]
    pub fn truncate(&self, file_len: u64) {
        truncate(&self.fd, file_len);
    }

    /// Add memfd seals (`F_SEAL_*`).
    pub fn seal(&self, seals: i32) {
        // SAFETY: fcntl on our own descriptor; the result is checked.
        let rc = unsafe { libc::fcntl(self.fd.as_raw_fd(), libc::F_ADD_SEALS, seals) };
        assert_eq!(rc, 0, "F_ADD_SEALS: {}", io::Error::last_os_error());
    }

    fn check(&self, gpa: u64, len: usize) -> usize {
        let end = gpa.checked_add(len as u64).expect("address overflow");
        assert!(
            end <= self.len as u64,
            "{gpa:#x}+{len} is outside guest memory"
        );
        gpa as usize
    }

    pub fn write(&self, gpa: u64, bytes: &[u8]) {
        let at = self.check(gpa, bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            // SAFETY: in bounds (checked above) of a live mapping; the u64
            // store is 8-aligned (the mapping is page-aligned).
            unsafe {
                let p = self.ptr.add(at + i);
                if (at + i).is_multiple_of(8) && bytes.len() - i >= 8 {
                    let mut w = [0u8; 8];
                    w.copy_from_slice(&bytes[i..i + 8]);
                    p.cast::<u64>().write_volatile(u64::from_ne_bytes(w));
                    i += 8;
                } else {
                    p.write_volatile(bytes[i]);
                    i += 1;
                }
            }
        }
    }

    pub fn fill(&self, gpa: u64, len: usize, byte: u8) {
        self.write(gpa, &vec![byte; len]);
    }

    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let at = self.check(gpa, len);
        let mut out = Vec::with_capacity(len);
        let mut i = 0;
        while i < len {
            // SAFETY: in bounds (checked above) of a live mapping; the u64
            // load is 8-aligned.
            unsafe {
                let p = self.ptr.add(at + i);
                if (at + i).is_multiple_of(8) && len - i >= 8 {
                    out.extend_from_slice(&p.cast::<u64>().read_volatile().to_ne_bytes());
                    i += 8;
                } else {
                    out.push(p.read_volatile());
                    i += 1;
                }
            }
        }
        out
    }

    pub fn write_u16(&self, gpa: u64, v: u16) {
        self.write(gpa, &v.to_le_bytes());
    }

    pub fn read_u16(&self, gpa: u64) -> u16 {
        let b = self.read(gpa, 2);
        u16::from_le_bytes([b[0], b[1]])
    }

    pub fn read_u32(&self, gpa: u64) -> u32 {
        let b = self.read(gpa, 4);
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }

    /// A virtio-blk request header at `gpa`.
    pub fn header(&self, gpa: u64, ty: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&ty.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.write(gpa, &h);
    }

    /// One DISCARD / WRITE_ZEROES segment at `gpa` (the fuzz's).
    #[allow(dead_code)]
    pub fn zero_segment(&self, gpa: u64, sector: u64, sectors: u32, flags: u32) {
        let mut s = [0u8; 16];
        s[..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&sectors.to_le_bytes());
        s[12..].copy_from_slice(&flags.to_le_bytes());
        self.write(gpa, &s);
    }

    /// A split-ring descriptor at `gpa` (a table entry, direct or indirect).
    pub fn desc(&self, gpa: u64, d: Desc) {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&d.addr.to_le_bytes());
        b[8..12].copy_from_slice(&d.len.to_le_bytes());
        b[12..14].copy_from_slice(&d.flags.to_le_bytes());
        b[14..].copy_from_slice(&d.next.to_le_bytes());
        self.write(gpa, &b);
    }
}

impl Drop for GuestMem {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `with_file_len`, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

fn truncate(fd: &OwnedFd, len: u64) {
    // SAFETY: ftruncate on a descriptor we own; the result is checked.
    let rc = unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) };
    assert_eq!(rc, 0, "ftruncate: {}", io::Error::last_os_error());
}

/// One split-ring descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

impl Desc {
    /// Device-readable buffer.
    pub fn rd(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            flags: 0,
            next: 0,
        }
    }

    /// Device-writable buffer.
    pub fn wr(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            flags: VRING_DESC_F_WRITE,
            next: 0,
        }
    }

    /// A descriptor pointing at an indirect table of `entries` entries
    /// (the fuzz's).
    #[allow(dead_code)]
    pub fn indirect(addr: u64, entries: u32) -> Self {
        Self {
            addr,
            len: entries * 16,
            flags: VRING_DESC_F_INDIRECT,
            next: 0,
        }
    }
}

/// A used-ring element.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Used {
    pub id: u32,
    pub len: u32,
}

/// One virtqueue as the driver sees it.
pub struct Vq {
    pub index: usize,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// The driver's avail index (what it last published).
    pub avail_idx: u16,
    /// Used entries consumed so far.
    pub used_seen: u16,
    pub kick: EventFd,
    pub call: EventFd,
}

impl Vq {
    fn new(index: usize, size: u16) -> Self {
        assert!(index < MAX_QUEUES && size <= MAX_QUEUE_SIZE);
        let base = index as u64 * QUEUE_STRIDE;
        Self {
            index,
            size,
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            avail_idx: 0,
            used_seen: 0,
            kick: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
            call: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
        }
    }

    /// Store descriptor `i` of the table (any `i`: tests write out of range
    /// on purpose, which lands in the rest of the ring area).
    pub fn set_desc(&self, m: &GuestMem, i: u16, d: Desc) {
        m.desc(self.desc + 16 * u64::from(i), d);
    }

    /// Store `segs` as one chain at table indices `base..`, linked in order.
    /// Returns the head.
    pub fn set_chain(&self, m: &GuestMem, base: u16, segs: &[Desc]) -> u16 {
        for (i, d) in segs.iter().enumerate() {
            let i = base + i as u16;
            let mut d = *d;
            if (i - base) as usize + 1 < segs.len() {
                d.flags |= VRING_DESC_F_NEXT;
                d.next = i + 1;
            }
            self.set_desc(m, i, d);
        }
        base
    }

    /// Put `heads` on the avail ring and publish the new index.
    pub fn publish(&mut self, m: &GuestMem, heads: &[u16]) {
        for &h in heads {
            let slot = u64::from(self.avail_idx % self.size);
            m.write_u16(self.avail + 4 + 2 * slot, h);
            self.avail_idx = self.avail_idx.wrapping_add(1);
        }
        // The ring entries before the index, as a driver's wmb().
        fence(Ordering::SeqCst);
        m.write_u16(self.avail + 2, self.avail_idx);
        fence(Ordering::SeqCst);
    }

    /// Write any avail index, bypassing the driver's bookkeeping.
    #[allow(dead_code)] // tests/hostile.rs only
    pub fn set_avail_idx(&mut self, m: &GuestMem, idx: u16) {
        fence(Ordering::SeqCst);
        m.write_u16(self.avail + 2, idx);
        fence(Ordering::SeqCst);
    }

    pub fn kick(&self) {
        self.kick.write(1).expect("kick");
    }

    pub fn used_idx(&self, m: &GuestMem) -> u16 {
        let idx = m.read_u16(self.used + 2);
        fence(Ordering::SeqCst);
        idx
    }

    fn used_elem(&self, m: &GuestMem, n: u16) -> Used {
        let at = self.used + 4 + 8 * u64::from(n % self.size);
        Used {
            id: m.read_u32(at),
            len: m.read_u32(at + 4),
        }
    }

    /// The used entries that have appeared since the last call, waiting up
    /// to `timeout` for there to be at least `n`.
    pub fn wait_used_for(&mut self, m: &GuestMem, n: usize, timeout: Duration) -> Vec<Used> {
        let start = Instant::now();
        loop {
            let ready = self.used_idx(m).wrapping_sub(self.used_seen) as usize;
            if ready >= n || start.elapsed() >= timeout {
                let out = (0..ready as u16)
                    .map(|i| self.used_elem(m, self.used_seen.wrapping_add(i)))
                    .collect();
                self.used_seen = self.used_seen.wrapping_add(ready as u16);
                return out;
            }
            // Woken by the daemon's call; the timeout only bounds the wait
            // should a signal be suppressed (EVENT_IDX) — the ring is
            // re-read either way.
            let mut pfd = libc::pollfd {
                fd: self.call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one live pollfd, its count passed alongside.
            unsafe { libc::poll(&mut pfd, 1, 5) };
            let _ = self.call.read();
        }
    }

    /// Wait for exactly `n` more used entries (panics after the deadline).
    pub fn wait_used(&mut self, m: &GuestMem, n: usize) -> Vec<Used> {
        let got = self.wait_used_for(m, n, DEADLINE);
        assert_eq!(got.len(), n, "queue {}: completions {got:?}", self.index);
        got
    }
}

/// How to set up a connection.
#[derive(Debug, Clone)]
pub struct Options {
    pub queues: usize,
    pub queue_size: u16,
    pub event_idx: bool,
    /// Guest memory size (one region at guest address 0).
    pub mem_len: usize,
    /// Size of the memfd behind it, if not `mem_len`.
    pub file_len: Option<u64>,
    /// Seals to add to the memfd before SET_MEM_TABLE.
    pub seals: i32,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            queues: 1,
            queue_size: 64,
            event_idx: false,
            mem_len: 16 << 20,
            file_len: None,
            seals: 0,
        }
    }
}

/// A connected front-end with its guest memory and rings.
pub struct Front {
    #[allow(dead_code)] // not tests/orderly_stop.rs
    pub fe: Frontend,
    /// The same socket, for writing raw messages (the fuzz's).
    #[allow(dead_code)]
    pub sock: UnixStream,
    pub mem: GuestMem,
    pub vqs: Vec<Vq>,
}

/// One step of the set-up sequence.
type Step<'a> = &'a dyn Fn(&mut Frontend) -> Result<(), vhost::Error>;

/// How far [`Front::connect_partial`] gets through the set-up sequence.
pub const SETUP_STEPS: usize = 7;

impl Front {
    /// Connect and run the whole set-up sequence QEMU would.
    pub fn connect(socket: &Path, opts: &Options) -> Result<Self, vhost::Error> {
        Self::connect_partial(socket, opts, SETUP_STEPS)
    }

    /// Connect and run the first `steps` of the set-up sequence: owner,
    /// features, protocol features, memory table, ring sizes and
    /// addresses, ring fds, enable.
    pub fn connect_partial(
        socket: &Path,
        opts: &Options,
        steps: usize,
    ) -> Result<Self, vhost::Error> {
        let sock = UnixStream::connect(socket).map_err(vhost::Error::IOError)?;
        let mut fe = Frontend::from_stream(sock.try_clone().map_err(vhost::Error::IOError)?, 8);
        let mem = match opts.file_len {
            Some(f) => GuestMem::with_file_len(opts.mem_len, f),
            None => GuestMem::new(opts.mem_len),
        };
        if opts.seals != 0 {
            mem.seal(opts.seals);
        }
        let vqs: Vec<_> = (0..opts.queues)
            .map(|q| Vq::new(q, opts.queue_size))
            .collect();
        let front_steps: [Step; SETUP_STEPS] = [
            &|fe| fe.set_owner(),
            &|fe| {
                let offered = fe.get_features()?;
                let mut want = VIRTIO_F_VERSION_1
                    | VIRTIO_RING_F_INDIRECT_DESC
                    | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
                if opts.event_idx {
                    want |= VIRTIO_RING_F_EVENT_IDX;
                }
                fe.set_features(offered & want)
            },
            &|fe| {
                let offered = fe.get_protocol_features()?;
                let want = VhostUserProtocolFeatures::MQ
                    | VhostUserProtocolFeatures::CONFIG
                    | VhostUserProtocolFeatures::REPLY_ACK;
                fe.set_protocol_features(offered & want)?;
                // Every message asks for an ack, so a refusal shows at once.
                fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
                Ok(())
            },
            &|fe| {
                fe.set_mem_table(&[VhostUserMemoryRegionInfo {
                    guest_phys_addr: 0,
                    memory_size: mem.len() as u64,
                    userspace_addr: mem.host_addr(),
                    mmap_offset: 0,
                    mmap_handle: mem.fd(),
                }])
                .map(|_| ())
            },
            &|fe| {
                for vq in &vqs {
                    fe.set_vring_num(vq.index, vq.size)?;
                    fe.set_vring_addr(
                        vq.index,
                        &VringConfigData {
                            queue_max_size: MAX_QUEUE_SIZE,
                            queue_size: vq.size,
                            flags: 0,
                            desc_table_addr: mem.host_addr() + vq.desc,
                            used_ring_addr: mem.host_addr() + vq.used,
                            avail_ring_addr: mem.host_addr() + vq.avail,
                            log_addr: None,
                        },
                    )?;
                    fe.set_vring_base(vq.index, 0)?;
                }
                Ok(())
            },
            &|fe| {
                for vq in &vqs {
                    fe.set_vring_call(vq.index, &vq.call)?;
                    fe.set_vring_kick(vq.index, &vq.kick)?;
                }
                Ok(())
            },
            &|fe| {
                for vq in &vqs {
                    fe.set_vring_enable(vq.index, true)?;
                }
                Ok(())
            },
        ];
        for step in front_steps.iter().take(steps) {
            step(&mut fe)?;
        }
        Ok(Self { fe, sock, mem, vqs })
    }

    /// The disk size in bytes, from the config space.
    #[allow(dead_code)] // not tests/orderly_stop.rs
    pub fn capacity(&mut self) -> Result<u64, vhost::Error> {
        let (_, cfg) = self
            .fe
            .get_config(0, 8, VhostUserConfigFlags::WRITABLE, &[0; 8])?;
        let mut b = [0u8; 8];
        b.copy_from_slice(&cfg[..8]);
        Ok(u64::from_le_bytes(b) * 512)
    }

    /// Run one ordinary request on queue `q` with slot 0's buffers:
    /// header, `data_len` bytes of data (device-writable if `data_in`),
    /// status. Returns the status byte.
    pub fn simple(&mut self, q: usize, ty: u32, sector: u64, data_len: u32, data_in: bool) -> u8 {
        let m = &self.mem;
        m.header(hdr(0), ty, sector);
        m.write(status(0), &[0xff]);
        let mut segs = vec![Desc::rd(hdr(0), 16)];
        if data_len > 0 {
            segs.push(if data_in {
                Desc::wr(data(0), data_len)
            } else {
                Desc::rd(data(0), data_len)
            });
        }
        segs.push(Desc::wr(status(0), 1));
        let vq = &mut self.vqs[q];
        let head = vq.set_chain(m, 0, &segs);
        vq.publish(m, &[head]);
        vq.kick();
        let used = vq.wait_used(m, 1);
        assert_eq!(used[0].id, u32::from(head));
        m.read(status(0), 1)[0]
    }

    /// Write `bytes` at byte `offset` of the disk; the status byte.
    #[allow(dead_code)] // not tests/orderly_stop.rs
    pub fn write(&mut self, q: usize, offset: u64, bytes: &[u8]) -> u8 {
        assert!(bytes.len() as u64 <= DATA_SLOT * 4);
        self.mem.write(data(0), bytes);
        self.simple(q, VIRTIO_BLK_T_OUT, offset / 512, bytes.len() as u32, false)
    }

    /// Read `len` bytes at byte `offset`: the status byte and the data.
    pub fn read(&mut self, q: usize, offset: u64, len: usize) -> (u8, Vec<u8>) {
        assert!(len as u64 <= DATA_SLOT * 4);
        self.mem.fill(data(0), len, 0xee);
        let st = self.simple(q, VIRTIO_BLK_T_IN, offset / 512, len as u32, true);
        (st, self.mem.read(data(0), len))
    }

    /// A FLUSH on queue `q` (tests/hostile.rs's; the fuzz builds its own).
    #[allow(dead_code)]
    pub fn flush(&mut self, q: usize) -> u8 {
        self.simple(q, VIRTIO_BLK_T_FLUSH, 0, 0, false)
    }
}
