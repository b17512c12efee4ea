//! Running parsed requests against the engine as one batch.
//!
//! OUT data never goes from guest memory to the engine directly (DESIGN
//! §2): it is copied into a buffer we own before it is hashed and written.
//! IN data is read into the guest's buffer and verified there when
//! [`inplace`](super::inplace) allows, with a fallback that reads into a
//! buffer we own, verifies it, and only then copies it to the guest.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use virtio_bindings::bindings::virtio_blk::VIRTIO_BLK_S_OK;
use vm_memory::{GuestAddress, GuestMemory};

use super::guestmem;
use super::inplace::{self, Piece};
use super::ratelimit::RateLimit;
use super::request::{
    gather, scatter, status_of, write_status, Kind, Limits, ParseError, Request, RequestError,
    Segments, ID_LEN,
};
use crate::integrity::{Engine, EngineError, Op};
use crate::io::PageBuf;
use crate::writelog::WriteLog;

/// A batch is cut into engine submissions of about this many data bytes,
/// so a full ring of large requests does not hold gigabytes of buffers.
const BATCH_BYTES: usize = 64 << 20;
/// Buffers kept for reuse by one queue, and the largest one kept.
const POOL_BYTES: usize = 32 << 20;
const POOL_MAX_BUF: usize = 4 << 20;

/// Data buffers a queue worker reuses from batch to batch.
///
/// Allocating (and zeroing, and faulting in) a fresh buffer per request
/// costs more than the copy itself for large requests. A reused buffer
/// keeps stale bytes from an earlier request; that is harmless because a
/// write buffer is filled from the guest in full before use, and a read
/// buffer reaches the guest only after the engine filled and verified it.
/// Buffers start on a page, as guest buffers do ([`PageBuf`]: copies
/// between the two stay on the CPU's fast path).
#[derive(Debug, Default)]
pub struct BufPool {
    free: Vec<PageBuf>,
    bytes: usize,
}

impl BufPool {
    /// A buffer of at least `len` bytes (its `len()`, not just capacity).
    fn get(&mut self, len: usize) -> PageBuf {
        let best = self
            .free
            .iter()
            .enumerate()
            .filter(|(_, b)| b.len() >= len)
            .min_by_key(|(_, b)| b.len())
            .map(|(i, _)| i);
        match best {
            Some(i) => {
                let b = self.free.swap_remove(i);
                self.bytes -= b.len();
                b
            }
            None => PageBuf::zeroed(len),
        }
    }

    /// Half the free buffers, for a helper running part of a pass.
    pub fn split(&mut self) -> BufPool {
        let free = self.free.split_off(self.free.len() / 2);
        let bytes = free.iter().map(|b| b.len()).sum();
        self.bytes -= bytes;
        BufPool { free, bytes }
    }

    /// Take back what [`BufPool::split`] lent, within this pool's bound.
    pub fn merge(&mut self, other: BufPool) {
        for buf in other.free {
            self.put(buf);
        }
    }

    fn put(&mut self, buf: PageBuf) {
        if buf.len() <= POOL_MAX_BUF && self.bytes + buf.len() <= POOL_BYTES {
            self.bytes += buf.len();
            self.free.push(buf);
        }
    }
}

/// The disk as virtio-blk sees it: the engine plus what requests are
/// checked against. Shared by every queue and every connection.
pub struct Disk {
    engine: Arc<Engine>,
    limits: Limits,
    readonly: bool,
    serial: [u8; ID_LEN],
    log: RateLimit,
    /// Why the disk stopped answering, once it did ([`Disk::halt`]).
    halted: OnceLock<&'static str>,
    /// `--log-writes`: completed guest writes, zeroings and flushes.
    write_log: Option<Arc<WriteLog>>,
}

/// A finished request: the head to return and the bytes written to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Used {
    pub head: u16,
    pub len: u32,
}

/// One request on its way through a batch.
struct Job {
    head: u16,
    status: Option<GuestAddress>,
    work: Work,
    error: Option<RequestError>,
}

enum Work {
    Nothing,
    /// `buf` may be longer than `len` (pooled); only `..len` is used.
    Read {
        block: u64,
        len: usize,
        buf: PageBuf,
        data: Segments,
    },
    /// A read verified in the guest's buffers, `pieces` of `data`.
    ReadInPlace {
        block: u64,
        len: usize,
        data: Segments,
        pieces: Vec<Piece>,
    },
    Write {
        block: u64,
        len: usize,
        buf: PageBuf,
    },
    Zero(Vec<(u64, u64)>),
    Flush,
    GetId {
        len: usize,
        data: Segments,
    },
}

impl Work {
    fn bytes(&self) -> usize {
        match self {
            Work::Read { len, .. } | Work::ReadInPlace { len, .. } | Work::Write { len, .. } => {
                *len
            }
            _ => 0,
        }
    }

    fn modifies(&self) -> bool {
        matches!(self, Work::Write { .. } | Work::Zero(_))
    }
}

impl Disk {
    /// `serial` is truncated to 20 bytes (the caller validates it).
    pub fn new(engine: Arc<Engine>, limits: Limits, readonly: bool, serial: &str) -> Self {
        let mut id = [0u8; ID_LEN];
        let n = serial.len().min(ID_LEN);
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);
        Self {
            engine,
            limits,
            readonly,
            serial: id,
            log: RateLimit::new(20, Duration::from_secs(5)),
            halted: OnceLock::new(),
            write_log: None,
        }
    }

    /// Record what the guest is told completed in `log`.
    pub fn with_log(mut self, log: Option<Arc<WriteLog>>) -> Self {
        self.write_log = log;
        self
    }

    /// Stop answering, for good: from now on every request fails with an
    /// I/O error without reaching the engine, as a disk that lost its
    /// power answers nothing. (The engine may still hold completed writes;
    /// whoever halts the disk decides what becomes of them.)
    pub fn halt(&self, why: &'static str) {
        let _ = self.halted.set(why);
    }

    /// Whether [`halt`](Self::halt) was called.
    pub fn halted(&self) -> bool {
        self.halted.get().is_some()
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn readonly(&self) -> bool {
        self.readonly
    }

    /// A rate-limited warning, for anything a guest can trigger at will.
    pub fn warn(&self, args: std::fmt::Arguments<'_>) {
        self.log.log(log::Level::Warn, args);
    }

    /// Shutdown signal (DESIGN §4): write out all metadata, then keep it
    /// current after every write.
    pub fn enter_sync_mode(&self, why: &str) {
        // Logged either way; the callers here have no one to answer.
        let _ = self.try_enter_sync_mode(why);
    }

    /// [`enter_sync_mode`](Self::enter_sync_mode), for a caller that
    /// answers: `Ok(true)` once the metadata is current, `Ok(false)` for a
    /// read-only disk, whose metadata is never written.
    pub fn try_enter_sync_mode(&self, why: &str) -> Result<bool, EngineError> {
        if self.readonly {
            log::info!(
                "{why}: read-only disk, its metadata is never written (synchronous mode is moot)"
            );
            return Ok(false);
        }
        match self.engine.enter_sync_mode() {
            Ok(()) => {
                log::info!("{why}: metadata is now written synchronously");
                Ok(true)
            }
            Err(e) => {
                log::error!(
                    "{why}: cannot switch to synchronous metadata: {}",
                    crate::error::Chain(&e)
                );
                Err(e)
            }
        }
    }

    /// The driver started the device again: back to lazy write-back.
    pub fn leave_sync_mode(&self, why: &str) {
        if self.readonly || !self.engine.sync_mode() {
            return;
        }
        match self.engine.leave_sync_mode() {
            Ok(()) => log::info!("{why}: leaving synchronous metadata mode"),
            Err(e) => log::error!(
                "{why}: cannot leave synchronous metadata mode: {}",
                crate::error::Chain(&e)
            ),
        }
    }

    /// Periodic write-back of dirty metadata pages.
    pub fn writeback(&self) {
        if self.readonly {
            return;
        }
        if let Err(e) = self.engine.writeback() {
            log::error!("metadata write-back failed: {}", crate::error::Chain(&e));
        }
    }

    /// Orderly stop point: everything durable, the metadata marked clean.
    ///
    /// `true` when everything is in the image and the stage is empty.
    pub fn make_clean(&self, why: &str) -> bool {
        if self.readonly {
            return true;
        }
        match self.engine.make_clean() {
            Ok(true) => {
                log::info!("{why}: metadata written back and marked clean");
                true
            }
            Ok(false) => {
                log::info!("{why}: metadata written back; writes arriving meanwhile keep it dirty");
                false
            }
            Err(e) => {
                log::error!(
                    "{why}: cannot mark the metadata clean: {}",
                    crate::error::Chain(&e)
                );
                false
            }
        }
    }

    /// Run every request of one completion group and write the results, data and
    /// status bytes into guest memory. `write_through` (the driver turned
    /// the write cache off) makes writes durable before they complete.
    pub fn run<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        parsed: Vec<Result<Request, ParseError>>,
        write_through: bool,
        pool: &mut BufPool,
    ) -> Vec<Used> {
        let mut used = Vec::with_capacity(parsed.len());
        let mut jobs = Vec::new();
        let mut bytes = 0;
        let mut claims = inplace::Claims::default();
        // Once per drain: a batch is served whole or refused whole.
        let halted = self.halted.get().copied();
        for p in parsed {
            let job = self.prepare(mem, p, halted, pool, &mut claims);
            bytes += job.work.bytes();
            jobs.push(job);
            if bytes >= BATCH_BYTES {
                self.submit(mem, &mut jobs, write_through, pool);
                used.extend(jobs.drain(..).map(|j| self.finish(mem, j, pool)));
                bytes = 0;
            }
        }
        if !jobs.is_empty() {
            self.submit(mem, &mut jobs, write_through, pool);
            used.extend(jobs.into_iter().map(|j| self.finish(mem, j, pool)));
        }
        used
    }

    /// Turn a parsed request into owned buffers ready for the engine; on a
    /// disk `halted` for that reason, into a failure.
    fn prepare<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        p: Result<Request, ParseError>,
        halted: Option<&'static str>,
        pool: &mut BufPool,
        claims: &mut inplace::Claims,
    ) -> Job {
        let req = match p {
            Ok(r) => r,
            Err(e) => {
                return Job {
                    head: e.head,
                    status: e.status,
                    work: Work::Nothing,
                    error: Some(e.error),
                }
            }
        };
        let mut job = Job {
            head: req.head,
            status: Some(req.status),
            work: Work::Nothing,
            error: None,
        };
        if let Some(why) = halted {
            job.error = Some(RequestError::Halted(why));
            return job;
        }
        let modifies = matches!(req.kind, Kind::Write { .. } | Kind::Zero { .. });
        if modifies && self.readonly {
            job.error = Some(RequestError::ReadOnly);
            return job;
        }
        job.work = match req.kind {
            Kind::Read { len: 0, .. } | Kind::Write { len: 0, .. } => Work::Nothing,
            Kind::Read { block, len, data } => {
                let bs = self.limits.block_size as usize;
                match inplace::pieces(mem, &data, len, bs, claims) {
                    Some(pieces) => Work::ReadInPlace {
                        block,
                        len,
                        data,
                        pieces,
                    },
                    None => Work::Read {
                        block,
                        len,
                        buf: pool.get(len),
                        data,
                    },
                }
            }
            Kind::Write { block, len, data } => {
                let mut buf = pool.get(len);
                if let Err(e) = gather(mem, &data, &mut buf[..len]) {
                    pool.put(buf);
                    job.error = Some(e);
                    return job;
                }
                Work::Write { block, len, buf }
            }
            Kind::Zero { ranges } if ranges.is_empty() => Work::Nothing,
            Kind::Zero { ranges } => Work::Zero(ranges),
            Kind::Flush => Work::Flush,
            Kind::GetId { len, data } => Work::GetId { len, data },
        };
        job
    }

    /// One engine submission for every job that has I/O to do, then the
    /// reads that failed in place once more through buffers of ours.
    fn submit<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        jobs: &mut [Job],
        write_through: bool,
        pool: &mut BufPool,
    ) {
        let faulted = self.submit_once(jobs, None, write_through);
        self.retry_in_place(mem, jobs, faulted, pool);
    }

    /// Turn every in-place read that did not verify (or that guest memory
    /// faults may have touched) into a read through a buffer of ours, and
    /// run those.
    fn retry_in_place<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        jobs: &mut [Job],
        faulted: bool,
        pool: &mut BufPool,
    ) {
        let mut again = vec![false; jobs.len()];
        for (i, job) in jobs.iter_mut().enumerate() {
            let Work::ReadInPlace { data, pieces, .. } = &job.work else {
                continue;
            };
            let touched = faulted
                || data
                    .iter()
                    .any(|s| guestmem::poisoned(mem, s.addr, s.len as usize));
            if job.error.is_none() && !touched {
                continue;
            }
            for p in pieces {
                // SAFETY: `run`'s caller still holds the memory, and the
                // engine's slices of it ended with the submission.
                unsafe { p.wipe() };
            }
            let Work::ReadInPlace {
                block, len, data, ..
            } = std::mem::replace(&mut job.work, Work::Nothing)
            else {
                unreachable!("matched above")
            };
            job.work = Work::Read {
                block,
                len,
                buf: pool.get(len),
                data,
            };
            job.error = None;
            again[i] = true;
        }
        if again.contains(&true) {
            // Reads only: nothing to record in the write log, no flush.
            self.submit_once(jobs, Some(&again), false);
        }
    }

    /// One engine submission for every job (those marked in `only`, if
    /// given) that has I/O to do; whether guest memory faulted on this
    /// thread meanwhile.
    fn submit_once(&self, jobs: &mut [Job], only: Option<&[bool]>, write_through: bool) -> bool {
        let mut ops = Vec::with_capacity(jobs.len() + 1);
        let mut owners = Vec::with_capacity(jobs.len() + 1);
        let mut modified = false;
        for (i, job) in jobs.iter_mut().enumerate() {
            if job.error.is_some() || only.is_some_and(|o| !o[i]) {
                continue;
            }
            modified |= job.work.modifies();
            match &mut job.work {
                Work::Read {
                    block, len, buf, ..
                } => {
                    ops.push(Op::Read {
                        block: *block,
                        buf: &mut buf[..*len],
                    });
                    owners.push(Some(i));
                }
                Work::ReadInPlace { block, pieces, .. } => {
                    let mut at = *block;
                    for p in pieces.iter() {
                        // SAFETY: `run`'s caller holds the memory the
                        // pieces map until the jobs finish, and the
                        // pieces of a batch are disjoint (`Claims`).
                        let buf = unsafe { p.as_mut_slice() };
                        let len = buf.len() as u64;
                        ops.push(Op::TryRead { block: at, buf });
                        owners.push(Some(i));
                        at += len / u64::from(self.limits.block_size);
                    }
                }
                Work::Write { block, len, buf } => {
                    ops.push(Op::Write {
                        block: *block,
                        data: &buf[..*len],
                    });
                    owners.push(Some(i));
                }
                Work::Zero(ranges) => {
                    for &(block, count) in ranges.iter() {
                        ops.push(Op::Zero { block, count });
                        owners.push(Some(i));
                    }
                }
                Work::Flush => {
                    ops.push(Op::Flush);
                    owners.push(Some(i));
                }
                Work::Nothing | Work::GetId { .. } => {}
            }
        }
        if ops.is_empty() {
            return false;
        }
        // Write-through: one trailing flush makes the whole batch durable;
        // if it fails, every write of the batch fails.
        let trailing_flush = write_through && modified;
        if trailing_flush {
            ops.push(Op::Flush);
            owners.push(None);
        }
        let n = ops.len();
        // A FLUSH of this batch covers every guest write recorded before.
        let began = self.write_log.as_ref().map(|l| l.position());
        // In-place reads hash guest memory: a page whose file shrank
        // faults there, and the handler lets the hash finish on zeros.
        let (results, faulted) = guestmem::watched(|| self.engine.submit(&mut ops));
        let mut results = results.into_iter();
        drop(ops);
        let mut flush_failed = false;
        for owner in owners.iter().take(n) {
            let r = results.next().unwrap_or_else(|| {
                Err(EngineError::Io {
                    what: "completing a batch",
                    source: Arc::new(std::io::Error::other("the engine returned too few results")),
                })
            });
            let Err(e) = r else { continue };
            match owner {
                Some(i) => {
                    if let Some(job) = jobs.get_mut(*i) {
                        job.error.get_or_insert(RequestError::Engine(e));
                    }
                }
                None => {
                    self.warn(format_args!("write-through flush failed: {e}"));
                    flush_failed = true;
                }
            }
        }
        if flush_failed {
            for job in jobs.iter_mut().filter(|j| j.work.modifies()) {
                job.error
                    .get_or_insert(RequestError::Engine(EngineError::Io {
                        what: "flushing a write-through batch",
                        source: Arc::new(std::io::Error::other("flush failed")),
                    }));
            }
        }
        if let (Some(log), Some(began), None) = (&self.write_log, began, only) {
            self.record(log, jobs, began);
        }
        faulted
    }

    /// Put the batch's successful writes, zeroings and flushes into the
    /// write log, in the order the driver made them available, before
    /// any of them is completed to the guest.
    fn record(&self, log: &WriteLog, jobs: &[Job], began: u64) {
        for job in jobs.iter().filter(|j| j.error.is_none()) {
            match &job.work {
                Work::Write { block, len, buf } => {
                    log.guest_write(*block, &buf[..*len], self.limits.block_size as usize, began)
                }
                Work::Zero(ranges) => {
                    for &(block, count) in ranges {
                        log.guest_zero(block, count, began);
                    }
                }
                Work::Flush => log.guest_flush(began),
                _ => {}
            }
        }
    }

    /// Copy results to the guest, write the status byte, report the used length.
    fn finish<M: GuestMemory + ?Sized>(&self, mem: &M, mut job: Job, pool: &mut BufPool) -> Used {
        let mut written = 0u32;
        if job.error.is_none() {
            let out = match &job.work {
                Work::Read { len, buf, data, .. } => Some((&buf[..*len], data)),
                // Verified where it lies (`retry_in_place` let it stand).
                Work::ReadInPlace { len, .. } => {
                    self.engine.count_read();
                    written = *len as u32;
                    None
                }
                Work::GetId { len, data } => Some((&self.serial[..*len], data)),
                _ => None,
            };
            if let Some((bytes, data)) = out {
                match scatter(mem, data, bytes) {
                    // Bounded by the chain length, which virtio keeps below 4 GiB.
                    Ok(()) => written = bytes.len() as u32,
                    Err(e) => job.error = Some(e),
                }
            }
        }
        match std::mem::replace(&mut job.work, Work::Nothing) {
            Work::Read { buf, .. } | Work::Write { buf, .. } => pool.put(buf),
            _ => {}
        }
        let Some(status_addr) = job.status else {
            if let Some(e) = &job.error {
                self.warn(format_args!("dropping request {}: {e}", job.head));
            }
            return Used {
                head: job.head,
                len: 0,
            };
        };
        let status = match &job.error {
            None => VIRTIO_BLK_S_OK as u8,
            Some(e) => {
                self.log_failure(job.head, e);
                status_of(e)
            }
        };
        if let Err(e) = write_status(mem, status_addr, status) {
            self.warn(format_args!(
                "request {}: cannot write status: {e}",
                job.head
            ));
            return Used {
                head: job.head,
                len: 0,
            };
        }
        Used {
            head: job.head,
            len: written.saturating_add(1),
        }
    }

    fn log_failure(&self, head: u16, e: &RequestError) {
        match e {
            // The engine has logged the block and counted it.
            RequestError::Engine(EngineError::Mismatch { block }) => {
                log::debug!("request {head}: read of block {block} failed verification")
            }
            _ => self.warn(format_args!("request {head} failed: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use virtio_bindings::bindings::virtio_blk::{
        VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
        VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    };
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::blk::testutil::*;
    use crate::integrity::{EngineOptions, OnMismatch};
    use crate::io::{Device, MemDevice};

    struct Fixture {
        data: Arc<MemDevice>,
        disk: Disk,
        mem: GuestMemoryMmap,
        /// One pool across a test's batches, as a queue worker keeps it.
        pool: RefCell<BufPool>,
    }

    fn fixture(readonly: bool) -> Fixture {
        let (data, disk) = mem_disk(readonly);
        fixture_of(data, disk)
    }

    /// A fixture around a disk of the test's own; `data` is what the test
    /// pokes at.
    fn fixture_of(data: Arc<MemDevice>, disk: Disk) -> Fixture {
        Fixture {
            data,
            disk,
            mem: guest_memory(),
            pool: RefCell::new(BufPool::default()),
        }
    }

    /// Put `reqs` on a mock queue, drain it and run it as one batch.
    fn run(f: &Fixture, reqs: &[Req], write_through: bool) -> Vec<Used> {
        let vq = MockSplitQueue::new(&f.mem, 256);
        vq.add_desc_chains(&descriptors(&f.mem, reqs), 0).unwrap();
        let parsed = parse_ring(&f.mem, &vq, f.disk.limits());
        f.disk
            .run(&f.mem, parsed, write_through, &mut f.pool.borrow_mut())
    }

    fn status_of_req(f: &Fixture, k: u64) -> u8 {
        status_byte(&f.mem, k)
    }

    fn fill(f: &Fixture, k: u64, byte: u8, len: usize) {
        fill_buf(&f.mem, k, byte, len)
    }

    fn guest(f: &Fixture, k: u64, len: usize) -> Vec<u8> {
        read_buf(&f.mem, k, len)
    }

    #[test]
    fn a_batch_of_writes_reads_back_with_used_lengths() {
        let f = fixture(false);
        for k in 0..3 {
            fill(&f, k, 0x10 + k as u8, 8192);
        }
        let used = run(
            &f,
            &[
                req(VIRTIO_BLK_T_OUT, 0, 8192),
                req(VIRTIO_BLK_T_OUT, 16, 4096),
                req(VIRTIO_BLK_T_OUT, 64, 8192),
                req(VIRTIO_BLK_T_FLUSH, 0, 0),
            ],
            false,
        );
        assert_eq!(used.iter().map(|u| u.len).collect::<Vec<_>>(), [1, 1, 1, 1]);
        assert!((0..4).all(|k| status_of_req(&f, k) == 0));
        let mut on_disk = vec![0u8; 4096];
        f.data.read_at(&mut on_disk, 2 * 4096).unwrap();
        assert!(on_disk.iter().all(|&b| b == 0x11));

        for k in 0..3 {
            fill(&f, k, 0xee, 8192);
        }
        let used = run(
            &f,
            &[
                req(VIRTIO_BLK_T_IN, 0, 8192),
                req(VIRTIO_BLK_T_IN, 16, 4096),
                req(VIRTIO_BLK_T_IN, 64, 8192),
            ],
            false,
        );
        assert_eq!(
            used.iter().map(|u| u.len).collect::<Vec<_>>(),
            [8193, 4097, 8193]
        );
        assert_eq!(guest(&f, 0, 8192), vec![0x10; 8192]);
        assert_eq!(guest(&f, 1, 4096), vec![0x11; 4096]);
        assert_eq!(guest(&f, 2, 8192), vec![0x12; 8192]);
    }

    #[test]
    fn a_failed_verification_is_ioerr_and_leaves_no_device_byte_in_the_guest_buffer() {
        let f = fixture(false);
        fill(&f, 0, 0x42, 8192);
        run(&f, &[req(VIRTIO_BLK_T_OUT, 8, 8192)], false);
        // Corrupt what is on the device, not what the engine still holds.
        f.disk.engine().drain();
        f.data.write_at(&[0x43], 4096 + 100).unwrap();
        fill(&f, 0, 0xee, 8192);
        fill(&f, 1, 0xee, 4096);
        let used = run(
            &f,
            &[
                req(VIRTIO_BLK_T_IN, 8, 8192),
                req(VIRTIO_BLK_T_IN, 16, 4096),
            ],
            false,
        );
        assert_eq!(status_of_req(&f, 0), VIRTIO_BLK_S_IOERR as u8);
        assert_eq!(used[0].len, 1);
        // Read in place, then wiped: zeros, never the device's unverified
        // bytes (nor the verified first block of the request).
        assert!(
            guest(&f, 0, 8192).iter().all(|&b| b == 0),
            "unverified data reached the guest"
        );
        assert_eq!(status_of_req(&f, 1), 0, "the other request of the batch");
        assert_eq!(f.disk.engine().stats().mismatches, 1);
    }

    /// A data device that runs `hook` on every buffer a read filled, to
    /// do to it what a guest or its memory could meanwhile.
    struct AfterRead<F> {
        inner: MemDevice,
        hook: F,
    }

    fn after_read<F>(hook: F) -> Arc<AfterRead<F>>
    where
        F: Fn(&mut [u8]) -> std::io::Result<()> + Send + Sync,
    {
        Arc::new(AfterRead {
            inner: MemDevice::new(u64::from(BS) * BLOCKS),
            hook,
        })
    }

    impl<F> Device for AfterRead<F>
    where
        F: Fn(&mut [u8]) -> std::io::Result<()> + Send + Sync,
    {
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            self.inner.read_at(buf, offset)?;
            (self.hook)(buf)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
            self.inner.write_at(buf, offset)
        }
        fn sync(&self) -> std::io::Result<()> {
            self.inner.sync()
        }
        fn zero_range(&self, offset: u64, len: u64) -> std::io::Result<()> {
            self.inner.zero_range(offset, len)
        }
    }

    #[test]
    fn a_read_spoilt_in_place_is_read_again_and_is_no_mismatch() {
        // Its next `scribbles` reads come back with a byte changed, as a
        // guest writing into its read buffer while the read runs in place
        // makes it look.
        let scribbles = Arc::new(AtomicUsize::new(0));
        let reads = Arc::new(AtomicUsize::new(0));
        let data = after_read({
            let (scribbles, reads) = (scribbles.clone(), reads.clone());
            move |buf: &mut [u8]| {
                reads.fetch_add(1, Ordering::SeqCst);
                let left = scribbles.load(Ordering::SeqCst);
                if left > 0 {
                    scribbles.store(left - 1, Ordering::SeqCst);
                    buf[buf.len() / 2] ^= 0x5a;
                }
                Ok(())
            }
        });
        // Nothing pokes at the data device.
        let f = fixture_of(Arc::new(MemDevice::new(0)), disk_over(data, false));
        fill(&f, 0, 0x42, 8192);
        run(&f, &[req(VIRTIO_BLK_T_OUT, 8, 8192)], false);
        f.disk.engine().drain();
        let counted = f.disk.engine().stats().reads;
        scribbles.store(1, Ordering::SeqCst);
        let before = reads.load(Ordering::SeqCst);
        fill(&f, 0, 0xee, 8192);
        run(&f, &[req(VIRTIO_BLK_T_IN, 8, 8192)], false);
        assert_eq!(status_of_req(&f, 0), 0, "the second read verified");
        assert_eq!(guest(&f, 0, 8192), vec![0x42; 8192]);
        assert_eq!(
            reads.load(Ordering::SeqCst) - before,
            2,
            "read in place, then again through a buffer of ours"
        );
        let stats = f.disk.engine().stats();
        assert_eq!(stats.mismatches, 0, "a spoilt buffer is not bad data");
        assert_eq!(stats.reads, counted + 1, "one guest read, counted once");
    }

    #[test]
    fn a_fault_while_verifying_in_place_fails_the_read_and_is_no_mismatch() {
        // Data that the zero page (what a fault leaves mapped) does not
        // match, and data it does: only the fault itself tells the second
        // read that its buffer is gone.
        for byte in [0x42, 0] {
            fault_while_verifying_in_place(byte);
        }
    }

    fn fault_while_verifying_in_place(byte: u8) {
        use vm_memory::FileOffset;
        let name = std::ffi::CString::new("inplace-fault").unwrap();
        // SAFETY: a valid C string; the result is checked.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), 0) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor nothing else owns.
        let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        // The data buffers (buf(k)) in a region of their own over the
        // memfd; rings, headers and status bytes in anonymous memory.
        let (lo, hi) = (buf(0), status(0));
        file.set_len(hi - lo).unwrap();
        let mem = GuestMemoryMmap::from_ranges_with_files([
            (GuestAddress(0), lo as usize, None),
            (
                GuestAddress(lo),
                (hi - lo) as usize,
                Some(FileOffset::new(file.try_clone().unwrap(), 0)),
            ),
            (GuestAddress(hi), 0x100_0000 - hi as usize, None),
        ])
        .unwrap();
        crate::blk::guestmem::register(&mem).unwrap();
        // Once armed, the data device shrinks the guest's memory file to
        // nothing right after a read filled the buffer: what the engine
        // does next with that buffer (the in-place hash) faults.
        let armed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let data = after_read({
            let armed = armed.clone();
            move |_: &mut [u8]| {
                if armed.swap(false, Ordering::SeqCst) {
                    file.set_len(0)?;
                }
                Ok(())
            }
        });
        let mut f = fixture_of(Arc::new(MemDevice::new(0)), disk_over(data, false));
        f.mem = mem;
        fill(&f, 0, byte, 8192);
        run(&f, &[req(VIRTIO_BLK_T_OUT, 8, 8192)], false);
        f.disk.engine().drain();

        armed.store(true, Ordering::SeqCst);
        let used = run(&f, &[req(VIRTIO_BLK_T_IN, 8, 8192)], false);
        assert!(!armed.load(Ordering::SeqCst), "the read went in place");
        assert_eq!(used.len(), 1);
        assert_eq!(
            status_of_req(&f, 0),
            VIRTIO_BLK_S_IOERR as u8,
            "{byte:#x}: the buffer is gone: the read cannot complete OK"
        );
        let stats = f.disk.engine().stats();
        assert_eq!(stats.mismatches, 0, "a fault is not bad data");
        assert!(f.disk.engine().recent_mismatches().is_empty());
        // The disk itself is fine: read into memory that still exists.
        let mut back = vec![0u8; 8192];
        f.disk
            .engine()
            .read(8 * 512 / u64::from(BS), &mut back)
            .unwrap();
        assert_eq!(back, vec![byte; 8192]);
    }

    /// Run one read of `segs` (guest address, length) at `sector` as a
    /// batch of its own.
    fn run_read_into(f: &Fixture, sector: u64, segs: &[(u64, u32)]) -> Vec<Used> {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        f.mem.write_slice(&h, GuestAddress(hdr(0))).unwrap();
        let mut chain = vec![(hdr(0), 16, 0)];
        chain.extend(segs.iter().map(|&(a, l)| (a, l, VRING_DESC_F_WRITE)));
        chain.push((status(0), 1, VRING_DESC_F_WRITE));
        let n = chain.len();
        let descs: Vec<RawDescriptor> = chain
            .into_iter()
            .enumerate()
            .map(|(i, (addr, len, flags))| {
                let (flags, next) = if i + 1 < n {
                    (flags | VRING_DESC_F_NEXT, i as u16 + 1)
                } else {
                    (flags, 0)
                };
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
            })
            .collect();
        let vq = MockSplitQueue::new(&f.mem, 256);
        vq.add_desc_chains(&descs, 0).unwrap();
        let parsed = parse_ring(&f.mem, &vq, f.disk.limits());
        f.disk.run(&f.mem, parsed, false, &mut f.pool.borrow_mut())
    }

    #[test]
    fn a_read_in_two_pieces_gets_each_block_in_its_place_and_counts_once() {
        let f = fixture(false);
        let bs = BS as usize;
        // Blocks 8..40, each of its own byte.
        let data: Vec<u8> = (0..32).flat_map(|i| vec![0x20 + i as u8; bs]).collect();
        f.mem.write_slice(&data, GuestAddress(buf(0))).unwrap();
        run(&f, &[req(VIRTIO_BLK_T_OUT, 64, 32 * BS)], false);
        let reads = f.disk.engine().stats().reads;
        let (a, b) = (0x80_0000, 0x90_0000);
        f.mem
            .write_slice(&vec![0xee; 16 * bs], GuestAddress(a))
            .unwrap();
        f.mem
            .write_slice(&vec![0xee; 16 * bs], GuestAddress(b))
            .unwrap();
        let used = run_read_into(&f, 64, &[(a, 16 * BS), (b, 16 * BS)]);
        assert_eq!(used[0].len, 32 * BS + 1);
        assert_eq!(status_byte(&f.mem, 0), 0);
        let mut got = vec![0u8; 16 * bs];
        f.mem.read_slice(&mut got, GuestAddress(a)).unwrap();
        assert!(got == data[..16 * bs], "the first piece holds blocks 8..24");
        f.mem.read_slice(&mut got, GuestAddress(b)).unwrap();
        assert!(
            got == data[16 * bs..],
            "the second piece holds blocks 24..40"
        );
        assert_eq!(f.disk.engine().stats().reads, reads + 1);
    }

    #[test]
    fn on_mismatch_log_delivers_the_data_once_logged() {
        let data = Arc::new(MemDevice::new(u64::from(BS) * BLOCKS));
        let opts = EngineOptions {
            on_mismatch: OnMismatch::Log,
            ..EngineOptions::default()
        };
        let f = fixture_of(data.clone(), disk_with(data, opts));
        fill(&f, 0, 0x42, 8192);
        run(&f, &[req(VIRTIO_BLK_T_OUT, 8, 8192)], false);
        f.disk.engine().drain();
        f.data.write_at(&[0x43], 4096 + 100).unwrap();
        let reads = f.disk.engine().stats().reads;
        fill(&f, 0, 0xee, 8192);
        run(&f, &[req(VIRTIO_BLK_T_IN, 8, 8192)], false);
        assert_eq!(status_of_req(&f, 0), 0);
        // Sector 8 is block 1: the flipped byte is the request's 101st.
        let mut want = vec![0x42; 8192];
        want[100] = 0x43;
        assert!(guest(&f, 0, 8192) == want, "the device's data, as asked");
        let stats = f.disk.engine().stats();
        assert_eq!((stats.mismatches, stats.reads), (1, reads + 1));
    }

    #[test]
    fn readonly_fails_writes_and_zeroes_but_serves_reads() {
        let f = fixture(true);
        fill(&f, 0, 0x42, 4096);
        fill(&f, 1, 0, 16);
        let used = run(
            &f,
            &[
                req(VIRTIO_BLK_T_OUT, 0, 4096),
                req(VIRTIO_BLK_T_WRITE_ZEROES, 0, 16),
                req(VIRTIO_BLK_T_IN, 0, 4096),
            ],
            false,
        );
        assert_eq!(status_of_req(&f, 0), VIRTIO_BLK_S_IOERR as u8);
        assert_eq!(status_of_req(&f, 1), VIRTIO_BLK_S_IOERR as u8);
        assert_eq!(status_of_req(&f, 2), 0);
        assert_eq!(used[2].len, 4097);
        assert!(f.data.to_vec().iter().all(|&b| b == 0));
    }

    #[test]
    fn a_halted_disk_fails_every_request_without_reaching_the_engine() {
        let f = fixture(false);
        fill(&f, 0, 0x42, 4096);
        run(&f, &[req(VIRTIO_BLK_T_OUT, 0, 4096)], false);
        assert_eq!(status_of_req(&f, 0), 0);
        assert!(!f.disk.halted());
        f.disk.halt("for the test");
        assert!(f.disk.halted());
        // The write-back thread counts the write when it commits it.
        f.disk.engine().drain();
        let before = f.disk.engine().stats();
        for k in 0..4 {
            fill(&f, k, 0xee, 4096);
        }
        let used = run(
            &f,
            &[
                req(VIRTIO_BLK_T_IN, 0, 4096),
                req(VIRTIO_BLK_T_OUT, 8, 4096),
                req(VIRTIO_BLK_T_FLUSH, 0, 0),
                req(VIRTIO_BLK_T_GET_ID, 0, 64),
            ],
            false,
        );
        for k in 0..4 {
            assert_eq!(
                status_of_req(&f, k),
                VIRTIO_BLK_S_IOERR as u8,
                "request {k}"
            );
            assert_eq!(used[k as usize].len, 1, "only the status byte");
        }
        // The engine still holds the earlier write; it never sees these.
        assert_eq!(guest(&f, 0, 4096), vec![0xee; 4096], "no data read");
        assert_eq!(guest(&f, 3, 20), vec![0xee; 20], "no serial either");
        let after = f.disk.engine().stats();
        assert_eq!((after.reads, after.writes), (before.reads, before.writes));
    }

    #[test]
    fn get_id_returns_the_padded_serial() {
        let f = fixture(false);
        fill(&f, 0, 0xee, 64);
        let used = run(&f, &[req(VIRTIO_BLK_T_GET_ID, 0, 64)], false);
        assert_eq!(used[0].len, 21);
        let id = guest(&f, 0, 21);
        assert_eq!(&id[..10], b"serial-123");
        assert_eq!(&id[10..20], &[0; 10]);
        assert_eq!(id[20], 0xee, "nothing past 20 bytes");
    }

    #[test]
    fn bad_requests_get_their_status_and_a_chain_without_one_is_dropped() {
        let f = fixture(false);
        let mut no_status = req(VIRTIO_BLK_T_OUT, 0, 4096);
        no_status.with_status = false;
        let used = run(
            &f,
            &[
                req(2, 0, 0),                           // SCSI: unsupported
                req(VIRTIO_BLK_T_IN, BLOCKS * 8, 4096), // past the end
                req(VIRTIO_BLK_T_OUT, 0, 1000),         // not whole blocks
                no_status,
            ],
            false,
        );
        assert_eq!(status_of_req(&f, 0), VIRTIO_BLK_S_UNSUPP as u8);
        assert_eq!(status_of_req(&f, 1), VIRTIO_BLK_S_IOERR as u8);
        assert_eq!(status_of_req(&f, 2), VIRTIO_BLK_S_IOERR as u8);
        assert_eq!(used.len(), 4, "every chain is returned");
        assert_eq!(used[3].len, 0);
        assert!(
            f.data.to_vec().iter().all(|&b| b == 0),
            "nothing was written"
        );
    }

    #[test]
    fn write_zeroes_reads_back_zeros() {
        let f = fixture(false);
        fill(&f, 0, 0x42, 16384);
        run(&f, &[req(VIRTIO_BLK_T_OUT, 0, 16384)], false);
        let mut seg = [0u8; 16];
        seg[..8].copy_from_slice(&8u64.to_le_bytes());
        seg[8..12].copy_from_slice(&16u32.to_le_bytes());
        f.mem.write_slice(&seg, GuestAddress(buf(0))).unwrap();
        run(&f, &[req(VIRTIO_BLK_T_WRITE_ZEROES, 0, 16)], false);
        assert_eq!(status_of_req(&f, 0), 0);
        run(&f, &[req(VIRTIO_BLK_T_IN, 0, 16384)], false);
        let g = guest(&f, 0, 16384);
        assert_eq!(&g[..4096], &[0x42; 4096][..]);
        assert!(g[4096..12288].iter().all(|&b| b == 0));
        assert_eq!(&g[12288..], &[0x42; 4096][..]);
    }

    #[test]
    fn write_through_makes_each_batch_durable() {
        let f = fixture(false);
        fill(&f, 0, 0x42, 4096);
        let before = f.disk.engine().stats().data_syncs;
        run(&f, &[req(VIRTIO_BLK_T_OUT, 0, 4096)], true);
        assert_eq!(status_of_req(&f, 0), 0);
        assert!(f.disk.engine().stats().data_syncs > before);
    }

    #[test]
    fn random_chains_never_panic_and_always_complete() {
        use rand::{Rng, SeedableRng};
        use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_INDIRECT;

        let f = fixture(false);
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x7715);
        let addrs = [
            0u64,
            0x10_0000,
            0x20_0000,
            0xff_fff0,
            0x100_0000,
            u64::MAX - 8,
        ];
        for _ in 0..300 {
            let vq = MockSplitQueue::new(&f.mem, 64);
            let n = rng.gen_range(1..24u16);
            let mut descs = Vec::new();
            for i in 0..n {
                // Headers of random types and sectors at a few addresses.
                let mut h = [0u8; 16];
                rng.fill(&mut h[..]);
                h[0] = [0, 1, 4, 8, 11, 13, 2, h[0]][rng.gen_range(0..8)];
                h[1..4].fill(0);
                f.mem
                    .write_slice(&h, GuestAddress(hdr(u64::from(i))))
                    .unwrap();
                let addr = if rng.gen_bool(0.5) {
                    hdr(u64::from(i)) + rng.gen_range(0..32)
                } else {
                    addrs[rng.gen_range(0..addrs.len())] + rng.gen_range(0..8)
                };
                let len =
                    [0, 1, 15, 16, 17, 512, 4096, 4097, 65536, u32::MAX][rng.gen_range(0..10)];
                let mut flags = 0u16;
                if rng.gen_bool(0.4) {
                    flags |= VRING_DESC_F_WRITE as u16;
                }
                if rng.gen_bool(0.6) {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                if rng.gen_bool(0.03) {
                    flags |= VRING_DESC_F_INDIRECT as u16;
                }
                let next = if rng.gen_bool(0.9) { i + 1 } else { rng.gen() };
                descs.push(RawDescriptor::from(SplitDescriptor::new(
                    addr, len, flags, next,
                )));
            }
            if vq.add_desc_chains(&descs, 0).is_err() {
                continue;
            }
            let parsed = parse_ring(&f.mem, &vq, f.disk.limits());
            let heads = parsed.len();
            let used = f
                .disk
                .run(&f.mem, parsed, rng.gen_bool(0.2), &mut f.pool.borrow_mut());
            assert_eq!(used.len(), heads, "every chain is completed");
        }
    }

    #[test]
    fn the_buffer_pool_reuses_the_smallest_fit_and_stays_bounded() {
        let filled = |len, byte| {
            let mut b = PageBuf::zeroed(len);
            b.fill(byte);
            b
        };
        let mut p = BufPool::default();
        p.put(filled(8192, 1));
        p.put(filled(4096, 2));
        let b = p.get(4000);
        assert_eq!((b.len(), b[0]), (4096, 2), "smallest buffer that fits");
        let b = p.get(16384);
        assert_eq!(b.len(), 16384, "nothing fits: a new one");
        assert_eq!(b.as_ptr() as usize % 4096, 0, "on a page");
        p.put(PageBuf::zeroed(POOL_MAX_BUF + 1));
        assert_eq!(p.free.len(), 1, "oversized buffers are not kept");
        for _ in 0..POOL_BYTES / POOL_MAX_BUF + 2 {
            p.put(PageBuf::zeroed(POOL_MAX_BUF));
        }
        assert!(p.bytes <= POOL_BYTES);
    }
}
